"""Video tensor layouts shared by the metrics.

Convention of every public metric in :mod:`taohooks.metrics`: a batch of videos is a
float tensor ``[B, C, F, H, W]`` (batch, RGB channels, frames, height, width) with
values in ``[-1, 1]``, the layout and range of the testbed generator's clips. Values
are not clipped: pass what you would save. :func:`to_bcfhw` converts the two other
common layouts, ``[B, F, C, H, W]`` and a single video ``[F, C, H, W]``.
"""
from __future__ import annotations

import torch
from torch import Tensor

#: Layouts :func:`to_bcfhw` understands (B batch, C channels, F frames, H/W pixels).
LAYOUTS = ("BCFHW", "BFCHW", "FCHW")


def to_bcfhw(video: Tensor, layout: str = "BCFHW") -> Tensor:
    """Return ``video`` as ``[B, C, F, H, W]``.

    ``layout`` names the input's axes: ``"BCFHW"`` (returned as is), ``"BFCHW"``
    (frames before channels, e.g. TeaCache's ``common_metrics``) or ``"FCHW"`` (one
    video; a batch axis of 1 is added). Values are left unchanged.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if video.dim() != len(layout):
        raise ValueError(f"layout {layout} needs a {len(layout)}-D tensor, got shape {tuple(video.shape)}")
    if layout == "BFCHW":
        return video.permute(0, 2, 1, 3, 4)
    if layout == "FCHW":
        return video.permute(1, 0, 2, 3).unsqueeze(0)
    return video


def check_video_pair(video_a: Tensor, video_b: Tensor) -> None:
    """Raise ``ValueError`` unless both are ``[B, C, F, H, W]`` tensors of one shape."""
    if video_a.dim() != 5:
        raise ValueError(f"videos must be [B, C, F, H, W], got shape {tuple(video_a.shape)} "
                         "(use taohooks.metrics.to_bcfhw for other layouts)")
    if video_a.shape != video_b.shape:
        raise ValueError(f"video shapes differ: {tuple(video_a.shape)} vs {tuple(video_b.shape)}")


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
