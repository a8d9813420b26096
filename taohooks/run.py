"""Run a research repo's own sample script with TaoCache: add ``--taocache CONFIG.yaml``.

    taocache-run generate.py --task t2v-1.3B ... --taocache configs/wan.yaml
    python -m taohooks.run generate.py ... --taocache configs/wan.yaml
    torchrun --nproc_per_node 2 -m taohooks.run generate.py ... --taocache configs/wan.yaml

The launcher removes ``--taocache X`` / ``--taocache=X`` from the arguments, sets ``sys.argv[0]``
to the script and ``sys.path[0]`` to the script's folder (as ``python script.py`` would), installs
the integration the YAML names, and runs the script as ``__main__``. Errors in the config, a
missing script or an integration that cannot be installed stop it before any model loads.
``TAOHOOKS_CONFIG`` is set for child processes.
"""
from __future__ import annotations

import importlib
import os
import runpy
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from .config import ConfigError, TaoCacheConfig, load_config
from .launcher.integration import IntegrationError, pending_module_checks, script_sys_path, wrapped_calls
from .taocache.lut import LUTMismatchError
from .taocache.plan import PlanError

__all__ = ["main", "split_taocache_argument", "install_integration", "INTEGRATION_MODULES"]

INTEGRATION_MODULES = {
    "wan": "taohooks.integrations.wan",
    "wan22": "taohooks.integrations.wan22",
    "latte": "taohooks.integrations.latte",
    "opensora_plan": "taohooks.integrations.opensora_plan",
    "videosys": "taohooks.integrations.videosys",
    "diffusers": "taohooks.integrations.diffusers",
    "testbed": "taohooks.testbed.integration",
}
ENV_CONFIG = "TAOHOOKS_CONFIG"
USAGE = ("usage: taocache-run SCRIPT.py [the script's own arguments] --taocache CONFIG.yaml\n"
         "       taocache-run --help")
DESCRIPTION = ("Runs a research repo's own sample script with TaoCache: removes --taocache CONFIG.yaml from the "
               "arguments,\ninstalls the integration the config names and runs SCRIPT.py as __main__ (also "
               "`python -m taohooks.run`,\n`torchrun ... -m taohooks.run`). Check a config first with "
               "`taocache check CONFIG.yaml`.")


