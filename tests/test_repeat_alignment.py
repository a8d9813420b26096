"""`repeat=True` (one hook, many generations) when a generation makes fewer or more calls than declared, or its
schedule changes: every generation that reuses anything reuses its own history at its own steps, bit for bit as a
fresh hook would (review of the runtime, 2026-11-27: each test failed before its fix)."""
import contextlib
import io

import numpy as np
import torch
from torch import nn

from taohooks import DenoiserHook, LoopSpec, TaoCache, TaoCacheCallback, config_from_dict
from taohooks.runtime.hook import _Timestep
from taohooks.taocache.lut import CalibrationLUT
from taohooks.taocache.plan import plan_from_window

STEPS = 10
WINDOW = list(range(5, 9))  # the plan's skipped steps


class Model(nn.Module):
    """Output depends on the input and the timestep; counts the calls that ran."""

    def __init__(self, positional: bool = False):
        super().__init__()
        self.ran = 0
        self.positional = positional

    def forward(self, x, timestep):
        self.ran += 1
        return torch.tanh(x) * (1 + timestep / 1000) + torch.sin(timestep / 100)


def flow_timesteps(steps: int = STEPS, shift: float = 1.0):
    return [1000 * shift * s / (1 + (shift - 1) * s) for s in (1 - i / steps for i in range(steps))]


def generation(model, timesteps=None, calls=None):
    """One sampling loop; returns (outputs, indices of the calls answered without running the model)."""
    timesteps = flow_timesteps() if timesteps is None else timesteps
    x, outputs, skipped = torch.ones(2, 3), [], []
    for i, t in enumerate(timesteps[:calls]):
        ran = model.ran
        t = torch.tensor([float(t)])
        eps = model(x, t) if model.positional else model(x, timestep=t)
        outputs.append(eps)
        if model.ran == ran:
            skipped.append(i)
        x = x - 0.05 * eps
    return outputs, skipped


def taocache_hook(window=WINDOW, **kwargs):
    ratios = torch.linspace(0.8, 1.2, STEPS)[None]  # a ratio per step, as a LUT gives
    plan = plan_from_window(STEPS, ("main",), window[0], window[-1], ratios)
    return DenoiserHook(LoopSpec(STEPS), [TaoCacheCallback(plan, max_norm_ratio=None)], repeat=True, **kwargs)


def fresh(timesteps=None, window=WINDOW):
    """What a hook attached for this one generation gives."""
    model = Model()
    with taocache_hook(window).attach(model):
        return generation(model, timesteps)


