"""Concurrency (DESIGN.md §3): reads racing writes, unmaps and resizes.

A read racing a write may see old or new data per sector, never a torn sector, never an
older value once the write was acknowledged, and a read cache never keeps a stale sector.
:class:`SlowLayer` is a real layer that awaits between the steps of every call (one sector
per step), and can hold its reads at a gate, so the interleavings are forced, and the same
on every run (asyncio is deterministic; the random choices are seeded).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest
from conftest import VolumeOpener
from stacks import entry, sector_pattern

from tierdisk.service.layer import Layer, LayerMetadata
from tierdisk.service.layers.ram import RamLayer
from tierdisk.service.runs import Run
from tierdisk.service.sector_lock import SectorLock
from tierdisk.service.volume import Volume

SS = 512
T = TypeVar("T")
ZERO = bytes(SS)


def version(v: int, s: int) -> bytes:
    """Sector ``s`` as written by version ``v`` (0: the bottom layer's original data)."""
    return sector_pattern(v, s, SS)


class SlowLayer(Layer):
    """A full layer (every sector present) that yields to the loop between sectors.

    ``gate``: when set, a read waits for it before its first sector (``read_started`` is set
    when a read arrives), so a test can run other requests while the read is in flight.
    """

    kind = "slow"

    def __init__(self, sectors: int, step: float = 0.0) -> None:
        super().__init__()
        self._sectors = sectors
        self.step = step
        self.data = {s: version(0, s) for s in range(sectors)}
        self.gate: asyncio.Event | None = None
        self.read_started = asyncio.Event()

    async def attach(self, lower: LayerMetadata | None) -> None:
        self._set_geometry(SS, self._sectors)

    @property
    def can_resize(self) -> bool:
        return True

    async def read(self, buf: memoryview, sector: int) -> list[Run]:
        count = len(buf) // SS
        self._check_range(sector, count)
        self.read_started.set()
        if self.gate is not None:
            await self.gate.wait()
        for i in range(count):
            await asyncio.sleep(self.step)
            buf[i * SS : (i + 1) * SS] = self.data.get(sector + i, ZERO)
        return [(sector, sector + count)] if count else []

    async def write(self, data: memoryview, sector: int, fua: bool) -> None:
        count = len(data) // SS
        self._check_range(sector, count)
        for i in range(count):
            await asyncio.sleep(self.step)
            self.data[sector + i] = bytes(data[i * SS : (i + 1) * SS])

    async def unmap(
        self, sector: int, count: int, block_level_only: bool, next_is_zero: bool
    ) -> None:
        for i in range(count):
            await asyncio.sleep(self.step)
            self.data[sector + i] = ZERO

    async def flush(self) -> None:
        await asyncio.sleep(self.step)

    async def resize(self, sector_count: int) -> None:
        await asyncio.sleep(self.step)
        for s in range(sector_count, self._sector_count):
            self.data.pop(s, None)
        self._sector_count = sector_count
        self._notify_resized()


class SlowRam(RamLayer):
    """A RAM layer whose calls yield to the loop first (a cache on slower storage)."""

    async def read(self, buf: memoryview, sector: int) -> list[Run]:
        await asyncio.sleep(0)
        return await super().read(buf, sector)

    async def write(self, data: memoryview, sector: int, fua: bool) -> None:
        await asyncio.sleep(0)
        await super().write(data, sector, fua)

    async def write_no_overwrite(self, data: memoryview, sector: int) -> int:
        await asyncio.sleep(0)
        return await super().write_no_overwrite(data, sector)


async def sector_list(volume: Volume, sector: int, count: int) -> list[bytes]:
    data, _ = await volume.read(sector, count)
    return [bytes(data[i * SS : (i + 1) * SS]) for i in range(count)]


async def layer_sectors(layer: Layer, sector: int, count: int) -> dict[int, bytes]:
    """What ``layer`` itself holds in the range (sector -> data)."""
    buf = bytearray(count * SS)
    runs = await layer.read(memoryview(buf), sector)
    return {
        s: bytes(buf[(s - sector) * SS : (s - sector + 1) * SS])
        for a, b in runs
        for s in range(a, b)
    }


# -- forced interleavings ----------------------------------------------------------------------


@pytest.mark.parametrize("cache_at", ["top", "below-write-through-top", "write-through-cache"])
async def test_write_during_a_missed_read_is_not_undone_by_the_fill(
    volumes: VolumeOpener, cache_at: str
) -> None:
    """Scenario 28, race variant: the write lands in the cache while the read that missed
    it waits on the lower layer; the fill must not overwrite it."""
    slow = SlowLayer(8)
    cache = RamLayer(8 * SS)
    stack: list[Any]
    if cache_at == "top":
        stack = [entry(cache, rc=True), slow]
    elif cache_at == "write-through-cache":
        stack = [entry(cache, rc=True, wt=True), slow]
    else:
        stack = [entry(RamLayer(), wt=True), entry(cache, rc=True), slow]
    vol = await volumes(*stack)
    slow.gate = asyncio.Event()
    reader = asyncio.create_task(sector_list(vol, 0, 8))
    await slow.read_started.wait()
    slow.gate.set()  # the write below runs while the read copies sector by sector
    slow.gate = None
    await vol.write(3, version(1, 3))
    acknowledged = await sector_list(vol, 3, 1)
    assert acknowledged == [version(1, 3)]
    got = await reader
    assert got[3] in (version(0, 3), version(1, 3))
    assert [got[s] for s in (0, 1, 2, 4, 5, 6, 7)] == [version(0, s) for s in (0, 1, 2, 4, 5, 6, 7)]
    assert (await layer_sectors(cache, 3, 1))[3] == version(1, 3), "no stale sector in the cache"
    assert await sector_list(vol, 0, 8) == [version(1 if s == 3 else 0, s) for s in range(8)]


async def test_unmap_during_a_missed_read_is_not_undone_by_the_fill(
    volumes: VolumeOpener,
) -> None:
    slow = SlowLayer(8)
    cache = RamLayer(8 * SS)
    vol = await volumes(entry(cache, rc=True), slow)
    slow.gate = asyncio.Event()
    reader = asyncio.create_task(sector_list(vol, 0, 8))
    await slow.read_started.wait()
    await vol.unmap(2, 3)
    slow.gate.set()
    await reader
    assert await sector_list(vol, 0, 8) == [ZERO if 2 <= s < 5 else version(0, s) for s in range(8)]


@pytest.mark.parametrize("how", ["volume", "top-by-itself"])
async def test_shrink_and_grow_during_a_missed_read_leaves_no_stale_fill(
    volumes: VolumeOpener, how: str
) -> None:
    """A read waiting on the lower layer while the top (a read cache) shrinks and grows:
    the lower data it got must not be filled into the cache past the shrink, where the
    volume now reads zeros."""
    slow = SlowLayer(10)
    cache = RamLayer(10 * SS)
    vol = await volumes(entry(cache, rc=True), slow)
    slow.gate = asyncio.Event()
    reader = asyncio.create_task(sector_list(vol, 6, 2))
    await slow.read_started.wait()
    if how == "volume":
        await vol.resize(5)
        await vol.resize(10)
    else:
        await cache.resize(5)
        await cache.resize(10)
    slow.gate.set()
    await reader  # old or new data: it started before the resize
    assert await vol.allocation(5, 5) == [(5, 10, -1)]
    assert await sector_list(vol, 4, 4) == [version(0, 4), ZERO, ZERO, ZERO]


async def test_read_started_after_an_acknowledged_write_sees_it(volumes: VolumeOpener) -> None:
    """Write-through to a slow layer: the read that starts once the write is acknowledged
    sees the new data, though the read that started before may not."""
    slow = SlowLayer(8)
    vol = await volumes(entry(RamLayer(), wt=True), slow)
    slow.gate = asyncio.Event()
    early = asyncio.create_task(sector_list(vol, 0, 8))
    await slow.read_started.wait()
    await vol.write(0, b"".join(version(1, s) for s in range(8)))
    assert await sector_list(vol, 0, 8) == [version(1, s) for s in range(8)]
    slow.gate.set()
    got = await early
    assert all(got[s] in (version(0, s), version(1, s)) for s in range(8))


# -- randomised races ----------------------------------------------------------------------------


STACKS = {
    "rc-top": lambda slow, cache: [entry(cache, rc=True), slow],
    "rc-wt-top": lambda slow, cache: [entry(cache, rc=True, wt=True), slow],
    "rc-below-wt-top": lambda slow, cache: [
        entry(RamLayer(), wt=True),
        entry(cache, rc=True),
        slow,
    ],
    "rc-below-top": lambda slow, cache: [RamLayer(), entry(cache, rc=True), slow],
    "slow-top": lambda slow, cache: [slow],
}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("stack", list(STACKS))
async def test_random_races_never_tear_or_go_back(
    volumes: VolumeOpener, stack: str, seed: int
) -> None:
    """One writer writes ever newer versions over random ranges while readers read random
    ranges. Each sector a reader gets is whole, and no older than what was acknowledged
    when the read started; once quiet, volume and cache hold only the newest data."""
    rng = random.Random(seed)
    n = 24
    slow = SlowLayer(n)
    cache = SlowRam(n * SS)
    vol = await volumes(*STACKS[stack](slow, cache))
    acked = [0] * n  # newest acknowledged version per sector
    issued = [0] * n  # newest version sent per sector (maybe not acknowledged yet)
    errors: list[str] = []

    async def writer() -> None:
        for v in range(1, 40):
            s = rng.randrange(n)
            count = rng.randint(1, min(6, n - s))
            for x in range(s, s + count):
                issued[x] = v
            await vol.write(s, b"".join(version(v, x) for x in range(s, s + count)))
            for x in range(s, s + count):
                acked[x] = v
            await asyncio.sleep(0)

    async def reader(r: int) -> None:
        for _ in range(30):
            s = rng.randrange(n)
            count = rng.randint(1, n - s)
            floor = acked[s : s + count]
            got = await sector_list(vol, s, count)
            ceiling = issued[s : s + count]
            for i, data in enumerate(got):
                v, x = int.from_bytes(data[:8], "little") & ~(1 << 63), s + i
                if data != version(v, x):
                    errors.append(f"reader {r}: sector {x} torn or misplaced")
                elif not floor[i] <= v <= ceiling[i]:
                    errors.append(f"reader {r}: sector {x} has v{v}, acked v{floor[i]}")

    await asyncio.gather(writer(), *(reader(r) for r in range(3)))
    assert errors == []
    newest = [version(acked[x], x) for x in range(n)]
    assert await sector_list(vol, 0, n) == newest
    if stack != "slow-top":
        # A cache on the write path must hold the newest data; one below it, the data of
        # the layer it caches (which the writes never reach).
        behind = stack == "rc-below-top"
        held = await layer_sectors(cache, 0, n)
        stale = [x for x, data in held.items() if data != (slow.data[x] if behind else newest[x])]
        assert stale == [], "stale sectors left in the read cache"


# -- read-modify-write (Volume.write_at) against other writers ---------------------------------


def patched(base: bytes, at: int, data: bytes) -> bytes:
    """``base`` (one sector) with ``data`` put at byte ``at``."""
    return base[:at] + data + base[at + len(data) :]


PATCH = b"N" * 10  # written at byte 100 of a sector: a misaligned write, read-modify-write


async def test_sector_lock_costs_a_counter_while_no_read_modify_write_runs() -> None:
    lock = SectorLock()
    assert lock.try_shared(0, 8) == 0 and lock.try_shared(4, 12) == 0  # counted, not registered
    assert lock.held == 2
    exclusive = asyncio.create_task(lock.acquire_exclusive(2, 6))
    await asyncio.sleep(0)
    assert not exclusive.done()  # it waits for the counted holds, which began before it
    assert lock.try_shared(5, 9) is None  # overlaps the waiting exclusive hold: must wait
    elsewhere = lock.try_shared(6, 9)  # does not overlap it: registered, no wait
    assert elsewhere is not None and elsewhere > 0
    lock.release(0)
    await asyncio.sleep(0)
    assert not exclusive.done()
    lock.release(0)
    token = await asyncio.wait_for(exclusive, 5)
    assert lock.try_shared(0, 3) is None and lock.try_shared(6, 7) is not None
    lock.release(token)
    lock.release(elsewhere)
    assert lock.held == 1  # the (6, 7) hold
    waiter = asyncio.create_task(lock.acquire_exclusive(0, 100))
    await asyncio.sleep(0)
    waiter.cancel()  # a cancelled exclusive wait leaves nothing behind
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert lock.try_shared(0, 100) == 0


async def test_read_modify_write_waits_for_a_write_in_flight(volumes: VolumeOpener) -> None:
    """A write that began first lands wholly before the read-modify-write reads: the
    result keeps the write's bytes around the patch (the write is never undone)."""
    slow = SlowLayer(8)
    vol = await volumes(slow)
    new = [version(1, s) for s in range(8)]
    write = asyncio.create_task(vol.write(0, b"".join(new)))
    await asyncio.sleep(0)  # the write is under way: sector 0 done at most
    assert not write.done()
    await vol.write_at(100, PATCH)
    assert write.done()  # the read-modify-write waited for it
    assert await sector_list(vol, 0, 8) == [patched(new[0], 100, PATCH), *new[1:]]


@pytest.mark.parametrize("op", ["write", "unmap"])
async def test_writes_wait_for_a_read_modify_write_of_their_sectors(
    volumes: VolumeOpener, op: str
) -> None:
    """While a read-modify-write of sector 2 reads, a write or unmap of sectors 0-3 waits
    (and then lands after it: no lost update), one of sector 6 does not."""
    slow = SlowLayer(8)
    vol = await volumes(slow)
    slow.gate = asyncio.Event()
    rmw = asyncio.create_task(vol.write_at(2 * SS + 100, PATCH))
    await asyncio.wait_for(slow.read_started.wait(), 5)
    if op == "write":
        overlapping = asyncio.create_task(vol.write(0, b"".join(version(1, s) for s in range(4))))
    else:
        overlapping = asyncio.create_task(vol.unmap(0, 4))
    await asyncio.wait_for(vol.write(6, version(1, 6)), 5)  # not blocked by the hold
    for _ in range(5):
        await asyncio.sleep(0)
    assert not overlapping.done() and not rmw.done()
    slow.gate.set()
    slow.gate = None
    await asyncio.wait_for(asyncio.gather(rmw, overlapping), 5)
    after = [version(1, s) for s in range(4)] if op == "write" else [ZERO] * 4
    assert await sector_list(vol, 0, 8) == [
        *after,
        version(0, 4),
        version(0, 5),
        version(1, 6),
        version(0, 7),
    ]


@pytest.mark.parametrize("seed", range(3))
async def test_random_read_modify_writes_and_writes_never_lose_an_update(
    volumes: VolumeOpener, seed: int
) -> None:
    """Whole-sector writes (version v) and misaligned patches (byte ``v`` at a random
    offset) race over 8 sectors. The top applies a write in one step after a yield, and a
    patch's read may wait on the slow layer below, so the interleavings are many. A patch
    and any write of its sectors are serialised by the lock, so the volume must equal the
    operations replayed on a model in the order they were acknowledged (an update lost to
    a stale read-modify-write shows as a difference)."""
    rng = random.Random(seed)
    n = 8
    slow = SlowLayer(n)
    vol = await volumes(SlowRam(n * SS), slow)
    model = bytearray(b"".join(version(0, s) for s in range(n)))
    done: list[tuple[int, bytes]] = []  # (byte offset, data) in the order acknowledged

    async def op(v: int) -> None:
        await asyncio.sleep(rng.random() * 0.002)
        if rng.random() < 0.5:
            s = rng.randrange(n)
            count = rng.randint(1, n - s)
            data = b"".join(version(v, x) for x in range(s, s + count))
            await vol.write(s, data)
            done.append((s * SS, data))
        else:
            offset = rng.randrange(n * SS - 600)
            data = bytes([v]) * rng.randint(1, 600)
            await vol.write_at(offset, data)
            done.append((offset, data))

    await asyncio.wait_for(asyncio.gather(*(op(v) for v in range(1, 60))), 30)
    for offset, data in done:
        model[offset : offset + len(data)] = data
    got, _ = await vol.read(0, n)
    assert got == model


async def _counting_other_work(call: Awaitable[T]) -> tuple[T, int]:
    """``call``'s result, and how many times other work on the loop (a task that only
    yields) ran while it did: 0 or 1 when it held the loop throughout."""
    ticks = 0
    done = False

    async def tick() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)
    try:
        return await call, ticks
    finally:
        done = True
        await ticker


