"""Train a testbed ``VideoDiT`` on procedural clips generated on the fly.

    python -m taohooks.testbed.train --kind flow --steps 4000 \\
        --out taohooks/testbed/weights/flow.safetensors

Kinds:

- ``eps``            DDPM noise prediction, linear betas 1e-4..0.02 (1000 steps), uniform
                     integer t; 6 output channels (eps MSE on the first 3, a
                     variational-bound term on the 3 variance channels, as in Latte/DiT).
- ``flow``           rectified flow ``x_s = (1-s) x0 + s noise``, target ``noise - x0``,
                     s ~ U(0, 1), timestep fed = ``s * 1000``.
- ``flow-lognormal`` same with s = sigmoid(N(0, 1)).

10% of prompts are replaced by the null prompt (for classifier-free guidance).
AdamW, linear warm-up then cosine decay, gradient clipping, EMA weights saved
(with a training summary in the safetensors metadata, also written to ``<out>.json``).

``OUT.state.pt`` (``--state``) holds the live weights, EMA, optimizer, step and random states, written with
every intermediate checkpoint and when the run ends; SIGTERM (``timeout``) or Ctrl-C stop the run after its
step with a save, and ``--resume OUT.state.pt`` continues it exactly (a run of N steps and one stopped at
N/2 and resumed give bit-identical weights, on the same ``--threads``), with the run's own settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..runtime.io import atomic_write_bytes
from . import data
from .ema import EMA
from .model import VideoDiT, VideoDiTConfig, num_parameters, read_metadata
from .schedules import DDPMSchedule, flow_interpolate, sample_flow_sigmas
from .stop_signal import StopOnSignal

KINDS = ("eps", "flow", "flow-lognormal")
PROMPT_DROPOUT = 0.1
STATE_FORMAT = "taohooks-testbed-train-state/1"
#: what a resumed run takes from its state: the command line may repeat them, not change them
RUN_SETTINGS = ("steps", "batch_size", "lr", "warmup", "weight_decay", "clip", "ema", "seed", "bf16", "dim", "depth",
                "heads", "mlp_ratio", "init")


def lr_at(step: int, peak: float, warmup: int, total: int, final_frac: float = 0.05) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine down to ``final_frac * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_batch(rng: np.random.Generator, batch_size: int, dropout: float = PROMPT_DROPOUT):
    """Clips ``[B, 3, 8, 16, 16]`` float32 and prompt ids ``[B, 4]`` (10% null rows)."""
    prompts, _, clips = data.random_training_batch(rng, batch_size)
    ids = data.prompt_ids(prompts)
    ids[rng.random(batch_size) < dropout] = data.NULL_ID
    return torch.from_numpy(clips), torch.from_numpy(ids)


def loss_fn(kind: str, model: VideoDiT, x0, ids, ddpm: DDPMSchedule, gen: torch.Generator):
    """Scalar training loss for one batch; returns ``(loss, logs)``."""
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=gen)
    if kind == "eps":
        t = torch.randint(0, ddpm.num_timesteps, (b,), generator=gen)
        x_t = ddpm.add_noise(x0, noise, t)
        out = model(x_t, t.float(), ids).float()
        eps, var = out[:, :3], out[:, 3:]
        mse = (eps - noise).pow(2).mean()
        vb = ddpm.vlb_loss(x0, x_t, t, eps, var)
        return mse + vb, {"mse": mse.item(), "vb": vb.item()}
    sigma = sample_flow_sigmas("uniform" if kind == "flow" else "lognormal", b, gen)
    x_t = flow_interpolate(x0, noise, sigma)
    out = model(x_t, sigma * 1000.0, ids).float()
    mse = (out - (noise - x0)).pow(2).mean()
    return mse, {"mse": mse.item()}


def build_model(kind: str, args) -> VideoDiT:
    config = VideoDiTConfig(
        out_channels=6 if kind == "eps" else 3,
        dim=args.dim,
        depth=args.depth,
        num_heads=args.heads,
        mlp_ratio=args.mlp_ratio,
        prediction="eps" if kind == "eps" else "flow",
        training=kind,
    )
    return VideoDiT(config)


def train(args) -> dict:
    state = read_state(args.resume, args) if args.resume else None  # (its settings into args: before the model)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = build_model(args.kind, args)
    args.previous = None
    if args.init and state is None:  # continue from saved (EMA) weights with a fresh optimizer
        init = VideoDiT.from_pretrained(args.init)  # (a missing or foreign file: ValueError naming it)
        if init.config != model.config:
            differ = [f"{f.name}: file has {getattr(init.config, f.name)!r}, this run expects "
                      f"{getattr(model.config, f.name)!r}" for f in dataclasses.fields(model.config)
                      if getattr(init.config, f.name) != getattr(model.config, f.name)]
            raise ValueError(f"--init {args.init}: another architecture ({'; '.join(differ)})")
        model.load_state_dict(init.state_dict())
        args.previous = json.loads(read_metadata(args.init).get("training", "null"))
    model.train()
    ema = EMA(model, args.ema)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    ddpm = DDPMSchedule()
    out = Path(args.out)
    state_path = Path(args.state) if args.state else out.with_suffix(".state.pt")
    first, wall_before = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        ema.num_updates = state["ema_updates"]
        opt.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["rng"]
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        first, wall_before, args.previous = state["step"], state["wall"], state["previous"]
    print(f"kind={args.kind} params={num_parameters(model)} steps={args.steps} batch={args.batch_size} "
          f"lr={args.lr} threads={args.threads} bf16={args.bf16} out={out} state={state_path}"
          + (f" (resumed at step {first})" if state is not None else ""), flush=True)

    def save_state(step: int, wall: float) -> None:
        buf = io.BytesIO()
        torch.save({"format": STATE_FORMAT, "kind": args.kind, "config": model.config.to_json(),
                    "settings": {k: getattr(args, k) for k in RUN_SETTINGS}, "step": step, "wall": wall,
                    "model": model.state_dict(), "ema": ema.model.state_dict(), "ema_updates": ema.num_updates,
                    "optimizer": opt.state_dict(), "rng": rng.bit_generator.state, "gen": gen.get_state(),
                    "torch_rng": torch.get_rng_state(), "previous": args.previous, "threads": args.threads}, buf)
        atomic_write_bytes(state_path, buf.getvalue())

    start = time.time()
    running, window_start = [], time.time()
    step = first
    with StopOnSignal() as stop:
        bar = tqdm(range(first, args.steps), mininterval=30, desc=args.kind, initial=first, total=args.steps)
        for step in bar:
            if stop.signal is not None:
                break
            logs = _train_step(args, model, ema, opt, ddpm, rng, gen, step, running)
            if (step + 1) % args.log_every == 0:
                sps = (time.time() - window_start) / len(running)
                extra = " ".join(f"{k}={v:.4f}" for k, v in logs.items())
                print(f"step {step + 1} loss {np.mean(running):.4f} ({extra}) lr {opt.param_groups[0]['lr']:.2e} "
                      f"s/step {sps:.3f} elapsed {wall_before + time.time() - start:.0f}s", flush=True)
                bar.set_postfix(loss=f"{np.mean(running):.4f}", s_per_step=f"{sps:.3f}")
                running, window_start = [], time.time()
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
                wall = wall_before + time.time() - start
                _save(ema.model, out, args, step + 1, wall, final=False, kept=True)
                save_state(step + 1, wall)
        else:
            step = args.steps
        bar.close()
    wall = wall_before + time.time() - start
    finished = step >= args.steps
    save_state(step, wall)
    summary = _save(ema.model, out, args, step, wall, final=finished)
    why = "" if finished else f" (stopped by {signal.Signals(stop.signal).name}: --resume {state_path} continues)"
    print(f"done: {step} steps in {wall:.0f}s ({wall / max(step, 1):.3f} s/step) -> {out}{why}", flush=True)
    return summary


def _train_step(args, model, ema, opt, ddpm, rng, gen, step: int, running: list) -> dict:
    """One optimizer step at ``step`` (0-based); its loss appended to ``running``; returns the loss's parts."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step, args.lr, args.warmup, args.steps)
    x0, ids = make_batch(rng, args.batch_size)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
        loss, logs = loss_fn(args.kind, model, x0, ids, ddpm, gen)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    opt.step()
    ema.update(model)
    running.append(loss.item())
    return logs


