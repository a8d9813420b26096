"""Resetting state that lives inside the model (another library's PAB counters and caches).

Whole skipped calls do not advance per-call state such as VideoSys' PAB block counters or
diffusers' PAB hook iterations, and attention outputs cached before a skip are stale after
it. :class:`StateReset` calls a reset function at the start of every generation, before the
first call of every step that resumes computing after TaoCache skipped (the refresh steps and
the step after the window; ``SkipPlan.resume_steps``), before any call that follows a call
another callback answered (a skip whose neighbour fell back to a real call resumes computing
too), and on detach.
"""
from __future__ import annotations

from typing import Callable, FrozenSet, Iterable, Optional

from .callbacks import Callback

__all__ = ["StateReset"]


class StateReset(Callback):
    """Calls ``reset()`` at generation start and on resume steps.

    Args:
        reset: the function that clears the state.
        steps: the steps to reset on; ``None`` takes the attached TaoCache plan's resume steps.
    """

    def __init__(self, reset: Callable[[], None], steps: Optional[Iterable[int]] = None):
        self.reset = reset
        self.steps: Optional[FrozenSet[int]] = None if steps is None else frozenset(int(s) for s in steps)
        self.resets = 0
        self._active: FrozenSet[int] = frozenset()
        self._last_step: Optional[int] = None
        self._answered = False  # the last call was answered by another callback

    def on_attach(self, hook) -> None:
        from ..taocache.extrapolation import TaoCacheCallback

        if self.steps is not None:
            self._active = self.steps
        else:
            plans = [cb.plan for cb in hook.callbacks if isinstance(cb, TaoCacheCallback)]
            self._active = frozenset(plans[0].resume_steps) if plans else frozenset()

    def _do(self) -> None:
        self.reset()
        self.resets += 1

    def on_sample_start(self, hook, sample: int) -> None:
        self._last_step, self._answered = None, False
        self._do()

    def on_detach(self, hook) -> None:
        self._do()  # the model's own state is left in phase for runs without taohooks

    def on_before_call(self, hook, call, args, kwargs):
        first = call.step != self._last_step  # the first call of a step
        self._last_step = call.step
        if (first and call.step in self._active) or self._answered:
            self._answered = False
            self._do()
        return None

    def on_after_call(self, hook, call, output) -> None:
        if not call.computed:
            self._answered = True
