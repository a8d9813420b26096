"""`taocache calibrate` over a prompt list (with resume) and the .pth autoload in spawned workers."""
import os
import subprocess
import sys
import textwrap

import pytest

from taohooks import autoload
from taohooks.taocache.lut import CalibrationLUT
from prewarmed import run_python

pytest.importorskip("diffusers")

SCRIPT = textwrap.dedent("""
    import sys, torch
    from taohooks.testbed import sampling
    from taohooks.testbed.model import VideoDiT, VideoDiTConfig
    torch.manual_seed(0)
    model = VideoDiT(VideoDiTConfig(dim=32, depth=2, num_heads=2))
    clips = sampling.sample(model, [sys.argv[1]], [10000], steps=6)
    print("script generated", sys.argv[1])
""")
CONFIG = "integration: testbed\nmodel_id: tiny\nlut: lut.safetensors\ncalibration: {prompts: 3}\nplan: {budget: 1}\n"


def calibrate(tmp_path, prompts):
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return run_python(["-m", "taohooks.cli", "calibrate", "c.yaml", "--prompts", "prompts.txt",
                       "--", "sample.py", "a red circle moving left"],
                      cwd=tmp_path, timeout=300)


def test_calibrate_resumes_after_an_interruption(tmp_path):
    (tmp_path / "sample.py").write_text(SCRIPT)
    (tmp_path / "c.yaml").write_text(CONFIG)
    # The second prompt cannot be parsed by the testbed: the run stops after saving the first.
    res = calibrate(tmp_path, ["a red circle moving left", "not a prompt", "a blue square moving up"])
    assert res.returncode == 1 and "cannot parse prompt 'not a prompt'" in res.stderr
    assert "Traceback (most recent call last)" in res.stderr  # the script's error, as python says it (walkthrough)
    assert CalibrationLUT.load(tmp_path / "lut.safetensors").num_prompts == 1
    res = calibrate(tmp_path, ["a red circle moving left", "a green circle moving up", "a blue square moving up"])
    assert res.returncode == 0, res.stderr
    assert "1 of 3 prompts recorded" in res.stderr  # (progress goes to stderr with the hook's lines)
    # the LUT counts its prompts, not which they are: the lines taken as held are said (Latte walkthrough)
    assert "from line 2 of prompts.txt (lines 1-1 are taken to be the prompts the LUT holds" in res.stderr
    assert "calibration prompt 1/3" not in res.stderr and "calibration prompt 2/3: 'a green circle moving up'" in res.stderr
    assert "script generated" not in res.stdout  # calibration only: the script's own generation never ran
    lut = CalibrationLUT.load(tmp_path / "lut.safetensors")
    assert (lut.num_prompts, lut.steps, lut.streams) == (3, 6, ("cond", "uncond"))
    res = calibrate(tmp_path, ["a red circle moving left", "a green circle moving up", "a blue square moving up"])
    assert res.returncode == 0 and "already holds 3 of 3 prompts" in res.stdout
    res = calibrate(tmp_path, ["a red circle moving left", "a red circle moving left", "a blue square moving up"])
    assert "1 prompt(s) among the first 3 appear more than once (e.g. 'a red circle moving left')" in res.stderr


def test_calibrate_needs_enough_prompts(tmp_path):
    (tmp_path / "sample.py").write_text(SCRIPT)
    (tmp_path / "c.yaml").write_text(CONFIG)
    res = calibrate(tmp_path, ["a red circle moving left"])
    assert res.returncode == 1 and "holds 1 prompt, 3 are asked for" in res.stderr


def spawn_script(patched: str) -> str:
    """A script whose spawned worker prints whether the expression ``patched`` (its imports first) is true."""
    return textwrap.dedent("""
        import multiprocessing as mp

        def child(queue):
            %s

        if __name__ == "__main__":
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            proc = ctx.Process(target=child, args=(queue,))
            proc.start()
            print("worker patched:", queue.get(timeout=120))
            proc.join()
    """) % patched


