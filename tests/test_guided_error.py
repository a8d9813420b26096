"""The guided output's predicted error (``plan.guidance_scale``): products between the two streams' deltas.

Exact expected values, as in ``test_error_plan.py``: on a denoiser whose outputs do not depend on its input the
open-loop error model is exact, so the predicted error of the guided output ``u + s (c - u)`` must equal the
error the TaoCache hook really makes in it, whatever the schedule and the scale; the products between the streams
must be the inner products of the two streams' deltas; a brute-force search must agree with the planner.
"""
import math

import pytest
import torch
from torch import nn

from taohooks import DenoiserHook, LoopSpec
from taohooks.config import ConfigError, PlanConfig, config_from_dict
from taohooks.taocache.cache import make_plan
from taohooks.taocache.error_model import ErrorModel, Guidance, sampler_weights
from taohooks.taocache.error_plan import (PlannerOptions, brute_force, coefficient_table, error_model_of,
                                          plan_min_error, predict_plan)
from taohooks.taocache.extrapolation import TaoCacheCallback
from taohooks.taocache.lut import CalibrationLUT, LUTFormatError
from taohooks.taocache.plan import COMPUTE, REFRESH, SKIP, PlanError, SkipPlan
from test_error_plan import TableDenoiser, calibrate, sample

STREAMS = ("cond", "uncond")


def guided_mse(model, plan, lut, steps, streams, weights, prompts, scale) -> float:
    """Mean squared error per element of ``uncond + scale (cond - uncond)`` summed over the steps, cached
    against full."""
    ref = sample(model, steps, streams, weights, prompts)
    with DenoiserHook(LoopSpec(steps, tuple(streams)), [TaoCacheCallback(plan, lut.timesteps,
                                                                         max_norm_ratio=None)]).attach(model) as hook:
        hook.new_sample()
        got = sample(model, steps, streams, weights, prompts)
    err = scale * (got["cond"] - ref["cond"]) + (1 - scale) * (got["uncond"] - ref["uncond"])
    return float(err.square().flatten(1).mean(1).mean())


def plan_of(actions: str, lut, streams, rule: str = "ratio") -> SkipPlan:
    acts = tuple({"c": COMPUTE, "s": SKIP, "r": REFRESH}[a] for a in actions)
    table = coefficient_table(rule, lut.cos_mean, lut.ratio_mean)
    ratios = {s: tuple(float(table[i, t]) if a == SKIP else None for t, a in enumerate(acts))
              for i, s in enumerate(streams)}
    return SkipPlan(len(acts), tuple(streams), acts, ratios)


# ---------------------------------------------------------------- recorded products
@pytest.mark.parametrize("streams", [STREAMS, ("uncond", "cond")])
def test_cross_products_are_the_inner_products_between_the_streams(streams):
    steps, prompts, h = 10, 3, 3
    model = TableDenoiser(steps, prompts, streams)
    lut = calibrate(model, steps, streams, prompts, horizon=h)
    cross = lut.deltas.cross
    assert cross.shape == (prompts, steps, 2 * h + 1) and lut.deltas.cross_prompts.all()
    d = [model.table[k].flatten(2).to(torch.float64).diff(dim=0) for k in range(2)]  # D_1.. [steps - 1, p, n]
    for i in range(steps):
        for j in range(-h, h + 1):
            k = i - j  # <D^0_i, D^1_k>: the LUT's first stream's delta at i, its second's at k
            if i >= 1 and 1 <= k < steps:
                want = (d[0][i - 1] * d[1][k - 1]).sum(-1)
                assert torch.allclose(cross[:, i, h + j], want, rtol=1e-5, atol=1e-7), (i, j)
            else:
                assert cross[:, i, h + j].isnan().all(), (i, j)


def test_batched_and_two_call_loops_record_the_same_cross_products():
    from test_calibration import calibrate as calibrate_loop
    from trajectories import GeometricDenoiser

    model = GeometricDenoiser({"uncond": -0.7, "cond": 0.9}, shape=(2, 4, 4))
    two_call = calibrate_loop(model, 12, ("uncond", "cond"), batch=2, split_batch=False)
    batched = calibrate_loop(model, 12, ("uncond", "cond"), batch=2, split_batch=True)
    a, b = two_call.deltas.cross, batched.deltas.cross
    assert a is not None and torch.equal(a.isnan(), b.isnan())
    assert torch.allclose(a.nan_to_num(), b.nan_to_num(), rtol=1e-6, atol=1e-9)


