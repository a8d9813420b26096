"""taocache compare (issue 14, first slice): experiment YAML checks, metrics, and an experiment end
to end through the launcher on examples/sample_testbed.py (in-process; 10 steps, 2 prompts)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from taohooks import cli  # noqa: E402
from taohooks.compare import load_experiment  # noqa: E402
from taohooks.compare.scoring import score  # noqa: E402
from taohooks.config import ConfigError, PABGroupConfig  # noqa: E402
from prewarmed import run_python  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "sample_testbed.py"
STEPS = 10

EXPERIMENT = """\
integration: testbed
model_id: testbed-flow
prompts:
  - {prompt: "a red circle moving left, with a static green dot", seed: 10000}
  - {prompt: "a green square moving up, with a static blue dot", seed: 10001}
calibration_prompts:
  - {prompt: "a red square moving left, with a static blue dot", seed: 1000}
  - {prompt: "a green circle moving down, with a static yellow dot", seed: 1001}
  - {prompt: "a yellow square moving right", seed: 1002}
search_prompts: 1
search_iterations: 4
methods: [full, taocache, teacache]
budgets: [0.2, 0.3]
output: out
lpips: false
"""


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: two spin against each other on a loaded 2-core machine (5x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------- the experiment YAML
@pytest.mark.parametrize("change, key, message", [
    (("budgets:", "budjets:"), "budjets", "did you mean 'budgets'"),
    (("methods: [full, taocache, teacache]", "methods: [full, pab, pab]"), "methods[2]", "'pab' is listed twice"),
    (("methods: [full, taocache, teacache]", "methods: [full, teacahce]"), "methods[1]", "did you mean 'teacache'"),
    (("budgets: [0.2, 0.3]", "budgets: [0.2, 1.5]"), "budgets[1]", "expected a fraction of the steps in (0, 1)"),
    (("integration: testbed", "integration: testbed\ntaocache: t.yaml"), "taocache", "not both"),
    (("integration: testbed", "integration: wann"), "integration", "did you mean 'wan'"),
    (("search_prompts: 1", "search_prompts: one"), "search_prompts", "expected an integer"),
    (("search_prompts: 1", "search_prompts: 1\nhybrid_guard: -5"), "hybrid_guard", "expected a number of steps >= 0"),
    (("search_prompts: 1", "search_prompts: 4"), "search_prompts", "4, but calibration_prompts lists 3: the threshold "
                                                                   "searches (teacache) run on the first"),
])
def test_bad_experiment_names_file_key_and_expectation(tmp_path, change, key, message):
    path = write(tmp_path, EXPERIMENT.replace(*change))
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    assert info.value.key == key and message in str(info.value) and str(path) in str(info.value)


def test_a_thin_hybrid_guard_is_warned_not_refused(tmp_path, capsys):
    text = EXPERIMENT.replace("methods: [full, taocache, teacache]", "methods: [full, taocache, hybrid]")
    path = write(tmp_path, text + "hybrid_guard: 0\n")
    assert load_experiment(path).hybrid_guard == 0
    assert f"{path}: hybrid_guard: 0: the hybrid's TeaCache may reuse the outputs" in capsys.readouterr().err
    load_experiment(write(tmp_path, text + "hybrid_guard: 2\n"))
    assert "hybrid_guard" not in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (b"\n# only a comment\n\n", "holds no prompt"),
    (b"a red circle\n\xff\xfe\n", "not UTF-8 text: byte 13"),
    (b"a red circle moving left\t7\nsomething\na red circle moving left\t7\n", "prompt 3 repeats prompt 1"),
    (b"a red circle moving left\tseven\n", "line 1: the seed after the tab must be an integer, got 'seven'"),
])
def test_bad_prompt_file(tmp_path, content, message):
    (tmp_path / "prompts.txt").write_bytes(content)
    path = write(tmp_path, EXPERIMENT.replace("prompts:\n  - {prompt: \"a red circle moving left, with a static "
                                              "green dot\", seed: 10000}\n  - {prompt: \"a green square moving up, "
                                              "with a static blue dot\", seed: 10001}\n", "prompts: prompts.txt\n"))
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    assert message in str(info.value) and str(tmp_path / "prompts.txt") in str(info.value)


def test_prompt_file_seeds_and_overlap_with_calibration(tmp_path):
    (tmp_path / "p.txt").write_text("# eval\na red circle moving left\t7\na red square moving down\n")
    text = EXPERIMENT.replace("prompts:\n  - {prompt: \"a red circle moving left, with a static green dot\", "
                              "seed: 10000}\n  - {prompt: \"a green square moving up, with a static blue dot\", "
                              "seed: 10001}\n", "prompts: p.txt\nseed: 3\n")
    config = load_experiment(write(tmp_path, text))
    assert [(e.prompt, e.seed) for e in config.evaluation_prompts()] == [("a red circle moving left", 7),
                                                                         ("a red square moving down", 3)]
    overlap = text.replace("seed: 1002}", "seed: 1002}\n  - {prompt: a red square moving down, seed: 3}")
    with pytest.raises(ConfigError, match=r"calibration_prompts: 1 \(prompt, seed\) pair\(s\) are also evaluation"):
        load_experiment(write(tmp_path, overlap))
    with pytest.raises(ConfigError, match=r"calibration_prompts\[0\]\.promt: unknown key; did you mean "
                                          r"'calibration_prompts\[0\].prompt'"):
        load_experiment(write(tmp_path, text.replace("{prompt: \"a red square moving left", "{promt: \"a red square "
                                                                                            "moving left")))


def test_errors_come_before_the_script_runs(tmp_path, capsys):
    never = write(tmp_path, "raise SystemExit('the script ran')\n", "never.py")
    path = write(tmp_path, EXPERIMENT.replace("methods: [full, taocache, teacache]", "methods: [full, pab]").replace(
        "integration: testbed", "integration: none"))
    assert cli.main(["compare", str(path), "--", str(never)]) == 1
    err = capsys.readouterr().err
    assert "taocache compare: error:" in err and "taocache compare does not support the 'none' integration" in err
    assert not (tmp_path / "out").exists()  # (the lock made the folder, and a .compare.lock in it: walkthrough)


# ---------------------------------------------------------------------------- metrics
def test_psnr_conventions_side_by_side():
    reference = torch.zeros(1, 3, 2, 16, 16)
    video = reference.clone()
    video[:, :, 1] += 0.2  # frame 1: +0.1 in [0, 1], MSE 0.01 -> 20 dB; frame 0 identical
    s = score(video, reference)
    assert s["psnr"] == pytest.approx((100 + 20) / 2)  # per-frame mean, identical frame capped at 100 dB
    assert s["psnr_pooled"] == pytest.approx(10 * torch.log10(torch.tensor(1 / 0.005, dtype=torch.float64)).item())
    assert s["psnr_changed"] == pytest.approx(20.0)
    assert (s["identical_frames"], s["frames"], s["lpips"]) == (1, 2, None)
    assert s["ssim"] < 1.0
    same = score(reference, reference)
    assert (same["psnr"], same["psnr_pooled"], same["psnr_changed"], same["ssim"]) == (100.0, 100.0, None, 1.0)


# ---------------------------------------------------------------------------- end to end
@pytest.fixture
def launcher_state(monkeypatch):
    """What the launcher changes in this process (sys.argv, sys.path[0], TAOHOOKS_CONFIG, the patch)."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("TAOHOOKS_CONFIG", "")  # recorded, so that the launcher's value is undone
    monkeypatch.delenv("TAOHOOKS_CONFIG")
    yield
    from taohooks.testbed import integration

    integration.uninstall()


def compare(path: Path) -> int:
    return cli.main(["compare", str(path), "--", str(SCRIPT), "--model", "flow", "--steps", str(STEPS),
                     "--out", str(path.parent / "never.png")])


def stable(results: dict) -> list:
    """The records without wall times (they vary between runs)."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in results["records"]]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, one_thread):
    """One uninterrupted experiment: (folder, results, stderr)."""
    tmp_path = tmp_path_factory.mktemp("compare")
    mp = pytest.MonkeyPatch()
    mp.setattr(sys, "argv", list(sys.argv))
    mp.setattr(sys, "path", list(sys.path))
    mp.setenv("TAOHOOKS_CONFIG", "")  # recorded, so that the launcher's value is undone
    mp.delenv("TAOHOOKS_CONFIG")
    import io

    err = io.StringIO()
    mp.setattr(sys, "stderr", err)
    try:
        assert compare(write(tmp_path, EXPERIMENT)) == 0, err.getvalue()
    finally:
        mp.undo()
        from taohooks.testbed import integration

        integration.uninstall()
    return tmp_path / "out", json.loads((tmp_path / "out" / "results.json").read_text()), err.getvalue()


def test_end_to_end_records_and_captured_videos(finished):
    from taohooks.compare.store import RunStore
    from taohooks.testbed import sampling
    from taohooks.testbed.model import VideoDiT

    out, results, stderr = finished
    records = results["records"]
    assert [(r["method"], r["skips"]) for r in records[:5]] == [("full", 0), ("taocache", 2), ("teacache", 2),
                                                                 ("taocache", 3), ("teacache", 3)]
    assert len(records) == 10 and len(results["aggregates"]) == 4
    assert "compare: [####################] 13/13 runs" in stderr  # 3 calibration + 2 references + 8 runs
    model = VideoDiT.from_pretrained(Path(sampling.__file__).parent / "weights" / "flow.safetensors")
    store = RunStore(out)
    for entry, record in zip(load_experiment(out.parent / "exp.yaml").evaluation_prompts(), records[::5]):
        video, _ = store.load("full", entry)  # the generation's own return value, one (prompt, seed) each
        assert torch.equal(video, sampling.sample(model, [entry.prompt], [entry.seed], steps=STEPS))
        assert record["prompt"] == entry.prompt and record["calls"] == 2 * STEPS
    for r in records:
        if r["method"] == "taocache":  # the window's steps, both streams, exactly the budget
            first, last = r["window"]
            assert r["skipped_calls"] == 2 * r["skips"] and last - first + 1 == r["skips"]
            assert sorted(r["skipped_schedule"]) == sorted([s, st] for s in range(first, last + 1)
                                                           for st in ("cond", "uncond"))
        if r["method"] != "full":
            video, _ = store.load(f"{r['method']}@{r['skips']}of{STEPS}", next(
                e for e in load_experiment(out.parent / "exp.yaml").evaluation_prompts() if e.prompt == r["prompt"]))
            reference, _ = store.load("full", next(e for e in load_experiment(out.parent / "exp.yaml")
                                                   .evaluation_prompts() if e.prompt == r["prompt"]))
            from taohooks.metrics import psnr, ssim

            assert r["psnr"] == float(psnr(video, reference).mean())  # bench's metric code, same values
            assert r["ssim"] == float(ssim(video, reference).mean())
            assert 0 < r["skipped_calls"] < r["calls"] and r["psnr"] < 100
    for r in records:  # per stream: the two streams skip together in all three methods here
        assert r["skipped_per_stream"] == ({} if r["method"] == "full" else
                                           {"cond": r["skipped_calls"] // 2, "uncond": r["skipped_calls"] // 2})
        assert r["peak_memory_bytes"] is None  # CPU
    for name in ("quality_vs_speedup.png", "skip_schedule.png", "strip.png", "side_by_side.gif"):
        assert (out / name).stat().st_size > 1000, name
    from PIL import Image

    with Image.open(out / "side_by_side.gif") as gif:  # plays the 8 frames: rows full, taocache, teacache
        assert gif.n_frames == 8 and gif.size == (150 + 2 * (16 * 16 + 2), 3 * (16 * 16 + 2))
    thresholds = json.loads((out / "state" / "thresholds.json").read_text())
    assert set(thresholds) == {"teacache@2of10", "teacache@3of10"}
    assert (out / "results.md").read_text().count("| taocache |") == 2


def test_second_invocation_recomputes_nothing(finished, launcher_state, capsys):
    out, results, _ = finished
    files = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.safetensors")}
    assert compare(out.parent / "exp.yaml") == 0
    err = capsys.readouterr().err
    assert "13 of 13 runs already in" in err and "compare: [" not in err and "searching" not in err
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.safetensors")} == files
    assert stable(json.loads((out / "results.json").read_text())) == stable(results)


def test_killed_experiment_resumes_to_the_same_results(finished, tmp_path, launcher_state, monkeypatch, capsys):
    from taohooks.compare.store import RunStore

    saves = {"n": 0}
    original = RunStore.save

    def save_then_die(self, *args, **kwargs):
        original(self, *args, **kwargs)
        saves["n"] += 1
        if saves["n"] == 4:  # the 2 references and 2 taocache runs are stored
            raise KeyboardInterrupt

    monkeypatch.setattr(RunStore, "save", save_then_die)
    path = write(tmp_path, EXPERIMENT)
    import shutil  # killed after the calibration and the threshold search (their results kept, as a run does)

    shutil.copytree(finished[0] / "state", tmp_path / "out" / "state")
    shutil.copy(finished[0] / "experiment.json", tmp_path / "out")  # (state without it: an unknown experiment's)
    assert compare(path) == 130  # said, with how to go on (it was a traceback)
    assert "taocache compare: interrupted; the runs stored in " in capsys.readouterr().err
    assert len(list((tmp_path / "out" / "runs").rglob("*.safetensors"))) == 4
    assert not (tmp_path / "out" / "results.json").exists()
    monkeypatch.setattr(RunStore, "save", original)
    from taohooks.testbed import integration

    integration.uninstall()
    capsys.readouterr()
    assert compare(path) == 0
    err = capsys.readouterr().err
    assert "7 of 13 runs already in" in err and "searching" not in err  # 3 calibration runs + 4 stored runs
    assert "] 8/13 runs" in err and "] 7/13 runs" not in err  # the first run made again: the 5th stored
    assert stable(json.loads((tmp_path / "out" / "results.json").read_text())) == stable(finished[1])


def test_a_calibration_killed_after_a_generation_resumes_after_it(finished, tmp_path, launcher_state, monkeypatch,
                                                                   capsys):
    """Each calibration generation is kept as it ends (the LUT's statistics, TeaCache's pairs): a compare killed in
    its calibration repeats none of them, and its results equal an uninterrupted run's (all were lost before)."""
    from taohooks.compare.runner import CalibrationCheckpoint

    original = CalibrationCheckpoint.save

    def save_then_die(self, done, *args):
        original(self, done, *args)
        if done == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(CalibrationCheckpoint, "save", save_then_die)
    path = write(tmp_path, EXPERIMENT)
    assert compare(path) == 130
    assert json.loads((tmp_path / "out" / "state" / "calibration_partial.json").read_text())["done"] == 2
    monkeypatch.setattr(CalibrationCheckpoint, "save", original)
    from taohooks.testbed import integration

    integration.uninstall()
    capsys.readouterr()
    assert compare(path) == 0
    err = capsys.readouterr().err
    assert "calibrating taocache's LUT and teacache's polynomial on 3 calibration prompts (full-step), into " in err
    assert "(this experiment's own: the config's lut: is not written); 2 of them recorded before, kept" in err
    assert "; 2 of 13 runs already in " in err and "(2 of them an interrupted calibration's)" in err  # (said 0)
    assert "] 3/13 runs" in err and "] 2/13 runs" not in err  # one calibration generation made again
    assert not (tmp_path / "out" / "state" / "calibration_partial.json").exists()  # done: the final state only
    assert stable(json.loads((tmp_path / "out" / "results.json").read_text())) == stable(finished[1])


