"""Calibration curves: cosine similarity and norm ratio per step with +-std bands (the paper's Fig. 3/4)."""
from __future__ import annotations

from pathlib import Path
from typing import Union

from .lut import CalibrationLUT

__all__ = ["plot_calibration"]


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
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
