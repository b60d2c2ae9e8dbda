"""The NBD export: every volume of the registry as a fixed-newstyle NBD export.

Export name = volume name; the empty name selects the first volume. This module binds the
listening socket (exclusively), keeps the sessions and the counters (:class:`NbdStats`, plain
numbers the metrics module exports). A misaligned write's read-modify-write is the engine's
(:meth:`Volume.write_at`), atomic against every writer of the volume.

With a TLS context (``[server] nbd_tls_cert``/``nbd_tls_key``,
:func:`~.tls_files.nbd_tls_context`) the export requires TLS: the NBD protocol's "forced TLS"
mode. Every option before a successful ``NBD_OPT_STARTTLS`` but ``NBD_OPT_ABORT`` is answered
``NBD_REP_ERR_TLS_REQD`` (``NBD_OPT_EXPORT_NAME``, which cannot take an error, ends the
connection); ``NBD_OPT_STARTTLS`` is answered ``NBD_REP_ACK`` and the server side of the TLS
handshake runs on the connection (``loop.start_tls``, uvloop's or asyncio's), which must be
done within :data:`~.nbd_session.TLS_DEADLINE` seconds of connecting; option haggling and the
transmission phase then go on over TLS as they do in clear. A handshake that fails closes the
connection, is logged (rate-limited, naming the client and the reason) and counted
(:attr:`NbdStats.tls_handshake_failures`). With a CA bundle (``nbd_tls_ca``) a client must
present a certificate it signed. Without a TLS context, ``NBD_OPT_STARTTLS`` is answered
``NBD_REP_ERR_UNSUP``.

The parts: :mod:`.nbd_protocol` (wire format), :mod:`.nbd_handshake` (option haggling),
:mod:`.nbd_session` (one connection: parser, dispatch, replies), :mod:`.nbd_commands` (what
each command does to the volume).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config import ServerConfig
from .failure_log import StorageFailureLog
from .nbd_session import NbdSession
from .netaddr import SocketFile, bound_address, listen_socket
from .ratelimit import RateLimitedLog
from .registry import VolumeRegistry

__all__ = ["DEFAULT_MAX_CONNECTIONS", "NbdServer", "NbdStats", "RequestHook", "start_nbd_server"]

log = logging.getLogger(__name__)

RequestHook = Callable[[str, str, str, str, float, int], None]
"""``hook(volume, command, result, status, seconds, nbytes)``, called once per finished
request: ``result`` is ``ok`` or the NBD error name, ``status`` the gRPC status code name a
gRPC request with the same outcome gets (``OK``, ``OUT_OF_RANGE``, …; :mod:`.status`)."""

_SHUTDOWN_GRACE = 10.0  # seconds in-flight requests get to finish when the server closes

DEFAULT_MAX_CONNECTIONS = ServerConfig.nbd_max_connections
"""NBD connections a server takes at once, by default (``[server] nbd_max_connections``: 64).
Each may pin ~72 MiB (64 MiB of requests in flight, 8 MiB of unsent replies), so the default
bounds the export at ~4.5 GiB."""


@dataclass
class NbdStats:
    """Counters of the NBD front end (plain numbers; the metrics module exports them).

    ``requests`` counts finished requests by ``(command, result)``: command is ``read``,
    ``write``, ``flush``, ``trim``, ``write_zeroes``, ``cache``, ``block_status`` or
    ``unknown``; result is ``ok`` or the NBD error name (``EINVAL``, ``EIO``, …).
    ``on_request``, when set, is called for every finished request (:data:`RequestHook`).
    """

    connections_total: int = 0  # TCP / unix connections accepted
    connections_refused: int = 0  # of those, refused: over the server's max_connections
    sessions_total: int = 0  # connections that reached the transmission phase
    sessions_active: int = 0
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    bytes_read: int = 0
    bytes_written: int = 0
    tls_handshake_failures: int = 0  # TLS handshakes after NBD_OPT_STARTTLS that failed
    volume_sessions: Counter[str] = field(default_factory=Counter)  # active, per volume
    on_request: RequestHook | None = None

    def snapshot(self) -> dict[str, Any]:
        """A JSON-friendly copy (for Inspect)."""
        return {
            "connections_total": self.connections_total,
            "connections_refused": self.connections_refused,
            "sessions_total": self.sessions_total,
            "sessions_active": self.sessions_active,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "tls_handshake_failures": self.tls_handshake_failures,
            "requests": [
                {"command": cmd, "result": res, "count": n}
                for (cmd, res), n in sorted(self.requests.items())
            ],
            "volume_sessions": {k: v for k, v in sorted(self.volume_sessions.items()) if v},
        }


class NbdServer:
    """A listening NBD endpoint over a :class:`VolumeRegistry`; made by
    :func:`start_nbd_server`."""

    def __init__(
        self,
        registry: VolumeRegistry,
        max_io: int,
        stats: NbdStats,
        server_id: str = "",
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        tls: ssl.SSLContext | None = None,
        failures: StorageFailureLog | None = None,
    ) -> None:
        self.address = ""
        self.failures = failures if failures is not None else StorageFailureLog()
        """Where requests that failed in storage are logged (shared with the gRPC side)."""
        self.server_id = server_id
        """The id of the server process, named in every export's description."""
        self.registry = registry
        self.max_io = max_io
        self.max_connections = max_connections
        """Connections taken at once: those that chose an export (``NBD_OPT_GO`` or
        ``NBD_OPT_EXPORT_NAME``; serving, or haggling on after it) and are still open. Past
        it, a client's choice is answered ``NBD_REP_ERR_POLICY`` naming the limit, then the
        connection closes; listing exports or asking about one is never refused. A connection
        that has not proved itself yet is also one of at most as many again (past that,
        closed at once, counted as refused): in clear, until it chooses an export (within
        the handshake's 60 s); with TLS, until TLS is on (within
        :data:`~.nbd_session.TLS_DEADLINE` seconds), so clients that have not authenticated
        cannot hold the places of those that have. Connections that never choose therefore
        pin bounded memory (each at most a receive buffer and one option)."""
        self.stats = stats
        self.tls = tls
        """The server-side TLS context: when set, every connection must start TLS."""
        self._refusal_log = RateLimitedLog(log)
        self.client_faults = RateLimitedLog(log)
        """Log of clients' protocol faults and timeouts: any client can cause them, so
        they are rate-limited (one line per 10 s for the same kind)."""
        self._tls_log = RateLimitedLog(log)
        self._server: asyncio.Server | None = None
        self._sessions: set[NbdSession] = set()
        self._admitted: set[NbdSession] = set()  # those that chose an export, at most max
        # Not proved yet: in clear, no export chosen; with TLS, TLS not on.
        self._unproven: set[NbdSession] = set()
        self._zeros = bytes(1 << 20)
        self._socket_file: SocketFile | None = None
        self._closing = False

    @property
    def closing(self) -> bool:
        """True once :meth:`close` has begun."""
        return self._closing

    def zeros(self, nbytes: int) -> memoryview:
        """``nbytes`` zeros: a view of one shared read-only buffer."""
        if len(self._zeros) < nbytes:
            self._zeros = bytes(max(nbytes, 1 << 20))
        return memoryview(self._zeros)[:nbytes]

    def add_session(self, session: NbdSession, peer: str) -> bool:
        """Count a new connection in; False when as many connections as
        :attr:`max_connections` have not proved themselves yet (in clear: chosen an export;
        with TLS: started TLS): close it now (counted and logged as refused). It takes a
        place among :attr:`max_connections` only when it chooses an export (:meth:`admit`)."""
        if len(self._unproven) >= self.max_connections:
            waiting = "waiting for TLS" if self.tls is not None else "choosing an export"
            self._refuse(peer, f"too many NBD connections {waiting}")
            return False
        self._unproven.add(session)
        self._sessions.add(session)
        return True

    def tls_on(self, session: NbdSession) -> None:
        """``session``'s TLS handshake succeeded: it has proved itself."""
        self._unproven.discard(session)

    def admit(self, session: NbdSession, peer: str) -> str:
        """``session`` chooses an export that exists (``NBD_OPT_GO``, ``NBD_OPT_EXPORT_NAME``):
        take it among :attr:`max_connections` (the sessions that chose one and are still
        open), returning ""; else why it is refused (counted and logged, rate-limited). A
        client that only lists exports, asks about one, or names one that does not exist
        takes no place and is never refused."""
        if session in self._admitted or len(self._admitted) < self.max_connections:
            self._admitted.add(session)
            self._unproven.discard(session)
            return ""
        why = (
            f"too many NBD connections: this server takes {self.max_connections} at once "
            "(nbd_max_connections)"
        )
        self._refuse(peer, why)
        return why

    def _refuse(self, peer: str, why: str) -> None:
        self.stats.connections_refused += 1
        self._refusal_log.warning("NBD %s refused: %s", peer, why)

    def tls_failed(self, peer: str, reason: str) -> None:
        """A TLS handshake with ``peer`` failed (its connection closes): counted, and logged
        (rate-limited)."""
        self.stats.tls_handshake_failures += 1
        self._tls_log.warning("NBD %s: TLS handshake failed: %s; closing", peer, reason)

    def remove_session(self, session: NbdSession) -> None:
        self._sessions.discard(session)
        self._admitted.discard(session)
        self._unproven.discard(session)

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
        if self._socket_file is not None:
            self._socket_file.remove()
            self._socket_file = None
        log.info("NBD server on %s closed", self.address)


