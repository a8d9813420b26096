"""Reusing the residual of a model's block stack (the mechanism of TeaCache and MagCache).

The residual of a call is ``stack output - stack input`` (float32): the input is the hidden state
the first block receives, the output the one the last block returns, or, for a model that runs
several interleaved stacks with reshapes between them (Latte, Open-Sora-Plan: spatial and temporal
blocks), the input of the ``exit`` module that follows the stacks (``norm_out``). On a call where a
subclass's :meth:`BlockStackCache.decide` says "reuse", every block passes its hidden state through
unchanged and the stack's output becomes ``input + cached residual`` of the same call slot (the
same stream(s)); embeddings and the final layer still run. Blocks are patched per instance.

**Several experts.** On a hook attached to several instances that share one loop (Wan2.2's
high-noise and low-noise experts: ``hook.attach(high, low)``), the blocks of every instance are
patched, and residuals are kept per expert: a call of one expert never reuses a residual the
other computed (nothing cached for that expert and stream yet: the call computes). ``expert``
says whose blocks run in the current call (0: ``hook.module``, then ``hook.also`` in order).

**Per sample.** ``decide`` may answer one verdict for the whole call, or one per *sample*: a
prompt of the batch (with batched CFG, its uncond and cond rows together). Samples that reuse get
their own rows of the residual; the others are computed. Then the blocks run on the computed rows
only (every tensor argument of a block whose first dimension equals its hidden state's is sliced
with it, ``row_subsets=True``), so that what each sample gets does not depend on how prompts were
batched. A block's rows map to samples when their number is a multiple of the model's batch
(Latte folds frames into rows: ``(b f) t d``). If the first block's rows do not, the call is decided
as one (every sample reuses only if all would); a later block whose rows do not runs on all of them
(the reused samples' rows are replaced at the stack's output anyway; a computed sample then gets
exactly what it gets alone only if that block keeps its rows apart).

Assumptions about the blocks: the hidden state is positional argument ``hidden_arg`` (default 0)
and each block returns the new hidden state as a tensor of the same shape (DiT, Wan2.1, Latte and
the testbed blocks do); rows of a block's hidden state do not interact (attention runs within a
row).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..runtime import messages
from ..runtime.callbacks import Callback
from ..runtime.patching import ForwardPatch

__all__ = ["BlockStackCache", "ResidualSkipCallback", "model_batch"]


def model_batch(args: tuple, kwargs: dict) -> Optional[int]:
    """The batch of a denoiser call: the first dimension of its first tensor argument, or the length
    of a first argument that is a list of tensors (Wan2.1); ``None`` when neither is there."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return int(value.shape[0]) if value.dim() else None
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, Tensor) for v in value):
            return len(value)
    return None


