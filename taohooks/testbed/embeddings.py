"""Conditioning embeddings of the testbed DiT: timestep and prompt (attribute ids)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


def sinusoidal_embedding(timestep: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """``[B]`` float timesteps (model units, 0..1000) -> ``[B, dim]`` cos/sin features."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half)
    args = timestep.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_table(num: int, dim: int) -> torch.Tensor:
    """``[num, dim]`` sin/cos features of positions ``0..num-1`` (used to initialise position tables)."""
    return sinusoidal_embedding(torch.arange(num, dtype=torch.float32), dim, max_period=100.0)


def sincos_grid(height: int, width: int, dim: int) -> torch.Tensor:
    """``[height*width, dim]`` row-major 2-D sin/cos features: half the channels per axis."""
    rows = sincos_table(height, dim // 2)[:, None].expand(height, width, dim // 2)
    cols = sincos_table(width, dim // 2)[None, :].expand(height, width, dim // 2)
    return torch.cat([rows, cols], dim=-1).reshape(height * width, dim)


class TimestepEmbedding(nn.Module):
    """``[B]`` timesteps -> ``[B, dim]`` via sinusoidal features and a 2-layer MLP."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(timestep, self.freq_dim).to(self.mlp[0].weight.dtype))


class PromptEmbedding(nn.Module):
    """``[B, A]`` attribute ids -> ``[B, dim]``: sum of one learned vector per attribute.

    A row whose first id is negative is the null prompt (classifier-free guidance)
    and gets the learned ``null`` vector instead.
    """

    def __init__(self, dim: int, attribute_sizes: Sequence[int]):
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(n, dim) for n in attribute_sizes)
        self.null = nn.Parameter(torch.zeros(dim))
        for t in self.tables:
            nn.init.normal_(t.weight, std=0.02)
        nn.init.normal_(self.null, std=0.02)

    def forward(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        is_null = prompt_ids[:, 0] < 0  # [B]
        ids = prompt_ids.clamp(min=0)
        emb = sum(table(ids[:, i]) for i, table in enumerate(self.tables))
        return torch.where(is_null[:, None], self.null.to(emb.dtype).expand_as(emb), emb)


class PromptLayout(nn.Module):
    """``[B, A]`` attribute ids -> ``[B, N, D]`` per-token prompt embedding.

    One learned space-time map ``[N, D]`` per attribute value, summed over the
    attributes and added to the tokens (zeros for the null prompt). It lets a
    small model tie "moving left" to where the shape is in each frame without first
    having to learn a prompt x position interaction. Zero-initialised.
    """

    def __init__(self, num_tokens: int, dim: int, attribute_sizes: Sequence[int]):
        super().__init__()
        offsets = torch.tensor([0, *attribute_sizes[:-1]]).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        self.table = nn.Parameter(torch.zeros(sum(attribute_sizes), num_tokens, dim))

    def forward(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        keep = (prompt_ids[:, 0] >= 0).to(self.table.dtype)  # [B]; 0 for the null prompt
        rows = prompt_ids.clamp(min=0) + self.offsets  # [B, A] rows of the table
        return self.table[rows].sum(1) * keep[:, None, None]
