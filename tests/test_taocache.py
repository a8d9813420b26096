"""TaoCache end to end on analytic trajectories, where the extrapolation is exact."""
import warnings

import pytest
import torch
from torch import nn

import taohooks
from taohooks import TaoCache, config_from_dict
from test_calibration import calibrate
from trajectories import GeometricDenoiser, run_loop

STEPS = 16


def cache_for(model, streams, plan, split_batch=False, batch=1, lut=True):
    table = calibrate(model, STEPS, streams, batch=batch, split_batch=split_batch) if lut else None
    return TaoCache(config_from_dict({"plan": plan}), lut=table)


def max_error(ref, out):
    return max((a - b).abs().max().item() for s in ref for a, b in zip(ref[s], out[s]))


@pytest.mark.parametrize("refresh", [None, 2])
def test_predictions_are_exact_on_geometric_deltas(refresh):
    model = GeometricDenoiser({"cond": 0.9, "uncond": 0.75}, shape=(4, 8, 8))
    streams = ("cond", "uncond")
    cache = cache_for(model, streams, {"budget": 6, "refresh_every": refresh})
    ref = run_loop(model, STEPS, streams, batch=2)
    model.calls = 0
    with cache.attach(model, steps=STEPS, streams=streams):
        out = run_loop(model, STEPS, streams, batch=2)
    plan = cache.plan
    assert len(plan.skipped_steps) == 6 and plan.source == "max-cos"
    assert plan.refresh_steps == ((plan.window[0] + 2, plan.window[0] + 5) if refresh else ())
    assert model.calls == 2 * (STEPS - 6)
    assert max_error(ref, out) < 1e-5
    assert cache.stats()["streams"] == {"cond": {"computed": 10, "skipped": 6},
                                        "uncond": {"computed": 10, "skipped": 6}}


def test_batched_cfg_predictions_are_exact_per_half():
    model = GeometricDenoiser({"uncond": 0.6, "cond": 0.95})
    streams = ("uncond", "cond")
    cache = cache_for(model, streams, {"budget": 5}, split_batch=True, batch=2)
    ref = run_loop(model, STEPS, streams, batch=2, split_batch=True)
    with cache.attach(model, steps=STEPS, streams=streams, split_batch=True):
        out = run_loop(model, STEPS, streams, batch=2, split_batch=True)
    assert cache.plan.ratio("uncond", cache.plan.skipped_steps[0]) == pytest.approx(0.6, abs=1e-6)
    assert max_error(ref, out) < 1e-5


def test_wrong_ratio_is_not_exact():
    """The test above could fail: with the other stream's ratio the prediction is off."""
    model = GeometricDenoiser({"main": 0.9})
    ref = run_loop(model, STEPS, ("main",))
    cache = TaoCache(config_from_dict({"plan": {"window": [12, 15], "ratio": 0.7}}))
    with cache.attach(model, steps=STEPS):
        out = run_loop(model, STEPS, ("main",))
    assert max_error(ref, out) > 1e-3


