"""The asyncio client: :class:`AsyncClient` and its volumes, :class:`AsyncVolume`.

    async with AsyncClient("127.0.0.1:7400") as client:
        vol = client.volume("vm1")
        info = await vol.info()
        await vol.write(0, b"\\0" * info.sector_size)
        data = await vol.read(0, 8)

Every method makes its gRPC call(s) with a deadline (the client's ``timeout``, or the
method's ``timeout=``; ``None`` waits forever) and retries on ``UNAVAILABLE`` and
``CANCELLED`` from the server with jittered exponential backoff (:mod:`tierdisk.client.retry`).
Failures raise :mod:`tierdisk.client.errors` exceptions. Reads and writes larger than
``max_io`` bytes are split into chunks, a few in flight at once
(:mod:`tierdisk.client.chunking`); such a request is first checked against the volume's size
(one GetVolume), so one that reaches past the end is refused before any chunk is sent. A
chunk that fails for another reason fails the whole call — a write may then have landed in
part.

A call never returns as if it had completed when it did not. Closing the client cancels the
calls in flight (gRPC does): each raises :class:`~tierdisk.client.errors.ClientClosed`, a split
one saying how many bytes had been read or written; a call whose request is cancelled from
underneath in another way raises :class:`~tierdisk.client.errors.Interrupted`. Cancelling the
caller's own task raises :class:`asyncio.CancelledError` as usual, and cancels the chunks in
flight.

Writes are idempotent (the same data at the same place), so retrying one after
``UNAVAILABLE`` or ``CANCELLED`` is safe even when the first attempt did reach the disk.

Sector numbers, counts and byte offsets must be ``int`` (not ``bool``): another type raises
:class:`TypeError` (a programming error, as Python's own APIs do), and an ``int`` no request
can carry (negative, or ``2**64`` and over; ``page_size`` ``2**32``) raises
:class:`~tierdisk.client.errors.InvalidArgument` naming the argument, without a call.
"""

# ASYNC109: ``timeout=`` here is the gRPC deadline of the call(s) a method makes (with retries
# inside it), which asyncio.timeout() around the call cannot express.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Any, Literal, TypeAlias, TypedDict, TypeVar, overload

import grpc
import grpc.aio
from google.protobuf import json_format

from tierdisk.v1 import blockdevice_pb2 as pb
from tierdisk.v1 import blockdevice_pb2_grpc as pb_grpc

from .checks import token_problem
from .chunking import (
    DEFAULT_IN_FLIGHT,
    DEFAULT_MAX_IO,
    Chunk,
    caller_cancelled,
    merge_extents,
    plan_chunks,
    run_bounded,
    run_ordered,
    sectors_per_chunk,
)
from .errors import (
    AllocationTooLarge,
    ClientClosed,
    Interrupted,
    InvalidArgument,
    NoSpace,
    OutOfRange,
    StorageError,
    Unimplemented,
    error_from_rpc,
    status_code,
)
from .models import AllocationExtent, Extent, ReadResult, ResizeEvent, VolumeInfo
from .retry import (
    DEFAULT_BACKOFF,
    DEFAULT_MAX_BACKOFF,
    DEFAULT_RETRIES,
    RetryPolicy,
    call_with_retry,
    is_retryable,
)
from .wire import encode_write, read_reply_view

__all__ = [
    "DEFAULT_CHANNEL_OPTIONS",
    "UNSET",
    "AsyncClient",
    "AsyncVolume",
    "CallObserver",
    "ClientOptions",
    "MetadataFactory",
    "Timeout",
]

Req = TypeVar("Req")
Resp = TypeVar("Resp")

MAX_MESSAGE_BYTES = 64 << 20
"""The channel's message cap in each direction, unless ``max_io`` needs more (then
``max_io`` plus :data:`MESSAGE_FRAMING_BYTES`)."""
MESSAGE_FRAMING_BYTES = 1 << 20
"""Room for a message's fields around its ``max_io`` bytes of data."""

UINT64_LIMIT = 1 << 64
"""Sector numbers and counts travel as ``uint64``: each must be below this."""
UINT32_LIMIT = 1 << 32
"""``page_size`` travels as ``uint32``."""

DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # We retry ourselves (tierdisk.client.retry); one policy, not two stacked.
    ("grpc.enable_retries", 0),
    # Reconnect soon after a server restart, so our own short retries can find it again.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)
"""Channel options every client starts from; ``channel_options`` adds to or overrides them."""


