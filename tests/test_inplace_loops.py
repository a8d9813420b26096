"""A loop (or a block) that changes its tensors in place after a call does not change what a cache decides:
caches keep float32 *copies*. In float32, ``.float()`` returns the tensor itself, so EasyCache kept the
sampler's latent (``x -= dt * v`` made every input change 0: all calls after warm-up skipped at a threshold
that should skip none) and TeaCache kept the model's output and the block's input (dtype walkthrough,
2026-11-28)."""
import pytest
import torch
from torch import nn

from taohooks import DenoiserHook, LoopSpec
from taohooks.caches.easycache import EasyCacheCallback
from taohooks.caches.pab import BroadcastGroup, PyramidAttentionBroadcast
from taohooks.caches.teacache import TeaCacheCalibrator, TeaCacheCallback

STEPS = 12


class Attention(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, h):
        return torch.tanh(self.lin(h))


class Block(nn.Module):
    def __init__(self, d: int, in_place):
        super().__init__()
        self.attn, self.lin, self.in_place = Attention(d), nn.Linear(d, d), in_place

    def forward(self, h, c):
        a = self.attn(h)
        a = a.mul_(0.5) if self.in_place is True else a * 0.5  # a gate on the attention's output, in place or not
        y = torch.tanh(self.lin(h + a + c[:, None]))
        if self.in_place == "mixed":  # an in-place residual, then an out-of-place one (a new output tensor)
            h += 0.1 * y
            return h + 0.2 * y
        if self.in_place == "mixed-out":  # the same, out of place
            h = h + 0.1 * y
            return h + 0.2 * y
        if self.in_place == "uncounted":  # a write that bumps no version counter (a custom kernel's)
            h.data.add_(0.3 * y)
            return h
        return h.add_(0.3 * y) if self.in_place is True else h + 0.3 * y  # a residual add in place, or not


class Net(nn.Module):
    def __init__(self, in_place_blocks=False):
        super().__init__()
        torch.manual_seed(0)
        self.uncond_only = in_place_blocks == "uncond"
        self.embed, self.t_embed, self.g_embed = nn.Linear(4, 16), nn.Linear(1, 16), nn.Linear(1, 16)
        self.blocks = nn.ModuleList(Block(16, in_place_blocks) for _ in range(3))
        self.final = nn.Linear(16, 4)

    def forward(self, x, timestep, guide=1.0):
        if self.uncond_only:  # the blocks change their input in place on the uncond calls only
            for block in self.blocks:
                block.in_place = guide == 0.0
        c = self.t_embed(timestep.reshape(-1, 1).expand(x.shape[0], 1) / 1000) + self.g_embed(
            torch.full((x.shape[0], 1), guide))
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, c)
        return self.final(h)


def sample(net, in_place_update=False, in_place_cfg=False):
    """A CFG loop, cond then uncond; the latent and the guided output updated in place or not (same values)."""
    x = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i in range(STEPS):
            t = torch.tensor([1000.0 * (1 - i / STEPS)])
            c, u = net(x, timestep=t, guide=1.0), net(x, timestep=t, guide=0.0)
            v = c.sub_(u).mul_(3.0).add_(u) if in_place_cfg else u + 3.0 * (c - u)
            if in_place_update:
                x.sub_(v / STEPS)
            else:
                x = x - v / STEPS
    return x


def run(callback, net=None, generations=1, **loop):
    """The last of ``generations`` generations under one attach."""
    net = net or Net()
    with DenoiserHook(LoopSpec(STEPS, ("cond", "uncond")), [callback]).attach(net) as hook:
        for _ in range(generations):
            hook.new_sample()
            x = sample(net, **loop)
    return x


@pytest.mark.parametrize("loop", [{"in_place_update": True}, {"in_place_cfg": True}])
def test_easycache_decides_the_same_whatever_the_loop_does_in_place(loop):
    for threshold in (1e-6, 0.3):  # (1e-6 skips nothing; in place it skipped 18 of 24 calls)
        plain, changed = EasyCacheCallback(threshold, warmup_steps=2), EasyCacheCallback(threshold, warmup_steps=2)
        expected = run(plain)
        assert torch.equal(run(changed, **loop), expected)
        assert changed.skipped == plain.skipped
    assert plain.skipped > 0


def test_teacache_calibrator_pairs_do_not_see_an_in_place_cfg():
    plain, changed = TeaCacheCalibrator(), TeaCacheCalibrator()
    run(plain)
    run(changed, in_place_cfg=True)
    assert len(plain.pairs) == 4 * (STEPS - 1) and changed.pairs == plain.pairs  # (2 streams x 2 samples; 4x before)


