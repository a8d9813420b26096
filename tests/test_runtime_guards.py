"""Runtime guards: predictions checked where the sampler gets them, and generations kept in line."""
import pytest
import torch
from torch import nn

from taohooks import DenoiserHook, LoopSpec, TaoCacheCallback
from taohooks.taocache.plan import plan_from_steps, plan_from_window
from trajectories import GeometricDenoiser, run_loop

STEPS = 16
MAIN = ("main",)


class Ramp(nn.Module):
    """``eps_t = a + b * t`` in the model's dtype: constant deltas."""

    def __init__(self, a: float, b: float, dtype=torch.float16):
        super().__init__()
        self.a, self.b, self.dtype = a, b, dtype

    def forward(self, x, timestep, stream="main"):
        t = float(timestep.reshape(-1)[0])
        return (torch.full((2, 3), self.a) + self.b * t).to(self.dtype)


def hook_with(plan, **kw):
    cb = TaoCacheCallback(plan, kw.pop("expected_timesteps", None), **kw)
    return DenoiserHook(LoopSpec(plan.steps, plan.streams), [cb], repeat=True), cb


def test_prediction_beyond_float16_falls_back_with_its_reason(capsys):
    # steps 3, 4 give 52000, 56000; the ratio-3 prediction of step 5 is 68000: finite in float32,
    # inf in float16 (max 65504). The real step 5 is 60000.
    model = Ramp(40000.0, 4000.0)
    hook, cb = hook_with(plan_from_steps(8, MAIN, [5], 3.0))
    with hook.attach(model):
        out = run_loop(model, 8, dtype=torch.float16)["main"]
    assert cb.fallbacks == 1 and cb.fallback_reasons == {"not finite in float16": 1}
    assert hook.counts == {"main": [8, 0]}
    assert out[5].dtype == torch.float16 and torch.equal(out[5], torch.full((2, 3), 60000.0, dtype=torch.float16))
    assert capsys.readouterr().err == (
        "taohooks: warning: TaoCache computed step 5 instead of skipping it: the prediction is not finite in "
        "float16 (a fallback, counted in fallback_reasons; warned once per reason)\n")
    # a prediction that fits float16 is used: the check above is not "never skip in float16"
    model = Ramp(40000.0, 1000.0)
    hook, cb = hook_with(plan_from_steps(8, MAIN, [5], 1.0))
    with hook.attach(model):
        out = run_loop(model, 8, dtype=torch.float16)["main"]
    assert cb.fallbacks == 0 and hook.counts == {"main": [7, 1]}
    assert torch.equal(out[5], torch.full((2, 3), 45000.0, dtype=torch.float16))


def test_huge_but_finite_prediction_trips_the_norm_guard(capsys):
    model = GeometricDenoiser({"main": 0.9})
    ref = run_loop(model, STEPS)["main"]
    hook, cb = hook_with(plan_from_window(STEPS, MAIN, 12, 13, 1e6))  # as a bit-rotted LUT ratio
    with hook.attach(model):
        out = run_loop(model, STEPS)["main"]
    assert cb.fallbacks == 2 and cb.fallback_reasons == {"norm > 10 x last real output": 2}
    assert hook.counts == {"main": [STEPS, 0]} and all(torch.equal(a, b) for a, b in zip(ref, out))
    eps, previous = ref[11], ref[10]
    pred = eps + 1e6 * (eps - previous)
    norm, real = torch.linalg.vector_norm(pred).item(), torch.linalg.vector_norm(eps).item()
    assert capsys.readouterr().err == (
        f"taohooks: warning: TaoCache computed step 12 instead of skipping it: the prediction's norm {norm:.3g} "
        f"exceeds 10 x the norm of the last real output ({real:.3g}) of stream 'main' (a fallback, counted in "
        "fallback_reasons; warned once per reason)\n")


def test_norm_guard_ratio_is_an_argument():
    model = GeometricDenoiser({"main": 0.9})
    hook, cb = hook_with(plan_from_window(STEPS, MAIN, 12, 13, 1e6), max_norm_ratio=None)
    with hook.attach(model):
        run_loop(model, STEPS)
    assert cb.fallbacks == 0 and hook.counts == {"main": [14, 2]}
    for bad in (0.5, float("nan"), float("inf"), True, "10"):
        with pytest.raises(ValueError, match=f"max_norm_ratio must be a finite number >= 1 or None "
                                             rf"\(no norm guard\), got {bad!r}"):
            TaoCacheCallback(plan_from_window(STEPS, MAIN, 12, 13, 1.0), max_norm_ratio=bad)


