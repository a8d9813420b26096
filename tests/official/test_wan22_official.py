"""The ``wan22`` integration on Wan2.2's own ``generate`` loops (opt-in: TAOHOOKS_WAN22_REPO).

The checkout's code runs unmodified: ``wan.text2video.WanT2V.generate`` (T2V-A14B),
``wan.image2video.WanI2V.generate`` (I2V-A14B) and ``wan.textimage2video.WanTI2V.generate``
(TI2V-5B, image-to-video mode), with tiny random ``wan.modules.model.WanModel`` experts on CPU.
What the test supplies instead of checkpoints: a stub T5 (a callable returning fixed random
embeddings), a stub VAE (``encode`` pools the frames to the latent shape, ``decode`` returns the
latents) and an SDPA stand-in for ``wan.modules.model.flash_attention`` (flash-attn needs CUDA and
half precision); ``torch.cuda.current_device`` answers 0 while ``wan.modules.t5`` is imported (a
default argument evaluated at class definition; the T5 itself is never built).
The pipeline objects are made with ``object.__new__`` (their ``__init__`` loads checkpoints) and
given the attributes ``__init__`` would set. ``wan/__init__.py`` is bypassed (it imports every
pipeline: S2V's decord/librosa, Animate's cv2/peft, ...); when they are not installed, ``ftfy``
(imported by the T5 tokenizer module), ``imageio`` (by ``wan.utils.utils``) and
``torchvision.transforms.functional`` (``to_tensor``, the only function the I2V/TI2V paths call) are
stubbed, after diffusers and transformers were imported (transformers probes for torchvision).

Calls are counted per expert without touching the experts' forward: a forward pre-hook on each
expert module sees every call the loop makes (computed or answered from the cache, both pass
through ``Module.__call__``), a forward hook on its ``patch_embedding`` only the computed ones.
"""
import sys
import types
import warnings

import pytest

from official_support import (checkout, config, isolated_imports, package_without_init, sdpa_flash_attention,
                              stub_module, summaries)

WAN22 = checkout("TAOHOOKS_WAN22_REPO", "wan/textimage2video.py")

import diffusers  # noqa: E402,F401  (before any stub: diffusers probes optional packages at import)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402,F401  (resolved before the torchvision stub)

import taohooks.integrations.wan22 as wan22_integration  # noqa: E402
from taohooks.config import config_from_dict  # noqa: E402
from taohooks.runtime.hook import get_hook  # noqa: E402
from taohooks.taocache.lut import CalibrationLUT  # noqa: E402
from taohooks.taocache.cache import expert_guard  # noqa: E402

TEXT_DIM, TEXT_LEN = 32, 16
PROMPT = "a tiny test prompt"
# T2V-A14B: 12 steps at the task's shift 12 (unipc): timesteps 999 ... 895 (steps 0-7) are at least
# 875 (boundary 0.875): high-noise expert; 856, 799, 705, 521 (steps 8-11): low-noise expert.
T2V = {"steps": 12, "shift": 12.0, "boundary": 0.875, "first_low": 8}
# I2V-A14B: 12 steps at the task's shift 5: 999 ... 908 (steps 0-4) >= 900, then 874 ... 312 (5-11).
I2V = {"steps": 12, "shift": 5.0, "boundary": 0.900, "first_low": 5}
TI2V_STEPS = 10
BUDGET = 2  # skipped steps once calibrated: 2 steps, 4 calls
STUBS = ("ftfy", "imageio", "torchvision", "torchvision.transforms", "torchvision.transforms.functional")


def to_tensor(image):
    """``torchvision.transforms.functional.to_tensor`` for an RGB PIL image: [3, H, W] in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def _stub_imports():
    stub_module("ftfy", fix_text=lambda text: text)  # each only when the real package is not installed
    stub_module("imageio")
    stub_module("torchvision")
    stub_module("torchvision.transforms")
    stub_module("torchvision.transforms.functional", to_tensor=to_tensor)
    for name in STUBS:
        parent, _, child = name.rpartition(".")
        if parent and getattr(sys.modules.get(name), "__taohooks_stub__", False):
            setattr(sys.modules[parent], child, sys.modules[name])


def _drop_stubs():
    for name in STUBS:
        if getattr(sys.modules.get(name), "__taohooks_stub__", False):
            del sys.modules[name]


@pytest.fixture
def wan22():
    """Imports of the checkout's ``wan`` package (``__init__`` bypassed); dropped afterwards."""
    with isolated_imports([WAN22], ["wan"]):
        _stub_imports()
        package_without_init("wan", WAN22 / "wan")
        for sub in ("modules", "utils", "distributed"):
            package_without_init(f"wan.{sub}", WAN22 / "wan" / sub)
        try:
            yield types.SimpleNamespace(load=load_wan22)
        finally:
            wan22_integration.uninstall()
            _drop_stubs()


