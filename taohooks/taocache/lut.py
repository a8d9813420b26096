"""The calibration lookup table (Algorithm 1's ``C_cos, S_cos, C_ratio, S_ratio``) and its file.

File format (safetensors, ``format_version`` 1): sufficient statistics, so that two files
merge exactly, and the derived tables for any reader::

    cos_count, ratio_count          int64   [streams, steps]
    cos_sum, cos_sumsq              float64 [streams, steps]
    ratio_sum, ratio_sumsq          float64 [streams, steps]
    cos_mean, cos_std               float32 [streams, steps]   (derived, C_cos / S_cos)
    ratio_mean, ratio_std           float32 [streams, steps]   (derived, C_ratio / S_ratio)
    timesteps                       float64 [steps]            (NaN where unknown)
    delta_gram (format 2, optional) float64 [prompts, streams, steps, horizon + 1]
                                    <D_t, D_{t-j}> per prompt (:mod:`taohooks.taocache.delta_gram`), for the
                                    error-aware planner; metadata ``delta_numel`` (elements per prompt
                                    of each stream's output)
    delta_cross (optional)          float64 [prompts, steps, 2 horizon + 1]
                                    <D^0_t, D^1_{t-j}>, j = -horizon..horizon, between a two-stream LUT's
                                    streams (NaN for prompts recorded without them); for guided error
                                    estimates (plan.guidance_scale). Readers that predate it ignore it

plus the metadata key ``taohooks_lut`` holding a JSON object: format version, model id, steps, calls
per step, stream names, sampler, number of prompts, creation time, and ``identity`` (an object of
what the run was calibrated with, compared by the integration; absent in older files). Step ``t`` counts model calls
per stream from 0; the statistics at ``t`` compare ``D_t = eps_t - eps_{t-1}`` with
``D_{t-1}``, so steps 0 and 1 are always empty.

:meth:`CalibrationLUT.load` validates what it reads (:mod:`taohooks.taocache.lut_format`) and raises
:class:`LUTFormatError` naming the file and the entry; a LUT in memory is what a file can hold.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..runtime.io import atomic_write_bytes, special_file_kind
from ..runtime.loop import LoopSpec
from .identity import comparable, merged_identity
from .lut_format import check_identity
from .delta_gram import DeltaGram
from .stats import RunningMoments

__all__ = ["CalibrationLUT", "LUTMismatchError", "LUTFormatError", "merge_luts", "FORMAT_VERSION"]

FORMAT_VERSION = 3  # 2: the optional delta_gram (a version-1 file has none and loads as is); 3: still_prompts
#: what a LUT without still prompts is written as (readable by the taohooks of format 2)
PLAIN_VERSION = 2
_META_KEY = "taohooks_lut"
PathLike = Union[str, os.PathLike]


class LUTMismatchError(ValueError):
    """A LUT does not fit the run (or the other LUT) it is used with."""


class LUTFormatError(ValueError):
    """A LUT file holds something a calibration cannot produce. The message names the file and entry."""


def _now() -> str:
    """UTC, to the microsecond (it also tells apart two LUTs calibrated within one second)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def merge_problem(a: Any, b: Any, name_a: str, name_b: str) -> Optional[str]:
    """Why the statistics of ``b`` cannot be added to ``a``'s (LUTs, or anything with their ``steps``, ``streams``,
    ``model_id``, ``sampler``, ``identity`` and ``timesteps``: the ranks' headers of
    :func:`~taohooks.runtime.distributed.all_reduce_lut`), or ``None``."""
    if (a.steps, tuple(a.streams)) != (b.steps, tuple(b.streams)):
        return (f"cannot merge {name_b} ({b.steps} steps, streams {', '.join(b.streams)}) into {name_a} ({a.steps} "
                f"steps, streams {', '.join(a.streams)})")
    # (calls_per_step is not compared: a batched-CFG loop and a call per stream record the same per-stream deltas,
    # and every run takes either LUT; a merge refused them: review, 2026-11-29)
    for key in ("model_id", "sampler"):
        x, y = getattr(a, key), getattr(b, key)
        if x is not None and y is not None and x != y:
            return f"cannot merge: {key} is {x!r} in {name_a} and {y!r} in {name_b}"
    identity_a, identity_b = comparable(a.identity), comparable(b.identity)  # (torch.compile's wrapper: not compared)
    for key in sorted(set(identity_a) & set(identity_b)):
        x, y = identity_a[key], identity_b[key]
        if x != y:
            return f"cannot merge: identity {key!r} is {x!r} in {name_a} and {y!r} in {name_b}"
    t = first_timestep_difference(a.timesteps, b.timesteps)
    if t is not None:
        return (f"cannot merge: timestep of step {t} is {a.timesteps[t].item():g} in {name_a} and "
                f"{b.timesteps[t].item():g} in {name_b}")
    return None


