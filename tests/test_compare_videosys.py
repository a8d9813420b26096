"""``taocache compare`` on a user's VideoSys script (``integration: videosys``): ``VideoSysEngine`` with one GPU,
Latte and Open-Sora-Plan v1.1, on the fake ``videosys`` of ``fixtures/videosys_like`` (VideoSys' PAB contract, tiny
random weights, a "VAE" that decodes to uint8 frames), in one fresh process; and the target's parts alone."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")  # (the fake pipelines use diffusers' DDIM / PNDM schedulers, as VideoSys does)

from taohooks.compare import load_experiment  # noqa: E402
from taohooks.compare.store import RunStore  # noqa: E402
from taohooks.compare.targets import _pipeline_video, _videosys_pab_off  # noqa: E402
from compare_folders import reference, results  # noqa: E402
from prewarmed import run_python  # noqa: E402

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "videosys_like"
SCRIPT = FIXTURE / "sample_videosys.py"
PROMPT, SEED = "a red car on the street", 3
EXPERIMENT = """\
integration: videosys
model_id: tiny-{name}
prompts:
  - {{prompt: "{prompt}", seed: {seed}}}
calibration_prompts: ["a green boat on the river", "a cat running on the beach"]
search_prompts: 1
search_iterations: 4
methods: {methods}
budgets: [0.2]
output: out_{name}
lpips: false
"""
DRIVER = """\
import json, runpy, sys
from taohooks import cli
codes = {{}}

def as_a_fresh_process():  # (VideoSys' PAB manager is global: a script that enables it leaves it to the next)
    module = sys.modules.get("videosys.core.pab.pab_mgr")
    if module is not None:
        module.PAB_MANAGER = None

for name, argv in {plain!r}:
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")
    as_a_fresh_process()
for name, exp, script in {compares!r}:
    sys.argv = ["taocache"]
    codes[name] = cli.main(["compare", exp, "--", *script])
    as_a_fresh_process()
json.dump(codes, open("codes.json", "w"))
"""
SAID_PAB_OFF = "compare: VideoSys' own PAB (enable_pab=True) is off in every compared run"


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """The experiments below through ``sample_videosys.py`` after the script's own runs of the prompt (with and
    without VideoSys' PAB): ``(folder, stderr, exit codes)``."""
    tmp = tmp_path_factory.mktemp("compare_videosys")
    script = [str(SCRIPT), "--steps", "10"]
    one = ["--prompt", PROMPT, "--seed", str(SEED)]
    plain = [("latte", [*script, *one, "--out", "plain_latte.pt"]),
             ("latte_pab", [*script, *one, "--pab", "--out", "plain_latte_pab.pt"]),
             ("osp", [*script, *one, "--model", "open_sora_plan", "--out", "plain_osp.pt"]),
             ("generator", [*script, *one, "--generator", str(SEED), "--out", "plain_generator.pt"])]
    experiments = {
        "latte": ("[full, taocache, teacache, pab, videosys-pab]", [*script, "--pab"]),
        "own_pab_off": ("[full, videosys-pab]", script),
        "osp": ("[full, taocache, teacache]", [*script, "--model", "open_sora_plan"]),
        "gpus": ("[full, taocache]", [*script, "--num-gpus", "2"]),
        "generator": ("[full, taocache]", [*script, "--generator", "7"]),
    }
    compares = []
    for name, (methods, argv) in experiments.items():
        (tmp / f"{name}.yaml").write_text(EXPERIMENT.format(name=name, prompt=PROMPT, seed=SEED, methods=methods))
        compares.append((name, f"{name}.yaml", argv))
    (tmp / "d.py").write_text(DRIVER.format(plain=plain, compares=compares))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TAOHOOKS_", "VIDEOSYS_LIKE_"))}
    res = run_python(["d.py"], cwd=tmp, timeout=300, env={**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(FIXTURE)})
    assert res.returncode == 0, res.stderr
    return tmp, res.stderr, json.loads((tmp / "codes.json").read_text())


def video(path: Path) -> torch.Tensor:
    """A plain run's returned frames (uint8 ``[B, F, H, W, C]``) as compare reads them."""
    frames = torch.load(path)
    assert frames.dtype == torch.uint8 and frames.dim() == 5
    return _pipeline_video(type("Output", (), {"video": frames})())


def test_the_reference_is_the_script_s_video_with_videosys_pab_off(compared):
    """The prompt and seed replaced (``seed=``, which VideoSys' generate seeds its RNG with), the uint8 frames read:
    bit-equal to the script's own video without PAB; the script's PAB (on here) is off in every compared run, and
    said so once."""
    folder, err, codes = compared
    assert codes["latte"] == codes["osp"] == 0
    ref = reference(folder, "latte")
    assert ref.shape == (1, 3, 3, 4, 4)
    assert torch.equal(ref, video(folder / "plain_latte.pt"))
    assert not torch.equal(ref, video(folder / "plain_latte_pab.pt"))  # (PAB changes this script's video)
    assert torch.equal(reference(folder, "osp"), video(folder / "plain_osp.pt"))
    assert err.count(SAID_PAB_OFF) == 1  # (the latte experiment's script enables PAB; the osp one does not)


