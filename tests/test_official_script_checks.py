"""Issue #11: what does not match is caught before the model loads, or said at the first call.

On the call-contract scripts of ``tests/fixtures/official_like`` (see ``test_integration_scripts.py``):
the Wan stand-in silences ``warnings`` and starts its own process group under ``WORLD_SIZE > 1`` as the
real ``generate.py`` does, and takes its step and shift defaults from the same rules. "Before the model
loads" is checked by the absence of the scripts' first log line (Wan: ``Creating WanT2V pipeline``,
Latte / Open-Sora-Plan: ``Processing``).
"""
from __future__ import annotations

import shutil
import types
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
yaml = pytest.importorskip("yaml")

from prewarmed import RUNNER  # noqa: E402
from test_integration_scripts import REPOS, config_file, saved_counts  # noqa: E402

WAN, LATTE = REPOS["wan"], REPOS["latte"]
LOADED = {"wan": "Creating WanT2V pipeline", "latte": "Processing", "opensora_plan": "Processing"}


@pytest.fixture(scope="module")
def runner():
    return RUNNER


def launch(runner, repo, out: Path, config: str, *extra: str, argv=None):
    path = config_file(out, config)
    argv = argv if argv is not None else repo.argv(out, *extra)
    return runner(["-m", "taohooks.run", *argv, "--taocache", path], out, repo.env())


CALIBRATED = "integration: {}\nlut: lut.safetensors\ncalibration: {{prompts: 1{}}}\nplan: {{budget: 2, min_step: 5}}\n"


@pytest.fixture(scope="module")
def luts(runner, tmp_path_factory):
    """``luts(name)``: a 1-prompt LUT calibrated through the script with its test defaults."""
    made = {}

    def get(name: str) -> Path:
        if name not in made:
            repo = replace(REPOS[name], prompts=REPOS[name].prompts[:1])
            out = tmp_path_factory.mktemp(f"lut_{name}")
            res = launch(runner, repo, out, CALIBRATED.format(name, ""))
            assert res.returncode == 0, res.stderr
            made[name] = out / "lut.safetensors"
        return made[name]
    return get


