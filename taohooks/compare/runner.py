"""Running an experiment inside the user's script (``taocache compare``).

The script is started once, through the launcher, with the integration the experiment names. Its
first generation call is intercepted (nothing of it runs as the script asked) and repeated, with
the prompt and seed arguments replaced, for:

1. the calibration prompts, full-step, when a method needs them: TaoCache's LUT and TeaCache's
   polynomial from the same runs (skipped when the TaoCache config's LUT is complete and no
   TeaCache is compared);
2. TeaCache's threshold search per budget, on the first ``search_prompts`` calibration prompts
   (bench's :func:`~taohooks.evaluation.methods.match_threshold`), never on evaluation prompts;
3. the full-step reference of every evaluation prompt, then every method x budget on it.

Every finished generation is in the :class:`~taohooks.compare.store.RunStore` at once; a killed
experiment resumes there. The script exits after the last run (status 0).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..runtime import messages
from ..runtime.callbacks import Callback
from ..config import ConfigError, TaoCacheConfig
from ..runtime.hook import DenoiserHook
from ..launcher.integration import (GenerationPatch, check_declared_loop, generation_running, identity_of_model,
                                   unwrap_model)
from ..taocache.identity import call_settings, weights_fingerprint
from ..caches.residual import BlockStackCache
from .errors import CompareError
from .experiment import BUDGET_FREE_METHODS, ExperimentConfig, PromptEntry
from .progress import Progress
from .store import RunStore, run_label, writes_results
from .targets import Target, target_for

__all__ = ["Experiment", "Generation", "SkipRecorder", "intercept_generations", "budget_skips", "check_before_run"]


def budget_skips(budget: float, steps: int) -> int:
    """Skipped steps for a budget fraction: ``max(1, round(budget * steps))``, as ``taocache bench``."""
    from ..taocache.plan import fraction_skips

    return max(1, fraction_skips(budget, steps))


class SkipRecorder(Callback):
    """Which calls of one generation were skipped: answered without the model (TaoCache) or with the
    block stack bypassed (TeaCache, MagCache), for all samples of the call or some (a call where one of
    two samples reused counts 0.5). Put it after the caches on the hook."""

    def __init__(self, block_caches: Sequence[BlockStackCache] = ()):
        self.block_caches = list(block_caches)
        self.calls = 0
        self.skipped: List[Tuple[int, str]] = []  # (step, streams joined by '+') of every call that skipped
        self.fractions: List[float] = []  # of each of those calls, the fraction of its samples skipped
        self.skipped_calls = 0.0  # the calls skipped, fractions of partly reused calls included

    def on_after_call(self, hook, call, output) -> None:
        self.calls += 1
        fraction = 1.0 if not call.computed else max((c.last_reused for c in self.block_caches), default=0.0)
        if fraction > 0:
            self.skipped.append((call.step, "+".join(call.streams)))
            self.fractions.append(fraction)
            self.skipped_calls += fraction


@dataclass
class Generation:
    """One generation's video ``[B, C, F, H, W]`` (float32, CPU) and its cost."""

    video: Optional[torch.Tensor]  # None on ranks > 0 under torchrun (rank 0 writes)
    seconds: float  # wall time of the generation call (CUDA-synchronised on GPU)
    calls: int
    skipped: List[Tuple[int, str]] = field(default_factory=list)
    skipped_calls: Optional[float] = None  # None: len(skipped) (every skipped call skipped for all samples)
    fractions: Optional[List[float]] = None  # per entry of skipped: the fraction of its samples (None: all)

    peak_memory_bytes: Optional[int] = None  # CUDA only
    latents: Optional[torch.Tensor] = None  # the final latents the script decoded, where the target records them

    def record(self, steps: Optional[int] = None, switch: Optional[int] = None) -> Dict[str, Any]:
        """What a run records; with ``switch`` (Wan2.2's first low-noise step, of ``steps``) also
        ``skipped_per_expert``: the share of each expert's calls skipped."""
        per_stream: Dict[str, float] = {}
        per_expert = {"high_noise": 0.0, "low_noise": 0.0}
        for (step, streams), fraction in zip(self.skipped, self.fractions or [1] * len(self.skipped)):
            for stream in streams.split("+"):
                per_stream[stream] = per_stream.get(stream, 0) + fraction
            per_expert["high_noise" if switch is None or step < switch else "low_noise"] += fraction
        per_stream = {k: int(v) if float(v).is_integer() else v for k, v in per_stream.items()}
        skipped = len(self.skipped) if self.skipped_calls is None else self.skipped_calls
        skipped = int(skipped) if float(skipped).is_integer() else skipped
        record = {"seconds": round(self.seconds, 6), "calls": self.calls, "skipped_calls": skipped,
                  "skipped_fraction": skipped / self.calls if self.calls else 0.0,
                  "skipped_per_stream": per_stream, "skipped_schedule": [list(s) for s in self.skipped],
                  "peak_memory_bytes": self.peak_memory_bytes}
        if switch is not None and steps:
            per_step = self.calls / steps  # (calls of one step, over its streams)
            record["skipped_per_expert"] = {"high_noise": per_expert["high_noise"] / (switch * per_step),
                                            "low_noise": per_expert["low_noise"] / ((steps - switch) * per_step)}
        return record


