"""The ``tierdisk`` command (DESIGN.md §7): its arguments, the verbs that print about
volumes, and the entry points.

    tierdisk [--server ADDR] VERB ...   a client verb (ADDR: $TIERDISK_SERVER, else 127.0.0.1:7400)
    tierdisk serve ...                  the server; every argument after ``serve`` is its own

The verbs that move data (``read``, ``write``, ``import``, ``export``) are in
:mod:`tierdisk.client.transfer`. Errors print one line on stderr naming the volume, file or
server, and exit 1 (2 for usage errors); no traceback (:mod:`tierdisk.client.cli_errors`).
Ctrl-C stops a verb (its clean-up done) with ``interrupted``, exit 130; SIGTERM and SIGHUP
likewise, ``interrupted by SIGTERM``, exit 128 + the signal's number (:func:`_stop_signals`);
``watch`` exits 0 on any of them.
gRPC's own log lines are off for the client verbs (:func:`quiet_grpc_logs`), so that line is
all there is on stderr; ``serve`` keeps gRPC's logging as configured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from types import FrameType
from typing import TYPE_CHECKING, NoReturn, TypeAlias

# Nothing imported here imports grpc (see quiet_grpc_logs): the rest is imported by main().
from . import sizes
from .checks import server_address_problem, stays_on_this_host, token_problem
from .cli_errors import (
    EXIT_ERROR,
    EXIT_USAGE,
    CliError,
    UsageError,
    describe,
    describe_parts,
    file_error,
    one_line,
    stdout_error,
)
from .localfile import Sink
from .pem import CERTIFICATE, PRIVATE_KEY, key_pair_problem, read_pem
from .progress import format_bytes
from .tune import install_uvloop, reopen_closed_stdio, tune_malloc

if TYPE_CHECKING:
    from .aio import AsyncClient
    from .models import ResizeEvent, VolumeInfo

__all__ = ["SERVER_ENTRY", "main", "size_argument"]

DEFAULT_SERVER = "127.0.0.1:7400"
SERVER_ENTRY = "tierdisk.service.main"
"""Module whose ``main(argv: list[str]) -> int`` runs ``tierdisk serve``; imported only then,
so the client never imports the server otherwise (DESIGN.md §1)."""

MAX_TIMEOUT = 1e9
"""The longest ``--timeout`` (about 31 years): gRPC turns a deadline much further out (past
its 64-bit clock) into an immediate DEADLINE_EXCEEDED."""


# -- sizes -------------------------------------------------------------------------------


def size_argument(text: str) -> tuple[int, bool]:
    """``(value, in_bytes)``: a bare integer is a count of sectors (``in_bytes`` False); with
    a unit it is bytes (:mod:`tierdisk.client.sizes`: ``K``/``KiB``, ``M``/``MiB``, …
    binary; ``kB``, ``MB``, … decimal). Raises :class:`UsageError` for anything else: the
    CLI's reading of a SIZE argument, over :func:`tierdisk.client.sizes.parse_size` (which
    raises ``ValueError``)."""
    try:
        return sizes.parse_size(text)
    except ValueError as exc:
        raise UsageError(f"size {exc}; expected sectors (e.g. 2048) or bytes (e.g. 2GiB)") from None


def _nonnegative(text: str) -> int:
    """A whole number in decimal digits, as every number on the command line is: leading
    zeros allowed (``08`` is 8), no sign, no ``0x``, no ``_``."""
    if text[:1] == "-" and _decimal(text[1:]):
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    if not _decimal(text):
        raise argparse.ArgumentTypeError(f"not a whole number in decimal digits: {text!r:.80}")
    if len(text.lstrip("0")) > 40:  # past any request (uint64); int() refuses 4,300 digits
        raise argparse.ArgumentTypeError(f"too large: {len(text)} digits")
    return int(text)


def _decimal(text: str) -> bool:
    """Whether ``text`` is one or more ASCII digits 0-9."""
    return text.isascii() and text.isdigit()


def _utf8(text: str) -> str:
    """``text`` as given, if it is valid UTF-8 (all a request can carry): an argument that
    is not (``$'\\xff'``; Python holds its bytes as surrogates) is refused, naming it."""
    if not _is_utf8(text):
        raise argparse.ArgumentTypeError(f"not valid UTF-8: {text!r}")
    return text


def _is_utf8(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8: it holds no surrogate (an undecodable byte)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _verifier(text: str) -> int:
    """A write verifier as ``write --no-flush`` prints it: ``0x`` and 1-16 hex digits, not 0."""
    digits = text[2:] if text[:2].lower() == "0x" else ""
    if not (digits.isascii() and 0 < len(digits) <= 16) or not all(
        c in "0123456789abcdefABCDEF" for c in digits
    ):
        raise argparse.ArgumentTypeError(f"not a write verifier (0x and hex digits): {text!r}")
    value = int(digits, 16)
    if not value:
        raise argparse.ArgumentTypeError(f"not a write verifier (0 is none): {text!r}")
    return value


def _timeout(text: str) -> float:
    try:
        if not text.isascii():  # float() reads other scripts' digits: "٣" is 3
            raise ValueError(text)
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    if value > MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_TIMEOUT:.0f} seconds: {text!r}")
    return value


def _check_request_numbers(args: argparse.Namespace) -> None:
    """:class:`UsageError` for a SECTOR or COUNT past every volume: over
    :data:`~tierdisk.client.sizes.MAX_SECTORS`, the most sectors any volume has (a request
    could carry up to ``2**64 - 1``, for the server to answer OUT_OF_RANGE)."""
    for attr in ("sector", "count"):
        value = getattr(args, attr, None)
        if value is not None and value > sizes.MAX_SECTORS:
            raise UsageError(
                f"{args.verb}: {attr.upper()} {value} is too large: no volume has more than "
                f"{sizes.MAX_SECTORS} sectors"
            )


# -- the server address and the token -----------------------------------------------------


def _check_connection_args(args: argparse.Namespace) -> None:
    """:class:`UsageError` for a server address that is not UTF-8 or that gRPC would
    misread, or a token it cannot send (:mod:`tierdisk.client.checks`), naming where it
    came from (the token is not shown); or for ``--tls-cert`` without ``--tls-key``, or
    the reverse (a client certificate goes with its key). A token sent without TLS to
    another host is a warning on stderr (it crosses the network in clear text)."""
    if (args.tls_cert is None) != (args.tls_key is None):
        given, missing = ("--tls-cert", "--tls-key")
        if args.tls_cert is None:
            given, missing = missing, given
        raise UsageError(
            f"{given} is given without {missing}: a client certificate goes with its private key"
        )
    if not _is_utf8(args.server):
        raise UsageError(f"server address {args.server!r} (from {args.server_from}): not UTF-8")
    problem = server_address_problem(args.server)
    if problem is not None:
        raise UsageError(f"server address {args.server!r} (from {args.server_from}): {problem}")
    problem = None if args.token is None else token_problem(args.token)
    if problem is not None:
        raise UsageError(f"token (from {args.token_from}) {problem}")
    tls = args.tls or args.tls_ca is not None or args.tls_cert is not None
    if args.token is not None and not tls and not stays_on_this_host(args.server):
        print(
            f"tierdisk: warning: the token (from {args.token_from}) is sent in clear text to "
            f"{args.server}, readable by anyone on the network path; use --tls",
            file=sys.stderr,
        )


class _StoreNotingSource(argparse.Action):
    """Stores the value and notes that it came from the command line: ``--server`` sets
    ``server_from`` to ``"--server"``, ``--token`` ``token_from`` to ``"--token"`` (their
    defaults name the environment variable, or the default), so that a message about the
    value can say where it came from."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[object] | None,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_from", option_string)


