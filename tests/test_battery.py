"""Hostile inputs found wrong by a battery run before the reviewers' (issues 11 and 12): one test per
class of problem, each failing before its fix. Exact messages where the message is the point."""
import json
import os
import stat
import threading
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from taohooks import CalibrationLUT, CalibrationRecorder, DenoiserHook, LoopSpec, TaoCache
from taohooks.cli import main
from taohooks.config import ConfigError, PlanConfig, config_from_dict, load_config
from taohooks.taocache.lut import LUTFormatError
from taohooks.run import main as run_main
from trajectories import GeometricDenoiser, run_loop

STEPS = 12


@pytest.fixture(scope="module")
def lut_file(tmp_path_factory):
    """A 2-prompt, 12-step LUT of the geometric denoiser (ratios 0.8 and 0.85)."""
    path = tmp_path_factory.mktemp("lut") / "geo.safetensors"
    model = GeometricDenoiser({"main": 0.9})
    rec = CalibrationRecorder(model_id="geo", identity={})  # (served to stand-ins)
    with DenoiserHook(LoopSpec(STEPS), [rec]).attach(model) as hook:
        for r in (0.8, 0.85):
            model.ratios["main"] = r
            hook.new_sample()
            run_loop(model, STEPS)
    rec.save(path)
    return path


def edited(src, dst, meta_edit=None, raw=None):
    """A copy of the LUT ``src`` with its metadata edited (``meta_edit(dict)``) or replaced by ``raw``."""
    with safe_open(str(src), "pt") as f:
        meta = json.loads(f.metadata()["taohooks_lut"])
    if meta_edit:
        meta_edit(meta)
    save_file(load_file(str(src)), str(dst), metadata={"taohooks_lut": raw if raw is not None else json.dumps(meta)})
    return dst


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def skipping_cache(lut, **plan):
    return TaoCache(config_from_dict({"lut": str(lut), "loop": {"steps": STEPS}, "calibration": {"auto": False},
                                      "plan": plan or {"budget": 3}}))


