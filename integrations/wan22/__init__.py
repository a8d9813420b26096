"""TaoCache in Wan2.2's own ``generate.py`` (Wan-Video/Wan2.2): ``integration: wan22``.

    taocache-run generate.py --task t2v-A14B --size 1280*720 --ckpt_dir ./Wan2.2-T2V-A14B \\
        --offload_model True --convert_model_dtype --prompt "..." --taocache configs/wan22_t2v_a14b.yaml
    torchrun --nproc_per_node 8 -m taohooks.run generate.py --task t2v-A14B ... \\
        --dit_fsdp --t5_fsdp --ulysses_size 8 --taocache configs/wan22_t2v_a14b.yaml

What it patches: ``generate`` of ``WanT2V`` (T2V-A14B), ``WanI2V`` (I2V-A14B), ``WanTI2V``
(TI2V-5B), ``WanS2V`` (S2V-14B) and ``WanAnimate`` (Animate-14B), at class level once their modules
are imported. Wan2.2's checkout names its modules as
Wan2.1's (``wan.text2video``, ...); this integration is for the Wan2.2 classes, and says so when it
meets Wan2.1's (and ``integration: wan`` says so when it meets Wan2.2's).

**Two experts, one loop.** T2V-A14B and I2V-A14B run the high-noise expert while the timestep is at
least ``boundary * 1000`` (875 for T2V, 900 for I2V) and the low-noise expert after: two calls per
step (cond, then uncond) on the expert of that step. taohooks hooks the forward that *each* expert
instance has then (the sequence-parallel one of ``--ulysses_size``, inside the FSDP wrapper of
``--dit_fsdp``), on one hook that numbers their calls as one generation: one LUT holds both experts'
statistics (step ``t`` belongs to the expert its timestep selects), and the first two steps of the
low-noise expert are always computed (their deltas would span two networks). ``--offload_model``
moves the experts between devices with ``.to()``, which keeps the instances and so the hooks; the
cache keeps only the last outputs (on the device they were made on) and drops them when the
generation ends. TI2V-5B has one model; its per-token timestep (0 on the conditioning frame's tokens) is
read as its largest value.

The ``pab:`` and ``teacache:`` (hybrid) sections patch the submodules of both experts and keep their
state per expert: PAB never broadcasts one expert's attention in the other, TeaCache's accumulators and
residuals are the expert's own (so the first call of each expert computes). The hybrid decides from
activations, which ``--ulysses_size`` shards over ranks: refused there (ranks could decide differently and
deadlock in the attention all-to-all).

**One loop per clip.** S2V-14B and Animate-14B run one DiT (``self.noise_model``) and, inside one
``generate``, one sampling loop per clip (``--num_clip`` clips for S2V, as many as the pose video needs
for Animate), each from fresh noise and its own scheduler. Each clip is one generation of the hook (it
begins again at the first timestep; TaoCache's history starts afresh, the plan applies to every clip,
calibration records every clip); the summary line counts all clips of the ``generate``. The streams follow
the guide scale: cond and uncond above 1 (S2V's 4.5), cond alone at 1 (Animate's default): the LUT and
``loop.streams`` must match it. ``pab:``, ``teacache:`` and ``calibration.teacache_fit`` are refused
there (their modules and proxies are the T2V model's), and so is ``taocache calibrate --prompts`` (one
prompt per ``generate``, but each clip is one LUT prompt: calibrate by running the script on one's inputs).

Importing this module needs neither ``wan`` nor flash-attn or a GPU.
"""
from __future__ import annotations

import os

from typing import Any, Dict, List, Optional, Tuple

from taohooks.config import TaoCacheConfig
from taohooks.launcher.prompt_calibration import ENV_CALIBRATE_PROMPTS, PER_CLIP_CALIBRATION
from taohooks.launcher.integration import (IntegrationError, PatchSet, command_line_problems, image_said,
                                           output_size_of, require_modules, script_options, task_of_the_other_version,
                                           unwrap_model)
from taohooks.integrations.wan import shared_cache
from taohooks.runtime.loop import LoopSpec
from taohooks.taocache.identity import guide_scale_identity, model_identity, wan_output_identity

