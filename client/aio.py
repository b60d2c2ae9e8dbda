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

The channel is opened by :func:`tierdisk.client.channel.open_channel`; the client and its
volumes make their calls through the client's :class:`~tierdisk.client.calls.CallRunner`
(deadline, metadata, retries, ``on_call``, errors). The numbers of a request are checked by
:mod:`tierdisk.client.request_numbers`, read replies taken apart by
:mod:`tierdisk.client.read_replies`, and a ``ReadBatch`` call's request and reply by
:mod:`tierdisk.client.batch`.
"""

# ASYNC109: ``timeout=`` here is the gRPC deadline of the call(s) a method makes (with retries
# inside it), which asyncio.timeout() around the call cannot express.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import numbers
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Generic, Literal, TypeAlias, TypedDict, TypeVar, overload

import grpc
import grpc.aio
from google.protobuf import json_format

from tierdisk.v1 import blockdevice_pb2 as pb

from .batch import (
    batch_request,
    buffer_views,
    check_buffer_sizes,
    presence_not_reported,
    split_batch_reply,
)
from .calls import UNSET, CallObserver, CallRunner, MetadataFactory, Timeout, deadline_seconds
from .channel import DEFAULT_CHANNEL_OPTIONS, open_channel
from .checks import sendable_metadata, token_problem
from .chunking import (
    DEFAULT_IN_FLIGHT,
    DEFAULT_MAX_IO,
    Chunk,
    allocation_in_windows,
    merge_extents,
    plan_batches,
    plan_chunks,
    run_bounded,
    run_ordered,
    sectors_per_chunk,
)
from .errors import (
    ClientClosed,
    Interrupted,
    InvalidArgument,
    OutOfRange,
    SectorSizeChanged,
    StorageError,
    TierdiskError,
    WritesLost,
)
from .models import AllocationExtent, Extent, ReadResult, ResizeEvent, VolumeInfo
from .read_replies import check_reply_size, decode_read_reply
from .request_numbers import UINT32_LIMIT, check_aligned, check_number, check_range
from .retry import DEFAULT_BACKOFF, DEFAULT_MAX_BACKOFF, DEFAULT_RETRIES, RetryPolicy
from .verifiers import UnflushedWrites
from .wire import encode_write

__all__ = [
    "DEFAULT_CHANNEL_OPTIONS",
    "UNSET",
    "AsyncClient",
    "AsyncVolume",
    "Buffer",
    "CallObserver",
    "ClientOptions",
    "MetadataFactory",
    "Timeout",
]

T = TypeVar("T")
Req = TypeVar("Req")
Resp = TypeVar("Resp")

Buffer: TypeAlias = bytes | bytearray | memoryview
"""Data to write (a whole number of sectors)."""


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
    metadata_factory: MetadataFactory | None
    on_call: CallObserver | None


class _OnRunner(Generic[T]):
    """An attribute of :class:`AsyncClient` that is its :class:`CallRunner`'s (read at every
    call): reading or setting it on the client reads or sets the runner's."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, client: None, owner: type) -> _OnRunner[T]: ...

    @overload
    def __get__(self, client: AsyncClient, owner: type) -> T: ...

    def __get__(self, client: AsyncClient | None, owner: type) -> T | _OnRunner[T]:
        if client is None:
            return self
        value: T = getattr(client.runner, self._name)
        return value

    def __set__(self, client: AsyncClient, value: T) -> None:
        setattr(client.runner, self._name, value)