def test_one_stream_records_no_cross_products():
    lut = calibrate(TableDenoiser(8, 2), 8, ("main",), 2, horizon=3)
    assert lut.deltas.cross is None and not lut.deltas.cross_prompts.any()
    with pytest.raises(PlanError, match="weighs the streams 'cond' and 'uncond', and the LUT has 'main'"):
        error_model_of(lut, "uniform", 5.0)


# ---------------------------------------------------------------- the guided error is predicted exactly
@pytest.mark.parametrize("actions", ["ccccccsccccc", "cccccssscccc", "ccccsrssrscc", "ccsccsccsccs"])
@pytest.mark.parametrize("scale", [1.0, 2.5, 7.0])
@pytest.mark.parametrize("streams", [STREAMS, ("uncond", "cond")])
def test_guided_prediction_equals_the_hooks_guided_error(actions, scale, streams):
    steps, prompts = 12, 3
    model = TableDenoiser(steps, prompts, streams, seed=3)
    lut = calibrate(model, steps, streams, prompts)
    plan = plan_of(actions, lut, streams)
    weights = torch.linspace(0.3, 1.0, steps, dtype=torch.float64)
    predicted = predict_plan(plan, ErrorModel(lut.deltas, weights, Guidance.of(streams, scale)))
    measured = guided_mse(model, plan, lut, steps, streams, weights, prompts, scale)
    assert measured > 0
    assert math.isclose(predicted.mse, measured, rel_tol=1e-4), (predicted.mse, measured)


def test_a_scale_per_step_is_predicted_exactly():
    """Wan2.2's two experts guide at two scales: the error of ``sum_t w_t (u_t + s_t (c_t - u_t))``."""
    steps, prompts = 12, 3
    model = TableDenoiser(steps, prompts, STREAMS, seed=4)
    lut = calibrate(model, steps, STREAMS, prompts)
    scales = tuple([4.0] * 6 + [3.0] * 6)
    weights = torch.linspace(0.3, 1.0, steps, dtype=torch.float64)

    def guided_sum():
        total = 0.0
        for t in range(steps):
            c, u = (model(None, timestep=torch.tensor([float(t)]), stream=s).to(torch.float64) for s in STREAMS)
            total = total + float(weights[t]) * (u + scales[t] * (c - u))
        return total

    for actions in ("cccccssscccc", "ccccsrssrscc"):
        plan = plan_of(actions, lut, STREAMS)
        ref = guided_sum()
        with DenoiserHook(LoopSpec(steps, STREAMS), [TaoCacheCallback(plan, lut.timesteps,
                                                                      max_norm_ratio=None)]).attach(model) as hook:
            hook.new_sample()
            got = guided_sum()
        measured = float((got - ref).square().flatten(1).mean(1).mean())
        predicted = predict_plan(plan, ErrorModel(lut.deltas, weights, Guidance.of(STREAMS, scales)))
        assert math.isclose(predicted.mse, measured, rel_tol=1e-4), (actions, predicted.mse, measured)
    with pytest.raises(ValueError, match="needs 12 values, got 2"):
        ErrorModel(lut.deltas, weights, Guidance.of(STREAMS, (4.0, 3.0)))


def test_guided_error_differs_from_the_streams_average_where_their_errors_differ():
    """The unguided prediction (each stream's error, averaged) is not the guided output's error: at scale 5 the
    guided error of these tables is several times it (so the old prediction was optimistic)."""
    steps, prompts = 12, 3
    model = TableDenoiser(steps, prompts, STREAMS, seed=3)
    lut = calibrate(model, steps, STREAMS, prompts)
    plan = plan_of("cccccssscccc", lut, STREAMS)
    weights = torch.ones(steps, dtype=torch.float64)
    plain = predict_plan(plan, ErrorModel(lut.deltas, weights)).mse
    guided = predict_plan(plan, ErrorModel(lut.deltas, weights, Guidance.of(STREAMS, 5.0))).mse
    assert guided > 3 * plain


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("options", [PlannerOptions(min_step=2), PlannerOptions(min_step=4, pattern="strided"),
                                     PlannerOptions(min_step=2, pattern="contiguous")])
