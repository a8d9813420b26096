"""TaoCache on diffusers pipelines: one line from Python, or ``integration: diffusers`` in the launcher.

    from taohooks.integrations.diffusers import enable_taocache
    pipe = WanPipeline.from_pretrained(...)
    enable_taocache(pipe, "configs/diffusers_wan.yaml")
    video = pipe(prompt, num_inference_steps=50).frames[0]   # prints a one-line summary

Every ``pipe(...)`` call is one generation. The loop's shape comes from the pipeline and the call:
``WanPipeline`` (and its image/video-to-video, VACE and Animate siblings) call the transformer twice
per step, cond then uncond, inside ``transformer.cache_context("cond" / "uncond")`` (cond alone at a
guidance scale of 1); ``LattePipeline`` makes one call per step on a batch of (uncond, cond) halves.
``WanAnimatePipeline`` runs one sampling loop per segment of the pose video inside one call: each is
one generation (one LUT prompt while calibrating). Other pipelines whose transformer is called
once or twice per step work when the config's ``loop`` section says which (``streams``,
``split_batch``). The number of calls per stream is what the pipeline's scheduler makes for
``num_inference_steps`` (asked of a copy of it).

``cache_context`` names are checked against the streams the hook numbers calls by: a pipeline
that calls in another order than the streams listed, or makes more or fewer calls in a step than
the loop counts (a name that changes at a position of the step: an uncond call of a loop declared
as cond alone, LTX-2's third guidance call; or repeats at another: guidance switched off mid-run,
a batched call declared as two), fails with a clear error at that call instead of mixing the
streams' histories. Stream names of the user's own (``[positive, negative]``) are matched by
position.
When diffusers' own caches are enabled on the transformer (``transformer.enable_cache(
PyramidAttentionBroadcastConfig(...))``), their state is reset at every generation start and on
every step that resumes computing after TaoCache skipped (``_reset_stateful_cache``).

Wan2.2 A14B in diffusers (``transformer`` the high-noise expert, ``transformer_2`` the low-noise
one, switched at ``config.boundary_ratio * num_train_timesteps``): both are hooked on one hook whose
steps count the pipeline's steps, whichever transformer runs them (not each transformer's own calls),
one LUT holds both, and the first two steps of ``transformer_2`` are always computed.
"""
from __future__ import annotations

import os
import weakref
from typing import Any, Dict, List, Mapping, Optional, Union

from taohooks.runtime import messages
from taohooks.runtime.callbacks import Callback
from taohooks.config import TaoCacheConfig, check_python_config, config_from_dict, load_config
from taohooks.launcher.integration import (GenerationPatch, IntegrationError, PatchSet, batched_cfg_loop, identity_of_pipeline,
                                  scheduler_calls, unwrap_model, scheduler_timesteps)
from taohooks.runtime.loop import LoopSpec
from taohooks.runtime.reset import StateReset
from taohooks.taocache.cache import TaoCache, check_config_before_run
from taohooks.taocache.identity import guide_scale_identity, pipeline_output_identity

__all__ = ["enable_taocache", "disable_taocache", "install", "uninstall", "SEQUENTIAL_CFG", "BATCHED_CFG",
           "PER_SEGMENT", "EXPECTS", "ContextStreamCheck"]

# Pipelines whose transformer is called twice per step (cond, then uncond) / once on (uncond, cond) halves.
SEQUENTIAL_CFG = ("WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline", "WanVACEPipeline",
                  "WanAnimatePipeline")
