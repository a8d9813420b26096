"""TaoCache inference (Algorithm 1, lines 22-37) as a callback.

On a skip step ``t``, per stream::

    D_t   = C_ratio[t] * D_{t-1}
    eps_t = eps_{t-1} + D_t

where ``eps_{t-1}`` and ``D_{t-1}`` are the last output and delta *used* (real or predicted).
On a computed step whose output feeds a later prediction (the two steps before a skip, and
refresh steps inside the window) the delta is taken against the last output used. The math
runs in float32; the prediction goes back in the model's dtype, device and output structure.

A prediction is used only if it is sane where the sampler gets it: finite after the cast to the
model's dtype, and, per stream, of norm at most ``max_norm_ratio`` times the norm of that
stream's last real output. Otherwise the model runs (a *fallback*, counted with its reason).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch import Tensor

from ..runtime import messages
from ..runtime.callbacks import Callback
from ..runtime.structure import float32_leaves
from .calibration import shape_change
from ..runtime.hook import timesteps_match
from .plan import SkipPlan
from ..runtime.structure import OutputStructure, flatten_output, join_batch, split_batch

__all__ = ["TaoCacheCallback", "DEFAULT_MAX_NORM_RATIO"]

DEFAULT_MAX_NORM_RATIO = 10.0


def input_shape(args: tuple, kwargs: dict) -> Optional[tuple]:
    """The shape of a call's first tensor argument (the latent, or the timestep where the latent is a list)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return tuple(value.shape)
    return None


def _norm(leaves: List[Tensor]) -> Tensor:
    """L2 norm over all leaves (float32, on the first leaf's device; no synchronisation)."""
    if len(leaves) == 1:
        return torch.linalg.vector_norm(leaves[0])
    device = leaves[0].device
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t).to(device) for t in leaves]))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class _StreamState:
    __slots__ = ("eps", "delta", "step", "structure", "real_norm")

    def __init__(self):
        self.eps: Optional[List[Tensor]] = None    # last output used, float32 leaves
        self.delta: Optional[List[Tensor]] = None  # last delta used
        self.step = -1                             # step of ``eps``
        self.structure: Optional[OutputStructure] = None
        self.real_norm: Optional[Tensor] = None    # norm of the last real output that precedes a skip


