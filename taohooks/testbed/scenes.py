"""Procedural scenes: 1-3 moving objects over a textured background, ``[3, 8, 32, 32]`` in ``[-1, 1]``.

The second testbed task (issue 15). Unlike ``data`` (one object on a plain background, its
layout nearly fixed by the prompt), the seed decides most of the clip: where each object is,
its size, exact hue, speed, the other objects' colours, shapes and motion, and the
background's texture (wave vectors, phase, tint, whether and how it moves). So many clips fit
one prompt, and the initial noise of a sampler picks one of them.

Prompt grammar (checked by ``scenes_recognizer``)::

    a <colour> <shape> moving <direction>[, with <1|2> other object[s]] over <background>

colour: 6 hue families (red, yellow, green, cyan, blue, magenta; hue jittered +-12 degrees),
shape: circle | square, direction: left | right | up | down, count: 1-3 objects in all (the
others have other hue families, all different), background: noise | stripes | gradient.
6 x 2 x 4 x 3 x 3 = 432 prompts. The subject is drawn last (on top); every object stays
inside the frame in every frame.

Seeds ``< 10_000`` are the training range; :func:`calibration_pairs` uses seeds ``1000+``,
:func:`eval_pairs` ``10_000+`` and :func:`validation_pairs` ``20_000+`` (as in ``data``).
"""

from __future__ import annotations

import colorsys
import itertools
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

COLOURS: Tuple[str, ...] = ("red", "yellow", "green", "cyan", "blue", "magenta")
HUES = np.arange(len(COLOURS)) * 60.0  # hue centre of each colour family, degrees
HUE_JITTER = 12.0  # degrees either side of the centre
DIRECTIONS: Tuple[str, ...] = ("left", "right", "up", "down")
SHAPES: Tuple[str, ...] = ("circle", "square")
COUNTS: Tuple[int, ...] = (1, 2, 3)
BACKGROUNDS: Tuple[str, ...] = ("noise", "stripes", "gradient")
DIRECTION_VECTORS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

NUM_FRAMES, HEIGHT, WIDTH, CHANNELS = 8, 32, 32, 3
CLIP_SHAPE = (CHANNELS, NUM_FRAMES, HEIGHT, WIDTH)
TRAIN_SEED_LIMIT = 10_000
CALIBRATION_SEED_START = 1000
EVAL_SEED_START = 10_000
VALIDATION_SEED_START = 20_000

#: ids per attribute, in :meth:`ScenePrompt.ids` order: colour, direction, shape, count, background.
ATTRIBUTE_SIZES = (len(COLOURS), len(DIRECTIONS), len(SHAPES), len(COUNTS), len(BACKGROUNDS))
NULL_ID = -1

#: Background level: grey in [BG_LOW, BG_HIGH] before the texture (amplitude BG_AMPLITUDE)
#: and a per-channel tint (+-BG_TINT). Its channel spread stays below 2 * BG_TINT.
BG_LOW, BG_HIGH, BG_AMPLITUDE, BG_TINT = -0.75, -0.35, (0.15, 0.3), 0.06
#: Objects: HSV saturation and value ranges (their channel spread is 2*s*v >= 1.2 in [-1, 1]).
SATURATION, VALUE = (0.75, 1.0), (0.8, 1.0)
SUBJECT_RADIUS, OTHER_RADIUS = (3.0, 6.0), (2.5, 5.0)  # half-sizes, pixels
SUBJECT_SPEED, OTHER_SPEED = (0.8, 2.0), (0.0, 1.5)  # pixels per frame
#: Layouts are redrawn (up to MAX_LAYOUT_TRIES times) until objects overlap by little enough that
#: each stays countable: centre distance >= MIN_SEPARATION x (sum of half-sizes) in every frame.
MIN_SEPARATION, MAX_LAYOUT_TRIES = 0.9, 100


