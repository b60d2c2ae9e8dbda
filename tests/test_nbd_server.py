"""The NBD export wired into ``tierdisk serve``: one volume, two front ends (gRPC and NBD)
that see the same data, with NBD requests in /metrics and Inspect."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import random
import socket
import struct
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from nbd_raw import (
    CMD_READ,
    CMD_WRITE,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_LIST,
    REP_ACK,
    REP_ERR_UNKNOWN,
    REP_SERVER,
    Raw,
    go_data,
)
from servers import (
    ServerProcess,
    created_series,
    promtool_check_metrics,
    ram,
    running_server,
    samples,
    scrape,
    toml_volume,
    tree_of,
    value,
    write_config,
)
from tools import require_tool
from waiting import eventually

from tierdisk.client import AsyncClient
from tierdisk.service.nbd_session import NbdSession
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


# -- a client that does not read its replies; misaligned NBD writes racing gRPC writes ----------

MiB = 1 << 20
REQUEST = struct.Struct(">IHHQQI")


class _Nbd:
    """A blocking raw NBD client (every receive bounded by the socket timeout)."""

    def __init__(self, address: str, export: str, rcvbuf: int = 0) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(30)
        self.sock.connect((host, int(port)))
        self.recv(18)
        name = export.encode()
        go = struct.pack(">I", len(name)) + name + b"\0\0"
        self.sock.sendall(struct.pack(">IQII", 3, 0x49484156454F5054, 7, len(go)) + go)
        while True:
            _, _, rtype, rlen = struct.unpack(">QIII", self.recv(20))
            self.recv(rlen)
            if rtype == 1:  # ACK
                return
            assert not rtype & 1 << 31, rtype

    def recv(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if not k:
                raise EOFError(f"EOF after {got} of {n} bytes")
            got += k
        return bytes(buf)

    def request(self, cmd: int, handle: int, offset: int, length: int, data: bytes = b"") -> None:
        self.sock.sendall(REQUEST.pack(0x25609513, 0, cmd, handle, offset, length) + data)

    def reply(self, nbytes: int = 0) -> tuple[int, int, bytes]:
        magic, error, handle = struct.unpack(">IIQ", self.recv(16))
        assert magic == 0x67446698
        return error, handle, self.recv(nbytes) if nbytes and not error else b""


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _layer_reads(grpc_address: str, volume: str) -> int:
    """Reads the volume's top layer has served (its Inspect counters)."""

    async def ask() -> int:
        async with grpc.aio.insecure_channel(grpc_address) as channel:
            stub = pb_grpc.BlockDeviceStub(channel)
            path = "layers/0/counters"
            reply = await stub.Inspect(pb.InspectRequest(volume=volume, path=path))
            return int(tree_of(reply)["reads"])

    return asyncio.run(ask())


@pytest.mark.parametrize(("max_io", "n", "started"), [(4, 200, None), (96, 8, 1)])
def test_a_client_not_reading_its_replies_pins_bounded_memory(
    tmp_path: Path, max_io: int, n: int, started: int | None
) -> None:
    """Pipelined reads of ``max_io`` whose replies the client does not read: the server
    holds a bounded amount of them (its RSS grows by well under 300 MiB, where starting 200
    reads of 4 MiB would pin 800 MiB), serves another client meanwhile, and answers every
    read correctly once the client reads. A read of 96 MiB (over the 64 MiB a connection
    may have in flight) starts alone, and none starts while its reply fills the transport
    (another one started then and waited, so a connection pinned two: 512 MiB at a
    ``max_io`` of 256 MiB)."""
    config = write_config(tmp_path, toml_volume("mem", ram(f"{max_io}MiB")))
    args = ("--nbd", "127.0.0.1:0", "--max-io", f"{max_io}MiB")
    with ServerProcess.start(tmp_path, config, *args) as server:
        content = os.urandom(max_io * MiB)
        writer = _Nbd(server.nbd, "mem")
        writer.request(1, 1, 0, len(content), content)
        assert writer.reply()[0] == 0
        before = _rss_kib(server.pid)
        slow = _Nbd(server.nbd, "mem", rcvbuf=4096)
        slow.sock.sendall(
            b"".join(REQUEST.pack(0x25609513, 0, 0, h, 0, max_io * MiB) for h in range(n))
        )
        peak = before
        for _ in range(30):  # 3 s: the server starts what it will start, then waits
            time.sleep(0.1)
            peak = max(peak, _rss_kib(server.pid))
        grown = (peak - before) // 1024
        assert grown < 300, f"the server's RSS grew by {grown} MiB"
        if started is not None:
            assert _layer_reads(server.grpc, "mem") == started
        writer.request(0, 2, 4096, 8192)  # another client is served meanwhile
        assert writer.reply(8192) == (0, 2, content[4096 : 4096 + 8192])
        handles = set()
        for _ in range(n):
            error, handle, data = slow.reply(max_io * MiB)
            assert error == 0 and data == content
            handles.add(handle)
        assert handles == set(range(n))
        for client in (slow, writer):
            client.sock.close()