SPAWN = spawn_script('from taohooks.testbed import sampling; '
                     'queue.put(getattr(sampling.sample_flow, "_taohooks_patch", None) is not None)')


def test_spawned_workers_get_the_integration(tmp_path):
    installed_before = autoload.pth_path().is_file()
    autoload.install_pth()
    try:
        (tmp_path / "spawn.py").write_text(SPAWN)
        (tmp_path / "c.yaml").write_text("integration: testbed\nplan: {window: [3, 4], ratio: 1.0}\n")
        env = {k: v for k, v in os.environ.items() if k != "TAOHOOKS_CONFIG"}
        plain = run_python(["spawn.py"], cwd=tmp_path, timeout=300, env=env)
        assert "worker patched: False" in plain.stdout, plain.stderr
        launched = run_python(["-m", "taohooks.run", "spawn.py", "--taocache", "c.yaml"],
                              cwd=tmp_path, timeout=300, env=env)
        assert "worker patched: True" in launched.stdout, launched.stderr
    finally:
        if not installed_before:
            autoload.remove_pth()


# pipeline_latte is found on the parent's sys.path, which spawn sets after the interpreter started
SPAWN_RESEARCH = spawn_script('import pipeline_latte; '
                              'queue.put(getattr(pipeline_latte.LattePipeline.__call__, "_taohooks_patch", None) '
                              'is not None)')


def test_a_spawned_worker_patches_the_research_module_it_finds_only_after_start(tmp_path):
    """A spawned worker sees the script's folder on sys.path only once multiprocessing has set the parent's
    sys.path, after the .pth autoload ran: the autoload found no research module then and the worker ran
    uncached without a word (review, 2026-11-27). It now patches the module when the worker imports it."""
    installed_before = autoload.pth_path().is_file()
    autoload.install_pth()
    try:
        repo = tmp_path / "repo"
        repo.mkdir()
        (repo / "spawn.py").write_text(SPAWN_RESEARCH)
        (repo / "pipeline_latte.py").write_text("class LattePipeline:\n    def __call__(self, prompt):\n"
                                                "        return prompt\n")
        (tmp_path / "c.yaml").write_text("integration: latte\nplan: {window: [3, 4], ratio: 1.0}\n")
        env = {k: v for k, v in os.environ.items() if k not in ("TAOHOOKS_CONFIG", "PYTHONPATH")}
        res = run_python(["-m", "taohooks.run", "repo/spawn.py", "--taocache", "c.yaml"],
                         cwd=tmp_path, timeout=300, env=env)
        assert "worker patched: True" in res.stdout, res.stdout + res.stderr
    finally:
        if not installed_before:
            autoload.remove_pth()


