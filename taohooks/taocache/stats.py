"""Mean and standard deviation that merge exactly across runs, files and processes.

Kept as sufficient statistics (count, sum, sum of squares) in float64, so that merging is
plain addition (and an all-reduce of three tensors in a distributed run).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RunningMoments"]


@dataclass
class RunningMoments:
    """Element-wise running moments of a quantity over prompts, e.g. of shape ``[streams, steps]``.

    ``std`` is the population standard deviation (divisor ``count``), 0 where fewer than two
    values were seen; ``mean`` and ``std`` are NaN where none was seen.
    """

    count: Tensor   # int64
    total: Tensor   # float64, sum of values
    total_sq: Tensor  # float64, sum of squared values

    @classmethod
    def zeros(cls, *shape: int) -> "RunningMoments":
        return cls(torch.zeros(shape, dtype=torch.int64), torch.zeros(shape, dtype=torch.float64),
                   torch.zeros(shape, dtype=torch.float64))

    @property
    def shape(self) -> torch.Size:
        return self.count.shape

    def add(self, index, values: Tensor) -> None:
        """Add values (any shape, flattened) at one ``index`` of the table; non-finite ones are dropped."""
        values = values.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
        values = values[torch.isfinite(values)]
        self.count[index] += values.numel()
        self.total[index] += values.sum()
        self.total_sq[index] += values.square().sum()

    def merge(self, other: "RunningMoments") -> "RunningMoments":
        if other.shape != self.shape:
            raise ValueError(f"cannot merge moments of shape {tuple(other.shape)} into {tuple(self.shape)}")
        return RunningMoments(self.count + other.count, self.total + other.total,
                              self.total_sq + other.total_sq)

    @property
    def mean(self) -> Tensor:
        n = self.count.to(torch.float64)
        return torch.where(n > 0, self.total / n.clamp(min=1), torch.full_like(n, float("nan")))

    @property
    def std(self) -> Tensor:
        n = self.count.to(torch.float64)
        mean = self.total / n.clamp(min=1)
        var = (self.total_sq / n.clamp(min=1) - mean.square()).clamp(min=0)
        std = torch.where(n > 1, var.sqrt(), torch.zeros_like(var))
        return torch.where(n > 0, std, torch.full_like(n, float("nan")))
