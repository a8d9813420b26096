"""What ``taocache compare`` needs to know of each integration's generation function.

The integration's :class:`~taohooks.launcher.integration.GenerationPatch` already finds the model and the
loop; a target adds where the prompt and the seed go, how to read the video from the function's
return value, and the block stack and TeaCache proxy (``None``: TeaCache is not available there
yet, because the proxy its authors use is not implemented for that integration).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..runtime.reset import StateReset
from .errors import CompareError

__all__ = ["Target", "TARGETS", "target_for"]


def _batch_of_clips(result: Any) -> torch.Tensor:
    """The testbed samplers: ``[B, 3, F, H, W]`` in [-1, 1]."""
    return result


def _single_video(result: Any) -> torch.Tensor:
    """Wan2.1's ``generate``: one decoded video ``[3, F, H, W]`` in [-1, 1] (``None`` on ranks > 0)."""
    if result is None:
        raise CompareError("the generation returned None (Wan2.1 returns the video on rank 0 only)")
    return result.unsqueeze(0)


def _pipeline_video(result: Any) -> torch.Tensor:
    """Latte's / Open-Sora-Plan's pipelines: ``.video`` (or ``[0]`` with ``return_dict=False``); the
    official ones decode to uint8 ``[B, F, H, W, C]`` (mapped to [-1, 1], ``[B, C, F, H, W]``); a float
    5-D tensor (latents, the call-contract fixtures) is taken as ``[B, C, F, H, W]``."""
    video = getattr(result, "video", None)
    if video is None and isinstance(result, (tuple, list)) and result:
        video = result[0]
    if isinstance(video, torch.Tensor) and video.dtype == torch.uint8 and video.dim() == 5:
        return video.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    return video


@contextlib.contextmanager
def _recording_first_argument(owner: Any, names: Tuple[str, ...]) -> Iterator[List[torch.Tensor]]:
    """While active, ``owner.<name>(x, ...)`` for each of ``names`` records ``x`` (a tensor ``[B, C, F, H, W]``
    or a list of ``[C, F, H, W]``, stacked) as float32 on the CPU, then runs as before; put back exactly after."""
    seen: List[torch.Tensor] = []
    patched = []
    try:
        for name in names:
            inner = getattr(owner, name, None)
            if inner is None:
                continue
            had = name in getattr(owner, "__dict__", {})

            def record(*args, _inner=inner, **kwargs):
                latents = args[0] if args else next(iter(kwargs.values()), None)
                value = torch.stack(list(latents)) if isinstance(latents, (list, tuple)) else latents
                if isinstance(value, torch.Tensor) and not seen:
                    seen.append(value.detach().to("cpu", torch.float32))
                return _inner(*args, **kwargs)

            object.__setattr__(owner, name, record)
            patched.append((name, had, inner))
        yield seen
    finally:
        for name, had, inner in reversed(patched):
            if had:
                object.__setattr__(owner, name, inner)
            else:
                object.__delattr__(owner, name)


def _wan_latents(arguments: dict) -> ContextManager[List[torch.Tensor]]:
    """Wan's ``generate`` decodes the final latents with ``self.vae.decode(x0)`` (rank 0)."""
    vae = getattr(arguments.get("self"), "vae", None)
    return _recording_first_argument(vae, ("decode",)) if vae is not None else contextlib.nullcontext([])


def _pipeline_latents(arguments: dict) -> ContextManager[List[torch.Tensor]]:
    """Latte's / Open-Sora-Plan's pipelines decode the final latents with one of these methods (not
    called with ``output_type='latents'``, which returns them as the video)."""
    return _recording_first_argument(arguments["self"], ("decode_latents", "decode_latents_with_temporal_decoder",
                                                         "decode_latents_image"))


def _testbed_probe():
    from ..evaluation.testbed_model import modulated_input

    return modulated_input


def _wan22_e_probe():
    from ..caches.teacache_wan22 import wan22_e_probe

    return wan22_e_probe