def test_a_threshold_search_killed_midway_replays_its_measured_steps(finished, tmp_path, launcher_state,
                                                                      monkeypatch, capsys):
    """Each measured threshold is kept: a search killed after two steps measures neither again, and ends where an
    uninterrupted one does (it started over, its generations lost)."""
    import shutil

    from taohooks.compare.store import RunStore

    original, writes = RunStore.put_state, {"n": 0}

    def put_then_die(self, name, value):
        original(self, name, value)
        writes["n"] += name == "threshold_steps"
        if writes["n"] == 2:
            raise KeyboardInterrupt

    path = write(tmp_path, EXPERIMENT)
    shutil.copytree(finished[0] / "state", tmp_path / "out" / "state")
    shutil.copy(finished[0] / "experiment.json", tmp_path / "out")
    (tmp_path / "out" / "state" / "thresholds.json").unlink()  # calibrated, no threshold found yet
    (tmp_path / "out" / "state" / "threshold_steps.json").unlink()
    monkeypatch.setattr(RunStore, "put_state", put_then_die)
    assert compare(path) == 130
    monkeypatch.setattr(RunStore, "put_state", original)
    from taohooks.testbed import integration

    integration.uninstall()
    capsys.readouterr()
    assert compare(path) == 0
    err = capsys.readouterr().err
    first = [line for line in err.splitlines() if "compare: teacache@2of10: threshold " in line]
    assert "; 2 thresholds measured before (here or at another budget), kept)" in err
    assert "(search step 3, at most 17)" in first[0]
    assert stable(json.loads((tmp_path / "out" / "results.json").read_text())) == stable(finished[1])


def test_calibration_checkpoint_keeps_magcache_moments_and_refuses_other_prompts(tmp_path, capsys):
    from taohooks.caches.magcache import MagCacheCalibrator
    from taohooks.caches.teacache import TeaCacheCalibrator
    from taohooks.compare.runner import CalibrationCheckpoint
    from taohooks.compare.store import RunStore
    from taohooks.runtime.loop import LoopSpec
    from taohooks.taocache.lut import CalibrationLUT
    from taohooks.taocache.stats import RunningMoments

    store, prompts = RunStore(tmp_path), [["a", 1], ["b", 2], ["c", 3]]
    tea, mag = TeaCacheCalibrator(), MagCacheCalibrator()
    tea.pairs, tea.pair_experts = [(0.1, 0.2), (1 / 3, 2 / 7)], [0, 1]
    mag.moments = RunningMoments.zeros(2, 5)
    mag.moments.add((1, 3), torch.tensor([0.1, 1 / 3]))
    lut = CalibrationLUT.empty(LoopSpec(5, ("cond", "uncond")), "m")
    CalibrationCheckpoint(store, prompts, True, True).save(1, lut, tea, mag, 12.5)
    tea2, mag2 = TeaCacheCalibrator(), MagCacheCalibrator()
    kept = CalibrationCheckpoint(store, prompts, True, True)
    resumed, done = kept.resume(tea2, mag2)
    assert done == 1 and kept.seconds == 12.5 and resumed.steps == 5 and resumed.model_id == "m"
    assert tea2.pairs == tea.pairs and tea2.pair_experts == [0, 1]
    assert torch.equal(mag2.moments.total, mag.moments.total) and torch.equal(mag2.moments.count, mag.moments.count)
    assert CalibrationCheckpoint(store, [["a", 9]] + prompts[1:], True, True).resume(None, None) == (None, 0)
    assert "kept in this folder was of other calibration prompts" in capsys.readouterr().err
    assert CalibrationCheckpoint(store, prompts, True, False).resume(None, None) == (None, 0)  # MagCache dropped
    # killed between the LUT of generation 2 and its state: the state's generation 1 and its LUT are resumed
    more = CalibrationLUT.empty(LoopSpec(5, ("cond", "uncond")), "other")
    (tmp_path / "state" / "calibration_partial-2.safetensors").write_bytes(more.to_bytes())
    resumed, done = CalibrationCheckpoint(store, prompts, True, True).resume(TeaCacheCalibrator(), mag2)
    assert done == 1 and resumed.model_id == "m"
    kept.save(2, more, tea, mag, 13.0)
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["calibration_partial-2.safetensors",
                                                                       "calibration_partial.json"]
    kept.discard()
    assert not list((tmp_path / "state").iterdir())


def test_report_rebuilds_from_results_json(finished, tmp_path, capsys):
    out, results, _ = finished
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert cli.main(["compare", "--report", str(tmp_path)]) == 0
    assert (tmp_path / "results.md").read_text() == (out / "results.md").read_text()
    assert (tmp_path / "quality_vs_speedup.png").is_file() and (tmp_path / "skip_schedule.png").is_file()
    assert f"wrote {tmp_path / 'results.md'}, quality_vs_speedup.png, skip_schedule.png (strip.png" \
        in capsys.readouterr().out  # (it said nothing of what it rewrote: fresh-machine check, 2026-11-28)
    (tmp_path / "results.json").write_text("[]")
    assert cli.main(["compare", "--report", str(tmp_path)]) == 1
    assert "not a taocache compare results file" in capsys.readouterr().err


def test_numbers_agree_with_taocache_bench(finished):
    """bench's own calibration, threshold search, runs and scorer on the same pairs (one per batch, as
    compare runs them) give the same thresholds, skip counts and metric values."""
    from taohooks.evaluation.bench import _Scorer
    from taohooks.evaluation.methods import MethodSettings, build_method, calibrate, run_with
    from taohooks.evaluation.testbed_model import TestbedModel
    from taohooks.testbed.data import Prompt

    out, results, _ = finished
    config = load_experiment(out.parent / "exp.yaml")
    pairs = [(Prompt.from_text(e.prompt), e.seed) for e in config.evaluation_prompts()]
    cal_pairs = [(Prompt.from_text(e.prompt), e.seed) for e in config.calibration_list()]
    tm = TestbedModel.load("flow", STEPS)
    cal = calibrate(tm, cal_pairs, 1)
    reference = run_with(tm, [], pairs, 1)
    scorer = _Scorer(reference.clips, [p for p, _ in pairs], use_lpips=False)
    settings = MethodSettings(search_iterations=config.search_iterations)
    for row in results["aggregates"]:
        built = build_method(row["method"], tm, cal, row["skips"], cal_pairs[:config.search_prompts], 1, settings)
        run = run_with(tm, built.callbacks, pairs, 1)
        bench = scorer(run.clips)
        assert row["skipped_fraction"] == run.skipped_fraction
        assert row["psnr"] == pytest.approx(bench["psnr"], rel=1e-12)
        assert row["ssim"] == pytest.approx(bench["ssim"], rel=1e-12)
        assert row.get("threshold") == built.info.get("threshold")
        assert row.get("window") == (list(built.info["window"]) if "window" in built.info else None)


FIXTURES = ROOT / "tests" / "fixtures" / "official_like"
WAN = FIXTURES / "wan" / "generate.py"
LATTE = FIXTURES / "latte" / "sample" / "sample_t2x.py"
OFFICIAL_LIKE_EXPERIMENT = """\
integration: {integration}
prompts:
  - {{prompt: "Two cats boxing on a spotlighted stage.", seed: 0}}
  - {{prompt: "A red panda eating bamboo.", seed: 1}}
calibration_prompts: ["A boat on a lake at dawn.", "A city street in the rain."]
seed: 100
methods: [full, taocache]
budgets: [0.2]
output: {output}
lpips: false
"""
DRIVER = """\
import runpy, sys
from taohooks import cli
sys.argv = {plain!r}
sys.path.insert(0, {wan_dir!r})
runpy.run_path({wan!r}, run_name="__main__")  # the script itself: the video its generate returns
for exp, script in {runs!r}:
    sys.argv = ["taocache"]
    code = cli.main(["compare", exp, "--", *script])
    if code:
        sys.exit(code)
"""


