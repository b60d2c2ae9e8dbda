"""What a volume does when a layer of its write path fails a write or unmap (DESIGN.md §3).

On a write path of several layers (the top and every layer below a ``write_through`` one) a
write or unmap goes top-down, one layer after another, so a layer that fails it does so after
the layers above it took it. :meth:`WriteFailures.failed_below` has those layers drop it
again where they can (``ram``, ``sparse``, ``sqlite``:
:attr:`~tierdisk.service.layer.Layer.can_drop_sectors`), so reads show the layers below and
no layer keeps a change the ones below it lack, and gives the error to raise: the layer's
own when nothing changed, else one that says the change was made in part. Where a layer
above cannot drop it (``raw``, ``remote``), a failure for space is a
:class:`~tierdisk.service.errors.StorageError`, not :class:`~tierdisk.service.errors.NoSpace`
(which says nothing changed), saying reads return a change that is not durable; so is a
write that a write-path layer smaller than the top took only in part
(:meth:`WriteFailures.past_the_end`). A change that fails after its caller left
(:func:`~tierdisk.service.unstoppable.run_to_end`) is logged
(:meth:`WriteFailures.failed_unseen`).

Sectors and sizes are in sectors of the volume's sector size; ``[sector, end)`` is the range
of the change. Layers are indexed as in the volume, 0 the top. The log lines are the
volume's (its logger, :mod:`tierdisk.service.volume`), rate-limited per volume. No gRPC here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .errors import NoSpace, OutOfRange, StorageError, TierdiskError
from .layer import Layer
from .ratelimit import RateLimitedLog

__all__ = ["WriteFailures"]

log = logging.getLogger("tierdisk.service.volume")
"""The volume's logger: these lines are the volume's and keep the name they have always had."""


class WriteFailures:
    """The failures of writes and unmaps on the write path of the volume ``name``, whose
    layers are ``layers`` (top first); ``write_limit(index, end)`` is the end of what
    write-path layer ``index`` takes of a change ending at ``end``
    (:meth:`~tierdisk.service.volume.Volume._write_limit`)."""

    def __init__(
        self, name: str, layers: list[Layer], write_limit: Callable[[int, int], int]
    ) -> None:
        self._name = name
        self._layers = layers
        self._write_limit = write_limit
        self._kept_log = RateLimitedLog(log)  # failed changes a layer above kept (_drop_above)
        self._unseen_log = RateLimitedLog(log)  # failed changes nobody awaited (failed_unseen)

    def failed_unseen(self, exc: BaseException) -> None:
        """A write or unmap down a write path of several layers failed after its caller
        was cancelled (so nobody is told): logged, at most one line every 10 s per volume
        (the count of lines held back goes with the next: callers giving up on a tier that
        hangs make one such failure per write). The layers above the one that failed
        dropped it again where they could (:meth:`failed_below`; where one could not, that
        is logged too, and reads may return the change, never acknowledged)."""
        self._unseen_log.warning(
            "volume %r: a write or unmap whose caller had gone failed on the write path (%s)",
            self._name,
            exc,
        )

    async def failed_below(
        self, exc: Exception, index: int, changed_at: int, sector: int, end: int, what: str
    ) -> Exception:
        """The error to raise for a write or unmap of ``[sector, end)`` that write-path layer
        ``index`` failed with ``exc``. The layers above it (all write-through) took it
        already: each drops those sectors again (:meth:`_drop_above`), so reads take them
        from layer ``index`` and below and no layer holds a change the ones below it lack
        (a cache tier whose origin is down keeps no write its origin never got; a ``ram``
        top no write that the next start loses). ``exc`` is then raised as it is. Where a
        layer above could not drop them (a ``raw`` file, a ``remote`` tier), reads return
        the change, which is not durable, and the error says so for a layer out of space
        or past its end; any other failure (``UNAVAILABLE``, say) is raised as it is, as a
        retry of the call writes every layer again. ``changed_at``: the last layer that took
        part of the change (-1: none, and ``exc`` is raised as it is); when that is layer
        ``index`` itself (a change of several calls), the error says it was made in part."""
        if changed_at < 0:
            return exc
        partly = changed_at == index
        undone = index == 0 or await self._drop_above(index, sector, end, exc)
        if isinstance(exc, NoSpace):
            return self._out_of_space(exc, partly or not undone, what)
        if isinstance(exc, OutOfRange):
            changed = partly or not undone
            return self._shrunk_below(exc, index, changed, sector, end, what, not undone)
        return exc

    async def _drop_above(self, index: int, sector: int, end: int, exc: Exception) -> bool:
        """Drop ``[sector, end)`` (each as far as its write limit) from the write-path
        layers above layer ``index``, which failed a change of them with ``exc``: they are
        write-through, so what they hold there mirrors the layers below, and dropping it
        shows the layers below again. True when every one could
        (:attr:`~tierdisk.service.layer.Layer.can_drop_sectors`) and did; a layer that keeps
        it is logged (at most once per ten seconds and layer)."""
        dropped = True
        for above in range(index):
            layer = self._layers[above]
            hi = self._write_limit(above, end)
            if hi <= sector:
                continue
            if layer.can_drop_sectors:
                try:
                    await layer.unmap(sector, hi - sector, False, True)
                    continue
                except Exception as drop_failure:
                    why = f"dropping it failed: {drop_failure}"
            else:
                why = f"a {layer.kind} layer cannot drop sectors"
            dropped = False
            self._kept_log.warning(
                "volume %r: write-path layer %d failed a change of sectors [%d, %d) (%s) that "
                "layer %d above it took and keeps (%s): reads return the change, which is not "
                "durable, until those sectors are written again",
                self._name,
                index,
                sector,
                end,
                exc,
                above,
                why,
                key=above,
            )
        return dropped

    def past_the_end(self, index: int, sector: int, end: int) -> StorageError:
        """The error for a write of ``[sector, end)`` that write-path layer ``index`` (a
        durable copy, smaller than the top) could take only in part: the layers above
        hold it and reads return it, but past that layer's end it is not durable."""
        layer = self._layers[index]
        size = layer.sector_count
        return StorageError(
            f"volume {self._name!r}: sectors [{max(sector, size)}, {end}) of this write lie past "
            f"the end of write-path layer {index} ({layer.kind}, {size} sectors): the layers "
            "above took them (reads return them) but they are not durable; give that layer "
            "the top's size, or resize the volume (which resizes every write-path layer)"
        )

    def _shrunk_below(
        self,
        exc: OutOfRange,
        index: int,
        changed: bool,
        sector: int,
        end: int,
        what: str,
        above_kept: bool,
    ) -> TierdiskError:
        """The error for a write or unmap of ``[sector, end)`` that write-path layer
        ``index`` refused as past its end though this volume's size has it: a layer that
        shrank by itself (a ``remote`` whose origin was shrunk, before its watch said so).
        When nothing ``changed`` yet it is ``exc`` itself; else (a layer above kept it,
        ``above_kept``, or an earlier part of it was made) it is not "out of range", which
        says nothing changed, but ``INTERNAL``, as :meth:`past_the_end` says for a layer
        known to be smaller."""
        if not changed:
            return exc
        layer = self._layers[index]
        made = (
            "the layers above took it (reads return it) but it is not durable"
            if above_kept
            else "part of it was made, the rest not"
        )
        return StorageError(
            f"volume {self._name!r}: the {what} of sectors [{sector}, {end}) reached past the "
            f"end of write-path layer {index} ({layer.kind}), now smaller than the volume "
            f"({exc}): {made}"
        )

    def _out_of_space(self, exc: NoSpace, changed: bool, what: str) -> TierdiskError:
        """The error for a write or unmap a layer had no space for: ``exc`` itself when
        nothing changed yet, else a :class:`StorageError` saying it was made in part (a
        layer above the one out of space took it, and reads return that)."""
        if not changed:
            return exc
        return exc.after_a_change(
            f"volume {self._name!r}: the {what} was made in part (reads may return it) but "
            "not on every layer of the write path: it is not durable"
        )
