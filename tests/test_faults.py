"""Fault injection (issue 12): concurrent calibration, kill -9 during a write, read-only folders, aborted
and non-finite generations, and the user's file modes and links. Works as root (CI): where
permissions do not stop root, a forked child drops to uid 65534."""
import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import taohooks
from taohooks import CalibrationLUT, CalibrationRecorder, DenoiserHook, LoopSpec, TaoCache
from taohooks.cli import main
from taohooks.runtime.io import FileWriteError, atomic_write_bytes, check_writable, locked
from trajectories import GeometricDenoiser, run_loop

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
STEPS = 12


def reference(ratio_lists, steps=STEPS):
    """One process recording every generation: what the merged file must hold."""
    model = GeometricDenoiser({"main": 0.9})
    rec = CalibrationRecorder()
    with DenoiserHook(LoopSpec(steps), [rec]).attach(model) as hook:
        for r in [r for rs in ratio_lists for r in rs]:
            model.ratios["main"] = r
            hook.new_sample()
            run_loop(model, steps)
    return rec.lut()


def assert_same_statistics(lut, ref):
    assert lut.num_prompts == ref.num_prompts
    for m in ("cos", "ratio"):
        a, b = getattr(lut, m), getattr(ref, m)
        assert torch.equal(a.count, b.count)
        assert torch.allclose(a.total, b.total, rtol=0, atol=1e-9)
        assert torch.allclose(a.total_sq, b.total_sq, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------- class 1: concurrent writers
CALIBRATING_CHILD = """
import sys, time
from pathlib import Path
from taohooks import TaoCache
from trajectories import GeometricDenoiser, run_loop
cfg, go, ratios = sys.argv[1], Path(sys.argv[2]), [float(r) for r in sys.argv[3].split(",")]
model = GeometricDenoiser({"main": 0.9})
cache = TaoCache.from_yaml(cfg)
with cache.attach(model, repeat=True):
    assert cache.calibrating
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.002)
    for r in ratios:
        model.ratios["main"] = r
        run_loop(model, %d)
print("done", cache.recorder.lut().num_prompts, flush=True)
""" % STEPS


def test_two_processes_auto_calibrating_one_lut_keep_every_generation(tmp_path):
    """This process and a child calibrate the same missing LUT at once (a job array does this)."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"lut: luts/geo.safetensors\ncalibration: {{prompts: 1000}}\nloop: {{steps: {STEPS}}}\n")
    go = tmp_path / "go"
    ratios = [[0.5, 0.55, 0.6, 0.65, 0.7, 0.75], [0.91, 0.92, 0.93, 0.94, 0.95, 0.96]]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]), TAOHOOKS_VERBOSITY="quiet")
    model = GeometricDenoiser({"main": 0.9})
    cache = TaoCache.from_yaml(cfg)
    with cache.attach(model, repeat=True):  # both attached before either wrote: both start from no LUT
        child = subprocess.Popen([sys.executable, "-c", CALIBRATING_CHILD, str(cfg), str(go),
                                  ",".join(map(str, ratios[1]))], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready", child.stderr.read()
            go.touch()
            for r in ratios[0]:
                model.ratios["main"] = r
                run_loop(model, STEPS)
                time.sleep(0.002)
            out, err = child.communicate(timeout=120)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert child.returncode == 0 and err == "", err
    lut = CalibrationLUT.load(tmp_path / "luts" / "geo.safetensors")
    assert lut.num_prompts == 12 and lut.cos.count[0].tolist() == [0, 0] + [12] * (STEPS - 2)
    assert_same_statistics(lut, reference(ratios))
    # what a writer knows after its last flush includes what the other wrote before
    assert max(int(out.split()[-1]), cache.recorder.lut().num_prompts) == 12
    assert min(int(out.split()[-1]), cache.recorder.lut().num_prompts) >= 6


def test_flush_adds_to_what_another_writer_saved(tmp_path):
    path = tmp_path / "lut.safetensors"
    model = GeometricDenoiser({"main": 0.9})
    first, second = CalibrationRecorder(), CalibrationRecorder()
    with DenoiserHook(LoopSpec(STEPS), [first]).attach(model) as h1:
        with DenoiserHook(LoopSpec(STEPS), [second]).attach(GeometricDenoiser({"main": 0.7})) as h2:
            for r, hook, rec in ((0.5, h1, first), (0.6, h2, second), (0.8, h1, first)):
                hook.module.ratios["main"] = r
                hook.new_sample()
                run_loop(hook.module, STEPS)
                rec.flush(path)
    assert first.lut().num_prompts == 3 and second.lut().num_prompts == 2  # second flushed before first's last
    assert first.pending_prompts == 0
    assert_same_statistics(CalibrationLUT.load(path), reference([[0.5, 0.6, 0.8]]))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lut.safetensors.lock", "lut.safetensors"]


def test_merge_cli_merges_under_the_lock_and_never_overwrites_an_unlisted_file(tmp_path, capsys):
    a = reference([[0.5]]).save(tmp_path / "a.safetensors")
    b = reference([[0.6, 0.7]]).save(tmp_path / "b.safetensors")
    assert main(["merge", str(a), str(b), "-o", str(a)]) == 0  # into one of the inputs
    assert CalibrationLUT.load(a).num_prompts == 3
    assert main(["merge", str(b), "-o", str(a)]) == 1
    assert capsys.readouterr().err.endswith(
        f"taocache merge: error: {a} exists and is not one of the inputs; list it among the inputs to merge "
        "into it, or remove it first\n")
    assert CalibrationLUT.load(a).num_prompts == 3
    with locked(a):  # a calibrating process holds the file: merge waits for it, then reads its result
        import threading
        worker = threading.Thread(target=main, args=(["merge", str(a), str(b), "-o", str(a)],))
        worker.start()
        time.sleep(0.3)
        assert worker.is_alive()
        reference([[0.1]]).save(a)  # what the other writer adds meanwhile (1 prompt)
    worker.join(30)
    assert CalibrationLUT.load(a).num_prompts == 1 + 2


# ---------------------------------------------------------------------- class 2: only complete generations
def test_an_aborted_generation_adds_nothing(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"lut: geo.safetensors\ncalibration: {{prompts: 3}}\nloop: {{steps: {STEPS}}}\n")
    model = GeometricDenoiser({"main": 0.5})

    class Failing(torch.nn.Module):
        fail_at = None

        def forward(self, x, timestep, stream="main"):
            if float(timestep) == self.fail_at:
                raise RuntimeError("out of memory")
            return model(x, timestep)

    net = Failing()
    cache = TaoCache.from_yaml(cfg)
    with cache.attach(net, repeat=True):
        run_loop(net, STEPS)
        net.fail_at, model.ratios["main"] = 7.0, 0.9
        with pytest.raises(RuntimeError, match="out of memory"):  # caught by the user's script
            run_loop(net, STEPS)
        assert cache.recorder.lut().num_prompts == 1
        net.fail_at, model.ratios["main"] = None, 0.6
        run_loop(net, STEPS)
    err = capsys.readouterr().err
    assert ("taohooks: warning: calibration: generation 2 stopped before its last call (RuntimeError in call 7 "
            "(step 7)); its statistics were left out of the LUT\n") in err
    lut = CalibrationLUT.load(tmp_path / "geo.safetensors")
    assert lut.num_prompts == 2 and cache.recorder.lut().num_prompts == 2
    assert_same_statistics(lut, reference([[0.5, 0.6]]))


@pytest.mark.parametrize("stop,said", [(KeyboardInterrupt, "Ctrl-C (KeyboardInterrupt)"), ("sigterm", "SIGTERM")])
@pytest.mark.parametrize("where", ["in call 7 (step 7)", "between model calls"])
def test_an_interrupted_calibration_names_what_stopped_it(tmp_path, capsys, stop, said, where):
    """A SIGTERM (which commands raise as Ctrl-C is raised) was said as "KeyboardInterrupt" (docs check, 2026-11-28);
    between two model calls (the scheduler step, the VAE) as "Terminated raised during sampling" (review16)."""
    from taohooks.runtime.interrupt import Terminated

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"lut: geo.safetensors\ncalibration: {{prompts: 3}}\nloop: {{steps: {STEPS}}}\n")
    model = GeometricDenoiser({"main": 0.5})
    inside = where.startswith("in call")

    def stopping(x, timestep, stream="main"):
        if float(timestep) == 7.0:
            if inside:
                raise Terminated if stop == "sigterm" else stop
            stopping.after = True
        return model(x, timestep)

    net = torch.nn.Module()
    net.forward = stopping
    cache = TaoCache.from_yaml(cfg)
    with pytest.raises(KeyboardInterrupt):
        with cache.attach(net, repeat=True):
            for t in range(STEPS):
                net(torch.zeros(1, 1), timestep=torch.tensor([float(t)]))
                if getattr(stopping, "after", False):  # (the loop's own work after the model call)
                    raise Terminated if stop == "sigterm" else stop
    assert (f"calibration: generation 1 stopped before its last call ({said} {where}); its statistics "
            "were left out of the LUT\n") in capsys.readouterr().err


def test_non_finite_generations_are_left_out_and_an_all_nan_calibration_saves_nothing(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"lut: geo.safetensors\ncalibration: {{prompts: 2}}\nloop: {{steps: {STEPS}}}\n")
    model = GeometricDenoiser({"main": 0.5})

    class Broken(torch.nn.Module):
        nan_from = scale = None

        def forward(self, x, timestep, stream="main"):
            out = model(x, timestep)
            if self.scale is not None:
                out = out * self.scale
            if self.nan_from is not None and float(timestep) >= self.nan_from:
                out = out * float("nan")
            return out

    net = Broken()
    cache = TaoCache.from_yaml(cfg)
    with cache.attach(net, repeat=True):
        net.nan_from = 0.0
        run_loop(net, STEPS)  # all NaN: nothing recorded, nothing written
        assert not (tmp_path / "geo.safetensors").exists() and cache.recorder.lut().num_prompts == 0
        net.nan_from = None
        run_loop(net, STEPS)
        net.nan_from = 7.0
        run_loop(net, STEPS)
        net.nan_from, net.scale = None, 3e30  # finite in float32, but its squares overflow
        run_loop(net, STEPS)
    err = capsys.readouterr().err
    assert ("taohooks: warning: calibration: generation 1 left out of the LUT: stream 'main', step 0: its output "
            "is not finite (NaN or inf)\n") in err
    assert ("taohooks: warning: calibration: generation 3 left out of the LUT: stream 'main', step 7: its output "
            "is not finite (NaN or inf)\n") in err
    assert ("taohooks: warning: calibration: generation 4 left out of the LUT: stream 'main', step 2: its "
            "statistics overflow float32\n") in err
    lut = CalibrationLUT.load(tmp_path / "geo.safetensors")
    assert lut.num_prompts == 1 and torch.isfinite(lut.ratio.total).all()
    assert_same_statistics(lut, reference([[0.5]]))


def test_a_complete_lut_file_takes_no_more_prompts_but_refuses_another_runs(tmp_path, capsys, monkeypatch):
    """Once another process completed the file, a flush leaves this one's prompts out (every process then plans from
    the same LUT); a complete file of another run is refused as a merge refuses it, and a retried save that left its
    prompts out is not reported as saved (review, 2026-11-27)."""
    import dataclasses

    import taohooks.taocache.calibration as calibration

    path = tmp_path / "geo.safetensors"
    other = reference([[0.5, 0.6]])  # 2 prompts: complete for a limit of 2
    model = GeometricDenoiser({"main": 0.7})
    rec = CalibrationRecorder(identity={"shift": 5.0})
    rec.limit = 2
    with DenoiserHook(LoopSpec(STEPS), [rec]).attach(model) as hook:
        hook.new_sample()
        run_loop(model, STEPS)
    dataclasses.replace(other, identity={"shift": 5.0}).save(path)
    before = path.read_bytes()
    assert rec.flush(path).num_prompts == 2 and rec.left_out == 1 and path.read_bytes() == before
    assert "was completed by another process (2 prompts) before this one's last 1 prompt(s)" in capsys.readouterr().err
    rec2 = CalibrationRecorder(identity={"shift": 8.0})
    rec2.limit = 2
    with DenoiserHook(LoopSpec(STEPS), [rec2]).attach(model) as hook:
        hook.new_sample()
        run_loop(model, STEPS)
    with pytest.raises(taohooks.taocache.lut.LUTMismatchError, match="cannot merge: identity 'shift'"):
        rec2.flush(path)
    assert path.read_bytes() == before and rec2.pending_prompts == 1
    # TaoCache: the first save fails, another process completes the file, the retry at detach leaves the prompt out
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"lut: fresh.safetensors\ncalibration: {{prompts: 2}}\nloop: {{steps: {STEPS}}}\n")
    real = calibration.atomic_write_bytes

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")
    monkeypatch.setattr(calibration, "atomic_write_bytes", full_disk)
    cache = TaoCache.from_yaml(cfg)
    with cache.attach(model):
        run_loop(model, STEPS)
        assert "was not saved" in capsys.readouterr().err
        monkeypatch.setattr(calibration, "atomic_write_bytes", real)
        other.save(tmp_path / "fresh.safetensors")
    err = capsys.readouterr().err
    assert "completed by another process" in err and "were saved when the hook was detached" not in err


def test_a_data_parallel_rank_says_what_it_leaves_out(tmp_path, capsys, monkeypatch):
    """Under DDP a rank other than 0 left a NaN generation out of the LUT without a word; rank 0 said it (DDP
    walkthrough, 2026-11-27). Each data-parallel rank records prompts of its own: it says so on that rank."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"lut: geo.safetensors\ncalibration: {{prompts: 2}}\nloop: {{steps: {STEPS}}}\n")
    model = GeometricDenoiser({"main": 0.5})

    class Broken(torch.nn.Module):
        def forward(self, x, timestep, stream="main"):
            return model(x, timestep) * float("nan")

    monkeypatch.setenv("RANK", "1")  # (no group: torchrun's variable says the rank)
    for data_parallel in (False, True):
        net, cache = Broken(), TaoCache.from_yaml(cfg)
        cache.data_parallel = data_parallel
        with cache.attach(net, repeat=True):
            run_loop(net, STEPS)
        said = "left out of the LUT: stream 'main', step 0: its output is not finite" in capsys.readouterr().err
        assert said == data_parallel


