"""End-to-end speedup of TaoCache on the full-size Wan2.1-1.3B architecture (GPU).

    python benchmarks/gpu_speed.py                      # 832x480, 33 and 81 frames, 50 steps, bf16
    python benchmarks/gpu_speed.py --frames 33 --budgets 0.08 0.16 0.25 --json out.json
    python benchmarks/gpu_speed.py --tiny --device cpu  # a smoke test of the script itself

diffusers' ``WanTransformer3DModel`` with the 1.3B configuration and random weights (speed does not
depend on the weights), called the way Wan2.1's ``generate.py`` calls its DiT: two calls per step
(cond, then uncond) with guidance, under ``torch.no_grad`` in bf16, 50 flow-matching steps. For each
budget: the wall time of a full-step run and of a TaoCache run (a late window; the ratio is a
constant, which costs what a calibrated one costs), the speedup, the ideal speedup
``calls / (calls - skipped)``, their ratio, and the peak memory the hook adds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from taohooks import TaoCache
from taohooks.config import config_from_dict
from taohooks.taocache.plan import fraction_skips

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6)
TINY = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=32, ffn_dim=64,
            num_layers=2)


def build(tiny: bool, device: torch.device, dtype: torch.dtype):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(**(TINY if tiny else WAN_1_3B))
    return model.to(device=device, dtype=dtype).eval()


def late_window(steps: int, skips: int):
    """Skip ``skips`` steps ending two steps before the last (a late window, as the planner picks)."""
    last = steps - 3
    return [last - skips + 1, last]


@torch.no_grad()
def generate(model, latents, context, context_null, steps: int, guidance: float = 5.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    scheduler.set_timesteps(steps, device=latents.device)
    x = latents
    for t in scheduler.timesteps:
        timestep = t.expand(x.shape[0])
        cond = model(hidden_states=x, timestep=timestep, encoder_hidden_states=context, return_dict=False)[0]
        uncond = model(hidden_states=x, timestep=timestep, encoder_hidden_states=context_null, return_dict=False)[0]
        x = scheduler.step(uncond + guidance * (cond - uncond), t, x, return_dict=False)[0]
    return x


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[33, 81])
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.08, 0.16, 0.25])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per setting (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tiny", action="store_true", help="a tiny model (smoke test on CPU)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = build(args.tiny, device, dtype)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# Wan2.1-1.3B architecture{' (tiny)' if args.tiny else ''}, random weights, {gpu}, {args.dtype}, "
          f"{args.steps} steps, CFG as two calls; torch {torch.__version__}")
    print("| frames | budget | skipped calls | full s | TaoCache s | speedup | ideal | speedup/ideal | hook MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    records = []
    for frames in args.frames:
        g = torch.Generator().manual_seed(0)
        shape = (1, 16, (frames - 1) // 4 + 1, args.height // 8, args.width // 8)
        latents = torch.randn(shape, generator=g).to(device, dtype)
        text_dim = model.config.text_dim
        context = torch.randn(1, 512, text_dim, generator=g).to(device, dtype)
        context_null = torch.randn(1, 512, text_dim, generator=g).to(device, dtype)
        run = lambda: generate(model, latents, context, context_null, args.steps)  # noqa: E731
        run()  # warm-up (kernels, allocator)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        full_times = [timed(run, device)[0] for _ in range(args.repeats)]
        full_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        full = statistics.median(full_times)
        for budget in args.budgets:
            skips = fraction_skips(budget, args.steps)  # half up, as taocache bench and compare count
            cache = TaoCache(config_from_dict({"plan": {"window": late_window(args.steps, skips), "ratio": 1.0}}))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with cache.attach(model, args.steps, ("cond", "uncond"), repeat=True):
                fast = statistics.median(timed(run, device)[0] for _ in range(args.repeats))
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
            calls, skipped = 2 * args.steps, 2 * skips
            ideal = calls / (calls - skipped)
            record = {"frames": frames, "budget": budget, "skipped_calls": skipped, "calls": calls,
                      "full_s": full, "taocache_s": fast, "speedup": full / fast, "ideal": ideal,
                      "speedup_vs_ideal": full / fast / ideal, "hook_mb": max(peak - full_peak, 0) / 2**20,
                      "device": gpu, "dtype": args.dtype, "steps": args.steps, "tiny": args.tiny}
            records.append(record)
            print(f"| {frames} | {budget:.2f} | {skipped}/{calls} | {full:.2f} | {fast:.2f} | {full / fast:.3f} | "
                  f"{ideal:.3f} | {record['speedup_vs_ideal']:.3f} | {record['hook_mb']:.1f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