def with_lut(luts, name: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(luts(name), out / "lut.safetensors")


# ---------------------------------------------------------------------------- 1. messages survive the host script
def test_wan_messages_reach_stderr_although_generate_py_silences_warnings(runner, luts, tmp_path):
    """The calibration notice and the timestep warning used to go through ``warnings``, which
    generate.py turns off: a LUT from shift 5 used at shift 8 ran with no word at all."""
    first = launch(runner, WAN, tmp_path / "calibrate", CALIBRATED.format("wan", ""))
    assert first.returncode == 0, first.stderr
    assert "taohooks: calibrating: LUT" in first.stderr
    with_lut(luts, "wan", tmp_path / "shifted")
    res = launch(runner, WAN, tmp_path / "shifted", CALIBRATED.format("wan", ", accept: [shift]"),
                 "--sample_shift", "8")
    assert res.returncode == 0, res.stderr
    assert saved_counts(res) == [(4, 20)]
    assert "taohooks: warning: step 5 runs at timestep" in res.stderr, res.stderr


# ---------------------------------------------------------------------------- 2. the LUT against the run
@pytest.mark.parametrize("flags,said", [
    (("--sample_shift", "8"), "was calibrated with --sample_shift 5.0; this command line runs --sample_shift 8.0"),
    (("--sample_solver", "dpm++"), "was calibrated with --sample_solver unipc; this command line runs "
                                   "--sample_solver dpm++"),
    (("--task", "t2v-14B"), "was calibrated with --task t2v-1.3B; this command line runs --task t2v-14B"),
    (("--sample_steps", "12"), "has 10 steps, this command line runs 12 (--sample_steps 12)"),
    (("--sample_guide_scale", "7"), "was calibrated with --sample_guide_scale 5.0; this command line runs "
                                    "--sample_guide_scale 7.0"),  # (not recorded before: Wan2.2 walkthrough)
], ids=["shift", "solver", "task", "steps", "guide"])
def test_wan_lut_mismatch_stops_before_the_model_loads(runner, luts, tmp_path, flags, said):
    with_lut(luts, "wan", tmp_path)
    res = launch(runner, WAN, tmp_path, CALIBRATED.format("wan", ""), *flags)
    assert res.returncode == 2, res.stderr
    assert said in res.stderr
    assert LOADED["wan"] not in res.stdout


def test_wan_accepted_difference_runs(runner, luts, tmp_path):
    with_lut(luts, "wan", tmp_path)
    res = launch(runner, WAN, tmp_path, CALIBRATED.format("wan", ", accept: [scheduler]"), "--sample_solver", "dpm++")
    assert res.returncode == 0, res.stderr
    assert saved_counts(res) == [(4, 20)]


def test_wan_i2v_default_steps_against_the_configs_loop(runner, tmp_path):
    """i2v runs 40 steps by default; every shipped t2v config declares 50."""
    argv = [WAN.script, "--task", "i2v-14B", "--size", "832*480", "--prompt", "x", "--save_file", tmp_path / "v.pt"]
    res = launch(runner, WAN, tmp_path, "integration: wan\nmodel_id: wan2.1-i2v-14B-480p\nloop: {steps: 50}\n",
                 argv=argv)
    assert res.returncode == 2, res.stderr
    assert "loop.steps is 50, this command line runs 40 steps (--sample_steps 40, the i2v default)" in res.stderr
    assert LOADED["wan"] not in res.stdout


def test_wan_model_id_of_another_task_stops_before_the_model_loads(runner, tmp_path):
    res = launch(runner, WAN, tmp_path, "integration: wan\nmodel_id: wan2.1-t2v-1.3B\n", "--task", "t2v-14B")
    assert res.returncode == 2, res.stderr
    assert "model_id 'wan2.1-t2v-1.3B' is for task t2v-1.3B, this command line runs --task t2v-14B" in res.stderr


def test_latte_euler_discrete_does_not_use_the_ddim_lut(runner, luts, tmp_path):
    """Same timesteps, another sampler: only the recorded scheduler can tell."""
    with_lut(luts, "latte", tmp_path)
    argv = LATTE.argv(tmp_path)
    sample = yaml.safe_load((tmp_path / "sample.yaml").read_text())
    (tmp_path / "sample.yaml").write_text(yaml.safe_dump({**sample, "sample_method": "EulerDiscrete"}))
    res = launch(runner, LATTE, tmp_path, CALIBRATED.format("latte", ""), argv=argv)
    assert res.returncode == 2, res.stderr
    assert "sample_method EulerDiscrete" in res.stderr and "calibrated with DDIMScheduler" in res.stderr
    assert LOADED["latte"] not in res.stdout


@pytest.mark.parametrize("change,said", [
    ({"beta_end": 0.012}, "noise_schedule.beta_end (the scheduler's noise levels: the betas of Latte's YAML, a "
                          "diffusers scheduler's config): this run 0.012, the LUT 0.02"),
    ({"beta_schedule": "squaredcos_cap_v2"}, "noise_schedule.beta_schedule"),
    ({"image_size": [32, 32]}, "height: this run 32, the LUT 16; width: this run 32, the LUT 16"),
    # sample_t2x.py builds LatteT2V with video_length: the architecture differs too, so accepting frames alone would
    # be refused once the model has loaded (review19)
    ({"video_length": 2}, "accepting frames alone is refused at the first call. Give this run its own LUT (lut: in "
                          "{config}), or accept the difference knowingly with calibration.accept: [architecture, "
                          "frames]")])
def test_latte_yaml_settings_of_another_run_stop_before_the_model_loads(runner, luts, tmp_path, change, said):
    """The betas sample_t2x.py gives every scheduler were not part of the LUT's identity: a LUT calibrated at
    beta_end 0.02 skipped on a run at 0.012, or on a cosine schedule, without a word; the video size was found only
    at the first generation, after the model had loaded (Latte walkthrough, 2026-11-28)."""
    with_lut(luts, "latte", tmp_path)
    argv = LATTE.argv(tmp_path)
    sample = yaml.safe_load((tmp_path / "sample.yaml").read_text())
    (tmp_path / "sample.yaml").write_text(yaml.safe_dump({**sample, **change}))
    res = launch(runner, LATTE, tmp_path, CALIBRATED.format("latte", ""), argv=argv)
    assert res.returncode == 2, res.stderr
    said = said.format(config=tmp_path / "taocache.yaml")
    assert said in res.stderr and str(tmp_path / "sample.yaml") in res.stderr, res.stderr
    assert "accept the difference knowingly with calibration.accept: [" in res.stderr
    assert LOADED["latte"] not in res.stdout


def test_first_call_identity_check_when_the_command_line_cannot_say(runner, luts, tmp_path):
    """The recorded architecture differs (another transformer config): found at the first call."""
    from taohooks.taocache.lut import CalibrationLUT

    lut = CalibrationLUT.load(luts("latte"))
    assert set(lut.identity) >= {"model", "architecture", "dtype", "scheduler", "sampling_steps"}
    lut.identity["architecture"] = "000000000000"
    tmp_path.mkdir(exist_ok=True)
    lut.save(tmp_path / "lut.safetensors")
    res = launch(runner, LATTE, tmp_path, CALIBRATED.format("latte", ""))
    assert res.returncode == 2, res.stderr
    assert "architecture: this run '" in res.stderr and "the LUT '000000000000'" in res.stderr
    assert not (tmp_path / "videos" / "videos.pt").exists()


# ---------------------------------------------------------------------------- 3. an integration that never fires
@pytest.mark.parametrize("integration", ["diffusers", "testbed"])
def test_config_for_another_integration_is_said(runner, tmp_path, integration):
    res = launch(runner, WAN, tmp_path, f"integration: {integration}\nplan: {{budget: 0}}\n")
    assert res.returncode == 0, res.stderr  # the script's own work is done and saved
    assert (tmp_path / "video.pt").is_file()
    assert f"integration: {integration} expected " in res.stderr
    assert "this script imported wan.text2video (integration: wan)" in res.stderr
    assert "Nothing was cached or calibrated" in res.stderr


def test_calibrate_with_an_integration_that_never_fires_fails(runner, tmp_path):
    config = config_file(tmp_path, "integration: diffusers\nlut: lut.safetensors\ncalibration: {prompts: 1}\n")
    (tmp_path / "prompts.txt").write_text("a cat\n")
    res = runner(["-m", "taohooks.cli", "calibrate", config, "--prompts", tmp_path / "prompts.txt", "--",
                  *WAN.argv(tmp_path)], tmp_path, WAN.env())
    assert res.returncode != 0, res.stderr
    assert "integration: diffusers expected" in res.stderr
    assert not (tmp_path / "lut.safetensors").exists()


# ---------------------------------------------------------------------------- 4. --devices, script with its own group
def test_calibrate_devices_with_a_script_that_starts_its_own_process_group(runner, tmp_path):
    from taohooks.taocache.lut import CalibrationLUT

    config = config_file(tmp_path, "integration: wan\nlut: lut.safetensors\ncalibration: {prompts: 2}\n")
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    res = runner(["-m", "taohooks.cli", "calibrate", config, "--prompts", tmp_path / "prompts.txt", "--devices", "2",
                  "--", *WAN.argv(tmp_path)], tmp_path, WAN.env())
    assert res.returncode == 0, res.stdout + res.stderr
    lut = CalibrationLUT.load(tmp_path / "lut.safetensors")
    assert lut.num_prompts == 2 and lut.steps == 10 and lut.identity["task"] == "t2v-1.3B"


# ---------------------------------------------------------------------------- 5. the YAML's loop against the script
def test_wan_loop_steps_contradicting_the_command_line(runner, tmp_path):
    res = launch(runner, WAN, tmp_path, "integration: wan\nloop: {steps: 50}\nplan: {budget: 0}\n")
    assert res.returncode == 2, res.stderr
    assert "loop.steps is 50, this command line runs 10 steps (--sample_steps 10)" in res.stderr
    assert LOADED["wan"] not in res.stdout


def test_latte_loop_steps_contradicting_the_pipeline_call(runner, tmp_path):
    res = launch(runner, LATTE, tmp_path, "integration: latte\nloop: {steps: 50}\nplan: {budget: 0}\n")
    assert res.returncode == 2, res.stderr
    assert ("loop.steps is 50, but this pipeline_latte.LattePipeline.__call__ call runs 10 denoiser calls per "
            "stream") in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "videos" / "videos.pt").exists()


