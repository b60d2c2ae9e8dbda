"""Listen addresses, parsed and bound exclusively: ``HOST:PORT``, ``[v6]:PORT``, ``unix:PATH``.

Every front end (gRPC, ``/metrics``, NBD) binds through here, so they all refuse an address in
use the same way: no ``SO_REUSEPORT`` (``SO_REUSEADDR`` only lets a restart rebind past
TIME_WAIT; Linux still refuses a second listener), a unix socket path someone listens on is
refused, and a stale one left by a crashed server is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

__all__ = [
    "AddressInUse",
    "SocketFile",
    "bind_failure",
    "bind_tcp_or_unix",
    "bound_address",
    "claim_unix_path",
    "listen_socket",
    "reachable_address",
    "split_host_port",
]

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

_BACKLOG = 128


class AddressInUse(OSError):
    """The address is taken by another process, or cannot be bound; the message names it.

    Made as ``AddressInUse(errno, message)`` (or with the message alone), its string is the
    message: no ``[Errno 98]`` prefix in the one line ``tierdisk serve`` prints."""

    def __str__(self) -> str:
        return self.strerror if self.strerror is not None else super().__str__()


def split_host_port(address: str, what: str = "listen") -> tuple[str, int]:
    """``("127.0.0.1", 7400)`` from ``"127.0.0.1:7400"`` (``[::1]:7400`` for IPv6; an empty
    host means every interface). The port is ASCII digits: ``str.isdigit`` alone takes
    ``"²"`` (which ``int`` then refuses) and ``"٣"`` (which it reads as 3).
    :class:`ValueError` naming ``what`` and the address otherwise."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not (port_text.isascii() and port_text.isdigit()):  # not "²", "٣"
        raise ValueError(f"{what} address {address!r} is not HOST:PORT or unix:/path")
    if len(port_text.lstrip("0")) > 5 or int(port_text) > 65535:  # (no int() of 4,300 digits)
        shown = port_text if len(port_text) <= 20 else f"of {len(port_text)} digits"
        raise ValueError(f"{what} address {address!r:.80}: port {shown} is out of range")
    port = int(port_text)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


def reachable_address(bound: str, via: str) -> str:
    """The address of a listener bound at ``bound`` as seen by a client that reaches the same
    server at ``via``: a listener on every interface (``0.0.0.0:10809``, ``[::]:10809``,
    ``:10809``) is reached on ``via``'s host (``127.0.0.1`` when ``via`` is a unix socket);
    any other address is returned as it is."""
    if bound.startswith("unix:"):
        return bound
    host, port = split_host_port(bound)
    if host not in _WILDCARD_HOSTS:
        return bound
    if via.startswith("unix:"):
        return f"127.0.0.1:{port}"
    via_host, _ = split_host_port(via, "target")
    return f"[{via_host}]:{port}" if ":" in via_host else f"{via_host}:{port}"


