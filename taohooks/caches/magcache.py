"""MagCache (Ma et al. 2025) as a callback, and the calibration of its magnitude-ratio table.

Residual = block-stack output - input. Calibration records, per call slot and step, the mean over
tokens of ``||r_t|| / ||r_{t-1}||`` (per-token norms over the hidden dimension). At run time, for
steps ``>= retention_ratio * steps``, per slot::

    acc_ratio *= ratio[slot, t];  acc_steps += 1;  acc_err += |1 - acc_ratio|
    acc_err < threshold and acc_steps <= max_skip_steps  ->  reuse the cached residual
    otherwise  ->  compute and reset (acc_ratio = 1, acc_err = 0, acc_steps = 0)
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .residual import BlockStackCache
from ..taocache.stats import RunningMoments

__all__ = ["MagCacheCallback", "MagCacheCalibrator", "ratio_table"]


def _nearest(src: List[float], count: int) -> List[float]:
    if count == 1:
        return [src[-1]]
    scale = (len(src) - 1) / (count - 1)  # the authors' float product, then round half to even (np.round)
    return [src[int(round(i * scale))] for i in range(count)]


def ratio_table(published: Sequence[float], steps: int) -> Tensor:
    """``[2, steps]`` (cond, uncond) ratios from a list published the way MagCache's authors publish
    them: cond and uncond interleaved, one value per call from the second step on (``2 * S - 2``
    values for ``S`` steps; the first step's pair is padded with 1.0). For another step count each
    half is resampled by nearest neighbour (``np.round(np.arange(T) * ((S - 1) / (T - 1)))``), as they do."""
    full = [1.0, 1.0] + list(published)
    cond, uncond = full[0::2], full[1::2]
    if len(cond) != steps:
        cond, uncond = _nearest(cond, steps), _nearest(uncond, steps)
    return torch.tensor([cond, uncond], dtype=torch.float64)


class _Budget:
    __slots__ = ("ratio", "error", "steps")

    def __init__(self):
        self.ratio, self.error, self.steps = 1.0, 0.0, 0


class MagCacheCallback(BlockStackCache):
    """MagCache on a hook. ``mag_ratios`` is ``[calls per step, steps]`` (slot = position of the
    call within its step: cond/uncond for two-call CFG, a single slot for batched CFG)."""

    def __init__(self, mag_ratios: Tensor, threshold: float = 0.12, max_skip_steps: int = 2,
                 retention_ratio: float = 0.2, *, blocks: Union[str, Sequence[str]] = "blocks", hidden_arg: int = 0,
                 exit: Optional[str] = None):
        super().__init__(blocks, hidden_arg, exit=exit)
        self.mag_ratios = torch.as_tensor(mag_ratios, dtype=torch.float64)
        self.threshold, self.max_skip_steps, self.retention_ratio = float(threshold), int(max_skip_steps), retention_ratio
        self._budgets: Dict[Tuple[str, ...], _Budget] = {}

    def on_attach(self, hook) -> None:
        want = (hook.loop.calls_per_step, hook.loop.steps)
        if tuple(self.mag_ratios.shape) != want:
            raise ValueError(f"taohooks: MagCache ratios have shape {tuple(self.mag_ratios.shape)}, the loop needs "
                             f"[calls per step, steps] = {list(want)}; calibrate for this loop")
        super().on_attach(hook)

    def drop_generation_state(self) -> None:
        super().drop_generation_state()
        self._budgets = {}

    def retained(self, call) -> bool:
        """Whether ``call`` is always computed (and leaves the accumulators alone): the first
        ``retention_ratio`` of the steps."""
        return call.step < int(self.hook.loop.steps * self.retention_ratio)

    def on_reuse_refused(self, call) -> None:
        """Nothing of this expert is cached yet: the call computes, and so it is a fresh reference."""
        budget = self._budgets.get(call.streams)
        if budget is not None:
            budget.ratio, budget.error, budget.steps = 1.0, 0.0, 0

    def decide(self, call, block, args, kwargs) -> bool:
        loop = self.hook.loop
        budget = self._budgets.setdefault(call.streams, _Budget())
        if self.retained(call):
            return False
        slot = call.index % loop.calls_per_step
        budget.ratio *= float(self.mag_ratios[slot, call.step])
        budget.steps += 1
        budget.error += abs(1.0 - budget.ratio)
        if budget.error < self.threshold and budget.steps <= self.max_skip_steps:
            return True
        budget.ratio, budget.error, budget.steps = 1.0, 0.0, 0
        return False


class MagCacheCalibrator(BlockStackCache):
    """Records the per-slot, per-step mean token-wise residual norm ratio over full-step runs."""

    def __init__(self, *, blocks: Union[str, Sequence[str]] = "blocks", hidden_arg: int = 0,
                 exit: Optional[str] = None):
        super().__init__(blocks, hidden_arg, exit=exit)
        self.moments: Optional[RunningMoments] = None
        self._previous: Dict[Tuple[str, ...], Tensor] = {}

    def on_attach(self, hook) -> None:
        super().on_attach(hook)
        if self.moments is None:
            self.moments = RunningMoments.zeros(hook.loop.calls_per_step, hook.loop.steps)

    def drop_generation_state(self) -> None:
        super().drop_generation_state()
        self._previous = {}

    def on_residual(self, call, residual: Tensor) -> None:
        norms = residual.norm(dim=-1)  # [B, N]
        previous = self._previous.get(call.streams)
        if previous is not None and previous.shape == norms.shape:
            ratio = (norms / previous.clamp(min=1e-12)).mean(dim=-1)  # one value per batch element
            self.moments.add((call.index % self.hook.loop.calls_per_step, call.step), ratio)
        self._previous[call.streams] = norms

    def ratios(self) -> Tensor:
        """``[calls per step, steps]`` mean ratios; 1.0 where none was recorded (the first step)."""
        mean = self.moments.mean
        return torch.where(torch.isnan(mean), torch.ones_like(mean), mean)