# -- arguments ---------------------------------------------------------------------------


_NO_FLUSH_HELP = (
    "do not flush at the end (by default the command returns once the data is durable, and "
    "fails if the server lost some of it in a restart meanwhile); print instead each write "
    "verifier the writes were acknowledged with, as 'write verifier 0x...' on stdout, for a "
    "later `tierdisk flush VOL --verifier 0x...` (nothing when every write was durable as "
    "it was acknowledged)"
)


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose "unrecognized arguments" error names an option of the
    command itself (``--server``, ``--timeout``, …) given after the verb as misplaced."""

    command_options: frozenset[str] = frozenset()
    """The command's own options (set by :func:`build_parser`)."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments: "):
            given = [word.split("=", 1)[0] for word in message.split(": ", 1)[1].split()]
            misplaced = [word for word in given if word in self.command_options]
            if misplaced:
                message += (
                    f" ({misplaced[0]} is an option of the command: give it before the verb, "
                    f"as in tierdisk {misplaced[0]} … VERB …)"
                )
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tierdisk",
        description="Client for a tierdisk block-storage server; `tierdisk serve` runs one.",
    )
    from_env = os.environ.get("TIERDISK_SERVER")
    parser.add_argument(
        "--server",
        metavar="ADDR",
        action=_StoreNotingSource,
        default=from_env or DEFAULT_SERVER,
        help="server address: host:port, unix:/path, or a gRPC target (dns:, ipv4:, ipv6:, "
        "unix-abstract:) (default: $TIERDISK_SERVER, else "
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
        help="further attempts after a call fails with UNAVAILABLE or CANCELLED (default 3)",
    )
    parser.add_argument(
        "--token",
        action=_StoreNotingSource,
        default=os.environ.get("TIERDISK_TOKEN"),
        help="bearer token sent with every call (default: $TIERDISK_TOKEN)",
    )
    parser.set_defaults(token_from="$TIERDISK_TOKEN")
    parser.add_argument("--tls", action="store_true", help="use TLS (with the system roots)")
    parser.add_argument("--tls-ca", metavar="FILE", help="PEM roots to verify the server")
    parser.add_argument(
        "--tls-cert", metavar="FILE", help="PEM client certificate chain (with --tls-key)"
    )
    parser.add_argument(
        "--tls-key", metavar="FILE", help="PEM client private key, unencrypted (with --tls-cert)"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar, even on a terminal"
    )
    parser.command_options = frozenset(
        option for action in parser._actions for option in action.option_strings
    ) - {"-h", "--help"}
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    verbs.add_parser("serve", help="run the server (its own flags follow: serve --help)")
    volumes_help = "list volumes, one per line, name first"
    verbs.add_parser("volumes", help=volumes_help, description=volumes_help)

    def vol_verb(name: str, help: str) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=help, description=help)
        p.add_argument("volume", metavar="VOL", type=_utf8)
        return p

    vol_verb("info", "print the volume's fields as `key: value` lines")
    p = vol_verb(
        "read",
        "write COUNT sectors from SECTOR to stdout (or -o FILE; stdout that is a terminal "
        "needs -o -); a progress bar on stderr if that is a terminal and stdout is not",
    )
    p.add_argument("sector", type=_nonnegative, metavar="SECTOR")
    p.add_argument("count", type=_nonnegative, metavar="COUNT")
    p.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write to FILE instead of stdout (-: stdout, even a terminal)",
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
    p.add_argument("--no-flush", action="store_true", help=_NO_FLUSH_HELP)
    p = vol_verb(
        "import",
        "write the raw image IMAGE (-: stdin) onto the volume from sector 0, byte for byte "
        "(the size stays; convert other formats first: qemu-img convert -O raw)",
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--no-flush", action="store_true", help=_NO_FLUSH_HELP)
    p = vol_verb(
        "export",
        "copy the whole volume into IMAGE, sparse where unallocated; to a device, a pipe or "
        "stdout (IMAGE -) every byte is written in order. A file IMAGE is written beside it "
        "and renamed over it at the end: if the export fails, IMAGE is left as it was",
    )
    p.add_argument("image", metavar="IMAGE")
    p = vol_verb("inspect", "print the volume's diagnostic tree (or its PATH subtree) as JSON")
    p.add_argument("path", nargs="?", default="", metavar="PATH", type=_utf8)
    vol_verb("map", "print the allocation: `sector count depth` per run (depth -1: hole)")
    vol_verb(
        "watch",
        "print the size now and on every change, until interrupted (exit 0) or the server "
        "ends it (exit 1)",
    )
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
    p = vol_verb("flush", "make every acknowledged write durable")
    p.add_argument(
        "--verifier",
        action="append",
        default=[],
        type=_verifier,
        metavar="0xHEX",
        help="a write verifier that `write --no-flush` or `import --no-flush` printed: fail "
        "(writes lost, exit 1) if the server cannot vouch for the writes it acknowledged "
        "(it restarted without a clean stop since, say); may be given more than once",
    )
    return parser


# -- verbs -------------------------------------------------------------------------------

Verb: TypeAlias = "Callable[[AsyncClient, argparse.Namespace], Awaitable[int]]"
"""A client verb: ``await verb(client, args)`` does it and returns the exit status; a
failure is raised, for :func:`main` to report in one line."""


async def _out(*lines: str, sink: Sink | None = None) -> None:
    """Print ``lines`` on stdout through ``sink``, else a :class:`~.localfile.Sink` of
    their own: to a pipe, a terminal or a socket it writes from a thread of its own, so a
    reader that stalls (``tierdisk map VOL | less``, paused) does not keep Ctrl-C, SIGTERM
    or SIGHUP from stopping the verb (on the event loop's thread the write would be retried
    after each signal, PEP 475, and the loop never run their handlers)."""
    text = "".join(line + "\n" for line in lines)
    data = text.encode(sys.stdout.encoding or "utf-8", sys.stdout.errors or "strict")
    own = sink is None
    out = Sink() if sink is None else sink
    try:
        await out.write(data)
        out.flush()
    finally:
        if own:
            out.close()


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except OSError as err:
        raise stdout_error(err) from None


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
        ("volatile", info.volatile),
    ]
    if info.problem:  # only a volume that refuses all I/O until its server restarts
        values.append(("problem", info.problem))
    return [f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in values]


