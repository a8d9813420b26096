"""A LUT calibrated at one step count, carried over to another (``calibration.transfer: interpolate``).

Each calibration prompt's trajectory of outputs is taken as piecewise linear in the position
``u = t / (steps - 1)`` along the loop (outputs at the LUT's steps, straight in between). The outputs
of a run with ``new`` steps sit at ``u' = a / (new - 1)``, so each of its deltas is a fixed
combination of the calibrated deltas::

    D'_a = e(u'_a) - e(u'_{a-1}) = sum_t C[a, t] D_t          C: [new, steps]

and its products follow exactly from the calibrated ones: ``G' = C G C^T`` per prompt (where every
product needed lies within the LUT's horizon). The cosine and norm-ratio statistics of the new
steps are computed from ``G'`` prompt by prompt, so ``rule: paper`` and ``rule: auto`` both plan on
the transferred LUT. Timesteps are interpolated in ``u``: exact for a schedule whose steps keep their positions
(evenly from the first timestep to the last); UniPC with a flow shift and DDIM move their end points with the count,
so there the carried timesteps and statistics are approximations. This needs a LUT with delta products (format 2);
how far it holds against a native calibration is measured in ``benchmarks/step_transfer.py``.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .delta_gram import DeltaGram, cross_dense_to_band
from .lut import CalibrationLUT, LUTMismatchError, unrecorded_prompts
from .stats import RunningMoments

__all__ = ["transfer_lut", "transfer_matrix"]


def _cumulative(x: float, steps: int) -> Tensor:
    """Coefficients over ``D_0..D_{steps-1}`` (``D_0`` unused) of ``e(x) - e_0`` at fine position ``x``."""
    out = torch.zeros(steps, dtype=torch.float64)
    k = min(int(x), steps - 1)
    out[1:k + 1] = 1.0
    if k + 1 < steps:
        out[k + 1] = x - k
    return out


def transfer_matrix(steps: int, new: int) -> Tensor:
    """``C [new, steps]``: row ``a`` holds the new delta ``D'_a`` as a combination of ``D_t`` (row 0 empty)."""
    c = torch.zeros(new, steps, dtype=torch.float64)
    scale = (steps - 1) / (new - 1) if new > 1 else 0.0
    prev = _cumulative(0.0, steps)
    for a in range(1, new):
        cur = _cumulative(a * scale, steps)
        c[a] = cur - prev
        prev = cur
    return c


def _dense(gram: Tensor) -> Tensor:
    """``[prompts, steps, steps]`` from the band ``[prompts, steps, horizon + 1]`` (NaN outside)."""
    p, t, h = gram.shape
    dense = torch.full((p, t, t), float("nan"), dtype=torch.float64)
    for j in range(min(h, t)):
        i = torch.arange(j, t)
        dense[:, i, i - j] = gram[:, j:, j]
        dense[:, i - j, i] = gram[:, j:, j]
    return dense


def repeats_timesteps(lut: CalibrationLUT) -> bool:
    """Whether the LUT's calls repeat timesteps (PNDM's warm-up): a schedule interpolation cannot carry it."""
    t = lut.timesteps.to(torch.float64)
    return t.numel() > 1 and not bool(torch.isnan(t).any()) and bool((t[1:] == t[:-1]).any())


def carryable(lut: CalibrationLUT) -> bool:
    """Whether :func:`transfer_lut` can carry the LUT to another step count."""
    return lut.deltas is not None and lut.deltas.prompts > 0 and not repeats_timesteps(lut)


