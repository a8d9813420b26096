"""Transformer pieces of the testbed DiT: attention, adaLN modulation, blocks, final layer.

Token tensors are ``[B, N, D]`` (N = 128 space-time tokens, D = model width);
conditioning tensors are ``[B, D]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention over all tokens with ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError("dim must be divisible by num_heads")
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.to_qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, N, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Modulate(nn.Module):
    """adaLN modulation ``x * (1 + scale) + shift`` with ``x [B, N, D]``, shift/scale ``[B, D]``.

    A module of its own so that a forward hook on ``blocks[0].mod1`` sees the
    timestep-modulated input of the first block (what TeaCache compares).
    """

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """adaLN-Zero block: ``x += g1 * attn(mod1(norm1(x)))``; ``x += g2 * mlp(mod2(norm2(x)))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mod1 = Modulate()
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mod2 = Modulate()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.adaLN_modulation[1].weight)
        nn.init.zeros_(self.adaLN_modulation[1].bias)

    def modulation(self, c: torch.Tensor):
        """``c [B, D]`` -> (shift1, scale1, gate1, shift2, scale2, gate2), each ``[B, D]``."""
        return self.adaLN_modulation(c).chunk(6, dim=-1)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)
        x = x + gate1[:, None] * self.attn(self.mod1(self.norm1(x), shift1, scale1))
        x = x + gate2[:, None] * self.mlp(self.mod2(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    """adaLN output layer: ``[B, N, D]`` -> ``[B, N, patch*patch*out_channels]`` (zero-initialised)."""

    def __init__(self, dim: int, out_features: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mod = Modulate()
        self.linear = nn.Linear(dim, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        for layer in (self.linear, self.adaLN_modulation[1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(self.mod(self.norm(x), shift, scale))