__all__ = ["install", "uninstall", "precheck", "command_line", "PIPELINES", "TASKS", "TASK_DEFAULTS", "EXPECTS",
           "experts_of", "wan_timesteps"]

PIPELINES = {
    "wan.text2video": "WanT2V",
    "wan.image2video": "WanI2V",
    "wan.textimage2video": "WanTI2V",
    "wan.speech2video": "WanS2V",
    "wan.animate": "WanAnimate",
}
STREAMS = ("cond", "uncond")
# generate.py's --task choices, and what each runs by default (wan/configs/wan_*.py at 42bf4cf):
# steps, shift, guide scale (low-noise, high-noise expert), boundary (fraction of 1000 timesteps).
TASK_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "t2v-A14B": {"steps": 40, "shift": 12.0, "guide": (3.0, 4.0), "boundary": 0.875},
    "i2v-A14B": {"steps": 40, "shift": 5.0, "guide": (3.5, 3.5), "boundary": 0.900},
    "ti2v-5B": {"steps": 50, "shift": 5.0, "guide": 5.0, "boundary": None},
    "s2v-14B": {"steps": 40, "shift": 3.0, "guide": 4.5, "boundary": None},
    "animate-14B": {"steps": 20, "shift": 5.0, "guide": 1.0, "boundary": None},
}
TASKS = tuple(TASK_DEFAULTS)
PER_CLIP = ("s2v-14B", "animate-14B")  # one DiT, one sampling loop per clip; streams follow the guide scale
PER_CLIP_PIPELINES = ("WanS2V", "WanAnimate")
EXPECTS = "a call of WanT2V/WanI2V/WanTI2V/WanS2V/WanAnimate.generate (Wan2.2's generate.py)"

_patches = PatchSet()
_launch: Dict[str, Any] = {}


def experts_of(pipeline) -> Tuple[Tuple[str, ...], Tuple[Any, ...]]:
    """``(names, modules)`` of the DiT(s) a Wan2.2 pipeline runs: ``("high_noise_model",
    "low_noise_model")`` for the A14B tasks (in the order they run), ``("model",)`` for TI2V-5B,
    ``("noise_model",)`` for S2V-14B and Animate-14B."""
    if hasattr(pipeline, "high_noise_model") and hasattr(pipeline, "low_noise_model"):
        return ("high_noise_model", "low_noise_model"), (pipeline.high_noise_model, pipeline.low_noise_model)
    name = type(pipeline).__name__
    if name in ("WanT2V", "WanI2V") and hasattr(pipeline, "model"):
        raise IntegrationError(f"integration: wan22 met {name} with a single DiT (self.model): this is Wan2.1's "
                               "generate.py; use integration: wan (configs/wan_*.yaml)")
    if hasattr(pipeline, "model"):
        return ("model",), (pipeline.model,)
    if hasattr(pipeline, "noise_model"):  # S2V, Animate
        return ("noise_model",), (pipeline.noise_model,)
    raise IntegrationError(f"integration: wan22: {name} has neither high_noise_model/low_noise_model, model nor "
                           "noise_model; this Wan2.2 checkout is not one taohooks knows")


def streams_for(guide_scale, per_clip: bool) -> Tuple[str, ...]:
    """The calls of one step: S2V and Animate make the uncond call only when the guide scale is above 1
    (``if guide_scale > 1``); the other pipelines always make both."""
    if per_clip and not (isinstance(guide_scale, (tuple, list)) or float(guide_scale) > 1):
        return STREAMS[:1]
    return STREAMS


def _models(arguments):
    return tuple(unwrap_model(m) for m in experts_of(arguments["self"])[1])


def _model(arguments):
    return _models(arguments)[0]


def _boundary(pipeline) -> Optional[float]:
    """The timestep at which the low-noise expert takes over (``boundary * num_train_timesteps``)."""
    if not hasattr(pipeline, "high_noise_model"):
        return None
    return float(pipeline.boundary) * float(getattr(pipeline, "num_train_timesteps", 1000))


