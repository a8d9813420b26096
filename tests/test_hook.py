"""DenoiserHook: wrapping the instance forward, bookkeeping per generation, callbacks."""
import types

import pytest
import torch
from torch import nn

import taohooks
from taohooks import Callback, DenoiserHook, LoopSpec


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(2.0))

    def forward(self, x, timestep=None, t=None):
        return x * self.w


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_sample_start(self, hook, sample):
        self.events.append(("start", sample))

    def on_sample_end(self, hook, sample):
        self.events.append(("end", sample))

    def on_sample_abort(self, hook, sample, reason):
        self.events.append(("abort", sample))

    def on_after_call(self, hook, call, output):
        self.events.append(("call", call.sample, call.index, call.step, call.streams, call.timestep))


def test_detach_restores_class_forward():
    m = Linear()
    assert "forward" not in m.__dict__
    hook = DenoiserHook(LoopSpec(2)).attach(m)
    assert "forward" in m.__dict__ and taohooks.get_hook(m) is hook
    hook.detach()
    assert "forward" not in m.__dict__ and taohooks.get_hook(m) is None
    assert m(torch.ones(1)).item() == 2.0


def test_attach_over_replaced_instance_forward_and_restore_identity():
    m = Linear()

    def sequence_parallel_forward(self, x, timestep=None):  # like Wan's usp_dit_forward
        return x * self.w + 100

    original = types.MethodType(sequence_parallel_forward, m)
    m.forward = original
    rec = Recorder()
    with DenoiserHook(LoopSpec(3), [rec]).attach(m):
        assert m(torch.ones(1), timestep=torch.tensor([7.0])).item() == 102.0  # the replaced forward ran
    assert m.forward is original
    assert rec.events[1][-1] == 7.0


def test_attach_twice_is_an_error():
    m = Linear()
    DenoiserHook(LoopSpec(2)).attach(m)
    with pytest.raises(RuntimeError, match="already has a taohooks hook"):
        DenoiserHook(LoopSpec(2)).attach(m)


def test_detach_refuses_when_someone_wrapped_on_top():
    m = Linear()
    hook = DenoiserHook(LoopSpec(2)).attach(m)
    m.forward = lambda *a, **k: 0
    with pytest.raises(RuntimeError, match="replaced after taohooks attached"):
        hook.detach()


def test_step_and_stream_numbering_sequential_cfg():
    m, rec = Linear(), Recorder()
    with DenoiserHook(LoopSpec(2, ("cond", "uncond")), [rec]).attach(m) as hook:
        for t in (999, 500):
            m(torch.ones(1), timestep=torch.tensor([t]))
            m(torch.ones(1), timestep=torch.tensor([t]))
        assert hook.counts == {"cond": [2, 0], "uncond": [2, 0]}
    calls = [e[1:] for e in rec.events if e[0] == "call"]
    assert calls == [(0, 0, 0, ("cond",), 999.0), (0, 1, 0, ("uncond",), 999.0),
                     (0, 2, 1, ("cond",), 500.0), (0, 3, 1, ("uncond",), 500.0)]
    assert rec.events[0] == ("start", 0) and rec.events[-1] == ("end", 0)


def test_batched_streams_one_call_per_step():
    m, rec = Linear(), Recorder()
    with DenoiserHook(LoopSpec(3, ("uncond", "cond"), split_batch=True), [rec]).attach(m):
        for t in range(3):
            m(torch.ones(2), t=t)
    calls = [e[1:] for e in rec.events if e[0] == "call"]
    assert [c[2] for c in calls] == [0, 1, 2] and all(c[3] == ("uncond", "cond") for c in calls)
    assert [c[4] for c in calls] == [0.0, 1.0, 2.0]


def test_call_past_declared_steps_is_an_error_unless_repeat():
    m = Linear()
    with DenoiserHook(LoopSpec(2)).attach(m):
        m(torch.ones(1)), m(torch.ones(1))
        with pytest.raises(RuntimeError, match="more calls than declared"):
            m(torch.ones(1))
    rec = Recorder()
    with DenoiserHook(LoopSpec(2), [rec], repeat=True).attach(m):
        for _ in range(5):
            m(torch.ones(1))
    assert [e for e in rec.events if e[0] != "call"] == [("start", 0), ("end", 0), ("start", 1), ("end", 1),
                                                          ("start", 2), ("abort", 2)]  # cut short by detach


def test_new_sample_between_generations_and_warning_when_cut_short(capsys):
    m, rec = Linear(), Recorder()
    with DenoiserHook(LoopSpec(3), [rec]).attach(m) as hook:
        hook.new_sample()
        for _ in range(3):
            m(torch.ones(1))
        hook.new_sample()
        m(torch.ones(1))
        hook.new_sample()
        assert "taohooks: warning: a new generation began after 1 of 3 calls" in capsys.readouterr().err
        assert hook.sample == 2 and hook.call_index == 0
    assert ("abort", 1) in rec.events