def test_official_like_scripts_end_to_end(tmp_path):
    """Through the Wan2.1 and Latte call-contract scripts (one cold process): Wan's captured reference
    is the video generate returns for that prompt and seed; TaoCache skips its window in every
    stream; Latte (no seed argument: torch's RNG seeded per run) gives the same references twice."""

    from taohooks.compare.store import RunStore

    wan_args = ["--task", "t2v-1.3B", "--prompt", "ignored", "--sample_steps", "10", "--sample_guide_scale", "5.0"]
    plain = [str(WAN), *wan_args, "--prompt", "Two cats boxing on a spotlighted stage.", "--base_seed", "0",
             "--save_file", str(tmp_path / "plain.pt")]
    (tmp_path / "sample.yaml").write_text(json.dumps(dict(  # Latte's own config file (YAML, written as JSON)
        num_sampling_steps=10, guidance_scale=7.5, seed=0, save_path=str(tmp_path / "videos"),
        text_prompt=["x"], video_length=4, image_size=[16, 16])))
    runs = []
    for name, script in (("wan", [str(WAN), *wan_args]), ("latte", [str(LATTE), "--config", "sample.yaml"]),
                         ("latte2", [str(LATTE), "--config", "sample.yaml"])):
        text = OFFICIAL_LIKE_EXPERIMENT.format(integration=name.rstrip("2"), output=f"out_{name}")
        runs.append((str(write(tmp_path, text, f"{name}.yaml")), script))
    # Latte's YAML copied elsewhere, with other prompts and seed: the same experiment (its settings are compared)
    (tmp_path / "copy.yaml").write_text(json.dumps(dict(
        num_sampling_steps=10, guidance_scale=7.5, seed=3, save_path=str(tmp_path / "videos"),
        text_prompt=["y", "z"], video_length=4, image_size=[16, 16])))
    runs.append((runs[1][0], [str(LATTE), "--config", "copy.yaml"]))
    driver = write(tmp_path, DRIVER.format(plain=plain, wan_dir=str(WAN.parent), wan=str(WAN), runs=runs), "d.py")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("TAOHOOKS_")}
    res = run_python([str(driver)], cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr
    entries = load_experiment(tmp_path / "wan.yaml").evaluation_prompts()
    for name, calls, streams in (("wan", 20, [["cond"], ["uncond"]]), ("latte", 10, [["uncond+cond"]])):
        results = json.loads((tmp_path / f"out_{name}" / "results.json").read_text())
        assert [(r["method"], r["skips"], r["seed"]) for r in results["records"]] == [
            ("full", 0, 0), ("taocache", 2, 0), ("full", 0, 1), ("taocache", 2, 1)]
        tao = results["records"][1]
        first, last = tao["window"]
        assert tao["calls"] == calls and sorted(tao["skipped_schedule"]) == [[s, *st] for s in (first, last)
                                                                          for st in streams]
        assert tao["psnr"] >= 30  # a late window of these smooth stand-in models costs little
    wan_reference, _ = RunStore(tmp_path / "out_wan").load("full", entries[0])
    assert torch.equal(wan_reference[0], torch.load(tmp_path / "plain.pt"))  # WanT2V.generate's return value
    latents = RunStore(tmp_path / "out_wan").load_latents("full", entries[0])  # recorded at vae.decode
    assert torch.equal(latents, wan_reference)  # (the stand-in VAE returns its input)
    wan_tao = json.loads((tmp_path / "out_wan" / "results.json").read_text())["records"][1]
    assert 0 < wan_tao["latent_rel_l2"] < 0.1
    assert "latent rel. L2" in (tmp_path / "out_wan" / "results.md").read_text()
    assert "latent rel. L2" not in (tmp_path / "out_latte" / "results.md").read_text()  # the fixture does not decode
    latte = [[RunStore(tmp_path / out).load("full", e)[0] for e in entries] for out in ("out_latte", "out_latte2")]
    assert all(torch.equal(a, b) for a, b in zip(*latte)) and not torch.equal(latte[0][0], latte[0][1])
    assert "calibrating taocache's LUT (the TaoCache config names no lut:) on 2 calibration prompts" in res.stderr
    assert f"; 6 of 6 runs already in {tmp_path / 'out_latte'}" in res.stderr  # (the copy: nothing run again)


def compare_in_a_process(tmp_path: Path, experiment: Path, script: list, pythonpath: str = ""):
    """``taocache compare EXPERIMENT -- SCRIPT...`` in a fresh process (an official-like script imports its
    own ``wan`` package); asserts it succeeded and returns the completed process."""

    driver = write(tmp_path, "import sys\nfrom taohooks import cli\nsys.argv = ['taocache']\n"
                             f"sys.exit(cli.main(['compare', {str(experiment)!r}, '--', *{script!r}]))\n", "d.py")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("TAOHOOKS_")}
    env.update({"OMP_NUM_THREADS": "1", **({"PYTHONPATH": pythonpath} if pythonpath else {})})
    res = run_python([str(driver)], cwd=tmp_path, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    return res


def test_wan21_teacache_as_its_authors_run_it_through_compare(tmp_path):
    """Wan2.1's call-contract script: teacache uses the authors' proxy (the time embedding) and the
    published coefficients (no polynomial fit, so no calibration run), and the results say so."""
    args = [str(WAN), "--task", "t2v-1.3B", "--prompt", "ignored", "--sample_steps", "10",
            "--sample_guide_scale", "5.0"]
    text = OFFICIAL_LIKE_EXPERIMENT.format(integration="wan", output="out").replace(
        "methods: [full, taocache]", "methods: [full, teacache]").replace("budgets: [0.2]", "budgets: [0.2]\nsearch_prompts: 1")
    exp = write(tmp_path, text, "wan.yaml")
    res = compare_in_a_process(tmp_path, exp, args)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "the authors' TeaCache for Wan2.1 t2v-1.3B (without use_ret_steps)" in results["meta"]["teacache_proxy"]
    assert "ali-vilab/TeaCache 7c10efc" in results["meta"]["teacache_proxy"]
    assert "calibrating" not in res.stderr  # published coefficients: nothing fitted
    tea = [r for r in results["records"] if r["method"] == "teacache"]
    assert len(tea) == 2 and all(r["calls"] == 20 for r in tea)
    assert any(r["skipped_fraction"] > 0 for r in tea), tea


def test_latte_teacache_as_its_authors_run_it_through_compare(tmp_path):
    """Latte's call-contract script (its transformer laid out like Latte's: spatial and temporal
    stacks, adaLN-single): teacache is the authors' (published coefficients, nothing fitted), and it,
    MagCache (ratios calibrated) and the TaoSkip+TeaResidual ablation reuse the whole interleaved stack."""
    (tmp_path / "sample.yaml").write_text(json.dumps(dict(
        num_sampling_steps=10, guidance_scale=7.5, seed=0, save_path=str(tmp_path / "videos"),
        text_prompt=["x"], video_length=4, image_size=[16, 16])))
    text = OFFICIAL_LIKE_EXPERIMENT.format(integration="latte", output="out").replace(
        "methods: [full, taocache]", "methods: [full, teacache, magcache, taoskip+tearesidual, pab]").replace(
        "budgets: [0.2]", "budgets: [0.3]\nsearch_prompts: 1")
    res = compare_in_a_process(tmp_path, write(tmp_path, text, "latte.yaml"), [str(LATTE), "--config", "sample.yaml"])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "the authors' TeaCache for Latte-1" in results["meta"]["teacache_proxy"]
    assert "eval/teacache/experiments/latte.py L180" in results["meta"]["teacache_proxy"]
    assert results["meta"]["calibration"]["tea_coefficients"] is None  # published: nothing fitted
    assert "calibrating taocache's LUT and magcache's magnitude ratios" in res.stderr  # (the LUT: for the ablation)
    # the published polynomial is negative for this stand-in's large proxy changes (above ~0.237), so the
    # changes add up to less than any threshold: the search says it cannot meet the budget
    assert "compare: teacache@3of10's threshold search could not meet the budget of 30.0% skipped calls" in res.stderr
    assert any(r["skipped_fraction"] > 0 for r in results["records"] if r["method"] == "teacache")
    for method in ("magcache", "taoskip+tearesidual"):
        rows = [r for r in results["records"] if r["method"] == method]
        assert len(rows) == 2 and all(r["calls"] == 10 and r["skipped_fraction"] == 0.3 for r in rows), (method, rows)
        assert all(40 < r["psnr"] < 100 for r in rows)  # the whole-stack reuse changed the video, a little
    pab = [r for r in results["records"] if r["method"] == "pab"]  # spatial and temporal self-attention
    assert len(pab) == 2 and all(r["skipped_calls"] == 0 and r["psnr"] < 100 for r in pab)


def test_opensora_plan_through_compare(tmp_path):
    """Open-Sora-Plan's call-contract script (PNDM: 6 steps are 15 calls, numbered by call; the pipeline
    returns latents): the capture, TaoCache's budget in calls, the authors' TeaCache and PAB alone."""
    script = FIXTURES / "opensora_plan" / "opensora" / "sample" / "sample_t2v.py"
    text = OFFICIAL_LIKE_EXPERIMENT.format(integration="opensora_plan", output="out").replace(
        "methods: [full, taocache]", "methods: [full, taocache, teacache, pab]").replace(
        "budgets: [0.2]", "budgets: [0.2]\nsearch_prompts: 1\nsearch_iterations: 4")
    compare_in_a_process(tmp_path, write(tmp_path, text, "osp.yaml"),
                         [str(script), "--num_sampling_steps", "6", "--text_prompt", "x"],
                         pythonpath=str(FIXTURES / "opensora_plan"))
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "the authors' TeaCache for Open-Sora-Plan v1.1" in results["meta"]["teacache_proxy"]
    rows = {(r["method"], r["seed"]): r for r in results["records"]}
    assert rows[("taocache", 0)]["calls"] == 15 and rows[("taocache", 0)]["skipped_calls"] == 3
    assert rows[("pab", 0)]["skipped_calls"] == 0 and rows[("pab", 0)]["psnr"] < 100
    assert rows[("teacache", 1)]["calls"] == 15
    from taohooks.compare.store import RunStore

    entries = load_experiment(tmp_path / "osp.yaml").evaluation_prompts()
    video, _ = RunStore(tmp_path / "out").load("full", entries[0])
    assert video.dim() == 5 and video.shape[0] == 1 and torch.isfinite(video).all()


def test_magcache_calibrated_on_the_testbed_and_published_for_wan21(tmp_path, launcher_state):
    """MagCache in compare: on the testbed its ratios are calibrated on the calibration prompts (with
    TaoCache's LUT, one pass); through Wan2.1's script the authors' published ratios are used (no
    calibration run), resampled to the step count; both matched to the budget by the threshold search."""
    text = EXPERIMENT.replace("methods: [full, taocache, teacache]",
                              "methods: [full, taocache-auto, magcache, easycache, hybrid, taoskip+tearesidual, "
                              "pab+taocache, pab, pab+teacache]\n"
                              "easycache_warmup: 2").replace(
        "budgets: [0.2, 0.3]", "budgets: [0.3]")
    exp = write(tmp_path, text, "testbed.yaml")
    args = [str(WAN), "--task", "t2v-1.3B", "--prompt", "ignored", "--sample_steps", "10", "--sample_guide_scale", "5.0"]
    wan = write(tmp_path, OFFICIAL_LIKE_EXPERIMENT.format(integration="wan", output="out_wan").replace(
        "methods: [full, taocache]", "methods: [full, magcache]").replace("budgets: [0.2]", "budgets: [0.3]\nsearch_prompts: 1"),
        "wan.yaml")
    res = compare_in_a_process(tmp_path, wan, args)
    results = json.loads((tmp_path / "out_wan" / "results.json").read_text())
    assert "the authors' MagCache for Wan2.1 t2v-1.3B" in results["meta"]["magcache_ratios"]
    assert "calibrating" not in res.stderr
    mag = [r for r in results["records"] if r["method"] == "magcache"]
    assert len(mag) == 2 and all(r["calls"] == 20 and r["skipped_fraction"] > 0 for r in mag)
    assert compare(exp) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["meta"]["magcache_ratios"] == "MagCache's magnitude ratios calibrated on the calibration prompts; K 2, retention 0.2"
    assert len(results["meta"]["calibration"]["mag_ratios"]) == 2  # [cond, uncond] x steps
    mag = [r for r in results["records"] if r["method"] == "magcache"]
    assert len(mag) == 2 and all(r["skipped_fraction"] > 0 for r in mag)
    easy = [r for r in results["records"] if r["method"] == "easycache"]  # runtime-adaptive, threshold matched
    assert len(easy) == 2 and all(r["skipped_fraction"] > 0 for r in easy)
    assert "H-EmbodVis/EasyCache 51278044" in results["meta"]["easycache"]
    hybrid = [r for r in results["records"] if r["method"] == "hybrid"]  # TeaCache early, TaoCache's window late
    assert len(hybrid) == 2 and all(r["skipped_fraction"] > 0 and r["tao_skips"] == 1 for r in hybrid)
    ablation = [r for r in results["records"] if r["method"] == "taoskip+tearesidual"]  # TaoCache's steps
    assert len(ablation) == 2 and all(r["skipped_fraction"] == pytest.approx(0.3) for r in ablation)
    pab = [r for r in results["records"] if r["method"] == "pab+taocache"]  # PAB inside the computed calls
    assert len(pab) == 2 and all(r["skipped_fraction"] == pytest.approx(0.3) and r["pab_range"] == 2 for r in pab)
    auto = [r for r in results["records"] if r["method"] == "taocache-auto"]  # plan.rule: auto on the same LUT
    assert len(auto) == 2 and all(r["skipped_fraction"] == pytest.approx(0.3) for r in auto)
    pab = [r for r in results["records"] if r["method"] == "pab"]  # alone: once per prompt, no call skipped
    assert len(pab) == 2 and all(r["skips"] == 0 and r["skipped_fraction"] == 0 and r["pab_range"] == 2
                                 and r["psnr"] < 100 for r in pab)  # the broadcast attention changed the video
    pab_tea = [r for r in results["records"] if r["method"] == "pab+teacache"]  # TeaCache's threshold with PAB on
    assert len(pab_tea) == 2 and all(r["skipped_fraction"] > 0 and r["pab_range"] == 2 for r in pab_tea)
    assert "threshold" in pab_tea[0] and [a["method"] for a in results["aggregates"]].count("pab") == 1


def test_wan22_two_experts_through_compare(tmp_path):
    """Wan2.2's call-contract script (two experts): compare calibrates one LUT over both experts and
    plans with the switch guarded (the first two low-noise steps, 13 and 14 at 20 steps, shift 12);
    MagCache is the authors' (published T2V-A14B ratios, their retention over both experts)."""
    script = FIXTURES / "wan22" / "generate.py"
    args = [str(script), "--prompt", "ignored", "--sample_steps", "20", "--offload_model", "False"]
    text = OFFICIAL_LIKE_EXPERIMENT.format(integration="wan22", output="out").replace(
        "budgets: [0.2]", "budgets: [0.15]").replace("methods: [full, taocache]",
                                                     "methods: [full, taocache, magcache, teacache, hybrid, pab]")
    exp = write(tmp_path, text, "wan22.yaml")
    compare_in_a_process(tmp_path, exp, args)
    records = json.loads((tmp_path / "out" / "results.json").read_text())["records"]
    tao = [r for r in records if r["method"] == "taocache"]
    assert len(tao) == 2 and all(r["calls"] == 40 and r["skips"] == 3 for r in tao)
    skipped = {s for r in tao for s, *_ in r["skipped_schedule"]}
    assert skipped and not skipped & {13, 14}
    assert all(r["psnr"] > 20 for r in tao)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "the authors' MagCache for Wan2.2 t2v-A14B (t2v retention, 13 high-noise steps of 20)" in \
        results["meta"]["magcache_ratios"]
    mag = [r for r in records if r["method"] == "magcache"]
    assert len(mag) == 2 and all(r["skipped_fraction"] == pytest.approx(0.15) for r in mag)
    # their retention R0.4: the first 40% of each expert's calls computed (steps 0-4 and 13-15 here)
    assert not {s for r in mag for s, _ in r["skipped_schedule"]} & {0, 1, 2, 3, 4, 13, 14, 15}
    # TeaCache, fitted on the calibration prompts (nothing published for Wan2.2), per expert
    state = json.loads((tmp_path / "out" / "state" / "calibration.json").read_text())
    assert set(state["tea_coefficients"]) == {"0", "1"}  # a polynomial per expert
    assert "TeaCache fitted here (TeaCache publishes no Wan2.2 coefficients)" in results["meta"]["teacache_proxy"]
    tea = [r for r in records if r["method"] == "teacache"]
    assert len(tea) == 2 and all(r["skipped_calls"] > 0 for r in tea)
    assert not {s for r in tea for s, _ in r["skipped_schedule"]} & {0, 13}  # each expert's first call computes
    hybrid = [r for r in records if r["method"] == "hybrid"]
    assert len(hybrid) == 2 and all(r["skipped_calls"] > 0 for r in hybrid)
    pab = [r for r in records if r["method"] == "pab"]  # both experts' self-attention, per expert
    assert len(pab) == 2 and all(r["skipped_calls"] == 0 and r["pab_range"] == 2 for r in pab)
    # each expert's share of the skips (taocache plan says it; compare said only the total), the switch in meta
    assert results["meta"]["expert_switch"] == 13
    for r in tao + mag + tea:
        high = sum(s < 13 for s, _ in r["skipped_schedule"]) / 26  # 13 steps x 2 calls
        low = sum(s >= 13 for s, _ in r["skipped_schedule"]) / 14
        assert r["skipped_per_expert"] == {"high_noise": pytest.approx(high), "low_noise": pytest.approx(low)}
    assert tao[0]["skipped_per_expert"] == {"high_noise": pytest.approx(6 / 26), "low_noise": 0}  # window 10-12
    row = next(a for a in results["aggregates"] if a["method"] == "teacache")  # the mean over the prompts
    assert row["skipped_per_expert"] == {e: pytest.approx(sum(r["skipped_per_expert"][e] for r in tea) / 2)
                                         for e in ("high_noise", "low_noise")}
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| % calls skipped | % high / low-noise expert | LPIPS" in table
    assert "Two experts: high-noise steps 0-12, low-noise from step 13" in table
    assert "| 23.1 / 0.0% |" in table  # taocache's 3 skips, both streams, in the high-noise expert



def test_wan22_budget_no_window_fits_is_refused_before_the_calibration(tmp_path):
    """On Wan2.2 the check of the budgets waited for the calibration's LUT (20 full generations of the shipped
    experiment: hours on A14B) for plain arithmetic; Wan's schedule places the switch before it (walkthrough)."""

    script = FIXTURES / "wan22" / "generate.py"
    args = [str(script), "--prompt", "ignored", "--sample_steps", "20", "--offload_model", "False"]
    exp = write(tmp_path, OFFICIAL_LIKE_EXPERIMENT.format(integration="wan22", output="out").replace(
        "budgets: [0.2]", "budgets: [0.35]"), "wan22.yaml")
    driver = write(tmp_path, "import sys\nfrom taohooks import cli\nsys.argv = ['taocache']\n"
                             f"sys.exit(cli.main(['compare', {str(exp)!r}, '--', *{args!r}]))\n", "d.py")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("TAOHOOKS_")}
    res = run_python([str(driver)], cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode != 0
    assert "budgets[0]: taocache at 0.35 (7 of 20 steps): no contiguous window of 7 steps" in res.stderr, res.stderr
    assert "calibration, " not in res.stderr and not (tmp_path / "out" / "state").exists()


def test_wan22_ti2v_through_compare_with_an_image(tmp_path):
    """TI2V-5B (one model, per-token timestep) from an image: MagCache takes the authors' table for
    image-to-video, TeaCache is fitted (one model: one polynomial) on the per-token e0's last token."""
    script = FIXTURES / "wan22" / "generate.py"
    args = [str(script), "--task", "ti2v-5B", "--image", "in.jpg", "--prompt", "ignored", "--sample_steps", "10",
            "--offload_model", "False"]
    text = OFFICIAL_LIKE_EXPERIMENT.format(integration="wan22", output="out").replace(
        "methods: [full, taocache]", "methods: [full, magcache, teacache]")
    compare_in_a_process(tmp_path, write(tmp_path, text, "ti2v.yaml"), args)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "the authors' MagCache for Wan2.2 ti2v-5B-image (ti2v retention)" in results["meta"]["magcache_ratios"]
    rows = [r for r in results["records"] if r["method"] in ("magcache", "teacache")]
    assert len(rows) == 4 and all(r["calls"] == 20 and r["skipped_fraction"] == pytest.approx(0.2) for r in rows)
    state = json.loads((tmp_path / "out" / "state" / "calibration.json").read_text())
    assert isinstance(state["tea_coefficients"], list)  # one model: one polynomial

def test_wan22_per_clip_tasks_are_refused_by_compare(tmp_path, capsys):
    """S2V and Animate run one sampling loop per clip inside one generate(): compare refuses them from the
    command line, before the script starts, and (should that be bypassed) at the generation call."""

    script = FIXTURES / "wan22" / "generate.py"
    exp = write(tmp_path, OFFICIAL_LIKE_EXPERIMENT.format(integration="wan22", output="out"), "s2v.yaml")
    for task in ("s2v-14B", "animate-14B"):
        assert cli.main(["compare", str(exp), "--", str(script), "--task", task, "--sample_steps", "10"]) == 1
        err = capsys.readouterr().err
        assert f"--task {task} runs one sampling loop per clip inside one generation call" in err
    assert not (tmp_path / "out" / "runs").exists()
    driver = write(tmp_path, "import sys\nfrom taohooks import cli\nimport taohooks.compare.command as c\n"
                             "c._refuse_per_clip_tasks = lambda *a: None\nsys.argv = ['taocache']\n"
                             f"sys.exit(cli.main(['compare', {str(exp)!r}, '--', {str(script)!r}, '--task', 's2v-14B', "
                             "'--sample_steps', '10', '--offload_model', 'False']))\n", "d.py")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("TAOHOOKS_")}
    res = run_python([str(driver)], cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 2 and "wan.speech2video.WanS2V.generate runs one sampling loop per clip" in res.stderr


def test_changed_calibration_prompts_are_refused_on_resume(finished, tmp_path, launcher_state, capsys):
    import shutil

    shutil.copytree(finished[0] / "state", tmp_path / "out" / "state")
    shutil.copy(finished[0] / "experiment.json", tmp_path / "out")
    path = write(tmp_path, EXPERIMENT.replace("seed: 1002}", "seed: 1003}"))
    assert compare(path) == 2  # the launcher's one-line error, before any generation ran
    err = capsys.readouterr().err
    assert "calibration_prompts: " in err and "was calibrated on other calibration prompts (pair 3: 'a yellow square " \
        "moving right' seed 1002, this experiment lists 'a yellow square moving right' seed 1003)" in err
    assert not (tmp_path / "out" / "runs").exists()
    assert "runs already in" not in err  # before the script ran (it was said after the model loaded: review)


def test_budgets_that_round_alike_and_a_script_without_generation(tmp_path, launcher_state, capsys):
    path = write(tmp_path, EXPERIMENT.replace("budgets: [0.2, 0.3]", "budgets: [0.2, 0.24]"))
    assert compare(path) == 2  # said at the first generation call, when the step count is known
    assert "budgets[1]: 0.24 of 10 steps is 2 skipped steps, as 0.2 is" in capsys.readouterr().err
    idle = write(tmp_path, "print('no generation here')\n", "idle.py")
    assert cli.main(["compare", str(write(tmp_path, EXPERIMENT)), "--", str(idle)]) == 1
    err = capsys.readouterr().err
    assert f"taocache compare: error: {idle} ended without a generation call the 'testbed' integration" in err


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs" / "compare").glob("*.yaml")))
def test_shipped_experiments_load(name):
    from taohooks.compare.command import taocache_config_of
    from taohooks.compare.runner import check_before_run

    config = load_experiment(ROOT / "configs" / "compare" / name)
    assert config.output_dir.resolve().parent == (ROOT / "out").resolve()
    if config.taocache is not None:  # (an inline one would write OUTPUT/taocache.yaml)
        check_before_run(config, taocache_config_of(config)[1])


def test_under_torchrun_every_rank_runs_and_rank_0_writes(tmp_path):
    """``torchrun --nproc_per_node 2 -m taohooks.cli compare ...``: both ranks run every generation in the
    same order; only rank 0 writes, and the results equal a single process's."""
    import socket

    text = EXPERIMENT.replace("budgets: [0.2, 0.3]", "budgets: [0.3]")
    single, two = write(tmp_path, text, "single.yaml"), write(tmp_path, text.replace("output: out", "output: out2"),
                                                                 "two.yaml")
    script = [str(SCRIPT), "--model", "flow", "--steps", str(STEPS), "--out", str(tmp_path / "never.png")]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # under torchrun the script starts a process group (as Wan's generate.py does): the calibration, the
    # threshold and what is left to run are then rank 0's on every rank (broadcast)
    driver = write(tmp_path, "import runpy, sys\nfrom taohooks.runtime.distributed import init_from_environment\n"
                             "assert init_from_environment()\nsys.argv = sys.argv[1:]\n"
                             "runpy.run_path(sys.argv[0], run_name='__main__')\n", "driver.py")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("TAOHOOKS_")}
    runs = {}
    for name, launcher in (("single", ["-m", "taohooks.cli"]),
                           ("two", ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                                    "-m", "taohooks.cli"])):
        argv = script if name == "single" else [str(driver), *script]
        runs[name] = run_python([*launcher, "compare", str(single if name == "single" else two), "--", *argv],
                                cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert runs[name].returncode == 0, runs[name].stderr
    err = runs["two"].stderr
    assert "compare: rank 1/2 ran its 6 generations (rank 0 writes the results)" in err  # 2 x (full, tao, tea)
    assert err.count("compare: [") == runs["single"].stderr.count("compare: [")  # progress: rank 0 only
    one, both = (json.loads((tmp_path / out / "results.json").read_text()) for out in ("out", "out2"))
    assert stable(one)[0].keys() == stable(both)[0].keys()
    for a, b in zip(stable(one), stable(both)):
        assert {k: v for k, v in a.items() if k != "peak_memory_bytes"} == {k: v for k, v in b.items()
                                                                           if k != "peak_memory_bytes"}


def test_latents_recorded_where_the_script_decodes_them():
    """The final latents are read from the decode call's first argument (Wan: ``vae.decode(list)``; the
    pipelines: ``decode_latents(tensor)``), and the objects are exactly as before afterwards."""
    import types

    from taohooks.compare.targets import _pipeline_latents, _wan_latents

    class Pipeline:
        def decode_latents(self, latents):
            return latents * 2

    decoded = []
    vae = types.SimpleNamespace(decode=lambda zs: decoded.append(len(zs)) or [z + 1 for z in zs])
    original = vae.decode
    z = [torch.ones(4, 2, 3, 3), torch.zeros(4, 2, 3, 3)]
    with _wan_latents({"self": types.SimpleNamespace(vae=vae)}) as seen:
        out = vae.decode(z)
    assert decoded == [2] and torch.equal(out[0], z[0] + 1) and vae.decode is original
    assert seen[0].shape == (2, 4, 2, 3, 3) and torch.equal(seen[0][1], z[1])
    pipe = Pipeline()
    with _pipeline_latents({"self": pipe}) as seen:
        assert torch.equal(pipe.decode_latents(torch.ones(1, 4, 2, 3, 3)), 2 * torch.ones(1, 4, 2, 3, 3))
    assert torch.equal(seen[0], torch.ones(1, 4, 2, 3, 3)) and "decode_latents" not in vars(pipe)
    with _wan_latents({"self": types.SimpleNamespace()}) as seen:  # no VAE: nothing recorded
        pass
    assert seen == []


def test_a_partly_reused_call_counts_its_fraction():
    """A call where one of two prompts reused counts 0.5 skipped calls, in the total and per stream; the
    schedule lists the call."""
    from taohooks.compare.runner import Generation

    g = Generation(None, 1.0, 4, [(2, "cond"), (3, "cond"), (3, "uncond")], skipped_calls=2.5,
                   fractions=[1.0, 0.5, 1.0])
    record = g.record()
    assert record["skipped_calls"] == 2.5 and record["skipped_fraction"] == 2.5 / 4
    assert record["skipped_per_stream"] == {"cond": 1.5, "uncond": 1}
    assert record["skipped_schedule"] == [[2, "cond"], [3, "cond"], [3, "uncond"]]


def test_pab_groups_with_their_own_ranges(tmp_path, launcher_state, capsys):
    """``pab_groups:`` (the YAML pab: section's groups: a pattern and a range each) instead of the integration's
    self-attention with ``pab_range:``; a pattern that names no module stops the experiment at the first
    generation call, before any run; a malformed one before the script starts."""
    text = EXPERIMENT.replace("methods: [full, taocache, teacache]", "methods: [full, pab]").replace(
        "lpips: false", "lpips: false\npab_timesteps: [0, 1000]\n"
                        "pab_groups: [{pattern: 'blocks\\.[0-2]\\.attn', range: 3}, {pattern: 'blocks\\.[34]\\.attn', "
                        "range: 2}]")
    assert compare(write(tmp_path, text)) == 0
    records = json.loads((tmp_path / "out" / "results.json").read_text())["records"]
    pab = [r for r in records if r["method"] == "pab"]
    assert len(pab) == 2 and all(r["pab_groups"] == [{"pattern": "blocks\\.[0-2]\\.attn", "range": 3},
                                                     {"pattern": "blocks\\.[34]\\.attn", "range": 2}] for r in pab)
    assert all(r["psnr"] < 100 for r in pab)
    # recorded under the YAML's key (it was recorded, and said in a refusal, as the dataclass field range_); a folder
    # recorded so is the same experiment
    stored = tmp_path / "out" / "experiment.json"
    recorded = json.loads(stored.read_text())["pab_groups"]
    assert recorded == [{"pattern": "blocks\\.[0-2]\\.attn", "range": 3},
                        {"pattern": "blocks\\.[34]\\.attn", "range": 2}]
    stored.write_text(stored.read_text().replace('"range":', '"range_":'))
    assert compare(write(tmp_path, text)) == 0
    capsys.readouterr()
    assert compare(write(tmp_path, text.replace("range: 2", "range: 4"), "other.yaml")) == 2
    assert "this output folder holds runs made with pab_groups = " in capsys.readouterr().err
    bad = write(tmp_path, text.replace("blocks\\.[34]\\.attn", "blocks\\.[34]\\.attention").replace(
        "output: out", "output: out2"), "bad.yaml")
    assert compare(bad) == 2  # said at the first generation call (the launcher's exit status)
    err = capsys.readouterr().err
    assert "pab_groups[1].pattern: 'blocks\\\\.[34]\\\\.attention' matches no module of the VideoDiT" in err, err
    assert "(names look like 'blocks.0.attn', 'blocks.1.attn', 'blocks.2.attn', ...)" in err  # (not its embeddings)
    assert not (tmp_path / "out2" / "runs").exists()
    malformed = write(tmp_path, text.replace("blocks\\.[34]\\.attn", "blocks[").replace("output: out",
                                                                                       "output: out3"), "m.yaml")
    assert compare(malformed) == 1
    assert "pab_groups[1].pattern: not a valid regex" in capsys.readouterr().err


def test_methods_a_target_cannot_run_are_refused_before_the_script(tmp_path, monkeypatch):
    """An integration whose compare target names no attention modules nor a TeaCache proxy (none ships like
    that today; the check guards new ones): pab needs pab_groups:, teacache is refused."""
    import dataclasses

    from taohooks.compare import targets
    from taohooks.compare.command import taocache_config_of
    from taohooks.compare.runner import check_before_run

    bare = dataclasses.replace(targets.TARGETS["testbed"], attention=None, tea_probe=None, tea_published=None,
                               tea_source="no proxy here")
    monkeypatch.setitem(targets.TARGETS, "testbed", bare)
    config = load_experiment(write(tmp_path, EXPERIMENT.replace("methods: [full, taocache, teacache]",
                                                                "methods: [full, pab]")))
    with pytest.raises(ConfigError, match="pab is not yet available for the 'testbed' integration .*pab_groups:"):
        check_before_run(config, taocache_config_of(config)[1])
    config.pab_groups = [PABGroupConfig(r"blocks\.\d+\.attn", 2)]
    check_before_run(config, taocache_config_of(config)[1])
    config = load_experiment(write(tmp_path, EXPERIMENT, "tea.yaml"))
    with pytest.raises(ConfigError, match="teacache is not yet available for the 'testbed' integration: no proxy here"):
        check_before_run(config, taocache_config_of(config)[1])


def test_changed_run_settings_are_refused_on_resume(tmp_path, launcher_state, capsys, monkeypatch):
    """A stored run depends on more than its method and budget (here EasyCache's warm-up): a folder
    made with other settings is refused before any generation, not reused under the new settings, and
    before the script loads its model (it was refused at the first generation call: minutes on A14B)."""
    text = EXPERIMENT.replace("methods: [full, taocache, teacache]", "methods: [full, easycache]").replace(
        "budgets: [0.2, 0.3]", "budgets: [0.3]\neasycache_warmup: 2").replace(
        "  - {prompt: \"a green square moving up, with a static blue dot\", seed: 10001}\n", "")
    assert compare(write(tmp_path, text)) == 0
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "runs").rglob("*.safetensors")}
    capsys.readouterr()
    from taohooks.testbed.model import VideoDiT

    def no_model(*args, **kwargs):
        raise AssertionError("the script loaded its model")

    with monkeypatch.context() as patched:
        patched.setattr(VideoDiT, "from_pretrained", no_model)
        refused_before_the_model_loads(tmp_path, text, files, capsys)
    # what no run depends on (the prompt and seeds compare replaces, the output file) may differ: the folder is taken
    assert cli.main(["compare", str(tmp_path / "exp.yaml"), "--", str(SCRIPT), "--model", "flow", "--steps",
                     str(STEPS), "--prompt", "a cat", "--seeds", "1", "2", "--out=" + str(tmp_path / "other.png")]) == 0
    assert "; 2 of 2 runs already in " in capsys.readouterr().err  # nothing run again


