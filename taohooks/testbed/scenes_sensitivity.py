"""How much an early or mid-sampling error costs on a scenes checkpoint (issue 15's targets).

    python -m taohooks.testbed.scenes_sensitivity --weights /work/runs/scenes/flow.safetensors \\
        --n 16 --out sensitivity.json

Against the full-step clips of ``--n`` held-out pairs (50 UniPC steps, guidance 5, shift 3;
PSNR in dB, data range 1 after mapping [-1, 1] -> [0, 1], as in the bench):

- ``skip``: one step's block stack replaced by the previous call's residual (TeaCache's reuse),
  at each step of ``--skip-steps``; the issue wants an early skip to cost more than a late one;
- ``noise``: the initial noise changed by a relative ``--noise-change`` (``sqrt(1-e^2) n + e z``,
  ``||change|| / ||n|| ~ e``); target <= 40 dB at 1%;
- ``teacache``: TeaCache at ``--budget`` (fraction of steps skipped; its threshold searched on
  calibration pairs, as the bench does); target <= 40 dB at 4%;
- ``late_cosine``: the calibrated cosine of consecutive output deltas, mean over streams and the
  second half of the steps (the paper's regime: >= 0.95);
- ``accuracy``: recogniser accuracy of the full-step clips.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from typing import Sequence, Tuple

import torch

from ..evaluation.methods import MethodSettings, build_method, calibrate, run_with
from ..evaluation.testbed_model import TestbedModel
from ..runtime.loop import LoopSpec
from ..metrics import psnr
from ..caches.residual import ResidualSkipCallback
from . import scenes, scenes_recognizer, scenes_sampling
from .model import VideoDiT
from .sampling import guidance_problem

#: the degree of TeaCache's polynomial (``TeaCacheCalibrator.fit``'s default)
TEACACHE_DEGREE = 4


@dataclass
class SceneTestbedModel(TestbedModel):
    """A scenes checkpoint seen by ``taohooks.evaluation`` (flow: Wan loop; eps: Latte loop)."""

    __test__ = False
    guidance: float = 5.0

    def loop(self) -> LoopSpec:
        if self.guidance <= 1.0:
            return LoopSpec(self.steps, ("cond",))  # no CFG: one call per step (either loop)
        return super().loop()

    def sample(self, pairs: Sequence[Tuple[object, int]], noise: torch.Tensor = None) -> torch.Tensor:
        """Clips ``[B, 3, 8, 32, 32]`` in [-1, 1], on the CPU whatever the model's device."""
        prompts, seeds = [p for p, _ in pairs], [s for _, s in pairs]
        return scenes_sampling.sample(self.model, prompts, seeds, steps=self.steps, guidance=self.guidance,
                                      noise=noise).float().cpu()

    def eval_pairs(self, n: int) -> list:
        return scenes.eval_pairs(n)

    def calibration_pairs(self, n: int) -> list:
        return scenes.calibration_pairs(n)

    def accuracy(self, clips: torch.Tensor, prompts) -> float:
        return float(scenes_recognizer.accuracy(clips, prompts)["overall"])


def perturbed_noise(pairs, change: float, seed: int = 0) -> torch.Tensor:
    """Initial noise of ``pairs`` moved by a relative ``change``: ``sqrt(1-change^2) n + change z``."""
    base = scenes_sampling.initial_noise([p for p, _ in pairs], [s for _, s in pairs])
    z = torch.randn(base.shape, generator=torch.Generator().manual_seed(seed))
    return math.sqrt(1 - change ** 2) * base + change * z


