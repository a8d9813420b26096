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
                        "--width", "32", "--steps", "10", "--budgets", "0.2", "--repeats", "1",
                        "--json", str(out)]) == 0
    (record,) = json.loads(out.read_text())
    assert record["skipped_calls"] == 4 and record["calls"] == 20 and record["ideal"] == pytest.approx(1.25)
    assert "| 5 | 0.20 | 4/20 |" in capsys.readouterr().out


def test_gpu_session_script_smoke(tmp_path):
    """benchmarks/gpu_session.sh (the one device call of a session lent a GPU) in its CPU smoke mode: every
    stage runs and leaves its files under $OUT (the scenes model from scratch: no weights to continue; the
    measurement on a device that fails, then again on the CPU; the bench of SCENES_BENCH=1)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path / "out"), "PYTHON": sys.executable,
           "INIT": str(tmp_path / "none.safetensors"), "OMP_NUM_THREADS": "1", "MEASURE_DEVICE": "nonsense",
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
