"""SIGTERM (a scheduler's time limit, ``timeout``, ``kill``) handled as Ctrl-C is, for commands that say how to go
on."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, List


@contextlib.contextmanager
def terminate_as_interrupt(seen: List[int]) -> Iterator[None]:
    """While active (main thread only), SIGTERM raises KeyboardInterrupt, as Ctrl-C does, noted in ``seen``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
