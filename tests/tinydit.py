"""A tiny DiT-shaped model for residual-cache and PAB tests: embed -> blocks -> final."""
import torch
from torch import nn


class Attn(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.tanh(self.proj(x))


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.attn = Attn(dim)
        self.mlp = nn.Linear(dim, dim)
        self.calls = 0

    def forward(self, x, c):
        self.calls += 1
        x = x + self.attn(x)
        return x + 0.1 * torch.tanh(self.mlp(x + c[:, None]))


class TinyDiT(nn.Module):
    """forward(x [B, N, 4], timestep [B] or float) -> [B, N, 4]."""

    def __init__(self, dim=8, depth=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(4, dim)
        self.t_embed = nn.Linear(1, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.final = nn.Linear(dim, 4)

    def forward(self, x, timestep):
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1, 1).expand(x.shape[0], 1)
        c = self.t_embed(t / 1000)
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, c)
        return self.final(h)


def run(model, steps, streams=1, seed=0, x=None):
    """A loop with `streams` calls per step; x drifts with the output (like a sampler). Returns outputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 4, generator=g) if x is None else x
    outs = []
    with torch.no_grad():
        for i in range(steps):
            t = torch.tensor([1000.0 * (1 - i / steps)])
            step_outs = [model(x + 0.01 * s, timestep=t) for s in range(streams)]
            outs.append(step_outs)
            x = x - 0.1 * step_outs[0]
    return outs


class LatteBlock(nn.Module):
    """``(hidden [rows, n, D], encoder [rows, L, D], timestep [rows, 6D]) -> [rows, n, D]``: each row
    attends over its own ``n`` tokens, modulated like adaLN-single (``scale_shift_table`` + ``norm1``)."""

    def __init__(self, dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)
        self.mix = nn.Linear(dim, dim)
        self.calls = 0

    def forward(self, hidden, attention_mask=None, encoder=None, encoder_mask=None, timestep=None):
        self.calls += 1
        shift, scale, gate = (self.scale_shift_table[None] + timestep.reshape(len(hidden), 6, -1)).chunk(6, dim=1)[:3]
        h = self.norm1(hidden) * (1 + scale) + shift
        attn = torch.softmax(h @ h.transpose(1, 2) / h.shape[-1] ** 0.5, dim=-1) @ h
        context = 0.0 if encoder is None else encoder.mean(1, keepdim=True)
        return hidden + gate * torch.tanh(self.mix(attn + context))


class TinyLatte(nn.Module):
    """Latte's layout: ``forward(x [B, C, F, N], timestep [B], encoder [B, L, D]) -> [B, C, F, N]``;
    spatial blocks on ``(b f) n d``, temporal ones on ``(b n) f d`` with a temporal position
    embedding added before the first, ``norm_out`` on the stacks' output."""

    def __init__(self, dim=8, depth=2, channels=3, frames=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.frames = frames
        self.embed = nn.Linear(channels, dim)
        self.t_embed = nn.Linear(1, 6 * dim)
        self.transformer_blocks = nn.ModuleList(LatteBlock(dim) for _ in range(depth))
        self.temporal_transformer_blocks = nn.ModuleList(LatteBlock(dim) for _ in range(depth))
        self.register_buffer("temp_pos_embed", torch.randn(1, frames, dim))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(dim, channels)

    def forward(self, x, timestep, encoder):
        b, c, f, n = x.shape
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1, 1).expand(b, 1)
        t6 = self.t_embed(t / 1000)
        h = self.embed(x.permute(0, 2, 3, 1).reshape(b * f, n, c))
        t_spatial = t6.repeat_interleave(f, 0)
        t_temporal = t6.repeat_interleave(n, 0)
        enc_spatial = encoder.repeat_interleave(f, 0)
        for i, (spatial, temporal) in enumerate(zip(self.transformer_blocks, self.temporal_transformer_blocks)):
            h = spatial(h, None, enc_spatial, None, t_spatial)
            h = h.reshape(b, f, n, -1).transpose(1, 2).reshape(b * n, f, -1)
            if i == 0:
                h = h + self.temp_pos_embed
            h = temporal(h, None, None, None, timestep=t_temporal)
            h = h.reshape(b, n, f, -1).transpose(1, 2).reshape(b * f, n, -1)
        out = self.proj_out(self.norm_out(h))
        return out.reshape(b, f, n, c).permute(0, 3, 1, 2)


def latte_probe(block, args, kwargs):
    """TeaCache's Latte proxy: block 0's modulated input ``norm1(x) * (1 + scale_msa) + shift_msa``."""
    x = args[0]
    t = kwargs["timestep"] if "timestep" in kwargs else args[4]
    shift, scale = (block.scale_shift_table[None] + t.reshape(len(x), 6, -1)).chunk(6, dim=1)[:2]
    return block.norm1(x) * (1 + scale) + shift


def run_latte(model, steps, x, encoder, cfg=False):
    """A DDIM-like loop: one call per step, with ``cfg`` on a batch of (uncond, cond) halves."""
    outs = []
    with torch.no_grad():
        for i in range(steps):
            t = torch.tensor([1000.0 * (1 - i / steps)])
            if cfg:
                out = model(torch.cat([x, x]), t, torch.cat([torch.zeros_like(encoder), encoder]))
                uncond, cond = out.chunk(2)
                eps = uncond + 3.0 * (cond - uncond)
            else:
                out = eps = model(x, t, encoder)
            outs.append(out)
            x = x - 0.1 * eps
    return outs
