"""The ``sparse`` layer: the shared persistent-layer contract, plus its files on disk.

A *crash image* here is a copy of the layer's two files taken while it is open: what the
files hold at that moment is exactly what a SIGKILL would leave (the page cache survives a
process crash), so these tests can check deterministically what reaches the presence map
and when. tests/test_persistent_crash.py kills real processes instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import random
import shutil
import signal
import struct
import sys
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from persistent_contract import SIZE, SS, PersistentLayerContract, tiny_filesystem
from stacks import pattern
from tools import file_size_limit
from waiting import eventually

from tierdisk.service import fileio
from tierdisk.service.errors import (
    ConfigError,
    DataCorruption,
    NoSpace,
    OutOfRange,
    StorageError,
    Unavailable,
)
from tierdisk.service.layer import Layer
from tierdisk.service.layers import sparse as sparse_module
from tierdisk.service.layers import sparse_log
from tierdisk.service.layers.ram import RamLayer
from tierdisk.service.layers.raw import RawLayer
from tierdisk.service.layers.sparse import IDLE_LOOK_SECONDS, SparseLayer
from tierdisk.service.layers.sparse_map import HEADER_SIZE
from tierdisk.service.volume import LayerEntry, Volume

SNAP_EMPTY = 40  # bytes of a SNAP record with no runs (36-byte head, crc32)
RUN = 16  # bytes per run in a record


class TestSparseContract(PersistentLayerContract):
    layer_class = SparseLayer

    def hold_shrink(
        self, layer: Layer, monkeypatch: pytest.MonkeyPatch, fail: bool
    ) -> tuple[threading.Event, threading.Event]:
        held = _HeldSync(monkeypatch)  # the shrink's commit syncs the data file first
        held.fail = fail
        return held.entered, held.go


def crash_image(path: Path, dest: Path) -> Path:
    """Copy the layer's files as they are now (the state a SIGKILL would leave)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, dest)
    shutil.copyfile(f"{path}.map", f"{dest}.map")
    return dest


async def opened(path: Path, size: int | None = None) -> SparseLayer:
    layer = SparseLayer(str(path), size=size)
    await layer.attach(None)
    return layer


async def read(layer: Layer, sector: int, count: int) -> tuple[bytes, list[tuple[int, int]]]:
    buf = bytearray(b"\xee" * count * layer.sector_size)
    runs = await layer.read(memoryview(buf), sector)
    return bytes(buf), runs


def map_size(path: Path) -> int:
    return os.stat(f"{path}.map").st_size


def map_version(path: Path) -> int:
    """The format version in the map's header (after the 8-byte magic)."""
    with open(f"{path}.map", "rb") as f:
        return int.from_bytes(f.read(12)[8:], "little")


def is_hole(path: Path, offset: int, length: int) -> bool:
    """Whether ``[offset, offset + length)`` of the file holds no data blocks."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError as exc:  # ENXIO: no data from offset to the end
        assert exc.errno == errno.ENXIO
        return True
    finally:
        os.close(fd)


def exists(name: str) -> bool:
    return os.path.exists(name)


def put(name: str, data: bytes) -> None:
    with open(name, "wb") as f:
        f.write(data)


# -- what reaches the map, and when ------------------------------------------------------------


async def test_presence_reaches_the_map_only_at_flush_or_fua(tmp_path: Path) -> None:
    path = tmp_path / "d"
    layer = await opened(path, SIZE)
    try:
        await layer.write(memoryview(pattern(1, 0, 4, SS)), 0, False)
        image = await opened(crash_image(path, tmp_path / "i1"))
        assert await image.presence(0, 256) == []  # written, not flushed: not claimed
        await image.close()

        await layer.flush()
        image = await opened(crash_image(path, tmp_path / "i2"))
        data, runs = await read(image, 0, 4)
        assert runs == [(0, 4)] and data == pattern(1, 0, 4, SS)
        await image.close()

        await layer.write(memoryview(pattern(2, 10, 2, SS)), 10, True)  # fua: durable now
        await layer.write(memoryview(pattern(3, 20, 2, SS)), 20, False)
        await layer.unmap(0, 4, False, True)
        image = await opened(crash_image(path, tmp_path / "i3"))
        data, runs = await read(image, 0, 32)
        # the unmap is not in the map yet, but its hole is: sectors 0-3 read as zeros,
        # the later acknowledged state; sector 20 was never flushed
        assert runs == [(0, 4), (10, 12)]
        assert data[: 4 * SS] == bytes(4 * SS)
        assert data[10 * SS : 12 * SS] == pattern(2, 10, 2, SS)
        await image.close()
    finally:
        await layer.close()


async def test_close_compacts_the_map_into_one_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "d"
    layer = await opened(path, SIZE)
    for i in range(5):
        await layer.write(memoryview(pattern(i, i * 10, 2, SS)), i * 10, False)
        await layer.flush()
    assert map_size(path) > HEADER_SIZE + SNAP_EMPTY + 5 * RUN
    await layer.close()
    assert map_size(path) == HEADER_SIZE + SNAP_EMPTY + 5 * RUN
    assert not exists(f"{path}.map.tmp")


async def test_compaction_keeps_the_map_small_and_right(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sparse_module, "COMPACT_MIN_BYTES", 256)
    path = tmp_path / "d"
    rng = random.Random(7)
    model: set[int] = set()
    layer = await opened(path, SIZE)
    try:
        for i in range(300):
            s = rng.randrange(0, 255)
            if rng.random() < 0.3:
                await layer.unmap(s, 2, False, True)
                model -= {s, s + 1}
            else:
                await layer.write(memoryview(pattern(i, s, 1, SS)), s, False)
                model.add(s)
            await layer.flush()
            snapshot = HEADER_SIZE + SNAP_EMPTY + layer.inspect()["present_runs"] * RUN
            assert map_size(path) <= 3 * snapshot + 512  # compaction bounds the log
        crash = crash_image(path, tmp_path / "img")  # a compacted map with a log after it
    finally:
        await layer.close()
    for where in (path, crash):
        again = await opened(where)
        try:
            present = {s for a, b in await again.presence(0, 256) for s in range(a, b)}
            assert present == model
        finally:
            await again.close()


async def test_a_compaction_does_not_follow_a_symlink_at_its_file(tmp_path: Path) -> None:
    """A symlink put at ``PATH.map.tmp`` while the layer runs is refused, not followed:
    the file it points to is not overwritten with the map (the compaction fails, and the
    map's log keeps every change)."""
    path = tmp_path / "d"
    victim = tmp_path / "victim"
    victim.write_bytes(b"not yours")
    layer = await opened(path, SIZE)
    try:
        for i in range(3):
            await layer.write(memoryview(pattern(i, i * 10, 2, SS)), i * 10, False)
            await layer.flush()
        os.symlink(victim, f"{path}.map.tmp")
    finally:
        await layer.close()
    assert victim.read_bytes() == b"not yours"
    again = await opened(path)
    try:
        assert await again.presence(0, 40) == [(0, 2), (10, 12), (20, 22)]
    finally:
        await again.close()


async def test_a_leftover_compaction_file_is_removed_at_open(tmp_path: Path) -> None:
    path = tmp_path / "d"
    await (await opened(path, SIZE)).close()
    put(f"{path}.map.tmp", b"half a compaction")
    layer = await opened(path)
    await layer.close()
    assert not exists(f"{path}.map.tmp")


# -- a damaged map --------------------------------------------------------------------------


async def three_flushes(tmp_path: Path) -> tuple[Path, list[int]]:
    """A crash image whose map is a snapshot and three DIFF records (sectors 0, 1, 2
    written one per flush); returns it and the offsets where each DIFF starts."""
    path = tmp_path / "live"
    layer = await opened(path, SIZE)
    offsets = []
    try:
        for i in range(3):
            offsets.append(map_size(path))
            await layer.write(memoryview(pattern(i, i * 8, 1, SS)), i * 8, False)
            await layer.flush()
        image = crash_image(path, tmp_path / "img" / "d")
    finally:
        await layer.close()
    return image, offsets


def damage(path: Path, offset: int, *, truncate: bool = False) -> None:
    with open(f"{path}.map", "r+b") as f:
        if truncate:
            f.truncate(offset)
        else:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0x40]))


