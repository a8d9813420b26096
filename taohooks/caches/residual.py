"""Reusing the residual of a model's block stack (the mechanism of TeaCache and MagCache).

The residual of a call is ``output of the last block - input of the first block`` (float32). On a
call where a subclass's :meth:`BlockStackCache.decide` says "reuse", every block passes its hidden
state through unchanged and the last one adds the cached residual of the same call slot (the
same stream(s)); embeddings and the final layer still run. Blocks are patched per instance.

Assumption about the blocks: the hidden state is positional argument ``hidden_arg`` (default 0)
and each block returns the new hidden state as a tensor of the same shape (DiT, Wan2.1 and the
testbed blocks do).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from torch import Tensor, nn

from ..runtime.callbacks import Callback
from ..runtime.patching import ForwardPatch

__all__ = ["BlockStackCache", "ResidualSkipCallback"]


class BlockStackCache(Callback):
    """Base class: patches the blocks of ``hook.module.get_submodule(blocks)``; subclasses decide.

    Args:
        blocks: module path of the ``nn.ModuleList`` (or sequence module) of blocks, e.g. ``"blocks"``.
        hidden_arg: position of the hidden state in a block's arguments.
    """

    def __init__(self, blocks: str = "blocks", hidden_arg: int = 0):
        self.blocks_path = blocks
        self.hidden_arg = hidden_arg
        self.reused = 0   # calls whose block stack was bypassed, since attach
        self.calls = 0    # calls that ran the model, since attach
        self._patches: List[ForwardPatch] = []
        self._residuals: Dict[Tuple[str, ...], Tensor] = {}
        self._call = None
        self._reusing = False
        self._x_in: Optional[Tensor] = None
        self.hook = None

    # ------------------------------------------------------------------ to override
    def decide(self, call, block: nn.Module, args: tuple, kwargs: dict) -> bool:
        """Whether this call reuses the cached residual (asked once per call, at the first block)."""
        return False

    def on_residual(self, call, residual: Tensor) -> None:
        """A computed call's residual ``[B, N, D]`` float32 (for calibrators)."""

    # ------------------------------------------------------------------ callbacks
    def on_attach(self, hook) -> None:
        self.hook = hook
        try:
            stack = hook.module.get_submodule(self.blocks_path)
        except AttributeError as exc:
            raise ValueError(f"taohooks: {type(self).__name__}: the model has no block stack "
                             f"{self.blocks_path!r} ({exc}); set its `blocks` to the module path of the blocks") from exc
        blocks: Sequence[nn.Module] = list(stack)
        if not blocks:
            raise ValueError(f"taohooks: block stack {self.blocks_path!r} is empty")
        self.reused = self.calls = 0
        self._patches = [ForwardPatch(b, self._make_block_forward(i, len(blocks), b)) for i, b in enumerate(blocks)]

    def on_detach(self, hook) -> None:
        for patch in reversed(self._patches):
            patch.restore()
        self._patches, self._residuals, self._call, self.hook = [], {}, None, None

    def on_sample_start(self, hook, sample: int) -> None:
        self._residuals = {}

    def on_sample_abort(self, hook, sample: int, reason: str) -> None:
        self._residuals, self._call = {}, None

    def on_before_call(self, hook, call, args, kwargs):
        self._call, self._reusing, self._x_in = call, False, None
        return None

    def on_after_call(self, hook, call, output) -> None:
        if call.computed and self._call is call:
            self.calls += 1
            self.reused += int(self._reusing)
        self._call, self._x_in = None, None

    # ------------------------------------------------------------------ the block wrappers
    def _make_block_forward(self, index: int, count: int, block: nn.Module):
        last = index == count - 1
        pos = self.hidden_arg

        def make(inner):
            def forward(*args, **kwargs):
                call = self._call
                if call is None:  # the model ran outside a hooked call: do nothing
                    return inner(*args, **kwargs)
                x = args[pos]
                if index == 0:
                    self._x_in = x
                    reuse = self.decide(call, block, args, kwargs)
                    cached = self._residuals.get(call.streams)
                    self._reusing = bool(reuse) and cached is not None and cached.shape == x.shape
                if self._reusing:
                    return (x.float() + self._residuals[call.streams]).to(x.dtype) if last else x
                out = inner(*args, **kwargs)
                if last:
                    residual = out.detach().float() - self._x_in.detach().float()
                    self._residuals[call.streams] = residual
                    self.on_residual(call, residual)
                return out
            return forward
        return make


class ResidualSkipCallback(BlockStackCache):
    """Reuse the block-stack residual exactly on the given steps (the paper's TaoSkip+TeaResidual
    ablation: TeaCache's residual reuse on the steps TaoCache skips)."""

    def __init__(self, steps: Sequence[int], blocks: str = "blocks", hidden_arg: int = 0):
        super().__init__(blocks, hidden_arg)
        self.steps = frozenset(int(s) for s in steps)

    def decide(self, call, block, args, kwargs) -> bool:
        return call.step in self.steps
