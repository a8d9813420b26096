"""TeaCache's polynomial fitted in TaoCache's calibration pass, kept next to the LUT.

With ``calibration.teacache_fit: true`` a calibrating run also records TeaCache's (input proxy
rel-L1, output rel-L1) pairs (:class:`~taohooks.caches.teacache.TeaCacheCalibrator`, the proxy of the
config's ``teacache:`` section: the first block's hidden-state input of ``teacache.blocks``) and adds
them after each generation to ``<lut>.teacache.json``: one pass over the prompts calibrates both.
``teacache: {calibrated: true}`` then runs the hybrid's TeaCache with the polynomial fitted on the
pairs in that file, one per expert on a two-expert model (Wan2.2; refitted at load, with
:meth:`TeaCacheCalibrator.fit`'s guard against a fit that is negative on the recorded range)::

    {"format": "taohooks-teacache-fit", "version": 2, "proxy": {"blocks": "blocks", "hidden_arg": 0},
     "generations": 20, "pairs": [[x, y], [x, y, 1], ...]}

A pair ``[x, y]`` is expert 0's (or the only model's), ``[x, y, e]`` expert ``e``'s. Version 1 files kept
no experts: they read as one model's, and pairs of a second expert are not added to them.

Writes are atomic and merged under the LUT's lock discipline (a lock file per sidecar), so
concurrent calibrating processes add up; a file recorded with another proxy is refused.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

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
    if data.get("version", 1) not in (1, 2):
        raise ValueError(f"{path}: TeaCache fit file version {data.get('version')!r}; this taohooks reads 1 and 2")
    return data


def add_pairs(path, pairs: Sequence[Tuple[float, float]], generations: int, proxy: Dict[str, object],
              lut_created: str = "", experts: Optional[Sequence[int]] = None) -> dict:
    """Add ``pairs`` (from ``generations`` generations, recorded with ``proxy`` while calibrating the LUT
    created at ``lut_created``; ``experts``: the expert of each pair, Wan2.2's two) to the file; returns
    its contents. A file of an earlier LUT (deleted and calibrated again) is started again, not added to."""
    path = Path(path)
    with locked(path):
        data = _read(path)
        if data is not None and data.get("lut_created") != lut_created:
            messages.notice(f"TeaCache fit {path} belonged to an earlier calibration of the LUT (created "
                            f"{data.get('lut_created') or '?'}); it starts again with this one")
            data = None
        if data is None:
            data = {"format": FORMAT, "version": 2, "lut_created": lut_created, "proxy": dict(proxy),
                    "generations": 0, "pairs": []}
        if data.get("proxy") != dict(proxy):
            raise ValueError(f"{path} holds TeaCache pairs recorded with the proxy {data.get('proxy')}, this run "
                             f"records {dict(proxy)}; give the run another LUT (its fit file is named after it) or "
                             "delete it")
        experts = list(experts) if experts is not None else [0] * len(pairs)
        if data.get("version", 1) < 2 and data["pairs"] and any(experts):  # its pairs' experts are unknown
            raise ValueError(f"{path} was written before the fit file kept each pair's expert, and this run records "
                             "a second expert's pairs: delete it (and its LUT) and calibrate both again")
        data["version"] = max(int(data.get("version", 1)), 2)
        data["pairs"] = data["pairs"] + [[float(x), float(y)] + ([int(e)] if e else []) for (x, y), e in
                                         zip(pairs, experts)]  # [x, y] of expert 0 (as files before), [x, y, e]
        data["generations"] = int(data.get("generations", 0)) + int(generations)
        atomic_write_bytes(path, json.dumps(data).encode())
    return data


def load_pairs(path) -> dict:
    data = _read(Path(path))
    if data is None:
        raise FileNotFoundError(f"{path} does not exist: teacache.calibrated needs the TeaCache fit that a calibration "
                                "with calibration.teacache_fit: true writes next to the LUT")
    return data


def fitted_coefficients(path, proxy: Dict[str, object], lut_created: Optional[str] = None):
    """The degree-4 polynomial fitted on the pairs in the file (recorded with ``proxy``; with
    ``lut_created``, while calibrating that LUT): one list, or ``{expert: coefficients}`` where the pairs
    came from two experts (:meth:`TeaCacheCalibrator.fit_per_expert`)."""
    data = load_pairs(path)
    if data.get("proxy") != dict(proxy):
        raise ValueError(f"{path} holds TeaCache pairs recorded with the proxy {data.get('proxy')}, the config's "
                         f"teacache: section uses {dict(proxy)}")
    if lut_created is not None and data.get("lut_created") != lut_created:
        raise ValueError(f"{path} was fitted while calibrating another LUT (created {data.get('lut_created') or '?'}; "
                         f"this LUT was created {lut_created}); delete the LUT and calibrate both again")
    fit = TeaCacheCalibrator()
    fit.pairs = [(float(p[0]), float(p[1])) for p in data["pairs"]]
    fit.pair_experts = [int(p[2]) if len(p) > 2 else 0 for p in data["pairs"]]
    return fit.fit_per_expert()


class SaveTeaCacheFit(Callback):
    """After each generation the LUT took, a calibrating run adds the pairs it recorded to the fit file
    (rank 0; an aborted generation's pairs are dropped; a failed save is retried after the next
    generation and at the end of the process)."""

    def __init__(self, calibrator: TeaCacheCalibrator, path, proxy: Dict[str, object], lut_path):
        self.calibrator, self.path, self.proxy, self.lut_path = calibrator, Path(path), dict(proxy), Path(lut_path)
        self._sent = 0
        self._start = 0
        self._generations = 0
        self._exit_registered = False

    def on_sample_start(self, hook, sample: int) -> None:
        self._start = len(self.calibrator.pairs)

    def on_sample_abort(self, hook, sample: int, reason: str) -> None:
        del self.calibrator.pairs[self._start:]
        del self.calibrator.pair_experts[self._start:]

    def on_sample_end(self, hook, sample: int) -> None:
        self._generations += 1
        self._save("the next generation tries again, and the end of the process")

    def _save(self, then: str) -> None:
        from ..taocache.cache import _writes_the_lut
        from ..taocache.lut import CalibrationLUT

        pairs = self.calibrator.pairs[self._sent:]
        if not pairs or not _writes_the_lut():
            return
        try:
            created = CalibrationLUT.load(self.lut_path).created  # the LUT this calibration writes
            add_pairs(self.path, pairs, self._generations, self.proxy, created,
                      experts=self.calibrator.pair_experts[self._sent:])
        except (OSError, ValueError) as exc:
            messages.warning(f"TeaCache fit {self.path} was not saved: {exc}; {then}")
            if not self._exit_registered:
                import atexit

                atexit.register(self._save, "its pairs are lost")
                self._exit_registered = True
            return
        self._sent, self._generations = len(self.calibrator.pairs), 0
