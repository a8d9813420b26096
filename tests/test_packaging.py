"""The package installs as taohooks (+ taohooks.integrations) and nothing under the research repos' names."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_python(code, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)


def test_integrations_install_under_taohooks(tmp_path):
    res = run_python("import taohooks.integrations.wan, taohooks.integrations.latte, "
                     "taohooks.integrations.opensora_plan; print(taohooks.integrations.__file__)", tmp_path)
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()).parent == ROOT / "integrations"


@pytest.mark.parametrize("name", ["integrations", "models", "utils", "diffusion", "datasets", "tests", "configs",
                                  "benchmarks"])
def test_no_top_level_names_of_the_research_repos(tmp_path, name):
    res = run_python(f"import importlib.util as u; print(u.find_spec({name!r}) is None)", tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == "True", f"{name} is importable: {res.stdout}{res.stderr}"


def test_console_script_runs(tmp_path):
    exe = Path(sys.executable).parent / "taocache"
    if not exe.exists():
        pytest.skip("taocache console script not installed in this environment")
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "check" in res.stdout and "plan" in res.stdout
