"""Calibrating a LUT over a prompt list through a research script (``taocache calibrate``).

``taocache calibrate CONFIG --prompts prompts.txt -- SCRIPT ...`` runs the script with
``TAOHOOKS_CALIBRATE_PROMPTS`` set: the first generation the script asks for is then repeated once
per calibration prompt the LUT does not hold yet (the call's prompt argument replaced), the LUT is
saved after each, and with ``TAOHOOKS_CALIBRATE_ONLY`` the process exits when it is complete. The
LUT's prompt count says where an interrupted calibration stopped. With
``TAOHOOKS_CALIBRATE_DATA_PARALLEL`` (``--devices N`` / ``--data-parallel``) the ranks share the
prompts and their statistics are all-reduced (:mod:`taohooks.runtime.distributed`).
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional

from ..runtime import messages
from .integration import IntegrationError, unwrap_model

if TYPE_CHECKING:
    from .integration import GenerationPatch

__all__ = ["calibrate_over_prompts", "read_prompts", "ENV_CALIBRATE_PROMPTS", "ENV_CALIBRATE_ONLY",
           "ENV_CALIBRATE_SHARDED"]

ENV_CALIBRATE_PROMPTS = "TAOHOOKS_CALIBRATE_PROMPTS"
ENV_CALIBRATE_ONLY = "TAOHOOKS_CALIBRATE_ONLY"
ENV_CALIBRATE_SHARDED = "TAOHOOKS_CALIBRATE_DATA_PARALLEL"


def read_prompts(path) -> List[str]:
    """One prompt per non-empty line (lines starting with ``#`` are comments)."""
    path = Path(path)
    if not path.is_file():
        raise IntegrationError(f"prompts file {path} does not exist" if not path.exists() else
                               f"prompts file {path} is not a file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IntegrationError(f"prompts file {path} is not UTF-8 text: byte {exc.start} (0x{data[exc.start]:02x}) "
                               "cannot be decoded; save it as UTF-8") from None
    prompts = [line.strip() for line in text.lstrip("\ufeff").split("\n")]  # only newlines end a prompt
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise IntegrationError(f"prompts file {path} holds no prompt (one per line)")
    return prompts


def _with_prompt(patch: "GenerationPatch", bound: inspect.BoundArguments, prompt: str) -> inspect.BoundArguments:
    """The generation's arguments with its prompt argument replaced (a list of prompts: each one)."""
    replaced = inspect.BoundArguments(bound.signature, bound.arguments.copy())
    original = bound.arguments[patch.prompt_arg]
    replaced.arguments[patch.prompt_arg] = [prompt] * len(original) if isinstance(original, (list, tuple)) else prompt
    return replaced


PER_CLIP_CALIBRATION = (
    "runs one sampling loop per clip (Wan2.2 S2V, Animate), and each clip is one LUT prompt, so calibration over a "
    "prompts file (taocache calibrate --prompts) cannot step through it one prompt per generation; calibrate by "
    "running the script on your own inputs (audio and image, or src_root_path) with the config until the LUT holds "
    "calibration.prompts clips")


def calibrate_over_prompts(patch: "GenerationPatch", bound: inspect.BoundArguments) -> None:
    """Run the generation once per calibration prompt the LUT lacks (explicit calibration).

    The LUT's prompt count says where an interrupted calibration stopped: with ``n`` prompts
    recorded, the next generation uses line ``n`` of the prompts file."""
    if patch.prompt_arg is None:
        raise IntegrationError(f"{patch.name}: this integration cannot substitute prompts; calibrate by running "
                               "the script once per prompt (the LUT resumes across runs)")
    if patch.loop_of(dict(bound.arguments))[1].get("repeat"):  # several sampling loops per generation
        raise IntegrationError(f"{patch.target()}: {PER_CLIP_CALIBRATION}")
    prompts = read_prompts(os.environ[ENV_CALIBRATE_PROMPTS])
    config = patch.make_cache(dict(bound.arguments)).config
    path, wanted = config.lut_path(), config.calibration.prompts
    if path is None:
        raise IntegrationError(f"{config.source}: lut: name the LUT file to calibrate into")
    if len(prompts) < wanted:
        raise IntegrationError(f"{os.environ[ENV_CALIBRATE_PROMPTS]} holds {len(prompts)} prompts, "
                               f"{config.source} asks for calibration.prompts = {wanted}; give more prompts "
                               "or lower calibration.prompts")
    patch._prompt_calibration = "running"
    release = _claim_the_lut(path)
    if os.environ.get(ENV_CALIBRATE_SHARDED):
        try:
            _calibrate_sharded(patch, bound, prompts, config, path, wanted)
        finally:
            patch._prompt_calibration = "done"
            release()
        if os.environ.get(ENV_CALIBRATE_ONLY):
            raise SystemExit(0)
        return
    _refuse_uncoordinated_ranks(config)
    try:
        have = _recorded_prompts(patch, bound, path)
        parts = [str(p) for p in _part_files(path)]
        if parts:
            messages.warning(f"{', '.join(parts)}: part file(s) of an interrupted --devices run, not resumed by a run "
                             "without --devices (the same command with its --devices resumes those of this taohooks' "
                             f"naming; {_merge_advice(path, parts)}; this run removes them once it completes the LUT)")
        while have < wanted:
            patch.log(f"taohooks: calibration prompt {have + 1}/{wanted}: {prompts[have]!r}")
            before = _own_prompts(patch, bound)
            patch._generate(_with_prompt(patch, bound, prompts[have]))
            now = _recorded_prompts(patch, bound, path)
            after = _own_prompts(patch, bound)
            # this generation's clips: what this process's recorder took (the LUT's count also holds what other
            # writers added meanwhile: a `taocache merge` into it, another run's calibration)
            clips = after - (before or 0) if after is not None and after >= (before or 0) else now - have
            if clips <= 0:
                raise IntegrationError("a calibration generation recorded no prompt (the warnings above say why: "
                                       "another resolution or frame count than the LUT's, outputs that are not "
                                       "finite, a loop shape the integration does not match)")
            _one_clip_per_line(clips, path)
            if now - have > clips:
                messages.warning(f"{path}: another process added {now - have - clips} prompt(s) to the LUT while this "
                                 f"one calibrated (a taocache merge, another run's calibration); it now holds {now}, "
                                 f"so this run goes on at line {min(now, wanted) + 1} of the prompts file and lines "
                                 f"{have + 2}-{min(now, wanted)} are not calibrated here")
            have = now
        if _rank() == 0:  # (every rank of Wan's own group runs this loop: one removes, and says so)
            _remove_stale_parts(path)
    finally:
        patch._prompt_calibration = "done"
        release()
    patch.log(f"taohooks: calibration LUT {path} complete ({have} prompts)")
    if os.environ.get(ENV_CALIBRATE_ONLY):
        raise SystemExit(0)


def _refuse_uncoordinated_ranks(config) -> None:
    """Under torchrun (``WORLD_SIZE`` > 1) with no process group of the script's, each process would calibrate the same
    prompt lines into the one LUT (duplicated prompts: multi-GPU walkthrough, 2026-11-27); ``--data-parallel`` gives
    each its share. A script that starts its group (Wan's ``generate.py``) shares each prompt over its ranks, unless
    the config says its ranks sample prompts of their own (``calibration.ranks: own``: each would add the same line)."""
    from ..runtime.distributed import launched_world_size, world

    if world()[1] > 1 and config.calibration.ranks == "own":  # (it wrote each line once per rank: review, 2026-11-27)
        raise IntegrationError(f"{config.source or 'the config'}: calibration.ranks: own, but taocache calibrate "
                               "without --data-parallel runs every prompt line on every rank of the script's process "
                               "group, and each would add the same prompts; add --data-parallel (each rank then takes "
                               "its share of the lines)")
    size = launched_world_size()
    if size > 1 and world()[1] == 1:
        raise IntegrationError(f"this process is one of {size} (WORLD_SIZE={size}: torchrun) and the script started no "
                               "process group, so each process would calibrate the same prompt lines into one LUT; add "
                               "--data-parallel to taocache calibrate (each process then takes its share of the "
                               "prompts), or run it in one process")


def _rank() -> int:
    """This process's rank: of the process group, else torchrun's ``RANK`` (before a group starts), else 0."""
    from ..runtime.distributed import world

    return world()[0] if world()[1] > 1 else int(os.environ.get("RANK", "0") or 0)


def _claim_the_lut(path: Path) -> Callable[[], None]:
    """Refuse a second ``taocache calibrate`` on the same LUT while one runs (both would pick the same prompt
    lines and count them twice). Returns what releases the claim; the file ``LUT.calibrating`` stays, empty (it holds
    no lock once released or its process ended). Under ``--devices`` rank 0 claims it."""
    import fcntl

    if _rank() != 0:
        return lambda: None
    real = Path(os.path.realpath(path))  # (one claim per file, whatever link or relative path names it)
    lock = real.with_name(f"{real.name}.calibrating")
    lock.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise IntegrationError(f"another taocache calibrate is running on {path} (it holds {lock}); two would "
                               "calibrate the same prompt lines and count them twice: wait for it, or give this one "
                               "its own lut:") from None

    def release() -> None:  # (the file stays: removing it would let a process that opened it before take the lock
        handle.close()       # while a later one takes a new file's; an empty file holds no lock)
    return release


def _part_files(path: Path, rank: Optional[int] = None) -> List[Path]:
    """The part files of ``--devices`` runs next to the LUT ``path`` (of one ``rank``: any run's, any count)."""
    prefix = f"{path.stem}.part{'' if rank is None else rank}"
    return sorted(p for p in path.parent.glob(f"{path.stem}.part*-of-*{path.suffix}")
                  if p.name.startswith(prefix) and (rank is None or p.name.startswith(f"{prefix}-of-")))


def _part_name(path: Path, rank: int, size: int, have: int, lines: List[str]) -> Path:
    """``LUT.part<rank>-of-<size>-from<have>-<key>.safetensors``: ``key`` names the prompt lines the run calibrates."""
    import hashlib

    key = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:8]
    return path.with_name(f"{path.stem}.part{rank}-of-{size}-from{have}-{key}{path.suffix}")


