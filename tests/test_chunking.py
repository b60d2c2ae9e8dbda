"""tierdisk.client.chunking (client/chunking.py): chunk and window planning, bounded
concurrency, and the planners of a sparse import.

run_bounded / run_ordered when a call is cancelled underneath them: the whole run fails
(``Interrupted``), never returns as if every item were done; the caller's own cancellation
is still ``CancelledError``, and cancels the calls in flight.

A call "cancelled underneath" awaits a future that something else cancels — what grpc.aio
does to the calls in flight on a channel that is closed: ``CancelledError`` comes up in the
task awaiting the call though nobody cancelled that task.

Also the planners of a sparse import, which need no volume: ``sector_runs`` (which sectors of
the copy are data) and ``plan_pieces`` (the requests that write them and unmap, or zero, the
holes); the planners of every split request (``sectors_per_chunk``, ``plan_chunks``,
``plan_windows``, ``merge_extents``); and run_bounded / run_ordered's limit, order and
first failure."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tierdisk.client.chunking import (
    MIN_HOLE_BYTES,
    UNMAP_MAX_BYTES,
    Chunk,
    Piece,
    ReadWindow,
    caller_cancelled,
    merge_extents,
    plan_batches,
    plan_chunks,
    plan_pieces,
    plan_windows,
    run_bounded,
    run_ordered,
    sector_runs,
    sectors_per_chunk,
)
from tierdisk.client.errors import Interrupted, OutOfRange
from tierdisk.client.models import Extent


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


# -- chunk planning ----------------------------------------------------------------------


def test_sectors_per_chunk() -> None:
    assert sectors_per_chunk(1 << 20, 512) == 2048
    assert sectors_per_chunk(1 << 20, 4096) == 256
    assert sectors_per_chunk(1000, 512) == 1  # never zero: one sector at least
    assert sectors_per_chunk(100, 4096) == 1
    with pytest.raises(ValueError):
        sectors_per_chunk(1 << 20, 0)


def test_plan_chunks_examples() -> None:
    assert list(plan_chunks(10, 0, 4)) == []
    assert list(plan_chunks(10, 4, 4)) == [Chunk(10, 4, 0)]
    assert list(plan_chunks(10, 9, 4)) == [Chunk(10, 4, 0), Chunk(14, 4, 4), Chunk(18, 1, 8)]
    with pytest.raises(ValueError):
        list(plan_chunks(0, 1, 0))


@given(
    sector=st.integers(0, 1 << 40),
    count=st.integers(0, 5000),
    max_sectors=st.integers(1, 700),
)
def test_plan_chunks_cover_the_range_exactly(sector: int, count: int, max_sectors: int) -> None:
    chunks = list(plan_chunks(sector, count, max_sectors))
    assert sum(c.sector_count for c in chunks) == count
    expected_sector, expected_offset = sector, 0
    for c in chunks:
        assert 0 < c.sector_count <= max_sectors
        assert c.sector == expected_sector and c.offset == expected_offset
        expected_sector += c.sector_count
        expected_offset += c.sector_count
    # only the last chunk may be short
    assert all(c.sector_count == max_sectors for c in chunks[:-1])


def test_plan_windows_examples() -> None:
    assert list(plan_windows([], 8, 2)) == []
    # close runs share a window; a far one starts another; a long one is split
    assert list(plan_windows([(0, 1), (3, 4), (10, 12), (20, 37)], 8, 2)) == [
        ReadWindow(0, 4, ((0, 1), (3, 4))),
        ReadWindow(10, 2, ((10, 12),)),
        ReadWindow(20, 8, ((20, 28),)),
        ReadWindow(28, 8, ((28, 36),)),
        ReadWindow(36, 1, ((36, 37),)),
    ]
    # a window never passes max_sectors, even when the next run is close
    assert list(plan_windows([(0, 6), (7, 10)], 8, 2)) == [
        ReadWindow(0, 8, ((0, 6), (7, 8))),
        ReadWindow(8, 2, ((8, 10),)),
    ]
    with pytest.raises(ValueError):
        list(plan_windows([(0, 1)], 0, 0))


@given(
    cuts=st.lists(st.integers(0, 10_000), unique=True, max_size=40),
    max_sectors=st.integers(1, 300),
    max_gap=st.integers(0, 50),
)
def test_plan_windows_cover_the_runs_exactly(
    cuts: list[int], max_sectors: int, max_gap: int
) -> None:
    edges = sorted(cuts)
    runs = list(zip(edges[0::2], edges[1::2], strict=False))
    windows = list(plan_windows(runs, max_sectors, max_gap))
    inside = [run for w in windows for run in w.runs]
    assert merge_extents(Extent(a, b - a) for a, b in inside) == merge_extents(
        Extent(a, b - a) for a, b in runs
    )
    for w in windows:
        assert 0 < w.sector_count <= max_sectors
        assert w.runs[0][0] == w.sector and w.runs[-1][1] == w.sector + w.sector_count
        assert all(b - a <= max_gap for (_, a), (b, _) in itertools.pairwise(w.runs))
    assert all(a.sector + a.sector_count <= b.sector for a, b in itertools.pairwise(windows))


def test_plan_chunks_is_lazy_for_huge_ranges() -> None:
    it = plan_chunks(0, 1 << 50, 2048)
    assert next(it) == Chunk(0, 2048, 0)


def test_merge_extents_joins_runs_meeting_at_chunk_boundaries() -> None:
    runs = [Extent(4, 4), Extent(0, 4), Extent(8, 2), Extent(20, 5), Extent(22, 1), Extent(30, 0)]
    assert merge_extents(runs) == [Extent(0, 10), Extent(20, 5)]
    assert merge_extents([]) == []


def test_merge_extents_skips_an_empty_extent_and_keeps_what_follows_it() -> None:
    """A zero-length extent (which a server may send) is left out; the extents after it
    are not: dropping them would turn data into holes."""
    runs = [Extent(0, 2), Extent(3, 0), Extent(5, 2), Extent(9, 0), Extent(9, 1)]
    assert merge_extents(runs) == [Extent(0, 2), Extent(5, 2), Extent(9, 1)]
    assert merge_extents([Extent(4, 0)]) == []
    assert merge_extents([Extent(0, 4), Extent(4, 0), Extent(4, 2)]) == [Extent(0, 6)]


# -- bounded concurrency ---------------------------------------------------------------


async def test_run_bounded_limits_calls_in_flight_and_does_every_item() -> None:
    active = peak = 0
    done: list[int] = []

    async def fn(i: int) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.001 * (i % 3))
        active -= 1
        done.append(i)

    await run_bounded(range(50), fn, 4)
    assert sorted(done) == list(range(50))
    assert peak == 4


async def test_run_bounded_raises_the_first_failure_and_cancels_the_rest() -> None:
    started: list[int] = []
    cancelled: list[int] = []

    async def fn(i: int) -> None:
        started.append(i)
        if i == 2:
            raise OutOfRange("boom")
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(i)
            raise

    with pytest.raises(OutOfRange, match="boom"):
        await asyncio.wait_for(run_bounded(range(100), fn, 4), 5)
    assert len(started) <= 4 + 1
    assert sorted(cancelled) == [i for i in started if i != 2]


async def test_run_ordered_keeps_order_and_limit() -> None:
    active = peak = 0

    async def fn(i: int) -> int:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.002 * ((7 * i) % 5))
        active -= 1
        return i * i

    got = [(i, r) async for i, r in run_ordered(range(30), fn, 4)]
    assert got == [(i, i * i) for i in range(30)]
    assert peak <= 4


async def test_run_ordered_closed_early_cancels_work_in_flight() -> None:
    cancelled = 0

    async def fn(i: int) -> int:
        nonlocal cancelled
        try:
            await asyncio.sleep(0 if i == 0 else 10)
        except asyncio.CancelledError:
            cancelled += 1
            raise
        return i

    gen = run_ordered(range(100), fn, 4)
    assert await anext(gen) == (0, 0)
    await gen.aclose()
    assert cancelled == 3


def test_plan_batches_fills_each_call_in_order() -> None:
    """Ranges go into calls in order, each call up to ``max_ranges`` ranges and
    ``max_sectors`` sectors; a range over ``max_sectors`` is a call of its own."""
    assert plan_batches([], 8) == []
    assert plan_batches([1, 2, 3], 8) == [[0, 1, 2]]
    assert plan_batches([4, 4, 1], 8) == [[0, 1], [2]]  # a full call closes
    # the range over max_sectors goes alone; the small ones around it share a call
    assert plan_batches([3, 9, 3, 0], 8) == [[1], [0, 2, 3]]
    assert plan_batches([1] * 5, 100, max_ranges=2) == [[0, 1], [2, 3], [4]]
    assert plan_batches([0, 0, 0], 1, max_ranges=2) == [[0, 1], [2]]
    groups = plan_batches([5, 3, 7, 1, 8, 2, 6], 8, max_ranges=3)
    assert sorted(i for g in groups for i in g) == list(range(7))
    for group in groups:
        assert len(group) <= 3 and sum([5, 3, 7, 1, 8, 2, 6][i] for i in group) <= 8
