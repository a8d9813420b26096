"""The diffusers integration on real diffusers pipelines with tiny transformers (CPU)."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
if not hasattr(diffusers, "WanPipeline"):  # (diffusers 0.33+; the extras allow 0.30)
    pytest.skip(f"diffusers {diffusers.__version__} has no WanPipeline", allow_module_level=True)

from diffusers import (DDIMScheduler, FlowMatchEulerDiscreteScheduler, LattePipeline,  # noqa: E402
                       LatteTransformer3DModel, WanPipeline, WanTransformer3DModel)

from taohooks.config import config_from_dict  # noqa: E402
from taohooks.runtime.hook import get_hook  # noqa: E402
from taohooks.launcher.integration import IntegrationError  # noqa: E402
from taohooks.taocache.plan import PlanError  # noqa: E402
from taohooks.integrations.diffusers import disable_taocache, enable_taocache  # noqa: E402

STEPS = 8


def wan_pipe():
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                        in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                        num_layers=2, rope_max_seq_len=32).eval()
    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def wan_call(pipe, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(1))
    neg = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(2))
    return pipe(prompt_embeds=emb, negative_prompt_embeds=neg, height=16, width=16, num_frames=5,
                num_inference_steps=STEPS, generator=g, output_type="latent", **kw).frames


def latte_pipe():
    torch.manual_seed(0)
    transformer = LatteTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                          out_channels=8, num_layers=2, cross_attention_dim=16, attention_bias=True,
                                          sample_size=8, patch_size=2, activation_fn="gelu-approximate",
                                          num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                                          norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=16,
                                          video_length=4).eval()
    return LattePipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                         scheduler=DDIMScheduler(beta_schedule="linear", clip_sample=False))


def latte_call(pipe, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(1))
    neg = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(2))
    return pipe(prompt_embeds=emb, negative_prompt_embeds=neg, negative_prompt=None, video_length=4, height=64,
                width=64, num_inference_steps=STEPS, generator=g, output_type="latent", **kw).frames


def tiny_wan_vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


def frames(n, size=32, seed=0):
    from PIL import Image

    pixels = (torch.rand(n, size, size, 3, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)
    return [Image.fromarray(f) for f in pixels.numpy()]


def vace_pipe(two=False):
    from diffusers import UniPCMultistepScheduler, WanVACEPipeline, WanVACETransformer3DModel

    torch.manual_seed(0)
    vae = tiny_wan_vae()
    transformers = [WanVACETransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                              in_channels=16, out_channels=16, text_dim=16, freq_dim=16, ffn_dim=32,
                                              num_layers=2, rope_max_seq_len=32, vace_layers=[0],
                                              vace_in_channels=96).eval() for _ in range(2 if two else 1)]
    return WanVACEPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformers[0],
                           transformer_2=transformers[1] if two else None, boundary_ratio=0.875 if two else None,
                           scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                             flow_shift=3.0))


def vace_call(pipe, seed=0, **kw):
    emb = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(1))
    neg = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(2))
    return pipe(prompt_embeds=emb, negative_prompt_embeds=neg, video=frames(5, seed=seed), height=32, width=32,
                num_frames=5, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed),
                output_type="latent", **kw).frames


def animate_pipe():
    from diffusers import UniPCMultistepScheduler, WanAnimatePipeline, WanAnimateTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    vae = tiny_wan_vae()
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=32, patch_size=8)).eval()
    transformer = WanAnimateTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=36, latent_channels=16,
        out_channels=16, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, image_dim=16, added_kv_proj_dim=None,
        rope_max_seq_len=32, motion_encoder_channel_sizes={"16": 8, "8": 8, "4": 8}, motion_encoder_size=16,
        motion_style_dim=16, motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16,
        face_encoder_num_heads=2, inject_face_latents_blocks=2, motion_encoder_batch_size=8).eval()
    return WanAnimatePipeline(tokenizer=None, text_encoder=None, vae=vae, image_encoder=clip, transformer=transformer,
                              image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction",
                                                                use_flow_sigmas=True, flow_shift=3.0))


def animate_call(pipe, seed=0, pose_frames=5, segment=5, **kw):
    """``pose_frames`` 5: one segment of 5 frames; 9: two (``segment_frame_length`` 5, one conditioning frame)."""
    emb = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(1))
    neg = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(2))
    face = [f.resize((16, 16)) for f in frames(pose_frames, seed=300 + seed)]
    return pipe(image=frames(1, seed=100 + seed)[0], pose_video=frames(pose_frames, seed=200 + seed), face_video=face,
                prompt_embeds=emb, negative_prompt_embeds=neg, height=32, width=32, segment_frame_length=segment,
                prev_segment_conditioning_frames=1, num_inference_steps=STEPS,
                generator=torch.Generator().manual_seed(seed), output_type="latent", **kw).frames


# name: (make, call, calls of one generation, streams)
PIPES = {"wan": (wan_pipe, wan_call, 2 * STEPS, 2), "latte": (latte_pipe, latte_call, STEPS, 1),
         "vace": (vace_pipe, vace_call, 2 * STEPS, 2), "animate": (animate_pipe, animate_call, STEPS, 1)}


def config(**plan):
    return config_from_dict({"integration": "diffusers", "plan": plan}, "test.yaml")


@pytest.mark.parametrize("name", sorted(PIPES))
def test_budget_zero_is_the_plain_pipeline_and_a_window_skips(name, capfd):
    make, call, calls, streams = PIPES[name]
    pipe = make()
    full = call(pipe)
    enable_taocache(pipe, config(budget=0))
    assert torch.equal(call(pipe), full)
    assert f"0 of {calls} denoiser calls saved" in capfd.readouterr().err
    enable_taocache(pipe, config(window=[5, 6], ratio=1.0))
    skipped = call(pipe)
    saved = 2 * streams
    assert f"{saved} of {calls} denoiser calls saved" in capfd.readouterr().err
    assert torch.isfinite(skipped).all() and not torch.equal(skipped, full)
    assert float((skipped - full).norm() / full.norm()) < 0.5
    disable_taocache(pipe)
    assert get_hook(pipe.transformer) is None and "forward" not in vars(pipe.transformer)
    assert torch.equal(call(pipe), full)


def test_a_pipeline_the_script_drops_is_freed_with_its_transformer(capfd):
    """enable_taocache on a pipeline made per video: every transformer stayed alive (memory walkthrough, 2026-11-28)."""
    import gc
    import weakref

    refs = []
    for seed in (0, 1):
        pipe = wan_pipe()
        enable_taocache(pipe, config(window=[5, 6], ratio=1.0))
        wan_call(pipe, seed=seed)
        refs.append(weakref.ref(pipe.transformer))
        del pipe
        gc.collect()
    assert [r() for r in refs] == [None, None]


def test_disabling_a_pipeline_on_a_shallow_copy_leaves_the_original_s_cache(capfd):
    """The cache entry lives on the transformer, and copy.copy shares it: disable_taocache on a pipeline built on a
    copy (never enabled) detached the original's cache (review, 2026-11-28)."""
    import copy

    from diffusers import WanPipeline

    a = wan_pipe()
    enable_taocache(a, config(window=[5, 6], ratio=1.0))
    try:
        wan_call(a)
        b = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=copy.copy(a.transformer),
                        scheduler=a.scheduler)
        hook = get_hook(a.transformer)
        disable_taocache(b)
        assert get_hook(a.transformer) is hook and hook.attached
    finally:
        disable_taocache(a)


def test_other_instances_of_the_class_are_untouched(capfd):
    a, b = wan_pipe(), wan_pipe()
    enable_taocache(a, config(window=[5, 6], ratio=1.0))
    try:
        wan_call(b)
        assert "denoiser calls saved" not in capfd.readouterr().err and get_hook(b.transformer) is None
    finally:
        disable_taocache(a)


def test_wan_without_guidance_is_one_stream(capfd):
    pipe = wan_pipe()
    enable_taocache(pipe, config(window=[5, 6], ratio=1.0))
    try:
        wan_call(pipe, guidance_scale=1.0)
        assert f"2 of {STEPS} denoiser calls saved" in capfd.readouterr().err
    finally:
        disable_taocache(pipe)


