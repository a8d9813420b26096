"""Sampling loops for ``scenes`` models, in the shapes of the official scripts (see ``sampling``).

- :func:`sample_flow`: Wan2.1 shape: per step a conditional call, then an unconditional call;
  ``UniPCMultistepScheduler`` (flow prediction, ``flow_shift``).
- :func:`sample_eps`: Latte shape: one call per step on ``cat([uncond, cond])``, ``.chunk(2)``;
  DDIM or PNDM (linear betas); the learned-variance half of the output is dropped.

Initial noise ``[B, 3, 8, 32, 32]`` comes from one ``torch.Generator`` per clip seeded by
:func:`noise_seed` of its ``(prompt, seed)`` pair, so a pair gives the same clip whatever it is
batched with. Clips come back in ``[-1, 1]``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from . import scenes
from .sampling import DEFAULT_FLOW_GUIDANCE, DEFAULT_FLOW_SHIFT, make_eps_scheduler, make_flow_scheduler

DEFAULT_EPS_GUIDANCE = 5.0


def noise_seed(prompt: scenes.ScenePrompt, seed: int) -> int:
    """Integer seed (< 2**63) of the initial-noise generator for ``(prompt, seed)``."""
    state = np.random.SeedSequence([int(seed), *prompt.ids(), 0x5EED]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def initial_noise(prompts: Sequence[scenes.ScenePrompt], seeds: Sequence[int], channels: int = 3) -> torch.Tensor:
    """Standard-normal ``[B, channels, 8, 32, 32]``, reproducible per ``(prompt, seed)``."""
    shape = (channels, scenes.NUM_FRAMES, scenes.HEIGHT, scenes.WIDTH)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed(p, s)))
                        for p, s in zip(prompts, seeds)])


def _prepare(prompts, seeds, device):
    prompts = [scenes.ScenePrompt.from_text(p) if isinstance(p, str) else p for p in prompts]
    if len(prompts) != len(seeds):
        raise ValueError(f"need one seed per prompt: {len(prompts)} prompts, {len(seeds)} seeds")
    cond = torch.from_numpy(scenes.prompt_ids(prompts)).to(device)
    return prompts, list(seeds), cond, torch.full_like(cond, scenes.NULL_ID)


@torch.no_grad()
def sample_flow(model: torch.nn.Module, prompts: Sequence[Union[scenes.ScenePrompt, str]], seeds: Sequence[int],
                steps: int = 50, shift: float = DEFAULT_FLOW_SHIFT, guidance: float = DEFAULT_FLOW_GUIDANCE,
                scheduler: Optional[object] = None, noise: Optional[torch.Tensor] = None,
                init: Optional[torch.Tensor] = None, strength: float = 1.0) -> torch.Tensor:
    """Wan2.1-shaped loop: cond call, then uncond call, per step. ``noise`` overrides the initial
    noise ``[B, 3, 8, 32, 32]`` (for perturbation studies). With ``init`` (clips ``[B, 3, 8, 32, 32]``
    in ``[-1, 1]``), SDEdit as diffusers' image-to-image pipelines do it: the last ``int(steps * strength)``
    steps are run (at least one), from ``init`` noised to the first of them's sigma ``s``:
    ``(1 - s) init + s noise``. Returns ``[B, 3, 8, 32, 32]``."""
    device = next(model.parameters()).device
    prompts, seeds, cond, uncond = _prepare(prompts, seeds, device)
    sched = make_flow_scheduler(shift) if scheduler is None else scheduler
    sched.set_timesteps(steps)
    latents = (initial_noise(prompts, seeds) if noise is None else noise.float()).to(device) * sched.init_noise_sigma
    begin = 0
    if init is not None:
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength {strength}: expected 0 < strength <= 1 (the share of the steps run)")
        if tuple(init.shape) != tuple(latents.shape):
            raise ValueError(f"init has shape {tuple(init.shape)}, expected {tuple(latents.shape)}")
        begin = steps - max(1, min(int(steps * strength), steps))  # diffusers' get_timesteps, at least one step
        sigma = float(sched.sigmas[begin])
        latents = (1.0 - sigma) * init.float().to(device) + sigma * latents
        sched.set_begin_index(begin)
    for t in sched.timesteps[begin:]:
        timestep = t.expand(latents.shape[0]).to(device=device, dtype=torch.float32)
        noise_pred_cond = model(latents, timestep, cond)
        if guidance > 1.0:
            noise_pred_uncond = model(latents, timestep, uncond)
            noise_pred = noise_pred_uncond + guidance * (noise_pred_cond - noise_pred_uncond)
        else:
            noise_pred = noise_pred_cond
        latents = sched.step(noise_pred.float(), t, latents, return_dict=False)[0]
    return latents.clamp(-1, 1)


@torch.no_grad()
def sample_eps(model: torch.nn.Module, prompts: Sequence[Union[scenes.ScenePrompt, str]], seeds: Sequence[int],
               steps: int = 50, scheduler: Union[str, object] = "ddim", guidance: float = DEFAULT_EPS_GUIDANCE,
               noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Latte-shaped loop: one batched ``cat([uncond, cond])`` call per step. Returns ``[B, 3, 8, 32, 32]``."""
    device = next(model.parameters()).device
    prompts, seeds, cond, uncond = _prepare(prompts, seeds, device)
    sched = make_eps_scheduler(scheduler) if isinstance(scheduler, str) else scheduler
    sched.set_timesteps(steps)
    do_cfg = guidance > 1.0
    ids = torch.cat([uncond, cond]) if do_cfg else cond
    latents = (initial_noise(prompts, seeds) if noise is None else noise.float()).to(device) * sched.init_noise_sigma
    for t in sched.timesteps:
        model_input = sched.scale_model_input(torch.cat([latents] * 2) if do_cfg else latents, t)
        timestep = t.expand(model_input.shape[0]).to(device=device, dtype=torch.float32)
        noise_pred = model(model_input, timestep, ids)
        if do_cfg:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance * (noise_pred_text - noise_pred_uncond)
        noise_pred = noise_pred.chunk(2, dim=1)[0]
        latents = sched.step(noise_pred.float(), t, latents).prev_sample
    return latents.clamp(-1, 1)


def sample(model: torch.nn.Module, prompts, seeds, steps: int = 50, **kwargs) -> torch.Tensor:
    """Dispatch on ``model.config.prediction``."""
    if getattr(model.config, "prediction", "flow") == "eps":
        return sample_eps(model, prompts, seeds, steps=steps, **kwargs)
    return sample_flow(model, prompts, seeds, steps=steps, **kwargs)
