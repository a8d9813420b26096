"""YAML configuration, loaded into typed dataclasses with errors that name the file and key.

    integration: wan                 # which integration installs the hooks
    model_id: wan2.1-t2v-1.3B
    lut: luts/wan2.1-t2v-1.3B.safetensors   # relative to this file's folder
    loop: {steps: 50, streams: [cond, uncond], split_batch: false}
    calibration: {auto: true, prompts: 20, sampler: unipc}
    plan: {budget: 0.16, min_step: 25, tau_cos: null, lambda: 1.0, gamma: 1.0, refresh_every: null}

See ``configs/example.yaml`` for every key with its meaning.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

__all__ = ["ConfigError", "LoopConfig", "CalibrationConfig", "PlanConfig", "PABGroupConfig", "PABConfig",
           "TeaCacheConfig", "TaoCacheConfig", "load_config", "config_from_dict", "dataclass_from_dict", "read_yaml",
           "INTEGRATIONS", "ACCEPTABLE_DIFFERENCES", "MAX_STEPS", "MAX_PROMPTS", "expand_path", "read_text",
           "build_dataclass"]

INTEGRATIONS = ("none", "wan", "wan22", "latte", "opensora_plan", "videosys", "diffusers", "testbed")
# Differences between a LUT's recorded identity and a run that ``calibration.accept`` may name.
ACCEPTABLE_DIFFERENCES = ("model", "architecture", "task", "dtype", "scheduler", "shift", "solver_order",
                          "prediction_type", "sampling_steps", "timesteps", "pixels", "frame_num", "height", "width",
                          "frames", "temporal_attention", "expert_boundary", "experts",
                          "guide_scale", "image", "noise_schedule")
MAX_STEPS = 100_000    # loop.steps, step indices and step counts are at most this
MAX_PROMPTS = 100_000  # calibration.prompts is at most this
FIRST_SKIPPABLE = 2    # as taohooks.taocache.plan.FIRST_SKIPPABLE: a skip needs two computed outputs before it


PLAN_RULES = ("paper", "auto")
TRANSFERS = ("refuse", "interpolate")
RANKS = ("own", "shared")  # calibration.ranks: how a process group's ranks share generations
COEFFICIENT_RULES = ("ratio", "projection", "linear", "reuse")  # as taohooks.taocache.error_plan.COEFFICIENTS
PLAN_PATTERNS = ("auto", "contiguous", "strided")
ERROR_WEIGHTS = ("auto", "flow", "ddpm", "uniform")


def _one_of(err, key: str, value, choices) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        err(key, f"expected one of {', '.join(choices)}, got {value!r}{hint}")


class UsageError(ValueError):
    """A command line that lacks a part it needs (the sample script after ``--``, the experiment): the commands
    exit with 2 and their usage, as for an argument argparse cannot parse."""


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""

    def __init__(self, source: Optional[str], key: str, message: str):
        self.source, self.key = source, key
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {message}" if key else f"{where}{message}")


def _yaml_key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


@dataclass
class LoopConfig:
    """The loop's declared shape; integrations fill it from the script's own arguments."""

    steps: Optional[int] = None
    streams: Optional[List[str]] = None
    split_batch: bool = False

    def validate(self, err) -> None:
        if self.steps is not None and self.steps < 1:
            err("loop.steps", f"expected a positive number of steps, got {self.steps}")
        if self.steps is not None and self.steps > MAX_STEPS:
            err("loop.steps", f"expected at most {MAX_STEPS} steps, got {self.steps}")
        if self.streams is not None and (not self.streams or len(set(self.streams)) != len(self.streams)):
            err("loop.streams", f"expected a list of distinct stream names, got {self.streams}")
        for i, name in enumerate(self.streams or ()):
            if not name.strip():
                err(f"loop.streams[{i}]", f"expected a stream name such as cond, got {name!r}")


@dataclass
class CalibrationConfig:
    auto: bool = True
    prompts: int = 20
    sampler: Optional[str] = None
    accept: List[str] = field(default_factory=list)  # LUT identity differences accepted knowingly
    error_horizon: int = 16  # delta products kept per step for plan.rule: auto (0: none); as delta_gram.DEFAULT_HORIZON
    transfer: str = "refuse"  # a LUT of another step count: refuse, or interpolate (taohooks.taocache.lut_transfer)
    teacache_fit: bool = False  # also fit TeaCache's polynomial in the same pass (<lut>.teacache.json)
    # a process group's ranks: own (each samples prompts of its own and adds them to the LUT) | shared (they run each
    # generation together, sequence parallel: rank 0 writes); null: the integration's (Wan: shared; Lightning: own)
    ranks: Optional[str] = None

    def validate(self, err) -> None:
        if self.prompts < 1:
            err("calibration.prompts", f"expected a positive number of prompts, got {self.prompts}")
        if self.prompts > MAX_PROMPTS:
            err("calibration.prompts", f"expected at most {MAX_PROMPTS} prompts, got {self.prompts}")
        _one_of(err, "calibration.transfer", self.transfer, TRANSFERS)
        if self.ranks is not None:
            _one_of(err, "calibration.ranks", self.ranks, RANKS)
        if not 0 <= self.error_horizon <= 1000:
            err("calibration.error_horizon", f"expected a number of steps from 0 (no error statistics) to 1000, "
                                             f"got {self.error_horizon}")
        for i, name in enumerate(self.accept):
            if name not in ACCEPTABLE_DIFFERENCES:
                close = difflib.get_close_matches(name, ACCEPTABLE_DIFFERENCES, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                err(f"calibration.accept[{i}]", f"unknown difference {name!r}{hint} "
                                                f"(one of {', '.join(ACCEPTABLE_DIFFERENCES)})")


@dataclass
class PlanConfig:
    budget: Union[int, float, None] = None
    window: Optional[List[int]] = None
    skip_steps: Optional[List[int]] = None
    min_step: Optional[int] = None
    tau_cos: Optional[float] = None
    lambda_: float = field(default=1.0, metadata={"key": "lambda"})
    gamma: float = 1.0
    refresh_every: Optional[int] = None
    refresh: str = "chain"  # chain: a refresh's delta against the predicted output (Algorithm 1); restart: two real
    ratio: Union[float, str] = "calibrated"
    max_norm_ratio: Optional[float] = 10.0  # a prediction above this x the last real output's norm: computed
    rule: str = "paper"                     # paper: Algorithm 1 (+ max_norm_ratio's guard); auto: least predicted error
    coefficient: Optional[str] = None       # ratio | projection | linear | reuse (auto: null = best per chain)
    pattern: str = "auto"                   # rule auto: auto | contiguous | strided
    min_gap: int = 2                        # rule auto: computed steps between chains (>= 2)
    protect_last: int = 0                   # rule auto: the last steps never skipped
    error_weights: str = "auto"             # rule auto: sampler weights auto | flow | ddpm | uniform
    guidance_scale: Optional[float] = None  # the script's CFG scale: the guided output's error (null: the streams')

    def validate(self, err) -> None:
        b = self.budget
        if b is not None and (b < 0 or (isinstance(b, float) and not b.is_integer() and b >= 1)):
            err("plan.budget", f"expected a step count >= 0 or a fraction in [0, 1), got {b}")
        if isinstance(b, float) and b.is_integer() and b >= 1:
            n = int(b)
            steps = "one skipped step" if n == 1 else f"{n} skipped steps"
            err("plan.budget", f"{b} is ambiguous; write {n} for {steps} or a fraction below 1.0")
        if isinstance(b, int) and b > MAX_STEPS:
            err("plan.budget", f"expected at most {MAX_STEPS} skipped steps, got {b}")
        for key in ("window", "skip_steps"):
            for i, t in enumerate(getattr(self, key) or ()):
                if not FIRST_SKIPPABLE <= t <= MAX_STEPS:
                    err(f"plan.{key}[{i}]", f"expected a step index from {FIRST_SKIPPABLE} (the first "
                                            f"{FIRST_SKIPPABLE} steps are always computed) to {MAX_STEPS}, got {t}")
        given = [k for k in ("budget", "window", "skip_steps") if getattr(self, k) is not None]
        if len(given) > 1:
            err("plan", f"give only one of budget, window and skip_steps; got {', '.join(given)}")
        if self.window is not None and (len(self.window) != 2 or self.window[0] > self.window[1]):
            err("plan.window", f"expected [first, last] step indices with first <= last, got {self.window}")
        if self.min_step is not None and not 0 <= self.min_step <= MAX_STEPS:
            err("plan.min_step", f"expected a step index from 0 to {MAX_STEPS}, got {self.min_step}")
        if self.tau_cos is not None and not -1.0 <= self.tau_cos <= 1.0:  # NaN too
            err("plan.tau_cos", f"expected a cosine similarity in [-1, 1], got {self.tau_cos}")
        for key, weight in (("plan.lambda", self.lambda_), ("plan.gamma", self.gamma)):
            if not 0 <= weight < math.inf:  # NaN too (a PlanConfig made in Python is not coerced)
                err(key, f"expected a finite penalty weight >= 0, got {weight}")
        if self.refresh_every is not None and not 1 <= self.refresh_every <= MAX_STEPS:
            err("plan.refresh_every", f"expected a number of skips >= 1 and <= {MAX_STEPS} (or null: never), "
                                      f"got {self.refresh_every}")
        if isinstance(self.ratio, str) and self.ratio != "calibrated":
            err("plan.ratio", f"expected 'calibrated' or a number such as 1.0, got {self.ratio!r}"
                              + _number_as_text_hint(self.ratio))
        if not isinstance(self.ratio, str) and not 0 < self.ratio < math.inf:
            err("plan.ratio", f"expected a positive constant ratio, got {self.ratio}")
        if self.max_norm_ratio is not None and not self.max_norm_ratio >= 1:
            err("plan.max_norm_ratio", f"expected a number >= 1 (or null: no norm guard), got {self.max_norm_ratio}")
        _one_of(err, "plan.rule", self.rule, PLAN_RULES)
        _one_of(err, "plan.refresh", self.refresh, ("chain", "restart"))
        if self.coefficient is not None:
            _one_of(err, "plan.coefficient", self.coefficient, COEFFICIENT_RULES)
        _one_of(err, "plan.pattern", self.pattern, PLAN_PATTERNS)
        _one_of(err, "plan.error_weights", self.error_weights, ERROR_WEIGHTS)
        if not 2 <= self.min_gap <= MAX_STEPS:
            err("plan.min_gap", f"expected at least 2 computed steps between chains of skips, got {self.min_gap} "
                                "(one computed step between two skips is a refresh inside a chain)")
        if not 0 <= self.protect_last <= MAX_STEPS:
            err("plan.protect_last", f"expected a number of steps >= 0, got {self.protect_last}")
        if self.guidance_scale is not None and not 0 < self.guidance_scale < math.inf:  # NaN too
            err("plan.guidance_scale", f"expected the classifier-free guidance scale the script runs at (a finite "
                                       f"number > 0, e.g. 5.0; null: each stream's error), got {self.guidance_scale}")
        if self.rule == "paper":
            changed = [key for key, value, default in (("pattern", self.pattern, "auto"), ("min_gap", self.min_gap, 2),
                                                       ("protect_last", self.protect_last, 0),
                                                       ("error_weights", self.error_weights, "auto"))
                       if value != default]
            for key in changed:
                err(f"plan.{key}", "applies to plan.rule: auto (the error-aware plan); rule: paper places "
                                   "Algorithm 1's window")
            if self.coefficient is not None and self.ratio != "calibrated":
                err("plan.coefficient", f"give either plan.ratio {self.ratio} (a constant) or plan.coefficient, "
                                        "not both")
        else:
            for key in ("window", "skip_steps"):
                if getattr(self, key) is not None:
                    err(f"plan.{key}", "rule: auto chooses the skipped steps itself; give plan.budget (or use "
                                       "rule: paper with a fixed window)")
            if self.ratio != "calibrated":
                err("plan.ratio", "rule: auto chooses the coefficient per chain from the LUT; fix one with "
                                  "plan.coefficient (ratio, projection, linear, reuse)")
            if self.refresh_every is not None:
                err("plan.refresh_every", "rule: auto places refreshes itself (pattern: strided has none)")
            if self.refresh != "chain":
                err("plan.refresh", "rule: auto chooses between chained refreshes and restarts itself (chains "
                                    "separated by min_gap computed steps restart from real outputs)")
            if self.tau_cos is not None:
                err("plan.tau_cos", "applies to rule: paper (the max-cos window search)")
            for key, weight in (("plan.lambda", self.lambda_), ("plan.gamma", self.gamma)):
                if weight != 1.0:  # (taken without a word: it changed nothing a run does)
                    err(key, "applies to rule: paper (the max-cos window search's deviation penalty)")


@dataclass
class PABGroupConfig:
    """Attention modules whose full name matches ``pattern`` (a regex) recompute every ``range`` steps."""

    pattern: str = ""
    range_: int = field(default=2, metadata={"key": "range"})


@dataclass
class PABConfig:
    """The native Pyramid Attention Broadcast inside each computed call (``pab:``)."""

    groups: List[PABGroupConfig] = field(default_factory=list)
    timesteps: Optional[List[float]] = None  # open window (low, high) of timestep values, as VideoSys' (100, 800)
    steps: Optional[List[int]] = None        # or an inclusive window [first, last] of step indices
    reset_on_refresh: bool = True             # drop cached attention outputs where TaoCache resumes computing

    def validate(self, err) -> None:
        if not self.groups:
            err("pab.groups", "expected at least one {pattern, range} group")
        for i, g in enumerate(self.groups):
            if not g.pattern:
                err(f"pab.groups[{i}].pattern", "expected a module-name regex such as 'blocks\\.\\d+\\.self_attn'")
            if not 1 <= g.range_ <= MAX_STEPS:
                err(f"pab.groups[{i}].range", f"expected a broadcast range from 1 to {MAX_STEPS}, got {g.range_}")
            try:
                re.compile(g.pattern)
            except re.error as exc:
                err(f"pab.groups[{i}].pattern", f"not a valid regex: {exc}")
        if (self.timesteps is None) == (self.steps is None):
            err("pab", "give exactly one window: timesteps: [low, high] or steps: [first, last]")
        for key in ("timesteps", "steps"):
            w = getattr(self, key)
            if w is not None and (len(w) != 2 or w[0] > w[1]):
                err(f"pab.{key}", f"expected [low, high] with low <= high, got {w}")
        for i, t in enumerate(self.steps or ()):
            if not 0 <= t <= MAX_STEPS:
                err(f"pab.steps[{i}]", f"expected a step index from 0 to {MAX_STEPS}, got {t}")


#: ``teacache.published``: the authors' TeaCache (proxy, coefficients, forced steps) for these models
TEACACHE_PUBLISHED = ("latte", "opensora_plan", "wan2.1-t2v-1.3B", "wan2.1-t2v-14B", "wan2.1-i2v-480P",
                      "wan2.1-i2v-720P")


#: what a ``teacache:`` section without a threshold is told (at load from YAML, when a TaoCache is made from one built in Python)
TEACACHE_THRESHOLD_MISSING = ("missing: the accumulated (rescaled) rel-L1 below which TeaCache reuses the block "
                              "residual, e.g. 0.05 (0: TeaCache off)")


@dataclass
class TeaCacheConfig:
    """TeaCache on the early/mid steps, TaoCache late (``teacache:``; Algorithm 2, the hybrid)."""

    threshold: Optional[float] = None           # required: reuse below it (0: TeaCache off, the section a fit's proxy)
    published: Optional[str] = None             # the authors' TeaCache for this model (TEACACHE_PUBLISHED)
    use_ret_steps: bool = False                 # with a Wan2.1 `published`: the authors' --use_ret_steps variant
    calibrated: bool = False                    # the polynomial fitted in TaoCache's calibration pass (teacache_fit)
    coefficients: Optional[List[float]] = None  # rescaling polynomial, highest power first; null: plain rel-L1
    blocks: str = "blocks"                      # module path of the block stack whose residual is reused
    hidden_arg: int = 0                         # position of the hidden state in a block's arguments
    warmup_steps: int = 1                       # always compute steps < warmup_steps
    guard_band: int = 2                         # steps always computed between TeaCache's range and the window

    def validate(self, err) -> None:
        if self.threshold is None:  # (a default of 0 turned the hybrid's TeaCache off without a word)
            err("teacache.threshold", TEACACHE_THRESHOLD_MISSING)
        elif self.threshold < 0:
            err("teacache.threshold", f"expected a threshold >= 0, got {self.threshold}")
        if self.published is not None:
            if self.published not in TEACACHE_PUBLISHED:
                close = difflib.get_close_matches(self.published, TEACACHE_PUBLISHED, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                err("teacache.published", f"no published TeaCache for {self.published!r}{hint} (one of "
                                          f"{', '.join(TEACACHE_PUBLISHED)}; null: your own coefficients)")
            if self.coefficients is not None:
                err("teacache.coefficients", f"give either published: (the authors' coefficients for "
                                             f"{self.published}) or coefficients:, not both")
            if self.use_ret_steps and not self.published.startswith("wan2.1"):
                err("teacache.use_ret_steps", "the authors' use_ret_steps variant exists for Wan2.1 only")
            for key, default in (("blocks", "blocks"), ("hidden_arg", 0), ("warmup_steps", 1)):
                if getattr(self, key) != default:
                    err(f"teacache.{key}", f"the authors' TeaCache for {self.published} sets its own block stack(s) "
                                           f"and forced steps; remove {key}: (or published:)")
        elif self.use_ret_steps:
            err("teacache.use_ret_steps", "only with a Wan2.1 published: model (the authors' variant)")
        if self.calibrated and (self.published is not None or self.coefficients is not None):
            err("teacache.calibrated", "give one of calibrated: true (the fit of the calibration pass), published: or "
                                       "coefficients:")
        if self.coefficients is not None and not self.coefficients:
            err("teacache.coefficients", "expected polynomial coefficients (highest power first) or null")
        for key in ("warmup_steps", "guard_band"):
            n = getattr(self, key)
            if not 0 <= n <= MAX_STEPS:
                err(f"teacache.{key}", f"expected a step count from 0 to {MAX_STEPS}, got {n}")
        if self.hidden_arg < 0:
            err("teacache.hidden_arg", f"expected an argument position >= 0, got {self.hidden_arg}")


@dataclass
class TaoCacheConfig:
    integration: str = "none"
    model_id: Optional[str] = None
    lut: Optional[str] = None
    loop: LoopConfig = field(default_factory=LoopConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    pab: Optional[PABConfig] = None
    teacache: Optional[TeaCacheConfig] = None
    source: Optional[str] = field(default=None, metadata={"internal": True})
    # the config file's folder, absolute, as it was when the file was read: a script that changes its
    # working directory (os.chdir) must not move the LUT
    source_dir: Optional[str] = field(default=None, metadata={"internal": True})

    def validate(self, err) -> None:
        if self.integration not in INTEGRATIONS:
            close = difflib.get_close_matches(self.integration.lower(), INTEGRATIONS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            err("integration", f"unknown integration {self.integration!r}{hint} (one of {', '.join(INTEGRATIONS)})")
        for part in (self.loop, self.calibration, self.plan, self.pab, self.teacache):
            if part is not None:
                part.validate(err)
        if self.integration == "videosys" and self.pab is not None:  # (taocache check said valid; the run refused it)
            err("pab", "VideoSys pipelines have their own PAB (enable_pab=True, pab_config=...); taohooks resets its "
                       "state on refresh steps. Remove the pab: section")
        if self.integration in ("wan", "wan22") and self.calibration.ranks == "own":
            err("calibration.ranks", "own, but every rank of Wan's generate.py runs every generation (one prompt, the "
                                     "ranks sharing its tokens or weights): remove the key (the wan integrations set "
                                     "shared); taocache calibrate --devices N gives ranks prompt lines of their own "
                                     "without it")
        if self.teacache is not None and self.teacache.calibrated and self.lut is None:
            err("teacache.calibrated", "the fit is kept next to the LUT (<lut>.teacache.json): name a lut:")
        published = self.teacache.published if self.teacache is not None else None
        if published in TEACACHE_PUBLISHED and self.integration != "none":
            fits = ("wan",) if published.startswith("wan2.1") else (published, "diffusers", "videosys")
            if self.integration not in fits:
                err("teacache.published", f"the authors' TeaCache for {published} attaches to the "
                                          f"{' / '.join(fits)} integration(s), not {self.integration!r}")
        if self.lut is not None:
            if not self.lut.strip():
                err("lut", f"expected a file path such as luts/model.safetensors (or null: no LUT), got {self.lut!r}")
            unset = _path_problem(self.lut)
            if unset:
                err("lut", unset)
        if self.loop.steps is not None:
            validate_against_steps(self, self.loop.steps, err)

    def lut_path(self) -> Optional[Path]:
        """The LUT path (``~`` and ``$VAR`` expanded), relative paths taken from the config file's folder."""
        if self.lut is None:
            return None
        path = Path(expand_path(self.lut, "lut", self.source))
        if not path.is_absolute() and self.source:
            folder = Path(self.source).parent
            if self.source_dir and not folder.is_absolute() and os.path.abspath(folder) != self.source_dir:
                folder = Path(self.source_dir)  # the working directory changed since: said as an absolute path
            path = folder / path
        return path

    def to_dict(self) -> Dict[str, Any]:
        return to_yaml_dict(self)


