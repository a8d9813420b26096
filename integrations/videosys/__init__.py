"""TaoCache in VideoSys' Latte and Open-Sora-Plan pipelines, with their PAB: ``integration: videosys``.

    from videosys import LatteConfig, VideoSysEngine
    engine = VideoSysEngine(LatteConfig(enable_pab=True))
    video = engine.generate(prompt, num_inference_steps=50).video[0]

    taocache-run my_videosys_script.py --taocache configs/videosys_latte.yaml

What it patches: ``generate`` of ``LattePipeline`` (``videosys.pipelines.latte.pipeline_latte``)
and ``OpenSoraPlanPipeline`` (``videosys.pipelines.open_sora_plan.pipeline_open_sora_plan``).
The loop is the Latte one: one batched (uncond, cond) call per scheduler timestep (Open-Sora-Plan
v110's default PNDM scheduler makes ``N + 9`` calls). ``VideoSysEngine`` builds the pipelines of
ranks 1..N-1 in ``spawn`` workers: they get the integration from the ``.pth`` autoload
(``taocache autoload install``; the launcher sets ``TAOHOOKS_CONFIG`` for them).

VideoSys' PAB keeps state that whole skipped calls would put out of phase: per-block counters and
cached attention outputs, and the MLP-broadcast outputs keyed by timestep. It is reset at every
generation start and on every step that resumes computing after TaoCache skipped. A skip window
that would skip a call at (or inside the reuse range of) an MLP-broadcast key timestep is refused
unless MLP broadcast is off: the outputs VideoSys expects there would never be stored.
"""
from __future__ import annotations

import copy
import sys
from typing import Any, Callable, Iterable, List, Optional

from taohooks.runtime.callbacks import Callback
from taohooks.config import TaoCacheConfig
from taohooks.launcher.integration import (GenerationPatch, IntegrationError, PatchSet, batched_cfg_loop, identity_of_pipeline,
                                  require_modules)
from taohooks.runtime.reset import StateReset
from taohooks.taocache.cache import TaoCache

__all__ = ["install", "uninstall", "PIPELINES", "reset_pab_state", "MLPBroadcastGuard", "pab_manager"]

PIPELINES = {
    "videosys.pipelines.latte.pipeline_latte": "LattePipeline",
    "videosys.pipelines.open_sora_plan.pipeline_open_sora_plan": "OpenSoraPlanPipeline",
}
# Where the PAB manager module lives: HEAD, and v2.0.0/v2.0.1.
PAB_MODULES = ("videosys.core.pab.pab_mgr", "videosys.core.pab_mgr")
# Per-block PAB state (Latte and Open-Sora-Plan v110 blocks; "spatila" is VideoSys' own spelling).
COUNTERS = ("spatial_count", "cross_count", "count", "mlp_count", "temp_mlp_count", "spatila_mlp_count")
CACHES = ("spatial_last", "cross_last", "last_out")

_patches = PatchSet()


def pab_manager() -> Optional[Any]:
    """VideoSys' global ``PAB_MANAGER`` (``None`` when PAB was never enabled)."""
    for name in PAB_MODULES:
        module = sys.modules.get(name)
        if module is not None:
            return getattr(module, "PAB_MANAGER", None)
    return None


def reset_pab_state(transformer) -> None:
    """Zero VideoSys' PAB block counters, drop their cached outputs and the MLP-broadcast outputs.

    A counter of 0 means "compute" in VideoSys, so the cached outputs can be dropped safely."""
    for module in transformer.modules():
        for name in COUNTERS:
            if isinstance(getattr(module, name, None), int):
                setattr(module, name, 0)
        for name in CACHES:
            if hasattr(module, name):
                setattr(module, name, None)
    manager = pab_manager()
    config = getattr(manager, "config", None)
    for name in ("mlp_spatial_outputs", "mlp_temporal_outputs"):
        outputs = getattr(config, name, None)
        if isinstance(outputs, dict):
            outputs.clear()


def _mlp_ranges(config, timesteps: List[int]) -> List[tuple]:
    """``(key timestep, covered timesteps)`` of every MLP-broadcast key in this run's timesteps."""
    ranges = []
    for table in (getattr(config, "mlp_spatial_broadcast_config", None),
                  getattr(config, "mlp_temporal_broadcast_config", None)):
        for key, spec in (table or {}).items():
            if key in timesteps:
                i = timesteps.index(key)
                ranges.append((key, timesteps[i:i + 1 + int(spec.get("skip_count", 0))]))
    return ranges