def test_cache_context_names_are_checked(capfd):
    pipe = wan_pipe()
    cfg = config(window=[5, 6], ratio=1.0)
    enable_taocache(pipe, cfg)
    from taohooks.integrations import diffusers as integration

    try:  # declare the streams in the wrong order: the first call is made in cache_context("cond")
        original = integration.SEQUENTIAL_CFG
        integration.SEQUENTIAL_CFG = ()
        cfg.loop.streams = ["uncond", "cond"]
        with pytest.raises(IntegrationError, match=r"cache_context\('cond'\)"):
            wan_call(pipe)
    finally:
        integration.SEQUENTIAL_CFG = original
        disable_taocache(pipe)


def test_diffusers_pab_state_is_reset_on_refresh_and_start(capfd):
    from diffusers import PyramidAttentionBroadcastConfig

    pipe = latte_pipe()
    pipe.transformer.enable_cache(PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: pipe.current_timestep))
    resets = []
    original = pipe.transformer._reset_stateful_cache
    pipe.transformer._reset_stateful_cache = lambda *a, **k: (resets.append(1), original(*a, **k))
    enable_taocache(pipe, config(window=[4, 6], ratio=1.0))
    try:
        out = latte_call(pipe)
        assert torch.isfinite(out).all()
        # one reset at the start, one on step 7 (the first computed step after the window); the
        # pipeline's own reset at the end of __call__ is the third
        assert len(resets) == 3
    finally:
        disable_taocache(pipe)


def test_a_diffusers_cache_with_contexts_runs_on_the_step_taocache_resumes_on(capfd):
    """diffusers' reset of its caches' state also clears the cache context, and TaoCache's reset runs inside the
    pipeline's ``cache_context`` of the call it resumes on: FirstBlockCache raised "No cache context is set" there
    (diffusersuser, 2026-11-28). The context is kept."""
    from diffusers import FirstBlockCacheConfig

    pipe = wan_pipe()
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    alone = wan_call(pipe)
    enable_taocache(pipe, config(window=[4, 5], ratio=1.0))
    try:
        out = wan_call(pipe)
    finally:
        disable_taocache(pipe)
    assert f"4 of {2 * STEPS} denoiser calls saved" in capfd.readouterr().err
    assert out.shape == alone.shape and torch.isfinite(out).all() and not torch.equal(out, alone)
    assert torch.equal(wan_call(pipe), alone)  # (the cache's state left in phase for runs without taohooks)


def wan22_pipe(boundary_ratio=0.7):
    """A tiny Wan2.2 A14B in diffusers: ``transformer`` (high noise) and ``transformer_2`` (low noise)."""
    pipe = wan_pipe()
    torch.manual_seed(1)
    low = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                rope_max_seq_len=32).eval()
    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=pipe.transformer, transformer_2=low,
                       scheduler=pipe.scheduler, boundary_ratio=boundary_ratio)


def test_a_lut_of_two_experts_is_not_taken_by_one_transformer_nor_the_reverse(tmp_path, capfd):
    """A Wan2.2 A14B LUT ran on a one-transformer WanPipeline once guide_scale was accepted (its only named
    difference, 5.0 against [5.0, 5.0]); the reverse met a notice that the LUT records no expert_boundary
    (diffusersuser, 2026-11-28). One transformer now records expert_boundary None: both refused by name."""
    from taohooks.taocache.lut import LUTMismatchError

    for calibrated_on, run_on in ((wan22_pipe, wan_pipe), (wan_pipe, wan22_pipe)):
        lut = str(tmp_path / f"{calibrated_on.__name__}.safetensors")
        pipe = calibrated_on()
        enable_taocache(pipe, config_from_dict({"integration": "diffusers", "lut": lut, "calibration": {"prompts": 1},
                                                "plan": {"budget": 2, "min_step": 2}}, str(tmp_path / "c.yaml")))
        wan_call(pipe)  # calibrates
        disable_taocache(pipe)
        pipe = run_on()
        enable_taocache(pipe, config_from_dict({"integration": "diffusers", "lut": lut, "plan": {"budget": 2},
                                                "calibration": {"prompts": 1, "accept": ["guide_scale"]}},
                                               str(tmp_path / "c.yaml")))
        try:
            said = "None, the LUT 700.0" if run_on is wan_pipe else "700.0, the LUT None"
            with pytest.raises(LUTMismatchError, match=r"expert_boundary \(the timestep where Wan2.2 A14B's low-noise "
                                                       r"expert takes over; None: one transformer\): this run " + said):
                wan_call(pipe)
        finally:
            disable_taocache(pipe)
        assert "records no" not in capfd.readouterr().err


def test_two_transformers_run_as_one_loop_with_the_switch_guarded(tmp_path, capfd):
    """The step accounting is per pipeline step, whichever expert runs it (the ecosystem's MagCache
    counts each transformer's calls instead); the first two low-noise steps are never skipped."""
    from taohooks.taocache.lut import CalibrationLUT
    from taohooks.taocache.cache import expert_guard

    pipe = wan22_pipe()
    calls = {"high": 0, "low": 0}
    # on the first block: runs only when the transformer really runs (a skipped call returns before it)
    pipe.transformer.blocks[0].register_forward_pre_hook(lambda m, a: calls.__setitem__("high", calls["high"] + 1))
    pipe.transformer_2.blocks[0].register_forward_pre_hook(lambda m, a: calls.__setitem__("low", calls["low"] + 1))
    plain = wan_call(pipe)
    high_steps = calls["high"] // 2
    assert 0 < high_steps < STEPS and calls["low"] == 2 * (STEPS - high_steps)
    cfg = config_from_dict({"integration": "diffusers", "lut": "lut.safetensors", "calibration": {"prompts": 1},
                            "plan": {"budget": 2, "min_step": 2}}, str(tmp_path / "c.yaml"))
    enable_taocache(pipe, cfg)
    try:
        assert torch.equal(wan_call(pipe), plain)  # calibrating: every step computed
        lut = CalibrationLUT.load(tmp_path / "lut.safetensors")
        assert lut.steps == STEPS and lut.identity["expert_boundary"] == 700.0
        guard = expert_guard(lut)
        assert guard == (high_steps, high_steps + 1)
        calls.update(high=0, low=0)
        out = wan_call(pipe)
        err = capfd.readouterr().err
        assert f"4 of {2 * STEPS} denoiser calls saved" in err, err
        plan = next(cb for cb in pipe.transformer.__dict__["_taohooks_hook"].callbacks if hasattr(cb, "plan")).plan
        assert not set(plan.skipped_steps) & set(guard)
        assert calls["high"] + calls["low"] == 2 * STEPS - 4 and torch.isfinite(out).all()
        with pytest.raises(IntegrationError, match="transformer_2 is the same module"):
            p2 = wan_pipe()
            p2.register_modules(transformer_2=p2.transformer)
            p2.register_to_config(boundary_ratio=0.5)
            enable_taocache(p2, config(budget=0))
    finally:
        disable_taocache(pipe)
    assert "forward" not in vars(pipe.transformer) and "forward" not in vars(pipe.transformer_2)



def test_the_plan_guards_the_runs_own_expert_switch_not_the_luts(tmp_path, capfd):
    """With a LUT of another shift (calibration.accept: [shift]) or carried to another step count, the plan's guard
    came from the LUT's timesteps: a window after the run's switch was refused as over it, and one over it accepted,
    then computed at every planned skip (diffusers Wan2.2 walkthrough, 2026-11-27). The run's timesteps decide now."""
    pipe = wan22_pipe()  # shift 3: low-noise from step 4 of 8; at shift 8 from step 6
    cfg = {"integration": "diffusers", "lut": "lut.safetensors", "calibration": {"prompts": 1, "accept": ["shift"]}}
    enable_taocache(pipe, config_from_dict(cfg, str(tmp_path / "c.yaml")))
    wan_call(pipe)  # calibrates at shift 3
    disable_taocache(pipe)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=8.0)
    capfd.readouterr()
    enable_taocache(pipe, config_from_dict({**cfg, "plan": {"window": [4, 5]}}, str(tmp_path / "c.yaml")))
    try:
        assert torch.isfinite(wan_call(pipe)).all()
        err = capfd.readouterr().err
        assert f"4 of {2 * STEPS} denoiser calls saved" in err and "expert switch" not in err, err
        enable_taocache(pipe, config_from_dict({**cfg, "plan": {"window": [6, 7]}}, str(tmp_path / "c.yaml")))
        with pytest.raises(PlanError, match=r"c.yaml: plan: the plan skips step\(s\) 6, 7, the first steps after "
                                            r"the expert switch"):
            wan_call(pipe)
    finally:
        disable_taocache(pipe)