def test_a_client_pipelining_options_without_reading_replies_pins_bounded_memory(
    tmp_path: Path,
) -> None:
    """A client that sends ``NBD_OPT_LIST`` after ``NBD_OPT_LIST`` without reading the
    replies (the spec forbids sending an option before the last one's reply; no credentials
    are needed for it) has the server stop reading once its replies do not drain: its RSS
    grows by well under 64 MiB, where the ~25x larger replies to 16 MiB of options grew it
    by hundreds; the client's first replies are right, and another client chooses an
    export meanwhile."""
    names = [f"a-volume-with-a-rather-long-name-{i}" for i in range(8)]
    config = write_config(tmp_path, "".join(toml_volume(n, ram("1MiB")) for n in names))
    with ServerProcess.start(tmp_path, config, "--nbd", "127.0.0.1:0") as server:
        host, port = server.nbd.rsplit(":", 1)
        flood = socket.create_connection((host, int(port)), timeout=10)
        flood.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # reads nothing anyway
        assert len(flood.recv(18, socket.MSG_WAITALL)) == 18
        flood.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
        before = _rss_kib(server.pid)
        options = struct.pack(">QII", 0x49484156454F5054, OPT_LIST, 0) * 65536  # 1 MiB
        flood.settimeout(2)
        sent = 0
        with contextlib.suppress(TimeoutError):
            for _ in range(16):
                flood.sendall(options)
                sent += len(options)
        peak = before
        for _ in range(20):  # 2 s: the server does what it will do with what it read
            time.sleep(0.1)
            peak = max(peak, _rss_kib(server.pid))
        grown = (peak - before) // 1024
        assert grown < 64, f"the server's RSS grew by {grown} MiB ({sent >> 20} MiB sent)"
        other = _Nbd(server.nbd, names[3])  # chooses an export meanwhile
        other.sock.close()
        flood.settimeout(10)
        for name in names:  # the first option's replies
            _, option, reply, length = struct.unpack(">QIII", flood.recv(20, socket.MSG_WAITALL))
            data = flood.recv(length, socket.MSG_WAITALL)
            assert (option, reply, data[4:].decode()) == (OPT_LIST, REP_SERVER, name)
        assert struct.unpack(">QIII", flood.recv(20, socket.MSG_WAITALL))[2] == REP_ACK
        flood.close()


PATCH_AT, PATCH = 100, b"N" * 10
ROUNDS = 25


async def _rmw_race(server_nbd: str, grpc_address: str, volume: str, rounds: int) -> Counter[str]:
    """Rounds of: gRPC writes ``A`` to K sectors (acknowledged); then, at once, NBD writes
    ``PATCH`` at byte 100 of each sector (misaligned: the server read-modify-writes) and
    gRPC writes ``G`` over each whole sector. Counts each sector's outcome."""
    k = 32
    base = 1000
    host, port = server_nbd.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    await reader.readexactly(18)
    name = volume.encode()
    go = struct.pack(">I", len(name)) + name + b"\0\0"
    writer.write(struct.pack(">IQII", 3, 0x49484156454F5054, 7, len(go)) + go)
    while True:
        _, _, rtype, rlen = struct.unpack(">QIII", await reader.readexactly(20))
        await reader.readexactly(rlen)
        if rtype == 1:
            break
    outcomes: Counter[str] = Counter()
    rng = random.Random(7)

    def sector(fill: bytes, patch: bool) -> bytes:
        whole = fill * 512
        return whole[:PATCH_AT] + PATCH + whole[PATCH_AT + len(PATCH) :] if patch else whole

    names = {
        sector(b"G", False): "G",  # NBD patch first, then the gRPC write
        sector(b"G", True): "G+patch",  # gRPC write first, then the patch
        sector(b"A", True): "A+patch",  # the acknowledged gRPC write undone: a lost update
    }
    async with grpc.aio.insecure_channel(grpc_address) as channel:
        stub = pb_grpc.BlockDeviceStub(channel)
        for _ in range(rounds):
            await stub.Write(pb.WriteRequest(volume=volume, sector=base, data=b"A" * 512 * k))
            delay = rng.random() * 0.004

            async def nbd_side(delay: float) -> None:
                await asyncio.sleep(delay)
                for i in range(k):
                    offset = (base + i) * 512 + PATCH_AT
                    writer.write(REQUEST.pack(0x25609513, 0, 1, i, offset, len(PATCH)) + PATCH)
                    if i % 8 == 7:
                        await writer.drain()
                        await asyncio.sleep(0.0005)
                await writer.drain()
                for _ in range(k):
                    _, error, _ = struct.unpack(">IIQ", await reader.readexactly(16))
                    assert error == 0

            async def grpc_side() -> None:
                await asyncio.gather(
                    *(
                        stub.Write(pb.WriteRequest(volume=volume, sector=base + i, data=b"G" * 512))
                        for i in range(k)
                    )
                )

            await asyncio.gather(nbd_side(delay), grpc_side())
            reply = await stub.Read(pb.ReadRequest(volume=volume, sector=base, sector_count=k))
            for i in range(k):
                outcomes[names.get(reply.data[i * 512 : (i + 1) * 512], "other")] += 1
    writer.close()
    return outcomes