def read_state(path: str, args) -> dict:
    """The training state at ``path`` (``--resume``), checked; its run settings are put into ``args`` (a setting
    the command line gives differently is refused)."""
    if not Path(path).is_file():
        raise ValueError(f"--resume {path}: no such state file (a run writes OUT.state.pt next to its --out)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - truncated, or not a torch file at all
        raise ValueError(f"--resume {path}: not a readable training state ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"--resume {path}: not a state written by taohooks.testbed.train (expected format "
                         f"{STATE_FORMAT!r}; train_scenes' states are resumed by train_scenes)")
    if state["kind"] != args.kind:
        raise ValueError(f"--resume {path}: a run of kind {state['kind']!r}, but --kind {args.kind!r}")
    for key, value in state["settings"].items():
        given = getattr(args, key)
        if key in getattr(args, "given", ()) and given != value:
            raise ValueError(f"--resume {path}: --{key.replace('_', '-')} {given} given, but the run was trained with "
                             f"{value}; a resumed run continues with its own settings (start a new run with --init "
                             "to change them)")
        setattr(args, key, value)
    threads = state.get("threads")
    if threads is not None and threads != args.threads:
        print(f"note: --resume {path}: the run used --threads {threads}, this one {args.threads}; it continues, but "
              "its weights differ in the last digits from an uninterrupted run's (another float summation order)",
              file=sys.stderr, flush=True)
    return state


def _save(model: VideoDiT, out: Path, args, step: int, wall: float, final: bool, kept: bool = False) -> dict:
    """EMA weights and their summary at ``out`` (``kept``: an intermediate copy, ``OUT-stepNNNNNN``); ``final``:
    the run reached its ``--steps`` (a stopped run's ``out`` says it did not)."""
    summary = {
        "kind": args.kind, "steps_done": step, "steps_planned": args.steps, "final": final,
        "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup, "ema": args.ema,
        "seed": args.seed, "threads": args.threads, "bf16": args.bf16,
        "wall_seconds": round(wall, 1), "seconds_per_step": round(wall / max(step, 1), 4),
        "params": num_parameters(model), "weights": "ema", "init": args.init,
    }
    prev = args.previous  # summary of the run this one continued (--init), if any
    summary["previous"] = prev
    summary["total_steps"] = step + (prev or {}).get("total_steps", (prev or {}).get("steps_done", 0))
    summary["total_wall_seconds"] = round(wall + (prev or {}).get("total_wall_seconds", (prev or {}).get("wall_seconds", 0)), 1)
    if kept:  # intermediate checkpoints sit next to the final one and are kept
        out = out.with_name(f"{out.stem}-step{step:06d}{out.suffix}")
    model.save_pretrained(out, metadata={"training": json.dumps(summary, sort_keys=True)})
    atomic_write_bytes(out.with_suffix(".json"), (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--out", required=True, help="output .safetensors path (EMA weights)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--ema", type=float, default=0.999, help="max EMA decay")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (measured slower on the dev CPU)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=5)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp-ratio", type=float, default=2.0)
    p.add_argument("--init", default=None, help="start from these weights (e.g. to train longer)")
    p.add_argument("--state", default=None, help="training state file (default: OUT.state.pt)")
    p.add_argument("--resume", default=None, metavar="STATE",
                   help="continue the run saved in this state file exactly, with its own settings")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=500, help="keep an intermediate EMA checkpoint OUT-stepNNNNNN.safetensors every this many steps (0 = off)")
    args = p.parse_args(argv)
    saved = {a: a.default for a in p._actions}  # what the command line names (a default repeated, an abbreviation):
    for action in saved:                         # parsed again with no defaults, as argparse reads it
        action.default = argparse.SUPPRESS
    try:
        args.given = set(vars(p.parse_args(argv)))
    finally:
        for action, default in saved.items():
            action.default = default
    for name in ("steps", "batch_size", "log_every", "threads", "depth", "heads", "dim"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("save_every", "warmup"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not args.clip > 0 or not args.lr > 0 or not 0 <= args.ema < 1:
        p.error(f"--clip and --lr must be > 0 and --ema in [0, 1); got {args.clip}, {args.lr}, {args.ema}")
    return args


def main(argv=None):
    try:
        train(parse_args(argv))
    except (OSError, ValueError) as e:
        raise SystemExit(f"taohooks.testbed.train: {e}")


if __name__ == "__main__":
    main()
