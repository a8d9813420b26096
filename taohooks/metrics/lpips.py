"""LPIPS (Zhang et al. 2018), AlexNet trunk with the v0.1 linear layers, in plain torch.

``LPIPS(a, b)`` for images ``[N, 3, H, W]`` in ``[-1, 1]``:

1. scale both inputs with the LPIPS constants: ``(x - shift) / scale``,
   ``shift = (-0.030, -0.088, -0.188)``, ``scale = (0.458, 0.448, 0.450)``;
2. run AlexNet's feature layers (torchvision shapes) and tap the ReLU output after each
   of its 5 convolutions;
3. unit-normalise each tapped feature along channels (``f / (||f||_2 + 1e-10)``);
4. take the squared difference, weight channels with the layer's non-negative 1x1
   linear weights, average over space;
5. sum the 5 layer values -> ``[N]`` distances (0 for identical images).

AlexNet needs frames of at least 31x31 (its second max-pool has nothing left to pool
below that); :func:`lpips_video` therefore upsamples small frames (bilinear) so their
shorter side is ``resize`` pixels (64 by default). The trained weights are not shipped:
convert them once with :func:`taohooks.metrics.weights.convert_lpips_weights` and load
them with :func:`taohooks.metrics.weights.load_lpips`.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .video import check_video_pair, per_video_mean, video_frames

#: LPIPS input scaling constants (applied to inputs in [-1, 1]).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
#: Channels of the 5 tapped AlexNet layers.
ALEXNET_CHANNELS = (64, 192, 384, 256, 256)
#: Smallest frame side AlexNet's feature layers accept.
MIN_SIDE = 31


class AlexNetFeatures(nn.Module):
    """AlexNet's convolutional trunk (torchvision layer shapes), returning 5 ReLU taps.

    conv 64@11x11 stride 4 pad 2, maxpool 3/2, conv 192@5x5 pad 2, maxpool 3/2,
    conv 384@3x3 pad 1, conv 256@3x3 pad 1, conv 256@3x3 pad 1; each conv followed by
    ReLU. State-dict names: ``convs.{0..4}.weight`` / ``.bias``.
    """

    def __init__(self) -> None:
        super().__init__()
        c = ALEXNET_CHANNELS
        self.convs = nn.ModuleList([
            nn.Conv2d(3, c[0], kernel_size=11, stride=4, padding=2),
            nn.Conv2d(c[0], c[1], kernel_size=5, padding=2),
            nn.Conv2d(c[1], c[2], kernel_size=3, padding=1),
            nn.Conv2d(c[2], c[3], kernel_size=3, padding=1),
            nn.Conv2d(c[3], c[4], kernel_size=3, padding=1),
        ])

    def forward(self, x: Tensor) -> List[Tensor]:
        """``[N, 3, H, W]`` (already LPIPS-scaled) -> 5 ReLU outputs ``[N, C_l, H_l, W_l]``."""
        taps = []
        for i, conv in enumerate(self.convs):
            if i in (1, 2):  # max-pool after the first two convs
                x = F.max_pool2d(x, kernel_size=3, stride=2)
            x = F.relu(conv(x))
            taps.append(x)
        return taps


def normalize_channels(feat: Tensor, eps: float = 1e-10) -> Tensor:
    """Unit-normalise ``[N, C, H, W]`` along ``C``: ``feat / (||feat||_2 + eps)``."""
    norm = feat.pow(2).sum(dim=1, keepdim=True).sqrt()
    return feat / (norm + eps)


class LPIPS(nn.Module):
    """LPIPS distance, AlexNet trunk, v0.1 linear layers; frozen, in eval mode.

    ``weights_path``: a safetensors file written by ``convert_lpips_weights``; ``None``
    leaves random weights (non-negative linear layers), for tests only. State-dict
    names: ``alexnet.convs.{i}.weight|bias`` and ``lins.{i}.weight`` (``[1, C_i, 1, 1]``).
    """

    def __init__(self, weights_path: Optional[Union[str, Path]] = None) -> None:
        super().__init__()
        self.alexnet = AlexNetFeatures()
        self.lins = nn.ModuleList([nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in ALEXNET_CHANNELS])
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():
            for lin in self.lins:
                lin.weight.abs_()
        if weights_path is not None:
            self.load_weights(weights_path)
        self.eval()
        self.requires_grad_(False)

    def load_weights(self, weights_path: Union[str, Path]) -> None:
        """Load a converted safetensors file (strict names and shapes; linear weights must be >= 0)."""
        from safetensors.torch import load_file

        state = load_file(str(weights_path))
        for i in range(len(ALEXNET_CHANNELS)):
            w = state.get(f"lins.{i}.weight")
            if w is not None and bool((w < 0).any()):
                raise ValueError(f"{weights_path}: lins.{i}.weight has negative entries; LPIPS weights are >= 0")
        self.load_state_dict(state, strict=True)

    def forward(self, img_a: Tensor, img_b: Tensor) -> Tensor:
        """LPIPS distance of each pair: ``[N, 3, H, W]`` in ``[-1, 1]`` (H, W >= 31) -> ``[N]``."""
        if img_a.shape != img_b.shape or img_a.dim() != 4 or img_a.shape[1] != 3:
            raise ValueError(f"need two [N, 3, H, W] tensors of one shape, got {tuple(img_a.shape)} "
                             f"and {tuple(img_b.shape)}")
        if min(img_a.shape[-2:]) < MIN_SIDE:
            raise ValueError(f"frames of {tuple(img_a.shape[-2:])} are too small for AlexNet (min side "
                             f"{MIN_SIDE}); upsample them first (lpips_video(resize=64) does)")
        n = img_a.shape[0]
        x = (torch.cat([img_a, img_b]) - self.shift) / self.scale
        total = torch.zeros(n, dtype=x.dtype, device=x.device)
        for feat, lin in zip(self.alexnet(x), self.lins):
            diff = (normalize_channels(feat[:n]) - normalize_channels(feat[n:])).pow(2)
            total = total + lin(diff).mean(dim=(1, 2, 3))
        return total


def upsample_min_side(frames: Tensor, min_side: Optional[int]) -> Tensor:
    """Bilinearly upsample ``[N, C, H, W]`` so that ``min(H, W) == min_side``, keeping the aspect.

    Frames whose shorter side is already ``>= min_side`` (or ``min_side=None``) are
    returned unchanged: this only ever enlarges. ``align_corners=False``.
    """
    h, w = frames.shape[-2:]
    if min_side is None or min(h, w) >= min_side:
        return frames
    s = min_side / min(h, w)
    size = (max(min_side, round(h * s)), max(min_side, round(w * s)))
    return F.interpolate(frames, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def lpips_video(video_a: Tensor, video_b: Tensor, model: LPIPS, resize: Optional[int] = 64,
                batch_size: int = 64) -> Tensor:
    """Mean per-frame LPIPS of each video pair.

    ``video_a``, ``video_b``: ``[B, C, F, H, W]`` in ``[-1, 1]``, C = 3 (C = 1 is
    repeated to RGB). ``resize``: frames whose shorter side is below ``resize`` are
    upsampled bilinearly (aspect kept) so it equals ``resize``; larger frames are
    scored at their own size, as TeaCache's eval does; ``None`` disables it (then
    frames need ``min(H, W) >= 31``). Default 64: the testbed's 16x16 frames become
    64x64. Frames go through ``model`` in chunks of ``batch_size`` on the model's
    device, in float32. Returns ``[B]`` float32 on the inputs' device.
    """
    check_video_pair(video_a, video_b)
    if model is None:  # (what load_lpips() returns without the weights: an AttributeError here before)
        raise ValueError("lpips_video needs the LPIPS model, and load_lpips() found no weights (it returns None): "
                         "convert them once with python -m taohooks.metrics (README: LPIPS weights), or report "
                         "LPIPS as unavailable")
    param = next(model.parameters())
    frames_a, frames_b = video_frames(video_a), video_frames(video_b)
    if frames_a.shape[1] == 1:
        frames_a, frames_b = frames_a.expand(-1, 3, -1, -1), frames_b.expand(-1, 3, -1, -1)
    values = []
    for start in range(0, frames_a.shape[0], batch_size):
        chunk = [upsample_min_side(f[start:start + batch_size].to(param.device, torch.float32), resize)
                 for f in (frames_a, frames_b)]
        values.append(model(*chunk))
    return per_video_mean(torch.cat(values), video_a.shape[0]).to(video_a.device)
