"""PSNR and SSIM between two batches of videos, frame by frame.

As in TeaCache's ``common_metrics`` (and the TaoCache paper's tables): each frame is
mapped from ``[-1, 1]`` to ``[0, 1]`` and compared with data range 1; the per-frame
values are averaged over the frames of each video, giving one value per video ``[B]``
(average those over videos for a table entry). Computation is in float64; results are
float64 tensors on the inputs' device.

PSNR of identical frames: the MSE of a frame is floored at ``1e-10``, so a frame's
PSNR is capped at ``PSNR_CAP_DB = 100`` dB (the ``common_metrics`` convention, which
keeps the average over frames finite). Pass ``max_db=None`` to get ``inf`` instead.

SSIM follows Wang et al. (2004): an 11x11 Gaussian window with sigma 1.5, K1 = 0.01,
K2 = 0.03, computed on each RGB channel and averaged over channels and over the
*valid* positions only, where the window lies inside the frame (as Wang et al.'s
reference code and ``common_metrics`` do). On the testbed's 16x16 frames the 11x11
window leaves a 6x6 map of 36 positions per channel: valid, but coarse.
``window_size``/``sigma`` allow a smaller window (e.g. 7 and 0.8); keep the default
when comparing with published numbers. Note: torchmetrics (1.9) instead reflect-pads
the frame and averages the whole padded-size map; on 16x16 frames that differs by
~0.02. Its map restricted to the valid positions equals ours (checked in the tests).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .video import check_video_pair, per_video_mean, to_unit_range, video_frames

#: PSNR (dB) given to a frame whose MSE is below 1e-10, e.g. identical frames.
PSNR_CAP_DB = 100.0
#: SSIM stabilising constants (Wang et al. 2004), for data range 1.
SSIM_K1, SSIM_K2 = 0.01, 0.03


def psnr_frames(img_a: Tensor, img_b: Tensor, max_db: Optional[float] = PSNR_CAP_DB) -> Tensor:
    """PSNR in dB of each image pair, data range 1.

    ``img_a``, ``img_b``: ``[N, C, H, W]`` in ``[0, 1]``. Returns ``[N]`` float64:
    ``10 * log10(1 / MSE)`` with the MSE over ``C, H, W``. With ``max_db`` (default 100)
    the result is ``min(PSNR, max_db)``; with ``None`` identical images give ``inf``.
    """
    diff = img_a.to(torch.float64) - img_b.to(torch.float64)
    mse = diff.pow(2).flatten(1).mean(dim=1)
    if max_db is not None:
        mse = mse.clamp_min(10.0 ** (-max_db / 10.0))
    return 10.0 * torch.log10(1.0 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    """Normalised 1-D Gaussian ``[size]`` (float64) centred on the middle tap; ``size`` odd."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"window size must be a positive odd number, got {size}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(x ** 2) / (2.0 * sigma ** 2))
    return g / g.sum()


def _filter_valid(x: Tensor, window: Tensor) -> Tensor:
    """Separable Gaussian filter per channel without padding: ``[N, C, H, W]`` -> ``[N, C, H-k+1, W-k+1]``."""
    c, k = x.shape[1], window.numel()
    w = window.to(device=x.device, dtype=x.dtype)
    x = F.conv2d(x, w.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return F.conv2d(x, w.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)


def ssim_frames(img_a: Tensor, img_b: Tensor, window_size: int = 11, sigma: float = 1.5) -> Tensor:
    """SSIM of each image pair, data range 1, averaged over channels and valid positions.

    ``img_a``, ``img_b``: ``[N, C, H, W]`` in ``[0, 1]`` with ``H, W >= window_size``.
    Returns ``[N]`` float64; 1 for identical images.
    """
    h, w = img_a.shape[-2:]
    if min(h, w) < window_size:
        raise ValueError(f"SSIM window {window_size} is larger than the {h}x{w} frames; pass a smaller window_size")
    a, b = img_a.to(torch.float64), img_b.to(torch.float64)
    window = gaussian_window(window_size, sigma)
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    mu_a, mu_b = _filter_valid(a, window), _filter_valid(b, window)
    var_a = _filter_valid(a * a, window) - mu_a ** 2
    var_b = _filter_valid(b * b, window) - mu_b ** 2
    cov = _filter_valid(a * b, window) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(dim=1)


def psnr(video_a: Tensor, video_b: Tensor, max_db: Optional[float] = PSNR_CAP_DB) -> Tensor:
    """Mean per-frame PSNR (dB) of each video pair.

    ``video_a``, ``video_b``: ``[B, C, F, H, W]`` in ``[-1, 1]`` (mapped to ``[0, 1]``,
    data range 1). Each frame's PSNR is capped at ``max_db`` (default 100 dB; ``None``:
    no cap, identical frames give ``inf``). Returns ``[B]`` float64.
    """
    check_video_pair(video_a, video_b)
    frames_a, frames_b = to_unit_range(video_frames(video_a)), to_unit_range(video_frames(video_b))
    return per_video_mean(psnr_frames(frames_a, frames_b, max_db=max_db), video_a.shape[0])


def ssim(video_a: Tensor, video_b: Tensor, window_size: int = 11, sigma: float = 1.5) -> Tensor:
    """Mean per-frame SSIM of each video pair (Gaussian window, valid positions, RGB averaged).

    ``video_a``, ``video_b``: ``[B, C, F, H, W]`` in ``[-1, 1]`` (mapped to ``[0, 1]``,
    data range 1). Default window: 11x11, sigma 1.5, the standard one; frames must be
    at least ``window_size`` on each side. Returns ``[B]`` float64 in ``[-1, 1]``.
    """
    check_video_pair(video_a, video_b)
    frames_a, frames_b = to_unit_range(video_frames(video_a)), to_unit_range(video_frames(video_b))
    return per_video_mean(ssim_frames(frames_a, frames_b, window_size, sigma), video_a.shape[0])

