"""The ``tierdisk`` command (DESIGN.md §7).

    tierdisk [--server ADDR] VERB ...   a client verb (ADDR: $TIERDISK_SERVER, else 127.0.0.1:7400)
    tierdisk serve ...                  the server; every argument after ``serve`` is its own

Errors print one line on stderr naming the volume, file or server, and exit 1 (2 for usage
errors); no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import math
import os
import re
import stat
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import BinaryIO

from . import sizes
from .aio import AsyncClient, AsyncVolume
from .chunking import Chunk, plan_chunks, run_bounded, sectors_per_chunk
from .errors import DeadlineExceeded, OutOfRange, TierdiskError, Unavailable
from .models import AllocationExtent, VolumeInfo
from .progress import Progress, format_bytes
from .tune import install_uvloop, tune_malloc

__all__ = ["SERVER_ENTRY", "UsageError", "main", "parse_size"]

DEFAULT_SERVER = "127.0.0.1:7400"
SERVER_ENTRY = "tierdisk.service.main"
"""Module whose ``main(argv: list[str]) -> int`` runs ``tierdisk serve``; imported only then,
so the client never imports the server otherwise (DESIGN.md §1)."""

EXIT_ERROR = 1
EXIT_USAGE = 2

UINT64_MAX = (1 << 64) - 1
"""The largest sector number or count a request can carry (``uint64`` fields)."""
MAX_TIMEOUT = 1e9
"""The longest ``--timeout`` (about 31 years): gRPC turns a deadline much further out (past
its 64-bit clock) into an immediate DEADLINE_EXCEEDED."""
STD_STREAM = "-"
"""As IMAGE (``import``/``export``), ``-i`` or ``-o``: stdin or stdout (``./-`` names a file)."""


class CliError(Exception):
    """A failure to report as ``tierdisk: <message>`` and exit ``exit_code``."""

    exit_code = EXIT_ERROR


class UsageError(CliError):
    """A bad argument: exit 2."""

    exit_code = EXIT_USAGE


# -- sizes -------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, bool]:
    """``(value, in_bytes)``: a bare integer is a count of sectors (``in_bytes`` False); with
    a unit it is bytes (:mod:`tierdisk.client.sizes`: ``K``/``KiB``, ``M``/``MiB``, …
    binary; ``kB``, ``MB``, … decimal). Raises :class:`UsageError` for anything else."""
    try:
        return sizes.parse_size(text)
    except ValueError as exc:
        raise UsageError(f"size {exc}; expected sectors (e.g. 2048) or bytes (e.g. 2GiB)") from None


def _nonnegative(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    if value > MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_TIMEOUT:.0f} seconds: {text!r}")
    return value


def _check_request_numbers(args: argparse.Namespace) -> None:
    """:class:`UsageError` for a SECTOR or COUNT no request can carry (over ``uint64``)."""
    for attr in ("sector", "count"):
        value = getattr(args, attr, None)
        if value is not None and value > UINT64_MAX:
            raise UsageError(
                f"{args.verb}: {attr.upper()} {value} is too large (at most {UINT64_MAX})"
            )


# -- the server address ------------------------------------------------------------------

_TARGET_SCHEME = re.compile(
    r"(?i)(?:[a-z][a-z0-9+.-]*://|(?:unix|unix-abstract|dns|ipv4|ipv6|vsock|xds):)"
)
"""gRPC target forms other than HOST:PORT (``unix:/path``, ``dns:///host:port``, …): passed
to gRPC untouched."""


def server_address_problem(target: str) -> str | None:
    """What is wrong with ``target`` in the HOST:PORT form (``[v6addr]:PORT`` too), or
    ``None``. gRPC would silently read ``host:99999`` as another port and use 443 for a
    missing one; other target forms are left to gRPC."""
    if _TARGET_SCHEME.match(target):
        return None
    if target.startswith("["):
        m = re.fullmatch(r"\[[^\]]*\](?::(.*))?", target)
        if not m:
            return "not HOST:PORT (an IPv6 address goes in brackets: [::1]:7400)"
        port = m.group(1)
    elif target.count(":") > 1:
        return "missing port (an IPv6 address goes in brackets: [::1]:7400)"
    else:
        port = target.partition(":")[2] if ":" in target else None
    if not port:
        return "missing port (HOST:PORT, e.g. 127.0.0.1:7400)"
    if not (port.isascii() and port.isdigit()):
        return f"port {port!r} is not a number"
    if int(port) > 65535:
        return f"port {port} is out of range (0-65535)"
    return None


class _StoreServer(argparse.Action):
    """``--server``: also notes that the address came from the command line."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[object] | None,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        namespace.server_from = "--server"


# -- arguments ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tierdisk",
        description="Client for a tierdisk block-storage server; `tierdisk serve` runs one.",
    )
    from_env = os.environ.get("TIERDISK_SERVER")
    parser.add_argument(
        "--server",
        metavar="ADDR",
        action=_StoreServer,
        default=from_env or DEFAULT_SERVER,
        help="server address, host:port or unix:/path (default: $TIERDISK_SERVER, else "
        f"{DEFAULT_SERVER})",
    )
    parser.set_defaults(server_from="$TIERDISK_SERVER" if from_env else "the default")
    parser.add_argument(
        "--timeout",
        type=_timeout,
        default=30.0,
        metavar="SECONDS",
        help="deadline of each call (default 30)",
    )
    parser.add_argument(
        "--retries",
        type=_nonnegative,
        default=3,
        metavar="N",
        help="further attempts after a call fails with UNAVAILABLE (default 3)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("TIERDISK_TOKEN"),
        help="bearer token sent with every call (default: $TIERDISK_TOKEN)",
    )
    parser.add_argument("--tls", action="store_true", help="use TLS (with the system roots)")
    parser.add_argument("--tls-ca", metavar="FILE", help="PEM roots to verify the server")
    parser.add_argument("--tls-cert", metavar="FILE", help="PEM client certificate chain")
    parser.add_argument("--tls-key", metavar="FILE", help="PEM client private key")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar, even on a terminal"
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    verbs.add_parser("serve", help="run the server (its own flags follow: serve --help)")
    verbs.add_parser("volumes", help="list volumes, one per line, name first")

    def vol_verb(name: str, help: str) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=help, description=help)
        p.add_argument("volume", metavar="VOL")
        return p

    vol_verb("info", "print the volume's fields as `key: value` lines")
    p = vol_verb(
        "read",
        "write COUNT sectors from SECTOR to stdout (or -o FILE); a progress bar on stderr "
        "if that is a terminal and stdout is not",
    )
    p.add_argument("sector", type=_nonnegative, metavar="SECTOR")
    p.add_argument("count", type=_nonnegative, metavar="COUNT")
    p.add_argument(
        "-o", "--output", metavar="FILE", help="write to FILE instead of stdout (-: stdout)"
    )
    p = vol_verb(
        "write",
        "write whole sectors from stdin (or -i FILE) at SECTOR; a progress bar on stderr if "
        "that is a terminal and stdin is not (from a pipe: bytes written so far, no total)",
    )
    p.add_argument("sector", type=_nonnegative, metavar="SECTOR")
    p.add_argument(
        "-i", "--input", metavar="FILE", help="read from FILE instead of stdin (-: stdin)"
    )
    p.add_argument("--fua", action="store_true", help="durable when acknowledged")
    p = vol_verb("import", "write IMAGE (-: stdin) onto the volume from sector 0 (the size stays)")
    p.add_argument("image", metavar="IMAGE")
    p = vol_verb(
        "export",
        "copy the whole volume into IMAGE, sparse where unallocated; to a device, a pipe or "
        "stdout (IMAGE -) every byte is written in order. If it fails, a partial IMAGE file "
        "is removed",
    )
    p.add_argument("image", metavar="IMAGE")
    p = vol_verb("inspect", "print the volume's diagnostic tree (or its PATH subtree) as JSON")
    p.add_argument("path", nargs="?", default="", metavar="PATH")
    vol_verb("map", "print the allocation: `sector count depth` per run (depth -1: hole)")
    vol_verb("watch", "print the size now and on every change, until interrupted")
    p = vol_verb(
        "resize",
        "set the size: SIZE in sectors, or bytes with a unit (2GiB). Making the volume "
        "smaller is refused without --shrink",
    )
    p.add_argument("size", metavar="SIZE")
    p.add_argument(
        "--shrink",
        action="store_true",
        help="allow a smaller size: the data past the new end is lost",
    )
    vol_verb("flush", "make every acknowledged write durable")
    return parser


