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
    message says how many bytes were written (:func:`_stream_in`). Every sector read is
    written, zeros included, with one exception: ``import`` from a regular file (named, or
    on stdin) is sparse. Its holes (``lseek`` ``SEEK_DATA``/``SEEK_HOLE``; a filesystem
    without holes reports none) must read back as zeros, since the import replaces what the
    volume held there: on a volume whose ``unmap_behavior`` is ``ZEROES`` they are unmapped,
    so they take no space; on any other they are written as zeros, as before. Only whole
    sectors are unmapped: the part of a sector that a hole shares with data is written with
    that data, and a hole shorter than 64 KiB is written as zeros with the data around it
    (:data:`_MIN_HOLE`), so a fragmented file does not turn into many tiny requests. Chunks
    of data that happen to be zeros are written like any other.

    ``export`` writes all ``sector_count * sector_size`` bytes of the volume. Into a
    regular file it is sparse: the file is truncated, sized to the volume at once, and only
    the allocated runs are written where they belong; unallocated runs, and chunks that
    read back all zeros, are left as holes (the file reads the same); then it is fsynced.
    Into a block device, a pipe, a character device or stdout (IMAGE ``-``) every byte is
    written in order, zeros for the holes, with no truncating or seeking; a block device is
    fsynced too.

A failed export
    If an export into a regular file fails after this export created or truncated it, the
    file is removed, so that no full-size file that looks complete is left; but only if
    IMAGE still names that file and named a regular file (or nothing) before: through a
    symlink, say, the file is emptied instead. The error message ends with what was done
    (``; removed the partial file 'img'``). A device or a pipe is left as it is, and so is
    the ``-o FILE`` of a failed ``read``.

Chunking
    Each request carries at most ``client.max_io`` bytes, a whole number of sectors
    (:func:`~tierdisk.client.chunking.sectors_per_chunk`; 1 MiB by default), with
    ``client.max_in_flight`` requests running at a time. Chunks of a regular file or block
    device are read (``pread``) and written in any order; so are the allocated chunks of a
    sparse export (``pwrite``). The hole unmaps of a sparse import (at most
    :data:`_UNMAP_MAX` bytes each) share the ``max_in_flight`` slots with its data chunks.
    A pipe or a terminal is read one chunk at a time, in order, while earlier chunks are
    being written. ``read`` and an in-order export use
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
import os
import stat
import sys
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple

from .aio import AsyncClient, AsyncVolume
from .chunking import Chunk, plan_chunks, run_bounded, sectors_per_chunk
from .cli_errors import CliError, describe, describe_file, file_error, stdout_error
from .errors import OutOfRange, TierdiskError
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
    zeros elsewhere. On success the position is left at the end, as a plain read would."""
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

    async def one(piece: _Piece) -> None:
        length = piece.sector_count * ss
        at = sector + piece.offset
        if piece.data:
            try:
                data = await asyncio.to_thread(os.pread, fd, length, start + piece.offset * ss)
            except OSError as err:
                raise file_error(path, err) from None
            if len(data) != length:
                raise CliError(f"{describe_file(path)}: shrank while being read")
            await vol.write(at, data, fua=fua)
        elif unmap:
            await vol.unmap(at, piece.sector_count)
        else:
            await vol.write(at, zeros if length == len(zeros) else zeros[:length], fua=fua)
        bar.advance(length)

    with _progress(args, size, f"{verb} {vol.name}") as bar:
        await run_bounded(pieces, one, client.max_in_flight)
    os.lseek(fd, start + size, os.SEEK_SET)
    return 0


_MIN_HOLE = 64 * 1024
"""Bytes: a hole of a sparse import shorter than this is written as zeros together with the
data around it, as one run; a filesystem with fragmented small holes (4 KiB here and there)
would otherwise turn its data into many small requests, each costing a round trip."""

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
    anything is written, as is anything starting past the end."""
    info = await vol.info()
    ss = info.sector_size
    info.check_fits(sector, 0)
    chunk_bytes = sectors_per_chunk(client.max_io, ss) * ss
    fua = bool(getattr(args, "fua", False))
    lock = asyncio.Lock()  # one reader at a time: chunks are taken, and placed, in order
    taken = 0  # bytes taken from src so far
    ended = False
    refusal: Exception | None = None

    def written(before: int) -> str:
        if not before:
            return "nothing was written"
        return f"the {before} bytes before were written from sector {sector}"

    async def worker(_: int) -> None:
        nonlocal taken, ended, refusal
        while True:
            async with lock:
                if ended:
                    return
                try:
                    data = await asyncio.to_thread(_read_up_to, src, chunk_bytes)
                except OSError as err:
                    raise file_error(None, err) from None
                offset, taken = taken, taken + len(data)
                ended = len(data) < chunk_bytes
                if not data:
                    return
                at, count = sector + offset // ss, len(data) // ss
                if len(data) % ss:
                    ended = True
                    refusal = CliError(
                        f"stdin: {taken} bytes is not a whole number of {ss}-byte sectors; "
                        + written(offset)
                    )
                    return
                if at + count > info.sector_count:
                    ended = True
                    refusal = OutOfRange(
                        f"stdin: sectors {at}..{at + count} reach past the end "
                        f"({info.sector_count} sectors); " + written(offset),
                        volume=vol.name,
                    )
                    return
            await vol.write(at, data, fua=fua)
            bar.advance(len(data))

    label = f"{verb} {vol.name}"
    with _progress(args, None, label, data_on_tty=_isatty(src)) as bar:
        await run_bounded(range(client.max_in_flight), worker, client.max_in_flight)
    if refusal is not None:
        raise refusal
    return 0