@dataclass(frozen=True)
class ScenePrompt:
    """Attribute ids of a scene prompt; ``count`` is the number of objects (1-3)."""

    colour: int
    direction: int
    shape: int
    count: int = 1
    background: int = 0

    def __post_init__(self):
        for name, value, n in (("colour", self.colour, len(COLOURS)), ("direction", self.direction, len(DIRECTIONS)),
                               ("shape", self.shape, len(SHAPES)), ("background", self.background, len(BACKGROUNDS))):
            if not (isinstance(value, (int, np.integer)) and 0 <= value < n):
                raise ValueError(f"ScenePrompt.{name}: expected an id in 0..{n - 1}, got {value!r}")
        if self.count not in COUNTS:
            raise ValueError(f"ScenePrompt.count: expected one of {COUNTS}, got {self.count!r}")

    @property
    def text(self) -> str:
        """E.g. ``"a red circle moving left, with 2 other objects over stripes"``."""
        s = f"a {COLOURS[self.colour]} {SHAPES[self.shape]} moving {DIRECTIONS[self.direction]}"
        if self.count > 1:
            others = self.count - 1
            s += f", with {others} other object{'s' if others > 1 else ''}"
        return s + f" over {BACKGROUNDS[self.background]}"

    def ids(self) -> Tuple[int, int, int, int, int]:
        """``(colour, direction, shape, count - 1, background)``."""
        return (self.colour, self.direction, self.shape, self.count - 1, self.background)

    @classmethod
    def from_text(cls, text: str) -> "ScenePrompt":
        """Parse the format produced by :attr:`text`."""
        words = text.replace(",", " ").split()
        try:
            if words[0] != "a" or words[3] != "moving" or words[-2] != "over":
                raise ValueError
            colour, shape = COLOURS.index(words[1]), SHAPES.index(words[2])
            direction, background = DIRECTIONS.index(words[4]), BACKGROUNDS.index(words[-1])
            count = 1
            if len(words) == 11 and words[5] == "with" and words[7:9] in (["other", "objects"], ["other", "object"]):
                count = 1 + int(words[6])
            elif len(words) != 7:
                raise ValueError
            return cls(colour, direction, shape, count, background)
        except (IndexError, ValueError) as e:
            raise ValueError(f"cannot parse scene prompt {text!r}: expected "
                             "'a <colour> <shape> moving <direction>[, with N other objects] over <background>'") from e

    def __str__(self) -> str:
        return self.text


def all_prompts() -> List[ScenePrompt]:
    """All 432 prompts."""
    return [ScenePrompt(c, d, s, n, b) for c, d, s, n, b in itertools.product(
        range(len(COLOURS)), range(len(DIRECTIONS)), range(len(SHAPES)), COUNTS, range(len(BACKGROUNDS)))]


def prompt_ids(prompts: Sequence[Optional[ScenePrompt]]) -> np.ndarray:
    """``[B, 5]`` int64 ids; ``None`` entries become the null prompt (-1s)."""
    rows = [(NULL_ID,) * len(ATTRIBUTE_SIZES) if p is None else p.ids() for p in prompts]
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), len(ATTRIBUTE_SIZES))


def hue_rgb(hue_deg: float, saturation: float, value: float) -> np.ndarray:
    """HSV -> RGB in ``[-1, 1]``, float32 ``[3]``."""
    return np.asarray(colorsys.hsv_to_rgb((hue_deg % 360.0) / 360.0, saturation, value), np.float32) * 2 - 1


def _rng(prompt: ScenePrompt, seed: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *prompt.ids(), 0x5CE])


def _wave_vectors(rng, n: int, k_min: float, k_max: float) -> np.ndarray:
    """``n`` distinct integer wave vectors ``[n, 2]`` (cycles per frame width) with k_min <= |k| <= k_max."""
    r = int(k_max)
    cands = [(kx, ky) for kx in range(-r, r + 1) for ky in range(0, r + 1)
             if (ky > 0 or kx > 0) and k_min <= np.hypot(kx, ky) <= k_max]
    pick = rng.choice(len(cands), size=n, replace=False)
    return np.asarray([cands[i] for i in pick], np.float64)


@dataclass(frozen=True)
class BackgroundParams:
    """What the seed draws for a background (:func:`background_params`); :func:`texture` makes it.

    ``drift``: texture translation (vx, vy), pixels/frame (0 when still); ``waves`` ``[n, 2]`` integer wave
    vectors (cycles per frame width) with amplitudes and phases ``[n]`` (noise: 8-12 cosines, normalised to a
    peak of 1; stripes: one sine, ``square``: softly squared); gradient: direction ``theta [8]`` (radians, per
    frame) through ``centre`` (x, y); then ``grey = base + amp * texture`` plus a per-channel ``tint [3]``."""

    kind: int
    drift: Tuple[float, float]
    waves: np.ndarray = None
    wave_amps: np.ndarray = None
    phases: np.ndarray = None
    square: bool = False
    theta: np.ndarray = None
    centre: Tuple[float, float] = (0.0, 0.0)
    base: float = 0.0
    amp: float = 0.0
    tint: np.ndarray = None


