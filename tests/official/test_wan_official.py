"""The ``wan`` integration on Wan2.1's own ``WanT2V.generate`` loop (opt-in: TAOHOOKS_WAN_REPO).

The checkout's code runs unmodified: ``wan.text2video.WanT2V.generate`` with a tiny random
``wan.modules.model.WanModel`` on CPU. What the test supplies instead of checkpoints: a stub T5
(a callable returning fixed random embeddings), a stub VAE (``decode`` returns the latents) and an
SDPA stand-in for ``wan.modules.model.flash_attention`` (flash-attn needs CUDA and half precision),
and ``torch.cuda.current_device`` answers 0 while ``wan.modules.t5`` is imported (a default argument
evaluated at class definition; the T5 itself is never built).
The pipeline object is made with ``object.__new__`` (its ``__init__`` loads checkpoints) and given
the attributes ``__init__`` would set. ``wan/__init__.py`` is bypassed (it imports every pipeline,
the T5 tokenizer, easydict, ...); ``ftfy`` is stubbed when missing (imported by the T5 tokenizer
module that ``wan.text2video`` imports; never called).
"""
import re
import socket
import sys
import types
import warnings
from contextlib import contextmanager

import pytest

import official_support  # noqa: E402
from official_support import (calibrating_config, checkout, config, isolated_imports, package_without_init,
                              sdpa_flash_attention, stub_module, summaries)

WAN = checkout("TAOHOOKS_WAN_REPO", "wan/text2video.py")

import diffusers  # noqa: E402,F401  (before any stub: diffusers probes optional packages at import)
import torch  # noqa: E402
from torch import nn  # noqa: E402

import taohooks.integrations.wan as wan_integration  # noqa: E402
from taohooks.runtime.hook import get_hook  # noqa: E402

STEPS = 8
CALLS = 2 * STEPS  # Wan calls the model twice per step: cond, then uncond
WINDOW = [4, 6]    # late steps skipped by the manual plan: 3 steps, 6 calls
TEXT_DIM, TEXT_LEN = 32, 16
PAB = {"groups": [{"pattern": r"blocks\.\d+\.self_attn", "range": 2},
                  {"pattern": r"blocks\.\d+\.cross_attn", "range": 3}],
       "timesteps": [100, 1000]}


class FullyShardedDataParallel(nn.Module):
    """What ``--dit_fsdp`` puts in ``pipe.model`` as far as the integration can tell: a wrapper
    named FullyShardedDataParallel whose forward calls the wrapped ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@contextmanager
def wan_imports():
    """Imports of the checkout's ``wan`` package (``__init__`` bypassed); dropped afterwards."""
    with isolated_imports([WAN], ["wan"]):
        stub_module("ftfy", fix_text=lambda text: text)  # only when ftfy is not installed
        package_without_init("wan", WAN / "wan")
        for sub in ("modules", "utils", "distributed"):
            package_without_init(f"wan.{sub}", WAN / "wan" / sub)
        try:
            yield types.SimpleNamespace(load=load_wan)
        finally:
            wan_integration.uninstall()
            if getattr(sys.modules.get("ftfy"), "__taohooks_stub__", False):
                del sys.modules["ftfy"]


@pytest.fixture
def wan():
    with wan_imports() as imports:
        yield imports


def load_wan():
    """Import the pipeline module (after the test installed the integration, or not)."""
    import importlib
    from unittest import mock

    # wan/modules/t5.py evaluates ``torch.cuda.current_device()`` as a default argument when the
    # class is defined; the T5 is never built here (stub text encoder), so device 0 is a placeholder.
    with warnings.catch_warnings(), mock.patch.object(torch.cuda, "current_device", lambda: 0):
        warnings.simplefilter("ignore")  # torch.cuda.amp deprecation
        text2video = importlib.import_module("wan.text2video")
        model_module = importlib.import_module("wan.modules.model")
    model_module.flash_attention = sdpa_flash_attention
    return text2video, model_module


def tiny_model(model_module):
    torch.manual_seed(0)
    model = model_module.WanModel(dim=64, ffn_dim=128, freq_dim=32, text_dim=TEXT_DIM, num_heads=4, num_layers=2,
                                  text_len=TEXT_LEN, in_dim=4, out_dim=4)
    nn.init.xavier_uniform_(model.head.head.weight)  # init_weights zeroes it: the output would be 0
    return model.eval().requires_grad_(False)


def text_encoder(texts, device):
    out = []
    for text in texts:
        g = torch.Generator().manual_seed(sum(map(ord, text)) % (2 ** 31))
        out.append(torch.randn(TEXT_LEN - 4, TEXT_DIM, generator=g).to(device))
    return out


