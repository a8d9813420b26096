"""``results.json`` and ``results.md`` of ``taocache compare``, from the run store.

``results.json``: ``{"meta": ..., "records": [...], "aggregates": [...]}``: one record per
prompt x method x budget (the full-step reference is method ``full``, budget 0) with the metrics of
:mod:`taohooks.compare.scoring`, wall time, calls and skipped calls (and which: step, stream);
one aggregate per method x budget: metric means over the prompts, and the speedup, the summed
wall time of the references over that of the method on the same prompts. On Wan2.2's two experts
(``meta.expert_switch``: the first low-noise step) each also has ``skipped_per_expert``: the share of
each expert's calls skipped.
``results.md``: the aggregates in the layout of the paper's Tables 1-3.
``taocache compare --report FOLDER`` rebuilds ``results.md`` from ``results.json`` alone.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ..evaluation.methods import IMPLAUSIBLE_NOTE, implausible_speedup, missed_budget
from ..runtime.io import atomic_write_bytes
from .experiment import ExperimentConfig
from .scoring import score
from .store import RunStore, run_label

__all__ = ["build_results", "write_results", "load_results", "markdown_table", "METRICS"]

METRICS = ("lpips", "ssim", "psnr", "psnr_pooled", "psnr_changed", "latent_rel_l2")


def _mean(values: List[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _latent_rel_l2(store: RunStore, method: str, skips: int, steps: int, entry) -> Optional[float]:
    """``||latents - reference latents|| / ||reference latents||`` of the final latents the script decoded
    (float64), where both runs recorded them; else ``None``."""
    ours, theirs = store.load_latents(run_label(method, skips, steps), entry), store.load_latents("full", entry)
    if ours is None or theirs is None or ours.shape != theirs.shape:
        return None
    ours, theirs = ours.double(), theirs.double()
    return float((ours - theirs).norm() / theirs.norm().clamp_min(1e-30))


def build_results(config: ExperimentConfig, store: RunStore, steps: int, meta: Dict[str, Any]) -> Dict[str, Any]:
    """Score every stored run against its reference; records and aggregates."""
    from ..metrics import load_lpips
    lpips_model = load_lpips() if config.lpips else None
    records: List[Dict[str, Any]] = []
    labels = config.runs(steps)
    for entry in config.evaluation_prompts():
        reference, ref_record = store.load("full", entry)
        for method, skips in labels:
            video, record = (reference, ref_record) if method == "full" else store.load(run_label(method, skips, steps),
                                                                                        entry)
            metrics = {k: None for k in (*METRICS, "identical_frames", "frames")} if method == "full" else \
                {**score(video, reference, lpips_model), "latent_rel_l2": _latent_rel_l2(store, method, skips, steps,
                                                                                          entry)}
            records.append({**record, "method": method, "budget": skips / steps, "skips": skips, "steps": steps,
                            **metrics})
    aggregates = []
    for method, skips in labels[1:]:
        rows = [r for r in records if r["method"] == method and r["skips"] == skips]
        full_seconds = sum(r["seconds"] for r in records if r["method"] == "full")
        seconds = sum(r["seconds"] for r in rows)
        aggregates.append({"method": method, "budget": skips / steps, "skips": skips, "steps": steps,
                           "prompts": len(rows), "speedup": full_seconds / seconds if seconds else None,
                           "skipped_fraction": _mean([r["skipped_fraction"] for r in rows]),
                           "skipped_per_stream": {s: _mean([r["skipped_per_stream"].get(s, 0) for r in rows])
                                                  for s in dict.fromkeys(k for r in rows
                                                                         for k in r["skipped_per_stream"])},
                           **({"skipped_per_expert": {e: _mean([r["skipped_per_expert"][e] for r in rows])
                                                      for e in ("high_noise", "low_noise")}}
                              if rows and all("skipped_per_expert" in r for r in rows) else {}),
                           "peak_memory_bytes": max((r["peak_memory_bytes"] or 0 for r in rows), default=0) or None,
                           **{k: _mean([r[k] for r in rows]) for k in METRICS},
                           "latent_prompts": sum(r["latent_rel_l2"] is not None for r in rows),  # the mean's prompts
                           **{k: rows[0][k] for k in ("threshold", "search_fraction", "window") if k in rows[0]}})
    meta = {**meta, "lpips": "AlexNet v0.1" if lpips_model is not None else None,
            "psnr": "per-frame mean, each frame capped at 100 dB (taocache bench, TeaCache's common_metrics)",
            "psnr_pooled": "MSE pooled over all frames of a video", "psnr_changed": "per-frame mean over the "
            "frames that differ from the reference (MSE >= 1e-10)",
            "latent_rel_l2": "relative L2 distance of the final latents (before the VAE) to the reference's, where "
            "the script decodes them (Wan: vae.decode; Latte / Open-Sora-Plan: decode_latents); else null",
            "torch": torch.__version__,
            "devices": sorted({r["device"] for r in records if r.get("device")})}  # older runs recorded none
    return {"meta": meta, "records": records, "aggregates": aggregates}


def load_results(folder) -> Dict[str, Any]:
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise ValueError(f"{path} does not exist; run `taocache compare EXPERIMENT.yaml -- SCRIPT ...` first")
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(results, dict) or not {"meta", "records", "aggregates"} <= set(results):
        raise ValueError(f"{path}: not a taocache compare results file (expected meta, records, aggregates)")
    return results


OFF_BUDGET_NOTE = ("‡ its threshold search could not meet the budget ({}): read the row at the share of the calls "
                   "it skipped, not as that budget's; left out of the counts per prompt below.")


def _fmt(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown_table(results: Dict[str, Any]) -> str:
    """The aggregates, rows grouped by budget, like the paper's Tables 1-3 (with the latents' relative L2
    distance where the script's final latents were recorded)."""
    meta, rows = results["meta"], results["aggregates"]
    full = [r for r in results["records"] if r["method"] == "full"]
    latents = any(r.get("latent_rel_l2") is not None for r in rows)
    switch = meta.get("expert_switch")
    experts = switch is not None and any("skipped_per_expert" in r for r in rows)
    lines = [f"### `taocache compare`: {meta.get('integration', '?')}, {meta.get('loop', '')}", "",
             f"{len(full)} prompts; full-step reference {sum(r['seconds'] for r in full):.2f} s in all"
             + (f" (timed on {len(meta['devices'])} devices, {', '.join(meta['devices'])}: the speedups mix them)"
                if len(meta.get("devices") or []) > 1 else "") + ". Speedup: the whole generation call's wall time "
             "(with what the call does besides the denoiser: text encoding, VAE decoding, where it has them), "
             "full-step over cached. PSNR: "
             "per-frame mean capped at 100 dB; pooled: one MSE over all frames; changed: frames equal to the "
             "reference left out." + (" Latent rel. L2: the final latents against the reference's." if latents
                                      else "")
             + (f" Two experts: high-noise steps 0-{switch - 1}, low-noise from step {switch}; the share of each "
                "one's calls skipped." if experts else ""), "",
             "| budget | method | speedup | % calls skipped |" + (" % high / low-noise expert |" if experts else "")
             + " LPIPS ↓ | SSIM ↑ | PSNR ↑ (dB) | PSNR pooled | PSNR changed |"
             + (" latent rel. L2 ↓ |" if latents else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if experts else "") + ("---|" if latents else "")]
    implausible, missed = [], []
    for r in sorted(rows, key=lambda r: (r["budget"], r["method"])):
        mark = off = ""
        if implausible_speedup(r["method"], r.get("speedup"), r.get("skipped_fraction")):
            mark = "†"
            implausible.append(f"{r['method']} at {r['skips']}/{r['steps']}")
        if missed_budget(r):
            off = "‡"
            missed.append(f"{r['method']} at {r['skips']}/{r['steps']}: {100 * r['search_fraction']:.1f}% on the "
                          "search prompts")
        lines.append(f"| {r['skips']}/{r['steps']} ({100 * r['budget']:.0f}%) | {r['method']} | "
                     f"{_fmt(r['speedup'], '.3f')}x{mark} | {100 * r['skipped_fraction']:.1f}%{off} | "
                     + (f"{_per_expert(r)} | " if experts else "") + f"{_fmt(r['lpips'], '.4f')} | "
                     f"{_fmt(r['ssim'], '.4f')} | {_fmt(r['psnr'], '.2f')} | {_fmt(r['psnr_pooled'], '.2f')} | "
                     f"{_fmt(r['psnr_changed'], '.2f')} |" + (f" {_fmt(r.get('latent_rel_l2'), '.4f')} |" if latents
                                                                else ""))
    if implausible:
        lines += ["", IMPLAUSIBLE_NOTE.format(", ".join(implausible))]
    if missed:
        lines += ["", OFF_BUDGET_NOTE.format("; ".join(missed))]
    lines += per_prompt_lines(results["records"])
    return "\n".join(lines) + "\n"


