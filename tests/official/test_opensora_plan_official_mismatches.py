"""Issue #11's mismatch checks on Open-Sora-Plan v1.1.0's own code (opt-in: TAOHOOKS_OSP_REPO;
diffusers 0.24.x-0.27.x).

A LUT calibrated through ``VideoGenPipeline.__call__`` with the sample script's default
``PNDMScheduler()`` (12 steps, 21 calls) and used with ``--sample_method DDIM``: refused before the
model loads from ``sample_t2v.py``'s command line, through ``taohooks.run.main`` on the checkout's
script, whose own argument parser (compiled from its ``__main__`` block) is compared with what the
integration reads; and at the first call of the real pipeline, even where DDIM makes as many calls
as PNDM (21 steps), from the identity of its scheduler. A YAML ``loop.steps`` that counts steps where
the pipeline makes PNDM's calls is refused at that call. Models and stand-ins:
``test_opensora_plan_official.py``.
"""
import argparse
import ast
import re

import pytest

from official_support import in_process_launcher, summaries
# skips this module, as that one, when TAOHOOKS_OSP_REPO is not set or diffusers is newer than 0.27
from test_opensora_plan_official import CALLS, OSP, STEPS, call, make_pipe, osp  # noqa: F401  (osp: the fixture)

import torch  # noqa: E402

import taohooks.integrations.opensora_plan as osp_integration  # noqa: E402
from taohooks.runtime import messages  # noqa: E402
from taohooks.config import config_from_dict  # noqa: E402
from taohooks.launcher.integration import IntegrationError  # noqa: E402
from taohooks.taocache.lut import CalibrationLUT, LUTMismatchError  # noqa: E402

BUDGET = 2
SCRIPT = OSP / "opensora" / "sample" / "sample_t2v.py"


def lut_config(folder, accept=()):
    data = {"integration": "opensora_plan", "lut": str(folder / "lut.safetensors"),
            "calibration": {"prompts": 1, "accept": list(accept)}, "plan": {"budget": BUDGET}}
    return config_from_dict(data, str(folder / "opensora_plan.yaml"))


def counted(pipe):
    """``pipe`` and the list of its transformer's computed calls (its first block's)."""
    calls = []
    pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    return pipe, calls


def ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler()  # what sample_t2v.py builds for --sample_method DDIM


@pytest.fixture
def calibrated(osp, tmp_path, monkeypatch, capfd):
    """A pipeline with the script's default PNDMScheduler() and a 1-prompt LUT calibrated on it (12 steps)."""
    monkeypatch.setattr(messages, "_seen", set())
    pipeline_videogen, modeling_latte = osp()
    pipe, calls = counted(make_pipe(pipeline_videogen, modeling_latte))
    osp_integration.install(lut_config(tmp_path))
    call(pipe)
    assert summaries(capfd.readouterr().err) == [(0, CALLS, None)]
    osp_integration.uninstall()
    calls.clear()
    return pipe, calls, CalibrationLUT.load(tmp_path / "lut.safetensors")


def test_calibration_records_transformer_and_scheduler(calibrated):
    _, _, lut = calibrated
    identity = dict(lut.identity)
    print(f"identity recorded by VideoGenPipeline.__call__: {identity}")
    assert re.fullmatch("[0-9a-f]{12}", identity.pop("architecture"))
    schedule = {k[len("noise_schedule."):]: identity.pop(k) for k in list(identity) if k.startswith("noise_schedule.")}
    solver = {k: identity.pop(k) for k in list(identity) if k.startswith("scheduler.")}  # (its update's settings)
    assert solver and "scheduler.set_alpha_to_one" in solver
    assert identity == {"model": "LatteT2V", "dtype": "torch.float32", "dtype.weights": "torch.float32",
                        "scheduler": "PNDMScheduler",
                        "prediction_type": "epsilon", "sampling_steps": STEPS,
                        "height": 64, "width": 64, "frames": 17, "temporal_attention": True, "guide_scale": 7.5}
    assert {k: schedule[k] for k in ("beta_start", "beta_end", "beta_schedule")} == {
        "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}  # (the script's PNDMScheduler())
    assert lut.steps == CALLS  # PNDM: steps + 9 calls


# ---------------------------------------------------------------------------- before the model loads
def script_parser():
    """The argument parser of ``sample_t2v.py``'s ``__main__`` block, compiled from the checkout's
    source up to ``args = parser.parse_args()``."""
    source = SCRIPT.read_text(encoding="utf-8")
    tree = ast.parse(source, str(SCRIPT))
    text = lambda node: ast.get_source_segment(source, node)  # noqa: E731 (ast.unparse: Python 3.9+; v1.1's is 3.8)
    main = next(node for node in tree.body if isinstance(node, ast.If) and "__main__" in text(node.test))
    body = []
    for node in main.body:
        if "parse_args" in text(node):
            break
        body.append(node)
    namespace = {"argparse": argparse}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(SCRIPT), "exec"), namespace)  # noqa: S102
    return namespace["parser"]


def read_by_precheck(monkeypatch, argv):
    """``(sample_method, num_sampling_steps)`` that the integration's pre-check reads from ``argv``."""
    seen = []
    monkeypatch.setattr(osp_integration, "check_sampler",
                        lambda config, method, steps, said, **kw: seen.append((method, steps)))
    osp_integration.precheck(lut_config(OSP), argv)
    return seen[0]


