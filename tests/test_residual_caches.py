"""Residual caches (TeaCache, MagCache, TaoSkip+TeaResidual) and PAB on a tiny DiT."""
import pytest
import torch

from taohooks import DenoiserHook, LoopSpec, TaoCache, config_from_dict
from taohooks.caches.magcache import MagCacheCalibrator, MagCacheCallback
from taohooks.caches.pab import BroadcastGroup, PyramidAttentionBroadcast
from taohooks.caches.residual import ResidualSkipCallback
from taohooks.caches.teacache import TeaCacheCalibrator, TeaCacheCallback
from taohooks.caches.easycache import EasyCacheCallback
from tinydit import TinyDiT, TinyLatte, latte_probe, run, run_latte

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
    assert len(cal.pairs) == 3 * 2 * (STEPS - 1) * 2 and cal.reused == 0  # per sample: 2 per call
    coefficients = cal.fit()
    assert len(coefficients) == 5 and all(map(lambda c: c == c, coefficients))


def test_a_poorly_conditioned_teacache_fit_is_said_on_stderr(capfd):
    """Pairs with two distinct proxy changes cannot fix a degree-4 polynomial: numpy's RankWarning (a warning the
    research scripts silence) is said on the stderr channel, naming what was recorded."""
    import warnings

    cal = TeaCacheCalibrator()
    cal.pairs = [(0.1, 0.2), (0.2, 0.3)] * 4
    cal.pair_experts = [0] * len(cal.pairs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (as Wan's generate.py)
        cal.fit()
    err = capfd.readouterr().err
    assert ("TeaCache's degree-4 polynomial is poorly conditioned: 8 pairs with 2 distinct proxy changes (0.1 to 0.2)"
            in err)
    cal.pairs = [(0.05 * i, 0.1 * i) for i in range(1, 9)]  # 8 distinct changes: nothing said
    cal.fit()
    assert "poorly conditioned" not in capfd.readouterr().err


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


def test_pab_drops_its_cache_after_a_bypassed_block_stack():
    """TeaCache-style reuse at step 3 (the blocks do not run): step 4, a broadcast step, computes its
    attention instead of broadcasting the output of step 1."""
    model = TinyDiT(depth=1)
    pab = PyramidAttentionBroadcast([BroadcastGroup(r"blocks\.0\.attn", 2)], steps=(1, 8))
    skip = ResidualSkipCallback([3])
    with attach(model, [skip, pab]):
        run(model, STEPS)
    # window 1..8, range 2: broadcast at 2, 4, 6, 8; step 3 bypassed, so step 4 computes
    assert skip.reused == 1 and pab.broadcasts == 3
    assert model.blocks[0].attn.calls == 6  # steps 0, 1, 4, 5, 7, 9


def test_pab_neither_broadcasts_nor_caches_in_a_call_run_on_some_samples_only():
    """Sample 0 reuses at step 3, sample 1 computes (the blocks run on its row only): PAB must not cache
    that one-row attention output (step 4 would broadcast it to both rows) and computes at step 4."""
    from taohooks.caches.residual import BlockStackCache

    class Scripted(BlockStackCache):
        def decide(self, call, block, args, kwargs):
            return [call.step == 3, False]

    model = TinyDiT(depth=1)
    pab = PyramidAttentionBroadcast([BroadcastGroup(r"blocks\.0\.attn", 2)], steps=(1, 8))
    scripted = Scripted()
    with attach(model, [scripted, pab]):
        outs = run(model, STEPS)
    assert scripted.reused == 0.5 and pab.broadcasts == 3  # steps 2, 6, 8
    assert model.blocks[0].attn.calls == 7  # steps 0, 1, 3 (one row), 4, 5, 7, 9
    assert all(o[0].shape == (2, 5, 4) for o in outs)


def test_pab_stays_in_phase_when_it_sees_a_call_taocache_answers():
    """PAB *before* TaoCache on the hook sees the skipped call, in which no attention runs: a call the
    model never ran does not drop PAB's cache (broadcasts as with PAB after TaoCache)."""
    from taohooks.taocache.extrapolation import TaoCacheCallback
    from taohooks.taocache.plan import plan_from_window

    model = TinyDiT(depth=1)
    pab = PyramidAttentionBroadcast([BroadcastGroup(r"blocks\.0\.attn", 2)], steps=(2, 7))
    tao = TaoCacheCallback(plan_from_window(STEPS, ("main",), 4, 4, 1.0), None)
    with DenoiserHook(LoopSpec(STEPS), [pab, tao]).attach(model) as hook:
        run(model, STEPS)
    assert hook.counts == {"main": [9, 1]} and pab.broadcasts == 3  # steps 3, 5, 7


def test_a_block_whose_rows_do_not_map_runs_on_all_rows_in_a_partial_call():
    """Sample 0 reuses, sample 1 computes; the middle block sees a packed ``[1, B*N, D]`` layout whose
    rows do not map onto samples: it runs on everything, and sample 1 gets exactly its computed output."""
    from taohooks.caches.residual import BlockStackCache

    class PackedMiddle(TinyDiT):
        def forward(self, x, timestep):
            t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1, 1).expand(x.shape[0], 1)
            c = self.t_embed(t / 1000)
            h = self.blocks[0](self.embed(x), c)
            b, n, d = h.shape
            h = self.blocks[1](h.reshape(1, b * n, d), c[:1]).reshape(b, n, d)  # rows: 1, the batch: 2
            return self.final(self.blocks[2](h, c))

    class Scripted(BlockStackCache):
        def decide(self, call, block, args, kwargs):
            return [call.step == 3, False]

    model = PackedMiddle(depth=3)
    ref = run(model, STEPS)
    scripted = Scripted()
    with attach(model, [scripted]):
        out = run(model, STEPS)
    assert scripted.reused == 0.5
    # sample 1 never reused and the blocks keep tokens apart: its outputs are the reference's
    assert all(torch.allclose(o[0][1], r[0][1], atol=1e-6) for o, r in zip(out, ref))
    assert not torch.allclose(out[3][0][0], ref[3][0][0])  # sample 0 reused at step 3


def test_an_exit_module_that_never_receives_the_output_is_an_error():
    model = TinyDiT()
    skip = ResidualSkipCallback([3], exit="embed")  # runs before the blocks, not after them
    with pytest.raises(RuntimeError, match="never reached 'embed'"):
        with attach(model, [skip]):
            run(model, STEPS)


def test_reused_fractions_add_up_exactly():
    from taohooks.caches.residual import BlockStackCache

    class OneOfThree(BlockStackCache):
        def decide(self, call, block, args, kwargs):
            return [True, False, False]

    model = TinyDiT()
    cache = OneOfThree()
    with attach(model, [cache]):
        run(model, STEPS, x=torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0)))
    assert cache.reused == (STEPS - 1) / 3  # the first call has no residual yet


