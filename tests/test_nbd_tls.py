"""TLS for the NBD export (``[server] nbd_tls_cert``, ``nbd_tls_key``, ``nbd_tls_ca``) with
real components only: certificates made by the ``openssl`` command, the real Debian clients
(``nbdinfo`` over ``nbds://``, ``qemu-img`` and ``qemu-io`` with ``tls-creds-x509``), servers
on 127.0.0.1 port 0, in-process (the default asyncio loop) and as a ``tierdisk serve`` child
process (uvloop, which ``serve`` installs), and a raw-socket client for the handshake rules
the tools do not show. Every external process is waited for with a bound and killed by its
PID if it hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import ssl
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from certs import Certs, make_certs
from nbd_raw import (
    CMD_READ,
    CMD_WRITE,
    IHAVEOPT,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META_CONTEXT,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_POLICY,
    REP_ERR_TLS_REQD,
    REP_SERVER,
    REQUEST_MAGIC,
    SIMPLE_MAGIC,
    Raw,
)
from servers import (
    ServerProcess,
    ram,
    remote,
    running_server,
    scrape,
    serve_once,
    toml_volume,
    value,
)
from tools import require_tool, run_tool, run_tool_ok
from waiting import eventually

from tierdisk.client import AsyncClient
from tierdisk.service import nbd_session
from tierdisk.service.config import ServerConfig, load_config
from tierdisk.service.errors import ConfigError
from tierdisk.service.layers.ram import RamLayer
from tierdisk.service.nbd import NbdStats, start_nbd_server
from tierdisk.service.registry import VolumeRegistry
from tierdisk.service.runs import Run
from tierdisk.service.server import Server
from tierdisk.service.tls_files import nbd_tls_context
from tierdisk.service.volume import LayerEntry, Volume

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
SS = 512
SIZE = 16 * MiB  # the volume "vm"

# -- certificates -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """:func:`certs.make_certs`, once for the module."""
    return make_certs(tmp_path_factory.mktemp("certs"))


# -- servers --------------------------------------------------------------------------------


def tls_server(data_dir: Path, certs: Certs, *, ca: bool = False, extra: str = "") -> str:
    """A config whose NBD export (port 0) requires TLS, with the volume ``vm`` (16 MiB)."""
    lines = [
        "[server]",
        'listen = "127.0.0.1:0"',
        'metrics = "127.0.0.1:0"',
        'nbd = "127.0.0.1:0"',
        f'data_dir = "{data_dir}"',
        f'nbd_tls_cert = "{certs.server_cert}"',
        f'nbd_tls_key = "{certs.server_key}"',
        *([f'nbd_tls_ca = "{certs.ca}"'] if ca else []),
        extra,
    ]
    return "\n".join(lines) + "\n" + toml_volume("vm", ram(str(SIZE)))


@dataclass
class Export:
    """A running server whose NBD export requires TLS."""

    nbd: str  # host:port
    grpc: str
    metrics: str
    loop: str  # the server's event loop: "asyncio" (in-process) or "uvloop" (a child)

    @property
    def port(self) -> str:
        return self.nbd.rsplit(":", 1)[1]

    def uri(self, folder: Path, volume: str = "vm") -> str:
        return f"nbds://127.0.0.1:{self.port}/{volume}?tls-certificates={folder}"

    def qemu_args(self, folder: Path, volume: str = "vm") -> list[str]:
        """``--object`` and ``--image-opts`` options of qemu-img / qemu-io for ``volume``
        over TLS with the client files in ``folder``."""
        return [
            "--object",
            f"tls-creds-x509,id=tls0,dir={folder},endpoint=client",
            "--image-opts",
            f"driver=nbd,host=127.0.0.1,port={self.port},export={volume},tls-creds=tls0",
        ]

    async def handshake_failures(self) -> float:
        return value(await scrape(self.metrics), "tierdisk_nbd_tls_handshake_failures_total")

    async def counted_failures(self, count: int) -> None:
        """Wait until ``count`` failed TLS handshakes are counted (a client may exit before
        the server has read its last bytes)."""

        async def check() -> bool:
            return await self.handshake_failures() == count

        await eventually(f"{count} failed TLS handshakes counted", check)


@contextlib.asynccontextmanager
async def tls_export(
    tmp_path: Path, certs: Certs, loop: str, *, ca: bool = False
) -> AsyncIterator[Export]:
    """:func:`tls_server` in this process (``loop="asyncio"``) or as a ``tierdisk serve``
    child process on uvloop (``loop="uvloop"``, stopped by its PID)."""
    body = tls_server(tmp_path / "data", certs, ca=ca)
    if loop == "asyncio":
        async with running_server(tmp_path, body) as server:
            assert server.nbd_tls is True
            yield Export(server.nbd_address, server.grpc_address, server.metrics_address, loop)
        return
    config = tmp_path / "tls.toml"
    config.write_text(body)
    with ServerProcess.start(tmp_path, config, env={"TIERDISK_NO_UVLOOP": "0"}) as child:
        assert child.info["nbd_tls"] is True  # the ready file says the export requires TLS
        yield Export(child.nbd, child.grpc, child.metrics, loop)
        assert child.terminate() == 0


LOOPS = ["asyncio", "uvloop"]


# -- external tools -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tools() -> dict[str, str]:
    return {name: require_tool(name) for name in ("nbdinfo", "qemu-img", "qemu-io")}


# -- the real clients ---------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
async def test_qemu_writes_and_reads_back_over_tls(
    tmp_path: Path, certs: Certs, tools: dict[str, str], loop: str
) -> None:
    """qemu-io writes patterns over TLS and reads them back (``read -P`` compares every
    byte); qemu-img copies an image into the export and back out, byte for byte; the data
    is the volume's (read over gRPC)."""
    async with tls_export(tmp_path, certs, loop) as export:
        qemu = export.qemu_args(certs.good)
        out = await run_tool_ok(
            tools["qemu-io"], *qemu,
            "-c", "write -P 0xa5 1M 256k",  # large: received in place
            "-c", "write -P 0x3c 4097 1000",  # misaligned: read-modify-write
            "-c", "read -P 0xa5 1M 256k",
            "-c", "read -P 0x3c 4097 1000",
            "-c", "read -P 0 0 4096",
        )  # fmt: skip
        assert "Pattern verification failed" not in out, out
        async with AsyncClient(export.grpc) as client:
            vol = client.volume("vm")
            assert await vol.read_bytes(MiB, 256 << 10) == b"\xa5" * (256 << 10)
            assert await vol.read_bytes(4096, 2048) == b"\0" + b"\x3c" * 1000 + bytes(1047)

        rng = random.Random(7)
        image = bytearray(SIZE)
        for start in range(0, SIZE, 3 * MiB):  # data with holes between
            image[start : start + MiB] = rng.randbytes(MiB)
        source, back = tmp_path / "source.img", tmp_path / "back.img"
        source.write_bytes(image)
        await run_tool_ok(
            tools["qemu-img"], "convert", "-n", "-f", "raw", "--target-image-opts",
            "--object", f"tls-creds-x509,id=tls0,dir={certs.good},endpoint=client",
            str(source), qemu[-1],
        )  # fmt: skip
        await run_tool_ok(tools["qemu-img"], "convert", *qemu, "-O", "raw", str(back))
        assert back.read_bytes() == image