BATCHED_CFG = ("LattePipeline",)
# Pipelines that run one sampling loop per segment inside one call (Animate: one per segment_frame_length frames of
# the pose video): each loop is one generation of the hook, begun at the first timestep (attach(repeat=True))
PER_SEGMENT = ("WanAnimatePipeline",)
_MODULES = {"diffusers.pipelines.wan.pipeline_wan": ("WanPipeline",),
            "diffusers.pipelines.wan.pipeline_wan_i2v": ("WanImageToVideoPipeline",),
            "diffusers.pipelines.wan.pipeline_wan_video2video": ("WanVideoToVideoPipeline",),
            "diffusers.pipelines.wan.pipeline_wan_vace": ("WanVACEPipeline",),
            "diffusers.pipelines.wan.pipeline_wan_animate": ("WanAnimatePipeline",),
            "diffusers.pipelines.latte.pipeline_latte": ("LattePipeline",)}
EXPECTS = (f"a call of {', '.join((*SEQUENTIAL_CFG, *BATCHED_CFG))} (the pipelines the launcher patches; any other "
           "pipeline: enable_taocache(pipe, config) from Python, with the config's loop: section)")

_configs: "weakref.WeakKeyDictionary[Any, TaoCacheConfig]" = weakref.WeakKeyDictionary()
_patches: Dict[type, GenerationPatch] = {}
_launcher_config: Optional[TaoCacheConfig] = None
_imports = PatchSet()  # the launcher's post-import hooks (the patches themselves are per class, above)