def test_guided_planner_agrees_with_brute_force(seed, options):
    steps, prompts = 12, 3
    lut = calibrate(TableDenoiser(steps, prompts, STREAMS, seed=seed), steps, STREAMS, prompts)
    model = ErrorModel(lut.deltas, sampler_weights(torch.linspace(999, 100, steps), "flow"), Guidance.of(STREAMS, 5.0))
    chosen = plan_min_error(lut, model, 3, STREAMS, options)
    best, skips = brute_force(lut, model, 3, STREAMS, options)
    assert math.isclose(chosen.objective, best, rel_tol=1e-9), (chosen.describe(), best, skips)
    assert chosen.plan.skipped_steps == skips


class SharedThenApart(nn.Module):
    """Both streams follow one smooth random walk, but ``uncond`` has a kink (an extra jump) at ``kink``: there
    each stream's own error is small, since both streams' deltas stay smooth but for one step, while their guided
    combination amplifies the difference ``s (e_c - e_u)``."""

    def __init__(self, steps: int, prompts: int, kink: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(steps, prompts, 2, 4, 4, generator=g).cumsum(0) * 0.1
        base = base + torch.linspace(0, 1, steps).view(steps, 1, 1, 1, 1) * torch.randn(1, prompts, 2, 4, 4,
                                                                                         generator=g)
        bump = torch.zeros(steps, 1, 1, 1, 1)
        bump[kink:] = 1.0
        uncond = base + 0.3 * bump * torch.randn(1, prompts, 2, 4, 4, generator=g)
        self.register_buffer("table", torch.stack([base, uncond]))

    def forward(self, x, timestep, stream: str = "cond"):
        return self.table[STREAMS.index(stream), int(float(timestep.reshape(-1)[0]))].clone()


def test_guided_planning_chooses_a_schedule_of_less_guided_error():
    steps, prompts, scale = 16, 2, 5.0
    model = SharedThenApart(steps, prompts, kink=10)
    lut = calibrate(model, steps, STREAMS, prompts)
    weights = torch.ones(steps, dtype=torch.float64)
    plain = plan_min_error(lut, ErrorModel(lut.deltas, weights), 3, STREAMS, PlannerOptions(min_step=4)).plan
    guided = plan_min_error(lut, ErrorModel(lut.deltas, weights, Guidance.of(STREAMS, scale)), 3, STREAMS,
                            PlannerOptions(min_step=4)).plan
    assert plain.skipped_steps != guided.skipped_steps
    measured = [guided_mse(model, p, lut, steps, STREAMS, weights, prompts, scale) for p in (plain, guided)]
    assert measured[1] < 0.5 * measured[0], measured


# ---------------------------------------------------------------- the LUT file, merge, transfer
def test_cross_products_survive_the_file_and_merge_by_prompts(tmp_path):
    a = calibrate(TableDenoiser(8, 2, STREAMS), 8, STREAMS, 2, horizon=4)
    b = calibrate(TableDenoiser(8, 3, STREAMS, seed=1), 8, STREAMS, 3, horizon=2)
    a.save(tmp_path / "a.safetensors")
    back = CalibrationLUT.load(tmp_path / "a.safetensors")
    assert torch.equal(back.deltas.cross.nan_to_num(7.0), a.deltas.cross.nan_to_num(7.0))
    merged = b.merge(a)
    assert merged.deltas.cross.shape == (5, 8, 5)  # the common horizon 2: lags -2..2
    assert torch.equal(merged.deltas.cross[3:].nan_to_num(7.0), a.deltas.cross[:, :, 2:7].nan_to_num(7.0))


def test_a_lut_partly_without_cross_products_plans_guided_from_the_others(tmp_path, capsys):
    """Prompts of an earlier taohooks (no cross products) merged with new ones: kept as NaN rows; the guided model
    uses the others and says so; a LUT with none is refused naming the key."""
    steps = 12
    new = calibrate(TableDenoiser(steps, 2, STREAMS), steps, STREAMS, 2)
    old = calibrate(TableDenoiser(steps, 3, STREAMS, seed=1), steps, STREAMS, 3)
    old = CalibrationLUT(**{**old.__dict__, "deltas": type(old.deltas)(old.deltas.gram, old.deltas.numel)})
    old.save(tmp_path / "old.safetensors")
    old = CalibrationLUT.load(tmp_path / "old.safetensors")
    assert old.deltas.cross is None
    with pytest.raises(PlanError, match=r"plan\.guidance_scale 5 with LUT .*old\.safetensors: the LUT records no "
                                        r"products between its two streams"):
        error_model_of(old, "uniform", 5.0)
    merged = old.merge(new)
    assert merged.deltas.cross_prompts.tolist() == [False, False, False, True, True]
    model, _ = error_model_of(merged, "uniform", 5.0)
    assert model.prompts_used == 2 and "2 of the 5 prompts" in capsys.readouterr().err
    alone, _ = error_model_of(new, "uniform", 5.0)
    assert torch.equal(model.terms.nan_to_num(7.0), alone.terms.nan_to_num(7.0))


class LinearDenoiser(nn.Module):
    """Outputs linear in the loop position ``u = t / (steps - 1)``: ``a + u b`` per prompt and stream, so a LUT
    carried to another step count (piecewise linear in ``u``) is exactly the LUT calibrated there."""

    def __init__(self, steps: int, prompts: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        a, b = torch.randn(2, 1, prompts, 3, 4, generator=g), torch.randn(2, 1, prompts, 3, 4, generator=g)
        u = torch.linspace(0, 1, steps).view(1, steps, 1, 1, 1)
        self.register_buffer("table", a + u * b)  # [streams, steps, prompts, 3, 4]

    def forward(self, x, timestep, stream: str = "cond"):
        return self.table[STREAMS.index(stream), int(float(timestep.reshape(-1)[0]))].clone()


def test_transfer_carries_the_cross_products_exactly_on_a_linear_trajectory():
    from taohooks.taocache.lut_transfer import transfer_lut

    fine = calibrate(LinearDenoiser(13, 2), 13, STREAMS, 2, horizon=6)
    coarse = calibrate(LinearDenoiser(7, 2), 7, STREAMS, 2, horizon=6)
    carried = transfer_lut(fine, 7)
    h = carried.deltas.horizon
    want = coarse.deltas.cross[..., 6 - h:6 + h + 1]
    got = carried.deltas.cross
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.allclose(got.nan_to_num(), want.nan_to_num(), rtol=1e-5, atol=1e-6)
    assert transfer_lut(fine, 13) is fine


def test_corrupt_cross_products_are_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    lut = calibrate(TableDenoiser(8, 2, STREAMS), 8, STREAMS, 2, horizon=2)
    path = tmp_path / "l.safetensors"
    lut.save(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["delta_cross"][1, 5, 3] = 1e9  # beyond Cauchy-Schwarz: <D^cond_5, D^uncond_4>
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(LUTFormatError, match="delta_cross at prompt 1, step 5 of stream 'cond' and 4 of 'uncond'"):
        CalibrationLUT.load(path)
    tensors["delta_cross"] = tensors["delta_cross"][:, :, :3].contiguous()
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(LUTFormatError, match=r"delta_cross has shape \[2, 8, 3\]; expected \[2 prompts"):
        CalibrationLUT.load(path)


# ---------------------------------------------------------------- configuration and the command line
@pytest.mark.parametrize("plan, said", [
    ({"rule": "auto", "guidance_scale": -1}, "expected the classifier-free guidance scale"),
    ({"rule": "auto", "guidance_scale": float("nan")}, "expected a finite number"),
    ({"rule": "auto", "guidance_scale": "5"}, ""),
])
def test_guidance_scale_is_checked(plan, said):
    with pytest.raises(ConfigError, match=r"plan\.guidance_scale.*" + said):
        config_from_dict({"plan": plan})


def test_rule_paper_takes_the_scale_and_plans_as_without_it():
    """The scale is a fact of the run (the script's), not a knob of rule auto: rule paper's plan stays Algorithm 1's
    window, bit for bit; only predicted errors are of the guided output."""
    steps, prompts = 16, 2
    lut = calibrate(SharedThenApart(steps, prompts, kink=10), steps, STREAMS, prompts)
    config = config_from_dict({"plan": {"budget": 3, "guidance_scale": 5.0}})
    assert make_plan(config.plan, steps, STREAMS, lut) == make_plan(PlanConfig(budget=3), steps, STREAMS, lut)


def test_make_plan_and_the_cli_plan_with_a_guidance_scale(tmp_path, capsys):
    from taohooks.cli import main

    steps, prompts = 16, 2
    model = SharedThenApart(steps, prompts, kink=10)
    lut = calibrate(model, steps, STREAMS, prompts)
    config = config_from_dict({"plan": {"budget": 3, "rule": "auto", "guidance_scale": 5, "min_step": 4,
                                        "error_weights": "uniform"}})
    assert config.plan.guidance_scale == 5.0
    guided = make_plan(config.plan, steps, STREAMS, lut)
    chosen = plan_min_error(lut, ErrorModel(lut.deltas, torch.ones(steps, dtype=torch.float64),
                                            Guidance.of(STREAMS, 5.0)), 3, STREAMS, PlannerOptions(min_step=4))
    assert guided.skipped_steps == chosen.plan.skipped_steps
    lut.save(tmp_path / "l.safetensors")
    assert main(["plan", str(tmp_path / "l.safetensors"), "--budget", "3", "--rule", "auto", "--min-step", "4",
                 "--error-weights", "uniform", "--guidance-scale", "5"]) == 0
    out = capsys.readouterr().out
    assert f"steps {','.join(map(str, chosen.plan.skipped_steps))}," in out
    assert f"of the guided output at scale 5): predicted PSNR {chosen.predicted.psnr:.1f} dB" in out


def test_review_findings_on_the_guided_error(tmp_path, capsys):
    """A review (2026-11-29): a per-step scale of the wrong length raised a TypeError formatting it; streams of two
    output sizes were said to lack the products (not that no guided output combines them); a LUT with a still prompt
    said some prompts lacked them; an empty DeltaGram of a longer horizon merged into a band too narrow."""
    from taohooks.taocache.delta_gram import DeltaGram

    steps = 12
    lut = calibrate(TableDenoiser(steps, 2, STREAMS), steps, STREAMS, 2, horizon=3)
    with pytest.raises(PlanError, match=r"plan\.guidance_scale \(5 values\) with the LUT: a guidance scale per step "
                                        r"needs 12 values, got 5"):
        error_model_of(lut, "uniform", (5.0,) * 5)
    merged = DeltaGram.empty(2, steps, 5).merge(lut.deltas)
    assert merged.cross.shape == (2, steps, 7) and merged.cross_dense().shape == (2, steps, steps)

    class TwoSizes(nn.Module):
        def forward(self, x, timestep, stream="cond"):
            t = float(timestep.reshape(-1)[0])
            return torch.full((2, 3 if stream == "cond" else 4), t * t)

    from taohooks import CalibrationRecorder

    rec = CalibrationRecorder(identity={})
    with DenoiserHook(LoopSpec(8, STREAMS), [rec]).attach(TwoSizes()) as hook:
        hook.new_sample()
        for t in range(8):
            for s in STREAMS:
                hook.module(None, timestep=torch.tensor([float(t)]), stream=s)
    sizes = rec.lut()
    with pytest.raises(PlanError, match="outputs of 3 and 4 elements: no guided output combines them"):
        error_model_of(sizes, "uniform", 5.0)

    still_model = TableDenoiser(steps, 1, STREAMS)
    still_model.table.zero_()  # (outputs that never move: a still prompt)
    still = calibrate(still_model, steps, STREAMS, 1, horizon=3)
    both = lut.merge(still)
    assert both.still_prompts == 1
    capsys.readouterr()
    model, _ = error_model_of(both, "uniform", 5.0)
    assert model.prompts_used == model.prompts_moving == 2 and "have products between" not in capsys.readouterr().err


def test_cli_plan_refuses_a_guidance_scale_its_lut_cannot_weigh_before_printing(tmp_path, capsys):
    """Rule paper printed its whole plan on stdout, then failed (exit 1) on a LUT without the products between the
    streams; on a LUT without delta products the scale was ignored without a word (review, 2026-11-29)."""
    from taohooks.cli import main

    steps = 12
    one = calibrate(TableDenoiser(steps, 2), steps, ("main",), 2)
    one.save(tmp_path / "one.safetensors")
    assert main(["plan", str(tmp_path / "one.safetensors"), "--budget", "2", "--guidance-scale", "5"]) == 1
    out = capsys.readouterr()
    assert out.out == "" and "weighs the streams 'cond' and 'uncond', and the LUT has 'main'" in out.err
    bare = calibrate(TableDenoiser(steps, 2, STREAMS), steps, STREAMS, 2, horizon=0)
    bare.save(tmp_path / "bare.safetensors")
    assert main(["plan", str(tmp_path / "bare.safetensors"), "--budget", "2", "--guidance-scale", "5"]) == 0
    assert "# plan.guidance_scale: no predicted error to weigh (the LUT holds no delta products)" in \
        capsys.readouterr().out