def mlp_broadcast_steps(timesteps: List[int]) -> List[int]:
    """The steps (indices into ``timesteps``) at which VideoSys' MLP broadcast stores or reuses an output: a plan
    chosen from a budget leaves them computed (``TaoCache.attach(unskippable=...)``); none when it is off."""
    config = getattr(pab_manager(), "config", None)
    if config is None or not getattr(config, "mlp_broadcast", False):
        return []
    covered = {t for _, ts in _mlp_ranges(config, timesteps) for t in ts}
    return [s for s, t in enumerate(timesteps) if t in covered]


class MLPBroadcastGuard(Callback):
    """Refuses a plan that skips a call VideoSys' MLP broadcast stores or reads an output at (an explicit window or
    skip list: a budget's plan is chosen around them)."""

    def __init__(self, timesteps: Callable[[], List[int]], source: Optional[str] = None):
        self.timesteps, self.source = timesteps, source

    def on_attach(self, hook) -> None:
        from taohooks.taocache.extrapolation import TaoCacheCallback

        manager = pab_manager()
        config = getattr(manager, "config", None)
        if config is None or not getattr(config, "mlp_broadcast", False):
            return
        plans = [cb.plan for cb in hook.callbacks if isinstance(cb, TaoCacheCallback)]
        if not plans or not plans[0].skipped_steps:
            return
        timesteps = self.timesteps()
        skipped = {timesteps[s] for s in plans[0].skipped_steps if s < len(timesteps)}
        for key, covered in _mlp_ranges(config, timesteps):
            hit = sorted(skipped.intersection(covered), reverse=True)
            if hit:
                steps = [timesteps.index(t) for t in covered]  # (the user's plan is in steps, VideoSys' in timesteps)
                last = max(mlp_broadcast_steps(timesteps))
                where = f" in {self.source}" if self.source else ""
                raise IntegrationError(
                    f"taohooks: the TaoCache plan ({plans[0].describe()}) skips step {timesteps.index(hit[0])} "
                    f"(timestep {hit[0]}), where VideoSys' MLP broadcast stores or reuses an output (key timestep "
                    f"{key}, covering steps {steps[0]}-{steps[-1]}, timesteps {covered}). Move plan.window or "
                    f"plan.skip_steps{where} after step {last} (or use plan.budget, whose plan leaves these steps "
                    "computed), or turn MLP broadcast off (pab_config.mlp_broadcast = False)")


def _timesteps_of(pipe, steps: int) -> Callable[[], List[int]]:
    def timesteps() -> List[int]:
        probe = copy.deepcopy(pipe.scheduler)
        probe.set_timesteps(int(steps))
        return [int(t) for t in probe.timesteps]
    return timesteps


def _loop(arguments):
    pipe = arguments["self"]
    loop, kwargs = batched_cfg_loop(pipe.scheduler, arguments["num_inference_steps"], arguments["guidance_scale"])
    avoid = mlp_broadcast_steps(_timesteps_of(pipe, arguments["num_inference_steps"])())
    return loop, ({**kwargs, "unskippable": tuple(avoid)} if avoid else kwargs)  # (the shipped config's budget
    # plan hit them: refused after calibration)


def _callbacks_of(config: TaoCacheConfig):
    def callbacks(arguments, transformer) -> Iterable[Callback]:
        pipe = arguments["self"]
        return [MLPBroadcastGuard(_timesteps_of(pipe, arguments["num_inference_steps"]), config.source),
                StateReset(lambda: reset_pab_state(transformer))]
    return callbacks


def _patch(module, class_name: str, config: TaoCacheConfig):
    cls = getattr(module, class_name, None)
    if cls is None:
        return None
    return GenerationPatch(cls, "generate", lambda arguments: TaoCache(config),
                           lambda arguments: arguments["self"].transformer, _loop, callbacks_of=_callbacks_of(config),
                           identity_of=lambda arguments, model: identity_of_pipeline(arguments["self"], model),
                           prompt_arg="prompt").install()


def install(config: TaoCacheConfig) -> None:
    """Patch VideoSys' Latte and Open-Sora-Plan pipelines when (or if already) imported; idempotent."""
    if _patches.installed:
        return
    if config.pab is not None:
        raise IntegrationError(f"{config.source}: pab: VideoSys pipelines have their own PAB (enable_pab=True, "
                               "pab_config=...); taohooks resets its state on refresh steps. Remove the pab: section")
    require_modules("videosys", ["videosys"], "install VideoSys from its checkout: pip install -e .")
    _patches.installed = True
    for module_name, class_name in PIPELINES.items():
        _patches.on_import(module_name, lambda module, c=class_name: _patch(module, c, config))


def uninstall() -> None:
    _patches.uninstall()