class ContextStreamCheck(Callback):
    """Checks that each call's ``cache_context`` name (when the pipeline sets one) is the stream the
    hook assigned to the call; records the name by wrapping the transformer's ``cache_context``."""

    checks_every_call = True  # (a call TaoCache skips is numbered too: a wrong stream there is refused as well)

    def __init__(self, transformer):
        self.transformer = transformer
        self.current: Optional[str] = None
        self.names: Dict[tuple, tuple] = {}  # (see on_sample_start)
        self._wrapped, self._instance, self._wrapper = False, None, None

    def on_attach(self, hook) -> None:
        self._wrap()

    def _wrap(self) -> None:
        """Record each call's context name through the transformer's ``cache_context`` (the script's own wrapper, set
        on the instance, wrapped in turn and put back on detach)."""
        if getattr(self.transformer, "cache_context", None) is None:
            return
        check, instance = self, self.transformer.__dict__.get("cache_context")  # (a wrapper of the script's: put back)

        class _Context:
            def __init__(self, name, kwargs):
                self.name, self.inner = name, check._underlying(instance)(name, **kwargs)

            def __enter__(self):
                check.current = self.name
                return self.inner.__enter__()

            def __exit__(self, *exc):
                check.current = None
                return self.inner.__exit__(*exc)

        self._wrapped, self._instance = True, instance
        self._wrapper = lambda name, **kwargs: _Context(name, kwargs)
        self.transformer.__dict__["cache_context"] = self._wrapper
        if getattr(self.transformer, "cache_context", None) is not self._wrapper:  # (a property of the class wins)
            messages.warning(f"{type(self.transformer).__name__}.cache_context is a data descriptor (a property?) "
                             "that an instance attribute cannot wrap: the check of each call's cache_context stream "
                             "name is off for this model", once=f"cache-context-{type(self.transformer).__name__}")

    def _underlying(self, instance):
        """The ``cache_context`` a wrapper of this check calls: the script's wrapper ``instance`` found on the
        transformer when it wrapped, else the class's, looked up at each call (a patch the script puts on the class
        after enabling runs too)."""
        if instance is not None:
            return instance
        owner = type(self.transformer)
        for klass in owner.__mro__:  # (the lookup of self.transformer.cache_context past its instance attribute)
            if "cache_context" in vars(klass):
                attr = vars(klass)["cache_context"]
                get = getattr(type(attr), "__get__", None)
                return get(attr, self.transformer, owner) if get is not None else attr
        return owner.__getattr__(self.transformer, "cache_context")  # (torch.compile's wrapper: its model's)

    def _ours(self) -> bool:
        return self.transformer.__dict__.get("cache_context") is self._wrapper

    def on_detach(self, hook) -> None:
        if self._wrapped:
            if self._ours():  # (a wrapper the script set since is the script's: left as it is)
                if self._instance is not None:
                    self.transformer.__dict__["cache_context"] = self._instance
                else:
                    self.transformer.__dict__.pop("cache_context", None)
            self._wrapped, self._instance, self._wrapper = False, None, None

    def on_sample_start(self, hook, sample: int) -> None:
        self.names = {}  # position of a call in its step -> the cache_context name the first such call had
        if self._wrapped and not self._ours():  # the script set a wrapper of its own since: wrapped
            self._wrap()

    def on_before_call(self, hook, call, args, kwargs):
        name = self.current
        if name is None:
            return None
        # each position of a step's calls has one context name in every step, and two positions two names: a name
        # another position has is a step that made fewer calls than the loop counts (guidance off, streams batched
        # in one call); a new name at a known position a call the loop does not count (an uncond call declared as
        # none, a third guidance call); either would be taken for another step's call
        where = (f"taohooks: the pipeline called the transformer in cache_context({name!r}) where the loop "
                 f"({hook.loop.describe()}) expects the call of {'/'.join(call.streams)}")
        other = next((streams for streams, (seen, _) in self.names.items() if seen == name and streams != call.streams),
                     None)
        if other is not None:
            raise IntegrationError(
                f"{where}, and its call of {'/'.join(other)} was in cache_context({name!r}) too: the pipeline makes "
                "fewer calls per step than the loop counts (guidance off for some steps or for the whole call, e.g. "
                "without a negative prompt; streams batched in one call: declare loop.split_batch); taohooks runs a "
                "loop whose calls per step do not change within a generation")
        first = self.names.setdefault(call.streams, (name, call.step))
        if first[0] != name:
            raise IntegrationError(
                f"{where}, which step {first[1]} made in cache_context({first[0]!r}): the pipeline makes more calls "
                "per step than the loop counts: guidance switched on for some steps (the "
                "call began at a guidance scale of 1, whose loop is the cond call alone: taohooks runs a loop whose "
                "calls per step do not change within a generation), or a call the loop does not declare (declare "
                "every call of a step in loop.streams, in the pipeline's order, e.g. streams: [cond, uncond])")
        if call.streams == (name,) or name not in hook.loop.streams:
            return None  # (a name of the pipeline's own, e.g. CogVideoX's batched "cond_uncond": checked above)
        if len(call.streams) > 1:  # (a batched call declared; the pipeline calls one stream at a time)
            raise IntegrationError(
                f"taohooks: the pipeline called the transformer in cache_context({name!r}), one stream per call, "
                f"where the declared loop ({hook.loop.describe()}) expects one batched call of "
                f"{'/'.join(call.streams)}; remove loop.split_batch and list the streams in the order the pipeline "
                "calls them (e.g. streams: [cond, uncond])")
        raise IntegrationError(
            f"taohooks: the pipeline called the transformer in cache_context({name!r}) where the declared loop "
            f"({hook.loop.describe()}) expects {'/'.join(call.streams)}; set the config's loop.streams to the "
            "order the pipeline calls in")


def _pipeline_kind(pipe) -> str:
    names = [c.__name__ for c in type(pipe).__mro__]
    if any(n in SEQUENTIAL_CFG for n in names):
        return "sequential"
    if any(n in BATCHED_CFG for n in names):
        return "batched"
    return "declared"


def _check_declared_streams(pipe, config: TaoCacheConfig) -> None:
    """A pipeline taohooks does not know needs the config to say how it calls its transformer."""
    if _pipeline_kind(pipe) == "declared" and not config.loop.streams:
        raise IntegrationError(f"{config.source or 'the config'}: loop.streams: {type(pipe).__name__} is not a "
                               "pipeline taohooks knows; say how it calls its transformer per step, e.g. streams: "
                               "[cond, uncond] (two calls) or streams: [uncond, cond] with split_batch: true (one "
                               "batched call)")


