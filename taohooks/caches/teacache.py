"""TeaCache (Liu et al. 2024) as a callback, and the calibration of its rescaling polynomial.

Per call slot (stream), with ``p_t`` a cheap input proxy seen at the first block (by default the
block's hidden-state input; TeaCache uses the timestep-modulated input, given as ``probe``)::

    rel_t = mean|p_t - p_{t-1}| / mean|p_{t-1}|
    acc  += poly(rel_t)                     (4th-order polynomial fitted on the model)
    acc < threshold  ->  reuse the block-stack residual of the last computed call
    otherwise        ->  compute, acc = 0

The first ``warmup_steps`` and the last step are always computed. ``TeaCacheCalibrator`` records
``(rel-L1 of the proxy, rel-L1 of the model output)`` over full-step runs and fits the polynomial
the way the TeaCache authors fit theirs (``numpy.polyfit(x, y, 4)``).

Two guards the authors' code does not need with their published polynomials (positive over the
range they were fitted on) but a fit on another model can: a negative value of the polynomial is
counted as 0 (the accumulated change never decreases), and :meth:`TeaCacheCalibrator.fit` refuses a
fit that is negative anywhere on the recorded range, falling back to the proportional fit
``y = a x`` with a warning (a negative fit made every late call look unchanged and reused at any
threshold).
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .residual import BlockStackCache
from ..runtime import messages
from ..runtime.structure import flatten_output, float32_copy, float32_leaves

__all__ = ["TeaCacheCallback", "TeaCacheCalibrator", "relative_l1", "Probe"]

Probe = Callable[[nn.Module, tuple, dict], Tensor]
"""``probe(first_block, args, kwargs) -> Tensor``: the proxy TeaCache compares between calls."""


def relative_l1(current: Tensor, previous: Tensor) -> float:
    """``mean|current - previous| / mean|previous|`` in float32."""
    current, previous = current.float(), previous.float()
    return float((current - previous).abs().mean() / previous.abs().mean().clamp(min=1e-12))


class _Accumulator:
    __slots__ = ("previous", "accumulated")

    def __init__(self):
        self.previous: Optional[Tensor] = None
        self.accumulated: List[float] = []  # per sample


def grouped_relative_l1(current: Tensor, previous: Tensor, item: Optional[Tensor]) -> List[float]:
    """:func:`relative_l1` per sample: ``item`` ``[rows]`` is each row's sample (``None``: one sample)."""
    if item is None or int(item.max()) == 0:
        return [relative_l1(current, previous)]
    current, previous = current.float(), previous.float()
    count = int(item.max()) + 1
    item = item.to(current.device)
    change = current.sub(previous).abs().flatten(1).mean(1)
    size = previous.abs().flatten(1).mean(1)
    change = torch.zeros(count, device=current.device).index_add_(0, item, change)
    size = torch.zeros(count, device=current.device).index_add_(0, item, size)
    return (change / size.clamp(min=1e-12)).tolist()


