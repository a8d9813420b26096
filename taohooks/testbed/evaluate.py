"""Recogniser accuracy of a checkpoint on held-out (prompt, seed) pairs.

    python -m taohooks.testbed.evaluate --weights taohooks/testbed/weights/flow.safetensors \\
        --n 64 --steps 50 --grid docs/testbed_flow_grid.png

Choosing between training checkpoints: score them on ``--split validation`` (seeds
20 000+), then report the chosen one on the default ``--split eval`` (seeds 10 000+)::

    python -m taohooks.testbed.evaluate --split validation --n 128 --weights run/eps-step*.safetensors
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from . import data, recognizer, sampling
from .grid import check_grid_arg, save_grid
from .model import VideoDiT


SPLITS = {"eval": data.eval_pairs, "validation": data.validation_pairs}


def evaluate(model: VideoDiT, n: int = 64, steps: int = 50, split: str = "eval", **sample_kwargs):
    """Sample ``n`` pairs of ``split`` and score them; returns ``(clips [n,3,8,16,16], accuracy dict)``."""
    pairs = SPLITS[split](n)
    prompts, seeds = [p for p, _ in pairs], [s for _, s in pairs]
    clips = sampling.sample(model, prompts, seeds, steps=steps, **sample_kwargs)
    return clips, recognizer.accuracy(clips, prompts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", required=True, nargs="+", help="one or more checkpoints; one JSON line each")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--split", choices=sorted(SPLITS), default="eval",
                   help="eval: the reported held-out pairs; validation: other held-out pairs, for choosing checkpoints")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--shift", type=float, default=None, help="flow models only")
    p.add_argument("--scheduler", default=None, help="eps models only: ddim | pndm")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--grid", default=None, help="write a PNG grid of the first --grid-rows clips")
    p.add_argument("--grid-rows", type=int, default=16)
    args = p.parse_args(argv)
    for name in ("n", "steps", "threads", "grid_rows"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.grid and len(args.weights) > 1:
        p.error("--grid takes a single --weights file")
    if args.guidance is not None and sampling.guidance_problem(args.guidance):
        p.error(f"--guidance {sampling.guidance_problem(args.guidance)}")
    if args.grid:
        check_grid_arg(p, args.grid)
    models = []  # every file checked before the first evaluation
    for weights in args.weights:
        try:
            model = VideoDiT.from_pretrained(weights)
        except ValueError as exc:
            p.error(f"--weights {exc}")
        if tuple(model.config.attribute_sizes) != tuple(data.ATTRIBUTE_SIZES):
            p.error(f"--weights {weights}: not a checkpoint of the small task (a scenes checkpoint? its evaluation "
                    "is python -m taohooks.testbed.scenes_sensitivity)")
        prediction = getattr(model.config, "prediction", "flow")
        if (args.scheduler is not None and prediction != "eps") or (args.shift is not None and prediction == "eps"):
            p.error(f"--weights {weights}: a {prediction} checkpoint; --scheduler is for eps models, --shift for "
                    "flow models")
        models.append(model)
    torch.set_num_threads(args.threads)
    kwargs = {k: v for k, v in (("guidance", args.guidance), ("shift", args.shift), ("scheduler", args.scheduler))
              if v is not None}
    for weights, model in zip(args.weights, models):
        start = time.time()
        clips, acc = evaluate(model, n=args.n, steps=args.steps, split=args.split, **kwargs)
        acc["seconds"] = round(time.time() - start, 1)
        print(json.dumps({"weights": weights, "split": args.split, "steps": args.steps, **kwargs, **acc}), flush=True)
    if args.grid:
        pairs = SPLITS[args.split](args.n)[: args.grid_rows]
        labels = [
            f"{p.text} [{'ok' if recognizer.recognize(c, p).ok else 'miss'}]" for c, (p, _) in zip(clips, pairs)
        ]
        save_grid(clips[: args.grid_rows], args.grid, labels=labels)

if __name__ == "__main__":
    main()
