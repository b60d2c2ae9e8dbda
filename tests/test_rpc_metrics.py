"""The ``grpc_server_*`` families of a real server (service/rpc_metrics.py): every service it
registers is counted, each call once, by method, type and status code."""

from __future__ import annotations

import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from servers import metric, ram, running_server, toml_volume

from tierdisk.service.metrics import Metrics
from tierdisk.service.registry import VolumeRegistry
from tierdisk.service.rpc_metrics import InstrumentedRegistry
from tierdisk.service.server import Server
from tierdisk.v1 import blockdevice_pb2 as pb
from tierdisk.v1 import blockdevice_pb2_grpc as pb_grpc

STACK = toml_volume("disk", ram("1MiB"))


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with running_server(tmp_path, STACK) as srv:
        yield srv


def sample(server: Server, name: str, service: str, method: str, **labels: str) -> float:
    return metric(server, name, grpc_service=service, grpc_method=method, **labels)


BLOCK = "tierdisk.v1.BlockDevice"
HEALTH = "grpc.health.v1.Health"


async def test_each_call_counted_once_by_code(server: Server) -> None:
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.BlockDeviceStub(channel)
        for _ in range(3):
            await stub.Read(pb.ReadRequest(volume="disk", sector=0, sector_count=8))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Read(pb.ReadRequest(volume="nope", sector=0, sector_count=8))
        await stub.Write(pb.WriteRequest(volume="disk", sector=0, data=bytes(512)))
    unary = {"grpc_type": "unary"}
    assert sample(server, "grpc_server_started_total", BLOCK, "Read", **unary) == 4
    assert sample(server, "grpc_server_handled_total", BLOCK, "Read", **unary, grpc_code="OK") == 3
    assert (
        sample(server, "grpc_server_handled_total", BLOCK, "Read", **unary, grpc_code="NOT_FOUND")
        == 1
    )
    assert sample(server, "grpc_server_handling_seconds_count", BLOCK, "Read", **unary) == 4
    assert sample(server, "grpc_server_handled_total", BLOCK, "Write", **unary, grpc_code="OK") == 1


async def test_messages_received_and_sent_per_unary_call(server: Server) -> None:
    """go-grpc-prometheus: a unary call receives 1 message, and sends 1 when it ends OK."""
    calls = 5
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.BlockDeviceStub(channel)
        for _ in range(calls):
            await stub.Read(pb.ReadRequest(volume="disk", sector=0, sector_count=8))
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Write(pb.WriteRequest(volume="nope", sector=0, data=bytes(512)))
    unary = {"grpc_type": "unary"}
    assert sample(server, "grpc_server_msg_received_total", BLOCK, "Read", **unary) == calls
    assert sample(server, "grpc_server_msg_sent_total", BLOCK, "Read", **unary) == calls
    assert sample(server, "grpc_server_msg_received_total", BLOCK, "Write", **unary) == 2
    assert sample(server, "grpc_server_msg_sent_total", BLOCK, "Write", **unary) == 0


async def test_messages_of_a_server_stream(server: Server) -> None:
    """WatchResize: 1 request received, one message sent per event (current size + 2)."""
    stream_labels = {"grpc_type": "server_stream"}
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.BlockDeviceStub(channel)
        watch = stub.WatchResize(pb.WatchResizeRequest(volume="disk"))

        async def event() -> int:
            message = await watch.read()
            assert isinstance(message, pb.ResizeEvent)
            return message.sector_count

        sizes = [await event()]
        for count in (4096, 8192):
            await stub.Resize(pb.ResizeRequest(volume="disk", sector_count=count))
            sizes.append(await event())
        assert sizes == [2048, 4096, 8192]
        assert (
            sample(server, "grpc_server_msg_sent_total", BLOCK, "WatchResize", **stream_labels) == 3
        )
        watch.cancel()
    assert sample(server, "grpc_server_started_total", BLOCK, "WatchResize", **stream_labels) == 1
    assert (
        sample(server, "grpc_server_msg_received_total", BLOCK, "WatchResize", **stream_labels) == 1
    )