# ---------------------------------------------------------------------------- 6. the other late checks
def test_wan_with_calibration_ranks_own_stops_before_the_model_loads(runner, tmp_path):
    """Every rank of Wan's generate.py runs every generation: ranks: own would have each add the same prompt."""
    res = launch(runner, WAN, tmp_path, "integration: wan\ncalibration: {ranks: own}\nplan: {budget: 0}\n")
    assert res.returncode == 2, res.stderr
    assert "taocache.yaml: calibration.ranks: own, but every rank of Wan's generate.py runs every generation" \
        in res.stderr
    assert LOADED["wan"] not in res.stdout


def test_wan_window_past_the_last_step_stops_before_the_model_loads(runner, tmp_path):
    res = launch(runner, WAN, tmp_path, "integration: wan\nplan: {window: [8, 12], ratio: 1.0}\n")
    assert res.returncode == 2, res.stderr
    assert "taocache.yaml: plan.window: window [8, 12] must satisfy 2 <= first <= last < 10" in res.stderr
    assert LOADED["wan"] not in res.stdout


def test_wan_hybrid_refused_under_sequence_parallel_before_the_model_loads(runner, tmp_path):
    res = launch(runner, WAN, tmp_path, "integration: wan\nplan: {budget: 0}\nteacache: {threshold: 0.1}\n",
                 "--ulysses_size", "2")
    assert res.returncode == 2, res.stderr
    assert "--ulysses_size x --ring_size = 2" in res.stderr and LOADED["wan"] not in res.stdout


