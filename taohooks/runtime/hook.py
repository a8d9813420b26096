"""A forward hook on one denoiser *instance* that numbers its calls and runs callbacks.

The hook wraps ``module.forward`` as it is at attach time, which may itself already be a
replacement (Wan2.1's sequence-parallel forward, an accelerate offload hook): the class is
never touched. Detaching puts back exactly what was there.

    hook = DenoiserHook(LoopSpec(steps=50, streams=("cond", "uncond")), [recorder])
    with hook.attach(model):
        run_sampling_loop(model)

With ``repeat=True`` a generation begins when the last one has made all its declared calls. A
loop that makes a call more or fewer than declared would shift every later generation; so the
first call of such a generation must run at the timestep the last explicitly started generation
(the first after ``attach`` or ``new_sample()``) began at. A call that does not is *stray*: it
runs the model without callbacks (no caching, no calibration), with a warning, until a call
begins at that timestep again. Timesteps are read once per generation, not per call, except
where a cache is about to reuse something: :meth:`DenoiserHook.in_line` then compares this
generation's calls so far with the reference generation's (a generation that made fewer calls than
declared leaves the next one's first calls numbered as its own last ones). Inside the reference
generation itself, a call at its first timestep again (after others) is where the next began: the
reference is cut there (:func:`restart_index`), and calibration leaves the numbered generation out. If
the next generation begins right where it ended, it was whole (its loop revisits its first timestep, or
two short ones made its calls) and is the reference again. Every generation's calls are compared with
the reference's at its end too, so that a calibration never records one numbered off. A reference begun by
``new_sample()`` is never cut. A generation that began in line, made all its calls and ran at other
timesteps (another shift) becomes the reference when the next generation begins right after it. At the
end of each generation and at each reuse the timesteps are read together (one synchronisation).
"""
from __future__ import annotations

import copy
import sys
import threading
import weakref
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from . import messages
from .callbacks import Callback
from .interrupt import interruption
from .loop import CallInfo, LoopSpec
from .patching import ForwardPatch, wrapped_modules

__all__ = ["DenoiserHook", "get_hook", "TIMESTEP_KWARGS", "timesteps_match", "restart_index"]


def _outside_graph(fn, recursive: bool = True):
    """Keep ``fn`` out of ``torch.compile`` graphs: the hook's bookkeeping (call counters, Python
    callbacks) would otherwise be guarded on and recompile the model at every step. With
    ``recursive=False`` only ``fn``'s own frame is skipped: the model it calls is still compiled."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return fn if disable is None else disable(fn, recursive=recursive)

_HOOK_ATTR = "_taohooks_hook"
TIMESTEP_KWARGS = ("timestep", "timesteps", "t")


def timesteps_match(seen: float, want: float) -> bool:
    """Whether a call's timestep is the expected one (relative tolerance 1e-3, absolute below 1)."""
    return abs(seen - want) <= 1e-3 * max(1.0, abs(want))


#: module -> [(the hook of a wrapper around it, the wrapper's class name), ...]: one per hooked wrapper (two
#: torch.compile wrappers of one model can each have one); weak both ways: a dropped wrapper or hook is forgotten
_HOOKED_WRAPPERS: "weakref.WeakKeyDictionary[nn.Module, List[Tuple[weakref.ref, str]]]" = weakref.WeakKeyDictionary()


def _hooked_wrapper_around(module: nn.Module) -> Optional[str]:
    """The class name of a wrapper around ``module`` whose hook is attached, if any."""
    return next((name for hook, name in _HOOKED_WRAPPERS.get(module, ()) if hook() is not None), None)


def _forget_wrapper(wrapper: nn.Module, hook: "DenoiserHook") -> None:
    """Forget ``hook``'s entries for the modules inside ``wrapper`` (another wrapper's hook keeps its own)."""
    for inner in wrapped_modules(wrapper):
        kept = [(h, name) for h, name in _HOOKED_WRAPPERS.get(inner, ()) if h() is not None and h() is not hook]
        if kept:
            _HOOKED_WRAPPERS[inner] = kept
        else:
            _HOOKED_WRAPPERS.pop(inner, None)


def get_hook(module: nn.Module) -> Optional["DenoiserHook"]:
    """The taohooks hook attached to this module instance, if any."""
    return module.__dict__.get(_HOOK_ATTR)


