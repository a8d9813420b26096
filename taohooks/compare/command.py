"""``taocache compare EXPERIMENT.yaml -- SCRIPT.py [args]`` and ``taocache compare --report FOLDER``.

Checks the experiment (and its prompt lists) before the script starts, runs the script once
through the launcher (``taohooks.run``) with the experiment intercepting its first generation,
then scores the stored runs and writes ``results.json`` / ``results.md`` and the pictures of
:mod:`taohooks.compare.plots` in the output folder.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path
from typing import List, Tuple

import torch
import yaml

from ..config import ConfigError, TaoCacheConfig, UsageError, config_from_dict, load_config
from ..runtime import messages
from ..runtime.interrupt import terminate_as_interrupt
from ..runtime.io import atomic_write_bytes, check_writable
from .errors import CompareError
from .experiment import ExperimentConfig, load_experiment
from .plots import write_animation, write_plots, write_strip
from .report import build_results, load_results, markdown_table, write_results
from .runner import Experiment, calibrated_here, check_before_run, intercept_generations, needs_calibration
from .store import RunStore, folder_lock, writes_results
from .targets import target_for

__all__ = ["run_compare", "rebuild_report", "taocache_config_of", "check_experiment_file"]


def taocache_config_of(config: ExperimentConfig, write: bool = True) -> Tuple[Path, TaoCacheConfig]:
    """The TaoCache config the launcher installs the integration from: the named file, or one written
    to ``OUTPUT/taocache.yaml`` from the inline ``integration``, ``model_id`` and ``loop`` (``write=False``: the
    same config, nothing written)."""
    if config.taocache is not None:
        path = config.path(config.taocache, "taocache")
        return path, load_config(path)
    path = config.output_dir / "taocache.yaml"
    loop = {k: v for k, v in vars(config.loop).items() if v not in (None, False)}
    data = {"integration": config.integration, "model_id": config.model_id, "lut": None,
            **({"loop": loop} if loop else {})}
    if not write:
        return path, config_from_dict(data, str(config.source))
    atomic_write_bytes(path, ("# written by taocache compare from " + str(config.source) + "\n"
                              + yaml.safe_dump(data, sort_keys=False)).encode())
    # its errors name the experiment, where the user wrote loop: (they named the file written here: review)
    return path, dataclasses.replace(load_config(path), source=str(config.source))


def check_experiment_file(experiment_path: str) -> str:
    """``taocache check EXPERIMENT.yaml``: the checks ``taocache compare`` makes before the script starts, nothing
    written; returns the resolved experiment and what a run would do, as YAML with ``#`` notes."""
    config = load_experiment(experiment_path)
    tao_path, tao = taocache_config_of(config, write=False)
    check_before_run(config, tao)  # (the integration compare cannot run through too)
    lines = ["# a taocache compare experiment: valid (the checks taocache compare makes before the script starts; "
             "the script line, a per-pipeline target's methods and the output folder's runs are checked when it "
             "runs)", yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip(),
             f"# TaoCache config: {tao_path} (integration {tao.integration}, model_id {tao.model_id})"
             if config.taocache is not None else
             f"# TaoCache config: inline (written to {tao_path} when it runs; integration {tao.integration})"]
    needed, why = needs_calibration(config, tao)
    target = target_for(tao.integration)
    calibration = (f"{calibrated_here(config, target, why, tao)}, on {len(config.calibration_list())} calibration "
                   "prompts, "
                   "in the output folder" if needed else "none (the methods listed read published or configured "
                                                          "values)")
    if not target.known:  # (diffusers, VideoSys: the pipeline called picks the target, and whose coefficients)
        calibration = ("decided at the first generation call, by the pipeline the script calls (published "
                       f"coefficients where its authors give them); at most {calibration}" if needed else calibration)
    lines.append(f"# {len(config.evaluation_prompts())} evaluation prompt(s) x {len(config.methods)} method(s) x "
                 f"{len(config.budgets)} budget(s); calibration: {calibration}")
    _refuse_other_results(config)
    runs = config.output_dir / "runs"
    stored = sum(1 for p in runs.rglob("*.safetensors")) if runs.is_dir() else 0
    unknown = RunStore(config.output_dir, writer=False).stored_without_record()
    lines.append(f"# output: {config.output_dir} holds {unknown} of an unknown experiment (no experiment.json): "
                 "taocache compare refuses it" if unknown else
                 f"# output: {config.output_dir} holds {stored} stored run(s): taocache compare continues them "
                 "(where its experiment.json matches)" if stored else
                 f"# output: {config.output_dir} ({'exists, no runs stored' if config.output_dir.exists() else 'new'})")
    return "\n".join(lines)


