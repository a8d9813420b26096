"""TaoCache in Open-Sora-Plan v1.1's ``opensora/sample/sample_t2v.py``: ``integration: opensora_plan``.

    taocache-run opensora/sample/sample_t2v.py --model_path LanguageBind/Open-Sora-Plan-v1.1.0 \\
        --version 65x512x512 ... --num_sampling_steps 150 --taocache configs/opensora_plan.yaml

What it patches: ``VideoGenPipeline.__call__`` of the top-level module ``pipeline_videogen``
that the script imports from ``opensora/sample/`` (patching ``opensora.sample.pipeline_videogen``
would hit a different module object). The loop is Latte's: one batched (uncond, cond) call per
scheduler timestep. The script's default PNDM scheduler makes ``N + 9`` calls for ``N`` steps
(PRK warm-up, with repeated timesteps), so steps are numbered by call: a config for 150 steps
calibrates and plans over 159 calls.
"""
from __future__ import annotations

from typing import List

from taohooks.config import TaoCacheConfig
from taohooks.launcher.integration import PatchSet, require_modules, script_options

from ..latte import check_sampler, patch_pipeline

__all__ = ["install", "uninstall", "precheck", "MODULE", "PIPELINE", "EXPECTS"]

MODULE, PIPELINE = "pipeline_videogen", "VideoGenPipeline"
EXPECTS = "a call of pipeline_videogen.VideoGenPipeline.__call__ (Open-Sora-Plan's opensora/sample/sample_t2v.py)"


# Every option of opensora/sample/sample_t2v.py (v1.1.0), so that shortened options resolve as there.
OPTIONS = {
    **{f"--{name}": {} for name in ("model_path", "version", "num_frames", "height", "width", "cache_dir", "ae",
                                   "ae_path", "text_encoder_name", "save_img_path", "guidance_scale", "fps",
                                   "run_time", "tile_overlap_factor")},
    "--text_prompt": {"nargs": "+"}, "--force_images": {"action": "store_true"},
    "--enable_tiling": {"action": "store_true"},
    "--sample_method": {"default": "PNDM"}, "--num_sampling_steps": {"type": int, "default": 50},
}


def precheck(config: TaoCacheConfig, argv: List[str]) -> None:
    """``--sample_method`` (default PNDM) and ``--num_sampling_steps`` (default 50) against the LUT, and what the
    command line gives of the video (``--height``, ``--width``, ``--num_frames``, ``--guidance_scale``,
    ``--force_images``) against what the LUT recorded, before the model loads (T5-XXL, the DiT and the VAE: minutes)."""
    args = script_options(argv, OPTIONS)
    if args is not None:  # else the script's own parser refuses the arguments and says why
        try:
            guidance = float(args.guidance_scale) if args.guidance_scale is not None else None
            identity = {key: int(value) for key, value in (("height", args.height), ("width", args.width),
                                                           ("frames", args.num_frames)) if value is not None}
        except ValueError:
            return  # the script's own parser refuses it
        identity["temporal_attention"] = not args.force_images  # (the pipeline's enable_temporal_attentions)
        if guidance is not None:
            identity["guide_scale"] = guidance
        check_sampler(config, args.sample_method, args.num_sampling_steps, "the command line", guidance=guidance,
                      identity=identity)

_patches = PatchSet()


def install(config: TaoCacheConfig) -> None:
    """Patch ``pipeline_videogen.VideoGenPipeline`` when (or if already) imported; idempotent."""
    if _patches.installed:
        return
    require_modules("opensora_plan", [MODULE], "run opensora/sample/sample_t2v.py of an Open-Sora-Plan v1.1.0 "
                    "checkout: its folder holds pipeline_videogen.py")
    _patches.installed = True
    _patches.on_import(MODULE, lambda module: patch_pipeline(getattr(module, PIPELINE), config))


def uninstall() -> None:
    _patches.uninstall()