def test_a_generation_at_other_timesteps_is_left_out(capsys):
    model, rec = GeometricDenoiser({"main": 0.5}), CalibrationRecorder()
    with DenoiserHook(LoopSpec(STEPS), [rec]).attach(model) as hook:
        for shift in (0.0, 100.0, 0.0):  # the second generation's sampler runs step 4 at another timestep
            hook.new_sample()
            for t in range(STEPS):
                model(torch.zeros(1, 1), timestep=torch.tensor([t + (shift if t == 4 else 0.0)]))
    assert ("taohooks: warning: calibration: generation 2 left out of the LUT: step 4 ran at timestep 104, the "
            "LUT's generations at 4 (a different sampler, shift or step count?)\n") in capsys.readouterr().err
    assert rec.lut().num_prompts == 2 and rec.lut().timesteps.tolist() == [float(t) for t in range(STEPS)]


# ---------------------------------------------------------------------- class 3: writes that cannot work
def test_what_cannot_be_written_is_named_before_any_work(tmp_path):
    (tmp_path / "adir").mkdir()
    with pytest.raises(FileWriteError) as info:
        check_writable(tmp_path / "adir")
    assert str(info.value) == f"{tmp_path / 'adir'}: cannot write: it is a directory; give a file name inside it"
    assert info.value.filename == str(tmp_path / "adir") and info.value.errno == errno.EISDIR
    (tmp_path / "afile").write_text("x")
    target = tmp_path / "afile" / "luts" / "geo.safetensors"
    with pytest.raises(FileWriteError) as info:
        check_writable(target)
    assert str(info.value) == f"{target}: cannot write: {tmp_path / 'afile'} is a file, not a folder"
    with pytest.raises(FileWriteError, match=r"^/proc/taohooks-test/lut.safetensors: cannot write: folder "
                                             r"/proc/taohooks-test cannot be created \("):
        check_writable("/proc/taohooks-test/lut.safetensors")
    assert check_writable(tmp_path / "new" / "lut.safetensors") == tmp_path / "new" / "lut.safetensors"
    assert list((tmp_path / "new").iterdir()) == []