@pytest.mark.parametrize("how", ["truncated mid-record", "flipped byte"])
async def test_a_torn_last_record_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    image, offsets = await three_flushes(tmp_path)
    last = offsets[2]
    if how == "truncated mid-record":
        damage(image, last + 20, truncate=True)
    else:
        damage(image, map_size(image) - 10)  # inside the last record's runs
    with caplog.at_level(logging.WARNING, logger="tierdisk.service.layers.sparse"):
        layer = await opened(image)
    try:
        assert await layer.presence(0, 256) == [(0, 1), (8, 9)]  # as of the second flush
        assert any(
            "torn" in r.getMessage() and str(image) in r.getMessage() for r in caplog.records
        )
        assert map_size(image) == last  # the tail was cut off
        await layer.write(memoryview(pattern(7, 30, 1, SS)), 30, False)
        await layer.flush()
        crash = crash_image(image, tmp_path / "after" / "d")  # appending after the cut works
    finally:
        await layer.close()
    again = await opened(crash)
    try:
        assert await again.presence(0, 256) == [(0, 1), (8, 9), (30, 31)]
    finally:
        await again.close()


async def test_a_corrupt_header_is_refused(tmp_path: Path) -> None:
    image, _ = await three_flushes(tmp_path)
    damage(image, 13)  # inside sector_size
    with pytest.raises(DataCorruption, match=rf"{image}.map: the header checksum"):
        await SparseLayer(str(image)).attach(None)
    with pytest.raises(ConfigError, match=rf"volume 'v', layer 0: .*{image}.map"):
        await Volume.open("v", [LayerEntry(SparseLayer(str(image)))])


@pytest.mark.parametrize("where", ["snapshot", "middle record"])
async def test_corruption_before_the_tail_is_refused(tmp_path: Path, where: str) -> None:
    image, offsets = await three_flushes(tmp_path)
    damage(image, HEADER_SIZE + 30 if where == "snapshot" else offsets[1] + 40)
    with pytest.raises(DataCorruption, match=rf"{image}.map"):
        await SparseLayer(str(image)).attach(None)


async def test_a_map_whose_size_is_damaged_to_a_terabyte_is_refused_not_read(
    tmp_path: Path,
) -> None:
    """A map whose size was damaged to 1 TiB (a hole past its records) is a clear refusal
    at open, never an attempt to read it all into memory (a MemoryError traceback), and
    a file that is no map at all is refused by its first bytes, however large it is."""
    image, _ = await three_flushes(tmp_path)
    os.truncate(f"{image}.map", 1 << 40)
    with pytest.raises(StorageError, match=rf"{image}.map: its 1099511627776 bytes do not fit"):
        await SparseLayer(str(image)).attach(None)
    damage(image, 0)  # its magic
    with pytest.raises(DataCorruption, match="not a tierdisk sparse presence map"):
        await SparseLayer(str(image)).attach(None)


@pytest.mark.parametrize("written_since", [True, False], ids=["written", "idle"])
@pytest.mark.parametrize("change", ["data removed", "map replaced", "data truncated"])
async def test_a_flush_fails_when_a_file_was_changed_under_the_layer(
    tmp_path: Path, change: str, written_since: bool
) -> None:
    """Someone removes, replaces or cuts short one of the layer's files while it is served:
    the next flush fails, naming the file, instead of answering OK for writes that the
    next start will not find; with nothing written since too (a flush with nothing to
    commit said OK, until the stop, when saving the file from /proc was too late)."""
    path = tmp_path / "d"
    layer = SparseLayer(str(path), size=SIZE)
    await layer.attach(None)
    try:
        await layer.write(memoryview(pattern(1, 0, 8, SS)), 0, False)
        await layer.flush()
        if change == "data removed":
            path.unlink()
        elif change == "map replaced":
            shutil.copy(f"{path}.map", tmp_path / "backup")
            os.replace(tmp_path / "backup", f"{path}.map")
        else:
            os.truncate(path, 4 * SS)
        if written_since:
            await layer.write(memoryview(pattern(2, 16, 1, SS)), 16, False)
        else:  # an idle flush looks unless a look found the files less than this ago
            await asyncio.sleep(2 * IDLE_LOOK_SECONDS)
        file = f"{path}.map" if change == "map replaced" else str(path)
        word = change.split()[1]
        with pytest.raises(StorageError, match=rf"{file} .*{word}.*may be lost"):
            await layer.flush()
        with pytest.raises(StorageError, match=rf"{file} .*{word}"):  # again: not "looked"
            await layer.flush()
        # and the last commit, at close (the server counts it as a failed final flush)
        with pytest.raises(StorageError, match=rf"the flush at close failed: .*{file}"):
            await layer.close()
    finally:
        with contextlib.suppress(StorageError):
            await layer.close()


async def test_a_map_of_another_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d"
    put(str(path), b"")
    put(f"{path}.map", b"not a map at all, just some text" * 4)
    with pytest.raises(DataCorruption, match="not a tierdisk sparse presence map"):
        await SparseLayer(str(path)).attach(None)


async def test_missing_or_mismatched_files_are_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.img"
    plain.write_bytes(b"x" * SIZE)
    with pytest.raises(ConfigError, match=rf"{plain}: the data file exists .* does not") as info:
        await SparseLayer(str(plain), size=SIZE).attach(None)
    assert "restore it" in str(info.value) and 'serve it as kind = "raw"' in str(info.value)
    assert "use it as a raw layer" not in str(info.value)  # (its holes would read as zeros)
    assert plain.read_bytes() == b"x" * SIZE  # untouched

    path = tmp_path / "d"
    layer = await opened(path, SIZE)
    await layer.write(memoryview(pattern(1, 200, 1, SS)), 200, True)
    await layer.close()
    os.truncate(path, 100 * SS)
    with pytest.raises(DataCorruption, match=rf"{path}: the data file is {100 * SS} bytes"):
        await SparseLayer(str(path)).attach(None)
    os.unlink(path)
    with pytest.raises(DataCorruption, match=rf"{path}: .*data file is missing"):
        await SparseLayer(str(path)).attach(None)


async def test_a_data_file_left_longer_by_a_crash_is_cut_back(tmp_path: Path) -> None:
    path = tmp_path / "d"
    await (await opened(path, SIZE)).close()
    os.truncate(path, 2 * SIZE)  # a grow whose record never made it
    layer = await opened(path)
    try:
        assert layer.sector_count * SS == SIZE and os.stat(path).st_size == SIZE
    finally:
        await layer.close()


# -- space on disk and scale -------------------------------------------------------------------


