"""Calibration (Algorithm 1, lines 1-20): record the statistics of consecutive output deltas.

During full-step generations, per stream and per prompt (batch element)::

    D_t     = eps_t - eps_{t-1}                          (t >= 1, in call order)
    c_t     = <D_t, D_{t-1}> / (||D_t|| ||D_{t-1}||)     (t >= 2)
    r_t     = ||D_t|| / ||D_{t-1}||

and accumulate mean and std of ``c_t`` and ``r_t`` over prompts into a :class:`CalibrationLUT`.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .callbacks import Callback
from .loop import LoopSpec
from .lut import CalibrationLUT
from .structure import flatten_output, split_batch

__all__ = ["CalibrationRecorder", "delta_statistics", "float32_leaves"]


def float32_leaves(leaves: List[Tensor]) -> List[Tensor]:
    """Detached float32 copies (never views of the model's output, which the loop may reuse)."""
    return [t.detach().to(torch.float32, copy=True) for t in leaves]


def _per_prompt(t: Tensor, batch_dim: Optional[int]) -> Tensor:
    return t.reshape(1, -1) if batch_dim is None else t.reshape(t.shape[0], -1)


def delta_statistics(delta: List[Tensor], delta_prev: List[Tensor],
                     batch_dim: Optional[int] = 0) -> Tuple[Tensor, Tensor]:
    """Cosine similarity and norm ratio ``||D_t|| / ||D_{t-1}||`` per prompt.

    ``delta`` and ``delta_prev`` are lists of float32 leaves of one stream; with ``batch_dim=0``
    every leaf is ``[B, ...]`` and the result is two ``[B]`` tensors, with ``None`` it is ``[1]``.
    All leaves of a prompt count together, as one vector.
    """
    dot = norm_sq = prev_sq = 0
    for d, p in zip(delta, delta_prev):
        d, p = _per_prompt(d, batch_dim), _per_prompt(p, batch_dim)
        dot = dot + (d * p).sum(dim=1)
        norm_sq = norm_sq + d.square().sum(dim=1)
        prev_sq = prev_sq + p.square().sum(dim=1)
    cos = (dot / (norm_sq * prev_sq).sqrt()).clamp(-1.0, 1.0)
    ratio = (norm_sq / prev_sq).sqrt()
    return cos, ratio


class _StreamHistory:
    __slots__ = ("eps", "delta")

    def __init__(self):
        self.eps: Optional[List[Tensor]] = None
        self.delta: Optional[List[Tensor]] = None


class CalibrationRecorder(Callback):
    """Records delta statistics on every call of full-step generations into a LUT.

    Each batch element of each stream counts as one prompt; a batched-CFG output is split into
    its declared stream halves first. Use :meth:`lut` (or :meth:`save`) once the calibration
    prompts have run. Recording continues across generations, and across ``attach``-es of the
    same recorder if the loop stays the same; ``resume`` continues an earlier LUT.
    """

    def __init__(self, model_id: Optional[str] = None, sampler: Optional[str] = None, *,
                 resume: Optional[CalibrationLUT] = None):
        self.model_id = model_id
        self.sampler = sampler
        self._lut: Optional[CalibrationLUT] = resume  # statistics to continue from
        self._loop: Optional[LoopSpec] = None
        self._history: Dict[str, _StreamHistory] = {}

    def on_attach(self, hook) -> None:
        loop = hook.loop
        if self._lut is None:
            self._lut = CalibrationLUT.empty(loop, self.model_id, self.sampler)
        else:
            self._lut.check(loop)
        self._loop = loop

    def on_sample_start(self, hook, sample: int) -> None:
        self._history = {s: _StreamHistory() for s in hook.loop.streams}

    def on_sample_abort(self, hook, sample: int, reason: str) -> None:
        self._history = {}

    def on_detach(self, hook) -> None:
        self._history = {}

    def on_after_call(self, hook, call, output) -> None:
        if not call.computed:
            raise RuntimeError(
                f"taohooks: calibration needs full-step generations, but call {call.index} (step {call.step}) "
                f"was answered by {type(call.substituted_by).__name__}; calibrate without caching")
        loop, lut = hook.loop, self._lut
        leaves, _ = flatten_output(output)
        leaves = float32_leaves(leaves)
        parts = split_batch(leaves, len(loop.streams)) if loop.split_batch else [leaves]
        step = call.step
        timestep = call.timestep if bool(lut.timesteps[step].isnan()) else None
        if timestep is not None:
            lut.timesteps[step] = timestep
        for name, eps in zip(call.streams, parts):
            history = self._history[name]
            s = lut.stream_index(name)
            if step == 0 and s == 0:
                lut.num_prompts += 1 if loop.batch_dim is None else int(eps[0].shape[0])
            if history.eps is not None:
                delta = [a - b for a, b in zip(eps, history.eps)]
                if history.delta is not None:
                    cos, ratio = delta_statistics(delta, history.delta, loop.batch_dim)
                    lut.cos.add((s, step), cos)
                    lut.ratio.add((s, step), ratio)
                history.delta = delta
            history.eps = eps

    def lut(self) -> CalibrationLUT:
        """The statistics recorded so far."""
        if self._lut is None:
            raise RuntimeError("taohooks: the recorder has not been attached to a model yet; nothing recorded")
        return self._lut

    def save(self, path) -> None:
        """Write the LUT recorded so far (atomically)."""
        self.lut().save(path)
