"""Issue #11's mismatch checks on Wan2.1's own code (opt-in: TAOHOOKS_WAN_REPO).

A LUT calibrated at one ``--sample_shift`` / ``--sample_solver`` / ``--sample_steps`` / ``--task``
and used with another is refused, by three routes:

- **the real command line**: ``taohooks.run.main`` runs the checkout's ``generate.py`` (its own
  argparse, defaults and ``WanT2V.generate`` call) with ``--taocache``; a mismatch exits 2 before
  generate.py constructs its pipeline (where real checkpoints load). Stand-ins, besides those of
  ``test_wan_official.py``: ``wan.WanT2V`` builds the tiny pipeline instead of loading checkpoints,
  ``wan.utils.utils`` (imageio, torchvision) holds the checkout's own ``str2bool`` and a
  ``cache_video`` that keeps the tensor, ``wan.utils.prompt_extend`` (dashscope) is empty and
  ``easydict`` is a dict with attribute access when not installed;
- **generate.py's argument semantics**: its own ``_parse_args``/``_validate_args``, compiled from
  the checkout, against what the integration's ``command_line`` reads from the same arguments;
- **the first call**: ``WanT2V.generate`` called directly (no launcher, so no pre-check): the
  identity its arguments give is checked against the LUT's before the model's first call.
"""
import argparse
import random
import re
import sys
import types
import warnings

import pytest

from official_support import in_process_launcher, script_definitions, stub_module, summaries
# skips this module, as that one, when TAOHOOKS_WAN_REPO is not set; ``wan``, ``gloo_group``: its fixtures
from test_wan_official import CALLS, STEPS, WAN, gloo_group, make_pipe, tiny_model, wan  # noqa: F401

import torch  # noqa: E402
from torch import nn  # noqa: E402

import taohooks.integrations.wan as wan_integration  # noqa: E402
from taohooks.runtime import messages  # noqa: E402
from taohooks.config import config_from_dict  # noqa: E402
from taohooks.taocache.lut import CalibrationLUT, LUTMismatchError  # noqa: E402

BUDGET = 2  # plan: {budget: 2} once the LUT is complete: 2 steps, 4 calls saved of 16
# What generate.py is given in every run here: 8 steps on one latent frame of 832x480 (1560 tokens).
BASE = ["--task", "t2v-1.3B", "--size", "832*480", "--frame_num", "1", "--sample_steps", str(STEPS),
        "--ckpt_dir", "no-checkpoints", "--prompt", "a tiny test prompt", "--base_seed", "0",
        "--offload_model", "False"]


class EasyDict(dict):
    """``easydict.EasyDict`` as far as ``wan/configs`` uses it (when easydict is not installed)."""

    def __init__(self, d=None, **kwargs):
        super().__init__()
        self.update(d or {}, **kwargs)

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value


@pytest.fixture
def script(wan, monkeypatch, tmp_path):
    """``run(config_text, *flags)``: ``taocache-run generate.py BASE+flags --taocache CONFIG`` in this
    process; returns the exit status. ``made`` lists the pipelines generate.py constructed (where
    checkpoints would load), ``saved`` the videos it saved."""
    text2video, model_module = wan.load()
    made, saved = [], []
    stub_module("easydict", EasyDict=EasyDict)
    package = sys.modules["wan"]

    def WanT2V(config, checkpoint_dir, device_id=0, rank=0, t5_fsdp=False, dit_fsdp=False, use_usp=False,
               t5_cpu=False):
        made.append(checkpoint_dir)
        return make_pipe(text2video, tiny_model(model_module))

    monkeypatch.setattr(package, "WanT2V", WanT2V, raising=False)
    utils = types.ModuleType("wan.utils.utils")
    script_definitions(WAN / "wan" / "utils" / "utils.py", ["str2bool"], utils.__dict__)
    utils.cache_video = lambda tensor, save_file, **kw: saved.append((save_file, tensor))
    utils.cache_image = utils.cache_video
    extend = types.ModuleType("wan.utils.prompt_extend")
    extend.DashScopePromptExpander = extend.QwenPromptExpander = None
    monkeypatch.setitem(sys.modules, "wan.utils.utils", utils)
    monkeypatch.setitem(sys.modules, "wan.utils.prompt_extend", extend)
    taocache_run = in_process_launcher(monkeypatch)

    def run(config_text, *flags, base=BASE):
        """generate.py runs warnings.filterwarnings('ignore'): pytest restores the filters after the test."""
        path = tmp_path / "wan.yaml"
        path.write_text(config_text)
        wan_integration.uninstall()  # a fresh launch installs it again
        return taocache_run([str(WAN / "generate.py"), *base, *flags, "--save_file", str(tmp_path / "v.mp4"),
                             "--taocache", str(path)])

    try:
        yield types.SimpleNamespace(run=run, made=made, saved=saved, lut=tmp_path / "lut.safetensors")
    finally:
        if getattr(sys.modules.get("easydict"), "__taohooks_stub__", False):
            del sys.modules["easydict"]  # wan.configs, which imported it, goes with the wan fixture


