"""The ``remote`` layer: a volume of another tierdisk service, so services stack into tiers.

Built on :class:`tierdisk.client.AsyncClient`. Config options (DESIGN.md §4):

``target``, ``volume``
    The other service's address (``host:port`` or ``unix:/path``) and its volume's name.
``mode``
    ``"disk"`` (default): the remote volume is a whole disk, every sector present; it
    cannot be a ``read_cache``. ``"layer"``: presence is what the remote reports (Read, or
    for the runs of one request ReadBatch, with ``report_presence``; GetAllocation for
    :meth:`~RemoteLayer.presence`), so sectors the remote volume holds nowhere fall through
    to the layers below this one; a writable remote in layer mode can be a ``read_cache``
    (fills are Writes with ``no_overwrite``).
    Its ``present_sectors`` (Inspect, ``tierdisk_layer_present_sectors``) is the remote
    volume's whole map read in the background when asked, every 10 s at most, or a hundred
    times as long as the last read took (an origin of a million runs takes seconds).
``timeout``
    Seconds per call (default 10), retries included; each chunk of a large read or write
    is a call. Attach (GetVolume) uses ``min(timeout, 2)`` s and no retries, so a tier
    that is down is reported at once and the server retries the volume in the background.
``retries``
    Further attempts after the first on ``UNAVAILABLE`` or ``CANCELLED`` (default 3), with
    exponential backoff and full jitter (the client library's
    :class:`~tierdisk.client.RetryPolicy`), for the requests of this server's own clients
    (gRPC, NBD) and its own work (attach aside: resize watch, flushes at a stop). A request
    another tier sent (its ``tierdisk-hops`` chain names a tier before this one) is tried
    once here: the tier that sent it retries it, so in a chain only the tier nearest the
    client retries, rather than every tier inside the retries of the one above (with the
    origin of host → regional → origin down, a read at the host cost 4 x 4 calls at the
    origin per attempt of its caller; now 4).
``tls``, ``ca_file``, ``cert_file``, ``key_file``, ``server_name``
    ``tls = true`` connects with TLS: ``ca_file`` (PEM) replaces the system roots,
    ``cert_file`` + ``key_file`` (PEM) present a client certificate, ``server_name``
    overrides the name the server's certificate is checked against (and the ``:authority``).
    The certificate files need ``tls = true``.
``token``, ``token_file``
    Sent with every call as ``authorization: Bearer <token>`` (``token_file``: the file's
    content, whitespace stripped). At most one of the two.
``nbd``
    The remote server's NBD export (its ``[server] nbd`` address, ``host:port`` or
    ``unix:/path``; or ``"auto"``: the address the target's server gives as ``Inspect`` path
    ``nbd/address``, asked at attach and at each reconnect, a listener on every interface
    reached on ``target``'s host; a target without an NBD export is said once at info level
    and asked again every minute; default ``""``, off: see below why). Reads then go over NBD
    (:mod:`..nbd_client`): per MiB the origin spends ~60-70% and this side's receive ~25% of
    a gRPC ``Read``'s CPU (``bench/README.md``, "Reads over NBD between tiers"); everything else
    (attach, writes, fills, flush, unmap, resize, the resize watch) stays on gRPC. Only in
    ``mode = "disk"`` (NBD carries no presence) and without a token (NBD carries none); with
    ``tls = true`` the NBD reads use TLS too (``NBD_OPT_STARTTLS``), with the same
    ``ca_file``, ``cert_file``/``key_file`` and ``server_name``, and an export that does
    not do TLS is then not used (never clear text). NBD is only ever a faster way to the same
    bytes: a read the NBD connection cannot serve (not connected yet, broken, an error answer, a
    range past the export's size as negotiated) is read over gRPC instead, which answers with
    the remote's exact error; a broken connection is remade in the background with backoff. No
    answer within ``timeout`` is ``DEADLINE_EXCEEDED`` at once, as over gRPC, for every read
    then in flight on that connection (and the connection is remade). The export must be the
    volume: it must be served by the same server process as ``target`` (the export's
    ``NBD_INFO_DESCRIPTION`` ends with its server's id, which must be the one the target
    gives as ``Inspect`` path ``server``: an address of another server or of
    this one is refused, with the reason in ``inspect``), an export smaller than the remote
    volume is not used, and after each resize of the remote the connection is remade to learn
    the new size. NBD reads carry no ``tierdisk-hops`` chain, so the loop and depth guard
    (:mod:`..hops`) does not see them: the server check keeps the NBD path from looping back to
    this server, and a loop of tiers is refused when its volumes attach together (over gRPC),
    but a loop formed later (a tier restarted with its remote pointing back at one reading it
    over NBD) goes round over NBD until ``timeout``, where over gRPC the first read is refused
    at once; this, and the connection each layer holds to the target's export (one of its
    ``nbd_max_connections``), is why ``nbd`` is off unless asked for. They are counted as method
    ``NbdRead`` in ``tierdisk_remote_requests_total`` (codes ``OK``, ``UNAVAILABLE`` for a
    connection that failed, ``DEADLINE_EXCEEDED``, ``INTERNAL`` for an error answer);
    ``inspect`` shows the connection under ``nbd`` (with ``problem``: why it is not used, ""
    when it is, and ``checked_s_ago``: how old that is; a connection that breaks is seen at
    once, and the reason is sought anew when the resize watch reconnects, i.e. the target
    answers again).

Geometry (size, sector size, disk id, read-only, FUA, unmap behaviour) comes from the
remote's GetVolume at attach, so ``[ram, remote]`` inherits the origin's size, and the
smallest size the remote volume has had from its Inspect (``smallest_sector_count``): the
layer keeps the layers below it hidden past that size, so a shrink made through it (or on
its origin) still hides their old data after this server restarts (DESIGN.md §3); while it
runs, every size it applies reaches the volume's overlaps at once (a resize listener), as
the top's does. Afterwards
the layer follows the remote's size and guards the rest of its geometry, as
:mod:`.remote_geometry` describes: a background task follows the remote's ``WatchResize`` and
keeps :attr:`sector_count` current (attach waits for its stream to start; :meth:`resize`
takes the new size from it, in the remote's order), and a remote volume re-created with
another sector size or disk id makes every I/O of the layer fail with
:class:`~..errors.FailedPrecondition` until this server restarts (``inspect`` shows it as
``problem``). The check costs the I/O path one attribute test.

A remote that shrank before its ``WatchResize`` event arrived answers ``OUT_OF_RANGE`` to a
read (or presence) of sectors inside the size this layer still knows. A layer smaller than the
volume never fails a read there (DESIGN.md §3): the layer asks the remote's size and applies
it as the watch would (:meth:`.remote_geometry.GeometryFollower.refreshed_size`) and retries
within it, so the sectors past the new end come from below or read as zeros. A size that
keeps changing under the retries (3 tries) is :class:`~..errors.Unavailable`.

Unmap: in disk mode, or where nothing below this layer shows through, ``Unmap`` is
forwarded. In layer mode over lower data the sectors are written as zeros instead, because
the remote might drop them and let the lower data show through (DESIGN.md §3).

Every call carries the ``tierdisk-hops`` chain (:func:`tierdisk.service.hops.outgoing`), so
a loop or too deep a chain of tiers fails fast with ``FAILED_PRECONDITION`` naming it. The
channel keeps alive with pings and reconnects by itself after the remote restarts (gRPC
reconnect backoff from 0.1 s up to 2 s), so no local restart is needed.

Data moves in whole runs: one request per run, split only into chunks of the client's
``max_io`` (1 MiB, the measured sweet spot) with 4 chunk requests in flight; data is copied
once, from the reply into the caller's buffer. The runs of one read (the holes of a
fragmented layer above, which the engine asks together: :meth:`RemoteLayer.read_runs`) go in
``ReadBatch`` calls, up to 256 runs and ``max_io`` bytes each, over gRPC (in layer mode
asking for presence, as a ``Read`` does); an origin older than ``ReadBatch`` (or, in layer
mode, than presence in it) gets a ``Read`` per run (found at the first batch). Reads of
different requests never share a call (each carries its own request's hop chain and
deadline, and fails only for its own range).
Failures of the client library map onto the service's domain errors in one table,
:data:`ERROR_MAP`, with the target in the message.

:attr:`RemoteLayer.request_counts` counts calls to the remote by (RPC, status code) and is
exported as ``tierdisk_remote_requests_total``; the server replaces it, before attach, with
the counts it keeps for the volume's layer, so the calls of failed attach attempts stay
counted, and sets :attr:`RemoteLayer.on_request` to time them into
``tierdisk_remote_request_duration_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import grpc

from tierdisk.client import errors as client_errors
from tierdisk.client.aio import AsyncClient, AsyncVolume
from tierdisk.client.chunking import (
    DEFAULT_IN_FLIGHT,
    DEFAULT_MAX_IO,
    Chunk,
    plan_chunks,
    run_bounded,
    sectors_per_chunk,
)
from tierdisk.client.models import UnmapBehavior as ClientUnmapBehavior
from tierdisk.client.models import VolumeInfo
from tierdisk.client.retry import RetryPolicy

from .. import errors, hops
from ..layer import Layer, LayerMetadata, UnmapBehavior
from ..ratelimit import RateLimitedLog
from ..runs import Run, complement, dense_groups, merge, subtract
from .remote_connect import (
    BACKOFF,
    MAX_BACKOFF,
    connect,
    credentials,
    hop_metadata,
)
from .remote_errors import ERROR_MAP, MAX_REMOTE_MESSAGE, Translate, domain_error
from .remote_geometry import GeometryFollower
from .remote_nbd import NbdDataPath

__all__ = ["ERROR_MAP", "MAX_REMOTE_MESSAGE", "MODES", "RemoteLayer", "domain_error"]

log = logging.getLogger(__name__)

MODES = ("disk", "layer")

ATTACH_TIMEOUT = 2.0
"""Longest wait, in seconds, for the remote's GetVolume at attach (no retries there)."""

