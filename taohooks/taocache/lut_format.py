"""Validation of a LUT file's contents: what a calibration can produce, or :class:`LUTFormatError`.

Checked when a LUT is loaded, so that a bit-rotted or hand-edited file is refused with the file and
the entry named, instead of being planned on (a cosine of 7) or turning a video into NaN (a ratio
of 2.5e29):

* metadata: a JSON object; ``format_version`` a positive int up to the supported one; ``steps`` a
  positive int; ``streams`` a list of distinct non-empty strings; ``calls_per_step`` 1 or the number
  of streams; ``num_prompts`` an int >= 0, ``still_prompts`` (optional) an int up to it; ``model_id``, ``sampler``,
  ``created`` strings or null;
  ``identity`` an object of JSON scalars or lists;
* tensors: every one of the expected shape (``timesteps`` ``[steps]``, the rest ``[streams, steps]``),
  counts of an integer dtype, the rest floating;
* values: counts in ``[0, num_prompts]``, and ``num_prompts`` less ``still_prompts`` (prompts the LUT's
  fullest step holds no value of: outputs that never moved) reached at some step where any value was recorded;
  sums finite, ``sum**2 <= count * sumsq`` (Cauchy-Schwarz, relative tolerance 1e-9); cosine means in ``[-1, 1]``
  (+1e-6) and ``sumsq <= count``; norm-ratio sums >= 0 and means at most :data:`MAX_RATIO`; stored means and stds
  finite where counted; timesteps finite or NaN (unknown);
* format 2: the optional ``delta_gram`` ``[prompts, streams, steps, horizon + 1]`` (floating, at most
  ``num_prompts`` prompts, horizon >= 1): finite or NaN, ``<D_t, D_t> >= 0``, each product within
  Cauchy-Schwarz of the two norms (relative 1e-4: the products are float32 sums); metadata ``delta_numel`` one positive int per stream.
* the optional ``delta_cross`` ``[delta_gram's prompts, steps, 2 horizon + 1]`` (two streams, with ``delta_gram``):
  finite or NaN, each product within Cauchy-Schwarz of the two streams' norms. An optional tensor, not a format
  version: a taohooks that predates it reads the file without it.
"""
from __future__ import annotations

import json
import math
from typing import Any, Dict

import torch
from torch import Tensor

__all__ = ["validate", "check_identity", "MAX_RATIO"]

MAX_RATIO = 1e3  # a mean ||D_t|| / ||D_{t-1}|| above this is no denoiser's trajectory
_COS_TOL = 1e-6
_CS_TOL = 1e-9
_MOMENTS = [f"{n}_{s}" for n in ("cos", "ratio") for s in ("count", "sum", "sumsq")]
_DERIVED = [f"{n}_{s}" for n in ("cos", "ratio") for s in ("mean", "std")]


