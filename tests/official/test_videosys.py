"""The ``videosys`` integration on VideoSys' own ``LattePipeline.generate`` (opt-in: TAOHOOKS_VIDEOSYS_REPO).

The checkout's code runs unmodified on CPU: ``videosys.pipelines.latte.pipeline_latte.LattePipeline``
built by its own ``__init__`` with a tiny random ``videosys.models.transformers.latte_transformer_3d.LatteT2V``,
a tiny random ``AutoencoderKL`` (never decoded: ``output_type="latents"``; ``vae_scale_factor`` is set to
64 afterwards so that the hard-coded 16 x 512 x 512 video is 16 x 8 x 8 latents), a tiny random T5 encoder
that is never called (pre-computed ``prompt_embeds``) and Latte's DDIM scheduler, with PAB on
(``LattePABConfig()``: spatial / temporal / cross broadcast on 100 < t < 800 and MLP broadcast at
t = 720, 640, 560, 480, 400). Stand-ins, installed only for this module and removed after it:

- ``colossalai.cluster.process_group_mesh.ProcessGroupMesh`` (imported by VideoSys' parallel manager):
  every axis is the default process group;
- a one-process gloo process group (VideoSys asks ``dist.get_world_size()``);
- the package ``videosys`` itself is an empty module whose ``__path__`` is the checkout's ``videosys/``:
  ``videosys/__init__.py`` imports every pipeline (CogVideoX, Open-Sora, Vchitect need timm, which needs
  torchvision), while the Latte modules need only diffusers, transformers, einops, ftfy, bs4, imageio,
  omegaconf and tqdm.

Works with VideoSys HEAD (PAB manager ``videosys.core.pab.pab_mgr``) and v2.0.0/v2.0.1
(``videosys.core.pab_mgr``; its logging also imports rich); VideoSys pins diffusers 0.30.0 and
transformers 4.39.3 (with huggingface_hub < 0.26).
"""
import importlib
import os
import sys
import types
from pathlib import Path

import pytest

ENV = "TAOHOOKS_VIDEOSYS_REPO"
if not os.environ.get(ENV):
    pytest.skip(f"{ENV} is not set (path of a VideoSys checkout; see tests/official/README.md)",
                allow_module_level=True)
REPO = Path(os.environ[ENV]).expanduser().resolve()
if not (REPO / "videosys/pipelines/latte/pipeline_latte.py").is_file():
    raise pytest.UsageError(f"{ENV}={REPO}: videosys/pipelines/latte/pipeline_latte.py not found there; "
                            "is it a checkout of NUS-HPC-AI-Lab/VideoSys (v2.0.0 or later)?")
PAB_MODULE = ("videosys.core.pab.pab_mgr" if (REPO / "videosys/core/pab/pab_mgr.py").is_file()
              else "videosys.core.pab_mgr")
for _name in ("diffusers", "transformers", "einops", "ftfy", "bs4", "imageio", "omegaconf", "tqdm"):
    pytest.importorskip(_name, reason=f"VideoSys' Latte pipeline imports {_name}")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from taohooks.config import config_from_dict  # noqa: E402
from taohooks.runtime.hook import get_hook  # noqa: E402
from taohooks.launcher.integration import IntegrationError  # noqa: E402
from taohooks.integrations import videosys as integration  # noqa: E402

STEPS = 50  # DDIM 'leading': t = 980, 960, ..., 0; MLP keys 720..400 are steps 13, 17, 21, 25, 29
LATE = [37, 38]  # t = 240, 220: inside PAB's (100, 800), clear of the MLP reuse ranges; resume at step 39
ATTENTION_COUNTERS = ("spatial_count", "cross_count", "count")


class ProcessGroupMesh:
    """Stand-in for colossalai's mesh: one process, every axis the default group."""

    def __init__(self, *sizes):
        self.sizes = sizes

    def get_group_along_axis(self, axis):
        return dist.group.WORLD


class NoTokenizer:
    """Never called: the tests pass ``prompt_embeds`` / ``negative_prompt_embeds``."""