_PRESENT_REFRESH = 10.0  # seconds between refreshes of present_sectors (layer mode), at least
_PRESENT_COST_SHARE = 0.01
"""The most of its time a layer-mode remote's present_sectors refresh may take: it reads the
remote volume's whole allocation map, which an origin of a million runs takes seconds to
compute; the next refresh waits at least the last one's time divided by this."""
_GROUP_NEAR_BYTES = 1 << 20
"""Runs asked about in one ``GetAllocation`` may lie this close together whatever their
size (:meth:`RemoteLayer.presence_of_runs`)."""
_SIZE_TRIES = 3  # refreshes of the size after OUT_OF_RANGE within one read or presence call
_WARNED_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED")
"""Failed calls worth a (rate-limited) warning: the tier is down or slow."""

_UNMAP: dict[ClientUnmapBehavior, UnmapBehavior] = {
    ClientUnmapBehavior.ZEROES: UnmapBehavior.ZEROES,
    ClientUnmapBehavior.IGNORED: UnmapBehavior.IGNORED,
    ClientUnmapBehavior.ANY: UnmapBehavior.ANY,
    ClientUnmapBehavior.UNSPECIFIED: UnmapBehavior.ANY,
}


class RemoteLayer(Layer):
    """Volume ``volume`` of the tierdisk server at ``target`` (options: module docstring).

    The keywords are not config options: ``max_io`` is the largest request payload in bytes,
    ``max_in_flight`` the number of chunk requests of one large call in flight at once
    (positive, used as given; default :data:`~tierdisk.client.chunking.DEFAULT_IN_FLIGHT`,
    4), as for :class:`~tierdisk.client.AsyncClient`."""

    kind = "remote"

    def __init__(
        self,
        target: str,
        volume: str,
        mode: str = "disk",
        timeout: float = 10.0,
        retries: int = 3,
        tls: bool = False,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        server_name: str | None = None,
        token: str | None = None,
        token_file: str | None = None,
        nbd: str = "",
        *,
        max_io: int = DEFAULT_MAX_IO,
        max_in_flight: int = DEFAULT_IN_FLIGHT,
    ) -> None:
        super().__init__()
        if not target or not volume:
            raise ValueError("a remote layer needs a target and a volume")
        if mode not in MODES:
            raise ValueError(f'mode must be "disk" or "layer", not {mode!r}')
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        if retries < 0:
            raise ValueError(f"retries must not be negative, not {retries}")
        if max_in_flight <= 0:
            raise ValueError(f"max_in_flight must be positive, not {max_in_flight}")
        if not tls and (ca_file or cert_file or key_file or server_name):
            raise ValueError("ca_file, cert_file, key_file and server_name need tls = true")
        if bool(cert_file) != bool(key_file):
            raise ValueError("cert_file and key_file go together (a client certificate)")
        if token is not None and token_file is not None:
            raise ValueError("give token or token_file, not both")
        if nbd and mode != "disk":
            raise ValueError('nbd needs mode = "disk" (NBD carries no presence)')
        if nbd and (token is not None or token_file is not None):
            raise ValueError("nbd cannot be combined with a token (NBD carries none)")
        self.target = target
        self.remote_volume = volume
        self.mode = mode
        self.timeout = float(timeout)
        self.retries = retries
        self.tls = tls
        self._ca_file = ca_file
        self._cert_file = cert_file
        self._key_file = key_file
        self._server_name = server_name
        self._token = token
        self._token_file = token_file
        self._nbd = (
            NbdDataPath(
                nbd,
                target=target,
                volume=volume,
                where=self._where,
                owner=lambda: self.owner,
                timeout=self.timeout,
                wait=min(self.timeout, ATTACH_TIMEOUT),
                remote=self._volume,
                size=lambda: self._sector_count * self._sector_size,
                observe=self._observe,
                tls=tls,
                ca_file=ca_file,
                cert_file=cert_file,
                key_file=key_file,
                server_name=server_name,
            )
            if nbd
            else None
        )
        self._max_io = max_io
        self._max_in_flight = max_in_flight
        self._errors = Translate(lambda: self._where)
        self._no_batch = False  # the remote answered ReadBatch UNIMPLEMENTED (read_runs)
        self._client: AsyncClient | None = None
        self._vol: AsyncVolume | None = None
        self._info: VolumeInfo | None = None
        self._home_chain = ""
        self._smallest = 0  # the remote volume's smallest size (set at attach)
        self._geometry = GeometryFollower(
            where=lambda: self._where,
            owner=lambda: self.owner,
            timeout=self.timeout,
            remote=self._volume,
            apply=self._set_size,
            smallest=lambda: self.smallest_size,
            resumed=self._remote_back,
            refused=self._remote_changed,
            log=log,
        )
        """Follows the remote's size and guards its geometry; every I/O tests its
        :attr:`~.remote_geometry.GeometryFollower.checked` (the only cost on its path)."""
        self._present = 0
        self._present_at = -_PRESENT_REFRESH
        self._present_every = _PRESENT_REFRESH  # seconds (_PRESENT_COST_SHARE)
        self._present_task: asyncio.Task[None] | None = None
        self._call_log = RateLimitedLog(log)  # failed calls: can repeat on every request
        self._failing = False  # a failed call was logged, and no call answered since
        self.owner = ""
        """Where the layer serves, for its log lines (``"volume 'vm1', layer 2: "``; set by
        the server): two volumes over one origin log alike otherwise."""
        self.request_counts: dict[tuple[str, str], int] = {}
        """Calls made to the remote, by (RPC name, status code name); only ever added to (the
        server may set it to a dict shared by every attach attempt of the volume)."""
        self._answered_at: float | None = None  # monotonic time of the last call answered OK
        self._last_failure: tuple[str, str, float] | None = None  # (RPC, code, monotonic time)
        self.on_request: Callable[[str, str, float], None] | None = None
        """Called with (RPC name, status code name, seconds) after every call (set by the
        server to :meth:`Metrics.observe_remote`); WatchResize streams are counted only."""

    @property
    def _where(self) -> str:
        """Names the remote in messages."""
        return f"remote {self.target} volume {self.remote_volume!r}"

    # -- life cycle -----------------------------------------------------------------------

    async def attach(self, lower: LayerMetadata | None) -> None:
        # Calls made outside a request (attach, the resize follower, background refreshes)
        # carry this server's own id, as captured now.
        self._home_chain = hops.outgoing()
        client = connect(
            self.target,
            credentials(
                tls=self.tls,
                ca_file=self._ca_file,
                cert_file=self._cert_file,
                key_file=self._key_file,
                token=self._token,
                token_file=self._token_file,
            ),
            timeout=self.timeout,
            server_name=self._server_name,
            max_io=self._max_io,
            max_in_flight=self._max_in_flight,
            metadata_factory=partial(hop_metadata, self._home_chain),
            on_call=self._on_call,
        )
        vol = client.volume(self.remote_volume)
        try:
            attach_timeout = min(self.timeout, ATTACH_TIMEOUT)
            try:
                with self._errors:
                    info = await vol.info(timeout=attach_timeout)
                    smallest = await _smallest_of(vol, attach_timeout)
            except errors.DeadlineExceeded:
                raise errors.Unavailable(
                    f"{self._where}: no answer within {attach_timeout:g} s"
                ) from None
            self._set_geometry(info.sector_size, info.sector_count, info.physical_sector_size)
            self._smallest = info.sector_count if smallest is None else smallest
        except BaseException:
            await client.close()
            raise
        client.policy = RetryPolicy(retries=self.retries, backoff=BACKOFF, max_backoff=MAX_BACKOFF)
        client.policy_factory = partial(_policy_now, client.policy)
        self._client, self._vol, self._info = client, vol, info
        try:
            if self.mode == "layer":
                self._present_at = time.monotonic()
                with contextlib.suppress(client_errors.TierdiskError):
                    await self._refresh_present(attach_timeout)  # best effort: a diagnostic
            await self._geometry.start(
                info.sector_size,
                info.disk_id,
                wait=attach_timeout,
                name=f"watch-resize {self.target}/{self.remote_volume}",
            )
            if self._geometry.refusal is not None:  # re-created between GetVolume and now
                raise errors.Unavailable(
                    f"{self._where}: its geometry changed while this layer attached; attaching anew"
                )
            if self._nbd is not None:
                await self._nbd.start()
        except BaseException:  # failed or cancelled: stop what started (the engine closes
            await self.close()  # only layers whose attach returned)
            raise

    async def close(self) -> None:
        if self._present_task is not None:
            self._present_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._present_task
            self._present_task = None
        await self._geometry.close()
        if self._nbd is not None:
            await self._nbd.close()
        if self._client is not None:
            await self._client.close()
            self._client = None

    # -- hooks ----------------------------------------------------------------------------

    def _remote_back(self) -> None:
        """The resize watch (re)connected: the target answers again, so NBD may too, and
        ``ReadBatch`` (a target restarted may be a newer tierdisk)."""
        self._no_batch = False
        if self._nbd is not None:
            self._nbd.retry_now()

    async def _remote_changed(self, problem: str) -> None:
        """The remote volume's geometry changed: every I/O is refused from now on."""
        self._found_problem(problem)  # the server logs it, naming the volume
        if self._nbd is not None:
            await self._nbd.refuse(f"not used: {problem}")

    def _on_call(self, rpc: str, code: grpc.StatusCode, seconds: float) -> None:
        """The client's observer of each call it made (``on_call``)."""
        self._observe(rpc, code.name, seconds)

    def _observe(self, rpc: str, code: str, seconds: float) -> None:
        """Count an answer of the remote (``code``, a status code name) to a call ``rpc`` or
        an NBD read (``NbdRead``) and follow its health: failing, answering again."""
        key = (rpc, code)
        self.request_counts[key] = self.request_counts.get(key, 0) + 1
        if code == "OK":
            self._answered_at = time.monotonic()
            if self._failing and rpc != "WatchResize":
                self._failing = False
                self._call_log.ended("%s%s: answers again (%s OK)", self.owner, self._where, rpc)
        elif rpc != "WatchResize":  # (a watch that ends is followed again: not a failed call)
            self._last_failure = (rpc, code, time.monotonic())
        if self.on_request is not None and rpc != "WatchResize":
            self.on_request(rpc, code, seconds)
        # (NbdRead failures are logged by the NBD data path, which says what happens next;
        # those of an attach by the server, which names the volume and retries it.)
        attached = self._info is not None
        if attached and code in _WARNED_CODES and rpc not in ("WatchResize", "NbdRead"):
            retried = (
                f"the client retries UNAVAILABLE up to {self.retries} times"
                if code == "UNAVAILABLE"
                else "not retried"
            )
            self._failing = True
            self._call_log.warning(
                "%s%s: %s answered %s after %.3f s (%s)",
                self.owner,
                self._where,
                rpc,
                code,
                seconds,
                retried,
            )

    # -- geometry and capabilities --------------------------------------------------------

    def _remote(self) -> VolumeInfo:
        assert self._info is not None, "remote layer used before attach"
        return self._info

    def _volume(self) -> AsyncVolume:
        assert self._vol is not None, "remote layer used before attach or after close"
        return self._vol

    @property
    def disk_id(self) -> bytes | None:
        return self._remote().disk_id or None

    @property
    def fua_respected(self) -> bool:
        return self._remote().fua_respected

    @property
    def reports_lost_writes(self) -> bool:
        return True  # the origin's write verifier: flush raises WritesLost

    @property
    def keeps_writes(self) -> bool:
        return not self._remote().volatile  # as the origin volume says (at attach)

    @property
    def read_only(self) -> bool:
        return self._remote().read_only

    @property
    def unmap_behavior(self) -> UnmapBehavior:
        return _UNMAP[self._remote().unmap_behavior]

    @property
    def optimal_unmap_sectors(self) -> int:
        return max(1, self._remote().optimal_unmap_sectors)

    @property
    def zeros_cost_per_sector(self) -> bool:
        return self.mode == "layer"  # zeros kept present are written to the origin (unmap)

    @property
    def can_read_cache(self) -> bool:
        """In ``layer`` mode, unless the remote volume is read-only (before attach, when that
        is not known yet: ``mode`` alone decides)."""
        return self.mode == "layer" and not (self._info is not None and self._info.read_only)

    @property
    def read_cache_refusal(self) -> str:
        if self.mode != "layer":
            return 'a remote layer in mode = "disk" holds every sector (mode = "layer" can)'
        if not self.can_read_cache:
            return f"the remote volume {self.remote_volume!r} is read-only"
        return ""

    @property
    def can_resize(self) -> bool:
        return not self.read_only

    @property
    def smallest_size(self) -> int:
        """The remote volume's smallest size (its Inspect ``smallest_sector_count`` at
        attach, lowered by every size seen since): what the remote's own top records, so
        a shrink of the remote volume (through this layer or on its origin) keeps the
        local layers below it hidden past the old end after a restart of this server."""
        return min(self._smallest, self._sector_count)

    @property
    def present_sectors(self) -> int:
        if self.mode == "disk":
            return self._sector_count
        # Layer mode: the last count fetched from the remote, refreshed in the background
        # when older than a few seconds, or more for a remote whose map takes long to read
        # (Inspect and metric scrapes ask for it).
        if (
            time.monotonic() - self._present_at > self._present_every
            and self._present_task is None
            and self._client is not None
        ):
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # asked from outside the event loop: no refresh
                return self._present
            self._present_at = time.monotonic()
            self._present_task = loop.create_task(self._refresh_later())
        return self._present

    async def _refresh_present(self, seconds: float | None = None) -> None:
        if self._geometry.refusal is not None:
            return
        vol = self._volume()
        started = time.monotonic()
        extents = await vol.allocation(0, self._sector_count, timeout=seconds or self.timeout)
        took = time.monotonic() - started  # (a failure says nothing of the cost: not counted)
        self._present_every = max(_PRESENT_REFRESH, took / _PRESENT_COST_SHARE)
        self._present = sum(e.sector_count for e in extents if e.depth >= 0)

    async def _refresh_later(self) -> None:
        try:
            await self._refresh_present()
        except client_errors.TierdiskError as exc:
            log.debug("%s%s: present sector count not refreshed: %s", self.owner, self._where, exc)
        finally:
            self._present_task = None

    # -- I/O ------------------------------------------------------------------------------

    def _clip(self, sector: int, count: int) -> int:
        """Sectors of ``[sector, sector + count)`` inside the remote's current size (a lower
        remote that shrank supplies nothing past its end, instead of failing the read)."""
        return max(0, min(count, self._sector_count - sector))

    async def read(self, buf: memoryview, sector: int) -> list[Run]:
        if not self._geometry.checked:
            await self._geometry.check()
        ss = self._sector_size
        count = self._clip(sector, len(buf) // ss)
        if count == 0:
            return []
        if self._nbd is not None and await self._nbd.read(buf[: count * ss], sector * ss):
            return [(sector, sector + count)]
        vol = self._volume()
        try:
            with self._errors:
                if self.mode == "layer":
                    return await self._read_present(buf, sector, count)
                await vol.read_into(sector, buf[: count * ss])  # one copy, from the reply
        except errors.OutOfRange as exc:  # inside the size known: the remote shrank
            return await self._after_shrink(exc, sector, len(buf) // ss, self._read_some(buf))
        return [(sector, sector + count)]

    async def read_runs(self, reads: list[tuple[memoryview, int]]) -> list[Run]:
        """Several runs of one request (the holes of a fragmented layer above) in as few
        ``ReadBatch`` calls as they fit (:meth:`_send_batch`), instead of a call each. Where
        :meth:`_batches` says no, for one run, and after a batch that reached past the
        remote's end (it shrank), each run is read alone: :meth:`read` then supplies each
        run's part within the new size."""
        if len(reads) == 1 or not self._batches():
            return await super().read_runs(reads)
        if not self._geometry.checked:
            await self._geometry.check()
        ss = self._sector_size
        wanted = [(view, sector, self._clip(sector, len(view) // ss)) for view, sector in reads]
        wanted = [(view, sector, count) for view, sector, count in wanted if count]
        if not wanted:
            return []
        ranges = [(sector, sector + count) for _, sector, count in wanted]
        views = [view[: count * ss] for view, _, count in wanted]
        held = await self._send_batch(ranges, views)
        if held is None:
            return await super().read_runs(reads)
        return held

    def _batches(self) -> bool:
        """Whether reads may go to the remote in ``ReadBatch`` calls: over gRPC (not
        ``nbd``), to a remote that serves them (in layer mode, with presence)."""
        return self._nbd is None and not self._no_batch

    async def _send_batch(self, runs: list[Run], views: list[memoryview]) -> list[Run] | None:
        """Read ``runs`` (sorted, disjoint) into ``views`` in ``ReadBatch`` calls
        (:meth:`AsyncVolume.read_batch_into`; in layer mode
        :meth:`~AsyncVolume.read_batch_present_into`, whose unheld sectors come as zeros,
        as in :meth:`_read_present`): the runs the remote holds; None when each should be
        read alone (a range reached past the remote's end: it shrank; or the remote is
        older than ``ReadBatch``, or than presence in it: said once, and not asked again
        until its resize watch reconnects); any other failure raised."""
        vol = self._volume()
        ranges = [(a, b - a) for a, b in runs]
        unimplemented = False
        try:
            with self._errors:
                try:
                    if self.mode == "disk":
                        await vol.read_batch_into(ranges, views)
                        return runs
                    extents = await vol.read_batch_present_into(ranges, views)
                except client_errors.Unimplemented:
                    unimplemented = True
        except errors.OutOfRange:  # inside the size known: the remote shrank
            return None
        if unimplemented:
            if not self._no_batch:  # (batches in flight meanwhile learn it too)
                self._no_batch = True
                log.info(
                    "%s%s: the remote does not serve ReadBatch%s: the runs of a read go in a "
                    "call each until it reconnects",
                    self.owner,
                    self._where,
                    " with presence (a tierdisk from before commit f972819)"
                    if self.mode == "layer"
                    else " (a tierdisk older than 2026-11-27)",
                )
            return None
        # Only what was asked for (the remote clips its answer to the ranges; a remote
        # that did not would otherwise make sectors outside them look held).
        return subtract(runs, subtract(runs, merge([(e.sector, e.end) for e in extents])))

    def _read_some(self, buf: memoryview) -> Callable[[int, int], Awaitable[list[Run]]]:
        """:meth:`read` of the first ``count`` sectors of ``buf`` from ``sector``, over gRPC."""

        async def read(sector: int, count: int) -> list[Run]:
            if self.mode == "layer":
                return await self._read_present(buf, sector, count)
            await self._volume().read_into(sector, buf[: count * self._sector_size])
            return [(sector, sector + count)]

        return read

    async def _read_present(self, buf: memoryview, sector: int, count: int) -> list[Run]:
        """Layer mode: read with report_presence straight into ``buf``; the runs the remote
        holds. The sectors it does not hold come as zeros, which is harmless: the engine
        asks deeper layers for them next, into the same place, and zeroes what none holds."""
        extents = await self._volume().read_present_into(sector, buf[: count * self._sector_size])
        end = sector + count
        return merge(
            [(a, b) for e in extents if (a := max(e.sector, sector)) < (b := min(e.end, end))]
        )

    async def presence(self, sector: int, count: int) -> list[Run]:
        if not self._geometry.checked:
            await self._geometry.check()
        wanted, count = count, self._clip(sector, count)
        if count == 0:
            return []
        if self.mode == "disk":
            return [(sector, sector + count)]
        try:
            with self._errors:
                return await self._held(sector, count)
        except errors.OutOfRange as exc:  # inside the size known: the remote shrank
            return await self._after_shrink(exc, sector, wanted, self._held)

    async def presence_of_runs(self, runs: list[Run]) -> list[Run]:
        """In layer mode, one :meth:`presence` (a ``GetAllocation``, which the client asks in
        windows when the range has more extents than one reply carries) over each group of
        runs that lie close together (:func:`~tierdisk.service.runs.dense_groups`: a span at
        most twice their sectors, or 1 MiB), clipped to them, instead of a round trip per
        run: the holes of a fragmented layer above made an allocation walk thousands of
        calls in a row, while a span over runs far apart would list every extent between."""
        if self.mode == "disk":
            return await super().presence_of_runs(runs)
        held: list[Run] = []
        for group in dense_groups(runs, max(1, _GROUP_NEAR_BYTES // self._sector_size)):
            lo, hi = group[0][0], group[-1][1]
            found = await self.presence(lo, hi - lo)
            held += found if len(group) == 1 else subtract(found, complement(lo, hi, group))
        return held

    async def _held(self, sector: int, count: int) -> list[Run]:
        """Layer mode: the runs of ``[sector, sector + count)`` the remote holds."""
        extents = await self._volume().allocation(sector, count)
        return merge([(e.sector, e.end) for e in extents if e.depth >= 0])

    async def write(self, data: memoryview, sector: int, fua: bool) -> None:
        if not self._geometry.checked:
            await self._geometry.check()
        with self._errors:
            await self._volume().write(sector, data, fua=fua)

    async def write_no_overwrite(self, data: memoryview, sector: int) -> int:
        """A ``Write`` with ``no_overwrite``; the remote does not say how many sectors it
        stored, so this returns all of them (an upper bound for the fill counter)."""
        if not self._geometry.checked:
            await self._geometry.check()
        if not self.can_read_cache:
            return await super().write_no_overwrite(data, sector)
        with self._errors:
            await self._volume().write(sector, data, no_overwrite=True)
        return len(data) // self._sector_size

    async def unmap(
        self, sector: int, count: int, block_level_only: bool, next_is_zero: bool
    ) -> None:
        if not self._geometry.checked:
            await self._geometry.check()
        if count == 0 or self.unmap_behavior == UnmapBehavior.IGNORED:
            return
        vol = self._volume()
        with self._errors:
            if self.mode == "disk" or next_is_zero:
                await vol.unmap(sector, count, block_level_only=block_level_only)
                return
            # Layer mode over layers that may hold data: the remote could drop the sectors
            # (its own bottom has nothing below), letting lower data show through. Keep
            # them present as zeros instead.
            await self._write_zeros(vol, sector, count)

    async def _write_zeros(self, vol: AsyncVolume, sector: int, count: int) -> None:
        per_chunk = sectors_per_chunk(self._max_io, self._sector_size)
        zeros = bytes(min(count, per_chunk) * self._sector_size)
        view = memoryview(zeros)

        async def one(chunk: Chunk) -> None:
            await vol.write(chunk.sector, view[: chunk.sector_count * self._sector_size])

        await run_bounded(plan_chunks(sector, count, per_chunk), one, self._max_in_flight)

    async def flush(self) -> None:
        if not self._geometry.checked:
            await self._geometry.check()
        with self._errors:
            await self._volume().flush()

    async def resize(self, sector_count: int) -> None:
        if not self._geometry.checked:
            await self._geometry.check()
        if self.read_only:
            raise errors.ReadOnlyError(f"{self._where} is read-only: cannot resize it")
        mark = self._geometry.mark()
        with self._errors:
            info = await self._volume().resize(sector_count)
        self._info = info
        size = info.sector_count
        if not self._geometry.watching:
            self._set_size(size)  # the next stream's first event says the size anew
        elif size != self._sector_count and not await self._geometry.wait_for_size(size, mark):
            # The watch did not bring it: a new stream, or a late one. The reply may be
            # older than what the layer has; the remote's size now, applied only if newer
            # than what the watch applied, is not.
            try:
                await self._geometry.refreshed_size()
            except errors.FailedPrecondition:  # the remote changed: not in its units
                raise
            except errors.TierdiskError:  # the remote is away: the reply, till the watch
                self._set_size(size)  # is back and says the size anew

    def _set_size(self, sector_count: int) -> None:
        self._smallest = min(self._smallest, sector_count)
        if sector_count != self._sector_count:
            self._sector_count = sector_count
            self._notify_resized()
            if self._nbd is not None:
                self._nbd.size_changed()

    async def _after_shrink(
        self,
        exc: errors.OutOfRange,
        sector: int,
        count: int,
        call: Callable[[int, int], Awaitable[list[Run]]],
    ) -> list[Run]:
        """A read or presence call of ``[sector, sector + count)``, clipped to the size this
        layer knew, was refused as out of range (``exc``): the remote shrank. ``call`` it
        again within the remote's size now (the follower's
        :meth:`~.remote_geometry.GeometryFollower.refreshed_size`), so what lies past the new
        end is left to the layers below (or zeros), as for any lower layer smaller than the
        volume (DESIGN.md §3). A size that keeps changing is UNAVAILABLE (retry)."""
        for _ in range(_SIZE_TRIES):
            size = await self._geometry.refreshed_size()
            inside = max(0, min(count, size - sector))
            if inside == 0:
                return []
            try:
                with self._errors:
                    return await call(sector, inside)
            except errors.OutOfRange as again:
                exc = again
        raise errors.Unavailable(
            f"{self._where}: its size kept changing while a request was fitted to it ({exc})"
        )

    # -- diagnostics ----------------------------------------------------------------------

    def inspect(self) -> dict[str, Any]:
        counts: dict[str, dict[str, int]] = {}
        for (rpc, code), n in sorted(self.request_counts.items()):
            counts.setdefault(rpc, {})[code] = n
        state = self._client.connectivity().name if self._client is not None else "CLOSED"
        now = time.monotonic()
        failure = self._last_failure
        return {
            "target": self.target,
            "remote_volume": self.remote_volume,
            "mode": self.mode,
            "connection": state,
            "watching_resizes": self._geometry.watching,
            # why the layer refuses all I/O ("" while it does not): its remote changed geometry
            "problem": str(refusal) if (refusal := self._geometry.refusal) is not None else "",
            "tls": self.tls,
            "timeout": self.timeout,
            "retries": self.retries,
            "requests": counts,
            # How long ago the remote last answered a call, and the last call that failed:
            # a remote that stopped answering (SIGSTOP, a hung host) can look READY above.
            "last_answer_seconds_ago": (
                None if self._answered_at is None else round(now - self._answered_at, 3)
            ),
            "last_failure": (
                None
                if failure is None
                else {
                    "rpc": failure[0],
                    "code": failure[1],
                    "seconds_ago": round(now - failure[2], 3),
                }
            ),
            **({"nbd": self._nbd.inspect()} if self._nbd is not None else {}),
        }


_TRIED_ONCE = RetryPolicy(retries=0, backoff=BACKOFF, max_backoff=MAX_BACKOFF)


def _policy_now(own: RetryPolicy) -> RetryPolicy:
    """The retry policy of a call made now: ``own`` (the layer's ``retries``), but none for
    a call made for a request another tier sent, which that tier retries (module docs)."""
    return own if len(hops.current_chain.get()) < 2 else _TRIED_ONCE


async def _smallest_of(vol: AsyncVolume, seconds: float) -> int | None:
    """The smallest size ``vol`` has had (its Inspect path ``smallest_sector_count``), or
    None from a tierdisk that does not report it (it refuses the path)."""
    try:
        node = await vol.inspect("smallest_sector_count", timeout=seconds)
    except client_errors.InvalidArgument:
        return None
    value = node.get("value")
    return value if isinstance(value, int) and value >= 0 else None