def validate_against_steps(config: TaoCacheConfig, steps: int, err) -> None:
    """Plan (and PAB) step settings that cannot fit ``loop.steps``."""
    plan, last = config.plan, steps - 1
    b = plan.budget
    if b is not None and not (isinstance(b, float) and b.is_integer()):
        count = b if isinstance(b, int) else int(math.floor(b * steps + 0.5))
        what = f"{count} skipped steps" if isinstance(b, int) else f"{b} of {steps} steps ({count} skipped steps)"
        if count > steps - FIRST_SKIPPABLE:
            err("plan.budget", f"{what} cannot fit loop.steps {steps}: at most {max(steps - FIRST_SKIPPABLE, 0)} "
                               f"(the first {FIRST_SKIPPABLE} steps are always computed)")
        first = max(FIRST_SKIPPABLE, plan.min_step if plan.min_step is not None else (steps + 1) // 2)
        width = 2 if plan.refresh == "restart" else 1
        span = count + ((count - 1) // plan.refresh_every * width if plan.refresh_every and count else 0)
        if plan.rule == "auto":
            span = count + plan.protect_last
        if count and span > steps - first:
            err("plan.budget", f"{what} span {span} steps, but the late regime of loop.steps {steps} holds "
                               f"{max(steps - first, 0)} (steps {first} to {last}); lower plan.budget or plan.min_step")
    if plan.min_step is not None and plan.min_step > last:
        err("plan.min_step", f"step {plan.min_step} does not exist with loop.steps {steps} (steps 0 to {last})")
    for key, values in (("plan.window", plan.window), ("plan.skip_steps", plan.skip_steps),
                        ("pab.steps", config.pab.steps if config.pab is not None else None)):
        for i, t in enumerate(values or ()):
            if t > last:
                err(f"{key}[{i}]", f"step {t} does not exist with loop.steps {steps} (steps 0 to {last})")


_VARIABLE = re.compile(r"\$(\w+|\{[^}]*\})")


def expand_path(text: str, key: str, source: Optional[str] = None) -> str:
    """``~`` and ``$VAR`` / ``${VAR}`` expanded; a variable that is not set (or set to nothing), a
    ``~user`` that is no user, or a NUL character is a :class:`ConfigError`."""
    problem = _path_problem(text)
    if problem:
        raise ConfigError(source, key, problem)
    return os.path.expandvars(os.path.expanduser(text))


def _path_problem(text: str) -> Optional[str]:
    """What makes the path ``text`` unusable (said as the error), or ``None``."""
    if "\0" in text:
        return f"the path {text!r} holds a NUL character; no file name can"
    expanded = os.path.expanduser(text)
    if expanded.startswith("~"):
        user = expanded[1:].split("/", 1)[0]
        return f"~{user} in {text!r} is not a user on this machine; write the folder out"
    return _unset_variable(expanded)


def _unset_variable(text: str) -> Optional[str]:
    for match in _VARIABLE.finditer(text):
        name = match.group(1).strip("{}")
        if name not in os.environ:
            return f"environment variable ${name} is not set (in {text!r}); set it, or write the path without it"
        if not os.environ[name]:
            return (f"environment variable ${name} is set to nothing (in {text!r}), which would make the path "
                    f"{os.path.expandvars(text)!r}; set it, or write the path without it")
    return None


# ---------------------------------------------------------------------- generic loading
def to_yaml_dict(obj: Any) -> Any:
    """A config dataclass (nested ones, lists of them) as its YAML gives it: keys by their YAML names, internal
    fields left out."""
    if dataclasses.is_dataclass(obj):
        return {_yaml_key(f): to_yaml_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.metadata.get("internal")}
    if isinstance(obj, (list, tuple)):
        return [to_yaml_dict(v) for v in obj]
    return obj


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin in (list, List):
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin in (dict, Dict):
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping of keys (key: value lines indented below it, or {key: value, ...})"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str, source: Optional[str]) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    fail = lambda: ConfigError(  # noqa: E731
        source, key, f"expected {_type_name(tp)}, got {value!r} ({type(value).__name__})" + _number_as_text_hint(value)
        + ("" if key in PAIR_KEYS else _list_hint(value, tp)))
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(source, key, f"expected a finite number, got {value}")
    if origin is Union:
        if value is None:
            if type(None) in args:
                return None
            raise fail()
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: an error inside X (a nested key) is the precise one
            try:
                return _coerce(value, options[0], key, source)
            except ConfigError as exc:
                if exc.key == key:
                    raise fail() from None
                raise
        for a in options:
            try:
                return _coerce(value, a, key, source)
            except ConfigError:
                continue
        raise fail()
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        if not isinstance(value, dict):
            raise fail()
        return build_dataclass(tp, value, key, source)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise fail()
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)] if args else list(value)
    if origin in (dict, Dict) or tp is dict:
        if not isinstance(value, dict):
            raise fail()
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    raise TypeError(f"unsupported config type {tp!r}")


