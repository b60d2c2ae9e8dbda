"""The NBD export wired into ``tierdisk serve``: one volume, two front ends (gRPC and NBD)
that see the same data, with NBD requests in /metrics and Inspect."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc
from servers import running_server, tree_of
from test_metrics import created_series, promtool_check_metrics, samples, scrape, value
from tools import require_tool

from tierdisk.v1 import blockdevice_pb2 as pb
from tierdisk.v1 import blockdevice_pb2_grpc as pb_grpc

CONFIG = """
[server]
listen = "127.0.0.1:0"
metrics = "127.0.0.1:0"
nbd = "127.0.0.1:0"
data_dir = "DATA"

[[volumes]]
name = "disk"
  [[volumes.layers]]
  kind = "ram"
  read_cache = true
  [[volumes.layers]]
  kind = "raw"
  path = "base.img"
  size = "4MiB"
"""


async def _run(*cmd: str) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, (cmd, err.decode())
    return out


async def test_nbd_and_grpc_see_the_same_volume(tmp_path: Path) -> None:
    qemu_img = require_tool("qemu-img")
    body = CONFIG.replace("DATA", str(tmp_path / "data"))
    async with running_server(tmp_path, body) as server:
        host, port = server.nbd_address.rsplit(":", 1)
        uri = f"nbd://{host}:{port}/disk"
        # gRPC writes, NBD reads.
        payload = os.urandom(64 * 1024)
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            stub = pb_grpc.BlockDeviceStub(channel)
            await stub.Write(pb.WriteRequest(volume="disk", sector=0, data=payload))
            exported = tmp_path / "out.raw"
            await _run(qemu_img, "convert", "-f", "raw", "-O", "raw", uri, str(exported))
            assert exported.read_bytes()[: len(payload)] == payload
            assert exported.stat().st_size == 4 << 20
            # NBD writes, gRPC reads.
            image = tmp_path / "in.raw"
            incoming = os.urandom(1 << 20)
            image.write_bytes(incoming + bytes(3 << 20))
            await _run(qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(image), uri)
            reply = await stub.Read(pb.ReadRequest(volume="disk", sector=0, sector_count=2048))
            assert reply.data == incoming
            tree = tree_of(await stub.Inspect(pb.InspectRequest(volume="disk", path="nbd")))
            assert tree["sessions_total"] >= 2
        text = await scrape(server.metrics_address)
        assert value(text, "tierdisk_nbd_sessions_total") >= 2
        assert (
            value(text, "tierdisk_nbd_requests_total", volume="disk", command="read", result="ok")
            >= 1
        )
        assert (
            value(text, "tierdisk_nbd_requests_total", volume="disk", command="write", result="ok")
            >= 1
        )
        assert value(text, "tierdisk_volume_io_bytes_total", volume="disk", op="write") >= (
            len(payload) + len(incoming)
        )
        # The NBD families are the project's own, like every other: no `_created` series.
        assert value(text, "tierdisk_nbd_request_duration_seconds_count", command="read") >= 1
        assert created_series(text) == []
        await promtool_check_metrics(text)
        # The volume's request count covers both front ends: every NBD data command (read
        # and cache are reads, write and write_zeroes writes) plus the one gRPC Write and the
        # one gRPC Read above.
        for op, commands in (("read", ("read", "cache")), ("write", ("write", "write_zeroes"))):
            sent = sum(
                samples(text).get(
                    (
                        "tierdisk_nbd_requests_total",
                        frozenset({"volume": "disk", "command": c, "result": "ok"}.items()),
                    ),
                    0.0,
                )
                for c in commands
            )
            requests = value(
                text, "tierdisk_volume_io_requests_total", volume="disk", op=op, code="OK"
            )
            assert requests == sent + 1
