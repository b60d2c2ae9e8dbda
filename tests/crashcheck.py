"""Crash-consistency harness: a writer child to SIGKILL, and a checker of what survives.

The checker does not care who wrote the data or how it is read back, so a server test can
reuse it: feed the child's report lines (or your own) to :class:`History`, and give
:func:`check_recovery` a function that reads sectors back (from a reopened layer, a volume,
or a gRPC client).

Report protocol (one line each, written to stdout *before* the operation starts for ``I``
and ``F`` lines, *after* it returns for ``A`` and ``D`` lines)::

    READY                          the volume is open
    I <id> W <sector> <count> <fua>  a write of sector_value(id, s) to every sector s
    I <id> U <sector> <count>      an unmap (later reads: zeros)
    A <id>                         operation <id> was acknowledged
    F <n>                          flush <n> starts
    D <n>                          flush <n> returned

Rule checked (DESIGN.md §3): after a crash every sector holds a value some operation could
have left there and that no *durable* operation had overwritten: an operation is durable
when it is a ``fua`` write that was acknowledged, or was acknowledged before a flush that
returned started. Operation Z is ruled out for sector s when Z was acknowledged before a
durable operation on s was issued. A sector that no operation touched keeps its baseline
value and presence (a persistent layer never claims a sector nobody wrote).

Run as a script, this is the child: it opens one layer of a given kind through the engine
and streams random writes, fua writes, unmaps and flushes until killed::

    python tests/crashcheck.py --kind sparse --path P --size BYTES --first-id N --seed S
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

Run = tuple[int, int]
ReadBack = Callable[[int, int], Awaitable[tuple[bytes, list[Run]]]]
"""``(sector, count) -> (data, present runs)``: how the checker reads the recovered disk."""

_TAG = 1 << 63


def sector_value(op_id: int, sector: int, sector_size: int) -> bytes:
    """What write ``op_id`` puts in ``sector``: names both, never all zeros."""
    return struct.pack("<QQ", op_id | _TAG, sector) * (sector_size // 16)


def decode(value: bytes | memoryview, sector: int, sector_size: int) -> int | None:
    """The op id whose write ``value`` (the bytes of ``sector``) is: 0 for zeros, None for
    bytes no write to this sector produced (garbage, torn, or meant for another sector)."""
    if not any(value[:16]) and value == bytes(sector_size):
        return 0
    tag: int
    named: int
    tag, named = struct.unpack_from("<QQ", value)
    if not tag & _TAG or named != sector:
        return None
    op_id = tag & ~_TAG
    if value != sector_value(op_id, sector, sector_size):
        return None
    return op_id


@dataclass
class Op:
    op_id: int
    kind: str  # "W" write or "U" unmap
    sector: int
    count: int
    fua: bool
    issued: int  # position of the intent line
    acked: int | None = None  # position of the ack line
    durable: bool = False


@dataclass
class History:
    """What the child reported, in order, on top of a baseline (the disk before it ran).

    ``baseline`` maps sector → op id of its value (0 = zeros); ``baseline_present`` is the
    set of sectors present before the run (sectors not in ``baseline`` read as zeros).
    """

    sector_size: int
    sector_count: int
    baseline: dict[int, int] = field(default_factory=dict)
    baseline_present: set[int] = field(default_factory=set)
    ops: list[Op] = field(default_factory=list)
    ready: bool = False
    _by_id: dict[int, Op] = field(default_factory=dict)
    _flush_start: dict[int, int] = field(default_factory=dict)
    _pos: int = 0

    def feed(self, line: str) -> None:
        """Take one report line (a torn last line from the killed child is ignored)."""
        self._pos += 1
        parts = line.split()
        if not parts:
            return
        tag = parts[0]
        try:
            if tag == "READY":
                self.ready = True
            elif tag == "I" and parts[2] == "W" and len(parts) == 6:
                self._add(
                    Op(int(parts[1]), "W", int(parts[3]), int(parts[4]), parts[5] == "1", self._pos)
                )
            elif tag == "I" and parts[2] == "U" and len(parts) == 5:
                self._add(Op(int(parts[1]), "U", int(parts[3]), int(parts[4]), False, self._pos))
            elif tag == "A" and len(parts) == 2:
                op = self._by_id[int(parts[1])]
                op.acked = self._pos
                op.durable = op.durable or op.fua
            elif tag == "F" and len(parts) == 2:
                self._flush_start[int(parts[1])] = self._pos
            elif tag == "D" and len(parts) == 2:
                start = self._flush_start[int(parts[1])]
                for op in self.ops:
                    if op.acked is not None and op.acked < start:
                        op.durable = True
        except (IndexError, KeyError, ValueError):
            pass  # a line cut short by SIGKILL

    def _add(self, op: Op) -> None:
        self.ops.append(op)
        self._by_id[op.op_id] = op

    @property
    def acknowledged(self) -> int:
        return sum(op.acked is not None for op in self.ops)

    @property
    def durable(self) -> int:
        return sum(op.durable for op in self.ops)

    def allowed(self) -> dict[int, set[int]]:
        """For each sector some op touched: the op ids its value may be (0 = zeros)."""
        touching: dict[int, list[Op]] = {}
        for op in self.ops:
            for s in range(op.sector, op.sector + op.count):
                touching.setdefault(s, []).append(op)
        out: dict[int, set[int]] = {}
        for s, ops in touching.items():
            last_durable = max((op.issued for op in ops if op.durable), default=-1)
            ids = {
                op.op_id if op.kind == "W" else 0
                for op in ops
                if op.acked is None or op.acked > last_durable
            }
            if last_durable < 0:  # nothing durable: the baseline value may survive
                ids.add(self.baseline.get(s, 0))
            out[s] = ids
        return out


async def check_recovery(read: ReadBack, history: History, chunk: int = 8192) -> list[str]:
    """Read the recovered disk and list every rule broken (empty: all good).

    On success the recovered state becomes the history's new baseline, so the next round
    (another child on the same disk) can be checked on top of it.
    """
    ss = history.sector_size
    allowed = history.allowed()
    problems: list[str] = []
    values: dict[int, int] = {}
    present: set[int] = set()
    for start in range(0, history.sector_count, chunk):
        count = min(chunk, history.sector_count - start)
        data, runs = await read(start, count)
        view = memoryview(data)
        held = {s for a, b in runs for s in range(a, b)}
        present |= held
        for i in range(count):
            s = start + i
            got = decode(view[i * ss : (i + 1) * ss], s, ss)
            if got is None:
                problems.append(f"sector {s}: holds bytes no write produced (garbage)")
                continue
            if got:
                values[s] = got
            if s in allowed:
                ids = allowed[s]
                if got not in ids:
                    problems.append(
                        f"sector {s}: holds {'zeros' if not got else f'write {got}'}, but only "
                        f"{sorted(ids)} may survive (a durable write was lost or reordered)"
                    )
                if s in held and got == 0 and not _may_be_present_zeros(history, s):
                    problems.append(
                        f"sector {s}: present as zeros, but nothing made it so (presence got "
                        "ahead of its data)"
                    )
            else:
                if got != history.baseline.get(s, 0):
                    problems.append(f"sector {s}: untouched, yet changed to {got}")
                if s in held and s not in history.baseline_present:
                    problems.append(f"sector {s}: untouched and never written, yet present")
        if len(problems) > 20:
            break
    if not problems:
        history.baseline = values
        history.baseline_present = present
        history.ops.clear()
        history._by_id.clear()
        history._flush_start.clear()
    return problems


def _may_be_present_zeros(history: History, sector: int) -> bool:
    """True when an unmap touched ``sector`` or it was present as zeros at the baseline."""
    if sector in history.baseline_present and not history.baseline.get(sector, 0):
        return True
    return any(op.kind == "U" and op.sector <= sector < op.sector + op.count for op in history.ops)


# -- the child ------------------------------------------------------------------------------


def _say(line: str) -> None:
    os.write(1, (line + "\n").encode())  # unbuffered: in the pipe before the op goes on


async def _child(args: argparse.Namespace) -> None:
    from tierdisk.service.layer import Layer
    from tierdisk.service.layers import sparse as sparse_module
    from tierdisk.service.layers.ram import RamLayer
    from tierdisk.service.layers.sparse import SparseLayer
    from tierdisk.service.layers.sqlite import SqliteLayer
    from tierdisk.service.volume import LayerEntry, Volume

    if args.compact_min is not None:
        sparse_module.COMPACT_MIN_BYTES = args.compact_min
    kinds: dict[str, type[SparseLayer] | type[SqliteLayer]] = {
        "sparse": SparseLayer,
        "sqlite": SqliteLayer,
    }
    layer: Layer = kinds[args.kind](args.path, size=args.size, sector_size=args.sector_size)
    entries = [LayerEntry(layer)]
    if args.over_ram:  # unmaps then keep sectors present as zeros
        entries.append(LayerEntry(RamLayer(size=args.size, sector_size=args.sector_size)))
    volume = await Volume.open("crash", entries)
    rng = random.Random(args.seed)
    ss = args.sector_size
    sectors = args.size // ss
    hot = min(sectors, 2048)
    next_id = args.first_id
    flushes = 0
    _say("READY")

    def pick() -> tuple[int, int]:
        count = rng.choice((1, 1, 2, 3, 8, 16, 33))
        region = hot if rng.random() < 0.9 else sectors
        start = rng.randrange(0, region - count + 1)
        return start, count

    async def one(op_id: int) -> None:
        start, count = pick()
        if rng.random() < 0.15:
            _say(f"I {op_id} U {start} {count}")
            await volume.unmap(start, count)
        else:
            fua = rng.random() < 0.15
            _say(f"I {op_id} W {start} {count} {int(fua)}")
            data = b"".join(sector_value(op_id, s, ss) for s in range(start, start + count))
            await volume.write(start, data, fua=fua)
        _say(f"A {op_id}")

    while True:
        roll = rng.random()
        if roll < 0.15:
            flushes += 1
            _say(f"F {flushes}")
            await volume.flush()
            _say(f"D {flushes}")
        elif roll < 0.35:
            batch = list(range(next_id, next_id + rng.randint(2, 4)))
            next_id += len(batch)
            await asyncio.gather(*(one(i) for i in batch))
        else:
            await one(next_id)
            next_id += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", required=True, choices=("sparse", "sqlite"))
    parser.add_argument("--path", required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--sector-size", type=int, default=512)
    parser.add_argument("--first-id", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--over-ram", action="store_true")
    parser.add_argument("--compact-min", type=int, default=None)
    asyncio.run(_child(parser.parse_args()))


if __name__ == "__main__":
    main()
