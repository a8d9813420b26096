"""Two models in one loop (Wan2.2's experts): one hook numbers both instances' calls, and the first
two steps after the switch are never skipped."""
import pytest
import torch
from torch import nn

from taohooks import CalibrationRecorder, DenoiserHook, LoopSpec, TaoCache, config_from_dict
from taohooks.config import PlanConfig
from taohooks.taocache.plan import PlanError, switch_guard
from taohooks.taocache.cache import expert_guard, make_plan


class Expert(nn.Module):
    """``e(t) = a + b * sin(t / 300)``: smooth in the timestep, its own ``a, b`` per expert."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("a", torch.randn(2, 3, 3, generator=g))
        self.register_buffer("b", torch.randn(2, 3, 3, generator=g))
        self.calls = 0

    def forward(self, x, t, context=None):
        self.calls += 1
        return [self.a + self.b * torch.sin(t.float().amax() / 300.0) * (1.0 if context == "cond" else 0.7)]


TIMESTEPS = torch.linspace(999, 30, 16)
BOUNDARY = 875.0


def run(high, low, timesteps=TIMESTEPS):
    outs = []
    for t in timesteps:
        model = high if t >= BOUNDARY else low
        ts = torch.stack([t])
        outs.append((model(None, t=ts, context="cond")[0], model(None, t=ts, context="uncond")[0]))
    return outs


def calibrated(high, low):
    """A LUT of one generation over both experts (timesteps ``TIMESTEPS``: low-noise from step 2)."""
    rec = CalibrationRecorder(identity={"expert_boundary": BOUNDARY})
    with DenoiserHook(LoopSpec(16, ("cond", "uncond"), batch_dim=None), [rec], timestep_arg="t").attach(high, low) as h:
        h.new_sample()
        run(high, low)
    return rec.lut()


def test_one_hook_numbers_both_experts_and_detaches_both():
    high, low = Expert(0), Expert(1)
    steps_seen = []

    class Spy(CalibrationRecorder):
        def on_after_call(self, hook, call, output):
            steps_seen.append((call.step, call.streams))
            super().on_after_call(hook, call, output)

    rec = Spy(identity={"expert_boundary": BOUNDARY})
    hook = DenoiserHook(LoopSpec(16, ("cond", "uncond"), batch_dim=None), [rec], timestep_arg="t")
    with hook.attach(high, low):
        assert "forward" in vars(high) and "forward" in vars(low)
        hook.new_sample()
        run(high, low)
    assert "forward" not in vars(high) and "forward" not in vars(low)  # both restored
    assert [s for s, _ in steps_seen] == [t for t in range(16) for _ in range(2)]
    lut = rec.lut()
    assert lut.num_prompts == 1 and lut.identity["expert_boundary"] == BOUNDARY
    first_low = int((TIMESTEPS < BOUNDARY).nonzero()[0])
    assert expert_guard(lut) == (first_low, first_low + 1) == switch_guard(lut.timesteps, BOUNDARY)
    with pytest.raises(ValueError, match="same module was given twice"):
        DenoiserHook(LoopSpec(16)).attach(high, high)


def test_plans_keep_the_first_two_steps_after_the_switch_computed():
    high, low = Expert(0), Expert(1)
    rec = CalibrationRecorder(identity={"expert_boundary": BOUNDARY})
    with DenoiserHook(LoopSpec(16, ("cond", "uncond"), batch_dim=None), [rec], timestep_arg="t").attach(high, low) as h:
        for _ in range(2):
            h.new_sample()
            run(high, low)
    lut = rec.lut()
    guard = expert_guard(lut)
    assert guard == (2, 3)  # timesteps 999, 934, 870, ...: the low-noise expert starts at step 2
    for rule in ("paper", "auto"):
        plan = make_plan(PlanConfig(budget=6, rule=rule, min_step=2, error_weights="uniform"), 16,
                         ("cond", "uncond"), lut, unskippable=guard)
        assert not set(plan.skipped_steps) & set(guard), (rule, plan.describe())
    with pytest.raises(PlanError, match=r"skips step\(s\) 2, 3, the first steps after the expert switch"):
        make_plan(PlanConfig(window=[2, 6]), 16, ("cond", "uncond"), lut, unskippable=guard)
    # TaoCache takes the boundary from the LUT and keeps the guard in its plan
    cache = TaoCache(config_from_dict({"plan": {"skip_steps": [3, 8]}}), lut=lut)
    with pytest.raises(PlanError, match="first steps after the expert switch"):
        cache.attach(high, 16, ("cond", "uncond"), batch_dim=None, timestep_arg="t", also=[low])


def test_the_first_two_steps_after_the_switch_are_computed_without_a_lut_and_at_another_shift(capsys):
    """Without a LUT the guard came from nothing and a manual plan skipped the low-noise expert's first steps; with
    a LUT of another shift (calibration.accept: [shift]) it came from the LUT's timesteps, not the run's (Wan2.2
    walkthrough, 2026-11-27). The calls' timesteps decide now: those steps compute, as "expert switch" fallbacks."""
    high, low = Expert(0), Expert(1)
    cache = TaoCache(config_from_dict({"plan": {"skip_steps": [2, 3, 4], "ratio": 1.0}}))
    with cache.attach(high, 16, ("cond", "uncond"), batch_dim=None, timestep_arg="t", also=[low],
                      expert_boundary=BOUNDARY):
        for _ in range(2):  # per generation
            cache.new_sample()
            run(high, low)  # timesteps 999, 934, 870 (low-noise from step 2)
    assert cache.callback.fallback_reasons == {"expert switch": 2 * 2 * 2}  # steps 2, 3 x 2 streams x 2 generations
    assert cache.stats()["streams"]["cond"] == {"computed": 30, "skipped": 2}  # step 4 only, per generation
    assert ("TaoCache computed step 2 instead of skipping it: it is one of the first two steps after the expert "
            "switch (step 2, the first below timestep 875)") in capsys.readouterr().err
    # a run whose switch comes later (another shift) than the LUT's: the LUT's guard (2, 3) is kept by the plan,
    # the run's switch (step 5) by its calls
    lut = calibrated(high, low)
    shifted = torch.cat([torch.linspace(999, 880, 5), torch.linspace(860, 30, 11)])
    cache = TaoCache(config_from_dict({"plan": {"skip_steps": [5, 6, 9], "ratio": 1.0}}), lut=lut)
    with cache.attach(high, 16, ("cond", "uncond"), batch_dim=None, timestep_arg="t", also=[low]):
        cache.new_sample()
        run(high, low, shifted)
    assert cache.callback.fallback_reasons == {"expert switch": 4}
    assert cache.stats()["streams"]["cond"]["skipped"] == 1


