"""The ``latte`` integration on Latte's own ``LattePipeline.__call__`` (opt-in: TAOHOOKS_LATTE_REPO).

The checkout's code runs unmodified: the top-level module ``pipeline_latte`` imported from
``<repo>/sample`` (as ``sample/sample_t2x.py`` does) and a tiny random ``models.latte_t2v.LatteT2V``
on CPU, with a tiny random ``AutoencoderKL`` (never decoded: ``output_type='latents'``), no text
encoder or tokenizer (pre-computed ``prompt_embeds``) and the scheduler ``sample_t2x.py`` builds
(DDIM, linear betas 0.0001..0.02, ``clip_sample=False``). ``models/__init__.py`` is bypassed (it
imports ``models/latte.py``, which needs timm). Needs diffusers 0.24.x (see README.md).
"""
import warnings
from contextlib import contextmanager

import pytest

import official_support  # noqa: E402
from official_support import calibrating_config, checkout, config, isolated_imports, package_without_init, summaries

LATTE = checkout("TAOHOOKS_LATTE_REPO", "sample/pipeline_latte.py")

import torch  # noqa: E402

try:
    from diffusers.models.embeddings import CaptionProjection  # noqa: F401  (gone after diffusers 0.24)
except ImportError:  # pragma: no cover - depends on the environment
    import diffusers

    pytest.skip(f"TAOHOOKS_LATTE_REPO is set, but Latte needs diffusers 0.24.x (this environment has "
                f"{diffusers.__version__}); see tests/official/README.md", allow_module_level=True)

import taohooks.integrations.latte as latte_integration  # noqa: E402
from taohooks.runtime.hook import get_hook  # noqa: E402

STEPS = 10
WINDOW = [6, 8]  # late steps the manual plan skips: 3 calls (one batched CFG call per step)
PAB = {"groups": [{"pattern": r"transformer_blocks\.\d+\.attn1", "range": 2},
                  {"pattern": r"temporal_transformer_blocks\.\d+\.attn1", "range": 3},
                  {"pattern": r"transformer_blocks\.\d+\.attn2", "range": 4}],
       "timesteps": [100, 800]}  # VideoSys' Latte window


@contextmanager
def latte_imports():
    """Imports from the checkout (``sample/`` first on sys.path, as the sample script runs); dropped afterwards."""
    with isolated_imports([LATTE / "sample", LATTE], ["pipeline_latte", "models"]):
        package_without_init("models", LATTE / "models")
        try:
            yield load_latte
        finally:
            latte_integration.uninstall()


@pytest.fixture
def latte():
    with latte_imports() as load:
        yield load


def load_latte():
    import importlib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipeline_latte = importlib.import_module("pipeline_latte")
        latte_t2v = importlib.import_module("models.latte_t2v")
    return pipeline_latte, latte_t2v


def make_pipe(pipeline_latte, latte_t2v, scheduler=None):
    """``scheduler`` defaults to the one ``sample_t2x.py`` builds for its default ``sample_method: DDIM``."""
    from diffusers import AutoencoderKL, DDIMScheduler

    torch.manual_seed(0)
    transformer = latte_t2v.LatteT2V(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                     num_layers=2, cross_attention_dim=16, attention_bias=True, sample_size=8,
                                     patch_size=2, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                     norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                                     caption_channels=16, video_length=4).eval()
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1).eval()
    if scheduler is None:
        scheduler = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False)
    return pipeline_latte.LattePipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                        scheduler=scheduler)


def call(pipe, guidance_scale=7.5, seed=0, steps=STEPS, **kw):
    emb = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(1))
    neg = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe(prompt=None, negative_prompt=None, prompt_embeds=emb, negative_prompt_embeds=neg,
                    num_inference_steps=steps, guidance_scale=guidance_scale, video_length=4, height=64, width=64,
                    generator=torch.Generator().manual_seed(seed), output_type="latents",
                    enable_temporal_attentions=True, mask_feature=True, **kw).video


def install(**kw):
    latte_integration.install(config("latte", **kw))