def split_taocache_argument(argv: List[str]) -> Tuple[Optional[str], List[str]]:
    """``(config path or None, the other arguments)``; accepts ``--taocache X`` and ``--taocache=X``.

    A missing value, or two different configs, print an error and exit with status 2."""
    def _usage_error(message: str) -> None:
        print(f"taocache-run: error: {message}\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)

    config, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        value = None
        if arg == "--taocache":
            if i + 1 >= len(argv) or not argv[i + 1]:
                _usage_error("--taocache needs a config file")
            value, i = argv[i + 1], i + 2
        elif arg.startswith("--taocache="):
            value, i = arg.split("=", 1)[1], i + 1
            if not value:
                _usage_error("--taocache needs a config file")
        else:
            rest.append(arg)
            i += 1
            continue
        if config is not None and value != config:
            _usage_error(f"--taocache is given twice ({config} and {value}); give one config")
        config = value
    return config, rest


def install_integration(config: TaoCacheConfig) -> None:
    """Import ``taohooks.integrations.<name>`` (or the testbed's) and call its ``install(config)``."""
    name = config.integration
    if name == "none":
        raise IntegrationError(f"{config.source}: integration is 'none'; name the integration the script needs "
                               f"({', '.join(INTEGRATION_MODULES)})")
    module = importlib.import_module(INTEGRATION_MODULES[name])
    install = getattr(module, "install", None)
    if install is None:
        raise IntegrationError(f"the {name!r} integration is not available in this taohooks version yet "
                               f"(available: {', '.join(n for n in INTEGRATION_MODULES if _available(n))})")
    install(config)


def _available(name: str) -> bool:
    try:
        return hasattr(importlib.import_module(INTEGRATION_MODULES[name]), "install")
    except ImportError:
        return False


def _warn_without_autoload(config: TaoCacheConfig, prog: str = "taocache-run") -> None:
    """VideoSys starts its ranks 1.. with ``spawn``: they need the .pth autoload to get the integration."""
    from .autoload import pth_path

    if config.integration == "videosys" and not pth_path().is_file():
        print(f"{prog}: note: {pth_path()} is not installed, so VideoSys' spawned workers (num_gpus > 1) "
              "will run without TaoCache; run `taocache autoload install` once", file=sys.stderr)


def script_problem(first: str) -> Optional[str]:
    """Why ``first`` (the word after the launcher's own arguments) is not a script file to run, or ``None``."""
    script = Path(first)
    if script.is_file():
        return None
    if first.startswith("-"):
        return (f"expected the sample script first, got the option {first}; taocache-run runs a script file "
                "(python -m MODULE is not supported: give the module's .py file)")
    if script.is_dir():
        return f"script {script} is a directory; give the sample script inside it (e.g. {script / 'generate.py'})"
    return f"script {script} does not exist" if not script.exists() else f"script {script} is not a file"


def main(argv: Optional[List[str]] = None, prog: str = "taocache-run") -> int:
    """Run the script with the integration installed; ``prog`` names the command in messages
    (``taocache compare`` runs the script through here)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(f"{USAGE}\n\n{DESCRIPTION}")
        return 0
    config_path, rest = split_taocache_argument(argv)
    if config_path is None or not rest:
        close = [a for a in argv if a.startswith("--tao") or a.startswith("-taocache")]
        why = ("the sample script is missing" if config_path is not None else
               f"--taocache CONFIG.yaml is missing (did you mean --taocache instead of {close[0]}?)" if close else
               "--taocache CONFIG.yaml is missing")
        print(f"{prog}: error: {why}\n{USAGE}", file=sys.stderr)
        return 2
    script = Path(rest[0])
    why = script_problem(rest[0])
    if why is not None:
        print(f"{prog}: {why}", file=sys.stderr)
        return 2
    asks_help = any(a in ("-h", "--help") for a in rest[1:])  # the script prints its help and exits: no checks
    try:
        config = load_config(config_path)
        os.environ[ENV_CONFIG] = str(Path(config_path).resolve())
        sys.argv = [str(script)] + rest[1:]
        sys.path[0] = str(script.resolve().parent)
        with script_sys_path(*script_sys_path_additions(script)):
            install_integration(config)
        if not asks_help:
            _warn_without_autoload(config, prog)
            from .launcher.integration import intercepted
            from .taocache.cache import check_config_before_run, check_config_lut

            if intercepted():  # taocache compare: its own LUT and plans; the config's LUT is only checked if there
                check_config_lut(config)
            else:  # the plan's LUT, its labels, whether it can be written: before the model loads
                check_config_before_run(config)
            precheck_integration(config, rest[1:])
            check_teacache_fit(config)
    except (ConfigError, IntegrationError, ImportError, LUTMismatchError, PlanError, ValueError, OSError) as exc:
        from .launcher.integration import ResearchModuleMissing

        found = _findable_integrations(config.integration) if isinstance(exc, ResearchModuleMissing) else []
        _say(prog, f"{exc}" + (f"; this script's folder holds the code of integration: {' or '.join(found)} (its "
                               f"config is another: {config_path})" if found else ""))
        return 2
    calls_before = wrapped_calls()
    try:
        runpy.run_path(str(script.resolve()), run_name="__main__")  # __file__ absolute, as `python SCRIPT.py` has it
    except RUN_ERRORS as exc:
        # found at the first call of a generation (what the command line could not say): before any
        # step was skipped; said as plainly as the checks before the model loaded
        _say(prog, exc)
        return 2
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code == 0 and not asks_help and not report_if_never_applied(config, calls_before):
            return 1
        raise
    except KeyboardInterrupt:
        from .launcher.integration import intercepted
        from .launcher.prompt_calibration import ENV_CALIBRATE_PROMPTS

        if intercepted() or os.environ.get(ENV_CALIBRATE_PROMPTS):  # (taocache compare / calibrate say what they
            raise                                                     # kept: part files, the runs stored)
        print(f"{prog}: interrupted{_calibration_state(config)}", file=sys.stderr)  # (not a traceback through
        return 130                                                                   # taohooks' frames)
    if not report_if_never_applied(config, calls_before):
        return 1
    return 0


def _calibration_state(config) -> str:
    """What an interrupted run's LUT holds, where it was still calibrating: ``"; the LUT ... holds 2 of 20 ..."``."""
    try:
        from .taocache.cache import calibrates
        from .taocache.lut import CalibrationLUT

        path = config.lut_path()
        if path is None or not path.is_file() or not calibrates(config):  # (a run that skipped: nothing to continue)
            return ""
        held, wanted = CalibrationLUT.load(path).num_prompts, config.calibration.prompts
    except Exception:  # noqa: BLE001 - only a hint on the way out
        return ""
    if held >= wanted:
        return ""
    return (f"; the LUT {path} holds {held} of {wanted} prompts (calibration.prompts; a generation stopped midway is "
            "left out): run the same command again to continue calibrating" + (
                " (the script starts from its first prompt again, and a LUT counts its prompts, not which: those "
                "recorded before are recorded again; taocache calibrate CONFIG --prompts FILE -- SCRIPT ... continues "
                "a list where it stopped)" if held else ""))


def _say(prog: str, exc: object) -> None:
    """An error on stderr, every line of it (a precheck lists each problem on its own) under ``prog``'s name, so that
    a filter on the prefix sees them all."""
    print("\n".join(f"{prog}: {line}" for line in str(exc).splitlines() or [""]), file=sys.stderr)


def _run_errors() -> tuple:
    """taohooks' own errors about the config, the LUT or the run: said in one line, never a traceback."""
    from .runtime.io import FileWriteError
    from .taocache.lut import LUTFormatError
    from .caches.pab import PABPatternError

    return (ConfigError, IntegrationError, LUTMismatchError, LUTFormatError, PlanError, PABPatternError, FileWriteError)


RUN_ERRORS = _run_errors()


def script_sys_path_additions(script: Path) -> Tuple[List[str], bool]:
    """The folders ``script`` appends or inserts into ``sys.path`` at top level, worked out without
    running it: ``(folders, all_known)``. Each ``sys.path.append(EXPR)`` / ``insert(i, EXPR)`` whose
    ``EXPR`` uses only ``os``/``os.path`` functions, ``sys.path[0]``, ``__file__`` and literals is
    evaluated as the script would (``sys.path[0]`` = its folder); anything else makes ``all_known``
    false."""
    import ast

    try:
        tree = ast.parse(script.read_text(encoding="utf-8", errors="replace"))
    except (OSError, SyntaxError, ValueError):
        return [], True
    folder = str(script.resolve().parent)
    fake_sys = type("sys", (), {"path": [folder] + sys.path[1:], "argv": [str(script)]})
    namespace = {"os": os, "sys": fake_sys, "__file__": str(script.resolve()), "__builtins__": {"str": str}}
    found, complete = [], True
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("append", "insert") and _dotted(node.func.value) == "sys.path"):
            continue
        arg = node.args[-1] if node.args else None
        try:
            if arg is None or not _pure_path_expression(arg):
                raise ValueError("not a plain path expression")
            value = eval(compile(ast.Expression(arg), str(script), "eval"), namespace)  # noqa: S307 (checked above)
        except Exception:
            complete = False
            continue
        if isinstance(value, (str, os.PathLike)):
            found.append(os.path.abspath(os.fspath(value)))
        else:
            complete = False
    return found, complete


