"""tierdisk.client.aio (client/aio.py), and the blocking client (client/sync.py) built on it,
against a small scripted BlockDevice servicer on 127.0.0.1 port 0: request sizes, requests
in flight, metadata, pagination, retries, error mapping, and the checks made before any
call."""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import enum
import gc
import re
import socket
import typing
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from fractions import Fraction
from typing import Any, NoReturn

import grpc
import grpc.aio
import pytest

from tierdisk.client.aio import AsyncClient
from tierdisk.client.errors import ERROR_METADATA_KEY as ERROR
from tierdisk.client.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    NoSpace,
    ReadOnlyVolume,
    StorageError,
    Unavailable,
    VolumeNotFound,
    changed_nothing,
)
from tierdisk.client.models import Extent, ReadResult
from tierdisk.client.sync import Client
from tierdisk.v1 import blockdevice_pb2 as pb
from tierdisk.v1 import blockdevice_pb2_grpc as pb_grpc

S = grpc.StatusCode


class Scripted(pb_grpc.BlockDeviceServicer):
    """A tiny in-memory BlockDevice that records what the client sends."""

    def __init__(self, sector_size: int = 512, sectors: int = 4096) -> None:
        self.sector_size = sector_size
        self.disk = bytearray(sector_size * sectors)
        self.present: set[int] = set()
        self.requests: list[tuple[str, int, int]] = []  # (rpc, sector, sectors)
        self.metadata: list[dict[str, str]] = []
        self.active = self.peak = 0
        self.fail_next: list[tuple[grpc.StatusCode, str | None]] = []
        self.fail_write: tuple[int, grpc.StatusCode, str] | None = None  # (index, code, class)
        self.writes = 0
        self.volumes = [f"v{i}" for i in range(5)]

    async def _enter(self, context: Any, rpc: str, sector: int = 0, count: int = 0) -> None:
        self.requests.append((rpc, sector, count))
        self.metadata.append({k: str(v) for k, v in context.invocation_metadata() or ()})
        if self.fail_next:
            code, name = self.fail_next.pop(0)
            trailing = (("tierdisk-error", name),) if name else ()
            await context.abort(code, f"scripted {code.name}", trailing_metadata=trailing)

    def _volume(self, name: str) -> pb.Volume:
        return pb.Volume(
            name=name,
            sector_size=self.sector_size,
            sector_count=len(self.disk) // self.sector_size,
            unmap_behavior=pb.UNMAP_BEHAVIOR_ZEROES,
        )

    async def ListVolumes(self, request: Any, context: Any) -> pb.ListVolumesResponse:
        await self._enter(context, "ListVolumes")
        start = int(request.page_token or 0)
        page = self.volumes[start : start + 2]
        token = str(start + 2) if start + 2 < len(self.volumes) else ""
        return pb.ListVolumesResponse(
            volumes=[self._volume(n) for n in page], next_page_token=token
        )

    async def GetVolume(self, request: Any, context: Any) -> pb.Volume:
        await self._enter(context, "GetVolume")
        return self._volume(request.volume)

    async def Read(self, request: Any, context: Any) -> pb.ReadResponse:
        await self._enter(context, "Read", request.sector, request.sector_count)
        self.active += 1
        self.peak = max(self.peak, self.active)
        await asyncio.sleep(0.005)
        self.active -= 1
        ss = self.sector_size
        start, end = request.sector * ss, (request.sector + request.sector_count) * ss
        reply = pb.ReadResponse(data=bytes(self.disk[start:end]))
        if request.report_presence:
            for s in range(request.sector, request.sector + request.sector_count):
                if s in self.present:
                    reply.present.add(sector=s, sector_count=1)
        return reply

    async def ReadBatch(self, request: Any, context: Any) -> pb.ReadBatchResponse:
        await self._enter(context, "ReadBatch", len(request.ranges))
        ss = self.sector_size
        data = b"".join(
            self.disk[r.sector * ss : (r.sector + r.sector_count) * ss] for r in request.ranges
        )
        return pb.ReadBatchResponse(data=data)

    async def Write(self, request: Any, context: Any) -> pb.WriteResponse:
        count = len(request.data) // self.sector_size
        await self._enter(context, "Write", request.sector, count)
        index, self.writes = self.writes, self.writes + 1
        if self.fail_write is not None and self.fail_write[0] == index:
            _, code, name = self.fail_write
            await context.abort(code, f"scripted {code.name}", trailing_metadata=((ERROR, name),))
        self.active += 1
        self.peak = max(self.peak, self.active)
        await asyncio.sleep(0.005)
        self.active -= 1
        start = request.sector * self.sector_size
        self.disk[start : start + len(request.data)] = request.data
        self.present.update(range(request.sector, request.sector + count))
        return pb.WriteResponse()

    async def Inspect(self, request: Any, context: Any) -> pb.InspectResponse:
        await self._enter(context, "Inspect")
        reply = pb.InspectResponse()
        reply.tree.update({"sector_count": 4096, "ratio": 0.5, "layers": [{"index": 0}]})
        return reply

    async def WatchResize(self, request: Any, context: Any) -> AsyncIterator[pb.ResizeEvent]:
        await self._enter(context, "WatchResize")
        for g in range(3):
            yield pb.ResizeEvent(sector_count=100 + g, generation=g)

    # Not scripted: these answer as the generated base class does (UNIMPLEMENTED), but
    # spelled out, since the servicer stub declares every RPC abstract.
    @staticmethod
    def _unscripted(context: Any) -> NoReturn:
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        context.set_details("Method not implemented!")
        raise NotImplementedError("Method not implemented!")

    async def Unmap(self, request: Any, context: Any) -> pb.UnmapResponse:
        self._unscripted(context)

    async def Flush(self, request: Any, context: Any) -> pb.FlushResponse:
        self._unscripted(context)

    async def GetAllocation(self, request: Any, context: Any) -> pb.GetAllocationResponse:
        self._unscripted(context)

    async def Resize(self, request: Any, context: Any) -> pb.Volume:
        self._unscripted(context)


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[Scripted, str]]:
    servicer = Scripted()
    server = grpc.aio.server()
    pb_grpc.add_BlockDeviceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def pattern(n: int) -> bytes:
    return bytes((i * 31 + i // 512) & 0xFF for i in range(n))


async def test_large_io_is_split_into_max_io_chunks_with_four_in_flight(
    scripted: tuple[Scripted, str],
) -> None:
    servicer, target = scripted
    async with AsyncClient(target, max_io=8 * 512) as client:
        vol = client.volume("v")
        data = pattern(100 * 512)
        await vol.write(3, data)
        writes = [r for r in servicer.requests if r[0] == "Write"]
        assert sorted(writes) == sorted(
            ("Write", 3 + 8 * i, min(8, 100 - 8 * i)) for i in range(13)
        )
        assert servicer.peak == 4
        servicer.peak = 0
        got = await vol.read(3, 100)
        assert got == data and isinstance(got, bytes)
        assert servicer.peak == 4
        assert all(r[2] <= 8 for r in servicer.requests if r[0] == "Read")
        # one GetVolume for the sector size (cached afterwards), and one per split request
        # to check its range against the volume's size before any chunk is sent
        assert [r[0] for r in servicer.requests].count("GetVolume") == 3


async def test_read_with_presence_merges_runs_across_chunks(
    scripted: tuple[Scripted, str],
) -> None:
    _servicer, target = scripted
    async with AsyncClient(target, max_io=4 * 512) as client:
        vol = client.volume("v")
        await vol.write(2, pattern(10 * 512))  # sectors 2..12, split 4/4/2
        result = await vol.read(0, 20, report_presence=True)
        assert isinstance(result, ReadResult)
        assert result.present == (Extent(2, 10),)
        assert result.data[2 * 512 : 12 * 512] == pattern(10 * 512)
        small = await vol.read(0, 3, report_presence=True)
        assert small.present == (Extent(2, 1),)


async def test_read_into_and_stream_read(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    async with AsyncClient(target, max_io=4 * 512) as client:
        vol = client.volume("v")
        data = pattern(30 * 512)
        await vol.write(0, data)
        buf = bytearray(30 * 512)
        asked = [r[0] for r in servicer.requests].count("GetVolume")
        await vol.read_into(0, buf)
        assert buf == data
        present = await vol.read_present_into(0, buf)
        assert buf == data and present == [Extent(0, 30)]
        # into a caller's buffer, a split read asks nothing before its chunks
        assert [r[0] for r in servicer.requests].count("GetVolume") == asked
        chunks = [c async for c in vol.stream_read(0, 30)]
        assert [s for s, _ in chunks] == list(range(0, 30, 4))
        assert b"".join(d for _, d in chunks) == data


async def test_byte_helpers_require_alignment(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    async with AsyncClient(target) as client:
        vol = client.volume("v")
        await vol.write_bytes(1024, b"\x07" * 1024)
        assert await vol.read_bytes(1024, 1024) == b"\x07" * 1024
        before = len(servicer.requests)
        for call in (
            vol.read_bytes(100, 512),
            vol.read_bytes(512, 100),
            vol.write_bytes(1, b"\0" * 512),
            vol.write(0, b"\0" * 100),
        ):
            with pytest.raises(InvalidArgument) as info:
                await call
            assert info.value.volume == "v"
        assert len(servicer.requests) == before  # refused without a call


async def test_metadata_token_and_pagination(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    async with AsyncClient(target, metadata=[("tierdisk-hops", "a,b")], token="s3cret") as c:
        names = [v.name for v in await c.list_volumes()]
    assert names == servicer.volumes
    assert [r[0] for r in servicer.requests] == ["ListVolumes"] * 3
    for md in servicer.metadata:
        assert md["tierdisk-hops"] == "a,b"
        assert md["authorization"] == "Bearer s3cret"


async def test_server_errors_map_through_trailing_metadata(
    scripted: tuple[Scripted, str],
) -> None:
    servicer, target = scripted
    async with AsyncClient(target, retries=0) as client:
        vol = client.volume("v")
        await vol.sector_size()
        servicer.fail_next = [(S.FAILED_PRECONDITION, "ReadOnlyError")]
        with pytest.raises(ReadOnlyVolume) as info:
            await vol.write(0, b"\0" * 512)
        assert info.value.volume == "v" and "FAILED_PRECONDITION" in info.value.message
        servicer.fail_next = [(S.NOT_FOUND, None)]
        with pytest.raises(VolumeNotFound):
            await vol.info()


async def test_unavailable_is_retried_then_raised(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    async with AsyncClient(target, retries=2, backoff=0.001) as client:
        vol = client.volume("v")
        servicer.fail_next = [(S.UNAVAILABLE, None)] * 2
        await vol.info()
        assert [r[0] for r in servicer.requests] == ["GetVolume"] * 3
        servicer.fail_next = [(S.UNAVAILABLE, None)] * 3
        with pytest.raises(Unavailable):
            await vol.info()


async def test_cancelled_from_the_server_is_retried_then_raised(
    scripted: tuple[Scripted, str],
) -> None:
    servicer, target = scripted
    async with AsyncClient(target, retries=2, backoff=0.001) as client:
        vol = client.volume("v")
        await vol.write(8, pattern(2 * 512))
        servicer.fail_next = [(S.CANCELLED, None)] * 2
        assert await vol.read(8, 2) == pattern(2 * 512)
        assert [r[0] for r in servicer.requests[-3:]] == ["Read"] * 3
        servicer.fail_next = [(S.CANCELLED, None)]
        await vol.write(10, pattern(512))
        assert [r[0] for r in servicer.requests[-2:]] == ["Write"] * 2
    async with AsyncClient(target, retries=0) as client:
        vol = client.volume("v")
        await vol.sector_size()
        servicer.fail_next = [(S.CANCELLED, None)]
        with pytest.raises(Cancelled) as info:
            await vol.read(8, 2)
        assert info.value.code == S.CANCELLED and info.value.volume == "v"


BAD_NUMBERS: list[tuple[str, Any, str]] = [
    ("read", (-1, 1), "sector"),
    ("read", (0, -1), "count"),
    ("read", (2**64, 1), "sector"),
    ("read", (0, 2**64), "count"),
    ("read_into", (2**64, bytearray(512)), "sector"),
    ("stream_read", (0, 2**64), "count"),
    ("write", (-1, b"\0" * 512), "sector"),
    ("write", (2**64, b"\0" * 512), "sector"),
    ("unmap", (2**64, 1), "sector"),
    ("unmap", (0, 2**64), "count"),
    ("resize", (2**64,), "sector_count"),
    ("resize", (-5,), "sector_count"),
    ("allocation", (2**64, 1), "sector"),
    ("allocation", (0, -1), "count"),
    ("read_bytes", (-512, 512), "offset"),
    ("write_bytes", (2**80, b"\0" * 512), "offset"),
]


async def _call_volume(vol: Any, method: str, args: tuple[Any, ...]) -> None:
    if method == "stream_read":
        async for _ in vol.stream_read(*args):
            pass
    else:
        await getattr(vol, method)(*args)


@pytest.mark.parametrize(("method", "args", "name"), BAD_NUMBERS)
async def test_numbers_no_request_can_carry_are_invalid_arguments(
    scripted: tuple[Scripted, str], method: str, args: tuple[Any, ...], name: str
) -> None:
    servicer, target = scripted
    async with AsyncClient(target, retries=0) as client:
        vol = client.volume("v")
        await vol.sector_size()
        before = len(servicer.requests)
        with pytest.raises(InvalidArgument, match=rf"\b{name}\b") as info:
            await _call_volume(vol, method, args)
        assert info.value.volume == "v"
        assert len(servicer.requests) == before  # refused without a call


@pytest.mark.parametrize(
    ("method", "args", "name"),
    [
        ("read", ("0", 1), "sector"),
        ("read", (0, 1.0), "count"),
        ("write", (True, b"\0" * 512), "sector"),
        ("unmap", (0, None), "count"),
        ("resize", (False,), "sector_count"),
        ("allocation", (b"0", 1), "sector"),
        ("read_bytes", (0, "512"), "length"),
    ],
)
async def test_numbers_of_the_wrong_type_are_type_errors(
    scripted: tuple[Scripted, str], method: str, args: tuple[Any, ...], name: str
) -> None:
    servicer, target = scripted
    async with AsyncClient(target, retries=0) as client:
        vol = client.volume("v")
        await vol.sector_size()
        before = len(servicer.requests)
        with pytest.raises(TypeError, match=rf"\b{name}\b must be an int"):
            await _call_volume(vol, method, args)
        assert len(servicer.requests) == before


@pytest.mark.parametrize("page_size", [-1, 2**32, 2**40])
async def test_list_volumes_page_size_out_of_range(
    scripted: tuple[Scripted, str], page_size: int
) -> None:
    servicer, target = scripted
    async with AsyncClient(target, retries=0) as client:
        with pytest.raises(InvalidArgument, match="page_size"):
            await client.list_volumes(page_size=page_size)
        with pytest.raises(TypeError, match="page_size must be an int"):
            await client.list_volumes(page_size=True)
    assert servicer.requests == []


async def test_a_closed_async_client_says_so(scripted: tuple[Scripted, str]) -> None:
    _, target = scripted
    client = AsyncClient(target)
    vol = client.volume("v")
    await vol.info()
    await client.close()
    for call in (vol.info, lambda: vol.read(0, 1), client.list_volumes):
        with pytest.raises(RuntimeError, match="the client is closed"):
            await call()
    with pytest.raises(RuntimeError, match="the client is closed"):
        await anext(vol.watch_resize())
    await client.close()  # idempotent


async def test_a_failed_chunk_fails_the_whole_write_and_says_what_had_landed(
    scripted: tuple[Scripted, str],
) -> None:
    """The third of 16 chunks is refused out of space: the write raises that NoSpace, saying
    how much had been written, and it does not claim the call changed nothing (a NoSpace of
    one request does: DESIGN §2)."""
    servicer, target = scripted
    data = pattern(16 * 512)
    async with AsyncClient(target, retries=0, max_io=512, max_in_flight=1) as client:
        vol = client.volume("v")
        servicer.fail_write = (2, S.RESOURCE_EXHAUSTED, "NoSpace")
        with pytest.raises(NoSpace, match=r"; 1024 of 8192 bytes had been written") as split:
            await vol.write(0, data)
        assert split.value.partial and not changed_nothing(split.value)
        assert servicer.disk[:1024] == data[:1024] and not any(servicer.disk[1024:8192])
        assert split.value.code == S.RESOURCE_EXHAUSTED and split.value.volume == "v"

        servicer.fail_write = (servicer.writes, S.RESOURCE_EXHAUSTED, "NoSpace")
        with pytest.raises(NoSpace) as single:
            await vol.write(100, data[:512])
        assert not single.value.partial and changed_nothing(single.value)


async def test_inspect_turns_whole_numbers_back_into_ints(
    scripted: tuple[Scripted, str],
) -> None:
    _, target = scripted
    async with AsyncClient(target) as client:
        tree = await client.volume("v").inspect()
    assert tree == {"sector_count": 4096, "ratio": 0.5, "layers": [{"index": 0}]}
    assert isinstance(tree["sector_count"], int)


async def test_watch_resize_yields_events(scripted: tuple[Scripted, str]) -> None:
    _, target = scripted
    async with AsyncClient(target) as client:
        events = [e async for e in client.volume("v").watch_resize()]
    assert [(e.sector_count, e.generation) for e in events] == [(100, 0), (101, 1), (102, 2)]


async def test_blocking_client_has_the_same_methods(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted

    def use() -> tuple[bytes, list[str], list[int]]:
        with Client(target, max_io=4 * 512) as client:
            vol = client.volume("v")
            vol.write(1, pattern(10 * 512))
            data = vol.read(1, 10)
            names = [v.name for v in client.list_volumes()]
            gens = [e.generation for e in vol.watch_resize()]
            with pytest.raises(InvalidArgument):
                vol.read_bytes(3, 512)
        with pytest.raises(RuntimeError):
            client.list_volumes()
        return data, names, gens

    data, names, gens = await asyncio.to_thread(use)  # the servicer runs on this loop
    assert data == pattern(10 * 512)
    assert names == servicer.volumes
    assert gens == [0, 1, 2]


def test_blocking_and_async_volumes_expose_the_same_public_methods() -> None:
    from tierdisk.client import AsyncVolume, Volume

    def public(cls: type) -> set[str]:
        return {n for n in vars(cls) if not n.startswith("_")}

    assert public(AsyncVolume) <= public(Volume) | {"client"}
    assert {"list_volumes", "volume", "close"} <= public(Client)


def test_blocking_client_stops_its_thread_on_close() -> None:
    import threading

    before = {t.name for t in threading.enumerate()}
    client = Client("127.0.0.1:1", timeout=1)
    client.close()
    client.close()  # idempotent
    assert {t.name for t in threading.enumerate()} <= before


@pytest.mark.parametrize("token", ["", "  ", "secret\r"])
async def test_a_token_that_cannot_be_sent_is_refused_at_construction(token: str) -> None:
    """An empty token would send no credential; a control character fails every call:
    either is a ValueError when the client is made, naming the problem, never the token."""
    with pytest.raises(ValueError, match=r"^token (is empty|contains)") as info:
        AsyncClient("127.0.0.1:1", token=token)
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    "metadata",
    [[("x", "line\nbreak")], [("a key", "v")], [("x-bin", "not bytes")], [("grpc-x", "v")]],
)
async def test_metadata_that_cannot_be_sent_is_refused_at_construction(
    metadata: list[tuple[str, str]],
) -> None:
    """A pair gRPC cannot send failed every call with its internal error: a ValueError
    naming the key when the client is made (and at the call, from a metadata factory)."""
    with pytest.raises(ValueError, match=r"^metadata key "):
        AsyncClient("127.0.0.1:1", metadata=metadata)


async def test_a_bad_pair_from_the_metadata_factory_fails_the_call(
    scripted: tuple[Scripted, str],
) -> None:
    _, target = scripted
    async with AsyncClient(target, metadata_factory=lambda: [("x", "a\tb")]) as client:
        with pytest.raises(ValueError, match=r"^metadata_factory: metadata key 'x'"):
            await client.volume("v").info()


@pytest.mark.parametrize("seconds", [float("inf"), 1e10])
async def test_a_timeout_past_a_year_or_infinite_is_no_deadline(
    scripted: tuple[Scripted, str], seconds: float
) -> None:
    """gRPC made such deadlines (and infinity) ones already passed: every call failed at
    once with DEADLINE_EXCEEDED. Given to the client or to a call, they mean none."""
    _, target = scripted
    async with AsyncClient(target, timeout=seconds) as client:
        vol = client.volume("v")
        assert (await vol.info()).sector_size == 512
        assert await vol.read(0, 1, timeout=seconds) == bytes(512)
        assert [e.generation async for e in vol.watch_resize(timeout=seconds)] == [0, 1, 2]


async def test_a_timeout_that_is_not_a_number_of_seconds_is_refused(
    scripted: tuple[Scripted, str],
) -> None:
    _, target = scripted
    for bad in (float("nan"), 0.0, -1.0):
        with pytest.raises(ValueError, match="timeout must be positive or None"):
            AsyncClient(target, timeout=bad)
    async with AsyncClient(target) as client:
        with pytest.raises(ValueError, match="timeout must be positive or None"):
            await client.volume("v").read(0, 1, timeout=float("nan"))
        with pytest.raises(TypeError, match=r"^timeout must be seconds \(a number\) or None"):
            await client.volume("v").read(0, 1, timeout="5")  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [("timeout", "5", "timeout must be seconds (a number) or None, not str"),
     ("timeout", True, "timeout must be seconds (a number) or None, not bool"),
     ("retries", 2.5, "retries must be an int, not float"),
     ("backoff", "1", "backoff must be seconds (a number), not str"),
     ("max_io", 1.5, "max_io must be an int, not float"),
     ("max_in_flight", "4", "max_in_flight must be an int, not str")],
)  # fmt: skip
async def test_client_options_of_the_wrong_type_are_a_type_error_naming_them(
    option: str, value: object, words: str
) -> None:
    """Not a comparison's TypeError that names no option, nor (``retries=2.5``) accepted."""
    given: dict[str, Any] = {option: value}
    with pytest.raises(TypeError) as info:
        AsyncClient("127.0.0.1:1", **given)
    assert str(info.value) == words


async def test_client_options_may_be_any_real_or_whole_number(
    scripted: tuple[Scripted, str],
) -> None:
    """Not only int and float: a Fraction of a second, an IntEnum (or numpy's numbers, which
    register as such); a Decimal is no real number to Python, so it is refused."""
    _, target = scripted

    class Depth(enum.IntEnum):
        FOUR = 4

    # (typed float, as most callers pass; any real number is taken)
    real: dict[str, Any] = {"timeout": Fraction(5, 2), "backoff": Fraction(1, 10)}
    async with AsyncClient(
        target, retries=Depth.FOUR, max_io=Depth.FOUR * 1024, max_in_flight=Depth.FOUR, **real
    ) as client:
        one_second: Any = Fraction(1)
        assert await client.volume("v").read(0, 1, timeout=one_second) == bytes(512)
    with pytest.raises(TypeError, match=r"^timeout must be seconds"):
        AsyncClient(target, timeout=Decimal(1))  # type: ignore[arg-type]


async def test_a_silent_server_s_timeout_names_the_server_and_the_seconds() -> None:
    """A server that accepts and never answers: the DeadlineExceeded says which server and
    how long (gRPC's own words are only "Deadline Exceeded")."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        async with AsyncClient(target, timeout=0.3) as client:
            vol = client.volume("v")
            with pytest.raises(DeadlineExceeded) as call:
                await vol.info()
            with pytest.raises(DeadlineExceeded) as watch:
                await anext(vol.watch_resize(timeout=0.3))
    assert str(call.value).endswith(
        f"the GetVolume call to {target} did not complete within its timeout of 0.3 s"
        " (retries included)"
    )
    assert f"the WatchResize stream to {target} did not complete" in str(watch.value)


async def test_a_sector_size_of_zero_is_a_storage_error_naming_the_server() -> None:
    """A broken server's GetVolume answering sector_size 0: a StorageError, not the
    ValueError of a division by it deep in the chunking."""

    class ZeroSectors(Scripted):
        def _volume(self, name: str) -> pb.Volume:
            return pb.Volume(name=name, sector_size=0, sector_count=8)

    servicer = ZeroSectors()
    server = grpc.aio.server()
    pb_grpc.add_BlockDeviceServicer_to_server(servicer, server)
    target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    try:
        async with AsyncClient(target) as client:
            with pytest.raises(StorageError, match=f"^the server at {target} answered a sector"):
                await client.volume("v").read(0, 1)
    finally:
        await server.stop(0)


async def test_a_read_only_buffer_is_refused_before_any_call(
    scripted: tuple[Scripted, str],
) -> None:
    servicer, target = scripted
    async with AsyncClient(target) as client:
        vol = client.volume("v")
        await vol.sector_size()
        for buffer in (bytes(512), memoryview(bytes(1024))):
            with pytest.raises(TypeError, match=r"^the buffer to read into is read-only"):
                await vol.read_into(0, buffer)  # type: ignore[arg-type]
    assert "Read" not in [r[0] for r in servicer.requests]


async def test_the_blocking_client_tells_whether_it_is_closed_and_its_connection_state(
    scripted: tuple[Scripted, str],
) -> None:
    """``closed``, ``connectivity()`` and ``unflushed_writes()``, as on the async client."""
    _, target = scripted

    def use() -> None:  # on a thread: the scripted server runs on this test's loop
        client = Client(target)
        assert not client.closed
        assert client.connectivity() == grpc.ChannelConnectivity.IDLE
        client.volume("v").info()
        assert client.connectivity() == grpc.ChannelConnectivity.READY
        assert client.unflushed_writes("v") is client.aio.unflushed_writes("v")
        client.close()
        assert client.closed

    await asyncio.to_thread(use)


async def test_a_watch_gives_up_within_its_timeout_not_per_attempt(
    scripted: tuple[Scripted, str],
) -> None:
    """``watch_resize(timeout=T)`` failing with UNAVAILABLE before its first event is retried
    within T, as any call: a retry whose wait would pass T raises the error (each attempt
    got the whole T again, and the waits came on top)."""
    servicer, target = scripted
    async with AsyncClient(target, retries=5, backoff=1e6, max_backoff=1e6) as client:
        servicer.fail_next = [(S.UNAVAILABLE, None)] * 6
        with pytest.raises(Unavailable):
            await asyncio.wait_for(anext(client.volume("v").watch_resize(timeout=0.5)), 30)
    assert [r[0] for r in servicer.requests].count("WatchResize") < 6


def test_an_async_client_made_outside_an_event_loop_says_where_it_belongs() -> None:
    with pytest.raises(RuntimeError, match=r"running event loop.*tierdisk\.client\.Client"):
        AsyncClient("127.0.0.1:1")


def _tls_options(option: str, data: object) -> dict[str, Any]:
    """``option`` given as ``data``, with a well-formed other half of a client key pair."""
    if option == "root_certificates":
        return {option: data}
    return {  # a client certificate goes with its key
        "certificate_chain": b"-----BEGIN CERTIFICATE-----\n",
        "private_key": b"-----BEGIN PRIVATE KEY-----\n",
        option: data,
    }


TLS_OPTIONS = pytest.mark.parametrize(
    ("option", "kind"),
    [("root_certificates", "certificate"), ("certificate_chain", "certificate"),
     ("private_key", "private key")],
)  # fmt: skip


@TLS_OPTIONS
@pytest.mark.parametrize("data", [b"not a PEM file", b""])
async def test_tls_bytes_that_are_not_pem_are_refused_at_construction(
    option: str, kind: str, data: bytes
) -> None:
    """gRPC would take them, then fail every connection ("Failed to create security
    handshaker") and the client retry that for seconds: a ValueError naming the option.
    Empty bytes too (a CA file read empty): they once made a channel in clear, the token
    sent with every call."""
    with pytest.raises(ValueError, match=rf"^{option}: no PEM {kind} in it"):
        AsyncClient("127.0.0.1:1", token="s3cret", **_tls_options(option, data))


@TLS_OPTIONS
async def test_tls_options_that_are_not_bytes_are_a_type_error_naming_them(
    option: str, kind: str
) -> None:
    with pytest.raises(TypeError, match=rf"^{option} must be PEM bytes, not str$"):
        AsyncClient("127.0.0.1:1", **_tls_options(option, f"-----BEGIN {kind.upper()}-----"))


# -- review 17: what a user doing as the docs say runs into --------------------------------


async def test_stream_read_and_watch_resize_are_streams_to_close(
    scripted: tuple[Scripted, str],
) -> None:
    """The documented way to stop them is to close them: their types say they can be
    (async generators; the blocking client's :class:`~tierdisk.client.Stream`, closed from
    any thread: ``close()``, ``aclose()``, ``contextlib.closing`` / ``aclosing`` then
    type-check; tests/test_client_package.py runs mypy on such a program), and they are."""
    from tierdisk.client import AsyncVolume, Stream, Volume

    for cls, kind in ((AsyncVolume, collections.abc.AsyncGenerator), (Volume, Stream)):
        for method in (cls.stream_read, cls.watch_resize):
            returns = typing.get_type_hints(method)["return"]
            assert typing.get_origin(returns) is kind, (cls.__name__, method.__name__, returns)
    servicer, target = scripted
    async with AsyncClient(target) as client:
        vol = client.volume("v")
        async with contextlib.aclosing(vol.watch_resize()) as events:
            assert (await anext(events)).generation == 0
        reads = vol.stream_read(0, 8)
        assert (await anext(reads))[0] == 0
        await reads.aclose()

    def blocking() -> None:
        with Client(target) as client:
            vol = client.volume("v")
            with contextlib.closing(vol.watch_resize()) as watch:
                assert next(watch).generation == 0
            chunks = vol.stream_read(0, 8)
            assert next(chunks)[0] == 0
            chunks.close()

    await asyncio.to_thread(blocking)  # the servicer runs on this loop
    assert [r[0] for r in servicer.requests].count("WatchResize") == 2


async def test_metadata_keys_are_sent_in_lower_case(scripted: tuple[Scripted, str]) -> None:
    """Header names are case-insensitive and HTTP/2 sends them in lower case: a key in
    upper case is sent lowered, from ``metadata`` as from a ``metadata_factory`` (whose
    pairs were refused at every call, ValueError). A non-ASCII key is refused as written,
    not turned into ASCII by lower-casing (U+212A KELVIN SIGN lowers to ``k``)."""
    servicer, target = scripted
    options: dict[str, Any] = {
        "metadata": [("X-Tenant", "a")],
        "metadata_factory": lambda: [("X-Hop", "b")],
    }
    async with AsyncClient(target, **options) as client:
        await client.volume("v").info()
    assert servicer.metadata[-1]["x-tenant"] == "a"
    assert servicer.metadata[-1]["x-hop"] == "b"
    with pytest.raises(ValueError, match=r"^metadata key '\u212a': lower-case letters"):
        AsyncClient(target, metadata=[("\u212a", "v")])
    async with AsyncClient(target, metadata_factory=lambda: [("\u212a", "v")]) as client:
        with pytest.raises(ValueError, match=r"^metadata_factory: metadata key '\u212a'"):
            await client.volume("v").info()


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        ("", "missing port"),
        ("127.0.0.1", "missing port"),  # gRPC: port 443
        ("127.0.0.1:7400\x00x", r"control character: '\\x00' \(U\+0000\) at position 14"),
        ("127.0.0.1:7400 ", "white space"),
        ("127.0.0.1:99999", "out of range"),
        ("unix:", "names no socket path"),
        ("http://127.0.0.1:7400", "scheme http: is not taken"),
        ("::1:7400", r"IPv6 address goes in brackets"),
    ],
)
async def test_a_target_grpc_would_not_reach_as_written_is_refused_when_the_client_is_made(
    target: str, problem: str
) -> None:
    """As the ``tierdisk`` command refuses such a ``--server`` (the same check): gRPC took
    them silently (port 443, the address cut at the NUL, C-core error lines for "")."""
    with pytest.raises(ValueError, match=rf"^target {re.escape(repr(target))}: .*{problem}"):
        AsyncClient(target)

    def blocking() -> None:
        with pytest.raises(ValueError, match=rf"^target {re.escape(repr(target))}: "):
            Client(target)

    await asyncio.to_thread(blocking)


@pytest.mark.parametrize(
    "target",
    [
        "localhost:7400",
        "127.0.0.1:7400",
        "[::1]:7400",
        "unix:/run/t.sock",
        "unix:t.sock",
        "dns:///localhost:7400",
        "ipv4:127.0.0.1:7400",
        "unix-abstract:t",
    ],
)
async def test_every_target_form_grpc_takes_makes_a_client(target: str) -> None:
    async with AsyncClient(target) as client:
        assert client.target == target


async def test_a_target_that_is_not_a_str_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"^target must be a str \(HOST:PORT\), not bytes$"):
        AsyncClient(b"127.0.0.1:7400")  # type: ignore[arg-type]


async def test_an_async_client_used_in_another_event_loop_says_so(
    scripted: tuple[Scripted, str],
) -> None:
    """README: "An AsyncClient is made in the event loop that uses it". Used in a second
    ``asyncio.run()`` it failed with gRPC's "Event loop is closed" and a coroutine never
    awaited; from a loop running beside its own, as badly. Now a RuntimeError naming the
    rule, before anything reaches gRPC (no request, no warning); ``close()`` works from any
    loop."""
    servicer, target = scripted
    wrong_loop = r"^this AsyncClient \(for 127\.0\.0\.1:\d+\) was made in another event loop"
    own = AsyncClient(target)  # made in this test's loop, which keeps running

    async def make() -> AsyncClient:
        client = AsyncClient(target)
        await client.volume("v").info()
        return client

    async def use(client: AsyncClient) -> None:
        vol = client.volume("v")
        calls: list[Callable[[], Awaitable[object]]] = [
            vol.info,
            client.list_volumes,
            lambda: vol.read(0, 1),
            lambda: anext(vol.watch_resize()),
            lambda: anext(vol.stream_read(0, 1)),
        ]
        for call in calls:
            with pytest.raises(RuntimeError, match=wrong_loop):
                await asyncio.wait_for(call(), 10)
        await client.close()
        assert client.closed

    def other_loops() -> list[warnings.WarningMessage]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            closed_loop = asyncio.run(make())
            before = len(servicer.requests)
            asyncio.run(use(closed_loop))
            asyncio.run(use(own))
            gc.collect()
        assert len(servicer.requests) == before  # nothing reached the server
        return caught

    caught = await asyncio.to_thread(other_loops)
    assert [str(w.message) for w in caught] == []
    assert own.closed