def test_budget_zero_is_the_original_loop(latte, capfd):
    install(plan={"budget": 0})  # before the import: the post-import hook patches LattePipeline
    pipeline_latte, latte_t2v = latte()
    assert getattr(pipeline_latte.LattePipeline.__call__, "_taohooks_patch", None) is not None
    pipe = make_pipe(pipeline_latte, latte_t2v)
    out = call(pipe)
    assert summaries(capfd.readouterr().err) == [(0, STEPS, None)]
    assert get_hook(pipe.transformer) is not None
    latte_integration.uninstall()
    assert getattr(pipeline_latte.LattePipeline.__call__, "_taohooks_patch", None) is None
    assert get_hook(pipe.transformer) is None and "forward" not in vars(pipe.transformer)
    plain = call(pipe)
    assert summaries(capfd.readouterr().err) == []
    assert out.shape == (1, 4, 4, 8, 8) and torch.equal(out, plain)


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0], ids=["cfg", "no-cfg"])
def test_late_window_skips_the_planned_calls(latte, capfd, guidance_scale):
    pipeline_latte, latte_t2v = latte()
    pipe = make_pipe(pipeline_latte, latte_t2v)
    plain = call(pipe, guidance_scale)
    install(plan={"window": WINDOW, "ratio": 1.0})  # after the import: patched at once
    out = call(pipe, guidance_scale)
    saved = WINDOW[1] - WINDOW[0] + 1
    assert summaries(capfd.readouterr().err) == [(saved, STEPS, None)]
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    assert float((out - plain).norm() / plain.norm()) < 0.5
    assert torch.equal(call(pipe, guidance_scale), out)  # the next generation: same plan, same result
    assert summaries(capfd.readouterr().err) == [(saved, STEPS, None)]


def test_two_videos_per_prompt(latte, capfd):
    """``num_images_per_prompt=2``: the batched call holds [uncond x2, cond x2]."""
    pipeline_latte, latte_t2v = latte()
    pipe = make_pipe(pipeline_latte, latte_t2v)
    plain = call(pipe, num_images_per_prompt=2)
    install(plan={"window": WINDOW, "ratio": 1.0})
    out = call(pipe, num_images_per_prompt=2)
    assert summaries(capfd.readouterr().err) == [(WINDOW[1] - WINDOW[0] + 1, STEPS, None)]
    assert out.shape == (2, 4, 4, 8, 8) and torch.isfinite(out).all()
    assert float((out - plain).norm() / plain.norm()) < 0.5


def test_timesteps_argument_is_ignored_by_the_pipeline(latte, capfd):
    pipeline_latte, latte_t2v = latte()
    pipe = make_pipe(pipeline_latte, latte_t2v)
    plain = call(pipe, timesteps=[900, 500, 100])
    assert len(pipe.scheduler.timesteps) == STEPS  # the pipeline ran num_inference_steps, not the 3 timesteps
    install(plan={"budget": 0})
    assert torch.equal(call(pipe, timesteps=[900, 500, 100]), plain)
    assert summaries(capfd.readouterr().err) == [(0, STEPS, None)]


@pytest.mark.parametrize("plan", [{"budget": 0}, {"window": WINDOW, "ratio": 1.0}], ids=["budget0", "window"])
def test_native_pab(latte, capfd, plan):
    pipeline_latte, latte_t2v = latte()
    pipe = make_pipe(pipeline_latte, latte_t2v)
    plain = call(pipe)
    install(plan=plan, pab=PAB)
    out = call(pipe)
    saved = 0 if plan.get("budget") == 0 else WINDOW[1] - WINDOW[0] + 1
    [(got_saved, total, broadcasts)] = summaries(capfd.readouterr().err)
    assert (got_saved, total) == (saved, STEPS)
    assert broadcasts is not None and broadcasts > 0
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    latte_integration.uninstall()
    for name, module in pipe.transformer.named_modules():
        assert "forward" not in vars(module), name  # PAB's attention patches are removed too
    assert torch.equal(call(pipe), plain)


def test_calibrates_then_skips_with_a_budget(latte, capfd, tmp_path):
    """``lut:`` names a missing file: generation 1 computes every call and writes the LUT,
    generation 2 skips ``budget`` steps in the window searched on it."""
    pipe = make_pipe(*latte())
    plain = call(pipe)
    latte_integration.install(calibrating_config("latte", tmp_path, budget=2))
    calibrated = call(pipe)
    err = capfd.readouterr().err
    assert summaries(err) == [(0, STEPS, None)] and "[calibrating, all steps computed]" in err
    assert "calibration complete with generation 1" in err  # said by the generation that completed it, once
    assert torch.equal(calibrated, plain) and (tmp_path / "latte.safetensors").is_file()
    out = call(pipe)
    err = capfd.readouterr().err
    assert "calibration complete" not in err and summaries(err) == [(2, STEPS, None)]
    assert torch.isfinite(out).all() and not torch.equal(out, plain)


