"""The NBD export against real clients (qemu-img, qemu-io, nbdinfo, nbdcopy, nbdsh and
python3-libnbd) and a raw-socket client that checks what the tools do not show.

Every test starts the server in its own event loop on 127.0.0.1 port 0, over ram, ram/raw,
ram read-cache/raw and read-only raw volumes, and runs the clients as subprocesses
(asyncio.create_subprocess_exec; each is killed by its PID if it hangs).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import shutil
import socket
import struct
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tools import REQUIRE_TOOLS_ENV, require_tool, run_tool, run_tool_ok
from waiting import eventually

from tierdisk.service import nbd_commands
from tierdisk.service.errors import (
    NoSpace,
    StorageError,
    TierdiskError,
    Unavailable,
    WritesLost,
)
from tierdisk.service.layer import UnmapBehavior
from tierdisk.service.layers.ram import RamLayer
from tierdisk.service.layers.raw import RawLayer
from tierdisk.service.nbd import NbdServer, NbdStats, start_nbd_server
from tierdisk.service.registry import VolumeRegistry
from tierdisk.service.runs import Run
from tierdisk.service.volume import LayerEntry, Volume

SS = 512
SIZE = 16 << 20  # every volume
MAX_IO = 4 << 20

# -- the protocol, typed from the NBD spec (independently of the server's own module) ------

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS = 1, 2, 3, 5
OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY = 6, 7, 8
OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 9, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR_UNSUP, REP_ERR_INVALID, REP_ERR_UNKNOWN = (1 << 31) + 1, (1 << 31) + 3, (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7
INFO_EXPORT, INFO_NAME, INFO_BLOCK_SIZE = 0, 1, 3
FLAG_READ_ONLY, FLAG_SEND_FLUSH, FLAG_SEND_FUA = 1 << 1, 1 << 2, 1 << 3
FLAG_SEND_TRIM, FLAG_SEND_WRITE_ZEROES, FLAG_CAN_MULTI_CONN = 1 << 5, 1 << 6, 1 << 8
FLAG_SEND_CACHE, FLAG_SEND_FAST_ZERO = 1 << 10, 1 << 11
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM = 0, 1, 2, 3, 4
CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 5, 6, 7
CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_DF = 1, 2, 4
CMD_FLAG_REQ_ONE, CMD_FLAG_FAST_ZERO = 8, 16
REPLY_FLAG_DONE = 1
CHUNK_NONE, CHUNK_DATA, CHUNK_HOLE, CHUNK_BLOCK_STATUS = 0, 1, 2, 5
EPERM, EIO, EINVAL, ENOSPC, ENOTSUP = 1, 5, 22, 28, 95


# -- helpers ---------------------------------------------------------------------------------


SYSTEM_PYTHON = "/usr/bin/python3"
# nbdsh runs `python3 -m nbd` from PATH: the Debian python3 has the libnbd module.
SYSTEM_ENV = {**os.environ, "PATH": "/usr/bin:/bin"}


async def require_libnbd_python() -> str:
    """The system python with python3-libnbd; skip (or fail under CI) when missing."""
    reason = "python3-libnbd is not importable by /usr/bin/python3 (apt-get install python3-libnbd)"
    try:
        code, _, _ = await run_tool(SYSTEM_PYTHON, "-c", "import nbd")
    except FileNotFoundError:
        code = -1
    if code == 0:
        return SYSTEM_PYTHON
    if os.environ.get(REQUIRE_TOOLS_ENV) == "1":
        pytest.fail(f"{reason}; {REQUIRE_TOOLS_ENV}=1 requires it", pytrace=False)
    pytest.skip(reason)


def tagged(tag: int, nbytes: int) -> bytes:
    """``nbytes`` of a pattern that names ``tag`` (never zeros)."""
    return struct.pack("<QQ", tag | 1 << 63, tag) * (nbytes // 16) + b"\x5a" * (nbytes % 16)


class FlakyLayer(RamLayer):
    """A RAM layer whose I/O fails with ``fail`` while it is set (a remote tier down), and
    whose reads wait for ``gate`` while it is set (a slow tier)."""

    kind = "flaky"

    def __init__(self, size: int) -> None:
        super().__init__(size=size)
        self.fail: TierdiskError | None = None
        self.gate: asyncio.Event | None = None
        self.waiting = 0

    async def read(self, buf: memoryview, sector: int) -> list[Run]:
        if self.gate is not None:
            self.waiting += 1
            await self.gate.wait()
            self.waiting -= 1
        if self.fail is not None:
            raise self.fail
        return await super().read(buf, sector)

    async def write(self, data: memoryview, sector: int, fua: bool) -> None:
        if self.fail is not None:
            raise self.fail
        await super().write(data, sector, fua)

    async def flush(self) -> None:
        if self.fail is not None:
            raise self.fail
        await super().flush()

    @property
    def keeps_writes(self) -> bool:
        return True  # it stands for a tier or a disk: what it holds outlives the server


# -- a raw NBD client ---------------------------------------------------------------------------


class OptionError(Exception):
    def __init__(self, reply: int, message: bytes) -> None:
        super().__init__(f"option refused: {reply:#x} {message!r}")
        self.reply = reply


@dataclass
class Reply:
    error: int = 0
    message: str = ""
    data: bytearray = field(default_factory=bytearray)
    chunks: list[tuple[int, int, int]] = field(default_factory=list)  # (type, offset, length)
    extents: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    structured: bool = False


class RawClient:
    """A minimal NBD client over asyncio streams: many requests in flight, replies matched
    by handle, structured chunks reassembled and kept for inspection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.size = 0
        self.flags = 0
        self.name = ""
        self.block_sizes: tuple[int, int, int] | None = None
        self.contexts: dict[str, int] = {}
        self._pending: dict[int, tuple[int, int, asyncio.Future[Reply], Reply]] = {}
        self._handle = 0
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, port: int, *, no_zeroes: bool = True) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        magic, ihaveopt, hflags = struct.unpack(">QQH", await reader.readexactly(18))
        assert (magic, ihaveopt) == (NBDMAGIC, IHAVEOPT)
        assert hflags & 1, "the server must offer fixed newstyle"
        writer.write(struct.pack(">I", 1 | (2 if no_zeroes else 0)))
        return cls(reader, writer)

    @classmethod
    async def connect(
        cls,
        port: int,
        export: str,
        *,
        structured: bool = True,
        block_size: bool = False,
        contexts: Sequence[str] = (),
    ) -> RawClient:
        client = await cls.open(port)
        if structured:
            assert (await client.option(OPT_STRUCTURED_REPLY))[-1][0] == REP_ACK
        if contexts:
            await client.set_meta_context(export, *contexts)
        await client.go(export, block_size=block_size)
        return client

    async def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; every reply up to the final one (ACK or an error)."""
        self.writer.write(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
        replies = []
        while True:
            magic, ropt, rtype, rlen = struct.unpack(">QIII", await self.reader.readexactly(20))
            assert (magic, ropt) == (OPT_REPLY_MAGIC, opt)
            replies.append((rtype, await self.reader.readexactly(rlen)))
            if rtype == REP_ACK or rtype & 1 << 31:
                return replies

    async def set_meta_context(self, export: str, *queries: str) -> dict[str, int]:
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
        for q in queries:
            data += struct.pack(">I", len(q)) + q.encode()
        replies = await self.option(OPT_SET_META_CONTEXT, data)
        assert replies[-1][0] == REP_ACK, replies
        self.contexts = {p[4:].decode(): struct.unpack(">I", p[:4])[0] for _, p in replies[:-1]}
        return self.contexts

    @staticmethod
    def info_request(export: str, infos: Sequence[int]) -> bytes:
        name = export.encode()
        return struct.pack(f">I{len(name)}sH{len(infos)}H", len(name), name, len(infos), *infos)

    def take_infos(self, replies: list[tuple[int, bytes]]) -> None:
        for rtype, payload in replies:
            assert rtype == REP_INFO, rtype
            (info,) = struct.unpack(">H", payload[:2])
            if info == INFO_EXPORT:
                self.size, self.flags = struct.unpack(">QH", payload[2:])
            elif info == INFO_NAME:
                self.name = payload[2:].decode()
            elif info == INFO_BLOCK_SIZE:
                self.block_sizes = struct.unpack(">III", payload[2:])

    async def go(self, export: str, *, block_size: bool = False) -> None:
        infos = [INFO_NAME] + ([INFO_BLOCK_SIZE] if block_size else [])
        replies = await self.option(OPT_GO, self.info_request(export, infos))
        if replies[-1][0] != REP_ACK:
            raise OptionError(*replies[-1])
        self.take_infos(replies[:-1])
        self._task = asyncio.create_task(self._read_replies())

    def send(
        self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b""
    ) -> asyncio.Future[Reply]:
        self._handle += 1
        handle = self._handle
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        reply = Reply(data=bytearray(length if cmd == CMD_READ else 0))
        self._pending[handle] = (cmd, offset, fut, reply)
        header = struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, handle, offset, length)
        self.writer.write(header + data)
        return fut

    async def request(
        self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b""
    ) -> Reply:
        return await self.send(cmd, offset, length, flags, data)

    async def read(self, offset: int, length: int, flags: int = 0) -> bytes:
        reply = await self.request(CMD_READ, offset, length, flags)
        assert reply.error == 0, (reply.error, reply.message)
        if reply.structured:
            covered = sum(n for t, _, n in reply.chunks if t in (CHUNK_DATA, CHUNK_HOLE))
            assert covered == length, reply.chunks
        return bytes(reply.data)

    async def write(self, offset: int, data: bytes, flags: int = 0) -> None:
        reply = await self.request(CMD_WRITE, offset, len(data), flags, data)
        assert reply.error == 0, (reply.error, reply.message)

    async def _read_replies(self) -> None:
        r = self.reader
        try:
            while True:
                (magic,) = struct.unpack(">I", await r.readexactly(4))
                if magic == SIMPLE_MAGIC:
                    error, handle = struct.unpack(">IQ", await r.readexactly(12))
                    cmd, offset, fut, reply = self._pending.pop(handle)
                    reply.error = error
                    if cmd == CMD_READ and not error:
                        reply.data[:] = await r.readexactly(len(reply.data))
                    fut.set_result(reply)
                    continue
                assert magic == STRUCTURED_MAGIC, hex(magic)
                flags, rtype, handle, plen = struct.unpack(">HHQI", await r.readexactly(16))
                payload = await r.readexactly(plen)
                cmd, offset, fut, reply = self._pending[handle]
                reply.structured = True
                if rtype == CHUNK_DATA:
                    (off,) = struct.unpack(">Q", payload[:8])
                    reply.data[off - offset : off - offset + plen - 8] = payload[8:]
                    reply.chunks.append((rtype, off, plen - 8))
                elif rtype == CHUNK_HOLE:
                    off, n = struct.unpack(">QI", payload)
                    assert not any(reply.data[off - offset : off - offset + n])
                    reply.chunks.append((rtype, off, n))
                elif rtype == CHUNK_BLOCK_STATUS:
                    (ctx,) = struct.unpack(">I", payload[:4])
                    words = struct.unpack(f">{(plen - 4) // 4}I", payload[4:])
                    reply.extents[ctx] = list(zip(words[::2], words[1::2], strict=True))
                elif rtype & 0x8000:
                    reply.error, mlen = struct.unpack(">IH", payload[:6])
                    reply.message = payload[6 : 6 + mlen].decode()
                else:
                    assert rtype == CHUNK_NONE, rtype
                if flags & REPLY_FLAG_DONE:
                    del self._pending[handle]
                    fut.set_result(reply)
        except (asyncio.IncompleteReadError, ConnectionError):
            for _, _, fut, _ in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("the server closed the connection"))

    async def close(self) -> None:
        if self._task is not None and not self.writer.is_closing():
            self.writer.write(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
            await asyncio.wait_for(self._task, 10)  # the server closes after DISC
        self.writer.close()
        await asyncio.gather(self.writer.wait_closed(), return_exceptions=True)


# -- the server under test ---------------------------------------------------------------------


@dataclass(repr=False)  # its 16 MiB images make a repr (pytest asks) very slow
class Env:
    server: NbdServer
    stats: NbdStats
    vols: dict[str, Volume]
    base: bytes  # initial content of the raw layer of "stack"
    cache_base: bytes  # content of the raw layer under "cached"
    ro_data: bytes  # content of "ro"
    flaky: FlakyLayer
    folder: Path

    @property
    def port(self) -> int:
        return int(self.server.address.rsplit(":", 1)[1])

    def uri(self, name: str) -> str:
        return f"nbd://127.0.0.1:{self.port}/{name}"

    async def client(self, export: str, **kwargs: Any) -> RawClient:
        return await RawClient.connect(self.port, export, **kwargs)


async def _open(name: str, entries: list[LayerEntry], read_only: bool = False) -> Volume:
    return await Volume.open(name, entries, read_only=read_only)


@functools.cache
def images() -> tuple[bytes, bytes, bytes]:
    """Random contents of the three raw images (made once per run)."""
    rng = random.Random(1234)
    return rng.randbytes(SIZE), rng.randbytes(SIZE), rng.randbytes(SIZE)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    base, cache_base, ro_data = images()
    for file, data in (("base.img", base), ("cache.img", cache_base), ("ro.img", ro_data)):
        (tmp_path / file).write_bytes(data)
    flaky = FlakyLayer(SIZE)
    vols: dict[str, Volume] = {}
    try:
        vols["ram"] = await _open("ram", [LayerEntry(RamLayer(size=SIZE))])
        vols["stack"] = await _open(
            "stack", [LayerEntry(RamLayer()), LayerEntry(RawLayer(str(tmp_path / "base.img")))]
        )
        vols["cached"] = await _open(
            "cached",
            [
                LayerEntry(RamLayer(), read_cache=True),
                LayerEntry(RawLayer(str(tmp_path / "cache.img"), read_only=True)),
            ],
        )
        vols["ro"] = await _open(
            "ro", [LayerEntry(RawLayer(str(tmp_path / "ro.img"), read_only=True))], read_only=True
        )
        vols["flaky"] = await _open("flaky", [LayerEntry(flaky)])
        registry = VolumeRegistry(list(vols))
        for volume in vols.values():
            registry.set_ready(volume)
        stats = NbdStats()
        server = await start_nbd_server("127.0.0.1:0", registry, max_io=MAX_IO, stats=stats)
        try:
            yield Env(server, stats, vols, base, cache_base, ro_data, flaky, tmp_path)
        finally:
            await server.close()
    finally:
        for volume in vols.values():
            await volume.close()


def merged(runs: Sequence[tuple[int, int, Any]]) -> list[tuple[int, int, Any]]:
    """Join adjacent ``(start, length, value)`` runs of equal value."""
    out: list[tuple[int, int, Any]] = []
    for start, length, value in runs:
        if out and out[-1][2] == value and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length, value)
        else:
            out.append((start, length, value))
    return out


async def byte_allocation(volume: Volume) -> list[tuple[int, int, int]]:
    """``volume.allocation`` of the whole volume in bytes: (start, length, depth)."""
    runs = await volume.allocation(0, volume.sector_count)
    return [(a * SS, (b - a) * SS, depth) for a, b, depth in runs]


# -- qemu-img, qemu-io --------------------------------------------------------------------------


async def test_qemu_img_info_convert_compare(env: Env) -> None:
    qemu_img = require_tool("qemu-img")
    info = json.loads(await run_tool_ok(qemu_img, "info", "--output=json", env.uri("stack")))
    assert info["virtual-size"] == SIZE
    assert info["format"] == "raw"

    rng = random.Random(7)
    image = bytearray(SIZE)  # data with holes, in and out
    for start in (0, 3 << 20, 3 << 20 | 77 * SS, 9 << 20, SIZE - (1 << 20)):
        image[start : start + (256 << 10)] = rng.randbytes(256 << 10)
    src, dst = env.folder / "in.img", env.folder / "out.img"
    src.write_bytes(image)
    await run_tool_ok(
        qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(src), env.uri("stack")
    )
    data, _ = await env.vols["stack"].read(0, SIZE // SS)
    assert data == image  # the base's random bytes are gone everywhere, holes included
    await run_tool_ok(qemu_img, "compare", "-f", "raw", "-F", "raw", str(src), env.uri("stack"))
    await run_tool_ok(qemu_img, "convert", "-f", "raw", "-O", "raw", env.uri("stack"), str(dst))
    assert dst.read_bytes() == image


async def test_qemu_img_map_matches_allocation(env: Env) -> None:
    qemu_img = require_tool("qemu-img")
    ram, stack = env.vols["ram"], env.vols["stack"]
    for volume in (ram, stack):
        await volume.write(2048, tagged(1, 64 << 10))
        await volume.write(8192, tagged(2, 1 << 20))
        await volume.unmap(8192 + 128, 256)
        await volume.write(30000, tagged(3, 4096))

    # base:allocation on a one-layer volume: holes where no layer holds the data.
    out = json.loads(
        await run_tool_ok(qemu_img, "map", "--output=json", "-f", "raw", env.uri("ram"))
    )
    seen = merged([(e["start"], e["length"], (e["data"], e["zero"])) for e in out])
    want = merged([(s, n, (d >= 0, d < 0)) for s, n, d in await byte_allocation(ram)])
    assert seen == want
    assert any(not d for _, _, (d, _) in seen) and any(d for _, _, (d, _) in seen)

    # qemu:allocation-depth through qemu's x-dirty-bitmap: its flags read as base:allocation
    # bits, so depth+1 = 1 (top) shows as data=false, 2 (the raw layer) as zero=true.
    opts = (
        f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={env.port},"
        "export=stack,x-dirty-bitmap=qemu:allocation-depth"
    )
    out = json.loads(await run_tool_ok(qemu_img, "map", "--output=json", "--image-opts", opts))
    seen = merged([(e["start"], e["length"], (e["data"], e["zero"])) for e in out])
    status = {-1: (True, False), 0: (False, False), 1: (True, True)}
    want = merged([(s, n, status[d]) for s, n, d in await byte_allocation(stack)])
    assert seen == want
    assert {v for _, _, v in seen} == {(False, False), (True, True)}


async def test_qemu_io_patterns(env: Env) -> None:
    qemu_io = require_tool("qemu-io")
    commands = [
        "write -P 0xab 0 64k",
        "write -P 0xcd 1M 4k",
        "write -f -P 0x11 2M 1M",  # FUA
        "read -P 0xab 0 64k",
        "read -P 0xcd 1M 4k",
        "read -P 0x11 2M 1M",
        "write -P 0x22 4096 512",  # over part of the first write
        "read -P 0x22 4096 512",
        "read -P 0xab 0 4096",
        "discard 8k 8k",
        "read -P 0 8k 8k",
        "write -z 3M 64k",  # WRITE_ZEROES with NO_HOLE
        "read -P 0 3M 64k",
        "write -z -u 2M 64k",  # WRITE_ZEROES that may unmap
        "read -P 0 2M 64k",
        "read -P 0x11 2112k 960k",
        "write -P 0x33 100 7",  # qemu aligns this itself (read-modify-write on its side)
        "read -P 0x33 100 7",
        "flush",
    ]
    args = [qemu_io, "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    out = await run_tool_ok(*args, env.uri("stack"))
    assert "verification failed" not in out.lower() and "error" not in out.lower(), out
    data, _ = await env.vols["stack"].read(0, 4 << 20 >> 9)
    assert data[:100] == b"\xab" * 100 and data[100:107] == b"\x33" * 7
    assert data[107:4096] == b"\xab" * (4096 - 107) and data[4096:4608] == b"\x22" * 512
    assert data[8192:16384] == bytes(8192)  # discarded over the raw base: zeros, not base
    assert data[3 << 20 : (3 << 20) + (64 << 10)] == bytes(64 << 10)
    assert data[(2 << 20) + (64 << 10) : 3 << 20] == b"\x11" * (960 << 10)


async def test_qemu_io_discard_of_an_unaligned_range(env: Env) -> None:
    """qemu asks for the block sizes (so misaligned requests may be refused) and still sends
    a discard's unaligned head and tail as TRIMs of their own: the discard succeeds, and the
    sectors it covers only partly keep their data."""
    qemu_io = require_tool("qemu-io")
    commands = ["write -P 0xab 0 16k", "discard 100 9000", "flush"]
    args = [qemu_io, "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    out = await run_tool_ok(*args, env.uri("stack"))
    assert "failed" not in out.lower() and "error" not in out.lower(), out
    data, _ = await env.vols["stack"].read(0, 32)
    assert data[:512] == b"\xab" * 512  # the head's sector, partly covered
    assert data[8704:] == b"\xab" * (16384 - 8704)  # the tail's sector and beyond


# -- nbdinfo, nbdcopy ---------------------------------------------------------------------------


async def test_nbdinfo_list_and_maps(env: Env) -> None:
    nbdinfo = require_tool("nbdinfo")
    listing = json.loads(await run_tool_ok(nbdinfo, "--json", "--list", env.uri("")))
    exports = {e["export-name"]: e for e in listing["exports"]}
    assert list(exports) == ["ram", "stack", "cached", "ro", "flaky"]
    assert exports["ro"]["is_read_only"] and not exports["ram"]["is_read_only"]
    ram = exports["ram"]
    assert ram["export-size"] == SIZE
    assert ram["can_multi_conn"] and ram["can_flush"] and ram["can_fua"] and ram["can_cache"]
    assert ram["can_trim"] and ram["can_zero"] and ram["can_fast_zero"]
    assert (ram["block_size_minimum"], ram["block_size_preferred"]) == (SS, 4096)
    assert ram["block_size_maximum"] == MAX_IO
    assert set(ram["contexts"]) == {"base:allocation", "qemu:allocation-depth"}

    stack = env.vols["stack"]
    await stack.write(4096, tagged(5, 1 << 20))
    await stack.write(10000, tagged(6, 8192))
    out = await run_tool_ok(nbdinfo, "--json", "--map=qemu:allocation-depth", env.uri("stack"))
    seen = merged([(e["offset"], e["length"], e["type"]) for e in json.loads(out)])
    want = merged([(s, n, d + 1) for s, n, d in await byte_allocation(stack)])
    assert seen == want and {t for _, _, t in seen} == {1, 2}

    ram_vol = env.vols["ram"]
    await ram_vol.write(2048, tagged(7, 1 << 20))
    out = await run_tool_ok(nbdinfo, "--json", "--map", env.uri("ram"))
    seen = merged([(e["offset"], e["length"], e["type"]) for e in json.loads(out)])
    want = merged([(s, n, 0 if d >= 0 else 3) for s, n, d in await byte_allocation(ram_vol)])
    assert seen == want
    out = await run_tool_ok(nbdinfo, "--json", "--map=qemu:allocation-depth", env.uri("ram"))
    seen = merged([(e["offset"], e["length"], e["type"]) for e in json.loads(out)])
    assert seen == merged([(s, n, d + 1) for s, n, d in await byte_allocation(ram_vol)])


async def test_nbdcopy_both_ways(env: Env) -> None:
    nbdcopy = require_tool("nbdcopy")
    rng = random.Random(11)
    image = bytearray(SIZE)
    image[: 5 << 20] = rng.randbytes(5 << 20)
    image[12 << 20 : (12 << 20) + 12345 * 8] = rng.randbytes(12345 * 8)
    src, dst = env.folder / "src.img", env.folder / "dst.img"
    src.write_bytes(image)
    await run_tool_ok(nbdcopy, "--flush", str(src), env.uri("stack"))  # multi-conn by default
    data, _ = await env.vols["stack"].read(0, SIZE // SS)
    assert data == image
    await run_tool_ok(nbdcopy, env.uri("stack"), str(dst))
    assert dst.read_bytes() == image
    await run_tool_ok(nbdcopy, env.uri("cached"), str(dst))  # through the read cache
    assert dst.read_bytes() == env.cache_base


# -- nbdsh, python3-libnbd ------------------------------------------------------------------------

NBDSH_ERRORS = """
import nbd
def expect(fn, name):
    try:
        fn()
    except nbd.Error as exc:
        assert exc.errno == name, (exc.errno, name, exc.string)
    else:
        raise AssertionError("expected " + name)
