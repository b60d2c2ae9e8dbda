"""``run_to_end``: storage work a cancel does not stop half-way (service/unstoppable.py)."""

from __future__ import annotations

import asyncio

import pytest

from tierdisk.service.unstoppable import run_to_end


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
