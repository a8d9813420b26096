"""Issue 12, classes 6 and 9: config values that cannot work are errors at load and in `taocache check`;
the command lines follow the usual conventions (help exits 0, no silent last-wins, no traceback on -o)."""
import errno
import os
from pathlib import Path

import pytest

from taohooks import ConfigError, config_from_dict, load_config
from taohooks.cli import main as cli_main
from taohooks.config import ACCEPTABLE_DIFFERENCES, FIRST_SKIPPABLE, MAX_PROMPTS, MAX_STEPS
from taohooks.launcher.integration import IntegrationError
from taohooks.taocache.plan import FIRST_SKIPPABLE as PLAN_FIRST_SKIPPABLE
from taohooks.launcher.prompt_calibration import read_prompts
from taohooks.run import main as run_main
from taohooks.run import split_taocache_argument
from prewarmed import run_python

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def error(tmp_path, text) -> str:
    """The message of the ConfigError that loading ``text`` raises, without the file prefix."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    return message[len(f"{path}: "):]


@pytest.fixture
def lut_path(tmp_path):
    from test_calibration import calibrate
    from trajectories import GeometricDenoiser

    lut = calibrate(GeometricDenoiser({"cond": 0.9, "uncond": 0.7}), 20, ("cond", "uncond"), model_id="geo")
    return lut.save(tmp_path / "geo.safetensors")


# ---------------------------------------------------------------------- 1. the file itself
@pytest.mark.parametrize("text,message", [
    ("plan:\n  budget: 3\n  lambda: 1\n  budget: 4\n",
     "plan.budget: duplicate key on lines 2 and 4; YAML would silently keep the last, so give it once"),
    ("integration: wan\nlut: a.safetensors\nintegration: testbed\n",
     "integration: duplicate key on lines 1 and 3; YAML would silently keep the last, so give it once"),
    ("pab:\n  groups:\n    - {pattern: a, range: 2, pattern: b}\n  steps: [3, 4]\n",
     "pab.groups[0].pattern: duplicate key on lines 3 and 3; YAML would silently keep the last, so give it once"),
])
def test_duplicate_keys_name_the_key_and_both_lines(tmp_path, text, message):
    assert error(tmp_path, text) == message


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    cfg = load_config(write(tmp_path, "pab:\n  groups:\n    - &g {pattern: a, range: 3}\n    - {<<: *g, pattern: b}\n"
                                      "  steps: [3, 4]\n"))
    assert [(g.pattern, g.range_) for g in cfg.pab.groups] == [("a", 3), ("b", 3)]


@pytest.mark.parametrize("text", ["", "# only a comment\n\n# another\n", "---\n"])
def test_an_empty_config_is_an_error(tmp_path, text):
    assert error(tmp_path, text) == "empty config; see configs/example.yaml"


def test_non_utf8_config_and_prompt_files_name_the_file(tmp_path):
    assert error(tmp_path, b"model_id: caf\xe9\n") == ("not UTF-8 text: byte 13 (0xe9) cannot be decoded; "
                                                       "save the file as UTF-8")
    prompts = write(tmp_path, b"a red circle\n\xff\xfe blue\n", "prompts.txt")
    with pytest.raises(IntegrationError) as info:
        read_prompts(prompts)
    assert str(info.value) == (f"prompts file {prompts} is not UTF-8 text: byte 13 (0xff) cannot be decoded; "
                               "save it as UTF-8")


def test_prompts_end_only_at_newlines(tmp_path):
    prompts = write(tmp_path, "\ufeffa red circle\u2028moving left\r\n# comment\n\nblue\x0csquare\n", "p.txt")
    assert read_prompts(prompts) == ["a red circle\u2028moving left", "blue\x0csquare"]


# ---------------------------------------------------------------------- 2. numbers
@pytest.mark.parametrize("text,message", [
    ("plan: {lambda: .nan}\n", "plan.lambda: expected a finite number, got nan"),
    ("plan: {gamma: .inf}\n", "plan.gamma: expected a finite number, got inf"),
    ("plan: {tau_cos: .nan}\n", "plan.tau_cos: expected a finite number, got nan"),
    ("plan: {ratio: .inf}\n", "plan.ratio: expected a finite number, got inf"),
    ("plan: {budget: .nan}\n", "plan.budget: expected a finite number, got nan"),
    ("pab: {groups: [{pattern: a}], timesteps: [100, .inf]}\n", "pab.timesteps[1]: expected a finite number, got inf"),
    ("teacache: {threshold: .inf}\n", "teacache.threshold: expected a finite number, got inf"),
    ("teacache: {threshold: 0.1, coefficients: [1.0, -.inf]}\n", "teacache.coefficients[1]: expected a finite number, got -inf"),
])
def test_every_float_is_finite(tmp_path, text, message):
    assert error(tmp_path, text) == message


def test_numbers_that_yaml_reads_as_text_say_how_to_write_them(tmp_path):
    assert error(tmp_path, "plan: {lambda: 1e-3}\n") == ("plan.lambda: expected a number, got '1e-3' (str); YAML reads "
                                                         "1e-3 as text, write 0.001")


@pytest.mark.parametrize("text,message", [
    ("loop: {steps: 100000000000000}\n", "loop.steps: expected at most 100000 steps, got 100000000000000"),
    ("calibration: {prompts: 100001}\n", "calibration.prompts: expected at most 100000 prompts, got 100001"),
    ("plan: {budget: 100001}\n", "plan.budget: expected at most 100000 skipped steps, got 100001"),
    ("plan: {min_step: 100001}\n", "plan.min_step: expected a step index from 0 to 100000, got 100001"),
    ("plan: {skip_steps: [5, 100001]}\n", "plan.skip_steps[1]: expected a step index from 2 (the first 2 steps are "
                                          "always computed) to 100000, got 100001"),
    ("teacache: {threshold: 0.1, warmup_steps: 100001}\n", "teacache.warmup_steps: expected a step count from 0 to 100000, got 100001"),
])
def test_integers_are_sane(tmp_path, text, message):
    assert error(tmp_path, text) == message
    assert MAX_STEPS == MAX_PROMPTS == 100_000


# ---------------------------------------------------------------------- 3. budget and the loop's steps
@pytest.mark.parametrize("text,message", [
    ("plan: {budget: 1.0}\n", "plan.budget: 1.0 is ambiguous; write 1 for one skipped step or a fraction below 1.0"),
    ("plan: {budget: 2.0}\n", "plan.budget: 2.0 is ambiguous; write 2 for 2 skipped steps or a fraction below 1.0"),
    ("loop: {steps: 10}\nplan: {budget: 9}\n",
     "plan.budget: 9 skipped steps cannot fit loop.steps 10: at most 8 (the first 2 steps are always computed)"),
    ("loop: {steps: 4}\nplan: {budget: 0.9}\n",
     "plan.budget: 0.9 of 4 steps (4 skipped steps) cannot fit loop.steps 4: at most 2 (the first 2 steps are "
     "always computed)"),
    ("loop: {steps: 20}\nplan: {budget: 8, min_step: 15}\n",
     "plan.budget: 8 skipped steps span 8 steps, but the late regime of loop.steps 20 holds 5 (steps 15 to 19); "
     "lower plan.budget or plan.min_step"),
    ("loop: {steps: 20}\nplan: {budget: 8, refresh_every: 1}\n",
     "plan.budget: 8 skipped steps span 15 steps, but the late regime of loop.steps 20 holds 10 (steps 10 to 19); "
     "lower plan.budget or plan.min_step"),
    ("loop: {steps: 10}\nplan: {window: [5, 10]}\n",
     "plan.window[1]: step 10 does not exist with loop.steps 10 (steps 0 to 9)"),
    ("loop: {steps: 10}\nplan: {skip_steps: [4, 12]}\n",
     "plan.skip_steps[1]: step 12 does not exist with loop.steps 10 (steps 0 to 9)"),
    ("loop: {steps: 10}\nplan: {min_step: 10}\n",
     "plan.min_step: step 10 does not exist with loop.steps 10 (steps 0 to 9)"),
    ("plan: {window: [1, 5]}\n", "plan.window[0]: expected a step index from 2 (the first 2 steps are always "
                                 "computed) to 100000, got 1"),
    ("plan: {skip_steps: [0]}\n", "plan.skip_steps[0]: expected a step index from 2 (the first 2 steps are always "
                                  "computed) to 100000, got 0"),
    ("loop: {steps: 10}\npab: {groups: [{pattern: a}], steps: [2, 10]}\n",
     "pab.steps[1]: step 10 does not exist with loop.steps 10 (steps 0 to 9)"),
])
def test_plan_values_that_cannot_work(tmp_path, text, message):
    assert error(tmp_path, text) == message


def test_plan_values_that_fit_still_load(tmp_path):
    assert FIRST_SKIPPABLE == PLAN_FIRST_SKIPPABLE
    for plan in ("{budget: 8}", "{budget: 0.4}", "{budget: 0.0}", "{budget: 0}", "{window: [2, 9]}",
                 "{skip_steps: [2, 9]}", "{budget: 10, min_step: 10}", "{budget: 5, refresh_every: 2}"):
        load_config(write(tmp_path, f"loop: {{steps: 20}}\nplan: {plan}\n"))
    assert load_config(write(tmp_path, "plan: {budget: 40}\n")).plan.budget == 40  # steps unknown: at attach


def test_command_line_budget_follows_the_same_rule(lut_path, capsys):
    assert cli_main(["plan", str(lut_path), "--budget", "2.0"]) == 1
    assert capsys.readouterr().err == ("taocache plan: error: command line: --budget: 2.0 is ambiguous; write 2 "
                                       "for 2 skipped steps or a fraction below 1.0\n")
    assert cli_main(["plan", str(lut_path), "--budget", "2", "--refresh-every", "0"]) == 1  # named as typed
    assert "command line: --refresh-every: expected a number of skips >= 1" in capsys.readouterr().err
    assert cli_main(["plan", str(lut_path), "--steps", "100000000000", "--window", "3", "4", "--ratio", "1"]) == 1
    assert capsys.readouterr().err == ("taocache plan: error: command line: --steps: expected a number of steps from 1 "
                                       "to 100000, got 100000000000\n")


def test_integration_names_are_matched_without_case(tmp_path):
    assert error(tmp_path, "integration: WAN\n") == (
        "integration: unknown integration 'WAN'; did you mean 'wan'? (one of none, wan, wan22, latte, opensora_plan, videosys, "
        "diffusers, testbed)")


# ---------------------------------------------------------------------- 4. paths
def test_unset_variables_in_paths_are_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("TAOHOOKS_TEST_UNSET", raising=False)
    assert error(tmp_path, "lut: ${TAOHOOKS_TEST_UNSET}/a.safetensors\n") == (
        "lut: environment variable $TAOHOOKS_TEST_UNSET is not set (in '${TAOHOOKS_TEST_UNSET}/a.safetensors'); "
        "set it, or write the path without it")
    assert "environment variable $TAOHOOKS_TEST_UNSET is not set" in error(
        tmp_path, "lut: luts/$TAOHOOKS_TEST_UNSET.safetensors\n")
    monkeypatch.setenv("TAOHOOKS_TEST_UNSET", str(tmp_path / "store"))
    assert load_config(write(tmp_path, "lut: ${TAOHOOKS_TEST_UNSET}/a.safetensors\n")).lut_path() == \
        tmp_path / "store" / "a.safetensors"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert load_config(write(tmp_path, "lut: ~/l.safetensors\n")).lut_path() == tmp_path / "home" / "l.safetensors"
    assert error(tmp_path, "lut: ''\n") == ("lut: expected a file path such as luts/model.safetensors "
                                            "(or null: no LUT), got ''")


# ---------------------------------------------------------------------- 5. calibration.accept
def test_calibration_accept(tmp_path):
    assert config_from_dict({}).calibration.accept == []
    cfg = load_config(write(tmp_path, "calibration: {accept: [dtype, timesteps]}\n"))
    assert cfg.calibration.accept == ["dtype", "timesteps"] and "accept" in cfg.to_dict()["calibration"]
    assert error(tmp_path, "calibration: {accept: [dtype, schedular]}\n") == (
        "calibration.accept[1]: unknown difference 'schedular'; did you mean 'scheduler'? (one of "
        + ", ".join(ACCEPTABLE_DIFFERENCES) + ")")
    assert error(tmp_path, "calibration: {accept: dtype}\n").startswith(
        "calibration.accept: expected a list of a string")


# ---------------------------------------------------------------------- 6. taocache check
def test_check_points_a_bench_config_to_taocache_bench(capsys):
    path = CONFIGS / "bench_small.yaml"
    assert cli_main(["check", str(path)]) == 1
    assert capsys.readouterr().err == (f"taocache check: error: {path}: this is a `taocache bench` config; "
                                       f"run `taocache bench {path}`\n")


def test_check_reports_what_cannot_fit(lut_path, tmp_path, capsys):
    cfg = write(tmp_path, f"lut: {lut_path.name}\nloop: {{steps: 20}}\nplan: {{window: [10, 25]}}\n")
    assert cli_main(["check", str(cfg)]) == 1
    assert capsys.readouterr().err == (f"taocache check: error: {cfg}: plan.window[1]: step 25 does not exist with "
                                       "loop.steps 20 (steps 0 to 19)\n")
    cfg = write(tmp_path, f"lut: {lut_path.name}\nloop: {{steps: 30}}\ncalibration: {{prompts: 2}}\n")  # (complete)
    assert cli_main(["check", str(cfg)]) == 1
    assert capsys.readouterr().err == (f"taocache check: error: {cfg}: loop.steps: 30 steps, but the LUT {lut_path} "
                                       "was calibrated with 20 steps; calibrate again for 30 steps (or point lut at "
                                       "another file, or carry it over with calibration.transfer: interpolate)\n")
    (tmp_path / "luts").mkdir()
    cfg = write(tmp_path, "lut: luts\n")
    assert cli_main(["check", str(cfg)]) == 1
    assert capsys.readouterr().err == (f"taocache check: error: {cfg}: lut: {tmp_path / 'luts'} is a directory; "
                                       f"name the LUT file inside it, e.g. {tmp_path / 'luts' / 'model.safetensors'}\n")


def test_check_and_calibrate_refuse_a_lut_that_cannot_be_saved(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    cfg = write(tmp_path, "lut: afile/lut.safetensors\n")
    assert cli_main(["check", str(cfg)]) == 1
    assert capsys.readouterr().err == (f"taocache check: error: {cfg}: lut: {tmp_path / 'afile' / 'lut.safetensors'} "
                                       f"cannot be written ({tmp_path / 'afile'} is a file, not a folder); a run would "
                                       "calibrate, then fail to save it\n")
    (tmp_path / "p.txt").write_text("a red circle moving left\n")
    (tmp_path / "luts").mkdir()
    cfg = write(tmp_path, "integration: testbed\nlut: luts\ncalibration: {prompts: 1}\n")
    assert cli_main(["calibrate", str(cfg), "--prompts", str(tmp_path / "p.txt"), "--", "never_run.py"]) == 1
    assert capsys.readouterr().err == (f"taocache calibrate: error: cannot write {tmp_path / 'luts'}: it is a "
                                       "directory; give a file name inside it\n")


# ---------------------------------------------------------------------- 7. command lines
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_launcher_help_exits_0(flag, capsys):
    assert run_main([flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: taocache-run SCRIPT.py [the script's own arguments] --taocache CONFIG.yaml\n")
    assert "installs the integration the config names" in out


def test_launcher_refuses_two_configs(capsys):
    with pytest.raises(SystemExit) as info:
        split_taocache_argument(["a.py", "--taocache", "a.yaml", "--x", "--taocache=b.yaml"])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith(
        "taocache-run: error: --taocache is given twice (a.yaml and b.yaml); give one config\nusage: ")
    with pytest.raises(SystemExit) as info:
        split_taocache_argument(["a.py", "--taocache"])
    assert info.value.code == 2
    assert split_taocache_argument(["a.py", "--taocache", "a.yaml", "--taocache=a.yaml"]) == ("a.yaml", ["a.py"])


CATCHING_SCRIPT = """
import torch
from taohooks.testbed import sampling
from taohooks.testbed.model import VideoDiT, VideoDiTConfig
torch.manual_seed(0)
try:
    sampling.sample(VideoDiT(VideoDiTConfig(dim=16, depth=1, num_heads=2)), ["a red circle moving left"], [1], steps=4)
