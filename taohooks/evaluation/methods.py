"""The compared methods as callbacks on one hook, and budget matching.

A budget is a number of skipped steps out of ``steps`` (every stream skips together). TaoCache
meets it exactly with its window; TeaCache and MagCache have a threshold instead, which is
searched (bisection on calibration pairs, never on the evaluation pairs) until their skip count
meets the budget, the way the paper matches budgets. A TeaCache/MagCache "skip" is a call whose
block stack was bypassed (the embeddings and final layer still ran).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..runtime.callbacks import Callback
from ..taocache.calibration import CalibrationRecorder
from ..config import PlanConfig
from ..taocache.extrapolation import TaoCacheCallback
from ..runtime.hook import DenoiserHook
from ..taocache.lut import CalibrationLUT
from ..caches.magcache import MagCacheCalibrator, MagCacheCallback
from ..caches.pab import BroadcastGroup, PyramidAttentionBroadcast
from ..taocache.plan import SkipPlan
from ..caches.residual import BlockStackCache, ResidualSkipCallback
from ..taocache.cache import make_plan
from ..caches.teacache import TeaCacheCalibrator, TeaCacheCallback
from .testbed_model import TestbedModel, modulated_input

__all__ = ["Calibration", "calibrate", "run_with", "paired_speedup", "Run", "METHODS", "build_method",
           "hybrid_tao_skips", "match_threshold", "CallCounter"]

METHODS = ("taocache", "taocache-auto", "taocache-auto-guided", "teacache", "magcache", "easycache",
           "taoskip+tearesidual", "hybrid", "pab+taocache")


def batches(items: Sequence, size: int) -> List[Sequence]:
    return [items[i:i + size] for i in range(0, len(items), size)]


class CallCounter(Callback):
    """Counts model calls, and those answered without running the model."""

    def __init__(self):
        self.calls = self.substituted = 0

    def on_after_call(self, hook, call, output) -> None:
        self.calls += 1
        self.substituted += int(not call.computed)


@dataclass
class Run:
    """Clips of one method on some (prompt, seed) pairs, with its cost."""

    clips: torch.Tensor
    seconds: float
    calls: int
    skipped: int  # calls substituted (TaoCache) or with the block stack bypassed (TeaCache, MagCache)

    @property
    def skipped_fraction(self) -> float:
        return self.skipped / self.calls if self.calls else 0.0


def run_with(tm: TestbedModel, callbacks: Sequence[Callback], pairs, batch_size: int) -> Run:
    """Sample ``pairs`` in batches with ``callbacks`` on one hook (none: the full-step reference)."""
    import time

    counter = CallCounter()
    hook = DenoiserHook(tm.loop(), [counter, *callbacks], timestep_arg=tm.timestep_arg)
    clips, seconds = [], 0.0
    with hook.attach(tm.model):
        for chunk in batches(pairs, batch_size):
            hook.new_sample()
            start = time.perf_counter()
            clips.append(tm.sample(chunk))
            seconds += time.perf_counter() - start
    reused = sum(cb.reused for cb in callbacks if isinstance(cb, BlockStackCache))
    return Run(torch.cat(clips), seconds, counter.calls, counter.substituted + reused)


def paired_speedup(tm: TestbedModel, callbacks: Sequence[Callback], pairs, repeats: int = 2) -> float:
    """Wall-clock speedup on one batch, the full-step and the cached run alternating back to back
    (``repeats`` times each), so that load on the machine hits both alike."""
    full = cached = 0.0
    for _ in range(repeats):
        full += run_with(tm, [], pairs, len(pairs)).seconds
        cached += run_with(tm, callbacks, pairs, len(pairs)).seconds
    return full / cached


def implausible_speedup(method: str, speedup: Optional[float], skipped: Optional[float]) -> bool:
    """A measured speedup above ``1 / (1 - skipped)`` (5% margin): timing noise where nothing but skipped calls saves
    time (methods with PAB, which also save inside the calls they compute, are never flagged)."""
    if speedup is None or skipped is None or "pab" in method or skipped >= 1:
        return False
    return speedup > 1.05 / (1.0 - skipped)


def missed_budget(row: Dict[str, Any]) -> bool:
    """Whether a searched method's threshold search missed the row's budget (by more than the half step it searches
    to, on the search prompts: ``search_fraction``): the row is then not that budget's (a run that skipped nothing
    would rank as its winner)."""
    found = row.get("search_fraction")
    return found is not None and "steps" in row and abs(found - row["budget"]) > 0.5 / row["steps"] + 1e-9


IMPLAUSIBLE_NOTE = ("† more than 5% faster than skipping that share of the calls allows (1 / (1 - skipped)): timing "
                    "noise ({}; a loaded machine, or runs timed in different processes): time again on an idle "
                    "machine before quoting it.")


@dataclass
class Calibration:
    """Everything the methods calibrate, from one set of full-step runs."""

    lut: CalibrationLUT
    tea_coefficients: Optional[List[float]]  # None: not fitted (calibrate(teacache=False))
    mag_ratios: torch.Tensor
    seconds: float = 0.0


def calibrate(tm: TestbedModel, pairs, batch_size: int, teacache: bool = True) -> Calibration:
    """TaoCache's LUT, TeaCache's polynomial (``teacache=False``: not fitted, for too few pairs to fit it) and
    MagCache's ratios, recorded together."""
    import time

    rec = CalibrationRecorder(model_id=f"testbed-{tm.name}", sampler=tm.sampler)
    tea = TeaCacheCalibrator(probe=modulated_input, blocks=tm.blocks)
    mag = MagCacheCalibrator(blocks=tm.blocks)
    start = time.perf_counter()
    with DenoiserHook(tm.loop(), [rec, tea, mag], timestep_arg=tm.timestep_arg).attach(tm.model) as hook:
        for chunk in batches(pairs, batch_size):
            hook.new_sample()
            tm.sample(chunk)
    return Calibration(rec.lut(), tea.fit() if teacache else None, mag.ratios(), time.perf_counter() - start)


