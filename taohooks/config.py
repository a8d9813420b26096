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
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

__all__ = ["ConfigError", "LoopConfig", "CalibrationConfig", "PlanConfig", "PABGroupConfig", "PABConfig",
           "TeaCacheConfig", "TaoCacheConfig", "load_config", "config_from_dict", "dataclass_from_dict", "read_yaml",
           "INTEGRATIONS"]

INTEGRATIONS = ("none", "wan", "latte", "opensora_plan", "videosys", "diffusers", "testbed")


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
        if self.streams is not None and (not self.streams or len(set(self.streams)) != len(self.streams)):
            err("loop.streams", f"expected a list of distinct stream names, got {self.streams}")


@dataclass
class CalibrationConfig:
    auto: bool = True
    prompts: int = 20
    sampler: Optional[str] = None

    def validate(self, err) -> None:
        if self.prompts < 1:
            err("calibration.prompts", f"expected a positive number of prompts, got {self.prompts}")


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
    ratio: Union[float, str] = "calibrated"

    def validate(self, err) -> None:
        b = self.budget
        if b is not None and (b < 0 or (isinstance(b, float) and not b.is_integer() and b >= 1)):
            err("plan.budget", f"expected a step count >= 0 or a fraction in [0, 1), got {b}")
        given = [k for k in ("budget", "window", "skip_steps") if getattr(self, k) is not None]
        if len(given) > 1:
            err("plan", f"give only one of budget, window and skip_steps; got {', '.join(given)}")
        if self.window is not None and (len(self.window) != 2 or self.window[0] > self.window[1]):
            err("plan.window", f"expected [first, last] step indices with first <= last, got {self.window}")
        if self.min_step is not None and self.min_step < 0:
            err("plan.min_step", f"expected a step index >= 0, got {self.min_step}")
        if self.tau_cos is not None and not -1.0 <= self.tau_cos <= 1.0:
            err("plan.tau_cos", f"expected a cosine similarity in [-1, 1], got {self.tau_cos}")
        if self.lambda_ < 0 or self.gamma < 0:
            err("plan.lambda" if self.lambda_ < 0 else "plan.gamma", "expected a penalty weight >= 0")
        if self.refresh_every is not None and self.refresh_every < 1:
            err("plan.refresh_every", f"expected a number of skips >= 1 (or null: never), got {self.refresh_every}")
        if isinstance(self.ratio, str) and self.ratio != "calibrated":
            err("plan.ratio", f"expected 'calibrated' or a number such as 1.0, got {self.ratio!r}")
        if not isinstance(self.ratio, str) and not self.ratio > 0:
            err("plan.ratio", f"expected a positive constant ratio, got {self.ratio}")


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
    reset_on_refresh: bool = True             # drop cached attention outputs on TaoCache's refresh steps

    def validate(self, err) -> None:
        if not self.groups:
            err("pab.groups", "expected at least one {pattern, range} group")
        for i, g in enumerate(self.groups):
            if not g.pattern:
                err(f"pab.groups[{i}].pattern", "expected a module-name regex such as 'blocks\\.\\d+\\.self_attn'")
            if g.range_ < 1:
                err(f"pab.groups[{i}].range", f"expected a broadcast range >= 1, got {g.range_}")
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


@dataclass
class TeaCacheConfig:
    """TeaCache on the early/mid steps, TaoCache late (``teacache:``; Algorithm 2, the hybrid)."""

    threshold: float = 0.0
    coefficients: Optional[List[float]] = None  # rescaling polynomial, highest power first; null: plain rel-L1
    blocks: str = "blocks"                      # module path of the block stack whose residual is reused
    hidden_arg: int = 0                         # position of the hidden state in a block's arguments
    warmup_steps: int = 1                       # always compute steps < warmup_steps
    guard_band: int = 2                         # steps always computed between TeaCache's range and the window

    def validate(self, err) -> None:
        if self.threshold < 0:
            err("teacache.threshold", f"expected a threshold >= 0, got {self.threshold}")
        if self.coefficients is not None and not self.coefficients:
            err("teacache.coefficients", "expected polynomial coefficients (highest power first) or null")
        if self.guard_band < 0 or self.warmup_steps < 0:
            err("teacache.guard_band" if self.guard_band < 0 else "teacache.warmup_steps", "expected a step count >= 0")


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

    def validate(self, err) -> None:
        if self.integration not in INTEGRATIONS:
            close = difflib.get_close_matches(self.integration, INTEGRATIONS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            err("integration", f"unknown integration {self.integration!r}{hint} (one of {', '.join(INTEGRATIONS)})")
        for part in (self.loop, self.calibration, self.plan, self.pab, self.teacache):
            if part is not None:
                part.validate(err)

    def lut_path(self) -> Optional[Path]:
        """The LUT path, relative paths taken from the config file's folder."""
        if self.lut is None:
            return None
        path = Path(os.path.expandvars(os.path.expanduser(self.lut)))
        if not path.is_absolute() and self.source:
            path = Path(self.source).parent / path
        return path

    def to_dict(self) -> Dict[str, Any]:
        return _to_dict(self)


# ---------------------------------------------------------------------- generic loading
def _to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {_yaml_key(f): _to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.metadata.get("internal")}
    if isinstance(obj, (list, tuple)):
        return [_to_dict(v) for v in obj]
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
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str, source: Optional[str]) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    fail = lambda: ConfigError(source, key, f"expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")  # noqa: E731
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
        return _build(tp, value, key, source)
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


def _build(cls: type, data: Dict[str, Any], prefix: str, source: Optional[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {_yaml_key(f): f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
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
    obj = _build(cls, data, "", source)

    def err(key: str, message: str):
        raise ConfigError(source, key, message)

    if hasattr(obj, "validate"):
        obj.validate(err)
    return obj


def read_yaml(path: Union[str, os.PathLike]) -> Any:
    """Parse a YAML file; a missing file or bad YAML is a :class:`ConfigError` naming the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "", "config file does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), "", f"not valid YAML: {exc}") from exc


def config_from_dict(data: Optional[Dict[str, Any]], source: Optional[str] = None) -> TaoCacheConfig:
    """Build and validate a :class:`TaoCacheConfig` from a parsed YAML mapping."""
    config = dataclass_from_dict(TaoCacheConfig, data, source)
    config.source = source
    return config


def load_config(path: Union[str, os.PathLike]) -> TaoCacheConfig:
    """Read a YAML config file. Errors name the file, the key and what was expected."""
    return config_from_dict(read_yaml(path), str(path))