def _why_not_resumed(stale: Path, path: Path, size: int, have: int, key: str) -> str:
    """Why the part file ``stale`` is not this run's (``size`` ranks, from ``have`` prompts, prompt lines ``key``)."""
    import re

    m = re.fullmatch(rf"{re.escape(path.stem)}\.part\d+-of-(\d+)(?:-from(\d+)(?:-([0-9a-f]+))?)?"
                     rf"{re.escape(path.suffix)}", stale.name)
    if m is None:
        return "not named as a part file of this LUT"
    n, start, lines = m.groups()
    if int(n) != size:
        return f"of a run on {n} processes (this one: {size})"
    if start is not None and int(start) != have:
        return f"of a run that began at {start} prompts (the LUT holds {have} now)"
    if lines is None:
        return ("named by an earlier taohooks, before the prompt " + ("count and " if start is None else "")
                + "lines were part of the name")
    return "of a run on other prompt lines" if lines != key else "of this run"


def _merge_advice(path: Path, parts: List[str]) -> str:
    """How to keep the prompts of part files a run will not resume (if they are of this model and settings)."""
    lut = f"{path} " if path.is_file() else ""
    return (f"to keep their prompts instead (if of this model and settings), stop this run (Ctrl-C) and add them to "
            f"the LUT: taocache merge {lut}{' '.join(parts)} -o {path}, then calibrate with a prompts file that "
            "begins with as many lines as the LUT then holds (the lines they calibrated) and goes on with the lines "
            "still to run (taocache calibrate continues at the line after the LUT's count)")


