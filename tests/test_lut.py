"""LUT files: round trip, exact merges, and errors that name the mismatch."""
import json

import pytest
import torch

import taohooks
from taohooks import CalibrationLUT, LoopSpec, LUTMismatchError, merge_luts
from test_calibration import calibrate
from trajectories import GeometricDenoiser


@pytest.fixture
def lut():
    return calibrate(GeometricDenoiser({"cond": 0.9, "uncond": 0.7}), 8, ("cond", "uncond"), model_id="geo",
                     sampler="ddim")


def assert_same(a: CalibrationLUT, b: CalibrationLUT):
    assert (a.streams, a.steps, a.model_id, a.sampler, a.num_prompts) == (b.streams, b.steps, b.model_id,
                                                                          b.sampler, b.num_prompts)
    for name in ("count", "total", "total_sq"):
        for m in ("cos", "ratio"):
            assert torch.equal(getattr(getattr(a, m), name), getattr(getattr(b, m), name))
    assert torch.equal(a.timesteps.nan_to_num(-1), b.timesteps.nan_to_num(-1))


def test_round_trip(tmp_path, lut):
    path = lut.save(tmp_path / "sub" / "geo.safetensors")
    loaded = CalibrationLUT.load(path)
    assert_same(lut, loaded)
    assert loaded.source == str(path) and loaded.created == lut.created
    from safetensors.torch import load_file
    tensors = load_file(str(path))
    assert tensors["ratio_mean"].shape == (2, 8) and tensors["ratio_mean"].dtype == torch.float32


def test_merge_equals_one_big_run():
    model = GeometricDenoiser({"main": 0.8}, seed=3)

    class Noisy(torch.nn.Module):  # prompts differ, so the spread is not zero
        def __init__(self):
            super().__init__()
            self.g = torch.Generator().manual_seed(0)

        def forward(self, x, timestep, stream="main"):
            return model(x, timestep) + 0.05 * torch.randn(x.shape[0], 3, 4, 4, generator=self.g)

    big = calibrate(Noisy(), 6, ("main",), samples=4)
    noisy = Noisy()
    first = calibrate(noisy, 6, ("main",), samples=1)
    rest = calibrate(noisy, 6, ("main",), samples=3)
    merged = first.merge(rest)
    assert merged.num_prompts == big.num_prompts == 4
    assert torch.equal(merged.cos.count, big.cos.count)
    assert torch.allclose(merged.cos_mean[:, 2:], big.cos_mean[:, 2:], atol=1e-12)
    assert torch.allclose(merged.ratio_std[:, 2:], big.ratio_std[:, 2:], atol=1e-12)
    assert merged.ratio_std[0, 2:].min() > 0
    assert_same(merge_luts([first, rest]), merged)


def test_check_names_the_mismatch(lut):
    with pytest.raises(LUTMismatchError, match="LUT has 8 steps, this run has 40"):
        lut.check(LoopSpec(40, ("cond", "uncond")))
    with pytest.raises(LUTMismatchError, match=r"streams \(cond, uncond\), this run has \(main\)"):
        lut.check(LoopSpec(8, ("main",)))
    with pytest.raises(LUTMismatchError, match="calibrated on model 'geo', this run is 'wan'"):
        lut.check(LoopSpec(8, ("cond", "uncond")), model_id="wan")
    with pytest.raises(LUTMismatchError, match="sampler 'ddim', this run uses 'pndm'"):
        lut.check(LoopSpec(8, ("cond", "uncond")), sampler="pndm")
    lut.check(LoopSpec(8, ("cond", "uncond")), model_id="geo", sampler="ddim")


def test_loaded_lut_names_its_file(tmp_path, lut):
    loaded = CalibrationLUT.load(lut.save(tmp_path / "x.safetensors"))
    with pytest.raises(LUTMismatchError, match=r"x.safetensors has 8 steps, this run has 9"):
        loaded.check(LoopSpec(9, ("cond", "uncond")))


def test_merge_mismatches(lut):
    other = calibrate(GeometricDenoiser({"cond": 0.9, "uncond": 0.7}), 8, ("cond", "uncond"), model_id="other")
    with pytest.raises(LUTMismatchError, match="model_id is 'geo'"):
        lut.merge(other)
    shorter = calibrate(GeometricDenoiser({"cond": 0.9, "uncond": 0.7}), 6, ("cond", "uncond"))
    with pytest.raises(LUTMismatchError, match="cannot merge"):
        lut.merge(shorter)
    shifted = calibrate(GeometricDenoiser({"cond": 0.9, "uncond": 0.7}), 8, ("cond", "uncond"))
    shifted.timesteps += 1
    with pytest.raises(LUTMismatchError, match="timestep of step 0"):
        lut.merge(shifted)


def test_bad_files(tmp_path, lut):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CalibrationLUT.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        CalibrationLUT.load(junk)
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(ValueError, match="not a taohooks LUT"):
        CalibrationLUT.load(tmp_path / "weights.safetensors")
    meta = lut.metadata() | {"format_version": 99}
    from safetensors.torch import save
    raw = save({"timesteps": lut.timesteps}, metadata={"taohooks_lut": json.dumps(meta)})
    (tmp_path / "future.safetensors").write_bytes(raw)
    with pytest.raises(ValueError, match="format version 99"):
        CalibrationLUT.load(tmp_path / "future.safetensors")


def test_save_is_atomic(tmp_path, lut, monkeypatch):
    path = lut.save(tmp_path / "lut.safetensors")
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(taohooks.runtime.io.os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        lut.merge(lut).save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["lut.safetensors"]


def test_table_lists_every_step(lut):
    text = lut.table()
    assert len(text.splitlines()) == 2 + 8 and "0.9000" in text and "0.7000" in text


def test_a_batched_and_a_two_call_lut_merge():
    """Every run takes a LUT of either loop shape (the streams' deltas are the same); a merge refused them, naming
    calls_per_step (review, 2026-11-29)."""
    from test_calibration import calibrate
    from trajectories import GeometricDenoiser

    model = GeometricDenoiser({"uncond": -0.7, "cond": 0.9}, shape=(2, 4, 4))
    batched = calibrate(model, 8, ("uncond", "cond"), batch=2, split_batch=True)
    two_call = calibrate(model, 8, ("uncond", "cond"), batch=2, split_batch=False)
    assert (batched.calls_per_step, two_call.calls_per_step) == (1, 2)
    merged = batched.merge(two_call)
    assert merged.num_prompts == 8 and torch.allclose(merged.cos_mean, batched.cos_mean, atol=1e-6, equal_nan=True)
