"""``VideoDiT``: a small latte/DiT-style video transformer for the testbed.

Input ``x [B, C, F, H, W]`` is cut into 4x4 patches per frame (8 frames x 4 x 4 =
128 tokens), given learned spatial + temporal position embeddings, passed through
``depth`` adaLN-Zero blocks conditioned on (timestep embedding + prompt embedding),
with a per-token prompt map added to the tokens (``prompt_layout``),
and folded back to ``[B, out_channels, F, H, W]``.

Hook points (module names):

- ``blocks.{i}.attn``  self-attention (Pyramid-Attention-Broadcast style hooks),
- ``blocks.0.mod1``    output = timestep-modulated input of the first block (TeaCache),
- ``blocks``           the ``nn.ModuleList`` of blocks; ``final`` the output layer.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from einops import rearrange
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from ..runtime.io import atomic_write_bytes
from . import data
from .blocks import DiTBlock, FinalLayer
from .embeddings import PromptEmbedding, PromptLayout, TimestepEmbedding, sincos_grid, sincos_table


@dataclass
class VideoDiTConfig:
    """Architecture and the training objective the weights belong to.

    ``prediction`` is ``"eps"`` (6 output channels: eps + variance interpolation),
    or ``"flow"`` (3 output channels: velocity ``noise - x0``). ``training`` names the
    run recipe (``"eps"``, ``"flow"``, ``"flow-lognormal"``); informational.
    """

    in_channels: int = 3
    out_channels: int = 3
    num_frames: int = data.NUM_FRAMES
    height: int = data.HEIGHT
    width: int = data.WIDTH
    patch_size: int = 4
    dim: int = 128
    depth: int = 5
    num_heads: int = 4
    mlp_ratio: float = 2.0
    prompt_layout: bool = True  # add per-token prompt maps (embeddings.PromptLayout)
    attribute_sizes: Tuple[int, ...] = field(default_factory=lambda: tuple(data.ATTRIBUTE_SIZES))
    prediction: str = "flow"
    training: str = "flow"

    @property
    def num_tokens(self) -> int:
        return self.num_frames * (self.height // self.patch_size) * (self.width // self.patch_size)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "VideoDiTConfig":
        raw = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        raw = {k: v for k, v in raw.items() if k in names}
        if "attribute_sizes" in raw:
            raw["attribute_sizes"] = tuple(raw["attribute_sizes"])
        return cls(**raw)


class VideoDiT(nn.Module):
    """``forward(x [B,C,F,H,W], timestep [B] float, prompt_ids [B,4] long) -> [B,out,F,H,W]``.

    ``timestep`` is in model units: 0..1000 for DDPM (eps), ``sigma * 1000`` for flow.
    A ``prompt_ids`` row of -1s is the null prompt (see ``data.prompt_ids``).
    """

    def __init__(self, config: VideoDiTConfig):
        super().__init__()
        self.config = c = config
        p = c.patch_size
        if c.height % p or c.width % p:
            raise ValueError("height and width must be multiples of patch_size")
        self.grid = (c.num_frames, c.height // p, c.width // p)  # token grid (F, h, w)
        self.patch_embed = nn.Linear(c.in_channels * p * p, c.dim)
        # Learned position tables, initialised with 2-D (row, col) and 1-D (frame) sin/cos features.
        self.pos_spatial = nn.Parameter(sincos_grid(self.grid[1], self.grid[2], c.dim)[None, None] * 0.5)
        self.pos_temporal = nn.Parameter(sincos_table(c.num_frames, c.dim)[None, :, None] * 0.5)
        self.time_embed = TimestepEmbedding(c.dim)
        self.prompt_embed = PromptEmbedding(c.dim, c.attribute_sizes)
        self.prompt_layout = PromptLayout(c.num_tokens, c.dim, c.attribute_sizes) if c.prompt_layout else None
        self.blocks = nn.ModuleList(DiTBlock(c.dim, c.num_heads, c.mlp_ratio) for _ in range(c.depth))
        self.final = FinalLayer(c.dim, p * p * c.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embed.weight.device

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, F, H, W]`` -> ``[B, N, C*p*p]`` tokens ordered (frame, row, col)."""
        p = self.config.patch_size
        return rearrange(x, "b c f (h p) (w q) -> b (f h w) (c p q)", p=p, q=p)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N, C*p*p]`` -> ``[B, C, F, H, W]``."""
        f, h, w = self.grid
        p = self.config.patch_size
        return rearrange(tokens, "b (f h w) (c p q) -> b c f (h p) (w q)", f=f, h=h, w=w, p=p, q=p)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch + position embedding: ``[B, C, F, H, W]`` -> ``[B, N, D]``."""
        tokens = self.patch_embed(self.patchify(x))
        b, _, d = tokens.shape
        tokens = tokens.view(b, self.grid[0], -1, d) + self.pos_spatial + self.pos_temporal
        return tokens.view(b, -1, d)

    def condition(self, timestep: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Timestep ``[B]`` + prompt ids ``[B, A]`` -> conditioning ``[B, D]``."""
        return self.time_embed(timestep) + self.prompt_embed(prompt_ids)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        timestep = torch.as_tensor(timestep, device=x.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(b)
        prompt_ids = torch.as_tensor(prompt_ids, device=x.device, dtype=torch.long)
        h = self.embed(x.to(self.dtype))
        if self.prompt_layout is not None:
            h = h + self.prompt_layout(prompt_ids)
        c = self.condition(timestep, prompt_ids)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final(h, c))

    # ------------------------------------------------------------------ I/O
    def save_pretrained(self, path: Union[str, Path], metadata: Optional[Dict[str, str]] = None) -> None:
        """Write weights to a ``.safetensors`` file with the config as JSON metadata.

        ``metadata``: extra string entries (e.g. a training summary) stored alongside.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {**(metadata or {}), "config": self.config.to_json(), "format": "pt"}
        atomic_write_bytes(path, save(state, metadata=meta))  # an interrupted save keeps the old file

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> "VideoDiT":
        """Load a file written by :meth:`save_pretrained`; returns the model in eval mode. A missing file,
        one that is not a safetensors file, or one without a testbed config raises ``ValueError`` naming it."""
        if Path(path).is_dir():
            raise ValueError(f"{path}: a folder, not a checkpoint file")
        if not Path(path).is_file():
            raise ValueError(f"{path}: no such checkpoint file")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if "config" not in meta:
                    raise ValueError(f"{path}: not a testbed checkpoint (its metadata has no 'config'; "
                                     "checkpoints are written by VideoDiT.save_pretrained)")
                config = VideoDiTConfig.from_json(meta["config"])
                state = {k: f.get_tensor(k) for k in f.keys()}
        except ValueError:
            raise
        except Exception as exc:  # safetensors' own errors name neither the file nor what it expected
            name = str(path)
            hint = ("; it is a training state (--resume takes it), the weights are the .safetensors of the same run"
                    if name.endswith(".state.pt") else "; it is a run's summary, the weights are the .safetensors "
                    "of the same name" if name.endswith(".json") else "")
            raise ValueError(f"{path}: not a safetensors checkpoint ({type(exc).__name__}: {exc}){hint}") from None
        bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:  # (training blamed the learning rate, evaluations reported NaN: bad-input walkthrough, 2026-11-27)
            raise ValueError(f"{path}: {len(bad)} tensor(s) hold NaN or inf values ({', '.join(bad[:3])}"
                             f"{', ...' if len(bad) > 3 else ''}): a damaged copy, or weights saved after a run "
                             "diverged")
        model = cls(config)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"{path}: its tensors do not fit its config ({exc})") from None
        return model.to(device).eval()


def read_metadata(path: Union[str, Path]) -> Dict[str, str]:
    """The string metadata of a saved checkpoint (``config``, ``training`` summary, ...)."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return dict(f.metadata())


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
