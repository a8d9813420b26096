"""What a researcher following the README meets first (a review of 2026-11-27, each case failed before its fix)."""
import configparser
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from taohooks import TaoCache
from taohooks.cli import main
from taohooks.config import ConfigError, PlanConfig, TaoCacheConfig, load_config
from taohooks.runtime import messages
from taohooks.runtime.hook import DenoiserHook
from taohooks.runtime.loop import LoopSpec
from taohooks.taocache.calibration import CalibrationRecorder
from taohooks.taocache.error_model import sampler_weights
from test_calibration import calibrate
from trajectories import GeometricDenoiser
from prewarmed import run_python

ROOT = Path(__file__).resolve().parents[1]


def test_the_core_install_has_numpy_which_writing_a_lut_needs():
    """safetensors.torch.save goes through numpy, which torch does not install: auto-calibration then raised
    from inside the model call on a core install."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    core = [line.split(">")[0].split("=")[0].strip() for line in cfg["options"]["install_requires"].split("\n")]
    assert {"torch", "einops", "safetensors", "pyyaml", "numpy"} <= set(core)


@pytest.mark.parametrize("plan, key, message", [
    (PlanConfig(budget=1.0), "plan.budget", "1.0 is ambiguous"),
    (PlanConfig(budget=8, rule="Auto"), "plan.rule", "did you mean 'auto'"),
    (PlanConfig(budget=8, lambda_=math.nan), "plan.lambda", "finite"),
    ({"budget": 8}, "plan", "expected a PlanConfig, got dict"),
])
def test_a_config_made_in_python_is_checked_as_a_yaml_file_is(plan, key, message):
    """budget=1.0 ran one skip, rule='Auto' ran the paper rule, lambda_=nan raised IndexError at attach, and a
    dict for plan an AttributeError."""
    with pytest.raises(ConfigError, match=message) as exc:
        TaoCache(TaoCacheConfig(plan=plan))
    assert exc.value.key == key and "made in Python" in str(exc.value)
    TaoCache(TaoCacheConfig(plan=PlanConfig(budget=8)))  # a valid one is taken as it is


def test_python_configs_may_hold_numpy_numbers_ranges_and_tuples():
    """The check turned configs that ran before into errors: a window computed with numpy, steps from range."""
    import numpy as np

    for plan in (PlanConfig(skip_steps=range(6, 8), ratio=1.0), PlanConfig(window=list(np.array([6, 7])), ratio=1.0),
                 PlanConfig(window=(6, 7), ratio=np.float32(1.0)), PlanConfig(budget=np.int64(3))):
        TaoCache(TaoCacheConfig(plan=plan))
    with pytest.raises(ConfigError, match="plan.budget: 2.0 is ambiguous"):
        TaoCache(TaoCacheConfig(plan=PlanConfig(budget=np.float64(2.0))))
    from taohooks.taocache.plan import resolve_budget

    assert resolve_budget(np.int64(3), 20) == 3 and resolve_budget(np.float32(0.25), 20) == 5
    cache = TaoCache(TaoCacheConfig(lut=Path("luts") / "x.safetensors"))  # a Path: the path it names
    assert cache.config.lut == str(Path("luts") / "x.safetensors")


class PositionalTimestep(torch.nn.Module):
    def forward(self, x, t):  # (the testbed's VideoDiT takes its timestep positionally too)
        return x * 0.9 + 0.01 * t


def test_calibrating_a_model_whose_timestep_cannot_be_read_says_so(capsys):
    """The LUT recorded no timesteps without a word (the warning came only with repeat=True), and rule: auto then
    failed listing every step."""
    messages.forget()
    model, rec = PositionalTimestep(), CalibrationRecorder()
    with DenoiserHook(LoopSpec(6), [rec]).attach(model) as hook:
        for _ in range(2):
            hook.new_sample()
            x = torch.ones(2)
            for t in range(6):
                x = model(x, torch.tensor(float(t)))
                if t == 0 and _ == 0:  # said at the first call, not after a generation that can take minutes
                    first = capsys.readouterr().err
                    assert "cannot read the timestep" in first
    err = first + capsys.readouterr().err
    assert err.count("calibration: the hook cannot read the timestep") == 1 and "timestep_arg=" in err
    with pytest.raises(ValueError, match=r"the LUT records none \(.*timestep_arg= .*; or plan.error_weights: "
                                         r"uniform"):
        sampler_weights(rec.lut().timesteps, "flow")
    rec = CalibrationRecorder()  # timestep_arg=1 reads it: no warning, and the timesteps are recorded
    with DenoiserHook(LoopSpec(6), [rec], timestep_arg=1).attach(model) as hook:
        hook.new_sample()
        x = torch.ones(2)
        for t in range(6):
            x = model(x, torch.tensor(float(t)))
    assert "cannot read" not in capsys.readouterr().err and rec.lut().timesteps.tolist() == list(range(6))


def test_with_repeat_an_unreadable_timestep_is_advised_about_once(capsys):
    """With repeat=True the hook's warning and calibration's both said the whole story, advice included (twice
    "Give timestep_arg="); calibration now adds only what it means for the LUT."""
    messages.forget()
    model, rec = PositionalTimestep(), CalibrationRecorder()
    with DenoiserHook(LoopSpec(6), [rec], repeat=True).attach(model):
        x = torch.ones(2)
        for t in range(6):
            x = model(x, torch.tensor(float(t)))
    err = capsys.readouterr().err
    assert err.count("Give timestep_arg=") == 1 and "with repeat=True it cannot tell" in err
    assert "calibration: for the same reason (no timestep read), the LUT records none" in err


def test_a_step_count_mismatch_names_the_transfer_where_the_lut_can_be_carried():
    lut = calibrate(GeometricDenoiser({"main": 0.9}), 20, ("main",))
    with pytest.raises(Exception, match="calibration.transfer: interpolate") if lut.deltas is not None else \
            pytest.raises(Exception, match=r"this number of steps$"):
        lut.check(LoopSpec(16, ("main",)))


@pytest.fixture
def lut_path(tmp_path):
    lut = calibrate(GeometricDenoiser({"cond": 0.9, "uncond": 0.7}), 20, ("cond", "uncond"), model_id="geo")
    return lut.save(tmp_path / "geo.safetensors")


def test_check_prints_valid_only_when_every_check_passed(lut_path, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model_id: other\nlut: {lut_path.name}\nplan: {{budget: 3}}\n")
    assert main(["check", str(cfg)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "model_id: 'other', but the LUT" in err
    cfg.write_text("plan: {budget: 8}\n")  # passed check, then failed at the run
    assert main(["check", str(cfg)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "plan.budget: choosing the steps to skip from a budget needs a calibration LUT" in err
    cfg.write_text("loop: {steps: 20}\nplan: {budget: 0.02}\n")  # rounds to 0 skips: runs, as plan and attach say
    assert main(["check", str(cfg)]) == 0 and "valid" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["compare", "x.yaml", "sample.py", "--model", "flow"],
                                  ["calibrate", "x.yaml", "--prompts", "p.txt", "sample.py", "--model", "flow"],
                                  ["calibrate", "x.yaml", "generate.py", "--task", "t2v-1.3B"]])  # (no --prompts)
def test_a_script_given_without_double_dash_is_told_where_it_goes(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"the sample script and its own arguments go after --: taocache {argv[0]} " in err
    assert ("--prompts PROMPTS.txt -- sample.py" in err) == (argv[0] == "calibrate")


def test_a_script_without_arguments_still_needs_no_double_dash(tmp_path, capsys):
    """The script is a positional: ``taocache compare EXP.yaml sample.py`` ran before the hint and still does
    (here it stops at the missing experiment file, after parsing)."""
    assert main(["compare", str(tmp_path / "x.yaml"), "sample.py"]) == 1
    assert "config file does not exist" in capsys.readouterr().err


def test_show_given_a_config_points_at_check_and_plan(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("plan: {budget: 3}\n")
    assert main(["show", str(cfg)]) == 1
    assert "is a YAML file; taocache show reads a LUT" in capsys.readouterr().err


def test_an_unknown_verbosity_is_said_once(monkeypatch, capsys):
    monkeypatch.setenv(messages.ENV_VERBOSITY, "loud")
    messages.forget()
    assert messages.notice("a") and messages.notice("b")
    err = capsys.readouterr().err
    assert err.count("TAOHOOKS_VERBOSITY='loud' is not one of quiet, info, debug (quiet keeps only the warnings); "
                     "using info") == 1
    monkeypatch.setenv("RANK", "1")  # under torchrun only rank 0 speaks
    messages.forget()
    messages.verbosity()
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("text, hint", [
    ("loop: {steps: 50, streams: cond}\n", "write [cond] for a list of one"),
    ("plan: {budget: 16%}\n", "write the fraction 0.16 for 16%"),
    ("plan: {budget: 100%}\n", "a share of the steps is a fraction below 1.0 \\(0.16\\), a number of steps an integer"),
    ("plan: {window: 40, ratio: 1.0}\n", r"expected a list of an integer or null, got 40 \(int\)$"),
    ("plan:\n  rule: auto\nbudget: 8\n", "budget: unknown key; it is a key of plan: indent it under plan:"),
])
def test_yaml_type_mistakes_say_how_to_write_it(tmp_path, text, hint):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=hint if "\\" in hint or hint.endswith("$") else re.escape(hint)):
        load_config(cfg)


def test_a_python_config_is_checked_when_it_is_handed_over_not_at_the_first_generation():
    """enable_taocache and the Lightning callback keep the config; TaoCache is built at the first call, after the
    model and the data loaded."""
    from taohooks.integrations.diffusers import enable_taocache

    bad = TaoCacheConfig(plan=PlanConfig(budget=8, rule="Auto"))
    with pytest.raises(ConfigError, match="plan.rule"):
        enable_taocache(object(), bad)
    pytest.importorskip("lightning")
    from taohooks.lightning import TaoCacheCallback

    with pytest.raises(ConfigError, match="plan.rule"):
        TaoCacheCallback(bad)


def test_compare_refuses_taocache_among_the_scripts_arguments(capsys):
    """It was reported as '--taocache is given twice' under taocache-run's name, though typed once."""
    assert main(["compare", str(ROOT / "configs" / "compare" / "testbed.yaml"), "--",
                 str(ROOT / "examples" / "sample_testbed.py"), "--taocache", "x.yaml"]) == 1
    assert "remove --taocache from the script's arguments" in capsys.readouterr().err


