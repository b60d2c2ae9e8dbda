"""The ram layer (service/layers/ram.py) on its own."""

from __future__ import annotations

import asyncio

import pytest
from stacks import pattern

from tierdisk.service.errors import ConfigError, InvalidArgument, OutOfRange, Unavailable
from tierdisk.service.layer import LayerMetadata, UnmapBehavior
from tierdisk.service.layers.ram import RamLayer
from tierdisk.service.runs import Run

SS = 512


def meta(sector_count: int, sector_size: int = SS) -> LayerMetadata:
    return LayerMetadata(
        sector_size=sector_size,
        sector_count=sector_count,
        physical_sector_size=sector_size,
        disk_id=None,
        unmap_behavior=UnmapBehavior.ZEROES,
        optimal_unmap_sectors=1,
        read_only=False,
        can_read_cache=False,
        fua_respected=True,
    )


async def ram(sectors: int, sector_size: int = SS) -> RamLayer:
    layer = RamLayer(sectors * sector_size, sector_size=sector_size)
    await layer.attach(None)
    return layer


async def read(
    layer: RamLayer, sector: int, count: int, fill: int = 0xEE
) -> tuple[bytes, list[Run]]:
    buf = bytearray([fill]) * (count * layer.sector_size)
    runs = await layer.read(memoryview(buf), sector)
    return bytes(buf), runs


async def test_geometry_and_capabilities() -> None:
    layer = await ram(16)
    assert (layer.sector_size, layer.sector_count, layer.physical_sector_size) == (SS, 16, SS)
    assert layer.can_read_cache and layer.can_resize and layer.fua_respected
    assert not layer.read_only and layer.disk_id is None
    assert layer.unmap_behavior == UnmapBehavior.ZEROES
    assert layer.present_sectors == 0
    await layer.close()
    await layer.close()


async def test_inherits_size_and_sector_size() -> None:
    layer = RamLayer()
    await layer.attach(meta(300, 4096))
    assert (layer.sector_size, layer.sector_count) == (4096, 300)
    layer = RamLayer(size=1 << 20)
    await layer.attach(meta(300, 4096))
    assert (layer.sector_size, layer.sector_count) == (4096, 256)


