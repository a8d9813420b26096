"""Train the ``scenes`` video DiT (~6.5M parameters) on CPU or GPU, resumably.

    python -m taohooks.testbed.train_scenes --kind flow --steps 20000 --out /work/runs/scenes/flow.safetensors
    # after an interruption, or to go on with more steps (exact continuation):
    python -m taohooks.testbed.train_scenes --kind flow --steps 40000 --out /work/runs/scenes/flow.safetensors \\
        --resume /work/runs/scenes/flow.state.pt

Two files are rewritten at every save (atomically: an interrupted save keeps the previous ones):

- ``OUT``: the EMA weights in float16 (13 MB; loads with ``VideoDiT.from_pretrained``) with the
  config and a training summary as metadata (also in ``OUT.json``);
- ``OUT.state.pt`` (``--state``): live weights, EMA, optimizer, step and random states in float32
  (~104 MB; ~131 MB with ``--patch 4``), what ``--resume`` continues from exactly.

``--init WEIGHTS`` instead starts from saved EMA weights with a fresh optimizer (fine-tuning).
A run ends at ``--steps``, after ``--max-minutes`` of training, or on SIGTERM (``timeout``, ``kill``)
or Ctrl-C: each of them saves first, so that ``--resume`` continues from the last step done.
Saves happen every ``--save-every`` steps and at least every ``--save-minutes`` minutes; with
``--keep-every N`` a copy ``OUT-stepNNNNNN.safetensors`` is kept every N steps. The learning rate
warms up linearly, then stays constant (``--schedule constant``, so that a run can be extended)
or follows a cosine to 5% over ``--steps`` (``--schedule cosine``) or over what is left of this
process's ``--max-minutes`` once the warmup is done (``--schedule cosine-time``: a run given a fixed
time, e.g. a GPU lease, whose step count is not known in advance, ends annealed; such a run is
continued with ``--init``, not ``--resume``). A run started with ``--init`` draws its data and noise
from streams offset by the steps behind those weights, so that chained runs do not replay each
other's batches. Loss: as ``train.loss_fn``; ``--sigma-shift K`` draws the flow sigmas shifted as the
sampler's ``flow_shift`` shifts its steps (K = 3: as the scenes sampling). ``--compile inductor`` trains
through ``torch.compile`` (same parameters, same saved files; the first log line includes the compilation;
a compiler that fails at the first step leaves the run uncompiled, with a message); ``--profile N`` prints
where N steps' time goes (``torch.profiler``; on a GPU its kernels' time).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import queue
import secrets
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save

from ..runtime.io import atomic_write_bytes
from . import scenes
from .ema import EMA
from .model import VideoDiT, VideoDiTConfig, num_parameters, read_metadata
from .scenes_render import pack_params, render_params, scene_params, unpack_params
from .schedules import DDPMSchedule, flow_interpolate, sample_flow_sigmas
from .stop_signal import StopOnSignal
from .train import KINDS, PROMPT_DROPOUT

STATE_FORMAT = "taohooks-scenes-train-state/1"


#: Hyperparameters a resumed run takes from its state unless the command line gives them, and their
#: defaults for a new run.
HPARAM_DEFAULTS = {"batch_size": 32, "lr": 5e-4, "warmup": 300, "schedule": "constant", "weight_decay": 0.0,
                   "clip": 1.0, "ema": 0.999, "seed": 0, "sigma_shift": 1.0, "background_weights": None}
HPARAMS = tuple(HPARAM_DEFAULTS)
#: The architecture flags: a resumed run takes them from its state's model config unless given (then they must
#: agree with it), a new run from these defaults; the config's names for them.
ARCH_DEFAULTS = {"dim": 256, "depth": 6, "heads": 8, "mlp_ratio": 2.0, "patch": 8}
ARCH_CONFIG_KEYS = {"dim": "dim", "depth": "depth", "heads": "num_heads", "mlp_ratio": "mlp_ratio",
                    "patch": "patch_size"}

def scenes_config(kind: str, dim: int = 256, depth: int = 6, heads: int = 8, mlp_ratio: float = 2.0,
                  patch_size: int = 8) -> VideoDiTConfig:
    """The scenes DiT: 8 x 32 x 32 clips, 8x8 patches -> 128 tokens; defaults give 6.49M parameters."""
    return VideoDiTConfig(
        out_channels=6 if kind == "eps" else 3, num_frames=scenes.NUM_FRAMES, height=scenes.HEIGHT,
        width=scenes.WIDTH, patch_size=patch_size, dim=dim, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio,
        attribute_sizes=tuple(scenes.ATTRIBUTE_SIZES), prediction="eps" if kind == "eps" else "flow",
        training=f"scenes-{kind}")


def background_probabilities(weights) -> list[float] | None:
    """``--background-weights`` (one weight per ``scenes.BACKGROUNDS``) as probabilities; None: uniform."""
    if weights is None:
        return None
    return [float(w) / float(sum(weights)) for w in weights]


def make_batch(rng: np.random.Generator, batch_size: int, dropout: float = PROMPT_DROPOUT, pixels: bool = True,
               background_p=None):
    """Clips ``[B, 3, 8, 32, 32]`` float32 and prompt ids ``[B, 5]`` (``dropout`` of rows null); with ``pixels``
    False the clips' draws instead, packed (``scenes_render.pack_params``, ``[B, 133]``: the training device
    renders them, and the same ``rng`` draws the same clips). ``background_p``: the backgrounds' probabilities
    (:func:`background_probabilities`; None: uniform, as every other attribute)."""
    prompts, seeds = scenes.random_training_pairs(rng, batch_size, background_p)
    clips = torch.from_numpy(scenes.render_batch(prompts, seeds)) if pixels else \
        pack_params(scene_params(prompts, seeds))
    ids = scenes.prompt_ids(prompts)
    ids[rng.random(batch_size) < dropout] = scenes.NULL_ID
    return clips, torch.from_numpy(ids)


class BatchStream(torch.utils.data.IterableDataset):
    """Endless training batches from ``--workers`` processes (for GPUs, where rendering on the main
    process would be the bottleneck: ~1.8 ms of CPU per clip; ``pixels`` False: the clips' draws, which
    the device renders). Worker ``i`` draws from ``default_rng([seed, start_step, i])``, so a resumed run
    does not repeat batches; the order in which workers deliver is not fixed, so runs with workers are not
    bit-reproducible."""

    def __init__(self, seed: int, start_step: int, batch_size: int, pixels: bool = True, background_p=None):
        self.seed, self.start_step, self.batch_size, self.pixels = seed, start_step, batch_size, pixels
        self.background_p = background_p

    @staticmethod
    def worker_init(worker_id: int) -> None:
        """Workers ignore SIGTERM and SIGINT: ``timeout`` and Ctrl-C signal the whole process group,
        and a worker killed mid-save would abort the main process's last save (it stops the workers
        itself when it ends)."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, self.start_step, info.id if info else 0])
        while True:
            yield make_batch(rng, self.batch_size, pixels=self.pixels, background_p=self.background_p)


