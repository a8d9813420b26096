"""TaoCache inference (Algorithm 1, lines 22-37) as a callback.

On a skip step ``t``, per stream::

    D_t   = C_ratio[t] * D_{t-1}
    eps_t = eps_{t-1} + D_t

where ``eps_{t-1}`` and ``D_{t-1}`` are the last output and delta *used* (real or predicted).
On a computed step whose output feeds a later prediction (the two steps before a skip, and
refresh steps inside the window) the delta is taken against the last output used. The math
runs in float32; the prediction goes back in the model's dtype, device and output structure.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch import Tensor

from . import messages
from .callbacks import Callback
from .calibration import float32_leaves
from .plan import SkipPlan
from .structure import OutputStructure, flatten_output, join_batch, split_batch

__all__ = ["TaoCacheCallback"]


class _StreamState:
    __slots__ = ("eps", "delta", "step", "structure")

    def __init__(self):
        self.eps: Optional[List[Tensor]] = None    # last output used, float32 leaves
        self.delta: Optional[List[Tensor]] = None  # last delta used
        self.step = -1                             # step of ``eps``
        self.structure: Optional[OutputStructure] = None


class TaoCacheCallback(Callback):
    """Answers the skip steps of a :class:`SkipPlan` with the extrapolated output.

    Args:
        plan: what to skip, with the ratio per stream and step.
        expected_timesteps: timesteps seen at calibration (``[steps]``, NaN where unknown); if a
            skipped call's timestep differs, a warning says the LUT may not fit this sampler.
    """

    def __init__(self, plan: SkipPlan, expected_timesteps: Optional[Tensor] = None):
        self.plan = plan
        self.expected_timesteps = expected_timesteps
        self.fallbacks = 0
        self._warned: set = set()
        self._states: Dict[str, _StreamState] = {}

    def on_attach(self, hook) -> None:
        if hook.loop.steps != self.plan.steps or tuple(hook.loop.streams) != tuple(self.plan.streams):
            raise ValueError(f"taohooks: the plan is for {self.plan.steps} steps and streams "
                             f"{', '.join(self.plan.streams)}, the hook declares {hook.loop.describe()}")
        self.fallbacks = 0

    def on_sample_start(self, hook, sample: int) -> None:
        self._states = {s: _StreamState() for s in hook.loop.streams}

    def on_sample_abort(self, hook, sample: int, reason: str) -> None:
        self._states = {}

    def on_detach(self, hook) -> None:
        self._states = {}

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            messages.warning(message)

    # ------------------------------------------------------------------ skip steps
    def on_before_call(self, hook, call, args, kwargs):
        step = call.step
        if not self.plan.is_skip(step):
            return None
        predictions = []
        for name in call.streams:
            state = self._states[name]
            if state.eps is None or state.delta is None or state.step != step - 1:
                self._fallback(call, f"no history of the two previous outputs of stream {name!r}")
                return None
            r = self.plan.ratio(name, step)
            delta = [r * d for d in state.delta]
            predictions.append(([e + d for e, d in zip(state.eps, delta)], delta))
        if not all(bool(torch.isfinite(t).all()) for eps, _ in predictions for t in eps):
            self._fallback(call, "the prediction is not finite")
            return None
        self._check_timestep(call)
        for name, (eps, delta) in zip(call.streams, predictions):
            state = self._states[name]
            state.eps, state.delta, state.step = eps, delta, step
        structure = self._states[call.streams[0]].structure
        leaves = join_batch([eps for eps, _ in predictions]) if hook.loop.split_batch else predictions[0][0]
        return structure.rebuild(leaves)

    def _fallback(self, call, why: str) -> None:
        self.fallbacks += 1
        self._warn_once("fallback", f"taohooks: TaoCache computed step {call.step} instead of skipping it: {why} "
                                    "(counted in summary().fallbacks; warned once)")

    def _check_timestep(self, call) -> None:
        expected = self.expected_timesteps
        if expected is None or "timestep" in self._warned:
            return
        seen, want = call.timestep, float(expected[call.step])
        if seen is None or math.isnan(want):
            return
        if abs(seen - want) > 1e-3 * max(1.0, abs(want)):
            self._warn_once("timestep", f"taohooks: step {call.step} runs at timestep {seen:g}, the LUT was "
                                        f"calibrated at {want:g}; the sampler (shift, schedule) may differ from "
                                        "calibration and the ratios may not fit")

    # ------------------------------------------------------------------ computed steps
    def on_after_call(self, hook, call, output) -> None:
        if call.substituted_by is self:
            return
        if not (self.plan.needs_output(call.step) or self.plan.is_skip(call.step)):
            return
        leaves, structure = flatten_output(output)
        leaves = float32_leaves(leaves)
        parts = split_batch(leaves, len(call.streams)) if hook.loop.split_batch else [leaves]
        for name, eps in zip(call.streams, parts):
            state = self._states[name]
            continuous = state.eps is not None and state.step == call.step - 1
            state.delta = [a - b for a, b in zip(eps, state.eps)] if continuous else None
            state.eps, state.step, state.structure = eps, call.step, structure
