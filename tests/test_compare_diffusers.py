"""``taocache compare`` on a user's own diffusers script (``integration: diffusers``): WanPipeline (one and two
experts) and LattePipeline, the real diffusers classes with tiny random weights
(``fixtures/diffusers_like/sample_diffusers.py``), in one fresh process; and the target's parts alone."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
if not hasattr(diffusers, "WanPipeline"):  # (diffusers 0.33+; the extras allow 0.30)
    pytest.skip(f"diffusers {diffusers.__version__} has no WanPipeline", allow_module_level=True)

from taohooks.compare.experiment import ExperimentConfig  # noqa: E402
from taohooks.compare.runner import check_methods  # noqa: E402
from taohooks.compare.targets import TARGETS, _diffusers_video  # noqa: E402
from taohooks.config import ConfigError  # noqa: E402
from compare_folders import reference, results  # noqa: E402
from prewarmed import run_python  # noqa: E402

SCRIPT = Path(__file__).resolve().parent / "fixtures" / "diffusers_like" / "sample_diffusers.py"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "diffusers_wan.py"
# diffusers loads WanTransformer3DModel (which keeps modules in float32) only with accelerate
HAS_ACCELERATE = __import__("importlib.util").util.find_spec("accelerate") is not None
EXAMPLE_ARGS = [str(EXAMPLE), "--model", "tinywan", "--height", "16", "--width", "16", "--frames", "5", "--steps", "8",
                "--dtype", "float32", "--device", "cpu"]
PROMPT, SEED = "a red car on the street", 3
EXPERIMENT = """\
integration: diffusers
model_id: {model}
prompts:
  - {{prompt: "{prompt}", seed: {seed}}}
  - {{prompt: "a blue bird flying in the sky", seed: 1}}
calibration_prompts: ["a green boat on the river", "a cat running on the beach"]
search_prompts: 1
methods: {methods}
budgets: [{budget}]
output: {output}
lpips: false
"""
DRIVER = """\
import json, runpy, sys
from taohooks import cli
codes = {{}}
if {example!r}:  # the tiny Wan pipeline as a folder from_pretrained reads (the example script loads one)
    sys.path.insert(0, {fixtures!r})
    import sample_diffusers
    sample_diffusers.wan_pipe().save_pretrained("tinywan")
for name, argv in {plain!r}:
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")
for name, exp, script in {compares!r}:
    sys.argv = ["taocache"]
    codes[name] = cli.main(["compare", exp, "--", *script])