def lut_config(accept=()):
    return (f"integration: wan\nmodel_id: wan2.1-t2v-1.3B\nlut: lut.safetensors\n"
            f"calibration: {{prompts: 1, accept: [{', '.join(accept)}]}}\nplan: {{budget: {BUDGET}}}\n")


_calibrated = {}


def calibrated_lut(script, tmp_path_factory, capfd):
    """A 1-prompt LUT calibrated through generate.py at BASE (t2v-1.3B, unipc, shift 5 by default, 8
    steps), made once per session (``_calibrated["err"]``: what that run said) and copied to ``script.lut``."""
    import shutil

    if "lut" not in _calibrated:
        capfd.readouterr()
        assert script.run(lut_config()) == 0
        _calibrated["err"] = capfd.readouterr().err
        assert len(script.made) == 1 and len(script.saved) == 1
        keep = tmp_path_factory.mktemp("wan_lut") / "lut.safetensors"
        shutil.copy(script.lut, keep)
        _calibrated["lut"] = keep
        script.made.clear()
        script.saved.clear()
    else:
        shutil.copy(_calibrated["lut"], script.lut)
    return CalibrationLUT.load(script.lut)


# ---------------------------------------------------------------------------- the real command line
def test_calibration_through_generate_py_records_the_runs_identity(script, capfd, tmp_path_factory):
    lut = calibrated_lut(script, tmp_path_factory, capfd)
    print(f"identity recorded through generate.py: {lut.identity}")
    assert lut.steps == STEPS and tuple(lut.streams) == ("cond", "uncond") and lut.num_prompts == 1
    assert re.fullmatch("[0-9a-f]{12}", lut.identity.pop("architecture"))
    assert lut.identity == {"model": "WanModel", "dtype": "torch.float32", "dtype.weights": "torch.float32",
                            "scheduler": "unipc", "shift": 5.0,
                            "task": "t2v-1.3B", "pixels": 832 * 480, "frame_num": 1, "guide_scale": 5.0}
    err = _calibrated["err"]
    assert "taohooks: calibrating: LUT" in err and summaries(err) == [(0, CALLS, None)]


def test_a_matching_command_line_runs_and_skips(script, capfd, tmp_path_factory):
    calibrated_lut(script, tmp_path_factory, capfd)
    capfd.readouterr()
    assert script.run(lut_config()) == 0
    assert summaries(capfd.readouterr().err) == [(2 * BUDGET, CALLS, None)]
    assert len(script.made) == 1 and len(script.saved) == 1


