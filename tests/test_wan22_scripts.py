"""integration: wan22 end to end on the Wan2.2 call-contract script (tests/fixtures/official_like/wan22).

T2V-A14B at 20 steps and shift 12: the high-noise expert runs steps 0-12 (timestep >= 875), the
low-noise expert steps 13-19; two calls per step (cond, uncond) on that step's expert. The script
prints ``wan22: calls high H low L model M; moves ...; sp S; fsdp F; finite B`` (real forward calls).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from prewarmed import RUNNER, base_env
from test_integration_scripts import FIXTURES, config_file, rel_l2, saved_counts

pytest.importorskip("diffusers")

SCRIPT = FIXTURES / "wan22" / "generate.py"
WAN21 = FIXTURES / "wan" / "generate.py"
PROMPT = "Two cats boxing on a spotlighted stage."
GUARD = (13, 14)  # the first two low-noise steps at 20 steps, shift 12


@pytest.fixture(scope="module")
def runner():
    return RUNNER


def argv(out: Path, *extra: str, task: str = "t2v-A14B", steps: int = 20):
    out.mkdir(parents=True, exist_ok=True)
    return [SCRIPT, "--task", task, "--prompt", PROMPT, "--sample_steps", str(steps), "--base_seed", "0",
            "--offload_model", "False", "--save_file", out / "video.pt", *extra]


def run(runner, out: Path, config: str = None, *extra: str, task: str = "t2v-A14B", steps: int = 20, script=None):
    args = argv(out, *extra, task=task, steps=steps)
    if script is not None:
        args[0] = script
    if config is not None:
        args = ["-m", "taohooks.run", *args, "--taocache", config_file(out, config)]
    return runner(args, out, base_env())


def calls(stdout: str):
    high, low, model = re.search(r"calls high (\d+) low (\d+) model (\d+)", stdout).groups()
    return int(high), int(low), int(model)


@pytest.fixture(scope="module")
def plain(runner, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain22")
    res = run(runner, out)
    assert res.returncode == 0, res.stderr
    return torch.load(out / "video.pt"), res


def test_budget_zero_is_bit_identical_and_both_experts_are_hooked(runner, plain, tmp_path):
    expected, res0 = plain
    assert calls(res0.stdout) == (26, 14, 0)
    res = run(runner, tmp_path, "integration: wan22\nplan: {budget: 0}\n")
    assert res.returncode == 0, res.stderr
    assert torch.equal(torch.load(tmp_path / "video.pt"), expected)
    assert saved_counts(res) == [(0, 40)], res.stderr  # both experts' calls counted in one generation


@pytest.fixture(scope="module")
def calibrated(runner, tmp_path_factory):
    """A folder whose LUT was calibrated by a first run (one prompt), with the config that skips."""
    out = tmp_path_factory.mktemp("cal22")
    config = "integration: wan22\nlut: lut.safetensors\ncalibration: {prompts: 1}\nplan: {budget: 2, min_step: 15}\n"
    res = run(runner, out, config)
    assert res.returncode == 0, res.stderr
    assert "calibrating" in res.stderr and saved_counts(res) == [(0, 40)]
    return out, config


def test_calibration_records_the_boundary_then_skips_in_the_low_noise_expert(runner, plain, calibrated):
    from taohooks.taocache.lut import CalibrationLUT
    from taohooks.taocache.cache import expert_guard

    out, config = calibrated
    lut = CalibrationLUT.load(out / "lut.safetensors")
    assert lut.steps == 20 and lut.identity["expert_boundary"] == 875.0
    assert lut.identity["experts"] == ["high_noise_model", "low_noise_model"] and lut.identity["shift"] == 12.0
    assert expert_guard(lut) == GUARD
    res = run(runner, out, config)
    assert res.returncode == 0, res.stderr
    assert saved_counts(res) == [(4, 40)], res.stderr
    assert calls(res.stdout) == (26, 10, 0)  # the two skipped steps were low-noise ones
    got, (expected, _) = torch.load(out / "video.pt"), plain
    assert torch.isfinite(got).all() and 0 < rel_l2(got, expected) < 0.05


def test_taocache_plan_says_where_the_experts_switch(calibrated, capsys):
    from taohooks.cli import main

    out, _ = calibrated
    assert main(["plan", str(out / "lut.safetensors"), "--budget", "2", "--min-step", "15"]) == 0
    text = capsys.readouterr().out
    assert ("# two experts: high-noise steps 0-12, low-noise steps 13-19 (timestep below 875); steps 13, 14 are "
            "always computed (right after the switch); 2 of 2 skips lie in the low-noise expert") in text


def test_taocache_plan_places_a_carried_luts_switch_by_wans_schedule(calibrated, tmp_path, capsys):
    """Carried to 16 steps, the split came from the LUT's interpolated timesteps, a step early (diffusers Wan2.2
    walkthrough, 2026-11-27); Wan's own schedule at 16 steps, shift 12 switches at step 11."""
    from taohooks.cli import main

    out, _ = calibrated
    (tmp_path / "lut.safetensors").write_bytes((out / "lut.safetensors").read_bytes())
    (tmp_path / "c.yaml").write_text("integration: wan22\nlut: lut.safetensors\n"
                                     "calibration: {prompts: 1, transfer: interpolate}\nplan: {budget: 2}\n")
    assert main(["plan", str(tmp_path / "c.yaml"), "--steps", "16"]) == 0
    assert "# two experts: high-noise steps 0-10, low-noise steps 11-15 (timestep below 875); steps 11, 12 are " \
           "always computed" in capsys.readouterr().out
    (tmp_path / "n.yaml").write_text("integration: wan22\nplan: {window: [13, 14], ratio: 1.0}\n")  # no LUT
    assert main(["plan", str(tmp_path / "n.yaml"), "--steps", "20"]) == 0
    assert "# without a LUT the expert switch of Wan2.2's A14B tasks is not known here" in capsys.readouterr().out


