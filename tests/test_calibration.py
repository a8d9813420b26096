"""Calibration on analytic trajectories: exact ratios, separate streams, prompts per batch element."""
import math

import pytest
import torch

import taohooks
from taohooks import CalibrationRecorder, DenoiserHook, LoopSpec
from taohooks.taocache.calibration import delta_statistics
from trajectories import GeometricDenoiser, run_loop


def calibrate(model, steps, streams, batch=1, split_batch=False, samples=2, **kw):
    """A LUT of ``model`` recorded without an identity (unless ``identity=`` is given): the tests serve it to other
    stand-in models."""
    rec = CalibrationRecorder(**{"identity": {}, **kw})
    with DenoiserHook(LoopSpec(steps, tuple(streams), split_batch), [rec]).attach(model) as hook:
        for _ in range(samples):
            hook.new_sample()
            run_loop(model, steps, streams, batch=batch, split_batch=split_batch)
    return rec.lut()


def test_delta_statistics_exact_values():
    d_prev = [torch.tensor([[3.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0], [0.0]])]
    d = [torch.tensor([[3.0, 4.0], [0.0, 2.0]]), torch.tensor([[0.0], [0.0]])]
    cos, ratio = delta_statistics(d, d_prev)
    assert torch.allclose(cos, torch.tensor([0.6, 0.0])) and torch.allclose(ratio, torch.tensor([5 / 3, 2.0]))
    cos, ratio = delta_statistics(d, d_prev, batch_dim=None)  # the whole output is one prompt
    assert cos.shape == (1,) and math.isclose(ratio.item(), math.sqrt(29 / 10), rel_tol=1e-6)


def test_geometric_trajectory_recovers_ratio_and_unit_cosine():
    lut = calibrate(GeometricDenoiser({"main": 0.85}), steps=12, streams=("main",))
    assert torch.all(lut.cos.count[:, :2] == 0) and torch.all(lut.cos.count[:, 2:] == 2)
    assert torch.allclose(lut.ratio_mean[0, 2:], torch.full((10,), 0.85, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(lut.cos_mean[0, 2:], torch.ones(10, dtype=torch.float64), atol=1e-5)
    assert lut.ratio_std[0, 2:].max() < 1e-5 and lut.cos_std[0, 2:].max() < 1e-5
    assert torch.isnan(lut.ratio_mean[0, :2]).all()
    assert lut.timesteps.tolist() == [float(t) for t in range(12)]


def test_interleaved_streams_stay_separate():
    lut = calibrate(GeometricDenoiser({"cond": 0.9, "uncond": 0.6}), 10, ("cond", "uncond"))
    assert torch.allclose(lut.ratio_mean[0, 2:], torch.full((8,), 0.9, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(lut.ratio_mean[1, 2:], torch.full((8,), 0.6, dtype=torch.float64), atol=1e-5)


def test_batch_elements_count_as_prompts():
    lut = calibrate(GeometricDenoiser({"main": 0.9}), 6, ("main",), batch=3, samples=2)
    assert lut.num_prompts == 6 and int(lut.cos.count[0, 5]) == 6


def test_a_list_output_with_batch_dim_0_is_said(capsys):
    """Wan's models return one ``[C, F, H, W]`` tensor per sample: with the default batch_dim=0 the 16 channels
    counted as 16 prompts (a Python-route calibration "complete" after 2 generations) without a word."""
    class ListOut(torch.nn.Module):
        def forward(self, x, timestep):
            return [torch.full((16, 2, 4, 4), 0.9 ** float(timestep))]

    def generate(batch_dim):
        rec = CalibrationRecorder()
        with DenoiserHook(LoopSpec(6, ("main",), batch_dim=batch_dim), [rec]).attach(ListOut()) as hook:
            hook.new_sample()
            for t in range(6):
                hook.module([torch.zeros(16, 2, 4, 4)], timestep=torch.tensor([float(t)]))
        return rec.lut()

    assert generate(0).num_prompts == 16
    assert "counts as prompts and indexes them in the statistics; a list of one tensor per sample (Wan's) is " \
        "declared batch_dim=None" in capsys.readouterr().err
    assert generate(None).num_prompts == 1 and "batch_dim" not in capsys.readouterr().err


def test_batched_cfg_halves_are_split_into_streams():
    model = GeometricDenoiser({"uncond": 0.7, "cond": 0.95})
    lut = calibrate(model, 8, ("uncond", "cond"), batch=2, split_batch=True, samples=1)
    assert model.calls == 8  # one call per step
    assert lut.num_prompts == 2 and int(lut.cos.count[1, 7]) == 2
    assert torch.allclose(lut.ratio_mean[0, 2:], torch.full((6,), 0.7, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(lut.ratio_mean[1, 2:], torch.full((6,), 0.95, dtype=torch.float64), atol=1e-5)


def test_spread_over_prompts_is_population_std():
    class TwoRatios(torch.nn.Module):  # prompt 0 follows r=0.5, prompt 1 follows r=0.9
        def forward(self, x, timestep):
            t = float(timestep)
            return torch.stack([torch.full((4,), 0.5 ** t), torch.full((4,), 0.9 ** t)])

    rec = CalibrationRecorder()
    with DenoiserHook(LoopSpec(5), [rec]).attach(TwoRatios()) as m:
        for t in range(5):
            m.module(None, timestep=t)
    lut = rec.lut()
    assert torch.allclose(lut.ratio_mean[0, 2:], torch.full((3,), 0.7, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(lut.ratio_std[0, 2:], torch.full((3,), 0.2, dtype=torch.float64), atol=1e-6)


def test_recording_skipped_outputs_is_refused():
    class Skipper(taohooks.Callback):
        def on_before_call(self, hook, call, args, kwargs):
            return torch.zeros(1) if call.step == 3 else None

    model = GeometricDenoiser({"main": 0.9})
    with DenoiserHook(LoopSpec(5), [Skipper(), CalibrationRecorder()]).attach(model):
        with pytest.raises(RuntimeError, match="full-step generations"):
            run_loop(model, 5)


def test_resuming_a_lut_without_delta_products_says_what_it_keeps(tmp_path, capsys):
    """An earlier taohooks' LUT (format 1) resumed: the new prompts' error statistics were dropped without a word,
    and plan.rule: auto's refusal then named the format the file already had (compat walkthrough)."""
    from taohooks.taocache.error_plan import error_model_of
    from taohooks.taocache.plan import PlanError
    from taohooks.taocache.lut import CalibrationLUT

    old = calibrate(GeometricDenoiser({"main": 0.9}), 6, ("main",), error_horizon=0)
    path = old.save(tmp_path / "old.safetensors")
    capsys.readouterr()
    lut = calibrate(GeometricDenoiser({"main": 0.9}), 6, ("main",), resume=CalibrationLUT.load(path))
    assert "old.safetensors holds 2 prompt(s) without delta products (an earlier taohooks' LUT, or " \
        "calibration.error_horizon: 0): the prompts added to it keep none either" in capsys.readouterr().err
    assert lut.num_prompts == 4 and lut.deltas is None
    with pytest.raises(PlanError, match="its prompts were recorded without them, by an earlier taohooks"):
        error_model_of(lut)