@pytest.mark.parametrize("loop", LOOPS)
async def test_nbdinfo_shows_size_and_map_over_tls(
    tmp_path: Path, certs: Certs, tools: dict[str, str], loop: str
) -> None:
    """nbdinfo over ``nbds://``: TLS negotiated, structured replies, the export's size,
    its allocation (``--map``: block status over TLS) and its layer depth."""
    async with tls_export(tmp_path, certs, loop) as export:
        async with AsyncClient(export.grpc) as client:
            await client.volume("vm").write_bytes(4 * MiB, b"\x11" * MiB)
            nbd = await client.volume("vm").inspect("nbd")
        assert nbd["tls"] is True and nbd["tls_client_certificates"] is False
        assert nbd["address"] == export.nbd
        uri = export.uri(certs.good)
        info = await run_tool_ok(tools["nbdinfo"], "--json", uri)
        assert '"TLS": true' in info and '"structured": true' in info, info
        assert (await run_tool_ok(tools["nbdinfo"], "--size", uri)).strip() == str(SIZE)
        mapped = await run_tool_ok(tools["nbdinfo"], "--map", uri)
        rows = [line.split()[:3] for line in mapped.splitlines()]
        assert rows == [
            ["0", str(4 * MiB), "3"],
            [str(4 * MiB), str(MiB), "0"],
            [str(5 * MiB), str(SIZE - 5 * MiB), "3"],
        ], mapped
        depth = await run_tool_ok(tools["nbdinfo"], "--map=qemu:allocation-depth", uri)
        assert [line.split()[:3] for line in depth.splitlines()][1] == [
            str(4 * MiB),
            str(MiB),
            "1",
        ], depth
        assert await export.handshake_failures() == 0


