"""Output structures round-trip through flatten/rebuild and through a TaoCache skip."""
from collections import OrderedDict, namedtuple
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import taohooks
from taohooks.runtime.structure import flatten_output, join_batch, split_batch


@dataclass
class SampleOutput:  # shaped like diffusers' Transformer2DModelOutput
    sample: torch.Tensor


Pair = namedtuple("Pair", "a b")


def structures(x):
    return {
        "tensor": x,
        "tuple": (x,),
        "list": [x[:1], x[1:]],  # Wan2.1: a list of per-sample tensors
        "dataclass": SampleOutput(sample=x),
        "dict": {"sample": x, "steps": 3},
        "ordereddict": OrderedDict(sample=x),
        "namedtuple": Pair(x, x * 2),
        "mixed": (x, None, torch.arange(3)),  # non-floating members pass through
    }


def same(a, b):
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    if isinstance(a, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(same(getattr(a, k), getattr(b, k)) for k in a.__dataclass_fields__)
    return a == b


@pytest.mark.parametrize("kind", list(structures(torch.zeros(2, 3))))
def test_flatten_rebuild_round_trip(kind):
    out = structures(torch.randn(2, 3, dtype=torch.bfloat16))[kind]
    leaves, structure = flatten_output(out)
    rebuilt = structure.rebuild([t.float() for t in leaves])  # float32 math goes back to bf16
    assert same(out, rebuilt)


def test_diffusers_base_output_round_trip():
    outputs = pytest.importorskip("diffusers.models.modeling_outputs")
    out = outputs.Transformer2DModelOutput(sample=torch.randn(2, 3))
    leaves, structure = flatten_output(out)
    rebuilt = structure.rebuild([t * 2 for t in leaves])
    assert type(rebuilt) is type(out) and torch.equal(rebuilt.sample, out.sample * 2) and torch.equal(rebuilt[0], rebuilt.sample)


def test_output_without_floating_tensor_is_a_clear_error():
    with pytest.raises(TypeError, match="no floating-point tensor"):
        flatten_output((torch.arange(3), "x"))


def test_split_and_join_batch():
    a, b = torch.arange(8.0).view(4, 2), torch.arange(4.0)
    parts = split_batch([a, b], 2)
    assert torch.equal(parts[0][0], a[:2]) and torch.equal(parts[1][1], b[2:])
    assert all(torch.equal(x, y) for x, y in zip(join_batch(parts), [a, b]))
    with pytest.raises(ValueError, match="cannot split"):
        split_batch([torch.zeros(3, 2)], 2)


class GeometricStructured(nn.Module):
    """eps_t = base + v * r**t in bf16, returned in a configurable structure."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.base, self.v = torch.randn(2, 3), torch.randn(2, 3)

    def forward(self, x, timestep):
        eps = (self.base + self.v * 0.5 ** float(timestep)).to(torch.bfloat16)
        return structures(eps)[self.kind]


@pytest.mark.parametrize("kind", ["tensor", "tuple", "list", "dataclass", "dict", "namedtuple", "mixed"])
def test_taocache_skip_returns_the_models_structure_and_dtype(kind):
    model = GeometricStructured(kind)
    steps = 8
    config = taohooks.config_from_dict({"plan": {"window": [5, 7], "ratio": 0.5}})
    cache = taohooks.TaoCache(config)
    with cache.attach(model, steps=steps):
        outs = [model(None, timestep=t) for t in range(steps)]
    assert cache.hook.counts == {"main": [5, 3]}
    reference = [GeometricStructured.forward(model, None, t) for t in range(steps)]
    for got, want in zip(outs, reference):
        got_leaves, got_s = flatten_output(got)
        want_leaves, want_s = flatten_output(want)
        assert type(got) is type(want) and got_s.dtypes == [torch.bfloat16] * len(got_leaves)
        for g, w in zip(got_leaves, want_leaves):
            # bf16 outputs: the prediction is made in float32 from bf16 inputs, so allow bf16 rounding
            assert torch.allclose(g.float(), w.float(), atol=2e-2, rtol=2e-2)
