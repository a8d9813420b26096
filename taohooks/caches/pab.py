"""Pyramid Attention Broadcast (Zhao et al. 2024) inside each denoiser call, as a callback.

Attention modules selected by module-name patterns reuse ("broadcast") their output from the
last step they computed, inside a window of steps (or timesteps). Each group has a broadcast
range: with range ``k`` the module computes at window steps whose offset from the window start is
a multiple of ``k`` and broadcasts in between (PAB_{alpha beta gamma} = ranges of spatial, temporal
and cross attention). Decisions are keyed to the *step index*, so steps that TaoCache skips (no
model call at all) cannot shift them out of phase. State is reset at every generation start and
on the given reset steps (TaoCache's refresh steps, as the paper asks); a call whose attention
modules did not run (TeaCache or MagCache bypassed the blocks) drops that stream's cached outputs,
so that the next computed call does not broadcast attention from before the bypass; in a call where
a per-sample TeaCache runs the blocks on some samples' rows only (``partial``), attention neither
broadcasts nor is cached, and that stream's cache is dropped. On a hook attached to several instances
that share one loop (Wan2.2's high-noise and low-noise experts), the modules of every instance are patched
and their outputs cached per expert: an expert never broadcasts another's attention, and the previous
expert's cache is dropped when the loop moves on to the next.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from ..runtime.callbacks import Callback
from ..runtime.patching import ForwardPatch
from ..runtime.structure import flatten_output

__all__ = ["BroadcastGroup", "PyramidAttentionBroadcast", "PABPatternError", "module_names", "modules_matching"]

# the attribute names wrappers put between a module and its children: FSDP's (per block, as Wan's
# --dit_fsdp wraps them), activation checkpointing's, torch.compile's
WRAPPER_PARTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def module_names(model) -> List[Tuple[str, Any]]:
    """``(name, module)`` of ``model``'s submodules, names as the model's code spells them: wrapper
    segments (:data:`WRAPPER_PARTS`) left out, so that ``blocks.0._fsdp_wrapped_module.self_attn`` is
    ``blocks.0.self_attn``; where a wrapper and what it wraps get one name, the wrapper (the outer)."""
    seen, out = set(), []
    for name, module in model.named_modules():
        plain = ".".join(part for part in name.split(".") if part not in WRAPPER_PARTS)
        if plain and plain not in seen:
            seen.add(plain)
            out.append((plain, module))
    return out


def modules_matching(model, pattern: str, what: str = "pab.groups") -> List[Tuple[str, Any]]:
    """``(name, module)`` of ``model``'s submodules whose :func:`module_names` name fully matches
    ``pattern``; :class:`PABPatternError` (naming ``what``) when none does."""
    named = module_names(model)
    regex = re.compile(pattern)
    matched = [(n, m) for n, m in named if regex.fullmatch(n)]
    if not matched:
        raise PABPatternError(f"PAB pattern {pattern!r} ({what}) matches no module of {type(model).__name__} "
                              f"(names look like {name_examples(named)}, ...)")
    return matched


def name_examples(named: List[Tuple[str, Any]], count: int = 3) -> str:
    """The first ``count`` attention module names of ``named`` (:func:`module_names`; what a pattern usually
    names), else the first names, quoted and comma-separated."""
    attention = [n for n, _ in named if "attn" in n.split(".")[-1].lower()]
    return ", ".join(repr(n) for n in (attention or [n for n, _ in named])[:count])


class PABPatternError(ValueError):
    """A PAB group's pattern matches no module of the model it is attached to."""


@dataclass(frozen=True)
class BroadcastGroup:
    """Modules whose full name matches ``pattern`` (a regex) broadcast with ``broadcast_range``."""

    pattern: str
    broadcast_range: int

    def __post_init__(self):
        if self.broadcast_range < 1:
            raise ValueError(f"PAB broadcast range must be >= 1, got {self.broadcast_range} for {self.pattern!r}")
        re.compile(self.pattern)


def _copy(out: Any) -> Any:
    """``out`` with its floating tensors copied, in its own structure (:mod:`taohooks.runtime.structure`)."""
    leaves, structure = flatten_output(out)
    return structure.rebuild([t.detach().clone() for t in leaves])


