"""Model outputs of any structure, seen as a flat list of floating tensors.

A denoiser may return a tensor, a tuple or list of tensors (Wan2.1 returns a list of
per-sample tensors), a mapping, or a dataclass with ``.sample`` (diffusers). Cache math
runs on the floating tensors ("leaves") in float32; :class:`OutputStructure` remembers
everything else (containers, dtypes, devices, non-floating members) so that a prediction
goes back in exactly the shape the model would have returned.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any, List, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["OutputStructure", "flatten_output", "float32_copy", "float32_leaves", "split_batch", "join_batch"]


def float32_copy(t: Tensor) -> Tensor:
    """A detached float32 copy of ``t``, never ``t`` itself (``.float()`` of a float32 tensor is the tensor, which the
    loop may then change in place: ``x -= dt * v``, in-place CFG on the model's output)."""
    return t.detach().to(torch.float32, copy=True)


def float32_leaves(leaves: List[Tensor]) -> List[Tensor]:
    """:func:`float32_copy` of each leaf (never views of the model's output, which the loop may reuse)."""
    return [float32_copy(t) for t in leaves]


class _Leaf:
    """Placeholder for a floating tensor inside a skeleton."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


def _skeleton(obj: Any, leaves: List[Tensor]) -> Any:
    if isinstance(obj, Tensor):
        if obj.is_floating_point():
            leaves.append(obj)
            return _Leaf(len(leaves) - 1)
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: _skeleton(getattr(obj, f.name), leaves) for f in dataclasses.fields(obj)}
        return ("dataclass", obj, fields)
    if isinstance(obj, Mapping):
        return ("mapping", obj, {k: _skeleton(v, leaves) for k, v in obj.items()})
    if isinstance(obj, (tuple, list)):
        items = [_skeleton(v, leaves) for v in obj]
        return ("sequence", type(obj), items)
    return obj


def _rebuild(node: Any, leaves: Sequence[Tensor]) -> Any:
    if isinstance(node, _Leaf):
        return leaves[node.index]
    if isinstance(node, tuple) and len(node) == 3 and node[0] in ("dataclass", "mapping", "sequence"):
        kind, ref, children = node
        if kind == "dataclass":
            values = {k: _rebuild(v, leaves) for k, v in children.items()}
            return dataclasses.replace(ref, **values)
        if kind == "mapping":  # (ref: the mapping itself, whose kind and attributes a copy keeps: a defaultdict)
            values = {k: _rebuild(v, leaves) for k, v in children.items()}
            if type(ref) is dict:
                return values
            rebuilt = copy.copy(ref)
            rebuilt.update(values)
            return rebuilt
        items = [_rebuild(v, leaves) for v in children]
        if ref is list or ref is tuple:
            return ref(items)
        if hasattr(ref, "_fields"):  # namedtuple
            return ref(*items)
        return ref(items)
    return node


class OutputStructure:
    """The skeleton of one model output: containers plus dtype/device of each floating leaf.

    ``leaves`` of :func:`flatten_output` and the argument of :meth:`rebuild` are in the same
    order. ``rebuild`` casts each leaf back to the model's dtype and device.
    """

    def __init__(self, skeleton: Any, dtypes: List[torch.dtype], devices: List[torch.device],
                 shapes: List[torch.Size]):
        self.skeleton = skeleton
        self.dtypes = dtypes
        self.devices = devices
        self.shapes = shapes

    @property
    def num_leaves(self) -> int:
        return len(self.dtypes)

    def cast(self, leaves: Sequence[Tensor]) -> List[Tensor]:
        """The leaves in the model's dtype and device (no copy where they already are)."""
        if len(leaves) != self.num_leaves:
            raise ValueError(f"expected {self.num_leaves} tensors to rebuild the output, got {len(leaves)}")
        return [t.to(device=d, dtype=dt) for t, d, dt in zip(leaves, self.devices, self.dtypes)]

    def rebuild(self, leaves: Sequence[Tensor]) -> Any:
        return _rebuild(self.skeleton, self.cast(leaves))


def flatten_output(output: Any) -> Tuple[List[Tensor], OutputStructure]:
    """Split a model output into its floating tensors (as returned, not copied) and its structure."""
    leaves: List[Tensor] = []
    skeleton = _skeleton(output, leaves)
    if not leaves:
        raise TypeError(
            f"taohooks: the model returned {type(output).__name__} with no floating-point tensor in it; "
            "cannot cache an output without one")
    if any(t.is_meta for t in leaves):
        raise TypeError("taohooks: the model returned a tensor on the meta device (shapes only, no data: were its "
                        "weights loaded?); cannot cache or calibrate an output without values")
    structure = OutputStructure(skeleton, [t.dtype for t in leaves], [t.device for t in leaves],
                                [t.shape for t in leaves])
    return leaves, structure


def split_batch(leaves: Sequence[Tensor], parts: int) -> List[List[Tensor]]:
    """Split every leaf along dim 0 into ``parts`` equal chunks: one list of leaves per part.

    Used for batched classifier-free guidance, where one call's batch holds the
    (uncond, cond) halves; chunk ``i`` of every leaf belongs to stream ``i``.
    """
    for t in leaves:
        if t.dim() == 0 or t.shape[0] % parts:
            raise ValueError(
                f"taohooks: cannot split an output of shape {tuple(t.shape)} into {parts} batch streams "
                "along dim 0; declare split_batch=False or check the streams of the loop")
    chunks = [t.chunk(parts, dim=0) for t in leaves]
    return [[c[i] for c in chunks] for i in range(parts)]


def join_batch(per_part: Sequence[Sequence[Tensor]]) -> List[Tensor]:
    """Inverse of :func:`split_batch`."""
    return [torch.cat(ts, dim=0) for ts in zip(*per_part)]