def _wan21_published_teacache(arguments: dict, use_ret_steps: bool):
    """``(make(threshold) -> callbacks, provenance)``: the authors' TeaCache for this Wan2.1 call, the
    checkpoint told by the DiT's width (1536: T2V-1.3B, 5120: 14B) and, for i2v, ``max_area``."""
    from ..caches.teacache_wan21 import SOURCE, wan21_teacache

    pipeline = arguments["self"]
    model = getattr(pipeline.model, "module", pipeline.model)
    dim = getattr(getattr(model, "config", None), "dim", None) or getattr(model, "dim", None)
    if type(pipeline).__name__ == "WanI2V":
        area = arguments.get("max_area", 720 * 1280)
        checkpoint = "i2v-480P" if area <= 832 * 480 else "i2v-720P"
    elif dim == 5120:
        checkpoint = "t2v-14B"
    else:
        checkpoint = "t2v-1.3B"
    variant = "use_ret_steps" if use_ret_steps else "without use_ret_steps"
    return ((lambda threshold, max_step=None: wan21_teacache(checkpoint, threshold, use_ret_steps, max_step=max_step)),
            f"the authors' TeaCache for Wan2.1 {checkpoint} ({variant}): the timestep-embedding proxy and the "
            f"published coefficients of {SOURCE}")


def _wan21_checkpoint(arguments: dict) -> str:
    pipeline = arguments["self"]
    model = getattr(pipeline.model, "module", pipeline.model)
    dim = getattr(getattr(model, "config", None), "dim", None) or getattr(model, "dim", None)
    if type(pipeline).__name__ == "WanI2V":
        return "i2v-480P" if arguments.get("max_area", 720 * 1280) <= 832 * 480 else "i2v-720P"
    return "t2v-14B" if dim == 5120 else "t2v-1.3B"


def _wan21_published_magcache(arguments: dict, steps: int):
    """``(make(threshold, k, retention), default K, default retention, provenance)``: the authors' MagCache
    for this Wan2.1 call (their published ratios)."""
    from ..caches.magcache import MagCacheCallback
    from ..caches.magcache_wan21 import SETTINGS, SOURCE, published_ratios

    checkpoint = _wan21_checkpoint(arguments)
    ratios = published_ratios(checkpoint, steps)
    _, k, retention = SETTINGS[checkpoint]
    return ((lambda threshold, k, retention: MagCacheCallback(ratios, threshold, k, retention, blocks="blocks")),
            k, retention, f"the authors' MagCache for Wan2.1 {checkpoint}: the published magnitude ratios of {SOURCE}")


def _wan22_task(arguments: dict) -> str:
    pipeline = arguments["self"]
    name = type(pipeline).__name__
    if name == "WanTI2V" or not hasattr(pipeline, "high_noise_model"):
        return "ti2v-5B"
    return "i2v-A14B" if name == "WanI2V" else "t2v-A14B"


def _wan22_published_magcache(arguments: dict, steps: int):
    """The authors' MagCache for this Wan2.2 call: their table for the task (TI2V: with or without an
    image), their retention over the two experts (``S`` high-noise steps counted as they count them)."""
    from ..caches.magcache import ratio_table
    from ..caches.magcache_wan22 import (MODES, PUBLISHED, SETTINGS, SOURCE, Wan22MagCache, authors_high_noise_steps,
                                         table_for)

    task = _wan22_task(arguments)
    table = table_for(task, image=arguments.get("img") is not None)
    mode = MODES[table]
    pipeline = arguments["self"]
    high = None
    if mode != "ti2v":
        high = authors_high_noise_steps(steps, float(arguments["shift"]), float(pipeline.boundary))
    ratios = ratio_table(PUBLISHED[table], steps)
    _, k, retention = SETTINGS[table]
    where = f", {high} high-noise steps of {steps}" if high is not None else ""
    return ((lambda threshold, k, retention: Wan22MagCache(ratios, threshold, k, retention, mode, high,
                                                           blocks="blocks")),
            k, retention, f"the authors' MagCache for Wan2.2 {table} ({mode} retention{where}): the published "
                          f"magnitude ratios of {SOURCE}")


