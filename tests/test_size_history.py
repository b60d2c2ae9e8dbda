"""Size generations and size events (service/size_history.py), and their waiters.

The volume's use of it (resize_events over real stacks, the overlaps lowered with each
event) is covered by test_volume_scenarios.py and test_volume_resize.py.
"""

from __future__ import annotations

import asyncio

from tierdisk.service.size_history import SIZE_HISTORY_EVENTS, SizeHistory


async def not_yet(task: asyncio.Task[object]) -> None:
    """``task`` is still waiting after the loop ran everything that was ready."""
    for _ in range(3):
        await asyncio.sleep(0)
    assert not task.done(), task.result()


def test_it_starts_at_generation_zero_with_no_event() -> None:
    sizes = SizeHistory(100)
    assert (sizes.size, sizes.generation) == (100, 0)


def test_only_a_change_is_a_new_generation() -> None:
    sizes = SizeHistory(100)
    assert sizes.note(100) is False
    assert (sizes.size, sizes.generation) == (100, 0)
    assert sizes.note(50) is True
    assert (sizes.size, sizes.generation) == (50, 1)
    assert sizes.note(50) is False
    assert sizes.note(100) is True, "back to an earlier size is a change too"
    assert (sizes.size, sizes.generation) == (100, 2)


async def test_events_after_a_generation_oldest_first() -> None:
    sizes = SizeHistory(8)
    for size in (16, 4, 8):
        sizes.note(size)
    assert await sizes.events_after(0) == [(1, 16), (2, 4), (3, 8)]
    assert await sizes.events_after(1) == [(2, 4), (3, 8)]
    assert await sizes.events_after(2) == [(3, 8)]


async def test_a_watcher_past_the_kept_events_gets_the_current_size() -> None:
    sizes = SizeHistory(8, limit=2)
    for size in (9, 10, 11):
        sizes.note(size)
    assert await sizes.events_after(1) == [(2, 10), (3, 11)], "its next event is still kept"
    assert await sizes.events_after(0) == [(3, 11)], "generation 1 is gone"


async def test_the_default_limit_keeps_the_newest_size_history_events() -> None:
    sizes = SizeHistory(1)
    changes = SIZE_HISTORY_EVENTS + 1
    for size in range(2, changes + 2):
        sizes.note(size)
    assert sizes.generation == changes
    kept = await sizes.events_after(1)
    assert len(kept) == SIZE_HISTORY_EVENTS
    assert kept[0] == (2, 3) and kept[-1] == (changes, changes + 1)
    assert await sizes.events_after(0) == [(changes, changes + 1)]


async def test_a_watcher_waits_for_the_next_change() -> None:
    sizes = SizeHistory(8)
    watcher = asyncio.create_task(sizes.events_after(0))
    await not_yet(watcher)
    sizes.note(8)  # the same size: no change, no wake-up
    await not_yet(watcher)
    sizes.note(12)
    assert await asyncio.wait_for(watcher, 5) == [(1, 12)]


async def test_a_change_wakes_every_waiter() -> None:
    sizes = SizeHistory(8)
    watchers = [asyncio.create_task(sizes.events_after(0)) for _ in range(3)]
    waiter = asyncio.create_task(sizes.wait(0))
    for task in (*watchers, waiter):
        await not_yet(task)
    sizes.note(4)
    assert await asyncio.wait_for(asyncio.gather(*watchers), 5) == [[(1, 4)]] * 3
    await asyncio.wait_for(waiter, 5)


async def test_changes_before_the_watcher_runs_all_reach_it() -> None:
    """A shrink undone before any task runs is still two events."""
    sizes = SizeHistory(8)
    watcher = asyncio.create_task(sizes.events_after(0))
    await not_yet(watcher)
    sizes.note(4)
    sizes.note(8)
    assert await asyncio.wait_for(watcher, 5) == [(1, 4), (2, 8)]


async def test_wait_returns_at_once_when_already_past() -> None:
    sizes = SizeHistory(8)
    sizes.note(9)
    await asyncio.wait_for(sizes.wait(0), 0.5)
    ahead = asyncio.create_task(sizes.wait(1))  # the current generation: waits for the next
    await not_yet(ahead)
    sizes.note(10)
    await asyncio.wait_for(ahead, 5)


async def test_a_cancelled_waiter_leaves_the_others_waiting() -> None:
    sizes = SizeHistory(8)
    gone = asyncio.create_task(sizes.events_after(0))
    kept = asyncio.create_task(sizes.events_after(0))
    await not_yet(kept)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    await not_yet(kept)
    sizes.note(2)
    assert await asyncio.wait_for(kept, 5) == [(1, 2)]
