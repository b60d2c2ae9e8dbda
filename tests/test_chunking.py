"""run_bounded / run_ordered when a call is cancelled underneath them: the whole run fails
(``Interrupted``), never returns as if every item were done; the caller's own cancellation
is still ``CancelledError``, and cancels the calls in flight.

A call "cancelled underneath" awaits a future that something else cancels — what grpc.aio
does to the calls in flight on a channel that is closed: ``CancelledError`` comes up in the
task awaiting the call though nobody cancelled that task.

Also the planners of a sparse import, which need no volume: ``sector_runs`` (which sectors of
the copy are data) and ``plan_pieces`` (the requests that write them and unmap, or zero, the
holes)."""

from __future__ import annotations

import asyncio

import pytest

from tierdisk.client.chunking import (
    MIN_HOLE_BYTES,
    UNMAP_MAX_BYTES,
    Piece,
    caller_cancelled,
    plan_pieces,
    run_bounded,
    run_ordered,
    sector_runs,
)
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


# -- sector_runs and plan_pieces: planning a sparse import --------------------------------

SS = 512
GAP = MIN_HOLE_BYTES // SS  # 128 sectors: a hole shorter than this is written with its data


def sectors(a: int, b: int) -> tuple[int, int]:
    """The byte run of sectors ``[a, b)``."""
    return a * SS, b * SS


def test_sector_runs_widen_data_outward_to_whole_sectors() -> None:
    # data from 100 bytes into sector 200 to 1 byte into sector 300: sectors 200..301 whole
    runs = [(200 * SS + 100, 300 * SS + 1)]
    assert sector_runs(runs, 0, SS, 1000) == [(200, 301)]


def test_sector_runs_count_from_the_start_of_the_copy() -> None:
    start = 3 * SS + 7  # the copy starts mid-file (stdin at its current position)
    runs = [(start + 200 * SS, start + 300 * SS)]
    assert sector_runs(runs, start, SS, 1000) == [(200, 300)]


def test_sector_runs_join_runs_across_a_hole_shorter_than_min_hole() -> None:
    short = [sectors(200, 300), sectors(300 + GAP - 1, 500)]
    assert sector_runs(short, 0, SS, 1000) == [(200, 500)]
    exact = [sectors(200, 300), sectors(300 + GAP, 500)]  # 64 KiB exactly: stays a hole
    assert sector_runs(exact, 0, SS, 1000) == [(200, 300), (300 + GAP, 500)]


def test_sector_runs_join_short_holes_at_either_end_of_the_copy() -> None:
    assert sector_runs([sectors(GAP - 1, 300)], 0, SS, 1000) == [(0, 300)]
    assert sector_runs([sectors(GAP, 300)], 0, SS, 1000) == [(GAP, 300)]
    assert sector_runs([sectors(200, 1000 - GAP + 1)], 0, SS, 1000) == [(200, 1000)]
    assert sector_runs([sectors(200, 1000 - GAP)], 0, SS, 1000) == [(200, 1000 - GAP)]


def test_sector_runs_of_a_file_with_no_data() -> None:
    assert sector_runs([], 0, SS, 1000) == []


def test_sector_runs_keep_a_one_sector_hole_when_sectors_are_larger_than_min_hole() -> None:
    ss = 2 * MIN_HOLE_BYTES  # the gap is one sector, not zero: touching runs still join
    runs = [(0, ss), (2 * ss, 3 * ss), (3 * ss, 4 * ss)]
    assert sector_runs(runs, 0, ss, 10) == [(0, 1), (2, 4)]


def test_plan_pieces_chunk_the_data_and_unmap_each_hole_in_one_piece() -> None:
    assert plan_pieces([(200, 500)], 1000, 128, True, SS) == [
        Piece(0, 200, False),
        Piece(200, 128, True),
        Piece(328, 128, True),
        Piece(456, 44, True),
        Piece(500, 500, False),
    ]


def test_plan_pieces_write_holes_as_zeros_in_data_sized_chunks_without_unmap() -> None:
    assert plan_pieces([(0, 100)], 300, 128, False, SS) == [
        Piece(0, 100, True),
        Piece(100, 128, False),
        Piece(228, 72, False),
    ]


def test_plan_pieces_cap_each_unmap_at_unmap_max_bytes() -> None:
    most = UNMAP_MAX_BYTES // SS
    assert plan_pieces([], 3 * most + 5, 128, True, SS) == [
        Piece(0, most, False),
        Piece(most, most, False),
        Piece(2 * most, most, False),
        Piece(3 * most, 5, False),
    ]


def test_plan_pieces_of_all_data_or_no_sectors_have_no_empty_holes() -> None:
    assert plan_pieces([(0, 300)], 300, 128, True, SS) == [
        Piece(0, 128, True),
        Piece(128, 128, True),
        Piece(256, 44, True),
    ]
    assert plan_pieces([], 0, 128, True, SS) == []


@pytest.mark.parametrize("unmap", [True, False])
@pytest.mark.parametrize(
    "runs",
    [
        [],
        [sectors(0, 1000)],
        [sectors(10, 20)],
        [sectors(300, 301), sectors(600, 700), sectors(999, 1000)],
    ],
)
def test_planned_pieces_cover_the_copy_once_in_order(
    runs: list[tuple[int, int]], unmap: bool
) -> None:
    data = sector_runs(runs, 0, SS, 1000)
    pieces = plan_pieces(data, 1000, 64, unmap, SS)
    pos = 0
    for piece in pieces:
        assert piece.offset == pos and piece.sector_count > 0
        assert piece.sector_count <= (64 if piece.data or not unmap else 1000)
        pos += piece.sector_count
    assert pos == 1000
    written = [p for p in pieces if p.data]
    covered = {s for p in written for s in range(p.offset, p.offset + p.sector_count)}
    assert covered == {s for lo, hi in data for s in range(lo, hi)}
