"""Storage work that must not stop half-way when the coroutine awaiting it is cancelled.

gRPC cancels a call's handler when its client cancels or its deadline passes, and a stop
cancels the calls still running after the grace period. Work a layer does on a thread cannot
be stopped half-way: cancelling the coroutine that awaits it only stops the waiting, while
the thread goes on. A layer that then releases its sector locks, rolls back state it believes
unchanged, or lets the next commit start, races that thread: a write acknowledged after it
can be overwritten by it, a shrink it finished is undone in memory only, two commits append
to a map at the same offset. :func:`run_to_end` awaits such work so that a cancel waits for
it to end and is raised only then.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["run_to_end"]

_T = TypeVar("_T")


async def run_to_end(
    work: Awaitable[_T], *, dropped: Callable[[BaseException], object] | None = None
) -> _T:
    """Await ``work`` (a coroutine or future) to its end, also when the caller is cancelled
    meanwhile: then, once it has ended (its result or error dropped: ``dropped`` is called
    with the error, which nobody else will see), the cancel is raised. A cancel of the work
    itself (an executor shut down) is raised as any error of it."""
    task = asyncio.ensure_future(work)
    cancel: asyncio.CancelledError | None = None
    error: BaseException | None = None
    try:
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError as exc:
                if not task.cancelled():
                    cancel = exc  # the caller's (not the work's own): wait on for the work
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
