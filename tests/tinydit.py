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