def algorithm1(ref, plan, dtype):
    """Algorithm 1 written out on the real outputs: what TaoCache must return, bit for bit."""
    expected = {}
    for s, outs in ref.items():
        eps = delta = None
        expected[s] = []
        for t, real in enumerate(outs):
            if plan.is_skip(t):
                delta = plan.ratio(s, t) * delta
                eps = eps + delta
            else:
                new = real.float()
                delta = new - eps if eps is not None else None
                eps = new
            expected[s].append(eps.to(dtype))
    return expected


@pytest.mark.parametrize("split,dtype", [(False, torch.float32), (True, torch.float16)])
def test_normal_trajectory_has_no_fallback_and_is_algorithm1_bit_for_bit(split, dtype):
    streams = ("uncond", "cond") if split else ("cond", "uncond")
    model = GeometricDenoiser({"cond": 0.9, "uncond": 0.75}, shape=(4, 8, 8))
    ref = run_loop(model, STEPS, streams, batch=2, split_batch=split, dtype=dtype)
    ratios = torch.tensor([[0.9] * STEPS, [0.75] * STEPS]) if streams[0] == "cond" else \
        torch.tensor([[0.75] * STEPS, [0.9] * STEPS])
    plan = plan_from_window(STEPS, streams, 6, 14, ratios, refresh_every=3)
    cb = TaoCacheCallback(plan)
    with DenoiserHook(LoopSpec(STEPS, streams, split), [cb]).attach(model):
        out = run_loop(model, STEPS, streams, batch=2, split_batch=split, dtype=dtype)
    assert cb.fallbacks == 0 and cb.fallback_reasons == {}
    expected = algorithm1(ref, plan, dtype)
    assert all(torch.equal(a, b) for s in streams for a, b in zip(expected[s], out[s]))
    assert len(plan.skipped_steps) == 7 and out["cond"][8].dtype == dtype


def extra_call(model, t):
    return model(torch.zeros(1, 1), timestep=torch.tensor([float(t)]))


@pytest.mark.parametrize("steps", [1, STEPS])
def test_repeat_loops_that_keep_their_shape_have_no_stray_call(steps, capsys):
    """Every generation in line, also where every call runs at one timestep (a 1-step loop)."""
    streams = ("cond", "uncond")
    model = GeometricDenoiser({"cond": 0.9, "uncond": 0.8})
    with DenoiserHook(LoopSpec(steps, streams), [], repeat=True).attach(model) as hook:
        for _ in range(3):
            run_loop(model, steps, streams)
    assert hook.sample == 2 and hook.stray_calls == 0 and hook.misaligned_generations == 0
    assert hook.counts == {"cond": [3 * steps, 0], "uncond": [3 * steps, 0]} and capsys.readouterr().err == ""


def test_repeat_loop_with_one_call_too_many_runs_it_uncached_and_realigns(capsys):
    model = GeometricDenoiser({"main": 0.9})
    ref = run_loop(model, STEPS)["main"]
    hook, cb = hook_with(plan_from_window(STEPS, MAIN, 10, 13, 0.9))
    with hook.attach(model):
        first = run_loop(model, STEPS)["main"]
        stray = extra_call(model, 15)  # the loop made 17 calls
        later = [run_loop(model, STEPS)["main"] for _ in range(2)]  # right again
    err = capsys.readouterr().err
    assert err == (
        "taohooks: warning: generation 2 would begin at timestep 15 (its timestep at step 15), but generation 1 "
        "began at 0: the previous generation made more or fewer calls than declared (16 steps x 1 call(s) "
        "(main)). Calls run uncached until one begins at timestep 0\n"
        "taohooks: generation 2 begins at timestep 0: in line again after 1 uncached call(s)\n")
    assert torch.equal(stray, ref[15]) and hook.stray_calls == 1 and hook.misaligned_generations == 1
    assert hook.sample == 2 and hook.counts == {"main": [36, 12]} and cb.fallbacks == 0
    for outs in [first] + later:
        assert max((a - b).abs().max().item() for a, b in zip(ref, outs)) < 1e-5


def test_repeat_loop_with_one_call_too_few_computes_the_misaligned_generation():
    model = GeometricDenoiser({"main": 0.9})
    ref = run_loop(model, STEPS)["main"]
    hook, cb = hook_with(plan_from_window(STEPS, MAIN, 10, 13, 0.9))
    with hook.attach(model):
        run_loop(model, STEPS - 1)  # 15 calls: the next loop's first call completes generation 0
        model.calls = 0
        shifted = run_loop(model, STEPS)["main"]
        assert model.calls == STEPS  # every call of it ran the model
        aligned = run_loop(model, STEPS)["main"]
    assert hook.stray_calls == STEPS - 1 and hook.misaligned_generations == 1 and hook.sample == 1
    assert all(torch.equal(a, b) for a, b in zip(ref, shifted))
    assert max((a - b).abs().max().item() for a, b in zip(ref, aligned)) < 1e-5
    assert hook.counts == {"main": [12 + 12, 4 + 4]}


