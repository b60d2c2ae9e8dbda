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
    """

    def __init__(self) -> None:
        self._counted = 0  # shared holds taken while no exclusive one was held or waiting
        self._shared: dict[int, Run] = {}  # registered shared holds, by token
        self._exclusive: dict[int, Run] = {}
        self._pending: dict[int, Run] = {}  # exclusive holds waiting
        self._next = 0
        self._changed: asyncio.Future[None] | None = None
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
        return any(a < end and start < b for a, b in held.values())

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
        while True:
            token = self.try_shared(start, end)
            if token is not None:
                return token
            await self._wait()

    async def acquire_exclusive(self, start: int, end: int) -> int:
        """Hold sectors ``[start, end)`` exclusive; returns the token for :meth:`release`."""
        self._next += 1
        token = self._next
        self._pending[token] = (start, end)
        try:
            while (
                self._counted
                or self._overlaps(start, end, self._shared)
                or self._overlaps(start, end, self._exclusive)
            ):
                await self._wait()
        except BaseException:
            del self._pending[token]
            self._notify()  # shared holds it blocked may go on
            raise
        del self._pending[token]
        self._exclusive[token] = (start, end)
        return token

    def release(self, token: int) -> None:
        """Drop a hold; wakes the holds waiting."""
        if token == 0:
            self._counted -= 1
            if self._counted:
                return
        elif self._shared.pop(token, None) is None:
            self._exclusive.pop(token, None)
        if self._changed is not None:
            self._notify()

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

    async def _wait(self) -> None:
        if self._changed is None:
            self._changed = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._changed)

    def _notify(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None and not changed.done():
            changed.set_result(None)