PER_CLIP_MESSAGE = ("runs one sampling loop per clip inside one generation call (Wan2.2 S2V and Animate, diffusers' "
                    "WanAnimatePipeline); taocache compare measures one loop per generation: compare on the "
                    "text/image-to-video pipelines, and use taocache-run with the integration for this one")


def _refuse_per_clip_tasks(config, tao, script: List[str]) -> None:
    """Before the script starts: the Wan2.2 tasks whose generate() runs several sampling loops."""
    if tao.integration != "wan22":
        return
    from ..integrations.wan22 import PER_CLIP, command_line

    run = command_line(list(script[1:]))
    if run is not None and run["task"] in PER_CLIP:
        raise ConfigError(config.source, "taocache", f"--task {run['task']} {PER_CLIP_MESSAGE}")


def _check_integration(config: ExperimentConfig) -> None:
    """An integration compare cannot run through, refused before anything is written."""
    integration = config.integration if config.taocache is None else \
        load_config(config.path(config.taocache, "taocache")).integration
    try:
        target_for(integration)
    except ValueError as exc:
        raise ConfigError(config.source, "taocache" if config.taocache else "integration", str(exc)) from None


def _refuse_other_results(config: ExperimentConfig) -> None:
    """An output folder whose results.json is not compare's (a ``taocache bench`` folder's): refused before anything
    is written there (it was replaced, with its results.md, without a word)."""
    if not (config.output_dir / "results.json").is_file():  # (a folder of that name: check_writable says so)
        return
    try:
        load_results(config.output_dir)
    except ValueError as exc:
        raise ConfigError(config.source, "output", f"{exc}; compare would replace it (and results.md) with this "
                          "experiment's: use another output folder (or move the file away)") from None


def run_compare(experiment_path: str, script: List[str]) -> int:
    """Run the experiment through ``script``; returns the exit status."""
    config = load_experiment(experiment_path)
    if not script:
        raise UsageError("SCRIPT: name the sample script after --, e.g. taocache compare "
                         f"{experiment_path} -- examples/sample_testbed.py --steps 50")
    given = [a for a in script[1:] if a == "--taocache" or a.startswith("--taocache=")]
    if given:  # (the launcher said "given twice", under taocache-run's name)
        raise ConfigError("command line", "SCRIPT", "remove --taocache from the script's arguments: the "
                                                    "experiment's taocache: names the config each run uses")
    from ..run import script_problem

    # a typo in the script's path, said as such before anything else (on a folder of earlier runs it was said as
    # "another script line: use another output folder (or delete it)")
    problem = script_problem(script[0])
    if problem is not None:
        print(f"taocache compare: {problem}", file=sys.stderr)
        return 2
    _check_integration(config)  # before the lock, which makes the output folder
    check_before_run(config, taocache_config_of(config, write=False)[1])  # (again below, on the config written)
    _refuse_other_results(config)
    writer = writes_results()  # rank 0 under torchrun: every rank runs the generations, rank 0 writes
    # the lock before anything is written to the folder (a refused second compare rewrote OUTPUT/taocache.yaml)
    with folder_lock(config.output_dir) if writer else contextlib.nullcontext():
        check_writable(config.output_dir / "results.json")
        tao_path, tao = taocache_config_of(config)
        check_before_run(config, tao)
        _refuse_per_clip_tasks(config, tao, script)
        if config.lpips and writer:  # LPIPS with no manual step: the weights are converted once, before the script runs
            from ..metrics.weights import ensure_lpips_weights

            ensure_lpips_weights()
        signals: List[int] = []
        try:
            with terminate_as_interrupt(signals):
                return _run_locked(experiment_path, script, config, tao_path, tao, writer)
        except KeyboardInterrupt:  # Ctrl-C, or a scheduler's SIGTERM: said, not a traceback or nothing at all
            print(f"taocache compare: {'terminated' if signals else 'interrupted'}; the runs stored in "
                  f"{config.output_dir} are kept (and, in one process, the calibration's ended generations): run the "
                  "same command again to continue", file=sys.stderr)
            return 143 if signals else 130