class _SourceEnded:
    """What the filling thread queues when its source ends: ``error`` (``StopIteration`` at a plain end) is
    raised to the consumer, which would otherwise wait for ever on a dead worker."""

    def __init__(self, error: BaseException):
        self.error = error


class EchoingBatches:
    """Adaptive data echoing (Choi et al. 2019, "Faster Neural Network Training with Data Echoing"): a thread
    keeps pulling batches from ``source`` into a small queue; each ``next`` takes a fresh batch when one is
    ready, else trains on the last batch again (with fresh noise and times: the loss draws them) up to
    ``max_echo`` times before it waits. When rendering keeps up, nothing is echoed; when it does not, the
    accelerator does not idle. ``fresh`` and ``echoed`` count what was handed out. An error of the source
    (a dead worker) is raised by the next ``next`` that finds no batch left; :meth:`close` stops the thread."""

    def __init__(self, source, max_echo: int, queue_size: int = 8):
        self.max_echo, self.fresh, self.echoed = max_echo, 0, 0
        self._queue: "queue.Queue" = queue.Queue(maxsize=queue_size)
        self._last, self._streak = None, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(iter(source),), daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        """Queue ``item``, waiting while the queue is full; False if :meth:`close` came first."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, source) -> None:
        try:
            for batch in source:
                if not self._put(batch):
                    return
            self._put(_SourceEnded(StopIteration()))
        except BaseException as e:  # handed to the consumer, which would otherwise wait for ever
            self._put(_SourceEnded(e))
        finally:
            if hasattr(source, "close"):  # a generator over a DataLoader: closing it stops the worker processes
                source.close()

    def close(self) -> None:
        """Stop the filling thread and, through the source, its worker processes (else they outlive the
        training and the interpreter's exit waits on them)."""
        self._stop.set()
        self._thread.join(timeout=60)

    def __iter__(self):
        return self

    def __next__(self):
        if self._last is not None and self._streak < self.max_echo and self._queue.empty():
            self._streak += 1
            self.echoed += 1
            return self._last
        item = self._queue.get()
        if isinstance(item, _SourceEnded):
            self._queue.put(item)  # every later call raises too
            raise item.error
        self._last, self._streak = item, 0
        self.fresh += 1
        return self._last


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """``shift * s / (1 + (shift - 1) * s)``: the flow shift of the sampler (``flow_shift``), applied to
    training sigmas so that training sees noise levels as often as sampling does (SD3, Esser et al. 2024,
    shifts both); 1 leaves them as they are."""
    return sigma if shift == 1.0 else shift * sigma / (1.0 + (shift - 1.0) * sigma)


def step_generator(gen: torch.Generator, device: torch.device) -> torch.Generator:
    """The generator a training step draws its noise, times and sigmas from, all decided by the CPU generator
    ``gen``: on the CPU ``gen`` itself; on an accelerator one there, seeded with one draw of ``gen``. Drawing on
    the CPU would cost the accelerator's step: the 6.3 M noise values of a batch of 256 take 38-48 ms on one CPU
    thread of the dev machine, and the first H200 runs, which drew them there, took 73 ms a step (and moving
    pageable CPU draws to the device waits for the device). A run resumes exactly on the same kind of device;
    a GPU run's draws are not the CPU run's."""
    if device.type == "cpu":
        return gen
    seed = int(torch.randint(0, 2 ** 63 - 1, (1,), generator=gen))
    return torch.Generator(device=device).manual_seed(seed)


def loss_fn(kind: str, model: VideoDiT, x0, ids, ddpm: DDPMSchedule, gen: torch.Generator,
            sigma_shift: float = 1.0) -> torch.Tensor:
    """The loss of ``train.loss_fn`` with the random draws decided by the CPU ``gen`` (:func:`step_generator`);
    flow sigmas shifted by ``sigma_shift`` (:func:`shift_sigmas`)."""
    b, dev = x0.shape[0], x0.device
    g = step_generator(gen, dev)
    noise = torch.randn(x0.shape, generator=g, device=dev)
    if kind == "eps":
        t = torch.randint(0, ddpm.num_timesteps, (b,), generator=g, device=dev)
        out = model(ddpm.add_noise(x0, noise, t), t.float(), ids).float()
        return (out[:, :3] - noise).pow(2).mean() + ddpm.vlb_loss(x0, ddpm.add_noise(x0, noise, t), t,
                                                                  out[:, :3], out[:, 3:])
    sigma = shift_sigmas(sample_flow_sigmas("uniform" if kind == "flow" else "lognormal", b, g, device=dev),
                         sigma_shift)
    out = model(flow_interpolate(x0, noise, sigma), sigma * 1000.0, ids).float()
    return (out - (noise - x0)).pow(2).mean()


def lr_at(step: int, peak: float, warmup: int, total: int, schedule: str, time_fraction: float = 0.0) -> float:
    """The learning rate at ``step`` (0-based); ``time_fraction``: the part of ``--max-minutes`` spent
    (``cosine-time`` only)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    if schedule == "cosine-time":
        progress = min(1.0, max(0.0, time_fraction))
    else:
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_half(model: VideoDiT, path: Path, metadata: dict) -> None:
    """EMA weights as float16 safetensors with the config as metadata (``from_pretrained`` reads it)."""
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    meta = {**metadata, "config": model.config.to_json(), "format": "pt"}
    atomic_write_bytes(path, save(state, metadata=meta))


def load_weights(path: str, config: VideoDiTConfig | None, what: str) -> VideoDiT:
    """A checkpoint whose config must equal ``config`` (None: any); errors name the file and the differing keys."""
    if Path(path).is_dir():
        raise ValueError(f"{what} {path}: a folder, not a checkpoint file")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        model = VideoDiT.from_pretrained(path)
    except Exception as e:
        raise ValueError(f"{what} {path}: not a testbed checkpoint ({type(e).__name__}: {e})") from e
    if config is not None:
        _check_config(model.config, config, path, what)
    return model


#: what may differ between a --warm-start checkpoint and the run's model (the rest of the config must agree)
WARM_START_MAY_DIFFER = ("out_channels", "prediction", "training")


def warm_start(model: VideoDiT, path: str) -> dict:
    """``--warm-start``: copy into ``model`` every tensor of the checkpoint at ``path`` whose name and shape it
    has (a scenes checkpoint of another kind: the flow model's trunk for an eps run, whose output layer has twice
    the channels); the rest keeps its initialisation (adaLN-Zero: the output layer starts at zero). The two
    models must agree on everything but :data:`WARM_START_MAY_DIFFER`. Returns what the summary records."""
    other = load_weights(path, None, "--warm-start")
    items = _config_differences(other.config, model.config, ignore=WARM_START_MAY_DIFFER)
    if items:
        raise ValueError(f"--warm-start {path}: another architecture ({items}); only "
                         f"{', '.join(WARM_START_MAY_DIFFER)} may differ")
    if not _config_differences(other.config, model.config):  # (it replayed that run's batches and kept no chain)
        raise ValueError(f"--warm-start {path}: a checkpoint of this run's own kind ({other.config.training}); "
                         f"continue from it with --init {path}, which keeps its step count and data offset")
    own, theirs = model.state_dict(), other.state_dict()
    copied = {k: v for k, v in theirs.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict({**own, **copied})
    left = sorted(k for k in own if k not in copied)
    print(f"warm start from {path} ({other.config.training}): {len(copied)} of {len(own)} tensors copied; "
          f"left at their initialisation: {', '.join(left) or 'none'}", flush=True)
    summary = training_summary(path, "--warm-start") or {}
    return {"path": str(path), "training": other.config.training, "total_steps": summary.get("total_steps"),
            "left": left}


def training_summary(path, what: str) -> dict | None:
    """The training summary a checkpoint of this script carries (``None``: none, e.g. the bundled weights); a damaged
    one is a ``ValueError`` naming the file (it ended in a traceback: bad-input walkthrough, 2026-11-27)."""
    text = read_metadata(path).get("training")
    if text is None:
        return None
    try:
        summary = json.loads(text)
        if summary is not None and not (isinstance(summary, dict)
                                        and isinstance(summary.get("total_steps", 0), int)):
            raise ValueError("expected an object whose total_steps is a whole number")
    except ValueError as exc:
        raise ValueError(f"{what} {path}: its training summary (metadata 'training') does not read ({exc}); "
                         "was the file written by train_scenes?") from None
    return summary


def trained_steps(path) -> int | None:
    """The steps behind a checkpoint written by this script (its summary's ``total_steps``: ``--init`` chains
    included); None for a missing or unreadable file, or one without a summary."""
    try:
        summary = json.loads(read_metadata(path).get("training", "null"))
        return int(summary["total_steps"])
    except Exception:
        return None


def newest_checkpoint(paths) -> str | None:
    """Of ``paths``, the checkpoint with the most :func:`trained_steps` (the first of equals); None if none
    reads (``benchmarks/gpu_session.sh``: a stale carried copy must not win over newer committed weights)."""
    best, most = None, -1
    for path in paths:
        steps = trained_steps(path)
        if steps is not None and steps > most:
            best, most = str(path), steps
    return best


def _config_differences(found: VideoDiTConfig, expected: VideoDiTConfig, ignore=()) -> str:
    """``dim: file has 32, this run expects 64, ...`` for the config keys that differ (but ``ignore``); "" if none."""
    a, b = json.loads(found.to_json()), json.loads(expected.to_json())
    return ", ".join(f"{k}: file has {a.get(k)!r}, this run expects {b.get(k)!r}" for k in sorted(set(a) | set(b))
                     if a.get(k) != b.get(k) and k not in ignore)


def _check_config(found: VideoDiTConfig, expected: VideoDiTConfig, path, what: str) -> None:
    items = _config_differences(found, expected)
    if not items:
        return
    if (found.height, tuple(found.attribute_sizes)) != (expected.height, tuple(expected.attribute_sizes)):
        advice = "it is a checkpoint of another task (frames and prompts differ), which no flag makes fit"
    elif what == "--init" and not _config_differences(found, expected, ignore=WARM_START_MAY_DIFFER):
        advice = (f"it is a {found.training} checkpoint: start this {expected.training} run from its trunk with "
                  f"--warm-start {path}")
    else:
        advice = "pass the same --kind/--dim/--depth/--heads/--mlp-ratio/--patch as the run that wrote it"
    raise ValueError(f"{what} {path} does not match this run's model ({items}); {advice}")


class Trainer:
    """Model, EMA, optimizer and random states of one run; ``state_dict`` / ``load`` for resuming."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.config = scenes_config(args.kind, args.dim, args.depth, args.heads, args.mlp_ratio, args.patch)
        torch.manual_seed(args.seed)
        self.model = VideoDiT(self.config).to(self.device)
        self.previous = None
        self.run_id = secrets.token_hex(8)  # (a resumed run keeps its own: load)
        self.warm_start = None  # --warm-start: where the trunk came from (kept across --resume)
        if args.init:
            init = load_weights(args.init, self.config, "--init")
            self.model.load_state_dict(init.state_dict())
            self.previous = training_summary(args.init, "--init")
        if getattr(args, "warm_start", None):
            self.warm_start = warm_start(self.model, args.warm_start)
        self.model.train()
        self.ema = EMA(self.model, args.ema)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr, betas=(0.9, 0.99),
                                     weight_decay=args.weight_decay)
        # the steps behind --init's weights: a chained run's data and noise streams start elsewhere
        self.offset = int((self.previous or {}).get("total_steps", 0))
        self.rng = np.random.default_rng(args.seed if self.offset == 0 else [args.seed, self.offset])
        self.gen = torch.Generator().manual_seed(args.seed if self.offset == 0 else args.seed * 1_000_003 + self.offset)
        self.ddpm = DDPMSchedule().to(self.device)
        self.step = 0
        self.wall = 0.0  # seconds of training before this process (resumed runs)
        self.echoed_before = 0  # steps trained on a batch again (--echo) by this run's earlier processes
        self.echoing: EchoingBatches | None = None  # this process's, with --echo
        # what the loss calls: the model, or with --compile its compiled forward (the same parameters)
        self.net = torch.compile(self.model, backend=args.compile) if args.compile else self.model
        self.compiled_steps = 0  # steps this process trained through the compiled forward

    @property
    def echoed(self) -> int:
        """Steps of this run (resumed processes included) trained on a batch again (``--echo``)."""
        return self.echoed_before + (self.echoing.echoed if self.echoing is not None else 0)

    def state_dict(self, wall: float = None) -> dict:
        """Everything ``--resume`` needs; ``wall``: training seconds up to now (default: before this process)."""
        return {
            "format": STATE_FORMAT, "kind": self.args.kind, "config": self.config.to_json(), "step": self.step,
            "wall": self.wall if wall is None else wall, "echoed": self.echoed, "model": self.model.state_dict(),
            "ema": self.ema.model.state_dict(),
            "ema_updates": self.ema.num_updates, "optimizer": self.opt.state_dict(),
            "rng": self.rng.bit_generator.state, "gen": self.gen.get_state(), "previous": self.previous,
            "hparams": {name: getattr(self.args, name) for name in HPARAMS}, "run_id": self.run_id,
            "warm_start": self.warm_start,
        }

    def load(self, path: str, state: dict | None = None) -> None:
        """Continue exactly from a state file written by :meth:`save` (``state``: it, already read)."""
        state = read_state(path) if state is None else state
        if state["kind"] != self.args.kind:
            raise ValueError(f"--resume {path}: kind {state['kind']!r}, but --kind {self.args.kind!r}")
        _check_config(VideoDiTConfig.from_json(state["config"]), self.config, path, "--resume")
        self.model.load_state_dict(state["model"])
        self.ema.model.load_state_dict(state["ema"])
        self.ema.num_updates = state["ema_updates"]
        self.opt.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["rng"]
        self.gen.set_state(state["gen"])
        self.step, self.wall, self.previous = state["step"], state["wall"], state["previous"]
        self.run_id = state.get("run_id") or self.run_id  # states written before run ids: from now on this one
        self.warm_start = state.get("warm_start")
        self.offset = int((self.previous or {}).get("total_steps", 0))  # a chained run's data streams start there
        self.echoed_before = state.get("echoed", 0)  # states written before --echo existed have none

    def summary(self, wall: float, final: bool) -> dict:
        a = self.args
        prev = self.previous or {}
        return {
            "kind": a.kind, "task": "scenes", "run_id": self.run_id, "steps_done": self.step, "steps_planned": a.steps, "final": final,
            "batch_size": a.batch_size, "lr": a.lr, "warmup": a.warmup, "schedule": a.schedule, "ema": a.ema,
            "seed": a.seed, "sigma_shift": a.sigma_shift, "background_weights": a.background_weights,
            "threads": a.threads, "device": str(self.device),
            "workers": a.workers, "render": a.render, "compile": a.compile if self.compiled_steps else None,
            "bf16": a.bf16, "echo": a.echo, "echoed_steps": self.echoed, "wall_seconds": round(wall, 1),
            "seconds_per_step": round(wall / max(self.step, 1), 4), "params": num_parameters(self.model),
            "weights": "ema, float16", "init": a.init, "previous": self.previous, "warm_start": self.warm_start,
            "total_steps": self.step + prev.get("total_steps", 0),
            "total_wall_seconds": round(wall + prev.get("total_wall_seconds", 0.0), 1),
        }

    def check_finite(self, out: Path) -> None:
        """Raise ``ValueError`` (nothing is saved) if the live weights are not finite: a diverged run must not
        replace the last good weights and state."""
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            raise ValueError(f"step {self.step}: the weights are not finite (the run diverged); {_kept(out)}")

    def save(self, out: Path, state_path: Path, wall: float, final: bool) -> dict:
        self.check_finite(out)
        summary = self.summary(wall, final)
        buf = io.BytesIO()
        torch.save(self.state_dict(wall), buf)
        atomic_write_bytes(state_path, buf.getvalue())
        meta = {"training": json.dumps(summary, sort_keys=True)}
        save_half(self.ema.model, out, meta)
        atomic_write_bytes(out.with_suffix(".json"), (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
        if self.args.keep_every and self.step % self.args.keep_every == 0:
            save_half(self.ema.model, out.with_name(f"{out.stem}-step{self.step:06d}{out.suffix}"), meta)
        return summary

    def worker_stream(self) -> BatchStream:
        """The workers' batches from this step on (after the steps behind ``--init``'s weights)."""
        return BatchStream(self.args.seed, self.offset + self.step, self.args.batch_size, self.args.render == "cpu",
                           background_probabilities(self.args.background_weights))

    def batches(self):
        """Training batches ``(x0 [B, 3, 8, 32, 32], ids [B, 5])`` (``--render device``: the clips' draws in
        place of ``x0``): from the run's own rng (exactly resumable), or from ``--workers`` processes."""
        a = self.args
        if a.workers == 0:
            while True:
                yield make_batch(self.rng, a.batch_size, pixels=a.render == "cpu",
                                 background_p=background_probabilities(a.background_weights))
        loader = iter(torch.utils.data.DataLoader(
            self.worker_stream(), batch_size=None, num_workers=a.workers,
            worker_init_fn=BatchStream.worker_init,
            pin_memory=self.device.type == "cuda", prefetch_factor=4))
        try:
            yield from loader
        finally:  # closed, or an error: the workers ignore SIGTERM, so nothing else would stop them
            loader._shutdown_workers()

    def train_step(self, batch, time_fraction: float = 0.0) -> torch.Tensor:
        """One optimizer step on ``batch``; the loss, detached on the training device (read it once per log
        line: a read per step would make the host wait for the accelerator at every step)."""
        a = self.args
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, a.lr, a.warmup, a.steps, a.schedule, time_fraction)
        x0, ids = (t.to(self.device, non_blocking=True) for t in batch)
        if a.render == "device":  # x0: the clips' packed draws
            x0 = render_params(unpack_params(x0))
        try:
            loss = self._loss_and_grads(x0, ids)
        except Exception as exc:  # noqa: BLE001 - a compiler that fails on this machine must not end the lease
            if self.net is self.model or self.compiled_steps:
                raise
            print(f"--compile {a.compile}: the first compiled step failed ({type(exc).__name__}: "
                  f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); training on uncompiled",
                  file=sys.stderr, flush=True)
            self.net = self.model
            loss = self._loss_and_grads(x0, ids)
        self.compiled_steps += self.net is not self.model
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), a.clip)
        self.opt.step()
        self.ema.update(self.model)
        self.step += 1
        return loss.detach()

    def _loss_and_grads(self, x0: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        a = self.args
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=a.bf16):
            loss = loss_fn(a.kind, self.net, x0, ids, self.ddpm, self.gen, a.sigma_shift)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss


