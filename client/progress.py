"""A tiny progress bar for long transfers, drawn on stderr only when stderr is a terminal.

    with Progress(total, label="import vm1") as bar:
        ...
        bar.advance(len(chunk))

It shows bytes done of the total, the percentage, the average rate and the time left, and
redraws at most ten times a second. Bytes counted by :meth:`Progress.skip` (the holes an
export leaves, counted at once) are done but moved no data: the rate leaves them out.
With ``total=None`` (a pipe: the length is known only at its end) it shows the bytes
done, the average rate and the time so far instead. Off a terminal it draws nothing, so
logs and pipes stay clean. The line is cut to the width of the terminal it is drawn on
(:func:`terminal_columns`), so a redraw never wraps. No dependencies.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

__all__ = ["Progress", "format_bytes", "format_duration", "terminal_columns"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
_BAR = 16


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units: ``"512 B"``, ``"1.5 MiB"``."""
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """``"m:ss"`` or ``"h:mm:ss"``."""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def terminal_columns(stream: TextIO, fallback: int = 80) -> int:
    """The width in columns of the terminal ``stream`` is on, measured on ``stream`` itself
    (not on stdout, which a bar on stderr is often not). ``$COLUMNS``, when set to a
    positive number, wins, as for :func:`shutil.get_terminal_size`; ``fallback`` when
    ``stream`` has no descriptor, is not a terminal, or reports a width of 0 (a terminal
    whose size was never set)."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns > 0:
        return columns
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return fallback
    return columns if columns > 0 else fallback


class Progress:
    """Progress of a transfer of ``total`` bytes (``None``: not known in advance).
    ``enabled`` defaults to "``stream`` is a terminal"; ``stream`` defaults to stderr."""

    def __init__(
        self,
        total: int | None,
        *,
        label: str = "",
        stream: TextIO | None = None,
        enabled: bool | None = None,
        interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = None if total is None else max(0, total)
        self.done = 0
        self.skipped = 0
        """Of :attr:`done`, the bytes counted by :meth:`skip`."""
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty()) if callable(isatty) else False
        self.enabled = enabled
        self.interval = interval
        self._clock = clock
        self._start = clock()
        self._last_draw: float | None = None
        self._width = 0
        self._closed = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def advance(self, n: int) -> None:
        """Count ``n`` more bytes done; redraw if the last draw is old enough."""
        self.done += n
        now = self._clock()
        if self._last_draw is None or now - self._last_draw >= self.interval:
            self._draw(now)

    def skip(self, n: int) -> None:
        """Count ``n`` more bytes done that took no time to do (holes left as holes): the
        rate, and so the time left, are of the other bytes."""
        self.skipped += n
        self.advance(n)

    def render(self, now: float | None = None) -> str:
        """The bar's text as it would be drawn at ``now``."""
        now = self._clock() if now is None else now
        elapsed = max(now - self._start, 1e-9)
        prefix = f"{self.label} " if self.label else ""
        rate = (self.done - self.skipped) / elapsed
        if self.total is None:
            return (
                f"{prefix}{format_bytes(self.done)} {format_bytes(rate)}/s "
                f"elapsed {format_duration(now - self._start)}"
            )
        done = min(self.done, self.total) if self.total else self.done
        fraction = done / self.total if self.total else 1.0
        filled = int(fraction * _BAR)
        bar = "#" * filled + "-" * (_BAR - filled)
        if rate > 0 and self.total > done:
            eta = format_duration((self.total - done) / rate)
        else:
            eta = "0:00" if self.total <= done else "?"
        return (
            f"{prefix}[{bar}] {fraction * 100:3.0f}% {format_bytes(done)} / "
            f"{format_bytes(self.total)} {format_bytes(rate)}/s ETA {eta}"
        )

    def _draw(self, now: float) -> None:
        self._last_draw = now
        if not self.enabled or self._closed:
            return
        # One column short of the width: a line that fills it would wrap on some terminals.
        limit = max(terminal_columns(self.stream) - 1, 1)
        text = self.render(now)[:limit]
        # Spaces over what is left of a longer line before, within the width.
        pad = " " * max(0, min(self._width, limit) - len(text))
        self._width = len(text)
        self.stream.write("\r" + text + pad)
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line (so a following message starts clean)."""
        if self._closed:
            return
        self._draw(self._clock())
        self._closed = True
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
