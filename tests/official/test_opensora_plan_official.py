"""The ``opensora_plan`` integration on Open-Sora-Plan v1.1.0's own ``VideoGenPipeline.__call__``
(opt-in: TAOHOOKS_OSP_REPO, a checkout of tag v1.1.0).

The checkout's code runs unmodified: the top-level module ``pipeline_videogen`` imported from
``<repo>/opensora/sample`` (as ``opensora/sample/sample_t2v.py`` does) and a tiny random
``opensora.models.diffusion.latte.modeling_latte.LatteT2V`` with ``attention_mode='math'`` (the
default 'flash' needs CUDA) on CPU. The sample script's default scheduler, ``PNDMScheduler()``,
makes ``N + 9`` denoiser calls for ``N`` steps (PRK warm-up). Stand-ins: a tiny random T5 encoder
(the pipeline reads its ``device``/``dtype``; embeddings are passed pre-computed), a tiny random
``AutoencoderKL`` with ``vae_scale_factor = [4, 8, 8]`` as the script sets on its causal VAE
(never decoded: ``output_type='latents'``). Needs diffusers 0.24.x-0.27.x (see README.md).
"""
import warnings
from contextlib import contextmanager

import pytest

import official_support  # noqa: E402
from official_support import calibrating_config, checkout, config, isolated_imports, summaries

OSP = checkout("TAOHOOKS_OSP_REPO", "opensora/sample/pipeline_videogen.py")

import torch  # noqa: E402

try:
    from diffusers.models.attention_processor import LORA_ATTENTION_PROCESSORS  # noqa: F401  (gone in 0.30)
except ImportError:  # pragma: no cover - depends on the environment
    import diffusers

    pytest.skip(f"TAOHOOKS_OSP_REPO is set, but Open-Sora-Plan v1.1.0 needs diffusers <= 0.27 (this "
                f"environment has {diffusers.__version__}); see tests/official/README.md", allow_module_level=True)
pytest.importorskip("transformers")

import taohooks.integrations.opensora_plan as osp_integration  # noqa: E402
from taohooks.runtime.hook import get_hook  # noqa: E402

STEPS = 12
CALLS = STEPS + 9  # PNDM with its default config: PRK warm-up, then one call per PLMS step
WINDOW = [15, 18]  # late calls the manual plan skips (in the PLMS tail)
PAB = {"groups": [{"pattern": r"transformer_blocks\.\d+\.attn1", "range": 2},
                  {"pattern": r"temporal_transformer_blocks\.\d+\.attn1", "range": 4},
                  {"pattern": r"transformer_blocks\.\d+\.attn2", "range": 6}],
       "timesteps": [100, 850]}  # VideoSys' Open-Sora-Plan v110 window


@contextmanager
def osp_imports():
    """Imports from the checkout (``opensora/sample`` first on sys.path, the repo root for
    ``opensora`` as ``pip install -e`` would give); dropped afterwards."""
    with isolated_imports([OSP / "opensora" / "sample", OSP], ["pipeline_videogen", "opensora"]):
        try:
            yield load_osp
        finally:
            osp_integration.uninstall()


@pytest.fixture
def osp():
    with osp_imports() as load:
        yield load


def load_osp():
    import importlib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipeline_videogen = importlib.import_module("pipeline_videogen")
        modeling_latte = importlib.import_module("opensora.models.diffusion.latte.modeling_latte")
    return pipeline_videogen, modeling_latte


def make_pipe(pipeline_videogen, modeling_latte, scheduler=None):
    from diffusers import AutoencoderKL, PNDMScheduler
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = modeling_latte.LatteT2V(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                          num_layers=2, cross_attention_dim=16, attention_bias=True,
                                          sample_size=[8, 8], patch_size=2, activation_fn="gelu-approximate",
                                          num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                                          norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=16,
                                          video_length=5, attention_mode="math", use_rope=True).eval()
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1).eval()
    vae.vae_scale_factor = [4, 8, 8]  # what sample_t2v.py sets (ae_stride_config of CausalVAEModel_4x8x8)
    text_encoder = T5EncoderModel(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                           num_heads=2)).eval()
    return pipeline_videogen.VideoGenPipeline(tokenizer=None, text_encoder=text_encoder, vae=vae,
                                              transformer=transformer,
                                              scheduler=scheduler if scheduler is not None else PNDMScheduler())


def call(pipe, steps=STEPS, seed=0, **kw):
    emb = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(1))
    neg = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe(prompt=None, negative_prompt=None, prompt_embeds=emb, negative_prompt_embeds=neg,
                    num_inference_steps=steps, guidance_scale=7.5, num_frames=17, height=64, width=64,
                    generator=torch.Generator().manual_seed(seed), output_type="latents",
                    enable_temporal_attentions=True, num_images_per_prompt=1, mask_feature=True, **kw).video


