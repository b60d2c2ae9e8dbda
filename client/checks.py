"""Checks of what a user hands over to reach a server, made before anything is sent: a gRPC
address, metadata and a bearer token. Each says what is wrong in words, or ``None``.

One copy for every side: a client checks its ``target``
(:func:`~tierdisk.client.channel.check_target`), ``metadata`` and ``token`` with these when
it is made, the ``tierdisk`` command its ``--server`` and ``--token``, and the server's
config a remote layer's ``target``, ``token`` and ``token_file``, and its own listen
addresses (``listen``, ``metrics``, ``nbd``, a remote layer's ``nbd``), with the same
functions (:mod:`tierdisk.service.config`). gRPC itself would take a bad address silently
(another port, 443, a name cut at a NUL, or a target it retries for ever) and fail a bad
token or metadata pair with an internal error at the first call. Importing this module does
not import grpc (:func:`tierdisk.client.cli.quiet_grpc_logs`).
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Callable, Iterable

__all__ = [
    "TARGET_SCHEMES",
    "address_text_problem",
    "ascii_float",
    "metadata_problem",
    "sendable_metadata",
    "server_address_problem",
    "stays_on_this_host",
    "token_problem",
]

TARGET_SCHEMES = ("dns", "ipv4", "ipv6", "unix", "unix-abstract")
"""The gRPC target schemes taken besides ``HOST:PORT`` (gRPC's naming document):

- ``dns:HOST:PORT`` or ``dns:///HOST:PORT`` (no DNS server in the authority: gRPC refuses
  ``dns://8.8.8.8/…`` at the first call);
- ``ipv4:ADDR:PORT[,ADDR:PORT…]`` and ``ipv6:[ADDR]:PORT[,…]``: address literals;
- ``unix:PATH`` (relative or absolute) or ``unix:///ABSOLUTE/PATH``: a unix socket;
- ``unix-abstract:NAME``: a socket in Linux's abstract namespace.

Every ``PORT`` is required (gRPC would use 443 for a missing one). Other schemes are refused,
each a target gRPC would retry for ever: ``http://``, ``https://``, ``vsock:``, ``xds:``
(:data:`_REFUSED_SCHEMES` says why) and any other ``SCHEME://`` (gRPC looks the whole text up
as a host name). A scheme is written in lower case, as the code that reads a target back
(``unix:``) compares it."""

_REFUSED_SCHEMES = {
    "http": "gRPC takes no URL: HOST:PORT",
    "https": "gRPC takes no URL: HOST:PORT (TLS is an option of its own)",
    "vsock": "this gRPC has no vsock resolver: it would look the whole text up as a host name",
    "xds": "xDS needs a bootstrap file tierdisk does not set up",
}
"""Schemes a user may reach for that gRPC does not take here, and why (the rest: unknown)."""

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


def ascii_float(text: str) -> float:
    """``float(text)`` of ASCII text only (``float`` reads other scripts' digits: ``"٣"`` is
    3, which no command line or config means); :class:`ValueError` otherwise."""
    if not text.isascii():
        raise ValueError(text)
    return float(text)


def address_text_problem(text: str) -> str | None:
    """What makes ``text`` unusable as any address, whatever its form, or ``None``: white
    space (but a space in a ``unix:`` or ``unix-abstract:`` socket's name, which gRPC takes
    as it is), a control or format character (a NUL cuts the C string gRPC hands on: the
    rest of the address, its port too, is silently dropped), or an undecodable byte of a
    command line or environment variable (gRPC takes UTF-8 only). Names the first such
    character and its position (from 0)."""
    socket_path = text.startswith(("unix:", "unix-abstract:"))  # a space is a file name's
    for position, char in enumerate(text):
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for an undecodable byte
            return f"is not UTF-8 (byte 0x{code - 0xDC00:02x} at position {position})"
        if char.isspace() and not (socket_path and char.isprintable()):
            return f"contains white space: {char!r} (U+{code:04X}) at position {position}"
        category = unicodedata.category(char)
        if category in ("Cc", "Cf", "Cs"):
            what = "an invisible format" if category == "Cf" else "a control"
            return f"contains {what} character: {char!r} (U+{code:04X}) at position {position}"
    return None


def server_address_problem(
    target: str, *, empty_host: bool = False, listener: bool = False
) -> str | None:
    """What is wrong with the gRPC address ``target``, or ``None``.

    ``HOST:PORT`` (``[v6addr]:PORT`` for IPv6) or one of the :data:`TARGET_SCHEMES` forms.
    gRPC would silently read ``host:99999`` as another port, use 443 for a missing one, read
    ``::1:7400`` as some other IPv6 address, and retry for ever a target it can never reach
    (another scheme, ``unix:`` without a path); see also :func:`address_text_problem`.

    An empty host (``:7400``) is a problem for gRPC, which needs one to connect to or bind;
    ``empty_host=True`` allows it, for a listener where it means every interface.
    ``listener=True`` takes only what a server binds: ``HOST:PORT`` or ``unix:PATH``."""
    problem = address_text_problem(target)
    if problem is not None:
        return problem
    m = _SCHEME.match(target)
    if m is None:
        return _host_port_problem(target, empty_host)
    scheme, rest = m.group(1), target[m.end() :]
    known = scheme.lower() in TARGET_SCHEMES or scheme.lower() in _REFUSED_SCHEMES
    if not known and not rest.startswith("//"):
        return _host_port_problem(target, empty_host)  # "localhost:7400": a host, not a scheme
    if listener and scheme.lower() != "unix":
        return f"a listen address is HOST:PORT or unix:PATH (not {scheme}:…)"
    if scheme.lower() in _REFUSED_SCHEMES:
        return f"scheme {scheme}: is not taken: {_REFUSED_SCHEMES[scheme.lower()]}"
    if scheme.lower() not in TARGET_SCHEMES:
        forms = ", ".join(f"{s}:" for s in TARGET_SCHEMES)
        return f"unknown scheme {scheme}: (gRPC targets are HOST:PORT, [v6]:PORT, {forms})"
    if scheme != scheme.lower():
        return f"the scheme is written in lower case: {scheme.lower()}:"
    return _SCHEME_CHECKS[scheme](rest)


def _host_port_problem(target: str, empty_host: bool) -> str | None:
    """What is wrong with ``target`` as ``HOST:PORT`` (``[v6addr]:PORT``), or ``None``."""
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
    if len(port.lstrip("0")) > 5 or int(port) > 65535:  # (never int() of 4,300+ digits)
        return f"port {_shorten(port)} is out of range (0-65535)"
    if target.startswith((":", "[]")) and not empty_host:
        return "missing host (HOST:PORT, e.g. 127.0.0.1:7400)"
    return None


def _shorten(digits: str) -> str:
    """``digits`` as shown in a message: a long run cut to its first and last ones."""
    return digits if len(digits) <= 20 else f"{digits[:8]}…{digits[-4:]} ({len(digits)} digits)"


def _unix_problem(rest: str) -> str | None:
    """``unix:PATH`` or ``unix:///ABSOLUTE/PATH`` (``rest``: what follows ``unix:``)."""
    path = rest
    if rest.startswith("//"):
        authority, _, path = rest[2:].partition("/")
        if authority:
            return (
                f"unix://{authority}/… names a host, which a unix socket has none of: "
                "unix:PATH or unix:///ABSOLUTE/PATH"
            )
    if not path.strip("/"):
        return "names no socket path (unix:PATH)"
    if "%" in path:  # gRPC decodes %XX in a unix: address: it would reach another path
        return "a '%' in a unix socket path is not supported (gRPC reads %XX as an escape)"
    return None