@pytest.fixture(scope="module")
def vs(tmp_path_factory):
    """VideoSys' Latte modules, imported from the checkout with the integration's post-import hook."""
    saved = {n: m for n, m in sys.modules.items() if n.split(".")[0] in ("videosys", "colossalai")}
    for name in saved:
        del sys.modules[name]
    try:
        importlib.import_module("colossalai.cluster.process_group_mesh")
    except ImportError:
        for name in ("colossalai", "colossalai.cluster", "colossalai.cluster.process_group_mesh"):
            sys.modules[name] = types.ModuleType(name)
        sys.modules["colossalai.cluster.process_group_mesh"].ProcessGroupMesh = ProcessGroupMesh
    package = types.ModuleType("videosys")
    package.__path__ = [str(REPO / "videosys")]
    sys.modules["videosys"] = package
    own_group = not dist.is_initialized()
    if own_group:
        store = tmp_path_factory.mktemp("gloo") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        integration.uninstall()
        integration.install(config(budget=0))  # before the import: the post-import hook patches it
        try:
            latte = importlib.import_module("videosys.pipelines.latte.pipeline_latte")
            transformer = importlib.import_module("videosys.models.transformers.latte_transformer_3d")
        except ImportError as exc:
            pytest.skip(f"{ENV} is set but VideoSys' Latte modules cannot be imported here ({exc}); VideoSys "
                        "pins diffusers==0.30.0, transformers==4.39.3 (huggingface_hub<0.26)")
        assert latte.LattePipeline.generate._taohooks_patch is not None
        try:  # VideoSys' own code against newer diffusers (0.42: its sincos helpers return tensors): not ours to test
            tiny_transformer(transformer.LatteT2V)
        except (TypeError, AttributeError) as exc:
            import diffusers

            pytest.skip(f"{ENV} is set but VideoSys' LatteT2V cannot be built with diffusers {diffusers.__version__} "
                        f"({type(exc).__name__}: {exc}); VideoSys pins diffusers==0.30.0")
        integration.uninstall()
        yield types.SimpleNamespace(latte=latte, LatteT2V=transformer.LatteT2V,
                                    pab=importlib.import_module(PAB_MODULE))
    finally:
        integration.uninstall()
        torch.set_num_threads(threads)
        if own_group:
            dist.destroy_process_group()
        for name in [n for n in sys.modules if n.split(".")[0] in ("videosys", "colossalai")]:
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.fixture(autouse=True)
def uninstalled():
    integration.uninstall()
    yield
    integration.uninstall()


def config(**plan):
    return config_from_dict({"integration": "videosys", "plan": plan}, "official-videosys.yaml")


def tiny_transformer(LatteT2V):
    return LatteT2V(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                    num_layers=2, cross_attention_dim=16, attention_bias=True, sample_size=8, patch_size=2,
                    activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                    norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=16, video_length=16)