def _run_locked(experiment_path, script, config, tao_path, tao, writer) -> int:
    from ..run import _say, main as run_main

    experiment = Experiment(config, tao, script)
    try:
        experiment.check_folder_before_the_script()
    except ConfigError as exc:  # said as the launcher says the same finding at the first generation call
        _say("taocache compare", exc)
        return 2
    with intercept_generations(experiment):
        try:
            code = run_main(list(script) + ["--taocache", str(tao_path)], prog="taocache compare")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except CompareError:  # compare's own finding (taohooks' others are said by the launcher): one line
            raise
        except Exception:  # noqa: BLE001 - the script's own error: as python says it, traceback and all
            import traceback

            traceback.print_exc()
            return 1
    if not experiment.finished:
        if code == 0:
            print(f"taocache compare: error: {script[0]} ended without a generation call the "
                  f"{tao.integration!r} integration patches; nothing was compared", file=sys.stderr)
        return code or 1
    if not writer:
        return 0
    meta = {"experiment": str(experiment_path), "script": list(script), "integration": tao.integration,
            "model_id": tao.model_id, "loop": experiment.loop.describe(), "config": config.to_dict(),
            "expert_switch": experiment.expert_switch,
            "calibration": experiment.store.state("calibration"),
            "teacache_proxy": experiment.tea_provenance, "magcache_ratios": experiment.mag_provenance,
            "easycache": (f"the rule of {__import__('taohooks.caches.easycache', fromlist=['SOURCE']).SOURCE}, "
                          f"warm-up {config.easycache_warmup} steps") if "easycache" in config.methods else None}
    results = build_results(config, experiment.store, experiment.loop.steps, meta)
    write_results(config.output_dir, results)
    pictures = [p.name for p in write_plots(results, config.output_dir)]
    pictures.extend(_strip(config, experiment))
    print(markdown_table(results))
    print(f"wrote {config.output_dir}/results.json, results.md" + "".join(f", {p}" for p in pictures))
    _say_missing_pictures(pictures, bool(results["aggregates"]))
    return 0


def _say_missing_pictures(written: List[str], plotted: bool) -> None:
    """The pictures the README lists that this environment could not draw (matplotlib or Pillow missing), said
    (they were left out without a word). ``plotted``: the results have rows to plot."""
    import importlib.util

    needs = {"quality_vs_speedup.png": ("matplotlib", "matplotlib"), "skip_schedule.png": ("matplotlib", "matplotlib"),
             "strip.png": ("Pillow", "PIL"), "side_by_side.gif": ("Pillow", "PIL")}
    missing = {name: lib for name, (lib, module) in needs.items() if name not in written
               and (plotted or lib == "Pillow") and importlib.util.find_spec(module) is None}  # (not RGB: no strip)
    if missing:
        libs = " and ".join(dict.fromkeys(missing.values()))
        messages.notice(f"compare: {', '.join(missing)} not drawn: {libs} not installed (pip install "
                        "'taohooks[eval]')")


def _strip(config: ExperimentConfig, experiment: Experiment, prompts: int = 2) -> List[str]:
    """``strip.png`` and ``side_by_side.gif``: the first prompts, full-step and each method at the largest
    budget; returns the files written."""
    from .store import run_label

    entries = config.evaluation_prompts()[:prompts]
    steps = experiment.loop.steps
    largest = {}  # each method at its largest budget
    for method, skips in config.runs(steps)[1:]:
        largest[method] = max(skips, largest.get(method, 0))
    labels = {"full": "full", **{f"{m} {s}/{steps}": run_label(m, s, steps) for m, s in largest.items()}}
    videos = {name: torch.cat([experiment.store.load(label, e)[0] for e in entries]) for name, label in labels.items()}
    channels = next(iter(videos.values())).shape[1]
    if channels != 3:  # (latents, as a pipeline's output_type="latent" returns them)
        messages.notice(f"compare: strip.png and side_by_side.gif not drawn: the generations returned "
                        f"{channels}-channel videos (latents?), not RGB frames")
        return []
    written = ["strip.png"] if write_strip(videos, config.output_dir / "strip.png") else []
    return written + (["side_by_side.gif"] if write_animation(videos, config.output_dir / "side_by_side.gif") else [])


def rebuild_report(folder: str) -> int:
    """``results.md`` again from ``results.json`` alone."""
    if Path(folder).is_file() and folder.endswith((".yaml", ".yml")):  # (the experiment given for its folder)
        try:
            output = load_experiment(folder).output_dir
        except Exception:  # noqa: BLE001 - only a hint: the folder is what --report takes
            output = None
        raise UsageError(f"--report {folder}: takes the experiment's output folder (its results.json), not the "
                         f"experiment" + (f": --report {output}" if output is not None else ""))
    results = load_results(folder)
    atomic_write_bytes(Path(folder) / "results.md", markdown_table(results).encode())
    plots = write_plots(results, folder)
    print(markdown_table(results))
    print(f"wrote {Path(folder) / 'results.md'}" + "".join(f", {p.name}" for p in plots)
          + " (strip.png and side_by_side.gif are the run's: --report reads no videos)")
    return 0