@pytest.mark.parametrize("volume", ["mem", "sparse", "sqlite"])
async def test_misaligned_nbd_writes_never_undo_acknowledged_grpc_writes(
    tmp_path: Path, volume: str
) -> None:
    """Each raced sector ends as a serial order of its two writes allows: ``G`` (the patch,
    then gRPC's whole-sector write) or ``G+patch`` (gRPC's write, then the patch), never
    ``A+patch`` (the patch's read-modify-write read ``A`` before gRPC's write and wrote it
    back after: an acknowledged write lost). A ``tierdisk serve`` child, so the clients'
    timing is independent of the server's loop. (Without the engine's sector lock the
    sparse and sqlite volumes lose tens of writes in 25 rounds; a ram layer's I/O does not
    yield, so there the race cannot show.)"""
    layers = {
        "mem": ram("8MiB"),
        "sparse": {"kind": "sparse", "path": "v.sparse", "size": "8MiB"},
        "sqlite": {"kind": "sqlite", "path": "v.db", "size": "8MiB"},
    }
    config = write_config(tmp_path, toml_volume(volume, layers[volume]))
    with ServerProcess.start(tmp_path, config, "--nbd", "127.0.0.1:0") as server:
        outcomes = await asyncio.wait_for(_rmw_race(server.nbd, server.grpc, volume, ROUNDS), 60)
    assert set(outcomes) <= {"G", "G+patch"}, outcomes
    assert sum(outcomes.values()) == ROUNDS * 32


