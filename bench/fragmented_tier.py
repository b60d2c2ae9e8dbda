"""Reads through a fragmented layer above a remote one: the calls they make to the origin.

An origin (``tierdisk serve``, one prefilled ``[ram]`` volume) and a cache server whose volume
is ``[ram, remote -> origin]`` (the remote in ``--mode`` disk or layer), its top holding one
4 KiB block in every ``--stride`` bytes (written through the cache server, so each 1 MiB
read has ``1 MiB / stride`` holes for the remote layer). The load reads the whole volume
in 1 MiB requests at QD 4 with the client library (or, with ``--bs`` under 1 MiB,
``--reads`` reads of that size at random places, as many small reads at once through a cold
tier) and reports reads/s, the cache server's and the origin's CPU per read, and the
origin's calls per read (its ``grpc_server_handled_total``). With ``--compare TREE`` a
second cache server runs from another source tree (a folder holding a ``tierdisk``
package, as for ``bench/run --compare``) over the same origin, the two measured in
alternating rounds, and the ratios are taken within each round::

    python bench/fragmented_tier.py                        # this tree only
    python bench/fragmented_tier.py --compare /tmp/before  # before/after in one run
    python bench/fragmented_tier.py --bs 4096 --qd 32      # small reads, 32 at once

Everything is on 127.0.0.1; every round is bounded (``--reads``); every process started
is stopped by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MiB, ServerProc, apply_levers, free_port, lever_env, proc_sample

BLOCK = 4096


def _config(work: Path, body: str) -> str:
    return f'[server]\ndata_dir = "{work / "data"}"\n' + body


def _origin_calls(metrics: str) -> int:
    """Calls the origin answered, all methods (its ``/metrics``)."""
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("grpc_server_handled_total{")
            and 'grpc_method="Read' in line  # Read and ReadBatch
        )
    )


async def _fragment(target: str, mib: int, stride: int) -> None:
    from tierdisk.client.aio import AsyncClient

    async with AsyncClient(target) as client:
        vol = client.volume("vm")
        block = b"\xa5" * BLOCK
        for offset in range(0, mib * MiB, stride):
            await vol.write_bytes(offset, block)


async def _prefill(target: str, mib: int) -> None:
    from tierdisk.client.aio import AsyncClient

    async with AsyncClient(target) as client:
        vol = client.volume("base")
        chunk = os.urandom(MiB)
        for i in range(mib):
            await vol.write(i * MiB // 512, chunk)


async def _read_all(target: str, reads: int, size: int, mib: int, qd: int, seed: int) -> float:
    """``reads`` reads of ``size`` bytes of ``vm`` at ``target``, ``qd`` at a time: in order
    from the start for 1 MiB, else at random ``size``-aligned places of the first ``mib``
    MiB; the seconds they took."""
    from tierdisk.client.aio import AsyncClient

    rng = random.Random(seed)
    blocks = mib * MiB // size
    places = [i % blocks if size == MiB else rng.randrange(blocks) for i in range(reads)]
    async with AsyncClient(target) as client:
        vol = client.volume("vm")
        await vol.read_into(0, bytearray(size))  # connect, learn the geometry
        start = time.perf_counter()

        async def worker(first: int) -> None:
            buf = bytearray(size)
            for i in range(first, reads, qd):
                await vol.read_into(places[i] * size // 512, buf)

        await asyncio.gather(*(worker(n) for n in range(qd)))
        return time.perf_counter() - start


def _round(
    cache: ServerProc, origin: ServerProc, metrics: str, args: Any, seed: int
) -> dict[str, float]:
    calls0 = _origin_calls(metrics)
    cache0, origin0 = proc_sample(cache.pid), proc_sample(origin.pid)
    seconds = asyncio.run(_read_all(cache.address, args.reads, args.bs, args.mib, args.qd, seed))
    cache1, origin1 = proc_sample(cache.pid), proc_sample(origin.pid)
    assert cache0 and cache1 and origin0 and origin1
    return {
        "reads_s": args.reads / seconds,
        "cache_cpu_us": (cache1.cpu - cache0.cpu) / args.reads * 1e6,
        "origin_cpu_us": (origin1.cpu - origin0.cpu) / args.reads * 1e6,
        "origin_calls": (_origin_calls(metrics) - calls0) / args.reads,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compare", help="another source tree (folder with a tierdisk package)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--mib", type=int, default=256, help="MiB read per round (1 MiB reads)")
    p.add_argument("--stride", type=int, default=64 * 1024, help="bytes per block held on top")
    p.add_argument("--qd", type=int, default=4)
    p.add_argument(
        "--bs",
        type=int,
        default=MiB,
        help="bytes a read: 1 MiB (in order, the default) or less (at random places)",
    )
    p.add_argument("--reads", type=int, default=0, help="reads a round (default: the --mib)")
    p.add_argument(
        "--mode",
        choices=("disk", "layer"),
        default="disk",
        help="the remote layer's mode (layer: reads ask for presence)",
    )
    args = p.parse_args()
    if args.bs % 4096 or not 0 < args.bs <= MiB:
        p.error("--bs: a multiple of 4096, at most 1 MiB")
    if not args.reads:
        args.reads = args.mib if args.bs == MiB else 4000
    if args.stride % BLOCK or args.stride <= BLOCK or MiB % args.stride:
        p.error(f"--stride: a multiple of {BLOCK} over {BLOCK} that divides 1 MiB")
    apply_levers()
    with tempfile.TemporaryDirectory(prefix="tierdisk-fragmented-") as tmp:
        work = Path(tmp)
        metrics = f"127.0.0.1:{free_port()}"
        (work / "origin.toml").write_text(
            _config(
                work,
                '[[volumes]]\nname = "base"\n[[volumes.layers]]\nkind = "ram"\n'
                f'size = "{args.mib}MiB"\n',
            )
        )
        origin = ServerProc.tierdisk(
            work / "origin.toml", work, "origin", env=lever_env(), extra=["--metrics", metrics]
        )
        caches: dict[str, ServerProc] = {}
        try:
            origin.wait_ready()
            asyncio.run(_prefill(origin.address, args.mib))
            (work / "cache.toml").write_text(
                _config(
                    work,
                    '[[volumes]]\nname = "vm"\n[[volumes.layers]]\nkind = "ram"\n'
                    f'[[volumes.layers]]\nkind = "remote"\ntarget = "{origin.address}"\n'
                    f'volume = "base"\nmode = "{args.mode}"\n',
                )
            )
            trees = (
                {"this tree": None, "that tree": args.compare}
                if args.compare
                else {"this tree": None}
            )
            for name, tree in trees.items():
                env = lever_env()
                if tree:
                    env["PYTHONPATH"] = str(Path(tree).resolve())
                label = name.replace(" ", "-")
                caches[name] = ServerProc.tierdisk(work / "cache.toml", work, label, env=env)
                caches[name].wait_ready()
                asyncio.run(_fragment(caches[name].address, args.mib, args.stride))
            results: dict[str, list[dict[str, float]]] = {name: [] for name in caches}
            for index in range(args.rounds):
                for name, cache in caches.items():
                    results[name].append(_round(cache, origin, metrics, args, index))
        finally:
            for proc in (*caches.values(), origin):
                proc.stop()
    holes = MiB // args.stride
    what = "in order" if args.bs == MiB else f"at random in {args.mib} MiB"
    print(
        f"{args.rounds} rounds x {args.reads} reads of {args.bs // 1024} KiB ({what}) at QD "
        f"{args.qd} through [ram, remote -> origin] ({args.mode} mode), the top holding "
        f"4 KiB in every {args.stride // 1024} KiB ({holes} holes per MiB)"
    )
    for name, rows in results.items():

        def med(key: str, rows: list[dict[str, float]] = rows) -> str:
            values = [r[key] for r in rows]
            return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"

        def med2(key: str, rows: list[dict[str, float]] = rows) -> str:
            values = [r[key] for r in rows]
            return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

        print(
            f"{name:10s} reads/s {med('reads_s')}  cache CPU µs/read {med('cache_cpu_us')}  "
            f"origin CPU µs/read {med('origin_cpu_us')}  origin calls/read {med2('origin_calls')}"
        )
    if args.compare:
        mine, theirs = results["this tree"], results["that tree"]
        for key in ("reads_s", "cache_cpu_us", "origin_cpu_us"):
            ratios = [a[key] / b[key] for a, b in zip(mine, theirs, strict=True)]
            print(
                f"{key}, this tree / that tree (per round): median "
                f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
