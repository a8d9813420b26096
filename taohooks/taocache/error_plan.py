"""Error-aware planning (``plan.rule: auto``): the skips and coefficients of least predicted error.

Given a budget of ``N`` skipped steps, choose *chains* (:mod:`taohooks.taocache.error_model`: runs of skips,
possibly with single refreshes between them) and a coefficient rule per chain so that the
predicted mean squared error of the final latent is smallest. A skip at ``t`` outputs
``eps_{t-1} + a_t d_{t-1}`` with ``a_t`` from the rule:

    ratio        C_ratio[t]                 (the paper's Algorithm 1)
    projection   C_cos[t] * C_ratio[t]      (least squares: the component of D_t along D_{t-1})
    linear       1
    reuse        0                          (the last output again)

Chains are separated by at least ``min_gap >= 2`` computed steps, so each restarts from two real
outputs and the chains' errors add; the search is a dynamic programme over (step, skips used) on a
family of schedules: per (first step, skips) the chain of least error, chains of up to ``FREE_SHAPES``
skips tried in every shape (each gap between two skips: none or one refresh), longer ones with a refresh
after every ``K`` skips. Within the family it is exact; over all schedules it is not (a shorter chain
that leaves room for the next one can be dropped), and the all-schedule optimum measured worse on the
testbed (README, *Error-aware planning*): long chains are where the open-loop estimate misranks.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .error_model import COMPUTE, REFRESH, SKIP, ErrorModel, Guidance, ScheduleError
from .plan import FIRST_SKIPPABLE, PlanError, SkipPlan

__all__ = ["COEFFICIENTS", "PATTERNS", "PlannerOptions", "ErrorAwarePlan", "coefficient_table", "plan_min_error",
           "brute_force", "error_model_of", "weight_scheme", "error_aware_plan", "predict_plan"]

COEFFICIENTS = ("ratio", "projection", "linear", "reuse")
PATTERNS = ("auto", "contiguous", "strided")
FREE_SHAPES = 6  # chains of up to this many skips are tried in every shape
REGULAR_REFRESH = (None, 1, 2, 3, 4, 6, 8)  # refresh patterns tried for longer chains


@dataclass(frozen=True)
class PlannerOptions:
    """Knobs of the search (``plan.*`` in the YAML).

    ``coefficient``: one rule for every chain (``None``: the best rule per chain). ``pattern``:
    ``contiguous`` (one chain, refreshes allowed), ``strided`` (chains without refreshes) or ``auto``
    (any). ``min_step``: the first step a skip may take (default: the late half, as the paper).
    ``protect_last``: the last steps never skipped. ``max_chain``: skips per chain (default: as
    many as the calibrated horizon allows).
    """

    coefficient: Optional[str] = None
    pattern: str = "auto"
    min_gap: int = 2
    min_step: Optional[int] = None
    protect_last: int = 0
    max_chain: Optional[int] = None
    unskippable: Tuple[int, ...] = ()  # steps never skipped (the first two after an expert switch)

    def __post_init__(self):
        if self.coefficient is not None and self.coefficient not in COEFFICIENTS:
            raise PlanError(f"plan.coefficient: expected one of {', '.join(COEFFICIENTS)}, got {self.coefficient!r}")
        if self.pattern not in PATTERNS:
            raise PlanError(f"plan.pattern: expected one of {', '.join(PATTERNS)}, got {self.pattern!r}")
        if self.min_gap < 2:
            raise PlanError(f"plan.min_gap: expected at least 2 computed steps between chains, got {self.min_gap} "
                            "(one computed step between skips joins them into one chain, a refresh)")


def coefficient_table(rule: str, cos_mean: torch.Tensor, ratio_mean: torch.Tensor) -> torch.Tensor:
    """``[streams, steps]`` coefficient ``a_t`` of a rule (NaN where the LUT has no statistics)."""
    ratio = ratio_mean.to(torch.float64)
    if rule == "ratio":
        return ratio.clone()
    if rule == "projection":
        return cos_mean.to(torch.float64) * ratio
    if rule == "linear":
        return torch.ones_like(ratio)
    if rule == "reuse":
        return torch.zeros_like(ratio)
    raise PlanError(f"unknown coefficient rule {rule!r} (one of {', '.join(COEFFICIENTS)})")


@dataclass(frozen=True)
class _Chain:
    first: int
    last: int
    skips: int
    mse: float
    rule: str
    actions: Tuple[str, ...]  # first..last


class _ChainSearch:
    """Predicted MSE of every chain candidate, by walking shapes step by step (numpy, float64)."""

    def __init__(self, model: ErrorModel, tables: Dict[str, np.ndarray]):
        self.model = model
        self.mean = model.terms.mean(dim=1).numpy()  # [terms, m, m]: the streams' [steps, steps], or one guided
        self.numel = model.term_numel.numpy()
        self.weights = model.stream_weights.numpy()  # [streams, steps]
        self.tables = tables  # rule -> [streams, steps]
        self.steps, self.streams = model.steps, model.streams
        self.unskippable = frozenset()

    def _cost(self, total: List[np.ndarray], lo: int, hi: int) -> float:
        mse = 0.0
        if self.model.guidance is None:
            for s in range(self.streams):
                v = total[s][lo:hi + 1]
                mse += float(v @ self.mean[s, lo:hi + 1, lo:hi + 1] @ v) / self.numel[s]
            return mse / self.streams
        (v,) = self.model.combine([t[lo:hi + 1] for t in total])
        idx = self.model.term_index(lo, hi)
        return float(v @ self.mean[0][np.ix_(idx, idx)] @ v) / self.numel[0]

    def walk(self, first: int, rule: str, max_skips: int, last_allowed: int, free: bool,
             refresh_every: Optional[int], out: Dict[Tuple[int, int], _Chain]) -> None:
        """Chains starting at ``first``: every shape (``free``) or a refresh after every ``refresh_every``
        skips; the best per (first, skips) goes to ``out``."""
        table = self.tables[rule]
        n = self.steps
        zero = np.zeros(n)

        def visit(t: int, state, skips: int, actions: Tuple[str, ...]):
            # skip step t
            if t > last_allowed or t in self.unskippable:
                return
            coeffs = table[:, t]
            if not np.isfinite(coeffs).all():
                return
            new_state = []
            for s in range(self.streams):
                eps, delta, total = state[s]
                a = coeffs[s]
                d = a * delta
                d[t - 1] += a
                d[t] -= 1.0
                e = eps + d
                new_state.append((e, d, total + self.weights[s, t] * e))
            skips += 1
            actions = actions + (SKIP,)
            if t - first + 1 > self.model.horizon:  # the products reach from D_{first-1} to D_t
                return
            mse = self._cost([st[2] for st in new_state], first - 1, t)
            if not math.isfinite(mse):
                return
            key = (first, skips)
            if key not in out or mse < out[key].mse:
                out[key] = _Chain(first, t, skips, mse, rule, actions)
            if skips >= max_skips:
                return
            if free:
                visit(t + 1, new_state, skips, actions)
                if skips < FREE_SHAPES:
                    refreshed = [(zero.copy(), -e, tot) for e, _, tot in new_state]
                    visit(t + 2, refreshed, skips, actions + (REFRESH,))
            elif refresh_every and skips % refresh_every == 0:
                refreshed = [(zero.copy(), -e, tot) for e, _, tot in new_state]
                visit(t + 2, refreshed, skips, actions + (REFRESH,))
            else:
                visit(t + 1, new_state, skips, actions)

        start = [(zero.copy(), zero.copy(), zero.copy()) for _ in range(self.streams)]
        visit(first, start, 0, ())


@dataclass(frozen=True)
class ErrorAwarePlan:
    """The chosen plan, its predicted error, the rule of each chain ``(first, last, rule)``, and the
    objective minimised (the chains' MSEs summed, as uncorrelated)."""

    plan: SkipPlan
    predicted: ScheduleError
    chains: Tuple[Tuple[int, int, str], ...]
    objective: float = 0.0

    def describe(self) -> str:
        rules = ", ".join(f"{a}-{b}: {r}" if a != b else f"{a}: {r}" for a, b, r in self.chains)
        return f"{self.plan.describe()}; chains {rules}; {self.predicted.describe()}"


def _stream_tables(lut, rules: Sequence[str]) -> Dict[str, np.ndarray]:
    return {r: coefficient_table(r, lut.cos_mean, lut.ratio_mean).numpy() for r in rules}


def _first_allowed(options: PlannerOptions, steps: int) -> int:
    return max(FIRST_SKIPPABLE, options.min_step if options.min_step is not None else (steps + 1) // 2)


def _candidates(model: ErrorModel, lut, options: PlannerOptions, budget: int) -> Dict[Tuple[int, int], _Chain]:
    rules = [options.coefficient] if options.coefficient else list(COEFFICIENTS)
    search = _ChainSearch(model, _stream_tables(lut, rules))
    search.unskippable = frozenset(options.unskippable)
    lo = _first_allowed(options, model.steps)
    last_allowed = model.steps - 1 - options.protect_last
    max_skips = min(budget, options.max_chain or budget)
    best: Dict[Tuple[int, int], _Chain] = {}
    for first in range(lo, last_allowed + 1):
        for rule in rules:
            if options.pattern == "strided":
                search.walk(first, rule, max_skips, last_allowed, False, None, best)
                continue
            search.walk(first, rule, min(max_skips, FREE_SHAPES), last_allowed, True, None, best)
            if max_skips > FREE_SHAPES:
                for k in REGULAR_REFRESH:
                    search.walk(first, rule, max_skips, last_allowed, False, k, best)
    return best


def _select(best: Dict[Tuple[int, int], _Chain], steps: int, budget: int, options: PlannerOptions) -> List[_Chain]:
    """The set of chains with ``budget`` skips in all of least total MSE (dynamic programme)."""
    if options.pattern == "contiguous":
        one = [c for (first, n), c in best.items() if n == budget]
        if not one:
            return []
        return [min(one, key=lambda c: (c.mse, -c.first))]
    inf = math.inf
    # cost[t][n]: least MSE with n skips whose chains all end before step t - min_gap
    cost = [[inf] * (budget + 1) for _ in range(steps + 1)]
    back: List[List[Optional[Tuple[int, int, Optional[_Chain]]]]] = [[None] * (budget + 1) for _ in range(steps + 1)]
    cost[0][0] = 0.0
    by_first: Dict[int, List[_Chain]] = {}
    for c in best.values():
        by_first.setdefault(c.first, []).append(c)
    for t in range(steps + 1):
        for n in range(budget + 1):
            here = cost[t][n]
            if here == inf:
                continue
            if t < steps and here < cost[t + 1][n]:
                cost[t + 1][n], back[t + 1][n] = here, (t, n, None)
            for c in by_first.get(t, ()):
                m = n + c.skips
                if m > budget:
                    continue
                nxt = min(c.last + options.min_gap + 1, steps)
                total = here + c.mse
                if total < cost[nxt][m]:
                    cost[nxt][m], back[nxt][m] = total, (t, n, c)
    if cost[steps][budget] == inf:
        return []
    chains, t, n = [], steps, budget
    while back[t][n] is not None:
        pt, pn, c = back[t][n]
        if c is not None:
            chains.append(c)
        t, n = pt, pn
    return sorted(chains, key=lambda c: c.first)


def _build(chains: Sequence[_Chain], lut, steps: int, streams: Sequence[str], model: ErrorModel) -> ErrorAwarePlan:
    actions = [COMPUTE] * steps
    tables = _stream_tables(lut, sorted({c.rule for c in chains}))
    ratios: Dict[str, List[Optional[float]]] = {s: [None] * steps for s in streams}
    for c in chains:
        for i, a in enumerate(c.actions):
            t = c.first + i
            actions[t] = a
            if a == SKIP:
                for k, s in enumerate(streams):
                    ratios[s][t] = float(tables[c.rule][k, t])
    window = (chains[0].first, chains[0].last) if len(chains) == 1 else None
    plan = SkipPlan(steps, tuple(streams), tuple(actions), {s: tuple(r) for s, r in ratios.items()}, window,
                    None, "error-aware")
    predicted = predict_plan(plan, model)
    plan = dataclasses.replace(plan, predicted_psnr=predicted.psnr if predicted.chains else None)
    return ErrorAwarePlan(plan, predicted, tuple((c.first, c.last, c.rule) for c in chains),
                          sum(c.mse for c in chains))


def plan_min_error(lut, model: ErrorModel, budget: int, streams: Sequence[str],
                   options: PlannerOptions = PlannerOptions()) -> ErrorAwarePlan:
    """The plan of ``budget`` skips with the least predicted error (:class:`PlanError` if none fits)."""
    steps = model.steps
    if budget == 0:
        from .plan import no_skip_plan

        plan = no_skip_plan(steps, streams)
        return ErrorAwarePlan(plan, model.schedule(plan.actions, [[None] * steps] * len(streams)), ())
    lo = _first_allowed(options, steps)
    if lo > steps - 1 - options.protect_last:  # (it read "fits steps 25 to -1")
        first = f"plan.min_step {options.min_step}" if options.min_step is not None else "the late half (min_step)"
        raise PlanError(f"{first} and plan.protect_last {options.protect_last} leave no step to skip in a loop of "
                        f"{steps} steps (the first skippable is {lo}, the last {steps - 1 - options.protect_last}); "
                        "lower them")
    chains = _select(_candidates(model, lut, options, budget), steps, budget, options)
    if not chains:
        carried = re.search(r"\(carried from (\d+) to (\d+) steps\)", lut.source or "")
        shortened = carried is not None and int(carried.group(1)) > int(carried.group(2))  # (to fewer, longer steps)
        kept = f", steps {', '.join(map(str, sorted(options.unskippable)))} always computed" \
            if options.unskippable else ""
        raise PlanError(f"no schedule of {budget} skips fits steps {lo} to {steps - 1 - options.protect_last} "
                        f"(pattern {options.pattern}, min_gap {options.min_gap}, calibrated horizon {model.horizon} "
                        f"steps per chain{kept}); lower the budget or plan.min_step, or " + (
                            f"calibrate at {steps} steps: {lut.source} has this horizon because its deltas were "
                            "carried over to fewer, longer steps" if shortened else
                            "calibrate with a longer calibration.error_horizon"))
    return _build(chains, lut, steps, streams, model)


def brute_force(lut, model: ErrorModel, budget: int, streams: Sequence[str],
                options: PlannerOptions = PlannerOptions()) -> Tuple[float, Tuple[int, ...]]:
    """Least predicted MSE over every set of ``budget`` skipped steps and every rule per chain (for
    tests on small loops): ``(mse, skipped steps)``."""
    from itertools import combinations

    from .error_model import chains_of

    steps = model.steps
    lo, hi = _first_allowed(options, steps), steps - 1 - options.protect_last
    rules = [options.coefficient] if options.coefficient else list(COEFFICIENTS)
    tables = _stream_tables(lut, rules)
    best = (math.inf, ())
    allowed = [t for t in range(lo, hi + 1) if t not in options.unskippable]
    for skips in combinations(allowed, budget):
        actions = [COMPUTE] * steps
        for t in skips:
            actions[t] = SKIP
        chains = chains_of(actions)
        if any(b[0] - a[1] <= options.min_gap for a, b in zip(chains, chains[1:])):
            continue
        if options.pattern == "contiguous" and len(chains) > 1:
            continue
        if options.pattern == "strided" and any(b - a + 1 != sum(1 for t in skips if a <= t <= b)
                                                for a, b in chains):
            continue
        for a, b in chains:
            for t in range(a, b + 1):
                if actions[t] != SKIP:
                    actions[t] = REFRESH
        total = 0.0
        for a, b in chains:
            costs = []
            for rule in rules:
                coeffs = [[float(tables[rule][k, t]) if actions[t] == SKIP else None for t in range(steps)]
                          for k in range(len(streams))]
                costs.append(model.chain_mse(actions, coeffs, a, b))
            finite = [c for c in costs if math.isfinite(c)]
            total = total + (min(finite) if finite else math.inf)
        if total < best[0]:
            best = (total, skips)
    return best


# ---------------------------------------------------------------------- from a config and a LUT
_DEFAULT_BETAS = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def recorded_betas(lut) -> Dict[str, Any]:
    """The beta schedule the LUT's identity records (``noise_schedule.<name>``), as :func:`sampler_weights` takes it;
    empty where it records none (a flow scheduler, a LUT of an earlier taohooks), or one the weights cannot model
    (trained betas, a ``beta_schedule`` other than :data:`BETA_SCHEDULES`, values of another type): the linear
    1e-4..0.02 schedule is assumed there, as before the LUTs recorded it (:func:`_ddpm_said` says so)."""
    from .error_model import BETA_SCHEDULES

    identity = getattr(lut, "identity", None) or {}
    got = {k: identity[f"noise_schedule.{k}"] for k in _DEFAULT_BETAS if f"noise_schedule.{k}" in identity}
    usable = ("noise_schedule.trained_betas" not in identity and got.get("beta_schedule", "linear") in BETA_SCHEDULES
              and all(_number(got[k]) for k in ("beta_start", "beta_end") if k in got)
              and (isinstance(got.get("num_train_timesteps", 1000), int) and got.get("num_train_timesteps", 1000) > 1))
    return got if usable else {}


def _ddpm_said(lut) -> str:
    betas = recorded_betas(lut)
    identity = getattr(lut, "identity", None) or {}
    if not betas and any(k.startswith("noise_schedule.") for k in identity):
        from .error_model import BETA_SCHEDULES

        schedule = identity.get("noise_schedule.beta_schedule", "linear")
        what = ("trained betas" if "noise_schedule.trained_betas" in identity else f"beta_schedule {schedule!r}"
                if schedule not in BETA_SCHEDULES else "recorded betas (not numbers)")
        return f"DDPM linear betas (assumed: the LUT's {what} cannot be weighted here)"
    if all(betas.get(k, v) == v for k, v in _DEFAULT_BETAS.items()):
        return "DDPM linear betas"
    b = {**_DEFAULT_BETAS, **betas}
    return (f"DDPM {b['beta_schedule']} betas {b['beta_start']:g}-{b['beta_end']:g} "
            f"over {b['num_train_timesteps']} steps")


def weight_scheme(requested: str, lut) -> Tuple[str, str]:
    """``(scheme, why)``: the sampler weights for ``plan.error_weights`` (``auto``: from what the LUT
    recorded of its sampler: a flow shift or flow prediction type, or a DDIM/DDPM/PNDM sampler)."""
    if requested != "auto":
        named = {"flow": "flow matching", "ddpm": _ddpm_said(lut),
                 "uniform": "uniform"}.get(requested, requested)
        return requested, f"{named} (plan.error_weights: {requested})"
    identity = lut.identity or {}
    words = [str(identity.get(k, "")) for k in ("scheduler", "prediction_type")] + [lut.sampler or ""]
    text = " ".join(dict.fromkeys(w for w in words if w))  # (each once: the scheduler is often the sampler label)
    text = text.lower()
    named = {}  # what the LUT recorded, as it recorded it ("UniPCMultistepScheduler", "unipc"), each value once
    for name, value in (("scheduler", identity.get("scheduler")), ("prediction type", identity.get("prediction_type")),
                        ("calibration.sampler", lut.sampler)):
        if value and str(value).lower() not in (v.lower() for v in named.values()):
            named[name] = str(value)
    said = ", ".join(f"{name} {value}" for name, value in named.items())
    prediction = str(identity.get("prediction_type", "")).lower()
    # a diffusers scheduler records its prediction type: a multistep solver predicting noise (DPM-Solver, UniPC with
    # epsilon) records a flow_shift of 1.0 all the same, which read as flow matching (review19)
    noise = prediction in ("epsilon", "v_prediction", "sample") \
        and identity.get("scheduler.use_flow_sigmas") is not True
    if not noise and ("shift" in identity or "flow" in text or "unipc" in text):
        return "flow", f"flow matching (the LUT's {said or 'flow shift'})"
    if noise:
        return "ddpm", f"{_ddpm_said(lut)} (the LUT's {said})"
    if any(name in text for name in ("ddim", "ddpm", "pndm", "epsilon")):
        return "ddpm", f"{_ddpm_said(lut)} (the LUT's {said})"
    return "uniform", "uniform (the LUT does not say which sampler it was calibrated with)"


def error_model_of(lut, scheme: str = "auto",
                   guidance_scale: Union[float, Sequence[float], None] = None) -> Tuple[ErrorModel, str]:
    """The :class:`ErrorModel` of a LUT with the sampler weights of ``scheme`` (and what they are); with
    ``guidance_scale``, of the guided output ``uncond + scale (cond - uncond)``."""
    from .plan import PlanError as _PlanError
    from .error_model import sampler_weights

    if lut is None:
        raise _PlanError("plan.rule: auto plans from a calibration LUT's error statistics; calibrate first")
    if lut.deltas is None or lut.deltas.prompts == 0:
        where = f"LUT {lut.source}" if lut.source else "the LUT"
        raise _PlanError(f"{where} has no error statistics (delta products, delta_gram: its prompts were recorded "
                         "without them, by an earlier taohooks or with calibration.error_horizon: 0; a LUT keeps "
                         "none once one of its prompts has none): plan.rule: auto cannot estimate errors from it; "
                         "calibrate again into a new LUT file, or use plan.rule: paper")
    used, why = weight_scheme(scheme, lut)
    try:
        weights = sampler_weights(lut.timesteps, used, recorded_betas(lut))
    except ValueError as exc:
        raise _PlanError(f"plan.error_weights: {exc}") from None
    guidance = None
    where = f"LUT {lut.source}" if lut.source else "the LUT"
    try:
        if guidance_scale is not None:
            guidance = Guidance.of(lut.streams, guidance_scale)
        model = ErrorModel(lut.deltas, weights, guidance)
    except ValueError as exc:
        said = f"{guidance_scale:g}" if isinstance(guidance_scale, (int, float)) else f"({len(guidance_scale)} values)"
        raise _PlanError(f"plan.guidance_scale {said} with {where}: {exc}") from None
    if guidance is not None and model.prompts_used < model.prompts_moving:
        from ..runtime import messages

        messages.notice(f"plan.guidance_scale: {model.prompts_used} of the {model.prompts_moving} prompts of "
                        f"{where} have products between the streams (the others were calibrated by an earlier "
                        "taohooks): the guided error is estimated from those", once=f"guided prompts {lut.source}")
    return model, why


def options_of(plan_config) -> PlannerOptions:
    return PlannerOptions(coefficient=plan_config.coefficient, pattern=plan_config.pattern,
                          min_gap=plan_config.min_gap, min_step=plan_config.min_step,
                          protect_last=plan_config.protect_last)


def error_aware_plan(plan_config, steps: int, streams: Sequence[str], lut, skips: int,
                     unskippable: Sequence[int] = ()) -> ErrorAwarePlan:
    """``plan.rule: auto``: the plan of ``skips`` skips of least predicted error on ``lut``."""
    model, _ = error_model_of(lut, plan_config.error_weights, plan_config.guidance_scale)
    if model.steps != steps:
        raise PlanError(f"the LUT's error statistics have {model.steps} steps, the run {steps}")
    options = dataclasses.replace(options_of(plan_config), unskippable=tuple(unskippable))
    return plan_min_error(lut, model, skips, streams, options)


def predict_plan(plan: SkipPlan, model: ErrorModel) -> ScheduleError:
    """Predicted error of any plan (e.g. the paper's window) on an error model."""
    coefficients = [[plan.ratios[s][t] for t in range(plan.steps)] for s in plan.streams]
    return model.schedule(plan.actions, coefficients)
