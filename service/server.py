"""The tierdisk server: volumes opened from config, served over gRPC (and NBD), with health,
reflection, metrics and a graceful stop.

Start: bind the gRPC address exclusively (``grpc.so_reuseport = 0``; an address in use is a
start error naming it), start ``/metrics``, open every volume. A volume whose layers cannot
reach their tier yet (``Unavailable``) keeps retrying in the background with exponential
backoff (capped at 10 s) and answers ``UNAVAILABLE`` meanwhile, naming the latest reason;
health stays ``NOT_SERVING`` until every volume is open. A config error in a stack stops the
start, and so does a remote tier that answers at start but refuses the volume (most often a
mistake in this config, best seen at once).

While a volume attaches in the background, whether it goes on is decided by who said no
(:mod:`~tierdisk.service.attach_retry`): an answer of the remote tier that can change
without this server changing (no such volume there, credentials refused, not a tierdisk
server, a storage error there, the hop guard's refusal of a loop:
:mod:`~tierdisk.service.hops`) is retried like an unreachable tier, logged at error level
(rate-limited); a problem of this server's own (a construction rule broken, e.g. a sector
size that differs from the remote's; a local layer that cannot be opened) is not: the
volume stays not ready, naming the problem, until the server is restarted with the problem
fixed. A problem a layer finds once serving (:attr:`Layer.problem`, e.g. its remote
volume re-created with another geometry: it refuses all I/O until a restart) turns health
``NOT_SERVING`` too.

Stop (:meth:`Server.stop`): health goes ``NOT_SERVING``, calls not yet started are answered
``UNAVAILABLE``, calls in flight finish (up to ``grace`` seconds), every volume is flushed
and closed, then the transport stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from tierdisk.v1 import blockdevice_pb2

from . import hops
from .attach_retry import BackgroundAttaches
from .backoff import Backoff
from .config import Config, VolumeConfig, sector_size_problem
from .drain import DrainGate
from .errors import ConfigError, DeadlineExceeded, Unavailable
from .failure_log import StorageFailureLog
from .grpc_api import BlockDeviceService
from .grpc_handlers import add_to_server
from .kept_files import check_kept_files, served_by
from .layers import build_layer
from .loop_lag import LoopLagMonitor
from .metrics import Metrics, RemoteCounts
from .metrics_http import MetricsEndpoint
from .nbd import NbdServer, NbdStats, start_nbd_server
from .nbd_metrics import NbdMetrics
from .netaddr import AddressInUse, bind_failure, claim_unix_path
from .registry import VolumeRegistry
from .rpc_metrics import InstrumentedRegistry
from .tls_files import nbd_tls_context
from .verifier_store import VerifierStore, new_verifier
from .volume import LayerEntry, Volume

__all__ = ["MIN_PING_INTERVAL_MS", "SERVICE_NAME", "Server"]

log = logging.getLogger(__name__)

SERVICE_NAME = blockdevice_pb2.DESCRIPTOR.services_by_name["BlockDevice"].full_name
_CAP_FACTOR = 4  # message cap = 4 * max_io + 1 MiB: the size check answers, not the transport
MAX_PENDING_CALLS = 20_000
"""Calls gRPC may hold for the server at once (each a few KiB) before it answers new ones
CANCELLED: enough for a burst of thousands of concurrent small calls on one connection."""
MIN_PING_INTERVAL_MS = 10_000
"""The most often (milliseconds apart) a client may send keepalive pings on a connection that
carries no data, e.g. along an idle ``WatchResize``; more often and gRPC ends the connection
("too many pings"). The client library (30 s) and remote layers (15 s) ping less often."""


@runtime_checkable
class _ReportsRequests(Protocol):
    """A layer that calls another tier and reports each call (the remote layer)."""

    on_request: Callable[[str, str, float], None] | None
    request_counts: RemoteCounts
    owner: str


class Server:
    """One tierdisk server process's worth of state. ``await start()``, then ``stop()``."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.registry = VolumeRegistry([v.name for v in config.volumes])
        self.metrics = Metrics(self.registry)
        self.gate = DrainGate()
        self._loop_lag = LoopLagMonitor(self.metrics.loop_lag.labels())
        self.health = health.aio.HealthServicer()
        self.grpc_address = ""
        self.metrics_address = ""
        self.nbd_address = ""
        self.nbd_tls = False  # the NBD export requires TLS ([server] nbd_tls_cert)
        self.server_id = ""
        self._grpc: grpc.aio.Server | None = None
        self._metrics_http: MetricsEndpoint | None = None
        self._nbd: NbdServer | None = None
        self._nbd_metrics: NbdMetrics | None = None
        self._failures = StorageFailureLog()  # requests failed in storage, both front ends
        self._attaching = BackgroundAttaches(  # volumes whose tier was down at start
            self.registry,
            build=self._build,
            serve=self._serve,
            update_health=self._update_health,
            stopped=lambda: self._stopped,
            log=log,
        )
        self._health_updates: set[asyncio.Task[None]] = set()
        self._stopped = False
        self._verifiers: VerifierStore | None = None
        self._marking: asyncio.Future[None] | None = None  # VerifierStore.mark_unclean
        self._owners: asyncio.Future[dict[str, set[str]]] | None = None  # kept_files.served_by
        self._to_mark: set[str] = set()  # volumes to mark before they are served
        self._serving = False  # the start finished: every volume serves or attaches
        self._crashes_counted: set[str] = set()  # volumes counted unclean at this start
        self.unflushed: list[str] = []
        """The volumes whose final flush failed at the stop (:meth:`stop`), also when the
        stop ended a start (:meth:`start` cancelled)."""

    # -- start ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind, open volumes (retrying unreachable tiers in the background), serve.

        Raises :class:`ConfigError` for a broken volume and :class:`AddressInUse` for an
        address that cannot be bound; nothing is left running then. Cancelled (stopped while
        starting: ``tierdisk serve`` on a signal), it stops as :meth:`stop` does without a
        grace period, flushing the volumes opened so far (they may have taken writes), and
        closing them and every layer attached.
        """
        try:
            # A task of its own: the server id _start records for its attach tasks
            # (hops.server_identity) stays out of the caller's context, where a client or
            # another in-process server would send it on as if it were theirs.
            await asyncio.create_task(self._start())
        except asyncio.CancelledError:
            await self.stop(grace=0)
            raise
        except BaseException:
            # Volumes opened before the failure may have taken writes: flushed, so that a
            # refused start (a config error in another volume) leaves them stopped cleanly.
            await self.stop(grace=0)
            raise

    async def _start(self) -> None:
        cfg = self.config.server
        try:
            os.makedirs(cfg.data_dir, exist_ok=True)  # DESIGN.md §4: created when missing
        except OSError as exc:
            raise ConfigError(f"cannot create data_dir {cfg.data_dir}: {exc.strerror}") from None
        self._verifiers = await asyncio.to_thread(
            VerifierStore.open, cfg.data_dir, [v.name for v in self.config.volumes]
        )
        cap = _CAP_FACTOR * cfg.max_io + (1 << 20)
        self._grpc = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", cap),
                ("grpc.max_send_message_length", cap),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
                # Calls gRPC holds before the server takes them; past the soft limit (1,000 by
                # default) it cancels new ones, so a burst of many small calls got CANCELLED.
                ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
                ("grpc.server.max_pending_requests_hard_limit", 2 * MAX_PENDING_CALLS),
            ],
        )
        # Bind first, so the id in hop chains names the real address (not port 0).
        self.grpc_address = self._bind_grpc(cfg.listen)
        self.server_id = hops.new_server_id(self.grpc_address)
        hops.server_identity.set(self.server_id)
        service = BlockDeviceService(
            self.registry,
            self.metrics,
            max_io=cfg.max_io,
            server_id=self.server_id,
            gate=self.gate,
            extra_inspect=self._extra_inspect,
            failures=self._failures,
        )
        handlers = InstrumentedRegistry(self._grpc, self.metrics)
        add_to_server(service, handlers)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, handlers)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
            ),
            handlers,
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._loop_lag.start()
        if cfg.metrics:
            self._metrics_http = MetricsEndpoint(self.metrics.registry)
            await self._metrics_http.start(cfg.metrics)
            self.metrics_address = self._metrics_http.address
        await self._grpc.start()
        results = await asyncio.gather(
            *(self._open_volume(v) for v in self.config.volumes), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        if cfg.nbd:
            self._nbd_metrics = NbdMetrics(self.metrics, NbdStats())
            self._nbd = await start_nbd_server(
                cfg.nbd,
                self.registry,
                max_io=cfg.max_io,
                stats=self._nbd_metrics.stats,
                server_id=self.server_id,
                max_connections=cfg.nbd_max_connections,
                tls=nbd_tls_context(cfg),  # the files again: a ConfigError naming one
                failures=self._failures,
            )
            self.nbd_address = self._nbd.address
            self.nbd_tls = self._nbd.tls is not None
        await self._update_health()
        self._serving = True
        log.info(
            "serving %d volume(s) on %s (metrics %s%s)",
            len(self.config.volumes),
            self.grpc_address,
            self.metrics_address or "off",
            f", nbd {self.nbd_address}" if self.nbd_address else "",
        )

    def _extra_inspect(self, volume: str) -> dict[str, Any]:
        """What the server adds to a volume's ``Inspect`` tree: its own id (``server``: which
        process answers; a remote layer checks its NBD export against it) and NBD figures."""
        extra: dict[str, Any] = {"server": self.server_id}
        if self._nbd_metrics is not None:
            extra.update(self._nbd_metrics.inspect(volume))
            extra["nbd"]["address"] = self.nbd_address  # where remote layers with nbd = "auto" go
            extra["nbd"]["tls"] = self.nbd_tls  # TLS required (a remote layer's reads use none)
            extra["nbd"]["tls_client_certificates"] = bool(self.config.server.nbd_tls_ca)
        return extra

    def _bind_grpc(self, address: str) -> str:
        assert self._grpc is not None
        if address.startswith("unix:"):
            claim_unix_path(address[5:], "gRPC")
        try:
            port = self._grpc.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if port == 0:
            # gRPC gives no reason: the unix path was claimed above, so it is not in use.
            why = "not available" if address.startswith("unix:") else bind_failure(address)
            raise AddressInUse(f"cannot bind gRPC address {address}: {why}")
        if address.startswith("unix:"):
            return address
        host = address.rpartition(":")[0]
        return f"{host}:{port}"

    async def _open_volume(self, config: VolumeConfig) -> None:
        """Open ``config`` now, or keep trying in the background while its tier is down."""
        try:
            volume = await self._build(config)
        except (Unavailable, DeadlineExceeded) as exc:
            self.registry.set_waiting(config.name, f"a remote tier is not reachable ({exc})")
            log.warning("volume %r: %s; retrying in the background", config.name, exc)
            self._attaching.start(config)
            return
        await self._serve(volume)

    async def _serve(self, volume: Volume) -> None:
        """Serve ``volume`` under its write verifier (the store marks every volume unclean
        before it is served: :meth:`_mark_unclean`; stopped meanwhile, the volume is
        closed). A problem one of its layers finds later (:attr:`Layer.problem`: it refuses
        all I/O until a restart) turns health ``NOT_SERVING`` and the volume's
        ``tierdisk_volume_ready`` 0."""
        store = self._verifiers
        if store is not None:  # kept over a clean stop (verifier_store)
            # Written with the mark: a crash of this run is then judged by this run's stack.
            store.kept_writes[volume.name] = not volume.lost_at_exit
            if volume.read_only:  # no write to lose: a crash of this run is no unclean stop
                store.read_only.add(volume.name)
            try:
                await self._mark_unclean(store, volume.name)
            except BaseException:
                await volume.close()
                raise
            # New unless the last run stopped cleanly and kept its writes (the store drew the
            # others); an older build's entry does not say, so judged by the stack now.
            kept = store.verifiers[volume.name]
            unknown = volume.name in store.loss_unknown and volume.lost_at_exit
            volume.write_verifier = new_verifier(kept) if unknown else kept
            # A ram-only write path loses its writes at every stop: no warning for a run
            # that had one (an older build's entry does not say: judged by the stack now).
            crashed_keeping = store.unclean.get(volume.name, False)
            if crashed_keeping is None:
                crashed_keeping = not volume.lost_at_exit
            if crashed_keeping:
                which = (
                    "a run before the last (whose start was refused or stopped)"
                    if volume.name in store.untold
                    else "the last run"
                )
                log.warning(
                    "volume %r: %s did not stop cleanly (a crash, a kill, a final flush "
                    "that failed, or a stop that could not record its end in %s: that "
                    "run's log says which): writes it acknowledged but had not flushed may "
                    "be lost; "
                    "its write verifier changed, so each client that made such writes is "
                    "told at its next flush",
                    volume.name,
                    which,
                    store.path,
                )
                volume.count_verifier_change()
                self._crashes_counted.add(volume.name)
        self.registry.set_ready(volume)

        def found(problem: str) -> None:
            log.error("volume %r is not serving until a restart: %s", volume.name, problem)
            task = asyncio.ensure_future(self._update_health())
            self._health_updates.add(task)
            task.add_done_callback(self._health_updates.discard)

        for entry in volume.entries:
            entry.layer.add_problem_listener(found)

    async def _mark_unclean(self, store: VerifierStore, name: str) -> None:
        """:meth:`VerifierStore.mark_unclean` for the volume ``name``, off the event loop;
        volumes opening while a write is under way share the next one."""
        self._to_mark.add(name)
        while name not in store.marked and store.usable:
            if self._marking is None or self._marking.done():
                batch = sorted(self._to_mark - store.marked)
                self._marking = asyncio.ensure_future(asyncio.to_thread(store.mark_unclean, batch))
            await asyncio.shield(self._marking)

    async def _build(self, config: VolumeConfig) -> Volume:
        store = self._verifiers
        if store is not None:  # never an empty layer for a lost file (read if not usable)
            if self._owners is None:  # once per start (realpath of every recorded file)
                self._owners = asyncio.ensure_future(
                    asyncio.to_thread(served_by, store.served_files())
                )
            found = await asyncio.to_thread(
                check_kept_files,
                config,
                await asyncio.shield(self._owners),
                store.recorded_files(config.name),
                store.path,
                store.recorded_paths(config.name, "stack"),
                store.recorded_paths(config.name, "left"),
            )
            store.files[config.name] = found.to_record
            store.stacks[config.name], store.left[config.name] = found.stack, found.left
            for index, path in found.returned:
                log.warning(
                    "volume %r: layer %d is at %s, which left the volume's stack in an "
                    "earlier start: if the layers below it took writes since, its older data "
                    "(or a read cache's copies) hides them now; to start it empty, stop the "
                    "server and delete the file (and the files beside it)",
                    config.name,
                    index,
                    path,
                )
            if found.dropped:
                log.warning(
                    "volume %r: no layer of its stack is at %s, which it was served from "
                    "before: unless that file was moved to a path of the stack, what was "
                    "written there is not part of the volume now (the file is left as it is)",
                    config.name,
                    ", ".join(found.dropped),
                )
        entries = []
        for index, layer in enumerate(config.layers):
            try:
                built = build_layer(layer)
            except (TypeError, ValueError) as exc:
                raise ConfigError(str(exc), volume=config.name, layer=index) from None
            if isinstance(built, _ReportsRequests):  # a remote layer: count and time its calls
                # The same counts for every attempt: calls of failed attaches stay counted.
                built.request_counts = self.metrics.remote_counts(config.name, index)
                built.on_request = self.metrics.observe_remote
                built.owner = f"volume {config.name!r}, layer {index}: "
            entries.append(LayerEntry(built, layer.read_cache, layer.write_through))
        # The attach's calls, and the background calls its remote layers start, carry the
        # chain of this volume (hops module docs: a loop is a volume reached twice).
        chain = hops.current_chain.set((hops.hop_id(self.server_id, config.name),))
        try:
            volume = await Volume.open(config.name, entries, read_only=config.read_only)
        finally:
            hops.current_chain.reset(chain)
        # its sector size may come from an existing layer or a remote origin, unseen at load
        problem = sector_size_problem(volume.sector_size, self.config.server.max_io)
        if problem is not None:
            await volume.close()
            raise ConfigError(f"its sector size {problem}", volume=config.name)
        return volume

    async def _update_health(self) -> None:
        if self._stopped:
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.registry.all_ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    # -- stop -----------------------------------------------------------------------------

    @staticmethod
    async def _final_flush(volume: Volume) -> bool:
        """Flush ``volume`` at a stop; False (logged) when it failed. A remote tier that
        answers ``UNAVAILABLE`` is asked again for up to :data:`_FINAL_FLUSH_PATIENCE`
        seconds: one that just restarted is back within that, before this server's channel
        to it has reconnected.

        A volume with no write at stake (:func:`_nothing_at_stake`) is flushed too (its
        local layers' files are checked: their failures come first, ``Durability``), but a
        tier that does not answer (``UNAVAILABLE``, ``DEADLINE_EXCEEDED``) is asked once and
        logged as a warning, not a failure: a tier stopped while its origin is down stops
        cleanly."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _FINAL_FLUSH_PATIENCE
        backoff = Backoff(0.1, 1.0)
        while True:
            try:
                await volume.flush()
                return True
            except (Unavailable, DeadlineExceeded) as exc:
                failure: Exception = exc
                if _nothing_at_stake(volume):
                    log.warning(
                        "volume %r: a tier did not answer the flush at shutdown (%s); nothing "
                        "was written since the volume's last flush, so no write is at stake",
                        volume.name,
                        exc,
                    )
                    return True
                wait = backoff.next()
                if isinstance(exc, Unavailable) and loop.time() + wait < deadline:
                    await asyncio.sleep(wait)
                    continue
            except Exception as exc:
                failure = exc
            log.error("volume %r: flush at shutdown failed: %s", volume.name, failure)
            return False

    async def stop(self, grace: float = 30.0) -> list[str]:
        """Stop serving: refuse new calls, finish calls in flight, flush, close. Idempotent.

        Returns the names of the volumes whose final flush failed (logged; the others are
        still flushed and closed; also kept in :attr:`unflushed`): writes acknowledged since
        their last Flush may not be durable. Empty when every flush succeeded, or on a second
        call. The volumes are flushed together, so tiers that do not answer cost the stop
        their patience (:meth:`_final_flush`) once, not once each."""
        if self._stopped:
            return []
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        self._attaching.cancel()
        drained = await self.gate.drain(grace)
        if not drained:
            log.warning("calls still in flight after %.0f s; stopping anyway", grace)
        if self._nbd is not None:
            await self._nbd.close()
        volumes = self.registry.ready_volumes()
        flushed = await asyncio.gather(*(self._final_flush(v) for v in volumes))
        self.unflushed = [v.name for v, ok in zip(volumes, flushed, strict=True) if not ok]
        for volume in volumes:
            failures = await volume.close()
            if failures and volume.name not in self.unflushed:  # (a file gone since a look)
                log.error("volume %r: flush at shutdown failed: %s", volume.name, failures[0])
                self.unflushed.append(volume.name)
            self.metrics.forget_volume(volume.name)
        if self._marking is not None:  # (its thread must be done before close's)
            await asyncio.wait([self._marking])
        if self._verifiers is not None:
            # Clean: drained and flushed (verifier_store; a volume never served keeps its entry).
            # A ram-only write path loses its writes now, clean or not: the next start
            # gives it a new verifier, whatever its config is then.
            served = {v.name: v.write_verifier for v in volumes}
            self._verifiers.kept_writes.update({v.name: not v.lost_at_exit for v in volumes})
            clean = set(served) - set(self.unflushed) if drained else set()
            # A start refused (or stopped) after counting a crash: no server showed the
            # count for long; the next start counts it again (verifier_store crash_untold).
            untold = set() if self._serving else self._crashes_counted
            await asyncio.to_thread(self._verifiers.close, served, clean, untold)
            self._verifiers = None
        if self._metrics_http is not None:
            await self._metrics_http.close()
        await self._loop_lag.close()
        if self._grpc is not None:
            await self._grpc.stop(0.5)
        await self._attaching.wait()
        return self.unflushed


def _nothing_at_stake(volume: Volume) -> bool:
    """Whether no write of ``volume``'s clients depends on a final flush: none under way (a
    call the stop's grace did not wait out) nor since its last flush that succeeded
    (:attr:`Volume.changed_since_flush`; a read-only volume, one only read or resized),
    and, on a volatile write path (a tier over a ``ram`` origin, which keeps nothing past
    its restart), none since it opened: there the flushed writes are at stake too, and its
    clients learn of the origin's restart only through this volume's write verifier, which
    an unclean stop renews."""
    if volume.changed_since_flush:
        return False
    return not (volume.volatile and volume.changed_since_open)


_FINAL_FLUSH_PATIENCE = 3.0
"""Seconds a final flush keeps retrying a remote tier that answers ``UNAVAILABLE`` (one
that restarted a moment ago: its channel may still be waiting to reconnect, at most 2 s
apart, ``remote_connect.CHANNEL_OPTIONS``). A stop whose remote tiers are gone takes that
much longer (once: the volumes are flushed together)."""
