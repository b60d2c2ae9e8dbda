"""RunSet (service/presence.py) against a plain set of sectors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from runs_model import runs_of

from tierdisk.service import presence
from tierdisk.service.presence import RunSet


def check(rs: RunSet, model: set[int], probes: list[tuple[int, int]]) -> None:
    expected = runs_of(model)
    assert list(rs) == expected, "runs are sorted, disjoint and joined"
    assert len(rs) == len(expected)
    assert rs.sectors == len(model)
    assert rs.last_end() == (max(model) + 1 if model else 0)
    edges = [(x, x + k) for a, b in expected for x in (a - 1, a, b - 1, b) for k in (1, 3)]
    for a, b in [*probes, *edges]:  # (a probe at each run's edges: e.g. one from its end)
        inside = {s for s in model if a <= s < b}
        assert rs.runs_in(a, b) == runs_of(inside)
        assert rs.count(a, b) == len(inside)
        assert rs.contains(a, b) == (a >= b or inside == set(range(a, b)))
        after = runs_of({s for s in model if s >= a})
        for limit in (1, 2, 5):
            assert rs.first_runs(a, limit) == after[:limit]
    # the internal chunk index is consistent
    assert rs._firsts == [s[0] for s in rs._starts]
    assert rs._lasts == [e[-1] for e in rs._ends]
    assert all(len(s) for s in rs._starts)


ops = st.lists(
    st.tuples(st.booleans(), st.integers(0, 400), st.integers(0, 12)), min_size=1, max_size=120
)
probes = st.lists(st.tuples(st.integers(0, 420), st.integers(0, 420)), max_size=6)


@settings(max_examples=300, deadline=None)
@given(ops, probes, st.sampled_from([2, 3, 512]))
def test_runset_matches_a_set(
    operations: list[tuple[bool, int, int]],
    probe: list[tuple[int, int]],
    chunk: int,
) -> None:
    """Random adds and removes; small chunk sizes force chunk splits, merges across chunk
    boundaries and emptied chunks."""
    saved = presence.CHUNK
    presence.CHUNK = chunk
    try:
        rs = RunSet()
        model: set[int] = set()
        for add, start, length in operations:
            if add:
                rs.add(start, start + length)
                model |= set(range(start, start + length))
            else:
                rs.remove(start, start + length)
                model -= set(range(start, start + length))
            check(rs, model, [(start - 1, start + length + 1)])
        check(rs, model, probe)
        assert RunSet.from_runs(list(rs)) == rs
        assert RunSet(list(rs)) == rs
    finally:
        presence.CHUNK = saved


def test_examples() -> None:
    rs = RunSet([(0, 4), (4, 6), (10, 12)])
    assert list(rs) == [(0, 6), (10, 12)]
    rs.remove(2, 11)
    assert list(rs) == [(0, 2), (11, 12)]
    rs.add(2, 11)
    assert list(rs) == [(0, 12)]
    assert rs.contains(0, 12) and not rs.contains(0, 13)
    assert rs.runs_in(5, 5) == [] and rs.count(3, 1) == 0
    rs.add(5, 5)
    rs.remove(7, 7)
    assert list(rs) == [(0, 12)]
    rs.clear()
    assert list(rs) == [] and rs.sectors == 0 and rs.last_end() == 0
    assert "RunSet" in repr(RunSet([(2 * i, 2 * i + 1) for i in range(20)]))


def test_from_runs_refuses_overlaps() -> None:
    try:
        RunSet.from_runs([(0, 5), (3, 8)])
    except ValueError:
        pass
    else:
        raise AssertionError("overlapping runs accepted")
    assert list(RunSet.from_runs([(0, 2), (2, 4), (5, 5), (6, 7)])) == [(0, 4), (6, 7)]


def test_from_runs_refuses_an_overlap_past_the_first_run() -> None:
    """Each run is checked against the one before it, not the first: sparse_map relies on
    this to refuse an unsorted snapshot."""
    with pytest.raises(ValueError):
        RunSet.from_runs([(0, 2), (5, 8), (6, 9)])
    with pytest.raises(ValueError):
        RunSet.from_runs([(0, 2), (4, 6), (10, 20), (3, 4)])


def test_a_million_runs() -> None:
    """A million runs build and stay usable (memory and time are per run, not per sector)."""
    n = 1_000_000
    rs = RunSet.from_runs((4 * i, 4 * i + 2) for i in range(n))
    assert len(rs) == n and rs.sectors == 2 * n
    assert rs.runs_in(4 * 500_000 + 1, 4 * 500_000 + 9) == [
        (4 * 500_000 + 1, 4 * 500_000 + 2),
        (4 * 500_001, 4 * 500_001 + 2),
        (4 * 500_002, 4 * 500_002 + 1),
    ]
    rs.add(1, 4 * n)  # join everything
    assert list(rs) == [(0, 4 * n)]
    # and many single adds through the incremental path (appends at the end)
    m = 200_000
    rs = RunSet()
    for i in range(m):
        rs.add(3 * i, 3 * i + 1)
    assert len(rs) == m and rs.count(0, 3 * m) == m
    rs.remove(0, 3 * m)
    assert len(rs) == 0