json.dump(codes, open("codes.json", "w"))
"""


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """Every experiment below through ``sample_diffusers.py``, after the script's own plain runs of the first
    prompt: ``(folder, stderr, exit codes)``."""
    tmp = tmp_path_factory.mktemp("compare_diffusers")
    script = [str(SCRIPT), "--steps", "8"]
    plain = [("wan", [*script, "--prompt", PROMPT, "--seed", str(SEED), "--out", "plain_wan.pt"]),
             ("wan_pt", [*script, "--prompt", PROMPT, "--seed", str(SEED), "--generator", "--output-type", "pt",
                         "--out", "plain_wan_pt.pt"]),
             ("latte", [*script, "--pipeline", "latte", "--prompt", PROMPT, "--seed", str(SEED),
                        "--out", "plain_latte.pt"]),
             ("preview", [*script, "--preview-at", "2", "--prompt", PROMPT, "--seed", str(SEED),
                          "--out", "plain_preview.pt"])]
    experiments = {
        "wan": ("[full, taocache, teacache, magcache, taoskip+tearesidual, pab]", 0.25, script),
        "wan_pt": ("[full]", 0.25, [*script, "--generator", "--output-type", "pt"]),
        "latte": ("[full, teacache, taoskip+tearesidual]", 0.25, [*script, "--pipeline", "latte"]),
        "wan22": ("[full, taocache, teacache]", 0.1, [str(SCRIPT), "--steps", "10", "--pipeline", "wan22"]),
        "embeds": ("[full, taocache]", 0.25, [*script, "--embeds"]),
        "listed": ("[full, taocache]", 0.25, [*script, "--prompt-list"]),
        "compiled": ("[full, teacache, pab]", 0.25, [*script, "--compile", "--subclass"]),
        "stopped": ("[full, taocache]", 0.25, [*script, "--stop-at", "5"]),
        "preview": ("[full, taocache]", 0.25, [*script, "--preview-at", "2"]),
        "preview_last": ("[full, taocache]", 0.25, [*script, "--preview-at", "7"]),
        "preview_other": ("[full, taocache]", 0.25, [*script, "--preview-at", "7", "--preview-own-model"]),
        "latent": ("[full, taocache]", 0.25, [*script, "--output-type", "latent"]),
        "declared": ("[full, taocache]", 0.25, [*script, "--declare", "cond"]),
    }
    if HAS_ACCELERATE:
        plain.append(("example", [*EXAMPLE_ARGS, "--prompt", PROMPT, "--seed", str(SEED), "--out", "plain_example.pt"]))
        experiments["example"] = ("[full, taocache]", 0.25, [*EXAMPLE_ARGS, "--out", "never.pt"])
    compares = []
    for name, (methods, budget, argv) in experiments.items():
        (tmp / f"{name}.yaml").write_text(EXPERIMENT.format(model=f"tiny-{name}", prompt=PROMPT, seed=SEED,
                                                            methods=methods, budget=budget, output=f"out_{name}"))
        compares.append((name, f"{name}.yaml", argv))
    compares.append(("stopped_then_whole", "stopped.yaml", script))  # the script corrected, the same folder
    compares.sort(key=lambda c: c[0] == "declared")  # (last: it changes the process)
    (tmp / "d.py").write_text(DRIVER.format(plain=plain, compares=compares, example=HAS_ACCELERATE,
                                            fixtures=str(SCRIPT.parent)))
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("TAOHOOKS_")}
    res = run_python(["d.py"], cwd=tmp, env={**env, "OMP_NUM_THREADS": "1"}, timeout=400)
    assert res.returncode == 0, res.stderr
    return tmp, res.stderr, json.loads((tmp / "codes.json").read_text())


def test_the_reference_is_the_video_the_script_makes_for_that_prompt_and_seed(compared):
    """The prompt replaced, torch's RNG seeded (or the script's generator replaced by one seeded alike), the
    frames read in the call's output type: np (Wan's default), pt, PIL (Latte's default)."""
    folder, _, codes = compared
    assert codes["wan"] == codes["wan_pt"] == codes["latte"] == 0
    wan = torch.load(folder / "plain_wan.pt")  # [B, F, H, W, C] in [0, 1]
    assert torch.equal(reference(folder, "wan"), wan.permute(0, 4, 1, 2, 3) * 2 - 1)
    wan_pt = torch.load(folder / "plain_wan_pt.pt")  # [B, F, C, H, W] in [0, 1]
    assert torch.equal(reference(folder, "wan_pt"), wan_pt.permute(0, 2, 1, 3, 4) * 2 - 1)
    assert torch.allclose(wan_pt.permute(0, 2, 1, 3, 4), wan.permute(0, 4, 1, 2, 3))  # (the same video)
    latte = torch.load(folder / "plain_latte.pt")  # uint8 [B, F, H, W, C]
    assert latte.dtype == torch.uint8
    assert torch.equal(reference(folder, "latte"), latte.permute(0, 4, 1, 2, 3).float() / 127.5 - 1)


def test_wan_pipeline_methods_skip_what_they_say(compared):
    folder, _, _ = compared
    data = results(folder, "wan")
    assert "TeaCache fitted here on diffusers' WanTransformer3DModel" in data["meta"]["teacache_proxy"]
    rows = {(r["method"], r["seed"]): r for r in data["records"]}
    assert len(rows) == 12 and all(r["calls"] == 16 for r in rows.values())
    for seed in (SEED, 1):
        tao = rows["taocache", seed]
        first, last = tao["window"]
        assert sorted(tao["skipped_schedule"]) == [[s, st] for s in range(first, last + 1) for st in ("cond", "uncond")]
        for method in ("taocache", "teacache", "magcache", "taoskip+tearesidual"):
            assert rows[method, seed]["skipped_fraction"] == 0.25, (method, rows[method, seed])
            assert 0 < rows[method, seed]["latent_rel_l2"] < 0.5  # recorded at vae.decode; changed, a little
        assert rows["pab", seed]["skipped_calls"] == 0 and rows["pab", seed]["latent_rel_l2"] > 0  # attn1 broadcast


def test_latte_pipeline_runs_the_authors_teacache_on_the_whole_stack(compared):
    folder, _, _ = compared
    data = results(folder, "latte")
    assert "the authors' TeaCache for Latte-1 (in diffusers' LattePipeline)" in data["meta"]["teacache_proxy"]
    assert data["meta"]["calibration"]["tea_coefficients"] is None  # published: nothing fitted (the LUT is)
    rows = [r for r in data["records"] if r["method"] == "taoskip+tearesidual"]
    assert len(rows) == 2 and all(r["calls"] == 8 and r["skipped_fraction"] == 0.25 for r in rows)
    assert any(r["skipped_calls"] > 0 for r in data["records"] if r["method"] == "teacache")


def test_two_experts_of_a_diffusers_wan22_pipeline(compared):
    folder, _, codes = compared
    assert codes["wan22"] == 0
    data = results(folder, "wan22")
    switch = data["meta"]["expert_switch"]
    assert isinstance(switch, int) and 0 < switch < 10
    assert sorted(data["meta"]["calibration"]["tea_coefficients"]) == ["0", "1"]  # a polynomial per expert
    for row in data["records"]:
        assert row["calls"] == 20 and set(row["skipped_per_expert"]) == {"high_noise", "low_noise"}
        if row["method"] == "taocache":
            assert all(s not in (switch, switch + 1) for s, _ in row["skipped_schedule"])  # the switch guarded


def test_a_script_passing_prompt_embeds_is_refused_before_any_run(compared):
    folder, stderr, codes = compared
    assert codes["embeds"] == 2
    assert "taocache compare: command line: SCRIPT: the script passes prompt_embeds= to " in stderr
    assert not (folder / "out_embeds" / "results.json").exists()


def test_diffusers_frames_in_every_output_type():
    video = torch.rand(2, 3, 4, 5, 6)  # [B, C, F, H, W] in [0, 1]
    np_frames = video.permute(0, 2, 3, 4, 1).numpy()  # np: [B, F, H, W, C]
    pt_frames = video.permute(0, 2, 1, 3, 4)  # pt: [B, F, C, H, W]

    class Output:
        frames = np_frames

    assert torch.equal(_diffusers_video(Output(), "np"), video * 2 - 1)
    assert torch.equal(_diffusers_video((pt_frames,), "pt"), video * 2 - 1)
    assert _diffusers_video((video,), "latent") is video
    from PIL import Image

    uint8 = (np_frames * 255).round().astype(np.uint8)
    pil = [[Image.fromarray(frame) for frame in clip] for clip in uint8]
    expected = torch.from_numpy(uint8).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    assert torch.equal(_diffusers_video((pil,), "pil"), expected)


def test_a_transformer_of_unknown_layout_runs_the_methods_that_need_no_block_stack():
    class Pipe:
        transformer = torch.nn.Linear(1, 1)

    target = TARGETS["diffusers"].for_call({"self": Pipe()})
    config = ExperimentConfig(source="exp.yaml", integration="diffusers", methods=["full", "taocache", "easycache"])
    check_methods(config, target, "Pipe's Linear")  # nothing said
    for methods, key in ((["full", "magcache"], "magcache reuse the block stack's residual"),
                         (["teacache"], "teacache is not yet available for Pipe's Linear: its proxy and block stack "
                                        "are known for diffusers' Wan and Latte transformers, not Linear"),
                         (["pab"], "pab is not yet available for Pipe's Linear")):
        with pytest.raises(ConfigError, match=key):
            check_methods(ExperimentConfig(source="exp.yaml", integration="diffusers", methods=methods), target,
                          "Pipe's Linear")


def test_a_prompt_list_is_refused_before_anything_is_written(compared):
    """Two prompts with a negative prompt each: compare replaced the list by a list of one and the pipeline failed
    in the calibration on the negative prompts' batch (or, with one negative prompt, made batch-1 references)."""
    folder, stderr, codes = compared
    assert codes["listed"] == 2
    assert "command line: SCRIPT: the script passes 2 prompts in one call of " in stderr
    assert not (folder / "out_listed" / "experiment.json").exists()


def test_a_compiled_subclass_of_wan_s_transformer_is_taken_for_wan_s(compared):
    """``torch.compile(pipe.transformer)`` (and a subclass) was refused teacache and pab as an unknown transformer."""
    folder, _, codes = compared
    assert codes["compiled"] == 0
    data = results(folder, "compiled")
    assert "TeaCache fitted here on diffusers' WanTransformer3DModel" in data["meta"]["teacache_proxy"]
    rows = {(r["method"], r["seed"]): r for r in data["records"]}
    assert rows["teacache", SEED]["skipped_fraction"] == 0.25 and rows["pab", SEED]["latent_rel_l2"] > 0


def test_a_pipeline_stopped_early_is_refused_and_its_folder_taken_again(compared):
    """A step callback stopping the pipeline: compare reported a 25% budget of the declared loop on runs that made
    12 of 16 calls; now refused at the first generation. The corrected script line then runs in the same folder
    (its experiment.json, with nothing stored beside it, refused it as another experiment's)."""
    folder, stderr, codes = compared
    assert codes["stopped"] != 0
    assert ("the generation of 'a green boat on the river' seed 0 returned after 12 of 16 denoiser calls (8 steps x 2 "
            "call(s) (cond, uncond)): the pipeline stopped its loop early") in stderr
    assert codes["stopped_then_whole"] == 0 and (folder / "out_stopped" / "results.json").is_file()


def test_a_declared_loop_that_misses_a_stream_is_refused_as_the_integration_refuses_it(compared):
    """The integration's cache_context check on compare's hooks too: a pipeline declared as [cond] that also calls
    uncond ended in a traceback of the hook's call count (review, 2026-11-28)."""
    folder, stderr, codes = compared
    assert codes["declared"] == 2
    assert ("cache_context('uncond') where the loop (8 steps x 1 call(s) (cond)) expects the call of cond"
            in stderr) and "Traceback" not in stderr


@pytest.mark.skipif(not HAS_ACCELERATE, reason="diffusers loads WanTransformer3DModel only with accelerate")
def test_the_example_script_loads_a_saved_pipeline_and_compare_runs_through_it(compared):
    """``examples/diffusers_wan.py`` (the model card's loading: VAE float32, UniPC flow shift 3) on the tiny pipeline
    saved with save_pretrained: its video is the compared reference for that prompt and seed."""
    folder, _, codes = compared
    assert codes["example"] == 0
    plain = torch.load(folder / "plain_example.pt")  # [B, F, H, W, C] in [0, 1]
    assert torch.equal(reference(folder, "example"), plain.permute(0, 4, 1, 2, 3) * 2 - 1)
    rows = [r for r in results(folder, "example")["records"] if r["method"] == "taocache"]
    assert len(rows) == 2 and all(r["calls"] == 16 and r["skipped_fraction"] == 0.25 for r in rows)


def test_a_preview_during_a_compared_generation_runs_uncached(compared):
    """A step callback that previews with another pipeline on the same transformer: under compare it was a second
    generation call of the patched class, which compare took for the script's first (docs check, 2026-11-28); it
    runs uncached, and each compared generation goes on where it was."""
    folder, err, codes = compared
    assert codes["preview"] == 0
    assert torch.equal(reference(folder, "preview"), reference(folder, "wan"))  # (the preview changes nothing)
    rows = {row["method"]: row for row in results(folder, "preview")["aggregates"]}
    assert rows["taocache"]["skips"] == 2 and rows["taocache"]["skipped_fraction"] == pytest.approx(0.25)
    assert "was called during generation" in err


@pytest.mark.parametrize("name", ["preview_last", "preview_other"])
def test_a_preview_at_the_last_step_or_on_another_model_is_not_a_second_experiment(compared, name):
    """A preview in the last step's callback (after the loop's last call), or a preview pipeline on a model of its
    own: compare took either for the script's first call and started a second experiment (review16, 2026-11-28)."""
    folder, _, codes = compared
    assert codes[name] == 0
    assert torch.equal(reference(folder, name), reference(folder, "wan"))
    rows = {row["method"]: row for row in results(folder, name)["aggregates"]}
    assert rows["taocache"]["skips"] == 2 and rows["taocache"]["skipped_fraction"] == pytest.approx(0.25)


def test_latent_videos_are_scored_and_the_pictures_not_drawn_are_said(compared):
    """``output_type="latent"``: strip.png and side_by_side.gif were left out without a word (docs check,
    2026-11-28)."""
    folder, err, codes = compared
    assert codes["latent"] == 0 and reference(folder, "latent").shape[1] == 4  # (Wan's latent channels)
    assert "strip.png and side_by_side.gif not drawn: the generations returned 4-channel videos" in err
    assert not (folder / "out_latent" / "strip.png").exists()


def test_the_example_refuses_an_mp4_it_could_not_write_before_loading_anything(tmp_path):
    import importlib.util

    if any(importlib.util.find_spec(m) for m in ("imageio", "cv2")):
        pytest.skip("imageio or OpenCV installed here: an .mp4 can be written")
    res = run_python([str(EXAMPLE), "--model", str(tmp_path / "no-such-model"), "--out", "v.mp4"],
                     timeout=120, cwd=tmp_path)
    assert res.returncode == 2 and "--out v.mp4: writing an .mp4 needs imageio" in res.stderr
