"""The callback vocabulary of :class:`~taohooks.runtime.hook.DenoiserHook`.

Like Lightning's ``Callback``: every ``on_*`` method is a no-op by default, and a technique
overrides the few it needs. Several callbacks compose on one hook, in order: the calibration
recorder, TaoCache, a PAB reset, TeaCache for the hybrid.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # pragma: no cover
    from .hook import DenoiserHook
    from .loop import CallInfo

__all__ = ["Callback"]


class Callback:
    """Base class for what runs around each denoiser call. All methods are no-ops."""

    #: a check that must see every call, the ones another callback answers (skips) too: runs before the caches
    #: (``TaoCache.attach`` puts it first; the hook stops at the first callback answering a call)
    checks_every_call = False

    def on_attach(self, hook: "DenoiserHook") -> None:
        """The hook was attached to a module (``hook.module``, ``hook.loop`` are set)."""

    def on_detach(self, hook: "DenoiserHook") -> None:
        """The hook is being removed; drop any state and tensors (called in reverse order)."""

    def forward_patches(self) -> list:
        """The :class:`~taohooks.runtime.patching.ForwardPatch` es this callback holds on the model's
        modules, in the order ``on_detach`` restores them; the hook checks that every one can be
        restored before it detaches anything."""
        return []

    def on_sample_start(self, hook: "DenoiserHook", sample: int) -> None:
        """A new generation begins (before its first call). Reset per-sample state here."""

    def on_sample_end(self, hook: "DenoiserHook", sample: int) -> None:
        """The generation made all its declared calls."""

    def on_sample_abort(self, hook: "DenoiserHook", sample: int, reason: str) -> None:
        """The generation stopped before its last call (an exception, or a new sample began).

        Per-sample state is stale afterwards; the next sample starts with ``on_sample_start``.
        """

    def on_before_call(self, hook: "DenoiserHook", call: "CallInfo", args: tuple,
                       kwargs: dict) -> Optional[Any]:
        """Before the model runs. Return an output to use *instead of* calling the model.

        The first callback that returns something other than ``None`` wins; the model is not
        called and later callbacks' ``on_before_call`` are not asked.
        """
        return None

    def on_after_call(self, hook: "DenoiserHook", call: "CallInfo", output: Any) -> None:
        """After the call, with the output the sampler will get (real, or a substitute when
        ``call.computed`` is false)."""