def _number_as_text_hint(value: Any) -> str:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string: say how to write the number. A quoted number
    (``'8'``) is text too; ``yes``/``no``/``on``/``off`` are booleans."""
    if isinstance(value, bool):
        return "; YAML reads yes/no/on/off/true/false as a boolean"
    if not isinstance(value, str):
        return ""
    percent = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%\s*", value)
    if percent:  # budget: 16%
        share = float(percent.group(1)) / 100
        return (f"; write the fraction {share:g} for {value.strip()}" if share < 1 else
                "; a share of the steps is a fraction below 1.0 (0.16), a number of steps an integer (8)")
    try:
        number = float(value.strip().replace("_", ""))
    except ValueError:
        return ""
    if not math.isfinite(number):
        return ""
    if _yaml_number(value.strip()):
        return f"; it is quoted, so YAML reads it as text: write {value.strip()} without quotes"
    written = str(int(number)) if number.is_integer() and abs(number) < 1e18 else repr(number)
    if not _yaml_number(written):  # 1e-300: YAML 1.1 needs a dot in the mantissa and a signed exponent
        mantissa, _, exponent = written.partition("e")
        written = f"{mantissa if '.' in mantissa else mantissa + '.0'}e{int(exponent or 0):+d}"
    return f"; YAML reads {value} as text, write {written}"


def _list_hint(value: Any, tp: Any) -> str:
    """A single value where a list belongs (``streams: cond``): say how to write the list of one."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool) and any(
            typing.get_origin(t) in (list, List) for t in (tp, *typing.get_args(tp))):
        return f"; write [{value}] for a list of one"
    return ""