class Returns(nn.Module):
    """``forward(x, timestep)`` returns ``fn(x, step)``."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, timestep):
        return self.fn(x, float(timestep))


def run_steps(model, steps=STEPS):
    return [model(torch.ones(1, 3), timestep=torch.tensor([float(t)])) for t in range(steps)]


# ---------------------------------------------------------------------- special files as LUT paths
def test_a_fifo_or_device_named_as_lut_is_refused_and_never_replaced(tmp_path, lut_file, capsys):
    """Before: `lut: /dev/null` (or a FIFO) was taken for a missing LUT, calibrated into, and replaced by a
    regular file (as root, /dev/null itself)."""
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    cfg = config_from_dict({"lut": str(fifo), "loop": {"steps": STEPS}, "calibration": {"prompts": 2}})
    with pytest.raises(LUTFormatError) as info:
        TaoCache(cfg)
    assert str(info.value) == f"{fifo} is a FIFO (named pipe), not a calibration LUT file"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert cli(capsys, "merge", lut_file, "-o", fifo) == (
        1, f"taocache merge: error: cannot write {fifo}: it is a FIFO (named pipe), not a regular file; give a file path")
    assert cli(capsys, "show", "/dev/null") == (
        1, "taocache show: error: /dev/null is a character device, not a calibration LUT file")
    assert cli(capsys, "plan", tmp_path, "--budget", 2) == (
        1, f"taocache plan: error: {tmp_path} is a directory, not a calibration LUT file")
    dangling = tmp_path / "gone.safetensors"
    dangling.symlink_to(tmp_path / "nowhere.safetensors")
    assert cli(capsys, "show", dangling) == (
        1, f"taocache show: error: calibration LUT {dangling} does not exist (it is a link to "
           f"{tmp_path / 'nowhere.safetensors'}, which does not exist)")
    config = tmp_path / "cfg.yaml"
    config.write_text(f"lut: {fifo}\n")
    assert cli(capsys, "check", config)[1].endswith(
        f"lut: {fifo} is a FIFO (named pipe), not a LUT file; name a file such as luts/model.safetensors")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


# ---------------------------------------------------------------------- LUT metadata
def test_lut_metadata_that_no_calibration_writes_is_refused(tmp_path, lut_file):
    """Before: num_prompts 1000000 over 2 recorded prompts made a 2-prompt LUT count as complete (auto
    calibration stopped); a null metadata was called 'a JSON NoneType'."""
    def refused(**kw):
        path = edited(lut_file, tmp_path / "x.safetensors", **kw)
        with pytest.raises(LUTFormatError) as info:
            CalibrationLUT.load(path)
        return str(info.value)[len(str(path)) + 2:]

    assert refused(meta_edit=lambda m: m.update(num_prompts=1000000)) == (
        "metadata num_prompts is 1000000, but no step holds more than 2 values; expected the number of prompts "
        "recorded (the file is corrupt or was edited)")
    assert refused(raw="null") == "metadata 'taohooks_lut' is a JSON null; expected an object"
    assert refused(meta_edit=lambda m: m.update(calls_per_step=3)) == (
        "metadata calls_per_step is 3; expected 1 (one stream)")
    # a LUT of a zero-initialised model (every delta exactly 0, no statistic) still loads
    lut = CalibrationLUT.empty(LoopSpec(STEPS))
    lut.num_prompts = 2
    lut.save(tmp_path / "zero.safetensors")
    assert CalibrationLUT.load(tmp_path / "zero.safetensors").num_prompts == 2


# ---------------------------------------------------------------------- config paths
@pytest.mark.parametrize("lut,message", [
    ("$TAOHOOKS_BATTERY_EMPTY/x.safetensors",
     "lut: environment variable $TAOHOOKS_BATTERY_EMPTY is set to nothing (in '$TAOHOOKS_BATTERY_EMPTY/x.safetensors'), "
     "which would make the path '/x.safetensors'; set it, or write the path without it"),
    ("~no_such_user_here/x.safetensors",
     "lut: ~no_such_user_here in '~no_such_user_here/x.safetensors' is not a user on this machine; write the folder out"),
    ("a\0b.safetensors", "lut: the path 'a\\x00b.safetensors' holds a NUL character; no file name can"),
    ("  ", "lut: expected a file path such as luts/model.safetensors (or null: no LUT), got '  '"),
])
def test_lut_paths_that_would_land_elsewhere_are_config_errors(monkeypatch, lut, message):
    """Before: an empty $VAR wrote the LUT at the file system's root, ~nouser/ became a folder named
    '~nouser' next to the config, a NUL passed `taocache check`."""
    monkeypatch.setenv("TAOHOOKS_BATTERY_EMPTY", "")
    with pytest.raises(ConfigError) as info:
        config_from_dict({"lut": lut}, "c.yaml")
    assert str(info.value) == f"c.yaml: {message}"


def test_an_empty_stream_name_is_refused_with_the_config(tmp_path):
    """Before: accepted by `taocache check`, then refused by LoopSpec at attach without the file's name
    (and a LUT cannot hold it)."""
    with pytest.raises(ConfigError) as info:
        config_from_dict({"loop": {"streams": ["cond", ""]}}, "c.yaml")
    assert str(info.value) == "c.yaml: loop.streams[1]: expected a stream name such as cond, got ''"


# ---------------------------------------------------------------------- YAML that reads otherwise than it looks
@pytest.mark.parametrize("text,message", [
    ("plan: {budget: '8'}\n", "plan.budget: expected an integer or a number or null, got '8' (str); it is quoted, so "
                              "YAML reads it as text: write 8 without quotes"),
    ("plan: {lambda: 1e-300}\n", "plan.lambda: expected a number, got '1e-300' (str); YAML reads 1e-300 as text, "
                                 "write 1.0e-300"),
    ("plan: {window: [4, 6], ratio: 1e3}\n", "plan.ratio: expected 'calibrated' or a number such as 1.0, got '1e3'; "
                                             "YAML reads 1e3 as text, write 1000"),
    ("plan: {max_norm_ratio: off}\n", "plan.max_norm_ratio: expected a number or null, got False (bool); YAML reads "
                                      "yes/no/on/off/true/false as a boolean"),
    ("plan: [1, 2]\n", "plan: expected a mapping of keys (key: value lines indented below it, or {key: value, ...}), "
                       "got [1, 2] (list)"),
    ("a: " + "[" * 3000 + "]" * 3000 + "\n", "not a config: its YAML is nested too deeply to read"),
])
def test_yaml_surprises_say_what_yaml_read(tmp_path, text, message):
    """Before: 'write 1e-300' (still text to YAML), 'write 8' for a quoted 8, no hint for a ratio, 'expected
    PlanConfig', and a RecursionError without the file's name."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: {message}"


