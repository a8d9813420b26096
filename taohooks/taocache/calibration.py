"""Calibration (Algorithm 1, lines 1-20): record the statistics of consecutive output deltas.

During full-step generations, per stream and per prompt (batch element)::

    D_t     = eps_t - eps_{t-1}                          (t >= 1, in call order)
    c_t     = <D_t, D_{t-1}> / (||D_t|| ||D_{t-1}||)     (t >= 2)
    r_t     = ||D_t|| / ||D_{t-1}||

and accumulate mean and std of ``c_t`` and ``r_t`` over prompts into a :class:`CalibrationLUT`.
With ``error_horizon = H > 0`` (the default, :data:`~taohooks.taocache.delta_gram.DEFAULT_HORIZON`) it also
keeps, per prompt, the products ``<D_t, D_{t-j}>`` for ``j <= H`` (:mod:`taohooks.taocache.delta_gram`), from
which the error-aware planner predicts the error of any schedule; this holds the last ``H`` deltas
of each stream in memory (on the outputs' device) during the generation.

Only complete generations count: a generation's statistics are staged and join the LUT when its
last call returns (``on_sample_end``). One that stops early (an exception, a new sample, detach),
whose outputs are not finite, or whose timesteps differ from the ones already recorded is left out,
with a warning for the last two. Statistics are sums, so several processes calibrating the same
file merge: :meth:`CalibrationRecorder.flush` re-reads the file under a lock and adds what this
recorder has that the file does not.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..runtime import messages
from ..runtime.callbacks import Callback
from .delta_gram import DEFAULT_HORIZON, DeltaGram, DeltaRing, flatten_per_prompt
from ..runtime.io import atomic_write_bytes, locked
from ..runtime.loop import LoopSpec
from .lut import (CalibrationLUT, LUTMismatchError, first_timestep_difference, merge_problem, shared_prompts,
                  unrecorded_prompts)
from .identity import comparable, recorded_the_wrapper
from .lut_format import check_identity
from .stats import RunningMoments
from ..runtime.structure import flatten_output, float32_leaves, split_batch

__all__ = ["CalibrationRecorder", "delta_statistics", "shape_change"]


def _per_prompt(t: Tensor, batch_dim: Optional[int]) -> Tensor:
    return t.reshape(1, -1) if batch_dim is None else t.reshape(t.shape[0], -1)


def delta_statistics(delta: List[Tensor], delta_prev: List[Tensor],
                     batch_dim: Optional[int] = 0) -> Tuple[Tensor, Tensor]:
    """Cosine similarity and norm ratio ``||D_t|| / ||D_{t-1}||`` per prompt.

    ``delta`` and ``delta_prev`` are lists of float32 leaves of one stream; with ``batch_dim=0``
    every leaf is ``[B, ...]`` and the result is two ``[B]`` tensors, with ``None`` it is ``[1]``.
    All leaves of a prompt count together, as one vector.
    """
    dot = norm_sq = prev_sq = 0
    for d, p in zip(delta, delta_prev):
        d, p = _per_prompt(d, batch_dim), _per_prompt(p, batch_dim)
        dot = dot + (d * p).sum(dim=1)
        norm_sq = norm_sq + d.square().sum(dim=1)
        prev_sq = prev_sq + p.square().sum(dim=1)
    cos = (dot / (norm_sq * prev_sq).sqrt()).clamp(-1.0, 1.0)
    ratio = (norm_sq / prev_sq).sqrt()
    return cos, ratio


def check_batch_leaves(leaves: List[Tensor], call) -> None:
    """With ``batch_dim=0`` every tensor of the output is ``[B, ...]``, one row per prompt, the same ``B``: a leaf
    without it (a 0-d auxiliary loss beside the prediction) is said at the call, naming it, not as an IndexError of
    the statistics."""
    batch = tuple(leaves[0].shape[:1]) if leaves else ()
    for i, leaf in enumerate(leaves):
        if leaf.dim() == 0 or tuple(leaf.shape[:1]) != batch:
            raise ValueError(
                f"taohooks: calibration: output tensor {i} of {len(leaves)} of call {call.index} (step {call.step}) "
                f"has shape {tuple(leaf.shape)}, but the loop declares batch_dim=0: every output tensor must have "
                f"the batch first ({batch[0] if batch else '?'}, as tensor 0 of shape {tuple(leaves[0].shape)}). Give "
                "attach(..., batch_dim=None) to take the whole output as one prompt, or return only the prediction")


class _StreamHistory:
    __slots__ = ("eps", "delta", "earlier")

    def __init__(self, horizon: int = 0, keep: Optional[int] = None):
        self.eps: Optional[List[Tensor]] = None
        self.delta: Optional[List[Tensor]] = None
        self.earlier = DeltaRing(horizon, keep) if horizon else None  # the last deltas, for their products


def shape_change(before: List[Tensor], now: List[Tensor]) -> Optional[str]:
    """How the output's leaves changed between two calls of a stream (their number or shapes), or
    ``None``: deltas between them are not defined."""
    if len(before) != len(now):
        return f"its output has {len(now)} tensor(s), the step before had {len(before)}"
    for i, (a, b) in enumerate(zip(before, now)):
        if a.shape != b.shape:
            where = f" {i}" if len(now) > 1 else ""
            return f"its output tensor{where} has shape {list(b.shape)}, the step before {list(a.shape)}"
    return None


def _moving(delta: List[Tensor], batch_dim: Optional[int]) -> Tensor:
    """Per prompt: whether the delta is not exactly zero."""
    out = None
    for d in delta:
        nonzero = _per_prompt(d, batch_dim).ne(0).any(dim=1)
        out = nonzero if out is None else out | nonzero
    return out


class _Generation:
    """The statistics of the generation in progress, added to the LUT only when it completes."""

    def __init__(self, loop: LoopSpec):
        shape = (len(loop.streams), loop.steps)
        self.cos, self.ratio = RunningMoments.zeros(*shape), RunningMoments.zeros(*shape)
        self.timesteps = torch.full((loop.steps,), float("nan"), dtype=torch.float64)
        self.prompts = 0
        self.calls = 0
        self.bad: Optional[Tuple[str, int, str]] = None  # first (stream, step, what) that was not finite
        self.gram: Optional[Tensor] = None  # [prompts, streams, steps, horizon + 1] (error_horizon > 0)
        self.cross: Optional[Tensor] = None  # [prompts, steps, 2 horizon + 1] (two streams)
        self.numel: List[int] = [0] * len(loop.streams)


def _real_path(path) -> str:
    return os.path.realpath(os.fspath(path))


def _label(hook, sample: int) -> int:
    """Generation ``sample`` as messages number it (:meth:`DenoiserHook.label`; from 1)."""
    label = getattr(hook, "label", None)
    return label(sample) if label is not None else sample + 1


class CalibrationRecorder(Callback):
    """Records delta statistics on every call of full-step generations into a LUT.

    Each batch element of each stream counts as one prompt; a batched-CFG output is split into
    its declared stream halves first. Use :meth:`lut` once the calibration prompts have run, and
    :meth:`flush` to add them to a file (safe when other processes write the same file), or
    :meth:`save` to overwrite a file with :meth:`lut`. Recording continues across generations, and
    across ``attach``-es of the same recorder if the loop stays the same; ``resume`` continues an
    earlier LUT. ``identity`` (a dict of JSON values) is stored in the LUT; not given, it is the attached model's
    (class, architecture fingerprint, dtypes: what ``TaoCache.attach`` records and checks). A LUT continued after
    prompts without a key is not given it: its identity says what all its prompts were calibrated on.
    """

    def __init__(self, model_id: Optional[str] = None, sampler: Optional[str] = None, *,
                 resume: Optional[CalibrationLUT] = None, identity: Optional[Dict[str, Any]] = None,
                 error_horizon: int = DEFAULT_HORIZON):
        if isinstance(error_horizon, bool) or not isinstance(error_horizon, int) or error_horizon < 0:
            raise ValueError(f"taohooks: CalibrationRecorder error_horizon must be an int >= 0 (0: no error "
                             f"statistics), got {error_horizon!r}")
        self.error_horizon = error_horizon
        if error_horizon and resume is not None and resume.num_prompts and resume.deltas is None:
            messages.notice(f"{resume._name()} holds {resume.num_prompts} prompt(s) without delta products (an "
                            "earlier taohooks' LUT, or calibration.error_horizon: 0): the prompts added to it keep "
                            "none either, so plan.rule: auto and calibration.transfer cannot use it; calibrate a new "
                            "LUT file for them", once=f"no deltas {resume.source}")
        self.model_id = model_id
        self.sampler = sampler
        self.identity: Dict[str, Any] = check_identity(dict(identity or {}), "CalibrationRecorder(identity=...)")
        self._identity_of_model = identity is None  # (taken from the model at attach)
        self._known = resume  # everything: the base and the pending generations (never changed in place)
        self._pending: Optional[CalibrationLUT] = None  # complete generations not written by flush yet
        self._base = resume  # what the recorder continues from (a file's contents after a flush)
        self._base_file = _real_path(resume.source) if resume is not None and resume.source else None
        self._loop: Optional[LoopSpec] = None
        self._history: Dict[str, _StreamHistory] = {}
        self._generation: Optional[_Generation] = None
        self._said_no_timesteps = False
        self._said_list = False  # the batch_dim warning of a list output, said once
        self.limit: Optional[int] = None  # prompts after which later generations are not recorded (TaoCache's)
        self.left_out = 0  # prompts the last flush left out: another process had completed the file
        self.recorded = 0  # prompts this recorder's complete generations added (not other writers' of its file)
        # each rank records prompts of its own (data parallel): what it leaves out is said on that rank
        self.every_rank = False

    def on_attach(self, hook) -> None:
        loop = hook.loop
        if self._identity_of_model and getattr(hook, "module", None) is not None:
            from .cache import python_route_identity

            self.identity = python_route_identity(hook.module)
        if self._known is not None and self._known.num_prompts:  # (keys its prompts were not recorded with: left out)
            self.identity = {k: v for k, v in self.identity.items() if k in self._known.identity}
        if self._known is None:
            self._known = CalibrationLUT.empty(loop, self.model_id, self.sampler, self.identity)
        else:
            self._known.check(loop, self.model_id, self.sampler)
            # (a LUT that recorded torch.compile's wrapper: checked as the wrapper of the model attached)
            recorded = comparable(self._known.identity, getattr(hook, "module", None))
            for key in sorted(set(self.identity) & set(recorded)):
                if self.identity[key] != recorded[key]:
                    wrapper = (" (torch.compile's wrapper of a model of another architecture)"
                               if recorded_the_wrapper(recorded) else "")
                    raise LUTMismatchError(
                        f"{self._known._name()} was calibrated with {key} {self._known.identity[key]!r}{wrapper}, this "
                        f"run has {self.identity[key]!r}: an unfinished LUT is continued at the values it began with "
                        "(calibration.accept lets a complete LUT serve runs at other values; one LUT never mixes "
                        f"two): finish it at {key} {self._known.identity[key]!r}, or give this run a lut: of its own")
            self._known = dataclasses.replace(self._known, identity={**recorded, **self.identity})
        if self._pending is None:
            self._pending = _empty_like(self._known, self.identity)
        self._loop = loop

    def on_sample_start(self, hook, sample: int) -> None:
        if self.limit is not None and self._known is not None and self._known.num_prompts >= self.limit:
            self._history, self._generation = {}, None  # complete: the LUT takes no more prompts
            return
        # with two streams each keeps one delta more: the other stream's delta of a step may come after its own
        keep = self.error_horizon + 1 if len(hook.loop.streams) == 2 else None
        self._history = {s: _StreamHistory(self.error_horizon, keep) for s in hook.loop.streams}
        self._generation = _Generation(hook.loop)

    def on_sample_abort(self, hook, sample: int, reason: str) -> None:
        gen, self._generation, self._history = self._generation, None, {}
        if gen is not None and gen.calls:
            messages.warning(f"calibration: generation {_label(hook, sample)} stopped before its last call ({reason}); "
                             "its statistics were left out of the LUT", every_rank=self.every_rank)

    def on_detach(self, hook) -> None:
        self._history, self._generation = {}, None

    def on_after_call(self, hook, call, output) -> None:
        if not call.computed:
            raise RuntimeError(
                f"taohooks: calibration needs full-step generations, but call {call.index} (step {call.step}) "
                f"was answered by {type(call.substituted_by).__name__}; calibrate without caching")
        loop, gen = hook.loop, self._generation
        if gen is None:  # a callback's on_sample_start failed; nothing sensible to record
            return
        gen.calls += 1
        leaves, _ = flatten_output(output)
        if loop.batch_dim == 0:
            check_batch_leaves(leaves, call)
        leaves = float32_leaves(leaves)
        parts = split_batch(leaves, len(loop.streams)) if loop.split_batch else [leaves]
        step = call.step
        if call.timestep is None and not self._said_no_timesteps:  # said at once: a generation can take minutes
            self._said_no_timesteps = True
            consequence = ("the LUT records none: rule: auto's flow or DDPM sampler weights need them "
                           "(plan.error_weights: uniform does without), and a run's timesteps cannot be compared with "
                           "the LUT's")
            if getattr(hook, "said_unreadable_timestep", False):  # the hook's warning (repeat=True) gave the advice
                messages.warning(f"calibration: for the same reason (no timestep read), {consequence}")
            else:
                messages.warning(
                    f"calibration: the hook cannot read the timestep of the model's calls (it looked at "
                    f"{getattr(hook, 'timestep_source', lambda: 'its arguments')()}), so {consequence}. Give "
                    "timestep_arg= (the keyword or the position of the timestep in the call)")
        if bool(gen.timesteps[step].isnan()):
            timestep = call.timestep
            if timestep is not None:
                gen.timesteps[step] = timestep
        for name, eps in zip(call.streams, parts):
            history = self._history[name]
            s = loop.streams.index(name)
            if step == 0 and s == 0:
                gen.prompts += 1 if loop.batch_dim is None else int(eps[0].shape[0])
                if loop.batch_dim == 0 and isinstance(output, list) and not self._said_list:
                    self._said_list = True  # (Wan's models: one [C, F, H, W] tensor per sample)
                    messages.warning(
                        f"calibration: the model returns a list of {len(eps)} tensor(s) and the loop declares "
                        f"batch_dim=0, so the first dimension of each ({int(eps[0].shape[0])}) counts as prompts and "
                        "indexes them in the statistics; a list of one tensor per sample (Wan's) is declared "
                        "batch_dim=None (attach(..., batch_dim=None), TaoCacheCallback(..., batch_dim=None)): the "
                        "whole output is one prompt")
            if gen.bad is None and not all(bool(torch.isfinite(e).all()) for e in eps):
                gen.bad = (name, step, "its output is not finite (NaN or inf)")
            changed = history.eps is not None and shape_change(history.eps, eps)
            if changed or any(e.numel() == 0 for e in eps):
                if gen.bad is None:
                    gen.bad = (name, step, changed or "its output is empty")
                history.eps, history.delta = eps, None
                if history.earlier is not None:
                    history.earlier.clear()
                continue
            if history.eps is not None:
                delta = [a - b for a, b in zip(eps, history.eps)]
                if self.error_horizon:
                    self._record_products(gen, s, step, delta, history, loop.batch_dim)
                if history.delta is not None:
                    cos, ratio = delta_statistics(delta, history.delta, loop.batch_dim)
                    finite = torch.isfinite(cos) & torch.isfinite(ratio)
                    if gen.bad is None and not bool(finite.all()):
                        # undefined where a delta is exactly zero (dropped, as RunningMoments does);
                        # anything else is an overflow of float32
                        moving = _moving(delta, loop.batch_dim) & _moving(history.delta, loop.batch_dim)
                        if bool((~finite & moving).any()):
                            gen.bad = (name, step, "its statistics overflow float32")
                    gen.cos.add((s, step), cos)
                    gen.ratio.add((s, step), ratio)
                history.delta = delta
            history.eps = eps

    def _record_products(self, gen: _Generation, s: int, step: int, delta: List[Tensor],
                         history: _StreamHistory, batch_dim: Optional[int]) -> None:
        """``<D_t, D_{t-j}>`` for ``j = 0..H`` per prompt into the generation's products; with two streams also
        the products with the other stream's kept deltas (:class:`DeltaGram`'s ``cross``)."""
        h = self.error_horizon
        flat = flatten_per_prompt(delta, batch_dim)
        products = history.earlier.products(flat, step).cpu()  # [B, H + 1]
        steps = gen.timesteps.shape[0]
        if gen.gram is None:
            gen.gram = torch.full((products.shape[0], len(gen.numel), steps, h + 1), float("nan"), dtype=torch.float64)
        if products.shape[0] == gen.gram.shape[0]:
            gen.gram[:, s, step] = products
        gen.numel[s] = flat.shape[1]
        if len(self._history) == 2:
            other = self._history[list(self._history)[1 - s]].earlier  # (in the loop's stream order)
            for their_step, product in other.against(flat):
                first, second = (step, their_step) if s == 0 else (their_step, step)  # <D^0_first, D^1_second>
                if abs(first - second) > h or product.shape[0] != gen.gram.shape[0]:
                    continue
                if gen.cross is None:
                    gen.cross = torch.full((products.shape[0], steps, 2 * h + 1), float("nan"), dtype=torch.float64)
                gen.cross[:, first, h + first - second] = product.cpu()

    def on_sample_end(self, hook, sample: int) -> None:
        gen, self._generation, self._history = self._generation, None, {}
        if gen is None:
            return
        if getattr(hook, "generation_out_of_line", lambda _: False)(sample):  # (repeat=True only)
            # (the hook warned) also where the hook later finds it was whole (a loop that revisits its first
            # timestep): two short generations can look the same, and a spliced generation would corrupt the LUT
            messages.warning(f"calibration: generation {_label(hook, sample)} left out of the LUT: its calls are not "
                             "numbered as its own steps, or ran at other timesteps than the reference generation's",
                             every_rank=self.every_rank)
            return
        if gen.bad is not None:
            name, step, what = gen.bad
            messages.warning(f"calibration: generation {_label(hook, sample)} left out of the LUT: stream {name!r}, "
                             f"step {step}: {what}", every_rank=self.every_rank)
            return
        known = self._known
        t = first_timestep_difference(known.timesteps, gen.timesteps)
        if t is not None:
            messages.warning(f"calibration: generation {_label(hook, sample)} left out of the LUT: step {t} ran at "
                             f"timestep {gen.timesteps[t].item():g}, the LUT's generations at "
                             f"{known.timesteps[t].item():g} (a different sampler, shift or step count?)",
                             every_rank=self.every_rank)
            return
        deltas = None
        if gen.gram is not None and gen.gram.shape[0] == gen.prompts:
            deltas = DeltaGram(gen.gram, tuple(gen.numel), gen.cross)
        # prompts whose outputs never moved (a zero-initialised output layer: every delta exactly zero) record no
        # value; counted apart, so that the file's counts still add up (the loader calls a LUT whose steps hold
        # fewer values than its prompts edited: the prompts recorded before were lost to it)
        still = unrecorded_prompts(gen.prompts, gen.cos.count, gen.ratio.count,
                                   otherwise=gen.prompts if known.steps >= 3 else 0)  # (no statistics before step 2)
        if still:
            messages.warning(f"calibration: generation {_label(hook, sample)}: the outputs of {still} of its "
                             f"{gen.prompts} prompt(s) never changed from one step to the next (every delta exactly "
                             "zero: an output layer at its zero initialisation?), so they add no statistics to the "
                             "LUT; they count as calibration prompts all the same (still_prompts)",
                             every_rank=self.every_rank)
        done = CalibrationLUT(known.streams, known.steps, gen.cos, gen.ratio, gen.timesteps, known.calls_per_step,
                              self.model_id, self.sampler, gen.prompts, identity=dict(self.identity), deltas=deltas,
                              still_prompts=still)
        try:
            known, pending = known.merge(done), self._pending.merge(done)
        except LUTMismatchError as exc:  # checked at attach; never let the last call of a generation raise
            messages.warning(f"calibration: generation {_label(hook, sample)} left out of the LUT: {exc}",
                             every_rank=self.every_rank)
            return
        self._known = dataclasses.replace(known, created=self._known.created, source=self._known.source)
        self._pending = pending
        self.recorded += gen.prompts

    # ------------------------------------------------------------------ results
    def lut(self) -> CalibrationLUT:
        """The statistics of every complete generation, with those it resumed from (or flushed into)."""
        if self._known is None:
            raise RuntimeError("taohooks: the recorder has not been attached to a model yet; nothing recorded")
        return self._known

    @property
    def pending_prompts(self) -> int:
        """Prompts of complete generations that :meth:`flush` has not written yet."""
        return 0 if self._pending is None else self._pending.num_prompts

    def save(self, path) -> None:
        """Overwrite ``path`` with :meth:`lut` (atomically). When other processes may write the same
        file, use :meth:`flush`, which adds to the file instead."""
        self.lut().save(path)

    def flush(self, path) -> CalibrationLUT:
        """Add the complete generations not written yet to the LUT file ``path`` and return its contents.

        Under an exclusive lock on ``path``: read the file if it exists (validated), add the pending
        statistics (and, on the first flush to a new file, those resumed from another file), write
        atomically. The result becomes :meth:`lut` (other writers' prompts included). On an error
        (:class:`~taohooks.runtime.io.FileWriteError`, :class:`~taohooks.taocache.lut.LUTMismatchError`, a corrupt
        file) nothing is lost: the pending statistics stay for the next flush.
        """
        if self._known is None:
            raise RuntimeError("taohooks: the recorder has not been attached to a model yet; nothing recorded")
        path = Path(path)
        pending = self._pending if self._pending is not None else _empty_like(self._known, self.identity)
        with locked(path):
            on_disk = CalibrationLUT.load(path) if path.is_file() else None
            if on_disk is not None:
                if self._loop is not None:
                    on_disk.check(self._loop, self.model_id, self.sampler)
                base = on_disk
                if self._base is not None and self._base_file != _real_path(path) and self._base.num_prompts:
                    both = shared_prompts(on_disk, self._base)
                    if both:  # (a LUT merged in memory from this file: its prompts would count twice)
                        raise LUTMismatchError(
                            f"this recorder resumed {self._base._name()}, which holds {both} of the prompts of "
                            f"{path} already (a merge with it, or a copy): adding it would count them twice; resume "
                            f"from {path} itself (CalibrationLUT.load) and add the other LUT with taocache merge")
                    base = base.merge(self._base)  # resumed from elsewhere: its prompts join this file once
            else:
                base = self._base if self._base is not None else _empty_like(pending, pending.identity)
            self.left_out = 0
            if self.limit is not None and on_disk is not None and on_disk.num_prompts >= self.limit:
                # another process completed the file meanwhile (DDP ranks, concurrent jobs): it stays as it is, so
                # that every process plans from the same LUT (ranks planned apart: DDP walkthrough, 2026-11-27);
                # a file of another run is refused as a merge would refuse it (review, 2026-11-27)
                problem = merge_problem(on_disk, pending, f"LUT {path}", "this run's statistics")
                if problem:
                    raise LUTMismatchError(problem)
                self.left_out = pending.num_prompts
                if pending.num_prompts:
                    messages.notice(f"calibration LUT {path} was completed by another process ({on_disk.num_prompts} "
                                    f"prompts) before this one's last {pending.num_prompts} prompt(s), which are left "
                                    "out: every process plans from the same LUT", every_rank=True)
                merged = on_disk
            else:
                problem = merge_problem(base, pending, f"LUT {path}", "this run's statistics")  # (named: "LUT" was)
                if problem:
                    raise LUTMismatchError(problem)
                merged = dataclasses.replace(base.merge(pending), created=base.created, source=str(path))
                atomic_write_bytes(path, merged.to_bytes())
        self._base, self._base_file = merged, _real_path(path)
        self._known, self._pending = merged, _empty_like(pending, pending.identity)
        return merged


def _zeros(lut: CalibrationLUT) -> RunningMoments:
    return RunningMoments.zeros(len(lut.streams), lut.steps)


def _empty_like(lut: CalibrationLUT, identity: Dict[str, Any]) -> CalibrationLUT:
    return CalibrationLUT(lut.streams, lut.steps, _zeros(lut), _zeros(lut),
                          torch.full((lut.steps,), float("nan"), dtype=torch.float64), lut.calls_per_step,
                          lut.model_id, lut.sampler, identity=dict(identity))
