"""The evaluation machinery on a tiny random testbed DiT (fast; the real bench is `taocache bench`)."""
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from taohooks.evaluation import bench, methods  # noqa: E402
from taohooks.evaluation.testbed_model import TestbedModel  # noqa: E402
from taohooks.testbed import data  # noqa: E402
from taohooks.testbed.model import VideoDiT, VideoDiTConfig  # noqa: E402


def tiny(prediction="flow", steps=8):
    torch.manual_seed(0)
    cfg = VideoDiTConfig(dim=32, depth=2, num_heads=2, prediction=prediction,
                         out_channels=6 if prediction == "eps" else 3)
    model = VideoDiT(cfg).eval()
    for p in model.parameters():  # adaLN-Zero starts at zero: give the blocks something to do
        p.data.add_(0.02 * torch.randn_like(p))
    return TestbedModel(f"tiny-{prediction}", model, steps)


def test_match_threshold_finds_the_closest_fraction():
    fractions = lambda th: min(1.0, round(th * 10) / 10)  # noqa: E731  a monotone step function
    th, frac = methods.match_threshold(lambda th: th, fractions, target=0.3)
    assert frac == pytest.approx(0.3) and fractions(th) == pytest.approx(0.3)


def test_match_threshold_resolves_a_steep_rise_and_stops_on_an_exact_match():
    # a steep rise, as TeaCache's on the testbed `flow` model (6.6% at 0.0107, 36% at 0.0136): none below 0.0107
    def fraction(th):
        return 0.0 if th < 0.0107 else min(0.36, round((th - 0.0107) / 0.0029 * 0.36 * 50) / 50)
    calls = []

    def measure(th):
        calls.append(th)
        return fraction(th)
    th, frac = methods.match_threshold(lambda th: th, measure, target=0.16, iterations=12)
    assert frac == pytest.approx(0.16) and 0.0107 < th < 0.0136
    assert len(calls) < 13  # stopped at the exact match
    _, coarse = methods.match_threshold(lambda th: th, fraction, target=0.16, iterations=8)
    assert coarse != pytest.approx(0.16)  # what 8 bisection steps found


@pytest.mark.parametrize("prediction", ["flow", "eps"])
def test_every_method_runs_and_meets_its_budget(prediction):
    tm = tiny(prediction)
    pairs = data.calibration_pairs(4)
    cal = methods.calibrate(tm, pairs, batch_size=4)
    assert cal.lut.num_prompts == 4 and len(cal.tea_coefficients) == 5
    assert cal.mag_ratios.shape == (tm.loop().calls_per_step, tm.steps)
    settings = methods.MethodSettings(search_iterations=3, pab_timesteps=(0.0, 2000.0))
    reference = methods.run_with(tm, [], pairs[:2], 2)
    assert reference.skipped == 0 and reference.calls == tm.loop().total_calls
    for name in methods.METHODS:
        built = methods.build_method(name, tm, cal, 2, pairs[:2], 2, settings)
        run = methods.run_with(tm, built.callbacks, pairs[:2], 2)
        assert run.clips.shape == reference.clips.shape and torch.isfinite(run.clips).all()
        if name in ("taocache", "taoskip+tearesidual", "pab+taocache"):
            assert run.skipped_fraction == pytest.approx(2 / tm.steps), name
        assert "forward" not in tm.model.__dict__ and "forward" not in tm.model.blocks[0].__dict__


