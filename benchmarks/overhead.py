"""Overhead of taohooks on a CPU denoiser whose call takes 10-50 ms.

    python benchmarks/overhead.py            # a table
    python benchmarks/overhead.py --json     # one JSON object, for tracking from run to run

Measured (all plain fractions):
- hook_overhead: extra time per call of the attached hook with nothing to do (TaoCache attached,
  budget 0), relative to one model call;
- calibration_overhead: extra time per call of calibration recording, relative to one model call;
- skip_cost: time of a skipped (extrapolated) call relative to a computed one;
- speedup_vs_ideal: end-to-end speedup of a 50-step two-stream loop at a 16% budget divided by
  the ideal ``calls / (calls - skipped)``.

The per-call costs of the hook are measured on a module that returns a precomputed output of
the model's output size (so the hook's own work is timed precisely, not buried in the noise of
two 20 ms numbers), then divided by the measured model call time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from taohooks import CalibrationRecorder, DenoiserHook, LoopSpec, TaoCache, config_from_dict


class VideoDenoiser(nn.Module):
    """A DiT-shaped denoiser: patchify [B, C, F, H, W] by 2x2, transformer blocks, unpatchify."""

    def __init__(self, channels=4, frames=8, size=16, dim=128, depth=4, heads=4):
        super().__init__()
        self.shape = (channels, frames, size, size)
        self.embed = nn.Linear(channels * 4, dim)
        self.t_embed = nn.Linear(1, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.out = nn.Linear(dim, channels * 4)

    def forward(self, x, timestep):
        b, c, f, h, w = x.shape
        tokens = x.reshape(b, c, f, h // 2, 2, w // 2, 2).permute(0, 2, 3, 5, 1, 4, 6).reshape(b, -1, c * 4)
        tokens = self.embed(tokens) + self.t_embed(timestep.view(-1, 1, 1).float() / 1000)
        tokens = self.out(self.blocks(tokens))
        return tokens.reshape(b, f, h // 2, w // 2, c, 2, 2).permute(0, 4, 1, 2, 5, 3, 6).reshape(b, c, f, h, w)


class Constant(nn.Module):
    """Returns a fixed output of the model's output size: isolates the hook's own cost."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, x, timestep):
        return self.output + 0  # a fresh tensor, as a model would return


def sample(model, steps, x0, streams=("cond", "uncond"), guidance=5.0):
    """A Wan-shaped loop: two calls per step (cond, uncond), Euler update."""
    x = x0.clone()
    for i in range(steps):
        t = torch.tensor([1000.0 * (1 - i / steps)])
        cond = model(x, timestep=t)
        uncond = model(x, timestep=t)
        v = uncond + guidance * (cond - uncond)
        x = x - v / steps
    return x


def per_call_seconds(fn, calls, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def timed_loop(model, steps, x0, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sample(model, steps, x0)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(steps=50, budget=0.16, repeats=5, threads=1, seed=0):
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    model = VideoDenoiser().eval()
    x = torch.randn(1, *model.shape)
    t = torch.tensor([500.0])
    streams = ("cond", "uncond")
    results = {}
    with torch.inference_mode():
        for _ in range(3):
            model(x, timestep=t)
        call = per_call_seconds(lambda: model(x, timestep=t), 20, repeats)
        results["model_call_ms"] = 1e3 * call

        # the hook's own cost per call, on a module returning a model-sized output
        const = Constant(model(x, timestep=t))
        bare = per_call_seconds(lambda: const(x, timestep=t), 2000, repeats)
        loop = LoopSpec(steps, streams)

        cache = TaoCache(config_from_dict({"plan": {"budget": 0}}))
        with cache.attach(const, steps=steps, streams=streams, repeat=True):
            hooked = per_call_seconds(lambda: const(x, timestep=t), 2000, repeats)
        results["hook_overhead"] = max(hooked - bare, 0.0) / call

        with DenoiserHook(loop, [CalibrationRecorder()], repeat=True).attach(const):
            recording = per_call_seconds(lambda: const(x, timestep=t), 500, repeats)
        results["calibration_overhead"] = max(recording - bare, 0.0) / call

        # calibrate the real model once (4 prompts), then time skipped vs computed calls
        recorder = CalibrationRecorder(model_id="bench")
        with DenoiserHook(loop, [recorder]).attach(model) as hook:
            for _ in range(4):
                hook.new_sample()
                sample(model, steps, torch.randn(1, *model.shape))
        lut = recorder.lut()

        cache = TaoCache(config_from_dict({"plan": {"budget": budget}}), lut=lut)
        x0 = torch.randn(1, *model.shape)
        skip_times, compute_times = [], []
        with cache.attach(model, steps=steps, streams=streams, repeat=True) as hook:
            plan_skips = cache.plan.skipped_steps
            hooked_forward = model.forward  # the hook's wrapper: time each call through it

            def timed_forward(*args, **kwargs):
                step = (hook.call_index or 0) // 2
                start = time.perf_counter()
                out = hooked_forward(*args, **kwargs)
                (skip_times if step in plan_skips else compute_times).append(time.perf_counter() - start)
                return out

            model.forward = timed_forward
            for _ in range(repeats):
                sample(model, steps, x0)
            model.forward = hooked_forward
        results["skip_cost"] = statistics.median(skip_times) / statistics.median(compute_times)

        # full and TaoCache loops alternate, so that load on the machine hits both alike
        full_times, fast_times = [], []
        for _ in range(repeats):
            full_times.append(timed_loop(model, steps, x0, 1))
            with cache.attach(model, steps=steps, streams=streams):
                fast_times.append(timed_loop(model, steps, x0, 1))
        full, fast = statistics.median(full_times), statistics.median(fast_times)
        pair_speedups = [f / g for f, g in zip(full_times, fast_times)]
        calls = 2 * steps
        skipped = 2 * len(plan_skips)
        ideal = calls / (calls - skipped)
        speedup = statistics.median(pair_speedups)  # each pair ran back to back, under the same load
        results.update(full_loop_s=full, taocache_loop_s=fast, speedup=speedup, ideal_speedup=ideal,
                       speedup_vs_ideal=speedup / ideal, skipped_calls=skipped, calls=calls)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier timings)")
    args = parser.parse_args(argv)
    r = measure(repeats=args.repeats, threads=args.threads)
    if args.json:
        keys = ("hook_overhead", "calibration_overhead", "skip_cost", "speedup_vs_ideal")
        print(json.dumps({k: round(r[k], 6) for k in keys} | {"model_call_ms": round(r["model_call_ms"], 3)}))
        return
    goals = {"hook_overhead": "<= 0.01", "calibration_overhead": "<= 0.03", "skip_cost": "<= 0.02",
             "speedup_vs_ideal": ">= 0.98"}
    print(f"model call: {r['model_call_ms']:.1f} ms (torch threads: {args.threads})")
    print(f"{'measure':<22} {'value':>10}  goal")
    for k, goal in goals.items():
        print(f"{k:<22} {r[k]:>10.4f}  {goal}")
    print(f"end to end: full {r['full_loop_s']:.2f} s, TaoCache {r['taocache_loop_s']:.2f} s, speedup "
          f"{r['speedup']:.3f} (ideal {r['ideal_speedup']:.3f}: {r['skipped_calls']} of {r['calls']} calls skipped)")


if __name__ == "__main__":
    main()
