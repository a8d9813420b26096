"""Pictures of a ``taocache compare`` run (matplotlib / Pillow; skipped silently without them).

- ``quality_vs_speedup.png``: PSNR and SSIM against the measured speedup, one line per method
  (points in budget order); from ``results.json`` alone.
- ``skip_schedule.png``: which steps each method x budget skipped, rows x steps, the shade the
  fraction of that step's calls skipped over all prompts and streams, a red line at Wan2.2's expert
  switch; from ``results.json`` alone.
- ``strip.png``: the first prompts' videos side by side, full-step first, then each method at the
  largest budget (up to 4 frames each); needs the stored runs.
- ``side_by_side.gif``: the same videos playing, one row per method, one column per prompt (an
  animated GIF: Pillow is all it needs; no video codec dependency).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import torch

from ..evaluation.plotting import plot_quality_vs_speedup, save_figure

__all__ = ["write_plots", "write_strip", "write_animation"]


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:  # pragma: no cover
        return None


def write_plots(results: Dict[str, Any], folder) -> List[Path]:
    """The two plots from ``results.json``'s content; returns the files written."""
    plt = _pyplot()
    rows = results["aggregates"]
    if plt is None or not rows:
        return []
    folder, written = Path(folder), []
    meta = results["meta"]
    plot_quality_vs_speedup(rows, f"quality vs speedup: {meta.get('integration', '')}, {meta.get('loop', '')}",
                            folder / "quality_vs_speedup.png")
    written.append(folder / "quality_vs_speedup.png")

    records = [r for r in results["records"] if r["method"] != "full"]
    labels = list(dict.fromkeys((r["method"], r["skips"]) for r in records))
    steps = records[0]["steps"] if records else 0
    if labels and steps:
        grid = torch.zeros(len(labels), steps)
        for i, (method, skips) in enumerate(labels):
            mine = [r for r in records if (r["method"], r["skips"]) == (method, skips)]
            for r in mine:
                for step, _ in r["skipped_schedule"]:
                    grid[i, step] += 1.0
            grid[i] /= max(1, sum(r["calls"] for r in mine) / steps)  # calls per step, over prompts
        fig, ax = plt.subplots(figsize=(max(6, steps * 0.18), 0.4 * len(labels) + 1.2))
        ax.imshow(grid.numpy(), aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks(range(len(labels)), [f"{m} {s}/{steps}" for m, s in labels])
        switch = meta.get("expert_switch")
        if switch is not None:  # Wan2.2's A14B tasks: where the low-noise expert takes over
            ax.axvline(switch - 0.5, color="tab:red", linewidth=1.5)
            ax.text(switch - 0.5, -0.6, " expert switch", color="tab:red", fontsize=8, va="bottom")
        ax.set_xlabel("step (black: every call of the step skipped)")
        fig.tight_layout()
        save_figure(fig, folder / "skip_schedule.png", dpi=110)
        written.append(folder / "skip_schedule.png")
    return written


def write_strip(videos: Dict[str, torch.Tensor], path: Path, frames: int = 4) -> bool:
    """``videos``: name -> ``[N, 3, F, H, W]`` in [-1, 1] (same N); one row per name, up to ``frames``
    evenly spaced frames of each video (bench's strip). False if Pillow is missing or not RGB."""
    from ..evaluation.bench import write_strip as bench_strip

    first = next(iter(videos.values()))
    if first.shape[1] != 3:
        return False
    f = first.shape[2]
    keep = torch.linspace(0, f - 1, min(frames, f)).round().long()
    scale = 3 if first.shape[-1] <= 64 else 1
    try:
        import PIL  # noqa: F401
    except ImportError:  # pragma: no cover
        return False
    bench_strip({k: v[:, :, keep] for k, v in videos.items()}, Path(path), scale=scale)
    return True


def write_animation(videos: Dict[str, torch.Tensor], path: Path, fps: float = 8.0, max_side: int = 256) -> bool:
    """``videos`` as :func:`write_strip`'s, playing: an animated GIF whose frame ``t`` shows frame ``t``
    of every video (rows: names, columns: the N videos), each video scaled to at most ``max_side``
    pixels (up, by whole factors, for tiny ones). False if Pillow is missing or not RGB."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:  # pragma: no cover
        return False
    first = next(iter(videos.values()))
    if first.shape[1] != 3:
        return False
    n, _, f, h, w = first.shape
    scale = max(1, max_side // max(h, w)) if max(h, w) < max_side else 1
    step = max(1, -(-max(h, w) // max_side))  # downsample huge videos by striding
    label_w, gap = 150, 2
    cell_h, cell_w = -(-h // step) * scale, -(-w // step) * scale
    pictures = []
    for t in range(f):
        canvas = Image.new("RGB", (label_w + n * (cell_w + gap), len(videos) * (cell_h + gap)), "white")
        draw = ImageDraw.Draw(canvas)
        for row, (name, video) in enumerate(videos.items()):
            top = row * (cell_h + gap)
            draw.text((6, top + cell_h // 2 - 6), name, fill="black")
            for col in range(n):
                frame = ((video[col, :, t, ::step, ::step].permute(1, 2, 0) + 1) / 2).clamp(0, 1)
                tile = Image.fromarray((frame.numpy() * 255).round().astype("uint8"))
                tile = tile.resize((cell_w, cell_h), Image.NEAREST)
                canvas.paste(tile, (label_w + col * (cell_w + gap), top))
        pictures.append(canvas)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=int(1000 / fps), loop=0)
    return True