def test_the_runs_own_timesteps_place_the_guard_for_the_plan():
    """attach(run_timesteps=...): the plan guards the run's switch (step 5 here), not the LUT's (step 2)."""
    high, low = Expert(0), Expert(1)
    lut = calibrated(high, low)
    shifted = torch.cat([torch.linspace(999, 880, 5), torch.linspace(860, 30, 11)])
    assert expert_guard(lut) == (2, 3) and expert_guard(lut, timesteps=shifted.tolist()) == (5, 6)
    assert expert_guard(None, BOUNDARY, shifted.tolist()) == (5, 6)  # no LUT: the run's timesteps alone
    cache = TaoCache(config_from_dict({"plan": {"skip_steps": [5, 9], "ratio": 1.0}}), lut=lut)
    with pytest.raises(PlanError, match=r"skips step\(s\) 5, the first steps after the expert switch"):
        cache.attach(high, 16, ("cond", "uncond"), batch_dim=None, timestep_arg="t", also=[low],
                     run_timesteps=shifted.tolist())
    cache = TaoCache(config_from_dict({"plan": {"skip_steps": [2, 3, 9], "ratio": 1.0}}), lut=lut)
    with cache.attach(high, 16, ("cond", "uncond"), batch_dim=None, timestep_arg="t", also=[low],
                      run_timesteps=shifted.tolist()):
        cache.new_sample()
        run(high, low, shifted)
    assert cache.callback.fallback_reasons == {} and cache.stats()["streams"]["cond"]["skipped"] == 3
    with pytest.raises(ValueError, match="has 15 timesteps for 16 steps"):
        cache.attach(high, 16, ("cond", "uncond"), batch_dim=None, timestep_arg="t", also=[low],
                     run_timesteps=shifted.tolist()[:15])