@pytest.mark.parametrize("flags,said", [
    (["--sample_shift", "8"], "was calibrated with --sample_shift 5.0; this command line runs --sample_shift 8.0"),
    (["--sample_solver", "dpm++"], "was calibrated with --sample_solver unipc; this command line runs "
                                   "--sample_solver dpm++"),
    (["--sample_steps", "10"], f"has {STEPS} steps, this command line runs 10 (--sample_steps 10)"),
    (["--task", "t2v-14B"], "was calibrated with --task t2v-1.3B; this command line runs --task t2v-14B"),
], ids=["shift", "solver", "steps", "task"])
def test_a_mismatch_exits_2_before_generate_py_builds_its_pipeline(script, capfd, tmp_path_factory, flags, said):
    calibrated_lut(script, tmp_path_factory, capfd)
    capfd.readouterr()
    assert script.run(lut_config(), *flags) == 2
    err = capfd.readouterr().err
    assert said in err and err.startswith("taocache-run: ")
    assert script.made == [] and script.saved == []  # generate.py never reached the checkpoints


def test_the_task_against_the_configs_model_id(script, capfd, tmp_path_factory):
    calibrated_lut(script, tmp_path_factory, capfd)
    capfd.readouterr()
    assert script.run(lut_config(), "--task", "t2v-14B") == 2
    assert ("model_id 'wan2.1-t2v-1.3B' is for task t2v-1.3B, this command line runs --task t2v-14B"
            in capfd.readouterr().err)


def test_without_sample_steps_generate_py_runs_50_and_is_refused(script, capfd, tmp_path_factory):
    calibrated_lut(script, tmp_path_factory, capfd)
    capfd.readouterr()
    at = BASE.index("--sample_steps")
    assert script.run(lut_config(), base=BASE[:at] + BASE[at + 2:]) == 2
    assert f"has {STEPS} steps, this command line runs 50 (--sample_steps 50, the default)" in capfd.readouterr().err
    assert script.made == []


def test_yaml_loop_steps_contradicting_the_command_line(script, capfd):
    assert script.run("integration: wan\nloop: {steps: 50}\nplan: {budget: 0}\n") == 2
    assert f"loop.steps is 50, this command line runs {STEPS} steps (--sample_steps {STEPS})" in capfd.readouterr().err
    assert script.made == []


def test_an_accepted_shift_runs_and_its_warning_survives_generate_py(script, capfd, tmp_path_factory):
    """generate.py runs ``warnings.filterwarnings('ignore')``; the timestep warning still reaches stderr."""
    calibrated_lut(script, tmp_path_factory, capfd)
    capfd.readouterr()
    assert script.run(lut_config(accept=["shift"]), "--sample_shift", "8") == 0
    assert warnings.filters[0][:3] == ("ignore", None, Warning)  # what generate.py did to this process
    err = capfd.readouterr().err
    assert summaries(err) == [(2 * BUDGET, CALLS, None)]
    assert "taohooks: warning: step " in err and "runs at timestep" in err, err


def test_an_abbreviated_option_is_read_as_generate_py_reads_it(script, capfd):
    """generate.py's argparse takes ``--sample_sh 8`` for ``--sample_shift 8``: a LUT calibrated so
    must fit the same command line again."""
    assert script.run(lut_config(), "--sample_sh", "8") == 0  # calibrates: the first call records shift 8.0
    assert CalibrationLUT.load(script.lut).identity["shift"] == 8.0
    capfd.readouterr()
    assert script.run(lut_config(), "--sample_sh", "8") == 0, capfd.readouterr().err


# ---------------------------------------------------------------------------- generate.py's argument semantics
def generate_py_arguments(argv):
    """``(task, steps, solver, shift)`` that the checkout's generate.py passes to ``generate()`` for
    ``argv``: its own ``_parse_args`` and ``_validate_args``, compiled from its source."""
    from wan.configs import MAX_AREA_CONFIGS, SIZE_CONFIGS, SUPPORTED_SIZES, WAN_CONFIGS

    namespace = {"argparse": argparse, "sys": sys, "random": random, "WAN_CONFIGS": WAN_CONFIGS,
                 "SIZE_CONFIGS": SIZE_CONFIGS, "SUPPORTED_SIZES": SUPPORTED_SIZES,
                 "MAX_AREA_CONFIGS": MAX_AREA_CONFIGS}
    script_definitions(WAN / "wan" / "utils" / "utils.py", ["str2bool"], namespace)
    script_definitions(WAN / "generate.py", ["EXAMPLE_PROMPT", "_parse_args", "_validate_args"], namespace)
    saved = sys.argv
    sys.argv = ["generate.py", "--ckpt_dir", "x", *argv]
    try:
        args = namespace["_parse_args"]()
    finally:
        sys.argv = saved
    namespace["_validate_args"](args)
    return args.task, args.sample_steps, args.sample_solver, float(args.sample_shift)


