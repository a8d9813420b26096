"""taocache-run: argument handling, errors before the model loads, and a script run end to end."""
import sys

import pytest

from taohooks.run import split_taocache_argument
from prewarmed import run_python

pytest.importorskip("diffusers")

SCRIPT = """
import sys, torch
from taohooks.testbed import sampling
from taohooks.testbed.model import VideoDiT, VideoDiTConfig
import helper_module  # found because sys.path[0] is this script's folder
torch.manual_seed(0)
model = VideoDiT(VideoDiTConfig(dim=32, depth=2, num_heads=2))
for p in model.parameters():
    p.data.add_(0.02 * torch.randn_like(p))
for seed in (10000, 10001):
    clips = sampling.sample(model, ["a red circle moving left"], [seed], steps=8)
print("argv", sys.argv[1:], "finite", bool(torch.isfinite(clips).all()))
"""


def launch(tmp_path, *args):
    return run_python(["-m", "taohooks.run", *map(str, args)], cwd=tmp_path, timeout=300)


@pytest.fixture
def script(tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "helper_module.py").write_text("")
    path = tmp_path / "repo" / "sample.py"
    path.write_text(SCRIPT)
    return path


def test_split_arguments():
    assert split_taocache_argument(["a.py", "--x", "1", "--taocache", "c.yaml", "--y"]) == (
        "c.yaml", ["a.py", "--x", "1", "--y"])
    assert split_taocache_argument(["a.py", "--taocache=c.yaml"]) == ("c.yaml", ["a.py"])
    assert split_taocache_argument(["a.py"]) == (None, ["a.py"])


def test_manual_window_end_to_end(tmp_path, script):
    config = tmp_path / "c.yaml"
    config.write_text("integration: testbed\nplan: {window: [5, 6], ratio: 1.0}\n")
    res = launch(tmp_path, script, "--flag", "--taocache", config)
    assert res.returncode == 0, res.stderr
    assert "argv ['--flag'] finite True" in res.stdout
    lines = [line for line in res.stderr.splitlines() if line.startswith("taohooks: generation")]
    assert len(lines) == 2 and all("4 of 16 denoiser calls saved (25.0%)" in line for line in lines)


def test_calibrates_on_first_use_then_skips(tmp_path, script):
    config = tmp_path / "c.yaml"
    config.write_text("integration: testbed\nlut: lut.safetensors\ncalibration: {prompts: 1}\n"
                      "plan: {budget: 2, min_step: 3}\n")
    res = launch(tmp_path, script, "--taocache", config)
    assert res.returncode == 0, res.stderr
    assert "calibrating" in res.stderr and (tmp_path / "lut.safetensors").is_file()
    lines = [line for line in res.stderr.splitlines() if line.startswith("taohooks: generation")]
    assert "0 of 16 denoiser calls saved" in lines[0] and "4 of 16 denoiser calls saved" in lines[1]


def test_ctrl_c_during_calibration_says_what_the_lut_holds_not_a_traceback(tmp_path, script):
    """A ~55-line traceback through taohooks' frames, ending in calibration.py, and no word of what was kept
    (ospuser, 2026-11-28)."""
    script.write_text(SCRIPT.replace("for seed in (10000, 10001):\n    clips = ",
                                     "for seed in (10000, 10001, 10002):\n    if seed == 10002:\n"
                                     "        raise KeyboardInterrupt\n    clips = "))
    config = tmp_path / "c.yaml"
    config.write_text("integration: testbed\nlut: lut.safetensors\ncalibration: {prompts: 5}\nplan: {budget: 2}\n")
    res = launch(tmp_path, script, "--taocache", config)
    assert res.returncode == 130, res.stderr
    assert "Traceback" not in res.stderr
    assert f"taocache-run: interrupted; the LUT {config.parent / 'lut.safetensors'} holds 2 of 5 prompts " \
           "(calibration.prompts; a generation stopped midway is left out): run the same command again to continue " \
           "calibrating" in res.stderr
    # ... which records the script's first prompts again (Latte walkthrough, 2026-11-28)
    assert "those recorded before are recorded again; taocache calibrate CONFIG --prompts FILE" in res.stderr
    # a run that skipped on it (calibration.auto: false): nothing to continue (review18)
    config.write_text("integration: testbed\nlut: lut.safetensors\ncalibration: {prompts: 5, auto: false}\n"
                      "plan: {budget: 2, min_step: 3}\n")
    res = launch(tmp_path, script, "--taocache", config)
    assert res.returncode == 130 and res.stderr.splitlines()[-1] == "taocache-run: interrupted", res.stderr
    # taocache calibrate says what it kept itself (the line above said "the LUT holds ..." in every worker of a
    # --devices run, whose prompts are in part files: review18)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\na blue square moving up\na green circle moving right\n")
    config.write_text("integration: testbed\nlut: lut2.safetensors\ncalibration: {prompts: 3}\n")
    script.write_text(SCRIPT.replace("for seed in", "calls = []\n"
                                     "def stop(*args):\n"
                                     "    calls.append(1)\n"
                                     "    if len(calls) == 20:\n"
                                     "        raise KeyboardInterrupt\n"
                                     "model.blocks[0].register_forward_hook(stop)\n"
                                     "for seed in"))  # (Ctrl-C in the second calibration generation)
    res = run_python(["-m", "taohooks.cli", "calibrate", str(config), "--prompts", str(prompts),
                      "--", str(script)], cwd=tmp_path, timeout=300)
    assert res.returncode == 130, res.stderr
    assert "taocache calibrate: interrupted; the prompts of the generations that ended are kept in the LUT" \
        in res.stderr
    assert "holds" not in res.stderr.splitlines()[-1]