def _check_supported(pipe) -> None:
    if getattr(pipe, "transformer", None) is None:
        alone = " (a pipeline with transformer_2 alone is not supported)" if getattr(pipe, "transformer_2", None) \
            is not None else ""
        raise IntegrationError(f"taohooks: {type(pipe).__name__} has no `transformer` to attach to{alone}")
    second = getattr(pipe, "transformer_2", None)
    if second is not None:
        if second is pipe.transformer:
            raise IntegrationError(f"taohooks: {type(pipe).__name__}.transformer_2 is the same module as transformer")
        if _boundary(pipe) is None:
            raise IntegrationError(f"taohooks: {type(pipe).__name__} has a transformer_2 but no "
                                   "config.boundary_ratio: which steps run on which transformer is unknown")


def _boundary(pipe) -> Optional[float]:
    """Wan2.2's expert switch in diffusers: ``boundary_ratio * num_train_timesteps`` (the timestep
    below which ``transformer_2``, the low-noise expert, runs), or None with one transformer."""
    ratio = getattr(getattr(pipe, "config", None), "boundary_ratio", None)
    if getattr(pipe, "transformer_2", None) is None or ratio is None:
        return None
    return float(ratio) * float(pipe.scheduler.config.num_train_timesteps)


def _experts(pipe) -> tuple:
    """Both experts' attach keyword arguments (``also=``, ``expert_boundary=``), or none."""
    boundary = _boundary(pipe)
    return {} if boundary is None else {"also": (unwrap_model(pipe.transformer_2),), "expert_boundary": boundary}


def _loop(arguments):
    loop, kwargs = _loop_of_one(arguments)
    experts = _experts(arguments["self"])
    if experts:  # the run's own timesteps place the expert switch (a carried LUT's or another shift's would not)
        experts["run_timesteps"] = _run_timesteps(arguments, loop.steps)
    return loop, {**kwargs, **experts}


def _run_timesteps(arguments, steps: int):
    """The timesteps this call will run, one per step, asked of a copy of the pipeline's scheduler as the pipeline
    asks its own (``set_timesteps(num_inference_steps)``); ``None`` where they cannot be known before the call."""
    if arguments.get("timesteps") is not None or arguments.get("sigmas") is not None:
        return None
    try:
        timesteps = [float(t) for t in scheduler_timesteps(arguments["self"].scheduler,
                                                           arguments.get("num_inference_steps"))]
    except (TypeError, ValueError):
        return None
    return timesteps if len(timesteps) == steps else None


def _loop_of_one(arguments):
    pipe = arguments["self"]
    _check_supported(pipe)
    config = _config_of(arguments)
    steps = arguments.get("num_inference_steps")
    guidance = arguments.get("guidance_scale")
    cfg = guidance is None or guidance > 1.0
    kind = _pipeline_kind(pipe)
    if kind == "batched":
        return batched_cfg_loop(pipe.scheduler, steps, guidance if guidance is not None else 7.5,
                                arguments.get("timesteps"))
    try:
        calls = scheduler_calls(pipe.scheduler, steps, arguments.get("timesteps"), arguments.get("sigmas"))
    except IntegrationError:
        if config.loop.steps is None:
            raise
        calls = config.loop.steps  # declared: the scheduler could not be asked
    strength = arguments.get("strength")
    if strength is not None and hasattr(pipe, "get_timesteps") and arguments.get("timesteps") is None:
        # video-to-video: diffusers' get_timesteps runs only the last int(steps * strength) of the steps
        kept = min(int(steps * strength), steps)
        calls -= max(steps - kept, 0) * getattr(pipe.scheduler, "order", 1)
    if kind == "sequential":
        per_segment = {"repeat": True} if any(c.__name__ in PER_SEGMENT for c in type(pipe).__mro__) else {}
        return LoopSpec(calls, ("cond", "uncond") if cfg else ("cond",)), {"timestep_arg": "timestep", **per_segment}
    streams = config.loop.streams
    _check_declared_streams(pipe, config)
    if not cfg:
        return LoopSpec(calls, (unguided_stream(streams, config.loop.split_batch),)), {"timestep_arg": "timestep"}
    return LoopSpec(calls, tuple(streams), split_batch=config.loop.split_batch), {"timestep_arg": "timestep"}