def test_a_full_disk_names_the_path_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = reference([[0.5]]).save(tmp_path / "lut.safetensors")
    before = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(taohooks.runtime.io.os, "fsync", full)
    with pytest.raises(FileWriteError) as info:
        reference([[0.6]]).save(path)
    assert str(info.value) == (f"{path}: cannot write: the disk is full (No space left on device); any earlier "
                               "version of the file is unchanged")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["lut.safetensors"]


def test_a_failed_save_is_a_warning_and_the_generation_keeps_its_output(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"lut: luts/geo.safetensors\ncalibration: {{prompts: 5}}\nloop: {{steps: {STEPS}}}\n")
    model = GeometricDenoiser({"main": 0.5})
    cache = TaoCache.from_yaml(cfg)
    path = tmp_path / "luts" / "geo.safetensors"
    with cache.attach(model, repeat=True):
        shutil.rmtree(tmp_path / "luts", ignore_errors=True)
        (tmp_path / "luts").write_text("not a folder")  # the folder became a file after the checks
        out = run_loop(model, STEPS)
        assert len(out["main"]) == STEPS and torch.isfinite(out["main"][-1]).all()
        (tmp_path / "luts").unlink()
        run_loop(model, STEPS)
    err = capsys.readouterr().err
    assert (f"taohooks: warning: calibration LUT {path} was not saved: {path}: cannot write: {tmp_path / 'luts'} is "
            "a file, not a folder. The statistics of 1 prompt(s) are kept in memory and the next generation tries "
            "again\n") in err
    assert CalibrationLUT.load(path).num_prompts == 2  # nothing lost


