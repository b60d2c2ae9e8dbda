"""tierdisk.service.sector_lock (service/sector_lock.py): :class:`SectorLock` on its own, on a
real event loop, no mocks.

What its docstrings promise: shared holds overlap freely, an exclusive hold overlaps no other
hold; a waiting exclusive hold blocks new *overlapping* shared holds (so it is not starved) but
not disjoint ones; while no exclusive hold is held or waiting a shared hold is only counted
(token 0), and an exclusive hold waits for every counted hold, even a disjoint one;
:meth:`~SectorLock.hold_for_close` marks the lock closing, waits for every hold under way,
answers None to a second close, and takes its mark back when cancelled; a waiter that is
cancelled leaves no trace (a cancelled exclusive waiter lets the shared holds it blocked go
on); a release hands the sectors to the holds waiting for them there and then, so a hold
asked for later cannot take them first, and every waiting hold the freed sectors unblock is
granted by that one release.

A waiter is a task; "still waiting" is checked after :func:`settle` has let the loop run every
wake-up there is (a few iterations, no timed sleeps)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from tierdisk.service.sector_lock import EVERY_SECTOR, SectorLock


async def settle() -> None:
    """Let every task that can run, run: a release wakes a waiter through a future, and the
    waiter retries on a later iteration of the loop."""
    for _ in range(10):
        await asyncio.sleep(0)


async def started(coro: Coroutine[Any, Any, int | None]) -> asyncio.Task[int | None]:
    """``coro`` as a task that has run as far as it can."""
    task = asyncio.ensure_future(coro)
    await settle()
    return task


async def done(task: asyncio.Task[int | None]) -> int | None:
    """The task's result; it must finish without the test releasing anything more."""
    return await asyncio.wait_for(task, 5)


async def cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# -- shared and exclusive ------------------------------------------------------------------


async def test_shared_holds_overlap_freely_and_are_only_counted() -> None:
    lock = SectorLock()
    tokens = [lock.try_shared(0, 10), lock.try_shared(5, 15), await lock.acquire_shared(0, 10)]
    assert tokens == [0, 0, 0]  # no exclusive hold held or waiting: counted, not registered
    assert lock.held == 3
    for token in tokens:
        assert token is not None
        lock.release(token)
    assert lock.held == 0


async def test_an_exclusive_hold_waits_for_an_overlapping_shared_hold() -> None:
    lock = SectorLock()
    shared = await lock.acquire_shared(0, 10)
    exclusive = await started(lock.acquire_exclusive(5, 15))
    assert not exclusive.done()
    assert lock.held == 1  # a waiting hold is not held
    lock.release(shared)
    token = await done(exclusive)
    assert token is not None and token > 0
    assert lock.held == 1
    lock.release(token)
    assert lock.held == 0


async def test_an_exclusive_hold_waits_for_every_counted_shared_hold_even_a_disjoint_one() -> None:
    """Counted holds are not registered by range: an exclusive hold waits for all of them
    (they all began before it, so they are few and finish)."""
    lock = SectorLock()
    first, second = lock.try_shared(0, 10), lock.try_shared(20, 30)
    assert (first, second) == (0, 0)
    exclusive = await started(lock.acquire_exclusive(100, 200))
    assert first is not None and second is not None
    lock.release(first)
    await settle()
    assert not exclusive.done()  # one counted hold is still held
    lock.release(second)
    token = await done(exclusive)
    assert token is not None
    lock.release(token)
    assert lock.held == 0


async def test_while_an_exclusive_hold_is_held_shared_holds_are_registered_by_range() -> None:
    lock = SectorLock()
    exclusive = await lock.acquire_exclusive(0, 10)
    beside = lock.try_shared(10, 20)  # disjoint: held at once, registered
    assert beside is not None and beside > 0
    assert lock.try_shared(9, 10) is None  # overlaps: refused without waiting
    assert lock.try_shared(0, EVERY_SECTOR) is None
    assert lock.held == 2
    waiting = await started(lock.acquire_shared(5, 6))
    assert not waiting.done()
    lock.release(exclusive)
    token = await done(waiting)
    assert token == 0  # granted once no exclusive hold is left: counted again
    lock.release(token)
    lock.release(beside)
    assert lock.held == 0