async def test_a_client_that_does_not_start_tls_is_refused(
    tmp_path: Path, certs: Certs, tools: dict[str, str]
) -> None:
    """qemu-img and nbdinfo without TLS: every option is answered ``NBD_REP_ERR_TLS_REQD``
    with a message saying TLS is required; qemu-img prints it, libnbd prints it in its debug
    output (its error says only "Operation not supported"). No session begins."""
    async with tls_export(tmp_path, certs, "asyncio") as export:
        code, _, err = await run_tool(tools["qemu-img"], "info", f"nbd://{export.nbd}/vm")
        assert code != 0
        assert "TLS" in err and "this NBD server requires TLS" in err, err
        env = {**os.environ, "LIBNBD_DEBUG": "1"}
        code, _, err = await run_tool(tools["nbdinfo"], f"nbd://{export.nbd}/vm", env=env)
        assert code != 0
        assert "this NBD server requires TLS: send NBD_OPT_STARTTLS first" in err, err
        text = await scrape(export.metrics)
        assert value(text, "tierdisk_nbd_sessions_total") == 0
        assert value(text, "tierdisk_nbd_connections_total") == 2


@pytest.mark.parametrize("loop", LOOPS)
async def test_with_nbd_tls_ca_only_clients_with_its_certificates_get_in(
    tmp_path: Path, certs: Certs, tools: dict[str, str], loop: str
) -> None:
    """Mutual TLS: with ``nbd_tls_ca`` a client without a certificate, or with one of another
    CA, is refused (nbdinfo and qemu-img); so is a client that does not trust the server's
    certificate. Each failed handshake is counted; a client with a certificate of the CA
    gets in, then and after the refusals (their connections are not held)."""
    async with tls_export(tmp_path, certs, loop, ca=True) as export:
        async with AsyncClient(export.grpc) as client:
            nbd = await client.volume("vm").inspect("nbd")
        assert nbd["tls"] is True and nbd["tls_client_certificates"] is True
        assert (
            await run_tool_ok(tools["nbdinfo"], "--size", export.uri(certs.good))
        ).strip() == str(SIZE)
        for folder in (certs.no_cert, certs.other_cert, certs.distrust):
            code, out, err = await run_tool(tools["nbdinfo"], "--size", export.uri(folder))
            assert code != 0 and not out, (folder.name, out, err)
        for folder in (certs.no_cert, certs.other_cert):
            code, _, err = await run_tool(tools["qemu-img"], "info", *export.qemu_args(folder))
            assert code != 0, (folder.name, err)
        await export.counted_failures(5)
        out = await run_tool_ok(
            tools["qemu-io"], *export.qemu_args(certs.good),
            "-c", "write -P 0x77 0 64k", "-c", "read -P 0x77 0 64k",
        )  # fmt: skip
        assert "Pattern verification failed" not in out, out
        assert await export.handshake_failures() == 5