def make_pipe(text2video, model):
    """A ``WanT2V`` with the attributes its ``__init__`` sets, without loading checkpoints."""
    pipe = object.__new__(text2video.WanT2V)
    pipe.device = torch.device("cpu")
    pipe.config = None
    pipe.rank = 0
    pipe.t5_cpu = True
    pipe.num_train_timesteps = 1000
    pipe.param_dtype = torch.bfloat16
    pipe.text_encoder = text_encoder
    pipe.vae_stride = (4, 8, 8)
    pipe.patch_size = (1, 2, 2)
    pipe.vae = types.SimpleNamespace(model=types.SimpleNamespace(z_dim=4),
                                     decode=lambda zs: [z.detach().clone() for z in zs])
    pipe.model = model
    pipe.sp_size = 1
    pipe.sample_neg_prompt = "negative"
    return pipe


def generate(pipe, seed=0, solver="unipc"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe.generate("a tiny test prompt", size=(64, 64), frame_num=9, shift=5.0, sample_solver=solver,
                             sampling_steps=STEPS, guide_scale=5.0, seed=seed, offload_model=False)


def install(**kw):
    wan_integration.install(config("wan", **kw))


def test_budget_zero_is_the_original_loop(wan, capfd):
    install(plan={"budget": 0})  # before the import: the post-import hook patches WanT2V
    text2video, model_module = wan.load()
    assert getattr(text2video.WanT2V.generate, "_taohooks_patch", None) is not None
    pipe = make_pipe(text2video, tiny_model(model_module))
    out = generate(pipe)
    assert summaries(capfd.readouterr().err) == [(0, CALLS, None)]
    assert get_hook(pipe.model) is not None
    wan_integration.uninstall()
    assert getattr(text2video.WanT2V.generate, "_taohooks_patch", None) is None
    assert get_hook(pipe.model) is None and "forward" not in vars(pipe.model)
    plain = generate(pipe)
    assert summaries(capfd.readouterr().err) == []
    assert out.shape == (4, 3, 8, 8) and torch.equal(out, plain)


@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
def test_late_window_skips_the_planned_calls(wan, capfd, solver):
    text2video, model_module = wan.load()
    pipe = make_pipe(text2video, tiny_model(model_module))
    plain = generate(pipe, solver=solver)
    install(plan={"window": WINDOW, "ratio": 1.0})  # after the import: patched at once
    out = generate(pipe, solver=solver)
    saved = 2 * (WINDOW[1] - WINDOW[0] + 1)
    assert summaries(capfd.readouterr().err) == [(saved, CALLS, None)]
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    assert float((out - plain).norm() / plain.norm()) < 0.5
    again = generate(pipe, solver=solver)  # a second generation on the same attachment: same plan, same result
    assert summaries(capfd.readouterr().err) == [(saved, CALLS, None)]
    assert torch.equal(again, out)


def counting_forward(counter):
    """A forward set on the *instance* after construction, as ``use_usp`` does
    (``self.model.forward = types.MethodType(usp_dit_forward, self.model)``)."""
    def usp_like_forward(self, x, t, context, seq_len, clip_fea=None, y=None):
        counter.append(int(t[0]))
        return type(self).forward(self, x, t, context, seq_len, clip_fea=clip_fea, y=y)
    return usp_like_forward


@pytest.mark.parametrize("plan", [{"budget": 0}, {"window": WINDOW, "ratio": 1.0}], ids=["budget0", "window"])
def test_instance_forward_replacement_is_wrapped_not_bypassed(wan, capfd, plan):
    text2video, model_module = wan.load()
    model = tiny_model(model_module)
    calls = []
    usp_forward = types.MethodType(counting_forward(calls), model)
    model.forward = usp_forward
    pipe = make_pipe(text2video, model)
    plain = generate(pipe)
    assert len(calls) == CALLS
    install(plan=plan)
    calls.clear()
    out = generate(pipe)
    saved = 0 if plan.get("budget") == 0 else 2 * (WINDOW[1] - WINDOW[0] + 1)
    assert summaries(capfd.readouterr().err) == [(saved, CALLS, None)]
    assert len(calls) == CALLS - saved  # the USP forward ran for exactly the computed calls
    if saved:
        assert torch.isfinite(out).all() and not torch.equal(out, plain)
    else:
        assert torch.equal(out, plain)
    wan_integration.uninstall()
    assert vars(model)["forward"] is usp_forward  # the instance forward is put back


def test_an_interrupted_generation_does_not_shift_the_next(wan, capfd):
    """Ctrl-C (or an OOM) in the middle of the loop: the next generate() starts at step 0 again."""
    text2video, model_module = wan.load()
    model = tiny_model(model_module)
    calls = []

    def failing_forward(self, x, t, context, seq_len, clip_fea=None, y=None):
        calls.append(int(t[0]))
        if len(calls) == fail_at[0]:
            raise KeyboardInterrupt("interrupted at call 5")
        return type(self).forward(self, x, t, context, seq_len, clip_fea=clip_fea, y=y)

    fail_at = [None]
    model.forward = types.MethodType(failing_forward, model)
    pipe = make_pipe(text2video, model)
    install(plan={"window": WINDOW, "ratio": 1.0}, pab=PAB)
    reference = generate(pipe)
    calls.clear()
    fail_at[0] = 5
    with pytest.raises(KeyboardInterrupt):
        generate(pipe)
    fail_at[0] = None
    calls.clear()
    again = generate(pipe)
    saved = 2 * (WINDOW[1] - WINDOW[0] + 1)
    assert [s[:2] for s in summaries(capfd.readouterr().err)] == [(saved, CALLS), (saved, CALLS)]
    assert len(calls) == CALLS - saved and torch.equal(again, reference)


@pytest.mark.parametrize("plan", [{"budget": 0}, {"window": WINDOW, "ratio": 1.0}], ids=["budget0", "window"])
def test_fsdp_like_wrapper_hooks_the_inner_module(wan, capfd, plan):
    text2video, model_module = wan.load()
    inner = tiny_model(model_module)
    pipe = make_pipe(text2video, FullyShardedDataParallel(inner))
    plain = generate(pipe)
    install(plan=plan)
    out = generate(pipe)
    saved = 0 if plan.get("budget") == 0 else 2 * (WINDOW[1] - WINDOW[0] + 1)
    assert summaries(capfd.readouterr().err) == [(saved, CALLS, None)]
    assert get_hook(inner) is not None and get_hook(pipe.model) is None
    if saved:
        assert torch.isfinite(out).all() and not torch.equal(out, plain)
    else:
        assert torch.equal(out, plain)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gloo_group():
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        pytest.skip("a process group already exists")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("plan", [{"budget": 0}, {"window": WINDOW, "ratio": 1.0}], ids=["budget0", "window"])
def test_real_fsdp_from_wan_shard_model(wan, capfd, gloo_group, plan):
    """``--dit_fsdp``: the model wrapped by the checkout's own ``wan.distributed.fsdp.shard_model``
    (FULL_SHARD, per-block auto-wrap) in a 1-process gloo group on CPU."""
    text2video, model_module = wan.load()
    from wan.distributed.fsdp import shard_model

    def sharded():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # CPU: FSDP takes device_id=cpu only without sync_module_states; fp32 compute, because
            # the model's float32 islands are CUDA autocast regions (no effect on CPU).
            return shard_model(tiny_model(model_module), device_id=torch.device("cpu"), param_dtype=torch.float32,
                               sync_module_states=False)

    plain = generate(make_pipe(text2video, sharded()))
    pipe = make_pipe(text2video, sharded())
    assert type(pipe.model).__name__ == "FullyShardedDataParallel"
    install(plan=plan)
    out = generate(pipe)
    saved = 0 if plan.get("budget") == 0 else 2 * (WINDOW[1] - WINDOW[0] + 1)
    assert summaries(capfd.readouterr().err) == [(saved, CALLS, None)]
    assert get_hook(pipe.model.module) is not None
    if saved:
        assert torch.isfinite(out).all() and not torch.equal(out, plain)
    else:
        assert torch.equal(out, plain)


@pytest.mark.parametrize("plan", [{"budget": 0}, {"window": WINDOW, "ratio": 1.0}], ids=["budget0", "window"])
def test_native_pab(wan, capfd, plan):
    text2video, model_module = wan.load()
    pipe = make_pipe(text2video, tiny_model(model_module))
    plain = generate(pipe)
    install(plan=plan, pab=PAB)
    out = generate(pipe)
    saved = 0 if plan.get("budget") == 0 else 2 * (WINDOW[1] - WINDOW[0] + 1)
    [(got_saved, total, broadcasts)] = summaries(capfd.readouterr().err)
    assert (got_saved, total) == (saved, CALLS)
    assert broadcasts is not None and broadcasts > 0
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    wan_integration.uninstall()
    for name, module in pipe.model.named_modules():
        assert "forward" not in vars(module), name  # PAB's attention patches are removed too
    assert torch.equal(generate(pipe), plain)


def test_calibrates_then_skips_with_a_budget(wan, capfd, tmp_path):
    """``lut:`` names a missing file: generation 1 computes every call and writes the LUT,
    generation 2 skips ``budget`` steps in the window searched on it."""
    text2video, model_module = wan.load()
    pipe = make_pipe(text2video, tiny_model(model_module))
    plain = generate(pipe)
    wan_integration.install(calibrating_config("wan", tmp_path, budget=2))
    calibrated = generate(pipe)
    err = capfd.readouterr().err
    assert summaries(err) == [(0, CALLS, None)] and "[calibrating, all steps computed]" in err
    assert "calibration complete with generation 1" in err  # said by the generation that completed it, once
    assert torch.equal(calibrated, plain) and (tmp_path / "wan.safetensors").is_file()
    out = generate(pipe)
    err = capfd.readouterr().err
    assert "calibration complete" not in err and summaries(err) == [(2 * 2, CALLS, None)]
    assert torch.isfinite(out).all() and not torch.equal(out, plain)


@pytest.mark.parametrize("use_ret_steps,window,guard,reused_steps", [
    (False, [4, 6], 1, [1, 2]),  # e: step 0 computed, TeaCache's range ends at 4 - 1
    (True, [6, 6], 0, [5]),      # e0: the authors' first 5 steps computed, the range ends at 6
], ids=["e", "e0"])
def test_hybrid_with_the_authors_teacache(wan, capfd, use_ret_steps, window, guard, reused_steps):
    """``teacache: {published: wan2.1-t2v-1.3B}`` before TaoCache's window on the real WanModel: the
    authors' proxy (the time embedding, or the blocks' ``e``) and forced steps; with a threshold no
    change reaches, exactly the steps in TeaCache's range after the forced ones reuse, in both streams."""
    from taohooks.config import config_from_dict

    text2video, model_module = wan.load()
    pipe = make_pipe(text2video, tiny_model(model_module))
    plain = generate(pipe)
    wan_integration.install(config_from_dict({
        "integration": "wan", "plan": {"window": window, "ratio": 1.0},
        "teacache": {"published": "wan2.1-t2v-1.3B", "use_ret_steps": use_ret_steps, "threshold": 1e12,
                     "guard_band": guard}}, "official-wan-hybrid.yaml"))
    out = generate(pipe)
    err = capfd.readouterr().err
    reused = int(re.search(r"TeaCache reused the block residual on (\d+) calls", err).group(1))
    assert reused == 2 * len(reused_steps), err
    assert torch.isfinite(out).all() and not torch.equal(out, plain)


COMPARE_DRIVER = """\
import sys
import torch
sys.path.insert(0, {official!r})
import test_wan_official as t
with t.wan_imports() as wan:
    text2video, model_module = wan.load()
    pipe = t.make_pipe(text2video, t.tiny_model(model_module))
    video = t.generate(pipe)  # taocache compare intercepts this call (and exits)
    if len(sys.argv) > 1:
        torch.save(video, sys.argv[1])
"""
COMPARE_EXPERIMENT = official_support.compare_experiment("wan", "full, taocache, teacache, magcache, easycache, pab", 0.25,
                                        "easycache_warmup: 2\n")


def test_compare_through_the_official_loop(tmp_path):
    """``taocache compare`` on WanT2V.generate of the checkout (a driver script builds the tiny pipeline and
    calls it once): the stored reference is what generate returns for that prompt and seed; TaoCache,
    the authors' TeaCache and MagCache (published, nothing calibrated for them) and EasyCache skip 2 of 8
    steps in both streams; PAB alone skips nothing."""
    from official_support import compare_through_driver

    results = compare_through_driver(tmp_path, COMPARE_DRIVER, COMPARE_EXPERIMENT, WAN)
    assert "the authors' TeaCache for Wan2.1 t2v-1.3B" in results["meta"]["teacache_proxy"]
    assert "the authors' MagCache for Wan2.1 t2v-1.3B" in results["meta"]["magcache_ratios"]
    from taohooks.compare.experiment import PromptEntry
    from taohooks.compare.store import RunStore

    reference, _ = RunStore(tmp_path / "out").load("full", PromptEntry("a tiny test prompt", 0))
    assert torch.equal(reference[0], torch.load(tmp_path / "plain.pt").float())
    rows = {r["method"]: r for r in results["records"] if r["seed"] == 0}
    assert rows["taocache"]["skipped_calls"] == 4 and rows["taocache"]["calls"] == CALLS
    # the final latents, recorded at vae.decode (here a stub that returns them): stored and compared
    latents = RunStore(tmp_path / "out").load_latents("full", PromptEntry("a tiny test prompt", 0))
    assert torch.equal(latents[0], reference[0]) and 0 < rows["taocache"]["latent_rel_l2"] < 1
    assert rows["pab"]["skipped_calls"] == 0 and rows["pab"]["psnr"] < 100
    for method in ("teacache", "magcache", "easycache"):
        assert rows[method]["calls"] == CALLS and rows[method]["skipped_calls"] > 0, (method, rows[method])
