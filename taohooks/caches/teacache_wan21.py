"""TeaCache for Wan2.1 as its authors run it (ali-vilab/TeaCache, ``TeaCache4Wan2.1/teacache_generate.py``).

What the authors' script does, reproduced on taohooks' hook (their code is not used):

* the proxy is the timestep embedding: ``e0`` (the time projection's output, ``[1, 6, dim]``, what the
  blocks receive as ``e``) with ``use_ret_steps``, else ``e`` (the time embedding's output, ``[1, dim]``);
  it depends on the timestep only, so cond and uncond decide alike;
* cond and uncond calls keep separate accumulators (their even/odd call counter);
* ``use_ret_steps``: the first 5 steps are always computed and nothing at the end; without it the
  first and the last step;
* ``acc += poly(mean|p - p_prev| / mean|p_prev|)`` with the published 4th-order coefficients of the
  checkpoint, reuse of the block stack's residual while ``acc < threshold``, the previous proxy
  updated on every call; negative polynomial values are added as the authors' code adds them.

The published coefficients (facts, used as data): ali-vilab/TeaCache at
7c10efc4702c6b619f47805f7abe4a7a08085aa0, ``TeaCache4Wan2.1/teacache_generate.py`` lines 883, 885, 967,
969 (``use_ret_steps``) and 890, 892, 974, 976 (without). The script picks them by ``--ckpt_dir``
containing 1.3B / 14B (T2V) or 480P / 720P (I2V).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from ..runtime.callbacks import Callback
from .teacache import TeaCacheCallback

__all__ = ["PUBLISHED", "SOURCE", "checkpoint_key", "TimeEmbeddingProbe", "wan21_teacache", "block_e_probe"]

SOURCE = ("ali-vilab/TeaCache 7c10efc4702c6b619f47805f7abe4a7a08085aa0, TeaCache4Wan2.1/teacache_generate.py "
          "L883/885/967/969 (use_ret_steps), L890/892/974/976")

# (checkpoint, use_ret_steps) -> coefficients, highest power first (numpy.poly1d order)
PUBLISHED: Dict[Tuple[str, bool], List[float]] = {
    ("t2v-1.3B", True): [-5.21862437e+04, 9.23041404e+03, -5.28275948e+02, 1.36987616e+01, -4.99875664e-02],
    ("t2v-14B", True): [-3.03318725e+05, 4.90537029e+04, -2.65530556e+03, 5.87365115e+01, -3.15583525e-01],
    ("i2v-480P", True): [2.57151496e+05, -3.54229917e+04, 1.40286849e+03, -1.35890334e+01, 1.32517977e-01],
    ("i2v-720P", True): [8.10705460e+03, 2.13393892e+03, -3.72934672e+02, 1.66203073e+01, -4.17769401e-02],
    ("t2v-1.3B", False): [2.39676752e+03, -1.31110545e+03, 2.01331979e+02, -8.29855975e+00, 1.37887774e-01],
    ("t2v-14B", False): [-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404],
    ("i2v-480P", False): [-3.02331670e+02, 2.23948934e+02, -5.25463970e+01, 5.87348440e+00, -2.01973289e-01],
    ("i2v-720P", False): [-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683],
}


def checkpoint_key(task: str, size: Optional[str] = None, ckpt_dir: Optional[str] = None) -> str:
    """The published table's checkpoint for a Wan2.1 ``--task`` (and, for i2v, ``--size`` or the
    ``--ckpt_dir`` the authors' script reads): ``t2v-1.3B``, ``t2v-14B``, ``i2v-480P`` or ``i2v-720P``."""
    if task in ("t2v-1.3B", "t2v-14B"):
        return task
    if task == "i2v-14B":  # the checkpoint's folder decides (as the authors' script); the size only without it
        import os

        for text in (os.path.basename(os.path.normpath(ckpt_dir or "")).upper(), str(size or "")):
            if "480" in text and "720" not in text:
                return "i2v-480P"
            if "720" in text and "480" not in text:
                return "i2v-720P"
        raise ValueError(f"i2v-14B: which checkpoint (480P or 720P) is unknown from --size {size!r} / --ckpt_dir "
                         f"{ckpt_dir!r}")
    raise ValueError(f"TeaCache publishes no Wan2.1 coefficients for --task {task} (only t2v-1.3B, t2v-14B, "
                     "i2v-14B at 480P / 720P)")


def block_e_probe(block, args: tuple, kwargs: dict) -> torch.Tensor:
    """``e0``: the time projection the first block receives as ``e`` (a keyword in Wan2.1's loop)."""
    e = kwargs.get("e")
    return e if e is not None else args[1]


class TimeEmbeddingProbe(Callback):
    """Keeps the last output of ``model.time_embedding`` (Wan2.1's ``e``, before the projection) for
    TeaCache's proxy without ``use_ret_steps``; a forward hook on that submodule while attached."""

    def __init__(self):
        self.value: Optional[torch.Tensor] = None
        self._handle = None

    def on_attach(self, hook) -> None:
        module = getattr(hook.module, "time_embedding", None)
        if module is None:
            raise ValueError(f"TeaCache for Wan2.1 (use_ret_steps: false) reads the time embedding, but "
                             f"{type(hook.module).__name__} has no time_embedding submodule")
        self._handle = module.register_forward_hook(lambda m, a, out: setattr(self, "value", out))

    def on_detach(self, hook) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.value = None

    def __call__(self, block, args: tuple, kwargs: dict) -> torch.Tensor:
        if self.value is None:
            raise RuntimeError("TeaCache for Wan2.1: the time embedding was not computed before the first block")
        return self.value


def wan21_teacache(checkpoint: str, threshold: float, use_ret_steps: bool = True,
                   blocks: str = "blocks", max_step: Optional[int] = None) -> List[Callback]:
    """The callbacks of the authors' TeaCache for a Wan2.1 checkpoint (:func:`checkpoint_key`), in
    order: the probe (if it needs its own hook) and the TeaCache callback (``max_step``: the
    hybrid's end of TeaCache's range)."""
    coefficients = PUBLISHED[(checkpoint, bool(use_ret_steps))]
    if use_ret_steps:
        probe, extra = block_e_probe, []
    else:
        embedding = TimeEmbeddingProbe()
        probe, extra = embedding, [embedding]
    tea = TeaCacheCallback(threshold, coefficients, probe=probe, blocks=blocks,
                           warmup_steps=5 if use_ret_steps else 1, compute_last_step=not use_ret_steps,
                           clamp_negative=False, max_step=max_step)
    return [*extra, tea]