@pytest.mark.parametrize("blocks", [True, "mixed", "uncounted"])
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])  # (inference tensors count no versions)
def test_teacache_with_blocks_that_add_in_place(mode, blocks, capsys):
    """Blocks doing ``h += f(h)`` change the stack's input: the residual ``out - in`` was 0, and every reused call
    returned its input unchanged. Found at the first computed call (against a copy of its input: in inference
    mode, or after a write no version counter shows, nothing else tells), whose residual is kept; a copy of the
    input from then on, so that the generations are the ones of the same blocks written ``h = h + f(h)``."""
    def equivalent(kind):  # the same function written out of place
        net = Net(in_place_blocks=False)
        if kind == "mixed":
            for block in net.blocks:
                block.in_place = "mixed-out"
        return net

    coefficients = [0.0, 0.0, 0.0, 1.0, 0.0]
    plain, changed = TeaCacheCallback(0.2, coefficients), TeaCacheCallback(0.2, coefficients)
    with mode():
        expected = run(plain, net=equivalent(blocks))
        assert torch.equal(run(changed, net=Net(in_place_blocks=blocks)), expected)
    assert changed.copy_input and not plain.copy_input and plain.reused > 0
    assert "the block stack changes its input in place" in capsys.readouterr().err


def test_magcache_calibration_keeps_the_call_that_finds_an_in_place_stack():
    """The call where the in-place stack was found kept no residual, so one ratio fell back to 1.0 (review)."""
    from taohooks.caches.magcache import MagCacheCalibrator

    plain, changed = MagCacheCalibrator(), MagCacheCalibrator()
    run(plain)
    run(changed, net=Net(in_place_blocks=True))
    assert torch.equal(changed.ratios(), plain.ratios()) and changed.copy_input


def test_pab_broadcasts_what_the_attention_returned_whatever_the_block_does_with_it():
    """The broadcast output was the tensor the block had gated in place: each broadcast halved it again."""
    def pab():
        return PyramidAttentionBroadcast([BroadcastGroup(r"blocks\.\d+\.attn", 3)], steps=(2, 9))

    plain, changed = pab(), pab()
    expected = run(plain)
    assert torch.equal(run(changed, net=Net(in_place_blocks=True)), expected) and plain.broadcasts > 0


def test_pab_copies_the_tensors_of_any_output_container():
    """(A first version rebuilt diffusers' BaseOutput from a generator, and refused a defaultdict: review.)"""
    from collections import OrderedDict, defaultdict, namedtuple

    from taohooks.caches.pab import _copy
    from taohooks.runtime.structure import flatten_output

    t = torch.ones(2)
    pair = namedtuple("Pair", "out weights")
    outputs = [t, (t, None), [t], {"out": t}, pair(t, None), OrderedDict(out=t), defaultdict(list, out=t)]
    diffusers = pytest.importorskip("diffusers.models.modeling_outputs")
    outputs.append(diffusers.Transformer2DModelOutput(sample=t))
    for out in outputs:
        copied = _copy(out)
        leaves = flatten_output(copied)[0]
        assert type(copied) is type(out) and len(leaves) == 1 and torch.equal(leaves[0], t) and leaves[0] is not t
    assert _copy(defaultdict(list, out=t)).default_factory is list


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_each_stream_s_first_call_is_checked(mode):
    """A stream whose stack changes its input in place when the first one's does not (review: one check per cache
    instance missed it under inference mode, and found it a call late under no_grad)."""
    coefficients = [0.0, 0.0, 0.0, 1.0, 0.0]
    plain, changed = TeaCacheCallback(0.2, coefficients), TeaCacheCallback(0.2, coefficients)
    with mode():
        expected = run(plain)
        assert torch.equal(run(changed, net=Net(in_place_blocks="uncond")), expected)
    assert changed.copy_input and changed.reused == plain.reused


def test_an_input_holding_nan_is_not_taken_for_an_in_place_change():
    from taohooks.caches.residual import _same_values

    t = torch.tensor([1.0, float("nan")])
    assert _same_values(t, t.clone()) and not _same_values(t, torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_each_expert_s_first_call_is_checked(mode):
    """Wan2.2's two experts, the low-noise one's blocks in place: its first call was taken as already checked (the
    expert was read before the switch updated it), so the change went unseen under inference mode (review)."""
    def generate(low_in_place: bool):
        high, low = Net(), Net(in_place_blocks=low_in_place)
        tea = TeaCacheCallback(0.2, [0.0, 0.0, 0.0, 1.0, 0.0])
        x = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0))
        with DenoiserHook(LoopSpec(STEPS, ("cond", "uncond")), [tea]).attach(high, low) as hook, mode():
            hook.new_sample()
            for i in range(STEPS):
                net, t = (high if i < STEPS // 2 else low), torch.tensor([1000.0 * (1 - i / STEPS)])
                c, u = net(x, timestep=t, guide=1.0), net(x, timestep=t, guide=0.0)
                x = x - (u + 3.0 * (c - u)) / STEPS
        return x, tea

    (expected, plain), (got, changed) = generate(False), generate(True)
    assert torch.equal(got, expected) and changed.copy_input and changed.reused == plain.reused > 0
