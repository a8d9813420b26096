"""The pab: and teacache: config sections: validation, and what TaoCache builds from them."""
import re

import pytest
import torch

from taohooks import DenoiserHook, LoopSpec, TaoCache
from taohooks.config import ConfigError, config_from_dict
from taohooks.caches.pab import PyramidAttentionBroadcast
from taohooks.taocache.plan import plan_from_window
from taohooks.taocache.cache import section_callbacks
from taohooks.caches.teacache import TeaCacheCallback
from tinydit import TinyDiT, run

PAB = {"groups": [{"pattern": r"blocks\.\d+\.attn", "range": 2}], "steps": [1, 8]}


@pytest.mark.parametrize("section,message", [
    ({"pab": {"groups": []}}, "pab.groups: expected at least one"),
    ({"pab": {"groups": [{"pattern": "(", "range": 2}], "steps": [1, 2]}}, "pab.groups[0].pattern: not a valid regex"),
    ({"pab": {"groups": [{"pattern": "a", "range": 0}], "steps": [1, 2]}}, "pab.groups[0].range: expected a broadcast"),
    ({"pab": {"groups": [{"pattern": "a", "rnage": 2}], "steps": [1, 2]}}, "did you mean 'pab.groups[0].range'"),
    ({"pab": {"groups": [{"pattern": "a"}]}}, "give exactly one window"),
    ({"pab": {"groups": [{"pattern": "a"}], "steps": [5, 1]}}, "pab.steps: expected [low, high]"),
    ({"teacache": {"threshold": -1}}, "teacache.threshold: expected a threshold >= 0"),
    ({"teacache": {"coefficients": [1.0, 0.0]}}, "teacache.threshold: missing: the accumulated (rescaled) rel-L1"),
    ({"teacache": {}}, "teacache.threshold: missing"),
    ({"teacache": {"threshold": 0.1, "coefficients": []}}, "teacache.coefficients"),
    ({"teacache": {"threshold": 0.1, "guard_band": -1}}, "teacache.guard_band"),
    ({"teacache": {"threshold": 0.1, "published": "late"}}, "teacache.published: no published TeaCache for 'late'; "
                                                            "did you mean 'latte'?"),
    ({"teacache": {"threshold": 0.1, "published": "latte", "coefficients": [1, 0]}},
     "teacache.coefficients: give either published:"),
    ({"teacache": {"threshold": 0.1, "published": "latte", "use_ret_steps": True}},
     "teacache.use_ret_steps: the authors' use_ret_steps variant exists for Wan2.1 only"),
    ({"teacache": {"threshold": 0.1, "published": "latte", "blocks": "transformer_blocks"}},
     "teacache.blocks: the authors' TeaCache for latte sets its own block stack(s) and forced steps"),
    ({"integration": "wan", "teacache": {"threshold": 0.1, "published": "latte"}},
     "teacache.published: the authors' TeaCache for latte attaches to the latte / diffusers / "
     "videosys integration(s), not 'wan'"),
])
def test_section_errors_name_the_key(section, message):
    with pytest.raises(ConfigError) as exc:
        config_from_dict(section, "c.yaml")
    assert str(exc.value).startswith("c.yaml: ") and message in str(exc.value)


def test_sections_round_trip_through_to_dict():
    config = config_from_dict({"pab": PAB, "teacache": {"threshold": 0.1}}, "c.yaml")
    again = config_from_dict(config.to_dict(), "c.yaml")
    assert again.pab == config.pab and again.teacache == config.teacache
    assert config.to_dict()["pab"]["groups"] == [{"pattern": r"blocks\.\d+\.attn", "range": 2}]


def test_hybrid_tea_range_ends_a_guard_band_before_the_window():
    config = config_from_dict({"teacache": {"threshold": 0.1, "guard_band": 3}, "pab": PAB})
    plan = plan_from_window(20, ("main",), 14, 17, 1.0, refresh_every=2)
    tea, pab = section_callbacks(config, plan)
    assert isinstance(tea, TeaCacheCallback) and tea.max_step == 11 and tea.coefficients == [1.0, 0.0]
    assert isinstance(pab, PyramidAttentionBroadcast) and pab.steps == (1, 8)
    assert plan.refresh_steps == (16,) and pab.reset_steps == frozenset({16, 18})  # resume steps


