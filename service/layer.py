"""The layer interface: what every layer kind implements, and the metadata layers exchange.

A *layer* is a sector store that knows which of its sectors it holds ("present"). The engine
(:mod:`tierdisk.service.volume`) stacks layers into a volume; a layer never sees the stack.

Units: sectors are indices in units of the layer's ``sector_size`` (bytes); every buffer holds
a whole number of sectors. The engine checks ranges before it calls a layer, so a layer may
assume ``0 <= sector`` and ``sector + count <= sector_count`` for the calls it gets (layers
still refuse out-of-range calls with :class:`~tierdisk.service.errors.OutOfRange`). A
``remote`` layer cannot: its size can change under a request, so it clips reads and presence
queries to its current size.

Life cycle: construct from config → :meth:`Layer.attach` (bottom-up, given the metadata of the
layer below, so a layer can inherit size and sector size) → I/O → :meth:`Layer.close`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tierdisk.client.sizes import MAX_BYTES, MAX_SECTORS, is_sector_size, size_limit_problem

from .errors import ConfigError, NotSupported, OutOfRange, Unavailable
from .runs import Run

__all__ = [
    "MAX_BYTES",
    "MAX_SECTORS",
    "RUNS_BETWEEN_YIELDS",
    "Layer",
    "LayerMetadata",
    "PartialLayer",
    "UnmapBehavior",
    "check_recorded_geometry",
    "check_recorded_size",
    "check_sector_size",
    "layer_closed",
    "new_geometry",
    "sector_size_mismatch",
    "size_limit_problem",
]


RUNS_BETWEEN_YIELDS = 4096
"""Runs a walk over a layer's presence handles between yields to the event loop (ms of
work)."""


class UnmapBehavior(enum.IntEnum):
    """What reads see after an unmap. Values match the protobuf enum ``UnmapBehavior``."""

    UNSPECIFIED = 0
    ANY = 1  # unmapped sectors read as anything stable
    ZEROES = 2  # unmapped sectors read as zeros
    IGNORED = 3  # unmap does nothing


@dataclass(frozen=True)
class LayerMetadata:
    """What a layer tells the layer above it at attach time (and the engine at build time)."""

    sector_size: int
    sector_count: int
    physical_sector_size: int
    disk_id: bytes | None
    unmap_behavior: UnmapBehavior
    optimal_unmap_sectors: int
    read_only: bool
    can_read_cache: bool
    fua_respected: bool


def check_sector_size(sector_size: int) -> None:
    """Refuse a sector size that is not a power of two of at least 512 bytes."""
    if not is_sector_size(sector_size):
        raise ValueError(f"sector_size {sector_size} is not a power of two >= 512")


def new_geometry(
    what: str, size: int | None, sector_size: int | None, lower: LayerMetadata | None
) -> tuple[int, int]:
    """``(sector_size, sector_count)`` of a layer being created (DESIGN.md §4 defaults).

    ``size`` (bytes) and ``sector_size`` are the configured values or None; each defaults to
    the layer below's (the sector size to 512 at the bottom). ``what`` names the layer in
    the :class:`~tierdisk.service.errors.ConfigError` raised for a bad or missing value.
    """
    ss = sector_size or (lower.sector_size if lower else 512)
    try:
        check_sector_size(ss)
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from None
    if lower is not None and ss != lower.sector_size:  # before anything is made of it
        raise ConfigError(sector_size_mismatch(ss, lower.sector_size))  # as the stack rule
    nbytes = size
    if nbytes is None and lower is not None:
        nbytes = lower.sector_count * lower.sector_size
    if nbytes is None:
        raise ConfigError(
            f"{what} has no size: give size, or put it above a layer to inherit the size from"
        )
    if nbytes <= 0 or nbytes % ss:
        raise ConfigError(
            f"{what}: size {nbytes} is not a positive multiple of its {ss}-byte sectors"
        )
    problem = size_limit_problem(ss, nbytes // ss)
    if problem is not None:
        raise ConfigError(f"{what}: size {nbytes}: {problem}")
    return ss, nbytes // ss


def sector_size_mismatch(sector_size: int, bottom_sector_size: int) -> str:
    """The construction rule a layer of ``sector_size`` bytes over a stack of
    ``bottom_sector_size`` breaks, as messages say it."""
    return (
        f"sector size {sector_size} differs from the bottom layer's {bottom_sector_size}; "
        "all layers share one sector size"
    )


def check_recorded_geometry(
    what: str,
    sector_size: int,
    sector_count: int,
    wanted_sector_size: int | None,
    configured_size: int | None,
) -> None:
    """Refuse a configured ``sector_size`` or ``size`` (bytes; None: not configured) that
    differs from the geometry an existing layer recorded (its own sector size and count):
    the file's geometry is what it holds, so the config is what must change."""
    if wanted_sector_size is not None and wanted_sector_size != sector_size:
        raise ConfigError(
            f"{what} has {sector_size}-byte sectors but the config says "
            f"sector_size = {wanted_sector_size}"
        )
    check_recorded_size(what, sector_count * sector_size, configured_size)


