"""The verbs that copy a file, a block device, a pipe or stdin onto a volume: ``write``
and ``import`` of the ``tierdisk`` command (DESIGN.md §7; the four verbs that move data
are introduced in :mod:`tierdisk.client.transfer`).

Files, devices, pipes and ``-``
    ``write`` (from SECTOR) and ``import`` (from sector 0) read a regular file or a block
    device (``-i FILE``, IMAGE, or stdin redirected from one) from its current position to
    its end. Its length is known up front, so one that is not a whole number of sectors,
    that reaches past the end of the volume, or (``import``) that is larger than the volume
    is refused before anything is written. Input that is neither (stdin or a named FILE
    that is a pipe, a FIFO, ``<(cmd)``, ``/dev/stdin`` from a pipe, a terminal) has a
    length known only at its end, so it is written as it arrives: the chunk that ends in
    part of a sector, or reaches past the end of the volume, is not written, and is refused
    once the chunks before it are; the message says how many bytes were written
    (:func:`_stream_in`; see below). Every sector
    read is written, zeros included, with one exception: ``import`` from a regular file
    (named, or on stdin) is sparse. Its holes (``lseek`` ``SEEK_DATA``/``SEEK_HOLE``; a filesystem
    without holes reports none) must read back as zeros, since the import replaces what the
    volume held there: on a volume whose ``unmap_behavior`` is ``ZEROES`` they are unmapped,
    so they take no space; on any other they are written as zeros, as before. Only whole
    sectors are unmapped: the part of a sector that a hole shares with data is written with
    that data, and a hole shorter than 64 KiB is written as zeros with the data around it
    (:data:`~tierdisk.client.chunking.MIN_HOLE_BYTES`), so a fragmented file does not turn
    into many tiny requests. Chunks of data that happen to be zeros are written like any
    other.

A failed write or import
    ``write`` and ``import`` stop sending requests at the first failure, let those in flight
    finish, and end the message with what was written: ``nothing was written``, or ``the N
    bytes before were written from sector S``, then ``; sectors A..B may have been written
    in part`` for requests past those that were written out of order or failed part way
    (:class:`~tierdisk.client.copy_report.CopyProgress`); from a file, from stdin, or
    refused at a bad chunk from a pipe alike.

Chunking
    Chunks of a regular file or block device are read (``pread``) and written in any order.
    The hole unmaps of a sparse import (at most
    :data:`~tierdisk.client.chunking.UNMAP_MAX_BYTES` bytes each) share the
    ``max_in_flight`` slots with its data chunks. A pipe or a terminal is read one chunk at
    a time, in order, while earlier chunks are being written.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import stat
import sys
from typing import BinaryIO

from .aio import AsyncClient, AsyncVolume
from .chunking import Piece, plan_pieces, run_bounded, sector_runs, sectors_per_chunk
from .cli_errors import CliError, describe_file, file_error
from .copy_report import CopyInterrupted, CopyProgress, progress_bar
from .errors import Interrupted, OutOfRange, TierdiskError
from .localfile import (
    ThreadReader,
    data_runs,
    file_size,
    fileno,
    is_sized,
    isatty,
    open_file,
    read_up_to,
    reader,
    std_path,
)
from .models import UnmapBehavior

__all__ = ["import_image", "write_sectors"]

_IMAGE_FORMATS = (
    (b"QFI\xfb", "qcow2"),  # (qcow version 1 too)
    (b"KDMV", "VMDK"),
    (b"vhdxfile", "VHDX"),
    (b"conectix", "VHD"),  # a dynamic VHD's copy of its footer, at the start
)
"""The headers of the disk image formats ``qemu-img`` converts from, as they begin a file:
``import`` refuses such a file unless ``--raw`` (:func:`_refuse_another_format`)."""


def _refuse_another_format(path: str | None, head: bytes, args: argparse.Namespace) -> None:
    """A :class:`CliError` when ``head``, the first bytes an ``import`` would write at sector
    0, begin with another image format's header: ``import`` copies bytes, so the volume would
    hold that file's bytes (its header, its tables), not the disk in it, and lose what it
    held. ``--raw`` says those bytes are what the volume should hold (a disk whose sector 0
    holds such a file, as a disk a guest wrote one onto does)."""
    if getattr(args, "raw", False):
        return
    for magic, name in _IMAGE_FORMATS:
        if head.startswith(magic):
            image = "IMAGE" if path is None else path
            raise CliError(
                f"{describe_file(path)} begins with a {name} header: import copies an image "
                f"byte for byte (raw), so the volume would hold the {name} file, not the disk "
                f"in it; convert it first (qemu-img convert -O raw {image} OUT.raw), or pass "
                "--raw if these bytes are what the volume should hold"
            )


_HEAD_BYTES = max(len(magic) for magic, _ in _IMAGE_FORMATS)


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
    status = await _copy_from(client, args, vol, std_path(args.input), args.sector, "write")
    await _made_durable(vol, args, "write")
    return status


async def import_image(client: AsyncClient, args: argparse.Namespace) -> int:
    """``import VOL IMAGE``: IMAGE (``-``: stdin) onto the volume from sector 0; it must be
    a whole number of sectors and no larger than the volume, which keeps its size."""
    vol = client.volume(args.volume)
    status = await _copy_from(client, args, vol, std_path(args.image), 0, "import")
    await _made_durable(vol, args, "import")
    return status


async def _made_durable(vol: AsyncVolume, args: argparse.Namespace, verb: str) -> None:
    """End a ``write`` or an ``import`` with a flush (unless ``--no-flush``): the command
    returns once the data is durable, and a server that restarted without a clean stop
    while it wrote, losing some of it, is reported (``WritesLost``: write it again) rather
    than passed over. A failure says that everything was written before it, and so does
    a stop (Ctrl-C, SIGTERM, SIGHUP) while the flush runs: ``interrupted; all of it was
    written, but …``. With ``--no-flush`` it prints, on stdout, ``write verifier 0x…`` for
    each verifier its writes were acknowledged with (none when each was durable as
    acknowledged): ``tierdisk flush VOL --verifier 0x…`` later makes them durable, and
    fails as this flush would if the server lost any of them meanwhile."""
    if getattr(args, "no_flush", False):
        for verifier in vol.unflushed_verifiers:
            try:
                sys.stdout.write(f"write verifier {verifier:#018x}\n")
                sys.stdout.flush()
            except OSError as err:
                raise CliError(
                    f"{verb}: all of it was written (not flushed: `{_flush_later(vol)}`), but "
                    f"its write verifier could not be printed: stdout: {err.strerror or err}"
                ) from None
        return
    try:
        await vol.flush()
    except TierdiskError as exc:
        exc.message = f"{verb}: all of it was written, but the flush after it failed: {exc}"
        exc.args = (exc.message,)
        raise
    except asyncio.CancelledError:
        raise CopyInterrupted(
            f"all of it was written, but the flush after it ({verb}) did not end: it may "
            f"not be durable yet (`{_flush_later(vol)}`)"
        ) from None


def _flush_later(vol: AsyncVolume) -> str:
    """The command that makes durable later what was written through ``vol`` and not
    flushed, and fails if the server lost any of it meanwhile."""
    given = "".join(f" --verifier {v:#018x}" for v in vol.unflushed_verifiers)
    return f"tierdisk flush {vol.name}{given}"


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
    fd = fileno(stdin)
    if fd is not None and is_sized(fd):
        # `write … < img`: the size is known, so a bad length is refused before anything is
        # written, and the bar has a total.
        return await _copy_fd_in(client, args, vol, fd, None, sector, verb)
    return await _stream_in(client, args, vol, stdin, None, sector, verb)


async def _copy_in(
    client: AsyncClient,
    args: argparse.Namespace,
    vol: AsyncVolume,
    path: str,
    sector: int,
    verb: str,
) -> int:
    """Copy the file ``path`` onto the volume from ``sector``: a regular file or a block
    device by :func:`_copy_fd_in`, anything else (a pipe, a FIFO, ``<(cmd)``) as it
    arrives, as stdin from a pipe is (:func:`_stream_in`)."""
    fd = await open_file(path, os.O_RDONLY)  # before any call: a missing file needs no server
    try:
        if is_sized(fd):
            return await _copy_fd_in(client, args, vol, fd, path, sector, verb)
        try:
            stream = reader(fd)
        except OSError as err:  # a folder, say (a stream refuses one)
            raise file_error(path, err) from None
        with stream as src:
            return await _stream_in(client, args, vol, src, path, sector, verb)
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
    (:func:`~tierdisk.client.chunking.plan_pieces`): unmapped where the volume's unmap reads
    back as zeros, written as zeros elsewhere. On success the position is left at the end,
    as a plain read would. A failure stops the copy (the requests in flight finish) and its
    message says what was written (:class:`~tierdisk.client.copy_report.CopyProgress`)."""
    try:
        start = os.lseek(fd, 0, os.SEEK_CUR)
        size = max(0, file_size(fd, path) - start)
        sparse = verb == "import" and stat.S_ISREG(os.fstat(fd).st_mode)
        head = os.pread(fd, _HEAD_BYTES, start) if verb == "import" else b""
    except OSError as err:
        raise file_error(path, err) from None
    _refuse_another_format(path, head, args)
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
            runs = await asyncio.to_thread(data_runs, fd, start, start + size)
            if os.fstat(fd).st_size < start + size:  # past its new end, all looked like holes
                raise CliError(f"{describe_file(path)}: shrank while being read")
        except OSError as err:
            raise file_error(path, err) from None
    unmap = info.unmap_behavior == UnmapBehavior.ZEROES
    pieces = plan_pieces(sector_runs(runs, start, ss, count), count, per_chunk, unmap, ss)
    zeros = bytes(per_chunk * ss) if not unmap and any(not p.data for p in pieces) else b""

    written = CopyProgress(sector, ss)

    async def one(piece: Piece) -> None:
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

    with progress_bar(args, size, f"{verb} {vol.name}") as bar:
        try:
            await run_bounded(pieces, one, client.max_in_flight)
        except asyncio.CancelledError:  # Ctrl-C: say what was written
            raise written.interrupted() from None
        except Interrupted as exc:  # a request cancelled underneath: a failure, noted
            written.failed(exc)
    written.raise_failure(args, path)
    os.lseek(fd, start + size, os.SEEK_SET)
    return 0