async def test_health_and_reflection_are_counted_too(server: Server) -> None:
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = reflect.ServerReflectionInfo()
        for _ in range(2):  # a bidi stream: each request message and each reply counted
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            listed = await call.read()
            names = {s.name for s in listed.list_services_response.service}
            assert BLOCK in names
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
    assert (
        sample(
            server, "grpc_server_handled_total", HEALTH, "Check", grpc_type="unary", grpc_code="OK"
        )
        == 1
    )
    assert (
        sample(server, "grpc_server_started_total", HEALTH, "Watch", grpc_type="server_stream") == 1
    )
    assert (
        sample(server, "grpc_server_msg_sent_total", HEALTH, "Watch", grpc_type="server_stream")
        >= 1
    )
    bidi = {"grpc_type": "bidi_stream"}
    reflection = "grpc.reflection.v1alpha.ServerReflection"
    info = "ServerReflectionInfo"
    assert sample(server, "grpc_server_started_total", reflection, info, **bidi) == 1
    assert sample(server, "grpc_server_msg_received_total", reflection, info, **bidi) == 2
    assert sample(server, "grpc_server_msg_sent_total", reflection, info, **bidi) == 2
    assert (
        sample(server, "grpc_server_handled_total", reflection, info, **bidi, grpc_code="OK") == 1
    )


async def test_an_unknown_method_is_unimplemented_and_not_counted(server: Server) -> None:
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/tierdisk.v1.BlockDevice/NoSuchMethod"
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(b"")
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert (
        sample(server, "grpc_server_started_total", BLOCK, "NoSuchMethod", grpc_type="unary") == 0
    )


async def test_made_up_method_names_are_not_remembered(server: Server) -> None:
    """gRPC asks every registered handler about each method a caller names; the names no
    handler serves (any caller can make up endless ones) must not be kept: memory held for
    them grew by ~4 KiB per name, for good (250 MiB after 60,000)."""
    names = 2_000
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        tracemalloc.start()
        try:
            before = _held_by_rpc_metrics()
            for i in range(names):
                call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                    f"/tierdisk.v1.BlockDevice/MadeUp{i}"
                )
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call(b"")
                assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            grown = _held_by_rpc_metrics() - before
        finally:
            tracemalloc.stop()
    assert grown < 16 * names // 10, f"{grown} bytes kept for {names} made-up method names"


def _held_by_rpc_metrics() -> int:
    """Bytes allocated by service/rpc_metrics.py and still held (tracemalloc)."""
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(True, "*/service/rpc_metrics.py")]
    )
    return sum(stat.size for stat in snapshot.statistics("filename"))


async def test_handlers_registered_only_as_generic_are_counted() -> None:
    """A service that registers a generic handler alone (no registered methods)."""
    metrics = Metrics(VolumeRegistry([]))
    server = grpc.aio.server()

    async def say(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        if request == b"no":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")
        return request[::-1]

    async def count(requests: object, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        """A client stream read with context.read() (not by iterating the requests)."""
        n = 0
        message: object = await context.read()
        while message is not grpc.aio.EOF:
            n += 1
            message = await context.read()
        return str(n).encode()

    InstrumentedRegistry(server, metrics).add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Echo",
                {
                    "Say": grpc.unary_unary_rpc_method_handler(say),
                    "Count": grpc.stream_unary_rpc_method_handler(count),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                "/test.Echo/Say"
            )
            assert await call(b"abc") == b"cba"
            assert await call(b"xy") == b"yx"
            with pytest.raises(grpc.aio.AioRpcError):
                await call(b"no")
            counting: grpc.aio.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(
                "/test.Echo/Count"
            )
            assert await counting(iter([b"a", b"b", b"c"])) == b"3"
    finally:
        await server.stop(0)
    registry = metrics.registry
    labels = {"grpc_type": "unary", "grpc_service": "test.Echo", "grpc_method": "Say"}
    assert registry.get_sample_value("grpc_server_started_total", labels) == 3
    assert (
        registry.get_sample_value("grpc_server_handled_total", {**labels, "grpc_code": "OK"}) == 2
    )
    assert (
        registry.get_sample_value(
            "grpc_server_handled_total", {**labels, "grpc_code": "PERMISSION_DENIED"}
        )
        == 1
    )
    assert registry.get_sample_value("grpc_server_msg_received_total", labels) == 3
    assert registry.get_sample_value("grpc_server_msg_sent_total", labels) == 2  # the OK ones
    client = {"grpc_type": "client_stream", "grpc_service": "test.Echo", "grpc_method": "Count"}
    assert registry.get_sample_value("grpc_server_started_total", client) == 1
    assert registry.get_sample_value("grpc_server_msg_received_total", client) == 3
    assert registry.get_sample_value("grpc_server_msg_sent_total", client) == 1
