"""TeaCache for Latte-1 and Open-Sora-Plan v1.1 as its authors evaluate them (ali-vilab/TeaCache,
``eval/teacache/experiments/latte.py`` and ``opensora_plan.py``).

What the authors' scripts do, reproduced on taohooks' hook (their code is not used):

* the proxy is the first spatial block's timestep-modulated input, ``norm1(x) * (1 + scale_msa) +
  shift_msa`` with ``shift/scale`` from the block's ``scale_shift_table`` plus the adaLN-single
  timestep vector it receives: the block's own first computation, on the patch- and position-
  embedded tokens ``[(b f), tokens, D]``;
* ``acc += poly(mean|p - p_prev| / mean|p_prev|)`` with the published 4th-order coefficients, reuse
  while ``acc < threshold``, the previous proxy updated on every call; negative polynomial values
  are added as the authors' code adds them (Latte's polynomial is negative above a change of ~0.237);
* the first and the last call are always computed (the scripts compare the timestep with the
  first and last of the scheduler's; no other warm-up);
* one call per step on the batched (uncond, cond) halves, which decide together; on a reuse the
  *whole* interleaved spatial + temporal stack is bypassed: ``norm_out`` receives the stack input
  plus the residual ``stack output - stack input`` of the last computed call, so the temporal
  position embedding added between the stacks is part of the residual, as in the scripts.

The authors run one prompt per generation; with several prompts in a batch taohooks decides per
prompt (``per_sample``), where the scripts would decide once for the batch.

The published coefficients (facts, used as data): ali-vilab/TeaCache at
7c10efc4702c6b619f47805f7abe4a7a08085aa0, ``eval/teacache/experiments/latte.py`` L180 and
``opensora_plan.py`` L191; the scripts' thresholds are 0.1 ("slow") and 0.2 ("fast").
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ..runtime.callbacks import Callback
from .teacache import TeaCacheCallback

__all__ = ["PUBLISHED", "SOURCE", "STACKS", "EXIT", "adaln_single_probe", "latte_teacache"]

SOURCE = ("ali-vilab/TeaCache 7c10efc4702c6b619f47805f7abe4a7a08085aa0, eval/teacache/experiments/latte.py L180 "
          "(Latte-1), opensora_plan.py L191 (Open-Sora-Plan v1.1)")

# model -> coefficients, highest power first (numpy.poly1d order)
PUBLISHED: Dict[str, List[float]] = {
    "latte": [-2.46434137e+03, 3.08044764e+02, 8.07447667e+01, -4.11385132e+00, 1.11001402e-01],
    "opensora_plan": [2.05943668e+05, -1.48759286e+04, 3.06085986e+02, 1.31418080e+00, 2.39658469e-03],
}
STACKS = ("transformer_blocks", "temporal_transformer_blocks")  # spatial, temporal
EXIT = "norm_out"  # receives the stacks' output in the spatial layout


def adaln_single_probe(block, args: tuple, kwargs: dict) -> torch.Tensor:
    """Block 0's modulated input ``norm1(x) * (1 + scale_msa) + shift_msa`` (``x = args[0]``, the
    adaLN-single vector ``timestep [rows, 6 D]`` at position 4 or as a keyword)."""
    x = args[0] if args else kwargs["hidden_states"]
    timestep = kwargs["timestep"] if "timestep" in kwargs else args[4]
    if timestep is None or not hasattr(block, "scale_shift_table"):
        raise ValueError("TeaCache for Latte / Open-Sora-Plan: the first block has no adaLN-single modulation "
                         "(norm_type 'ada_norm_single', a scale_shift_table and a timestep argument)")
    shift, scale = (block.scale_shift_table[None] + timestep.reshape(x.shape[0], 6, -1)).chunk(6, dim=1)[:2]
    return block.norm1(x) * (1 + scale) + shift


def latte_teacache(model: str, threshold: float, max_step: Optional[int] = None) -> List[Callback]:
    """The authors' TeaCache for ``model`` (``"latte"`` or ``"opensora_plan"``) at ``threshold``
    (``max_step``: the hybrid's end of TeaCache's range)."""
    if model not in PUBLISHED:
        raise ValueError(f"TeaCache publishes Latte-shaped coefficients for {', '.join(PUBLISHED)}, not {model!r}")
    return [TeaCacheCallback(threshold, PUBLISHED[model], probe=adaln_single_probe, blocks=STACKS, exit=EXIT,
                             warmup_steps=1, compute_last_step=True, clamp_negative=False, max_step=max_step)]
