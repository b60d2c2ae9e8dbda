"""What a volume promises about acknowledged writes: flushes in rounds, and the write
verifier that says when writes acknowledged before may be lost (DESIGN.md §3 Flush; the
README's "Write verifiers"; clients: :mod:`tierdisk.client.verifiers`).

Flushes run in rounds, one at a time, each flushing the write-path layers together. A flush
waits for the round under way, if any (it does not cover writes acknowledged after it
began), and then joins the next one, which serves every flush that was waiting (group
commit). A round runs to its end even when every flush awaiting it is cancelled (a
deadline), so what it finds is never dropped. Each read cache off the write path is flushed
beside the rounds, not waited for: a cache tier that hangs must not hold up the volume's
flushes (its fills are fetched again when needed; a failure is logged).

The write verifier (non-zero, 64 bits) is renewed when writes acknowledged before may be
gone: a write-path layer's flush, FUA write or resize that fails in its storage (a failed
``fsync`` may drop the dirty pages it was to write, and the next one succeeds), unless the
layer is a remote tier, whose own verifier answers for its writes; and a tier's
:class:`WritesLost`. The server keeps it over clean stops
(:mod:`~tierdisk.service.verifier_store`) and answers writes and flushes with it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from functools import partial
from typing import TYPE_CHECKING

from .errors import DeadlineExceeded, NoSpace, StorageError, Unavailable, WritesLost
from .ratelimit import RateLimitedLog
from .unstoppable import run_to_end
from .verifier_store import new_verifier

if TYPE_CHECKING:
    from .volume import LayerEntry

__all__ = ["Durability"]

log = logging.getLogger(__name__)


class Durability:
    """The flush rounds and the write verifier of the volume ``name``, whose layers are
    ``entries`` (top first) and whose write path is the first ``write_path`` of them;
    ``keeps_writes``: some write-path layer outlives the server (not only ``ram``)."""

    def __init__(
        self, name: str, entries: Sequence[LayerEntry], write_path: int, keeps_writes: bool
    ) -> None:
        self._name = name
        self._entries = entries
        self._layers = [entry.layer for entry in entries]
        self._write_path = write_path
        # A change made durable is so for good only when the volume keeps its writes and no
        # remote tier is on its write path (durable_since).
        self._durable_when_synced = keeps_writes and not any(
            layer.reports_lost_writes for layer in self._layers[:write_path]
        )
        self.write_verifier = new_verifier()
        """Non-zero; renewed whenever writes acknowledged without being durable may have
        been lost (:meth:`_sync_failed`)."""
        self.changes = 0
        """Times :attr:`write_verifier` was renewed (after it was set)."""
        self._renewals = RateLimitedLog(log)  # a flush loop over a lost file: one line a 10 s
        self._flush_task: asyncio.Future[None] | None = None  # the flush round under way
        self._cache_flushes: dict[int, asyncio.Future[None]] = {}  # by layer index
        self._closing = False  # close() began: no new flush round
        self._flush_rounds = 0  # flush rounds begun
        self._flushed_through = 0  # the latest round that succeeded
        self._changes_running = 0  # writes, unmaps and resizes under way (change_began)
        self._changes_ended = 0  # those that ended and may have changed something
        self._changes_flushed = 0  # of those, the ones a round that succeeded began after

    def change_began(self) -> None:
        """A write, an unmap or a resize begins changing the write path (call
        :meth:`change_ended` when it ends, however it ends)."""
        self._changes_running += 1

    def change_ended(self, changed: bool = True) -> None:
        """The change begun (:meth:`change_began`) ended. ``changed``: it is at stake
        until a flush round that begins after this succeeds (:attr:`changed_since_flush`):
        a write or an unmap that was acknowledged, or whose caller was cancelled (it may
        have gone on to its end); a resize that failed (it may have changed some layers
        and synced none). A write or an unmap that failed was acknowledged to no one, so
        none of what it may have changed is a write at stake; a resize that succeeded
        synced every layer it changed (:meth:`syncing`): neither is ``changed``."""
        self._changes_running -= 1
        if changed:
            self._changes_ended += 1

    @property
    def changed_since_open(self) -> bool:
        """Whether a change is under way or has ended since the volume opened."""
        return self._changes_running > 0 or self._changes_ended > 0

    @property
    def changed_since_flush(self) -> bool:
        """Whether a change is under way, or ended (:meth:`change_ended`) and no flush round
        that succeeded began after it: False when every acknowledged write is durable as
        far as a flush can make it so, and a flush has nothing of the volume's to do (a
        read-only volume, one only read since its last flush)."""
        return self._changes_running > 0 or self._changes_ended != self._changes_flushed

    async def flush(self) -> None:
        """Make every write acknowledged before the call durable on the write path, in the
        next round to begin (module docs); start a flush of each read cache off it.

        Raises the round's first failure; one in a write-path layer's storage renews
        :attr:`write_verifier` first. A remote tier that lost writes it had acknowledged is
        not a failure: the tier has flushed now, and the renewed verifier tells each caller
        whether writes of its own are at stake (``WriteResponse.write_verifier``; a caller
        that ignores it is not told). :class:`Unavailable` once :meth:`close` began."""
        need = self._flush_rounds + 1  # a round started from now on covers this call
        while self._flushed_through < need:
            running = self._flush_task
            if running is None or running.done():
                if self._closing:
                    raise Unavailable(f"volume {self._name!r} is closing")
                self._flush_rounds += 1
                running = asyncio.ensure_future(self._flush_round(self._flush_rounds))
                running.add_done_callback(_retrieved)
                self._flush_task = running
            number = self._flush_rounds
            try:
                await asyncio.shield(running)
            except Exception:
                if number >= need:  # a round that covers this call failed
                    raise
                # a round begun before this call failed: the next one is this call's

    async def close(self) -> None:
        """Refuse new rounds (a flush waiting for one gets :class:`Unavailable`), then wait
        for the round under way and the read caches' flushes to end."""
        self._closing = True
        while self._flush_task is not None and not self._flush_task.done():
            await asyncio.wait([self._flush_task])
        if self._cache_flushes:
            await asyncio.wait(list(self._cache_flushes.values()))

    def durable_since(self, verifier: int) -> bool:
        """Whether a change made durable (a FUA write the volume respects, one followed by
        a flush) that began under ``verifier`` is durable for good: the volume keeps its
        writes past a restart (a ram-only write path does not), no remote tier is on its
        write path (a tier's FUA write is durable only if its origin answered so, which the
        layer does not pass up, and its origin may keep nothing), and nothing renewed the
        verifier while it ran (a flush or a sync that failed meanwhile, a tier that lost
        writes, may have taken it with it). Otherwise it is answered with ``verifier``, for
        a later flush to vouch for."""
        return self._durable_when_synced and self.write_verifier == verifier

    async def syncing(self, index: int, work: Awaitable[None]) -> None:
        """Await ``work``, a FUA write or a resize of write-path layer ``index`` (it syncs),
        and let :meth:`_sync_failed` see its failure. For a local layer that happens even
        when the caller is cancelled meanwhile: the layer's sync runs to its end anyway (in
        a thread), and its error, which may have cost other writes their pages, must not be
        dropped with the cancel. A remote tier's call is simply awaited (a cancel stops it;
        its failures renew nothing but :class:`WritesLost`)."""

        async def observed() -> None:
            try:
                await work
            except BaseException as exc:
                self._sync_failed(index, exc, refusal_possible=True)
                raise

        if self._layers[index].reports_lost_writes:
            await observed()
        else:
            await run_to_end(observed())

    async def _flush_round(self, number: int) -> None:
        """Flush round ``number``: the write-path layers together, all waited for, then a
        failure raised: a layer's own (its storage) before a tier's that did not answer
        (``UNAVAILABLE``, ``DEADLINE_EXCEEDED``), which a stop may forgive
        (``Server._final_flush``) and so must not hide the other. Each read cache off the
        write path gets a flush of its own started beside it (when its last one has
        ended), not waited for. Covers the changes that ended before it began
        (:attr:`changed_since_flush`)."""
        covered = self._changes_ended
        for index in range(self._write_path, len(self._entries)):
            if self._entries[index].read_cache and index not in self._cache_flushes:
                task = asyncio.ensure_future(self._flush_cache(index))
                self._cache_flushes[index] = task
                task.add_done_callback(partial(self._cache_flushed, index))
        results = await asyncio.gather(
            *(self._flush_layer(i) for i in range(self._write_path)), return_exceptions=True
        )
        failures = [result for result in results if result is not None]
        if failures:
            raise next(
                (f for f in failures if not isinstance(f, Unavailable | DeadlineExceeded)),
                failures[0],
            )
        self._flushed_through = number
        self._changes_flushed = covered  # (rounds run one at a time, in order)

    async def _flush_layer(self, index: int) -> None:
        """Flush write-path layer ``index``: :meth:`_sync_failed` sees a failure first. A
        remote tier's :class:`WritesLost` is not raised (the verifier says it); a
        :class:`NoSpace` is raised as a :class:`StorageError` (the flush may have lost
        writes: ``RESOURCE_EXHAUSTED`` would say nothing changed)."""
        try:
            await self._layers[index].flush()
        except Exception as exc:
            self._sync_failed(index, exc)
            if isinstance(exc, WritesLost):
                return
            if isinstance(exc, NoSpace):
                raise exc.after_a_change("writes acknowledged before may be lost") from None
            raise

    async def _flush_cache(self, index: int) -> None:
        """Flush the read cache ``index`` (off the write path), best effort: logged."""
        try:
            await self._layers[index].flush()
        except Exception as exc:
            self._entries[index].fill_log.warning(
                "volume %r: read cache layer %d not flushed (its fills are fetched again "
                "when needed): %s",
                self._name,
                index,
                exc,
            )

    def _cache_flushed(self, index: int, _: asyncio.Future[None]) -> None:
        del self._cache_flushes[index]

    def _sync_failed(
        self, index: int, exc: BaseException, *, refusal_possible: bool = False
    ) -> None:
        """A flush, a FUA write or a resize of layer ``index`` failed with ``exc``: renew
        :attr:`write_verifier` when writes acknowledged before may be gone. That is a
        write-path layer's failure in its storage (:class:`StorageError`, ``OSError``, and
        for a flush :class:`NoSpace`: a failed ``fsync`` may drop the dirty pages it was to
        write, and the next one succeeds), unless the layer is a tier that says so itself
        (:attr:`Layer.reports_lost_writes`: its own verifier answers for its writes), and a
        tier's :class:`WritesLost`. A tier that did not answer loses nothing: its writes
        wait there for the next try. With ``refusal_possible`` (a write or a resize), a
        :class:`NoSpace` is a refusal made before anything was synced (the space could not
        be reserved or mapped: a reserved write cannot fail its sync for space), not a
        loss."""
        if index >= self._write_path:
            return
        layer = self._layers[index]
        if isinstance(exc, WritesLost):
            why = "lost writes it had acknowledged"
        elif isinstance(exc, NoSpace) and refusal_possible:
            return
        elif isinstance(exc, StorageError | NoSpace | OSError) and not layer.reports_lost_writes:
            why = "failed in its storage"
        else:
            return
        self.write_verifier = new_verifier(self.write_verifier)
        self.changes += 1
        self._renewals.warning(
            "volume %r: write verifier renewed: layer %d (%s) %s: %s (clients with writes "
            "acknowledged before learn it at their next flush)",
            self._name,
            index,
            layer.kind,
            why,
            exc,
            key=(index, why),
        )


def _retrieved(task: asyncio.Future[None]) -> None:
    """Mark a flush round's error retrieved: every flush awaiting it may have been cancelled
    (asyncio would log it as never retrieved). Its storage failures were logged as they
    renewed the verifier; a tier that did not answer is tried again by the next round."""
    if not task.cancelled():
        task.exception()