def load_wan22():
    """Import the three pipeline modules (after the test installed the integration, or not)."""
    import importlib
    from unittest import mock

    # wan/modules/t5.py evaluates ``torch.cuda.current_device()`` as a default argument when the
    # class is defined; the T5 is never built here (stub text encoder), so device 0 is a placeholder.
    with warnings.catch_warnings(), mock.patch.object(torch.cuda, "current_device", lambda: 0):
        warnings.simplefilter("ignore")  # torch.cuda.amp deprecation
        modules = types.SimpleNamespace(**{name: importlib.import_module(f"wan.{name}")
                                           for name in ("text2video", "image2video", "textimage2video")})
        modules.model = importlib.import_module("wan.modules.model")
    modules.model.flash_attention = sdpa_flash_attention
    return modules


def tiny_model(model_module, seed, model_type="t2v", in_dim=4, out_dim=4):
    torch.manual_seed(seed)
    model = model_module.WanModel(model_type=model_type, dim=64, ffn_dim=128, freq_dim=32, text_dim=TEXT_DIM,
                                  num_heads=4, num_layers=2, text_len=TEXT_LEN, in_dim=in_dim, out_dim=out_dim)
    nn.init.xavier_uniform_(model.head.head.weight)  # init_weights zeroes it: the output would be 0
    return model.eval().requires_grad_(False)


def text_encoder(texts, device):
    out = []
    for text in texts:
        g = torch.Generator().manual_seed(sum(map(ord, text)) % (2 ** 31))
        out.append(torch.randn(TEXT_LEN - 4, TEXT_DIM, generator=g).to(device))
    return out


