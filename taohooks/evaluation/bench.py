"""``taocache bench CONFIG.yaml``: methods x budgets x testbed models, as in the paper's tables.

For every model: one set of full-step calibration runs (TaoCache LUT, TeaCache polynomial,
MagCache ratios) on calibration pairs disjoint from the evaluation pairs; the full-step reference
on the evaluation pairs; then every method at every budget on the same pairs, scored against the
reference (PSNR, SSIM, LPIPS per frame, averaged), by prompt-following accuracy, and timed in the
same process: the full-step and the cached run of the first evaluation batch alternate back to
back (``timing_repeats`` times each) and the speedup is the ratio of their summed wall times.

Writes ``results.json`` (one record per model x method x budget; the reference is method
``full``, budget 0), ``results.md`` (tables shaped like the paper's Tables 1-3) and plots.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..config import dataclass_from_dict, read_yaml
from ..metrics.weights import sha256_of
from ..runtime import messages
from ..runtime.io import atomic_write_bytes, locked
from ..taocache.lut import CalibrationLUT
from .plotting import plot_calibration
from .methods import (IMPLAUSIBLE_NOTE, METHODS, MethodSettings, build_method, calibrate, implausible_speedup,
                      paired_speedup, run_with)
from .testbed_model import MODEL_NAMES, SHIPPED_MODELS, TestbedModel, weights_path

__all__ = ["BenchConfig", "run_bench", "load_bench_config", "load_results", "merge_records", "markdown_tables"]


@dataclass
class BenchConfig:
    models: List[str] = field(default_factory=lambda: list(SHIPPED_MODELS))
    methods: List[str] = field(default_factory=lambda: list(METHODS))
    budgets: List[float] = field(default_factory=lambda: [0.04, 0.08, 0.12, 0.16, 0.20, 0.25])
    steps: int = 50
    eval_pairs: int = 64
    calibration_pairs: int = 20
    search_pairs: int = 8
    batch_size: int = 16
    output: str = "docs/results"
    lpips: bool = True
    pab_range: int = 2
    hybrid_guard: int = 2
    # the hybrid: TaoCache's skips at every budget (at most the budget; the paper's hybrid run: 7), TeaCache the rest;
    # None: half of each budget
    hybrid_tao_skips: Optional[int] = None
    magcache_max_skip: int = 2
    search_iterations: int = 12  # bisection steps of the TeaCache/MagCache threshold search
    strip_pairs: int = 4  # clips shown side by side in the PNG strip
    timing_repeats: int = 2  # speedup: full and cached runs of the first batch, alternating, this many times each
    threads: Optional[int] = None  # torch CPU threads (None: torch's default)
    weights: Dict[str, str] = field(default_factory=dict)  # model -> checkpoint file (default: the bundled one)
    device: str = "cpu"  # where the models run (cuda on a GPU); clips are scored on the CPU

    def validate(self, err) -> None:
        for key, choices in (("models", MODEL_NAMES), ("methods", METHODS)):  # (an empty list ran nothing, "wrote")
            if not getattr(self, key):
                err(key, f"an empty list: nothing would run; list one or more of {', '.join(choices)}")
        if not self.budgets:
            err("budgets", "an empty list: nothing would run; list fractions of the steps in (0, 1), e.g. [0.16]")
        for m in self.models:
            if m not in MODEL_NAMES:
                err("models", f"unknown testbed model {m!r}; one of {', '.join(MODEL_NAMES)}")
        for m in self.methods:
            if m not in METHODS:
                err("methods", f"unknown method {m!r}; one of {', '.join(METHODS)}")
        for b in self.budgets:
            if not 0 < b < 1:
                err("budgets", f"budgets are fractions of the steps in (0, 1), got {b}")
        for m, path in self.weights.items():
            if m not in MODEL_NAMES:
                err("weights", f"unknown testbed model {m!r}; one of {', '.join(MODEL_NAMES)}")
            elif m not in self.models:
                err("weights", f"{m}: not among the models this bench runs ({', '.join(self.models)}); its "
                               "checkpoint would not be used")
            elif Path(path).is_dir():
                err("weights", f"{m}: {path} is a folder, not a checkpoint file")
            elif not Path(path).is_file():
                err("weights", f"{m}: no checkpoint file {path}")
        try:
            torch.empty(0, device=torch.device(self.device))
        except (RuntimeError, AssertionError) as exc:
            err("device", f"{self.device!r} is not usable here ({type(exc).__name__}: {exc})")
        if self.eval_pairs < 1 or self.calibration_pairs < 2 or self.batch_size < 1:
            err("eval_pairs", "eval_pairs and batch_size must be >= 1, calibration_pairs >= 2")
        positive = {"steps": (self.steps, 3), "search_pairs": (self.search_pairs, 1),
                    "search_iterations": (self.search_iterations, 1), "timing_repeats": (self.timing_repeats, 1),
                    "strip_pairs": (self.strip_pairs, 0), "pab_range": (self.pab_range, 1),
                    "hybrid_guard": (self.hybrid_guard, 0), "magcache_max_skip": (self.magcache_max_skip, 0)}
        if self.hybrid_tao_skips is not None:
            positive["hybrid_tao_skips"] = (self.hybrid_tao_skips, 1)
        for key, (value, least) in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                err(key, f"expected an integer >= {least}, got {value!r}")
        if isinstance(self.steps, int) and self.steps >= 3:
            from ..compare.runner import _PerfectLUT
            from ..config import PlanConfig
            from ..taocache.cache import make_plan
            from ..taocache.plan import PlanError

            seen = {}
            for i, b in enumerate(self.budgets):
                skips = skips_of(b, self.steps)
                if skips in seen:  # (every method: two records under one key, of which an --update replaced one)
                    err(f"budgets[{i}]", f"{b} gives {skips} skipped steps of {self.steps}, as {seen[skips]} does: "
                                         "the same row twice")
                seen[skips] = b
                if not set(self.methods) & WINDOW_METHODS:
                    continue
                try:  # the paper's window on a LUT that fits every window: one no LUT fits is refused before the work
                    make_plan(PlanConfig(budget=skips), self.steps, ("cond", "uncond"), _PerfectLUT(2, self.steps))
                except PlanError as exc:
                    err(f"budgets[{i}]", f"{b} ({skips} of {self.steps} steps): {exc}")
        if self.search_pairs > self.calibration_pairs:
            err("search_pairs", f"{self.search_pairs} search pairs, but the threshold searches use the first of the "
                                f"{self.calibration_pairs} calibration pairs: at most {self.calibration_pairs}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            err("threads", f"expected an integer >= 1 (or null: torch's default), got {self.threads!r}")

    def check_compatible(self, previous: dict, source) -> None:
        """Raise ``ValueError`` unless records of this config can join ``previous`` (a results.json's ``meta``):
        every setting that changes the figures of the records this run makes (its methods') must be the
        one the folder's latest run had (an update may have changed a method's setting, e.g. the search's
        iterations, and made that method's rows again)."""
        runs = [previous.get("config") or {}] + [u.get("config") or {} for u in previous.get("updates", [])]
        for key in RESULT_SETTINGS:
            used_by = METHOD_SETTINGS.get(key)
            if used_by is not None and not set(used_by) & set(self.methods):
                continue  # none of this run's methods depends on it
            before = {}
            for run in runs:  # the setting as the latest run whose methods used it had it
                if used_by is None or set(used_by) & set(run.get("methods") or ()):
                    if key in run:
                        before[key] = run[key]
                    elif key in UNRECORDED:  # (a setting added since: that run had its value of then)
                        before[key] = UNRECORDED[key]
            if key in before and before[key] != getattr(self, key):
                raise ValueError(f"{source}: its records were made with {key}: {before[key]!r}, this run has "
                                 f"{key}: {getattr(self, key)!r}; --update adds records made the same way only "
                                 "(choose another -o for other settings)")
        old_sums = previous.get("weights_sha256") or {}
        for model in self.models:
            path, old = self.weights.get(model), None
            for run in runs:  # the checkpoint of the latest run of this model
                if model in (run.get("models") or ()):
                    old = (run.get("weights") or {}).get(model)
            if model in old_sums:
                now = sha256_of(path or weights_path(model))
                if now != old_sums[model]:
                    raise ValueError(f"{source}: its {model!r} records were made with another checkpoint (sha256 "
                                     f"{old_sums[model][:12]}..., this run's {path or weights_path(model)} is "
                                     f"{now[:12]}...)")
            elif path != old:
                raise ValueError(f"{source}: its {model!r} records were made with weights {old or 'bundled'}, this "
                                 f"run has {path or 'bundled'}")


def skips_of(budget: float, steps: int) -> int:
    """Skipped steps of a budget (a fraction of the steps): rounded half up, at least one (as compare and
    ``plan.budget`` round it)."""
    from ..taocache.plan import fraction_skips

    return max(1, fraction_skips(budget, steps))


# the settings that change a record's figures (an update must have the folder's)
RESULT_SETTINGS = ("steps", "eval_pairs", "calibration_pairs", "search_pairs", "batch_size", "lpips", "pab_range",
                   "hybrid_guard", "hybrid_tao_skips", "magcache_max_skip", "search_iterations", "device")
UNRECORDED = {"hybrid_tao_skips": None}  # settings added since folders were first written: the value runs had then
_SEARCHED = ("teacache", "magcache", "easycache", "hybrid")  # the methods whose threshold is searched
WINDOW_METHODS = {"taocache", "taoskip+tearesidual", "pab+taocache"}  # the paper's window at the whole budget
METHOD_SETTINGS = {"search_pairs": _SEARCHED, "search_iterations": _SEARCHED, "pab_range": ("pab+taocache",),
                   "hybrid_guard": ("hybrid",), "hybrid_tao_skips": ("hybrid",),
                   "magcache_max_skip": ("magcache",)}  # the rest: every method


def settle_lpips(config: BenchConfig, command: str = "bench"):
    """The LPIPS model the bench (or ``command``, the demo) scores with, or ``None``: with ``lpips: true`` but no
    converted weights, a warning (the bench's: the demo's conversion said why), and ``config.lpips`` set false (what
    the results record). A broken weights file raises."""
    if not config.lpips:
        return None
    from ..metrics import load_lpips
    from ..runtime import messages

    model = load_lpips()
    if model is None:
        if command == "bench":  # (the demo converted them first, and said why it could not)
            messages.warning("bench: lpips is true, but the LPIPS weights are not converted (`taocache "
                             "lpips-weights` converts them once); this run records no LPIPS (lpips: false)")
        config.lpips = False
    return model


def load_bench_config(path, overrides: Optional[Dict[str, object]] = None) -> BenchConfig:
    """The bench config at ``path``, with ``overrides`` (the command line's values, by YAML key) put in before it
    is checked: a value the command line replaces is not refused from the file, and one it gives is named by its
    flag (``--key``)."""
    from ..config import ConfigError, is_taocache_config

    data = read_yaml(path)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if given and isinstance(data, dict):
        data = {**data, **given}
        if "models" in given and isinstance(data.get("weights"), dict):  # (one model per process: the others')
            data["weights"] = {m: w for m, w in data["weights"].items() if m in given["models"]}
    try:
        config = dataclass_from_dict(BenchConfig, data, str(path))
    except ConfigError as exc:
        key = (exc.key or "").split("[")[0].split(".")[0]
        if key in given:
            raise ConfigError("command line", f"--{key}", str(exc).split(f"{exc.key}: ", 1)[-1]) from None
        if is_taocache_config(data):
            raise ConfigError(str(path), "", "this is a TaoCache config (for --taocache / taocache-run); a bench config "
                                             "lists models, methods and budgets: see configs/bench.yaml") from None
        raise
    if "hybrid" in config.methods:
        from ..taocache.cache import thin_guard_warning

        thin_guard_warning(f"{path}: hybrid_guard", config.hybrid_guard)
    return config


def _testbed_accuracy(clips, prompts) -> float:
    from ..testbed import recognizer

    return float(recognizer.accuracy(clips, prompts)["overall"])


class _Scorer:
    """PSNR/SSIM/LPIPS against the reference clips, and prompt accuracy."""

    def __init__(self, reference: torch.Tensor, prompts, use_lpips, accuracy=None):
        from ..metrics import psnr, ssim

        if accuracy is None:  # the three shipped models' recogniser
            accuracy = _testbed_accuracy

        self.reference, self.prompts = reference, prompts
        self._psnr, self._ssim, self._accuracy = psnr, ssim, accuracy
        self.lpips_model = None
        if use_lpips is True:
            from ..metrics import load_lpips
            self.lpips_model = load_lpips()
        elif use_lpips:  # a loaded LPIPS model
            self.lpips_model = use_lpips

    def accuracy(self, clips) -> float:
        return self._accuracy(clips, self.prompts)

    def __call__(self, clips) -> Dict[str, Optional[float]]:
        out = {"psnr": float(self._psnr(clips, self.reference).mean()),
               "ssim": float(self._ssim(clips, self.reference).mean()),
               "lpips": None, "prompt_accuracy": self.accuracy(clips)}
        if self.lpips_model is not None:
            from ..metrics import lpips_video
            out["lpips"] = float(lpips_video(clips, self.reference, self.lpips_model).mean())
        return out


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit="run")
    except ImportError:  # pragma: no cover
        return None


def _key(record: dict) -> tuple:
    return record["model"], record["method"], round(record["budget"], 6)


def merge_records(kept: List[dict], new: List[dict]) -> List[dict]:
    """``kept`` with every record that ``new`` has again (same model, method, budget) replaced in place;
    the other new records follow."""
    fresh = {_key(r): r for r in new}
    merged = [fresh.pop(_key(r), r) for r in kept]
    return merged + list(fresh.values())


def _same_calibration(path: Path, lut) -> bool:
    """Whether the LUT file holds the statistics ``lut`` holds (counts, sums, delta products and their kinds)."""
    try:
        kept = CalibrationLUT.load(path)
    except (OSError, ValueError):
        return False
    same = all(torch.equal(getattr(kept, m).count, getattr(lut, m).count)
               and torch.equal(getattr(kept, m).total, getattr(lut, m).total) for m in ("cos", "ratio"))
    kinds = [(d is None, d is None or d.cross is None) for d in (kept.deltas, lut.deltas)]
    return same and kinds[0] == kinds[1] and (lut.deltas is None or torch.equal(
        kept.deltas.gram.nan_to_num(-1.0), lut.deltas.gram.nan_to_num(-1.0)))


def run_bench(config: BenchConfig, log=print, previous: Optional[dict] = None, command: str = "bench",
              replace: bool = False, finished: Optional[List[str]] = None) -> List[dict]:
    """Run the experiment; returns the records and writes the files under ``config.output``. ``finished``: each
    model's name is added to it once its records are written (what an interrupted run kept).

    ``previous``: an earlier ``results.json`` (:func:`load_results`) to update: its records are
    kept except those this run makes again, its ``meta`` gains an entry under ``updates``, and
    the PNG strip, the LUTs and the calibration plots are left as they were (a missing strip is drawn). The file
    is written under its lock, read again first, so that updates running side by side all keep their records.
    Without ``previous``, an existing ``results.json`` is refused (when it is written) unless ``replace``.
    """
    keep = previous["records"] if previous else []
    lpips_model = settle_lpips(config, command)  # before any work: a broken LPIPS file fails here, not later
    run_id = f"{time.time():.6f}-{os.getpid()}"
    sums: Dict[str, str] = {}
    torch.manual_seed(0)
    if config.threads:
        torch.set_num_threads(config.threads)
    out_dir = Path(config.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = MethodSettings(pab_range=config.pab_range, hybrid_guard=config.hybrid_guard,
                              hybrid_tao_skips=config.hybrid_tao_skips,
                              magcache_max_skip=config.magcache_max_skip,
                              search_iterations=config.search_iterations)
    records: List[dict] = []
    started = time.perf_counter()
    for name in config.models:
        tm = TestbedModel.load(name, config.steps, config.weights.get(name), device=config.device)
        sums[name] = sha256_of(config.weights.get(name) or weights_path(name))
        eval_pairs = tm.eval_pairs(config.eval_pairs)  # each model's own prompts (scenes has its own)
        cal_pairs = tm.calibration_pairs(config.calibration_pairs)
        search_pairs = cal_pairs[:config.search_pairs]
        cal = calibrate(tm, cal_pairs, config.batch_size)
        kept = out_dir / f"lut_{name}.safetensors"
        if previous and kept.exists() and not _same_calibration(kept, cal.lut):  # (said nowhere: review, 2026-11-29)
            fresh = out_dir / f"lut_{name}.update.safetensors"
            cal.lut.save(fresh)
            messages.warning(f"[{name}] {kept} is not this run's calibration (another taohooks or checkpoint made it, "
                             f"or it lacks statistics this one records): the rows this update makes plan from this "
                             f"run's, saved as {fresh}; the folder's stays, for the rows made before")
        if not (previous and kept.exists()):  # an update keeps the folder's
            cal.lut.save(kept)
            try:
                plot_calibration(cal.lut, out_dir / f"calibration_{name}.png", dpi=110)
            except RuntimeError:  # no matplotlib
                pass
        log(f"[{name}] calibrated on {len(cal_pairs)} pairs in {cal.seconds:.1f} s")
        reference = run_with(tm, [], eval_pairs, config.batch_size)
        scorer = _Scorer(reference.clips, [p for p, _ in eval_pairs], lpips_model, tm.accuracy)
        records.append({"model": name, "method": "full", "budget": 0.0, "skipped_fraction": 0.0, "speedup": 1.0,
                        "psnr": None, "ssim": None, "lpips": None,
                        "prompt_accuracy": scorer.accuracy(reference.clips), "seconds": reference.seconds})
        # (copies: a slice would keep every clip of its run in memory until the model's results are written)
        strips = {"full": reference.clips[:config.strip_pairs].clone()}
        bar = _progress(len(config.methods) * len(config.budgets), f"bench {name}")
        measured: dict = {}  # threshold -> skipped fraction on the search pairs, shared by the budgets' searches
        strip_budget = min(config.budgets, key=lambda b: abs(b - 0.16))  # the strip's: the paper's 16%, or nearest
        for budget in config.budgets:
            skips = skips_of(budget, config.steps)
            for method in config.methods:
                built = build_method(method, tm, cal, skips, search_pairs, config.batch_size, settings, measured)
                run = run_with(tm, built.callbacks, eval_pairs, config.batch_size)
                speedup = paired_speedup(tm, built.callbacks, eval_pairs[:config.batch_size], config.timing_repeats)
                record = {"model": name, "method": method, "budget": skips / config.steps,
                          "skipped_fraction": run.skipped_fraction, "speedup": speedup,
                          **scorer(run.clips), "seconds": run.seconds,
                          **{k: (list(v) if isinstance(v, tuple) else v) for k, v in built.info.items()}}
                records.append(record)
                if budget == strip_budget:
                    strips[method] = run.clips[:config.strip_pairs].clone()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(method=method, budget=f"{skips}/{config.steps}")
        if bar is not None:
            bar.close()
        keep = write_results(records, out_dir, config, time.perf_counter() - started, update=previous is not None,
                             run_id=run_id, weights_sha256=sums, command=command, replace=replace)
        if finished is not None:
            finished.append(name)
        kept = previous and (out_dir / f"strip_{name}.png").exists()  # an update keeps the strip it has
        if config.strip_pairs and len(strips) > 1 and not kept:
            write_strip(strips, out_dir / f"strip_{name}.png")
        log(f"[{name}] done; {len(records)} records so far ({time.perf_counter() - started:.0f} s)")
    return keep


def load_results(path) -> dict:
    """A ``results.json`` written by :func:`run_bench`: ``{"meta": ..., "records": [...]}``, each record
    checked (``ValueError`` naming the file and the record)."""
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(results, dict) or not isinstance(results.get("records"), list) \
            or not isinstance(results.get("meta"), dict):
        raise ValueError(f"{path}: not a taocache bench results file (expected keys 'meta' and 'records')")
    for i, r in enumerate(results["records"]):
        if not (isinstance(r, dict) and isinstance(r.get("model"), str) and isinstance(r.get("method"), str)
                and isinstance(r.get("budget"), (int, float)) and not isinstance(r.get("budget"), bool)):
            raise ValueError(f"{path}: records[{i}] is not a bench record (expected 'model' and 'method' strings and "
                             f"a number 'budget'), got {json.dumps(r)[:200]}")
    return results


# ---------------------------------------------------------------------- reports
def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown_tables(records: List[dict]) -> str:
    """One table per model, rows grouped by budget, like the paper's Tables 1-3."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in records):
        rows = [r for r in records if r["model"] == model]
        full = next(r for r in rows if r["method"] == "full")
        lines += [f"### testbed `{model}`", "",
                  f"Full-step reference: prompt accuracy {full['prompt_accuracy']:.3f}, "
                  f"{full['seconds']:.1f} s for the evaluation pairs.", "",
                  "| budget | method | speedup | % calls skipped | LPIPS ↓ | SSIM ↑ | PSNR ↑ (dB) | prompt acc. |",
                  "|---|---|---|---|---|---|---|---|"]
        implausible = []
        for r in sorted((r for r in rows if r["method"] != "full"), key=lambda r: (r["budget"], r["method"])):
            mark = "†" if implausible_speedup(r["method"], r["speedup"], r["skipped_fraction"]) else ""
            if mark:
                implausible.append(f"{r['method']} at {100 * r['budget']:.0f}%")
            lines.append(f"| {100 * r['budget']:.0f}% | {r['method']} | {r['speedup']:.3f}x{mark} | "
                         f"{100 * r['skipped_fraction']:.1f}% | {_fmt(r['lpips'], '.4f')} | {_fmt(r['ssim'], '.4f')} | "
                         f"{_fmt(r['psnr'], '.2f')} | {r['prompt_accuracy']:.3f} |")
        if implausible:
            lines += ["", IMPLAUSIBLE_NOTE.format(", ".join(implausible))]
        lines.append("")
    return "\n".join(lines)


def write_results(records: List[dict], out_dir: Path, config: BenchConfig, seconds: float, update: bool = False,
                  run_id: str = "", weights_sha256: Optional[Dict[str, str]] = None, command: str = "bench",
                  replace: bool = False) -> List[dict]:
    """Write this run's ``records`` (all of them so far) to ``out_dir``: ``results.json``, ``results.md``
    and the plots. Under the lock of ``results.json``, the file is read again: an update
    (``update``) merges into what is there now (other updates may have added records meanwhile),
    and lists this run (``run_id``) under ``meta.updates``; a first run refuses a file another run
    wrote meanwhile (unless ``replace``). Returns the records written."""
    path = out_dir / "results.json"
    meta = {"config": {k: v for k, v in config.__dict__.items()}, "wall_seconds": round(seconds, 1),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "run": run_id, "command": command,
            "weights_sha256": dict(weights_sha256 or {})}
    with locked(path):
        current = load_results(path) if path.is_file() else None
        if update:
            if current is None:
                raise ValueError(f"{path} is gone: the results this run updates were removed while it ran")
            config.check_compatible(current["meta"], path)  # another update may have changed nothing: checked again
            old = current["meta"]
            updates = [u for u in old.get("updates", []) if u.get("run") != run_id] + [meta]
            meta = {**old, "updates": updates, "weights_sha256": {**old.get("weights_sha256", {}),
                                                                  **meta["weights_sha256"]}}
            records = merge_records(current["records"], records)
        elif current is not None and current["meta"].get("run") != run_id and not replace:
            raise ValueError(f"{path} was written by another run while this one ran; its results are kept, and this "
                             "run's are not written (run again with --update, or another -o)")
        atomic_write_bytes(path, json.dumps({"meta": meta, "records": records}, indent=1).encode())
    atomic_write_bytes(out_dir / "results.md", (markdown_tables(records) + "\n").encode())
    write_plots(records, out_dir)
    return records


def write_plots(records: List[dict], out_dir: Path) -> None:
    """Quality (PSNR, SSIM) against measured speedup, one line per method (points in budget order),
    one figure per model; and the predicted against the measured PSNR of the TaoCache plans."""
    try:
        from .plotting import plot_predicted_vs_measured, plot_quality_vs_speedup
    except ImportError:  # pragma: no cover
        return
    for model in dict.fromkeys(r["model"] for r in records):
        rows = [r for r in records if r["model"] == model and r["method"] != "full"]
        if rows:
            try:
                plot_quality_vs_speedup(rows, f"testbed {model}: quality vs speedup",
                                        out_dir / f"quality_vs_speedup_{model}.png")
                if any(r.get("predicted_psnr") is not None for r in rows):
                    plot_predicted_vs_measured(rows, f"testbed {model}: TaoCache's predicted vs measured PSNR",
                                               out_dir / f"predicted_vs_measured_{model}.png")
            except ImportError:  # pragma: no cover - matplotlib missing
                return


def write_strip(strips: Dict[str, torch.Tensor], path: Path, scale: int = 3) -> None:
    """A PNG: one row per method (full first); per clip ``[3, F, H, W]`` its frames left to right."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:  # pragma: no cover
        return
    rows = []
    for clips in strips.values():
        frames = [torch.cat(list(c.permute(1, 2, 3, 0)), dim=1) for c in clips]  # each [H, F*W, 3]
        gap = torch.ones(clips.shape[3], 2, 3)
        row = torch.cat([t for f in frames for t in (f, gap)][:-1], dim=1)
        rows.append((row + 1) / 2)
    grid = torch.cat(rows, dim=0).clamp(0, 1)
    image = Image.fromarray((grid.numpy() * 255).round().astype("uint8"))
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    label_w = 150
    canvas = Image.new("RGB", (image.width + label_w, image.height), "white")
    canvas.paste(image, (label_w, 0))
    draw = ImageDraw.Draw(canvas)
    row_h = image.height // len(strips)
    for i, name in enumerate(strips):
        draw.text((6, i * row_h + row_h // 2 - 6), name, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