def test_a_broken_config_in_the_environment_warns_and_does_not_break_python(tmp_path):
    (tmp_path / "bad.yaml").write_text("integration: testbed\nplan: {budjet: 1}\n")
    env = dict(os.environ, TAOHOOKS_CONFIG=str(tmp_path / "bad.yaml"))
    res = subprocess.run([sys.executable, "-c", "import taohooks.autoload; print('alive')"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "alive" in res.stdout
    assert "integration not installed in this process" in res.stderr and "did you mean 'plan.budget'" in res.stderr


def test_calibrate_runs_whatever_calibration_auto_says_and_keeps_the_lut_s_horizon(tmp_path):
    """`taocache calibrate` with calibration.auto: false failed (no LUT to plan on), and a run whose error_horizon
    differed from the LUT's had its generations dropped one by one (review, 2026-11-27)."""
    (tmp_path / "sample.py").write_text(SCRIPT)
    (tmp_path / "c.yaml").write_text(CONFIG.replace("prompts: 3}", "prompts: 2, auto: false}"))
    res = calibrate(tmp_path, ["a red circle moving left", "a green circle moving up"])
    assert res.returncode == 0, res.stderr
    assert CalibrationLUT.load(tmp_path / "lut.safetensors").deltas.horizon == 16
    (tmp_path / "c.yaml").write_text(CONFIG.replace("prompts: 3}", "prompts: 3, error_horizon: 4}"))
    res = calibrate(tmp_path, ["a red circle moving left", "a green circle moving up", "a blue square moving up"])
    assert res.returncode == 1 and "calibration.error_horizon: 4, but the LUT" in res.stderr, res.stderr
    assert "set calibration.error_horizon: 16" in res.stderr


def test_a_child_process_without_the_research_code_stays_quiet(tmp_path):
    """Under the launcher every Python child got 'integration not installed ... cannot find the module' (review)."""
    env = dict(os.environ, TAOHOOKS_CONFIG=os.path.join(os.path.dirname(__file__), "..", "configs", "wan.yaml"))
    res = subprocess.run([sys.executable, "-c", "import taohooks.autoload; print('alive')"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "alive" in res.stdout and res.stderr == "", res.stderr


def test_calibrate_with_auto_false_on_the_wan_script_and_a_complete_lut_of_another_horizon(tmp_path):
    """The Wan precheck still refused `taocache calibrate` with calibration.auto: false, and a complete LUT was
    refused for its horizon instead of 'nothing to do' (review of the fixes, 2026-11-27)."""
    from pathlib import Path

    script = Path(__file__).parent / "fixtures" / "official_like" / "wan" / "generate.py"
    (tmp_path / "c.yaml").write_text("integration: wan\nlut: lut.safetensors\ncalibration: {prompts: 1, auto: false}\n"
                                     "plan: {budget: 2, min_step: 5}\n")
    (tmp_path / "p.txt").write_text("A red fox in snow.\n")
    command = [sys.executable, "-m", "taohooks.cli", "calibrate", "c.yaml", "--prompts", "p.txt", "--", str(script),
               "--task", "t2v-1.3B", "--prompt", "x", "--sample_steps", "10"]
    res = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert CalibrationLUT.load(tmp_path / "lut.safetensors").num_prompts == 1
    (tmp_path / "c.yaml").write_text("integration: wan\nlut: lut.safetensors\n"
                                     "calibration: {prompts: 1, auto: false, error_horizon: 4}\n")
    res = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "nothing to do" in res.stdout, res.stderr


def test_calibrate_refuses_what_would_skip_or_count_prompt_lines_twice(tmp_path):
    """A walkthrough (2026-11-27): a generation of 2 clips made `taocache calibrate` skip every other line of the
    prompts file; two calibrations of one LUT at once ran the same lines; an interrupted --devices run's part files
    were resumed after the LUT had been completed otherwise (old prompts counted twice, new lines never run)."""
    import fcntl
    import shutil

    (tmp_path / "c.yaml").write_text(CONFIG)
    (tmp_path / "sample.py").write_text(SCRIPT.replace("[sys.argv[1]], [10000]", "[sys.argv[1]] * 2, [10000, 10001]"))
    res = calibrate(tmp_path, ["a red circle moving left", "a green circle moving up", "a blue square moving up"])
    assert res.returncode == 2 and "a calibration generation made 2 clips" in res.stderr, res.stderr
    assert CalibrationLUT.load(tmp_path / "lut.safetensors").num_prompts == 2  # (kept, as the message says)
    (tmp_path / "sample.py").write_text(SCRIPT)
    with open(tmp_path / "lut.safetensors.calibrating", "a") as held:  # another calibration holds the LUT
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        res = calibrate(tmp_path, ["a red circle moving left", "a green circle moving up", "a blue square moving up"])
    assert res.returncode == 2 and "another taocache calibrate is running on" in res.stderr, res.stderr
    assert CalibrationLUT.load(tmp_path / "lut.safetensors").num_prompts == 2
    shutil.copy(tmp_path / "lut.safetensors", tmp_path / "lut.part0-of-2.safetensors")  # a stale part file
    (tmp_path / "prompts.txt").write_text("a red circle moving left\na green circle moving up\na blue square moving up\n"
                                          "a red square moving down\n")
    res = run_python(["-m", "taohooks.cli", "calibrate", "c.yaml", "--prompts", "prompts.txt",
                      "--devices", "2", "--", "sample.py", "a red circle moving left"],
                     cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "part file(s) of an earlier --devices run, not resumed (lut.part0-of-2.safetensors: named by an earlier " \
        "taohooks, before the prompt count and lines were part of the name); to keep their prompts instead (if of " \
        "this model and settings), stop this run (Ctrl-C) and add them to the LUT: taocache merge lut.safetensors " \
        "lut.part0-of-2.safetensors -o lut.safetensors, then" in res.stderr, res.stderr  # (the cause, the way out)
    assert CalibrationLUT.load(tmp_path / "lut.safetensors").num_prompts == 3  # 2 + line 3, run on one of the ranks
    # the complete LUT no longer needs it: removed, and said (it was resumed into a LUT calibrated again later)
    assert "removed " in res.stderr and not (tmp_path / "lut.part0-of-2.safetensors").exists()
    shutil.copy(tmp_path / "lut.safetensors", tmp_path / "lut.part0-of-2.safetensors")
    with open(tmp_path / "lut.safetensors.calibrating", "a") as left:  # left behind, empty, and holding no lock
        fcntl.flock(left, fcntl.LOCK_EX | fcntl.LOCK_NB)
    (tmp_path / "c.yaml").write_text(CONFIG.replace("prompts: 3", "prompts: 4"))
    res = calibrate(tmp_path, ["a red circle moving left", "a green circle moving up", "a blue square moving up",
                               "a red square moving down"])
    assert res.returncode == 0, res.stderr
    assert "lut.part0-of-2.safetensors: part file(s) of an interrupted --devices run, not resumed" in res.stderr
    assert not (tmp_path / "lut.part0-of-2.safetensors").exists()  # (this run completed the LUT)


def test_calibrate_claims_the_file_not_the_name_and_says_what_another_writer_added(tmp_path):
    """A review (2026-11-29): two `taocache calibrate` runs reached one LUT through a link and both ran (the claim was
    the name's); and prompts another writer added during a generation (a `taocache merge` into the LUT) were blamed
    on the script as "a calibration generation made 2 clips", ending the run."""
    import fcntl

    (tmp_path / "c.yaml").write_text(CONFIG)
    (tmp_path / "sample.py").write_text(SCRIPT)
    (tmp_path / "other.yaml").write_text(CONFIG.replace("lut.safetensors", "other.safetensors")
                                         .replace("prompts: 3", "prompts: 1"))
    (tmp_path / "prompts.txt").write_text("a blue square moving up\n")
    res = run_python(["-m", "taohooks.cli", "calibrate", "other.yaml", "--prompts", "prompts.txt", "--", "sample.py",
                      "x"], cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    # the other LUT's prompt reaches lut.safetensors during the first generation, as from another process
    (tmp_path / "sample.py").write_text(SCRIPT.replace("clips = sampling", textwrap.dedent("""\
        import os, shutil
        def other_writer(module, args):
            if os.path.exists("other.safetensors"):
                shutil.move("other.safetensors", "lut.safetensors")
        model.register_forward_pre_hook(other_writer)
        clips = sampling""")))
    res = calibrate(tmp_path, ["a red circle moving left", "a green circle moving up", "a blue square moving up"])
    assert res.returncode == 0, res.stderr
    assert "another process added 1 prompt(s) to the LUT while this one calibrated" in res.stderr
    assert "goes on at line 3 of the prompts file and lines 2-2 are not calibrated here" in res.stderr
    assert "made 2 clips" not in res.stderr
    assert CalibrationLUT.load(tmp_path / "lut.safetensors").num_prompts == 3
    (tmp_path / "lut.safetensors").unlink()
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "real.safetensors")
    (tmp_path / "c.yaml").write_text(CONFIG.replace("lut.safetensors", "link.safetensors"))
    with open(tmp_path / "real.safetensors.calibrating", "a") as held:  # a calibration of the file by its own name
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        res = calibrate(tmp_path, ["a red circle moving left", "a green circle moving up", "a blue square moving up"])
    assert res.returncode == 2 and "another taocache calibrate is running on link.safetensors" in res.stderr, res.stderr