def test_two_calls_per_step_loop_one_call_short_is_caught_by_the_call_before(capsys):
    """The call that completes the short generation is the next one's first (same timestep): the
    next call runs at the start timestep too, which alone would look in line."""
    streams = ("cond", "uncond")
    model = GeometricDenoiser({"cond": 0.9, "uncond": 0.8})
    ref = run_loop(model, STEPS, streams)
    hook, cb = hook_with(plan_from_window(STEPS, streams, 10, 13, torch.tensor([[0.9] * STEPS, [0.8] * STEPS])))
    with hook.attach(model):
        run_loop(model, STEPS - 1, streams)
        model(torch.zeros(1, 1), timestep=torch.tensor([15.0]), stream="cond")  # no uncond call at step 15
        full = [run_loop(model, STEPS, streams) for _ in range(2)]
    assert capsys.readouterr().err == (  # found at the end of generation 0, whose last call began the next
        "taohooks: warning: call 31 of generation 1 runs at timestep 0 again, where the generation began: that one "
        "made 31 of the 32 declared calls (16 steps x 2 call(s) (cond, uncond)) and the next began there; nothing cached is "
        "reused until the loop is in line again\n"
        "taohooks: generation 2 begins at timestep 0: in line again after 31 uncached call(s)\n")
    assert hook.stray_calls == 2 * STEPS - 1 and hook.sample == 1 and cb.fallbacks == 0
    assert all(torch.equal(a, b) for s in streams for a, b in zip(ref[s], full[0][s]))  # computed
    assert max((a - b).abs().max().item() for s in streams for a, b in zip(ref[s], full[1][s])) < 1e-5
    assert hook.counts == {"cond": [12 + 12, 4 + 4], "uncond": [12 + 12, 4 + 4]}


def test_a_new_schedule_becomes_the_reference_after_a_generation_of_stray_calls(capsys):
    model = GeometricDenoiser({"main": 0.9})
    hook, _ = hook_with(plan_from_window(STEPS, MAIN, 10, 13, 0.9))
    with hook.attach(model):
        run_loop(model, STEPS)
        for _ in range(3):
            for t in range(STEPS):
                extra_call(model, 100 + t)
    assert capsys.readouterr().err.splitlines()[1] == (
        "taohooks: warning: no call began at timestep 0 in the 16 calls after generation 1; generation 2 "
        "begins at this call (timestep 100), and the generations after it must begin where it does")
    assert hook.stray_calls == STEPS and hook.sample == 2 and hook.misaligned_generations == 1


def test_generation_at_a_later_lut_timestep_computes_every_step(capsys):
    model = GeometricDenoiser({"main": 0.9})
    lut_timesteps = torch.arange(STEPS, dtype=torch.float32) - 2  # the loop's timesteps run 2 steps ahead
    plan = plan_from_window(STEPS, MAIN, 10, 13, 0.9)
    cb = TaoCacheCallback(plan, lut_timesteps)
    with DenoiserHook(LoopSpec(STEPS), [cb]).attach(model) as hook:
        hook.new_sample()
        run_loop(model, STEPS)
        assert hook.counts == {"main": [STEPS, 0]}
        hook.new_sample()
        for t in range(-2, STEPS - 2):
            extra_call(model, t)
    assert hook.counts == {"main": [STEPS + 12, 4]} and cb.misaligned_generations == 1 and cb.fallbacks == 0
    assert capsys.readouterr().err == (
        "taohooks: warning: generation 1 begins at timestep 0, the LUT's timestep at step 2, not at its first "
        "timestep -2: the loop is 2 step(s) out of line (the previous generation made more or fewer calls than "
        "declared (16 steps x 1 call(s) (main)), or this one runs another schedule); this generation computes every "
        "step\n")


def test_norm_guard_from_the_yaml_and_the_summary_names_the_reason():
    from taohooks import TaoCache, config_from_dict
    from taohooks.config import ConfigError

    model = GeometricDenoiser({"main": 0.9})
    cache = TaoCache(config_from_dict({"plan": {"window": [12, 13], "ratio": 1e6}}))
    with cache.attach(model, steps=STEPS):
        run_loop(model, STEPS)
    assert cache.stats()["fallback_reasons"] == {"norm > 10 x last real output": 2}
    assert "  fallbacks to a real call: 2 (norm > 10 x last real output: 2)" in cache.summary()
    off = TaoCache(config_from_dict({"plan": {"window": [12, 13], "ratio": 1e6, "max_norm_ratio": None}}))
    with off.attach(model, steps=STEPS):
        run_loop(model, STEPS)
    assert off.stats()["fallbacks"] == 0 and off.hook.counts == {"main": [14, 2]}
    with pytest.raises(ConfigError, match=r"plan.max_norm_ratio: expected a number >= 1 \(or null: no norm guard\)"):
        config_from_dict({"plan": {"max_norm_ratio": 0.5}})
