"""taohooks' own message channel: what a user must see goes to stderr, whatever the host script does.

Research scripts silence Python's ``warnings`` (Wan2.1's ``generate.py`` runs
``warnings.filterwarnings('ignore')``) and reconfigure ``logging``; a notice sent through either can
vanish. Everything taohooks tells a user therefore goes through :func:`notice` and :func:`warning`,
which write one line to ``sys.stderr`` (looked up at call time, so pytest's capture and a script's
redirect both see it):

    taohooks: calibrating: LUT luts/wan.safetensors has 0 of 20 prompts ...
    taohooks: warning: step 45 runs at timestep 357, the LUT was calibrated at 356 ...

Under ``torch.distributed`` (or ``torchrun``'s ``RANK``) only rank 0 speaks, unless a message is
meant for ``every_rank``. ``once=KEY`` prints a message the first time its key is seen in this
process. ``TAOHOOKS_VERBOSITY`` (or :func:`set_verbosity`) chooses how
much is said: ``quiet`` (warnings only), ``info`` (the default: notices and warnings) or ``debug``.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Optional, Set

__all__ = ["notice", "warning", "debug", "set_verbosity", "verbosity", "ENV_VERBOSITY", "LEVELS"]

ENV_VERBOSITY = "TAOHOOKS_VERBOSITY"
LEVELS = {"quiet": 0, "info": 1, "debug": 2}
_PREFIX = "taohooks: "

_lock = threading.Lock()
_seen: Set[str] = set()
_level: Optional[int] = None  # set_verbosity(); None: from the environment


def verbosity() -> int:
    """The current level: 0 quiet, 1 info (default), 2 debug."""
    if _level is not None:
        return _level
    name = os.environ.get(ENV_VERBOSITY, "info").strip().lower() or "info"
    if name not in LEVELS:
        _say_unknown_level(name)
    return LEVELS.get(name, LEVELS["info"])


def _say_unknown_level(name: str) -> None:
    """An unknown ``TAOHOOKS_VERBOSITY`` is said once (on stderr, whatever the level) and read as info."""
    key = f"verbosity:{name}"
    if not _is_rank_zero():  # (under torchrun only rank 0 speaks)
        return
    with _lock:
        if key in _seen:
            return
        _seen.add(key)
    try:
        sys.stderr.write(f"{_PREFIX}warning: {ENV_VERBOSITY}={name!r} is not one of {', '.join(LEVELS)} (quiet keeps "
                         "only the warnings); using info\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def set_verbosity(level) -> None:
    """``"quiet"``, ``"info"``, ``"debug"`` (or 0-2); ``None`` goes back to ``TAOHOOKS_VERBOSITY``."""
    global _level
    if level is None or isinstance(level, int):
        _level = level
        return
    if level not in LEVELS:
        raise ValueError(f"verbosity must be one of {', '.join(LEVELS)}, got {level!r}")
    _level = LEVELS[level]


def _is_rank_zero() -> bool:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except Exception:  # pragma: no cover - a broken torch.distributed must not silence us
        pass
    return os.environ.get("RANK", "0") in ("", "0")


def _emit(text: str, level: int, once: Optional[str], every_rank: bool) -> bool:
    if verbosity() < level:
        return False
    if not every_rank and not _is_rank_zero():
        return False
    if once is not None:
        with _lock:
            if once in _seen:
                return False
            _seen.add(once)
    stream = sys.stderr
    try:
        with _around_progress_bars(stream):
            stream.write(text + "\n")
            stream.flush()
    except (OSError, ValueError):  # a closed stderr must not turn a notice into a crash
        return False
    return True


def _around_progress_bars(stream):
    """While a tqdm bar is on screen (a pipeline's denoising loop: the messages of its last call come while it is
    drawn), clear it, and draw it again after the message, so that the message starts its own line."""
    tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)  # (only where the script already imported it)
    if tqdm is None or not getattr(tqdm, "_instances", None):
        return contextlib.nullcontext()
    return tqdm.external_write_mode(file=stream)


def _prefixed(message: str, kind: str = "") -> str:
    body = message[len(_PREFIX):] if message.startswith(_PREFIX) else message
    return f"{_PREFIX}{kind}{body}"


def notice(message: str, *, once: Optional[str] = None, every_rank: bool = False) -> bool:
    """Tell the user something they should know (calibration began, a generation's summary).

    Returns whether the line was written."""
    return _emit(_prefixed(message), LEVELS["info"], once, every_rank)


def warning(message: str, *, once: Optional[str] = None, every_rank: bool = False) -> bool:
    """Tell the user something that may be wrong with their result. Shown even when quiet."""
    return _emit(_prefixed(message, "warning: "), LEVELS["quiet"], once, every_rank)


def debug(message: str, *, once: Optional[str] = None, every_rank: bool = False) -> bool:
    """Details for ``TAOHOOKS_VERBOSITY=debug``."""
    return _emit(_prefixed(message), LEVELS["debug"], once, every_rank)


def forget(prefix: str = "") -> None:
    """Forget the ``once`` keys starting with ``prefix`` (all by default): for tests and new runs."""
    with _lock:
        for key in [k for k in _seen if k.startswith(prefix)]:
            _seen.discard(key)