class TaoCacheCallback(Callback):
    """Answers the skip steps of a :class:`SkipPlan` with the extrapolated output.

    Args:
        plan: what to skip, with the ratio per stream and step.
        expected_timesteps: timesteps seen at calibration (``[steps]``, NaN where unknown); if a
            skipped call's timestep differs, a warning says the LUT may not fit this sampler; a
            generation whose first timestep is the LUT's timestep of a later step is out of line
            with the loop, and computes every step (counted in ``misaligned_generations``).
        max_norm_ratio: a prediction whose norm exceeds this many times the norm of its stream's
            last real output is not used (``None``: no norm guard). Outputs of a sane denoiser
            keep their scale between steps; 10x is far outside any normal trajectory.
        expert_boundary: the timestep below which the loop runs another model (Wan2.2's low-noise expert):
            the first two steps after the calls' timesteps fall below it are computed, whatever the plan
            (``"expert switch"`` fallbacks; the plan is checked against the LUT's timesteps before the run,
            but a run without a LUT, or of another shift, switches where only its calls tell).

    ``fallbacks`` counts skip calls that ran the model instead, ``fallback_reasons`` the same per
    reason (``"no history"``, ``"not finite in float16"``, ``"norm > 10 x last real output"``, ``"out of line"``:
    a generation that began where the previous one should have ended, :meth:`DenoiserHook.in_line`).
    """

    def __init__(self, plan: SkipPlan, expected_timesteps: Optional[Tensor] = None,
                 max_norm_ratio: Optional[float] = DEFAULT_MAX_NORM_RATIO, expert_boundary: Optional[float] = None):
        if max_norm_ratio is not None:
            if isinstance(max_norm_ratio, bool) or not isinstance(max_norm_ratio, (int, float)) \
                    or not math.isfinite(max_norm_ratio) or max_norm_ratio < 1:
                raise ValueError(f"taohooks: TaoCacheCallback max_norm_ratio must be a finite number >= 1 "
                                 f"or None (no norm guard), got {max_norm_ratio!r}")
            max_norm_ratio = float(max_norm_ratio)
        self.plan = plan
        self.expected_timesteps = expected_timesteps
        self.max_norm_ratio = max_norm_ratio
        self.expert_boundary = None if expert_boundary is None else float(expert_boundary)
        self._above_boundary = False  # this generation has run a call at a timestep >= expert_boundary
        self._switch_step: Optional[int] = None  # its first step below it, after one above
        self.fallbacks = 0
        self.fallback_reasons: Dict[str, int] = {}
        self.misaligned_generations = 0
        self._aligned = True  # the current generation starts where the LUT starts (or cannot tell)
        self._warned: set = set()
        self._states: Dict[str, _StreamState] = {}
        self._inputs: Dict[tuple, Optional[tuple]] = {}  # streams of a call -> its first tensor argument's shape

    def on_attach(self, hook) -> None:
        if hook.loop.steps != self.plan.steps or tuple(hook.loop.streams) != tuple(self.plan.streams):
            raise ValueError(f"taohooks: the plan is for {self.plan.steps} steps and streams "
                             f"{', '.join(self.plan.streams)}, the hook declares {hook.loop.describe()}")
        self.fallbacks = 0
        self.fallback_reasons = {}
        self.misaligned_generations = 0

    def on_sample_start(self, hook, sample: int) -> None:
        self._states = {s: _StreamState() for s in hook.loop.streams}
        self._inputs = {}
        self._aligned = True
        self._above_boundary, self._switch_step = False, None

    def on_sample_abort(self, hook, sample: int, reason: str) -> None:
        self._states = {}

    def on_sample_end(self, hook, sample: int) -> None:
        # drop the outputs kept for predictions: an offloading script (Wan2.2's --offload_model) moves the
        # model off the device after the loop, and nothing should stay there on its behalf
        self._states = {}

    def on_detach(self, hook) -> None:
        self._states = {}

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            messages.warning(message)

    # ------------------------------------------------------------------ skip steps
    def on_before_call(self, hook, call, args, kwargs):
        if call.index == 0 and self.expected_timesteps is not None:
            self._check_start(hook, call)
        step = call.step
        if self.expert_boundary is not None and call.timestep is not None:
            if call.timestep >= self.expert_boundary:
                self._above_boundary = True
            elif self._above_boundary and self._switch_step is None:
                self._switch_step = step
        shape, key = input_shape(args, kwargs), tuple(call.streams)
        before = self._inputs.get(key, shape)
        self._inputs[key] = shape
        if not self.plan.is_skip(step) or not self._aligned:
            return None
        if shape != before:  # (a loop that changes its batch: the outputs kept are of the other one)
            self._fallback(call, "input shape changed",
                           f"the call's first tensor argument has shape {list(shape or ())}, at the stream's call "
                           f"before {list(before or ())}; the outputs TaoCache predicts from are of that shape")
            return None
        if self._switch_step is not None and step - self._switch_step in (0, 1):
            self._fallback(call, "expert switch", f"it is one of the first two steps after the expert switch (step "
                                                  f"{self._switch_step}, the first below timestep "
                                                  f"{self.expert_boundary:g}), whose outputs' deltas would span two "
                                                  "networks")
            return None
        predictions = []
        for name in call.streams:
            state = self._states[name]
            if state.eps is None or state.delta is None or state.step != step - 1:
                self._fallback(call, "no history", f"no history of the two previous outputs of stream {name!r}")
                return None
            r = self.plan.ratio(name, step)
            delta = [r * d for d in state.delta]
            predictions.append(([e + d for e, d in zip(state.eps, delta)], delta))
        out_of_line = not hook.in_line(call)
        if not out_of_line and self._begins_a_generation(call):  # the rest of this numbered generation is another
            out_of_line, self._aligned = True, False  # one's: computed (not predicted across the two generations)
        if out_of_line:
            self._fallback(call, "out of line", "the call is not where the loop's reference generation had it")
            return None
        structure = self._states[call.streams[0]].structure
        leaves = join_batch([eps for eps, _ in predictions]) if hook.loop.split_batch else predictions[0][0]
        # what the sampler gets: never the tensors kept as history (a float32 cast is no copy, and a loop may
        # change its model output in place)
        kept = {id(t) for eps, _ in predictions for t in eps}
        cast = [t.clone() if id(t) in kept else t for t in structure.cast(leaves)]
        if not self._sane(call, cast, predictions):
            return None
        self._check_timestep(call)
        for name, (eps, delta) in zip(call.streams, predictions):
            state = self._states[name]
            state.eps, state.delta, state.step = eps, delta, step
        return structure.rebuild(cast)

    def _sane(self, call, cast: List[Tensor], predictions) -> bool:
        """Finite after the cast, and within the norm guard; one synchronisation for all checks."""
        checks = [torch.isfinite(t).all() for t in cast]
        guarded = self.max_norm_ratio is not None
        if guarded:
            names = [n for n in call.streams if self._states[n].real_norm is not None]
            eps_of = dict(zip(call.streams, (eps for eps, _ in predictions)))
            checks += [_norm(eps_of[n]) for n in names] + [self._states[n].real_norm for n in names]
        device = checks[0].device
        values = torch.stack([c.to(device=device, dtype=torch.float32) for c in checks]).tolist()
        for t, finite in zip(cast, values):
            if not finite:
                dtype = _dtype_name(t.dtype)
                self._fallback(call, f"not finite in {dtype}", f"the prediction is not finite in {dtype}")
                return False
        if guarded:
            k = len(names)
            for name, norm, real in zip(names, values[len(cast):len(cast) + k], values[len(cast) + k:]):
                if not norm <= self.max_norm_ratio * real:
                    limit = f"{self.max_norm_ratio:g}"
                    self._fallback(call, f"norm > {limit} x last real output",
                                   f"the prediction's norm {norm:.3g} exceeds {limit} x the norm of the last "
                                   f"real output ({real:.3g}) of stream {name!r}")
                    return False
        return True

    def _fallback(self, call, reason: str, detail: str) -> None:
        self.fallbacks += 1
        self.fallback_reasons[reason] = self.fallback_reasons.get(reason, 0) + 1
        self._warn_once(f"fallback: {reason}",
                        f"taohooks: TaoCache computed step {call.step} instead of skipping it: {detail} "
                        "(a fallback, counted in fallback_reasons; warned once per reason)")

    def _check_timestep(self, call) -> None:
        expected = self.expected_timesteps
        if expected is None or "timestep" in self._warned:
            return
        seen, want = call.timestep, float(expected[call.step])
        if math.isnan(want):
            return
        if seen is None:  # (said for calibration and repeat=True; a skipping run said nothing)
            self._warn_once("timestep", "taohooks: the hook cannot read the timestep of the model's calls, so this "
                                        "run's timesteps cannot be checked against the LUT's (a sampler, shift or "
                                        "schedule other than calibration's would go unnoticed). Give timestep_arg= "
                                        "(the keyword or the position of the timestep in the call)")
            return
        if not timesteps_match(seen, want):
            self._warn_once("timestep", f"taohooks: step {call.step} runs at timestep {seen:g}, the LUT was "
                                        f"calibrated at {want:g}; the sampler (shift, schedule) may differ from "
                                        "calibration and the ratios may not fit")

    def _begins_a_generation(self, call) -> bool:
        """A skipped call (not the first) at the LUT's first timestep and not at its own: the first call of
        a new generation, numbered as a later one because the generation before made fewer calls than
        declared (what :meth:`DenoiserHook.in_line` cannot tell inside the hook's first generation)."""
        expected = self.expected_timesteps
        if expected is None or call.step == 0:
            return False
        first, want, seen = float(expected[0]), float(expected[call.step]), call.timestep
        return (seen is not None and not math.isnan(first) and timesteps_match(seen, first)
                and not (not math.isnan(want) and timesteps_match(seen, want)))

    def _check_start(self, hook, call) -> None:
        """A generation whose first call runs at the LUT's timestep of a later step is out of line."""
        expected = self.expected_timesteps
        seen, first = call.timestep, float(expected[0])
        if seen is None or math.isnan(first) or timesteps_match(seen, first):
            return
        later = [k for k in range(1, len(expected)) if not math.isnan(float(expected[k]))
                 and timesteps_match(seen, float(expected[k]))]
        if not later:
            return  # another schedule altogether: _check_timestep says so on the skipped steps
        self._aligned = False
        self.misaligned_generations += 1
        messages.warning(
            f"taohooks: generation {hook.label(call.sample)} begins at timestep {seen:g}, the LUT's timestep at step "
            f"{later[0]}, not at its first timestep {first:g}: the loop is {later[0]} step(s) out of line "
            f"(the previous generation made more or fewer calls than declared ({hook.loop.describe()}), or this "
            "one runs another schedule); "
            "this generation computes every step")

    # ------------------------------------------------------------------ computed steps
    def on_after_call(self, hook, call, output) -> None:
        if call.substituted_by is self:
            return
        if not (self.plan.needs_output(call.step) or self.plan.is_skip(call.step)):
            return
        leaves, structure = flatten_output(output)
        leaves = float32_leaves(leaves)
        parts = split_batch(leaves, len(call.streams)) if hook.loop.split_batch else [leaves]
        guard = self.max_norm_ratio is not None and self.plan.is_skip(call.step + 1)
        for name, eps in zip(call.streams, parts):
            state = self._states[name]
            continuous = state.eps is not None and state.step == call.step - 1
            changed = shape_change(state.eps, eps) if continuous else None
            if changed:  # no delta between outputs of different shapes: the next skip computes instead
                continuous = False
                self._warn_once("shape", f"stream {name!r}, step {call.step}: {changed}; TaoCache "
                                         "extrapolates only between outputs of one shape (warned once)")
            state.delta = [a - b for a, b in zip(eps, state.eps)] if continuous else None
            state.eps, state.step, state.structure = eps, call.step, structure
            if guard:
                state.real_norm = _norm(eps)