async def test_exclusive_holds_wait_for_overlapping_ones_only() -> None:
    lock = SectorLock()
    left = await lock.acquire_exclusive(0, 10)
    right = await done(await started(lock.acquire_exclusive(10, 20)))  # touching, disjoint
    assert right is not None
    across = await started(lock.acquire_exclusive(9, 11))
    assert not across.done()
    lock.release(left)
    await settle()
    assert not across.done()  # still overlaps the right one
    lock.release(right)
    token = await done(across)
    assert token is not None
    assert lock.held == 1
    lock.release(token)
    assert lock.held == 0


# -- waiting order: a waiting exclusive hold is not starved ---------------------------------


async def test_a_waiting_exclusive_hold_blocks_new_overlapping_shared_holds_only() -> None:
    lock = SectorLock()
    reader = await lock.acquire_shared(0, 10)
    writer = await started(lock.acquire_exclusive(0, 10))
    assert not writer.done()
    # shared holds that come after it: overlapping ones wait behind it, disjoint ones do not
    assert lock.try_shared(5, 6) is None
    later_reader = await started(lock.acquire_shared(0, 10))
    assert not later_reader.done()
    beside = lock.try_shared(10, 20)
    assert beside is not None and beside > 0
    lock.release(beside)
    lock.release(reader)
    token = await done(writer)
    assert token is not None
    assert not later_reader.done()  # the writer went first
    lock.release(token)
    shared = await done(later_reader)
    assert shared is not None
    lock.release(shared)
    assert lock.held == 0


async def test_a_stream_of_overlapping_readers_does_not_starve_a_writer() -> None:
    """Readers keep arriving while a writer waits: each new one waits behind the writer, so
    once the readers that were there first are done, the writer holds the sectors."""
    lock = SectorLock()
    first = [await lock.acquire_shared(i, i + 4) for i in range(3)]
    writer = await started(lock.acquire_exclusive(0, 8))
    arrivals = [await started(lock.acquire_shared(i, i + 4)) for i in range(3)]
    for reader in first:
        lock.release(reader)
        await settle()
    token = await done(writer)
    assert token is not None
    assert not any(task.done() for task in arrivals)
    lock.release(token)
    for task in arrivals:
        shared = await done(task)
        assert shared is not None
        lock.release(shared)
    assert lock.held == 0


# -- hand-off: a release grants the holds waiting for the sectors it frees ------------------


async def test_a_release_hands_the_sectors_to_the_waiting_hold_before_a_later_one() -> None:
    """The exclusive hold waiting when the sectors are freed gets them, not one asked for
    just after the release (which would otherwise run first: the waiter has yet to wake)."""
    lock = SectorLock()
    holder = await lock.acquire_exclusive(0, 8)
    waiter = await started(lock.acquire_exclusive(0, 8))
    lock.release(holder)
    late = asyncio.ensure_future(lock.acquire_exclusive(0, 8))
    token = await done(waiter)
    await settle()
    assert token is not None and not late.done()
    assert lock.held_exclusive(0, 8) and lock.held == 1
    lock.release(token)
    late_token = await done(late)
    assert late_token is not None
    lock.release(late_token)
    assert lock.held == 0


async def test_many_waiters_of_one_sector_are_granted_one_at_a_time_in_order() -> None:
    lock = SectorLock()
    order: list[int] = []

    async def writer(index: int) -> int | None:
        token = await lock.acquire_exclusive(3, 4)
        order.append(index)
        assert lock.held == 1  # never two holds of the sector at once
        await asyncio.sleep(0)
        lock.release(token)
        return token

    holder = await lock.acquire_exclusive(0, 8)
    tasks = [await started(writer(index)) for index in range(64)]
    assert not order
    lock.release(holder)
    for task in tasks:
        await done(task)
    assert order == list(range(64))
    assert lock.held == 0


