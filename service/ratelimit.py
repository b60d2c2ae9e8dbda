"""Rate-limited log lines for conditions that can repeat on every request or attempt."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref

__all__ = ["RateLimitedLog", "tell_held_lines"]


def _as_text(msg: str, args: tuple[object, ...]) -> tuple[str, tuple[object, ...]]:
    """``msg % args`` as a message of no arguments (its ``%`` escaped), for a line held
    back: it keeps the text, not the objects (an error, its traceback's frames and every
    request they hold) until it is told."""
    if not args:  # (its text is what the line says: escaped, a count may follow it)
        return msg.replace("%", "%%"), args
    try:
        text = msg % args
    except (TypeError, ValueError):  # told as logging tells it (its own error report)
        return msg, args
    return text.replace("%", "%%"), ()


class RateLimitedLog:
    """Logs a line at most once per ``interval`` seconds, counting what it held back.

    One instance per condition (e.g. "cache fill failed on volume v, layer 1"). A line
    whose ``key`` differs from the last one logged is logged at once (a new reason).

    Lines held back are told when the interval that held them ends: called on an event
    loop, the last one held is logged then with their count (so a burst with no later
    line of its kind is not lost), or, when the condition ended since (:meth:`ended` held
    back), the end with their count. Called where no loop runs (a worker thread), their
    count goes with the next line logged. Lines still held when the loop ends (a server
    stopping within the interval) are told by :func:`tell_held_lines`, which ``tierdisk
    serve`` calls as it stops.
    """

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._logger = logger
        self._interval = interval
        self._next = 0.0
        self._suppressed = 0
        self._key: object = None
        self._next_end = 0.0  # when the next end of the condition may be logged
        self._logged_since_end = False  # a line was logged since the last end
        self._held: tuple[int, str, tuple[object, ...]] | None = None  # the last held back
        self._end_held: tuple[str, tuple[object, ...]] | None = None  # an end held after them
        self._timer: asyncio.TimerHandle | None = None  # tells the held lines (_tell_held)

    def ended(self, msg: str, *args: object) -> None:
        """Log ``msg % args`` at info level, the end of the condition (it answers again), with
        the count of lines held back since the last one logged, which would otherwise never
        be told. Logged whenever a line of the condition was logged since the last end;
        else (its lines were all held back: a condition that comes and goes) at most once
        per ``interval``, their count going with the next line. An end that comes an
        ``interval`` or more after the last one makes the next line of the condition news,
        logged at once; ends closer together leave the lines' interval running, so a tier
        that answers one call in two is a few lines per interval, not two per call."""
        now = time.monotonic()
        if not self._logged_since_end and now < self._next_end:
            if self._suppressed:  # told with them when their interval ends (_tell_held)
                self._end_held = _as_text(msg, args)
            return
        self._log_end(now, msg, args)

    def _log_end(self, now: float, msg: str, args: tuple[object, ...]) -> None:
        if self._suppressed:
            msg += " (%d more like the last failure were held back)"
            args = (*args, self._suppressed)
        self._logger.info(msg, *args)
        self._suppressed = 0
        self._held = self._end_held = None
        if now >= self._next_end:  # not coming and going: a new episode is news
            self._next, self._key = 0.0, None
        self._next_end = now + self._interval
        self._logged_since_end = False

    def warning(self, msg: str, *args: object, key: object = None) -> None:
        """Log ``msg % args`` at warning level (see :meth:`log`)."""
        self.log(logging.WARNING, msg, *args, key=key)

    def error(
        self, msg: str, *args: object, key: object = None, exc_info: BaseException | None = None
    ) -> None:
        """Log ``msg % args`` at error level (see :meth:`log`)."""
        self.log(logging.ERROR, msg, *args, key=key, exc_info=exc_info)

    def log(
        self,
        level: int,
        msg: str,
        *args: object,
        key: object = None,
        exc_info: BaseException | None = None,
    ) -> None:
        """Log ``msg % args`` (with ``exc_info``'s traceback, if given) unless one with the
        same ``key`` was logged less than ``interval`` seconds ago."""
        now = time.monotonic()
        if now < self._next and key == self._key:
            self._suppressed += 1
            self._held = (level, *_as_text(msg, args))
            self._end_held = None  # (failing again since)
            if self._timer is None:
                self._tell_held_later(self._next - now)
            return
        if self._suppressed:  # held back since the last line logged: of its kind, not this
            same = key == self._key
            msg += (
                " (%d similar messages suppressed)"
                if same
                else " (%d more of the previous kind were held back)"
            )
            args = (*args, self._suppressed)
        self._suppressed = 0
        self._held = self._end_held = None
        self._next = now + self._interval
        self._key = key
        self._logged_since_end = True
        self._logger.log(level, msg, *args, exc_info=exc_info)

    def _tell_held_later(self, delay: float) -> None:
        """Tell the lines held back in ``delay`` seconds (:meth:`_tell_held`), if this runs
        on an event loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop here: their count goes with the next line
            return
        self._timer = loop.call_later(max(delay, 0.0), self._tell_held)
        _holding.add(self)

    def _tell_held(self, now: bool = False) -> None:
        """Log the last line held back, with how many were, once its interval is over (or
        ``now``: a stop); or the end of the condition held after them, with their count. A
        line logged meanwhile told them already."""
        if self._timer is not None:
            self._timer.cancel()  # (a no-op when it is what runs this)
            self._timer = None
        _holding.discard(self)
        if not self._suppressed or self._held is None:
            return
        at = time.monotonic()
        if at < self._next and not now:  # a line logged since this was armed: a new interval
            self._tell_held_later(self._next - at)
            return
        if self._end_held is not None:  # the condition ended since: its end tells them
            self._log_end(at, *self._end_held)
            return
        level, msg, args = self._held
        self._logger.log(
            level, msg + " (the last of %d similar messages held back)", *args, self._suppressed
        )
        self._suppressed = 0
        self._held = None
        self._next = at + self._interval
        self._logged_since_end = True


_holding: weakref.WeakSet[RateLimitedLog] = weakref.WeakSet()
"""The logs whose held lines wait for their interval to end (a timer armed)."""


def tell_held_lines() -> None:
    """Tell every line held back now, with its count, instead of when its interval ends:
    the process stopping would otherwise take them with it (the last failures before a stop
    are what an operator reads first). For the whole process: ``tierdisk serve`` calls it
    once its server has stopped."""
    for held in list(_holding):
        held._tell_held(now=True)