def test_authors_teacache_on_the_whole_interleaved_stack(latte):
    """TeaCache as in its authors' Latte evaluation script (proxy, residual over spatial + temporal blocks)."""
    from official_support import check_authors_teacache

    pipeline_latte, latte_t2v = latte()
    pipe = make_pipe(pipeline_latte, latte_t2v)
    with pytest.raises(AssertionError, match=r"\[0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0\]"):
        check_authors_teacache("latte", pipe, call, STEPS)  # the published polynomial is negative here
    check_authors_teacache("latte", pipe, call, STEPS, threshold=0.5, coefficients=[1.0, 0.0])


def make_text_pipe(pipeline_latte, latte_t2v):
    """``make_pipe`` with a tokenizer and a tiny T5 (``caption_channels`` 16), so that prompts are strings."""
    from official_support import with_byte_text_encoder

    return with_byte_text_encoder(make_pipe(pipeline_latte, latte_t2v))


def text_call(pipe, prompt="a tiny test prompt", output_type="latents"):
    """As ``sample_t2x.py`` calls the pipeline: a prompt string, torch's global RNG (no generator)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe(prompt, video_length=4, height=64, width=64, num_inference_steps=STEPS, guidance_scale=7.5,
                    output_type=output_type, enable_temporal_attentions=True, mask_feature=True,
                    clean_caption=False).video


COMPARE_DRIVER = """\
import sys
import torch
sys.path.insert(0, {official!r})
import test_latte_official as t
with t.latte_imports() as load:
    pipeline_latte, latte_t2v = load()
    pipe = t.make_text_pipe(pipeline_latte, latte_t2v)
    torch.manual_seed(0)  # the seed of the first evaluation prompt (compare seeds each run like this)
    video = t.text_call(pipe, output_type="mp4")  # decoded (uint8); taocache compare intercepts this call
    if len(sys.argv) > 1:
        torch.save(video, sys.argv[1])
"""
COMPARE_EXPERIMENT = official_support.compare_experiment("latte", "full, taocache, teacache, magcache, taoskip+tearesidual", 0.3)


def test_compare_through_the_official_loop(tmp_path):
    """``taocache compare`` on the checkout's LattePipeline (a driver script builds the tiny pipeline with a
    text encoder and calls it once, as sample_t2x.py does, decoding with the tiny VAE): the stored reference is
    the video the pipeline returns for that prompt with torch seeded, and the final latents are recorded at
    ``decode_latents``; the authors' TeaCache (published coefficients), MagCache and the ablation reuse the
    whole spatial + temporal stack of the real LatteT2V."""
    from official_support import compare_through_driver

    results = compare_through_driver(tmp_path, COMPARE_DRIVER, COMPARE_EXPERIMENT, LATTE / "sample")
    assert "the authors' TeaCache for Latte-1" in results["meta"]["teacache_proxy"]
    from taohooks.compare.experiment import PromptEntry
    from taohooks.compare.store import RunStore

    store, entry = RunStore(tmp_path / "out"), PromptEntry("a tiny test prompt", 0)
    reference, _ = store.load("full", entry)
    plain = torch.load(tmp_path / "plain.pt")  # uint8 [B, F, H, W, C]
    assert plain.dtype == torch.uint8 and torch.equal(reference, plain.permute(0, 4, 1, 2, 3).float() / 127.5 - 1)
    assert store.load_latents("full", entry).shape == (1, 4, 4, 8, 8)  # [B, C, F, h, w] before the VAE
    rows = {r["method"]: r for r in results["records"] if r["seed"] == 0}
    for method in ("taocache", "magcache", "taoskip+tearesidual"):
        assert rows[method]["calls"] == STEPS and rows[method]["skipped_calls"] == 3, (method, rows[method])
        assert rows[method]["psnr"] < 100 and 0 < rows[method]["latent_rel_l2"] < 1
    assert rows["teacache"]["calls"] == STEPS
