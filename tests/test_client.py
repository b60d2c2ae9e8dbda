"""The client library against a real tierdisk server: every method, chunking across the
server's 16 MiB ``max_io``, the exception raised for each status code a server can be made to
answer, the blocking client, and retries across a server restarted on the same port."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc
from servers import (
    FOUR_VOLUMES,
    ServerProcess,
    fragmented_extents,
    fragmented_server,
    free_port,
    ram,
    remote,
    running_server,
    toml_volume,
    write_config,
)

from tierdisk.client import (
    AllocationExtent,
    AsyncClient,
    AsyncVolume,
    Client,
    DeadlineExceeded,
    Extent,
    FailedPrecondition,
    InvalidArgument,
    MessageTooLarge,
    OutOfRange,
    ReadOnlyVolume,
    ReadResult,
    RetryPolicy,
    SectorSizeChanged,
    StorageError,
    Unavailable,
    Unimplemented,
    UnmapBehavior,
    VolumeInfo,
    VolumeNotFound,
)
from tierdisk.client.errors import changed_nothing
from tierdisk.service.server import Server
from tierdisk.v1 import blockdevice_pb2 as pb
from tierdisk.v1 import blockdevice_pb2_grpc as pb_grpc

MiB = 1 << 20


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with running_server(tmp_path, FOUR_VOLUMES) as srv:
        yield srv


@pytest.fixture
async def client(server: Server) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(server.grpc_address, timeout=30) as c:
        yield c


# -- every method ------------------------------------------------------------------------


async def test_list_volumes_and_info(client: AsyncClient) -> None:
    volumes = await client.list_volumes()
    assert sorted(v.name for v in volumes) == ["big4k", "ram", "ro", "stack"]
    paged = await client.list_volumes(page_size=1)  # four pages, followed to the end
    assert sorted(v.name for v in paged) == sorted(v.name for v in volumes)
    info = await client.volume("ram").info()
    assert (info.name, info.sector_size, info.sector_count) == ("ram", 512, 64 * MiB // 512)
    assert info.size_bytes == 64 * MiB
    assert info.read_only is False
    assert isinstance(info.unmap_behavior, UnmapBehavior)
    assert (await client.volume("ro").info()).read_only is True
    assert await client.volume("big4k").sector_size() == 4096


async def test_a_volume_not_ready_yet_is_listed_by_name_as_not_ready(tmp_path: Path) -> None:
    """A volume whose remote tier does not answer is listed with its name only, every
    other field zero: ``ready`` says so (a caller dividing by ``sector_size`` got a
    ZeroDivisionError, with nothing documented to test first); a volume that is ready says
    so too, and ``info()`` on the waiting one raises Unavailable."""
    body = toml_volume("waiting", ram(), remote(f"127.0.0.1:{free_port()}", "x")) + toml_volume(
        "fine", ram("1MiB")
    )
    async with running_server(tmp_path, body) as srv:
        async with AsyncClient(srv.grpc_address, retries=0) as client:
            listed = {v.name: v for v in await client.list_volumes()}
            with pytest.raises(Unavailable):
                await client.volume("waiting").info()
    waiting, fine = listed["waiting"], listed["fine"]
    assert not waiting.ready
    assert (waiting.sector_size, waiting.sector_count, waiting.size_bytes) == (0, 0, 0)
    assert waiting.unmap_behavior is UnmapBehavior.UNSPECIFIED
    assert fine.ready
    assert (fine.sector_size, fine.size_bytes) == (512, MiB)
    assert not VolumeInfo.from_proto(pb.Volume(name="x")).ready


async def test_write_read_presence_allocation_unmap_flush(client: AsyncClient) -> None:
    vol = client.volume("ram")
    data = os.urandom(16 * 512)
    await vol.write(100, data, fua=True)
    assert await vol.read(100, 16) == data
    result = await vol.read(90, 40, report_presence=True)
    assert isinstance(result, ReadResult)
    assert result.present == (Extent(100, 16),)
    assert result.data == bytes(10 * 512) + data + bytes(14 * 512)
    extents = await vol.allocation(90, 40)
    assert extents == [
        AllocationExtent(90, 10, -1),
        AllocationExtent(100, 16, 0),
        AllocationExtent(116, 14, -1),
    ]
    whole = await vol.allocation()
    assert sum(e.sector_count for e in whole) == 64 * MiB // 512
    tail = await vol.allocation(110)  # from a sector to the end
    assert tail == [AllocationExtent(110, 6, 0), AllocationExtent(116, 64 * MiB // 512 - 116, -1)]
    await vol.flush()
    await vol.unmap(104, 4)
    info = await vol.info()
    if info.unmap_behavior == UnmapBehavior.ZEROES:
        assert await vol.read(104, 4) == bytes(4 * 512)
    await vol.write(200, bytes(512) * 2, no_overwrite=True)
    assert (await vol.read(200, 2, report_presence=True)).present == (Extent(200, 2),)


async def test_no_overwrite_keeps_held_sectors(client: AsyncClient) -> None:
    vol = client.volume("ram")
    await vol.write(10, b"a" * 512)
    await vol.write(10, b"b" * 1024, no_overwrite=True)
    assert await vol.read(10, 2) == b"a" * 512 + b"b" * 512


async def test_byte_helpers_on_4k_sectors(client: AsyncClient) -> None:
    vol = client.volume("big4k")
    await vol.write_bytes(8192, b"\x5a" * 4096)
    assert await vol.read_bytes(8192, 4096) == b"\x5a" * 4096
    assert await vol.read(2, 1) == b"\x5a" * 4096
    with pytest.raises(InvalidArgument, match="4096-byte"):
        await vol.write_bytes(512, b"\0" * 512)
    # refused here, before any call, naming the volume as the server's refusals do
    with pytest.raises(InvalidArgument, match=r"^volume 'big4k': data of 100 bytes"):
        await vol.write(0, b"\0" * 100)
    with pytest.raises(InvalidArgument, match=r"^volume 'big4k': buffer of 100 bytes"):
        await vol.read_into(0, bytearray(100))


async def test_resize_and_watch(client: AsyncClient) -> None:
    vol = client.volume("ram")
    events = vol.watch_resize()
    first = await anext(events)
    assert first.sector_count == 64 * MiB // 512
    info = await vol.resize(1000)
    assert info.sector_count == 1000
    await vol.resize(3000)
    second, third = await anext(events), await anext(events)
    assert [second.sector_count, third.sector_count] == [1000, 3000]
    assert first.generation < second.generation < third.generation
    await events.aclose()
    assert (await vol.info()).sector_count == 3000


async def test_a_watch_ends_unavailable_when_the_server_stops(
    server: Server, client: AsyncClient
) -> None:
    """A graceful stop ends a watch with ``Unavailable`` (watch again), never as if the
    stream simply had no more to say: a watcher would stop following without knowing."""
    events = client.volume("ram").watch_resize()
    await anext(events)
    stopping = asyncio.ensure_future(server.stop(grace=5))
    with pytest.raises(Unavailable, match="shutting down; watch again"):
        await asyncio.wait_for(anext(events), 10)
    await stopping


async def test_inspect_tree_and_path(client: AsyncClient) -> None:
    vol = client.volume("stack")
    tree = await vol.inspect()
    assert tree["name"] == "stack"
    assert tree["sector_size"] == 512 and isinstance(tree["sector_size"], int)
    assert [layer["kind"] for layer in tree["layers"]] == ["ram", "raw"]
    assert tree["layers"][0]["read_cache"] is True
    sub = await vol.inspect("layers/1")
    assert sub["kind"] == "raw" and sub["index"] == 1
    for missing in ("layers/9", "layers/2", "layers/x"):  # (2: one past the end)
        with pytest.raises(InvalidArgument, match=missing):
            await vol.inspect(missing)


async def test_read_cache_stack_through_client(client: AsyncClient) -> None:
    vol = client.volume("stack")
    assert await vol.read(0, 8) == bytes(8 * 512)
    # the read filled the cache: layer 0 holds it now
    assert (await vol.allocation(0, 8))[0].depth == 0


# -- chunking across the server's 16 MiB limit --------------------------------------------


@pytest.mark.parametrize("max_io", [1 * MiB, 16 * MiB], ids=["1MiB", "16MiB"])
async def test_40_mib_read_and_write_are_split(server: Server, max_io: int) -> None:
    data = os.urandom(40 * MiB)
    async with AsyncClient(server.grpc_address, max_io=max_io) as c:
        vol = c.volume("ram")
        await vol.write(8, data)
        got = await vol.read(8, len(data) // 512)
        assert got == data
        buf = bytearray(len(data))
        await vol.read_into(8, buf)
        assert buf == data
        result = await vol.read(0, len(data) // 512 + 16, report_presence=True)
        assert result.present == (Extent(8, len(data) // 512),)
        # the same into a buffer of the caller's, chunk by chunk
        whole = bytearray(len(data) + 16 * 512)
        present = await vol.read_present_into(0, whole)
        assert present == [Extent(8, len(data) // 512)]
        assert whole == result.data
        streamed = bytearray()
        async for _, chunk in vol.stream_read(8, len(data) // 512):
            assert len(chunk) <= max_io
            streamed += chunk
        assert streamed == data
        # a range of several chunks past the end is refused before any chunk is yielded
        size = (await vol.info()).sector_count
        yielded: list[int] = []
        with pytest.raises(OutOfRange):
            async for at, _ in vol.stream_read(size - max_io // 512 - 1, max_io // 512 + 2):
                yielded.append(at)
        assert yielded == []


async def test_a_max_io_over_64_mib_fits_the_channel(tmp_path: Path) -> None:
    """A server may take up to 256 MiB per request: a client whose max_io is 96 MiB sends
    and receives 96 MiB messages (the channel's cap follows max_io), not RESOURCE_EXHAUSTED
    from gRPC's default cap of 64 MiB read as "out of space"."""
    body = f'[server]\nlisten = "127.0.0.1:0"\nmetrics = ""\ndata_dir = "{tmp_path / "data"}"\n'
    body += 'max_io = "128MiB"\n'
    body += toml_volume("big", ram("128MiB"))
    data = os.urandom(96 * MiB)
    async with (
        running_server(tmp_path, body) as srv,
        AsyncClient(srv.grpc_address, max_io=96 * MiB) as c,
    ):
        vol = c.volume("big")
        await vol.write(0, data)
        assert await vol.read(0, len(data) // 512) == data


async def test_chunks_above_the_server_limit_are_refused_with_the_limit(server: Server) -> None:
    # one sector over the server's 16 MiB max_io: the server's own check answers
    async with AsyncClient(server.grpc_address, max_io=16 * MiB + 512) as c:
        with pytest.raises(InvalidArgument, match=str(16 * MiB)) as info:
            await c.volume("ram").write(0, bytes(20 * MiB))
        assert info.value.volume == "ram"
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_request_over_the_servers_message_cap_is_an_invalid_argument(
    tmp_path: Path,
) -> None:
    """A write so far over the server's ``max_io`` (1 MiB here) that gRPC's own cap on a
    message (4x ``max_io`` and 1 MiB) refuses it, before tierdisk's check: ``InvalidArgument``
    saying the request is too large (it changed nothing), not ``NoSpace`` (a full disk)."""
    async with (
        fragmented_server(tmp_path, toml_volume("v", ram("16MiB"))) as srv,
        AsyncClient(srv.grpc_address, max_io=8 * MiB, retries=0) as c,
    ):
        with pytest.raises(InvalidArgument, match="larger than the server takes") as info:
            await c.volume("v").write(0, bytes(8 * MiB))
        assert "max_io" in str(info.value) and changed_nothing(info.value)
        assert await c.volume("v").read(0, 8) == bytes(8 * 512)


@pytest.mark.parametrize(
    "rpc", ["Read", "Write", "large Write", "Unmap", "GetAllocation", "Resize"]
)
async def test_a_request_counted_in_another_sector_size_is_refused(
    server: Server, rpc: str
) -> None:
    """A request whose ``sector_size`` is not the volume's (it was re-created with another
    since the caller asked) is ``FAILED_PRECONDITION``, ``SectorSizeChanged``, and changes
    nothing; the volume's own size, or 0 (not checked), goes through."""
    data = b"\x5a" * (64 << 10 if rpc == "large Write" else 4096)

    def request(sector_size: int) -> tuple[Any, Any]:
        v, n = "big4k", 1  # a volume of 4 KiB sectors
        return {
            "Read": (pb.ReadRequest(volume=v, sector=0, sector_count=n, sector_size=sector_size),
                     "Read"),
            "Write": (pb.WriteRequest(volume=v, sector=0, data=data, sector_size=sector_size),
                      "Write"),
            "large Write": (pb.WriteRequest(volume=v, sector=0, data=data,
                                            sector_size=sector_size), "Write"),
            "Unmap": (pb.UnmapRequest(volume=v, sector=0, sector_count=n,
                                      sector_size=sector_size), "Unmap"),
            "GetAllocation": (pb.GetAllocationRequest(volume=v, sector=0, sector_count=n,
                                                      sector_size=sector_size), "GetAllocation"),
            "Resize": (pb.ResizeRequest(volume=v, sector_count=2048, sector_size=sector_size),
                       "Resize"),
        }[rpc]  # fmt: skip

    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.BlockDeviceStub(channel)
        before = await stub.Read(pb.ReadRequest(volume="big4k", sector=0, sector_count=16))
        message, method = request(512)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await getattr(stub, method)(message)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert ("tierdisk-error", "SectorSizeChanged") in tuple(info.value.trailing_metadata())
        assert "4096-byte sectors, not the 512-byte ones" in (info.value.details() or "")
        after = await stub.Read(pb.ReadRequest(volume="big4k", sector=0, sector_count=16))
        assert after.data == before.data
        size = await stub.GetVolume(pb.GetVolumeRequest(volume="big4k"))
        assert size.sector_count == 1024  # 4 MiB: no resize either
        for good in (4096, 0):
            message, method = request(good)
            await getattr(stub, method)(message)


async def test_a_client_whose_volume_was_re_created_with_another_sector_size_never_writes_elsewhere(
    tmp_path: Path,
) -> None:
    """The server restarts with the volume re-created with 4 KiB sectors under a client that
    knew it with 512-byte ones: the client's next write (``write_bytes``, at a byte offset
    it converts with the size it kept) is refused, ``SectorSizeChanged``, not written 8
    times further in; the client forgets the size, and the write made again lands where
    it was meant to. So is every other call counted in the old size, split in chunks or
    not (a split one checks the volume's geometry first), and none returns data counted in
    the new one."""
    listen = f"127.0.0.1:{free_port()}"
    config = write_config(tmp_path, toml_volume("v", ram("1MiB")))
    first = ServerProcess.start(tmp_path, config, listen=listen)
    try:
        async with AsyncClient(listen, timeout=10, max_io=64 << 10) as client:
            vol = client.volume("v")
            await vol.write_bytes(0, b"\x11" * 4096)
            calls: dict[str, Callable[[AsyncVolume], Awaitable[object]]] = {
                "split read": lambda v: v.read(0, 256),
                "split stream_read": lambda v: anext(v.stream_read(0, 256)),
                "split read_into": lambda v: v.read_into(0, bytearray(256 * 512)),
                "split write": lambda v: v.write(0, bytes(256 * 512)),
                "read": lambda v: v.read(0, 8),
                "unmap": lambda v: v.unmap(0, 8),
                "allocation": lambda v: v.allocation(),
                "resize": lambda v: v.resize(4096),
            }
            handles = {name: client.volume("v") for name in calls}
            for handle in handles.values():
                assert await handle.sector_size() == 512  # each knows the old size
            first.close()
            config.write_text(toml_volume("v", ram("1MiB", sector_size=4096)))
            second = ServerProcess.start(tmp_path, config, listen=listen)
            try:
                for name, call in calls.items():
                    with pytest.raises(SectorSizeChanged, match="4096-byte sectors"):
                        await call(handles[name])
                with pytest.raises(SectorSizeChanged, match="4096-byte sectors"):
                    await vol.write_bytes(4096, b"A" * 4096)
                assert await vol.read_bytes(0, 64 << 10) == bytes(64 << 10)  # nowhere
                await vol.write_bytes(4096, b"A" * 4096)
                assert await vol.sector_size() == 4096
                assert await vol.read_bytes(0, 12288) == bytes(4096) + b"A" * 4096 + bytes(4096)
            finally:
                second.close()
    finally:
        first.close()


# -- exceptions for each code ----------------------------------------------------------


async def test_not_found(client: AsyncClient) -> None:
    """The server says "on this server"; the client says which server that is."""
    where = f"no volume named 'nope' on this server ({client.target})"
    with pytest.raises(VolumeNotFound, match="nope") as info:
        await client.volume("nope").info()
    assert info.value.volume == "nope" and where in str(info.value)
    assert info.value.server_error == "VolumeNotFound"
    with pytest.raises(VolumeNotFound) as info:
        await client.volume("nope").write(0, bytes(512))
    assert where in str(info.value)
    with pytest.raises(VolumeNotFound) as info:
        await anext(client.volume("nope").watch_resize())
    assert where in str(info.value)


async def test_out_of_range(client: AsyncClient) -> None:
    vol = client.volume("ro")
    with pytest.raises(OutOfRange):
        await vol.read(2047, 2)
    with pytest.raises(OutOfRange):
        await client.volume("ram").write(64 * MiB // 512 - 1, bytes(1024))
    with pytest.raises(OutOfRange):
        await vol.allocation(1 << 40, 1)


async def test_an_empty_range_past_the_end_is_out_of_range_for_every_read(
    client: AsyncClient,
) -> None:
    """One answer for a zero-length read starting past the end, whichever method asks
    (``read_into`` and ``stream_read`` answered it without asking the server); at the very
    end it is an empty read."""
    vol = client.volume("ram")
    end = (await vol.info()).sector_count
    reads: list[Callable[[int], Awaitable[object]]] = [
        lambda start: vol.read(start, 0),
        lambda start: vol.read_into(start, bytearray()),
        lambda start: vol.read_present_into(start, bytearray()),
        lambda start: _all(vol.stream_read(start, 0)),
    ]
    for read in reads:
        assert not await read(end)
        with pytest.raises(OutOfRange):
            await read(end + 1)


async def _all(chunks: AsyncIterator[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    return [chunk async for chunk in chunks]


async def test_allocation_over_the_clients_receive_cap_is_asked_for_in_windows(
    tmp_path: Path,
) -> None:
    """A GetAllocation reply over this client's receive cap (gRPC's own refusal,
    ``MessageTooLarge``) is asked for in smaller windows, as the server's refusal is: the
    answer is the volume's allocation, not an error."""
    small_cap = [("grpc.max_receive_message_length", 64 << 10)]
    async with (
        fragmented_server(tmp_path) as srv,
        AsyncClient(srv.grpc_address, channel_options=small_cap) as c,
    ):
        got = await c.volume("frag").allocation()
        assert [(e.sector, e.sector_count, e.depth) for e in got] == fragmented_extents()
        with pytest.raises(MessageTooLarge, match="the reply is larger than this client"):
            await c.volume("frag").read(0, 256)  # 128 KiB: over the cap too


async def test_allocation_of_a_fragmented_volume_is_asked_for_in_windows(
    tmp_path: Path,
) -> None:
    """A volume with more extents than one GetAllocation reply carries: the server refuses
    the whole range, the client halves its window and joins the answers, the run crossing
    the window border included, into exactly the volume's allocation."""
    calls: list[tuple[str, grpc.StatusCode]] = []
    async with fragmented_server(tmp_path) as srv:
        async with AsyncClient(
            srv.grpc_address, on_call=lambda rpc, code, _: calls.append((rpc, code))
        ) as c:
            vol = c.volume("frag")
            got = await vol.allocation()
            assert [(e.sector, e.sector_count, e.depth) for e in got] == fragmented_extents()
            assert calls == [
                ("GetVolume", grpc.StatusCode.OK),
                ("GetAllocation", grpc.StatusCode.INVALID_ARGUMENT),  # too many extents
                ("GetAllocation", grpc.StatusCode.OK),  # the first half
                ("GetAllocation", grpc.StatusCode.OK),  # the second half
            ]
            # a part of it (its ends fall on one-sector extents), and the blocking client
            assert await vol.allocation(101, 100_000) == [
                AllocationExtent(s, n, d)
                for s, n, d in fragmented_extents()
                if s >= 101 and s + n <= 100_101
            ]

            def blocking() -> list[AllocationExtent]:
                with Client(srv.grpc_address) as sync:
                    return sync.volume("frag").allocation()

            assert await asyncio.to_thread(blocking) == got


async def test_a_split_write_past_the_end_changes_nothing(server: Server) -> None:
    # DESIGN §3: an out-of-range request changes nothing — not even its in-range chunks
    async with AsyncClient(server.grpc_address, max_io=MiB) as c:
        vol = c.volume("ram")
        end = 64 * MiB // 512
        start = end - 3 * MiB // 512  # 3 MiB in range, then 1 MiB past the end
        with pytest.raises(OutOfRange, match=rf"\[{start}, {end + 2048}\)") as info:
            await vol.write(start, b"\xaa" * (4 * MiB))
        assert info.value.volume == "ram"
        assert await vol.allocation(start, end - start) == [
            AllocationExtent(start, end - start, -1)
        ]
        assert await vol.read(start, end - start) == bytes(3 * MiB)


async def test_a_split_read_past_the_end_fails_naming_the_whole_range(server: Server) -> None:
    async with AsyncClient(server.grpc_address, max_io=MiB) as c:
        vol = c.volume("ram")
        huge = 1 << 50  # sectors: 512 PiB, a buffer no machine could allocate
        with pytest.raises(OutOfRange, match=rf"\[0, {huge}\)"):
            await vol.read(0, huge)
        with pytest.raises(OutOfRange):
            await vol.read(0, huge, report_presence=True)
        near_end = 64 * MiB // 512 - 8
        for read_into in (vol.read_into, vol.read_present_into):
            # the chunks go out without a size check first; the error still names the whole
            # range the caller asked for, not the chunk the server refused
            with pytest.raises(OutOfRange, match=rf"\[{near_end}, {near_end + 4096}\)"):
                await read_into(near_end, bytearray(2 * MiB))
        with pytest.raises(OutOfRange):
            async for _ in vol.stream_read(64 * MiB // 512 - 8, 4096):
                pytest.fail("a chunk of a range that reaches past the end was yielded")


@pytest.mark.parametrize("op", ["write", "unmap", "resize"])
async def test_read_only_volume(client: AsyncClient, op: str) -> None:
    vol = client.volume("ro")
    with pytest.raises(ReadOnlyVolume, match="read-only") as info:
        if op == "write":
            await vol.write(0, bytes(512))
        elif op == "unmap":
            await vol.unmap(0, 1)
        else:
            await vol.resize(10)
    assert isinstance(info.value, FailedPrecondition)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION


async def test_invalid_argument(client: AsyncClient) -> None:
    with pytest.raises(InvalidArgument, match="at least one sector"):
        await client.volume("ram").resize(0)
    with pytest.raises(InvalidArgument):
        await client.volume("").info()


async def test_deadline_exceeded(client: AsyncClient) -> None:
    with pytest.raises(DeadlineExceeded):
        await client.volume("ram").read(0, 16 * MiB // 512, timeout=1e-4)


async def test_unavailable_when_nothing_listens() -> None:
    async with AsyncClient("127.0.0.1:1", retries=2, backoff=0.01) as c:
        start = time.monotonic()
        with pytest.raises(Unavailable) as info:
            await c.volume("v").info()
        assert time.monotonic() - start < 10
        assert info.value.volume == "v"


HALF_A_KEY_PAIR = """
import asyncio, sys
from tierdisk.client import AsyncClient, Client, TierdiskError
pem = "-----BEGIN {0}-----\\nAAAA\\n-----END {0}-----\\n"
halves = [{"certificate_chain": pem.format("CERTIFICATE").encode()},
          {"private_key": pem.format("PRIVATE KEY").encode()}]

async def use_async(options):
    async with AsyncClient(sys.argv[1], retries=0, **options) as client:
        await client.volume("v").info()

def use_blocking(options):
    with Client(sys.argv[1], retries=0, **options) as client:
        client.volume("v").info()

for options in halves:
    for use in (lambda: asyncio.run(use_async(options)), lambda: use_blocking(options)):
        try:
            use()
        except ValueError as exc:
            print("ValueError:", exc, flush=True)
        except TierdiskError as exc:
            print("accepted:", type(exc).__name__, flush=True)
"""
"""A program that gives the clients a certificate without its key, then a key without its
certificate, and prints what each did (in a child process: gRPC's C core aborts the
process it runs in, given half a pair)."""


def test_a_client_certificate_without_its_key_is_a_value_error() -> None:
    """``AsyncClient`` and ``Client`` refuse half a key pair with a ValueError naming both
    arguments, before gRPC sees it (its C core would abort the host process)."""
    done = subprocess.run(
        [sys.executable, "-c", HALF_A_KEY_PAIR, "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    cert, key = "certificate_chain without private_key", "private_key without certificate_chain"
    assert (
        done.stdout.splitlines()
        == [f"ValueError: {cert}: a client certificate goes with its key"] * 2
        + [f"ValueError: {key}: a client certificate goes with its key"] * 2
    )


async def test_a_grpc_server_that_is_not_tierdisk_is_named_as_such() -> None:
    """A gRPC server serving only the health service answers UNIMPLEMENTED: the error names
    the server and the method, not the volume, and is not retried."""
    other = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), other)
    port = other.add_insecure_port("127.0.0.1:0")
    await other.start()
    target = f"127.0.0.1:{port}"
    try:
        async with AsyncClient(target, retries=3) as c:
            with pytest.raises(Unimplemented) as info:
                await c.list_volumes()
            assert str(info.value) == (
                f"the server at {target} does not serve tierdisk.v1.BlockDevice, or is too "
                "old for ListVolumes (UNIMPLEMENTED: Method not found!)"
            )
            assert (info.value.target, info.value.method) == (target, "ListVolumes")
            assert info.value.code == grpc.StatusCode.UNIMPLEMENTED
            vol = c.volume("x")
            calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
                ("GetVolume", vol.info),
                ("GetVolume", lambda: vol.read(0, 1)),  # asks for the sector size first
                ("GetAllocation", lambda: vol.allocation(0, 8)),
                ("Unmap", lambda: vol.unmap(0, 8)),
                ("Flush", vol.flush),
                ("WatchResize", lambda: anext(vol.watch_resize())),
            ]
            for method, call in calls:
                with pytest.raises(Unimplemented, match=f"too old for {method} ") as info:
                    await call()
                assert (info.value.volume, info.value.target) == (None, target)
    finally:
        await other.stop(0)


async def test_unavailable_while_draining_is_retried_then_raised(tmp_path: Path) -> None:
    async with running_server(tmp_path, FOUR_VOLUMES) as srv:
        async with AsyncClient(srv.grpc_address, retries=2, backoff=0.01) as c:
            await c.volume("ram").info()
            await srv.gate.drain(1)
            with pytest.raises(Unavailable, match="shutting down"):
                await c.volume("ram").info()


# -- the blocking client ---------------------------------------------------------------


async def test_blocking_client(server: Server) -> None:
    def use() -> None:
        with Client(server.grpc_address) as c:
            assert "ram" in [v.name for v in c.list_volumes()]
            vol = c.volume("ram")
            data = os.urandom(3 * MiB)
            vol.write(0, data)
            assert vol.read(0, len(data) // 512) == data
            assert vol.read(0, 4, report_presence=True).present == (Extent(0, 4),)
            buf = bytearray(8 * 512)
            assert vol.read_present_into(0, buf) == [Extent(0, 8)]
            assert buf == data[: 8 * 512]
            assert vol.allocation(0, 8)[0] == AllocationExtent(0, 8, 0)
            vol.flush()
            vol.unmap(0, 1)
            assert vol.inspect()["name"] == "ram"
            watch = vol.watch_resize()
            assert next(watch).sector_count == 64 * MiB // 512
            assert vol.resize(4096).sector_count == 4096
            assert next(watch).sector_count == 4096
            watch.close()
            with pytest.raises(ReadOnlyVolume):
                c.volume("ro").write(0, bytes(512))

    await asyncio.to_thread(use)  # the in-process server runs on this test's loop


# -- retries across a restart ----------------------------------------------------------


@dataclass(frozen=True)
class CountingPolicy(RetryPolicy):
    """A retry policy that counts the waits it hands out (one per retry)."""

    counter: list[int] = field(default_factory=list)

    @property
    def waits(self) -> int:
        return len(self.counter)

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        self.counter.append(attempt)
        return super().delay(attempt, rng)


PERSISTENT = """
[[volumes]]
name = "disk"
  [[volumes.layers]]
  kind = "raw"
  path = "disk.img"
  size = "8MiB"
"""


async def test_retries_ride_out_a_server_restart_on_the_same_port(tmp_path: Path) -> None:
    port = free_port()
    listen = f"127.0.0.1:{port}"
    config = write_config(tmp_path, PERSISTENT)
    first = ServerProcess.start(tmp_path, config, listen=listen)
    second: list[ServerProcess] = []
    try:
        async with AsyncClient(listen) as c:
            c.policy = policy = CountingPolicy(retries=30, backoff=0.05, max_backoff=0.5)
            vol = c.volume("disk")
            before = os.urandom(MiB)
            await vol.write(0, before)

            def restart() -> None:
                assert first.terminate() == 0
                time.sleep(0.3)  # a window with nothing listening on the port
                second.append(ServerProcess.start(tmp_path, config, listen=listen))

            restarter = threading.Thread(target=restart)
            restarter.start()
            # keep working through the restart: every call must succeed
            written: dict[int, bytes] = {}
            deadline = time.monotonic() + 60
            i = 0
            while (restarter.is_alive() or i < 40) and time.monotonic() < deadline:
                chunk = os.urandom(64 * 1024)
                sector = 2048 + (i % 64) * 128
                await vol.write(sector, chunk)
                written[sector] = chunk
                assert await vol.read(sector, 128) == chunk
                i += 1
                await asyncio.sleep(0.01)
            await asyncio.to_thread(restarter.join)
            assert second, "the server did not come back"
            assert second[0].pid != first.pid
            assert policy.waits > 0, "no call met the restart: nothing was retried"
            assert await vol.read(0, MiB // 512) == before
            for sector, chunk in written.items():
                assert await vol.read(sector, 128) == chunk
    finally:
        for proc in (first, *second):
            proc.__exit__(None, None, None)  # SIGKILL by PID if still running, close pipes


# -- a server that answers the wrong thing -------------------------------------------------


class _WrongSizeReads:
    """GetVolume answers a 512-byte-sector volume; Read answers one sector too few, or (with
    ``garbage``) a reply with other fields and the wrong size."""

    def __init__(self) -> None:
        self.garbage = False

    async def get_volume(self, request: pb.GetVolumeRequest, context: object) -> pb.Volume:
        return pb.Volume(
            name=request.volume, sector_size=512, sector_count=1 << 20, physical_sector_size=512
        )

    async def read(self, request: pb.ReadRequest, context: object) -> pb.ReadResponse:
        if self.garbage:
            return pb.ReadResponse(data=b"x", present=[pb.Extent(sector=0, sector_count=1)])
        return pb.ReadResponse(data=bytes((request.sector_count - 1) * 512))

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "tierdisk.v1.BlockDevice",
            {
                "GetVolume": grpc.unary_unary_rpc_method_handler(
                    self.get_volume, pb.GetVolumeRequest.FromString, pb.Volume.SerializeToString
                ),
                "Read": grpc.unary_unary_rpc_method_handler(
                    self.read, pb.ReadRequest.FromString, pb.ReadResponse.SerializeToString
                ),
            },
        )


async def test_a_read_reply_of_the_wrong_size_is_a_storage_error() -> None:
    server = grpc.aio.server()
    servicer = _WrongSizeReads()
    server.add_generic_rpc_handlers((servicer.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with AsyncClient(f"127.0.0.1:{port}", retries=0) as client:
            vol = client.volume("v")
            with pytest.raises(StorageError, match="returned 3584 bytes for 8 sectors"):
                await vol.read(0, 8)
            with pytest.raises(StorageError, match="returned 3584 bytes for 8 sectors"):
                await vol.read_into(0, bytearray(8 * 512))
            servicer.garbage = True  # a reply with other fields goes through protobuf
            with pytest.raises(StorageError, match="returned 1 bytes for 8 sectors"):
                await vol.read(0, 8)
            with pytest.raises(StorageError, match="returned 1 bytes for 8 sectors"):
                await vol.read(0, 8, report_presence=True)
    finally:
        await server.stop(0)
