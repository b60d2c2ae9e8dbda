"""Prometheus metrics of one server instance (DESIGN.md §5), in its own registry.

Engine counters are not copied into Prometheus objects on the data path: an
:class:`EngineCollector` reads each volume's per-layer :class:`~tierdisk.service.volume.LayerStats`
at scrape time, so Inspect and ``/metrics`` show the same numbers by construction and a
volume's series vanish with it. ``tierdisk_volume_ready{volume}`` has one series per
configured volume from the start (1 serving, 0 still attaching, e.g. waiting for its remote
tier), and the calls of a volume's remote layers are counted here
(:meth:`Metrics.remote_counts`), so they outlive failed attach attempts. Per-request figures
(bytes, request codes, latency) and the ``grpc_server_*`` families (labelled like
go-grpc-prometheus) are observed by the front ends. Counts are sectors or bytes as named;
times are seconds; ratios are left to PromQL.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Iterator
from importlib import metadata
from typing import Protocol

from prometheus_client import CollectorRegistry, Info, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .loop_lag import LAG_BUCKETS
from .loop_metrics import CounterCell, HistogramCell, LoopCounter, LoopHistogram
from .volume import Volume

__all__ = ["EngineCollector", "Metrics", "RemoteCounts", "StatsSource", "VolumeSource"]

LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


RemoteCounts = dict[tuple[str, str], int]
"""Calls a remote layer made to its tier: ``{(RPC name, status code name): calls}``."""

_FROM_ZERO_CODE = "OK"
"""The code whose request counts are exported from 0, before the first such request:
``rate()`` and ``increase()`` take nothing from a series' first sample, so a success
counted only once it happened would leave an error ratio at 1 after a start whose first
calls failed (a tier attaching while its origin was down), until those left the window."""

_IO_OPS = ("read", "write", "unmap", "flush")
"""The ``op`` label values of ``tierdisk_volume_io_requests_total``: each configured volume
has a ``code="OK"`` series of each from the start (:data:`_FROM_ZERO_CODE`)."""

_REMOTE_METHODS = ("GetVolume", "Inspect", "Read", "ReadBatch", "Write", "Unmap", "Flush")
"""The calls of a remote layer whose ``code="OK"`` series of
``tierdisk_remote_requests_total`` are there from the layer's first attach attempt
(:data:`_FROM_ZERO_CODE`): those the error-ratio alert and panel divide by."""


class VolumeSource(Protocol):
    """The volumes of a server (its :class:`~tierdisk.service.registry.VolumeRegistry`)."""

    def names(self) -> list[str]:
        """Every configured volume name, in config order (fixed for the server's life)."""
        ...

    def ready_volumes(self) -> list[Volume]:
        """The volumes open and serving, in config order."""
        ...


class StatsSource(Protocol):
    """Anything that adds its own metric families at scrape time (e.g. the NBD server)."""

    def collect_metrics(self) -> Iterable[Metric]: ...


class EngineCollector(Collector):
    """Yields the per-volume, per-layer engine counters and gauges at scrape time.

    ``tierdisk_volume_ready`` has a series for every configured volume, ready or not; the
    other engine families cover the ready volumes. ``tierdisk_remote_requests_total`` comes
    from ``remote``: ``{(volume, layer index): counts}``, kept across attach attempts.
    """

    def __init__(self, volumes: VolumeSource, remote: dict[tuple[str, int], RemoteCounts]) -> None:
        self._volumes = volumes
        self._remote = remote
        self.extra: list[StatsSource] = []

    def collect(self) -> Iterator[Metric]:
        lk = ["volume", "layer", "kind"]
        reads = CounterMetricFamily(
            "tierdisk_layer_reads",
            "Read calls into a layer: one per contiguous run of "
            "still-missing sectors it is asked for.",
            labels=lk,
        )
        read_sectors = CounterMetricFamily(
            "tierdisk_layer_read_sectors", "Sectors a layer supplied to reads.", labels=lk
        )
        vl = ["volume", "layer"]
        hits = CounterMetricFamily(
            "tierdisk_cache_hits", "Sectors a read_cache layer had when asked.", labels=vl
        )
        misses = CounterMetricFamily(
            "tierdisk_cache_misses", "Sectors a read_cache layer lacked when asked.", labels=vl
        )
        fills = CounterMetricFamily(
            "tierdisk_cache_fills", "Sectors written into a read cache by fills.", labels=vl
        )
        fill_errors = CounterMetricFamily(
            "tierdisk_cache_fill_errors", "Failed read-cache fill calls.", labels=vl
        )
        present = GaugeMetricFamily(
            "tierdisk_layer_present_sectors", "Sectors a layer itself holds.", labels=lk
        )
        size = GaugeMetricFamily(
            "tierdisk_volume_sectors", "Volume size in sectors.", labels=["volume"]
        )
        sector_bytes = GaugeMetricFamily(
            "tierdisk_volume_sector_size_bytes",
            "Bytes per sector of the volume.",
            labels=["volume"],
        )
        remote = CounterMetricFamily(
            "tierdisk_remote_requests",
            "Calls a remote layer made to its tier, by method and gRPC status code "
            "(attach attempts of a volume still waiting for its tier included).",
            labels=["volume", "layer", "method", "code"],
        )
        verifier_changes = CounterMetricFamily(
            "tierdisk_write_verifier_changes",
            "Times the volume's write verifier changed: a flush failed in a write-path "
            "layer's storage, a remote tier lost writes it had acknowledged, or (counted at "
            "start) the server's last run did not stop cleanly (not for a run whose write path "
            "was ram only: it lost its writes at every stop; nor one that served the volume "
            "read-only: it acknowledged no write). Writes acknowledged before may be "
            "lost; clients that made them are told at their next flush (WritesLost). 0 for a "
            "volume not open yet.",
            labels=["volume"],
        )
        ready = GaugeMetricFamily(
            "tierdisk_volume_ready",
            "1 when the configured volume is open and serving, 0 while it is not "
            "(attaching: e.g. waiting for its remote tier; requests get UNAVAILABLE) "
            "or a layer refuses all I/O until a restart (e.g. its remote volume was "
            "re-created with another geometry).",
            labels=["volume"],
        )
        volumes = self._volumes.ready_volumes()
        serving = {volume.name for volume in volumes if not volume.problem}
        opened = {volume.name for volume in volumes}
        for name in self._volumes.names():
            ready.add_metric([name], 1 if name in serving else 0)
            if name not in opened:  # from 0, so the change counted when it opens is a rise
                verifier_changes.add_metric([name], 0)
        for (name, index), counts in sorted(self._remote.items()):
            from_zero = {(method, _FROM_ZERO_CODE): 0 for method in _REMOTE_METHODS}
            for (method, code), n in sorted((from_zero | counts).items()):
                remote.add_metric([name, str(index), method, code], n)
        for volume in volumes:
            size.add_metric([volume.name], volume.sector_count)
            sector_bytes.add_metric([volume.name], volume.sector_size)
            verifier_changes.add_metric([volume.name], volume.verifier_changes)
            for index, entry in enumerate(volume.entries):
                layer, stats = entry.layer, entry.stats
                labels = [volume.name, str(index), layer.kind]
                reads.add_metric(labels, stats.reads)
                read_sectors.add_metric(labels, stats.read_sectors)
                present.add_metric(labels, layer.present_sectors)
                if entry.read_cache:
                    short = labels[:2]
                    hits.add_metric(short, stats.cache_hits)
                    misses.add_metric(short, stats.cache_misses)
                    fills.add_metric(short, stats.cache_fills)
                    fill_errors.add_metric(short, stats.cache_fill_errors)
        yield from (
            reads,
            read_sectors,
            hits,
            misses,
            fills,
            fill_errors,
            present,
            size,
            sector_bytes,
            verifier_changes,
            ready,
            remote,
        )
        for source in self.extra:
            yield from source.collect_metrics()


class Metrics:
    """Every metric of one server, registered in ``self.registry`` (fresh per instance).

    ``volumes`` gives the configured volume names (the only ``volume`` label values besides
    ``""``) and the volumes ready at each scrape.
    """

    def __init__(self, volumes: VolumeSource) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # process_* (CPU, memory, fds, start time: an alert tells runs apart by the latter)
        ProcessCollector(registry=r)
        self._configured = frozenset(volumes.names())
        self._remote_counts: dict[tuple[str, int], RemoteCounts] = {}
        self.engine = EngineCollector(volumes, self._remote_counts)
        r.register(self.engine)
        self.io_bytes = LoopCounter(
            "tierdisk_volume_io_bytes",
            "Bytes moved by volume I/O requests.",
            ["volume", "op"],
            registry=r,
        )
        self.io_requests = LoopCounter(
            "tierdisk_volume_io_requests",
            "Volume I/O requests by outcome (gRPC code name).",
            ["volume", "op", "code"],
            registry=r,
        )
        self.io_duration = LoopHistogram(
            "tierdisk_io_duration_seconds",
            "Time to serve a volume I/O request.",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.loop_lag = LoopHistogram(
            "tierdisk_event_loop_lag_seconds",
            "How much later than asked the server's event loop ran a timer, sampled every "
            "0.1 s: ~0 when free; the length of a stall when work held it (every request of "
            "every client waits then, and their own durations do not show it).",
            [],
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.remote_duration = LoopHistogram(
            "tierdisk_remote_request_duration_seconds",
            "Time of calls remote layers make to their tier.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        gl = ["grpc_type", "grpc_service", "grpc_method"]
        self.grpc_started = LoopCounter(
            "grpc_server_started", "RPCs started on the server.", gl, registry=r
        )
        self.grpc_handled = LoopCounter(
            "grpc_server_handled",
            "RPCs completed on the server, regardless of success.",
            [*gl, "grpc_code"],
            registry=r,
        )
        self.grpc_msg_received = LoopCounter(
            "grpc_server_msg_received",
            "Request messages received by the server: 1 per unary or server-streaming call, "
            "1 per message of a client stream.",
            gl,
            registry=r,
        )
        self.grpc_msg_sent = LoopCounter(
            "grpc_server_msg_sent",
            "Response messages sent by the server: 1 per unary call that completed OK, "
            "1 per message of a server stream.",
            gl,
            registry=r,
        )
        self.grpc_seconds = LoopHistogram(
            "grpc_server_handling_seconds",
            "Time to handle an RPC until it completed.",
            gl,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Label children of the per-request families, looked up once per label set, keyed
        # by the name a request gave; the third item is the volume label (_io_cells_for).
        self._io_cells: dict[tuple[str, str, str], tuple[CounterCell, HistogramCell, str]] = {}
        self._io_bytes_cells: dict[tuple[str, str], CounterCell] = {}
        for name in self._configured:  # from 0 (_FROM_ZERO_CODE)
            for op in _IO_OPS:
                self._io_cells_for(name, op, _FROM_ZERO_CODE)
        build = Info("tierdisk_build", "Versions this server runs.", registry=r)
        build.info(
            {
                "version": _version("tierdisk"),
                "grpcio": _version("grpcio"),
                "python": platform.python_version(),
            }
        )

    def observe_io(
        self, volume: str, op: str, code: str, nbytes: int, seconds: float, requests: int = 1
    ) -> None:
        """Count one volume I/O request (``op``: read, write, unmap, flush) for the volume
        name ``volume`` the request gave, whatever became of it; or ``requests`` of them
        that moved ``nbytes`` in all and each took ``seconds`` (a ``ReadBatch``'s ranges).

        The names of configured volumes become ``volume`` label values, whether the volume
        is ready or still attaching (its ``UNAVAILABLE`` answers count under its name), and
        also for a call refused before the lookup (draining, a bad hop chain). Any other
        name is counted under ``volume=""``, so the label stays bounded by the config
        whatever names clients send. The check costs nothing per call for a configured
        name: it runs when a label set is first seen (:meth:`_io_cells_for`)."""
        cells = self._io_cells.get((volume, op, code))
        if cells is None:
            cells = self._io_cells_for(volume, op, code)
        cells[0].inc(requests)
        if nbytes:
            moved = self._io_bytes_cells.get((cells[2], op))
            if moved is None:
                moved = self._io_bytes_cells[cells[2], op] = self.io_bytes.labels(cells[2], op)
            moved.inc(nbytes)
        cells[1].observe(seconds, requests)

    def _io_cells_for(
        self, volume: str, op: str, code: str
    ) -> tuple[CounterCell, HistogramCell, str]:
        """The cells of a label set :meth:`observe_io` has not cached: those of ``volume``
        if it is configured (cached under its name from then on), else those of
        ``volume=""`` (cached under ``""`` only, so that names clients make up do not grow
        the cache either)."""
        if volume in self._configured:
            key = (volume, op, code)
        else:
            key = ("", op, code)
            cells = self._io_cells.get(key)
            if cells is not None:
                return cells
        cells = self._io_cells[key] = (
            self.io_requests.labels(key[0], op, code),
            self.io_duration.labels(op),
            key[0],
        )
        return cells

    def observe_remote(self, method: str, code: str, seconds: float) -> None:
        """Time one call a remote layer made (it counts the call in :meth:`remote_counts`)."""
        self.remote_duration.labels(method).observe(seconds)

    def remote_counts(self, volume: str, layer: int) -> RemoteCounts:
        """The call counts of layer ``layer`` (index, 0 = top) of configured volume
        ``volume``, exported as ``tierdisk_remote_requests_total``: the same dict for every
        attach attempt of the volume, so the calls of failed attempts (also timed in
        ``tierdisk_remote_request_duration_seconds``) stay counted and the counter never
        goes back. The server hands it to each remote layer it builds."""
        return self._remote_counts.setdefault((volume, layer), {})

    def forget_volume(self, volume: str) -> None:
        """Drop the per-request series of a volume that is no longer served."""
        for counter in (self.io_bytes, self.io_requests):
            for labels in counter.label_sets():
                if labels[0] == volume:
                    counter.remove(*labels)
        for key in [k for k in self._io_cells if k[0] == volume]:
            del self._io_cells[key]
        for short in [k for k in self._io_bytes_cells if k[0] == volume]:
            del self._io_bytes_cells[short]
        for layer in [k for k in self._remote_counts if k[0] == volume]:
            del self._remote_counts[layer]


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"
