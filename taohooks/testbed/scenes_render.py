"""Scene clips rendered a batch at a time with torch, on the training device.

``scenes.render`` makes a clip on the CPU in 1.4-1.8 ms, and fed by rendering processes a GPU's training
step waits for them. Here the seed's draws stay where they were (numpy, ~0.3 ms a clip: :func:`scene_params`
packs ``scenes.layout`` and ``scenes.background_params`` into tensors), and :func:`render_params` makes the
pixels of the whole batch at once on whatever device the tensors are on. The clips are ``scenes.render``'s:
the objects' pixels exactly (the same float64 comparisons), the background to float32 rounding (the same
float64 formulas; a library's cosine may differ in the last bit).
"""

from __future__ import annotations

import math
from typing import Dict, Sequence

import torch

from . import scenes

MAX_WAVES = 12  # the noise background's most cosines
MAX_OBJECTS = max(scenes.COUNTS)
F, H, W = scenes.NUM_FRAMES, scenes.HEIGHT, scenes.WIDTH
_NOISE, _STRIPES = scenes.BACKGROUNDS.index("noise"), scenes.BACKGROUNDS.index("stripes")  # else: gradient
_SQUARE = scenes.SHAPES.index("square")


#: the draws of a clip: name, shape, dtype (:func:`scene_params`; :func:`pack_params` puts them in one row)
_I, _B, _D = torch.int64, torch.bool, torch.float64
FIELDS = (("kind", (), _I), ("drift", (2,), _D), ("waves", (MAX_WAVES, 2), _D), ("wave_amps", (MAX_WAVES,), _D),
          ("phases", (MAX_WAVES,), _D), ("square", (), _B), ("theta", (F,), _D), ("centre", (2,), _D),
          ("base", (), _D), ("amp", (), _D), ("tint", (3,), _D), ("present", (MAX_OBJECTS,), _B),
          ("shape", (MAX_OBJECTS,), _I), ("radius", (MAX_OBJECTS,), _D), ("cx", (MAX_OBJECTS, F), _D),
          ("cy", (MAX_OBJECTS, F), _D), ("rgb", (MAX_OBJECTS, 3), torch.float32))


def scene_params(prompts: Sequence[scenes.ScenePrompt], seeds: Sequence[int]) -> Dict[str, torch.Tensor]:
    """The draws of ``B`` clips as tensors (:data:`FIELDS`): background ``kind [B]``, ``drift [B, 2]``,
    ``waves [B, 12, 2]``, ``wave_amps``/``phases [B, 12]`` (unused waves: amplitude 0), ``square [B]``,
    ``theta [B, 8]``, ``centre [B, 2]``, ``base``/``amp [B]``, ``tint [B, 3]``; objects in painting order,
    the subject in the last of 3 slots (``present [B, 3]``, ``shape``, ``radius [B, 3]``, ``cx``/``cy
    [B, 3, 8]``, ``rgb [B, 3, 3]`` float32)."""
    tensors = {name: torch.zeros((len(prompts), *shape), dtype=dtype) for name, shape, dtype in FIELDS}
    out = {name: t.numpy() for name, t in tensors.items()}  # filled through numpy views of the tensors
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        objects, rng = scenes.layout(prompt, seed)
        bg = scenes.background_params(prompt.background, rng)
        out["kind"][i], out["drift"][i], out["square"][i] = bg.kind, bg.drift, bg.square
        if bg.waves is not None:
            n = len(bg.waves)
            out["waves"][i, :n], out["wave_amps"][i, :n], out["phases"][i, :n] = bg.waves, bg.wave_amps, bg.phases
        if bg.theta is not None:
            out["theta"][i], out["centre"][i] = bg.theta, bg.centre
        out["base"][i], out["amp"][i], out["tint"][i] = bg.base, bg.amp, bg.tint
        for j, obj in enumerate(objects, start=MAX_OBJECTS - len(objects)):
            out["present"][i, j], out["shape"][i, j], out["radius"][i, j] = True, obj.shape, obj.radius
            out["cx"][i, j], out["cy"][i, j], out["rgb"][i, j] = obj.cx, obj.cy, obj.rgb
    return tensors


