"""The gRPC server against raw generated stubs: every RPC, the status table, limits,
concurrency, WatchResize and health (DESIGN.md §2)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servers import (
    FOUR_VOLUMES,
    FRAGMENT,
    FRAGMENT_GAP,
    fragmented_extents,
    fragmented_server,
    running_server,
    tree_of,
)
from waiting import eventually

from tierdisk.service import server as server_module
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
    options = [
        ("grpc.max_receive_message_length", 64 * MiB),
        ("grpc.max_send_message_length", 64 * MiB),
    ]
    async with grpc.aio.insecure_channel(server.grpc_address, options=options) as channel:
        yield pb_grpc.BlockDeviceStub(channel)


async def _code(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value.code(), info.value.details() or ""


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(256)) * (n // 256)


async def test_list_volumes_pages(stub: pb_grpc.BlockDeviceAsyncStub) -> None:
    reply = await stub.ListVolumes(pb.ListVolumesRequest())
    assert [v.name for v in reply.volumes] == ["ram", "stack", "ro", "big4k"]
    assert reply.next_page_token == ""
    for size, pages in [(3, 2), (2, 2), (1, 4), (4, 1)]:
        names, token, calls = [], "", 0
        while calls < 10:
            page = await stub.ListVolumes(pb.ListVolumesRequest(page_size=size, page_token=token))
            calls += 1
            assert len(page.volumes) <= size
            names += [v.name for v in page.volumes]
            token = page.next_page_token
            if not token:
                break
        # the last page has no token: no empty page to ask for after it
        assert (names, calls) == (["ram", "stack", "ro", "big4k"], pages)
    code, details = await _code(stub.ListVolumes(pb.ListVolumesRequest(page_token="%%%")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in details


async def test_a_page_carries_at_most_the_servers_cap(
    stub: pb_grpc.BlockDeviceAsyncStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever ``page_size`` asks (up to 2**32 - 1), a page carries at most the server's
    cap (1,000 volumes; 3 here), and says where to go on."""
    monkeypatch.setattr("tierdisk.service.grpc_api._MAX_PAGE", 3)
    page = await stub.ListVolumes(pb.ListVolumesRequest(page_size=2**32 - 1))
    assert [v.name for v in page.volumes] == ["ram", "stack", "ro"] and page.next_page_token