async def _volumes(client: AsyncClient, args: argparse.Namespace) -> int:
    lines = []
    for v in await client.list_volumes():
        if not v.ready and not v.problem:  # configured, not attached yet (a remote tier
            lines.append(f"{v.name}\t(not ready)")  # is down): name only
            continue
        if v.problem:  # it refuses all I/O until its server restarts (or never opened)
            lines.append(f"{v.name}\t(stopped until a restart: {v.problem})")
            continue
        mode = "ro" if v.read_only else "rw"
        size = format_bytes(v.size_bytes)
        lines.append(f"{v.name}\t{v.sector_count}\t{v.sector_size}\t{mode}\t{size}")
    await _out(*lines)
    return 0


async def _info(client: AsyncClient, args: argparse.Namespace) -> int:
    await _out(*_info_lines(await client.volume(args.volume).info()))
    return 0


async def _inspect(client: AsyncClient, args: argparse.Namespace) -> int:
    tree = await client.volume(args.volume).inspect(args.path)
    # Sorted keys, fixed indentation: outputs diff cleanly.
    await _out(json.dumps(tree, indent=2, sort_keys=True))
    return 0


async def _map(client: AsyncClient, args: argparse.Namespace) -> int:
    extents = await client.volume(args.volume).allocation()
    await _out(*(f"{ext.sector}\t{ext.sector_count}\t{ext.depth}" for ext in extents))
    return 0


