"""Small reads of a ``remote`` layer sent to the origin together while it is busy.

A cache tier's reads come at once (a guest's queue of 4 KiB reads, many clients), and each
miss was a ``Read`` call to the origin, though a gRPC call costs about the same whatever it
carries (``bench/README.md``, "Batched reads"). :class:`ReadCoalescer` lets up to
:data:`CALLS_AT_ONCE` calls go to the origin at once, each read on its own as before; a read
that comes while that many are out waits, with the others that come meanwhile, until one of
them ends, and they then go together in one call (``send``: a ``ReadBatch``). A lone read is
never held back; under load the reads share calls (as TCP corks small writes).

Reads are grouped by the metadata their calls would carry (``key``: the hop chain of the
request each serves), so that no read travels under another request's chain. What ``send``
says decides for every read of its batch: served (True); each to go alone (False: the batch
was refused in a way a single read answers better, as an origin that shrank); or its error,
raised in every read of the batch (an origin that is down fails them all alike, and each
retrying alone would double the wait). A read whose caller is cancelled while it waits
leaves the queue; one cancelled after its batch went is dropped when the batch returns (its
data lands in the buffer the caller dropped, as a single read's may:
:meth:`~tierdisk.service.layer.Layer.read`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["CALLS_AT_ONCE", "BatchSender", "ReadCoalescer"]

T = TypeVar("T")

CALLS_AT_ONCE = 2
"""Calls a remote layer has out to its origin before further small reads wait to go
together."""

BatchSender = Callable[[list[tuple[int, int]], list[memoryview]], Awaitable[bool]]
"""Reads ``(sector, count)`` ranges into their buffers in one call; True when done, False
when each should be read alone; raises what failed them all."""


@dataclass(slots=True)
class _Waiting:
    """One read waiting for a call: its buffer, range and outcome."""

    view: memoryview
    sector: int
    count: int
    done: asyncio.Future[bool]


class ReadCoalescer:
    """Lets :data:`CALLS_AT_ONCE` calls out at once; queues further reads, one queue per
    ``key()``, and sends each queue as one batch when a call ends."""

    def __init__(self, send: BatchSender, key: Callable[[], Hashable]) -> None:
        self._send = send
        self._key = key
        self._out = 0  # calls out: reads gone alone, and batches
        self._queues: dict[Hashable, list[_Waiting]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def read(
        self, view: memoryview, sector: int, count: int, alone: Callable[[], Awaitable[T]]
    ) -> T | None:
        """Read ``count`` sectors from ``sector`` into ``view``: by ``alone()`` (its result
        returned) while fewer than :data:`CALLS_AT_ONCE` calls are out, else in a batch with
        the reads that wait with it (None returned once it read them all)."""
        if self._out < CALLS_AT_ONCE:
            return await self._alone(alone)
        key = self._key()
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(key, []).append(_Waiting(view, sector, count, done))
        if await done:
            return None
        return await self._alone(alone)

    async def _alone(self, alone: Callable[[], Awaitable[T]]) -> T:
        self._out += 1
        try:
            return await alone()
        finally:
            self._out -= 1
            self._next()

    def _next(self) -> None:
        """Send what waits, a queue a call, while fewer than :data:`CALLS_AT_ONCE` are out."""
        while self._queues and self._out < CALLS_AT_ONCE:
            key = next(iter(self._queues))
            waiting = [w for w in self._queues.pop(key) if not w.done.done()]  # not cancelled
            if waiting:
                self._out += 1
                task = asyncio.get_running_loop().create_task(self._batch(waiting))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _batch(self, waiting: list[_Waiting]) -> None:
        try:
            served = await self._send(
                [(w.sector, w.count) for w in waiting], [w.view for w in waiting]
            )
        except Exception as exc:
            for w in waiting:
                if not w.done.done():
                    w.done.set_exception(exc)
                    w.done.exception()  # retrieved: a reader cancelled meanwhile never will
            return
        except BaseException:  # closed (cancelled): the readers are too
            for w in waiting:
                w.done.cancel()
            raise
        finally:
            self._out -= 1
            self._next()
        for w in waiting:
            if not w.done.done():
                w.done.set_result(served)

    async def close(self) -> None:
        """Cancel the batches in flight and the reads that wait (their callers see
        ``CancelledError``), and wait for the batches."""
        for queue in self._queues.values():
            for w in queue:
                w.done.cancel()
        self._queues.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
