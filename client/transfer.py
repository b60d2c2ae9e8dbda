"""The verbs that move bytes between a volume and a file, a device, a pipe or stdin/stdout:
``read``, ``write``, ``import`` and ``export`` of the ``tierdisk`` command (DESIGN.md §7).

Each is a :data:`tierdisk.client.cli.Verb`: ``await verb(client, args)`` returns the exit
status, ``args`` being the parsed command line (:func:`tierdisk.client.cli.build_parser`).
A failure is raised for :func:`tierdisk.client.cli.main` to report in one line: a
:class:`~tierdisk.client.cli_errors.CliError` naming the file (or stdin, stdout), a
:class:`~tierdisk.client.errors.TierdiskError` from the server, or a
:class:`BrokenPipeError` when the reader of stdout went away.

Files, devices, pipes and ``-``
    ``-`` (as IMAGE, ``-i FILE`` or ``-o FILE``) is stdin or stdout; ``./-`` names a file.

    ``read`` writes its COUNT sectors in order, to stdout or to ``-o FILE`` (created, or
    truncated first).

    ``write`` (from SECTOR) and ``import`` (from sector 0) read a regular file or a block
    device (``-i FILE``, IMAGE, or stdin redirected from one) from its current position to
    its end. Its length is known up front, so one that is not a whole number of sectors,
    that reaches past the end of the volume, or (``import``) that is larger than the volume
    is refused before anything is written. A named FILE must be one of those two. Stdin
    that is neither (a pipe, a terminal) has a length known only at its end, so it is
    written as it arrives: the chunk that ends in part of a sector, or reaches past the end
    of the volume, is not written, and is refused once the chunks before it are; the
    message says how many bytes were written (:func:`_stream_in`; see below). Every sector
    read is written, zeros included, with one exception: ``import`` from a regular file
    (named, or on stdin) is sparse. Its holes (``lseek`` ``SEEK_DATA``/``SEEK_HOLE``; a filesystem
    without holes reports none) must read back as zeros, since the import replaces what the
    volume held there: on a volume whose ``unmap_behavior`` is ``ZEROES`` they are unmapped,
    so they take no space; on any other they are written as zeros, as before. Only whole
    sectors are unmapped: the part of a sector that a hole shares with data is written with
    that data, and a hole shorter than 64 KiB is written as zeros with the data around it
    (:data:`_MIN_HOLE`), so a fragmented file does not turn into many tiny requests. Chunks
    of data that happen to be zeros are written like any other.

    ``export`` writes all ``sector_count * sector_size`` bytes of the volume. Into a
    regular file (or a new one) it is sparse, and IMAGE is replaced, never written in
    place: a new file ``.IMAGE.tierdisk-export-XXXXXXXX`` in IMAGE's folder (created
    exclusively) is sized to the volume at once and only the allocated runs are written
    where they belong; unallocated runs, and chunks that read back all zeros, are left as
    holes (the file reads the same); then it is fsynced, renamed over IMAGE, and the folder
    fsynced. Through a symlink, the file it leads to is replaced and the link kept. The new
    file gets the old one's permission bits (and owner and group, where allowed); a new
    IMAGE those of any new file. Since IMAGE is not opened, exporting onto the very file a
    server's layer reads the volume from does not lose it: the server keeps reading the
    old file, which holds the same bytes (writes it takes later land in that old file,
    not in the new one, which it opens on restart). Until the rename both files take
    space; hard links to the old file keep the old bytes. Into a block device, a pipe, a character
    device or stdout (IMAGE ``-``, ``/dev/stdout``) every byte is written in order, in
    place, zeros for the holes, with no truncating or seeking; a block device is fsynced
    too.

A failed write, import or export
    ``write`` and ``import`` stop sending requests at the first failure, let those in flight
    finish, and end the message with what was written: ``nothing was written``, or ``the N
    bytes before were written from sector S``, then ``; sectors A..B may have been written
    in part`` for requests past those that were written out of order or failed part way
    (:class:`_Written`); from a file, from stdin, or refused at a bad chunk from a pipe
    alike.

    A failed export (Ctrl-C too) into a regular file removes its temporary file and leaves
    IMAGE as it was, or not there if it was not; the message ends with that (``; 'img' is
    unchanged``, ``; 'img' was not created``). A device or a pipe is left as it is (a
    regular file reached through ``/proc``, such as ``/dev/stdout`` redirected to a file,
    is written in place and emptied: ``; emptied the partial file …``); so is the ``-o
    FILE`` of a failed ``read``.

Chunking
    Each request carries at most ``client.max_io`` bytes, a whole number of sectors
    (:func:`~tierdisk.client.chunking.sectors_per_chunk`; 1 MiB by default), with
    ``client.max_in_flight`` requests running at a time. Chunks of a regular file or block
    device are read (``pread``) and written in any order. An export reads the allocated
    runs in windows (:func:`~tierdisk.client.chunking.plan_windows`): runs less than
    :data:`_GAP_BYTES` apart share one request, so a fragmented volume is not one request
    per run; a sparse export writes each run's bytes where they belong (``pwrite``, in any
    order; all-zero runs stay holes), an in-order one the whole window. The hole unmaps of
    a sparse import (at most :data:`_UNMAP_MAX` bytes each) share the ``max_in_flight``
    slots with its data chunks. A pipe or a terminal is read one chunk at a time, in
    order, while earlier chunks are being written. ``read`` uses
    :meth:`~tierdisk.client.aio.AsyncVolume.stream_read`, which reads ahead in order.

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
import errno
import fcntl
import os
import secrets
import stat
import sys
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple

from .aio import AsyncClient, AsyncVolume
from .chunking import (
    ReadWindow,
    plan_chunks,
    plan_windows,
    run_bounded,
    run_ordered,
    sectors_per_chunk,
)
from .cli_errors import CliError, describe, describe_file, file_error, stdout_error
from .errors import (
    FailedPrecondition,
    Interrupted,
    InvalidArgument,
    NoSpace,
    OutOfRange,
    PermissionDenied,
    TierdiskError,
    Unauthenticated,
    Unimplemented,
    VolumeNotFound,
)
from .models import AllocationExtent, UnmapBehavior, VolumeInfo
from .progress import Progress

__all__ = ["STD_STREAM", "export_image", "import_image", "read_sectors", "write_sectors"]

STD_STREAM = "-"
"""As IMAGE (``import``/``export``), ``-i`` or ``-o``: stdin or stdout (``./-`` names a file)."""


# -- shared ------------------------------------------------------------------------------


def _progress(
    args: argparse.Namespace, total: int | None, label: str, *, data_on_tty: bool = False
) -> Progress:
    """The bar of a transfer of ``total`` bytes (``None``: unknown, from a pipe): drawn on
    stderr when that is a terminal (DESIGN.md §7). Never with ``--no-progress``, nor when the
    data itself is on a terminal (``data_on_tty``: ``read`` to a terminal stdout, ``write``
    from a terminal stdin): raw sectors, or the echo of typed input, would mix with the
    redrawn line."""
    off = bool(args.no_progress) or data_on_tty
    return Progress(total, label=label, enabled=False if off else None)


def _noted(exc: Exception, args: argparse.Namespace, path: str | None, note: str) -> Exception:
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


_NOT_APPLIED = (
    VolumeNotFound,
    OutOfRange,
    InvalidArgument,
    FailedPrecondition,
    Unauthenticated,
    PermissionDenied,
    NoSpace,
    Unimplemented,
)
"""Failures of a write or unmap request that changed nothing (DESIGN.md §2: a read-only
volume, a range past the end, out of space, …; a server that is not tierdisk); any other
failure (a timeout, a lost connection, a storage error) may come after part of the request
was written."""


class _Interrupted(CliError):
    """Ctrl-C during a copy onto a volume: ``interrupted; <what was written>``, exit 130
    as for any interrupt (:func:`~tierdisk.client.cli.main`)."""

    exit_code = 130


class _Written:
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
        bytes, unless its failure is one of :data:`_NOT_APPLIED`."""
        if length and not isinstance(exc, _NOT_APPLIED):
            self._reach = max(self._reach, offset + length)
        if self.failure is None:
            self.failure = exc

    def cut(self, offset: int, length: int) -> None:
        """The request for ``length`` bytes at ``offset`` was in flight when the copy was
        interrupted: it may have been written in part."""
        self._reach = max(self._reach, offset + length)

    def interrupted(self) -> CliError:
        """The error that ends an interrupted copy: ``interrupted; `` and :meth:`note`."""
        return _Interrupted(f"interrupted; {self.note()}")

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
        """Raise the first failure, if any, as one line (:func:`_noted`) ending with
        :meth:`note`; ``path`` is the file copied from (``None``: stdin)."""
        if self.failure is not None:
            raise _noted(self.failure, args, path, "; " + self.note())


