"""``ReadBatch``: several ranges of one volume in one call, against real servers on
127.0.0.1 (raw stubs for the wire contract, the client library's ``read_batch`` for the
splitting it does), its limits, its all-or-nothing failures and its metrics."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from servers import FOUR_VOLUMES, metric, ram, remote, running_server, toml_volume

from tierdisk.client import AsyncClient, Client
from tierdisk.client import errors as cerr
from tierdisk.client.chunking import MAX_BATCH_RANGES
from tierdisk.client.models import Extent
from tierdisk.service.errors import StorageError
from tierdisk.service.grpc_api import BlockDeviceService
from tierdisk.service.layers.ram import RamLayer
from tierdisk.service.server import Server
from tierdisk.v1 import blockdevice_pb2 as pb
from tierdisk.v1 import blockdevice_pb2_grpc as pb_grpc

MiB = 1 << 20


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with running_server(tmp_path, FOUR_VOLUMES) as srv:
        yield srv


@pytest.fixture
async def stub(server: Server) -> AsyncIterator[pb_grpc.BlockDeviceAsyncStub]:
    options = [("grpc.max_receive_message_length", 64 * MiB)]
    async with grpc.aio.insecure_channel(server.grpc_address, options=options) as channel:
        yield pb_grpc.BlockDeviceStub(channel)


def _batch(
    volume: str, ranges: list[tuple[int, int]], sector_size: int = 0, report_presence: bool = False
) -> pb.ReadBatchRequest:
    extents = [pb.Extent(sector=s, sector_count=n) for s, n in ranges]
    return pb.ReadBatchRequest(
        volume=volume, ranges=extents, sector_size=sector_size, report_presence=report_presence
    )


async def _refusal(call: object) -> tuple[grpc.StatusCode, str, str]:
    """The status code, details and ``tierdisk-error`` trailer of a call that fails."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    trailer = dict(info.value.trailing_metadata() or ()).get("tierdisk-error", "")
    return info.value.code(), info.value.details() or "", str(trailer)


