"""The VideoSys integration on a miniature of VideoSys' PAB contract (CPU, no VideoSys needed).

``tests/fixtures/videosys_like`` is a fake ``videosys`` package at VideoSys' module paths: Latte (DDIM)
and Open-Sora-Plan v110 (``PNDMScheduler()``, N + 9 calls) pipelines with VideoSys' ``generate`` loop,
a global ``PAB_MANAGER`` with VideoSys' decision rules (attention counters, timestep-keyed MLP
broadcast that raises on a missing entry) and blocks that keep VideoSys' per-block state. The real
VideoSys is exercised by the opt-in ``tests/official/test_videosys.py``.
"""
import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")  # the fake pipelines use diffusers' DDIM / PNDM schedulers, as VideoSys does

from taohooks.launcher import imports  # noqa: E402
from taohooks.config import config_from_dict  # noqa: E402
from taohooks.runtime.hook import get_hook  # noqa: E402
from taohooks.launcher.integration import IntegrationError  # noqa: E402
from taohooks.integrations import videosys as integration  # noqa: E402
from taohooks.runtime.reset import StateReset  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "videosys_like"
PROMPT = "a red panda eating bamboo"

# name: (pipeline class, config class, PAB config class, steps, calls, late window, first step after it)
# Latte: DDIM, 50 steps -> timesteps 980, 960, ..., 0; PAB acts on 100 < t < 800 (steps 10..43); MLP keys
# 720..400 are steps 13, 17, 21, 25, 29 (each reused on the 2 steps after it). Window 37-38 = t 240, 220.
# Open-Sora-Plan v110: PNDM, 20 steps -> 29 calls (PRK warm-up): 950, 925, 925, ..., 800, 750, ..., 0; PAB acts
# on 100 < t < 850; v110's MLP key 450 (call 19) is reused at 400, 350. Window 23-24 = t 250, 200.
MODELS = {
    "latte": ("LattePipeline", "LatteConfig", "LattePABConfig", 50, 50, (37, 38), 39),
    "open_sora_plan": ("OpenSoraPlanPipeline", "OpenSoraPlanConfig", "OpenSoraPlanV110PABConfig", 20, 29,
                       (23, 24), 25),
}
ATTENTION_COUNTERS = ("spatial_count", "cross_count", "count")


def _forget_fake_videosys():
    for name in [n for n in sys.modules if n == "videosys" or n.startswith("videosys.")]:
        del sys.modules[name]
    with imports._lock:  # post-import hooks install() left for modules never imported
        for name in [n for n in imports._pending if n == "videosys" or n.startswith("videosys.")]:
            del imports._pending[name]


@pytest.fixture
def clean(monkeypatch):
    """No fake videosys imported, integration uninstalled, one torch thread (tiny ops; 2 loaded cores)."""
    integration.uninstall()
    _forget_fake_videosys()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield monkeypatch
    integration.uninstall()
    _forget_fake_videosys()
    torch.set_num_threads(threads)


@pytest.fixture
def fake(clean):
    """The fake ``videosys`` importable (not yet imported)."""
    clean.syspath_prepend(str(FIXTURE))
    return clean


def videosys():
    return importlib.import_module("videosys")


def config(**plan):
    return config_from_dict({"integration": "videosys", "plan": plan}, "videosys.yaml")


def make_pipe(model="latte", **pab):
    pipeline, cfg, pab_cfg, *_ = MODELS[model]
    vs = videosys()
    torch.manual_seed(0)  # same weights for every pipeline of a test
    return getattr(vs, pipeline)(getattr(vs, cfg)(enable_pab=True, pab_config=getattr(vs, pab_cfg)(**pab)))


def generate(pipe, model="latte"):
    steps = MODELS[model][3]
    return pipe.generate(PROMPT, seed=0, num_inference_steps=steps, output_type="latents").video


def pab_counters(transformer, names=integration.COUNTERS):
    return {f"{n}.{a}": getattr(m, a) for n, m in transformer.named_modules() for a in names
            if isinstance(getattr(m, a, None), int)}


