"""benchmarks/gpu_speed.py runs (tiny model on CPU) and reports what it should."""
import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("diffusers")


def test_gpu_speed_smoke(tmp_path, capsys):
    path = Path(__file__).parents[1] / "benchmarks" / "gpu_speed.py"
    spec = importlib.util.spec_from_file_location("gpu_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.late_window(50, 8) == [40, 47]
    out = tmp_path / "r.json"
    assert module.main(["--tiny", "--device", "cpu", "--dtype", "float32", "--frames", "5", "--height", "32",
                        "--width", "32", "--steps", "10", "--budgets", "0.2", "0.25", "--repeats", "1",
                        "--json", str(out)]) == 0
    record, half = json.loads(out.read_text())
    assert record["skipped_calls"] == 4 and record["calls"] == 20 and record["ideal"] == pytest.approx(1.25)
    assert "| 5 | 0.20 | 4/20 |" in capsys.readouterr().out
    # 0.25 of 10 steps is 3 skips, as taocache bench counts a budget (round() made it 2: half to even)
    assert half["skipped_calls"] == 6


def test_gpu_session_script_smoke(tmp_path):
    """benchmarks/gpu_session.sh (the one device call of a session lent a GPU) in its CPU smoke mode: every
    stage runs and leaves its files under $OUT (the scenes model from scratch: no weights to continue; the
    measurement on a device that fails, then again on the CPU; the bench of SCENES_BENCH=1)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path / "out"), "PYTHON": sys.executable,
           "INIT": "none", "OMP_NUM_THREADS": "1", "MEASURE_DEVICE": "nonsense",
           "SCENES_BENCH": "1"}
    res = subprocess.run(["bash", str(root / "benchmarks" / "gpu_session.sh")], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    assert json.loads((out / "gpu_speed.json").read_text())[0]["calls"] == 12
    assert (out / "scenes-flow.safetensors").stat().st_size > 1_000_000
    assert "done: 3 steps" in (out / "train.log").read_text()
    assert json.loads((out / "sensitivity.json").read_text())["n"] == 2
    assert "--device nonsense: not usable here" in (out / "sensitivity.log").read_text()
    assert "again on the CPU, 2 pairs" in res.stdout
    records = json.loads((out / "bench_scenes" / "results.json").read_text())["records"]  # stage 4
    assert [r["method"] for r in records] == ["full", "taocache", "teacache"]
    assert "no " in res.stdout and "the scenes training starts from scratch" in res.stdout and "done" in res.stdout


def test_gpu_session_script_eps_warm_starts_from_the_flow_weights_and_benches_as_scenes_eps(tmp_path):
    """KIND=eps with no eps weights and no INIT=: the trunk of the newest flow weights (train_scenes --warm-start),
    not a start from scratch, under its own file names; SCENES_BENCH=1 benches it as taocache bench's scenes-eps
    (Latte's loop), not as the flow model `scenes` (which would refuse its checkpoint); WARM= naming no file is
    refused before anything runs. (One run for both: each run of the script costs the suite 30-40 s.)"""
    import os
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "KIND": "eps",
           "MEASURE": "0", "SPEED": "0", "SCENES_BENCH": "1", "CARRY": str(tmp_path / "carry"), "OMP_NUM_THREADS": "1"}
    env.pop("INIT", None)
    res = subprocess.run(["bash", str(root / "benchmarks" / "gpu_session.sh")], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    committed = sorted((root / "taohooks" / "testbed" / "weights" / "wip").glob("scenes-flow-step*.safetensors"))
    summary = json.loads((tmp_path / "out" / "scenes-eps.json").read_text())
    assert summary["warm_start"]["path"] == f"taohooks/testbed/weights/wip/{committed[-1].name}"
    assert "the eps model starts from the trunk of" in res.stdout
    out = tmp_path / "out"
    assert (out / "scenes-eps.safetensors").is_file() and not (out / "scenes-flow.safetensors").exists()
    records = json.loads((out / "bench_scenes-eps" / "results.json").read_text())["records"]
    assert {r["model"] for r in records} == {"scenes-eps"} and [r["method"] for r in records] == ["full", "taocache",
                                                                                                 "teacache"]
    bad = subprocess.run(["bash", str(root / "benchmarks" / "gpu_session.sh")], cwd=root,
                         env={**env, "WARM": "nothere.safetensors", "OUT": str(tmp_path / "bad")},
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "WARM=nothere.safetensors: no such file" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_gpu_session_script_patch4_without_measurements(tmp_path):
    """PATCH=4 trains the 4x4-token model into its own file; MEASURE=0 leaves out stage 3; the training's
    learning rate anneals over its --max-minutes; an unknown PATCH, --patch in TRAIN_EXTRA and a fractional
    TRAIN_SECONDS are refused before anything runs."""
    import os
    import subprocess
    import sys

    from taohooks.testbed.model import VideoDiTConfig, read_metadata

    root = Path(__file__).parents[1]
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "PATCH": "4",
           "INIT": "none", "MEASURE": "0", "SPEED": "0", "OMP_NUM_THREADS": "1"}  # (the smoke test runs stage 1)
    res = subprocess.run(["bash", str(root / "benchmarks" / "gpu_session.sh")], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    config = VideoDiTConfig.from_json(read_metadata(str(out / "scenes-flow-p4.safetensors"))["config"])
    assert config.patch_size == 4 and not (out / "scenes-flow.safetensors").exists()
    assert "--schedule cosine-time" in res.stdout and "--max-minutes 1.333" in res.stdout
    assert "3. scenes_sensitivity: skipped (MEASURE=0)" in res.stdout and not (out / "sensitivity.json").exists()
    assert (out / "scenes-flow-p4.state.pt").is_file()  # SMOKE=1: the state under $OUT, not /tmp
    for bad_env, message in (({"PATCH": "5"}, "PATCH=5: expected 8, 4 or 2"),
                             ({"TRAIN_EXTRA": "--lr 1e-4 --patch 4"}, "give the patch size as PATCH="),
                             ({"TRAIN_SECONDS": "300.5"}, "TRAIN_SECONDS=300.5: expected whole seconds")):
        bad = subprocess.run(["bash", str(root / "benchmarks" / "gpu_session.sh")], cwd=root,
                             env={**env, **bad_env, "OUT": str(tmp_path / "bad")}, capture_output=True, text=True)
        assert bad.returncode == 2 and message in bad.stderr
        assert not (tmp_path / "bad").exists()


def test_gpu_session_script_refuses_a_mistyped_init(tmp_path):
    """INIT= naming no file silently trained from scratch for the whole GPU lease (review, 2026-11-27)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path / "out"), "PYTHON": sys.executable,
           "INIT": str(tmp_path / "typo.safetensors")}
    res = subprocess.run(["bash", str(root / "benchmarks" / "gpu_session.sh")], cwd=root, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "typo.safetensors: no such file" in res.stderr
    assert not (tmp_path / "out").exists()