def match_threshold(make: Callable[[float], List[Callback]], measure: Callable[[List[Callback]], float],
                    target: float, start: float = 0.1, iterations: int = 12, *, what: str = "the threshold",
                    tolerance: float = 0.01) -> Tuple[float, float]:
    """The threshold whose skipped fraction is closest to ``target`` (fraction grows with it).

    Brackets the target from ``start`` up (x4), then bisects ``iterations`` times, stopping early on
    an exact match. The fraction can rise steeply (testbed ``flow``: 6.6% at 0.0107, 36% at 0.0136, the
    README's command), so the bisection needs to resolve ~1e-4 of a 0.1 bracket: 8 iterations could land
    well off budgets of 8-20%, 12 resolve them. Returns ``(threshold, fraction measured)``; when that
    fraction misses the target by more than ``tolerance``, a warning says so (``what`` names the search).
    """
    lo, hi = 0.0, start
    fraction = measure(make(hi))
    best = (abs(fraction - target), hi, fraction)
    for _ in range(12):
        if fraction >= target:
            break
        lo, hi = hi, hi * 4
        fraction = measure(make(hi))
        best = min(best, (abs(fraction - target), hi, fraction))
    for _ in range(iterations):
        if best[0] < 1e-9:
            break
        mid = (lo + hi) / 2
        fraction = measure(make(mid))
        best = min(best, (abs(fraction - target), mid, fraction))
        if fraction >= target:
            hi = mid
        else:
            lo = mid
    if best[0] > tolerance:
        from ..runtime import messages

        messages.warning(f"{what} search could not meet the budget of {100 * target:.1f}% skipped calls: the closest "
                         f"is {100 * best[2]:.1f}% at {best[1]:.6g} (on the search prompts); the result is reported "
                         "with the fraction it skipped")
    return best[1], best[2]


