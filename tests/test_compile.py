"""torch.compile: attaching to a compiled module, or compiling after attaching, compiles the model
once; the hook's bookkeeping and the skip path stay outside the graph."""
import pytest
import torch
from torch import nn

from taohooks import TaoCache
from taohooks.config import config_from_dict

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


def test_a_dropped_compiled_wrapper_leaves_its_model_free():
    model = Model()
    TaoCache(config_from_dict(CONFIG)).attach(torch.compile(model), STEPS)  # never detached, then dropped
    import gc

    gc.collect()
    cache = TaoCache(config_from_dict(CONFIG))
    cache.attach(model, STEPS)
    cache.detach()