h.set_strict_mode(0)  # send what libnbd would refuse itself: the server must answer
h.connect_uri(RO)
assert h.is_read_only()
expect(lambda: h.pwrite(b"x" * 512, 0), "EPERM")
expect(lambda: h.trim(512, 0), "EPERM")
expect(lambda: h.zero(512, 0), "EPERM")
assert h.pread(512, 512) == bytes.fromhex(RO_SECTOR1)
h.shutdown()
g = nbd.NBD()
g.set_strict_mode(0)
g.connect_uri(RAM)
expect(lambda: g.pread(512, SIZE), "EINVAL")
expect(lambda: g.pread(1024, SIZE - 512), "EINVAL")
expect(lambda: g.trim(1024, SIZE - 512), "EINVAL")
expect(lambda: g.pwrite(b"y" * 1024, SIZE - 512), "ENOSPC")
expect(lambda: g.zero(1024, SIZE - 512), "ENOSPC")
expect(lambda: g.block_status(512, 0, lambda *a: 0), "EINVAL")  # no context selected
g.pwrite(b"z" * 512, 0)  # the session is still fine
assert g.pread(512, 0) == b"z" * 512
g.shutdown()
print("errors ok")
"""

NBDSH_OPT_MODE = """
import nbd
h.set_opt_mode(True)
h.set_full_info(True)
h.connect_uri(DEFAULT)
names = []
h.opt_list(lambda name, description: names.append(name) or 0)
assert names == ["ram", "stack", "cached", "ro", "flaky"], names
h.set_export_name("nope")
try:
    h.opt_info()