class TeaCacheCallback(BlockStackCache):
    """TeaCache on a hook.

    Args:
        threshold: ``rel_l1_thresh``; larger skips more.
        coefficients: the rescaling polynomial, highest power first (``numpy.poly1d`` order); or one per
            expert of a two-expert hook (``{expert: coefficients}``, :meth:`TeaCacheCalibrator.fit_per_expert`).
        probe: the proxy; ``None`` uses the first block's hidden-state input.
        warmup_steps: always compute steps ``< warmup_steps``.
        compute_last_step: always compute the last step.
        max_step: never reuse at steps ``>= max_step`` (the hybrid's TeaCache range ends there).
        clamp_negative: count a negative polynomial value as 0 (the default); ``False`` adds it, as
            the authors' scripts do with their published coefficients (:mod:`.teacache_wan21`).
        per_sample: one accumulator per sample of the batch (a prompt, its CFG halves together), so
            that what a prompt gets does not depend on the prompts batched with it; ``False``: one per
            call, the proxy's change measured over the whole batch (the authors' scripts, which run
            one prompt at a time, cannot tell the two apart).
        blocks, exit: the block stack(s) whose residual is reused (:class:`.BlockStackCache`).
    """

    def __init__(self, threshold: float, coefficients: Sequence[float], *, probe: Optional[Probe] = None,
                 blocks: Union[str, Sequence[str]] = "blocks", hidden_arg: int = 0, warmup_steps: int = 1,
                 compute_last_step: bool = True, max_step: Optional[int] = None, clamp_negative: bool = True,
                 per_sample: bool = True, exit: Optional[str] = None):
        super().__init__(blocks, hidden_arg, exit=exit)
        if threshold < 0:
            raise ValueError(f"TeaCache threshold must be >= 0, got {threshold}")
        self.threshold = float(threshold)
        if isinstance(coefficients, Mapping):
            self.coefficients_by_expert = {int(e): [float(c) for c in cs] for e, cs in coefficients.items()}
            if not self.coefficients_by_expert:
                raise ValueError("TeaCache needs coefficients (an empty mapping was given)")
            self.coefficients = self.coefficients_by_expert[min(self.coefficients_by_expert)]
        else:
            self.coefficients_by_expert = None
            self.coefficients = [float(c) for c in coefficients]
        self.probe = probe
        self.warmup_steps = warmup_steps
        self.compute_last_step = compute_last_step
        self.max_step = max_step
        self.clamp_negative = clamp_negative
        self.per_sample = per_sample
        self._acc: Dict[Tuple[int, Tuple[str, ...]], _Accumulator] = {}  # (expert, streams) -> accumulator

    def rescale(self, rel: float) -> float:
        """The estimated output change for a proxy change ``rel`` (never negative with ``clamp_negative``),
        with the current expert's polynomial where there is one per expert."""
        coefficients = self.coefficients
        if self.coefficients_by_expert is not None:
            coefficients = self.coefficients_by_expert.get(self.expert, coefficients)
        value = 0.0
        for c in coefficients:  # Horner
            value = value * rel + c
        return max(value, 0.0) if self.clamp_negative else value

    def drop_generation_state(self) -> None:
        super().drop_generation_state()
        self._acc = {}

    def on_expert_switch(self, expert: int) -> None:
        self._acc = {k: v for k, v in self._acc.items() if k[0] == expert}  # (their proxies can be large)

    def decide(self, call, block, args, kwargs) -> List[bool]:
        proxy = float32_copy(self.probe(block, args, kwargs) if self.probe else args[self.hidden_arg])
        item = self.samples_of_rows(proxy.shape[0]) if self.per_sample else None
        count = 1 if item is None else self.samples()
        state = self._acc.setdefault((self.expert, call.streams), _Accumulator())
        steps = self.hook.loop.steps
        forced = (call.step < self.warmup_steps or (self.compute_last_step and call.step == steps - 1)
                  or (self.max_step is not None and call.step >= self.max_step)
                  or state.previous is None or state.previous.shape != proxy.shape
                  or len(state.accumulated) != count)
        if forced:
            state.accumulated = [0.0] * count
            reuse = [False] * count
        else:
            reuse = []
            for s, rel in enumerate(grouped_relative_l1(proxy, state.previous, item)):
                state.accumulated[s] += self.rescale(rel)
                reuse.append(state.accumulated[s] < self.threshold)
                if not reuse[-1]:
                    state.accumulated[s] = 0.0
        state.previous = proxy
        return reuse