def test_callbacks_patching_the_same_blocks_detach_in_reverse_order():
    model = TinyDiT()
    original = model.blocks[0].forward
    tea, mag = TeaCacheCalibrator(), MagCacheCalibrator()
    with attach(model, [tea, mag]):
        run(model, STEPS)
    assert len(tea.pairs) == 2 * (STEPS - 1) and mag.ratios().shape == (1, STEPS)  # 2 samples
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


# ---------------------------------------------------------------------- interleaved stacks, per-sample verdicts
LATTE_STACKS = ("transformer_blocks", "temporal_transformer_blocks")


def _latte_stack(model, x, t, encoder):
    """(stack input, stack output) of one TinyLatte call, in ``(b f) n d``, computed by hand."""
    b, c, f, n = x.shape
    t6 = model.t_embed(torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1).expand(b, 1) / 1000)
    h_in = h = model.embed(x.permute(0, 2, 3, 1).reshape(b * f, n, c))
    for i, (spatial, temporal) in enumerate(zip(model.transformer_blocks, model.temporal_transformer_blocks)):
        h = spatial(h, None, encoder.repeat_interleave(f, 0), None, t6.repeat_interleave(f, 0))
        h = h.reshape(b, f, n, -1).transpose(1, 2).reshape(b * n, f, -1) + (model.temp_pos_embed if i == 0 else 0)
        h = temporal(h, None, None, None, timestep=t6.repeat_interleave(n, 0))
        h = h.reshape(b, n, f, -1).transpose(1, 2).reshape(b * f, n, -1)
    return h_in, h


