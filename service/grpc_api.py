"""The ``BlockDevice`` servicer: gRPC requests in, engine calls, gRPC replies out.

Domain exceptions become gRPC status codes here, by the one table of DESIGN.md §2
(:data:`~.status.STATUS_NAMES`, which the NBD export's metrics use too). The reply of a
domain error also carries the trailing metadata ``tierdisk-error`` (:data:`ERROR_HEADER`, the
client's ``ERROR_METADATA_KEY``) with the exception class name, so the client can pick a
finer exception than the status code alone (``ReadOnlyError`` vs other
``FAILED_PRECONDITION``); a storage failure no layer named (an ``OSError``: ``INTERNAL``,
"storage failure: …") carries none, and the client makes it a ``StorageError`` by its code.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError

from tierdisk.client.chunking import MAX_BATCH_RANGES
from tierdisk.client.errors import ERROR_METADATA_KEY
from tierdisk.v1 import blockdevice_pb2 as pb
from tierdisk.v1 import blockdevice_pb2_grpc as pb_grpc

from . import hops
from .errors import (
    SERVER_STOPPING,
    SHUTTING_DOWN,
    AllocationTooLarge,
    FailedPrecondition,
    InvalidArgument,
    SectorSizeChanged,
    TierdiskError,
    Unavailable,
)
from .failure_log import StorageFailureLog
from .metrics import Metrics
from .read_reply import PRESENCE_REPORTED, ReadReply
from .registry import VolumeRegistry
from .reply_budget import BUDGETED_FROM_BYTES, ReplyBudgets
from .rpc_metrics import count_status_now
from .runs import merge
from .size_history import SizeEvent
from .status import status_name
from .volume import Volume
from .write_request import MalformedRequest, WriteRequestView, parse_write

__all__ = [
    "ERROR_HEADER",
    "BlockDeviceService",
    "DrainGate",
    "Undecodable",
    "add_to_server",
    "status_for",
]

log = logging.getLogger(__name__)

ERROR_HEADER = ERROR_METADATA_KEY
"""The trailer naming an error reply's exception class (``tierdisk-error``)."""

_CODES_BY_NAME = {code.name: code for code in grpc.StatusCode}

_OK = grpc.StatusCode.OK
_CANCELLED = grpc.StatusCode.CANCELLED  # the caller went away (its deadline, a cancel)
_UNKNOWN = grpc.StatusCode.UNKNOWN
_CODE_NAMES = {code: code.name for code in grpc.StatusCode}  # Enum.name is slow per call
_DURABLE_WRITE_RESPONSE = pb.WriteResponse()  # no verifier: durable for good (durable_since)
_DEFAULT_PAGE = 100
"""Volumes per ``ListVolumes`` reply when the request's ``page_size`` is 0."""
_MAX_PAGE = 1000
"""The most volumes one ``ListVolumes`` reply carries, whatever ``page_size`` asks."""
_EXTENT_MIN_BYTES = 6
"""The fewest bytes an ``AllocationExtent`` takes in a ``GetAllocationResponse``: its field's
tag and length (2), ``sector`` (2; only an extent at sector 0 omits it) and ``sector_count``
(2; never 0). ``depth`` 0 is omitted."""
_DEPTH_MAX_BYTES = 11
"""The most bytes ``depth`` takes: tag (1) and varint (10: an ``int32`` -1, a hole)."""
_EXTENTS_BETWEEN_YIELDS = 65536
"""Extents a ``GetAllocation`` reply is built with between yields to the event loop."""

T = TypeVar("T")