def test_a_lut_records_the_size_and_another_size_is_refused_before_the_first_call(tmp_path, capfd):
    """A diffusers LUT held no size: one calibrated at 16x16, 5 frames skipped at 32x32 without a word, and a
    calibration continued at another size computed a whole generation, then left it out (diffusers Wan2.2
    walkthrough, 2026-11-27). Wan's, Latte's and Open-Sora-Plan's integrations record it."""
    from taohooks.taocache.lut import CalibrationLUT, LUTMismatchError

    pipe = wan_pipe()
    calls = []
    pipe.transformer.blocks[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    cfg = config_from_dict({"integration": "diffusers", "lut": "lut.safetensors", "calibration": {"prompts": 2},
                            "plan": {"budget": 2}}, str(tmp_path / "c.yaml"))
    enable_taocache(pipe, cfg)
    try:
        wan_call(pipe)
        lut = CalibrationLUT.load(tmp_path / "lut.safetensors")
        assert (lut.identity["height"], lut.identity["width"], lut.identity["frames"]) == (16, 16, 5)
        calls.clear()
        with pytest.raises(LUTMismatchError, match=r"height: this run 32, the LUT 16"):
            pipe(prompt_embeds=torch.randn(1, 8, 16), negative_prompt_embeds=torch.randn(1, 8, 16), height=32,
                 width=16, num_frames=5, num_inference_steps=STEPS, output_type="latent")
        assert calls == []  # refused before the first model call
    finally:
        disable_taocache(pipe)


def test_a_teacache_hybrid_acts_in_both_transformers(tmp_path, capfd):
    """The hybrid's TeaCache (Algorithm 2: before TaoCache's window) bypasses the block stack of the
    high-noise ``transformer`` and of the low-noise ``transformer_2``, each with its own state (the first
    call of each expert computes: its proxy has nothing of its own to compare with)."""
    pipe = wan22_pipe(boundary_ratio=0.85)
    ran = {"high": 0, "low": 0}  # the first block's self-attention: runs only where the blocks really run
    pipe.transformer.blocks[0].attn1.register_forward_pre_hook(lambda m, a: ran.__setitem__("high", ran["high"] + 1))
    pipe.transformer_2.blocks[0].attn1.register_forward_pre_hook(lambda m, a: ran.__setitem__("low", ran["low"] + 1))
    wan_call(pipe)
    high_steps = ran["high"] // 2
    assert high_steps == 3 and ran["low"] == 2 * (STEPS - high_steps)
    cfg = config_from_dict({"integration": "diffusers", "lut": "lut.safetensors", "calibration": {"prompts": 1},
                            "plan": {"budget": 1, "min_step": STEPS - 2},
                            "teacache": {"threshold": 10.0, "coefficients": [1.0, 0.0], "guard_band": 0}},
                           str(tmp_path / "c.yaml"))
    enable_taocache(pipe, cfg)
    try:
        wan_call(pipe)  # calibrating: every step computed
        ran.update(high=0, low=0)
        out = wan_call(pipe)
        err = capfd.readouterr().err
        assert "window 6-6" in err and "TeaCache reused the block residual on 8 calls" in err, err
        # high: step 0 computed (warm-up), steps 1-2 reused; low: step 3 computed (its first), 4-5 reused,
        # 6 skipped by TaoCache, 7 computed
        assert ran == {"high": 2, "low": 4} and torch.isfinite(out).all()
    finally:
        disable_taocache(pipe)

def test_calibrates_then_skips(tmp_path, capfd):
    pipe = latte_pipe()
    cfg = config_from_dict({"integration": "diffusers", "lut": "lut.safetensors", "calibration": {"prompts": 1},
                            "plan": {"budget": 2, "min_step": 4}}, str(tmp_path / "c.yaml"))
    enable_taocache(pipe, cfg)
    try:
        latte_call(pipe)
        assert (tmp_path / "lut.safetensors").is_file()
        latte_call(pipe)
        err = capfd.readouterr().err
        assert "calibrating, all steps computed" in err and f"2 of {STEPS} denoiser calls saved" in err
    finally:
        disable_taocache(pipe)


# ---------------------------------------------------------------- review of 2026-11-27
def test_two_pipelines_sharing_a_transformer_each_run_their_own_config(capfd):
    """Sharing components (from_pipe) used to crash (two hooks), or run the other pipeline's plan."""
    from diffusers import WanVideoToVideoPipeline

    a = wan_pipe()
    b = WanPipeline(**a.components)
    v = WanVideoToVideoPipeline.from_pipe(a)
    assert b.transformer is a.transformer is v.transformer
    enable_taocache(a, config(window=[5, 6], ratio=1.0))
    enable_taocache(b, config(budget=0))
    enable_taocache(v, config(budget=0))
    for pipe, want in ((a, "window 5-6"), (b, "no skips"), (a, "window 5-6")):
        wan_call(pipe)
        assert want in capfd.readouterr().err
    emb, lat = torch.randn(1, 8, 16), torch.randn(1, 4, 2, 8, 8)
    v(prompt_embeds=emb, negative_prompt_embeds=emb, height=16, width=16, latents=lat, num_inference_steps=8,
      strength=1.0, output_type="latent")
    assert "no skips" in capfd.readouterr().err
    wan_call(a)
    assert "window 5-6" in capfd.readouterr().err
    for pipe in (a, b, v):
        disable_taocache(pipe)
    assert get_hook(a.transformer) is None


def test_the_transformer_outside_an_enabled_call_is_left_alone(capfd):
    """After an enabled pipe() call the transformer stayed hooked: a pipeline built from the same components without
    TaoCache (the user's full-step reference), or a direct call, was taken for the rest of the last generation: an
    error blaming the declared steps, or, after an interrupted cached run, outputs predicted from the other run
    (walkthrough, 2026-11-27)."""
    a = wan_pipe()
    reference = wan_call(a)
    b = WanPipeline(**a.components)  # no TaoCache on this one
    enable_taocache(a, config(window=[5, 6], ratio=1.0))
    try:
        wan_call(a)
        assert torch.equal(wan_call(b), reference)
        x, t, emb = torch.randn(1, 4, 2, 8, 8), torch.tensor([500.0]), torch.randn(1, 8, 16)
        hook = get_hook(a.transformer)
        counts = {k: list(v) for k, v in hook.counts.items()}
        direct = a.transformer(hidden_states=x, timestep=t, encoder_hidden_states=emb, return_dict=False)[0]
        assert hook.counts == counts
        disable_taocache(a)
        assert torch.equal(direct, a.transformer(hidden_states=x, timestep=t, encoder_hidden_states=emb,
                                                 return_dict=False)[0])
        enable_taocache(a, config(window=[5, 6], ratio=1.0))

        def stop_after_step_6(pipe, i, t, kwargs):  # interrupts inside the window: a skip was made, one is due
            pipe._interrupt = i >= 5
            return {}
        capfd.readouterr()
        wan_call(a, callback_on_step_end=stop_after_step_6)
        err = capfd.readouterr().err
        assert "returned after 12 of 16 denoiser calls" in err and "(stopped after 12 of 16 calls)" in err
        assert torch.equal(wan_call(b), reference)  # it used to get predicted outputs for its steps 7-8
        wan_call(a)
        err = capfd.readouterr().err
        assert "4 of 16 denoiser calls saved" in err and "is the declared number of steps right" not in err
    finally:
        disable_taocache(a)


def test_a_cached_call_that_raises_leaves_the_transformer_alone(capfd):
    """Ctrl-C inside a cached pipe() call: the transformer is still left alone afterwards (review, 2026-11-27: no
    test covered the exception path)."""
    a = wan_pipe()
    reference = wan_call(a)
    b = WanPipeline(**a.components)
    enable_taocache(a, config(window=[5, 6], ratio=1.0))
    try:
        def interrupt(pipe, i, t, kwargs):
            if i == 2:
                raise KeyboardInterrupt
            return {}
        with pytest.raises(KeyboardInterrupt):
            wan_call(a, callback_on_step_end=interrupt)
        assert get_hook(a.transformer).passthrough and get_hook(a.transformer).call_index is None
        assert torch.equal(wan_call(b), reference)
        import re

        capfd.readouterr()
        numbers = []
        for raises in (False, True, False):  # the call after one that raised is numbered after it too (walkthrough,
            try:                             # 2026-11-28: the raised call was not counted)
                wan_call(a, **({"callback_on_step_end": interrupt} if raises else {}))
            except KeyboardInterrupt:
                pass
            numbers += [int(n) for n in re.findall(r"taohooks: generation (\d+): ", capfd.readouterr().err)]
        assert len(numbers) == 2 and numbers[1] == numbers[0] + 2, numbers  # (the class counts every pipeline's calls)
    finally:
        disable_taocache(a)


@pytest.mark.parametrize("preview_enabled,at", [(True, 1), (False, 1), (False, STEPS - 1), (True, STEPS - 1)])
def test_a_pipeline_call_during_a_generation_runs_uncached_and_the_generation_goes_on(capfd, preview_enabled, at):
    """A step callback that runs another pipeline on the same transformer (a preview): it ran as the rest of the
    generation, which then ran uncached with another generation's savings in its summary (review, 2026-11-27); a
    preview pipeline never given enable_taocache had its calls counted as the generation's, which then raised at
    "call 17 of a generation declared as 8 steps" (docs check, 2026-11-28)."""
    import copy
    import re

    a = wan_pipe()
    full = wan_call(a)
    b = WanPipeline(**{**a.components, "scheduler": copy.deepcopy(a.scheduler)})  # (a shared scheduler breaks diffusers)
    enable_taocache(a, config(window=[5, 6], ratio=1.0))
    if preview_enabled:
        enable_taocache(b, config(window=[5, 6], ratio=1.0))
    try:
        cached = wan_call(a)
        previews = []

        def preview(pipe, i, t, kwargs):
            if i == at:
                previews.append(wan_call(b))
            return {}
        capfd.readouterr()
        assert torch.equal(wan_call(a, callback_on_step_end=preview), cached)
        assert torch.equal(previews[0], full)
        err = capfd.readouterr().err
        where = r"at call 4 of 16" if at == 1 else r"after its last call"  # (the last step's callback: review 16)
        assert re.search(rf"was called during generation \d+ on the same model \({where}\): that call runs "
                         "uncached", err)
        assert "4 of 16 denoiser calls saved" in err and "sampling loops" not in err
        if not preview_enabled:
            assert torch.equal(wan_call(b), full)  # (alone afterwards: the model left alone, as before)
    finally:
        disable_taocache(a)
        if preview_enabled:
            disable_taocache(b)


@pytest.mark.parametrize("enabled", [False, True])
def test_a_pipeline_called_from_another_thread_during_a_generation_is_refused_and_changes_nothing(enabled):
    """Taken for a preview, it switched off the running generation's caching for its whole run (the generation then
    said "interrupted?"), and, ending after it, left the hook on for every later call of that pipeline (review16,
    2026-11-28); an enabled one still did (review17). As before the preview check: the second thread's call is
    refused; the generation goes on."""
    import copy
    import threading

    a = wan_pipe()
    full = wan_call(a)
    b = WanPipeline(**{**a.components, "scheduler": copy.deepcopy(a.scheduler)})
    enable_taocache(a, config(window=[5, 6], ratio=1.0))
    if enabled:
        enable_taocache(b, config(window=[5, 6], ratio=1.0))
    try:
        cached = wan_call(a)
        running, done, raised = threading.Event(), threading.Event(), []

        def other():
            running.wait(60)
            try:
                wan_call(b)
            except RuntimeError as e:
                raised.append(str(e))
            finally:
                done.set()

        def meanwhile(pipe, i, t, kwargs):
            if i == 2:
                running.set()
                done.wait(60)
            return {}
        thread = threading.Thread(target=other)
        thread.start()
        assert torch.equal(wan_call(a, callback_on_step_end=meanwhile), cached)
        thread.join(60)
        assert len(raised) == 1 and "is called from a second thread while a generation runs in another" in raised[0]
        assert get_hook(a.transformer).passthrough and torch.equal(wan_call(b), cached if enabled else full)
    finally:
        disable_taocache(a)
        if enabled:
            disable_taocache(b)


def test_a_pipeline_without_a_transformer_called_during_a_generation_runs_as_it_is():
    """A pipeline of Wan2.2's low-noise expert alone (``transformer=None``) as a preview of a generation on another
    model: the preview check raised AttributeError on its ``None`` transformer (review16, 2026-11-28)."""
    a = wan_pipe()
    low = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=None,
                      transformer_2=wan_pipe().transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                      boundary_ratio=1.5)  # (every step on transformer_2)
    alone = wan_call(low)
    enable_taocache(a, config(window=[5, 6], ratio=1.0))
    try:
        cached, previews = wan_call(a), []

        def preview(pipe, i, t, kwargs):
            if i == 2:
                previews.append(wan_call(low))
            return {}
        assert torch.equal(wan_call(a, callback_on_step_end=preview), cached)
        assert torch.equal(previews[0], alone)
    finally:
        disable_taocache(a)