def test_tabs_in_yaml_are_named_and_the_file_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loop:\n\tsteps: 12\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert text.endswith("; YAML indents with spaces, not tabs") and f'in "{path}", line 2' in text
    assert "<unicode string>" not in text


def test_plan_config_built_in_python_refuses_nan_weights():
    """Before: PlanConfig(lambda_=nan) passed validate, and the window search died with an IndexError."""
    with pytest.raises(ConfigError, match=r"plan.lambda: expected a finite penalty weight >= 0, got nan"):
        PlanConfig(budget=2, lambda_=float("nan")).validate(lambda key, msg: (_ for _ in ()).throw(
            ConfigError(None, key, msg)))


# ---------------------------------------------------------------------- outputs of odd shape
def test_an_output_that_changes_shape_is_left_out_of_calibration_and_not_extrapolated(tmp_path, lut_file, capsys):
    """Before: a raw broadcasting RuntimeError from inside calibration, or (a leaf more) statistics of
    the first leaf only, silently."""
    model = Returns(lambda x, t: torch.ones(1, 3 + (t >= 5)) * 0.9 ** t)
    rec = CalibrationRecorder()
    with DenoiserHook(LoopSpec(STEPS), [rec]).attach(model) as hook:
        hook.new_sample()
        run_steps(model)
    assert rec.lut().num_prompts == 0
    assert capsys.readouterr().err == ("taohooks: warning: calibration: generation 1 left out of the LUT: stream "
                                       "'main', step 5: its output tensor has shape [1, 4], the step before [1, 3]\n")
    two = Returns(lambda x, t: [x * 0.9 ** t] * (1 + (t >= 5)))
    rec = CalibrationRecorder()
    with DenoiserHook(LoopSpec(STEPS), [rec]).attach(two) as hook:
        hook.new_sample()
        run_steps(two)
    assert rec.lut().num_prompts == 0 and "its output has 2 tensor(s), the step before had 1" in capsys.readouterr().err
    # skipping: window 6-8 needs steps 4 and 5; the shape changes at 5, so step 6 computes (a fallback)
    cache = skipping_cache(lut_file, window=[6, 8], ratio=1.0)
    with cache.attach(model):
        outs = run_steps(model)
    assert [tuple(o.shape) for o in outs] == [(1, 3)] * 5 + [(1, 4)] * 7
    assert cache.stats()["fallback_reasons"] == {"no history": 1}
    assert "taohooks: warning: stream 'main', step 5: its output tensor has shape [1, 4], the step before " \
           "[1, 3]; TaoCache extrapolates only between outputs of one shape (warned once)" in capsys.readouterr().err


def test_meta_tensors_are_said_as_such(lut_file):
    """Before: 'Tensor.item() cannot be called on meta tensors' / 'Cannot copy out of meta tensor'."""
    cache = skipping_cache(lut_file)
    model = Returns(lambda x, t: torch.empty(1, 3, device="meta"))
    with pytest.raises(TypeError) as info:
        with cache.attach(model):
            run_steps(model)
    assert str(info.value) == ("taohooks: the model returned a tensor on the meta device (shapes only, no data: were "
                               "its weights loaded?); cannot cache or calibrate an output without values")
    # a meta timestep is an unknown one, not a crash
    hook = DenoiserHook(LoopSpec(STEPS))
    class Echo(nn.Module):
        def forward(self, x, timestep):
            return x

    m = Echo()
    with hook.attach(m):
        for _ in range(STEPS):
            m(torch.ones(1), timestep=torch.empty(1, device="meta"))
    assert hook.counts == {"main": [STEPS, 0]}


# ---------------------------------------------------------------------- the Python API
def test_python_api_misuse_is_said_before_any_work(tmp_path, lut_file):
    """Before: TaoCache(dict) was an AttributeError, lut=3 a pathlib TypeError, streams="main" became
    the streams m, a, i, n, and a non-JSON identity failed every save after each generation's work."""
    with pytest.raises(TypeError, match=r"^taohooks: TaoCache\(config\) takes a TaoCacheConfig, got dict; use "
                                        r"TaoCache.from_yaml\(path\)"):
        TaoCache({"lut": str(lut_file)})
    with pytest.raises(TypeError, match=r"^taohooks: TaoCache\(lut=\) takes a CalibrationLUT or a path, got int$"):
        TaoCache(lut=3)
    cache = skipping_cache(lut_file)
    with cache.attach(GeometricDenoiser({"main": 0.9}), streams="main") as hook:
        assert hook.loop.streams == ("main",)
    calibrating = TaoCache(config_from_dict({"lut": str(tmp_path / "new.safetensors"), "loop": {"steps": STEPS}}))
    model = GeometricDenoiser({"main": 0.9})
    with pytest.raises(ValueError, match=r"^taohooks: attach\(identity=...\): identity 'a' is <object object at "):
        calibrating.attach(model, identity={"a": object()})
    assert "forward" not in model.__dict__ and not (tmp_path / "new.safetensors").exists()
    with pytest.raises(ValueError, match=r"^CalibrationRecorder\(identity=...\): identity 'b' is \{1\}"):
        CalibrationRecorder(identity={"b": {1}})