# -- export ------------------------------------------------------------------------------


async def export_image(client: AsyncClient, args: argparse.Namespace) -> int:
    """``export VOL IMAGE``: the whole volume into IMAGE (``-``: stdout), sparse into a
    regular file, every byte in order into anything else; a partial regular file left by a
    failure is removed (see the module's notes)."""
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
    try:
        existed: os.stat_result | None = os.lstat(path)
    except OSError:
        existed = None
    # Not O_TRUNC yet: a device keeps its size and is written whole, not truncated.
    fd = _open_file(path, os.O_WRONLY | os.O_CREAT)
    partial = False  # whether a failure leaves a partial regular file to discard
    try:
        st = os.fstat(fd)
        regular = stat.S_ISREG(st.st_mode)
        if regular:
            partial = existed is None  # created here
            os.ftruncate(fd, 0)
            partial = True  # its old bytes are gone: what is left is this export's
        with _progress(args, info.size_bytes, label) as bar:
            if regular:
                await _export_sparse(client, vol, info, extents, fd, path, bar)
            else:  # a device, a pipe, /dev/stdout …: no truncating, no seeking, no holes
                await _export_in_order(client, vol, info, extents, _Sink(fd, path), bar)
        if regular or stat.S_ISBLK(st.st_mode):
            os.fsync(fd)
        os.close(fd)
    except BaseException as exc:
        note = _discard_partial(fd, path, existed) if partial else ""
        with contextlib.suppress(OSError):
            os.close(fd)
        if isinstance(exc, OSError):
            raise file_error(path, exc, note) from None
        if isinstance(exc, TierdiskError):
            raise CliError(describe(exc, args.server) + note) from None
        if isinstance(exc, CliError) and note:
            err = CliError(f"{exc}{note}")
            err.exit_code = exc.exit_code
            raise err from None
        raise
    return 0


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
    holes; then the allocated runs are written where they belong, a few at a time."""
    ss = info.sector_size
    os.ftruncate(fd, info.size_bytes)
    per_chunk = sectors_per_chunk(client.max_io, ss)
    chunks = [
        chunk
        for ext in extents
        if ext.allocated
        for chunk in plan_chunks(ext.sector, ext.sector_count, per_chunk)
    ]
    zeros = bytes(per_chunk * ss)
    bar.advance(sum(e.sector_count for e in extents if not e.allocated) * ss)

    async def one(chunk: Chunk) -> None:
        data = await vol.read(chunk.sector, chunk.sector_count)
        # An all-zero chunk is left as a hole too: the file reads the same.
        if data != zeros[: len(data)]:
            await asyncio.to_thread(os.pwrite, fd, data, chunk.sector * ss)
        bar.advance(len(data))

    await run_bounded(chunks, one, client.max_in_flight)


async def _export_in_order(
    client: AsyncClient,
    vol: AsyncVolume,
    info: VolumeInfo,
    extents: list[AllocationExtent],
    sink: _Sink,
    bar: Progress,
) -> None:
    """Export as one stream of ``sector_count * sector_size`` bytes: the allocated runs
    read ahead in order, zeros written for the holes."""
    ss = info.sector_size
    zeros = memoryview(bytes(sectors_per_chunk(client.max_io, ss) * ss))
    for ext in extents:
        if ext.allocated:
            async for _sector, data in vol.stream_read(ext.sector, ext.sector_count):
                sink.write(data)
                bar.advance(len(data))
            continue
        left = ext.sector_count * ss
        while left:
            n = min(left, len(zeros))
            sink.write(zeros[:n])
            bar.advance(n)
            left -= n
    sink.flush()


def _discard_partial(fd: int, path: str, existed: os.stat_result | None) -> str:
    """After a failed export into the regular file open as ``fd``: remove it, so no
    full-size file is left that looks complete. Only if ``path`` is still that file and
    was a regular file (or nothing) before; through a symlink the file is emptied instead.
    Returns the note for the error message."""
    try:
        st = os.fstat(fd)
        now = os.lstat(path)
    except OSError:
        return ""
    same = (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)
    if same and stat.S_ISREG(now.st_mode) and (existed is None or stat.S_ISREG(existed.st_mode)):
        try:
            os.unlink(path)
        except OSError as err:
            return f"; could not remove the partial file {path!r}: {err.strerror or err}"
        return f"; removed the partial file {path!r}"
    try:
        os.ftruncate(fd, 0)
    except OSError:
        return ""
    return f"; emptied the partial file {path!r}"
