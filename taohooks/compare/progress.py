"""The progress line of ``taocache compare``: runs done / total and an ETA, on stderr."""
from __future__ import annotations

import time

from ..runtime import messages

__all__ = ["Progress"]


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """``total`` generations, ``done`` of them finished before this process (resumed, not timed).

    The ETA is the mean wall time of this process's generations times the ones left."""

    def __init__(self, total: int, done: int = 0):
        self.total, self.done, self.fresh, self.seconds = total, done, 0, 0.0
        self._start = time.perf_counter()

    def eta(self) -> str:
        if not self.fresh:
            return "ETA after the first run"
        return f"ETA {_duration(self.seconds / self.fresh * (self.total - self.done))}"

    def advance(self, what: str) -> None:
        """One generation finished; says ``compare: [####----] 3/8 runs, ETA 0m12s (what)``."""
        self.done += 1
        self.fresh += 1
        self.seconds = time.perf_counter() - self._start
        width = 20
        filled = width * self.done // max(self.total, 1)
        messages.notice(f"compare: [{'#' * filled}{'-' * (width - filled)}] {self.done}/{self.total} runs, "
                        f"{self.eta()} ({what})")
