"""Behaviour every persistent layer kind shares (sparse, sqlite), as a test class to subclass.

``tests/test_sparse.py`` and ``tests/test_sqlite.py`` each subclass
:class:`PersistentLayerContract` with their layer class, so both kinds run the same tests:
read/write/no-overwrite, unmap in both modes, resize, flush and reopen with data intact,
size inheritance and mismatches, the lock against a second open, out of space on a real
tiny filesystem, and a hypothesis model test with close+reopen in the middle.

The disk-full test mounts a 2 MiB tmpfs (we run as root); when ``mount`` is refused it
skips, unless ``TIERDISK_REQUIRE_TOOLS=1``, which turns the skip into a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runs_model import runs_of
from stacks import entry, pattern
from tools import REQUIRE_TOOLS_ENV, file_size_limit

from tierdisk.service.errors import (
    ConfigError,
    InvalidArgument,
    NoSpace,
    OutOfRange,
    StorageError,
    TierdiskError,
)
from tierdisk.service.layer import Layer, UnmapBehavior
from tierdisk.service.layers.ram import RamLayer
from tierdisk.service.layers.raw import RawLayer
from tierdisk.service.layers.sparse import SparseLayer
from tierdisk.service.layers.sqlite import SqliteLayer
from tierdisk.service.runs import Run
from tierdisk.service.volume import LayerEntry, Volume

if TYPE_CHECKING:
    from conftest import VolumeOpener

SS = 512
SECTORS = 256
SIZE = SECTORS * SS

PersistentClass = type[SparseLayer] | type[SqliteLayer]


def fill_up(path: Path) -> None:
    """Write ``path`` until its filesystem (a :func:`tiny_filesystem`) is full (ENOSPC)."""
    chunk = os.urandom(4096)
    with open(path, "wb", buffering=0) as ballast:
        try:
            while True:
                ballast.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


@contextlib.contextmanager
def tiny_filesystem(folder: Path, size: str = "2m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``folder`` (skips, or fails under
    TIERDISK_REQUIRE_TOOLS=1, when mounting is not allowed); unmounted on exit."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        reason = f"cannot mount a {size} tmpfs for the disk-full test: {done.stderr.strip()}"
        if os.environ.get(REQUIRE_TOOLS_ENV) == "1":
            pytest.fail(f"{reason}; {REQUIRE_TOOLS_ENV}=1 requires it", pytrace=False)
        pytest.skip(reason)
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=False)


_OPS = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 95), st.integers(1, 12), st.booleans()),
    st.tuples(st.just("fill"), st.integers(0, 95), st.integers(1, 12)),
    st.tuples(st.just("unmap"), st.integers(0, 95), st.integers(1, 20), st.booleans()),
    st.tuples(st.just("flush")),
    st.tuples(st.just("reopen")),
    st.tuples(st.just("resize"), st.integers(8, 96)),
)


def _kind(path: str | Path) -> str:
    """What is at ``path`` itself: "symlink", "file" (not empty), "nothing" or "other"."""
    try:
        mode, size = os.lstat(path).st_mode, os.lstat(path).st_size
    except FileNotFoundError:
        return "nothing"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "file" if stat.S_ISREG(mode) and size else "other"


class PersistentLayerContract:
    """Subclass with ``layer_class`` set; pytest collects the subclass (``Test…``)."""

    layer_class: ClassVar[PersistentClass]

    def make(self, path: Path, size: int | None = SIZE, sector_size: int | None = None) -> Layer:
        return self.layer_class(str(path), size=size, sector_size=sector_size)

    @pytest.fixture
    def path(self, tmp_path: Path) -> Path:
        return tmp_path / "not" / "yet" / "there" / "disk"

    def hold_shrink(
        self, layer: Layer, monkeypatch: pytest.MonkeyPatch, fail: bool
    ) -> tuple[threading.Event, threading.Event]:
        """Make ``layer``'s next shrink stop, on its thread, where it commits: set the first
        event when there, wait for the second, then fail (``fail``: an I/O error) or go on.
        Each kind says where its commit is."""
        raise NotImplementedError

    async def read(self, layer: Layer, sector: int, count: int) -> tuple[bytes, list[Run]]:
        """Layer-level read into a buffer pre-filled with 0xEE (absent sectors keep it)."""
        buf = bytearray(b"\xee" * (count * layer.sector_size))
        runs = await layer.read(memoryview(buf), sector)
        return bytes(buf), runs

    # -- basic I/O ------------------------------------------------------------------------

    async def test_metadata(self, path: Path) -> None:
        layer = self.make(path)
        await layer.attach(None)
        try:
            meta = layer.metadata()
            assert (meta.sector_size, meta.sector_count) == (SS, SECTORS)
            assert meta.fua_respected and meta.can_read_cache and not meta.read_only
            assert meta.unmap_behavior == UnmapBehavior.ZEROES
            assert layer.can_resize and layer.kind == self.layer_class.kind
            assert layer.present_sectors == 0
            assert path.parent.is_dir()  # parent folders were created
        finally:
            await layer.close()

    async def test_reads_return_written_sectors_and_leave_the_rest_untouched(
        self, path: Path
    ) -> None:
        layer = self.make(path)
        await layer.attach(None)
        try:
            await layer.write(memoryview(pattern(1, 10, 5, SS)), 10, False)
            await layer.write(memoryview(pattern(2, 20, 3, SS)), 20, False)
            data, runs = await self.read(layer, 8, 16)
            assert runs == [(10, 15), (20, 23)]
            assert data[2 * SS : 7 * SS] == pattern(1, 10, 5, SS)
            assert data[12 * SS : 15 * SS] == pattern(2, 20, 3, SS)
            assert data[: 2 * SS] == b"\xee" * 2 * SS
            assert data[7 * SS : 12 * SS] == b"\xee" * 5 * SS
            assert await layer.presence(0, SECTORS) == [(10, 15), (20, 23)]
            # asked up to a held sector, or from a run's end: nothing past what was asked
            assert await layer.presence(8, 2) == [] and await layer.presence(15, 5) == []
            assert await layer.presence(12, 9) == [(12, 15), (20, 21)]
            assert layer.present_sectors == 8
            data, runs = await self.read(layer, 30, 4)
            assert runs == [] and data == b"\xee" * 4 * SS
            # overwrite part of a run; zero sectors are data like any other
            await layer.write(memoryview(bytes(2 * SS)), 11, True)
            data, runs = await self.read(layer, 10, 5)
            assert runs == [(10, 15)] and data[SS : 3 * SS] == bytes(2 * SS)
            assert layer.present_sectors == 8
        finally:
            await layer.close()

    async def test_out_of_range_is_refused(self, path: Path) -> None:
        layer = self.make(path)
        await layer.attach(None)
        try:
            with pytest.raises(OutOfRange):
                await layer.write(memoryview(bytes(2 * SS)), SECTORS - 1, False)
            with pytest.raises(OutOfRange):
                await layer.read(memoryview(bytearray(SS)), SECTORS)
            with pytest.raises(OutOfRange):
                await layer.unmap(SECTORS - 1, 2, False, True)
            assert layer.present_sectors == 0
        finally:
            await layer.close()

    async def test_no_overwrite_fills_only_what_the_layer_lacks(self, path: Path) -> None:
        layer = self.make(path)
        await layer.attach(None)
        try:
            await layer.write(memoryview(pattern(1, 4, 4, SS)), 4, False)
            await layer.write_no_overwrite(memoryview(pattern(2, 0, 12, SS)), 0)
            data, runs = await self.read(layer, 0, 12)
            assert runs == [(0, 12)]
            assert data[: 4 * SS] == pattern(2, 0, 4, SS)
            assert data[4 * SS : 8 * SS] == pattern(1, 4, 4, SS)
            assert data[8 * SS :] == pattern(2, 8, 4, SS)
        finally:
            await layer.close()

    async def test_a_write_is_never_overwritten_by_a_racing_fill(self, path: Path) -> None:
        layer = self.make(path)
        await layer.attach(None)
        try:
            for order in range(2):
                base = order * 64
                write = layer.write(memoryview(pattern(1, base, 32, SS)), base, False)
                fill = layer.write_no_overwrite(memoryview(pattern(2, base, 32, SS)), base)
                await asyncio.gather(*((write, fill) if order == 0 else (fill, write)))
                data, _ = await self.read(layer, base, 32)
                assert data == pattern(1, base, 32, SS), f"order {order}"
        finally:
            await layer.close()

    # -- unmap --------------------------------------------------------------------------------

    async def test_unmap_with_nothing_below_drops_sectors(self, path: Path) -> None:
        layer = self.make(path)
        await layer.attach(None)
        try:
            await layer.write(memoryview(pattern(1, 0, 16, SS)), 0, False)
            await layer.unmap(4, 8, False, True)
            assert await layer.presence(0, SECTORS) == [(0, 4), (12, 16)]
            assert layer.present_sectors == 8
            await layer.flush()
        finally:
            await layer.close()
        layer = self.make(path)
        await layer.attach(None)
        try:
            data, runs = await self.read(layer, 0, 16)
            assert runs == [(0, 4), (12, 16)]
            assert data[4 * SS : 12 * SS] == b"\xee" * 8 * SS
        finally:
            await layer.close()

    async def test_unmap_over_lower_data_keeps_zeros_present(
        self, path: Path, volumes: VolumeOpener
    ) -> None:
        raw = RawLayer(str(path.parent / "lower.raw"), size=SIZE)
        volume = await volumes(self.make(path), raw)
        await raw.write(memoryview(pattern(9, 0, 32, SS)), 0, False)
        await volume.write(0, pattern(1, 0, 8, SS))
        await volume.unmap(4, 24)
        data, _ = await volume.read(0, 32)
        assert data[: 4 * SS] == pattern(1, 0, 4, SS)
        assert data[4 * SS : 28 * SS] == bytes(24 * SS)
        assert data[28 * SS :] == pattern(9, 28, 4, SS)
        assert await volume.allocation(0, 32) == [(0, 28, 0), (28, 32, 1)]
        await volume.flush()
        await volume.close()
        volume = await volumes(self.make(path), RawLayer(str(path.parent / "lower.raw")))
        data, _ = await volume.read(0, 32)
        assert data[4 * SS : 28 * SS] == bytes(24 * SS)
        assert await volume.allocation(0, 32) == [(0, 28, 0), (28, 32, 1)]

    # -- durability and reopen ---------------------------------------------------------------

    async def test_data_and_presence_survive_close_and_reopen(
        self, path: Path, volumes: VolumeOpener
    ) -> None:
        volume = await volumes(self.make(path))
        await volume.write(3, pattern(1, 3, 5, SS))
        await volume.flush()
        await volume.write(100, pattern(2, 100, 2, SS), fua=True)
        await volume.write(200, pattern(3, 200, 1, SS))  # not flushed: close keeps it too
        await volume.close()
        volume = await volumes(self.make(path, size=None))
        assert volume.sector_count == SECTORS
        data, present = await volume.read(0, SECTORS)
        assert present == [(3, 8), (100, 102), (200, 201)]
        assert data[3 * SS : 8 * SS] == pattern(1, 3, 5, SS)
        assert data[100 * SS : 102 * SS] == pattern(2, 100, 2, SS)
        assert data[200 * SS : 201 * SS] == pattern(3, 200, 1, SS)
        assert volume.entries[0].layer.present_sectors == 8

    async def test_a_read_cache_keeps_what_it_filled(
        self, path: Path, volumes: VolumeOpener
    ) -> None:
        raw = RawLayer(str(path.parent / "origin.raw"), size=SIZE)
        volume = await volumes(entry(self.make(path), rc=True), raw)
        await raw.write(memoryview(pattern(5, 0, 16, SS)), 0, False)
        data, _ = await volume.read(0, 16)
        assert data == pattern(5, 0, 16, SS)
        await volume.flush()
        await volume.close()
        volume = await volumes(self.make(path))
        data, present = await volume.read(0, 32)
        assert present == [(0, 16)] and data[: 16 * SS] == pattern(5, 0, 16, SS)

    # -- size -----------------------------------------------------------------------------------

    async def test_resize_grows_with_zeros_shrinks_and_persists(self, path: Path) -> None:
        layer = self.make(path)
        await layer.attach(None)
        try:
            await layer.write(memoryview(pattern(1, 200, 56, SS)), 200, False)
            waiter = asyncio.create_task(layer.wait_resize(SECTORS))
            await layer.resize(220)
            assert await asyncio.wait_for(waiter, 5) == 220
            assert await layer.presence(0, 220) == [(200, 220)]
            with pytest.raises(OutOfRange):
                await layer.write(memoryview(bytes(SS)), 220, False)
            await layer.resize(1000)
            data, runs = await self.read(layer, 200, 800)
            assert runs == [(200, 220)]  # shrinking then growing exposes zeros, not old data
            await layer.write(memoryview(pattern(2, 990, 10, SS)), 990, False)
            assert layer.present_sectors == 30
        finally:
            await layer.close()
        layer = self.make(path, size=None)
        await layer.attach(None)
        try:
            assert layer.sector_count == 1000
            data, runs = await self.read(layer, 0, 1000)
            assert runs == [(200, 220), (990, 1000)]
            assert data[990 * SS :] == pattern(2, 990, 10, SS)
        finally:
            await layer.close()
        with pytest.raises(ConfigError, match=str(path)):  # the recorded size wins
            await self.make(path, size=SIZE).attach(None)

    @pytest.mark.parametrize("sectors", [0, -1])
    async def test_resize_to_no_sectors_is_invalid_argument(self, path: Path, sectors: int) -> None:
        """A domain error (INVALID_ARGUMENT over gRPC), not ValueError (UNKNOWN); the layer
        keeps its size and data."""
        layer = self.make(path)
        await layer.attach(None)
        try:
            await layer.write(memoryview(pattern(1, 0, 8, SS)), 0, False)
            with pytest.raises(InvalidArgument, match="at least one sector"):
                await layer.resize(sectors)
            assert layer.sector_count == SECTORS
            data, runs = await self.read(layer, 0, 8)
            assert runs == [(0, 8)] and data == pattern(1, 0, 8, SS)
        finally:
            await layer.close()

    @pytest.mark.parametrize("close", ["close", "crash after the resize"])
    async def test_a_shrink_keeps_lower_data_hidden_after_a_restart(
        self, path: Path, volumes: VolumeOpener, close: str
    ) -> None:
        """DESIGN.md §3: shrinking then growing exposes zeros, never stale lower data; the
        layer records its smallest size, so a restart does not raise the overlap again."""
        lower = path.parent / "base.raw"
        raw = RawLayer(str(lower), size=SIZE)
        volume = await volumes(self.make(path, size=None), raw)
        await raw.write(memoryview(b"\xab" * SIZE), 0, False)
        await volume.write(10, pattern(1, 10, 2, SS))
        await volume.resize(100)
        await volume.resize(SECTORS)
        await volume.write(200, pattern(2, 200, 4, SS))
        expected = bytearray(b"\xab" * 100 * SS + bytes((SECTORS - 100) * SS))
        expected[10 * SS : 12 * SS] = pattern(1, 10, 2, SS)
        expected[200 * SS : 204 * SS] = pattern(2, 200, 4, SS)
        data, _ = await volume.read(0, SECTORS)
        assert data == expected
        assert await volume.allocation(100, SECTORS - 100) == [
            (100, 200, -1), (200, 204, 0), (204, SECTORS, -1)
        ]  # fmt: skip
        if close == "close":
            await volume.close()
            reopened = path
        else:  # the resizes committed themselves; the later write was made durable by fua
            await volume.write(200, pattern(2, 200, 4, SS), fua=True)
            reopened = path.parent / "crashed"
            reopened.mkdir()
            for name in os.listdir(path.parent):
                if name.startswith(path.name) and not name.endswith(("-shm", ".lock")):
                    (reopened / name).write_bytes((path.parent / name).read_bytes())
            reopened = reopened / path.name
            await volume.close()
        volume = await volumes(self.make(reopened, size=None), RawLayer(str(lower)))
        assert volume.entries[0].layer.smallest_size == 100
        data, _ = await volume.read(0, SECTORS)
        assert data == expected
        assert await volume.allocation(100, SECTORS - 100) == [
            (100, 200, -1), (200, 204, 0), (204, SECTORS, -1)
        ]  # fmt: skip

    async def test_new_layer_inherits_size_and_sector_size_from_below(
        self, path: Path, volumes: VolumeOpener
    ) -> None:
        volume = await volumes(
            self.make(path, size=None), RamLayer(size=64 * 4096, sector_size=4096)
        )
        assert (volume.sector_size, volume.sector_count) == (4096, 64)
        await volume.write(63, pattern(1, 63, 1, 4096))
        await volume.close()
        # an existing layer keeps its recorded size and sector size, whatever is below
        volume = await volumes(self.make(path, size=None))
        assert (volume.sector_size, volume.sector_count) == (4096, 64)
        data, present = await volume.read(63, 1)
        assert present == [(63, 64)] and data == pattern(1, 63, 1, 4096)

    async def test_a_cancelled_attach_leaves_the_layer_closed_and_unlocked(
        self, path: Path
    ) -> None:
        """A stop while the server starts cancels attaches in flight: the open, which runs
        in a thread, is undone once it ends, so the layer can be opened again."""
        attaching = asyncio.ensure_future(self.make(path).attach(None))
        await asyncio.sleep(0)  # the open is under way (or queued) in its thread
        attaching.cancel()
        with pytest.raises(asyncio.CancelledError):
            await attaching
        deadline = time.monotonic() + 10
        while True:
            layer = self.make(path)
            try:
                await layer.attach(None)
                break
            except ConfigError as exc:  # still locked: the first open has not been undone
                if "already open" not in str(exc) or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)
        await layer.close()

    async def test_existing_layer_refuses_a_disagreeing_config(self, path: Path) -> None:
        layer = self.make(path)
        await layer.attach(None)
        await layer.close()
        with pytest.raises(ConfigError, match=rf"{path}.*{SIZE}.*size = {2 * SIZE}"):
            await self.make(path, size=2 * SIZE).attach(None)
        with pytest.raises(ConfigError, match=rf"{path}.*512-byte.*sector_size = 4096"):
            await self.make(path, sector_size=4096).attach(None)
        layer = self.make(path, size=SIZE, sector_size=SS)  # agreeing is fine
        await layer.attach(None)
        await layer.close()

    async def test_no_size_and_nothing_below_is_a_config_error(self, path: Path) -> None:
        with pytest.raises(ConfigError, match=rf"{path}.*no size"):
            await self.make(path, size=None).attach(None)
        with pytest.raises(ConfigError, match="multiple"):
            await self.make(path, size=SIZE + 100).attach(None)
        with pytest.raises(ConfigError, match="power of two"):
            await self.make(path, sector_size=1000).attach(None)

    # -- exclusive open -----------------------------------------------------------------------

    async def test_a_second_open_is_refused_while_the_first_is_open(self, path: Path) -> None:
        first = self.make(path)
        await first.attach(None)
        try:
            with pytest.raises(ConfigError, match=rf"{path} is already open"):
                await self.make(path).attach(None)
            # the failed attempt did not disturb the first
            await first.write(memoryview(pattern(1, 0, 1, SS)), 0, True)
        finally:
            await first.close()
        again = self.make(path)
        await again.attach(None)
        try:
            data, runs = await self.read(again, 0, 1)
            assert runs == [(0, 1)] and data == pattern(1, 0, 1, SS)
        finally:
            await again.close()

    async def test_the_same_file_under_another_name_is_refused_while_open(self, path: Path) -> None:
        """A symlink to the open file, and a hard link to it (made while closed, as two
        volumes of one config would), are the same layer: refused, not opened twice."""
        first = self.make(path)
        await first.attach(None)
        await first.close()
        folder = os.path.dirname(path)
        os.link(path, os.path.join(folder, "hard"))
        os.symlink(path, os.path.join(folder, "soft"))
        first = self.make(path)
        await first.attach(None)
        try:
            for other in ("hard", "soft"):
                with pytest.raises(ConfigError, match="is already open"):
                    await self.make(Path(folder, other)).attach(None)
            await first.write(memoryview(pattern(1, 0, 1, SS)), 0, True)
            data, runs = await self.read(first, 0, 1)
            assert runs == [(0, 1)] and data == pattern(1, 0, 1, SS)
        finally:
            await first.close()

    async def test_a_new_layer_through_a_dangling_symlink_is_made_at_its_target(
        self, path: Path, tmp_path: Path
    ) -> None:
        """The link stays a link (a layer's file kept on another disk stays there)."""
        target = os.path.join(tmp_path, "elsewhere", "disk")
        os.makedirs(os.path.dirname(target))
        os.makedirs(os.path.dirname(path))
        os.symlink(target, path)
        layer = self.make(path)
        await layer.attach(None)
        try:
            await layer.write(memoryview(pattern(1, 3, 1, SS)), 3, True)
        finally:
            await layer.close()
        assert _kind(path) == "symlink" and _kind(target) == "file"
        again = self.make(path)
        await again.attach(None)
        try:
            data, runs = await self.read(again, 3, 1)
            assert runs == [(3, 4)] and data == pattern(1, 3, 1, SS)
        finally:
            await again.close()

    async def test_a_failed_creation_through_a_symlink_keeps_the_link(
        self, path: Path, tmp_path: Path
    ) -> None:
        """A creation that fails (here: files may not grow, as on a full disk) removes what
        it made at the link's target, never the link: the next start makes the layer there,
        not in the link's folder."""
        target = os.path.join(tmp_path, "elsewhere", "disk")
        os.makedirs(os.path.dirname(target))
        os.makedirs(os.path.dirname(path))
        os.symlink(target, path)
        with file_size_limit(SS), pytest.raises(TierdiskError):
            await self.make(path).attach(None)
        assert _kind(path) == "symlink"
        layer = self.make(path)
        await layer.attach(None)
        await layer.close()
        assert _kind(path) == "symlink" and _kind(target) == "file"

    async def test_a_dangling_symlink_into_a_missing_folder_says_so(
        self, path: Path, tmp_path: Path
    ) -> None:
        """An unmounted disk, say: the message names the link and the missing file, and
        nothing is made in the link's place or in the missing folder."""
        missing = os.path.join(tmp_path, "unmounted")
        os.makedirs(os.path.dirname(path))
        os.symlink(os.path.join(missing, "disk"), path)
        with pytest.raises(TierdiskError, match="No such file or directory") as info:
            await self.make(path).attach(None)
        assert "corrupt" not in str(info.value) and "map" not in str(info.value)
        assert _kind(path) == "symlink" and _kind(missing) == "nothing"

    async def test_a_path_that_is_not_a_regular_file_is_refused_and_left_alone(
        self, path: Path
    ) -> None:
        """A FIFO (or a device node, a folder) is never taken for an empty file and
        replaced by a new layer: refused as a storage problem ("cannot start")."""
        os.makedirs(os.path.dirname(path))
        os.mkfifo(path)
        with pytest.raises(StorageError, match=rf"{path} is not a regular file"):
            await asyncio.wait_for(self.make(path).attach(None), 10)
        assert stat.S_ISFIFO(os.lstat(path).st_mode)
        folder = os.path.join(os.path.dirname(path), "folder")
        os.mkdir(folder)
        with pytest.raises(StorageError, match=rf"{folder} is not a regular file"):
            await self.make(Path(folder)).attach(None)

    # -- out of space ---------------------------------------------------------------------------

    async def test_out_of_space_is_no_space_and_leaves_the_layer_consistent(
        self, tmp_path: Path
    ) -> None:
        ss, chunk = 4096, 64
        with tiny_filesystem(tmp_path / "tiny") as mnt:
            path = mnt / "disk"
            ballast = mnt / "ballast"  # what an operator deletes to make room again
            ballast.write_bytes(os.urandom(512 << 10))
            layer = self.make(path, size=16 << 20, sector_size=ss)
            await layer.attach(None)
            flushed: list[int] = []
            failed_at = None
            error: NoSpace | None = None
            try:
                for i in range(64):  # 16 MiB of writes into a 2 MiB filesystem
                    start = i * chunk
                    try:
                        await layer.write(memoryview(pattern(i, start, chunk, ss)), start, False)
                    except NoSpace as exc:
                        failed_at, error = start, exc
                        break
                    try:
                        await layer.flush()
                    except NoSpace as exc:
                        error = exc
                        break
                    flushed.append(start)
                assert error is not None, "the tiny filesystem never filled up"
                assert "out of space" in str(error) and str(path) in str(error)
                if failed_at is not None:  # the failed write changed nothing
                    data, runs = await self.read(layer, failed_at, chunk)
                    assert runs == [] and data == b"\xee" * chunk * ss
                present_before = layer.present_sectors
            finally:
                await layer.close()
            layer = self.make(path, size=None)
            await layer.attach(None)
            try:
                assert flushed, "nothing fitted at all"
                assert layer.present_sectors >= len(flushed) * chunk
                assert layer.present_sectors <= present_before
                for start in flushed:
                    data, runs = await self.read(layer, start, chunk)
                    assert runs == [(start, start + chunk)]
                    assert data == pattern(start // chunk, start, chunk, ss)
                # once there is room again, the layer goes on
                ballast.unlink()
                for start in flushed[:3]:
                    await layer.unmap(start, chunk, False, True)
                await layer.flush()
                await layer.write(memoryview(pattern(99, 0, chunk, ss)), 0, True)
                data, _ = await self.read(layer, 0, chunk)
                assert data == pattern(99, 0, chunk, ss)
            finally:
                await layer.close()

    async def test_a_write_over_the_file_size_limit_is_no_space_and_changes_nothing(
        self, path: Path
    ) -> None:
        """A process file size limit (``ulimit -f``, systemd's ``LimitFSIZE=``) that a write
        would cross fails it with ``EFBIG``: that is :class:`NoSpace` (RESOURCE_EXHAUSTED,
        "changed nothing"), not a storage failure, and the layer goes on once it is lifted."""
        layer = self.make(path)
        await layer.attach(None)
        try:
            await layer.write(memoryview(pattern(1, 0, 8, SS)), 0, False)
            await layer.flush()
            with file_size_limit(8 * SS), pytest.raises(NoSpace) as info:
                await layer.write(memoryview(pattern(2, 200, 16, SS)), 200, False)
                await layer.flush()
            assert "file size limit" in str(info.value) and str(path) in str(info.value)
            data, runs = await self.read(layer, 200, 16)
            assert runs == [] and data == b"\xee" * 16 * SS
            await layer.write(memoryview(pattern(3, 200, 16, SS)), 200, False)
            await layer.flush()
            data, runs = await self.read(layer, 0, 216)
            assert runs == [(0, 8), (200, 216)]
            assert data[: 8 * SS] == pattern(1, 0, 8, SS)
            assert data[200 * SS :] == pattern(3, 200, 16, SS)
        finally:
            await layer.close()

    # -- a model, with restarts in the middle ---------------------------------------------------

    @pytest.mark.parametrize("outcome", ["made", "failed"])
    async def test_a_shrink_shows_once_committed_and_reads_past_it_wait_for_its_outcome(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outcome: str
    ) -> None:
        """While a shrink is being committed the volume keeps its size and generation (what
        Inspect and WatchResize pair: never the new size with the old generation, which made
        a tier over this volume read its own lower layer's data for the tail), and a read
        past the new end waits for the outcome: refused once the shrink is made; if it fails,
        served what was written, never what the layer below holds there."""
        base = tmp_path / "base.raw"
        base.write_bytes(b"\xab" * 64 * SS)
        top = self.layer_class(str(tmp_path / "top"))
        volume = await Volume.open(
            "v", [LayerEntry(top, read_cache=True), LayerEntry(RawLayer(str(base)))]
        )
        go = threading.Event()
        try:
            await volume.write(40, pattern(2, 40, 1, SS))  # acknowledged; below it: 0xAB
            generation = volume.generation
            entered, go = self.hold_shrink(top, monkeypatch, fail=outcome == "failed")
            shrinking = asyncio.create_task(volume.resize(32))
            await asyncio.to_thread(entered.wait, 10)
            assert (volume.sector_count, volume.generation) == (64, generation)
            reading = asyncio.create_task(volume.read(40, 1))
            for _ in range(5):
                await asyncio.sleep(0)
            assert not reading.done(), "it waits for the shrink's outcome"
            go.set()
            if outcome == "made":
                await asyncio.wait_for(shrinking, 10)
                with pytest.raises(OutOfRange):
                    await asyncio.wait_for(reading, 10)
                assert (volume.sector_count, volume.generation) == (32, generation + 1)
            else:
                with pytest.raises(StorageError):
                    await asyncio.wait_for(shrinking, 10)
                data, _ = await asyncio.wait_for(reading, 10)
                assert data == pattern(2, 40, 1, SS)
                assert (volume.sector_count, volume.generation) == (64, generation)
        finally:
            go.set()
            await volume.close()

    def test_random_operations_match_a_model(self) -> None:
        """Random writes, fills, unmaps (both modes), flushes, resizes and close+reopen,
        checked after every step against a dict of sectors."""

        @settings(
            max_examples=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(ops=st.lists(_OPS, max_size=25))
        def check(ops: list[tuple[object, ...]]) -> None:
            with tempfile.TemporaryDirectory() as folder:
                asyncio.run(self._model_run(Path(folder) / "disk", ops))

        check()

    async def _model_run(self, path: Path, ops: list[tuple[object, ...]]) -> None:
        size = 64
        model: dict[int, bytes] = {}
        layer = self.make(path, size=size * SS)
        await layer.attach(None)
        try:
            for tag, op in enumerate(ops, start=1):
                name = op[0]
                if name in ("write", "fill", "unmap"):
                    first, wanted = op[1], op[2]
                    assert isinstance(first, int) and isinstance(wanted, int)
                    start = min(first, size - 1)
                    count = min(wanted, size - start)
                    sectors = range(start, start + count)
                    payload = memoryview(pattern(tag, start, count, SS))
                    if name == "write":
                        await layer.write(payload, start, bool(op[3]))
                        model.update((s, pattern(tag, s, 1, SS)) for s in sectors)
                    elif name == "fill":
                        await layer.write_no_overwrite(payload, start)
                        for s in sectors:
                            model.setdefault(s, pattern(tag, s, 1, SS))
                    else:
                        await layer.unmap(start, count, False, bool(op[3]))
                        for s in sectors:
                            if op[3]:
                                model.pop(s, None)
                            else:
                                model[s] = bytes(SS)
                elif name == "flush":
                    await layer.flush()
                elif name == "reopen":
                    await layer.flush()
                    await layer.close()
                    layer = self.make(path, size=None)
                    await layer.attach(None)
                else:
                    new_size = op[1]
                    assert isinstance(new_size, int)
                    size = new_size
                    await layer.resize(size)
                    model = {s: v for s, v in model.items() if s < size}
                assert layer.sector_count == size
                data, runs = await self.read(layer, 0, size)
                assert runs == runs_of(model), f"after {op}"
                assert await layer.presence(0, size) == runs_of(model)
                assert layer.present_sectors == len(model)
                for s in range(size):
                    got = data[s * SS : (s + 1) * SS]
                    assert got == model.get(s, b"\xee" * SS), f"sector {s} after {op}"
        finally:
            await layer.close()