class StubVAE:
    """``vae.model.z_dim``, ``encode`` (frames average-pooled to the latent grid, channels repeated
    to ``z_dim``) and ``decode`` (the latents themselves)."""

    def __init__(self, z_dim, stride):
        self.model = types.SimpleNamespace(z_dim=z_dim)
        self.stride = stride

    def encode(self, videos):
        out = []
        for video in videos:  # [3, F, H, W]
            frames, h, w = video.shape[1:]
            size = ((frames - 1) // self.stride[0] + 1, h // self.stride[1], w // self.stride[2])
            pooled = F.adaptive_avg_pool3d(video[None].float(), size)[0]
            out.append(pooled.repeat(-(-self.model.z_dim // 3), 1, 1, 1)[:self.model.z_dim])
        return out

    def decode(self, zs):
        return [z.detach().clone() for z in zs]


def _pipe(cls, vae, stride):
    """A pipeline object with the attributes its ``__init__`` sets, without loading checkpoints."""
    pipe = object.__new__(cls)
    pipe.device = torch.device("cpu")
    pipe.config = None
    pipe.rank = 0
    pipe.t5_cpu = True
    pipe.init_on_cpu = False
    pipe.num_train_timesteps = 1000
    pipe.param_dtype = torch.bfloat16
    pipe.text_encoder = text_encoder
    pipe.vae_stride = stride
    pipe.patch_size = (1, 2, 2)
    pipe.vae = vae
    pipe.sp_size = 1
    pipe.sample_neg_prompt = "negative"
    return pipe


def t2v_pipe(wan):
    pipe = _pipe(wan.text2video.WanT2V, StubVAE(4, (4, 8, 8)), (4, 8, 8))
    pipe.boundary = T2V["boundary"]
    pipe.high_noise_model = tiny_model(wan.model, seed=0)
    pipe.low_noise_model = tiny_model(wan.model, seed=1)
    return pipe


def i2v_pipe(wan):
    # y = mask (4 channels) + the VAE's 16 latent channels, next to the 16 noise channels I2V hard-codes
    pipe = _pipe(wan.image2video.WanI2V, StubVAE(16, (4, 8, 8)), (4, 8, 8))
    pipe.boundary = I2V["boundary"]
    pipe.high_noise_model = tiny_model(wan.model, seed=2, model_type="i2v", in_dim=36, out_dim=16)
    pipe.low_noise_model = tiny_model(wan.model, seed=3, model_type="i2v", in_dim=36, out_dim=16)
    return pipe


def ti2v_pipe(wan):
    pipe = _pipe(wan.textimage2video.WanTI2V, StubVAE(8, (4, 16, 16)), (4, 16, 16))
    pipe.model = tiny_model(wan.model, seed=4, model_type="ti2v", in_dim=8, out_dim=8)
    return pipe


def image(size=64):
    g = np.random.default_rng(0)
    return Image.fromarray(g.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def run_t2v(pipe, seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe.generate(PROMPT, size=(64, 64), frame_num=9, shift=T2V["shift"], sample_solver="unipc",
                             sampling_steps=T2V["steps"], guide_scale=(3.0, 4.0), seed=seed, offload_model=False)


def run_i2v(pipe, seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe.generate(PROMPT, image(), max_area=64 * 64, frame_num=5, shift=I2V["shift"],
                             sample_solver="unipc", sampling_steps=I2V["steps"], guide_scale=(3.5, 3.5), seed=seed,
                             offload_model=False)


def run_ti2v(pipe, seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe.generate(PROMPT, img=image(128), max_area=128 * 128, frame_num=9, shift=5.0,
                             sample_solver="unipc", sampling_steps=TI2V_STEPS, guide_scale=5.0, seed=seed,
                             offload_model=False)


class CallLog:
    """Every call of the given experts, in order: ``[expert, timestep (t.max()), per-token t, computed]``."""

    def __init__(self, **experts):
        self.calls = []
        self._handles = []
        for name, module in experts.items():
            self._handles.append(module.register_forward_pre_hook(self._called(name), with_kwargs=True))
            self._handles.append(module.patch_embedding.register_forward_hook(self._computed))

    def _called(self, name):
        def hook(module, args, kwargs):
            t = kwargs["t"]
            self.calls.append([name, float(t.max()), t.detach().clone(), False])
        return hook

    def _computed(self, module, args, output):
        self.calls[-1][3] = True

    def clear(self):
        self.calls.clear()

    def close(self):
        for handle in self._handles:
            handle.remove()

    def computed(self, expert):
        return sum(1 for name, _, _, done in self.calls if name == expert and done)

    def skipped(self):
        """``(step, expert, timestep)`` of each call that was not computed (two calls per step)."""
        return [(i // 2, name, t) for i, (name, t, _, done) in enumerate(self.calls) if not done]


def install(plan):
    wan22_integration.install(config("wan22", plan=plan))


def calibrating(tmp_path, name, **plan):
    return config_from_dict({"integration": "wan22", "model_id": f"tiny-{name}",
                             "lut": str(tmp_path / f"{name}.safetensors"), "calibration": {"prompts": 1},
                             "plan": {"budget": BUDGET, **plan}}, str(tmp_path / f"{name}.yaml"))


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_the_integrations_timesteps_are_the_official_schedulers(wan22):
    """``wan_timesteps`` (what places the expert switch for the plan, before the experts load) against the
    timesteps Wan2.2's generate gets from its own schedulers, both solvers, steps and shifts around the defaults."""
    from wan.utils.fm_solvers import FlowDPMSolverMultistepScheduler, get_sampling_sigmas, retrieve_timesteps
    from wan.utils.fm_solvers_unipc import FlowUniPCMultistepScheduler

    for steps in (4, 10, 20, 27, 40, 50):
        for shift in (1.0, 3.0, 5.0, 8.0, 12.0, 17.5):
            unipc = FlowUniPCMultistepScheduler(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
            unipc.set_timesteps(steps, device="cpu", shift=shift)
            dpm = FlowDPMSolverMultistepScheduler(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
            dpm_timesteps, _ = retrieve_timesteps(dpm, device="cpu", sigmas=get_sampling_sigmas(steps, shift))
            assert wan22_integration.wan_timesteps(steps, shift, "unipc") == [float(t) for t in unipc.timesteps]
            assert wan22_integration.wan_timesteps(steps, shift, "dpm++") == [float(t) for t in dpm_timesteps]


def test_t2v_a14b_budget_zero_is_the_original_loop(wan22, capfd):
    install(plan={"budget": 0})  # before the import: the post-import hook patches WanT2V
    wan = wan22.load()
    for cls in (wan.text2video.WanT2V, wan.image2video.WanI2V, wan.textimage2video.WanTI2V):
        assert getattr(cls.generate, "_taohooks_patch", None) is not None, cls.__name__
    pipe = t2v_pipe(wan)
    log = CallLog(high=pipe.high_noise_model, low=pipe.low_noise_model)
    out = run_t2v(pipe)
    err = capfd.readouterr().err
    calls = 2 * T2V["steps"]
    assert f"0 of {calls} denoiser calls saved" in err and summaries(err) == [(0, calls, None)]
    first_low = T2V["first_low"]
    assert [c[0] for c in log.calls] == ["high"] * 2 * first_low + ["low"] * 2 * (T2V["steps"] - first_low)
    assert all(c[3] for c in log.calls)
    hook = get_hook(pipe.high_noise_model)
    assert hook is not None and get_hook(pipe.low_noise_model) is hook  # one hook numbers both experts' calls
    wan22_integration.uninstall()
    assert getattr(wan.text2video.WanT2V.generate, "_taohooks_patch", None) is None
    for expert in (pipe.high_noise_model, pipe.low_noise_model):
        assert get_hook(expert) is None and "forward" not in vars(expert)
    log.clear()
    plain = run_t2v(pipe)
    assert summaries(capfd.readouterr().err) == []
    assert len(log.calls) == calls
    log.close()
    assert out.shape == (4, 3, 8, 8) and torch.equal(out, plain)


def test_t2v_a14b_calibrates_then_skips_in_the_low_noise_expert(wan22, capfd, tmp_path):
    wan = wan22.load()
    pipe = t2v_pipe(wan)
    steps, first_low = T2V["steps"], T2V["first_low"]
    plain = run_t2v(pipe)
    # min_step at the first low-noise step: the guard (its first two steps) leaves steps 10-11
    wan22_integration.install(calibrating(tmp_path, "t2v", min_step=first_low))
    log = CallLog(high=pipe.high_noise_model, low=pipe.low_noise_model)
    calibrated = run_t2v(pipe)
    err = capfd.readouterr().err
    assert summaries(err) == [(0, 2 * steps, None)] and "[calibrating, all steps computed]" in err
    assert "calibration complete with generation 1" in err  # said by the generation that completed it, once
    assert torch.equal(calibrated, plain)
    lut = CalibrationLUT.load(tmp_path / "t2v.safetensors")
    assert lut.steps == steps and lut.identity["expert_boundary"] == 875.0
    assert lut.identity["experts"] == ["high_noise_model", "low_noise_model"] and lut.identity["shift"] == 12.0
    assert expert_guard(lut) == (first_low, first_low + 1)
    assert [float(t) for t in lut.timesteps] == [c[1] for c in log.calls[::2]]
    log.clear()
    out = run_t2v(pipe)
    err = capfd.readouterr().err
    assert "calibration complete" not in err and summaries(err) == [(2 * BUDGET, 2 * steps, None)]
    skipped = log.skipped()
    assert [(step, expert) for step, expert, _ in skipped] == [(10, "low"), (10, "low"), (11, "low"), (11, "low")]
    assert all(t < 875.0 for _, _, t in skipped)
    assert log.computed("high") == 2 * first_low  # every high-noise call computed
    assert log.computed("low") == 2 * (steps - first_low) - 2 * BUDGET
    log.close()
    assert torch.isfinite(out).all() and not torch.equal(out, plain) and rel(out, plain) < 0.5


def test_i2v_a14b_budget_zero_then_calibrated_skips(wan22, capfd, tmp_path):
    install(plan={"budget": 0})
    wan = wan22.load()
    pipe = i2v_pipe(wan)
    steps, first_low = I2V["steps"], I2V["first_low"]
    log = CallLog(high=pipe.high_noise_model, low=pipe.low_noise_model)
    out = run_i2v(pipe)
    assert summaries(capfd.readouterr().err) == [(0, 2 * steps, None)]
    assert [c[0] for c in log.calls] == ["high"] * 2 * first_low + ["low"] * 2 * (steps - first_low)
    wan22_integration.uninstall()
    plain = run_i2v(pipe)
    assert out.shape == (16, 2, 8, 8) and torch.equal(out, plain)

    wan22_integration.install(calibrating(tmp_path, "i2v", min_step=first_low))
    log.clear()
    calibrated = run_i2v(pipe)
    assert summaries(capfd.readouterr().err) == [(0, 2 * steps, None)] and torch.equal(calibrated, plain)
    lut = CalibrationLUT.load(tmp_path / "i2v.safetensors")
    assert lut.identity["expert_boundary"] == 900.0 and expert_guard(lut) == (first_low, first_low + 1)
    log.clear()
    skipping = run_i2v(pipe)
    assert summaries(capfd.readouterr().err) == [(2 * BUDGET, 2 * steps, None)]
    skipped = log.skipped()
    assert len(skipped) == 2 * BUDGET and {expert for _, expert, _ in skipped} == {"low"}
    assert min(step for step, _, _ in skipped) >= first_low + 2  # not the guarded steps after the switch
    assert log.computed("high") == 2 * first_low
    log.close()
    assert torch.isfinite(skipping).all() and not torch.equal(skipping, plain) and rel(skipping, plain) < 0.5


def test_ti2v_5b_image_to_video_reads_the_per_token_timestep(wan22, capfd, tmp_path):
    wan = wan22.load()
    pipe = ti2v_pipe(wan)
    plain = run_ti2v(pipe)
    wan22_integration.install(calibrating(tmp_path, "ti2v"))
    log = CallLog(model=pipe.model)
    calibrated = run_ti2v(pipe)
    err = capfd.readouterr().err
    assert summaries(err) == [(0, 2 * TI2V_STEPS, None)] and "[calibrating, all steps computed]" in err
    assert "calibration complete with generation 1" in err  # said by the generation that completed it, once
    assert torch.equal(calibrated, plain)
    per_token = log.calls[0][2]
    assert per_token.dim() == 2 and float(per_token[0, 0]) == 0.0  # the image frame's tokens carry t = 0
    steps_t = [c[1] for c in log.calls[::2]]
    lut = CalibrationLUT.load(tmp_path / "ti2v.safetensors")
    assert lut.steps == TI2V_STEPS and "expert_boundary" not in lut.identity and expert_guard(lut) == ()
    assert [float(t) for t in lut.timesteps] == steps_t  # the step's timestep, not the first token's 0
    assert float(lut.timesteps.min()) > 0 and float(lut.timesteps.max()) == 999.0
    log.clear()
    out = run_ti2v(pipe)
    err = capfd.readouterr().err
    assert "calibration complete" not in err and summaries(err) == [(2 * BUDGET, 2 * TI2V_STEPS, None)]
    assert len(log.skipped()) == 2 * BUDGET and log.computed("model") == 2 * (TI2V_STEPS - BUDGET)
    log.close()
    assert torch.isfinite(out).all() and not torch.equal(out, plain) and rel(out, plain) < 0.5


def test_t2v_a14b_authors_magcache_acts_in_both_experts(wan22):
    """The authors' MagCache for Wan2.2 (published T2V-A14B ratios resampled to 12 steps, their two-expert
    retention) on the checkout's loop: both experts' block stacks are bypassed on some calls, never on
    the retained ones (calls 0-2 and 16-17: the first 20% of each expert), and a threshold of 0 changes
    nothing."""
    from taohooks import DenoiserHook, LoopSpec
    from taohooks.caches.magcache_wan22 import authors_high_noise_steps, wan22_magcache

    wan = wan22.load()
    pipe = t2v_pipe(wan)
    steps, first_low = T2V["steps"], T2V["first_low"]
    assert authors_high_noise_steps(steps, T2V["shift"], T2V["boundary"]) == first_low
    plain = run_t2v(pipe)
    logs = []
    ran = []  # the number of each call whose first block really ran
    handles = [expert.blocks[0].self_attn.register_forward_pre_hook(lambda m, a: ran.append(len(logs[-1].calls) - 1))
               for expert in (pipe.high_noise_model, pipe.low_noise_model)]
    try:
        for threshold in (0.0, 1.0):
            mag = wan22_magcache("t2v-A14B", steps, first_low, threshold=threshold, k=2, retention_ratio=0.2)
            hook = DenoiserHook(LoopSpec(steps, ("cond", "uncond"), batch_dim=None), [mag], timestep_arg="t")
            logs.append(CallLog(high=pipe.high_noise_model, low=pipe.low_noise_model))
            ran.clear()
            with hook.attach(pipe.high_noise_model, pipe.low_noise_model):
                out = run_t2v(pipe)
            logs[-1].close()
            experts = [name for name, *_ in logs[-1].calls]
            assert experts == ["high"] * 2 * first_low + ["low"] * 2 * (steps - first_low)
            if threshold == 0.0:
                assert mag.reused == 0 and ran == list(range(2 * steps)) and torch.equal(out, plain)
                continue
            bypassed = sorted(set(range(2 * steps)) - set(ran))
            assert mag.reused == len(bypassed) > 0
            assert any(experts[c] == "high" for c in bypassed) and any(experts[c] == "low" for c in bypassed)
            assert not set(bypassed) & {0, 1, 2, 16, 17}  # the retained calls: int(16 * 0.2), 16 .. 8 * 0.2 + 16
            assert torch.isfinite(out).all() and not torch.equal(out, plain)
    finally:
        for handle in handles:
            handle.remove()


def test_t2v_a14b_fitted_teacache_acts_in_both_experts(wan22):
    """compare's TeaCache for Wan2.2 (nothing published): the proxy of TeaCache4Wan2.1's use_ret_steps variant
    (``e`` as the checkout's blocks receive it: per token in Wan2.2, reduced to its last token), pairs recorded
    per expert on a full-step run, a polynomial fitted to them; with a threshold, both experts' block stacks
    are bypassed on some calls."""
    from taohooks import DenoiserHook, LoopSpec
    from taohooks.caches.teacache import TeaCacheCalibrator, TeaCacheCallback
    from taohooks.caches.teacache_wan22 import wan22_e_probe as block_e_probe

    wan = wan22.load()
    pipe = t2v_pipe(wan)
    steps, first_low = T2V["steps"], T2V["first_low"]
    loop = LoopSpec(steps, ("cond", "uncond"), batch_dim=None)
    cal = TeaCacheCalibrator(probe=block_e_probe)
    with DenoiserHook(loop, [cal], timestep_arg="t").attach(pipe.high_noise_model, pipe.low_noise_model):
        plain = run_t2v(pipe)
    # per stream, consecutive calls of the same expert: (first_low - 1) + (steps - first_low - 1) pairs
    assert len(cal.pairs) == 2 * (steps - 2)
    coefficients = cal.fit()
    logs, ran = [CallLog(high=pipe.high_noise_model, low=pipe.low_noise_model)], []
    handles = [expert.blocks[0].self_attn.register_forward_pre_hook(lambda m, a: ran.append(len(logs[-1].calls) - 1))
               for expert in (pipe.high_noise_model, pipe.low_noise_model)]
    tea = TeaCacheCallback(1.0, coefficients, probe=block_e_probe)
    try:
        with DenoiserHook(loop, [tea], timestep_arg="t").attach(pipe.high_noise_model, pipe.low_noise_model):
            out = run_t2v(pipe)
    finally:
        logs[-1].close()
        for handle in handles:
            handle.remove()
    experts = [name for name, *_ in logs[-1].calls]
    bypassed = sorted(set(range(2 * steps)) - set(ran))
    assert tea.reused == len(bypassed)
    assert any(experts[c] == "high" for c in bypassed) and any(experts[c] == "low" for c in bypassed)
    # never on the first call of either expert (nothing of its own to compare with) nor on the last step
    assert not set(bypassed) & {0, 1, 2 * first_low, 2 * first_low + 1, 2 * steps - 2, 2 * steps - 1}
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