async def test_connections_over_the_limit_are_refused_with_a_reason(tmp_path: Path) -> None:
    """``nbd_max_connections = 2``: a connection takes a place when it chooses an export.
    With two sessions open, a client that only lists the exports is served (and not counted
    as refused); a third client's choice is refused with ``NBD_REP_ERR_POLICY`` naming the
    limit (which ``qemu-img`` shows) and counted in ``tierdisk_nbd_connections_refused_total``;
    once one of the two closes, a connection that was already open when the server was full
    gets in (the verdict is taken when it chooses, not when it connected). Connections that
    have not chosen an export yet are at most as many again: past that, closed at once. A
    choice of an export that does not exist is answered ``NBD_REP_ERR_UNKNOWN`` and takes no
    place, full or not."""
    qemu_img = require_tool("qemu-img")
    body = CONFIG.replace("DATA", str(tmp_path / "data")).replace(
        'nbd = "127.0.0.1:0"', 'nbd = "127.0.0.1:0"\nnbd_max_connections = 2'
    )

    async def info(uri: str) -> tuple[int | None, str]:
        proc = await asyncio.create_subprocess_exec(
            qemu_img,
            "info",
            "--output=json",
            uri,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode, (out + err).decode()

    async with running_server(tmp_path, body) as server:
        uri = f"nbd://{server.nbd_address}/disk"
        held = [await Raw.open(server.nbd_address) for _ in range(2)]
        for client in held:
            await client.go("disk")
        waiting = await Raw.open(server.nbd_address)  # open while the server is full
        lister = await Raw.open(server.nbd_address)
        listed = await lister.option(OPT_LIST)
        assert listed[-1][0] == REP_ACK and any(reply == REP_SERVER for reply, _ in listed)
        assert [reply for reply, _ in await lister.option(OPT_GO, go_data("nope"))] == [
            REP_ERR_UNKNOWN
        ]
        # Two connections that have not chosen an export (waiting, lister): as many as
        # nbd_max_connections, so a third is closed at once (counted as refused).
        host, port = server.nbd_address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        with contextlib.suppress(ConnectionResetError):  # closed (or reset), no greeting
            assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        await lister.close()
        assert server._nbd is not None
        nbd = server._nbd
        await eventually("the lister's close to be seen", lambda: len(nbd._sessions) == 3)
        code, text = await info(uri)
        assert code != 0, text
        assert "too many NBD connections: this server takes 2 at once" in text, text
        assert server.metrics_address
        text = await scrape(server.metrics_address)
        assert value(text, "tierdisk_nbd_connections_refused_total") == 2
        await held.pop().close()
        stats = nbd.stats
        await eventually("the close to be seen", lambda: stats.volume_sessions["disk"] == 1)
        lister = await Raw.open(server.nbd_address)
        assert [reply for reply, _ in await lister.option(OPT_GO, go_data("nope"))] == [
            REP_ERR_UNKNOWN
        ]  # and takes no place
        await waiting.go("disk")
        await lister.close()
        assert await waiting.request(CMD_READ, 0, 512) == bytes(512)
        for client in (*held, waiting):
            await client.close()


async def test_past_an_end_that_moved_a_write_is_enospc_and_a_read_einval(
    tmp_path: Path,
) -> None:
    """A client that negotiated the export at its old size, after a shrink: a write past
    the new end is ``ENOSPC`` (no room there, as the NBD spec asks of writes past the end),
    a read there ``EINVAL``; the connection goes on."""
    body = CONFIG.replace("DATA", str(tmp_path / "data"))
    async with running_server(tmp_path, body) as server:
        nbd = await Raw.open(server.nbd_address)
        await nbd.go("disk")
        async with AsyncClient(server.grpc_address) as client:
            await client.volume("disk").resize(2 * MiB // 512)
        past = 3 * MiB
        assert await nbd.error(CMD_WRITE, past, 512, bytes(512)) == errno.ENOSPC
        assert await nbd.error(CMD_READ, past, 512) == errno.EINVAL
        assert await nbd.request(CMD_READ, 0, 512) == bytes(512)
        await nbd.close()


async def test_connections_that_end_before_choosing_an_export_are_freed_at_once(
    tmp_path: Path,
) -> None:
    """A session (and its 256 KiB receive buffer) whose connection ends in the handshake
    is freed when it ends, not left in a reference cycle for a full garbage collection,
    which a busy server rarely runs (probes such as ``nbdinfo --list`` grew the server by
    ~64 KiB each, and 400 dropped handshakes by ~300 MiB). The cyclic collector is off
    while it runs, so only what reference counting frees is freed."""
    body = CONFIG.replace("DATA", str(tmp_path / "data"))
    async with running_server(tmp_path, body) as server:
        assert server._nbd is not None
        nbd = server._nbd

        async def session_gone() -> None:
            await eventually("the sessions to end", lambda: not nbd._sessions)

        gc.collect()
        gc.disable()
        try:
            for ending in ("close", "list", "abort", "unknown export", "bad magic"):
                client = await Raw.open(server.nbd_address)
                if ending == "list":
                    assert (await client.option(OPT_LIST))[-1][0] == REP_ACK
                elif ending == "abort":
                    assert (await client.option(OPT_ABORT))[-1][0] == REP_ACK
                elif ending == "unknown export":
                    client.send_option(OPT_EXPORT_NAME, b"nope")
                    assert await client.closed()
                elif ending == "bad magic":
                    client.writer.write(bytes(16))
                    assert await client.closed()
                await client.close()
                await session_gone()
                await asyncio.sleep(0.05)  # the handshake task's last steps
                alive = [o for o in gc.get_objects() if isinstance(o, NbdSession)]
                assert not alive, (ending, len(alive))
        finally:
            gc.enable()


async def test_a_flood_of_bad_requests_logs_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Any client can send a bad request magic: the warning is rate-limited, not one line
    per connection."""
    body = CONFIG.replace("DATA", str(tmp_path / "data"))
    async with running_server(tmp_path, body) as server:
        with caplog.at_level(logging.WARNING, "tierdisk.service.nbd"):
            for _ in range(5):
                client = await Raw.open(server.nbd_address)
                await client.go("disk")
                client.writer.write(bytes(28))  # a request header of zeros: magic 0
                assert await client.closed()
                await client.close()
    lines = [r.getMessage() for r in caplog.records if "bad request magic" in r.getMessage()]
    assert len(lines) == 1, lines
