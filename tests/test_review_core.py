"""Faults a review of the hook runtime found (2026-11-27); each test failed before its fix."""
import math

import pytest
import torch
from torch import nn

from taohooks import DenoiserHook, LoopSpec
from taohooks.caches.magcache import ratio_table
from taohooks.caches.pab import BroadcastGroup, PyramidAttentionBroadcast
from taohooks.caches.teacache import TeaCacheCallback
from taohooks.runtime.reset import StateReset
from taohooks.taocache.extrapolation import TaoCacheCallback
from taohooks.taocache.plan import plan_from_steps, plan_from_window

from tinydit import TinyDiT, run


class Smooth(nn.Module):
    """``output(t) = a + b sin(0.3 t) + c (t / 10)^2``: depends on the timestep only."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b, self.c = (torch.randn(2, 3, 4, generator=g) for _ in range(3))

    def forward(self, x, timestep):
        t = float(timestep.reshape(-1)[0])
        return self.a + self.b * math.sin(0.3 * t) + self.c * (t / 10) ** 2


def _generation(model, calls):
    return [model(None, timestep=torch.tensor([float(s)])).clone() for s in range(calls)]


def test_a_generation_that_makes_fewer_calls_does_not_lend_its_history_to_the_next():
    """repeat=True, 10 declared steps, window 7-9: generations of 10, 9, then 10 calls. The third one's first
    call lands on the second one's step 9 (a skip): it must be computed, not extrapolated from step 8."""
    model = Smooth()
    tao = TaoCacheCallback(plan_from_window(10, ("main",), 7, 9, 1.0), max_norm_ratio=None)
    hook = DenoiserHook(LoopSpec(10), [tao], repeat=True)
    with hook.attach(model):
        _generation(model, 10)
        _generation(model, 9)
        third = _generation(model, 10)
    reference = [model(None, timestep=torch.tensor([float(s)])) for s in range(10)]
    assert all(torch.equal(a, b) for a, b in zip(third, reference))  # before the fix: step 0 off by 1.9
    assert tao.fallback_reasons == {"out of line": 1}


def test_a_block_stack_cache_does_not_reuse_a_residual_of_another_generation():
    """The same misalignment for TeaCache: the call that begins the third generation is numbered as the
    second one's last step; its residual is not reused."""
    class Always(TeaCacheCallback):
        def decide(self, call, block, args, kwargs):
            return call.step > 0

    model = TinyDiT(depth=2)
    tea = Always(0.1, [1.0, 0.0])
    hook = DenoiserHook(LoopSpec(4), [tea], repeat=True)
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    with hook.attach(model), torch.no_grad():
        for calls in (4, 3):
            for i in range(calls):
                model(x, timestep=torch.tensor([1000.0 - 250 * i]))
        first = model(x + 1, timestep=torch.tensor([1000.0]))
    with torch.no_grad():
        assert torch.equal(first, model(x + 1, timestep=torch.tensor([1000.0])))


def test_the_prediction_given_to_the_sampler_is_not_the_kept_history():
    """float32 model: a loop that changes its model output in place must not change TaoCache's history."""
    def generation(in_place):
        model = Smooth()
        tao = TaoCacheCallback(plan_from_steps(10, ("main",), [6, 7, 8], 1.0), max_norm_ratio=None)
        outs = []
        with DenoiserHook(LoopSpec(10), [tao]).attach(model):
            for s in range(10):
                out = model(None, timestep=torch.tensor([float(s)]))
                outs.append(out.clone())
                if in_place:
                    out.mul_(0.0)
        return outs

    assert all(torch.equal(a, b) for a, b in zip(generation(False), generation(True)))


def test_pab_drops_a_stream_cache_where_a_skip_fell_back_to_a_real_call():
    """Window 11-16 whose predictions the norm guard refuses at some steps: a real call after a skipped
    one recomputes its attention (with reset_on_resume) instead of broadcasting the pre-window one."""
    steps = 20
    plan = plan_from_window(steps, ("main",), 11, 16, 4.0)

    def computed_attention_steps(reset_on_resume):
        tao = TaoCacheCallback(plan, max_norm_ratio=1.5)
        pab = PyramidAttentionBroadcast([BroadcastGroup(r"blocks\.\d+\.attn", 3)], steps=(2, 19),
                                        reset_steps=plan.resume_steps, reset_on_resume=reset_on_resume)
        model = TinyDiT()
        seen, x = [], torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
        with DenoiserHook(LoopSpec(steps), [tao, pab]).attach(model), torch.no_grad():
            for i in range(steps):
                before = model.blocks[0].attn.calls
                x = x - 0.1 * model(x, timestep=torch.tensor([1000.0 * (1 - i / steps)]))
                if model.blocks[0].attn.calls > before:
                    seen.append(i)
        return seen, tao.fallbacks

    fresh, fallbacks = computed_attention_steps(True)
    stale, _ = computed_attention_steps(False)
    assert fallbacks > 0
    real_in_window = [s for s in fresh if 11 <= s <= 16]
    assert real_in_window and set(real_in_window) <= set(fresh)
    assert set(real_in_window) - set(stale)  # without the reset some of them broadcast step 8's attention


