"""Training-side noise schedules: linear-beta DDPM (eps + learned variance) and rectified flow.

Clips are ``x0 [B, 3, F, H, W]`` in ``[-1, 1]``; noise has the same shape.
"""

from __future__ import annotations

import math

import torch

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02  # the Latte / DiT linear schedule


def linear_betas(num: int = NUM_TRAIN_TIMESTEPS, start: float = BETA_START, end: float = BETA_END) -> torch.Tensor:
    """``[num]`` float64 betas, linearly spaced (same as diffusers ``beta_schedule="linear"``)."""
    return torch.linspace(start, end, num, dtype=torch.float64)


def _gather(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """``values[t]`` as float32 reshaped ``[B, 1, ..., 1]`` to broadcast over ``ndim`` dims."""
    return values.to(t.device)[t].float().view(-1, *([1] * (ndim - 1)))


class DDPMSchedule:
    """Discrete DDPM with linear betas; ``t`` are integer timesteps ``[B]`` in ``0..999``."""

    def __init__(self, betas: torch.Tensor = None):
        self.betas = linear_betas() if betas is None else betas.double()
        self.num_timesteps = len(self.betas)
        alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(alphas, 0)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.posterior_variance = self.betas * (1 - prev) / (1 - self.alphas_cumprod)
        clipped = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        self.posterior_log_variance_clipped = torch.log(clipped)
        self.posterior_mean_coef1 = self.betas * prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1 - prev) * alphas.sqrt() / (1 - self.alphas_cumprod)

    def to(self, device) -> "DDPMSchedule":
        """The tables moved to ``device`` (once: each gather would otherwise copy a table there, and a copy from
        the CPU makes the host wait for the device)."""
        for name, value in vars(self).items():
            if torch.is_tensor(value):
                setattr(self, name, value.to(device))
        return self

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``."""
        abar = _gather(self.alphas_cumprod, t, x0.ndim)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def vlb_loss(self, x0, x_t, t, eps_pred, var_interp) -> torch.Tensor:
        """Variational-bound term (bits/dim) that trains only the variance channels.

        ``var_interp`` (``[-1, 1]``-ish, same shape as x0) interpolates the log variance
        between the clipped posterior variance and beta_t (improved-DDPM "learned range").
        ``eps_pred`` is detached, so the mean gets no gradient from this term. For
        simplicity the t = 0 decoder likelihood is replaced by the same Gaussian KL.
        Returns a scalar.
        """
        nd = x0.ndim
        abar = _gather(self.alphas_cumprod, t, nd)
        min_log = _gather(self.posterior_log_variance_clipped, t, nd)
        max_log = _gather(torch.log(self.betas), t, nd)
        frac = (var_interp + 1) / 2
        model_log_var = frac * max_log + (1 - frac) * min_log
        c1 = _gather(self.posterior_mean_coef1, t, nd)
        c2 = _gather(self.posterior_mean_coef2, t, nd)
        x0_pred = (x_t - (1 - abar).sqrt() * eps_pred.detach()) / abar.sqrt()
        model_mean = c1 * x0_pred + c2 * x_t
        true_mean = c1 * x0 + c2 * x_t
        kl = 0.5 * (
            -1.0
            + model_log_var
            - min_log
            + torch.exp(min_log - model_log_var)
            + (true_mean - model_mean) ** 2 * torch.exp(-model_log_var)
        )
        return kl.mean() / math.log(2.0)


def flow_interpolate(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Rectified flow ``x_s = (1 - s) x0 + s noise`` for ``sigma [B]`` in ``[0, 1]``."""
    s = sigma.float().view(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * x0 + s * noise


def sample_flow_sigmas(kind: str, batch: int, generator: torch.Generator = None, device=None) -> torch.Tensor:
    """``[B]`` training sigmas: ``"uniform"`` U(0, 1) or ``"lognormal"`` sigmoid(N(0, 1)), drawn on ``device``
    (the generator's)."""
    if kind == "uniform":
        return torch.rand(batch, generator=generator, device=device)
    if kind == "lognormal":
        return torch.sigmoid(torch.randn(batch, generator=generator, device=device))
    raise ValueError(f"unknown sigma sampling {kind!r}")
