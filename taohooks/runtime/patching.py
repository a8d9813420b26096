"""Replacing the forward of one module *instance*, and putting back exactly what was there.

Like accelerate's ``add_hook_to_module``: the class is never touched, and a forward that is
already an instance attribute (Wan2.1's sequence-parallel forward, an offload hook) is wrapped,
not bypassed.
"""
from __future__ import annotations

import functools
from typing import Callable, List

from torch import nn

__all__ = ["ForwardPatch", "unwrap_model", "wrapped_modules"]

#: wrappers whose forward calls the wrapped module's ``__call__`` (``.module``)
MODULE_WRAPPERS = ("FullyShardedDataParallel", "DistributedDataParallel", "DataParallel")


def unwrap_model(model: nn.Module, compiled: bool = False) -> nn.Module:
    """The module inside wrappers that forward to ``.module`` (FSDP, DDP, DataParallel), and with ``compiled``
    inside ``torch.compile``'s (``._orig_mod``: what a model *is*, where the module to hook is the compiled one).

    FSDP's forward calls the wrapped module's ``__call__``, which honours an instance forward
    (Wan's sequence-parallel one, ours), so hooking the inner module is exact."""
    inside = wrapped_modules(model, compiled)
    return inside[-1] if inside else model


def wrapped_modules(model: nn.Module, compiled: bool = True) -> List[nn.Module]:
    """The modules inside ``model``'s wrappers, outermost first (``[]`` for a module that wraps none): what a
    ``torch.compile`` wrapper (with ``compiled``), FSDP, DDP or DataParallel calls."""
    inside: List[nn.Module] = []
    while True:
        name = type(model).__name__
        inner = getattr(model, "module", None) if name in MODULE_WRAPPERS else (
            getattr(model, "_orig_mod", None) if compiled and name == "OptimizedModule" else None)
        if not isinstance(inner, nn.Module) or any(inner is m for m in inside):
            return inside
        inside.append(inner)
        model = inner


class ForwardPatch:
    """``module.forward = make(current_forward)``, undone by :meth:`restore`.

    ``make`` receives the forward as it is now (a bound method or an instance attribute) and
    returns the replacement; the replacement gets the wrapped one's name, docstring and
    ``__wrapped__`` (so ``inspect.signature`` still shows the real arguments).
    """

    def __init__(self, module: nn.Module, make: Callable[[Callable], Callable]):
        self.module = module
        self._had_instance_forward = "forward" in module.__dict__
        self._original = module.__dict__.get("forward")
        inner = module.forward
        self.wrapper = functools.update_wrapper(make(inner), inner)
        module.forward = self.wrapper

    @property
    def active(self) -> bool:
        return self.module is not None

    @staticmethod
    def check_restorable(patches, names=None) -> None:
        """Raise unless restoring ``patches`` in this order puts every original back: each one's wrapper
        must be the module's forward by the time its turn comes (nobody else wrapped it after us).
        ``names``: a callable giving ``id(module) -> name``, for the message. Nothing is changed."""
        current = {}  # id(module) -> the forward once the patches before have been restored
        for patch in patches:
            module = patch.module
            if module is None:
                continue
            forward = current.get(id(module), module.__dict__.get("forward"))
            if forward is not patch.wrapper:
                name = names().get(id(module), "") if names is not None else ""
                raise RuntimeError(
                    f"taohooks: {type(module).__name__}{f' ({name})' if name else ''}.forward was replaced after "
                    "taohooks attached; detach that wrapper first (hooks must be removed in the reverse order of "
                    "attaching); nothing was detached")
            current[id(module)] = patch._original if patch._had_instance_forward else None

    def restore(self) -> None:
        """Put the original forward back; refuses if someone wrapped it again on top of us."""
        module = self.module
        if module is None:
            return
        ForwardPatch.check_restorable([self])
        if self._had_instance_forward:
            module.forward = self._original
        else:
            del module.__dict__["forward"]
        self.module = self._original = None