def wan_timesteps(steps: int, shift: float, solver: str, num_train: int = 1000) -> Optional[List[float]]:
    """The timesteps Wan2.2's ``generate`` runs, one per step: its ``FlowUniPCMultistepScheduler`` (``unipc``: sigmas
    from ``1 - 1/num_train`` (a float32) down to 0) or ``get_sampling_sigmas`` (``dpm++``: from 1), shifted
    (``shift s / (1 + (shift - 1) s)``), times ``num_train``, cut to whole numbers (its ``int64`` timesteps). Where
    they fall below the boundary the low-noise expert runs. ``None`` for another solver."""
    import numpy as np

    if solver == "unipc":
        sigmas = np.linspace(float(np.float32(1.0 - 1.0 / num_train)), 0.0, steps + 1)[:-1]
    elif solver == "dpm++":
        sigmas = np.linspace(1.0, 0.0, steps + 1)[:steps]
    else:
        return None
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return [float(int(t)) for t in sigmas * num_train]


def _per_clip(pipeline) -> bool:
    return type(pipeline).__name__ in PER_CLIP_PIPELINES


def _loop(arguments):
    pipeline = arguments["self"]
    models = _models(arguments)
    kwargs: Dict[str, Any] = {"timestep_arg": "t"}
    if len(models) > 1:
        kwargs["also"] = models[1:]
        kwargs["expert_boundary"] = _boundary(pipeline)
        kwargs["run_timesteps"] = wan_timesteps(int(arguments["sampling_steps"]), float(arguments["shift"]),
                                                str(arguments["sample_solver"]),
                                                int(getattr(pipeline, "num_train_timesteps", 1000)))
    per_clip = _per_clip(pipeline)
    if per_clip:
        kwargs["repeat"] = True  # each clip's loop is a generation, begun at the first timestep
    streams = streams_for(arguments["guide_scale"], per_clip)
    return LoopSpec(int(arguments["sampling_steps"]), streams, batch_dim=None), kwargs


def _identity(arguments, model) -> Dict[str, Any]:
    """The DiT (the first expert's class, architecture, dtype), solver, shift, task and, for the
    two-expert tasks, the expert boundary (a timestep)."""
    identity = {**model_identity(model), "scheduler": str(arguments["sample_solver"]),
                "shift": float(arguments["shift"]), **wan_output_identity(arguments)}
    boundary = _boundary(arguments["self"])
    if arguments.get("guide_scale") is not None:
        identity["guide_scale"] = guide_scale_identity(arguments["guide_scale"], 1 if boundary is None else 2)
    if boundary is not None:
        identity["expert_boundary"] = boundary
        identity["experts"] = list(experts_of(arguments["self"])[0])
    if type(arguments["self"]).__name__ == "WanTI2V":  # text- or image-to-video: other outputs, another LUT
        identity["image"] = arguments.get("img") is not None
    if "task" in _launch:
        identity["task"] = _launch["task"]
    return identity


def _hybrid(config: TaoCacheConfig) -> bool:
    tea = config.teacache
    return tea is not None and (tea.threshold or 0) > 0


_SP_HYBRID = ("teacache: the hybrid decides from activations that sequence parallelism ({what}) shards over "
              "ranks; ranks could take different decisions and deadlock in the attention collectives. Use TaoCache "
              "(and pab:) alone here")


def _refuse_rank_local_decisions(config: TaoCacheConfig):
    """At the generation call: the hybrid with a sequence-parallel pipeline (``sp_size > 1``)."""
    def check(arguments, model):
        sp = getattr(arguments["self"], "sp_size", 1)
        if _hybrid(config) and sp > 1:
            raise IntegrationError(f"{config.source}: " + _SP_HYBRID.format(what=f"{sp} ranks"))
        return []
    return check


# ---------------------------------------------------------------------- before the model loads
FLAGS = {"task": "--task", "scheduler": "--sample_solver", "shift": "--sample_shift", "pixels": "--size",
         "frame_num": "--frame_num", "guide_scale": "--sample_guide_scale", "image": "--image"}