@pytest.mark.parametrize("guard,said", [
    (14, "teacache.guard_band: 14 steps before TaoCache's window (its first skipped step is 14) leave TeaCache no "
         "step to reuse"),
    (13, "leave TeaCache no step to reuse (it computes every step from 1 on, and the first 1)"),
    (0, "teacache.guard_band: 0: TaoCache's first skip (step 14) extrapolates from steps 12 and 13, which TeaCache "
        "may then have reused"),
    (1, "the paper's guard band is 2-3 steps"),
    (2, None), (12, None)])
def test_a_guard_band_that_empties_teacache_or_feeds_the_window_is_said(guard, said, capsys):
    """Both ran without a word (compose walkthrough, 2026-11-27): a guard band reaching the window start gave
    TeaCache no step; one under 2 let TeaCache's reused outputs be what TaoCache's first skip extrapolates from
    (3.1 dB on the flow model)."""
    from taohooks.taocache.cache import hybrid_range_problems

    config = config_from_dict({"teacache": {"threshold": 0.1, "guard_band": guard}}, "c.yaml")
    plan = plan_from_window(20, ("main",), 14, 17, 1.0)
    problems = hybrid_range_problems(config, plan)
    assert problems == [] if said is None else (len(problems) == 1 and problems[0].startswith("c.yaml: ")
                                                 and said in problems[0])
    section_callbacks(config, plan)
    err = capsys.readouterr().err
    assert (said is None and err == "") or (said is not None and f"taohooks: warning: {problems[0]}" in err)


def test_the_python_name_of_a_teacache_key_points_to_the_yaml_one():
    with pytest.raises(ConfigError, match=r"teacache.max_step: unknown key; the YAML sets it from TaoCache's window: "
                                          r"teacache.guard_band"):
        config_from_dict({"teacache": {"threshold": 0.1, "max_step": 9}}, "c.yaml")


def test_a_pab_pattern_matching_nothing_is_refused_while_calibrating_too(tmp_path):
    """A calibrating run attaches no PAB, so a pattern naming no module passed every run until the LUT was complete
    (compose walkthrough, 2026-11-27); the error now names the file and the group."""
    from taohooks.caches.pab import PABPatternError

    config = config_from_dict({"lut": str(tmp_path / "l.safetensors"), "calibration": {"prompts": 2},
                               "pab": {"groups": [{"pattern": r"blocks\.\d+\.attn", "range": 2},
                                                  {"pattern": r"blocks\.\d+\.self_attn", "range": 2}],
                                       "steps": [1, 8]}}, "c.yaml")
    said = "PAB pattern %r (c.yaml: pab.groups[1].pattern) matches no module of TinyDiT (names look like " \
           "'blocks.0.attn'" % r"blocks\.\d+\.self_attn"
    with pytest.raises(PABPatternError, match=re.escape(said)):
        TaoCache(config).attach(TinyDiT(), 12)
    assert not (tmp_path / "l.safetensors").exists()


def test_a_zero_threshold_attaches_no_teacache():
    """threshold 0 is TeaCache off, said in the file (the section then only names the calibration fit's proxy)."""
    config = config_from_dict({"teacache": {"threshold": 0, "blocks": "layers"}})
    assert section_callbacks(config, plan_from_window(20, ("main",), 14, 17, 1.0)) == []


def test_a_teacache_section_built_in_python_without_a_threshold_is_an_error():
    """YAML's validation never sees a config built in Python: it ran no TeaCache, without a word."""
    import dataclasses

    from taohooks.config import TeaCacheConfig

    config = dataclasses.replace(config_from_dict({}), teacache=TeaCacheConfig())
    with pytest.raises(ConfigError, match="teacache.threshold: missing"):
        section_callbacks(config, plan_from_window(20, ("main",), 14, 17, 1.0))


def test_pab_and_hybrid_from_a_config_on_a_model():
    model = TinyDiT()
    full = run(model, 12)
    config = config_from_dict({"plan": {"window": [8, 9], "ratio": 1.0}, "pab": PAB,
                               "teacache": {"threshold": 0.2, "guard_band": 4}})  # TeaCache on steps 1-3
    cache = TaoCache(config)
    with cache.attach(model, 12):
        outs = run(model, 12)
    tea, pab = cache.hook.callbacks[1:]
    assert cache.hook.counts["main"] == [10, 2]
    assert pab.broadcasts > 0 and tea.reused > 0
    assert all(torch.isfinite(o[0]).all() for o in outs)
    assert not torch.equal(outs[-1][0], full[-1][0])
    assert "forward" not in vars(model.blocks[0]) and "forward" not in vars(model.blocks[0].attn)  # restored