class _CountingRam(RamLayer):
    """A RAM layer whose reads wait once, as a remote or a disk does, counting how many
    are in flight at most."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.in_flight = self.most_in_flight = self.calls = 0

    async def read(self, buf: memoryview, sector: int) -> list[Run]:
        self.calls += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0)
            return await super().read(buf, sector)
        finally:
            self.in_flight -= 1


async def test_a_read_over_thousands_of_holes_asks_the_layer_below_a_batch_at_a_time(
    volumes: VolumeOpener,
) -> None:
    """A read of a range the top layer holds every other sector of asks the layer below
    once per hole; thousands of holes are asked a batch at a time (for a remote layer:
    a bounded number of calls in flight, not thousands at once), and the event loop runs
    other work between batches instead of being held for the whole read."""
    holes = 4096
    below = _CountingRam(size=2 * holes * SS, sector_size=SS)
    top = RamLayer(size=2 * holes * SS, sector_size=SS)
    vol = await volumes(top, below)
    await below.write(memoryview(b"\x02" * 2 * holes * SS), 0, False)
    for sector in range(0, 2 * holes, 2):
        await top.write(memoryview(b"\x01" * SS), sector, False)
    (data, _), ticks = await _counting_other_work(vol.read(0, 2 * holes))
    assert data == (b"\x01" * SS + b"\x02" * SS) * holes
    assert below.calls == holes
    assert below.most_in_flight <= 128, below.most_in_flight
    assert ticks >= holes // 128, ticks  # other work ran between the batches


async def test_an_allocation_walk_over_thousands_of_holes_lets_other_work_run(
    volumes: VolumeOpener,
) -> None:
    """``allocation`` asks the layer below once per hole of the top; a local layer's answer
    never waits, so without yields a walk over a layer of a million runs held the event loop
    (every other client) for seconds. It yields every few thousand runs, same answer."""
    holes = 3 * 4096
    below = RamLayer(size=2 * holes * SS, sector_size=SS)
    top = RamLayer(size=2 * holes * SS, sector_size=SS)
    vol = await volumes(top, below)
    for sector in range(0, 2 * holes, 2):
        await top.write(memoryview(b"\x01" * SS), sector, False)
    await below.write(memoryview(b"\x02" * SS), 1, False)
    runs, ticks = await _counting_other_work(vol.allocation(0, 2 * holes))
    # the top's sectors at depth 0, the one the layer below holds at 1, holes at -1
    expected = [(0, 1, 0), (1, 2, 1)]
    expected += [(s, s + 1, -1 if s % 2 else 0) for s in range(2, 2 * holes)]
    assert runs == expected
    assert ticks >= 3, ticks
