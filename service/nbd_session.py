"""One NBD connection: the receive buffer and request parser, dispatch, and replies.

The session is an :class:`asyncio.BufferedProtocol` with its own parser: requests are cut
out of one receive buffer (no read call per request), a large write payload is received
straight into one ``bytearray`` of its size, and every request runs as its own task, so
requests are served concurrently and replied out of order. A reply is written whole in one
synchronous step (``transport.writelines([header, data])``, no concatenation), which is the
write lock: replies never interleave. When the transport's buffer is over its high-water
mark, replies wait for it to drain (one reply at most goes over it). A request starts only
while the transport's buffer is under that mark, and only if the requests in flight stay
within ``_MAX_INFLIGHT`` and ``_MAX_INFLIGHT_BYTES`` with it (else reading pauses; a request
larger than the byte limit starts alone): the bytes count write payloads received and the
largest reply each started request can make the server hold (a read's data, a block
status's extents; :func:`.nbd_commands.reply_bytes`), from the request's start until its
reply is handed to the transport. So a client that pipelines reads and does not read the
replies pins at most about ``_MAX_INFLIGHT_BYTES`` (or one request, if larger) plus
``_WRITE_HIGH`` plus one reply of the server's memory: with ``max_io`` at 16 MiB, ~88 MiB
(~104 MiB for a client that agreed no block sizes, whose requests may be 32 MiB).

At the client's EOF (half-close), the complete requests already received are still served
(within the same limits), then the connection closes; this holds from the very first
request, also when it arrived together with the handshake. A session is counted in
:class:`~.nbd.NbdStats` (``sessions_active``, ``volume_sessions``) from its transmission
phase to the connection's end, and only if the connection still stands when that phase
begins.

The handshake (:mod:`.nbd_handshake`) runs first, as a task reading from the same buffer;
the commands themselves are in :mod:`.nbd_commands`. Until the transmission phase the
transport's write buffer limits are small (``_HANDSHAKE_WRITE_HIGH``), the handshake reads
the next option only once its replies drained below them, and reading pauses while
``_RECV_BUFFER`` bytes wait unread: a client that pipelines options without reading the
replies (the spec forbids it) pins ~320 KiB (or one option, if larger), not every reply.

TLS (the server has a TLS context): ``NBD_OPT_STARTTLS`` is acknowledged in clear and the
connection is handed at once to ``loop.start_tls`` (server side), with this session as the
protocol of the TLS transport it returns; from then on every byte goes through that
transport (``self._transport``: the handshake's replies, every reply, the refusals at
shutdown; nothing here writes to the socket any other way) and the receive buffer fills
from it as before. Its write buffer limits are the ones above (the handshake's, then the
transmission phase's), and the TCP transport under it keeps asyncio's default limits, so
the replies a session holds stay bounded as in clear.
A TLS handshake that fails (or is cut off by the handshake timeout or a shutdown) aborts the
connection, and the session ends itself at once (a ``connection_lost`` that asyncio
delivers later, if at all, for a connection lost in the TLS handshake is ignored). Until TLS is
on a connection holds no place among the server's ``max_connections`` (:class:`.nbd.NbdServer`)
and has :data:`TLS_DEADLINE` seconds to get there. TLS has no half-close: asyncio's TLS transport
closes on the client's ``close_notify`` (or EOF), so the complete requests received before
it are still started, but their replies are not sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any, cast

from . import nbd_commands as C
from . import nbd_protocol as P
from .errors import SHUTTING_DOWN, TierdiskError, Unavailable
from .nbd_handshake import Hangup, negotiate
from .status import nbd_error, status_name, status_name_of

if TYPE_CHECKING:
    from .nbd import NbdServer

__all__ = ["NbdSession"]

log = logging.getLogger("tierdisk.service.nbd")

_RECV_BUFFER = 256 * 1024
_BIG_PAYLOAD = 64 * 1024  # write payloads this large are received in place
_MAX_INFLIGHT = 256  # requests in flight per session before reading pauses
_MAX_INFLIGHT_BYTES = 64 << 20  # payload bytes in flight (see above) before reading pauses
_WRITE_HIGH = 8 << 20  # transport write buffer limits
_WRITE_LOW = 2 << 20
_HANDSHAKE_WRITE_HIGH = 64 << 10  # the same, until the transmission phase (see _recv)
_HANDSHAKE_WRITE_LOW = 16 << 10
_HANDSHAKE_TIMEOUT = 60.0  # seconds a client has to reach the transmission phase
TLS_DEADLINE = 10.0
"""Seconds a client of an export that requires TLS has, from connecting, to have its TLS
handshake done (its ``NBD_OPT_STARTTLS`` and the handshake): until then it holds no place
among ``max_connections``, but one of as many waiting for TLS; a client past it is cut off
and counted as a failed TLS handshake."""
_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", 12)  # Linux
_TLS_SHUTDOWN_TIMEOUT = 5.0  # seconds a closing TLS connection waits for the client's close_notify
_SHUTDOWN_HANDSHAKE_WAIT = 1.0  # seconds a client in option haggling gets at shutdown to send
# an option (answered NBD_REP_ERR_SHUTDOWN) before the connection is closed

_TO_BUF, _TO_PAYLOAD, _TO_SKIP = 0, 1, 2
_WRITING = (P.CMD_WRITE, P.CMD_WRITE_ZEROES)
_CHANGING = (P.CMD_WRITE, P.CMD_WRITE_ZEROES, P.CMD_TRIM)
"""Commands whose success a later FLUSH must vouch for (:func:`.nbd_commands.flush`)."""


class NbdSession(asyncio.BufferedProtocol):
    """One client connection (made by the server's protocol factory)."""

    def __init__(self, server: NbdServer) -> None:
        self._server = server
        self._stats = server.stats
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._peer = "?"
        # receive buffer: the unparsed bytes are self._buf[self._start:self._end]
        self._buf = bytearray(_RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._target = _TO_BUF  # where the last get_buffer() pointed
        # a large write payload being received in place
        self._payload: bytearray | None = None
        self._payload_view: memoryview | None = None
        self._filled = 0
        self._pending = (0, 0, 0, 0)  # its request: flags, handle, offset, length
        self._skip = 0  # payload bytes of an oversized write still to discard
        self._scratch: memoryview | None = None
        # handshake
        self._waiter: asyncio.Future[None] | None = None
        self._want = 0
        self._handshake_task: asyncio.Task[None] | None = None
        # transmission
        self._export: C.Export | None = None
        self._max_io = 0
        self._tasks: dict[asyncio.Task[None], int] = {}  # requests in flight: their cost
        self._inflight_bytes = 0
        self._reading_paused = False
        self._writing_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._eof = False  # the client half-closed: serve what was received, then close
        self._closing = False  # no more requests are taken (DISC, shutdown, lost, bad magic)
        self._counted = False  # the session is counted in sessions_active
        self._tls = False  # TLS is on: self._transport is the TLS transport
        self._tls_starting = False  # start_tls has the connection (its handshake runs)
        self._tls_timer: asyncio.TimerHandle | None = None  # TLS_DEADLINE, until TLS is on
        self._gone = False  # connection_lost ran (asyncio's, or the session's own)
        self._lost: asyncio.Future[None] = self._loop.create_future()

    # -- asyncio protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's do not subclass asyncio.Transport, hence no check).
        self._transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=_HANDSHAKE_WRITE_HIGH, low=_HANDSHAKE_WRITE_LOW)
        peer = transport.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix socket"
        self._stats.connections_total += 1
        if not self._server.add_session(self, self._peer):
            transport.abort()  # too many not proved yet: refused (and counted) at once
            return
        if self._server.closing:
            transport.close()
            return
        self._handshake_task = self._loop.create_task(self._handshake())
        if self._server.tls is not None:
            self._tls_timer = self._loop.call_later(TLS_DEADLINE, self._tls_overdue)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._gone:  # a failed TLS handshake ends the session itself (_start_tls)
            return
        self._gone = True
        self._closing = True
        if self._tls_timer is not None:
            self._tls_timer.cancel()
        _wake(self._waiter)
        _wake(self._drained)
        export = self._export
        if export is not None and self._counted:
            self._counted = False
            self._stats.sessions_active -= 1
            self._stats.volume_sessions[export.name] -= 1
            log.debug("NBD session %s on %r ended", self._peer, export.name)
        self._server.remove_session(self)
        _wake(self._lost)

    def eof_received(self) -> bool | None:
        self._eof = True
        _wake(self._waiter)
        if self._tls or self._tls_starting:  # TLS closes whatever this answers
            if self._export is not None:
                self._parse()
            return None
        if self._export is None:
            # Still in the handshake: it fails on the missing bytes (and closes), or it ends
            # with an export and _begin serves the requests that came with it.
            handshake = self._handshake_task
            return True if handshake is not None and not handshake.done() else None
        held = self._parse()  # complete requests already received are still served
        if not self._tasks and not held:
            return None  # the transport closes
        return True  # keep the write side open; _go_on serves the rest, then closes

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        _wake(self._drained)
        self._drained = None
        if self._export is not None:
            self._go_on()  # requests held back while the buffer was full

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._payload_view is not None:
            self._target = _TO_PAYLOAD
            return self._payload_view[self._filled :]
        if self._skip:
            if self._scratch is None:
                self._scratch = memoryview(bytearray(_BIG_PAYLOAD))
            self._target = _TO_SKIP
            return self._scratch[: min(self._skip, len(self._scratch))]
        self._target = _TO_BUF
        if len(self._buf) - self._end < _RECV_BUFFER // 4:
            full = self._start == 0 and self._end == len(self._buf)
            self._make_room(len(self._buf) + _RECV_BUFFER if full else 0)
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        target = self._target
        if target == _TO_PAYLOAD:
            self._filled += nbytes
            payload = self._payload
            assert payload is not None
            if self._filled == len(payload):
                flags, handle, offset, length = self._pending
                self._payload = self._payload_view = None
                self._dispatch(flags, P.CMD_WRITE, handle, offset, length, payload, length)
                self._parse()
        elif target == _TO_SKIP:
            self._skip -= nbytes
            if not self._skip:
                self._refuse_oversized()
                self._parse()
        else:
            self._end += nbytes
            if self._export is not None:
                self._parse()
                return
            if self._end - self._start >= self._want:
                _wake(self._waiter)
            if self._end - self._start >= _RECV_BUFFER:  # the handshake is behind: see _recv
                self._pause_reading()

    def _make_room(self, size: int) -> None:
        """Move the unparsed bytes to the front; grow the buffer to ``size`` if larger."""
        start, end = self._start, self._end
        if size > len(self._buf):
            grown = bytearray(size)
            grown[: end - start] = self._view[start:end]
            self._buf, self._view = grown, memoryview(grown)
        elif start:
            self._view[: end - start] = self._view[start:end]
        self._start, self._end = 0, end - start

    # -- handshake ------------------------------------------------------------------------

    async def _recv(self, n: int) -> bytes:
        """The next ``n`` bytes of the handshake, once the replies sent so far are under
        the transport's (small) high-water mark. A client must not send an option before
        the reply to the last one, but one that pipelines options and never reads their
        replies would otherwise make the server hold every reply: so the handshake reads on
        only while its replies drain, and reading pauses while ``_RECV_BUFFER`` bytes wait
        unread; a connection in the handshake pins at most ~``_HANDSHAKE_WRITE_HIGH`` of
        replies and a receive buffer of ``_RECV_BUFFER`` (or one option, if larger)."""
        await self._drain()
        while self._end - self._start < n:
            if self._eof or self._lost.done():
                raise Hangup("the client closed the connection")
            if len(self._buf) - self._start < n:
                self._make_room(max(n, len(self._buf)))
            if self._reading_paused and self._transport is not None:
                self._reading_paused = False
                self._transport.resume_reading()
            self._ack_at_once()
            self._want = n
            self._waiter = self._loop.create_future()
            await self._waiter
            self._waiter = None
        data = bytes(self._view[self._start : self._start + n])
        self._start += n
        if self._start == self._end:
            self._start = self._end = 0
        return data

    def _ack_at_once(self) -> None:
        """Have the kernel acknowledge what arrives next at once (Linux's
        ``TCP_QUICKACK``, which it turns off again by itself): the handshake waits for more
        of an option, and a client that sends an option's header and its data in two
        writes, with Nagle on, holds the second until the first is acknowledged, which a
        delayed ACK puts off by ~40 ms per option (measured: 41.8 ms per ``NBD_OPT_INFO``
        round trip, 0.07 with this). Only in the handshake: the transmission phase reads
        whole requests."""
        sock = self._transport.get_extra_info("socket") if self._transport is not None else None
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)

    def _send(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    async def _handshake(self) -> None:
        assert self._transport is not None
        starttls = self._start_tls if self._server.tls is not None else None
        try:
            # Not wait_for: on Python 3.11 it runs the handshake in a task of its own, whose
            # exception (a Hangup) then holds a cycle through the frames back to this session
            # and its buffers, freed only by a full garbage collection (rare in a busy
            # server): every connection that ended before choosing an export stayed.
            async with asyncio.timeout(_HANDSHAKE_TIMEOUT):  # the TLS handshake included
                export = await negotiate(
                    self._server, self._recv, self._send, self._peer, self._admit, starttls
                )
        except TimeoutError:
            self._server.client_faults.log(
                logging.INFO,
                "NBD %s: no export chosen in %.0f s; closing",
                self._peer,
                _HANDSHAKE_TIMEOUT,
                key="handshake timeout",
            )
            self._abort()
            return
        except Hangup as exc:
            log.debug("NBD %s: handshake ended: %s", self._peer, exc)
            if self._transport is not None:
                self._transport.close()  # the TLS transport, once TLS is on
            return
        except (ConnectionError, asyncio.CancelledError):
            self._abort()
            return
        except Exception:
            log.exception("NBD %s: handshake failed", self._peer)
            self._abort()
            return
        self._begin(export)

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _tls_overdue(self) -> None:
        """:data:`TLS_DEADLINE` passed and TLS is not on: count it as a failed TLS handshake
        and cut the connection (its handshake task ends on the cancel)."""
        self._tls_timer = None
        if self._tls or self._gone:
            return
        self._server.tls_failed(self._peer, f"no TLS within {TLS_DEADLINE:g} s of connecting")
        if self._handshake_task is not None and not self._handshake_task.done():
            self._handshake_task.cancel()
        else:
            self._abort()

    def _admit(self) -> str:
        """A place among the server's connections, now that the client chooses an export:
        "", or why it is refused."""
        return self._server.admit(self, self._peer)

    async def _start_tls(self, ack: bytes) -> None:
        """``NBD_OPT_STARTTLS`` is accepted: send ``ack`` (its ``NBD_REP_ACK``) in clear and
        run the server side of the TLS handshake on the connection; from then on
        :attr:`_transport` is the TLS transport, and it no longer counts among those
        waiting for TLS. :class:`Hangup` when the handshake fails (logged and counted by
        the server) or the client sent bytes after its ``NBD_OPT_STARTTLS`` (it must wait
        for the reply); the connection is aborted then."""
        context = self._server.tls
        raw = self._transport
        assert context is not None and raw is not None
        if self._end > self._start:
            raise Hangup("the client sent bytes after NBD_OPT_STARTTLS, before its reply")
        if raw.is_closing() or self._lost.done():
            raise Hangup("the client closed the connection")
        raw.write(ack)  # then at once (no await in between) start_tls takes the connection
        self._tls_starting = True
        try:
            transport = await self._loop.start_tls(
                raw,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=_HANDSHAKE_TIMEOUT,
                ssl_shutdown_timeout=_TLS_SHUTDOWN_TIMEOUT,
            )
        except asyncio.CancelledError:  # the handshake timeout, or a shutdown
            raw.abort()
            self.connection_lost(None)
            raise
        except Exception as exc:  # ssl.SSLError, ConnectionResetError, …
            raw.abort()
            why = _tls_failure(exc)
            self._server.tls_failed(self._peer, why)
            self.connection_lost(None)
            raise Hangup(f"the TLS handshake failed: {why}") from None
        if transport is None:  # typeshed allows it; asyncio and uvloop return a transport
            raw.abort()
            self.connection_lost(None)
            raise Hangup("no TLS transport")
        self._transport = transport
        self._tls = True
        if self._tls_timer is not None:
            self._tls_timer.cancel()
            self._tls_timer = None
        self._writing_paused = False  # the TLS transport says when its buffer is full
        self._reading_paused = False  # and when it reads (start_tls resumed the raw one)
        raw.set_write_buffer_limits()  # asyncio's defaults under the TLS transport's limits
        transport.set_write_buffer_limits(high=_HANDSHAKE_WRITE_HIGH, low=_HANDSHAKE_WRITE_LOW)
        self._server.tls_on(self)

    def _begin(self, export: C.Export) -> None:
        """Enter the transmission phase (unless the connection was lost meanwhile: a
        session that never began is not counted)."""
        transport = self._transport
        if self._lost.done() or transport is None or transport.is_closing():
            log.debug("NBD %s: gone before the transmission phase", self._peer)
            return
        self._export = export
        self._max_io = export.max_io
        transport.set_write_buffer_limits(high=_WRITE_HIGH, low=_WRITE_LOW)
        if self._reading_paused:  # by the handshake's read-ahead limit (_recv)
            self._reading_paused = False
            transport.resume_reading()
        self._counted = True
        self._stats.sessions_total += 1
        self._stats.sessions_active += 1
        self._stats.volume_sessions[export.name] += 1
        log.debug(
            "NBD session %s on %r: structured=%s block sizes=%s contexts=%s",
            self._peer,
            export.name,
            export.structured,
            export.strict,
            export.contexts,
        )
        if len(self._buf) > _RECV_BUFFER and self._start == self._end:
            self._buf = bytearray(_RECV_BUFFER)  # a large option grew it
            self._view = memoryview(self._buf)
            self._start = self._end = 0
        held = self._parse()
        if self._eof and not self._tasks and not held:
            transport.close()  # half-closed with no complete request

    # -- transmission: parsing and dispatch -----------------------------------------------

    def _parse(self) -> bool:
        """Start the complete requests in the receive buffer, while the limits allow (module
        docs; past them reading pauses). True when a request is held back by them (it
        starts later: :meth:`_go_on`)."""
        buf = self._buf
        export = self._export
        assert export is not None
        held = False
        while not self._closing and self._payload is None and not self._skip:
            start = self._start
            if self._end - start < P.REQUEST_SIZE:
                break
            magic, flags, cmd, handle, offset, length = P.REQUEST.unpack_from(buf, start)
            if magic != P.REQUEST_MAGIC:
                self._server.client_faults.warning(
                    "NBD %s: bad request magic %#x; disconnecting",
                    self._peer,
                    magic,
                    key="bad request magic",
                )
                self._closing = True
                if self._transport is not None:
                    self._transport.abort()
                return False
            write = cmd == P.CMD_WRITE and length > 0
            if not write:
                cost = C.reply_bytes(export, cmd, length)
            else:  # its payload; none for one over max_io (refused, the payload dropped)
                cost = length if length <= self._max_io else 0
            if self._writing_paused or (
                self._tasks
                and (
                    len(self._tasks) >= _MAX_INFLIGHT
                    or self._inflight_bytes + cost > _MAX_INFLIGHT_BYTES
                )
            ):
                self._pause_reading()
                held = True
                break
            body = start + P.REQUEST_SIZE
            if not write:
                self._start = body
                if cmd == P.CMD_DISC:
                    self._disconnect()
                    break
                empty = b"" if cmd == P.CMD_WRITE else None
                self._dispatch(flags, cmd, handle, offset, length, empty, cost)
                continue
            if length > self._max_io:  # refused; its payload is read and dropped
                take = min(length, self._end - body)
                self._start = body + take
                self._pending = (flags, handle, offset, length)
                self._skip = length - take
                if not self._skip:
                    self._refuse_oversized()
                continue
            end = body + length
            if end <= self._end:
                self._start = end
                data = bytes(self._view[body:end])
                self._dispatch(flags, cmd, handle, offset, length, data, length)
                continue
            if length >= _BIG_PAYLOAD:  # receive the rest straight into the payload
                payload = bytearray(length)
                have = self._end - body
                payload[:have] = self._view[body : self._end]
                self._payload, self._payload_view = payload, memoryview(payload)
                self._filled = have
                self._pending = (flags, handle, offset, length)
                self._start = self._end
                break
            if end > len(buf):
                self._make_room(0)
            break
        if self._start == self._end:
            self._start = self._end = 0
        return held

    def _pause_reading(self) -> None:
        if not self._reading_paused and not self._eof and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def _refuse_oversized(self) -> None:
        flags, handle, offset, length = self._pending
        self._dispatch(flags, P.CMD_WRITE, handle, offset, length, None, 0)

    def _dispatch(
        self,
        flags: int,
        cmd: int,
        handle: int,
        offset: int,
        length: int,
        payload: Any,
        cost: int,
    ) -> None:
        """Start a request as a task; ``cost`` bytes count as in flight until the task ends
        (its reply handed to the transport)."""
        self._inflight_bytes += cost
        task = self._loop.create_task(self._serve(flags, cmd, handle, offset, length, payload))
        self._tasks[task] = cost
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._inflight_bytes -= self._tasks.pop(task, 0)
        self._go_on()

    def _go_on(self) -> None:
        """After a request ended or the transport's buffer drained: start the requests the
        limits now allow (reading resumes once half the limits are free), and close a
        connection that is ending (DISC, half-closed) once nothing is left to serve."""
        transport = self._transport
        if transport is None:
            return
        if self._closing or self._eof:
            held = False
            if not self._closing:
                held = self._parse()  # requests received before the EOF, as limits allow
            if not self._tasks and not held:
                transport.close()
        elif (
            self._reading_paused
            and not self._writing_paused
            and len(self._tasks) <= _MAX_INFLIGHT // 2
            and self._inflight_bytes < _MAX_INFLIGHT_BYTES // 2
        ):
            self._reading_paused = False
            transport.resume_reading()
            self._parse()

    def _disconnect(self) -> None:
        """``NBD_CMD_DISC``: finish the requests in flight, then close."""
        self._closing = True
        self._pause_reading()
        if not self._tasks and self._transport is not None:
            self._transport.close()

    async def shutdown(self, grace: float) -> None:
        """Server shutdown: take no more requests, let those in flight finish (for up to
        ``grace`` seconds), close.

        A client still in option haggling gets up to ``_SHUTDOWN_HANDSHAKE_WAIT`` seconds:
        an option it sends then is answered ``NBD_REP_ERR_SHUTDOWN`` (the negotiation sees
        the server closing) and the connection ends.
        """
        handshake = self._handshake_task
        if handshake is not None and not handshake.done():
            await asyncio.wait({handshake}, timeout=min(grace, _SHUTDOWN_HANDSHAKE_WAIT))
            if not handshake.done():
                handshake.cancel()
        self._closing = True
        transport = self._transport
        if transport is None:
            return
        self._pause_reading()
        if self._export is not None and not self._lost.done():
            self._refuse_unstarted(P.ESHUTDOWN, SHUTTING_DOWN, Unavailable)
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in late:
                task.cancel()
        transport.close()
        try:
            await asyncio.wait_for(asyncio.shield(self._lost), 2.0)
        except TimeoutError:
            transport.abort()

    def _refuse_unstarted(self, code: int, message: str, kind: type[TierdiskError]) -> None:
        """Answer ``code`` to every complete request received but not started yet, counted
        as a gRPC call refused with ``kind`` would be (:mod:`.status`)."""
        export, transport = self._export, self._transport
        assert export is not None and transport is not None
        status = status_name_of(kind)
        now = time.perf_counter()
        start = self._start
        while self._payload is None and not self._skip and self._end - start >= P.REQUEST_SIZE:
            magic, _, cmd, handle, _, length = P.REQUEST.unpack_from(self._buf, start)
            body = start + P.REQUEST_SIZE + (length if cmd == P.CMD_WRITE else 0)
            if magic != P.REQUEST_MAGIC or cmd == P.CMD_DISC or body > self._end:
                break
            if export.structured:
                transport.write(P.chunk_error(handle, code, message))
            else:
                transport.write(P.simple_reply(handle, code))
            self._count(export.name, cmd, code, status, length, now)
            start = body
        self._start = start

    # -- transmission: serving and replying -----------------------------------------------

    async def _drain(self) -> None:
        """Wait while the transport's buffer is over its high-water mark (or the
        connection is lost)."""
        while self._writing_paused and not self._lost.done():
            if self._drained is None:
                self._drained = self._loop.create_future()
            await asyncio.shield(self._drained)

    async def _reply(self, parts: list[Any]) -> None:
        """Write one whole reply; waits while the transport's buffer is full."""
        await self._drain()
        transport = self._transport
        if transport is None or transport.is_closing():
            return  # the client went away; nobody to tell
        if len(parts) == 1:
            transport.write(parts[0])
        else:
            transport.writelines(parts)

    async def _serve(
        self, flags: int, cmd: int, handle: int, offset: int, length: int, payload: Any
    ) -> None:
        """Run one request and hand its reply to the transport."""
        export = self._export
        assert export is not None
        started = time.perf_counter()
        code = 0
        message = ""
        status = "OK"
        try:
            allowed = P.CMD_FLAGS_ALLOWED.get(cmd)
            if allowed is None:
                raise C.Refuse(f"unknown command {cmd}")
            if flags & ~allowed:
                raise C.Refuse(f"flags {flags:#x} are not valid for this command")
            if cmd == P.CMD_READ:
                reply = await C.read(export, flags, handle, offset, length)
            elif cmd == P.CMD_BLOCK_STATUS:
                reply = await C.block_status(export, flags, handle, offset, length)
            else:
                # The verifier as it starts: a flush failing while it runs renews it, and
                # this change may be among what that failure lost.
                verifier = export.volume.write_verifier
                if cmd == P.CMD_WRITE:
                    if payload is None:
                        raise C.Refuse(
                            f"a write of {length} bytes is over the limit of {self._max_io}",
                        )
                    await C.write(export, flags, offset, payload)
                elif cmd == P.CMD_FLUSH:
                    await C.flush(export)
                elif cmd == P.CMD_TRIM:
                    await C.trim(export, flags, offset, length)
                elif cmd == P.CMD_WRITE_ZEROES:
                    await C.write_zeroes(export, flags, offset, length)
                else:  # CMD_CACHE
                    await C.cache(export, offset, length)
                if cmd in _CHANGING and not (
                    flags & P.CMD_FLAG_FUA and export.volume.durable_since(verifier)
                ):  # for C.flush to vouch for (a FUA change the command made durable is not)
                    export.unflushed.acknowledged(verifier)
                reply = [P.simple_reply(handle)]
        except C.Refuse as exc:
            code, message, status = exc.code, str(exc), exc.status
        except (TierdiskError, OSError) as exc:  # a remote layer down, storage errors, …
            code, message = nbd_error(exc, writing=cmd in _WRITING), str(exc)
            status = status_name(exc)
            self._server.failures.note(export.name, f"NBD {P.CMD_NAMES.get(cmd)}", status, exc)
        except Exception as exc:
            log.exception("NBD %s: %s failed", self._peer, P.CMD_NAMES.get(cmd, cmd))
            code, message, status = P.EIO, f"internal error: {exc}", status_name(exc)
        if code:
            if export.structured:
                reply = [P.chunk_error(handle, code, message)]
            else:
                reply = [P.simple_reply(handle, code)]
        await self._reply(reply)
        self._count(export.name, cmd, code, status, length, started)

    def _count(
        self, volume: str, cmd: int, code: int, status: str, length: int, started: float
    ) -> None:
        """Count a finished request: NBD ``code`` (0: ok) in the NBD families, ``status``
        (the gRPC status code name of the same outcome) for the hook."""
        stats = self._stats
        command = P.CMD_NAMES.get(cmd, "unknown")
        result = P.ERROR_NAMES.get(code, "error")
        stats.requests[command, result] += 1
        moved = 0
        if not code and cmd == P.CMD_READ:
            stats.bytes_read += length
            moved = length
        elif not code and cmd == P.CMD_WRITE:
            stats.bytes_written += length
            moved = length
        if stats.on_request is not None:
            try:
                seconds = time.perf_counter() - started
                stats.on_request(volume, command, result, status, seconds, moved)
            except Exception:
                log.exception("NBD request hook failed")


def _tls_failure(exc: BaseException) -> str:
    """Why a TLS handshake failed, for the log: OpenSSL's verification message or reason
    (``PEER_DID_NOT_RETURN_A_CERTIFICATE``, ``TLSV1_ALERT_UNKNOWN_CA``, …), else the error."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"the client's certificate: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, ConnectionResetError):
        return "the client closed the connection"
    return str(exc) or type(exc).__name__


def _wake(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)