def resets(pipe):
    return next(cb for cb in get_hook(pipe.transformer).callbacks if isinstance(cb, StateReset)).resets


# ---------------------------------------------------------------------------------------------- (a)
@pytest.mark.parametrize("model", sorted(MODELS))
def test_budget_zero_is_the_plain_pipeline(fake, model, capfd):
    pipe = make_pipe(model)
    cls = type(pipe)
    plain = generate(pipe, model)
    left = set(pab_counters(pipe.transformer, ATTENTION_COUNTERS).values())
    again = generate(pipe, model)
    if model == "open_sora_plan":  # upstream quirk: N + 9 calls, steps = N -> counters end at 9, out of phase
        assert left == {9} and not torch.equal(again, plain)
    else:
        assert left == {0} and torch.equal(again, plain)
    integration.install(config(budget=0))  # videosys already imported: patched at once
    assert cls.generate._taohooks_patch is not None
    calls = MODELS[model][4]
    for _ in range(2):  # every TaoCache generation starts from VideoSys' fresh-model PAB state
        assert torch.equal(generate(pipe, model), plain)
        assert f"0 of {calls} denoiser calls saved" in capfd.readouterr().err
    integration.uninstall()
    assert not hasattr(cls.generate, "_taohooks_patch") and get_hook(pipe.transformer) is None


# ---------------------------------------------------------------------------------------------- (b)
@pytest.mark.parametrize("model", sorted(MODELS))
def test_late_window_saves_calls_and_keeps_pab_in_phase(fake, model, capfd):
    *_, steps, calls, window, resume = MODELS[model]
    integration.install(config(window=list(window), ratio=1.0))  # before the import: post-import hook
    pipe = make_pipe(model)
    assert type(pipe).generate._taohooks_patch is not None
    first = generate(pipe, model)
    assert f"2 of {calls} denoiser calls saved" in capfd.readouterr().err
    assert torch.isfinite(first).all()
    assert resets(pipe) == 2  # generation start + the first step after the window
    # reset at the resume step: the counters have counted the calls since then only
    assert set(pab_counters(pipe.transformer, ATTENTION_COUNTERS).values()) == {(calls - resume) % steps}
    second = generate(pipe, model)
    assert f"2 of {calls} denoiser calls saved" in capfd.readouterr().err
    assert torch.equal(second, first)
    assert torch.equal(generate(make_pipe(model), model), first)  # = a fresh model's generation
    integration.uninstall()
    plain = generate(make_pipe(model), model)
    assert not torch.equal(first, plain) and float((first - plain).norm() / plain.norm()) < 0.5


@pytest.mark.parametrize("model", sorted(MODELS))
def test_without_the_reset_pab_goes_out_of_phase(fake, model):
    *_, steps, calls, window, _ = MODELS[model]
    integration.install(config(window=list(window), ratio=1.0))
    with_reset = make_pipe(model)
    a1 = generate(with_reset, model)
    # the reset is looked up when it runs (a lambda in _callbacks): this also reaches the hook above
    fake.setattr(integration, "reset_pab_state", lambda transformer: None)
    no_reset = make_pipe(model)
    b1 = generate(no_reset, model)
    assert resets(no_reset) == 2  # the callback still ran, the reset did nothing
    # within the generation: the step after the window broadcasts attention kept from before it
    assert not torch.equal(b1, a1)
    # after it: the skipped calls never advanced the counters (a plain generation leaves them in phase)
    assert set(pab_counters(no_reset.transformer, ATTENTION_COUNTERS).values()) == {(calls - 2) % steps}
    b2 = generate(no_reset, model)
    assert not torch.equal(b2, b1)  # the next generation starts out of phase
    # the first hook lost its reset too: its counters stay where the last generation left them
    assert not torch.equal(generate(with_reset, model), a1)


# ---------------------------------------------------------------------------------------------- (c)
@pytest.mark.parametrize("layout,module", [("head", "videosys.core.pab.pab_mgr"),
                                           ("v2.0.1", "videosys.core.pab_mgr")])