def test_a_save_failing_with_another_error_is_a_warning_too(tmp_path, capsys, monkeypatch):
    """Only OSError/ValueError were caught: a core install without numpy (safetensors' save imports it) raised
    ModuleNotFoundError out of the model call at the end of the first generation, and the script died."""
    from taohooks.taocache import calibration

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"lut: luts/geo.safetensors\ncalibration: {{prompts: 5}}\nloop: {{steps: {STEPS}}}\n")
    model = GeometricDenoiser({"main": 0.5})
    real_flush = calibration.CalibrationRecorder.flush

    def no_numpy(self, path):
        raise ModuleNotFoundError("No module named 'numpy'")

    monkeypatch.setattr(calibration.CalibrationRecorder, "flush", no_numpy)
    with TaoCache.from_yaml(cfg).attach(model, repeat=True):
        out = run_loop(model, STEPS)
        assert len(out["main"]) == STEPS
        monkeypatch.setattr(calibration.CalibrationRecorder, "flush", real_flush)
        run_loop(model, STEPS)
    path = tmp_path / "luts" / "geo.safetensors"
    assert (f"calibration LUT {path} was not saved: ModuleNotFoundError: No module named 'numpy'. The statistics of 1 "
            "prompt(s) are kept in memory") in capsys.readouterr().err
    assert CalibrationLUT.load(path).num_prompts == 2  # nothing lost