@pytest.mark.parametrize("input_arg", [0, "hidden_states"])
def test_easycache_finds_the_latent_diffusers_passes_by_keyword(input_arg):
    """diffusers' transformers take hidden_states= by keyword: EasyCache found no input and failed as if the model
    had returned nothing; input_arg="hidden_states" failed comparing an int with a str (walkthrough, 2026-11-27)."""
    from taohooks import DenoiserHook, LoopSpec
    from taohooks.caches.easycache import EasyCacheCallback

    pipe = wan_pipe()
    full = wan_call(pipe)
    easy = EasyCacheCallback(10.0, warmup_steps=2, input_arg=input_arg)
    with DenoiserHook(LoopSpec(STEPS, ("cond", "uncond")), [easy]).attach(pipe.transformer) as hook:
        hook.new_sample()
        cached = wan_call(pipe)
    assert easy.skipped > 0 and cached.shape == full.shape and torch.isfinite(cached).all()
    with pytest.raises(TypeError, match="EasyCache looks for the model's input latent, but this call has no keyword "
                                        "'latents'"):
        with DenoiserHook(LoopSpec(STEPS, ("cond", "uncond")), [EasyCacheCallback(1.0, input_arg="latents")]
                          ).attach(pipe.transformer) as hook:
            hook.new_sample()
            wan_call(pipe)