def test_wan_hybrid_allowed_on_data_parallel_ranks(monkeypatch):
    """Several ranks that each hold the whole model (no sequence parallelism) decide alike."""
    import torch.distributed as dist

    from taohooks.config import config_from_dict
    from taohooks.integrations import wan

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    check = wan._refuse_rank_local_decisions(config_from_dict({"integration": "wan", "teacache": {"threshold": 0.1}}))
    assert check({"self": types.SimpleNamespace(sp_size=1)}, None) == []
    with pytest.raises(Exception, match="sequence parallelism"):
        check({"self": types.SimpleNamespace(sp_size=2)}, None)


def test_pab_pattern_that_matches_nothing_is_one_line(runner, tmp_path):
    res = launch(runner, LATTE, tmp_path, "integration: latte\npab: {groups: [{pattern: 'nope', range: 2}], "
                                          "steps: [1, 8]}\n")
    assert res.returncode == 2, res.stderr
    assert "PAB pattern 'nope' (" in res.stderr and ": pab.groups[0].pattern) matches no module of" in res.stderr
    assert "Traceback" not in res.stderr


def test_module_check_follows_the_scripts_own_sys_path(runner, tmp_path):
    """A script that appends its repo to sys.path itself passes the check; a missing module still fails."""
    repo = tmp_path / "repo"
    (repo / "wan").mkdir(parents=True)
    (repo / "wan" / "__init__.py").write_text("")
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    script = scripts / "run.py"
    script.write_text("import os, sys\nsys.path.append(os.path.join(os.path.dirname(sys.path[0]), 'repo'))\n"
                      "import wan\nprint('ran')\n")
    env = WAN.env()
    res = runner(["-m", "taohooks.run", script, "--taocache", config_file(tmp_path, "integration: wan\n")], tmp_path, env)
    assert res.returncode == 0, res.stderr
    assert "ran" in res.stdout and "expected a call of WanT2V" in res.stderr  # it never generated: said
    shutil.rmtree(repo / "wan")
    res = runner(["-m", "taohooks.run", script, "--taocache", tmp_path / "taocache.yaml"], tmp_path, env)
    assert res.returncode == 2 and "cannot find the module 'wan'" in res.stderr and "PYTHONPATH" in res.stderr


def test_script_sys_path_additions_are_evaluated_without_running_anything(tmp_path):
    from taohooks.run import script_sys_path_additions

    script = tmp_path / "sub" / "s.py"
    script.parent.mkdir()
    script.write_text("import os, sys\nsys.path.append(os.path.split(sys.path[0])[0])\n"
                      "sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'x'))\n")
    assert script_sys_path_additions(script) == ([str(tmp_path), str(tmp_path / "sub" / "x")], True)
    script.write_text("import os, sys\nsys.path.append(os.system('touch pwned') or 'y')\n")
    assert script_sys_path_additions(script) == ([], False)
    assert not Path("pwned").exists()