def claim_unix_path(path: str, what: str) -> None:
    """Refuse a unix socket path another process listens on (or a path that is not a
    socket); remove a stale socket nobody listens on. Creates the parent folder.

    Every refusal is an :class:`AddressInUse` whose message names the listener ``what`` and
    the address, with the reason: also a parent that is a file, or a folder that cannot be
    looked into or created (not a bare ``[Errno 20] Not a directory: '…'``)."""
    address = f"unix:{path}"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise _unusable_path(what, address, parent, exc) from None
        return
    except OSError as exc:  # ENOTDIR (a parent is a file), EACCES, ELOOP, ENAMETOOLONG
        raise _unusable_path(what, address, os.path.dirname(path), exc) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise AddressInUse(
            errno.EADDRINUSE, f"cannot listen for {what} on {address}: the path exists"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # a leftover of a crashed server
        return
    except OSError:
        return
    finally:
        probe.close()
    raise AddressInUse(
        errno.EADDRINUSE, f"cannot listen for {what} on {address}: address already in use"
    )


def _unusable_path(what: str, address: str, parent: str, exc: OSError) -> AddressInUse:
    """The refusal of a unix socket ``address`` whose folder ``parent`` cannot hold it."""
    in_the_way = _not_a_folder(address[len("unix:") :])
    if exc.errno in (errno.ENOTDIR, errno.EEXIST) and in_the_way is not None:
        why = f"{in_the_way} is not a folder"
    else:
        why = f"cannot use or create the folder {parent or '.'}: {exc.strerror or exc}"
    return AddressInUse(exc.errno, f"cannot listen for {what} on {address}: {why}")


def _not_a_folder(path: str) -> str | None:
    """The first folder on ``path`` (from the root) that exists but is no folder, or None."""
    folders: list[str] = []
    head = os.path.dirname(path)
    while head and head not in folders:
        folders.append(head)
        head = os.path.dirname(head)
    return next((f for f in reversed(folders) if os.path.exists(f) and not os.path.isdir(f)), None)


def _reason(exc: OSError) -> str:
    """Why a bind failed, in words: ``address already in use``, else the system's."""
    if exc.errno == errno.EADDRINUSE:
        return "address already in use"
    return exc.strerror or str(exc)


def _refused(what: str, address: str, exc: OSError) -> AddressInUse:
    return AddressInUse(exc.errno, f"cannot listen for {what} on {address}: {_reason(exc)}")


def _resolve(address: str, what: str) -> tuple[int, int, int, tuple[object, ...]]:
    """``(family, type, proto, sockaddr)`` to listen on the TCP ``address``;
    :class:`socket.gaierror` when its host does not resolve."""
    host, port = split_host_port(address, what)
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, sockaddr = infos[0]
    return family, kind, proto, sockaddr


def listen_socket(address: str, what: str) -> socket.socket:
    """A non-blocking listening socket on ``address``; :class:`AddressInUse` naming it when
    taken, ``ValueError`` when malformed."""
    if address.startswith("unix:"):
        path = address[len("unix:") :]
        if not path:
            raise ValueError(f"{what} address 'unix:' needs a path")
        claim_unix_path(path, what)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sockaddr: str | tuple[object, ...] = path
    else:
        try:
            family, kind, proto, sockaddr = _resolve(address, what)
        except socket.gaierror as exc:
            raise OSError(
                errno.EADDRNOTAVAIL, f"cannot resolve {what} address {address}: {exc.strerror}"
            ) from None
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(sockaddr)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise _refused(what, address, exc) from None
    return sock


def bind_failure(address: str) -> str:
    """Why a listener cannot bind the TCP ``address``, for a library that does not say (gRPC's
    ``add_insecure_port`` returns 0): the system's reason from trying it here, e.g.
    ``address already in use``; ``not available`` when it binds here after all."""
    try:
        family, kind, proto, sockaddr = _resolve(address, "")
    except socket.gaierror as exc:
        return f"cannot resolve the host: {exc.strerror}"
    except ValueError as exc:
        return str(exc)
    with socket.socket(family, kind, proto) as sock:
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            return _reason(exc)
    return "not available"


@dataclass(frozen=True)
class SocketFile:
    """The file a unix listening socket made, to remove when the server closes: only while it
    is still that file (device and inode), never a socket a later server put at the path."""

    path: str
    ident: tuple[int, int]

    @classmethod
    def of(cls, sock: socket.socket) -> SocketFile | None:
        """The socket file of ``sock``; None for a TCP socket."""
        if sock.family != socket.AF_UNIX:
            return None
        path = sock.getsockname()
        st = os.stat(path)
        return cls(path, (st.st_dev, st.st_ino))

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self.ident:
                os.unlink(self.path)


def bound_address(sock: socket.socket) -> str:
    """The address ``sock`` listens on, in config form (the real port when 0 was asked)."""
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


async def bind_tcp_or_unix(
    address: str, handler: Handler, what: str
) -> tuple[asyncio.Server, str, SocketFile | None]:
    """Start an asyncio stream server on ``address``; return it, the bound address and, for
    a unix socket, the socket file to remove at close."""
    sock = listen_socket(address, what)
    try:
        if sock.family == socket.AF_UNIX:
            server = await asyncio.start_unix_server(handler, sock=sock)
        else:
            server = await asyncio.start_server(handler, sock=sock)
    except BaseException:
        sock.close()
        raise
    return server, bound_address(sock), SocketFile.of(sock)