def test_an_unknown_pipeline_with_declared_guided_streams_runs_without_guidance(tmp_path, capfd):
    """A pipeline taohooks does not know (CogVideoX), declared as [uncond, cond] with split_batch, at
    guidance_scale 1: refused with "remove loop.streams", which then failed on the missing declaration; the one-stream
    call now runs, and a guided LUT is refused naming the guidance (walkthrough, 2026-11-27)."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                              out_channels=4, time_embed_dim=2, text_embed_dim=16, num_layers=1,
                                              sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
                                              temporal_compression_ratio=4, max_text_seq_length=8).eval()
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler(timestep_spacing="trailing"))
    pipe.set_progress_bar_config(disable=True)

    def call(guidance):
        emb = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(1))
        return pipe(prompt_embeds=emb, negative_prompt_embeds=emb, height=32, width=32, num_frames=9,
                    num_inference_steps=STEPS, guidance_scale=guidance, generator=torch.Generator().manual_seed(0),
                    max_sequence_length=8, output_type="latent").frames

    declared = {"integration": "diffusers", "loop": {"streams": ["uncond", "cond"], "split_batch": True}}
    enable_taocache(pipe, config_from_dict({**declared, "plan": {"window": [5, 6], "ratio": 1.0}}, "c.yaml"))
    try:
        call(1.0)
        assert f"2 of {STEPS} denoiser calls saved" in capfd.readouterr().err
        lut = tmp_path / "cog.safetensors"
        enable_taocache(pipe, config_from_dict({**declared, "lut": str(lut), "calibration": {"prompts": 1},
                                                "plan": {"budget": 2}}, "c.yaml"))
        call(6.0)  # calibrates the guided LUT
        with pytest.raises(Exception, match=r"has streams \(uncond, cond\), this run has \(cond\); a run without "
                                            "classifier-free guidance"):
            call(1.0)
    finally:
        disable_taocache(pipe)


@pytest.mark.parametrize("streams", [["positive", "negative"], ["cond", "uncond"]])
def test_declared_stream_names_of_the_user_s_own_run_without_guidance(monkeypatch, capfd, streams):
    """Stream names of the user's own are matched by position: at guidance 1 [positive, negative] was refused with
    "remove loop.streams (the integration knows them)", and removing it failed on the missing declaration (review,
    2026-11-28)."""
    from taohooks.integrations import diffusers as integration

    monkeypatch.setattr(integration, "SEQUENTIAL_CFG", ())  # (Wan taken for a pipeline taohooks does not know)
    pipe = wan_pipe()
    enable_taocache(pipe, config_from_dict({"integration": "diffusers", "loop": {"streams": streams},
                                            "plan": {"window": [5, 6], "ratio": 1.0}}, "c.yaml"))
    try:
        capfd.readouterr()
        wan_call(pipe, guidance_scale=1.0)
        assert f"2 of {STEPS} denoiser calls saved" in capfd.readouterr().err
    finally:
        disable_taocache(pipe)


def test_enable_checks_what_the_config_alone_says(tmp_path):
    """A config for another integration was taken without a word; a budget without a lut:, and a LUT that cannot be
    written, failed at the first pipe() call; a dict failed inside pathlib (walkthrough, 2026-11-27)."""
    from taohooks.config import ConfigError, TaoCacheConfig
    from taohooks.runtime.io import FileWriteError

    pipe = wan_pipe()
    with pytest.raises(IntegrationError, match="integration: latte is for another script's pipeline"):
        enable_taocache(pipe, config_from_dict({"integration": "latte"}, "latte.yaml"))
    with pytest.raises(ConfigError, match="plan.budget: choosing the steps to skip from a budget needs a calibration LUT"):
        enable_taocache(pipe, config_from_dict({"integration": "diffusers", "plan": {"budget": 2}}, "b.yaml"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(FileWriteError):
        enable_taocache(pipe, config_from_dict({"integration": "diffusers", "lut": str(blocker / "l.safetensors")},
                                               "w.yaml"))
    with pytest.raises(TypeError, match="config must be a TaoCacheConfig, a YAML path or a mapping, got int"):
        enable_taocache(pipe, 3)

    class MyPipeline(WanPipeline.__mro__[1]):  # a pipeline class taohooks does not know
        pass
    mine = MyPipeline()
    mine.transformer = pipe.transformer
    with pytest.raises(IntegrationError, match="loop.streams: MyPipeline is not a pipeline taohooks knows"):
        enable_taocache(mine, {"integration": "diffusers"})
    assert get_hook(pipe.transformer) is None
    full = wan_call(pipe)
    enable_taocache(pipe, {"integration": "diffusers", "plan": {"window": [5, 6], "ratio": 1.0}})
    try:
        assert not torch.equal(wan_call(pipe), full)
        enable_taocache(pipe, TaoCacheConfig())  # made in Python: integration "none"
        assert torch.equal(wan_call(pipe), full)
    finally:
        disable_taocache(pipe)


def test_video_to_video_declares_the_steps_its_strength_runs(tmp_path, capfd):
    """WanVideoToVideoPipeline runs the last int(steps * strength) steps: declared as 8 steps, each call was an
    aborted generation and calibration never finished."""
    from diffusers import WanVideoToVideoPipeline

    pipe = WanVideoToVideoPipeline.from_pipe(wan_pipe())
    cfg = config_from_dict({"integration": "diffusers", "lut": "lut.safetensors", "calibration": {"prompts": 1},
                            "plan": {"budget": 1, "min_step": 1}}, str(tmp_path / "c.yaml"))
    enable_taocache(pipe, cfg)
    emb, lat = torch.randn(1, 8, 16), torch.randn(1, 4, 2, 8, 8)
    for _ in range(2):
        pipe(prompt_embeds=emb, negative_prompt_embeds=emb, height=16, width=16, latents=lat, num_inference_steps=8,
             strength=0.5, output_type="latent")
    err = capfd.readouterr().err
    assert (tmp_path / "lut.safetensors").is_file() and "new generation began" not in err
    assert "1 of 4 steps skipped" in err
    disable_taocache(pipe)


def test_a_scheduler_swapped_between_calls_is_checked_against_the_lut(tmp_path):
    from diffusers import UniPCMultistepScheduler
    from taohooks.taocache.lut import LUTMismatchError

    cfg = config_from_dict({"integration": "diffusers", "lut": "lut.safetensors", "calibration": {"prompts": 1},
                            "plan": {"budget": 2, "min_step": 2}}, str(tmp_path / "c.yaml"))
    pipe = wan_pipe()
    enable_taocache(pipe, cfg)
    wan_call(pipe)  # calibrates with FlowMatchEuler
    pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    with pytest.raises(LUTMismatchError, match="scheduler: this run 'UniPCMultistepScheduler'"):
        wan_call(pipe)
    disable_taocache(pipe)


def test_a_noise_schedule_other_than_the_luts_is_refused(tmp_path):
    """The scheduler's betas were not part of the LUT's identity: a LUT calibrated at Latte's beta_end 0.02 skipped
    on a run at 0.012 without a word (Latte walkthrough, 2026-11-28). Settings a diffusers version adds or drops are
    no difference; calibration.accept: [noise_schedule] accepts them all."""
    from taohooks.taocache.cache import check_run
    from taohooks.taocache.identity import scheduler_identity
    from taohooks.taocache.lut import CalibrationLUT, LUTMismatchError
    from taohooks.runtime.loop import LoopSpec

    cfg = config_from_dict({"integration": "diffusers", "lut": "lut.safetensors", "calibration": {"prompts": 1},
                            "plan": {"budget": 2, "min_step": 2}}, str(tmp_path / "c.yaml"))
    pipe = wan_pipe()
    enable_taocache(pipe, cfg)
    try:
        wan_call(pipe)  # calibrates with FlowMatchEuler
        assert CalibrationLUT.load(tmp_path / "lut.safetensors").identity["noise_schedule.num_train_timesteps"] == 1000
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, num_train_timesteps=500)
        with pytest.raises(LUTMismatchError, match=r"noise_schedule.num_train_timesteps \(the scheduler's noise .*: "
                                                   r"this run 500, the LUT 1000.*accept: \[noise_schedule\]"):
            wan_call(pipe)
    finally:
        disable_taocache(pipe)
    ddim = scheduler_identity(DDIMScheduler(beta_end=0.012))
    assert ddim["noise_schedule.beta_end"] == 0.012 and ddim["noise_schedule.beta_schedule"] == "linear"
    loop = LoopSpec(steps=4, streams=("cond",))
    lut = CalibrationLUT.empty(loop, None, None, {k: v for k, v in ddim.items() if k != "scheduler.clip_sample"})
    cfg.calibration.auto = False  # (a LUT taken as it is: an unfinished one that calibrates accepts nothing)
    check_run(cfg, lut, loop, {**ddim, "scheduler.clip_sample": False})  # (a setting the LUT lacks)
    with pytest.raises(LUTMismatchError, match="beta_end .*: this run 0.02, the LUT 0.012"):
        check_run(cfg, lut, loop, scheduler_identity(DDIMScheduler()))
    cfg.calibration.accept = ["noise_schedule"]
    check_run(cfg, lut, loop, scheduler_identity(DDIMScheduler()))
    # the update's settings: scheduler.<name>, accepted with the scheduler class (PNDM has set_alpha_to_one False)
    cfg.calibration.accept = []
    with pytest.raises(LUTMismatchError, match=r"scheduler.set_alpha_to_one \(a setting of the scheduler's "
                                               r"sampling: .*\): this run False, the LUT True.*accept: \[scheduler\]"):
        check_run(cfg, lut, loop, scheduler_identity(DDIMScheduler(beta_end=0.012, set_alpha_to_one=False)))
    from diffusers import PNDMScheduler

    cfg.calibration.accept = ["scheduler"]
    check_run(cfg, lut, loop, scheduler_identity(PNDMScheduler(beta_end=0.012)))
    # another class's own timestep spacing ('linspace' for DPM-Solver, 'leading' for DDIM) is the sampler's, accepted
    # with it (it was a noise_schedule difference: review19); its betas are still checked
    from diffusers import DPMSolverMultistepScheduler

    check_run(cfg, lut, loop, scheduler_identity(DPMSolverMultistepScheduler(beta_end=0.012)))
    with pytest.raises(LUTMismatchError, match="noise_schedule.beta_end"):
        check_run(cfg, lut, loop, scheduler_identity(DPMSolverMultistepScheduler()))


def test_a_guidance_scale_other_than_the_luts_is_refused(tmp_path):
    """No integration recorded the guidance scale, which moves the trajectory the LUT describes (Wan2.2
    walkthrough, 2026-11-27)."""
    from taohooks.taocache.lut import CalibrationLUT, LUTMismatchError

    cfg = config_from_dict({"integration": "diffusers", "lut": "lut.safetensors", "calibration": {"prompts": 1},
                            "plan": {"budget": 2, "min_step": 2}}, str(tmp_path / "c.yaml"))
    pipe = wan_pipe()
    enable_taocache(pipe, cfg)
    try:
        wan_call(pipe, guidance_scale=5.0)  # calibrates
        assert CalibrationLUT.load(tmp_path / "lut.safetensors").identity["guide_scale"] == 5.0
        with pytest.raises(LUTMismatchError, match="guide_scale .*: this run 6.0, the LUT 5.0"):
            wan_call(pipe, guidance_scale=6.0)
        wan_call(pipe, guidance_scale=5.0)
    finally:
        disable_taocache(pipe)


def test_an_unfinished_lut_at_another_setting_is_not_offered_an_accept(tmp_path):
    """An unfinished LUT's first-call refusal advised calibration.accept: [guide_scale]; following it cost a second
    model load and a second refusal (an unfinished LUT is continued at the values it began with: Latte walkthrough,
    2026-11-28)."""
    from taohooks.taocache.lut import LUTMismatchError

    data = {"integration": "diffusers", "lut": "lut.safetensors", "calibration": {"prompts": 2},
            "plan": {"budget": 2, "min_step": 2}}
    pipe = wan_pipe()
    enable_taocache(pipe, config_from_dict(data, str(tmp_path / "c.yaml")))
    try:
        wan_call(pipe, guidance_scale=5.0)  # 1 of 2 prompts
        with pytest.raises(LUTMismatchError) as info:
            wan_call(pipe, guidance_scale=6.0)
    finally:
        disable_taocache(pipe)
    said = str(info.value)
    assert "this run 6.0, the LUT 5.0: an unfinished LUT (1 of 2 prompts) is continued at the values it began with" \
        in said and "calibration.accept: [" not in said, said
    accepting = config_from_dict({**data, "calibration": {"prompts": 2, "accept": ["guide_scale"]}},
                                 str(tmp_path / "c.yaml"))
    enable_taocache(pipe, accepting)
    try:
        with pytest.raises(LUTMismatchError, match="an unfinished LUT .* is continued at the values it began with"):
            wan_call(pipe, guidance_scale=6.0)
    finally:
        disable_taocache(pipe)


def test_a_scheduler_that_cannot_set_its_timesteps_is_said_as_such_for_batched_pipelines():
    """Latte's DPMSolverSinglestep at 20 steps (diffusers 0.24: "step must be greater than zero"): the refusal advised
    loop.steps, which Latte's loop never reads, and the same refusal came again (Latte walkthrough, 2026-11-28)."""
    from taohooks.launcher.integration import batched_cfg_loop, scheduler_calls

    class Broken:
        def set_timesteps(self, steps):
            raise ValueError("step must be greater than zero")

    with pytest.raises(IntegrationError, match=r"its set_timesteps\(20\) raised ValueError: step must be greater than "
                                               "zero. The pipeline calls it too, so the script fails the same way"):
        batched_cfg_loop(Broken(), 20, 7.5)
    with pytest.raises(IntegrationError, match=r"declare them in the config's loop: section \(loop.steps\)"):
        scheduler_calls(Broken(), 20)  # (the diffusers integration's sequential loop reads loop.steps)