def test_the_sampler_weights_name_the_lut_s_sampler_once():
    from types import SimpleNamespace

    from taohooks.taocache.error_plan import weight_scheme

    scheme, why = weight_scheme("auto", SimpleNamespace(identity={"scheduler": "unipc"}, sampler="unipc"))
    assert scheme == "flow" and why == "flow matching (the LUT's scheduler unipc)"
    # a class name and a label: each said as what it is ("unipcmultistepscheduler unipc": fresh-machine check)
    scheme, why = weight_scheme("auto", SimpleNamespace(identity={"scheduler": "UniPCMultistepScheduler"},
                                                        sampler="unipc"))
    assert why == "flow matching (the LUT's scheduler UniPCMultistepScheduler, calibration.sampler unipc)"
    scheme, why = weight_scheme("auto", SimpleNamespace(identity={"shift": 3.0}, sampler=None))
    assert scheme == "flow" and why == "flow matching (the LUT's flow shift)"


def test_the_generation_that_completes_the_lut_says_so(tmp_path, capsys):
    """A run per generation (Wan's generate.py) was told 'calibrating: N of 20' at each start, and nothing when the
    LUT became complete."""
    from trajectories import run_loop

    cfg = tmp_path / "c.yaml"
    cfg.write_text("lut: lut.safetensors\ncalibration: {prompts: 2}\nloop: {steps: 8}\n")
    model = GeometricDenoiser({"main": 0.9})
    for _ in range(2):  # two processes' worth: one generation each
        with TaoCache.from_yaml(cfg).attach(model):
            run_loop(model, 8)
    err = capsys.readouterr().err
    assert err.count("calibration complete with generation 1: the LUT ") == 1
    assert err.count("holds 2 prompts (calibration.prompts 2); it takes no more; attach TaoCache again to skip "
                     "with it") == 1  # (from Python: this attach's plan stays; the launcher's next generation skips)
    assert "holds 1 prompt" not in err