def _as_rank_zero_has_it(value: Any) -> Any:
    """``value`` as rank 0 has it, on every rank of an initialised process group (unchanged without one).

    Under sequence parallelism each rank sees its shard of the activations, so what a rank calibrates
    (TeaCache's fit, MagCache's ratios) or measures (a threshold search) could differ between ranks and
    their decisions, and then their collectives, with them; so could their view of the output folder."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


class CalibrationCheckpoint:
    """The calibration generations of a compare kept as each ends (``state/calibration_partial.json``: the
    prompts done, TeaCache's recorded pairs, MagCache's moments, and the name of the LUT of their statistics,
    ``calibration_partial-<done>.safetensors``, written before it), so that a killed calibration resumes after
    its last complete generation with the statistics it would have had, wherever the kill fell. One process
    only: under torchrun a calibration starts again (every rank must run the same generations, and the ranks'
    recorders would need rank 0's files)."""

    NAME = "calibration_partial"

    def __init__(self, store: RunStore, prompts: List[list], tea: bool, mag: bool):
        import torch.distributed as dist

        self.store, self.prompts, self.what = store, prompts, {"teacache": tea, "magcache": mag}
        self.folder = store.folder / "state"
        self.single = not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)
        self.seconds = 0.0

    def _lut_files(self) -> List[Path]:
        return sorted(self.folder.glob(f"{self.NAME}-*.safetensors"))

    @classmethod
    def kept(cls, store: RunStore, prompts: List[list]) -> int:
        """How many of ``prompts``' generations an interrupted calibration kept in ``store`` (what
        :meth:`resume` will take back where the methods also match; 0 under torchrun)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return 0
        state = store.state(cls.NAME)
        if not isinstance(state, dict) or not (store.folder / "state" / str(state.get("lut"))).is_file():
            return 0
        done = state.get("done", 0)
        return done if state.get("prompts", [])[:done] == prompts[:done] else 0

    def resume(self, tea, mag):
        """``(LUT, prompts done)`` kept by an earlier run of this calibration (its TeaCache pairs and MagCache
        moments put back into ``tea`` / ``mag``), or ``(None, 0)``."""
        from ..taocache.lut import CalibrationLUT

        state = self.store.state(self.NAME) if self.single else None
        if state is None or not (self.folder / state["lut"]).is_file():
            return None, 0
        done = state["done"]
        if self.kept(self.store, self.prompts) != done or state["what"] != self.what:
            messages.notice("compare: the calibration kept in this folder was of other calibration prompts or "
                            "methods; calibrating from the first prompt")
            return None, 0
        if tea is not None:
            tea.pairs, tea.pair_experts = [tuple(p) for p in state["tea_pairs"]], list(state["tea_experts"])
        if mag is not None:
            from ..taocache.stats import RunningMoments

            m = state["mag_moments"]
            mag.moments = RunningMoments(torch.tensor(m["count"], dtype=torch.int64),
                                         torch.tensor(m["total"], dtype=torch.float64),
                                         torch.tensor(m["total_sq"], dtype=torch.float64))
        self.seconds = state["seconds"]
        return CalibrationLUT.load(self.folder / state["lut"]), done

    def save(self, done: int, lut, tea, mag, seconds: float) -> None:
        if not (self.single and self.store.writer):
            return
        from ..runtime.io import atomic_write_bytes

        name = f"{self.NAME}-{done}.safetensors"
        atomic_write_bytes(self.folder / name, lut.to_bytes())  # first: the state names only a LUT written
        moments = None if mag is None else {k: getattr(mag.moments, k).tolist() for k in ("count", "total", "total_sq")}
        self.store.put_state(self.NAME, {"prompts": self.prompts, "done": done, "what": self.what, "lut": name,
                                         "tea_pairs": [] if tea is None else [list(p) for p in tea.pairs],
                                         "tea_experts": [] if tea is None else tea.pair_experts,
                                         "mag_moments": moments, "seconds": round(seconds, 3)})
        for path in self._lut_files():  # the LUTs of earlier states (or of a save the kill left unnamed)
            if path.name != name:
                path.unlink(missing_ok=True)

    def discard(self) -> None:
        if self.store.writer:
            (self.folder / f"{self.NAME}.json").unlink(missing_ok=True)
            for path in self._lut_files():
                path.unlink(missing_ok=True)


def _first_difference(stored: List[list], listed: List[list]) -> str:
    """Where two lists of ``[prompt, seed]`` first differ, said for a user."""
    for i, (a, b) in enumerate(zip(stored, listed)):
        if a != b:
            return f"pair {i + 1}: {a[0]!r} seed {a[1]}, this experiment lists {b[0]!r} seed {b[1]}"
    return f"{len(stored)} pairs, this experiment lists {len(listed)}"


def _model_as_compared(model: Any) -> Any:
    """A folder's recorded model identity as compared: without ``model`` and ``architecture`` where they are
    torch.compile's wrapper's (recorded before 2026-11-28 for a compiled transformer: not the model's)."""
    from ..taocache.identity import comparable

    return comparable(model) if isinstance(model, dict) else model


@dataclass
class _PerfectLUT:
    """A LUT stand-in whose every step has statistics, cosine 1 and no spread: a window of the paper's rule it
    cannot fit (its length against ``min_step`` and the steps) fits no calibrated LUT either, so the check of
    the budgets runs before the calibration's generations. ``[streams, steps]`` tables."""
    streams: int
    steps: int

    def __post_init__(self):
        self.cos_mean = self.ratio_mean = torch.ones(self.streams, self.steps)
        self.cos_std = self.ratio_std = torch.zeros(self.streams, self.steps)

    def check(self, *args, **kwargs) -> None:
        """Fits any loop of its shape."""


def _on_cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def device_name() -> str:
    """What timed a run: the CUDA device's name, else ``cpu``."""
    return torch.cuda.get_device_name(torch.cuda.current_device()) if _on_cuda() else "cpu"


def _sync() -> None:
    if _on_cuda():
        torch.cuda.synchronize()


TAO_METHODS = {"taocache", "taocache-auto", "hybrid", "taoskip+tearesidual", "pab+taocache"}  # need TaoCache's LUT
TEA_METHODS = {"teacache", "hybrid", "pab+teacache"}  # need TeaCache's polynomial (unless published)
PAB_METHODS = {"pab", "pab+taocache", "pab+teacache"}
BLOCK_METHODS = TEA_METHODS | {"magcache", "taoskip+tearesidual"}  # reuse the block stack's residual
# a method's own settings, fingerprinted only where one of its methods is listed (a method added later with its
# own setting is no reason to refuse the folder's runs of the others)
METHOD_SETTINGS = {"teacache_use_ret_steps": TEA_METHODS, "magcache_k": {"magcache"}, "magcache_retention": {"magcache"},
                   "easycache_warmup": {"easycache"}, "hybrid_guard": {"hybrid"}, "hybrid_tao_skips": {"hybrid"},
                   "pab_range": PAB_METHODS,
                   "pab_timesteps": PAB_METHODS}

# method settings added since folders were first recorded: a folder that recorded the first (a setting of the same
# method, so it ran the method) but not the setting made its runs with the second value
UNRECORDED = {"hybrid_tao_skips": ("hybrid_guard", None)}


def needs_calibration(config: ExperimentConfig, tao: TaoCacheConfig,
                      target: Optional[Target] = None) -> Tuple[bool, str]:
    """Whether the experiment calibrates on its calibration prompts, and why (``target``: the call's, once known;
    a per-call target not yet resolved is taken to publish nothing)."""
    target = target or target_for(tao.integration)
    path = tao.lut_path() if TAO_METHODS & set(config.methods) else None
    if path is not None:  # (a folder was said not to exist, and a LUT calibrated in the output folder)
        from ..runtime.io import special_file_kind

        kind = "a directory" if path.is_dir() else special_file_kind(path)
        if kind is not None:
            inside = f"name the LUT file inside it, e.g. {path / 'model.safetensors'}" if path.is_dir() else \
                "name a file such as luts/model.safetensors"
            raise ConfigError(tao.source or "the config", "lut", f"{path} is {kind}, not a LUT file; {inside}")
    if TEA_METHODS & set(config.methods) and target.tea_published is None:
        return True, "teacache's polynomial"
    if "magcache" in config.methods and target.mag_published is None:
        return True, "magcache's magnitude ratios"
    return lut_needs_calibration(config, tao)


def lut_needs_calibration(config: ExperimentConfig, tao: TaoCacheConfig) -> Tuple[bool, str]:
    """Whether a listed method reads TaoCache's LUT and the config's is not complete (then the experiment calibrates
    its own), and why. A complete one is read by the TaoCache rows even where another method calibrates (it was set
    aside then, silently, for a LUT of the experiment's few calibration prompts: review, 2026-11-29)."""
    if not TAO_METHODS & set(config.methods):
        return False, ""
    from ..taocache.lut import CalibrationLUT

    path = tao.lut_path()
    if path is None:
        return True, "taocache's LUT (the TaoCache config names no lut:)"
    if not path.is_file():
        return True, f"taocache's LUT ({path} does not exist)"
    have = CalibrationLUT.load(path).num_prompts
    if have < tao.calibration.prompts:
        return True, f"taocache's LUT ({path} holds {have} of {tao.calibration.prompts} prompts)"
    return False, ""


def calibrated_here(config: ExperimentConfig, target: Target, why: str, tao: TaoCacheConfig) -> str:
    """What a calibration the experiment needs (:func:`needs_calibration`, ``why``) records: TaoCache's LUT where a
    listed method reads it and the config's is not complete, TeaCache's polynomial and MagCache's ratios where no
    published ones are used."""
    methods = set(config.methods)
    lut_needed = lut_needs_calibration(config, tao)[0]
    lut = why if why.startswith("taocache's LUT") else "taocache's LUT"  # (with why it is needed, if it is)
    what = [w for w, on in ((lut, lut_needed),
                            ("teacache's polynomial", bool(TEA_METHODS & methods) and target.tea_published is None),
                            ("magcache's magnitude ratios", "magcache" in methods and target.mag_published is None))
            if on] or [why]
    return (", ".join(what[:-1]) + " and " if len(what) > 1 else "") + what[-1]


def check_methods(config: ExperimentConfig, target: Target, where: str) -> None:
    """The listed methods ``target`` can run (``where``: the integration, or the pipeline of a per-call target)."""
    for name in config.methods:
        if name in target.refused:
            raise ConfigError(config.source, "methods", f"{name} is not available for {where}: {target.refused[name]}")
    if "videosys-pab" in config.methods and target.own_pab is None:
        raise ConfigError(config.source, "methods", f"videosys-pab is VideoSys' own PAB: not available for {where} "
                                                    "(pab is taohooks' PAB, on every integration)")
    for name in sorted(PAB_METHODS & set(config.methods)):
        if target.attention is None and not config.pab_groups:
            raise ConfigError(config.source, "methods", f"{name} is not yet available for {where} (its attention "
                                                        "modules are not named yet; name them with pab_groups:)")
    if TEA_METHODS & set(config.methods) and target.tea_probe is None and target.tea_published is None:
        raise ConfigError(config.source, "methods", f"teacache is not yet available for {where}: {target.tea_source}")
    stacked = sorted(BLOCK_METHODS & set(config.methods))
    if stacked and target.blocks is None:
        raise ConfigError(config.source, "methods", f"{', '.join(stacked)} reuse the block stack's residual, but the "
                                                    f"block stack of {where} is not known ({target.tea_source}); "
                                                    "compare full, taocache, taocache-auto and easycache there")


def check_before_run(config: ExperimentConfig, tao: TaoCacheConfig) -> None:
    """What can be said before the script loads a model."""
    try:
        target = target_for(tao.integration)
    except ValueError as exc:
        raise ConfigError(config.source, "taocache" if config.taocache else "integration", str(exc)) from None
    if target.known:  # (a per-call target's methods are checked at the first generation call)
        check_methods(config, target, f"the {tao.integration!r} integration")
    if config.teacache_use_ret_steps and TEA_METHODS & set(config.methods) and not target.tea_ret_steps:
        raise ConfigError(config.source, "teacache_use_ret_steps", "true selects the authors' use_ret_steps variant "
                          f"of their Wan2.1 TeaCache; the {tao.integration!r} integration's teacache has no such "
                          "switch (" + (target.tea_source if not target.known else
                                        "the authors' own, as they run it" if target.tea_published else
                                        "fitted on the calibration prompts") + "): remove the key")
    needed, why = needs_calibration(config, tao)
    if needed and config.calibration_prompts is None:
        raise ConfigError(config.source, "calibration_prompts", f"{why} needs calibration prompts")


class Experiment:
    """The experiment run on the script's first generation call (see the module docstring)."""

    def __init__(self, config: ExperimentConfig, tao: TaoCacheConfig, script_argv: List[str]):
        self.config, self.tao, self.script_argv = config, tao, list(script_argv)
        self.store = RunStore(config.output_dir, writer=writes_results())
        self.target: Target = target_for(tao.integration)
        self.finished = False
        self.calibration_seconds = 0.0
        self.thresholds: Dict[str, Dict[str, float]] = {}
        self.mag_ratios: Optional[list] = None  # MagCache's calibrated ratios [calls per step, steps]
        self.plans: Dict[str, Dict[str, Any]] = {}
        self.warm = False  # a generation (calibration, search, warm-up or run) has run in this process
        self._partial = 0  # an interrupted calibration's generations, counted in the first progress line
        self.expert_switch: Optional[int] = None  # the first low-noise step of Wan2.2's two experts, once known
        self.mag_provenance: Optional[str] = None  # which MagCache and TeaCache the baselines run (results.json's
        self.tea_provenance: Optional[str] = None  # meta), once the first generation call is known

    # ------------------------------------------------------------------ one generation
    def _arguments_for(self, entry: PromptEntry) -> inspect.BoundArguments:
        """The first call's arguments with ``entry``'s prompt and seed (seeds torch's RNG when the
        generation function takes no seed); call right before the generation."""
        bound = self._bound
        replaced = inspect.BoundArguments(bound.signature, bound.arguments.copy())
        prompt, seed = self.target.prompt_arg, self.target.seed_arg
        batched = isinstance(bound.arguments[prompt], (list, tuple))
        replaced.arguments[prompt] = [entry.prompt] if batched else entry.prompt
        if seed is not None:
            replaced.arguments[seed] = [entry.seed] if isinstance(bound.arguments[seed], (list, tuple)) else entry.seed
        else:  # the script seeds the global RNG once; each (prompt, seed) run is seeded alike
            torch.manual_seed(entry.seed)
        generator = bound.arguments.get("generator")
        # a generator the script passes would carry on from run to run (the reference and the cached runs of one
        # prompt drawing different noise; VideoSys draws its latents from it whatever its seed=): each run gets a
        # fresh one seeded with its seed
        if isinstance(generator, torch.Generator):
            replaced.arguments["generator"] = torch.Generator(generator.device).manual_seed(entry.seed)
        elif isinstance(generator, (list, tuple)) and generator:
            replaced.arguments["generator"] = [
                torch.Generator(g.device if g is not None else "cpu").manual_seed(entry.seed + i)
                for i, g in enumerate(generator)]
        return replaced

    def generate(self, callbacks: Sequence[Callback], entry: PromptEntry) -> Generation:
        """``entry`` through the script's generation function with ``callbacks`` on a fresh hook."""
        recorder = SkipRecorder([cb for cb in callbacks if isinstance(cb, BlockStackCache)])
        hook = DenoiserHook(self.loop, [*self._checks(), *callbacks, recorder], **self.hook_kwargs)
        arguments = self._arguments_for(entry)
        capture = self.target.latents_during(dict(arguments.arguments)) if self.target.latents_during else \
            contextlib.nullcontext([])
        with self._around(callbacks), hook.attach(self.model, *self.also), capture as latents:
            hook.new_sample()
            _sync()
            if _on_cuda():
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            with generation_running(hook):
                result = self.patch.original(*arguments.args, **arguments.kwargs)
            _sync()
            seconds = time.perf_counter() - start
            self._check_whole(hook, entry)
        peak = torch.cuda.max_memory_allocated() if _on_cuda() else None
        self.warm = True
        video = self.target.video(result) if self.store.writer else None  # Wan2.1: None on ranks > 0
        return Generation(video, seconds, recorder.calls, recorder.skipped, skipped_calls=recorder.skipped_calls,
                          fractions=recorder.fractions,
                          peak_memory_bytes=peak, latents=latents[0] if latents and self.store.writer else None)

    def check_folder_before_the_script(self) -> None:
        """The output folder's experiment.json against what is known before the script loads its model (the
        script line, the integration, the settings of the experiment and TaoCache configs), so that a folder of
        another experiment is refused in seconds, not after the model has loaded (the rest is checked at the
        first generation call)."""
        call_dependent = ("magcache_k", "magcache_retention") + (() if self.target.known else ("lut",))
        settings = {k: v for k, v in self._run_settings().items() if k not in call_dependent}
        self.store.check_experiment({"script": self.script_argv, "integration": self.tao.integration,
                                     **self._script_config(), **settings},
                                    optional=self._optional_settings(), partial=True,  # (call_dependent: later)
                                    comparable=self._comparable(), unrecorded=UNRECORDED)
        # the calibration prompts of a folder that calibrated (they were compared after the model loaded: review)
        if self.target.known and needs_calibration(self.config, self.tao, self.target)[0]:
            self._check_calibration_prompts(self.store.state("calibration"),
                                            [[e.prompt, e.seed] for e in self.config.calibration_list()])

    def _check_calibration_prompts(self, state: Optional[Dict[str, Any]], used: List[List[Any]]) -> None:
        """A folder calibrated on other calibration prompts than ``used`` is refused (its runs would mix two)."""
        if state is not None and state.get("calibration_prompts") != used:
            difference = _first_difference(state.get("calibration_prompts") or [], used)
            raise ConfigError(self.config.source, "calibration_prompts", f"{self.store.folder} was calibrated on "
                              f"other calibration prompts ({difference}); its runs would mix two calibrations: "
                              "use another output folder (or delete it)")

    def _script_config(self) -> Dict[str, Any]:
        """``{"script_config": settings}`` of the script's own config file, where the target reads one (Latte's
        ``--config`` YAML, less the keys no run depends on) and it can be read; else ``{}``."""
        read = self.target.script_config
        settings = read(self.script_argv) if read is not None else None
        return {"script_config": settings} if settings is not None else {}

    def _comparable(self) -> Dict[str, Callable[[Any], Any]]:
        """Settings compared as a function of them (see :meth:`RunStore.check_experiment`): the script line less the
        flags no run depends on (and less the config file's flag, where the folder recorded the file's content: a
        folder recorded before that compares its path); PAB groups as older folders recorded them (``range_``) too."""
        def groups(value):
            return [{"pattern": g.get("pattern"), "range": g.get("range", g.get("range_"))} if isinstance(g, dict)
                    else g for g in value] if isinstance(value, list) else value
        recorded = self.store.recorded()
        by_content = "script_config" in recorded or "script" not in recorded
        return {"script": functools.partial(self.target.comparable_script, config_by_content=by_content),
                "pab_groups": groups, "model": _model_as_compared}

    def _optional_settings(self) -> Tuple[str, ...]:
        """Settings recorded only while a method reading them is listed (see :meth:`RunStore.check_experiment`), and
        the script's config file (recorded since 2026-11-28; one it could not read is left to the script)."""
        return ("pab_groups", "lut", "script_config", *METHOD_SETTINGS,
                *(f"plan.{f.name}" for f in dataclasses.fields(self.tao.plan)))

    def _run_settings(self) -> Dict[str, Any]:
        """What a stored run (or matched threshold) depends on besides its method and budget: the TaoCache
        plan and calibration settings, the LUT it reads, the methods' own settings. A folder whose runs were
        made with other settings is refused (as another script or model is), never silently reused."""
        import hashlib
        import json

        c, methods = self.config, set(self.config.methods)
        # one key each (plan.rule, not plan: {...}), so that a refusal names the setting that changed
        settings = {"calibration.sampler": self.tao.calibration.sampler,
                    "calibration.error_horizon": self.tao.calibration.error_horizon,
                    **{k: getattr(c, k) for k, users in METHOD_SETTINGS.items() if users & methods}}
        if PAB_METHODS & methods:
            settings["pab_groups"] = [{"pattern": g.pattern, "range": g.range_} for g in c.pab_groups] \
                if c.pab_groups else None
        if TAO_METHODS & methods:  # the plan and the LUT, where a listed method reads them
            settings.update({f"plan.{k}": v for k, v in dataclasses.asdict(self.tao.plan).items()
                             if k not in ("budget", "window", "skip_steps")})  # replaced per budget (_tao_plan)
            settings["lut"] = "calibrated in this folder" if lut_needs_calibration(c, self.tao)[0] else \
                "sha256:" + hashlib.sha256(self.tao.lut_path().read_bytes()).hexdigest()  # the config's LUT
        return json.loads(json.dumps(settings))  # as experiment.json gives it back (tuples as lists)

    def _alike_settings(self) -> Dict[str, tuple]:
        """Method settings whose unset value and the default it stands for make the same runs (a setting written
        equal to its default is no change)."""
        if "magcache" not in self.config.methods:
            return {}
        k, retention = self._magcache_defaults()
        return {"magcache_k": (None, k), "magcache_retention": (None, retention)}

    def _magcache_defaults(self) -> Tuple[int, float]:
        """MagCache's K and retention where the experiment sets none: the authors' (published) or 2, 0.2."""
        if self.target.mag_published is not None:
            _, k, retention, _ = self.target.mag_published(dict(self._bound.arguments), self.loop.steps)
            return k, retention
        return 2, 0.2

    # ------------------------------------------------------------------ the experiment
    def _check_arguments(self, target: str, arguments: Dict[str, Any]) -> None:
        """The script's first generation call can be replayed once per (prompt, seed): it names the prompt and
        seed arguments, and fixes no initial latents (which would make every run start from the same noise,
        whatever its seed)."""
        prompts = arguments.get(self.target.prompt_arg)
        # (a pipeline whose batch follows its prompt list: other arguments the script made per prompt, a negative
        # prompt or a generator list, would not follow a list of one; the testbed's seeds are replaced alike)
        if self.target.seed_arg is None and isinstance(prompts, (list, tuple)) and len(prompts) > 1:
            raise ConfigError("command line", "SCRIPT", f"the script passes {len(prompts)} prompts in one "
                              f"call of {target}; compare runs each of its prompts in a call of its own, with the "
                              "script's other arguments: pass one prompt (a string, or a list of one) to compare")
        if isinstance(arguments.get("prompt_embeds"), torch.Tensor):
            raise ConfigError("command line", "SCRIPT", f"the script passes prompt_embeds= to {target}: the "
                              "pipeline would use them whatever prompt compare gives it, so every prompt would make "
                              "the same video; pass prompt= (and let the pipeline encode it) to compare")
        for name in (self.target.prompt_arg, self.target.seed_arg):
            if name is not None and name not in arguments:
                raise ConfigError("command line", "SCRIPT", f"{target} has no argument {name!r}; "
                                  "the compare target of this integration does not fit the script")
        latents = arguments.get("latents")
        if isinstance(latents, torch.Tensor) or (
                isinstance(latents, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in latents)):
            raise ConfigError("command line", "SCRIPT", f"the script passes latents= to {target}: every run "
                              "would start from these latents whatever its seed, so the prompts' seeds would change "
                              "nothing; let the pipeline draw them (drop latents= from the script's call) to compare")

    def _check_budgets(self) -> None:
        """Budgets the loop cannot run, said before anything is written to the folder (a refused experiment left
        its experiment.json, which then refused the corrected one as another experiment's folder)."""
        steps = self.loop.steps
        skips = [budget_skips(b, steps) for b in self.config.budgets] if self.config.budgeted_methods else []
        for i, n in enumerate(skips):  # (budgets no method runs at are not checked: the defaults, with [full])
            budget = self.config.budgets[i]
            if n >= steps:
                raise ConfigError(self.config.source, f"budgets[{i}]", f"{budget} of {steps} steps skips every step "
                                  f"({self.loop.describe()}); give a fraction below {(steps - 1) / steps:g}")
            if n in skips[:i]:
                raise ConfigError(self.config.source, f"budgets[{i}]", f"{budget} of {steps} steps is {n} skipped "
                                  f"steps, as {self.config.budgets[skips.index(n)]} is ({self.loop.describe()}); "
                                  f"give budgets that differ by at least 1/{steps}")
            if round(budget * steps) < 1:
                messages.warning(f"compare: budgets[{i}]: {budget} of {steps} steps is less than one step; it runs "
                                 f"as 1 skipped step ({100 / steps:.1f}%)")
        if "easycache" in self.config.methods and self.config.easycache_warmup >= steps:
            raise ConfigError(self.config.source, "easycache_warmup", f"{self.config.easycache_warmup}, but the loop "
                              f"has {steps} steps: EasyCache would skip nothing (its warm-up computes the first "
                              f"easycache_warmup steps); give fewer than {steps}")

    def run(self, patch: GenerationPatch, bound: inspect.BoundArguments) -> None:
        self.patch, self._bound = patch, bound
        arguments = dict(bound.arguments)
        self._check_arguments(patch.target(), arguments)
        self.model = unwrap_model(patch.model_of(arguments))
        if not self.target.known:  # (diffusers: the pipeline's transformer decides)
            self.target = self.target.for_call(arguments)
            check_methods(self.config, self.target, f"{type(arguments['self']).__name__}'s "
                                                    f"{type(unwrap_model(self.model, compiled=True)).__name__}")
        if "videosys-pab" in self.config.methods:  # (the script must have enabled it)
            own = self.target.own_pab(arguments, self.model)
            if isinstance(own, str):
                raise ConfigError(self.config.source, "methods", own)
        self.loop, attach_kwargs = patch.loop_of(arguments)
        if attach_kwargs.get("repeat"):  # one loop per clip (Wan2.2 S2V/Animate); command.py refuses these earlier
            from .command import PER_CLIP_MESSAGE
            raise ConfigError(self.config.source, "taocache", f"{patch.target()} {PER_CLIP_MESSAGE}")
        check_declared_loop(self.tao, self.loop, patch.target())
        self.hook_kwargs = {k: v for k, v in attach_kwargs.items() if k in ("timestep_arg",)}
        self.also = tuple(attach_kwargs.get("also", ()))  # Wan2.2's second expert, numbered with the first
        self._check_pab_patterns()
        self._check_budgets()
        self.expert_boundary = attach_kwargs.get("expert_boundary")
        self.run_timesteps = attach_kwargs.get("run_timesteps")  # (where they place Wan2.2's switch: its schedule)
        calibration = self.config.calibration_list()
        needed, why = _as_rank_zero_has_it(needs_calibration(self.config, self.tao, self.target))
        if needed and self.tao.plan.rule == "paper" and self.tao.plan.tau_cos is None and (
                not self.expert_boundary or self.run_timesteps is not None):  # (Wan2.2: it waited for the LUT)
            # a window no LUT can fit is arithmetic: said before the calibration's generations (and before the
            # folder records this experiment), not after
            self._check_plans(_PerfectLUT(len(self.loop.streams), self.loop.steps), TAO_METHODS - {"taocache-auto"})
        self.identity = patch.identity_of(arguments, self.model) if patch.identity_of else identity_of_model(self.model)
        models = (patch.model_of(arguments), *self.also)
        weights = _as_rank_zero_has_it(weights_fingerprint(*models))
        # a folder recorded between f341df4 and b87ec07 (2026-11-27, 03:39-04:08) holds it at float positions
        earlier = _as_rank_zero_has_it(weights_fingerprint(*models, float_positions=True))
        self.store.check_experiment({"script": self.script_argv, "integration": self.tao.integration,
                                     **self._script_config(), "loop": self.loop.describe(),
                                     "model": {k: str(v) for k, v in sorted(self.identity.items())},
                                     # what the script line does not show: the weights (a checkpoint replaced
                                     # at the same path), the call's settings (read from a config file); rank 0's
                                     "weights": weights,
                                     "call": _as_rank_zero_has_it(call_settings(
                                         arguments, (self.target.prompt_arg, self.target.seed_arg))),
                                     **self._run_settings()},
                                    optional=self._optional_settings(), grown=("model",),
                                    alike={**self._alike_settings(), "weights": (weights, earlier)},
                                    comparable=self._comparable(), unrecorded=UNRECORDED)
        self._check_stored_thresholds(calibration)  # (after: a folder of another experiment is said as such)
        evaluation = self.config.evaluation_prompts()
        steps = self.loop.steps
        # per prompt: the reference, then each method x budget, so that full-step and cached runs alternate
        runs = [(m, s, e) for e in evaluation for m, s in self.config.runs(steps)]
        calibrated = self.store.state("calibration") is not None
        total = len(runs) + (len(calibration) if needed else 0)
        self._partial = CalibrationCheckpoint.kept(self.store, [[e.prompt, e.seed] for e in calibration]) \
            if needed and not calibrated else 0  # an interrupted calibration's generations
        done = sum(self.store.has(run_label(m, s, steps), e) for m, s, e in runs) + (
            len(calibration) if needed and calibrated else self._partial)
        self.progress = Progress(total, done)
        budgeted = [m for m in self.config.methods if m != "full" and m not in BUDGET_FREE_METHODS]
        shape = (f"({', '.join(self.config.methods)}) x {len(self.config.budgets)} budgets" if budgeted else
                 f"({', '.join(self.config.methods)}), no method run at the budgets")  # (said x 2 budgets: review)
        messages.notice(f"compare: {len(evaluation)} prompts x {shape}, {self.loop.describe()}; {done} of {total} runs "
                        f"already in {self.store.folder}" + (f" ({self._partial} of them an interrupted "
                                                              "calibration's)" if self._partial else ""))
        lut, coefficients = self._calibration(calibration, needed, why)
        guard = self._expert_guard(lut)
        self.expert_switch = guard[0] if guard else None  # (Wan2.2's A14B tasks: the first low-noise step)
        self._check_plans(lut)
        # what is left, decided once: under torchrun every rank runs the same generations in the same
        # order (their collectives must match) while only rank 0 writes
        pending = _as_rank_zero_has_it([(m, s, e) for m, s, e in runs if not self.store.has(run_label(m, s, steps), e)])
        # what results.json's meta says the baselines used, known whether or not a run of theirs is left to make (it
        # was set only by a run made in this process: null after a rerun of a folder whose runs were all stored)
        methods = set(self.config.methods)
        self.mag_provenance = self._magcache()[3] if "magcache" in methods else None
        self.tea_provenance = self._tea_source() if TEA_METHODS & methods else None
        for method, skips, entry in pending:
            label = run_label(method, skips, steps)
            callbacks = self._callbacks(method, skips, lut, coefficients, calibration)
            if not self.warm:  # the process's first generation is slower (kernels, allocator, caches): untimed
                messages.notice(f"compare: one untimed full-step generation of {entry.prompt!r} first (warm-up: "
                                "the process's first generation would time slower)")
                self.generate([], entry)
            generation = self.generate(callbacks, entry)
            record = {"method": method, "skips": skips, "steps": steps, **generation.record(steps, self.expert_switch),
                      "device": device_name(),
                      **self.thresholds.get(label, {}), **self.plans.get(label, {})}
            self.store.save(label, entry, generation.video, record, latents=generation.latents)
            self.progress.advance(f"{label}, {entry.prompt!r} seed {entry.seed}")
        if not self.store.writer:
            rank, world = os.environ.get("RANK", "?"), os.environ.get("WORLD_SIZE", "?")
            messages.notice(f"compare: rank {rank}/{world} ran its {len(pending)} generations (rank 0 writes "
                            f"the results)", every_rank=True)
        self.finished = True

    def _calibration(self, prompts: List[PromptEntry], needed: bool, why: str):
        """``(LUT or None, TeaCache coefficients or None)``: recorded on the calibration prompts, or the
        TaoCache config's complete LUT; under torchrun rank 0's on every rank."""
        lut, coefficients = self._calibrate(prompts, needed, why)
        lut, coefficients, self.mag_ratios = _as_rank_zero_has_it((lut, coefficients, self.mag_ratios))
        return lut, coefficients

    def _calibrate(self, prompts: List[PromptEntry], needed: bool, why: str):
        from ..taocache.calibration import CalibrationRecorder
        from ..taocache.lut import CalibrationLUT
        from ..taocache.cache import check_run

        lut_file = self.store.folder / "state" / "calibration_lut.safetensors"
        here = self.store.writer  # ranks > 0 that cannot read a file take rank 0's (see _calibration)

        def configured():  # the TaoCache config's complete LUT, where a listed method reads one
            if not TAO_METHODS & set(self.config.methods) or not (here or self.tao.lut_path().is_file()):
                return None
            lut = CalibrationLUT.load(self.tao.lut_path())
            check_run(self.tao, lut, self.loop, self.identity)
            return lut

        if not needed:
            return configured(), None
        own_lut = _as_rank_zero_has_it(lut_needs_calibration(self.config, self.tao)[0])
        state = self.store.state("calibration")
        used = [[e.prompt, e.seed] for e in prompts]
        wants_tea = bool(TEA_METHODS & set(self.config.methods)) and self.target.tea_published is None
        wants_mag = "magcache" in self.config.methods and self.target.mag_published is None
        if _as_rank_zero_has_it(state is not None and lut_file.is_file()):  # resumed: no calibration runs
            self._check_calibration_prompts(state, used)
            kept = state or {}
            coefficients, self.mag_ratios = kept.get("tea_coefficients"), kept.get("mag_ratios")
            # a method added to methods since: what it calibrates is recorded now, on the same generations (rank 0
            # decides; every rank runs them)
            add_tea, add_mag = _as_rank_zero_has_it((wants_tea and coefficients is None,
                                                     wants_mag and self.mag_ratios is None))
            if add_tea or add_mag:
                tea, mag = self._calibrators(add_tea, add_mag)
                what = " and ".join(w for w, on in (("teacache's polynomial", add_tea),
                                                    ("magcache's magnitude ratios", add_mag)) if on)
                messages.notice(f"compare: {self.store.folder} was calibrated without {what} (a method needing it "
                                f"was added to methods since): recording it on the same {len(prompts)} calibration "
                                "prompts (full-step)")
                self._full_step_generations([c for c in (tea, mag) if c is not None], prompts, 0,
                                            lambda i, entry: messages.notice(
                                                f"compare: recorded {entry.prompt!r} seed {entry.seed} "
                                                f"({i + 1}/{len(prompts)})"))
                coefficients = tea.fit_per_expert() if tea is not None else coefficients
                self.mag_ratios = mag.ratios().tolist() if mag is not None else self.mag_ratios
                if state is not None:
                    self.store.put_state("calibration", {**state, "tea_coefficients": coefficients,
                                                         "mag_ratios": self.mag_ratios})
            if not own_lut:
                return configured(), coefficients
            if state is None or not lut_file.is_file():
                return None, None
            return CalibrationLUT.load(lut_file), coefficients
        tea, mag = self._calibrators(wants_tea, wants_mag)
        partial = CalibrationCheckpoint(self.store, used, tea is not None, mag is not None)
        resumed, done = partial.resume(tea, mag)
        self.progress.done += done - self._partial  # (counted in the first line, where it was)
        reads = "" if own_lut or not TAO_METHODS & set(self.config.methods) else \
            f"; the TaoCache rows read the config's complete lut: {self.tao.lut_path()}"
        messages.notice(f"compare: calibrating {calibrated_here(self.config, self.target, why, self.tao)} "
                        f"on {len(prompts)} calibration prompts (full-step), into "
                        f"{self.store.folder / 'state'} (this experiment's own: the config's lut: is not written"
                        f"{reads})" + (f"; {done} of them recorded before, kept" if done else ""))
        recorder = CalibrationRecorder(self.tao.model_id, self.tao.calibration.sampler, identity=self.identity,
                                       error_horizon=self.tao.calibration.error_horizon, resume=resumed)
        callbacks: List[Callback] = [c for c in (recorder, tea, mag) if c is not None]
        start = time.perf_counter() - partial.seconds

        def ended(i: int, entry: PromptEntry) -> None:
            if i + 1 < len(prompts):  # each generation kept as it ends: a killed calibration resumes
                partial.save(i + 1, recorder.lut(), tea, mag, time.perf_counter() - start)
            self.progress.advance(f"calibration, {entry.prompt!r} seed {entry.seed}")

        self._full_step_generations(callbacks, prompts, done, ended)
        lut = recorder.lut()
        from ..runtime.io import atomic_write_bytes

        if self.store.writer:
            atomic_write_bytes(lut_file, lut.to_bytes())
        coefficients = tea.fit_per_expert() if tea is not None else None  # {expert: ...} with two experts
        self.mag_ratios = mag.ratios().tolist() if mag is not None else None
        self.store.put_state("calibration", {"tea_coefficients": coefficients, "mag_ratios": self.mag_ratios,
                                             "calibration_prompts": used,
                                             "seconds": round(time.perf_counter() - start, 3)})
        partial.discard()
        return (lut if own_lut else configured()), coefficients

    def _calibrators(self, tea: bool, mag: bool):
        """TeaCache's and MagCache's calibrators on the target's proxy and block stack (``None`` where not asked)."""
        from ..caches.magcache import MagCacheCalibrator
        from ..caches.teacache import TeaCacheCalibrator

        return (TeaCacheCalibrator(probe=self.target.tea_probe(), blocks=self.target.blocks, exit=self.target.exit)
                if tea else None,
                MagCacheCalibrator(blocks=self.target.blocks, exit=self.target.exit) if mag else None)

    def _full_step_generations(self, callbacks: List[Callback], prompts: List[PromptEntry], first: int,
                               ended: Callable[[int, PromptEntry], None]) -> None:
        """The script's generation of each of ``prompts[first:]`` with ``callbacks`` recording; ``ended(i, entry)``
        after each."""
        with self._around(callbacks), DenoiserHook(self.loop, [*self._checks(), *callbacks],
                                          **self.hook_kwargs).attach(self.model, *self.also) as hook:
            for i, entry in enumerate(prompts[first:], first):
                hook.new_sample()
                arguments = self._arguments_for(entry)
                with generation_running(hook):
                    self.patch.original(*arguments.args, **arguments.kwargs)
                self._check_whole(hook, entry)
                self.warm = True
                ended(i, entry)

    def _around(self, callbacks: Sequence[Callback]) -> ContextManager[None]:
        """The context the target runs a compared generation with ``callbacks`` in (VideoSys: its own PAB off but
        for videosys-pab)."""
        make = self.target.around
        return make(dict(self._bound.arguments), callbacks) if make is not None else contextlib.nullcontext()

    def _checks(self) -> List[Callback]:
        """The integration's own callbacks for a compared generation's hook (the target's ``hook_callbacks``)."""
        make = self.target.hook_callbacks
        return make(dict(self._bound.arguments), self.model) if make is not None else []

    def _check_whole(self, hook: DenoiserHook, entry: PromptEntry) -> None:
        """A generation that returned before its loop's last call (a step callback that stops the pipeline) is
        refused: its calls are not the loop the budgets and the LUT count."""
        made = hook.call_index  # (None once a generation made all its calls)
        if made is not None:
            what = f"returned after {made} of {self.loop.total_calls} denoiser calls ({self.loop.describe()})"
            hook.end_generation(f"the pipeline {what}")
            raise CompareError(f"the generation of {entry.prompt!r} seed {entry.seed} {what}: the pipeline stopped its "
                               "loop early (a callback_on_step_end that interrupts it), or makes fewer calls than the "
                               "loop counts (guidance switched off for its last steps; a declared loop: whose streams "
                               "or split_batch are not the pipeline's); "
                               "compare measures whole generations")

    def _callbacks(self, method: str, skips: int, lut, coefficients, calibration: List[PromptEntry]) -> List[Callback]:
        steps = self.loop.steps
        label = run_label(method, skips, steps)
        if method == "full":
            return []
        if method in ("taocache", "taocache-auto"):
            from ..taocache.extrapolation import TaoCacheCallback

            plan = self._method_plan(method, lut, skips)
            self.plans[label] = {"window": list(plan.window) if plan.window else None}
            return [TaoCacheCallback(plan, lut.timesteps, max_norm_ratio=self.tao.plan.max_norm_ratio)]
        if method == "taoskip+tearesidual":  # the paper's ablation: TeaCache's residual reuse on TaoCache's steps
            from ..caches.residual import ResidualSkipCallback

            plan = self._method_plan(method, lut, skips)
            self.plans[label] = {"window": list(plan.window) if plan.window else None}
            return [ResidualSkipCallback(plan.skipped_steps, blocks=self.target.blocks, exit=self.target.exit)]
        if method == "pab+taocache":  # PAB inside the computed calls, reset where TaoCache resumes
            from ..taocache.extrapolation import TaoCacheCallback

            plan = self._method_plan(method, lut, skips)
            self.plans[label] = {"window": list(plan.window) if plan.window else None, **self._pab_record()}
            return [TaoCacheCallback(plan, lut.timesteps, max_norm_ratio=self.tao.plan.max_norm_ratio),
                    self._pab(plan.resume_steps)]
        if method == "videosys-pab":  # the pipeline's own PAB, as the script configured it
            self.plans[label] = {"pab": "VideoSys' own, as the script configures it"}
            return [self.target.own_pab(dict(self._bound.arguments), self.model)]
        if method == "pab":  # attention broadcast inside every call, nothing skipped
            self.plans[label] = self._pab_record()
            return [self._pab()]
        if method in ("teacache", "pab+teacache"):  # pab+teacache: PAB inside the calls TeaCache computes
            tea, with_pab = self._tea_maker(coefficients), method == "pab+teacache"
            if with_pab:
                self.plans[label] = self._pab_record()

            def make(threshold: float) -> List[Callback]:
                return [*tea(threshold), *([self._pab()] if with_pab else [])]

            found = self._threshold(label, make, calibration[:self.config.search_prompts], skips / steps, shared=True)
            return make(found["threshold"])
        if method == "hybrid":  # Algorithm 2: TaoCache's window (hybrid_tao_skips, or half the budget), TeaCache before
            from ..taocache.extrapolation import TaoCacheCallback

            tao_skips = self._hybrid_tao_skips(skips)
            plan = self._method_plan(method, lut, skips)
            first = plan.skipped_steps[0] if plan.skipped_steps else steps
            max_step = max(0, first - self.config.hybrid_guard)
            tea = self._tea_maker(coefficients)
            self.plans[label] = {"window": list(plan.window) if plan.window else None, "tao_skips": tao_skips}

            def make(threshold: float) -> List[Callback]:
                return [TaoCacheCallback(plan, lut.timesteps, max_norm_ratio=self.tao.plan.max_norm_ratio),
                        *tea(threshold, max_step=max_step)]

            if skips <= tao_skips:
                return make(0.0)
            found = self._threshold(label, make, calibration[:self.config.search_prompts], skips / steps)
            return make(found["threshold"])
        if method == "magcache":
            from ..caches.magcache import MagCacheCallback

            build, k, retention, self.mag_provenance = self._magcache()
            if build is None:  # calibrated here
                if self.mag_ratios is None:
                    raise ConfigError(self.config.source, "methods", f"{self.store.folder} was calibrated without "
                                      "magcache's ratios (magcache was added to methods since); use another output "
                                      "folder")
                ratios = torch.tensor(self.mag_ratios, dtype=torch.float64)

                def build(threshold: float, k: int, retention: float):
                    return MagCacheCallback(ratios, threshold, k, retention, blocks=self.target.blocks,
                                            exit=self.target.exit)

            def make(threshold: float) -> List[Callback]:
                return [build(threshold, k, retention)]

            found = self._threshold(label, make, calibration[:self.config.search_prompts], skips / steps, shared=True)
            return make(found["threshold"])
        if method == "easycache":  # runtime-adaptive: nothing calibrated, the threshold matched to the budget
            from ..caches.easycache import EasyCacheCallback

            warmup = self.config.easycache_warmup

            def make(threshold: float) -> List[Callback]:
                return [EasyCacheCallback(threshold, warmup_steps=warmup)]

            found = self._threshold(label, make, calibration[:self.config.search_prompts], skips / steps, shared=True)
            return make(found["threshold"])
        raise ValueError(f"unknown method {method!r}")

    def _magcache(self) -> Tuple[Optional[Callable[[float, int, float], Callback]], int, float, str]:
        """``(build(threshold, k, retention), K, retention, provenance)`` of MagCache in this experiment: the authors'
        published ratios (and rule) where the target has them; else ``build`` is ``None`` (the ratios are calibrated on
        the calibration prompts). K and retention: the experiment's, else the defaults."""
        if self.target.mag_published is not None:
            build, k, retention, provenance = self.target.mag_published(dict(self._bound.arguments), self.loop.steps)
        else:
            build, provenance = None, "MagCache's magnitude ratios calibrated on the calibration prompts"
            k, retention = self._magcache_defaults()
        k = self.config.magcache_k if self.config.magcache_k is not None else k
        retention = self.config.magcache_retention if self.config.magcache_retention is not None else retention
        return build, k, retention, f"{provenance}; K {k}, retention {retention:g}"

    def _tea_source(self) -> str:
        """Which TeaCache the experiment's TeaCache-family methods run: the authors' (published) or the target's
        fitted polynomial."""
        if self.target.tea_published is not None:
            return self.target.tea_published(dict(self._bound.arguments), self.config.teacache_use_ret_steps)[1]
        return self.target.tea_source

    def _check_plans(self, lut, methods=TAO_METHODS) -> None:
        """Every TaoCache plan of the experiment (of ``methods``), made once before the first run: a budget no
        plan fits is said now (naming the budget), not after the runs before it."""
        from ..taocache.plan import PlanError

        if lut is None:
            return
        steps = self.loop.steps
        for i, budget in enumerate(self.config.budgets):
            skips = budget_skips(budget, steps)
            for method in sorted(set(methods) & set(self.config.methods)):
                try:
                    self._method_plan(method, lut, skips)
                except PlanError as exc:
                    raise ConfigError(self.config.source, f"budgets[{i}]", f"{method} at {budget} ({skips} of "
                                      f"{steps} steps): {exc}") from None

    def _pab(self, reset_steps=()):
        """PAB on the target's attention modules with the experiment's range and timestep window."""
        from ..caches.pab import BroadcastGroup, PyramidAttentionBroadcast

        if self.config.pab_groups:
            groups = [BroadcastGroup(g.pattern, g.range_) for g in self.config.pab_groups]
        else:
            groups = [BroadcastGroup(self.target.attention, self.config.pab_range)]
        return PyramidAttentionBroadcast(groups, timesteps=tuple(self.config.pab_timesteps), reset_steps=reset_steps,
                                         reset_on_resume=bool(reset_steps))

    def _check_pab_patterns(self) -> None:
        """At the first generation call, before any run: every PAB pattern names modules of the model."""
        if not PAB_METHODS & set(self.config.methods):
            return
        from ..caches.pab import PABPatternError, module_names, modules_matching, name_examples

        patterns = ([(f"pab_groups[{i}].pattern", g.pattern) for i, g in enumerate(self.config.pab_groups)]
                    if self.config.pab_groups else [("methods", self.target.attention)])
        for key, pattern in patterns:
            try:
                modules_matching(self.model, pattern, key)
            except PABPatternError:
                raise ConfigError(self.config.source, key, f"{pattern!r} matches no module of the "
                                  f"{type(self.model).__name__} this script runs (names look like "
                                  f"{name_examples(module_names(self.model))}, ...)") from None

    def _pab_record(self) -> dict:
        """What a PAB run records of its settings."""
        if self.config.pab_groups:
            return {"pab_groups": [{"pattern": g.pattern, "range": g.range_} for g in self.config.pab_groups]}
        return {"pab_range": self.config.pab_range}

    def _method_plan(self, method: str, lut, skips: int):
        """The TaoCache plan ``method`` (one of ``TAO_METHODS``) runs at a budget of ``skips`` steps: the
        error-aware rule for ``taocache-auto``, :meth:`_hybrid_tao_skips` for ``hybrid`` (Algorithm 2)."""
        if method == "hybrid":
            return self._tao_plan(lut, self._hybrid_tao_skips(skips))
        return self._tao_plan(lut, skips, "auto" if method == "taocache-auto" else None)

    def _hybrid_tao_skips(self, skips: int) -> int:
        """TaoCache's skips in the hybrid at a budget of ``skips``: ``hybrid_tao_skips`` (Algorithm 2's input; the
        paper's run: 7) up to the budget, or half the budget."""
        from ..evaluation.methods import hybrid_tao_skips

        return hybrid_tao_skips(skips, self.config.hybrid_tao_skips)

    def _tao_plan(self, lut, skips: int, rule: Optional[str] = None):
        """The TaoCache config's plan for ``skips`` skips (``rule`` overriding its rule), the expert
        switch guarded."""
        from ..taocache.cache import make_plan

        plan_config = dataclasses.replace(self.tao.plan, budget=skips, window=None, skip_steps=None)
        if rule == "auto":  # the error-aware plan on the same LUT
            plan_config = dataclasses.replace(plan_config, rule="auto", refresh_every=None, tau_cos=None,
                                              ratio="calibrated", refresh="chain")
        return make_plan(plan_config, self.loop.steps, self.loop.streams, lut, unskippable=self._expert_guard(lut))

    def _expert_guard(self, lut) -> Tuple[int, ...]:
        """The steps right after Wan2.2's expert switch (none with one model): the run's own timesteps place
        it, else ``lut``'s (a LUT's may be another shift's; the stand-in's are none)."""
        from ..taocache.cache import expert_guard

        return expert_guard(lut, self.expert_boundary, self.run_timesteps) if self.expert_boundary else ()

    def _tea_maker(self, coefficients) -> Callable[..., List[Callback]]:
        """``make(threshold, max_step=None)``: TeaCache's callbacks, the authors' own where the target
        publishes them, else the fitted polynomial on the target's proxy."""
        from ..caches.teacache import TeaCacheCallback

        if self.target.tea_published is not None:
            make, self.tea_provenance = self.target.tea_published(dict(self._bound.arguments),
                                                                  self.config.teacache_use_ret_steps)
            return make
        probe = self.target.tea_probe()

        def make(threshold: float, max_step: Optional[int] = None) -> List[Callback]:
            return [TeaCacheCallback(threshold, coefficients, probe=probe, blocks=self.target.blocks,
                                     exit=self.target.exit, max_step=max_step)]
        return make

    def _search(self, prompts: List[PromptEntry]) -> Dict[str, Any]:
        """What a threshold search depends on besides its method and budget."""
        return {"search_prompts": [[e.prompt, e.seed] for e in prompts],
                "search_iterations": self.config.search_iterations}

    def _check_search(self, label: str, known: Dict[str, Any], search: Dict[str, Any]) -> None:
        """A stored threshold matched with other search settings than ``search``: refused, naming the setting."""
        for key, now in search.items():
            was = known.get(key)
            if was == now:
                continue
            what = (f"on other search prompts ({len(was or [])}; this experiment's are its first {len(now)} "
                    "calibration_prompts)" if key == "search_prompts" else f"with {key} = {was!r}, this experiment "
                    f"has {now!r}")
            raise ConfigError(self.config.source, key, f"{self.store.folder} holds the {label} threshold matched "
                              f"{what}; use another output folder (or delete it)")

    def _check_stored_thresholds(self, calibration: List[PromptEntry]) -> None:
        """Thresholds this folder holds for the listed methods, matched with other search settings: refused before
        any run (a folder whose runs were all stored took a changed search_iterations without a word, and
        results.json then reported the setting no run used)."""
        search = self._search(calibration[:self.config.search_prompts])
        stored = _as_rank_zero_has_it(self.store.state("thresholds") or {})
        for label, known in sorted(stored.items()):
            if label.split("@")[0] in self.config.methods:
                self._check_search(label, known, search)

    def _threshold(self, label: str, make: Callable[[float], List[Callback]], prompts: List[PromptEntry],
                   target: float, shared: bool = False) -> Dict[str, float]:
        """The threshold whose skipped fraction on ``prompts`` is closest to ``target`` (bench's search),
        kept in the store. ``shared``: ``make`` does not depend on the budget, so the fractions this method's
        searches at other budgets measured serve this one too (the same generations)."""
        from ..evaluation.methods import match_threshold

        if label in self.thresholds:
            return self.thresholds[label]
        known = _as_rank_zero_has_it((self.store.state("thresholds") or {}).get(label))  # a resumed search
        search = self._search(prompts)
        if known is not None:
            self._check_search(label, known, search)
        if known is None:
            # each measured threshold is kept as it is measured: a killed search replays them, not their generations
            steps_kept = self.store.state("threshold_steps") or {}
            kept = steps_kept.get(label) or {}
            measured = dict(kept.get("fractions") or {}) if kept.get("search") == search else {}
            measured = _as_rank_zero_has_it(measured)
            method = label.split("@")[0]
            if shared:
                for other, entry in steps_kept.items():
                    if other.split("@")[0] == method and other != label and entry.get("search") == search:
                        measured = {**_as_rank_zero_has_it(entry.get("fractions") or {}), **measured}
            most = 13 + self.config.search_iterations  # match_threshold's bracketing and bisection steps, at most
            messages.notice(f"compare: {label}: searching the threshold for {100 * target:.1f}% skipped calls on "
                            f"{len(prompts)} calibration prompts (at most {most} x {len(prompts)} generations"
                            + (f"; {len(measured)} thresholds measured before (here or at another budget), "
                               "kept)" if measured else ")"))
            current: Dict[str, float] = {}
            asked: List[str] = []  # this search's steps

            def make_noted(threshold: float) -> List[Callback]:
                current["threshold"] = threshold
                return make(threshold)

            def measure(callbacks: List[Callback]) -> float:
                key = repr(current["threshold"])
                asked.extend([key] if key not in asked else [])
                if key not in measured:
                    runs = [self.generate(callbacks, entry) for entry in prompts]
                    measured[key] = sum(r.record()["skipped_calls"] for r in runs) / max(1, sum(r.calls for r in runs))
                    self.store.put_state("threshold_steps", {**(self.store.state("threshold_steps") or {}),
                                                             label: {"search": search, "fractions": measured}})
                    messages.notice(f"compare: {label}: threshold {current['threshold']:.6g} skips "
                                    f"{100 * measured[key]:.1f}% (search step {len(asked)}, at most {most})")
                return measured[key]

            threshold, fraction = match_threshold(make_noted, measure, target,
                                                  iterations=self.config.search_iterations,
                                                  what=f"compare: {label}'s threshold",
                                                  tolerance=0.5 / self.loop.steps)  # warns when it misses
            known = _as_rank_zero_has_it({"threshold": threshold, "search_fraction": fraction, **search})
            self.store.put_state("thresholds", {**(self.store.state("thresholds") or {}), label: known})
        self.thresholds[label] = {k: known[k] for k in ("threshold", "search_fraction")}
        return self.thresholds[label]


@contextlib.contextmanager
def intercept_generations(experiment: Experiment) -> Iterator[None]:
    """While active, the first generation call any integration patch wraps runs ``experiment``
    instead, then the script exits with status 0 (``SystemExit``)."""
    from ..launcher.integration import intercepting

    def run(patch: GenerationPatch, bound) -> Any:
        experiment.run(patch, bound)
        raise SystemExit(0)

    with intercepting(run):
        yield