ARGVS = {
    "defaults": [],
    "t2v-1.3B": ["--task", "t2v-1.3B", "--size", "832*480"],
    "i2v-480p": ["--task", "i2v-14B", "--size", "832*480"],
    "i2v-480p-portrait": ["--task", "i2v-14B", "--size", "480*832"],
    "i2v-720p": ["--task", "i2v-14B", "--size", "1280*720"],
    "flf2v": ["--task", "flf2v-14B"],
    "vace-1.3B": ["--task", "vace-1.3B", "--size", "480*832"],
    "t2i": ["--task", "t2i-14B", "--frame_num", "1"],
    "explicit": ["--sample_shift", "8", "--sample_steps", "30", "--sample_solver", "dpm++"],
    "equals": ["--sample_shift=3", "--sample_steps=20", "--task=i2v-14B"],
    "i2v-explicit": ["--task", "i2v-14B", "--size", "832*480", "--sample_shift", "7", "--sample_steps", "45"],
}
# argparse's default allow_abbrev: generate.py accepts any unique prefix of an option
ABBREVIATED = {
    "abbrev-steps": ["--sample_ste", "30"],
    "abbrev-shift": ["--sample_sh", "8"],
    "abbrev-solver": ["--sample_so", "dpm++"],
    "abbrev-task": ["--ta", "i2v-14B", "--si", "832*480"],
}


def assert_read_as_generate_py_does(argv):
    stub_module("easydict", EasyDict=EasyDict)
    try:
        runs = generate_py_arguments(argv)
    finally:
        if getattr(sys.modules.get("easydict"), "__taohooks_stub__", False):
            del sys.modules["easydict"]
    read = wan_integration.command_line(argv)
    assert (read["task"], read["steps"], read["scheduler"], read["shift"]) == runs


@pytest.mark.parametrize("argv", list(ARGVS.values()), ids=list(ARGVS))
def test_command_line_reads_what_generate_py_runs(wan, argv):
    assert_read_as_generate_py_does(argv)


@pytest.mark.parametrize("argv", list(ABBREVIATED.values()), ids=list(ABBREVIATED))
def test_command_line_reads_abbreviated_options_as_generate_py_does(wan, argv):
    assert_read_as_generate_py_does(argv)


