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
