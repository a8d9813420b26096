"""TaoCache in Latte's own ``sample/sample_t2x.py`` (Vchitect/Latte): ``integration: latte``.

    taocache-run sample/sample_t2x.py --config configs/t2x/t2v_sample.yaml --taocache configs/latte.yaml

What it patches: ``LattePipeline.__call__`` of the top-level module ``pipeline_latte`` that the
script imports from ``sample/`` (the launcher puts the script's folder first on ``sys.path``, as
``python sample/sample_t2x.py`` does). Inside each call it hooks the forward of the pipeline's
``transformer`` instance. Loop shape: one call per scheduler timestep (as many as the pipeline's
scheduler makes for ``num_inference_steps``) on a batch of (uncond, cond) halves; the output is
``(tensor,)`` or ``Transformer3DModelOutput`` with 8 channels (eps and learned variance), cached
whole. The timestep is the keyword ``timestep``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from taohooks.config import TaoCacheConfig
from taohooks.launcher.integration import (GenerationPatch, IntegrationError, PatchSet, batched_cfg_loop, identity_of_pipeline,
                                  require_modules, script_options)
from taohooks.runtime.io import check_writable
from taohooks.taocache.identity import accept_names, describe_differences, differences, pipeline_output_identity
from taohooks.taocache.lut import CalibrationLUT
from taohooks.taocache.lut_transfer import carryable
from taohooks.taocache.cache import TaoCache, calibrates, transfer_allowed, unfinished_lut_steps_problem

__all__ = ["install", "uninstall", "precheck", "check_sampler", "MODULE", "PIPELINE", "EXPECTS"]

MODULE, PIPELINE = "pipeline_latte", "LattePipeline"
EXPECTS = "a call of pipeline_latte.LattePipeline.__call__ (Latte's sample/sample_t2x.py)"

_patches = PatchSet()


def _loop(arguments):
    pipe = arguments["self"]
    # The pipelines accept `timesteps=` but always call scheduler.set_timesteps(num_inference_steps).
    return batched_cfg_loop(pipe.scheduler, arguments["num_inference_steps"], arguments["guidance_scale"])


def _identity(arguments, model):
    """Transformer and scheduler (class, prediction type, ...), the requested number of steps and the video's size
    (:func:`taohooks.taocache.identity.pipeline_output_identity`)."""
    return {**identity_of_pipeline(arguments["self"], model), "sampling_steps": int(arguments["num_inference_steps"]),
            **pipeline_output_identity(arguments)}


def patch_pipeline(cls, config: TaoCacheConfig, callbacks_of=None) -> GenerationPatch:
    """Wrap ``cls.__call__`` (a Latte-style pipeline) for TaoCache; shared with ``opensora_plan``."""
    patch = GenerationPatch(cls, "__call__", lambda arguments: TaoCache(config), lambda a: a["self"].transformer, _loop,
                            callbacks_of=callbacks_of, identity_of=_identity, prompt_arg="prompt")
    return patch.install()


def check_sampler(config: TaoCacheConfig, sample_method: Optional[str], steps: Optional[int], said: str,
                  guidance: Optional[float] = None, identity: Optional[Dict[str, Any]] = None,
                  frames_in_architecture: bool = False) -> None:
    """Before the model loads: the script's ``sample_method`` and step count against the LUT's identity
    (Latte and Open-Sora-Plan name their diffusers scheduler ``<sample_method>Scheduler``), its guidance scale
    against the LUT's streams (a scale of 1 or less makes one call per step: no uncond stream); the LUT's
    folder and ``calibration.sampler`` (the label a new LUT gets) when the run will calibrate; ``identity``: what the
    command line says of the video (``height``, ``frames``, ``guide_scale``...) against what the LUT recorded. ``said``
    is where the values come from, for the message. ``frames_in_architecture``: the script builds its transformer
    with the frame count (Latte's sample_t2x.py), so another one changes the architecture fingerprint too."""
    path = config.lut_path()
    if path is None:
        return
    label = config.calibration.sampler
    if not path.is_file():
        if config.calibration.auto:
            check_writable(path)
            if label and sample_method and label.lower() != str(sample_method).lower() \
                    and "scheduler" not in config.calibration.accept:
                raise IntegrationError(f"calibration.sampler is {label!r} ({config.source}), {said} runs "
                                       f"sample_method {sample_method}: the LUT it calibrates would be labelled "
                                       f"{label!r}; set calibration.sampler: {str(sample_method).lower()} (and give "
                                       "that sampler its own lut:)")
        return
    lut = CalibrationLUT.load(path)
    recorded = getattr(lut, "identity", None) or {}
    problems = []
    if guidance is not None and (float(guidance) > 1.0) != (len(lut.streams) > 1):
        problems.append(f"guidance_scale {guidance:g} ({said}) makes " + (
            "one call per step (no classifier-free guidance), the LUT was calibrated with guidance (streams "
            f"{', '.join(lut.streams)})" if float(guidance) <= 1.0 else
            f"two streams (uncond, cond), the LUT was calibrated without guidance (streams {', '.join(lut.streams)})"))
    shown = {k: v for k, v in (identity or {}).items() if not (k == "guide_scale" and problems)}  # (said above)
    continued = calibrates(config) and lut.num_prompts < config.calibration.prompts  # (accept: for a complete LUT)
    keys = differences(recorded, shown, () if continued else config.calibration.accept)
    acceptable = [] if continued else accept_names(keys)
    if keys:
        problems.append(f"{describe_differences(recorded, shown, keys)} ({said})" + (
            ": an unfinished LUT is continued at the values it began with" if continued else ""))
    if frames_in_architecture and "frames" in acceptable and "architecture" not in config.calibration.accept:
        # (sample_t2x.py builds LatteT2V with video_length: the architecture fingerprint differs too, found once the
        # model has loaded; review19, 2026-11-28)
        problems.append("another frame count also changes the transformer's architecture fingerprint (sample_t2x.py "
                        "builds LatteT2V with video_length): accepting frames alone is refused at the first call")
        acceptable.insert(acceptable.index("frames"), "architecture")
    if sample_method is not None and "scheduler" in recorded and "scheduler" not in config.calibration.accept \
            and recorded["scheduler"] != f"{sample_method}Scheduler":
        problems.append(f"sample_method {sample_method} ({said}), the LUT was calibrated with {recorded['scheduler']}")
    carried = transfer_allowed(config, lut)
    if steps is not None and "sampling_steps" in recorded and int(recorded["sampling_steps"]) != int(steps) \
            and not carried and "sampling_steps" not in config.calibration.accept:
        unfinished = unfinished_lut_steps_problem(config, lut, int(steps), run_has=f"{said} runs",
                                                  lut_steps=int(recorded["sampling_steps"]))
        if unfinished:  # (its advice is not the transfer the config already sets)
            raise IntegrationError(unfinished)
        hint = " (or carry it over with calibration.transfer: interpolate)" if carryable(lut) else \
            " (its calls repeat timesteps, PNDM's warm-up: it cannot be carried to another count)" \
            if lut.deltas is not None else ""
        problems.append(f"{steps} sampling steps ({said}), the LUT was calibrated with {recorded['sampling_steps']}"
                        + hint)
    if not problems and steps is not None and int(recorded.get("sampling_steps", -1)) == int(steps) \
            and lut.num_prompts >= config.calibration.prompts:  # (the run skips: its plan on the LUT, now)
        from taohooks.taocache.cache import make_plan
        from taohooks.taocache.plan import PlanError

        try:
            make_plan(config.plan, lut.steps, tuple(lut.streams), lut)
        except PlanError as exc:
            where = config.source or "the config"
            raise IntegrationError(f"{where}: {exc}" if str(exc).startswith("plan.") else f"{where}: plan: {exc}") \
                from None
    if problems:
        acceptable += ["scheduler"] if any(p.startswith("sample_method") for p in problems) else []
        raise IntegrationError(f"LUT {path} does not fit this run: " + "; ".join(problems) + ". Give this run its "
                               f"own LUT (lut: in {config.source})" + (
                                   f", or accept the difference knowingly with calibration.accept: "
                                   f"[{', '.join(acceptable)}]" if acceptable else ""))


def precheck(config: TaoCacheConfig, argv: List[str]) -> None:
    """Latte's sample_t2x.py takes ``--config X.yaml`` (its own OmegaConf YAML): read its
    ``sample_method`` and ``num_sampling_steps`` before the model loads."""
    args = script_options(argv, {"--config": {"default": ""}})  # sample_t2x.py's only option
    if args is None or not args.config:
        return
    try:
        import yaml

        with open(args.config, encoding="utf-8") as f:
            sample = yaml.safe_load(f)
    except (OSError, ValueError, ImportError):
        return  # the script itself reports a config it cannot read
    if not isinstance(sample, dict):
        return
    guidance = sample.get("guidance_scale")
    guidance = float(guidance) if isinstance(guidance, (int, float)) and not isinstance(guidance, bool) else None
    check_sampler(config, sample.get("sample_method"), sample.get("num_sampling_steps"), args.config,
                  guidance=guidance, identity=yaml_identity(sample, guidance), frames_in_architecture=True)


def yaml_identity(sample: Dict[str, Any], guidance: Optional[float]) -> Dict[str, Any]:
    """What sample_t2x.py's YAML says of the run, as the LUT's identity records it at the first generation: the video
    (``image_size`` as height and width, ``video_length``, ``enable_temporal_attentions``), the guidance scale, and the
    betas it gives every scheduler (``beta_start``, ``beta_end``, ``beta_schedule``). Values of another type are
    left to the script."""
    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    identity: Dict[str, Any] = {}
    size = sample.get("image_size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(number(v) for v in size):
        identity["height"], identity["width"] = int(size[0]), int(size[1])
    if number(sample.get("video_length")):
        identity["frames"] = int(sample["video_length"])
    if isinstance(sample.get("enable_temporal_attentions"), bool):
        identity["temporal_attention"] = sample["enable_temporal_attentions"]
    if guidance is not None:
        identity["guide_scale"] = guidance
    for key in ("beta_start", "beta_end"):
        if number(sample.get(key)):
            identity[f"noise_schedule.{key}"] = float(sample[key])
    if isinstance(sample.get("beta_schedule"), str):
        identity["noise_schedule.beta_schedule"] = sample["beta_schedule"]
    return identity


def install(config: TaoCacheConfig) -> None:
    """Patch ``pipeline_latte.LattePipeline`` when (or if already) imported; idempotent."""
    if _patches.installed:
        return
    require_modules("latte", [MODULE], "run sample/sample_t2x.py of a Latte checkout: its folder holds pipeline_latte.py")
    _patches.installed = True
    _patches.on_import(MODULE, lambda module: patch_pipeline(getattr(module, PIPELINE), config))


def uninstall() -> None:
    _patches.uninstall()
