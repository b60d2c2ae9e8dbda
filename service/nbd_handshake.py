"""NBD fixed-newstyle handshake: option haggling up to the transmission phase.

Answers ``NBD_OPT_GO`` / ``NBD_OPT_INFO`` (with ``NBD_INFO_BLOCK_SIZE``: minimum = the sector
size, preferred = 4 KiB or the physical sector size, maximum = ``max_io``, which a client that
did not ask for block sizes may exceed up to 32 MiB), ``NBD_OPT_LIST``,
``NBD_OPT_EXPORT_NAME``, ``NBD_OPT_ABORT``, ``NBD_OPT_STRUCTURED_REPLY`` and the two
meta-context options (``base:allocation``, ``qemu:allocation-depth``; both refused with
``NBD_REP_ERR_INVALID`` before structured replies were negotiated). Every other option is
answered ``NBD_REP_ERR_UNSUP`` and haggling goes on. Once the server is shutting down, the
next option (but ``NBD_OPT_ABORT``) is answered ``NBD_REP_ERR_SHUTDOWN`` and the connection
closes; a connection over the server's limit has the option that chooses an existing export
answered ``NBD_REP_ERR_POLICY``, naming the limit, and closes (a name that selects no volume
is answered as it would be anyway, and takes no place). Export name = volume name; the empty
name selects the first volume.

TLS (the protocol document's "TLS support" section): given a ``starttls`` callable (the server
has a TLS context), the server is in FORCEDTLS mode. Until TLS is on, every option but
``NBD_OPT_STARTTLS`` and ``NBD_OPT_ABORT`` is answered ``NBD_REP_ERR_TLS_REQD`` (but
``NBD_REP_ERR_SHUTDOWN`` once the server is shutting down; the connection limit is answered
only over TLS), and ``NBD_OPT_EXPORT_NAME``, which cannot be answered an error, ends the
connection.
``NBD_OPT_STARTTLS`` with data is ``NBD_REP_ERR_INVALID`` (haggling goes on in clear); without,
``starttls(ack)`` sends the ``NBD_REP_ACK`` and runs the TLS handshake (or raises
:class:`Hangup`), and haggling goes on over TLS as it does in clear: nothing was negotiated
before. A second ``NBD_OPT_STARTTLS`` is ``NBD_REP_ERR_INVALID``. Without ``starttls``,
``NBD_OPT_STARTTLS`` is ``NBD_REP_ERR_UNSUP``, like any option the server does not know. A
client without ``NBD_FLAG_C_FIXED_NEWSTYLE`` cannot start TLS: with TLS required, its
connection ends after the client flags (as qemu-nbd does).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from . import nbd_protocol as P
from .errors import (
    SHUTTING_DOWN,
    FailedPrecondition,
    TierdiskError,
    Unavailable,
    VolumeNotFound,
)
from .nbd_commands import Export
from .volume import Volume

if TYPE_CHECKING:
    from .nbd import NbdServer

__all__ = ["Hangup", "negotiate"]

_NOT_SERVED = (VolumeNotFound, Unavailable, FailedPrecondition)
"""What a volume not served answers (none by that name; not ready yet; one the server
stopped trying to open): an option about it gets ``NBD_REP_ERR_UNKNOWN`` with the reason."""

log = logging.getLogger("tierdisk.service.nbd")

MAX_OPTION = 64 << 10
"""Longest option data taken (a hard disconnect past it): an export name is at most 4 KiB
(the spec), so this holds a name and a dozen meta-context queries of that length."""
MAX_OPTION_BEFORE_TLS = 8 << 10
"""Longest option data taken while TLS is required and not on yet (a hard disconnect past it):
only ``NBD_OPT_STARTTLS`` (no data) is of use then, and an unauthenticated client must not
make the server hold a MiB per connection (``NBD_OPT_GO`` with the longest export name the
spec allows, 4 KiB, fits)."""
_UNAGREED_MAX_REQUEST = 32 << 20
"""The largest request the protocol document lets a client send without agreed block sizes
(2**25 bytes): a session with such a client takes at least that, whatever ``max_io``."""


class Hangup(Exception):
    """The handshake ends without an export: close the connection."""


class _Negotiation:
    def __init__(
        self,
        server: NbdServer,
        recv: Callable[[int], Awaitable[bytes]],
        send: Callable[[bytes], None],
        peer: str,
        admit: Callable[[], str],
        starttls: Callable[[bytes], Awaitable[None]] | None,
    ) -> None:
        self._server = server
        self._starttls = starttls
        self._tls_on = False
        self._admit = admit
        self._recv = recv
        self._send = send
        self._peer = peer
        self._structured = False
        self._no_zeroes = False
        self._meta_export: str | None = None
        self._meta_contexts: list[str] = []

    def _reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self._send(P.option_reply(option, reply, data))

    def _error(self, option: int, reply: int, message: str) -> None:
        log.debug("NBD %s: option %d refused: %s", self._peer, option, message)
        self._send(P.option_error(option, reply, message))

    async def run(self) -> Export:
        self._send(P.server_greeting())
        (client_flags,) = struct.unpack(">I", await self._recv(4))
        if client_flags & ~P.CLIENT_FLAGS_KNOWN:
            raise Hangup(f"unknown client flags {client_flags:#x}")
        self._no_zeroes = bool(client_flags & P.FLAG_C_NO_ZEROES)
        if self._starttls is not None and not client_flags & P.FLAG_C_FIXED_NEWSTYLE:
            raise Hangup("the client does not speak fixed newstyle, which TLS needs")
        while True:
            magic, option, length = P.OPTION_HEADER.unpack(await self._recv(16))
            if magic != P.IHAVEOPT:
                raise Hangup(f"bad option magic {magic:#x}")
            limit = MAX_OPTION_BEFORE_TLS if self._starttls and not self._tls_on else MAX_OPTION
            if length > limit:
                raise Hangup(f"option {option} carries {length} bytes (limit {limit})")
            data = await self._recv(length) if length else b""
            if self._server.closing and option != P.OPT_ABORT:
                self._error(option, P.REP_ERR_SHUTDOWN, SHUTTING_DOWN)
                raise Hangup(SHUTTING_DOWN)
            if self._starttls is not None and not self._tls_on and option != P.OPT_ABORT:
                await self._before_tls(option, data)  # NBD_OPT_STARTTLS or NBD_REP_ERR_TLS_REQD
                continue
            export = self._option(option, data)
            if export is not None:
                return export

    async def _before_tls(self, option: int, data: bytes) -> None:
        """An option (not ``NBD_OPT_ABORT``) while TLS is required and not on yet."""
        assert self._starttls is not None
        if option == P.OPT_STARTTLS:
            if data:
                self._error(option, P.REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
                return
            # Sends the ACK and at once hands the connection to TLS (no await in between).
            await self._starttls(P.option_reply(option, P.REP_ACK))
            self._tls_on = True
            log.debug("NBD %s: TLS is on", self._peer)
            return
        if option == P.OPT_EXPORT_NAME:  # cannot be answered an error
            raise Hangup("NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS: this server requires TLS")
        self._error(
            option,
            P.REP_ERR_TLS_REQD,
            "this NBD server requires TLS: send NBD_OPT_STARTTLS first",
        )

    def _take_place(self, option: int) -> None:
        """A place among the server's connections, now that the client chose an export that
        exists: over the limit, the option is answered ``NBD_REP_ERR_POLICY`` (but
        ``NBD_OPT_EXPORT_NAME``, which cannot be answered an error) and the connection ends."""
        refusal = self._admit()
        if refusal:
            if option != P.OPT_EXPORT_NAME:
                self._error(option, P.REP_ERR_POLICY, refusal)
            raise Hangup(refusal)

    def _lookup(self, name: str) -> tuple[Volume, str]:
        """The volume an export name selects ("" = the first volume) and its name."""
        if not name:
            names = self._server.registry.names()
            if not names:
                raise VolumeNotFound("this server has no volumes")
            name = names[0]
        return self._server.registry.get(name), name

    def _option(self, option: int, data: bytes) -> Export | None:
        """Answer one option; returns the export when the transmission phase begins."""
        if option == P.OPT_EXPORT_NAME:
            try:
                volume, name = self._lookup(P.parse_export_name(data))
            except (P.BadOption, TierdiskError) as exc:
                raise Hangup(f"NBD_OPT_EXPORT_NAME: {exc}") from None  # cannot answer errors
            self._take_place(option)
            export = self._export(volume, name, strict=False)
            self._send(P.export_name_reply(export.size, export.flags, self._no_zeroes))
            return export
        if option == P.OPT_ABORT:
            self._reply(option, P.REP_ACK)
            raise Hangup("the client aborted")
        if option == P.OPT_STARTTLS and self._tls_on:
            self._error(option, P.REP_ERR_INVALID, "TLS is already on")
            return None
        if option == P.OPT_LIST:
            if data:
                self._error(option, P.REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                return None
            for name in self._server.registry.names():
                self._reply(option, P.REP_SERVER, P.rep_server(name))
            self._reply(option, P.REP_ACK)
            return None
        if option in (P.OPT_INFO, P.OPT_GO):
            return self._info(option, data)
        if option == P.OPT_STRUCTURED_REPLY:
            if data:
                self._error(option, P.REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
                return None
            self._structured = True
            self._reply(option, P.REP_ACK)
            return None
        if option in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
            self._meta_context(option, data)
            return None
        self._error(option, P.REP_ERR_UNSUP, f"option {option} is not supported")
        return None

    def _info(self, option: int, data: bytes) -> Export | None:
        try:
            request = P.parse_info_request(data)
        except P.BadOption as exc:
            self._error(option, P.REP_ERR_INVALID, str(exc))
            return None
        try:
            volume, name = self._lookup(request.name)
        except _NOT_SERVED as exc:
            self._error(option, P.REP_ERR_UNKNOWN, str(exc))
            return None
        if option == P.OPT_GO:
            self._take_place(option)
        strict = option == P.OPT_GO and P.INFO_BLOCK_SIZE in request.requests
        export = self._export(volume, name, strict)
        self._reply(option, P.REP_INFO, P.info_export(export.size, export.flags))
        if P.INFO_NAME in request.requests or name != request.name:
            self._reply(option, P.REP_INFO, P.info_name(name))
        if P.INFO_DESCRIPTION in request.requests:
            text = P.export_description(name, len(volume.entries), self._server.server_id)
            self._reply(option, P.REP_INFO, P.info_description(text))
        self._reply(option, P.REP_INFO, P.info_block_size(*self._block_sizes(volume)))
        self._reply(option, P.REP_ACK)
        return export if option == P.OPT_GO else None

    def _meta_context(self, option: int, data: bytes) -> None:
        setting = option == P.OPT_SET_META_CONTEXT
        if setting:
            self._meta_export, self._meta_contexts = None, []  # replaced even on failure
        if not self._structured:  # the spec: MUST NOT be requested before (LIST and SET)
            self._error(option, P.REP_ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first")
            return
        try:
            request = P.parse_meta_context_request(data)
        except P.BadOption as exc:
            self._error(option, P.REP_ERR_INVALID, str(exc))
            return
        try:
            _, name = self._lookup(request.name)
        except _NOT_SERVED as exc:
            self._error(option, P.REP_ERR_UNKNOWN, str(exc))
            return
        if setting:
            contexts = P.select_contexts(request.queries)
            for context in contexts:
                payload = P.rep_meta_context(P.CONTEXT_IDS[context], context)
                self._reply(option, P.REP_META_CONTEXT, payload)
            self._meta_export, self._meta_contexts = name, contexts
        else:
            for context in P.list_contexts(request.queries):
                self._reply(option, P.REP_META_CONTEXT, P.rep_meta_context(0, context))
        self._reply(option, P.REP_ACK)

    def _block_sizes(self, volume: Volume) -> tuple[int, int, int]:
        """Minimum (the sector size), preferred and maximum (``max_io``) block sizes."""
        ss = volume.sector_size
        minimum = min(ss, 1 << 16)
        maximum = max(ss, min(self._server.max_io, 0x7FFFFFFF) // ss * ss)
        physical = volume.physical_sector_size
        preferred = max(4096, ss)
        if physical > preferred and physical & (physical - 1) == 0:
            preferred = physical
        while preferred > maximum:
            preferred //= 2
        return minimum, max(preferred, minimum, 512), maximum

    def _largest_request(self, volume: Volume, agreed: bool) -> int:
        """The largest read or write payload the session takes: the advertised maximum block
        size (``max_io``) for a client that asked for block sizes (``NBD_OPT_GO`` with
        ``NBD_INFO_BLOCK_SIZE``); for one that did not (``NBD_OPT_EXPORT_NAME``, which gets
        no block sizes at all, or a ``GO`` that did not ask), at least the 32 MiB the
        protocol document tells such clients they may send."""
        maximum = self._block_sizes(volume)[2]
        if agreed:
            return maximum
        ss = volume.sector_size
        return max(maximum, _UNAGREED_MAX_REQUEST // ss * ss)

    def _export(self, volume: Volume, name: str, strict: bool) -> Export:
        flags = P.TFLAG_HAS_FLAGS | P.TFLAG_SEND_FLUSH | P.TFLAG_CAN_MULTI_CONN
        flags |= P.TFLAG_SEND_CACHE
        if self._structured:
            flags |= P.TFLAG_SEND_DF
        if volume.read_only:
            flags |= P.TFLAG_READ_ONLY
        else:
            flags |= P.TFLAG_SEND_FUA | P.TFLAG_SEND_TRIM
            flags |= P.TFLAG_SEND_WRITE_ZEROES | P.TFLAG_SEND_FAST_ZERO
        ss = volume.sector_size
        return Export(
            volume=volume,
            name=name,
            size=volume.sector_count * ss,
            sector_size=ss,
            flags=flags,
            structured=self._structured,
            strict=strict and ss <= 1 << 16,
            contexts=list(self._meta_contexts) if self._meta_export == name else [],
            has_read_cache=any(e.read_cache for e in volume.entries),
            max_io=self._largest_request(volume, strict),
            zeros=self._server.zeros,
        )


async def negotiate(
    server: NbdServer,
    recv: Callable[[int], Awaitable[bytes]],
    send: Callable[[bytes], None],
    peer: str,
    admit: Callable[[], str] = lambda: "",
    starttls: Callable[[bytes], Awaitable[None]] | None = None,
) -> Export:
    """Run the handshake over ``recv(n)`` / ``send(data)``; the export the client chose.
    An option that chooses an export that exists (``NBD_OPT_GO``, ``NBD_OPT_EXPORT_NAME``)
    first asks ``admit()`` for a place among the server's connections: if it answers why not, the
    option is answered ``NBD_REP_ERR_POLICY`` with that and the session ends. With
    ``starttls`` the server requires TLS (the module's docstring): ``starttls(ack)`` sends
    ``ack`` (the ``NBD_REP_ACK`` of ``NBD_OPT_STARTTLS``), then upgrades the connection, so
    that ``recv`` and ``send`` go over TLS from then on; it raises :class:`Hangup` when the
    TLS handshake fails. Until TLS is on, option data over :data:`MAX_OPTION_BEFORE_TLS`
    bytes is a hard disconnect.

    Raises :class:`Hangup` when the session ends instead (abort, protocol violation, an
    ``NBD_OPT_EXPORT_NAME`` that cannot be served).
    """
    return await _Negotiation(server, recv, send, peer, admit, starttls).run()