@pytest.mark.parametrize(
    ("volume", "sector_size", "sectors"),
    [("ram", 512, 64 * MiB // 512), ("stack", 512, 8 * MiB // 512), ("big4k", 4096, 1024)],
)
async def test_a_batch_reads_what_single_reads_read(
    stub: pb_grpc.BlockDeviceAsyncStub, volume: str, sector_size: int, sectors: int
) -> None:
    """Ranges in any order, overlapping, repeated and empty: the reply is each range's
    Read, one after another in the order asked (on ``stack`` some come from the read
    cache, some from the raw file below it, some from both)."""
    rng = random.Random(sectors)
    for at in (0, 100, sectors - 40):  # data, so that every place reads differently
        data = rng.randbytes(32 * sector_size)
        await stub.Write(pb.WriteRequest(volume=volume, sector=at, data=data))
    await stub.Read(pb.ReadRequest(volume=volume, sector=90, sector_count=30))  # fills some
    ranges = [(rng.randrange(sectors - 64), rng.randrange(1, 64)) for _ in range(40)]
    ranges += [ranges[3], (ranges[5][0] + 1, 10), (17, 0), (sectors - 1, 1), (0, 0)]
    rng.shuffle(ranges)
    reply = await stub.ReadBatch(_batch(volume, ranges, sector_size=sector_size))
    expected = b""
    for sector, count in ranges:
        one = await stub.Read(pb.ReadRequest(volume=volume, sector=sector, sector_count=count))
        expected += one.data
    assert reply.data == expected


async def test_a_batch_reports_the_runs_held_once_over_all_its_ranges(
    stub: pb_grpc.BlockDeviceAsyncStub,
) -> None:
    """With ``report_presence``, ``present`` lists the runs some layer holds within the
    ranges, sorted and merged over all of them (a sector of two ranges once), and says it
    answered even when nothing is held; without it, neither field is set. The data is the
    same either way, small replies and one framed in place (256 KiB) alike."""
    rng = random.Random(11)
    for at, count in ((8, 8), (40, 8), (3000, 4)):
        await stub.Write(pb.WriteRequest(volume="ram", sector=at, data=rng.randbytes(count * 512)))
    for ranges, held in [
        ([(0, 12), (10, 10), (44, 10), (100, 4), (12, 0)], [(8, 8), (44, 4)]),
        ([(2990, 512), (0, 9)], [(3000, 4), (8, 1)][::-1]),
        ([(100, 4), (7, 1)], []),
    ]:
        asked = await stub.ReadBatch(_batch("ram", ranges, report_presence=True))
        assert [(e.sector, e.sector_count) for e in asked.present] == held
        assert asked.presence_reported
        plain = await stub.ReadBatch(_batch("ram", ranges))
        assert not plain.present and not plain.presence_reported
        assert asked.data == plain.data
        singles = [
            await stub.Read(pb.ReadRequest(volume="ram", sector=s, sector_count=n))
            for s, n in ranges
        ]
        assert plain.data == b"".join(one.data for one in singles)


async def test_an_empty_batch_reads_nothing(stub: pb_grpc.BlockDeviceAsyncStub) -> None:
    assert (await stub.ReadBatch(_batch("ram", []))).data == b""
    code, details, _ = await _refusal(stub.ReadBatch(_batch("nope", [])))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in details


async def test_a_range_past_the_end_fails_the_whole_batch_before_any_is_read(
    server: Server, stub: pb_grpc.BlockDeviceAsyncStub
) -> None:
    """``stack`` is a RAM read cache over a raw file: a batch refused for its last range
    filled nothing from the others (GetAllocation: still held by the raw layer only)."""
    end = 8 * MiB // 512
    code, details, error = await _refusal(stub.ReadBatch(_batch("stack", [(0, 8), (end - 1, 2)])))
    assert (code, error) == (grpc.StatusCode.OUT_OF_RANGE, "OutOfRange")
    assert f"[{end - 1}, {end + 1})" in details
    alloc = await stub.GetAllocation(pb.GetAllocationRequest(volume="stack", sector_count=8))
    assert [(e.sector, e.sector_count, e.depth) for e in alloc.extents] == [(0, 8, 1)]
    assert metric(server, "tierdisk_cache_fills_total", volume="stack", layer="0") == 0


async def test_a_range_that_fails_ends_the_call_without_waiting_for_the_others(
    stub: pb_grpc.BlockDeviceAsyncStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ``ram`` volume's layer fails reads of sector 100 (a disk error) and never answers
    reads of sector 200: a batch of both answers the failure (INTERNAL) and cancels the
    read that waits, rather than wait for it (it never would)."""
    never = asyncio.Event()
    waiting: list[int] = []
    original = RamLayer.read

    async def read(self: RamLayer, buf: memoryview, sector: int) -> list[tuple[int, int]]:
        if sector == 200:
            waiting.append(sector)
            await never.wait()
        if sector == 100:
            raise StorageError("reading sector 100: injected media error")
        return await original(self, buf, sector)

    monkeypatch.setattr(RamLayer, "read", read)
    call = stub.ReadBatch(_batch("ram", [(200, 1), (0, 1), (100, 1)]), timeout=30)
    code, details, _ = await _refusal(asyncio.wait_for(call, 20))
    assert code == grpc.StatusCode.INTERNAL and "injected media error" in details
    assert waiting == [200]  # it was asked, and the failure did not wait for it


async def test_the_limits_of_one_call(stub: pb_grpc.BlockDeviceAsyncStub) -> None:
    """At most 256 ranges and ``max_io`` bytes (16 MiB here) a call, else
    ``INVALID_ARGUMENT`` naming the limit; a batch counted in another sector size than the
    volume's is ``SectorSizeChanged``."""
    code, details, _ = await _refusal(stub.ReadBatch(_batch("ram", [(0, 1)] * 257)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "257" in details and str(MAX_BATCH_RANGES) in details
    assert len((await stub.ReadBatch(_batch("ram", [(0, 1)] * 256))).data) == 256 * 512
    code, details, _ = await _refusal(
        stub.ReadBatch(_batch("ram", [(0, 16384), (0, 16384), (1, 1)]))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_io" in details
    code, _, error = await _refusal(stub.ReadBatch(_batch("big4k", [(0, 1)], sector_size=512)))
    assert (code, error) == (grpc.StatusCode.FAILED_PRECONDITION, "SectorSizeChanged")


async def test_a_request_larger_than_a_batch_takes_is_refused_undecoded(
    stub: pb_grpc.BlockDeviceAsyncStub,
) -> None:
    """A request of more bytes than 256 ranges take (64 KiB) is refused before protobuf
    decodes it (millions of ranges, up to the transport's cap of tens of MiB, took ~8 times
    their bytes of memory to decode); the largest request of 256 ranges is well under."""
    code, details, _ = await _refusal(stub.ReadBatch(_batch("ram", [(0, 1)] * 20_000)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "bytes, more than a batch of 256 reads takes" in details
    widest = _batch("ram" * 1000, [(2**64 - 1, 2**64 - 1)] * 256, sector_size=2**32 - 1)
    assert widest.ByteSize() < 16 << 10
    code, _, _ = await _refusal(stub.ReadBatch(widest))
    assert code == grpc.StatusCode.NOT_FOUND  # read, and answered for what it asks


async def test_each_range_counts_as_one_read(
    server: Server, stub: pb_grpc.BlockDeviceAsyncStub
) -> None:
    """In the volume's I/O metrics a batch of n ranges is n reads (a read-rate panel sees
    the reads), and a refused batch of n ranges n failed reads (an error-ratio panel sees
    what it cost); gRPC's own families count the one call. A batch of more ranges than a
    call takes is one failed read (the count is the client's to make up), and one of no
    range one read."""

    def reads(code: str = "OK") -> float:
        labels = {"volume": "ram", "op": "read", "code": code}
        return metric(server, "tierdisk_volume_io_requests_total", **labels)

    def read_bytes() -> float:
        return metric(server, "tierdisk_volume_io_bytes_total", volume="ram", op="read")

    before, before_bytes = reads(), read_bytes()
    durations = metric(server, "tierdisk_io_duration_seconds_count", op="read")
    await stub.ReadBatch(_batch("ram", [(0, 8), (100, 1), (5, 3)]))
    assert reads() - before == 3
    assert read_bytes() - before_bytes == 12 * 512
    assert metric(server, "tierdisk_io_duration_seconds_count", op="read") - durations == 3
    handled = {
        "grpc_type": "unary",
        "grpc_service": "tierdisk.v1.BlockDevice",
        "grpc_method": "ReadBatch",
        "grpc_code": "OK",
    }
    assert metric(server, "grpc_server_handled_total", **handled) == 1
    await _refusal(stub.ReadBatch(_batch("ram", [(0, 8), (1 << 40, 1)])))
    assert (reads(), reads("OUT_OF_RANGE")) == (before + 3, 2)
    await _refusal(stub.ReadBatch(_batch("nothing", [(0, 1)] * 3)))  # not a volume
    unknown = {"volume": "", "op": "read", "code": "NOT_FOUND"}
    assert metric(server, "tierdisk_volume_io_requests_total", **unknown) == 3
    await _refusal(stub.ReadBatch(_batch("ram", [(0, 1)] * (MAX_BATCH_RANGES + 1))))
    assert reads("INVALID_ARGUMENT") == 1
    # a batch of no range is a call that read nothing: one read, as a refused one would be
    await stub.ReadBatch(_batch("ram", []))
    assert reads() - before == 4 and read_bytes() - before_bytes == 12 * 512


async def test_the_client_splits_a_batch_into_calls_and_keeps_the_order(server: Server) -> None:
    """More than 256 ranges, or more than the client's ``max_io`` in all, go in several
    calls (gRPC's count of ReadBatch calls says how many); a range larger than ``max_io``
    is read as a plain read; the results come back in the order asked."""
    rng = random.Random(7)
    data = rng.randbytes(4 * MiB)
    async with AsyncClient(server.grpc_address, max_io=MiB) as client:
        volume = client.volume("ram")
        await volume.write(0, data)
        ranges = [(rng.randrange(8000), rng.randrange(0, 9)) for _ in range(600)]
        ranges += [(1, 2048), (3, 2050), (7, 1)]  # 1 MiB fits a call; 2050 sectors do not
        labels = {
            "grpc_type": "unary",
            "grpc_service": "tierdisk.v1.BlockDevice",
            "grpc_method": "ReadBatch",
            "grpc_code": "OK",
        }
        got = await volume.read_batch(ranges)
        assert got == [data[s * 512 : (s + n) * 512] for s, n in ranges]
        # 600 small ranges: 3 calls (256, 256, 88); then 1 MiB alone (the call is full),
        # 2050 sectors as a Read, and the last range in a call of its own
        assert metric(server, "grpc_server_handled_total", **labels) == 5
        with pytest.raises(cerr.OutOfRange, match=r"\[131072, 131073\)"):
            await volume.read_batch([(0, 1), (131072, 1)])
        with pytest.raises(cerr.InvalidArgument, match="negative"):
            await volume.read_batch([(0, 1), (-1, 1)])
        assert await volume.read_batch([]) == []


async def test_read_batch_into_fills_the_callers_buffers(server: Server) -> None:
    """One buffer per range, each exactly its range's bytes (a range over ``max_io`` read
    into its buffer in chunks); wrong sizes, counts or read-only buffers are refused
    before any call."""
    data = random.Random(9).randbytes(3 * MiB)
    async with AsyncClient(server.grpc_address, max_io=MiB) as client:
        volume = client.volume("ram")
        await volume.write(0, data)
        ranges = [(5, 3), (3000, 3000), (0, 0), (6, 1)]
        buffers = [bytearray(n * 512) for _, n in ranges]
        views = [memoryview(b) for b in buffers]
        await volume.read_batch_into(ranges, views)
        assert [bytes(b) for b in buffers] == [data[s * 512 : (s + n) * 512] for s, n in ranges]
        with pytest.raises(ValueError, match="2 buffers for 1 ranges"):
            await volume.read_batch_into([(0, 1)], [bytearray(512), bytearray(512)])
        with pytest.raises(cerr.InvalidArgument, match="1024 bytes for 1 sectors"):
            await volume.read_batch_into([(0, 1)], [bytearray(1024)])
        with pytest.raises(TypeError, match="read-only"):
            await volume.read_batch_into([(0, 1)], [memoryview(bytes(512))])
    with pytest.raises(cerr.ClientClosed):  # an empty batch too, with the size known
        await volume.read_batch([])


async def test_read_batch_present_into_returns_the_runs_held(server: Server) -> None:
    """The runs held within all the ranges, sorted and merged, also when the batch went in
    several calls and a range over ``max_io`` was read alone; the buffers hold the data."""
    data = random.Random(12).randbytes(64 * 512)
    async with AsyncClient(server.grpc_address, max_io=64 * 1024) as client:
        volume = client.volume("ram")
        await volume.write(1000, data)  # sectors [1000, 1064)
        await volume.write(5000, data[:512])
        ranges = [(990, 20), (5000, 1), (1050, 300), (1010, 40)] + [(s, 1) for s in range(300)]
        buffers = [bytearray(n * 512) for _, n in ranges]
        held = await volume.read_batch_present_into(ranges, buffers)
        assert held == [Extent(1000, 64), Extent(5000, 1)]
        assert buffers == await volume.read_batch(ranges)
        assert await volume.read_batch_present_into([(0, 4)], [bytearray(2048)]) == []


async def test_a_server_that_reports_no_presence_in_a_batch_is_unimplemented(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that serves ``ReadBatch`` but knows nothing of its ``report_presence`` (a
    tierdisk from before presence in it, which ignores the field): its reply's empty
    ``present`` is no answer, and the client raises :class:`Unimplemented` rather than
    take every sector for a hole."""
    serve = BlockDeviceService.read_batch_encoded

    async def older(self: BlockDeviceService, request: Any, context: Any) -> bytes:
        request.report_presence = False  # what a server without the field reads
        return await serve(self, request, context)

    monkeypatch.setattr(BlockDeviceService, "read_batch_encoded", older)
    async with (
        running_server(tmp_path, FOUR_VOLUMES) as server,
        AsyncClient(server.grpc_address) as client,
    ):
        volume = client.volume("ram")
        await volume.write(0, bytes(512))
        assert await volume.read_batch([(0, 1)]) == [bytes(512)]  # batches still work
        with pytest.raises(cerr.Unimplemented, match="does not report presence"):
            await volume.read_batch_present_into([(0, 1)], [bytearray(512)])


async def test_the_blocking_client_reads_a_batch(server: Server) -> None:
    data = random.Random(3).randbytes(8192)

    def use() -> list[bytes]:  # on a thread: the server runs on this test's event loop
        with Client(server.grpc_address) as client:
            volume = client.volume("big4k")
            volume.write(10, data)
            into = [bytearray(4096), bytearray(8192)]
            volume.read_batch_into([(10, 1), (10, 2)], into)
            assert into == [data[:4096], data]
            held = volume.read_batch_present_into([(9, 2), (11, 2)], [bytearray(8192)] * 2)
            assert held == [Extent(10, 2)]
            return volume.read_batch([(11, 1), (10, 2), (12, 0)])

    assert await asyncio.to_thread(use) == [data[4096:], data, b""]


async def test_a_batch_through_a_cache_tier_reads_the_origin(tmp_path: Path) -> None:
    """Through ``[ram read_cache, remote -> origin]`` each range's reads wait on the
    origin, all at once: the data is the origin's, and the cache was filled with it (a
    second batch makes no call to the origin)."""
    data = random.Random(5).randbytes(MiB)
    async with running_server(tmp_path / "origin", toml_volume("base", ram("1MiB"))) as origin:
        async with AsyncClient(origin.grpc_address) as client:
            await client.volume("base").write(0, data)
        body = toml_volume("vm", ram(read_cache=True), remote(origin.grpc_address, "base"))
        async with running_server(tmp_path / "tier", body) as tier:
            async with AsyncClient(tier.grpc_address) as client:
                volume = client.volume("vm")
                ranges = [(s, 8) for s in range(0, 2048, 64)] + [(3, 100)]
                expected = [data[s * 512 : (s + n) * 512] for s, n in ranges]
                assert await volume.read_batch(ranges) == expected
                origin_reads = metric(
                    origin, "tierdisk_volume_io_requests_total", volume="base", op="read", code="OK"
                )
                assert origin_reads >= len(ranges) - 1  # the last range overlaps two others
                assert await volume.read_batch(ranges) == expected
                assert (
                    metric(
                        origin,
                        "tierdisk_volume_io_requests_total",
                        volume="base",
                        op="read",
                        code="OK",
                    )
                    == origin_reads
                )


@contextlib.asynccontextmanager
async def _raw_server(replies: dict[str, bytes]) -> AsyncIterator[str]:
    """A gRPC server on 127.0.0.1 that is not tierdisk: ``GetVolume`` answers a volume of 8
    sectors of 512 bytes, each method of ``replies`` answers those bytes as they are, any
    other method ``UNIMPLEMENTED``. Yields its address."""
    server = grpc.aio.server()

    async def get_volume(request: pb.GetVolumeRequest, context: object) -> pb.Volume:
        return pb.Volume(name=request.volume, sector_size=512, sector_count=8)

    def answer(raw: bytes) -> Any:
        async def handler(request: bytes, context: object) -> bytes:
            return raw

        return grpc.unary_unary_rpc_method_handler(handler)  # bytes in, bytes out

    handlers = {name: answer(raw) for name, raw in replies.items()}
    handlers["GetVolume"] = grpc.unary_unary_rpc_method_handler(
        get_volume,
        request_deserializer=pb.GetVolumeRequest.FromString,
        response_serializer=pb.Volume.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("tierdisk.v1.BlockDevice", handlers),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def test_a_server_without_read_batch_is_unimplemented() -> None:
    """A server that does not serve ``ReadBatch`` (an older tierdisk): the client raises
    :class:`Unimplemented`, not a wrong answer."""
    async with _raw_server({}) as address, AsyncClient(address) as client:
        with pytest.raises(cerr.Unimplemented):
            await client.volume("old").read_batch([(0, 1)])


@pytest.mark.parametrize(
    "raw",
    [
        b"\x0a\x05ab",  # the data's length past the reply's end
        b"\x0a\x02ab\x28\x01\x0a\x09ab",  # a field the fast path leaves to protobuf, then the same
    ],
)
async def test_a_malformed_reply_is_a_storage_error(raw: bytes) -> None:
    """A reply that is not a well-formed message, whichever parser reads it: a
    :class:`StorageError` naming the call, never protobuf's own exception."""
    replies = {"Read": raw, "ReadBatch": raw}
    async with _raw_server(replies) as address, AsyncClient(address, retries=0) as client:
        volume = client.volume("odd")
        with pytest.raises(cerr.StorageError, match="malformed Read reply"):
            await volume.read(0, 1)
        with pytest.raises(cerr.StorageError, match="malformed ReadBatch reply"):
            await volume.read_batch_present_into([(0, 1)], [bytearray(512)])


async def test_a_reply_with_a_field_it_does_not_know_is_read_by_protobuf() -> None:
    """An unknown field (a newer server's) beside the known ones: the reply is read all the
    same, ``presence_reported`` included."""
    known = pb.ReadBatchResponse(data=b"\xab" * 512, presence_reported=True)
    known.present.add(sector=0, sector_count=1)
    raw = known.SerializeToString() + b"\x78\x01"  # field 15
    async with _raw_server({"ReadBatch": raw}) as address, AsyncClient(address) as client:
        buffer = bytearray(512)
        held = await client.volume("new").read_batch_present_into([(0, 1)], [buffer])
        assert held == [Extent(0, 1)] and buffer == b"\xab" * 512