def install(**kw):
    osp_integration.install(config("opensora_plan", **kw))


def test_budget_zero_is_the_original_loop(osp, capfd):
    install(plan={"budget": 0})  # before the import: the post-import hook patches VideoGenPipeline
    pipeline_videogen, modeling_latte = osp()
    assert getattr(pipeline_videogen.VideoGenPipeline.__call__, "_taohooks_patch", None) is not None
    pipe = make_pipe(pipeline_videogen, modeling_latte)
    out = call(pipe)
    assert summaries(capfd.readouterr().err) == [(0, CALLS, None)]
    assert get_hook(pipe.transformer) is not None
    osp_integration.uninstall()
    assert getattr(pipeline_videogen.VideoGenPipeline.__call__, "_taohooks_patch", None) is None
    assert get_hook(pipe.transformer) is None and "forward" not in vars(pipe.transformer)
    plain = call(pipe)
    assert summaries(capfd.readouterr().err) == []
    assert out.shape == (1, 4, 5, 8, 8) and torch.equal(out, plain)


def test_late_window_skips_the_planned_calls(osp, capfd):
    pipeline_videogen, modeling_latte = osp()
    pipe = make_pipe(pipeline_videogen, modeling_latte)
    plain = call(pipe)
    install(plan={"window": WINDOW, "ratio": 1.0})  # after the import: patched at once
    out = call(pipe)
    saved = WINDOW[1] - WINDOW[0] + 1
    assert summaries(capfd.readouterr().err) == [(saved, CALLS, None)]
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    assert float((out - plain).norm() / plain.norm()) < 0.5
    assert torch.equal(call(pipe), out)  # the next generation: same plan, same result
    assert summaries(capfd.readouterr().err) == [(saved, CALLS, None)]


def test_another_step_count_reattaches_with_the_new_loop(osp, capfd):
    """The loop shape comes from each call's own arguments: 8 steps after 12 make 17 calls."""
    pipeline_videogen, modeling_latte = osp()
    pipe = make_pipe(pipeline_videogen, modeling_latte)
    install(plan={"budget": 0})
    call(pipe)
    call(pipe, steps=8)
    assert summaries(capfd.readouterr().err) == [(0, CALLS, None), (0, 8 + 9, None)]


# Every --sample_method of sample_t2v.py, built as the script builds it (default config).
SAMPLE_METHODS = ["DDIM", "EulerDiscrete", "DDPM", "DPMSolverMultistep", "DPMSolverSinglestep", "PNDM",
                  "HeunDiscrete", "EulerAncestralDiscrete", "DEISMultistep", "KDPM2AncestralDiscrete"]


@pytest.mark.parametrize("method", SAMPLE_METHODS)
def test_every_sample_method_declares_the_calls_it_makes(osp, capfd, method):
    """The loop length comes from the pipeline's scheduler (PNDM N+9, Heun/KDPM2 2N-1, others N)."""
    import diffusers

    steps = 6
    pipeline_videogen, modeling_latte = osp()
    pipe = make_pipe(pipeline_videogen, modeling_latte, scheduler=getattr(diffusers, method + "Scheduler")())
    try:
        plain = call(pipe, steps=steps)
    except ValueError as exc:  # DPMSolverSinglestepScheduler() in diffusers 0.24: "step must be greater than zero"
        pytest.skip(f"{method}Scheduler() fails without taohooks in diffusers {diffusers.__version__}: {exc}")
    calls = len(pipe.scheduler.timesteps)  # what the loop iterated over
    install(plan={"budget": 0})
    assert torch.equal(call(pipe, steps=steps), plain)
    assert summaries(capfd.readouterr().err) == [(0, calls, None)]


def test_ddim_scheduler_makes_one_call_per_step(osp, capfd):
    from diffusers import DDIMScheduler

    pipeline_videogen, modeling_latte = osp()
    pipe = make_pipe(pipeline_videogen, modeling_latte, scheduler=DDIMScheduler())
    plain = call(pipe)
    install(plan={"window": [6, 8], "ratio": 1.0})
    out = call(pipe)
    assert summaries(capfd.readouterr().err) == [(3, STEPS, None)]
    assert torch.isfinite(out).all() and not torch.equal(out, plain)


def test_timesteps_argument_is_ignored_by_the_pipeline(osp, capfd):
    pipeline_videogen, modeling_latte = osp()
    pipe = make_pipe(pipeline_videogen, modeling_latte)
    plain = call(pipe, timesteps=[900, 500, 100])
    install(plan={"budget": 0})
    assert torch.equal(call(pipe, timesteps=[900, 500, 100]), plain)
    assert summaries(capfd.readouterr().err) == [(0, CALLS, None)]


