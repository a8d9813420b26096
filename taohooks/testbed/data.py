"""Procedural text-to-video clips: one coloured shape moving over a dark background.

A clip is a float32 array ``[C, F, H, W] = [3, 8, 16, 16]`` with values in ``[-1, 1]``.
It is a pure function of ``(prompt, seed)``: the seed fixes the start position,
speed, size jitter, background shade and distractor position.

Seeds ``< 10_000`` are the training range; :func:`calibration_pairs` uses seeds
``1000+``, :func:`eval_pairs` seeds ``10_000+`` (held out from training, the reported
figures) and :func:`validation_pairs` seeds ``20_000+`` (held out too, for choosing
between checkpoints, so that the choice does not fit the reported pairs).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

COLOURS: Tuple[str, ...] = ("red", "green", "blue", "yellow")
DIRECTIONS: Tuple[str, ...] = ("left", "right", "up", "down")
SHAPES: Tuple[str, ...] = ("circle", "square")

#: RGB of each colour in [-1, 1], indexed like COLOURS.
PALETTE = np.array(
    [
        [1.0, -0.8, -0.8],  # red
        [-0.8, 1.0, -0.8],  # green
        [-0.8, -0.8, 1.0],  # blue
        [1.0, 1.0, -0.8],  # yellow
    ],
    dtype=np.float32,
)
BACKGROUND = -0.9  # mean background level (all channels), jittered per seed

#: Unit motion per direction in image coordinates (dx, dy); y grows downwards.
DIRECTION_VECTORS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

NUM_FRAMES, HEIGHT, WIDTH, CHANNELS = 8, 16, 16, 3
CLIP_SHAPE = (CHANNELS, NUM_FRAMES, HEIGHT, WIDTH)
TRAIN_SEED_LIMIT = 10_000  # training seeds are in [0, TRAIN_SEED_LIMIT)
CALIBRATION_SEED_START = 1000
EVAL_SEED_START = 10_000
VALIDATION_SEED_START = 20_000

#: Number of ids per attribute; the distractor has ``len(COLOURS) + 1`` ids (last = none).
ATTRIBUTE_SIZES = (len(COLOURS), len(DIRECTIONS), len(SHAPES), len(COLOURS) + 1)
NO_DISTRACTOR = len(COLOURS)
NULL_ID = -1  # every attribute id -1 = the null (unconditional) prompt


@dataclass(frozen=True)
class Prompt:
    """Integer attribute ids of a prompt.

    ``distractor`` is a colour id of a static dot, or ``None`` for no dot; it must
    differ from ``colour``.
    """

    colour: int
    direction: int
    shape: int
    distractor: Optional[int] = None

    def __post_init__(self):
        if not (0 <= self.colour < len(COLOURS)):
            raise ValueError(f"colour id {self.colour} out of range")
        if not (0 <= self.direction < len(DIRECTIONS)):
            raise ValueError(f"direction id {self.direction} out of range")
        if not (0 <= self.shape < len(SHAPES)):
            raise ValueError(f"shape id {self.shape} out of range")
        if self.distractor is not None and not (0 <= self.distractor < len(COLOURS)):
            raise ValueError(f"distractor id {self.distractor} out of range")
        if self.distractor == self.colour:
            raise ValueError("distractor colour must differ from the shape colour")

    @property
    def text(self) -> str:
        """E.g. ``"a red circle moving left"`` or ``"... left, with a static blue dot"``."""
        s = f"a {COLOURS[self.colour]} {SHAPES[self.shape]} moving {DIRECTIONS[self.direction]}"
        if self.distractor is not None:
            s += f", with a static {COLOURS[self.distractor]} dot"
        return s

    def ids(self) -> Tuple[int, int, int, int]:
        """``(colour, direction, shape, distractor)``; distractor ``NO_DISTRACTOR`` if none."""
        d = NO_DISTRACTOR if self.distractor is None else self.distractor
        return (self.colour, self.direction, self.shape, d)

    @classmethod
    def from_text(cls, text: str) -> "Prompt":
        """Parse the format produced by :attr:`text`."""
        words = text.replace(",", " ").split()
        try:
            colour = COLOURS.index(words[1])
            shape = SHAPES.index(words[2])
            direction = DIRECTIONS.index(words[4])
            distractor = COLOURS.index(words[8]) if len(words) > 5 else None
        except (IndexError, ValueError) as e:
            raise ValueError(f"cannot parse prompt {text!r}") from e
        return cls(colour, direction, shape, distractor)

    def __str__(self) -> str:
        return self.text


def all_prompts() -> List[Prompt]:
    """All 128 prompts: 4 colours x 4 directions x 2 shapes x (no dot + 3 dot colours)."""
    out = []
    for c, d, s in itertools.product(range(len(COLOURS)), range(len(DIRECTIONS)), range(len(SHAPES))):
        for dist in [None] + [k for k in range(len(COLOURS)) if k != c]:
            out.append(Prompt(c, d, s, dist))
    return out


def prompt_ids(prompts: Sequence[Optional[Prompt]]) -> np.ndarray:
    """Stack attribute ids: ``[B, 4]`` int64; ``None`` entries become the null prompt (-1s)."""
    rows = [(NULL_ID,) * 4 if p is None else p.ids() for p in prompts]
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), 4)


def _rng(prompt: Prompt, seed: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *prompt.ids(), 0x7A0])


def render(prompt: Prompt, seed: int) -> np.ndarray:
    """Render the clip for ``(prompt, seed)``: float32 ``[3, 8, 16, 16]`` in ``[-1, 1]``.

    The seed jitters: half-size (3.0-3.6 px), speed (0.8-1.15 px/frame), start
    (0-1.5 px in from the entry edge), path offset (+-1.5 px around the centre line),
    background shade (+-0.05) and the dot position (+-2 px along the path, on the
    top edge for horizontal motion, the left edge for vertical motion). The
    jitter is kept moderate so that a ~1.5M-parameter model learns the task in
    about half an hour of one CPU core.
    """
    rng = _rng(prompt, seed)
    radius = rng.uniform(3.0, 3.6)  # half-size of the shape, pixels
    speed = rng.uniform(0.8, 1.15)  # pixels per frame
    travel = speed * (NUM_FRAMES - 1)
    lo, hi = radius - 0.5, WIDTH - 0.5 - radius  # centre range keeping the shape inside
    along0 = lo + rng.uniform(0.0, min(1.5, hi - lo - travel))  # start, in the + direction
    across = (WIDTH - 1) / 2 + rng.uniform(-1.5, 1.5)
    dx, dy = DIRECTION_VECTORS[DIRECTIONS[prompt.direction]]
    t = np.arange(NUM_FRAMES, dtype=np.float64)
    along = along0 + speed * t
    if dx != 0:
        cx = along if dx > 0 else (WIDTH - 1) - along
        cy = np.full(NUM_FRAMES, across)
    else:
        cy = along if dy > 0 else (HEIGHT - 1) - along
        cx = np.full(NUM_FRAMES, across)

    bg = BACKGROUND + rng.uniform(-0.05, 0.05)
    clip = np.full(CLIP_SHAPE, bg, dtype=np.float32)
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)

    # Static 3x3 distractor dot beside the path, drawn first so the shape passes over it.
    dot_along = int(rng.integers(5, 11))  # drawn even when unused: keeps streams aligned
    if prompt.distractor is not None:
        y0, x0 = (1, dot_along) if dx != 0 else (dot_along, 1)
        clip[:, :, y0 - 1 : y0 + 2, x0 - 1 : x0 + 2] = PALETTE[prompt.distractor][:, None, None, None]

    colour = PALETTE[prompt.colour]
    for f in range(NUM_FRAMES):
        ddx, ddy = xs - cx[f], ys - cy[f]
        if SHAPES[prompt.shape] == "circle":
            inside = ddx * ddx + ddy * ddy <= radius * radius
        else:
            inside = (np.abs(ddx) <= radius) & (np.abs(ddy) <= radius)
        clip[:, f][:, inside] = colour[:, None]
    return clip


def render_batch(prompts: Sequence[Prompt], seeds: Sequence[int]) -> np.ndarray:
    """Render many clips: float32 ``[B, 3, 8, 16, 16]``."""
    return np.stack([render(p, s) for p, s in zip(prompts, seeds)])


def random_training_batch(rng: np.random.Generator, batch_size: int):
    """Random prompts and training seeds (< 10_000); half the prompts have a dot.

    Returns ``(prompts, seeds, clips)`` with clips float32 ``[B, 3, 8, 16, 16]``.
    """
    prompts, seeds = [], []
    for _ in range(batch_size):
        c = int(rng.integers(len(COLOURS)))
        d = int(rng.integers(len(DIRECTIONS)))
        s = int(rng.integers(len(SHAPES)))
        dist = None
        if rng.random() < 0.5:
            dist = int(rng.choice([k for k in range(len(COLOURS)) if k != c]))
        prompts.append(Prompt(c, d, s, dist))
        seeds.append(int(rng.integers(TRAIN_SEED_LIMIT)))
    return prompts, seeds, render_batch(prompts, seeds)


def _spread_prompts(n: int, offset: int) -> List[Prompt]:
    """``n`` prompts cycling through colour x direction x shape, dot colour varying."""
    base = list(itertools.product(range(len(COLOURS)), range(len(DIRECTIONS)), range(len(SHAPES))))
    out = []
    for i in range(n):
        k = i + offset
        c, d, s = base[(k * 13) % len(base)]  # 13 is coprime to 32: visits every triple
        others = [j for j in range(len(COLOURS)) if j != c]
        choice = (k // len(base) + k) % (len(others) + 1)
        out.append(Prompt(c, d, s, None if choice == len(others) else others[choice]))
    return out


def calibration_pairs(n: int = 20) -> List[Tuple[Prompt, int]]:
    """``n`` (prompt, seed) pairs for cache calibration; seeds ``1000 .. 1000+n-1``."""
    return list(zip(_spread_prompts(n, offset=5), range(CALIBRATION_SEED_START, CALIBRATION_SEED_START + n)))


def eval_pairs(n: int = 64) -> List[Tuple[Prompt, int]]:
    """``n`` held-out (prompt, seed) pairs; seeds ``>= 10_000`` (never used in training)."""
    return list(zip(_spread_prompts(n, offset=0), range(EVAL_SEED_START, EVAL_SEED_START + n)))


def validation_pairs(n: int = 64) -> List[Tuple[Prompt, int]]:
    """``n`` held-out pairs for checkpoint selection; seeds ``>= 20_000``, disjoint from :func:`eval_pairs`."""
    return list(zip(_spread_prompts(n, offset=3), range(VALIDATION_SEED_START, VALIDATION_SEED_START + n)))
