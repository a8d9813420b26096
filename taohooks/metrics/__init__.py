"""Video quality metrics: a cached generation against the full-step one.

Videos are ``[B, C, F, H, W]`` tensors in ``[-1, 1]`` (``to_bcfhw`` converts
``[B, F, C, H, W]`` and ``[F, C, H, W]``). Each metric is computed per frame, averaged
over the frames of a video, and returned per video as ``[B]``; average over videos for
a table entry, as TeaCache's ``common_metrics`` and the TaoCache paper do.

- ``psnr``: frames mapped to ``[0, 1]``, data range 1, capped at 100 dB per frame.
- ``ssim``: Wang et al. 2004, 11x11 Gaussian window (sigma 1.5), RGB averaged.
- ``lpips_video``: LPIPS, AlexNet + v0.1 linear layers, frames upsampled to a 64-pixel
  short side when smaller. Needs converted weights (``taocache lpips-weights``
  once); ``load_lpips()`` returns ``None`` when they are absent: report LPIPS as
  unavailable then, not as 0.

Only torch, numpy and safetensors are imported.
"""
from .lpips import LPIPS, AlexNetFeatures, lpips_video, upsample_min_side
from .psnr_ssim import PSNR_CAP_DB, gaussian_window, psnr, psnr_frames, ssim, ssim_frames
from .safe_pickle import NumpyOnlyUnpickler, restricted_loads
from .video import LAYOUTS, to_bcfhw
from .weights import convert_lpips_weights, default_weights_path, load_lpips

__all__ = [
    "LAYOUTS", "LPIPS", "AlexNetFeatures", "NumpyOnlyUnpickler", "PSNR_CAP_DB", "convert_lpips_weights",
    "default_weights_path", "gaussian_window", "load_lpips", "lpips_video", "psnr", "psnr_frames",
    "restricted_loads", "ssim", "ssim_frames", "to_bcfhw", "upsample_min_side",
]