def test_a_second_thread_calling_during_a_generation_is_refused(lut_file):
    """Before: two threads' calls interleaved into one generation's step count (wrong steps skipped)."""
    class Slow(nn.Module):
        def forward(self, x, timestep):
            time.sleep(0.002)
            return x * 0.9 ** float(timestep)

    model, errors = Slow(), []
    cache = skipping_cache(lut_file)

    def second():
        try:
            model(torch.ones(1), timestep=0)
        except RuntimeError as exc:
            errors.append(str(exc))

    with cache.attach(model, repeat=True):
        for t in range(STEPS):
            model(torch.ones(1), timestep=t)
            if t == 1:  # between calls 1 and 2 of this thread's generation
                thread = threading.Thread(target=second)
                thread.start()
                thread.join()
    assert errors == ["taohooks: this Slow is called from a second thread while a generation runs in another (at call "
                      "2 of 12); one hooked model serves one generation at a time: give each thread its own model "
                      "instance, or a lock around each generation"]
    assert cache.hook.counts == {"main": [9, 3]}
    # a generation may begin (new_sample) in one thread and run in another
    with cache.attach(model):
        cache.new_sample()
        worker = threading.Thread(target=lambda: [model(torch.ones(1), timestep=t) for t in range(STEPS)])
        worker.start()
        worker.join()
    assert cache.hook.counts == {"main": [9, 3]}


# ---------------------------------------------------------------------- the command line
def test_command_line_numbers_and_inputs(tmp_path, lut_file, capsys):
    """Before: --lambda nan an IndexError traceback, --ratio inf 'no calibrated ratio', --steps 0 the LUT's
    12 steps, 'invalid _parse_ratio value', --devices 0 run as 1, and a LUT merged with itself counted twice."""
    with pytest.raises(SystemExit) as info:
        main(["plan", str(lut_file), "--window", "4", "6", "--ratio", "inf"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().endswith(
        "taocache plan: error: argument --ratio: expected 'calibrated' or a number such as 1.0, got 'inf'")
    with pytest.raises(SystemExit):
        main(["plan", str(lut_file), "--budget", "2", "--lambda", "nan"])
    assert capsys.readouterr().err.strip().endswith("taocache plan: error: argument --lambda: expected a finite number, "
                                                    "got nan")
    assert cli(capsys, "plan", lut_file, "--steps", 0) == (
        1, "taocache plan: error: command line: --steps: expected a number of steps from 1 to 100000, got 0")
    out = tmp_path / "out.safetensors"
    same = str(lut_file.parent / ".." / lut_file.parent.name / lut_file.name)
    assert cli(capsys, "merge", lut_file, same, "-o", out) == (
        1, f"taocache merge: error: {same} is given twice (as {lut_file}); its prompts would count twice: give "
           "each LUT once")
    assert not out.exists() and not (tmp_path / ".out.safetensors.lock").exists()  # refused before any write
    config = tmp_path / "cal.yaml"
    config.write_text(f"lut: {tmp_path / 'c.safetensors'}\nintegration: testbed\n")
    (tmp_path / "prompts.txt").write_text("a\n")
    assert cli(capsys, "calibrate", config, "--prompts", tmp_path / "prompts.txt", "--devices", 0, "--", "x.py") == (
        1, "taocache calibrate: error: command line: --devices: expected a number of processes >= 1, got 0")


def test_launcher_names_a_folder_or_an_option_given_as_the_script(tmp_path, capsys):
    """Before: 'script DIR does not exist' for a folder that exists, and for -m MODULE 'script -m does not exist'."""
    config = tmp_path / "c.yaml"
    config.write_text("integration: testbed\n")
    assert run_main([str(tmp_path), "--taocache", str(config)]) == 2
    assert capsys.readouterr().err == (f"taocache-run: script {tmp_path} is a directory; give the sample script inside "
                                       f"it (e.g. {tmp_path / 'generate.py'})\n")
    assert run_main(["-m", "sample", "--taocache", str(config)]) == 2
    assert capsys.readouterr().err == ("taocache-run: expected the sample script first, got the option -m; taocache-run "
                                       "runs a script file (python -m MODULE is not supported: give the module's .py "
                                       "file)\n")


# ---------------------------------------------------------------------- a save that fails at the last generation
def test_a_failed_calibration_save_is_retried_at_detach_and_a_loss_is_said(tmp_path, monkeypatch, capsys):
    """Before: the warning promised that the next generation retries; when there was none (the script's
    last clip), the statistics vanished at exit without a word."""
    import errno

    from taohooks.taocache import calibration
    from taohooks.runtime.io import FileWriteError, atomic_write_bytes

    path = tmp_path / "luts" / "geo.safetensors"
    disk_full = [True]

    def write(target, data):
        if disk_full[0]:
            raise FileWriteError(f"{target}: cannot write: the disk is full (No space left on device); any earlier "
                                 "version of the file is unchanged", errno.ENOSPC, target)
        return atomic_write_bytes(target, data)

    monkeypatch.setattr(calibration, "atomic_write_bytes", write)
    config = config_from_dict({"lut": str(path), "loop": {"steps": STEPS}, "calibration": {"prompts": 5}})
    model = GeometricDenoiser({"main": 0.9})
    cache = TaoCache(config)
    with cache.attach(model, repeat=True):
        run_loop(model, STEPS)
        disk_full[0] = False  # space was freed before the script ended
    assert CalibrationLUT.load(path).num_prompts == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"taohooks: calibration LUT {path}: the statistics of 1 prompt(s) that an earlier save could not write were "
        "saved when the hook was detached")
    disk_full[0] = True
    cache = TaoCache(config)
    with cache.attach(model, repeat=True):
        run_loop(model, STEPS)
    assert CalibrationLUT.load(path).num_prompts == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"taohooks: warning: calibration LUT {path}: the statistics of 1 prompt(s) could not be saved when the hook "
        f"was detached ({path}: cannot write: the disk is full (No space left on device); any earlier version of the "
        "file is unchanged); the process tries once more when it ends")
    import atexit

    saver = cache.hook.callbacks[1]
    saver._last_try("at the end of the process")  # what atexit runs
    assert capsys.readouterr().err.endswith("); they are lost, and a later run calibrates them again\n")
    atexit.unregister(saver._last_try)


