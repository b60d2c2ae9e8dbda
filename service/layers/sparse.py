"""The ``sparse`` layer: a persistent layer on the host's disk that tracks presence.

Files (sizes in bytes, sector numbers in the layer's ``sector_size``):

``<path>``
    The data file, ``sector_count * sector_size`` bytes, sparse: sector ``s`` lives at byte
    ``s * sector_size``. Sectors never written, or dropped by an unmap, are holes and take no
    disk space. It is ``flock``-ed exclusively while open, so a second open of the same layer
    (by this or another process) fails with a :class:`ConfigError` naming the path.
``<path>.map``
    The presence map (format in :mod:`.sparse_map`, written by :mod:`.sparse_log`): a
    checksummed header, a ``SNAP`` record holding every present run, then ``DIFF`` records
    appended at each flush (runs removed, runs added, the size). Compaction writes a fresh
    snapshot to ``<path>.map.tmp``, fsyncs it, renames it over the map and fsyncs the
    folder; it happens when the ``DIFF`` records outgrow ``max(snapshot bytes,
    COMPACT_MIN_BYTES)``, and at close.

In memory, presence is a :class:`~tierdisk.service.presence.RunSet` (16 bytes per run), so
a 1 TiB layer with 100,000 runs opens in tens of milliseconds (see ``bench/sparse_scale.py``).
Alongside it the layer keeps the changes not yet in the map (``added``: present in memory,
absent on disk; ``removed``: the opposite), also as runs: rewriting present sectors adds
nothing to the log.

Crash consistency. Writes update the data file in place and then presence in memory (reads
see them at once); the map learns of them only at the next commit (``flush``, a ``fua``
write, a resize, close). A commit takes the pending changes, ``fdatasync``-s the data file,
*then* appends one ``DIFF`` record and ``fdatasync``-s the map. So presence on disk never
names a sector whose data is not durable; a crash loses at most the writes after the last
commit (allowed: they were not flushed), and the sectors it leaves present hold their value
as of that commit or a later acknowledged one. An unmap that drops sectors punches the hole
at once: if the crash comes before the ``DIFF`` that removes them, they read as zeros, which
is the later acknowledged (unmapped) state. The blocks of the writes a crash lost are
punched out after the next open, in the background
(:meth:`SparseLayer._give_back_lost_blocks`), so they hold no disk space for good. Only the
last record can be torn; on open a torn tail (bad length or crc32) is logged and cut off,
while a corrupt header, snapshot or middle record is :class:`DataCorruption`. Sector
atomicity is the page cache's (SIGKILL) and the device's (power cut), as for any block
device.

All file work that can block runs off the event loop (a read the page cache serves whole
is done on the loop with ``RWF_NOWAIT``, which never blocks). Mutations (write,
no-overwrite write, unmap, resize) run one at a time on one writer thread per layer, which
also updates presence, so a read-cache fill never overwrites a sector a write reached
first; reads and commits use the default executor and run alongside. Reads hold their
sectors shared, and writes, fills and unmaps exclusive, from before they are queued to the
writer until they end (:class:`~tierdisk.service.sector_lock.SectorLock`): the kernel lets a
buffered read copy a page while a write copies into it, which returns a torn sector
(DESIGN.md §3 allows old or new per sector, never torn). A ``threading.Lock`` guards
the run sets for the few microseconds of each lookup or update (a compaction holds it while
it copies the runs, about 20 ms per 100,000 runs, and an unmap or a shrink while it edits
them, about 0.5 s per 100,000 runs it drops, up to 2 s on a busy machine; the filesystem's
hole punching comes after, outside the lock): the event loop never waits for it, a lookup
that finds it taken asks again every few milliseconds (so reads of the layer wait that
long).

Out of space. Before writing, the layer reserves the blocks (``fallocate`` with
``FALLOC_FL_KEEP_SIZE``); if that fails with ``ENOSPC`` nothing was written, the reserved
blocks of sectors the layer does not hold are punched out again, and the write raises
:class:`NoSpace` (RESOURCE_EXHAUSTED). A commit that cannot append its record truncates the
map back and keeps its changes pending, so the layer stays consistent and a later flush
retries; a FUA write whose commit fails so has its data in place already, and raises
:class:`StorageError` (INTERNAL) saying so instead of ``NoSpace`` ("changed nothing").
A grow to a size the filesystem refuses (``EFBIG``) is :class:`FailedPrecondition`, one
over ``2**63 - 1`` bytes :class:`InvalidArgument` (both from
:func:`~tierdisk.service.fileio.set_file_size`); the layer keeps its size, presence and data.

Semantics: ``unmap_behavior`` is ZEROES: with ``next_is_zero`` the sectors are dropped
(punched, absent), otherwise they are punched and stay present as zeros. It can
``write_no_overwrite`` (so it can be a read cache), resize (growing exposes zeros), and
honours FUA. A layer that exists keeps its recorded size and sector size; a configured
``size`` or ``sector_size`` that disagrees is a :class:`ConfigError` naming the path. A new
one takes ``size``, else the layer below's; with neither it is a :class:`ConfigError`. Files
that cannot be opened, read, created or sized are a :class:`StorageError` (``tierdisk
serve`` then says "cannot start", not "config error"), a presence map whose data file is
gone a :class:`DataCorruption`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from array import array
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ..errors import (
    ConfigError,
    DataCorruption,
    InvalidArgument,
    NoSpace,
    StorageError,
    TierdiskError,
)
from ..fileio import (
    PartlyWritten,
    Reserver,
    as_storage_error,
    changed_in_part,
    check_still_named,
    lock_or_refuse,
    make_parent_folder,
    missing_target,
    pread_cached,
    pread_into,
    punch_hole,
    punch_unused_blocks,
    pwrite_all,
    regular_file_size,
    set_file_size,
    zero_range,
)
from ..layer import LayerMetadata, PartialLayer, check_recorded_geometry, layer_closed, new_geometry
from ..presence import RunSet
from ..runs import Run, complement, subtract, total
from ..sector_lock import EVERY_SECTOR, SectorLock
from ..unstoppable import run_to_end
from . import sparse_map
from .layer_files import refuse_another_kinds_file
from .sparse_log import MapLog
from .sparse_map import HEADER_SIZE, flat

__all__ = ["COMPACT_MIN_BYTES", "SparseLayer"]

log = logging.getLogger(__name__)

COMPACT_MIN_BYTES = 1 << 20
"""``DIFF`` bytes the map may hold before compaction, whatever the snapshot's size. With a
100,000-run snapshot, replaying the worst-case log costs about 0.4 s at open."""
IDLE_LOOK_SECONDS = 0.01
"""A flush with nothing to commit looks at the files unless a look found them in place
less than this long ago (:meth:`SparseLayer._check_files_when_idle`)."""

_GAPS_PER_STEP = 4096
"""Present runs one step of :meth:`SparseLayer._give_back_lost_blocks` looks between (about
10 ms on ext4 when the gaps hold nothing) before the writer thread takes the next
mutation."""

_T = TypeVar("_T")


class SparseLayer(PartialLayer):
    """A sparse data file at ``path`` plus its presence map ``path + ".map"``.

    ``size`` (bytes) and ``sector_size`` apply when the layer is created; an existing layer
    must agree with them when they are given.
    """

    kind = "sparse"

    def __init__(self, path: str, size: int | None = None, sector_size: int | None = None) -> None:
        super().__init__()
        self.path = path
        self.map_path = sparse_map.map_path(path)
        self._size_bytes = size
        self._wanted_sector_size = sector_size
        self._fd = -1
        self._writer: ThreadPoolExecutor | None = None
        # Guarded by _lock (shared between the loop, the writer and commits):
        self._lock = threading.Lock()
        self._present = RunSet()
        self._added = RunSet()  # present in memory, absent in the map on disk
        self._removed = RunSet()  # absent in memory, present in the map on disk
        self._size = 0  # the size the next record carries, in sectors
        self._smallest = 0  # the smallest size the layer has had (the next record carries it)
        self._dirty = False  # data file changed since its last fdatasync
        self._changes = 0  # mutations completed so far
        self._shrinks = 0  # shrinks begun (loop thread): a fill from before one is dropped
        # Owned by commits (under _commit_lock) and open/close:
        self._committed = 0  # _changes covered by the last successful commit
        self._files_found_at = -IDLE_LOOK_SECONDS  # (monotonic) a look found them in place
        self._logged_size = 0
        self._logged_smallest = 0
        self._map_log = MapLog(self.map_path)  # the map file, and where its log stands
        self._reserve = Reserver()
        self._commit_lock = asyncio.Lock()
        self._resizing = asyncio.Lock()  # a grow never comes between a shrink and its cut
        self._sectors = SectorLock()  # reads shared, mutations exclusive: no torn sector

    # -- open and close -------------------------------------------------------------------

    @property
    def configured_size(self) -> int | None:
        return self._size_bytes

    async def attach(self, lower: LayerMetadata | None) -> None:
        await self._open_in_thread(lambda: self._open(lower), self._close_files)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sparse-writer")
        self._writer.submit(self._give_back_lost_blocks)

    def _open(self, lower: LayerMetadata | None) -> None:
        what = f"sparse layer {self.path}"
        make_parent_folder(self.path, what)
        refuse_another_kinds_file(self.path, "sparse", what)  # a sqlite layer's database
        has_map = os.path.exists(self.map_path)
        new_file = not has_map and regular_file_size(self.path, what) is None
        flags = os.O_RDWR | os.O_CLOEXEC | (0 if has_map else os.O_CREAT)
        try:
            fd = os.open(self.path, flags, 0o644)
        except FileNotFoundError:
            if has_map:
                raise DataCorruption(
                    f"sparse layer {self.path}: its presence map {self.map_path} exists but "
                    "the data file is missing"
                ) from None
            raise missing_target(what, self.path) from None
        except OSError as exc:
            raise StorageError(f"cannot open sparse layer {self.path}: {exc.strerror}") from None
        try:
            lock_or_refuse(fd, f"sparse layer {self.path}")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.map_path + ".tmp")  # a compaction cut short by a crash
            self._fd = fd
            if os.path.exists(self.map_path):
                self._load()
            else:
                self._create(lower, new_file)
        except BaseException:
            self._fd = -1
            self._map_log.close()
            os.close(fd)
            raise

    def _create(self, lower: LayerMetadata | None, new_file: bool) -> None:
        """Write the map (which makes the layer exist), then size the data file: a crash
        between the two leaves an empty layer whose data file :meth:`_load` sizes (the other
        way round, a full-size data file without a map, was refused at every start). A
        create that fails leaves nothing behind: no map, and no data file when it made one,
        so a corrected config starts afresh."""
        existing = os.fstat(self._fd).st_size
        if existing:
            raise ConfigError(
                f"sparse layer {self.path}: the data file exists ({existing} bytes) but its "
                f"presence map {self.map_path} does not, so which of its sectors hold data "
                "is unknown; refusing to treat it as empty. If the map was lost, restore it "
                "(as a raw image every sector would count as present: its holes would read "
                "as zeros over the layers below); if the file is a raw image, serve it as kind "
                '= "raw"'
            )
        try:
            ss, count = new_geometry(
                f"sparse layer {self.path}", self._size_bytes, self._wanted_sector_size, lower
            )
        except ConfigError:
            self._unmake(new_file)
            raise
        self._set_geometry(ss, count)
        try:
            self._map_log.write_snapshot(self._sector_size, array("q"), count, count)
            os.ftruncate(self._fd, count * ss)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(self.map_path)  # there was none: _create runs only then
            self._unmake(new_file)
            raise StorageError(
                f"cannot create sparse layer {self.path} of {count * ss} bytes: {exc.strerror}"
            ) from None
        self._size = self._logged_size = count
        self._smallest = self._logged_smallest = count

    def _unmake(self, new_file: bool) -> None:
        """Undo a create that failed: the data file emptied again, and removed when the
        create made it (``new_file``)."""
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
            if new_file:
                os.unlink(os.path.realpath(self.path))  # the file made, not a link to it

    def _load(self) -> None:
        blob = self._map_log.read()
        state = sparse_map.parse(blob, self.map_path)
        ss, count = state.sector_size, state.sector_count
        check_recorded_geometry(
            f"sparse layer {self.path}", ss, count, self._wanted_sector_size, self._size_bytes
        )
        if state.torn:
            log.warning(
                "sparse layer %s: ignoring %d bytes of torn or corrupt records at the end of "
                "%s (offset %d); the layer opens as of its last complete flush",
                self.path,
                state.torn,
                self.map_path,
                state.end,
            )
            self._map_log.cut_torn_tail(state.end)
        data_bytes = os.fstat(self._fd).st_size
        if data_bytes < count * ss and state.present.last_end() * ss > data_bytes:
            raise DataCorruption(
                f"sparse layer {self.path}: the data file is {data_bytes} bytes but its "
                f"presence map holds sectors up to byte {state.present.last_end() * ss} "
                "(truncated or replaced?)"
            )
        if data_bytes != count * ss:  # a resize or create cut short by a crash
            try:
                os.ftruncate(self._fd, count * ss)
            except OSError as exc:
                raise StorageError(
                    f"cannot size sparse layer {self.path} to the {count * ss} bytes its "
                    f"presence map records: {exc.strerror}"
                ) from None
        self._set_geometry(ss, count)
        self._present = state.present
        self._size = self._logged_size = count
        self._smallest = self._logged_smallest = state.smallest
        self._map_log.resume(state)

    def _give_back_lost_blocks(self, sector: int = 0, freed: int = 0) -> None:
        """Punch out the data of sectors the map does not hold: writes and fills after the
        last commit of a run that did not stop cleanly (a crash, a kill, a final flush that
        failed, say on a full disk). They read from below now, so their blocks held space
        for nothing, for good; on a full disk that space is what the restart needs.

        Runs on the writer thread, queued at attach, over the gaps before the next
        :data:`_GAPS_PER_STEP` present runs from ``sector`` at a time (each step queues the
        next), so the open does not wait for it and mutations wait at most one step: one
        ``lseek`` per gap without data, ~0.25 s per 100,000 gaps on ext4 in all. Mutations
        run on the same thread, so each step sees presence as it is. A close, and a step
        that finds a shrink under way, leave the rest to the next open. A failure is
        logged, not raised: the layer is whole without it."""
        if self._fd < 0:
            return
        ss = self._sector_size
        with self._lock:
            # Up to the size as a shrink under way set it, never into the sectors it
            # dropped: reads that began before it may still copy them (the file is cut only
            # once they end), and a shrink whose commit fails marks them present again.
            size = self._size
            runs = self._present.first_runs(sector, _GAPS_PER_STEP)
            end = min(runs[-1][1] if len(runs) == _GAPS_PER_STEP else size, size)
            gaps = complement(sector, end, runs)  # (none when a shrink put end below sector)
        try:
            freed += punch_unused_blocks(self._fd, [(a * ss, b * ss) for a, b in gaps])
            if end < size:
                writer = self._writer
                if writer is not None:
                    with contextlib.suppress(RuntimeError):  # shut down: the next open
                        writer.submit(self._give_back_lost_blocks, end, freed)
                        return
        except OSError as exc:
            log.warning(
                "sparse layer %s: could not give back the blocks of writes lost at an "
                "unclean stop: %s",
                self.path,
                exc.strerror,
            )
        if freed:
            log.info(
                "sparse layer %s: gave back %d bytes of disk that held writes lost at an "
                "unclean stop (never flushed)",
                self.path,
                freed,
            )

    async def close(self) -> None:
        """Let the writes, fills and unmaps under way finish (refusing new ones), commit
        them with the rest, and close the files. A mutation that reaches the layer after
        this began is ``UNAVAILABLE`` (:func:`layer_closed`); none is acknowledged without
        being committed. A commit that fails (the files removed, the disk failing) is
        raised once the files are closed: the server counts it as a failed final flush."""
        if self._fd < 0:
            return
        token = await self._sectors.hold_for_close()
        if token is None:
            return
        failure: Exception | None = None
        try:
            await self._commit(compact=True)
        except Exception as exc:
            failure = exc
        finally:
            writer, self._writer = self._writer, None  # later mutations: layer_closed
            if writer is not None:
                await asyncio.get_running_loop().run_in_executor(None, writer.shutdown)
            self._close_files()
            self._sectors.release(token)
        if failure is not None:
            raise StorageError(
                f"sparse layer {self.path}: the flush at close failed: {failure}"
            ) from failure

    def _close_files(self) -> None:
        """Close the map and the data file (which releases the lock)."""
        self._map_log.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- capabilities -----------------------------------------------------------------------

    @property
    def present_sectors(self) -> int:
        return self._present.sectors

    @property
    def smallest_size(self) -> int:
        return self._smallest

    # -- I/O ----------------------------------------------------------------------------------

    async def _on_writer(self, what: str, fn: Callable[..., _T], *args: Any) -> _T:
        """Run a mutation on the layer's writer thread (in submission order);
        :func:`layer_closed` once :meth:`close` has begun shutting the thread down."""
        writer = self._writer
        if writer is None:
            raise layer_closed(f"sparse layer {self.path}")
        try:
            # Cancelled meanwhile, the caller's holds last until the thread is done.
            return await run_to_end(asyncio.get_running_loop().run_in_executor(writer, fn, *args))
        except OSError as exc:
            raise as_storage_error(exc, f"{what} sparse layer {self.path}") from None

    async def read(self, buf: memoryview, sector: int) -> list[Run]:
        ss = self._sector_size
        count = len(buf) // ss
        self._check_range(sector, count)
        if self._shrink_end is not None:
            await self._await_shrink(sector, count)
        lock = self._sectors
        token = lock.try_shared(sector, sector + count)
        if token is None:  # a write of some of these sectors is under way: after it
            token = await lock.acquire_shared(sector, sector + count)
            try:
                # A shrink begun meanwhile may be dropping sectors past its end: reading
                # them now as absent would let the layers below show through (their
                # overlaps are lowered only once the shrink is committed). The read comes
                # after its outcome.
                if self._shrink_end is not None:
                    await self._await_shrink(sector, count)
                else:
                    self._check_range(sector, count)
            except BaseException:
                lock.release(token)
                raise
        try:
            if self._fd < 0:
                raise layer_closed(f"sparse layer {self.path}")
            runs = self._runs_now(sector, count)
            if runs is None:  # a long mutation holds the run sets: not the loop's to wait for
                runs = await self._runs_when_free(sector, count)
            if runs and not self._read_runs_cached(buf, sector, runs):
                await asyncio.get_running_loop().run_in_executor(
                    None, self._read_runs, buf, sector, runs
                )
        except OSError as exc:
            raise as_storage_error(exc, f"reading sparse layer {self.path}") from None
        finally:
            lock.release(token)
        return runs

    def _read_runs_cached(self, buf: memoryview, sector: int, runs: list[Run]) -> bool:
        """Read the runs without blocking if the page cache holds them all."""
        ss = self._sector_size
        return all(
            pread_cached(self._fd, buf[(a - sector) * ss : (b - sector) * ss], a * ss)
            for a, b in runs
        )

    def _read_runs(self, buf: memoryview, sector: int, runs: list[Run]) -> None:
        ss = self._sector_size
        for a, b in runs:
            pread_into(self._fd, buf[(a - sector) * ss : (b - sector) * ss], a * ss)

    async def presence(self, sector: int, count: int) -> list[Run]:
        if self._shrink_end is not None:
            await self._await_shrink(sector, count)
        runs = self._runs_now(sector, count)
        return runs if runs is not None else await self._runs_when_free(sector, count)

    def _runs_now(self, sector: int, count: int) -> list[Run] | None:
        """The present runs of ``[sector, sector + count)``, or None if the run sets' lock
        is taken (the loop never waits for it: :meth:`_runs_when_free`)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return self._present.runs_in(sector, sector + count)
        finally:
            self._lock.release()

    async def _runs_when_free(self, sector: int, count: int) -> list[Run]:
        """The present runs of ``[sector, sector + count)`` once the run sets' lock is free:
        a mutation on the writer thread holds it as long as it edits the sets (an unmap, a
        shrink or a compaction over a million runs: seconds), and every client of the server
        would wait if the loop did. Asked again every few milliseconds (no thread parked:
        the default executor's few threads serve every layer's file I/O). A shrink begun
        meanwhile is waited for first, as on the way in, and the runs looked up right after
        (a lookup taking sectors it cuts for absent would let the layers below show
        through)."""
        delay = 0.0005
        while True:
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.005)
            if self._shrink_end is not None:
                await self._await_shrink(sector, count)
            runs = self._runs_now(sector, count)
            if runs is not None:
                return runs

    async def _mutate(
        self, what: str, start: int, end: int, fn: Callable[..., _T], *args: Any
    ) -> _T:
        """Run the mutation ``fn`` of sectors ``[start, end)`` on the writer thread, holding
        them exclusive: no read copies those pages meanwhile (a torn sector)."""
        if self._shrink_end is not None:
            await self._await_shrink(start, end - start)
        token = await self._sectors.acquire_exclusive(start, end)
        try:
            if self._sectors.closing:
                raise layer_closed(f"sparse layer {self.path}")
            return await self._on_writer(what, fn, *args)
        finally:
            self._sectors.release(token)

    async def write(self, data: memoryview, sector: int, fua: bool) -> None:
        end = sector + len(data) // self._sector_size
        self._check_range(sector, end - sector)
        await self._mutate("writing", sector, end, self._write_sync, data, sector, False, None)
        if fua:
            try:
                await self._commit()
            except NoSpace as exc:  # the data is in place: "changed nothing" would be false
                raise exc.after_a_change(
                    "the data was written (reads return it) but is durable only after a "
                    "flush succeeds"
                ) from None

    async def write_no_overwrite(self, data: memoryview, sector: int) -> int:
        """A read-cache fill: only the sectors absent. A fill that waited (for this layer's
        sector lock, or its writer thread) across a shrink is dropped whole: its data was
        read from below before the shrink, and past the new end it would bring stale data
        back into view after a grow, or leave the map holding sectors past the layer's size
        (a layer that would not open again)."""
        return await self._write_absent(data, sector, self._shrinks)

    async def write_holes(self, data: memoryview, sector: int) -> int:
        """A caller's write of the sectors absent: never dropped (its data is the caller's,
        not stale; a shrink that cut its range makes it ``OUT_OF_RANGE``)."""
        return await self._write_absent(data, sector, None)

    fill_runs_at_once = 128

    async def fill_runs(
        self, data: memoryview, sector: int, runs: list[Run], *, callers: bool = False
    ) -> int:
        """Every run's fill (or ``callers``' write of holes) in one job of the writer thread
        (a hand-off each cost ~80 µs: a read over a cache fragmented into thousands of runs
        spent seconds on them). The sectors from the first run's start to the last one's
        end are held meanwhile."""
        if not runs:
            return 0
        start, end = runs[0][0], runs[-1][1]
        self._check_range(start, end - start)
        ss = self._sector_size
        covering = data[(start - sector) * ss : (end - sector) * ss]
        fill_after = None if callers else self._shrinks
        return await self._mutate(
            "writing", start, end, self._write_sync, covering, start, True, fill_after, runs
        )

    async def _write_absent(self, data: memoryview, sector: int, fill_after: int | None) -> int:
        end = sector + len(data) // self._sector_size
        self._check_range(sector, end - sector)
        return await self._mutate(
            "writing", sector, end, self._write_sync, data, sector, True, fill_after
        )

    def _write_sync(
        self,
        data: memoryview,
        sector: int,
        holes: bool,
        fill_after: int | None,
        within: list[Run] | None = None,
    ) -> int:
        """Write ``data`` at ``sector``, or with ``holes`` only the sectors absent (of the
        runs ``within``, when given); a fill (``fill_after``: the shrinks begun when it was
        asked for) writes nothing if a shrink began since. Returns the sectors written."""
        ss = self._sector_size
        end = sector + len(data) // ss
        if end == sector or (fill_after is not None and fill_after != self._shrinks):
            return 0
        with self._lock:
            held = self._present.runs_in(sector, end)
        absent = complement(sector, end, held) if within is None else subtract(within, held)
        targets = absent if holes else [(sector, end)]
        if not targets:
            return 0
        try:
            for a, b in targets:
                self._reserve(self._fd, a * ss, (b - a) * ss)
            for a, b in targets:
                pwrite_all(self._fd, data[(a - sector) * ss : (b - sector) * ss], a * ss)
        except OSError as exc:
            for a, b in absent:  # nothing reads these sectors: give their blocks back
                with contextlib.suppress(OSError):
                    punch_hole(self._fd, a * ss, (b - a) * ss)
            if isinstance(exc, PartlyWritten) and held and not holes:  # held ones may be new
                raise changed_in_part(exc, f"writing sparse layer {self.path}") from None
            raise
        with self._lock:
            for a, b in targets:
                self._mark_present(a, b)
            self._dirty = True
            self._changes += 1
        return total(targets)

    async def unmap(
        self, sector: int, count: int, block_level_only: bool, next_is_zero: bool
    ) -> None:
        self._check_range(sector, count)
        if count:
            await self._mutate(
                "unmapping in",
                sector,
                sector + count,
                self._unmap_sync,
                sector,
                count,
                next_is_zero,
            )

    def _unmap_sync(self, sector: int, count: int, next_is_zero: bool) -> None:
        ss = self._sector_size
        if next_is_zero:
            punch_hole(self._fd, sector * ss, count * ss)  # unsupported: the data just stays
        else:
            zero_range(self._fd, sector * ss, count * ss)
        with self._lock:
            if next_is_zero:
                self._mark_absent(sector, sector + count)
            else:
                self._mark_present(sector, sector + count)
            self._dirty = True
            self._changes += 1

    def _mark_present(self, a: int, b: int) -> None:
        """Make ``[a, b)`` present, noting what the map on disk must learn (under _lock)."""
        for x, y in complement(a, b, self._present.runs_in(a, b)):
            back = self._removed.runs_in(x, y)  # present on disk already
            for p, q in back:
                self._removed.remove(p, q)
            for p, q in complement(x, y, back):
                self._added.add(p, q)
        self._present.add(a, b)

    def _mark_absent(self, a: int, b: int) -> None:
        """Make ``[a, b)`` absent, noting what the map on disk must learn (under _lock)."""
        for x, y in self._present.runs_in(a, b):
            fresh = self._added.runs_in(x, y)  # never reached the disk's map
            for p, q in fresh:
                self._added.remove(p, q)
            for p, q in complement(x, y, fresh):
                self._removed.add(p, q)
        self._present.remove(a, b)

    # -- flush ----------------------------------------------------------------------------------

    async def flush(self) -> None:
        await self._commit()

    async def _commit(self, *, compact: bool = False) -> None:
        """Make every mutation completed so far durable (group commit: a caller whose
        mutations an earlier commit already covered returns at once)."""
        target = self._changes
        async with self._commit_lock:
            if self._committed >= target and not compact:
                self._check_files_when_idle()
                return
            await self._commit_locked(compact)

    async def _commit_locked(self, compact: bool = False) -> None:
        try:
            seen = await run_to_end(  # cancelled, the lock is held until the thread is done
                asyncio.get_running_loop().run_in_executor(None, self._commit_sync, compact)
            )
        except OSError as exc:
            raise as_storage_error(exc, f"flushing sparse layer {self.path}") from None
        self._committed = max(self._committed, seen)
        self._files_found_at = time.monotonic()  # (the commit looked: _check_files)

    def _commit_sync(self, compact: bool) -> int:
        with self._lock:
            added, removed = self._added, self._removed
            self._added, self._removed = RunSet(), RunSet()
            size, smallest = self._size, self._smallest
            dirty, self._dirty = self._dirty, False
            seen = self._changes
            changed = (
                bool(added)
                or bool(removed)
                or size != self._logged_size
                or smallest != self._logged_smallest
            )
            map_log = self._map_log
            diff_bytes = map_log.log_end - map_log.snapshot_end
            snapshot_bytes = map_log.snapshot_end - HEADER_SIZE
            snapshot = (
                map_log.rewrite
                or (compact and (changed or diff_bytes > 0))
                or diff_bytes > max(snapshot_bytes, COMPACT_MIN_BYTES)
            )
            runs = flat(self._present) if snapshot else None
        try:
            self._check_files(size)
            if dirty:
                os.fdatasync(self._fd)  # data first: the map must never get ahead of it
            if runs is not None:
                try:
                    map_log.write_snapshot(self._sector_size, runs, size, smallest)
                except OSError as exc:
                    if map_log.rewrite:
                        raise
                    log.warning("sparse layer %s: compaction failed: %s", self.path, exc)
                    runs = None
            if runs is None and changed:
                map_log.append(removed, added, size, smallest)
        except BaseException:
            with self._lock:
                self._restore(added, removed, dirty)
            raise
        self._logged_size, self._logged_smallest = size, smallest
        return seen

    def _check_files_when_idle(self) -> None:
        """For a flush with nothing to commit: that the files are still there
        (:meth:`_check_files`), unless a commit or such a look found them so less than
        :data:`IDLE_LOOK_SECONDS` ago. Under concurrent writers most flushes find their
        writes committed by another, and a look in each cost 10-15% of 4 writers'
        write+flush loop. Only a look that found them counts: once one fails, every flush
        looks (and fails) until they are back. A file removed under an idle volume is told
        at its next flush, unless that flush comes within 10 ms of a look before the
        removal (with 4 writers, looks went from one per flush to about one per 10 ms)."""
        now = time.monotonic()
        if self._fd < 0 or now - self._files_found_at < IDLE_LOOK_SECONDS:
            return
        try:
            self._check_files(self._size)
        except OSError as exc:
            raise as_storage_error(exc, f"flushing sparse layer {self.path}") from None
        self._files_found_at = now

    def _check_files(self, size: int) -> None:
        """Both files are still the ones at their paths, not cut short by someone else
        (:func:`~..fileio.check_still_named`): a commit into files that have no name, or
        that lost what the map says they hold, would make nothing durable."""
        what = f"flushing sparse layer {self.path}"
        check_still_named(self.path, os.fstat(self._fd), what, at_least=size * self._sector_size)
        map_log = self._map_log
        check_still_named(self.map_path, os.fstat(map_log.fd), what, at_least=map_log.log_end)

    def _restore(self, added: RunSet, removed: RunSet, dirty: bool) -> None:
        """Put back changes a failed commit took, under the ones made since (under _lock)."""
        for a, b in self._removed:
            added.remove(a, b)
            removed.add(a, b)
        for a, b in self._added:
            removed.remove(a, b)
            added.add(a, b)
        self._added, self._removed = added, removed
        self._dirty = self._dirty or dirty

    # -- resize ---------------------------------------------------------------------------------

    async def resize(self, sector_count: int) -> None:
        """Resize the layer; runs to its end if the caller is cancelled meanwhile (a shrink
        done on the writer thread and then undone in memory only left a map of the smaller
        size under a layer of the larger one)."""
        await run_to_end(self._resize(sector_count))

    async def _resize(self, sector_count: int) -> None:
        if sector_count <= 0:
            raise InvalidArgument(
                f"sparse layer {self.path}: size must be at least one sector, not {sector_count}"
            )
        async with self._resizing:  # one at a time, its file cut included
            await self._resize_locked(sector_count)

    async def _resize_locked(self, sector_count: int) -> None:
        cut = False
        async with self._commit_lock:
            old = self._sector_count
            if sector_count < old:
                self._shrinks += 1  # fills asked for before now are dropped (write_no_overwrite)
                with self._shrinking(sector_count):  # I/O past the new end waits for it
                    smallest = self._smallest
                    dropped = await self._on_writer("resizing", self._shrink_sync, sector_count)
                    try:
                        await self._commit_locked()
                    except BaseException:
                        await self._on_writer(
                            "resizing", self._unshrink_sync, old, smallest, dropped
                        )
                        raise
                    self._sector_count = sector_count
                    self._notify_resized()  # committed: the volume learns of it whatever follows
                cut = True
            elif sector_count > old:
                await self._on_writer("resizing", self._grow_sync, old, sector_count)
                try:
                    await self._commit_locked()
                except BaseException:
                    await self._on_writer("resizing", self._grow_sync, sector_count, old)
                    raise
                self._sector_count = sector_count
                self._notify_resized()
        if cut:  # (not under the commit lock: close holds every sector, then commits)
            await self._cut_data_file(sector_count)

    async def _cut_data_file(self, sector_count: int) -> None:
        """Cut the data file to ``sector_count`` sectors after a shrink was committed, once
        the reads of the cut sectors still copying (begun before it) are done: a file cut
        under them would give them zeros. A failure leaves only space allocated past the
        end, which a grow or the next open cuts off (:meth:`_grow_sync`, :meth:`_load`)."""
        token = await self._sectors.acquire_exclusive(sector_count, EVERY_SECTOR)
        try:
            await self._on_writer(
                "resizing", os.ftruncate, self._fd, sector_count * self._sector_size
            )
        except TierdiskError as exc:
            log.warning(
                "sparse layer %s: shrunk, but its data file was not cut to the new size: %s",
                self.path,
                exc,
            )
        finally:
            self._sectors.release(token)

    def _shrink_sync(self, size: int) -> list[Run]:
        with self._lock:
            dropped = self._present.runs_in(size, self._size)
            self._mark_absent(size, self._size)
            self._size = size
            self._smallest = min(self._smallest, size)
            self._changes += 1
        return dropped

    def _unshrink_sync(self, size: int, smallest: int, dropped: list[Run]) -> None:
        with self._lock:
            for a, b in dropped:
                self._mark_present(a, b)
            self._size, self._smallest = size, smallest
            self._changes += 1

    def _grow_sync(self, old: int, size: int) -> None:
        ss = self._sector_size
        os.ftruncate(self._fd, min(old, size) * ss)  # whatever lay past the end goes
        set_file_size(self._fd, size * ss, f"resizing sparse layer {self.path}")
        with self._lock:
            self._size = size
            self._changes += 1

    # -- diagnostics ----------------------------------------------------------------------------

    def inspect(self) -> dict[str, Any]:
        details: dict[str, Any] = {
            "path": os.path.abspath(self.path),
            "map_path": os.path.abspath(self.map_path),
            "present_runs": len(self._present),
            "unflushed_runs": len(self._added) + len(self._removed),
        }
        if self._fd >= 0:
            st = os.fstat(self._fd)
            details["file_bytes"] = st.st_size
            details["allocated_bytes"] = st.st_blocks * 512
            details["map_bytes"] = self._map_log.log_end
        return details
