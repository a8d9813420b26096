"""Save clips as a PNG grid: one row per clip, frames left to right."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..runtime.io import atomic_write_bytes, check_writable


def clips_to_image(clips, scale: int = 4, gap: int = 1) -> np.ndarray:
    """``[B, 3, F, H, W]`` in ``[-1, 1]`` -> uint8 ``[B*(H+gap)*scale, F*(W+gap)*scale, 3]``."""
    if hasattr(clips, "detach"):
        clips = clips.detach().float().cpu().numpy()
    x = np.asarray(clips, dtype=np.float32)
    b, c, f, h, w = x.shape
    x = ((x.clip(-1, 1) + 1) * 127.5).round().astype(np.uint8)
    canvas = np.full((b, h + gap, f, w + gap, 3), 255, np.uint8)  # white separators
    canvas[:, :h, :, :w] = x.transpose(0, 3, 2, 4, 1)  # [B, H, F, W, C]
    img = canvas.reshape(b * (h + gap), f * (w + gap), 3)
    return img.repeat(scale, 0).repeat(scale, 1)


def check_grid_path(path: Union[str, Path], flag: str = "--grid") -> Path:
    """Before the work: ``path`` is an image file name (``.png``; another format PIL writes, by its suffix)
    :func:`save_grid` can write (``ValueError`` / ``OSError`` naming ``flag`` otherwise; creates its folder)."""
    path = Path(path)
    try:
        from PIL import Image

        known = set(Image.registered_extensions())
    except ImportError:  # pragma: no cover - PIL is normally present
        known = {".png"}
    if path.suffix.lower() not in known:
        raise ValueError(f"{flag} {path}: expected an image file name such as grid.png")
    check_writable(path)  # (a folder, or one that cannot be written, is named here)
    return path


def check_grid_arg(parser, path, flag: str = "--grid") -> None:
    """:func:`check_grid_path` for a command line: a parser error (exit 2) naming ``flag`` otherwise."""
    try:
        check_grid_path(path, flag)
    except ValueError as exc:
        parser.error(str(exc))
    except OSError as exc:  # (check_writable's FileWriteError names the path and the reason)
        parser.error(f"{flag} {exc}")


def save_grid(clips, path: Union[str, Path], labels: Optional[Sequence[str]] = None, scale: int = 4) -> Path:
    """Write ``clips`` (``[B, 3, F, H, W]``) as an image in the format of ``path``'s suffix (PNG when PIL does not
    know it), atomically (an interrupted write leaves the file it replaces); optional per-row text ``labels`` on
    the right."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = clips_to_image(clips, scale=scale)
    row_h = img.shape[0] // max(len(clips), 1)
    try:
        from PIL import Image, ImageDraw
    except ImportError:  # pragma: no cover - PIL is normally present
        return _save_matplotlib(img, path, labels, row_h)
    pil = Image.fromarray(img)
    if labels:
        text_w = 8 * max(len(s) for s in labels) + 8
        out = Image.new("RGB", (pil.width + text_w, pil.height), "white")
        out.paste(pil, (0, 0))
        draw = ImageDraw.Draw(out)
        for i, s in enumerate(labels):
            draw.text((pil.width + 4, i * row_h + row_h // 2 - 6), s, fill=(0, 0, 0))
        pil = out
    buf = io.BytesIO()
    pil.save(buf, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))  # (the name's format)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _save_matplotlib(img: np.ndarray, path: Path, labels, row_h: int) -> Path:  # pragma: no cover
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(img.shape[1] / 50 + (4 if labels else 0), img.shape[0] / 50))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(img)
    ax.axis("off")
    for i, s in enumerate(labels or []):
        ax.text(img.shape[1] + 4, i * row_h + row_h / 2, s, va="center", fontsize=6)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".").lower() or "png", bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path
