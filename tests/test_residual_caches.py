"""Residual caches (TeaCache, MagCache, TaoSkip+TeaResidual) and PAB on a tiny DiT."""
import pytest
import torch

from taohooks import DenoiserHook, LoopSpec, TaoCache, config_from_dict
from taohooks.caches.magcache import MagCacheCalibrator, MagCacheCallback
from taohooks.caches.pab import BroadcastGroup, PyramidAttentionBroadcast
from taohooks.caches.residual import ResidualSkipCallback
from taohooks.caches.teacache import TeaCacheCalibrator, TeaCacheCallback
from tinydit import TinyDiT, run

STEPS = 10


def attach(model, callbacks, streams=("main",)):
    return DenoiserHook(LoopSpec(STEPS, streams), callbacks).attach(model)


def test_residual_reuse_is_exact_block_stack_arithmetic():
    model = TinyDiT()
    ref = run(model, STEPS)
    skip = ResidualSkipCallback([4])
    with attach(model, [skip]):
        out = run(model, STEPS)
    assert skip.reused == 1 and skip.calls == STEPS
    for t in range(4):
        assert torch.equal(out[t][0], ref[t][0])
    # expected step 4: final(embed(x4) + (blocks(h3) - h3)) with the x the cached run really had at step 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 4, generator=g)
    with torch.no_grad():
        hs = []
        for t in range(5):
            ts = torch.tensor([1000.0 * (1 - t / STEPS)])
            c = model.t_embed(ts.reshape(-1, 1).expand(2, 1) / 1000)
            h = model.embed(x)
            h_out = h
            for b in model.blocks:
                h_out = b(h_out, c)
            hs.append((h, h_out))
            if t < 4:
                x = x - 0.1 * model.final(h_out)
        expected = model.final(hs[4][0] + (hs[3][1] - hs[3][0]))
    assert torch.allclose(out[4][0], expected, atol=1e-6)
    assert "forward" not in model.blocks[0].__dict__  # detached


def test_teacache_threshold_zero_is_identity_and_pattern_is_exact():
    model = TinyDiT()
    ref = run(model, STEPS, streams=2)
    tea = TeaCacheCallback(0.0, [1.0, 0.0])
    with attach(model, [tea], ("cond", "uncond")):
        out = run(model, STEPS, streams=2)
    assert tea.reused == 0 and all(torch.equal(a, b) for r, o in zip(ref, out) for a, b in zip(r, o))
    # a constant rescaled distance c per call: acc = c, 2c, 3c>=2.5c -> reuse, reuse, compute, ...
    tea = TeaCacheCallback(2.5, [0.0, 0.0, 0.0, 0.0, 1.0])
    with attach(model, [tea], ("cond", "uncond")):
        run(model, STEPS, streams=2)
    # per stream: step 0 forced, steps 1..8 -> R R C R R C R R, step 9 forced (last)
    assert tea.reused == 2 * 6 and tea.calls == 2 * STEPS
    late = TeaCacheCallback(2.5, [0.0, 0.0, 0.0, 0.0, 1.0], max_step=4)  # the hybrid's TeaCache range
    with attach(model, [late], ("cond", "uncond")):
        run(model, STEPS, streams=2)
    assert late.reused == 2 * 2  # steps 1 and 2 only


def test_teacache_calibrator_fits_a_polynomial():
    model = TinyDiT()
    cal = TeaCacheCalibrator()
    with attach(model, [cal], ("cond", "uncond")) as hook:
        for seed in range(3):
            hook.new_sample()
            run(model, STEPS, streams=2, seed=seed)
    assert len(cal.pairs) == 3 * 2 * (STEPS - 1) and cal.reused == 0
    coefficients = cal.fit()
    assert len(coefficients) == 5 and all(map(lambda c: c == c, coefficients))


def test_magcache_pattern_with_flat_ratios_and_calibration():
    model = TinyDiT()
    mag = MagCacheCallback(torch.ones(1, STEPS), threshold=0.1, max_skip_steps=2, retention_ratio=0.2)
    with attach(model, [mag]):
        run(model, STEPS)
    # steps 0, 1 retained; then R R C R R C R R (acc_err stays 0; at most 2 consecutive skips)
    assert mag.reused == 6
    with pytest.raises(ValueError, match=r"\[calls per step, steps\] = \[2, 10\]"):
        with attach(TinyDiT(), [MagCacheCallback(torch.ones(1, STEPS))], ("cond", "uncond")):
            pass
    cal = MagCacheCalibrator()
    with attach(model, [cal], ("cond", "uncond")):
        run(model, STEPS, streams=2)
    ratios = cal.ratios()
    assert ratios.shape == (2, STEPS) and torch.all(ratios[:, 0] == 1.0) and torch.all(ratios[:, 1:] > 0)