def _latte_published_teacache(model: str, through: str = ""):
    """``(arguments, use_ret_steps) -> (make(threshold), provenance)``: the authors' TeaCache for a
    Latte-shaped transformer (``model``: ``latte`` or ``opensora_plan``; ``through``: the pipeline it runs in,
    where it is not the official script's)."""
    def published(arguments: dict, use_ret_steps: bool):
        from ..caches.teacache_latte import SOURCE, latte_teacache

        name = {"latte": "Latte-1", "opensora_plan": "Open-Sora-Plan v1.1"}[model]
        return ((lambda threshold, max_step=None: latte_teacache(model, threshold, max_step=max_step)),
                f"the authors' TeaCache for {name}" + (f" (in {through})" if through else "") + ": the first "
                f"block's timestep-modulated input over the whole spatial+temporal stack, the published "
                f"coefficients of {SOURCE}")
    return published


def _diffusers_video(result: Any, output_type: Optional[str]) -> torch.Tensor:
    """A diffusers video pipeline's ``.frames`` (or ``[0]`` with ``return_dict=False``) as ``[B, C, F, H, W]``:
    ``np`` (``[B, F, H, W, C]`` in [0, 1], Wan's default), ``pt`` (``[B, F, C, H, W]`` in [0, 1]), ``pil`` (a list
    per video of frames, Latte's default) mapped to [-1, 1]; ``latent`` (the latents, ``[B, C, F, H, W]``) as is."""
    import numpy as np

    frames = getattr(result, "frames", None)
    if frames is None and isinstance(result, (tuple, list)) and result:
        frames = result[0]
    if output_type in ("latent", "latents"):
        return frames
    if isinstance(frames, (list, tuple)) and frames and isinstance(frames[0], (list, tuple)):  # PIL images
        frames = np.stack([np.stack([np.asarray(image.convert("RGB")) for image in video]) for video in frames])
    if isinstance(frames, np.ndarray) and frames.ndim == 5:
        scale = 127.5 if frames.dtype == np.uint8 else 0.5
        return torch.from_numpy(np.ascontiguousarray(frames)).float().permute(0, 4, 1, 2, 3) / scale - 1.0
    if isinstance(frames, torch.Tensor) and frames.dim() == 5:
        return frames.float().permute(0, 2, 1, 3, 4) * 2.0 - 1.0
    return frames


def _diffusers_latents(arguments: dict) -> ContextManager[List[torch.Tensor]]:
    """A diffusers pipeline decodes its final latents with ``self.decode_latents`` (Latte) or ``self.vae.decode``
    (Wan; the latents un-normalised by the VAE's mean and std as the pipeline passes them)."""
    pipe = arguments["self"]
    if hasattr(pipe, "decode_latents"):
        return _recording_first_argument(pipe, ("decode_latents",))
    vae = getattr(pipe, "vae", None)
    return _recording_first_argument(vae, ("decode",)) if vae is not None else contextlib.nullcontext([])


def _output_type(arguments: dict) -> Optional[str]:
    """The call's ``output_type``, or its default in the pipeline's signature (``np`` for Wan, ``pil`` for Latte)."""
    if "output_type" in arguments:
        return arguments["output_type"]
    import inspect

    try:
        parameter = inspect.signature(type(arguments["self"]).__call__).parameters.get("output_type")
    except (TypeError, ValueError):
        return None
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def _diffusers_target(arguments: dict) -> "Target":
    """The diffusers target for the pipeline of this call: its transformer's block stacks, attention modules and
    TeaCache (Wan: fitted on the time projection the first block receives; Latte: the authors' published
    coefficients), or none of them for a transformer taohooks does not know."""
    import functools

    from ..runtime.patching import unwrap_model

    pipe = arguments["self"]
    model = getattr(pipe, "transformer", None)
    model = unwrap_model(model, compiled=True) if model is not None else None
    classes = [c.__name__ for c in type(model).__mro__]  # (a subclass of diffusers' class is one)
    transformer = classes[0]
    video = functools.partial(_diffusers_video, output_type=_output_type(arguments))
    common = dict(video_of=video, latents_during=_diffusers_latents, per_call=None, hook_callbacks=_diffusers_checks)
    if any(c.startswith("Wan") and c.endswith("Transformer3DModel") for c in classes):
        return dataclasses.replace(TARGETS["diffusers"], blocks="blocks", tea_probe=_diffusers_wan_probe,
                                   tea_source=DIFFUSERS_WAN_TEACACHE, attention=r"blocks\.\d+\.attn1", **common)
    if "LatteTransformer3DModel" in classes:
        return dataclasses.replace(TARGETS["diffusers"], blocks=LATTE_STACKS, exit="norm_out",
                                   tea_published=_latte_published_teacache("latte", "diffusers' LattePipeline"),
                                   attention=LATTE_SELF_ATTENTION, refused=LEARNED_SIGMA, **common)
    return dataclasses.replace(TARGETS["diffusers"], blocks=None, tea_source=(
        f"its proxy and block stack are known for diffusers' Wan and Latte transformers, not {transformer}"),
        **common)