async def start_nbd_server(
    address: str,
    registry: VolumeRegistry,
    *,
    max_io: int,
    stats: NbdStats | None = None,
    server_id: str = "",
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    tls: ssl.SSLContext | None = None,
    failures: StorageFailureLog | None = None,
) -> NbdServer:
    """Listen for NBD clients on ``address`` (``HOST:PORT``, port 0 = any, or
    ``unix:/path``) and export every volume of ``registry``.

    ``max_io`` is the largest read or write payload (the advertised maximum block size);
    ``server_id`` (the gRPC server's, :func:`~.hops.new_server_id`) ends every export's
    ``NBD_INFO_DESCRIPTION``; ``max_connections`` bounds the connections at once
    (:attr:`NbdServer.max_connections`); ``tls``, a server-side context, makes the export
    require TLS (the module's docstring); ``failures`` logs the requests that fail in
    storage (one of its own if not given).
    Raises :class:`OSError` naming the address when it cannot be bound (e.g. in use).
    """
    if max_io < 512:
        raise ValueError(f"max_io {max_io} is smaller than one 512-byte sector")
    if max_connections < 1:
        raise ValueError(f"max_connections {max_connections} is not at least 1")
    server = NbdServer(
        registry,
        max_io,
        stats if stats is not None else NbdStats(),
        server_id,
        max_connections,
        tls,
        failures,
    )
    loop = asyncio.get_running_loop()

    def factory() -> NbdSession:
        return NbdSession(server)

    sock = listen_socket(address, "NBD")
    try:
        if sock.family == socket.AF_UNIX:
            server._server = await loop.create_unix_server(factory, sock=sock)
        else:
            server._server = await loop.create_server(factory, sock=sock)
    except BaseException:
        sock.close()
        raise
    server.address = bound_address(sock)
    server._socket_file = SocketFile.of(sock)
    log.info(
        "NBD server listening on %s%s",
        server.address,
        " (TLS required)" if tls is not None else "",
    )
    return server
