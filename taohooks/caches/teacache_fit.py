"""TeaCache's polynomial fitted in TaoCache's calibration pass, kept next to the LUT.

With ``calibration.teacache_fit: true`` a calibrating run also records TeaCache's (input proxy
rel-L1, output rel-L1) pairs (:class:`~taohooks.caches.teacache.TeaCacheCalibrator`, the proxy of the
config's ``teacache:`` section: the first block's hidden-state input of ``teacache.blocks``) and adds
them after each generation to ``<lut>.teacache.json``: one pass over the prompts calibrates both.
``teacache: {calibrated: true}`` then runs the hybrid's TeaCache with the polynomial fitted on all
the pairs in that file (refitted at load, with :meth:`TeaCacheCalibrator.fit`'s guard against a fit
that is negative on the recorded range)::

    {"format": "taohooks-teacache-fit", "version": 1, "proxy": {"blocks": "blocks", "hidden_arg": 0},
     "generations": 20, "pairs": [[x, y], ...]}

Writes are atomic and merged under the LUT's lock discipline (a lock file per sidecar), so
concurrent calibrating processes add up; a file recorded with another proxy is refused.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..runtime import messages
from ..runtime.callbacks import Callback
from ..runtime.io import atomic_write_bytes, locked
from .teacache import TeaCacheCalibrator

__all__ = ["fit_path", "add_pairs", "load_pairs", "fitted_coefficients", "SaveTeaCacheFit", "FORMAT"]

FORMAT = "taohooks-teacache-fit"


def fit_path(lut_path) -> Path:
    """``luts/model.safetensors`` -> ``luts/model.teacache.json``."""
    path = Path(lut_path)
    return path.with_name(path.stem + ".teacache.json")


def _read(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a TeaCache fit file ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("pairs"), list):
        raise ValueError(f"{path} is not a TeaCache fit file (expected format {FORMAT!r} with a list of pairs)")
    return data


def add_pairs(path, pairs: Sequence[Tuple[float, float]], generations: int, proxy: Dict[str, object]) -> dict:
    """Add ``pairs`` (from ``generations`` generations, recorded with ``proxy``) to the file; returns its contents."""
    path = Path(path)
    with locked(path):
        data = _read(path) or {"format": FORMAT, "version": 1, "proxy": dict(proxy), "generations": 0, "pairs": []}
        if data.get("proxy") != dict(proxy):
            raise ValueError(f"{path} holds TeaCache pairs recorded with the proxy {data.get('proxy')}, this run "
                             f"records {dict(proxy)}; give the run another LUT (its fit file is named after it) or "
                             "delete it")
        data["pairs"] = data["pairs"] + [[float(x), float(y)] for x, y in pairs]
        data["generations"] = int(data.get("generations", 0)) + int(generations)
        atomic_write_bytes(path, json.dumps(data).encode())
    return data


def load_pairs(path) -> dict:
    data = _read(Path(path))
    if data is None:
        raise FileNotFoundError(f"{path} does not exist: teacache.calibrated needs the TeaCache fit that a calibration "
                                "with calibration.teacache_fit: true writes next to the LUT")
    return data


def fitted_coefficients(path, proxy: Dict[str, object]) -> List[float]:
    """The degree-4 polynomial fitted on every pair in the file (recorded with ``proxy``)."""
    data = load_pairs(path)
    if data.get("proxy") != dict(proxy):
        raise ValueError(f"{path} holds TeaCache pairs recorded with the proxy {data.get('proxy')}, the config's "
                         f"teacache: section uses {dict(proxy)}")
    fit = TeaCacheCalibrator()
    fit.pairs = [tuple(p) for p in data["pairs"]]
    return fit.fit()


class SaveTeaCacheFit(Callback):
    """After each generation of a calibrating run, the pairs it recorded go to the fit file (rank 0)."""

    def __init__(self, calibrator: TeaCacheCalibrator, path, proxy: Dict[str, object], writes: bool = True):
        self.calibrator, self.path, self.proxy, self.writes = calibrator, Path(path), dict(proxy), writes
        self._sent = 0

    def on_sample_end(self, hook, sample: int) -> None:
        pairs = self.calibrator.pairs[self._sent:]
        if not self.writes or not pairs:
            return
        try:
            add_pairs(self.path, pairs, 1, self.proxy)
        except (OSError, ValueError) as exc:
            messages.warning(f"TeaCache fit {self.path} was not saved: {exc}; the next generation tries again")
            return
        self._sent = len(self.calibrator.pairs)