def test_a_window_across_the_switch_is_refused_before_the_experts_load(runner, calibrated, tmp_path):
    out, _ = calibrated
    (tmp_path / "lut.safetensors").write_bytes((out / "lut.safetensors").read_bytes())
    res = run(runner, tmp_path, "integration: wan22\nlut: lut.safetensors\ncalibration: {prompts: 1}\n"
                                "plan: {window: [12, 14]}\n")
    assert res.returncode == 2
    assert "skips step(s) 13, 14, the first steps after the expert switch" in res.stderr
    assert "Creating WanT2V pipeline" not in res.stdout + res.stderr


def test_the_plan_guards_the_runs_own_switch_at_another_shift(runner, calibrated, tmp_path):
    """With a LUT of shift 12 accepted at shift 8 (switch at step 11, the LUT's at 13), the guard came from the LUT:
    a window after the run's switch was refused as over it, one over it accepted, then computed at every planned skip
    (diffusers Wan2.2 walkthrough, 2026-11-27). The run's own timesteps (Wan's schedulers') place it now."""
    out, _ = calibrated
    (tmp_path / "lut.safetensors").write_bytes((out / "lut.safetensors").read_bytes())
    head = "integration: wan22\nlut: lut.safetensors\ncalibration: {prompts: 1, accept: [shift]}\n"
    res = run(runner, tmp_path, head + "plan: {window: [11, 12]}\n", "--sample_shift", "8")
    assert res.returncode == 2 and "skips step(s) 11, 12, the first steps after the expert switch" in res.stderr
    assert "Creating WanT2V pipeline" not in res.stdout + res.stderr
    res = run(runner, tmp_path, head + "plan: {window: [13, 14]}\n", "--sample_shift", "8")
    assert res.returncode == 0, res.stderr
    assert saved_counts(res) == [(4, 40)] and "expert switch" not in res.stderr, res.stderr


@pytest.mark.parametrize("flags", [("--ulysses_size", "2"), ("--dit_fsdp",), ("--offload_model", "True")],
                         ids=["sp", "fsdp", "offload"])
def test_the_instance_forward_inside_wrappers_and_offload_moves(runner, calibrated, tmp_path, flags):
    out, config = calibrated
    (tmp_path / "lut.safetensors").write_bytes((out / "lut.safetensors").read_bytes())
    ref = run(runner, out, config)
    res = run(runner, tmp_path, config, *flags)
    assert res.returncode == 0, res.stderr
    assert saved_counts(res) == [(4, 40)], res.stderr
    assert torch.equal(torch.load(tmp_path / "video.pt"), torch.load(out / "video.pt"))
    assert calls(res.stdout) == calls(ref.stdout) == (26, 10, 0)
    if "--ulysses_size" in flags:
        assert re.search(r"sp (\d+)", res.stdout).group(1) == "36"  # the SP instance forwards ran the computed calls
    if "--dit_fsdp" in flags:
        assert re.search(r"fsdp (\d+)", res.stdout).group(1) == "40"  # the wrappers saw every call