def hybrid_tao_skips(skips: int, wanted: Optional[int]) -> int:
    """TaoCache's skips in the hybrid (Algorithm 2) at a budget of ``skips``: ``wanted`` (Algorithm 2's input; the
    paper's hybrid run: 7) up to the budget, or half the budget; TeaCache's threshold is matched to the rest."""
    return min(wanted, skips) if wanted is not None else max(1, skips // 2)


@dataclass
class MethodSettings:
    pab_range: int = 2
    pab_timesteps: Tuple[float, float] = (100.0, 800.0)
    hybrid_guard: int = 2
    hybrid_tao_skips: Optional[int] = None  # TaoCache's skips in the hybrid (at most the budget); None: half
    magcache_max_skip: int = 2
    magcache_retention: float = 0.2
    search_iterations: int = 12


@dataclass
class Built:
    callbacks: List[Callback]
    info: Dict[str, object] = field(default_factory=dict)


def _tao(tm: TestbedModel, cal: Calibration, skips: int, rule: str = "paper",
         guided: bool = False) -> Tuple[SkipPlan, TaoCacheCallback]:
    loop = tm.loop()
    config = PlanConfig(budget=skips, rule=rule)
    if rule == "auto":
        config.error_weights = "ddpm" if tm.prediction == "eps" else "flow"
    if guided and len(loop.streams) == 2:
        config.guidance_scale = tm.guidance_scale
    plan = make_plan(config, loop.steps, loop.streams, cal.lut)
    return plan, TaoCacheCallback(plan, cal.lut.timesteps)


def _predicted_psnr(tm: TestbedModel, cal: Calibration, plan: SkipPlan, guided: bool = False):
    """The open-loop predicted PSNR of a plan (:mod:`taohooks.taocache.error_model`; of the guided output with
    ``guided``), or None without products."""
    from ..taocache.error_plan import error_model_of, predict_plan

    if cal.lut.deltas is None:
        return None
    model, _ = error_model_of(cal.lut, "ddpm" if tm.prediction == "eps" else "flow",
                              tm.guidance_scale if guided else None)
    psnr = predict_plan(plan, model).psnr
    return round(psnr, 3) if psnr == psnr and psnr != float("inf") else None


def build_method(name: str, tm: TestbedModel, cal: Calibration, skips: int, search_pairs,
                 batch_size: int, settings: MethodSettings, measured: Optional[Dict[tuple, float]] = None) -> Built:
    """Callbacks for ``name`` at ``skips`` skipped steps; thresholds are matched on ``search_pairs``.
    ``measured``: skipped fractions already measured on these search pairs, ``(name, threshold) -> fraction``,
    read and added to (TeaCache's, MagCache's and EasyCache's do not depend on the budget: each budget's search
    measured the same thresholds again)."""
    steps = tm.steps
    target = skips / steps
    current: Dict[str, float] = {}

    def noted(make):
        def make_noted(th):
            current["threshold"] = th
            return make(th)
        return make_noted

    def measure(callbacks):
        key = (name, current.get("threshold"))
        if measured is not None and key[1] is not None and key in measured:
            return measured[key]
        fraction = run_with(tm, callbacks, search_pairs, batch_size).skipped_fraction
        if measured is not None and key[1] is not None:
            measured[key] = fraction
        return fraction

    if name in ("taocache", "taocache-auto", "taocache-auto-guided"):
        guided = name == "taocache-auto-guided"  # (plan.guidance_scale: the guided output's error, minimised)
        plan, tao = _tao(tm, cal, skips, "paper" if name == "taocache" else "auto", guided)
        info = {"window": plan.window, "predicted_psnr": _predicted_psnr(tm, cal, plan)}
        if guided:
            info["predicted_guided_psnr"] = _predicted_psnr(tm, cal, plan, guided=True)
        if name != "taocache":
            info["skipped_steps"] = list(plan.skipped_steps)
            info["refresh_steps"] = list(plan.refresh_steps)
        return Built([tao], info)
    if name == "taoskip+tearesidual":
        plan, _ = _tao(tm, cal, skips)
        return Built([ResidualSkipCallback(plan.skipped_steps, blocks=tm.blocks)], {"window": plan.window})
    if name == "teacache":
        def make(th):
            return [TeaCacheCallback(th, cal.tea_coefficients, probe=modulated_input, blocks=tm.blocks)]
        th, frac = match_threshold(noted(make), measure, target, iterations=settings.search_iterations,
                                   what=f"[{tm.name}] TeaCache's threshold", tolerance=0.5 / steps)
        return Built(make(th), {"threshold": th, "search_fraction": frac})
    if name == "magcache":
        def make(th):
            return [MagCacheCallback(cal.mag_ratios, th, settings.magcache_max_skip, settings.magcache_retention,
                                     blocks=tm.blocks)]
        th, frac = match_threshold(noted(make), measure, target, iterations=settings.search_iterations,
                                   what=f"[{tm.name}] MagCache's threshold", tolerance=0.5 / steps)
        return Built(make(th), {"threshold": th, "search_fraction": frac})
    if name == "easycache":  # runtime-adaptive: nothing calibrated; warm-up a fifth of the steps (10 of 50, the authors')
        from ..caches.easycache import EasyCacheCallback

        def make(th):
            return [EasyCacheCallback(th, warmup_steps=max(1, steps // 5))]
        th, frac = match_threshold(noted(make), measure, target, iterations=settings.search_iterations,
                                   what=f"[{tm.name}] EasyCache's threshold", tolerance=0.5 / steps)
        return Built(make(th), {"threshold": th, "search_fraction": frac})
    if name == "hybrid":  # Algorithm 2: TeaCache early/mid, a refresh guard band, TaoCache late
        tao_skips = hybrid_tao_skips(skips, settings.hybrid_tao_skips)
        plan, tao = _tao(tm, cal, tao_skips)
        max_step = plan.window[0] - settings.hybrid_guard

        def make(th):
            tea = TeaCacheCallback(th, cal.tea_coefficients, probe=modulated_input, blocks=tm.blocks,
                                   max_step=max_step)
            return [TaoCacheCallback(plan, cal.lut.timesteps), tea]
        if skips > tao_skips:
            th, frac = match_threshold(make, measure, target, iterations=settings.search_iterations,
                                       what=f"[{tm.name}] the hybrid's TeaCache threshold", tolerance=0.5 / steps)
        else:
            th, frac = 0.0, tao_skips / steps
        return Built(make(th), {"threshold": th, "window": plan.window, "tao_skips": tao_skips,
                                "search_fraction": frac})
    if name == "pab+taocache":
        plan, tao = _tao(tm, cal, skips)
        pab = PyramidAttentionBroadcast([BroadcastGroup(tm.attention, settings.pab_range)],
                                        timesteps=settings.pab_timesteps, reset_steps=plan.resume_steps,
                                        reset_on_resume=True)
        return Built([tao, pab], {"window": plan.window, "pab_range": settings.pab_range})
    raise ValueError(f"unknown method {name!r}; one of {', '.join(METHODS)}")
