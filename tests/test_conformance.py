"""Block-device conformance, run against every stack of :data:`stacks.STACKS`.

In the spirit of SPDK's bdevio: whatever the stack, a volume behaves like one plain disk.
Each test gets a fresh, writable, all-zero volume of :data:`stacks.VOLUME_BYTES` (the
``volume`` fixture), at 512-byte and 4 KiB sectors. Add a stack to the registry in
tests/stacks.py and every test here runs against it.
"""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest
from stacks import VOLUME_BYTES, pattern, sector_pattern

from tierdisk.service.errors import InvalidArgument, OutOfRange
from tierdisk.service.layer import UnmapBehavior
from tierdisk.service.volume import Volume


async def read(volume: Volume, sector: int, count: int) -> bytes:
    data, _ = await volume.read(sector, count)
    assert len(data) == count * volume.sector_size
    return bytes(data)


def zeros(volume: Volume, count: int) -> bytes:
    return bytes(count * volume.sector_size)


async def test_geometry(volume: Volume) -> None:
    ss = volume.sector_size
    assert ss in (512, 4096)
    assert volume.sector_count == VOLUME_BYTES // ss
    assert volume.physical_sector_size % ss == 0
    assert not volume.read_only
    tree = volume.inspect()
    assert tree["sector_count"] == volume.sector_count and tree["sector_size"] == ss
    assert [layer["index"] for layer in tree["layers"]] == list(range(len(tree["layers"])))


