"""What every integration does: wrap a generation function, attach TaoCache to the model inside it.

An integration names the function that runs one generation (``WanT2V.generate``,
``LattePipeline.__call__``, the testbed's ``sample_flow``), how to find the denoiser instance
and the loop's shape from that call's arguments. :class:`GenerationPatch` then, on every call:

1. finds the denoiser instance (as it is *now*: after a sequence-parallel or FSDP wrapper ran),
2. attaches a :class:`~taohooks.TaoCache` hook to it, or keeps the one attached for the same loop,
3. begins a new generation, runs the original function, and prints a one-line summary.

With ``TAOHOOKS_CALIBRATE_PROMPTS`` set (``taocache calibrate``), the first call calibrates over a
prompt list instead (:mod:`taohooks.launcher.prompt_calibration`).
"""
from __future__ import annotations

import contextlib
import inspect
import os
import sys
import threading
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from torch import nn

from ..runtime import messages
from ..runtime.loop import LoopSpec
from ..runtime.hook import get_hook
from ..runtime.interrupt import interruption
from ..runtime.patching import unwrap_model
from ..taocache.cache import TaoCache

__all__ = ["GenerationPatch", "IntegrationError", "PatchSet", "unwrap_model", "scheduler_calls", "batched_cfg_loop",
           "require_modules", "intercepting", "script_options", "script_sys_path", "pending_module_checks", "wrapped_calls", "check_declared_loop", "identity_of_model", "identity_of_pipeline"]

Arguments = Dict[str, Any]


_script_paths: Tuple[List[str], bool] = ([], True)  # folders the script adds to sys.path; all of them known
_missing_modules: List[Tuple[str, str]] = []  # (module, message) left for after the script


@contextlib.contextmanager
def script_sys_path(paths: List[str], complete: bool):
    """While active, :func:`require_modules` also looks in ``paths``, the folders the script will put
    on ``sys.path`` itself (``sys.path.append(os.path.split(sys.path[0])[0])`` in Latte's and
    Open-Sora-Plan's scripts). If the script adds folders the launcher could not work out
    (``complete`` false), a module found nowhere is noted instead of fatal, and the launcher reports
    it at the end of the script."""
    global _script_paths
    previous, _script_paths = _script_paths, (list(paths), complete)
    try:
        yield
    finally:
        _script_paths = previous


def _findable(name: str, extra: List[str] = ()) -> bool:
    import importlib.machinery
    import importlib.util

    try:
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            return True
        top = name.partition(".")[0]
        return bool(extra) and importlib.machinery.PathFinder.find_spec(top, list(extra)) is not None
    except (ImportError, ValueError):
        return False


def pending_module_checks() -> str:
    """What :func:`require_modules` could not find before a script that edits ``sys.path`` ran, and
    still cannot find now ('' if nothing)."""
    return "; ".join(message for name, message in _missing_modules if not _findable(name))


def require_modules(integration: str, names, hint: str) -> None:
    """Fail early (before the script loads a model) when a research repo's module cannot be found.

    Only looks the modules up (``importlib.util.find_spec``); nothing is imported. Under
    :func:`script_sys_path` the script's own ``sys.path`` additions count too."""
    paths, complete = _script_paths
    for name in names:
        if _findable(name, paths):
            continue
        message = (f"the {integration!r} integration cannot find the module {name!r} ({hint}; or put the "
                   "repo's folder on PYTHONPATH)")
        if not complete:
            _missing_modules.append((name, message))
            continue
        raise ResearchModuleMissing(message)


def script_options(argv: List[str], options: Dict[str, Dict[str, Any]]) -> Optional[Any]:
    """Read a research script's command line as its own ``argparse`` parser would, before it runs.

    ``options`` maps every option of the script (``"--task"``) to its ``add_argument`` keywords; all
    of them are needed, so that a shortened option (``--sample_sh 8``, argparse's default
    ``allow_abbrev``) resolves as in the script. Returns the parsed namespace, or ``None`` when the
    script's own parser would refuse the command line (it then says why itself)."""
    import argparse

    class Quiet(argparse.ArgumentParser):
        def error(self, message):  # the script's own parser will say it; we only give up
            raise ValueError(message)

    parser = Quiet(add_help=False)
    for name, keywords in options.items():
        parser.add_argument(name, **keywords)
    try:
        args, _ = parser.parse_known_args(argv)
    except (argparse.ArgumentError, SystemExit, ValueError):
        return None
    return args