def _diffusers_checks(arguments: dict, model) -> list:
    """The diffusers integration's own callbacks: each call's ``cache_context`` checked against the loop's streams,
    diffusers' own caches reset where a generation starts or resumes."""
    from ..integrations.diffusers import _callbacks

    return _callbacks(arguments, model)


def _diffusers_wan_probe():
    from ..caches.teacache_wan22 import diffusers_wan_temb_probe

    return diffusers_wan_temb_probe


class VideoSysOwnPAB(StateReset):
    """The ``videosys-pab`` method's callback: VideoSys' own PAB, as the script configured it, stays on for the
    generation (:func:`_videosys_pab_off` leaves it), its state reset where the generation starts."""

    def __init__(self, transformer):
        from ..integrations.videosys import reset_pab_state

        super().__init__(lambda: reset_pab_state(transformer))  # (every generation starts as VideoSys' first does)


@contextlib.contextmanager
def _videosys_pab_off(arguments: dict, callbacks=()) -> Iterator[None]:
    """VideoSys' own PAB off for one generation (``enable_pab=True`` sets a global manager every block asks;
    ``None`` there is "off" to all of them), put back after: the full-step reference is the model's own
    output, and each method is the method alone; left on for ``videosys-pab`` (:class:`VideoSysOwnPAB`)."""
    import sys

    from ..integrations.videosys import PAB_MODULES

    if any(isinstance(cb, VideoSysOwnPAB) for cb in callbacks):
        yield
        return
    held = [(m, m.PAB_MANAGER) for m in (sys.modules.get(n) for n in PAB_MODULES)
            if m is not None and getattr(m, "PAB_MANAGER", None) is not None]
    try:
        for module, _ in held:
            module.PAB_MANAGER = None
        yield
    finally:
        for module, manager in held:
            module.PAB_MANAGER = manager


# VideoSys' transformers whose TeaCache the authors publish (TeaCache's Latte and Open-Sora-Plan evaluations run in
# VideoSys): the module of the class -> the coefficients' model
VIDEOSYS_TEACACHE = {"videosys.models.transformers.latte_transformer_3d": "latte",
                     "videosys.models.transformers.open_sora_plan_v110_transformer_3d": "opensora_plan"}