@pytest.mark.parametrize("window,hit", [((29, 30), 400), ((31, 32), 360)])  # the key 400; inside its reuse range
def test_a_window_over_an_mlp_broadcast_timestep_is_refused(fake, layout, module, window, hit, capfd):
    fake.setenv("VIDEOSYS_LIKE_PAB_LAYOUT", layout)
    integration.install(config(window=list(window), ratio=1.0))
    pipe = make_pipe()
    assert integration.pab_manager() is sys.modules[module].PAB_MANAGER is not None
    with pytest.raises(IntegrationError, match=rf"\(timestep {hit}\), where VideoSys' MLP broadcast .*key timestep "
                                               r"400, covering steps 29-31") as info:
        generate(pipe)
    assert "mlp_broadcast = False" in str(info.value)
    ok = make_pipe(mlp_broadcast=False)  # MLP broadcast off: the same window runs
    out = generate(ok)
    assert "2 of 50 denoiser calls saved" in capfd.readouterr().err and torch.isfinite(out).all()
    assert torch.equal(generate(ok), out)


def test_without_the_guard_videosys_fails_on_the_missing_mlp_output(fake):
    fake.setattr(integration.MLPBroadcastGuard, "on_attach", lambda self, hook: None)
    integration.install(config(window=[29, 30], ratio=1.0))
    with pytest.raises(ValueError, match="No stored MLP output found"):
        generate(make_pipe())


def test_windows_clear_of_mlp_broadcast_are_accepted(fake, capfd):
    integration.install(config(window=[33, 35], ratio=1.0))  # t 320..280: after the reuse range of key 400
    generate(make_pipe())
    assert "3 of 50 denoiser calls saved" in capfd.readouterr().err


def test_a_refused_plan_leaves_the_transformer_untouched(fake):
    integration.install(config(window=[29, 30], ratio=1.0))
    pipe = make_pipe()
    with pytest.raises(IntegrationError):
        generate(pipe)
    pipe._config.pab_config.mlp_broadcast = False  # the PAB_MANAGER's config: fix the setup and retry
    try:
        generate(pipe)
    finally:
        integration.uninstall()
    assert get_hook(pipe.transformer) is None and "forward" not in vars(pipe.transformer)


# ---------------------------------------------------------------------------------------------- (d)
def test_a_pab_section_is_refused_at_install(fake):
    """Refused with the config (taocache check called it valid; the run refused it: VideoSys walkthrough)."""
    import dataclasses

    from taohooks.config import ConfigError, PABConfig

    section = {"groups": [{"pattern": "attn1", "range": 2}], "timesteps": [100, 800]}
    with pytest.raises(ConfigError, match=r"videosys_pab\.yaml: pab: VideoSys pipelines have their own PAB"):
        config_from_dict({"integration": "videosys", "plan": {"budget": 0}, "pab": section}, "videosys_pab.yaml")
    cfg = dataclasses.replace(config(budget=0), pab=PABConfig(), source="videosys_pab.yaml")  # (built around it)
    with pytest.raises(IntegrationError, match=r"videosys_pab\.yaml: pab: VideoSys pipelines have their own PAB"):
        integration.install(cfg)
    assert not integration._patches.installed and not any(n.startswith("videosys") for n in imports._pending)
    integration.install(config(budget=0))
    assert integration._patches.installed