@pytest.mark.parametrize("plan", [{"budget": 0}, {"window": WINDOW, "ratio": 1.0}], ids=["budget0", "window"])
def test_native_pab(osp, capfd, plan):
    pipeline_videogen, modeling_latte = osp()
    pipe = make_pipe(pipeline_videogen, modeling_latte)
    plain = call(pipe)
    install(plan=plan, pab=PAB)
    out = call(pipe)
    saved = 0 if plan.get("budget") == 0 else WINDOW[1] - WINDOW[0] + 1
    [(got_saved, total, broadcasts)] = summaries(capfd.readouterr().err)
    assert (got_saved, total) == (saved, CALLS)
    assert broadcasts is not None and broadcasts > 0
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    osp_integration.uninstall()
    for name, module in pipe.transformer.named_modules():
        assert "forward" not in vars(module), name  # PAB's attention patches are removed too
    assert torch.equal(call(pipe), plain)


def test_calibrates_then_skips_with_a_budget(osp, capfd, tmp_path):
    """``lut:`` names a missing file: generation 1 computes every call and writes the LUT,
    generation 2 skips ``budget`` steps in the window searched on it."""
    pipe = make_pipe(*osp())
    plain = call(pipe)
    osp_integration.install(calibrating_config("opensora_plan", tmp_path, budget=2))
    calibrated = call(pipe)
    err = capfd.readouterr().err
    assert summaries(err) == [(0, CALLS, None)] and "[calibrating, all steps computed]" in err
    assert "calibration complete with generation 1" in err  # said by the generation that completed it, once
    assert torch.equal(calibrated, plain) and (tmp_path / "opensora_plan.safetensors").is_file()
    out = call(pipe)
    err = capfd.readouterr().err
    assert "calibration complete" not in err and summaries(err) == [(2, CALLS, None)]
    assert torch.isfinite(out).all() and not torch.equal(out, plain)


def test_authors_teacache_on_the_whole_interleaved_stack(osp):
    """TeaCache as in its authors' Open-Sora-Plan v1.1 evaluation script (PNDM: every call counts)."""
    from official_support import check_authors_teacache

    pipeline_videogen, modeling_latte = osp()
    check_authors_teacache("opensora_plan", make_pipe(pipeline_videogen, modeling_latte), call, CALLS)


def text_call(pipe, prompt="a tiny test prompt"):
    """As ``sample_t2v.py`` calls the pipeline: a prompt string, torch's global RNG (no generator)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe(prompt, num_inference_steps=STEPS, guidance_scale=7.5, num_frames=17, height=64, width=64,
                    output_type="latents", enable_temporal_attentions=True, num_images_per_prompt=1,
                    mask_feature=True).video


COMPARE_DRIVER = """\
import sys
import torch
sys.path.insert(0, {official!r})
import test_opensora_plan_official as t
from official_support import with_byte_text_encoder
with t.osp_imports() as load:
    pipeline_videogen, modeling_latte = load()
    pipe = with_byte_text_encoder(t.make_pipe(pipeline_videogen, modeling_latte))
    torch.manual_seed(0)  # the seed of the first evaluation prompt (compare seeds each run like this)
    video = t.text_call(pipe)  # taocache compare intercepts this call (and exits)
    if len(sys.argv) > 1:
        torch.save(video, sys.argv[1])
"""
COMPARE_EXPERIMENT = official_support.compare_experiment("opensora_plan", "full, taocache, teacache, magcache", 0.2)


def test_compare_through_the_official_loop(tmp_path):
    """``taocache compare`` on the checkout's VideoGenPipeline (PNDM: 12 steps = 21 calls, numbered by call):
    the stored reference is what the pipeline returns for that prompt with torch seeded; TaoCache skips 4 of
    21 calls, MagCache (calibrated ratios) some; the authors' TeaCache runs on the whole spatial + temporal stack."""
    from official_support import compare_through_driver

    results = compare_through_driver(tmp_path, COMPARE_DRIVER, COMPARE_EXPERIMENT, OSP / "opensora" / "sample")
    assert "the authors' TeaCache for Open-Sora-Plan v1.1" in results["meta"]["teacache_proxy"]
    from taohooks.compare.experiment import PromptEntry
    from taohooks.compare.store import RunStore

    reference, _ = RunStore(tmp_path / "out").load("full", PromptEntry("a tiny test prompt", 0))
    assert torch.equal(reference, torch.load(tmp_path / "plain.pt").float())
    rows = {r["method"]: r for r in results["records"] if r["seed"] == 0}
    assert rows["taocache"]["skipped_calls"] == 4 and rows["taocache"]["psnr"] < 100
    assert rows["magcache"]["skipped_calls"] > 0 and rows["magcache"]["psnr"] < 100  # its threshold, matched elsewhere
    assert all(rows[m]["calls"] == CALLS for m in ("taocache", "teacache", "magcache"))