_WHY_SECONDS = 2.0
"""Seconds :func:`_watch` gives the one call that says why no first event came."""


async def _print_size(event: ResizeEvent, sink: Sink) -> None:
    await _out(f"generation={event.generation} sector_count={event.sector_count}", sink=sink)


async def _watch(client: AsyncClient, args: argparse.Namespace) -> int:
    """Runs until interrupted (exit 0, see :func:`main`); the server ending the stream (it
    shut down, or the connection broke) is an error: the sizes printed stop being current.
    ``--timeout`` bounds the wait for the first event (the size now), as it bounds any
    call: a peer that takes the call and never answers is an error, not a silent wait."""
    from .errors import DeadlineExceeded, TierdiskError

    vol = client.volume(args.volume)
    watching = False
    events = vol.watch_resize()
    sink = Sink()
    try:
        try:
            async with asyncio.timeout(args.timeout):
                first = await anext(events)
        except TimeoutError:
            # Why: a server that is down (its retries filled the time) says so to one call
            # (UNAVAILABLE, "connection refused"); one that answers it just did not watch.
            with contextlib.suppress(DeadlineExceeded):  # silent too: the watch's own words
                await vol.info(timeout=min(args.timeout, _WHY_SECONDS))
            raise DeadlineExceeded(
                f"no answer to the watch within {args.timeout:g} s", volume=vol.name
            ) from None
        watching = True
        await _print_size(first, sink)
        async for event in events:
            await _print_size(event, sink)
    except TierdiskError as err:
        if not watching:
            raise
        where, why = describe_parts(err, args.server)
        raise CliError(f"{where}: the server ended the watch: {why}") from None
    finally:
        sink.close()
    raise CliError(f"volume {vol.name!r} on {args.server}: the server ended the watch")