def refused_before_the_model_loads(tmp_path, text, files, capsys):
    assert compare(write(tmp_path, text.replace("easycache_warmup: 2", "easycache_warmup: 5"))) == 2
    err = capsys.readouterr().err
    assert "easycache_warmup: this output folder holds runs made with easycache_warmup = 2, this experiment has 5" \
        in err and "taocache compare: " in err and "taocache-run" not in err  # the command the user ran
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "runs").rglob("*.safetensors")} == files
    exp = write(tmp_path, text)  # the same experiment, another script line
    assert cli.main(["compare", str(exp), "--", str(SCRIPT), "--model", "flow", "--steps", "12"]) == 2
    # the flag that changed, not both script lines whole (1 300 characters on Open-Sora-Plan: ospuser, 2026-11-28)
    assert "experiment.json: script: this output folder holds runs made with another script line: --steps 10 there, " \
           "12 here; use another output folder" in capsys.readouterr().err


def test_the_script_line_is_compared_without_the_flags_no_run_depends_on():
    from taohooks.compare.targets import target_for

    wan = target_for("wan22").comparable_script
    line = ["generate.py", "--task", "ti2v-5B", "--prompt", "a cat", "--base_seed", "-1", "--offload_model=True",
            "--save_file", "x.mp4", "--sample_steps", "40"]
    assert wan(line) == ["generate.py", "--task", "ti2v-5B", "--sample_steps", "40"]
    assert wan(["generate.py", "--prompt_extend_model", "m"]) == ["generate.py", "--prompt_extend_model", "m"]
    wan22 = target_for("wan22").comparable_script  # (its --size had no default here: review21)
    assert wan22(["g.py", "--size", "1280*720", "--task", "ti2v-5B"]) == ["g.py", "--task", "ti2v-5B"]
    osp = target_for("opensora_plan").comparable_script  # nargs='+': every value up to the next option
    assert osp(["s.py", "--text_prompt", "a", "b", "--num_frames", "65"]) == ["s.py", "--num_frames", "65"]
    assert wan(["g.py", "--prompt", "a cat", "-c", "cfg.yaml"]) == ["g.py", "-c", "cfg.yaml"]  # a short option ends it
    assert wan(["g.py", "--prompt", "-a cat, cinematic", "--size", "1"]) == ["g.py", "--size", "1"]  # (a value)
    assert wan(["g.py", "--prompt=a cat", "--save_file=my video.mp4", "--size", "1"]) == ["g.py", "--size", "1"]
    assert target_for("latte").comparable_script(["s.py", "--config", "c.yaml"]) == ["s.py", "--config", "c.yaml"]
    # a one-value flag takes one value: a positional after it stayed out of the comparison (left open, 2026-11-28)
    assert wan(["g.py", "--prompt", "a cat", "extra.yaml"]) == ["g.py", "extra.yaml"]
    testbed = target_for("testbed").comparable_script  # --prompt appends one value; --seeds takes many
    assert testbed(["s.py", "--out", "o.png", "p.yaml", "--seeds", "1", "2"]) == ["s.py", "p.yaml"]


