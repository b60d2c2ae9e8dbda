"""The drain gate of a graceful stop: calls in flight counted, new ones refused once the
stop began.

Every gRPC call enters the gate before it runs and leaves it when done
(:meth:`DrainGate.enter`, :meth:`DrainGate.leave`). :meth:`DrainGate.drain` (the server's
stop) refuses calls from then on (``UNAVAILABLE``, :data:`~.errors.SERVER_STOPPING`), ends
what waits for a client's pace (:attr:`DrainGate.on_drain`; :attr:`DrainGate.drained` ends
watch streams) and waits up to its ``grace`` (seconds) for the calls in flight to finish.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .errors import SERVER_STOPPING, Unavailable

__all__ = ["DrainGate"]


class DrainGate:
    """Counts calls in flight and refuses new ones once draining started (graceful stop)."""

    def __init__(self) -> None:
        self.draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.drained = asyncio.Event()  # set when draining starts: ends watch streams
        self.on_drain: list[Callable[[], None]] = []  # called as draining starts

    def enter(self) -> None:
        if self.draining:
            raise Unavailable(SERVER_STOPPING)
        self._in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    async def drain(self, grace: float) -> bool:
        """Refuse new calls, call :attr:`on_drain` (what would wait for a client's pace ends
        now), and wait up to ``grace`` s for calls in flight; True if idle."""
        self.draining = True
        self.drained.set()
        for stop_waiting in self.on_drain:
            stop_waiting()
        if self._in_flight == 0:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            return False
        return True