class TeaCacheCalibrator(BlockStackCache):
    """Records ``(rel-L1 of the proxy, rel-L1 of the model output)`` between consecutive calls
    of each slot during full-step runs; :meth:`fit` returns the polynomial coefficients."""

    def __init__(self, *, probe: Optional[Probe] = None, blocks: Union[str, Sequence[str]] = "blocks",
                 hidden_arg: int = 0, per_sample: bool = True, exit: Optional[str] = None):
        super().__init__(blocks, hidden_arg, exit=exit)
        self.probe = probe
        self.per_sample = per_sample
        self.pairs: List[Tuple[float, float]] = []
        self.pair_experts: List[int] = []  # the expert of each pair (0 on one model)
        self._previous: Dict[Tuple[int, Tuple[str, ...]], Tuple[Tensor, List[Tensor]]] = {}  # (expert, streams)
        self._proxy: Optional[Tensor] = None

    def drop_generation_state(self) -> None:
        super().drop_generation_state()
        self._previous, self._proxy = {}, None

    def on_expert_switch(self, expert: int) -> None:
        self._previous = {k: v for k, v in self._previous.items() if k[0] == expert}

    def decide(self, call, block, args, kwargs) -> bool:
        self._proxy = float32_copy(self.probe(block, args, kwargs) if self.probe else args[self.hidden_arg])
        return False

    def on_after_call(self, hook, call, output) -> None:
        proxy, self._proxy = self._proxy, None
        leaves = float32_leaves(flatten_output(output)[0])  # (copies: the loop may change the output in place)
        # one pair per sample where the proxy's rows and the (single) output's rows map onto samples
        item = self.samples_of_rows(proxy.shape[0]) if self.per_sample and proxy is not None else None
        out_item = self.samples_of_rows(leaves[0].shape[0]) if item is not None and len(leaves) == 1 else None
        if out_item is None:
            item = None
        super().on_after_call(hook, call, output)
        if proxy is None or not call.computed:
            return
        key = (self.expert, call.streams)  # no pair across the experts of a two-expert loop (Wan2.2)
        previous = self._previous.get(key)
        if previous is not None and previous[0].shape == proxy.shape:
            if item is None:
                out_rel = [sum(float((a - b).abs().mean()) for a, b in zip(leaves, previous[1])) / max(
                    sum(float(b.abs().mean()) for b in previous[1]), 1e-12)]
            else:
                out_rel = grouped_relative_l1(leaves[0], previous[1][0], out_item)
            new = list(zip(grouped_relative_l1(proxy, previous[0], item), out_rel))
            self.pairs.extend(new)
            self.pair_experts.extend([self.expert] * len(new))
        self._previous[key] = (proxy, leaves)

    def fit_per_expert(self, degree: int = 4) -> Union[List[float], Dict[int, List[float]]]:
        """:meth:`fit` of one model, or ``{expert: coefficients}`` where the pairs came from several
        experts (Wan2.2: each expert's time embedding maps to its output its own way)."""
        experts = sorted(set(self.pair_experts))
        if len(experts) <= 1:
            return self.fit(degree)
        counts = {e: self.pair_experts.count(e) for e in experts}
        few = [e for e in experts if counts[e] <= degree]
        if few:
            messages.notice(f"TeaCache: expert(s) {', '.join(map(str, few))} recorded {degree} pairs or fewer; "
                            "one polynomial is fitted on all experts' pairs instead of one per expert")
            return self.fit(degree)
        return {e: self.fit(degree, expert=e) for e in experts}

    def fit(self, degree: int = 4, expert: Optional[int] = None) -> List[float]:
        """Least-squares polynomial ``output rel-L1 ~ poly(input rel-L1)``, highest power first, on all
        pairs or on ``expert``'s.

        If it is negative anywhere on the recorded input range, a warning says so and the
        proportional fit ``a x`` (``a = sum(xy) / sum(x^2)``, padded to ``degree``) is returned instead."""
        import numpy as np

        pairs = self.pairs if expert is None else [p for p, e in zip(self.pairs, self.pair_experts) if e == expert]
        what = "" if expert is None else f" of expert {expert}"
        if len(pairs) <= degree:
            raise RuntimeError(f"TeaCache calibration has {len(pairs)} pairs{what}; run more full-step generations")
        x, y = np.array(pairs, dtype=np.float64).T
        with warnings.catch_warnings(record=True) as caught:  # (said on the stderr channel: scripts silence warnings)
            warnings.simplefilter("always", getattr(np, "exceptions", np).RankWarning)
            coefficients = np.polyfit(x, y, degree)
        if any(issubclass(w.category, getattr(np, "exceptions", np).RankWarning) for w in caught):
            messages.warning(f"TeaCache's degree-{degree} polynomial{what} is poorly conditioned: {len(pairs)} pairs "
                             f"with {len(np.unique(x))} distinct proxy changes ({x.min():.4g} to {x.max():.4g}); "
                             "its values between them are not to be trusted: calibrate on more prompts, or on more "
                             "steps where the proxy depends on the timestep alone (Wan's time projection: one change "
                             "per step, whatever the prompt)")
        grid = np.linspace(x.min(), x.max(), 2001)
        values = np.polyval(coefficients, grid)
        if values.min() < 0:
            negative = grid[values < 0]
            a = float((x * y).sum() / max((x * x).sum(), 1e-30))
            messages.warning(
                f"TeaCache's fitted degree-{degree} polynomial{what} is negative for proxy changes {negative.min():.4g} to "
                f"{negative.max():.4g} (recorded: {x.min():.4g} to {x.max():.4g}), which would make those calls look "
                f"unchanged at any threshold; using the proportional fit {a:.4g} * x instead")
            return [0.0] * (degree - 1) + [a, 0.0]
        return [float(c) for c in coefficients]