@dataclass
class CalibrationLUT:
    """Per-stream, per-step statistics of consecutive output deltas over calibration prompts."""

    streams: Tuple[str, ...]
    steps: int
    cos: RunningMoments
    ratio: RunningMoments
    timesteps: Tensor
    calls_per_step: int = 1
    model_id: Optional[str] = None
    sampler: Optional[str] = None
    num_prompts: int = 0
    created: str = field(default_factory=_now)
    source: Optional[str] = None  # the file it was loaded from, for messages
    identity: Dict[str, Any] = field(default_factory=dict)  # what it was calibrated with (JSON values)
    deltas: Optional[DeltaGram] = None  # products of deltas per prompt (format 2), for plan.rule: auto
    # of num_prompts, those the LUT's fullest step holds no value of (outputs that never moved there: a zero-initialised
    # model); recomputed from the counts at every merge (:func:`unrecorded_prompts`), so that it does not depend on
    # the order or grouping of the generations
    still_prompts: int = 0

    @classmethod
    def empty(cls, loop: LoopSpec, model_id: Optional[str] = None, sampler: Optional[str] = None,
              identity: Optional[Dict[str, Any]] = None) -> "CalibrationLUT":
        shape = (len(loop.streams), loop.steps)
        return cls(tuple(loop.streams), loop.steps, RunningMoments.zeros(*shape), RunningMoments.zeros(*shape),
                   torch.full((loop.steps,), float("nan"), dtype=torch.float64), loop.calls_per_step,
                   model_id, sampler, identity=dict(identity or {}))

    # ------------------------------------------------------------------ the tables
    @property
    def cos_mean(self) -> Tensor:
        """``C_cos`` [streams, steps], NaN where no statistic was recorded."""
        return self.cos.mean

    @property
    def cos_std(self) -> Tensor:
        """``S_cos`` [streams, steps]."""
        return self.cos.std

    @property
    def ratio_mean(self) -> Tensor:
        """``C_ratio`` [streams, steps]: mean of ``||D_t|| / ||D_{t-1}||``."""
        return self.ratio.mean

    @property
    def ratio_std(self) -> Tensor:
        """``S_ratio`` [streams, steps]."""
        return self.ratio.std

    def stream_index(self, name: str) -> int:
        try:
            return self.streams.index(name)
        except ValueError:
            raise LUTMismatchError(f"{self._name()}: no stream {name!r}; it has {', '.join(self.streams)}") from None

    def _name(self) -> str:
        return f"LUT {self.source}" if self.source else "LUT"

    # ------------------------------------------------------------------ checks and merging
    def check(self, loop: LoopSpec, model_id: Optional[str] = None, sampler: Optional[str] = None) -> None:
        """Raise :class:`LUTMismatchError` naming what differs between this LUT and a run."""
        if self.steps != loop.steps:
            from .lut_transfer import carryable  # (it imports this module)

            raise LUTMismatchError(f"{self._name()} has {self.steps} steps, this run has {loop.steps}; "
                                   "calibrate again for this number of steps" + (
                                       " (or carry the LUT over with calibration.transfer: interpolate)"
                                       if carryable(self) else ""))
        if tuple(self.streams) != tuple(loop.streams):
            hint = ""
            if len(loop.streams) < len(self.streams) and set(loop.streams) <= set(self.streams):
                hint = ("; a run without classifier-free guidance (a guidance scale of 1 or less) calls the model "
                        "once per step, without the uncond pass: give such runs a LUT of their own (lut:), "
                        "calibrated at that guidance")
            elif len(loop.streams) > len(self.streams) and set(self.streams) <= set(loop.streams):
                hint = ("; the LUT was calibrated without classifier-free guidance (one call per step) and this run "
                        "guides: give it a LUT of its own (lut:), calibrated with guidance")
            raise LUTMismatchError(f"{self._name()} has streams ({', '.join(self.streams)}), this run has "
                                   f"({', '.join(loop.streams)}){hint}")
        if model_id and self.model_id and model_id != self.model_id:
            raise LUTMismatchError(f"{self._name()} was calibrated on model {self.model_id!r}, this run is "
                                   f"{model_id!r}")
        if sampler and self.sampler and sampler != self.sampler:
            raise LUTMismatchError(f"{self._name()} was calibrated with sampler {self.sampler!r}, this run "
                                   f"uses {sampler!r}")

    def merge(self, other: "CalibrationLUT", drop_error_statistics: bool = False) -> "CalibrationLUT":
        """Statistics of both LUTs together, as if one run had recorded all their prompts.

        The delta products (``plan.rule: auto``'s error statistics) of prompts of both LUTs are kept up
        to the shorter horizon; where one LUT has prompts without them, the result has none. A merge that
        loses this LUT's products that way (``other`` is added to it: a file, a LUT calibrated before) is
        refused (:class:`LUTMismatchError`) unless ``drop_error_statistics``."""
        problem = merge_problem(self, other, self._name(), other._name())
        if problem:
            raise LUTMismatchError(problem)
        cos, ratio = self.cos.merge(other.cos), self.ratio.merge(other.ratio)
        prompts = self.num_prompts + other.num_prompts
        return CalibrationLUT(
            self.streams, self.steps, cos, ratio,
            torch.where(self.timesteps.isnan(), other.timesteps, self.timesteps), self.calls_per_step,
            self.model_id or other.model_id, self.sampler or other.sampler, prompts,
            identity=merged_identity(self.identity, other.identity),
            deltas=_merge_deltas(self, other, drop_error_statistics),
            still_prompts=unrecorded_prompts(prompts, cos.count, ratio.count,
                                             otherwise=self.still_prompts + other.still_prompts))

    # ------------------------------------------------------------------ file
    def metadata(self) -> dict:
        meta = {"format_version": FORMAT_VERSION if self.still_prompts else PLAIN_VERSION,
                "model_id": self.model_id, "steps": self.steps,
                "calls_per_step": self.calls_per_step, "streams": list(self.streams), "sampler": self.sampler,
                "num_prompts": self.num_prompts, "created": self.created, "identity": dict(self.identity)}
        if self.deltas is not None and self.deltas.prompts:
            meta["delta_numel"] = list(self.deltas.numel)
        if self.still_prompts:
            meta["still_prompts"] = self.still_prompts
        return meta

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        tensors = {"timesteps": self.timesteps.to(torch.float64)}
        for name, moments in (("cos", self.cos), ("ratio", self.ratio)):
            tensors[f"{name}_count"] = moments.count
            tensors[f"{name}_sum"] = moments.total
            tensors[f"{name}_sumsq"] = moments.total_sq
            tensors[f"{name}_mean"] = moments.mean.float()
            tensors[f"{name}_std"] = moments.std.float()
        if self.deltas is not None and self.deltas.prompts:
            tensors["delta_gram"] = self.deltas.gram.to(torch.float64)
            if self.deltas.cross is not None:
                tensors["delta_cross"] = self.deltas.cross.to(torch.float64)
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        check_identity(self.identity, self._name())
        return save(tensors, metadata={_META_KEY: json.dumps(self.metadata())})

    def save(self, path: PathLike) -> Path:
        """Write the LUT atomically (an interrupted save leaves the old file intact)."""
        return atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: PathLike) -> "CalibrationLUT":
        """Read and validate a LUT file; :class:`LUTFormatError` names the file and the bad entry."""
        from safetensors import safe_open

        from .lut_format import validate

        path = Path(path)
        if not path.is_file():
            if path.is_dir():
                raise LUTFormatError(f"{path} is a directory, not a calibration LUT file")
            kind = special_file_kind(path)
            if kind is not None:
                raise LUTFormatError(f"{path} is {kind}, not a calibration LUT file")
            if path.is_symlink():
                raise FileNotFoundError(f"calibration LUT {path} does not exist (it is a link to "
                                        f"{os.readlink(path)}, which does not exist)")
            raise FileNotFoundError(f"calibration LUT {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw_meta = (f.metadata() or {}).get(_META_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types
            short = _cut_short(path)
            if short:
                raise LUTFormatError(f"{path} {short}: an incomplete copy or download? Copy it again") from exc
            raise LUTFormatError(f"{path} is not a safetensors file: {exc}") from exc
        if raw_meta is None:
            raise LUTFormatError(f"{path} is a safetensors file but not a taohooks LUT (no '{_META_KEY}' metadata)")
        meta = validate(path, raw_meta, tensors, FORMAT_VERSION)
        moments = {n: RunningMoments(tensors[f"{n}_count"].to(torch.int64), tensors[f"{n}_sum"].to(torch.float64),
                                     tensors[f"{n}_sumsq"].to(torch.float64)) for n in ("cos", "ratio")}
        return cls(tuple(meta["streams"]), meta["steps"], moments["cos"], moments["ratio"],
                   tensors["timesteps"].to(torch.float64), meta.get("calls_per_step", 1), meta.get("model_id"),
                   meta.get("sampler"), meta.get("num_prompts", 0), meta.get("created", ""), source=str(path),
                   identity=dict(meta.get("identity") or {}),
                   deltas=DeltaGram(tensors["delta_gram"].to(torch.float64), tuple(meta["delta_numel"]),
                                    tensors["delta_cross"].to(torch.float64) if "delta_cross" in tensors else None)
                   if "delta_gram" in tensors else None, still_prompts=meta.get("still_prompts", 0))

    # ------------------------------------------------------------------ display
    def table(self) -> str:
        """A text table of ``C_cos ± S_cos`` and ``C_ratio ± S_ratio`` per step and stream."""
        head = f"{'step':>4} {'timestep':>9}"
        for s in self.streams:
            head += f" | {s + ' cos':>17} {s + ' ratio':>17} {'n':>4}"
        lines = [head, "-" * len(head)]
        cm, cs, rm, rs = self.cos_mean, self.cos_std, self.ratio_mean, self.ratio_std
        for t in range(self.steps):
            ts = self.timesteps[t].item()
            row = f"{t:>4} {'-' if math.isnan(ts) else f'{ts:.4g}':>9}"
            for i in range(len(self.streams)):
                n = int(self.cos.count[i, t])
                if n == 0:
                    row += f" | {'-':>17} {'-':>17} {0:>4}"
                else:
                    row += (f" | {cm[i, t]:>8.4f} ±{cs[i, t]:<7.4f} {rm[i, t]:>8.4f} ±{rs[i, t]:<7.4f} {n:>4}")
            lines.append(row)
        return "\n".join(lines)

    def describe(self) -> str:
        return (f"{self._name()}: model {self.model_id or '?'}, sampler {self.sampler or '?'}, {self.steps} steps, "
                f"streams {', '.join(self.streams)}, {self.num_prompts} prompts"
                + (f" ({self.still_prompts} never moving: no statistics)" if self.still_prompts else "")
                + f", created {self.created or '?'}"
                + (f", identity {_identity_said(self.identity)}" if self.identity else ""))


def _identity_said(identity: Dict[str, Any]) -> str:
    """A LUT's identity in one line: its plain keys as JSON, its noise schedule's few values, and how many of the
    scheduler's sampling settings it records (up to 20 on a diffusers scheduler; the file holds them all)."""
    plain = {k: v for k, v in identity.items() if "." not in k or (  # (the weights' dtype where the first differs)
        k == "dtype.weights" and v != identity.get("dtype"))}
    schedule = {k.split(".", 1)[1]: v for k, v in identity.items() if k.startswith("noise_schedule.")}
    settings = sum(k.startswith("scheduler.") for k in identity)
    return (json.dumps(plain, sort_keys=True)
            + (f", noise_schedule {json.dumps(schedule, sort_keys=True)}" if schedule else "")
            + (f", {settings} scheduler.* settings" if settings else ""))


def unrecorded_prompts(num_prompts: int, cos_count: Tensor, ratio_count: Tensor, otherwise: int) -> int:
    """``still_prompts`` of a LUT of these counts (``[streams, steps]``): the prompts its fullest step holds no value
    of, ``otherwise`` where no step holds any (too few steps for statistics, or no prompt that moved). A function of
    the summed counts, so that merged LUTs agree whatever the order of their generations (a per-generation sum did
    not: generations still in different streams summed to 0 while no step held every prompt)."""
    most = max(int(c.max()) if c.numel() else 0 for c in (cos_count, ratio_count))
    return max(0, num_prompts - most) if most else otherwise


def prompt_rows(lut: "CalibrationLUT") -> List[bytes]:
    """Each moving prompt's delta products as bytes (equal bit for bit only for the same prompt of the same run: how a
    copy, or a LUT already merged in, is told); none for a LUT without products."""
    if lut.deltas is None or not lut.deltas.prompts:
        return []
    gram = lut.deltas.gram
    return [gram[i].numpy().tobytes() for i in range(gram.shape[0])
            if bool(gram[i].nan_to_num(0.0).abs().sum() > 0)]  # (still prompts' products are all zero)


def shared_prompts(a: "CalibrationLUT", b: "CalibrationLUT") -> int:
    """How many of ``b``'s prompts ``a`` holds too (:func:`prompt_rows`)."""
    mine = set(prompt_rows(a))
    return sum(row in mine for row in prompt_rows(b))


def _cut_short(path: Path) -> Optional[str]:
    """How a file that safetensors cannot read is shorter than its own header says (``None``: it is not, or the
    file does not begin like a safetensors file)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if size == 0:
                return "is empty (0 bytes)"
            if len(head) < 8:
                return f"holds {size} bytes, fewer than a safetensors file's 8-byte header length"
            n = int.from_bytes(head, "little")
            if n > 100 * 2 ** 20:  # (no LUT's header is that long: another kind of file)
                return None
            if size < 8 + n:
                return f"is cut short: {size} bytes, where its header alone takes {8 + n}"
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    ends = [v.get("data_offsets", [0, 0])[1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    want = 8 + n + max(ends, default=0)
    return f"is cut short: {size} bytes of the {want} its header describes" if size < want else None


def _merge_deltas(a: CalibrationLUT, b: CalibrationLUT, drop: bool = False) -> Optional[DeltaGram]:
    """Both LUTs' delta products, or none if either LUT has prompts without them (an error estimate
    from part of the prompts would not describe the LUT's statistics). Unless ``drop``, a merge that
    would lose products, or shorten their horizon, is refused."""
    def usable(lut):  # a LUT without prompts contributes nothing either way
        return lut.deltas if lut.deltas is not None or lut.num_prompts == 0 else False

    da, db = usable(a), usable(b)
    if not drop:
        check_error_statistics_kept(a, b)
    if da is False or db is False:
        return None
    if da is None or db is None:
        return da if db is None else db
    if any(x and y and x != y for x, y in zip(da.numel, db.numel)):
        ours, theirs = (", ".join(map(str, g.numel)) for g in (da, db))
        if b.source:  # (two files: taocache merge)
            raise LUTMismatchError(f"cannot merge {b._name()} into {a._name()}: the outputs of {b._name()} have "
                                   f"{theirs} elements per stream, those of {a._name()} {ours} (another resolution or "
                                   "frame count)")
        raise LUTMismatchError(f"this generation's outputs have {theirs} elements per stream, {a._name()}'s {ours}: "
                               "another resolution or frame count than the LUT was calibrated at; give it its own lut:")
    try:
        return da.merge(db)
    except ValueError as exc:
        theirs = b._name() if b.source else "this generation's statistics"
        raise LUTMismatchError(f"cannot merge {theirs} into {a._name()}: {exc}") from None


def check_error_statistics_kept(kept: CalibrationLUT, other: CalibrationLUT) -> None:
    """Raise :class:`LUTMismatchError` if merging ``other`` would drop ``kept``'s delta products or
    shorten their horizon (``other`` has prompts without them, or with a shorter horizon)."""
    have = kept.deltas if kept.num_prompts else None
    if have is None or not other.num_prompts:
        return
    theirs = other.deltas
    if theirs is not None and theirs.horizon >= have.horizon:
        return
    what = "drop" if theirs is None else f"shorten to {theirs.horizon} steps"
    raise LUTMismatchError(
        f"cannot merge {other._name()} and {kept._name()}: it would {what} the error statistics (delta products up "
        f"to {have.horizon} steps apart, for plan.rule: auto) of {kept._name()}'s {kept.num_prompts} prompt(s), "
        f"since {other._name()}'s {other.num_prompts} prompt(s) have "
        + ("none" if theirs is None else f"them up to {theirs.horizon} steps apart")
        + f". Calibrate those prompts with calibration.error_horizon: {have.horizon}, or drop the error statistics "
        "on purpose (taocache merge --drop-error-statistics)")


def first_timestep_difference(a: Tensor, b: Tensor) -> Optional[int]:
    """The first step whose timestep is known in both and differs (relative 1e-6), or ``None``."""
    both = ~(a.isnan() | b.isnan())
    differ = both & ((a - b).abs() > 1e-6 * a.abs().clamp(min=1))
    return int(differ.nonzero()[0]) if differ.any() else None


def merge_luts(luts: Sequence[CalibrationLUT], drop_error_statistics: bool = False) -> CalibrationLUT:
    """Merge several LUTs left to right (:meth:`CalibrationLUT.merge`)."""
    if not luts:
        raise ValueError("nothing to merge")
    out = luts[0]
    for other in luts[1:]:
        out = out.merge(other, drop_error_statistics)
    return out
