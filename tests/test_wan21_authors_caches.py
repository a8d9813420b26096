"""TeaCache and MagCache for Wan2.1 as their authors run them. TeaCache: the skip schedule of taohooks' hook equals an independent
re-statement of their rule (even/odd accumulators, the timestep-embedding proxy, ret/cutoff steps),
for both variants and with negative polynomial values added as they add them."""

import numpy as np
import pytest
import torch
from torch import nn

from taohooks import DenoiserHook, LoopSpec
from taohooks.caches.teacache_wan21 import PUBLISHED, checkpoint_key, wan21_teacache

DIM, STEPS = 16, 20


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(DIM, DIM)

    def forward(self, x, e=None, context=None):
        return x + 0.1 * torch.tanh(self.lin(x) + e[:, 0].unsqueeze(1))


class TinyWan(nn.Module):
    """Wan2.1's structure where TeaCache looks: time_embedding -> e, time_projection -> e0 [1, 6, dim]
    given to every block as ``e=``; blocks called with keywords."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.time_embedding = nn.Sequential(nn.Linear(8, DIM), nn.SiLU(), nn.Linear(DIM, DIM))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(DIM, 6 * DIM))
        self.blocks = nn.ModuleList(Block() for _ in range(2))

    def forward(self, x, t, context=None):
        freqs = torch.arange(1, 5, dtype=torch.float32)
        emb = torch.cat([torch.sin(t.float()[:, None] / 1000 * freqs), torch.cos(t.float()[:, None] / 1000 * freqs)], 1)
        e = self.time_embedding(emb)
        e0 = self.time_projection(e).unflatten(1, (6, DIM))
        h = x
        for block in self.blocks:
            h = block(h, e=e0, context=context)
        return [h]


def timesteps():
    return torch.linspace(999, 20, STEPS).round()


def authors_schedule(model, coefficients, threshold, use_ret_steps):
    """The rule of TeaCache4Wan2.1 restated: which (step, parity) calls compute."""
    ret_steps = 5 * 2 if use_ret_steps else 2
    cutoff = STEPS * 2 if use_ret_steps else STEPS * 2 - 2
    poly = np.poly1d(coefficients)
    acc, prev, computed = {0: 0.0, 1: 0.0}, {0: None, 1: None}, []
    cnt = 0
    for t in timesteps():
        with torch.no_grad():
            e = model.time_embedding(torch.cat([torch.sin(t[None, None] / 1000 * torch.arange(1, 5.)),
                                                torch.cos(t[None, None] / 1000 * torch.arange(1, 5.))], 1))
            e0 = model.time_projection(e).unflatten(1, (6, DIM))
        proxy = e0 if use_ret_steps else e
        for parity in (0, 1):
            if cnt < ret_steps or cnt >= cutoff:
                calc, acc[parity] = True, 0.0
            else:
                acc[parity] += poly(float((proxy - prev[parity]).abs().mean() / prev[parity].abs().mean()))
                calc = acc[parity] >= threshold
                if calc:
                    acc[parity] = 0.0
            prev[parity] = proxy
            computed.append(calc)
            cnt += 1
    return computed


@pytest.mark.parametrize("use_ret_steps", [True, False])
@pytest.mark.parametrize("checkpoint", ["t2v-1.3B", "t2v-14B"])
def test_the_hook_skips_what_the_authors_rule_skips(use_ret_steps, checkpoint):
    model = TinyWan().eval()
    coefficients = PUBLISHED[(checkpoint, use_ret_steps)]
    skipped_any = False
    for threshold in (0.02, 0.1, 0.5, 2.0, 10.0):
        expected = authors_schedule(model, coefficients, threshold, use_ret_steps)
        callbacks = wan21_teacache(checkpoint, threshold, use_ret_steps)
        tea = callbacks[-1]
        seen = []
        hook = DenoiserHook(LoopSpec(STEPS, ("cond", "uncond"), batch_dim=None), callbacks, timestep_arg="t")
        with hook.attach(model), torch.no_grad():
            hook.new_sample()
            x = torch.randn(1, 4, DIM, generator=torch.Generator().manual_seed(1))
            for t in timesteps():
                for _ in ("cond", "uncond"):
                    before = tea.reused
                    model(x, torch.stack([t]), context=None)
                    seen.append(tea.reused == before)
        assert seen == expected, (threshold, sum(seen), sum(expected))
        skipped_any |= not all(expected)
    assert skipped_any  # some threshold skipped calls (the comparison could fail)


def test_negative_values_are_added_as_the_authors_add_them():
    tea = wan21_teacache("t2v-14B", 0.2, use_ret_steps=False)[-1]
    assert tea.rescale(0.01) < 0  # the published T2V-14B polynomial is negative there


def test_checkpoint_keys():
    assert checkpoint_key("t2v-1.3B") == "t2v-1.3B"
    assert checkpoint_key("i2v-14B", size="832*480") == "i2v-480P"
    assert checkpoint_key("i2v-14B", ckpt_dir="./Wan2.1-I2V-14B-720P") == "i2v-720P"
    # the folder decides, as in the authors' script: a 720P checkpoint run at 832*480, or kept under a path with 480
    assert checkpoint_key("i2v-14B", size="832*480", ckpt_dir="./Wan2.1-I2V-14B-720P") == "i2v-720P"
    assert checkpoint_key("i2v-14B", ckpt_dir="/data/exp480/Wan2.1-I2V-14B-720P/") == "i2v-720P"
    with pytest.raises(ValueError, match="no Wan2.1 coefficients for --task vace-1.3B"):
        checkpoint_key("vace-1.3B")


# ---------------------------------------------------------------- MagCache for Wan2.1, the published ratios
@pytest.mark.parametrize("checkpoint, steps, e, k, computed", [
    # the schedules the authors' rule gives on their published lists (a simulation of their code, see the
    # module docstring of taohooks.caches.magcache_wan21): the cond call's computed steps (uncond alike)
    ("t2v-1.3B", 50, 0.12, 2, list(range(10)) + [12, 15, 18, 21, 24, 27, 30, 33, 36, 39, 42, 44, 46, 48, 49]),
    ("t2v-1.3B", 50, 0.12, 4, list(range(10)) + [14, 19, 24, 29, 34, 38, 41, 44, 46, 48, 49]),
    ("t2v-14B", 50, 0.24, 6, list(range(10)) + [16, 23, 30, 36, 41, 44, 47, 49]),
    ("i2v-480P", 40, 0.24, 6, list(range(8)) + [14, 20, 25, 30, 34, 37, 39]),
    ("i2v-720P", 40, 0.24, 6, list(range(8)) + [14, 21, 27, 32, 35, 38]),  # the last step skipped
])
def test_magcache_with_the_published_ratios_computes_the_authors_steps(checkpoint, steps, e, k, computed):
    from taohooks.caches.magcache_wan21 import wan21_magcache

    model = TinyWan().eval()
    mag = wan21_magcache(checkpoint, steps, threshold=e, k=k)
    hook = DenoiserHook(LoopSpec(steps, ("cond", "uncond"), batch_dim=None), [mag], timestep_arg="t")
    ran = []
    with hook.attach(model), torch.no_grad():
        hook.new_sample()
        x = torch.randn(1, 4, DIM, generator=torch.Generator().manual_seed(1))
        for step, t in enumerate(torch.linspace(999, 20, steps).round()):
            for slot in range(2):
                before = mag.reused
                model(x, torch.stack([t]), context=None)
                if mag.reused == before:
                    ran.append((step, slot))
    assert [s for s, slot in ran if slot == 0] == computed
    assert [s for s, slot in ran if slot == 1] == computed