except nbd.Error:
    pass
else:
    raise AssertionError("opt_info of an unknown export succeeded")
h.set_export_name("stack")
h.opt_info()
assert h.get_size() == SIZE
contexts = []
h.opt_list_meta_context(lambda name: contexts.append(name) or 0)
assert sorted(contexts) == ["base:allocation", "qemu:allocation-depth"], contexts
h.set_export_name("")
h.opt_go()
assert h.get_canonical_export_name() == "ram"
assert h.get_size() == SIZE
h.shutdown()
print("opt mode ok")
"""


async def test_nbdsh_error_codes_and_option_mode(env: Env) -> None:
    nbdsh = require_tool("nbdsh")
    await require_libnbd_python()
    prelude = (
        f"RO = {env.uri('ro')!r}\nRAM = {env.uri('ram')!r}\nDEFAULT = {env.uri('')!r}\n"
        f"SIZE = {SIZE}\nRO_SECTOR1 = {env.ro_data[512:1024].hex()!r}\n"
    )
    out = await run_tool_ok(nbdsh, "-c", prelude + NBDSH_ERRORS, env=SYSTEM_ENV)
    assert "errors ok" in out
    out = await run_tool_ok(nbdsh, "-c", prelude + NBDSH_OPT_MODE, env=SYSTEM_ENV)
    assert "opt mode ok" in out
    assert env.stats.requests["write", "EPERM"] == 1
    assert env.stats.requests["read", "EINVAL"] == 2


INTEGRITY_SCRIPT = r"""
import nbd, random, select, struct, sys
uri, base_path, expect_path = sys.argv[1:4]
nconn, total, qd, seed = (int(a) for a in sys.argv[4:8])
BS = 4096
rng = random.Random(seed)
handles = []
for _ in range(nconn):
    h = nbd.NBD()
    h.connect_uri(uri)
    handles.append(h)