def test_ti2v_with_an_image_reads_the_per_token_timestep(runner, tmp_path):
    from taohooks.taocache.lut import CalibrationLUT

    config = "integration: wan22\nlut: lut.safetensors\ncalibration: {prompts: 1}\nplan: {budget: 2}\n"
    res = run(runner, tmp_path, config, "--image", "in.jpg", task="ti2v-5B", steps=10)
    assert res.returncode == 0, res.stderr
    lut = CalibrationLUT.load(tmp_path / "lut.safetensors")
    assert lut.timesteps.min() > 0 and "expert_boundary" not in lut.identity  # not the first-frame tokens' 0
    res = run(runner, tmp_path, config, "--image", "in.jpg", task="ti2v-5B", steps=10)
    assert res.returncode == 0, res.stderr
    assert saved_counts(res) == [(4, 20)], res.stderr
    assert calls(res.stdout) == (0, 0, 16)
    # text-to-video on the image-to-video LUT: used without a word (Wan2.2 walkthrough, 2026-11-27)
    assert lut.identity["image"] is True
    res = run(runner, tmp_path, config, task="ti2v-5B", steps=10)
    assert res.returncode == 2 and "was calibrated with an --image (image-to-video); this command line runs no " \
        "--image (text-to-video)" in res.stderr, res.stderr


def test_each_wan_integration_names_the_other_on_the_wrong_checkout(runner, tmp_path):
    res = run(runner, tmp_path / "a", "integration: wan\nplan: {budget: 0}\n")
    assert res.returncode == 2  # (its --task t2v-A14B: said before the experts load)
    assert "integration: wan is Wan2.1's, and --task t2v-A14B is a Wan2.2 task; use integration: wan22" in res.stderr
    assert "Creating" not in res.stdout
    out = tmp_path / "b"
    out.mkdir()
    args = ["-m", "taohooks.run", WAN21, "--task", "t2v-1.3B", "--prompt", PROMPT, "--sample_steps", "6",
            "--taocache", config_file(out, "integration: wan22\nplan: {budget: 0}\n")]
    res = runner(args, out, base_env())
    assert res.returncode == 2
    assert "integration: wan22 is Wan2.2's, and --task t2v-1.3B is a Wan2.1 task; use integration: wan " in res.stderr


def test_mismatches_are_refused_before_the_model_loads(runner, calibrated, tmp_path):
    out, config = calibrated
    (tmp_path / "lut.safetensors").write_bytes((out / "lut.safetensors").read_bytes())
    res = run(runner, tmp_path, config, "--sample_shift", "5")
    assert res.returncode == 2
    assert "was calibrated with --sample_shift 12.0; this command line runs --sample_shift 5.0" in res.stderr
    # the guide scale was neither recorded nor checked (Wan2.2 walkthrough, 2026-11-27)
    from taohooks.taocache.lut import CalibrationLUT
    assert CalibrationLUT.load(out / "lut.safetensors").identity["guide_scale"] == [3.0, 4.0]  # the t2v default
    res = run(runner, tmp_path, config, "--sample_guide_scale", "6")
    assert res.returncode == 2
    assert "was calibrated with --sample_guide_scale [3.0, 4.0]; this command line runs --sample_guide_scale " \
           "[6.0, 6.0]" in res.stderr, res.stderr
    res = run(runner, tmp_path, config.replace("calibration: {", "calibration: {accept: [guide_scale], "),
              "--sample_guide_scale", "6")
    assert res.returncode == 0, res.stderr


