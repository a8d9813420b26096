"""The experiment YAML of ``taocache compare``: what to run, on which prompts, at which budgets.

    taocache: testbed_flow.yaml      # a TaoCache config: integration, model_id, lut, loop, calibration
    # or inline instead:  integration: testbed / model_id: ... / loop: {steps: 50}
    prompts: prompts.txt             # a file (PROMPT, or PROMPT<TAB>SEED, per line) or a YAML list
    calibration_prompts: cal.txt     # never the evaluation prompts: the LUT, TeaCache's fit, threshold search
    methods: [full, taocache, teacache]
    budgets: [0.04, 0.08, 0.12, 0.16]  # fractions of the steps skipped
    output: ../out/compare           # relative paths: from this file's folder

Everything is checked before the script starts (no model is loaded for a bad file): unknown keys
name the closest valid one, prompt lists must be non-empty UTF-8 without a repeated (prompt, seed).
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Tuple

from ..config import (INTEGRATIONS, ConfigError, LoopConfig, PABGroupConfig, build_dataclass, dataclass_from_dict,
                      expand_path, is_taocache_config, read_text, read_yaml, to_yaml_dict)
from ..runtime import messages

__all__ = ["ExperimentConfig", "PromptEntry", "load_experiment", "read_prompt_list", "AVAILABLE_METHODS",
           "DEFAULT_METHODS", "BUDGET_FREE_METHODS"]

DEFAULT_METHODS = ("full", "taocache", "taocache-auto", "teacache", "magcache",  # taocache-auto: plan.rule: auto
                   "easycache", "hybrid", "taoskip+tearesidual", "pab+taocache")
AVAILABLE_METHODS = DEFAULT_METHODS + ("pab", "pab+teacache", "videosys-pab")  # videosys-pab: VideoSys' own PAB
#: methods that skip no call (PAB alone broadcasts attention inside every call): run once, not per budget
BUDGET_FREE_METHODS = ("pab", "videosys-pab")
#: methods whose threshold is searched (or fitted) on the calibration prompts, never on the evaluated ones
SEARCHED_METHODS = ("teacache", "magcache", "easycache", "hybrid", "pab+teacache")


#: seeds compare gives the script: a 64-bit generator's (torch's and numpy's take them), never negative (Wan's scripts
#: draw a random seed for a negative one); a larger one failed after the model had loaded, with a traceback
SEED_LIMIT = 2 ** 63
SEED_EXPECTED = "expected an integer seed from 0 to 2**63 - 1"


def _seed_problem(seed: int) -> Optional[str]:
    return None if 0 <= seed < SEED_LIMIT else f"{SEED_EXPECTED}, got {seed}"


@dataclass(frozen=True)
class PromptEntry:
    """One evaluation (or calibration) generation: the prompt text and the seed."""

    prompt: str = ""
    seed: int = 0


@dataclass
class ExperimentConfig:
    taocache: Optional[str] = None  # path of a TaoCache config (integration, model_id, lut, loop, calibration)
    integration: Optional[str] = None  # inline instead of taocache:
    model_id: Optional[str] = None
    loop: LoopConfig = field(default_factory=LoopConfig)
    prompts: Any = None  # a file path or a list of prompts / {prompt, seed}
    calibration_prompts: Any = None
    seed: int = 0  # the seed of a prompt given without one
    search_prompts: int = 4  # the first N calibration prompts drive the threshold searches (all, when fewer)
    search_iterations: int = 12  # bisection steps of that search (as taocache bench)
    methods: List[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    budgets: List[float] = field(default_factory=lambda: [0.04, 0.08, 0.12, 0.16])
    output: str = "compare"
    lpips: bool = True  # LPIPS when the converted weights exist (else null in the results)
    teacache_use_ret_steps: bool = False  # Wan2.1's published TeaCache: the authors' --use_ret_steps variant
    magcache_k: Optional[int] = None  # MagCache's K (skips in a row); None: 2, or the authors' README setting
    magcache_retention: Optional[float] = None  # MagCache's retention ratio (the first steps always computed);
    # None: the authors' README setting where their ratios are used (Wan2.1 0.2; Wan2.2 T2V 0.4, I2V 0.1, TI2V 0.2), else 0.2
    easycache_warmup: int = 10  # EasyCache's always-computed first steps (the authors' Wan2.1 script: 10)
    hybrid_guard: int = 2  # the hybrid: TeaCache stops this many steps before TaoCache's window
    # the hybrid: TaoCache's skips at every budget (at most the budget; the paper's hybrid run: 7), TeaCache the rest;
    # None: half of each budget
    hybrid_tao_skips: Optional[int] = None
    pab_range: int = 2  # pab+taocache: attention recomputed every pab_range steps inside computed calls
    pab_timesteps: List[float] = field(default_factory=lambda: [100.0, 800.0])  # PAB only inside (low, high)
    # PAB groups with their own ranges ({pattern, range}: module-name regex and broadcast range), as the YAML pab:
    # section has them (VideoSys' PAB: spatial 2, temporal 3, cross 6); instead of the integration's
    # self-attention with pab_range
    pab_groups: Optional[List[PABGroupConfig]] = None
    source: Optional[str] = field(default=None, metadata={"internal": True})

    def validate(self, err) -> None:
        if (self.taocache is None) == (self.integration is None):
            err("taocache", "give either taocache: (a TaoCache config file) or integration: (inline), "
                            + ("not both" if self.taocache else "got neither"))
        if self.taocache is not None and (self.model_id is not None or self.loop != LoopConfig()):
            err("model_id" if self.model_id is not None else "loop",
                "set inline only without taocache: (the TaoCache config names it)")
        if self.integration is not None and self.integration not in INTEGRATIONS:
            close = difflib.get_close_matches(self.integration.lower(), INTEGRATIONS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            err("integration", f"unknown integration {self.integration!r}{hint} (one of {', '.join(INTEGRATIONS)})")
        self.loop.validate(err)
        if self.prompts is None:
            err("prompts", "expected a prompt file or a list of prompts (the evaluation prompts)")
        if not self.methods:
            err("methods", f"expected a list of methods from {', '.join(AVAILABLE_METHODS)}")
        for i, name in enumerate(self.methods):
            if name not in AVAILABLE_METHODS:
                close = difflib.get_close_matches(name.lower(), AVAILABLE_METHODS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                err(f"methods[{i}]", f"unknown method {name!r}{hint} (one of {', '.join(AVAILABLE_METHODS)})")
            if name in self.methods[:i]:
                err(f"methods[{i}]", f"{name!r} is listed twice")
        if self.budgeted_methods and not self.budgets:
            err("budgets", "expected at least one budget (a fraction of the steps skipped, e.g. 0.16)")
        for i, b in enumerate(self.budgets):
            if not 0 < b < 1:
                err(f"budgets[{i}]", f"expected a fraction of the steps in (0, 1), e.g. 0.16, got {b}")
            if b in self.budgets[:i]:
                err(f"budgets[{i}]", f"{b} is listed twice")
        for name in SEARCHED_METHODS:
            if name in self.methods and self.calibration_prompts is None:
                err("calibration_prompts", f"{name} needs calibration prompts (its calibration and the threshold "
                                           "search run on them, never on the evaluation prompts)")
        if self.magcache_k is not None and not 1 <= self.magcache_k <= 1000:
            err("magcache_k", f"expected a number of skips in a row >= 1, got {self.magcache_k}")
        if not 1 <= self.pab_range <= 1000:
            err("pab_range", f"expected a broadcast range of at least 1 step, got {self.pab_range}")
        for i, g in enumerate(self.pab_groups or ()):
            if not g.pattern:
                err(f"pab_groups[{i}].pattern", "expected a module-name regex such as 'blocks\\.\\d+\\.self_attn'")
            else:
                import re

                try:
                    re.compile(g.pattern)
                except re.error as exc:
                    err(f"pab_groups[{i}].pattern", f"not a valid regex: {exc}")
            if not 1 <= g.range_ <= 1000:
                err(f"pab_groups[{i}].range", f"expected a broadcast range of at least 1 step, got {g.range_}")
        if self.pab_groups is not None and not self.pab_groups:
            err("pab_groups", "expected at least one {pattern, range} group (or leave pab_groups out)")
        if len(self.pab_timesteps) != 2 or not self.pab_timesteps[0] < self.pab_timesteps[1]:
            err("pab_timesteps", f"expected [low, high] timesteps with low < high, got {self.pab_timesteps}")
        if not 0 <= self.easycache_warmup <= 100000:
            err("easycache_warmup", f"expected a number of steps >= 0, got {self.easycache_warmup}")
        if not 0 <= self.hybrid_guard <= 100000:
            err("hybrid_guard", f"expected a number of steps >= 0 computed between TeaCache's steps and TaoCache's "
                                f"window, got {self.hybrid_guard}")
        if self.hybrid_tao_skips is not None and not 1 <= self.hybrid_tao_skips <= 100000:
            err("hybrid_tao_skips", f"expected a number of TaoCache skips >= 1 (the paper's hybrid run: 7), or null "
                                    f"for half of each budget, got {self.hybrid_tao_skips}")
        if self.magcache_retention is not None and not 0 <= self.magcache_retention < 1:
            err("magcache_retention", f"expected a fraction of the steps in [0, 1), got {self.magcache_retention}")
        if _seed_problem(self.seed):
            err("seed", f"{_seed_problem(self.seed)} (the seed of a prompt given without one)")
        if self.search_prompts < 1:
            err("search_prompts", f"expected a number of prompts >= 1, got {self.search_prompts}")
        if not 1 <= self.search_iterations <= 64:
            err("search_iterations", f"expected 1 to 64 bisection steps, got {self.search_iterations}")
        if not self.output.strip():
            err("output", "expected a folder path, got ''")

    # ------------------------------------------------------------------ resolved paths
    def path(self, text: str, key: str) -> Path:
        """``text`` (``~``, ``$VAR`` expanded) relative to this file's folder."""
        path = Path(expand_path(text, key, self.source))
        return path if path.is_absolute() or not self.source else Path(self.source).parent / path

    @property
    def output_dir(self) -> Path:
        return self.path(self.output, "output")

    @property
    def cached_methods(self) -> List[str]:
        return [m for m in self.methods if m != "full"]

    @property
    def budgeted_methods(self) -> List[str]:
        """The methods run once per budget (all but the full-step reference and PAB)."""
        return [m for m in self.cached_methods if m not in BUDGET_FREE_METHODS]

    def runs(self, steps: int) -> List[Tuple[str, int]]:
        """``(method, skipped steps)`` of every run per prompt, in order: the full-step reference, the
        budget-free methods (0), then each budget's methods (:func:`~taohooks.compare.runner.budget_skips`)."""
        from .runner import budget_skips

        methods = self.cached_methods
        return [("full", 0)] + [(m, 0) for m in methods if m in BUDGET_FREE_METHODS] + [
            (m, budget_skips(b, steps)) for b in self.budgets for m in self.budgeted_methods]

    def evaluation_prompts(self) -> List[PromptEntry]:
        return read_prompt_list(self.prompts, self, "prompts")

    def calibration_list(self) -> List[PromptEntry]:
        return [] if self.calibration_prompts is None else read_prompt_list(self.calibration_prompts, self,
                                                                              "calibration_prompts")

    def to_dict(self) -> dict:
        """The experiment as its YAML keys give it (``pab_groups``' ``range``, not the field ``range_``)."""
        return to_yaml_dict(self)


