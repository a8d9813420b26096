"""MagCache for Wan2.2 with the authors' published ratios and retention rule, on two tiny experts.

The expected schedules come from a separate simulation of the authors' state machine
(``MagCache4Wan2.2/magcache_generate.py`` at df81cb1, run on its published tables), not from this code."""
import pytest
import torch

from taohooks import DenoiserHook, LoopSpec
from taohooks.caches.magcache_wan22 import (PUBLISHED, Wan22MagCache, authors_high_noise_steps, table_for,
                                            wan22_magcache)
from test_wan21_authors_caches import TinyWan


def schedule(table, steps, switch, counted=None, **settings):
    """Run ``steps`` steps (cond, then uncond) on a high-noise and a low-noise expert that switch at
    ``switch`` (``None``: one model), MagCache told ``counted`` high-noise steps (default: ``switch``);
    returns the (step, slot) calls that reused the residual."""
    high, low = TinyWan().eval(), TinyWan().eval()
    mag = wan22_magcache(table, steps, switch if counted is None else counted, **settings)
    hook = DenoiserHook(LoopSpec(steps, ("cond", "uncond"), batch_dim=None), [mag], timestep_arg="t")
    reused = []
    with hook.attach(high, *([low] if switch is not None else [])), torch.no_grad():
        hook.new_sample()
        x = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(1))
        for step, t in enumerate(torch.linspace(999, 20, steps).round()):
            model = high if switch is None or step < switch else low
            for slot in range(2):
                before = mag.reused
                model(x, torch.stack([t]), context=None)
                if mag.reused > before:
                    reused.append((step, slot))
    return reused


def test_the_authors_count_of_high_noise_steps():
    assert authors_high_noise_steps(40, 12.0, 0.875) == 26  # T2V-A14B: the switch Wan2.2 makes, step 26
    assert authors_high_noise_steps(40, 5.0, 0.900) == 15   # I2V-A14B: step 15
    assert {k: len(v) for k, v in PUBLISHED.items()} == {"t2v-A14B": 78, "i2v-A14B": 78, "ti2v-5B": 98,
                                                         "ti2v-5B-image": 98}
    # the expert switch is the one low ratio of each A14B table (between the experts' residuals)
    assert min(range(78), key=PUBLISHED["t2v-A14B"].__getitem__) == 51 and PUBLISHED["t2v-A14B"][50] == 0.65523
    assert PUBLISHED["i2v-A14B"][28] == 0.91076  # call 30: step 15, cond


def test_t2v_a14b_with_the_readme_settings_skips_the_authors_calls():
    reused = schedule("t2v-A14B", 40, 26)  # E0.06 K2 R0.4 (the README's command)
    steps = [10, 11, 13, 14, 16, 17, 19, 20, 22, 23, 25, 32, 34, 36]
    assert reused == [(s, slot) for s in steps for slot in range(2)]  # 28 of 80 calls, both streams alike


def test_t2v_a14b_script_defaults_and_i2v_a14b():
    assert len(schedule("t2v-A14B", 40, 26, threshold=0.04, k=2, retention_ratio=0.2)) == 34
    reused = schedule("i2v-A14B", 40, 15)  # E0.06 K2 R0.1: the high-noise expert always computed
    assert len(reused) == 21 and reused[0] == (17, 1)  # the uncond call of step 17 is the first one out of int()
    assert all(step >= 17 for step, _ in reused) and max(step for step, _ in reused) <= 33


def test_ti2v_5b_one_model():
    text = schedule("ti2v-5B", 50, None)
    image = schedule(table_for("ti2v-5B", image=True), 50, None)
    assert len(text) == 50 and len(image) == 48
    assert (49, 0) in text and (49, 1) in image  # the last step is not protected


def test_the_retention_windows_in_calls():
    """T2V R0.4: calls 0-19 and 52-63 computed; I2V R0.1: calls 0-34; TI2V R0.2: calls 0-19."""
    def retained(table, steps, switch, r):
        mag = wan22_magcache(table, steps, switch, retention_ratio=r)
        mag.hook = type("H", (), {"loop": LoopSpec(steps, ("cond", "uncond"))})()
        out = []
        for cnt in range(2 * steps):
            mag.expert = 0 if switch is None or cnt < 2 * switch else 1
            mag._switch_checked = True
            call = type("C", (), {"step": cnt // 2, "index": cnt})()
            if mag.retained(call):
                out.append(cnt)
        return out

    assert retained("t2v-A14B", 40, 26, 0.4) == list(range(20)) + list(range(52, 64))
    assert retained("i2v-A14B", 40, 15, 0.1) == list(range(35))
    assert retained("ti2v-5B", 50, None, 0.2) == list(range(20))


def test_bad_settings_and_a_switch_elsewhere(capsys):
    with pytest.raises(ValueError, match="needs high_noise_steps for t2v and i2v"):
        wan22_magcache("t2v-A14B", 40, None)
    with pytest.raises(ValueError, match="no Wan2.2 ratios for task 's2v-14B'"):
        table_for("s2v-14B")
    schedule("t2v-A14B", 40, 27, counted=26)  # the experts switch one step later than the rule counts
    assert "the low-noise expert took over at step 27; the authors' retention counts 26" in capsys.readouterr().err


def test_a_reuse_the_first_low_noise_call_cannot_make_computes_and_restarts_the_count():
    """I2V with no retention: the first low-noise calls (step 15) pass the threshold on the published
    switch ratio (0.91), but the low-noise expert has no residual yet: they compute, and count as
    computed (the accumulators restart there), where the authors would reuse the high-noise residual."""
    refused = []

    class Spy(Wan22MagCache):
        def on_reuse_refused(self, call):
            refused.append((call.step, call.index % 2, self._budgets[call.streams].steps))
            super().on_reuse_refused(call)
            assert self._budgets[call.streams].steps == 0

    import taohooks.caches.magcache_wan22 as m
    original = m.Wan22MagCache
    m.Wan22MagCache = Spy
    try:
        reused = schedule("i2v-A14B", 40, 15, threshold=0.2, k=2, retention_ratio=0.0)
    finally:
        m.Wan22MagCache = original
    assert [(s, slot) for s, slot, _ in refused] == [(15, 0), (15, 1)]
    assert (15, 0) not in reused and (15, 1) not in reused and (16, 0) in reused