def test_pab_and_the_teacache_hybrid_act_in_both_experts(runner, plain, calibrated, tmp_path):
    """``pab:`` and ``teacache:`` with the two experts of T2V-A14B: both patch each expert's modules and keep
    their state per expert (the unit tests check that no expert uses the other's); here, through the script."""
    expected, _ = plain
    res = run(runner, tmp_path / "pab", "integration: wan22\nplan: {budget: 0}\n"
                                        "pab: {groups: [{pattern: 'blocks\\.\\d+\\.self_attn', range: 2}], "
                                        "steps: [1, 18]}\n")
    assert res.returncode == 0, res.stderr
    got = torch.load(tmp_path / "pab" / "video.pt")
    assert torch.isfinite(got).all() and not torch.equal(got, expected)  # attention was broadcast
    out, config = calibrated
    (tmp_path / "lut.safetensors").write_bytes((out / "lut.safetensors").read_bytes())
    res = run(runner, tmp_path, config + "teacache: {threshold: 0.5, coefficients: [1.0, 0.0], guard_band: 1}\n")
    assert res.returncode == 0, res.stderr
    reused = int(re.search(r"TeaCache reused the block residual on (\d+) calls", res.stderr).group(1))
    assert saved_counts(res) == [(4, 40)] and "window 17-18" in res.stderr, res.stderr  # TaoCache's 4 calls
    # TeaCache before step 17 - 1: high-noise steps 1-12 (24 calls), low-noise 14-15 (4; step 13, the low-noise
    # expert's first, computes: its proxy has nothing of its own to compare with)
    assert reused == 28
    # under sequence parallelism each rank would decide from its own shard of the activations: refused
    res = run(runner, tmp_path / "sp", config + "teacache: {threshold: 0.5, coefficients: [1.0, 0.0]}\n",
              "--ulysses_size", "2")
    assert res.returncode == 2 and "teacache: the hybrid decides from activations that sequence parallelism " \
                                   "(--ulysses_size 2) shards over ranks" in res.stderr, res.stderr


# ---------------------------------------------------------------------- S2V and Animate: one loop per clip
def test_s2v_each_clip_is_a_generation_calibrated_and_skipped(runner, tmp_path):
    """S2V-14B at 8 steps, guide scale 4.5 (cond, uncond), 2 clips in one generate(): budget 0 is bit-identical;
    calibration records both clips as two prompts; then every clip skips the planned window (2 of 8 steps, so 8 of
    the 32 calls), the summary says so, and the clips stay close to the full-step ones."""
    plain_out = tmp_path / "plain"
    res = run(runner, plain_out, None, "--num_clip", "2", task="s2v-14B", steps=8)
    assert res.returncode == 0, res.stderr
    expected = torch.load(plain_out / "video.pt")
    assert calls(res.stdout) == (0, 0, 32)
    res = run(runner, tmp_path / "zero", "integration: wan22\nplan: {budget: 0}\n", "--num_clip", "2",
              task="s2v-14B", steps=8)
    assert res.returncode == 0, res.stderr
    assert torch.equal(torch.load(tmp_path / "zero" / "video.pt"), expected) and saved_counts(res) == [(0, 32)]
    out = tmp_path / "cal"
    config = "integration: wan22\nlut: lut.safetensors\ncalibration: {prompts: 2}\nplan: {budget: 0.25}\n"
    res = run(runner, out, config, "--num_clip", "2", task="s2v-14B", steps=8)
    assert res.returncode == 0, res.stderr
    from taohooks.taocache.lut import CalibrationLUT
    lut = CalibrationLUT.load(out / "lut.safetensors")
    assert lut.num_prompts == 2 and tuple(lut.streams) == ("cond", "uncond") and lut.steps == 8
    res = run(runner, out, config, "--num_clip", "2", task="s2v-14B", steps=8)
    assert res.returncode == 0, res.stderr
    assert saved_counts(res) == [(8, 32)] and calls(res.stdout) == (0, 0, 24)
    assert "over 2 sampling loops (clips)" in res.stderr and "2 of 8 steps skipped" in res.stderr
    assert rel_l2(torch.load(out / "video.pt"), expected) < 0.05
    res = run(runner, out, config, "--num_clip", "2", "--ulysses_size", "2", task="s2v-14B", steps=8)
    assert res.returncode == 0, res.stderr  # sequence parallel: the blocks' attention patched, the class forward hooked
    assert saved_counts(res) == [(8, 32)] and "sp 24;" in res.stdout