def read_state(path: str) -> dict:
    """The training state saved at ``path`` (``--resume``), checked for its format."""
    if Path(path).is_dir():
        raise ValueError(f"--resume {path}: a folder, not a state file (the state is written next to --out as "
                         "OUT.state.pt)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"--resume {path}: no such file (the state is written next to --out as "
                                "OUT.state.pt)")
    if _is_safetensors(path):
        raise ValueError(f"--resume {path}: a weights file, not a training state{_WEIGHTS_HINT}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"--resume {path}: not a training state ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"--resume {path}: not a training state of this script (format "
                         f"{state.get('format') if isinstance(state, dict) else None!r}, expected {STATE_FORMAT!r})"
                         f"{_WEIGHTS_HINT if _is_safetensors(path) else ''}")
    return state


def resolve_hparams(args, state: dict | None, path: str | None = None) -> list[str]:
    """Fill the hyperparameters the command line left out (``None``): from the resumed run's state
    where it recorded them (so that ``--resume`` alone continues the same run), else the defaults.
    Returns one line per hyperparameter given on the command line that differs from the state's."""
    saved = (state or {}).get("hparams") or {}
    changed = []
    for name in HPARAMS:
        given = getattr(args, name)
        if given is None:
            setattr(args, name, saved.get(name, HPARAM_DEFAULTS[name]))
        elif name in saved and saved[name] != given:
            changed.append(f"--{name.replace('_', '-')} {given} (the run at {path} used {saved[name]})")
    model = json.loads(state["config"]) if state is not None and isinstance(state.get("config"), str) else {}
    for name, default in ARCH_DEFAULTS.items():  # (a --resume had to repeat them: docs walkthrough, 2026-11-27)
        if getattr(args, name, None) is None:
            setattr(args, name, model.get(ARCH_CONFIG_KEYS[name], default))
    return changed


def check_device_render(trainer: "Trainer", n: int = 32, tolerance: float = 1e-5) -> float:
    """``--render device`` on an accelerator: ``n`` clips rendered there against ``scenes.render``'s (its own
    draws: the run's streams are untouched). The largest difference is logged; beyond ``tolerance`` (float32
    rounding is 6e-8 here) the run falls back to ``--render cpu`` rather than train on other clips."""
    prompts, seeds = scenes.random_training_pairs(np.random.default_rng(0x5EED), n)
    packed = pack_params(scene_params(prompts, seeds)).to(trainer.device)
    diff = (render_params(unpack_params(packed)).cpu() - torch.from_numpy(scenes.render_batch(prompts, seeds)))
    worst = diff.abs().max().item()
    ok = worst <= tolerance  # False for NaN too
    print(f"render check: {n} clips rendered on {trainer.device} against scenes.render: largest difference "
          f"{worst:.3g}" + ("" if ok else f" > {tolerance:g}: falling back to --render cpu"), flush=True)
    if not ok:
        trainer.args.render = "cpu"
    return worst


def _run_of(path: Path) -> dict | None:
    """The training summary of the run that wrote ``path`` (weights: their metadata; ``OUT.json``: its
    content); None where there is none or it does not read."""
    try:
        if path.suffix == ".json":
            found = json.loads(path.read_text())
        else:
            found = json.loads(read_metadata(path).get("training", "null"))
        return found if isinstance(found, dict) and "steps_done" in found and "kind" in found else None
    except Exception:  # noqa: BLE001 - unreadable: not shown to be this run's
        return None


def _same_run(summary: dict | None, state: dict) -> str | None:
    """None if ``summary`` (of a file at ``--out``) was written by the run whose ``state`` is resumed; else why not.
    Runs record a ``run_id`` (states and summaries written before it existed: kind, seed, the weights they began
    from and a step count no later than the state's must agree)."""
    if summary is None:
        return "it holds no training summary of this script"
    if summary.get("run_id") is not None and state.get("run_id") is not None:
        return None if summary["run_id"] == state["run_id"] else "another run wrote it (its run_id differs)"
    seed = (state.get("hparams") or {}).get("seed", HPARAM_DEFAULTS["seed"])  # (states before hparams: the default)
    checks = (("kind", summary.get("kind"), state.get("kind")), ("seed", summary.get("seed"), seed),
              ("the weights it began from", summary.get("previous"), state.get("previous")))
    for name, theirs, ours in checks:
        if theirs != ours:
            return f"{name}: {theirs!r}, the resumed state's {ours!r}"
    done = summary.get("steps_done")
    if not isinstance(done, int) or done > state.get("step", -1):
        return f"it is at step {done!r}, past the resumed state's step {state.get('step')!r}"
    return None


def _kept(out: Path) -> str:
    """What a diverged run leaves: the last good step's files where this run saved one, else nothing."""
    if Path(out).is_file():
        return f"nothing was saved, so {out} and its state keep the last good step: resume from there with a lower --lr"
    return "nothing was saved (no step of this run was saved before): start again with a lower --lr"


_WEIGHTS_HINT = ("; --resume takes the OUT.state.pt a run writes next to its weights and continues it exactly, "
                 "--init takes weights (.safetensors) and starts a new run from them")


def _is_safetensors(path) -> bool:
    """Whether ``path`` begins as a safetensors file does (an 8-byte header length, then a JSON header)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        return len(head) == 9 and head[8:9] == b"{"
    except OSError:
        return False


def check_outputs(args, out: Path, state: dict | None = None) -> Path:
    """Before any training: ``--out`` and ``--state`` are files that can be written, distinct from each other
    (and from ``OUT.json`` and the kept copies), and do not belong to another run unless ``--resume`` continues
    it or ``--overwrite`` says so (``state``: the resumed state, already read; an ``OUT`` or ``OUT.json`` next to
    it must be of its run). Returns the state file's path."""
    from ..runtime.io import check_writable

    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: expected a .safetensors file name")
    state_path = Path(args.state) if args.state else out.with_suffix(".state.pt")
    if state_path.suffix in (".safetensors", ".json"):  # (so it is never OUT, OUT.json or a kept copy)
        raise ValueError(f"--state {state_path}: a state file is not a .safetensors or .json file (default: "
                         f"{out.with_suffix('.state.pt')})")
    summary = out.with_suffix(".json")
    for path, flag in ((out, "--out"), (summary, "--out"), (state_path, "--state")):
        check_writable(path)
        if path.exists() and not path.is_file():
            raise ValueError(f"{flag} {path}: not a regular file")
    if args.overwrite:
        return state_path
    resumed = Path(args.resume).resolve() if args.resume else None  # continuing this state may replace it
    if resumed != state_path.resolve():
        taken = [(p, what, flag) for p, what, flag in ((state_path, "state", "--state"), (out, "weights", "--out"),
                                                       (summary, "training summary", "--out")) if p.exists()]
        if taken:
            path, what, flag = taken[0]
            state_path_hint = state_path if flag == "--state" or state_path.exists() else None
            cont = f"continue that run with --resume {state_path_hint}, " if state_path_hint else ""
            raise ValueError(f"{path} exists: another run's {what}; {cont}choose another {flag}, or pass "
                             "--overwrite to replace it")
        return state_path
    for path, what in ((out, "weights"), (summary, "training summary")):  # continuing: OUT must be this run's
        why = _same_run(_run_of(path), state or {}) if path.exists() else None
        if why is not None:
            raise ValueError(f"--out {out}: {path} exists and is not the {what} of the run resumed from {state_path} "
                             f"({why}); choose another --out, or pass --overwrite to replace it")
    return state_path


#: --profile skips this many steps first (the compilation, the allocator's warm-up, the first batches)
PROFILE_AFTER = 20


class StepProfile:
    """``--profile N``: ``torch.profiler`` over N training steps after :data:`PROFILE_AFTER` (+2 of warm-up);
    prints the operators that took the most time (on an accelerator its time) into the log, so that a
    short GPU call says where its step time goes. Call :meth:`step` after every training step."""

    def __init__(self, steps: int, device: torch.device, rows: int = 25):
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        self.steps, self.rows = steps, rows
        self.profiler = profile(activities=activities, on_trace_ready=self._report,
                                schedule=schedule(wait=PROFILE_AFTER, warmup=2, active=steps, repeat=1))

    def _report(self, profiler) -> None:
        try:
            table = profiler.key_averages().table(sort_by=self.sort, row_limit=self.rows)
        except Exception as exc:  # noqa: BLE001 - a report that fails must not end the training
            table = f"(no table: {type(exc).__name__}: {exc})"
        print(f"profile of {self.steps} steps (after {PROFILE_AFTER + 2}), sorted by {self.sort}:\n{table}", flush=True)

    def __enter__(self):
        self.profiler.__enter__()
        return self

    def step(self) -> None:
        self.profiler.step()

    def __exit__(self, *exc):
        return self.profiler.__exit__(*exc)


def train(args) -> dict:
    torch.set_num_threads(args.threads)
    state = read_state(args.resume) if args.resume else None
    for line in resolve_hparams(args, state, args.resume):
        print(f"resume: changed {line}", flush=True)
    if args.schedule == "cosine-time" and args.max_minutes is None:
        raise ValueError("--schedule cosine-time anneals over --max-minutes: give --max-minutes (> 0)")
    if args.schedule == "cosine-time" and state is not None:
        raise ValueError(f"--resume {args.resume}: --schedule cosine-time anneals over one process's --max-minutes "
                         "and cannot be resumed; continue from its weights with --init (a fresh optimizer) instead")
    out = Path(args.out)
    state_path = check_outputs(args, out, state)
    trainer = Trainer(args)
    if state is not None:
        trainer.load(args.resume, state)
        del state
        if trainer.step >= args.steps:  # (it did 0 steps and rewrote the files with steps_planned below steps_done)
            raise ValueError(f"--steps {args.steps}: the run in {args.resume} is already at step {trainer.step}; "
                             f"--steps counts all its steps (e.g. --steps {trainer.step + args.steps} for "
                             f"{args.steps} more)")
    if args.render == "device" and trainer.device.type != "cpu":
        check_device_render(trainer)
    print(f"scenes kind={args.kind} params={num_parameters(trainer.model)} from_step={trainer.step} "
          f"to_step={args.steps} batch={args.batch_size} lr={args.lr} schedule={args.schedule} "
          f"sigma_shift={args.sigma_shift:g} "
          f"background_weights={_weights_text(args.background_weights)} "
          f"workers={args.workers} echo={args.echo} render={args.render} "
          f"threads={args.threads} device={args.device} out={out} state={state_path}", flush=True)
    start = time.time()
    last_save, running, window, waited = time.time(), [], time.time(), 0.0  # waited: s spent waiting for batches
    first = trainer.step
    batches = trainer.batches()
    if args.echo and args.workers:
        batches = trainer.echoing = EchoingBatches(batches, args.echo)
    deadline = start + args.max_minutes * 60 if args.max_minutes is not None else math.inf
    annealing_from = None  # cosine-time: when the warmup ended
    echoed_at_log = 0  # the echo count at the last log line
    profile = StepProfile(args.profile, trainer.device) if args.profile else contextlib.nullcontext()
    try:
        with StopOnSignal() as stop, profile:
            while trainer.step < args.steps and stop.signal is None and time.time() < deadline:
                spent = 0.0
                if trainer.step >= args.warmup and args.max_minutes is not None:
                    annealing_from = time.time() if annealing_from is None else annealing_from
                    spent = (time.time() - annealing_from) / max(deadline - annealing_from, 1e-9)
                fetched = time.time()
                batch = next(batches)
                waited += time.time() - fetched
                running.append(trainer.train_step(batch, spent))
                if args.profile:
                    profile.step()
                if trainer.step % args.log_every == 0:
                    sps = (time.time() - window) / len(running)
                    echoed = ""
                    if isinstance(batches, EchoingBatches):
                        echoed = f", echoed {batches.echoed - echoed_at_log} of {len(running)}"
                        echoed_at_log = batches.echoed
                    loss = torch.stack(running).double().mean().item()
                    print(f"step {trainer.step} loss {loss:.4f} lr {trainer.opt.param_groups[0]['lr']:.2e} "
                          f"s/step {sps:.3f} (data {waited / len(running):.3f}{echoed}) "
                          f"elapsed {time.time() - start:.0f}s", flush=True)
                    if not math.isfinite(loss):
                        raise ValueError(f"step {trainer.step}: the loss is {loss} (the run diverged); {_kept(out)}")
                    running, window, waited = [], time.time(), 0.0
                due = (trainer.step % args.save_every == 0 or time.time() - last_save >= args.save_minutes * 60
                       or (args.keep_every and trainer.step % args.keep_every == 0))  # a kept copy is a save
                if due and trainer.step < args.steps:
                    trainer.save(out, state_path, trainer.wall + time.time() - start, final=False)
                    last_save = time.time()
                    print(f"saved step {trainer.step} -> {out}, {state_path}", flush=True)
            trainer.wall += time.time() - start
            finished = trainer.step >= args.steps
            summary = trainer.save(out, state_path, trainer.wall, final=finished)
    finally:  # also on an error: the echo thread and the DataLoader's workers would hold the interpreter's exit
        batches.close()
    done = trainer.step - first
    why = ("" if finished else f", stopped by {signal.Signals(stop.signal).name}" if stop.signal is not None
           else f", stopped after --max-minutes {args.max_minutes:g}")
    if isinstance(batches, EchoingBatches):
        why += f"; {batches.echoed} of {done} steps trained on a batch again while rendering lagged"
    print(f"done: {done} steps in {time.time() - start:.0f}s -> {out} (step {trainer.step}{why})", flush=True)
    return summary


def _weights_text(weights) -> str:
    """``--background-weights`` as the log line says it: ``1,2,1``, or ``uniform`` without the option."""
    return ",".join(f"{w:g}" for w in weights) if weights else "uniform"


def background_weights_arg(text: str) -> list[float]:
    """``--background-weights`` ``N,S,G``: one finite weight >= 0 per background, not all 0."""
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        weights = []
    if len(weights) != len(scenes.BACKGROUNDS) or not all(math.isfinite(w) and w >= 0 for w in weights) \
            or not sum(weights) > 0:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected {len(scenes.BACKGROUNDS)} weights >= 0, not all 0, separated by commas, one per "
            f"background ({', '.join(scenes.BACKGROUNDS)}), e.g. 1,2,1")
    return weights


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--steps", type=int, required=True, help="train until this many steps in all (a resumed run counts "
                   "the steps already done)")
    p.add_argument("--out", required=True, help="EMA weights, float16 .safetensors")
    p.add_argument("--state", default=None, help="resumable state file (default: OUT with suffix .state.pt)")
    p.add_argument("--resume", default=None, help="continue exactly from this state file")
    p.add_argument("--init", default=None, help="start from these EMA weights with a fresh optimizer")
    p.add_argument("--warm-start", default=None, metavar="W", help="start a new run from the tensors of a checkpoint "
                   "of another kind that fit (the flow model's trunk for --kind eps); the rest keeps its "
                   "initialisation")
    p.add_argument("--overwrite", action="store_true", help="replace the weights and state of an earlier run at "
                   "--out / --state (otherwise refused, unless --resume continues that run)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--schedule", choices=("constant", "cosine", "cosine-time"), default=None,
                   help="after the warmup: constant; a cosine to 5%% over --steps; or over --max-minutes "
                        "(cosine-time)")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--clip", type=float, default=None)
    p.add_argument("--ema", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--sigma-shift", type=float, default=None, help="flow kinds: train on sigmas shifted as the "
                   "sampler's flow_shift shifts its steps (3: as the scenes sampling; default 1: as drawn)")
    p.add_argument("--background-weights", type=background_weights_arg, default=None, metavar="N,S,G",
                   help="draw the training prompts' backgrounds (noise, stripes, gradient) with these relative "
                        "weights, e.g. 1,2,1 for stripes half of the time (default: uniform)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=0, help="processes rendering batches (GPU runs); 0: the "
                   "main process, exactly resumable")
    p.add_argument("--echo", type=int, default=0, help="with --workers: when no rendered batch is ready, train on "
                   "the last one again (fresh noise) up to this many times instead of waiting (adaptive data echoing)")
    p.add_argument("--render", choices=("cpu", "device"), default="cpu", help="where the clips' pixels are made: "
                   "on the CPU (by --workers, else the main process), or a batch at a time on --device from the "
                   "draws the CPU makes (GPU runs: the same clips, without the CPU's 1.4-1.8 ms a clip)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast of the forward/loss (GPU runs)")
    p.add_argument("--profile", type=int, default=0, metavar="N", help=f"print where N training steps' time "
                   f"goes (torch.profiler, after {PROFILE_AFTER + 2} steps) into the log")
    p.add_argument("--compile", default=None, metavar="BACKEND", help="train through torch.compile(model, "
                   "backend=BACKEND) (inductor on a GPU); if the first compiled step fails, the run says so on "
                   "stderr and goes on uncompiled")
    p.add_argument("--dim", type=int, default=None, help="default 256; --resume: the run's own")
    p.add_argument("--depth", type=int, default=None, help="default 6; --resume: the run's own")
    p.add_argument("--heads", type=int, default=None, help="default 8; --resume: the run's own")
    p.add_argument("--mlp-ratio", type=float, default=None, help="default 2.0; --resume: the run's own")
    p.add_argument("--patch", type=int, default=None, help="default 8; --resume: the run's own")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--save-minutes", type=float, default=10.0)
    p.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this much training "
                   "time in this process, whatever --steps says")
    p.add_argument("--keep-every", type=int, default=2000, help="keep OUT-stepNNNNNN.safetensors every N steps (0: off)")
    args = p.parse_args(argv)
    if args.resume and args.init:
        p.error("--resume continues a run (its weights included); --init starts a new one: give one of them")
    if args.warm_start and (args.resume or args.init):
        p.error("--warm-start starts a new run from another kind's checkpoint; --resume and --init continue this "
                "kind's: give one of them")
    if not args.resume:
        resolve_hparams(args, None)
    for name in ("steps", "batch_size", "save_every", "log_every", "threads", "depth", "heads", "dim", "patch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("keep_every", "workers", "warmup", "profile"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("clip", "save_minutes", "lr", "mlp_ratio"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.ema is not None and not 0 <= args.ema < 1:
        p.error(f"--ema must be in [0, 1), got {args.ema}")
    if args.patch is not None and 32 % args.patch:
        p.error(f"--patch {args.patch}: the 32x32 frames need a patch size dividing 32 (4 or 8)")
    if args.dim is not None and args.heads is not None and args.dim % args.heads:
        p.error(f"--dim {args.dim} is not divisible by --heads {args.heads}")
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as exc:
        p.error(f"--device {args.device!r} is not usable here ({type(exc).__name__}: {exc})")
    if args.echo < 0 or (args.echo and not args.workers):
        p.error(f"--echo {args.echo}: expected 0, or a count >= 1 with --workers (it echoes while they render)")
    if args.sigma_shift is not None and not args.sigma_shift > 0:
        p.error(f"--sigma-shift must be > 0, got {args.sigma_shift:g}")
    if args.kind == "eps" and args.sigma_shift not in (None, 1.0):
        p.error(f"--sigma-shift {args.sigma_shift:g}: flow kinds only (eps draws DDPM timesteps)")
    if args.max_minutes is not None and not args.max_minutes > 0:
        p.error(f"--max-minutes must be > 0, got {args.max_minutes:g}")
    return args


def main(argv=None):
    try:
        train(parse_args(argv))
    except (OSError, ValueError) as e:  # FileWriteError too: a file that cannot be written, named
        raise SystemExit(f"taohooks.testbed.train_scenes: {e}")


if __name__ == "__main__":
    main()
