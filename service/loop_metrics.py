"""Labelled counters and histograms for per-request figures, updated on the event loop.

Every request updates a few of these, so an update is a plain attribute change on a cell
object (no lock, no checks): ``family.labels(...)`` returns the cell once, callers keep it,
and each request then costs ``cell.inc(n)`` or ``cell.observe(seconds)``. The families are
:class:`~prometheus_client.registry.Collector` objects that build their samples when
scraped, so the exposition is prometheus_client's own (``tests/test_loop_metrics.py``
checks it equals what its ``Counter`` and ``Histogram`` expose for the same updates, without
the ``_created`` series, which these families do not keep).

Cells may only be changed on one thread (the server's event loop); a scrape on that loop,
or anywhere else under the GIL, reads whole values.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

_le_text: Callable[[float], str] = floatToGoString  # how prometheus_client writes ``le``

__all__ = ["CounterCell", "HistogramCell", "LoopCounter", "LoopHistogram"]


class CounterCell:
    """One labelled series of a counter."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (>= 0; not checked, callers pass counts and byte sizes)."""
        self.value += amount


class HistogramCell:
    """One labelled series of a histogram: a count per bucket (not cumulative) and a sum."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, amount: float, times: int = 1) -> None:
        """Count ``amount`` in the first bucket whose upper bound is >= it, ``times`` times
        (as many observations of the same amount; >= 0, not checked)."""
        self.sum += amount * times
        self.counts[bisect_left(self._bounds, amount)] += times


_Cell = TypeVar("_Cell", CounterCell, HistogramCell)


class _Family(Collector, Generic[_Cell]):
    """The series of one family by label values, and what registering it takes."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._cells: dict[tuple[str, ...], _Cell] = {}
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str) -> _Cell:
        """The series of these label values (created empty on first use)."""
        cell = self._cells.get(values)
        if cell is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
            cell = self._cells[values] = self._new_cell()
        return cell

    def label_sets(self) -> list[tuple[str, ...]]:
        """The label values of every series."""
        return list(self._cells)

    def remove(self, *values: str) -> None:
        """Drop one series."""
        self._cells.pop(values, None)

    def describe(self) -> list[Metric]:
        """Names only, so registration does not build samples (and checks duplicates)."""
        return [self._family()]

    def _new_cell(self) -> _Cell:
        raise NotImplementedError

    def _family(self) -> Metric:
        raise NotImplementedError


class LoopCounter(_Family[CounterCell]):
    """A labelled counter (exposed as ``<name>_total``) of :class:`CounterCell` series."""

    def _new_cell(self) -> CounterCell:
        return CounterCell()

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, cell in list(self._cells.items()):
            family.add_metric(values, cell.value)
        yield family


class LoopHistogram(_Family[HistogramCell]):
    """A labelled histogram of :class:`HistogramCell` series with fixed bucket bounds."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry | None = None,
    ) -> None:
        bounds = tuple(float(b) for b in buckets if b != float("inf"))
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"{name}: bucket bounds must ascend without repeats")
        self._bounds = bounds
        super().__init__(name, documentation, labelnames, registry)

    def _new_cell(self) -> HistogramCell:
        return HistogramCell(self._bounds)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        names = [_le_text(b) for b in self._bounds] + ["+Inf"]
        for values, cell in list(self._cells.items()):
            cumulative: list[tuple[str, float]] = []
            total = 0
            for name, count in zip(names, list(cell.counts), strict=True):
                total += count
                cumulative.append((name, float(total)))
            family.add_metric(values, cumulative, cell.sum)
        yield family
