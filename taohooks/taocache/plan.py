"""Choosing the skip window (section 3.2, "max-cos with deviation penalty").

Given a budget of ``N`` skipped steps and a refresh (a real call) after every ``K`` skips, the
window is a contiguous span of ``N + floor((N - 1) / K)`` steps, and the automatic choice is

    W* = argmax_W  mean_{t in skips(W)} C_cos[t]  -  lambda * mean S_cos[t]  -  gamma * mean S_ratio[t]

over windows in the late regime (``t >= min_step`` and, if given, ``C_cos[t] >= tau_cos`` on
every step of the span). With several streams the tables are averaged over streams (and
``tau_cos`` holds for each), and every stream skips the same steps. A skip at step ``t`` needs
two outputs before it, so ``t >= 2``. Ties (scores within ``TIE_TOLERANCE`` of the best) go to the
latest window.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..runtime import messages

__all__ = ["SkipPlan", "PlanError", "COMPUTE", "SKIP", "REFRESH", "resolve_budget", "span_length",
           "window_actions", "search_window", "plan_from_window", "plan_from_steps", "no_skip_plan",
           "switch_guard", "check_unskippable"]

COMPUTE, SKIP, REFRESH = "compute", "skip", "refresh"
FIRST_SKIPPABLE = 2
TIE_TOLERANCE = 1e-6  # scores this close to the best count as ties (statistics are float32 measurements)


class PlanError(ValueError):
    """The requested skip plan is impossible (no window fits, a step without a ratio, ...)."""


@dataclass(frozen=True)
class SkipPlan:
    """What to do at every step: ``compute``, ``skip`` (with the ratio used) or ``refresh``.

    ``ratios[stream][t]`` is ``C_ratio`` used at skip step ``t`` (``None`` on other steps).
    ``window`` is the inclusive span ``(first, last)`` holding the skips and refreshes, if contiguous.
    """

    steps: int
    streams: Tuple[str, ...]
    actions: Tuple[str, ...]
    ratios: Dict[str, Tuple[Optional[float], ...]]
    window: Optional[Tuple[int, int]] = None
    score: Optional[float] = None
    source: str = "none"  # "none" | "max-cos" (the paper's search) | "error-aware" | "window" | "explicit"
    predicted_psnr: Optional[float] = field(default=None, compare=False)  # error-aware: its open-loop prediction, dB
    _skips: FrozenSet[int] = field(init=False, repr=False, compare=False)
    _remember: FrozenSet[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if len(self.actions) != self.steps:
            raise PlanError(f"plan has {len(self.actions)} actions for {self.steps} steps")
        skips = frozenset(t for t, a in enumerate(self.actions) if a == SKIP)
        if any(t < FIRST_SKIPPABLE for t in skips):
            raise PlanError(f"step {min(skips)} cannot be skipped: a skip needs two computed outputs before it "
                            f"(first skippable step is {FIRST_SKIPPABLE})")
        object.__setattr__(self, "_skips", skips)
        # Steps whose real output the cache must remember: the two before each skip.
        object.__setattr__(self, "_remember", frozenset(
            t for s in skips for t in (s - 2, s - 1) if t not in skips))

    def action(self, step: int) -> str:
        return self.actions[step]

    def is_skip(self, step: int) -> bool:
        return step in self._skips

    def needs_output(self, step: int) -> bool:
        """Whether the output of this (computed) step feeds a later prediction."""
        return step in self._remember

    def ratio(self, stream: str, step: int) -> float:
        return self.ratios[stream][step]

    @property
    def skipped_steps(self) -> Tuple[int, ...]:
        return tuple(sorted(self._skips))

    @property
    def refresh_steps(self) -> Tuple[int, ...]:
        return tuple(t for t, a in enumerate(self.actions) if a == REFRESH)

    @property
    def resume_steps(self) -> Tuple[int, ...]:
        """Computed steps that directly follow a skipped one (refreshes, the step after the window):
        where state kept inside calls (PAB's broadcast attention) is stale and must be reset."""
        return tuple(t for t in range(1, self.steps) if t - 1 in self._skips and t not in self._skips)

    @property
    def skipped_fraction(self) -> float:
        """Predicted fraction of denoiser calls saved (the same for every stream)."""
        return len(self._skips) / self.steps

    def describe(self) -> str:
        if not self._skips:
            return f"no skips ({self.steps} steps computed)"
        where = f"window {self.window[0]}-{self.window[1]}" if self.window else "steps " + ",".join(
            map(str, self.skipped_steps))
        refresh = f", refresh at {','.join(map(str, self.refresh_steps))}" if self.refresh_steps else ""
        score = f", score {self.score:.4f}" if self.score is not None else ""
        if self.predicted_psnr is not None and math.isfinite(self.predicted_psnr):
            score += f", predicted {self.predicted_psnr:.1f} dB (open loop)"
        return (f"{len(self._skips)} of {self.steps} steps skipped ({100 * self.skipped_fraction:.1f}% of calls), "
                f"{where}{refresh}{score} [{self.source}]")

    def table(self) -> str:
        lines = [f"{'step':>4}  {'action':<8} " + " ".join(f"{'ratio ' + s:>14}" for s in self.streams)]
        for t, a in enumerate(self.actions):
            ratios = " ".join(f"{self.ratios[s][t]:>14.4f}" if self.ratios[s][t] is not None else f"{'':>14}"
                              for s in self.streams)
            lines.append(f"{t:>4}  {a:<8} {ratios}")
        lines.append(self.describe())
        return "\n".join(lines)


# ---------------------------------------------------------------------- budget and windows
def fraction_skips(fraction: float, steps: int) -> int:
    """Steps of ``steps`` that a fraction names, rounded half up (0.29 x 50 is 14.4999... in floats: 15)."""
    return int(math.floor(fraction * steps + 0.5 + 1e-9))


def resolve_budget(budget: Union[int, float, None], steps: int) -> int:
    """Number of skipped steps for a budget given as a count (int) or a fraction of the steps (float < 1)."""
    if budget is None:
        return 0
    import numbers

    if isinstance(budget, numbers.Integral) and not isinstance(budget, bool):  # numpy's too
        budget = int(budget)
    elif isinstance(budget, numbers.Real):
        budget = float(budget)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise PlanError(f"budget must be a step count or a fraction of the steps, got {budget!r}")
    if isinstance(budget, float) and not budget.is_integer():
        if not 0.0 <= budget < 1.0:
            raise PlanError(f"a fractional budget must be in [0, 1), got {budget}")
        count = fraction_skips(budget, steps)
    else:
        count = int(budget)
    if not 0 <= count <= steps - FIRST_SKIPPABLE:
        given = f" ({budget:g} of {steps} steps)" if isinstance(budget, float) and not budget.is_integer() else ""
        raise PlanError(f"budget of {count} skipped steps{given} does not fit {steps} steps "
                        f"(at most {steps - FIRST_SKIPPABLE}: the first {FIRST_SKIPPABLE} are always computed)")
    return count


REFRESH_WIDTH = {"chain": 1, "restart": 2}  # plan.refresh: computed steps per refresh


def span_length(skips: int, refresh_every: Optional[int], refresh_width: int = 1) -> int:
    """Steps spanned by ``skips`` skips with a refresh (``refresh_width`` computed steps) after every
    ``refresh_every`` of them."""
    if skips <= 0:
        return 0
    return skips + ((skips - 1) // refresh_every * refresh_width if refresh_every else 0)


def window_actions(first: int, last: int, refresh_every: Optional[int], refresh_width: int = 1) -> Dict[int, str]:
    """Skips from ``first`` to ``last`` (inclusive), a refresh of ``refresh_width`` computed steps after
    every ``refresh_every`` skips. Width 1 (``plan.refresh: chain``, Algorithm 1): the next prediction
    extrapolates the delta between the refresh and the predicted output before it, so the drift carries
    on; width 2 (``restart``): it extrapolates two real outputs."""
    period = refresh_every + refresh_width if refresh_every else None
    return {t: (REFRESH if period and (t - first) % period >= refresh_every else SKIP)
            for t in range(first, last + 1)}


def _stream_mean(table: Tensor) -> Tensor:
    return table.to(torch.float64).mean(dim=0)


def search_window(cos_mean: Tensor, cos_std: Tensor, ratio_mean: Tensor, ratio_std: Tensor, skips: int, *,
                  refresh_every: Optional[int] = None, min_step: Optional[int] = None,
                  tau_cos: Optional[float] = None, lam: float = 1.0, gamma: float = 1.0,
                  unskippable: Sequence[int] = (), refresh_width: int = 1) -> Tuple[int, int, float]:
    """The best window ``(first, last, score)`` for ``skips`` skips; tables are ``[streams, steps]``.

    Steps without statistics (NaN) can neither be skipped nor lie inside a window; nor can the
    ``unskippable`` steps (the first two after an expert switch).
    """
    streams, steps = cos_mean.shape
    length = span_length(skips, refresh_every, refresh_width)
    lo = max(FIRST_SKIPPABLE, min_step if min_step is not None else (steps + 1) // 2)
    tables = torch.stack([cos_mean, cos_std, ratio_mean, ratio_std]).to(torch.float64)
    known = torch.isfinite(tables).all(dim=0).all(dim=0)  # [steps]
    ok = known.clone()
    for t in unskippable:
        if 0 <= t < steps:
            ok[t] = False
    if tau_cos is not None:
        ok &= (torch.nan_to_num(cos_mean.to(torch.float64), nan=-math.inf) >= tau_cos).all(dim=0)
    per_step = _stream_mean(cos_mean) - lam * _stream_mean(cos_std) - gamma * _stream_mean(ratio_std)
    pattern = torch.tensor([a == SKIP for a in window_actions(0, length - 1, refresh_every, refresh_width).values()])
    scored = [(first, first + length - 1, float(per_step[first:first + length][pattern].mean()))
              for first in range(lo, steps - length + 1) if bool(ok[first:first + length].all())]
    best: Optional[Tuple[int, int, float]] = None
    if scored:
        top = max(score for _, _, score in scored)
        best = [w for w in scored if w[2] >= top - TIE_TOLERANCE][-1]
    if best is None:
        why = [f"{steps} steps", f"min_step {lo}"]
        if tau_cos is not None:
            why.append(f"tau_cos {tau_cos}")
        if not bool(known[lo:].all()):
            why.append(f"steps without statistics: {[t for t in range(lo, steps) if not known[t]]}")
        if unskippable:
            why.append(f"steps {', '.join(map(str, sorted(unskippable)))} always computed (after an expert switch, "
                       "or where the pipeline needs them)")
        raise PlanError(f"no contiguous window of {length} steps ({skips} skips"
                        f"{f', refresh every {refresh_every}' if refresh_every else ''}) fits the late regime ("
                        + ", ".join(why) + "); lower the budget, min_step or tau_cos")
    return best


# ---------------------------------------------------------------------- building plans
def _ratios(streams: Sequence[str], steps: int, skips: Sequence[int],
            ratio_table: Union[float, Tensor]) -> Dict[str, Tuple[Optional[float], ...]]:
    out = {}
    for i, s in enumerate(streams):
        row: list = [None] * steps
        for t in skips:
            r = float(ratio_table) if not isinstance(ratio_table, Tensor) else float(ratio_table[i, t])
            if not math.isfinite(r):
                raise PlanError(f"no calibrated ratio for stream {s!r} at step {t}; the LUT has no statistics "
                                "there (recalibrate, or choose other steps)")
            row[t] = r
        out[s] = tuple(row)
    return out


def no_skip_plan(steps: int, streams: Sequence[str]) -> SkipPlan:
    return SkipPlan(steps, tuple(streams), (COMPUTE,) * steps, {s: (None,) * steps for s in streams})


def plan_from_window(steps: int, streams: Sequence[str], first: int, last: int, ratio_table: Union[float, Tensor],
                     refresh_every: Optional[int] = None, *, score: Optional[float] = None,
                     source: str = "window", refresh_width: int = 1) -> SkipPlan:
    """Skip the inclusive window ``[first, last]`` with a refresh after every ``refresh_every`` skips."""
    if not FIRST_SKIPPABLE <= first <= last < steps:
        raise PlanError(f"window [{first}, {last}] must satisfy {FIRST_SKIPPABLE} <= first <= last < {steps} "
                        f"(steps count from 0; a skip needs two computed outputs before it)")
    marks = window_actions(first, last, refresh_every, refresh_width)
    if source == "window" and marks.get(last) != SKIP:  # (a manual window: the search's never ends on a refresh)
        skips = [t for t, a in marks.items() if a == SKIP]
        later = next(e for e in range(last + 1, last + refresh_width + 2)
                     if window_actions(first, e, refresh_every, refresh_width).get(e) == SKIP)
        messages.warning(f"window [{first}, {last}] with refresh_every {refresh_every} ends on a refresh (step {last} "
                         f"is computed, {len(skips)} skips): end it at {skips[-1]}, or at {later} for "
                         f"{len(skips) + 1} skips", once=f"window-refresh {first} {last} {refresh_every}")
    actions = tuple(marks.get(t, COMPUTE) for t in range(steps))
    skips = [t for t, a in marks.items() if a == SKIP]
    return SkipPlan(steps, tuple(streams), actions, _ratios(streams, steps, skips, ratio_table), (first, last),
                    score, source)


def plan_from_steps(steps: int, streams: Sequence[str], skip_steps: Sequence[int],
                    ratio_table: Union[float, Tensor]) -> SkipPlan:
    """Skip exactly the listed steps (no refresh pattern)."""
    skips = sorted(set(int(t) for t in skip_steps))
    bad = [t for t in skips if not FIRST_SKIPPABLE <= t < steps]
    if bad:
        raise PlanError(f"cannot skip steps {bad}: steps count from 0 to {steps - 1} and the first "
                        f"{FIRST_SKIPPABLE} are always computed")
    actions = tuple(SKIP if t in skips else COMPUTE for t in range(steps))
    window = (skips[0], skips[-1]) if skips and skips[-1] - skips[0] + 1 == len(skips) else None
    return SkipPlan(steps, tuple(streams), actions, _ratios(streams, steps, skips, ratio_table), window,
                    None, "explicit")


# ---------------------------------------------------------------------- expert switches
def switch_guard(timesteps: Tensor, boundary: float) -> Tuple[int, ...]:
    """Steps that must be computed in a loop whose model changes when the timestep falls below
    ``boundary`` (Wan2.2's A14B experts): the first two steps of the new expert, whose deltas would
    span two networks. ``timesteps`` are the LUT's (NaN where unknown: nothing is guarded)."""
    t = timesteps.to(torch.float64)
    if torch.isnan(t).any():
        return ()
    below = (t < boundary).nonzero().flatten()
    if below.numel() == 0 or int(below[0]) == 0:
        return ()
    first = int(below[0])
    return tuple(s for s in (first, first + 1) if s < len(t))


def check_unskippable(plan: SkipPlan, unskippable: Sequence[int], what: str = "after the expert switch") -> None:
    """:class:`PlanError` if ``plan`` skips (or refreshes inside a window over) a guarded step."""
    bad = sorted(t for t in unskippable if plan.is_skip(t))
    if bad:
        raise PlanError(f"the plan skips step(s) {', '.join(map(str, bad))}, the first steps {what}: their "
                        "predictions would extrapolate deltas of the other expert; move the window or skip_steps "
                        f"(steps {', '.join(map(str, sorted(unskippable)))} are always computed)")