async def _resize(client: AsyncClient, args: argparse.Namespace) -> int:
    """``resize VOL SIZE``: a size no volume can have (no sector, over the size limit,
    :func:`~tierdisk.client.sizes.size_limit_problem`) or not whole sectors is a bad
    argument (exit 2), as is a shrink not asked for; only the volume's size and sector
    size are asked for first."""
    value, in_bytes = size_argument(args.size)
    vol = client.volume(args.volume)
    if value > (sizes.MAX_BYTES if in_bytes else sizes.MAX_SECTORS):  # whatever the sector size
        most = f"{sizes.MAX_BYTES} bytes" if in_bytes else f"{sizes.MAX_SECTORS} sectors"
        raise UsageError(f"size {args.size!r} is over the size limit of any volume ({most})")
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
    if sectors == 0:
        raise UsageError(f"volume {vol.name!r}: size {args.size!r}: a volume has a sector or more")
    problem = sizes.size_limit_problem(ss, sectors)
    if problem is not None:
        raise UsageError(f"volume {vol.name!r}: size {args.size!r}: {problem}")
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
    await _out(*_info_lines(await vol.resize(sectors)))
    return 0


async def _flush(client: AsyncClient, args: argparse.Namespace) -> int:
    await client.volume(args.volume).flush(verifiers=args.verifier)
    return 0


def _verbs() -> dict[str, Verb]:
    """Each client verb by name. Those that move data are in :mod:`tierdisk.client.transfer`,
    imported now, not with this module: it imports grpc (:func:`quiet_grpc_logs`)."""
    from .transfer import export_image, import_image, read_sectors, write_sectors

    return {
        "volumes": _volumes,
        "info": _info,
        "read": read_sectors,
        "write": write_sectors,
        "import": import_image,
        "export": export_image,
        "inspect": _inspect,
        "map": _map,
        "watch": _watch,
        "resize": _resize,
        "flush": _flush,
    }


def _read_pem(path: str | None, kind: str, option: str) -> bytes | None:
    """The PEM file given to ``option`` (None when not given); a file that cannot be read
    or holds no PEM block of ``kind`` is an error naming the option and the file."""
    if path is None:
        return None
    try:
        return read_pem(path, kind)
    except OSError as err:
        raise file_error(path, err) from None
    except ValueError as err:
        raise UsageError(f"{option} {path}: {err}") from None


def _check_key_pair(cert: str, key: str) -> None:
    """:class:`UsageError` naming ``--tls-key`` and the file when the key in ``key`` does
    not go with the certificate in ``cert`` (encrypted, or another certificate's: gRPC
    would only fail every connection, :func:`~tierdisk.client.pem.key_pair_problem`)."""
    try:
        problem = key_pair_problem(cert, key, f"--tls-cert {cert}")
    except OSError as err:
        raise file_error(err.filename if isinstance(err.filename, str) else key, err) from None
    if problem is not None:
        raise UsageError(f"--tls-key {key} {problem}")


