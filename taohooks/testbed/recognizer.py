"""Analytic recogniser: does a clip ``[3, 8, 16, 16]`` in ``[-1, 1]`` show its prompt?

Each pixel is labelled with its nearest reference colour (background or one of the
palette colours). The largest connected blob of pixels labelled with the asked colour in each frame gives

- colour:    enough of them in most frames,
- direction: the least-squares slope of their centroid over frames (pixels/frame),
- shape:     how much colour the four corner pixels of the blob's bounding box carry
             (median over frames; ~0 for a circle, ~1 for a square). The colour weight
             of a pixel is its projection on the background -> colour segment, in 0..1,
             so soft (generated) corners count partly.

The dot distractor has a different colour, so it does not enter the mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

from . import data

MIN_PIXELS = 6  # a frame "shows" the colour when at least this many pixels match
MIN_FRAMES = 6  # ... in at least this many of the 8 frames
MIN_SPEED = 0.3  # pixels/frame along the asked axis
SQUARE_CORNERS = 0.2  # corner colour weight (0..1) above which the shape is a square


@dataclass(frozen=True)
class Recognition:
    """Per-attribute verdicts plus the measurements behind them."""

    colour: bool
    direction: bool
    shape: bool
    velocity: tuple  # (vx, vy) pixels/frame, image coordinates (y down)
    corners: float  # median colour weight of the blob's bounding-box corners, 0..1
    fill: float  # median fraction of the bounding box covered by the blob, 0..1 (informational)

    @property
    def ok(self) -> bool:
        return self.colour and self.direction and self.shape


def _to_numpy(clip) -> np.ndarray:
    if hasattr(clip, "detach"):
        clip = clip.detach().float().cpu().numpy()
    clip = np.asarray(clip, dtype=np.float32)
    if clip.shape != data.CLIP_SHAPE:
        raise ValueError(f"expected clip of shape {data.CLIP_SHAPE}, got {clip.shape}")
    return clip


def colour_labels(clip) -> np.ndarray:
    """Nearest reference colour per pixel: int ``[8, 16, 16]``; 0 = background, k+1 = palette k."""
    x = _to_numpy(clip).transpose(1, 2, 3, 0)  # [F, H, W, 3]
    refs = np.concatenate([np.full((1, 3), data.BACKGROUND, np.float32), data.PALETTE])  # [5, 3]
    dist = ((x[..., None, :] - refs) ** 2).sum(-1)  # [F, H, W, 5]
    return dist.argmin(-1)


def colour_weight(clip, colour: int) -> np.ndarray:
    """Per-pixel weight ``[8, 16, 16]`` in 0..1 of palette colour ``colour`` over the background."""
    x = _to_numpy(clip).transpose(1, 2, 3, 0)  # [F, H, W, 3]
    bg = np.full(3, data.BACKGROUND, np.float32)
    d = data.PALETTE[colour] - bg
    return np.clip((x - bg) @ d / (d @ d), 0.0, 1.0)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of a boolean ``[H, W]`` mask (stray pixels dropped)."""
    h, w = mask.shape
    labels = np.zeros((h, w), np.int32)
    best, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


def centroid_velocity(frames: np.ndarray, cxs: Sequence[float], cys: Sequence[float]) -> Tuple[float, float]:
    """Least-squares slope of the centroid over frames (pixels per frame), ``(vx, vy)``; >= 2 frames."""
    t = frames - frames.mean()
    vx = float((t * (np.asarray(cxs) - np.mean(cxs))).sum() / (t * t).sum())
    vy = float((t * (np.asarray(cys) - np.mean(cys))).sum() / (t * t).sum())
    return vx, vy


def recognize(clip, prompt: data.Prompt) -> Recognition:
    """Check colour, direction and shape of ``clip`` (``[3, 8, 16, 16]``) against ``prompt``."""
    labels = colour_labels(clip) == prompt.colour + 1  # [F, H, W]
    mask = np.stack([largest_component(m) for m in labels])
    counts = mask.sum((1, 2))
    present = counts >= MIN_PIXELS
    colour_ok = int(present.sum()) >= MIN_FRAMES

    frames = np.nonzero(present)[0]
    weight = colour_weight(clip, prompt.colour)
    vx = vy = 0.0
    fills, corners, cxs, cys = [], [], [], []
    for f in frames:
        ys, xs = np.nonzero(mask[f])
        cxs.append(xs.mean())
        cys.append(ys.mean())
        y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
        fills.append(len(xs) / ((y1 - y0 + 1) * (x1 - x0 + 1)))
        corners.append(weight[f, [y0, y0, y1, y1], [x0, x1, x0, x1]].mean())
    if len(frames) >= 2:
        vx, vy = centroid_velocity(frames, cxs, cys)
    ux, uy = data.DIRECTION_VECTORS[data.DIRECTIONS[prompt.direction]]
    along, across = vx * ux + vy * uy, abs(vx * uy) + abs(vy * ux)
    direction_ok = colour_ok and along >= MIN_SPEED and along > across

    corner = float(np.median(corners)) if corners else 0.0
    is_square = corner >= SQUARE_CORNERS
    shape_ok = colour_ok and is_square == (data.SHAPES[prompt.shape] == "square")
    fill = float(np.median(fills)) if fills else 0.0
    return Recognition(colour_ok, direction_ok, shape_ok, (vx, vy), corner, fill)


def accuracy(clips, prompts: Sequence[data.Prompt]) -> dict:
    """Fractions of clips (``[B, 3, 8, 16, 16]``) passing each check and all of them."""
    results: List[Recognition] = [recognize(c, p) for c, p in zip(clips, prompts)]
    n = max(len(results), 1)
    return {
        "colour": sum(r.colour for r in results) / n,
        "direction": sum(r.direction for r in results) / n,
        "shape": sum(r.shape for r in results) / n,
        "overall": sum(r.ok for r in results) / n,
        "n": len(results),
    }