def test_a_dynamic_shifting_scheduler_is_counted():
    from taohooks.launcher.integration import scheduler_calls

    assert scheduler_calls(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), 6) == 6


def test_wan22_guidance_pair_is_recorded_low_noise_first_as_wan_does():
    """diffusers' guidance_scale drives transformer (high-noise), guidance_scale_2 transformer_2 (low-noise); Wan's
    generate.py records (low-noise, high-noise): the same settings read [4, 3] and [3, 4] (review, 2026-11-27)."""
    from taohooks.integrations.diffusers import _identity

    pipe = wan22_pipe()
    identity = _identity({"self": pipe, "guidance_scale": 4.0, "guidance_scale_2": 3.0}, pipe.transformer)
    assert identity["guide_scale"] == [3.0, 4.0]
    assert _identity({"self": pipe, "guidance_scale": 4.0, "guidance_scale_2": None}, pipe.transformer)[
        "guide_scale"] == [4.0, 4.0]
    from taohooks.taocache.identity import describe_differences  # the mismatch says which is which (walkthrough)

    said = describe_differences({"guide_scale": [4.0, 4.0]}, identity, ["guide_scale"])
    assert "diffusers' [guidance_scale_2, guidance_scale]): this run [3.0, 4.0], the LUT [4.0, 4.0]" in said


# ---------------------------------------------------------------- VACE and Animate (walkthrough, 2026-11-28)
def test_animate_runs_each_segment_as_one_generation(tmp_path, capfd):
    """WanAnimatePipeline runs one sampling loop per segment of the pose video: a pose video of two segments crashed
    at the second loop's first call, even at budget 0, after recording the first segment into the LUT; each segment
    is now one generation (one LUT prompt while calibrating)."""
    pipe = animate_pipe()
    full = animate_call(pipe, pose_frames=9)
    enable_taocache(pipe, config(budget=0))
    try:
        assert torch.equal(animate_call(pipe, pose_frames=9), full)
        enable_taocache(pipe, config(window=[5, 6], ratio=1.0))
        skipped = animate_call(pipe, pose_frames=9)
        assert f"4 of {2 * STEPS} denoiser calls saved (25.0%) over 2 sampling loops" in capfd.readouterr().err
        assert not torch.equal(skipped, full) and float((skipped - full).norm() / full.norm()) < 0.5
        lut = tmp_path / "animate.safetensors"
        enable_taocache(pipe, config_from_dict({"integration": "diffusers", "lut": str(lut),
                                                "calibration": {"prompts": 2}, "plan": {"budget": 2}}, "c.yaml"))
        animate_call(pipe, pose_frames=9)  # two segments: two prompts
        from taohooks.taocache.lut import CalibrationLUT

        loaded = CalibrationLUT.load(lut)
        assert loaded.num_prompts == 2 and loaded.identity["frames"] == 5  # segment_frame_length
        capfd.readouterr()
        animate_call(pipe, segment=6)  # (the pipeline rounds 6 to 5 frames: the LUT's size; it was refused)
        assert f"2 of {STEPS} denoiser calls saved" in capfd.readouterr().err
    finally:
        disable_taocache(pipe)


def test_vace_reference_images_are_part_of_the_luts_size(tmp_path, capfd):
    """Each VACE reference image is one more latent frame at the same num_frames: a LUT calibrated without them was
    used without a word on a run with one (and a calibration generation with one was left out after its work)."""
    pipe = vace_pipe()
    lut = tmp_path / "vace.safetensors"
    enable_taocache(pipe, config_from_dict({"integration": "diffusers", "lut": str(lut), "calibration": {"prompts": 1},
                                            "plan": {"budget": 2}}, "c.yaml"))
    try:
        vace_call(pipe)
        from taohooks.taocache.lut import CalibrationLUT

        assert CalibrationLUT.load(lut).identity["reference_images"] == 0
        vace_call(pipe)  # the same size: skips
        assert f"4 of {2 * STEPS} denoiser calls saved" in capfd.readouterr().err
        with pytest.raises(Exception, match=r"reference_images"):
            vace_call(pipe, reference_images=frames(1, seed=7))
    finally:
        disable_taocache(pipe)


def test_vace_with_two_transformers_guards_its_switch(capfd):
    pipe = vace_pipe(two=True)
    full = vace_call(pipe)
    enable_taocache(pipe, config(budget=0))
    try:
        assert torch.equal(vace_call(pipe), full)
        enable_taocache(pipe, config(window=[5, 6], ratio=1.0))
        vace_call(pipe)
        assert f"4 of {2 * STEPS} denoiser calls saved" in capfd.readouterr().err
    finally:
        disable_taocache(pipe)


