"""Warnings about a lasting condition, said once per period rather than at every retry."""

from __future__ import annotations

import time

ONCE_A_MINUTE = 60.0


class Sometimes:
    """True at most once per `period` seconds (the first time at once).

    A full disk, a broker that cannot start: the code retries every second or two, and a log line
    per retry would bury everything else in the log.
    """

    def __init__(self, period: float = ONCE_A_MINUTE) -> None:
        self.period = period
        self._last: float | None = None

    def __call__(self) -> bool:
        now = time.monotonic()
        if self._last is not None and now - self._last < self.period:
            return False
        self._last = now
        return True
