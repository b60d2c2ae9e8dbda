"""Concurrent gRPC and NBD clients on one volume of a real server, checked against a
per-sector register model (tests/concurrent_model.py).

A real ``tierdisk serve`` (two for the tier: a cache server over an origin) on 127.0.0.1
port 0 serves one volume of 256 sectors; a lower raw layer (the origin's, for the tier) is
pre-filled with write id ``BASE``. For about :data:`LOAD_SECONDS` (and at most
:data:`MAX_OPS` operations per task, with a fixed seed per case): two gRPC clients
(``retries=0``) and two raw NBD connections (several requests in flight on each), three
tasks each, issue random reads, stamped writes (FUA at times), gRPC ``no_overwrite``
writes and unmaps, NBD TRIM and WRITE_ZEROES (with and without ``NO_HOLE``), NBD CACHE and
flushes, over hot, overlapping ranges of 1-64 sectors, while one more gRPC client shrinks
the volume (to 1/2..1 of its size) and grows it back every ~:data:`RESIZE_GAP` s. Ranges
are drawn over the full size, so some land past a shrunk end and must be refused. With
4096-byte sectors the model works in 512-byte units and NBD requests start and end at any
512 bytes inside sectors (the engine's read-modify-write, racing whole-sector gRPC writes).
After every task ends, the whole volume is read over gRPC and over NBD.

:func:`concurrent_model.check` must find no violation in the history (torn or misplaced
data, future, stale or failed-write values, read-read order, no_overwrite landing over data,
refusals and successes against the sizes the volume could have had, only documented
refusals, final reads that agree); the servers must stop cleanly (exit 0 on SIGTERM) having
logged no warning or error; and the history must have exercised what it claims (counts of
successful operations, refusals, shrinks and regrows, reads that saw the other front end's
writes and writes still in flight: :func:`assert_exercised`), so a run that did nothing
cannot pass.

The unit tests at the end feed the checker small hand-made histories: each kind of
violation must be reported, and legal concurrent outcomes must not be.
"""

from __future__ import annotations

import asyncio
import random
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from concurrent_model import (
    BASE,
    TORN,
    ZERO,
    Front,
    History,
    Kind,
    Op,
    check,
    decode,
    stamps,
    summary,
)
from nbd_raw import (
    CMD_READ,
    CMD_WRITE,
    OPT_GO,
    REP_ACK,
    REP_INFO,
    REQUEST_MAGIC,
    SIMPLE_MAGIC,
    Raw,
    go_data,
)
from servers import ServerProcess, ram, remote, toml_volume, write_config

from tierdisk.client import AsyncClient, AsyncVolume

LOAD_SECONDS = 3.5
"""How long the clients issue operations in each case."""
MAX_OPS = 1500
"""Operations per client task at most (12 tasks), whatever the time."""
RESIZE_GAP = 0.15
"""Mean seconds between resizes."""
SECTORS = 256
"""The volume's size in sectors."""
TASKS = 3
"""Tasks per gRPC client and per NBD connection."""
COUNTS = (1, 1, 2, 3, 4, 8, 16, 32, 64)
"""Lengths of ranges (in sectors; in units for NBD requests), drawn uniformly."""

CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES = 2, 3, 4, 5, 6
FLAG_FUA, FLAG_NO_HOLE = 1, 2
INFO_EXPORT = 0


# -- a pipelined NBD client ----------------------------------------------------------------


class NbdError(Exception):
    """An NBD request answered with an error."""

    def __init__(self, errno: int) -> None:
        super().__init__(f"NBD error {errno}")
        self.errno = errno