def test_a_stream_the_declared_loop_does_not_list_is_refused_at_its_first_call(tmp_path, capfd):
    """Declared [cond] on a pipeline that also calls in cache_context("uncond"): its uncond calls were counted as the
    next cond steps, and a LUT of cond and uncond outputs as consecutive steps was written before the error. A
    batched loop declared for a pipeline that calls one stream at a time blamed the streams' order."""
    from taohooks.integrations import diffusers as integration

    pipe = wan_pipe()
    lut = tmp_path / "wan.safetensors"
    original = integration.SEQUENTIAL_CFG
    integration.SEQUENTIAL_CFG = ()  # (as a pipeline taohooks does not know)
    try:
        enable_taocache(pipe, config_from_dict({"integration": "diffusers", "loop": {"streams": ["cond"]},
                                                "lut": str(lut), "calibration": {"prompts": 1},
                                                "plan": {"budget": 2}}, "c.yaml"))
        with pytest.raises(IntegrationError, match=r"cache_context\('uncond'\) where the loop \(8 steps x 1 "
                                                   r"call\(s\) \(cond\)\) expects the call of cond, which step 0 made "
                                                   r"in cache_context\('cond'\): the pipeline makes more calls"):
            wan_call(pipe)
        assert not lut.exists()
        # the streams under names of the user's own, in the pipeline's order: each position keeps its name (review,
        # 2026-11-28: refused once cond/uncond were taken for stream names)
        own_names = {"integration": "diffusers", "loop": {"streams": ["positive", "negative"]},
                     "plan": {"window": [5, 6], "ratio": 1.0}}
        enable_taocache(pipe, config_from_dict(own_names, "c.yaml"))
        capfd.readouterr()
        wan_call(pipe)
        assert f"4 of {2 * STEPS} denoiser calls saved" in capfd.readouterr().err
        enable_taocache(pipe, config_from_dict({"integration": "diffusers", "loop": {
            "streams": ["uncond", "cond"], "split_batch": True}, "plan": {"window": [5, 6], "ratio": 1.0}}, "c.yaml"))
        with pytest.raises(IntegrationError, match=r"one stream per call, where the declared loop .* expects one "
                                                   "batched call of uncond/cond; remove loop.split_batch"):
            wan_call(pipe)
        # declared [cond, uncond] at a guidance scale of 1: cond alone, without a word about the declaration
        enable_taocache(pipe, config_from_dict({"integration": "diffusers", "loop": {"streams": ["cond", "uncond"]},
                                                "plan": {"window": [5, 6], "ratio": 1.0}}, "c.yaml"))
        capfd.readouterr()
        wan_call(pipe, guidance_scale=1.0)
        err = capfd.readouterr().err
        assert f"2 of {STEPS} denoiser calls saved" in err and "overrides" not in err
    finally:
        integration.SEQUENTIAL_CFG = original
        disable_taocache(pipe)


def test_a_third_call_per_step_under_a_name_of_the_pipeline_s_own_is_refused_at_once():
    """LTX-2's spatio-temporal guidance: a batched cond_uncond call, then uncond_stg, per step; declared as the one
    batched call, the second was taken for the next step's and a LUT of both written before the error (review,
    2026-11-28: only cond/uncond names were checked)."""
    import contextlib

    from taohooks.integrations.diffusers import ContextStreamCheck
    from taohooks.runtime.hook import DenoiserHook
    from taohooks.runtime.loop import LoopSpec

    class Model(torch.nn.Module):  # (a transformer with diffusers' cache_context)
        def forward(self, x, timestep=None):
            return x * 0.5

        @contextlib.contextmanager
        def cache_context(self, name):
            yield

    model = Model()
    calls = []

    def step(names):
        for name in names:
            with model.cache_context(name):
                calls.append(name)
                model(torch.ones(2, 3), timestep=torch.tensor([900.0]))

    with DenoiserHook(LoopSpec(4, ("uncond", "cond"), split_batch=True), [ContextStreamCheck(model)]).attach(model) \
            as hook:
        hook.new_sample()
        step(["cond_uncond"] * 4)  # the batched calls alone: a name of the pipeline's own, the same every step
        hook.new_sample()
        with pytest.raises(IntegrationError, match=r"cache_context\('uncond_stg'\) where the loop .* "
                                                   r"which step 0 made in cache_context\('cond_uncond'\)"):
            step(["cond_uncond", "uncond_stg"])
    assert calls == ["cond_uncond"] * 5 + ["uncond_stg"]
    # a batched pipeline declared as two calls a step: its one call per step in the same name at both positions
    # (review, 2026-11-28: each generation ended "interrupted?" and calibrated again)
    with DenoiserHook(LoopSpec(4, ("cond", "uncond")), [ContextStreamCheck(model)]).attach(model) as hook:
        hook.new_sample()
        with pytest.raises(IntegrationError, match=r"cache_context\('cond_uncond'\) where the loop .* expects the "
                                                   r"call of uncond, and its call of cond was in "
                                                   r"cache_context\('cond_uncond'\) too: the pipeline makes fewer"):
            step(["cond_uncond"] * 2)


@pytest.mark.parametrize("window", [[5, 6], [4, 5]])
def test_guidance_cut_off_mid_generation_is_refused_as_such_and_a_script_s_wrapper_is_put_back(capfd, window):
    """A step callback turning CFG off at step 3 (as diffusers' CFG cut-off callbacks do): refused, naming fewer calls
    per step, not a declaration to fix; the check put back no cache_context the script had set on the transformer.
    Where TaoCache skipped the first misnumbered call (window 4-5), the check, behind it, never saw it: nothing was
    refused and the cond calls of steps 5 and 7 were predicted from the uncond stream (review, 2026-11-28)."""
    pipe = wan_pipe()
    seen = []
    inner = pipe.transformer.cache_context

    def mine(name, **kwargs):
        seen.append(name)
        return inner(name, **kwargs)

    pipe.transformer.cache_context = mine  # (a wrapper of the script's own)

    def cut_off(p, i, t, kwargs):
        if i == 3:
            p._guidance_scale = 1.0
        return {}

    enable_taocache(pipe, config(window=window, ratio=1.0))
    try:
        with pytest.raises(IntegrationError, match=r"cache_context\('cond'\) where the loop \(8 steps x 2 "
                                                   r"call\(s\) \(cond, uncond\)\) expects the call of uncond, and its "
                                                   r"call of cond was in cache_context\('cond'\) too: the pipeline"):
            wan_call(pipe, callback_on_step_end=cut_off)
    finally:
        disable_taocache(pipe)
    assert pipe.transformer.__dict__.get("cache_context") is mine and seen[:2] == ["cond", "uncond"]


def test_a_cache_context_the_script_patches_on_the_class_after_enabling_runs_and_is_checked():
    """The check wrapped the class's ``cache_context`` as it was at enabling, on the instance: a patch the script then
    put on the class never ran while TaoCache was enabled (review16, 2026-11-28)."""
    pipe = wan_pipe()
    cls = type(pipe.transformer)
    old, seen = cls.cache_context, []

    def mine(self, name, **kwargs):
        seen.append(name)
        return old(self, name, **kwargs)

    enable_taocache(pipe, config(window=[5, 6], ratio=1.0))
    try:
        cached = wan_call(pipe)
        cls.cache_context = mine  # (as a library patching diffusers would)
        assert torch.equal(wan_call(pipe), cached) and seen == ["cond", "uncond"] * STEPS

        def switch_on(p, i, t, kwargs):
            if i == 3:
                p._guidance_scale = 5.0
            return {}

        with pytest.raises(IntegrationError, match=r"guidance switched on"):  # (still checked)
            wan_call(pipe, guidance_scale=1.0, callback_on_step_end=switch_on)
    finally:
        disable_taocache(pipe)
        cls.cache_context = old
    assert "cache_context" not in pipe.transformer.__dict__


