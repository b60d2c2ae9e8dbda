"""Per-layer counters (DESIGN.md §5) and the shape of the data path (§3, §6).

The counters behind ``tierdisk_layer_reads_total`` and friends: exact values after a known
sequence of reads through ``[ram read_cache, raw]``. And the data path works in runs: a
layer is called once per run of still-missing sectors, never once per sector.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from conftest import VolumeOpener
from stacks import entry, pattern

from tierdisk.service.layers.ram import RamLayer
from tierdisk.service.layers.raw import RawLayer
from tierdisk.service.runs import Run
from tierdisk.service.volume import Volume

SS = 512


class CountingRaw(RawLayer):
    """A raw layer that records every read and presence call."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.reads: list[Run] = []
        self.presences: list[Run] = []

    async def read(self, buf: memoryview, sector: int) -> list[Run]:
        self.reads.append((sector, sector + len(buf) // self.sector_size))
        return await super().read(buf, sector)

    async def presence(self, sector: int, count: int) -> list[Run]:
        self.presences.append((sector, sector + count))
        return await super().presence(sector, count)


class CountingRam(RamLayer):
    """A RAM layer that records every read and no-overwrite write."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.reads: list[Run] = []
        self.fills: list[Run] = []

    async def read(self, buf: memoryview, sector: int) -> list[Run]:
        self.reads.append((sector, sector + len(buf) // self.sector_size))
        return await super().read(buf, sector)

    async def write_no_overwrite(self, data: memoryview, sector: int) -> int:
        self.fills.append((sector, sector + len(data) // self.sector_size))
        return await super().write_no_overwrite(data, sector)


def counters(volume: Volume, index: int) -> tuple[int, ...]:
    """(reads, read_sectors, cache_hits, cache_misses, cache_fills, cache_fill_errors)."""
    s = volume.entries[index].stats
    return (
        s.reads, s.read_sectors, s.cache_hits, s.cache_misses, s.cache_fills, s.cache_fill_errors
    )  # fmt: skip


async def test_counters_through_a_read_cache(volumes: VolumeOpener, tmp_path: Path) -> None:
    image = tmp_path / "base.img"
    image.write_bytes(pattern(0xC, 0, 64, SS))
    raw = CountingRaw(str(image))
    vol = await volumes(entry(RamLayer(), rc=True), raw)
    await vol.read(0, 8)  # all miss: one run below
    assert counters(vol, 0) == (1, 0, 0, 8, 8, 0)
    assert counters(vol, 1) == (1, 8, 0, 0, 0, 0)
    await vol.read(4, 8)  # 4..8 hit, 8..12 miss
    assert counters(vol, 0) == (2, 4, 4, 12, 12, 0)
    assert counters(vol, 1) == (2, 12, 0, 0, 0, 0)
    await vol.write(20, pattern(1, 20, 2, SS))
    await vol.read(16, 10)  # 20, 21 hit; two missing runs below
    assert counters(vol, 0) == (3, 6, 6, 20, 20, 0)
    assert counters(vol, 1) == (4, 20, 0, 0, 0, 0)
    await vol.read(0, 26)  # only 12..16 missing
    assert counters(vol, 0) == (4, 28, 28, 24, 24, 0)
    assert counters(vol, 1) == (5, 24, 0, 0, 0, 0)
    await vol.read(0, 26)  # all cached: nothing below
    assert counters(vol, 0) == (5, 54, 54, 24, 24, 0)
    assert counters(vol, 1) == (5, 24, 0, 0, 0, 0)
    assert raw.reads == [(0, 8), (8, 12), (16, 20), (22, 26), (12, 16)]
    assert vol.inspect()["layers"][0]["counters"] == {
        "reads": 5,
        "read_sectors": 54,
        "cache_hits": 54,
        "cache_misses": 24,
        "cache_fills": 24,
        "cache_fill_errors": 0,
    }


async def test_concurrent_misses_count_each_filled_sector_once(volumes: VolumeOpener) -> None:
    """DESIGN.md §5: ``cache_fills`` counts sectors written into the cache by fills. Five
    reads of the same 64 sectors at once all miss and all fill; the first fill stores them,
    the other four find them present and store nothing (no-overwrite), so 64, not 320."""

    class Yielding(RamLayer):  # lets the reads interleave, as a disk or a remote does
        async def read(self, buf: memoryview, sector: int) -> list[Run]:
            await asyncio.sleep(0)
            return await super().read(buf, sector)

    lower = Yielding(64 * SS)
    vol = await volumes(entry(RamLayer(), rc=True), lower)
    await lower.write(memoryview(pattern(3, 0, 64, SS)), 0, False)
    reads = await asyncio.gather(*(vol.read(0, 64) for _ in range(5)))
    assert all(data == pattern(3, 0, 64, SS) for data, _ in reads)
    assert counters(vol, 0) == (5, 0, 0, 5 * 64, 64, 0)


async def test_fill_errors_are_counted_per_failed_call(volumes: VolumeOpener) -> None:
    class Failing(RamLayer):
        async def write_no_overwrite(self, data: memoryview, sector: int) -> int:
            raise OSError(5, "Input/output error")

    cache = Failing(64 * SS)
    vol = await volumes(entry(cache, rc=True), RamLayer(64 * SS))
    await vol.write(0, pattern(1, 0, 1, SS))  # lands in the cache (the top)
    await cache.write(memoryview(pattern(1, 5, 1, SS)), 5, False)
    data, _ = await vol.read(0, 10)
    assert bytes(data) == pattern(1, 0, 1, SS) + bytes(4 * SS) + pattern(1, 5, 1, SS) + bytes(
        4 * SS
    )
    assert counters(vol, 0) == (1, 2, 2, 8, 0, 2)


async def _fragmented(volumes: VolumeOpener, tmp_path: Path, held: int, gap: int) -> None:
    """A 1 MiB read through a top holding ``held`` sectors of every ``held + gap``."""
    n = (1 << 20) // SS
    base = tmp_path / "base.img"
    base.write_bytes(pattern(0xC, 0, n, SS))
    top, cache, bottom = CountingRam(), CountingRam(), CountingRaw(str(base))
    vol = await volumes(top, entry(cache, rc=True), bottom)
    step = held + gap
    for s in range(0, n, step):
        await top.write(memoryview(pattern(1, s, held, SS)), s, False)
    missing = [(s + held, s + step) for s in range(0, n, step)]
    data, present = await vol.read(0, n)
    expected = b"".join(pattern(1, s, held, SS) + pattern(0xC, s + held, gap, SS) for s in
                        range(0, n, step))  # fmt: skip
    assert bytes(data) == expected and present == [(0, n)]
    assert top.reads == [(0, n)], "the top is asked once for the whole request"
    assert cache.reads == missing and bottom.reads == missing, "one call per missing run"
    assert cache.fills == missing, "one fill call per missed run"
    assert vol.entries[2].stats.reads == len(missing)
    assert vol.entries[2].stats.read_sectors == n - n // step * held
    # the allocation map asks in runs too
    bottom.presences.clear()
    alloc = await vol.allocation(0, n)
    assert len(alloc) == 2 * len(missing) and bottom.presences == []  # the cache holds them


async def test_fragmented_read_goes_in_runs(volumes: VolumeOpener, tmp_path: Path) -> None:
    await _fragmented(volumes, tmp_path, held=8, gap=8)


async def test_every_other_sector_fragmented(volumes: VolumeOpener, tmp_path: Path) -> None:
    await _fragmented(volumes, tmp_path, held=1, gap=1)
