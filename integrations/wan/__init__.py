"""TaoCache in Wan2.1's own ``generate.py`` (Wan-Video/Wan2.1): ``integration: wan``.

    taocache-run generate.py --task t2v-1.3B --size 832*480 --ckpt_dir ./Wan2.1-T2V-1.3B \\
        --prompt "..." --taocache configs/wan.yaml
    torchrun --nproc_per_node 8 -m taohooks.run generate.py --task t2v-14B ... \\
        --dit_fsdp --t5_fsdp --ulysses_size 8 --taocache configs/wan.yaml

What it patches: ``generate`` of ``WanT2V``, ``WanI2V``, ``WanFLF2V`` and ``WanVace`` (at class
level, once their modules are imported). Inside each call it hooks the forward that the DiT
*instance* has then: the sequence-parallel forward that ``--ulysses_size/--ring_size`` set on the
instance, inside the FSDP wrapper of ``--dit_fsdp`` (the real module is ``.module``). Loop shape:
``sampling_steps`` steps, two calls per step (cond, then uncond), each returning a list with one
float32 tensor ``[C, F, H, W]``; the timestep is the keyword ``t``. Every rank sees the same
gathered output and the plan is static, so all ranks skip the same calls.

Importing this module needs neither ``wan`` nor flash-attn, dashscope or a GPU.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from taohooks.config import TaoCacheConfig
from taohooks.launcher.integration import (IntegrationError, PatchSet, command_line_problems, output_size_of,
                                           require_modules, script_options, task_of_the_other_version)
from taohooks.runtime.loop import LoopSpec
from taohooks.taocache.cache import TaoCache
from taohooks.taocache.identity import guide_scale_identity, model_identity, wan_output_identity

__all__ = ["install", "uninstall", "precheck", "command_line", "PIPELINES", "TASKS", "EXPECTS"]

# module -> pipeline class whose ``generate(input_prompt, ..., sampling_steps, ...)`` runs one video.
PIPELINES = {
    "wan.text2video": "WanT2V",
    "wan.image2video": "WanI2V",
    "wan.first_last_frame2video": "WanFLF2V",
    "wan.vace": "WanVace",
}
STREAMS = ("cond", "uncond")  # Wan calls the model with the prompt first, then with the negative prompt
TASKS = ("t2v-1.3B", "t2v-14B", "t2i-14B", "i2v-14B", "flf2v-14B", "vace-1.3B", "vace-14B")  # --task choices
SIZES = ("720*1280", "1280*720", "480*832", "832*480", "1024*1024")  # --size choices (SIZE_CONFIGS)
SOLVERS = ("unipc", "dpm++")  # --sample_solver choices
# a resolution named in a config's model_id (wan2.1-i2v-14B-480p), and the --size values that make it
RESOLUTIONS = {"480p": ("832*480", "480*832"), "720p": ("1280*720", "720*1280")}
EXPECTS = "a call of WanT2V/WanI2V/WanFLF2V/WanVace.generate (Wan2.1's generate.py)"

_patches = PatchSet()


# What generate.py's command line says, read by the launcher before any checkpoint loads (precheck).
_launch: Dict[str, Any] = {}


def shared_cache(config: TaoCacheConfig) -> TaoCache:
    """A generation's :class:`TaoCache`: under torchrun every rank of Wan's ``generate.py`` runs every generation
    (one prompt, the ranks sharing its tokens or its weights), so attach waits for the ranks before it reads a LUT
    being calibrated (:attr:`TaoCache.shared_generations`)."""
    cache = TaoCache(config)  # (calibration.ranks: own is refused when the config loads)
    cache.shared_generations = True
    return cache


def _model(arguments):
    pipeline = arguments["self"]
    if not hasattr(pipeline, "model") and hasattr(pipeline, "low_noise_model"):
        raise IntegrationError(f"integration: wan met Wan2.2's {type(pipeline).__name__} (two experts: "
                               "high_noise_model, low_noise_model); use integration: wan22 (configs/wan22_*.yaml)")
    return pipeline.model


def _loop(arguments):
    # One [C, F, H, W] tensor per call: the whole output is one prompt (batch_dim None).
    return LoopSpec(int(arguments["sampling_steps"]), STREAMS, batch_dim=None), {"timestep_arg": "t"}


def _identity(arguments, model) -> Dict[str, Any]:
    """The DiT (class, architecture, dtype), the solver and shift of this generate() call, and the
    ``--task`` of the command line when the launcher read it."""
    identity = {**model_identity(model), "scheduler": str(arguments["sample_solver"]),
                "shift": float(arguments["shift"]), **wan_output_identity(arguments)}
    if arguments.get("guide_scale") is not None:
        identity["guide_scale"] = guide_scale_identity(arguments["guide_scale"])
    if "task" in _launch:
        identity["task"] = _launch["task"]
    return identity


def _hybrid_under_sequence_parallel(config: TaoCacheConfig) -> bool:
    """A hybrid whose TeaCache decides from sharded activations (the authors' Wan2.1 TeaCache,
    ``published: wan2.1-*``, decides from the timestep embedding, the same on every rank)."""
    tea = config.teacache
    return tea is not None and (tea.threshold or 0) > 0 and not (tea.published or "").startswith("wan2.1")


def _refuse_rank_local_decisions(config: TaoCacheConfig):
    """TeaCache decides from activations, which sequence parallelism shards over ranks: ranks could
    decide differently and one would skip the attention collectives another enters. Data-parallel
    ranks (each with the whole model) are fine."""
    def check(arguments, model):
        if _hybrid_under_sequence_parallel(config) and getattr(arguments["self"], "sp_size", 1) > 1:
            raise IntegrationError(f"{config.source}: teacache: the hybrid decides from activations that "
                                   f"sequence parallelism (--ulysses_size/--ring_size, here {arguments['self'].sp_size} "
                                   "ranks) shards, so ranks could take different decisions and deadlock; use "
                                   "the authors' TeaCache (teacache.published: wan2.1-<checkpoint>, which decides from "
                                   "the timestep embedding) or TaoCache (and pab:) alone with sequence parallelism")
        return []
    return check


# ---------------------------------------------------------------------- before the model loads
FLAGS = {"task": "--task", "scheduler": "--sample_solver", "shift": "--sample_shift", "pixels": "--size",
         "frame_num": "--frame_num", "guide_scale": "--sample_guide_scale"}


# Every option of generate.py (Wan2.1 9737cba), so that shortened options resolve as in its parser.
OPTIONS: Dict[str, Dict[str, Any]] = {
    **{f"--{name}": {} for name in (
        "ckpt_dir", "offload_model", "save_file", "src_video", "src_mask", "src_ref_images", "prompt",
        "prompt_extend_method", "prompt_extend_model", "prompt_extend_target_lang", "base_seed", "image",
        "first_frame", "last_frame")},
    **{f"--{name}": {"action": "store_true"} for name in ("t5_fsdp", "t5_cpu", "dit_fsdp", "use_prompt_extend")},
    # choices as generate.py's: a value its parser refuses leaves the checks to it ("invalid choice")
    "--task": {"default": "t2v-14B", "choices": TASKS}, "--size": {"default": "1280*720", "choices": SIZES},
    "--sample_solver": {"default": "unipc", "choices": SOLVERS},
    "--sample_steps": {"type": int, "default": None}, "--sample_shift": {"type": float, "default": None},
    "--ulysses_size": {"type": int, "default": 1}, "--ring_size": {"type": int, "default": 1},
    "--frame_num": {"type": int, "default": None}, "--sample_guide_scale": {"type": float, "default": None},
}


def command_line(argv: List[str]) -> Optional[Dict[str, Any]]:
    """What ``generate.py`` will run, from its arguments, with the defaults of its ``_validate_args``
    (50 steps, 40 for i2v; shift 5, 3 for i2v at 480p, 16 for flf2v/vace). ``None`` when its own
    parser would refuse the arguments."""
    args = script_options(argv, OPTIONS)
    if args is None:
        return None
    steps, why_steps = args.sample_steps, "--sample_steps"
    if steps is None:
        steps, why_steps = (40, "the i2v default") if "i2v" in args.task else (50, "the default")
    shift, why_shift = args.sample_shift, "--sample_shift"
    if shift is None:
        shift, why_shift = 5.0, "the default"
        if "i2v" in args.task and args.size in ("832*480", "480*832"):
            shift, why_shift = 3.0, "the i2v 480p default"
        elif "flf2v" in args.task or "vace" in args.task:
            shift, why_shift = 16.0, "the flf2v/vace default"
    return {"task": args.task, "steps": steps, "steps_from": why_steps, "scheduler": args.sample_solver,
            "shift": float(shift), "shift_from": why_shift,
            "guide_scale": 5.0 if args.sample_guide_scale is None else float(args.sample_guide_scale),
            "guide_scale_from": "the default" if args.sample_guide_scale is None else "--sample_guide_scale",
            "sequence_parallel": args.ulysses_size * args.ring_size, "size": args.size, "ckpt_dir": args.ckpt_dir,
            **output_size_of(argv, OPTIONS)}


def _said(run: Dict[str, Any], key: str) -> str:
    """``--sample_shift 8.0`` or ``--sample_shift 3.0, the i2v 480p default``, as the user would recognise it."""
    if key == "pixels":
        return f"--size {run['size']} ({run['pixels']} pixels a frame)"
    origin = run.get(f"{key}_from", FLAGS.get(key))
    flag = FLAGS.get(key, "--sample_steps" if key == "steps" else key)
    return f"{flag} {run[key]}" + ("" if origin.startswith("--") else f", {origin}")


def precheck(config: TaoCacheConfig, argv: List[str]) -> None:
    """Check, before generate.py loads T5, the VAE and the DiT, what its command line already says:
    the task against the config's model_id, the step count against loop.steps and the LUT, the task,
    solver and shift against the LUT's identity, the plan against the step count, the LUT's folder,
    the hybrid against sequence parallelism. Raises with every problem found."""
    run = command_line(argv)
    _launch.clear()
    if run is None:
        from taohooks.integrations.wan22 import TASKS as WAN22_TASKS

        other = task_of_the_other_version(argv, OPTIONS, WAN22_TASKS)
        if other is not None:  # (a Wan2.2 checkout's generate.py: nothing here would be patched or checked)
            raise IntegrationError(f"{config.source or 'the config'}: integration: wan is Wan2.1's, and --task {other} "
                                   "is a Wan2.2 task; use integration: wan22 (configs/wan22_*.yaml)")
        return  # generate.py's own parser refuses these arguments and says why
    _launch["task"] = run["task"]
    problems = command_line_problems(config, run, flags=FLAGS, said=_said, tasks=TASKS, streams=STREAMS,
                                     configs_hint="configs/wan_*.yaml")
    resolution = next((r for r in RESOLUTIONS if r in (config.model_id or "").lower()), None)
    if resolution is not None and run["size"] not in RESOLUTIONS[resolution]:
        problems.append(f"{config.source or 'the config'}: model_id {config.model_id!r} is for {resolution} "
                        f"({' or '.join(RESOLUTIONS[resolution])}), this command line runs --size {run['size']}; use "
                        "the config for that resolution (configs/wan_i2v_14B_480p.yaml, _720p.yaml) or give it its "
                        "own model_id and lut")
    published = config.teacache.published if config.teacache is not None else None
    if published and published.startswith("wan2.1-"):  # the authors' coefficients are per checkpoint
        from taohooks.caches.teacache_wan21 import checkpoint_key

        try:
            wanted = "wan2.1-" + checkpoint_key(run["task"], run["size"], run["ckpt_dir"])
        except ValueError as exc:
            problems.append(f"{config.source or 'the config'}: teacache.published: {published}, but {exc}")
        else:
            if wanted != published:
                problems.append(f"{config.source or 'the config'}: teacache.published is {published}, but this "
                                f"command line runs --task {run['task']} (--size {run['size']}), whose published "
                                f"coefficients are {wanted}; set teacache.published: {wanted}")
    if _hybrid_under_sequence_parallel(config) and run["sequence_parallel"] > 1:
        problems.append(f"{config.source or 'the config'}: teacache: the hybrid decides from activations that "
                        f"sequence parallelism (--ulysses_size x --ring_size = {run['sequence_parallel']}) shards "
                        "over ranks; ranks could take different decisions and deadlock. Use TaoCache (and pab:) "
                        "alone here")
    if problems:
        raise IntegrationError("\n".join(problems))


def install(config: TaoCacheConfig) -> None:
    """Patch every Wan pipeline's ``generate`` when (or if already) imported; idempotent."""
    if _patches.installed:
        return
    require_modules("wan", ["wan"], "run generate.py of a Wan2.1 checkout, or pip install -e the checkout")
    _patches.installed = True
    _patches.patch_generate(PIPELINES, lambda arguments: shared_cache(config), _model, _loop,
                            callbacks_of=_refuse_rank_local_decisions(config), identity_of=_identity, prompt_arg="input_prompt")


def uninstall() -> None:
    _patches.uninstall()
    _launch.clear()