def test_exception_mid_sample_detaches_and_resets():
    m, rec = Linear(), Recorder()

    class Boom(Exception):
        pass

    hook = DenoiserHook(LoopSpec(4), [rec])
    with pytest.raises(Boom):
        with hook.attach(m):
            m(torch.ones(1))
            raise Boom()
    assert "forward" not in m.__dict__ and not hook.attached and hook.call_index is None
    assert rec.events[-1] == ("abort", 0)
    # an exception inside the model aborts the generation; the next call starts a new one
    failing = Linear()
    failing.forward = types.MethodType(lambda self, x: (_ for _ in ()).throw(Boom()), failing)
    with DenoiserHook(LoopSpec(2), [rec]).attach(failing) as hook:
        with pytest.raises(Boom):
            failing(torch.ones(1))
        assert hook.call_index is None and rec.events[-1] == ("abort", 0)


def test_first_substitute_wins_and_all_see_the_output():
    class Answer(Callback):
        def __init__(self, value):
            self.value, self.seen = value, []

        def on_before_call(self, hook, call, args, kwargs):
            return None if self.value is None else torch.full((1,), self.value)

        def on_after_call(self, hook, call, output):
            self.seen.append((output.item(), call.computed, type(call.substituted_by).__name__))

    m = Linear()
    a, b, c = Answer(None), Answer(5.0), Answer(7.0)
    with DenoiserHook(LoopSpec(1), [a, b, c]).attach(m) as hook:
        assert m(torch.ones(1)).item() == 5.0
        assert hook.counts == {"main": [0, 1]}
    assert a.seen == b.seen == c.seen == [(5.0, False, "Answer")]


def test_timestep_is_read_lazily_from_configured_argument():
    class Peek(Callback):
        def on_after_call(self, hook, call, output):
            self.value = call.timestep

    m, peek = Linear(), Peek()
    with DenoiserHook(LoopSpec(1), [peek], timestep_arg=1).attach(m):
        m(torch.ones(1), torch.tensor([[3.5]]))
    assert peek.value == 3.5


def test_loop_spec_validation():
    with pytest.raises(ValueError, match="positive"):
        LoopSpec(0)
    with pytest.raises(ValueError, match="distinct"):
        LoopSpec(3, ("a", "a"))
    assert LoopSpec(4, "main").streams == ("main",)
    assert LoopSpec(4, ("c", "u")).total_calls == 8 and LoopSpec(4, ("u", "c"), True).total_calls == 4


def test_passthrough_calls_are_untouched_and_end_generation_aborts_the_active_one():
    """``passthrough``: calls run the module as if unhooked (no numbering, no callbacks); ``end_generation`` ends an
    unfinished generation as an aborted one and says how many calls it made (``None`` when none was active)."""
    m, rec = Linear(), Recorder()
    hook = DenoiserHook(LoopSpec(2, ("cond",)), [rec]).attach(m)
    x = torch.ones(2)
    hook.new_sample()
    m(x, timestep=1.0)
    hook.passthrough = True
    assert torch.equal(m(x, timestep=5.0), 2 * x) and hook.counts == {"cond": [1, 0]}
    assert hook.end_generation("stopped") == 1 and rec.events[-1] == ("abort", 0)
    assert hook.end_generation("again") is None
    hook.passthrough = False
    hook.new_sample()
    m(x, timestep=1.0), m(x, timestep=0.5)
    assert hook.end_generation("after its last call") is None and rec.events[-1] == ("end", 1)
    hook.detach()


def test_copying_or_pickling_a_hooked_model_is_refused_naming_the_hook():
    """copy.deepcopy of a hooked model gave a twin that ran the original's forward (its own weights unused) and
    counted on the original's hook; torch.save failed with a pickling error naming no cause (walkthrough,
    2026-11-27). Detached, both work; the state_dict never needs detaching."""
    import copy
    import io

    m = Linear()
    hook = DenoiserHook(LoopSpec(2, ("cond",))).attach(m)
    with pytest.raises(RuntimeError, match="copy.deepcopy of a Linear while a taohooks hook is attached"):
        copy.deepcopy(m)
    with pytest.raises(RuntimeError, match="pickling .* while a taohooks hook is attached"):
        torch.save(m, io.BytesIO())
    torch.save(m.state_dict(), io.BytesIO())
    hook.detach()
    twin = copy.deepcopy(m)
    twin.w.data.fill_(3.0)
    assert float(twin(torch.ones(1))) == 3.0 and float(m(torch.ones(1))) == 2.0


def test_a_detached_hook_copies_and_pickles_as_any_object():
    """A Lightning callback keeps its (detached) cache's hook; ddp_spawn pickles the callbacks: the refusal of
    copies must hold only while the hook is attached (review, 2026-11-27)."""
    import copy
    import pickle

    hook = DenoiserHook(LoopSpec(2, ("cond",)))
    hook.attach(Linear()).detach()
    again = pickle.loads(pickle.dumps(hook))
    assert again.loop == hook.loop and not again.attached
    assert copy.deepcopy(hook).loop == hook.loop
