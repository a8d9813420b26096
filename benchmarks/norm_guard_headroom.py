"""How far TaoCache's predictions are from the norm guard on the bundled testbed models.

For each model and plan, the largest ``||prediction|| / ||last real output||`` over the skipped calls
of 4 held-out pairs (calibration on 4 calibration pairs, 50 steps), and the fallbacks the guard
(``plan.max_norm_ratio``, default 10) would take::

    python benchmarks/norm_guard_headroom.py --models flow eps
"""
from __future__ import annotations

import argparse

import torch

from taohooks.config import PlanConfig
from taohooks.evaluation.methods import calibrate
from taohooks.evaluation.testbed_model import TestbedModel
from taohooks.taocache.extrapolation import TaoCacheCallback, _norm
from taohooks.runtime.hook import DenoiserHook
from taohooks.taocache.plan import PlanError
from taohooks.taocache.cache import make_plan
from taohooks.testbed import data

PLANS = ((8, None), (16, None), (25, None), (30, 6))  # (skipped steps, refresh every)


class _Probe(TaoCacheCallback):
    """TaoCacheCallback that also records the largest prediction-to-last-real-output norm ratio."""

    worst = 0.0

    def _sane(self, call, cast, predictions):
        for name, (eps, _) in zip(call.streams, predictions):
            _Probe.worst = max(_Probe.worst, float(_norm(eps) / self._states[name].real_norm))
        return super()._sane(call, cast, predictions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["flow", "eps"])
    parser.add_argument("--pairs", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pairs = data.eval_pairs(args.pairs)
    print("| model | skips | refresh | min_step | window | max norm ratio | fallbacks |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        tm = TestbedModel.load(name, steps=50)
        loop = tm.loop()
        lut = calibrate(tm, data.calibration_pairs(4), 4).lut
        for skips, refresh in PLANS:
            for min_step in (None, 0):
                _Probe.worst = 0.0
                try:
                    plan = make_plan(PlanConfig(budget=skips, refresh_every=refresh, min_step=min_step),
                                     loop.steps, loop.streams, lut)
                except PlanError:
                    continue  # no window of that length in the default late regime
                probe = _Probe(plan, lut.timesteps)
                with DenoiserHook(loop, [probe], timestep_arg=tm.timestep_arg).attach(tm.model) as hook:
                    hook.new_sample()
                    tm.sample(pairs)
                print(f"| {name} | {skips} | {refresh or '-'} | {min_step if min_step is not None else 'default'} | "
                      f"{plan.window[0]}-{plan.window[1]} | {_Probe.worst:.2f} | {dict(probe.fallback_reasons) or 0} |",
                      flush=True)


if __name__ == "__main__":
    main()
