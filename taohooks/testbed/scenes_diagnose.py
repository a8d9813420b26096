"""Why a ``scenes`` checkpoint misses its prompts: the recogniser's evidence on its samples, per attribute,
next to the rendered clips of the same pairs (issue 15).

    python -m taohooks.testbed.scenes_diagnose --weights W.safetensors --n 32 [--guidance 5] [--out d.json]
    # can the model keep detail it is given? SDEdit from the rendered clips, the last 30% of the steps:
    python -m taohooks.testbed.scenes_diagnose --weights W.safetensors --n 32 --strength 0.3

For the first ``--n`` ``eval_pairs`` (50 UniPC steps, Wan-shaped loop), over the prompts that ask for it:

- stripes: the median over frames of the background's stripe share (``stripe_share``; stripes at
  >= ``STRIPE_SHARE``);
- square: the corner weight (square at >= ``SQUARE_CORNERS``);
- 2-3 objects: the number of objects seen;

each as median [min, max] and the count passing, for the samples and for the rendered clips, plus the
recogniser's per-attribute accuracy of the samples. With ``--strength S < 1`` the samples start from the
rendered clips noised to the sigma of the last ``S`` of the steps (SDEdit): a detail lost from there is
one the model cannot draw at that noise level, not one its early steps failed to lay out.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from . import scenes, scenes_recognizer, scenes_sampling
from .sampling import guidance_problem
from .scenes_sensitivity import check_out, load_scenes_checkpoint


def evidence(clip, prompt: scenes.ScenePrompt) -> dict:
    """The measurements behind the shape, count and background verdicts of one clip ``[3, 8, 32, 32]``."""
    x = np.asarray(clip.detach().float().cpu().numpy() if hasattr(clip, "detach") else clip, dtype=np.float64)
    r = scenes_recognizer.recognize(x, prompt)
    spread, _, _ = scenes_recognizer.pixel_features(x)
    grey = x.mean(0)
    share = float(np.median([scenes_recognizer.stripe_share(grey[f], spread[f] < scenes_recognizer.GREY)
                             for f in range(scenes.NUM_FRAMES)]))
    return {"corners": r.corners, "objects": r.objects, "stripe_share": share, "background_kind": r.background_kind}


def _summary(values, passing) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"n": len(v), "median": float(np.median(v)) if len(v) else None,
            "min": float(v.min()) if len(v) else None, "max": float(v.max()) if len(v) else None,
            "passing": int(sum(passing))}


def diagnose(samples, rendered, prompts) -> dict:
    """Per-attribute evidence of ``samples`` and ``rendered`` (each ``[B, 3, 8, 32, 32]``) for ``prompts``."""
    out = {"accuracy": scenes_recognizer.accuracy(samples, prompts)}
    for name, clips in (("samples", samples), ("rendered", rendered)):
        ev = [evidence(c, p) for c, p in zip(clips, prompts)]
        stripes = [(e, p) for e, p in zip(ev, prompts) if scenes.BACKGROUNDS[p.background] == "stripes"]
        squares = [(e, p) for e, p in zip(ev, prompts) if scenes.SHAPES[p.shape] == "square"]
        several = [(e, p) for e, p in zip(ev, prompts) if p.count > 1]
        out[name] = {
            "stripe_share": _summary([e["stripe_share"] for e, _ in stripes],
                                     [e["background_kind"] == "stripes" for e, _ in stripes]),
            "square_corners": _summary([e["corners"] for e, _ in squares],
                                       [e["corners"] >= scenes_recognizer.SQUARE_CORNERS for e, _ in squares]),
            "objects_when_2_or_3": _summary([e["objects"] for e, _ in several],
                                            [e["objects"] == p.count for e, p in several]),
        }
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", required=True, help="a scenes checkpoint")
    p.add_argument("--n", type=int, default=32, help="the first N held-out pairs (eval_pairs)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--shift", type=float, default=None, help="flow checkpoints: the sampler's flow_shift (default 3)")
    p.add_argument("--strength", type=float, default=1.0,
                   help="< 1: start from the rendered clips noised to the last STRENGTH of the steps (SDEdit)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.n < 1 or args.batch_size < 1:
        p.error("--n and --batch-size must be >= 1")
    if not 0.0 < args.strength <= 1.0:
        p.error(f"--strength {args.strength}: expected 0 < strength <= 1 (the share of the steps run)")
    if args.steps < 1 or args.threads < 1:
        p.error("--steps and --threads must be >= 1")
    if guidance_problem(args.guidance):
        p.error(f"--guidance {guidance_problem(args.guidance)}")
    check_out(p, args.out)
    torch.set_num_threads(args.threads)
    model = load_scenes_checkpoint(args.weights).eval()
    pairs = scenes.eval_pairs(args.n)
    prompts, seeds = [q for q, _ in pairs], [s for _, s in pairs]
    rendered = scenes.render_batch(prompts, seeds)
    if args.strength < 1.0 and getattr(model.config, "prediction", "flow") != "flow":
        p.error("--strength: SDEdit is implemented for flow checkpoints")
    if args.shift is not None and (args.shift <= 0 or getattr(model.config, "prediction", "flow") != "flow"):
        p.error(f"--shift {args.shift}: a shift > 0, for flow checkpoints")
    sdedit = {} if args.strength == 1.0 else {"strength": args.strength}
    if args.shift is not None:
        sdedit["shift"] = args.shift
    with torch.no_grad():
        samples = torch.cat([
            scenes_sampling.sample(model, prompts[i:i + args.batch_size], seeds[i:i + args.batch_size],
                                   steps=args.steps, guidance=args.guidance,
                                   **({**sdedit, "init": torch.from_numpy(rendered[i:i + args.batch_size])}
                                      if "strength" in sdedit else sdedit))
            for i in range(0, len(prompts), args.batch_size)])
    result = diagnose(samples, rendered, prompts)
    result.update(weights=args.weights, n=args.n, guidance=args.guidance, steps=args.steps, strength=args.strength,
                  shift=args.shift)
    for name in ("samples", "rendered"):
        for what, s in result[name].items():
            if s["n"]:
                print(f"{name:8s} {what:20s} median {s['median']:.2f} [{s['min']:.2f}, {s['max']:.2f}]  "
                      f"passing {s['passing']}/{s['n']}")
    acc = result["accuracy"]
    print("accuracy " + ", ".join(f"{k} {acc[k]:.3f}" for k in ("overall", "colour", "direction", "shape", "count",
                                                                  "background")), flush=True)
    if args.out:
        from ..runtime.io import atomic_write_bytes
        atomic_write_bytes(args.out, (json.dumps(result, sort_keys=True) + "\n").encode())


if __name__ == "__main__":
    main()