def _remove_stale_parts(path: Path, keep: List[Path] = ()) -> None:
    """Once the LUT is complete, the part files of earlier, interrupted runs can only mislead a later calibration
    (of the LUT deleted and begun again): removed, and said."""
    stale = [p for p in _part_files(path) if p not in keep]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        messages.notice(f"removed {', '.join(str(p) for p in stale)}: part file(s) of earlier interrupted --devices "
                        f"runs, which the complete LUT {path} no longer needs")


def _one_clip_per_line(clips: int, path: Path) -> None:
    """Each line of the prompts file is one prompt of the LUT: a generation of several clips (a batch of seeds)
    counted them all, and the count that says which line is next skipped lines."""
    if clips > 1:
        raise IntegrationError(f"a calibration generation made {clips} clips (a batch, or several seeds): taocache "
                               "calibrate counts each line of the prompts file as one prompt; run the script with one "
                               f"clip per generation (its {clips} clips of this line are kept in {path})")


def _calibrate_sharded(patch: "GenerationPatch", bound: inspect.BoundArguments, prompts: List[str], config,
                       path: Path, wanted: int) -> None:
    """Data-parallel calibration: each rank records its share of the missing prompts (into its own
    part file, so an interrupted run resumes), then the statistics are all-reduced and rank 0
    writes the LUT. One prompt per generation."""
    import torch.distributed as dist

    from ..taocache.calibration import CalibrationRecorder
    from ..runtime.distributed import all_reduce_lut, init_from_environment, shard, world
    from .integration import check_declared_loop, identity_of_model
    from ..taocache.cache import check_run
    from ..runtime.hook import DenoiserHook
    from ..runtime.io import atomic_write_bytes, locked
    from ..taocache.lut import CalibrationLUT, LUTMismatchError

    init_from_environment()
    rank, size = world()
    base = CalibrationLUT.load(path) if path.is_file() else None
    have = base.num_prompts if base is not None else 0
    mine = shard(list(range(have, wanted)), rank, size)
    # a part file holds this rank's share of the lines after the `have` the LUT held when the run began: one made
    # from another count (the LUT was completed otherwise since, or calibration.prompts changed) is not resumed
    # its name holds the run's count, where it began and the prompt lines it calibrates: one of another prompts file
    # is not resumed (a LUT deleted and calibrated again on other prompts took two of an older run's: multi-GPU
    # walkthrough, 2026-11-27)
    parts = [_part_name(path, r, size, have, prompts[have:wanted]) for r in range(size)]
    part = parts[rank]
    stale = [p for p in _part_files(path, rank) if p != part]
    if stale:
        key = part.stem.rsplit("-", 1)[-1]
        why = "; ".join(f"{p}: {_why_not_resumed(p, path, size, have, key)}" for p in stale)
        messages.warning(f"rank {rank}: part file(s) of an earlier --devices run, not resumed ({why}); "
                         f"{_merge_advice(path, [str(p) for p in stale])}; this run removes them once it completes "
                         "the LUT", every_rank=True)
    resume = CalibrationLUT.load(part) if part.is_file() else None
    done = resume.num_prompts if resume is not None else 0
    if done:
        messages.notice(f"rank {rank}: resuming the {done} prompt(s) of {part}", every_rank=True)
    arguments = dict(bound.arguments)
    sp_size = getattr(arguments.get("self"), "sp_size", 1)
    if isinstance(sp_size, int) and sp_size > 1:  # Wan's pipelines: --ulysses_size x --ring_size
        raise IntegrationError(
            f"data-parallel calibration (--devices / --data-parallel) gives each rank its own prompts, but this run is "
            f"sequence-parallel (sp_size {sp_size}: --ulysses_size x --ring_size), whose ranks work on one prompt "
            "together; calibrate without --devices / --data-parallel (the ranks then calibrate each prompt together "
            "and rank 0 writes the LUT)")
    model = unwrap_model(patch.model_of(arguments))
    loop, attach_kwargs = patch.loop_of(arguments)
    check_declared_loop(config, loop, patch.target())
    identity = patch.identity_of(arguments, model) if patch.identity_of else identity_of_model(model)
    if base is not None:
        check_run(config, base, loop, identity, continued=True)  # resuming: the LUT must be of this run
    recorder = CalibrationRecorder(config.model_id, config.calibration.sampler, resume=resume, identity=identity,
                                   error_horizon=config.calibration.error_horizon)
    also = attach_kwargs.get("also", ())  # Wan2.2's second expert
    try:  # the recorder checks the part file it resumes against this run as it attaches
        attached = DenoiserHook(loop, [recorder], timestep_arg=attach_kwargs.get("timestep_arg")).attach(model, *also)
    except LUTMismatchError as exc:
        if resume is None:
            raise
        raise IntegrationError(f"{exc}: it is this rank's part file of an interrupted run of another model or "
                               f"settings; remove the part files ({path.stem}.part*-of-{size}-*{path.suffix}) to "
                               "start over") from None
    with attached as hook:
        for index in mine[done:]:
            messages.notice(f"rank {rank}/{size}: calibration prompt {index + 1}/{wanted}: {prompts[index]!r}",
                            every_rank=True)  # every rank reports its own progress
            replaced = _with_prompt(patch, bound, prompts[index])
            before = recorder.lut().num_prompts
            hook.new_sample()
            patch.original(*replaced.args, **replaced.kwargs)
            recorder.save(part)
            _one_clip_per_line(recorder.lut().num_prompts - before, part)
    total = all_reduce_lut(recorder.lut())
    if rank == 0:
        with locked(path):  # add to the file as it is now: another job may have added prompts meanwhile
            current = CalibrationLUT.load(path) if path.is_file() else None
            total = current.merge(total) if current is not None else total
            atomic_write_bytes(path, total.to_bytes())
        patch.log(f"taohooks: calibration LUT {path} complete ({total.num_prompts} prompts, {size} ranks)")
    if size > 1:
        dist.barrier()
    part.unlink(missing_ok=True)
    if rank == 0:
        _remove_stale_parts(path, keep=parts)


def _own_prompts(patch: "GenerationPatch", bound: inspect.BoundArguments) -> Optional[int]:
    """The prompts this process's calibrating recorder has taken (None before it exists)."""
    entry = patch.caches.get(unwrap_model(patch.model_of(dict(bound.arguments))))
    if entry is not None and entry[0].calibrating:
        return entry[0].recorder.recorded
    return None


def _recorded_prompts(patch: "GenerationPatch", bound: inspect.BoundArguments, path: Path) -> int:
    from ..taocache.lut import CalibrationLUT

    entry = patch.caches.get(unwrap_model(patch.model_of(dict(bound.arguments))))
    if entry is not None and entry[0].calibrating:
        return entry[0].recorder.lut().num_prompts
    return CalibrationLUT.load(path).num_prompts if path.is_file() else 0
