"""Inner products of consecutive output deltas per prompt: what the error-aware planner needs.

During calibration, per stream and prompt, with ``D_t = eps_t - eps_{t-1}`` (``t >= 1``)::

    gram[p, s, t, j] = <D_t, D_{t-j}>          for j = 0 .. horizon, t - j >= 1

(float64, NaN where not recorded). Every prediction TaoCache can make is ``eps_{t-1}`` plus a
multiple of a delta, so the error of any schedule, coefficient and refresh rule, and of the
sampler's sum over steps, is a quadratic form in these numbers (:mod:`taohooks.taocache.error_model`).
``horizon`` bounds how far back the products reach (and how many deltas calibration keeps in
memory): a chain of predictions spanning more steps than that cannot be estimated.

Prompts are kept one by one (they merge by concatenation, exactly), so that the spread of an
error over prompts can be reported as well as its mean.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["DeltaGram", "DEFAULT_HORIZON", "band_products"]

DEFAULT_HORIZON = 16


@dataclass(frozen=True)
class DeltaGram:
    """``gram [prompts, streams, steps, horizon + 1]`` (float64) and the output size per prompt of
    each stream (``numel``, elements), for mean squared errors."""

    gram: Tensor
    numel: Tuple[int, ...]

    @classmethod
    def empty(cls, streams: int, steps: int, horizon: int, numel: Sequence[int] = ()) -> "DeltaGram":
        return cls(torch.full((0, streams, steps, horizon + 1), float("nan"), dtype=torch.float64),
                   tuple(int(n) for n in numel) or (0,) * streams)

    @property
    def prompts(self) -> int:
        return self.gram.shape[0]

    @property
    def horizon(self) -> int:
        return self.gram.shape[3] - 1

    def merge(self, other: "DeltaGram") -> "DeltaGram":
        """Both sets of prompts; the common horizon (the shorter one) is kept."""
        if other.gram.shape[1:3] != self.gram.shape[1:3]:
            raise ValueError(f"cannot merge delta products of shape {tuple(other.gram.shape[1:3])} (streams, steps) "
                             f"into {tuple(self.gram.shape[1:3])}")
        numel = tuple(a or b for a, b in zip(self.numel, other.numel))
        if any(a and b and a != b for a, b in zip(self.numel, other.numel)):
            raise ValueError(f"cannot merge delta products of outputs of {other.numel} elements into {self.numel}")
        h = min(self.horizon, other.horizon) if self.prompts and other.prompts else max(self.horizon, other.horizon)
        parts = [g.gram[..., :h + 1] for g in (self, other) if g.prompts]
        gram = torch.cat(parts) if parts else self.gram[..., :h + 1]
        return DeltaGram(gram, numel)

    def products(self, stream: int) -> "BandProducts":
        """The products of one stream, for :mod:`taohooks.taocache.error_model`."""
        return BandProducts(self.gram[:, stream], self.numel[stream])


@dataclass(frozen=True)
class BandProducts:
    """``gram [prompts, steps, horizon + 1]`` of one stream; ``inner(i, j)`` is ``<D_i, D_j>`` per prompt."""

    gram: Tensor
    numel: int

    @property
    def horizon(self) -> int:
        return self.gram.shape[2] - 1

    def inner(self, i: int, j: int) -> Tensor:
        """``<D_i, D_j>`` per prompt ``[prompts]`` (NaN where not recorded or beyond the horizon)."""
        if i < j:
            i, j = j, i
        if i - j > self.horizon or j < 1:
            return torch.full((self.gram.shape[0],), float("nan"), dtype=torch.float64)
        return self.gram[:, i, i - j]


def band_products(delta: List[Tensor], earlier: Sequence[Optional[List[Tensor]]],
                  batch_dim: Optional[int]) -> Tensor:
    """``[B, len(earlier) + 1]``: ``<D, D>`` then ``<D, E>`` for each earlier delta ``E`` (NaN where
    ``None``), per prompt. Leaves are float32 ``[B, ...]`` (or one prompt when ``batch_dim`` is None);
    the sums are taken in float64."""
    def flat(t: Tensor) -> Tensor:
        return t.reshape(1, -1) if batch_dim is None else t.reshape(t.shape[0], -1)

    out = []
    for other in [delta, *earlier]:
        if other is None or any(a.shape != b.shape for a, b in zip(delta, other)):
            out.append(None)
            continue
        acc = 0
        for a, b in zip(delta, other):
            acc = acc + (flat(a).to(torch.float64) * flat(b).to(torch.float64)).sum(dim=1)
        out.append(acc)
    b = next(o for o in out if o is not None).shape[0]
    return torch.stack([o if o is not None else torch.full((b,), float("nan"), dtype=torch.float64,
                                                              device=out[0].device) for o in out], dim=1)
