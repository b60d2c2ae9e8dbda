"""Scale of the ``sparse`` layer: open time and presence memory of a fragmented 1 TiB layer.

What it builds (in a temporary folder, removed at the end, unless ``--dir``):

- a 1 TiB layer (4 KiB sectors) holding ``--runs`` fragmented runs (default 100,000, spread
  at random over the whole disk). Most runs are made present as zeros with an unmap
  (no disk space); one in a hundred is real data. Built through the layer's own API.
- after a clean close (the map is one snapshot), it times ``attach`` (median of
  ``--repeat``) and measures the memory the open layer keeps (tracemalloc, retained and
  peak) and the 16-byte-per-run floor of the RunSet arrays;
- a *crash image* of the same layer whose map carries the longest log of ``DIFF`` records
  allowed before compaction (the worst case after a crash), and times its open too;
- the run count once every gap is filled (1 TiB fully present), and of a 256 MiB layer
  written with 1 MiB writes in random order.

Goals (issue "Persistent layers"): open under 2 s with 100,000 runs, presence under 64 MiB,
a fully written layer a handful of runs. The *baseline* is the open of an empty 1 TiB layer
measured in the same run: ratios are against it. Prints a table, then one JSON line.

    python bench/sparse_scale.py [--runs 100000] [--repeat 5] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from tierdisk.service.layers import sparse as sparse_module
from tierdisk.service.layers.sparse import SparseLayer

TIB = 1 << 40
SS = 4096
SECTORS = TIB // SS
BATCH = 2000


async def build_fragmented(path: str, runs: int, seed: int) -> list[tuple[int, int]]:
    """A 1 TiB layer with ``runs`` disjoint runs; returns them (sorted)."""
    rng = random.Random(seed)
    slot = SECTORS // runs
    chosen = []
    for i in range(runs):
        length = rng.randint(1, 16)
        start = i * slot + rng.randrange(0, slot - length)
        chosen.append((start, start + length))
    layer = SparseLayer(path, size=TIB, sector_size=SS)
    await layer.attach(None)
    try:
        for b in range(0, runs, BATCH):
            ops = []
            for i, (a, e) in enumerate(chosen[b : b + BATCH], start=b):
                if i % 100 == 0:
                    data = memoryview(os.urandom((e - a) * SS))
                    ops.append(layer.write(data, a, False))
                else:
                    ops.append(layer.unmap(a, e - a, False, False))  # present zeros
            await asyncio.gather(*ops)
            await layer.flush()
        assert layer.inspect()["present_runs"] == runs
    finally:
        await layer.close()
    return chosen


def file_size(name: str) -> int:
    return os.stat(name).st_size


def sparse_copy(src: str, dst: str) -> None:
    """Copy a sparse file extent by extent (SEEK_DATA/SEEK_HOLE): a plain copy of a 1 TiB
    data file would write a terabyte."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        os.ftruncate(fout.fileno(), size)
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data past pos
                break
            end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
            done = start
            while done < end:
                done += os.copy_file_range(fin.fileno(), fout.fileno(), end - done, done, done)
            pos = end


async def log_heavy_image(path: str, image: str, chosen: list[tuple[int, int]]) -> int:
    """Grow the map's DIFF log to just under the compaction threshold, then copy the files
    while the layer is open (the state a crash leaves). Returns the DIFF bytes."""
    layer = SparseLayer(path)
    await layer.attach(None)
    per_record = 400
    try:
        snapshot = file_size(path + ".map")
        limit = max(snapshot, sparse_module.COMPACT_MIN_BYTES)
        rng = random.Random(1)
        for _ in range(1_000_000):
            if file_size(path + ".map") - snapshot + per_record * 16 + 64 > limit:
                break
            picks = rng.sample(chosen, per_record)
            # one flush drops the first sector of each picked run, the next puts it back:
            # each record carries `per_record` runs
            await asyncio.gather(*(layer.unmap(a, 1, False, True) for a, _ in picks))
            await layer.flush()
            await asyncio.gather(*(layer.unmap(a, 1, False, False) for a, _ in picks))
            await layer.flush()
        diff_bytes = file_size(path + ".map") - snapshot
        assert layer.inspect()["map_bytes"] == snapshot + diff_bytes, "compacted: too far"
        sparse_copy(path, image)
        shutil.copyfile(path + ".map", image + ".map")
    finally:
        await layer.close()
    return diff_bytes


async def time_open(path: str, repeat: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeat):
        layer = SparseLayer(path)
        t0 = time.perf_counter()
        await layer.attach(None)
        times.append(time.perf_counter() - t0)
        await layer.close()
    return statistics.median(times), times


async def open_memory(path: str) -> dict[str, Any]:
    gc.collect()
    tracemalloc.start()
    layer = SparseLayer(path)
    await layer.attach(None)
    gc.collect()
    retained, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    runs = layer.inspect()["present_runs"]
    await layer.close()
    return {"retained_bytes": retained, "peak_bytes": peak, "runs": runs, "floor": 16 * runs}


