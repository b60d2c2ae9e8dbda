"""``run_to_end``: storage work a cancel does not stop half-way (service/unstoppable.py)."""

from __future__ import annotations

import asyncio

import pytest

from tierdisk.service.unstoppable import LEFT_RUNNING_MIN_BYTES, LeftRunning, run_to_end


async def test_the_result_when_not_cancelled() -> None:
    async def work() -> int:
        await asyncio.sleep(0)
        return 7

    assert await run_to_end(work()) == 7


async def test_a_cancel_waits_for_the_work_then_is_raised() -> None:
    finished: list[str] = []
    release = asyncio.Event()

    async def work() -> None:
        await release.wait()
        finished.append("done")

    caller = asyncio.create_task(run_to_end(work()))
    await asyncio.sleep(0)
    caller.cancel()
    await asyncio.sleep(0.05)
    assert not caller.done()  # still waiting for the work, though cancelled
    caller.cancel()  # a second cancel changes nothing
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert finished == ["done"]


async def test_the_works_own_error_is_raised_and_dropped_after_a_cancel() -> None:
    release = asyncio.Event()

    async def failing() -> None:
        await release.wait()
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError):
        await run_to_end(failing_now())
    caller = asyncio.create_task(run_to_end(failing()))
    await asyncio.sleep(0)
    caller.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):  # the caller asked to stop: that is raised
        await caller


async def failing_now() -> None:
    raise OSError(5, "Input/output error")


async def test_a_cancel_of_the_work_itself_is_raised() -> None:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.cancel()  # as an executor shut down cancels what it had not started
    with pytest.raises(asyncio.CancelledError):
        await run_to_end(future)


async def test_work_left_running_is_counted_until_it_ends_and_room_waits_for_it() -> None:
    """Counted from the caller's cancel (not before) to the work's end, as its bytes or the
    minimum; :meth:`LeftRunning.room` waits while the count is at the limit."""
    left = LeftRunning(3 * 2**20)
    release = asyncio.Event()

    async def work() -> None:
        await release.wait()

    big = asyncio.create_task(run_to_end(work(), left=left, nbytes=3 * 2**20))
    small = asyncio.create_task(run_to_end(work(), left=left, nbytes=10))
    await asyncio.sleep(0)
    assert (left.count, left.bytes, left.full) == (0, 0, False)  # callers still there
    await left.room()  # room: at once
    big.cancel()
    small.cancel()
    await asyncio.sleep(0)
    assert (left.count, left.bytes, left.full) == (2, 3 * 2**20 + LEFT_RUNNING_MIN_BYTES, True)
    waiter = asyncio.create_task(left.room())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    release.set()
    await asyncio.wait_for(waiter, 5)
    for task in (big, small):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert (left.count, left.bytes) == (0, 0)