def test_threshold_searches_at_later_budgets_reuse_the_measured_thresholds(monkeypatch):
    """Each budget's TeaCache/MagCache/EasyCache search measured the same thresholds on the same search pairs again;
    with the bench's shared record the later ones reuse them and end at the same thresholds (planner/compare
    walkthrough, 2026-11-27)."""
    tm = tiny("flow")
    pairs = data.calibration_pairs(4)
    cal = methods.calibrate(tm, pairs, batch_size=4)
    settings = methods.MethodSettings(search_iterations=3)
    runs = {"n": 0}
    original = methods.run_with

    def counted(*args, **kwargs):
        runs["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(methods, "run_with", counted)
    for name in ("teacache", "easycache"):  # (MagCache's search is the same code)
        alone = [methods.build_method(name, tm, cal, skips, pairs[:2], 2, settings).info["threshold"]
                 for skips in (2, 3)]
        runs["n"], measured = 0, {}
        shared = [methods.build_method(name, tm, cal, skips, pairs[:2], 2, settings, measured).info["threshold"]
                  for skips in (2, 3)]
        first = len(measured)
        assert shared == alone and runs["n"] == len(measured) and first > 0, name
    hybrid = methods.build_method("hybrid", tm, cal, 3, pairs[:2], 2, settings, measured)  # budget-dependent: apart
    assert all(key[0] != "hybrid" for key in measured) and hybrid.info["tao_skips"] == 1


def test_markdown_and_json_reports(tmp_path):
    records = [
        {"model": "flow", "method": "full", "budget": 0.0, "skipped_fraction": 0.0, "speedup": 1.0, "psnr": None,
         "ssim": None, "lpips": None, "prompt_accuracy": 0.95, "seconds": 10.0},
        {"model": "flow", "method": "taocache", "budget": 0.16, "skipped_fraction": 0.16, "speedup": 1.18,
         "psnr": 35.0, "ssim": 0.99, "lpips": None, "prompt_accuracy": 0.95, "seconds": 8.5},
    ]
    text = bench.markdown_tables(records)
    assert "| 16% | taocache | 1.180x | 16.0% | n/a | 0.9900 | 35.00 | 0.950 |" in text and "†" not in text
    # a speedup skipping 16% cannot give (a loaded machine) is marked, as compare marks it (fresh-machine check,
    # 2026-11-28: the demo printed 3.199x for TeaCache at 16.5% without a word)
    noisy = bench.markdown_tables([*records, {**records[1], "method": "teacache", "speedup": 3.199}])
    assert "| 16% | teacache | 3.199x† | 16.0% |" in noisy and "| 16% | taocache | 1.180x | 16.0% |" in noisy
    assert "† more than 5% faster than skipping that share of the calls allows (1 / (1 - skipped)): timing noise " \
           "(teacache at 16%; " in noisy
    bench.write_results(records, tmp_path, bench.BenchConfig(), 1.0, run_id="first")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["records"] == records and (tmp_path / "results.md").exists()
    # an update keeps the first run's meta and lists itself under it
    bench.write_results(records, tmp_path, bench.BenchConfig(methods=["taocache"]), 2.0, update=True, run_id="u")
    updated = bench.load_results(tmp_path / "results.json")["meta"]
    assert updated["config"]["methods"] == list(methods.METHODS) and updated["wall_seconds"] == 1.0
    assert [u["config"]["methods"] for u in updated["updates"]] == [["taocache"]]
    (tmp_path / "results.json").write_text("[]")
    with pytest.raises(ValueError, match="not a taocache bench results file"):
        bench.load_results(tmp_path / "results.json")


def _record(budget, method="taocache", model="flow"):
    return {"model": model, "method": method, "budget": budget, "skipped_fraction": budget, "speedup": 1.1,
            "psnr": 40.0, "ssim": 0.9, "lpips": None, "prompt_accuracy": 0.9, "seconds": 1.0}


def test_two_updates_of_one_folder_keep_both_runs_records(tmp_path):
    """Two `bench --update` runs side by side: each read the file when it started, and the later write lost the
    earlier one's records (review, 2026-11-27). The file is read again under its lock before each write."""
    config = bench.BenchConfig()
    bench.write_results([_record(0.0, "full"), _record(0.2)], tmp_path, config, 1.0, run_id="first")
    started = bench.load_results(tmp_path / "results.json")  # both updates start from this
    bench.write_results([_record(0.3)], tmp_path, config, 1.0, update=True, run_id="a")
    bench.write_results([_record(0.4)], tmp_path, config, 1.0, update=True, run_id="b")
    saved = bench.load_results(tmp_path / "results.json")
    assert [r["budget"] for r in saved["records"]] == [0.0, 0.2, 0.3, 0.4] and len(started["records"]) == 2
    assert [u["run"] for u in saved["meta"]["updates"]] == ["a", "b"]
    # a run's second write (its next model) replaces its own entry
    bench.write_results([_record(0.3), _record(0.0, "full", "eps"), _record(0.3, model="eps")], tmp_path, config, 1.0,
                        update=True, run_id="a")
    saved = bench.load_results(tmp_path / "results.json")
    assert [u["run"] for u in saved["meta"]["updates"]] == ["b", "a"] and len(saved["records"]) == 6
    # a first run does not replace results another run wrote meanwhile
    with pytest.raises(ValueError, match="written by another run while this one ran"):
        bench.write_results([_record(0.5)], tmp_path, config, 1.0, run_id="late")


def test_an_update_with_other_settings_is_refused(tmp_path):
    bench.write_results([_record(0.0, "full")], tmp_path, bench.BenchConfig(steps=10), 1.0, run_id="first")
    with pytest.raises(ValueError, match="made with steps: 10, this run has steps: 20"):
        bench.write_results([_record(0.3)], tmp_path, bench.BenchConfig(steps=20), 1.0, update=True, run_id="u")
    with pytest.raises(ValueError, match=r"'flow' records were made with weights bundled, this run has w\.safetensors"):
        bench.BenchConfig(steps=10, weights={"flow": "w.safetensors"}).check_compatible(
            bench.load_results(tmp_path / "results.json")["meta"], "results.json")


def test_bad_results_files_are_named_before_any_work(tmp_path):
    path = tmp_path / "results.json"
    path.write_text('{"meta": {}, "records": [')
    with pytest.raises(ValueError, match="results.json: not a readable JSON file"):
        bench.load_results(path)
    path.write_text('{"meta": {}, "records": [{"model": "flow"}]}')
    with pytest.raises(ValueError, match=r"records\[0\] is not a bench record"):
        bench.load_results(path)


@pytest.mark.parametrize("name", ["bench.yaml", "bench_small.yaml"])
def test_shipped_bench_configs_load(name):
    from pathlib import Path
    config = bench.load_bench_config(Path(__file__).resolve().parent.parent / "configs" / name)
    assert "flow" in config.models and len(config.methods) == 6


def test_a_thin_hybrid_guard_is_warned_not_refused(tmp_path, capsys):
    """hybrid_guard under 2 let TaoCache extrapolate from TeaCache's reused outputs without a word."""
    path = tmp_path / "b.yaml"
    path.write_text("methods: [taocache, hybrid]\nhybrid_guard: 1\n")
    assert bench.load_bench_config(path).hybrid_guard == 1
    assert f"{path}: hybrid_guard: 1: the hybrid's TeaCache may reuse the outputs" in capsys.readouterr().err
    path.write_text("methods: [taocache, teacache]\nhybrid_guard: 1\n")  # no hybrid row: nothing to say
    bench.load_bench_config(path)
    path.write_text("methods: [taocache, hybrid]\nhybrid_guard: 2\n")
    bench.load_bench_config(path)
    assert "hybrid_guard" not in capsys.readouterr().err


def test_bench_config_errors(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text("models: [flw]\n")
    with pytest.raises(ValueError, match="unknown testbed model 'flw'"):
        bench.load_bench_config(path)
    path.write_text("budgets: [16]\n")
    with pytest.raises(ValueError, match=r"fractions of the steps in \(0, 1\)"):
        bench.load_bench_config(path)
    path.write_text("method: [taocache]\n")
    with pytest.raises(ValueError, match="did you mean 'methods'"):
        bench.load_bench_config(path)


def test_bench_pab_is_reset_on_every_step_that_resumes_after_a_skip(monkeypatch):
    """PAB must not broadcast attention computed before a skipped stretch: it resets on
    ``SkipPlan.resume_steps`` (refreshes and the first step after the window), as the YAML path does."""
    from taohooks.config import PlanConfig
    from taohooks.caches.pab import PyramidAttentionBroadcast

    real_make_plan = methods.make_plan
    # the window the search would pick on a real model ends before the last step
    monkeypatch.setattr(methods, "make_plan", lambda config, *a: real_make_plan(PlanConfig(window=[6, 8]), *a))
    tm = tiny("flow", steps=12)
    pairs = data.calibration_pairs(3)
    cal = methods.calibrate(tm, pairs, batch_size=3)
    settings = methods.MethodSettings(search_iterations=2, pab_timesteps=(0.0, 2000.0))
    tao, pab = methods.build_method("pab+taocache", tm, cal, 3, pairs[:1], 1, settings).callbacks
    assert isinstance(pab, PyramidAttentionBroadcast) and tao.plan.window == (6, 8)
    assert pab.reset_steps == {9}

    # behaviour: at step 9 every attention module is recomputed, not broadcast from step 5
    calls_at = {}
    run_before = pab.on_before_call

    def spy(hook, call, args, kwargs):
        out = run_before(hook, call, args, kwargs)
        calls_at.setdefault(call.step, pab.broadcasts)  # broadcasts before the step's first call
        return out
    monkeypatch.setattr(pab, "on_before_call", spy)
    reference = methods.run_with(tm, [tao, pab], pairs[:1], 1)
    assert reference.skipped == 3 * 2  # 3 steps x (cond, uncond)
    assert calls_at[10] - calls_at[9] == 0  # step 9 recomputed every attention (a broadcast step otherwise)
    assert pab.broadcasts - calls_at[11] > 0  # step 11 broadcasts again (range 2 from the anchor)


def test_merge_records_replaces_what_a_run_makes_again():
    rec = lambda model, method, budget, psnr: {"model": model, "method": method, "budget": budget,  # noqa: E731
                                                "psnr": psnr}
    kept = [rec("flow", "full", 0.0, None), rec("flow", "taocache", 0.16, 30.0), rec("flow", "pab+taocache", 0.16, 20.0),
            rec("eps", "pab+taocache", 0.16, 21.0)]
    new = [rec("flow", "full", 0.0, None), rec("flow", "pab+taocache", 0.16, 25.0)]
    merged = bench.merge_records(kept, new)
    assert [(r["model"], r["method"], r.get("psnr")) for r in merged] == [
        ("flow", "full", None), ("flow", "taocache", 30.0), ("flow", "pab+taocache", 25.0), ("eps", "pab+taocache", 21.0)]
    assert bench.merge_records(kept, [rec("eps", "hybrid", 0.16, 1.0)])[-1]["method"] == "hybrid"


def test_bench_update_needs_an_earlier_results_file(tmp_path, capsys):
    from pathlib import Path

    from taohooks.cli import main
    config = Path(__file__).resolve().parent.parent / "configs" / "bench_small.yaml"
    assert main(["bench", str(config), "-o", str(tmp_path), "--methods", "pab+taocache", "--update"]) != 0
    assert f"--update: there is no {tmp_path / 'results.json'} to update" in capsys.readouterr().err
    assert main(["bench", str(config), "-o", str(tmp_path), "--methods", "pab"]) != 0
    assert "unknown method 'pab'" in capsys.readouterr().err


def test_a_taocache_config_given_to_bench_is_said_to_be_one():
    from pathlib import Path

    with pytest.raises(ValueError, match="this is a TaoCache config .*configs/bench.yaml"):
        bench.load_bench_config(Path(__file__).resolve().parent.parent / "configs" / "example.yaml")


def test_an_update_is_checked_against_the_latest_run_and_its_methods_settings_only():
    """The README's own `--update` commands were refused: the folder's first run searched with 8 iterations, its
    updates (and configs/bench.yaml) with 12 (review of 2026-11-27's fixes)."""
    meta = {"config": {"methods": list(methods.METHODS), "steps": 50, "search_iterations": 8, "pab_range": 2},
            "updates": [{"config": {"methods": ["teacache"], "steps": 50, "search_iterations": 12}},
                        {"config": {"methods": ["taocache"], "steps": 50, "search_iterations": 5}}]}
    bench.BenchConfig(methods=["teacache"], search_iterations=12).check_compatible(meta, "r.json")
    bench.BenchConfig(methods=["pab+taocache"], search_iterations=5).check_compatible(meta, "r.json")  # unused there
    # the last update ran taocache alone: its search_iterations made no record, so 12 is still the folder's
    with pytest.raises(ValueError, match="search_iterations: 12, this run has search_iterations: 8"):
        bench.BenchConfig(methods=["teacache"], search_iterations=8).check_compatible(meta, "r.json")
    with pytest.raises(ValueError, match="pab_range: 2, this run has pab_range: 3"):
        bench.BenchConfig(methods=["pab+taocache"], pab_range=3).check_compatible(meta, "r.json")


def test_the_hybrid_takes_a_number_of_taocache_skips_and_a_folder_of_earlier_hybrid_rows_is_kept_apart():
    """``hybrid_tao_skips`` (the paper's hybrid run: 7 TaoCache skips; compare had it, the bench took half of every
    budget); a folder whose hybrid rows were made before the key existed made them with half."""
    tm = tiny("flow")
    pairs = data.calibration_pairs(4)
    cal = methods.calibrate(tm, pairs, batch_size=4)
    for wanted, skips, expected in ((None, 3, 1), (2, 3, 2), (5, 3, 3)):
        settings = methods.MethodSettings(search_iterations=2, hybrid_tao_skips=wanted)
        built = methods.build_method("hybrid", tm, cal, skips, pairs[:2], 2, settings)
        first, last = built.info["window"]
        assert built.info["tao_skips"] == expected == last - first + 1, (wanted, skips)
    old = {"config": {"methods": ["hybrid"], "steps": 50}}  # (no hybrid_tao_skips: written before the key)
    bench.BenchConfig(methods=["hybrid"]).check_compatible(old, "r.json")
    with pytest.raises(ValueError, match="hybrid_tao_skips: None, this run has hybrid_tao_skips: 7"):
        bench.BenchConfig(methods=["hybrid"], hybrid_tao_skips=7).check_compatible(old, "r.json")
    bench.BenchConfig(methods=["teacache"], hybrid_tao_skips=7).check_compatible(old, "r.json")  # no hybrid row made
    errors = []
    bench.BenchConfig(hybrid_tao_skips=0).validate(lambda key, message: errors.append((key, message)))
    assert errors == [("hybrid_tao_skips", "expected an integer >= 1, got 0")]


def test_bench_budgets_that_cannot_be_planned_or_repeat_a_row_are_refused_before_the_work():
    errors = []
    bench.BenchConfig(budgets=[0.04, 0.7]).validate(lambda key, message: errors.append((key, message)))
    bench.BenchConfig(steps=10, budgets=[0.04, 0.08]).validate(lambda key, message: errors.append((key, message)))
    assert errors[0][0] == "budgets[1]" and "35 of 50 steps" in errors[0][1]
    assert errors[1][0] == "budgets[1]" and "the same row twice" in errors[1][1]
    assert bench.skips_of(0.29, 50) == 15 and bench.skips_of(0.25, 50) == 13  # half up, floats notwithstanding


def test_an_update_with_the_folder_s_own_checkpoint_is_accepted():
    """The checkpoint of an earlier run (recorded without a sha256, as older folders are) was compared with an
    empty table, so an update naming the same --weights was refused (found re-reading the change)."""
    meta = {"config": {"models": ["scenes"], "methods": ["taocache"], "weights": {"scenes": "w.safetensors"}}}
    bench.BenchConfig(models=["scenes"], methods=["teacache"],
                      weights={"scenes": "w.safetensors"}).check_compatible(meta, "r.json")
    with pytest.raises(ValueError, match="made with weights w.safetensors, this run has bundled"):
        bench.BenchConfig(models=["scenes"], methods=["teacache"]).check_compatible(meta, "r.json")


@pytest.mark.parametrize("key", ["models", "methods", "budgets"])
def test_an_empty_list_is_refused_before_any_work(tmp_path, key):
    """`models: []` said "wrote results.json" and wrote nothing; `budgets: []` failed after the calibration with "min()
    arg is an empty sequence"; `methods: []` ran a calibration for an empty table (review, 2026-11-29)."""
    path = tmp_path / "b.yaml"
    path.write_text(f"{key}: []\n")
    with pytest.raises(ValueError, match=rf"{key}: an empty list: nothing would run"):
        bench.load_bench_config(path)


def test_an_update_tells_a_folder_lut_that_is_not_this_runs_calibration(tmp_path):
    """`bench --update` kept the folder's LUT and made its rows from a fresh calibration without comparing them: a LUT
    of an earlier taohooks (no products between the streams) sat next to rows it could not have made (review,
    2026-11-29). `_same_calibration` tells them apart; the update then saves its own beside it, and says so."""
    from taohooks.taocache.lut import CalibrationLUT
    from test_calibration import calibrate as calibrate_loop
    from trajectories import GeometricDenoiser

    lut = calibrate_loop(GeometricDenoiser({"cond": 0.9, "uncond": 0.7}), 8, ("cond", "uncond"))
    path = lut.save(tmp_path / "lut_flow.safetensors")
    assert bench._same_calibration(path, lut)
    older = CalibrationLUT(**{**lut.__dict__, "deltas": type(lut.deltas)(lut.deltas.gram, lut.deltas.numel)})
    assert not bench._same_calibration(older.save(tmp_path / "older.safetensors"), lut)
    other = calibrate_loop(GeometricDenoiser({"cond": 0.8, "uncond": 0.7}), 8, ("cond", "uncond"))
    assert not bench._same_calibration(path, other)
    assert not bench._same_calibration(tmp_path / "missing.safetensors", lut)


def test_a_lut_given_as_weights_is_said_as_such(tmp_path):
    """`--weights flow=<a LUT>` was refused as "KeyError: 'config'" (review, 2026-11-29)."""
    from taohooks.evaluation.testbed_model import TestbedModel

    lut = Path(__file__).resolve().parent.parent / "docs" / "results" / "full" / "flow" / "lut_flow.safetensors"
    with pytest.raises(ValueError, match=r"lut_flow\.safetensors: not a testbed checkpoint \(a calibration LUT\); "
                                         r"give the model's weights"):
        TestbedModel.check("flow", lut)
