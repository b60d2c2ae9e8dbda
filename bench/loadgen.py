"""The load generator: ``grpc.aio`` on one channel, QD requests in flight, in its own process.

It drives anything that serves tierdisk's ``BlockDevice`` proto (``tierdisk serve`` or the
floor server) with ``Read``/``Write`` calls of ``bs`` bytes, ``qd`` at a time, for a warm-up
and then a measured window, and prints one JSON result. Requests are serialized here
(``Write`` payloads by prefixing the wire header, one copy) and replies are taken as raw
bytes with only a length check, so as little of the shared 2 cores as possible goes to the
client; the first reply of every run is parsed in full to check it.

Every run is bounded in time (``--duration``) and in count (``--max-ops``).

One run::

    python bench/loadgen.py --target 127.0.0.1:7400 --volume ram --op randread --bs 4096 \\
        --qd 32 --duration 1

Worker mode (used by bench/run): ``--worker`` reads one JSON command per line on stdin
(``{"cmd": "run", ...}`` with the same keys as the flags, or ``{"cmd": "quit"}``) and answers
each with one JSON line; channels are kept per target. ``--inproc-config FILE`` also starts a
tierdisk server for FILE inside this process and event loop (the "server in its own process"
lever turned off) and announces its address first.

Levers: malloc tuning and uvloop are applied at start unless ``TIERDISK_NO_MALLOC_TUNING=1``
or ``TIERDISK_NO_UVLOOP=1``; the opt-in poller lever (gRPC's poller thread in the batch
scheduling class) once its first channel exists, when ``TIERDISK_SERVER_GRPC_POLLER_BATCH=1``
(what ``tierdisk serve`` reads as ``[server] grpc_poller_batch``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    GRPC_CHANNEL_OPTIONS,
    SECTOR,
    CpuSample,
    apply_levers,
    apply_poller_lever,
    proc_sample,
    self_sample,
)

LEVERS = apply_levers()  # before grpc allocates anything

import grpc  # noqa: E402

from tierdisk.v1 import blockdevice_pb2 as pb  # noqa: E402

OPS = ("randread", "seqread", "randwrite", "seqwrite")
READ_PATH = "/tierdisk.v1.BlockDevice/Read"
READ_BATCH_PATH = "/tierdisk.v1.BlockDevice/ReadBatch"
WRITE_PATH = "/tierdisk.v1.BlockDevice/Write"
MAX_SECONDS = 600.0  # hard bound of any one command


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class Requests:
    """Makes the serialized requests of one run: random or sequential blocks of ``bs``
    bytes within ``[offset, offset + size)`` of the volume."""

    def __init__(
        self, op: str, volume: str, bs: int, offset: int, size: int, seed: int, batch: int = 1
    ) -> None:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}")
        if batch < 1 or (batch > 1 and not op.endswith("read")):
            raise ValueError("batch: 1, or more reads a call (ReadBatch) for a read op")
        self.batch = batch
        if bs % SECTOR or offset % bs or size < bs:
            raise ValueError("bs must be whole sectors; offset a multiple of bs; size >= bs")
        self.op = op
        self.volume = volume
        self.bs = bs
        self.count = bs // SECTOR
        self.first = offset // SECTOR
        self.blocks = size // bs
        self.rng = random.Random(seed)
        self.cursor = 0
        self.is_read = op.endswith("read")
        self.payload = random.Random(seed).randbytes(bs) if not self.is_read else b""
        self.data_header = b"\x1a" + _varint(bs)

    def _block(self) -> int:
        if self.op.startswith("rand"):
            return self.rng.randrange(self.blocks)
        block = self.cursor
        self.cursor = (self.cursor + 1) % self.blocks
        return block

    def next(self) -> bytes:
        if self.batch > 1:  # ReadBatch: `batch` blocks a call
            blocks = [self.first + self._block() * self.count for _ in range(self.batch)]
            return pb.ReadBatchRequest(
                volume=self.volume,
                ranges=[pb.Extent(sector=b, sector_count=self.count) for b in blocks],
            ).SerializeToString()
        sector = self.first + self._block() * self.count
        if self.is_read:
            return pb.ReadRequest(
                volume=self.volume, sector=sector, sector_count=self.count
            ).SerializeToString()
        head = pb.WriteRequest(volume=self.volume, sector=sector).SerializeToString()
        return b"".join((head, self.data_header, self.payload))


class Channels:
    """One channel per target, kept across runs (one event loop)."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, target: str) -> grpc.aio.Channel:
        ch = self._channels.get(target)
        if ch is None:
            ch = self._channels[target] = grpc.aio.insecure_channel(
                target, options=GRPC_CHANNEL_OPTIONS
            )
            apply_poller_lever(LEVERS)
        return ch

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, int(q * len(sorted_values)))
    return sorted_values[index]