@pytest.mark.parametrize("args,config,message", [
    (["missing.py"], "integration: testbed\n", "script missing.py does not exist"),
    (["SCRIPT"], "integration: testbed\nplan: {budjet: 2}\n", "did you mean 'plan.budget'"),
    (["SCRIPT"], "integration: wan\n", "'wan' integration cannot find the module 'wan'"),
    (["SCRIPT"], "integration: latte\n", "cannot find the module 'pipeline_latte'"),
    (["SCRIPT"], "plan: {budget: 2}\n", "integration is 'none'"),
])
def test_errors_before_the_script_runs(tmp_path, script, args, config, message, monkeypatch, capfd):
    """In this process (nothing is installed before these errors; a process each cost the suite 6 s)."""
    from taohooks import run
    from taohooks.run import ENV_CONFIG

    path = tmp_path / "c.yaml"
    path.write_text(config)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv(ENV_CONFIG, "")  # (run.main sets it: undone after the test, whether or not it was set)
    monkeypatch.delenv(ENV_CONFIG)
    hooks = list(sys.meta_path)
    assert run.main([str(script) if a == "SCRIPT" else a for a in args] + ["--taocache", str(path)]) == 2
    out, err = capfd.readouterr()
    assert message in err and "argv" not in out
    assert sys.meta_path == hooks  # (nothing installed)


def test_a_missing_or_misspelled_taocache_option_is_said(tmp_path, capsys):
    from taohooks import run

    script = tmp_path / "s.py"
    script.write_text("print('ran')\n")
    assert run.main([str(script), "--taocach", "c.yaml"]) == 2
    assert "did you mean --taocache instead of --taocach" in capsys.readouterr().err
    assert run.main([str(script)]) == 2
    assert "error: --taocache CONFIG.yaml is missing" in capsys.readouterr().err


def test_the_script_gets_an_absolute_file_as_python_gives_it(tmp_path):
    (tmp_path / "s.py").write_text("import os\nprint('abs', os.path.isabs(__file__))\n")
    (tmp_path / "c.yaml").write_text("integration: testbed\n")
    res = run_python(["-m", "taohooks.run", "s.py", "--taocache", "c.yaml"], cwd=tmp_path,
                     timeout=120)  # (in a process of its own: it installs a patch)
    assert "abs True" in res.stdout, res.stderr


def test_warnings_and_the_summary_line_name_the_same_generation(tmp_path, capsys):
    """Once calibration completed the launcher attached a new cache, whose warnings counted from 1 again while the
    per-call summary line went on: 'generation 1 begins at timestep ...' above 'generation 2: ...' (review,
    2026-11-27)."""
    from pathlib import Path

    import torch

    from taohooks.config import load_config
    from taohooks.testbed import integration, sampling
    from taohooks.testbed.model import VideoDiT

    cfg = tmp_path / "tb.yaml"
    cfg.write_text("integration: testbed\nlut: tb.safetensors\ncalibration: {prompts: 1}\nplan: {budget: 2}\n")
    model = VideoDiT.from_pretrained(Path(sampling.__file__).parent / "weights" / "flow.safetensors")

    class StartsOneStepLate:  # the flow scheduler's timesteps from its second step on: out of line with the LUT
        init_noise_sigma = 1.0

        def set_timesteps(self, n, *a, **k):
            inner = sampling.make_flow_scheduler(sampling.DEFAULT_FLOW_SHIFT)
            inner.set_timesteps(n)
            self.timesteps = torch.cat([inner.timesteps[1:], inner.timesteps[-1:] / 2])

        def step(self, model_output, t, sample, return_dict=False):
            return (sample - 0.05 * model_output,)

    integration.install(load_config(cfg))
    try:
        sampling.sample_flow(model, ["a red circle moving left"], [1], steps=8)  # calibrates
        sampling.sample_flow(model, ["a red circle moving left"], [2], steps=8, scheduler=StartsOneStepLate())
    finally:
        integration.uninstall()
    err = capsys.readouterr().err
    assert "taohooks: warning: generation 2 begins at timestep" in err and "taohooks: generation 2: " in err
    assert "generation 1 begins" not in err


def test_a_model_the_script_drops_is_freed(tmp_path):
    """Every model the launcher (or enable_taocache) had hooked stayed alive for the whole process: its patch's
    WeakKeyDictionary held, as the model's value, the cache whose hook holds the model (memory walkthrough,
    2026-11-28: a script loading a pipeline per video kept every transformer). The entry lives on the model now."""
    import gc
    import weakref
    from pathlib import Path

    from taohooks.config import load_config
    from taohooks.launcher import integration as launcher
    from taohooks.testbed import integration, sampling
    from taohooks.testbed.model import VideoDiT

    cfg = tmp_path / "tb.yaml"
    cfg.write_text("integration: testbed\nlut: tb.safetensors\ncalibration: {prompts: 1}\nplan: {budget: 2}\n")
    weights = Path(sampling.__file__).parent / "weights" / "flow.safetensors"
    integration.install(load_config(cfg))
    try:
        refs = []
        for seed in (1, 2):  # (calibrates, then skips)
            model = VideoDiT.from_pretrained(weights)
            refs.append(weakref.ref(model))
            sampling.sample_flow(model, ["a red circle moving left"], [seed], steps=8)
            del model
            gc.collect()
        assert [r() for r in refs] == [None, None] and len(launcher._owners) == 0
    finally:
        integration.uninstall()
