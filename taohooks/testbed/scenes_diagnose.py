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

With ``--x0-sigmas 0.2,0.5,0.8`` it measures instead, on the first ``--n`` held-out stripe clips, the model's
one-call prediction of the clean clip (``x0 = x_s - s v``, flow) from the rendered clip noised to each sigma
``s``, with and without guidance: the stripe share of that prediction and its cosine to the rendered clip. It
says from which noise level on the model knows stripes it is shown, apart from whether a sampler from pure
noise commits to one.
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


@torch.no_grad()
def x0_stripes(model, n: int, sigmas, guidances=(1.0, 5.0), batch_size: int = 16, seed: int = 0) -> list:
    """Per sigma and guidance: the median stripe share of the one-call clean-clip prediction from the first ``n``
    held-out stripe clips noised to that sigma, the share passing ``STRIPE_SHARE``, and the mean cosine (centred)
    of prediction and rendered clip. Flow checkpoints (``x0 = x_s - s v``)."""
    stripes = scenes.BACKGROUNDS.index("stripes")
    pairs = [(p, s) for p, s in scenes.eval_pairs(max(64, 8 * n)) if p.background == stripes][:n]
    prompts, seeds = [p for p, _ in pairs], [s for _, s in pairs]
    rendered = torch.from_numpy(scenes.render_batch(prompts, seeds)).float()
    cond = torch.from_numpy(scenes.prompt_ids(prompts))
    noise = torch.randn(rendered.shape, generator=torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device
    rows = []
    for sigma in sigmas:
        noisy = (1.0 - sigma) * rendered + sigma * noise
        t = torch.full((len(prompts),), sigma * 1000.0)

        def run(ids):
            return torch.cat([model(noisy[i:i + batch_size].to(device), t[i:i + batch_size].to(device),
                                    ids[i:i + batch_size].to(device)).float().cpu()
                              for i in range(0, len(prompts), batch_size)])

        v_cond, v_null = run(cond), run(torch.full_like(cond, scenes.NULL_ID))
        for g in guidances:
            x0 = (noisy - sigma * (v_null + g * (v_cond - v_null))).clamp(-1, 1)
            shares = [evidence(c, p)["stripe_share"] for c, p in zip(x0, prompts)]
            a, b = x0.flatten(1), rendered.flatten(1)
            cos = torch.nn.functional.cosine_similarity(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True))
            rows.append({"sigma": float(sigma), "guidance": float(g), "n": len(prompts),
                         "stripe_share_median": float(np.median(shares)),
                         "passing": float(np.mean([x >= scenes_recognizer.STRIPE_SHARE for x in shares])),
                         "cosine": float(cos.mean())})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--weights", required=True, help="a scenes checkpoint")
    p.add_argument("--n", type=int, default=32, help="the first N held-out pairs (eval_pairs)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--shift", type=float, default=None, help="flow checkpoints: the sampler's flow_shift (default 3)")
    p.add_argument("--strength", type=float, default=1.0,
                   help="< 1: start from the rendered clips noised to the last STRENGTH of the steps (SDEdit)")
    p.add_argument("--x0-sigmas", default=None, metavar="S1,S2,...",
                   help="instead: the one-call clean-clip prediction's stripes from held-out stripe clips noised to "
                        "each sigma (flow checkpoints; --n clips, guidance 1 and --guidance)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    for flag in ("n", "batch_size", "steps", "threads"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not 0.0 < args.strength <= 1.0:
        p.error(f"--strength {args.strength}: expected 0 < strength <= 1 (the share of the steps run)")
    if guidance_problem(args.guidance):
        p.error(f"--guidance {guidance_problem(args.guidance)}")
    check_out(p, args.out)
    sigmas = None
    if args.x0_sigmas is not None:
        try:
            sigmas = [float(x) for x in args.x0_sigmas.split(",") if x.strip()]
        except ValueError:
            sigmas = []
        if not sigmas or not all(0.0 < x < 1.0 for x in sigmas):
            p.error(f"--x0-sigmas {args.x0_sigmas}: expected comma-separated sigmas in (0, 1), e.g. 0.2,0.5,0.8")
    torch.set_num_threads(args.threads)
    model = load_scenes_checkpoint(args.weights).eval()
    if sigmas is not None:
        if getattr(model.config, "prediction", "flow") != "flow":
            p.error("--x0-sigmas: for flow checkpoints")
        rows = x0_stripes(model, args.n, sigmas, guidances=(1.0, args.guidance), batch_size=args.batch_size)
        for r in rows:
            print(f"sigma {r['sigma']:.2f} guidance {r['guidance']:g}: stripe share median "
                  f"{r['stripe_share_median']:.2f}"
                  f", passing {100 * r['passing']:.0f}% of {r['n']}, cosine to the rendered clip {r['cosine']:.2f}",
                  flush=True)
        if args.out:
            from ..runtime.io import atomic_write_bytes
            atomic_write_bytes(args.out, (json.dumps({"weights": args.weights, "x0": rows}, sort_keys=True)
                                          + "\n").encode())
        return
    pairs = scenes.eval_pairs(args.n)
    prompts, seeds = [q for q, _ in pairs], [s for _, s in pairs]
    rendered = scenes.render_batch(prompts, seeds)
    if args.strength < 1.0 and getattr(model.config, "prediction", "flow") != "flow":
        p.error("--strength: SDEdit is implemented for flow checkpoints")
    if args.shift is not None and getattr(model.config, "prediction", "flow") != "flow":
        p.error(f"--shift {args.shift}: the sampler's shift is for flow checkpoints; {args.weights} is an "
                f"{model.config.prediction} one (DDIM, no shift)")
    if args.shift is not None and args.shift <= 0:
        p.error(f"--shift {args.shift}: expected a shift > 0")
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