def test_animate_runs_one_stream_at_guide_scale_one_and_checks_its_streams(runner, tmp_path):
    """Animate-14B's default guide scale 1: one call per step, so the loop and the LUT have the stream cond
    alone; a LUT or loop.streams of the other kind, and pab:, are refused before the model loads."""
    out = tmp_path / "a"
    config = ("integration: wan22\nlut: lut.safetensors\nloop: {steps: 8, streams: [cond]}\n"
              "calibration: {prompts: 2}\nplan: {budget: 0.25}\n")
    res = run(runner, out, config, "--refert_num", "1", task="animate-14B", steps=8)
    assert res.returncode == 0, res.stderr
    assert saved_counts(res) == [(0, 16)] and "over 2 sampling loops (clips)" in res.stderr  # 2 clips x 8 steps
    res = run(runner, out, config, "--refert_num", "1", task="animate-14B", steps=8)
    assert res.returncode == 0, res.stderr
    assert saved_counts(res) == [(4, 16)] and calls(res.stdout) == (0, 0, 12)
    res = run(runner, out, config, "--refert_num", "1", "--ulysses_size", "2", task="animate-14B", steps=8)
    assert res.returncode == 0, res.stderr  # sequence parallel: the blocks' attention patched, the class forward hooked
    assert saved_counts(res) == [(4, 16)] and "sp 12;" in res.stdout
    res = run(runner, out, config, "--sample_guide_scale", "2", task="animate-14B", steps=8)
    assert res.returncode == 2
    assert "loop.streams is [cond], this command line runs streams [cond, uncond] (guide scale 2" in res.stderr
    assert "lut.safetensors was calibrated on streams [cond], this command line runs streams [cond, uncond]" \
        in res.stderr
    guided = "integration: wan22\nloop: {steps: 8, streams: [cond, uncond]}\nplan: {window: [5, 6], ratio: 1.0}\n"
    res = run(runner, tmp_path / "guided", guided, "--refert_num", "1", task="animate-14B", steps=8)
    assert res.returncode == 0, res.stderr  # declared guided streams cover guide scale 1, as at the generation call
    # ... but not a LUT it would calibrate: it held [cond] alone under the guided config's name (Wan2.2 walkthrough)
    res = run(runner, tmp_path / "guided", guided + "lut: g.safetensors\n", "--refert_num", "1", task="animate-14B",
              steps=8)
    assert res.returncode == 2 and "would hold [cond] alone, which the config's guided runs could not use" \
        in res.stderr and not (tmp_path / "guided" / "g.safetensors").exists()
    # a config of the other per-clip task is named as that, with its streams
    other = "integration: wan22\nmodel_id: wan2.2-animate-14B\nloop: {steps: 8, streams: [cond]}\n"
    res = run(runner, tmp_path / "other", other, "--num_clip", "2", task="s2v-14B", steps=8)
    assert res.returncode == 2
    assert "model_id 'wan2.2-animate-14B' is for task animate-14B, this command line runs --task s2v-14B" in res.stderr
    assert "loop.streams is [cond], this command line runs streams [cond, uncond]" in res.stderr
    pab = ("integration: wan22\nplan: {budget: 0}\n"
           "pab:\n  groups:\n    - {pattern: 'blocks\\.\\d+\\.self_attn', range: 2}\n  timesteps: [100, 800]\n")
    res = run(runner, tmp_path / "pab", pab, task="animate-14B", steps=8)
    assert res.returncode == 2 and "pab: is not available for --task animate-14B" in res.stderr
    fit = "integration: wan22\nlut: lut.safetensors\ncalibration: {prompts: 2, teacache_fit: true}\n"
    res = run(runner, tmp_path / "fit", fit, task="animate-14B", steps=8)
    assert res.returncode == 2 and "calibration.teacache_fit fits the teacache: hybrid's polynomial" in res.stderr


def test_per_clip_tasks_refuse_calibration_over_a_prompts_file(runner, tmp_path):
    """Each clip is one LUT prompt, so ``taocache calibrate --prompts`` (one prompt per generate()) is refused
    before the model loads, with what to do instead; plain and data-parallel alike."""
    out = tmp_path
    config = config_file(out, "integration: wan22\nlut: lut.safetensors\ncalibration: {prompts: 2}\n")
    (out / "prompts.txt").write_text("prompt A\nprompt B\n")
    for devices in ((), ("--devices", "2")):
        res = runner(["-m", "taohooks.cli", "calibrate", config, "--prompts", out / "prompts.txt", *devices, "--",
                      *argv(out, "--num_clip", "2", task="s2v-14B", steps=6)], out, base_env())
        assert res.returncode != 0
        assert "--task s2v-14B runs one sampling loop per clip (Wan2.2 S2V, Animate)" in res.stderr, res.stderr
        assert "calibrate by running the script on your own inputs" in res.stderr
        assert "wan22: calls" not in res.stdout and not (out / "lut.safetensors").exists()
