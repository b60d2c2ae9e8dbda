"""The engine alone: the same reads as the gRPC benchmark, in-process, with no gRPC.

Opens the volumes of a tierdisk config the way the server does (one layer per config entry,
``Volume.open``), fills or warms them as bench/run does for the server, and then, per
workload, keeps QD ``Volume.read`` calls in flight on one event loop for a warm-up and a
measured window. Prints one JSON line per (volume, workload).

    python bench/engine.py --config C.toml --data-dir D --volume ram --prefill ram \\
        --workload randread:4096:32 --duration 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SECTOR, apply_levers, self_sample

LEVERS = apply_levers()

from tierdisk.service.config import load_config  # noqa: E402
from tierdisk.service.layers import build_layer  # noqa: E402
from tierdisk.service.volume import LayerEntry, Volume  # noqa: E402


async def open_volumes(config: str, data_dir: str, names: list[str]) -> dict[str, Volume]:
    cfg = load_config(
        config, flags={"data_dir": data_dir, "listen": "127.0.0.1:0", "metrics": "", "nbd": ""}
    )
    opened: dict[str, Volume] = {}
    for vc in cfg.volumes:
        if vc.name not in names:
            continue
        entries = [LayerEntry(build_layer(lc), lc.read_cache, lc.write_through) for lc in vc.layers]
        opened[vc.name] = await Volume.open(vc.name, entries, read_only=vc.read_only)
    return opened


async def sweep(volume: Volume, offset: int, size: int, write: bool) -> None:
    """Write (fill) or read (warm) ``[offset, offset + size)`` once, 1 MiB at a time."""
    chunk = 1 << 20
    payload = random.Random(7).randbytes(chunk)
    for pos in range(offset, offset + size, chunk):
        if write:
            await volume.write(pos // SECTOR, payload)
        else:
            await volume.read(pos // SECTOR, chunk // SECTOR)


async def measure(
    volume: Volume,
    op: str,
    bs: int,
    qd: int,
    offset: int,
    size: int,
    warmup: float,
    duration: float,
    max_ops: int,
) -> dict[str, Any]:
    count = bs // SECTOR
    first = offset // SECTOR
    blocks = size // bs
    rng = random.Random(1)
    cursor = 0
    measuring = False
    stop = False
    done = asyncio.Event()
    ops = 0
    latencies: list[float] = []
    perf = time.perf_counter

    def next_sector() -> int:
        nonlocal cursor
        if op == "randread":
            return first + rng.randrange(blocks) * count
        block = cursor
        cursor = (cursor + 1) % blocks
        return first + block * count

    async def worker() -> None:
        nonlocal ops
        while not stop:
            sector = next_sector()
            t0 = perf()
            data, _ = await volume.read(sector, count)
            t1 = perf()
            if len(data) != bs:
                raise RuntimeError("short read")
            if measuring and not stop:
                ops += 1
                latencies.append(t1 - t0)
                if ops >= max_ops:
                    done.set()
            await asyncio.sleep(0)  # let the other QD slots in, as a server would

    tasks = [asyncio.create_task(worker()) for _ in range(qd)]
    try:
        await asyncio.sleep(warmup)
        cpu0 = self_sample()
        t_start = perf()
        measuring = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), duration)
        stop = True
        t_end = perf()
        cpu1 = self_sample()
        await asyncio.gather(*tasks)
    finally:
        stop = True
        for task in tasks:
            task.cancel()
    seconds = t_end - t_start
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1e6 if latencies else None
    return {
        "op": op,
        "bs": bs,
        "qd": qd,
        "volume": volume.name,
        "ops": ops,
        "seconds": round(seconds, 4),
        "ops_s": ops / seconds,
        "mb_s": ops * bs / seconds / 1e6,
        "lat_p50_us": p50,
        "cli_cpu_us_op": (cpu1.cpu - cpu0.cpu) * 1e6 / ops if ops else None,
        "srv_cpu_us_op": None,
        "levers": LEVERS,
    }


async def main_async(args: argparse.Namespace) -> None:
    volumes = await open_volumes(args.config, args.data_dir, args.volume)
    try:
        for name in args.prefill:
            await sweep(volumes[name], args.offset, args.size, write=True)
        for name in args.warm:
            await sweep(volumes[name], args.offset, args.size, write=False)
        for name in args.volume:
            for spec in args.workload:
                op, bs, qd = spec.split(":")
                result = await measure(
                    volumes[name],
                    op,
                    int(bs),
                    int(qd),
                    args.offset,
                    args.size,
                    args.warmup,
                    args.duration,
                    args.max_ops,
                )
                print(json.dumps(result), flush=True)
    finally:
        for volume in volumes.values():
            await volume.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--data-dir", required=True, help="where this process's layers live")
    p.add_argument("--volume", action="append", required=True)
    p.add_argument("--prefill", action="append", default=[], help="volume to fill first")
    p.add_argument("--warm", action="append", default=[], help="volume to read once first")
    p.add_argument("--workload", action="append", required=True, help="OP:BS:QD (reads)")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--size", type=int, default=256 << 20)
    p.add_argument("--warmup", type=float, default=0.2)
    p.add_argument("--duration", type=float, default=1.0)
    p.add_argument("--max-ops", type=int, default=5_000_000)
    args = p.parse_args()
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