_PATH_FUNCTIONS = {"os.path.dirname", "os.path.split", "os.path.join", "os.path.abspath", "os.path.realpath",
                   "os.path.normpath", "os.path.expanduser", "os.getcwd", "str"}
_PATH_NAMES = {"sys.path", "__file__", "os.pardir", "os.curdir", "os.sep"}


def _pure_path_expression(node) -> bool:
    """Whether an expression only combines path functions of ``os.path``, ``sys.path[...]``,
    ``__file__`` and literals (nothing else is ever evaluated)."""
    import ast

    if isinstance(node, ast.Constant):
        return isinstance(node.value, (str, int))
    if isinstance(node, ast.Call):
        return (_dotted(node.func) in _PATH_FUNCTIONS and not node.keywords
                and all(_pure_path_expression(a) for a in node.args))
    if isinstance(node, ast.Subscript):  # (Python 3.8 wraps the index in ast.Index)
        index = node.slice.value if type(node.slice).__name__ == "Index" else node.slice
        return _pure_path_expression(node.value) and _pure_path_expression(index)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _pure_path_expression(node.left) and _pure_path_expression(node.right)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return _pure_path_expression(node.operand)
    return isinstance(node, (ast.Name, ast.Attribute)) and _dotted(node) in _PATH_NAMES


def _dotted(node) -> str:
    """``a.b.c`` for a chain of names and attributes, else ``""`` (``ast.unparse`` is Python 3.9+)."""
    import ast

    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


