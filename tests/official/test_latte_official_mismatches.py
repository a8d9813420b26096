"""Issue #11's mismatch checks on Latte's own code (opt-in: TAOHOOKS_LATTE_REPO; diffusers 0.24.x).

A LUT calibrated with ``sample_method: DDIM`` through ``LattePipeline.__call__`` and used with
``EulerDiscrete``, whose timesteps can coincide with DDIM's (so that the per-step timestep check
cannot see the difference): refused before the model loads, from the sample config that
``sample/sample_t2x.py --config`` reads (the checkout's own ``configs/t2x/t2v_sample.yaml`` with
the sampler changed), through ``taohooks.run.main`` on the checkout's ``sample_t2x.py``; and at
the first call of the real pipeline, from the identity of its scheduler. A YAML ``loop:`` that
contradicts the pipeline call is refused at that call. Models and stand-ins: ``test_latte_official.py``.
"""
import re

import pytest
import yaml

from official_support import in_process_launcher, summaries
# skips this module, as that one, when TAOHOOKS_LATTE_REPO is not set or diffusers is not 0.24.x
from test_latte_official import LATTE, STEPS, call, latte, make_pipe  # noqa: F401  (latte: the fixture)

import torch  # noqa: E402

import taohooks.integrations.latte as latte_integration  # noqa: E402
from taohooks.runtime import messages  # noqa: E402
from taohooks.config import config_from_dict  # noqa: E402
from taohooks.launcher.integration import IntegrationError  # noqa: E402
from taohooks.taocache.lut import CalibrationLUT, LUTMismatchError  # noqa: E402

BUDGET = 2


def euler_on_ddims_timesteps():
    """``sample_method: EulerDiscrete`` with the sample config's betas; with "leading" timestep spacing
    (which a checkpoint's scheduler config may set) its timesteps are DDIM's (900 ... 0 for 10 steps)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                  timestep_spacing="leading")


def lut_config(folder, accept=()):
    data = {"integration": "latte", "model_id": "latte-tiny", "lut": str(folder / "lut.safetensors"),
            "calibration": {"prompts": 1, "accept": list(accept)}, "plan": {"budget": BUDGET}}
    return config_from_dict(data, str(folder / "latte.yaml"))


def counted(pipe):
    """``pipe`` and the list of its transformer's computed calls (its first block's; a skipped call
    reaches the transformer's hook, not its blocks)."""
    calls = []
    pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    return pipe, calls


@pytest.fixture
def calibrated(latte, tmp_path, monkeypatch, capfd):
    """A pipeline and a 1-prompt LUT calibrated on it through ``LattePipeline.__call__`` (DDIM, 10 steps)."""
    monkeypatch.setattr(messages, "_seen", set())
    pipeline_latte, latte_t2v = latte()
    pipe, calls = counted(make_pipe(pipeline_latte, latte_t2v))
    latte_integration.install(lut_config(tmp_path))
    call(pipe)
    assert summaries(capfd.readouterr().err) == [(0, STEPS, None)]
    latte_integration.uninstall()
    calls.clear()
    return pipe, calls, CalibrationLUT.load(tmp_path / "lut.safetensors")


def test_calibration_records_transformer_and_scheduler(calibrated):
    _, _, lut = calibrated
    identity = dict(lut.identity)
    print(f"identity recorded by LattePipeline.__call__: {identity}")
    assert re.fullmatch("[0-9a-f]{12}", identity.pop("architecture"))
    schedule = {k[len("noise_schedule."):]: identity.pop(k) for k in list(identity) if k.startswith("noise_schedule.")}
    solver = {k: identity.pop(k) for k in list(identity) if k.startswith("scheduler.")}  # (its update's settings)
    assert solver and "scheduler.set_alpha_to_one" in solver
    assert identity == {"model": "LatteT2V", "dtype": "torch.float32", "dtype.weights": "torch.float32",
                        "scheduler": "DDIMScheduler",
                        "prediction_type": "epsilon", "sampling_steps": STEPS,
                        "height": 64, "width": 64, "frames": 4, "temporal_attention": True, "guide_scale": 7.5}
    # the betas sample_t2x.py gives every scheduler, from the checkout's t2v_sample.yaml
    assert {k: schedule[k] for k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps")} == {
        "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", "num_train_timesteps": 1000}
    assert lut.steps == STEPS and tuple(lut.streams) == ("uncond", "cond")


# ---------------------------------------------------------------------------- before the model loads
def sample_config(folder, **changes):
    """The checkout's own ``configs/t2x/t2v_sample.yaml`` at the video the LUT was calibrated on (64x64, 4 frames)
    with ``changes``, as a file for ``--config``."""
    sample = yaml.safe_load((LATTE / "configs" / "t2x" / "t2v_sample.yaml").read_text())
    assert sample["sample_method"] == "DDIM" and sample["num_sampling_steps"] == 50  # what the checkout ships
    path = folder / "t2v_sample.yaml"
    path.write_text(yaml.safe_dump({**sample, "image_size": [64, 64], "video_length": 4, **changes}))
    return path