# -- verbs -------------------------------------------------------------------------------

Verb = Callable[[AsyncClient, argparse.Namespace], Awaitable[int]]


def _out(text: str) -> None:
    try:
        sys.stdout.write(text + "\n")
    except OSError as err:
        raise _stdout_error(err) from None


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except OSError as err:
        raise _stdout_error(err) from None


def _stdout_error(err: OSError) -> OSError | CliError:
    """A failed write to stdout as a one-line error naming it; a broken pipe stays one (the
    reader went away: see :func:`main`)."""
    return err if isinstance(err, BrokenPipeError) else CliError(f"stdout: {err.strerror or err}")


def _info_lines(info: VolumeInfo) -> list[str]:
    values: list[tuple[str, object]] = [
        ("sector_count", info.sector_count),
        ("sector_size", info.sector_size),
        ("name", info.name),
        ("physical_sector_size", info.physical_sector_size),
        ("read_only", info.read_only),
        ("fua_respected", info.fua_respected),
        ("disk_id", info.disk_id.hex()),
        ("unmap_behavior", info.unmap_behavior.value),
        ("optimal_unmap_sectors", info.optimal_unmap_sectors),
    ]
    return [f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in values]


async def _volumes(client: AsyncClient, args: argparse.Namespace) -> int:
    for v in await client.list_volumes():
        if not v.sector_size:  # configured, not attached yet (a remote tier is down): name only
            _out(f"{v.name}\t(not ready)")
            continue
        mode = "ro" if v.read_only else "rw"
        size = format_bytes(v.size_bytes)
        _out(f"{v.name}\t{v.sector_count}\t{v.sector_size}\t{mode}\t{size}")
    return 0


