"""torch.compile: attaching to a compiled module, or compiling after attaching, compiles the model
once; the hook's bookkeeping and the skip path stay outside the graph."""
import pytest
import torch
from torch import nn

from taohooks import TaoCache
from taohooks.config import config_from_dict
from taohooks.runtime.hook import DenoiserHook
from taohooks.runtime.loop import LoopSpec

STEPS = 12
CONFIG = {"plan": {"window": [8, 9], "ratio": 1.0}}


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.t = nn.Linear(1, 8)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x, timestep):
        h = x + self.t(timestep.reshape(-1, 1) / 1000)
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return h


def sample(model):
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    outs = []
    with torch.no_grad():
        for i in range(STEPS):
            out = model(x, timestep=torch.tensor([1000.0 * (1 - i / STEPS)]))
            outs.append(out)
            x = x - 0.1 * out
    return outs


@pytest.fixture
def counting_backend():
    compiled = []

    def backend(graph_module, example_inputs):
        compiled.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    yield backend, compiled
    torch._dynamo.reset()


def eager_reference():
    model = Model()
    cache = TaoCache(config_from_dict(CONFIG))
    with cache.attach(model, STEPS):
        return sample(model)


@pytest.mark.parametrize("order", ["compile_then_attach", "attach_then_compile"])
def test_one_compilation_for_two_generations(order, counting_backend):
    backend, compiled = counting_backend
    model, cache = Model(), TaoCache(config_from_dict(CONFIG))
    if order == "compile_then_attach":
        target = torch.compile(model, backend=backend)
        cache.attach(target, STEPS)
    else:
        cache.attach(model, STEPS)
        target = torch.compile(model, backend=backend)
    first = sample(target)
    cache.new_sample()
    second = sample(target)
    cache.detach()
    assert len(compiled) == 1  # not one per step or per call index
    assert cache.hook.counts["main"] == [2 * (STEPS - 2), 4]
    reference = eager_reference()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(first, reference))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("order", ["wrapper_first", "model_first"])
def test_a_hook_on_the_compiled_wrapper_and_one_on_its_model_are_refused(order, counting_backend):
    """Each call of the compiled module runs its model's forward: a hook on both would count each call twice (and
    both could skip it). It was not refused (compileuser, 2026-11-28); detaching the first lets the second attach."""
    backend, _ = counting_backend
    model = Model()
    target = torch.compile(model, backend=backend)
    first, second = (target, model) if order == "wrapper_first" else (model, target)
    cache = TaoCache(config_from_dict(CONFIG))
    cache.attach(first, STEPS)
    with pytest.raises(RuntimeError, match="already has a taohooks hook, which would see each of its calls too"):
        TaoCache(config_from_dict(CONFIG)).attach(second, STEPS)
    cache.detach()
    other = TaoCache(config_from_dict(CONFIG))
    other.attach(second, STEPS)  # (the first detached: nothing left of it)
    assert len(sample(target)) == STEPS and other.hook.counts["main"] == [STEPS - 2, 2]
    other.detach()


def test_detaching_one_compiled_wrapper_s_hook_leaves_the_other_wrapper_s_in_force(counting_backend):
    """Two torch.compile wrappers of one model, each hooked: detaching the second forgot the first's too, and a hook
    on the model was then taken (every call of the first wrapper counted by two hooks, both skipping: review21)."""
    backend, _ = counting_backend
    model = Model()
    first, second = torch.compile(model, backend=backend), torch.compile(model, backend=backend)
    kept = TaoCache(config_from_dict(CONFIG))
    kept.attach(first, STEPS)
    dropped = TaoCache(config_from_dict(CONFIG))
    dropped.attach(second, STEPS)
    dropped.detach()
    with pytest.raises(RuntimeError, match="inside a OptimizedModule .* that already has a taohooks hook"):
        TaoCache(config_from_dict(CONFIG)).attach(model, STEPS)
    kept.detach()
    free = TaoCache(config_from_dict(CONFIG))
    free.attach(model, STEPS)  # (both detached)
    free.detach()


def test_a_wrapper_and_its_own_model_given_to_one_attach_are_refused():
    """``attach(wrapper, its model)`` (as two experts) was taken: each call seen twice by one hook (review21)."""
    model = Model()
    with pytest.raises(ValueError, match="was given this OptimizedModule and the Model inside it"):
        DenoiserHook(LoopSpec(STEPS, ("main",)), []).attach(torch.compile(model), model)
    DenoiserHook(LoopSpec(STEPS, ("main",)), []).attach(model).detach()  # (nothing left of the refused attach)


def test_a_dropped_compiled_wrapper_leaves_its_model_free():
    model = Model()
    TaoCache(config_from_dict(CONFIG)).attach(torch.compile(model), STEPS)  # never detached, then dropped
    import gc

    gc.collect()
    cache = TaoCache(config_from_dict(CONFIG))
    cache.attach(model, STEPS)
    cache.detach()