async def _stream_in(
    client: AsyncClient,
    args: argparse.Namespace,
    vol: AsyncVolume,
    src: BinaryIO,
    path: str | None,
    sector: int,
    verb: str,
) -> int:
    """``write`` (or ``import``) from ``src``, a pipe (or a terminal): the file ``path``
    that messages name (``None``: stdin). Its length is known only at its end, so the data
    is written as it arrives, ``max_io`` bytes a request with ``max_in_flight`` in flight,
    never held whole; the bar shows the bytes written and the rate, no total.

    A chunk that ends in part of a sector or would reach past the end of the volume is not
    written, and is reported once the chunks before it are all written; the message says
    how many bytes that is. So input of up to one chunk (1 MiB by default) is refused before
    anything is written, as is anything starting past the end. A failure (of a write, or of
    reading ``src``) stops the copy likewise, and its message says what was written
    (:class:`~tierdisk.client.copy_report.CopyProgress`)."""
    info = await vol.info()
    ss = info.sector_size
    info.check_fits(sector, 0)
    chunk_bytes = sectors_per_chunk(client.max_io, ss) * ss
    fua = bool(getattr(args, "fua", False))
    lock = asyncio.Lock()  # one reader at a time: chunks are taken, and placed, in order
    taken = 0  # bytes taken from src so far
    ended = False
    written = CopyProgress(sector, ss)
    refusal: tuple[str, bool] | None = None  # its message but the note; past the end?
    source = fileno(src)
    # A descriptor is read on a thread of its own: a stop signal must not wait for a read
    # a stalled writer holds (the default executor, and so the exit, would).
    try:
        threaded = ThreadReader(source) if source is not None else None
    except OSError as err:  # a folder, say (FileIO refuses one)
        raise file_error(path, err) from None

    async def read_chunk() -> bytes:
        if threaded is not None:
            return await threaded.read(chunk_bytes)
        return await asyncio.to_thread(read_up_to, src, chunk_bytes)

    async def worker(_: int) -> None:
        nonlocal taken, ended, refusal
        while True:
            async with lock:
                if ended or written.failure is not None:
                    return
                try:
                    data = await read_chunk()
                except OSError as err:
                    ended = True
                    written.failed(file_error(path, err))
                    return
                offset, taken = taken, taken + len(data)
                ended = len(data) < chunk_bytes
                if not data:
                    return
                if verb == "import" and offset == 0:
                    try:
                        _refuse_another_format(path, data, args)
                    except CliError as exc:  # the first chunk: nothing is written yet
                        ended = True
                        refusal = (f"{exc}; ", False)
                        return
                at, count = sector + offset // ss, len(data) // ss
                if len(data) % ss:
                    ended = True
                    text = (
                        f"{describe_file(path)}: {taken} bytes is not a whole number of "
                        f"{ss}-byte sectors; "
                    )
                    refusal = (text, False)
                    return
                if at + count > info.sector_count:
                    ended = True
                    text = (
                        f"{describe_file(path)}: sectors {at}..{at + count} reach past the end "
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
    with progress_bar(args, None, label, data_on_tty=isatty(src)) as bar:
        try:
            await run_bounded(range(client.max_in_flight), worker, client.max_in_flight)
        except asyncio.CancelledError:  # Ctrl-C: say what was written
            raise written.interrupted() from None
        except Interrupted as exc:  # a request cancelled underneath: a failure, noted
            written.failed(exc)
        finally:
            if threaded is not None:
                threaded.close()
    written.raise_failure(args, path)
    if refusal is not None:  # every chunk before it is written: the note says how many bytes
        text, past_end = refusal
        if past_end:
            raise OutOfRange(text + written.note(), volume=vol.name)
        raise CliError(text + written.note())
    return 0