async def test_a_failed_handshake_is_logged_naming_the_client_and_the_reason(
    tmp_path: Path, certs: Certs, tools: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tierdisk.service.nbd")
    async with tls_export(tmp_path, certs, "asyncio", ca=True) as export:
        code, _, _ = await run_tool(tools["nbdinfo"], "--size", export.uri(certs.no_cert))
        assert code != 0
        await export.counted_failures(1)
    said = [r.getMessage() for r in caplog.records if "TLS handshake failed" in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith("NBD 127.0.0.1:"), said
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in said[0], said


# -- the handshake rules, with a raw client -------------------------------------------------


def client_context(certs: Certs, *, cert: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca))
    if cert:
        folder = certs.good
        context.load_cert_chain(folder / "client-cert.pem", folder / "client-key.pem")
    return context


@pytest.fixture
async def tls_in_process(tmp_path: Path, certs: Certs) -> AsyncIterator[Server]:
    """An in-process server whose export requires TLS (no client certificates)."""
    async with running_server(tmp_path, tls_server(tmp_path / "data", certs)) as server:
        yield server


async def test_options_before_starttls_are_answered_tls_reqd(
    tls_in_process: Server, certs: Certs
) -> None:
    """Before TLS, every option but STARTTLS and ABORT is answered ``NBD_REP_ERR_TLS_REQD``
    (LIST, INFO, GO, STRUCTURED_REPLY, meta contexts, an unknown option); STARTTLS with data
    is ``NBD_REP_ERR_INVALID``; STARTTLS is ACKed and haggling goes on over TLS as in clear
    (no ``NBD_REP_ERR_TLS_REQD`` any more); a second STARTTLS is ``NBD_REP_ERR_INVALID``;
    requests then go over TLS."""
    server = tls_in_process
    client = await Raw.open(server.nbd_address)
    try:
        vm = struct.pack(">I", 2) + b"vm" + b"\0\0"
        for option, data in [
            (OPT_LIST, b""),
            (OPT_INFO, vm),
            (OPT_GO, vm),
            (OPT_STRUCTURED_REPLY, b""),
            (OPT_LIST_META_CONTEXT, struct.pack(">I", 2) + b"vm" + bytes(4)),
            (99, b"whatever"),
        ]:
            ((reply, message),) = await client.option(option, data)
            assert reply == REP_ERR_TLS_REQD, option
            assert b"requires TLS" in message, message
        assert (await client.option(OPT_STARTTLS, b"x"))[0][0] == REP_ERR_INVALID
        await client.starttls(client_context(certs, cert=False))
        listed = await client.option(OPT_LIST)
        assert listed == [(REP_SERVER, struct.pack(">I", 2) + b"vm"), (REP_ACK, b"")]
        ((reply, message),) = await client.option(OPT_STARTTLS)
        assert reply == REP_ERR_INVALID and b"TLS is already on" in message
        ((reply, _),) = await client.option(99)
        assert reply != REP_ERR_TLS_REQD
        await client.go("vm")
        await client.request(CMD_WRITE, 8192, 4096, b"\x42" * 4096)
        assert await client.request(CMD_READ, 8192, 4096) == b"\x42" * 4096
        assert server._nbd is not None and server._nbd.stats.sessions_active == 1
    finally:
        await client.close()


async def test_export_name_before_starttls_ends_the_connection(tls_in_process: Server) -> None:
    """``NBD_OPT_EXPORT_NAME`` cannot be answered an error: before TLS it ends the
    connection (nothing is sent); ABORT before TLS is answered ACK; a client that does not
    speak fixed newstyle cannot start TLS and is cut off after its flags; so is one that sends
    bytes after its STARTTLS without waiting for the reply (they cannot be TLS)."""
    address = tls_in_process.nbd_address
    client = await Raw.open(address)
    client.send_option(OPT_EXPORT_NAME, b"vm")
    assert await client.closed()
    await client.close()
    client = await Raw.open(address)
    assert await client.option(OPT_ABORT) == [(REP_ACK, b"")]
    await client.close()
    client = await Raw.open(address, flags=0)
    assert await client.closed()
    await client.close()
    client = await Raw.open(address)
    header = struct.pack(">QII", IHAVEOPT, OPT_STARTTLS, 0)
    client.writer.write(header + b"\x16\x03\x01 not a ClientHello")  # one segment
    assert await client.closed()  # no NBD_REP_ACK came first
    await client.close()
    stats = tls_in_process._nbd.stats if tls_in_process._nbd is not None else None
    assert stats is not None and stats.sessions_total == 0


async def test_a_failed_tls_handshake_frees_its_connection_slot(
    tmp_path: Path, certs: Certs
) -> None:
    """With ``nbd_max_connections = 1``: a client that sends garbage instead of a TLS
    ClientHello is cut off and counted, and its connection no longer counts against the
    limit: the next client gets in (over TLS)."""
    body = tls_server(tmp_path / "data", certs, extra="nbd_max_connections = 1")
    async with running_server(tmp_path, body) as server:
        bad = await Raw.open(server.nbd_address)
        assert await bad.option(OPT_STARTTLS) == [(REP_ACK, b"")]
        bad.writer.write(b"GET / HTTP/1.0\r\n\r\n" * 10)
        assert await bad.closed()
        await bad.close()
        assert server._nbd is not None
        stats = server._nbd.stats
        assert stats.tls_handshake_failures == 1
        good = await Raw.open(server.nbd_address)
        try:
            await good.starttls(client_context(certs, cert=False))
            await good.go("vm")
            assert await good.request(CMD_READ, 0, 512) == bytes(512)
        finally:
            await good.close()
        assert stats.connections_refused == 0


async def test_clients_that_have_not_done_tls_hold_no_place_of_those_that_have(
    tmp_path: Path, certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``nbd_max_connections = 1``: a connection that sends nothing (no TLS) does not
    keep a client with TLS out; a second one waiting for TLS is one too many and is closed at
    once (counted as refused); and the one that sends nothing is cut off at the TLS deadline
    (here 1 s) and counted as a failed TLS handshake."""
    monkeypatch.setattr(nbd_session, "TLS_DEADLINE", 1.0)
    body = tls_server(tmp_path / "data", certs, extra="nbd_max_connections = 1")
    async with running_server(tmp_path, body) as server:
        assert server._nbd is not None
        stats = server._nbd.stats
        idle = await Raw.open(server.nbd_address)  # connected, sends no option
        host, port = server.nbd_address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))  # one too many
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, not even greeted
        writer.close()
        assert stats.connections_refused == 1
        await eventually("the idle client to be cut off", idle.closed)
        await idle.close()
        assert stats.tls_handshake_failures == 1
        good = await Raw.open(server.nbd_address)  # and a client with TLS gets in
        try:
            await good.starttls(client_context(certs, cert=False))
            await good.go("vm")
            assert await good.request(CMD_READ, 0, 512) == bytes(512)
            other = await Raw.open(server.nbd_address)  # waiting for TLS: not refused yet
            await other.starttls(client_context(certs, cert=False))
            replies = await other.option(OPT_GO, struct.pack(">I", 2) + b"vm\0\0")
            assert replies[-1][0] == REP_ERR_POLICY, replies  # over the limit once TLS is on
            await other.close()
        finally:
            await good.close()
        assert stats.connections_refused == 2


async def test_long_options_before_tls_are_a_hard_disconnect(tls_in_process: Server) -> None:
    """Before TLS only NBD_OPT_STARTTLS is of use: an option announcing more than 8 KiB of
    data ends the connection at once (the server holds no MiB for a client it does not know
    yet); 4 KiB (the longest export name) is answered as any option before TLS."""
    client = await Raw.open(tls_in_process.nbd_address)
    try:
        name = b"v" * 4096
        replies = await client.option(OPT_GO, struct.pack(">I", len(name)) + name + b"\0\0")
        assert [reply for reply, _ in replies] == [REP_ERR_TLS_REQD]
        client.writer.write(struct.pack(">QII", IHAVEOPT, OPT_GO, 1 << 20))  # no data follows
        assert await client.closed()
    finally:
        await client.close()


async def test_the_handshake_timeout_covers_the_tls_handshake(
    tmp_path: Path, certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that sends STARTTLS and then nothing is cut off when the handshake's time
    (here 1 s) runs out, and its slot is freed."""
    monkeypatch.setattr(nbd_session, "_HANDSHAKE_TIMEOUT", 1.0)
    async with running_server(tmp_path, tls_server(tmp_path / "data", certs)) as server:
        client = await Raw.open(server.nbd_address)
        assert await client.option(OPT_STARTTLS) == [(REP_ACK, b"")]
        started = time.monotonic()
        assert await client.closed()
        assert time.monotonic() - started < 5
        await client.close()
        assert server._nbd is not None
        nbd = server._nbd
        deadline = time.monotonic() + 5
        while nbd._sessions:
            assert time.monotonic() < deadline, "the session was not removed"
            await asyncio.sleep(0.02)


async def test_stop_ends_tls_sessions_and_tls_handshakes_promptly(
    tmp_path: Path, certs: Certs
) -> None:
    """At stop, a TLS session is closed (after its requests) and a client stuck in the TLS
    handshake is cut off: the stop does not wait for either."""
    async with running_server(tmp_path, tls_server(tmp_path / "data", certs)) as server:
        session = await Raw.open(server.nbd_address)
        await session.starttls(client_context(certs, cert=False))
        await session.go("vm")
        stuck = await Raw.open(server.nbd_address)
        assert await stuck.option(OPT_STARTTLS) == [(REP_ACK, b"")]
        started = time.monotonic()
        await server.stop(grace=5)
        assert time.monotonic() - started < 5
        assert await session.closed() and await stuck.closed()
        await session.close()
        await stuck.close()


async def test_pipelined_requests_over_tls_pause_and_resume_reading(
    tls_in_process: Server, certs: Certs
) -> None:
    """300 reads of 256 KiB sent at once (75 MiB of replies: past the session's 256 requests
    and 64 MiB in flight) before any reply is read: the session pauses reading the TLS
    transport and resumes as replies drain; every reply arrives, in full."""
    client = await Raw.open(tls_in_process.nbd_address)
    try:
        await client.starttls(client_context(certs, cert=False))
        await client.go("vm")
        pattern = bytes(range(256)) * 1024  # 256 KiB
        await client.request(CMD_WRITE, 0, len(pattern), pattern)
        count, length = 300, len(pattern)
        client.writer.write(
            b"".join(
                struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, 1000 + i, 0, length)
                for i in range(count)
            )
        )
        seen = set()
        for _ in range(count):
            header = await asyncio.wait_for(client.reader.readexactly(16), 30)
            magic, error, handle = struct.unpack(">IIQ", header)
            assert (magic, error) == (SIMPLE_MAGIC, 0)
            assert await client.reader.readexactly(length) == pattern
            seen.add(handle)
        assert seen == {1000 + i for i in range(count)}
    finally:
        await client.close()


class SlowRam(RamLayer):
    """A RAM layer whose reads wait while ``gate`` is not set: a slow tier (as test_nbd.py's
    FlakyLayer), so requests stay in flight while the server shuts down."""

    kind = "slow"

    def __init__(self, size: int) -> None:
        super().__init__(size=size)
        self.gate = asyncio.Event()
        self.waiting = 0

    async def read(self, buf: memoryview, sector: int) -> list[Run]:
        self.waiting += 1
        await self.gate.wait()
        self.waiting -= 1
        return await super().read(buf, sector)


async def test_shutdown_over_tls_finishes_started_requests_and_refuses_the_rest(
    certs: Certs,
) -> None:
    """A TLS session with 300 reads pipelined on a slow volume: at shutdown the 256 started
    finish and the rest are answered ``ESHUTDOWN`` (108), over the TLS transport; then the
    connection closes."""
    layer = SlowRam(1 << 20)
    volume = await Volume.open("slow", [LayerEntry(layer)])
    registry = VolumeRegistry(["slow"])
    registry.set_ready(volume)
    config = ServerConfig(
        nbd="127.0.0.1:0", nbd_tls_cert=str(certs.server_cert), nbd_tls_key=str(certs.server_key)
    )
    stats = NbdStats()
    server = await start_nbd_server(
        "127.0.0.1:0", registry, max_io=MiB, stats=stats, tls=nbd_tls_context(config)
    )
    try:
        client = await Raw.open(server.address)
        await client.starttls(client_context(certs, cert=False))
        await client.go("slow")
        count = 300
        client.writer.write(
            b"".join(
                struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, 1 + i, i * SS, SS)
                for i in range(count)
            )
        )
        await eventually("256 reads started", lambda: layer.waiting >= 256)
        closing = asyncio.create_task(server.close())
        await eventually("the rest refused", lambda: stats.requests["read", "ESHUTDOWN"] > 0)
        layer.gate.set()
        await asyncio.wait_for(closing, 20)
        errors: list[int] = []
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while len(errors) < count:
                header = await asyncio.wait_for(client.reader.readexactly(16), 10)
                magic, error, _ = struct.unpack(">IIQ", header)
                assert magic == SIMPLE_MAGIC
                if not error:
                    assert await client.reader.readexactly(SS) == bytes(SS)
                errors.append(error)
        assert errors.count(0) == 256, errors
        assert errors.count(108) == count - 256 == stats.requests["read", "ESHUTDOWN"]
        assert await client.closed()
        await client.close()
    finally:
        await server.close()
        await volume.close()


