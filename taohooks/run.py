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
from .integration import IntegrationError

__all__ = ["main", "split_taocache_argument", "install_integration", "INTEGRATION_MODULES"]

INTEGRATION_MODULES = {
    "wan": "taohooks.integrations.wan",
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


def _warn_without_autoload(config: TaoCacheConfig) -> None:
    """VideoSys starts its ranks 1.. with ``spawn``: they need the .pth autoload to get the integration."""
    from .autoload import pth_path

    if config.integration == "videosys" and not pth_path().is_file():
        print(f"taocache-run: note: {pth_path()} is not installed, so VideoSys' spawned workers (num_gpus > 1) "
              "will run without TaoCache; run `taocache autoload install` once", file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(f"{USAGE}\n\n{DESCRIPTION}")
        return 0
    config_path, rest = split_taocache_argument(argv)
    if config_path is None or not rest:
        print(USAGE, file=sys.stderr)
        return 2
    script = Path(rest[0])
    if not script.is_file():
        print(f"taocache-run: script {script} does not exist", file=sys.stderr)
        return 2
    try:
        config = load_config(config_path)
        os.environ[ENV_CONFIG] = str(Path(config_path).resolve())
        sys.argv = [str(script)] + rest[1:]
        sys.path[0] = str(script.resolve().parent)
        install_integration(config)
        _warn_without_autoload(config)
    except (ConfigError, IntegrationError, ImportError) as exc:
        print(f"taocache-run: {exc}", file=sys.stderr)
        return 2
    runpy.run_path(str(script), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