def test_an_abbreviated_option_is_compared_as_the_option_it_names():
    """argparse takes ``--save_img`` for ``--save_img_path`` (allow_abbrev): a neutral flag written short was
    compared as a change, and ``--sample_st 40`` against ``--sample_steps 40`` as another script line."""
    from taohooks.compare.store import script_difference
    from taohooks.compare.targets import target_for

    wan22 = target_for("wan22").comparable_script  # (its --size had no default here: review21)
    assert wan22(["g.py", "--size", "1280*720", "--task", "ti2v-5B"]) == ["g.py", "--task", "ti2v-5B"]
    osp = target_for("opensora_plan").comparable_script
    assert osp(["s.py", "--save_img", "out/", "--text_p", "a", "b", "--num_fr", "65"]) == \
        ["s.py", "--num_frames", "65"]
    wan = target_for("wan").comparable_script
    assert wan(["g.py", "--base", "1", "--save_f=x.mp4", "--sample_st", "40"]) == ["g.py", "--sample_steps", "40"]
    assert wan(["g.py", "--sample_s", "40"]) == ["g.py", "--sample_s", "40"]  # ambiguous: left to the script
    assert target_for("wan22").comparable_script(["g.py", "--offload", "True", "--tts_", "x", "--tts_t", "y"]) == \
        ["g.py", "--tts_", "x", "--tts_text", "y"]  # (--tts_: --tts_text and two --tts_prompt_*, ambiguous)
    assert script_difference(wan(["g.py", "--sample_st", "40"]), wan(["g.py", "--sample_steps=50"])) == \
        "--sample_steps 40 there, 50 here"
    testbed = target_for("testbed").comparable_script  # the script's options unknown: compared as written
    assert testbed(["s.py", "--seed", "1"]) == ["s.py", "--seed", "1"]


def test_an_option_given_at_its_default_is_compared_as_not_given():
    """``--sample_solver unipc`` added to a Wan command line (unipc is generate.py's default) was taken for another
    script line (left open, 2026-11-28): an option given once at its parser's default is left out of the comparison;
    a default of None, a flag, another value or an option given twice are compared as written."""
    from taohooks.compare.targets import target_for

    wan = target_for("wan").comparable_script
    assert wan(["g.py", "--task", "t2v-1.3B", "--sample_solver", "unipc", "--ulysses_size=1", "--ring_size", "1.0"]) \
        == ["g.py", "--task", "t2v-1.3B", "--ring_size", "1.0"]  # (1.0: not an int, the script's parser refuses it)
    assert wan(["g.py", "--sample_sol", "unipc", "--size", "832*480"]) == ["g.py", "--size", "832*480"]
    assert wan(["g.py", "--sample_solver", "dpm++", "--sample_shift", "5"]) == \
        ["g.py", "--sample_solver", "dpm++", "--sample_shift", "5"]  # (--sample_shift's default is None)
    assert wan(["g.py", "--task", "t2v-14B", "--task", "t2v-1.3B"]) == ["g.py", "--task", "t2v-14B", "--task",
                                                                       "t2v-1.3B"]
    assert wan(["g.py", "--t5_cpu", "--sample_solver", "unipc", "x.yaml"]) == ["g.py", "--t5_cpu", "x.yaml"]
    wan22 = target_for("wan22").comparable_script  # (its --size had no default here: review21)
    assert wan22(["g.py", "--size", "1280*720", "--task", "ti2v-5B"]) == ["g.py", "--task", "ti2v-5B"]
    osp = target_for("opensora_plan").comparable_script
    assert osp(["s.py", "--num_sampling_steps", "50", "--sample_method", "PNDM"]) == ["s.py"]
    assert osp(["s.py", "--num_sampling_steps", "100"]) == ["s.py", "--num_sampling_steps", "100"]


def test_latte_config_file_is_compared_by_content(tmp_path, launcher_state, capsys):
    """Latte's settings live in its ``--config`` YAML: a copy elsewhere (another path, the same settings) was
    refused as another script line, and an edit at the same path that no call setting shows (its VAE:
    ``enable_vae_temporal_decoder``) went unseen. The folder now records the YAML's settings (less the prompts,
    the output path and the unused seed); a folder recorded before compares the path, as it did."""
    import yaml

    sample = dict(num_sampling_steps=10, guidance_scale=7.5, seed=0, save_img_path="videos/", text_prompt=["x"],
                  video_length=4, image_size=[16, 16], enable_vae_temporal_decoder=True)
    (tmp_path / "sample.yaml").write_text(yaml.safe_dump(sample))
    out = tmp_path / "out"
    (out / "runs" / "full").mkdir(parents=True)
    (out / "runs" / "full" / "0.safetensors").write_bytes(b"")  # (the folder holds work)
    settings = {k: v for k, v in sample.items() if k not in ("seed", "save_img_path", "text_prompt")}
    recorded = {"script": [str(LATTE), "--config", "sample.yaml"], "integration": "latte",
                "calibration.sampler": None, "script_config": settings}
    (out / "experiment.json").write_text(json.dumps(recorded))
    exp = write(tmp_path, OFFICIAL_LIKE_EXPERIMENT.format(integration="latte", output="out"), "latte.yaml")

    def run(config: dict, name: str) -> int:
        (tmp_path / name).write_text(yaml.safe_dump(config))
        with pytest.MonkeyPatch.context() as patched:
            patched.chdir(tmp_path)
            return cli.main(["compare", str(exp), "--", str(LATTE), "--config", name])

    assert run({**sample, "enable_vae_temporal_decoder": False}, "sample.yaml") == 2  # edited in place
    err = capsys.readouterr().err
    assert "experiment.json: script_config.enable_vae_temporal_decoder: this output folder holds runs made with a " \
           "config file of the script giving enable_vae_temporal_decoder: True; this experiment's gives False; use " \
           "another output folder" in err
    assert run({**sample, "guidance_scale": 5.0}, "copy.yaml") == 2
    assert "giving guidance_scale: 7.5; this experiment's gives 5.0" in capsys.readouterr().err
    # a copy elsewhere with other prompts, output path and seed: the same experiment (refused here only by the
    # setting this test records differently, after the script line and its config passed)
    recorded["calibration.error_horizon"] = -1
    (out / "experiment.json").write_text(json.dumps(recorded))
    assert run({**sample, "text_prompt": ["y"], "save_img_path": "elsewhere/", "seed": 3}, "copy.yaml") == 2
    err = capsys.readouterr().err
    assert "calibration.error_horizon" in err and "script" not in err.replace("taocache compare", ""), err
    # a folder recorded before the YAML's settings were: its path is compared, as it was
    del recorded["script_config"], recorded["calibration.error_horizon"]
    (out / "experiment.json").write_text(json.dumps(recorded))
    assert run(sample, "copy.yaml") == 2
    assert "another script line: --config sample.yaml there, copy.yaml here" in capsys.readouterr().err


def test_a_budget_no_taocache_plan_fits_is_said_before_the_runs(tmp_path, launcher_state, capsys):
    path = write(tmp_path, EXPERIMENT.replace("methods: [full, taocache, teacache]", "methods: [full, taocache]")
                 .replace("budgets: [0.2, 0.3]", "budgets: [0.2, 0.8]"))
    assert compare(path) == 2
    err = capsys.readouterr().err
    assert "budgets[1]: taocache at 0.8 (8 of 10 steps): no contiguous window" in err
    assert not (tmp_path / "out" / "runs").exists() and not (tmp_path / "out" / "experiment.json").exists()
    assert "calibrating" not in err and not (tmp_path / "out" / "state").exists()  # before the calibration


def test_teacache_added_after_a_calibration_without_it_is_recorded_then(finished, tmp_path, launcher_state, capsys):
    """Adding a method keeps the folder (README): what it calibrates is recorded on the same calibration prompts,
    the LUT and the stored runs kept; the results equal a run that listed it from the start (it was refused)."""
    text = EXPERIMENT.replace("methods: [full, taocache, teacache]", "methods: [full, taocache]")
    assert compare(write(tmp_path, text)) == 0
    lut = (tmp_path / "out" / "state" / "calibration_lut.safetensors").read_bytes()
    capsys.readouterr()
    assert compare(write(tmp_path, EXPERIMENT)) == 0
    err = capsys.readouterr().err
    assert "was calibrated without teacache's polynomial (a method needing it was added to methods since): " \
           "recording it on the same 3 calibration prompts" in err and "recorded 'a yellow square moving right' " \
           "seed 1002 (3/3)" in err
    assert (tmp_path / "out" / "state" / "calibration_lut.safetensors").read_bytes() == lut
    assert stable(json.loads((tmp_path / "out" / "results.json").read_text())) == stable(finished[1])


def test_weights_fingerprint_and_call_settings():
    """What the folder check adds to the script line: the weights (one changed element of a sampled position
    changes it; bf16 is read as its bytes) and the call's scalar settings (prompt and seed left out)."""
    from taohooks.taocache.identity import SHARDED, call_settings, weights_fingerprint

    torch.manual_seed(0)
    a, b = torch.nn.Linear(100, 50), torch.nn.Linear(100, 50)
    b.load_state_dict(a.state_dict())
    assert weights_fingerprint(a) == weights_fingerprint(b) and len(weights_fingerprint(a)) == 16
    with torch.no_grad():
        b.weight[-1, -1] += 1e-3  # the last element is always sampled
    assert weights_fingerprint(a) != weights_fingerprint(b)
    assert weights_fingerprint(a, b) != weights_fingerprint(b, a)  # which expert holds which
    assert weights_fingerprint(a.to(torch.bfloat16)) != weights_fingerprint(b.to(torch.bfloat16))
    big = torch.nn.Module()  # above 2**24 elements float positions rounded past the end (an IndexError)
    big.weight = torch.nn.Parameter(torch.zeros(2 ** 24 + 3))
    before = weights_fingerprint(big)
    with torch.no_grad():
        big.weight[-1] = 1.0
    assert weights_fingerprint(big) != before
    big.weight.to_local = lambda: big.weight  # a DTensor's: a shard, said so, not hashed
    assert weights_fingerprint(big) == SHARDED
    args = {"prompt": "a cat", "seed": 3, "guide_scale": (3.0, 4.0), "shift": 5.0, "n_prompt": "", "offload": False,
            "size": (832, 480), "latents": None, "generator": torch.Generator(), "image": torch.zeros(1),
            "offload_model": True, "kwargs": {"guidance": 5.0, "seed": 4, "noise": torch.zeros(1)}}
    assert call_settings(args, ("prompt", "seed")) == {
        "guide_scale": "(3.0, 4.0)", "kwargs.guidance": "5.0", "latents": "None", "n_prompt": "''",
        "offload": "False", "shift": "5.0", "size": "(832, 480)"}  # offload_model places the model: left out


@pytest.mark.parametrize("left", ["results.md", "strip.png", "notes.txt"])
def test_a_folder_holding_an_experiment_s_results_is_not_taken_over(tmp_path, left):
    """With results.json deleted, its results.md and pictures were overwritten by another experiment's (review,
    2026-11-28); a file of the user's own (notes) does not make a folder an experiment's."""
    from taohooks.compare.store import RunStore

    RunStore(tmp_path).check_experiment({"script": ["a.py"]})
    (tmp_path / left).write_text("kept")
    if left == "notes.txt":
        RunStore(tmp_path).check_experiment({"script": ["b.py"]})
    else:
        with pytest.raises(ConfigError, match=r"script: this output folder holds runs made with another script line"):
            RunStore(tmp_path).check_experiment({"script": ["b.py"]})
    assert (tmp_path / left).read_text() == "kept"


def test_a_folder_check_names_the_entry_of_a_setting_that_differs(tmp_path):
    from taohooks.compare.store import RunStore

    store = RunStore(tmp_path)
    store.check_experiment({"calibration.sampler": None, "call": {"guidance": "5.0", "shift": "3.0"}})
    store.put_state("calibration", {})  # (a folder holding nothing is no other experiment's)
    with pytest.raises(ConfigError, match=r"call.guidance: this output folder holds runs made with call.guidance = "
                                          r"5.0, this experiment has \(not given\)"):  # (no repr of a repr)
        store.check_experiment({"calibration.sampler": None, "call": {"shift": "3.0"}})


def test_an_experiment_and_a_taocache_config_given_for_each_other_say_so(tmp_path):
    """Each names the command it belongs to (they said `prompts: unknown key` / `lut: unknown key`)."""
    from taohooks.config import load_config

    for path in sorted((ROOT / "configs" / "compare").glob("*.yaml")):  # (those naming a taocache: config were
        # taken for bench configs: "run `taocache bench configs/compare/latte.yaml`")
        with pytest.raises(ConfigError, match=rf"{path.name}: this is a `taocache compare` experiment; run `taocache "
                                              rf"compare \S+{path.name} -- SCRIPT ARGS...`"):
            load_config(path)
    with pytest.raises(ConfigError, match="wan.yaml: this is a TaoCache config \\(for --taocache / taocache-run\\); an "
                                          "experiment names it as taocache: FILE"):
        load_experiment(ROOT / "configs" / "wan.yaml")
    with pytest.raises(ConfigError, match="budjets: unknown key"):  # a typo in an experiment is still the typo
        load_experiment(write(tmp_path, EXPERIMENT.replace("budgets:", "budjets:")))


def test_taocache_check_checks_an_experiment_as_compare_does_before_the_script(tmp_path, capsys):
    """`taocache check EXPERIMENT.yaml` refused to check it ("this is a `taocache compare` experiment"), though the
    README says the experiment is validated like every config (fresh-machine check, 2026-11-28). Nothing written."""
    for path in sorted((ROOT / "configs" / "compare").glob("*.yaml")):
        existed = load_experiment(path).output_dir.exists()  # (make compare-demo makes one)
        assert cli.main(["check", str(path)]) == 0, path
        out = capsys.readouterr().out
        assert out.startswith("# a taocache compare experiment: valid") and "\nmethods:" in out, path
        assert "evaluation prompt(s)" in out and "calibration: " in out and "# output: " in out
        assert load_experiment(path).output_dir.exists() == existed
    path = write(tmp_path, EXPERIMENT)
    assert cli.main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "# TaoCache config: inline (written to " in out and "integration testbed)" in out
    assert "# 2 evaluation prompt(s) x 3 method(s) x 2 budget(s); calibration: taocache's LUT and teacache's " \
           "polynomial, on 3 calibration prompts, in the output folder" in out
    assert f"# output: {tmp_path / 'out'} (new)" in out and not (tmp_path / "out").exists()
    # a pipeline-picked target (diffusers, VideoSys): its calibration is known at the first call (it said "teacache's
    # polynomial" for a diffusers Latte experiment, whose TeaCache is the authors', published: review17)
    assert cli.main(["check", str(ROOT / "configs" / "compare" / "diffusers_wan.yaml")]) == 0
    assert "calibration: decided at the first generation call, by the pipeline the script calls (published " \
           "coefficients where its authors give them); at most taocache's LUT, " in capsys.readouterr().out
    # pab_groups said by their YAML keys (check printed, and results.json recorded, the field range_)
    grouped = EXPERIMENT.replace("methods: [full, taocache, teacache]", "methods: [full, pab]") + \
        "pab_groups: [{pattern: 'blocks\\.0\\.attn', range: 3}]\n"
    assert cli.main(["check", str(write(tmp_path, grouped, "g.yaml"))]) == 0
    out = capsys.readouterr().out
    assert "  range: 3" in out and "range_" not in out
    # a misspelled key is said as compare says it (it was taken for a TaoCache config's: "prompts: unknown key")
    assert cli.main(["check", str(write(tmp_path, EXPERIMENT.replace("budgets:", "budjets:"), "t.yaml"))]) == 1
    assert "t.yaml: budjets: unknown key; did you mean 'budgets'?" in capsys.readouterr().err
    # what compare refuses before the script, check refuses: a switch the integration's TeaCache has not
    assert cli.main(["check", str(write(tmp_path, EXPERIMENT + "teacache_use_ret_steps: true\n", "r.yaml"))]) == 1
    assert "r.yaml: teacache_use_ret_steps: true selects the authors' use_ret_steps variant" in capsys.readouterr().err


def test_an_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(ConfigError, match=f"exp.yaml: output: {tmp_path / 'out'} is a file; expected the "):
        load_experiment(write(tmp_path, EXPERIMENT))


