"""Prometheus families of the NBD export, in the server's registry.

NBD requests are counted like gRPC ones: ``tierdisk_nbd_requests_total{volume,command,result}``
(result ``ok`` or the NBD error name) and ``tierdisk_nbd_request_duration_seconds{command}``;
data commands also count in the volume families (``tierdisk_volume_io_requests_total``,
``tierdisk_volume_io_bytes_total``, ``tierdisk_io_duration_seconds``), so a volume's requests,
throughput and errors cover both front ends; there an NBD error counts under the status
code a gRPC call failing the same way gets (the session passes it on, from the one table of
:mod:`.status`: a read past the end is ``OUT_OF_RANGE`` on both, though NBD answers it
``EINVAL``). The bytes are the data a request carries or returns: ``WRITE_ZEROES`` counts as
a write of no bytes, ``CACHE`` as a read of none (bytes per request is the data moved, not
the range covered). Failed TLS handshakes count in ``tierdisk_nbd_tls_handshake_failures_total``
(0 on an export without TLS). Session and connection counts are read from
:class:`~tierdisk.service.nbd.NbdStats` at scrape time. The request families are the
project's own :class:`~tierdisk.service.loop_metrics.LoopCounter` and
:class:`~tierdisk.service.loop_metrics.LoopHistogram`, updated on the event loop like the
others, so they expose no ``_created`` series either.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .loop_metrics import LoopCounter, LoopHistogram
from .metrics import LATENCY_BUCKETS, Metrics
from .nbd import NbdStats

__all__ = ["NbdMetrics"]

# NBD command → the volume operation it is (for the shared io families).
_OPS = {
    "read": "read",
    "cache": "read",
    "write": "write",
    "write_zeroes": "write",
    "trim": "unmap",
    "flush": "flush",
}


class NbdMetrics:
    """Wires ``stats`` into ``metrics``: a request hook plus a scrape-time collector."""

    def __init__(self, metrics: Metrics, stats: NbdStats) -> None:
        self._metrics = metrics
        self.stats = stats
        r = metrics.registry
        self.requests = LoopCounter(
            "tierdisk_nbd_requests",
            "NBD requests by command and result (ok or NBD error).",
            ["volume", "command", "result"],
            registry=r,
        )
        self.duration = LoopHistogram(
            "tierdisk_nbd_request_duration_seconds",
            "Time to serve an NBD request.",
            ["command"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        stats.on_request = self.observe
        metrics.engine.extra.append(self)

    def observe(
        self, volume: str, command: str, result: str, status: str, seconds: float, nbytes: int
    ) -> None:
        """The :class:`NbdStats` request hook (:data:`~.nbd.RequestHook`)."""
        self.requests.labels(volume, command, result).inc()
        self.duration.labels(command).observe(seconds)
        op = _OPS.get(command)
        if op is not None:
            self._metrics.observe_io(volume, op, status, nbytes, seconds)

    def collect_metrics(self) -> Iterator[Metric]:
        stats = self.stats
        connections = CounterMetricFamily("tierdisk_nbd_connections", "NBD connections accepted.")
        connections.add_metric([], stats.connections_total)
        refused = CounterMetricFamily(
            "tierdisk_nbd_connections_refused",
            "NBD connections refused: a choice of export over nbd_max_connections, or a "
            "connection over as many waiting for TLS.",
        )
        refused.add_metric([], stats.connections_refused)
        tls_failures = CounterMetricFamily(
            "tierdisk_nbd_tls_handshake_failures",
            "NBD TLS handshakes (after NBD_OPT_STARTTLS) that failed; the connection was "
            "closed. With nbd_tls_ca: clients without a certificate it signed.",
        )
        tls_failures.add_metric([], stats.tls_handshake_failures)
        sessions = CounterMetricFamily(
            "tierdisk_nbd_sessions", "NBD connections that reached transmission."
        )
        sessions.add_metric([], stats.sessions_total)
        active = GaugeMetricFamily(
            "tierdisk_nbd_sessions_active", "NBD sessions open, per volume.", labels=["volume"]
        )
        for volume, count in sorted(stats.volume_sessions.items()):
            active.add_metric([volume], count)
        yield from (connections, refused, tls_failures, sessions, active)

    def inspect(self, volume: str) -> dict[str, Any]:
        """The NBD part of a volume's Inspect tree."""
        return {
            "nbd": {
                **self.stats.snapshot(),  # server-wide, but for sessions_active: this volume's
                "sessions_active": self.stats.volume_sessions.get(volume, 0),
            }
        }
