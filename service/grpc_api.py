"""The ``BlockDevice`` servicer: gRPC requests in, engine calls, gRPC replies out.

Each call passes the drain gate (:class:`~.drain.DrainGate`) and the hop guard
(:mod:`~.hops`), is counted in the volume's I/O metrics (requests, bytes, seconds), and, if
it fails, ends with the status of its exception (:mod:`~.grpc_refusal`, by the one table of
DESIGN.md §2). :func:`~.grpc_handlers.add_to_server` registers the servicer on a server;
``Read``, ``ReadBatch`` and ``Write`` are served in wire format there
(:meth:`BlockDeviceService.read_encoded`, :meth:`BlockDeviceService.read_batch_encoded`,
:meth:`BlockDeviceService.write_parsed`).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from tierdisk.client.chunking import MAX_BATCH_RANGES
from tierdisk.v1 import blockdevice_pb2 as pb
from tierdisk.v1 import blockdevice_pb2_grpc as pb_grpc

from . import hops
from .allocation_reply import allocation_reply
from .drain import DrainGate
from .errors import (
    SHUTTING_DOWN,
    FailedPrecondition,
    InvalidArgument,
    SectorSizeChanged,
    TierdiskError,
    Unavailable,
)
from .failure_log import StorageFailureLog
from .grpc_refusal import as_done_callback, refuse, refuse_undecodable, status_for
from .metrics import Metrics
from .read_reply import PRESENCE_REPORTED, ReadReply
from .registry import VolumeRegistry
from .reply_budget import BUDGETED_FROM_BYTES, ReplyBudgets
from .request_decoding import Undecodable
from .runs import merge
from .size_history import SizeEvent
from .volume import Volume
from .write_request import WriteRequestView

__all__ = ["BlockDeviceService"]

log = logging.getLogger(__name__)

_OK = grpc.StatusCode.OK
_CANCELLED = grpc.StatusCode.CANCELLED  # the caller went away (its deadline, a cancel)
_UNKNOWN = grpc.StatusCode.UNKNOWN
_CODE_NAMES = {code: code.name for code in grpc.StatusCode}  # Enum.name is slow per call
_DURABLE_WRITE_RESPONSE = pb.WriteResponse()  # no verifier: durable for good (durable_since)
_DEFAULT_PAGE = 100
"""Volumes per ``ListVolumes`` reply when the request's ``page_size`` is 0."""
_MAX_PAGE = 1000
"""The most volumes one ``ListVolumes`` reply carries, whatever ``page_size`` asks."""

T = TypeVar("T")


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
        requests: int = 1,
    ) -> T:
        """Run ``body`` (returning (reply, bytes moved)) with the drain gate, the hop guard,
        I/O metrics (as ``requests`` ``op`` requests) and the error mapping; ``rpc`` names
        the call in the log of storage failures (default: ``op``)."""
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
            await self._refuse_io(context, exc, volume, op, rpc or str(op), start, requests)
        except asyncio.CancelledError:
            code = _CANCELLED
            raise
        except BaseException:  # a fault of ours: gRPC answers UNKNOWN
            code = _UNKNOWN
            raise
        finally:
            if op is not None and code is not None:
                self._metrics.observe_io(
                    volume, op, _CODE_NAMES[code], nbytes, time.perf_counter() - start, requests
                )

    async def _hold_reply_budget(self, context: Any, nbytes: int) -> None:
        """Take ``nbytes`` of the budget of large replies of the caller's connection, waiting
        while earlier replies fill it (:mod:`.reply_budget`); given back when the call ends."""
        held = await self._budgets.take(context.peer(), nbytes)
        context.add_done_callback(as_done_callback(held))

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
        (:func:`~.grpc_refusal.refuse`)."""
        refusal = status_for(exc)
        if op is not None:
            seconds = time.perf_counter() - start
            self._metrics.observe_io(volume, op, _CODE_NAMES[refusal], 0, seconds, requests)
        self._failures.note(volume, f"gRPC {rpc}", _CODE_NAMES[refusal], exc)
        await refuse(context, refusal, exc)
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
            await refuse_undecodable(context, request)
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
            await refuse_undecodable(context, request)
        reads = len(request.ranges)
        if not 0 < reads <= MAX_BATCH_RANGES:
            reads = 1

        async def body() -> tuple[bytes, int]:
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
            return reply.encode(merge(held) if presence else None), nbytes

        return await self._call(context, body, "read", request.volume, "ReadBatch", reads)

    async def Write(self, request: pb.WriteRequest, context: Any) -> pb.WriteResponse:
        """``Write`` of a message; the server registers :meth:`write_parsed` instead."""
        return await self.write_parsed(WriteRequestView.of(request), context)

    async def write_parsed(
        self, request: WriteRequestView | Undecodable, context: Any
    ) -> pb.WriteResponse:
        """``Write``, its request read by :func:`~.write_request.parse_write` (what the
        server receives): the data reaches the volume without a copy."""
        if isinstance(request, Undecodable):
            await refuse_undecodable(context, request)

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
        bytes, else :class:`AllocationTooLarge` (:func:`~.allocation_reply.allocation_reply`)."""

        async def body() -> tuple[pb.GetAllocationResponse, int]:
            volume = self._volume(request.volume, request.sector_size)
            sector, count = request.sector, request.sector_count
            runs = await volume.allocation(sector, count)
            return await allocation_reply(volume.name, sector, count, runs, self._max_io), 0

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
                    await refuse(context, status_for(stopping), stopping)
                for generation, count in changes.result():
                    yield pb.ResizeEvent(sector_count=count, generation=generation)
                    seen = generation
        finally:  # also when the watcher goes away: no task left waiting for a resize
            drained.cancel()
            if changes is not None:
                changes.cancel()