class _Unset(enum.Enum):
    UNSET = enum.auto()


UNSET = _Unset.UNSET
"""Default of every method's ``timeout=``: use the client's timeout."""

Timeout: TypeAlias = float | _Unset | None
"""A per-call timeout: seconds, ``None`` for no deadline, or ``UNSET`` for the client's."""

Buffer: TypeAlias = bytes | bytearray | memoryview

MetadataFactory: TypeAlias = Callable[[], Sequence[tuple[str, str]]]
"""Called for every call: more ``(key, value)`` pairs to send, for values that change per call."""

CallObserver: TypeAlias = Callable[[str, grpc.StatusCode, float], None]
"""Called after every call attempt with the RPC name (``"Read"``), its status code and the
seconds it took."""


class ClientOptions(TypedDict, total=False):
    """Keyword arguments shared by :class:`AsyncClient` and the blocking ``Client``."""

    timeout: float | None
    retries: int
    backoff: float
    max_backoff: float
    metadata: Sequence[tuple[str, str]]
    channel_options: Sequence[tuple[str, Any]]
    secure: bool
    root_certificates: bytes | None
    certificate_chain: bytes | None
    private_key: bytes | None
    token: str | None
    max_io: int
    max_in_flight: int


class AsyncClient:
    """A connection to one tierdisk server.

    ``target``: ``host:port`` or ``unix:/path``. ``timeout``: seconds per call (each chunk
    of a split read or write is a call), ``None`` for none. ``retries``, ``backoff``,
    ``max_backoff``: the retry policy on ``UNAVAILABLE`` and ``CANCELLED`` (see
    :class:`RetryPolicy`); the defaults (8, 0.1 s, 2.0 s) wait up to ~9 s, ~4.5 s on average,
    to ride through a server restart — pass ``retries=0`` to fail fast.
    ``metadata``: extra ``(key, value)`` pairs sent with every call. ``token``: sent as
    ``authorization: Bearer <token>``. TLS is used when ``secure`` is true or any of
    ``root_certificates`` / ``certificate_chain`` / ``private_key`` (PEM bytes) is given.
    ``max_io``: bytes of data per Read/Write request (default 1 MiB, must not exceed the
    server's ``max_io``); ``max_in_flight``: chunk requests in flight per large call.

    Hooks, for a server that is itself a client (a remote layer): ``metadata_factory()`` is
    called once per unary call (its retries send the same pairs) and per WatchResize
    stream, and its pairs are sent after ``metadata``; ``on_call(rpc, code, seconds)`` is
    called after every unary call attempt and when a WatchResize stream ends.

    Use it as an async context manager, or ``await client.close()``; a closed client's
    methods raise :class:`~tierdisk.client.errors.ClientClosed` (a ``RuntimeError``: "the
    client is closed"), and so do the calls in flight when it was closed.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 30.0,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
        max_backoff: float = DEFAULT_MAX_BACKOFF,
        metadata: Sequence[tuple[str, str]] = (),
        channel_options: Sequence[tuple[str, Any]] = (),
        secure: bool = False,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        token: str | None = None,
        max_io: int = DEFAULT_MAX_IO,
        max_in_flight: int = DEFAULT_IN_FLIGHT,
        metadata_factory: MetadataFactory | None = None,
        on_call: CallObserver | None = None,
    ) -> None:
        if max_io <= 0:
            raise ValueError(f"max_io must be positive, not {max_io}")
        if max_in_flight <= 0:
            raise ValueError(f"max_in_flight must be positive, not {max_in_flight}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive or None, not {timeout}")
        if token is not None and (problem := token_problem(token)) is not None:
            raise ValueError(f"token {problem}")  # never the token itself
        self.target = target
        self.timeout = timeout
        self._closed = False
        self._closing = asyncio.Event()  # set by close(): ends the wait before a retry
        self.policy = RetryPolicy(retries=retries, backoff=backoff, max_backoff=max_backoff)
        self.max_io = max_io
        self.max_in_flight = max_in_flight
        md = [(str(k).lower(), str(v)) for k, v in metadata]
        if token is not None:
            md.append(("authorization", f"Bearer {token}"))
        self.metadata: tuple[tuple[str, str], ...] = tuple(md)
        self.metadata_factory = metadata_factory
        self.on_call = on_call
        options: dict[str, Any] = dict(DEFAULT_CHANNEL_OPTIONS)
        if max_io + MESSAGE_FRAMING_BYTES > MAX_MESSAGE_BYTES:  # room for max_io per message
            cap = max_io + MESSAGE_FRAMING_BYTES
            options["grpc.max_send_message_length"] = cap
            options["grpc.max_receive_message_length"] = cap
        options.update(channel_options)
        option_list = list(options.items())
        if secure or root_certificates or certificate_chain or private_key:
            creds = grpc.ssl_channel_credentials(
                root_certificates=root_certificates,
                private_key=private_key,
                certificate_chain=certificate_chain,
            )
            self._channel = grpc.aio.secure_channel(target, creds, options=option_list)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=option_list)
        self._stub = pb_grpc.BlockDeviceStub(self._channel)
        # Read with the reply left serialized: wire.read_reply_view takes the data from it
        # without protobuf's two copies.
        self._read_raw: grpc.aio.UnaryUnaryMultiCallable[pb.ReadRequest, bytes] = (
            self._channel.unary_unary(
                "/tierdisk.v1.BlockDevice/Read",
                request_serializer=pb.ReadRequest.SerializeToString,
                response_deserializer=None,
            )
        )
        # Write with the request serialized here: wire.encode_write copies the data once.
        self._write_raw: grpc.aio.UnaryUnaryMultiCallable[bytes, pb.WriteResponse] = (
            self._channel.unary_unary(
                "/tierdisk.v1.BlockDevice/Write",
                request_serializer=None,
                response_deserializer=pb.WriteResponse.FromString,
            )
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls still running are cancelled, and raise
        :class:`~tierdisk.client.errors.ClientClosed` (never return as if complete).
        Idempotent; afterwards every method raises ``ClientClosed`` ("the client is closed",
        a ``RuntimeError``)."""
        self._closed = True
        self._closing.set()
        await self._channel.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed("the client is closed")

    async def _backoff(self, seconds: float) -> None:
        """The wait before a retry, ended early by :meth:`close`: the retry then raises
        :class:`ClientClosed` at once, rather than after the wait."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._closing.wait()

    def _cut_short(self, what: str, volume: str | None) -> Interrupted:
        """The error for ``what`` (``"the Read call"``) ending cancelled though its caller's
        task was not cancelled: :class:`ClientClosed` when this client was closed (gRPC
        cancels a closed channel's calls), else :class:`Interrupted`."""
        if self._closed:
            return ClientClosed(f"the client was closed while {what} was in flight", volume=volume)
        return Interrupted(f"{what} was cancelled, though not by its caller", volume=volume)

    def connectivity(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """The channel's connection state (``READY``, ``IDLE``, ``TRANSIENT_FAILURE``, …)."""
        return self._channel.get_state(try_to_connect)

    def volume(self, name: str) -> AsyncVolume:
        """A handle on the volume ``name`` (no call is made until it is used)."""
        return AsyncVolume(self, name)

    async def list_volumes(
        self, *, page_size: int = 0, timeout: Timeout = UNSET
    ) -> list[VolumeInfo]:
        """Every volume the server serves, following ``next_page_token`` to the end
        (``page_size`` 0 = the server's default page size)."""
        _check_number("page_size", page_size, limit=UINT32_LIMIT)
        volumes: list[VolumeInfo] = []
        token = ""
        seen: set[str] = set()
        while True:
            req = pb.ListVolumesRequest(page_size=page_size, page_token=token)
            resp = await self._unary(self._stub.ListVolumes, req, timeout=timeout)
            volumes.extend(VolumeInfo.from_proto(v) for v in resp.volumes)
            token = resp.next_page_token
            if not token:
                return volumes
            if token in seen:
                raise InvalidArgument(f"the server repeated page token {token!r}")
            seen.add(token)

    # -- plumbing shared by the volumes --------------------------------------------------

    def _deadline(self, timeout: Timeout) -> float | None:
        return self.timeout if timeout is UNSET else timeout

    def _call_metadata(self) -> tuple[tuple[str, str], ...]:
        if self.metadata_factory is None:
            return self.metadata
        return (*self.metadata, *self.metadata_factory())

    def _observe(self, rpc: str, code: grpc.StatusCode, started: float) -> None:
        if self.on_call is not None:
            self.on_call(rpc, code, time.perf_counter() - started)

    async def _unary(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp],
        request: Req,
        *,
        timeout: Timeout,
        volume: str | None = None,
        rpc: str | None = None,
    ) -> Resp:
        """One call of ``method`` with this client's metadata, deadline and retries;
        ``rpc`` names it for :attr:`on_call` and in an :class:`Unimplemented` (by default
        ``<Rpc>Request`` minus ``Request``: pass it for a request sent already serialized)."""
        self._check_open()
        metadata = self._call_metadata()
        if self.on_call is None:

            async def attempt(remaining: float | None) -> Resp:
                self._check_open()  # closed while an earlier attempt waited to retry
                return await method(request, timeout=remaining, metadata=metadata)

        else:
            name = rpc or type(request).__name__.removesuffix("Request")  # DESIGN §2

            async def attempt(remaining: float | None) -> Resp:
                self._check_open()
                started = time.perf_counter()
                code = grpc.StatusCode.CANCELLED
                try:
                    reply = await method(request, timeout=remaining, metadata=metadata)
                    code = grpc.StatusCode.OK
                    return reply
                except grpc.RpcError as err:
                    code = status_code(err)
                    raise
                finally:
                    self._observe(name, code, started)

        try:
            return await call_with_retry(
                attempt,
                policy=self.policy,
                timeout=self._deadline(timeout),
                volume=volume,
                sleep=self._backoff,
            )
        except asyncio.CancelledError:
            if caller_cancelled():
                raise
            name = rpc or type(request).__name__.removesuffix("Request")
            raise self._cut_short(f"the {name} call", volume) from None
        except Unimplemented as exc:  # name this server and the method, not the volume
            cause = exc.__cause__
            if not isinstance(cause, grpc.RpcError):
                raise
            name = rpc or type(request).__name__.removesuffix("Request")
            raise error_from_rpc(cause, target=self.target, method=name) from cause


class AsyncVolume:
    """One volume on a server. Sector numbers and counts are in the volume's sectors; the
    ``*_bytes`` helpers take byte offsets. The sector size is fetched once (``info()``)
    and cached."""

    def __init__(self, client: AsyncClient, name: str) -> None:
        self.client = client
        self.name = name
        self._sector_size: int | None = None

    def __repr__(self) -> str:
        return f"AsyncVolume({self.name!r} on {self.client.target!r})"

    async def _call(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp],
        request: Req,
        timeout: Timeout,
        rpc: str | None = None,
    ) -> Resp:
        return await self.client._unary(method, request, timeout=timeout, volume=self.name, rpc=rpc)

    @property
    def _stub(self) -> pb_grpc.BlockDeviceAsyncStub:
        return self.client._stub

    async def info(self, *, timeout: Timeout = UNSET) -> VolumeInfo:
        """The volume's geometry and capabilities, fresh from the server."""
        msg = await self._call(self._stub.GetVolume, pb.GetVolumeRequest(volume=self.name), timeout)
        info = VolumeInfo.from_proto(msg)
        self._sector_size = info.sector_size
        return info

    async def sector_size(self, *, timeout: Timeout = UNSET) -> int:
        """Bytes per sector (cached after the first call)."""
        if self._sector_size is None:
            await self.info(timeout=timeout)
        assert self._sector_size is not None
        return self._sector_size

    async def _chunk_sectors(self, timeout: Timeout) -> tuple[int, int]:
        size = await self.sector_size(timeout=timeout)
        return size, sectors_per_chunk(self.client.max_io, size)

    # -- reads ---------------------------------------------------------------------------

    @overload
    async def read(
        self,
        sector: int,
        count: int,
        *,
        report_presence: Literal[False] = False,
        timeout: Timeout = UNSET,
    ) -> bytes: ...

    @overload
    async def read(
        self, sector: int, count: int, *, report_presence: Literal[True], timeout: Timeout = UNSET
    ) -> ReadResult: ...

    @overload
    async def read(
        self, sector: int, count: int, *, report_presence: bool, timeout: Timeout = UNSET
    ) -> bytes | ReadResult: ...

    async def read(
        self, sector: int, count: int, *, report_presence: bool = False, timeout: Timeout = UNSET
    ) -> bytes | ReadResult:
        """``count`` sectors from ``sector``. With ``report_presence``, a :class:`ReadResult`
        that also lists the runs some layer holds.

        A read of more than ``max_io`` bytes is split, ``max_in_flight`` chunks at a time, and
        assembled into one buffer; the final ``bytes`` costs one more copy — use
        :meth:`read_into` to avoid it. A read that will be split is first checked against
        the volume's size (see :meth:`_check_fits`), before its buffer is allocated."""
        _check_range(sector, count, volume=self.name)
        size, per_chunk = await self._chunk_sectors(timeout)
        if count <= per_chunk:
            data, extents = await self._read_chunk(sector, count, report_presence, timeout)
            if not report_presence:
                return bytes(data)
            return ReadResult(bytes(data), tuple(merge_extents(extents)))
        await self._check_fits(sector, count, timeout)
        buf = bytearray(count * size)
        present = await self._read_into(sector, count, memoryview(buf), report_presence, timeout)
        if not report_presence:
            return bytes(buf)
        return ReadResult(bytes(buf), tuple(present))

    async def read_into(
        self, sector: int, buffer: bytearray | memoryview, *, timeout: Timeout = UNSET
    ) -> None:
        """Fill ``buffer`` (a whole number of sectors) with the sectors from ``sector``,
        without the copy :meth:`read` makes for large reads.

        Unlike :meth:`read`, a split read into a buffer is not checked against the volume's
        size first (nothing is allocated, and a read changes nothing): the chunks go out at
        once, and if one reaches past the end the :class:`OutOfRange` raised names the whole
        range, as :meth:`read`'s does. After an error the buffer's content is unspecified."""
        await self._read_into_buffer(sector, buffer, False, timeout)

    async def read_present_into(
        self, sector: int, buffer: bytearray | memoryview, *, timeout: Timeout = UNSET
    ) -> list[Extent]:
        """:meth:`read_into`, also returning the runs of the range some layer holds (sorted,
        merged; the sectors outside them read as zeros): ``read(..., report_presence=True)``
        into the caller's buffer, the data copied once."""
        return await self._read_into_buffer(sector, buffer, True, timeout)

    async def _read_into_buffer(
        self, sector: int, buffer: bytearray | memoryview, presence: bool, timeout: Timeout
    ) -> list[Extent]:
        """:meth:`read_into` and :meth:`read_present_into`: ``buffer`` checked (a whole number
        of sectors), read in chunks; an :class:`OutOfRange` of a chunk becomes one naming the
        whole range (:meth:`_check_fits`, asked only then)."""
        _check_number("sector", sector, volume=self.name)
        mv = memoryview(buffer).cast("B")
        size = await self.sector_size(timeout=timeout)
        if len(mv) % size:
            raise InvalidArgument(
                f"buffer of {len(mv)} bytes is not a whole number of {size}-byte sectors",
                volume=self.name,
            )
        count = len(mv) // size
        try:
            return await self._read_into(sector, count, mv, presence, timeout)
        except OutOfRange:
            await self._check_fits(sector, count, timeout)
            raise

    async def _read_chunk(
        self, sector: int, count: int, presence: bool, timeout: Timeout
    ) -> tuple[memoryview, list[Extent]]:
        """One Read (at most ``max_io`` bytes): the data as a view of the reply and, with
        ``presence``, the runs some layer holds; :class:`StorageError` if the reply is
        malformed or not ``count`` sectors long (the server misbehaved)."""
        req = pb.ReadRequest(
            volume=self.name, sector=sector, sector_count=count, report_presence=presence
        )
        raw = await self._call(self.client._read_raw, req, timeout)
        try:
            reply = read_reply_view(raw)
        except ValueError as exc:
            raise StorageError(f"malformed Read reply: {exc}", volume=self.name) from None
        if reply is None:  # fields this fast path does not handle: let protobuf parse it
            msg = pb.ReadResponse.FromString(raw)
            data, extents = memoryview(msg.data), _extents(msg.present)
        else:
            data, extents = reply[0], [Extent(a, n) for a, n in reply[1]]
        self._check_reply_size(len(data), count, await self.sector_size(timeout=timeout))
        return data, extents

    def _check_reply_size(self, nbytes: int, count: int, sector_size: int) -> None:
        """:class:`StorageError` unless a Read reply of ``nbytes`` holds ``count`` sectors
        (the server misbehaved)."""
        if nbytes != count * sector_size:
            raise StorageError(
                f"server returned {nbytes} bytes for {count} sectors", volume=self.name
            )

    async def _read_into(
        self, sector: int, count: int, out: memoryview, presence: bool, timeout: Timeout
    ) -> list[Extent]:
        size, per_chunk = await self._chunk_sectors(timeout)
        runs: list[Extent] = []
        done = 0

        async def one(chunk: Chunk) -> None:
            nonlocal done
            start = chunk.offset * size
            expected = chunk.sector_count * size
            data, extents = await self._read_chunk(
                chunk.sector, chunk.sector_count, presence, timeout
            )
            out[start : start + expected] = data
            runs.extend(extents)
            done += expected

        try:
            await run_bounded(plan_chunks(sector, count, per_chunk), one, self.client.max_in_flight)
        except Interrupted as exc:  # closed mid-call: say how far it got; nothing is returned
            raise self._with_progress(exc, f"{done} of {count * size} bytes had been read") from exc
        return merge_extents(runs)

    async def stream_read(
        self, sector: int, count: int, *, timeout: Timeout = UNSET
    ) -> AsyncIterator[tuple[int, bytes]]:
        """Yield ``(sector, data)`` chunks of the range in order, keeping ``max_in_flight``
        requests running ahead: for copying a large range out without holding it all. A
        range of more than one chunk is first checked against the volume's size."""
        _check_range(sector, count, volume=self.name)
        _, per_chunk = await self._chunk_sectors(timeout)
        if count > per_chunk:
            await self._check_fits(sector, count, timeout)

        async def one(chunk: Chunk) -> bytes:
            data, _ = await self._read_chunk(chunk.sector, chunk.sector_count, False, timeout)
            return bytes(data)

        chunks = run_ordered(plan_chunks(sector, count, per_chunk), one, self.client.max_in_flight)
        try:
            async for chunk, data in chunks:
                yield chunk.sector, data
        finally:
            await chunks.aclose()

    async def read_bytes(self, offset: int, length: int, *, timeout: Timeout = UNSET) -> bytes:
        """``length`` bytes from byte ``offset``. Both must be multiples of the sector size
        (no read-modify-write is done); otherwise :class:`InvalidArgument` is raised
        without a call."""
        _check_number("offset", offset, limit=None, volume=self.name)
        _check_number("length", length, limit=None, volume=self.name)
        size = await self.sector_size(timeout=timeout)
        self._check_aligned(offset, length, size)
        return await self.read(offset // size, length // size, timeout=timeout)

    # -- writes --------------------------------------------------------------------------

    async def write(
        self,
        sector: int,
        data: Buffer,
        *,
        fua: bool = False,
        no_overwrite: bool = False,
        timeout: Timeout = UNSET,
    ) -> None:
        """Write ``data`` (a whole number of sectors) from ``sector``. ``fua``: durable when
        acknowledged (if the volume's ``fua_respected``); ``no_overwrite``: leave sectors the
        volume already holds unchanged.

        More than ``max_io`` bytes go as several requests, ``max_in_flight`` at a time. Such a
        write is first checked against the volume's size (one GetVolume, see
        :meth:`_check_fits`): one that reaches past the end raises :class:`OutOfRange` for the
        whole range and writes nothing (DESIGN §3). If a chunk fails for another reason, the
        others may have been written; so too if the client is closed mid-call
        (:class:`~tierdisk.client.errors.ClientClosed`, saying how many bytes had been written).
        Retries after ``UNAVAILABLE`` or ``CANCELLED`` are safe: a write is idempotent."""
        _check_number("sector", sector, volume=self.name)
        mv = memoryview(data).cast("B")
        size, per_chunk = await self._chunk_sectors(timeout)
        if len(mv) % size:
            raise InvalidArgument(
                f"data of {len(mv)} bytes is not a whole number of {size}-byte sectors",
                volume=self.name,
            )
        count = len(mv) // size
        _check_range(sector, count, volume=self.name)

        done = 0

        async def one(chunk: Chunk) -> None:
            nonlocal done
            start = chunk.offset * size
            end = start + chunk.sector_count * size
            req = encode_write(
                self.name, chunk.sector, mv[start:end], fua=fua, no_overwrite=no_overwrite
            )
            await self._call(self.client._write_raw, req, timeout, rpc="Write")
            done += end - start

        if count <= per_chunk:
            await one(Chunk(sector, count, 0))
            return
        await self._check_fits(sector, count, timeout)
        try:
            await run_bounded(plan_chunks(sector, count, per_chunk), one, self.client.max_in_flight)
        except Interrupted as exc:  # closed mid-call: say how far it got
            note = f"{done} of {len(mv)} bytes had been written, and those in flight may have been"
            raise self._with_progress(exc, note) from exc

    async def write_bytes(
        self, offset: int, data: Buffer, *, fua: bool = False, timeout: Timeout = UNSET
    ) -> None:
        """Write ``data`` at byte ``offset``. The offset and the length must be multiples of
        the sector size (no read-modify-write is done); otherwise :class:`InvalidArgument`
        is raised without a call."""
        _check_number("offset", offset, limit=None, volume=self.name)
        size = await self.sector_size(timeout=timeout)
        self._check_aligned(offset, memoryview(data).nbytes, size)
        await self.write(offset // size, data, fua=fua, timeout=timeout)

    async def unmap(
        self,
        sector: int,
        count: int,
        *,
        block_level_only: bool = False,
        timeout: Timeout = UNSET,
    ) -> None:
        """Discard ``count`` sectors from ``sector``; later reads follow the volume's
        ``unmap_behavior``."""
        _check_range(sector, count, volume=self.name)
        req = pb.UnmapRequest(
            volume=self.name, sector=sector, sector_count=count, block_level_only=block_level_only
        )
        await self._call(self._stub.Unmap, req, timeout)

    async def flush(self, *, timeout: Timeout = UNSET) -> None:
        """Make every write acknowledged before this call durable."""
        await self._call(self._stub.Flush, pb.FlushRequest(volume=self.name), timeout)

    async def resize(self, sector_count: int, *, timeout: Timeout = UNSET) -> VolumeInfo:
        """Change the volume's size (its top layer's) to ``sector_count`` sectors."""
        _check_number("sector_count", sector_count, volume=self.name)
        req = pb.ResizeRequest(volume=self.name, sector_count=sector_count)
        info = VolumeInfo.from_proto(await self._call(self._stub.Resize, req, timeout))
        self._sector_size = info.sector_size
        return info

    # -- diagnostics ---------------------------------------------------------------------

    async def allocation(
        self, sector: int = 0, count: int | None = None, *, timeout: Timeout = UNSET
    ) -> list[AllocationExtent]:
        """Which layer holds each run of ``count`` sectors from ``sector`` (default: to the
        end of the volume); runs cover the range, sorted, holes have ``depth == -1``.

        One GetAllocation normally answers. A range with more extents than one reply carries
        (a fragmented volume: the server refuses it, :class:`AllocationTooLarge`) is asked
        for in windows, adaptively: the window halves on each such refusal and doubles after
        two answers in a row, and the answers are joined into one list (runs of one depth
        that meet at a window border become one run). A refusal by the transport's message
        cap is taken the same way: ``RESOURCE_EXHAUSTED`` without a ``tierdisk-error``
        trailer, which a server that predates the refusal sends, as does one whose
        ``max_io`` is over this client's receive cap. Each call has its own deadline
        (``timeout``)."""
        _check_number("sector", sector, volume=self.name)
        if count is None:
            count = max(0, (await self.info(timeout=timeout)).sector_count - sector)
        _check_range(sector, count, volume=self.name)
        end = sector + count
        extents: list[AllocationExtent] = []
        window = count  # the whole range first: most volumes answer in one reply
        answered = 0  # answers in a row at this window size
        while True:
            span = min(window, end - sector)
            try:
                part = await self._allocation_window(sector, span, timeout)
            except (AllocationTooLarge, NoSpace) as exc:
                if span <= 1 or (isinstance(exc, NoSpace) and exc.server_error):
                    raise  # one sector is one extent; or a real NoSpace (never expected)
                window, answered = span // 2, 0
                continue
            if extents and part and _joins(extents[-1], part[0]):
                last = extents.pop()
                part[0] = AllocationExtent(
                    last.sector, last.sector_count + part[0].sector_count, last.depth
                )
            extents.extend(part)
            sector += span
            if sector >= end:
                return extents
            answered += 1
            if answered == 2:
                window, answered = window * 2, 0

    async def _allocation_window(
        self, sector: int, count: int, timeout: Timeout
    ) -> list[AllocationExtent]:
        """One GetAllocation: the runs of ``count`` sectors from ``sector``."""
        req = pb.GetAllocationRequest(volume=self.name, sector=sector, sector_count=count)
        resp = await self._call(self._stub.GetAllocation, req, timeout)
        return [AllocationExtent(e.sector, e.sector_count, e.depth) for e in resp.extents]

    async def inspect(self, path: str = "", *, timeout: Timeout = UNSET) -> dict[str, Any]:
        """The volume's diagnostic tree (or the subtree ``path`` selects) as plain JSON-able
        values. The wire format (``Struct``) carries every number as a double; whole numbers
        come back as ``int``."""
        req = pb.InspectRequest(volume=self.name, path=path)
        resp = await self._call(self._stub.Inspect, req, timeout)
        tree = _integral(json_format.MessageToDict(resp.tree))
        return tree if isinstance(tree, dict) else {"value": tree}

    async def watch_resize(self, *, timeout: float | None = None) -> AsyncIterator[ResizeEvent]:
        """Yield the volume's size now, then once per change, until the caller stops
        iterating (or ``timeout`` seconds pass; default: never).

        ``UNAVAILABLE`` or ``CANCELLED`` before the first event is retried like any call; once
        events have
        arrived, a broken stream raises :class:`Unavailable` — watch again to resume: the
        first event tells the current size and generation."""
        req = pb.WatchResizeRequest(volume=self.name)
        policy = self.client.policy
        retry = 0
        while True:
            self.client._check_open()
            call = self._stub.WatchResize(
                req, timeout=timeout, metadata=self.client._call_metadata()
            )
            started = False
            began = time.perf_counter()
            code = grpc.StatusCode.CANCELLED
            try:
                async for event in call:
                    started = True
                    yield ResizeEvent(event.sector_count, event.generation)
                code = grpc.StatusCode.OK
                return
            except grpc.RpcError as err:
                code = status_code(err)
                if started or not is_retryable(err) or retry >= policy.retries:
                    raise error_from_rpc(
                        err, volume=self.name, target=self.client.target, method="WatchResize"
                    ) from err
            except asyncio.CancelledError:
                if caller_cancelled():
                    raise
                raise self.client._cut_short("the WatchResize stream", self.name) from None
            finally:
                call.cancel()
                self.client._observe("WatchResize", code, began)
            await self.client._backoff(policy.delay(retry))
            retry += 1

    # -- helpers -------------------------------------------------------------------------

    def _with_progress(self, exc: Interrupted, note: str) -> Interrupted:
        """``exc``, a split read or write cut short, again with ``note`` (how much of it had
        completed) after its message: a :class:`ClientClosed` if the client is closed."""
        cls = ClientClosed if self.client.closed else type(exc)
        return cls(f"{exc.message}; {note}", volume=self.name)

    async def _check_fits(self, sector: int, count: int, timeout: Timeout) -> None:
        """:class:`OutOfRange` naming the caller's whole range if ``[sector, sector + count)``
        reaches past the end of the volume, asked fresh of the server (one GetVolume: little
        next to the more than ``max_io`` bytes of a request that is split).

        Done before a split read allocates its buffer or a split write sends its first chunk,
        so that such a request changes nothing (DESIGN §3); for a split read into the
        caller's buffer, only once a chunk was refused, to name the whole range. It races with
        a concurrent resize: a shrink between this check and the chunks can still fail a chunk
        after others landed (the server refuses each chunk past the new end), and a grow just
        after it can refuse a request that would then fit — as if the request had come before
        the resize."""
        (await self.info(timeout=timeout)).check_fits(sector, count)

    def _check_aligned(self, offset: int, length: int, size: int) -> None:
        _check_number("offset", offset, limit=UINT64_LIMIT * size, volume=self.name)
        _check_number("length", length, limit=UINT64_LIMIT * size, volume=self.name)
        if offset % size or length % size:
            raise InvalidArgument(
                f"byte range {offset}+{length} is not aligned to the {size}-byte sector size",
                volume=self.name,
            )


def _check_number(
    name: str, value: object, *, limit: int | None = UINT64_LIMIT, volume: str | None = None
) -> int:
    """``value`` if it is an ``int`` (not a ``bool``) in ``[0, limit)`` (``limit`` None: any
    ``int`` from 0); :class:`TypeError` for another type, :class:`InvalidArgument` naming
    ``name`` for a number no request can carry — checked before any call is made."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0:
        raise InvalidArgument(f"{name} {value} must not be negative", volume=volume)
    if limit is not None and value >= limit:
        bits = limit.bit_length() - 1
        bound = f"2**{bits}" if limit == 1 << bits else str(limit)
        raise InvalidArgument(f"{name} {value} is too large (must be below {bound})", volume=volume)
    return value


def _check_range(sector: object, count: object, *, volume: str) -> None:
    _check_number("sector", sector, volume=volume)
    _check_number("count", count, volume=volume)


def _joins(before: AllocationExtent, after: AllocationExtent) -> bool:
    """Whether ``after`` continues ``before``: it starts where ``before`` ends, same depth."""
    return before.end == after.sector and before.depth == after.depth


def _extents(runs: Sequence[pb.Extent]) -> list[Extent]:
    return [Extent(r.sector, r.sector_count) for r in runs]


def _integral(value: Any) -> Any:
    """``value`` with whole floats (as Struct stores every number) turned into ints."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value
