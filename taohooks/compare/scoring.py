"""Quality of one generation against its full-step reference, with the peers' PSNR conventions.

Videos are ``[B, C, F, H, W]`` in [-1, 1] (mapped to [0, 1], data range 1, as
:mod:`taohooks.metrics`). The per-video values are averaged over the batch:

- ``psnr``: per-frame PSNR averaged over frames, each frame capped at 100 dB (TeaCache's
  ``common_metrics``; the convention of :func:`taohooks.metrics.psnr` and ``taocache bench``);
- ``psnr_pooled``: one MSE pooled over all frames of the video, then PSNR (capped at 100 dB);
- ``psnr_changed``: per-frame PSNR averaged over the frames that differ from the reference
  (MSE >= 1e-10) only; ``None`` when every frame is identical;
- ``ssim``: per-frame SSIM (11x11 Gaussian window) averaged, ``None`` for frames smaller than the
  window; ``lpips``: AlexNet v0.1 per frame, averaged, ``None`` without the converted weights or
  for videos without 3 channels; ``identical_frames``: frames equal to the reference (MSE < 1e-10);
  ``nonfinite_frames``: frames with a NaN or infinite value (never identical; the averages are NaN then, and
  said in a warning; ``results.json`` writes them as null).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ..metrics import PSNR_CAP_DB, lpips_video, psnr, psnr_frames, ssim
from ..metrics.video import check_video_pair, to_unit_range, video_frames

__all__ = ["score", "IDENTICAL_MSE"]

SSIM_WINDOW = 11  # taohooks.metrics.ssim's default window (pixels)
IDENTICAL_MSE = 10.0 ** (-PSNR_CAP_DB / 10.0)  # a frame below this MSE counts as identical (100 dB)


def score(video: torch.Tensor, reference: torch.Tensor, lpips_model: Optional[Any] = None) -> Dict[str, Any]:
    """The metrics above for ``video`` against ``reference`` (both ``[B, C, F, H, W]``)."""
    check_video_pair(video, reference)
    b = video.shape[0]
    a, r = to_unit_range(video_frames(video)), to_unit_range(video_frames(reference))
    mse = (a - r).pow(2).flatten(1).mean(dim=1).reshape(b, -1)  # [B, F] float64
    pooled = 10.0 * torch.log10(1.0 / mse.mean(dim=1).clamp_min(IDENTICAL_MSE))
    finite = torch.isfinite(mse)
    changed = (mse >= IDENTICAL_MSE) | ~finite  # (a NaN frame compared as not changed: counted identical)
    if not bool(finite.all()):
        from ..runtime import messages

        messages.warning(f"{int((~finite).sum())} of {mse.numel()} frames hold NaN or infinite values (a decoder or "
                         "sampler blow-up?): the scores of that video are NaN, written as null in results.json")
    per_frame = psnr_frames(a, r, max_db=None).reshape(b, -1)
    changed_means = [per_frame[i][changed[i]].mean().item() for i in range(b) if changed[i].any()]
    return {
        "psnr": float(psnr(video, reference).mean()),
        "psnr_pooled": float(pooled.mean()),
        "psnr_changed": sum(changed_means) / len(changed_means) if changed_means else None,
        "ssim": float(ssim(video, reference).mean()) if min(video.shape[-2:]) >= SSIM_WINDOW else None,
        "lpips": None if lpips_model is None or video.shape[1] != 3 else
        float(lpips_video(video, reference, lpips_model).mean()),
        "identical_frames": int((~changed).sum()),
        "nonfinite_frames": int((~finite).sum()),
        "frames": int(mse.numel()),
    }
