"""A ``remote`` layer's view of its remote volume's geometry: the size followed, the rest guarded.

A :class:`GeometryFollower` belongs to one :class:`~.remote.RemoteLayer`, which owns the
size itself (:attr:`~..layer.Layer.sector_count`, the smallest size, telling listeners and
the NBD data path); the follower decides when a size is applied and when the layer must
refuse all I/O. The layer lends it what it needs as callables (the remote volume's gRPC
client, its size, how to apply a size, what to do when the target answers again and when
the geometry changed), so this module does not know the layer.

The size: after attach, a background task follows the remote's ``WatchResize``
(reconnecting with backoff when the stream breaks) and keeps the layer's size current; when
the layer is the top of a volume, the engine passes the change on to the volume's own
watchers. A stream that starts anew (the remote restarted, or the stream broke) first reads
the remote's smallest size (the same ``Inspect`` as the geometry check): if the remote was
shrunk (and grown back) while no stream ran, that smaller size is applied before the current
one, so the volume lowers its overlaps as if the watch had seen the shrink (DESIGN.md §3).
Attach waits (up to the attach timeout) for that stream to start, and the layer's
``resize`` (``Resize`` forwarded to the remote) takes the new size from the stream when it
runs (:meth:`GeometryFollower.wait_for_size`), so sizes are applied in the remote's order and
a late reply never puts back an older size.

The remote volume must keep its geometry: a volume re-created with another sector size (or,
when it had one at attach, another disk id) under the same name and address would take the
layer's sector numbers as other bytes (a write at the wrong place, a size read in other
units). So the geometry is checked again whenever the resize watch (re)connects, before the
stream's size is applied (one ``Inspect``, see below), and while no stream runs (it broke:
the remote may be restarting) each I/O checks it first (:meth:`GeometryFollower.check`),
then wakes the watch to reconnect. On a change, the size is never applied and every I/O of
the layer (reads over NBD too) fails with :class:`~..errors.FailedPrecondition` naming the
old and the new value (:attr:`GeometryFollower.refusal`), until the server restarts (and so
attaches the volume anew); ``inspect`` shows it as ``problem`` (``""`` while all is well).
The check costs the I/O path one attribute test (:attr:`GeometryFollower.checked`).

A remote that shrank before its ``WatchResize`` event arrived: the layer asks the remote's
size (:meth:`GeometryFollower.refreshed_size`: one ``Inspect``, size and generation of one
moment; GetVolume has no generation) and it is applied as the watch would (while a stream
runs only if its generation is newer than the last applied, so no older size comes back and
the event is not applied twice).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from tierdisk.client import errors as client_errors
from tierdisk.client.aio import AsyncVolume
from tierdisk.client.chunking import caller_cancelled

from .. import errors
from ..backoff import Backoff
from ..layer import layer_closed
from ..ratelimit import RateLimitedLog
from .remote_errors import Translate

__all__ = ["GeometryFollower"]

_WATCH_BACKOFF = (0.1, 5.0)
"""``(first, cap)`` in seconds: the reconnect delays of the WatchResize follower
(:class:`~tierdisk.service.backoff.Backoff`, doubling, jittered to 0.5-1.5 times)."""

_APPLIED_KEPT = 256
"""How many of the last sizes the follower applied it remembers, for :meth:`wait_for_size`."""


class GeometryFollower:
    """The resize follower and geometry guard of one remote layer (module docstring).

    What the layer lends it: ``where()`` names the remote in messages (asked when one is
    made: a layer's target may be set after the layer is made); ``timeout`` is its seconds
    per call, the longest :meth:`wait_for_size` waits; ``remote()`` is the remote
    volume's gRPC client; ``apply(sector_count)``
    applies a size to the layer; ``resumed()`` is called when a stream starts (the target
    answers again); ``refused(problem)`` is awaited once, when the geometry changed (the
    layer records its problem and stops reading over NBD); ``log`` is the layer's logger.

    The layer reads :attr:`checked`, :attr:`watching` and :attr:`refusal`; only the follower
    sets them."""

    def __init__(
        self,
        *,
        where: Callable[[], str],
        owner: Callable[[], str] = lambda: "",
        timeout: float,
        remote: Callable[[], AsyncVolume],
        apply: Callable[[int], None],
        smallest: Callable[[], int],
        resumed: Callable[[], None],
        refused: Callable[[str], Awaitable[None]],
        log: logging.Logger,
    ) -> None:
        self._where = where
        self._owner = owner  # where the layer serves, before its log lines (RemoteLayer.owner)
        self._timeout = timeout
        self._remote = remote
        self._apply = apply
        self._smallest = smallest
        self._resumed = resumed
        self._refused = refused
        self._errors = Translate(where)
        self._task: asyncio.Task[None] | None = None
        self.watching = False
        """True while a resize watch stream runs (its first event applied)."""
        self._news = asyncio.Event()  # replaced and set on each watch event or break
        self._generation: int | None = None  # remote size generation applied (while watching)
        self._wake = asyncio.Event()  # cuts the watch's reconnect backoff short
        self._sector_size = 0  # the remote volume's, at attach (set by start)
        self._disk_id = ""  # the remote volume's at attach, hex ("" when it had none)
        self.checked = True
        """False while the remote's geometry is not known to be the one of attach: from the
        end of a resize watch stream until the next one's check, and for good once
        :attr:`refusal` is set. Every I/O tests it (the only cost on its path)."""
        self.refusal: errors.FailedPrecondition | None = None
        """Set when the remote volume's geometry changed: what every I/O raises."""
        self._io_check: asyncio.Task[None] | None = None  # a check shared by waiting I/O
        self._applied = 0  # sizes applied so far (by the watch or a refresh)
        self._recent: collections.deque[tuple[int, int]] = collections.deque(
            maxlen=_APPLIED_KEPT
        )  # the last ones: (number, size in sectors)
        self._stream_started = 0  # self._applied when the last stream's first event came
        self._log = RateLimitedLog(log)
        self._fault_log = RateLimitedLog(log)  # faults of ours: not held back by the above

    # -- life cycle -----------------------------------------------------------------------

    async def start(self, sector_size: int, disk_id: bytes, *, wait: float, name: str) -> None:
        """At attach: remember the remote's ``sector_size`` and ``disk_id`` (as GetVolume
        gave them), start following its WatchResize (task ``name``), and wait up to ``wait``
        seconds for the stream to start (or for a geometry change: :attr:`refusal`)."""
        self._sector_size = sector_size
        self._disk_id = disk_id.hex()
        self._task = asyncio.create_task(self._follow(), name=name)
        # Have the watch running before any I/O: then every later size change arrives on it
        # in order, and no first message of a late stream can bring back an older size.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                while not self.watching and self.refusal is None:
                    await self._news.wait()

    async def close(self) -> None:
        """Stop following (at the layer's close), and any check I/O wait for."""
        for task in (self._task, self._io_check):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._task = self._io_check = None

    # -- the size -------------------------------------------------------------------------

    def mark(self) -> int:
        """A point in the sizes applied, taken before a ``Resize`` is sent: what
        :meth:`wait_for_size` looks after."""
        return self._applied

    async def wait_for_size(self, size: int, since: int) -> bool:
        """The remote answered a ``Resize`` with ``size`` while a stream runs: wait (up to
        the layer's ``timeout``) for the stream to bring it. True once the follower has
        applied ``size`` after ``since`` (:meth:`mark`, taken before the ``Resize`` was
        sent), also when a newer size came after it (someone else's resize): the layer then
        has the remote's latest size. False when it has not: the stream ended, a new stream
        started after ``since`` (its first event is the remote's size when it started, which
        may already be past ``size``), or it was late; then the caller asks the remote's
        size (:meth:`refreshed_size`) rather than take the reply, which may be older than
        what the layer has. After a geometry change, :attr:`refusal` is raised instead."""
        # The watch reports every size change in order, this one included; taking the
        # reply instead could put back an older size after a newer change (someone
        # else's resize) already arrived.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._timeout):
                while (
                    self.watching
                    and self._stream_started <= since
                    and not self._applied_since(since, size)
                ):
                    await self._news.wait()
        if self._applied_since(since, size):
            return True
        if self.refusal is not None:  # the remote changed meanwhile: not in its units
            raise self.refusal
        return False

    def _applied_since(self, since: int, size: int) -> bool:
        """Whether ``size`` was applied after the :meth:`mark` ``since``."""
        return any(number > since and applied == size for number, applied in self._recent)

    def _set(self, sector_count: int) -> None:
        """Apply ``sector_count`` to the layer, remembered for :meth:`wait_for_size`."""
        self._apply(sector_count)
        self._applied += 1
        self._recent.append((self._applied, sector_count))

    async def refreshed_size(self) -> int:
        """The remote's size now, asked after it refused as out of range sectors inside the
        size the layer knew (it shrank; the watch has not said so yet), and applied as the
        watch would: while a stream runs, only if newer than the last size it applied (its
        event, when it comes, is then not applied again, and no late answer brings back an
        older size); with no stream, at once (the next stream's first event says it anew).
        The geometry is checked first; client errors become domain errors."""
        with self._errors:
            state = await self._remote_state()
            await self._check_geometry(state)
        if not self.watching:
            self._set_state(state.sector_count, state.smallest)
        elif self._generation is not None and state.generation > self._generation:
            self._generation = state.generation
            self._set_state(state.sector_count, state.smallest)
            self._spoke()
        return state.sector_count

    def _set_state(self, size: int, smallest: int) -> None:
        """Apply the remote's ``size``, learnt from its Inspect rather than event by event:
        first its ``smallest`` size when that is below both ``size`` and the smallest the
        layer has seen (it shrank and grew again unseen, or the shrink's event, older, will
        not be applied), so the layers below hide what lay past it, as if the watch had
        seen the shrink (DESIGN.md §3)."""
        if smallest < min(size, self._smallest()):
            self._set(smallest)
        self._set(size)

    def _spoke(self) -> None:
        """Wake :meth:`wait_for_size` callers (an event, or the stream ended)."""
        news, self._news = self._news, asyncio.Event()
        news.set()

    async def _follow(self) -> None:
        """Follow the remote's WatchResize for as long as the layer lives, reconnecting with
        jittered exponential backoff when the stream breaks or the remote restarts (sooner
        when an I/O found the remote answering again). The first event of each stream is
        applied only once the remote's geometry proved unchanged; after a change, following
        ends (the layer refuses all I/O)."""
        backoff = Backoff(*_WATCH_BACKOFF)
        vol = self._remote()
        while self.refusal is None:
            try:
                async for event in vol.watch_resize():
                    if not self.watching:  # a new stream: which volume answers it now?
                        state = await self._remote_state()
                        await self._check_geometry(state)
                        self.watching = self.checked = True
                        # The Inspect came after the event: if the size changed between
                        # the two, its size is the newer (the stream's next events up to
                        # its generation are then not applied again).
                        if state.generation > event.generation:
                            self._generation, size = state.generation, state.sector_count
                        else:
                            self._generation, size = event.generation, event.sector_count
                        self._set_state(size, state.smallest)  # shrunk while unwatched?
                        self._stream_started = self._applied
                        backoff.reset()  # (not before: a fault applying it backs off)
                        self._resumed()  # the target is back: NBD may be too
                    elif self._generation is None or event.generation > self._generation:
                        self._generation = event.generation  # (else a refresh applied it)
                        self._set(event.sector_count)
                    self._spoke()
            except client_errors.TierdiskError as exc:
                self._log.warning(
                    "%s%s: resize watch broke (%s); reconnecting", self._owner(), self._where(), exc
                )
            except Exception as exc:  # the guard's refusal ends it below; else keep following
                if self.refusal is None:  # a fault of ours: say so, not end without a word
                    self._fault_log.error(
                        "%s%s: resize watch failed (%s: %s); reconnecting",
                        self._owner(),
                        self._where(),
                        type(exc).__name__,
                        exc,
                    )
            finally:
                self.watching = self.checked = False
                self._generation = None
                self._wake.clear()
                self._spoke()
            if self.refusal is not None:
                return
            # The backoff; an I/O that found the remote answering cuts it short (but never
            # below the first delay, so attempts stay bounded whatever the I/O rate).
            wait = backoff.next()
            await asyncio.sleep(min(wait, backoff.first))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, wait - backoff.first)):
                    await self._wake.wait()

    # -- the geometry ---------------------------------------------------------------------

    async def check(self) -> None:
        """Before an I/O while :attr:`checked` is False (the remote's geometry is not known
        to be unchanged: no resize watch stream runs, the remote may be restarting with
        another one): :attr:`refusal` after a change; else one check, shared by the I/O that
        wait for it, then the I/O may go on (and the watch reconnects now, the remote
        answering)."""
        if self.refusal is not None:
            raise self.refusal
        check = self._io_check
        if check is None:
            check = self._io_check = asyncio.create_task(self._check_for_io())
            check.add_done_callback(_retrieve)  # its error is raised to those who wait
        try:
            await asyncio.shield(check)
        except asyncio.CancelledError:
            if caller_cancelled() or not check.cancelled():
                raise
            raise layer_closed(self._where()) from None  # close() cancelled the check
        finally:
            # The task holds the error raised, whose traceback holds this frame: without
            # this, the I/O waiting here (its buffers) stayed until a garbage collection.
            del check

    async def _check_for_io(self) -> None:
        try:
            with self._errors:
                await self._check_geometry()
            self._wake.set()
        finally:
            self._io_check = None

    async def _remote_state(self) -> _RemoteState:
        """The remote volume's sector size, disk id, size and size generation, as one
        ``Inspect`` reports them (one moment of the volume; GetVolume has no generation).
        Client errors pass through."""
        vol = self._remote()
        tree = await vol.inspect()
        sector_size, sector_count, generation, disk_id, smallest = (
            tree.get("sector_size"),
            tree.get("sector_count"),
            tree.get("generation"),
            tree.get("disk_id", ""),
            tree.get("smallest_sector_count"),
        )
        if (
            isinstance(sector_size, int)
            and isinstance(sector_count, int)
            and isinstance(generation, int)
            and isinstance(disk_id, str)
        ):
            if not isinstance(smallest, int):  # a server that does not say: its size
                smallest = sector_count
            return _RemoteState(sector_size, disk_id, sector_count, generation, smallest)
        raise client_errors.StorageError(
            "its Inspect tree lacks sector_size, sector_count, generation or disk_id",
            volume=vol.name,
        )

    async def _check_geometry(self, state: _RemoteState | None = None) -> None:
        """Raise (and set for good) :attr:`refusal` if the remote volume's sector size, or
        its disk id when it had one at attach, is not what it was at attach (``state``, or
        asked now); client errors pass through."""
        if state is None:
            state = await self._remote_state()
        changes = []
        if state.sector_size != self._sector_size:
            changes.append(f"{state.sector_size}-byte sectors, not {self._sector_size}")
        attached = self._disk_id
        if attached and state.disk_id != attached:
            changes.append(f"disk id {state.disk_id or '(none)'}, not {attached}")
        if not changes:
            return
        if self.refusal is None:
            self.refusal = errors.FailedPrecondition(
                f"{self._where()} changed since this layer attached: it now has "
                f"{' and '.join(changes)} (re-created with another geometry?). Its sector "
                "numbers no longer address the data this layer was attached to, so the layer "
                "refuses all I/O: restart this server to attach the volume anew, to the remote "
                "volume as it is now"
            )
            self.checked = False
            await self._refused(str(self.refusal))  # the server logs it, naming the volume
            self._spoke()
        raise self.refusal


class _RemoteState(NamedTuple):
    """What :meth:`GeometryFollower._remote_state` reads from the remote volume's Inspect."""

    sector_size: int
    disk_id: str  # hex; "" when the volume has none
    sector_count: int
    generation: int
    smallest: int  # the smallest size it has had (its smallest_sector_count)


def _retrieve(task: asyncio.Task[None]) -> None:
    """Mark ``task``'s outcome seen (its waiters may all have been cancelled)."""
    if not task.cancelled():
        task.exception()
