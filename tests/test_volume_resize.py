"""Impossible resizes (DESIGN.md §2): a clear status code, and the volume unchanged.

- a size over ``2**63 - 1`` bytes (:data:`MAX_BYTES`) or ``2**53 - 1`` sectors
  (:data:`MAX_SECTORS`) is a size limit: ``InvalidArgument`` (INVALID_ARGUMENT), on every
  stack, before any layer is asked;
- a ``ram`` top that cannot map that much memory (``ENOMEM``) is ``NoSpace``
  (RESOURCE_EXHAUSTED);
- a ``raw`` or ``sparse`` top whose filesystem refuses the file size (``EFBIG``) is
  ``FailedPrecondition`` (FAILED_PRECONDITION).

After each, the volume has the same size, data and generation, and resize watchers see no
event: the next event they get is the next real change.

``EFBIG`` comes from the kernel's size check on ``ftruncate`` (``inode_newsize_ok``), which
refuses a size over the filesystem's largest file and, the same way, over the process's
``RLIMIT_FSIZE``. The tests lower ``RLIMIT_FSIZE`` (:func:`file_size_limit`) so the case is
the same on every filesystem, and also hit the real limit of the test folder's filesystem
where it has one below 4 EiB (ext4: 16 TiB), skipping otherwise. The ``ram`` case maps
:data:`HUGE` bytes, more than any 64-bit Linux address space (at most ``2**57``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from servers import ram, running_server, toml_volume
from stacks import build_stack, pattern
from tools import file_size_limit

from tierdisk.service.errors import (
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    NoSpace,
    OutOfRange,
    StorageError,
)
from tierdisk.service.layer import MAX_BYTES, MAX_SECTORS
from tierdisk.service.layers.ram import RamLayer
from tierdisk.service.layers.raw import RawLayer
from tierdisk.service.layers.sparse import SparseLayer
from tierdisk.service.layers.sqlite import SqliteLayer
from tierdisk.service.runs import Run
from tierdisk.service.volume import LayerEntry, Volume
from tierdisk.v1 import blockdevice_pb2 as pb
from tierdisk.v1 import blockdevice_pb2_grpc as pb_grpc

HUGE = 2**62 - 2**20
"""Bytes under the size limit (4 EiB less 1 MiB) that no storage here can have."""
TiB = 1 << 40


def filesystem_limit_below(folder: Path, nbytes: int) -> bool:
    """True when ``folder``'s filesystem refuses a (sparse) file of ``nbytes`` bytes."""
    probe = folder / "size-probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, nbytes)
    except OSError as exc:
        if exc.errno == errno.EFBIG:
            return True
        raise
    finally:
        os.close(fd)
        probe.unlink()
    return False


Observed = tuple[int, int, bytes]


async def observe(volume: Volume) -> Observed:
    """What a user can see of the volume: size, generation, the data at both ends."""
    n = volume.sector_count
    head, _ = await volume.read(0, 8)
    tail, _ = await volume.read(n - 8, 8)
    return n, volume.generation, bytes(head + tail)


async def prepared(volume: Volume) -> tuple[Observed, asyncio.Task[list[tuple[int, int]]]]:
    """Write data at both ends; return what is observed, and a watcher of size changes."""
    ss, n = volume.sector_size, volume.sector_count
    await volume.write(0, pattern(1, 0, 8, ss))
    await volume.write(n - 8, pattern(2, n - 8, 8, ss))
    watcher = asyncio.ensure_future(volume.resize_events(volume.generation))
    return await observe(volume), watcher


async def assert_no_event_then_next_change(
    volume: Volume, watcher: asyncio.Task[list[tuple[int, int]]], generation: int
) -> None:
    """The watcher saw nothing so far; a real resize is the next event it gets."""
    await asyncio.sleep(0.01)  # negative check: can only pass vacuously, never fail falsely
    assert not watcher.done(), f"a failed resize produced an event: {watcher.result()}"
    size = volume.sector_count - 8
    assert await volume.resize(size) == size
    assert await asyncio.wait_for(watcher, 5) == [(generation + 1, size)]


# -- over the byte limit: every stack ------------------------------------------------------