def test_shortened_options_are_read_as_the_scripts_own_parsers_read_them():
    """argparse takes unique prefixes (--sample_sh 8); the checks read them the same way, and leave a
    command line the script's parser refuses (an ambiguous prefix) to the script."""
    from taohooks.integrations import opensora_plan, wan

    run = wan.command_line(["--ta", "t2v-1.3B", "--sample_ste", "30", "--sample_sh=8", "--t5_c", "--prompt", "x"])
    assert (run["task"], run["steps"], run["shift"], run["shift_from"]) == ("t2v-1.3B", 30, 8.0, "--sample_shift")
    assert wan.command_line(["--sample_s", "3"]) is None  # --sample_solver/_steps/_shift: generate.py refuses it
    # a value outside generate.py's choices: its own parser says "invalid choice", not a LUT or task mismatch
    from taohooks.integrations import wan22
    assert wan.command_line(["--task", "nope"]) is None and wan.command_line(["--size", "800*600"]) is None
    assert wan.command_line(["--sample_solver", "euler"]) is None and wan22.command_line(["--task", "t2v-14B"]) is None
    assert wan22.command_line(["--task", "ti2v-5B", "--sample_solver", "dpm++"])["task"] == "ti2v-5B"
    args = wan.script_options(["--sample_m", "DDIM", "--num_s", "12", "--text_prompt", "a", "b"], opensora_plan.OPTIONS)
    assert (args.sample_method, args.num_sampling_steps) == ("DDIM", 12)


def test_wan_teacache_coefficients_of_another_checkpoint_stop_before_the_model_loads(runner, tmp_path):
    """teacache.published was never compared with --task: the 14B coefficients ran on the 1.3B (review, 2026-11-27)."""
    res = launch(runner, WAN, tmp_path, "integration: wan\nplan: {window: [7, 8], ratio: 1.0}\n"
                                        "teacache: {published: wan2.1-t2v-14B, threshold: 0.2}\n")
    assert res.returncode == 2, res.stderr
    assert "whose published coefficients are wan2.1-t2v-1.3B" in res.stderr and LOADED["wan"] not in res.stdout


@pytest.mark.parametrize("integration, published", [("latte", "opensora_plan"), ("opensora_plan", "latte")])
def test_latte_and_open_sora_plan_teacache_coefficients_are_not_interchangeable(tmp_path, integration, published):
    from taohooks.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text(f"integration: {integration}\nteacache: {{published: {published}, threshold: 0.1}}\n")
    with pytest.raises(ConfigError, match=f"teacache.published: the authors' TeaCache for {published} attaches"):
        load_config(path)


def test_the_script_s_help_is_printed_whatever_the_config(runner, tmp_path):
    """--help through the launcher failed on the config's checks, or warned that nothing was cached (review)."""
    res = launch(runner, WAN, tmp_path, "integration: wan\nplan: {window: [8, 12], ratio: 1.0}\n", "--help")
    assert res.returncode == 0, res.stderr
    assert "--sample_steps" in res.stdout and "warning" not in res.stderr and "window" not in res.stderr


def test_wan_sampler_label_against_the_solver_stops_before_the_model_loads(runner, tmp_path):
    """calibration.sampler: unipc with --sample_solver dpm++ labelled a new LUT unipc (review, 2026-11-27)."""
    res = launch(runner, WAN, tmp_path, "integration: wan\nlut: lut.safetensors\n"
                                        "calibration: {prompts: 1, sampler: unipc}\nplan: {budget: 2, min_step: 5}\n",
                 "--sample_solver", "dpm++")
    assert res.returncode == 2, res.stderr
    assert "calibration.sampler is 'unipc', this command line runs --sample_solver dpm++" in res.stderr
    assert LOADED["wan"] not in res.stdout


def test_wan_sampler_label_without_a_lut_is_not_checked(runner, tmp_path):
    res = launch(runner, WAN, tmp_path, "integration: wan\ncalibration: {sampler: unipc}\nplan: {window: [7, 8], "
                                        "ratio: 1.0}\n", "--sample_solver", "dpm++")
    assert res.returncode == 0, res.stderr