class _Timestep:
    """The timestep argument of a call, converted to float only when somebody asks.

    Converting a CUDA tensor synchronises; most calls never need the value.
    """

    __slots__ = ("raw",)

    def __init__(self, raw: Any):
        while isinstance(raw, (list, tuple)) and raw:  # (a sampler may refill its list or array in place)
            raw = raw[0]
        if type(raw).__module__ == "numpy" and hasattr(raw, "size"):  # a numpy scalar or array: its largest value
            raw = float(raw.max()) if raw.size else None
        if isinstance(raw, torch.Tensor):
            # the largest value: a per-token timestep (Wan2.2 TI2V) holds 0 on conditioning frames
            flat = raw.detach().reshape(-1)
            raw = flat.amax().reshape(1) if flat.numel() > 1 and not flat.is_meta else flat[:1].clone()
        self.raw = raw

    def value(self) -> Optional[float]:
        raw = self.raw
        if isinstance(raw, torch.Tensor):
            return float(raw.item()) if raw.numel() and not raw.is_meta else None
        if isinstance(raw, (int, float)):
            return float(raw)
        return None


def _values(timesteps: List[Optional["_Timestep"]]) -> List[Optional[float]]:
    """The floats of ``timesteps``: tensors read together, with one synchronisation."""
    def readable(t):
        return isinstance(t.raw, torch.Tensor) and t.raw.numel() and not t.raw.is_meta

    tensors = [t.raw.reshape(-1)[0] for t in timesteps if t is not None and readable(t)]
    read = iter(())
    if tensors:
        device = tensors[0].device
        dtype = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
        read = iter(torch.stack([x.to(device, dtype) for x in tensors]).tolist())
    return [None if t is None else next(read) if readable(t) else t.value() for t in timesteps]


def restart_index(values: List[Optional[float]], first_step_calls: int) -> Optional[int]:
    """Where a new generation began inside these calls' timesteps (of one numbered generation): the first
    call after the first step's ``first_step_calls`` that runs at the first call's timestep again while the
    call before it did not. ``None`` if there is none (or the first timestep is unknown)."""
    if not values or values[0] is None:
        return None
    start = values[0]
    for r in range(max(1, first_step_calls), len(values)):
        now, before = values[r], values[r - 1]
        if (now is not None and before is not None and timesteps_match(now, start)
                and not timesteps_match(before, start)):
            return r
    return None