def unguided_stream(streams, split_batch: bool) -> str:
    """The stream a declared guided loop runs without guidance: ``cond``, else the conditional call by position (the
    last of a batched call, ``[uncond, cond]`` as diffusers batches it; the first of a step's calls)."""
    return "cond" if "cond" in streams else streams[-1] if split_batch else streams[0]


def _config_of(arguments) -> TaoCacheConfig:
    config = _configs.get(arguments["self"])
    return config if config is not None else _launcher_config


def _callbacks(arguments, transformer) -> List[Callback]:
    pipe = arguments.get("self")
    transformers = [transformer] + ([unwrap_model(pipe.transformer_2)] if _boundary(pipe) is not None else [])
    callbacks: List[Callback] = [ContextStreamCheck(t) for t in transformers]
    for t in transformers:
        if getattr(t, "is_cache_enabled", False) and hasattr(t, "_reset_stateful_cache"):
            callbacks.append(StateReset(_reset_keeping_context(t)))
    return callbacks


def _reset_keeping_context(transformer):
    """diffusers' reset of the state of the caches enabled on ``transformer`` (``_reset_stateful_cache``), keeping
    the cache context of the call it runs before: diffusers' ``StateManager.reset`` clears the context too, and that
    call already runs inside its pipeline's ``cache_context``, so that FirstBlockCache raised "No cache context is
    set" at the first step TaoCache resumed on (and SeaCache ran "fail-open")."""
    def managers():
        try:
            from diffusers.hooks.hooks import StateManager
        except ImportError:  # (a diffusers without hook state)
            return []
        found = []
        for module in transformer.modules():
            registry = getattr(module, "_diffusers_hook", None)
            for hook in getattr(registry, "hooks", {}).values():
                found += [v for v in vars(hook).values() if isinstance(v, StateManager) and hasattr(v, "_context")]
        return found

    def reset() -> None:
        kept = [(manager, manager._context) for manager in managers()]
        transformer._reset_stateful_cache()
        for manager, context in kept:
            manager._context = context
    return reset