def _error(path, message: str):
    from .lut import LUTFormatError

    return LUTFormatError(f"{path}: {message}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, bool, int)) or (isinstance(v, float) and math.isfinite(v))


def _json_value(v: Any) -> bool:
    return _scalar(v) or (isinstance(v, list) and all(_json_value(x) for x in v))


def _json_type(v: Any) -> str:
    """A parsed JSON value's type, for messages: ``null``, ``boolean``, ``object``, else Python's name."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    return "object" if isinstance(v, dict) else type(v).__name__


def check_identity(identity: Any, where: str) -> Dict[str, Any]:
    """``identity`` as a new dict of str -> JSON scalar or list (tuples become lists, as a file holds
    them, so that a run's identity compares equal to the LUT's), or ``ValueError`` naming ``where``."""
    if not isinstance(identity, dict):
        raise ValueError(f"{where}: identity must be a JSON object, got {_json_type(identity)}")
    out = {}
    for key, value in identity.items():
        if not isinstance(key, str):
            raise ValueError(f"{where}: identity key {key!r} is not a string")
        value = _as_list(value)
        if not _json_value(value):
            raise ValueError(f"{where}: identity {key!r} is {value!r}; expected a string, number, boolean, "
                             "null or a list of them")
        out[key] = value
    return out


def _as_list(value: Any) -> Any:
    return [_as_list(v) for v in value] if isinstance(value, (list, tuple)) else value


def _metadata(path, raw: str, supported: int) -> dict:
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise _error(path, f"metadata 'taohooks_lut' is not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise _error(path, f"metadata 'taohooks_lut' is a JSON {_json_type(meta)}; expected an object")
    version = meta.get("format_version")
    if not _is_int(version) or version < 1:
        raise _error(path, f"metadata format_version is {version!r}; expected a positive integer")
    if version > supported:
        raise _error(path, f"has LUT format version {version!r}; this taohooks reads up to {supported}: "
                           "upgrade taohooks")
    steps = meta.get("steps")
    if not _is_int(steps) or steps < 1:
        raise _error(path, f"metadata steps is {steps!r}; expected a positive integer")
    streams = meta.get("streams")
    if (not isinstance(streams, list) or not streams or not all(isinstance(s, str) and s for s in streams)
            or len(set(streams)) != len(streams)):
        raise _error(path, f"metadata streams is {streams!r}; expected a list of distinct non-empty names")
    calls = meta.get("calls_per_step", 1)
    if not _is_int(calls) or calls not in (1, len(streams)):
        raise _error(path, f"metadata calls_per_step is {calls!r}; expected " + (
            f"1 (batched streams) or {len(streams)} (one call per stream)" if len(streams) > 1 else
            "1 (one stream)"))
    prompts = meta.get("num_prompts", 0)
    if not _is_int(prompts) or prompts < 0:
        raise _error(path, f"metadata num_prompts is {prompts!r}; expected an integer >= 0")
    still = meta.get("still_prompts", 0)
    if not _is_int(still) or not 0 <= still <= prompts:
        raise _error(path, f"metadata still_prompts is {still!r}; expected an integer from 0 to num_prompts "
                           f"({prompts}): the prompts whose outputs never moved")
    for key in ("model_id", "sampler", "created"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise _error(path, f"metadata {key} is {meta[key]!r}; expected a string or null")
    try:
        check_identity(meta.get("identity", {}), "metadata")
    except ValueError as exc:
        raise _error(path, str(exc)) from None
    return meta


def _where(meta: dict, index: Tensor) -> str:
    s, t = (int(i) for i in index)
    return f"stream {meta['streams'][s]!r}, step {t}"


def _first(mask: Tensor):
    return mask.nonzero()[0] if bool(mask.any()) else None


def _shapes(path, meta: dict, tensors: Dict[str, Tensor]) -> None:
    missing = [k for k in _MOMENTS + ["timesteps"] if k not in tensors]
    if missing:
        raise _error(path, f"LUT misses tensors {', '.join(missing)}")
    table = (len(meta["streams"]), meta["steps"])
    for key in _MOMENTS + _DERIVED + ["timesteps"]:
        if key not in tensors:
            continue
        t, want = tensors[key], (meta["steps"],) if key == "timesteps" else table
        if tuple(t.shape) != want:
            raise _error(path, f"tensor {key} has shape {list(t.shape)}, metadata says "
                               + (f"[{want[0]} steps]" if key == "timesteps" else
                                  f"[{table[0]} streams, {table[1]} steps]"))
        integer = key.endswith("_count")
        if integer == (t.is_floating_point() or t.is_complex()) or t.dtype == torch.bool:
            raise _error(path, f"tensor {key} has dtype {str(t.dtype).replace('torch.', '')}; expected "
                               + ("an integer type" if integer else "a floating-point type"))


def _values(path, meta: dict, tensors: Dict[str, Tensor]) -> None:
    prompts = meta.get("num_prompts", 0)
    for name in ("cos", "ratio"):
        count = tensors[f"{name}_count"].to(torch.int64)
        total, sq = tensors[f"{name}_sum"].to(torch.float64), tensors[f"{name}_sumsq"].to(torch.float64)
        bad = _first((count < 0) | (count > prompts))
        if bad is not None:
            raise _error(path, f"{name}_count at {_where(meta, bad)} is {int(count[tuple(bad)])}; expected "
                               f"0 to num_prompts ({prompts})")
        for key, t in ((f"{name}_sum", total), (f"{name}_sumsq", sq)):
            bad = _first(~torch.isfinite(t) | ((t < 0) if key.endswith("sumsq") else torch.zeros_like(t, dtype=bool)))
            if bad is not None:
                raise _error(path, f"{key} at {_where(meta, bad)} is {t[tuple(bad)].item():g}; expected a finite "
                                   + ("value >= 0" if key.endswith("sumsq") else "value"))
        n = count.to(torch.float64)
        bound = n * sq
        bad = _first(total.square() > bound + _CS_TOL * bound.abs() + 1e-12)
        if bad is not None:
            i = tuple(bad)
            raise _error(path, f"{name}_sum at {_where(meta, bad)} is {total[i].item():g} with {int(count[i])} "
                               f"values and {name}_sumsq {sq[i].item():g}: impossible (sum^2 > count * sumsq); "
                               "the file is corrupt")
        mean = total / n.clamp(min=1)
        counted = count > 0
        if name == "cos":
            bad = _first(counted & ((mean.abs() > 1 + _COS_TOL) | (sq > n * (1 + _COS_TOL))))
            if bad is not None:
                raise _error(path, f"cos_sum at {_where(meta, bad)} gives a mean cosine of "
                                   f"{mean[tuple(bad)].item():g}; a cosine similarity is in [-1, 1]")
        else:
            bad = _first(counted & ((total < 0) | (mean > MAX_RATIO)))
            if bad is not None:
                raise _error(path, f"ratio_sum at {_where(meta, bad)} gives a mean norm ratio of "
                                   f"{mean[tuple(bad)].item():g}; expected one in [0, {MAX_RATIO:g}]")
        for key in (f"{name}_mean", f"{name}_std"):
            if key in tensors:
                bad = _first(counted & ~torch.isfinite(tensors[key]))
                if bad is not None:
                    raise _error(path, f"{key} at {_where(meta, bad)} is {tensors[key][tuple(bad)].item():g}; "
                                       "expected a finite value where statistics were recorded")
    most = max(int(tensors[f"{n}_count"].max()) if tensors[f"{n}_count"].numel() else 0 for n in ("cos", "ratio"))
    still = meta.get("still_prompts", 0)
    if 0 < most < prompts - still:
        # every complete generation adds one value per prompt at each step >= 2, unless its deltas are exactly
        # zero (a zero-initialised model's outputs: counted in still_prompts): a larger count would make a 2-prompt
        # LUT look complete
        raise _error(path, f"metadata num_prompts is {prompts}" + (f" ({still} of them never moving)" if still else "")
                     + f", but no step holds more than {most} values; expected the number of prompts recorded (the "
                     "file is corrupt or was edited)")
    ts = tensors["timesteps"]
    bad = _first(torch.isinf(ts))
    if bad is not None:
        raise _error(path, f"timesteps at step {int(bad[0])} is {ts[int(bad[0])].item():g}; expected a finite "
                           "value (or NaN where unknown)")


def _delta_gram(path, meta: dict, tensors: Dict[str, Tensor]) -> None:
    if "delta_gram" not in tensors:
        return
    g = tensors["delta_gram"]
    streams, steps = len(meta["streams"]), meta["steps"]
    if g.dim() != 4 or tuple(g.shape[1:3]) != (streams, steps) or g.shape[3] < 2:
        raise _error(path, f"tensor delta_gram has shape {list(g.shape)}; expected [prompts, {streams} streams, "
                           f"{steps} steps, horizon + 1 >= 2]")
    if not g.is_floating_point():
        raise _error(path, f"tensor delta_gram has dtype {str(g.dtype).replace('torch.', '')}; expected a "
                           "floating-point type")
    if g.shape[0] > meta.get("num_prompts", 0):
        raise _error(path, f"delta_gram holds {g.shape[0]} prompts, metadata num_prompts is "
                           f"{meta.get('num_prompts', 0)}")
    numel = meta.get("delta_numel")
    if not isinstance(numel, list) or len(numel) != streams or not all(_is_int(n) and n > 0 for n in numel):
        raise _error(path, f"metadata delta_numel is {numel!r}; expected one positive int per stream ({streams})")
    g = g.to(torch.float64)
    bad = _first(torch.isinf(g))
    if bad is not None:
        raise _error(path, f"delta_gram at prompt {int(bad[0])}, stream {meta['streams'][int(bad[1])]!r}, step "
                           f"{int(bad[2])}, lag {int(bad[3])} is infinite; expected a finite value (or NaN)")
    diag = g[..., 0]
    bad = _first(diag < 0)
    if bad is not None:
        raise _error(path, f"delta_gram at prompt {int(bad[0])}, stream {meta['streams'][int(bad[1])]!r}, step "
                           f"{int(bad[2])}, lag 0 (a squared norm) is {diag[tuple(bad)].item():g}; expected >= 0")
    for lag in range(1, g.shape[3]):
        a, b = diag[..., lag:], diag[..., :-lag]
        prod = g[..., lag:, lag]
        bound = (a * b).sqrt()
        bad = _first(prod.abs() > bound * (1 + 1e-4) + 1e-30)  # float32 sums: parallel deltas reach the bound
        if bad is not None:
            raise _error(path, f"delta_gram at prompt {int(bad[0])}, stream {meta['streams'][int(bad[1])]!r}, step "
                               f"{int(bad[2]) + lag}, lag {lag} is {prod[tuple(bad)].item():g}, larger than the "
                               "product of the two norms: the file is corrupt")


def _delta_cross(path, meta: dict, tensors: Dict[str, Tensor]) -> None:
    if "delta_cross" not in tensors:
        return
    c, g = tensors["delta_cross"], tensors.get("delta_gram")
    if g is None or len(meta["streams"]) != 2:
        raise _error(path, "has a tensor delta_cross (products between two streams' deltas) but "
                     + ("no delta_gram" if g is None else f"{len(meta['streams'])} stream(s)")
                     + "; expected it only beside the delta_gram of a LUT of two streams")
    h = g.shape[3] - 1
    want = (g.shape[0], meta["steps"], 2 * h + 1)
    if tuple(c.shape) != want:
        raise _error(path, f"tensor delta_cross has shape {list(c.shape)}; expected [{want[0]} prompts (delta_gram's), "
                           f"{want[1]} steps, {want[2]} (2 horizon + 1)]")
    if not c.is_floating_point():
        raise _error(path, f"tensor delta_cross has dtype {str(c.dtype).replace('torch.', '')}; expected a "
                           "floating-point type")
    from .delta_gram import cross_band_to_dense

    dense, diag = cross_band_to_dense(c.to(torch.float64)), g.to(torch.float64)[..., 0]  # [p, t, t], [p, 2, t]
    bound = (diag[:, 0, :, None] * diag[:, 1, None, :]).sqrt()
    bad = _first(torch.isinf(dense) | (dense.abs() > bound * (1 + 1e-4) + 1e-30))  # (NaN: unrecorded, passes)
    if bad is not None:
        prompt, step, theirs = (int(x) for x in bad)
        first, second = meta["streams"]
        raise _error(path, f"delta_cross at prompt {prompt}, step {step} of stream {first!r} and {theirs} of "
                           f"{second!r} is {dense[prompt, step, theirs].item():g}; expected a finite value (or NaN) "
                           "within the product of the two norms: the file is corrupt")


def validate(path, raw_meta: str, tensors: Dict[str, Tensor], supported: int) -> dict:
    """The file's metadata (a dict) after checking it and its tensors; raises ``LUTFormatError``."""
    meta = _metadata(path, raw_meta, supported)
    _shapes(path, meta, tensors)
    _values(path, meta, tensors)
    _delta_gram(path, meta, tensors)
    _delta_cross(path, meta, tensors)
    return meta