async def test_over_the_byte_limit_is_invalid_argument(volume: Volume) -> None:
    ss = volume.sector_size
    most = min(MAX_BYTES // ss, MAX_SECTORS)
    before, watcher = await prepared(volume)
    for sectors in (most + 1, MAX_BYTES // ss + 1, 2**62, 2**64 - 1):
        with pytest.raises(InvalidArgument, match="size limit") as info:
            await volume.resize(sectors)
        assert f"limit of {most} sectors" in str(info.value), "the message states the limit"
        assert await observe(volume) == before
    await assert_no_event_then_next_change(volume, watcher, before[1])


async def test_the_largest_size_resizes_or_fails_cleanly(volume: Volume) -> None:
    """At the limit itself each top does what its storage allows: grows (sqlite; a
    filesystem with 8 EiB files), or refuses with a clear error and changes nothing."""
    ss, n = volume.sector_size, volume.sector_count
    most = min(MAX_BYTES // ss, MAX_SECTORS)
    before, watcher = await prepared(volume)
    try:
        await volume.resize(most)
    except (FailedPrecondition, NoSpace):
        assert await observe(volume) == before
        await assert_no_event_then_next_change(volume, watcher, before[1])
    else:
        assert volume.sector_count == most
        tail, _ = await volume.read(most - 1, 1)
        assert tail == bytes(ss)
        await volume.resize(n)
        head, _ = await volume.read(0, 8)
        assert head == pattern(1, 0, 8, ss)
        watcher.cancel()


# -- what each top layer's storage refuses ---------------------------------------------------


@pytest.fixture
async def opened() -> AsyncIterator[list[Volume]]:
    volumes: list[Volume] = []
    yield volumes
    for volume in volumes:
        await volume.close()


@pytest.mark.parametrize("spec", ["ram", "ram/raw", "ram-rc/sparse"])
async def test_ram_top_out_of_memory_is_no_space(
    spec: str, tmp_path: Path, opened: list[Volume]
) -> None:
    volume = await build_stack(spec, tmp_path)
    opened.append(volume)
    before, watcher = await prepared(volume)
    with pytest.raises(NoSpace, match="out of memory") as info:
        await volume.resize(HUGE // volume.sector_size)  # no address space is so big
    assert str(HUGE) in str(info.value)
    assert await observe(volume) == before
    await assert_no_event_then_next_change(volume, watcher, before[1])


@pytest.mark.parametrize("spec", ["raw", "sparse", "sparse-rc/raw"])
async def test_file_too_large_is_failed_precondition(
    spec: str, tmp_path: Path, opened: list[Volume]
) -> None:
    volume = await build_stack(spec, tmp_path)
    opened.append(volume)
    ss, n = volume.sector_size, volume.sector_count
    image = tmp_path / ("layer0.sparse" if spec.startswith("sparse") else "layer0.raw")
    assert image.stat().st_size == n * ss
    before, watcher = await prepared(volume)
    with file_size_limit(TiB):
        with pytest.raises(FailedPrecondition, match="cannot hold a file") as info:
            await volume.resize(2 * TiB // ss)
    assert str(image) in str(info.value) and "File too large" in str(info.value)
    assert f"its file size limit, ulimit -f, is {TiB} bytes" in str(info.value)
    assert image.stat().st_size == n * ss
    assert await observe(volume) == before
    await assert_no_event_then_next_change(volume, watcher, before[1])
    if spec.startswith("sparse"):  # its map on disk records the sizes that really happened
        await volume.close()
        opened.remove(volume)
        again = SparseLayer(str(image))
        await again.attach(None)
        try:
            assert again.sector_count == n - 8
            head = bytearray(8 * ss)
            assert await again.read(memoryview(head), 0) == [(0, 8)]
            assert head == pattern(1, 0, 8, ss)
        finally:
            await again.close()


@pytest.mark.parametrize("spec", ["raw", "sparse"])
async def test_the_filesystems_own_limit_is_failed_precondition(
    spec: str, tmp_path: Path, opened: list[Volume]
) -> None:
    """The audit's case: the filesystem's largest file (ext4: 16 TiB) is below the size."""
    if not filesystem_limit_below(tmp_path, HUGE):
        pytest.skip(f"the filesystem of {tmp_path} accepts a 4 EiB file")
    volume = await build_stack(spec, tmp_path)
    opened.append(volume)
    before, watcher = await prepared(volume)
    with pytest.raises(FailedPrecondition, match=r"the filesystem cannot hold .* too large"):
        await volume.resize(HUGE // volume.sector_size)
    assert await observe(volume) == before
    await assert_no_event_then_next_change(volume, watcher, before[1])


# -- through gRPC ----------------------------------------------------------------------------


async def test_grpc_codes_and_no_resize_event(tmp_path: Path) -> None:
    body = (
        toml_volume("ram", ram("1MiB"))
        + toml_volume(
            "stack", ram(read_cache=True), {"kind": "raw", "path": "b.img", "size": "1MiB"}
        )
        + toml_volume("raw", {"kind": "raw", "path": "top.img", "size": "1MiB"})
        + toml_volume("sparse", {"kind": "sparse", "path": "top.sparse", "size": "1MiB"})
    )
    cases: list[tuple[str, int, grpc.StatusCode, str]] = [
        ("ram", 2**62, grpc.StatusCode.INVALID_ARGUMENT, "size limit"),
        ("ram", 2**64 - 1, grpc.StatusCode.INVALID_ARGUMENT, "size limit"),
        ("ram", 2**53, grpc.StatusCode.INVALID_ARGUMENT, "size limit"),  # sectors: MAX_SECTORS
        ("ram", HUGE // 512, grpc.StatusCode.RESOURCE_EXHAUSTED, "out of memory"),
        ("stack", HUGE // 512, grpc.StatusCode.RESOURCE_EXHAUSTED, "out of memory"),
        ("raw", 2**62, grpc.StatusCode.INVALID_ARGUMENT, "size limit"),
        ("raw", 2 * TiB // 512, grpc.StatusCode.FAILED_PRECONDITION, "File too large"),
        ("sparse", 2**62, grpc.StatusCode.INVALID_ARGUMENT, "size limit"),
        ("sparse", 2 * TiB // 512, grpc.StatusCode.FAILED_PRECONDITION, "File too large"),
    ]
    async with running_server(tmp_path, body) as srv:
        async with grpc.aio.insecure_channel(srv.grpc_address) as channel:
            stub = pb_grpc.BlockDeviceStub(channel)
            for name, sectors, code, fragment in cases:
                data = pattern(5, 0, 8, 512)
                await stub.Write(pb.WriteRequest(volume=name, sector=0, data=data))
                size = (await stub.GetVolume(pb.GetVolumeRequest(volume=name))).sector_count
                call: Any = stub.WatchResize(pb.WatchResizeRequest(volume=name))
                first = await call.read()
                with file_size_limit(TiB), pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Resize(pb.ResizeRequest(volume=name, sector_count=sectors))
                assert (info.value.code(), name) == (code, name)
                assert fragment in (info.value.details() or "")
                got = await stub.GetVolume(pb.GetVolumeRequest(volume=name))
                assert got.sector_count == size
                reply = await stub.Read(pb.ReadRequest(volume=name, sector=0, sector_count=8))
                assert reply.data == data
                # the next event is the next real change, one generation on
                await stub.Resize(pb.ResizeRequest(volume=name, sector_count=size - 8))
                event = await asyncio.wait_for(call.read(), 5)
                assert (event.sector_count, event.generation) == (size - 8, first.generation + 1)
                call.cancel()


@pytest.mark.parametrize("kind", ["sparse", "sqlite"])
async def test_a_cancelled_shrink_still_ends_as_one(tmp_path: Path, kind: str) -> None:
    """A Resize whose caller gives up (gRPC cancels the call) once the shrink is under way:
    the shrink runs to its end, so the size the volume reports is the one its files hold
    (the layer had gone back to its old size in memory while its thread made the shrink
    durable: a write past the new end was acknowledged and flushed, then gone at the next
    start, or the layer did not open again)."""

    def top(size: int | None = None) -> SparseLayer | SqliteLayer:
        if kind == "sparse":
            return SparseLayer(str(tmp_path / "top.sparse"), size=size)
        return SqliteLayer(str(tmp_path / "top.db"), size=size)

    volume = await Volume.open("v", [LayerEntry(top(64 * 512))])
    try:
        shrinking = asyncio.create_task(volume.resize(40))
        await asyncio.sleep(0)  # under way: on the layer's thread
        shrinking.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await shrinking
        assert volume.sector_count == 40
    finally:
        await volume.close()
    volume = await Volume.open("v", [LayerEntry(top())])
    try:
        assert volume.sector_count == 40
    finally:
        await volume.close()


class _ShrunkBehindTheVolumesBack(RamLayer):
    """A write-path layer that shrank by itself, the volume not told yet (a ``remote``
    whose origin was shrunk before its resize watch said so): it refuses what lies past
    ``end`` as past its end, as the origin does."""

    def __init__(self, size: int, end: int) -> None:
        super().__init__(size)
        self.end = end

    async def write(self, data: memoryview, sector: int, fua: bool) -> None:
        if sector + len(data) // self.sector_size > self.end:
            raise OutOfRange(f"sectors reach past its end ({self.end} sectors)")
        await super().write(data, sector, fua)

    async def write_no_overwrite(self, data: memoryview, sector: int) -> int:
        if sector + len(data) // self.sector_size > self.end:
            raise OutOfRange(f"sectors reach past its end ({self.end} sectors)")
        return await super().write_no_overwrite(data, sector)

    async def unmap(
        self, sector: int, count: int, block_level_only: bool, next_is_zero: bool
    ) -> None:
        if sector + count > self.end:
            raise OutOfRange(f"sectors reach past its end ({self.end} sectors)")
        await super().unmap(sector, count, block_level_only, next_is_zero)


class _KeepsEverySector(RamLayer):
    """A ram layer that cannot drop sectors (as a ``raw`` file, which holds them all)."""

    @property
    def can_drop_sectors(self) -> bool:
        return False


@pytest.mark.parametrize("op", ["write", "unmap"])
@pytest.mark.parametrize("drops", [True, False], ids=["top-drops-it", "top-keeps-it"])
async def test_a_write_path_layer_that_shrank_unseen(op: str, drops: bool) -> None:
    """A write-through write (or unmap) inside the volume that a lower write-path layer
    refuses as past its end (it shrank behind the volume's back). A top that can drop it
    again does: reads show the layer below, nothing changed, and the answer is the lower
    layer's OUT_OF_RANGE. A top that cannot keeps it and reads return it, so the answer is
    not OUT_OF_RANGE (which says nothing changed) but INTERNAL saying it is not durable."""
    lower = _ShrunkBehindTheVolumesBack(64 * 512, end=64)
    top = RamLayer() if drops else _KeepsEverySector()
    volume = await Volume.open("v", [LayerEntry(top, write_through=True), LayerEntry(lower)])
    try:
        assert volume.sector_count == 64
        await volume.write(40, b"o" * 512)  # (before the shrink: the top holds it now)
        lower.end = 32
        expected = OutOfRange if drops else StorageError
        with pytest.raises(expected, match="past its end" if drops else "not durable") as caught:
            if op == "write":
                await volume.write(40, b"w" * 512)
            else:
                await volume.unmap(40, 1)
        if drops:
            assert (await volume.read(40, 1))[0] == b"o" * 512  # as the layer below holds it
            assert top.present_sectors == 0
        else:
            assert not isinstance(caught.value, OutOfRange)
            if op == "write":
                assert (await volume.read(40, 1))[0] == b"w" * 512  # the top took it
    finally:
        await volume.close()


async def test_a_top_that_shrank_unseen_after_part_of_a_write_is_not_out_of_range() -> None:
    """A write into the holes of a range (``no_overwrite``) whose first hole the top took
    and whose second it refused as past its end (it shrank; the volume not told yet): part
    of it was made, so the answer is INTERNAL, not OUT_OF_RANGE (which says nothing
    changed). All of it refused is OUT_OF_RANGE, as before."""
    top = _ShrunkBehindTheVolumesBack(64 * 512, end=32)
    volume = await Volume.open("v", [LayerEntry(top)])
    try:
        await volume.write(29, b"p" * 512)
        with pytest.raises(StorageError, match="part of it was made") as caught:
            await volume.write(28, b"n" * 8 * 512, no_overwrite=True)  # holes 28, 30..36
        assert not isinstance(caught.value, OutOfRange)
        assert (await volume.read(28, 1))[0] == b"n" * 512  # the first hole was made
        with pytest.raises(OutOfRange):
            await volume.write(40, b"n" * 512, no_overwrite=True)
    finally:
        await volume.close()


class _Gated(RamLayer):
    """A ram layer with a gate: :meth:`wait_at_gate` sets :attr:`entered`, then waits for
    :attr:`go`."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.entered, self.go = asyncio.Event(), asyncio.Event()

    async def wait_at_gate(self) -> None:
        self.entered.set()
        await self.go.wait()


async def _read_across_a_shrink(
    volume: Volume, gated: _Gated, sector: int, count: int, size: int, *, grow_back: int = 0
) -> asyncio.Future[tuple[bytearray, list[Run]]]:
    """A read of ``count`` sectors from ``sector``, during which the volume shrank to
    ``size`` sectors (and grew back to ``grow_back``, if given): the resizes are made while
    the read waits at ``gated``'s gate, then the gate opens. The read, to await."""
    reading = asyncio.ensure_future(volume.read(sector, count))
    await asyncio.wait_for(gated.entered.wait(), 5)
    await asyncio.wait_for(volume.resize(size), 5)
    if grow_back:
        await asyncio.wait_for(volume.resize(grow_back), 5)
    gated.go.set()
    return reading


class _GatedCache(_Gated):
    """A read cache whose fills wait at the gate."""

    async def write_no_overwrite(self, data: memoryview, sector: int) -> int:
        await self.wait_at_gate()
        return await super().write_no_overwrite(data, sector)


async def test_a_fill_that_loses_a_race_with_a_shrink_is_not_a_fill_error() -> None:
    """A fill whose sectors a shrink cut while it waited is skipped, as a fill begun after
    the shrink is: not counted in ``tierdisk_cache_fill_errors_total`` nor logged as a
    failure (the cache did not fail; fill-error alerts would fire for nothing)."""
    cache, lower = _GatedCache(64 * 512), RamLayer(64 * 512)
    volume = await Volume.open("v", [LayerEntry(cache, read_cache=True), LayerEntry(lower)])
    try:
        await lower.write(memoryview(b"x" * 64 * 512), 0, False)
        await asyncio.wait_for(await _read_across_a_shrink(volume, cache, 40, 8, 32), 5)
        assert volume.entries[0].stats.cache_fill_errors == 0
        assert volume.entries[0].stats.cache_fills == 0
    finally:
        await volume.close()


async def test_a_fill_into_a_cache_that_shrank_by_itself_is_not_a_fill_error() -> None:
    """A read cache below the top that shrank while a fill waited, without the volume
    resizing (a remote cache whose origin shrank, before its watch says so), skips the
    fill's sectors past its new end: not counted as a fill error (the cache did not fail).
    (A volume's own shrink changes its generation first, the top being cut first: the
    test above.)"""
    cache, lower = _GatedCache(64 * 512), RamLayer(64 * 512)
    volume = await Volume.open(
        "v",
        [LayerEntry(RamLayer(64 * 512)), LayerEntry(cache, read_cache=True), LayerEntry(lower)],
    )
    try:
        await lower.write(memoryview(b"x" * 64 * 512), 0, False)
        reading = asyncio.ensure_future(volume.read(40, 8))
        await asyncio.wait_for(cache.entered.wait(), 5)
        await RamLayer.resize(cache, 32)  # by itself: the volume is not told
        cache.go.set()
        data, _ = await asyncio.wait_for(reading, 5)
        assert data == b"x" * 8 * 512
        assert volume.entries[1].stats.cache_fill_errors == 0
    finally:
        await volume.close()


class _GatedReads(_Gated):
    """A layer whose reads wait at the gate: one whose reads yield, as a remote's or a file
    read on a thread do."""

    async def read(self, buf: memoryview, sector: int) -> list[Run]:
        await self.wait_at_gate()
        return await super().read(buf, sector)


@pytest.mark.parametrize("grow_back", [0, 64], ids=["shrink", "shrink-and-grow"])
async def test_a_read_across_the_end_a_shrink_cuts_meanwhile_is_out_of_range(
    grow_back: int,
) -> None:
    """The shrink lowers what the layers below show while a read waits on a layer in
    between: the read then no longer asked the lowest layer for the sectors being cut, and
    answered them as zeros, OK, beside what it read before (the top's sectors past the cut;
    the data below the new end): no order of the resizes and the read gives that. Grown
    back before the read went on, the same (the top's old sectors past the cut are gone)."""
    top, gated, lower = RamLayer(64 * 512), _GatedReads(64 * 512), RamLayer(64 * 512)
    volume = await Volume.open("v", [LayerEntry(top), LayerEntry(gated), LayerEntry(lower)])
    try:
        await lower.write(memoryview(b"x" * 64 * 512), 0, False)
        await top.write(memoryview(b"t" * 4 * 512), 32, False)  # read before the shrink
        reading = await _read_across_a_shrink(volume, gated, 24, 16, 32, grow_back=grow_back)
        with pytest.raises(OutOfRange, match=r"sectors \[32, 40\) were cut by a shrink"):
            await asyncio.wait_for(reading, 5)
        assert (await volume.read(24, 8))[0] == b"x" * 8 * 512
    finally:
        gated.go.set()
        await volume.close()


class _Full(RamLayer):
    """A layer whose resize fails for lack of space while :attr:`full` (a sqlite layer on a
    full disk)."""

    full = True

    async def resize(self, sector_count: int) -> None:
        if self.full:
            raise NoSpace("resizing: out of space")
        await super().resize(sector_count)


async def test_a_shrink_is_made_top_down_and_one_cut_short_says_so() -> None:
    """A write-through shrink cuts the top first: refused there, it changed nothing
    (RESOURCE_EXHAUSTED, as the top said); refused by a layer below after the top was cut,
    it stands (the volume has the new size; the lower layer, larger, is hidden by the
    overlaps, and writes inside the volume still work) and is INTERNAL saying it was made in
    part, never "nothing changed". A crash between the two leaves the same: never a lower
    layer smaller than the top, past whose end writes would fail."""
    volume = await Volume.open(
        "v", [LayerEntry(_Full(64 * 512), write_through=True), LayerEntry(RamLayer(64 * 512))]
    )
    try:
        with pytest.raises(NoSpace):
            await volume.resize(32)
        assert [e.layer.sector_count for e in volume.entries] == [64, 64]
        assert volume.sector_count == 64
    finally:
        await volume.close()
    lower = _Full(64 * 512)
    volume = await Volume.open(
        "v", [LayerEntry(RamLayer(64 * 512), write_through=True), LayerEntry(lower)]
    )
    try:
        await volume.write(40, b"w" * 512)
        with pytest.raises(StorageError, match="made in part") as info:
            await volume.resize(32)
        assert not isinstance(info.value, NoSpace)
        assert volume.sector_count == 32 and lower.sector_count == 64
        await volume.write(31, b"x" * 512)  # inside the volume: every write-path layer has it
        lower.full = False
        await volume.resize(64)  # a grow again: the old tail reads as zeros
        data, _ = await volume.read(40, 1)
        assert data == bytes(512)
    finally:
        await volume.close()


@pytest.mark.parametrize("kind", ["sparse", "sqlite", "raw"])
async def test_a_resize_warns_of_a_config_size_the_next_start_refuses(
    kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A layer that keeps its size across restarts, whose config gives ``size``: after a
    ``Resize`` the config disagrees with it, and the next start refuses that config
    (DESIGN.md §4). The resize says so at once, naming the size to set, so a hypervisor's
    resize does not turn the next reboot into a failed start unannounced. A config with no
    ``size`` (the layer's own) warns of nothing."""
    layer_of = {"sparse": SparseLayer, "sqlite": SqliteLayer, "raw": RawLayer}

    def make(size: int | None) -> Any:
        return layer_of[kind](str(tmp_path / f"v.{kind}"), size=size)

    volume = await Volume.open("v", [LayerEntry(make(1 << 20))])
    try:
        with caplog.at_level("WARNING", logger="tierdisk.service.volume"):
            await volume.resize(4096)
        (line,) = [r.getMessage() for r in caplog.records if "next start refuses" in r.getMessage()]
        assert f"layer 0 ({kind}) is {4096 * 512} bytes now" in line
        assert f"size = {1 << 20}" in line and f"set size = {4096 * 512}" in line
    finally:
        await volume.close()
    with pytest.raises(ConfigError, match="the config says size"):  # as it said
        await Volume.open("v", [LayerEntry(make(1 << 20))])
    caplog.clear()
    volume = await Volume.open("v", [LayerEntry(make(None))])
    try:
        with caplog.at_level("WARNING", logger="tierdisk.service.volume"):
            await volume.resize(2048)
        assert not [r for r in caplog.records if "next start refuses" in r.getMessage()]
    finally:
        await volume.close()
