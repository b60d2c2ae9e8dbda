"""Storage work that must not stop half-way when the coroutine awaiting it is cancelled.

gRPC cancels a call's handler when its client cancels or its deadline passes, and a stop
cancels the calls still running after the grace period. Work a layer does on a thread cannot
be stopped half-way: cancelling the coroutine that awaits it only stops the waiting, while
the thread goes on. A layer that then releases its sector locks, rolls back state it believes
unchanged, or lets the next commit start, races that thread: a write acknowledged after it
can be overwritten by it, a shrink it finished is undone in memory only, two commits append
to a map at the same offset. :func:`run_to_end` awaits such work so that a cancel waits for
it to end and is raised only then.

Work left running so is bounded by whoever starts it: :class:`LeftRunning` counts it (its
bytes, each piece at least :data:`LEFT_RUNNING_MIN_BYTES`) and lets new work wait for room
under a limit. Without one, callers that give up on a layer that hangs (a hypervisor whose
guests time out I/O) leave one piece of work, and the data it holds, per call: hundreds of
1 MiB writes, ~3 MiB of memory each, until the layer's own timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["LEFT_RUNNING_MIN_BYTES", "LeftRunning", "run_to_end"]

_T = TypeVar("_T")

LEFT_RUNNING_MIN_BYTES = 64 * 1024
"""What one piece of work left running counts as, at least, in bytes (an unmap holds no data,
but a task, its coroutines and a call to a lower tier)."""


class LeftRunning:
    """The work :func:`run_to_end` goes on with after its callers were cancelled: ``count``
    pieces holding ``bytes`` (each counted as at least :data:`LEFT_RUNNING_MIN_BYTES`), and
    :meth:`room`, a wait until they are under ``limit`` bytes (one piece larger than the
    limit is let run: it waits for room only in front of it)."""

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"limit must be positive, not {limit}")
        self.limit = limit
        self.count = 0
        self.bytes = 0
        self._room: asyncio.Event | None = None  # set (and dropped) when bytes fall under limit

    @property
    def full(self) -> bool:
        """Whether new work must wait (:meth:`room`): ``bytes`` is at the limit or over."""
        return self.bytes >= self.limit

    async def room(self) -> None:
        """Wait until :attr:`full` is false (at once when it is). A cancel while waiting
        leaves nothing behind: the work has not started."""
        while self.bytes >= self.limit:
            if self._room is None:
                self._room = asyncio.Event()
            await self._room.wait()

    def _left(self, nbytes: int) -> int:
        """Count a piece of ``nbytes`` left running; what it counts as."""
        counted = max(nbytes, LEFT_RUNNING_MIN_BYTES)
        self.count += 1
        self.bytes += counted
        return counted

    def _ended(self, counted: int) -> None:
        self.count -= 1
        self.bytes -= counted
        if self._room is not None and self.bytes < self.limit:
            self._room.set()  # every waiter checks again; the next wait makes a new event
            self._room = None


async def run_to_end(
    work: Awaitable[_T],
    *,
    dropped: Callable[[BaseException], object] | None = None,
    left: LeftRunning | None = None,
    nbytes: int = 0,
) -> _T:
    """Await ``work`` (a coroutine or future) to its end, also when the caller is cancelled
    meanwhile: then, once it has ended (its result or error dropped: ``dropped`` is called
    with the error, which nobody else will see), the cancel is raised. A cancel of the work
    itself (an executor shut down) is raised as any error of it. From the caller's cancel to
    the work's end, the work is counted in ``left`` (if given) as ``nbytes`` bytes."""
    task = asyncio.ensure_future(work)
    cancel: asyncio.CancelledError | None = None
    error: BaseException | None = None
    counted = 0  # what the work counts as in ``left`` while it runs on without its caller
    try:
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError as exc:
                if not task.cancelled():
                    cancel = exc  # the caller's (not the work's own): wait on for the work
                    if left is not None and not counted:
                        counted = left._left(nbytes)
            except BaseException:
                pass  # the work's own error: task.result() raises it below
        if cancel is not None:
            if not task.cancelled():
                error = task.exception()  # retrieved: no "never retrieved" warning
                if error is not None and dropped is not None:
                    dropped(error)
            raise cancel
        return task.result()
    finally:
        # An error raised from here holds this frame (its traceback), whose locals hold the
        # task, which holds the error (and the work's own error): a cycle that kept the
        # work's buffers (a failed write's data) until a garbage collection. Drop them.
        del work, task, cancel, error
        if counted and left is not None:
            left._ended(counted)