def test_interleaved_stacks_reuse_the_whole_residual_at_the_exit_module():
    """Latte's spatial + temporal stacks: on a reused step the output is the head on
    ``stack input + (previous stack output - previous stack input)`` (the temporal position embedding
    added between the stacks is inside the residual, not added twice)."""
    model = TinyLatte()
    g = torch.Generator().manual_seed(1)
    x, encoder = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 6, 8, generator=g)
    skip = ResidualSkipCallback([3], blocks=LATTE_STACKS, exit="norm_out")
    with DenoiserHook(LoopSpec(STEPS), [skip]).attach(model):
        out = run_latte(model, STEPS, x, encoder)
    assert skip.reused == 1 and skip.calls == STEPS
    with torch.no_grad():
        xs = [x]
        for o in out[:3]:
            xs.append(xs[-1] - 0.1 * o)
        t = lambda i: torch.tensor([1000.0 * (1 - i / STEPS)])
        h2_in, h2_out = _latte_stack(model, xs[2], t(2), encoder)
        h3_in, _ = _latte_stack(model, xs[3], t(3), encoder)
        head = model.proj_out(model.norm_out(h3_in + (h2_out - h2_in)))
        expected = head.reshape(2, 4, 5, 3).permute(0, 3, 1, 2)
    assert torch.allclose(out[3], expected, atol=1e-6)
    with pytest.raises(ValueError, match="exit="):
        ResidualSkipCallback([3], blocks=LATTE_STACKS)


def _separately(make, runner, xs):
    """Each sample on its own: (outputs per step, reused calls) for every input in ``xs``."""
    results = []
    for x in xs:
        tea = make()
        results.append((runner(tea, x), tea.reused))
    return results


@pytest.mark.parametrize("layout", ["two-call", "batched-cfg-latte"])
def test_per_sample_teacache_does_not_depend_on_the_batch(layout):
    """Two prompts whose proxies change at different rates: batched together, each gets exactly the
    verdicts (and outputs) it gets alone; the batch has calls where one reuses and the other computes."""
    g = torch.Generator().manual_seed(2)
    if layout == "two-call":
        model = TinyDiT()
        xs = [torch.randn(1, 5, 4, generator=g), 6.0 * torch.randn(1, 5, 4, generator=g) + 3.0]
        coefficients, threshold = [1.0, 0.0], 0.07  # proxy changes ~0.06 and ~0.02 per call

        def runner(tea, x):
            with DenoiserHook(LoopSpec(STEPS, ("cond", "uncond")), [tea]).attach(model):
                return [torch.cat(o) for o in run(model, STEPS, streams=2, x=x)]

        make = lambda: TeaCacheCallback(threshold, coefficients)
    else:
        model = TinyLatte()
        encoder = torch.randn(1, 6, 8, generator=g)
        xs = [torch.randn(1, 3, 4, 5, generator=g), 8.0 * torch.randn(1, 3, 4, 5, generator=g) + 4.0]
        coefficients, threshold = [1.0, 0.0], 0.12  # ~0.08 and ~0.055 per call

        def runner(tea, x):
            with DenoiserHook(LoopSpec(STEPS, ("uncond", "cond"), split_batch=True), [tea]).attach(model):
                return run_latte(model, STEPS, x, encoder.expand(len(x), -1, -1), cfg=True)

        make = lambda: TeaCacheCallback(threshold, coefficients, probe=latte_probe, blocks=LATTE_STACKS,
                                        exit="norm_out")
    alone = _separately(make, runner, xs)
    tea = make()
    mixed = []
    original = tea.on_after_call

    def spy(hook, call, output):
        original(hook, call, output)
        mixed.append(tea.last_reused)
    tea.on_after_call = spy
    together = runner(tea, torch.cat(xs))
    assert alone[0][1] != alone[1][1], "the two samples should reuse on different calls"
    assert 0.5 in mixed  # some calls reused one sample and computed the other
    assert tea.reused == pytest.approx((alone[0][1] + alone[1][1]) / 2)
    for step, out in enumerate(together):
        first_a, first_b, second_a, second_b = out.chunk(4)  # the two streams, each (a, b)
        a, b = torch.cat([first_a, second_a]), torch.cat([first_b, second_b])
        assert torch.allclose(a, alone[0][0][step], atol=1e-5), step
        assert torch.allclose(b, alone[1][0][step], atol=1e-5), step


def test_per_call_teacache_decides_on_the_whole_batch():
    """``per_sample=False``: one accumulator for the batch (the authors' rule on a batch of prompts)."""
    model = TinyDiT()
    tea = TeaCacheCallback(0.6, [1.0, 0.0], per_sample=False)
    with attach(model, [tea], ("cond", "uncond")):
        run(model, STEPS, streams=2)
    assert float(tea.reused).is_integer()


