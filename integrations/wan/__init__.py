"""TaoCache in Wan2.1's own ``generate.py`` (Wan-Video/Wan2.1): ``integration: wan``.

    taocache-run generate.py --task t2v-1.3B --size 832*480 --ckpt_dir ./Wan2.1-T2V-1.3B \\
        --prompt "..." --taocache configs/wan.yaml
    torchrun --nproc_per_node 8 -m taohooks.run generate.py --task t2v-14B ... \\
        --dit_fsdp --t5_fsdp --ulysses_size 8 --taocache configs/wan.yaml

What it patches: ``generate`` of ``WanT2V``, ``WanI2V``, ``WanFLF2V`` and ``WanVace`` (at class
level, once their modules are imported). Inside each call it hooks the forward that the DiT
*instance* has then: the sequence-parallel forward that ``--ulysses_size/--ring_size`` set on the
instance, inside the FSDP wrapper of ``--dit_fsdp`` (the real module is ``.module``). Loop shape:
``sampling_steps`` steps, two calls per step (cond, then uncond), each returning a list with one
float32 tensor ``[C, F, H, W]``; the timestep is the keyword ``t``. Every rank sees the same
gathered output and the plan is static, so all ranks skip the same calls.

Importing this module needs neither ``wan`` nor flash-attn, dashscope or a GPU.
"""
from __future__ import annotations

from taohooks.config import TaoCacheConfig
from taohooks.integration import GenerationPatch, IntegrationError, PatchSet, require_modules
from taohooks.loop import LoopSpec
from taohooks.taocache import TaoCache

__all__ = ["install", "uninstall", "PIPELINES"]

# module -> pipeline class whose ``generate(input_prompt, ..., sampling_steps, ...)`` runs one video.
PIPELINES = {
    "wan.text2video": "WanT2V",
    "wan.image2video": "WanI2V",
    "wan.first_last_frame2video": "WanFLF2V",
    "wan.vace": "WanVace",
}
STREAMS = ("cond", "uncond")  # Wan calls the model with the prompt first, then with the negative prompt

_patches = PatchSet()


def _model(arguments):
    return arguments["self"].model


def _loop(arguments):
    # One [C, F, H, W] tensor per call: the whole output is one prompt (batch_dim None).
    return LoopSpec(int(arguments["sampling_steps"]), STREAMS, batch_dim=None), {"timestep_arg": "t"}


def _refuse_rank_local_decisions(config: TaoCacheConfig):
    """TeaCache decides from activations, which sequence parallelism shards over ranks: ranks could
    decide differently and one would skip the attention collectives another enters."""
    def check(arguments, model):
        import torch.distributed as dist

        if (config.teacache is not None and config.teacache.threshold > 0 and dist.is_available()
                and dist.is_initialized() and dist.get_world_size() > 1):
            raise IntegrationError(f"{config.source}: teacache: the hybrid decides from activations that "
                                   "--ulysses_size/--ring_size shard over ranks, so ranks could take different "
                                   "decisions and deadlock; use TaoCache (and pab:) alone on several GPUs")
        return []
    return check


def _patch(module, class_name: str, config: TaoCacheConfig):
    cls = getattr(module, class_name, None)
    if cls is None or "generate" not in vars(cls):
        return None  # an older checkout may lack a pipeline
    return GenerationPatch(cls, "generate", lambda arguments: TaoCache(config), _model, _loop,
                           callbacks_of=_refuse_rank_local_decisions(config), prompt_arg="input_prompt").install()


def install(config: TaoCacheConfig) -> None:
    """Patch every Wan pipeline's ``generate`` when (or if already) imported; idempotent."""
    if _patches.installed:
        return
    require_modules("wan", ["wan"], "run generate.py of a Wan2.1 checkout, or pip install -e the checkout")
    _patches.installed = True
    for module_name, class_name in PIPELINES.items():
        _patches.on_import(module_name, lambda module, c=class_name: _patch(module, c, config))


def uninstall() -> None:
    _patches.uninstall()
