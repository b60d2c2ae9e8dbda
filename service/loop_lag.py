"""How long the server's event loop was kept from running its callbacks (its lag).

Every request of every client, gRPC and NBD, runs on one event loop: work that holds it
(a request that computes for long without awaiting, a lock taken on the loop) delays all the
others, and their own timers (``tierdisk_io_duration_seconds``) start only once they run, so
they do not show the wait. :class:`LoopLagMonitor` sleeps ``interval`` seconds at a time and
observes in ``tierdisk_event_loop_lag_seconds`` how much later than asked each sleep ended:
~0 on a loop that is free, the length of the stall when one held it.
"""

from __future__ import annotations

import asyncio
import contextlib

from .loop_metrics import HistogramCell

__all__ = ["LAG_BUCKETS", "LoopLagMonitor"]

LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Bounds of ``tierdisk_event_loop_lag_seconds`` (seconds)."""


class LoopLagMonitor:
    """Observes the running loop's lag into ``cell`` every ``interval`` seconds, from
    :meth:`start` until :meth:`close`."""

    def __init__(self, cell: HistogramCell, interval: float = 0.1) -> None:
        self._cell = cell
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin observing on the running loop."""
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name="event loop lag")

    async def close(self) -> None:
        """Stop observing."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        interval, observe = self._interval, self._cell.observe
        while True:
            asked = loop.time() + interval
            await asyncio.sleep(interval)
            observe(max(loop.time() - asked, 0.0))
