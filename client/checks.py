"""Checks of what a user hands over to reach a server, made before anything is sent: a gRPC
address and a bearer token. Each says what is wrong in words, or ``None``.

One copy for both sides: the ``tierdisk`` command checks ``--server`` and ``--token`` with
these, and the server's config checks a remote layer's ``target``, ``token`` and
``token_file``, its own ``listen`` address, with the same functions
(:mod:`tierdisk.service.config`). gRPC itself would take a bad address silently (another port,
or 443) and fail a bad token with an internal error at the first call. Importing this module
does not import grpc (:func:`tierdisk.client.cli.quiet_grpc_logs`).
"""

from __future__ import annotations

import re

__all__ = ["server_address_problem", "token_problem"]

_TARGET_SCHEME = re.compile(
    r"(?i)(?:[a-z][a-z0-9+.-]*://|(?:unix|unix-abstract|dns|ipv4|ipv6|vsock|xds):)"
)
"""gRPC target forms other than HOST:PORT (``unix:/path``, ``dns:///host:port``, …): passed
to gRPC untouched."""


def server_address_problem(target: str, *, empty_host: bool = False) -> str | None:
    """What is wrong with ``target`` in the HOST:PORT form (``[v6addr]:PORT`` too), or
    ``None``. gRPC would silently read ``host:99999`` as another port, use 443 for a missing
    one and read ``::1:7400`` as some other IPv6 address; other target forms (a scheme such
    as ``unix:``, ``dns:``) are left to gRPC.

    An empty host (``:7400``) is a problem for gRPC, which needs one to connect to or bind;
    ``empty_host=True`` allows it, for a listener where it means every interface."""
    if _TARGET_SCHEME.match(target):
        return None
    if target.startswith("["):
        m = re.fullmatch(r"\[[^\]]*\](?::(.*))?", target)
        if not m:
            return "not HOST:PORT (an IPv6 address goes in brackets: [::1]:7400)"
        port = m.group(1)
    elif target.count(":") > 1:
        return "not HOST:PORT (an IPv6 address goes in brackets: [::1]:7400)"
    else:
        port = target.partition(":")[2] if ":" in target else None
    if not port:
        return "missing port (HOST:PORT, e.g. 127.0.0.1:7400)"
    if not (port.isascii() and port.isdigit()):
        return f"port {port!r} is not a number"
    if int(port) > 65535:
        return f"port {port} is out of range (0-65535)"
    if target.startswith((":", "[]")) and not empty_host:
        return "missing host (HOST:PORT, e.g. 127.0.0.1:7400)"
    return None


def token_problem(token: str) -> str | None:
    """What keeps ``token`` out of an ``authorization: Bearer <token>`` header, worded to
    follow the token's name (``"token contains a character …"``), or ``None``.

    gRPC allows printable ASCII only (space to ``~``) in a header value: a control character
    (the ``\\r`` of a file saved with CRLF line ends, a tab) or any non-ASCII one fails every
    call. The message names the first such character and its position (from 0), never the
    token. An empty token (or only white space) would send no credential at all: refused
    too."""
    if not token.strip():
        return "is empty" + (" (only white space)" if token else "")
    for position, char in enumerate(token):
        if not " " <= char <= "~":
            return (
                f"contains a character not allowed in a gRPC header: {char!r} "
                f"(U+{ord(char):04X}) at position {position}"
            )
    return None