assert handles[0].can_multi_conn()
nblocks = min(handles[0].get_size() // BS, 1024)
base = open(base_path, "rb").read(nblocks * BS)
expected = [base[i * BS:(i + 1) * BS] for i in range(nblocks)]
busy = set()  # blocks with a command in flight: never two at once, so reads are exact
inflight = {}  # (connection, cookie) -> (kind, block, buffer or data)
depth = [0] * nconn
counts = {}
issued = 0
def issue(i):
    h = handles[i]
    for _ in range(32):
        b = rng.randrange(nblocks)
        if b not in busy:
            break
    else:
        return False
    kind = rng.choices(["read", "write", "trim", "zero", "flush"], [45, 40, 6, 6, 3])[0]
    payload = None
    if kind == "flush":
        cookie = h.aio_flush()
        b = None
    elif kind == "read":
        payload = nbd.Buffer(BS)
        cookie = h.aio_pread(payload, b * BS)
    elif kind == "write":
        payload = struct.pack("<QQ", b, issued) * (BS // 16)
        cookie = h.aio_pwrite(payload, b * BS, flags=nbd.CMD_FLAG_FUA if issued % 7 == 0 else 0)
    elif kind == "trim":
        payload = bytes(BS)
        cookie = h.aio_trim(BS, b * BS)
    else:
        payload = bytes(BS)
        cookie = h.aio_zero(BS, b * BS, flags=nbd.CMD_FLAG_NO_HOLE if issued % 2 else 0)
    if b is not None:
        busy.add(b)
    inflight[i, cookie] = (kind, b, payload)
    depth[i] += 1
    counts[kind] = counts.get(kind, 0) + 1
    return True
while issued < total or inflight:
    for i in range(nconn):
        while issued < total and depth[i] < qd and issue(i):
            issued += 1
    rl, wl = [], []
    for h in handles:
        d = h.aio_get_direction()
        if d & nbd.AIO_DIRECTION_READ:
            rl.append(h.aio_get_fd())
        if d & nbd.AIO_DIRECTION_WRITE:
            wl.append(h.aio_get_fd())
    r, w, _ = select.select(rl, wl, [], 20)
    if not r and not w:
        sys.exit("no progress for 20 s")
    for h in handles:
        fd = h.aio_get_fd()
        if fd in r:
            h.aio_notify_read()
        if fd in w:
            h.aio_notify_write()
    for key in list(inflight):
        i, cookie = key
        if handles[i].aio_command_completed(cookie):  # raises if the command failed
            kind, b, payload = inflight.pop(key)
            depth[i] -= 1
            if kind == "read":
                got = bytes(payload.to_bytearray())
                if got != expected[b]:
                    sys.exit(f"block {b}: read does not match the last acknowledged write")
            elif kind != "flush":
                expected[b] = payload
            busy.discard(b)
for h in handles:
    h.flush()
    h.shutdown()
open(expect_path, "wb").write(b"".join(expected))
print("ok", sorted(counts.items()))
"""


async def test_integrity_many_requests_in_flight_on_several_connections(env: Env) -> None:
    python = await require_libnbd_python()
    script = env.folder / "integrity.py"
    script.write_text(INTEGRITY_SCRIPT)
    expect = env.folder / "expected.img"
    out = await run_tool_ok(
        python,
        str(script),
        env.uri("stack"),
        str(env.folder / "base.img"),
        str(expect),
        "4",  # connections
        "6000",  # requests
        "16",  # in flight per connection
        "5",  # seed
        env=SYSTEM_ENV,
    )
    assert out.startswith("ok"), out
    want = expect.read_bytes()
    data, _ = await env.vols["stack"].read(0, len(want) // SS)
    assert data == want
    assert env.stats.sessions_total >= 4
    assert env.stats.requests["read", "ok"] > 1000 and env.stats.requests["write", "ok"] > 1000
    assert env.stats.requests["trim", "ok"] and env.stats.requests["write_zeroes", "ok"]


# -- protocol details through the raw client ---------------------------------------------------


async def test_unknown_option_then_go(env: Env) -> None:
    client = await RawClient.open(env.port)
    replies = await client.option(0x7777, b"some option data")
    assert [r for r, _ in replies] == [REP_ERR_UNSUP]
    assert (await client.option(OPT_STARTTLS))[-1][0] == REP_ERR_UNSUP  # no TLS: go on
    replies = await client.option(OPT_LIST, b"junk")
    assert replies[-1][0] == REP_ERR_INVALID
    replies = await client.option(OPT_LIST)
    names = [p[4 : 4 + struct.unpack(">I", p[:4])[0]].decode() for _, p in replies[:-1]]
    assert names == ["ram", "stack", "cached", "ro", "flaky"]
    replies = await client.option(OPT_INFO, RawClient.info_request("missing", []))
    assert replies[-1][0] == REP_ERR_UNKNOWN and b"missing" in replies[-1][1]
    replies = await client.option(OPT_INFO, b"\x00\x00\x00\x09ab")  # name runs past the data
    assert replies[-1][0] == REP_ERR_INVALID
    replies = await client.option(OPT_SET_META_CONTEXT, b"")  # before structured replies
    assert replies[-1][0] == REP_ERR_INVALID
    query = b"\x00\x00\x00\x05stack\x00\x00\x00\x00"  # "stack", no queries: list all
    replies = await client.option(OPT_LIST_META_CONTEXT, query)  # the same for LIST
    assert replies[-1][0] == REP_ERR_INVALID
    assert (await client.option(OPT_STRUCTURED_REPLY))[-1][0] == REP_ACK
    replies = await client.option(OPT_LIST_META_CONTEXT, query)
    assert [r for r, _ in replies] == [REP_META_CONTEXT, REP_META_CONTEXT, REP_ACK]
    contexts = await client.set_meta_context("stack", "base:allocation", "x-other:thing")
    assert contexts == {"base:allocation": contexts["base:allocation"]}
    await client.go("stack", block_size=True)
    assert client.size == SIZE and client.name == "stack"
    assert client.block_sizes == (SS, 4096, MAX_IO)
    want = FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES
    want |= FLAG_CAN_MULTI_CONN | FLAG_SEND_CACHE | FLAG_SEND_FAST_ZERO
    assert client.flags & want == want and not client.flags & FLAG_READ_ONLY
    assert await client.read(0, 4096) == env.base[:4096]
    status = await client.request(CMD_BLOCK_STATUS, 0, 1 << 20)
    assert status.extents == {contexts["base:allocation"]: [(1 << 20, 0)]}
    await client.close()

    # NBD_OPT_EXPORT_NAME, with the 124 zero bytes (no NO_ZEROES), default export.
    client = await RawClient.open(env.port, no_zeroes=False)
    name = b""
    client.writer.write(struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, len(name)) + name)
    size, flags = struct.unpack(">QH", await client.reader.readexactly(10))
    assert size == SIZE and flags & 1 and not flags & FLAG_READ_ONLY  # HAS_FLAGS; "ram"
    assert await client.reader.readexactly(124) == bytes(124)
    client._task = asyncio.create_task(client._read_replies())
    await client.write(0, b"\x42" * 512)
    assert (await env.vols["ram"].read(0, 1))[0] == b"\x42" * 512
    await client.close()

    client = await RawClient.open(env.port)
    assert (await client.option(OPT_ABORT))[-1][0] == REP_ACK
    assert await client.reader.read() == b""  # the server hangs up after the abort
    client.writer.close()


async def test_structured_read_reports_holes(env: Env) -> None:
    ram = env.vols["ram"]
    await ram.write(128, tagged(9, 64 << 10))  # bytes [64K, 128K)
    client = await env.client("ram")
    reply = await client.request(CMD_READ, 0, 256 << 10)
    assert reply.error == 0
    kinds = [(t, off, n) for t, off, n in reply.chunks]
    assert kinds == [
        (CHUNK_HOLE, 0, 64 << 10),
        (CHUNK_DATA, 64 << 10, 64 << 10),
        (CHUNK_HOLE, 128 << 10, 128 << 10),
    ]
    assert bytes(reply.data[64 << 10 : 128 << 10]) == tagged(9, 64 << 10)
    assert not any(reply.data[: 64 << 10]) and not any(reply.data[128 << 10 :])
    reply = await client.request(CMD_READ, 0, 256 << 10, CMD_FLAG_DF)  # don't fragment
    assert [(t, off, n) for t, off, n in reply.chunks] == [(CHUNK_DATA, 0, 256 << 10)]
    reply = await client.request(CMD_READ, 1 << 20, 8192)  # all hole
    assert reply.chunks == [(CHUNK_HOLE, 1 << 20, 8192)]
    reply = await client.request(CMD_READ, SIZE, 512)  # past the end: a structured error
    assert reply.structured and reply.error == EINVAL and "past the end" in reply.message
    await client.close()

    simple = await env.client("ram", structured=False)
    reply = await simple.request(CMD_READ, 0, 256 << 10)
    assert not reply.structured and bytes(reply.data[64 << 10 : 128 << 10]) == tagged(9, 64 << 10)
    reply = await simple.request(CMD_READ, SIZE - 512, 1024)
    assert (reply.error, reply.data) == (EINVAL, bytearray(1024))  # no payload followed
    assert await simple.read(64 << 10, 512) == tagged(9, 64 << 10)[:512]  # still in step
    await simple.close()


async def test_trim_reads_zeros_over_lower_layer_data(env: Env) -> None:
    stack = env.vols["stack"]
    assert stack.unmap_behavior == UnmapBehavior.ZEROES
    client = await env.client("stack", contexts=["qemu:allocation-depth"])
    await client.write(64 << 10, tagged(1, 64 << 10))
    reply = await client.request(CMD_TRIM, 32 << 10, 128 << 10)
    assert reply.error == 0
    assert await client.read(0, 32 << 10) == env.base[: 32 << 10]
    assert await client.read(32 << 10, 128 << 10) == bytes(128 << 10)  # not the base's bytes
    assert await client.read(160 << 10, 4096) == env.base[160 << 10 : (160 << 10) + 4096]
    # a misaligned trim discards only the whole sectors inside it
    reply = await client.request(CMD_TRIM, (1 << 20) + 100, 1024, CMD_FLAG_FUA)
    assert reply.error == 0
    data = await client.read(1 << 20, 2048)
    assert data[:512] == env.base[1 << 20 : (1 << 20) + 512]
    assert data[512:1024] == bytes(512)
    assert data[1024:] == env.base[(1 << 20) + 1024 : (1 << 20) + 2048]
    depth = client.contexts["qemu:allocation-depth"]
    status = await client.request(CMD_BLOCK_STATUS, 0, 256 << 10)
    assert status.extents[depth] == [(32 << 10, 2), (128 << 10, 1), (96 << 10, 2)]
    status = await client.request(CMD_BLOCK_STATUS, 0, 256 << 10, CMD_FLAG_REQ_ONE)
    assert status.extents[depth] == [(32 << 10, 2)]
    status = await client.request(CMD_BLOCK_STATUS, (32 << 10) - 100, 1000)  # misaligned
    assert status.extents[depth] == [(100, 2), (900, 1)]
    await client.close()


async def test_block_status_reads_the_map_a_window_at_a_time(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The allocation map is read in windows (a request may span 4 GiB of a fragmented
    volume): extents of one status join across windows, and a reply that reached its
    descriptor limit covers a prefix of the range, which the client asks again from."""
    monkeypatch.setattr(nbd_commands, "_STATUS_WINDOW", 64 << 10)
    monkeypatch.setattr(nbd_commands, "_MAX_EXTENTS", 64)
    client = await env.client("ram", contexts=["base:allocation"])
    ctx = client.contexts["base:allocation"]
    region = 2 << 20
    await client.write(region + (100 << 10), tagged(5, 100 << 10))  # data across two windows
    status = await client.request(CMD_BLOCK_STATUS, region, 1 << 20)
    assert status.extents[ctx] == [(100 << 10, 3), (100 << 10, 0), ((1 << 20) - (200 << 10), 3)]
    monkeypatch.setattr(nbd_commands, "_MAX_EXTENTS", 8)
    for k in range(16):  # 16 data runs 8 KiB apart: more than 8 descriptors
        await client.write(region + (k * 16 << 10), tagged(6, 8 << 10))
    status = await client.request(CMD_BLOCK_STATUS, region, 1 << 20)
    extents = status.extents[ctx]
    assert len(extents) == 8 and sum(n for n, _ in extents) == 64 << 10  # the first window
    assert extents == [(8 << 10, 0), (8 << 10, 3)] * 4
    await client.close()


async def test_block_status_req_one_costs_what_its_extent_does(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMU's client walks a volume with one ``REQ_ONE`` request per extent. Each must cost
    about its extent, not the runs after it (a full window each time made the walk
    quadratic in a fragmented volume's runs), and still give the extent whole, up to the
    window: a hole longer than the first window. With two contexts the cost follows the
    shorter extent (the one a client walks by): the other is cut at the window's end."""
    monkeypatch.setattr(nbd_commands, "_FIRST_WINDOW", 4 << 10)
    monkeypatch.setattr(nbd_commands, "_STATUS_WINDOW", 1 << 20)
    ram = env.vols["ram"]
    computed: list[int] = []  # runs of allocation the server computed, per call
    allocation = ram.allocation

    async def counted(sector: int, count: int) -> list[tuple[int, int, int]]:
        runs = await allocation(sector, count)
        computed.append(len(runs))
        return runs

    monkeypatch.setattr(ram, "allocation", counted)
    client = await env.client("ram", contexts=["base:allocation"])
    ctx = client.contexts["base:allocation"]
    region = 4 << 20
    for k in range(64):  # 4 KiB of data every 8 KiB, then a hole: 128 extents
        await client.write(region + (k * 8 << 10), tagged(7, 4 << 10))
    offset, extents = region, []
    while offset < region + (1 << 20):
        status = await client.request(
            CMD_BLOCK_STATUS, offset, region + (1 << 20) - offset, CMD_FLAG_REQ_ONE
        )
        [(n, flags)] = status.extents[ctx]
        extents.append((n, flags))
        offset += n
    # (the last hole, 516 KiB, is longer than the first window: it doubled to take it whole)
    assert extents == [(4 << 10, 0), (4 << 10, 3)] * 63 + [(4 << 10, 0), (516 << 10, 3)]
    assert sum(computed) <= 4 * len(extents) + 16  # one window per extent, not all the runs
    await client.close()

    client = await env.client("stack", contexts=["base:allocation", "qemu:allocation-depth"])
    base, depth = client.contexts["base:allocation"], client.contexts["qemu:allocation-depth"]
    for k in range(64):  # the top holds every other 4 KiB, the raw image all of it
        await client.write(region + (k * 8 << 10), tagged(9, 4 << 10))
    status = await client.request(CMD_BLOCK_STATUS, region, 4 << 20, CMD_FLAG_REQ_ONE)
    assert status.extents[depth] == [(4 << 10, 1)]
    assert status.extents[base] == [(8 << 10, 0)]  # data to the end of the window (it goes on)
    status = await client.request(CMD_BLOCK_STATUS, region + (512 << 10), 2 << 20, CMD_FLAG_REQ_ONE)
    assert status.extents[base] == [(1 << 20, 0)]  # where the top holds nothing: all of it
    assert status.extents[depth] == [(1 << 20, 2)]  # (up to the most one window holds)
    await client.close()


async def test_write_zeroes_no_hole_and_fast_zero(env: Env) -> None:
    ram = env.vols["ram"]
    client = await env.client("ram", contexts=["base:allocation", "qemu:allocation-depth"])
    base_ctx = client.contexts["base:allocation"]
    region, n = 1 << 20, 256 << 10

    async def fill() -> None:
        await client.write(region, tagged(3, n))

    async def top_holds() -> list[tuple[int, int, int]]:
        return await ram.allocation(region // SS, n // SS)

    await fill()
    reply = await client.request(CMD_WRITE_ZEROES, region, n)  # may unmap: a hole
    assert reply.error == 0
    assert await client.read(region, n) == bytes(n)
    assert await top_holds() == [(region // SS, (region + n) // SS, -1)]
    status = await client.request(CMD_BLOCK_STATUS, region, n)
    assert status.extents[base_ctx] == [(n, 3)]  # HOLE | ZERO

    await fill()
    reply = await client.request(CMD_WRITE_ZEROES, region, n, CMD_FLAG_NO_HOLE)
    assert reply.error == 0
    assert await client.read(region, n) == bytes(n)
    assert await top_holds() == [(region // SS, (region + n) // SS, 0)]  # allocated zeros

    await fill()
    reply = await client.request(CMD_WRITE_ZEROES, region, n, CMD_FLAG_FAST_ZERO)
    assert reply.error == 0  # unmapping is fast
    assert await client.read(region, n) == bytes(n)

    await fill()
    flags = CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE
    reply = await client.request(CMD_WRITE_ZEROES, region, n, flags)
    assert reply.error == ENOTSUP  # it would have to write zeros
    assert await client.read(region, n) == tagged(3, n)  # and changed nothing
    reply = await client.request(CMD_WRITE_ZEROES, region + 100, 4096, CMD_FLAG_FAST_ZERO)
    assert reply.error == ENOTSUP  # misaligned: partial sectors need writing

    # misaligned zeroing (no block sizes agreed): exactly the bytes asked for
    reply = await client.request(CMD_WRITE_ZEROES, region + 100, 5000, CMD_FLAG_FUA)
    assert reply.error == 0
    want = bytearray(tagged(3, n))
    want[100:5100] = bytes(5000)
    assert await client.read(region, n) == want
    reply = await client.request(CMD_WRITE_ZEROES, SIZE - 512, 1024)
    assert reply.error == ENOSPC
    await client.close()

    # on the stack, zeroing must also hide the raw layer's data
    stack = await env.client("stack")
    reply = await stack.request(CMD_WRITE_ZEROES, 0, 1 << 20)
    assert reply.error == 0 and await stack.read(0, 1 << 20) == bytes(1 << 20)
    await stack.close()


async def test_cache_fills_the_read_cache(env: Env) -> None:
    cached = env.vols["cached"]
    cache, below = cached.entries[0].stats, cached.entries[1].stats
    client = await env.client("cached")
    reply = await client.request(CMD_CACHE, 1 << 20, 1 << 20)
    assert reply.error == 0
    assert cache.cache_fills == (1 << 20) // SS
    reads_below = below.reads
    assert await client.read(1 << 20, 1 << 20) == env.cache_base[1 << 20 : 2 << 20]
    assert below.reads == reads_below  # served from the cache alone
    reply = await client.request(CMD_CACHE, (3 << 20) + 100, 1000)  # misaligned: covering
    assert reply.error == 0 and cache.cache_fills == (1 << 20) // SS + 3  # bytes 100..1100
    assert (await client.request(CMD_CACHE, SIZE, 512)).error == EINVAL
    await client.close()


async def test_misaligned_requests(env: Env) -> None:
    stack = await env.client("stack")  # no block sizes agreed: misaligned is served
    await stack.write(1000, b"\x77" * 100)
    want = bytearray(env.base[:4096])
    want[1000:1100] = b"\x77" * 100
    assert await stack.read(0, 4096) == want
    assert await stack.read(999, 3) == want[999:1002]
    await stack.write(4096 * 3 - 10, b"\x66" * 30)  # across a sector boundary
    assert (
        await stack.read(4096 * 3 - 20, 50)
        == env.base[4096 * 3 - 20 : 4096 * 3 - 10]
        + (b"\x66" * 30)
        + env.base[4096 * 3 + 20 : 4096 * 3 + 30]
    )

    # Many misaligned writes to disjoint bytes of the same sectors, in flight at once on
    # two connections: the read-modify-writes must not lose each other's bytes.
    other = await env.client("stack")
    start = 1 << 20
    pieces = [(start + 37 * i, bytes([i + 1]) * 37) for i in range(64)]
    replies = await asyncio.gather(
        *(
            (stack if i % 2 else other).send(CMD_WRITE, off, len(data), 0, data)
            for i, (off, data) in enumerate(pieces)
        ),
        stack.send(CMD_WRITE, start + 37 * 64, 4096, 0, b"\x99" * 4096),  # an aligned-ish one
    )
    assert all(r.error == 0 for r in replies)
    got = await other.read(start, 37 * 64)
    assert got == b"".join(data for _, data in pieces)
    await other.close()
    await stack.close()

    strict = await env.client("stack", block_size=True)
    assert (await strict.request(CMD_READ, 100, 512)).error == EINVAL
    assert (await strict.request(CMD_WRITE, 512, 100, 0, b"x" * 100)).error == EINVAL
    # TRIM and CACHE are hints: what they cover only partly is left alone, not refused
    assert (await strict.request(CMD_TRIM, 512, 100)).error == 0
    assert (await strict.request(CMD_CACHE, 100, 1000)).error == 0
    assert await strict.read(512, 512) == want[512:1024]  # unchanged, and still in step
    await strict.close()


async def test_a_flush_after_one_that_failed_in_storage_does_not_vouch_for_the_writes(
    env: Env,
) -> None:
    """A flush that failed in a layer's storage may have lost the writes it covered (a
    failed fsync may drop their pages, and the next succeeds): the flush that retries it
    fails too, once, on each connection that wrote before; a FUA write, durable when
    acknowledged, and a connection that wrote nothing are not at stake."""
    writer = await env.client("flaky", structured=False)
    other = await env.client("flaky")
    durable = await env.client("flaky")
    idle = await env.client("flaky")
    await writer.write(0, b"\x01" * 4096)
    await other.request(CMD_TRIM, 8192, 4096)
    assert (await durable.request(CMD_WRITE, 4096, 512, CMD_FLAG_FUA, b"\x02" * 512)).error == 0
    env.flaky.fail = StorageError("fsync: Input/output error")
    assert (await writer.request(CMD_FLUSH)).error == EIO
    env.flaky.fail = None
    retried = await other.request(CMD_FLUSH)
    assert retried.error == EIO and "may have been lost" in retried.message
    assert (await writer.request(CMD_FLUSH)).error == EIO
    for client in (writer, other, durable, idle):
        assert (await client.request(CMD_FLUSH)).error == 0, client
        await client.close()
    assert env.stats.requests["flush", "EIO"] == 3


async def test_a_fua_command_whose_flush_found_a_loss_is_left_to_the_next_flush(
    env: Env,
) -> None:
    """A TRIM with FUA is made durable by a flush of the volume; when that flush found that
    a tier below lost writes (the verifier renewed while the command ran), the command is
    not durable for good: the connection's next FLUSH says so."""
    client = await env.client("flaky")
    await client.write(0, b"\x01" * 4096)
    assert (await client.request(CMD_FLUSH)).error == 0
    env.flaky.fail = WritesLost("the origin restarted")  # its flush reports the loss
    try:
        assert (await client.request(CMD_TRIM, 0, 4096, CMD_FLAG_FUA)).error == 0
    finally:
        env.flaky.fail = None
    assert (await client.request(CMD_FLUSH)).error == EIO
    assert (await client.request(CMD_FLUSH)).error == 0
    await client.close()


async def test_errors_keep_the_session(env: Env) -> None:
    client = await env.client("flaky", structured=False, block_size=True)  # max_io agreed
    await client.write(0, b"\x01" * 4096)
    env.flaky.fail = Unavailable("the origin tier is unreachable")
    assert (await client.request(CMD_READ, 0, 4096)).error == EIO
    assert (await client.request(CMD_WRITE, 0, 512, 0, b"\x02" * 512)).error == EIO
    env.flaky.fail = NoSpace("the disk is full")
    assert (await client.request(CMD_WRITE, 0, 512, 0, b"\x02" * 512)).error == ENOSPC
    env.flaky.fail = None
    assert await client.read(0, 4096) == b"\x01" * 4096  # the same session goes on
    assert (await client.request(99, 0, 0)).error == EINVAL  # unknown command
    assert (await client.request(CMD_FLUSH, 0, 0, CMD_FLAG_DF)).error == EINVAL  # bad flag
    big = b"\x03" * (MAX_IO + 512)
    reply = await client.request(CMD_WRITE, 0, len(big), 0, big)  # over max_io: refused
    assert reply.error == EINVAL
    assert (await client.request(CMD_READ, 0, MAX_IO + 512)).error == EINVAL
    assert await client.read(0, 512) == b"\x01" * 512  # the payload was skipped in step
    assert (await client.request(CMD_FLUSH)).error == 0
    assert (await client.request(CMD_WRITE, 4096, 0)).error == 0  # empty: nothing to do
    assert (await client.request(CMD_READ, 4096, 0)).error == 0
    await client.close()
    ro = await env.client("ro")
    assert ro.flags & FLAG_READ_ONLY
    assert (await ro.request(CMD_WRITE, 0, 512, 0, b"x" * 512)).error == EPERM
    assert (await ro.request(CMD_WRITE_ZEROES, 0, 512)).error == EPERM
    await ro.close()
    stats = env.stats
    assert stats.requests["read", "EIO"] == 1 and stats.requests["write", "EIO"] == 1
    assert stats.requests["write", "ENOSPC"] == 1 and stats.requests["write", "EPERM"] == 1
    assert stats.sessions_total == 2 and stats.sessions_active == 0


async def test_a_client_without_block_sizes_may_send_32_mib(env: Env) -> None:
    """The protocol document lets a client that agreed no block sizes (``NBD_OPT_EXPORT_NAME``
    gets none; this one did not ask in its ``NBD_OPT_GO``) send requests of up to 32 MiB:
    such a session takes them whatever ``max_io`` (the advertised maximum) is; one that
    asked is held to ``max_io``."""
    n = 2 * MAX_IO
    data = tagged(11, n)
    client = await env.client("ram", structured=False)
    assert (await client.request(CMD_WRITE, 0, n, 0, data)).error == 0
    assert await client.read(0, n) == data
    await client.close()
    agreed = await env.client("ram", structured=False, block_size=True)
    assert (await agreed.request(CMD_READ, 0, n)).error == EINVAL
    assert (await agreed.request(CMD_WRITE, 0, n, 0, data)).error == EINVAL
    assert await agreed.read(0, MAX_IO) == data[:MAX_IO]
    await agreed.close()


async def test_pipelined_requests_out_of_order(env: Env) -> None:
    stack = env.vols["stack"]
    client = await env.client("stack")
    # reads of the raw layer wait on a thread, reads of the top do not: replies overtake
    await client.write(0, tagged(4, 64 << 10))
    futures = [client.send(CMD_READ, (i % 64) * (128 << 10), 64 << 10) for i in range(200)]
    futures += [client.send(CMD_FLUSH)]
    replies = await asyncio.gather(*futures)
    assert all(r.error == 0 for r in replies)
    assert bytes(replies[0].data) == tagged(4, 64 << 10)
    for i, reply in enumerate(replies[1:64]):
        off = (i + 1) * (128 << 10)
        assert bytes(reply.data) == env.base[off : off + (64 << 10)]
    assert stack.entries[0].stats.reads > 0
    stats = env.stats
    assert stats.sessions_active == 1 and stats.volume_sessions["stack"] == 1
    await client.close()
    await eventually("the session to end", lambda: stats.sessions_active == 0)
    assert stats.bytes_read >= 200 * (64 << 10) and stats.requests["flush", "ok"] == 1


# -- the listener ---------------------------------------------------------------------------------


async def test_addresses_bind_exclusively(env: Env, tmp_path: Path) -> None:
    registry = env.server.registry
    with pytest.raises(OSError, match=env.server.address.replace(".", r"\.")):
        await start_nbd_server(env.server.address, registry, max_io=MAX_IO)
    path = tmp_path / "nbd.sock"
    server = await start_nbd_server(f"unix:{path}", registry, max_io=MAX_IO)
    try:
        assert server.address == f"unix:{path}"
        with pytest.raises(OSError, match="in use"):
            await start_nbd_server(f"unix:{path}", registry, max_io=MAX_IO)
        reader, writer = await asyncio.open_unix_connection(str(path))
        assert await reader.readexactly(8) == struct.pack(">Q", NBDMAGIC)
        writer.close()
        if shutil.which("nbdinfo"):
            out = await run_tool_ok("nbdinfo", "--size", f"nbd+unix:///stack?socket={path}")
            assert int(out) == SIZE
    finally:
        await server.close()
    assert not path.exists()
    with pytest.raises(ValueError):
        await start_nbd_server("no-port", registry, max_io=MAX_IO)


async def test_close_ends_idle_and_busy_sessions(env: Env) -> None:
    idle = await env.client("ram")
    handshaking = await RawClient.open(env.port)  # never finishes its handshake
    await idle.write(0, b"\x01" * 512)
    await env.server.close()
    assert idle._task is not None
    await asyncio.wait_for(idle._task, 10)  # the reply reader saw the connection end
    assert idle.reader.at_eof()
    assert await handshaking.reader.read() == b""
    idle.writer.close()
    handshaking.writer.close()
    assert env.stats.sessions_active == 0
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", env.port)


async def test_shutdown_finishes_started_requests_and_refuses_the_rest(env: Env) -> None:
    gate = env.flaky.gate = asyncio.Event()
    hooked: list[tuple[str, str, str]] = []  # what the server's metrics hook is told
    assert env.stats.on_request is None
    env.stats.on_request = lambda volume, command, result, status, *_: hooked.append(
        (command, result, status)
    )
    client = await env.client("flaky")
    futures = [client.send(CMD_READ, i * SS, SS) for i in range(300)]
    await eventually(
        "the server to start all it takes at once (256)", lambda: env.flaky.waiting >= 256
    )
    closing = asyncio.create_task(env.server.close())
    # The requests not started are refused before the started ones may finish (the gate).
    await eventually(
        "the shutdown to refuse the requests not started",
        lambda: env.stats.requests["read", "ESHUTDOWN"] > 0,
    )
    await asyncio.sleep(0.05)  # negative check: can only pass vacuously, never fail falsely
    assert not closing.done()  # it waits for the requests in flight
    gate.set()
    await asyncio.wait_for(closing, 20)
    results = await asyncio.gather(*futures, return_exceptions=True)
    replies = [r for r in results if isinstance(r, Reply)]
    assert sum(r.error == 0 for r in replies) == 256  # the started ones finished
    refused = sum(r.error == 108 for r in replies)  # ESHUTDOWN: not started
    assert refused and refused + 256 + (len(results) - len(replies)) == 300
    assert env.stats.requests["read", "ESHUTDOWN"] == refused
    # the metrics hook counts the refusals too, as gRPC counts calls refused at shutdown
    assert hooked.count(("read", "ESHUTDOWN", "UNAVAILABLE")) == refused
    assert hooked.count(("read", "ok", "OK")) == 256


async def test_volume_not_ready_yet(env: Env) -> None:
    """A configured volume still attaching is listed, and refused with a reason until ready."""
    registry = VolumeRegistry(["later", "never", "ram"])
    registry.set_waiting("later", "the origin tier does not answer")
    registry.give_up("never", "its sector size differs from the origin's")  # no retry helps
    registry.set_ready(env.vols["ram"])
    server = await start_nbd_server("127.0.0.1:0", registry, max_io=MAX_IO)
    port = int(server.address.rsplit(":", 1)[1])
    try:
        client = await RawClient.open(port)
        replies = await client.option(OPT_LIST)
        assert [p[4:] for _, p in replies[:-1]] == [b"later", b"never", b"ram"]
        for name in ("later", ""):  # "" = the first volume
            rtype, message = (await client.option(OPT_GO, RawClient.info_request(name, [])))[-1]
            assert rtype == REP_ERR_UNKNOWN and b"does not answer" in message
        rtype, message = (await client.option(OPT_GO, RawClient.info_request("never", [])))[-1]
        assert rtype == REP_ERR_UNKNOWN and b"the server stopped trying" in message
        await client.go("ram")  # the session goes on to another export
        assert client.size == SIZE
        await client.close()
    finally:
        await server.close()


def test_under_uvloop(tmp_path: Path) -> None:
    """The same session code on uvloop's transports (the server's usual loop)."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        volume = await Volume.open("vol", [LayerEntry(RamLayer(size=SIZE))])
        registry = VolumeRegistry(["vol"])
        registry.set_ready(volume)
        server = await start_nbd_server("127.0.0.1:0", registry, max_io=MAX_IO)
        port = int(server.address.rsplit(":", 1)[1])
        try:
            client = await RawClient.connect(port, "vol")
            big = tagged(1, 3 << 20)  # received in place, in many pieces
            await client.write(1 << 20, big)
            await client.write(100, b"\x07" * 1000)  # read-modify-write
            assert await client.read(1 << 20, 3 << 20) == big
            assert await client.read(0, 2048) == bytes(100) + b"\x07" * 1000 + bytes(948)
            reply = await client.request(CMD_READ, 8 << 20, 8192)
            assert reply.chunks == [(CHUNK_HOLE, 8 << 20, 8192)]
            replies = await asyncio.gather(
                *(client.send(CMD_READ, i << 16, 1 << 16) for i in range(64))
            )
            assert b"".join(bytes(r.data) for r in replies)[1 << 20 :] == big[: 3 << 20]
            await client.close()
            if shutil.which("nbdcopy"):
                image = tmp_path / "img"
                image.write_bytes(tagged(2, SIZE))
                await run_tool_ok("nbdcopy", str(image), f"nbd://127.0.0.1:{port}/vol")
                data, _ = await volume.read(0, SIZE // SS)
                assert data == tagged(2, SIZE)
        finally:
            await server.close()
            await volume.close()

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()


# -- memory bounds, session accounting, shutdown in the handshake (raw sockets) -------------------

INFLIGHT_BYTES = 64 << 20  # the session's budget of payload bytes in flight (nbd_session.py)


@pytest.mark.parametrize("half_close", [False, True])
async def test_reads_in_flight_are_bounded_in_bytes(env: Env, half_close: bool) -> None:
    """A client that pipelines many maximal reads gets only as many started as the byte
    budget allows (each allocates its reply), also after it half-closes; the rest are
    started as replies go out, and every one is answered correctly."""
    flaky = env.flaky
    content = tagged(9, SIZE)
    await env.vols["flaky"].write(0, content)
    gate = flaky.gate = asyncio.Event()
    client = await env.client("flaky", structured=False)
    n = 40
    offsets = [(i % 4) * MAX_IO for i in range(n)]
    futures = [client.send(CMD_READ, off, MAX_IO) for off in offsets]
    if half_close:
        client.writer.write_eof()
    budget = INFLIGHT_BYTES // MAX_IO
    await eventually("the budget's reads to start", lambda: flaky.waiting >= budget)
    # negative check: can only pass vacuously (were more not held back), never fail falsely
    await asyncio.sleep(0.2)  # time to start more, were they not held back
    assert flaky.waiting == budget, f"{flaky.waiting} reads of {MAX_IO} bytes started"
    gate.set()
    flaky.gate = None
    replies = await asyncio.wait_for(asyncio.gather(*futures), 30)
    for off, reply in zip(offsets, replies, strict=True):
        assert reply.error == 0 and reply.data == content[off : off + MAX_IO]
    if half_close:
        assert client._task is not None
        await asyncio.wait_for(client._task, 10)  # then the server closes
        client.writer.close()
    else:
        await client.close()
    assert env.stats.requests["read", "ok"] == n
    await eventually("the session to end", lambda: env.stats.sessions_active == 0)


async def _greeted(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await asyncio.wait_for(reader.readexactly(18), 10)
    return reader, writer


def _option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def _request(cmd: int, handle: int, offset: int = 0, length: int = 0) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, handle, offset, length)


@pytest.mark.parametrize("how", ["close", "half-close", "reset"])
async def test_a_client_gone_right_after_go_is_no_session(env: Env, how: str) -> None:
    """Clients that send ``NBD_OPT_GO`` and leave at once (without reading the ACK): the
    server counts no session that outlives its connection."""
    for _ in range(20):
        _, writer = await _greeted(env.port)
        writer.write(struct.pack(">I", 3) + _option(OPT_GO, RawClient.info_request("ram", [])))
        await writer.drain()
        if how == "half-close":
            writer.write_eof()
        elif how == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if how != "half-close":
            writer.close()
    await eventually(
        "every connection to be taken and ended",
        lambda: env.stats.connections_total == 20 and not env.server._sessions,
    )
    assert env.stats.sessions_active == 0 and env.stats.volume_sessions["ram"] == 0
    assert env.stats.sessions_total <= 20


@pytest.mark.parametrize("option", ["export-name", "go"])
async def test_requests_sent_with_the_handshake_then_half_close_are_served(
    env: Env, option: str
) -> None:
    """The handshake and the first requests in one send, then EOF: the requests received
    before the EOF are answered, then the server closes."""
    content = tagged(3, 4096)
    await env.vols["ram"].write(0, content)
    reader, writer = await _greeted(env.port)
    hello = struct.pack(">I", 3)  # fixed newstyle, no zeroes
    if option == "export-name":
        hello += _option(OPT_EXPORT_NAME, b"ram")
    else:
        hello += _option(OPT_GO, RawClient.info_request("ram", []))
    writer.write(hello + _request(CMD_READ, 7, 0, 4096) + _request(CMD_FLUSH, 8))
    writer.write_eof()
    if option == "export-name":
        size, _ = struct.unpack(">QH", await asyncio.wait_for(reader.readexactly(10), 10))
    else:
        while True:
            head = await asyncio.wait_for(reader.readexactly(20), 10)
            _, _, rtype, rlen = struct.unpack(">QIII", head)
            payload = await reader.readexactly(rlen)
            if rtype == REP_INFO and payload[:2] == b"\x00\x00":
                (size,) = struct.unpack(">Q", payload[2:10])
            if rtype == REP_ACK:
                break
    assert size == SIZE
    got: dict[int, bytes] = {}
    for _ in range(2):  # replies may come in either order
        magic, error, handle = struct.unpack(
            ">IIQ", await asyncio.wait_for(reader.readexactly(16), 10)
        )
        assert magic == SIMPLE_MAGIC and error == 0
        got[handle] = await reader.readexactly(4096) if handle == 7 else b""
    assert got == {7: content, 8: b""}
    assert await asyncio.wait_for(reader.read(), 10) == b""  # then the server closes
    writer.close()
    await eventually("the session to end", lambda: env.stats.sessions_active == 0)
    assert env.stats.sessions_total == 1


async def test_shutdown_answers_options_in_the_handshake_with_err_shutdown(env: Env) -> None:
    """A client in option haggling when the server closes: its next option is answered
    ``NBD_REP_ERR_SHUTDOWN``, then the server hangs up; the close is not held up long."""
    reader, writer = await _greeted(env.port)
    writer.write(struct.pack(">I", 3))
    idle_reader, idle_writer = await _greeted(env.port)  # sends nothing more
    # Both greeted: the server runs both handshakes (it sent the greetings from them).
    started = asyncio.get_running_loop().time()
    closing = asyncio.create_task(env.server.close())
    await eventually("the server to begin closing", lambda: env.server.closing)
    writer.write(_option(OPT_LIST))
    head = await asyncio.wait_for(reader.readexactly(20), 5)
    _, opt, rtype, rlen = struct.unpack(">QIII", head)
    assert (opt, rtype) == (OPT_LIST, REP_ERR_SHUTDOWN)
    assert b"shutting down" in await reader.readexactly(rlen)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert await asyncio.wait_for(idle_reader.read(), 5) == b""
    await asyncio.wait_for(closing, 10)
    assert asyncio.get_running_loop().time() - started < 3.0
    writer.close()
    idle_writer.close()
