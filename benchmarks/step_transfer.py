"""How far ``calibration.transfer: interpolate`` holds: a LUT calibrated at 50 steps used at 30, 40, 60.

For each testbed model and step count N: a native LUT calibrated at N steps and the 50-step LUT
carried to N (:mod:`taohooks.taocache.lut_transfer`), both on the same calibration pairs; the plans of
``rule: paper`` and ``rule: auto`` at the budget's fraction of N, and their PSNR against the N-step
full run on held-out pairs, with the largest difference of ``C_ratio`` / ``C_cos`` between the two
LUTs over the late half::

    python benchmarks/step_transfer.py --models flow eps --steps 30 40 60 --pairs 16 \\
        --output docs/results/step_transfer
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from taohooks.config import PlanConfig
from taohooks.evaluation.methods import calibrate, run_with
from taohooks.evaluation.testbed_model import TestbedModel
from taohooks.taocache.extrapolation import TaoCacheCallback
from taohooks.taocache.lut_transfer import transfer_lut
from taohooks.metrics import psnr
from taohooks.taocache.cache import make_plan
from taohooks.testbed import data


def _late_gap(a, b, table: str) -> float:
    x, y = getattr(a, table), getattr(b, table)
    half = x.shape[1] // 2
    return float((x[:, half:] - y[:, half:]).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["flow", "eps"])
    parser.add_argument("--steps", nargs="+", type=int, default=[30, 40, 60])
    parser.add_argument("--source-steps", type=int, default=50)
    parser.add_argument("--budget", type=float, default=0.16, help="fraction of the steps skipped")
    parser.add_argument("--pairs", type=int, default=16, help="held-out (prompt, seed) pairs")
    parser.add_argument("--calibration-pairs", type=int, default=20)
    parser.add_argument("--output", default=None, help="folder for results.json and results.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cal_pairs, eval_pairs = data.calibration_pairs(args.calibration_pairs), data.eval_pairs(args.pairs)
    rows, started = [], time.perf_counter()
    for name in args.models:
        source = calibrate(TestbedModel.load(name, args.source_steps), cal_pairs, 16, teacache=False).lut
        weights = "ddpm" if TestbedModel.load(name).prediction == "eps" else "flow"
        for steps in args.steps:
            tm = TestbedModel.load(name, steps)
            native = calibrate(tm, cal_pairs, 16, teacache=False).lut  # (TeaCache's fit: not used here)
            carried = transfer_lut(source, steps)
            reference = run_with(tm, [], eval_pairs, 16).clips
            skips = int(math.floor(args.budget * steps + 0.5))
            row = {"model": name, "steps": steps, "from_steps": args.source_steps, "skips": skips,
                   "ratio_gap": round(_late_gap(native, carried, "ratio_mean"), 4),
                   "cos_gap": round(_late_gap(native, carried, "cos_mean"), 4),
                   "carried_horizon": carried.deltas.horizon}
            for rule in ("paper", "auto"):
                for label, lut in (("native", native), ("carried", carried)):
                    config = PlanConfig(budget=skips, rule=rule)
                    if rule == "auto":
                        config.error_weights = weights
                    plan = make_plan(config, steps, tm.loop().streams, lut)
                    clips = run_with(tm, [TaoCacheCallback(plan, None)], eval_pairs, 16).clips
                    row[f"{rule}_{label}_psnr"] = round(float(psnr(clips, reference).mean()), 2)
                    row[f"{rule}_{label}_steps"] = list(plan.skipped_steps)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("_steps")}), flush=True)
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"command": "python benchmarks/step_transfer.py " + " ".join(
            ["--models", *args.models, "--steps", *map(str, args.steps), "--pairs", str(args.pairs),
             "--output", args.output]), "budget": args.budget, "eval_pairs": args.pairs,
            "calibration_pairs": args.calibration_pairs, "wall_seconds": round(time.perf_counter() - started, 1),
            "torch": torch.__version__}
        (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        lines = [f"`{meta['command']}`", "",
                 "| model | steps | skips | PSNR paper native / carried | PSNR auto native / carried | "
                 "max late C_ratio gap | max late C_cos gap |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['model']} | {r['from_steps']} -> {r['steps']} | {r['skips']} | "
                         f"{r['paper_native_psnr']:.2f} / {r['paper_carried_psnr']:.2f} | "
                         f"{r['auto_native_psnr']:.2f} / {r['auto_carried_psnr']:.2f} | {r['ratio_gap']:.4f} | "
                         f"{r['cos_gap']:.4f} |")
        (out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