def check_teacache_fit(config: TaoCacheConfig, calibrating: bool = False) -> None:
    """``teacache: {calibrated: true}``: the fit file must be there and fit the LUT, unless this run
    calibrates and fits first (``calibration.teacache_fit``, the LUT incomplete; ``calibrating``: a
    ``taocache calibrate`` run would, whatever ``calibration.auto`` says)."""
    tea, path = config.teacache, config.lut_path()
    if tea is None or not tea.calibrated or path is None:
        return
    from .caches.teacache_fit import fit_path, fitted_coefficients
    from .taocache.cache import _teacache_proxy
    from .taocache.lut import CalibrationLUT

    lut = CalibrationLUT.load(path) if path.is_file() else None
    complete = lut is not None and lut.num_prompts >= config.calibration.prompts
    from .taocache.cache import calibrates

    fits_now = config.calibration.teacache_fit and (calibrates(config) or calibrating) and not complete
    fit = fit_path(path)
    if not fit.is_file():
        if fits_now:
            return  # this run calibrates, and fits, first
        why = (f"{path} is complete, so no calibration runs to fit it: delete the LUT (or raise calibration.prompts) "
               "and run again" if complete and config.calibration.teacache_fit else
               "calibration.auto is off, so this run does not calibrate: run taocache calibrate first (the LUT and "
               "the fit in one pass), or set calibration.auto: true" if config.calibration.teacache_fit else
               "set calibration.teacache_fit: true and calibrate (the LUT and the fit in one pass)")
        raise ConfigError(config.source or "the config", "teacache.calibrated", f"{fit} does not exist; {why}")
    if complete:
        try:
            fitted_coefficients(fit, _teacache_proxy(config), lut.created)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ConfigError(config.source or "the config", "teacache.calibrated", str(exc)) from None


def precheck_integration(config: TaoCacheConfig, script_argv: List[str]) -> None:
    """What the integration can check from the script's command line, before any model loads."""
    module = importlib.import_module(INTEGRATION_MODULES[config.integration])
    check = getattr(module, "precheck", None)
    if check is not None:
        check(config, list(script_argv))


# a marker module of each integration's research code: what the script imported instead
MARKERS = {"wan": "wan.text2video", "wan22": "wan.text2video", "latte": "pipeline_latte", "opensora_plan": "pipeline_videogen",
           "videosys": "videosys", "testbed": "taohooks.testbed.sampling"}


def _findable_integrations(configured: str) -> List[str]:
    """The other integrations whose marker module this process can find (the script's folder first on ``sys.path``),
    looked up without importing anything: where a config of another integration was given to a script."""
    import importlib.util

    root = Path(sys.path[0]).resolve()  # (the script's folder, as Python puts it first)

    def mine(path) -> bool:
        try:
            resolved = Path(path).resolve()
        except OSError:
            return False
        return resolved == root or root in resolved.parents

    def findable(marker: str) -> bool:
        top, _, rest = marker.partition(".")
        try:
            spec = importlib.util.find_spec(top)  # (a top-level name: nothing is imported)
        except (ImportError, ValueError):
            return False
        if spec is None:
            return False
        if not rest:
            return spec.origin is not None and mine(spec.origin)
        return any(mine(folder) and (Path(folder) / (rest.replace(".", "/") + ".py")).is_file()
                   for folder in spec.submodule_search_locations or [])

    return [name for name, marker in MARKERS.items() if name != configured and marker != MARKERS.get(configured)
            and name != "testbed" and findable(marker)]


def report_if_never_applied(config: TaoCacheConfig, calls_before: int = 0) -> bool:
    """When the script ends and the integration never wrapped a generation, say so (one line), with
    what it expected and what the script imported instead. Returns ``False`` when that happened
    under ``taocache calibrate`` (the caller exits non-zero), else ``True``."""
    from .runtime import messages
    from .launcher.prompt_calibration import ENV_CALIBRATE_ONLY

    if wrapped_calls() > calls_before:
        return True
    name = config.integration
    module = importlib.import_module(INTEGRATION_MODULES[name])
    expects = getattr(module, "EXPECTS", f"a generation call the {name!r} integration patches")
    seen = [f"{marker} (integration: {other})" for other, marker in MARKERS.items()
            if other != name and marker != MARKERS.get(name) and marker in sys.modules]
    instead = f"this script imported {', '.join(seen)}" if seen else "this script made no such call"
    missing = pending_module_checks()
    hint = f"; {missing}" if missing else ""
    messages.warning(f"{config.source}: integration: {name} expected {expects}; {instead}{hint}. "
                     "Nothing was cached or calibrated")
    return not os.environ.get(ENV_CALIBRATE_ONLY)


if __name__ == "__main__":
    sys.exit(main())