class Undecodable:
    """What a request deserializer of :func:`add_to_server` hands the servicer for bytes that
    are not the method's request message, instead of raising inside gRPC (which answers
    ``UNKNOWN`` with a Python exception's text): the servicer answers ``INVALID_ARGUMENT``
    with :attr:`problem`."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem


def _varint_bytes(value: int) -> int:
    """Bytes of ``value`` (non-negative) as a protobuf varint."""
    return max(1, (value.bit_length() + 6) // 7)


_BATCH_REQUEST_MAX = 64 << 10
"""The most bytes a ``ReadBatchRequest`` may take, checked before it is decoded: its 256
ranges take at most 6 KiB (24 bytes a range) beside the volume's name. Decoded, a request of
millions of ranges (up to the transport's cap of ``4 * max_io + 1 MiB``) took ~8 times its
bytes of memory and a third of a second of the event loop, only to be refused."""


def _parse_read_batch(raw: bytes) -> pb.ReadBatchRequest:
    """A ``ReadBatchRequest``, unless ``raw`` is larger than any the server takes."""
    if len(raw) > _BATCH_REQUEST_MAX:
        raise MalformedRequest(
            f"{len(raw)} bytes, more than a batch of {MAX_BATCH_RANGES} reads takes "
            f"(at most {_BATCH_REQUEST_MAX} bytes); split it"
        )
    return pb.ReadBatchRequest.FromString(raw)


def _decoder(name: str, parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """The request deserializer that reads the message ``name`` with ``parse``: the
    request, or an :class:`Undecodable` saying what ``parse`` refused."""

    def decode(raw: bytes) -> Any:
        try:
            return parse(raw)
        except DecodeError as exc:
            why = str(exc).rpartition(": ")[2]  # after protobuf's "Error parsing message …"
            return Undecodable(f"malformed {name}: {why}")
        except MalformedRequest as exc:
            return Undecodable(f"malformed {name}: {exc}")

    return decode


def _forget_frames(aborted: BaseException) -> None:
    """Drop what ``aborted`` refers to, once its call has ended.

    ``context.abort()`` raises an ``AbortError`` that gRPC keeps on the call's state, which
    the handler frames of the error's traceback refer to (``context``): a cycle that only
    the cycle collector frees, and with it every request those frames hold (16 refused
    Writes of 60 MiB took a server from 49 MB to 1 GB until a collection). Dropping the
    traceback and the error it was raised over (whose own traceback holds the request's
    data) when the call is done breaks it: the frames and the request go at once."""
    aborted.__traceback__ = None
    aborted.__context__ = None


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code for ``exc`` (:func:`~.status.status_name`): its nearest class's in
    the table, ``INTERNAL`` for any other storage failure (``OSError``), else ``UNKNOWN``."""
    return _CODES_BY_NAME[status_name(exc)]


class DrainGate:
    """Counts calls in flight and refuses new ones once draining started (graceful stop)."""

    def __init__(self) -> None:
        self.draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.drained = asyncio.Event()  # set when draining starts: ends watch streams
        self.on_drain: list[Callable[[], None]] = []  # called as draining starts

    def enter(self) -> None:
        if self.draining:
            raise Unavailable(SERVER_STOPPING)
        self._in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    async def drain(self, grace: float) -> bool:
        """Refuse new calls, call :attr:`on_drain` (what would wait for a client's pace ends
        now), and wait up to ``grace`` s for calls in flight; True if idle."""
        self.draining = True
        self.drained.set()
        for stop_waiting in self.on_drain:
            stop_waiting()
        if self._in_flight == 0:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            return False
        return True


def _to_volume_message(volume: Volume) -> pb.Volume:
    return pb.Volume(
        name=volume.name,
        sector_size=volume.sector_size,
        sector_count=volume.sector_count,
        physical_sector_size=volume.physical_sector_size,
        read_only=volume.read_only,
        fua_respected=volume.fua_respected,
        disk_id=volume.disk_id or b"",
        unmap_behavior=int(volume.unmap_behavior),  # type: ignore[arg-type]
        optimal_unmap_sectors=volume.optimal_unmap_sectors,
        volatile=volume.volatile,
        problem=volume.problem,
    )


def select_path(tree: Any, path: str) -> Any:
    """The subtree of ``tree`` at ``path`` (``layers/1/present_sectors``); '' = all."""
    node = tree
    walked: list[str] = []
    for part in (p for p in path.split("/") if p):
        walked.append(part)
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise InvalidArgument(f"inspect path {'/'.join(walked)!r} does not exist")
    return node


_NONE_WAITING: frozenset[str] = frozenset()

_MAX_DETAILS = 1024
"""Longest status message sent, in UTF-8 bytes (gRPC percent-encodes it into a header, and
all headers of a reply must fit in 8 KiB, or the client gets RESOURCE_EXHAUSTED instead)."""


def _as_done_callback(release: Callable[[], None]) -> Callable[[Any], None]:
    """``release`` as a gRPC done callback (called with the call's context)."""
    return lambda _context: release()


def _status_details(text: str) -> str:
    """``text`` cut in the middle to at most :data:`_MAX_DETAILS` bytes: a message naming
    something a client sent (a made-up volume name of 20,000 characters) keeps its start
    and end."""
    raw = text.encode()
    if len(raw) <= _MAX_DETAILS:
        return text
    half = _MAX_DETAILS // 2 - 2
    head = raw[:half].decode(errors="ignore")
    tail = raw[-half:].decode(errors="ignore")
    return f"{head}…{tail}"


class BlockDeviceService(pb_grpc.BlockDeviceServicer):
    """Serves the volumes of ``registry`` over gRPC."""

    def __init__(
        self,
        registry: VolumeRegistry,
        metrics: Metrics,
        *,
        max_io: int,
        server_id: str,
        gate: DrainGate,
        extra_inspect: Callable[[str], dict[str, Any]] | None = None,
        failures: StorageFailureLog | None = None,
    ) -> None:
        self._registry = registry
        self._failures = failures if failures is not None else StorageFailureLog()
        self._metrics = metrics
        self._max_io = max_io
        self._server_id = server_id
        self._gate = gate
        self._extra_inspect = extra_inspect
        self._budgets = ReplyBudgets()  # large Read replies in flight, per connection
        gate.on_drain.append(self._budgets.close)  # (a stalled reader must not hold a stop)
        # The chains of first-hop calls (no tierdisk-hops header), per configured volume.
        self._own_chains = {
            name: hops.check_chain((), hops.hop_id(server_id, name))
            for name in ("", *registry.names())
        }

    # -- plumbing -------------------------------------------------------------------------

    async def _call(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        body: Callable[[], Awaitable[tuple[T, int]]],
        op: str | None = None,
        volume: str = "",
        rpc: str = "",
    ) -> T:
        """Run ``body`` (returning (reply, bytes moved)) with the drain gate, the hop guard,
        I/O metrics and the error mapping; ``rpc`` names the call in the log of storage
        failures (default: ``op``)."""
        start = time.perf_counter()
        code: grpc.StatusCode | None = _OK
        nbytes = 0
        try:
            self._admit(context, volume)
            try:
                reply, nbytes = await body()
            finally:
                self._gate.leave()
            return reply
        except (TierdiskError, OSError) as exc:
            code = None  # counted here, before abort() sends the status the caller sees
            await self._refuse_io(context, exc, volume, op, rpc or str(op), start)
        except asyncio.CancelledError:
            code = _CANCELLED
            raise
        except BaseException:  # a fault of ours: gRPC answers UNKNOWN
            code = _UNKNOWN
            raise
        finally:
            if op is not None and code is not None:
                self._metrics.observe_io(
                    volume, op, _CODE_NAMES[code], nbytes, time.perf_counter() - start
                )

    async def _hold_reply_budget(self, context: Any, nbytes: int) -> None:
        """Take ``nbytes`` of the budget of large replies of the caller's connection, waiting
        while earlier replies fill it (:mod:`.reply_budget`); given back when the call ends."""
        held = await self._budgets.take(context.peer(), nbytes)
        context.add_done_callback(_as_done_callback(held))

    async def _refuse_io(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        exc: TierdiskError | OSError,
        volume: str,
        op: str | None,
        rpc: str,
        start: float,
        requests: int = 1,
    ) -> NoReturn:
        """End a call about ``volume`` that failed with ``exc``: counted as ``requests``
        ``op`` requests (if ``op`` is not None) that took since ``start``
        (``perf_counter``), a storage failure logged under ``rpc``'s name, then the status
        (:meth:`_refuse`)."""
        refusal = status_for(exc)
        if op is not None:
            seconds = time.perf_counter() - start
            self._metrics.observe_io(volume, op, _CODE_NAMES[refusal], 0, seconds, requests)
        self._failures.note(volume, f"gRPC {rpc}", _CODE_NAMES[refusal], exc)
        await self._refuse(context, refusal, exc)
        raise AssertionError("not reached: abort() raises")

    def _admit(self, context: grpc.aio.ServicerContext[Any, Any], volume: str) -> None:
        """Let a call for ``volume`` ("" for none) in: refuse it while draining, then check
        and record the chain of tiers it passed (leaving the gate again if the chain is
        refused)."""
        self._gate.enter()
        try:
            chain: tuple[str, ...] = ()
            waiting: frozenset[str] = _NONE_WAITING
            for key, value in context.invocation_metadata() or ():
                if key == hops.HOPS_HEADER:
                    chain = hops.parse(str(value))
                elif key == hops.WAITING_HEADER:
                    waiting = frozenset(hops.parse(str(value)))
            # Both set on every call, so no call sees another's (whatever task runs it).
            hops.caller_waiting.set(waiting)
            own = None if chain else self._own_chains.get(volume)
            hops.current_chain.set(
                own or hops.check_chain(chain, hops.hop_id(self._server_id, volume))
            )
        except BaseException:
            self._gate.leave()
            raise

    @staticmethod
    async def _refuse(
        context: grpc.aio.ServicerContext[Any, Any],
        code: grpc.StatusCode,
        exc: TierdiskError | OSError,
    ) -> None:
        """End the call with ``code``: a domain error's message and class name (trailer
        ``tierdisk-error``), or a storage failure that no layer turned into one (an
        ``OSError``; logged by the caller, :class:`~.failure_log.StorageFailureLog`).
        ``grpc_server_handled_total`` counts it first (:func:`~.rpc_metrics.count_status_now`):
        the caller may scrape as soon as it sees the status."""
        count_status_now(code)
        try:
            if isinstance(exc, TierdiskError):
                await context.abort(
                    code,
                    _status_details(str(exc)),
                    trailing_metadata=((ERROR_HEADER, type(exc).__name__),),
                )
            await context.abort(code, _status_details(f"storage failure: {exc}"))
        except BaseException as aborted:  # grpc.aio's AbortError (or a cancel), raised on
            forget = _as_done_callback(functools.partial(_forget_frames, aborted))
            # (grpc-stubs types the callback as a class of its own, no plain function fits)
            context.add_done_callback(forget)  # type: ignore[arg-type]
            raise

    @classmethod
    async def _refuse_undecodable(
        cls, context: grpc.aio.ServicerContext[Any, Any], request: Undecodable
    ) -> NoReturn:
        """End a call whose request could not be read: ``INVALID_ARGUMENT``."""
        invalid = InvalidArgument(request.problem)
        await cls._refuse(context, status_for(invalid), invalid)
        raise AssertionError("not reached: abort() raises")

    def _volume(self, name: str, sector_size: int = 0) -> Volume:
        """The volume ``name``, whose sector size must be ``sector_size`` (a request's: the
        size its sectors count in; 0: not checked), else :class:`SectorSizeChanged`."""
        if not name:
            raise InvalidArgument("the request names no volume")
        volume = self._registry.get(name)
        if sector_size and sector_size != volume.sector_size:
            raise SectorSizeChanged(
                f"volume {name!r} has {volume.sector_size}-byte sectors, not the "
                f"{sector_size}-byte ones this request counts in: it was re-created since "
                "they were asked; ask its geometry again (GetVolume)"
            )
        return volume

    def _check_io_size(self, nbytes: int, what: str) -> None:
        if nbytes > self._max_io:
            raise InvalidArgument(
                f"{what} of {nbytes} bytes is larger than this server's max_io limit of "
                f"{self._max_io} bytes; split it into smaller requests"
            )

    def _check_allocation_size(
        self,
        volume: str,
        sector: int,
        count: int,
        extents: int,
        reply: pb.GetAllocationResponse | None,
    ) -> None:
        """Refuse (:class:`AllocationTooLarge`) a ``GetAllocation`` reply of ``extents``
        extents for ``count`` sectors from ``sector`` that would take more than ``max_io``
        bytes: asked with ``reply`` None before the reply is built (refused when even the
        smallest encoding of that many extents is too large), then with the reply (measured
        only when the largest encoding could be too large, so most replies are serialized
        once, by gRPC).

        ``max_io`` bounds every message that carries sectors' worth of data or metadata: it
        sits below the transport's caps (which the server sets above it) and, by default, far
        below the client library's 64 MiB receive cap."""
        limit = self._max_io
        if reply is None:
            size = extents * _EXTENT_MIN_BYTES - 2
        else:
            # field tag and length, sector (below sector + count), sector_count, depth
            most = 2 + 1 + _varint_bytes(sector + count) + 1 + _varint_bytes(count)
            most += _DEPTH_MAX_BYTES
            if extents * most <= limit:
                return
            size = reply.ByteSize()
        if size > limit:
            raise AllocationTooLarge(
                f"volume {volume!r}: the allocation of sectors [{sector}, {sector + count}) "
                f"has {extents} extents, more than one reply carries (at most {limit} bytes, "
                f"this server's max_io); ask for a smaller range"
            )

    # -- RPCs -----------------------------------------------------------------------------

    async def ListVolumes(
        self, request: pb.ListVolumesRequest, context: Any
    ) -> pb.ListVolumesResponse:
        async def body() -> tuple[pb.ListVolumesResponse, int]:
            names = self._registry.names()
            size = request.page_size or _DEFAULT_PAGE
            size = min(size, _MAX_PAGE)
            start = 0
            if request.page_token:
                try:
                    start = int(base64.urlsafe_b64decode(request.page_token.encode()).decode())
                except (ValueError, UnicodeDecodeError):
                    raise InvalidArgument(f"bad page_token {request.page_token!r}") from None
                if not 0 <= start <= len(names):
                    raise InvalidArgument(f"bad page_token {request.page_token!r}")
            page = names[start : start + size]
            volumes = []
            for name in page:
                try:
                    volumes.append(_to_volume_message(self._registry.get(name)))
                except (Unavailable, FailedPrecondition):  # not attached (yet): name only,
                    problem = self._registry.problem(name)  # and why, once given up on
                    volumes.append(pb.Volume(name=name, problem=problem))
            token = ""
            if start + size < len(names):
                token = base64.urlsafe_b64encode(str(start + size).encode()).decode()
            return pb.ListVolumesResponse(volumes=volumes, next_page_token=token), 0

        return await self._call(context, body, rpc="ListVolumes")

    async def GetVolume(self, request: pb.GetVolumeRequest, context: Any) -> pb.Volume:
        async def body() -> tuple[pb.Volume, int]:
            return _to_volume_message(self._volume(request.volume)), 0

        return await self._call(context, body, volume=request.volume, rpc="GetVolume")

    async def Read(self, request: pb.ReadRequest, context: Any) -> pb.ReadResponse:
        """``Read`` as a message; the server registers :meth:`read_encoded` instead."""
        return pb.ReadResponse.FromString(await self.read_encoded(request, context))

    async def read_encoded(self, request: pb.ReadRequest | Undecodable, context: Any) -> bytes:
        """``Read``, with the reply already serialized (what the server sends).

        The steps of :meth:`_call`, written out: Read is the hot path, and this saves a
        closure and a coroutine per call."""
        if isinstance(request, Undecodable):
            await self._refuse_undecodable(context, request)
        start = time.perf_counter()
        code: grpc.StatusCode | None = _OK
        moved = 0
        try:
            self._admit(context, request.volume)
            try:
                volume = self._volume(request.volume, request.sector_size)
                nbytes = request.sector_count * volume.sector_size
                self._check_io_size(nbytes, "a read")
                if nbytes == 0:
                    await volume.read(request.sector, 0)  # checks the range; nothing to send
                    return b""
                if nbytes >= BUDGETED_FROM_BYTES:  # a large reply: bounded per connection
                    await self._hold_reply_budget(context, nbytes)
                reply = ReadReply(nbytes)
                present = await volume.read_into(reply.data, request.sector)
                moved = nbytes
                return reply.encode(present if request.report_presence else None)
            finally:
                self._gate.leave()
        except (TierdiskError, OSError) as exc:
            code = None  # counted here, before abort() sends the status the caller sees
            await self._refuse_io(context, exc, request.volume, "read", "read", start)
        except asyncio.CancelledError:
            code = _CANCELLED
            raise
        except BaseException:  # a fault of ours: gRPC answers UNKNOWN
            code = _UNKNOWN
            raise
        finally:
            if code is not None:
                self._metrics.observe_io(
                    request.volume, "read", _CODE_NAMES[code], moved, time.perf_counter() - start
                )

    async def ReadBatch(self, request: pb.ReadBatchRequest, context: Any) -> pb.ReadBatchResponse:
        """``ReadBatch`` as a message; the server registers :meth:`read_batch_encoded`."""
        return pb.ReadBatchResponse.FromString(await self.read_batch_encoded(request, context))

    async def read_batch_encoded(
        self, request: pb.ReadBatchRequest | Undecodable, context: Any
    ) -> bytes:
        """``ReadBatch``, the reply already serialized (its ``data`` is field 1, as a
        ``ReadResponse``'s): every range read (:meth:`Volume.read_ranges_into`) into the
        bytes gRPC sends; with ``report_presence``, the runs some layer holds, merged over
        all the ranges (field 2, as a ``ReadResponse``'s ``present``).

        In the volume's I/O metrics each range counts as one read request
        (``tierdisk_volume_io_requests_total{op="read"}``: a read-rate panel sees the reads,
        however they came) that took the whole call's time, whatever became of the call (an
        error-ratio panel sees a failed batch as the reads it failed); a batch refused
        before its ranges are known to be at most :data:`MAX_BATCH_RANGES`, or one of no
        range, counts as one read."""
        if isinstance(request, Undecodable):
            await self._refuse_undecodable(context, request)
        start = time.perf_counter()
        code: grpc.StatusCode | None = _OK
        reads = len(request.ranges)
        if not 0 < reads <= MAX_BATCH_RANGES:
            reads = 1
        try:
            self._admit(context, request.volume)
            try:
                volume = self._volume(request.volume, request.sector_size)
                if len(request.ranges) > MAX_BATCH_RANGES:
                    raise InvalidArgument(
                        f"a batch of {len(request.ranges)} reads is more than this server "
                        f"takes in one call ({MAX_BATCH_RANGES}); split it"
                    )
                ranges = [(r.sector, r.sector_count) for r in request.ranges]
                nbytes = sum(count for _, count in ranges) * volume.sector_size
                self._check_io_size(nbytes, "a batch of reads")
                if nbytes >= BUDGETED_FROM_BYTES:  # a large reply: bounded per connection
                    await self._hold_reply_budget(context, nbytes)
                presence = request.report_presence
                reply = ReadReply(nbytes, prefix=PRESENCE_REPORTED if presence else b"")
                held = await volume.read_ranges_into(reply.data, ranges)
                encoded = reply.encode(merge(held) if presence else None)
            finally:
                self._gate.leave()
        except (TierdiskError, OSError) as exc:
            code = None  # counted here, before abort() sends the status the caller sees
            await self._refuse_io(context, exc, request.volume, "read", "ReadBatch", start, reads)
        except asyncio.CancelledError:
            code = _CANCELLED
            raise
        except BaseException:  # a fault of ours: gRPC answers UNKNOWN
            code = _UNKNOWN
            raise
        finally:
            if code is not None and code is not _OK:
                seconds = time.perf_counter() - start
                code_name = _CODE_NAMES[code]
                self._metrics.observe_io(request.volume, "read", code_name, 0, seconds, reads)
        seconds = time.perf_counter() - start
        self._metrics.observe_io(request.volume, "read", "OK", nbytes, seconds, reads)
        return encoded

    async def Write(self, request: pb.WriteRequest, context: Any) -> pb.WriteResponse:
        """``Write`` of a message; the server registers :meth:`write_parsed` instead."""
        return await self.write_parsed(WriteRequestView.of(request), context)

    async def write_parsed(
        self, request: WriteRequestView | Undecodable, context: Any
    ) -> pb.WriteResponse:
        """``Write``, its request read by :func:`~.write_request.parse_write` (what the
        server receives): the data reaches the volume without a copy."""
        if isinstance(request, Undecodable):
            await self._refuse_undecodable(context, request)

        async def body() -> tuple[pb.WriteResponse, int]:
            volume = self._volume(request.volume, request.sector_size)
            data = request.data
            self._check_io_size(len(data), "a write")
            # The verifier as the write starts: a flush failing while it runs renews it,
            # and the write may be among what that failure lost.
            verifier = volume.write_verifier
            await volume.write(
                request.sector, data, fua=request.fua, no_overwrite=request.no_overwrite
            )
            if request.fua and volume.fua_respected and volume.durable_since(verifier):
                return _DURABLE_WRITE_RESPONSE, len(data)
            return pb.WriteResponse(write_verifier=verifier), len(data)

        return await self._call(context, body, "write", request.volume)

    async def Unmap(self, request: pb.UnmapRequest, context: Any) -> pb.UnmapResponse:
        async def body() -> tuple[pb.UnmapResponse, int]:
            volume = self._volume(request.volume, request.sector_size)
            verifier = volume.write_verifier  # as the unmap starts (see write_parsed)
            await volume.unmap(request.sector, request.sector_count, request.block_level_only)
            return pb.UnmapResponse(write_verifier=verifier), 0

        return await self._call(context, body, "unmap", request.volume)

    async def Flush(self, request: pb.FlushRequest, context: Any) -> pb.FlushResponse:
        async def body() -> tuple[pb.FlushResponse, int]:
            volume = self._volume(request.volume)
            await volume.flush()
            reply = pb.FlushResponse(write_verifier=volume.write_verifier, volatile=volume.volatile)
            return reply, 0

        return await self._call(context, body, "flush", request.volume)

    async def GetAllocation(
        self, request: pb.GetAllocationRequest, context: Any
    ) -> pb.GetAllocationResponse:
        """``GetAllocation``: every extent of the range in one reply of at most ``max_io``
        bytes, else :class:`AllocationTooLarge` (see :meth:`_check_allocation_size`)."""

        async def body() -> tuple[pb.GetAllocationResponse, int]:
            volume = self._volume(request.volume, request.sector_size)
            sector, count = request.sector, request.sector_count
            runs = await volume.allocation(sector, count)
            self._check_allocation_size(volume.name, sector, count, len(runs), None)
            reply = pb.GetAllocationResponse()
            add = reply.extents.add  # (4x as fast as messages built, then copied in)
            for done, (a, b, depth) in enumerate(runs, 1):
                add(sector=a, sector_count=b - a, depth=depth)
                if done % _EXTENTS_BETWEEN_YIELDS == 0:
                    await asyncio.sleep(0)  # (a million extents: other calls run meanwhile)
            self._check_allocation_size(volume.name, sector, count, len(runs), reply)
            return reply, 0

        return await self._call(context, body, volume=request.volume, rpc="GetAllocation")

    async def Inspect(self, request: pb.InspectRequest, context: Any) -> pb.InspectResponse:
        async def body() -> tuple[pb.InspectResponse, int]:
            volume = self._volume(request.volume)
            tree = volume.inspect()
            if self._extra_inspect is not None:
                tree.update(self._extra_inspect(volume.name))
            node = select_path(tree, request.path)
            reply = pb.InspectResponse()
            reply.tree.update(node if isinstance(node, dict) else {"value": node})
            return reply, 0

        return await self._call(context, body, volume=request.volume, rpc="Inspect")

    async def Resize(self, request: pb.ResizeRequest, context: Any) -> pb.Volume:
        async def body() -> tuple[pb.Volume, int]:
            volume = self._volume(request.volume, request.sector_size)
            await volume.resize(request.sector_count)
            return _to_volume_message(volume), 0

        return await self._call(context, body, volume=request.volume, rpc="Resize")

    async def WatchResize(
        self, request: pb.WatchResizeRequest, context: Any
    ) -> AsyncIterator[pb.ResizeEvent]:
        async def first() -> tuple[tuple[Volume, pb.ResizeEvent], int]:
            volume = self._volume(request.volume)
            event = pb.ResizeEvent(sector_count=volume.sector_count, generation=volume.generation)
            return (volume, event), 0

        volume, event = await self._call(context, first, volume=request.volume, rpc="WatchResize")
        yield event
        seen = event.generation
        drained = asyncio.ensure_future(self._gate.drained.wait())
        changes: asyncio.Future[list[SizeEvent]] | None = None
        try:
            while True:
                changes = asyncio.ensure_future(volume.resize_events(seen))
                done, _ = await asyncio.wait(
                    {changes, drained}, return_when=asyncio.FIRST_COMPLETED
                )
                if changes not in done:  # a graceful stop: the watcher must know to watch again
                    stopping = Unavailable(f"{SHUTTING_DOWN}; watch again")
                    await self._refuse(context, status_for(stopping), stopping)
                for generation, count in changes.result():
                    yield pb.ResizeEvent(sector_count=count, generation=generation)
                    seen = generation
        finally:  # also when the watcher goes away: no task left waiting for a resize
            drained.cancel()
            if changes is not None:
                changes.cancel()


class HandlerRegistry(Protocol):
    """Where handlers are registered: a ``grpc.aio.Server``, or a wrapper of one."""

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None: ...

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None: ...


def _refusing_undecodable(
    behavior: Callable[[Any, Any], Awaitable[Any]],
) -> Callable[[Any, Any], Awaitable[Any]]:
    """``behavior`` (a unary handler), answering an :class:`Undecodable` request
    ``INVALID_ARGUMENT`` instead."""

    async def handler(request: Any, context: Any) -> Any:
        if isinstance(request, Undecodable):
            await BlockDeviceService._refuse_undecodable(context, request)
        return await behavior(request, context)

    return handler


def _refusing_undecodable_stream(
    behavior: Callable[[Any, Any], AsyncIterator[Any]],
) -> Callable[[Any, Any], AsyncIterator[Any]]:
    """The same for a server-streaming handler (an async generator)."""

    async def handler(request: Any, context: Any) -> AsyncIterator[Any]:
        if isinstance(request, Undecodable):
            await BlockDeviceService._refuse_undecodable(context, request)
        async for message in behavior(request, context):
            yield message

    return handler


def add_to_server(service: BlockDeviceService, server: HandlerRegistry) -> None:
    """Register ``service`` on ``server``, like the generated
    ``add_BlockDeviceServicer_to_server``, except that ``Read`` is served by
    :meth:`BlockDeviceService.read_encoded`, whose reply is already in wire format and is
    sent without a serializer (one copy of the data instead of four), and ``Write`` by
    :meth:`BlockDeviceService.write_parsed`, whose request is read without copying its data
    (:func:`~.write_request.parse_write`). Request bytes that are not the method's message
    are answered ``INVALID_ARGUMENT`` (:class:`Undecodable`), not gRPC's ``UNKNOWN``."""
    descriptor = pb.DESCRIPTOR.services_by_name["BlockDevice"]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in descriptor.methods:
        request = getattr(pb, method.input_type.name)
        reply = getattr(pb, method.output_type.name)
        if method.name == "Read":  # checks for Undecodable itself: no wrapper on the hot path
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                service.read_encoded,
                request_deserializer=_decoder(method.input_type.name, request.FromString),
            )
        elif method.name == "ReadBatch":  # checks for Undecodable itself, as Read does
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                service.read_batch_encoded,
                request_deserializer=_decoder(method.input_type.name, _parse_read_batch),
            )
        elif method.name == "Write":  # checks for Undecodable itself, as Read does
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                service.write_parsed,
                request_deserializer=_decoder(method.input_type.name, parse_write),
                response_serializer=reply.SerializeToString,
            )
        elif method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _refusing_undecodable_stream(getattr(service, method.name)),
                request_deserializer=_decoder(method.input_type.name, request.FromString),
                response_serializer=reply.SerializeToString,
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _refusing_undecodable(getattr(service, method.name)),
                request_deserializer=_decoder(method.input_type.name, request.FromString),
                response_serializer=reply.SerializeToString,
            )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(descriptor.full_name, handlers),)
    )
    server.add_registered_method_handlers(descriptor.full_name, handlers)