def pack_params(p: Dict[str, torch.Tensor]) -> torch.Tensor:
    """:func:`scene_params`' draws as one float64 ``[B, 133]`` tensor, exactly (ids, flags and float32 colours
    are float64 values): a worker process hands one tensor over, not 17, and the device gets one copy."""
    return torch.cat([p[name].reshape(len(p["base"]), -1).double() for name, _, _ in FIELDS], dim=1)


def unpack_params(packed: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`pack_params`, on ``packed``'s device."""
    sizes = [math.prod(shape) for _, shape, _ in FIELDS]
    if packed.ndim != 2 or packed.shape[1] != sum(sizes):
        raise ValueError(f"packed scene draws: {list(packed.shape)[1:]} values a clip, expected [{sum(sizes)}]")
    out = {}
    for (name, shape, dtype), v in zip(FIELDS, packed.split(sizes, dim=1)):
        v = v.reshape(len(packed), *shape)
        out[name] = v != 0 if dtype is torch.bool else v.to(dtype)
    return out


def _texture(p: Dict[str, torch.Tensor], xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """``scenes.texture`` of every clip, ``[B, 8, 32, 32]`` float64."""
    f = torch.arange(F, dtype=torch.float64, device=xs.device)[:, None, None]
    col = lambda v: v[:, None, None, None]  # noqa: E731  [B] -> [B, 1, 1, 1]
    x, y = xs - col(p["drift"][:, 0]) * f, ys - col(p["drift"][:, 1]) * f  # [B, F, H, W]
    kx, ky = p["waves"][..., 0], p["waves"][..., 1]
    wave = lambda n: 2 * math.pi * (col(kx[:, n]) * x + col(ky[:, n]) * y) / W + col(p["phases"][:, n])  # noqa: E731
    noise = col(p["wave_amps"][:, 0]) * torch.cos(wave(0))
    for n in range(1, MAX_WAVES):  # summed in scenes.texture's order; an unused wave adds 0
        noise = noise + col(p["wave_amps"][:, n]) * torch.cos(wave(n))
    noise = noise / noise.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-300)  # gradient rows: 0, not 0/0
    stripes = torch.sin(wave(0))
    stripes = torch.where(col(p["square"]), torch.tanh(3 * stripes) / math.tanh(3), stripes)
    theta = p["theta"][:, :, None, None]
    gradient = ((xs - col(p["centre"][:, 0])) * torch.cos(theta) + (ys - col(p["centre"][:, 1])) * torch.sin(theta)
                ) / (W * 1.1)
    kind = col(p["kind"])
    return torch.where(kind == _NOISE, noise, torch.where(kind == _STRIPES, stripes, gradient.clamp(-1, 1)))


def render_params(p: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The clips of :func:`scene_params`' draws on their device: float32 ``[B, 3, 8, 32, 32]`` in ``[-1, 1]``."""
    dev = p["base"].device
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64, device=dev),
                            torch.arange(W, dtype=torch.float64, device=dev), indexing="ij")
    grey = p["base"][:, None, None, None] + p["amp"][:, None, None, None] * _texture(p, xs, ys)
    clip = (grey[:, None] + p["tint"][:, :, None, None, None]).float()
    for j in range(MAX_OBJECTS):
        ddx, ddy = xs - p["cx"][:, j, :, None, None], ys - p["cy"][:, j, :, None, None]  # [B, F, H, W]
        r = p["radius"][:, j, None, None, None]
        inside = torch.where(p["shape"][:, j, None, None, None] == _SQUARE, (ddx.abs() <= r) & (ddy.abs() <= r),
                             ddx * ddx + ddy * ddy <= r * r) & p["present"][:, j, None, None, None]
        clip = torch.where(inside[:, None], p["rgb"][:, j, :, None, None, None], clip)
    return clip.clamp(-1, 1)
