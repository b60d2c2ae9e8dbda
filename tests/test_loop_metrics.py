"""The per-request metric families (service/loop_metrics.py) expose exactly what
prometheus_client's own Counter and Histogram expose for the same observations."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from tierdisk.service.loop_metrics import LoopCounter, LoopHistogram
from tierdisk.service.metrics import LATENCY_BUCKETS


def _strip_created(text: bytes) -> list[str]:
    return [line for line in text.decode().splitlines() if "_created" not in line]


def test_loop_metrics_expose_like_prometheus_client() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    c1 = LoopCounter("t_requests", "Requests.", ["op", "code"], registry=ours)
    c2 = Counter("t_requests", "Requests.", ["op", "code"], registry=theirs)
    h1 = LoopHistogram("t_seconds", "Latency.", ["op"], buckets=LATENCY_BUCKETS, registry=ours)
    h2 = Histogram("t_seconds", "Latency.", ["op"], buckets=LATENCY_BUCKETS, registry=theirs)
    samples = [0.00005, 0.0001, 0.0003, 0.001, 0.02, 0.02, 3.0, 10.0, 11.0, 0.0]
    for i, seconds in enumerate(samples):
        op = "read" if i % 3 else "write"
        for counter in (c1, c2):
            counter.labels(op, "OK").inc()
            counter.labels(op, "NOT_FOUND").inc(2.5)
        for histogram in (h1, h2):
            histogram.labels(op).observe(seconds)
    assert _strip_created(generate_latest(ours)) == _strip_created(generate_latest(theirs))


def test_an_amount_observed_n_times_at_once_is_n_observations() -> None:
    """``observe(seconds, n)`` (a ReadBatch's ranges, each timed as the whole call): the
    exposition of n calls of prometheus_client's ``observe(seconds)``."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    h1 = LoopHistogram("t_seconds", "Latency.", ["op"], buckets=LATENCY_BUCKETS, registry=ours)
    h2 = Histogram("t_seconds", "Latency.", ["op"], buckets=LATENCY_BUCKETS, registry=theirs)
    for seconds, times in [(0.0003, 8), (0.02, 1), (0.0003, 0), (7.5, 3), (0.001, 256)]:
        h1.labels("read").observe(seconds, times)
        for _ in range(times):
            h2.labels("read").observe(seconds)
    mine, expected = _strip_created(generate_latest(ours)), _strip_created(generate_latest(theirs))
    assert [line for line in mine if "_sum" not in line] == [
        line for line in expected if "_sum" not in line
    ]
    # The sum is a product, not repeated additions: equal up to float rounding.
    [total] = [float(line.split()[-1]) for line in mine if line.startswith("t_seconds_sum")]
    [added] = [float(line.split()[-1]) for line in expected if line.startswith("t_seconds_sum")]
    assert total == pytest.approx(added, rel=1e-12)


def test_unused_and_removed_series_expose_like_prometheus_client() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    LoopHistogram("t_idle_seconds", "Idle.", ["op"], buckets=LATENCY_BUCKETS, registry=ours)
    Histogram("t_idle_seconds", "Idle.", ["op"], buckets=LATENCY_BUCKETS, registry=theirs)
    c1 = LoopCounter("t_bytes", "Bytes.", ["volume"], registry=ours)
    c2 = Counter("t_bytes", "Bytes.", ["volume"], registry=theirs)
    for counter in (c1, c2):
        counter.labels("a").inc(4096)
        counter.labels("b").inc(512)
        counter.remove("a")
    assert c1.label_sets() == [("b",)]
    assert _strip_created(generate_latest(ours)) == _strip_created(generate_latest(theirs))


def test_a_duplicate_name_is_refused_at_registration() -> None:
    registry = CollectorRegistry()
    LoopCounter("t_requests", "Requests.", ["op"], registry=registry)
    with pytest.raises(ValueError):
        LoopCounter("t_requests", "Requests again.", ["op"], registry=registry)