# -- a remote layer over an origin whose export requires TLS -------------------------------


async def test_a_remote_layer_reads_over_grpc_from_an_origin_whose_nbd_requires_tls(
    tmp_path: Path, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    """A remote layer without ``tls = true`` reads NBD in clear only: against an origin whose
    export requires TLS, ``nbd = "auto"`` and an explicit address both read over gRPC, with
    the reason in ``inspect``; ``auto`` logs it once at info level, the explicit address as a
    warning."""
    caplog.set_level(logging.INFO, logger="tierdisk.service.layers.remote_nbd")
    origin_body = tls_server(tmp_path / "origin", certs)
    async with running_server(tmp_path / "origin", origin_body) as origin:
        data = random.Random(3).randbytes(64 * SS)
        async with AsyncClient(origin.grpc_address) as client:
            await client.volume("vm").write(0, data)
        body = toml_volume("auto", remote(origin.grpc_address, "vm", nbd="auto"))
        body += toml_volume("explicit", remote(origin.grpc_address, "vm", nbd=origin.nbd_address))
        async with (
            running_server(tmp_path / "proxy", body) as proxy,
            AsyncClient(proxy.grpc_address) as client,
        ):
            for name in ("auto", "explicit"):
                vol = client.volume(name)
                assert await vol.read(0, 64) == data, name
                tree = await vol.inspect("layers/0")
                assert tree["nbd"]["address"] == origin.nbd_address, name
                assert tree["nbd"]["connected"] is False, name
                problem = tree["nbd"]["problem"]
                assert f"the NBD export at {origin.nbd_address} requires TLS" in problem, problem
                assert tree["requests"]["Read"] == {"OK": 1}, name
                assert "NbdRead" not in tree["requests"], name
    said = [r for r in caplog.records if "requires TLS" in r.getMessage()]
    assert sorted(r.levelno for r in said) == [logging.INFO, logging.WARNING], [
        r.getMessage() for r in said
    ]


# -- config -----------------------------------------------------------------------------------


def _config(tmp_path: Path, server: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\nnbd = "127.0.0.1:0"\ndata_dir = "{tmp_path / "d"}"\n'
        + server
        + toml_volume("vm", ram("1MiB"))
    )
    return path


def test_the_tls_keys_load_the_files_and_resolve_paths_against_data_dir(
    tmp_path: Path, certs: Certs
) -> None:
    """Relative paths are resolved against ``data_dir`` (as a layer's path), the flag comes
    before the environment before the file; the context takes TLS 1.2 at least and asks
    clients for a certificate only with ``nbd_tls_ca``."""
    data = tmp_path / "d"
    data.mkdir()
    for source in (certs.server_cert, certs.server_key, certs.ca):
        (data / source.name).write_bytes(source.read_bytes())
    path = _config(tmp_path, 'nbd_tls_cert = "server-cert.pem"\nnbd_tls_key = "server-key.pem"\n')
    server = load_config(str(path), environ={}).server
    assert (server.nbd_tls_cert, server.nbd_tls_key, server.nbd_tls_ca) == (
        str(data / "server-cert.pem"),
        str(data / "server-key.pem"),
        "",
    )
    context = nbd_tls_context(server)
    assert context is not None and context.verify_mode == ssl.CERT_NONE
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    environ = {"TIERDISK_SERVER_NBD_TLS_CA": "ca-cert.pem"}
    server = load_config(str(path), environ=environ).server
    assert server.nbd_tls_ca == str(data / "ca-cert.pem")
    context = nbd_tls_context(server)
    assert context is not None and context.verify_mode == ssl.CERT_REQUIRED
    server = load_config(str(path), environ=environ, flags={"nbd_tls_ca": str(certs.ca)}).server
    assert server.nbd_tls_ca == str(certs.ca)  # the flag first
    off = {"nbd_tls_cert": "", "nbd_tls_key": ""}  # "" turns a key off, as for nbd
    with pytest.raises(ConfigError) as info:
        load_config(str(path), environ=environ, flags=off)
    assert str(info.value).startswith(
        "TIERDISK_SERVER_NBD_TLS_CA is set but nbd_tls_cert and nbd_tls_key are not"
    )


@pytest.mark.parametrize(
    ("files", "fragment"),
    [
        (
            ("server_cert", "other_key", None),
            "--nbd-tls-key OTHER_KEY is not the private key of the certificate in "
            "--nbd-tls-cert SERVER_CERT",
        ),
        (
            ("server_cert", "encrypted_key", None),
            "--nbd-tls-key ENCRYPTED_KEY is encrypted (it asks for a passphrase)",
        ),
        (("server_key", "server_key", None), "--nbd-tls-cert SERVER_KEY holds no PEM certificate"),
        (
            ("server_cert", "server_cert", None),
            "--nbd-tls-key SERVER_CERT holds no PEM private key",
        ),
        (
            ("server_cert", "server_key", "other_key"),
            "--nbd-tls-ca OTHER_KEY holds no PEM certificate (a CA bundle)",
        ),
    ],
)
def test_tls_files_that_do_not_load_exit_2_with_one_line(
    tmp_path: Path, certs: Certs, files: tuple[str, str, str | None], fragment: str
) -> None:
    """``tierdisk serve`` loads the files at start: a key that is not the certificate's,
    an encrypted key (no prompt), a file that is not what its key needs: exit 2, one line
    naming the flag and the file, no traceback."""
    paths = [getattr(certs, name) if name else None for name in files]
    args = ["--nbd", "127.0.0.1:0", "--nbd-tls-cert", str(paths[0]), "--nbd-tls-key", str(paths[1])]
    if paths[2] is not None:
        args += ["--nbd-tls-ca", str(paths[2])]
    for name in ("other_key", "encrypted_key", "server_key", "server_cert"):
        fragment = fragment.replace(name.upper(), str(getattr(certs, name)))
    result = serve_once(tmp_path, "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path), *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tierdisk serve: config error: "), lines
    assert fragment in lines[0], lines
    assert "Traceback" not in result.stderr