#: list keys that take exactly two values (no "list of one" hint for them)
PAIR_KEYS = ("plan.window", "pab.timesteps", "pab.steps")


def _yaml_number(text: str) -> bool:
    """Whether YAML reads ``text``, unquoted, as a number."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _section_type(hint: Any) -> Optional[type]:
    """The config dataclass a field holds (``plan: PlanConfig``, ``pab: Optional[PABConfig]``), or None."""
    sections = [t for t in (hint, *typing.get_args(hint)) if isinstance(t, type) and dataclasses.is_dataclass(t)]
    return sections[0] if sections else None


# keys of the Python API written in a YAML section where the YAML says it otherwise
PYTHON_NAMES = {"teacache.max_step": "the YAML sets it from TaoCache's window: teacache.guard_band, the steps TeaCache "
                                     "stops before the window (max_step = window start - guard_band)"}


def build_dataclass(cls: type, data: Dict[str, Any], prefix: str, source: Optional[str]) -> Any:
    """``cls(**data)`` with every key checked and coerced (unknown keys and wrong types are
    :class:`ConfigError` s naming ``prefix.key``); no ``validate``: see :func:`dataclass_from_dict`."""
    hints = typing.get_type_hints(cls)
    fields = {_yaml_key(f): f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
            home = [name for name, f in fields.items() if _section_type(hints[f.name]) is not None
                    and str(key) in {_yaml_key(g) for g in dataclasses.fields(_section_type(hints[f.name]))}]
            if home and not close:  # plan's budget written at the top level: indented one level too little
                hint = f"; it is a key of {prefix + '.' if prefix else ''}{home[0]}: indent it under {home[0]}:"
            hint = f"; {PYTHON_NAMES[path]}" if path in PYTHON_NAMES else hint
            raise ConfigError(source, path, f"unknown key{hint} (valid here: {', '.join(fields)})")
        f = fields[key]
        kwargs[f.name] = _coerce(value, hints[f.name], path, source)
    return cls(**kwargs)


def dataclass_from_dict(cls: type, data: Optional[Dict[str, Any]], source: Optional[str] = None) -> Any:
    """Build any config dataclass of this style from a mapping (unknown keys and wrong types are
    :class:`ConfigError` s), then run its ``validate(err)`` if it has one."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, "", f"expected a mapping of keys at the top level, got {type(data).__name__}")
    obj = build_dataclass(cls, data, "", source)

    def err(key: str, message: str):
        raise ConfigError(source, key, message)

    if hasattr(obj, "validate"):
        obj.validate(err)
    return obj