def test_wan_refuses_the_hybrid_under_sequence_parallelism():
    import types

    from taohooks.launcher.integration import IntegrationError
    from taohooks.integrations.wan import _refuse_rank_local_decisions

    config = config_from_dict({"integration": "wan", "teacache": {"threshold": 0.1}}, "wan_hybrid.yaml")
    check = _refuse_rank_local_decisions(config)
    one, two = ({"self": types.SimpleNamespace(sp_size=n)} for n in (1, 2))
    assert check(one, None) == []  # one process, or data-parallel ranks with the whole model each: fine
    with pytest.raises(IntegrationError, match="wan_hybrid.yaml: teacache: .* ranks could take different"):
        check(two, None)
    assert _refuse_rank_local_decisions(config_from_dict({"integration": "wan"}))(two, None) == []
    published = config_from_dict({"integration": "wan", "teacache": {"threshold": 0.1,  # the timestep embedding:
                                                                     "published": "wan2.1-t2v-14B"}})  # same on all ranks
    assert _refuse_rank_local_decisions(published)(two, None) == []


@pytest.mark.parametrize("published,probe,coefficients", [
    ("latte", "adaln_single_probe", [-2.46434137e+03, 3.08044764e+02, 8.07447667e+01, -4.11385132e+00,
                                     1.11001402e-01]),
    ("wan2.1-t2v-1.3B", "block_e_probe", [-5.21862437e+04, 9.23041404e+03, -5.28275948e+02, 1.36987616e+01,
                                          -4.99875664e-02]),
])
def test_the_hybrid_runs_the_authors_teacache_from_yaml(published, probe, coefficients):
    """``teacache.published``: the authors' proxy, stacks, forced steps and published coefficients."""
    config = config_from_dict({"teacache": {"threshold": 0.1, "published": published,
                                            "use_ret_steps": published.startswith("wan")}})
    plan = plan_from_window(20, ("main",), 14, 17, 1.0)
    (tea,) = section_callbacks(config, plan)
    assert tea.coefficients == coefficients and tea.probe.__name__ == probe and tea.max_step == 12
    assert not tea.clamp_negative  # negative values add up, as in the authors' scripts
    if published == "latte":
        assert tea.blocks_paths == ("transformer_blocks", "temporal_transformer_blocks") and tea.exit_path == "norm_out"
        assert (tea.warmup_steps, tea.compute_last_step) == (1, True)
    else:
        assert (tea.warmup_steps, tea.compute_last_step) == (5, False)


def test_teacache_fitted_in_the_calibration_pass(tmp_path):
    """``calibration.teacache_fit``: the calibrating generations also record TeaCache's pairs into
    ``<lut>.teacache.json`` (merged over runs); ``teacache.calibrated`` runs the hybrid with that fit."""
    import numpy as np

    from taohooks.caches.teacache import TeaCacheCalibrator
    from taohooks.caches.teacache_fit import fit_path, load_pairs

    model = TinyDiT()
    lut = tmp_path / "luts" / "tiny.safetensors"
    data = {"model_id": "tiny", "lut": str(lut), "calibration": {"prompts": 4, "teacache_fit": True},
            "plan": {"window": [9, 10], "ratio": 1.0}, "teacache": {"threshold": 0.3, "calibrated": True}}
    direct = TeaCacheCalibrator()
    with DenoiserHook(LoopSpec(12), [direct]).attach(model) as hook:  # the same proxy, recorded directly
        for seed in range(2):
            hook.new_sample()
            run(model, 12, seed=seed)
    for seed in range(2):  # two runs, one generation of a batch of 2 each: the file adds them up
        cache = TaoCache(config_from_dict(data, str(tmp_path / "c.yaml")))
        with cache.attach(model, 12):
            run(model, 12, seed=seed)
        assert cache.calibrating
    saved = load_pairs(fit_path(lut))
    assert fit_path(lut).name == "tiny.teacache.json" and saved["generations"] == 2
    assert saved["pairs"] == [[a, b] for a, b in direct.pairs] and len(saved["pairs"]) == 2 * 2 * 11  # 2 samples
    cache = TaoCache(config_from_dict(data, str(tmp_path / "c.yaml")))
    with cache.attach(model, 12):
        run(model, 12)
    tea = cache.hook.callbacks[1]
    assert isinstance(tea, TeaCacheCallback) and tea.coefficients == direct.fit()
    assert np.allclose(tea.coefficients, np.polyfit(*np.array(direct.pairs).T, 4))
    assert tea.reused > 0 and cache.hook.counts["main"][1] == 2


