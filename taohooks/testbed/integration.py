"""The testbed's integration: ``integration: testbed`` in a TaoCache YAML.

Patches ``taohooks.testbed.sampling.sample_flow`` and ``sample_eps`` (module attributes, looked
up at call time by ``sampling.sample``) the way the Wan and Latte integrations patch
``WanT2V.generate`` and ``LattePipeline.__call__``: the loop's shape comes from the call's
arguments (two calls per step for flow, one batched call for eps; one stream without CFG).
"""
from __future__ import annotations

from ..config import TaoCacheConfig
from ..taocache.identity import model_identity, scheduler_identity
from ..launcher.integration import GenerationPatch, batched_cfg_loop
from ..runtime.loop import LoopSpec
from ..taocache.cache import TaoCache

__all__ = ["install"]

_patches = []


def _flow_loop(arguments):
    streams = ("cond", "uncond") if arguments["guidance"] > 1.0 else ("cond",)
    return LoopSpec(arguments["steps"], streams), {"timestep_arg": 1}


def _eps_loop(arguments):
    from . import sampling

    scheduler = arguments["scheduler"]
    if isinstance(scheduler, str):
        scheduler = sampling.make_eps_scheduler(scheduler)
    # as many calls as the scheduler makes (PNDM's PRK warm-up: N + 9), one batched (uncond, cond) call each
    loop, _ = batched_cfg_loop(scheduler, arguments["steps"], arguments["guidance"])
    return loop, {"timestep_arg": 1}


def _flow_identity(arguments, model):
    return {**model_identity(model), "scheduler": "UniPCMultistepScheduler", "shift": float(arguments["shift"])}


def _eps_identity(arguments, model):
    from . import sampling

    scheduler = arguments["scheduler"]
    if isinstance(scheduler, str):
        scheduler = sampling.make_eps_scheduler(scheduler)
    return {**model_identity(model), **scheduler_identity(scheduler)}


def install(config: TaoCacheConfig) -> None:
    """Patch the testbed samplers; idempotent."""
    from . import sampling

    if _patches:
        return
    for name, loop_of, identity_of in (("sample_flow", _flow_loop, _flow_identity),
                                       ("sample_eps", _eps_loop, _eps_identity)):
        patch = GenerationPatch(sampling, name, lambda arguments: TaoCache(config), lambda a: a["model"], loop_of,
                                identity_of=identity_of, prompt_arg="prompts")
        _patches.append(patch.install())


def uninstall() -> None:
    while _patches:
        _patches.pop().uninstall()