PER_PROMPT_ROWS = 20  # more prompts: the counts of best per prompt alone (results.json has every record)


def per_prompt_lines(records: List[Dict[str, Any]]) -> List[str]:
    """Each prompt's PSNR per method and budget, and per budget how many prompts each method scores highest on: how
    consistent a difference of the means is (four prompts' means can hide one prompt that decides them)."""
    runs = [r for r in records if r["method"] != "full" and r.get("psnr") is not None]
    columns = sorted(dict.fromkeys((r["skips"], r["method"]) for r in runs))
    missed = {(r["skips"], r["method"]) for r in runs if missed_budget(r)}  # (not ranked at a budget they missed)
    prompts = list(dict.fromkeys((r["prompt"], r["seed"]) for r in runs if "prompt" in r))
    if len(prompts) < 2 or len(columns) < 2:
        return []
    psnr = {(r["prompt"], r["seed"], r["skips"], r["method"]): r["psnr"] for r in runs if "prompt" in r}
    steps = runs[0]["steps"]
    lines = ["", "#### PSNR per prompt (dB)", ""]
    if len(prompts) <= PER_PROMPT_ROWS:
        lines += ["| prompt | seed | " + " | ".join(f"{m} {k}/{steps}" for k, m in columns) + " |",
                  "|---|---|" + "---|" * len(columns)]
        for prompt, seed in prompts:
            shown = prompt if len(prompt) <= 48 else prompt[:47] + "…"
            lines.append(f"| {shown.replace('|', '/')} | {seed} | " + " | ".join(
                _fmt(psnr.get((prompt, seed, k, m)), ".2f") for k, m in columns) + " |")
        lines.append("")
    best = []
    for skips in dict.fromkeys(k for k, _ in columns):
        methods = [m for k, m in columns if k == skips and (k, m) not in missed]
        if len(methods) < 2:
            continue
        wins = dict.fromkeys(methods, 0)
        for prompt, seed in prompts:
            scored = [(psnr[(prompt, seed, skips, m)], m) for m in methods if (prompt, seed, skips, m) in psnr]
            top = max(v for v, _ in scored) if scored else None
            for v, m in scored:
                wins[m] += v == top  # (ties: each counts)
        best.append(f"{skips}/{steps}: " + ", ".join(f"{m} {n}" for m, n in sorted(wins.items(), key=lambda w: -w[1])))
    if best:
        lines.append(f"Highest PSNR per prompt, of {len(prompts)} prompts: " + "; ".join(best) + ".")
    return lines


def _per_expert(row: Dict[str, Any]) -> str:
    shares = row.get("skipped_per_expert")
    return "n/a" if shares is None else f"{100 * shares['high_noise']:.1f} / {100 * shares['low_noise']:.1f}%"


def _json_safe(value: Any) -> Any:
    """NaN and infinities as null (strict JSON readers such as jq refuse bare NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_results(folder, results: Dict[str, Any]) -> None:
    folder = Path(folder)
    atomic_write_bytes(folder / "results.json", json.dumps(_json_safe(results), indent=1, allow_nan=False).encode())
    atomic_write_bytes(folder / "results.md", markdown_table(results).encode())