except Exception as exc:  # the script carries on, and exits 0
    print("caught", type(exc).__name__)
"""


def test_calibrate_that_ends_without_every_prompt_exits_1(tmp_path):
    pytest.importorskip("diffusers")
    (tmp_path / "c.yaml").write_text("integration: testbed\nlut: lut.safetensors\ncalibration: {prompts: 3}\n")
    (tmp_path / "prompts.txt").write_text("a red circle moving left\nnot a prompt\na blue square moving up\n")
    (tmp_path / "sample.py").write_text(CATCHING_SCRIPT)
    res = run_python(["-m", "taohooks.cli", "calibrate", "c.yaml", "--prompts", "prompts.txt",
                      "--", "sample.py"], cwd=tmp_path, timeout=120)
    assert res.returncode == 1, res.stderr
    assert ("taocache calibrate: error: sample.py ended with 1 of 3 prompts recorded in lut.safetensors; the script "
            "may not call the generation function the 'testbed' integration patches (or it ended before the last "
            "prompt); run it with --taocache to see what it does") in res.stderr


def test_outputs_that_cannot_be_written_are_one_line_errors(lut_path, tmp_path, capsys):
    folder, file = tmp_path / "out", tmp_path / "afile"
    folder.mkdir()
    file.write_text("")
    cases = [
        (["plot", str(lut_path), "-o", str(folder)],
         f"taocache plot: error: cannot write {folder}: it is a directory; give a file name inside it"),
        (["plot", str(lut_path), "-o", str(file / "c.png")],
         f"taocache plot: error: cannot write {file / 'c.png'}: {file} is a file, not a folder"),
        (["demo", "-o", str(file)], f"taocache demo: error: cannot write {file}: it is a file, not a folder"),
        (["bench", str(CONFIGS / "bench_small.yaml"), "-o", str(file)],
         f"taocache bench: error: cannot write {file}: it is a file, not a folder"),
    ]
    for argv, message in cases:
        assert cli_main(argv) == 1
        assert capsys.readouterr().err == message + "\n"


def test_oserrors_while_writing_are_one_line_errors(lut_path, tmp_path, capsys, monkeypatch):
    import taohooks.evaluation.plotting

    out = tmp_path / "c.png"

    def denied(lut, path, dpi):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(taohooks.evaluation.plotting, "plot_calibration", denied)
    assert cli_main(["plot", str(lut_path), "-o", str(out)]) == 1
    assert capsys.readouterr().err == f"taocache plot: error: cannot write {out}: Permission denied\n"

    def full(lut, path, dpi):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(taohooks.evaluation.plotting, "plot_calibration", full)
    assert cli_main(["plot", str(lut_path), "-o", str(out)]) == 1
    assert capsys.readouterr().err == f"taocache plot: error: cannot write {out}: No space left on device\n"


def test_file_write_errors_read_cannot_write_path(lut_path, tmp_path, capsys, monkeypatch):
    import taohooks.evaluation.plotting
    from taohooks.runtime.io import FileWriteError

    out = tmp_path / "c.png"

    def full(lut, path, dpi):
        raise FileWriteError(f"{path}: cannot write: the disk is full (No space left on device)", errno.ENOSPC, path)

    monkeypatch.setattr(taohooks.evaluation.plotting, "plot_calibration", full)
    assert cli_main(["plot", str(lut_path), "-o", str(out)]) == 1
    assert capsys.readouterr().err == (f"taocache plot: error: cannot write {out}: the disk is full (No space left on "
                                       "device)\n")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_into_a_read_only_folder(lut_path, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    try:
        assert cli_main(["plot", str(lut_path), "-o", str(folder / "c.png")]) == 1
        assert capsys.readouterr().err.startswith(f"taocache plot: error: cannot write {folder / 'c.png'}: folder "
                                                  f"{folder} cannot be written (")
    finally:
        folder.chmod(0o755)


def test_example_config_documents_every_key():
    text = (CONFIGS / "example.yaml").read_text()
    cfg = load_config(CONFIGS / "example.yaml")
    assert "accept: []" in text and cfg.calibration.accept == []
    for name in ACCEPTABLE_DIFFERENCES:
        assert name in text


def test_example_config_values_are_the_defaults_or_marked_example():
    """Its header says so: a value that is not the default says `example` on its line (budget: 0.16 once read as
    the default, which is null: nothing skipped)."""
    def leaves(tree, prefix=""):
        for key, value in tree.items():
            name = f"{prefix}{key}"
            yield from leaves(value, name + ".") if isinstance(value, dict) else [(name, value)]

    text = (CONFIGS / "example.yaml").read_text()
    example = dict(leaves(load_config(CONFIGS / "example.yaml").to_dict()))
    default = dict(leaves(config_from_dict({}).to_dict()))
    assert example.keys() == default.keys()
    differing = {k for k in default if example[k] != default[k]}
    assert differing == {"model_id", "lut", "loop.steps", "loop.streams", "plan.budget"}
    for key in differing:
        line = next(l for l in text.splitlines() if l.strip().startswith(key.split(".")[-1] + ":"))
        assert "# example" in line, line


def test_prompt_calibration_refuses_a_generation_of_several_sampling_loops(monkeypatch, tmp_path):
    """The backstop behind wan22's precheck: a patch whose loop repeats (one loop per clip) cannot be calibrated
    one prompt per generation; refused before any prompt is read."""
    import inspect
    from types import SimpleNamespace

    from taohooks.launcher.integration import IntegrationError
    from taohooks.launcher.prompt_calibration import ENV_CALIBRATE_PROMPTS, calibrate_over_prompts

    monkeypatch.setenv(ENV_CALIBRATE_PROMPTS, str(tmp_path / "never-read.txt"))
    patch = SimpleNamespace(prompt_arg="input_prompt", name="generate", loop_of=lambda a: (None, {"repeat": True}),
                            target=lambda: "wan.speech2video.WanS2V.generate")
    bound = inspect.signature(lambda input_prompt: None).bind("a cat")
    with pytest.raises(IntegrationError, match="WanS2V.generate: runs one sampling loop per clip"):
        calibrate_over_prompts(patch, bound)


def test_an_output_on_a_read_only_file_system_says_so(lut_path, tmp_path, capsys, monkeypatch):
    """`taocache check` and `calibrate` told root "Permission denied" for a LUT on a read-only mount (review,
    2026-11-29): the folder is what a write needs (a temporary file, then a rename), and its error is said."""
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    out = tmp_path / "c.png"
    out.write_bytes(b"")
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # (as access(2) answers on such a mount)
    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    assert cli_main(["plot", str(lut_path), "-o", str(out)]) == 1
    assert capsys.readouterr().err == (f"taocache plot: error: cannot write {out}: folder {tmp_path} cannot be written "
                                       "(Read-only file system)\n")