async def test_unmapped_sectors_give_their_disk_space_back(tmp_path: Path) -> None:
    path = tmp_path / "d"
    size = 8 << 20
    layer = await opened(path, size)
    try:
        assert os.stat(path).st_blocks * 512 < 64 << 10  # a new layer takes no space
        await layer.write(memoryview(os.urandom(4 << 20)), 0, False)
        await layer.flush()
        full = os.stat(path).st_blocks * 512
        assert full >= 4 << 20
        await layer.unmap(0, (2 << 20) // SS, False, True)  # dropped
        await layer.unmap((2 << 20) // SS, (1 << 20) // SS, False, False)  # present zeros
        await layer.flush()
        assert os.stat(path).st_blocks * 512 <= full - (3 << 20)
        assert layer.present_sectors == (2 << 20) // SS
        assert layer.inspect()["allocated_bytes"] == os.stat(path).st_blocks * 512
    finally:
        await layer.close()


async def test_a_terabyte_layer_is_cheap(tmp_path: Path) -> None:
    path = tmp_path / "big"
    tib = 1 << 40
    layer = await opened(path, tib)
    try:
        last = tib // SS - 1
        await layer.write(memoryview(pattern(1, last, 1, SS)), last, False)
        await layer.write(memoryview(pattern(2, 0, 1, SS)), 0, False)
    finally:
        await layer.close()
    layer = await opened(path)
    try:
        assert layer.sector_count == tib // SS
        data, runs = await read(layer, last, 1)
        assert runs == [(last, last + 1)] and data == pattern(1, last, 1, SS)
        info = layer.inspect()
        assert info["file_bytes"] == tib and info["allocated_bytes"] < 1 << 20
        assert info["map_bytes"] == HEADER_SIZE + SNAP_EMPTY + 2 * RUN
    finally:
        await layer.close()


async def test_a_fully_written_layer_is_one_run(tmp_path: Path) -> None:
    path = tmp_path / "d"
    layer = await opened(path, SIZE)
    chunks = list(range(0, 256, 8))
    random.Random(3).shuffle(chunks)
    try:
        for s in chunks:
            await layer.write(memoryview(pattern(s, s, 8, SS)), s, False)
        assert layer.inspect()["present_runs"] == 1
    finally:
        await layer.close()
    assert map_size(path) == HEADER_SIZE + SNAP_EMPTY + RUN


async def test_inspect_names_the_files(tmp_path: Path) -> None:
    path = tmp_path / "d"
    layer = await opened(path, SIZE)
    try:
        await layer.write(memoryview(pattern(1, 0, 1, SS)), 0, False)
        info = layer.inspect()
        assert info["path"] == str(path) and info["map_path"] == f"{path}.map"
        assert info["present_runs"] == 1 and info["unflushed_runs"] == 1
        await layer.flush()
        assert layer.inspect()["unflushed_runs"] == 0
    finally:
        await layer.close()


def version_1_map(sector_size: int, snapshot: list[tuple[int, int]], sizes: list[int]) -> bytes:
    """A presence map as the first format wrote it (records without ``smallest``): a SNAP
    of ``snapshot`` at ``sizes[0]`` sectors, then one empty DIFF per later size."""

    def sealed(blob: bytes) -> bytes:
        return blob + struct.pack("<I", zlib.crc32(blob))

    out = sealed(struct.pack("<8sIIQ", b"TDSPMAP1", 1, sector_size, sizes[0]))
    runs = b"".join(struct.pack("<qq", a, b) for a, b in snapshot)
    out += sealed(struct.pack("<4sIIQQ", b"SNAP", 0, len(snapshot), 1, sizes[0]) + runs)
    for seq, size in enumerate(sizes[1:], start=2):
        out += sealed(struct.pack("<4sIIQQ", b"DIFF", 0, 0, seq, size))
    return out


async def test_a_version_1_map_opens_and_is_rewritten_as_version_2(tmp_path: Path) -> None:
    """Maps written before the smallest size was recorded still open, with the smallest
    size their log shows (here: shrunk to 50 sectors and grown back), and the first commit
    rewrites them in the current format."""
    path = tmp_path / "old"
    data = bytearray(SIZE)
    data[: 8 * SS] = pattern(4, 0, 8, SS)
    put(str(path), bytes(data))
    put(f"{path}.map", version_1_map(SS, [(0, 8)], [SIZE // SS, 50, SIZE // SS]))
    layer = await opened(path)
    try:
        assert layer.smallest_size == 50
        got, runs = await read(layer, 0, 16)
        assert runs == [(0, 8)] and got[: 8 * SS] == pattern(4, 0, 8, SS)
        # The first commit rewrites it: a version 2 record appended to a version 1 map
        # would be taken for a torn one, and the flushed write lost at a crash.
        await layer.write(memoryview(pattern(5, 9, 1, SS)), 9, False)
        await layer.flush()
        crashed = crash_image(path, tmp_path / "crash" / "old")
        assert map_version(crashed) == 2
        after = await opened(crashed)
        try:
            assert await read(after, 9, 1) == (pattern(5, 9, 1, SS), [(9, 10)])
        finally:
            await after.close()
    finally:
        await layer.close()
    assert map_version(path) == 2
    assert map_size(path) == HEADER_SIZE + SNAP_EMPTY + 2 * RUN  # runs [0, 8) and [9, 10)
    layer = await opened(path)
    try:
        assert layer.smallest_size == 50
        assert (await read(layer, 0, 8))[0] == pattern(4, 0, 8, SS)
    finally:
        await layer.close()


async def test_a_create_that_fails_leaves_nothing_behind(tmp_path: Path) -> None:
    """A layer the filesystem cannot size (here: over the process's file size limit, as
    ``EFBIG`` from a filesystem's largest file) is a storage error naming the size
    (``tierdisk serve`` says "cannot start"), and a corrected config then creates the layer
    afresh."""
    path = tmp_path / "big"
    with file_size_limit(1 << 20), pytest.raises(StorageError, match=rf"{path} of 4194304 bytes"):
        await SparseLayer(str(path), size=4 << 20).attach(None)
    assert sorted(os.listdir(tmp_path)) == []
    layer = await opened(path, 2 << 20)
    try:
        assert layer.sector_count == (2 << 20) // SS
    finally:
        await layer.close()


async def test_a_write_cut_short_at_the_file_size_limit_says_it_was_made_in_part(
    tmp_path: Path,
) -> None:
    """A write across the process's file size limit is cut short there: the sectors below
    it that the layer held now hold the new data, so the failure is a storage error saying
    so, not :class:`NoSpace` ("changed nothing"); the sectors it covered that the layer did
    not hold stay absent."""
    layer = await opened(tmp_path / "d", SIZE)
    try:
        await layer.write(memoryview(pattern(1, 0, 6, SS)), 0, False)
        with file_size_limit(8 * SS), pytest.raises(StorageError, match="old or new") as info:
            await layer.write(memoryview(pattern(2, 4, 8, SS)), 4, False)
        assert not isinstance(info.value, NoSpace) and "file size limit" in str(info.value)
        data, runs = await read(layer, 0, 12)
        assert runs == [(0, 6)]
        assert data[: 6 * SS] == pattern(1, 0, 4, SS) + pattern(2, 4, 2, SS)
    finally:
        await layer.close()


async def test_a_read_of_sectors_being_written_waits_for_the_write(tmp_path: Path) -> None:
    """DESIGN.md §3: a read racing a write sees old or new data per sector, never a torn
    one. The kernel lets a buffered read copy a page while a write copies into it, so the
    layer keeps reads off sectors a write is storing: here the writer thread is held up,
    and a read of the sectors it will write waits for it (and returns all the new data),
    while a read of other sectors does not wait."""
    layer = await opened(tmp_path / "d", SIZE)
    try:
        await layer.write(memoryview(pattern(1, 0, 16, SS)), 0, False)
        gate = threading.Event()
        assert layer._writer is not None
        held = layer._writer.submit(gate.wait, 10)  # the writer thread is busy until set
        writing = asyncio.ensure_future(layer.write(memoryview(pattern(2, 4, 4, SS)), 4, False))
        await eventually(
            "the write to hold its sectors", lambda: layer._sectors.held_exclusive(4, 8)
        )
        other = await asyncio.wait_for(read(layer, 8, 8), 5)  # no overlap: no wait
        assert other[0] == pattern(1, 8, 8, SS)
        reading = asyncio.ensure_future(read(layer, 0, 8))
        await asyncio.sleep(0.1)  # negative check: can only pass vacuously, never fail falsely
        assert not reading.done() and not writing.done()
        gate.set()
        await asyncio.wait_for(writing, 5)
        data, runs = await asyncio.wait_for(reading, 5)
        assert runs == [(0, 8)]
        assert data == pattern(1, 0, 4, SS) + pattern(2, 4, 4, SS)
        held.result(5)
    finally:
        await layer.close()


async def _read_one(layer: Layer, sector: int) -> tuple[bytes, list[tuple[int, int]]]:
    buf = bytearray(layer.sector_size)
    runs = await layer.read(memoryview(buf), sector)
    return bytes(buf), runs


def _fill(folder: Path) -> None:
    """Write a file in ``folder`` until its filesystem is full."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for block in (b"\1" * 65536, b"\1" * 4096):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, block)
    finally:
        os.close(fd)


async def test_a_fua_write_whose_record_finds_no_space_says_it_changed_the_data(
    tmp_path: Path,
) -> None:
    """DESIGN.md §2: RESOURCE_EXHAUSTED means the request changed nothing. A FUA write to
    sectors the layer holds needs no new blocks, so its data is in place before its map
    record (here, with other pending changes) finds the filesystem full: that is a
    storage error saying so, not NoSpace."""
    ss = 4096
    with tiny_filesystem(tmp_path / "tiny", "4m") as mnt:
        layer = SparseLayer(str(mnt / "disk"), size=2 << 20, sector_size=ss)
        await layer.attach(None)
        try:
            sectors = (2 << 20) // ss
            await layer.write(memoryview(b"O" * (2 << 20)), 0, True)
            _fill(mnt)
            for s in range(0, sectors, 2):  # pending changes: the next record needs a page
                await layer.unmap(s, 1, False, True)
            _fill(mnt)
            with pytest.raises(StorageError) as caught:
                await layer.write(memoryview(b"N" * ss), 1, True)
            assert not isinstance(caught.value, NoSpace)
            assert "out of space" in str(caught.value) and "data was written" in str(caught.value)
            data, runs = await _read_one(layer, 1)
            assert runs == [(1, 2)] and data == b"N" * ss
            (mnt / "filler").unlink()
            await layer.flush()  # room again: the pending changes and the write are durable
        finally:
            await layer.close()
        again = SparseLayer(str(mnt / "disk"))
        await again.attach(None)
        try:
            data, runs = await _read_one(again, 1)
            assert runs == [(1, 2)] and data == b"N" * ss
        finally:
            await again.close()


async def test_close_commits_the_writes_under_way_and_refuses_later_ones(tmp_path: Path) -> None:
    """A write still queued on the writer thread when close begins finishes first and is
    in the final commit (it is acknowledged, so it must outlive the restart); a write
    arriving after close began is refused (UNAVAILABLE), never acknowledged and lost."""
    path = str(tmp_path / "disk")
    layer = SparseLayer(path, size=SIZE)
    await layer.attach(None)
    busy = threading.Event()
    assert layer._writer is not None
    blocker = layer._writer.submit(busy.wait, 10)  # the writer thread is busy: writes queue
    running = asyncio.create_task(layer.write(memoryview(pattern(1, 4, 2, SS)), 4, False))
    # A write holds its sectors, checks the layer is not closing and queues itself on the
    # writer thread in one step: once it holds them, it is queued (and past the check).
    await eventually("the write to be queued", lambda: layer._sectors.held_exclusive(4, 6))
    closing = asyncio.create_task(layer.close())
    await eventually("close to begin", lambda: layer._sectors.closing)
    late = asyncio.create_task(layer.write(memoryview(pattern(2, 9, 1, SS)), 9, False))
    await asyncio.sleep(0)  # one loop turn (not a delay): the late write's first step runs
    assert not closing.done()  # it waits for the queued write, which waits for the thread
    busy.set()
    blocker.result(timeout=10)
    await running  # acknowledged
    await closing
    with pytest.raises(Unavailable, match="closed"):
        await late
    again = SparseLayer(path)
    await again.attach(None)
    try:
        data, runs = await _read_one(again, 4)
        assert runs == [(4, 5)] and data == pattern(1, 4, 1, SS)
        _, runs = await _read_one(again, 9)
        assert runs == []
    finally:
        await again.close()


async def _cache_over_ab(folder: Path, sectors: int) -> tuple[SparseLayer, Volume]:
    """A volume ``[sparse read_cache, raw]`` whose raw image is ``sectors`` of 0xAB."""
    base = folder / "base.raw"
    if not base.exists():
        base.write_bytes(b"\xab" * sectors * SS)
    top = SparseLayer(str(folder / "cache"))
    volume = await Volume.open(
        "v", [LayerEntry(top, read_cache=True), LayerEntry(RawLayer(str(base)))]
    )
    return top, volume


@pytest.mark.parametrize("then", ["grow", "restart"])
async def test_a_read_cache_fill_that_waits_across_a_shrink_does_not_land(
    tmp_path: Path, then: str
) -> None:
    """DESIGN.md §3: after a shrink and a grow, the sectors past the shrink read as zeros.
    A read that missed the cache fills it with what it read from below; here that fill
    waits (a read of the same sectors in flight in the cache layer holds them shared) while
    the volume is shrunk below them. The fill must not land: it brought the lower layer's
    old bytes back into view after the grow, and without a grow it left the map holding
    sectors past the layer's size, so the layer did not open again."""
    top, volume = await _cache_over_ab(tmp_path, 2048)
    try:
        token = top._sectors.try_shared(2000, 2008)  # a read of those sectors in flight
        assert token is not None
        reading = asyncio.create_task(volume.read(2000, 8))  # misses, reads 0xAB, fills
        await eventually("the fill to wait", lambda: top._sectors.waiting_exclusive(2000, 2008))
        shrinking = asyncio.create_task(volume.resize(1000))
        # committed (the new size shows); the file is cut once the read in flight is done
        await eventually("the shrink to be made", lambda: volume.sector_count == 1000)
        top._sectors.release(token)
        await asyncio.wait_for(shrinking, 5)
        if then == "grow":
            await volume.resize(2048)
        data, _ = await asyncio.wait_for(reading, 5)
        assert data == b"\xab" * 8 * SS  # it began before the shrink: the old data is right
        assert await top.presence(1000, 1048) == []
        if then == "grow":
            data, runs = await volume.read(2000, 8)
            assert data == bytes(8 * SS) and runs == []  # zeros no layer holds, not 0xAB
        await volume.flush()
    finally:
        await volume.close()
    top, volume = await _cache_over_ab(tmp_path, 2048)  # the layer opens again
    try:
        assert volume.sector_count == (2048 if then == "grow" else 1000)
        if then == "grow":
            data, _ = await volume.read(2000, 8)
            assert data == bytes(8 * SS)
    finally:
        await volume.close()


@contextlib.asynccontextmanager
async def _shrink_waiting_for_a_read(
    path: Path,
) -> AsyncIterator[tuple[SparseLayer, asyncio.Task[None], Callable[[], None]]]:
    """A 64-sector sparse layer at ``path`` with sector 40 written, a read of it still
    copying (its shared hold, kept here), and a shrink to 32 sectors made meanwhile (its
    size shows) whose data file cut waits for that read: ``(layer, the shrink, release the
    read)``. Closed at the end (the read released first, else close would wait for it)."""
    layer = SparseLayer(str(path), size=64 * SS)
    await layer.attach(None)
    held: list[int] = []

    def release() -> None:
        while held:
            layer._sectors.release(held.pop())

    try:
        await layer.write(memoryview(pattern(1, 40, 1, SS)), 40, False)
        token = layer._sectors.try_shared(40, 41)
        assert token is not None
        held.append(token)
        shrinking = asyncio.create_task(layer.resize(32))
        await eventually("the shrink to be made", lambda: layer.sector_count == 32)
        yield layer, shrinking, release
    finally:
        release()
        await layer.close()


async def test_a_shrink_cuts_the_data_file_only_after_the_reads_in_flight(
    tmp_path: Path,
) -> None:
    """A read of sectors past the new end that began before the shrink and still copies on
    a thread (held here) must not see the file cut under it (zeros answered OK): the cut
    waits for it; the shrink itself is made and shows meanwhile."""
    path = tmp_path / "d"
    async with _shrink_waiting_for_a_read(path) as (_, shrinking, release):
        for _ in range(5):
            await asyncio.sleep(0)
        assert path.stat().st_size == 64 * SS, "cut under a read still copying"
        release()
        await asyncio.wait_for(shrinking, 10)
        assert path.stat().st_size == 32 * SS


async def test_a_close_begun_while_a_shrink_commits_ends_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Close holds every sector, then waits to commit; a shrink committing meanwhile must
    not then wait for those sectors (to cut its data file) while it holds the commit: both
    end (the server's stop with a resize in flight), and the shrink stands."""
    path = tmp_path / "d"
    layer = SparseLayer(str(path), size=64 * SS)
    await layer.attach(None)
    await layer.write(memoryview(pattern(1, 40, 1, SS)), 40, False)
    held = _HeldSync(monkeypatch)
    shrinking = asyncio.create_task(layer.resize(32))
    await held.wait_entered()  # the shrink's commit, on its thread
    closing = asyncio.create_task(layer.close())
    await eventually("close to hold every sector", lambda: layer._sectors.closing)
    held.go.set()
    await asyncio.wait_for(asyncio.gather(shrinking, closing), 10)
    again = SparseLayer(str(path))
    await again.attach(None)
    try:
        assert again.sector_count == 32
    finally:
        await again.close()


async def test_a_grow_waits_for_the_file_cut_of_the_shrink_before_it(tmp_path: Path) -> None:
    """A shrink waiting to cut its data file (after a read still copying) and a grow right
    after it: the grow comes after the cut, so the cut never shortens the grown file (a
    flush then said the file was truncated by someone else)."""
    path = tmp_path / "d"
    async with _shrink_waiting_for_a_read(path) as (layer, shrinking, release):
        growing = asyncio.create_task(layer.resize(64))
        for _ in range(5):
            await asyncio.sleep(0)
        release()
        await asyncio.wait_for(asyncio.gather(shrinking, growing), 10)
        assert layer.sector_count == 64 and path.stat().st_size == 64 * SS
        await layer.write(memoryview(pattern(2, 50, 1, SS)), 50, False)
        await layer.flush()  # no "truncated while served"
        buf = bytearray(2 * SS)
        runs = await layer.read(memoryview(buf), 40)
        assert runs == [] and buf == bytes(2 * SS), "the cut sector does not come back"


async def test_a_shrink_whose_file_cut_fails_is_still_a_shrink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Once a shrink is committed, a failure to cut the data file (here EIO) leaves only
    space past the end allocated: the resize succeeds with a warning, and the volume learns
    the new size (else its overlaps stayed high, and a grow showed the layer below's data
    where zeros belong)."""
    base = tmp_path / "base.raw"
    base.write_bytes(b"\xab" * 2048 * SS)
    top = SparseLayer(str(tmp_path / "top"))
    volume = await Volume.open("v", [LayerEntry(top), LayerEntry(RawLayer(str(base)))])
    real = os.ftruncate

    def failing(fd: int, length: int) -> None:
        if fd == top._fd and length == 1000 * SS:
            raise OSError(errno.EIO, "Input/output error")
        real(fd, length)

    try:
        monkeypatch.setattr(os, "ftruncate", failing)
        with caplog.at_level(logging.WARNING):
            await volume.resize(1000)
        monkeypatch.undo()
        assert "not cut to the new size" in caplog.text
        assert volume.sector_count == 1000 and volume.generation == 1
        await volume.resize(2048)
        data, _ = await volume.read(1500, 1)
        assert data == bytes(SS)
    finally:
        monkeypatch.undo()
        await volume.close()


@pytest.mark.parametrize("when", ["after", "during"])
async def test_a_resize_that_reaches_a_closed_layer_is_unavailable(
    tmp_path: Path, when: str
) -> None:
    """A resize reaching the layer after its close began (a stop's grace ran out) is
    UNAVAILABLE, as every other mutation then is, and leaves the size alone."""
    layer = await opened(tmp_path / "d", SIZE)
    count = layer.sector_count
    closing = asyncio.create_task(layer.close())
    if when == "after":
        await closing
    else:
        await asyncio.sleep(0)  # close has begun
    with pytest.raises(Unavailable, match="closed"):
        await layer.resize(count // 2)
    assert layer.sector_count == count
    await closing


_KILLED_IN_CREATE = """
import asyncio, os, signal, sys
from tierdisk.service.layers import sparse, sparse_log

def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)

path, step, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
if step == "map":
    write_snapshot = sparse_log.MapLog.write_snapshot
    def snapshot_then_die(self, *args):
        write_snapshot(self, *args)
        kill()
    sparse_log.MapLog.write_snapshot = snapshot_then_die
else:
    ftruncate = os.ftruncate
    def size_then_die(fd, length):
        ftruncate(fd, length)
        if length == size:
            kill()
    os.ftruncate = size_then_die
asyncio.run(sparse.SparseLayer(path, size=size).attach(None))
"""


@pytest.mark.parametrize("step", ["map", "size"])
async def test_a_layer_killed_while_being_created_opens_empty(tmp_path: Path, step: str) -> None:
    """A server killed (SIGKILL) while creating a sparse layer, right after the map is
    written or right after the data file is sized: the next start opens an empty layer of
    the size asked for (a full-size data file without a map was refused at every start,
    though nothing had ever been written)."""
    path = tmp_path / "layer"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _KILLED_IN_CREATE, str(path), step, str(SIZE)
    )
    assert await asyncio.wait_for(child.wait(), 30) == -signal.SIGKILL
    layer = await opened(path, SIZE)
    try:
        assert layer.sector_count == SIZE // SS
        _, runs = await read(layer, 0, 16)
        assert runs == [] and path.stat().st_size == SIZE
    finally:
        await layer.close()


class _HeldSync:
    """``os.fdatasync`` that holds its first caller (a commit's thread) until :attr:`go`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered, self.go = threading.Event(), threading.Event()
        self.calls = 0
        self._real = os.fdatasync
        monkeypatch.setattr(os, "fdatasync", self)

    fail = False
    """Set before :attr:`go`: the held call then fails (EIO) instead of syncing."""

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if not self.entered.is_set():
            self.entered.set()
            self.go.wait(10)
            if self.fail:
                raise OSError(errno.EIO, "Input/output error")
        self._real(fd)

    async def wait_entered(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.entered.wait, 10)


async def test_a_read_that_waited_across_a_shrink_is_out_of_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read of sectors the volume is being shrunk below, waiting in the cache layer (for a
    fill of one of them), must not find them absent there and take the layer below's old
    data (the overlaps are lowered only once the shrink is committed): it waits for the
    shrink's outcome and is refused, as a read after the shrink is (DESIGN.md §3: never an
    older value after an acknowledged write)."""
    top, volume = await _cache_over_ab(tmp_path, 64)
    try:
        await volume.write(40, pattern(2, 40, 1, SS))  # acknowledged
        token = await top._sectors.acquire_exclusive(30, 31)  # a fill of sector 30 under way
        reading = asyncio.create_task(volume.read(30, 14))
        for _ in range(5):
            await asyncio.sleep(0)  # it checks the range and waits for sector 30
        held = _HeldSync(monkeypatch)
        shrinking = asyncio.create_task(volume.resize(32))
        await held.wait_entered()  # dropped from the map in memory, the commit under way
        top._sectors.release(token)
        for _ in range(5):
            await asyncio.sleep(0)
        assert not reading.done(), "it waits for the shrink's outcome"
        assert volume.sector_count == 64, "the new size shows once the shrink is committed"
        held.go.set()
        with pytest.raises(OutOfRange):
            await asyncio.wait_for(reading, 10)
        await asyncio.wait_for(shrinking, 10)
    finally:
        await volume.close()


async def test_a_cancelled_flush_keeps_the_next_commit_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush whose caller gives up (gRPC cancels it) while its commit runs on a thread:
    the next flush's commit starts only after that thread is done (two at once appended
    to the map at the same offset, and the layer did not open again)."""
    path = tmp_path / "d"
    layer = await opened(path, SIZE)
    try:
        await layer.write(memoryview(pattern(1, 0, 1, SS)), 0, False)
        held = _HeldSync(monkeypatch)
        first = asyncio.create_task(layer.flush())
        await held.wait_entered()
        first.cancel()
        await layer.write(memoryview(pattern(2, 8, 1, SS)), 8, False)
        second = asyncio.create_task(layer.flush())
        await asyncio.sleep(0.1)  # negative check: can only pass vacuously, never fail falsely
        assert held.calls == 1 and not second.done()
        held.go.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(first, 10)
        await asyncio.wait_for(second, 10)
    finally:
        await layer.close()
    again = await opened(path)
    try:
        assert (await read(again, 0, 9))[1] == [(0, 1), (8, 9)]
    finally:
        await again.close()


async def test_a_no_overwrite_write_is_never_dropped_by_a_shrink_elsewhere(tmp_path: Path) -> None:
    """A caller's ``Write`` with ``no_overwrite`` into holes is stored even when a shrink of
    other sectors begins while it waits for the layer's writer thread: it is the caller's
    data, not a read-cache fill that may have gone stale (the layer dropped it as one, and
    the write was acknowledged and lost, in most rounds)."""
    data = b"\x5a" * (16 * SS)
    for round_ in range(20):
        vol = await Volume.open(
            "v", [LayerEntry(SparseLayer(str(tmp_path / f"s{round_}"), size=91 * SS))]
        )
        try:
            await asyncio.gather(
                vol.write_at(16895, bytes(2049)),  # keeps the writer thread busy a moment
                vol.write(0, data, no_overwrite=True),
                vol.resize(90),
            )
            got, present = await vol.read(0, 16)
            assert (bytes(got), present) == (data, [(0, 16)]), round_
        finally:
            await vol.close()


async def test_a_long_mutation_does_not_hold_up_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unmap that edits the run sets for long (over a million runs: seconds, here made
    slow) holds their lock on the writer thread; a read and a presence lookup of other
    sectors of the layer wait for it on a thread, not on the event loop, where every other
    client of the server would wait too. They see the data and presence of before or after
    the unmap, and the loop keeps running meanwhile."""
    layer = await opened(tmp_path / "d.sparse", 64 * SS)
    try:
        await layer.write(memoryview(pattern(1, 0, 64, SS)), 0, False)
        slow = SparseLayer._mark_absent

        def slow_mark_absent(self: SparseLayer, a: int, b: int) -> None:
            time.sleep(0.6)  # (under the lock, as a long edit is)
            slow(self, a, b)

        monkeypatch.setattr(SparseLayer, "_mark_absent", slow_mark_absent)
        unmap = asyncio.create_task(layer.unmap(32, 32, False, True))
        await asyncio.sleep(0.1)  # (the writer thread is in the edit)
        loop = asyncio.get_running_loop()
        gaps: list[float] = []

        async def ticks() -> None:
            while not unmap.done():
                before = loop.time()
                await asyncio.sleep(0.01)
                gaps.append(loop.time() - before)

        ticker = asyncio.create_task(ticks())
        await asyncio.sleep(0.05)  # (ticking)
        data, runs = await read(layer, 0, 8)
        assert data == pattern(1, 0, 8, SS) and runs == [(0, 8)]
        assert await layer.presence(0, 64) in ([(0, 64)], [(0, 32)])
        await unmap
        await ticker
        assert gaps and max(gaps) < 0.3, max(gaps)
        assert await layer.presence(0, 64) == [(0, 32)]
    finally:
        await layer.close()


async def test_a_read_fills_a_fragmented_read_cache_in_batches_of_runs_and_nothing_else(
    tmp_path: Path,
) -> None:
    """A read over a sparse read cache missing every fourth sector (under a top holding
    every other one) fills each missed run, a batch of runs per writer job, and only those:
    the sectors between them that the top holds stay out of the cache (they are the top's
    data, not the cache's), and the cache counts exactly what it stored."""
    runs = 1000  # (several batches)
    sectors = 4 * runs
    top = RamLayer(size=sectors * SS, sector_size=SS)
    cache = SparseLayer(str(tmp_path / "c.sparse"), size=sectors * SS)
    base = RamLayer(size=sectors * SS, sector_size=SS)
    volume = await Volume.open(
        "v", [LayerEntry(top), LayerEntry(cache, read_cache=True), LayerEntry(base)]
    )
    try:
        await base.write(memoryview(pattern(3, 0, sectors, SS)), 0, False)
        for s in range(0, sectors, 2):
            await top.write(memoryview(pattern(1, s, 1, SS)), s, False)
        for s in range(1, sectors, 4):
            await cache.write(memoryview(pattern(2, s, 1, SS)), s, False)
        data, _ = await volume.read(0, sectors)
        expected = b"".join(
            pattern(1 if s % 2 == 0 else 2 if s % 4 == 1 else 3, s, 1, SS) for s in range(sectors)
        )
        assert data == expected
        assert await cache.presence(0, sectors) == [(s, s + 1) for s in range(1, sectors, 2)]
        assert volume.entries[1].stats.cache_fills == runs
        got, _ = await read(cache, 0, sectors)
        for s in range(3, sectors, 4):
            assert got[s * SS : (s + 1) * SS] == pattern(3, s, 1, SS)
    finally:
        await volume.close()


# -- what a flush vouches for survives a crash (a copy of the files as a SIGKILL leaves them)


async def _crashed(layer: SparseLayer, tmp_path: Path, name: str = "crash") -> SparseLayer:
    """The layer's files copied as they are now (flushed or not), opened."""
    return await opened(crash_image(Path(layer.path), tmp_path / name / "d.sparse"))


async def test_the_blocks_of_writes_a_crash_lost_are_given_back_at_the_next_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Writes after the last commit are lost at a crash (they read from below again), and
    so is their place on disk: the next open punches their blocks out, or a layer that
    filled its disk and then lost its final flush would stay full of data it no longer
    holds (in the background, on the writer thread: the open does not wait for it). What
    the map holds is untouched."""
    mib = 1 << 20
    layer = await opened(tmp_path / "d.sparse", 4 * mib)
    try:
        await layer.write(memoryview(pattern(1, 0, mib // SS, SS)), 0, False)
        await layer.flush()
        lost = 2 * mib // SS
        await layer.write(memoryview(pattern(2, lost, mib // SS, SS)), lost, False)
        caplog.set_level(logging.INFO, logger=sparse_module.__name__)
        crashed = await _crashed(layer, tmp_path)
    finally:
        await layer.close()
    try:
        await eventually("the lost write's blocks to be given back", lambda: "gave" in caplog.text)
        assert crashed.inspect()["allocated_bytes"] <= mib + 4096
        data, runs = await read(crashed, 0, 4 * mib // SS)
        assert runs == [(0, mib // SS)] and data[:mib] == pattern(1, 0, mib // SS, SS)
        assert "gave back" in caplog.text and "unclean stop" in caplog.text
    finally:
        await crashed.close()


async def test_giving_back_lost_blocks_in_steps_spares_what_writes_made_present_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The give-back runs in steps on the writer thread, so writes come in between steps
    (here: a step right after each write): a sector written meanwhile is present when the
    next step comes and keeps its data; the rest of what the crash lost is punched."""
    ss = 4096
    layer = SparseLayer(str(tmp_path / "d.sparse"), size=64 * ss, sector_size=ss)
    await layer.attach(None)
    try:
        for s in range(0, 64, 2):
            await layer.write(memoryview(pattern(1, s, 1, ss)), s, False)
        await layer.flush()
        for s in range(1, 64, 2):  # lost at the crash
            await layer.write(memoryview(pattern(2, s, 1, ss)), s, False)
        crashed_path = crash_image(Path(layer.path), tmp_path / "crash" / "d.sparse")
    finally:
        await layer.close()
    monkeypatch.setattr(sparse_module, "_GAPS_PER_STEP", 1)
    write = SparseLayer._write_sync

    def write_then_a_step(self: SparseLayer, *args: Any) -> int:
        written = write(self, *args)
        self._give_back_lost_blocks(0)  # a step next on the writer thread, from the start
        return written

    monkeypatch.setattr(SparseLayer, "_write_sync", write_then_a_step)
    caplog.set_level(logging.INFO, logger=sparse_module.__name__)
    crashed = await opened(crashed_path)
    try:
        rewritten = range(1, 32, 2)
        for s in rewritten:
            await crashed.write(memoryview(pattern(3, s, 1, ss)), s, False)
        await eventually("the give-back to end", lambda: "gave" in caplog.text)
        data, runs = await read(crashed, 0, 64)
        assert runs == [(0, 33)] + [(s, s + 1) for s in range(34, 64, 2)]
        for s in range(64):
            want = pattern(1 if s % 2 == 0 else 3, s, 1, ss)
            if s % 2 == 0 or s in rewritten:
                assert data[s * ss : (s + 1) * ss] == want, s
        lost = list(range(33, 64, 2))
        assert [s for s in range(64) if is_hole(crashed_path, s * ss, ss)] == lost
    finally:
        await crashed.close()


@pytest.mark.parametrize("commit", ["fails", "made"])
async def test_giving_back_lost_blocks_leaves_what_a_shrink_dropped_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, commit: str
) -> None:
    """A shrink drops its sectors from presence on the writer thread, then commits. A step
    of the give-back that comes between (the next one queued) must not punch them: a shrink
    whose commit fails marks them present again (they would read zeros), and reads that
    began before the shrink still copy them until the file is cut."""
    ss = 4096
    path = tmp_path / "d.sparse"
    layer = SparseLayer(str(path), size=64 * ss, sector_size=ss)
    await layer.attach(None)
    try:
        for s in range(0, 16, 2):
            await layer.write(memoryview(pattern(1, s, 1, ss)), s, False)
        await layer.write(memoryview(pattern(2, 40, 8, ss)), 40, False)
    finally:
        await layer.close()
    shrink = SparseLayer._shrink_sync
    held_then: list[bytes] = []

    def shrink_then_a_step(self: SparseLayer, size: int) -> list[tuple[int, int]]:
        dropped = shrink(self, size)
        self._give_back_lost_blocks()  # the step queued next on the writer thread
        held_then.append(os.pread(self._fd, 8 * ss, 40 * ss))  # what a read copies now
        return dropped

    monkeypatch.setattr(SparseLayer, "_shrink_sync", shrink_then_a_step)
    layer = await opened(path)
    try:
        if commit == "fails":  # the shrink's record cannot be appended to the map
            with file_size_limit(os.stat(f"{path}.map").st_size), pytest.raises(NoSpace):
                await layer.resize(32)
            data, runs = await read(layer, 40, 8)
            assert runs == [(40, 48)] and data == pattern(2, 40, 8, ss)
        else:
            await layer.resize(32)
            assert layer.sector_count == 32
        assert held_then == [pattern(2, 40, 8, ss)]
    finally:
        await layer.close()


async def test_a_grow_with_no_write_after_it_survives_a_restart(tmp_path: Path) -> None:
    """A grow changes only the size: the flush after it records it, so the layer comes
    back at the new size after a clean stop and after a crash."""
    path = tmp_path / "d.sparse"
    await (await opened(path, 64 * SS)).close()  # an existing layer: a snapshot only
    layer = await opened(path)
    try:
        await layer.resize(128)
        await layer.flush()
        crashed = await _crashed(layer, tmp_path)
        assert crashed.sector_count == 128
        await crashed.close()
    finally:
        await layer.close()
    layer = await opened(path)
    assert layer.sector_count == 128
    await layer.close()


async def test_an_unmap_of_a_write_not_yet_flushed_is_recorded(tmp_path: Path) -> None:
    """A write then an unmap (dropping the sectors) before one flush: after a crash the
    sectors are absent, as they were (not present zeros, which would hide the layers below
    and keep a later fill out)."""
    layer = await opened(tmp_path / "d.sparse", 64 * SS)
    try:
        await layer.write(memoryview(pattern(1, 0, 2, SS)), 0, False)
        await layer.flush()
        await layer.write(memoryview(pattern(2, 4, 1, SS)), 4, False)
        await layer.unmap(4, 1, False, True)
        await layer.unmap(1, 1, False, True)
        await layer.flush()
        assert await layer.presence(0, 8) == [(0, 1)]
        crashed = await _crashed(layer, tmp_path)
        try:
            assert await crashed.presence(0, 8) == [(0, 1)]
        finally:
            await crashed.close()
    finally:
        await layer.close()


async def test_a_write_during_a_commit_is_committed_by_the_next_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that lands while a flush's commit runs is not in that commit; the next flush
    records it, so it survives a crash after that flush."""
    layer = await opened(tmp_path / "d.sparse", 64 * SS)
    try:
        await layer.write(memoryview(pattern(1, 1, 1, SS)), 1, False)
        held = _HeldSync(monkeypatch)
        first = asyncio.create_task(layer.flush())
        await held.wait_entered()  # (the commit took what it records)
        await layer.write(memoryview(pattern(2, 2, 1, SS)), 2, False)
        held.go.set()
        await first
        await layer.flush()
        crashed = await _crashed(layer, tmp_path)
        try:
            assert await read(crashed, 1, 2) == (
                pattern(1, 1, 1, SS) + pattern(2, 2, 1, SS),
                [(1, 3)],
            )
        finally:
            await crashed.close()
    finally:
        await layer.close()


def _failing_map_writes(monkeypatch: pytest.MonkeyPatch, layer: SparseLayer) -> list[int]:
    """Make appends to ``layer``'s map fail with ENOSPC while the returned list is empty
    (append anything to it to let them through)."""
    real = fileio.pwrite_all
    let_through: list[int] = []

    def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
        if fd == layer._map_log.fd and not let_through:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, offset)

    monkeypatch.setattr(sparse_log, "pwrite_all", pwrite_all)
    return let_through


async def test_a_failed_commit_keeps_its_changes_for_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush whose map record finds no room fails and keeps what it was to record; the
    next flush that succeeds records it, so a crash after it keeps the write and the
    unmap."""
    layer = await opened(tmp_path / "d.sparse", 64 * SS)
    try:
        await layer.write(memoryview(pattern(1, 0, 2, SS)), 0, False)
        await layer.flush()
        await layer.write(memoryview(pattern(5, 5, 1, SS)), 5, False)
        await layer.unmap(0, 1, False, True)
        let_through = _failing_map_writes(monkeypatch, layer)
        with pytest.raises((NoSpace, StorageError)):
            await layer.flush()
        let_through.append(1)
        await layer.flush()
        crashed = await _crashed(layer, tmp_path)
        try:
            assert await crashed.presence(0, 8) == [(1, 2), (5, 6)]
            assert (await read(crashed, 5, 1))[0] == pattern(5, 5, 1, SS)
        finally:
            await crashed.close()
    finally:
        await layer.close()


async def test_a_grow_whose_commit_failed_changes_nothing_after_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grow refused because its record found no room (``RESOURCE_EXHAUSTED``: it changed
    nothing) stays undone: a later flush does not record the larger size, and the layer
    opens at its old size."""
    path = tmp_path / "d.sparse"
    layer = await opened(path, 64 * SS)
    try:
        await layer.write(memoryview(pattern(1, 0, 1, SS)), 0, False)
        await layer.flush()
        let_through = _failing_map_writes(monkeypatch, layer)
        with pytest.raises(NoSpace):
            await layer.resize(128)
        let_through.append(1)
        assert layer.sector_count == 64
        await layer.write(memoryview(pattern(2, 1, 1, SS)), 1, False)
        await layer.flush()
        crashed = await _crashed(layer, tmp_path)
        assert crashed.sector_count == 64
        await crashed.close()
    finally:
        await layer.close()
    layer = await opened(path)
    assert layer.sector_count == 64 and path.stat().st_size == 64 * SS
    await layer.close()


async def test_a_flush_syncs_the_data_before_the_map_that_vouches_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The map must never get ahead of the data on disk (a power cut would leave sectors
    mapped present over blocks never written): a flush syncs the data file, then the map,
    also the flush that retries a commit that failed. Only a power cut would show it, so
    the syncs are watched, by the file each is of."""
    path = tmp_path / "d.sparse"
    layer = await opened(path, 64 * SS)
    synced: list[str] = []
    real = os.fdatasync

    def watched(fd: int) -> None:
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", watched)
    try:
        await layer.write(memoryview(pattern(1, 1, 1, SS)), 1, False)
        await layer.flush()
        assert synced == ["d.sparse", "d.sparse.map"], synced
        synced.clear()
        await layer.write(memoryview(pattern(2, 2, 1, SS)), 2, False)
        let_through = _failing_map_writes(monkeypatch, layer)
        with pytest.raises((NoSpace, StorageError)):
            await layer.flush()
        let_through.append(1)
        synced.clear()
        await layer.flush()
        assert synced == ["d.sparse", "d.sparse.map"], synced
    finally:
        await layer.close()


async def test_a_read_that_waited_for_a_long_edit_does_not_see_a_shrink_half_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads of a layer whose run sets a long unmap holds (here made slow) wait for them; a
    shrink queued meanwhile may edit them first. A read then comes after the shrink's
    outcome (OUT_OF_RANGE past the new end), never taking the sectors it cuts for absent,
    which would show the layer below's old data through."""
    edits = SparseLayer._mark_present  # (an unmap over a layer below keeps zeros present)
    slow: set[SparseLayer] = set()

    def slow_mark_present(self: SparseLayer, a: int, b: int) -> None:
        if self in slow:
            time.sleep(0.2)  # (as an edit of ~10^5 runs)
        edits(self, a, b)

    monkeypatch.setattr(SparseLayer, "_mark_present", slow_mark_present)
    seen: dict[str, int] = {}
    for round_ in range(3):
        folder = tmp_path / str(round_)
        top = SparseLayer(str(folder / "top.sparse"), size=64 * SS)
        below = SparseLayer(str(folder / "below.sparse"), size=64 * SS)
        volume = await Volume.open("v", [LayerEntry(top), LayerEntry(below)])
        try:
            await below.write(memoryview(pattern(2, 0, 64, SS)), 0, False)
            await volume.write(0, pattern(1, 0, 64, SS))
            slow.add(top)
            unmap = asyncio.create_task(volume.unmap(0, 8))
            await asyncio.sleep(0.05)  # (the edit holds the sets)
            reads = [asyncio.create_task(volume.read(40 + k, 1)) for k in range(24)]
            await asyncio.sleep(0)
            shrink = asyncio.create_task(volume.resize(40))
            await unmap
            slow.discard(top)
            for k, read_ in enumerate(reads):
                try:
                    data, _ = await read_
                except OutOfRange:
                    seen["out of range"] = seen.get("out of range", 0) + 1
                else:
                    got = "top" if data == pattern(1, 40 + k, 1, SS) else "below (stale)"
                    seen[got] = seen.get(got, 0) + 1
            await shrink
        finally:
            await volume.close()
    assert "below (stale)" not in seen, seen


@pytest.mark.parametrize("fua", [False, True])
async def test_a_write_of_holes_over_many_runs_fills_the_holes_on_every_write_path_layer(
    tmp_path: Path, fua: bool
) -> None:
    """A caller's ``Write`` with ``no_overwrite`` over a range held every other sector (600
    holes: several batches per writer job) stores its data in the holes only, on each layer
    of the write path, keeping what was there; with ``fua``, flushed before it returns."""
    holes = 600
    top = SparseLayer(str(tmp_path / "top.sparse"), size=2 * holes * SS)
    durable = SparseLayer(str(tmp_path / "durable.sparse"), size=2 * holes * SS)
    volume = await Volume.open("v", [LayerEntry(top, write_through=True), LayerEntry(durable)])
    try:
        for s in range(0, 2 * holes, 2):
            await volume.write(s, pattern(1, s, 1, SS))
        await volume.write(0, pattern(2, 0, 2 * holes, SS), no_overwrite=True, fua=fua)
        expected = b"".join(pattern(1 if s % 2 == 0 else 2, s, 1, SS) for s in range(2 * holes))
        assert (await volume.read(0, 2 * holes))[0] == expected
        for layer in (top, durable):
            assert await read(layer, 0, 2 * holes) == (expected, [(0, 2 * holes)])
            assert (layer.inspect()["unflushed_runs"] == 0) == fua
    finally:
        await volume.close()
