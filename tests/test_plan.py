"""Window planning: brute-force cross-check of the search, budgets, refresh pattern, errors."""
import itertools
import math

import pytest
import torch

from taohooks.taocache.plan import (COMPUTE, REFRESH, SKIP, TIE_TOLERANCE, PlanError, SkipPlan, plan_from_steps, plan_from_window,
                           resolve_budget, search_window, span_length, window_actions)


def random_tables(streams, steps, seed):
    g = torch.Generator().manual_seed(seed)
    cos_mean = 1 - torch.rand(streams, steps, generator=g, dtype=torch.float64) ** 2
    cos_std = torch.rand(streams, steps, generator=g, dtype=torch.float64) * 0.2
    ratio_mean = 0.5 + torch.rand(streams, steps, generator=g, dtype=torch.float64)
    ratio_std = torch.rand(streams, steps, generator=g, dtype=torch.float64) * 0.3
    for t in (cos_mean, cos_std, ratio_mean, ratio_std):
        t[:, :2] = float("nan")  # steps 0 and 1 never have statistics
    return cos_mean, cos_std, ratio_mean, ratio_std


def brute_force(cos_mean, cos_std, ratio_mean, ratio_std, skips, refresh_every, min_step, tau_cos, lam, gamma):
    """Every contiguous span, scored naively over its skipped steps; ties to the later window."""
    streams, steps = cos_mean.shape
    scored = []
    for first in range(steps):
        for last in range(first, steps):
            marks = {}
            count = 0
            for t in range(first, last + 1):  # skip, skip, ..., refresh after every K skips
                if refresh_every and count == refresh_every:
                    marks[t], count = REFRESH, 0
                else:
                    marks[t], count = SKIP, count + 1
            skipped = [t for t, a in marks.items() if a == SKIP]
            if len(skipped) != skips or marks[last] != SKIP or first < max(2, min_step):
                continue
            span = range(first, last + 1)
            tables = (cos_mean, cos_std, ratio_mean, ratio_std)
            if any(math.isnan(float(tb[s, t])) for tb in tables for s in range(streams) for t in span):
                continue
            if tau_cos is not None and any(float(cos_mean[s, t]) < tau_cos for s in range(streams) for t in span):
                continue
            score = sum(sum(float(cos_mean[s, t]) - lam * float(cos_std[s, t]) - gamma * float(ratio_std[s, t])
                            for s in range(streams)) / streams for t in skipped) / len(skipped)
            scored.append((first, last, score))
    if not scored:
        return None
    top = max(s for _, _, s in scored)
    return max((w for w in scored if w[2] >= top - TIE_TOLERANCE), key=lambda w: w[0])


CASES = list(itertools.product([1, 2], [1, 4, 9], [None, 2, 3], [0, 14], [None, 0.5], [(1.0, 1.0), (0.0, 3.0)]))


@pytest.mark.parametrize("streams,skips,refresh,min_step,tau,weights", CASES)
def test_search_matches_brute_force(streams, skips, refresh, min_step, tau, weights):
    steps = 24
    tables = random_tables(streams, steps, seed=streams * 100 + skips * 10 + (refresh or 0))
    lam, gamma = weights
    want = brute_force(*tables, skips, refresh, min_step, tau, lam, gamma)
    if want is None:
        with pytest.raises(PlanError, match="no contiguous window"):
            search_window(*tables, skips, refresh_every=refresh, min_step=min_step, tau_cos=tau, lam=lam, gamma=gamma)
        return
    got = search_window(*tables, skips, refresh_every=refresh, min_step=min_step, tau_cos=tau, lam=lam, gamma=gamma)
    assert got[:2] == want[:2] and math.isclose(got[2], want[2], rel_tol=1e-9, abs_tol=1e-12)


def test_default_late_regime_is_the_second_half():
    cos_mean, cos_std, ratio_mean, ratio_std = random_tables(1, 20, seed=1)
    cos_mean[:, 2:10] = 1.0  # a perfect early region that must not be chosen by default
    cos_std[:, 2:10] = ratio_std[:, 2:10] = 0.0
    first, last, _ = search_window(cos_mean, cos_std, ratio_mean, ratio_std, 3)
    assert first >= 10
    first, last, _ = search_window(cos_mean, cos_std, ratio_mean, ratio_std, 3, min_step=0)
    assert 2 <= first and last < 10


