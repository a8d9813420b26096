"""Where a ``scenes`` flow checkpoint's loss is: per noise level, and as training draws it (issue 15).

    python -m taohooks.testbed.scenes_loss --weights A.safetensors [B.safetensors ...] [--out l.json]

On fixed batches of the training distribution (``--batches`` x ``--batch-size`` clips from seed
``--seed``, prompts never dropped; ``--background-weights 0,1,0``: stripes only, as ``train_scenes`` draws
them), for each checkpoint:

- the flow loss ``|v(x_s, s) - (noise - x0)|^2`` at each of ``--sigmas`` (one noise draw, the same for
  every checkpoint), so that two checkpoints show at which noise levels training still moves;
- the training loss with the sigmas drawn as ``train_scenes`` draws them, for each ``--sigma-shift``
  (a run's logged loss depends on its shift: compare like with like).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from . import train_scenes
from .schedules import DDPMSchedule, flow_interpolate
from .scenes_sensitivity import check_out, load_scenes_checkpoint

DEFAULT_SIGMAS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.97)


def batches(seed: int, count: int, size: int, background_weights=None):
    """``count`` training batches ``(x0, ids)`` with no null prompts, the same for every call; backgrounds drawn
    with ``background_weights`` (noise, stripes, gradient; None: uniform)."""
    rng = np.random.default_rng(seed)
    p = train_scenes.background_probabilities(background_weights)
    return [train_scenes.make_batch(rng, size, dropout=0.0, background_p=p) for _ in range(count)]


@torch.no_grad()
def loss_per_sigma(model, data, sigmas, seed: int) -> list:
    """Mean flow loss at each sigma over ``data`` (noise from ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    noises = [torch.randn(x0.shape, generator=gen) for x0, _ in data]
    out = []
    for s in sigmas:
        losses = []
        for (x0, ids), noise in zip(data, noises):
            sigma = torch.full((x0.shape[0],), float(s))
            pred = model(flow_interpolate(x0, noise, sigma), sigma * 1000.0, ids).float()
            losses.append(float((pred - (noise - x0)).pow(2).mean()))
        out.append(float(np.mean(losses)))
    return out


@torch.no_grad()
def training_loss(model, data, shift: float, seed: int) -> float:
    """The loss ``train_scenes`` logs, with its draws of sigma and noise from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return float(np.mean([float(train_scenes.loss_fn("flow", model, x0, ids, DDPMSchedule(), gen, shift))
                          for x0, ids in data]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", nargs="+", required=True, help="scenes flow checkpoints")
    p.add_argument("--sigmas", default=",".join(map(str, DEFAULT_SIGMAS)))
    p.add_argument("--sigma-shift", default="1,3", help="shifts of the training loss, comma-separated")
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--background-weights", type=train_scenes.background_weights_arg, default=None, metavar="N,S,G",
                   help="draw the clips' backgrounds (noise, stripes, gradient) with these weights, e.g. 0,1,0 for "
                        "stripes only (default: uniform, as training draws them)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    try:
        sigmas = [float(s) for s in args.sigmas.split(",") if s.strip()]
        shifts = [float(s) for s in args.sigma_shift.split(",") if s.strip()]
    except ValueError as e:
        p.error(f"--sigmas / --sigma-shift: expected comma-separated numbers ({e})")
    if not sigmas or not all(0.0 < s <= 1.0 for s in sigmas):
        p.error(f"--sigmas {args.sigmas}: expected numbers in (0, 1]")
    if not all(s > 0 for s in shifts):
        p.error(f"--sigma-shift {args.sigma_shift}: expected numbers > 0")
    for flag in ("batches", "batch_size", "threads"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    check_out(p, args.out)
    models = {}  # every checkpoint checked before the first is measured
    for path in args.weights:
        model = load_scenes_checkpoint(path).eval()
        if getattr(model.config, "prediction", "flow") != "flow":
            p.error(f"--weights {path}: an {model.config.prediction} checkpoint; this measures flow checkpoints")
        models[path] = model
    torch.set_num_threads(args.threads)
    data = batches(args.seed, args.batches, args.batch_size, args.background_weights)
    result = {"sigmas": sigmas, "clips": args.batches * args.batch_size, "seed": args.seed,
              "background_weights": args.background_weights, "checkpoints": {}}
    print("sigma      " + " ".join(f"{s:>6.2f}" for s in sigmas))
    for path, model in models.items():
        per_sigma = loss_per_sigma(model, data, sigmas, args.seed)
        trained = {f"{s:g}": training_loss(model, data, s, args.seed) for s in shifts}
        result["checkpoints"][path] = {"per_sigma": per_sigma, "training_loss": trained,
                                       "steps": train_scenes.trained_steps(path)}
        print(f"{path}\n  per sigma " + " ".join(f"{v:.4f}" for v in per_sigma) + "\n  training loss "
              + ", ".join(f"shift {k}: {v:.4f}" for k, v in trained.items()), flush=True)
    if args.out:
        from ..runtime.io import atomic_write_bytes
        atomic_write_bytes(args.out, (json.dumps(result, indent=1, sort_keys=True) + "\n").encode())
    return result


if __name__ == "__main__":
    main()
