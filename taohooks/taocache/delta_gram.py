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

With exactly two streams (classifier-free guidance's ``cond`` and ``uncond``) calibration also keeps the
products *between* them, the band of the cross Gram matrix::

    cross[p, t, horizon + j] = <D^0_t, D^1_{t-j}>   for j = -horizon .. horizon

(``D^0`` the LUT's first stream's deltas, ``D^1`` the second's). The guided output ``u + s (c - u)`` has the error
``s e_c - (s - 1) e_u``, whose squared norm needs them (``plan.guidance_scale``). A prompt calibrated without them
(an earlier taohooks) has a row of NaN.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["DeltaGram", "DEFAULT_HORIZON", "DeltaRing", "flatten_per_prompt", "cross_band_to_dense",
           "cross_dense_to_band"]

DEFAULT_HORIZON = 16


@dataclass(frozen=True)
class DeltaGram:
    """``gram [prompts, streams, steps, horizon + 1]`` (float64), the output size per prompt of
    each stream (``numel``, elements), for mean squared errors, and with two streams the products between them
    (``cross [prompts, steps, 2 horizon + 1]``, float64, or None: none recorded for any prompt)."""

    gram: Tensor
    numel: Tuple[int, ...]
    cross: Optional[Tensor] = None

    @classmethod
    def empty(cls, streams: int, steps: int, horizon: int, numel: Sequence[int] = ()) -> "DeltaGram":
        return cls(torch.full((0, streams, steps, horizon + 1), float("nan"), dtype=torch.float64),
                   tuple(int(n) for n in numel) or (0,) * streams)

    def cross_or_nan(self) -> Tensor:
        """``cross``, NaN for every prompt where none was recorded."""
        if self.cross is not None:
            return self.cross
        p, t = self.gram.shape[0], self.gram.shape[2]
        return torch.full((p, t, 2 * self.horizon + 1), float("nan"), dtype=torch.float64)

    @property
    def cross_prompts(self) -> Tensor:
        """``[prompts]`` bool: the prompts whose cross-stream products were recorded."""
        if self.cross is None:
            return torch.zeros(self.prompts, dtype=torch.bool)
        return ~self.cross.isnan().all(dim=2).all(dim=1)

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
            raise ValueError(f"outputs of {', '.join(map(str, other.numel))} elements per stream against "
                             f"{', '.join(map(str, self.numel))}: another resolution or frame count")
        given = [g for g in (self, other) if g.prompts]  # (an empty side's horizon says nothing: review)
        h = min(g.horizon for g in given) if given else max(self.horizon, other.horizon)
        parts = [g.gram[..., :h + 1] for g in (self, other) if g.prompts]
        gram = torch.cat(parts) if parts else self.gram[..., :h + 1]
        cross = None
        if self.cross is not None or other.cross is not None:
            bands = [g.cross_or_nan()[..., g.horizon - h:g.horizon + h + 1] for g in (self, other) if g.prompts]
            cross = torch.cat(bands) if bands else None
        return DeltaGram(gram, numel, cross)

    def cross_dense(self) -> Tensor:
        """``[prompts, steps, steps]`` ``<D^0_i, D^1_j>`` (NaN beyond the horizon, or where not recorded)."""
        return cross_band_to_dense(self.cross_or_nan())


def _band_positions(steps: int, horizon: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Every position of a cross band inside the loop: rows ``i``, columns ``k = i - j`` of the dense matrix and the
    band's lag columns ``horizon + j``, for ``j = -horizon .. horizon`` with ``0 <= k < steps``."""
    i = torch.arange(steps)[:, None]
    j = torch.arange(-horizon, horizon + 1)[None, :]
    k = i - j
    inside = (k >= 0) & (k < steps)
    return i.expand_as(k)[inside], k[inside], (j + horizon).expand_as(k)[inside]


def cross_band_to_dense(band: Tensor) -> Tensor:
    """``[prompts, steps, 2 horizon + 1]`` band -> ``[prompts, steps, steps]`` (NaN outside the band)."""
    p, t, width = band.shape
    rows, cols, lags = _band_positions(t, (width - 1) // 2)
    dense = torch.full((p, t, t), float("nan"), dtype=band.dtype)
    dense[:, rows, cols] = band[:, rows, lags]
    return dense


def cross_dense_to_band(dense: Tensor, horizon: int) -> Tensor:
    """``[prompts, steps, steps]`` -> its band ``[prompts, steps, 2 horizon + 1]`` (NaN beyond the loop)."""
    p, t, _ = dense.shape
    rows, cols, lags = _band_positions(t, horizon)
    band = torch.full((p, t, 2 * horizon + 1), float("nan"), dtype=dense.dtype)
    band[:, rows, lags] = dense[:, rows, cols]
    return band

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


class DeltaRing:
    """The last ``keep`` (default ``horizon``) deltas of one stream, each flattened per prompt (``[B, n]``,
    float32), in a ring buffer: :meth:`products` returns ``<D, D>`` and ``<D, D_{t-j}>`` for ``j = 1..horizon``
    per prompt (float64 sums: the error model subtracts these products from each other, and float32 sums left
    rounding errors larger than the errors of a good extrapolation; NaN where fewer deltas were kept) and keeps
    ``D``; :meth:`against` gives another stream's delta's products with the kept ones (the cross-stream band,
    which needs ``keep = horizon + 1``: the other stream may be a step ahead). Memory: ``keep`` output-sized
    float32 tensors, and one float64 one while it computes."""

    def __init__(self, horizon: int, keep: Optional[int] = None):
        self.horizon = horizon
        self.keep = max(horizon, keep or horizon)
        self.clear()

    def clear(self) -> None:
        self._ring: Optional[Tensor] = None
        self._steps: List[int] = [-1] * self.keep
        self._count = 0
        self._pos = 0

    def products(self, delta: Tensor, step: int = -1) -> Tensor:
        """``delta [B, n]`` float32 (of step ``step``) -> ``[B, horizon + 1]`` float64."""
        b = delta.shape[0]
        h, k = self.horizon, self.keep
        if self._ring is None or self._ring.shape[1:] != delta.shape or self._ring.device != delta.device:
            self._ring = torch.empty((k, *delta.shape), dtype=delta.dtype, device=delta.device)
            self._count = self._pos = 0
        out = torch.full((b, h + 1), float("nan"), dtype=torch.float64, device=delta.device)
        wide = delta.double()
        out[:, 0] = torch.einsum("bn,bn->b", wide, wide)
        for lag in range(1, min(self._count, h) + 1):  # one slot at a time: a float64 copy of the ring is k outputs
            out[:, lag] = torch.einsum("bn,bn->b", wide, self._ring[(self._pos - lag) % k].double())
        self._ring[self._pos].copy_(delta)
        self._steps[self._pos] = step
        self._pos = (self._pos + 1) % k
        self._count = min(self._count + 1, k)
        return out

    def against(self, delta: Tensor) -> List[Tuple[int, Tensor]]:
        """``(step, <delta, D_step>)`` per kept delta (``[B]`` float64 each); ``delta [B, n]`` float32 of the
        same shape as this ring's (another stream's delta), else nothing."""
        if self._ring is None or self._ring.shape[1:] != delta.shape or self._ring.device != delta.device:
            return []
        wide = delta.double()
        return [(self._steps[(self._pos - lag) % self.keep],
                 torch.einsum("bn,bn->b", wide, self._ring[(self._pos - lag) % self.keep].double()))
                for lag in range(1, self._count + 1)]


def flatten_per_prompt(leaves: List[Tensor], batch_dim: Optional[int]) -> Tensor:
    """``[B, n]``: every leaf of a call's output (``[B, ...]``, or one prompt when ``batch_dim`` is
    None) flattened and joined per prompt."""
    if batch_dim is None:
        return torch.cat([t.reshape(-1) for t in leaves]).reshape(1, -1)
    return torch.cat([t.reshape(t.shape[0], -1) for t in leaves], dim=1)