async def fully_present(path: str) -> int:
    layer = SparseLayer(path)
    await layer.attach(None)
    try:
        await layer.unmap(0, SECTORS, False, False)  # every gap filled (present zeros)
        return int(layer.inspect()["present_runs"])
    finally:
        await layer.close()


async def written_in_random_order(path: str) -> int:
    size, step = 256 << 20, 1 << 20
    layer = SparseLayer(path, size=size, sector_size=SS)
    await layer.attach(None)
    try:
        offsets = list(range(0, size, step))
        random.Random(2).shuffle(offsets)
        block = memoryview(os.urandom(step))
        for off in offsets:
            await layer.write(block, off // SS, False)
        await layer.flush()
        return int(layer.inspect()["present_runs"])
    finally:
        await layer.close()


def mib(n: float) -> str:
    return f"{n / (1 << 20):.2f} MiB"


async def run(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    empty = str(folder / "empty")
    layer = SparseLayer(empty, size=TIB, sector_size=SS)
    await layer.attach(None)
    await layer.close()
    base_median, _ = await time_open(empty, args.repeat)

    frag = str(folder / "frag")
    t0 = time.perf_counter()
    chosen = await build_fragmented(frag, args.runs, args.seed)
    build_s = time.perf_counter() - t0
    map_bytes = file_size(frag + ".map")
    open_median, open_all = await time_open(frag, args.repeat)
    memory = await open_memory(frag)

    image = str(folder / "crash-image")
    diff_bytes = await log_heavy_image(frag, image, chosen)
    crash_times = []
    for _ in range(args.repeat):  # a fresh copy each time: close compacts the one it opened
        sparse_copy(image, image + ".try")
        shutil.copyfile(image + ".map", image + ".try.map")
        layer = SparseLayer(image + ".try")
        t0 = time.perf_counter()
        await layer.attach(None)
        crash_times.append(time.perf_counter() - t0)
        await layer.close()
    crash_median = statistics.median(crash_times)

    full_runs = await fully_present(frag)
    random_runs = await written_in_random_order(str(folder / "written"))
    disk = sum(os.stat(folder / n).st_blocks * 512 for n in os.listdir(folder))
    return {
        "runs": args.runs,
        "layer_bytes": TIB,
        "sector_size": SS,
        "build_s": round(build_s, 2),
        "open_empty_s": round(base_median, 4),
        "open_s": round(open_median, 4),
        "open_all_s": [round(t, 4) for t in open_all],
        "open_vs_empty": round(open_median / base_median, 1),
        "open_after_crash_s": round(crash_median, 4),
        "crash_log_diff_bytes": diff_bytes,
        "map_bytes": map_bytes,
        "presence_retained_bytes": memory["retained_bytes"],
        "presence_peak_bytes": memory["peak_bytes"],
        "runset_floor_bytes": memory["floor"],
        "fully_present_runs": full_runs,
        "written_random_order_runs": random_runs,
        "disk_used_bytes": disk,
        "goal_open_s": 2.0,
        "goal_memory_bytes": 64 << 20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", help="work folder (default: a temporary one, removed)")
    args = parser.parse_args()
    if args.dir:
        folder = Path(args.dir)
        folder.mkdir(parents=True, exist_ok=True)
        result = asyncio.run(run(args, folder))
    else:
        with tempfile.TemporaryDirectory(prefix="sparse-scale-") as tmp:
            result = asyncio.run(run(args, Path(tmp)))
    r = result
    rows = [
        ("runs present (1 TiB, 4 KiB sectors)", f"{r['runs']:,}", ""),
        ("open, empty 1 TiB layer (baseline)", f"{r['open_empty_s'] * 1000:.1f} ms", "1.0x"),
        ("open, clean map", f"{r['open_s'] * 1000:.1f} ms", f"{r['open_vs_empty']}x"),
        (
            "open, crash image (longest log)",
            f"{r['open_after_crash_s'] * 1000:.1f} ms",
            f"{r['open_after_crash_s'] / r['open_empty_s']:.1f}x",
        ),
        ("  goal", "< 2000 ms", f"{r['open_after_crash_s'] / 2:.1%} used"),
        ("presence retained after open", mib(r["presence_retained_bytes"]), ""),
        ("presence peak during open", mib(r["presence_peak_bytes"]), ""),
        ("  floor: 16 bytes per run", mib(r["runset_floor_bytes"]), ""),
        ("  goal", "< 64 MiB", f"{r['presence_peak_bytes'] / (64 << 20):.1%} used"),
        ("map file (snapshot)", f"{r['map_bytes']:,} B", ""),
        ("runs once every gap is filled", str(r["fully_present_runs"]), ""),
        ("runs, 256 MiB written in random order", str(r["written_random_order_runs"]), ""),
        ("build time", f"{r['build_s']:.1f} s", ""),
        ("disk used by all of it", mib(r["disk_used_bytes"]), ""),
    ]
    width = max(len(a) for a, _, _ in rows)
    for a, b, c in rows:
        print(f"{a:<{width}}  {b:>14}  {c}")
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