@pytest.mark.parametrize(
    ("size", "sector_size", "error"),
    [(None, None, "no size"), (0, 512, "positive"), (5000, 4096, "multiple"),
     (4096, 1000, "1000 is not a power of two"), (4096, 256, "256 is not a power of two")],
)  # fmt: skip
async def test_bad_geometry(size: int | None, sector_size: int | None, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        await RamLayer(size, sector_size=sector_size).attach(None)


async def test_write_read_and_presence() -> None:
    layer = await ram(16)
    await layer.write(memoryview(pattern(1, 2, 3, SS)), 2, False)
    await layer.write(memoryview(pattern(2, 9, 1, SS)), 9, True)
    data, runs = await read(layer, 0, 12)
    assert runs == [(2, 5), (9, 10)]
    assert data[2 * SS : 5 * SS] == pattern(1, 2, 3, SS)
    assert data[9 * SS : 10 * SS] == pattern(2, 9, 1, SS)
    assert data[: 2 * SS] == b"\xee" * 2 * SS, "sectors it does not hold are left untouched"
    assert await layer.presence(0, 16) == [(2, 5), (9, 10)]
    assert layer.present_sectors == 4
    assert layer.inspect()["present_bytes"] == 4 * SS


async def test_out_of_range_calls_are_refused() -> None:
    layer = await ram(8)
    with pytest.raises(OutOfRange):
        await read(layer, 7, 2)
    with pytest.raises(OutOfRange):
        await layer.write(memoryview(bytes(2 * SS)), 7, False)
    with pytest.raises(OutOfRange):
        await layer.write_no_overwrite(memoryview(bytes(2 * SS)), 7)
    with pytest.raises(OutOfRange):
        await layer.unmap(7, 2, False, True)
    assert layer.present_sectors == 0


async def test_write_no_overwrite_fills_holes_only() -> None:
    layer = await ram(8)
    await layer.write(memoryview(pattern(1, 2, 1, SS)), 2, False)
    await layer.write(memoryview(pattern(1, 5, 2, SS)), 5, False)
    await layer.write_no_overwrite(memoryview(pattern(2, 0, 8, SS)), 0)
    data, runs = await read(layer, 0, 8)
    assert runs == [(0, 8)]
    expected = (
        pattern(2, 0, 2, SS) + pattern(1, 2, 1, SS) + pattern(2, 3, 2, SS)
        + pattern(1, 5, 2, SS) + pattern(2, 7, 1, SS)
    )  # fmt: skip
    assert data == expected


async def test_unmap_drops_or_keeps_zeros() -> None:
    layer = await ram(4096)
    await layer.write(memoryview(pattern(1, 0, 4096, SS)), 0, False)
    await layer.unmap(10, 2000, False, True)  # nothing below: dropped
    await layer.unmap(3000, 7, False, False)  # lower data may show: present zeros
    assert await layer.presence(0, 4096) == [(0, 10), (2010, 4096)]
    data, _ = await read(layer, 3000, 7)
    assert data == bytes(7 * SS)
    # a dropped range reads back as zeros once written again in part
    await layer.write(memoryview(pattern(2, 500, 1, SS)), 500, False)
    data, runs = await read(layer, 499, 3, fill=0)
    assert runs == [(500, 501)] and data == bytes(SS) + pattern(2, 500, 1, SS) + bytes(SS)


async def test_resize() -> None:
    layer = await ram(16)
    await layer.write(memoryview(pattern(1, 0, 16, SS)), 0, False)
    waiter = asyncio.create_task(layer.wait_resize(16))
    seen: list[int] = []
    layer.add_resize_listener(seen.append)
    await layer.resize(8)
    assert await asyncio.wait_for(waiter, 5) == 8
    assert layer.sector_count == 8 and layer.present_sectors == 8
    await layer.resize(16)  # grow within the mapping: zeros, not the old tail
    data, runs = await read(layer, 6, 10, fill=0)
    assert runs == [(6, 8)] and data == pattern(1, 6, 2, SS) + bytes(8 * SS)
    await layer.resize(50_000)  # grow past the mapping: data kept (U-RAM)
    await layer.write(memoryview(pattern(2, 49_999, 1, SS)), 49_999, False)
    data, runs = await read(layer, 0, 8)
    assert runs == [(0, 8)] and data == pattern(1, 0, 8, SS)
    data, runs = await read(layer, 49_999, 1)
    assert runs == [(49_999, 50_000)] and data == pattern(2, 49_999, 1, SS)
    assert seen == [8, 16, 50_000]
    layer.remove_resize_listener(seen.append)
    with pytest.raises(InvalidArgument):
        await layer.resize(0)
    assert layer.sector_count == 50_000
    assert await layer.wait_resize(1) == 50_000, "returns at once when the size differs"


async def test_a_grow_moves_the_data_with_the_loop_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A grow past the mapping copies what the layer holds into a new one a chunk at a
    time, letting other work run between (a GiB held held the loop, every client, for
    seconds); reads meanwhile see the data, a write issued meanwhile waits for the move
    and is kept, and the data is all there after."""
    monkeypatch.setattr("tierdisk.service.layers.ram._MOVE_CHUNK", 64 * SS)
    sectors = 1024
    layer = await ram(sectors)
    await layer.write(memoryview(pattern(1, 0, sectors, SS)), 0, False)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while not grow.done():
            ticks += 1
            await asyncio.sleep(0)

    grow = asyncio.create_task(layer.resize(4 * sectors))
    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)
    assert not grow.done()
    assert (await read(layer, 100, 2))[0] == pattern(1, 100, 2, SS)
    await layer.write(memoryview(pattern(2, 5, 1, SS)), 5, False)  # (waits for the move)
    await grow
    await ticker
    assert ticks >= sectors // 64 - 1, ticks
    data, runs = await read(layer, 0, sectors)
    assert runs == [(0, sectors)]
    assert data == pattern(1, 0, 5, SS) + pattern(2, 5, 1, SS) + pattern(1, 6, sectors - 6, SS)
    await layer.close()


@pytest.mark.parametrize("sectors", [0, -1])
async def test_resize_to_no_sectors_is_invalid_argument(sectors: int) -> None:
    """A domain error (INVALID_ARGUMENT over gRPC), not ValueError (UNKNOWN); the layer
    keeps its size and data and tells no listener."""
    layer = await ram(8)
    await layer.write(memoryview(pattern(1, 0, 8, SS)), 0, False)
    seen: list[int] = []
    layer.add_resize_listener(seen.append)
    with pytest.raises(InvalidArgument, match="at least one sector"):
        await layer.resize(sectors)
    assert layer.sector_count == 8 and seen == []
    data, runs = await read(layer, 0, 8)
    assert runs == [(0, 8)] and data == pattern(1, 0, 8, SS)


async def test_4k_sectors() -> None:
    layer = await ram(8, 4096)
    await layer.write(memoryview(pattern(1, 7, 1, 4096)), 7, False)
    data, runs = await read(layer, 7, 1)
    assert runs == [(7, 8)] and data == pattern(1, 7, 1, 4096)


async def test_io_after_close_is_unavailable() -> None:
    """A call a stop's grace cut short may reach the layer after it closed: UNAVAILABLE
    (retry after the restart), not an internal error."""
    layer = RamLayer(size=1 << 20)
    await layer.attach(None)
    await layer.close()
    with pytest.raises(Unavailable, match="closed"):
        await layer.read(memoryview(bytearray(512)), 0)
    with pytest.raises(Unavailable, match="closed"):
        await layer.write(memoryview(bytes(512)), 0, False)


async def test_a_close_during_a_grow_leaves_the_layer_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stop closing the layer while a grow moves its data: the grow fails as closed, and
    the layer stays closed (not opened again by the grow's new mapping)."""
    monkeypatch.setattr("tierdisk.service.layers.ram._MOVE_CHUNK", 64 * SS)
    layer = await ram(256)
    await layer.write(memoryview(pattern(1, 0, 256, SS)), 0, False)
    for yields in range(1, 5):  # closed after each of the move's 4 yields in turn
        grow = asyncio.create_task(layer.resize(1024))
        for _ in range(yields):
            await asyncio.sleep(0)
        await layer.close()
        with pytest.raises(Unavailable):
            await grow
        with pytest.raises(Unavailable):
            await read(layer, 0, 1)
        layer = await ram(256)
        await layer.write(memoryview(pattern(1, 0, 256, SS)), 0, False)
    await layer.close()
