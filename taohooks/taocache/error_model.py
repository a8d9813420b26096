"""Predicted error of a skip schedule, from the calibrated delta products (open loop).

TaoCache's output at a skip step ``t`` is ``eps_{t-1} + a_t * d_{t-1}``: the last output used plus
``a_t`` times the last delta used (real or predicted). Write the error of what is used as a
combination of the real deltas ``D_i``::

    skip t:      delta_err_t = a_t * (D_{t-1} + delta_err_{t-1}) - D_t,  eps_err_t = eps_err_{t-1} + delta_err_t
    computed t:  delta_err_t = -eps_err_{t-1},                           eps_err_t = 0

(a computed step after a skip takes its delta against the predicted output: the drift a refresh
carries forward). The sampler adds each step's output to the latent with a weight ``w_t``
(``d sigma`` of flow matching with Euler; :func:`sampler_weights`), so the error reaching the
final latent is, to first order and with the model's own outputs unchanged (open loop)::

    F = sum_t w_t eps_err_t,      E ||F||^2 = sum_ij F_i F_j <D_i, D_j>

averaged over the calibration prompts. A *chain* is a run of steps whose errors depend on each
other: skips separated by at most one computed step. Chains separated by two or more computed
steps restart from real outputs, and their errors are added as uncorrelated (squares add). A
chain that spans more steps than the products' horizon has no estimate (NaN).

Errors are reported as mean squared error per output element, averaged over streams, and as
the PSNR of a ``[-1, 1]`` latent with that error (``predicted_psnr``). Under classifier-free guidance
at scale ``s`` the guided output's error is ``s e_c - (s - 1) e_u``: a stream's where the streams' errors
are alike, ``s^2 + (s - 1)^2`` times it where they are unrelated and of one size, up to ``(2s - 1)^2``
times it where they point against each other. Given the scale (:class:`Guidance`, ``plan.guidance_scale``) and
a LUT with the products between the streams (``DeltaGram.cross``), the model predicts the guided output's error
itself::

    E ||s F_c - (s - 1) F_u||^2 = s^2 Q_cc + (s - 1)^2 Q_uu - 2 s (s - 1) Q_cu

one quadratic form over both streams' deltas (``Q_cu = sum_ij F_c,i F_u,j <D^c_i, D^u_j>``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .delta_gram import DeltaGram

__all__ = ["ChainError", "ErrorModel", "Guidance", "chains_of", "sampler_weights", "predicted_psnr", "WEIGHT_SCHEMES",
           "ddpm_alphas_cumprod"]

WEIGHT_SCHEMES = ("flow", "ddpm", "uniform")
SKIP, REFRESH, COMPUTE = "skip", "refresh", "compute"


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def ddpm_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                        beta_end: float = 0.02, beta_schedule: str = "linear") -> Tensor:
    """``alpha_bar`` of a beta schedule as diffusers defines it: ``linear`` (Latte, Open-Sora-Plan, the testbed
    ``eps`` model), ``scaled_linear`` (linear in ``sqrt(beta)``), ``squaredcos_cap_v2`` (cosine, betas capped at
    0.999)."""
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        n = num_train_timesteps
        betas = torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                             dtype=torch.float64)
    else:
        raise ValueError(f"beta_schedule {beta_schedule!r} has no DDPM weights here (one of "
                         f"{', '.join(BETA_SCHEDULES)}); set plan.error_weights: uniform")
    return torch.cumprod(1.0 - betas, dim=0)


def sampler_weights(timesteps: Tensor, scheme: str, betas: Optional[Mapping[str, Any]] = None) -> Tensor:
    """``[steps]`` weight of each step's output in the final latent (first order, float64).

    ``flow``: ``sigma_t - sigma_{t+1}`` with ``sigma = timestep / 1000`` (flow matching, the timestep
    the model sees is ``1000 sigma``; the last step goes to 0). ``ddpm``: DDIM's weight of an eps
    error in the clean sample, ``s_t - s_{t+1}`` with ``s = sqrt((1 - alpha_bar) / alpha_bar)`` of the
    beta schedule ``betas`` gives (:func:`ddpm_alphas_cumprod`'s arguments, e.g. the LUT's recorded
    ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``; the linear 1e-4..0.02 schedule of
    1000 steps where it gives none; the last step goes to ``alpha_bar = 1``). ``uniform``: 1.
    """
    t = timesteps.to(torch.float64)
    if scheme == "uniform":
        return torch.ones_like(t)
    if torch.isnan(t).any():
        missing = torch.isnan(t).nonzero().flatten().tolist()
        which = "none" if len(missing) == len(t) else f"none for steps {missing}"
        raise ValueError(f"sampler weights '{scheme}' need every step's timestep, and the LUT records {which} (the "
                         "calibrating hook could not read the model's timestep: calibrate with timestep_arg= "
                         "naming it); or plan.error_weights: uniform")
    if scheme == "flow":
        sigma = torch.cat([t / 1000.0, t.new_zeros(1)])
        return sigma[:-1] - sigma[1:]
    if scheme == "ddpm":
        ab = ddpm_alphas_cumprod(**dict(betas or {}))
        idx = t.round().long().clamp(0, len(ab) - 1)
        s = torch.cat([((1 - ab[idx]) / ab[idx]).sqrt(), t.new_zeros(1)])
        return s[:-1] - s[1:]
    raise ValueError(f"unknown sampler weight scheme {scheme!r} (one of {', '.join(WEIGHT_SCHEMES)})")


def predicted_psnr(mse: float, data_range: float = 2.0) -> float:
    """PSNR (dB) of a latent in ``[-1, 1]`` whose mean squared error is ``mse`` (inf for 0)."""
    if not mse > 0:
        return math.inf if mse == 0 else math.nan
    return 10.0 * math.log10(data_range ** 2 / mse)


def chains_of(actions: Sequence[str]) -> List[Tuple[int, int]]:
    """Inclusive spans ``(first skip, last skip)`` of the chains of a schedule: skips separated by at
    most one computed step (a refresh) belong to one chain."""
    skips = [t for t, a in enumerate(actions) if a == SKIP]
    chains: List[Tuple[int, int]] = []
    for t in skips:
        if chains and t - chains[-1][1] <= 2:
            chains[-1] = (chains[-1][0], t)
        else:
            chains.append((t, t))
    return chains


@dataclass(frozen=True)
class ChainError:
    """Predicted error of one chain: mean squared error per element, averaged over streams, its
    values per prompt ``[prompts]``, and the open-loop error of each skip's output relative to the
    real output's delta (``step_errors``: step -> ``||eps_err_t|| / ||D_t||``, mean over prompts and
    streams)."""

    first: int
    last: int
    mse: float
    per_prompt: Tensor
    step_errors: Dict[int, float]


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance over a LUT's two streams: the output the sampler uses at step ``t`` is
    ``uncond + s_t (cond - uncond)``; ``scale`` is ``s``, one number or one per step (``[steps]``: Wan2.2's two
    experts guide at two scales); ``cond`` and ``uncond`` index the streams."""

    scale: Union[float, Tuple[float, ...]]
    cond: int
    uncond: int

    @classmethod
    def of(cls, streams: Sequence[str], scale: Union[float, Sequence[float]]) -> "Guidance":
        """The guidance of the streams named ``cond`` and ``uncond`` (ValueError if the LUT has other streams)."""
        if sorted(streams) != ["cond", "uncond"]:
            raise ValueError(f"plan.guidance_scale weighs the streams 'cond' and 'uncond', and the LUT has "
                             f"{', '.join(repr(s) for s in streams)}: leave plan.guidance_scale null (each stream's "
                             "error, averaged)")
        scale = tuple(float(s) for s in scale) if isinstance(scale, (tuple, list)) else float(scale)
        return cls(scale, list(streams).index("cond"), list(streams).index("uncond"))

    def per_step(self, steps: int) -> Tensor:
        """``[steps]`` float64 scale of each step."""
        if isinstance(self.scale, tuple):
            if len(self.scale) != steps:
                raise ValueError(f"a guidance scale per step needs {steps} values, got {len(self.scale)}")
            return torch.tensor(self.scale, dtype=torch.float64)
        return torch.full((steps,), self.scale, dtype=torch.float64)


