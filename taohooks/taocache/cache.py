"""``TaoCache``: config + LUT + plan + hook, the object a user holds.

    cache = TaoCache.from_yaml("configs/wan.yaml")
    with cache.attach(model, steps=50, streams=("cond", "uncond")):
        video = run_my_sampling_loop(model)
    print(cache.summary())

When the config names a LUT file that does not exist yet (and ``calibration.auto`` is on),
the attached run computes every step, records the calibration statistics and writes the LUT
after each generation; the next run skips.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from torch import nn

from ..runtime import messages
from .calibration import CalibrationRecorder
from ..runtime.callbacks import Callback
from ..config import PlanConfig, TaoCacheConfig, validate_against_steps, check_python_config, load_config
from .extrapolation import TaoCacheCallback
from ..runtime.hook import DenoiserHook
from .identity import accept_name, accept_names, describe_differences, differences, is_sharded, model_identity
from .identity import comparable as comparable_identity, recorded_the_wrapper, unrecorded as unrecorded_keys
from .lut_format import check_identity
from ..runtime.io import check_writable, special_file_kind
from ..runtime.loop import LoopSpec
from ..runtime.patching import unwrap_model
from .lut import CalibrationLUT, LUTMismatchError
from .plan import (REFRESH_WIDTH, PlanError, SkipPlan, check_unskippable, no_skip_plan, plan_from_steps, plan_from_window,
                   resolve_budget, search_window, switch_guard)

__all__ = ["TaoCache", "make_plan", "section_callbacks", "check_run", "lut_for_steps", "expert_guard",
           "transfer_allowed"]


def calibrates(config: TaoCacheConfig) -> bool:
    """Whether runs of ``config`` calibrate a LUT that is missing or incomplete: ``calibration.auto``, or
    ``taocache calibrate`` running the script (whatever ``auto`` says)."""
    from ..launcher.prompt_calibration import ENV_CALIBRATE_PROMPTS

    return config.calibration.auto or bool(os.environ.get(ENV_CALIBRATE_PROMPTS))


def transfer_allowed(config: TaoCacheConfig, lut: CalibrationLUT) -> bool:
    """Whether a LUT of another step count is carried over (``calibration.transfer: interpolate`` and
    delta products); a LUT still being calibrated is not (a calibration cannot add prompts of another
    step count)."""
    from .lut_transfer import carryable

    return (config.calibration.transfer == "interpolate" and carryable(lut)
            and not (calibrates(config) and lut.num_prompts < config.calibration.prompts))


def unfinished_lut_steps_problem(config: TaoCacheConfig, lut: Optional[CalibrationLUT], steps: int,
                                 calibrating: Optional[bool] = None, run_has: str = "this run has",
                                 lut_steps: Optional[int] = None) -> Optional[str]:
    """Why the config's LUT, still being calibrated, cannot serve a run of another step count (a calibration adds
    prompts of its own step count only, and ``calibration.transfer`` carries complete LUTs over): the message, or
    ``None``. ``calibrating``: whether the run calibrates (default: whether the config's runs do); ``lut_steps``:
    the LUT's count in the unit of ``steps`` (default ``lut.steps``: Open-Sora-Plan's PNDM makes more calls than
    the sampling steps asked for)."""
    from .lut_transfer import carryable

    calibrating = calibrates(config) if calibrating is None else calibrating
    lut_steps = lut.steps if lut is not None and lut_steps is None else lut_steps
    if lut is None or lut_steps == steps or not calibrating or lut.num_prompts >= config.calibration.prompts \
            or config.calibration.transfer != "interpolate" or not carryable(lut):
        return None  # (without transfer, or a LUT that cannot be carried, the step counts' message says it)
    return (f"{lut._name()} holds {lut.num_prompts} of {config.calibration.prompts} prompts (calibration.prompts) at "
            f"{lut_steps} steps, {run_has} {steps}: calibration.transfer carries complete LUTs over, and a "
            f"calibration adds prompts of its own step count only; complete it with runs at {lut_steps} steps, set "
            f"calibration.prompts: {lut.num_prompts} to carry it over as it is, or give this run its own lut:")


def expert_guard(lut: Optional[CalibrationLUT], boundary: Optional[float] = None,
                 timesteps: Optional[Sequence[float]] = None) -> Tuple[int, ...]:
    """Steps always computed because the model changes before them (Wan2.2's experts): where ``timesteps``
    (the run's own, one per step, when the integration knows them before the first call), else the LUT's,
    fall below ``boundary`` (a timestep) or the one the LUT recorded (identity ``expert_boundary``). A carried
    LUT's timesteps are interpolated and one of another shift has its own: the run's put the switch where it is."""
    boundary = expert_boundary_of(lut, boundary)
    if boundary is None:
        return ()
    if timesteps is not None:
        import torch

        return switch_guard(torch.as_tensor(list(timesteps), dtype=torch.float64), float(boundary))
    return switch_guard(lut.timesteps, float(boundary)) if lut is not None else ()


def expert_boundary_of(lut: Optional[CalibrationLUT], boundary: Optional[float] = None) -> Optional[float]:
    """``boundary``, else the one the LUT recorded (identity ``expert_boundary``), else ``None``."""
    if boundary is not None or lut is None:
        return boundary
    return (lut.identity or {}).get("expert_boundary")


def lut_for_steps(config: TaoCacheConfig, lut: Optional[CalibrationLUT], steps: int) -> Optional[CalibrationLUT]:
    """The LUT a run of ``steps`` steps plans on: ``lut`` itself, or, with ``calibration.transfer:
    interpolate`` and another step count, ``lut`` carried over (:mod:`taohooks.taocache.lut_transfer`)."""
    if lut is None or lut.steps == steps or config.calibration.transfer != "interpolate":
        return lut
    from .lut_transfer import transfer_lut

    carried = transfer_lut(lut, steps)
    messages.notice(f"{lut._name()} has {lut.steps} steps, this run {steps}: its statistics are carried over by "
                    "interpolation (calibration.transfer: interpolate); calibrate for "
                    f"{steps} steps for exact ones", once=f"transfer {lut.source} {steps}")
    return carried


def make_plan(plan: PlanConfig, steps: int, streams: Sequence[str],
              lut: Optional[CalibrationLUT] = None, *, unskippable: Sequence[int] = ()) -> SkipPlan:
    """The :class:`SkipPlan` a plan config asks for, on a LUT when it needs one; ``unskippable``
    steps (the first two after an expert switch, :func:`~taohooks.taocache.plan.switch_guard`) are computed."""
    result = _make_plan(plan, steps, streams, lut, tuple(unskippable))
    if unskippable:
        check_unskippable(result, unskippable)
    return result


def _make_plan(plan: PlanConfig, steps: int, streams: Sequence[str], lut: Optional[CalibrationLUT],
               unskippable: Tuple[int, ...]) -> SkipPlan:
    streams = tuple(streams)
    constant = not isinstance(plan.ratio, str)
    if lut is not None:
        lut.check(LoopSpec(steps, streams))
    skips = resolve_budget(plan.budget, steps) if plan.budget is not None else None
    if skips == 0 or (skips is None and plan.window is None and plan.skip_steps is None):
        return no_skip_plan(steps, streams)
    if lut is None and plan.window is None and plan.skip_steps is None:  # (said first: whatever the ratio)
        raise PlanError(f"plan.budget: choosing the {'steps' if plan.rule == 'auto' else 'window'} from a budget "
                        "needs a calibration LUT, and none is loaded; calibrate one (lut: names the file, and with "
                        "calibration.auto the first generations calibrate it), or give plan.window / plan.skip_steps "
                        "with a constant plan.ratio")
    if not constant and lut is None:
        raise PlanError("plan.ratio is 'calibrated' but no calibration LUT is loaded; calibrate first, "
                        "or set plan.ratio to a constant such as 1.0 (plain linear extrapolation)")
    if plan.rule == "auto":
        from .error_plan import error_aware_plan

        if skips is None:
            raise PlanError("plan.rule: auto needs plan.budget (it chooses the steps)")
        return error_aware_plan(plan, steps, streams, lut, skips, unskippable).plan
    ratios = plan.ratio if constant else lut.ratio_mean
    if plan.coefficient is not None and not constant:
        from .error_plan import coefficient_table

        ratios = coefficient_table(plan.coefficient, lut.cos_mean, lut.ratio_mean)
    try:  # (a window or steps past this run's count: a carried LUT, another --steps; the key named)
        if plan.window is not None:
            return plan_from_window(steps, streams, plan.window[0], plan.window[1], ratios, plan.refresh_every,
                                    refresh_width=REFRESH_WIDTH[plan.refresh])
        if plan.skip_steps is not None:
            return plan_from_steps(steps, streams, plan.skip_steps, ratios)
    except PlanError as exc:
        key = "plan.window" if plan.window is not None else "plan.skip_steps"
        raise PlanError(f"{key}: {exc}") from None
    if lut is None:
        raise PlanError("choosing the window automatically from a budget needs a calibration LUT; calibrate "
                        "first, or give plan.window / plan.skip_steps")
    first, last, score = search_window(lut.cos_mean, lut.cos_std, lut.ratio_mean, lut.ratio_std, skips,
                                       refresh_every=plan.refresh_every, min_step=plan.min_step,
                                       refresh_width=REFRESH_WIDTH[plan.refresh],
                                       tau_cos=plan.tau_cos, lam=plan.lambda_, gamma=plan.gamma,
                                       unskippable=unskippable)
    return plan_from_window(steps, streams, first, last, ratios, plan.refresh_every, score=score, source="max-cos",
                            refresh_width=REFRESH_WIDTH[plan.refresh])


def _load_present(path: Optional[Path]) -> Optional[CalibrationLUT]:
    """The LUT at ``path``, or ``None`` when there is no file yet (a calibrating run writes it).
    A FIFO or a device there is an error (a LUTFormatError), never a file to calibrate into."""
    if path is None or not (path.is_file() or special_file_kind(path)):
        return None
    return CalibrationLUT.load(path)


def check_config_lut(config: TaoCacheConfig, calibrating: bool = False) -> Optional[CalibrationLUT]:
    """Before the model loads: the config's LUT file against the config's labels (``model_id``,
    ``calibration.sampler``) and, where calibration will add to it, its error statistics' horizon
    (``calibration.error_horizon``); and a missing LUT that the plan needs and nothing will calibrate
    (``calibration.auto: false``, unless ``calibrating``: ``taocache calibrate`` runs). Raises
    :class:`~taohooks.config.ConfigError` naming the config and the key. Returns the LUT (``None``
    when there is no file yet)."""
    from ..config import ConfigError

    path = config.lut_path()
    source = config.source or "the config"
    if path is None:
        return None
    if not path.is_file():
        plan = config.plan
        skips = plan.window is not None or plan.skip_steps is not None or plan.budget not in (None, 0)
        if skips and isinstance(plan.ratio, str) and not calibrates(config) and not calibrating:
            raise ConfigError(source, "lut", f"{path} does not exist and calibration.auto is false, so nothing will "
                                             "calibrate it, and the plan needs it (plan.ratio: calibrated); fix the "
                                             "path, or set calibration.auto: true to calibrate it on the first runs")
        return None
    from .lut import LUTFormatError

    try:
        lut = CalibrationLUT.load(path)
    except LUTFormatError as exc:
        raise ConfigError(source, "lut", str(exc)) from None
    for key, want, have in (("model_id", config.model_id, lut.model_id),
                            ("calibration.sampler", sampler_label(config), lut.sampler)):
        if want and have and want != have:
            raise ConfigError(source, key, f"{want!r}, but the LUT {path} was calibrated with {key.split('.')[-1]} "
                                           f"{have!r}; point lut at a LUT of this {key.split('.')[-1]}, or correct "
                                           f"{key}")
    adds = (calibrating or calibrates(config)) and lut.num_prompts < config.calibration.prompts
    horizon = lut.deltas.horizon if lut.deltas is not None and lut.num_prompts else None
    if adds and horizon is not None and config.calibration.error_horizon < horizon:  # (a longer one merges to it)
        raise ConfigError(source, "calibration.error_horizon", f"{config.calibration.error_horizon}, but the LUT {path} "
                          f"holds error statistics up to {horizon} steps apart: the prompts calibrated now would "
                          f"{'drop' if not config.calibration.error_horizon else 'change'} them; set "
                          f"calibration.error_horizon: {horizon}")
    return lut


def check_config_before_run(config: TaoCacheConfig, calibrating: bool = False,
                            writable: bool = True) -> Optional[CalibrationLUT]:
    """Everything the config alone says about its plan and LUT, before a model loads: a budget that needs a LUT the
    config does not name; a ``lut:`` that is a folder or a special file; :func:`check_config_lut`; and, with
    ``writable``, where runs will calibrate into it (missing or incomplete), that the LUT can be written (its folder
    is made). Raises
    :class:`~taohooks.config.ConfigError` (or :class:`~taohooks.runtime.io.FileWriteError`). Returns the LUT
    (``None`` when there is no file yet)."""
    from ..config import ConfigError
    from .plan import resolve_budget

    source = config.source or "the config"
    path, plan = config.lut_path(), config.plan
    skips = plan.budget if plan.budget is None or config.loop.steps is None else \
        resolve_budget(plan.budget, config.loop.steps)  # (a fraction of known steps that rounds to 0 skips nothing)
    if path is None and plan.window is None and plan.skip_steps is None and skips not in (None, 0):
        raise ConfigError(source, "plan.budget", "choosing the steps to skip from a budget needs a calibration "
                          "LUT: name a lut: (the first runs calibrate it), or give plan.window / plan.skip_steps "
                          "with a constant plan.ratio")
    if path is None:
        return None
    if path.is_dir():
        raise ConfigError(source, "lut", f"{path} is a directory; name the LUT file inside it, "
                                         f"e.g. {path / 'model.safetensors'}")
    kind = special_file_kind(path)
    if kind is not None:
        raise ConfigError(source, "lut", f"{path} is {kind}, not a LUT file; name a file such as "
                                         "luts/model.safetensors")
    lut = check_config_lut(config, calibrating)
    adds = lut is None or lut.num_prompts < config.calibration.prompts
    if writable and (calibrating or calibrates(config)) and adds:
        check_writable(path)
    return lut


def refuse_plan_past_steps(config: TaoCacheConfig, steps: int) -> None:
    """A plan no LUT of ``steps`` steps can serve (a budget over more steps than the late regime holds, a window or
    ``min_step`` past the last step), as a :class:`PlanError` naming the config's keys: said before a calibration's
    generations, not at the first skipping run after them (not called with ``calibration.transfer: interpolate``,
    whose LUT serves runs of other step counts)."""
    problems: List[str] = []
    validate_against_steps(config, steps, lambda key, message: problems.append(f"{key}: {message}"))
    if problems:
        where = f"{config.source}: " if config.source else ""
        raise PlanError(f"{where}{'; '.join(problems)} (the loop attached has {steps} steps; said before calibrating "
                        "a LUT that no run of this plan could use)")


def sampler_label(config: TaoCacheConfig) -> Optional[str]:
    """``calibration.sampler`` as the LUT checks compare it: not at all when ``calibration.accept`` names the
    scheduler (the run's solver differs from the LUT's knowingly; its label is the LUT's)."""
    return None if "scheduler" in config.calibration.accept else config.calibration.sampler


def check_run(config: TaoCacheConfig, lut: CalibrationLUT, loop: LoopSpec,
              identity: Optional[Mapping[str, Any]] = None, continued: bool = False,
              model: Optional[nn.Module] = None) -> None:
    """Raise :class:`LUTMismatchError` naming every way ``lut`` does not fit this run: steps,
    streams, the config's ``model_id``/``calibration.sampler`` labels, and the recorded identity. ``continued``: the
    run adds its prompts to ``lut`` (unfinished), which ``calibration.accept`` does not cover. ``model``: the run's,
    against which a LUT that recorded torch.compile's wrapper is checked (without it, its model is not)."""
    recorded = comparable_identity(getattr(lut, "identity", None) or {}, model)
    try:
        lut.check(loop, config.model_id, sampler_label(config))
    except LUTMismatchError as exc:  # (a LUT of another model: said first, not as its steps or streams alone)
        other = [k for k in differences(recorded, identity or {}, config.calibration.accept)
                 if k in ("model", "architecture")]
        if other:
            frames = other == ["architecture"] and "frames" in recorded and "frames" in (identity or {}) and \
                recorded["frames"] != identity["frames"]  # (Latte's transformer is built with the frame count)
            said = describe_differences(recorded, identity, ["frames", *other] if frames else other)
            lead = "is of another frame count, or another model" if frames else "is of another model"
            raise LUTMismatchError(f"{lut._name()} {lead} ({said}); {exc}".replace(
                f"; {lut._name()} ", "; it ", 1)) from None
        raise
    if identity:
        unrecorded = [k for k in unrecorded_keys(recorded, identity) if accept_name(k) not in config.calibration.accept]
        if unrecorded and lut.source:  # (a LUT of an earlier taohooks, or calibrated where they were not known)
            advice = (" (a LUT calibrated under FSDP records none: its parameters are sharded)"
                      if unrecorded == ["architecture"] else ": calibrate a LUT of this run to have them checked")
            groups = {g: [k for k in unrecorded if accept_name(k) == g]
                      for g in dict.fromkeys(map(accept_name, unrecorded))}
            names = [keys[0] if len(keys) == 1 else f"{g}.*" for g, keys in groups.items()]
            values = ", ".join(f"{k} {identity[k]!r}" for k in names if k in identity)  # (a group's keys: no values)
            if recorded_the_wrapper(lut.identity) and {"model", "architecture"} & set(unrecorded):
                others = [n for n in names if n not in ("model", "architecture")]
                what = "torch.compile's wrapper, not the model (a LUT of before 2026-11-28)" + (
                    f", and no {', '.join(others)} of its calibrating run" if others else "")
            else:
                what = f"no {', '.join(names)} of its calibrating run"
            messages.notice(f"{lut._name()} records {what}, so "
                            + (f"this run's ({values})" if values else "they")
                            + f" cannot be checked against it{advice}",
                            once=f"unrecorded {lut.source} {unrecorded}")
        keys = differences(recorded, identity, () if continued else config.calibration.accept)
        if not keys:
            return
        where = f" in {config.source}" if config.source else ""
        said = f"{lut._name()} was calibrated on another run: {describe_differences(recorded, identity, keys)}"
        if recorded_the_wrapper(recorded) and {"model", "architecture"} & set(keys):  # (not this model's wrapper)
            said += " (it recorded torch.compile's wrapper of a model of another architecture)"
        if continued:  # (accepting a difference would not help: the recorder refuses to mix two runs)
            raise LUTMismatchError(
                f"{said}: an unfinished LUT ({lut.num_prompts} of {config.calibration.prompts} prompts) is continued "
                "at the values it began with (calibration.accept lets a complete LUT serve runs at other values; one "
                f"LUT never mixes two): finish it at the LUT's values, or give this run a lut: of its own{where}")
        raise LUTMismatchError(f"{said}. Give this run its own LUT (lut:{where}), or accept the difference knowingly "
                               f"with calibration.accept: [{', '.join(accept_names(keys))}]{where}")


def python_route_identity(module: nn.Module) -> Dict[str, Any]:
    """What an ``attach`` without ``identity=`` records and checks: the model inside its wrappers (class, architecture
    fingerprint, dtype), but no fingerprint under FSDP, whose flattened or sharded parameters hide the shapes (and
    FSDP2's ``FSDP<Model>`` class is ``Model``'s)."""
    inner = unwrap_model(module, compiled=True)
    identity = model_identity(inner)
    if is_sharded(module) or is_sharded(inner):  # (FSDP1's use_orig_params leaves the inner module unmarked)
        identity.pop("architecture", None)
        name = type(inner).__name__
        if any(f"FSDP{base.__name__}" == name for base in type(inner).__mro__[1:]):
            identity["model"] = name[len("FSDP"):]
    return identity


class TaoCache:
    """TaoCache for one model: holds the config, the LUT, the plan and the hook while attached.

    Args:
        config: a :class:`TaoCacheConfig` (defaults to an empty one: no skips).
        lut: a :class:`CalibrationLUT`, or a path to one; defaults to ``config.lut``.
    """

    def __init__(self, config: Optional[TaoCacheConfig] = None, *,
                 lut: Union[CalibrationLUT, str, os.PathLike, None] = None):
        if config is not None and not isinstance(config, TaoCacheConfig):
            raise TypeError(f"taohooks: TaoCache(config) takes a TaoCacheConfig, got {type(config).__name__}; "
                            "use TaoCache.from_yaml(path), or taohooks.config.config_from_dict(mapping)")
        if lut is not None and not isinstance(lut, (CalibrationLUT, str, os.PathLike)):
            raise TypeError(f"taohooks: TaoCache(lut=) takes a CalibrationLUT or a path, got {type(lut).__name__}")
        self.config = config if config is not None else TaoCacheConfig()
        if self.config.source is None:  # made in Python: checked as a YAML file's is at load
            check_python_config(self.config)
        self._lut_given: Optional[Path] = None  # lut= given as a path (read from the folder it was given in)
        self._lut_none = isinstance(lut, CalibrationLUT)  # lut= given as a LUT: no file
        self._cwd = os.getcwd()
        if isinstance(lut, CalibrationLUT):
            self.lut: Optional[CalibrationLUT] = lut
        else:
            self._lut_given = Path(lut) if lut is not None else None
            self.lut = _load_present(self._lut_path)
        self.hook: Optional[DenoiserHook] = None  # kept after detach, for summary()
        self.plan: Optional[SkipPlan] = None
        self.recorder: Optional[CalibrationRecorder] = None
        self.callback: Optional[TaoCacheCallback] = None
        self.unskippable: Tuple[int, ...] = ()  # steps computed because an expert switch precedes them
        # ranks of a process group generate prompts of their own (data parallel: Lightning DDP, a torchrun job
        # of independent samplers): each adds what it calibrated to the LUT file; otherwise the ranks share each
        # prompt (sequence parallelism, gathered outputs) and rank 0 alone writes
        self.data_parallel = self.config.calibration.ranks == "own"
        # every rank of the process group runs every generation together (sequence parallelism: Wan's generate.py
        # under torchrun): attach waits for the other ranks before it reads a LUT being calibrated, so that no rank
        # plans on the file before rank 0 has written the generation before (they planned apart, and their
        # collectives paired the wrong calls: multi-GPU walkthrough, 2026-11-27). Set by the wan / wan22 integrations
        self.shared_generations = self.config.calibration.ranks == "shared"
        # the caller attaches again at each generation (the launcher, the Lightning callback), so a completed
        # calibration switches to skipping at the next one; in one attach from Python the plan stays
        self.reattached_per_generation = False
        # the caller prints its own line about each generation and then say_deferred_notices() (the launcher), so
        # that the calibration's completion is said after that generation's summary, not before it
        self.defer_completion_notice = False

    @classmethod
    def from_yaml(cls, path: Union[str, os.PathLike], **kwargs) -> "TaoCache":
        return cls(load_config(path), **kwargs)

    # ------------------------------------------------------------------ attach
    def loop_spec(self, steps: Optional[int] = None, streams: Optional[Sequence[str]] = None,
                  split_batch: Optional[bool] = None, batch_dim: Optional[int] = 0) -> LoopSpec:
        """The loop shape from the arguments, falling back to the config's ``loop`` section."""
        loop = self.config.loop
        where = f" in {self.config.source}" if self.config.source else ""
        if steps is not None and loop.steps is not None and steps != loop.steps:  # (taken without a word)
            messages.warning(f"attach(steps={steps}) overrides the config's loop.steps {loop.steps}{where}",
                             once=f"loop.steps {id(self)} {steps}")
        steps = steps if steps is not None else loop.steps
        if steps is None:
            raise ValueError("taohooks: the number of steps is unknown; pass steps= or set loop.steps in the config")
        if isinstance(streams, str):  # one stream named by its name, not its letters
            streams = (streams,)
        # (fewer streams in the declared order: the integration read from the call that some do not run, e.g. no
        # uncond call at a guidance scale of 1; said nowhere, as the run's LUT is checked against them anyway)
        fewer = streams is not None and [s for s in loop.streams or () if s in streams] == list(streams)
        if streams is not None and loop.streams and tuple(streams) != tuple(loop.streams) and not fewer:
            messages.warning(f"attach(streams={tuple(streams)}) overrides the config's loop.streams "
                             f"{tuple(loop.streams)}{where}: this run's calls are those streams (given to attach, or "
                             "read by the integration from the call; the order is the order of the calls in each "
                             "step)",
                             once=f"loop.streams {id(self)} {tuple(streams)}")
        streams = streams if streams is not None else (loop.streams or ("main",))
        split = split_batch if split_batch is not None else loop.split_batch
        return LoopSpec(steps, tuple(streams), split, batch_dim)

    @property
    def _lut_path(self) -> Optional[Path]:
        """The LUT file, as a path that still names it after the script changed its working directory (a relative
        ``lut:`` is the config file's folder's; a relative ``lut=`` the folder it was given in)."""
        if self._lut_none:
            return None
        path = self.config.lut_path() if self._lut_given is None else self._lut_given
        if path is None or path.is_absolute() or os.getcwd() == self._cwd \
                or (self._lut_given is None and self.config.source is not None):  # (lut_path() said it absolute)
            return path
        return Path(self._cwd) / path

    def held_prompts(self) -> int:
        """Prompts in the LUT a calibrating run adds to: its recorder's (the file's as it was, and what it added),
        or the file's where other processes added more."""
        held = self.recorder.lut().num_prompts if self.recorder is not None else 0
        if self._lut_path is not None and self._lut_path.is_file():
            held = max(held, CalibrationLUT.load(self._lut_path).num_prompts)
        return held

    @property
    def said_calibration_complete(self) -> bool:
        """Whether this run's LUT saver said that the LUT is complete (the launcher and the Lightning callback
        then do not say it again when they re-attach)."""
        return any(isinstance(cb, _SaveLUT) and cb.said_complete for cb in (self.hook.callbacks if self.hook else ()))

    def say_deferred_notices(self) -> None:
        """Print what this run's callbacks kept to be said after the caller's own line about the generation
        (``defer_completion_notice``: the launcher's summary line comes first, then the calibration's completion)."""
        for cb in self.hook.callbacks if self.hook else ():
            if isinstance(cb, _SaveLUT):
                cb.say_deferred()

    @property
    def calibrating(self) -> bool:
        """Whether the attached run records a LUT instead of skipping (the config's LUT is missing)."""
        return self.recorder is not None

    def attach(self, module: nn.Module, steps: Optional[int] = None, streams: Optional[Sequence[str]] = None, *,
               split_batch: Optional[bool] = None, batch_dim: Optional[int] = 0,
               timestep_arg: Union[str, int, None] = None, repeat: bool = False,
               callbacks: Iterable[Callback] = (), identity: Optional[Mapping[str, Any]] = None,
               also: Sequence[nn.Module] = (), expert_boundary: Optional[float] = None,
               unskippable: Sequence[int] = (), run_timesteps: Optional[Sequence[float]] = None) -> DenoiserHook:
        """Wrap ``module``'s forward for sampling loops of the given shape; returns the hook
        (a context manager that detaches on exit). ``callbacks`` run after TaoCache's (those whose
        ``checks_every_call`` is set before it).

        ``identity`` is what this run is (:mod:`taohooks.taocache.identity`: model, architecture, dtype,
        scheduler, shift, ...): a calibrating run records it in the LUT, a skipping run must match
        the LUT's, key by key (those both have), except the keys in ``calibration.accept``. Not given (the
        Python route), it is ``module``'s model class, architecture and dtype (``model_identity``).

        ``also``: more instances whose calls belong to the same loop (Wan2.2's experts); with
        ``expert_boundary`` (a timestep) the model changes where the LUT's timesteps fall below it,
        and the first two steps after that switch are always computed; ``run_timesteps`` (this run's, one per step,
        where the integration knows them before the first call) place that switch for the plan, which a carried LUT
        or one of another shift would misplace (the calls' timesteps still guard it). ``unskippable``: steps a plan
        chosen from a budget leaves computed (VideoSys' MLP-broadcast steps); an explicit window or skip list over
        them is the integration's to refuse, with its reason."""
        if self.hook is not None and self.hook.attached:
            raise RuntimeError("taohooks: this TaoCache is already attached; detach it first")
        if identity is not None:  # a calibration would fail to write it after a generation's work
            identity = check_identity(dict(identity), "taohooks: attach(identity=...)")
        else:  # (a LUT calibrated in bf16 was taken by an fp32 run without a word)
            identity = python_route_identity(module)
        loop = self.loop_spec(steps, streams, split_batch, batch_dim)
        cfg, callbacks = self.config, list(callbacks)
        check_pab_patterns(cfg, (module, *also))  # also while calibrating, which attaches no PAB (and said nothing)
        path = self._lut_path
        if path is not None and self.shared_generations and calibrates(cfg):
            _barrier()  # rank 0 has written the generations before (its _SaveLUT) when it gets here
        if path is not None:  # the file is the truth (a calibrating run may have written it)
            self.lut = _load_present(path)
        wanted = cfg.calibration.prompts
        calibrate = path is not None and calibrates(cfg) and (self.lut is None or self.lut.num_prompts < wanted)
        lut = self.lut if calibrate else lut_for_steps(cfg, self.lut, loop.steps)
        problem = unfinished_lut_steps_problem(cfg, self.lut, loop.steps, calibrate)
        if problem:
            raise LUTMismatchError(problem)
        if lut is not None:
            check_run(cfg, lut, loop, identity, continued=calibrate, model=module)
        self.recorder = self.callback = None
        if calibrate:
            if cfg.calibration.transfer != "interpolate":  # (else the LUT may serve runs of other step counts)
                refuse_plan_past_steps(cfg, loop.steps)  # (the Python route's steps come here, not in loop.steps)
            check_writable(path)  # before the first model call, not after a generation's work
            have = 0 if self.lut is None else self.lut.num_prompts
            messages.notice(f"calibrating: LUT {path} has {have} of {wanted} prompts "
                            f"(calibration.prompts); this run computes every step and writes the LUT after each "
                            "generation")
            self.recorder = CalibrationRecorder(cfg.model_id, cfg.calibration.sampler, resume=self.lut,
                                                identity=dict(identity or {}),
                                                error_horizon=cfg.calibration.error_horizon)
            self.plan = no_skip_plan(loop.steps, loop.streams)
            self.recorder.limit = wanted  # (a generation after the LUT is complete adds nothing to it)
            self.recorder.every_rank = self.data_parallel
            _warn_unsaid_ranks(self, path)
            own: list = [self.recorder, _SaveLUT(self.recorder, path, wanted, every_rank=self.data_parallel,
                                                 reattached=self.reattached_per_generation,
                                                 defer=self.defer_completion_notice),
                         *_teacache_fit_callbacks(cfg, path)]
        else:
            if run_timesteps is not None and len(run_timesteps) != loop.steps:
                raise ValueError(f"taohooks: attach(run_timesteps=...) has {len(run_timesteps)} timesteps for "
                                 f"{loop.steps} steps")
            guard = expert_guard(lut, expert_boundary, run_timesteps)
            self.unskippable = guard
            chosen = cfg.plan.window is None and cfg.plan.skip_steps is None  # (a budget's plan: steered clear)
            avoid = tuple(sorted(set(guard) | set(unskippable))) if chosen else guard
            try:
                self.plan = make_plan(cfg.plan, loop.steps, loop.streams, lut, unskippable=avoid)
            except PlanError as exc:  # (the config file named: a window past the steps, over an expert switch)
                text = str(exc) if str(exc).startswith("plan") else f"plan: {exc}"
                raise PlanError(f"{cfg.source}: {text}" if cfg.source else str(exc)) from None
            carried = lut is not None and lut is not self.lut  # its timesteps are interpolated, not seen
            self.callback = TaoCacheCallback(self.plan, lut.timesteps if lut is not None and not carried else None,
                                             max_norm_ratio=cfg.plan.max_norm_ratio,
                                             expert_boundary=expert_boundary_of(lut, expert_boundary))
            own = [self.callback] + section_callbacks(cfg, self.plan, path)
            for problem in composition_problems(self.plan, callbacks):
                messages.warning(problem, once=f"composition:{problem}")
        first = [cb for cb in callbacks if cb.checks_every_call]  # (before TaoCache's, which answers skipped calls)
        self.hook = DenoiserHook(loop, first + own + [cb for cb in callbacks if not cb.checks_every_call],
                                 timestep_arg=timestep_arg, repeat=repeat)
        return self.hook.attach(module, *also)

    def detach(self) -> None:
        if self.hook is not None:
            self.hook.detach()

    def new_sample(self) -> None:
        """Begin a new generation (between prompts of a loop that does not declare ``repeat``)."""
        if self.hook is None or not self.hook.attached:
            raise RuntimeError("taohooks: TaoCache is not attached")
        self.hook.new_sample()

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict:
        """Calls computed and skipped per stream since attach, the window, fallbacks (total and per
        reason), and the generations that were out of line with the loop (``repeat=True``)."""
        hook, callback = self.hook, self.callback
        counts = {s: {"computed": c, "skipped": k} for s, (c, k) in (hook.counts.items() if hook else [])}
        return {"streams": counts, "plan": self.plan.describe() if self.plan else None,
                "window": self.plan.window if self.plan else None,
                "skipped_fraction": self.plan.skipped_fraction if self.plan else 0.0,
                "fallbacks": callback.fallbacks if callback else 0,
                "fallback_reasons": dict(callback.fallback_reasons) if callback else {},
                "misaligned_generations": (callback.misaligned_generations if callback else 0)
                + (hook.misaligned_generations if hook else 0),
                "stray_calls": hook.stray_calls if hook else 0,
                "calibrating": self.calibrating}

    def summary(self) -> str:
        """A short report: per stream calls made and saved, the window used, fallbacks."""
        s = self.stats()
        if self.plan is None:
            return "TaoCache: not attached yet"
        lines = [f"TaoCache: {s['plan']}" + (" — calibrating" if s["calibrating"] else "")]
        for name, c in s["streams"].items():
            total = c["computed"] + c["skipped"]
            frac = 100.0 * c["skipped"] / total if total else 0.0
            lines.append(f"  {name}: {c['computed']} calls computed, {c['skipped']} saved ({frac:.1f}%)")
        if s["fallbacks"]:
            reasons = ", ".join(f"{why}: {n}" for why, n in s["fallback_reasons"].items())
            lines.append(f"  fallbacks to a real call: {s['fallbacks']} ({reasons})")
        if s["misaligned_generations"]:
            lines.append(f"  generations out of line with the loop, computed without caching: "
                         f"{s['misaligned_generations']} ({s['stray_calls']} calls outside any generation)")
        lines += [f"  {label.format(f'{n:g}')}" for label, n in self.composed_counts().items()]
        return "\n".join(lines)

    def composed_counts(self) -> Dict[str, float]:
        """What the caches composed with TaoCache saved inside the calls it computed (TeaCache's reused calls, PAB's
        broadcasts), by message label (``{}``: the count); the summaries say them."""
        counts: Dict[str, float] = {}
        for cb in (self.hook.callbacks if self.hook is not None else ()):
            if hasattr(cb, "threshold") and hasattr(cb, "reused"):
                counts["TeaCache reused the block residual on {} calls"] = cb.reused
            if hasattr(cb, "broadcasts"):
                counts["PAB broadcast {} attention calls"] = cb.broadcasts
        return counts


def _teacache_proxy(config: TaoCacheConfig) -> dict:
    from ..config import TeaCacheConfig

    tea = config.teacache or TeaCacheConfig()
    return {"blocks": tea.blocks, "hidden_arg": tea.hidden_arg}


def _teacache_fit_callbacks(config: TaoCacheConfig, lut_path: Path) -> List[Callback]:
    """With ``calibration.teacache_fit``: TeaCache's calibrator on the ``teacache:`` section's proxy and
    what adds its pairs to ``<lut>.teacache.json`` after each generation."""
    if not config.calibration.teacache_fit:
        return []
    from ..caches.teacache import TeaCacheCalibrator
    from ..caches.teacache_fit import SaveTeaCacheFit, fit_path

    proxy = _teacache_proxy(config)
    calibrator = TeaCacheCalibrator(blocks=proxy["blocks"], hidden_arg=proxy["hidden_arg"])
    return [calibrator, SaveTeaCacheFit(calibrator, fit_path(lut_path), proxy, lut_path)]


def check_pab_patterns(config: TaoCacheConfig, models: Sequence[nn.Module]) -> None:
    """Each ``pab.groups`` pattern matches a module of every model (:class:`~taohooks.caches.pab.PABPatternError`
    naming the config file and the group otherwise)."""
    if config.pab is None:
        return
    from ..caches.pab import modules_matching

    where = f"{config.source}: " if config.source else ""
    for i, group in enumerate(config.pab.groups):
        for model in models:
            modules_matching(model, group.pattern, what=f"{where}pab.groups[{i}].pattern")


HYBRID_GUARD = 2  # the paper's refresh guard band: 2-3 steps (Algorithm 2)


def hybrid_range_problems(config: TaoCacheConfig, plan: SkipPlan) -> List[str]:
    """What a ``teacache:`` section's ``guard_band`` does wrong with ``plan`` (Algorithm 2: TeaCache on the steps
    from ``warmup_steps`` up to ``window start - guard_band``): a range with no step in it (TeaCache then reuses
    nothing), or a band under :data:`HYBRID_GUARD` steps, which lets TeaCache's reused outputs be the two computed
    outputs TaoCache's first skip extrapolates from. Empty when TeaCache is off or the plan skips nothing."""
    tea = config.teacache
    if tea is None or not tea.threshold or not plan.skipped_steps:
        return []
    first = plan.skipped_steps[0]
    where = f"{config.source}: teacache.guard_band" if config.source else "teacache.guard_band"
    # the authors' published variants force their own first steps; warmup_steps is the generic callback's
    warmup = tea.warmup_steps if tea.published is None else 1
    if first - tea.guard_band <= warmup:
        return [f"{where}: {tea.guard_band} steps before TaoCache's window (its first skipped step is {first}) leave "
                f"TeaCache no step to reuse (it computes every step from {max(first - tea.guard_band, 0)} on, and "
                f"the first {warmup}): lower guard_band, or leave the teacache: section out"]
    if tea.guard_band < HYBRID_GUARD:
        return [f"{where}: {tea.guard_band}: TaoCache's first skip (step {first}) extrapolates from steps "
                f"{first - 2} and {first - 1}, which TeaCache may then have reused rather than computed (error "
                f"carried into the window); the paper's guard band is {HYBRID_GUARD}-3 steps"]
    return []


def thin_guard_warning(where: str, guard: int) -> None:
    """Warn (through taohooks' channel) that a hybrid's guard band under :data:`HYBRID_GUARD` steps lets TaoCache's
    first skip extrapolate from outputs TeaCache reused: accepted (an ablation may want it), never silently."""
    if guard < HYBRID_GUARD:
        messages.warning(f"{where}: {guard}: the hybrid's TeaCache may reuse the outputs TaoCache's first skip "
                         f"extrapolates from (error carried into the window); the paper's guard band is "
                         f"{HYBRID_GUARD}-3 steps, so the hybrid row measures this ablation, not Algorithm 2",
                         once=f"thin guard {where} {guard}")


def composition_problems(plan: SkipPlan, callbacks: Iterable[Callback]) -> List[str]:
    """What TeaCache and PAB callbacks given to :meth:`TaoCache.attach` (``callbacks=``) lack for ``plan``, which the
    YAML's ``teacache:`` / ``pab:`` sections set: TeaCache's ``max_step`` a guard band before the window (Algorithm 2;
    without it TaoCache extrapolates from reused outputs, and steps after the window reuse a residual from before
    it), PAB's reset where TaoCache resumes (without it the first call after a skip broadcasts older attention)."""
    from ..caches.pab import PyramidAttentionBroadcast
    from ..caches.teacache import TeaCacheCallback

    if not plan.skipped_steps:
        return []
    first, problems = plan.skipped_steps[0], []
    for cb in callbacks:
        if isinstance(cb, TeaCacheCallback) and cb.threshold and (cb.max_step is None
                                                                    or cb.max_step > first - HYBRID_GUARD):
            reuses = "on every step but its warm-up and the last" if cb.max_step is None else \
                f"up to step {cb.max_step - 1}"
            problems.append(f"attach(callbacks=...): TeaCacheCallback may reuse {reuses} while TaoCache skips "
                            f"from step {first}: pass max_step={max(first - HYBRID_GUARD, 0)} (Algorithm 2's guard "
                            "band of 2 steps; the YAML's teacache: section sets it)")
        if isinstance(cb, PyramidAttentionBroadcast) and not cb.reset_on_resume:
            missing = sorted(set(plan.resume_steps) - cb.reset_steps)
            if missing:
                problems.append(f"attach(callbacks=...): PyramidAttentionBroadcast keeps attention from before "
                                f"TaoCache's skips at step(s) {', '.join(map(str, missing))}, where TaoCache resumes: "
                                "pass reset_on_resume=True (the YAML's pab: section sets it)")
    return problems


def section_callbacks(config: TaoCacheConfig, plan: SkipPlan, lut_path: Optional[Path] = None) -> List[Callback]:
    """The callbacks of the config's ``teacache:`` (hybrid) and ``pab:`` sections for this plan.

    TeaCache runs on steps before ``window start - guard_band`` (Algorithm 2); PAB broadcasts
    inside each computed call and drops its cached attention outputs on the plan's resume steps.
    """
    from ..caches.pab import BroadcastGroup, PyramidAttentionBroadcast
    from ..caches.teacache import TeaCacheCallback

    callbacks: List[Callback] = []
    tea = config.teacache
    if tea is not None and tea.threshold is None:  # a config built in Python, which YAML's validation never saw
        from ..config import TEACACHE_THRESHOLD_MISSING, ConfigError

        raise ConfigError(config.source or "the config", "teacache.threshold", TEACACHE_THRESHOLD_MISSING)
    if tea is not None and tea.threshold:  # (0: off; the section then only names the fit's proxy)
        for problem in hybrid_range_problems(config, plan):
            messages.warning(problem, once=f"hybrid-range:{problem}")
        first = plan.skipped_steps[0] if plan.skipped_steps else plan.steps
        max_step = max(0, first - tea.guard_band)
        if tea.published is not None:
            callbacks.extend(published_teacache(tea.published, tea.threshold, tea.use_ret_steps, max_step))
        else:
            coefficients = tea.coefficients or [1.0, 0.0]
            if tea.calibrated:
                from ..caches.teacache_fit import fit_path, fitted_coefficients

                if lut_path is None:
                    raise ValueError(f"{config.source}: teacache.calibrated needs a lut: (its fit is kept next to it)")
                lut = _load_present(lut_path)
                coefficients = fitted_coefficients(fit_path(lut_path), _teacache_proxy(config),
                                                   lut.created if lut is not None else None)
            callbacks.append(TeaCacheCallback(tea.threshold, coefficients, blocks=tea.blocks,
                                              hidden_arg=tea.hidden_arg, warmup_steps=tea.warmup_steps,
                                              max_step=max_step))
    pab = config.pab
    if pab is not None:
        groups = [BroadcastGroup(g.pattern, g.range_) for g in pab.groups]
        window = {"timesteps": tuple(pab.timesteps)} if pab.timesteps is not None else {"steps": tuple(pab.steps)}
        callbacks.append(PyramidAttentionBroadcast(groups, reset_steps=plan.resume_steps if pab.reset_on_refresh
                                                   else (), reset_on_resume=pab.reset_on_refresh, **window))
    return callbacks


def published_teacache(model: str, threshold: float, use_ret_steps: bool = False,
                       max_step: Optional[int] = None) -> List[Callback]:
    """The authors' TeaCache for a ``teacache.published`` model (:data:`~taohooks.config.TEACACHE_PUBLISHED`)."""
    if model.startswith("wan2.1-"):
        from ..caches.teacache_wan21 import wan21_teacache

        return wan21_teacache(model[len("wan2.1-"):], threshold, use_ret_steps, max_step=max_step)
    from ..caches.teacache_latte import latte_teacache

    return latte_teacache(model, threshold, max_step=max_step)


def _barrier() -> None:
    """Wait for every rank of the process group (none: return)."""
    import torch.distributed as dist

    from ..runtime.distributed import world

    if world()[1] > 1:
        dist.barrier()


def _warn_unsaid_ranks(cache: "TaoCache", path: Path) -> None:
    """In a process group of several ranks that says neither how its ranks share generations (``shared_generations``)
    nor that each samples its own (``data_parallel``), only rank 0 adds its generations to the LUT: fine for ranks
    that share each generation, but a data-parallel job's other ranks calibrated at full cost for nothing, without
    a word (DDP walkthrough, 2026-11-27). Said once, naming both settings."""
    from ..runtime.distributed import world

    size = world()[1]
    if size > 1 and not (cache.data_parallel or cache.shared_generations):
        where = f" in {cache.config.source}" if cache.config.source else ""
        messages.warning(f"calibrating {path} in a process group of {size} ranks: only rank 0's generations are added "
                         "to it (the ranks are taken to share each generation). If each rank samples prompts of its "
                         f"own, set calibration.ranks: own{where} (cache.data_parallel = True), or calibrate first "
                         "with taocache calibrate --data-parallel; if the ranks run each generation together "
                         "(sequence parallel), calibration.ranks: shared (cache.shared_generations = True)",
                         once=f"unsaid ranks {path}")


def _writes_the_lut() -> bool:
    """Whether this process writes auto-calibrated LUTs: rank 0 of a process group, or no group."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


def _failure(exc: BaseException) -> str:
    """An exception in a message: its text; for other than the expected OSError/ValueError, its type too."""
    return str(exc) if isinstance(exc, (OSError, ValueError)) else f"{type(exc).__name__}: {exc}"


def _side_file(path: Path, recorder: CalibrationRecorder) -> Path:
    """Where a run's prompts go when its ``lut:`` holds another run's (other identity, steps, streams): a file next to
    it named by what the run is, so that runs alike add to one file and nothing calibrated is lost."""
    import hashlib
    import json

    lut = recorder.lut()
    what = json.dumps([lut.identity, lut.steps, list(lut.streams), lut.model_id, lut.sampler], sort_keys=True,
                      default=str)
    return path.with_name(f"{path.stem}.run-{hashlib.sha256(what.encode()).hexdigest()[:8]}{path.suffix}")


class _SaveLUT(Callback):
    """Adds each complete generation to the LUT file (:meth:`CalibrationRecorder.flush`: atomic, under a
    lock, merged with what other processes wrote). A failed write is a warning naming the path, never
    an exception: the generation's output belongs to the script, and the next generation retries; so do
    detach and the end of the process, which say what could not be saved."""

    def __init__(self, recorder: CalibrationRecorder, path: Path, wanted: Optional[int] = None,
                 every_rank: bool = False, reattached: bool = False, defer: bool = False):
        self.recorder, self.path, self.wanted, self.every_rank = recorder, path, wanted, every_rank
        self.reattached = reattached
        self.defer = defer  # keep the completion notice for say_deferred() (the launcher: after its summary line)
        self.deferred: Optional[str] = None
        self._exit_registered = False
        self._complete = False  # the LUT reached `wanted` (said once)
        self.said_complete = False  # ... and this process printed it
        self._diverted = False  # the LUT held another run's prompts: this run's went to a file of its own

    def say_deferred(self) -> None:
        """Print the completion notice kept by ``defer`` (once)."""
        if self.deferred is not None:
            message, self.deferred = self.deferred, None
            self.said_complete = messages.notice(message)

    def on_detach(self, hook) -> None:
        self._last_try("when the hook was detached", "the process tries once more when it ends")

    def _last_try(self, when: str, then: str = "they are lost, and a later run calibrates them again") -> None:
        """Retry a save that failed; say plainly what is lost if it fails again."""
        pending = self.recorder.pending_prompts
        if not pending or not self._exit_registered:  # only where a save failed: never on ranks > 0
            return
        try:
            self.recorder.flush(self.path)
        except Exception as exc:  # noqa: BLE001 - as below: the script keeps its video
            messages.warning(f"calibration LUT {self.path}: the statistics of {pending} prompt(s) could not be saved "
                             f"{when} ({_failure(exc)}); {then}", every_rank=self.every_rank)
            return
        if self.recorder.left_out:  # another process completed the file meanwhile (flush said so)
            return
        messages.notice(f"calibration LUT {self.path}: the statistics of {pending} prompt(s) that an earlier save "
                        f"could not write were saved {when}", every_rank=self.every_rank)

    def on_sample_end(self, hook, sample: int) -> None:
        if not (self.every_rank or _writes_the_lut()):
            return  # every rank saw the same (gathered) outputs; rank 0 writes the file
        if not self.recorder.pending_prompts:
            return  # the generation was left out (the recorder said why)
        try:
            self.recorder.flush(self.path)
        except LUTMismatchError as exc:  # the file holds another run's prompts: no later generation can join them
            side = _side_file(self.path, self.recorder)
            if side == self.path or self._diverted:
                return self._not_saved(exc)
            messages.warning(f"calibration LUT {self.path} cannot take this run's prompts: {exc}. So that nothing "
                             f"calibrated is lost, they go to {side} instead (and so do the next generations'): to use "
                             f"them, give this run lut: {side}", every_rank=self.every_rank)
            self.path, self._diverted = side, True
            return self.on_sample_end(hook, sample)
        except Exception as exc:  # noqa: BLE001 - FileWriteError, LUTFormatError, and whatever else a save raises
            # (a missing numpy under safetensors: ModuleNotFoundError): never out of the model call
            return self._not_saved(exc)
        self._after_save(hook, sample)

    def _not_saved(self, exc: BaseException) -> None:
        messages.warning(f"calibration LUT {self.path} was not saved: {_failure(exc)}. The statistics of "
                         f"{self.recorder.pending_prompts} prompt(s) are kept in memory and the next "
                         "generation tries again", every_rank=self.every_rank)
        if not self._exit_registered:  # a script that ends now (integrations never detach) tries once more
            import atexit

            atexit.register(self._last_try, "at the end of the process")
            self._exit_registered = True  # (also: this process is the one that writes the LUT)

    def _after_save(self, hook, sample: int) -> None:
        have = self.recorder.lut().num_prompts
        if self.wanted and have >= self.wanted and not self._complete:  # (a run per generation: Wan's
            self._complete = True                                        # generate.py) is told it is done
            self.deferred = (
                f"calibration complete with generation {hook.label(sample)}: the LUT {self.path} holds "
                f"{have} prompt{'s' if have != 1 else ''} "
                f"(calibration.prompts {self.wanted}); " + ("the generations after it skip" if self.reattached else
                                                            "it takes no more; attach TaoCache again to skip with it "
                                                            "(this attach keeps computing every step)"))
            if not self.defer:
                self.say_deferred()