def test_plot_and_merge_given_a_config_say_so_as_show_does(tmp_path, capsys):
    """They showed the LUT parser's error on the YAML text (walkthrough, 2026-11-27)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("plan: {budget: 3}\n")
    assert main(["plot", str(cfg), "-o", str(tmp_path / "p.png")]) == 1
    assert "is a YAML file; taocache plot reads a LUT" in capsys.readouterr().err
    assert main(["merge", str(cfg), str(cfg), "-o", str(tmp_path / "m.safetensors")]) == 1
    assert "is a YAML file; taocache merge reads a LUT" in capsys.readouterr().err


def test_latte_precheck_honours_accept_and_explains_an_unfinished_lut(tmp_path):
    """Latte / Open-Sora-Plan's pre-check refused 21 steps against a 12-step LUT even with calibration.accept:
    [sampling_steps] (which the first-call check then accepted, and recommended); with calibration.transfer already
    set, an unfinished LUT was refused advising to set it (walkthrough, 2026-11-27)."""
    from taohooks.integrations.latte import check_sampler
    from taohooks.launcher.integration import IntegrationError

    lut = calibrate(GeometricDenoiser({"uncond": 0.9, "cond": 0.8}), 10, ("uncond", "cond"))
    lut.identity = {"scheduler": "DDIMScheduler", "sampling_steps": 10}
    lut.save(tmp_path / "lut.safetensors")  # 2 prompts
    base = "integration: latte\nlut: lut.safetensors\ncalibration: {prompts: %d%s}\n"
    (tmp_path / "c.yaml").write_text(base % (2, ", accept: [sampling_steps]"))
    check_sampler(load_config(tmp_path / "c.yaml"), "DDIM", 12, "t2v.yaml")  # accepted knowingly: no error
    (tmp_path / "c.yaml").write_text(base % (2, ""))
    with pytest.raises(IntegrationError, match=r"12 sampling steps \(t2v.yaml\), the LUT was calibrated with 10 "
                                               r"\(or carry it over with calibration.transfer: interpolate\)"):
        check_sampler(load_config(tmp_path / "c.yaml"), "DDIM", 12, "t2v.yaml")
    (tmp_path / "c.yaml").write_text(base % (4, ", transfer: interpolate"))
    with pytest.raises(IntegrationError) as info:
        check_sampler(load_config(tmp_path / "c.yaml"), "DDIM", 12, "t2v.yaml")
    assert "holds 2 of 4 prompts (calibration.prompts) at 10 steps, t2v.yaml runs 12: calibration.transfer " \
           "carries complete LUTs over" in str(info.value) and "or carry it over" not in str(info.value)


def test_a_message_during_a_progress_bar_starts_its_own_line(capsys):
    """A message printed inside a pipeline's denoising loop (calibration's completion, at its last call) was written
    after the tqdm bar on the same line (walkthrough, 2026-11-27)."""
    import re as _re

    from tqdm import tqdm

    messages.forget()
    bar = tqdm(total=10, file=sys.stderr, mininterval=0)
    bar.update(3)
    messages.notice("calibration complete with generation 1")
    bar.update(7)
    bar.close()
    err = capsys.readouterr().err
    assert _re.search(r"\r *\r?taohooks: calibration complete with generation 1\n", err), repr(err)


def test_latte_precheck_reads_guidance_and_the_new_luts_sampler_label(tmp_path):
    """Guidance 1 against a guided LUT was found only after the model loaded, without the value or where it came
    from; a new LUT was labelled calibration.sampler: ddim while the script ran EulerDiscrete (walkthrough)."""
    from taohooks.integrations.latte import check_sampler
    from taohooks.launcher.integration import IntegrationError

    lut = calibrate(GeometricDenoiser({"uncond": 0.9, "cond": 0.8}), 10, ("uncond", "cond"))
    lut.identity = {"scheduler": "DDIMScheduler", "sampling_steps": 10}
    lut.save(tmp_path / "lut.safetensors")
    (tmp_path / "c.yaml").write_text("integration: latte\nlut: lut.safetensors\ncalibration: {prompts: 2, "
                                     "sampler: ddim}\n")
    config = load_config(tmp_path / "c.yaml")
    check_sampler(config, "DDIM", 10, "t2v.yaml", guidance=7.5)
    with pytest.raises(IntegrationError, match=r"guidance_scale 1 \(t2v.yaml\) makes one call per step \(no "
                                               r"classifier-free guidance\), the LUT was calibrated with guidance"):
        check_sampler(config, "DDIM", 10, "t2v.yaml", guidance=1.0)
    (tmp_path / "c.yaml").write_text("integration: latte\nlut: new.safetensors\ncalibration: {sampler: ddim}\n")
    check_sampler(load_config(tmp_path / "c.yaml"), "ddim", 10, "t2v.yaml")  # the same sampler, any case
    with pytest.raises(IntegrationError, match=r"calibration.sampler is 'ddim' \(.*c.yaml\), t2v.yaml runs "
                                               r"sample_method EulerDiscrete: .*set calibration.sampler: "
                                               r"eulerdiscrete"):
        check_sampler(load_config(tmp_path / "c.yaml"), "EulerDiscrete", 10, "t2v.yaml")


def test_a_lut_whose_calls_repeat_timesteps_is_not_carried_to_another_count():
    """PNDM's warm-up (Open-Sora-Plan's default) repeats timesteps; carried by interpolation, its timesteps were up
    to 160 off the run's, without a word (walkthrough, 2026-11-27)."""
    from taohooks.taocache.lut import LUTMismatchError
    from taohooks.taocache.lut_transfer import transfer_lut

    lut = calibrate(GeometricDenoiser({"main": 0.9}), 12, ("main",))
    lut.timesteps = torch.tensor([999., 999., 950., 950., 900., 900., 850., 800., 700., 600., 400., 200.])
    with pytest.raises(LUTMismatchError, match="its calls repeat timesteps \\(PNDM's warm-up"):
        transfer_lut(lut, 20)
    # ... so a run of another count is not told to carry it over (it was, then refused: transfer walkthrough)
    from taohooks.runtime.loop import LoopSpec

    with pytest.raises(LUTMismatchError) as info:
        lut.check(LoopSpec(20, ("main",)))
    assert "calibrate again for this number of steps" in str(info.value) and "transfer" not in str(info.value)
    lut.timesteps = torch.linspace(999, 0, 12)
    assert transfer_lut(lut, 20).steps == 20
    with pytest.raises(LUTMismatchError, match=r"\(or carry the LUT over with calibration.transfer: interpolate\)"):
        lut.check(LoopSpec(20, ("main",)))