def test_per_token_timesteps_read_as_their_largest_value():
    from taohooks.runtime.hook import _Timestep

    t = torch.full((1, 12), 870.0)
    t[0, :4] = 0.0  # the conditioning frame's tokens (Wan2.2 TI2V image-to-video)
    assert _Timestep(t).value() == 870.0
    assert _Timestep(torch.tensor([500, 500])).value() == 500.0


def test_nothing_is_kept_after_a_generation():
    """Offloading scripts move the experts off the GPU after the loop: TaoCache keeps no outputs then."""
    high, low = Expert(0), Expert(1)
    lut = calibrated(high, low)
    cache = TaoCache(config_from_dict({"plan": {"skip_steps": [10, 11]}}), lut=lut)
    with cache.attach(high, 16, ("cond", "uncond"), batch_dim=None, timestep_arg="t", also=[low]):
        cache.new_sample()
        run(high, low)
        assert cache.stats()["streams"]["cond"]["skipped"] == 2
        assert cache.callback._states == {}  # dropped when the generation's last call returned


def test_the_teacache_fit_file_keeps_each_pair_s_expert(tmp_path):
    """The fit file stored [x, y] only: teacache.calibrated fitted one polynomial over Wan2.2's two experts,
    where taocache compare fits one per expert (review, 2026-11-27)."""
    from taohooks.caches.teacache_fit import add_pairs, fitted_coefficients, load_pairs

    path = tmp_path / "lut.teacache.json"
    xs = [0.01 * (i + 1) for i in range(12)]
    proxy = {"kind": "test"}
    add_pairs(path, [(x, 2 * x) for x in xs] + [(x, 5 * x) for x in xs], 2, proxy, "t", experts=[0] * 12 + [1] * 12)
    fit = fitted_coefficients(path, proxy, "t")
    assert set(fit) == {0, 1}
    assert abs(sum(c * 0.1 ** (4 - i) for i, c in enumerate(fit[0])) - 0.2) < 1e-6
    assert abs(sum(c * 0.1 ** (4 - i) for i, c in enumerate(fit[1])) - 0.5) < 1e-6
    assert load_pairs(path)["pairs"][0] == [0.01, 0.02]  # expert 0's pairs as files before (readable by them)
    one = tmp_path / "one.teacache.json"
    add_pairs(one, [(x, 3 * x) for x in xs], 1, proxy, "t")
    assert isinstance(fitted_coefficients(one, proxy, "t"), list)  # one model: one polynomial
    import json
    old = tmp_path / "old.teacache.json"  # version 1: the pairs' experts unknown, a second expert's are refused
    old.write_text(json.dumps({"format": "taohooks-teacache-fit", "version": 1, "lut_created": "t", "proxy": proxy,
                               "generations": 1, "pairs": [[0.1, 0.2]]}))
    with pytest.raises(ValueError, match="before the fit file kept each pair's expert"):
        add_pairs(old, [(0.1, 0.5)], 1, proxy, "t", experts=[1])


def test_a_changed_expert_boundary_can_be_accepted_as_the_message_advises():
    """The mismatch advised calibration.accept: [expert_boundary], which the config refused as unknown (Wan2.2
    walkthrough, 2026-11-27)."""
    from taohooks.taocache.lut import LUTMismatchError

    high, low = Expert(0), Expert(1)
    lut = calibrated(high, low)
    attach = dict(steps=16, streams=("cond", "uncond"), batch_dim=None, timestep_arg="t", also=[low],
                  identity={"expert_boundary": 800.0})
    with pytest.raises(LUTMismatchError, match=r"calibration.accept: \[expert_boundary\]"):
        TaoCache(config_from_dict({"plan": {"skip_steps": [10]}}), lut=lut).attach(high, **attach)
    accepting = config_from_dict({"plan": {"skip_steps": [10]}, "calibration": {"accept": ["expert_boundary"]}})
    with TaoCache(accepting, lut=lut).attach(high, **attach):
        pass