def test_wan_lut_of_another_size_is_refused_at_the_first_generation(runner, luts, tmp_path):
    """A LUT calibrated at one --size (or --frame_num) cannot take a calibration at another (its delta products hold
    outputs of one size): every later calibrating run was left out of the LUT with a warning, exit 0, forever
    (review, 2026-11-27). The generate() call's size and frame count are now part of the identity."""
    with_lut(luts, "wan", tmp_path / "size")
    res = launch(runner, WAN, tmp_path / "size", CALIBRATED.format("wan", ""), "--size", "48*32")
    assert res.returncode == 2, res.stderr
    assert "pixels (width x height of the video: Wan's --size): this run 1536, the LUT 1024" in res.stderr
    with_lut(luts, "wan", tmp_path / "accepted")
    res = launch(runner, WAN, tmp_path / "accepted", CALIBRATED.format("wan", ", accept: [pixels]"), "--size", "48*32")
    assert res.returncode == 0, res.stderr


def test_wan_size_or_frame_count_given_on_the_command_line_is_checked_before_the_model_loads(runner, luts, tmp_path):
    """A --size or --frame_num that the command line gives is checked against the LUT before generate.py loads T5,
    the VAE and the DiT (minutes for a 14B model); it used to be found at the first generation. (48*32 above is no
    size of the real script, whose parser the precheck reads it with: that one is found at the generation.)"""
    with_lut(luts, "wan", tmp_path / "size")
    res = launch(runner, WAN, tmp_path / "size", CALIBRATED.format("wan", ""), "--size", "832*480")
    assert res.returncode == 2, res.stderr
    assert "was calibrated with 1024 pixels a frame (width x height); this command line runs --size 832*480 (399360 " \
           "pixels a frame)" in res.stderr and "calibration.accept: [pixels]" in res.stderr
    assert LOADED["wan"] not in res.stdout
    with_lut(luts, "wan", tmp_path / "frames")
    res = launch(runner, WAN, tmp_path / "frames", CALIBRATED.format("wan", ""), "--frame_num", "9")
    assert res.returncode == 2, res.stderr
    assert "was calibrated with --frame_num 5; this command line runs --frame_num 9" in res.stderr
    assert LOADED["wan"] not in res.stdout


def test_wan_command_lines_say_the_video_size_only_where_they_give_it(runner, luts, tmp_path):
    """``pixels`` / ``frame_num`` as the generation's identity records them, from ``--size W*H`` and ``--frame_num``
    (shortened too); not from the script's defaults (the call-contract scripts have others than the real ones: the
    generation checks those), nor for S2V / Animate, whose generate() takes other arguments. Accepted differences
    pass the precheck."""
    from taohooks.config import load_config
    from taohooks.integrations import wan, wan22

    run = wan.command_line(["--task", "t2v-1.3B", "--si", "480*832", "--frame", "33"])
    assert (run["pixels"], run["size"], run["frame_num"]) == (480 * 832, "480*832", 33)
    assert "pixels" not in wan.command_line(["--task", "t2v-1.3B"]) and "frame_num" not in wan.command_line([])
    assert wan.command_line(["--frame_num", "many"]) is None  # generate.py's parser refuses it (type=int)
    run = wan22.command_line(["--task", "ti2v-5B", "--size", "1280*704", "--frame_num", "121"])
    assert (run["pixels"], run["frame_num"]) == (1280 * 704, 121)
    assert "pixels" not in wan22.command_line(["--task", "s2v-14B", "--size", "1280*704", "--frame_num", "9"])
    with_lut(luts, "wan", tmp_path)
    path = config_file(tmp_path, CALIBRATED.format("wan", ", accept: [pixels, frame_num]"))
    wan.precheck(load_config(path), ["--task", "t2v-1.3B", "--sample_steps", "10", "--size", "832*480", "--frame_num",
                                     "9", "--prompt", "x"])


@pytest.mark.parametrize("integration, task, other", [("wan", "ti2v-5B", "wan22"), ("wan", "s2v-14B", "wan22"),
                                                      ("wan22", "t2v-1.3B", "wan"), ("wan22", "i2v-14B", "wan")])