class PipelinedNbd:
    """An NBD connection (handshake by :class:`nbd_raw.Raw`, simple replies) that takes
    requests from several tasks at once: each waits for its own reply, by handle."""

    def __init__(self, raw: Raw, size: int) -> None:
        self.raw = raw
        self.size = size
        self.handle = 0
        self.pending: dict[int, tuple[asyncio.Future[bytes], int, int]] = {}
        self.broken: BaseException | None = None
        self.task = asyncio.create_task(self._replies())

    @classmethod
    async def open(cls, address: str, export: str) -> PipelinedNbd:
        raw = await Raw.open(address)
        replies = await raw.option(OPT_GO, go_data(export))
        assert replies[-1][0] == REP_ACK, replies
        sizes = [
            struct.unpack(">HQH", payload)[1]
            for reply, payload in replies
            if reply == REP_INFO and struct.unpack(">H", payload[:2])[0] == INFO_EXPORT
        ]
        assert sizes, replies
        return cls(raw, int(sizes[0]))

    async def _replies(self) -> None:
        reader = self.raw.reader
        try:
            while True:
                magic, error, handle = struct.unpack(">IIQ", await reader.readexactly(16))
                if magic != SIMPLE_MAGIC or handle not in self.pending:
                    raise ConnectionError(f"bad reply: magic {magic:#x}, handle {handle}")
                future, cmd, length = self.pending.pop(handle)
                data = await reader.readexactly(length) if cmd == CMD_READ and not error else b""
                if error:
                    future.set_exception(NbdError(error))
                else:
                    future.set_result(data)
        except Exception as exc:  # the connection ended or broke
            self.broken = exc
            for future, _, _ in self.pending.values():
                future.set_exception(ConnectionError(f"NBD connection ended: {exc!r}"))
            self.pending.clear()

    async def request(
        self, cmd: int, offset: int, length: int, data: bytes = b"", flags: int = 0
    ) -> bytes:
        """Send a request; its reply's data (READ), or :class:`NbdError`."""
        if self.broken is not None:
            raise ConnectionError(f"NBD connection ended: {self.broken!r}")
        self.handle += 1
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.pending[self.handle] = (future, cmd, length)
        header = struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, self.handle, offset, length)
        self.raw.writer.write(header + data)
        return await future

    async def close(self) -> None:
        if self.broken is None:
            self.raw.writer.write(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.raw.close()


def error_code(exc: BaseException) -> str:
    """An operation's error as :data:`concurrent_model.REFUSALS` names it."""
    return f"nbd:{exc.errno}" if isinstance(exc, NbdError) else type(exc).__name__


# -- the cases -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A stack to load: ``stack`` names its layers (see :func:`layers_of`)."""

    stack: str
    sector_size: int
    seed: int
    rmw: bool = False  # NBD requests at any 512 bytes (model units of 512 bytes)

    @property
    def base(self) -> bool:
        """Its bottom layer (the origin's, for a tier) is a pre-filled raw image."""
        return self.stack.endswith("raw")

    @property
    def tier(self) -> bool:
        """Its bottom layer is a remote volume of a second server (the origin)."""
        return "remote" in self.stack

    @property
    def read_cache(self) -> bool:
        """It has a read-cache layer (NBD CACHE fills it)."""
        return "-rc" in self.stack

    @property
    def unit_size(self) -> int:
        """The model's unit: the sector, or 512 bytes when NBD writes inside sectors."""
        return 512 if self.rmw else self.sector_size

    @property
    def k(self) -> int:
        """Model units per sector."""
        return self.sector_size // self.unit_size


def layers_of(case: Case, origin: str) -> list[dict[str, Any]]:
    """The volume's layers, top first (``origin``: the origin's gRPC address, for a tier)."""
    ss = case.sector_size
    size = f"{SECTORS * ss // 1024}KiB"
    sparse_cache = {"kind": "sparse", "path": "cache.sparse", "read_cache": True}
    if case.stack == "ram":
        return [ram(size, sector_size=ss)]
    if case.stack == "sqlite":
        return [{"kind": "sqlite", "path": "top.db", "size": size, "sector_size": ss}]
    if case.stack == "ram/sparse-rc/raw":
        return [ram(), sparse_cache, raw_base(ss)]
    if case.stack == "ram/sparse-rc/remote->raw":
        return [ram(), sparse_cache, remote(origin, "base", timeout=10, retries=3)]
    raise ValueError(case.stack)


def raw_base(sector_size: int) -> dict[str, Any]:
    """A raw layer on ``base.img`` (pre-filled by :func:`serving`), sized by its file."""
    return {"kind": "raw", "path": "base.img", "sector_size": sector_size}


CASES = [
    Case("ram", 512, seed=11),
    Case("ram/sparse-rc/raw", 512, seed=12),
    Case("sqlite", 512, seed=13),
    Case("ram/sparse-rc/remote->raw", 512, seed=14),
    Case("ram/sparse-rc/raw", 4096, seed=15, rmw=True),
]


@contextmanager
def serving(case: Case, tmp_path: Path) -> Iterator[list[ServerProcess]]:
    """The case's servers, started with gRPC and NBD on 127.0.0.1 port 0: for a tier the
    origin (volume ``base``, one raw layer) first; last the one serving volume ``v``. Each
    is killed by PID on the way out if it still runs."""
    base = stamps(BASE, 0, SECTORS * case.k, case.unit_size)
    with ExitStack() as stack:
        servers: list[ServerProcess] = []

        def start(folder: Path, volume: str, prefill: bool) -> ServerProcess:
            config = write_config(folder, volume)
            if prefill:  # base.img, in data_dir as the layer's relative path says
                (folder / "data").mkdir(parents=True, exist_ok=True)
                (folder / "data" / "base.img").write_bytes(base)
            server = ServerProcess.start(folder, config, "--nbd", "127.0.0.1:0")
            servers.append(stack.enter_context(server))
            return server

        origin = ""
        if case.tier:
            volume = toml_volume("base", raw_base(case.sector_size))
            origin = start(tmp_path / "origin", volume, prefill=True).grpc
        volume = toml_volume("v", *layers_of(case, origin))
        start(tmp_path / "server", volume, prefill=case.base and not case.tier)
        yield servers


# -- the load ----------------------------------------------------------------------------------


@dataclass
class Load:
    """What the tasks of one case share."""

    case: Case
    history: History
    deadline: float


async def grpc_task(load: Load, volume: AsyncVolume, name: str, rng: random.Random) -> None:
    """Whole-sector reads (45 %), writes (34 %), no_overwrite writes (3 %), unmaps (12 %)
    and flushes (6 %) over gRPC."""
    history, k, n = load.history, load.case.k, SECTORS
    for _ in range(MAX_OPS):
        if time.monotonic() > load.deadline:
            return
        r = rng.random()
        sector = rng.randrange(n)
        count = min(rng.choice(COUNTS), n - sector)
        unit, units = sector * k, count * k
        op: Op
        try:
            if r < 0.45:
                op = history.begin("read", name, "grpc", unit, units)
                data = await volume.read(sector, count)
                op.succeed(data, history.unit_size)
            elif r < 0.82:
                kind: Kind = "nowrite" if r >= 0.79 else "write"
                op = history.begin(kind, name, "grpc", unit, units)
                data = stamps(op.wid, unit, units, history.unit_size)
                fua = rng.random() < 0.2
                await volume.write(sector, data, fua=fua, no_overwrite=kind == "nowrite")
                op.succeed()
            elif r < 0.94:
                op = history.begin("unmap", name, "grpc", unit, units)
                await volume.unmap(sector, count)
                op.succeed()
            else:
                op = history.begin("flush", name, "grpc")
                await volume.flush()
                op.succeed()
        except Exception as exc:  # recorded; the checker says which are allowed
            op.fail(error_code(exc))


async def nbd_task(load: Load, conn: PipelinedNbd, name: str, rng: random.Random) -> None:
    """Reads (45 %), writes (35 %), TRIMs (8 %), WRITE_ZEROES (6 %) and flushes or CACHEs
    (6 %) over NBD, at model units (any 512 bytes with ``rmw``). A TRIM changes only the
    whole sectors inside its range (the model's range, the one the volume's size is checked
    against); one with none inside, or a CACHE on a volume without a read cache, does
    nothing, and is checked only against the export's size (which these requests never
    pass)."""
    history, k = load.history, load.case.k
    n, size = SECTORS * k, history.unit_size
    for _ in range(MAX_OPS):
        if time.monotonic() > load.deadline:
            return
        r = rng.random()
        unit = rng.randrange(n)
        count = min(rng.choice(COUNTS), n - unit)
        offset, length = unit * size, count * size
        fua = FLAG_FUA if rng.random() < 0.2 else 0
        op: Op
        try:
            if r < 0.45:
                op = history.begin("read", name, "nbd", unit, count)
                data = await conn.request(CMD_READ, offset, length)
                op.succeed(data, size)
            elif r < 0.80:
                op = history.begin("write", name, "nbd", unit, count)
                data = stamps(op.wid, unit, count, size)
                await conn.request(CMD_WRITE, offset, length, data, fua)
                op.succeed()
            elif r < 0.88:
                first, last = -(-unit // k) * k, (unit + count) // k * k
                op = history.begin("unmap", name, "nbd", first, max(0, last - first))
                op.req_end = last if first < last else 0  # no whole sector: a no-op
                await conn.request(CMD_TRIM, offset, length, flags=fua)
                op.succeed()
            elif r < 0.94:
                op = history.begin("zero", name, "nbd", unit, count)
                hole = FLAG_NO_HOLE if rng.random() < 0.5 else 0
                await conn.request(CMD_WRITE_ZEROES, offset, length, flags=hole | fua)
                op.succeed()
            elif rng.random() < 0.5:
                op = history.begin("cache", name, "nbd", unit, count)
                if not load.case.read_cache:
                    op.req_end = 0  # nothing to fill: a no-op
                await conn.request(CMD_CACHE, offset, length)
                op.succeed()
            else:
                op = history.begin("flush", name, "nbd")
                await conn.request(CMD_FLUSH, 0, 0)
                op.succeed()
        except (NbdError, ConnectionError) as exc:
            op.fail(error_code(exc))
            if isinstance(exc, ConnectionError):
                return


async def resize_task(load: Load, volume: AsyncVolume, rng: random.Random) -> None:
    """Shrink the volume (to 1/2..1 of its size) and grow it back, one resize every
    ~:data:`RESIZE_GAP` s, until shortly before the deadline; it ends at full size."""
    history, k, n = load.history, load.case.k, SECTORS
    size = n

    async def resize(new: int) -> bool:
        nonlocal size
        op = history.begin("resize", "resize", "grpc")
        op.old_units, op.new_units = size * k, new * k
        try:
            info = await volume.resize(new)
        except Exception as exc:
            op.fail(error_code(exc))
            return False
        if info.sector_count != new:
            op.fail(f"resized to {info.sector_count}")
            return False
        op.succeed()
        size = new
        return True

    while True:
        await asyncio.sleep(rng.uniform(0.4, 1.6) * RESIZE_GAP)
        if time.monotonic() > load.deadline - 0.5:
            break
        if not await resize(n if size < n else rng.randrange(n // 2, n)):
            return  # sizes unknown from here; the checker reports the failure
    if size != n:
        await resize(n)


async def run_load(case: Case, grpc: str, nbd: str) -> History:
    """The case's load on volume ``v`` (see the module's docstring), then the final reads."""
    history = History(units=SECTORS * case.k, unit_size=case.unit_size, base=case.base)
    load = Load(case, history, deadline=time.monotonic() + LOAD_SECONDS)
    clients = [AsyncClient(grpc, retries=0, timeout=20) for _ in range(3)]
    conns: list[PipelinedNbd] = []
    try:
        volumes = [client.volume("v") for client in clients]
        conns = [await PipelinedNbd.open(nbd, "v") for _ in range(2)]
        assert [c.size for c in conns] == [SECTORS * case.sector_size] * 2
        tasks = [resize_task(load, volumes[2], random.Random(f"{case.seed}/resize"))]
        for i in range(TASKS):
            for c in range(2):
                rng = random.Random(f"{case.seed}/g{c}.{i}")
                tasks.append(grpc_task(load, volumes[c], f"g{c}.{i}", rng))
                rng = random.Random(f"{case.seed}/n{c}.{i}")
                tasks.append(nbd_task(load, conns[c], f"n{c}.{i}", rng))
        await asyncio.gather(*tasks)
        op = history.begin("read", "final-grpc", "grpc", 0, history.units)
        try:
            op.succeed(await volumes[0].read(0, SECTORS), case.unit_size)
        except Exception as exc:
            op.fail(error_code(exc))
        op = history.begin("read", "final-nbd", "nbd", 0, history.units)
        try:
            op.succeed(
                await conns[0].request(CMD_READ, 0, SECTORS * case.sector_size), case.unit_size
            )
        except (NbdError, ConnectionError) as exc:
            op.fail(error_code(exc))
    finally:
        for conn in conns:
            await conn.close()
        for client in clients:
            await client.close()
    return history


STALE_SIZE = "which the next start refuses"
"""The warning of a resize that leaves a configured ``size`` stale (``Volume.resize``):
expected here, where the config sizes the layers it makes and the load resizes them."""


def stop_cleanly(server: ServerProcess) -> list[str]:
    """SIGTERM ``server`` (by PID); what went wrong: an exit status other than 0, or log
    lines at WARNING or above (or a traceback), but for :data:`STALE_SIZE`."""
    code = server.terminate()
    out = b"".join(s.read() for s in (server.proc.stdout, server.proc.stderr) if s)
    bad = [
        line
        for line in out.decode(errors="replace").splitlines()
        if any(word in line for word in (" WARNING ", " ERROR ", " CRITICAL ", "Traceback"))
        and STALE_SIZE not in line
    ]
    return ([f"server {server.pid} exited with {code}"] if code else []) + bad[:10]


def assert_exercised(case: Case, history: History) -> dict[str, int]:
    """The history did what the test claims to check: enough successful operations of every
    kind, refusals past a shrunk end on both front ends, shrinks and regrows, reads that
    saw the other front end's writes and writes still in flight, and (pre-filled stacks)
    the lower layer's data. Returns :func:`concurrent_model.summary` with ``raced``."""
    counts = summary(history)
    counts["raced"] = raced(history)
    want = {"read": 500, "write": 300, "unmap": 60, "zero": 20, "nowrite": 10, "flush": 20}
    want |= {"shrink": 3, "regrow": 3, "cross": 200, "raced": 20}
    want |= {"read!": 5, "write!": 5}  # refusals past a shrunk end
    if case.base:
        want["base seen"] = 100
    short = {key: counts.get(key, 0) for key, least in want.items() if counts.get(key, 0) < least}
    assert not short, f"the load did too little: {short} (of {want}); all: {counts}"
    refused = {(o.front, o.kind) for o in history.ops if not o.ok and o.kind != "resize"}
    both = {("grpc", "read"), ("nbd", "read"), ("grpc", "write"), ("nbd", "write")}
    assert both <= refused, f"no refusal of {both - refused}"
    return counts


def raced(history: History) -> int:
    """Units read showing a write that was still in flight when the read began."""
    writes = {o.wid: o for o in history.ops if o.wid}
    return sum(
        1
        for r in history.ops
        if r.kind == "read" and r.ok
        for v in r.values
        if v in writes and writes[v].resp > r.inv
    )


@pytest.mark.parametrize(
    "case",
    CASES,
    ids=[f"{c.stack}@{c.sector_size}{'-rmw' if c.rmw else ''}" for c in CASES],
)
async def test_concurrent_clients_match_the_model(case: Case, tmp_path: Path) -> None:
    """No violation of the register model (see the module's docstring) in a seeded,
    bounded run of concurrent gRPC and NBD clients with resizes; clean server stops."""
    with serving(case, tmp_path) as servers:
        top = servers[-1]
        history = await asyncio.wait_for(run_load(case, top.grpc, top.nbd), LOAD_SECONDS + 60)
        logged = [line for server in reversed(servers) for line in stop_cleanly(server)]
    problems = check(history)
    assert not problems, f"{len(problems)} problems; the first:\n" + "\n".join(problems[:30])
    assert not logged, "\n".join(logged)
    assert_exercised(case, history)


@pytest.mark.parametrize(
    "cmd",
    [
        pytest.param(CMD_WRITE, id="WRITE"),
        pytest.param(CMD_WRITE_ZEROES, id="WRITE_ZEROES"),
    ],
)
async def test_refused_nbd_write_changes_nothing(cmd: int, tmp_path: Path) -> None:
    """An NBD write or WRITE_ZEROES starting inside a sector and reaching past a shrunk end
    (inside the export's size told at the handshake) is refused with ENOSPC and changes
    nothing, not even the sector it starts in (DESIGN §3). Without any race: a
    WRITE_ZEROES so refused had zeroed the 5/8 of the sector it starts in (its edges' read-
    modify-write ran before the rest of the range was checked)."""
    config = write_config(tmp_path, toml_volume("v", ram("1MiB", sector_size=4096)))
    with ServerProcess.start(tmp_path, config, "--nbd", "127.0.0.1:0") as server:
        async with AsyncClient(server.grpc, retries=0) as client:
            volume = client.volume("v")
            before = stamps(1, 214 * 8, 8, 512)
            await volume.write(214, before)
            nbd = await Raw.open(server.nbd)
            try:
                await nbd.go("v")  # told 256 sectors
                await volume.resize(215)
                offset, length = (214 * 8 + 3) * 512, 8 * 512  # 5/8 of 214, 3/8 past it
                data = bytes(length) if cmd == CMD_WRITE else b""
                assert await nbd.error(cmd, offset, length, data) == 28  # ENOSPC
            finally:
                await nbd.close()
            assert await volume.read(214, 1) == before


# -- the checker itself: hand-made histories -----------------------------------------------


class Step(NamedTuple):
    """One operation of a hand-made history (times are arbitrary numbers). ``unit``: the
    new size, for a resize. ``shows``: a read's values; ``data``: its bytes instead."""

    kind: Kind
    unit: int
    inv: float
    resp: float
    length: int = 1
    ok: bool = True
    shows: tuple[int, ...] = ()
    data: bytes = b""
    err: str = ""
    front: Front = "grpc"
    client: str = "t"


def made(*steps: Step, base: bool = False, units: int = 4) -> History:
    """A history of ``steps`` over ``units`` units of 512 bytes; writes get ids 1, 2, …
    in order."""
    history = History(units=units, unit_size=512, base=base)
    size = units
    for s in steps:
        op = history.begin(s.kind, s.client, s.front, s.unit, s.length, inv=s.inv)
        op.resp, op.ok, op.err = s.resp, s.ok, s.err
        if s.kind == "resize":
            op.unit = op.count = op.req_end = 0
            op.old_units, op.new_units = size, s.unit
            size = s.unit if s.ok else size
        if s.data:
            op.succeed(s.data, 512)
            op.resp = s.resp
        else:
            op.values = list(s.shows)
    return history


def w(unit: int, inv: float, resp: float, **kw: Any) -> Step:
    return Step("write", unit, inv, resp, **kw)


def rd(unit: int, inv: float, resp: float, *shows: int, **kw: Any) -> Step:
    return Step("read", unit, inv, resp, shows=shows, **kw)


def torn_data() -> bytes:
    """Unit 0 with the first half of write 1's stamp and the second of write 2's."""
    return stamps(1, 0, 1, 512)[:256] + stamps(2, 0, 1, 512)[256:]


REJECTED: dict[str, tuple[Callable[[], History], str]] = {
    "torn": (lambda: made(w(0, 0, 1), w(0, 0, 1), rd(0, 2, 3, data=torn_data())), "TORN"),
    "misplaced": (lambda: made(w(1, 0, 1), rd(0, 2, 3, data=stamps(1, 1, 1, 512))), "MISPLACED"),
    "stale": (lambda: made(w(0, 0, 1), w(0, 2, 3), rd(0, 4, 5, 1)), "STALE"),
    "stale zeros": (lambda: made(w(0, 0, 1), rd(0, 2, 3, ZERO)), "STALE"),
    "stale base": (lambda: made(w(0, 0, 1), rd(0, 2, 3, BASE), base=True), "STALE"),
    "stale past a shrink and regrow": (
        lambda: made(w(3, 0, 1), Step("resize", 2, 2, 3), Step("resize", 4, 4, 5), rd(3, 6, 7, 1)),
        "STALE",
    ),
    "stale over an unmap": (
        lambda: made(w(0, 0, 1), Step("unmap", 0, 2, 3), rd(0, 4, 5, 1)),
        "STALE",
    ),
    "future": (lambda: made(rd(0, 0, 1, 1), w(0, 2, 3)), "FUTURE"),
    "value from nowhere": (lambda: made(w(1, 0, 1), rd(0, 2, 3, 1)), "NOWHERE"),
    "zeros from nowhere": (lambda: made(rd(0, 0, 1, ZERO), base=True), "NOWHERE"),
    "zeros from a refused unmap": (
        lambda: made(
            w(2, 0, 1),
            Step("resize", 3, 2, 3),
            Step("unmap", 2, 4, 5, length=2, ok=False, err="OutOfRange"),
            rd(2, 6, 7, ZERO),
        ),
        "STALE",
    ),
    "zeros from a refused zeroing": (
        lambda: made(
            w(0, 0, 1, length=2),
            Step("resize", 1, 2, 3),
            Step("zero", 0, 4, 5, length=2, ok=False, err="nbd:28", front="nbd"),
            rd(0, 6, 7, ZERO),
        ),
        "STALE",
    ),
    "read-read order": (
        lambda: made(w(0, 0, 1), w(0, 2, 10), rd(0, 3, 4, 2), rd(0, 5, 6, 1)),
        "READ-READ ORDER",
    ),
    "failed write visible": (
        lambda: made(
            Step("resize", 1, 0, 1),
            w(2, 2, 3, ok=False, err="OutOfRange"),
            Step("resize", 4, 4, 5),
            rd(2, 6, 7, 1),
        ),
        "FAILED WRITE VISIBLE",
    ),
    "no_overwrite over a plain write": (
        lambda: made(w(0, 0, 1), Step("nowrite", 0, 2, 3), rd(0, 4, 5, 2)),
        "NO_OVERWRITE LANDED",
    ),
    "no_overwrite concurrent, plain write done": (
        lambda: made(w(0, 0, 3), Step("nowrite", 0, 1, 2), rd(0, 4, 5, 2)),
        "NO_OVERWRITE LANDED",
    ),
    "no_overwrite over the lower layer": (
        lambda: made(Step("nowrite", 0, 0, 1), rd(0, 2, 3, 1), base=True),
        "NO_OVERWRITE LANDED",
    ),
    "refused inside every size": (
        lambda: made(rd(0, 0, 1, ok=False, err="OutOfRange")),
        "REFUSED INSIDE",
    ),
    "succeeded past every size": (
        lambda: made(Step("resize", 2, 0, 1), rd(3, 2, 3, ZERO)),
        "SUCCEEDED PAST END",
    ),
    "wrong NBD refusal": (
        lambda: made(Step("resize", 2, 0, 1), w(3, 2, 3, ok=False, err="nbd:22", front="nbd")),
        "WRONG REFUSAL",
    ),
    "storage error": (lambda: made(w(0, 0, 1, ok=False, err="StorageError")), "UNEXPECTED ERROR"),
    "failed flush": (
        lambda: made(Step("flush", 0, 0, 1, length=0, ok=False, err="WritesLost")),
        "UNEXPECTED ERROR",
    ),
    "failed resize": (
        lambda: made(Step("resize", 2, 0, 1, ok=False, err="StorageError")),
        "UNEXPECTED ERROR",
    ),
    "final reads differ": (
        lambda: made(
            w(0, 0, 1),
            w(0, 0, 1),
            rd(0, 2, 3, 1, client="final-grpc"),
            rd(0, 4, 5, 2, client="final-nbd", front="nbd"),
        ),
        "FINAL MISMATCH",
    ),
    "final read failed": (
        lambda: made(rd(0, 0, 1, ok=False, err="Unavailable", client="final-grpc")),
        "FINAL READ FAILED",
    ),
}
"""Histories no order of their operations could give, and the problem each must raise."""

ACCEPTED: dict[str, Callable[[], History]] = {
    "initial zeros": lambda: made(rd(0, 0, 1, ZERO)),
    "initial base": lambda: made(rd(0, 0, 1, BASE), base=True),
    "own stamp": lambda: made(w(0, 0, 1), rd(0, 2, 3, data=stamps(1, 0, 1, 512))),
    "concurrent write, old value": lambda: made(w(0, 0, 1), w(0, 2, 6), rd(0, 4, 5, 1)),
    "concurrent write, new value": lambda: made(w(0, 0, 1), w(0, 2, 6), rd(0, 4, 5, 2)),
    "read overlaps the write it shows": lambda: made(w(0, 1, 3), rd(0, 0, 2, 1)),
    "overlapping writes, either last": lambda: made(w(0, 0, 3), w(0, 1, 2), rd(0, 4, 5, 1)),
    "unmap gives zeros": lambda: made(w(0, 0, 1), Step("unmap", 0, 2, 3), rd(0, 4, 5, ZERO)),
    "concurrent unmap, old value": lambda: made(
        w(0, 0, 1), Step("unmap", 0, 2, 6), rd(0, 3, 4, 1), rd(0, 5, 6, 1)
    ),
    "concurrent zeroing, zeros": lambda: made(
        w(0, 0, 1), Step("zero", 0, 2, 6, front="nbd"), rd(0, 3, 4, ZERO)
    ),
    "no_overwrite after an unmap": lambda: made(
        w(0, 0, 1), Step("unmap", 0, 2, 3), Step("nowrite", 0, 4, 5), rd(0, 6, 7, 2)
    ),
    "no_overwrite on a fresh unit": lambda: made(Step("nowrite", 0, 0, 1), rd(0, 2, 3, 1)),
    "no_overwrite after a shrink over the lower layer": lambda: made(
        Step("resize", 0, 0, 1),
        Step("resize", 4, 2, 3),
        Step("nowrite", 0, 4, 5),
        rd(0, 6, 7, 1),
        base=True,
    ),
    "zeros after a shrink and regrow": lambda: made(
        w(3, 0, 1), Step("resize", 2, 2, 3), Step("resize", 4, 4, 5), rd(3, 6, 7, ZERO)
    ),
    "refused while shrinking": lambda: made(
        Step("resize", 2, 0, 3),
        rd(3, 1, 2, ok=False, err="OutOfRange"),
        w(3, 1, 2, ok=False, err="nbd:28", front="nbd"),
    ),
    "succeeded while shrinking": lambda: made(Step("resize", 2, 0, 3), rd(3, 1, 2, ZERO)),
    "refused past the end": lambda: made(
        Step("resize", 2, 0, 1),
        rd(3, 2, 3, ok=False, err="nbd:22", front="nbd"),
        Step("unmap", 3, 2, 3, ok=False, err="OutOfRange"),
        Step("cache", 3, 2, 3, ok=False, err="nbd:22", front="nbd"),
        Step("zero", 3, 2, 3, ok=False, err="nbd:28", front="nbd"),
        Step("resize", 4, 4, 5),
    ),
    "final reads agree": lambda: made(
        w(0, 0, 1),
        rd(0, 2, 3, 1, client="final-grpc"),
        rd(0, 4, 5, 1, client="final-nbd", front="nbd"),
    ),
}
"""Histories some order of their operations gives: no problem may be reported."""


@pytest.mark.parametrize("name", list(REJECTED))
def test_checker_rejects(name: str) -> None:
    """The checker reports the violation a hand-made history holds (it is able to fail)."""
    build, tag = REJECTED[name]
    problems = check(build())
    assert any(tag in p for p in problems), problems


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_checker_accepts(name: str) -> None:
    """The checker reports nothing for a legal concurrent history."""
    assert check(ACCEPTED[name]()) == []


def test_decode_names_each_unit() -> None:
    """Stamps decode to their write id, zeros to ZERO; torn and misplaced units are TORN
    and described."""
    data = stamps(7, 10, 2, 512) + bytes(512) + torn_data() + stamps(3, 99, 1, 512)
    values, problems = decode(data, 10, 512)
    assert values == [7, 7, ZERO, TORN, TORN]
    assert len(problems) == 2 and "torn" in problems[0] and "misplaced" in problems[1]
