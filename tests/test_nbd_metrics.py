"""The NBD export's metrics against a real server: a failure counts under the same ``code``
in the shared volume families whichever front end it came through (the one status table,
``service/status.py``), though NBD answers it with its own errno."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from servers import running_server, samples, scrape, toml_volume, tree_of

from tierdisk.v1 import blockdevice_pb2 as pb
from tierdisk.v1 import blockdevice_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(60)

SECTORS = 2048  # 1 MiB of 512-byte sectors
CONFIG = (
    '[server]\nlisten = "127.0.0.1:0"\nmetrics = "127.0.0.1:0"\nnbd = "127.0.0.1:0"\n'
    'data_dir = "DATA"\n'
    + toml_volume("disk", {"kind": "ram", "size": f"{SECTORS * 512}"})
    + toml_volume("ro", {"kind": "ram", "size": f"{SECTORS * 512}"}, read_only=True)
)

REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
REPLY = struct.Struct(">IIQ")  # magic, error, handle
CMD_READ, CMD_WRITE = 0, 1
EINVAL, EPERM, ENOSPC = 22, 1, 28


async def nbd_session(
    address: str, export: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection in the transmission phase on ``export`` (``NBD_OPT_EXPORT_NAME``)."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    await reader.readexactly(18)  # NBDMAGIC, IHAVEOPT, handshake flags
    writer.write(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    name = export.encode()
    writer.write(struct.pack(">QII", 0x49484156454F5054, 1, len(name)) + name)
    await reader.readexactly(10)  # export size and transmission flags
    return reader, writer


async def nbd_errors(address: str, export: str, requests: list[tuple[int, int, int]]) -> list[int]:
    """Send ``(command, offset, length)`` requests on one connection (``NBD_OPT_EXPORT_NAME``,
    simple replies) and return each reply's NBD error (0: ok)."""
    reader, writer = await nbd_session(address, export)
    try:
        errors = []
        for handle, (cmd, offset, length) in enumerate(requests):
            payload = bytes(length) if cmd == CMD_WRITE else b""
            writer.write(REQUEST.pack(0x25609513, 0, cmd, handle, offset, length) + payload)
            magic, error, got = REPLY.unpack(await reader.readexactly(REPLY.size))
            assert (magic, got) == (0x67446698, handle)
            if cmd == CMD_READ and not error:
                await reader.readexactly(length)
            errors.append(error)
        return errors
    finally:
        writer.close()


def io_requests(text: str, volume: str, op: str) -> dict[str, float]:
    """``tierdisk_volume_io_requests_total`` of ``volume`` and ``op``, by ``code``."""
    found = {}
    for (name, labels), count in samples(text).items():
        got = dict(labels)
        if name == "tierdisk_volume_io_requests_total" and (got["volume"], got["op"]) == (
            volume,
            op,
        ):
            found[got["code"]] = count
    return found


async def test_a_failure_counts_under_one_code_over_nbd_and_grpc(tmp_path: Path) -> None:
    """A read past the end (NBD answers ``EINVAL``), a write past the end (``ENOSPC``) and a
    write to a read-only volume (``EPERM``) count as ``OUT_OF_RANGE``, ``OUT_OF_RANGE`` and
    ``FAILED_PRECONDITION``: the codes the same gRPC calls get, counted beside them."""
    body = CONFIG.replace("DATA", str(tmp_path / "data"))
    async with running_server(tmp_path, body) as server:
        assert server.metrics_address
        end = SECTORS * 512
        errors = await nbd_errors(
            server.nbd_address,
            "disk",
            [(CMD_READ, end - 512, 1024), (CMD_WRITE, end - 512, 1024), (CMD_READ, 0, 512)],
        )
        assert errors == [EINVAL, ENOSPC, 0]
        assert await nbd_errors(server.nbd_address, "ro", [(CMD_WRITE, 0, 512)]) == [EPERM]
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            stub = pb_grpc.BlockDeviceStub(channel)
            refusals = [
                (stub.Read(pb.ReadRequest(volume="disk", sector=SECTORS - 1, sector_count=2)),
                 grpc.StatusCode.OUT_OF_RANGE),
                (stub.Write(pb.WriteRequest(volume="disk", sector=SECTORS - 1, data=bytes(1024))),
                 grpc.StatusCode.OUT_OF_RANGE),
                (stub.Write(pb.WriteRequest(volume="ro", sector=0, data=bytes(512))),
                 grpc.StatusCode.FAILED_PRECONDITION),
            ]  # fmt: skip
            for call, code in refusals:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await cast(Awaitable[Any], call)
                assert info.value.code() == code
        text = await scrape(server.metrics_address)
        assert io_requests(text, "disk", "read") == {"OK": 1, "OUT_OF_RANGE": 2}
        assert io_requests(text, "disk", "write") == {"OK": 0, "OUT_OF_RANGE": 2}
        assert io_requests(text, "ro", "write") == {"OK": 0, "FAILED_PRECONDITION": 2}


async def test_inspect_shows_the_volumes_own_sessions(tmp_path: Path) -> None:
    """``inspect VOL nbd``: ``sessions_active`` is the volume's (two sessions on ``disk``,
    none on ``ro``); the server's are in ``volume_sessions``."""
    body = CONFIG.replace("DATA", str(tmp_path / "data"))
    async with running_server(tmp_path, body) as server:
        sessions = [await nbd_session(server.nbd_address, "disk") for _ in range(2)]
        try:
            async with grpc.aio.insecure_channel(server.grpc_address) as channel:
                stub = pb_grpc.BlockDeviceStub(channel)

                async def active(volume: str) -> Any:
                    reply = await stub.Inspect(pb.InspectRequest(volume=volume, path="nbd"))
                    return tree_of(reply)["sessions_active"]

                assert await active("disk") == 2
                assert await active("ro") == 0
        finally:
            for _, writer in sessions:
                writer.close()