def equal(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_first_generation_stopped_early_is_cut_from_the_reference():
    """The first generation is the reference: stopped after 5 calls, the next one's calls were numbered as its steps
    5-9 and extrapolated from the stopped one's outputs, and no later generation was cached again."""
    model, err = Model(), io.StringIO()
    with contextlib.redirect_stderr(err), taocache_hook().attach(model):
        generation(model, calls=5)
        runs = [generation(model) for _ in range(3)]
    uncached = generation(Model())[0]
    assert [skipped for _, skipped in runs] == [[], WINDOW, WINDOW]
    assert equal(runs[0][0], uncached) and equal(runs[1][0], fresh()[0]) and equal(runs[2][0], fresh()[0])
    assert "call 5 of generation 1 runs at timestep 1000 again, where the generation began: that one made 5 of the 10" \
           in err.getvalue()


def test_calibration_leaves_out_a_generation_begun_inside_a_short_first_one(tmp_path):
    """The LUT took a generation spliced from two (timesteps 1000, 900, 800, 1000, ...), and then refused every
    correct one as 'a different sampler' in this run and every later one."""
    lut = tmp_path / "lut.safetensors"
    config = {"lut": str(lut), "calibration": {"auto": True, "prompts": 8, "error_horizon": 0}, "plan": {"budget": 2}}
    model, err = Model(), io.StringIO()
    with contextlib.redirect_stderr(err):
        with TaoCache(config_from_dict(config)).attach(model, steps=STEPS, repeat=True):
            generation(model, calls=3)
            for _ in range(3):
                generation(model)
        first = CalibrationLUT.load(lut)
        with TaoCache(config_from_dict(config)).attach(model, steps=STEPS, repeat=True):
            for _ in range(2):
                generation(model)
    assert first.timesteps.tolist() == [1000.0 - 100 * i for i in range(STEPS)]
    assert first.num_prompts == 2 * 2  # two generations of two prompts: the one begun inside the short one is out
    assert CalibrationLUT.load(lut).num_prompts == 2 * 4
    assert "calibration: generation 1 left out of the LUT: its calls are not numbered as its own steps" \
           in err.getvalue()
    assert "a different sampler" not in err.getvalue()


def test_a_long_generation_does_not_begin_a_reference_in_the_middle_of_its_loop():
    """After a generation of 25 steps (10 declared), 'the schedule changed' began a new reference at its call 20,
    and the next 10-step generation's first calls were extrapolated from the 25-step one's last outputs."""
    model, err = Model(), io.StringIO()
    with contextlib.redirect_stderr(err), taocache_hook().attach(model):
        generation(model)
        generation(model, flow_timesteps(25))
        runs = [generation(model) for _ in range(2)]
    assert [skipped for _, skipped in runs] == [WINDOW, WINDOW]
    assert equal(runs[0][0], fresh()[0]) and equal(runs[1][0], fresh()[0])


def test_a_loop_numbered_one_call_off_is_caught_at_any_earlier_call():
    """Heun-like loops (t0, t1, t1, t2, t2, ...): numbered one call off, every other call matches the reference at
    its own index, and a call outside the plan was answered with the call before it."""
    heun = [1000.0, 850, 850, 700, 700, 550, 550, 400, 400, 250]
    for window in ([2, 3, 4, 5], [4, 5, 6, 7]):
        model, err = Model(), io.StringIO()
        with contextlib.redirect_stderr(err), taocache_hook(window).attach(model):
            generation(model, heun)
            generation(model, heun, calls=1)  # interrupted after its first call
            shifted, skipped = generation(model, heun)
            aligned = generation(model, heun)
        assert skipped == [] and equal(shifted, generation(Model(), heun)[0]), window
        assert aligned[1] == window and equal(aligned[0], fresh(heun, window)[0])


def test_a_new_schedule_with_the_same_first_timestep_becomes_the_reference():
    """Another flow shift starts at t=1000 too: every generation on it was out of line for the rest of the attach,
    with a warning that it made fewer or more calls than declared."""
    shifted = flow_timesteps(shift=3.0)
    model, err = Model(), io.StringIO()
    with contextlib.redirect_stderr(err), taocache_hook().attach(model):
        generation(model)
        runs = [generation(model, shifted) for _ in range(3)]
    assert [skipped for _, skipped in runs] == [[], WINDOW, WINDOW]
    assert equal(runs[1][0], fresh(shifted)[0]) and equal(runs[2][0], fresh(shifted)[0])
    assert "generation 2 ran at other timesteps than generation 1 and made all its 10 calls" in err.getvalue()


def test_a_timestep_the_hook_cannot_read_is_warned_about_once():
    """A positional timestep (DiT's model(x, t)) left every repeat=True guard off without a word."""
    model, err = Model(positional=True), io.StringIO()
    with contextlib.redirect_stderr(err), taocache_hook().attach(model):
        generation(model)
        generation(model)
    assert err.getvalue().count("the hook cannot read the timestep of this Model's calls") == 1
    assert "Give timestep_arg=" in err.getvalue()
    model, err = Model(positional=True), io.StringIO()
    with contextlib.redirect_stderr(err), taocache_hook(timestep_arg=1).attach(model):
        generation(model)
    assert err.getvalue() == ""


def test_numpy_timesteps_are_read():
    assert _Timestep(np.float32(999.0)).value() == 999.0
    assert _Timestep(np.int64(7)).value() == 7.0
    assert _Timestep(np.array([3.0, 999.0])).value() == 999.0
    assert _Timestep(np.array([])).value() is None


# ---------------------------------------------------------------- loops that return to their first timestep
CHUNKED = [1000.0, 750.0, 500.0, 250.0] * 3  # one generation of 12 calls that revisits t=1000 twice (declared 12)
RETURNS = [1.0, 201, 401, 601, 801, 801, 601, 401, 201, 1]  # inversion then sampling: it ends at its first timestep


def chunked_hook(recorder=None):
    callbacks = [recorder] if recorder is not None else [
        TaoCacheCallback(plan_from_window(12, ("main",), 5, 7, 0.9), max_norm_ratio=None)]
    return DenoiserHook(LoopSpec(12), callbacks, repeat=True)


def test_generations_begun_by_new_sample_are_never_cut():
    """With new_sample() before each generation (Wan2.2's integration at each generate()), a generation that revisits
    its first timestep was cut as 'stopped early': nothing was cached and a calibration recorded nothing (review of
    the fix above)."""
    from taohooks import CalibrationRecorder

    model, err = Model(), io.StringIO()
    hook = chunked_hook()
    with contextlib.redirect_stderr(err), hook.attach(model):
        runs = []
        for _ in range(3):
            hook.new_sample()
            runs.append(generation(model, CHUNKED)[1])
    assert runs == [[5, 6, 7]] * 3 and err.getvalue() == ""
    recorder = CalibrationRecorder(error_horizon=0)
    hook = chunked_hook(recorder)
    with contextlib.redirect_stderr(err), hook.attach(Model()) as attached:
        for _ in range(3):
            hook.new_sample()
            generation(attached.module, CHUNKED)
    assert recorder.lut().num_prompts == 2 * 3


def test_a_generation_that_revisits_its_first_timestep_is_whole_again_when_the_next_begins_at_once(tmp_path):
    """Without new_sample(), the revisit looks like a generation stopped early: the first generation is computed and
    left out of a calibration (two short generations look the same); when the next one begins right at its end, it
    is whole again, and the rest are cached and recorded."""
    model, err = Model(), io.StringIO()
    hook = chunked_hook()
    with contextlib.redirect_stderr(err), hook.attach(model):
        runs = [generation(model, CHUNKED)[1] for _ in range(3)]
    assert runs == [[], [5, 6, 7], [5, 6, 7]] and hook.misaligned_generations == 0
    assert "generation 1 made all its 12 calls after all" in err.getvalue()
    lut = tmp_path / "lut.safetensors"
    config = {"lut": str(lut), "calibration": {"auto": True, "prompts": 8, "error_horizon": 0}, "plan": {"budget": 2}}
    with contextlib.redirect_stderr(err), TaoCache(config_from_dict(config)).attach(model, steps=12, repeat=True):
        for _ in range(3):
            generation(model, CHUNKED)
    assert CalibrationLUT.load(lut).num_prompts == 2 * 2


def test_a_loop_that_ends_at_its_first_timestep_skips_no_wrong_step_and_keeps_its_lut_timesteps(tmp_path):
    """It looks like a generation stopped one call early, and the generations after it are numbered one call off (a
    limit, in the README): they compute, and a calibration, which reuses nothing, leaves them out too (it took
    [1, 1, 201, ...] from them: each generation is compared with the reference at its end as well)."""
    model, err = Model(), io.StringIO()
    with contextlib.redirect_stderr(err), taocache_hook().attach(model):
        runs = [generation(model, RETURNS) for _ in range(4)]
    uncached = generation(Model(), RETURNS)[0]
    assert runs[0][1] == WINDOW and equal(runs[0][0], fresh(RETURNS)[0])
    assert all(equal(outputs, uncached) or equal(outputs, fresh(RETURNS)[0]) for outputs, _ in runs[1:])
    lut = tmp_path / "lut.safetensors"
    config = {"lut": str(lut), "calibration": {"auto": True, "prompts": 8, "error_horizon": 0}, "plan": {"budget": 2}}
    with contextlib.redirect_stderr(err), TaoCache(config_from_dict(config)).attach(model, steps=STEPS, repeat=True):
        for _ in range(4):
            generation(model, RETURNS)
    assert not lut.exists() or CalibrationLUT.load(lut).timesteps.tolist() == RETURNS


def test_two_generations_stopped_early_in_a_row_are_both_cut():
    model, err = Model(), io.StringIO()
    hook = taocache_hook()
    with contextlib.redirect_stderr(err), hook.attach(model):
        generation(model, calls=3)
        generation(model, calls=3)
        runs = [generation(model) for _ in range(3)]
    assert [skipped for _, skipped in runs] == [[], WINDOW, WINDOW] and hook.misaligned_generations == 2
    assert equal(runs[1][0], fresh()[0])
    assert "call 6 of generation 1 runs at timestep 1000 again, where the last one begun inside it began" \
           in err.getvalue()


def test_a_numpy_timestep_refilled_in_place_is_read_at_its_call():
    buffer = np.zeros(2, dtype=np.float32)

    class NumpyModel(Model):
        def forward(self, x, timestep):
            return super().forward(x, torch.from_numpy(timestep.copy())[:1])

    def numpy_generation(model, calls=STEPS):
        x, skipped = torch.ones(2, 3), []
        for i, t in enumerate(flow_timesteps()[:calls]):
            buffer.fill(t)
            ran = model.ran
            x = x - 0.05 * model(x, timestep=buffer)
            if model.ran == ran:
                skipped.append(i)
        return skipped

    model, err = NumpyModel(), io.StringIO()
    with contextlib.redirect_stderr(err), taocache_hook().attach(model):
        numpy_generation(model, calls=3)
        assert [numpy_generation(model) for _ in range(3)] == [[], WINDOW, WINDOW]


def test_two_short_warm_ups_that_make_the_declared_calls_between_them_stay_out_of_the_lut(tmp_path):
    """Two 5-step warm-ups (10 declared) look like one generation revisiting its first timestep; recording it as
    one corrupted the LUT (timesteps 1000 ... 200, 1000 ... 200), which then refused every correct generation."""
    lut = tmp_path / "lut.safetensors"
    config = {"lut": str(lut), "calibration": {"auto": True, "prompts": 12, "error_horizon": 0}, "plan": {"budget": 2}}
    model, err = Model(), io.StringIO()
    warm_up = [1000.0, 800.0, 600.0, 400.0, 200.0]
    with contextlib.redirect_stderr(err), TaoCache(config_from_dict(config)).attach(model, steps=STEPS, repeat=True):
        generation(model, warm_up)
        generation(model, warm_up)
        for _ in range(6):
            generation(model, [1000.0 - 100 * i for i in range(STEPS)])
    saved = CalibrationLUT.load(lut)  # (the first complete generation is out of line with them, then the reference)
    assert saved.timesteps.tolist() == [1000.0 - 100 * i for i in range(STEPS)] and saved.num_prompts == 2 * 5