class _DuplicateKey(Exception):
    def __init__(self, key: str, first: int, second: int):
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


def _check_duplicate_keys(node: Any, prefix: str, seen: set) -> None:
    """Raise :class:`_DuplicateKey` for a key given twice in one mapping (YAML keeps the last silently)."""
    import yaml

    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: Dict[tuple, int] = {}
        for key_node, value_node in node.value:
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            path = prefix if name is None or key_node.tag == "tag:yaml.org,2002:merge" else (
                f"{prefix}.{name}" if prefix else str(name))
            if name is not None and key_node.tag != "tag:yaml.org,2002:merge":
                line = key_node.start_mark.line + 1
                if (key_node.tag, name) in lines:
                    raise _DuplicateKey(path, lines[(key_node.tag, name)], line)
                lines[(key_node.tag, name)] = line
            _check_duplicate_keys(value_node, path, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicate_keys(item, f"{prefix}[{i}]", seen)


def _loader() -> type:
    """``yaml.SafeLoader`` that refuses duplicate keys, in nested mappings too."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def compose_document(self):
            node = super().compose_document()
            _check_duplicate_keys(node, "", set())
            return node

    return UniqueKeyLoader


def _similar_file(path: Path) -> str:
    """``; did you mean wan_t2v_1.3B.yaml?`` for a missing file whose folder holds a name close to it; for a
    relative ``configs/...`` path that taohooks' own checkout holds (run from the research repo's folder, as the
    README's commands are), that file."""
    ours = Path(__file__).resolve().parent.parent / path
    if not path.is_absolute() and path.parts[:1] == ("configs",) and ours.is_file():
        return (f" in {Path.cwd()}; taohooks' own is {ours} (relative paths are taken from the current folder: "
                "give that path)")
    try:
        names = [p.name for p in path.parent.iterdir() if p.is_file()]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.8)
    return f"; did you mean {path.parent / close[0]}?" if close else ""


