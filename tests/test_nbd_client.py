"""The NBD read client (service/nbd_client.py) against real NBD servers: tierdisk's own export
(an in-process server on 127.0.0.1 port 0) and nbdkit (a C server from Debian, on a unix
socket), whose ``pattern`` plugin, ``delay`` and ``error`` filters give known data, slow
replies and error answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from servers import ram, running_server, toml_volume
from tools import require_tool

from tierdisk.client import AsyncClient
from tierdisk.service.nbd_client import NbdClosed, NbdError, NbdReader, NbdRefused
from tierdisk.service.nbd_protocol import described_server, export_description
from tierdisk.service.server import Server

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
SS = 512
DATA = random.Random(11).randbytes(4 * MiB)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    """A tierdisk server with its NBD export on, ``max_io`` 1 MiB, volume ``v`` = DATA."""
    body = (
        f'[server]\nlisten = "127.0.0.1:0"\nmetrics = ""\nnbd = "127.0.0.1:0"\n'
        f'max_io = "1MiB"\ndata_dir = "{tmp_path}"\n'
    ) + toml_volume("v", ram("4MiB"))
    async with running_server(tmp_path, body) as srv:
        async with AsyncClient(srv.grpc_address) as client:
            await client.volume("v").write(0, DATA)
        yield srv


async def test_reads_a_tierdisk_export(server: Server) -> None:
    reader = await NbdReader.connect(server.nbd_address, "v")
    try:
        assert reader.export.size == len(DATA)
        assert reader.export.block_max == MiB  # the server's max_io
        assert not reader.export.read_only
        # the description names the serving process (a remote layer checks it)
        assert (
            reader.export.description == f"tierdisk volume v: 1 layer(s); server {server.server_id}"
        )
        assert described_server(reader.export.description) == server.server_id
        # larger than one request: split into 1 MiB requests, all in flight at once
        buf = bytearray(3 * MiB + SS)
        await reader.read_into(SS, memoryview(buf))
        assert buf == DATA[SS : SS + len(buf)]
        # many reads pipelined on the one connection, replies matched by handle
        rng = random.Random(3)
        ranges = [
            (rng.randrange(0, len(DATA) // SS - 64) * SS, rng.randrange(1, 64) * SS)
            for _ in range(40)
        ]
        bufs = [bytearray(n) for _, n in ranges]
        await asyncio.gather(
            *(
                reader.read_into(off, memoryview(b))
                for (off, _), b in zip(ranges, bufs, strict=True)
            )
        )
        for (off, n), b in zip(ranges, bufs, strict=True):
            assert b == DATA[off : off + n]
        # past the export's end: refused before sending, the connection goes on
        with pytest.raises(NbdError, match="not inside"):
            await reader.read_into(len(DATA) - SS, memoryview(bytearray(2 * SS)))
        tail = bytearray(SS)
        await reader.read_into(len(DATA) - SS, memoryview(tail))
        assert tail == DATA[-SS:]
    finally:
        await reader.close()
    assert reader.closed
    with pytest.raises(NbdClosed):
        await reader.read_into(0, memoryview(bytearray(SS)))


async def test_unknown_export_is_refused_with_the_servers_message(server: Server) -> None:
    with pytest.raises(NbdError, match="'nope'") as info:
        await NbdReader.connect(server.nbd_address, "nope")
    assert not isinstance(info.value, NbdClosed)


async def test_an_error_answer_fails_one_read_and_the_connection_goes_on(server: Server) -> None:
    reader = await NbdReader.connect(server.nbd_address, "v")
    try:
        # The export's size is fixed at the handshake; shrink the volume under it: the
        # server answers a read past the new end with EINVAL.
        async with AsyncClient(server.grpc_address) as client:
            await client.volume("v").resize(MiB // SS)
        with pytest.raises(NbdRefused, match="EINVAL") as info:
            await reader.read_into(2 * MiB, memoryview(bytearray(SS)))
        assert info.value.error == 22
        head = bytearray(4096)
        await reader.read_into(0, memoryview(head))
        assert head == DATA[:4096]
        assert not reader.closed
    finally:
        await reader.close()


async def test_a_lost_connection_fails_every_read(server: Server) -> None:
    reader = await NbdReader.connect(server.nbd_address, "v")
    await server.stop(grace=1)
    with pytest.raises(NbdClosed):
        for _ in range(100):  # the server's goodbye may take a moment to arrive
            await reader.read_into(0, memoryview(bytearray(SS)))
            await asyncio.sleep(0.02)
    assert reader.closed
    await reader.close()


# -- nbdkit: another server, slow replies, error answers ----------------------------------------


def pattern(offset: int, length: int) -> bytes:
    """nbdkit's ``pattern`` plugin: every 8-byte word holds its own offset, big-endian."""
    first = offset - offset % 8
    words = b"".join(struct.pack(">Q", o) for o in range(first, offset + length + 8, 8))
    return words[offset - first : offset - first + length]