def test_a_task_of_the_other_wan_version_is_refused_before_the_model_loads(integration, task, other):
    """A Wan2.1 config on a Wan2.2 checkout with --task ti2v-5B ran a whole generation uncached, exit 0; with
    t2v/i2v it was found only after the pipeline loaded (review, 2026-11-27)."""
    import importlib

    from taohooks.config import config_from_dict
    from taohooks.launcher.integration import IntegrationError

    module = importlib.import_module(f"taohooks.integrations.{integration}")
    with pytest.raises(IntegrationError, match=rf"--task {task} is a Wan2\.[12] task; use integration: {other} "):
        module.precheck(config_from_dict({"integration": integration}, "c.yaml"), ["--task", task, "--prompt", "x"])
    module.precheck(config_from_dict({"integration": integration}, "c.yaml"), ["--task", "nonsense"])  # its parser's


def test_wan_accepted_scheduler_with_a_sampler_label_runs(runner, luts, tmp_path):
    """Every shipped Wan config sets calibration.sampler: unipc, and accept: [scheduler], as the refusal advised, was
    refused again on that label (review, 2026-11-27)."""
    with_lut(luts, "wan", tmp_path)
    res = launch(runner, WAN, tmp_path, CALIBRATED.format("wan", ", sampler: unipc, accept: [scheduler]"),
                 "--sample_solver", "dpm++")
    assert res.returncode == 0, res.stderr
    assert saved_counts(res) == [(4, 20)]


def test_a_resolution_in_model_id_against_size_is_refused_before_the_model_loads():
    """A 720p config with --size 832*480 calibrated the 720p LUT at 480p without a word (review, 2026-11-27)."""
    from taohooks.config import config_from_dict
    from taohooks.integrations import wan
    from taohooks.launcher.integration import IntegrationError

    config = config_from_dict({"integration": "wan", "model_id": "wan2.1-i2v-14B-720p"}, "c.yaml")
    with pytest.raises(IntegrationError, match=r"model_id 'wan2.1-i2v-14B-720p' is for 720p \(1280\*720 or 720\*1280\), "
                                               r"this command line runs --size 832\*480"):
        wan.precheck(config, ["--task", "i2v-14B", "--size", "832*480", "--sample_steps", "40"])
    wan.precheck(config, ["--task", "i2v-14B", "--size", "1280*720", "--sample_steps", "40"])


def test_a_misspelt_config_path_gets_the_close_name(tmp_path):
    from taohooks.config import ConfigError, load_config

    (tmp_path / "wan_t2v_1.3B.yaml").write_text("integration: wan\n")
    with pytest.raises(ConfigError, match=r"config file does not exist; did you mean .*wan_t2v_1.3B.yaml\?"):
        load_config(tmp_path / "wan_t2v_1.3b.yaml")
    with pytest.raises(ConfigError, match="a folder, not a config file"):
        load_config(tmp_path)


def test_latte_lut_of_another_video_size_is_refused_at_the_first_generation(runner, luts, tmp_path):
    """Latte / Open-Sora-Plan LUTs recorded no video size: a complete LUT was used on another frame count (an image,
    video_length 1) without a word, and one still calibrating never completed (every run left out with a warning
    naming Wan's flags, exit 0) (walkthrough, 2026-11-27)."""
    import yaml

    with_lut(luts, "latte", tmp_path / "size")
    argv = LATTE.argv(tmp_path / "size")
    sample = tmp_path / "size" / "sample.yaml"
    sample.write_text(yaml.safe_dump({**yaml.safe_load(sample.read_text()), "video_length": 2}))
    res = launch(runner, LATTE, tmp_path / "size", CALIBRATED.format("latte", ""), argv=argv)
    assert res.returncode == 2, res.stderr
    assert ("frames (frames generated: Latte's video_length, Open-Sora-Plan's --num_frames, a diffusers "
            "pipeline's num_frames): this run 2, the LUT 4") in res.stderr
    from taohooks.taocache.lut import CalibrationLUT

    assert CalibrationLUT.load(luts("latte")).identity["frames"] == 4
    # the guidance scale too (recorded by no integration before: Wan2.2 walkthrough, 2026-11-27)
    assert CalibrationLUT.load(luts("latte")).identity["guide_scale"] == 7.5
    sample.write_text(yaml.safe_dump({**yaml.safe_load(sample.read_text()), "video_length": 4, "guidance_scale": 3.0}))
    res = launch(runner, LATTE, tmp_path / "size", CALIBRATED.format("latte", ""), argv=argv)
    assert res.returncode == 2 and "guide_scale (the guidance scale: Wan's --sample_guide_scale, Open-Sora-Plan's " \
        "--guidance_scale, a pipeline's guidance_scale): this run 3.0, the LUT 7.5" in res.stderr, res.stderr