def read_text(path: Union[str, os.PathLike], what: str = "config file") -> str:
    """A UTF-8 text file's contents; a missing, unreadable or non-UTF-8 file is a :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise ConfigError(str(path), "", f"a folder, not a {what}")
        raise ConfigError(str(path), "", (f"{what} does not exist" + _similar_file(path)) if not path.exists()
                          else f"{what} is not a file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read the {what}: {exc.strerror or exc}") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), "", f"not UTF-8 text: byte {exc.start} (0x{data[exc.start]:02x}) cannot be "
                                         "decoded; save the file as UTF-8") from None


def read_yaml(path: Union[str, os.PathLike]) -> Any:
    """Parse a YAML file; a missing or non-UTF-8 file, bad YAML or a key given twice in one mapping is a
    :class:`ConfigError` naming the file."""
    import yaml

    text = read_text(path)
    try:
        return yaml.load(text, Loader=_loader())  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise ConfigError(str(path), exc.key, f"duplicate key on lines {exc.first} and {exc.second}; YAML would "
                                              "silently keep the last, so give it once") from None
    except RecursionError:
        raise ConfigError(str(path), "", "not a config: its YAML is nested too deeply to read") from None
    except yaml.YAMLError as exc:
        hint = "; YAML indents with spaces, not tabs" if "'\\t'" in str(exc) else ""
        raise ConfigError(str(path), "", f"not valid YAML: {str(exc).replace('<unicode string>', str(path))}"
                                         f"{hint}") from exc


def config_from_dict(data: Optional[Dict[str, Any]], source: Optional[str] = None) -> TaoCacheConfig:
    """Build and validate a :class:`TaoCacheConfig` from a parsed YAML mapping."""
    config = dataclass_from_dict(TaoCacheConfig, data, source)
    config.source = source
    config.source_dir = os.path.abspath(Path(source).parent) if source else None
    return config


#: what a config made in Python is called in its errors (a file's are named by its path)
PYTHON_SOURCE = "TaoCacheConfig (made in Python)"


def check_python_config(config: TaoCacheConfig) -> None:
    """A config made in Python (``TaoCache(TaoCacheConfig(...))``) checked as a YAML file is: each section of
    its own dataclass, the same types, then :meth:`TaoCacheConfig.validate`. Raises :class:`ConfigError`
    naming the key, so that ``rule="Auto"`` or ``budget=1.0`` is refused as in YAML rather than run otherwise."""
    if isinstance(config.lut, os.PathLike):  # lut=Path(...): the path it names, as YAML gives it
        config.lut = os.fspath(config.lut)
    hints = typing.get_type_hints(TaoCacheConfig)
    for f in dataclasses.fields(TaoCacheConfig):
        value, expected = getattr(config, f.name), _section_type(hints[f.name])  # (pab, teacache may be None)
        if expected is not None and value is not None and not isinstance(value, expected):
            raise ConfigError(PYTHON_SOURCE, _yaml_key(f), f"expected a {expected.__name__}, got "
                              f"{type(value).__name__} (a mapping of YAML keys: taohooks.config.config_from_dict)")
    dataclass_from_dict(TaoCacheConfig, _plain(config.to_dict()), PYTHON_SOURCE)  # the types, then validate()


def _plain(value: Any) -> Any:
    """What Python code may put in a config, as YAML would give it: numpy and other number types as int or float,
    ``range``, tuples and arrays as lists (a window computed with numpy ran before configs were checked)."""
    import numbers

    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):  # numpy and torch arrays, 0-d ones too
        return _plain(value.tolist())
    if isinstance(value, (list, tuple, range)):
        return [_plain(v) for v in value]
    return value


def _is_bench_config(data: Any) -> bool:
    """Top-level keys of a ``taocache bench`` config and none of a TaoCache config or of a ``taocache compare``
    experiment alone (the two share methods, budgets, lpips...)."""
    if not isinstance(data, dict) or not data:
        return False
    from .compare.experiment import ExperimentConfig
    from .evaluation.bench import BenchConfig

    ours = {_yaml_key(f) for f in dataclasses.fields(TaoCacheConfig)}
    bench = {f.name for f in dataclasses.fields(BenchConfig)} - ours - {"steps", "output", "threads"}
    compare = {f.name for f in dataclasses.fields(ExperimentConfig)} - bench - {"output"}
    keys = set(map(str, data))
    return not keys & ours and not keys & compare and bool(keys & bench)


def _only_keys_of(data: Any, kind: type, other: type) -> bool:
    """``data`` has only top-level keys of the dataclass ``kind``, and some that ``other`` has not."""
    if not isinstance(data, dict) or not data:
        return False
    keys, fields = set(map(str, data)), ({_yaml_key(f) for f in dataclasses.fields(c)} for c in (kind, other))
    own, theirs = fields
    return keys <= own and bool(keys - theirs)


def is_compare_experiment(data: Any) -> bool:
    """Keys that only a ``taocache compare`` experiment has (``prompts``, ``calibration_prompts``...) and none that only
    a TaoCache config has (``lut``, ``plan``...): an experiment, also with a misspelled key (said by its own check)."""
    if not isinstance(data, dict) or not data:
        return False
    from .compare.experiment import ExperimentConfig
    from .evaluation.bench import BenchConfig

    keys = set(map(str, data))
    tao, experiment = ({_yaml_key(f) for f in dataclasses.fields(c)} for c in (TaoCacheConfig, ExperimentConfig))
    own = experiment - tao - {f.name for f in dataclasses.fields(BenchConfig)}
    return bool(keys & own) and not keys & (tao - experiment)


def is_taocache_config(data: Any) -> bool:
    """A TaoCache config's keys only, and some a ``taocache compare`` experiment has not (``lut``, ``plan``...)."""
    from .compare.experiment import ExperimentConfig

    return _only_keys_of(data, TaoCacheConfig, ExperimentConfig)


def load_config(path: Union[str, os.PathLike]) -> TaoCacheConfig:
    """Read a YAML config file. Errors name the file, the key and what was expected."""
    data = read_yaml(path)
    if data is None:
        raise ConfigError(str(path), "", "empty config; see configs/example.yaml")
    try:
        return config_from_dict(data, str(path))
    except ConfigError:
        if _is_bench_config(data):
            raise ConfigError(str(path), "", f"this is a `taocache bench` config; "
                                             f"run `taocache bench {path}`") from None
        if is_compare_experiment(data):
            raise ConfigError(str(path), "", f"this is a `taocache compare` experiment; run `taocache compare {path} "
                                             "-- SCRIPT ARGS...`") from None
        raise
