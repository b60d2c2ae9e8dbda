"""The test side's one way from single sectors to run lists, for comparing against models
that track sectors one at a time."""

from __future__ import annotations

from collections.abc import Iterable

from tierdisk.service.runs import Run

__all__ = ["runs_of"]


def runs_of(sectors: Iterable[int]) -> list[Run]:
    """The maximal runs of ``sectors`` (distinct sector numbers, any order), ascending."""
    out: list[Run] = []
    for s in sorted(sectors):
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], s + 1)
        else:
            out.append((s, s + 1))
    return out