async def _run(args: argparse.Namespace) -> int:
    from .aio import AsyncClient
    from .copy_report import CopyInterrupted

    verb = _verbs()[args.verb]
    roots = _read_pem(args.tls_ca, CERTIFICATE, "--tls-ca")
    chain = _read_pem(args.tls_cert, CERTIFICATE, "--tls-cert")
    key = _read_pem(args.tls_key, PRIVATE_KEY, "--tls-key")
    if args.tls_cert is not None and args.tls_key is not None:
        _check_key_pair(args.tls_cert, args.tls_key)
    rc: int | None = None
    with _stop_signals() as stopped:
        try:
            async with AsyncClient(
                args.server,
                timeout=args.timeout,
                retries=args.retries,
                token=args.token,
                secure=args.tls,
                root_certificates=roots,
                certificate_chain=chain,
                private_key=key,
            ) as client:
                rc = await verb(client, args)
            _flush_stdout()  # here, not at exit: a full disk or a closed pipe is reported
            # A stop asked for meanwhile is taken here, not as this task ends (the task
            # would end cancelled: "interrupted" after all was done).
            await asyncio.sleep(0)
        except (asyncio.CancelledError, CopyInterrupted) as exc:
            if rc is not None:
                # The verb had ended (an export had replaced IMAGE, a write was written):
                # a stop that came as the client closed changes nothing; the result stands
                # (a Ctrl-C so taken is no KeyboardInterrupt: asyncio.run()).
                _flush_stdout()
                return rc
            if not stopped:
                raise  # Ctrl-C: asyncio.run() makes it a KeyboardInterrupt, main() reports it
            if args.verb == "watch":
                return 0  # it runs until stopped: that is its end, as for Ctrl-C
            note = exc.note if isinstance(exc, CopyInterrupted) else ""
            raise _stopped_by(stopped[0], note) from None
    return rc


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
"""Signals that stop a client verb as Ctrl-C (SIGINT) does (:func:`_stop_signals`)."""


