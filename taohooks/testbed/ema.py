"""Exponential moving average of model weights with a warm-up on the decay."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps ``self.model``, a frozen copy whose weights track the live model.

    decay at update ``n`` (1-based) is ``min(max_decay, (1 + n) / (10 + n))``, so early
    updates follow the live weights closely.
    """

    def __init__(self, model: nn.Module, max_decay: float = 0.999):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.max_decay = max_decay
        self.num_updates = 0

    def decay(self) -> float:
        n = self.num_updates
        return min(self.max_decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = self.decay()
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1 - d)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)
