"""What every integration does: wrap a generation function, attach TaoCache to the model inside it.

An integration names the function that runs one generation (``WanT2V.generate``,
``LattePipeline.__call__``, the testbed's ``sample_flow``), how to find the denoiser instance
and the loop's shape from that call's arguments. :class:`GenerationPatch` then, on every call:

1. finds the denoiser instance (as it is *now*: after a sequence-parallel or FSDP wrapper ran),
2. attaches a :class:`~taohooks.TaoCache` hook to it, or keeps the one attached for the same loop,
3. begins a new generation, runs the original function, and prints a one-line summary.
"""
from __future__ import annotations

import inspect
import sys
import weakref
from typing import Any, Callable, Dict, Tuple

from torch import nn

from .loop import LoopSpec
from .taocache import TaoCache

__all__ = ["GenerationPatch", "IntegrationError"]

Arguments = Dict[str, Any]


class IntegrationError(RuntimeError):
    """An integration cannot be installed (its research repo cannot be imported, ...)."""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class GenerationPatch:
    """Wraps ``owner.name`` (a class or a module attribute) for TaoCache.

    Args:
        owner, name: where the generation function lives.
        make_cache: a fresh :class:`TaoCache` (from the YAML config).
        model_of: the denoiser instance, from the call's bound arguments (``self`` included).
        loop_of: ``(LoopSpec, attach keyword arguments such as timestep_arg)`` from the same.
        log: where the per-generation summary line goes (stderr by default).
    """

    def __init__(self, owner: Any, name: str, make_cache: Callable[[], TaoCache],
                 model_of: Callable[[Arguments], nn.Module],
                 loop_of: Callable[[Arguments], Tuple[LoopSpec, Dict[str, Any]]],
                 log: Callable[[str], None] = _log):
        self.owner, self.name = owner, name
        self.make_cache, self.model_of, self.loop_of, self.log = make_cache, model_of, loop_of, log
        self.original = getattr(owner, name)
        self.signature = inspect.signature(self.original)
        self.caches: "weakref.WeakKeyDictionary[nn.Module, Tuple[TaoCache, LoopSpec]]" = weakref.WeakKeyDictionary()
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
            cache, _ = self.caches.pop(model)
            cache.detach()

    def cache_for(self, model: nn.Module, loop: LoopSpec, attach_kwargs: Dict[str, Any]) -> TaoCache:
        """The cache attached to ``model`` for ``loop``; (re)attached when needed."""
        entry = self.caches.get(model)
        if entry is not None:
            cache, attached_loop = entry
            calibrated = cache.calibrating and cache.recorder.lut().num_prompts >= cache.config.calibration.prompts
            if attached_loop == loop and cache.hook is not None and cache.hook.attached and not calibrated:
                return cache
            cache.detach()
            if calibrated:
                self.log(f"taohooks: calibration complete ({cache.config.calibration.prompts} prompts); "
                         "TaoCache skips from the next generation on")
        cache = self.make_cache()
        cache.attach(model, loop.steps, loop.streams, split_batch=loop.split_batch, batch_dim=loop.batch_dim,
                     **attach_kwargs)
        self.caches[model] = (cache, loop)
        return cache

    def __call__(self, args: tuple, kwargs: dict) -> Any:
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        model = self.model_of(arguments)
        loop, attach_kwargs = self.loop_of(arguments)
        cache = self.cache_for(model, loop, attach_kwargs)
        before = {s: list(c) for s, c in cache.hook.counts.items()}
        cache.new_sample()
        result = self.original(*args, **kwargs)
        self.generations += 1
        self.log(self.summary_line(cache, before))
        return result

    def summary_line(self, cache: TaoCache, before: Dict[str, list]) -> str:
        per_call = len(cache.hook.loop.streams) if cache.hook.loop.split_batch else 1  # a batched call counts per stream
        computed = sum(c[0] - before[s][0] for s, c in cache.hook.counts.items()) // per_call
        saved = sum(c[1] - before[s][1] for s, c in cache.hook.counts.items()) // per_call
        total = computed + saved
        what = "calibrating, all steps computed" if cache.calibrating else cache.plan.describe()
        return (f"taohooks: generation {self.generations}: {saved} of {total} denoiser calls saved "
                f"({100.0 * saved / max(total, 1):.1f}%) [{what}]")