def test_an_identity_with_tuples_resumes_and_merges_with_its_own_file(tmp_path):
    """Before: a tuple in attach(identity=...) was written as a JSON list; the next attach called the LUT
    'calibrated on another run', and a recorder resuming it could never flush (its prompts were lost)."""
    path = tmp_path / "geo.safetensors"
    config = config_from_dict({"lut": str(path), "loop": {"steps": STEPS}, "calibration": {"prompts": 4},
                               "plan": {"budget": 2}})
    model = GeometricDenoiser({"main": 0.9})
    for _ in range(2):
        with TaoCache(config).attach(model, identity={"sizes": (1, (2, 3)), "flag": True}, repeat=True):
            run_loop(model, STEPS)
            run_loop(model, STEPS)
    lut = CalibrationLUT.load(path)
    assert lut.num_prompts == 4 and lut.identity == {"sizes": [1, [2, 3]], "flag": True}
    with TaoCache(config).attach(model, identity={"sizes": [1, [2, 3]], "flag": True}):
        run_loop(model, STEPS)
    with pytest.raises(ValueError, match=r"flag: this run 1, the LUT True"):  # JSON's true is not 1
        TaoCache(config).attach(model, identity={"sizes": (1, (2, 3)), "flag": 1})


def test_a_script_that_changes_directory_does_not_move_the_lut(tmp_path, monkeypatch):
    """Before: with a relative config path (taocache-run ... --taocache cfgs/c.yaml), a script that ran
    os.chdir before sampling calibrated into a LUT under its new working directory."""
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "c.yaml").write_text("lut: ../luts/geo.safetensors\n")
    monkeypatch.chdir(tmp_path)
    config = load_config("cfgs/c.yaml")
    assert str(config.lut_path()) == os.path.join("cfgs", "..", "luts", "geo.safetensors")  # as given, for messages
    monkeypatch.chdir(tmp_path / "cfgs")
    assert str(config.lut_path()) == str(tmp_path / "cfgs" / ".." / "luts" / "geo.safetensors")