def as_nobody(fn):
    """``fn()``'s text, run in a forked child that dropped to uid/gid 65534 if it was root."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            text = fn()
        except BaseException as exc:
            text = f"unexpected {type(exc).__name__}: {exc}"
        os.write(write, text.encode())
        os._exit(0)
    os.close(write)
    chunks = []
    while True:
        chunk = os.read(read, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


def test_a_read_only_lut_folder(tmp_path):
    top = Path(tempfile.mkdtemp(prefix="taohooks-ro-"))  # not under pytest's 0700 folder: uid 65534 must enter
    try:
        top.chmod(0o755)
        folder = top / "luts"
        folder.mkdir()
        path = folder / "geo.safetensors"
        model = GeometricDenoiser({"main": 0.5})
        rec = CalibrationRecorder()
        with DenoiserHook(LoopSpec(STEPS), [rec]).attach(model) as hook:
            hook.new_sample()
            run_loop(model, STEPS)
        folder.chmod(0o555)

        def attempt():
            lines = []
            for call in (lambda: check_writable(path), lambda: rec.flush(path)):
                try:
                    call()
                    lines.append("written")
                except FileWriteError as exc:
                    lines.append(f"{exc} | {exc.filename} | {rec.pending_prompts}")
            return "\n".join(lines)

        assert as_nobody(attempt).splitlines() == [
            f"{path}: cannot write: folder {folder} is not writable (Permission denied) | {path} | 1",
            f"{path}: cannot write: folder {folder} is not writable (Permission denied; needed for the lock file "
            f".geo.safetensors.lock) | {path} | 1"]
        (folder / ".geo.safetensors.lock").touch()  # a lock file from an earlier run: the write itself fails
        (folder / ".geo.safetensors.lock").chmod(0o644)
        assert as_nobody(lambda: attempt().splitlines()[1]) == (
            f"{path}: cannot write: folder {folder} is not writable (Permission denied) | {path} | 1")
        assert not path.exists()
    finally:
        for p in (top, top / "luts"):
            if p.exists():
                p.chmod(0o755)
        shutil.rmtree(top)


# ---------------------------------------------------------------------- class 7: the user's files
KILLED_WRITER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("taohooks_io", sys.argv[1])
io = importlib.util.module_from_spec(spec)
spec.loader.exec_module(io)  # only the standard library: starts fast
datas = [open(p, "rb").read() for p in sys.argv[3:]]
io.atomic_write_bytes(sys.argv[2], datas[0])
print("writing", flush=True)
while True:
    for data in datas:
        io.atomic_write_bytes(sys.argv[2], data)
"""