def test_a_cache_context_property_the_check_cannot_wrap_is_said(capfd):
    """A class whose cache_context is a property (a data descriptor, which wins over the check's instance
    attribute): the stream check was silently off (review17, 2026-11-28)."""
    import contextlib

    from taohooks.integrations.diffusers import ContextStreamCheck
    from taohooks.runtime.hook import DenoiserHook
    from taohooks.runtime.loop import LoopSpec

    class Model(torch.nn.Module):
        def forward(self, x, timestep=None):
            return x * 0.5

        @property
        def cache_context(self):
            return contextlib.nullcontext

    model = Model()
    with DenoiserHook(LoopSpec(4, ("cond", "uncond")), [ContextStreamCheck(model)]).attach(model):
        pass
    assert "Model.cache_context is a data descriptor (a property?) that an instance attribute cannot wrap: the " \
           "check of each call's cache_context stream name is off for this model" in capfd.readouterr().err
    assert "cache_context" not in model.__dict__


def test_guidance_switched_on_mid_generation_is_named_as_such():
    """Its refusal advised declaring loop.streams: [cond, uncond], which gave the same refusal (review, 2026-11-28)."""
    pipe = wan_pipe()

    def switch_on(p, i, t, kwargs):
        if i == 3:
            p._guidance_scale = 5.0
        return {}

    enable_taocache(pipe, config(window=[5, 6], ratio=1.0))
    try:
        with pytest.raises(IntegrationError, match=r"more calls per step than the loop counts: guidance switched on "
                                                   r"for some steps"):
            wan_call(pipe, guidance_scale=1.0, callback_on_step_end=switch_on)
    finally:
        disable_taocache(pipe)


def test_guidance_off_for_the_last_step_is_named_among_the_causes(capfd):
    """No later call can show that the last step made fewer calls: the generation ends one call short, which was said
    as "interrupted" alone (review, 2026-11-28)."""
    pipe = wan_pipe()

    def cut_off(p, i, t, kwargs):
        if i == STEPS - 2:
            p._guidance_scale = 1.0
        return {}

    enable_taocache(pipe, config(window=[4, 5], ratio=1.0))
    try:
        capfd.readouterr()
        wan_call(pipe, callback_on_step_end=cut_off)
        err = capfd.readouterr().err
        assert f"returned after {2 * STEPS - 1} of {2 * STEPS} denoiser calls" in err
        assert ("or made fewer calls per step in its last steps than the loop counts (guidance switched off "
                "there)") in err
    finally:
        disable_taocache(pipe)


def test_a_wrapper_the_script_sets_between_generations_is_checked_through_and_kept():
    """A cache_context wrapper set after the first cached generation replaced the check's: the check was off without
    a word, and disable_taocache deleted the script's wrapper or put an older one back (review, 2026-11-28)."""
    pipe = wan_pipe()
    enable_taocache(pipe, config(window=[5, 6], ratio=1.0))
    seen = []
    try:
        wan_call(pipe)
        inner = pipe.transformer.cache_context

        def mine(name, **kwargs):
            seen.append(name)
            return inner(name, **kwargs)

        pipe.transformer.cache_context = mine

        def cut_off(p, i, t, kwargs):
            if i == 3:
                p._guidance_scale = 1.0
            return {}

        with pytest.raises(IntegrationError, match=r"cache_context\('cond'\) where the loop"):
            wan_call(pipe, callback_on_step_end=cut_off)
        assert seen[:2] == ["cond", "uncond"]  # (the script's wrapper ran, inside the check's)
    finally:
        disable_taocache(pipe)
    assert pipe.transformer.__dict__.get("cache_context") is mine


def test_a_call_refused_at_its_start_is_counted(tmp_path, capfd):
    """A call refused before its loop (a LUT of another guidance scale) was not counted: the next call's messages
    named the number before it (review, 2026-11-28)."""
    import re

    pipe = wan_pipe()
    enable_taocache(pipe, config_from_dict({"integration": "diffusers", "lut": str(tmp_path / "w.safetensors"),
                                            "calibration": {"prompts": 1}, "plan": {"budget": 2}}, "c.yaml"))
    try:
        wan_call(pipe)
        first = int(re.findall(r"taohooks: generation (\d+): ", capfd.readouterr().err)[-1])
        with pytest.raises(Exception, match="guide"):
            wan_call(pipe, guidance_scale=3.0)  # (the LUT's: 5)
        wan_call(pipe)
        assert f"taohooks: generation {first + 2}: " in capfd.readouterr().err
    finally:
        disable_taocache(pipe)


@pytest.mark.parametrize("stop,said", [(KeyboardInterrupt, "Ctrl-C (KeyboardInterrupt)"), ("sigterm", "SIGTERM")])
def test_a_generation_stopped_between_model_calls_names_what_stopped_it(tmp_path, capfd, stop, said):
    """Ctrl-C or SIGTERM in a step callback (between two model calls) was said as "WanPipeline.__call__ raised"
    (review16, 2026-11-28)."""
    from taohooks.runtime.interrupt import Terminated

    pipe = wan_pipe()

    def stopping(p, i, t, kwargs):
        if i == 3:
            raise Terminated if stop == "sigterm" else stop
        return {}

    enable_taocache(pipe, config_from_dict({"integration": "diffusers", "lut": str(tmp_path / "lut.safetensors"),
                                            "calibration": {"prompts": 2}}, "test.yaml"))
    try:
        with pytest.raises(KeyboardInterrupt):
            wan_call(pipe, callback_on_step_end=stopping)
    finally:
        disable_taocache(pipe)
    assert (f"stopped before its last call ({said} in diffusers.pipelines.wan.pipeline_wan.WanPipeline.__call__, "
            "between model calls)") in capfd.readouterr().err  # (its number counts the class's generations)


def test_an_architecture_that_differs_with_the_frame_count_says_why():
    """Latte's sample_t2x.py builds LatteT2V with the YAML's video_length, which is in the config the architecture
    fingerprint hashes: another frame count read as another architecture, and the advice to accept architecture
    would also accept another model (Latte walkthrough, 2026-11-28)."""
    from taohooks.taocache.identity import describe_differences

    recorded, run = {"architecture": "a" * 12, "frames": 4}, {"architecture": "b" * 12, "frames": 8}
    said = describe_differences(recorded, run, ["architecture", "frames"])
    assert "builds its transformer with the YAML's video_length, so another frame count changes it too" in said
    assert "accepting architecture accepts another model as well" in said
    # said also where frames is accepted (review19), not where the frame count is the same
    assert "video_length" in describe_differences(recorded, run, ["architecture"])
    same = {"architecture": "b" * 12, "frames": 4}
    assert describe_differences(recorded, same, ["architecture"]).startswith("architecture: this run 'bbb")


def test_a_lut_of_the_previous_taohooks_is_said_to_lack_the_schedule_groups(tmp_path, capfd):
    """A LUT recorded before noise_schedule.* / scheduler.* existed: the notice said it records no "scheduler" (it does:
    the class) and "this run's (noise_schedule, scheduler)" without values (review19, 2026-11-28)."""
    import numpy as np

    from taohooks.runtime import messages
    from taohooks.runtime.loop import LoopSpec
    from taohooks.taocache.cache import check_run
    from taohooks.taocache.identity import scheduler_identity
    from taohooks.taocache.lut import CalibrationLUT

    run = scheduler_identity(DDIMScheduler())
    old = {k: v for k, v in run.items() if "." not in k}
    loop = LoopSpec(steps=4, streams=("cond",))
    CalibrationLUT.empty(loop, None, None, old).save(tmp_path / "lut.safetensors")
    cfg = config_from_dict({"lut": "lut.safetensors", "calibration": {"auto": False}}, str(tmp_path / "c.yaml"))
    messages.forget("unrecorded")
    check_run(cfg, CalibrationLUT.load(tmp_path / "lut.safetensors"), loop, run)
    err = capfd.readouterr().err
    assert "records no noise_schedule.*, scheduler.* of its calibrating run, so they cannot be checked" in err, err
    # numpy values (a scheduler built in Python) as the numbers a JSON config holds: no false difference
    betas = np.linspace(1e-4, 0.02, 1000)
    built = scheduler_identity(DDIMScheduler(trained_betas=betas))
    assert built == scheduler_identity(DDIMScheduler.from_config(DDIMScheduler(trained_betas=betas).config))
    assert built["noise_schedule.trained_betas"] != scheduler_identity(DDIMScheduler(
        trained_betas=np.concatenate([betas, betas])))["noise_schedule.trained_betas"]
