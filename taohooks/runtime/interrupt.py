"""SIGTERM (a scheduler's time limit, ``timeout``, ``kill``) handled as Ctrl-C is, for commands that say how to go
on."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, List


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt (caught alike)."""


def interruption(exc: BaseException) -> str:
    """How a message names what stopped a call: ``SIGTERM``, ``Ctrl-C`` or the exception's class."""
    if isinstance(exc, Terminated):
        return "SIGTERM"
    return "Ctrl-C (KeyboardInterrupt)" if isinstance(exc, KeyboardInterrupt) else type(exc).__name__


@contextlib.contextmanager
def terminate_as_interrupt(seen: List[int]) -> Iterator[None]:
    """While active (main thread only), SIGTERM raises :class:`Terminated` (a KeyboardInterrupt, as Ctrl-C raises),
    noted in ``seen``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        seen.append(signum)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