def _videosys_target(arguments: dict) -> "Target":
    """The videosys target for this call's pipeline: Latte and Open-Sora-Plan v1.1's transformers (Latte-shaped:
    the spatial and temporal stacks, the authors' TeaCache), or none of the block-level methods for another.
    Refuses a pipeline of several GPUs (its other ranks generate in VideoSys' worker processes, which compare does
    not replay); says once that VideoSys' own PAB is off in every compared run."""
    import torch.distributed as dist

    from ..runtime import messages
    from ..runtime.patching import unwrap_model
    from ..integrations.videosys import pab_manager

    pipe = arguments["self"]
    gpus = getattr(getattr(pipe, "_config", None), "num_gpus", 1)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if max(int(gpus or 1), world) > 1:
        raise CompareError(f"VideoSys runs this {type(pipe).__name__} on {max(int(gpus or 1), world)} GPUs: its "
                           "other ranks generate in VideoSysEngine's worker processes, which compare does not replay "
                           "(they would wait for the first call's collectives); compare with num_gpus=1 in the "
                           "script's config")
    own = pab_manager() is not None
    if own:
        messages.notice("compare: VideoSys' own PAB (enable_pab=True) is off in every compared run: the full-step "
                        "reference is the model's own output and each method runs alone (the pab methods are "
                        "taohooks' PAB, not VideoSys': see the README's \"On a VideoSys script\")")
    model = unwrap_model(getattr(pipe, "transformer", None), compiled=True)
    name = type(model).__module__
    coefficients = VIDEOSYS_TEACACHE.get(name)
    if coefficients is None:
        return dataclasses.replace(TARGETS["videosys"], per_call=None, blocks=None, attention=None, exit=None,
                                   tea_source=f"the block stacks and TeaCache are known for VideoSys' Latte and "
                                              f"Open-Sora-Plan v1.1 transformers, not {name}.{type(model).__name__}")
    return dataclasses.replace(TARGETS["videosys"], per_call=None, refused=LEARNED_SIGMA, own_pab=_videosys_own_pab,
                               tea_published=_latte_published_teacache(
                                   coefficients, f"VideoSys' {type(pipe).__name__}, where the authors evaluated it"))


def _videosys_own_pab(arguments: dict, model) -> Any:
    """The ``videosys-pab`` method's callback, or why it cannot run (the script did not enable VideoSys' PAB)."""
    from ..integrations.videosys import pab_manager

    if pab_manager() is None:
        return ("videosys-pab is VideoSys' own PAB as the script configures it, but the script's config has no "
                "enable_pab=True (VideoSys set no PAB manager): enable it in the script, or drop videosys-pab")
    return VideoSysOwnPAB(model)


DIFFUSERS_WAN_TEACACHE = (
    "TeaCache fitted here on diffusers' WanTransformer3DModel (the authors' coefficients are for the official Wan2.1 "
    "code): the proxy of TeaCache4Wan2.1's use_ret_steps variant (the time projection the first block receives as "
    "temb, its last token), a polynomial per expert fitted on the calibration prompts")


