"""The layered-disk engine: a stack of layers served as one volume (DESIGN.md §3).

Index 0 is the top. A read takes each sector from the topmost layer that holds it, asking
each layer only for the runs still missing; sectors no layer holds read as zeros. A lower
layer ``i`` is only visible below its *overlap* (the smallest size of layers ``0..i``),
computed at open and lowered, never raised, when a layer above it shrinks (the top, or a
``remote`` layer whose origin shrank); a layer that persists its smallest size
(``sparse``, ``sqlite``, ``remote``: :attr:`Layer.smallest_size`) keeps it lowered across
restarts, so shrink, grow and restart still shows zeros there. Writes land on the top and
on down through ``write_through`` layers, each taking all of a write within its own size
(past its overlap too: it is the durable copy), and a resize resizes them with the top.
``read_cache`` layers are filled (no-overwrite) with what the layers below returned, before
the read replies. A write or unmap that a write-path layer fails after the layers above it
took it is dropped from them again where they can (``ram``, ``sparse``, ``sqlite``), so reads
show the layers below and no layer keeps a change the ones below it lack; where one cannot
(``raw``, ``remote``), a failure for space is a :class:`StorageError`, not :class:`NoSpace`
(which says nothing changed), saying reads return a change that is not durable.

Fixes of upstream ``disk_layered`` defects: a lower layer smaller than the top never aborts
or crashes a read (runs past its overlap are skipped); a read cache below the top never
hands the caller stale bytes (every layer reads straight into the caller's buffer and fills
copy from it); fills are clipped to the cache's own size; unmaps are split at a lower
layer's overlap; a write through a smaller lower layer is written where it fits and then
fails (:class:`StorageError`), rather than failing whole at that layer.

Races: a fill never overwrites (a write that landed meanwhile wins); a read whose volume
changed size, or whose overlaps were lowered, while it ran skips its fills (its lower data
may lie past a lowered overlap); every size change of a layer reaches the overlaps
synchronously (a resize listener on each), so a shrink undone before any task runs still
hides the lower layers' tails. A write at a
misaligned byte offset (:meth:`Volume.write_at`, the NBD export's read-modify-write) holds
its covering sectors exclusive in the volume's :class:`SectorLock`, which every write and
unmap honours, so no acknowledged write or unmap of those sectors is undone by it. On a
write path of several layers a write or unmap runs to its end when its caller is cancelled
(a deadline, a stop; :func:`~tierdisk.service.unstoppable.run_to_end`), the cancel raised
after: cut off between two layers, the top would keep what the durable layer below never
got, and reads would return it until the top is lost (a ``ram`` top at a restart), then the
older value again. One that then fails in a layer (nobody left to tell) is logged. Those left
running so are bounded: while they hold :data:`LEFT_RUNNING_LIMIT` bytes or more, a new write
or unmap on such a path waits for room before it starts (its caller may leave meanwhile,
with nothing written), and that is logged.

The construction rules and the stack's properties derived from its layers are in
:mod:`tierdisk.service.stack_rules`; size generations and the events resize watchers get
are in :mod:`tierdisk.service.size_history`; flushes (in rounds) and the write verifier are
in :mod:`tierdisk.service.durability`; resizes, and following a top that resizes by itself,
in :mod:`tierdisk.service.volume_resize`; what a write or unmap does when a write-path layer
fails it (the layers above drop it again, the error that says what changed) in
:mod:`tierdisk.service.write_failures`. No gRPC here: errors are
:mod:`tierdisk.service.errors` exceptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from .durability import Durability
from .errors import (
    InvalidArgument,
    OutOfRange,
    ReadOnlyError,
)
from .layer import MAX_SECTORS, RUNS_BETWEEN_YIELDS, Layer, UnmapBehavior
from .ratelimit import RateLimitedLog
from .runs import Run, clip, complement, subtract, total
from .sector_lock import SectorLock
from .size_history import SizeEvent, SizeHistory
from .stack_attach import attach_stack
from .stack_rules import (
    StackProperties,
)
from .unstoppable import LeftRunning, run_to_end
from .volume_resize import Resizer
from .write_failures import WriteFailures

__all__ = [
    "AllocationRun",
    "LayerEntry",
    "LayerStats",
    "Volume",
]

log = logging.getLogger(__name__)

LEFT_RUNNING_LIMIT = 64 * 1024 * 1024
"""Bytes of writes and unmaps (each counted as at least
:data:`~tierdisk.service.unstoppable.LEFT_RUNNING_MIN_BYTES`) that may run on down a write
path of several layers after their callers left, per volume, before new ones wait: about 64
writes of 1 MiB, each holding ~3 MiB of the server's memory until a layer below that hangs
answers or times out."""

_RUNS_AT_ONCE = 128
"""The most runs a read asks one layer for at once (:meth:`Layer.read_runs`), and between
yields to the event loop: a read over a layer fragmented into thousands of runs asks the
layer below once per run (a task each; a remote layer groups them into ``ReadBatch``
calls); all at once they held the loop for seconds (every other client waited) and sent a
remote tier thousands of calls at once."""
_RANGES_AT_ONCE = 8
"""The most ranges of one :meth:`Volume.read_ranges_into` (a ``ReadBatch``) read at once:
each may ask a layer for :data:`_RUNS_AT_ONCE` runs, and 256 ranges at once held the loop
for ~180 ms over a fragmented layer (every other client waited)."""


AllocationRun = tuple[int, int, int]
"""``(start, end, depth)``: sectors ``[start, end)`` come from layer ``depth`` (-1: none)."""


@dataclass
class LayerStats:
    """Counters the engine keeps per layer (sectors and calls, as DESIGN.md §5 defines)."""

    reads: int = 0  # read calls: one per contiguous run of still-missing sectors asked
    read_sectors: int = 0  # sectors the layer supplied
    cache_hits: int = 0  # read_cache layers: sectors asked that it had
    cache_misses: int = 0  # read_cache layers: sectors asked that it lacked
    cache_fills: int = 0  # sectors written into the cache by fills
    cache_fill_errors: int = 0  # failed fill calls


@dataclass
class LayerEntry:
    """A layer and its place in the stack."""

    layer: Layer
    read_cache: bool = False
    write_through: bool = False
    stats: LayerStats = field(default_factory=LayerStats)
    fill_log: RateLimitedLog = field(default_factory=lambda: RateLimitedLog(log))


class Volume:
    """One volume: an attached, validated stack of layers. Build it with :meth:`open`."""

    def __init__(self, name: str, entries: list[LayerEntry], read_only: bool) -> None:
        self.name = name
        self.read_only = read_only
        self._entries = entries
        self._layers = [e.layer for e in entries]
        top = entries[0].layer
        self.sector_size = top.sector_size
        self.physical_sector_size = top.physical_sector_size
        self.disk_id = next((ly.disk_id for ly in self._layers if ly.disk_id), None)
        stack = StackProperties.of(entries)
        self._write_path = stack.write_path  # the top and every layer below a write-through one
        self.fua_respected = stack.fua_respected
        self.keeps_writes = stack.keeps_writes
        """Writes outlive every server: a layer on the write path keeps them (not only
        ``ram``, nor only a remote tier over a volatile origin); else :attr:`volatile`."""
        self.volatile = not self.keeps_writes
        """A restart loses what the volume holds, so its flushes vouch for nothing past one
        (the proto's ``Volume.volatile`` and ``FlushResponse.volatile``)."""
        self.lost_at_exit = stack.lost_at_exit
        """This server's exit loses the volume's writes (a ``ram``-only write path): it gets
        a new write verifier at every start. (A tier over a volatile origin is volatile, but
        its own restart loses nothing: the origin keeps running.)"""
        self.unmap_behavior = stack.unmap_behavior
        self.optimal_unmap_sectors = stack.optimal_unmap_sectors
        # overlap[i]: layer i is visible only below it (for i >= 1; index 0 is the top's
        # size). Lowered, never raised, by _note_size and _lower_overlaps.
        self._overlap: list[int] = list(stack.overlaps)
        self._layout = 0
        """Changes with every size change of the top and every overlap lowered: a read
        skips its fills when it changed while the read ran (:meth:`_fill`)."""
        self._listeners: list[tuple[Layer, Callable[[int], None]]] = []
        self._smallest = stack.smallest
        self._cut_to = MAX_SECTORS  # the smallest size a shrink of this volume's cut it to
        self._sizes = SizeHistory(top.sector_count)
        self.generation = 0
        """The size generation (:class:`SizeHistory`'s, copied by :meth:`_note_size`), as
        ``WatchResize`` and ``inspect`` give it; reads follow :attr:`_layout` instead."""
        self._follow_task: asyncio.Task[None] | None = None
        self.sector_lock = SectorLock()
        """Held by every write and unmap (shared; exclusive on a write path of several
        layers), exclusive by :meth:`write_at`'s read-modify-write and by a shrink over the
        sectors it cuts. Reads do not take it."""
        self._durability = Durability(name, entries, self._write_path, self.keeps_writes)
        """Flush rounds and the write verifier (:mod:`~tierdisk.service.durability`)."""
        self._write_failures = WriteFailures(name, self._layers, self._write_limit)
        """What a write or unmap does when a write-path layer fails it
        (:mod:`~tierdisk.service.write_failures`)."""
        self._resizer = Resizer(
            name,
            self._layers[: self._write_path],
            sector_lock=self.sector_lock,
            durability=self._durability,
            sizes=self._sizes,
            note_size=self._note_size,
            lower_overlaps=self._lower_overlaps,
        )
        """Resizes and the top's own size changes (:mod:`~tierdisk.service.volume_resize`)."""
        self._left_running = LeftRunning(LEFT_RUNNING_LIMIT)  # those changes, still running
        self._left_log = RateLimitedLog(log)  # changes that waited for them (_room_to_change)

    # -- construction -------------------------------------------------------------------

    @classmethod
    async def open(cls, name: str, entries: list[LayerEntry], *, read_only: bool = False) -> Volume:
        """The volume ``name`` of the layers ``entries`` (top first), attached bottom-up
        under the construction rules of DESIGN.md §3 (:func:`.stack_attach.attach_stack`:
        a :class:`ConfigError` naming the volume, the layer index and the rule; layers
        already attached are closed again)."""
        await attach_stack(name, entries, read_only)
        volume = cls(name, entries, read_only)
        # The listeners see every change of a layer's size (a shrink undone before any task
        # runs still lowers the overlaps); the task serves tops that only offer wait_resize.
        volume._listeners.append((entries[0].layer, volume._note_size))
        volume._listeners += [  # a layer's size hides the layers below it, not itself
            (entry.layer, functools.partial(volume._lower_overlaps, index + 1))
            for index, entry in enumerate(entries[1:], 1)
        ]
        for layer, listener in volume._listeners:
            layer.add_resize_listener(listener)
        volume._follow_task = asyncio.create_task(
            volume._resizer.follow_top(), name=f"follow-{name}"
        )
        return volume

    async def close(self) -> list[Exception]:
        """Stop following the top's size and close every layer, after the flush round under
        way and the read caches' flushes have ended (a flush from now on that would need a
        new round gets :class:`Unavailable`). Returns what the closes of write-path layers
        raised (a sparse layer's last commit that failed: writes may be lost); a read cache
        off the write path holds copies only, so its failure is logged, as its flushes'
        are. Every layer is closed all the same."""
        for layer, listener in self._listeners:
            layer.remove_resize_listener(listener)
        await self._durability.close()
        if self._follow_task:
            self._follow_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._follow_task
            self._follow_task = None
        failures = []
        for index, layer in enumerate(self._layers):
            try:
                await layer.close()
            except Exception as exc:
                if index < self._write_path:
                    failures.append(exc)
                else:
                    log.warning("volume %r: closing layer %d failed: %s", self.name, index, exc)
        return failures

    # -- geometry -----------------------------------------------------------------------

    @property
    def sector_count(self) -> int:
        """Current size in sectors: always the top layer's."""
        return self._layers[0].sector_count

    @property
    def smallest_sector_count(self) -> int:
        """The smallest size in sectors the volume has been shrunk to, as far as its
        write-path layers record it (:attr:`Layer.smallest_size`) and this process saw: no
        layer below them shows at or past it. Inspect reports it as
        ``smallest_sector_count``; a ``remote`` top of another volume takes it as its own
        smallest size at attach."""
        return self._smallest

    @property
    def problem(self) -> str:
        """Why the volume cannot serve until the server restarts: the first layer's
        :attr:`Layer.problem`, naming the layer; "" when no layer has one."""
        for index, layer in enumerate(self._layers):
            if layer.problem:
                return f"layer {index} ({layer.kind}): {layer.problem}"
        return ""

    @property
    def entries(self) -> list[LayerEntry]:
        """The stack, top first (read-only use: layers and their counters)."""
        return list(self._entries)

    def _check_range(self, sector: int, count: int) -> None:
        size = self.sector_count
        if sector < 0 or count < 0:
            raise InvalidArgument(f"volume {self.name!r}: negative sector or count")
        if sector + count > size:
            what = f"sectors [{sector}, {sector + count}) reach" if count else f"sector {sector} is"
            raise OutOfRange(
                f"volume {self.name!r}: {what} past its end ({size} sectors of "
                f"{self.sector_size} bytes)"
            )

    def _check_writable(self, what: str) -> None:
        if self.read_only:
            raise ReadOnlyError(f"volume {self.name!r} is read-only: cannot {what}")

    def _sectors_of(self, nbytes: int) -> int:
        count, rest = divmod(nbytes, self.sector_size)
        if rest:
            raise InvalidArgument(
                f"volume {self.name!r}: {nbytes} bytes is not a whole number of "
                f"{self.sector_size}-byte sectors"
            )
        return count

    def _limit(self, index: int, end: int) -> int:
        """The end of what layer ``index`` may be asked within a request ending at ``end``."""
        return end if index == 0 else min(end, self._overlap[index])

    def _write_limit(self, index: int, end: int) -> int:
        """The end of what write-path layer ``index`` takes of a write or unmap ending at
        ``end``: its own size, not its overlap. Past its overlap a read never asks it (the
        layers above hold what was written there), but a write-through layer must keep every
        write it can hold, or a restart would lose it (it is the durable copy)."""
        return end if index == 0 else min(end, self._layers[index].sector_count)

    # -- read ---------------------------------------------------------------------------

    async def read(self, sector: int, count: int) -> tuple[bytearray, list[Run]]:
        """Read ``count`` sectors from ``sector``: the data and the runs some layer holds."""
        self._check_range(sector, count)
        buf = bytearray(count * self.sector_size)
        present = await self.read_into(memoryview(buf), sector)
        return buf, present

    async def read_into(self, buf: memoryview, sector: int) -> list[Run]:
        """Fill ``buf`` (whole sectors) from ``sector``; return the runs some layer held.

        Sectors no layer holds are zeroed. Read-cache layers that missed are filled before
        this returns; a failed fill is counted and logged, and the read still succeeds.
        """
        ss = self.sector_size
        count, rest = divmod(len(buf), ss)
        if rest or sector < 0 or sector + count > self.sector_count:
            self._check_range(sector, self._sectors_of(len(buf)))  # raises
        if count == 0:
            return []
        end = sector + count
        layout, cut = self._layout, self._cut_to
        overlap = self._overlap
        missing: list[Run] = [(sector, end)]
        fills: list[tuple[LayerEntry, list[Run]]] = []
        for index, entry in enumerate(self._entries):
            limit = end if index == 0 else min(end, overlap[index])  # see _limit
            asked = missing if limit >= end else clip(missing, sector, limit)
            if not asked:
                break  # every missing sector lies past this layer's overlap, and so past
                # every deeper layer's too: those read as zeros.
            layer = entry.layer
            if len(asked) == 1:
                a, b = asked[0]
                supplied = await layer.read(buf[(a - sector) * ss : (b - sector) * ss], a)
                wanted = b - a
            else:
                supplied = []
                for first in range(0, len(asked), _RUNS_AT_ONCE):
                    batch = asked[first : first + _RUNS_AT_ONCE]
                    views = [(buf[(a - sector) * ss : (b - sector) * ss], a) for a, b in batch]
                    supplied += await layer.read_runs(views)
                wanted = total(asked)
            stats = entry.stats
            stats.reads += len(asked)
            if supplied == asked:  # the layer held all it was asked for (the common case)
                got = wanted
                missing = [] if asked is missing else subtract(missing, asked)
            else:
                got = total(supplied)
                if got:
                    missing = subtract(missing, supplied)
            stats.read_sectors += got
            if entry.read_cache:
                stats.cache_hits += got
                stats.cache_misses += wanted - got
                if wanted > got:
                    fill = clip(missing, sector, min(limit, layer.sector_count))
                    if fill:
                        fills.append((entry, fill))
            if not missing:
                break
        if missing and self._layout != layout and self._cut_to < min(end, cut):
            # A shrink of the volume cut the range while a layer's read waited (and a grow
            # may have followed): the layers below were then not asked for the sectors it
            # cut, which would read as zeros beside what was read before it. The read comes
            # after the shrink (and before any grow): OUT_OF_RANGE. (A remote top whose
            # origin shrank by itself is not such a cut: past its end it reads zeros, as
            # its origin does.)
            raise OutOfRange(
                f"volume {self.name!r}: sectors [{max(sector, self._cut_to)}, {end}) were "
                "cut by a shrink while the read ran"
            )
        for a, b in missing:
            buf[(a - sector) * ss : (b - sector) * ss] = bytes((b - a) * ss)
        for entry, runs in fills:
            await self._fill(entry, buf, sector, runs, layout)
        if not missing:
            return [(sector, end)]
        return complement(sector, end, missing)

    async def read_ranges_into(self, buf: memoryview, ranges: list[tuple[int, int]]) -> list[Run]:
        """Fill ``buf`` with the ranges ``(sector, count)`` one after another, in the given
        order (they may overlap or repeat): :meth:`read_into` of each, all or none; the runs
        some layer holds, as each :meth:`read_into` returned them, in no order (runs of
        overlapping ranges overlap: :func:`merge` them for a sorted, disjoint list).

        Every range is checked against the volume's size before any is read (the first one
        past the end is :class:`OutOfRange`); then they are read in turn, and once a read
        waits, up to :data:`_RANGES_AT_ONCE` at once (each paced as :meth:`read_into` paces
        its runs); a failure cancels the reads still running and is raised (what ``buf``
        holds then is unspecified). ``len(buf)`` must be the sum of the ranges' bytes."""
        ss = self.sector_size
        views: list[tuple[memoryview, int]] = []
        offset = 0
        for sector, count in ranges:
            self._check_range(sector, count)
            views.append((buf[offset : offset + count * ss], sector))
            offset += count * ss
        if offset != len(buf):
            raise InvalidArgument(
                f"volume {self.name!r}: a buffer of {len(buf)} bytes for ranges of {offset}"
            )
        if len(views) == 1:
            return await self.read_into(*views[0])
        pending = iter(views)
        held: list[Run] = []

        async def reader() -> None:
            for view, sector in pending:  # shared: each range goes to one reader
                held.extend(await self.read_into(view, sector))

        failure: BaseException | None = None
        try:
            async with asyncio.TaskGroup() as group:  # a failure cancels every reader

                def add_helpers() -> None:
                    # Runs only if this task waited: a stack that reads without waiting (a
                    # RAM layer, page-cache hits) reads every range here, with no task.
                    for _ in range(min(len(views), _RANGES_AT_ONCE) - 1):
                        group.create_task(reader())

                soon = asyncio.get_running_loop().call_soon(add_helpers)
                try:
                    await reader()
                finally:
                    soon.cancel()
        # Python 3.11's TaskGroup keeps what it raises in a cycle with the frames of its
        # traceback (CPython gh-124958), and with them the caller's buffer (a reply frame of
        # up to max_io) until a garbage collection: the group's traceback is dropped, and the
        # first failure raised outside the handler, not chained to the group that holds it.
        except BaseExceptionGroup as failed:  # the first failure, as a single read raises it
            failure = failed.exceptions[0]
            failed.__traceback__ = None
        except asyncio.CancelledError as cancelled:
            cancelled.__traceback__ = None
            raise
        if failure is not None:
            try:
                raise failure
            finally:
                del failure
        return held

    async def _fill(
        self, entry: LayerEntry, buf: memoryview, sector: int, runs: list[Run], layout: int
    ) -> None:
        at_once = entry.layer.fill_runs_at_once
        for first in range(0, len(runs), at_once):
            if self._layout != layout:
                # A size or an overlap changed since the read began: a shrink may have cut
                # the overlap the data was read under, and a fill could bring stale lower
                # data back into view after a grow. The fill is an optimisation; skip it.
                return
            batch = runs[first : first + at_once]
            try:
                stored = await entry.layer.fill_runs(buf, sector, batch)
            except OutOfRange as exc:
                # Lost a race with a shrink (the volume's, or the layer's own: a remote
                # cache whose origin shrank): skipped, as above, not a failure of the cache.
                if self._layout != layout or batch[-1][1] > entry.layer.sector_count:
                    return
                self._fill_failed(entry, exc)
            except Exception as exc:  # any failure: the fill is best effort (DESIGN §3)
                self._fill_failed(entry, exc)
            else:
                entry.stats.cache_fills += stored  # not what another fill or a write stored

    def _fill_failed(self, entry: LayerEntry, exc: Exception) -> None:
        """Count and log (rate-limited) a fill of ``entry``'s layer that failed."""
        entry.stats.cache_fill_errors += 1
        index = self._entries.index(entry)
        entry.fill_log.warning(
            "volume %r: filling read cache layer %d failed: %s", self.name, index, exc
        )

    # -- write, unmap, flush ------------------------------------------------------------

    async def write(
        self,
        sector: int,
        data: bytes | bytearray | memoryview,
        *,
        fua: bool = False,
        no_overwrite: bool = False,
    ) -> None:
        """Write whole sectors at ``sector`` to the write path, top-down.

        ``no_overwrite`` writes only sectors the volume does not hold yet (no layer present).
        Holds its sectors shared in :attr:`sector_lock` while it runs: it waits only while a
        read-modify-write (:meth:`write_at`) or a shrink of an overlapping range is held or
        waiting. On a write path of several layers the hold is exclusive
        (:meth:`_hold_for_change`).
        """
        self._check_writable("write")
        view = memoryview(data).cast("B")
        count = self._sectors_of(len(view))
        self._check_range(sector, count)
        if count == 0:
            return
        if self._write_path > 1 and self._left_running.full:
            await self._room_to_change(sector, count)
        end = sector + count
        lock = self.sector_lock
        # _hold_for_change's fast path, inlined: a write then costs no coroutine for it.
        token = lock.try_shared(sector, end) if self._write_path == 1 else None
        if token is None:
            token = await self._hold_for_change(sector, end)
        durability = self._durability
        durability.change_began()
        failed = False
        try:
            if self._write_path > 1:
                change = self._write_holes if no_overwrite else self._write_sectors
                await self._run_to_end(change(view, sector, fua), len(view))
            elif no_overwrite:
                await self._write_holes(view, sector, fua)
            else:
                await self._write_sectors(view, sector, fua)
        except Exception:
            failed = True  # not acknowledged: nothing at stake (a cancel: it may go on)
            raise
        finally:
            lock.release(token)
            durability.change_ended(not failed)

    async def _run_to_end(self, change: Coroutine[Any, Any, None], nbytes: int) -> None:
        """Run ``change`` (of ``nbytes`` of data) down a write path of several layers to its
        end, also when the caller is cancelled (module docs), counted in the changes left
        running while it runs on without its caller."""
        await run_to_end(
            change,
            dropped=self._write_failures.failed_unseen,
            left=self._left_running,
            nbytes=nbytes,
        )

    async def _room_to_change(self, sector: int, count: int) -> None:
        """Wait until the changes left running by callers who went hold less than
        :data:`LEFT_RUNNING_LIMIT` bytes (a layer of the write path hangs or is slow, and
        callers give up on it), before a change of ``count`` sectors at ``sector`` starts;
        logged, at most one line every 10 s per volume."""
        left = self._left_running
        self._left_log.warning(
            "volume %r: %d writes or unmaps whose callers left still run down the write path "
            "(%d MiB; a layer below is slow or does not answer): new ones wait for room "
            "before they start",
            self.name,
            left.count,
            left.bytes >> 20,
        )
        await left.room()
        self._check_range(sector, count)  # a shrink may have run while it waited

    async def _hold_for_change(self, sector: int, end: int) -> int:
        """Hold ``[sector, end)`` in :attr:`sector_lock` for a write or unmap; return the
        token to release. On a write path of one layer the hold is shared, taken at once
        when no exclusive hold held or waiting overlaps it (the fast path, which
        :meth:`write` inlines), else after a wait. On a write path of several layers it is
        exclusive (so overlapping writes reach every layer in the same order and the layers
        never end up holding different writes). After a wait the range is checked again: a
        shrink may have run meanwhile."""
        lock = self.sector_lock
        if self._write_path > 1:
            token = await lock.acquire_exclusive(sector, end)
        else:
            fast = lock.try_shared(sector, end)
            if fast is not None:
                return fast
            token = await lock.acquire_shared(sector, end)
        try:
            self._check_range(sector, end - sector)
        except BaseException:
            lock.release(token)
            raise
        return token

    async def _write_sectors(self, view: memoryview, sector: int, fua: bool) -> None:
        """Write whole sectors down the write path (the caller holds them in the lock; the
        loop of :meth:`write`)."""
        ss = self.sector_size
        end = sector + len(view) // ss
        short = 0  # the first write-path layer too small for all of it
        index = 0
        try:
            for index in range(self._write_path):
                limit = self._write_limit(index, end)
                if limit < end and not short:
                    short = index
                if limit <= sector:
                    continue  # a smaller layer: those below it may still take it
                part = view if limit == end else view[: (limit - sector) * ss]
                layer = self._layers[index]
                if fua:  # it syncs: a failure may cost other writes (Durability.syncing)
                    await self._durability.syncing(index, layer.write(part, sector, fua))
                else:
                    await layer.write(part, sector, fua)
        except Exception as exc:
            # (the layers above took it whole: one call each)
            raise await self._write_failures.failed_below(
                exc, index, index - 1, sector, end, "write"
            ) from None
        if short:
            raise self._write_failures.past_the_end(short, sector, end)

    async def write_at(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        """Write ``data`` at byte ``offset``, which need not be sector-aligned.

        Whole sectors are written as :meth:`write` does. When the range starts or ends
        inside a sector, the covering sectors are read, patched and written back as one
        write, holding them exclusive in :attr:`sector_lock` from the read to the end of
        the write: a concurrent write or unmap of those sectors (from any front end) lands
        wholly before the read or wholly after the write, so the bytes outside
        ``[offset, offset + len(data))`` keep the newest acknowledged value.
        """
        self._check_writable("write")
        view = memoryview(data).cast("B")
        ss = self.sector_size
        end = offset + len(view)
        if offset < 0 or end > self.sector_count * ss:
            raise OutOfRange(
                f"volume {self.name!r}: bytes [{offset}, {end}) reach past its end "
                f"({self.sector_count * ss} bytes)"
            )
        if not view:
            return
        if not offset % ss and not end % ss:
            await self.write(offset // ss, view, fua=fua)
            return
        first = offset // ss
        last = -(-end // ss)
        head = offset - first * ss
        if self._write_path > 1 and self._left_running.full:
            await self._room_to_change(first, last - first)
        lock = self.sector_lock
        token = await lock.acquire_exclusive(first, last)
        self._durability.change_began()
        failed = False
        try:
            self._check_range(first, last - first)  # a shrink may have run while it waited
            buf = memoryview(bytearray((last - first) * ss))
            if head:
                await self.read_into(buf[:ss], first)
            if end % ss and (last - 1 > first or not head):
                await self.read_into(buf[-ss:], last - 1)
            buf[head : head + len(view)] = view
            if self._write_path > 1:
                await self._run_to_end(self._write_sectors(buf, first, fua), len(buf))
            else:
                await self._write_sectors(buf, first, fua)
        except Exception:
            failed = True  # not acknowledged: nothing at stake (a cancel: it may go on)
            raise
        finally:
            lock.release(token)
            self._durability.change_ended(not failed)

    async def _write_holes(self, view: memoryview, sector: int, fua: bool) -> None:
        ss = self.sector_size
        end = sector + len(view) // ss
        holes = [(a, b) for a, b, depth in await self.allocation(sector, end - sector) if depth < 0]
        unsynced = False  # write_no_overwrite takes no fua: flush after
        short = 0  # as in _write_sectors: the first layer, in hole order, smaller than a hole
        for _, b in holes:
            short = next((i for i in range(1, self._write_path) if self._write_limit(i, b) < b), 0)
            if short:
                break
        index = 0
        changed_at = -1  # the last layer that took part of it
        try:
            for index in range(self._write_path):  # layer by layer: a batch of holes per call
                layer = self._layers[index]
                runs = [(a, lim) for a, b in holes if (lim := self._write_limit(index, b)) > a]
                if layer.can_read_cache:
                    at_once = layer.fill_runs_at_once
                    for first in range(0, len(runs), at_once):
                        batch = runs[first : first + at_once]
                        await layer.fill_runs(view, sector, batch, callers=True)
                        changed_at = index
                    unsynced = unsynced or (fua and bool(runs))
                    continue
                for a, b in runs:
                    part = view[(a - sector) * ss : (b - sector) * ss]
                    if fua:
                        await self._durability.syncing(index, layer.write(part, a, fua))
                    else:
                        await layer.write(part, a, fua)
                    changed_at = index
        except Exception as exc:
            raise await self._write_failures.failed_below(
                exc, index, changed_at, sector, end, "write"
            ) from None
        if unsynced:  # (every layer took it) a whole round: no layer's flush races a round's
            await self.flush()  # (its failures are never NoSpace: Durability)
        if short:
            raise self._write_failures.past_the_end(short, sector, end)

    async def unmap(self, sector: int, count: int, block_level_only: bool = False) -> None:
        """Discard sectors; later reads follow :attr:`unmap_behavior`. Holds them in
        :attr:`sector_lock` as :meth:`write` does."""
        self._check_writable("unmap")
        self._check_range(sector, count)
        if count == 0 or self.unmap_behavior == UnmapBehavior.IGNORED:
            return
        if self._write_path > 1 and self._left_running.full:
            await self._room_to_change(sector, count)
        end = sector + count
        token = await self._hold_for_change(sector, end)
        self._durability.change_began()
        failed = False
        try:
            if self._write_path > 1:
                await self._run_to_end(self._unmap_sectors(sector, end, block_level_only), 0)
            else:
                await self._unmap_sectors(sector, end, block_level_only)
        except Exception:
            failed = True  # not acknowledged: nothing at stake (a cancel: it may go on)
            raise
        finally:
            self.sector_lock.release(token)
            self._durability.change_ended(not failed)

    async def _unmap_sectors(self, sector: int, end: int, block_level_only: bool) -> None:
        bottom = len(self._layers) - 1
        changed_at = -1  # the last layer that unmapped part of it
        index = 0
        try:
            for index in range(self._write_path):
                hi = self._write_limit(index, end)
                if hi <= sector:
                    continue
                layer = self._layers[index]
                # Below the next layer's overlap that layer may hold data: keep zeros
                # present. At or past it, nothing below shows through: they may be dropped.
                below = hi if index == bottom else min(hi, self._overlap[index + 1])
                if sector < below:
                    if index == bottom or not layer.zeros_cost_per_sector:
                        await layer.unmap(sector, below - sector, block_level_only, index == bottom)
                    else:
                        await self._unmap_over_held(index, sector, below, block_level_only)
                    changed_at = index
                if below < hi:
                    start = max(sector, below)
                    await layer.unmap(start, hi - start, block_level_only, True)
                    changed_at = index
        except Exception as exc:
            raise await self._write_failures.failed_below(
                exc, index, changed_at, sector, end, "unmap"
            ) from None

    async def _unmap_over_held(
        self, index: int, sector: int, end: int, block_level_only: bool
    ) -> None:
        """Unmap ``[sector, end)`` of layer ``index``, where zeros cost it storage per sector
        (:attr:`~.layer.Layer.zeros_cost_per_sector`), keeping zeros present only over the
        runs a layer below holds and dropping the rest (``next_is_zero``): a whole-disk
        discard over an empty lower layer wrote a ``sqlite`` row per sector (a 16 GiB one ran
        past its caller's deadline; larger ones filled the disk), where nothing below could
        show through."""
        layer = self._layers[index]
        held, _ = await self._holders(sector, end, first=index + 1)
        at = sector
        for a, b, _depth in [*held, (end, end, -1)]:
            if at < a:
                await layer.unmap(at, a - at, block_level_only, True)
            if a < b:
                await layer.unmap(a, b - a, block_level_only, False)
            at = max(at, b)

    async def flush(self) -> None:
        """Make every write acknowledged before the call durable on the write path (DESIGN
        §3), in flush rounds (:meth:`Durability.flush`): raises the round's failure;
        :class:`Unavailable` once the volume is closing."""
        await self._durability.flush()

    @property
    def changed_since_flush(self) -> bool:
        """Whether a write, an unmap or a resize is under way, or ended at stake (a write or
        an unmap acknowledged or cancelled, a resize that failed) and no flush that succeeded
        covers it (:attr:`Durability.changed_since_flush`)."""
        return self._durability.changed_since_flush

    @property
    def changed_since_open(self) -> bool:
        """:attr:`Durability.changed_since_open`."""
        return self._durability.changed_since_open

    def durable_since(self, verifier: int) -> bool:
        """:meth:`Durability.durable_since`."""
        return self._durability.durable_since(verifier)

    @property
    def write_verifier(self) -> int:
        """Non-zero; changes whenever writes this volume acknowledged without making them
        durable may have been lost (:class:`Durability`). The server sets it before
        serving (kept over a clean stop: :mod:`~tierdisk.service.verifier_store`)."""
        return self._durability.write_verifier

    @write_verifier.setter
    def write_verifier(self, value: int) -> None:
        self._durability.write_verifier = value

    @property
    def verifier_changes(self) -> int:
        """Times :attr:`write_verifier` was renewed while the volume ran, and at its start
        when the last run did not stop cleanly (:meth:`count_verifier_change`):
        ``tierdisk_write_verifier_changes_total``."""
        return self._durability.changes

    def count_verifier_change(self) -> None:
        """Count, in :attr:`verifier_changes`, the verifier the server gave the volume at
        start because writes may have been lost since its last run (an unclean stop)."""
        self._durability.changes += 1

    # -- size ---------------------------------------------------------------------------

    async def resize(self, sector_count: int) -> int:
        """Resize the volume to ``sector_count`` sectors: its top layer, and with it every
        ``write_through`` layer on the write path (:meth:`Resizer.resize
        <tierdisk.service.volume_resize.Resizer.resize>`, which says how, and what it
        raises); return the new size. A read-only volume is :class:`ReadOnlyError`
        (FAILED_PRECONDITION)."""
        self._check_writable("resize")
        await self._resizer.resize(sector_count)
        return self.sector_count

    def _note_size(self, size: int) -> None:
        """The top's size is now ``size`` sectors (its resize listener calls it, and the
        :class:`Resizer`'s :meth:`~Resizer.follow_top` and :meth:`~Resizer.resize`): a change
        lowers the overlaps and the smallest size at once, synchronously (the resize-listener
        rule of the module docstring), and is a size event (:class:`SizeHistory`). The same
        size again changes nothing."""
        sizes = self._sizes
        if not sizes.note(size):
            return
        self.generation = sizes.generation
        self._smallest = min(self._smallest, size)
        if self._resizer.shrinking:  # a shrink of this volume, not of a remote top's own origin
            self._cut_to = min(self._cut_to, size)
        self._lower_overlaps(1, size)
        self._overlap[0] = size
        self._layout += 1

    def _lower_overlaps(self, index: int, size: int) -> None:
        """Layer ``index`` and those below it show only below ``size`` sectors from now on:
        lowered, never raised. Each layer below the top calls it, for the layers below
        itself, as its resize listener, so a layer that shrinks by itself (a ``remote``
        whose origin shrank) hides at once, and until the volume reopens, what the layers
        below it held past that: grown again, it reads what its origin holds there (zeros,
        or what was written since), never their older data (DESIGN.md §3); at a reopen its
        :attr:`~Layer.smallest_size` hides it
        (:func:`~tierdisk.service.stack_rules.overlaps_of`). Its own reads past its end are
        its own to answer (a ``remote`` supplies nothing there)."""
        overlap = self._overlap
        if index < len(overlap) and overlap[index] > size:  # (a top alone has none)
            for i in range(index, len(overlap)):
                overlap[i] = min(overlap[i], size)
            self._layout += 1

    async def resize_events(self, after: int) -> list[SizeEvent]:
        """Wait for size changes newer than generation ``after``; return every one of them
        as ``(generation, sector_count)``, oldest first.

        A watcher that fell more than
        :data:`~tierdisk.service.size_history.SIZE_HISTORY_EVENTS` changes behind gets the
        current size as one event (the changes it missed are gone).
        """
        return await self._sizes.events_after(after)

    # -- maps ---------------------------------------------------------------------------

    async def allocation(self, sector: int, count: int) -> list[AllocationRun]:
        """Which layer holds each run of ``[sector, sector + count)``: ``(start, end, depth)``.

        Covers the whole range, sorted; ``depth`` is the index of the topmost layer holding
        the run, -1 where none does (reads as zeros). Adjacent runs of one depth are joined.
        """
        self._check_range(sector, count)
        if count == 0:
            return []
        found, missing = await self._holders(sector, sector + count)
        found.extend((a, b, -1) for a, b in missing)
        found.sort()
        joined: list[AllocationRun] = []
        for done, (a, b, depth) in enumerate(found, 1):
            if joined and joined[-1][1] == a and joined[-1][2] == depth:
                joined[-1] = (joined[-1][0], b, depth)
            else:
                joined.append((a, b, depth))
            if done % RUNS_BETWEEN_YIELDS == 0:
                await asyncio.sleep(0)
        return joined

    async def _holders(
        self, sector: int, end: int, *, first: int = 0
    ) -> tuple[list[AllocationRun], list[Run]]:
        """Which of the layers from index ``first`` down holds each sector of ``[sector,
        end)`` (each asked within its overlap): the runs held, sorted, as ``(start, end,
        index of the topmost holding it)``, and the runs none of them holds."""
        missing: list[Run] = [(sector, end)]
        found: list[AllocationRun] = []
        for index in range(first, len(self._layers)):
            asked = clip(missing, sector, self._limit(index, end))
            if not asked:
                break
            held = await self._layers[index].presence_of_runs(asked)
            if held:
                found.extend((a, b, index) for a, b in held)
                missing = subtract(missing, held)
            if not missing:
                break
        found.sort()
        return found, missing

    # -- inspect ------------------------------------------------------------------------

    def inspect(self) -> dict[str, Any]:
        """The diagnostic tree of DESIGN.md §2 (JSON-friendly)."""
        layers = []
        for index, entry in enumerate(self._entries):
            layer = entry.layer
            info: dict[str, Any] = {
                "index": index,
                "kind": layer.kind,
                "read_cache": entry.read_cache,
                "write_through": entry.write_through,
                "on_write_path": index < self._write_path,
                "sector_count": layer.sector_count,
                "visible_sector_count": self.sector_count if index == 0 else self._overlap[index],
                "present_sectors": layer.present_sectors,
                "read_only": layer.read_only,
                "fua_respected": layer.fua_respected,
                "unmap_behavior": layer.unmap_behavior.name,
                "counters": dict(vars(entry.stats)),
            }
            info.update(layer.inspect())
            layers.append(info)
        return {
            "name": self.name,
            "sector_size": self.sector_size,
            "sector_count": self.sector_count,
            "physical_sector_size": self.physical_sector_size,
            "read_only": self.read_only,
            "fua_respected": self.fua_respected,
            "unmap_behavior": self.unmap_behavior.name,
            "optimal_unmap_sectors": self.optimal_unmap_sectors,
            "disk_id": self.disk_id.hex() if self.disk_id else "",
            "generation": self.generation,
            "write_verifier": f"{self.write_verifier:016x}",  # hex: a double cannot hold it
            "smallest_sector_count": self.smallest_sector_count,
            "left_running": {
                "changes": self._left_running.count,
                "bytes": self._left_running.bytes,
            },
            "layers": layers,
        }