async def test_get_volume_geometry(stub: pb_grpc.BlockDeviceAsyncStub) -> None:
    v = await stub.GetVolume(pb.GetVolumeRequest(volume="stack"))
    assert (v.name, v.sector_size, v.sector_count) == ("stack", 512, 8 * MiB // 512)
    assert v.fua_respected and not v.read_only
    assert v.unmap_behavior == pb.UNMAP_BEHAVIOR_ZEROES
    assert (await stub.GetVolume(pb.GetVolumeRequest(volume="ro"))).read_only
    assert (await stub.GetVolume(pb.GetVolumeRequest(volume="big4k"))).sector_size == 4096


async def test_write_read_presence_allocation_unmap(stub: pb_grpc.BlockDeviceAsyncStub) -> None:
    data = _pattern(4096, 3)
    await stub.Write(pb.WriteRequest(volume="ram", sector=8, data=data, fua=True))
    reply = await stub.Read(
        pb.ReadRequest(volume="ram", sector=0, sector_count=24, report_presence=True)
    )
    assert reply.data == bytes(4096) + data + bytes(4096)
    assert [(e.sector, e.sector_count) for e in reply.present] == [(8, 8)]
    for count in (24, 4096):  # a small reply and a large one (framed in place)
        plain = await stub.Read(pb.ReadRequest(volume="ram", sector=0, sector_count=count))
        assert plain.data[: 24 * 512] == reply.data and not plain.present  # only when asked
    alloc = await stub.GetAllocation(
        pb.GetAllocationRequest(volume="ram", sector=4, sector_count=16)
    )
    assert [(e.sector, e.sector_count, e.depth) for e in alloc.extents] == [
        (4, 4, -1),
        (8, 8, 0),
        (16, 4, -1),
    ]
    await stub.Unmap(pb.UnmapRequest(volume="ram", sector=10, sector_count=2))
    reply = await stub.Read(pb.ReadRequest(volume="ram", sector=8, sector_count=8))
    assert reply.data == data[:1024] + bytes(1024) + data[2048:]
    await stub.Flush(pb.FlushRequest(volume="ram"))


async def test_stack_reads_through_and_caches(stub: pb_grpc.BlockDeviceAsyncStub) -> None:
    await stub.Read(pb.ReadRequest(volume="stack", sector=0, sector_count=16))
    await stub.Read(pb.ReadRequest(volume="stack", sector=0, sector_count=16))
    tree = tree_of(await stub.Inspect(pb.InspectRequest(volume="stack")))
    top, base = tree["layers"][0], tree["layers"][1]
    assert top["kind"] == "ram" and base["kind"] == "raw"
    assert top["counters"]["cache_misses"] == 16 and top["counters"]["cache_hits"] == 16
    assert base["counters"]["read_sectors"] == 16
    assert top["present_sectors"] == 16
    alloc = await stub.GetAllocation(
        pb.GetAllocationRequest(volume="stack", sector=0, sector_count=32)
    )
    assert [(e.sector, e.sector_count, e.depth) for e in alloc.extents] == [(0, 16, 0), (16, 16, 1)]


async def test_inspect_path_selects_subtree(stub: pb_grpc.BlockDeviceAsyncStub) -> None:
    tree = tree_of(await stub.Inspect(pb.InspectRequest(volume="stack", path="layers/1")))
    assert tree["kind"] == "raw" and tree["index"] == 1 and tree["path"].endswith("base.img")
    leaf = await stub.Inspect(pb.InspectRequest(volume="stack", path="layers/1/sector_count"))
    assert tree_of(leaf)["value"] == 8 * MiB // 512
    code, details = await _code(stub.Inspect(pb.InspectRequest(volume="stack", path="layers/9")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "layers/9" in details


@pytest.mark.parametrize(
    ("request_", "code", "fragment"),
    [
        (
            pb.ReadRequest(volume="nope", sector=0, sector_count=1),
            grpc.StatusCode.NOT_FOUND,
            "nope",
        ),
        (
            pb.ReadRequest(volume="", sector=0, sector_count=1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "names no volume",
        ),
        (
            pb.ReadRequest(volume="ro", sector=2047, sector_count=2),
            grpc.StatusCode.OUT_OF_RANGE,
            "past its end",
        ),
        (  # an empty range is named as the one sector it starts at
            pb.ReadRequest(volume="ro", sector=2049, sector_count=0),
            grpc.StatusCode.OUT_OF_RANGE,
            "sector 2049 is past its end (2048 sectors",
        ),
        (
            pb.WriteRequest(volume="ram", sector=0, data=b"x" * 100),
            grpc.StatusCode.INVALID_ARGUMENT,
            "whole number",
        ),
        (
            pb.WriteRequest(volume="ro", sector=0, data=bytes(512)),
            grpc.StatusCode.FAILED_PRECONDITION,
            "read-only",
        ),
        (
            pb.UnmapRequest(volume="ro", sector=0, sector_count=1),
            grpc.StatusCode.FAILED_PRECONDITION,
            "read-only",
        ),
        (
            pb.ResizeRequest(volume="ro", sector_count=10),
            grpc.StatusCode.FAILED_PRECONDITION,
            "read-only",
        ),
        (
            pb.ResizeRequest(volume="ram", sector_count=0),
            grpc.StatusCode.INVALID_ARGUMENT,
            "at least one sector",
        ),
        (
            pb.UnmapRequest(volume="ram", sector=131071, sector_count=5),
            grpc.StatusCode.OUT_OF_RANGE,
            "past its end",
        ),
        (
            pb.GetAllocationRequest(volume="ram", sector=1 << 40, sector_count=1),
            grpc.StatusCode.OUT_OF_RANGE,
            "past its end",
        ),
    ],
)
async def test_status_codes(
    stub: pb_grpc.BlockDeviceAsyncStub, request_: object, code: grpc.StatusCode, fragment: str
) -> None:
    method: Any = {
        pb.ReadRequest: stub.Read,
        pb.WriteRequest: stub.Write,
        pb.UnmapRequest: stub.Unmap,
        pb.ResizeRequest: stub.Resize,
        pb.GetAllocationRequest: stub.GetAllocation,
    }[type(request_)]
    got, details = await _code(method(request_))
    assert got == code
    assert fragment in details


async def test_error_carries_domain_class(stub: pb_grpc.BlockDeviceAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Write(pb.WriteRequest(volume="ro", sector=0, data=bytes(512)))
    assert ("tierdisk-error", "ReadOnlyError") in tuple(info.value.trailing_metadata() or ())


async def test_out_of_range_write_changes_nothing(stub: pb_grpc.BlockDeviceAsyncStub) -> None:
    last = 64 * MiB // 512 - 1
    await _code(stub.Write(pb.WriteRequest(volume="ram", sector=last, data=b"z" * 1024)))
    reply = await stub.Read(pb.ReadRequest(volume="ram", sector=last, sector_count=1))
    assert reply.data == bytes(512)


async def test_io_at_the_limit_and_over_it(stub: pb_grpc.BlockDeviceAsyncStub) -> None:
    limit = 16 * MiB
    data = os.urandom(limit)
    await stub.Write(pb.WriteRequest(volume="ram", sector=0, data=data))
    reply = await stub.Read(pb.ReadRequest(volume="ram", sector=0, sector_count=limit // 512))
    assert reply.data == data
    code, details = await _code(
        stub.Write(pb.WriteRequest(volume="ram", sector=0, data=data + bytes(512)))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and str(limit) in details
    code, details = await _code(
        stub.Read(pb.ReadRequest(volume="ram", sector=0, sector_count=limit // 512 + 1))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_io" in details


async def test_an_allocation_over_one_reply_is_refused_with_the_limit(tmp_path: Path) -> None:
    """A GetAllocation reply must cover its whole range (DESIGN §2): one with more extents
    than a reply may carry (max_io bytes) is refused INVALID_ARGUMENT, saying so (not
    RESOURCE_EXHAUSTED from the transport, which reads as "out of space"); half the range
    is answered whole."""
    whole = fragmented_extents()
    end = whole[-1][0] + whole[-1][1]
    async with fragmented_server(tmp_path) as srv:
        options = [("grpc.max_receive_message_length", 64 * MiB)]
        async with grpc.aio.insecure_channel(srv.grpc_address, options=options) as channel:
            stub = pb_grpc.BlockDeviceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetAllocation(pb.GetAllocationRequest(volume="frag", sector_count=end))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details() == (
                f"volume 'frag': the allocation of sectors [0, {end}) has {len(whole)} extents, "
                f"more than one reply carries (at most {MiB} bytes, this server's max_io); "
                "ask for a smaller range"
            )
            trailer = tuple(info.value.trailing_metadata() or ())
            assert ("tierdisk-error", "AllocationTooLarge") in trailer
            half = end // 2
            reply = await stub.GetAllocation(
                pb.GetAllocationRequest(volume="frag", sector_count=half)
            )
            assert 0.5 * MiB < reply.ByteSize() <= MiB
            runs = [(e.sector, e.sector_count, e.depth) for e in reply.extents]
            assert runs == [*(r for r in whole if r[0] + r[1] < half), (FRAGMENT, FRAGMENT_GAP, 0)]


async def test_concurrent_clients(server: Server) -> None:
    async def client(n: int) -> None:
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            s = pb_grpc.BlockDeviceStub(channel)
            for round_ in range(10):
                data = bytes([n * 16 + round_]) * 4096
                await s.Write(pb.WriteRequest(volume="ram", sector=n * 8, data=data))
                got = await s.Read(pb.ReadRequest(volume="ram", sector=n * 8, sector_count=8))
                assert got.data == data

    await asyncio.gather(*(client(n) for n in range(8)))


async def _next_event(call: Any) -> pb.ResizeEvent:
    event = await call.read()
    assert isinstance(event, pb.ResizeEvent)
    return event


async def test_watch_resize_sees_every_change(stub: pb_grpc.BlockDeviceAsyncStub) -> None:
    call = stub.WatchResize(pb.WatchResizeRequest(volume="ram"))
    first = await call.read()
    assert isinstance(first, pb.ResizeEvent)
    assert first.sector_count == 64 * MiB // 512
    sizes = [1000, 2000, 500, 131072]
    for size in sizes:
        volume = await stub.Resize(pb.ResizeRequest(volume="ram", sector_count=size))
        assert volume.sector_count == size
    events = [await _next_event(call) for _ in sizes]
    assert [e.sector_count for e in events] == sizes
    generations = [first.generation] + [e.generation for e in events]
    assert generations == sorted(set(generations))
    call.cancel()
    assert (await stub.GetVolume(pb.GetVolumeRequest(volume="ram"))).sector_count == 131072


async def test_a_watch_that_goes_away_leaves_nothing_waiting(
    stub: pb_grpc.BlockDeviceAsyncStub,
) -> None:
    """Watchers that cancel (a deadline, a remote layer reconnecting, a dropped connection)
    leave no task in the server waiting for the volume's next resize: on a volume never
    resized those piled up, one per watch."""

    def waiting() -> int:
        return sum(
            1
            for task in asyncio.all_tasks()
            if "resize_events" in repr(task.get_coro()) and not task.done()
        )

    before = waiting()
    for _ in range(20):
        call = stub.WatchResize(pb.WatchResizeRequest(volume="ram"))
        await call.read()
        call.cancel()
    assert await eventually("the watches' waits to end", lambda: waiting() == before or None, 5)


async def test_shrink_then_grow_reads_zeros(stub: pb_grpc.BlockDeviceAsyncStub) -> None:
    await stub.Write(pb.WriteRequest(volume="stack", sector=100, data=b"q" * 512))
    await stub.Resize(pb.ResizeRequest(volume="stack", sector_count=50))
    await stub.Resize(pb.ResizeRequest(volume="stack", sector_count=200))
    reply = await stub.Read(pb.ReadRequest(volume="stack", sector=40, sector_count=80))
    assert reply.data == bytes(80 * 512)


async def test_a_burst_of_thousands_of_calls_is_served(
    stub: pb_grpc.BlockDeviceAsyncStub,
) -> None:
    """3,000 small reads at once on one connection all succeed (gRPC's default of 1,000
    pending calls per server cancelled the rest: CANCELLED with nothing in the log)."""

    async def one(i: int) -> grpc.StatusCode:
        try:
            await stub.Read(pb.ReadRequest(volume="ram", sector=i % 1000, sector_count=1))
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    codes = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(3000))), 120)
    assert set(codes) == {grpc.StatusCode.OK}


async def test_idle_watch_survives_keepalive_pings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that pings an idle connection no more often than the server allows keeps
    its WatchResize stream: the server must not end it with "too many pings". (Scaled down:
    the server accepts pings 0.3 s apart here and the client pings every 0.4 s; the real
    figures are 10 s and 15-30 s.)"""
    monkeypatch.setattr(server_module, "MIN_PING_INTERVAL_MS", 300)
    options = [
        ("grpc.keepalive_time_ms", 400),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    async with running_server(tmp_path, FOUR_VOLUMES) as srv:
        async with grpc.aio.insecure_channel(srv.grpc_address, options=options) as channel:
            stub = pb_grpc.BlockDeviceStub(channel)
            call = stub.WatchResize(pb.WatchResizeRequest(volume="ram"))
            assert isinstance(await call.read(), pb.ResizeEvent)
            await asyncio.sleep(4)  # ~10 pings; a server refusing them ends the call after 3
            await stub.Resize(pb.ResizeRequest(volume="ram", sector_count=4096))
            assert (await asyncio.wait_for(_next_event(call), 10)).sector_count == 4096
            call.cancel()


def test_clients_ping_no_more_often_than_the_server_allows() -> None:
    from tierdisk.client.channel import DEFAULT_CHANNEL_OPTIONS
    from tierdisk.service.layers.remote_connect import CHANNEL_OPTIONS

    for options in (DEFAULT_CHANNEL_OPTIONS, CHANNEL_OPTIONS):
        assert dict(options)["grpc.keepalive_time_ms"] >= server_module.MIN_PING_INTERVAL_MS


async def test_watch_unknown_volume(stub: pb_grpc.BlockDeviceAsyncStub) -> None:
    call = stub.WatchResize(pb.WatchResizeRequest(volume="nope"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("name", ["v" * 20_000, "é" * 10_000], ids=["ascii", "utf-8"])
async def test_a_very_long_unknown_name_is_not_found(
    stub: pb_grpc.BlockDeviceAsyncStub, name: str
) -> None:
    """The message names the volume asked for, cut short: all of a reply's headers must
    fit in 8 KiB, or the client would see RESOURCE_EXHAUSTED instead of NOT_FOUND."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Read(pb.ReadRequest(volume=name, sector=0, sector_count=1))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    details = info.value.details() or ""
    assert name[:100] in details and "…" in details and len(details.encode()) <= 1024


async def test_health_serving_then_not_serving_on_stop(tmp_path: Path) -> None:
    async with running_server(tmp_path, FOUR_VOLUMES) as srv:
        async with grpc.aio.insecure_channel(srv.grpc_address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "tierdisk.v1.BlockDevice"):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            stopping = asyncio.create_task(srv.stop(grace=5))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            await stopping


async def test_reflection_lists_services(server: Server) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await call.read()
        await call.done_writing()
        names = {s.name for s in reply.list_services_response.service}
        assert {"tierdisk.v1.BlockDevice", "grpc.health.v1.Health"} <= names


async def test_calls_after_drain_are_unavailable(tmp_path: Path) -> None:
    async with running_server(tmp_path, FOUR_VOLUMES) as srv:
        async with grpc.aio.insecure_channel(srv.grpc_address) as channel:
            s = pb_grpc.BlockDeviceStub(channel)
            await srv.gate.drain(1)
            code, details = await _code(s.GetVolume(pb.GetVolumeRequest(volume="ram")))
            assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details


async def test_out_of_space_is_resource_exhausted_and_changes_nothing(tmp_path: Path) -> None:
    from persistent_contract import tiny_filesystem

    with tiny_filesystem(tmp_path / "small", "1m") as small:
        body = (
            "[[volumes]]\nname = 'full'\n[[volumes.layers]]\nkind = 'sparse'\n"
            f"path = '{small / 'full'}'\nsize = '64MiB'\n"
        )
        async with running_server(tmp_path, body) as srv:
            async with grpc.aio.insecure_channel(
                srv.grpc_address, options=[("grpc.max_send_message_length", 64 * MiB)]
            ) as channel:
                s = pb_grpc.BlockDeviceStub(channel)
                data = b"\x5a" * (4 * MiB)  # more than the 1 MiB filesystem holds
                code, details = await _code(s.Write(pb.WriteRequest(volume="full", data=data)))
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "space" in details
                reply = await s.Read(
                    pb.ReadRequest(volume="full", sector=0, sector_count=8, report_presence=True)
                )
                assert reply.data == bytes(4096) and not reply.present


async def test_a_failing_device_is_internal_with_the_domain_class(tmp_path: Path) -> None:
    """The raw layer's file starts failing under a running server (its descriptor is made to
    point at a directory: every read is EISDIR): reads answer INTERNAL naming the file, the
    server keeps serving its other volumes."""
    from tierdisk.service.layers.raw import RawLayer

    body = (
        '[[volumes]]\nname = "disk"\n  [[volumes.layers]]\n  kind = "raw"\n'
        f'  path = "{tmp_path / "disk.img"}"\n  size = "1MiB"\n'
        '[[volumes]]\nname = "ok"\n  [[volumes.layers]]\n  kind = "ram"\n  size = "1MiB"\n'
    )
    async with running_server(tmp_path, body) as srv:
        layer = srv.registry.get("disk").entries[0].layer
        assert isinstance(layer, RawLayer)
        directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.dup2(directory, layer._fd)  # the same number, now a directory
        finally:
            os.close(directory)
        async with grpc.aio.insecure_channel(srv.grpc_address) as channel:
            stub = pb_grpc.BlockDeviceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Read(pb.ReadRequest(volume="disk", sector=0, sector_count=8))
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert "disk.img" in (info.value.details() or "")
            trailers = tuple(info.value.trailing_metadata() or ())
            assert ("tierdisk-error", "StorageError") in trailers
            reply = await stub.Read(pb.ReadRequest(volume="ok", sector=0, sector_count=8))
            assert reply.data == bytes(8 * 512)
        labels = {"volume": "disk", "op": "read", "code": "INTERNAL"}
        count = srv.metrics.registry.get_sample_value("tierdisk_volume_io_requests_total", labels)
        assert count == 1


async def test_malformed_write_request_is_invalid_argument(server: Server) -> None:
    """A Write whose bytes are not a WriteRequest is refused as INVALID_ARGUMENT (naming
    the problem, with the error class in the trailer), and writes nothing."""
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        write: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/tierdisk.v1.BlockDevice/Write"
        )
        good = pb.WriteRequest(volume="ram", sector=0, data=b"\x77" * 512).SerializeToString()
        truncated = good[:-10]  # the data field says 512 bytes; fewer follow
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await write(truncated)
        _assert_malformed(info.value, "WriteRequest")
        stub = pb_grpc.BlockDeviceStub(channel)
        reply = await stub.Read(pb.ReadRequest(volume="ram", sector=0, sector_count=1))
        assert reply.data == bytes(512)
        await write(good)  # the same request whole is fine
        reply = await stub.Read(pb.ReadRequest(volume="ram", sector=0, sector_count=1))
        assert reply.data == b"\x77" * 512


def _assert_malformed(err: grpc.aio.AioRpcError, message: str) -> None:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert f"malformed {message}" in (err.details() or "")
    assert dict(err.trailing_metadata() or ()).get("tierdisk-error") == "InvalidArgument"


@pytest.mark.parametrize(
    "method",
    [m.name for m in pb.DESCRIPTOR.services_by_name["BlockDevice"].methods],
)
async def test_every_method_answers_bytes_that_are_not_its_request_invalid_argument(
    server: Server, method: str
) -> None:
    """Not gRPC's UNKNOWN with a Python exception's text: the same answer as any bad
    input."""
    descriptor = pb.DESCRIPTOR.services_by_name["BlockDevice"].methods_by_name[method]
    raw = b"\x0a\x05ab"  # field 1 says 5 bytes follow; 2 do
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        path = f"/tierdisk.v1.BlockDevice/{method}"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            if descriptor.server_streaming:
                stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(path)
                async for _ in stream(raw, timeout=10):
                    pass
            else:
                call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
                await call(raw, timeout=10)
        _assert_malformed(info.value, descriptor.input_type.name)
