"""EasyCache (Zhou et al. 2025, arXiv 2507.02860) as a callback: runtime-adaptive, no calibration.

The rule of its reference implementation (H-EmbodVis/EasyCache 51278044, ``EasyCache4Wan2.1/
easycache_generate.py``), on the model's own input ``x`` and output ``v`` of each call (``L1m`` is the
mean absolute value over all of a call's tensors)::

    after warm-up, not the last step, on the first call of a step (the cond call):
        E += k * L1m(x_t - x_{t-1}) / L1m(v_last)          (k: the last "transformation rate")
        E < threshold  ->  skip the step: every call returns x_t + (v_last - x_last) of its own stream(s)
        otherwise      ->  compute, E = 0
    on a computed first call:  k = L1m(v_t - v_last) / L1m(x_t - x_last),  then x_last, v_last = x_t, v_t

``x_{t-1}`` is the previous step's input (skipped or not), ``x_last``/``v_last`` those of the last computed
step; the other calls of a step follow the first call's decision, each stream keeping its own
``v - x``. The warm-up (10 steps in the authors' Wan2.1 script) and the last step are always computed.
One difference: the state is reset at every generation (the authors' script generates once per process
and keeps it). On a hook over several instances of one loop (Wan2.2's two experts) the state starts again when
the loop moves on to the next expert: its first steps compute, and no call of one expert returns the other's
``v - x`` (the first low-noise step answered with the high-noise expert's cost 33 dB: walkthrough, 2026-11-27).
The model's outputs must have its inputs' shapes (a velocity or a noise prediction of
the latent); a model whose output differs (a learned-variance channel half) computes every call.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from ..runtime import messages
from ..runtime.callbacks import Callback
from ..runtime.structure import flatten_output, float32_leaves

__all__ = ["EasyCacheCallback", "SOURCE", "INPUT_KEYWORDS"]

#: where the latent is looked for when the call has no positional argument ``input_arg``: Wan2.1's ``x``,
#: diffusers' ``hidden_states`` (its transformers take it by keyword), UNet-style ``sample``
INPUT_KEYWORDS = ("x", "hidden_states", "sample")

SOURCE = "H-EmbodVis/EasyCache 51278044023e678bb4026a264b02a6721f6dd395, EasyCache4Wan2.1/easycache_generate.py"


def _l1m(leaves: List[Tensor]) -> Tensor:
    return torch.cat([u.flatten() for u in leaves]).abs().mean()


class EasyCacheCallback(Callback):
    """EasyCache on a hook.

    Args:
        threshold: the accumulated estimated relative output change below which a step is skipped.
        warmup_steps: the first steps, always computed (the authors' Wan2.1 script: 10).
        compute_last_step: always compute the last step (the authors do).
        input_arg: where the latent is in the call: its position among the positional arguments (Wan2.1,
            the testbed: 0; a call without that many takes the first of the keywords ``INPUT_KEYWORDS`` it has),
            or a keyword's name.
    """

    def __init__(self, threshold: float, warmup_steps: int = 10, compute_last_step: bool = True,
                 input_arg: Union[int, str] = 0):
        if not threshold >= 0:
            raise ValueError(f"EasyCache threshold must be >= 0, got {threshold}")
        self.threshold = float(threshold)
        self.warmup_steps = int(warmup_steps)
        self.compute_last_step = compute_last_step
        if not isinstance(input_arg, (int, str)) or isinstance(input_arg, bool):
            raise TypeError(f"EasyCache input_arg must be a position (int) or a keyword (str), got {input_arg!r}")
        self.input_arg = input_arg
        self.skipped = 0  # calls answered from the cache, since attach
        self._reset()

    def _reset(self) -> None:
        self.k: Optional[float] = None
        self.accumulated = 0.0
        self._x_prev: Optional[List[Tensor]] = None
        self._x_last: Optional[List[Tensor]] = None
        self._v_last: Optional[List[Tensor]] = None
        self._cache: Dict[Tuple[str, ...], Tuple[List[Tensor], object]] = {}
        self._skip_step = False
        self._x: Optional[List[Tensor]] = None
        self._usable = True
        self._expert = 0  # the attached instance whose calls the state describes

    def on_attach(self, hook) -> None:
        self.skipped = 0
        self._reset()

    def on_sample_start(self, hook, sample: int) -> None:
        self._reset()

    # (nothing of a generation stays on the device after it: an offloading script moves the model off it, and an
    # exception may be an out-of-memory error)
    def on_sample_end(self, hook, sample: int) -> None:
        self._reset()

    def on_sample_abort(self, hook, sample: int, reason: str) -> None:
        self._reset()

    def on_detach(self, hook) -> None:
        self._reset()

    def _input(self, args: tuple, kwargs: dict) -> List[Tensor]:
        if isinstance(self.input_arg, str):
            names = (self.input_arg,)
        elif len(args) > self.input_arg:
            names, x = (), args[self.input_arg]
        else:
            names = INPUT_KEYWORDS
        if names:
            name = next((n for n in names if kwargs.get(n) is not None), None)
            if name is None:
                where = (f"keyword {self.input_arg!r}" if isinstance(self.input_arg, str) else
                         f"positional argument {self.input_arg} nor any of the keywords {', '.join(INPUT_KEYWORDS)}")
                raise TypeError(f"taohooks: EasyCache looks for the model's input latent, but this call has no {where} "
                                f"(its keywords: {', '.join(kwargs) or 'none'}); give EasyCacheCallback(input_arg=...) "
                                "the latent's position or keyword")
            x = kwargs[name]
        leaves, _ = flatten_output(x)
        return float32_leaves(leaves)  # (copies: the loop may update its latent in place, x -= dt * v)

    def on_before_call(self, hook, call, args, kwargs):
        if call.expert != self._expert:  # the loop moved on to another expert: nothing of the last one carries over
            usable = self._usable
            self._reset()
            self._usable, self._expert = usable, call.expert
        x = self._input(args, kwargs)
        self._x = x
        if call.index % hook.loop.calls_per_step == 0:  # the first call of the step decides
            self._skip_step = self._decide(call.step, hook.loop.steps, x)
        entry = self._cache.get(call.streams)
        if not (self._skip_step and self._usable and entry is not None) or not hook.in_line(call):
            return None
        delta, structure = entry
        if len(delta) != len(x) or any(d.shape != u.shape for d, u in zip(delta, x)):
            return None
        self.skipped += 1
        return structure.rebuild(structure.cast([u + d for u, d in zip(x, delta)]))

    def _decide(self, step: int, steps: int, x: List[Tensor]) -> bool:
        skip = False
        if step < self.warmup_steps or (self.compute_last_step and step == steps - 1):
            self.accumulated = 0.0
        elif self._x_prev is not None and self._v_last is not None:
            if self.k is not None:
                change = float(_l1m([a - b for a, b in zip(x, self._x_prev)]))
                self.accumulated += self.k * change / max(float(_l1m(self._v_last)), 1e-12)
                if self.accumulated < self.threshold:
                    skip = True
                else:
                    self.accumulated = 0.0
        self._x_prev = x
        return skip

    def on_after_call(self, hook, call, output) -> None:
        if not call.computed:
            return
        leaves, structure = flatten_output(output)
        v = float32_leaves(leaves)  # (copies: the loop may change the output in place, CFG)
        x, self._x = self._x, None
        if x is None:
            return
        if len(v) != len(x) or any(a.shape != b.shape for a, b in zip(v, x)):
            if self._usable:
                self._usable = False
                messages.warning(f"EasyCache: the model's output {[list(t.shape) for t in v]} is not shaped like its "
                                 f"input {[list(t.shape) for t in x]}; EasyCache reuses output - input, so it computes "
                                 "every call of this generation", once="easycache shapes")
            return
        if call.index % hook.loop.calls_per_step == 0:
            if self._v_last is not None and self._x_last is not None:
                self.k = float(_l1m([a - b for a, b in zip(v, self._v_last)])) / max(
                    float(_l1m([a - b for a, b in zip(x, self._x_last)])), 1e-12)
            self._x_last, self._v_last = x, v
        self._cache[call.streams] = ([a - b for a, b in zip(v, x)], structure)