class PyramidAttentionBroadcast(Callback):
    """PAB on a hook.

    Args:
        groups: which modules broadcast, and how often they recompute.
        steps: inclusive window ``(first, last)`` of step indices where broadcasting may happen.
        timesteps: or an open window ``(low, high)`` of timestep values (as VideoSys' (100, 800)).
        reset_steps: steps at whose calls the calls' streams' cached outputs are dropped (TaoCache's resume
            steps).
        reset_on_resume: also drop a stream's cached outputs after any call of it that another callback
            answered: TaoCache's skips and, unlike ``reset_steps``, the skips that fell back to a real call
            (the paper resets PAB wherever TaoCache resumes computing).

    Cached outputs are always dropped before a call the hook finds out of line (:meth:`DenoiserHook.in_line`).
    """

    def __init__(self, groups: Sequence[BroadcastGroup], *, steps: Optional[Tuple[int, int]] = None,
                 timesteps: Optional[Tuple[float, float]] = None, reset_steps: Iterable[int] = (),
                 reset_on_resume: bool = False):
        if not groups:
            raise ValueError("PAB needs at least one broadcast group")
        if (steps is None) == (timesteps is None):
            raise ValueError("PAB needs exactly one window: steps=(first, last) or timesteps=(low, high)")
        self.groups = list(groups)
        self.steps, self.timesteps = steps, timesteps
        self.reset_steps = frozenset(int(s) for s in reset_steps)
        self.reset_on_resume = reset_on_resume
        self.broadcasts = 0  # module calls answered from the cache, since attach
        self.module_calls = 0
        self._patches: List[ForwardPatch] = []
        self._cache: Dict[Tuple[int, str, Tuple[str, ...]], Any] = {}  # (expert, module name, streams)
        self._expert = 0  # the expert whose modules ran last
        self._call = None
        self._in_window = False
        self._anchor: Optional[int] = None
        self._module_calls_before, self._partial_seen = 0, False
        self.hook = None
        self._row_caches: list = []

    def on_attach(self, hook) -> None:
        self.hook = hook
        # the block-stack caches on the hook (whose calls may run some samples' rows only), looked up once
        self._row_caches = [cb for cb in hook.callbacks if hasattr(cb, "partial")]
        found = []  # (expert, name, module, range), every expert looked up before anything is patched
        for expert, model in enumerate((hook.module, *getattr(hook, "also", ()))):
            for group in self.groups:
                found += [(expert, name, module, group.broadcast_range)
                          for name, module in modules_matching(model, group.pattern)]
        self._patches = [ForwardPatch(module, self._make_forward(expert, name, broadcast_range))
                         for expert, name, module, broadcast_range in found]
        self.broadcasts = self.module_calls = 0

    def forward_patches(self) -> list:
        return list(reversed(self._patches))

    def on_detach(self, hook) -> None:
        for patch in reversed(self._patches):
            patch.restore()
        self._patches, self._cache, self._call, self.hook = [], {}, None, None

    def on_sample_start(self, hook, sample: int) -> None:
        self._cache, self._expert = {}, 0
        self._anchor = self.steps[0] if self.steps else None  # timestep window: its first step

    def on_sample_end(self, hook, sample: int) -> None:
        self._cache, self._call = {}, None  # (nothing stays on the device between generations)

    def on_sample_abort(self, hook, sample: int, reason: str) -> None:
        self._cache, self._call = {}, None

    def _window(self, call) -> bool:
        if self.steps is not None:
            return self.steps[0] <= call.step <= self.steps[1]
        t = call.timestep
        return t is not None and self.timesteps[0] < t < self.timesteps[1]

    def _drop(self, streams) -> None:
        self._cache = {k: v for k, v in self._cache.items() if k[2] != streams}

    def on_before_call(self, hook, call, args, kwargs):
        if call.step in self.reset_steps:
            self._drop(call.streams)  # this call's streams only: a step's other call may have cached already
        self._call, self._in_window = call, self._window(call)
        self._module_calls_before, self._partial_seen = self.module_calls, False
        if self.timesteps is not None and self._in_window and self._anchor is None:
            self._anchor = call.step
        if (self._in_window and any((call.step - self._anchor) % g.broadcast_range for g in self.groups)
                and any(k[2] == call.streams for k in self._cache) and not hook.in_line(call)):
            self._drop(call.streams)  # cached by another generation (the hook warned)
        return None

    def on_after_call(self, hook, call, output) -> None:
        answered = not call.computed  # by another callback (PAB's phase is kept either way)
        if answered and self.timesteps is not None and self._anchor is None and self._window(call):
            self._anchor = call.step  # a timestep window's phase starts at its first step, called or answered
        if (answered and self.reset_on_resume) or (self._call is call and not answered and (
                self.module_calls == self._module_calls_before  # the blocks were bypassed
                or self._partial_seen)):  # or ran on some samples only
            self._drop(call.streams)
        elif not self._window(call) or (self.steps is not None and call.step >= self.steps[1]):
            self._drop(call.streams)  # outside or at the end of the window: no later call of it broadcasts them
        self._call = None

    def _make_forward(self, expert: int, name: str, broadcast_range: int):
        def make(inner):
            def forward(*args, **kwargs):
                call = self._call
                if call is None:
                    return inner(*args, **kwargs)
                if expert != self._expert:  # the loop moved on to another expert: drop the previous one's outputs
                    self._cache = {k: v for k, v in self._cache.items() if k[0] == expert}
                    self._expert = expert
                self.module_calls += 1
                if any(cb.partial for cb in self._row_caches):
                    self._partial_seen = True
                    return inner(*args, **kwargs)
                key = (expert, name, call.streams)
                if self._in_window and (call.step - self._anchor) % broadcast_range and key in self._cache:
                    self.broadcasts += 1
                    return _copy(self._cache[key])
                out = inner(*args, **kwargs)
                if self._in_window:  # (outside it nothing is broadcast: the window's first step computes)
                    # copies, in and out: a block may change its attention's output in place (a.mul_(gate))
                    self._cache[key] = _copy(out)
                return out
            return forward
        return make