def test_kill_9_during_writes_leaves_a_valid_lut_and_the_next_write_cleans_up(tmp_path):
    loop = LoopSpec(5000, ("a", "b", "c", "d"))  # 1.3 MB files: most of the writer's time is inside a write
    versions = []
    for prompts in (1, 2):
        lut = CalibrationLUT.empty(loop)
        lut.num_prompts = prompts
        versions.append(tmp_path / f"v{prompts}.bin")
        versions[-1].write_bytes(lut.to_bytes())
    folder = tmp_path / "luts"
    path = folder / "big.safetensors"
    left_behind = 0
    for attempt in range(12):
        child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(ROOT / "taohooks" / "runtime" / "io.py"), str(path)]
                                 + [str(v) for v in versions], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "writing"
        assert CalibrationLUT.load(path).num_prompts in (1, 2)  # a reader meanwhile sees a whole old or new file
        time.sleep(0.005 * (attempt % 4))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
        assert CalibrationLUT.load(path).num_prompts in (1, 2)
        stale = [p for p in folder.iterdir() if p.name.endswith(".tmp")]
        assert all(p.name.startswith(f".big.safetensors.{child.pid}.") for p in stale)
        left_behind += len(stale)
        if left_behind:
            break
    assert left_behind >= 1  # the kill did land inside a write
    lut = CalibrationLUT.load(path)
    lut.save(path)  # the next write removes the dead writers' temporaries
    assert [p.name for p in folder.iterdir()] == ["big.safetensors"]