@contextlib.contextmanager
def _stop_signals() -> Iterator[list[int]]:
    """While a verb runs, take :data:`STOP_SIGNALS` as Ctrl-C is taken: the first one
    cancels the running task, so that the verb's clean-up runs (an export's temporary file
    is removed, a write or import says what it wrote), and is appended to the list yielded.
    The handlers are then removed, so that another signal acts as it would have (ends the
    process). Ctrl-C is ``asyncio.run()``'s to take (it cancels the task); the first one
    also gives SIGINT back its default action, so that a second one ends the process at
    once, as the shell's would, rather than raising ``KeyboardInterrupt`` wherever the clean-up
    stands (a traceback, or "internal error: … Cannot close a running event loop": two
    Ctrl-Cs in a row, or ``timeout -s INT``, which signals the process and its group). A
    signal the process ignores (``nohup``) stays ignored. Call it in the event loop, from
    the task to cancel."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    stopped: list[int] = []
    handled = [sig for sig in STOP_SIGNALS if signal.getsignal(sig) == signal.SIG_DFL]
    interrupt = signal.getsignal(signal.SIGINT)  # asyncio.run()'s, in the main thread
    take_interrupt: Callable[[int, FrameType | None], object] | None = (
        interrupt if callable(interrupt) else None
    )

    def interrupted(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # the next Ctrl-C ends the process
        if take_interrupt is not None:
            take_interrupt(signum, frame)

    def release() -> None:
        for sig in handled:
            loop.remove_signal_handler(sig)
        handled.clear()

    def stop(signum: int) -> None:
        stopped.append(signum)
        release()
        if task is not None:
            task.cancel()

    for sig in handled:
        loop.add_signal_handler(sig, stop, sig)
    if take_interrupt is not None:
        signal.signal(signal.SIGINT, interrupted)
    try:
        yield stopped
    finally:
        release()
        if take_interrupt is not None and signal.getsignal(signal.SIGINT) is interrupted:
            signal.signal(signal.SIGINT, take_interrupt)  # no Ctrl-C came: asyncio.run()'s


def _stopped_by(signum: int, note: str) -> CliError:
    """The one-line error of a verb stopped by the signal ``signum`` (one of
    :data:`STOP_SIGNALS`): ``interrupted by SIGTERM``, then ``; `` and ``note`` if any (what
    a write or import had written, as after Ctrl-C:
    :class:`~tierdisk.client.copy_report.CopyInterrupted`); exit ``128 + signum``, as a
    shell reports a process the signal ended."""
    err = CliError(f"interrupted by {signal.Signals(signum).name}" + (f"; {note}" if note else ""))
    err.exit_code = 128 + signum
    return err


# -- entry points ------------------------------------------------------------------------


def quiet_grpc_logs() -> None:
    """Turn off the log lines of gRPC's C core (``E1126 12:00:00.000000 … Handshake
    failed …``) for a client verb: :func:`main` reports every failure in one line, which those
    only precede with gRPC's own words. ``GRPC_VERBOSITY=NONE``, since ``ERROR`` lets some
    through (roots without a certificate log four lines). Not if the user set
    ``GRPC_VERBOSITY`` (theirs is kept) or ``GRPC_TRACE`` (they asked for gRPC's traces).

    The C core reads ``GRPC_VERBOSITY`` once, when grpc is imported, so this is called
    before anything imports it: neither this module nor the package imports it up front. If
    grpc is loaded already (:func:`main` called in a process that uses it), nothing is
    changed: it would not take effect, only pass on to child processes."""
    if "grpc" in sys.modules or os.environ.get("GRPC_TRACE"):
        return
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")


def serve(argv: Sequence[str]) -> int:
    """``tierdisk serve ARGS``: hand ``ARGS`` untouched to the server's ``main``."""
    try:
        module = importlib.import_module(SERVER_ENTRY)
        entry = module.main
    except (ImportError, AttributeError) as err:
        print(
            f"tierdisk: serve: cannot load the server ({SERVER_ENTRY}): {one_line(str(err))}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    rc = entry(list(argv))
    return int(rc) if rc is not None else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tierdisk`` command; returns the exit status. A Ctrl-C at any point after
    this module was imported (gRPC and uvloop are imported later, and take a while) is
    ``tierdisk: interrupted``, exit 130, never a traceback."""
    reopen_closed_stdio()  # first: before anything (uvloop, gRPC) opens a descriptor
    try:
        rc = _main(argv)
    except KeyboardInterrupt:
        print("tierdisk: interrupted", file=sys.stderr)
        return 130
    _settle_stdout()
    return rc


def _main(argv: Sequence[str] | None) -> int:
    tune_malloc()
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["serve"]:
        return serve(args_list[1:])  # gRPC's logging as configured: a server's logs are wanted
    quiet_grpc_logs()
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
    try:
        _check_connection_args(args)
        _check_request_numbers(args)
    except UsageError as err:
        print(f"tierdisk: {one_line(str(err))}", file=sys.stderr)
        return err.exit_code
    from .errors import TierdiskError  # imports grpc: after quiet_grpc_logs()

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
        print(f"tierdisk: {one_line(str(err))}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        print(f"tierdisk: {one_line(str(err))}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as err:  # a bug: still one line, never a traceback
        print(
            f"tierdisk: internal error: {type(err).__name__}: {one_line(str(err))}",
            file=sys.stderr,
        )
        return EXIT_ERROR


def _settle_stdout() -> None:
    """Write out what stdout still buffers (after a failure, output printed before it); if
    stdout cannot take it, the failure was reported already, or is (a closed pipe) not to
    be: the rest goes to /dev/null rather than to Python's "Exception ignored" at exit."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except (OSError, ValueError):
        _silence_stdout()


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
