"""A request that fails leaves nothing for the cycle collector that holds its data.

An error raised in a frame whose locals (or a task they hold) refer back to the error is a
reference cycle: only Python's cycle collector frees it, and with it every frame of the
error's traceback and every buffer those frames hold. On a server that is a failed request's
data (a refused 60 MiB write, a reply buffer of up to ``max_io``) kept until a collection
runs: refused writes piled up to a gigabyte. Each test runs its failures with collection
off, then asks a collection what it would have freed: no frame of tierdisk's and no buffer
of the request's size may be among it."""

from __future__ import annotations

import asyncio
import errno
import gc
import types
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from servers import FOUR_VOLUMES, running_server, toml_volume

from tierdisk.client import AsyncClient
from tierdisk.client import errors as cerr
from tierdisk.service.errors import StorageError
from tierdisk.service.layers import raw as raw_module
from tierdisk.service.layers.ram import RamLayer
from tierdisk.v1 import blockdevice_pb2 as pb
from tierdisk.v1 import blockdevice_pb2_grpc as pb_grpc

MiB = 1 << 20


async def _left_for_the_collector(
    fail: Callable[[], Awaitable[None]],
) -> tuple[list[str], list[int]]:
    """Run ``fail`` once (what gRPC and the client set up on a first call), then twice with
    the cycle collector off; then what a collection finds unreachable: the frames of
    tierdisk's modules (by name) and the sizes of buffers of 1 MiB and more."""
    await fail()
    gc.collect()
    gc.disable()
    try:
        for _ in range(2):
            await fail()
        await asyncio.sleep(0.1)  # (the calls' done callbacks)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        garbage = list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    frames = [
        o.f_code.co_qualname
        for o in garbage
        if isinstance(o, types.FrameType) and o.f_globals["__name__"].startswith("tierdisk.")
    ]
    buffers = [
        len(o) for o in garbage if isinstance(o, bytes | bytearray | memoryview) and len(o) >= MiB
    ]
    return frames, buffers


async def _refused(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code()


async def test_refused_calls(tmp_path: Path) -> None:
    """Refused before any storage work (gRPC keeps each call's abort error, whose
    traceback's frames refer to the call): a Write to a read-only volume, one over
    ``max_io``, one past the end, a Read past the end."""
    options = [("grpc.max_send_message_length", 64 * MiB)]
    async with (
        running_server(tmp_path, FOUR_VOLUMES) as server,
        grpc.aio.insecure_channel(server.grpc_address, options=options) as channel,
    ):
        stub = pb_grpc.BlockDeviceStub(channel)
        past_end = pb.ReadRequest(volume="ram", sector=1 << 30, sector_count=8)

        async def refusals() -> None:
            writes = [
                pb.WriteRequest(volume="ro", sector=0, data=bytes(4 * MiB)),
                pb.WriteRequest(volume="ram", sector=0, data=bytes(20 * MiB)),
                pb.WriteRequest(volume="ram", sector=1 << 30, data=bytes(4 * MiB)),
            ]
            for request in writes:
                assert await _refused(stub.Write(request)) != grpc.StatusCode.OK
            assert await _refused(stub.Read(past_end)) == grpc.StatusCode.OUT_OF_RANGE

        assert await _left_for_the_collector(refusals) == ([], [])


async def test_a_batch_whose_read_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``ReadBatch`` of several ranges, one failing in storage after the others began:
    Python 3.11's task group keeps what it raises in a cycle with its frames (the reply
    buffer among them)."""
    read = RamLayer.read

    async def failing(self: RamLayer, buf: memoryview, sector: int) -> list[tuple[int, int]]:
        await asyncio.sleep(0)  # (the others start meanwhile)
        if sector >= 4096:
            raise StorageError("reading the test's layer: Input/output error")
        return await read(self, buf, sector)

    monkeypatch.setattr(RamLayer, "read", failing)
    async with (
        running_server(tmp_path, FOUR_VOLUMES) as server,
        grpc.aio.insecure_channel(server.grpc_address) as channel,
    ):
        stub = pb_grpc.BlockDeviceStub(channel)
        ranges = [pb.Extent(sector=s, sector_count=2048) for s in (0, 4096, 8192)]
        batch = pb.ReadBatchRequest(volume="ram", ranges=ranges)

        async def failure() -> None:
            assert await _refused(stub.ReadBatch(batch)) == grpc.StatusCode.INTERNAL

        assert await _left_for_the_collector(failure) == ([], [])


async def test_a_write_whose_disk_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write a ``raw`` layer's disk fails (the work a thread does runs to its end,
    :func:`~tierdisk.service.unstoppable.run_to_end`, whose task held the error)."""
    body = toml_volume("disk", {"kind": "raw", "path": "disk.img", "size": "8MiB"})

    def failing_disk(fd: int, data: memoryview, offset: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(raw_module, "pwrite_all", failing_disk)
    options = [("grpc.max_send_message_length", 64 * MiB)]
    async with (
        running_server(tmp_path, body) as server,
        grpc.aio.insecure_channel(server.grpc_address, options=options) as channel,
    ):
        stub = pb_grpc.BlockDeviceStub(channel)
        write = pb.WriteRequest(volume="disk", sector=0, data=bytes(4 * MiB))

        async def failure() -> None:
            assert await _refused(stub.Write(write)) == grpc.StatusCode.INTERNAL

        assert await _left_for_the_collector(failure) == ([], [])


async def test_a_chunked_write_that_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client library's write of several chunks, failing at the server (its tasks held
    the error raised, whose traceback held them: a tier writing through to an origin that
    fails kept every such write)."""

    async def failing(self: RamLayer, data: memoryview, sector: int, fua: bool) -> None:
        raise StorageError("writing the test's layer: Input/output error")

    monkeypatch.setattr(RamLayer, "write", failing)
    async with (
        running_server(tmp_path, FOUR_VOLUMES) as server,
        AsyncClient(server.grpc_address, max_io=MiB, retries=0) as client,
    ):
        volume = client.volume("ram")

        async def failure() -> None:
            with pytest.raises(cerr.StorageError):
                await volume.write(0, bytearray(3 * MiB))  # 3 chunks

        assert await _left_for_the_collector(failure) == ([], [])
