"""run_bounded / run_ordered when a call is cancelled underneath them: the whole run fails
(``Interrupted``), never returns as if every item were done; the caller's own cancellation
is still ``CancelledError``, and cancels the calls in flight.

A call "cancelled underneath" awaits a future that something else cancels — what grpc.aio
does to the calls in flight on a channel that is closed: ``CancelledError`` comes up in the
task awaiting the call though nobody cancelled that task."""

from __future__ import annotations

import asyncio

import pytest

from tierdisk.client.chunking import caller_cancelled, run_bounded, run_ordered
from tierdisk.client.errors import Interrupted, OutOfRange


class Calls:
    """Stand-in calls, each a future the test can cancel from outside, as a channel does."""

    def __init__(self, cut_at: int) -> None:
        self.cut_at = cut_at
        self.started: list[int] = []
        self.completed: list[int] = []
        self.cancelled: list[int] = []
        self.cut = asyncio.Event()
        self._futures: dict[int, asyncio.Future[None]] = {}

    async def fn(self, i: int) -> None:
        self.started.append(i)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._futures[i] = fut
        if i == self.cut_at:
            self.cut.set()
        try:
            if i < self.cut_at:
                await asyncio.sleep(0)
            else:
                await fut  # never set: only cancelled, underneath or with the caller
        except asyncio.CancelledError:
            self.cancelled.append(i)
            raise
        self.completed.append(i)

    def close(self) -> None:
        """Cancel every call's future, as closing a channel does."""
        for fut in self._futures.values():
            fut.cancel()


async def test_run_bounded_fails_when_a_call_is_cancelled_underneath() -> None:
    calls = Calls(cut_at=10)
    run = asyncio.ensure_future(run_bounded(range(100), calls.fn, 4))
    await calls.cut.wait()
    calls.close()
    with pytest.raises(Interrupted, match="not by its caller") as info:
        await asyncio.wait_for(run, 5)  # before the fix: returned None, as if all were done
    assert "10 request(s) had completed" in str(info.value)
    assert len(calls.completed) == 10
    assert len(calls.started) < 100  # it stopped sending the rest


async def test_run_bounded_fails_when_one_call_of_many_is_cancelled_underneath() -> None:
    done: list[int] = []
    victim: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def fn(i: int) -> None:
        if i == 5:
            await victim
        await asyncio.sleep(0)
        done.append(i)

    run = asyncio.ensure_future(run_bounded(range(50), fn, 4))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    victim.cancel()  # one call only; the others would all succeed
    with pytest.raises(Interrupted):
        await asyncio.wait_for(run, 5)
    assert 5 not in done


async def test_run_bounded_raises_cancelled_error_when_its_caller_is_cancelled() -> None:
    calls = Calls(cut_at=10)
    run = asyncio.ensure_future(run_bounded(range(100), calls.fn, 4))
    await calls.cut.wait()
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert run.cancelled()
    in_flight = [i for i in calls.started if i not in calls.completed]
    assert sorted(calls.cancelled) == sorted(in_flight)  # each was cancelled, none left


async def test_run_bounded_prefers_a_failure_to_the_cancellations_it_caused() -> None:
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def fn(i: int) -> None:
        if i == 0:
            await asyncio.sleep(0)
            fut.cancel()
            raise OutOfRange("boom")
        await fut

    with pytest.raises(OutOfRange, match="boom"):
        await asyncio.wait_for(run_bounded(range(10), fn, 4), 5)


async def test_run_ordered_fails_when_a_call_is_cancelled_underneath() -> None:
    calls = Calls(cut_at=3)
    got: list[int] = []
    gen = run_ordered(range(20), calls.fn, 4)

    async def consume() -> None:
        async for i, _ in gen:
            got.append(i)

    task = asyncio.ensure_future(consume())
    await calls.cut.wait()
    calls.close()
    with pytest.raises(Interrupted):  # before the fix: CancelledError, none asked for
        await asyncio.wait_for(task, 5)
    assert got == [0, 1, 2]


async def test_run_ordered_raises_cancelled_error_when_its_consumer_is_cancelled() -> None:
    calls = Calls(cut_at=3)

    async def consume() -> None:
        async for _ in run_ordered(range(20), calls.fn, 4):
            pass

    task = asyncio.ensure_future(consume())
    await calls.cut.wait()
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_caller_cancelled_tells_the_two_apart() -> None:
    seen: list[bool] = []

    async def wait(fut: asyncio.Future[None]) -> None:
        try:
            await fut
        except asyncio.CancelledError:
            seen.append(caller_cancelled())
            raise

    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    underneath = asyncio.ensure_future(wait(fut))
    await asyncio.sleep(0)
    fut.cancel()  # what it awaits is cancelled; the task itself is not
    with pytest.raises(asyncio.CancelledError):
        await underneath
    own = asyncio.ensure_future(wait(loop.create_future()))
    await asyncio.sleep(0)
    own.cancel()
    with pytest.raises(asyncio.CancelledError):
        await own
    assert seen == [False, True]