class BlockStackCache(Callback):
    """Base class: patches the blocks of ``module.get_submodule(path)`` for each path in ``blocks``,
    in every module the hook is attached to (``hook.module`` and ``hook.also``); subclasses decide.

    Args:
        blocks: module path of the ``nn.ModuleList`` of blocks, e.g. ``"blocks"``, or several paths
            (Latte: ``("transformer_blocks", "temporal_transformer_blocks")``; then ``exit`` is needed).
        hidden_arg: position of the hidden state in a block's arguments.
        exit: module path of the module whose first argument is the stack's output (``"norm_out"``);
            ``None``: the last block's output is.
        row_subsets: with per-sample verdicts, run the blocks on the computed samples' rows only.
    """

    def __init__(self, blocks: Union[str, Sequence[str]] = "blocks", hidden_arg: int = 0, *,
                 exit: Optional[str] = None, row_subsets: bool = True):
        self.blocks_paths: Tuple[str, ...] = (blocks,) if isinstance(blocks, str) else tuple(blocks)
        if not self.blocks_paths:
            raise ValueError("taohooks: BlockStackCache needs at least one block stack path")
        if len(self.blocks_paths) > 1 and exit is None:
            raise ValueError(f"taohooks: several block stacks {self.blocks_paths} need exit= (the module that "
                             "receives their output, e.g. 'norm_out')")
        self.exit_path = exit
        self.hidden_arg = hidden_arg
        self.row_subsets = row_subsets
        self.reused = 0.0  # calls whose block stack was bypassed since attach (half its samples reused: 0.5)
        self.calls = 0     # calls that ran the model, since attach
        self.last_reused = 0.0  # the last call's fraction of samples reused
        self._patches: List[ForwardPatch] = []
        self._residuals: Dict[Tuple[int, Tuple[str, ...]], Tensor] = {}  # (expert, streams) -> residual
        self.expert = 0  # whose blocks run in the current call: 0 = hook.module, then hook.also in order
        self._expert_of: Dict[int, int] = {}  # id(block) -> expert
        self._call = None
        self._batch: Optional[int] = None
        self._entered = self._left = False
        self._reuse: Optional[Tensor] = None  # per sample, bool [S]; None: compute everything
        self.partial = False  # in this call the blocks run on some samples' rows only (others reuse)
        self._x_in: Optional[Tensor] = None
        self._x_version: Optional[int] = None  # the input's version counter at the stack's entry
        self._x_first: Optional[Tensor] = None  # a copy of the input of a first computed call, compared after it
        self._input_checked: set = set()  # the (expert, streams) whose first computed call was compared
        self.copy_input = False  # the stack changes its input in place (h += f(h)): keep a copy of it
        self.hook = None

    # ------------------------------------------------------------------ to override
    def decide(self, call, block: nn.Module, args: tuple, kwargs: dict) -> Union[bool, Sequence[bool], Tensor]:
        """Whether this call reuses the cached residual: one verdict, or one per sample (see
        :meth:`samples_of_rows`). Asked once per call, at the first block, with its arguments."""
        return False

    def on_residual(self, call, residual: Tensor) -> None:
        """A computed call's residual (float32, the stack input's shape; for calibrators)."""

    def on_expert_switch(self, expert: int) -> None:
        """The loop moved on to ``expert`` (a two-expert loop, Wan2.2): state kept for the others is not
        used again (residuals are dropped here; subclasses drop what they keep per expert)."""

    def on_reuse_refused(self, call) -> None:
        """:meth:`decide` said reuse, but nothing of this expert and stream(s) is cached (its first call,
        or a change of shape), or the call is out of line (:meth:`DenoiserHook.in_line`): the call
        computes. Subclasses that count reuses reset here."""

    # ------------------------------------------------------------------ samples
    def samples_of_rows(self, rows: int) -> Optional[Tensor]:
        """``[rows]`` sample index of each row of a block's hidden state in this call, or ``None``
        when the rows do not map onto the model's batch. With batched CFG (``split_batch``) the
        batch holds one chunk per stream and row ``b`` of every chunk is sample ``b``."""
        batch = self._batch
        if not batch or rows % batch:
            return None
        item = torch.arange(rows) // (rows // batch)
        loop = self.hook.loop
        if loop.split_batch and batch % len(loop.streams) == 0:
            item = item % (batch // len(loop.streams))
        return item

    def samples(self) -> int:
        """Samples in this call (1 when the batch is unknown)."""
        batch = self._batch or 1
        loop = self.hook.loop
        return batch // len(loop.streams) if loop.split_batch and batch % len(loop.streams) == 0 else batch

    def reused_rows(self, rows: int) -> Optional[Tensor]:
        """``[rows]`` bool: which rows of a ``rows``-row hidden state reuse the residual in this call."""
        item = self.samples_of_rows(rows)
        return None if item is None or self._reuse is None else self._reuse[item]

    # ------------------------------------------------------------------ callbacks
    def on_attach(self, hook) -> None:
        self.hook = hook
        found = []  # (blocks, exit module) per expert, all looked up before anything is patched
        for module in (hook.module, *getattr(hook, "also", ())):
            exit_module = None
            if self.exit_path is not None:
                try:
                    exit_module = module.get_submodule(self.exit_path)
                except AttributeError as exc:
                    raise ValueError(f"taohooks: {type(self).__name__}: the model has no module {self.exit_path!r} "
                                     f"({exc}); set `exit` to the module that receives the block stacks' output"
                                     ) from exc
            found.append((self._blocks_of(module), exit_module))
        self.reused, self.calls = 0.0, 0
        self._patches, self._expert_of = [], {}
        for expert, (blocks, exit_module) in enumerate(found):
            self._expert_of.update((id(b), expert) for b in blocks)
            last = None if exit_module is not None else len(blocks) - 1
            self._patches += [ForwardPatch(b, self._make_block_forward(i == last, b)) for i, b in enumerate(blocks)]
            if exit_module is not None:
                self._patches.append(ForwardPatch(exit_module, self._make_exit_forward()))

    def _blocks_of(self, module: nn.Module) -> List[nn.Module]:
        blocks: List[nn.Module] = []
        for path in self.blocks_paths:
            try:
                stack = module.get_submodule(path)
            except AttributeError as exc:
                raise ValueError(f"taohooks: {type(self).__name__}: the model has no block stack {path!r} ({exc}); "
                                 "set its `blocks` to the module path of the blocks") from exc
            if not list(stack):
                raise ValueError(f"taohooks: block stack {path!r} is empty")
            blocks.extend(stack)
        return blocks

    def forward_patches(self) -> list:
        return list(reversed(self._patches))

    def drop_generation_state(self) -> None:
        """Drop the tensors one generation keeps (residuals, the current call's input): at its start, its end, an
        abort and detach, so that none stays on the device between generations (an offloading script moves the
        model off it and decodes) or after an exception (an out-of-memory error). Subclasses extend it."""
        self._residuals, self._call, self._x_in, self._x_first = {}, None, None, None
        self._reuse, self.partial = None, False

    def on_detach(self, hook) -> None:
        for patch in reversed(self._patches):
            patch.restore()
        self._patches, self.hook = [], None
        self.drop_generation_state()

    def on_sample_start(self, hook, sample: int) -> None:
        self.drop_generation_state()
        self.expert = 0

    def on_sample_end(self, hook, sample: int) -> None:
        self.drop_generation_state()

    def on_sample_abort(self, hook, sample: int, reason: str) -> None:
        self.drop_generation_state()

    def on_before_call(self, hook, call, args, kwargs):
        self._call, self._entered, self._left, self._reuse, self._x_in = call, False, False, None, None
        self._batch, self.partial = model_batch(args, kwargs), False
        return None

    def on_after_call(self, hook, call, output) -> None:
        if call.computed and self._call is call:
            if self._entered and not self._left:
                raise RuntimeError(f"taohooks: {type(self).__name__}: the blocks ran but the stack's output never "
                                   f"reached {self.exit_path!r} in this call; set `exit` to the module that receives "
                                   "the output of the last block (Latte: 'norm_out')")
            self.calls += 1
            fraction = 0.0 if self._reuse is None else int(self._reuse.sum()) / self._reuse.numel()
            self.last_reused = fraction
            self.reused += fraction
        self._call, self._x_in, self._x_first, self._reuse, self.partial = None, None, None, None, False

    # ------------------------------------------------------------------ the stack's ends
    def _enter(self, call, block, args, kwargs, x: Tensor) -> None:
        """At the first block of a call: ask :meth:`decide`, keep the input."""
        self._entered, self._x_in, self._x_version = True, (x.clone() if self.copy_input else x), _version(x)
        expert = self._expert_of.get(id(block), 0)
        if expert != self.expert:  # the loop moved on to another expert: its residuals are not used again
            self._residuals = {k: v for k, v in self._residuals.items() if k[0] == expert}
            self.expert = expert
            self.on_expert_switch(expert)
        if not self.copy_input and (self.expert, call.streams) not in self._input_checked:
            # once per expert and streams: an in-place change no version shows (inference tensors count none; a
            # kernel may write past it)
            self._x_first = x.detach().clone()
        verdict = self.decide(call, block, args, kwargs)
        if isinstance(verdict, (bool, int)) or (isinstance(verdict, Tensor) and verdict.dim() == 0):
            reuse = torch.full((self.samples(),), bool(verdict))
        else:
            reuse = torch.as_tensor(verdict, dtype=torch.bool).reshape(-1)
            if reuse.numel() != self.samples() or self.samples_of_rows(x.shape[0]) is None:
                reuse = torch.full((self.samples(),), bool(reuse.all()))
        cached = self._residuals.get((self.expert, call.streams))
        if cached is None or cached.shape != x.shape:
            if bool(reuse.any()):
                self.on_reuse_refused(call)
            return  # nothing to reuse: compute
        if not bool(reuse.any()):
            return
        if not self.hook.in_line(call):  # the residual is another generation's (the hook warned)
            self.on_reuse_refused(call)
            return
        self._reuse = reuse
        self.partial = not bool(reuse.all())

    def _leave(self, call, out: Tensor) -> Tensor:
        """The stack's output ``out``: computed rows update the residual, reused rows get ``input + residual``."""
        x_in, self._left = self._x_in, True
        if x_in is None or out.shape != x_in.shape:
            raise RuntimeError(f"taohooks: {type(self).__name__}: the block stack's output {tuple(out.shape)} differs "
                               f"from its input {tuple(() if x_in is None else x_in.shape)}; set `exit` to the module "
                               "that receives the output in the input's layout")
        if self._reuse is None:  # computed
            first, self._x_first = self._x_first, None
            if first is not None:
                self._input_checked.add((self.expert, call.streams))
            if not self.copy_input and (_changed_in_place(x_in, self._x_version, out)
                                        or (first is not None and not _same_values(x_in, first))):
                # out - in would be 0 (or a part of it): a copy of the input from now on
                self.copy_input = True
                messages.notice(f"{type(self).__name__}: the block stack changes its input in place (a residual added "
                                "with +=); it keeps a copy of the input of each call from now on, to reuse out - in")
                if first is None:  # (found after the first call: this call's input is lost)
                    self._residuals.pop((self.expert, call.streams), None)
                    return out
                x_in = first
            residual = out.detach().float() - x_in.detach().float()
            self._residuals[(self.expert, call.streams)] = residual
            self.on_residual(call, residual)
            return out
        stored = self._residuals[(self.expert, call.streams)]
        rows = self.reused_rows(out.shape[0])
        if rows is None or bool(rows.all()):  # every sample reuses
            return (x_in.float() + stored).to(out.dtype)
        rows = rows.to(out.device)
        computed = out.detach().float() - x_in.detach().float()
        stored[~rows] = computed[~rows]
        out = out.clone()
        out[rows] = (x_in[rows].float() + stored[rows]).to(out.dtype)
        return out

    # ------------------------------------------------------------------ the wrappers
    def _make_block_forward(self, last: bool, block: nn.Module):
        pos = self.hidden_arg

        def make(inner):
            def forward(*args, **kwargs):
                call = self._call
                if call is None:  # the model ran outside a hooked call: do nothing
                    return inner(*args, **kwargs)
                x = args[pos]
                if not self._entered:
                    self._enter(call, block, args, kwargs, x)
                if self._reuse is None:
                    out = inner(*args, **kwargs)
                else:
                    out = self._run_rows(inner, args, kwargs, x)
                return self._leave(call, out) if last else out
            return forward
        return make

    def _run_rows(self, inner, args: tuple, kwargs: dict, x: Tensor) -> Tensor:
        """A block on a call where some samples reuse: they pass through, the rest run."""
        if not self.partial:  # every sample reuses
            return x
        rows = self.reused_rows(x.shape[0])
        if rows is None:  # rows that do not map onto samples: all run (reused ones are replaced at the output)
            return inner(*args, **kwargs)
        if bool(rows.all()):
            return x
        if not self.row_subsets:
            out = inner(*args, **kwargs)
            return torch.where(rows.reshape(-1, *[1] * (x.dim() - 1)).to(x.device), x, out)
        keep = (~rows).nonzero().squeeze(1).to(x.device)
        n = x.shape[0]

        def sliced(v):
            return v.index_select(0, keep) if isinstance(v, Tensor) and v.dim() and v.shape[0] == n else v

        out_rows = inner(*[sliced(a) for a in args], **{k: sliced(v) for k, v in kwargs.items()})
        out = x.clone()
        out[keep] = out_rows.to(x.dtype)
        return out

    def _make_exit_forward(self):
        def make(inner):
            def forward(*args, **kwargs):
                call = self._call
                if call is None or not self._entered:
                    return inner(*args, **kwargs)
                return inner(self._leave(call, args[0]), *args[1:], **kwargs)
            return forward
        return make


def _version(t: Tensor) -> Optional[int]:
    """``t``'s version counter (bumped by every in-place change), or ``None`` for an inference-mode tensor."""
    try:
        return t._version
    except RuntimeError:  # inference tensors count no versions
        return None


def _changed_in_place(x_in: Tensor, version: Optional[int], out: Tensor) -> bool:
    """Whether the stack changed its input ``x_in`` in place: its version moved (or, in inference mode, where no
    version is counted, the output is the input's own storage: ``h += f(h)`` returned ``h``)."""
    now = _version(x_in)
    if version is not None and now is not None:
        return now != version
    return out.data_ptr() == x_in.data_ptr()


def _same_values(a: Tensor, b: Tensor) -> bool:
    """``a`` and ``b`` hold the same values, NaN where the other has NaN (``torch.equal`` calls a NaN unequal to
    itself, which made an input holding NaN look changed in place)."""
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


class ResidualSkipCallback(BlockStackCache):
    """Reuse the block-stack residual exactly on the given steps (the paper's TaoSkip+TeaResidual
    ablation: TeaCache's residual reuse on the steps TaoCache skips)."""

    def __init__(self, steps: Sequence[int], blocks: Union[str, Sequence[str]] = "blocks", hidden_arg: int = 0, **kw):
        super().__init__(blocks, hidden_arg, **kw)
        self.steps = frozenset(int(s) for s in steps)

    def decide(self, call, block, args, kwargs) -> bool:
        return call.step in self.steps
