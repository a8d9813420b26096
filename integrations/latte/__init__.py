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

from taohooks.config import TaoCacheConfig
from taohooks.integration import GenerationPatch, PatchSet, batched_cfg_loop, require_modules
from taohooks.taocache import TaoCache

__all__ = ["install", "uninstall", "MODULE", "PIPELINE"]

MODULE, PIPELINE = "pipeline_latte", "LattePipeline"

_patches = PatchSet()


def _loop(arguments):
    pipe = arguments["self"]
    # The pipelines accept `timesteps=` but always call scheduler.set_timesteps(num_inference_steps).
    return batched_cfg_loop(pipe.scheduler, arguments["num_inference_steps"], arguments["guidance_scale"])


def patch_pipeline(cls, config: TaoCacheConfig, callbacks_of=None) -> GenerationPatch:
    """Wrap ``cls.__call__`` (a Latte-style pipeline) for TaoCache; shared with ``opensora_plan``."""
    patch = GenerationPatch(cls, "__call__", lambda arguments: TaoCache(config), lambda a: a["self"].transformer, _loop,
                            callbacks_of=callbacks_of, prompt_arg="prompt")
    return patch.install()


def install(config: TaoCacheConfig) -> None:
    """Patch ``pipeline_latte.LattePipeline`` when (or if already) imported; idempotent."""
    if _patches.installed:
        return
    require_modules("latte", [MODULE], "run sample/sample_t2x.py of a Latte checkout: its folder holds pipeline_latte.py")
    _patches.installed = True
    _patches.on_import(MODULE, lambda module: patch_pipeline(getattr(module, PIPELINE), config))


def uninstall() -> None:
    _patches.uninstall()