def test_videosys_pab_is_the_script_s_own_pab_and_needs_it_enabled(compared):
    """``videosys-pab``: VideoSys' own PAB as the script configures it (compare's ``pab`` is taohooks' PAB with
    VideoSys' ranges, which differs: walkthrough, 2026-11-28): bit-equal to the script's own video with PAB on;
    refused at the first call where the script did not enable it."""
    folder, err, codes = compared
    entry = load_experiment(folder / "latte.yaml").evaluation_prompts()[0]
    own = RunStore(folder / "out_latte").load("videosys-pab@0of10", entry)[0]
    assert torch.equal(own, video(folder / "plain_latte_pab.pt"))
    assert not torch.equal(own, RunStore(folder / "out_latte").load("pab@0of10", entry)[0])
    rows = {row["method"]: row for row in results(folder, "latte")["aggregates"]}
    assert rows["videosys-pab"]["skipped_fraction"] == 0 and rows["videosys-pab"]["psnr"] < 100
    assert codes["own_pab_off"] == 2 and "methods: videosys-pab is VideoSys' own PAB as the script configures it, " \
        "but the script's config has no enable_pab=True" in err


def test_a_generator_the_script_passes_is_replaced_by_one_seeded_with_the_run_s_seed(compared):
    """VideoSys draws the latents from generator= whatever its seed=: the script's one generator was carried from run
    to run, and every run of a prompt started from other noise (about 14 dB everywhere; walkthrough, 2026-11-28)."""
    folder, _, codes = compared
    assert codes["generator"] == 0
    assert torch.equal(reference(folder, "generator"), video(folder / "plain_generator.pt"))
    rows = {row["method"]: row for row in results(folder, "generator")["aggregates"]}
    assert rows["taocache"]["psnr"] > 40


def test_every_method_runs_with_the_authors_teacache_of_each_transformer(compared):
    folder, _, _ = compared
    for name, model in (("latte", "Latte-1"), ("osp", "Open-Sora-Plan v1.1")):
        out = results(folder, name)
        rows = {row["method"]: row for row in out["aggregates"]}
        assert out["meta"]["teacache_proxy"].startswith(f"the authors' TeaCache for {model} (in VideoSys' ")
        steps = int(out["meta"]["loop"].split()[0])  # (Open-Sora-Plan's PNDM: 10 steps are 19 calls, 19 "steps")
        assert steps == {"latte": 10, "osp": 19}[name]
        assert rows["taocache"]["skips"] == round(0.2 * steps) == round(rows["taocache"]["skipped_fraction"] * steps)
        assert rows["teacache"]["skipped_fraction"] > 0
        assert rows["taocache"]["latent_rel_l2"] is not None  # (the latents recorded at decode_latents)
    pab = {row["method"]: row for row in results(folder, "latte")["aggregates"]}["pab"]
    assert pab["skipped_fraction"] == 0 and pab["psnr"] < 100  # (attention broadcast inside every call)


def test_several_gpus_are_refused_at_the_first_call(compared):
    folder, err, codes = compared
    assert codes["gpus"] == 1
    assert "VideoSys runs this LattePipeline on 2 GPUs" in err and "compare with num_gpus=1" in err
    assert not (folder / "out_gpus" / "runs").exists()


class _Module:
    PAB_MANAGER = None


def test_videosys_pab_is_off_inside_and_put_back_after(monkeypatch):
    """Only modules holding a manager are touched; each gets its own back, also after an error."""
    held, other = _Module(), _Module()
    manager = object()
    held.PAB_MANAGER = manager
    monkeypatch.setitem(sys.modules, "videosys.core.pab.pab_mgr", held)
    monkeypatch.setitem(sys.modules, "videosys.core.pab_mgr", other)
    with pytest.raises(RuntimeError):
        with _videosys_pab_off({}):
            assert held.PAB_MANAGER is None and other.PAB_MANAGER is None
            raise RuntimeError("the generation failed")
    assert held.PAB_MANAGER is manager and other.PAB_MANAGER is None


@pytest.mark.parametrize("integration", ["videosys", "latte", "opensora_plan"])
def test_easycache_is_refused_on_latte_shaped_learned_sigma_transformers(integration):
    """EasyCache reuses output - input: on an output with a variance half it computed every call, and compare
    searched thresholds for rows of 0% skipped (walkthrough, 2026-11-28)."""
    from taohooks.compare.experiment import ExperimentConfig
    from taohooks.compare.runner import check_methods
    from taohooks.compare.targets import TARGETS, _videosys_target
    from taohooks.config import ConfigError

    target = TARGETS[integration]
    if integration == "videosys":
        pipe = type("LattePipeline", (), {})()
        pipe.transformer = type("LatteT2V", (torch.nn.Module,), {"__module__": "videosys.models.transformers."
                                                                              "latte_transformer_3d"})()
        target = _videosys_target({"self": pipe})
    config = ExperimentConfig(integration=integration, prompts=["a cat"], methods=["full", "taocache", "easycache"])
    with pytest.raises(ConfigError, match="methods: easycache is not available for here: the transformer's output has "
                                          "a variance half"):
        check_methods(config, target, "here")
    check_methods(ExperimentConfig(integration=integration, prompts=["a cat"], methods=["full", "taocache"]), target,
                  "here")


def test_videosys_pab_is_refused_where_there_is_no_videosys_pab():
    from taohooks.compare.experiment import ExperimentConfig
    from taohooks.compare.runner import check_methods
    from taohooks.compare.targets import TARGETS
    from taohooks.config import ConfigError

    config = ExperimentConfig(integration="latte", prompts=["a cat"], methods=["full", "videosys-pab"])
    with pytest.raises(ConfigError, match="methods: videosys-pab is VideoSys' own PAB: not available for here"):
        check_methods(config, TARGETS["latte"], "here")