def test_stale_temporary_rules(tmp_path):
    path = tmp_path / "lut.safetensors"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # ended, not reaped: a killed DDP rank under Lightning's launcher (a child of rank 0) looked alive
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    while not Path(f"/proc/{zombie.pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] == b"Z":
        time.sleep(0.01)
    old_own = tmp_path / f".lut.safetensors.{os.getpid()}.0123abcd.tmp"
    fresh_own = tmp_path / f".lut.safetensors.{os.getpid()}.4567abcd.tmp"  # another thread's write in progress
    of_dead = tmp_path / f".lut.safetensors.{dead.pid}.89abcdef.tmp"
    of_live = tmp_path / ".lut.safetensors.1.fedcba98.tmp"  # pid 1 is alive
    of_zombie = tmp_path / f".lut.safetensors.{zombie.pid}.76543210.tmp"
    old_mkstemp, fresh_mkstemp = tmp_path / ".lut.safetensors.k2_9xqaz.tmp", tmp_path / ".lut.safetensors.a1b2c3d_.tmp"
    unrelated = [tmp_path / ".other.safetensors.99999999.0123abcd.tmp", tmp_path / ".lut.safetensors.tmp",
                 tmp_path / "lut.safetensors.1.0123abcd.tmp"]
    for p in [old_own, fresh_own, of_dead, of_live, of_zombie, old_mkstemp, fresh_mkstemp] + unrelated:
        p.write_bytes(b"partial")
    hours_ago = time.time() - 7200
    for p in [old_own, old_mkstemp] + unrelated:
        os.utime(p, (hours_ago, hours_ago))
    atomic_write_bytes(path, b"new")
    zombie.wait()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([fresh_own.name, of_live.name, fresh_mkstemp.name, "lut.safetensors"]
                          + [p.name for p in unrelated])


@pytest.mark.parametrize("mode", [0o644, 0o664, 0o640, 0o444])
def test_a_rewritten_lut_keeps_its_mode(tmp_path, mode):
    path = reference([[0.5]]).save(tmp_path / "lut.safetensors")
    path.chmod(mode)
    reference([[0.6]]).save(path)
    assert stat.S_IMODE(path.stat().st_mode) == mode and CalibrationLUT.load(path).num_prompts == 1


def test_a_new_lut_gets_the_umask_mode(tmp_path):
    old = os.umask(0o002)
    try:
        path = reference([[0.5]]).save(tmp_path / "lut.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o664


def test_a_lut_path_that_is_a_symlink_stays_a_link(tmp_path):
    (tmp_path / "shared").mkdir()
    target = reference([[0.5]]).save(tmp_path / "shared" / "geo.safetensors")
    link = tmp_path / "geo.safetensors"
    link.symlink_to(target)
    model = GeometricDenoiser({"main": 0.6})
    rec = CalibrationRecorder(resume=CalibrationLUT.load(link))
    with DenoiserHook(LoopSpec(STEPS), [rec]).attach(model) as hook:
        hook.new_sample()
        run_loop(model, STEPS)
    rec.flush(link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert_same_statistics(CalibrationLUT.load(target), reference([[0.5, 0.6]]))
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == [".geo.safetensors.lock", "geo.safetensors"]


def test_a_lut_taken_by_another_runs_prompts_sends_this_runs_to_a_file_of_its_own(tmp_path, capsys):
    """A review (2026-11-29): two runs of different settings auto-calibrating one new LUT: the one that wrote second
    could never save (its merge is refused), kept its prompts in memory "to try again" at every generation, named its
    own statistics "LUT", and lost them at the end. Now they go, at once, to a file of its own next to the LUT."""
    import dataclasses

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"lut: geo.safetensors\ncalibration: {{prompts: 50}}\nloop: {{steps: {STEPS}}}\n")
    path = tmp_path / "geo.safetensors"
    model = GeometricDenoiser({"main": 0.7})
    cache = TaoCache.from_yaml(cfg)
    with cache.attach(model, repeat=True, identity={"shift": 3.0}):
        dataclasses.replace(reference([[0.5, 0.6]]), identity={"shift": 5.0}).save(path)  # the other run's, first
        before = path.read_bytes()
        run_loop(model, STEPS)
        run_loop(model, STEPS)
    err = capsys.readouterr().err
    side = next(tmp_path.glob("geo.run-*.safetensors"))
    assert (f"calibration LUT {path} cannot take this run's prompts: cannot merge: identity 'shift' is 5.0 in LUT "
            f"{path} and 3.0 in this run's statistics") in err, err
    assert f"they go to {side} instead (and so do the next generations'): to use them, give this run lut: {side}" in err
    assert err.count("cannot take this run's prompts") == 1 and "was not saved" not in err
    assert path.read_bytes() == before
    mine = CalibrationLUT.load(side)
    assert mine.num_prompts == 2 and mine.identity == {"shift": 3.0}


def test_resuming_a_lut_merged_from_the_file_then_flushing_into_it_is_refused(tmp_path):
    """A review (2026-11-29): `CalibrationRecorder(resume=y.merge(z)).flush(y)` added y's prompts to y again (the
    merged LUT names no file, so it was taken for one resumed from elsewhere): 7 prompts for 5."""
    path = tmp_path / "y.safetensors"
    reference([[0.5, 0.6], [0.55, 0.65]]).save(path)
    y, z = CalibrationLUT.load(path), reference([[0.7, 0.8]])
    rec = CalibrationRecorder(resume=y.merge(z), identity={})
    with DenoiserHook(LoopSpec(STEPS), [rec]).attach(GeometricDenoiser({"main": 0.9})) as hook:
        hook.new_sample()
        run_loop(hook.module, STEPS)
    before = path.read_bytes()
    with pytest.raises(taohooks.taocache.lut.LUTMismatchError, match=r"this recorder resumed LUT, which holds 4 of the "
                       r"prompts of .*y\.safetensors already \(a merge with it, or a copy\)"):
        rec.flush(path)
    assert path.read_bytes() == before and rec.pending_prompts == 1
    assert rec.flush(tmp_path / "new.safetensors").num_prompts == 4 + 2 + 1  # (a new file: nothing counted twice)