def _unix_abstract_problem(rest: str) -> str | None:
    return None if rest else "names no socket (unix-abstract:NAME)"


def _dns_problem(rest: str) -> str | None:
    """``dns:HOST:PORT`` or ``dns:///HOST:PORT``."""
    if rest.startswith("//"):
        authority, slash, rest = rest[2:].partition("/")
        if authority or not slash:
            return (
                "a DNS server in the target (dns://SERVER/…) is not supported: "
                "dns:///HOST:PORT or dns:HOST:PORT"
            )
    problem = _host_port_problem(rest, empty_host=False)
    return None if problem is None else f"after dns: {problem}"


def _literal_problem(rest: str, version: int) -> str | None:
    """``ipv4:ADDR:PORT[,ADDR:PORT…]`` or ``ipv6:[ADDR]:PORT[,…]``: address literals."""
    form = ("ipv4:ADDR:PORT" if version == 4 else "ipv6:[ADDR]:PORT") + "[,…]"
    for address in rest.split(","):
        problem = _host_port_problem(address, empty_host=False)
        if problem is not None:
            return f"{address!r}: {problem} ({form})"
        host = address.rpartition(":")[0]
        if version == 6 and host.startswith("["):
            host = host[1:-1]
        try:
            literal = ipaddress.ip_address(host).version == version
        except ValueError:
            literal = False
        if not literal:
            return f"{host!r} is not an IPv{version} address ({form})"
    return None