def output_size_of(argv: List[str], options: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """What a Wan ``generate.py`` command line says of the video's size, where it gives it: ``pixels`` (width x
    height, from ``--size W*H``) and ``frame_num``, as the generation's identity records them
    (:func:`taohooks.taocache.identity.wan_output_identity`). A value left to the script's default is not read
    here (it is checked when the generation starts): ``{}`` then."""
    unset = ("--size", "--frame_num")  # read without the script's defaults: None where the command line is silent
    args = script_options(argv, {k: {**v, "default": None} if k in unset else v for k, v in options.items()})
    out: Dict[str, Any] = {}
    if args is None:
        return out
    if args.size is not None:
        width, _, height = str(args.size).partition("*")
        if width.isdigit() and height.isdigit():
            out.update(pixels=int(width) * int(height), size=args.size)
    if args.frame_num is not None:
        out["frame_num"] = int(args.frame_num)
    return out


def scheduler_calls(scheduler: Any, steps: int, timesteps: Any = None, sigmas: Any = None,
                    declarable: bool = True) -> int:
    """Model calls per stream that a diffusers-style scheduler makes for ``steps`` steps (or for the
    ``timesteps`` / ``sigmas`` a pipeline call passes). Where the scheduler cannot say, an
    :class:`IntegrationError` advises ``loop.steps`` (``declarable``: the caller reads it), else says that the
    pipeline's own ``set_timesteps`` fails the same way.

    Asked of a copy (``set_timesteps`` on the pipeline's own scheduler would change its state):
    PNDM with PRK warm-up makes ``steps + 9`` calls, second-order schedulers ``2 * steps - 1``. A
    scheduler with dynamic shifting (LTX, Flux) is asked with ``mu=1``: the shift moves the
    timesteps, not their number."""
    if timesteps is not None:
        return len(timesteps)
    if sigmas is not None:
        return len(sigmas)
    try:
        return len(scheduler_timesteps(scheduler, steps))
    except (TypeError, ValueError) as exc:
        name = type(scheduler).__name__
        if not declarable:
            raise IntegrationError(f"cannot count the denoiser calls of {name} for {steps} steps: its "
                                   f"set_timesteps({steps}) raised {type(exc).__name__}: {exc}. The pipeline calls it "
                                   "too, so the script fails the same way without taohooks: choose another sampler "
                                   "or step count") from None
        raise IntegrationError(f"cannot count the denoiser calls of {name} for {steps} steps "
                               f"({exc}); declare them in the config's loop: section (loop.steps)") from None


def scheduler_timesteps(scheduler: Any, steps: int) -> Any:
    """The timesteps a diffusers-style scheduler runs for ``steps`` steps, asked of a copy (``set_timesteps`` on
    the pipeline's own would change its state; ``mu=1`` for dynamic shifting). ``TypeError`` / ``ValueError``
    where the scheduler cannot say."""
    import copy

    probe = copy.deepcopy(scheduler)
    extra = {"mu": 1.0} if getattr(getattr(probe, "config", None), "use_dynamic_shifting", False) else {}
    probe.set_timesteps(int(steps), **extra)
    return probe.timesteps


def batched_cfg_loop(scheduler: Any, steps: int, guidance_scale: float, timesteps: Any = None,
                     timestep_arg: str = "timestep") -> Tuple[LoopSpec, Dict[str, Any]]:
    """The loop of Latte / Open-Sora-Plan style pipelines: one call per scheduler timestep on a
    batch of (uncond, cond) halves when ``guidance_scale > 1``, one stream otherwise."""
    calls = scheduler_calls(scheduler, steps, timesteps, declarable=False)  # (loop.steps would not help: below)
    if guidance_scale > 1.0:
        return LoopSpec(calls, ("uncond", "cond"), split_batch=True), {"timestep_arg": timestep_arg}
    return LoopSpec(calls, ("cond",)), {"timestep_arg": timestep_arg}


class IntegrationError(RuntimeError):
    """An integration cannot be installed (its research repo cannot be imported, ...)."""


class ResearchModuleMissing(IntegrationError):
    """The research repo's module an integration patches cannot be found in this process."""


_calls = 0  # generation calls that reached any GenerationPatch in this process
_owners: "weakref.WeakKeyDictionary[nn.Module, GenerationPatch]" = weakref.WeakKeyDictionary()  # whose cache is on it


class CachesOnModels:
    """A patch's ``model -> entry`` map whose entries live on the models themselves (``model.__dict__``), so that a
    model the script drops is freed with its cache: a ``WeakKeyDictionary`` whose values hold their key (the
    cache's hook holds the model) kept every hooked model alive for the whole process."""

    ATTRIBUTE = "_taohooks_generation_caches"

    def __init__(self, patch: Any):
        self._patch_ref = weakref.ref(patch)
        self._models: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()

    def _entries(self, model: nn.Module) -> dict:
        """``{patch: entry}`` of ``model``: empty where the attribute came with a copy (``copy.copy`` shares the
        original's), which a release must not detach."""
        owner, entries = model.__dict__.get(self.ATTRIBUTE, (None, {}))
        return entries if owner == id(model) else {}

    def get(self, model: nn.Module) -> Optional[tuple]:
        return self._entries(model).get(self._patch_ref())

    def __setitem__(self, model: nn.Module, entry: tuple) -> None:
        entries = self._entries(model)
        entries[self._patch_ref()] = entry
        model.__dict__[self.ATTRIBUTE] = (id(model), entries)
        self._models.add(model)

    def pop(self, model: nn.Module, default: Any = None) -> Any:
        self._models.discard(model)
        entries = self._entries(model)
        entry = entries.pop(self._patch_ref(), default)
        if not entries and self.ATTRIBUTE in model.__dict__:
            del model.__dict__[self.ATTRIBUTE]  # (the model as it was)
        return entry

    def __iter__(self):
        return iter(list(self._models))


_interceptor: Optional[Callable[["GenerationPatch", inspect.BoundArguments], Any]] = None
# the hooks of the generations running now -> the thread running each (see generation_running; each entry leaves
# when its generation ends, a plain dict so that reading it from another thread is atomic)
_generating: Dict[Any, int] = {}


@contextlib.contextmanager
def generation_running(hook):
    """While active, ``hook`` runs a generation: a patched pipeline called on its model meanwhile (a step callback's
    preview, whether or not that pipeline is enabled) runs uncached and the generation goes on
    (``GenerationPatch._nested``)."""
    _generating[hook] = threading.get_ident()
    try:
        yield
    finally:
        _generating.pop(hook, None)


@contextlib.contextmanager
def intercepting(handler: Callable[["GenerationPatch", inspect.BoundArguments], Any]):
    """While active, every generation call a patch wraps goes to ``handler(patch, bound_arguments)``
    instead (``taocache compare`` drives the script's first generation this way); it counts as wrapped. A call
    made while a generation runs in the same thread (a step callback's preview on another model) runs as it is."""
    global _interceptor
    previous, _interceptor = _interceptor, handler
    try:
        yield
    finally:
        _interceptor = previous


def intercepted() -> bool:
    """Whether generation calls go to a handler (``taocache compare`` runs): the config's ``lut:`` and ``plan:``
    are then not what runs (compare calibrates in its own folder and plans per budget)."""
    return _interceptor is not None


def wrapped_calls() -> int:
    """How many generation calls any integration's patch has seen in this process."""
    return _calls


def identity_of_model(model: nn.Module) -> Dict[str, Any]:
    """The identity an integration records when it knows nothing but the model."""
    from ..taocache.identity import model_identity

    return model_identity(model)


def identity_of_pipeline(pipe: Any, model: nn.Module) -> Dict[str, Any]:
    """Model and scheduler identity of a diffusers-style pipeline (``pipe.scheduler``)."""
    from ..taocache.identity import model_identity, scheduler_identity

    identity = model_identity(model)
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is not None:
        identity.update(scheduler_identity(scheduler))
    return identity


def check_declared_loop(config: Any, loop: LoopSpec, what: str) -> None:
    """The integration, not the YAML, says what the script runs: a ``loop:`` that contradicts it is
    an error naming both (before the model's first call). Declared guided streams (``[cond, uncond]``, or
    batched ``[uncond, cond]``) also cover a call without guidance (the ``cond`` stream alone): the LUT, if
    there is one, is checked against that run's streams."""
    declared = getattr(config, "loop", None)
    if declared is None:
        return
    where = f"{config.source}: " if getattr(config, "source", None) else ""
    if declared.steps is not None and declared.steps != loop.steps:
        raise IntegrationError(
            f"{where}loop.steps is {declared.steps}, but this {what} call runs {loop.steps} denoiser calls per "
            f"stream ({loop.describe()}); remove loop.steps (the integration reads it from the script) or make "
            "the script's step count match")
    # a guidance scale of 1: the declared run's conditional call alone (cond, or by position: names of the user's own)
    unguided = (declared.streams is not None and len(declared.streams) > 1 and len(loop.streams) == 1 and (
        loop.streams[0] == "cond" if "cond" in declared.streams else
        loop.streams[0] == declared.streams[-1 if declared.split_batch else 0]))
    if declared.streams is not None and tuple(declared.streams) != tuple(loop.streams) and not unguided:
        raise IntegrationError(
            f"{where}loop.streams is [{', '.join(declared.streams)}], but this {what} call runs streams "
            f"[{', '.join(loop.streams)}]; remove loop.streams (the integration knows them)")
    if declared.split_batch and not loop.split_batch and not unguided:
        raise IntegrationError(f"{where}loop.split_batch is true, but this {what} call makes one call per stream")


def task_of_the_other_version(argv: List[str], options: Dict[str, Dict[str, Any]], other_tasks: Tuple[str, ...],
                              ) -> Optional[str]:
    """The ``--task`` of a Wan command line when it is one of the other Wan version's tasks (a wan config on a
    Wan2.2 checkout, or the reverse: the script accepts the task, this integration's checks do not know it)."""
    free = {**options, "--task": {k: v for k, v in options["--task"].items() if k != "choices"}}
    args = script_options(argv, free)
    task = getattr(args, "task", None) if args is not None else None
    return task if task in other_tasks and task not in options["--task"].get("choices", ()) else None


def image_said(image: bool) -> str:
    """Whether an ``--image`` conditions the video (Wan2.2 TI2V-5B), as a mismatch message says it."""
    return "an --image (image-to-video)" if image else "no --image (text-to-video)"


def command_line_problems(config: Any, run: Dict[str, Any], *, flags: Dict[str, str], said: Callable,
                          tasks: Tuple[str, ...], streams: Tuple[str, ...], configs_hint: str,
                          expert_boundary: Optional[float] = None, check_plan: bool = True,
                          run_timesteps: Optional[Sequence[float]] = None) -> List[str]:
    """What a Wan-style command line (``run``: task, steps and the ``flags`` keys, as the script will run
    them) contradicts, before the model loads: the config's model_id task, loop.steps, the LUT's step
    count (unless it is carried over) and identity; then the LUT's folder when the run calibrates, or
    the plan (with the expert switch guarded: where ``run_timesteps``, the script's own, else the LUT's fall
    below ``expert_boundary``) when it skips (and ``check_plan``: the integration found
    nothing the plan would misread). ``said(run, key)`` phrases a value as the user gave it. Returns the
    problems (the integration adds its own and raises)."""
    from ..runtime.io import check_writable
    from ..taocache.cache import (expert_guard, lut_for_steps, make_plan, transfer_allowed,
                                  unfinished_lut_steps_problem)
    from ..taocache.identity import differences
    from ..taocache.lut import CalibrationLUT
    from ..taocache.lut_transfer import carryable

    where = config.source or "the config"
    problems: List[str] = []
    named = [t for t in tasks if config.model_id and t.lower() in config.model_id.lower()]
    if named and run["task"] not in named:
        problems.append(f"{where}: model_id {config.model_id!r} is for task {named[-1]}, this command line runs "
                        f"--task {run['task']}; use the config for that task ({configs_hint}) or give it its "
                        "own model_id and lut")
    if config.loop.steps is not None and config.loop.steps != run["steps"]:
        problems.append(f"{where}: loop.steps is {config.loop.steps}, this command line runs "
                        f"{run['steps']} steps ({said(run, 'steps')})")
    sampler = config.calibration.sampler
    accepted = "scheduler" in config.calibration.accept  # (the solver differs knowingly: the label goes with the LUT)
    if sampler and config.lut_path() is not None and run.get("scheduler") and sampler != run["scheduler"] \
            and not accepted:
        # the label a new LUT would get (without a lut: nothing uses it)
        problems.append(f"{where}: calibration.sampler is {sampler!r}, this command line runs "
                        f"{said(run, 'scheduler')}; set calibration.sampler: {run['scheduler']} (and give that sampler "
                        "its own lut:)")
    lut = None
    path = config.lut_path()
    if path is not None and path.is_file():
        lut = CalibrationLUT.load(path)
        unfinished = unfinished_lut_steps_problem(config, lut, run["steps"], run_has="this command line runs")
        if unfinished:
            problems.append(unfinished)
        elif lut.steps != run["steps"] and not transfer_allowed(config, lut):
            hint = " or carry this one over with calibration.transfer: interpolate" if carryable(lut) else ""
            problems.append(f"LUT {path} has {lut.steps} steps, this command line runs {run['steps']} "
                            f"({said(run, 'steps')}); calibrate a LUT for {run['steps']} steps (its own lut: file)"
                            + hint)
        recorded = getattr(lut, "identity", None) or {}
        keys = differences(recorded, {k: run[k] for k in flags if k in run}, config.calibration.accept)
        if keys:
            recorded_said = [f"{recorded[k]} pixels a frame (width x height)" if k == "pixels" else
                             image_said(recorded[k]) if k == "image" else f"{flags[k]} {recorded[k]}" for k in keys]
            problems.append(f"LUT {path} was calibrated with " + ", ".join(recorded_said) + "; this command line runs "
                            + ", ".join(said(run, k) for k in keys) + f". Give this run its own LUT (lut: in {where}), "
                            f"or accept the difference knowingly with calibration.accept: [{', '.join(keys)}]")
    from ..taocache.cache import calibrates

    calibrating = path is not None and calibrates(config) and (
        lut is None or lut.num_prompts < config.calibration.prompts)
    if calibrating:
        check_writable(path)
    elif not problems and check_plan:
        from ..taocache.plan import PlanError

        carried = lut_for_steps(config, lut, run["steps"])
        guard = expert_guard(carried, expert_boundary, run_timesteps) if expert_boundary else ()
        try:
            make_plan(config.plan, run["steps"], streams, carried, unskippable=guard)  # fails now, not later
        except PlanError as exc:
            problems.append(f"{where}: {exc}" if str(exc).startswith("plan.") else f"{where}: plan: {exc}")
    return problems


def _log(message: str) -> None:
    """To stderr through taohooks' channel, once per job: under torchrun only rank 0 speaks."""
    messages.notice(message)


class PatchSet:
    """The patches of one integration: made when their research modules are imported (now, if they
    already are), removed together. ``install``-once bookkeeping for ``install``/``uninstall``."""

    def __init__(self):
        self.installed = False
        self.patches: List["GenerationPatch"] = []
        self._pending: List[Tuple[str, Callable]] = []

    def on_import(self, module_name: str, make: Callable[[Any], Optional["GenerationPatch"]]) -> None:
        """Call ``make(module)`` once ``module_name`` is imported; keep the patch it returns."""
        from .imports import when_imported

        def run(module):
            patch = make(module)
            if patch is not None:
                self.patches.append(patch)
        self._pending.append((module_name, run))
        when_imported(module_name, run)

    def patch_generate(self, pipelines: Dict[str, str], make_cache: Callable, model_of: Callable, loop_of: Callable,
                       **kwargs: Any) -> None:
        """Wrap ``Class.generate`` of each ``{module name: class name}`` once its module is imported (a
        checkout that lacks the class, or whose class does not define ``generate`` itself, is left
        alone); ``kwargs`` go to :class:`GenerationPatch`."""
        def make(module, class_name: str):
            cls = getattr(module, class_name, None)
            if cls is None or "generate" not in vars(cls):
                return None
            return GenerationPatch(cls, "generate", make_cache, model_of, loop_of, **kwargs).install()

        for module_name, class_name in pipelines.items():
            self.on_import(module_name, lambda module, c=class_name: make(module, c))

    def uninstall(self) -> None:
        from .imports import cancel_when_imported

        while self._pending:
            cancel_when_imported(*self._pending.pop())
        while self.patches:
            self.patches.pop().uninstall()
        self.installed = False


class GenerationPatch:
    """Wraps ``owner.name`` (a class or a module attribute) for TaoCache.

    Args:
        owner, name: where the generation function lives.
        make_cache: a fresh :class:`TaoCache` (from the YAML config), given the call's arguments.
        model_of: the denoiser instance, from the call's bound arguments (``self`` included).
        loop_of: ``(LoopSpec, attach keyword arguments such as timestep_arg)`` from the same.
        callbacks_of: extra callbacks for a new attachment (e.g. resetting another library's PAB
            state), from the call's arguments and the model; they run after TaoCache's own.
        prompt_arg: the name of the prompt argument (for explicit calibration over a prompt list).
        enabled: whether this call gets TaoCache (default: every call); other calls run untouched.
        log: where the per-generation summary line goes (stderr by default).
        config_key: the config of a call (compared with ``is``): a call with another one re-attaches.
    """

    def __init__(self, owner: Any, name: str, make_cache: Callable[[Arguments], TaoCache],
                 model_of: Callable[[Arguments], nn.Module],
                 loop_of: Callable[[Arguments], Tuple[LoopSpec, Dict[str, Any]]], *,
                 callbacks_of: Optional[Callable[[Arguments, nn.Module], list]] = None,
                 identity_of: Optional[Callable[[Arguments, nn.Module], Dict[str, Any]]] = None,
                 prompt_arg: Optional[str] = None, enabled: Optional[Callable[[Arguments], bool]] = None,
                 log: Callable[[str], None] = _log, config_key: Optional[Callable[[Arguments], Any]] = None):
        self.owner, self.name = owner, name
        self.make_cache, self.model_of, self.loop_of, self.log = make_cache, model_of, loop_of, log
        self.callbacks_of, self.identity_of, self.prompt_arg, self.enabled = callbacks_of, identity_of, prompt_arg, enabled
        self.config_key = config_key  # the object whose change means another config (compared with `is`)
        self._prompt_calibration: Optional[str] = None  # None | "running" | "done"
        self.original = getattr(owner, name)
        self.signature = inspect.signature(self.original)
        # model -> (cache, its loop, its config key, the identity it was attached with), kept on the model
        self.caches = CachesOnModels(self)
        self.generations = 0
        patch = self

        def generate(*args, **kwargs):
            return patch(args, kwargs)

        self.wrapper = generate
        for attr in ("__name__", "__qualname__", "__doc__", "__module__"):
            setattr(generate, attr, getattr(self.original, attr, None))
        generate.__wrapped__ = self.original
        generate._taohooks_patch = self

    def install(self) -> "GenerationPatch":
        if getattr(getattr(self.owner, self.name), "_taohooks_patch", None) is not None:
            return self  # already patched (idempotent: a spawned worker may install twice)
        setattr(self.owner, self.name, self.wrapper)
        return self

    def uninstall(self) -> None:
        if getattr(self.owner, self.name) is self.wrapper:
            setattr(self.owner, self.name, self.original)
        for model in list(self.caches):
            self.release(model)

    def release(self, model: nn.Module) -> None:
        """Detach this patch's cache from ``model`` (another patch, or another config, takes it over)."""
        entry = self.caches.pop(model, None)
        if entry is not None:
            entry[0].detach()
        if _owners.get(model) is self:
            del _owners[model]

    def cache_for(self, model: nn.Module, loop: LoopSpec, attach_kwargs: Dict[str, Any],
                  arguments: Optional[Arguments] = None) -> TaoCache:
        """The cache attached to ``model`` for ``loop``; (re)attached when needed: another loop, a
        completed calibration, another config (two pipelines sharing one transformer), another identity
        (a scheduler swapped between calls: its LUT is checked again), or another patch's cache on it."""
        arguments = arguments or {}
        identity = self.identity_of(arguments, model) if self.identity_of else identity_of_model(model)
        key = self.config_key(arguments) if self.config_key is not None else None
        owner = _owners.get(model)
        if owner is not None and owner is not self:  # another pipeline class's call on a shared transformer
            owner.release(model)
        entry = self.caches.get(model)
        if entry is not None:
            cache, attached_loop, attached_key, attached_identity = entry
            calibrated = cache.calibrating and cache.recorder.lut().num_prompts >= cache.config.calibration.prompts
            if (attached_loop == loop and attached_key is key and attached_identity == identity
                    and cache.hook is not None and cache.hook.attached and not calibrated):
                return cache
            self.release(model)
            if calibrated and not cache.said_calibration_complete:  # (said at the end of the generation before)
                self.log(f"taohooks: calibration complete (the LUT holds {cache.held_prompts()} prompts; "
                         f"calibration.prompts {cache.config.calibration.prompts}); TaoCache skips from this "
                         "generation on")
        cache = self.make_cache(arguments)
        cache.reattached_per_generation = True  # (this method attaches again once the calibration is complete)
        cache.defer_completion_notice = True  # (said after _generate's summary line)
        check_declared_loop(cache.config, loop, self.target())
        extra = self.callbacks_of(arguments, model) if self.callbacks_of else []
        cache.attach(model, loop.steps, loop.streams, split_batch=loop.split_batch, batch_dim=loop.batch_dim,
                     callbacks=extra, identity=identity, **attach_kwargs)  # attach_kwargs: also=, expert_boundary=
        self.caches[model] = (cache, loop, key, identity)
        _owners[model] = self
        return cache

    def target(self) -> str:
        """``module.Class.generate``: what this patch wraps, for messages."""
        owner = getattr(self.owner, "__qualname__", None) or getattr(self.owner, "__name__", "?")
        module = getattr(self.owner, "__module__", None)
        return f"{module}.{owner}.{self.name}" if module and module != owner else f"{owner}.{self.name}"

    def __call__(self, args: tuple, kwargs: dict) -> Any:
        global _calls
        _calls += 1
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        running = self._running_generation(dict(bound.arguments))
        if running is not None:  # (a preview: also of a pipeline never enabled, and under taocache compare)
            return self._nested(running, bound)
        if self.enabled is not None and not self.enabled(dict(bound.arguments)):
            return self.original(*args, **kwargs)
        if _interceptor is not None:
            if threading.get_ident() in list(_generating.values()):  # (a call made inside a compared generation,
                return self.original(*args, **kwargs)  # on another model: the script's, run as it is)
            return _interceptor(self, bound)
        if self._prompt_calibration is None and os.environ.get("TAOHOOKS_CALIBRATE_PROMPTS"):
            from .prompt_calibration import calibrate_over_prompts

            calibrate_over_prompts(self, bound)
        return self._generate(bound)

    def _running_generation(self, arguments: dict):
        """The hook of a generation (:func:`generation_running`) running on this call's model, or ``None``."""
        if not _generating:
            return None
        try:
            model = unwrap_model(self.model_of(arguments))
        except Exception:  # noqa: BLE001 - a pipeline of no model found (not one to run): nothing runs on it
            return None
        running = get_hook(model) if model is not None else None
        # (in the generation's own thread: a call from another thread is refused by the hook, as before; a preview at
        # the last step comes after the loop's last call, when call_index is None already)
        return running if running is not None and _generating.get(running) == threading.get_ident() \
            and not running.passthrough else None

    def _generate(self, bound: inspect.BoundArguments) -> Any:
        arguments = dict(bound.arguments)
        model = unwrap_model(self.model_of(arguments))
        running = get_hook(model)
        if running is not None and not running.passthrough and running.call_index is not None:
            owner = _generating.get(running, running.generation_thread)  # (None: no model call made yet)
            if owner is not None and owner != threading.get_ident():  # another thread's generation on this model:
                raise RuntimeError(running.second_thread_message())  # refused, as its model calls would be
            return self._nested(running, bound)
        try:
            loop, attach_kwargs = self.loop_of(arguments)
            cache = self.cache_for(model, loop, attach_kwargs, arguments)
            before = {s: list(c) for s, c in cache.hook.counts.items()}
            before["_extras"] = self._extra_counts(cache)
            before["_sample"] = cache.hook.sample
            hook = cache.hook
            hook.label_offset = self.generations - (hook.sample + 1)  # its messages name this call's number
            cache.new_sample()  # (checks the LUT against this call)
        except BaseException:
            self.generations += 1  # (a call refused at its start is counted too, as one that raised in its loop)
            raise
        hook.passthrough = False  # (between this patch's calls the model is left alone: another user may share it)
        raised: Optional[BaseException] = None
        try:
            with generation_running(hook):
                result = self.original(*bound.args, **bound.kwargs)
        except BaseException as exc:
            raised = exc
            cache.say_deferred_notices()  # (the LUT was completed before the script's own code raised)
            raise
        finally:
            hook.passthrough = True
            self.generations += 1  # (a call that raised is counted too: the next one's messages name its number)
            total = hook.loop.total_calls
            stopped = hook.end_generation(f"{self.target()} returned after {hook.call_index} of {total} denoiser "
                                          "calls: interrupted, or guidance off for its last steps?" if raised is None
                                          else f"{interruption(raised)} in {self.target()}, between model calls")
        if stopped and not cache.calibrating:
            messages.warning(f"generation {self.generations}: {self.target()} returned after {stopped} of {total} "
                             f"denoiser calls ({hook.loop.describe()}): its loop was interrupted (e.g. by a "
                             "callback_on_step_end that stops the pipeline), or made fewer calls per step in its last "
                             "steps than the loop counts (guidance switched off there)")
        self.log(self.summary_line(cache, before) + (f" (stopped after {stopped} of {total} calls)" if stopped else ""))
        cache.say_deferred_notices()
        return result

    def _nested(self, hook, bound: inspect.BoundArguments) -> Any:
        """A pipeline call made while a generation on the same model runs (a step callback's preview): it runs
        uncached, its model calls untouched, and the running generation goes on where it was."""
        messages.warning(f"{self.target()} was called during generation {hook.label(hook.sample)} on the same model "
                         + (f"(at call {hook.call_index} of {hook.loop.total_calls})" if hook.call_index is not None
                            else "(after its last call)") + ": that call runs uncached, and the generation goes on "
                         "after it")
        before, hook.passthrough = hook.passthrough, True
        try:
            return self.original(*bound.args, **bound.kwargs)
        finally:
            hook.passthrough = before

    @staticmethod
    def _extra_counts(cache: TaoCache) -> Dict[str, float]:
        """Counters of the other caches on the hook (TeaCache's reused calls, PAB's broadcasts)."""
        counts: Dict[str, float] = dict(cache.composed_counts())
        for cb in cache.hook.callbacks:
            if hasattr(cb, "fallback_reasons"):
                counts["{} planned skips computed instead (fallbacks; see the warnings)"] = cb.fallbacks
        if cache.hook.stray_calls:
            counts["{} calls ran uncached, out of line with the loop"] = cache.hook.stray_calls
        return counts

    def summary_line(self, cache: TaoCache, before: Dict[str, Any]) -> str:
        per_call = len(cache.hook.loop.streams) if cache.hook.loop.split_batch else 1  # a batched call counts per stream
        counts = cache.hook.counts.items()
        computed = sum(c[0] - before[s][0] for s, c in counts) // per_call
        saved = sum(c[1] - before[s][1] for s, c in counts) // per_call
        total = computed + saved
        what = "calibrating, all steps computed" if cache.calibrating else cache.plan.describe()
        old = before.get("_extras", {})
        extras = "".join(f"; {label.format(f'{n - old.get(label, 0):g}')}"
                         for label, n in self._extra_counts(cache).items()
                         if n - old.get(label, 0) or "fallbacks" not in label and "out of line" not in label)
        held = cache.held_prompts() if cache.calibrating else None  # (a run ending before the LUT is complete said
        if held is not None and held < cache.config.calibration.prompts:  # how many it holds in its first line only)
            extras += f"; the LUT holds {held} of {cache.config.calibration.prompts} prompts"
        loops = cache.hook.sample - before.get("_sample", cache.hook.sample - 1)
        clips = f" over {loops} sampling loops (clips)" if loops > 1 else ""  # Wan2.2 S2V/Animate: one per clip
        return (f"taohooks: generation {self.generations}: {saved} of {total} denoiser calls saved "
                f"({100.0 * saved / max(total, 1):.1f}%){clips}{extras} [{what}]")