@dataclass
class Target:
    prompt_arg: str
    seed_arg: Optional[str]  # None: the script seeds torch's global RNG; torch.manual_seed(seed) before each run
    video_of: Callable[[Any], torch.Tensor]  # return value -> [B, C, F, H, W], values in [-1, 1]
    blocks: Union[str, Tuple[str, ...]] = "blocks"  # the block stack(s) whose residual TeaCache / MagCache reuse
    tea_probe: Optional[Callable[[], Callable]] = None  # makes TeaCache's proxy (coefficients fitted); None: not yet
    tea_source: str = ""  # where the proxy (and its use) comes from
    # the authors' TeaCache with published coefficients: (generate's arguments, use_ret_steps) ->
    # (make(threshold) -> callbacks, provenance); no polynomial fit
    tea_published: Optional[Callable[[dict, bool], tuple]] = None
    tea_ret_steps: bool = False  # the published TeaCache has the authors' use_ret_steps variant (Wan2.1)
    # MagCache with published ratios: (generate's arguments, steps) ->
    # (make(threshold, k, retention) -> callback, default K, default retention, provenance)
    mag_published: Optional[Callable[[dict, int], tuple]] = None
    attention: Optional[str] = None  # the attention modules PAB broadcasts (full-name regex); None: not yet
    exit: Optional[str] = None  # the module receiving the stacks' output, where there are several (Latte)
    # records the final latents (before the VAE) during a generation: (generate's arguments) -> a context
    # manager yielding a list that holds them afterwards (empty when the script did not decode)
    latents_during: Optional[Callable[[dict], ContextManager[List[torch.Tensor]]]] = None
    # the script's flags whose values no compared run depends on (the prompt and seed compare replaces, the
    # output file, Wan's model offloading): left out where an output folder's script line is compared; each with
    # the number of values it takes (None: nargs='+', every value up to the next option)
    neutral_flags: Dict[str, Optional[int]] = field(default_factory=dict)
    # every option of the script, where known (its parser's: option -> its argparse settings): an abbreviated option
    # (argparse's allow_abbrev: ``--save_img`` for ``--save_img_path``) is compared as the option it names, one given
    # at its default (``--sample_solver unipc``) as not given; {}: compared as written
    script_options: Callable[[], Mapping[str, Mapping[str, Any]]] = dict
    # the script's own config file (Latte's ``--config X.yaml``): (the script line) -> its settings less those no
    # compared run depends on, or None where it cannot be read (the script says why); compared by content, so that
    # a copy of it elsewhere is the same experiment and an edit at the same path is not
    script_config: Optional[Callable[[List[str]], Optional[Dict[str, Any]]]] = None
    config_flag: Optional[str] = None  # the flag naming that file (left out of the script line compared by content)
    # the target of one call's pipeline, where it depends on the pipeline (diffusers: the transformer's class):
    # (generate's arguments) -> Target, at the first generation call; the methods it can run are checked then
    per_call: Optional[Callable[[dict], "Target"]] = None
    # callbacks of the integration every compared generation's hook also carries (before the methods'): (generate's
    # arguments, the model) -> fresh callbacks (diffusers: the cache_context check)
    hook_callbacks: Optional[Callable[[dict, Any], list]] = None
    # the context every compared generation runs in: (generate's arguments, the run's callbacks) -> a context manager
    # (VideoSys: its own PAB off but for videosys-pab)
    around: Optional[Callable[[dict, Sequence[Any]], ContextManager[None]]] = None
    # the pipeline's own PAB as the script configured it (the videosys-pab method): (generate's arguments, the model)
    # -> its callback, or a ConfigError-worthy reason (str) where the script did not enable it; None: no such PAB
    own_pab: Optional[Callable[[dict, Any], Any]] = None
    # methods that cannot work on this model: method -> why (refused before any run)
    refused: Dict[str, str] = field(default_factory=dict)

    @property
    def known(self) -> bool:
        """False for a per-call target not resolved yet (the methods it can run are not known)."""
        return self.per_call is None

    def for_call(self, arguments: dict) -> "Target":
        """The target for this call's pipeline (itself where it does not depend on the pipeline)."""
        return self.per_call(arguments) if self.per_call is not None else self

    def comparable_script(self, argv: List[str], config_by_content: bool = False) -> List[str]:
        """``argv`` (the script and its arguments) without :attr:`neutral_flags` and their values (``--flag v``,
        ``--flag=v``, or every value up to the next option of an ``nargs='+'`` flag; a short option ``-x`` ends
        them, a negative number or a word with a space does not), an abbreviated option written out in full (where
        the script's options are known). ``config_by_content``: :attr:`config_flag` is left out too (its file is
        compared by :attr:`script_config`). An option given once, at the default the script's parser has for it, is
        left out too (the script runs the same without it)."""
        neutral = {**self.neutral_flags, **({self.config_flag: 1} if config_by_content and self.config_flag else {})}
        options = self.script_options()
        names = tuple(options)
        kept, values = [], 0  # (values: how many of the next words are a neutral flag's; -1: up to an option)
        given = [full_option(w.partition("=")[0], names) for w in argv if is_option(w)]
        default = None  # (where the flag just kept is in kept, and its settings: its one value may be its default)
        for word in argv:
            if is_option(word):
                name, equals, value = word.partition("=")
                name = full_option(name, names)
                values, default = 0, None
                if name in neutral:
                    if not equals:  # (its values follow)
                        n = neutral[name]
                        values = -1 if n is None else n
                    continue
                settings = (options.get(name) or {}) if given.count(name) == 1 else {}  # (given twice: as written)
                if equals and _is_default(value, settings):
                    continue
                default = None if equals else (len(kept), settings)
                word = name + equals + value
            elif values:
                values -= values > 0
                continue
            elif default is not None:
                (where, settings), default = default, None
                if _is_default(word, settings):
                    del kept[where]
                    continue
            kept.append(word)
        return kept

    def video(self, result: Any) -> torch.Tensor:
        video = self.video_of(result)
        if not isinstance(video, torch.Tensor) or video.dim() != 5:
            raise CompareError(f"expected the generation to return a video tensor, got {type(result).__name__}"
                             + (f" of shape {tuple(video.shape)}" if isinstance(video, torch.Tensor) else ""))
        return video.detach().to("cpu", torch.float32).contiguous()


