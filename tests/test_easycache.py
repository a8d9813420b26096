"""EasyCache: the hook's decisions and outputs equal an independent re-statement of the reference
implementation's rule (H-EmbodVis/EasyCache 51278044, Wan2.1 script) on a Wan-like loop."""
import pytest
import torch
from torch import nn

from taohooks import DenoiserHook, LoopSpec
from taohooks.caches.easycache import EasyCacheCallback

STEPS, WARMUP = 30, 5


class ListModel(nn.Module):
    """Wan's contract: ``x`` a list of one tensor, ``t=``, returns a list; cond and uncond differ."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(4, 4, generator=g) * 0.3
        self.b = torch.randn(2, 4, 6, generator=g)

    def forward(self, x, t, context="cond"):
        s = float(t.reshape(-1)[0]) / 1000.0
        u = x[0]
        scale = 1.0 if context == "cond" else 0.6
        return [torch.tanh(torch.einsum("ij,cjk->cik", self.a, u)) * scale + self.b * (s ** 2)]


def sample(model, caller):
    x = [torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(3))]
    for i, t in enumerate(torch.linspace(999, 33, STEPS)):
        ts = torch.stack([t])
        c = caller(model, x, ts, "cond", i)[0]
        u = caller(model, x, ts, "uncond", i)[0]
        v = u + 4.0 * (c - u)
        x = [x[0] - v / STEPS]
    return x[0]


def reference(model, threshold):
    """The authors' rule, restated (even = cond decides; odd follows; caches v - x per branch)."""
    st = dict(k=None, acc=0.0, x_prev=None, x_last=None, v_last=None, cache={}, skip=False)
    skipped = []

    def l1m(ts):
        return torch.cat([u.flatten() for u in ts]).abs().mean()

    def caller(model, x, ts, branch, step):
        xf = [u.float() for u in x]
        if branch == "cond":
            skip = False
            if step < WARMUP or step == STEPS - 1:
                st["acc"] = 0.0
            elif st["x_prev"] is not None and st["v_last"] is not None and st["k"] is not None:
                st["acc"] += st["k"] * float(l1m([a - b for a, b in zip(xf, st["x_prev"])])) / float(l1m(st["v_last"]))
                if st["acc"] < threshold:
                    skip = True
                else:
                    st["acc"] = 0.0
            st["x_prev"] = xf
            st["skip"] = skip
        if st["skip"] and branch in st["cache"]:
            skipped.append((step, branch))
            return [u + d for u, d in zip(xf, st["cache"][branch])]
        v = [o.float() for o in model(x, t=ts, context=branch)]
        if branch == "cond":
            if st["v_last"] is not None:
                st["k"] = float(l1m([a - b for a, b in zip(v, st["v_last"])])) / float(
                    l1m([a - b for a, b in zip(xf, st["x_last"])]))
            st["x_last"], st["v_last"] = xf, v
        st["cache"][branch] = [a - b for a, b in zip(v, xf)]
        return v

    return sample(model, caller), skipped


@pytest.mark.parametrize("threshold", [0.02, 0.1, 0.4])
def test_easycache_equals_the_reference_rule(threshold):
    model = ListModel()
    expected, skipped = reference(model, threshold)
    cb = EasyCacheCallback(threshold, warmup_steps=WARMUP)
    seen = []
    hook = DenoiserHook(LoopSpec(STEPS, ("cond", "uncond"), batch_dim=None), [cb], timestep_arg="t")
    with hook.attach(model):
        hook.new_sample()

        def caller(model, x, ts, branch, step):
            before = cb.skipped
            out = model(x, t=ts, context=branch)
            if cb.skipped != before:
                seen.append((step, branch))
            return out

        got = sample(model, caller)
    assert seen == skipped
    assert torch.equal(got, expected)
    if threshold >= 0.1:
        assert skipped and all(WARMUP <= s < STEPS - 1 for s, _ in skipped)  # the comparison could fail


def test_outputs_not_shaped_like_inputs_compute_every_call(capsys):
    class Wider(nn.Module):
        def forward(self, x, t, context="cond"):
            return [torch.cat([x[0], x[0]], dim=0) * float(t.reshape(-1)[0]) / 1000]

    cb = EasyCacheCallback(10.0, warmup_steps=1)
    with DenoiserHook(LoopSpec(6, ("cond", "uncond"), batch_dim=None), [cb], timestep_arg="t").attach(Wider()) as h:
        h.new_sample()
        x = [torch.ones(2, 3)]
        for t in torch.linspace(999, 100, 6):
            for branch in ("cond", "uncond"):
                h.module(x, t=torch.stack([t]), context=branch)
    assert cb.skipped == 0
    assert "EasyCache: the model's output" in capsys.readouterr().err



class CountingModel(ListModel):
    """Records the timestep of every call that really runs (cond and uncond)."""

    def __init__(self, sign=1.0):
        super().__init__()
        self.a = self.a * sign
        self.ran = []

    def forward(self, x, t, context="cond"):
        self.ran.append(round(float(t.reshape(-1)[0]), 3))
        return super().forward(x, t, context)


def test_two_experts_keep_their_own_state_and_the_first_low_noise_steps_compute():
    """On Wan2.2's two experts EasyCache kept one state: the first low-noise step could return the high-noise
    expert's ``v - x`` (33 dB lost in the Wan2.2 compare walkthrough, 2026-11-27). Each expert starts afresh now:
    its first step computes (no ``v - x`` of its own) and its second (no rate ``k`` of its own)."""
    high, low = CountingModel(), CountingModel(-1.0)
    switch = 12  # the low-noise expert runs steps 12 on
    timesteps = [round(float(t), 3) for t in torch.linspace(999, 33, STEPS)]
    cb = EasyCacheCallback(1e9, warmup_steps=1)  # skip wherever the state allows
    with DenoiserHook(LoopSpec(STEPS, ("cond", "uncond"), batch_dim=None), [cb], timestep_arg="t").attach(high, low):
        sample(high, lambda model, x, ts, stream, i: (high if i < switch else low)(x, t=ts, context=stream))
    assert low.ran[:4] == [timesteps[switch]] * 2 + [timesteps[switch + 1]] * 2
    assert high.ran[:2] == [timesteps[0]] * 2 and cb.skipped > 0