# -- files and streams -------------------------------------------------------------------


def _open_file(path: str, flags: int, mode: int = 0o666) -> int:
    """``os.open(path, flags, mode)``, close-on-exec; a failure is a :class:`CliError`
    naming ``path``."""
    try:
        return os.open(path, flags | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as err:
        raise file_error(path, err) from None


def _isatty(stream: BinaryIO) -> bool:
    """Whether ``stream`` is a terminal; ``False`` when it cannot tell."""
    try:
        return stream.isatty()
    except (OSError, ValueError):  # closed, or no file behind it
        return False


def _fileno(stream: BinaryIO) -> int | None:
    """The file descriptor behind ``stream``, or ``None`` if there is none."""
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # e.g. io.BytesIO in place of stdin
        return None


def _std(path: str | None) -> str | None:
    """``path`` as given to ``-i``/``-o``/IMAGE, ``None`` for stdin or stdout (``-``)."""
    return None if path == STD_STREAM else path


class _Sink:
    """Where ``read`` and ``export`` put bytes in order: stdout (``path`` ``None``) or the
    file open as ``fd``. A failed write raises a one-line :class:`CliError` naming it (a
    broken stdout pipe stays a :class:`BrokenPipeError`: see :func:`tierdisk.client.cli.main`)."""

    def __init__(self, fd: int | None = None, path: str | None = None) -> None:
        self.fd = fd
        self.path = path

    def _failed(self, err: OSError) -> OSError | CliError:
        return stdout_error(err) if self.fd is None else file_error(self.path, err)

    def write(self, data: bytes | memoryview) -> None:
        try:
            if self.fd is None:
                sys.stdout.buffer.write(data)
                return
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as err:
            raise self._failed(err) from None

    def flush(self) -> None:
        if self.fd is None:
            try:
                sys.stdout.buffer.flush()
            except OSError as err:
                raise self._failed(err) from None


@contextlib.contextmanager
def _closing(fd: int, path: str) -> Iterator[int]:
    """Close ``fd`` (the file ``path``) at the end; a failed close is a failed write."""
    try:
        yield fd
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    try:
        os.close(fd)
    except OSError as err:
        raise file_error(path, err) from None


# -- read --------------------------------------------------------------------------------


async def read_sectors(client: AsyncClient, args: argparse.Namespace) -> int:
    """``read VOL SECTOR COUNT [-o FILE]``: the COUNT sectors from SECTOR, in order, to
    stdout or to FILE (created, or truncated first). Refused before anything is written if
    they reach past the end of the volume."""
    vol = client.volume(args.volume)
    info = await vol.info()
    info.check_fits(args.sector, args.count)
    path = _std(args.output)
    total = args.count * info.sector_size
    label = f"read {vol.name}"

    async def copy(sink: _Sink, bar: Progress) -> None:
        with bar:
            async for _sector, data in vol.stream_read(args.sector, args.count):
                sink.write(data)
                bar.advance(len(data))
        sink.flush()

    if path is None:
        # The bar is on stderr (if a terminal), so `read … | gzip > img.gz` shows one; but
        # not when stdout is a terminal too: raw sectors and a redrawn line would mix.
        data_on_tty = _isatty(sys.stdout.buffer)
        await copy(_Sink(), _progress(args, total, label, data_on_tty=data_on_tty))
        return 0
    with _closing(_open_file(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), path) as fd:
        await copy(_Sink(fd, path), _progress(args, total, label))
    return 0


# -- write and import --------------------------------------------------------------------


def _whole_sectors(path: str | None, size: int, sector_size: int) -> int:
    """``size`` bytes of the file ``path`` (``None``: stdin) in ``sector_size``-byte
    sectors; a :class:`CliError` if that is not a whole number."""
    if size % sector_size:
        raise CliError(
            f"{describe_file(path)}: {size} bytes is not a whole number of "
            f"{sector_size}-byte sectors"
        )
    return size // sector_size


async def write_sectors(client: AsyncClient, args: argparse.Namespace) -> int:
    """``write VOL SECTOR [-i FILE] [--fua]``: whole sectors from stdin or FILE onto the
    volume from SECTOR (see :func:`_copy_from`)."""
    vol = client.volume(args.volume)
    return await _copy_from(client, args, vol, _std(args.input), args.sector, "write")


async def import_image(client: AsyncClient, args: argparse.Namespace) -> int:
    """``import VOL IMAGE``: IMAGE (``-``: stdin) onto the volume from sector 0; it must be
    a whole number of sectors and no larger than the volume, which keeps its size."""
    vol = client.volume(args.volume)
    return await _copy_from(client, args, vol, _std(args.image), 0, "import")


async def _copy_from(
    client: AsyncClient,
    args: argparse.Namespace,
    vol: AsyncVolume,
    path: str | None,
    sector: int,
    verb: str,
) -> int:
    """Copy the file ``path`` (``None``: stdin) onto the volume from ``sector``."""
    if path is not None:
        return await _copy_in(client, args, vol, path, sector, verb)
    stdin = sys.stdin.buffer
    fd = _fileno(stdin)
    if fd is not None and _sized(fd):
        # `write … < img`: the size is known, so a bad length is refused before anything is
        # written, and the bar has a total.
        return await _copy_fd_in(client, args, vol, fd, None, sector, verb)
    return await _stream_in(client, args, vol, stdin, sector, verb)


async def _copy_in(
    client: AsyncClient,
    args: argparse.Namespace,
    vol: AsyncVolume,
    path: str,
    sector: int,
    verb: str,
) -> int:
    """Copy the file ``path`` onto the volume from ``sector`` (see :func:`_copy_fd_in`)."""
    fd = _open_file(path, os.O_RDONLY)  # before any call: a missing file needs no server
    try:
        return await _copy_fd_in(client, args, vol, fd, path, sector, verb)
    finally:
        os.close(fd)


async def _copy_fd_in(
    client: AsyncClient,
    args: argparse.Namespace,
    vol: AsyncVolume,
    fd: int,
    path: str | None,
    sector: int,
    verb: str,
) -> int:
    """Copy the regular file or block device open as ``fd`` (``path``; ``None``: stdin), from
    its current position to its end, onto the volume from ``sector``: ``max_in_flight``
    requests of ``max_io`` bytes at a time, with a bar that has a total. Every chunk is
    written, zeros included, except that ``import`` from a regular file skips its holes
    (:func:`_pieces`): unmapped where the volume's unmap reads back as zeros, written as
    zeros elsewhere. On success the position is left at the end, as a plain read would.
    A failure stops the copy (the requests in flight finish) and its message says what was
    written (:class:`_Written`)."""
    try:
        start = os.lseek(fd, 0, os.SEEK_CUR)
        size = max(0, _file_size(fd, path) - start)
        sparse = verb == "import" and stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError as err:
        raise file_error(path, err) from None
    info = await vol.info()
    ss = info.sector_size
    count = _whole_sectors(path, size, ss)
    if verb == "import" and count > info.sector_count:
        raise CliError(
            f"{describe_file(path)}: {size} bytes is larger than volume {vol.name!r} "
            f"({info.size_bytes} bytes)"
        )
    info.check_fits(sector, count)
    fua = bool(getattr(args, "fua", False))
    per_chunk = sectors_per_chunk(client.max_io, ss)
    runs = [(start, start + size)]  # the whole file is data, unless a sparse import finds holes
    if sparse:
        try:
            runs = await asyncio.to_thread(_data_runs, fd, start, start + size)
            if os.fstat(fd).st_size < start + size:  # past its new end, all looked like holes
                raise CliError(f"{describe_file(path)}: shrank while being read")
        except OSError as err:
            raise file_error(path, err) from None
    unmap = info.unmap_behavior == UnmapBehavior.ZEROES
    pieces = _pieces(_sector_runs(runs, start, ss, count), count, per_chunk, unmap, ss)
    zeros = bytes(per_chunk * ss) if not unmap and any(not p.data for p in pieces) else b""

    written = _Written(sector, ss)

    async def one(piece: _Piece) -> None:
        if written.failure is not None:  # no request is sent after a failure
            return
        length = piece.sector_count * ss
        offset = piece.offset * ss
        at = sector + piece.offset
        if piece.data:
            try:
                data = await asyncio.to_thread(os.pread, fd, length, start + offset)
            except OSError as err:
                written.failed(file_error(path, err))
                return
            if len(data) != length:
                written.failed(CliError(f"{describe_file(path)}: shrank while being read"))
                return
        try:
            if piece.data:
                await vol.write(at, data, fua=fua)
            elif unmap:
                await vol.unmap(at, piece.sector_count)
            else:
                await vol.write(at, zeros if length == len(zeros) else zeros[:length], fua=fua)
        except asyncio.CancelledError:
            written.cut(offset, length)
            raise
        except Exception as exc:
            written.failed(exc, offset, length)
            return
        written.done(offset, length)
        bar.advance(length)

    with _progress(args, size, f"{verb} {vol.name}") as bar:
        try:
            await run_bounded(pieces, one, client.max_in_flight)
        except asyncio.CancelledError:  # Ctrl-C: say what was written
            raise written.interrupted() from None
        except Interrupted as exc:  # a request cancelled underneath: a failure, noted
            written.failed(exc)
    written.raise_failure(args, path)
    os.lseek(fd, start + size, os.SEEK_SET)
    return 0


_MIN_HOLE = 64 * 1024
"""Bytes: a hole of a sparse import shorter than this is written as zeros together with the
data around it, as one run; a filesystem with fragmented small holes (4 KiB here and there)
would otherwise turn its data into many small requests, each costing a round trip."""

_GAP_BYTES = 128 * 1024
"""Bytes: allocated runs of an export closer than this are read by one request, the gap
with them (read as zeros, not written to a sparse file): a 1 MiB read costs about as much
as two small ones."""

_UNMAP_MAX = 1 << 30
"""Bytes: the most one unmap request of a sparse import covers (whole sectors), so that no
single call outlasts the per-call timeout on a layer that must write zeros to unmap."""

_SEEK_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}
"""``lseek`` errors meaning "SEEK_DATA/SEEK_HOLE not supported here"."""