def load_experiment(path) -> ExperimentConfig:
    """Read and check an experiment YAML, its prompt lists included."""
    data = read_yaml(path)
    if data is None:
        raise ConfigError(str(path), "", "empty experiment file; see configs/compare/testbed.yaml")
    try:
        config = dataclass_from_dict(ExperimentConfig, data, str(path))
    except ConfigError:
        if is_taocache_config(data):
            raise ConfigError(str(path), "", "this is a TaoCache config (for --taocache / taocache-run); an experiment "
                                             "names it as taocache: FILE, see configs/compare/testbed.yaml") from None
        raise
    config.source = str(path)
    if "hybrid" in config.methods:
        from ..taocache.cache import thin_guard_warning

        thin_guard_warning(f"{path}: hybrid_guard", config.hybrid_guard)
    evaluation, calibration = config.evaluation_prompts(), config.calibration_list()
    overlap = sorted(set(evaluation) & set(calibration), key=evaluation.index)
    if overlap:
        raise ConfigError(str(path), "calibration_prompts", f"{len(overlap)} (prompt, seed) pair(s) are also "
                          f"evaluation prompts, e.g. {overlap[0].prompt!r} seed {overlap[0].seed}; calibrate on "
                          "other prompts (or seeds), never on the evaluated ones")
    searching = [m for m in SEARCHED_METHODS if m in config.methods]
    if searching and "search_prompts" in data and config.search_prompts > len(calibration):  # (the default: all)
        raise ConfigError(str(path), "search_prompts", f"{config.search_prompts}, but calibration_prompts lists "
                          f"{len(calibration)}: the threshold searches ({', '.join(searching)}) run on the first "
                          "search_prompts of them; list more calibration prompts or lower search_prompts")
    if config.output_dir.exists() and not config.output_dir.is_dir():
        raise ConfigError(str(path), "output", f"{config.output_dir} is a file; expected the experiment's output "
                                               "folder (made if missing)")
    blocking = next((p for p in config.output_dir.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ConfigError(str(path), "output", f"{config.output_dir} cannot be made: {blocking} is a file")
    if config.taocache is not None:
        tao = config.path(config.taocache, "taocache")
        if not tao.is_file():
            raise ConfigError(str(path), "taocache", f"{tao} does not exist; name a TaoCache config (taohooks' "
                                                     "configs/ has one per integration and task, e.g. "
                                                     "configs/wan_t2v_1.3B.yaml; relative paths are taken from this "
                                                     "file's folder)")
    return config


def read_prompt_list(value: Any, config: ExperimentConfig, key: str) -> List[PromptEntry]:
    """``value``: a file (``.yaml``/``.yml``: a list; else one ``PROMPT`` or ``PROMPT<TAB>SEED`` per
    line, ``#`` comments) or a YAML list of strings and ``{prompt, seed}`` mappings."""
    source = config.source
    if isinstance(value, str):
        path = config.path(value, key)
        if path.suffix.lower() in (".yaml", ".yml"):
            items, where = read_yaml(path), str(path)
            if not isinstance(items, list):
                raise ConfigError(where, "", "expected a YAML list of prompts (strings or {prompt, seed})")
            entries = _from_list(items, config.seed, where, "")
        else:
            entries = _from_lines(read_text(path, "prompt file"), config.seed, str(path))
        where = str(path)
    elif isinstance(value, list):
        entries, where = _from_list(value, config.seed, source, key), source
    else:
        raise ConfigError(source, key, f"expected a prompt file path or a list of prompts, got {value!r}")
    if not entries:
        raise ConfigError(where, key if where == source else "", "holds no prompt (one per line, or a list)")
    seen = {}
    for i, entry in enumerate(entries):
        if entry in seen:
            raise ConfigError(where, key if where == source else "", f"prompt {i + 1} repeats prompt {seen[entry] + 1} "
                              f"({entry.prompt!r}, seed {entry.seed}); every (prompt, seed) pair must be unique")
        seen[entry] = i
    return entries


def _from_lines(text: str, seed: int, where: str) -> List[PromptEntry]:
    entries = []
    tabbed = "\t" in text
    for number, line in enumerate(text.lstrip("\ufeff").split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        prompt, tab, seed_text = line.rpartition("\t") if "\t" in line else (line, "", "")
        if not tab and re.search(r"\s[0-9]+\s*$", line):  # a seed after a space: an editor's TAB turned to spaces?
            number_text = line.split()[-1]
            if tabbed:
                raise ConfigError(where, f"line {number}", f"ends in {number_text} after a space, where the other "
                                  "seeded lines have a TAB; separate the seed with a TAB (or, if the number belongs to "
                                  "the prompt, end the line with a TAB and its seed)")
            messages.warning(f"{where}: line {number} ends in {number_text} after a space: taken as part of the "
                             f"prompt, with seed {seed}; a seed is separated by a TAB (PROMPT<TAB>SEED)",
                             once=f"prompt-space-seed:{where}")
        try:
            entry_seed = int(seed_text.strip()) if tab else seed
        except ValueError:
            raise ConfigError(where, f"line {number}", f"the seed after the tab must be an integer, got "
                                                       f"{seed_text.strip()!r}") from None
        if not prompt.strip():
            raise ConfigError(where, f"line {number}", "a seed without a prompt")
        if tab and _seed_problem(entry_seed):
            raise ConfigError(where, f"line {number}", f"the seed after the tab: {_seed_problem(entry_seed)}")
        entries.append(PromptEntry(prompt.strip(), entry_seed))
    return entries


def _from_list(items: List[Any], seed: int, where: Optional[str], key: str) -> List[PromptEntry]:
    entries = []
    for i, item in enumerate(items):
        at = f"{key}[{i}]" if key else f"[{i}]"
        if isinstance(item, str):
            entry = PromptEntry(item.strip(), seed)
        elif isinstance(item, dict):
            entry = build_dataclass(PromptEntry, {"seed": seed, **item}, at, where)
            if not isinstance(entry.prompt, str) or not isinstance(entry.seed, int) or isinstance(entry.seed, bool):
                raise ConfigError(where, at, f"expected {{prompt: text, seed: integer}}, got {item!r}")
            if _seed_problem(entry.seed):
                raise ConfigError(where, f"{at}.seed", _seed_problem(entry.seed))
        else:
            raise ConfigError(where, at, f"expected a prompt (text) or {{prompt: ..., seed: ...}}, got {item!r}")
        if not entry.prompt:
            raise ConfigError(where, at, "empty prompt")
        entries.append(entry)
    return entries
