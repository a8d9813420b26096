"""Stopping a training run cleanly on SIGTERM (``timeout``, ``kill``) or Ctrl-C: after its step, with a save."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time


class StopOnSignal:
    """While active (main thread only), SIGTERM and SIGINT set :attr:`signal` instead of ending the
    process, so that the training loop stops after its current step and saves."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    #: a repeat within this many seconds is the same request: GNU ``timeout`` sends its signal twice at once
    #: (to the process, then to its process group), and the second must not end the process mid-save
    REPEAT_WINDOW = 1.0

    def __init__(self):
        self.signal = None
        self._previous = {}
        self._first = None  # time.monotonic() of the first signal

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.signal is None:
            self.signal, self._first = signum, now
            try:  # (silence after a Ctrl-C invited a second one, which aborted the save: bad-input walkthrough)
                sys.stderr.write(f"{signal.Signals(signum).name}: stopping after this step and saving it; "
                                 "a second one (after a second) aborts the save\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            return
        if now - self._first < self.REPEAT_WINDOW:
            return
        # a later second signal acts as it would have without this (Ctrl-C twice: KeyboardInterrupt)
        previous = self._previous.get(signum)
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous in (None, signal.SIG_DFL):
            os.kill(os.getpid(), signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)  # None: set from C
        return False
