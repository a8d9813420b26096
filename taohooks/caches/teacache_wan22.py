"""TeaCache's proxy for Wan2.2 (TeaCache publishes no Wan2.2 coefficients: ``taocache compare`` fits them).

The proxy is that of TeaCache4Wan2.1's ``use_ret_steps`` variant, the time projection ``e0`` the first
block receives, which decides from the timestep alone: the same on every sequence-parallel rank. Wan2.2's
``WanModel.forward`` makes it per token, ``[B, seq_len, 6, dim]`` float32 (9.3 GB at 1280x720, 81 frames,
dim 5120), so :func:`wan22_e_probe` keeps one token per sample: the last, whose timestep is the step's in
every task (TI2V-5B gives its conditioning frame's tokens, at the start of the sequence, timestep 0; the
padding at the end carries the step's), and a copy of it, so that TeaCache's kept proxy does not hold the
whole tensor. :func:`diffusers_wan_temb_probe` reads the same projection in diffusers' ``WanTransformer3DModel``
(``taocache compare`` on diffusers' Wan pipelines).
"""
from __future__ import annotations

import torch

from .teacache_wan21 import block_e_probe

__all__ = ["wan22_e_probe", "diffusers_wan_temb_probe"]


def wan22_e_probe(block, args: tuple, kwargs: dict) -> torch.Tensor:
    """``e0`` of the first block, one token per sample: ``[B, 6, dim]`` (a per-token ``[B, L, 6, dim]``
    reduced to its last token, copied)."""
    return _one_token(block_e_probe(block, args, kwargs))


def diffusers_wan_temb_probe(block, args: tuple, kwargs: dict) -> torch.Tensor:
    """The same proxy in diffusers' ``WanTransformer3DModel``: the time projection its first block receives as
    ``temb`` (the third positional argument), ``[B, 6, dim]``, or per token ``[B, L, 6, dim]`` (Wan2.2 TI2V-5B)
    reduced to its last token, copied."""
    return _one_token(kwargs["temb"] if "temb" in kwargs else args[2])


def _one_token(e: torch.Tensor) -> torch.Tensor:
    """A per-token projection ``[B, L, 6, dim]`` reduced to its last token (a copy); ``[B, 6, dim]`` as is."""
    return e[:, -1].clone() if e.dim() == 4 else e