def test_budgets_no_method_runs_at_are_not_checked(tmp_path, launcher_state, capsys):
    """methods: [full] at 10 steps with the default budgets (0.04 and 0.08 both round to 0 skips there): nothing
    runs at a budget, so nothing about them is refused (it was, naming a key the experiment does not write)."""
    text = EXPERIMENT.replace("methods: [full, taocache, teacache]", "methods: [full]").replace(
        "budgets: [0.2, 0.3]\n", "")
    assert compare(write(tmp_path, text)) == 0, capsys.readouterr().err
    assert len(json.loads((tmp_path / "out" / "results.json").read_text())["records"]) == 2


def test_a_checkpoint_replaced_at_the_same_path_is_refused(tmp_path, launcher_state, capsys):
    """The script line is the same, the weights are not: the folder's references, runs and calibration are of
    the old model, so the run is refused naming the weights (it was mixed in silently)."""
    import shutil

    weights = tmp_path / "model.safetensors"
    shutil.copy(ROOT / "taohooks" / "testbed" / "weights" / "flow.safetensors", weights)
    text = EXPERIMENT.replace("methods: [full, taocache, teacache]", "methods: [full]").replace(
        "budgets: [0.2, 0.3]", "budgets: [0.2]")
    run = ["compare", str(write(tmp_path, text)), "--", str(SCRIPT), "--model", str(weights), "--steps",
           str(STEPS), "--out", str(tmp_path / "never.png")]
    assert cli.main(run) == 0
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "runs").rglob("*.safetensors")}
    shutil.copy(ROOT / "taohooks" / "testbed" / "weights" / "flow-lognormal.safetensors", weights)
    capsys.readouterr()
    assert cli.main(run) == 2
    assert "weights: this output folder holds runs made with weights = " in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "runs").rglob("*.safetensors")} == files



def test_a_folder_of_the_earlier_weights_fingerprint_resumes(tmp_path, launcher_state, capsys):
    """Folders recorded by commits f341df4 to b87ec07 hold the weights fingerprint at float positions
    (3c4d8aa4e40b0c3a for the bundled flow weights, as that code computed it): the same weights, refused as other
    ones, and the advice (delete the folder) threw its stored runs away (compat walkthrough)."""
    text = EXPERIMENT.replace("methods: [full, taocache, teacache]", "methods: [full]").replace(
        "budgets: [0.2, 0.3]", "budgets: [0.2]")
    assert compare(write(tmp_path, text)) == 0
    record = tmp_path / "out" / "experiment.json"
    for weights, code in (("3c4d8aa4e40b0c3a", 0), ("3c4d8aa4e40b0c3b", 2)):
        record.write_text(json.dumps({**json.loads(record.read_text()), "weights": weights}))
        capsys.readouterr()
        assert compare(write(tmp_path, text)) == code
        assert ("2 of 2 runs already in" if code == 0 else "weights: this output folder holds runs made with "
                "weights = '3c4d8aa4e40b0c3b'") in capsys.readouterr().err


def test_a_generator_argument_is_seeded_per_run():
    """Latte / Open-Sora-Plan (no seed argument): a generator the script passes is replaced by one seeded
    with the run's seed, so the reference and the cached runs of a prompt draw the same noise."""
    import inspect

    from taohooks.compare.experiment import PromptEntry
    from taohooks.compare.runner import Experiment
    from taohooks.compare.targets import TARGETS

    def pipeline(prompt, generator=None):
        return None

    experiment = Experiment.__new__(Experiment)
    experiment.target = TARGETS["latte"]
    experiment._bound = inspect.signature(pipeline).bind("x", generator=torch.Generator().manual_seed(0))
    draws = [torch.randn(4, generator=experiment._arguments_for(PromptEntry("p", 5)).arguments["generator"])
             for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    assert torch.equal(draws[0], torch.randn(4, generator=torch.Generator().manual_seed(5)))


def test_fixed_latents_are_refused():
    """A pipeline call with latents= would start every run from the same noise, whatever its seed: refused,
    naming the argument; latents=None (the pipeline draws them) is the normal call."""
    from types import SimpleNamespace

    from taohooks.compare.runner import Experiment
    from taohooks.compare.targets import TARGETS

    experiment = Experiment.__new__(Experiment)
    experiment.target = TARGETS["latte"]
    experiment.config = SimpleNamespace(source="exp.yaml")
    experiment._check_arguments("pipe", {"prompt": "x", "latents": None})
    for latents in (torch.zeros(1, 4, 2, 8, 8), [torch.zeros(4, 2, 8, 8)]):
        with pytest.raises(ConfigError, match="command line: SCRIPT: the script passes latents= to pipe: every run"):
            experiment._check_arguments("pipe", {"prompt": "x", "latents": latents})


def test_a_folder_holding_only_its_experiment_json_is_taken_and_one_with_results_is_not(tmp_path):
    """A first call that failed leaves experiment.json alone: the corrected experiment takes the folder. One whose
    runs/ were deleted but whose results.json is there stays its experiment's (review, 2026-11-28)."""
    from taohooks.compare.store import RunStore

    store = RunStore(tmp_path)
    store.check_experiment({"script": ["s.py", "--broken"]})
    (tmp_path / "taocache.yaml").write_text("integration: testbed\n")
    (tmp_path / ".DS_Store").write_text("")  # (a file of the user's, not the experiment's: review 2026-11-28)
    store.check_experiment({"script": ["s.py"]})  # taken: nothing of the first is stored
    assert json.loads((tmp_path / "experiment.json").read_text()) == {"script": ["s.py"]}
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds runs made with another script line: script s.py there, t.py here"):
        store.check_experiment({"script": ["t.py"]})


def test_a_changed_script_line_is_said_by_its_flags():
    from taohooks.compare.store import script_difference

    base = ["s.py", "--model_path", "w", "--guidance_scale", "7.5", "--enable_tiling", "--size=64"]
    assert script_difference(base, ["s.py", "--model_path", "w", "--guidance_scale", "5.0", "--enable_tiling",
                                    "--size=64"]) == "--guidance_scale 7.5 there, 5.0 here"
    assert script_difference(base, ["s.py", "--model_path", "w", "--guidance_scale", "7.5", "--size=32", "--fps",
                                    "8"]) == ("--enable_tiling (given) there, (not given) here; --size 64 there, 32 "
                                              "here; --fps (not given) there, 8 here")
    assert script_difference(["s.py", "a", "b"], ["s.py", "b", "a"]) == "(positional) a b there, b a here"
    assert script_difference(["s.py", "--x", "1", "--y"], ["s.py", "--y", "--x=1"]) == \
        "the same options written otherwise ('--x 1 --y' there, '--y --x=1' here: compared word for word)"
    # a short option is an option (its change was said as the option before it's); an append option says each value
    assert script_difference(["s.py", "--steps", "10", "-n", "4"], ["s.py", "--steps", "10", "-n", "5"]) == \
        "-n 4 there, 5 here"
    assert script_difference(["s.py", "--x", "a", "--x", "b"], ["s.py", "--x", "a"]) == "--x a b there, a here"
    assert script_difference(["s.py", "--shift", "-3"], ["s.py", "--shift", "-2"]) == "--shift -3 there, -2 here"


def test_a_folder_from_before_a_setting_was_recorded_is_refused_as_such(tmp_path):
    """experiment.json written by an earlier taohooks lacks the newer keys: its runs cannot be checked, and the
    refusal says so (not "made with X = None")."""
    from taohooks.compare.store import RunStore

    store = RunStore(tmp_path)
    store.check_experiment({"script": ["s.py"]})
    store.put_state("calibration", {})  # (a folder holding nothing is no other experiment's)
    store.check_experiment({"script": ["s.py"]})  # the same: accepted
    with pytest.raises(ConfigError, match="made by an earlier taohooks, which did not record easycache_warmup"):
        store.check_experiment({"script": ["s.py"], "easycache_warmup": 2})
    with pytest.raises(ConfigError, match="holds runs made with another script line: script s.py there, t.py here"):
        store.check_experiment({"script": ["t.py"]})
    # the first compare's folders lack about 20 settings: said as such, and --report where it has results to report
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"did not record calibration.error_horizon \(this experiment has 16\) nor 2 "
                                          r"other setting\(s\) this one records; .*; taocache compare --report "):
        store.check_experiment({"script": ["s.py"], "calibration.error_horizon": 16, "weights": "w", "call": {}})


def test_one_writer_per_output_folder(tmp_path, launcher_state, capsys):
    """A second compare on a folder being written is refused before its script runs, naming the first; the lock
    goes with the run that held it, and one left by a process that no longer runs is taken over."""
    import json as _json
    import subprocess
    import sys

    from taohooks.compare.store import LOCK_NAME, folder_lock

    out = tmp_path / "out"
    with folder_lock(out) as lock:
        holder = _json.loads(lock.read_text())
        assert holder["pid"] == __import__("os").getpid()
        with pytest.raises(ConfigError, match=f"another taocache compare \\(pid {holder['pid']} on"):
            with folder_lock(out):
                pass
        path = write(tmp_path, EXPERIMENT.replace("methods: [full, taocache, teacache]", "methods: [full]"))
        assert compare(path) == 1
        assert "is writing" in capsys.readouterr().err and not (out / "runs").exists()
    assert (out / LOCK_NAME).read_text() == ""  # released
    # a run killed while holding it (SIGKILL: no finally) leaves no lock: the kernel's goes with its process
    subprocess.run([sys.executable, "-c", "import os, signal, sys; from taohooks.compare.store import folder_lock\n"
                    f"with folder_lock({str(out)!r}): os.kill(os.getpid(), signal.SIGKILL)"], check=False)
    assert "pid" in (out / LOCK_NAME).read_text()
    with folder_lock(out):  # taken, though the file names the killed process
        assert _json.loads((out / LOCK_NAME).read_text())["pid"] == __import__("os").getpid()
    # even one naming this very pid (a restarted container) or another host
    (out / LOCK_NAME).write_text(_json.dumps({"pid": __import__("os").getpid(), "host": "node17"}))
    with folder_lock(out):
        pass


def test_the_first_timed_run_of_a_process_comes_after_a_warm_up(tmp_path, launcher_state, capsys):
    """With nothing run before it (no calibration: methods [full]), the first timed generation is preceded by one
    untimed one (a process's first generation times slower); the device that timed each run is recorded, and a
    table whose runs were timed on several devices says so."""
    import json as _json

    from taohooks.compare.report import markdown_table

    path = write(tmp_path, EXPERIMENT.replace("methods: [full, taocache, teacache]", "methods: [full]"))
    assert compare(path) == 0
    err = capsys.readouterr().err
    results = _json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["meta"]["devices"] == ["cpu"] and all(r["device"] == "cpu" for r in results["records"])
    assert "compare: calibrating" not in err and err.count("one untimed full-step generation") == 1
    assert "compare: 2 prompts x (full), no method run at the budgets, 10 steps" in err  # (said "x 2 budgets": review)
    results["meta"]["devices"] = ["NVIDIA H100 80GB HBM3", "NVIDIA H200"]
    assert "timed on 2 devices, NVIDIA H100 80GB HBM3, NVIDIA H200: the speedups mix them" in markdown_table(results)


def test_a_method_added_with_its_own_setting_keeps_the_folder(tmp_path, launcher_state, capsys):
    """A method's own setting is recorded only while the method is listed: adding easycache (warm-up 2) or
    setting magcache_k without magcache reuses the stored runs; changing the added method's setting is refused."""
    text = EXPERIMENT.replace("methods: [full, taocache, teacache]", "methods: [full]").replace(
        "  - {prompt: \"a green square moving up, with a static blue dot\", seed: 10001}\n", "")
    assert compare(write(tmp_path, text)) == 0
    assert compare(write(tmp_path, text + "magcache_k: 3\n")) == 0
    added = text.replace("methods: [full]", "methods: [full, easycache]\neasycache_warmup: 2")
    assert compare(write(tmp_path, added)) == 0
    capsys.readouterr()
    assert compare(write(tmp_path, added.replace("easycache_warmup: 2", "easycache_warmup: 3"))) == 2
    assert "holds runs made with easycache_warmup = 2, this experiment has 3" in capsys.readouterr().err
    assert compare(write(tmp_path, text)) == 0  # easycache dropped again: the reference runs are reused


def test_report_names_a_corrupt_results_file(tmp_path):
    from taohooks.compare.report import load_results

    (tmp_path / "results.json").write_text('{"meta": ')
    with pytest.raises(ValueError, match="results.json: not a readable JSON file"):
        load_results(tmp_path)