class AsyncClient:
    """A connection to one tierdisk server.

    ``target``: ``host:port`` (``[v6addr]:port``; a name such as ``localhost:7400``) or
    ``unix:/path``, or gRPC's ``dns:``, ``ipv4:``, ``ipv6:`` and ``unix-abstract:`` forms;
    checked when the client is made, as the ``tierdisk`` command checks ``--server``
    (:func:`~tierdisk.client.channel.check_target`): a missing port (gRPC would use 443),
    a NUL or other control character (gRPC would cut the address there), white space or a
    URL is a :class:`ValueError` naming the problem.

    ``timeout``: seconds per call (each chunk of a split read or write is a call), ``None``
    for none. ``retries``, ``backoff``,
    ``max_backoff``: the retry policy on ``UNAVAILABLE`` and ``CANCELLED`` (see
    :class:`RetryPolicy`); the defaults (12, 0.1 s, 2.0 s) wait up to ~17 s, ~8.5 s on
    average, to ride through a server restart — pass ``retries=0`` to fail fast.
    ``metadata``: extra ``(key, value)`` pairs sent with every call; a key is sent in lower
    case (header names are case-insensitive, and lower case on the wire: ``X-Trace`` is
    sent as ``x-trace``), and a pair gRPC cannot send (a key of other characters than ASCII
    letters, digits, ``_-.``, or starting ``grpc-``; a value not printable ASCII, or not
    bytes for a key ending ``-bin``) is a :class:`ValueError`. ``token``: sent as
    ``authorization: Bearer <token>``. TLS is used when ``secure`` is true or any of
    ``root_certificates`` / ``certificate_chain`` / ``private_key`` (PEM bytes) is given; a
    ``certificate_chain`` without its ``private_key``, or the reverse, is a :class:`ValueError`.
    ``max_io``: bytes of data per Read/Write request (default 1 MiB, must not exceed the
    server's ``max_io``); ``max_in_flight``: chunk requests in flight per large call.

    Hooks, for a server that is itself a client (a remote layer): ``metadata_factory()`` is
    called once per unary call (its retries send the same pairs) and per WatchResize
    stream, and its pairs are sent after ``metadata`` (keys lowered and pairs checked
    likewise: a :class:`ValueError` from the call); ``on_call(rpc, code, seconds)`` is
    called after every unary call attempt and when a WatchResize stream ends; the
    ``policy_factory`` attribute (None unless set), when set, is called at each unary call
    and WatchResize stream for its retry policy, instead of ``policy``.

    It is made in a running event loop, and used in that loop only (a gRPC channel belongs
    to one loop): a call made in another one (a second ``asyncio.run()``, say) raises a
    :class:`RuntimeError` saying so, before anything is sent. Blocking code, or code that
    runs several loops, uses :class:`tierdisk.client.Client`, which has a loop of its own.

    Use it as an async context manager, or ``await client.close()`` (in any loop); a closed
    client's methods raise :class:`~tierdisk.client.errors.ClientClosed` (a
    ``RuntimeError``: "the client is closed"), and so do the calls in flight when it was
    closed. Closing lets go of the gRPC channel: a closed client that is still referenced
    keeps no gRPC thread alive.

    Its calls, and its volumes', are made by its ``runner`` (:class:`CallRunner`), which
    holds ``target``, ``timeout``, ``policy``, ``policy_factory``, ``metadata``,
    ``metadata_factory`` and ``on_call``: the client's attributes of those names are the
    runner's.
    """

    target = _OnRunner[str]()
    timeout = _OnRunner[float | None]()
    policy = _OnRunner[RetryPolicy]()
    policy_factory = _OnRunner[Callable[[], RetryPolicy] | None]()
    metadata = _OnRunner[tuple[tuple[str, str], ...]]()
    metadata_factory = _OnRunner[MetadataFactory | None]()
    on_call = _OnRunner[CallObserver | None]()

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
        for option, number in (("max_io", max_io), ("max_in_flight", max_in_flight)):
            if isinstance(number, bool) or not isinstance(number, numbers.Integral):
                raise TypeError(f"{option} must be an int, not {type(number).__name__}")
            if number <= 0:
                raise ValueError(f"{option} must be positive, not {number}")
        max_io, max_in_flight = int(max_io), int(max_in_flight)  # (gRPC's options take ints)
        timeout = deadline_seconds(timeout)
        if token is not None and (problem := token_problem(token)) is not None:
            raise ValueError(f"token {problem}")  # never the token itself
        md = list(sendable_metadata(metadata))
        policy = RetryPolicy(retries=retries, backoff=backoff, max_backoff=max_backoff)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "an AsyncClient is made in a running event loop (in a coroutine, the loop "
                "it is used in); blocking code uses tierdisk.client.Client"
            ) from None
        self.max_io = max_io
        self.max_in_flight = max_in_flight
        if token is not None:
            md.append(("authorization", f"Bearer {token}"))
        channel = open_channel(
            target,
            max_io=max_io,
            channel_options=channel_options,
            secure=secure,
            root_certificates=root_certificates,
            certificate_chain=certificate_chain,
            private_key=private_key,
        )
        self.runner = CallRunner(
            channel,
            target=target,
            policy=policy,
            timeout=timeout,
            metadata=tuple(md),
            metadata_factory=metadata_factory,
            on_call=on_call,
        )
        self._unflushed: dict[str, UnflushedWrites] = {}

    def unflushed_writes(self, volume: str) -> UnflushedWrites:
        """The writes to ``volume`` acknowledged through this client that no flush has
        vouched for yet (:mod:`tierdisk.client.verifiers`): shared by all its handles on the
        volume, so a flush through one covers writes made through another."""
        found = self._unflushed.get(volume)
        if found is None:
            found = self._unflushed[volume] = UnflushedWrites()
        return found

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
        await self.runner.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self.runner.closed

    def connectivity(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """The channel's connection state (``READY``, ``IDLE``, ``TRANSIENT_FAILURE``, …);
        ``SHUTDOWN`` once the client is closed."""
        if self.runner.closed:
            return grpc.ChannelConnectivity.SHUTDOWN
        return self.runner.channel.get_state(try_to_connect)

    def volume(self, name: str) -> AsyncVolume:
        """A handle on the volume ``name`` (no call is made until it is used)."""
        return AsyncVolume(self, name)

    async def list_volumes(
        self, *, page_size: int = 0, timeout: Timeout = UNSET
    ) -> list[VolumeInfo]:
        """Every volume the server serves, following ``next_page_token`` to the end
        (``page_size`` 0 = the server's default page size). A volume that is configured but
        not ready yet (waiting for its remote tier) is listed with its name only, every
        other field zero (``sector_size`` 0): its :attr:`VolumeInfo.ready` is false."""
        check_number("page_size", page_size, limit=UINT32_LIMIT)
        runner = self.runner
        volumes: list[VolumeInfo] = []
        token = ""
        seen: set[str] = set()
        while True:
            req = pb.ListVolumesRequest(page_size=page_size, page_token=token)
            resp = await runner.unary(runner.stub.ListVolumes, req, timeout=timeout)
            volumes.extend(VolumeInfo.from_proto(v) for v in resp.volumes)
            token = resp.next_page_token
            if not token:
                return volumes
            if token in seen:
                raise InvalidArgument(f"the server repeated page token {token!r}")
            seen.add(token)


class AsyncVolume:
    """One volume on a server. Sector numbers and counts are in the volume's sectors; the
    ``*_bytes`` helpers take byte offsets. The sector size is fetched once (``info()``)
    and cached, and every request that counts in sectors carries the size it was counted
    in, once known: should the volume be re-created with another sector size, the server
    refuses it (:class:`SectorSizeChanged`, which also drops the cached size) rather than
    take its sectors as other bytes."""

    def __init__(self, client: AsyncClient, name: str) -> None:
        self.client = client
        self.name = name
        self._sector_size: int | None = None
        self._runner = client.runner
        self._unflushed = client.unflushed_writes(name)

    def __repr__(self) -> str:
        return f"AsyncVolume({self.name!r} on {self.client.target!r})"

    async def _call(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp],
        request: Req,
        timeout: Timeout,
        rpc: str | None = None,
    ) -> Resp:
        """One call about this volume; a :class:`SectorSizeChanged` drops the cached
        sector size (the next call asks it again)."""
        try:
            return await self._runner.unary(
                method, request, timeout=timeout, volume=self.name, rpc=rpc
            )
        except SectorSizeChanged:
            self._sector_size = None
            raise

    async def info(self, *, timeout: Timeout = UNSET) -> VolumeInfo:
        """The volume's geometry and capabilities, fresh from the server."""
        msg = await self._call(
            self._runner.stub.GetVolume, pb.GetVolumeRequest(volume=self.name), timeout
        )
        info = VolumeInfo.from_proto(msg)
        if info.sector_size <= 0:  # every size this client counts in would divide by it
            raise StorageError(
                f"the server at {self.client.target} answered a sector size of "
                f"{info.sector_size} for volume {self.name!r}: not a volume a client can use",
                volume=self.name,
            )
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
        check_range(sector, count, volume=self.name)
        size, per_chunk = await self._chunk_sectors(timeout)
        if count <= per_chunk:
            data, extents = await self._read_chunk(sector, count, report_presence, timeout, size)
            if not report_presence:
                return bytes(data)
            return ReadResult(bytes(data), tuple(merge_extents(extents)))
        await self._check_fits(sector, count, timeout, size)
        buf = bytearray(count * size)
        present = await self._read_into(
            sector, count, memoryview(buf), report_presence, timeout, size
        )
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
        check_number("sector", sector, volume=self.name)
        mv = memoryview(buffer).cast("B")
        if mv.readonly:
            raise TypeError(f"the buffer to read into is read-only ({type(buffer).__name__})")
        size = await self.sector_size(timeout=timeout)
        if len(mv) % size:
            raise InvalidArgument(
                f"volume {self.name!r}: buffer of {len(mv)} bytes is not a whole number of "
                f"{size}-byte sectors",
                volume=self.name,
            )
        count = len(mv) // size
        if count == 0:  # asked all the same: past the end is OutOfRange, as for read()
            _, extents = await self._read_chunk(sector, 0, presence, timeout, size)
            return extents
        try:
            return await self._read_into(sector, count, mv, presence, timeout, size)
        except OutOfRange:
            await self._check_fits(sector, count, timeout, size)
            raise

    async def _read_chunk(
        self, sector: int, count: int, presence: bool, timeout: Timeout, size: int
    ) -> tuple[memoryview, list[Extent]]:
        """One Read (at most ``max_io`` bytes) of ``count`` sectors of ``size`` bytes (the
        size the caller counts in, which the server checks): the data as a view of the reply
        and, with ``presence``, the runs some layer holds; :class:`StorageError` if the reply
        is malformed or not ``count`` sectors long (the server misbehaved)."""
        req = pb.ReadRequest(
            volume=self.name,
            sector=sector,
            sector_count=count,
            report_presence=presence,
            sector_size=size,
        )
        raw = await self._call(self._runner.read_raw, req, timeout, "Read")
        data, extents, _ = decode_read_reply(raw, "Read", self.name)
        check_reply_size(len(data), count, size, self.name)
        return data, extents

    async def _read_into(
        self,
        sector: int,
        count: int,
        out: memoryview,
        presence: bool,
        timeout: Timeout,
        size: int,
    ) -> list[Extent]:
        """Read ``count`` sectors of ``size`` bytes (the caller's) into ``out``, in chunks."""
        per_chunk = sectors_per_chunk(self.client.max_io, size)
        runs: list[Extent] = []
        done = 0

        async def one(chunk: Chunk) -> None:
            nonlocal done
            start = chunk.offset * size
            expected = chunk.sector_count * size
            data, extents = await self._read_chunk(
                chunk.sector, chunk.sector_count, presence, timeout, size
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
    ) -> AsyncGenerator[tuple[int, bytes], None]:
        """Yield ``(sector, data)`` chunks of the range in order, keeping ``max_in_flight``
        requests running ahead: for copying a large range out without holding it all. A
        range of more than one chunk is first checked against the volume's size.

        An async generator: to stop early, ``await it.aclose()`` (or iterate it in
        ``async with contextlib.aclosing(...)``), which cancels the requests running ahead
        (breaking out of ``async for`` does so only once the generator is garbage
        collected)."""
        check_range(sector, count, volume=self.name)
        size, per_chunk = await self._chunk_sectors(timeout)
        if count > per_chunk:
            await self._check_fits(sector, count, timeout, size)
        elif count == 0:  # nothing to yield, but past the end is OutOfRange, as for read()
            await self._read_chunk(sector, 0, False, timeout, size)
            return

        async def one(chunk: Chunk) -> bytes:
            data, _ = await self._read_chunk(chunk.sector, chunk.sector_count, False, timeout, size)
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
        check_number("offset", offset, limit=None, volume=self.name)
        check_number("length", length, limit=None, volume=self.name)
        size = await self.sector_size(timeout=timeout)
        check_aligned(offset, length, size, volume=self.name)
        return await self.read(offset // size, length // size, timeout=timeout)

    async def read_batch(
        self, ranges: Iterable[tuple[int, int]], *, timeout: Timeout = UNSET
    ) -> list[bytes]:
        """The data of each ``(sector, count)`` range, in the order given (ranges may overlap
        or repeat): many small reads in few calls.

        One ``ReadBatch`` call carries up to 256 ranges and ``max_io`` bytes, for the gRPC
        cost of one call (each range still costs the server its own storage work); a larger
        batch goes in several calls, ``max_in_flight`` at a time, and a range over
        ``max_io`` is read as :meth:`read` reads it. All or nothing: a range past the end raises
        :class:`OutOfRange` naming it, and nothing is returned. Needs a server that serves
        ``ReadBatch`` (tierdisk from 2026-11-27); an older one raises
        :class:`Unimplemented`."""
        wanted = list(ranges)
        out: list[bytes] = [b""] * len(wanted)

        def put(index: int, data: memoryview) -> None:
            out[index] = bytes(data)

        async def read_large(index: int, timeout: Timeout) -> list[Extent]:
            out[index] = await self.read(*wanted[index], timeout=timeout)
            return []

        await self._read_batch(wanted, put, read_large, False, timeout)
        return out

    async def read_batch_into(
        self,
        ranges: Sequence[tuple[int, int]],
        buffers: Sequence[bytearray | memoryview],
        *,
        timeout: Timeout = UNSET,
    ) -> None:
        """:meth:`read_batch` into the caller's buffers, one per range (each exactly the
        range's bytes), without the copy into new ``bytes``. After an error the buffers'
        content is unspecified."""
        await self._read_batch_into_buffers(ranges, buffers, False, timeout)

    async def read_batch_present_into(
        self,
        ranges: Sequence[tuple[int, int]],
        buffers: Sequence[bytearray | memoryview],
        *,
        timeout: Timeout = UNSET,
    ) -> list[Extent]:
        """:meth:`read_batch_into`, also returning the runs of the ranges some layer holds
        (one list for all the ranges: sorted, merged; the sectors outside them read as
        zeros), as :meth:`read_present_into` does for one range. Needs a server that
        reports presence in ``ReadBatch`` (tierdisk since commit ``f972819``): an older one's reply
        says nothing of presence, and this raises :class:`Unimplemented` rather than take
        every sector for a hole (only where a range goes in a ``ReadBatch`` call: an empty
        batch, or one whose ranges are each over ``max_io`` and so read alone, is
        answered by any server)."""
        return await self._read_batch_into_buffers(ranges, buffers, True, timeout)

    async def _read_batch_into_buffers(
        self,
        ranges: Sequence[tuple[int, int]],
        buffers: Sequence[bytearray | memoryview],
        presence: bool,
        timeout: Timeout,
    ) -> list[Extent]:
        """:meth:`read_batch_into` and :meth:`read_batch_present_into`."""
        views = buffer_views(ranges, buffers)

        def put(index: int, data: memoryview) -> None:
            views[index][:] = data

        async def read_large(index: int, timeout: Timeout) -> list[Extent]:
            return await self._read_into_buffer(ranges[index][0], views[index], presence, timeout)

        size = await self.sector_size(timeout=timeout)
        check_buffer_sizes(ranges, views, size, volume=self.name)
        return await self._read_batch(ranges, put, read_large, presence, timeout)

    async def _read_batch(
        self,
        wanted: Sequence[tuple[int, int]],
        put: Callable[[int, memoryview], None],
        read_large: Callable[[int, Timeout], Awaitable[list[Extent]]],
        presence: bool,
        timeout: Timeout,
    ) -> list[Extent]:
        """:meth:`read_batch`, :meth:`read_batch_into` and :meth:`read_batch_present_into`:
        each range's data handed to ``put(index, data)`` (a view of the reply, valid during
        the call), or, for a range over ``max_io``, read by ``read_large(index, timeout)``;
        with ``presence``, the runs some layer holds (sorted, merged), else ``[]``."""
        self._runner.check_open()  # (an empty batch makes no call that would say so)
        for sector, count in wanted:
            check_range(sector, count, volume=self.name)
        size, per_chunk = await self._chunk_sectors(timeout)
        runs: list[Extent] = []

        async def one(group: list[int]) -> None:
            if len(group) == 1 and wanted[group[0]][1] > per_chunk:
                runs.extend(await read_large(group[0], timeout))
                return
            req = batch_request(self.name, wanted, group, size, presence)
            raw = await self._call(self._runner.read_batch_raw, req, timeout, "ReadBatch")
            data, extents, reported = decode_read_reply(raw, "ReadBatch", self.name)
            if presence and not reported:
                raise presence_not_reported(self.client.target)
            split_batch_reply(data, wanted, group, size, put, volume=self.name)
            runs.extend(extents)

        groups = plan_batches([count for _, count in wanted], per_chunk)
        if len(groups) == 1:
            await one(groups[0])
        else:
            await run_bounded(groups, one, self.client.max_in_flight)
        return merge_extents(runs) if presence else []

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
        others may have been written: the error (of the chunk's class, a
        :class:`~tierdisk.client.errors.ClientClosed` if the client is closed mid-call) says
        how many bytes had been, and is :attr:`~tierdisk.client.errors.TierdiskError.partial`
        (:func:`~tierdisk.client.errors.changed_nothing` is false even for a
        :class:`~tierdisk.client.errors.NoSpace`).
        Retries after ``UNAVAILABLE`` or ``CANCELLED`` are safe: a write is idempotent."""
        check_number("sector", sector, volume=self.name)
        mv = memoryview(data).cast("B")
        size, per_chunk = await self._chunk_sectors(timeout)
        if len(mv) % size:
            raise InvalidArgument(
                f"volume {self.name!r}: data of {len(mv)} bytes is not a whole number of "
                f"{size}-byte sectors",
                volume=self.name,
            )
        count = len(mv) // size
        check_range(sector, count, volume=self.name)

        runner = self._runner
        done = 0

        async def one(chunk: Chunk) -> None:
            nonlocal done
            start = chunk.offset * size
            end = start + chunk.sector_count * size
            req = encode_write(
                self.name,
                chunk.sector,
                mv[start:end],
                fua=fua,
                no_overwrite=no_overwrite,
                sector_size=size,
            )
            reply = await self._call(runner.write_raw, req, timeout, "Write")
            self._unflushed.acknowledged(reply.write_verifier)
            done += end - start

        if count <= per_chunk:
            await one(Chunk(sector, count, 0))
            return
        await self._check_fits(sector, count, timeout, size)
        try:
            await run_bounded(plan_chunks(sector, count, per_chunk), one, self.client.max_in_flight)
        except TierdiskError as exc:  # a chunk failed, or the client closed mid-call
            # Whatever the chunk's error says of its own request, the call changed the
            # volume if other chunks landed (or may have: those in flight when it failed).
            note = f"{done} of {len(mv)} bytes had been written, and those in flight may have been"
            raise self._with_progress(exc, note, partial=True) from exc

    async def write_bytes(
        self, offset: int, data: Buffer, *, fua: bool = False, timeout: Timeout = UNSET
    ) -> None:
        """Write ``data`` at byte ``offset``. The offset and the length must be multiples of
        the sector size (no read-modify-write is done); otherwise :class:`InvalidArgument`
        is raised without a call."""
        check_number("offset", offset, limit=None, volume=self.name)
        size = await self.sector_size(timeout=timeout)
        check_aligned(offset, memoryview(data).nbytes, size, volume=self.name)
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
        check_range(sector, count, volume=self.name)
        req = pb.UnmapRequest(
            volume=self.name,
            sector=sector,
            sector_count=count,
            block_level_only=block_level_only,
            sector_size=self._sector_size or 0,  # the size this handle knows, if any
        )
        reply = await self._call(self._runner.stub.Unmap, req, timeout)
        self._unflushed.acknowledged(reply.write_verifier)

    @property
    def unflushed_verifiers(self) -> list[int]:
        """The write verifiers that acknowledged writes made through this client that no
        flush has vouched for yet (oldest first; empty when every write is flushed or was
        durable when acknowledged). Another client (another process) that flushes for them
        hands these to :meth:`flush` as ``verifiers``: its flush then tells of a loss as
        this client's would."""
        return self._unflushed.verifiers()

    async def flush(self, *, verifiers: Iterable[int] = (), timeout: Timeout = UNSET) -> None:
        """Make every write acknowledged before this call durable.

        Raises :class:`WritesLost` when the server cannot vouch for writes this client
        made through it (:mod:`tierdisk.client.verifiers`): its write verifier changed
        since one of them was acknowledged (a restart without a clean stop, a flush that
        failed in its storage, a tier below it that lost writes). That is said once for
        the writes it covers: the next flush vouches only for writes acknowledged after
        this one started (one acknowledged meanwhile with the old verifier, because it began
        before the change, is reported by the next flush in turn). A flush
        that fails otherwise leaves the writes to the next one. ``verifiers`` are those of
        writes made through another client (its :attr:`unflushed_verifiers`: a
        ``tierdisk write --no-flush`` prints them): the flush raises :class:`WritesLost`
        too when the server's verifier is not each of them (a server without verifiers,
        which answers 0, vouches for nothing and reports nothing; a 0 among them, what a
        write durable when acknowledged answers, needs no flush and is skipped)."""
        given = [check_number("verifier", v, volume=self.name) for v in verifiers]
        unflushed = self._unflushed
        mark = unflushed.mark()
        reply = await self._call(
            self._runner.stub.Flush, pb.FlushRequest(volume=self.name), timeout
        )
        lost = unflushed.flushed(mark, reply.write_verifier, volatile=reply.volatile)
        if reply.write_verifier:
            lost += [v for v in given if v and v != reply.write_verifier and v not in lost]
        if lost:
            was = ", ".join(f"{v:#018x}" for v in lost)
            raise WritesLost(
                f"volume {self.name!r}: writes acknowledged since the last flush may be lost "
                "(on a volume that keeps nothing past a restart, flushed ones too): the "
                f"server's write verifier changed from {was} to {reply.write_verifier:#018x} "
                "since they were (it restarted without a clean stop, or restarted at all if "
                "the volume is volatile; a flush failed in its storage; or a tier below it "
                "lost writes)",
                volume=self.name,
            )

    async def resize(self, sector_count: int, *, timeout: Timeout = UNSET) -> VolumeInfo:
        """Change the volume's size (its top layer's) to ``sector_count`` sectors."""
        check_number("sector_count", sector_count, volume=self.name)
        req = pb.ResizeRequest(
            volume=self.name,
            sector_count=sector_count,
            sector_size=self._sector_size or 0,  # the size this handle knows, if any
        )
        info = VolumeInfo.from_proto(await self._call(self._runner.stub.Resize, req, timeout))
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
        check_number("sector", sector, volume=self.name)
        size = self._sector_size or 0  # the size this handle knows, if any
        if count is None:
            info = await self.info(timeout=timeout)
            if size:
                self._check_units(info, size)
            size = info.sector_size
            count = max(0, info.sector_count - sector)
        check_range(sector, count, volume=self.name)

        async def fetch(start: int, span: int) -> list[AllocationExtent]:
            return await self._allocation_window(start, span, timeout, size)

        return await allocation_in_windows(fetch, sector, count)

    async def _allocation_window(
        self, sector: int, count: int, timeout: Timeout, size: int
    ) -> list[AllocationExtent]:
        """One GetAllocation: the runs of ``count`` sectors (of ``size`` bytes; 0: not
        checked) from ``sector``."""
        req = pb.GetAllocationRequest(
            volume=self.name, sector=sector, sector_count=count, sector_size=size
        )
        resp = await self._call(self._runner.stub.GetAllocation, req, timeout)
        return [AllocationExtent(e.sector, e.sector_count, e.depth) for e in resp.extents]

    async def inspect(self, path: str = "", *, timeout: Timeout = UNSET) -> dict[str, Any]:
        """The volume's diagnostic tree (or the subtree ``path`` selects) as plain JSON-able
        values. The wire format (``Struct``) carries every number as a double; whole numbers
        come back as ``int``. A ``path`` that selects a leaf or a list comes back as
        ``{"value": X}`` (the reply is always a ``Struct``): ``inspect("generation")["value"]``."""
        req = pb.InspectRequest(volume=self.name, path=path)
        resp = await self._call(self._runner.stub.Inspect, req, timeout)
        tree = _integral(json_format.MessageToDict(resp.tree))
        return tree if isinstance(tree, dict) else {"value": tree}

    async def watch_resize(
        self, *, timeout: float | None = None
    ) -> AsyncGenerator[ResizeEvent, None]:
        """Yield the volume's size now, then once per change, until the caller stops
        iterating, or ``timeout`` seconds pass (then
        :class:`~tierdisk.client.errors.DeadlineExceeded`; default: never). The client's own
        ``timeout`` does not bound a watch.

        An async generator: ``await it.aclose()`` (or ``async with contextlib.aclosing(...)``
        around the iteration) ends the watch, cancelling its stream.

        ``UNAVAILABLE`` or ``CANCELLED`` before the first event is retried like any call; once
        events have arrived, a broken stream raises :class:`Unavailable` — watch again to
        resume: the first event tells the current size and generation."""
        runner = self._runner
        req = pb.WatchResizeRequest(volume=self.name)
        events = runner.stream(runner.stub.WatchResize, req, timeout=timeout, volume=self.name)
        async with contextlib.aclosing(events):
            async for event in events:
                yield ResizeEvent(event.sector_count, event.generation)

    # -- helpers -------------------------------------------------------------------------

    def _with_progress(
        self, exc: TierdiskError, note: str, *, partial: bool = False
    ) -> TierdiskError:
        """``exc``, the failure of a split read or write, again with ``note`` (how much of it
        had completed) after its message (:meth:`TierdiskError.with_note`): a
        :class:`ClientClosed` if it was cut short because the client is closed."""
        if isinstance(exc, Interrupted) and self._runner.closed:
            exc = ClientClosed(exc.message, volume=self.name)
        return exc.with_note(note, partial=partial)

    async def _check_fits(self, sector: int, count: int, timeout: Timeout, size: int) -> None:
        """:class:`OutOfRange` naming the caller's whole range if ``[sector, sector + count)``
        reaches past the end of the volume, asked fresh of the server (one GetVolume: little
        next to the more than ``max_io`` bytes of a request that is split);
        :class:`SectorSizeChanged` if the volume's sectors are no longer of ``size`` bytes,
        the size the caller counts in (it was re-created meanwhile), as the server says of a
        single request.

        Done before a split read allocates its buffer or a split write sends its first chunk,
        so that such a request changes nothing (DESIGN §3); for a split read into the
        caller's buffer, only once a chunk was refused, to name the whole range. It races with
        a concurrent resize: a shrink between this check and the chunks can still fail a chunk
        after others landed (the server refuses each chunk past the new end), and a grow just
        after it can refuse a request that would then fit — as if the request had come before
        the resize."""
        info = await self.info(timeout=timeout)
        self._check_units(info, size)
        info.check_fits(sector, count)

    def _check_units(self, info: VolumeInfo, size: int) -> None:
        """:class:`SectorSizeChanged` unless the volume's sectors (``info``, fresh) are of
        ``size`` bytes, the size the caller's sector numbers count in."""
        if info.sector_size != size:
            raise SectorSizeChanged(
                f"volume {self.name!r} has {info.sector_size}-byte sectors, not the "
                f"{size}-byte ones this request counts in: it was re-created since they were "
                "asked",
                volume=self.name,
            )


def _integral(value: Any) -> Any:
    """``value`` with whole floats (as Struct stores every number) turned into ints."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value