class _Piece(NamedTuple):
    """A request of a copy onto a volume: ``sector_count`` sectors ``offset`` sectors into
    the source; ``data``: read from the source and written, else a hole (unmapped or
    written as zeros)."""

    offset: int
    sector_count: int
    data: bool


def _data_runs(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The runs ``(a, b)`` of bytes in ``[start, end)`` of the regular file open as ``fd``
    that hold data, in order; the rest are holes (read as zeros). Found with ``lseek``
    ``SEEK_DATA``/``SEEK_HOLE`` (the file position is put back at ``start``); where those
    are not supported the rest of the file counts as data (always correct, just not sparse)."""
    seek_data = getattr(os, "SEEK_DATA", None)
    seek_hole = getattr(os, "SEEK_HOLE", None)
    if seek_data is None or seek_hole is None:
        return [(start, end)] if start < end else []
    runs: list[tuple[int, int]] = []
    pos = start
    try:
        while pos < end:
            try:
                a = os.lseek(fd, pos, seek_data)
                b = os.lseek(fd, a, seek_hole) if a < end else end
            except OSError as err:
                if err.errno == errno.ENXIO:  # no data from pos to the end of the file
                    break
                if err.errno in _SEEK_UNSUPPORTED:
                    runs.append((pos, end))
                    break
                raise
            if a >= end:
                break
            b = min(b, end)
            if b <= a:  # a filesystem that says otherwise: take the rest as data, to be safe
                b = end
            runs.append((a, b))
            pos = b
    finally:
        os.lseek(fd, start, os.SEEK_SET)
    return runs


def _sector_runs(
    runs: list[tuple[int, int]], start: int, ss: int, count: int
) -> list[tuple[int, int]]:
    """The data ``runs`` (byte offsets in the file, the copy starting at ``start``) as runs of
    sectors ``[lo, hi)`` of the ``count``-sector copy: widened outward to whole sectors (a
    sector that holds any data is written whole; the holes shrink inward), and joined where
    what lies between them is shorter than :data:`_MIN_HOLE`, the two ends included."""
    gap = max(1, _MIN_HOLE // ss)
    out: list[tuple[int, int]] = []
    for a, b in runs:
        lo, hi = (a - start) // ss, -(-(b - start) // ss)
        if lo - (out[-1][1] if out else 0) < gap:
            lo = out.pop()[0] if out else 0
        out.append((lo, min(count, hi)))
    if out and count - out[-1][1] < gap:
        out[-1] = (out[-1][0], count)
    return out


def _pieces(
    data: list[tuple[int, int]], count: int, per_chunk: int, unmap: bool, ss: int
) -> list[_Piece]:
    """The requests, in order, that copy ``count`` sectors whose ``data`` runs (sorted, not
    touching) are written in chunks of ``per_chunk`` sectors; the holes between them are
    unmapped (``unmap``) in pieces of at most :data:`_UNMAP_MAX` bytes, or written as zeros
    in chunks of ``per_chunk``."""
    hole_chunk = max(1, _UNMAP_MAX // ss) if unmap else per_chunk
    pieces: list[_Piece] = []
    pos = 0
    for lo, hi in [*data, (count, count)]:
        pieces += (
            _Piece(c.sector, c.sector_count, False) for c in plan_chunks(pos, lo - pos, hole_chunk)
        )
        pieces += (
            _Piece(c.sector, c.sector_count, True) for c in plan_chunks(lo, hi - lo, per_chunk)
        )
        pos = hi
    return pieces


def _sized(fd: int) -> bool:
    """Whether ``fd`` is a regular file or a block device: its length is known up front."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode) or stat.S_ISBLK(mode)


def _file_size(fd: int, path: str | None) -> int:
    """The length in bytes of the regular file or block device open as ``fd`` (``path``;
    ``None``: stdin); a :class:`CliError` for anything else."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    if not stat.S_ISREG(st.st_mode):
        raise CliError(f"{describe_file(path)}: not a regular file or block device")
    return st.st_size


def _read_up_to(src: BinaryIO, size: int) -> bytes:
    """``size`` bytes from ``src``, fewer only at its end. One raw read at a time (``read1``):
    a pipe returns less per read, and a terminal's end (Ctrl-D) is one empty read, not a
    lasting state, so it must be seen, not absorbed by a buffered ``read(size)``."""
    read1 = getattr(src, "read1", src.read)
    parts: list[bytes] = []
    got = 0
    while got < size:
        part: bytes = read1(size - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


async def _stream_in(
    client: AsyncClient,
    args: argparse.Namespace,
    vol: AsyncVolume,
    src: BinaryIO,
    sector: int,
    verb: str,
) -> int:
    """``write`` (or ``import``) from a pipe (or a terminal): its length is known only at
    its end, so the data is written as it arrives, ``max_io`` bytes a request with
    ``max_in_flight`` in flight, never held whole; the bar shows the bytes written and the
    rate, no total.

    A chunk that ends in part of a sector or would reach past the end of the volume is not
    written, and is reported once the chunks before it are all written; the message says
    how many bytes that is. So input of up to one chunk (1 MiB by default) is refused before
    anything is written, as is anything starting past the end. A failure (of a write, or of
    reading stdin) stops the copy likewise, and its message says what was written
    (:class:`_Written`)."""
    info = await vol.info()
    ss = info.sector_size
    info.check_fits(sector, 0)
    chunk_bytes = sectors_per_chunk(client.max_io, ss) * ss
    fua = bool(getattr(args, "fua", False))
    lock = asyncio.Lock()  # one reader at a time: chunks are taken, and placed, in order
    taken = 0  # bytes taken from src so far
    ended = False
    written = _Written(sector, ss)
    refusal: tuple[str, bool] | None = None  # its message but the note; past the end?

    async def worker(_: int) -> None:
        nonlocal taken, ended, refusal
        while True:
            async with lock:
                if ended or written.failure is not None:
                    return
                try:
                    data = await asyncio.to_thread(_read_up_to, src, chunk_bytes)
                except OSError as err:
                    ended = True
                    written.failed(file_error(None, err))
                    return
                offset, taken = taken, taken + len(data)
                ended = len(data) < chunk_bytes
                if not data:
                    return
                at, count = sector + offset // ss, len(data) // ss
                if len(data) % ss:
                    ended = True
                    text = f"stdin: {taken} bytes is not a whole number of {ss}-byte sectors; "
                    refusal = (text, False)
                    return
                if at + count > info.sector_count:
                    ended = True
                    text = (
                        f"stdin: sectors {at}..{at + count} reach past the end "
                        f"({info.sector_count} sectors); "
                    )
                    refusal = (text, True)
                    return
            try:
                await vol.write(at, data, fua=fua)
            except asyncio.CancelledError:
                written.cut(offset, len(data))
                raise
            except Exception as exc:
                written.failed(exc, offset, len(data))
                return
            written.done(offset, len(data))
            bar.advance(len(data))

    label = f"{verb} {vol.name}"
    with _progress(args, None, label, data_on_tty=_isatty(src)) as bar:
        try:
            await run_bounded(range(client.max_in_flight), worker, client.max_in_flight)
        except asyncio.CancelledError:  # Ctrl-C: say what was written
            raise written.interrupted() from None
        except Interrupted as exc:  # a request cancelled underneath: a failure, noted
            written.failed(exc)
    written.raise_failure(args, None)
    if refusal is not None:  # every chunk before it is written: the note says how many bytes
        text, past_end = refusal
        if past_end:
            raise OutOfRange(text + written.note(), volume=vol.name)
        raise CliError(text + written.note())
    return 0


# -- export ------------------------------------------------------------------------------


async def export_image(client: AsyncClient, args: argparse.Namespace) -> int:
    """``export VOL IMAGE``: the whole volume into IMAGE (``-``: stdout). Into a regular
    file (or a new one) it is sparse and written under a temporary name in the same folder,
    renamed over IMAGE only once complete and fsynced, so a failure or Ctrl-C leaves an
    existing IMAGE as it was (:func:`_export_replacing`). Into anything else (a device, a
    pipe, stdout) every byte is written in order, in place (see the module's notes)."""
    vol = client.volume(args.volume)
    info = await vol.info()
    extents = await vol.allocation(0, info.sector_count)
    label = f"export {vol.name}"
    path = _std(args.image)
    if path is None:  # stdout: every byte in order, whatever it is (a pipe, a file, …)
        data_on_tty = _isatty(sys.stdout.buffer)
        with _progress(args, info.size_bytes, label, data_on_tty=data_on_tty) as bar:
            await _export_in_order(client, vol, info, extents, _Sink(), bar)
        return 0
    target = _replaceable(path)
    if target is not None:
        await _export_replacing(client, args, vol, info, extents, path, target, label)
    else:
        await _export_in_place(client, args, vol, info, extents, path, label)
    return 0


_IN_PLACE_FOLDERS = ("/dev", "/proc", "/sys")
"""Folders (with those below them) whose entries an export writes in place: it never
renames a file over, nor creates, a name there."""


def _in_place_folder(path: str) -> bool:
    """Whether ``path`` lies in one of :data:`_IN_PLACE_FOLDERS`, links followed."""
    folder = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    return any(folder == top or folder.startswith(top + "/") for top in _IN_PLACE_FOLDERS)


def _replaceable(path: str) -> str | None:
    """The regular file that an export to ``path`` replaces (``path`` itself, or where its
    symlinks lead; it may not exist yet), or ``None`` to write ``path`` in place: it is a
    device, a pipe, a socket, a folder, or lies in ``/dev``, ``/proc`` or ``/sys``
    (:data:`_IN_PLACE_FOLDERS`: ``/dev/stdout`` and ``/dev/fd/N`` lead to someone's open
    descriptor, not a name to replace). A symlink loop is left for the open in place to
    report."""
    for _ in range(40):  # the kernel's own limit on symlinks followed (ELOOP)
        if _in_place_folder(path):
            return None
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return path  # a new file (or a dangling symlink's target)
        except OSError:
            return None  # e.g. a folder on the way is not one: the open reports it
        if stat.S_ISREG(st.st_mode):
            return path
        if not stat.S_ISLNK(st.st_mode):
            return None
        try:
            path = os.path.join(os.path.dirname(path), os.readlink(path))
        except OSError:
            return None
    return None


_LAYER_FILE_LOCKS: tuple[tuple[str, str], ...] = (
    ("", ""),  # a raw or sparse layer's data file: flock-ed itself
    ("", ".lock"),  # a sqlite layer's database: its "<db>.lock" is
    (".map", ""),  # a sparse layer's map: its data file is
    (".map.tmp", ""),
    ("-wal", ".lock"),  # a sqlite database's journals: the database's lock file is
    ("-shm", ".lock"),
    ("-journal", ".lock"),
)
"""How a tierdisk server's layer files are locked while it runs: ``(suffix, lock)`` means
a file named ``STEM + suffix`` belongs to a layer while ``STEM + lock`` is ``flock``-ed
(the layouts are in the ``raw``, ``sparse`` and ``sqlite`` layers' docstrings)."""


def _lock_files(target: str) -> list[str]:
    """The files whose ``flock`` shows that ``target`` is a running layer's file."""
    found = []
    for suffix, lock in _LAYER_FILE_LOCKS:
        if target.endswith(suffix) and len(target) > len(suffix):
            stem = target[: len(target) - len(suffix)]
            if stem + lock not in found:
                found.append(stem + lock)
    return found


def _locked(path: str) -> bool:
    """Whether another process holds an ``flock`` on ``path`` (``False`` when it cannot be
    opened or the filesystem has no ``flock``: nothing to learn)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # drops the lock, if we took it
    return False


def _refuse_a_locked_file(path: str, target: str) -> None:
    """Refuse to replace ``target`` (IMAGE ``path``) while it is a running tierdisk layer's
    file: a ``raw`` or ``sparse`` data file, a ``sparse`` map, a ``sqlite`` database or its
    journals (:data:`_LAYER_FILE_LOCKS`), seen by the ``flock`` the server holds. The server
    would go on writing into the file replaced, and every write it acknowledged after the
    export would be gone at its next start, which opens the new one (or, for a map or a
    database, would find the layer unreadable)."""
    for lock in _lock_files(target):
        if _locked(lock):
            whose = "" if lock == target else f" ({describe_file(lock)} is)"
            raise CliError(
                f"{describe_file(path)} is locked by another process{whose}: a tierdisk "
                "server's layer file? Replacing it would lose every write that process "
                "makes to it from now on; export to another file, or stop that process "
                "first"
            )


async def _export_replacing(
    client: AsyncClient,
    args: argparse.Namespace,
    vol: AsyncVolume,
    info: VolumeInfo,
    extents: list[AllocationExtent],
    path: str,
    target: str,
    label: str,
) -> None:
    """Export into the regular file ``target`` (IMAGE ``path``, or where its symlinks
    lead) by replacing it: the volume is written, sparse, into a new file
    ``.NAME.tierdisk-export-XXXXXXXX`` beside it (created exclusively; :func:`_temp_file`),
    fsynced, renamed over ``target``, and the folder fsynced. ``target`` is never written,
    let alone truncated, and one another process holds an ``flock`` on (a server's layer
    file) is refused (:func:`_refuse_a_locked_file`). On any failure, Ctrl-C included, the
    temporary file is removed and ``target`` is as it was (or still does not exist); the
    message ends with that (``; 'img' is unchanged``)."""
    try:
        old: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        old = None
    except OSError as err:
        raise file_error(path, err) from None
    if old is not None:
        _refuse_a_locked_file(path, target)
    fd, temp = _temp_file(path, target, old)
    renamed = False
    try:
        with _progress(args, info.size_bytes, label) as bar:
            await _export_sparse(client, vol, info, extents, fd, path, bar)
        os.fsync(fd)
        fd, closing = -1, fd
        os.close(closing)
        os.rename(temp, target)
        renamed = True
        _fsync_folder(os.path.dirname(target))
    except BaseException as exc:
        note = ""
        if not renamed:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
            note = _remove_temp(temp, path, old)
        if isinstance(exc, Exception):
            raise _noted(exc, args, path, note) from None
        raise


def _temp_file(path: str, target: str, old: os.stat_result | None) -> tuple[int, str]:
    """A new, empty file beside ``target`` (IMAGE ``path``) to export into:
    ``(fd, its path)``, created exclusively under a random name, so no other file is ever
    opened. It gets the permission bits of the ``old`` file it replaces (and its owner and
    group, where the system allows that), before a byte is written; for a new IMAGE, those
    of any new file (``0o666`` less the umask)."""
    folder, name = os.path.split(target)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        temp = os.path.join(folder, f".{name}{_TEMP_INFIX}{secrets.token_hex(4)}")
        try:
            fd = os.open(temp, flags, 0o666)
            break
        except FileExistsError:
            continue
        except OSError as err:
            if old is not None:  # IMAGE is there: it is its folder that refuses
                raise CliError(
                    f"{describe_file(path)}: cannot create a temporary file beside it to "
                    f"export into: {err.strerror or err}"
                ) from None
            raise file_error(path, err) from None
    else:
        raise CliError(f"{describe_file(path)}: cannot find a free temporary name beside it")
    if old is not None:
        try:
            with contextlib.suppress(PermissionError):  # another owner: only root may
                os.fchown(fd, old.st_uid, old.st_gid)
            os.fchmod(fd, stat.S_IMODE(old.st_mode))
        except OSError as err:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise file_error(path, err) from None
    return fd, temp


_TEMP_INFIX = ".tierdisk-export-"
"""In the name of the file an export writes before renaming it over IMAGE:
``.IMAGE.tierdisk-export-XXXXXXXX`` (eight random hex digits), in IMAGE's folder."""


def _remove_temp(temp: str, path: str, old: os.stat_result | None) -> str:
    """After a failed export: remove its temporary file ``temp``. Returns the note for the
    error message: IMAGE (``path``) is unchanged, or was not created; or that ``temp`` is
    left behind, if it could not be removed."""
    try:
        os.unlink(temp)
    except FileNotFoundError:
        pass
    except OSError as err:
        return f"; could not remove the partial file {temp!r}: {err.strerror or err}"
    return f"; {path!r} is unchanged" if old is not None else f"; {path!r} was not created"


def _fsync_folder(folder: str) -> None:
    """fsync the folder ``folder`` (``""``: the current one), so a rename in it is durable.
    A filesystem that cannot fsync a folder (``EINVAL``) is left at that."""
    fd = os.open(folder or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def _windows(
    client: AsyncClient, info: VolumeInfo, extents: list[AllocationExtent]
) -> list[ReadWindow]:
    """The read requests of an export: the allocated runs, neighbours closer than
    :data:`_GAP_BYTES` sharing one request of at most ``client.max_io`` bytes."""
    ss = info.sector_size
    return list(
        plan_windows(
            ((e.sector, e.end) for e in extents if e.allocated),
            sectors_per_chunk(client.max_io, ss),
            _GAP_BYTES // ss,
        )
    )


def _write_runs(fd: int, data: bytes, window: ReadWindow, ss: int) -> None:
    """``pwrite`` each run of ``window`` from ``data`` (the window's bytes) where it belongs
    in the file; an all-zero run is left as a hole (the file reads the same)."""
    view = memoryview(data)
    for a, b in window.runs:
        lo, hi = (a - window.sector) * ss, (b - window.sector) * ss
        if data.count(0, lo, hi) == hi - lo:
            continue  # all zeros: the hole reads the same
        offset = a * ss
        while lo < hi:  # a short write (rare for a regular file) goes on where it stopped
            n = os.pwrite(fd, view[lo:hi], offset)
            lo += n
            offset += n


async def _export_sparse(
    client: AsyncClient,
    vol: AsyncVolume,
    info: VolumeInfo,
    extents: list[AllocationExtent],
    fd: int,
    path: str,
    bar: Progress,
) -> None:
    """Export into the empty regular file open as ``fd``: sized to the volume at once, all
    holes; then the allocated runs are written where they belong, a few windows at a
    time."""
    ss = info.sector_size
    os.ftruncate(fd, info.size_bytes)
    bar.advance(sum(e.sector_count for e in extents if not e.allocated) * ss)

    async def one(window: ReadWindow) -> None:
        data = await vol.read(window.sector, window.sector_count)
        await asyncio.to_thread(_write_runs, fd, data, window, ss)
        bar.advance(sum(b - a for a, b in window.runs) * ss)

    await run_bounded(_windows(client, info, extents), one, client.max_in_flight)


async def _export_in_order(
    client: AsyncClient,
    vol: AsyncVolume,
    info: VolumeInfo,
    extents: list[AllocationExtent],
    sink: _Sink,
    bar: Progress,
) -> None:
    """Export as one stream of ``sector_count * sector_size`` bytes: the windows of
    allocated runs read ahead in order (the gaps inside a window read as zeros), zeros
    written between them."""
    ss = info.sector_size
    zeros = memoryview(bytes(sectors_per_chunk(client.max_io, ss) * ss))

    def fill(nbytes: int) -> None:
        while nbytes:
            n = min(nbytes, len(zeros))
            sink.write(zeros[:n])
            bar.advance(n)
            nbytes -= n

    async def one(window: ReadWindow) -> bytes:
        return await vol.read(window.sector, window.sector_count)

    done = 0  # sectors written so far
    windows = run_ordered(_windows(client, info, extents), one, client.max_in_flight)
    try:
        async for window, data in windows:
            fill((window.sector - done) * ss)
            sink.write(data)
            bar.advance(len(data))
            done = window.sector + window.sector_count
    finally:
        await windows.aclose()
    fill((info.sector_count - done) * ss)
    sink.flush()


async def _export_in_place(
    client: AsyncClient,
    args: argparse.Namespace,
    vol: AsyncVolume,
    info: VolumeInfo,
    extents: list[AllocationExtent],
    path: str,
    label: str,
) -> None:
    """Export into ``path`` as it is: a device, a pipe, a character device, or a file
    reached through ``/proc`` (``/dev/stdout`` redirected to a file) — never created,
    truncated, or seeked, except that a regular file (the last case) is truncated and
    written sparse, and emptied again if the export fails (``; emptied the partial file
    …``): a full-size file left behind would look complete. A block device is fsynced at
    the end. Anything else is left as it is on a failure."""
    fd = _open_file(path, os.O_WRONLY)
    regular = False
    try:
        st = os.fstat(fd)
        regular = stat.S_ISREG(st.st_mode)
        with _progress(args, info.size_bytes, label) as bar:
            if regular:
                os.ftruncate(fd, 0)
                await _export_sparse(client, vol, info, extents, fd, path, bar)
            else:  # a device, a pipe, …: no truncating, no seeking, no holes
                await _export_in_order(client, vol, info, extents, _Sink(fd, path), bar)
        if regular or stat.S_ISBLK(st.st_mode):
            os.fsync(fd)
        fd, closing = -1, fd
        os.close(closing)
    except BaseException as exc:
        note = ""
        if fd >= 0:
            if regular:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                    note = f"; emptied the partial file {path!r}"
            with contextlib.suppress(OSError):
                os.close(fd)
        if isinstance(exc, Exception):
            raise _noted(exc, args, path, note) from None
        raise
