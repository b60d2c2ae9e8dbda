"""Run-list algebra (service/runs.py) against sets of sectors."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st
from runs_model import runs_of

from tierdisk.service.runs import Run, clip, complement, dense_groups, merge, subtract, total


def as_set(runs: list[Run]) -> set[int]:
    return {s for a, b in runs for s in range(a, b)}


def is_run_list(runs: list[Run]) -> bool:
    """Sorted, disjoint, no empty runs."""
    return all(a < b for a, b in runs) and all(x[1] <= y[0] for x, y in itertools.pairwise(runs))


sector_sets = st.sets(st.integers(0, 80), max_size=40)
run_lists = sector_sets.map(runs_of)
ranges = st.tuples(st.integers(0, 90), st.integers(0, 90))


def test_examples() -> None:
    assert total([(0, 4), (10, 12)]) == 6
    assert clip([(0, 4), (6, 10), (12, 20)], 3, 13) == [(3, 4), (6, 10), (12, 13)]
    assert clip([(0, 4)], 4, 8) == []
    assert complement(0, 10, [(2, 3), (5, 7)]) == [(0, 2), (3, 5), (7, 10)]
    assert complement(0, 10, []) == [(0, 10)]
    assert complement(3, 5, [(0, 10)]) == []
    assert subtract([(0, 10), (20, 30)], [(5, 25)]) == [(0, 5), (25, 30)]
    assert subtract([(0, 10)], [(2, 3), (3, 4)]) == [(0, 2), (4, 10)], "touching taken runs"
    assert merge([(5, 6), (0, 2), (2, 3), (1, 2), (8, 8)]) == [(0, 3), (5, 6)]


def test_merge_keeps_the_end_of_a_run_that_holds_later_ones() -> None:
    """A run inside the run it is joined to (not the first run) leaves that run whole: the
    remote layer merges its origin's extents with this."""
    assert merge([(0, 1), (5, 10), (6, 8)]) == [(0, 1), (5, 10)]
    assert merge([(0, 1), (5, 10), (6, 8), (9, 12)]) == [(0, 1), (5, 12)]


def test_clip_to_an_empty_range_is_empty() -> None:
    assert clip([(0, 10)], 5, 5) == []
    assert clip([(0, 4), (6, 10)], 4, 4) == clip([(0, 4), (6, 10)], 6, 6) == []


@given(run_lists)
def test_total(runs: list[Run]) -> None:
    assert total(runs) == len(as_set(runs))


@given(run_lists, ranges)
def test_clip(runs: list[Run], bounds: tuple[int, int]) -> None:
    lo, hi = bounds
    out = clip(runs, lo, hi)
    assert is_run_list(out)
    assert as_set(out) == {s for s in as_set(runs) if lo <= s < hi}


@given(run_lists, ranges)
def test_complement(runs: list[Run], bounds: tuple[int, int]) -> None:
    lo, hi = bounds
    out = complement(lo, hi, runs)
    assert is_run_list(out)
    assert as_set(out) == set(range(lo, hi)) - as_set(runs)


@given(run_lists, run_lists)
def test_subtract(runs: list[Run], taken: list[Run]) -> None:
    out = subtract(runs, taken)
    assert is_run_list(out)
    assert as_set(out) == as_set(runs) - as_set(taken)


@given(run_lists, st.lists(st.integers(1, 5)))
def test_subtract_of_split_taken_runs(runs: list[Run], cuts: list[int]) -> None:
    """Taken runs may touch (a layer may report adjacent runs): same result."""
    split: list[Run] = []
    for a, b in runs:
        for cut in cuts:
            if a + cut >= b:
                break
            split.append((a, a + cut))
            a += cut
        split.append((a, b))
    whole = [(0, 100)]
    assert subtract(whole, split) == subtract(whole, runs) == complement(0, 100, runs)


@given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 60))))
def test_merge(runs: list[Run]) -> None:
    out = merge(runs)
    assert is_run_list(out)
    assert all(x[1] < y[0] for x, y in itertools.pairwise(out)), "touching runs joined"
    assert as_set(out) == as_set(runs)


@given(run_lists, st.integers(0, 20))
def test_dense_groups(runs: list[Run], near: int) -> None:
    """The groups hold the runs in order; each spans at most twice its sectors or ``near``,
    and a group ends only where the next run would break that."""
    groups = dense_groups(runs, near)
    assert [run for group in groups for run in group] == runs
    for i, group in enumerate(groups):
        span = group[-1][1] - group[0][0]
        assert len(group) == 1 or span <= max(near, 2 * total(group))
        if i + 1 < len(groups):
            start, end = groups[i + 1][0]
            assert end - group[0][0] > max(near, 2 * (total(group) + end - start))


def test_dense_groups_examples() -> None:
    holes = [(s, s + 1) for s in range(0, 100, 2)]  # dense: one group
    assert dense_groups(holes, 0) == [holes]
    assert dense_groups([(0, 1), (1000, 1001)], 0) == [[(0, 1)], [(1000, 1001)]]
    assert dense_groups([(0, 1), (1000, 1001)], 1001) == [[(0, 1), (1000, 1001)]]
