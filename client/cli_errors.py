"""How the ``tierdisk`` command words a failure: one line, and an exit status.

A :class:`CliError` is printed as ``tierdisk: <message>`` and exits with its ``exit_code``
(:data:`EXIT_ERROR`; :data:`EXIT_USAGE` for a :class:`UsageError`). A failed call, a
:class:`~tierdisk.client.errors.TierdiskError`, is worded by :func:`describe`. A failed read
or write of a file or of stdout becomes a :class:`CliError` naming it, with the system's
reason (:func:`file_error`, :func:`stdout_error`).

Shared by :mod:`tierdisk.client.cli` (arguments, dispatch, the entry points) and
:mod:`tierdisk.client.transfer` (the verbs that move data), which imports this module and
never :mod:`~tierdisk.client.cli`: the dependencies go one way, and ``python -m
tierdisk.client.cli`` (the module run as ``__main__``) raises and catches the same classes.
Importing it does not import grpc (:mod:`tierdisk.client.errors` does), so that
:mod:`~tierdisk.client.cli` can set ``GRPC_VERBOSITY`` before grpc is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .errors import TierdiskError

__all__ = [
    "EXIT_ERROR",
    "EXIT_USAGE",
    "CliError",
    "UsageError",
    "describe",
    "describe_file",
    "describe_parts",
    "file_error",
    "one_line",
    "stdout_error",
]

EXIT_ERROR = 1
"""The exit status of a failure."""
EXIT_USAGE = 2
"""The exit status of a bad command line."""


class CliError(Exception):
    """A failure to report as ``tierdisk: <message>`` and exit ``exit_code``."""

    exit_code = EXIT_ERROR


class UsageError(CliError):
    """A bad argument: exit 2."""

    exit_code = EXIT_USAGE


def one_line(text: str) -> str:
    """``text`` with every run of white space (newlines too) folded into one space."""
    return " ".join(text.split())


def describe(err: TierdiskError, server: str) -> str:
    """The one-line report of a failed call: what it addressed, what went wrong, why."""
    return ": ".join(describe_parts(err, server))


def describe_parts(err: TierdiskError, server: str) -> tuple[str, str]:
    """``(where, what)``: what the call addressed (``volume 'x'``, ``server ADDR``), and
    the kind of failure with the message, e.g. ``read-only: cannot write``.

    The server's messages often name the volume already (``volume 'x' is read-only: cannot
    write``); that prefix, and a repeat of the kind word after it, are dropped rather than
    said twice.

    A server that does not serve the method called (:class:`~.errors.Unimplemented`) is
    named as the culprit, whatever volume the call was for: ``server ADDR``, ``does not
    serve tierdisk.v1.BlockDevice, or is too old for GetVolume (UNIMPLEMENTED: …)``."""
    from .errors import (  # imported already: err is one of them
        DeadlineExceeded,
        Unavailable,
        Unimplemented,
    )

    if isinstance(err, Unimplemented):
        said = f"the server at {err.target}" if err.target else "the server"
        return f"server {server}", _without_prefix(one_line(err.message), said)
    where = f"volume {err.volume!r}" if err.volume else f"server {server}"
    if err.volume and isinstance(err, Unavailable | DeadlineExceeded):
        where += f" on {server}"
    full = one_line(err.message)
    message = _without_prefix(full, f"volume {err.volume!r}") if err.volume else full
    if message != full:
        message = _without_prefix(_without_prefix(message, "is"), err.label)
    if isinstance(err, Unavailable) and _CLEAR_TEXT_REPLY in full:
        message += " (the server answered without TLS: leave out --tls?)"
    return where, f"{err.label}: {message}" if message else err.label


_CLEAR_TEXT_REPLY = "WRONG_VERSION_NUMBER"
"""What BoringSSL says when the peer's first bytes are no TLS record: the server speaks
HTTP/2 in clear text."""


def _without_prefix(text: str, prefix: str) -> str:
    """``text`` without ``prefix`` when it is a whole leading word or phrase, and without the
    separator (``:`` and spaces) after it; otherwise ``text``."""
    if text.startswith(prefix) and text[len(prefix) : len(prefix) + 1] in ("", ":", " "):
        return text[len(prefix) :].lstrip(": ")
    return text


def describe_file(path: str | None) -> str:
    """How messages name a file: ``file 'x'``, or ``stdin`` for ``None``."""
    return f"file {path!r}" if path is not None else "stdin"


def file_error(path: str | None, err: OSError, note: str = "") -> CliError:
    """The failure ``err`` on the file ``path`` (``None``: stdin) as one line naming it, the
    system's reason, then ``note`` (e.g. ``; 'x' is unchanged``)."""
    return CliError(f"{describe_file(path)}: {err.strerror or err}{note}")


def stdout_error(err: OSError) -> OSError | CliError:
    """A failed write to stdout as a one-line error naming it; a broken pipe stays one (the
    reader went away: :func:`tierdisk.client.cli.main` exits 1 and says nothing)."""
    return err if isinstance(err, BrokenPipeError) else CliError(f"stdout: {err.strerror or err}")