def pipeline(vs, **pab):
    """A fresh pipeline (same weights every time); its PAB config becomes VideoSys' global PAB_MANAGER."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = tiny_transformer(vs.LatteT2V)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
    text_encoder = T5EncoderModel(T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    scheduler = DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False)
    # an explicit PAB config: LatteConfig's default pab_config is one shared instance
    config = vs.latte.LatteConfig(enable_pab=True, pab_config=vs.latte.LattePABConfig(**pab))
    pipe = vs.latte.LattePipeline(config, tokenizer=NoTokenizer(), text_encoder=text_encoder, vae=vae,
                                  transformer=transformer, scheduler=scheduler, device=torch.device("cpu"),
                                  dtype=torch.float32)
    pipe.vae_scale_factor = 64  # 512 x 512 -> 8 x 8 latents
    return pipe


def generate(pipe):
    g = torch.Generator().manual_seed(1)
    emb, neg = torch.randn(1, 6, 16, generator=g), torch.randn(1, 6, 16, generator=g)
    return pipe.generate(prompt=None, negative_prompt=None, prompt_embeds=emb, negative_prompt_embeds=neg,
                         num_inference_steps=STEPS, seed=0, generator=torch.Generator().manual_seed(0),
                         output_type="latents", verbose=False).video


def counters(pipe, names=ATTENTION_COUNTERS):
    return {getattr(m, a) for m in pipe.transformer.modules() for a in names if isinstance(getattr(m, a, None), int)}


def test_budget_zero_is_videosys_own_generation(vs, capfd):
    pipe = pipeline(vs)
    plain = generate(pipe)
    assert counters(pipe) == {0}  # 50 calls, steps = 50: VideoSys' counters come back to 0
    integration.install(config(budget=0))
    assert torch.equal(generate(pipe), plain)
    assert "0 of 50 denoiser calls saved" in capfd.readouterr().err
    integration.uninstall()
    assert get_hook(pipe.transformer) is None and torch.equal(generate(pipe), plain)


def test_late_window_two_generations_agree_and_counters_follow_the_reset(vs, capfd):
    integration.install(config(window=LATE, ratio=1.0))
    pipe = pipeline(vs)
    first = generate(pipe)
    assert "2 of 50 denoiser calls saved" in capfd.readouterr().err and torch.isfinite(first).all()
    assert counters(pipe) == {STEPS - (LATE[1] + 1)}  # reset at step 39, then 11 calls
    assert torch.equal(generate(pipe), first)
    assert torch.equal(generate(pipeline(vs)), first)


def test_without_the_reset_videosys_counters_go_out_of_phase(vs, monkeypatch):
    integration.install(config(window=LATE, ratio=1.0))
    reference = generate(pipeline(vs))
    monkeypatch.setattr(integration, "reset_pab_state", lambda transformer: None)
    pipe = pipeline(vs)
    first = generate(pipe)
    assert not torch.equal(first, reference)  # step 39 broadcasts attention kept from step 36
    assert counters(pipe) == {STEPS - 2}  # the 2 skipped calls never advanced VideoSys' counters
    assert not torch.equal(generate(pipe), first)  # and the next generation starts out of phase


def test_reset_pab_state_on_videosys_blocks(vs):
    integration.install(config(window=LATE, ratio=1.0))
    pipe = pipeline(vs)
    generate(pipe)
    blocks = list(pipe.transformer.transformer_blocks) + list(pipe.transformer.temporal_transformer_blocks)
    assert all(b.mlp_count == 0 for b in blocks) and counters(pipe) != {0}
    for b in blocks:
        b.mlp_count = 3
    manager = integration.pab_manager()
    assert manager is vs.pab.PAB_MANAGER and manager is not None
    manager.config.mlp_spatial_outputs[(720, 0)] = manager.config.mlp_temporal_outputs[(720, 0)] = torch.ones(1)
    integration.reset_pab_state(pipe.transformer)
    assert counters(pipe, integration.COUNTERS) == {0}
    assert all(getattr(b, a, None) is None for b in blocks for a in integration.CACHES)
    assert manager.config.mlp_spatial_outputs == {} and manager.config.mlp_temporal_outputs == {}


@pytest.mark.parametrize("window,hit", [([29, 30], 400), ([31, 31], 360)])
def test_mlp_broadcast_guard_against_lattepabconfig(vs, window, hit):
    integration.install(config(window=window, ratio=1.0))
    with pytest.raises(IntegrationError, match=rf"\(timestep {hit}\), where VideoSys' MLP broadcast.*key timestep 400"):
        generate(pipeline(vs))


def test_without_the_guard_videosys_raises_on_the_missing_mlp_output(vs, monkeypatch):
    monkeypatch.setattr(integration.MLPBroadcastGuard, "on_attach", lambda self, hook: None)
    integration.install(config(window=[29, 30], ratio=1.0))
    with pytest.raises(ValueError, match="No stored MLP output found"):
        generate(pipeline(vs))


def test_mlp_broadcast_off_lets_the_window_run(vs, capfd):
    integration.install(config(window=[29, 30], ratio=1.0))
    pipe = pipeline(vs, mlp_broadcast=False)
    out = generate(pipe)
    assert "2 of 50 denoiser calls saved" in capfd.readouterr().err and torch.isfinite(out).all()
    assert torch.equal(generate(pipe), out)


def test_after_a_refused_plan_the_same_pipeline_can_retry(vs):
    integration.install(config(window=[29, 30], ratio=1.0))
    pipe = pipeline(vs)
    with pytest.raises(IntegrationError):
        generate(pipe)
    integration.pab_manager().config.mlp_broadcast = False
    generate(pipe)


def test_compare_target_turns_videosys_pab_off_and_runs_the_authors_teacache(vs):
    """``taocache compare``'s videosys target on VideoSys' own LattePipeline: inside a compared generation VideoSys'
    PAB is off (the model's own output, as with every broadcast switched off) and back after; the target resolves to
    the authors' Latte TeaCache, whose probe reads VideoSys' blocks (adaLN-single input at position 4)."""
    from taohooks.compare.targets import _videosys_pab_off, _videosys_target
    from taohooks.integrations.videosys import batched_cfg_loop
    from taohooks.runtime.hook import DenoiserHook

    off = generate(pipeline(vs, spatial_broadcast=False, temporal_broadcast=False, cross_broadcast=False,
                            mlp_broadcast=False))
    pipe = pipeline(vs)
    with_pab = generate(pipe)
    assert not torch.equal(with_pab, off)
    fresh = pipeline(vs)  # (made before: making a pipeline with enable_pab sets VideoSys' manager anew)
    with _videosys_pab_off({"self": fresh}):
        assert torch.equal(generate(fresh), off)
    assert torch.equal(generate(fresh), with_pab)  # (put back: its PAB acts again)
    # videosys-pab: VideoSys' own PAB left on, its state reset where the generation starts (as VideoSys' first)
    from taohooks.compare.targets import VideoSysOwnPAB

    own = VideoSysOwnPAB(fresh.transformer)
    loop, _ = integration.batched_cfg_loop(fresh.scheduler, STEPS, 7.5)
    for _ in range(2):
        with _videosys_pab_off({"self": fresh}, [own]), DenoiserHook(loop, [own]).attach(fresh.transformer) as hook:
            hook.new_sample()
            assert torch.equal(generate(fresh), with_pab)

    target = _videosys_target({"self": pipe})
    make, provenance = target.tea_published({"self": pipe}, False)
    assert provenance.startswith("the authors' TeaCache for Latte-1 (in VideoSys' LattePipeline")
    loop, _ = batched_cfg_loop(pipe.scheduler, STEPS, 7.5)
    tea = make(10.0)  # (a threshold no change reaches on these weights: every call but the first and last reused)
    with _videosys_pab_off({"self": pipe}), DenoiserHook(loop, tea).attach(pipe.transformer) as hook:
        hook.new_sample()
        cached = generate(pipe)
    assert tea[0].reused == STEPS - 2 and torch.isfinite(cached).all() and not torch.equal(cached, off)

    # compare's pab methods on VideoSys' attention modules: VideoSys' three groups and ranges as pab_groups: give them
    from taohooks.caches.pab import BroadcastGroup, PyramidAttentionBroadcast
    from taohooks.compare.targets import LATTE_SELF_ATTENTION

    groups = [BroadcastGroup(r"transformer_blocks\.\d+\.attn1", 2), BroadcastGroup(r"temporal_transformer_blocks"
                                                                                   r"\.\d+\.attn1", 3),
              BroadcastGroup(r"transformer_blocks\.\d+\.attn2", 6)]
    for broadcast in ([BroadcastGroup(LATTE_SELF_ATTENTION, 2)], groups):
        pab = PyramidAttentionBroadcast(broadcast, timesteps=(100.0, 800.0))
        with _videosys_pab_off({"self": pipe}), DenoiserHook(loop, [pab]).attach(pipe.transformer) as hook:
            hook.new_sample()
            broadcast_out = generate(pipe)
        assert torch.isfinite(broadcast_out).all() and not torch.equal(broadcast_out, off)