async def _info(client: AsyncClient, args: argparse.Namespace) -> int:
    for line in _info_lines(await client.volume(args.volume).info()):
        _out(line)
    return 0


def _check_fits(vol: AsyncVolume, info: VolumeInfo, sector: int, count: int) -> None:
    if sector + count > info.sector_count:
        raise OutOfRange(
            f"sectors {sector}..{sector + count} reach past the end ({info.sector_count} sectors)",
            volume=vol.name,
        )


def _open_file(path: str, flags: int, mode: int = 0o666) -> int:
    try:
        return os.open(path, flags | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as err:
        raise CliError(f"file {path!r}: {err.strerror or err}") from None


def _where(path: str | None) -> str:
    """How messages name a data source: ``file 'x'``, or ``stdin`` for ``None``."""
    return f"file {path!r}" if path is not None else "stdin"


def _file_error(path: str | None, err: OSError, note: str = "") -> CliError:
    return CliError(f"{_where(path)}: {err.strerror or err}{note}")


def _isatty(stream: BinaryIO) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError):  # closed, or no file behind it
        return False


def _fileno(stream: BinaryIO) -> int | None:
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
    broken stdout pipe stays a :class:`BrokenPipeError`: see :func:`main`)."""

    def __init__(self, fd: int | None = None, path: str | None = None) -> None:
        self.fd = fd
        self.path = path

    def _failed(self, err: OSError) -> OSError | CliError:
        return _stdout_error(err) if self.fd is None else _file_error(self.path, err)

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
        raise _file_error(path, err) from None


async def _read(client: AsyncClient, args: argparse.Namespace) -> int:
    vol = client.volume(args.volume)
    info = await vol.info()
    _check_fits(vol, info, args.sector, args.count)
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


def _whole_sectors(path: str | None, size: int, sector_size: int) -> int:
    if size % sector_size:
        where = f"file {path!r}" if path is not None else "stdin"
        raise CliError(f"{where}: {size} bytes is not a whole number of {sector_size}-byte sectors")
    return size // sector_size


async def _write(client: AsyncClient, args: argparse.Namespace) -> int:
    vol = client.volume(args.volume)
    return await _copy_from(client, args, vol, _std(args.input), args.sector, "write")


async def _import(client: AsyncClient, args: argparse.Namespace) -> int:
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
    written, zeros included: that is always correct, whatever the volume's unmap behaviour.
    On success the position is left at the end, as a plain read would."""
    try:
        start = os.lseek(fd, 0, os.SEEK_CUR)
        size = max(0, _file_size(fd, path) - start)
    except OSError as err:
        raise _file_error(path, err) from None
    info = await vol.info()
    ss = info.sector_size
    count = _whole_sectors(path, size, ss)
    if verb == "import" and count > info.sector_count:
        raise CliError(
            f"{_where(path)}: {size} bytes is larger than volume {vol.name!r} "
            f"({info.size_bytes} bytes)"
        )
    _check_fits(vol, info, sector, count)
    fua = bool(getattr(args, "fua", False))

    async def one(chunk: Chunk) -> None:
        length = chunk.sector_count * ss
        try:
            data = await asyncio.to_thread(os.pread, fd, length, start + chunk.offset * ss)
        except OSError as err:
            raise _file_error(path, err) from None
        if len(data) != length:
            raise CliError(f"{_where(path)}: shrank while being read")
        await vol.write(chunk.sector, data, fua=fua)
        bar.advance(length)

    per_chunk = sectors_per_chunk(client.max_io, ss)
    with _progress(args, size, f"{verb} {vol.name}") as bar:
        await run_bounded(plan_chunks(sector, count, per_chunk), one, client.max_in_flight)
    os.lseek(fd, start + size, os.SEEK_SET)
    return 0