# Every option of Wan2.2's generate.py (42bf4cf), so that shortened options resolve as in its parser.
OPTIONS: Dict[str, Dict[str, Any]] = {
    **{f"--{name}": {} for name in (
        "ckpt_dir", "offload_model", "save_file", "prompt", "prompt_extend_method",
        "prompt_extend_model", "prompt_extend_target_lang", "base_seed", "image",
        "src_root_path", "refert_num", "num_clip", "audio", "tts_prompt_audio", "tts_prompt_text", "tts_text",
        "pose_video", "infer_frames")},
    **{f"--{name}": {"action": "store_true"} for name in (
        "t5_fsdp", "t5_cpu", "dit_fsdp", "use_prompt_extend", "convert_model_dtype", "replace_flag",
        "use_relighting_lora", "enable_tts", "start_from_ref")},
    # choices as generate.py's: a value its parser refuses leaves the checks to it ("invalid choice")
    "--task": {"default": "t2v-A14B", "choices": TASKS}, "--sample_solver": {"default": "unipc",
                                                                             "choices": ("unipc", "dpm++")},
    "--sample_steps": {"type": int, "default": None}, "--sample_shift": {"type": float, "default": None},
    "--ulysses_size": {"type": int, "default": 1}, "--sample_guide_scale": {"type": float, "default": None},
    "--frame_num": {"type": int, "default": None}, "--size": {"default": "1280*720"},  # (its choices: the task's)
}


def command_line(argv: List[str]) -> Optional[Dict[str, Any]]:
    """What Wan2.2's ``generate.py`` will run, with the defaults of its ``_validate_args`` (the task's
    config: 40 steps and shift 12 for t2v-A14B, ...). ``None`` when its own parser would refuse."""
    args = script_options(argv, OPTIONS)
    if args is None or args.task not in TASK_DEFAULTS:
        return None
    defaults = TASK_DEFAULTS[args.task]
    steps, why_steps = (args.sample_steps, "--sample_steps") if args.sample_steps is not None else (
        defaults["steps"], f"the {args.task} default")
    shift, why_shift = (args.sample_shift, "--sample_shift") if args.sample_shift is not None else (
        defaults["shift"], f"the {args.task} default")
    guide, why_guide = (args.sample_guide_scale, "--sample_guide_scale") if args.sample_guide_scale is not None \
        else (defaults["guide"], f"the {args.task} default")
    return {"task": args.task, "steps": steps, "steps_from": why_steps, "scheduler": args.sample_solver,
            "shift": float(shift), "shift_from": why_shift,
            "guide_scale": guide_scale_identity(guide, 1 if defaults["boundary"] is None else 2),
            "guide_scale_from": why_guide, "sequence_parallel": args.ulysses_size,
            **({"image": args.image is not None} if args.task == "ti2v-5B" else {}),
            "boundary": defaults["boundary"], "guide": guide,
            "streams": streams_for(guide, args.task in PER_CLIP),
            # the video's size where the command line gives it (S2V and Animate call generate() with other names)
            **({} if args.task in PER_CLIP else output_size_of(argv, OPTIONS))}


def _said(run: Dict[str, Any], key: str) -> str:
    if key == "pixels":
        return f"--size {run['size']} ({run['pixels']} pixels a frame)"
    if key == "image":
        return image_said(run["image"])
    origin = run.get(f"{key}_from", FLAGS.get(key))
    flag = FLAGS.get(key, "--sample_steps" if key == "steps" else key)
    return f"{flag} {run[key]}" + ("" if origin.startswith("--") else f", {origin}")


def precheck(config: TaoCacheConfig, argv: List[str]) -> None:
    """Before generate.py loads T5, the VAE and the experts: the task (covered, and the config's),
    the step count against loop.steps and the LUT, solver and shift against the LUT's identity, the
    plan against the step count and the expert switch, the LUT's folder, the hybrid against sequence
    parallelism. Raises with every problem found."""
    run = command_line(argv)
    _launch.clear()
    if run is None:
        from taohooks.integrations.wan import TASKS as WAN21_TASKS

        other = task_of_the_other_version(argv, OPTIONS, WAN21_TASKS)
        if other is not None:
            raise IntegrationError(f"{config.source or 'the config'}: integration: wan22 is Wan2.2's, and --task "
                                   f"{other} is a Wan2.1 task; use integration: wan (configs/wan_*.yaml)")
        return  # generate.py's own parser refuses these arguments and says why
    _launch["task"] = run["task"]
    per_clip = _per_clip_problems(config, run) if run["task"] in PER_CLIP else []
    boundary = run["boundary"] * 1000.0 if run["boundary"] is not None else None
    # the task, steps and LUT first (a config of the other per-clip task is that, before its streams); no plan
    # check after a streams problem, which it would report less clearly
    problems = command_line_problems(config, run, flags=FLAGS, said=_said, tasks=TASKS, streams=run["streams"],
                                     configs_hint="configs/wan22_*.yaml", expert_boundary=boundary,
                                     check_plan=not per_clip, run_timesteps=None if boundary is None else
                                     wan_timesteps(run["steps"], run["shift"], run["scheduler"])) + per_clip
    if _hybrid(config) and run["sequence_parallel"] > 1:
        problems.append(f"{config.source or 'the config'}: "
                        + _SP_HYBRID.format(what=f"--ulysses_size {run['sequence_parallel']}"))
    if problems:
        raise IntegrationError("\n".join(problems))