LATTE_STACKS = ("transformer_blocks", "temporal_transformer_blocks")  # spatial and temporal, interleaved
# Latte's and Open-Sora-Plan v1.1's transformers predict noise and a variance half (8 output channels for 4 input)
LEARNED_SIGMA = {"easycache": "the transformer's output has a variance half (twice the input's channels): EasyCache, "
                              "which reuses output - input, would compute every call"}
# PAB in compare: the spatial and temporal self-attention, one range (VideoSys gives them 2 and 3 and also
# broadcasts cross-attention: the YAML's pab: section has per-group ranges)
LATTE_SELF_ATTENTION = r"(temporal_)?transformer_blocks\.\d+\.attn1"

def _options_of(integration: str) -> Callable[[], Mapping[str, Mapping[str, Any]]]:
    """The script's options as the integration lists them for its own checks (``OPTIONS``), read when first needed."""
    def options() -> Mapping[str, Mapping[str, Any]]:
        import importlib

        return dict(importlib.import_module(f"taohooks.integrations.{integration}").OPTIONS)
    return options


def _is_default(value: str, settings: Mapping[str, Any]) -> bool:
    """Whether a one-value option's command-line ``value`` is its parser's default (``settings``: its argparse
    keywords; a default of None, a flag's action, or several values: never)."""
    if settings.get("default") is None or settings.get("action") or settings.get("nargs"):
        return False
    try:
        return settings.get("type", str)(value) == settings["default"]
    except (TypeError, ValueError):
        return False


# the keys of Latte's sample_t2x.py YAML no compared run depends on: where it writes, the prompts compare replaces,
# the seed its script does not use (its torch.manual_seed is commented out; compare seeds every run), the file names
LATTE_NEUTRAL_KEYS = ("save_img_path", "text_prompt", "seed", "run_time")


