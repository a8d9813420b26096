"""Calibration curves (the paper's Fig. 3/4, with +-std bands), quality-vs-speedup plots, and the
error-aware planner's predicted against measured PSNR."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Dict, List, Union

from ..runtime.io import atomic_write_bytes
from ..taocache.lut import CalibrationLUT

__all__ = ["plot_calibration", "plot_quality_vs_speedup", "plot_predicted_vs_measured", "save_figure"]


def save_figure(fig, path: Union[str, Path], **savefig_kwargs) -> Path:
    """Render ``fig`` in memory (the format from ``path``'s suffix, PNG without one), write it atomically
    and close the figure: an interrupted or failed render leaves an earlier file of that name whole."""
    import matplotlib.pyplot as plt

    path = Path(path)
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format=path.suffix[1:].lower() or "png", **savefig_kwargs)
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def plot_calibration(lut: CalibrationLUT, path: Union[str, Path], dpi: int = 120) -> Path:
    """Write a PNG with one line per stream; needs matplotlib (``pip install 'taohooks[eval]'``)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("plotting needs matplotlib: pip install 'taohooks[eval]'") from exc
    steps = list(range(lut.steps))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = ((axes[0], lut.cos_mean, lut.cos_std, "cosine similarity of consecutive deltas"),
              (axes[1], lut.ratio_mean, lut.ratio_std, "norm ratio ||D_t|| / ||D_{t-1}||"))
    for ax, mean, std, title in panels:
        for i, name in enumerate(lut.streams):
            m, s = mean[i].numpy(), std[i].numpy()
            (line,) = ax.plot(steps, m, label=name, marker=".", lw=1.2)
            ax.fill_between(steps, m - s, m + s, color=line.get_color(), alpha=0.2, lw=0)
        ax.set_title(title)
        ax.set_xlabel("step (model calls per stream)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{lut.model_id or 'model'}: {lut.num_prompts} prompts, sampler {lut.sampler or '?'}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path, dpi=dpi)


def plot_quality_vs_speedup(rows: List[Dict], title: str, path: Union[str, Path], dpi: int = 110) -> Path:
    """PSNR and SSIM against the measured speedup, one line per ``row["method"]`` with its points in
    ``row["budget"]`` order, each labelled with its budget; rows whose speedup or metric is None are left out.
    Needs matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .methods import missed_budget

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["budget"])
        for ax, key in zip(axes, ("psnr", "ssim")):
            pts = [(r["speedup"], r[key], r) for r in points if r["speedup"] is not None and r[key] is not None]
            if pts:
                line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
                for x, y, r in pts:  # which point is which budget (noisy speedups cross the lines)
                    missed = missed_budget(r)  # (a threshold search that missed the budget: the share it skipped)
                    ax.annotate(f"{100 * r['budget']:.0f}%" + (f" (missed: {100 * r['skipped_fraction']:.0f}% "
                                                              "skipped)" if missed else ""),
                                (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7, color=line.get_color())
    for ax, label in zip(axes, ("PSNR (dB) vs full-step", "SSIM vs full-step")):
        ax.set_xlabel("measured speedup")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path, dpi=dpi)


def plot_predicted_vs_measured(rows: List[Dict], title: str, path: Union[str, Path], dpi: int = 110) -> Path:
    """Measured PSNR against the plan's predicted (open-loop) PSNR, one series per ``row["method"]``,
    each point labelled with its budget; rows without ``predicted_psnr`` are left out. The diagonal is
    a perfect prediction; points below it did worse than predicted. Needs matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    values = []
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted(((r["predicted_psnr"], r["psnr"], r["budget"]) for r in rows if r["method"] == method
                      and r.get("predicted_psnr") is not None and r.get("psnr") is not None), key=lambda p: p[2])
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        for x, y, b in pts:
            ax.annotate(f"{100 * b:.0f}%", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
        values += [v for p in pts for v in p[:2]]
    if values:
        lo, hi = min(values) - 2, max(values) + 2
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--", label="measured = predicted")
    ax.set_xlabel("predicted PSNR (dB, open loop, from the calibration)")
    ax.set_ylabel("measured PSNR (dB) vs full-step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=dpi)
