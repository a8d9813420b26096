"""Analytic recogniser for ``scenes`` clips ``[3, 8, 32, 32]`` in ``[-1, 1]``: does a clip show its prompt?

Pixels are split by their channel spread (max - min of RGB in 0..1): objects are saturated
(spread >= 0.6 when rendered), the background nearly grey (spread <= 0.06). Saturated pixels
get the nearest of the 6 hue families. Then

- colour:     the largest 4-connected blob of the asked family has >= MIN_PIXELS pixels in
              >= MIN_FRAMES of the 8 frames,
- direction:  least-squares slope of that blob's centroid over frames (pixels/frame),
- shape:      colour weight of the blob's bounding-box corners (median over frames; ~0 circle,
              ~1 square), the weight of a pixel being its saturation ramp 0..1 inside the family,
- count:      the number of families with such a blob in >= COUNT_FRAMES frames,
- background: per frame, on the grey pixels: a plane fits (residual <= GRADIENT_RESIDUAL of the
              variance) -> gradient; else the strongest Fourier pair carries >= STRIPE_SHARE of the
              power -> stripes; else noise. The majority of the frames decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np

from . import scenes
from .recognizer import centroid_velocity, largest_component

SATURATED = 0.3  # channel spread (0..1 units) above which a pixel belongs to an object
GREY = 0.15  # ... below which it belongs to the background
MIN_PIXELS = 8
MIN_FRAMES = 6
COUNT_FRAMES = 5
MIN_SPEED = 0.4  # pixels/frame along the asked axis
SQUARE_CORNERS = 0.3
GRADIENT_RESIDUAL = 0.1
STRIPE_SHARE = 0.5


@dataclass(frozen=True)
class SceneRecognition:
    """Per-attribute verdicts and the measurements behind them."""

    colour: bool
    direction: bool
    shape: bool
    count: bool
    background: bool
    velocity: tuple  # (vx, vy) pixels/frame of the subject, y down
    corners: float  # 0..1
    objects: int  # hue families seen
    background_kind: str

    @property
    def ok(self) -> bool:
        return self.colour and self.direction and self.shape and self.count and self.background


def _to_numpy(clip) -> np.ndarray:
    if hasattr(clip, "detach"):
        clip = clip.detach().float().cpu().numpy()
    clip = np.asarray(clip, dtype=np.float32)
    if clip.shape != scenes.CLIP_SHAPE:
        raise ValueError(f"expected a scenes clip of shape {scenes.CLIP_SHAPE}, got {clip.shape}")
    return clip


def pixel_features(clip):
    """``(spread, family, hue_offset)``, each ``[8, 32, 32]``: channel spread 0..1, nearest hue family
    (0..5), and the distance of the hue from that family's centre in degrees."""
    u = (np.clip(_to_numpy(clip), -1, 1).transpose(1, 2, 3, 0) + 1) / 2  # [F, H, W, 3] in 0..1
    mx, mn = u.max(-1), u.min(-1)
    spread = mx - mn
    r, g, b = u[..., 0], u[..., 1], u[..., 2]
    d = np.where(spread > 1e-6, spread, 1.0)
    hue = np.where(mx == r, ((g - b) / d) % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4)) * 60.0
    family = np.round(hue / 60.0).astype(int) % len(scenes.COLOURS)
    offset = np.abs((hue - scenes.HUES[family] + 180) % 360 - 180)
    return spread, family, offset


def _blobs(spread, family, colour: int) -> np.ndarray:
    labels = (spread >= SATURATED) & (family == colour)
    return np.stack([largest_component(m) for m in labels])  # [F, H, W]


