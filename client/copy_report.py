"""How a copy between a volume and a file reports on itself: the progress bar it draws
while it runs, and the one line that ends it when it fails or is interrupted, saying what
it had done (DESIGN.md §7).

A copy onto a volume (``write``, ``import``) sends requests several at a time, which
finish in any order: :class:`CopyProgress` keeps count of what they wrote, for the note at
the end of that line. :func:`with_note` words the failure of any transfer, with its note,
as the error to raise. A copy out to stdout, a pipe or a device ends that line saying how
many bytes went out (:func:`reported_with_bytes_out`): whoever reads the stream cannot
tell a short one from a whole one but by the exit status.

Progress
    Long transfers draw a bar (:class:`~tierdisk.client.progress.Progress`) counting bytes
    on stderr, only when stderr is a terminal: with a total when the length is known (the
    holes of a sparse import count as they are unmapped or written), the bytes and the rate
    only when it is not (``write`` from a pipe). Never with
    ``--no-progress``, nor when the data itself is on a terminal (``read`` or ``export`` to
    a terminal stdout, ``write`` or ``import`` from a terminal stdin): raw sectors, or the
    echo of typed input, would mix with the redrawn line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Iterator

from .cli_errors import CliError, describe, describe_file, file_error
from .errors import TierdiskError, changed_nothing
from .localfile import Sink
from .progress import Progress

__all__ = [
    "CopyInterrupted",
    "CopyProgress",
    "progress_bar",
    "reported_with_bytes_out",
    "with_note",
]


def progress_bar(
    args: argparse.Namespace, total: int | None, label: str, *, data_on_tty: bool = False
) -> Progress:
    """The bar of a transfer of ``total`` bytes (``None``: unknown, from a pipe): drawn on
    stderr when that is a terminal (DESIGN.md §7). Never with ``--no-progress``, nor when the
    data itself is on a terminal (``data_on_tty``: ``read`` to a terminal stdout, ``write``
    from a terminal stdin): raw sectors, or the echo of typed input, would mix with the
    redrawn line."""
    off = bool(args.no_progress) or data_on_tty
    return Progress(total, label=label, enabled=False if off else None)


def with_note(exc: Exception, args: argparse.Namespace, path: str | None, note: str) -> Exception:
    """The failure ``exc`` of a transfer with ``path`` (``None``: stdin or stdout), as the
    error to raise with ``note`` (what was done, or written, before it) at the end of its
    one line: a :class:`CliError` for a failed call (worded by :func:`describe`), a file
    error or a :class:`CliError` of its own; anything else (a broken pipe, a bug) as it is."""
    if isinstance(exc, BrokenPipeError) and path is None:
        return exc
    if isinstance(exc, OSError):
        return file_error(path, exc, note)
    if isinstance(exc, TierdiskError):
        return CliError(describe(exc, args.server) + note)
    if isinstance(exc, CliError) and note:
        err = CliError(f"{exc}{note}")
        err.exit_code = exc.exit_code
        return err
    return exc


class CopyInterrupted(CliError):
    """Ctrl-C during a copy onto a volume: ``interrupted; <note>``, ``note`` saying what was
    written (:meth:`CopyProgress.note`), exit 130 as for any interrupt
    (:func:`~tierdisk.client.cli.main`; SIGTERM and SIGHUP reword it with their names)."""

    exit_code = 130

    def __init__(self, note: str) -> None:
        super().__init__(f"interrupted; {note}")
        self.note = note


class CopyProgress:
    """What a copy onto a volume from ``sector`` (``ss``-byte sectors) has written so far,
    for the message that ends a failed or refused copy (:meth:`note`). Offsets and lengths
    are in bytes from the start of the copy; requests run several at a time and finish in
    any order, so what is written need not be contiguous.

    Each request sent ends :meth:`done` or :meth:`failed`. After the first failure
    (:attr:`failure`) the copy sends no more requests, but lets those in flight finish, so
    that what they did is known: :meth:`raise_failure` then raises that first failure with
    the note."""

    def __init__(self, sector: int, ss: int) -> None:
        self.sector = sector
        self.ss = ss
        self.prefix = 0
        """Bytes written from the start of the copy, without a gap."""
        self.failure: Exception | None = None
        """The first failure, if any."""
        self._past: dict[int, int] = {}  # start -> end of requests done beyond the prefix
        self._reach = 0  # the end of the furthest request done, or maybe done in part

    def done(self, offset: int, length: int) -> None:
        """The request for ``length`` bytes at ``offset`` is written."""
        self._past[offset] = offset + length
        while self.prefix in self._past:
            self.prefix = self._past.pop(self.prefix)
        self._reach = max(self._reach, offset + length)

    def failed(self, exc: Exception, offset: int = 0, length: int = 0) -> None:
        """The copy failed with ``exc``: at the request for ``length`` bytes at ``offset``
        (``0``: before any request was sent). That request may have written part of its
        bytes, unless its failure is one that changed nothing
        (:func:`~tierdisk.client.errors.changed_nothing`)."""
        if length and not changed_nothing(exc):
            self._reach = max(self._reach, offset + length)
        if self.failure is None:
            self.failure = exc

    def cut(self, offset: int, length: int) -> None:
        """The request for ``length`` bytes at ``offset`` was in flight when the copy was
        interrupted: it may have been written in part."""
        self._reach = max(self._reach, offset + length)

    def interrupted(self) -> CliError:
        """The error that ends an interrupted copy: ``interrupted; `` and :meth:`note`."""
        return CopyInterrupted(self.note())

    def note(self) -> str:
        """What was written: ``nothing was written``, or ``the N bytes before were written
        from sector S``; then, if requests past those were written or may have been (in
        any order, or failing part way), ``; sectors A..B may have been written in part``
        (``A`` included, ``B`` not), after ``nothing was written for sure`` when no
        prefix was."""
        ss, first = self.ss, self.sector
        partly = ""
        if self._reach > self.prefix:
            lo, hi = first + self.prefix // ss, first + -(-self._reach // ss)
            partly = f"; sectors {lo}..{hi} may have been written in part"
        if self.prefix:
            return f"the {self.prefix} bytes before were written from sector {first}{partly}"
        if partly:  # not "nothing was written", then
            return f"nothing was written for sure{partly}"
        return "nothing was written"

    def raise_failure(self, args: argparse.Namespace, path: str | None) -> None:
        """Raise the first failure, if any, as one line (:func:`with_note`) ending with
        :meth:`note`; ``path`` is the file copied from (``None``: stdin)."""
        if self.failure is not None:
            raise with_note(self.failure, args, path, "; " + self.note())


@contextlib.contextmanager
def reported_with_bytes_out(args: argparse.Namespace, sink: Sink, total: int) -> Iterator[None]:
    """The failure of a copy out to ``sink`` (stdout, a pipe, a device), Ctrl-C included,
    as one line ending with how many of its ``total`` bytes went out before: ``; N of T
    bytes went to stdout before`` (a broken stdout pipe stays as it is: its reader went
    away)."""
    try:
        yield
    except Exception as exc:
        raise with_note(exc, args, sink.path, f"; {_bytes_out(sink, total)}") from None
    except asyncio.CancelledError:  # Ctrl-C, SIGTERM, SIGHUP
        raise CopyInterrupted(_bytes_out(sink, total)) from None


def _bytes_out(sink: Sink, total: int) -> str:
    where = "stdout" if sink.path is None else describe_file(sink.path)
    return f"{sink.written} of {total} bytes went to {where} before"
