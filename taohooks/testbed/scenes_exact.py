"""Exact-score control for the scenes task: a flow "model" with no training error at all.

The data distribution is a Gaussian mixture: for a prompt, ``K`` rendered clips ``m_k`` (seeds
``0..K-1``) each widened by isotropic noise ``tau``; the null prompt's distribution is the same
for a fixed set of ``ANCHORS`` prompts, ``K // 4`` clips each (so classifier-free guidance has an
exact unconditional branch). For ``x_s = (1 - s) x0 + s n`` the posterior is closed form, and the
velocity is ``v = (x_s - E[x0|x_s]) / s``::

    var = (1-s)^2 tau^2 + s^2,   w_k = softmax_k(-|x_s - (1-s) m_k|^2 / (2 var))
    E[x0 | x_s] = sum_k w_k (m_k + (1-s) tau^2 / var * (x_s - (1-s) m_k))

Wrapped as a DiT-shaped module, so every method attaches to it as to a real model:
8x8 patches (identity: tokens ``[B, 128, 192]``), a timestep embedding that drives
``blocks.0.modulation`` / ``blocks.0.mod1`` (TeaCache's proxy), a block stack ``blocks`` whose
one block turns the tokens into the velocity's (so a block-stack residual is reused the way
TeaCache reuses it), then unpatchify. No attention modules (PAB has nothing to broadcast).
Inference only; the mixture math is float64.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import numpy as np
import torch
from einops import rearrange
from torch import nn

from . import scenes
from .blocks import Modulate
from .embeddings import sinusoidal_embedding
from .model import VideoDiTConfig

ANCHORS = 12  # prompts whose components make the null prompt's distribution


class ExactBlock(nn.Module):
    """``(tokens [B, N, D], c [B, D]) -> velocity tokens [B, N, D]``; the sigma and prompt ids
    come from the owner (set by its forward just before the call)."""

    def __init__(self, dim: int, owner: "ExactSceneDenoiser"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mod1 = Modulate()
        self._owner = (owner,)  # a tuple: not a submodule (no cycle in the module tree)

    def modulation(self, c: torch.Tensor):
        """Six ``[B, D]`` vectors like ``DiTBlock.modulation``: shifts 0, scale1 = the timestep embedding."""
        z = torch.zeros_like(c)
        return z, c, z, z, z, z

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        owner = self._owner[0]
        sigma, ids = owner.context
        return owner.patchify(owner.velocity(owner.unpatchify(x), sigma, ids)).to(x.dtype)


class ExactSceneDenoiser(nn.Module):
    """``forward(x [B,3,8,32,32], timestep [B] = sigma*1000, prompt_ids [B,5]) -> velocity [B,3,8,32,32]``."""

    def __init__(self, per_prompt: int = 32, tau: float = 0.05, patch_size: int = 8):
        super().__init__()
        self.per_prompt, self.tau, self.p = int(per_prompt), float(tau), patch_size
        dim = scenes.CHANNELS * patch_size * patch_size
        self.config = VideoDiTConfig(num_frames=scenes.NUM_FRAMES, height=scenes.HEIGHT, width=scenes.WIDTH,
                                     patch_size=patch_size, dim=dim, depth=1, num_heads=1,
                                     attribute_sizes=tuple(scenes.ATTRIBUTE_SIZES), prediction="flow",
                                     training=f"exact-K{per_prompt}-tau{tau}")
        self.unit = nn.Parameter(torch.ones(()), requires_grad=False)  # gives the module a device and dtype
        self.blocks = nn.ModuleList([ExactBlock(dim, self)])
        self._cache: Dict[Tuple[Tuple[int, ...], str], Tuple[torch.Tensor, torch.Tensor]] = {}
        self.context = None
        self.anchors = [p for p, _ in scenes.eval_pairs(ANCHORS)]

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "b c f (h p) (w q) -> b (f h w) (c p q)", p=self.p, q=self.p)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        g = scenes.HEIGHT // self.p
        return rearrange(tokens, "b (f h w) (c p q) -> b c f (h p) (w q)", h=g, w=g, p=self.p, q=self.p)

    def components(self, ids: Tuple[int, ...], device: torch.device = torch.device("cpu")
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mixture means ``[K, 3*8*32*32]`` float64 and their squared norms ``[K]`` for a prompt's
        ids (all -1: the null prompt), on ``device`` (rendered once, kept per device)."""
        key = (ids, str(device))
        if key not in self._cache:
            prompts = self.anchors if ids[0] < 0 else [scenes.ScenePrompt(*ids[:3], ids[3] + 1, ids[4])]
            k = self.per_prompt if ids[0] >= 0 else max(1, self.per_prompt // 4)
            clips = [scenes.render(p, s) for p in prompts for s in range(k)]
            m = torch.from_numpy(np.stack(clips)).double().flatten(1).to(device)
            self._cache[key] = (m, (m * m).sum(1))
        return self._cache[key]

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Exact ``E[noise - x0 | x_s]`` per row: ``[B, 3, 8, 32, 32]`` float64.

        With ``a = 1 - s`` and ``c = a tau^2 / var``: ``E[x0|x_s] = (1 - c a) sum_k w_k m_k + c x_s``;
        the distances come from one matrix-vector product, ``|x|^2 - 2 a x.m + a^2 |m|^2``.
        """
        out = []
        for xs, s, row in zip(x.double().flatten(1), sigma.double(), ids.tolist()):
            s = s.clamp(1e-4, 1.0)
            m, m2 = self.components(tuple(row), xs.device)
            a = 1 - s
            var = a ** 2 * self.tau ** 2 + s ** 2
            w = torch.softmax(-((xs @ xs) - 2 * a * (m @ xs) + a ** 2 * m2) / (2 * var), 0)
            c = a * self.tau ** 2 / var
            out.append((xs - ((1 - c * a) * (w @ m) + c * xs)) / s)
        return torch.stack(out).view(x.shape)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        timestep = torch.as_tensor(timestep, device=x.device).float()
        if timestep.ndim == 0:
            timestep = timestep.expand(b)
        self.context = (timestep / 1000.0, torch.as_tensor(prompt_ids).long())
        c = sinusoidal_embedding(timestep, self.config.dim) * 0.5  # the "timestep embedding"
        h = self.patchify(x.float())
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(h) * self.unit

    def describe(self) -> dict:
        return {"exact": True, "per_prompt": self.per_prompt, "tau": self.tau, "anchors": ANCHORS,
                "config": dataclasses.asdict(self.config)}
