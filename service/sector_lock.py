"""Shared and exclusive holds on sector ranges: :class:`SectorLock`."""

from __future__ import annotations

import asyncio

from .runs import Run

__all__ = ["EVERY_SECTOR", "SectorLock"]

EVERY_SECTOR = 1 << 63
"""Past any sector: ``[0, EVERY_SECTOR)`` holds a whole layer (e.g. while it closes)."""


class SectorLock:
    """Shared and exclusive holds on sector ranges (asyncio: holders are tasks of one loop).

    Shared holds overlap freely; an exclusive hold overlaps no other hold. A waiting
    exclusive hold blocks new overlapping shared holds, so it is not starved. Two users:

    - a volume (:attr:`~tierdisk.service.volume.Volume.sector_lock`): every write and unmap
      holds its sectors shared (exclusive on a write path of several layers, so they reach
      every layer in one order), a read-modify-write
      (:meth:`~tierdisk.service.volume.Volume.write_at`) holds its covering sectors
      exclusive from its read to the end of its write, so every write or unmap of those
      sectors lands wholly before its read or wholly after its write, and a shrink holds
      the sectors it cuts exclusive;
    - a layer whose reads and writes copy through the page cache at the same time (``raw``,
      ``sparse``: a read on the event loop, a write on a thread): reads hold shared, writes
      and unmaps exclusive, because the kernel does not keep a buffered read from copying a
      page while a write is copying into it, and such a read returns a torn sector
      (DESIGN.md §3: a read racing a write sees old or new data per sector, never torn).

    Cost: while no exclusive hold is held or waiting (the usual case for a volume's reads
    and a single-layer write path) a shared hold is not registered, only counted (one
    integer increment, and a decrement at release). An exclusive hold waits for every such
    counted hold to end (they all began before it, so they are few and finish), and while
    it waits or is held, new shared holds are registered by range and wait only if they
    overlap it. Where exclusive holds are the rule (every write of a layer, every write of
    a volume whose write path has several layers), holds are registered by range and only
    overlapping ones wait for each other.

    Waiting: a release hands the sectors over (:meth:`_hand_off`): there and then it grants
    every waiting hold that the freed sectors unblock, exclusive ones first in the order
    they came, then shared ones, and wakes only those; a hold asked for after the release
    cannot take the sectors first. A waiter still blocked is not woken, and waiters of
    other sectors cost one comparison each, so holds queued on one sector are granted one
    per release with no scan of the rest. Measured in-process (``acquire_exclusive`` of
    one sector by P tasks, each holding it over one loop turn; CPU per hold): P = 32,
    ~12 µs, P = 256, ~22 µs, against ~60 and ~450 µs when every release woke every waiter
    to look again.
    """

    def __init__(self) -> None:
        self._counted = 0  # shared holds taken while no exclusive one was held or waiting
        self._shared: dict[int, Run] = {}  # registered shared holds, by token
        self._exclusive: dict[int, Run] = {}
        self._pending: dict[int, Run] = {}  # exclusive holds waiting, in arrival order
        self._queued: dict[int, Run] = {}  # shared holds waiting, in arrival order
        self._grants: dict[int, asyncio.Future[int]] = {}  # each waiting hold's hand-off
        self._next = 0
        self._closing = False

    @property
    def closing(self) -> bool:
        """True once :meth:`hold_for_close` began (and was not cancelled)."""
        return self._closing

    async def hold_for_close(self) -> int | None:
        """Begin closing the layer this lock guards: mark it :attr:`closing` (its I/O from
        now on is refused by the layer) and hold every sector exclusive, which waits for
        every hold under way; the token, or None when a close already began. Cancelled
        while waiting, the mark is taken back, so a later close does it all."""
        if self._closing:
            return None
        self._closing = True
        try:
            return await self.acquire_exclusive(0, EVERY_SECTOR)
        except BaseException:
            self._closing = False
            raise

    @staticmethod
    def _overlaps(start: int, end: int, held: dict[int, Run]) -> bool:
        for a, b in held.values():  # noqa: SIM110 (a loop costs a third of any() over a generator)
            if a < end and start < b:
                return True
        return False

    def try_shared(self, start: int, end: int) -> int | None:
        """Hold sectors ``[start, end)`` shared if that needs no wait: the token for
        :meth:`release` (0 for a counted hold), or None when an exclusive hold held or
        waiting overlaps the range."""
        if not self._exclusive and not self._pending:
            self._counted += 1
            return 0
        if self._overlaps(start, end, self._exclusive) or self._overlaps(start, end, self._pending):
            return None
        self._next += 1
        self._shared[self._next] = (start, end)
        return self._next

    async def acquire_shared(self, start: int, end: int) -> int:
        """Hold sectors ``[start, end)`` shared; returns the token for :meth:`release`."""
        token = self.try_shared(start, end)
        if token is not None:
            return token
        self._next += 1
        self._queued[self._next] = (start, end)
        return await self._granted(self._next, self._queued)

    async def acquire_exclusive(self, start: int, end: int) -> int:
        """Hold sectors ``[start, end)`` exclusive; returns the token for :meth:`release`.
        An empty range overlaps nothing: it is held at once."""
        self._next += 1
        token = self._next
        if start >= end or not (
            self._counted
            or self._overlaps(start, end, self._shared)
            or self._overlaps(start, end, self._exclusive)
        ):
            self._exclusive[token] = (start, end)
            return token
        self._pending[token] = (start, end)
        return await self._granted(token, self._pending)

    async def _granted(self, token: int, waiting: dict[int, Run]) -> int:
        """Wait until :meth:`_hand_off` grants the hold ``token`` waiting in ``waiting``;
        its token for :meth:`release` (0 for a shared hold granted as counted)."""
        grant: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._grants[token] = grant
        try:
            return await grant
        except BaseException:
            if grant.done() and not grant.cancelled():
                self.release(grant.result())  # granted, then cancelled before it ran
            else:
                run = waiting.pop(token)
                del self._grants[token]
                if self._grants:
                    self._hand_off(*run)  # (a waiting exclusive hold blocks shared ones)
            raise

    def release(self, token: int) -> None:
        """Drop a hold; grants the waiting holds that can now be held."""
        if token == 0:
            self._counted -= 1
            if self._counted or not self._grants:
                return
            self._hand_off(0, EVERY_SECTOR)  # (the last counted hold: any exclusive one)
            return
        run = self._shared.pop(token, None) or self._exclusive.pop(token, None)
        if self._grants and run is not None:
            self._hand_off(*run)

    @property
    def held(self) -> int:
        """Number of holds (shared and exclusive) now held."""
        return self._counted + len(self._shared) + len(self._exclusive)

    def held_exclusive(self, start: int, end: int) -> bool:
        """True when an exclusive hold now held (not one waiting) overlaps sectors
        ``[start, end)``: a read of them would wait. Read-only, for tests and inspection."""
        return self._overlaps(start, end, self._exclusive)

    def waiting_exclusive(self, start: int, end: int) -> bool:
        """True when an exclusive hold waiting (not yet held) overlaps sectors
        ``[start, end)``. Read-only, for tests and inspection."""
        return self._overlaps(start, end, self._pending)

    def _hand_off(self, freed_start: int, freed_end: int) -> None:
        """Grant every waiting hold that can be held now that sectors ``[freed_start,
        freed_end)`` were freed (a hold released, or a waiting one gone), and wake its
        waiter: exclusive holds first, in the order they came (each needs no counted hold
        and no overlapping hold held), then shared ones (each needs no overlapping exclusive
        hold held or still waiting; counted when no exclusive hold is left at all).

        Every hold waiting was found blocked when it came and after every hand-off since, and
        only a change in the freed sectors can unblock it: holds that do not overlap them are
        passed over with one comparison, and once an exclusive hold granted covers them all
        the rest are left as they are. A waiter cancelled but not yet run is passed over
        too (it leaves the queue itself, and hands off what it blocked)."""
        for token, (start, end) in list(self._pending.items()):
            if self._counted:
                break
            if not (start < freed_end and freed_start < end):
                continue
            grant = self._grants[token]
            if (
                grant.cancelled()
                or self._overlaps(start, end, self._exclusive)
                or self._overlaps(start, end, self._shared)
            ):
                continue
            del self._pending[token], self._grants[token]
            self._exclusive[token] = (start, end)
            grant.set_result(token)
            if start <= freed_start and freed_end <= end:
                return  # it holds all that was freed: no other hold waiting can go on
        if not self._queued:
            return
        counted = not self._exclusive and not self._pending
        for token, (start, end) in list(self._queued.items()):
            if not (start < freed_end and freed_start < end):
                continue
            grant = self._grants[token]
            if grant.cancelled() or (
                not counted
                and (
                    self._overlaps(start, end, self._exclusive)
                    or self._overlaps(start, end, self._pending)
                )
            ):
                continue
            del self._queued[token], self._grants[token]
            if counted:
                self._counted += 1
                grant.set_result(0)
            else:
                self._shared[token] = (start, end)
                grant.set_result(token)
