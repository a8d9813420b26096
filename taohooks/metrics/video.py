"""Video tensor layouts shared by the metrics.

Convention of every public metric in :mod:`taohooks.metrics`: a batch of videos is a
float tensor ``[B, C, F, H, W]`` (batch, RGB channels, frames, height, width) with
values in ``[-1, 1]``, the layout and range of the testbed generator's clips. Values
are not clipped: pass what you would save. :func:`to_bcfhw` converts the other common
layouts, ``[B, F, C, H, W]`` and a single video ``[F, C, H, W]`` or ``[C, F, H, W]`` (Wan's
``generate``). Integer videos are refused; values beyond +-20 (``[0, 255]`` pixels) and a pair whose
values all lie in ``[0, 1]`` are warned about (PSNR reads 6 dB high on ``[0, 1]`` videos).
Any channel count is scored (latents too): a single video's layout must be named (``FCHW`` or ``CFHW``).
"""
from __future__ import annotations

import torch
from torch import Tensor

#: Layouts :func:`to_bcfhw` understands (B batch, C channels, F frames, H/W pixels).
LAYOUTS = ("BCFHW", "BFCHW", "FCHW", "CFHW")
# a finite value beyond this is 0..255 pixels, not a [-1, 1] video (nor latents, which taocache compare also scores
# where a script returns them: a few units)
RANGE_LIMIT = 20.0


def to_bcfhw(video: Tensor, layout: str = "BCFHW") -> Tensor:
    """Return ``video`` as ``[B, C, F, H, W]``.

    ``layout`` names the input's axes: ``"BCFHW"`` (returned as is), ``"BFCHW"``
    (frames before channels, e.g. TeaCache's ``common_metrics``), ``"FCHW"`` or ``"CFHW"``
    (one video, as Wan's ``generate`` returns it; a batch axis of 1 is added). Values are
    left unchanged.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if video.dim() != len(layout):
        raise ValueError(f"layout {layout} needs a {len(layout)}-D tensor, got shape {tuple(video.shape)}")
    if layout == "BFCHW":
        return video.permute(0, 2, 1, 3, 4)
    if layout == "FCHW":
        return video.permute(1, 0, 2, 3).unsqueeze(0)
    if layout == "CFHW":
        return video.unsqueeze(0)
    return video


def check_video_pair(video_a: Tensor, video_b: Tensor) -> None:
    """Raise ``ValueError`` unless both are float ``[B, C, F, H, W]`` tensors of one shape; warn (once each) about
    values beyond +-20 (0..255 pixels) and about a pair entirely in ``[0, 1]``."""
    from ..runtime import messages

    if video_a.dim() != 5:
        raise ValueError(f"videos must be [B, C, F, H, W], got shape {tuple(video_a.shape)} "
                         "(use taohooks.metrics.to_bcfhw for other layouts: a single [C, F, H, W] video, as Wan's "
                         "generate returns it, is to_bcfhw(video, 'CFHW'))")
    if video_a.shape != video_b.shape:
        raise ValueError(f"video shapes differ: {tuple(video_a.shape)} vs {tuple(video_b.shape)}")
    for video in (video_a, video_b):
        if not video.is_floating_point():
            raise ValueError(f"the videos are {video.dtype} (0..255 pixels?): the metrics take float videos in "
                             "[-1, 1]; convert with video.float() / 127.5 - 1")
    bounds = [_finite_bounds(v) for v in (video_a, video_b)]
    bounds = [b for b in bounds if b is not None]
    if bounds:
        low, high = min(b[0] for b in bounds), max(b[1] for b in bounds)
        if max(-low, high) > RANGE_LIMIT:  # (warned, not refused: a script's untrained test model makes such too)
            messages.warning(f"the videos' values reach {low:g} .. {high:g}: the metrics take videos in [-1, 1] (0..255 "
                             "pixels: video / 127.5 - 1); the scores below are of these values",
                             once="metrics: out of range")
        elif low >= 0.0 and high <= 1.0:
            messages.warning("every value of both videos lies in [0, 1]: the metrics take [-1, 1] videos, and on "
                             "[0, 1] videos PSNR reads 6 dB high; convert with 2 * video - 1 if they are [0, 1]",
                             once="metrics: [0, 1] videos")
    # (any channel count: compare also scores what a script returns as latents, 4 or 16 channels)
    channels, frames = video_a.shape[1], video_a.shape[2]
    if frames == 3 and channels not in (1, 3):  # SSIM (per channel) and LPIPS would mix frames as colours
        messages.warning(f"the videos have {channels} channels and 3 frames: frames and channels swapped? The metrics "
                         "take [B, C, F, H, W]; a batch of [F, C, H, W] clips is to_bcfhw(video, 'BFCHW') (ignore "
                         "this for 3-frame latents)", once="metrics: swapped axes")


def _finite_bounds(video: Tensor):
    """``(min, max)`` of the finite values (``None`` when there are none); no copy when every value is finite."""
    if video.numel() == 0:
        return None
    low, high = torch.aminmax(video.detach())
    if torch.isfinite(low) and torch.isfinite(high):
        return float(low), float(high)
    finite = video.detach()[torch.isfinite(video.detach())]
    return (float(finite.min()), float(finite.max())) if finite.numel() else None


def video_frames(video: Tensor) -> Tensor:
    """``[B, C, F, H, W]`` -> ``[B*F, C, H, W]``, frames of video 0 first, in time order."""
    b, c, f, h, w = video.shape
    return video.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def per_video_mean(values: Tensor, batch: int) -> Tensor:
    """Per-frame values ``[B*F]`` (ordered as :func:`video_frames`) -> per-video means ``[B]``."""
    return values.reshape(batch, -1).mean(dim=1)


def to_unit_range(x: Tensor) -> Tensor:
    """Map values from ``[-1, 1]`` to ``[0, 1]`` (``(x + 1) / 2``), in float64."""
    return (x.to(torch.float64) + 1.0) / 2.0