ARGVS = {
    "defaults": [],
    "ddim": ["--sample_method", "DDIM", "--num_sampling_steps", "100"],
    "equals": ["--sample_method=EulerDiscrete", "--num_sampling_steps=30"],
    "with-prompts": ["--text_prompt", "a cat", "a dog", "--sample_method", "DDPM", "--version", "65x512x512"],
}
ABBREVIATED = {"abbrev-method": ["--sample_m", "DDIM"], "abbrev-steps": ["--num_sampling", "30"]}


@pytest.mark.parametrize("argv", list(ARGVS.values()), ids=list(ARGVS))
def test_precheck_reads_what_sample_t2v_runs(monkeypatch, argv):
    args = script_parser().parse_args(argv)
    assert read_by_precheck(monkeypatch, argv) == (args.sample_method, args.num_sampling_steps)


@pytest.mark.parametrize("argv", list(ABBREVIATED.values()), ids=list(ABBREVIATED))
def test_precheck_reads_abbreviated_options_as_sample_t2v_does(monkeypatch, argv):
    test_precheck_reads_what_sample_t2v_runs(monkeypatch, argv)


@pytest.mark.parametrize("flags,said", [
    (["--sample_method", "DDIM", "--num_sampling_steps", str(STEPS)],
     "sample_method DDIM (the command line), the LUT was calibrated with PNDMScheduler"),
    (["--num_sampling_steps", "50"], f"50 sampling steps (the command line), the LUT was calibrated with {STEPS}"),
    ([], f"50 sampling steps (the command line), the LUT was calibrated with {STEPS}"),  # the script's default
], ids=["ddim", "steps", "default-steps"])
def test_sample_t2v_mismatch_exits_2_before_the_script_runs(calibrated, tmp_path, monkeypatch, capfd, flags, said):
    """``taocache-run opensora/sample/sample_t2v.py ... --taocache ...``: refused before the script
    runs (it would import the causal VAE, deepspeed, ... and load the checkpoints)."""
    import yaml

    (tmp_path / "opensora_plan.yaml").write_text(yaml.safe_dump(
        {"integration": "opensora_plan", "lut": "lut.safetensors", "calibration": {"prompts": 1},
         "plan": {"budget": BUDGET}}))
    run = in_process_launcher(monkeypatch)
    assert run([str(SCRIPT), "--model_path", "no-checkpoints", "--version", "65x512x512", *flags,
                "--taocache", str(tmp_path / "opensora_plan.yaml")]) == 2
    err = capfd.readouterr().err
    assert err.startswith(f"taocache-run: LUT {tmp_path / 'lut.safetensors'} does not fit this run: ") and said in err


def test_precheck_passes_the_calibrated_command_line(calibrated, tmp_path):
    osp_integration.precheck(lut_config(tmp_path), ["--sample_method", "PNDM", "--num_sampling_steps", str(STEPS)])


# ---------------------------------------------------------------------------- at the first call
def test_ddim_with_as_many_calls_as_pndm_is_refused_by_its_identity(calibrated, osp, tmp_path, capfd):
    """DDIM at 21 steps makes PNDM-12's 21 calls: the step count cannot tell them apart, the identity does."""
    pipeline_videogen, modeling_latte = osp()
    pipe, calls = counted(make_pipe(pipeline_videogen, modeling_latte, scheduler=ddim()))
    osp_integration.install(lut_config(tmp_path))
    with pytest.raises(LUTMismatchError) as info:
        call(pipe, steps=CALLS)
    message = str(info.value)
    assert "scheduler: this run 'DDIMScheduler', the LUT 'PNDMScheduler'" in message
    assert f"sampling_steps: this run {CALLS}, the LUT {STEPS}" in message
    assert "calibration.accept: [scheduler, sampling_steps]" in message
    assert calls == [] and summaries(capfd.readouterr().err) == []


def test_the_accept_the_refusal_suggests_runs(calibrated, osp, tmp_path, capfd):
    pipeline_videogen, modeling_latte = osp()
    pipe, calls = counted(make_pipe(pipeline_videogen, modeling_latte, scheduler=ddim()))
    osp_integration.install(lut_config(tmp_path, accept=["scheduler", "sampling_steps"]))
    out = call(pipe, steps=CALLS)
    assert summaries(capfd.readouterr().err) == [(BUDGET, CALLS, None)]
    assert torch.isfinite(out).all() and len(calls) == CALLS - BUDGET


def test_ddim_at_the_luts_step_count_is_refused_by_its_calls(calibrated, osp, tmp_path):
    pipeline_videogen, modeling_latte = osp()
    pipe, calls = counted(make_pipe(pipeline_videogen, modeling_latte, scheduler=ddim()))
    osp_integration.install(lut_config(tmp_path))
    with pytest.raises(LUTMismatchError, match=f"has {CALLS} steps, this run has {STEPS}"):
        call(pipe)
    assert calls == []


def test_yaml_loop_steps_counting_steps_not_pndm_calls(osp, tmp_path):
    """``loop.steps: 12`` for ``--num_sampling_steps 12``: the pipeline's PNDM makes 21 calls."""
    pipeline_videogen, modeling_latte = osp()
    pipe, calls = counted(make_pipe(pipeline_videogen, modeling_latte))
    osp_integration.install(config_from_dict({"integration": "opensora_plan", "loop": {"steps": STEPS},
                                              "plan": {"budget": 0}}, str(tmp_path / "opensora_plan.yaml")))
    with pytest.raises(IntegrationError) as info:
        call(pipe)
    assert str(info.value).startswith(
        f"{tmp_path / 'opensora_plan.yaml'}: loop.steps is {STEPS}, but this "
        f"pipeline_videogen.VideoGenPipeline.__call__ call runs {CALLS} denoiser calls per stream")
    assert calls == []