def test_near_ties_go_to_the_latest_window():
    cos_mean = torch.full((1, 12), 1.0, dtype=torch.float64)
    cos_mean[0, :2] = float("nan")
    cos_mean[0, 6] = 1.0 + 1e-7  # float noise must not pull the window earlier
    zeros = torch.zeros_like(cos_mean)
    assert search_window(cos_mean, zeros, cos_mean, zeros, 2, min_step=2)[:2] == (10, 11)
    cos_mean[0, 6] = 1.01  # a real difference wins
    assert search_window(cos_mean, zeros, cos_mean, zeros, 1, min_step=2)[:2] == (6, 6)


def test_budget_resolution():
    assert resolve_budget(None, 50) == 0
    assert resolve_budget(8, 50) == 8 and resolve_budget(8.0, 50) == 8
    assert resolve_budget(0.16, 50) == 8 and resolve_budget(0.25, 50) == 13  # rounds half up
    with pytest.raises(PlanError, match=r"\[0, 1\)"):
        resolve_budget(1.5, 50)
    with pytest.raises(PlanError, match="does not fit"):
        resolve_budget(49, 50)


def test_refresh_pattern_and_span():
    assert span_length(8, None) == 8 and span_length(8, 4) == 9 and span_length(9, 4) == 11 and span_length(0, 3) == 0
    assert list(window_actions(10, 16, 3).values()) == [SKIP, SKIP, SKIP, REFRESH, SKIP, SKIP, SKIP]
    plan = plan_from_window(20, ("c", "u"), 10, 16, 0.9, refresh_every=3)
    assert plan.skipped_steps == (10, 11, 12, 14, 15, 16) and plan.refresh_steps == (13,)
    assert plan.ratio("u", 14) == 0.9 and plan.ratios["c"][13] is None
    assert math.isclose(plan.skipped_fraction, 6 / 20)
    # outputs remembered: the two computed steps before each skip (8, 9 and the refresh 13)
    assert [t for t in range(20) if plan.needs_output(t)] == [8, 9, 13]


def test_plan_errors():
    with pytest.raises(PlanError, match="two computed outputs"):
        plan_from_window(10, ("main",), 1, 3, 1.0)
    with pytest.raises(PlanError, match="first <= last < 10"):
        plan_from_window(10, ("main",), 5, 10, 1.0)
    with pytest.raises(PlanError, match=r"cannot skip steps \[0\]"):
        plan_from_steps(10, ("main",), [0, 5], 1.0)
    ratios = torch.full((1, 10), float("nan"))
    with pytest.raises(PlanError, match="no calibrated ratio for stream 'main' at step 5"):
        plan_from_steps(10, ("main",), [5], ratios)
    with pytest.raises(PlanError, match="cannot be skipped"):
        SkipPlan(4, ("main",), (COMPUTE, SKIP, COMPUTE, COMPUTE), {"main": (None, 1.0, None, None)})


def test_explicit_steps_plan():
    plan = plan_from_steps(12, ("main",), [9, 7, 8], 1.0)
    assert plan.skipped_steps == (7, 8, 9) and plan.window == (7, 9) and plan.source == "explicit"
    assert plan_from_steps(12, ("main",), [5, 9], 1.0).window is None
    assert "3 of 12 steps skipped (25.0% of calls)" in plan.describe()


def test_a_fractional_budget_that_does_not_fit_says_the_fraction():
    """``--budget 0.99`` of 20 steps was said as "budget of 20 skipped steps" (compileuser, 2026-11-28)."""
    from taohooks.taocache.plan import PlanError, resolve_budget

    with pytest.raises(PlanError, match=r"budget of 20 skipped steps \(0.99 of 20 steps\) does not fit 20 steps"):
        resolve_budget(0.99, 20)
    with pytest.raises(PlanError, match=r"budget of 19 skipped steps does not fit 20 steps \(at most 18"):
        resolve_budget(19, 20)