def measure(tm: SceneTestbedModel, n: int, skip_steps: Sequence[int], noise_changes: Sequence[float],
            budget: float, batch_size: int, search_pairs: int, search_iterations: int, calibration_n: int = 8,
            log=print, grid: str = None) -> dict:
    pairs = scenes.eval_pairs(n)
    prompts = [p for p, _ in pairs]
    start = time.time()
    reference = run_with(tm, [], pairs, batch_size).clips
    out = {"n": n, "steps": tm.steps, "guidance": tm.guidance,
           "accuracy": scenes_recognizer.accuracy(reference, prompts)}
    log(f"full step: accuracy {out['accuracy']['overall']:.3f} ({time.time() - start:.0f}s)")
    if grid:
        from .grid import save_grid
        labels = [f"{p.text} [{'ok' if scenes_recognizer.recognize(c, p).ok else 'miss'}]"
                  for c, p in zip(reference[:8], prompts)]
        save_grid(reference[:8], grid, labels=labels, scale=2)

    def score(clips):
        return round(float(psnr(clips, reference).mean()), 2)

    out["skip"] = {}
    for k in skip_steps:
        out["skip"][str(k)] = score(run_with(tm, [ResidualSkipCallback([k], blocks=tm.blocks)], pairs,
                                             batch_size).clips)
        log(f"skip step {k}: {out['skip'][str(k)]} dB")
    out["noise"] = {}
    for e in noise_changes:
        clips = torch.cat([tm.sample(chunk, noise=perturbed_noise(chunk, e))
                           for chunk in (pairs[i:i + batch_size] for i in range(0, n, batch_size))])
        out["noise"][str(e)] = score(clips)
        log(f"noise change {e}: {out['noise'][str(e)]} dB")
    cal = calibrate(tm, scenes.calibration_pairs(calibration_n), batch_size, teacache=budget > 0)
    cos = cal.lut.cos_mean  # [streams, steps]
    out["late_cosine"] = round(float(torch.nanmean(cos[:, tm.steps // 2:].float())), 4)
    out["cosine_by_step"] = [None if math.isnan(v) else round(float(v), 4)  # NaN: no delta yet
                             for v in torch.nanmean(cos.float(), dim=0).tolist()]
    log(f"late-step delta cosine {out['late_cosine']}")
    if budget > 0:
        skips = max(1, round(budget * tm.steps))
        built = build_method("teacache", tm, cal, skips, scenes.calibration_pairs(calibration_n)[:search_pairs], batch_size,
                             MethodSettings(search_iterations=search_iterations))
        run = run_with(tm, built.callbacks, pairs, batch_size)
        out["teacache"] = {"budget": budget, "skipped": round(run.skipped_fraction, 4), "psnr": score(run.clips),
                           "accuracy": scenes_recognizer.accuracy(run.clips, prompts)["overall"],
                           **{k: v for k, v in built.info.items() if isinstance(v, (int, float))}}
        log(f"teacache: {out['teacache']}")
    out["seconds"] = round(time.time() - start, 1)
    return out


def check_out(parser, path) -> None:
    """``--out``: a ``.json`` file that can be written, checked before the work (a parser error otherwise). Any other
    name is refused: ``train_scenes``' ``--out`` is the weights, and typed here out of habit it replaced the very
    checkpoint measured with the records (bad-input walkthrough, 2026-11-27)."""
    if path:
        from ..runtime.io import check_writable
        if not str(path).lower().endswith(".json"):
            parser.error(f"--out {path}: expected a .json file name such as result.json (the records are JSON; "
                         "this is not train_scenes' --out, the weights)")
        try:
            check_writable(path)
        except OSError as exc:
            parser.error(f"--out {exc}")


def load_scenes_checkpoint(path: str) -> VideoDiT:
    """A scenes checkpoint (``--weights``), or ``SystemExit`` naming the file and what is wrong with it."""
    try:
        model = VideoDiT.from_pretrained(path)
    except Exception as e:
        raise SystemExit(f"--weights {path}: cannot load a testbed checkpoint ({type(e).__name__}: {e})")
    if model.config.height != scenes.HEIGHT or tuple(model.config.attribute_sizes) != scenes.ATTRIBUTE_SIZES:
        raise SystemExit(f"--weights {path}: not a scenes checkpoint (height {model.config.height}, "
                         f"attribute_sizes {model.config.attribute_sizes}; expected {scenes.HEIGHT} and "
                         f"{scenes.ATTRIBUTE_SIZES})")
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", help="a scenes checkpoint")
    p.add_argument("--exact", type=int, default=None, metavar="K",
                   help="instead of --weights: the exact-score control with K clips per prompt (scenes_exact)")
    p.add_argument("--tau", type=float, default=0.05, help="--exact: width of each mixture component")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--skip-steps", default="2,5,10,15,25,35,45", help="comma-separated steps, each skipped alone")
    p.add_argument("--noise-change", default="0.01,0.05", help="comma-separated relative changes of the initial noise")
    p.add_argument("--budget", type=float, default=0.04, help="TeaCache's skipped fraction (0: leave it out)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--calibration-pairs", type=int, default=8, help="for the cosines and TeaCache's polynomial")
    p.add_argument("--search-pairs", type=int, default=4, help="the first of the calibration pairs, for the threshold")
    p.add_argument("--search-iterations", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda); clips are scored on the CPU")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--grid", default=None, help="write a PNG of the first 8 full-step clips here")
    args = p.parse_args(argv)
    if (args.weights is None) == (args.exact is None):
        p.error("give --weights or --exact")
    for name in ("n", "steps", "batch_size", "calibration_pairs", "search_pairs", "search_iterations", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.steps < 3:  # (the late-step cosine needs two deltas; a skipped step two computed ones before it)
        p.error(f"--steps {args.steps}: expected at least 3 (one step to skip or to measure a delta cosine on)")
    if guidance_problem(args.guidance):
        p.error(f"--guidance {guidance_problem(args.guidance)}")
    if args.exact is not None and args.exact < 1:
        p.error(f"--exact must be >= 1 clips per prompt, got {args.exact}")
    if not 0 <= args.budget < 1:
        p.error(f"--budget {args.budget}: expected a fraction of the calls in [0, 1) (0: no TeaCache)")
    fit_pairs = args.calibration_pairs * (2 if args.guidance > 1 else 1) * (args.steps - 1)  # (per prompt, stream)
    if args.budget > 0 and fit_pairs <= TEACACHE_DEGREE:
        p.error(f"--budget {args.budget}: TeaCache's degree-{TEACACHE_DEGREE} polynomial needs more than "
                f"{TEACACHE_DEGREE} (input, output) change pairs; --calibration-pairs {args.calibration_pairs} with "
                f"--steps {args.steps} gives {fit_pairs}: give more calibration pairs or steps, or --budget 0")
    try:
        skip_steps = [int(s) for s in args.skip_steps.split(",") if s]
        changes = [float(e) for e in args.noise_change.split(",") if e]
    except ValueError as exc:
        p.error(f"--skip-steps / --noise-change: comma-separated numbers expected ({exc})")
    if any(not 0 < e < 1 for e in changes):
        p.error(f"--noise-change {args.noise_change}: each change must be in (0, 1)")
    bad = [s for s in skip_steps if not 0 < s < args.steps - 1]
    if bad:
        p.error(f"--skip-steps {bad}: expected steps in 1..{args.steps - 2}")
    check_out(p, args.out)
    if args.grid:
        from .grid import check_grid_arg
        check_grid_arg(p, args.grid)
    torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise SystemExit(f"--device {args.device}: not usable here ({type(e).__name__}: {e})")
    if args.exact is not None:
        from .scenes_exact import ExactSceneDenoiser
        model = ExactSceneDenoiser(args.exact, args.tau)
    else:
        model = load_scenes_checkpoint(args.weights)  # checked to be a scenes checkpoint
    name = "scenes-eps" if getattr(model.config, "prediction", "flow") == "eps" else "scenes"  # as the bench names it
    tm = SceneTestbedModel(name, model.to(device).eval(), args.steps, guidance=args.guidance)
    result = measure(tm, args.n, skip_steps, changes, args.budget,
                     args.batch_size, args.search_pairs, args.search_iterations, args.calibration_pairs, grid=args.grid)
    result["weights"] = args.weights if args.exact is None else model.describe()
    result["device"] = str(device)
    text = json.dumps(result, sort_keys=True)
    print(text, flush=True)
    if args.out:
        from ..runtime.io import atomic_write_bytes
        atomic_write_bytes(args.out, (text + "\n").encode())


if __name__ == "__main__":
    main()