def classify_background(grey: np.ndarray, mask: np.ndarray) -> str:
    """``"gradient" | "stripes" | "noise"`` for one frame: grey levels ``[H, W]``, ``mask`` True on background."""
    if mask.sum() < 0.3 * mask.size:
        return "noise"
    ys, xs = np.nonzero(mask)
    v = grey[ys, xs].astype(np.float64)
    a = np.stack([xs, ys, np.ones_like(xs)], 1).astype(np.float64)
    coef, *_ = np.linalg.lstsq(a, v, rcond=None)
    residual = np.mean((v - a @ coef) ** 2) / max(np.var(v), 1e-12)
    if residual <= GRADIENT_RESIDUAL:
        return "gradient"
    return "stripes" if stripe_share(grey, mask) >= STRIPE_SHARE else "noise"


def stripe_share(grey: np.ndarray, mask: np.ndarray) -> float:
    """Share of the background's (``mask``) spatial power in its strongest Fourier pair, 0..1: near 1 for
    one clean wave (rendered stripes: 0.75-0.95), low for noise fields and blocky texture."""
    v = grey[mask].astype(np.float64)
    filled = np.where(mask, grey, v.mean()) - v.mean()
    power = np.abs(np.fft.fft2(filled)) ** 2
    power[0, 0] = 0.0
    peak = np.unravel_index(power.argmax(), power.shape)
    mirror = ((-peak[0]) % power.shape[0], (-peak[1]) % power.shape[1])
    return float((power[peak] + power[mirror]) / max(power.sum(), 1e-12))


def recognize(clip, prompt: scenes.ScenePrompt) -> SceneRecognition:
    """Check colour, direction, shape, object count and background of ``clip`` against ``prompt``."""
    x = _to_numpy(clip)
    spread, family, offset = pixel_features(x)
    present_per_family = []
    for c in range(len(scenes.COLOURS)):
        blob = _blobs(spread, family, c)
        present_per_family.append((blob, blob.sum((1, 2)) >= MIN_PIXELS))
    mask, present = present_per_family[prompt.colour]
    colour_ok = int(present.sum()) >= MIN_FRAMES

    weight = np.clip((spread - GREY) / (SATURATED * 2 - GREY), 0, 1) * (offset <= 45.0) * (family == prompt.colour)
    frames = np.nonzero(present)[0]
    cxs, cys, corners = [], [], []
    for f in frames:
        ys, xs = np.nonzero(mask[f])
        cxs.append(xs.mean())
        cys.append(ys.mean())
        y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
        corners.append(weight[f, [y0, y0, y1, y1], [x0, x1, x0, x1]].mean())
    vx = vy = 0.0
    if len(frames) >= 2:
        vx, vy = centroid_velocity(frames, cxs, cys)
    ux, uy = scenes.DIRECTION_VECTORS[scenes.DIRECTIONS[prompt.direction]]
    along, across = vx * ux + vy * uy, abs(vx * uy) + abs(vy * ux)
    direction_ok = colour_ok and along >= MIN_SPEED and along > across
    corner = float(np.median(corners)) if corners else 0.0
    shape_ok = colour_ok and (corner >= SQUARE_CORNERS) == (scenes.SHAPES[prompt.shape] == "square")

    objects = sum(int(p.sum()) >= COUNT_FRAMES for _, p in present_per_family)
    grey_level = x.mean(0)  # [F, H, W]
    kinds = [classify_background(grey_level[f], spread[f] < GREY) for f in range(scenes.NUM_FRAMES)]
    kind = max(scenes.BACKGROUNDS, key=kinds.count)
    return SceneRecognition(colour_ok, direction_ok, shape_ok, objects == prompt.count,
                            kind == scenes.BACKGROUNDS[prompt.background], (vx, vy), corner, objects, kind)


def accuracy(clips, prompts: Sequence[scenes.ScenePrompt]) -> dict:
    """Fractions of clips (``[B, 3, 8, 32, 32]``) passing each check and all of them."""
    results: List[SceneRecognition] = [recognize(c, p) for c, p in zip(clips, prompts)]
    n = max(len(results), 1)
    out = {k: sum(getattr(r, k) for r in results) / n
           for k in ("colour", "direction", "shape", "count", "background")}
    out["overall"] = sum(r.ok for r in results) / n
    out["n"] = len(results)
    return out