def background_params(kind: int, rng: np.random.Generator) -> BackgroundParams:
    """The background's draws from ``rng``, in the order :func:`background` has always made them."""
    moving = rng.random() < 0.5
    speed = rng.uniform(0.5, 1.5) if moving else 0.0
    angle = rng.uniform(0, 2 * np.pi)
    p = {"kind": kind, "drift": (speed * np.cos(angle), speed * np.sin(angle))}
    name = BACKGROUNDS[kind]
    if name == "noise":  # 8-12 Fourier modes of comparable amplitude: no dominant wave
        n = int(rng.integers(8, 13))
        p["waves"] = _wave_vectors(rng, n, 1.5, 5.0)
        p["wave_amps"], p["phases"] = rng.uniform(0.5, 1.0, n), rng.uniform(0, 2 * np.pi, n)
    elif name == "stripes":  # one wave, sine or soft square
        p["waves"] = _wave_vectors(rng, 1, 2.5, 6.0)
        p["wave_amps"], p["phases"] = np.ones(1), np.asarray([rng.uniform(0, 2 * np.pi)])
        p["square"] = bool(rng.random() < 0.5)
    else:  # gradient: a linear ramp; moving ones turn by up to +-0.12 rad/frame
        f = np.arange(NUM_FRAMES, dtype=np.float64)
        p["theta"] = rng.uniform(0, 2 * np.pi) + (rng.uniform(-0.12, 0.12) if moving else 0.0) * f
        p["centre"] = tuple(rng.uniform(8, 24, 2))
    p["base"] = rng.uniform(BG_LOW, BG_HIGH)
    p["amp"] = rng.uniform(*BG_AMPLITUDE)
    p["tint"] = rng.uniform(-BG_TINT, BG_TINT, 3)
    return BackgroundParams(**p)


def texture(p: BackgroundParams) -> np.ndarray:
    """The background's grey texture in ``[-1, 1]``, float64 ``[8, 32, 32]``."""
    f = np.arange(NUM_FRAMES, dtype=np.float64)[:, None, None]
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
    vx, vy = p.drift
    x, y = xs[None] - vx * f, ys[None] - vy * f  # [F, H, W] texture coordinates
    name = BACKGROUNDS[p.kind]
    if name == "noise":
        t = sum(a * np.cos(2 * np.pi * (kx * x + ky * y) / WIDTH + ph)
                for (kx, ky), a, ph in zip(p.waves, p.wave_amps, p.phases))
        return t / np.abs(t).max()
    if name == "stripes":
        (kx, ky), = p.waves
        t = np.sin(2 * np.pi * (kx * x + ky * y) / WIDTH + p.phases[0])
        return np.tanh(3 * t) / np.tanh(3) if p.square else t
    cx, cy = p.centre
    theta = p.theta[:, None, None]
    return np.clip(((xs[None] - cx) * np.cos(theta) + (ys[None] - cy) * np.sin(theta)) / (WIDTH * 1.1), -1, 1)


def background(kind: int, rng: np.random.Generator) -> np.ndarray:
    """Textured background, float32 ``[3, 8, 32, 32]``; moves (translates or turns) half of the time."""
    p = background_params(kind, rng)
    grey = p.base + p.amp * np.broadcast_to(texture(p), (NUM_FRAMES, HEIGHT, WIDTH))
    return (grey[None] + p.tint[:, None, None, None]).astype(np.float32)


@dataclass(frozen=True)
class SceneObject:
    """One object's track: centres ``cx, cy [8]`` (pixels), half-size, colour family and RGB."""

    colour: int
    shape: int
    radius: float
    cx: np.ndarray
    cy: np.ndarray
    rgb: np.ndarray


def _track(rng, radius: float, vx: float, vy: float):
    """Centres ``[8]`` for a start drawn so that the shape stays inside the frame in every frame."""
    t = np.arange(NUM_FRAMES, dtype=np.float64)
    out = []
    for v, size in ((vx, WIDTH), (vy, HEIGHT)):
        lo, hi = radius - 0.5, size - 0.5 - radius
        travel = v * (NUM_FRAMES - 1)
        start = rng.uniform(lo - min(0.0, travel), hi - max(0.0, travel))
        out.append(start + v * t)
    return out


def _object(rng, colour: int, shape: int, radius_range, velocity) -> SceneObject:
    radius = rng.uniform(*radius_range)
    hue = HUES[colour] + rng.uniform(-HUE_JITTER, HUE_JITTER)
    rgb = hue_rgb(hue, rng.uniform(*SATURATION), rng.uniform(*VALUE))
    cx, cy = _track(rng, radius, *velocity)
    return SceneObject(colour, shape, radius, cx, cy, rgb)


def layout(prompt: ScenePrompt, seed: int):
    """The objects and the background rng of ``(prompt, seed)``: ``(objects, rng)``, subject last."""
    rng = _rng(prompt, seed)
    for _ in range(MAX_LAYOUT_TRIES):
        objects = _draw_objects(prompt, rng)
        if _separated(objects):
            break
    return objects, rng