def _sized(fd: int) -> bool:
    """Whether ``fd`` is a regular file or a block device: its length is known up front."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode) or stat.S_ISBLK(mode)


def _file_size(fd: int, path: str | None) -> int:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    if not stat.S_ISREG(st.st_mode):
        raise CliError(f"{_where(path)}: not a regular file or block device")
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
    _check_fits(vol, info, sector, 0)
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
                    raise _file_error(None, err) from None
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


async def _export(client: AsyncClient, args: argparse.Namespace) -> int:
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
            raise _file_error(path, exc, note) from None
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


async def _inspect(client: AsyncClient, args: argparse.Namespace) -> int:
    tree = await client.volume(args.volume).inspect(args.path)
    # Sorted keys, fixed indentation: outputs diff cleanly.
    _out(json.dumps(tree, indent=2, sort_keys=True))
    return 0


async def _map(client: AsyncClient, args: argparse.Namespace) -> int:
    for ext in await client.volume(args.volume).allocation():
        _out(f"{ext.sector}\t{ext.sector_count}\t{ext.depth}")
    return 0


async def _watch(client: AsyncClient, args: argparse.Namespace) -> int:
    """Runs until interrupted (exit 0, see :func:`main`); the server ending the stream (it
    shut down, or the connection broke) is an error: the sizes printed stop being current."""
    vol = client.volume(args.volume)
    watching = False
    try:
        async for event in vol.watch_resize():
            watching = True
            _out(f"generation={event.generation} sector_count={event.sector_count}")
            _flush_stdout()
    except TierdiskError as err:
        if not watching:
            raise
        where, why = _describe_parts(err, args.server)
        raise CliError(f"{where}: the server ended the watch: {why}") from None
    raise CliError(f"volume {vol.name!r} on {args.server}: the server ended the watch")


def _too_large(text: str, sectors: int) -> UsageError:
    return UsageError(f"size {text!r} is {sectors} sectors: too large (at most {UINT64_MAX})")


async def _resize(client: AsyncClient, args: argparse.Namespace) -> int:
    value, in_bytes = parse_size(args.size)
    if not in_bytes and value > UINT64_MAX:  # no request can carry it: no call made
        raise _too_large(args.size, value)
    vol = client.volume(args.volume)
    info = await vol.info()  # the sector size, and the size now: shrinking must be asked for
    ss = info.sector_size
    sectors = value
    if in_bytes:
        if value % ss:
            raise UsageError(
                f"size {args.size!r} ({value} bytes) is not a whole number of "
                f"{ss}-byte sectors of volume {vol.name!r}"
            )
        sectors = value // ss
        if sectors > UINT64_MAX:
            raise _too_large(args.size, sectors)
    if sectors < info.sector_count and not args.shrink:
        asked = (
            f"{args.size} ({sectors} sectors)"
            if in_bytes
            else f"{sectors} sectors ({format_bytes(sectors * ss)})"
        )
        raise UsageError(
            f"volume {vol.name!r}: {asked} is smaller than its {info.sector_count} sectors "
            f"({format_bytes(info.size_bytes)}); pass --shrink to shrink it and lose the data "
            "past the new end"
        )
    for line in _info_lines(await vol.resize(sectors)):
        _out(line)
    return 0


async def _flush(client: AsyncClient, args: argparse.Namespace) -> int:
    await client.volume(args.volume).flush()
    return 0


VERBS: dict[str, Verb] = {
    "volumes": _volumes,
    "info": _info,
    "read": _read,
    "write": _write,
    "import": _import,
    "export": _export,
    "inspect": _inspect,
    "map": _map,
    "watch": _watch,
    "resize": _resize,
    "flush": _flush,
}


def _progress(
    args: argparse.Namespace, total: int | None, label: str, *, data_on_tty: bool = False
) -> Progress:
    """The bar of a transfer of ``total`` bytes (``None``: unknown, from a pipe): drawn on
    stderr when that is a terminal (DESIGN.md §7). Never with ``--no-progress``, nor when the
    data itself is on a terminal (``read`` to a terminal stdout, ``write`` from a terminal
    stdin): raw sectors, or the echo of typed input, would mix with the redrawn line."""
    off = bool(args.no_progress) or data_on_tty
    return Progress(total, label=label, enabled=False if off else None)


def _read_pem(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise _file_error(path, err) from None


async def _run(args: argparse.Namespace) -> int:
    async with AsyncClient(
        args.server,
        timeout=args.timeout,
        retries=args.retries,
        token=args.token,
        secure=args.tls,
        root_certificates=_read_pem(args.tls_ca),
        certificate_chain=_read_pem(args.tls_cert),
        private_key=_read_pem(args.tls_key),
    ) as client:
        rc = await VERBS[args.verb](client, args)
    _flush_stdout()  # here, not at exit: a full disk or a closed pipe is reported
    return rc


# -- entry points ------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(text.split())


def describe(err: TierdiskError, server: str) -> str:
    """The one-line report of a failed call: what it addressed, what went wrong, why."""
    return ": ".join(_describe_parts(err, server))


def _describe_parts(err: TierdiskError, server: str) -> tuple[str, str]:
    """``(where, what)``: what the call addressed (``volume 'x'``, ``server ADDR``), and
    the kind of failure with the message, e.g. ``read-only: cannot write``.

    The server's messages often name the volume already (``volume 'x' is read-only: cannot
    write``); that prefix, and a repeat of the kind word after it, are dropped rather than
    said twice."""
    where = f"volume {err.volume!r}" if err.volume else f"server {server}"
    if err.volume and isinstance(err, Unavailable | DeadlineExceeded):
        where += f" on {server}"
    full = _one_line(err.message)
    message = _without_prefix(full, f"volume {err.volume!r}") if err.volume else full
    if message != full:
        message = _without_prefix(_without_prefix(message, "is"), err.label)
    return where, f"{err.label}: {message}" if message else err.label


def _without_prefix(text: str, prefix: str) -> str:
    """``text`` without ``prefix`` when it is a whole leading word or phrase, and without the
    separator (``:`` and spaces) after it; otherwise ``text``."""
    if text.startswith(prefix) and text[len(prefix) : len(prefix) + 1] in ("", ":", " "):
        return text[len(prefix) :].lstrip(": ")
    return text


def serve(argv: Sequence[str]) -> int:
    """``tierdisk serve ARGS``: hand ``ARGS`` untouched to the server's ``main``."""
    try:
        module = importlib.import_module(SERVER_ENTRY)
        entry = module.main
    except (ImportError, AttributeError) as err:
        print(
            f"tierdisk: serve: cannot load the server ({SERVER_ENTRY}): {_one_line(str(err))}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    rc = entry(list(argv))
    return int(rc) if rc is not None else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tierdisk`` command; returns the exit status."""
    tune_malloc()
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["serve"]:
        return serve(args_list[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    if args.verb == "serve":
        parser.print_usage(sys.stderr)
        print(
            "tierdisk: serve: client options do not apply to serve; "
            "put the server's own flags after it (tierdisk serve --help)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    problem = server_address_problem(args.server)
    try:
        if problem is not None:
            raise UsageError(f"server address {args.server!r} (from {args.server_from}): {problem}")
        _check_request_numbers(args)
    except UsageError as err:
        print(f"tierdisk: {_one_line(str(err))}", file=sys.stderr)
        return err.exit_code
    install_uvloop()
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        if args.verb == "watch":
            return 0
        print("tierdisk: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`tierdisk read … | head`); say nothing more on a dead pipe.
        _silence_stdout()
        return EXIT_ERROR
    except TierdiskError as err:
        print(f"tierdisk: {describe(err, args.server)}", file=sys.stderr)
        return EXIT_ERROR
    except CliError as err:
        print(f"tierdisk: {_one_line(str(err))}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        print(f"tierdisk: {_one_line(str(err))}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as err:  # a bug: still one line, never a traceback
        print(
            f"tierdisk: internal error: {type(err).__name__}: {_one_line(str(err))}",
            file=sys.stderr,
        )
        return EXIT_ERROR


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
