"""Scenario tests of DESIGN.md §3, numbered after the reference's scenarios.

``sNN`` in a test name is scenario NN of shared/reference/openvmm-layered-disk.md §5. Where
the reference marks upstream behaviour as a defect (U1, U2, U3, U-RAM, 31, …) these tests
assert the behaviour DESIGN.md asks for instead. Notation as in the reference: ``full(c)``
is a layer holding every sector (sector s = c(s)); ``{s: x}`` a layer holding sector s.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from conftest import VolumeOpener
from stacks import MapLayer, entry, pattern, sector_pattern

from tierdisk.service import volume as volume_module
from tierdisk.service.errors import (
    ConfigError,
    InvalidArgument,
    NoSpace,
    NotSupported,
    OutOfRange,
    ReadOnlyError,
    StorageError,
    Unavailable,
)
from tierdisk.service.layer import Layer, UnmapBehavior
from tierdisk.service.layers.ram import RamLayer
from tierdisk.service.layers.raw import RawLayer
from tierdisk.service.layers.sparse import SparseLayer
from tierdisk.service.layers.sqlite import SqliteLayer
from tierdisk.service.runs import Run
from tierdisk.service.unstoppable import LEFT_RUNNING_MIN_BYTES
from tierdisk.service.volume import LayerEntry, Volume

SS = 512
ZERO = bytes(SS)


def c(s: int) -> bytes:
    """The pattern of a full bottom layer."""
    return sector_pattern(0xC, s, SS)


def p(tag: int, s: int) -> bytes:
    return sector_pattern(tag, s, SS)


def ram(sectors: int | None = None, sector_size: int = SS) -> RamLayer:
    return RamLayer(
        size=None if sectors is None else sectors * sector_size, sector_size=sector_size
    )


def full(sectors: int, fn: Callable[[int], bytes] = c, **kwargs: Any) -> MapLayer:
    return MapLayer(sectors, full=fn, **kwargs)


async def sectors_of(volume: Volume, sector: int, count: int) -> list[bytes]:
    data, _ = await volume.read(sector, count)
    return [bytes(data[i * SS : (i + 1) * SS]) for i in range(count)]


async def write(volume: Volume, sector: int, *sectors: bytes, **kwargs: bool) -> None:
    await volume.write(sector, b"".join(sectors), **kwargs)


async def open_error(
    volumes: VolumeOpener, *layers: Layer | LayerEntry, read_only: bool = False
) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        await volumes(*layers, read_only=read_only, name="bad")
    err = info.value
    assert "'bad'" in str(err), "the message names the volume"
    assert f"layer {err.layer}" in str(err), "the message names the layer index"
    return err


# -- construction ------------------------------------------------------------------------------


async def test_s01_no_layers(volumes: VolumeOpener) -> None:
    with pytest.raises(ConfigError, match="at least one layer") as info:
        await volumes(name="bad")
    assert "'bad'" in str(info.value)


async def test_s02_mismatched_sector_sizes(volumes: VolumeOpener) -> None:
    err = await open_error(volumes, ram(2048, 4096), ram(2048))
    assert err.layer == 0 and "sector size 4096" in str(err) and "512" in str(err)
    err = await open_error(volumes, ram(2048), ram(256, 4096))
    assert err.layer == 0 and "sector size 512" in str(err) and "4096" in str(err)
    err = await open_error(volumes, ram(8), ram(8), MapLayer(8, sector_size=4096))
    assert err.layer == 1


@pytest.mark.parametrize("kind", ["ram", "sparse"])
async def test_s02_a_layer_inheriting_a_size_of_other_sectors_breaks_the_sector_size_rule(
    volumes: VolumeOpener, tmp_path: Path, kind: str
) -> None:
    """A 4096-byte-sector layer over 512-byte sectors is refused by the rule it breaks, also
    when the size it would inherit is no multiple of 4096 (it was refused for a size the
    config never gave), and before a new sparse layer is made of it (its files were left
    behind, and the next start refused them for their sector size)."""
    path = tmp_path / "top"
    for sectors, size in ((2048, None), (2049, None), (2048, 2048 * SS)):
        top: Layer = (
            RamLayer(size, sector_size=4096)
            if kind == "ram"
            else SparseLayer(str(path), size=size, sector_size=4096)
        )
        err = await open_error(volumes, top, ram(sectors))
        assert err.layer == 0
        assert "sector size 4096 differs from the bottom layer's 512" in str(err), str(err)
        assert "size" not in str(err).replace("sector size", "")
        assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bad", [1000, 256, 0])
async def test_s03_invalid_sector_size(volumes: VolumeOpener, bad: int) -> None:
    err = await open_error(volumes, ram(8), MapLayer(8, sector_size=bad), ram(8))
    assert err.layer == 1 and str(bad) in str(err) and "power of two" in str(err)


async def test_s04_ram_geometry(volumes: VolumeOpener) -> None:
    err = await open_error(volumes, RamLayer(4096, sector_size=1000))
    assert err.layer == 0 and "1000" in str(err)
    err = await open_error(volumes, RamLayer(5000, sector_size=4096))
    assert err.layer == 0 and "5000" in str(err)
    err = await open_error(volumes, RamLayer(0, sector_size=512))
    assert err.layer == 0
    vol = await volumes(RamLayer(1 << 20, sector_size=4096))
    assert (vol.sector_count, vol.sector_size, vol.physical_sector_size) == (256, 4096, 4096)


async def test_s05_read_cache_needs_no_overwrite(volumes: VolumeOpener, tmp_path: Path) -> None:
    raw = RawLayer(str(tmp_path / "img"), size=8 * SS)
    err = await open_error(volumes, entry(raw, rc=True), ram(8))
    assert err.layer == 0 and "read_cache" in str(err) and "raw" in str(err)
    err = await open_error(volumes, ram(8), entry(MapLayer(8, can_read_cache=False), rc=True))
    assert err.layer == 1 and "read_cache" in str(err)


@pytest.mark.parametrize(
    ("flags", "bad_layer"),
    [
        ((True, False), None),
        ((False, True), 1),
        ((True,), 0),
        ((True, True), 1),
        ((False, True, False), 1),
        ((True, True, False), None),
        ((True, False, True, False), 2),
    ],
)
async def test_s06_write_through_placement(
    volumes: VolumeOpener, flags: tuple[bool, ...], bad_layer: int | None
) -> None:
    layers = [entry(ram(8), wt=wt) for wt in flags]
    if bad_layer is None:
        await volumes(*layers)
        return
    err = await open_error(volumes, *layers)
    assert err.layer == bad_layer and "write_through" in str(err)


async def test_s07_read_only_layers(volumes: VolumeOpener, tmp_path: Path) -> None:
    err = await open_error(volumes, MapLayer(8, read_only=True))
    assert err.layer == 0 and "read-only" in str(err)
    await volumes(MapLayer(8, read_only=True), read_only=True)
    await volumes(ram(8), MapLayer(8, read_only=True))
    err = await open_error(volumes, entry(ram(8), wt=True), MapLayer(8, read_only=True))
    assert err.layer == 1 and "read-only" in str(err)
    # a real read-only image under a RAM top: the usual differencing disk
    image = tmp_path / "base.img"
    image.write_bytes(pattern(0xC, 0, 8, SS))
    vol = await volumes(ram(), RawLayer(str(image), read_only=True))
    assert await sectors_of(vol, 0, 8) == [c(s) for s in range(8)]


async def test_s08_bottom_layer_needs_a_size(volumes: VolumeOpener, tmp_path: Path) -> None:
    err = await open_error(volumes, RamLayer())
    assert err.layer == 0 and "size" in str(err)
    err = await open_error(volumes, ram(8), RawLayer(str(tmp_path / "missing.img")))
    assert err.layer == 1 and "size" in str(err)


async def test_s09_ram_inherits_size_and_sector_size(volumes: VolumeOpener) -> None:
    vol = await volumes(RamLayer(), RamLayer(1 << 20, sector_size=4096))
    assert (vol.sector_size, vol.sector_count) == (4096, 256)
    vol = await volumes(RamLayer(), full(77))
    assert vol.sector_count == 77


async def test_s10_attach_checks_come_first(volumes: VolumeOpener) -> None:
    err = await open_error(
        volumes,
        entry(ram(8), wt=True),
        ram(8),
        entry(MapLayer(8, can_read_cache=False), rc=True),
    )
    assert err.layer == 2 and "read_cache" in str(err)


async def test_failed_open_closes_attached_layers(volumes: VolumeOpener, tmp_path: Path) -> None:
    below = MapLayer(8)
    await open_error(volumes, entry(ram(8), wt=True), MapLayer(8, read_only=True), below)
    assert below.closed
    # a raw image left locked by a failed open could never be opened again
    path = str(tmp_path / "img")
    await open_error(volumes, RamLayer(8 * SS, sector_size=4096), RawLayer(path, size=8 * SS))
    vol = await volumes(RawLayer(path, size=8 * SS))
    assert vol.sector_count == 8


# -- metadata ----------------------------------------------------------------------------------


async def test_s11_disk_id_is_the_first_found_top_down(volumes: VolumeOpener) -> None:
    x, q = b"X" * 16, b"Q" * 16
    vol = await volumes(ram(8), MapLayer(8), MapLayer(8, disk_id=x))
    assert vol.disk_id == x
    vol = await volumes(MapLayer(8, disk_id=q), MapLayer(8, disk_id=x))
    assert vol.disk_id == q
    vol = await volumes(ram(8))
    assert vol.disk_id is None


async def test_s12_geometry_comes_from_the_top(volumes: VolumeOpener) -> None:
    vol = await volumes(ram(8), MapLayer(8, physical_sector_size=4096))
    assert vol.physical_sector_size == SS
    assert vol.sector_count == 8
    await vol.resize(20)
    assert vol.sector_count == 20


async def test_s13_fua_respected_over_the_write_path(volumes: VolumeOpener) -> None:
    assert (await volumes(ram(8))).fua_respected
    assert not (
        await volumes(entry(ram(8), wt=True), MapLayer(8, fua_respected=False))
    ).fua_respected
    assert (await volumes(ram(8), MapLayer(8, fua_respected=False))).fua_respected
    assert not (await volumes(MapLayer(8, fua_respected=False), ram(8))).fua_respected


Z, A, I, U = (  # noqa: E741
    UnmapBehavior.ZEROES,
    UnmapBehavior.ANY,
    UnmapBehavior.IGNORED,
    UnmapBehavior.UNSPECIFIED,
)


@pytest.mark.parametrize(
    ("stack", "expected"),
    [
        ([(U, False), (Z, False)], U),  # without write-through: the top's
        ([(Z, False), (I, False)], Z),
        ([(A, False)], A),
        ([(I, False), (Z, False)], I),
        ([(U, True), (U, False)], I),  # with write-through: ZEROES only if all zero
        ([(Z, True), (Z, False)], Z),
        ([(Z, True), (U, False)], I),
        ([(A, True), (A, False)], I),
        ([(Z, True), (Z, True), (Z, False), (I, False)], Z),
        ([(Z, True), (Z, True), (A, False)], I),
    ],
)
async def test_s14_unmap_behavior_merge(
    volumes: VolumeOpener, stack: list[tuple[UnmapBehavior, bool]], expected: UnmapBehavior
) -> None:
    layers = [entry(MapLayer(8, unmap_behavior=b), wt=wt) for b, wt in stack]
    assert (await volumes(*layers)).unmap_behavior == expected


async def test_s15_optimal_unmap_sectors(volumes: VolumeOpener) -> None:
    vol = await volumes(entry(MapLayer(8, optimal_unmap_sectors=4096), wt=True), MapLayer(8))
    assert vol.optimal_unmap_sectors == 4096
    vol = await volumes(MapLayer(8), MapLayer(8, optimal_unmap_sectors=4096))
    assert vol.optimal_unmap_sectors == 1


# -- reads -------------------------------------------------------------------------------------


async def test_s16_diff(volumes: VolumeOpener) -> None:
    p0 = partial(p, 0)
    vol = await volumes(ram(2048), full(2048, p0))
    assert await sectors_of(vol, 10, 2) == [p0(10), p0(11)]
    await write(vol, 10, p(1, 10), p(1, 11))
    await write(vol, 11, p(2, 11))
    assert await sectors_of(vol, 9, 5) == [p0(9), p(1, 10), p(2, 11), p0(12), p0(13)]


async def test_s17_unheld_sectors_read_as_zeros(volumes: VolumeOpener) -> None:
    vol = await volumes(ram(16), ram(16))
    data, present = await vol.read(0, 16)
    assert data == bytes(16 * SS) and present == []


async def test_s18_mixed_presence(volumes: VolumeOpener) -> None:
    vol = await volumes(MapLayer(8, data={2: p(0xA, 2), 5: p(0xB, 5)}), full(8))
    got = await sectors_of(vol, 0, 8)
    assert got == [c(0), c(1), p(0xA, 2), c(3), c(4), p(0xB, 5), c(6), c(7)]


async def test_s19_three_layers(volumes: VolumeOpener) -> None:
    m = partial(p, 0xD)
    vol = await volumes(
        MapLayer(4, data={1: p(0xA, 1)}), MapLayer(4, data={0: m(0), 2: m(2)}), full(4)
    )
    assert await sectors_of(vol, 0, 4) == [m(0), p(0xA, 1), m(2), c(3)]


async def test_s20_lower_layer_visible_only_below_its_overlap(volumes: VolumeOpener) -> None:
    lower = full(50)
    vol = await volumes(ram(100), lower)
    assert vol.sector_count == 100
    got = await sectors_of(vol, 40, 20)
    assert got == [c(s) for s in range(40, 50)] + [ZERO] * 10
    assert lower.ops("read") == [("read", 40, 10)]


async def test_s21_top_smaller_than_lower(volumes: VolumeOpener) -> None:
    vol = await volumes(ram(50), full(100))
    assert vol.sector_count == 50
    with pytest.raises(OutOfRange):
        await vol.read(49, 2)
    assert await sectors_of(vol, 49, 1) == [c(49)]


async def test_s22_u1_run_starting_at_a_lower_overlap_does_not_abort(volumes: VolumeOpener) -> None:
    a = partial(p, 0xA)
    top = MapLayer(100, data={s: a(s) for s in range(20, 50)})
    vol = await volumes(top, MapLayer(50), full(50))
    got = await sectors_of(vol, 0, 100)
    assert got == [c(s) for s in range(20)] + [a(s) for s in range(20, 50)] + [ZERO] * 50


async def test_s23_u2_read_past_a_lower_layer_end(volumes: VolumeOpener) -> None:
    vol = await volumes(MapLayer(100, data={60: p(0xA, 60)}), full(50))
    got = await sectors_of(vol, 0, 100)
    assert got == [c(s) for s in range(50)] + [ZERO] * 10 + [p(0xA, 60)] + [ZERO] * 39
    vol = await volumes(ram(100), full(50))
    assert await sectors_of(vol, 60, 1) == [ZERO]
    assert await sectors_of(vol, 55, 10) == [ZERO] * 10
    assert await sectors_of(vol, 50, 1) == [ZERO]
    assert await sectors_of(vol, 40, 20) == [c(s) for s in range(40, 50)] + [ZERO] * 10


@pytest.mark.parametrize("ss", [512, 4096])
@pytest.mark.parametrize("spec", ["ram", "ram/ram", "ram-rc/ram"])
async def test_s24_sector_range_conformance(volumes: VolumeOpener, spec: str, ss: int) -> None:
    vol = await volumes.spec(spec, sector_size=ss, size_bytes=1 << 20)
    count = vol.sector_count
    assert count == (1 << 20) // ss
    huge = [(count, 1), (count - 1, 2), (2**64 - 1, 1), (2**64 - 2, 2), (2**63 - 1, 1)]
    for sector, n in huge:
        with pytest.raises(OutOfRange):
            await vol.read(sector, n)
        with pytest.raises(OutOfRange):
            await vol.write(sector, bytes(n * ss))
        with pytest.raises(OutOfRange):
            await vol.unmap(sector, n)
        with pytest.raises(OutOfRange):
            await vol.allocation(sector, n)
    data, _ = await vol.read(count - 1, 1)
    assert data == bytes(ss)
    data, present = await vol.read(0, 0)
    assert data == b"" and present == []


async def test_s25_zero_length_requests(volumes: VolumeOpener) -> None:
    lower = full(8)
    vol = await volumes(MapLayer(8), lower)
    assert (await vol.read(8, 0)) == (bytearray(), [])
    await vol.write(8, b"")
    await vol.unmap(8, 0)
    assert await vol.allocation(8, 0) == []
    assert lower.calls == []
    # DESIGN §2: a range past the end is OUT_OF_RANGE, even an empty one
    with pytest.raises(OutOfRange):
        await vol.read(9, 0)
    with pytest.raises(OutOfRange):
        await vol.write(9, b"")


async def test_negative_or_partial_sectors_are_invalid(volumes: VolumeOpener) -> None:
    vol = await volumes(ram(8))
    with pytest.raises(InvalidArgument):
        await vol.read(-1, 1)
    with pytest.raises(InvalidArgument):
        await vol.write(0, bytes(SS + 1))
    with pytest.raises(InvalidArgument):
        await vol.read_into(memoryview(bytearray(100)), 0)
    with pytest.raises(InvalidArgument):
        await vol.unmap(0, -1)


# -- read cache --------------------------------------------------------------------------------


async def test_s27_read_cache(volumes: VolumeOpener) -> None:
    cache = ram(2048)
    bottom = full(2048)
    vol = await volumes(entry(cache, rc=True), bottom)
    for s in [0, 2, 4, 6, 8, 0, 2, 4, 6, 8]:
        assert await sectors_of(vol, s, 1) == [c(s)]
    assert cache.present_sectors == 5
    assert len(bottom.ops("read")) == 5, "cached sectors are not read again"
    assert await sectors_of(vol, 1, 15) == [c(s) for s in range(1, 16)]
    assert cache.present_sectors == 16
    assert await vol.allocation(0, 20) == [(0, 16, 0), (16, 20, 1)]


async def test_s28_fill_never_overwrites(volumes: VolumeOpener) -> None:
    x = p(0xE, 3)
    cache = MapLayer(10, data={3: x})
    vol = await volumes(entry(cache, rc=True), full(10))
    assert await sectors_of(vol, 0, 10) == [c(0), c(1), c(2), x] + [c(s) for s in range(4, 10)]
    assert sorted(cache.data) == list(range(10)) and cache.data[3] == x
    assert cache.ops("fill") == [("fill", 0, 3), ("fill", 4, 6)]


class FailingFillRam(RamLayer):
    """A RAM cache whose fills fail as a SQLite cache opened read-only would."""

    async def write_no_overwrite(self, data: memoryview, sector: int) -> int:
        raise sqlite3.OperationalError("attempt to write a readonly database")


@pytest.mark.parametrize("kind", ["storage-error", "sqlite-error"])
async def test_s29_failed_fill_is_counted_and_the_read_succeeds(
    volumes: VolumeOpener, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache: MapLayer | RamLayer
    if kind == "storage-error":
        cache = MapLayer(10)
        cache.fail_fills = True
    else:
        cache = FailingFillRam(10 * SS)
    vol = await volumes(entry(cache, rc=True), full(10))
    await cache.write(memoryview(p(0xE, 3)), 3, False)
    got = await sectors_of(vol, 0, 10)
    assert got == [c(0), c(1), c(2), p(0xE, 3)] + [c(s) for s in range(4, 10)]
    stats = vol.entries[0].stats
    assert (stats.cache_fill_errors, stats.cache_fills) == (2, 0)  # two runs, two calls
    assert cache.present_sectors == 1
    assert "filling read cache layer 0 failed" in caplog.text
    # the next read tries again, and still succeeds
    assert await sectors_of(vol, 0, 1) == [c(0)]
    assert stats.cache_fill_errors == 3


async def test_s30_zeros_are_cached(volumes: VolumeOpener) -> None:
    cache = ram(10)
    vol = await volumes(entry(cache, rc=True), full(6))
    assert await sectors_of(vol, 0, 10) == [c(s) for s in range(6)] + [ZERO] * 4
    assert cache.present_sectors == 10
    assert await vol.allocation(0, 10) == [(0, 10, 0)]


async def test_s31_read_cache_smaller_than_the_top_still_fills(volumes: VolumeOpener) -> None:
    cache = ram(6)
    vol = await volumes(ram(10), entry(cache, rc=True), full(6))
    assert await sectors_of(vol, 0, 10) == [c(s) for s in range(6)] + [ZERO] * 4
    assert cache.present_sectors == 6
    assert vol.entries[1].stats.cache_fill_errors == 0


async def test_s31_cache_larger_than_its_overlap_fills_only_what_is_visible(
    volumes: VolumeOpener,
) -> None:
    cache = ram(20)
    vol = await volumes(ram(10), entry(cache, rc=True), full(20))
    await vol.read(0, 10)
    assert cache.present_sectors == 10


async def test_s32_u3_read_cache_below_a_partially_present_top(volumes: VolumeOpener) -> None:
    a, b = p(0xA, 5), partial(p, 0xB)
    cache = MapLayer(10, data={s: b(s) for s in range(6, 10)})
    vol = await volumes(MapLayer(10, data={5: a}), entry(cache, rc=True), full(10))
    buf = bytearray(b"\xee" * 10 * SS)
    present = await vol.read_into(memoryview(buf), 0)
    got = [bytes(buf[i * SS : (i + 1) * SS]) for i in range(10)]
    assert got == [c(s) for s in range(5)] + [a] + [b(s) for s in range(6, 10)]
    assert present == [(0, 10)]
    assert sorted(cache.data) == [0, 1, 2, 3, 4, 6, 7, 8, 9], "gained 0..5, not 5 (the top's)"


async def test_s33_read_cache_on_top_is_the_write_target(volumes: VolumeOpener) -> None:
    cache = ram(10)
    vol = await volumes(entry(cache, rc=True), full(10))
    await write(vol, 4, p(0xF, 4))
    assert await sectors_of(vol, 4, 1) == [p(0xF, 4)]
    assert await sectors_of(vol, 0, 10) == [c(s) for s in range(4)] + [p(0xF, 4)] + [
        c(s) for s in range(5, 10)
    ]
    assert await sectors_of(vol, 4, 1) == [p(0xF, 4)]


async def test_s34_lower_read_error_fails_the_read_without_fill(volumes: VolumeOpener) -> None:
    cache = ram(10)
    bottom = full(10)
    bottom.fail_reads = True
    vol = await volumes(entry(cache, rc=True), bottom)
    with pytest.raises(StorageError, match="injected read failure") as caught:
        await vol.read(0, 10)
    assert type(caught.value) is StorageError  # the layer's error, not wrapped (INTERNAL)
    assert cache.present_sectors == 0


async def test_second_read_of_cached_sectors_stays_in_the_cache(volumes: VolumeOpener) -> None:
    bottom = full(64)
    vol = await volumes(ram(64), entry(ram(64), rc=True), bottom)
    await vol.read(0, 64)
    calls = len(bottom.calls)
    assert await sectors_of(vol, 0, 64) == [c(s) for s in range(64)]
    assert len(bottom.calls) == calls


# -- write, flush, FUA ---------------------------------------------------------------------------


async def test_s35_write_lands_on_the_top_only(volumes: VolumeOpener) -> None:
    b = MapLayer(8)
    vol = await volumes(MapLayer(8), b)
    await write(vol, 2, p(1, 2))
    assert b.calls == [] and b.data == {}
    assert vol.entries[0].layer.present_sectors == 1


async def test_s36_write_through(volumes: VolumeOpener) -> None:
    a, b, cc = MapLayer(8), MapLayer(8), MapLayer(8)
    vol = await volumes(entry(a, wt=True), b)
    await write(vol, 2, p(1, 2))
    assert a.data == b.data == {2: p(1, 2)}
    vol = await volumes(entry(MapLayer(8), wt=True), entry(MapLayer(8), wt=True), cc)
    await write(vol, 3, p(1, 3))
    assert all(e.layer.present_sectors == 1 for e in vol.entries)


async def test_s37_write_through_to_a_smaller_layer_is_clipped(volumes: VolumeOpener) -> None:
    """Upstream fails the whole write at the smaller layer (IllegalBlock); here that
    layer takes what fits, and the write fails with a StorageError saying the rest is not
    durable (the layer is the durable copy; a silent clip lost FUA writes at a restart)."""
    a, b = MapLayer(100), MapLayer(50)
    vol = await volumes(entry(a, wt=True), b)
    with pytest.raises(StorageError, match=r"sectors \[60, 61\) .* past the end of write-path"):
        await write(vol, 60, p(1, 60))
    assert await sectors_of(vol, 60, 1) == [p(1, 60)]  # the top took it
    assert b.calls == []
    with pytest.raises(StorageError, match=r"sectors \[50, 55\)"):
        await vol.write(45, pattern(2, 45, 10, SS))
    assert b.ops("write") == [("write", 45, 5, False)]
    assert sorted(b.data) == list(range(45, 50))
    await vol.write(40, pattern(3, 40, 5, SS))  # all of it fits: no error
    assert vol.inspect()["smallest_sector_count"] == 100  # made smaller, never shrunk


async def test_s38_flush_syncs_the_write_path(volumes: VolumeOpener) -> None:
    a, b, cc = MapLayer(8), MapLayer(8), MapLayer(8)
    vol = await volumes(entry(a, wt=True), b, cc)
    await vol.flush()
    assert a.ops("flush") == b.ops("flush") == [("flush",)] and cc.calls == []


async def test_s39_fua_reaches_every_write_path_layer(volumes: VolumeOpener) -> None:
    a, b, cc, d = MapLayer(8), MapLayer(8), MapLayer(8), MapLayer(8)
    vol = await volumes(entry(a, wt=True), entry(b, wt=True), cc, d)
    await write(vol, 1, p(1, 1), fua=True)
    for layer in (a, b, cc):
        assert layer.ops("write") == [("write", 1, 1, True)]
    assert d.calls == []


async def test_fua_no_overwrite_write_is_flushed(volumes: VolumeOpener) -> None:
    """A fua write must be durable when acknowledged, no_overwrite or not; a layer's
    write_no_overwrite takes no fua flag, so the engine must flush what it wrote."""
    top = MapLayer(8)
    vol = await volumes(top)
    await write(vol, 1, p(1, 1), fua=True, no_overwrite=True)
    assert [op[0] for op in top.calls] == ["fill", "flush"]
    top.calls.clear()
    await write(vol, 2, p(1, 2), no_overwrite=True)
    assert [op[0] for op in top.calls] == ["fill"]


async def test_s40_read_only_volume_refuses_changes(volumes: VolumeOpener) -> None:
    top = MapLayer(8, data={1: p(1, 1)})
    vol = await volumes(top, read_only=True)
    with pytest.raises(ReadOnlyError, match="read-only"):
        await write(vol, 1, p(2, 1))
    with pytest.raises(ReadOnlyError):
        await write(vol, 1, p(2, 1), no_overwrite=True)
    with pytest.raises(ReadOnlyError):
        await vol.unmap(0, 8)
    with pytest.raises(ReadOnlyError):
        await vol.resize(16)
    assert top.ops("write") == top.ops("unmap") == top.ops("resize") == []
    assert await sectors_of(vol, 1, 1) == [p(1, 1)]


async def test_write_past_the_end_changes_nothing(volumes: VolumeOpener) -> None:
    a, b = MapLayer(8), MapLayer(8)
    vol = await volumes(entry(a, wt=True), b)
    with pytest.raises(OutOfRange):
        await vol.write(7, pattern(1, 7, 2, SS))
    assert a.calls == b.calls == []


async def test_no_overwrite_write_fills_only_holes(volumes: VolumeOpener) -> None:
    x, bb = p(0xE, 2), partial(p, 0xB)
    top = MapLayer(10, data={2: x})
    vol = await volumes(entry(top, wt=True), MapLayer(10, data={5: bb(5), 6: bb(6)}), full(4))
    await vol.write(0, pattern(1, 0, 10, SS), no_overwrite=True)
    got = await sectors_of(vol, 0, 10)
    assert got == [c(0), c(1), x, c(3), p(1, 4), bb(5), bb(6), p(1, 7), p(1, 8), p(1, 9)]
    assert sorted(top.data) == [2, 4, 7, 8, 9]


@pytest.mark.parametrize("where", ["top", "lower"])
async def test_a_misaligned_write_keeps_every_byte_around_it(
    volumes: VolumeOpener, where: str
) -> None:
    """:meth:`Volume.write_at` reads the sector a write starts inside and the one it ends
    inside before writing them back: the bytes before and after the new ones, in those
    sectors, keep their value (from the top, or from a lower layer when only it holds
    them). One case per shape: starting and ending inside different sectors, starting on
    a sector and ending inside it or inside the next, inside one sector, and starting
    inside a sector and ending on a boundary."""
    old = bytes(1 + i % 251 for i in range(8 * SS))  # never zero, no two neighbours equal
    if where == "top":
        vol = await volumes(ram(8))
        await vol.write(0, old)
    else:
        vol = await volumes(ram(8), full(8, lambda s: old[s * SS : (s + 1) * SS]))
    expected = bytearray(old)
    writes = [
        (100, b"A" * 600),  # inside sector 0 to inside sector 1
        (3 * SS, b"B" * 10),  # the start of sector 3 to inside it
        (4 * SS, b"C" * (SS + 20)),  # the start of sector 4 to inside sector 5
        (6 * SS + 100, b"D" * 10),  # inside sector 6 only
        (7 * SS + 300, b"E" * (SS - 300)),  # inside sector 7 to the end of the volume
    ]
    for offset, data in writes:
        await vol.write_at(offset, data)
        expected[offset : offset + len(data)] = data
        got, _ = await vol.read(0, 8)
        assert got == expected, f"after the write of {len(data)} bytes at byte {offset}"


# -- unmap -------------------------------------------------------------------------------------


async def test_s41_unmap_of_a_single_ram_layer(volumes: VolumeOpener) -> None:
    top = ram(8)
    vol = await volumes(top)
    await vol.write(0, pattern(1, 0, 4, SS))
    await vol.unmap(0, 4)
    assert await sectors_of(vol, 0, 4) == [ZERO] * 4
    assert top.present_sectors == 0, "nothing below: dropped, not stored"
    assert vol.unmap_behavior == UnmapBehavior.ZEROES


async def test_s42_unmap_over_lower_data_reads_zeros(volumes: VolumeOpener) -> None:
    """Upstream ignores a RAM unmap that ends below zero_after; a ZEROES layer may not."""
    n = 2048
    p0 = partial(p, 0)
    top = ram(n)
    vol = await volumes(top, full(n, p0))
    await vol.unmap(0, n - 1)
    assert await sectors_of(vol, 0, n) == [ZERO] * (n - 1) + [p0(n - 1)]
    assert top.present_sectors == n - 1
    await vol.unmap(n // 2, n // 2)
    assert await sectors_of(vol, n // 2 - 1, 2) == [ZERO, ZERO]


async def test_s43_unmap_hides_lower_data(volumes: VolumeOpener) -> None:
    top = MapLayer(100, data={10: p(0xE, 10)})
    vol = await volumes(top, full(100))
    await vol.unmap(5, 10)
    assert await sectors_of(vol, 4, 12) == [c(4)] + [ZERO] * 10 + [c(15)]
    assert top.ops("unmap") == [("unmap", 5, 10, False)]


async def test_s44_unmap_past_the_lower_end_drops(volumes: VolumeOpener) -> None:
    top = MapLayer(100, data={60: p(0xE, 60)})
    vol = await volumes(top, full(50))
    await vol.unmap(55, 10)
    assert await sectors_of(vol, 55, 10) == [ZERO] * 10
    assert top.ops("unmap") == [("unmap", 55, 10, True)] and top.data == {}


async def test_s45_unmap_straddling_a_lower_overlap_is_split(volumes: VolumeOpener) -> None:
    top = MapLayer(100)
    vol = await volumes(top, full(50))
    await vol.unmap(40, 20)
    assert await sectors_of(vol, 39, 22) == [c(39)] + [ZERO] * 21
    assert top.ops("unmap") == [("unmap", 40, 10, False), ("unmap", 50, 10, True)]
    assert await vol.allocation(38, 24) == [(38, 40, 1), (40, 50, 0), (50, 62, -1)]


async def test_s45_split_through_write_through_layers(volumes: VolumeOpener) -> None:
    top, mid, low = MapLayer(100), MapLayer(50), MapLayer(30)
    vol = await volumes(entry(top, wt=True), mid, low)
    await vol.unmap(20, 60)
    assert top.ops("unmap") == [("unmap", 20, 30, False), ("unmap", 50, 30, True)]
    assert mid.ops("unmap") == [("unmap", 20, 10, False), ("unmap", 30, 20, True)]
    assert low.calls == []


class _CostlyZeros(MapLayer):
    """A map layer that keeps zeros at a cost per sector (as ``sqlite``: a row each)."""

    @property
    def zeros_cost_per_sector(self) -> bool:
        return True


async def test_s45_costly_zeros_are_kept_only_over_what_a_layer_below_holds(
    volumes: VolumeOpener,
) -> None:
    """A layer whose zeros cost storage per sector keeps them present only over the runs a
    layer below holds (within its overlap); the rest it drops. Reads are zeros throughout."""
    top = _CostlyZeros(100, data={s: p(1, s) for s in range(0, 100, 7)})
    mid = MapLayer(80, data={s: p(2, s) for s in range(20, 30)} | {60: p(2, 60)})
    low = MapLayer(100, data={s: p(3, s) for s in (*range(40, 45), 90)})
    vol = await volumes(entry(top, wt=True), mid, low)
    await vol.unmap(0, 100)
    assert await sectors_of(vol, 0, 100) == [ZERO] * 100
    assert top.ops("unmap") == [
        ("unmap", 0, 20, True),
        ("unmap", 20, 10, False),
        ("unmap", 30, 10, True),
        ("unmap", 40, 5, False),
        ("unmap", 45, 15, True),
        ("unmap", 60, 1, False),
        ("unmap", 61, 19, True),  # low's sector 90 lies past mid's overlap (80): hidden
        ("unmap", 80, 20, True),
    ]
    assert sorted(top.data) == [*range(20, 30), *range(40, 45), 60]


async def test_s45_a_sqlite_discard_over_an_empty_layer_stores_no_rows(
    volumes: VolumeOpener, tmp_path: Path
) -> None:
    """Discarding a whole sqlite-over-ram volume writes a row only where the ram layer holds
    data (it wrote one per sector: a whole-disk discard of a large volume ran for minutes
    and filled the disk)."""
    n = 64 * 2048  # 64 MiB
    top = SqliteLayer(str(tmp_path / "top.db"), size=n * SS)
    lower = ram(n)
    vol = await volumes(top, lower)
    await lower.write(memoryview(pattern(2, 1000, 8, SS)), 1000, False)
    await vol.write(0, pattern(1, 0, 16, SS))
    await vol.unmap(0, n)
    assert top.present_sectors == 8
    assert await vol.allocation(0, n) == [(0, 1000, -1), (1000, 1008, 0), (1008, n, -1)]
    data, _ = await vol.read(990, 30)
    assert bytes(data) == bytes(30 * SS)


async def test_s46_ignored_unmap_does_nothing(volumes: VolumeOpener) -> None:
    top = MapLayer(8, data={1: p(1, 1)}, unmap_behavior=UnmapBehavior.IGNORED)
    vol = await volumes(top)
    await vol.unmap(0, 8)
    assert top.calls == [] and await sectors_of(vol, 1, 1) == [p(1, 1)]
    with pytest.raises(OutOfRange):
        await vol.unmap(8, 1)


async def test_s47_write_through_zeroes(volumes: VolumeOpener) -> None:
    top, bottom = ram(16), ram(16)
    vol = await volumes(entry(top, wt=True), bottom)
    assert vol.unmap_behavior == UnmapBehavior.ZEROES
    await vol.write(0, pattern(1, 0, 16, SS))
    await vol.unmap(4, 4)
    assert await sectors_of(vol, 3, 6) == [p(1, 3)] + [ZERO] * 4 + [p(1, 8)]
    assert (top.present_sectors, bottom.present_sectors) == (16, 12)
    # past the bottom's overlap (after a shrink) the top drops too
    await vol.resize(8)
    await vol.resize(16)
    await vol.write(10, pattern(2, 10, 2, SS))
    await vol.unmap(10, 2)
    assert await vol.allocation(8, 8) == [(8, 16, -1)]


async def test_s48_write_through_with_an_ignoring_layer_ignores(volumes: VolumeOpener) -> None:
    top = MapLayer(8, data={1: p(1, 1)}, unmap_behavior=UnmapBehavior.IGNORED)
    bottom = MapLayer(8, data={1: p(1, 1)})
    vol = await volumes(entry(top, wt=True), bottom)
    assert vol.unmap_behavior == UnmapBehavior.IGNORED
    await vol.unmap(0, 8)
    assert top.ops("unmap") == bottom.ops("unmap") == []


# -- resize ------------------------------------------------------------------------------------


async def test_s50_shrink_then_grow_exposes_zeros(volumes: VolumeOpener) -> None:
    n = 2048
    p0 = partial(p, 0)
    lower = full(n, p0)
    vol = await volumes(ram(n), lower)
    await vol.resize(n // 2)
    await vol.resize(n)
    got = await sectors_of(vol, 0, n)
    assert got == [p0(s) for s in range(n // 2)] + [ZERO] * (n // 2)
    assert all(op[1] + op[2] <= n // 2 for op in lower.ops("read"))
    assert vol.inspect()["layers"][1]["visible_sector_count"] == n // 2


async def test_s51_shrink(volumes: VolumeOpener) -> None:
    vol = await volumes(ram(16))
    await vol.write(0, pattern(1, 0, 16, SS))
    assert await vol.resize(10) == 10
    assert vol.sector_count == 10
    with pytest.raises(OutOfRange):
        await vol.read(10, 1)
    with pytest.raises(InvalidArgument):
        await vol.resize(0)
    assert vol.sector_count == 10
    await vol.resize(16)
    assert await sectors_of(vol, 8, 8) == [p(1, 8), p(1, 9)] + [ZERO] * 6


class _GatedRead(MapLayer):
    """A layer whose next read waits for :attr:`hold` (an event) when one is set."""

    hold: asyncio.Event | None = None

    async def read(self, buf: memoryview, sector: int) -> list[Run]:
        hold, self.hold = self.hold, None
        if hold is not None:
            await hold.wait()
        return await super().read(buf, sector)


async def test_a_lower_layer_that_shrinks_by_itself_hides_the_layers_below_it(
    volumes: VolumeOpener,
) -> None:
    """A layer below the top that shrinks by itself (a ``remote`` whose origin shrank) and
    grows again reads zeros past its smallest size from then on, as that origin does, not
    the older data of the layers under it (DESIGN.md §3: never stale lower data); a read
    that was reading them meanwhile fills no read cache with them; ``inspect`` shows it.
    What the layer itself holds past its smallest size once grown shows (it is not hidden
    by its own shrink)."""
    top = MapLayer(8)
    mid = MapLayer(8, data={s: p(2, s) for s in range(4)})
    base = _GatedRead(8, full=lambda s: p(3, s))
    vol = await volumes(entry(top, rc=True), mid, base)
    gate = base.hold = asyncio.Event()
    reading = asyncio.create_task(vol.read(4, 4))  # from the base: the middle has none
    await _spin()
    await mid.resize(2)
    await mid.resize(8)
    gate.set()
    await reading  # (read before the shrink: what it returns is not the question)
    assert top.data == {}  # no fill of what the middle now hides
    await mid.write(memoryview(p(4, 6)), 6, False)  # the middle layer's own, after the grow
    assert await sectors_of(vol, 0, 8) == [p(2, 0), p(2, 1)] + [ZERO] * 4 + [p(4, 6), ZERO]
    layers = vol.inspect()["layers"]
    assert [layer["visible_sector_count"] for layer in layers] == [8, 8, 2]


async def test_resize_of_a_top_that_cannot(volumes: VolumeOpener) -> None:
    vol = await volumes(MapLayer(8, resizable=False))
    with pytest.raises(NotSupported):
        await vol.resize(16)
    assert vol.sector_count == 8 and vol.generation == 0


async def test_resize_reaches_the_write_through_layers_and_outlives_a_restart(
    volumes: VolumeOpener, tmp_path: Path
) -> None:
    """[ram write-through, sparse, raw base]: the sparse layer holds every write, so it is
    resized with the top; after a restart (a new ram top) the volume has the new size,
    every FUA write, zeros where the shrink cut, and the base stays hidden past it."""
    n = 64
    base = tmp_path / "base.raw"
    base.write_bytes(pattern(9, 0, 2 * n, SS))
    cache = str(tmp_path / "cache")

    async def open_stack(size: int | None) -> Volume:
        return await volumes(
            entry(RamLayer(), wt=True),
            SparseLayer(cache, size=size),
            RawLayer(str(base), read_only=True),
        )

    vol = await open_stack(n * SS)
    await vol.write(0, pattern(1, 0, n, SS))
    await vol.resize(16)
    await vol.resize(n)
    await vol.write(40, pattern(2, 40, 4, SS), fua=True)  # past the shrink: on both layers
    await vol.resize(2 * n)
    await vol.write(100, pattern(3, 100, 4, SS), fua=True)  # past the old size
    expected = bytearray(2 * n * SS)
    expected[: 16 * SS] = pattern(1, 0, 16, SS)
    expected[40 * SS : 44 * SS] = pattern(2, 40, 4, SS)
    expected[100 * SS : 104 * SS] = pattern(3, 100, 4, SS)
    assert (await vol.read(0, 2 * n))[0] == expected
    assert [e.layer.sector_count for e in vol.entries[:2]] == [2 * n, 2 * n]
    await vol.close()
    vol = await open_stack(None)  # the size it has now is recorded
    assert vol.sector_count == 2 * n
    assert (await vol.read(0, 2 * n))[0] == expected
    assert vol.inspect()["layers"][2]["visible_sector_count"] == 16


async def test_resize_refused_when_a_write_through_layer_cannot(volumes: VolumeOpener) -> None:
    top, lower = MapLayer(8), MapLayer(8, resizable=False)
    vol = await volumes(entry(top, wt=True), lower)
    with pytest.raises(NotSupported, match="layer 1"):
        await vol.resize(16)
    assert vol.sector_count == 8 and vol.generation == 0
    assert top.ops("resize") == [] and lower.ops("resize") == []


class _SmallTop(MapLayer):
    """A layer that cannot grow past 100 sectors (its storage is out of space)."""

    async def resize(self, sector_count: int) -> None:
        if sector_count > 100:
            raise NoSpace("no room")
        await super().resize(sector_count)


class _FullLayer(MapLayer):
    """A layer whose storage is full: every write and unmap is out of space."""

    async def write(self, data: memoryview, sector: int, fua: bool) -> None:
        raise NoSpace("full")

    async def unmap(
        self, sector: int, count: int, block_level_only: bool, next_is_zero: bool
    ) -> None:
        raise NoSpace("full")


async def test_no_space_below_a_layer_that_took_the_write_is_a_storage_error(
    volumes: VolumeOpener,
) -> None:
    """RESOURCE_EXHAUSTED says nothing changed (DESIGN.md §2): when the top took a write
    (or unmap) that a write-through layer below had no space for, it is a StorageError;
    out of space at the top, before anything changed, is still NoSpace."""
    top = MapLayer(8)
    vol = await volumes(entry(top, wt=True), _FullLayer(8))
    with pytest.raises(StorageError, match="made in part") as caught:
        await vol.write(2, p(1, 2))
    assert not isinstance(caught.value, NoSpace)
    assert top.data == {2: p(1, 2)}
    with pytest.raises(StorageError, match="unmap was made in part"):
        await vol.unmap(2, 1)
    vol = await volumes(_FullLayer(8))
    with pytest.raises(NoSpace):
        await vol.write(2, p(1, 2))


class _FailingBelow(MapLayer):
    """A write-path layer whose writes and unmaps fail with :attr:`failure` while it is set
    (a file past its size limit, a tier whose origin is down)."""

    def __init__(self, sectors: int, **kwargs: Any) -> None:
        super().__init__(sectors, **kwargs)
        self.failure: Exception | None = None

    async def write(self, data: memoryview, sector: int, fua: bool) -> None:
        if self.failure is not None:
            raise self.failure
        await super().write(data, sector, fua)

    async def fill_runs(
        self, data: memoryview, sector: int, runs: list[Run], *, callers: bool = False
    ) -> int:
        if self.failure is not None:
            raise self.failure
        return await super().fill_runs(data, sector, runs, callers=callers)

    async def unmap(
        self, sector: int, count: int, block_level_only: bool, next_is_zero: bool
    ) -> None:
        if self.failure is not None:
            raise self.failure
        await super().unmap(sector, count, block_level_only, next_is_zero)


@pytest.mark.parametrize(
    "failure",
    [StorageError("write: File too large"), Unavailable("the origin is down"), NoSpace("full")],
    ids=["storage", "unavailable", "no-space"],
)
@pytest.mark.parametrize("op", ["write", "no_overwrite", "unmap"])
async def test_a_change_a_lower_layer_failed_is_dropped_from_the_layers_above(
    volumes: VolumeOpener, failure: Exception, op: str
) -> None:
    """A write-through ``ram`` top (or a read cache of a tier) over a layer that fails the
    write: the top took it, then drops it again, so reads show what the layer below holds,
    and a flush, a restart of the top or a rebuilt cache changes nothing a reader sees (it
    returned the failed write's bytes, then lost them at the next start). The layer's own
    error is raised as it is: nothing changed (``UNAVAILABLE`` is retried by clients; out
    of space says nothing changed)."""
    top = ram(8)
    below = _FailingBelow(8)
    vol = await volumes(entry(top, wt=True), below)
    await vol.write(2, p(1, 2))  # on both
    below.failure = failure
    with pytest.raises(type(failure)) as caught:
        if op == "write":
            await vol.write(2, p(2, 2) + p(2, 3))
        elif op == "no_overwrite":
            await vol.write(4, p(2, 4), no_overwrite=True)  # (a hole in both)
        else:
            await vol.unmap(2, 2)
    assert caught.value is failure
    # what the layer below holds: the first write, and holes
    expected = p(1, 2) + bytes(SS) if op != "no_overwrite" else bytes(SS)
    at = 2 if op != "no_overwrite" else 4
    assert (await vol.read(at, len(expected) // SS))[0] == expected
    # the top dropped what it took (and what it mirrored of the layer below there)
    assert await top.presence(0, 8) == ([(2, 3)] if op == "no_overwrite" else [])
    below.failure = None
    await vol.flush()
    assert (await vol.read(at, len(expected) // SS))[0] == expected


async def test_a_failed_grow_shrinks_the_write_through_layers_back(
    volumes: VolumeOpener,
) -> None:
    top, lower = _SmallTop(16), MapLayer(16)
    vol = await volumes(entry(top, wt=True), lower)
    with pytest.raises(NoSpace):
        await vol.resize(200)
    assert vol.sector_count == 16 and vol.generation == 0
    assert lower.ops("resize") == [("resize", 200), ("resize", 16)]
    assert lower.sector_count == 16


async def test_s52_wait_resize(volumes: VolumeOpener) -> None:
    vol = await volumes(ram(8))
    gen = vol.generation
    waiter = asyncio.create_task(vol.resize_events(gen))
    await asyncio.sleep(0)
    assert not waiter.done()
    await vol.resize(12)
    assert await asyncio.wait_for(waiter, 5) == [(gen + 1, 12)]
    assert await vol.resize_events(gen) == [(gen + 1, 12)], "returns at once when behind"


async def test_resize_events_list_every_change_in_order(volumes: VolumeOpener) -> None:
    """Several resizes in a row are as many events, oldest first, one generation apart, for
    a watcher behind by any number of them: a shrink then a grow is never seen as the grow
    alone (a remote top following this volume would keep showing lower data past the
    shrink). Resizing to the size it has is no event."""
    vol = await volumes(ram(100))
    gen = vol.generation
    for size in (50, 80, 60):
        assert await vol.resize(size) == size
    assert await vol.resize(60) == 60
    events = [(gen + 1, 50), (gen + 2, 80), (gen + 3, 60)]
    assert vol.generation == vol.inspect()["generation"] == gen + 3
    for behind in range(3):
        assert await vol.resize_events(gen + behind) == events[behind:]
    watcher = asyncio.create_task(vol.resize_events(gen + 3))
    await asyncio.sleep(0)
    assert not watcher.done()
    await vol.resize(70)
    assert await asyncio.wait_for(watcher, 5) == [(gen + 4, 70)]


async def test_smallest_sector_count_is_lowered_by_a_shrink_and_never_raised(
    volumes: VolumeOpener,
) -> None:
    """:attr:`Volume.smallest_sector_count` (inspect's ``smallest_sector_count``, which a
    ``remote`` top of this volume takes at attach) follows every shrink, through
    :meth:`Volume.resize` or by the top on its own, and a grow never raises it."""
    top = MapLayer(100)
    vol = await volumes(top, ram(100))
    assert vol.smallest_sector_count == 100
    await vol.resize(150)
    assert vol.smallest_sector_count == 100, "a grow does not raise it"
    await vol.resize(40)
    assert vol.smallest_sector_count == 40
    await vol.resize(100)
    assert vol.smallest_sector_count == vol.inspect()["smallest_sector_count"] == 40
    await vol.resize(60)  # smaller than now, not than the smallest
    assert vol.smallest_sector_count == 40
    await top.resize(30)  # the top shrinks on its own (a remote top following its origin)
    await top.resize(100)
    assert vol.smallest_sector_count == vol.inspect()["smallest_sector_count"] == 30
    assert vol.inspect()["layers"][1]["visible_sector_count"] == 30


async def test_s53_top_resized_by_itself_reaches_volume_watchers(volumes: VolumeOpener) -> None:
    """U4/U5: a top layer that changes size on its own (a remote top following its remote)
    wakes the volume's watchers."""
    top = MapLayer(8)
    vol = await volumes(top, full(8))
    waiter = asyncio.create_task(vol.resize_events(vol.generation))
    await top.resize(16)
    assert await asyncio.wait_for(waiter, 5) == [(1, 16)]
    assert vol.sector_count == 16
    assert await sectors_of(vol, 7, 2) == [c(7), ZERO]


async def test_s50_top_shrunk_and_grown_by_itself_lowers_the_overlap(volumes: VolumeOpener) -> None:
    """The shrink-then-grow rule holds even when the top changes size twice before the
    volume's watcher runs: the overlap must see the shrink."""
    top = MapLayer(8)
    vol = await volumes(top, full(8))
    await top.resize(4)
    await top.resize(8)  # the volume's resize listener saw both, synchronously
    assert await sectors_of(vol, 0, 8) == [c(s) for s in range(4)] + [ZERO] * 4
    assert vol.generation == 2


async def test_s54_u_ram_grown_ram_keeps_data_past_its_old_size(volumes: VolumeOpener) -> None:
    n = 64
    vol = await volumes(ram(n))
    await vol.resize(2 * n)
    await write(vol, n + 5, p(0xE, n + 5))
    assert await sectors_of(vol, n + 5, 1) == [p(0xE, n + 5)]
    # and after a tail unmap
    await vol.unmap(n // 2, n // 2)
    await write(vol, n // 2 + 1, p(0xF, 1))
    assert await sectors_of(vol, n // 2, 2) == [ZERO, p(0xF, 1)]


async def test_s54_grow_past_the_mapping(volumes: VolumeOpener) -> None:
    vol = await volumes(ram(8))
    await vol.write(0, pattern(1, 0, 8, SS))
    await vol.resize(100_000)
    await write(vol, 99_999, p(2, 99_999))
    assert await sectors_of(vol, 0, 8) == [p(1, s) for s in range(8)]
    assert await sectors_of(vol, 99_998, 2) == [ZERO, p(2, 99_999)]


async def test_s55_grown_top_never_shows_lower_data(volumes: VolumeOpener) -> None:
    n = 32
    lower = full(2 * n)
    vol = await volumes(ram(n), lower)
    await vol.resize(2 * n)
    assert await sectors_of(vol, 0, 2 * n) == [c(s) for s in range(n)] + [ZERO] * n
    assert lower.ops("read") == [("read", 0, n)]


async def test_raw_top_resize(volumes: VolumeOpener, tmp_path: Path) -> None:
    vol = await volumes(RawLayer(str(tmp_path / "img"), size=16 * SS))
    await vol.write(0, pattern(1, 0, 16, SS))
    await vol.resize(8)
    await vol.resize(16)
    assert await sectors_of(vol, 6, 4) == [p(1, 6), p(1, 7), ZERO, ZERO]
    assert (tmp_path / "img").stat().st_size == 16 * SS


# -- allocation, present zeros, inspect ----------------------------------------------------------


async def test_s56_present_zeros_hide_lower_data(volumes: VolumeOpener) -> None:
    top = ram(8)
    vol = await volumes(top, full(8))
    await vol.write(3, ZERO)
    assert await sectors_of(vol, 2, 3) == [c(2), ZERO, c(4)]
    assert await vol.allocation(0, 8) == [(0, 3, 1), (3, 4, 0), (4, 8, 1)]


async def test_allocation_and_read_presence_agree(volumes: VolumeOpener) -> None:
    vol = await volumes(MapLayer(20, data={1: p(1, 1), 2: p(1, 2)}), MapLayer(12, data={5: c(5)}))
    alloc = await vol.allocation(0, 20)
    assert alloc == [(0, 1, -1), (1, 3, 0), (3, 5, -1), (5, 6, 1), (6, 20, -1)]
    _, present = await vol.read(0, 20)
    assert present == [(1, 3), (5, 6)]
    assert await vol.allocation(2, 2) == [(2, 3, 0), (3, 4, -1)]


class _SplitPresence(MapLayer):
    """Reports each run it holds as two touching runs (as a ``remote`` layer's chunked
    GetAllocation can)."""

    async def presence(self, sector: int, count: int) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        for a, b in await super().presence(sector, count):
            middle = (a + b) // 2
            runs.extend([(a, middle), (middle, b)] if b - a > 1 else [(a, b)])
        return runs


async def test_allocation_joins_touching_runs_of_one_depth(volumes: VolumeOpener) -> None:
    """Runs a layer reports in pieces come out joined (the docstring's promise: the
    replies of GetAllocation, ``tierdisk map`` and NBD block status stay short)."""
    top = _SplitPresence(16, data={s: p(1, s) for s in range(2, 8)})
    vol = await volumes(top, _SplitPresence(12, full=c))
    assert await top.presence(0, 16) == [(2, 5), (5, 8)]
    assert await vol.allocation(0, 16) == [(0, 2, 1), (2, 8, 0), (8, 12, 1), (12, 16, -1)]


async def test_inspect_tree(volumes: VolumeOpener, tmp_path: Path) -> None:
    vol = await volumes(
        entry(ram(8), rc=True), RawLayer(str(tmp_path / "img"), size=16 * SS), name="v"
    )
    await vol.read(0, 4)
    tree = vol.inspect()
    assert (tree["name"], tree["sector_size"], tree["sector_count"], tree["read_only"]) == (
        "v",
        SS,
        8,
        False,
    )
    top, raw = tree["layers"]
    assert (top["index"], top["kind"], top["read_cache"], top["write_through"]) == (
        0,
        "ram",
        True,
        False,
    )
    assert (top["sector_count"], top["visible_sector_count"], top["present_sectors"]) == (8, 8, 4)
    assert (raw["index"], raw["kind"], raw["sector_count"], raw["visible_sector_count"]) == (
        1,
        "raw",
        16,
        8,
    )
    assert raw["present_sectors"] == 16 and raw["path"] == str(tmp_path / "img")
    assert top["counters"]["cache_fills"] == 4


class LostWatchLayer(MapLayer):
    """A top whose size watch fails (a remote top whose origin went away); :attr:`failed`
    is set once it has."""

    def __init__(self, sector_count: int) -> None:
        super().__init__(sector_count)
        self.failed = asyncio.Event()

    async def wait_resize(self, sector_count: int) -> int:
        await asyncio.sleep(0)
        self.failed.set()
        raise Unavailable("origin unreachable")


async def test_s53_a_failing_size_watch_does_not_break_the_volume() -> None:
    top = LostWatchLayer(8)
    vol = await Volume.open("v", [entry(top), entry(full(8))])
    await asyncio.wait_for(top.failed.wait(), 10)  # the volume's size watch failed
    await top.resize(4)  # still seen: the overlap follows
    await top.resize(8)
    assert await sectors_of(vol, 0, 8) == [c(s) for s in range(4)] + [ZERO] * 4
    await vol.close()  # does not raise


# -- ordering of writes against each other and against a shrink --------------------------------


class _Gated(MapLayer):
    """A layer whose next write waits for :attr:`hold` (an event) when one is set."""

    hold: asyncio.Event | None = None

    async def write(self, data: memoryview, sector: int, fua: bool) -> None:
        hold, self.hold = self.hold, None
        if hold is not None:
            await hold.wait()
        await super().write(data, sector, fua)


async def _spin() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_overlapping_writes_reach_every_write_through_layer_in_one_order(
    volumes: VolumeOpener,
) -> None:
    """A second write of the same sectors waits until the first has reached every layer
    of the write path; else the top could end with the second and the durable layer
    below with the first (DESIGN.md §3: never an older value after a write was
    acknowledged, also after a restart)."""
    top, lower = MapLayer(8), _Gated(8)
    vol = await volumes(entry(top, wt=True), lower)
    gate = lower.hold = asyncio.Event()
    first = asyncio.create_task(vol.write(2, p(1, 2)))
    await _spin()  # the first is on the top, its write below held
    second = asyncio.create_task(vol.write(2, p(2, 2)))
    await _spin()
    assert top.data == {2: p(1, 2)} and not second.done()
    gate.set()
    await asyncio.gather(first, second)
    assert top.data == lower.data == {2: p(2, 2)}


class _GatedChanges(_Gated):
    """As :class:`_Gated`, and its next unmap or no-overwrite write waits for :attr:`hold`
    too; :attr:`entered` is set when a change reaches it."""

    def __init__(self, sectors: int) -> None:
        super().__init__(sectors)
        self.entered = asyncio.Event()

    async def _held(self) -> None:
        self.entered.set()
        hold, self.hold = self.hold, None
        if hold is not None:
            await hold.wait()

    async def write(self, data: memoryview, sector: int, fua: bool) -> None:
        await self._held()
        await MapLayer.write(self, data, sector, fua)

    async def write_no_overwrite(self, data: memoryview, sector: int) -> int:
        await self._held()
        return await super().write_no_overwrite(data, sector)

    async def unmap(
        self, sector: int, count: int, block_level_only: bool, next_is_zero: bool
    ) -> None:
        await self._held()
        await super().unmap(sector, count, block_level_only, next_is_zero)


class _Hung(MapLayer):
    """A map layer whose writes and unmaps wait for :attr:`gate` (a tier that hangs);
    :attr:`arrived` counts the changes that reached it."""

    def __init__(self, sectors: int) -> None:
        super().__init__(sectors)
        self.gate = asyncio.Event()
        self.arrived = 0

    async def write(self, data: memoryview, sector: int, fua: bool) -> None:
        self.arrived += 1
        await self.gate.wait()
        await super().write(data, sector, fua)

    async def unmap(
        self, sector: int, count: int, block_level_only: bool, next_is_zero: bool
    ) -> None:
        self.arrived += 1
        await self.gate.wait()
        await super().unmap(sector, count, block_level_only, next_is_zero)


@pytest.mark.parametrize("change", ["write", "write_at", "unmap"])
async def test_changes_left_running_by_callers_who_went_are_bounded(
    volumes: VolumeOpener,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    change: str,
) -> None:
    """Callers giving up on a write-path layer that hangs leave their changes running
    (they run to their end); once those hold LEFT_RUNNING_LIMIT bytes, a new change waits
    before it starts, holding nothing (its caller may leave, with nothing written), and
    goes on when they end. Inspect shows what is left running."""
    monkeypatch.setattr(volume_module, "LEFT_RUNNING_LIMIT", 4 * LEFT_RUNNING_MIN_BYTES)
    top, lower = MapLayer(16), _Hung(16)
    vol = await volumes(entry(top, wt=True), lower)
    gone = [asyncio.ensure_future(vol.write(s, p(1, s))) for s in range(4)]
    await _spin()
    assert lower.arrived == 4
    for task in gone:
        task.cancel()
    await _spin()
    assert vol.inspect()["left_running"] == {"changes": 4, "bytes": 4 * LEFT_RUNNING_MIN_BYTES}
    calls: dict[str, Callable[[], Awaitable[None]]] = {
        "write": lambda: vol.write(8, p(2, 8)),
        "write_at": lambda: vol.write_at(8 * SS + 1, b"xy"),
        "unmap": lambda: vol.unmap(8, 1),
    }
    top.data[8] = p(3, 8)  # so an unmap that ran would show
    with caplog.at_level(logging.WARNING):
        waiting = asyncio.ensure_future(calls[change]())
        await _spin()
    assert not waiting.done() and lower.arrived == 4  # not started
    assert "writes or unmaps whose callers left still run down the write path" in caplog.text
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert top.data[8] == p(3, 8) and 8 not in lower.data  # it left nothing behind
    then = asyncio.ensure_future(calls[change]())
    await _spin()
    assert lower.arrived == 4
    lower.gate.set()
    await then  # room once those left running end
    for task in gone:
        with pytest.raises(asyncio.CancelledError):
            await task
    assert vol.inspect()["left_running"] == {"changes": 0, "bytes": 0}
    expected = {"write": p(2, 8), "write_at": p(3, 8)[:1] + b"xy" + p(3, 8)[3:], "unmap": ZERO}
    data, _ = await vol.read(8, 1)
    assert bytes(data) == expected[change]
    assert all(top.data[s] == lower.data[s] == p(1, s) for s in range(4))


@pytest.mark.parametrize("change", ["write", "write_at", "fill", "unmap"])
async def test_a_change_cancelled_between_write_path_layers_reaches_every_layer(
    volumes: VolumeOpener, change: str
) -> None:
    """A write, a misaligned write, a no-overwrite write or an unmap whose caller is
    cancelled (its deadline, a stop) while the top has it and the durable layer below does
    not yet runs on to that layer: the cancel is raised only then. Cut off between them,
    the top would return what the durable layer never got, and after the top is lost (a
    ``ram`` top at a restart) the older value again."""
    top, lower = MapLayer(8), _GatedChanges(8)
    vol = await volumes(entry(top, wt=True), lower)
    await vol.write(2, p(1, 2) + p(1, 3))
    gate = lower.hold = asyncio.Event()
    lower.entered.clear()
    calls: dict[str, Callable[[], Awaitable[None]]] = {
        "write": lambda: vol.write(2, p(2, 2)),
        "write_at": lambda: vol.write_at(2 * SS + 10, b"N" * SS),
        "fill": lambda: vol.write(4, p(2, 4), no_overwrite=True),
        "unmap": lambda: vol.unmap(2, 2),
    }
    running = asyncio.ensure_future(calls[change]())
    await lower.entered.wait()
    running.cancel()
    await _spin()
    assert not running.done()  # the cancel waits for the layer below
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await running
    if change == "unmap":  # the top keeps zeros present over the lower layer; it drops them
        assert top.data == {2: ZERO, 3: ZERO} and lower.data == {}
    else:
        assert top.data == lower.data != {2: p(1, 2), 3: p(1, 3)}


async def test_a_change_that_fails_below_after_its_caller_went_is_logged(
    volumes: VolumeOpener, caplog: pytest.LogCaptureFixture
) -> None:
    """The write runs on past its caller's cancel and then fails in the layer below: nobody
    is told but the log (the top holds what the layer below does not)."""

    class _Failing(_GatedChanges):
        async def write(self, data: memoryview, sector: int, fua: bool) -> None:
            await self._held()
            raise StorageError("disk gone")

    top, lower = MapLayer(8), _Failing(8)
    vol = await volumes(entry(top, wt=True), lower)
    gate = lower.hold = asyncio.Event()
    running = asyncio.ensure_future(vol.write(2, p(2, 2)))
    await lower.entered.wait()
    running.cancel()
    await _spin()
    gate.set()
    with caplog.at_level(logging.WARNING), pytest.raises(asyncio.CancelledError):
        await running
    assert "whose caller had gone failed on the write path (disk gone)" in caplog.text
    # callers giving up on a layer that hangs, one failure per write: one line per 10 s
    gate.clear()
    lower.entered.clear()
    more = [asyncio.ensure_future(vol.write(2 + i % 4, p(2 + i % 4, 1))) for i in range(20)]
    await lower.entered.wait()
    for task in more:
        task.cancel()
    await _spin()
    gate.set()
    with caplog.at_level(logging.WARNING):
        await asyncio.gather(*more, return_exceptions=True)
    lines = [r for r in caplog.records if "whose caller had gone" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]


async def test_a_shrink_waits_for_writes_into_the_sectors_it_cuts(
    volumes: VolumeOpener,
) -> None:
    """A write running past the new end finishes before the shrink (which then discards
    it), and one arriving while the shrink waits finds the range gone: grown again, the
    volume reads zeros there, and no layer holds data past its size."""
    top = _Gated(8)
    vol = await volumes(top)
    gate = top.hold = asyncio.Event()
    running = asyncio.create_task(vol.write(6, p(1, 6)))
    await _spin()
    shrink = asyncio.create_task(vol.resize(4))
    await _spin()
    late = asyncio.create_task(vol.write(5, p(2, 5)))
    await _spin()
    assert not shrink.done() and not late.done()
    gate.set()
    await running
    assert await shrink == 4
    with pytest.raises(OutOfRange):
        await late
    assert top.data == {}
    await vol.resize(8)
    assert await sectors_of(vol, 4, 4) == [ZERO] * 4


class _GatedResize(MapLayer):
    """A layer whose next resize waits for :attr:`hold` (an event) when one is set, and
    whose resizes fail with :attr:`fail` (an exception) when one is set."""

    hold: asyncio.Event | None = None
    fail: Exception | None = None

    async def resize(self, sector_count: int) -> None:
        hold, self.hold = self.hold, None
        if hold is not None:
            await hold.wait()
        if self.fail is not None:
            raise self.fail
        await super().resize(sector_count)


async def test_requests_that_waited_for_a_shrink_are_refused_before_any_layer(
    volumes: VolumeOpener,
) -> None:
    """A write, an unmap and a misaligned write (read-modify-write) that waited while a
    shrink cut their sectors are refused by the volume (OUT_OF_RANGE naming it: the range
    is checked again after the wait), and the layer is never asked past its new end
    (layer.py: the engine checks ranges before it calls a layer, which may rely on it)."""
    top = _GatedResize(8)
    vol = await volumes(top)
    gate = top.hold = asyncio.Event()
    shrink = asyncio.create_task(vol.resize(4))
    await _spin()  # it holds sectors [4, ...) exclusive; the top's resize waits
    queued = [
        asyncio.create_task(vol.write(5, p(1, 5))),
        asyncio.create_task(vol.unmap(4, 2)),
        # reads sector 3 (still there), then writes sectors [3, 5)
        asyncio.create_task(vol.write_at(3 * SS + 100, b"N" * (2 * SS - 100))),
    ]
    await _spin()
    assert not shrink.done() and not any(task.done() for task in queued)
    gate.set()
    assert await shrink == 4
    for task in queued:
        with pytest.raises(OutOfRange, match=r"^volume 'vol': sectors \[\d+, \d+\) reach past"):
            await task
    assert top.ops("write") == top.ops("unmap") == []
    assert top.data == {}


async def test_resizes_run_one_at_a_time(volumes: VolumeOpener) -> None:
    """Two resizes at once end with every write-path layer at the same size (the last
    one's), never the top at one size and the layer below at the other."""
    top, lower = MapLayer(100), _GatedResize(100)
    vol = await volumes(entry(top, wt=True), lower)
    gate = lower.hold = asyncio.Event()
    first = asyncio.create_task(vol.resize(300))
    await _spin()
    second = asyncio.create_task(vol.resize(50))
    await _spin()
    gate.set()
    assert await first == 300 and await second == 50
    assert top.sector_count == lower.sector_count == vol.sector_count == 50


async def test_a_shrink_that_fails_below_the_top_leaves_reads_working(
    volumes: VolumeOpener,
) -> None:
    """The top shrank, the layer below could not: the volume has the new size (INTERNAL:
    made in part), and what lay past it reads as zeros after a grow, though the layer below
    still holds it (the overlaps hide it, DESIGN.md §3)."""
    top, lower = MapLayer(200), _GatedResize(200)
    vol = await volumes(entry(top, wt=True), lower)
    await vol.write(150, p(1, 150))
    await vol.write(20, p(2, 20))
    lower.fail = NoSpace("no room")
    with pytest.raises(StorageError, match="made in part") as info:  # not "nothing changed"
        await vol.resize(100)
    assert not isinstance(info.value, NoSpace)
    assert vol.sector_count == 100 and top.sector_count == 100 and lower.sector_count == 200
    lower.fail = None
    await vol.resize(200)
    assert await sectors_of(vol, 150, 1) == [ZERO]
    assert await sectors_of(vol, 20, 1) == [p(2, 20)]
