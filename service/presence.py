"""A set of sectors stored as runs: the presence map shared by every layer that tracks one.

:class:`RunSet` keeps sorted, disjoint, non-touching half-open runs ``[start, end)`` in
*chunks* of at most ``2 * CHUNK`` runs, each chunk two ``array('q')`` (starts, ends), plus two
small per-chunk index lists (first start, last end) that are searched with :mod:`bisect`.
Memory is 16 bytes per run plus a few per chunk, whatever the number of sectors.

Complexity, with *r* runs in the set and *k* runs touched by the operation:

=================================  ==========================================
``add(a, b)`` / ``remove(a, b)``   O(log r + CHUNK + k)
``runs_in(a, b)``                  O(log r + k) (k = runs returned)
``first_runs(a, limit)``           O(log r + limit)
``count(a, b)``                    O(log r + k)
``len(set)`` / ``sectors``         O(1)
``from_runs(runs)``                O(r)
=================================  ==========================================

A million runs stay fast because no operation moves more than one or two chunks of memory.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator

from .runs import Run

__all__ = ["CHUNK", "RunSet"]

CHUNK = 512
"""Target runs per chunk; a chunk is split when it grows past twice this."""

_Pos = tuple[int, int]


class RunSet:
    """A mutable set of sectors held as runs. Not thread-safe; use it from one thread."""

    __slots__ = ("_ends", "_firsts", "_lasts", "_runs", "_sectors", "_starts")

    def __init__(self, runs: Iterable[Run] = ()) -> None:
        self._starts: list[array[int]] = []
        self._ends: list[array[int]] = []
        self._firsts: list[int] = []  # first start of each chunk
        self._lasts: list[int] = []  # last end of each chunk
        self._runs = 0
        self._sectors = 0
        for start, end in runs:
            self.add(start, end)

    @classmethod
    def from_runs(cls, runs: Iterable[Run]) -> RunSet:
        """Build from runs already sorted and disjoint (touching runs are joined). O(r)."""
        out = cls()
        starts: array[int] = array("q")
        ends: array[int] = array("q")
        for start, end in runs:
            if start >= end:
                continue
            if ends and start < ends[-1]:
                raise ValueError(f"runs not sorted and disjoint at {start}")
            if ends and start == ends[-1]:
                ends[-1] = end
            else:
                starts.append(start)
                ends.append(end)
        for i in range(0, len(starts), CHUNK):
            out._starts.append(starts[i : i + CHUNK])
            out._ends.append(ends[i : i + CHUNK])
        out._reindex()
        return out

    # -- queries ----------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of runs."""
        return self._runs

    @property
    def sectors(self) -> int:
        """Number of sectors in the set."""
        return self._sectors

    def __iter__(self) -> Iterator[Run]:
        for starts, ends in zip(self._starts, self._ends, strict=True):
            yield from zip(starts, ends, strict=True)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RunSet):
            return NotImplemented
        return list(self) == list(other)

    def __repr__(self) -> str:
        shown = list(self.runs_in(0, 1 << 63)[:8])
        more = "" if self._runs <= 8 else f", … {self._runs - 8} more"
        return f"RunSet({shown}{more})"

    def runs_in(self, a: int, b: int) -> list[Run]:
        """The runs of the set inside ``[a, b)``, clipped to it, ascending."""
        out: list[Run] = []
        if a >= b or not self._runs:
            return out
        k = bisect_right(self._lasts, a)
        nchunks = len(self._starts)
        if k == nchunks:
            return out
        starts, ends = self._starts[k], self._ends[k]
        i = bisect_right(ends, a)
        while True:
            n = len(starts)
            while i < n:
                s = starts[i]
                if s >= b:
                    return out
                e = ends[i]
                out.append((s if s > a else a, e if e < b else b))
                i += 1
            k += 1
            if k == nchunks:
                return out
            starts, ends, i = self._starts[k], self._ends[k], 0

    def first_runs(self, a: int, limit: int) -> list[Run]:
        """The first ``limit`` runs of the set that end after sector ``a`` (the first one
        clipped to start at ``a``), ascending: a walk over the set in bounded steps.
        O(log r + limit)."""
        out: list[Run] = []
        k = bisect_right(self._lasts, a)
        i = bisect_right(self._ends[k], a) if k < len(self._ends) else 0
        while k < len(self._starts) and len(out) < limit:
            starts, ends = self._starts[k], self._ends[k]
            take = min(len(starts), i + limit - len(out))
            out.extend(zip(starts[i:take], ends[i:take], strict=True))
            k, i = k + 1, 0
        if out and out[0][0] < a:
            out[0] = (a, out[0][1])
        return out

    def count(self, a: int, b: int) -> int:
        """Number of sectors of ``[a, b)`` in the set."""
        return sum(e - s for s, e in self.runs_in(a, b))

    def contains(self, a: int, b: int) -> bool:
        """True when every sector of ``[a, b)`` is in the set (vacuously true when empty)."""
        if a >= b:
            return True
        found = self.runs_in(a, a + 1)
        if not found:
            return False
        k = bisect_right(self._lasts, a)
        i = bisect_right(self._ends[k], a)
        return self._ends[k][i] >= b

    def last_end(self) -> int:
        """One past the highest sector in the set, or 0 when it is empty."""
        return self._lasts[-1] if self._lasts else 0

    # -- updates ----------------------------------------------------------------------------

    def add(self, a: int, b: int) -> None:
        """Put ``[a, b)`` in the set, joining runs it overlaps or touches."""
        if a >= b:
            return
        p = self._first_end_at_least(a)
        q = self._first_start_above(b)
        if p < q:
            first, last = self._run_at(p), self._run_at(self._before(q))
            self._splice(p, q, [(min(a, first[0]), max(b, last[1]))])
        else:
            self._splice(p, p, [(a, b)])

    def remove(self, a: int, b: int) -> None:
        """Take ``[a, b)`` out of the set, splitting a run it cuts through."""
        if a >= b or not self._runs:
            return
        p = self._first_end_above(a)
        q = self._first_start_at_least(b)
        if not p < q:
            return
        first, last = self._run_at(p), self._run_at(self._before(q))
        keep: list[Run] = []
        if first[0] < a:
            keep.append((first[0], a))
        if last[1] > b:
            keep.append((b, last[1]))
        self._splice(p, q, keep)

    def clear(self) -> None:
        """Remove everything."""
        self.__init__()  # type: ignore[misc]

    # -- internals --------------------------------------------------------------------------

    def _end_pos(self) -> _Pos:
        return (len(self._starts), 0)

    def _norm(self, k: int, i: int) -> _Pos:
        if k < len(self._starts) and i >= len(self._starts[k]):
            return (k + 1, 0)
        return (k, i)

    def _first_end_at_least(self, x: int) -> _Pos:
        k = bisect_left(self._lasts, x)
        if k == len(self._lasts):
            return self._end_pos()
        return self._norm(k, bisect_left(self._ends[k], x))

    def _first_end_above(self, x: int) -> _Pos:
        k = bisect_right(self._lasts, x)
        if k == len(self._lasts):
            return self._end_pos()
        return self._norm(k, bisect_right(self._ends[k], x))

    def _first_start_above(self, x: int) -> _Pos:
        k = bisect_right(self._firsts, x) - 1
        if k < 0:
            return (0, 0)
        return self._norm(k, bisect_right(self._starts[k], x))

    def _first_start_at_least(self, x: int) -> _Pos:
        k = bisect_left(self._firsts, x) - 1
        if k < 0:
            return (0, 0)
        return self._norm(k, bisect_left(self._starts[k], x))

    def _before(self, pos: _Pos) -> _Pos:
        k, i = pos
        if i > 0:
            return (k, i - 1)
        return (k - 1, len(self._starts[k - 1]) - 1)

    def _run_at(self, pos: _Pos) -> Run:
        k, i = pos
        return (self._starts[k][i], self._ends[k][i])

    def _splice(self, p: _Pos, q: _Pos, new: list[Run]) -> None:
        """Replace the runs in positions ``[p, q)`` with ``new`` (sorted, disjoint)."""
        new_starts = array("q", [s for s, _ in new])
        new_ends = array("q", [e for _, e in new])
        if not self._starts:
            if new:
                self._starts.append(new_starts)
                self._ends.append(new_ends)
                self._reindex()
            return
        nchunks = len(self._starts)
        k1, i1 = p if p[0] < nchunks else (nchunks - 1, len(self._starts[-1]))
        k2, i2 = q if q[0] < nchunks else (nchunks - 1, len(self._starts[-1]))
        if k1 == k2:
            starts, ends = self._starts[k1], self._ends[k1]
            removed_runs = i2 - i1
            removed = sum(ends[i1:i2]) - sum(starts[i1:i2])
            starts[i1:i2] = new_starts
            ends[i1:i2] = new_ends
        else:
            removed_runs = len(self._starts[k1]) - i1 + i2
            removed = sum(self._ends[k1][i1:]) - sum(self._starts[k1][i1:])
            removed += sum(self._ends[k2][:i2]) - sum(self._starts[k2][:i2])
            for k in range(k1 + 1, k2):
                removed_runs += len(self._starts[k])
                removed += sum(self._ends[k]) - sum(self._starts[k])
            starts = self._starts[k1][:i1] + new_starts + self._starts[k2][i2:]
            ends = self._ends[k1][:i1] + new_ends + self._ends[k2][i2:]
            self._starts[k1 : k2 + 1] = [starts]
            self._ends[k1 : k2 + 1] = [ends]
            self._firsts[k1 : k2 + 1] = [0]  # set by _rebalance
            self._lasts[k1 : k2 + 1] = [0]
        self._runs += len(new) - removed_runs
        self._sectors += sum(new_ends) - sum(new_starts) - removed
        self._rebalance(k1)

    def _rebalance(self, k: int) -> None:
        starts, ends = self._starts[k], self._ends[k]
        if not starts:
            del self._starts[k], self._ends[k], self._firsts[k], self._lasts[k]
            return
        if len(starts) > 2 * CHUNK:
            pieces_s = [starts[i : i + CHUNK] for i in range(0, len(starts), CHUNK)]
            pieces_e = [ends[i : i + CHUNK] for i in range(0, len(ends), CHUNK)]
            self._starts[k : k + 1] = pieces_s
            self._ends[k : k + 1] = pieces_e
            self._firsts[k : k + 1] = [s[0] for s in pieces_s]
            self._lasts[k : k + 1] = [e[-1] for e in pieces_e]
            return
        self._firsts[k] = starts[0]
        self._lasts[k] = ends[-1]

    def _reindex(self) -> None:
        self._firsts = [s[0] for s in self._starts]
        self._lasts = [e[-1] for e in self._ends]
        self._runs = sum(len(s) for s in self._starts)
        self._sectors = sum(sum(e) - sum(s) for s, e in zip(self._starts, self._ends, strict=True))