def test_a_calibrating_run_says_after_each_generation_how_many_prompts_the_lut_holds(tmp_path):
    """A run that ended before the LUT was complete said how many prompts it held only in its first line
    (walkthrough, 2026-11-27)."""
    root = Path(__file__).resolve().parent.parent
    (tmp_path / "c.yaml").write_text("integration: testbed\nlut: lut.safetensors\ncalibration: {prompts: 3}\n"
                                     "plan: {budget: 2}\n")
    res = run_python(["-m", "taohooks.run", str(root / "examples" / "sample_testbed.py"),
                      "--steps", "6", "--prompt", "a red circle moving left", "--out", str(tmp_path / "s.png"),
                      "--taocache", str(tmp_path / "c.yaml")], timeout=300,
                     env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert "taohooks: generation 1: 0 of 12 denoiser calls saved (0.0%); the LUT holds 1 of 3 prompts [calibrating, " \
           "all steps computed]" in res.stderr, res.stderr


def test_a_relative_configs_path_from_the_research_repos_folder_names_taohooks_own(tmp_path, monkeypatch):
    """Run from the Latte checkout with the README's `--taocache configs/latte.yaml`: 'config file does not exist',
    no hint that configs/ is taohooks' folder (walkthrough, 2026-11-27)."""
    monkeypatch.chdir(tmp_path)
    ours = Path(__file__).resolve().parent.parent / "configs" / "latte.yaml"
    with pytest.raises(ConfigError, match=f"config file does not exist in {re.escape(str(tmp_path))}; taohooks' own "
                                          f"is {re.escape(str(ours))}"):
        load_config("configs/latte.yaml")


def test_an_unfinished_pndm_lut_is_not_advised_to_be_carried(tmp_path):
    """With transfer set, an unfinished LUT was advised 'set calibration.prompts: N to carry it over as it is', which
    a PNDM LUT (repeated timesteps) cannot be (review, 2026-11-27)."""
    from taohooks.integrations.latte import check_sampler
    from taohooks.launcher.integration import IntegrationError

    lut = calibrate(GeometricDenoiser({"uncond": 0.9, "cond": 0.8}), 12, ("uncond", "cond"))
    lut.timesteps = torch.tensor([999., 999., 950., 950., 900., 900., 850., 800., 700., 600., 400., 200.])
    lut.identity = {"scheduler": "PNDMScheduler", "sampling_steps": 3}
    lut.save(tmp_path / "lut.safetensors")
    (tmp_path / "c.yaml").write_text("integration: opensora_plan\nlut: lut.safetensors\n"
                                     "calibration: {prompts: 4, transfer: interpolate}\n")
    with pytest.raises(IntegrationError) as info:
        check_sampler(load_config(tmp_path / "c.yaml"), "PNDM", 5, "the command line")
    assert "carry it over as it is" not in str(info.value)
    assert "its calls repeat timesteps, PNDM's warm-up: it cannot be carried to another count" in str(info.value)


def test_a_script_that_changes_its_folder_after_loading_the_config_keeps_its_lut(tmp_path, monkeypatch):
    """TaoCache.from_yaml kept the config's relative LUT path as it was; after an os.chdir, attach found no LUT, and
    calibrated a new one (and its folders) under the new working directory (Python API walkthrough, 2026-11-27)."""
    (tmp_path / "cfg").mkdir()
    (tmp_path / "luts").mkdir()
    lut = calibrate(GeometricDenoiser({"main": 0.9}), 8, ("main",))
    lut.save(tmp_path / "luts" / "x.safetensors")
    (tmp_path / "cfg" / "c.yaml").write_text("lut: ../luts/x.safetensors\ncalibration: {prompts: 2}\n"
                                             "plan: {budget: 2}\nloop: {steps: 8}\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    cache = TaoCache.from_yaml("cfg/c.yaml")
    from taohooks.config import CalibrationConfig

    two = CalibrationConfig(prompts=2)
    python_made = TaoCache(TaoCacheConfig(lut="luts/x.safetensors", plan=PlanConfig(budget=2), calibration=two))
    given = TaoCache(TaoCacheConfig(plan=PlanConfig(budget=2), calibration=two), lut="luts/x.safetensors")
    monkeypatch.chdir(tmp_path / "elsewhere")
    model = GeometricDenoiser({"main": 0.9})
    for c in (cache, python_made, given):
        with c.attach(model, 8):
            pass
        assert not c.calibrating and c.lut.num_prompts == 2
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_in_one_attach_a_completed_calibration_takes_no_more_prompts(tmp_path, capsys):
    """In one attach from Python, generations after the LUT was complete kept computing (said: 'the generations after
    it skip') and kept adding prompts past calibration.prompts (4 became 6) (Python API walkthrough, 2026-11-27)."""
    from trajectories import run_loop

    cfg = tmp_path / "c.yaml"
    cfg.write_text("lut: lut.safetensors\ncalibration: {prompts: 2}\nloop: {steps: 8}\n")
    model = GeometricDenoiser({"main": 0.9})
    cache = TaoCache.from_yaml(cfg)
    with cache.attach(model):
        for _ in range(4):
            cache.new_sample()
            run_loop(model, 8)
    from taohooks.taocache.lut import CalibrationLUT

    assert CalibrationLUT.load(tmp_path / "lut.safetensors").num_prompts == 2
    assert "attach TaoCache again to skip with it" in capsys.readouterr().err
    with cache.attach(model):  # the next attach skips
        assert not cache.calibrating


def test_a_generation_found_to_begin_mid_window_is_not_predicted_from_the_one_before(capsys):
    """repeat=False, a loop shorter than declared and no new_sample(): TaoCache saw the second loop begin at a skip
    step and computed that call, then predicted the next ones from a delta across the two loops (Python API
    walkthrough, 2026-11-27)."""
    from taohooks import Callback
    from taohooks.config import CalibrationConfig
    from taohooks.testbed.model import VideoDiT
    from taohooks.testbed.sampling import sample_flow

    root = Path(__file__).resolve().parent.parent
    model = VideoDiT.from_pretrained(root / "taohooks" / "testbed" / "weights" / "flow.safetensors")
    cache = TaoCache(TaoCacheConfig(lut=str(root / "docs/results/full/flow/lut_flow.safetensors"),
                                    calibration=CalibrationConfig(prompts=20), plan=PlanConfig(budget=8)))
    computed = []

    class Spy(Callback):
        def on_after_call(self, hook, call, output):
            if call.streams == ("cond",):
                computed.append((call.step, call.computed))

    with pytest.raises(RuntimeError, match="made more calls than declared"):
        with cache.attach(model, steps=50, streams=("cond", "uncond"), timestep_arg=1, callbacks=[Spy()]):
            assert cache.plan.window == (40, 47)
            sample_flow(model, ["a red circle moving left"], [5], steps=40)
            sample_flow(model, ["a red circle moving left"], [5], steps=40)
    assert [c for s, c in computed if 40 <= s <= 47] == [True] * 8  # the second loop's first 8 calls: all computed


def test_a_single_generation_shorter_than_declared_is_said_at_detach(capsys):
    """Declared 8 steps, the loop ran 6: nothing was said (the 8-step LUT's ratios served a 6-step loop), while
    new_sample() warns in the same case; an exception leaving the loop adds no such warning (walkthrough)."""
    from trajectories import run_loop

    messages.forget()
    model = GeometricDenoiser({"main": 0.9})
    with DenoiserHook(LoopSpec(8), []).attach(model) as hook:
        hook.new_sample()
        run_loop(model, 6)
    assert "the hook was detached after 6 of 8 calls of generation 1 (8 steps x 1 call(s) (main)); is the declared " \
           "number of steps right?" in capsys.readouterr().err
    with pytest.raises(ValueError):
        with DenoiserHook(LoopSpec(8), []).attach(model) as hook:
            hook.new_sample()
            run_loop(model, 3)
            raise ValueError("the sampler failed")
    assert "detached after" not in capsys.readouterr().err


def test_summary_says_what_composed_caches_saved_inside_the_computed_calls():
    """summary() counted the calls whose block stack TeaCache or MagCache bypassed as 'computed' without a word (the
    launcher's summary line names them) (Python API walkthrough, 2026-11-27)."""
    from taohooks import Callback

    class Residual(Callback):  # a TeaCache-like callback: a threshold, and the calls it reused
        threshold, reused = 0.1, 3.0

    class Broadcasting(Callback):
        broadcasts = 5

    cache = TaoCache(TaoCacheConfig(plan=PlanConfig(budget=0)))
    model = GeometricDenoiser({"main": 0.9})
    with cache.attach(model, 8, callbacks=[Residual(), Broadcasting()]):
        pass
    text = cache.summary()
    assert "TeaCache reused the block residual on 3 calls" in text
    assert "PAB broadcast 5 attention calls" in text


def test_attach_arguments_that_contradict_the_configs_loop_are_said(capsys):
    """attach(steps=50) with loop.steps 40, or other streams, ran as the arguments said without a word (Python API
    walkthrough, 2026-11-27)."""
    from taohooks.config import LoopConfig

    messages.forget()
    cache = TaoCache(TaoCacheConfig(loop=LoopConfig(steps=8, streams=["uncond", "cond"]), plan=PlanConfig(budget=0)))
    with cache.attach(GeometricDenoiser({"cond": 0.9, "uncond": 0.8}), 6, ("cond", "uncond")):
        pass
    err = capsys.readouterr().err
    assert "attach(steps=6) overrides the config's loop.steps 8" in err
    assert "attach(streams=('cond', 'uncond')) overrides the config's loop.streams ('uncond', 'cond')" in err
    with cache.attach(GeometricDenoiser({"uncond": 0.9, "cond": 0.8})):  # the config's own loop: no word
        pass
    assert "overrides" not in capsys.readouterr().err


def test_a_manual_window_ending_on_a_refresh_is_said(capsys):
    """window [30, 37] with refresh_every 3 ends on a computed step, described as the window's end, without a word
    (Python API walkthrough, 2026-11-27)."""
    from taohooks.taocache.plan import plan_from_window

    messages.forget()
    plan = plan_from_window(50, ["main"], 30, 37, 1.0, 3)
    assert plan.skipped_steps == (30, 31, 32, 34, 35, 36)
    assert "window [30, 37] with refresh_every 3 ends on a refresh (step 37 is computed, 6 skips): end it at 36, " \
           "or at 38 for 7 skips" in capsys.readouterr().err
    plan_from_window(50, ["main"], 30, 38, 1.0, 3)
    assert capsys.readouterr().err == ""


def test_a_skipping_run_whose_timestep_cannot_be_read_is_told(tmp_path, capsys):
    """Calibration and repeat=True warned that the timestep could not be read; a skipping run, whose timesteps are
    what the LUT check compares, said nothing (Python API walkthrough, 2026-11-27)."""

    model = PositionalTimestep()
    rec = CalibrationRecorder()
    with DenoiserHook(LoopSpec(8), [rec], timestep_arg=1).attach(model) as hook:
        for _ in range(2):
            hook.new_sample()
            x = torch.ones(2)
            for t in range(8):
                x = model(x, torch.tensor(float(t)))
    rec.save(tmp_path / "lut.safetensors")
    messages.forget()
    from taohooks.config import CalibrationConfig

    cache = TaoCache(TaoCacheConfig(lut=str(tmp_path / "lut.safetensors"), calibration=CalibrationConfig(prompts=4),
                                    plan=PlanConfig(window=[5, 6])))
    with cache.attach(model, 8):  # no timestep_arg: the positional timestep is not read
        x = torch.ones(2)
        for t in range(8):
            x = model(x, torch.tensor(float(t)))
    assert "so this run's timesteps cannot be checked against the LUT's" in capsys.readouterr().err