def _per_clip_problems(config: TaoCacheConfig, run: Dict[str, Any]) -> List[str]:
    """S2V and Animate: the streams the guide scale makes against loop.streams and the LUT's; no pab:
    or teacache: (their module patterns and proxies are those of the T2V/I2V models)."""
    where = config.source or "the config"
    problems = []
    guide = f"guide scale {run['guide']:g}" + ("" if run["guide"] != TASK_DEFAULTS[run["task"]]["guide"]
                                               else f", the {run['task']} default")
    said = f"[{', '.join(run['streams'])}] ({guide}: {'cond and uncond calls' if len(run['streams']) > 1 else 'one call per step'})"
    unguided = run["streams"] == ("cond",) and config.loop.streams is not None and len(config.loop.streams) > 1 \
        and "cond" in config.loop.streams  # declared guided streams cover a run at guide scale 1 (as at generation)
    if config.loop.streams is not None and tuple(config.loop.streams) != run["streams"] and not unguided:
        problems.append(f"{where}: loop.streams is [{', '.join(config.loop.streams)}], this command line runs "
                        f"streams {said}; remove loop.streams or give --sample_guide_scale to match")
    path = config.lut_path()
    lut = None
    if path is not None and path.is_file():
        from taohooks.taocache.lut import CalibrationLUT

        lut = CalibrationLUT.load(path)
        recorded = tuple(lut.streams)
        if recorded != run["streams"]:
            problems.append(f"LUT {path} was calibrated on streams [{', '.join(recorded)}], this command line runs "
                            f"streams {said}; give this run its own LUT (lut: in {where})")
    from taohooks.taocache.cache import calibrates

    if unguided and path is not None and lut is None and calibrates(config):  # (an existing LUT: said above)
        problems.append(f"{where}: loop.streams is [{', '.join(config.loop.streams)}] and this command line runs "
                        f"streams {said}: the LUT it would calibrate, {path}, would hold [cond] alone, which the "
                        f"config's guided runs could not use; give this run its own lut: (with loop.streams: [cond])")
    for section in ("pab", "teacache"):
        if getattr(config, section, None) is not None:
            problems.append(f"{where}: {section}: is not available for --task {run['task']} (integration: wan22 "
                            "patches it for the T2V/I2V/TI2V models only); use TaoCache alone here")
    if config.calibration.teacache_fit:
        problems.append(f"{where}: calibration.teacache_fit fits the teacache: hybrid's polynomial, which --task "
                        f"{run['task']} cannot use; remove it")
    if os.environ.get(ENV_CALIBRATE_PROMPTS):
        problems.append(f"--task {run['task']} {PER_CLIP_CALIBRATION}")
    return problems


# ---------------------------------------------------------------------- install
def install(config: TaoCacheConfig) -> None:
    """Patch Wan2.2's pipelines' ``generate`` when (or if already) imported; idempotent."""
    if _patches.installed:
        return
    require_modules("wan22", ["wan"], "run generate.py of a Wan2.2 checkout, or pip install -e the checkout")
    _patches.installed = True
    _patches.patch_generate(PIPELINES, lambda arguments: shared_cache(config), _model, _loop,
                            callbacks_of=_refuse_rank_local_decisions(config), identity_of=_identity,
                            prompt_arg="input_prompt")


def uninstall() -> None:
    _patches.uninstall()
    _launch.clear()