def test_pab_reset_step_keeps_the_other_stream_fresh_cache():
    """cond and uncond as two calls, reset at step 4: the uncond call must not drop what cond just cached."""
    model = TinyDiT(depth=1)
    pab = PyramidAttentionBroadcast([BroadcastGroup(r"blocks\.0\.attn", 2)], steps=(0, 9), reset_steps=(4,))
    with DenoiserHook(LoopSpec(10, ("cond", "uncond")), [pab]).attach(model):
        run(model, 10, streams=2)
    # compute at steps 0, 2, 4, 6, 8 (both streams), broadcast at the odd steps: 5 of them x 2 streams
    assert pab.broadcasts == 10 and model.blocks[0].attn.calls == 10


def test_state_reset_also_resets_after_a_fallback():
    """A skip that falls back to a real call is followed by a real call: the model's state is reset there,
    as before every real call that follows a skipped one."""
    from taohooks import Callback

    class Spy(Callback):
        def __init__(self):
            self.computed = []

        def on_after_call(self, hook, call, output):
            self.computed.append(call.computed)

    steps = 20
    plan = plan_from_window(steps, ("main",), 11, 16, 4.0)
    tao, spy = TaoCacheCallback(plan, max_norm_ratio=1.5), Spy()
    resets_at = []
    model = TinyDiT()
    hook = DenoiserHook(LoopSpec(steps), [tao, spy])
    hook.callbacks.append(StateReset(lambda: resets_at.append(hook.call_index)))
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    with hook.attach(model), torch.no_grad():
        for i in range(steps):
            x = x - 0.1 * model(x, timestep=torch.tensor([1000.0 * (1 - i / steps)]))
    c = spy.computed
    after_skip = [i for i in range(1, steps) if c[i] and not c[i - 1]]
    assert tao.fallbacks > 0 and len(after_skip) > 1  # before the fix: only the plan's resume step 17
    # generation start; every real call after a skipped one, and the plan's resume steps; detach
    assert resets_at == [0, *sorted(set(after_skip) | set(plan.resume_steps)), None]


def test_a_detach_that_cannot_restore_a_block_patch_changes_nothing():
    model = TinyDiT(depth=2)
    tea = TeaCacheCallback(0.1, [1.0, 0.0])
    pab = PyramidAttentionBroadcast([BroadcastGroup(r"blocks\.\d+\.attn", 2)], steps=(0, 9))
    hook = DenoiserHook(LoopSpec(10), [tea, pab]).attach(model)
    block = model.blocks[1]
    ours = block.forward
    block.forward = lambda *a, **k: ours(*a, **k)  # another tool wraps one block after us
    with pytest.raises(RuntimeError, match=r"blocks\.1.*nothing was detached"):
        hook.detach()
    assert hook.attached
    block.forward = ours  # the other tool detaches: now ours can be undone, completely
    hook.detach()
    assert [n for n, m in model.named_modules() if "forward" in m.__dict__] == []


@pytest.mark.parametrize("published, steps", [(50, 71), (50, 141), (40, 75)])
def test_magcache_resamples_with_the_authors_float_product(published, steps):
    ratios = [float(i) for i in range(2 * published - 2)]
    full = [1.0, 1.0] + ratios
    cond = full[0::2]
    scale = (published - 1) / (steps - 1)
    expected = [cond[int(x)] for x in __import__("numpy").round(__import__("numpy").arange(steps) * scale)]
    assert ratio_table(ratios, steps)[0].tolist() == expected


def test_inside_the_first_generation_the_lut_s_timesteps_tell_a_new_generation():
    """The first generation (the hook's reference) made fewer calls: the next one's first call, numbered as its
    step 9 (a skip), was extrapolated; with the LUT's timesteps it is recognised and computed (review)."""
    model = Smooth()
    tao = TaoCacheCallback(plan_from_window(10, ("main",), 7, 9, 1.0), expected_timesteps=torch.arange(10.0),
                           max_norm_ratio=None)
    hook = DenoiserHook(LoopSpec(10), [tao], repeat=True)
    with hook.attach(model):
        _generation(model, 9)
        second = _generation(model, 10)
    reference = [model(None, timestep=torch.tensor([float(s)])) for s in range(10)]
    assert torch.equal(second[0], reference[0]) and tao.fallback_reasons.get("out of line") == 1