def test_the_named_configs_lut_and_plan_are_not_the_launchers_to_check(tmp_path, launcher_state):
    """compare calibrates in its own folder and plans per budget; the launcher's check of the config's plan and LUT
    (a budget without a lut:, a LUT that cannot be written) refused such a config under compare (review, 2026-11-27)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    for name, lut in (("nolut", ""), ("blocked", f"lut: {blocker / 'l.safetensors'}\n")):
        write(tmp_path, f"integration: testbed\nmodel_id: testbed-flow\n{lut}plan: {{budget: 0.16}}\n", f"{name}.yaml")
        text = EXPERIMENT.replace("integration: testbed\nmodel_id: testbed-flow\n", f"taocache: {name}.yaml\n").replace(
            "methods: [full, taocache, teacache]", "methods: [full, taocache]").replace(
            "budgets: [0.2, 0.3]", "budgets: [0.2]").replace("output: out", f"output: out_{name}")
        assert compare(write(tmp_path, text, f"exp_{name}.yaml")) == 0, name
        assert (tmp_path / f"out_{name}" / "results.json").is_file()


def test_a_scripts_own_error_keeps_its_traceback_and_compares_findings_stay_one_line(tmp_path, launcher_state,
                                                                                    capsys):
    """The script's own error was said in one line under compare (no traceback: where it failed was lost);
    compare's findings about what the script returned stay one line (walkthrough, 2026-11-27)."""
    from taohooks.compare.errors import CompareError
    from taohooks.compare.targets import TARGETS

    broken = write(tmp_path, "def helper():\n    raise RuntimeError('the script failed here')\n\nhelper()\n",
                   "broken.py")
    assert cli.main(["compare", str(write(tmp_path, EXPERIMENT)), "--", str(broken)]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in helper" in err
    assert "RuntimeError: the script failed here" in err
    with pytest.raises(CompareError, match="expected the generation to return a video tensor, got str"):
        TARGETS["testbed"].video("not a video")
    finding = write(tmp_path, "from taohooks.compare.errors import CompareError\nraise CompareError('found')\n",
                    "finding.py")
    assert cli.main(["compare", str(write(tmp_path, EXPERIMENT)), "--", str(finding)]) == 1
    err = capsys.readouterr().err
    assert "taocache compare: error: found" in err and "Traceback" not in err


# ---------------------------------------------------------------------------- walkthrough, 2026-11-27 (compare)
def test_a_changed_search_setting_is_refused_when_every_run_is_stored(tmp_path, launcher_state, capsys):
    """With every run stored, a raised search_iterations (the natural answer to 'could not meet the budget') was
    taken without a word, and results.json reported the setting no threshold was matched with."""
    text = EXPERIMENT.replace("methods: [full, taocache, teacache]", "methods: [full, teacache]").replace(
        "budgets: [0.2, 0.3]", "budgets: [0.2]").replace(
        "  - {prompt: \"a green square moving up, with a static blue dot\", seed: 10001}\n", "")
    assert compare(write(tmp_path, text)) == 0
    results = (tmp_path / "out" / "results.json").read_text()
    capsys.readouterr()
    assert compare(write(tmp_path, text.replace("search_iterations: 4", "search_iterations: 6"))) == 2
    err = capsys.readouterr().err
    assert "search_iterations: " in err and "holds the teacache@2of10 threshold matched with search_iterations = 4, " \
                                           "this experiment has 6; use another output folder" in err
    assert (tmp_path / "out" / "results.json").read_text() == results
    # the message names the setting that changed (it always named search_prompts)
    assert compare(write(tmp_path, text.replace("search_prompts: 1", "search_prompts: 2"))) == 2
    assert "search_prompts: " in capsys.readouterr().err


def test_a_search_at_another_budget_reuses_the_thresholds_measured_at_the_first(finished):
    """TeaCache's skipped fraction at a threshold does not depend on the budget: each budget's search measured the
    same thresholds again (same generations on the same prompts)."""
    import re as _re

    measured = {}
    for label, threshold in _re.findall(r"compare: (teacache@\d+of10): threshold (\S+) skips", finished[2]):
        measured.setdefault(label, []).append(threshold)
    assert measured["teacache@2of10"] and not set(measured["teacache@2of10"]) & set(measured.get("teacache@3of10", []))
    assert _re.search(r"compare: teacache@3of10: searching .*; \d+ thresholds measured before \(here or at another "
                      r"budget\), kept", finished[2])


def test_method_settings_equal_to_their_default_and_ret_steps_where_it_means_nothing(tmp_path):
    from types import SimpleNamespace

    from taohooks.compare.runner import Experiment, check_before_run
    from taohooks.config import TaoCacheConfig

    base = EXPERIMENT.replace("methods: [full, taocache, teacache]", "methods: [full, magcache]")
    experiment = Experiment.__new__(Experiment)
    experiment.tao, experiment.target = TaoCacheConfig(integration="testbed"), __import__(
        "taohooks.compare.targets", fromlist=["TARGETS"]).TARGETS["testbed"]
    experiment.loop = SimpleNamespace(steps=10)
    for line, k in (("magcache_k: 2", 2), ("magcache_k: 3", 3), ("", None)):  # recorded as written
        experiment.config = load_experiment(write(tmp_path, base + line + "\n"))
        assert experiment._run_settings()["magcache_k"] == k
        assert experiment._alike_settings() == {"magcache_k": (None, 2), "magcache_retention": (None, 0.2)}
    config = load_experiment(write(tmp_path, EXPERIMENT + "teacache_use_ret_steps: true\n"))
    with pytest.raises(ConfigError, match="teacache_use_ret_steps: true selects the authors' use_ret_steps variant "
                                          "of their Wan2.1 TeaCache; the 'testbed' integration's teacache has no"):
        check_before_run(config, TaoCacheConfig(integration="testbed"))


def test_prompt_file_seed_after_a_space(tmp_path, capsys):
    from taohooks.runtime import messages

    head = EXPERIMENT.split("prompts:\n")[0]
    rest = "calibration_prompts:" + EXPERIMENT.split("calibration_prompts:")[1]
    (tmp_path / "mixed.txt").write_text("a red circle moving left\t10000\na green square moving up 10001\n")
    with pytest.raises(ConfigError, match=r"line 2: ends in 10001 after a space, where the other seeded lines have "
                                          r"a TAB"):
        load_experiment(write(tmp_path, head + "prompts: mixed.txt\n" + rest))
    messages.forget()
    (tmp_path / "spaces.txt").write_text("a red circle moving left 10000\na green square moving up 10001\n")
    config = load_experiment(write(tmp_path, head + "prompts: spaces.txt\n" + rest))
    assert config.evaluation_prompts()[0].prompt == "a red circle moving left 10000"
    assert "line 1 ends in 10000 after a space: taken as part of the prompt, with seed 0" in capsys.readouterr().err


def test_an_output_below_a_file_and_report_with_more_arguments(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match=r"output: .*afile/sub cannot be made: .*afile is a file"):
        load_experiment(write(tmp_path, EXPERIMENT.replace("output: out", "output: afile/sub")))
    assert cli.main(["compare", str(write(tmp_path, EXPERIMENT)), "--report", str(tmp_path)]) == 1
    assert "runs nothing: give it alone, without an experiment YAML" in capsys.readouterr().err


def test_budget_edge_cases_are_said_at_the_first_call(tmp_path, launcher_state, capsys):
    methods = "methods: [full, taocache, teacache]"
    assert compare(write(tmp_path, EXPERIMENT.replace("budgets: [0.2, 0.3]", "budgets: [0.2, 0.99]"))) == 2
    err = capsys.readouterr().err
    assert "budgets[1]: 0.99 of 10 steps skips every step" in err and "give a fraction below 0.9" in err
    assert "differ by at least" not in err  # (the advice for budgets that round alike)
    # nothing recorded: the corrected experiment was refused as another experiment's folder (Latte walkthrough)
    assert not (tmp_path / "out" / "experiment.json").exists()
    text = EXPERIMENT.replace(methods, "methods: [full, easycache]").replace("budgets: [0.2, 0.3]",
                                                                           "budgets: [0.2]\neasycache_warmup: 10")
    assert compare(write(tmp_path, text)) == 2
    assert "easycache_warmup: 10, but the loop has 10 steps: EasyCache would skip nothing" in capsys.readouterr().err
    assert not (tmp_path / "out" / "runs").exists()


def test_speedups_that_skipping_cannot_explain_are_marked():
    from taohooks.compare.report import markdown_table

    row = {"method": "taocache", "budget": 0.16, "skips": 8, "steps": 50, "skipped_fraction": 0.16, "lpips": None,
           "ssim": 0.9, "psnr": 30.0, "psnr_pooled": 30.0, "psnr_changed": 30.0}
    results = {"meta": {}, "records": [{"method": "full", "seconds": 1.0}],
               "aggregates": [{**row, "speedup": 1.667}, {**row, "budget": 0.08, "skips": 4, "speedup": 1.1},
                              {**row, "method": "pab", "speedup": 1.4}]}
    table = markdown_table(results)
    assert "| 1.667x† |" in table and "| 1.100x |" in table and "| 1.400x |" in table
    assert "† more than 5% faster than skipping that share of the calls allows" in table
    assert "(taocache at 8/50;" in table


def test_results_md_shows_each_prompt_s_psnr_and_how_often_each_method_scores_highest():
    """Four prompts' means can hide one prompt that decides them: the per-prompt PSNR, and per budget the count of
    prompts each method is highest on (ties count for each); with more prompts than PER_PROMPT_ROWS, the counts."""
    from taohooks.compare import report

    def run(method, skips, prompt, psnr):
        return {"method": method, "skips": skips, "steps": 10, "prompt": prompt, "seed": 7, "psnr": psnr}

    records = [{"method": "full", "prompt": "a", "seed": 7, "psnr": None}, run("taocache", 2, "a", 40.0),
               run("teacache", 2, "a", 35.0), run("taocache", 2, "b | c", 30.0), run("teacache", 2, "b | c", 30.0),
               run("taocache", 3, "a", 20.0), run("taocache", 3, "b | c", 21.0)]
    lines = report.per_prompt_lines(records)
    assert lines[1:6] == ["#### PSNR per prompt (dB)", "", "| prompt | seed | taocache 2/10 | teacache 2/10 | "
                          "taocache 3/10 |", "|---|---|---|---|---|", "| a | 7 | 40.00 | 35.00 | 20.00 |"]
    assert lines[6] == "| b / c | 7 | 30.00 | 30.00 | 21.00 |"
    assert lines[-1] == "Highest PSNR per prompt, of 2 prompts: 2/10: taocache 2, teacache 1."  # (3/10: one method)
    many = [run(m, 2, f"p{i}", 30.0 + (m == "teacache") * (i % 2)) for i in range(21) for m in ("taocache", "teacache")]
    lines = report.per_prompt_lines(many)
    assert not any(line.startswith("| p") for line in lines)
    assert lines[-1] == "Highest PSNR per prompt, of 21 prompts: 2/10: teacache 21, taocache 11."
    assert report.per_prompt_lines([run("taocache", 2, "a", 1.0), run("teacache", 2, "a", 2.0)]) == []  # one prompt


def test_pictures_an_environment_cannot_draw_are_said(capsys):
    """Without matplotlib the plots were left out without a word, though the README lists them (walkthrough)."""
    from taohooks.compare.command import _say_missing_pictures
    from taohooks.runtime import messages

    import importlib.util

    messages.forget()
    real = importlib.util.find_spec
    with pytest.MonkeyPatch.context() as m:
        m.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
        _say_missing_pictures(["strip.png", "side_by_side.gif"], plotted=True)
    assert "compare: quality_vs_speedup.png, skip_schedule.png not drawn: matplotlib not installed" \
        in capsys.readouterr().err  # (skip_schedule.png was left out without a word: ospuser, 2026-11-28)
    _say_missing_pictures(["quality_vs_speedup.png"], plotted=True)  # Pillow there, the videos not RGB: no word
    assert capsys.readouterr().err == ""
    _say_missing_pictures(["strip.png"], plotted=False)  # nothing to plot ([full] alone): nothing missing
    _say_missing_pictures(["quality_vs_speedup.png", "skip_schedule.png", "strip.png"], plotted=True)
    assert capsys.readouterr().err == ""


def test_folders_of_the_previous_version_resume(tmp_path):
    """The model's identity grew (Latte/Open-Sora-Plan: the video's size): a folder recorded without those entries
    was refused as 'model.frames = (not given)'; a magcache_k written equal to its default was refused against a
    folder that recorded it unset, and the reverse (review, 2026-11-27)."""
    from taohooks.compare.store import RunStore

    store = RunStore(tmp_path, writer=True)
    old = {"script": ["s.py"], "calibration.sampler": "ddim", "model": {"model": "LatteT2V"}, "magcache_k": 2}
    store.check_experiment(old)
    store.put_state("calibration", {})  # (a folder holding nothing is no other experiment's)
    new = {**old, "model": {"model": "LatteT2V", "frames": "4", "height": "64"}, "magcache_k": None}
    store.check_experiment(new, grown=("model",), alike={"magcache_k": (None, 2)})  # no error
    with pytest.raises(ConfigError, match="model.model: this output folder holds runs made with model.model = "
                                          "'LatteT2V', this experiment has 'WanModel'"):
        store.check_experiment({**new, "model": {"model": "WanModel", "frames": "4"}}, grown=("model",),
                               alike={"magcache_k": (None, 2)})
    with pytest.raises(ConfigError, match="magcache_k = 2, this experiment has 3"):
        store.check_experiment({**new, "magcache_k": 3}, grown=("model",), alike={"magcache_k": (None, 2)})
    # the entries recorded since are kept, so that the next run is checked against them (an old folder never learnt
    # the noise schedule); one side's entries that the other lacks (another diffusers version) are no change (review19)
    assert json.loads((tmp_path / "experiment.json").read_text())["model"]["frames"] == "4"
    with pytest.raises(ConfigError, match="model.frames = '4', this experiment has '8'"):
        store.check_experiment({**new, "model": {"model": "LatteT2V", "frames": "8"}}, grown=("model",),
                               alike={"magcache_k": (None, 2)})
    store.check_experiment({**new, "model": {"model": "LatteT2V"}}, grown=("model",), alike={"magcache_k": (None, 2)})


def test_a_folder_of_another_experiment_is_said_as_such_before_its_thresholds(tmp_path, launcher_state, capsys):
    """The stored-threshold check ran before the experiment check: a folder of another script or loop was refused
    over its search settings, hiding the real difference (review, 2026-11-27)."""
    text = EXPERIMENT.replace("methods: [full, taocache, teacache]", "methods: [full, teacache]").replace(
        "budgets: [0.2, 0.3]", "budgets: [0.2]").replace(
        "  - {prompt: \"a green square moving up, with a static blue dot\", seed: 10001}\n", "")
    path = write(tmp_path, text)
    assert compare(path) == 0
    capsys.readouterr()
    other = write(tmp_path, text.replace("search_iterations: 4", "search_iterations: 6"))
    assert cli.main(["compare", str(other), "--", str(SCRIPT), "--model", "flow", "--steps", "12",
                     "--out", str(tmp_path / "never.png")]) == 2
    err = capsys.readouterr().err
    assert "this output folder holds runs made with" in err and "search_iterations" not in err


def test_an_unset_method_setting_is_named_by_its_default():
    import tempfile

    from taohooks.compare.store import RunStore

    with tempfile.TemporaryDirectory() as folder:
        store = RunStore(folder, writer=True)
        store.check_experiment({"calibration.sampler": "x", "magcache_k": None})
        store.put_state("calibration", {})  # (a folder holding nothing is no other experiment's)
        with pytest.raises(ConfigError, match=r"magcache_k = unset \(the default, 2\), this experiment has 3"):
            store.check_experiment({"calibration.sampler": "x", "magcache_k": 3}, alike={"magcache_k": (None, 2)})


def test_the_hybrid_takes_the_paper_s_number_of_taocache_skips(tmp_path, launcher_state, capsys):
    """Algorithm 2 takes TaoCache's skip count as an input (the paper's hybrid run: 7 skips at every budget); compare
    gave TaoCache half of each budget, with no way to set it (fidelity audit, 2026-11-28). hybrid_tao_skips: N sets
    it (at most the budget); the folder records it, and a folder of half-budget hybrid runs is refused for it."""
    text = EXPERIMENT.replace("methods: [full, taocache, teacache]", "methods: [full, hybrid]").replace(
        "budgets: [0.2, 0.3]", "budgets: [0.2, 0.4]")
    assert compare(write(tmp_path, text + "hybrid_tao_skips: 3\n")) == 0
    records = json.loads((tmp_path / "out" / "results.json").read_text())["records"]
    hybrid = [r for r in records if r["method"] == "hybrid"]
    assert sorted((r["budget"], r["tao_skips"], r["window"][1] - r["window"][0] + 1) for r in hybrid) == [
        (0.2, 2, 2), (0.2, 2, 2), (0.4, 3, 3), (0.4, 3, 3)]  # (at most the budget: 2 of 10 steps)
    assert compare(write(tmp_path, text + "hybrid_tao_skips: 1\n")) == 2
    assert "this output folder holds runs made with hybrid_tao_skips = 3, this experiment has 1" in \
        capsys.readouterr().err
    experiment = tmp_path / "out" / "experiment.json"  # as a taohooks before the setting wrote it
    recorded = json.loads(experiment.read_text())
    experiment.write_text(json.dumps({k: v for k, v in recorded.items() if k != "hybrid_tao_skips"}))
    assert compare(write(tmp_path, text + "hybrid_tao_skips: 3\n")) == 2
    assert "holds runs made with hybrid_tao_skips = None, this experiment has 3" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="hybrid_tao_skips: expected a number of TaoCache skips >= 1"):
        load_experiment(write(tmp_path, text + "hybrid_tao_skips: 0\n"))


