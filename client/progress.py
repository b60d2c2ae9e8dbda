"""A tiny progress bar for long transfers, drawn on stderr only when stderr is a terminal.

    with Progress(total, label="import vm1") as bar:
        ...
        bar.advance(len(chunk))

It shows bytes done of the total, the percentage, the average rate and the time left, and
redraws at most ten times a second. With ``total=None`` (a pipe: the length is known only at
its end) it shows the bytes done, the average rate and the time so far instead. Off a
terminal it draws nothing, so logs and pipes stay clean. No dependencies.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

__all__ = ["Progress", "format_bytes", "format_duration"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
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

    def render(self, now: float | None = None) -> str:
        """The bar's text as it would be drawn at ``now``."""
        now = self._clock() if now is None else now
        elapsed = max(now - self._start, 1e-9)
        prefix = f"{self.label} " if self.label else ""
        rate = self.done / elapsed
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
        text = self.render(now)
        columns = shutil.get_terminal_size((80, 24)).columns
        text = text[: max(columns - 1, 10)]
        pad = " " * max(0, self._width - len(text))
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