async def test_fresh_volume_reads_zeros(volume: Volume) -> None:
    n = volume.sector_count
    for sector, count in [(0, 1), (0, 64), (n // 2 - 3, 7), (n - 1, 1), (n - 64, 64)]:
        assert await read(volume, sector, count) == zeros(volume, count)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
async def test_write_then_read(volume: Volume, where: str) -> None:
    ss, n = volume.sector_size, volume.sector_count
    sector = {"first": 0, "middle": n // 2 - 1, "last": n - 3}[where]
    data = pattern(1, sector, 3, ss)
    await volume.write(sector, data)
    assert await read(volume, sector, 3) == data
    # the neighbours are untouched
    if sector:
        assert await read(volume, sector - 1, 1) == zeros(volume, 1)
    if sector + 3 < n:
        assert await read(volume, sector + 3, 1) == zeros(volume, 1)


async def test_last_sector(volume: Volume) -> None:
    ss, last = volume.sector_size, volume.sector_count - 1
    await volume.write(last, sector_pattern(7, last, ss))
    assert await read(volume, last, 1) == sector_pattern(7, last, ss)
    assert await volume.allocation(last, 1) == [(last, last + 1, 0)]


async def test_one_past_the_end_is_out_of_range_and_changes_nothing(volume: Volume) -> None:
    ss, n = volume.sector_size, volume.sector_count
    before = pattern(2, n - 2, 2, ss)
    await volume.write(n - 2, before)
    for sector, count in [(n, 1), (n - 1, 2), (n + 1000, 1), (n - 2, 3)]:
        with pytest.raises(OutOfRange):
            await volume.read(sector, count)
        with pytest.raises(OutOfRange):
            await volume.write(sector, pattern(3, sector, count, ss))
        with pytest.raises(OutOfRange):
            await volume.write(sector, pattern(3, sector, count, ss), no_overwrite=True)
        with pytest.raises(OutOfRange):
            await volume.unmap(sector, count)
        with pytest.raises(OutOfRange):
            await volume.allocation(sector, count)
    for offset, size in [(n * ss, 1), (n * ss - 1, 2), (n * ss + 1, 0), (n * ss + ss, 0)]:
        with pytest.raises(OutOfRange):  # bytes: also no bytes past the end
            await volume.write_at(offset, bytes(size))
    await volume.write_at(n * ss, b"")  # (at the end: nothing to write, in range)
    assert await read(volume, n - 2, 2) == before
    assert volume.sector_count == n


async def test_zero_length(volume: Volume) -> None:
    ss, n = volume.sector_size, volume.sector_count
    await volume.write(0, pattern(1, 0, 1, ss))
    for sector in (0, 1, n):
        assert await volume.read(sector, 0) == (bytearray(), [])
        await volume.write(sector, b"")
        await volume.write(sector, b"", no_overwrite=True)
        await volume.unmap(sector, 0)
        assert await volume.allocation(sector, 0) == []
    assert await read(volume, 0, 2) == pattern(1, 0, 1, ss) + zeros(volume, 1)


async def test_partial_sectors_are_invalid(volume: Volume) -> None:
    ss = volume.sector_size
    with pytest.raises(InvalidArgument):
        await volume.write(0, bytes(ss - 1))
    with pytest.raises(InvalidArgument):
        await volume.write(0, bytes(ss + 512 // 2))
    with pytest.raises(InvalidArgument):
        await volume.read_into(memoryview(bytearray(ss + 1)), 0)
    assert await read(volume, 0, 2) == zeros(volume, 2)


async def test_large_io(volume: Volume) -> None:
    ss = volume.sector_size
    count = (16 << 20) // ss  # one 16 MiB request (the default server.max_io)
    start = 3
    data = pattern(4, start, count, ss)
    await volume.write(start, data)
    assert await read(volume, start, count) == data
    # an unaligned window over the edges
    window = await read(volume, 1, count)
    assert window == zeros(volume, 2) + data[: (count - 2) * ss]


async def test_overlapping_writes(volume: Volume) -> None:
    ss = volume.sector_size
    await volume.write(0, pattern(1, 0, 8, ss))
    await volume.write(4, pattern(2, 4, 8, ss))
    await volume.write(2, pattern(3, 2, 1, ss))
    expected = (
        pattern(1, 0, 2, ss) + pattern(3, 2, 1, ss) + pattern(1, 3, 1, ss) + pattern(2, 4, 8, ss)
    )
    assert await read(volume, 0, 12) == expected
    _, present = await volume.read(0, 16)
    assert present == [(0, 12)] or present == [(0, 16)]  # a full layer holds everything


async def test_read_into_a_dirty_buffer(volume: Volume) -> None:
    ss = volume.sector_size
    await volume.write(2, pattern(1, 2, 2, ss))
    buf = bytearray(b"\xee" * 6 * ss)
    await volume.read_into(memoryview(buf), 0)
    assert bytes(buf) == zeros(volume, 2) + pattern(1, 2, 2, ss) + zeros(volume, 2)


async def test_unmap_then_read(volume: Volume) -> None:
    ss = volume.sector_size
    await volume.write(0, pattern(1, 0, 16, ss))
    await volume.unmap(4, 8)
    got = await read(volume, 0, 16)
    assert got[: 4 * ss] == pattern(1, 0, 4, ss) and got[12 * ss :] == pattern(1, 12, 4, ss)
    middle = got[4 * ss : 12 * ss]
    if volume.unmap_behavior == UnmapBehavior.ZEROES:
        assert middle == zeros(volume, 8)
    elif volume.unmap_behavior == UnmapBehavior.IGNORED:
        assert middle == pattern(1, 4, 8, ss)
    assert await read(volume, 4, 8) == middle, "unmapped sectors read back stable"
    # writing over unmapped sectors works as on any sector
    await volume.write(6, pattern(2, 6, 2, ss))
    assert await read(volume, 6, 2) == pattern(2, 6, 2, ss)


async def test_unmap_the_whole_volume(volume: Volume) -> None:
    ss, n = volume.sector_size, volume.sector_count
    await volume.write(n - 4, pattern(1, n - 4, 4, ss))
    await volume.unmap(0, n)
    if volume.unmap_behavior == UnmapBehavior.ZEROES:
        assert await read(volume, n - 4, 4) == zeros(volume, 4)


async def test_flush_and_fua(volume: Volume) -> None:
    ss = volume.sector_size
    await volume.write(0, pattern(1, 0, 4, ss), fua=True)
    await volume.write(8, pattern(2, 8, 4, ss))
    await volume.flush()
    await volume.write(12, pattern(3, 12, 1, ss), fua=True)
    await volume.flush()
    assert await read(volume, 0, 4) == pattern(1, 0, 4, ss)
    assert await read(volume, 8, 5) == pattern(2, 8, 4, ss) + pattern(3, 12, 1, ss)
    assert isinstance(volume.fua_respected, bool)


async def test_no_overwrite_write(volume: Volume) -> None:
    ss = volume.sector_size
    await volume.write(2, pattern(1, 2, 2, ss))
    await volume.write(0, pattern(2, 0, 6, ss), no_overwrite=True)
    got = await read(volume, 0, 6)
    holes_written = got[: 2 * ss] == pattern(2, 0, 2, ss)
    assert got[2 * ss : 4 * ss] == pattern(1, 2, 2, ss), "held sectors are never overwritten"
    # a stack whose top holds every sector has no holes: nothing else changes
    assert got[: 2 * ss] in (pattern(2, 0, 2, ss), zeros(volume, 2))
    assert got[4 * ss :] == (pattern(2, 4, 2, ss) if holes_written else zeros(volume, 2))


async def test_allocation_covers_the_range(volume: Volume) -> None:
    ss, n = volume.sector_size, volume.sector_count
    await volume.write(10, pattern(1, 10, 5, ss))
    alloc = await volume.allocation(0, n)
    assert alloc[0][0] == 0 and alloc[-1][1] == n
    assert all(a < b for a, b, _ in alloc)
    assert all(x[1] == y[0] for x, y in itertools.pairwise(alloc))
    assert all(-1 <= d < len(volume.entries) for _, _, d in alloc)
    held = [(a, b) for a, b, d in alloc if d >= 0 and a < 20]
    assert any(a <= 10 and b >= 15 for a, b in held), "written sectors are held"


async def test_concurrent_writes_to_distinct_ranges(volume: Volume) -> None:
    ss = volume.sector_size
    await asyncio.gather(*(volume.write(i * 10, pattern(i, i * 10, 10, ss)) for i in range(16)))
    got = await read(volume, 0, 160)
    assert got == b"".join(pattern(i, i * 10, 10, ss) for i in range(16))


async def test_random_io_matches_a_flat_disk(volume: Volume) -> None:
    ss = volume.sector_size
    n = 256  # stay in the first sectors: a flat bytearray is the model
    model = bytearray(n * ss)
    rng = random.Random(ss)
    for tag in range(1, 120):
        sector = rng.randrange(n)
        count = rng.randint(1, min(32, n - sector))
        op = rng.random()
        if op < 0.45:
            data = pattern(tag, sector, count, ss)
            await volume.write(sector, data, fua=rng.random() < 0.1)
            model[sector * ss : (sector + count) * ss] = data
        elif op < 0.55 and volume.unmap_behavior == UnmapBehavior.ZEROES:
            await volume.unmap(sector, count)
            model[sector * ss : (sector + count) * ss] = bytes(count * ss)
        elif op < 0.6:
            await volume.flush()
        else:
            assert await read(volume, sector, count) == model[sector * ss : (sector + count) * ss]
    assert await read(volume, 0, n) == model


async def test_resize_grow_and_shrink(volume: Volume) -> None:
    ss, n = volume.sector_size, volume.sector_count
    top = volume.entries[0].layer
    if not top.can_resize:
        pytest.skip(f"the top {top.kind} layer cannot be resized")
    await volume.write(n - 8, pattern(1, n - 8, 8, ss))
    gen = volume.generation
    assert await volume.resize(n + 100) == n + 100
    assert volume.sector_count == n + 100 and volume.generation > gen
    assert (await volume.resize_events(gen))[-1] == (volume.generation, n + 100)
    assert await read(volume, n - 8, 108) == pattern(1, n - 8, 8, ss) + zeros(volume, 100)
    await volume.write(n + 99, sector_pattern(2, n + 99, ss))
    assert await read(volume, n + 99, 1) == sector_pattern(2, n + 99, ss)
    # shrink below the data, then grow back: the cut sectors read as zeros
    await volume.resize(n - 4)
    assert volume.sector_count == n - 4
    with pytest.raises(OutOfRange):
        await volume.read(n - 4, 1)
    with pytest.raises(OutOfRange):
        await volume.write(n - 4, sector_pattern(3, n - 4, ss))
    await volume.resize(n)
    assert await read(volume, n - 8, 8) == pattern(1, n - 8, 4, ss) + zeros(volume, 4)
    with pytest.raises(InvalidArgument):
        await volume.resize(0)
    assert volume.sector_count == n
    # a shrink by one sector, then a grow: the sector cut reads as zeros
    await volume.write(n - 1, sector_pattern(4, n - 1, ss))
    await volume.resize(n - 1)
    await volume.resize(n)
    assert await read(volume, n - 1, 1) == zeros(volume, 1)
