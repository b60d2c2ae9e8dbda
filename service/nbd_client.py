"""A read-only NBD client for one export: the fast data path between tiers.

A remote layer may read its remote volume over the remote server's NBD export instead of
gRPC (the layer's ``nbd`` option): moving 1 MiB costs an NBD server ~60-70% and the
receiving side ~25% of the CPU of a gRPC ``Read`` here (``bench/README.md``, "Reads over NBD
between tiers"); the data goes straight from the socket into the caller's buffer.

What this client does (the NBD protocol document, ``doc/proto.md`` of NetworkBlockDevice/nbd):

- the fixed-newstyle handshake with ``NBD_OPT_GO`` for one export, asking for its block
  sizes (``NBD_INFO_BLOCK_SIZE``) and description (``NBD_INFO_DESCRIPTION``: a tierdisk
  server names itself there); structured replies are not negotiated, so every reply is
  a simple reply;
- ``NBD_CMD_READ`` only, pipelined on one connection: each request gets a handle, replies
  come back in any order and are matched by handle; a read larger than the export's maximum
  block size is split into requests of that size, all sent at once;
- each reply's data is received in place (:class:`asyncio.BufferedProtocol`), into the
  caller's buffer; a read whose caller gave up (cancelled, timed out) has its data received
  into a scratch buffer instead, so a late reply never writes into a buffer that was
  handed back.

TLS (the protocol document's "TLS support" section): given an :class:`ssl.SSLContext`
(``tls``), the client sends ``NBD_OPT_STARTTLS`` right after the greeting, runs the TLS
handshake on the same connection (the server's certificate checked against ``server_hostname``,
else the address's host) and goes on with ``NBD_OPT_GO`` over TLS; a server that does not do
TLS (it refuses ``NBD_OPT_STARTTLS``) is :class:`NbdTlsUnavailable`, never a fallback to clear
text, and a failed TLS handshake is an :class:`ssl.SSLError` (an :class:`OSError`). Without a
context the connection stays in clear text, and an export that requires TLS (it answers
``NBD_REP_ERR_TLS_REQD``) is :class:`NbdTlsRequired`.

Every failure is an :class:`NbdError`: the server's error reply (:class:`NbdRefused`, with
the NBD error value), a read past the export's size as negotiated, a lost or broken
connection (:class:`NbdClosed`). A connection that broke stays broken: make a new one
(:meth:`NbdReader.on_close` says when, even while no read is in flight).
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from . import nbd_protocol as P
from .netaddr import split_host_port

__all__ = [
    "NbdClosed",
    "NbdError",
    "NbdExport",
    "NbdHung",
    "NbdReader",
    "NbdRefused",
    "NbdTlsRequired",
    "NbdTlsUnavailable",
]

DEFAULT_MAX_BLOCK = 1 << 20
"""Largest request when the server does not state its maximum block size."""
_MAX_CHUNK = 16 << 20  # never more per request, whatever the server allows

_GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
_OPT_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_INFO_EXPORT = struct.Struct(">HQH")  # type, size, transmission flags
_INFO_BLOCK = struct.Struct(">HIII")  # type, minimum, preferred, maximum
_MAX_OPTION_REPLY = 1 << 16  # longer option replies are a broken server
_SCRATCH = 64 << 10


class NbdError(Exception):
    """An NBD read failed; the message says why."""


class NbdRefused(NbdError):
    """The server answered with an NBD error value (:attr:`error`, e.g. ``EIO``)."""

    def __init__(self, error: int, message: str) -> None:
        super().__init__(message)
        self.error = error


class NbdClosed(NbdError):
    """The connection is gone (closed, lost, or broken by a protocol violation)."""


class NbdHung(NbdClosed):
    """The connection was closed because its server stopped answering (a read got no
    answer in time: :meth:`NbdReader.close` with ``why``): what the reads still in flight on
    it fail with."""


class NbdTlsRequired(NbdError):
    """The server requires TLS (``NBD_REP_ERR_TLS_REQD``) and the client was given none."""


class NbdTlsUnavailable(NbdError):
    """The client asked for TLS (``NBD_OPT_STARTTLS``) and the server does not do it."""


@dataclass(frozen=True)
class NbdExport:
    """What the handshake told about the export."""

    name: str
    size: int  # bytes
    flags: int  # transmission flags
    block_min: int  # bytes; 1 when the server did not say
    block_max: int  # bytes; DEFAULT_MAX_BLOCK when the server did not say
    description: str = ""  # NBD_INFO_DESCRIPTION; "" when the server sent none

    @property
    def read_only(self) -> bool:
        return bool(self.flags & P.TFLAG_READ_ONLY)


class _Request:
    """A read in flight: where its data goes (None once its caller gave up)."""

    __slots__ = ("future", "length", "view")

    def __init__(self, future: asyncio.Future[None], view: memoryview) -> None:
        self.future = future
        self.view: memoryview | None = view
        self.length = len(view)


class _Connection(asyncio.BufferedProtocol):
    """The socket side: an inbox for the handshake, then reply headers and data in place."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._scratch = memoryview(bytearray(_SCRATCH))
        # handshake: bytes received before anyone asked for them
        self._inbox = bytearray()
        self._want = 0
        self._waiter: asyncio.Future[None] | None = None
        # transmission: the current receive target and what to do when it is full
        self._target: memoryview | None = None
        self._filled = 0
        self._on_full: Callable[[], None] = self._drop  # set with each receive target
        self._header = memoryview(bytearray(_SIMPLE_REPLY.size))
        self._current: _Request | None = None  # the read whose data is being received
        self.pending: dict[int, _Request] = {}
        self.error: NbdClosed | None = None  # set once the connection is unusable
        self.on_fail: Callable[[NbdClosed], None] | None = None  # called once, with error

    # -- asyncio protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(NbdClosed(f"the NBD connection was lost ({exc})" if exc else "closed"))

    def eof_received(self) -> bool | None:
        self.fail(NbdClosed("the NBD server closed the connection"))
        return None

    def get_buffer(self, sizehint: int) -> memoryview:
        target = self._target
        if target is None:
            return self._scratch
        return target[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        target = self._target
        if target is None:  # handshake
            self._inbox += self._scratch[:nbytes]
            if len(self._inbox) >= self._want and self._waiter is not None:
                _wake(self._waiter)
            return
        self._filled += nbytes
        if self._filled == len(target):
            self._on_full()

    # -- handshake ------------------------------------------------------------------------

    async def recv(self, n: int) -> bytes:
        """The next ``n`` bytes (handshake only)."""
        while len(self._inbox) < n:
            if self.error is not None:
                raise self.error
            self._want = n
            self._waiter = self.loop.create_future()
            await self._waiter
            self._waiter = None
        data = bytes(self._inbox[:n])
        del self._inbox[:n]
        return data

    def send(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        assert self.transport is not None
        self.transport.write(data)

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        """Run the TLS handshake (the server acknowledged ``NBD_OPT_STARTTLS``): from now on
        every byte goes through TLS, to this same protocol."""
        if self._inbox:
            raise NbdError("the NBD server sent bytes after acknowledging NBD_OPT_STARTTLS")
        if self.error is not None:
            raise self.error
        assert self.transport is not None
        transport = await self.loop.start_tls(
            self.transport, self, context, server_hostname=server_hostname
        )
        if transport is None:  # the connection went away during the handshake
            raise self.error or NbdClosed("the NBD connection closed during the TLS handshake")
        self.transport = transport

    def start_transmission(self) -> None:
        """Handshake done: from now on every byte is a reply header or a reply's data."""
        if self._inbox:
            self._break("the NBD server sent bytes nobody asked for")
            return
        self._expect_header()

    # -- transmission ---------------------------------------------------------------------

    def _expect_header(self) -> None:
        self._current = None
        self._target, self._filled, self._on_full = self._header, 0, self._got_header

    def _got_header(self) -> None:
        magic, error, handle = _SIMPLE_REPLY.unpack(self._header)
        if magic != P.SIMPLE_REPLY_MAGIC:
            self._break(f"the NBD server sent a reply with magic {magic:#x}")
            return
        request = self.pending.pop(handle, None)
        if request is None:
            self._break(f"the NBD server answered handle {handle}, which is not in flight")
            return
        if error:
            name = P.ERROR_NAMES.get(error, str(error))
            _settle(request.future, NbdRefused(error, f"the NBD server answered {name}"))
            self._expect_header()
            return
        if not request.length:
            _settle(request.future, None)
            self._expect_header()
            return
        self._current = request
        view = request.view
        if view is None:  # its caller gave up: take the data and drop it
            view = memoryview(bytearray(request.length))
        self._target, self._filled, self._on_full = view, 0, self._got_data

    def _got_data(self) -> None:
        request = self._current
        assert request is not None
        _settle(request.future, None)
        self._expect_header()

    def forget(self, request: _Request) -> None:
        """``request``'s caller gave up: its data must not reach the caller's buffer."""
        request.view = None
        if self._current is request and self._target is not None:
            rest = len(self._target) - self._filled
            self._target = memoryview(bytearray(rest))
            self._filled = 0

    def _break(self, why: str) -> None:
        self.fail(NbdClosed(why))
        if self.transport is not None:
            self.transport.abort()

    def in_flight(self) -> list[asyncio.Future[None]]:
        """The futures of the reads not answered in full yet: the one whose data is
        arriving (no longer in :attr:`pending`), then those waiting for their reply."""
        current = [] if self._current is None else [self._current.future]
        return current + [request.future for request in self.pending.values()]

    def fail(self, error: NbdClosed) -> None:
        first = self.error is None
        if first:
            self.error = error
        self._target = self._scratch  # whatever still arrives is dropped
        self._filled, self._on_full = 0, self._drop
        if self._waiter is not None:
            _wake(self._waiter)
        stranded = self.in_flight()  # the one whose data was arriving too
        self._current, self.pending = None, {}
        for future in stranded:
            _settle(future, self.error)
        if first and self.on_fail is not None:
            self.on_fail(error)

    def _drop(self) -> None:
        self._filled = 0


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _settle(future: asyncio.Future[None], outcome: BaseException | None) -> None:
    if future.done():
        return
    if outcome is None:
        future.set_result(None)
    else:
        future.set_exception(outcome)


class NbdReader:
    """A connection to one NBD export, for reading (made by :meth:`connect`)."""

    def __init__(self, connection: _Connection, export: NbdExport, address: str) -> None:
        self._conn = connection
        self.export = export
        self.address = address
        self._handle = 0
        self._chunk = max(export.block_min, min(export.block_max, _MAX_CHUNK))

    @classmethod
    async def connect(
        cls,
        address: str,
        export: str,
        *,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> NbdReader:
        """Connect to ``address`` (``host:port`` or ``unix:/path``) and open ``export``;
        with ``tls``, over TLS only (``NBD_OPT_STARTTLS`` first), the server's certificate
        checked against ``server_hostname`` (default: the address's host; ``localhost`` for
        a ``unix:`` address).

        :class:`NbdError` when the server refuses the export or speaks no fixed-newstyle
        NBD (:class:`NbdTlsUnavailable` when ``tls`` is given and the server does not do
        TLS, :class:`NbdTlsRequired` when it is not and the server requires TLS);
        :class:`OSError` when the connection cannot be made, :class:`ssl.SSLError` (an
        ``OSError``) when the TLS handshake fails. The caller bounds the time, the TLS
        handshake included (``asyncio.timeout``).
        """
        loop = asyncio.get_running_loop()
        conn: _Connection
        if address.startswith("unix:"):
            host = "localhost"
            _, conn = await loop.create_unix_connection(_Connection, address[5:])
        else:
            host, port = split_host_port(address, "nbd")
            host = host or "127.0.0.1"
            _, conn = await loop.create_connection(_Connection, host, port)
        try:
            await _greet(conn)
            if tls is not None:
                await _starttls(conn)
                await conn.start_tls(tls, server_hostname or host)
            try:
                info = await _go(conn, export)
            except NbdTlsRequired as exc:
                if tls is None:
                    raise
                # On a connection already in TLS the server is confused: a plain refusal,
                # not the "requires TLS" that would tell the caller to turn TLS on.
                text = str(exc).removeprefix("the NBD server requires TLS ")
                raise NbdError(f"the NBD server asked for TLS with TLS already on {text}") from None
            except NbdClosed as exc:
                if tls is None:
                    raise
                # TLS 1.3: a server that refuses the client's certificate (or its absence)
                # says so only after the client's side of the handshake is done.
                raise NbdClosed(
                    f"{exc}, right after the TLS handshake (it may want a client certificate, "
                    "or another one)"
                ) from None
        except BaseException:
            if conn.transport is not None:
                conn.transport.abort()
            raise
        conn.start_transmission()
        return cls(conn, info, address)

    @property
    def closed(self) -> bool:
        """True once the connection cannot be used any more."""
        return self._conn.error is not None

    def on_close(self, callback: Callable[[NbdClosed], None]) -> None:
        """Call ``callback(error)`` once, when the connection becomes unusable (lost, closed
        by the server or by :meth:`close`, broken by a protocol violation), even with no read
        in flight; at once if it already is. Replaces an earlier callback."""
        conn = self._conn
        if conn.error is not None:
            callback(conn.error)
            return
        conn.on_fail = callback

    async def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the export's bytes from ``offset``.

        :class:`NbdError` when the range is not inside the export as negotiated, the
        server answers an error, or the connection breaks (then every read in flight fails).
        """
        conn = self._conn
        if conn.error is not None:
            raise conn.error
        length = len(buf)
        if not length:
            return
        if offset < 0 or offset + length > self.export.size:
            raise NbdError(
                f"bytes [{offset}, {offset + length}) are not inside the NBD export's "
                f"{self.export.size} bytes"
            )
        transport = conn.transport
        assert transport is not None
        step = self._chunk
        requests: list[_Request] = []
        headers: list[bytes] = []
        for start in range(0, length, step):
            view = buf[start : start + step]
            self._handle += 1
            request = _Request(conn.loop.create_future(), view)
            conn.pending[self._handle] = request
            requests.append(request)
            headers.append(
                P.REQUEST.pack(
                    P.REQUEST_MAGIC, 0, P.CMD_READ, self._handle, offset + start, len(view)
                )
            )
        transport.writelines(headers)
        try:
            for request in requests:
                await request.future
        except BaseException:
            # Given up (cancelled, timed out) or failed: the replies still to come must not
            # reach ``buf``. (A cancelled wait has cancelled its future already.)
            for request in requests:
                conn.forget(request)
                request.future.cancel()
            raise

    async def close(self, drain: float = 0.0, *, why: NbdClosed | None = None) -> None:
        """Say goodbye (``NBD_CMD_DISC``) and close the connection; with ``drain``, first
        wait up to that many seconds for the reads in flight (the rest fail, with ``why``:
        by default ``NbdClosed("closed")``)."""
        conn = self._conn
        futures = conn.in_flight()
        if drain > 0 and futures and conn.error is None:
            await asyncio.wait(futures, timeout=drain)
        error = why if why is not None else NbdClosed("closed")
        transport = conn.transport
        if transport is None or transport.is_closing():
            conn.fail(error)
            return
        if conn.error is None:
            self._handle += 1
            transport.write(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_DISC, self._handle, 0, 0))
        conn.fail(error)
        transport.close()


async def _greet(conn: _Connection) -> None:
    """The server's greeting and the client's flags (fixed newstyle)."""
    nbdmagic, ihaveopt, flags = _GREETING.unpack(await conn.recv(_GREETING.size))
    if nbdmagic != P.NBDMAGIC or ihaveopt != P.IHAVEOPT:
        raise NbdError("the server does not speak newstyle NBD")
    if not flags & P.FLAG_FIXED_NEWSTYLE:
        raise NbdError("the NBD server does not offer the fixed newstyle handshake")
    client_flags = P.FLAG_C_FIXED_NEWSTYLE
    if flags & P.FLAG_NO_ZEROES:
        client_flags |= P.FLAG_C_NO_ZEROES
    conn.send(_U32.pack(client_flags))


async def _starttls(conn: _Connection) -> None:
    """``NBD_OPT_STARTTLS``: returns once the server acknowledged it (the TLS handshake
    comes next); :class:`NbdTlsUnavailable` when the server refuses it."""
    conn.send(P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_STARTTLS, 0))
    while True:
        reply, payload = await _option_reply(conn, P.OPT_STARTTLS)
        if reply == P.REP_ACK:
            return
        if reply & (1 << 31):
            text = _error_text(reply, payload)
            raise NbdTlsUnavailable(f"the NBD server does not do TLS (NBD_OPT_STARTTLS: {text})")


async def _option_reply(conn: _Connection, option: int) -> tuple[int, bytes]:
    """The next reply to ``option``: (its reply type, its data); :class:`NbdError` when it
    is malformed, is for another option or is longer than this client takes."""
    magic, got, reply, length = _OPT_REPLY.unpack(await conn.recv(_OPT_REPLY.size))
    if magic != P.OPT_REPLY_MAGIC or got != option or length > _MAX_OPTION_REPLY:
        raise NbdError("the NBD server sent a malformed option reply")
    return reply, await conn.recv(length) if length else b""


def _error_text(reply: int, payload: bytes) -> str:
    """An error reply's message, or its number when it has none."""
    return payload.decode("utf-8", "replace") or f"error {reply & 0x7FFFFFFF}"


async def _go(conn: _Connection, name: str) -> NbdExport:
    """``NBD_OPT_GO`` for ``name`` asking for its block sizes and description."""
    raw_name = name.encode()
    asked = (P.INFO_BLOCK_SIZE, P.INFO_DESCRIPTION)
    data = _U32.pack(len(raw_name)) + raw_name + _U16.pack(len(asked))
    data += b"".join(_U16.pack(info) for info in asked)
    conn.send(P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_GO, len(data)) + data)
    size: int | None = None
    export_flags = 0
    block_min, block_max = 1, DEFAULT_MAX_BLOCK
    description = ""
    while True:
        reply, payload = await _option_reply(conn, P.OPT_GO)
        if reply == P.REP_ACK:
            break
        if reply & (1 << 31):
            text = _error_text(reply, payload)
            if reply == P.REP_ERR_TLS_REQD:
                raise NbdTlsRequired(f"the NBD server requires TLS ({text})")
            raise NbdError(f"the NBD server refused export {name!r}: {text}")
        if reply != P.REP_INFO or len(payload) < 2:
            continue  # replies this client did not ask for are ignored, as the spec allows
        (info,) = _U16.unpack_from(payload)
        if info == P.INFO_EXPORT and len(payload) >= _INFO_EXPORT.size:
            _, size, export_flags = _INFO_EXPORT.unpack_from(payload)
        elif info == P.INFO_BLOCK_SIZE and len(payload) >= _INFO_BLOCK.size:
            _, block_min, _, block_max = _INFO_BLOCK.unpack_from(payload)
        elif info == P.INFO_DESCRIPTION:
            description = payload[2:].decode("utf-8", "replace")
    if size is None:
        raise NbdError(f"the NBD server did not say the size of export {name!r}")
    return NbdExport(name, size, export_flags, max(1, block_min), max(1, block_max), description)