def test_teacache_calibrated_is_checked_before_the_script_runs(tmp_path):
    """A run that would find no fit says so before the script starts: without teacache_fit (whatever the
    LUT), and with it when the LUT is complete (no calibration runs to fit)."""
    from taohooks.run import check_teacache_fit

    lut, model = tmp_path / "tiny.safetensors", TinyDiT()

    def config(fit: bool):
        return config_from_dict({"lut": str(lut), "calibration": {"prompts": 2, "teacache_fit": fit},
                                 "teacache": {"threshold": 0.3, "calibrated": True}}, str(tmp_path / "c.yaml"))

    with pytest.raises(ConfigError, match=r"c.yaml: teacache.calibrated: .*tiny.teacache.json does not exist; set "
                                          r"calibration.teacache_fit: true and calibrate"):
        check_teacache_fit(config(False))  # no LUT yet, and this run would not fit
    check_teacache_fit(config(True))  # no LUT yet: this run calibrates and fits first
    with TaoCache(config(False)).attach(model, 12):  # calibrates (a batch of 2 prompts) without fitting
        run(model, 12)
    with pytest.raises(ConfigError, match=r"tiny.safetensors is complete, so no calibration runs to fit it: delete "
                                          r"the LUT"):
        check_teacache_fit(config(True))
    with pytest.raises(ConfigError, match="teacache.calibrated: the fit is kept next to the LUT"):
        config_from_dict({"teacache": {"threshold": 0.3, "calibrated": True}}, "c.yaml")


def test_a_recalibrated_lut_starts_its_teacache_fit_again(tmp_path):
    """The LUT deleted and calibrated again (the answer to a mismatch): its fit is not added to the old one's
    pairs; a fit of another calibration of the LUT is refused at load."""
    import os

    from taohooks.caches.teacache_fit import fit_path, fitted_coefficients, load_pairs
    from taohooks.taocache.cache import _teacache_proxy
    from taohooks.taocache.lut import CalibrationLUT

    lut, model = tmp_path / "tiny.safetensors", TinyDiT()
    data = {"lut": str(lut), "calibration": {"prompts": 2, "teacache_fit": True},
            "teacache": {"threshold": 0.3, "calibrated": True}}
    for _ in range(2):
        if lut.exists():
            os.remove(lut)
        with TaoCache(config_from_dict(data, str(tmp_path / "c.yaml"))).attach(model, 12):
            run(model, 12)
        saved = load_pairs(fit_path(lut))
        assert saved["generations"] == 1 and len(saved["pairs"]) == 2 * 11  # not doubled the second time
        assert saved["lut_created"] == CalibrationLUT.load(lut).created
    config = config_from_dict(data, str(tmp_path / "c.yaml"))
    with pytest.raises(ValueError, match="was fitted while calibrating another LUT"):
        fitted_coefficients(fit_path(lut), _teacache_proxy(config), "2000-01-01T00:00:00+00:00")


def test_teacache_and_pab_composed_in_python_without_their_settings_are_said(capsys):
    """Given to attach(callbacks=) without max_step / reset_on_resume, TeaCache reused the two outputs TaoCache
    extrapolates from and PAB broadcast attention from before the window, without a word (compose walkthrough)."""
    from taohooks.caches.pab import BroadcastGroup

    config = config_from_dict({"plan": {"window": [8, 9], "ratio": 1.0}})

    def attach_with(*callbacks):
        cache = TaoCache(config)
        with cache.attach(TinyDiT(), 12, callbacks=iter(callbacks)) as hook:  # (any iterable)
            assert hook.callbacks[1:] == list(callbacks)
        return capsys.readouterr().err

    err = attach_with(TeaCacheCallback(0.3, [1.0, 0.0]),
                      PyramidAttentionBroadcast([BroadcastGroup(r"blocks\.\d+\.attn", 2)], steps=(1, 11)))
    assert ("attach(callbacks=...): TeaCacheCallback may reuse on every step but its warm-up and the last while "
            "TaoCache skips from step 8: pass max_step=6") in err
    assert ("PyramidAttentionBroadcast keeps attention from before TaoCache's skips at step(s) 10, where TaoCache "
            "resumes: pass reset_on_resume=True") in err
    assert "up to step 6 while" in attach_with(TeaCacheCallback(0.3, [1.0, 0.0], max_step=7))
    assert attach_with(TeaCacheCallback(0.3, [1.0, 0.0], max_step=6),
                       PyramidAttentionBroadcast([BroadcastGroup(r"blocks\.\d+\.attn", 2)], steps=(1, 11),
                                                 reset_on_resume=True)) == ""
