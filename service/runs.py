"""Algebra on *run lists*: sorted, disjoint half-open sector ranges ``[(start, end), …]``.

Every function here is linear in the number of runs it is given and never looks at single
sectors, so the engine can combine what layers report in whole runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["Run", "clip", "complement", "dense_groups", "merge", "subtract", "total"]

Run = tuple[int, int]
"""A half-open sector range ``(start, end)``; ``start < end`` for every run in a run list."""


def total(runs: Iterable[Run]) -> int:
    """Number of sectors covered by ``runs``."""
    return sum(end - start for start, end in runs)


def clip(runs: Sequence[Run], lo: int, hi: int) -> list[Run]:
    """The parts of ``runs`` inside ``[lo, hi)``."""
    out: list[Run] = []
    for start, end in runs:
        if end <= lo:
            continue
        if start >= hi:
            break
        s, e = max(start, lo), min(end, hi)
        if s < e:
            out.append((s, e))
    return out


def complement(lo: int, hi: int, runs: Sequence[Run]) -> list[Run]:
    """The sectors of ``[lo, hi)`` that ``runs`` (sorted, disjoint) do not cover."""
    out: list[Run] = []
    cursor = lo
    for start, end in runs:
        if end <= cursor:
            continue
        if start >= hi:
            break
        if start > cursor:
            out.append((cursor, start))
        cursor = max(cursor, end)
        if cursor >= hi:
            break
    if cursor < hi:
        out.append((cursor, hi))
    return out


def subtract(runs: Sequence[Run], taken: Sequence[Run]) -> list[Run]:
    """``runs`` minus ``taken``; both sorted and disjoint. Linear in both lengths."""
    if not taken:
        return list(runs)
    out: list[Run] = []
    j = 0
    n = len(taken)
    for start, end in runs:
        cursor = start
        while j < n and taken[j][1] <= cursor:
            j += 1
        k = j
        while k < n and taken[k][0] < end:
            ts, te = taken[k]
            if ts > cursor:
                out.append((cursor, ts))
            cursor = max(cursor, te)
            if cursor >= end:
                break
            k += 1
        if cursor < end:
            out.append((cursor, end))
    return out


def dense_groups(runs: Sequence[Run], near: int) -> list[list[Run]]:
    """``runs`` cut into groups of consecutive runs whose span (first start to last end) is
    at most twice the sectors they cover, or at most ``near`` sectors: what to ask a layer
    about in one range each, so that a question over a span costs no more than about twice
    the questions over its runs, whatever lies between them."""
    groups: list[list[Run]] = []
    covered = 0
    for start, end in runs:
        if groups:
            first = groups[-1][0][0]
            if end - first <= max(near, 2 * (covered + end - start)):
                groups[-1].append((start, end))
                covered += end - start
                continue
        groups.append([(start, end)])
        covered = end - start
    return groups


def merge(runs: Iterable[Run]) -> list[Run]:
    """Sort ``runs`` and join the ones that overlap or touch."""
    out: list[Run] = []
    for start, end in sorted(runs):
        if start >= end:
            continue
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out