def test_a_folder_that_recorded_torch_compile_s_wrapper_is_taken_for_the_model(tmp_path, launcher_state, capsys):
    """A compiled transformer was recorded as model OptimizedModule (its fingerprint another); since the wrapper is
    the model it compiles, such a folder was refused by the same compiled script as holding another architecture
    (review20, 2026-11-28). Its model and architecture are not compared; a real difference still is."""
    path = write(tmp_path, EXPERIMENT.replace("methods: [full, taocache, teacache]", "methods: [full, taocache]")
                 .replace("budgets: [0.2, 0.3]", "budgets: [0.2]"))
    assert compare(path) == 0
    recorded = tmp_path / "out" / "experiment.json"
    experiment = json.loads(recorded.read_text())
    real = dict(experiment["model"])
    experiment["model"].update(model="OptimizedModule", architecture="000000000000")
    recorded.write_text(json.dumps(experiment))
    capsys.readouterr()
    assert compare(path) == 0 and "; 7 of 7 runs already in " in capsys.readouterr().err
    experiment["model"] = {**real, "architecture": "000000000000"}
    recorded.write_text(json.dumps(experiment))
    assert compare(path) == 2
    assert "model.architecture: this output folder holds runs made with model.architecture = '000000000000'" in \
        capsys.readouterr().err


def test_a_latte_yaml_with_mixed_key_types_is_compared(tmp_path):
    """OmegaConf takes ``{1: a, b: c}``; sorting its keys for the folder's record raised a TypeError (review20)."""
    from taohooks.compare.targets import _latte_script_config

    (tmp_path / "m.yaml").write_text("guidance_scale: 7.5\nextra: {1: a, b: c}\n2: two\ntext_prompt: [x]\n")
    assert _latte_script_config(["s.py", "--config", str(tmp_path / "m.yaml")]) == {
        "2": "two", "extra": {"1": "a", "b": "c"}, "guidance_scale": 7.5}


def test_a_complete_config_lut_is_read_where_teacache_calibrates(finished, tmp_path, launcher_state, capsys):
    """A review (2026-11-29): listing teacache (its polynomial fitted on the calibration prompts) set the TaoCache
    config's complete LUT aside, silently, for one of the experiment's own calibration; adding teacache to a folder
    made without it was then refused as a `lut` change the user never made."""
    import hashlib

    from taohooks.taocache.lut import CalibrationLUT

    lut = CalibrationLUT.load(finished[0] / "state" / "calibration_lut.safetensors")
    calibrated = next(r["window"] for r in finished[1]["records"] if r["method"] == "taocache" and r["skips"] == 2)
    first = 5 if calibrated[0] != 5 else 7  # a window the config's LUT alone gives: cosine 1 there, 0.5 elsewhere
    count = lut.cos.count.to(torch.float64)
    cos = torch.full_like(count, 0.5)
    cos[:, first:first + 2] = 1.0
    edited = type(lut.cos)(lut.cos.count, cos * count, cos.square() * count)
    CalibrationLUT(**{**lut.__dict__, "cos": edited, "source": None}).save(tmp_path / "config_lut.safetensors")
    write(tmp_path, "integration: testbed\nmodel_id: testbed-flow\nlut: config_lut.safetensors\n"
                    "calibration: {prompts: 3}\nplan: {budget: 0.2}\n", "tao.yaml")
    base = EXPERIMENT.replace("integration: testbed\nmodel_id: testbed-flow\n", "taocache: tao.yaml\n").replace(
        "budgets: [0.2, 0.3]", "budgets: [0.2]").replace(
        '  - {prompt: "a green square moving up, with a static blue dot", seed: 10001}\n', "")
    without = base.replace("methods: [full, taocache, teacache]", "methods: [full, taocache]")
    assert compare(write(tmp_path, without)) == 0
    capsys.readouterr()
    assert compare(write(tmp_path, base)) == 0  # teacache added: its polynomial calibrated, the config's LUT kept
    err = capsys.readouterr().err
    assert "calibrating teacache's polynomial on 3 calibration prompts" in err, err
    assert "the TaoCache rows read the config's complete lut: " in err and "taocache's LUT" not in err
    experiment = json.loads((tmp_path / "out" / "experiment.json").read_text())
    digest = hashlib.sha256((tmp_path / "config_lut.safetensors").read_bytes()).hexdigest()
    assert json.dumps(experiment).count(f"sha256:{digest}") == 1
    records = json.loads((tmp_path / "out" / "results.json").read_text())["records"]
    assert [r["window"] for r in records if r["method"] == "taocache"] == [[first, first + 1]]
    assert {r["method"] for r in records} == {"full", "taocache", "teacache"}


def test_a_baseline_whose_search_missed_the_budget_is_marked_and_not_ranked_there(tmp_path):
    """A review (2026-11-29): teacache's search found 0% at a 10% budget (a video equal to the reference, 100 dB) and
    results.md counted it as that budget's best on every prompt; the plot drew it as a 10% point."""
    from taohooks.compare import report
    from taohooks.evaluation.methods import missed_budget

    def run(method, prompt, psnr, found=None):
        row = {"method": method, "skips": 2, "steps": 20, "budget": 0.1, "prompt": prompt, "seed": 7, "psnr": psnr,
               "skipped_fraction": 0.1 if found is None else found}
        return {**row, "search_fraction": found} if found is not None else row

    records = [run("taocache", "a", 30.0), run("teacache", "a", 100.0, found=0.0), run("magcache", "a", 20.0, 0.1),
               run("taocache", "b", 31.0), run("teacache", "b", 100.0, found=0.0), run("magcache", "b", 35.0, 0.1)]
    assert [missed_budget(r) for r in records[:3]] == [False, True, False]
    assert missed_budget({**records[2], "search_fraction": 0.1 + 0.5 / 20}) is False  # (within the search's half step)
    assert report.per_prompt_lines(records)[-1] == \
        "Highest PSNR per prompt, of 2 prompts: 2/20: magcache 1, taocache 1."
    rows = [{k: v for k, v in r.items() if k not in ("prompt", "seed")} for r in records[:3]]
    for r in rows:
        r.update(lpips=None, ssim=1.0, psnr_pooled=r["psnr"], psnr_changed=None, speedup=1.0)
    table = report.markdown_table({"meta": {}, "records": [{"method": "full", "seconds": 1.0}], "aggregates": rows})
    assert "| 2/20 (10%) | teacache | 1.000x | 0.0%‡ |" in table
    assert "| 2/20 (10%) | magcache | 1.000x | 10.0% |" in table
    assert "‡ its threshold search could not meet the budget (teacache at 2/20: 0.0% on the search prompts)" in table
    pytest.importorskip("matplotlib")
    from taohooks.evaluation.plotting import plot_quality_vs_speedup

    assert plot_quality_vs_speedup(rows, "t", tmp_path / "q.png").is_file()


def test_a_folder_of_runs_without_its_experiment_json_is_refused_before_the_script(tmp_path, capsys):
    """runs/ and state/ with no experiment.json (deleted, or copied without it) were taken as this experiment's, and
    its experiment.json then recorded them so: old videos reported as the new experiment's (review r30, F4)."""
    never = write(tmp_path, "raise SystemExit('the script ran')\n", "never.py")
    path = write(tmp_path, EXPERIMENT)
    (tmp_path / "out" / "runs" / "full").mkdir(parents=True)
    (tmp_path / "out" / "runs" / "full" / "0123456789abcdef.safetensors").write_bytes(b"a run")
    (tmp_path / "out" / "state").mkdir()
    (tmp_path / "out" / "state" / "calibration.json").write_text("{}")
    said = (f"taocache compare: {tmp_path / 'out' / 'experiment.json'}: missing, but this output folder holds runs/ "
            "and state/ of an unknown experiment (experiment.json records what its runs were made with: the script "
            "line, model and settings); they cannot be checked against this experiment: use another output folder, "
            "or put back the experiment.json made with them (or delete runs/ and state/ to start the folder again)\n")
    assert cli.main(["compare", str(path), "--", str(never)]) == 2
    assert capsys.readouterr().err == said
    assert not (tmp_path / "out" / "experiment.json").exists()
    (tmp_path / "out" / "runs" / "full" / "0123456789abcdef.safetensors").unlink()  # state/ alone: a calibration
    assert cli.main(["compare", str(path), "--", str(never)]) == 2
    assert "holds state/ of an unknown experiment" in capsys.readouterr().err
    assert cli.main(["check", str(path)]) == 0
    assert f"# output: {tmp_path / 'out'} holds state/ of an unknown experiment (no experiment.json): taocache " \
           "compare refuses it" in capsys.readouterr().out


def test_a_folder_of_another_tool_s_results_is_not_overwritten(tmp_path, capsys):
    """A taocache bench folder as the output: its results.json and results.md were replaced without a word (review
    r30, F4); refused before anything is written there."""
    never = write(tmp_path, "raise SystemExit('the script ran')\n", "never.py")
    path = write(tmp_path, EXPERIMENT)
    (tmp_path / "out").mkdir()
    bench = json.dumps({"methods": {"taocache": {"psnr": 30.0}}})
    (tmp_path / "out" / "results.json").write_text(bench)
    assert cli.main(["compare", str(path), "--", str(never)]) == 1
    assert capsys.readouterr().err == (
        f"taocache compare: error: {path}: output: {tmp_path / 'out' / 'results.json'}: not a taocache compare results "
        "file (expected meta, records, aggregates); compare would replace it (and results.md) with this "
        "experiment's: use another output folder (or move the file away)\n")
    assert (tmp_path / "out" / "results.json").read_text() == bench
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.json"]  # (no lock, no taocache.yaml)
    assert cli.main(["check", str(path)]) == 1  # (check makes compare's checks before the script)
    assert "not a taocache compare results file" in capsys.readouterr().err


def test_a_missing_script_is_said_as_such_on_a_folder_of_earlier_runs(tmp_path, capsys):
    """A typo in the script's path on an existing folder was said as "another script line ... use another output
    folder (or delete it)" (review r30, F1)."""
    path = write(tmp_path, EXPERIMENT)
    (tmp_path / "out" / "state").mkdir(parents=True)
    (tmp_path / "out" / "experiment.json").write_text(json.dumps({"script": [str(SCRIPT), "--steps", "10"]}))
    (tmp_path / "out" / "state" / "calibration.json").write_text("{}")
    nope = tmp_path / "examples" / "nope.py"
    assert cli.main(["compare", str(path), "--", str(nope), "--steps", "10"]) == 2
    assert capsys.readouterr().err == f"taocache compare: script {nope} does not exist\n"
    assert cli.main(["compare", str(path), "--", str(ROOT / "examples"), "--steps", "10"]) == 2
    assert capsys.readouterr().err == (f"taocache compare: script {ROOT / 'examples'} is a directory; give the sample "
                                       f"script inside it (e.g. {ROOT / 'examples' / 'generate.py'})\n")


def test_a_lut_that_is_a_directory_is_refused_as_such(tmp_path, capsys):
    """lut: naming a folder was said "does not exist" and a LUT calibrated in the output folder (review r30, L1)."""
    never = write(tmp_path, "raise SystemExit('the script ran')\n", "never.py")
    (tmp_path / "luts").mkdir()
    tao = write(tmp_path, "integration: testbed\nmodel_id: testbed-flow\nlut: luts\n", "tao.yaml")
    for methods in ("[full, taocache]", "[full, taocache, teacache]"):  # (teacache: calibrated here in any case)
        text = EXPERIMENT.replace("integration: testbed\nmodel_id: testbed-flow\n", "taocache: tao.yaml\n")
        path = write(tmp_path, text.replace("methods: [full, taocache, teacache]", f"methods: {methods}"))
        assert cli.main(["compare", str(path), "--", str(never)]) == 1
        assert capsys.readouterr().err == (
            f"taocache compare: error: {tao}: lut: {tmp_path / 'luts'} is a directory, not a LUT file; name the LUT "
            f"file inside it, e.g. {tmp_path / 'luts' / 'model.safetensors'}\n")
        assert not (tmp_path / "out").exists()


def test_a_seed_outside_a_64_bit_generator_s_range_is_refused_when_the_experiment_is_loaded(tmp_path):
    """A seed of 2**63 or more passed every check and failed after the model had loaded, with a traceback ("Overflow
    when unpacking long long"); a negative one is a random seed to Wan's scripts (review r30, L2)."""
    expected = "expected an integer seed from 0 to 2**63 - 1, got "
    for seed in (99999999999999999999, 2 ** 63, -1):
        path = write(tmp_path, EXPERIMENT.replace("seed: 10001}", f"seed: {seed}}}"))
        with pytest.raises(ConfigError) as info:
            load_experiment(path)
        assert str(info.value) == f"{path}: prompts[1].seed: {expected}{seed}"
    path = write(tmp_path, EXPERIMENT.replace("seed: 1000}", f"seed: {2 ** 63}}}"))
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    assert str(info.value) == f"{path}: calibration_prompts[0].seed: {expected}{2 ** 63}"
    (tmp_path / "p.txt").write_text(f"a red circle moving left\t7\na red square moving down\t{2 ** 64}\n")
    text = EXPERIMENT.replace("prompts:\n  - {prompt: \"a red circle moving left, with a static green dot\", "
                              "seed: 10000}\n  - {prompt: \"a green square moving up, with a static blue dot\", "
                              "seed: 10001}\n", "prompts: p.txt\n")
    with pytest.raises(ConfigError) as info:
        load_experiment(write(tmp_path, text))
    assert str(info.value) == f"{tmp_path / 'p.txt'}: line 2: the seed after the tab: {expected}{2 ** 64}"
    path = write(tmp_path, text.replace("p.txt", "p.txt\nseed: -3"))
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    assert str(info.value) == f"{path}: seed: {expected}-3 (the seed of a prompt given without one)"
    assert load_experiment(write(tmp_path, EXPERIMENT.replace("seed: 10001}", f"seed: {2 ** 63 - 1}}}")))


def test_results_say_the_baselines_used_on_a_rerun_with_every_run_stored(tmp_path, launcher_state, capsys):
    """meta.magcache_ratios was set only by a magcache run made in the process: null in results.json after a rerun
    of a folder whose runs were all stored (an interruption while scoring; review r30, F6); TeaCache's likewise."""
    text = EXPERIMENT.replace("methods: [full, taocache, teacache]", "methods: [full, magcache]").replace(
        "budgets: [0.2, 0.3]", "budgets: [0.3]").replace(
        "  - {prompt: \"a green square moving up, with a static blue dot\", seed: 10001}\n", "").replace(
        "search_iterations: 4", "search_iterations: 2")
    path = write(tmp_path, text)
    said = "MagCache's magnitude ratios calibrated on the calibration prompts; K 2, retention 0.2"
    assert compare(path) == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["meta"]["magcache_ratios"] == said
    (tmp_path / "out" / "results.json").unlink()  # (as an interruption while scoring leaves the folder)
    capsys.readouterr()
    assert compare(path) == 0 and "; 5 of 5 runs already in " in capsys.readouterr().err
    meta = json.loads((tmp_path / "out" / "results.json").read_text())["meta"]
    assert meta["magcache_ratios"] == said and meta["teacache_proxy"] is None


def test_an_inline_loop_that_is_not_the_scripts_names_the_experiment(tmp_path, launcher_state, capsys):
    """The error named OUTPUT/taocache.yaml, the file compare writes from the inline keys, not the experiment where
    the user wrote `loop:` (review, 2026-11-29)."""
    text = EXPERIMENT.replace("model_id: testbed-flow\n", "model_id: testbed-flow\nloop: {steps: 30}\n").replace(
        "methods: [full, taocache, teacache]", "methods: [full]")
    path = write(tmp_path, text)
    assert compare(path) == 2
    err = capsys.readouterr().err
    assert f"{path}: loop.steps is 30" in err and "taocache.yaml" not in err, err