def test_a_budget_plan_leaves_the_mlp_broadcast_steps_computed(fake, capfd):
    """The shipped config's budget plan (window 30-37) hit MLP-broadcast steps and was refused once the LUT was
    calibrated (VideoSys walkthrough, 2026-11-27): the integration hands those steps to the planner."""
    from test_calibration import calibrate
    from trajectories import GeometricDenoiser

    from taohooks import TaoCache
    from taohooks.taocache.plan import PlanError

    integration.install(config(budget=0))
    pipe = make_pipe()
    loop, kwargs = integration._loop({"self": pipe, "num_inference_steps": 50, "guidance_scale": 7.5})
    mlp = tuple(s for key in (13, 17, 21, 25, 29) for s in (key, key + 1, key + 2))  # keys 720..400, 2 reuses each
    assert kwargs["unskippable"] == mlp
    assert integration._loop({"self": make_pipe(mlp_broadcast=False), "num_inference_steps": 50,
                              "guidance_scale": 7.5})[1].get("unskippable") is None
    lut = calibrate(GeometricDenoiser({"main": 0.9}), 50, ("main",))
    lut.cos.total[:, 33:] *= 0.5  # the late steps' deltas less aligned: the max-cos window lands on 25-32
    free = TaoCache(config_from_dict({"plan": {"budget": 8}}), lut=lut)
    with free.attach(torch.nn.Identity(), 50, ("main",)):
        assert free.plan.window == (25, 32)  # what the plan is without them
    steered = TaoCache(config_from_dict({"plan": {"budget": 8}}), lut=lut)
    with steered.attach(torch.nn.Identity(), 50, ("main",), unskippable=mlp):
        assert len(steered.plan.skipped_steps) == 8 and not set(steered.plan.skipped_steps) & set(mlp)
    with pytest.raises(PlanError, match=r"steps 13, 14, 15, .*31 always computed"):  # (said, rule auto too: review)
        TaoCache(config_from_dict({"plan": {"budget": 20, "rule": "auto"}}), lut=lut).attach(
            torch.nn.Identity(), 50, ("main",), unskippable=mlp)
    explicit = TaoCache(config_from_dict({"plan": {"window": [29, 30], "ratio": 1.0}}), lut=lut)
    with explicit.attach(torch.nn.Identity(), 50, ("main",), unskippable=mlp):  # (the guard refuses it, saying why)
        assert explicit.plan.skipped_steps == (29, 30)


def test_install_without_videosys_names_the_missing_module(clean):
    if importlib.util.find_spec("videosys") is not None:
        pytest.skip("a videosys package is installed")
    with pytest.raises(IntegrationError, match="cannot find the module 'videosys'"):
        integration.install(config(budget=0))


# ---------------------------------------------------------------------------------------------- state
@pytest.mark.parametrize("model", sorted(MODELS))
def test_reset_pab_state_clears_counters_caches_and_mlp_outputs(fake, model):
    pipe = make_pipe(model)
    names = {"latte": {"mlp_count"}, "open_sora_plan": {"temp_mlp_count", "spatila_mlp_count"}}[model]
    cached = 0
    for m in pipe.transformer.modules():
        for a in integration.COUNTERS:
            if hasattr(m, a):
                setattr(m, a, 5)
        for a in integration.CACHES:
            if hasattr(m, a):
                setattr(m, a, torch.ones(1))
                cached += 1
    assert cached == 3 * 2  # spatial_last, cross_last (spatial blocks), last_out (temporal), 2 layers
    assert names <= {k.split(".")[-1] for k in pab_counters(pipe.transformer)}
    manager = integration.pab_manager()
    manager.config.mlp_spatial_outputs[(400, 0)] = manager.config.mlp_temporal_outputs[(400, 1)] = torch.ones(1)
    integration.reset_pab_state(pipe.transformer)
    assert set(pab_counters(pipe.transformer).values()) == {0}
    assert all(getattr(m, a) is None for m in pipe.transformer.modules() for a in integration.CACHES if hasattr(m, a))
    assert manager.config.mlp_spatial_outputs == {} and manager.config.mlp_temporal_outputs == {}
    assert [b.block_idx for b in pipe.transformer.transformer_blocks] == [0, 1]  # not a counter


def test_reinstall_before_the_import_uses_the_new_config(fake, capfd):
    integration.install(config(window=[44, 45], ratio=1.0))
    integration.uninstall()
    integration.install(config(budget=0))
    generate(make_pipe())
    assert "0 of 50 denoiser calls saved" in capfd.readouterr().err


def test_uninstall_leaves_plain_videosys_in_phase(fake):
    plain = generate(make_pipe())
    integration.install(config(window=[37, 38], ratio=1.0))
    pipe = make_pipe()
    generate(pipe)
    integration.uninstall()
    assert torch.equal(generate(pipe), plain)