async def run_load(channel: grpc.aio.Channel, args: dict[str, Any]) -> dict[str, Any]:
    """One run: warm-up, measured window; the result as a JSON-friendly dict."""
    op = args["op"]
    bs = int(args["bs"])
    qd = int(args["qd"])
    duration = min(float(args["duration"]), MAX_SECONDS)
    warmup = float(args.get("warmup", 0.0))
    max_ops = int(args.get("max_ops") or 10_000_000)
    server_pid = int(args.get("server_pid") or 0)
    requests = Requests(
        op,
        args["volume"],
        bs,
        int(args.get("offset", 0)),
        int(args.get("size", 256 << 20)),
        int(args.get("seed", 1)),
        int(args.get("batch", 1)),
    )
    batch = requests.batch
    # bytes in and out: no (de)serializer, the load generator frames requests itself
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        READ_BATCH_PATH if batch > 1 else READ_PATH if requests.is_read else WRITE_PATH
    )

    expect = bs * batch if requests.is_read else 0
    if args.get("check", True):  # check one reply in full before measuring
        first = await call(requests.next(), timeout=30)
        if requests.is_read:
            got = len(pb.ReadResponse.FromString(first).data)  # ReadBatchResponse alike
            if got != expect:
                raise RuntimeError(f"Read returned {got} bytes, expected {expect}")
        else:
            pb.WriteResponse.FromString(first)

    measuring = False
    stop = False
    done = asyncio.Event()
    count = 0
    nbytes = 0
    latencies: list[float] = []
    perf = time.perf_counter

    async def worker() -> None:
        nonlocal count, nbytes
        while not stop:
            request = requests.next()
            t0 = perf()
            reply = await call(request)
            t1 = perf()
            if len(reply) < expect:
                raise RuntimeError(f"short reply: {len(reply)} bytes for a {expect}-byte read")
            if measuring and not stop:
                count += batch
                nbytes += bs * batch
                latencies.append(t1 - t0)
                if count >= max_ops:
                    done.set()

    # ReadBatch: qd reads in flight, `batch` to a call
    tasks = [asyncio.create_task(worker()) for _ in range(max(1, qd // batch))]
    failed: list[BaseException] = []

    def _on_fail(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            failed.append(task.exception())  # type: ignore[arg-type]
            done.set()

    for task in tasks:
        task.add_done_callback(_on_fail)
    try:
        if warmup > 0:
            await asyncio.sleep(warmup)
        if failed:
            raise failed[0]
        srv0 = proc_sample(server_pid) if server_pid else None
        cli0 = self_sample()
        t_start = perf()
        measuring = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), duration)
        stop = True
        t_end = perf()
        cli1 = self_sample()
        srv1 = proc_sample(server_pid) if server_pid else None
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        if failed:
            raise failed[0]
    finally:
        stop = True
        for task in tasks:
            task.cancel()
    seconds = t_end - t_start
    latencies.sort()
    result: dict[str, Any] = {
        "op": op,
        "bs": bs,
        "qd": qd,
        "batch": batch,
        "volume": args["volume"],
        "target": args["target"],
        "ops": count,
        "seconds": round(seconds, 4),
        "ops_s": count / seconds if seconds > 0 else 0.0,
        "mb_s": nbytes / seconds / 1e6 if seconds > 0 else 0.0,
        "lat_p50_us": _us(_percentile(latencies, 0.50)),
        "lat_p99_us": _us(_percentile(latencies, 0.99)),
        "cli_cpu_us_op": _per_op(cli0, cli1, count, "cpu", 1e6),
        "cli_minflt_op": _per_op(cli0, cli1, count, "minflt", 1),
        "srv_cpu_us_op": _per_op(srv0, srv1, count, "cpu", 1e6),
        "srv_minflt_op": _per_op(srv0, srv1, count, "minflt", 1),
        "levers": LEVERS,
    }
    return result


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e6, 1)


def _per_op(
    a: CpuSample | None, b: CpuSample | None, ops: int, attr: str, scale: float
) -> float | None:
    if a is None or b is None or ops <= 0:
        return None
    spent: float = getattr(b, attr) - getattr(a, attr)
    return round(spent * scale / ops, 2)


async def _start_inproc(config: str) -> Any:
    from tierdisk.service.config import load_config
    from tierdisk.service.server import Server

    server = Server(load_config(config, flags={"listen": "127.0.0.1:0", "metrics": ""}))
    await server.start()
    return server


def worker_main(inproc_config: str | None) -> int:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    channels = Channels()
    server = None
    hello: dict[str, Any] = {"ready": True, "pid": os.getpid(), "levers": LEVERS}
    if inproc_config:
        server = loop.run_until_complete(_start_inproc(inproc_config))
        hello["inproc"] = server.grpc_address
    print(json.dumps(hello), flush=True)
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            cmd = json.loads(line)
            if cmd.get("cmd") == "quit":
                break
            try:
                result = loop.run_until_complete(
                    asyncio.wait_for(run_load(channels.get(cmd["target"]), cmd), MAX_SECONDS)
                )
            except Exception as exc:  # report, keep serving
                result = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(result), flush=True)
    finally:
        loop.run_until_complete(channels.close())
        if server is not None:
            loop.run_until_complete(server.stop(grace=1))
        loop.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help="JSON commands on stdin")
    p.add_argument("--inproc-config", help="worker: also serve this config in-process")
    p.add_argument("--target", help="gRPC address of the server")
    p.add_argument("--volume", default="ram")
    p.add_argument("--op", choices=OPS, default="randread")
    p.add_argument("--bs", type=int, default=4096, help="bytes per request")
    p.add_argument("--qd", type=int, default=1, help="requests in flight")
    p.add_argument("--duration", type=float, default=2.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=0.5, help="seconds before measuring")
    p.add_argument("--max-ops", type=int, default=10_000_000, help="bound on measured ops")
    p.add_argument("--offset", type=int, default=0, help="region start (bytes)")
    p.add_argument("--size", type=int, default=256 << 20, help="region size (bytes)")
    p.add_argument("--server-pid", type=int, default=0, help="for server CPU per op")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--batch", type=int, default=1, help="reads per call (ReadBatch); 1: one Read each"
    )
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args.inproc_config)
    if not args.target:
        p.error("--target is required")

    async def one() -> dict[str, Any]:
        channels = Channels()
        try:
            return await run_load(channels.get(args.target), vars(args))
        finally:
            await channels.close()

    result = asyncio.run(one())
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