def _latte_script_config(argv: List[str]) -> Optional[Dict[str, Any]]:
    """The settings of the YAML sample_t2x.py reads (``--config``, its parser's default where not given) less
    :data:`LATTE_NEUTRAL_KEYS`, as experiment.json gives them back; None where it cannot be read."""
    import json

    import yaml

    from ..launcher.integration import script_options

    args = script_options(argv[1:], {"--config": {"default": "./configs/wbv10m_train.yaml"}})
    if args is None:
        return None
    try:
        with open(args.config, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(data, dict):
        return None

    def keyed(value: Any) -> Any:  # (every mapping's keys as strings, as JSON has them: int and str may mix)
        if isinstance(value, dict):
            return {str(k): keyed(v) for k, v in value.items()}
        return [keyed(v) for v in value] if isinstance(value, (list, tuple)) else value

    return json.loads(json.dumps(keyed({k: v for k, v in data.items() if str(k) not in LATTE_NEUTRAL_KEYS}),
                                 default=str, sort_keys=True))


def full_option(name: str, options: Sequence[str]) -> str:
    """The option a command-line ``--name`` gives, as argparse resolves it among the script's ``options``: itself
    where it is one (or none are known), else the one option it abbreviates (``--save_img`` -> ``--save_img_path``);
    an ambiguous or unknown abbreviation stays as written (the script's parser refuses it)."""
    if not name.startswith("--") or name in options:
        return name
    longer = [option for option in options if option.startswith(name)]
    return longer[0] if len(longer) == 1 else name


def is_option(word: str) -> bool:
    """Whether a command-line word is an option, by argparse's rule (a negative number or a word with a space is a
    value, but ``--name=value`` with a spaced value is an option)."""
    if not word.startswith("-") or len(word) < 2 or " " in word.split("=", 1)[0]:
        return False
    try:
        float(word)
        return False
    except ValueError:
        return True


# Wan's generate.py: the prompt and seed compare replaces, the output file, whether the model waits on the CPU
WAN_NEUTRAL_FLAGS = {"--prompt": 1, "--base_seed": 1, "--save_file": 1, "--offload_model": 1}

TARGETS: Dict[str, Target] = {
    "testbed": Target("prompts", "seeds", _batch_of_clips, "blocks", _testbed_probe,
                      "the first block's timestep-modulated input, as taocache bench", attention=r"blocks\.\d+\.attn",
                      neutral_flags={"--prompt": 1, "--seeds": None, "--out": 1}),
    "wan": Target("input_prompt", "seed", _single_video, "blocks", None,
                  "the authors' TeaCache for Wan2.1 (timestep-embedding proxy, published coefficients)",
                  tea_published=_wan21_published_teacache, tea_ret_steps=True,
                  mag_published=_wan21_published_magcache,
                  attention=r"blocks\.\d+\.self_attn", latents_during=_wan_latents, neutral_flags=WAN_NEUTRAL_FLAGS,
                  script_options=_options_of("wan")),
    "wan22": Target("input_prompt", "seed", _single_video, "blocks", _wan22_e_probe,
                    "TeaCache fitted here (TeaCache publishes no Wan2.2 coefficients): the proxy of TeaCache4Wan2.1's "
                    "use_ret_steps variant (the time projection e0 the first block receives, its last token), a "
                    "polynomial per expert (the A14B tasks; one for TI2V-5B) fitted on the calibration prompts, "
                    "accumulators per expert, the first and the last step computed",
                    mag_published=_wan22_published_magcache, attention=r"blocks\.\d+\.self_attn",
                    latents_during=_wan_latents, neutral_flags=WAN_NEUTRAL_FLAGS, script_options=_options_of("wan22")),
    "latte": Target("prompt", None, _pipeline_video, LATTE_STACKS, None,
                    "the authors' TeaCache for Latte-1 (TeaCache's eval script, published coefficients)",
                    tea_published=_latte_published_teacache("latte"), exit="norm_out", attention=LATTE_SELF_ATTENTION,
                    latents_during=_pipeline_latents, refused=LEARNED_SIGMA, script_options=lambda: {"--config": {}},
                    script_config=_latte_script_config, config_flag="--config"),
    "opensora_plan": Target("prompt", None, _pipeline_video, LATTE_STACKS, None,
                            "the authors' TeaCache for Open-Sora-Plan v1.1 (TeaCache's eval script, published "
                            "coefficients)", tea_published=_latte_published_teacache("opensora_plan"),
                            exit="norm_out", attention=LATTE_SELF_ATTENTION,
                            latents_during=_pipeline_latents, refused=LEARNED_SIGMA,
                            neutral_flags={"--text_prompt": None, "--save_img_path": 1},
                            script_options=_options_of("opensora_plan")),
    # any diffusers video pipeline the integration runs (WanPipeline and its siblings, LattePipeline, ...): the
    # prompt is the call's, the seed torch's RNG (or a fresh generator, seeded per run)
    "diffusers": Target("prompt", None, lambda result: result, None, per_call=_diffusers_target,
                        neutral_flags={"--prompt": 1, "--seed": 1, "--out": 1},  # (examples/diffusers_wan.py's)
                        tea_source="per pipeline: on Wan's transformers fitted here on the time projection (the "
                                   "use_ret_steps variant's proxy, always), on Latte the authors' own rule"),
    # VideoSys' LattePipeline and OpenSoraPlanPipeline (v1.1), one GPU; VideoSys' own PAB off in every run
    "videosys": Target("prompt", "seed", _pipeline_video, LATTE_STACKS, None, per_call=_videosys_target,
                       tea_source="per pipeline: the authors' TeaCache for Latte-1 and Open-Sora-Plan v1.1 (their "
                                  "published coefficients; their evaluation ran in VideoSys)",
                       exit="norm_out", attention=LATTE_SELF_ATTENTION, latents_during=_pipeline_latents,
                       around=_videosys_pab_off),
}


def target_for(integration: str) -> Target:
    if integration not in TARGETS:
        raise ValueError(f"taocache compare does not support the {integration!r} integration yet "
                         f"(available: {', '.join(TARGETS)})")
    return TARGETS[integration]