def _separated(objects: Sequence[SceneObject]) -> bool:
    """True when no two objects' centres come closer than MIN_SEPARATION x (sum of half-sizes) in any frame."""
    for a, b in itertools.combinations(objects, 2):
        if np.min(np.hypot(a.cx - b.cx, a.cy - b.cy)) < MIN_SEPARATION * (a.radius + b.radius):
            return False
    return True


def _draw_objects(prompt: ScenePrompt, rng: np.random.Generator) -> List[SceneObject]:
    others = [c for c in range(len(COLOURS)) if c != prompt.colour]
    other_colours = rng.choice(others, size=prompt.count - 1, replace=False)
    objects = []
    for c in other_colours:
        speed = rng.uniform(*OTHER_SPEED)
        angle = rng.uniform(0, 2 * np.pi)
        objects.append(_object(rng, int(c), int(rng.integers(len(SHAPES))), OTHER_RADIUS,
                               (speed * np.cos(angle), speed * np.sin(angle))))
    dx, dy = DIRECTION_VECTORS[DIRECTIONS[prompt.direction]]
    speed = rng.uniform(*SUBJECT_SPEED)
    objects.append(_object(rng, prompt.colour, prompt.shape, SUBJECT_RADIUS, (dx * speed, dy * speed)))
    return objects


def render(prompt: ScenePrompt, seed: int) -> np.ndarray:
    """The clip of ``(prompt, seed)``: float32 ``[3, 8, 32, 32]`` in ``[-1, 1]``."""
    objects, rng = layout(prompt, seed)
    clip = background(prompt.background, rng)
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
    for obj in objects:
        for f in range(NUM_FRAMES):
            ddx, ddy = xs - obj.cx[f], ys - obj.cy[f]
            if SHAPES[obj.shape] == "circle":
                inside = ddx * ddx + ddy * ddy <= obj.radius * obj.radius
            else:
                inside = (np.abs(ddx) <= obj.radius) & (np.abs(ddy) <= obj.radius)
            clip[:, f][:, inside] = obj.rgb[:, None]
    return np.clip(clip, -1, 1)


def render_batch(prompts: Sequence[ScenePrompt], seeds: Sequence[int]) -> np.ndarray:
    """Float32 ``[B, 3, 8, 32, 32]``."""
    return np.stack([render(p, s) for p, s in zip(prompts, seeds)])


def random_prompt(rng: np.random.Generator, background_p=None) -> ScenePrompt:
    """A uniform random prompt; ``background_p``: the backgrounds' probabilities (in ``BACKGROUNDS`` order)
    instead of uniform ones."""
    # count and background are drawn before colour, direction and shape: the order in which the training runs
    # behind the shipped weights drew them (so that they resume and chain bit for bit)
    count = int(rng.integers(1, 4))
    background = int(rng.integers(len(BACKGROUNDS))) if background_p is None else \
        int(rng.choice(len(BACKGROUNDS), p=background_p))
    attributes = [int(rng.integers(n)) for n in ATTRIBUTE_SIZES[:3]]
    return ScenePrompt(*attributes, count=count, background=background)


def random_training_pairs(rng: np.random.Generator, batch_size: int, background_p=None):
    """Random prompts (:func:`random_prompt`) and training seeds (< 10_000): ``(prompts, seeds)``."""
    prompts = [random_prompt(rng, background_p) for _ in range(batch_size)]
    return prompts, [int(rng.integers(TRAIN_SEED_LIMIT)) for _ in range(batch_size)]



def _spread_prompts(n: int, offset: int) -> List[ScenePrompt]:
    """``n`` prompts stepping through all 432 with a stride coprime to 432 (every attribute varies)."""
    prompts = all_prompts()
    return [prompts[((i + offset) * 97) % len(prompts)] for i in range(n)]


def calibration_pairs(n: int = 20) -> List[Tuple[ScenePrompt, int]]:
    """``n`` pairs for cache calibration; seeds ``1000 .. 1000+n-1``."""
    return list(zip(_spread_prompts(n, 5), range(CALIBRATION_SEED_START, CALIBRATION_SEED_START + n)))


def eval_pairs(n: int = 64) -> List[Tuple[ScenePrompt, int]]:
    """``n`` held-out pairs (seeds ``>= 10_000``, never trained on): the reported figures."""
    return list(zip(_spread_prompts(n, 0), range(EVAL_SEED_START, EVAL_SEED_START + n)))


def validation_pairs(n: int = 64) -> List[Tuple[ScenePrompt, int]]:
    """``n`` held-out pairs for choosing checkpoints; seeds ``>= 20_000``."""
    return list(zip(_spread_prompts(n, 3), range(VALIDATION_SEED_START, VALIDATION_SEED_START + n)))
