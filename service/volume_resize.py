"""Resizing a volume, and following a top layer that resizes by itself (DESIGN.md §3 Resize).

A volume's size is its top layer's. :meth:`Resizer.resize` resizes the write path (the top
and every ``write_through`` layer below it, which hold the same writes) one layer at a time,
one resize at a time: a grow bottom-up, the top last; a shrink top-down, holding the sectors
it cuts exclusive in the volume's :class:`~tierdisk.service.sector_lock.SectorLock`. A grow
that fails shrinks back the layers it grew; a shrink that fails after the top was cut stands.
:meth:`Resizer.follow_top` follows a top whose size changes by itself (a ``remote`` top whose
origin was resized).

What a size change does to the stack stays in the volume
(:class:`~tierdisk.service.volume.Volume`): it hands its ``note_size(size)`` (the top's size
is now ``size``: overlaps, generation, resize events) and ``lower_overlaps(index, size)``
(layer ``index`` and those below it show only below ``size``) to the :class:`Resizer` it
owns, which calls them as each layer's size changes; the volume reads :attr:`Resizer.shrinking`
to tell its own shrinks from a ``remote`` top's origin shrinking. Sizes are in sectors of the
volume's sector size. The log lines are the volume's (its logger,
:mod:`tierdisk.service.volume`). No gRPC here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .backoff import Backoff
from .durability import Durability
from .errors import InvalidArgument, NotSupported, StorageError, TierdiskError
from .layer import Layer, size_limit_problem
from .ratelimit import RateLimitedLog
from .sector_lock import EVERY_SECTOR, SectorLock
from .size_history import SizeHistory
from .unstoppable import run_to_end

__all__ = ["Resizer"]

log = logging.getLogger("tierdisk.service.volume")
"""The volume's logger: these lines are the volume's and keep the name they have always had."""

_TOP_WATCH_BACKOFF = (0.1, 10.0)
"""``(first, cap)`` in seconds: the waits before watching the top layer's size again after
the watch failed (:class:`~tierdisk.service.backoff.Backoff`, doubling, no jitter)."""


class Resizer:
    """The resizes of the volume ``name``, whose write path is the layers ``path`` (top
    first): ``sector_lock`` is the volume's (a shrink holds what it cuts), ``durability``
    its flush rounds and write verifier (a resize is a change; a layer's resize is synced),
    ``sizes`` its size history (the last size :meth:`follow_top` noted); ``note_size`` and
    ``lower_overlaps`` are the volume's, called as the layers' sizes change (module docs)."""

    def __init__(
        self,
        name: str,
        path: list[Layer],
        *,
        sector_lock: SectorLock,
        durability: Durability,
        sizes: SizeHistory,
        note_size: Callable[[int], None],
        lower_overlaps: Callable[[int, int], None],
    ) -> None:
        self._name = name
        self._path = path
        self._sector_lock = sector_lock
        self._durability = durability
        self._sizes = sizes
        self._note_size = note_size
        self._lower_overlaps = lower_overlaps
        self._resizing = asyncio.Lock()  # resizes one at a time
        self.shrinking = False
        """A shrink of this volume is cutting its layers (so a size the top reports now is
        the volume's own cut, not a ``remote`` top's origin shrinking)."""

    async def resize(self, sector_count: int) -> None:
        """Resize the top layer, and with it every ``write_through`` layer on the write path
        (they hold the same writes: one left at the old size would lose, at a restart, what
        was written past it, or bring back what a shrink discarded). Growing exposes zeros.

        The write-path layers are resized one at a time: a grow bottom-up, the top last; a
        shrink top-down. Resizes run one at a time. Errors (DESIGN.md §2), after which the
        volume's size and generation are unchanged (no resize event), and its data too, but
        for a shrink that failed part way (below):

        - :class:`InvalidArgument`: not at least one sector, or more than
          :data:`~.layer.MAX_BYTES` bytes or :data:`~.layer.MAX_SECTORS` sectors (a size
          limit, whatever the layers);
        - :class:`NotSupported` (FAILED_PRECONDITION): a write-path layer kind that cannot
          resize (a read-only volume is :class:`ReadOnlyError` before this is called:
          :meth:`Volume.resize <tierdisk.service.volume.Volume.resize>`);
        - from a layer: :class:`FailedPrecondition` for a size its storage cannot have
          (a file over the filesystem's largest, ``EFBIG``), :class:`NoSpace`
          (RESOURCE_EXHAUSTED) when it is out of memory or space (a ``ram`` layer that
          cannot map that much). Layers below it that had grown already are shrunk back;
          a shrink that fails after the top was cut stands (the volume has the new size;
          the layers below the failure keep theirs, which the overlaps hide) and is a
          :class:`StorageError` saying it was made in part.
        """
        if sector_count <= 0:
            raise InvalidArgument(f"volume {self._name!r}: size must be at least one sector")
        path = self._path
        problem = size_limit_problem(path[0].sector_size, sector_count)
        if problem is not None:
            raise InvalidArgument(f"volume {self._name!r}: {problem}")
        for index, layer in enumerate(path):
            if not layer.can_resize:
                where = (
                    f"top {layer.kind} layer"
                    if index == 0
                    else f"{layer.kind} layer {index} (on the write path, resized with the top)"
                )
                raise NotSupported(f"volume {self._name!r}: its {where} cannot be resized")
        async with self._resizing:  # one resize at a time: the layers change one by one
            # A cancel (the caller's deadline) must not stop it between two layers.
            self._durability.change_began()
            changed = True  # unless it succeeds: then it synced what it changed
            try:
                await run_to_end(self._resize_path(sector_count))
                changed = False
            finally:
                self._durability.change_ended(changed)
        self._warn_of_stale_sizes()

    def _warn_of_stale_sizes(self) -> None:
        """After a resize: warn of each write-path layer whose config gives a ``size`` it no
        longer has, which the next start refuses (DESIGN.md §4: a layer keeps its recorded
        size; a config that disagrees is a start error)."""
        for index, layer in enumerate(self._path):
            configured = layer.configured_size
            size = layer.sector_count * layer.sector_size
            if configured is not None and configured != size:
                log.warning(
                    "volume %r: layer %d (%s) is %d bytes now, but its config says size = %d, "
                    "which the next start refuses: set size = %d in the config, or remove size "
                    "to take the layer's own",
                    self._name,
                    index,
                    layer.kind,
                    size,
                    configured,
                    size,
                )

    async def _resize_path(self, sector_count: int) -> None:
        # A shrink holds the sectors it cuts exclusive: writes and unmaps running there
        # finish first (none lands past the new end, e.g. a raw file's write extending
        # it again), and those waiting find the range gone (OUT_OF_RANGE).
        path, lock = self._path, self._sector_lock
        shrink = sector_count < path[0].sector_count  # (the volume's size: the top's)
        token = await lock.acquire_exclusive(sector_count, EVERY_SECTOR) if shrink else None
        self.shrinking = shrink  # (the volume's note_size: the cut is its own, read_into)
        grown: list[tuple[Layer, int]] = []  # (layer, old size) of lower layers grown so far
        cut = False  # a layer was shrunk: its data past the new end is gone
        # A grow goes bottom-up, the top last (the layers below must have room for what the
        # top takes); a shrink top-down, so one cut short (a failure, a crash) leaves layers
        # below the top larger than it, which the overlaps hide, never smaller (writes past
        # their end would fail until a resize).
        order = range(len(path)) if shrink else range(len(path) - 1, -1, -1)
        try:
            for index in order:
                layer = path[index]
                old = layer.sector_count
                # (a file layer syncs a resize: Durability.syncing)
                await self._durability.syncing(index, layer.resize(sector_count))
                if old < sector_count:
                    if index:
                        grown.append((layer, old))
                elif old > sector_count:  # its data past the new end is gone: no read asks
                    cut = True  # it there again (the layers' listeners lower them too)
                    self._lower_overlaps(index, layer.sector_count)
        except TierdiskError as exc:
            await self._undo_grows(grown)
            if cut and not isinstance(exc, StorageError):  # its code would say "nothing
                raise StorageError(  # changed" (RESOURCE_EXHAUSTED, FAILED_PRECONDITION, …)
                    f"volume {self._name!r}: the shrink to {sector_count} sectors was made in "
                    f"part (the top and the write-path layers before the failure were cut, "
                    f"then: {exc}); resize again"
                ) from None
            raise
        except BaseException:
            await self._undo_grows(grown)
            raise
        else:
            self._note_size(path[0].sector_count)  # (a top that calls no listener)
        finally:
            self.shrinking = False
            if token is not None:
                lock.release(token)

    async def _undo_grows(self, grown: list[tuple[Layer, int]]) -> None:
        """Shrink back the lower layers a failed resize grew (``(layer, old size)``)."""
        for layer, old in grown:
            try:
                await layer.resize(old)
            except Exception as exc:  # the original error is the one to report
                log.error(
                    "volume %r: could not shrink a %s layer back to %d sectors after a "
                    "failed resize: %s", self._name, layer.kind, old, exc,
                )  # fmt: skip

    async def follow_top(self) -> None:
        """Follow the top layer's size where it changes by itself (a ``remote`` top whose
        origin was resized; :meth:`Layer.wait_resize <tierdisk.service.layer.Layer.wait_resize>`),
        noting each size it reports; until cancelled. A failed watch is logged
        (rate-limited) and retried after a backoff (:data:`_TOP_WATCH_BACKOFF`)."""
        top = self._path[0]
        failures = RateLimitedLog(log)
        backoff = Backoff(*_TOP_WATCH_BACKOFF, jitter=0)
        while True:
            try:
                size = await top.wait_resize(self._sizes.size)
            except Exception as exc:  # e.g. a remote top that lost its origin: retry
                failures.warning("volume %r: watching the top layer's size failed: %s",
                                 self._name, exc)  # fmt: skip
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            self._note_size(size)
