"""Denoisers with analytic output trajectories, for tests with exact expected values.

``GeometricDenoiser`` returns ``eps_t = base + v * r**t`` at step ``t`` (the timestep passed is the
step index). Its deltas ``D_t = v * r**(t-1) * (r - 1)`` are geometric: ``D_t = r * D_{t-1}``
exactly, so calibration must find ``C_ratio = r``, ``C_cos = 1``, zero spreads, and TaoCache's
prediction ``eps_{t-1} + r * D_{t-1}`` equals the true output.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import nn


class GeometricDenoiser(nn.Module):
    """``forward(x, timestep, stream=...) -> [B, *shape]`` with a per-stream ratio.

    ``ratios`` maps a stream name to its ``r``; with ``batch_streams`` the batch is made of one
    equal chunk per listed stream (batched CFG) and each chunk follows its own ratio.
    """

    def __init__(self, ratios: Dict[str, float], shape=(3, 4, 4), seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.ratios = dict(ratios)
        self.register_buffer("base", torch.randn(*shape, generator=g))
        self.register_buffer("v", torch.randn(*shape, generator=g))
        self.calls = 0

    def trajectory(self, stream: str, t: float, batch: int = 1) -> torch.Tensor:
        r = self.ratios[stream]
        out = self.base + self.v * (r ** t)
        # each batch element gets its own offset and scale so prompts differ
        scale = torch.arange(1, batch + 1, dtype=out.dtype).view(-1, *[1] * out.dim())
        return scale * out.unsqueeze(0) + scale

    def forward(self, x, timestep, stream: str = "main", batch_streams: Sequence[str] = ()):
        self.calls += 1
        t = float(timestep.reshape(-1)[0]) if torch.is_tensor(timestep) else float(timestep)
        if batch_streams:
            per = x.shape[0] // len(batch_streams)
            return torch.cat([self.trajectory(s, t, per) for s in batch_streams]).to(x.dtype)
        return self.trajectory(stream, t, x.shape[0]).to(x.dtype)


def run_loop(model, steps: int, streams: Sequence[str] = ("main",), batch: int = 1, split_batch: bool = False,
             dtype=torch.float32):
    """A sampling loop of the given shape; returns the per-step outputs per stream (as used)."""
    x = torch.zeros(batch * (len(streams) if split_batch else 1), 1, dtype=dtype)
    outs = {s: [] for s in streams}
    for t in range(steps):
        ts = torch.tensor([float(t)])
        if split_batch:
            out = model(x, timestep=ts, batch_streams=tuple(streams))
            for s, chunk in zip(streams, out.chunk(len(streams))):
                outs[s].append(chunk)
        else:
            for s in streams:
                out = model(x, timestep=ts, stream=s)
                outs[s].append(out)
    return outs