async def test_one_release_grants_every_waiting_hold_the_freed_sectors_unblock() -> None:
    """Two exclusive waiters on the two halves, and shared ones beside: one release of the
    hold over all of them grants them all (each exclusive half covers only part of what was
    freed, so the hand-off goes on past the first)."""
    lock = SectorLock()
    holder = await lock.acquire_exclusive(0, 10)
    left = await started(lock.acquire_exclusive(0, 5))
    right = await started(lock.acquire_exclusive(5, 10))
    lock.release(holder)
    tokens = [await done(left), await done(right)]
    assert lock.held == 2 and all(tokens)
    # shared waiters beside an exclusive one that waits behind the same holder
    for token in tokens:
        assert token is not None
        lock.release(token)
    wider = await done(await started(lock.acquire_exclusive(0, 20)))
    assert wider is not None
    whole = await started(lock.acquire_exclusive(0, 20))
    assert lock.held == 1
    readers = [await started(lock.acquire_shared(a, a + 2)) for a in (0, 18)]
    lock.release(wider)
    whole_token = await done(whole)
    await settle()
    assert not any(task.done() for task in readers)  # they overlap the hold just granted
    assert whole_token is not None
    lock.release(whole_token)
    shared = [await done(task) for task in readers]
    assert shared == [0, 0]  # no exclusive hold held or waiting: granted as counted
    lock.release(0)
    lock.release(0)
    assert lock.held == 0


async def test_a_release_elsewhere_grants_nothing_and_the_last_counted_hold_grants_all() -> None:
    lock = SectorLock()
    counted = lock.try_shared(0, 100)
    assert counted == 0
    first = await started(lock.acquire_exclusive(0, 10))  # both wait for the counted hold
    second = await started(lock.acquire_exclusive(50, 60))
    beside = await lock.acquire_shared(200, 210)  # registered: an exclusive one is waiting
    assert beside > 0
    lock.release(beside)  # frees sectors no waiter wants: nothing changes
    await settle()
    assert not first.done() and not second.done()
    lock.release(counted)  # the last counted hold: every exclusive waiter may go on
    tokens = [await done(first), await done(second)]
    assert lock.held == 2
    for token in tokens:
        assert token is not None
        lock.release(token)
    assert lock.held == 0


async def test_an_empty_range_is_held_at_once() -> None:
    """It overlaps nothing, not even the counted holds' unknown ranges: held at once (it
    waited for them, and then, with the hand-off skipping waiters that overlap nothing
    freed, was never granted)."""
    lock = SectorLock()
    counted = lock.try_shared(0, 10)
    assert counted == 0
    token = await done(await started(lock.acquire_exclusive(0, 0)))
    assert token is not None
    lock.release(token)
    lock.release(counted)
    assert lock.held == 0


# -- hold_for_close --------------------------------------------------------------------------


async def test_hold_for_close_waits_for_the_holds_under_way() -> None:
    lock = SectorLock()
    writer = await lock.acquire_exclusive(EVERY_SECTOR - 10, EVERY_SECTOR)
    reader = await lock.acquire_shared(0, 10)
    assert not lock.closing
    close = await started(lock.hold_for_close())
    assert lock.closing  # marked at once, before the holds under way end
    assert not close.done()
    lock.release(reader)
    await settle()
    assert not close.done()  # the exclusive hold at the far end is still held
    lock.release(writer)
    token = await done(close)
    assert token is not None
    assert lock.held == 1 and lock.closing


async def test_a_second_close_gets_none_while_the_first_waits_and_after() -> None:
    lock = SectorLock()
    reader = await lock.acquire_shared(0, 1)
    first = await started(lock.hold_for_close())
    # at once, without waiting for the reader (a hang here would stall a second stop)
    assert await asyncio.wait_for(lock.hold_for_close(), 1) is None
    lock.release(reader)
    assert await done(first) is not None
    assert await asyncio.wait_for(lock.hold_for_close(), 1) is None
    assert lock.held == 1