class ErrorModel:
    """Predicts the error of schedules for one LUT's delta products.

    Args:
        gram: the calibrated products.
        weights: ``[steps]`` sampler weights (:func:`sampler_weights`).
        guidance: predict the guided output's error (the LUT's prompts with cross-stream products); None: each
            stream's error, averaged over the streams.
    """

    def __init__(self, gram: DeltaGram, weights: Tensor, guidance: Optional[Guidance] = None):
        if gram.prompts == 0:
            raise ValueError("no delta products recorded (an empty calibration)")
        self.gram = gram
        self.steps = gram.gram.shape[2]
        self.streams = gram.gram.shape[1]
        self.horizon = gram.horizon
        self.weights = weights.to(torch.float64)
        self.guidance = guidance
        # each stream's weight of a step's output error in what the sampler uses: the weight itself, or under
        # guidance s_t w_t (cond) and (1 - s_t) w_t (uncond), so that the guided error is the streams' sum
        self.stream_weights = self.weights.repeat(self.streams, 1)
        if guidance is not None and self.streams == 2:
            s = guidance.per_step(self.steps)
            self.stream_weights = torch.stack([self.weights * s, self.weights * (1.0 - s)])[
                [0, 1] if guidance.cond == 0 else [1, 0]]
        # the LUT's still prompts (outputs that never moved: every product 0) say nothing of the errors: left out
        # (their zeros were averaged in, a best prompt of inf dB)
        moving = gram.gram[..., 0].nan_to_num(0.0).abs().flatten(1).amax(1) > 0  # [prompts]
        keep = moving if bool(moving.any()) else torch.ones_like(moving)
        self.prompts_moving = int(keep.sum())
        if guidance is not None:
            if self.streams == 2 and gram.numel[guidance.cond] != gram.numel[guidance.uncond]:
                raise ValueError(f"the LUT's streams have outputs of {gram.numel[guidance.cond]} and "
                                 f"{gram.numel[guidance.uncond]} elements: no guided output combines them")
            keep = keep & gram.cross_prompts
            if self.streams != 2 or not bool(keep.any()):
                raise ValueError("the LUT records no products between its two streams' deltas (calibrated by a "
                                 "taohooks before 2026-11-29, or of one stream), so the guided output's error cannot "
                                 "be estimated: calibrate a new LUT, or leave plan.guidance_scale null")
        products = gram.gram[keep]
        self.prompts_used = int(keep.sum())
        # dense [streams, prompts, steps, steps] <D_i, D_j> (NaN beyond the horizon / unrecorded)
        p, s, t, h = products.shape
        dense = torch.full((s, p, t, t), float("nan"), dtype=torch.float64)
        for j in range(min(h, t)):
            i = torch.arange(j, t)
            band = products[:, :, j:, j].permute(1, 0, 2)  # [s, p, t - j]
            dense[:, :, i, i - j] = band
            dense[:, :, i - j, i] = band
        self.dense = dense
        self.numel = torch.tensor([max(n, 1) for n in gram.numel], dtype=torch.float64)
        # the quadratic forms whose sum is the error: each stream's, or one over both streams' deltas (guided)
        if guidance is None:
            self.terms, self.term_numel, self.term_divisor = dense, self.numel, self.streams
        else:
            c, u = guidance.cond, guidance.uncond
            cross = gram.cross_dense()[keep]  # <D^0_i, D^1_j>
            cu = cross if c == 0 else cross.transpose(1, 2)  # <D^c_i, D^u_j>
            joint = torch.cat([torch.cat([dense[c], cu], dim=2), torch.cat([cu.transpose(1, 2), dense[u]], dim=2)],
                              dim=1)
            self.terms, self.term_numel, self.term_divisor = joint[None], self.numel[c:c + 1], 1

    def combine(self, per_stream: Sequence[Any]) -> List[Any]:
        """Each term's vector from the streams' vectors (``[steps]`` tensors or arrays, or slices of them, summed
        with :attr:`stream_weights`): the streams' own, or ``[F_c, F_u]`` joined under guidance."""
        g = self.guidance
        if g is None:
            return list(per_stream)
        c, u = per_stream[g.cond], per_stream[g.uncond]
        return [torch.cat([c, u]) if isinstance(c, Tensor) else np.concatenate([c, u])]

    def term_index(self, lo: int, hi: int) -> np.ndarray:
        """The rows of a term's matrix that :meth:`combine` of the slices ``[lo:hi + 1]`` fills."""
        rows = np.arange(lo, hi + 1)
        return rows if self.guidance is None else np.concatenate([rows, rows + self.steps])

    # ------------------------------------------------------------------ one chain
    def _vectors(self, actions: Sequence[str], coefficients: Sequence[Optional[float]], first: int,
                 last: int, stream: int = 0) -> Tuple[Tensor, Dict[int, Tensor]]:
        """``F`` (weighted error sum, ``[steps]`` over deltas) and each skip's ``eps_err`` for the
        chain whose skips span ``first..last`` of ``stream``; the chain restarts from real outputs at ``first``."""
        n = self.steps
        eps_err = torch.zeros(n, dtype=torch.float64)
        delta_err = torch.zeros(n, dtype=torch.float64)
        total = torch.zeros(n, dtype=torch.float64)
        per_step: Dict[int, Tensor] = {}
        for t in range(first, last + 1):
            if actions[t] == SKIP:
                a = float(coefficients[t])
                new_delta = a * delta_err
                new_delta[t - 1] += a
                new_delta[t] -= 1.0
                delta_err, eps_err = new_delta, eps_err + new_delta
                per_step[t] = eps_err.clone()
                total += float(self.stream_weights[stream, t]) * eps_err
            else:
                delta_err, eps_err = -eps_err, torch.zeros(n, dtype=torch.float64)
        return total, per_step

    def _quadratic(self, v: Tensor, stream: int, matrices: Optional[Tensor] = None) -> Tensor:
        """``E ||sum_i v_i D_i||^2`` per prompt ``[prompts]`` (NaN if a needed product is unknown) of one stream
        (``matrices``: :attr:`dense`) or one term (:attr:`terms`)."""
        idx = v.nonzero().flatten()
        if idx.numel() == 0:
            return torch.zeros(self.dense.shape[1], dtype=torch.float64)
        sub = (self.dense if matrices is None else matrices)[stream][:, idx][:, :, idx]  # [p, k, k]
        w = v[idx]
        # a square norm: >= 0; below 0 only by rounding, where the terms cancel (an exact extrapolation)
        return torch.einsum("i,pij,j->p", w, sub, w).clamp(min=0.0)

    def _term_vectors(self, actions: Sequence[str], coefficients: Sequence[Sequence[Optional[float]]], first: int,
                      last: int) -> List[Tensor]:
        return self.combine([self._vectors(actions, coefficients[s], first, last, s)[0] for s in range(self.streams)])

    def _term_mse(self, vectors: Sequence[Tensor]) -> Tensor:
        """Mean squared error per element per prompt of the terms' vectors."""
        per_prompt = torch.zeros(self.dense.shape[1], dtype=torch.float64)
        for k, v in enumerate(vectors):
            per_prompt = per_prompt + self._quadratic(v, k, self.terms) / self.term_numel[k] / self.term_divisor
        return per_prompt

    def chain(self, actions: Sequence[str], coefficients: Sequence[Sequence[Optional[float]]], first: int,
              last: int) -> ChainError:
        """Error of the chain ``first..last`` of ``actions``; ``coefficients[stream][t]`` at its skips."""
        step_errors: Dict[int, float] = {}
        for s in range(self.streams):
            _, per_step = self._vectors(actions, coefficients[s], first, last, s)
            for t, v in per_step.items():
                real = self.dense[s, :, t, t]
                rel = (self._quadratic(v, s) / real).sqrt().mean()
                step_errors[t] = step_errors.get(t, 0.0) + float(rel) / self.streams
        per_prompt = self._term_mse(self._term_vectors(actions, coefficients, first, last))
        return ChainError(first, last, float(per_prompt.mean()), per_prompt, step_errors)

    def chain_mse(self, actions: Sequence[str], coefficients: Sequence[Sequence[Optional[float]]], first: int,
                  last: int) -> float:
        """Mean squared error per element of one chain (NaN beyond the horizon); the planner's cost."""
        if last - first + 1 > self.horizon:  # the products reach back to D_{first - 1}
            return math.nan
        mse = 0.0
        for k, v in enumerate(self._term_vectors(actions, coefficients, first, last)):
            mse += float(self._quadratic(v, k, self.terms).mean()) / float(self.term_numel[k]) / self.term_divisor
        return mse

    # ------------------------------------------------------------------ whole schedules
    def schedule(self, actions: Sequence[str], coefficients: Sequence[Sequence[Optional[float]]]) -> "ScheduleError":
        """Error of a whole schedule: each chain's own error, plus, for every two chains whose products were all
        calibrated (the pair spans at most the horizon), the correlation between them; a pair reaching beyond the
        horizon is taken as uncorrelated (squares add), and where the known correlations then cancel more than
        the chains' errors (a prompt below 0) all chains are added as uncorrelated. Exact in open loop when every
        pair is within the horizon; NaN if a chain itself spans more than the horizon.

        (Earlier, the products beyond the horizon were taken as 0 inside one quadratic form with the known ones:
        not a Gram matrix, so per-prompt squared norms could come out negative, clamped to 0, and two distant
        skips were predicted as no error at all.)"""
        spans = chains_of(actions)
        chains = tuple(self.chain(actions, coefficients, a, b) for a, b in spans)
        prompts = self.dense.shape[1]
        if not chains:
            return ScheduleError(chains, 0.0, torch.zeros(prompts, dtype=torch.float64))
        if any(c.last - c.first + 1 > self.horizon for c in chains):
            nan = torch.full((prompts,), float("nan"), dtype=torch.float64)
            return ScheduleError(chains, math.nan, nan)
        uncorrelated = torch.stack([c.per_prompt for c in chains]).sum(0)
        pairs = [(i, j) for i in range(len(spans)) for j in range(i + 1, len(spans))
                 if spans[j][1] - spans[i][0] + 1 <= self.horizon]
        per_prompt = uncorrelated
        if pairs:
            by_chain = [self._term_vectors(actions, coefficients, a, b) for a, b in spans]
            for k in range(len(self.terms)):
                v = [terms[k] for terms in by_chain]
                own = [self._quadratic(x, k, self.terms) for x in v]
                for i, j in pairs:  # 2 <F_i, F_j>, from the squared norm of their sum
                    per_prompt = per_prompt + (self._quadratic(v[i] + v[j], k, self.terms) - own[i] - own[j]) \
                        / self.term_numel[k] / self.term_divisor
            # >= 0 whenever every pair is known (a squared norm); with a pair beyond the horizon the known
            # correlations alone can cancel more than there is: then the chains are added as uncorrelated
            tolerance = 1e-9 * float(uncorrelated.abs().max())
            if len(pairs) < len(spans) * (len(spans) - 1) // 2 and bool((per_prompt < -tolerance).any()):
                per_prompt = uncorrelated
            per_prompt = per_prompt.clamp(min=0.0)  # (rounding, where an exact extrapolation cancels)
        return ScheduleError(chains, float(per_prompt.mean()), per_prompt)


@dataclass(frozen=True)
class ScheduleError:
    """Predicted error of a whole schedule: its chains, the mean squared error per element of the final
    latent (``mse``) and its values per prompt."""

    chains: Tuple[ChainError, ...]
    mse: float
    per_prompt: Tensor

    @property
    def psnr(self) -> float:
        """Predicted PSNR (dB) of a ``[-1, 1]`` latent."""
        return predicted_psnr(self.mse)

    @property
    def psnr_spread(self) -> Tuple[float, float]:
        """Predicted PSNR of the worst and the best calibration prompt."""
        return predicted_psnr(float(self.per_prompt.max())), predicted_psnr(float(self.per_prompt.min()))

    def describe(self) -> str:
        if math.isnan(self.mse):
            return "predicted error: unknown (a chain spans more steps than the calibrated horizon)"
        if not self.chains:
            return "predicted error: none (nothing skipped)"
        worst, best = self.psnr_spread
        return (f"predicted PSNR {self.psnr:.1f} dB (prompts {worst:.1f} to {best:.1f}; open loop, "
                f"MSE {self.mse:.3g} per element)")
