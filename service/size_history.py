"""A volume's size generations and its recent size changes, for resize watchers (DESIGN.md §2).

:class:`SizeHistory` records the sizes a volume's top layer takes, in sectors. Each change
(a size different from the last one noted) is an *event* ``(generation, sector_count)``:
generations count changes, from 0 (the size it was made with, no event) up by one per change.
The newest :data:`SIZE_HISTORY_EVENTS` events are kept; a watcher asking for events after a
generation that has dropped out gets the current size as one event instead (the changes it
missed are gone).

Noting a size is synchronous (a resize listener calls it); waiters are woken through an
:class:`asyncio.Event` that is replaced on every change, so each change wakes every task
waiting at that moment. :class:`~tierdisk.service.volume.Volume` owns one and delegates to
it; what a size change does to the stack (the overlaps) stays in the volume.
"""

from __future__ import annotations

import asyncio
from collections import deque

__all__ = ["SIZE_HISTORY_EVENTS", "SizeEvent", "SizeHistory"]

SIZE_HISTORY_EVENTS = 1024
"""How many size changes (events) a volume remembers for
:meth:`~tierdisk.service.volume.Volume.resize_events`; a watcher further behind gets the
current size as one event."""

SizeEvent = tuple[int, int]
"""``(generation, sector_count)``: the volume's size became ``sector_count`` sectors at that
generation."""


class SizeHistory:
    """Size generations, the bounded list of recent size events, and their waiters.

    ``size`` is the last size noted (sectors) and ``generation`` the number of changes noted
    so far; both are plain attributes, read freely.
    """

    def __init__(self, size: int, limit: int = SIZE_HISTORY_EVENTS) -> None:
        """Start at ``size`` sectors, generation 0, keeping the newest ``limit`` events."""
        self.size = size
        self.generation = 0
        self._events: deque[SizeEvent] = deque(maxlen=limit)  # oldest first
        self._changed = asyncio.Event()

    def note(self, size: int) -> bool:
        """Record that the size is now ``size`` sectors. A change (``size`` differs from the
        last one noted) starts the next generation, is kept as an event and wakes every
        waiter: True. The same size again changes nothing: False."""
        if size == self.size:
            return False
        self.size = size
        self.generation += 1
        self._events.append((self.generation, size))
        event, self._changed = self._changed, asyncio.Event()
        event.set()
        return True

    async def wait(self, after: int) -> None:
        """Return once :attr:`generation` is past ``after`` (at once if it already is)."""
        while self.generation <= after:
            await self._changed.wait()

    async def events_after(self, after: int) -> list[SizeEvent]:
        """Wait for changes newer than generation ``after`` (:meth:`wait`); return every one
        of them, oldest first. A watcher whose next event (``after + 1``) is no longer kept
        gets ``[(generation, size)]``, the current state, instead."""
        await self.wait(after)
        events = [(g, n) for g, n in self._events if g > after]
        if not events or events[0][0] != after + 1:
            return [(self.generation, self.size)]
        return events
