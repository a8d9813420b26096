"""Wan2.1 text-to-video with diffusers, as its model card runs it: a sample script that knows nothing of taohooks.

    python examples/diffusers_wan.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --prompt "A cat walks on the grass" \
        --out video.mp4
    taocache-run examples/diffusers_wan.py --taocache configs/diffusers_wan.yaml --model ... --prompt ...
    taocache compare configs/compare/diffusers_wan.yaml -- examples/diffusers_wan.py --model ...

The VAE in float32 and the rest in ``--dtype`` (bfloat16 by default), UniPC with ``flow_shift`` 3 (the card's
value for 480p; 5 for 720p), 50 steps, guidance 5, 33 frames at 832x480 (the paper's Table 3 setting; the card's
example makes 81). One ``pipe(prompt=...)`` call, the seed in torch's RNG: ``taocache compare`` replaces both.
``--out`` ends in ``.mp4`` (diffusers' ``export_to_video``: needs ``imageio`` and ``imageio-ffmpeg``) or ``.pt``
(the frames, ``torch.save``).
"""
import argparse
import importlib.util

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", help="hub id or local folder")
    parser.add_argument("--prompt", default="A cat walks on the grass, realistic")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--shift", type=float, default=3.0, help="UniPC flow_shift: 3 for 480p, 5 for 720p")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="video.mp4", help=".mp4 or .pt")
    args = parser.parse_args()
    if not args.out.endswith((".mp4", ".pt")):
        parser.error(f"--out {args.out}: expected a .mp4 or .pt file name")
    if args.out.endswith(".mp4") and not any(importlib.util.find_spec(m) for m in ("imageio", "cv2")):
        parser.error(f"--out {args.out}: writing an .mp4 needs imageio (pip install imageio imageio-ffmpeg) or "
                     "OpenCV; install one, or save a .pt file (said now: the generation takes minutes)")

    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    vae = AutoencoderKLWan.from_pretrained(args.model, subfolder="vae", torch_dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(args.model, vae=vae, torch_dtype=getattr(torch, args.dtype))
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, prediction_type="flow_prediction",
                                                         use_flow_sigmas=True, flow_shift=args.shift)
    pipe.to(args.device)
    torch.manual_seed(args.seed)
    frames = pipe(prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                  num_frames=args.frames, num_inference_steps=args.steps, guidance_scale=args.guidance).frames
    if args.out.endswith(".pt"):
        torch.save(torch.from_numpy(frames), args.out)
    else:
        from diffusers.utils import export_to_video

        export_to_video(frames[0], args.out, fps=16)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