def _two_experts(high, low, steps=STEPS, switch=5):
    """Wan2.2's shape: the high-noise expert for the first ``switch`` steps, the low-noise one after."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 4, generator=g)
    outs = []
    with torch.no_grad():
        for i in range(steps):
            t = torch.tensor([1000.0 * (1 - i / steps)])
            out = (high if i < switch else low)(x, timestep=t)
            outs.append(out)
            x = x - 0.1 * out
    return outs


def test_block_stack_caches_patch_every_expert_and_keep_their_residuals_apart():
    """On a hook attached to two experts, both experts' blocks are patched; the first call of the
    second expert computes (the first expert's residual is not its own), later ones reuse its own."""
    high, low = TinyDiT(seed=0), TinyDiT(seed=1)
    ref = _two_experts(high, low)
    seen, kept = [], []

    class Skip(ResidualSkipCallback):
        def decide(self, call, block, args, kwargs):
            seen.append((call.step, self.expert))
            kept.append({expert for expert, _ in self._residuals})
            return super().decide(call, block, args, kwargs)

    skip = Skip([3, 5, 7])
    with DenoiserHook(LoopSpec(STEPS, ("main",)), [skip]).attach(high, low):
        assert "forward" in vars(high.blocks[0]) and "forward" in vars(low.blocks[2])
        out = _two_experts(high, low)
        assert kept[STEPS - 1] == {1}  # at the last call: the first expert's residual was dropped
        assert skip._residuals == {}  # and after the generation, its own too
    assert "forward" not in vars(high.blocks[0]) and "forward" not in vars(low.blocks[2])
    assert seen == [(s, 0 if s < 5 else 1) for s in range(STEPS)]
    assert skip.reused == 2 and skip.calls == STEPS  # steps 3 and 7; step 5 had no residual of its expert
    for s in range(3):
        assert torch.equal(out[s], ref[s])
    assert not torch.equal(out[3], ref[3]) and not torch.equal(out[7], ref[7])
    # step 5 computed: low's own blocks on the input the cached run had there
    with torch.no_grad():
        x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
        for s in range(5):
            x = x - 0.1 * out[s]
        assert torch.allclose(out[5], low(x, timestep=torch.tensor([500.0])), atol=1e-6)


def test_teacache_calibration_pairs_stay_within_an_expert():
    """Consecutive calls of different experts are not a TeaCache calibration pair (their proxies and
    outputs come from two networks): 4 pairs per expert and sample, none across the switch."""
    high, low = TinyDiT(seed=0), TinyDiT(seed=1)
    kept = []

    class Calibrator(TeaCacheCalibrator):
        def decide(self, call, block, args, kwargs):
            kept.append({k[0] for k in self._previous})
            return super().decide(call, block, args, kwargs)

    cal = Calibrator()
    with DenoiserHook(LoopSpec(STEPS, ("main",)), [cal]).attach(high, low):
        _two_experts(high, low)
        assert kept[STEPS - 1] == {1}  # at the last call: the first expert's proxies and outputs were dropped
    assert len(cal.pairs) == 2 * (4 + 4)  # 2 samples; steps 1-4 after 0, 6-9 after 5
    assert max(y for _, y in cal.pairs) < 0.5
    accumulators = []

    class Tea(TeaCacheCallback):
        def decide(self, call, block, args, kwargs):
            accumulators.append({k[0] for k in self._acc})
            return super().decide(call, block, args, kwargs)

    tea = Tea(10.0, [1.0, 0.0])
    with DenoiserHook(LoopSpec(STEPS, ("main",)), [tea]).attach(high, low):
        _two_experts(high, low)
        assert accumulators[STEPS - 1] == {1} and tea._acc == {}  # the last call's; none after the generation
    assert tea.reused == 4 + 3  # steps 1-4 and 6-8; 0 and 5 computed (each expert's first), 9 (the last)
    fits = cal.fit_per_expert(degree=1)  # one polynomial per expert
    assert set(fits) == {0, 1} and fits[0] == cal.fit(degree=1, expert=0) != fits[1]
    per_expert = TeaCacheCallback(0.5, {0: [0.0, 0.0], 1: [1e6, 1e6]})  # expert 0 never accumulates, 1 always
    with DenoiserHook(LoopSpec(STEPS, ("main",)), [per_expert]).attach(high, low):
        _two_experts(high, low)
    assert per_expert.reused == 4  # steps 1-4 (expert 0); expert 1 computes every call


def test_the_wan22_proxy_keeps_one_token_and_not_the_whole_tensor():
    from taohooks.caches.teacache_wan22 import wan22_e_probe

    e0 = torch.randn(2, 10, 6, 4)  # Wan2.2: per token
    proxy = wan22_e_probe(None, (), {"e": e0})
    assert proxy.shape == (2, 6, 4) and torch.equal(proxy, e0[:, -1])
    assert proxy.untyped_storage().data_ptr() != e0.untyped_storage().data_ptr()  # a copy, not a view
    e1 = torch.randn(1, 6, 4)  # Wan2.1's shape: as it is
    assert wan22_e_probe(None, (), {"e": e1}) is e1


def test_pab_on_two_experts_never_broadcasts_across_them():
    """PAB range 2 over steps 0-9, the experts switching at step 5 (a broadcast step by the phase): the
    low-noise expert has nothing of its own cached there and computes; then it broadcasts its own."""
    high, low = TinyDiT(seed=0), TinyDiT(seed=1)
    cached = []

    class PAB(PyramidAttentionBroadcast):
        def on_before_call(self, hook, call, args, kwargs):
            cached.append({k[0] for k in self._cache})
            return super().on_before_call(hook, call, args, kwargs)

    pab = PAB([BroadcastGroup(r"blocks\.\d+\.attn", 2)], steps=(0, STEPS - 1))
    with DenoiserHook(LoopSpec(STEPS, ("main",)), [pab]).attach(high, low):
        _two_experts(high, low)
        assert cached[STEPS - 1] == {1}  # the high-noise expert's outputs were dropped at the switch
        assert pab._cache == {}  # and every output after the generation
    # high: steps 0, 2, 4 computed, 1 and 3 broadcast; low: 5 (nothing of its own yet), 6, 8 computed, 7, 9 broadcast
    assert [b.attn.calls for b in high.blocks] == [3] * 3 and [b.attn.calls for b in low.blocks] == [3] * 3
    assert pab.broadcasts == 2 * 2 * 3


def test_pab_finds_its_modules_inside_per_block_wrappers():
    """FSDP as Wan's --dit_fsdp applies it wraps each block: the attention is then
    ``blocks.N._fsdp_wrapped_module.attn``; PAB's patterns match the names the model's code uses."""
    from torch import nn

    class Wrapper(nn.Module):  # stands in for FullyShardedDataParallel (same attribute name)
        def __init__(self, inner):
            super().__init__()
            self._fsdp_wrapped_module = inner

        def forward(self, *args, **kwargs):
            return self._fsdp_wrapped_module(*args, **kwargs)

    model = TinyDiT()
    ref = run(model, STEPS)
    model.blocks = torch.nn.ModuleList(Wrapper(b) for b in model.blocks)
    assert "blocks.0._fsdp_wrapped_module.attn" in dict(model.named_modules())
    pab = PyramidAttentionBroadcast([BroadcastGroup(r"blocks\.\d+\.attn", 2)], steps=(0, STEPS - 1))
    with attach(model, [pab]):
        out = run(model, STEPS)
    assert pab.broadcasts == 3 * (STEPS // 2)  # every other step, in each of the 3 blocks
    assert torch.equal(out[0][0], ref[0][0]) and not torch.equal(out[-1][0], ref[-1][0])


def test_a_per_expert_fit_with_too_few_pairs_pools_them(capsys):
    cal = TeaCacheCalibrator()
    cal.pairs = [(0.1 * i, 0.2 * i) for i in range(1, 9)]
    cal.pair_experts = [0] * 6 + [1] * 2
    assert set(cal.fit_per_expert(degree=1)) == {0, 1}  # 6 and 2 pairs: enough for a line each
    assert cal.fit_per_expert(degree=2) == cal.fit(degree=2)  # 2 pairs cannot fit a parabola: pooled
    assert "expert(s) 1 recorded 2 pairs or fewer; one polynomial is fitted on all" in capsys.readouterr().err


def test_pab_timestep_window_keeps_its_phase_when_taocache_skips_its_first_steps():
    """A ``timesteps`` window's phase starts at its first step, whether that call ran or TaoCache answered it
    (the anchor was the first *computed* step: a window opening in TaoCache's window shifted the pattern)."""
    def pattern(window):
        plan = {"window": window, "ratio": 1.0} if window else {}
        cache = TaoCache(config_from_dict({"loop": {"steps": 20, "streams": ["main"]}, "plan": plan}))
        pab = PyramidAttentionBroadcast([BroadcastGroup(r"blocks\.\d+\.attn", 3)], timesteps=(0, 420))
        model, seen = TinyDiT(), {}
        run_before = pab.on_before_call

        def spy(hook, call, args, kwargs):
            out = run_before(hook, call, args, kwargs)
            seen[call.step] = pab.broadcasts
            return out
        pab.on_before_call = spy
        with cache.attach(model, steps=20, streams=("main",), callbacks=[pab]):
            run(model, 20)
        return {s: seen[s + 1] - seen[s] for s in (16, 17, 18)}  # broadcasts during step s
    alone, skipped = pattern(None), pattern([12, 15])
    assert alone == {16: 3, 17: 3, 18: 0}  # computes at 12, 15, 18 (range 3 from step 12), broadcasts between
    # the same phase; step 16 computes: TaoCache answered the window's steps before it, and nothing from before the
    # window is kept (it broadcast step 11's outputs there, 5 steps old, until 2026-11-28)
    assert skipped == {16: 0, 17: 3, 18: 0}


# ---------------------------------------------------------------- tensors kept between generations
_KEPT_ON_PURPOSE = {"mag_ratios", "moments", "hook"}  # (inputs and calibration results, not a generation's state)


def _held_tensors(obj, seen=None) -> list:
    """The tensors ``obj`` (a callback) reaches through its attributes, dicts, lists and the plain objects of
    taohooks' caches (accumulators, budgets), not through modules."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, torch.nn.Module):
        return []
    seen.add(id(obj))
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        return [t for k, v in obj.items() for t in _held_tensors(k, seen) + _held_tensors(v, seen)]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [t for v in obj for t in _held_tensors(v, seen)]
    if type(obj).__module__.startswith("taohooks.") and hasattr(obj, "__dict__"):
        return [t for k, v in vars(obj).items() if k not in _KEPT_ON_PURPOSE for t in _held_tensors(v, seen)]
    return []


def _every_cache():
    return [TeaCacheCallback(0.5, [1.0, 0.0]), TeaCacheCalibrator(), MagCacheCallback(torch.full((1, STEPS), 0.98)),
            MagCacheCalibrator(), ResidualSkipCallback([4, 6]),
            PyramidAttentionBroadcast([BroadcastGroup(r"blocks\.\d+\.attn", 2)], steps=(2, 7)),
            EasyCacheCallback(0.5, warmup_steps=2)]


@pytest.mark.parametrize("index", range(7))
def test_no_cache_keeps_a_generation_s_tensors_after_it_ends_fails_or_detaches(index):
    """TeaCache, MagCache, the residual skip, PAB and EasyCache kept their residuals, proxies and attention outputs
    after a generation's last call, on the device while an offloading script moves the model off it and decodes
    (TaoCache drops its own); after an exception (an OOM) and detach they kept the stack input and proxies too
    (memory walkthrough, 2026-11-28: Wan 14B sizes make that gigabytes)."""
    cb = _every_cache()[index]
    model = TinyDiT()
    with attach(model, [cb]) as hook:
        run(model, STEPS)
        assert hook.attached and _held_tensors(cb) == []  # attached, between generations
    cb = _every_cache()[index]
    calls = {"n": 0}
    inner = model.blocks[1].forward

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # (the second computed call: a residual is kept, and the stack input)
            raise MemoryError("out of memory (a stand-in)")
        return inner(*args, **kwargs)

    model.blocks[1].forward = failing
    with pytest.raises(MemoryError):
        with attach(model, [cb]):
            run(model, STEPS)
    assert _held_tensors(cb) == []


@pytest.mark.parametrize("window", [{"steps": (2, 5)}, {"timesteps": (250.0, 750.0)}])
def test_pab_keeps_attention_outputs_only_inside_its_window(window):
    """PAB copied every attention output of every computed call, before and after its window too, and kept the
    window's last ones to the generation's end (review, 2026-11-28): a step window's outputs went at its last step,
    a timestep window's never. Kept only where a later step of the window can broadcast them."""
    held = []

    class PAB(PyramidAttentionBroadcast):
        def on_before_call(self, hook, call, args, kwargs):
            held.append(len(self._cache))
            return super().on_before_call(hook, call, args, kwargs)

    model = TinyDiT(depth=2)
    pab = PAB([BroadcastGroup(r"blocks\.\d+\.attn", 2)], **window)
    with attach(model, [pab]):
        run(model, STEPS)  # timesteps 1000, 900, ..., 100: (250, 750) holds steps 3-7
    # (a timestep window is known to be over at the first call past it: its outputs go one step later)
    first, last = window.get("steps", (3, 8))
    assert held == [2 if first < s <= last else 0 for s in range(STEPS)]
