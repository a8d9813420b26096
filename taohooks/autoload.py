"""Install the integration named by ``TAOHOOKS_CONFIG`` in this process (at interpreter start).

Processes started with ``spawn`` (VideoSys' engine workers, ``torch.multiprocessing``) do not
inherit the launcher's patches. The file ``taohooks-autoload.pth`` in site-packages runs::

    import os; os.environ.get("TAOHOOKS_CONFIG") and __import__("taohooks.autoload")

so this module is imported at the start of every Python process whose environment names a
config (the launcher sets it for its children), and does nothing otherwise, the way
coverage.py measures subprocesses. ``taocache autoload install`` writes the file;
``taocache autoload status`` says where it is.
"""
from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

__all__ = ["PTH_NAME", "PTH_LINE", "pth_path", "install_pth", "remove_pth", "install_from_environment"]

PTH_NAME = "taohooks-autoload.pth"
PTH_LINE = 'import os; os.environ.get("TAOHOOKS_CONFIG") and __import__("taohooks.autoload")\n'


def pth_path() -> Path:
    """Where the ``.pth`` file goes: this interpreter's site-packages (purelib)."""
    return Path(sysconfig.get_paths()["purelib"]) / PTH_NAME


def install_pth() -> Path:
    from .runtime.io import atomic_write_bytes

    path = pth_path()
    atomic_write_bytes(path, PTH_LINE.encode())
    return path


def remove_pth() -> bool:
    path = pth_path()
    if path.is_file():
        path.unlink()
        return True
    return False


def install_from_environment() -> None:
    """Install the integration of ``$TAOHOOKS_CONFIG``; a broken config warns instead of
    breaking every Python process started with it.

    A research module this process cannot find yet is not an error: a ``spawn`` worker gets the
    parent's ``sys.path`` (the script's folder) only after this ran, and a helper process that never
    imports the research code has nothing to patch. The integration's patches then wait for the
    module's import (``PatchSet.on_import``), quietly."""
    from .run import ENV_CONFIG, install_integration
    from .config import load_config

    from .launcher.integration import script_sys_path

    path = os.environ.get(ENV_CONFIG)
    if not path:
        return
    try:
        with script_sys_path([], complete=False):  # modules found nowhere yet are noted, not fatal
            install_integration(load_config(path))
    except Exception as exc:  # noqa: BLE001 - must never prevent the interpreter from starting
        print(f"taohooks: {ENV_CONFIG}={path}: integration not installed in this process: {exc}", file=sys.stderr)


install_from_environment()
