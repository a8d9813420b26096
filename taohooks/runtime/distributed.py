"""Distributed calibration: prompts sharded over ranks, statistics all-reduced exactly.

A calibration LUT is sufficient statistics (counts, sums, sums of squares in float64), so the
statistics of all ranks together are their sum: :func:`all_reduce_lut` adds them over the
process group, and rank 0 writes one LUT, the same (up to float64 summation order) as one process
calibrating on all the prompts. Works under ``torchrun`` and Lightning Fabric (any initialised
``torch.distributed`` group; gloo on CPU, NCCL on GPUs).

This is for data-parallel calibration, where every rank holds the whole model. Under Wan's
sequence parallelism the ranks work on the same prompt together and see the same gathered
output: there rank 0 simply writes what it recorded.
"""
from __future__ import annotations

import functools
import os
import types
from typing import List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from ..taocache.delta_gram import DeltaGram
from ..taocache.lut import CalibrationLUT, LUTMismatchError, merge_problem, unrecorded_prompts
from ..taocache.stats import RunningMoments

__all__ = ["all_reduce_lut", "shard", "world", "init_from_environment"]

T = TypeVar("T")


def world() -> tuple:
    """``(rank, world size)``; ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_world_size() -> int:
    """The process count torchrun's ``WORLD_SIZE`` gives (1 when unset); ``ValueError`` naming it when not a number."""
    text = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable WORLD_SIZE: expected a number of processes, got "
                         f"{os.environ['WORLD_SIZE']!r}") from None


def shard(items: Sequence[T], rank: int, world_size: int) -> List[T]:
    """The items of one rank: every ``world_size``-th, from ``rank`` on."""
    return list(items[rank::world_size])


def init_from_environment() -> bool:
    """Initialise the default process group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``) if it is not initialised yet; gloo on CPU, NCCL with CUDA.
    Returns whether a group with more than one rank exists."""
    if not dist.is_available():
        return False
    if not dist.is_initialized() and launched_world_size() > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return world()[1] > 1


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sum(t: torch.Tensor, device: torch.device, group) -> torch.Tensor:
    buffer = t.to(device)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    return buffer.cpu()


def all_reduce_lut(lut: CalibrationLUT, group: Optional[object] = None) -> CalibrationLUT:
    """The LUT of all ranks' statistics together (every rank gets it).

    Counts, sums and sums of squares and the prompt counts are summed; each step's timestep is
    taken from any rank that recorded it (they agree: same scheduler); the delta products
    (``plan.rule: auto``'s error statistics, one row per prompt) are gathered, in rank order."""
    if not (dist.is_available() and dist.is_initialized()):
        return lut
    _check_ranks_agree(lut, group)  # (a mismatch summed silently, or ended the job inside the collective)
    device = _device()
    moments = []
    for m in (lut.cos, lut.ratio):
        moments.append(RunningMoments(_sum(m.count, device, group), _sum(m.total, device, group),
                                      _sum(m.total_sq, device, group)))
    prompts, still = (int(v) for v in _sum(torch.tensor([lut.num_prompts, lut.still_prompts], dtype=torch.int64),
                                            device, group))
    timesteps = torch.where(lut.timesteps.isnan(), torch.full_like(lut.timesteps, float("-inf")), lut.timesteps)
    timesteps = timesteps.to(device)
    dist.all_reduce(timesteps, op=dist.ReduceOp.MAX, group=group)
    timesteps = timesteps.cpu()
    timesteps = torch.where(timesteps.isinf(), torch.full_like(timesteps, float("nan")), timesteps)
    return CalibrationLUT(lut.streams, lut.steps, moments[0], moments[1], timesteps, lut.calls_per_step,
                          lut.model_id, lut.sampler, prompts, lut.created, identity=dict(lut.identity),
                          deltas=_gather_deltas(lut, group),
                          still_prompts=unrecorded_prompts(prompts, moments[0].count, moments[1].count,
                                                           otherwise=still))


def _check_ranks_agree(lut: CalibrationLUT, group) -> None:
    """:class:`LUTMismatchError` on every rank when a rank's LUT cannot be merged with rank 0's (as
    :meth:`CalibrationLUT.merge` refuses: steps, streams, labels, identity, timesteps), naming the rank."""
    header = {"steps": lut.steps, "streams": tuple(lut.streams), "model_id": lut.model_id, "sampler": lut.sampler,
              "calls_per_step": lut.calls_per_step, "identity": dict(lut.identity or {}),
              "timesteps": lut.timesteps.detach().cpu()}
    headers: List[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(headers, header, group=group)
    first = types.SimpleNamespace(**headers[0])
    for rank, other in enumerate(headers[1:], start=1):
        problem = merge_problem(first, types.SimpleNamespace(**other), "rank 0's LUT", f"rank {rank}'s LUT")
        if problem:
            raise LUTMismatchError(f"all_reduce_lut: {problem}: the ranks calibrated different runs")


def _gather_deltas(lut: CalibrationLUT, group) -> Optional[DeltaGram]:
    """Every rank's delta products together (as :meth:`CalibrationLUT.merge` joins them: none if a rank
    has prompts without products, the shortest horizon otherwise)."""
    parts: List[object] = [None] * dist.get_world_size(group)
    mine = None if lut.deltas is None else (lut.deltas.gram.cpu(), tuple(lut.deltas.numel),
                                            None if lut.deltas.cross is None else lut.deltas.cross.cpu())
    dist.all_gather_object(parts, (lut.num_prompts, mine), group=group)
    grams = []
    for prompts, part in parts:
        if not prompts:
            continue
        if part is None:
            return None
        grams.append(DeltaGram(*part))
    return functools.reduce(DeltaGram.merge, grams) if grams else None