# ---------------------------------------------------------------------------- the first call (no launcher)
def direct(pipe, shift=5.0, solver="unipc", steps=STEPS):
    """``WanT2V.generate`` as generate.py calls it, on a 64x64 latent of 3 frames (fast)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe.generate("a tiny test prompt", size=(64, 64), frame_num=9, shift=shift, sample_solver=solver,
                             sampling_steps=steps, guide_scale=5.0, seed=0, offload_model=False)


def counted(model):
    """``model`` and the list of its computed calls (its first block's; a skipped call reaches the
    model's hook, not its blocks)."""
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    return model, calls


@pytest.fixture
def first_call(wan, tmp_path, monkeypatch):
    """The tiny WanT2V, with a LUT calibrated on it by one direct generate() (unipc, shift 5, 8 steps)."""
    monkeypatch.setattr(messages, "_seen", set())
    text2video, model_module = wan.load()
    model, calls = counted(tiny_model(model_module))
    pipe = make_pipe(text2video, model)
    wan_integration.install(config_from_dict(
        {"integration": "wan", "lut": str(tmp_path / "lut.safetensors"), "calibration": {"prompts": 1},
         "plan": {"budget": BUDGET}}, str(tmp_path / "wan.yaml")))
    direct(pipe)
    lut = CalibrationLUT.load(tmp_path / "lut.safetensors")
    calls.clear()
    return types.SimpleNamespace(pipe=pipe, calls=calls, lut=lut, text2video=text2video, model_module=model_module,
                                 path=tmp_path / "lut.safetensors")


def test_direct_calibration_records_the_identity_of_generates_arguments(first_call):
    identity = dict(first_call.lut.identity)
    print(f"identity recorded by WanT2V.generate: {identity}")
    assert re.fullmatch("[0-9a-f]{12}", identity.pop("architecture"))
    assert identity == {"model": "WanModel", "dtype": "torch.float32", "dtype.weights": "torch.float32",
                        "scheduler": "unipc", "shift": 5.0,
                        "pixels": 64 * 64, "frame_num": 9, "guide_scale": 5.0}


@pytest.mark.parametrize("kw,said", [
    ({"shift": 8.0}, "shift: this run 8.0, the LUT 5.0"),
    ({"solver": "dpm++"}, "scheduler: this run 'dpm++', the LUT 'unipc'"),
    ({"steps": 10}, f"has {STEPS} steps, this run has 10"),
], ids=["shift", "solver", "steps"])
def test_first_call_refuses_before_the_model_runs(first_call, capfd, kw, said):
    capfd.readouterr()
    with pytest.raises(LUTMismatchError) as info:
        direct(first_call.pipe, **kw)
    assert said in str(info.value) and str(first_call.path) in str(info.value)
    assert first_call.calls == []  # refused before the model's first call
    assert summaries(capfd.readouterr().err) == []
    direct(first_call.pipe)  # the same pipeline with the LUT's settings runs and skips
    assert summaries(capfd.readouterr().err) == [(2 * BUDGET, CALLS, None)]
    assert len(first_call.calls) == CALLS - 2 * BUDGET


def test_first_call_refuses_another_architecture(first_call):
    """What ``--task t2v-14B`` changes when the launcher is not there to read ``--task``: the DiT's config."""
    torch.manual_seed(0)
    model = first_call.model_module.WanModel(dim=64, ffn_dim=128, freq_dim=32, text_dim=32, num_heads=4, num_layers=3,
                                             text_len=16, in_dim=4, out_dim=4)
    nn.init.xavier_uniform_(model.head.head.weight)
    model, calls = counted(model.eval().requires_grad_(False))
    with pytest.raises(LUTMismatchError, match=r"architecture: this run '[0-9a-f]{12}', the LUT '[0-9a-f]{12}'\.") \
            as info:
        direct(make_pipe(first_call.text2video, model))
    assert "dtype" not in str(info.value) and calls == []


def test_first_call_refuses_another_dtype_only(first_call):
    model, calls = counted(tiny_model(first_call.model_module).to(torch.bfloat16))
    with pytest.raises(LUTMismatchError) as info:
        direct(make_pipe(first_call.text2video, model))
    message = str(info.value)
    assert "dtype: this run 'torch.bfloat16', the LUT 'torch.float32'" in message
    assert "architecture" not in message and calls == []  # the fingerprint is the config's, not the weights'


def test_the_same_model_under_dit_fsdp_is_not_refused(first_call, gloo_group, capfd):
    """``--dit_fsdp`` (the checkout's ``shard_model``, 1-process gloo group) flattens the parameters:
    the identity comes from the model's config, so the LUT calibrated without FSDP still fits."""
    from wan.distributed.fsdp import shard_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sharded = shard_model(tiny_model(first_call.model_module), device_id=torch.device("cpu"),
                              param_dtype=torch.float32, sync_module_states=False)
    capfd.readouterr()
    direct(make_pipe(first_call.text2video, sharded))
    assert summaries(capfd.readouterr().err) == [(2 * BUDGET, CALLS, None)]