def test_pab_broadcasts_on_the_step_grid_and_resets():
    model = TinyDiT(depth=2)
    pab = PyramidAttentionBroadcast([BroadcastGroup(r"blocks\.\d+\.attn", 2)], steps=(2, 7))
    with attach(model, [pab]):
        run(model, STEPS)
    assert pab.broadcasts == 2 * 3  # steps 3, 5, 7 in each of the 2 blocks
    assert model.blocks[0].attn.calls == STEPS - 3
    pab = PyramidAttentionBroadcast([BroadcastGroup(r"blocks\.\d+\.attn", 2)], steps=(2, 7), reset_steps=[5])
    with attach(model, [pab]):
        run(model, STEPS)
    assert pab.broadcasts == 2 * 2
    with pytest.raises(ValueError, match="matches no module"):
        with attach(model, [PyramidAttentionBroadcast([BroadcastGroup("nope", 2)], steps=(2, 7))]):
            pass


def test_pab_stays_in_phase_when_taocache_skips_steps():
    model = TinyDiT(depth=1)
    cache = TaoCache(config_from_dict({"plan": {"window": [4, 4], "ratio": 1.0}}))
    pab = PyramidAttentionBroadcast([BroadcastGroup(r"blocks\.0\.attn", 2)], steps=(2, 7))
    with cache.attach(model, steps=STEPS, callbacks=[pab]):
        run(model, STEPS)
    # steps 2..7 without step 4 (skipped, no call): compute at 2, 6; broadcast at 3, 5, 7
    assert cache.hook.counts == {"main": [9, 1]} and pab.broadcasts == 3


def test_callbacks_patching_the_same_blocks_detach_in_reverse_order():
    model = TinyDiT()
    original = model.blocks[0].forward
    tea, mag = TeaCacheCalibrator(), MagCacheCalibrator()
    with attach(model, [tea, mag]):
        run(model, STEPS)
    assert len(tea.pairs) == STEPS - 1 and mag.ratios().shape == (1, STEPS)
    assert all("forward" not in b.__dict__ for b in model.blocks) and model.blocks[0].forward == original


# ---------------------------------------------------------------- TeaCache's two defects (issue 14, item 6)
def test_a_negative_teacache_fit_is_refused_with_a_warning(capsys):
    """A polynomial negative over part of the recorded range made those calls look unchanged (reused at
    any threshold); the fit falls back to the proportional one and says so."""
    import numpy as np

    from taohooks.caches.teacache import TeaCacheCalibrator, TeaCacheCallback

    cal = TeaCacheCalibrator()
    x = np.linspace(0.01, 0.2, 40)
    y = 0.5 * x - 40 * (x - 0.1) ** 2 + 0.05 * np.sin(90 * x)  # a 4th-order fit dips below 0 at the ends
    cal.pairs = list(zip(x.tolist(), y.tolist()))
    assert np.polyval(np.polyfit(x, y, 4), np.linspace(0.01, 0.2, 200)).min() < 0  # the test could fail
    coefficients = cal.fit()
    err = capsys.readouterr().err
    assert "TeaCache's fitted degree-4 polynomial is negative for proxy changes" in err
    a = float((x * y).sum() / (x * x).sum())
    assert coefficients == pytest.approx([0.0, 0.0, 0.0, a, 0.0])
    assert TeaCacheCallback(0.1, [0, 0, 0, -1.0, 0]).rescale(0.3) == 0.0  # never a negative contribution


def test_a_threshold_search_that_misses_the_budget_says_so(capsys):
    from taohooks.evaluation.methods import match_threshold

    jump = lambda callbacks: 0.48 if callbacks[0] > 0.05 else 0.0  # noqa: E731 (0% or 48%, nothing between)
    threshold, fraction = match_threshold(lambda th: [th], jump, 0.04, what="TeaCache's threshold")
    assert fraction in (0.0, 0.48)
    assert ("TeaCache's threshold search could not meet the budget of 4.0% skipped calls: the closest is "
            in capsys.readouterr().err)
    match_threshold(lambda th: [th], lambda cbs: min(cbs[0], 1.0), 0.04, what="linear")
    assert "could not meet" not in capsys.readouterr().err