class Linear(nn.Module):
    """eps_t = a + b * t: constant deltas, so ratio 1.0 (plain linear extrapolation) is exact."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.randn(2, 5), torch.randn(2, 5)

    def forward(self, x, timestep, stream="main"):
        return self.a + self.b * float(timestep)


def test_constant_ratio_needs_no_lut():
    model = Linear()
    cache = TaoCache(config_from_dict({"plan": {"skip_steps": [3, 4, 9], "ratio": 1.0}}))
    ref = run_loop(model, 12)
    with cache.attach(model, steps=12):
        out = run_loop(model, 12)
    assert max_error(ref, out) < 1e-5 and cache.hook.counts == {"main": [9, 3]}


def test_budget_zero_is_bit_identical_and_calls_everything():
    model = GeometricDenoiser({"main": 0.9})
    ref = run_loop(model, STEPS)
    cache = cache_for(model, ("main",), {"budget": 0})
    with cache.attach(model, steps=STEPS):
        out = run_loop(model, STEPS)
    assert all(torch.equal(a, b) for a, b in zip(ref["main"], out["main"]))
    assert cache.hook.counts == {"main": [STEPS, 0]} and "no skips" in cache.summary()


class Overflowing(GeometricDenoiser):
    """A geometric trajectory whose outputs at steps 8 and 9 hold an infinite element."""

    def forward(self, x, timestep, stream="main"):
        out = super().forward(x, timestep, stream)
        if float(timestep) in (8.0, 9.0):
            out = out.clone()
            out[0, 0, 0, 0] = float("inf")
        return out


def test_non_finite_prediction_falls_back_once_warned(capsys):
    model = Overflowing({"main": 0.9})
    cache = TaoCache(config_from_dict({"plan": {"window": [10, 13], "ratio": 0.9}}))
    ref = run_loop(model, STEPS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # as Wan's generate.py does: taohooks' messages still reach stderr
        with cache.attach(model, steps=STEPS):
            out = run_loop(model, STEPS)
    assert capsys.readouterr().err.count("not finite") == 1
    # step 10: inf - inf; step 11: delta against step 10 is -inf; from step 12 the history is finite
    assert cache.stats()["fallbacks"] == 2 and cache.hook.counts == {"main": [14, 2]}
    assert max((a - b).abs().max().item() for a, b in zip(ref["main"][10:], out["main"][10:])) < 1e-5
    assert "fallbacks" in cache.summary()


def test_timestep_mismatch_with_lut_warns(capsys):
    model = GeometricDenoiser({"main": 0.9})
    lut = calibrate(model, STEPS, ("main",))
    lut.timesteps += 100  # as if calibrated with another shift
    cache = TaoCache(config_from_dict({"plan": {"budget": 3}}), lut=lut)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        with cache.attach(model, steps=STEPS):
            run_loop(model, STEPS)
    assert "taohooks: warning: step " in capsys.readouterr().err


def test_auto_calibration_writes_the_lut_then_skips(tmp_path, capsys):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text("model_id: geo\nlut: luts/geo.safetensors\ncalibration: {prompts: 2}\n"
                        "loop: {steps: 16, streams: [cond, uncond]}\nplan: {budget: 4}\n")
    model = GeometricDenoiser({"cond": 0.9, "uncond": 0.8})
    cache = TaoCache.from_yaml(cfg_path)
    for prompt in range(2):
        with cache.attach(model):
            run_loop(model, STEPS, ("cond", "uncond"))
        assert f"taohooks: calibrating: LUT {tmp_path / 'luts' / 'geo.safetensors'} has {prompt} of 2 prompts" \
            in capsys.readouterr().err
        assert cache.calibrating and cache.hook.counts["cond"] == [STEPS, 0]
        lut = taohooks.CalibrationLUT.load(tmp_path / "luts" / "geo.safetensors")
        assert lut.num_prompts == prompt + 1 and lut.model_id == "geo"
    ref = run_loop(model, STEPS, ("cond", "uncond"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with cache.attach(model):
            out = run_loop(model, STEPS, ("cond", "uncond"))
    assert not cache.calibrating and cache.hook.counts["cond"] == [12, 4]
    assert max_error(ref, out) < 1e-5
    assert "4 of 16 steps skipped" in cache.summary() and "cond: 12 calls computed, 4 saved (25.0%)" in cache.summary()


def test_lut_for_another_run_is_refused():
    model = GeometricDenoiser({"main": 0.9})
    cache = TaoCache(config_from_dict({"plan": {"budget": 3}}), lut=calibrate(model, STEPS, ("main",)))
    with pytest.raises(taohooks.LUTMismatchError, match="has 16 steps, this run has 20"):
        cache.attach(model, steps=20)
    assert "forward" not in model.__dict__


def test_automatic_window_without_lut_is_a_clear_error():
    """A budget without a LUT is said first, whatever the ratio: the ratio's message sent a user who followed it
    ('set plan.ratio to a constant') to this one."""
    for plan in ({"budget": 3, "ratio": 1.0}, {"budget": 3}, {"budget": 3, "rule": "auto"}):
        with pytest.raises(taohooks.PlanError, match="plan.budget: choosing the (window|steps) from a budget needs a "
                                                     "calibration LUT, and none is loaded; calibrate one"):
            TaoCache(config_from_dict({"plan": plan})).attach(Linear(), steps=10)
    with pytest.raises(taohooks.PlanError, match="no calibration LUT is loaded"):
        TaoCache(config_from_dict({"plan": {"window": [6, 7]}})).attach(Linear(), steps=10)
    TaoCache(config_from_dict({"plan": {"window": [6, 7], "ratio": 1.0}})).attach(Linear(), steps=10).detach()


def test_several_generations_and_reattach():
    model = GeometricDenoiser({"main": 0.9})
    cache = cache_for(model, ("main",), {"budget": 4})
    ref = run_loop(model, STEPS)
    with cache.attach(model, steps=STEPS, repeat=True):
        outs = [run_loop(model, STEPS) for _ in range(3)]
    assert all(max_error(ref, o) < 1e-5 for o in outs) and cache.hook.counts == {"main": [36, 12]}
    with cache.attach(model, steps=STEPS) as hook:
        for _ in range(2):
            hook.new_sample()
            run_loop(model, STEPS)
    assert cache.hook.counts == {"main": [24, 8]}


@pytest.mark.parametrize("kind", ["flow", "eps"])
def test_budget_zero_is_the_testbed_model_itself_in_every_dtype(kind):
    """The README's "zero budget is the model itself (flow, eps, bf16, fp16)": the bundled models in both official
    loop shapes (two calls per step; one batched call), bit for bit (an audit found only the fixture scripts tested)."""
    from pathlib import Path

    from taohooks.testbed import data, sampling
    from taohooks.testbed.model import VideoDiT

    pairs = data.eval_pairs(1)
    prompts, seeds = [p for p, _ in pairs], [s for _, s in pairs]
    streams, split = (("cond", "uncond"), False) if kind == "flow" else (("uncond", "cond"), True)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = VideoDiT.from_pretrained(Path(sampling.__file__).parent / "weights" / f"{kind}.safetensors").to(dtype)
        reference = sampling.sample(model, prompts, seeds, steps=6)
        cache = TaoCache(config_from_dict({"plan": {"budget": 0}}))
        with cache.attach(model, steps=6, streams=streams, split_batch=split):
            out = sampling.sample(model, prompts, seeds, steps=6)
        assert out.dtype == reference.dtype and torch.equal(out, reference), dtype