def test_precheck_reads_the_sample_config(calibrated, tmp_path):
    config = lut_config(tmp_path)
    latte_integration.precheck(config, ["--config", str(sample_config(tmp_path, num_sampling_steps=STEPS))])
    with pytest.raises(IntegrationError) as info:
        latte_integration.precheck(config, ["--config", str(sample_config(tmp_path, sample_method="EulerDiscrete",
                                                                          num_sampling_steps=STEPS))])
    assert (f"sample_method EulerDiscrete ({tmp_path / 't2v_sample.yaml'}), the LUT was calibrated with "
            "DDIMScheduler") in str(info.value)
    assert "calibration.accept: [scheduler]" in str(info.value)
    with pytest.raises(IntegrationError, match=f"50 sampling steps .*, the LUT was calibrated with {STEPS}"):
        latte_integration.precheck(config, ["--config", str(sample_config(tmp_path))])  # the shipped 50 steps


def test_precheck_reads_the_video_and_the_betas(calibrated, tmp_path):
    """The checkout's YAML as shipped (512x512, 16 frames) and its betas changed: refused before the model loads."""
    config = lut_config(tmp_path)
    with pytest.raises(IntegrationError) as info:
        latte_integration.precheck(config, ["--config", str(sample_config(
            tmp_path, num_sampling_steps=STEPS, image_size=[512, 512], video_length=16, beta_end=0.012))])
    said = str(info.value)
    assert "height: this run 512, the LUT 64; width: this run 512, the LUT 64" in said
    assert "this run 16, the LUT 4" in said and "noise_schedule.beta_end" in said and "this run 0.012, the LUT 0.02" \
        in said
    assert "calibration.accept: [height, width, architecture, frames, noise_schedule]" in said  # (LatteT2V is built
    assert "accepting frames alone is refused at the first call" in said                       # with video_length)


def test_precheck_reads_an_abbreviated_config_option(calibrated, tmp_path):
    config = sample_config(tmp_path, sample_method="EulerDiscrete", num_sampling_steps=STEPS)
    with pytest.raises(IntegrationError, match="sample_method EulerDiscrete"):
        latte_integration.precheck(lut_config(tmp_path), ["--conf", str(config)])


def test_sample_t2x_with_euler_against_the_ddim_lut_exits_2(calibrated, tmp_path, monkeypatch, capfd):
    """``taocache-run sample/sample_t2x.py --config ... --taocache ...``: refused before the script runs
    (it would import torchvision and load the checkpoints)."""
    (tmp_path / "latte.yaml").write_text(yaml.safe_dump(
        {"integration": "latte", "lut": "lut.safetensors", "calibration": {"prompts": 1}, "plan": {"budget": BUDGET}}))
    run = in_process_launcher(monkeypatch)
    config = sample_config(tmp_path, sample_method="EulerDiscrete", num_sampling_steps=STEPS)
    assert run([str(LATTE / "sample" / "sample_t2x.py"), "--config", str(config),
                "--taocache", str(tmp_path / "latte.yaml")]) == 2
    err = capfd.readouterr().err
    assert err.startswith("taocache-run: LUT ") and "sample_method EulerDiscrete" in err
    assert "calibrated with DDIMScheduler" in err  # (had the script run, its imports would have failed here)


# ---------------------------------------------------------------------------- at the first call
def test_euler_pipeline_against_the_ddim_lut_is_refused_at_the_first_call(calibrated, latte, tmp_path, capfd):
    _, _, lut = calibrated
    euler = euler_on_ddims_timesteps()
    euler.set_timesteps(STEPS)
    assert torch.equal(euler.timesteps.float(), lut.timesteps.float())  # the timestep check cannot see it
    pipeline_latte, latte_t2v = latte()
    pipe, calls = counted(make_pipe(pipeline_latte, latte_t2v, scheduler=euler_on_ddims_timesteps()))
    latte_integration.install(lut_config(tmp_path))
    with pytest.raises(LUTMismatchError) as info:
        call(pipe)
    assert "scheduler: this run 'EulerDiscreteScheduler', the LUT 'DDIMScheduler'" in str(info.value)
    assert calls == [] and summaries(capfd.readouterr().err) == []
    latte_integration.uninstall()
    latte_integration.install(lut_config(tmp_path, accept=["scheduler"]))  # accepted knowingly: runs and skips
    out = call(pipe)
    err = capfd.readouterr().err
    assert summaries(err) == [(BUDGET, STEPS, None)] and "runs at timestep" not in err
    assert torch.isfinite(out).all() and len(calls) == STEPS - BUDGET


def test_another_step_count_is_refused_at_the_first_call(calibrated, tmp_path):
    pipe, calls, _ = calibrated
    latte_integration.install(lut_config(tmp_path))
    with pytest.raises(LUTMismatchError, match=f"has {STEPS} steps, this run has 12"):
        call(pipe, steps=12)
    assert calls == []


@pytest.mark.parametrize("loop,said", [
    ({"steps": 50}, f"loop.steps is 50, but this pipeline_latte.LattePipeline.__call__ call runs {STEPS} denoiser "
                    "calls per stream"),
    ({"streams": ["cond", "uncond"]}, "loop.streams is [cond, uncond], but this pipeline_latte.LattePipeline.__call__ "
                                      "call runs streams [uncond, cond]"),
], ids=["steps", "streams"])
def test_yaml_loop_contradicting_the_pipeline_call(latte, tmp_path, loop, said):
    pipeline_latte, latte_t2v = latte()
    pipe, calls = counted(make_pipe(pipeline_latte, latte_t2v))
    latte_integration.install(config_from_dict({"integration": "latte", "loop": loop, "plan": {"budget": 0}},
                                               str(tmp_path / "latte.yaml")))
    with pytest.raises(IntegrationError) as info:
        call(pipe)
    assert str(info.value).startswith(f"{tmp_path / 'latte.yaml'}: ") and said in str(info.value)
    assert calls == []
