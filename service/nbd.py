"""The NBD export: every volume of the registry as a fixed-newstyle NBD export.

Export name = volume name; the empty name selects the first volume. This module binds the
listening socket (exclusively), keeps the sessions, the counters (:class:`NbdStats`, plain
numbers the metrics module exports) and, per volume, the range lock that makes the
read-modify-write of misaligned requests safe against concurrent writes.

The parts: :mod:`.nbd_protocol` (wire format), :mod:`.nbd_handshake` (option haggling),
:mod:`.nbd_session` (one connection: parser, dispatch, replies), :mod:`.nbd_commands` (what
each command does to the volume).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .nbd_commands import RangeLock
from .nbd_session import NbdSession
from .registry import VolumeRegistry
from .volume import Volume

__all__ = ["NbdServer", "NbdStats", "RequestHook", "start_nbd_server"]

log = logging.getLogger(__name__)

RequestHook = Callable[[str, str, str, float, int], None]
"""``hook(volume, command, result, seconds, nbytes)``, called once per finished request."""

_SHUTDOWN_GRACE = 10.0  # seconds in-flight requests get to finish when the server closes
_BACKLOG = 128


@dataclass
class NbdStats:
    """Counters of the NBD front end (plain numbers; the metrics module exports them).

    ``requests`` counts finished requests by ``(command, result)``: command is ``read``,
    ``write``, ``flush``, ``trim``, ``write_zeroes``, ``cache``, ``block_status`` or
    ``unknown``; result is ``ok`` or the NBD error name (``EINVAL``, ``EIO``, …).
    ``on_request``, when set, is called for every finished request with the volume name,
    the command, the result, the seconds it took and the payload bytes it moved.
    """

    connections_total: int = 0  # TCP / unix connections accepted
    sessions_total: int = 0  # connections that reached the transmission phase
    sessions_active: int = 0
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    bytes_read: int = 0
    bytes_written: int = 0
    volume_sessions: Counter[str] = field(default_factory=Counter)  # active, per volume
    on_request: RequestHook | None = None

    def snapshot(self) -> dict[str, Any]:
        """A JSON-friendly copy (for Inspect)."""
        return {
            "connections_total": self.connections_total,
            "sessions_total": self.sessions_total,
            "sessions_active": self.sessions_active,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "requests": [
                {"command": cmd, "result": res, "count": n}
                for (cmd, res), n in sorted(self.requests.items())
            ],
            "volume_sessions": {k: v for k, v in sorted(self.volume_sessions.items()) if v},
        }


class NbdServer:
    """A listening NBD endpoint over a :class:`VolumeRegistry`; made by
    :func:`start_nbd_server`."""

    def __init__(self, registry: VolumeRegistry, max_io: int, stats: NbdStats) -> None:
        self.address = ""
        self.registry = registry
        self.max_io = max_io
        self.stats = stats
        self._server: asyncio.Server | None = None
        self._sessions: set[NbdSession] = set()
        self._locks: weakref.WeakKeyDictionary[Volume, RangeLock] = weakref.WeakKeyDictionary()
        self._zeros = bytes(1 << 20)
        self._unix_path: str | None = None
        self._unix_id: tuple[int, int] | None = None
        self._closing = False

    @property
    def closing(self) -> bool:
        """True once :meth:`close` has begun."""
        return self._closing

    def range_lock(self, volume: Volume) -> RangeLock:
        """The range lock shared by every session of ``volume``."""
        lock = self._locks.get(volume)
        if lock is None:
            lock = self._locks[volume] = RangeLock()
        return lock

    def zeros(self, nbytes: int) -> memoryview:
        """``nbytes`` zeros: a view of one shared read-only buffer."""
        if len(self._zeros) < nbytes:
            self._zeros = bytes(max(nbytes, 1 << 20))
        return memoryview(self._zeros)[:nbytes]

    def add_session(self, session: NbdSession) -> None:
        self._sessions.add(session)

    def remove_session(self, session: NbdSession) -> None:
        self._sessions.discard(session)

    async def close(self) -> None:
        """Stop accepting; let requests in flight finish (bounded), then close sessions."""
        if self._closing:
            return
        self._closing = True
        if self._server is not None:
            self._server.close()
        sessions = list(self._sessions)
        if sessions:
            await asyncio.gather(
                *(s.shutdown(_SHUTDOWN_GRACE) for s in sessions), return_exceptions=True
            )
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)
        self._remove_unix_socket()
        log.info("NBD server on %s closed", self.address)

    def _remove_unix_socket(self) -> None:
        path, ident = self._unix_path, self._unix_id
        if path is None:
            return
        self._unix_path = None
        with contextlib.suppress(OSError):
            st = os.stat(path)
            if (st.st_dev, st.st_ino) == ident:
                os.unlink(path)


def _split_host_port(address: str) -> tuple[str, int]:
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"NBD address {address!r} is not HOST:PORT or unix:/path")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"NBD address {address!r}: port {port} is out of range")
    return host, port


def _in_use(address: str, exc: OSError) -> OSError:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        reason = "address already in use"
    return OSError(exc.errno, f"cannot listen for NBD on {address}: {reason}")


def _bind_tcp(address: str) -> socket.socket:
    host, port = _split_host_port(address)
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise OSError(errno.EADDRNOTAVAIL, f"cannot resolve NBD address {address}: {exc}") from None
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        # SO_REUSEADDR only lets us rebind past TIME_WAIT; Linux still refuses a second
        # listener on the port. No SO_REUSEPORT: an address in use is an error.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise _in_use(address, exc) from None
    return sock


def _bind_unix(address: str, path: str) -> socket.socket:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EADDRINUSE, f"cannot listen for NBD on {address}: the path exists")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # a stale socket nobody listens on
        except OSError:
            pass
        else:
            raise OSError(
                errno.EADDRINUSE,
                f"cannot listen for NBD on {address}: address already in use",
            )
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise _in_use(address, exc) from None
    return sock


async def start_nbd_server(
    address: str, registry: VolumeRegistry, *, max_io: int, stats: NbdStats | None = None
) -> NbdServer:
    """Listen for NBD clients on ``address`` (``HOST:PORT``, port 0 = any, or
    ``unix:/path``) and export every volume of ``registry``.

    ``max_io`` is the largest read or write payload (the advertised maximum block size).
    Raises :class:`OSError` naming the address when it cannot be bound (e.g. in use).
    """
    if max_io < 512:
        raise ValueError(f"max_io {max_io} is smaller than one 512-byte sector")
    server = NbdServer(registry, max_io, stats if stats is not None else NbdStats())
    loop = asyncio.get_running_loop()

    def factory() -> NbdSession:
        return NbdSession(server)

    if address.startswith("unix:"):
        path = address[len("unix:") :]
        if not path:
            raise ValueError("NBD address 'unix:' needs a path")
        sock = _bind_unix(address, path)
        try:
            server._server = await loop.create_unix_server(factory, sock=sock)
        except BaseException:
            sock.close()
            raise
        st = os.stat(path)
        server._unix_path, server._unix_id = path, (st.st_dev, st.st_ino)
        server.address = f"unix:{path}"
    else:
        sock = _bind_tcp(address)
        try:
            server._server = await loop.create_server(factory, sock=sock)
        except BaseException:
            sock.close()
            raise
        host, port = sock.getsockname()[:2]
        server.address = f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"
    log.info("NBD server listening on %s", server.address)
    return server
