"""calibration.transfer: interpolate — a LUT carried to another step count.

Exact expected values: when every other step of a 13-step loop is a step of a 7-step loop, the
piecewise-linear trajectory passes through the 7-step outputs, so the carried LUT must equal a
native 7-step calibration (statistics and delta products); a straight-line trajectory carries to
any count exactly.
"""
import math

import pytest
import torch
from torch import nn

from taohooks import CalibrationRecorder, DenoiserHook, LoopSpec, TaoCache, config_from_dict
from taohooks.taocache.lut import LUTMismatchError
from taohooks.taocache.lut_transfer import transfer_lut, transfer_matrix


class CurveDenoiser(nn.Module):
    """Output ``e(u)`` for ``u = timestep / 1000``, a smooth curve per prompt, whatever the input."""

    def __init__(self, prompts: int = 3, seed: int = 0, straight: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("a", torch.randn(prompts, 2, 4, 4, generator=g))
        self.register_buffer("b", torch.randn(prompts, 2, 4, 4, generator=g))
        self.register_buffer("c", torch.randn(prompts, 2, 4, 4, generator=g))
        self.straight = straight

    def forward(self, x, timestep, stream="main"):
        u = float(timestep.reshape(-1)[0]) / 1000.0
        if self.straight:
            return self.a + u * self.b
        return self.a + math.sin(3 * u) * self.b + u ** 2 * self.c * (2 if stream == "uncond" else 1)


def calibrate(model, steps, streams=("main",)):
    rec = CalibrationRecorder(error_horizon=16)
    with DenoiserHook(LoopSpec(steps, tuple(streams)), [rec]).attach(model) as hook:
        hook.new_sample()
        for t in range(steps):
            for s in streams:
                model(torch.zeros(1), timestep=torch.tensor([1000.0 * t / (steps - 1)]), stream=s)
    return rec.lut()


def close(a, b, tol=1e-9):
    return a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and \
        torch.allclose(a.nan_to_num(), b.nan_to_num(), rtol=tol, atol=tol)


def test_transfer_matrix_rows_sum_the_fine_deltas():
    c = transfer_matrix(13, 7)
    assert torch.equal(c[1, :4], torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(c.sum(0)[1:], torch.ones(12, dtype=torch.float64))  # every fine delta used once
    c = transfer_matrix(5, 9)  # finer: half deltas
    assert torch.allclose(c[1:3, 1], torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_coinciding_steps_carry_exactly():
    streams = ("cond", "uncond")
    model = CurveDenoiser()
    fine, native = calibrate(model, 13, streams), calibrate(model, 7, streams)
    carried = transfer_lut(fine, 7)
    assert carried.steps == 7 and carried.num_prompts == native.num_prompts
    for name in ("cos_mean", "cos_std", "ratio_mean", "ratio_std"):
        assert close(getattr(carried, name), getattr(native, name), 1e-6), name
    h = carried.deltas.horizon
    assert h >= 3 and close(carried.deltas.gram, native.deltas.gram[..., :h + 1], 1e-6)
    assert close(carried.timesteps, native.timesteps, 1e-9)


@pytest.mark.parametrize("new", [4, 9, 30])
def test_a_straight_trajectory_carries_to_any_count(new):
    lut = transfer_lut(calibrate(CurveDenoiser(straight=True), 13), new)
    assert torch.allclose(lut.ratio_mean[0, 2:], torch.ones(new - 2, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(lut.cos_mean[0, 2:], torch.ones(new - 2, dtype=torch.float64), atol=1e-9)
    b2 = (CurveDenoiser(straight=True).b.flatten(1).double() ** 2).sum(1)  # ||b||^2 per prompt
    assert torch.allclose(lut.deltas.gram[:, 0, 1, 0], b2 / (new - 1) ** 2, rtol=1e-6)


def test_a_lut_without_products_cannot_be_carried():
    rec = CalibrationRecorder(error_horizon=0)
    model = CurveDenoiser()
    with DenoiserHook(LoopSpec(9, ("main",)), [rec]).attach(model) as hook:
        hook.new_sample()
        for t in range(9):
            model(torch.zeros(1), timestep=torch.tensor([1000.0 * t / 8]))
    with pytest.raises(LUTMismatchError, match="has 9 steps and no delta products .* calibrate for 5 steps"):
        transfer_lut(rec.lut(), 5)


def test_a_count_whose_deltas_need_products_beyond_the_horizon_is_refused():
    """50 -> 6 steps on a horizon of 16 (or 50 -> 30 on a horizon of 2) ended in an IndexError traceback, in a run,
    in taocache plan and in taocache check (transfer walkthrough, 2026-11-27)."""
    fine = calibrate(CurveDenoiser(), 50)
    assert transfer_lut(fine, 7).deltas.horizon == 1  # two consecutive 7-step deltas: 16 steps apart at most
    with pytest.raises(LUTMismatchError, match=r"cannot carry LUT to 6 steps: each new step spans 9.8 calibrated "
                                               r"steps, so two consecutive ones need products of deltas up to 20 steps "
                                               r"apart, and the LUT holds them up to 16 \(calibration.error_horizon\); "
                                               r"calibrate at 6 steps, or with calibration.error_horizon: 20 or more"):
        transfer_lut(fine, 6)


def test_taocache_carries_the_lut_only_when_asked(capsys):
    model = CurveDenoiser()
    lut = calibrate(model, 13)
    with pytest.raises(LUTMismatchError, match="has 13 steps, this run has 7"):
        TaoCache(config_from_dict({"plan": {"budget": 2}}), lut=lut).attach(model, steps=7)
    cache = TaoCache(config_from_dict({"plan": {"budget": 2, "min_step": 2},
                                       "calibration": {"transfer": "interpolate"}}), lut=lut)
    with cache.attach(model, steps=7):
        pass
    assert len(cache.plan.skipped_steps) == 2
    assert "has 13 steps, this run 7: its statistics are carried over by interpolation" in capsys.readouterr().err


def test_a_carried_lut_is_one_of_the_runs_steps_not_one_that_records_none(tmp_path, capsys):
    """The carried copy dropped the LUT's sampling_steps, and the run said the LUT "records no sampling_steps of its
    calibrating run ... calibrate a LUT of this run", against the transfer it was told to use (Latte walkthrough,
    2026-11-28)."""
    import dataclasses

    from taohooks.taocache.lut import CalibrationLUT

    model = CurveDenoiser()
    dataclasses.replace(calibrate(model, 13), identity={"sampling_steps": 13}).save(tmp_path / "lut.safetensors")
    cache = TaoCache(config_from_dict({"plan": {"budget": 2, "min_step": 2},
                                       "calibration": {"transfer": "interpolate"}}),
                     lut=CalibrationLUT.load(tmp_path / "lut.safetensors"))
    with cache.attach(model, steps=7, identity={"sampling_steps": 7}):
        pass
    err = capsys.readouterr().err
    assert "carried over by interpolation" in err and "records no" not in err, err
    from taohooks.taocache.cache import lut_for_steps

    assert lut_for_steps(cache.config, cache.lut, 7).identity["sampling_steps"] == 7
    # a sampler of two calls per step (13 calls of 7 steps): its count for 7 calls is not known, so none is kept
    # (it became 7, and a run of 4 steps was refused: review19)
    two = dataclasses.replace(cache.lut, identity={"sampling_steps": 7})
    assert "sampling_steps" not in lut_for_steps(cache.config, two, 7).identity


def test_an_unfinished_lut_is_not_carried_over_and_says_why(tmp_path, capsys):
    """A LUT holding 2 of 3 prompts at 12 steps, calibration.transfer: interpolate, a run at 16 steps: `taocache check`
    said valid, the run refused advising the transfer: interpolate the config already set (walkthrough, 2026-11-27)."""
    from test_calibration import calibrate
    from trajectories import GeometricDenoiser

    from taohooks import cli

    model = GeometricDenoiser({"cond": 0.9})
    path = calibrate(model, 12, ("cond",), samples=2, model_id="geo").save(tmp_path / "lut.safetensors")
    text = (f"model_id: geo\nlut: {path}\nloop: {{steps: 16, streams: [cond]}}\n"
            "calibration: {prompts: 3, transfer: interpolate}\nplan: {budget: 2}\n")
    (tmp_path / "c.yaml").write_text(text)
    cache = TaoCache(config_from_dict(__import__("yaml").safe_load(text), str(tmp_path / "c.yaml")))
    with pytest.raises(LUTMismatchError, match=r"holds 2 of 3 prompts \(calibration.prompts\) at 12 steps, this run "
                                               r"has 16: calibration.transfer carries complete LUTs over"):
        cache.attach(model, steps=16, streams=("cond",))
    assert cli.main(["check", str(tmp_path / "c.yaml")]) == 1
    assert "set calibration.prompts: 2 to carry it over as it is" in capsys.readouterr().err
    # taocache plan CONFIG --steps 16 printed a carried plan for it (transfer walkthrough, 2026-11-27)
    assert cli.main(["plan", str(tmp_path / "c.yaml"), "--steps", "16"]) == 1
    assert "holds 2 of 3 prompts (calibration.prompts) at 12 steps, --steps is 16" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text(text.replace("prompts: 3", "prompts: 2"))  # as the message says: carried over
    assert cli.main(["check", str(tmp_path / "c.yaml")]) == 0
    # ... and its stdout says the plan is the carried LUT's (only stderr said it)
    assert f"# LUT {path} (carried from 12 to 16 steps): " in capsys.readouterr().out


def test_rule_auto_on_a_carried_lut_names_the_transfer_as_the_short_horizon_s_cause():
    """It advised a longer error_horizon, where the transfer had cut the calibrated 16 to 1 (transfer walkthrough,
    2026-11-27)."""
    from taohooks.taocache.cache import make_plan
    from taohooks.config import PlanConfig
    from taohooks.taocache.plan import PlanError

    carried = transfer_lut(calibrate(CurveDenoiser(), 50), 10)
    assert carried.deltas.horizon == 1
    with pytest.raises(PlanError, match=r"calibrate at 10 steps: LUT \(carried from 50 to 10 steps\) has this horizon "
                                        r"because its deltas were carried over to fewer, longer steps"):
        make_plan(PlanConfig(budget=3, rule="auto"), 10, ("main",), carried)


def test_a_lut_carried_to_more_steps_is_not_blamed_for_a_budget_that_does_not_fit():
    """The message blamed a transfer "to fewer, longer steps" for 50 -> 100, whose horizon grew (review)."""
    from taohooks.taocache.cache import make_plan
    from taohooks.config import PlanConfig
    from taohooks.taocache.plan import PlanError

    carried = transfer_lut(calibrate(CurveDenoiser(), 13), 30)
    with pytest.raises(PlanError) as info:
        make_plan(PlanConfig(budget=16, rule="auto"), 30, ("main",), carried)  # (15 steps from 15 on)
    assert "calibrate with a longer calibration.error_horizon" in str(info.value)
    assert "fewer, longer steps" not in str(info.value)


def test_a_carried_lut_with_a_prompt_that_moves_late_stays_readable(tmp_path):
    """A prompt whose outputs move only in the last steps has no value at any step of a 4-step carry: the carried
    LUT kept still_prompts 1 of 3 with 1 value per step, a file the loader refused (session of 2026-11-28)."""
    import torch

    from taohooks import CalibrationRecorder, DenoiserHook, LoopSpec
    from taohooks.taocache.lut import CalibrationLUT
    from taohooks.taocache.lut_transfer import transfer_lut
    from trajectories import GeometricDenoiser

    class Frozen(torch.nn.Module):
        def forward(self, x, timestep):
            return torch.zeros(1, 3, 4, 4)

    class Late(torch.nn.Module):  # moves from step 8 of 10 on
        def forward(self, x, timestep):
            t = float(timestep.reshape(-1)[0])
            return torch.full((1, 3, 4, 4), 0.9 ** t if t >= 8 else 1.0)

    rec = CalibrationRecorder(identity={})  # (three stand-in models, one LUT)
    for model in (Frozen(), GeometricDenoiser({"main": 0.9}), Late()):
        with DenoiserHook(LoopSpec(10), [rec]).attach(model) as hook:
            hook.new_sample()
            for t in range(10):
                hook.module(torch.zeros(1, 4), timestep=torch.tensor([float(t)]))
    carried = transfer_lut(rec.lut(), 4)
    lut = CalibrationLUT.load(carried.save(tmp_path / "carried.safetensors"))
    assert (lut.num_prompts, lut.still_prompts, int(lut.cos.count.max())) == (3, 2, 1)