class DenoiserHook:
    """Numbers the calls of one module instance and runs :class:`Callback` s around them.

    Args:
        loop: the declared shape of one generation (:class:`LoopSpec`).
        callbacks: run in order around every call.
        timestep_arg: where the timestep is in the call: a keyword name, a positional index,
            or ``None`` to look for the keywords ``timestep``, ``timesteps`` or ``t``.
        repeat: when a generation has made all its calls, let the next call start a new one
            (integrations that know the loop restarts). Otherwise such a call is an error, and
            ``new_sample()`` starts each generation.

    ``stray_calls`` counts calls run outside any generation because they did not begin one where
    generations begin (``repeat=True`` only); ``misaligned_generations`` counts such runs of calls.

    ``passthrough``: while True, calls run the module untouched and uncounted, as if no hook were there
    (the integrations set it between their pipelines' calls, so that another pipeline sharing the model, or a
    direct call of it, is not taken for the rest of the last generation).
    """

    def __init__(self, loop: LoopSpec, callbacks: Iterable[Callback] = (), *,
                 timestep_arg: Union[str, int, None] = None, repeat: bool = False):
        if not isinstance(loop, LoopSpec):
            raise TypeError(f"loop must be a LoopSpec, got {type(loop).__name__}")
        self.loop = loop
        self.callbacks: List[Callback] = list(callbacks)
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be taohooks.Callback instances, got {type(cb).__name__}")
        self.timestep_arg = timestep_arg
        self.label_offset = 0  # added to generation numbers in messages (see label)
        self.repeat = repeat
        self.passthrough = False
        self.module: Optional[nn.Module] = None
        self.also: Tuple[nn.Module, ...] = ()  # more instances numbered with ``module`` (attach(module, *also))
        self._patch: Optional[ForwardPatch] = None
        self._patches: List[ForwardPatch] = []
        self._sample = -1             # number of the current (or last) generation
        self._index: Optional[int] = None  # call index inside the active generation
        self._finished = False        # the last generation made all its calls
        self.counts: Dict[str, List[int]] = {}
        self.stray_calls = 0
        self.misaligned_generations = 0
        self._reference: Optional[List[_Timestep]] = None  # timesteps of the last explicit start (repeat)
        self._reference_sample = -1
        self._reference_start: Optional[float] = None
        self._reference_varies: Optional[bool] = None
        self._recording = False
        self._thread: Optional[int] = None  # the thread the active generation runs in
        self._previous: Optional[_Timestep] = None  # timestep of the last call (repeat only)
        self._strays = 0              # stray calls since the last generation ended
        self._out_of_line: Optional[int] = None  # the generation in_line() found out of line
        # repeat only: the timesteps of this generation's calls, and the floats read of them and of the reference's
        self._current: List[Optional[_Timestep]] = []
        self._current_values: List[Optional[float]] = []
        self._reference_values: List[Optional[float]] = []
        self._checked = 0             # calls of this generation found in line (or, in the reference, not restarted)
        self._reference_open = False  # the reference still takes calls: a generation began inside a numbered one
        self._cuttable = True         # the reference may be cut (not begun by new_sample())
        self._cuts = self._cut_at = 0
        self._uncut: Optional[Tuple[List[Optional[_Timestep]], List[Optional[float]]]] = None  # before the cut
        self._candidate: Optional[Tuple[int, List[Optional[_Timestep]], List[Optional[float]]]] = None
        self._first_step_calls = sum(1 for i in range(loop.total_calls) if loop.locate(i)[0] == 0)
        self._timestep_checked = False  # the first call's timestep was read (repeat)
        self.said_unreadable_timestep = False  # the warning below was given (calibration then adds only its part)

    def _refuse_copy(self, what: str):
        name = type(self.module).__name__ if self.module is not None else "model"
        raise RuntimeError(f"taohooks: {what} of a {name} while a taohooks hook is attached to it: the copy would run "
                           "the original's forward and count its calls on the original's hook; detach first "
                           "(hook.detach(), or leave the with-block), then copy or save it (its state_dict needs no "
                           "detaching)")

    def __deepcopy__(self, memo):  # copy.deepcopy(model) copies the hook the model's __dict__ holds
        if self.attached:
            self._refuse_copy("copy.deepcopy")
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():  # (detached: an ordinary copy)
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def __reduce_ex__(self, protocol):  # torch.save(model) / pickle; a detached hook pickles as any object
        if self.attached:
            self._refuse_copy("pickling (torch.save of the whole module)")
        return super().__reduce_ex__(protocol)

    # ------------------------------------------------------------------ attach / detach
    def attach(self, module: nn.Module, *also: nn.Module) -> "DenoiserHook":
        """Wrap ``module.forward`` (the instance's, as it is now). Returns ``self``.

        ``also``: more instances that run the same loop's calls (Wan2.2's two experts: the high-noise
        one for the first steps, the low-noise one for the rest); their calls are numbered with
        ``module``'s, as one generation. Block-stack caches (TeaCache, MagCache) patch the blocks of every
        instance and keep their state per expert; PAB and the TeaCache proxies of Wan2.1 see ``module`` only."""
        if self.module is not None:
            raise RuntimeError(f"taohooks: this hook is already attached to a {type(self.module).__name__}")
        modules = (module, *also)
        for m in modules:
            if not isinstance(m, nn.Module):
                raise TypeError(f"taohooks: can only attach to a torch.nn.Module, got {type(m).__name__}")
            if get_hook(m) is not None:
                raise RuntimeError(
                    f"taohooks: this {type(m).__name__} instance already has a taohooks hook; detach it "
                    "first, or put all callbacks (calibration, TaoCache, PAB, ...) on one hook")
        if len({id(m) for m in modules}) != len(modules):
            raise ValueError("taohooks: the same module was given twice to attach()")
        for m in modules:  # (a hook on torch.compile's wrapper and one on the module it compiles: each call twice)
            around = _hooked_wrapper_around(m)
            if around is not None:
                raise RuntimeError(
                    f"taohooks: this {type(m).__name__} instance is inside a {around} (torch.compile's wrapper, or "
                    "a data-parallel one) that already has a taohooks hook, which would see each of its calls too; "
                    "put all callbacks on one hook")
            for inner in wrapped_modules(m):
                if get_hook(inner) is not None:
                    raise RuntimeError(
                        f"taohooks: the {type(inner).__name__} inside this {type(m).__name__} already has a taohooks "
                        "hook, which would see each of its calls too; put all callbacks on one hook")
                if any(inner is other for other in modules):
                    raise ValueError(
                        f"taohooks: attach() was given this {type(m).__name__} and the {type(inner).__name__} inside "
                        "it: the hook would see each of its calls twice; give one of them")

        def make(inner, expert=0):
            def forward(*args, **kwargs):
                if self.passthrough:
                    return inner(*args, **kwargs)
                call, output = self._before(args, kwargs, expert)
                if call is None:  # a stray call: outside any generation, no callbacks
                    return inner(*args, **kwargs)
                if output is None:
                    try:
                        output = inner(*args, **kwargs)  # the model: compiled, if it is compiled
                    except BaseException as exc:
                        self._fail(call, exc)
                        raise
                return self._after(call, output)
            return _outside_graph(forward, recursive=False)

        for m in modules:  # (before the forward: a copy or a pickle of the module meets the hook first, which says why)
            m.__dict__[_HOOK_ATTR] = self
            for inner in wrapped_modules(m):
                _HOOKED_WRAPPERS.setdefault(inner, []).append((weakref.ref(self), type(m).__name__))
        try:
            self._patches = [ForwardPatch(m, lambda inner, e=i: make(inner, e)) for i, m in enumerate(modules)]
        except BaseException:
            for m in modules:
                m.__dict__.pop(_HOOK_ATTR, None)
                _forget_wrapper(m, self)
            raise
        self._patch = self._patches[0]
        self.module, self.also = module, tuple(also)
        self._reset_bookkeeping()
        attached: List[Callback] = []
        try:
            for cb in self.callbacks:
                cb.on_attach(self)
                attached.append(cb)
        except BaseException:  # a callback refused (bad pattern, a plan it cannot serve): undo everything
            for cb in reversed(attached):
                cb.on_detach(self)
            self._unpatch()
            raise
        return self

    def _unpatch(self) -> None:
        for m, patch in zip((self.module, *self.also), self._patches):
            patch.restore()
            m.__dict__.pop(_HOOK_ATTR, None)
            _forget_wrapper(m, self)
        self.module, self.also, self._patch, self._patches = None, (), None, []

    def detach(self) -> None:
        """Restore the forward(s) that were there at attach time and drop all state."""
        module = self.module
        if module is None:
            return
        ForwardPatch.check_restorable(  # in the order detaching restores them; raises before anything is undone
            [*(p for cb in reversed(self.callbacks) for p in cb.forward_patches()), *self._patches],
            lambda: {id(m): n for root in (module, *self.also) for n, m in root.named_modules()})
        try:
            if self._index is not None:
                if self._index > 0 and sys.exc_info()[0] is None:  # (not while an exception leaves the loop)
                    messages.warning(f"the hook was detached after {self._index} of {self.loop.total_calls} calls of "
                                     f"generation {self.label(self._sample)} ({self.loop.describe()}); is the "
                                     "declared number of steps right?")
                self._abort("the hook was detached")
            for cb in reversed(self.callbacks):  # undo patches in the reverse order of attaching
                cb.on_detach(self)
        finally:
            self._unpatch()

    @property
    def attached(self) -> bool:
        return self.module is not None

    def __enter__(self) -> "DenoiserHook":
        if self.module is None:
            raise RuntimeError("taohooks: use `with hook.attach(module):`, the hook is not attached")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self._index is not None:
            self._abort(f"{interruption(exc) if exc is not None else exc_type.__name__} between model calls")
        self.detach()

    # ------------------------------------------------------------------ generations
    @property
    def sample(self) -> int:
        """Number of the current (or last) generation, from 0; -1 before the first."""
        return self._sample

    @property
    def generation_thread(self) -> Optional[int]:
        """The thread the active generation's model calls run in (``None`` before its first call, or between
        generations)."""
        return self._thread if self._index is not None else None

    def second_thread_message(self) -> str:
        """The refusal of a call from a thread other than the running generation's."""
        return (f"taohooks: this {type(self.module).__name__} is called from a second thread while a generation runs "
                f"in another (at call {self._index} of {self.loop.total_calls}); one hooked model serves one "
                "generation at a time: give each thread its own model instance, or a lock around each generation")

    @property
    def call_index(self) -> Optional[int]:
        """Index of the next call in the active generation, or ``None`` between generations."""
        return self._index

    def new_sample(self) -> None:
        """Begin a new generation now. An unfinished one is aborted (with a warning)."""
        if self._index is not None:
            if self._index > 0:
                messages.warning(
                    f"a new generation began after {self._index} of "
                    f"{self.loop.total_calls} calls of the last one ({self.loop.describe()}); "
                    "is the declared number of steps right?")
            self._abort("a new generation began")
        self._start(explicit=True, by_user=True)

    def end_generation(self, reason: str) -> Optional[int]:
        """End the active generation where it is (its caller's loop returned early: an interrupt): the
        callbacks drop it as an aborted one (``reason`` says why). Returns the calls it had made, or ``None``
        when no generation was active (it made all its calls, or none began)."""
        made = self._index
        if made is not None:
            self._abort(reason)
        return made

    def _reset_bookkeeping(self) -> None:
        self._sample, self._index, self._finished = -1, None, False
        self.counts = {s: [0, 0] for s in self.loop.streams}
        self.stray_calls = self.misaligned_generations = self._strays = 0
        self._reference, self._reference_start, self._recording = None, None, False
        self._reference_varies, self._previous, self._out_of_line = None, None, None
        self._current, self._current_values, self._reference_values, self._checked = [], [], [], 0
        self._reference_open, self._candidate, self._timestep_checked = False, None, False
        self._cuttable, self._uncut = True, None

    def _start(self, explicit: bool, by_user: bool = False) -> None:
        if not explicit and self._candidate is not None:  # began right after it: that schedule is the loop's now
            sample, timesteps, values = self._candidate
            messages.notice(f"generation {self.label(sample)} ran at other timesteps than generation "
                            f"{self.label(self._reference_sample)} and made all its {self.loop.total_calls} calls: the "
                            "generations after it are compared with it")
            self._set_reference(sample, timesteps, values)
        self._candidate = self._uncut = None
        self._sample += 1
        self._index, self._finished, self._strays = 0, False, 0
        self._thread = None  # taken by the generation's first call (new_sample() may run in another thread)
        if explicit and self.repeat:  # later generations must begin where this one does
            self._set_reference(self._sample, [], [])
            # one begun by new_sample() ends where the user says: a call at its first timestep again is its own
            self._cuttable = not by_user
        self._recording = explicit and self.repeat
        self._reference_open = False
        self._current, self._current_values, self._checked = [], [], 0
        for cb in self.callbacks:
            cb.on_sample_start(self, self._sample)

    def _set_reference(self, sample: int, timesteps: List[Optional[_Timestep]], values: List[Optional[float]]) -> None:
        self._reference, self._reference_values, self._reference_sample = timesteps, values, sample
        self._reference_start = self._reference_varies = None
        self._cuts = self._cut_at = 0  # cuts of it (_cut_reference), and where the last one was

    def _abort(self, reason: str) -> None:
        self._index, self._recording = None, False
        for cb in self.callbacks:
            cb.on_sample_abort(self, self._sample, reason)

    def _timestep(self, args: tuple, kwargs: dict) -> Optional[_Timestep]:
        where = self.timestep_arg
        if where is None:
            for key in TIMESTEP_KWARGS:
                if key in kwargs:
                    return _Timestep(kwargs[key])
            return None
        if isinstance(where, int):
            return _Timestep(args[where]) if where < len(args) else None
        return _Timestep(kwargs[where]) if where in kwargs else None

    # ------------------------------------------------------------------ the call
    @_outside_graph
    def _before(self, args: tuple, kwargs: dict, expert: int = 0):
        """Number the call of attached instance ``expert`` and ask the callbacks for a substitute: ``(CallInfo,
        output or None)``; ``(None, None)`` for a stray call."""
        thread = threading.get_ident()
        if self._index is not None and self._thread is not None and thread != self._thread:
            # steps are counted per hook: calls of two threads would interleave into one generation
            raise RuntimeError(self.second_thread_message())
        timestep = self._timestep(args, kwargs)
        if self._index is None:
            if self._finished and not self.repeat:
                raise RuntimeError(
                    f"taohooks: call {self.loop.total_calls + 1} of a generation declared as "
                    f"{self.loop.describe()}: the loop made more calls than declared, or a new generation began "
                    "without new_sample() (after loops that made fewer). Declare the right number of steps, call "
                    "new_sample() before each generation, or attach with repeat=True to start a new generation "
                    "automatically")
            if self._finished and ((self._reference_open and self._continues_reference(timestep))
                                   or self._stray(timestep)):
                self._previous = timestep
                self._candidate = None
                return None, None
            self._start(explicit=not self._finished)
        if self._thread is None:
            self._thread = thread
        if self.repeat:
            self._previous = timestep
            self._current.append(timestep)
            if self._recording:
                self._reference.append(timestep)
            if not self._timestep_checked:  # once per attach (a synchronisation)
                self._timestep_checked = True
                if timestep is None or timestep.value() is None:
                    self._warn_unreadable()
        step, streams = self.loop.locate(self._index)
        call = CallInfo(self._sample, self._index, step, streams, timestep, expert=expert)
        try:
            for cb in self.callbacks:
                output = cb.on_before_call(self, call, args, kwargs)
                if output is not None:
                    call.substituted_by = cb
                    return call, output
        except BaseException as exc:
            self._fail(call, exc)
            raise
        return call, None

    def label(self, sample: int) -> int:
        """Generation ``sample`` (counted from 0 in this attach) as messages number it: from 1, plus
        :attr:`label_offset` (the launcher's generations before this cache attached, so that its warnings and its
        per-generation summary name the same generation)."""
        return sample + 1 + self.label_offset

    def timestep_source(self) -> str:
        """Where the hook reads a call's timestep, in words (for messages)."""
        return (f"the keywords {', '.join(TIMESTEP_KWARGS)}" if self.timestep_arg is None
                else f"timestep_arg={self.timestep_arg!r}")

    def _warn_unreadable(self) -> None:
        self.said_unreadable_timestep = True
        messages.warning(
            f"the hook cannot read the timestep of this {type(self.module).__name__}'s calls (it looked at "
            f"{self.timestep_source()}): "
            "with repeat=True it cannot tell a generation that made fewer or more calls than declared, and would "
            "then cache the wrong steps. Give timestep_arg= (the keyword or the position of the timestep in the call)")

    def in_line(self, call: CallInfo) -> bool:
        """Whether ``call`` runs at the timestep the reference generation (``repeat=True``) ran its call of
        the same index: ask before reusing anything for it. Reads the call's timestep (on a GPU: one
        synchronisation). ``True`` where nothing can be compared (no ``repeat``, the reference generation
        itself, no timestep). A call out of line is warned about once per generation; the callbacks then
        compute it, and the generations after it are realigned as for any loop that makes fewer calls."""
        if self._out_of_line == call.sample:
            return False
        if not self.repeat or call.sample != self._sample or self._reference is None:
            return True
        if call.sample == self._reference_sample:  # the reference itself: did a new generation begin inside it?
            if not self._cuttable:
                return True
            values = self._read(self._reference, self._reference_values, len(self._reference))
            restart = restart_index(values, self._first_step_calls)
            if restart is None:
                return True
            self._cut_reference(restart)
            return False
        return self._calls_in_line(call.index + 1)

    def _calls_in_line(self, calls: int) -> bool:
        """Whether this generation's first ``calls`` calls ran at the reference's timesteps; if not, it is out of
        line (warned, counted). Every call so far: a loop numbered one call off can match at one index."""
        n = min(calls, len(self._reference))
        current = self._read(self._current, self._current_values, n)
        reference = self._read(self._reference, self._reference_values, n)
        for j in range(self._checked, n):
            seen, want = current[j], reference[j]
            if seen is not None and want is not None and not timesteps_match(seen, want):
                self._out_of_line = self._sample
                self.misaligned_generations += 1
                messages.warning(
                    f"call {j} (step {self.loop.locate(j)[0]}) of generation {self.label(self._sample)} ran at "
                    f"timestep {seen:g}, but the same call of generation {self.label(self._reference_sample)} ran at "
                    f"{want:g}: a generation made fewer or more calls than declared ({self.loop.describe()}), or the "
                    "schedule changed; nothing cached is reused until the loop is in line again")
                return False
        self._checked = max(self._checked, n)
        return True

    def generation_out_of_line(self, sample: int) -> bool:
        """Whether generation ``sample`` was found out of line (``repeat=True``): its calls are not numbered as
        its own steps (a generation before it made fewer calls than declared), or ran at other timesteps than
        the reference generation's. A calibration must not record it."""
        return self._out_of_line == sample

    @staticmethod
    def _read(timesteps: List[Optional[_Timestep]], values: List[Optional[float]], n: int) -> List[Optional[float]]:
        """``values``, extended to the floats of the first ``n`` of ``timesteps`` (one synchronisation)."""
        if len(values) < n:
            values.extend(_values(timesteps[len(values):n]))
        return values

    def _cut_reference(self, restart: int) -> None:
        """The reference generation made only ``restart`` calls: the next began at its call ``restart`` (numbered
        with it). That one's calls become the reference (and, through the stray calls that end it, the rest);
        nothing cached is reused in this numbered generation."""
        sample = self._reference_sample
        start = self._reference_values[0]
        self._out_of_line = sample
        self.misaligned_generations += 1
        self._cuts += 1
        self._cut_at += restart  # (the call's number in the numbered generation)
        messages.warning(
            f"call {self._cut_at} of generation {self.label(sample)} runs at timestep {start:g} again, where "
            f"{'the generation' if self._cuts == 1 else 'the last one begun inside it'} began: that one made {restart} "
            f"of the {self.loop.total_calls} declared calls ({self.loop.describe()}) and the next began there; nothing "
            "cached is reused until the loop is in line again")
        self._reference = self._reference[restart:]
        self._reference_values = self._reference_values[restart:]
        self._reference_start = self._reference_varies = None
        again = restart_index(self._reference_values, self._first_step_calls)  # that one stopped early too
        if again is not None:
            self._cut_reference(again)

    def _stray(self, timestep: Optional[_Timestep]) -> bool:
        """Whether a call that would begin a generation automatically is out of line (warned).

        In line: it runs at the timestep the reference generation began at, and (for a loop whose
        timesteps vary) the call before it did not, which would have been this generation's first."""
        reference = self._reference
        if not reference or reference[0] is None:
            return False
        if self._reference_start is None:
            self._reference_start = reference[0].value()
            middle = reference[len(reference) // 2]
            value = middle.value() if middle is not None else None
            self._reference_varies = value is not None and self._reference_start is not None \
                and not timesteps_match(value, self._reference_start)
        want = self._reference_start
        seen = timestep.value() if timestep is not None else None
        if want is None or seen is None:
            return False
        following = self.label(self._sample + 1)
        starts = timesteps_match(seen, want)
        before = self._previous.value() if starts and self._reference_varies and self._previous is not None else None
        early = before is not None and timesteps_match(before, want)  # the last call began this generation
        if starts and not early:
            if self._strays:
                messages.notice(f"generation {following} begins at timestep {want:g}: in line again after "
                                f"{self._strays} uncached call(s)")
            return False
        if self._strays >= self.loop.total_calls and self._restarts(seen):  # the schedule changed: a new reference
            messages.warning(
                f"no call began at timestep {want:g} in the {self._strays} calls after generation "
                f"{self.label(self._sample)}; generation {following} begins at this call (timestep {seen:g}), and the "
                "generations after it must begin where it does")
            self._finished = False  # an explicit start
            return False
        if not self._strays:
            self.misaligned_generations += 1
            if early:
                what = (f"generation {following} would begin at timestep {seen:g}, but the last call of generation "
                        f"{self.label(self._sample)} ran at that timestep too: it began this generation, and "
                        f"generation {self.label(self._sample)} made fewer calls than declared "
                        f"({self.loop.describe()})")
            else:
                calls = [t.value() if t is not None else None for t in reference]
                where = next((i for i, v in enumerate(calls) if v is not None and timesteps_match(seen, v)), None)
                at = "" if where is None else f" (its timestep at step {self.loop.locate(where)[0]})"
                what = (f"generation {following} would begin at timestep {seen:g}{at}, but generation "
                        f"{self.label(self._reference_sample)} began at {want:g}: the previous generation made more "
                        f"or fewer calls than declared ({self.loop.describe()})")
            messages.warning(f"{what}. Calls run uncached until one begins at timestep {want:g}")
        self._strays += 1
        self.stray_calls += 1
        return True

    def _continues_reference(self, timestep: Optional[_Timestep]) -> bool:
        """A call after a numbered generation inside which the reference's generation began (it is cut): the
        reference's next call, run uncached, unless it begins a generation (the first timestep again after
        another one: that generation was short too, and the reference stays as it is)."""
        seen = timestep.value() if timestep is not None else None
        before = self._previous.value() if self._previous is not None else None
        start = self._reference_values[0] if self._reference_values else None
        at_start = seen is not None and start is not None and timesteps_match(seen, start)
        if at_start and before is not None and not timesteps_match(before, start):  # a generation begins here
            self._reference_open = False
            if not self._strays:  # at once: the cut generation was whole
                self._restore_uncut()
            return False
        uncut = self._uncut[1] if self._uncut is not None else []
        j = len(self._reference)
        if at_start and j < len(uncut) and uncut[j] is not None and not timesteps_match(seen, uncut[j]):
            # the first timestep where the generation that was cut had another one: it was whole (it ended at its
            # first timestep), and a generation begins here
            self._reference_open = False
            self._restore_uncut()
            return False
        self._reference.append(timestep)
        self._reference_open = len(self._reference) < self.loop.total_calls
        self._strays += 1
        self.stray_calls += 1
        return True

    def _restore_uncut(self) -> None:
        """The generation cut by :meth:`_cut_reference` made all its calls after all (it returned to its first
        timestep): it is the reference again."""
        if self._uncut is None:
            return
        timesteps, values = self._uncut
        self._uncut = None
        self.misaligned_generations = max(0, self.misaligned_generations - self._cuts)
        messages.notice(f"generation {self.label(self._sample)} made all its {self.loop.total_calls} calls after all "
                        "(its loop returns to its first timestep): it is the reference again")
        self._set_reference(self._sample, timesteps, values)

    def _restarts(self, seen: float) -> bool:
        """Whether a loop can begin at a call at timestep ``seen``: its timestep moves against the reference's
        direction from the call before (a decreasing schedule that rises), or that cannot be told."""
        before = self._previous.value() if self._previous is not None else None
        middle = self._reference[len(self._reference) // 2] if self._reference else None
        middle, start = (middle.value() if middle is not None else None), self._reference_start
        if before is None or middle is None or start is None or timesteps_match(middle, start):
            return True
        return (seen - before) * (middle - start) < 0 and not timesteps_match(seen, before)

    @_outside_graph
    def _fail(self, call: CallInfo, exc: BaseException) -> None:
        self._abort(f"{interruption(exc)} in call {call.index} (step {call.step})")

    @_outside_graph
    def _after(self, call: CallInfo, output: Any) -> Any:
        try:
            for cb in self.callbacks:
                cb.on_after_call(self, call, output)
        except BaseException as exc:
            self._fail(call, exc)
            raise
        column = 0 if call.substituted_by is None else 1
        for s in call.streams:
            self.counts[s][column] += 1
        self._index += 1
        if self._index == self.loop.total_calls:
            if self.repeat:
                self._check_ended_generation()
            self._index, self._finished, self._recording = None, True, False
            for cb in self.callbacks:
                cb.on_sample_end(self, self._sample)
        return output

    def _check_ended_generation(self) -> None:
        """At the last call of a generation (``repeat=True``; one synchronisation): the reference generation is
        searched for a generation that began inside it (:meth:`_cut_reference`); a later one is compared with the
        reference (:meth:`_calls_in_line`), and one out of line that began where the reference did and holds no
        restart is a complete generation on another schedule, the reference from the next generation on if that
        one begins right after it."""
        sample = self._sample
        if sample == self._reference_sample:
            self._recording = False
            if self._cuttable:  # (also after a cut at a reuse: the generation that began there may have stopped too)
                values = self._read(self._reference, self._reference_values, len(self._reference))
                restart = restart_index(values, self._first_step_calls)
                if restart is not None:
                    self._cut_reference(restart)
            # cut (now or at a reuse): the rest of the generation that began inside it comes as stray calls, unless
            # the next generation begins at once (then this one was whole, and returned to its first timestep)
            cut = self._out_of_line == sample and len(self._reference) < self.loop.total_calls
            self._reference_open = cut
            self._uncut = (self._current, self._read(self._current, self._current_values, len(self._current))) \
                if cut else None
            return
        if self._out_of_line != sample and self._calls_in_line(len(self._current)):
            return  # (compared at its end too: a calibration, which reuses nothing, must not record it numbered off)
        values = self._read(self._current, self._current_values, len(self._current))
        start = self._read(self._reference, self._reference_values, 1)
        first = values[0] if values else None
        if (first is not None and start and start[0] is not None and timesteps_match(first, start[0])
                and not any(v is not None and timesteps_match(v, first) for v in values[self._first_step_calls:])):
            # (a generation that runs at its first timestep again after its first step may be two, misnumbered)
            self._candidate = (sample, self._current, values)