def transfer_lut(lut: CalibrationLUT, new: int) -> CalibrationLUT:
    """``lut`` carried to a loop of ``new`` steps (see the module docstring); raises
    :class:`LUTMismatchError` if the LUT has no delta products to carry."""
    if new == lut.steps:
        return lut
    if lut.deltas is None or lut.deltas.prompts == 0:
        raise LUTMismatchError(
            f"{lut._name()} has {lut.steps} steps and no delta products (an older LUT, or calibrated with "
            f"calibration.error_horizon: 0), so it cannot be carried to {new} steps; calibrate for {new} steps")
    if new < 3:
        raise LUTMismatchError(f"cannot carry {lut._name()} to {new} steps (at least 3 are needed for statistics)")
    if repeats_timesteps(lut):
        raise LUTMismatchError(  # (carried, its timesteps were up to 160 off the run's, and nothing said so)
            f"cannot carry {lut._name()} to {new} model calls: its calls repeat timesteps (PNDM's warm-up: N + 9 calls "
            "for N steps), a schedule interpolation does not keep; calibrate at this step count")
    c = transfer_matrix(lut.steps, new)
    support = (c != 0).to(torch.float64)
    g = lut.deltas.gram  # [p, s, t, h + 1]
    prompts, streams = g.shape[:2]
    # the largest lag whose products are known for every new step
    new_gram, horizon = [], None
    for s in range(streams):
        dense = _dense(g[:, s])
        known = (~dense.isnan()).all(dim=0).to(torch.float64)  # [t, t]
        full = c @ dense.nan_to_num(0.0) @ c.T  # [p, new, new]
        unknown = (support @ (1 - known) @ support.T) > 0  # a needed product is missing
        full[:, unknown] = float("nan")
        full[:, 0, :] = float("nan")
        full[:, :, 0] = float("nan")
        band = torch.full((prompts, new, new), float("nan"), dtype=torch.float64)
        for j in range(new):
            i = torch.arange(j, new)
            band[:, j:, j] = full[:, i, i - j]
        lags_known = [j for j in range(new) if not band[:, j + 1:, j].isnan().any()]
        h = 0
        while h + 1 in lags_known and h + 1 < new:
            h += 1
        horizon = h if horizon is None else min(horizon, h)
        new_gram.append(band)
    if not horizon:  # consecutive new deltas need products beyond the LUT's horizon (an IndexError below, once)
        rows = [c[a].nonzero().flatten() for a in range(new)]
        need = max(int(rows[a].max() - rows[a - 1].min()) for a in range(2, new))
        raise LUTMismatchError(
            f"cannot carry {lut._name()} to {new} steps: each new step spans {(lut.steps - 1) / (new - 1):.1f} "
            f"calibrated steps, so two consecutive ones need products of deltas up to {need} steps apart, and the LUT "
            f"holds them up to {lut.deltas.horizon} (calibration.error_horizon); calibrate at {new} steps, or with "
            f"calibration.error_horizon: {need} or more")
    gram = torch.stack(new_gram, dim=1)[..., :horizon + 1]  # [p, s, new, horizon + 1]
    cross = None if lut.deltas.cross is None else _carried_cross(lut.deltas.cross_dense(), c, support, horizon)
    cos, ratio = RunningMoments.zeros(streams, new), RunningMoments.zeros(streams, new)
    for s in range(streams):
        for a in range(2, new):
            sq, prev, dot = gram[:, s, a, 0], gram[:, s, a - 1, 0], gram[:, s, a, 1]
            cos.add((s, a), (dot / (sq * prev).sqrt()).clamp(-1.0, 1.0))
            ratio.add((s, a), (sq / prev).sqrt())
    u_old = torch.linspace(0, 1, lut.steps, dtype=torch.float64)
    u_new = torch.linspace(0, 1, new, dtype=torch.float64)
    timesteps = _interp(u_new, u_old, lut.timesteps.to(torch.float64))
    identity = dict(lut.identity)
    if identity.get("sampling_steps") == lut.steps:  # (one call per step: the carried copy is one of `new` steps,
        identity["sampling_steps"] = new              # checked as such, not said unrecorded)
    else:  # (a sampler of several calls per step: its step count for `new` calls is not known here)
        identity.pop("sampling_steps", None)
    return dataclasses.replace(
        lut, steps=new, cos=cos, ratio=ratio, timesteps=timesteps, identity=identity,
        deltas=DeltaGram(gram, lut.deltas.numel, cross),
        still_prompts=unrecorded_prompts(lut.num_prompts, cos.count, ratio.count, otherwise=lut.still_prompts),
        source=f"{lut.source or 'LUT'} (carried from {lut.steps} to {new} steps)")


def _carried_cross(dense: Tensor, c: Tensor, support: Tensor, horizon: int) -> Tensor:
    """The cross-stream band ``[prompts, new, 2 horizon + 1]`` of the new deltas, from the calibrated products
    ``dense [prompts, steps, steps]`` (NaN where a needed product is missing, per prompt)."""
    full = c @ dense.nan_to_num(0.0) @ c.T  # [p, new, new]
    full[(support @ dense.isnan().to(torch.float64) @ support.T) > 0] = float("nan")
    full[:, 0, :] = float("nan")
    full[:, :, 0] = float("nan")
    return cross_dense_to_band(full, horizon)


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Linear interpolation of ``fp`` (NaN where unknown: NaN where a neighbour is unknown)."""
    idx = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    w = (x - x0) / (x1 - x0)
    return f0 + w * (f1 - f0)