async def test_after_close_began_no_new_hold_is_granted() -> None:
    """The layer refuses its I/O once :attr:`closing` is set; the lock itself grants no new
    hold anywhere from the moment the close waits (it holds, or waits for, every sector)."""
    lock = SectorLock()
    reader = await lock.acquire_shared(0, 1)
    close = await started(lock.hold_for_close())
    assert lock.try_shared(100, 101) is None  # waiting close: even far from the reader
    assert lock.try_shared(EVERY_SECTOR - 1, EVERY_SECTOR) is None
    blocked_while_waiting = await started(lock.acquire_shared(50, 60))
    lock.release(reader)
    assert await done(close) is not None
    assert lock.try_shared(0, 1) is None
    blocked_after = await started(lock.acquire_exclusive(7, 8))
    await settle()
    assert not blocked_while_waiting.done() and not blocked_after.done()
    assert lock.held == 1
    await cancel(blocked_while_waiting)
    await cancel(blocked_after)
    assert lock.held == 1


async def test_a_cancelled_close_takes_its_mark_back_and_a_later_close_does_it_all() -> None:
    lock = SectorLock()
    reader = await lock.acquire_shared(0, 10)
    close = await started(lock.hold_for_close())
    blocked = await started(lock.acquire_shared(20, 30))  # waits behind the close
    assert lock.closing and not blocked.done()
    await cancel(close)
    assert not lock.closing
    shared = await done(blocked)  # the cancelled close no longer blocks anything
    assert shared is not None
    lock.release(shared)
    again = await started(lock.hold_for_close())
    assert lock.closing and not again.done()  # it waits for the reader, as the first did
    lock.release(reader)
    assert await done(again) is not None
    assert lock.held == 1


# -- cancelled waiters -------------------------------------------------------------------------


async def test_a_cancelled_exclusive_waiter_lets_the_shared_holds_it_blocked_go_on() -> None:
    lock = SectorLock()
    reader = await lock.acquire_shared(0, 10)
    writer = await started(lock.acquire_exclusive(0, 10))
    blocked = await started(lock.acquire_shared(0, 10))
    assert not blocked.done()
    await cancel(writer)
    shared = await done(blocked)  # while the first reader still holds its sectors
    assert shared is not None
    assert lock.held == 2
    lock.release(shared)
    lock.release(reader)
    assert lock.held == 0
    # nothing of the cancelled writer is left: a new exclusive hold is granted at once
    token = await done(await started(lock.acquire_exclusive(0, 10)))
    assert token is not None
    lock.release(token)


async def test_a_cancelled_shared_waiter_leaves_the_other_waiters_waiting_and_woken() -> None:
    """Cancelling one waiter leaves the others waiting, and each is granted when it can be."""
    lock = SectorLock()
    writer = await lock.acquire_exclusive(0, 10)
    first = await started(lock.acquire_shared(0, 10))
    second = await started(lock.acquire_shared(5, 15))
    other_writer = await started(lock.acquire_exclusive(4, 6))
    await cancel(first)
    await settle()
    assert not second.done() and not other_writer.done()
    lock.release(writer)
    token = await done(other_writer)  # the waiting writer goes before the reader it blocks
    assert token is not None
    assert not second.done()
    lock.release(token)
    shared = await done(second)
    assert shared is not None
    lock.release(shared)
    assert lock.held == 0


async def test_an_exclusive_waiter_cancelled_after_its_wake_up_raises_cancelled_error() -> None:
    """The release that wakes a waiter also drops the wake-up future; a waiter cancelled
    before it runs again must still end with CancelledError (its clean-up finds no future
    to complete), and hold nothing."""
    lock = SectorLock()
    shared = lock.try_shared(0, 1)
    assert shared == 0
    exclusive = await started(lock.acquire_exclusive(0, 1))
    lock.release(shared)  # wakes it ...
    await cancel(exclusive)  # ... and it is cancelled before it runs again
    assert lock.held == 0
    assert lock.try_shared(0, 1) == 0  # nothing held or waiting: counted again
    lock.release(0)


async def test_a_cancelled_exclusive_waiter_behind_another_exclusive_leaves_no_hold() -> None:
    lock = SectorLock()
    writer = await lock.acquire_exclusive(0, 10)
    waiter = await started(lock.acquire_exclusive(0, 10))
    await cancel(waiter)
    assert lock.held == 1
    lock.release(writer)
    assert lock.held == 0
    assert lock.try_shared(0, 10) == 0  # nothing held or waiting: counted again