_SCHEME_CHECKS: dict[str, Callable[[str], str | None]] = {
    "dns": _dns_problem,
    "ipv4": lambda rest: _literal_problem(rest, 4),
    "ipv6": lambda rest: _literal_problem(rest, 6),
    "unix": _unix_problem,
    "unix-abstract": _unix_abstract_problem,
}


_METADATA_KEY = re.compile(r"[0-9a-z_.-]+")
_HEADER_VALUE = re.compile(r"[ -~]*")


def stays_on_this_host(target: str) -> bool:
    """Whether the gRPC address ``target`` (checked by :func:`server_address_problem`)
    reaches this host only: a unix socket, ``localhost`` or a loopback address. What is
    sent there in clear text (a bearer token without TLS) crosses no network."""
    scheme, sep, rest = target.partition(":")
    if sep and scheme in ("unix", "unix-abstract"):
        return True
    if sep and scheme in ("dns", "ipv4", "ipv6"):
        target = rest.removeprefix("//").removeprefix("/")
    hosts = [address.rpartition(":")[0] for address in target.split(",")]
    return all(_is_loopback(host.strip("[]")) for host in hosts)


def _is_loopback(host: str) -> bool:
    """``localhost``, or an address of this host's loopback (an IPv4-mapped IPv6 one
    included: ``::ffff:127.0.0.1``). Not ``localhost.``: gRPC's resolvers ask the network's
    DNS for a name ending in a dot, not ``/etc/hosts``."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def metadata_problem(key: str, value: str | bytes) -> str | None:
    """What keeps ``(key, value)`` out of a gRPC call's metadata, or ``None``: a key of
    lower-case ASCII letters, digits, ``_``, ``-`` and ``.`` (not ``grpc-…``, gRPC's own);
    a value of printable ASCII, or bytes for a key ending ``-bin``. gRPC itself fails every
    call with an internal error for such a pair."""
    if not isinstance(key, str) or not _METADATA_KEY.fullmatch(key):
        return f"metadata key {key!r}: lower-case letters, digits, '_', '-' and '.' only"
    if key.startswith("grpc-"):
        return f"metadata key {key!r}: keys starting 'grpc-' are gRPC's own"
    if key.endswith("-bin"):
        if not isinstance(value, bytes):
            return f"metadata key {key!r}: a key ending '-bin' takes bytes, not {value!r}"
        return None
    if not isinstance(value, str):
        return f"metadata key {key!r}: its value must be a string, not {value!r}"
    problem = _header_value_problem(value)
    return None if problem is None else f"metadata key {key!r}: its value {problem}"


def sendable_metadata(
    pairs: Iterable[tuple[str, str]], where: str = ""
) -> tuple[tuple[str, str], ...]:
    """``pairs`` as a call sends them: each ASCII key in lower case (header names are case-
    insensitive, and HTTP/2 sends them in lower case: ``X-Trace`` is the header ``x-trace``),
    each pair checked (:func:`metadata_problem`): :class:`ValueError` naming the first one
    gRPC cannot send, its message after ``where``."""
    sent = tuple((k.lower() if isinstance(k, str) and k.isascii() else k, v) for k, v in pairs)
    for key, value in sent:
        if (problem := metadata_problem(key, value)) is not None:
            raise ValueError(f"{where}{problem}")
    return sent


def _header_value_problem(value: str) -> str | None:
    """``"contains a character not allowed in a gRPC header: …"`` naming the first one
    that is not printable ASCII (space to ``~``) and its position (from 0), or ``None``."""
    if _HEADER_VALUE.fullmatch(value):
        return None
    position, char = next((i, c) for i, c in enumerate(value) if not " " <= c <= "~")
    return (
        f"contains a character not allowed in a gRPC header: {char!r} "
        f"(U+{ord(char):04X}) at position {position}"
    )


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
    return _header_value_problem(token)
