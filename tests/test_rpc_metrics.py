"""The ``grpc_server_*`` families of a real server (service/rpc_metrics.py): every service it
registers is counted, each call once, by method, type and status code."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from servers import metric, ram, running_server, toml_volume

from tierdisk.service.metrics import Metrics
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
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        listed = await call.read()
        await call.done_writing()
        names = {s.name for s in listed.list_services_response.service}
        assert BLOCK in names
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


async def test_handlers_registered_only_as_generic_are_counted() -> None:
    """A service that registers a generic handler alone (no registered methods)."""
    metrics = Metrics(lambda: [])
    server = grpc.aio.server()

    async def say(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        if request == b"no":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")
        return request[::-1]

    InstrumentedRegistry(server, metrics).add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Echo", {"Say": grpc.unary_unary_rpc_method_handler(say)}
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
