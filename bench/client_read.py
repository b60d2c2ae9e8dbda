"""The client library's own cost of a read: CPU per 1 MiB ``AsyncVolume.read_into``.

Starts the floor server (bench/floor_server.py: replies of the right size, no storage), then
reads 1 MiB chunks with ``tierdisk.client`` at QD 4 and reports the client process's CPU
time per read, which is what the library (and gRPC under it) costs a caller, for instance a
remote layer in a cache tier. With ``--compare TREE`` the same measurement also runs with the
client library of another source tree (a folder holding a ``tierdisk`` package, as for
``bench/run --compare``), in alternating rounds, and the ratio is taken within each round::

    python bench/client_read.py                       # this tree only
    python bench/client_read.py --compare /tmp/before # before/after in one run

Every round is bounded (``--reads`` reads); everything started is stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH, PYTHON, REPO, MiB, ServerProc, apply_levers, lever_env


async def _measure(target: str, reads: int, qd: int) -> dict[str, float]:
    from tierdisk.client.aio import AsyncClient

    async with AsyncClient(target) as client:
        volume = client.volume("ram")
        await volume.read_into(0, bytearray(MiB))  # connect, learn the geometry

        async def worker(first: int) -> None:
            buf = bytearray(MiB)
            for i in range(reads // qd):
                await volume.read_into((first + i * qd) * (MiB // 512), buf)

        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker(n) for n in range(qd)))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    done = reads // qd * qd
    return {"cpu_us_per_read": cpu / done * 1e6, "reads_s": done / wall}


def _child(target: str, reads: int, qd: int) -> None:
    apply_levers()
    print(json.dumps(asyncio.run(_measure(target, reads, qd))), flush=True)


def _run(tree: str | None, target: str, reads: int, qd: int) -> dict[str, float]:
    env = lever_env()
    if tree:
        env["PYTHONPATH"] = str(Path(tree).resolve())
    out = subprocess.run(
        [PYTHON, __file__, "--child", target, "--reads", str(reads), "--qd", str(qd)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compare", help="another source tree (folder with a tierdisk package)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reads", type=int, default=400, help="1 MiB reads per round")
    p.add_argument("--qd", type=int, default=4)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args.child, args.reads, args.qd)
        return 0
    work = BENCH / "results"
    work.mkdir(parents=True, exist_ok=True)
    floor = ServerProc.floor(work, f"client-read-floor-{os.getpid()}")
    mine: list[dict[str, float]] = []
    theirs: list[dict[str, float]] = []
    try:
        floor.wait_ready()
        for _ in range(args.rounds):
            mine.append(_run(None, floor.address, args.reads, args.qd))
            if args.compare:
                theirs.append(_run(args.compare, floor.address, args.reads, args.qd))
    finally:
        floor.stop()
        floor.ready.unlink(missing_ok=True)

    def show(name: str, rows: list[dict[str, Any]]) -> None:
        cpu = [r["cpu_us_per_read"] for r in rows]
        rate = [r["reads_s"] for r in rows]
        print(
            f"{name:14s} client CPU µs per 1 MiB read {statistics.median(cpu):7.0f} "
            f"({min(cpu):.0f}-{max(cpu):.0f})   reads/s {statistics.median(rate):6.0f}"
        )

    print(f"{args.rounds} rounds x {args.reads} reads of 1 MiB at QD {args.qd}, floor server")
    show("this tree", mine)
    if theirs:
        show(Path(args.compare).name or args.compare, theirs)
        ratios = [
            a["cpu_us_per_read"] / b["cpu_us_per_read"] for a, b in zip(mine, theirs, strict=True)
        ]
        print(
            f"CPU per read, this tree / that tree (per round): median "
            f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