def layer_closed(what: str) -> Unavailable:
    """The error of an I/O that reaches the layer ``what`` after its close began (the
    server is stopping): ``UNAVAILABLE``, so the caller may retry it after the restart."""
    return Unavailable(f"{what} is closed (the server is stopping)")


def check_recorded_size(what: str, recorded: int, configured: int | None) -> None:
    """Refuse a configured ``size`` (bytes) that differs from the size an existing layer
    has recorded (bytes): a :class:`~tierdisk.service.errors.ConfigError` that says how to
    mend the config, since a ``Resize`` changes the recorded size. None (no ``size``
    configured) always agrees."""
    if configured is not None and configured != recorded:
        raise ConfigError(
            f"{what} is {recorded} bytes but the config says size = {configured} (a resize "
            f"changes a layer's size: set size = {recorded}, or remove size to take the "
            "layer's own)"
        )


class Layer(abc.ABC):
    """Base class of every layer kind.

    Subclasses set the geometry in :meth:`attach` through :meth:`_set_geometry` and implement
    the abstract I/O methods. Optional capabilities (no-overwrite writes, resize) raise
    :class:`NotSupported` by default.
    """

    kind: str = "layer"
    """The config ``kind`` of this layer class."""

    def __init__(self) -> None:
        self._sector_size = 0
        self._sector_count = 0
        self._physical_sector_size = 0
        self._resized = asyncio.Event()
        self._resize_listeners: list[Callable[[int], None]] = []
        self._shrink_end: int | None = None  # a shrink under way: :meth:`_shrinking`
        self._shrink_done = asyncio.Event()
        self._problem = ""
        self._problem_listeners: list[Callable[[str], None]] = []

    # -- geometry and capabilities ------------------------------------------------------

    def _set_geometry(
        self, sector_size: int, sector_count: int, physical_sector_size: int | None = None
    ) -> None:
        check_sector_size(sector_size)
        if sector_count < 0:
            raise ValueError(f"negative size {sector_count}")
        problem = size_limit_problem(sector_size, sector_count)
        if problem is not None:  # as recorded by an existing layer: no new one is that large
            raise ValueError(problem)
        self._sector_size = sector_size
        self._sector_count = sector_count
        self._physical_sector_size = physical_sector_size or sector_size

    @property
    def sector_size(self) -> int:
        """Bytes per sector (a power of two, at least 512)."""
        return self._sector_size

    @property
    def sector_count(self) -> int:
        """Current size in sectors; may change at run time (resize)."""
        return self._sector_count

    @property
    def physical_sector_size(self) -> int:
        """Bytes per physical sector, a multiple of ``sector_size``."""
        return self._physical_sector_size

    @property
    def disk_id(self) -> bytes | None:
        """A 16-byte identity of the data, or None."""
        return None

    @property
    def fua_respected(self) -> bool:
        """True when a ``fua`` write is durable once :meth:`write` returns."""
        return True

    @property
    def reports_lost_writes(self) -> bool:
        """True for a tier that says itself when it lost acknowledged writes (a ``remote``
        layer: its flush raises :class:`WritesLost` from its own write verifier), so its
        other failures do not renew the volume's verifier (:meth:`Durability._sync_failed`)."""
        return False

    @property
    def keeps_writes(self) -> bool:
        """True when what the layer holds outlives every server (a file; a remote tier
        whose origin volume is not volatile, its own write verifier answering for it);
        ``ram``: False."""
        return True

    @property
    def lost_at_exit(self) -> bool:
        """True when this server's exit loses what the layer holds (``ram``). A remote tier
        is not: its origin keeps running (its volatility is :attr:`keeps_writes`)."""
        return False

    @property
    def read_only(self) -> bool:
        """True when the layer refuses writes (logically read-only)."""
        return False

    @property
    def unmap_behavior(self) -> UnmapBehavior:
        """What reads of this layer see after an unmap of it."""
        return UnmapBehavior.ZEROES

    @property
    def optimal_unmap_sectors(self) -> int:
        """Preferred unmap granularity in sectors (at least 1)."""
        return 1

    @property
    def configured_size(self) -> int | None:
        """The ``size`` in bytes this layer's config gives, for a layer that keeps its size
        across restarts (``raw``, ``sparse``, ``sqlite``: a start refuses a config that
        disagrees, :func:`check_recorded_size`); None when the config gives none, or for a
        layer made anew at each start (``ram``) or sized by another server (``remote``)."""
        return None

    @property
    def zeros_cost_per_sector(self) -> bool:
        """True when :meth:`unmap` without ``next_is_zero`` (keeping the sectors present as
        zeros) costs storage or I/O per sector: ``sqlite`` (a row each), ``remote`` in layer
        mode (zeros written to the origin). The volume then asks the layers below which of
        the sectors they hold and keeps zeros only over those. False (the default) where
        zeros are a run in a map (``ram``, ``sparse``)."""
        return False

    @property
    def can_drop_sectors(self) -> bool:
        """True when :meth:`unmap` with ``next_is_zero`` drops sectors from this layer alone,
        so reads take them from the layers below (``ram``, ``sparse``, ``sqlite``). False
        for a layer that holds every sector (``raw``) and for a ``remote`` tier (its unmap
        reaches its origin). The volume drops a failed write from the write-through layers
        above the one that failed it (:meth:`~tierdisk.service.volume.Volume.write`)."""
        return False

    @property
    def can_read_cache(self) -> bool:
        """True when the layer implements :meth:`write_no_overwrite` (can be a read cache)."""
        return False

    @property
    def read_cache_refusal(self) -> str:
        """Why the layer cannot be a read cache, for the config error ("" when it can)."""
        return "" if self.can_read_cache else f"a {self.kind} layer cannot"

    @property
    def can_resize(self) -> bool:
        """True when :meth:`resize` is implemented for this layer as configured."""
        return False

    @property
    def present_sectors(self) -> int:
        """Number of sectors the layer itself holds (its size when it holds every sector)."""
        return self._sector_count

    @property
    def smallest_size(self) -> int:
        """The smallest size in sectors this layer has had since its data was created, as
        far as it records it (at most :attr:`sector_count`). In a volume, no layer below it
        shows at or past this sector, across restarts too: a shrink of the top (and of the
        write path, resized with it) lowers the overlaps for good (DESIGN.md §3).
        Persistent layers that track presence keep it with their size; the default, the
        current size, suits layers whose data does not outlive the process or that hold
        every sector."""
        return self._sector_count

    def metadata(self) -> LayerMetadata:
        """This layer's metadata, as handed to the layer above at attach."""
        return LayerMetadata(
            sector_size=self.sector_size,
            sector_count=self.sector_count,
            physical_sector_size=self.physical_sector_size,
            disk_id=self.disk_id,
            unmap_behavior=self.unmap_behavior,
            optimal_unmap_sectors=self.optimal_unmap_sectors,
            read_only=self.read_only,
            can_read_cache=self.can_read_cache,
            fua_respected=self.fua_respected,
        )

    def _check_range(self, sector: int, count: int) -> None:
        if sector < 0 or count < 0 or sector + count > self._sector_count:
            raise OutOfRange(
                f"sectors [{sector}, {sector + count}) are past the end of the {self.kind} "
                f"layer ({self._sector_count} sectors)"
            )

    @contextlib.contextmanager
    def _shrinking(self, sector_count: int) -> Iterator[None]:
        """For a layer whose shrink takes a while (work on a thread, a commit): mark a shrink
        to ``sector_count`` under way for the ``with`` block, which sets the new size (and
        calls :meth:`_notify_resized`) once the shrink is committed. Until then the layer
        keeps reporting its old size, so the volume, ``Inspect`` and ``WatchResize`` never
        pair the new size with the old generation, and a shrink that fails changed nothing
        anyone saw; I/O that reaches past ``sector_count`` meanwhile waits for the outcome
        (:meth:`_await_shrink`) rather than reading sectors being dropped as absent (the
        layers below would show through) or being refused for a size not yet reported."""
        self._shrink_end = sector_count
        try:
            yield
        finally:
            self._shrink_end = None
            done, self._shrink_done = self._shrink_done, asyncio.Event()
            done.set()

    async def _await_shrink(self, sector: int, count: int) -> None:
        """Wait while a shrink under way (:meth:`_shrinking`) cuts into ``[sector, sector +
        count)``, then check the range again: ``OUT_OF_RANGE`` if the shrink was made, as
        before it if it failed. Call it when :attr:`_shrink_end` is not None."""
        while (end := self._shrink_end) is not None and sector + count > end:
            await self._shrink_done.wait()
        self._check_range(sector, count)

    # -- life cycle ---------------------------------------------------------------------

    @abc.abstractmethod
    async def attach(self, lower: LayerMetadata | None) -> None:
        """Open the layer; ``lower`` describes the layer below (None at the bottom).

        Raises :class:`~tierdisk.service.errors.ConfigError` (or ``ValueError``) when the
        layer cannot be built, e.g. no size given and nothing to inherit it from, and
        :class:`~tierdisk.service.errors.StorageError` (e.g.
        :class:`~tierdisk.service.errors.DataCorruption`) when its files cannot be opened,
        read or created, or hold damaged data; :meth:`Volume.open` names the volume and
        layer of either (``tierdisk serve`` says "config error" or "cannot start").
        """

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release files and connections. The engine calls it once. I/O that arrives after
        the close began (a stop's grace can cut calls short) must raise
        :func:`layer_closed` (``UNAVAILABLE``), not crash."""

    @staticmethod
    async def _open_in_thread(open_files: Callable[[], None], release: Callable[[], None]) -> None:
        """Run ``open_files`` (blocking: opens and locks the layer's files) on the default
        executor. A thread cannot be stopped: if the caller is cancelled meanwhile (a stop
        while the server starts), the open runs to its end and ``release`` then closes what
        it opened, on the loop, so a cancelled attach leaves no file open or locked."""
        opening = asyncio.get_running_loop().run_in_executor(None, open_files)
        try:
            await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(
                lambda done: None if done.cancelled() or done.exception() else release()
            )
            raise

    # -- I/O ----------------------------------------------------------------------------

    @abc.abstractmethod
    async def read(self, buf: memoryview, sector: int) -> list[Run]:
        """Copy the sectors this layer holds in ``[sector, sector + len(buf) / sector_size)``
        into ``buf`` (at their offset within the request) and return the runs it supplied,
        sorted and absolute. Bytes of sectors it does not hold are left untouched.

        A read cancelled while a thread copies for it (``raw``) may go on writing into
        ``buf`` after the cancel is raised: a caller hands each read a buffer of its own
        and drops it on a cancel (every caller does), never one it reuses at once.
        """

    async def read_runs(self, reads: list[tuple[memoryview, int]]) -> list[Run]:
        """:meth:`read` of several runs of one request, each ``(buffer, first sector)``
        (sorted, disjoint): the runs supplied, in all. The default asks :meth:`read` for
        each, all at once; a layer for which each call is a round trip may ask for them
        together (``remote``: ``ReadBatch`` calls)."""
        supplied: list[Run] = []
        for held in await asyncio.gather(*(self.read(view, sector) for view, sector in reads)):
            supplied += held
        return supplied

    @abc.abstractmethod
    async def write(self, data: memoryview, sector: int, fua: bool) -> None:
        """Store ``data`` (whole sectors) at ``sector``; they become present.

        With ``fua`` and :attr:`fua_respected`, durable before returning.
        """

    async def write_no_overwrite(self, data: memoryview, sector: int) -> int:
        """A read-cache fill: store only the sectors of ``data`` this layer does not already
        hold; return how many sectors it stored (what ``tierdisk_cache_fills_total``
        counts). A layer may drop a fill that went stale while it waited (return 0)."""
        raise NotSupported(f"the {self.kind} layer cannot write without overwriting")

    async def write_holes(self, data: memoryview, sector: int) -> int:
        """A caller's ``Write`` with ``no_overwrite``: as :meth:`write_no_overwrite`, but
        its data is the caller's, so it is never dropped as a stale fill may be."""
        return await self.write_no_overwrite(data, sector)

    fill_runs_at_once = 1
    """The most runs the engine passes to one :meth:`fill_runs` call: 1 unless the layer
    stores them in one step, and drops them all if they went stale while it waited (the
    engine checks between calls that no resize made a fill stale)."""

    async def fill_runs(
        self, data: memoryview, sector: int, runs: list[Run], *, callers: bool = False
    ) -> int:
        """:meth:`write_no_overwrite` of several runs (sorted, disjoint, absolute sectors)
        of ``data``, which starts at ``sector`` (``callers``: :meth:`write_holes`, never
        dropped): the sectors between them are not written. Returns the sectors stored.
        The default asks once per run; a layer for which each call costs a hand-off (a
        thread, a call to another server) may do all at once (:attr:`fill_runs_at_once`)."""
        ss = self.sector_size
        write = self.write_holes if callers else self.write_no_overwrite
        stored = 0
        for a, b in runs:
            stored += await write(data[(a - sector) * ss : (b - sector) * ss], a)
        return stored

    async def presence(self, sector: int, count: int) -> list[Run]:
        """The runs of ``[sector, sector + count)`` this layer holds, without reading data.

        The default suits layers that hold every sector.
        """
        return [(sector, sector + count)] if count else []

    async def presence_of_runs(self, runs: list[Run]) -> list[Run]:
        """The sectors of ``runs`` (sorted, disjoint) this layer holds, as sorted runs: a
        :meth:`presence` per run, yielding to the event loop every
        :data:`RUNS_BETWEEN_YIELDS` runs (a local layer's presence never yields). A layer
        whose :meth:`presence` is a round trip (``remote``) asks once instead."""
        held: list[Run] = []
        for done, (a, b) in enumerate(runs, 1):
            held.extend(await self.presence(a, b - a))
            if done % RUNS_BETWEEN_YIELDS == 0:
                await asyncio.sleep(0)
        return held

    @abc.abstractmethod
    async def unmap(
        self, sector: int, count: int, block_level_only: bool, next_is_zero: bool
    ) -> None:
        """Discard ``[sector, sector + count)``.

        ``next_is_zero`` says the layers below hold nothing there, so the layer may drop the
        sectors; otherwise it must keep them present as zeros (or ignore the unmap, when its
        :attr:`unmap_behavior` allows) so lower data does not show through.
        """

    @abc.abstractmethod
    async def flush(self) -> None:
        """Make every write acknowledged so far durable."""

    async def resize(self, sector_count: int) -> None:
        """Change the size; growing exposes zeros, shrinking discards the tail."""
        raise NotSupported(f"the {self.kind} layer cannot be resized")

    def add_resize_listener(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(new_size)`` synchronously on every size change.

        Unlike :meth:`wait_resize`, a listener sees every change, even a shrink undone before
        any waiter runs (the engine needs every shrink to lower its overlaps).
        """
        self._resize_listeners.append(listener)

    def remove_resize_listener(self, listener: Callable[[int], None]) -> None:
        """Stop calling ``listener``; no error when it is not registered."""
        if listener in self._resize_listeners:
            self._resize_listeners.remove(listener)

    @property
    def problem(self) -> str:
        """Why the layer refuses all I/O until the server restarts, "" while it does not
        (e.g. a ``remote`` volume re-created with another geometry). Set once, for good."""
        return self._problem

    def add_problem_listener(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(problem)`` synchronously when the layer finds its :attr:`problem`."""
        self._problem_listeners.append(listener)

    def _found_problem(self, problem: str) -> None:
        """Record :attr:`problem` (the first one found stays) and tell the listeners."""
        if self._problem:
            return
        self._problem = problem
        for listener in list(self._problem_listeners):
            listener(problem)

    def _notify_resized(self) -> None:
        """Tell listeners and wake :meth:`wait_resize` callers; call after the size changed."""
        for listener in list(self._resize_listeners):
            listener(self._sector_count)
        event, self._resized = self._resized, asyncio.Event()
        event.set()

    async def wait_resize(self, sector_count: int) -> int:
        """Return the current size as soon as it differs from ``sector_count``."""
        while self._sector_count == sector_count:
            await self._resized.wait()
        return self._sector_count

    def inspect(self) -> dict[str, Any]:
        """The layer's own details for Inspect (path, target, …); JSON-friendly values.

        The engine adds kind, size, present sectors and its counters around this.
        """
        return {}


class PartialLayer(Layer):
    """A layer that holds only the sectors written (or cached) to it, not every one: ``ram``,
    ``sparse``, ``sqlite``. Such a layer can drop sectors (:attr:`can_drop_sectors`), be a
    read cache (:attr:`can_read_cache`: it implements :meth:`write_no_overwrite`) and
    resize (:attr:`can_resize`); it says how many sectors it holds
    (:attr:`present_sectors`)."""

    @property
    def can_drop_sectors(self) -> bool:
        return True

    @property
    def can_read_cache(self) -> bool:
        return True

    @property
    def can_resize(self) -> bool:
        return True

    @property
    @abc.abstractmethod
    def present_sectors(self) -> int:
        """Number of sectors the layer itself holds (each kind counts its own)."""

    @abc.abstractmethod
    async def write_no_overwrite(self, data: memoryview, sector: int) -> int:
        """A read-cache fill (:meth:`Layer.write_no_overwrite`), which such a layer must
        implement since it says it can be a read cache."""
