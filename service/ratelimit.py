"""Rate-limited warnings for conditions that can repeat on every request."""

from __future__ import annotations

import logging
import time

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """Logs a warning at most once per ``interval`` seconds, counting what it held back.

    One instance per condition (e.g. "cache fill failed on volume v, layer 1").
    """

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._logger = logger
        self._interval = interval
        self._next = 0.0
        self._suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        """Log ``msg % args`` unless one was logged less than ``interval`` seconds ago."""
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        if self._suppressed:
            msg += " (%d similar warnings suppressed)"
            args = (*args, self._suppressed)
        self._suppressed = 0
        self._next = now + self._interval
        self._logger.warning(msg, *args)