def _identity(arguments, model):
    """Transformer and scheduler (class, prediction type, shift, ...), the video's size where the call gives it
    (``height``, ``width``, ``num_frames``: a LUT's delta products hold outputs of one size, so another is refused at
    the generation's start, not left out of a calibration after its work), the expert boundary (None for one
    transformer) and guidance."""
    identity = identity_of_pipeline(arguments["self"], model)
    identity.update({k: v for k, v in pipeline_output_identity(arguments).items() if k != "guide_scale"})
    if arguments.get("segment_frame_length") is not None:  # Animate: each loop makes one segment of these frames
        frames, k = int(arguments["segment_frame_length"]), getattr(arguments["self"], "vae_scale_factor_temporal", 4)
        identity["frames"] = max(frames if frames % k == 1 else frames // k * k + 1, 1)  # (rounded as the pipeline)
    if "reference_images" in arguments:  # VACE: each reference image is one more latent frame
        identity["reference_images"] = _count_images(arguments["reference_images"])
    boundary = _boundary(arguments["self"])
    identity["expert_boundary"] = boundary  # (None: one transformer; a LUT of two is then refused by name)
    guidance = arguments.get("guidance_scale")
    if isinstance(guidance, (int, float)):  # the trajectory the LUT's deltas describe
        second = arguments.get("guidance_scale_2")  # Wan2.2 A14B's low-noise expert, transformer_2 (None: the same)
        identity["guide_scale"] = float(guidance) if boundary is None else guide_scale_identity(
            (second if isinstance(second, (int, float)) else guidance, guidance))  # (low-noise, high-noise), as Wan's
    return identity


def _count_images(images) -> int:
    """VACE's ``reference_images`` per video: none, one image, a list, or a list per video (the first's)."""
    if images is None:
        return 0
    if isinstance(images, (list, tuple)):
        return _count_images(images[0]) if images and isinstance(images[0], (list, tuple)) else len(images)
    return 1


def _patch_class(cls: type) -> GenerationPatch:
    patch = _patches.get(cls)
    if patch is None or getattr(cls.__call__, "_taohooks_patch", None) is not patch:
        patch = GenerationPatch(cls, "__call__", lambda arguments: TaoCache(_config_of(arguments)),
                                lambda arguments: arguments["self"].transformer, _loop, callbacks_of=_callbacks,
                                identity_of=_identity,
                                prompt_arg="prompt", enabled=lambda arguments: _config_of(arguments) is not None,
                                config_key=_config_of)
        _patches[cls] = patch.install()
    return patch


def enable_taocache(pipe, config: Union[TaoCacheConfig, str, os.PathLike, Mapping[str, Any]]) -> None:
    """Give ``pipe`` TaoCache from a config (a :class:`TaoCacheConfig`, a YAML path, or a mapping as a YAML file
    holds): every later ``pipe(...)`` call is one generation (calibrating first while the config's LUT is missing
    or incomplete). What the config alone can say (its integration, a plan that needs a LUT it does not name, the
    LUT file, whether a calibration can write it) is checked now, not at the first call."""
    if isinstance(config, Mapping):
        config = config_from_dict(dict(config), None)
        check_python_config(config)
    elif not isinstance(config, TaoCacheConfig):
        if not isinstance(config, (str, os.PathLike)):
            raise TypeError(f"enable_taocache: config must be a TaoCacheConfig, a YAML path or a mapping, got "
                            f"{type(config).__name__}")
        config = load_config(config)
    elif config.source is None:  # made in Python: checked now, not at the first call
        check_python_config(config)
    if config.integration not in (None, "none", "diffusers"):
        raise IntegrationError(f"{config.source or 'the config'}: integration: {config.integration} is for another "
                               "script's pipeline; enable_taocache puts TaoCache on a diffusers pipeline: use a config "
                               "with integration: diffusers (e.g. configs/diffusers_wan.yaml)")
    check_config_before_run(config)
    _check_supported(pipe)
    _check_declared_streams(pipe, config)
    if config.pab is not None:
        raise IntegrationError(f"{config.source}: pab: diffusers pipelines use diffusers' own PAB "
                               "(transformer.enable_cache(PyramidAttentionBroadcastConfig(...))); taohooks resets "
                               "its state on refresh steps. Remove the pab: section")
    _detach(pipe)  # a new config replaces the old one from the next call on
    _configs[pipe] = config
    _patch_class(type(pipe))


def disable_taocache(pipe) -> None:
    """Remove TaoCache from ``pipe`` and restore its transformer's forward."""
    _configs.pop(pipe, None)
    _detach(pipe)


def _detach(pipe) -> None:
    transformer = getattr(pipe, "transformer", None)
    for patch in _patches.values():
        if transformer is not None:
            patch.release(transformer)


def install(config: TaoCacheConfig) -> None:
    """Launcher: TaoCache on every known diffusers pipeline the script creates (Wan, Latte)."""
    global _launcher_config
    if _launcher_config is not None:
        return
    _launcher_config = config
    for module_name, classes in _MODULES.items():
        _imports.on_import(module_name, lambda module, names=classes: _patch_classes(module, names))


def _patch_classes(module, names) -> None:
    for name in names:
        if hasattr(module, name):
            _patch_class(getattr(module, name))


def uninstall() -> None:
    global _launcher_config
    _launcher_config = None
    _imports.uninstall()
    while _patches:
        _patches.popitem()[1].uninstall()