@pytest.mark.parametrize("flags,said", [
    (["--guidance_scale", "5.0"], "guide_scale (the guidance scale: Wan's --sample_guide_scale, Open-Sora-Plan's "
                                  "--guidance_scale, a pipeline's guidance_scale): this run 5.0, the LUT 7.5"),
    (["--force_images"], "temporal_attention (off for images: Latte's t2i, Open-Sora-Plan's --force_images): this "
                         "run False, the LUT True"),
    (["--height", "32"], "height: this run 32, the LUT 16")])
def test_open_sora_plan_video_settings_on_the_command_line_stop_before_the_model_loads(runner, luts, tmp_path, flags,
                                                                                      said):
    """Refused at the first generation call, after T5-XXL, the DiT and the VAE had loaded (minutes on real weights),
    though the command line says them (ospuser, 2026-11-28)."""
    repo = REPOS["opensora_plan"]
    with_lut(luts, "opensora_plan", tmp_path)
    argv = [a if a != "7.5" else flags[1] for a in repo.argv(tmp_path)] if flags[0] == "--guidance_scale" else \
        repo.argv(tmp_path, *flags)
    res = launch(runner, repo, tmp_path, CALIBRATED.format("opensora_plan", ""), argv=argv)
    assert res.returncode == 2, res.stderr
    assert said in res.stderr and "(the command line)" in res.stderr and LOADED["opensora_plan"] not in res.stdout


def test_open_sora_plan_accept_on_the_command_line_s_video_settings(runner, luts, tmp_path):
    """The refusal offers calibration.accept for the keys that differ (it offered it for the scheduler alone); an
    accepted difference runs on a complete LUT, and an unfinished one is refused before the model loads (it was
    let through, then refused by the recorder after the model had loaded: review18)."""
    repo = REPOS["opensora_plan"]
    with_lut(luts, "opensora_plan", tmp_path)
    res = launch(runner, repo, tmp_path, CALIBRATED.format("opensora_plan", ""), argv=repo.argv(tmp_path, "--height",
                                                                                                   "32"))
    assert res.returncode == 2 and "or accept the difference knowingly with calibration.accept: [height]" \
        in res.stderr, res.stderr
    res = launch(runner, repo, tmp_path, CALIBRATED.format("opensora_plan", ", accept: [height]"),
                 argv=repo.argv(tmp_path, "--height", "32"))
    assert res.returncode == 0, res.stderr
    unfinished = CALIBRATED.format("opensora_plan", ", accept: [height]").replace("prompts: 1", "prompts: 3")
    res = launch(runner, repo, tmp_path, unfinished, argv=repo.argv(tmp_path, "--height", "32"))
    assert res.returncode == 2 and "height: this run 32, the LUT 16 (the command line): an unfinished LUT is " \
        "continued at the values it began with" in res.stderr and LOADED["opensora_plan"] not in res.stdout
    assert "calibration.accept: [height]" not in res.stderr


def test_open_sora_plan_plan_that_cannot_fit_the_lut_stops_before_the_model_loads(runner, luts, tmp_path):
    """plan.window past the LUT's 15 calls (6 PNDM steps): refused after the model loaded (ospuser, 2026-11-28)."""
    repo = REPOS["opensora_plan"]
    with_lut(luts, "opensora_plan", tmp_path)
    config = CALIBRATED.format("opensora_plan", "").replace("plan: {budget: 2, min_step: 5}",
                                                            "plan: {window: [13, 16]}")
    res = launch(runner, repo, tmp_path, config)
    assert res.returncode == 2, res.stderr
    assert "plan.window: window [13, 16] must satisfy 2 <= first <= last < 15" in res.stderr
    assert LOADED["opensora_plan"] not in res.stdout
    res = launch(runner, repo, tmp_path, CALIBRATED.format("opensora_plan", ""))  # (a plan that fits: it runs)
    assert res.returncode == 0, res.stderr
