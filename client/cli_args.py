"""The ``tierdisk`` command's arguments (DESIGN.md §7): the parser (:func:`build_parser`), the
types its arguments are read with, and the checks of them made once they are parsed, before
anything is sent.

Every number on the command line is decimal digits (leading zeros allowed, no sign); a SIZE
is sectors, or bytes with a unit (:func:`size_argument`); ``--timeout`` is seconds (at most
:data:`MAX_TIMEOUT`); a text argument (a volume name, a PATH) must be valid UTF-8. A bad
argument is a usage error (exit 2): argparse's own, or :class:`UsageError`
(:mod:`tierdisk.client.cli_errors`). :mod:`tierdisk.client.cli` runs the verbs. Nothing
imported here imports grpc (:func:`tierdisk.client.cli.quiet_grpc_logs`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import sizes
from .checks import ascii_float, server_address_problem, stays_on_this_host, token_problem
from .cli_errors import UsageError

__all__ = ["build_parser", "check_connection_args", "check_request_numbers", "size_argument"]

DEFAULT_SERVER = "127.0.0.1:7400"

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
        value = ascii_float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    if value > MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_TIMEOUT:.0f} seconds: {text!r}")
    return value


def check_request_numbers(args: argparse.Namespace) -> None:
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


def check_connection_args(args: argparse.Namespace) -> None:
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
        "(the size stays; convert other formats first: qemu-img convert -O raw; an IMAGE that "
        "begins with a qcow2, VMDK, VHDX or VHD header is refused unless --raw)",
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument(
        "--raw",
        action="store_true",
        help="IMAGE is raw bytes even if it begins with another image format's header",
    )
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