@contextlib.contextmanager
def nbdkit(tmp_path: Path, *args: str) -> Iterator[str]:
    """``nbdkit ARGS`` on a unix socket; its address; stopped by its PID."""
    exe = require_tool("nbdkit")
    sock = tmp_path / "nbdkit.sock"
    pidfile = tmp_path / "nbdkit.pid"
    proc = subprocess.Popen(
        [exe, "-f", "-U", str(sock), "-P", str(pidfile), "-e", "x", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(500):
            if pidfile.exists() and sock.exists():
                break
            if proc.poll() is not None:
                raise AssertionError(
                    f"nbdkit exited: {proc.stderr.read().decode() if proc.stderr else ''}"
                )
            time.sleep(0.01)
        yield f"unix:{sock}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


async def test_reads_an_nbdkit_export(tmp_path: Path) -> None:
    with nbdkit(tmp_path, "pattern", "8M") as address:
        reader = await NbdReader.connect(address, "x")
        try:
            assert reader.export.size == 8 * MiB
            buf = bytearray(5 * MiB + 4096)
            await reader.read_into(12288, memoryview(buf))
            assert buf == pattern(12288, len(buf))
            offsets = [i * 65536 + 4096 for i in range(32)]
            bufs = [bytearray(8192) for _ in offsets]
            await asyncio.gather(
                *(reader.read_into(o, memoryview(b)) for o, b in zip(offsets, bufs, strict=True))
            )
            assert all(b == pattern(o, 8192) for o, b in zip(offsets, bufs, strict=True))
        finally:
            await reader.close()


async def test_a_read_given_up_never_writes_into_its_buffer(tmp_path: Path) -> None:
    """A slow reply that arrives after its caller gave up goes to a scratch buffer, and the
    replies after it still land in the right places."""
    with nbdkit(tmp_path, "--filter=delay", "pattern", "8M", "rdelay=600ms") as address:
        reader = await NbdReader.connect(address, "x")
        try:
            given_up = bytearray(b"\xee" * 65536)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await reader.read_into(MiB, memoryview(given_up))
            later = bytearray(4096)
            await reader.read_into(2 * MiB, memoryview(later))  # waits out the late reply
            assert later == pattern(2 * MiB, 4096)
            assert given_up == b"\xee" * 65536
            assert not reader.closed
        finally:
            await reader.close()


async def test_nbdkit_error_answers_are_refusals(tmp_path: Path) -> None:
    args = ("--filter=error", "pattern", "8M", "error-pread=EIO", "error-pread-rate=100%")
    with nbdkit(tmp_path, *args) as address:
        reader = await NbdReader.connect(address, "x")
        try:
            for _ in range(3):
                with pytest.raises(NbdRefused, match="EIO") as info:
                    await reader.read_into(0, memoryview(bytearray(4096)))
                assert info.value.error == 5
            assert not reader.closed
        finally:
            await reader.close()


async def test_not_an_nbd_server(tmp_path: Path) -> None:
    async def chatter(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n" + bytes(64))
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(chatter, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        with pytest.raises(NbdError, match="newstyle"):
            await NbdReader.connect(f"127.0.0.1:{port}", "v")
    finally:
        srv.close()
        await srv.wait_closed()


async def test_close_can_let_reads_in_flight_finish(tmp_path: Path) -> None:
    with nbdkit(tmp_path, "--filter=delay", "pattern", "8M", "rdelay=300ms") as address:
        for drain, finishes in ((5.0, True), (0.0, False)):
            reader = await NbdReader.connect(address, "x")
            buf = bytearray(4096)
            read = asyncio.create_task(reader.read_into(4096, memoryview(buf)))
            await asyncio.sleep(0.05)  # sent, not answered yet
            await reader.close(drain=drain)
            assert reader.closed
            if finishes:
                await read
                assert buf == pattern(4096, 4096)
            else:
                with pytest.raises(NbdClosed):
                    await read
                assert buf == bytes(4096)


# -- a server that breaks the protocol (what real servers never send) ---------------------------


async def scripted_server(reply: bytes) -> tuple[asyncio.Server, str]:
    """An NBD server on 127.0.0.1 that completes the handshake for any export (size 1 MiB)
    and answers the first request with ``reply`` followed by 4 KiB of data, whatever it asked."""

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(struct.pack(">QQH", 0x4E42444D41474943, 0x49484156454F5054, 3))
        await reader.readexactly(4)  # client flags
        _, option, length = struct.unpack(">QII", await reader.readexactly(16))
        await reader.readexactly(length)
        info = struct.pack(">HQH", 0, MiB, 1)  # NBD_INFO_EXPORT
        writer.write(struct.pack(">QIII", 0x3E889045565A9, option, 3, len(info)) + info)
        writer.write(struct.pack(">QIII", 0x3E889045565A9, option, 1, 0))  # ACK
        await reader.readexactly(28)  # the read request
        writer.write(reply + bytes(4096))
        await writer.drain()
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.read()  # until the client goes
        writer.close()

    srv = await asyncio.start_server(session, "127.0.0.1", 0)
    return srv, f"127.0.0.1:{srv.sockets[0].getsockname()[1]}"


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        (struct.pack(">IIQ", 0x67446698, 0, 99), "handle 99"),  # a handle not in flight
        (struct.pack(">IHHQI", 0x668E33EF, 1, 1, 1, 4096), "magic"),  # a structured reply
    ],
    ids=["unknown-handle", "unasked-structured-reply"],
)
async def test_a_protocol_violation_breaks_the_connection(reply: bytes, why: str) -> None:
    srv, address = await scripted_server(reply)
    try:
        reader = await NbdReader.connect(address, "x")
        buf = bytearray(4096)
        with pytest.raises(NbdClosed, match=why):
            await reader.read_into(0, memoryview(buf))
        assert reader.closed and buf == bytes(4096)
        with pytest.raises(NbdClosed):  # and stays broken
            await reader.read_into(0, memoryview(buf))
        await reader.close()
    finally:
        srv.close()
        await srv.wait_closed()


@pytest.mark.parametrize(
    ("description", "server_id"),
    [
        (export_description("v", 2, "10.0.0.1:7400~a1b2c3"), "10.0.0.1:7400~a1b2c3"),
        (export_description("odd; server name", 1, "h:1~00"), "h:1~00"),  # the last one wins
        ("an export of another NBD server", ""),
        ("", ""),
    ],
)
def test_the_server_an_export_description_names(description: str, server_id: str) -> None:
    assert described_server(description) == server_id


async def test_a_read_whose_data_is_arriving_fails_at_once_when_the_connection_breaks(
    server: Server,
) -> None:
    """The read whose reply data is arriving when the connection breaks fails at once
    (``NbdClosed``), as those still waiting for a reply do: it was left waiting for ever (a
    remote layer then gave up only at its ``timeout``, DEADLINE_EXCEEDED, where it falls back
    to gRPC at once). Caught in that state by watching the connection between reads."""
    caught = 0
    for _ in range(20):
        reader = await NbdReader.connect(server.nbd_address, "v")
        conn = reader._conn
        reading = asyncio.ensure_future(reader.read_into(0, memoryview(bytearray(len(DATA)))))
        for _ in range(100_000):  # one loop step at a time: a step receives a few chunks
            if reading.done() or conn._current is not None:
                break
            await asyncio.sleep(0)
        if reading.done():
            await reading  # all of it arrived first: not the state looked for, try again
        else:
            caught += 1
            assert conn.transport is not None
            conn.transport.abort()
            with pytest.raises(NbdClosed):
                await asyncio.wait_for(reading, 5)
        await reader.close()
    assert caught, "never caught a read with its data arriving"
