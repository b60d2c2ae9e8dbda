"""A ``remote`` layer whose remote volume changes under it, against real servers on 127.0.0.1
(in-process; the origin restarts on the same address).

- The origin volume is re-created with another sector size (or disk id): the layer never
  takes the new size in the new units and refuses every I/O (reads over NBD too) with
  FAILED_PRECONDITION naming the change, before its resize watch is back (each I/O checks
  while no watch stream runs) and after (the watch checks when it reconnects); ``inspect``
  shows it.
- The origin shrinks and a read of the cache tier, inside its own volume but past the
  origin's new end, comes before the WatchResize event: the sectors past the end read as
  zeros (DESIGN.md §3), never OUT_OF_RANGE; the size is applied once, in order. The events
  are held back by a WatchResize handler that waits before passing them on (the origin's own
  handler runs), so the race is certain. When it shrank and grew back before that read,
  the tier takes the smallest size first, so the layers below stay hidden past it.
- A remote layer below the top whose volume shrinks and grows back hides the layers below
  it past its smallest size at once, not only after the tier restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from servers import free_port, ram, remote, running_server, toml_volume
from stacks import MapLayer, pattern
from waiting import eventually

from tierdisk.client import AsyncClient, AsyncVolume
from tierdisk.client import errors as cerr
from tierdisk.service.grpc_api import BlockDeviceService
from tierdisk.service.layers.remote_geometry import GeometryFollower
from tierdisk.service.layers.sparse import SparseLayer
from tierdisk.service.volume import LayerEntry, Volume

pytestmark = pytest.mark.timeout(60)

SS = 512
SECTORS = 2048  # 1 MiB
BASE = pattern(3, 0, SECTORS, SS)


def head(listen: str, folder: Path, nbd: str = "") -> str:
    """A ``[server]`` table listening on ``listen`` (and NBD on ``nbd``)."""
    return (
        f'[server]\nlisten = "{listen}"\nmetrics = ""\nnbd = "{nbd}"\n'
        f'data_dir = "{folder / "data"}"\n'
    )


async def health(address: str) -> int:
    """The server's overall health status (``health_pb2.HealthCheckResponse``'s enum)."""
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
        return int(reply.status)


async def volume_ready(metrics_address: str, volume: str) -> float:
    """``tierdisk_volume_ready{volume}`` as ``/metrics`` shows it."""
    url = f"http://{metrics_address}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tierdisk_volume_ready" and sample.labels["volume"] == volume:
                return sample.value
    raise AssertionError(f"no tierdisk_volume_ready for {volume!r}")


# -- the remote volume re-created with another geometry --------------------------------------


@pytest.mark.parametrize("nbd", [False, True], ids=["grpc", "nbd-reads"])
async def test_an_origin_recreated_with_another_sector_size_is_refused(
    tmp_path: Path, nbd: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FINDINGS F1: the origin restarts on the same address with the same volume name and
    byte size but 4096-byte sectors. The cache tier must not shrink its volume 8x nor write
    at 8x the offset: every I/O fails, naming both sector sizes, from the first one after the
    restart on. The new origin's WatchResize streams send nothing (a watch not reconnected
    yet), so the I/O's own check is what refuses."""
    listen = f"127.0.0.1:{free_port()}"
    nbd_at = f"127.0.0.1:{free_port()}" if nbd else ""

    def origin(folder: Path, sector_size: int) -> str:
        return head(listen, folder, nbd_at) + toml_volume(
            "base", ram(f"{SECTORS * SS}", sector_size=sector_size)
        )

    options = {"nbd": nbd_at} if nbd else {}
    body = toml_volume("v", remote(listen, "base", **options))
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(
            running_server(tmp_path / "o1", origin(tmp_path / "o1", 512))
        )
        async with AsyncClient(first.grpc_address) as oc:
            await oc.volume("base").write(0, BASE)
        cache = await stack.enter_async_context(running_server(tmp_path / "cache", body))
        client = await stack.enter_async_context(
            AsyncClient(cache.grpc_address, retries=0, timeout=10)
        )
        vol = client.volume("v")
        assert await vol.read(0, 16) == BASE[: 16 * SS]
        if nbd:
            assert (await vol.inspect("layers/0"))["requests"]["NbdRead"] == {"OK": 1}
        await first.stop(grace=1)

        async def watch_broke() -> bool:
            return not (await vol.inspect("layers/0"))["watching_resizes"]

        await eventually("the resize watch to see the origin go", watch_broke)

        async def silent(
            self: BlockDeviceService, request: Any, context: Any
        ) -> AsyncIterator[Any]:
            await asyncio.Event().wait()  # until the server stops (cancelled then)
            yield None  # pragma: no cover - never reached

        monkeypatch.setattr(BlockDeviceService, "WatchResize", silent)  # for the next origin
        second = await stack.enter_async_context(
            running_server(tmp_path / "o2", origin(tmp_path / "o2", 4096))
        )
        # At once, whether or not the watch reconnected: the I/O checks first.
        new = pattern(9, 8, 8, SS)
        with pytest.raises(cerr.FailedPrecondition) as info:
            await vol.write(8, new)
        message = info.value.message
        assert "4096-byte sectors, not 512" in message and listen in message, message
        assert "restart this server" in message
        for call in (
            lambda: vol.read(0, 16),
            lambda: vol.write(0, new),
            lambda: vol.unmap(0, 8),
            lambda: vol.flush(),
            lambda: vol.resize(SECTORS * 2),
        ):
            with pytest.raises(cerr.FailedPrecondition) as info:
                await call()
            assert "4096-byte sectors, not 512" in info.value.message
        # The size is never taken in the new units, nor the sector size.
        got = await vol.info()
        assert (got.sector_size, got.sector_count) == (512, SECTORS)
        # The volume says why it stopped, where an operator lists volumes
        assert "4096-byte sectors, not 512" in got.problem
        assert got.problem.startswith("layer 0 (remote): "), got.problem
        (listed,) = await client.list_volumes()
        assert listed.problem == got.problem
        listing = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "tierdisk.client", "--server", cache.grpc_address, "volumes"],
            capture_output=True,
            check=True,
        )
        assert listing.stdout.decode() == f"v\t(stopped until a restart: {got.problem})\n"
        tree = await vol.inspect("layers/0")
        assert "4096-byte sectors, not 512" in tree["problem"]
        assert tree["sector_count"] == SECTORS
        assert tree["watching_resizes"] is False  # the I/O found it, not the watch
        if nbd:
            assert tree["requests"]["NbdRead"] == {"OK": 1}  # no read over NBD either
            assert tree["nbd"]["connected"] is False
            assert "4096-byte sectors, not 512" in tree["nbd"]["problem"]
        # Nothing reached the new origin volume.
        async with AsyncClient(second.grpc_address) as oc:
            assert await oc.volume("base").read(0, SECTORS * SS // 4096) == bytes(SECTORS * SS)


async def test_an_origin_replaced_by_another_disk_is_refused_once_the_watch_is_back(
    tmp_path: Path,
) -> None:
    """The origin volume had a disk id at attach; after a restart on the same address the
    volume of that name has none (another disk, same geometry and size). The resize watch
    finds it when it reconnects, with no I/O asked: ``inspect`` names both ids; I/O fails;
    the server's health turns NOT_SERVING and ``tierdisk_volume_ready`` 0 (an operator's
    probes see that it needs a restart)."""
    listen = f"127.0.0.1:{free_port()}"

    def plain(folder: Path) -> str:
        return head(listen, folder) + toml_volume("base", ram(f"{SECTORS * SS}"))

    disk_id = bytes(range(16))
    body = toml_volume("v", remote(listen, "base"))
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(
            running_server(tmp_path / "o1", plain(tmp_path / "o1"))
        )
        double = await Volume.open("base", [LayerEntry(MapLayer(SECTORS, disk_id=disk_id))])
        replaced = first.registry.get("base")
        first.registry.set_ready(double)  # the origin now serves a volume with a disk id
        await replaced.close()
        cache = await stack.enter_async_context(running_server(tmp_path / "cache", body))
        client = await stack.enter_async_context(AsyncClient(cache.grpc_address, retries=0))
        vol = client.volume("v")
        assert (await vol.info()).disk_id == disk_id
        assert cache.metrics_address
        assert await health(cache.grpc_address) == health_pb2.HealthCheckResponse.SERVING
        assert await volume_ready(cache.metrics_address, "v") == 1
        await first.stop(grace=1)
        await stack.enter_async_context(running_server(tmp_path / "o2", plain(tmp_path / "o2")))

        async def refused() -> str:
            return str((await vol.inspect("layers/0")).get("problem", ""))

        problem = await eventually("the layer to find the other disk", refused)
        assert f"disk id (none), not {disk_id.hex()}" in problem, problem
        with pytest.raises(cerr.FailedPrecondition) as info:
            await vol.read(0, 8)
        assert disk_id.hex() in info.value.message
        assert (await vol.inspect("layers/0"))["watching_resizes"] is False  # it stopped

        async def not_serving() -> bool:
            status = await health(cache.grpc_address)
            return bool(status == health_pb2.HealthCheckResponse.NOT_SERVING)

        await eventually("health to turn NOT_SERVING", not_serving)
        assert await volume_ready(cache.metrics_address, "v") == 0


async def test_a_shrink_and_grow_while_the_watch_is_down_still_hides_the_layers_below(
    tmp_path: Path,
) -> None:
    """The origin shrinks and grows back while the cache tier's resize watch is down (the
    origin restarted): when the watch is back, the origin's size looks unchanged, but its
    smallest size is lower. The layer below the remote top must stay hidden past that
    (DESIGN.md §3: shrinking then growing exposes zeros, never stale lower data): the tier
    reads zeros there, as the origin does, not the lower layer's old bytes."""
    listen = f"127.0.0.1:{free_port()}"
    origin_data = tmp_path / "origin"

    def origin_body() -> str:
        return head(listen, origin_data) + toml_volume(
            "base", {"kind": "sparse", "path": "base", "size": f"{SECTORS * SS}"}
        )

    cache_data = tmp_path / "cache" / "data"
    cache_data.mkdir(parents=True)
    (cache_data / "lower.img").write_bytes(b"\xbb" * SECTORS * SS)
    lower = {"kind": "raw", "path": "lower.img", "read_only": True}
    body = toml_volume("v", remote(listen, "base", mode="layer"), lower)
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(running_server(origin_data, origin_body()))
        cache = await stack.enter_async_context(running_server(tmp_path / "cache", body))
        client = await stack.enter_async_context(AsyncClient(cache.grpc_address))
        vol = client.volume("v")
        assert await vol.read(SECTORS - 8, 8) == b"\xbb" * 8 * SS  # the lower layer shows
        await first.stop(grace=1)
        offline = SparseLayer(str(origin_data / "data" / "base"))  # shrunk and grown back
        await offline.attach(None)
        await offline.resize(SECTORS // 2)
        await offline.resize(SECTORS)
        await offline.close()
        await stack.enter_async_context(running_server(origin_data, origin_body()))

        async def hidden() -> bool:
            return await vol.read(SECTORS - 8, 8) == bytes(8 * SS)

        await eventually("the lower layer to be hidden past the origin's smallest size", hidden)
        assert (await vol.info()).sector_count == SECTORS
        assert await vol.read(0, 8) == b"\xbb" * 8 * SS  # below it, it still shows


async def test_a_shrink_between_a_new_streams_first_event_and_its_check_is_applied_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The origin shrinks after its new WatchResize stream computed the first event (the
    old size) and before the layer's check (an Inspect) of that stream: the layer applies
    the newer size once. It applied the smallest size, then the stream's older size, then
    the shrink again: the tier's own watchers saw a grow the origin never made."""
    computed, release = asyncio.Event(), asyncio.Event()
    original = BlockDeviceService.WatchResize

    async def watch(self: BlockDeviceService, request: Any, context: Any) -> AsyncIterator[Any]:
        first = True
        async for event in original(self, request, context):
            if first:
                computed.set()
                await release.wait()  # sent late: the origin shrinks meanwhile
                first = False
            yield event

    monkeypatch.setattr(BlockDeviceService, "WatchResize", watch)
    async with (
        running_server(tmp_path / "origin", toml_volume("base", ram(f"{SECTORS * SS}"))) as o,
        AsyncClient(o.grpc_address) as oc,
    ):
        body = toml_volume("v", remote(o.grpc_address, "base"))
        async with running_server(tmp_path / "cache", body) as cache:
            await asyncio.wait_for(computed.wait(), 30)  # the cache's stream began
            await oc.volume("base").resize(SECTORS // 2)
            release.set()
            async with AsyncClient(cache.grpc_address) as client:
                vol = client.volume("v")

                async def shrunk() -> bool:
                    return (await vol.info()).sector_count == SECTORS // 2

                await eventually("the cache tier to take the shrink", shrunk)
                await asyncio.sleep(0.3)  # any event still to come has come
                assert (await vol.inspect("generation"))["value"] == 1  # one change, no more


# -- the remote volume shrank and the watch has not said so yet --------------------------------


@pytest.fixture
def resize_events_flow(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """While the returned event is clear, every WatchResize stream of a server started from
    now on holds back its events after the first (the current size), as a slow stream
    would; setting it lets them through, in order."""
    flowing = asyncio.Event()
    flowing.set()
    original = BlockDeviceService.WatchResize

    async def watch(self: BlockDeviceService, request: Any, context: Any) -> AsyncIterator[Any]:
        first = True
        async for event in original(self, request, context):
            if not first:
                await flowing.wait()
            first = False
            yield event

    monkeypatch.setattr(BlockDeviceService, "WatchResize", watch)
    return flowing


async def test_a_read_past_an_origin_shrink_not_yet_watched_reads_zeros(
    tmp_path: Path, resize_events_flow: asyncio.Event
) -> None:
    """FINDINGS F5: the origin shrinks to half, and the cache tier reads past the new end
    (inside its own volumes) before the WatchResize event arrives. A lower remote layer must
    supply nothing there, not fail the read with OUT_OF_RANGE; a remote top takes the new
    size once (one generation), and the late event does not apply it again."""
    n, half = 4 * SECTORS, 2 * SECTORS
    data = pattern(4, 0, n, SS)
    zeros = bytes(8 * SS)
    async with running_server(tmp_path / "origin", toml_volume("base", ram(f"{n * SS}"))) as o:
        at = o.grpc_address
        body = (
            toml_volume(
                "cached",
                {"kind": "sparse", "path": "cached", "size": n * SS, "read_cache": True},
                remote(at, "base"),
            )
            + toml_volume("top", remote(at, "base"))
            + toml_volume("layered", ram(f"{n * SS}"), remote(at, "base", mode="layer"))
        )
        async with (
            AsyncClient(at) as oc,
            running_server(tmp_path / "cache", body) as cache,
            AsyncClient(cache.grpc_address, retries=0) as cc,
        ):
            await oc.volume("base").write(0, data)
            top = cc.volume("top")
            generation = (await top.inspect())["generation"]

            resize_events_flow.clear()  # the cache tier hears of no resize from now on
            await oc.volume("base").resize(half)
            assert (await top.info()).sector_count == n  # not told yet
            assert (await cc.volume("cached").inspect("layers/1"))["sector_count"] == n

            cached = cc.volume("cached")
            assert await cached.read(half + 64, 8) == zeros
            assert await cached.read(half - 8, 16) == data[(half - 8) * SS : half * SS] + zeros
            # a remote top: the read (in range when asked) gets zeros, the size follows
            assert await top.read(half + 64, 8) == zeros
            assert (await top.info()).sector_count == half
            assert (await top.inspect())["generation"] == generation + 1
            # presence (GetAllocation) of a layer-mode remote under a larger top
            runs = await cc.volume("layered").allocation(0, n)
            assert [(e.sector, e.sector_count, e.depth) for e in runs] == [
                (0, half, 1),
                (half, n - half, -1),
            ]
            assert await cc.volume("layered").read(half - 8, 16) == (
                data[(half - 8) * SS : half * SS] + zeros
            )

            resize_events_flow.set()  # the held event arrives late: nothing changes again
            await oc.volume("base").resize(n)

            async def grown() -> bool:
                return (await top.info()).sector_count == n

            await eventually("the cache tier to follow the grow", grown)
            assert (await top.inspect())["generation"] == generation + 2
            assert await cached.read(half + 64, 8) == zeros  # the origin grew with zeros


async def test_holes_read_together_past_an_origin_shrink_not_yet_watched_read_zeros(
    tmp_path: Path, resize_events_flow: asyncio.Event
) -> None:
    """The holes of a fragmented top go to the origin in one ``ReadBatch``; when the origin
    shrank and the tier has not heard of it, that batch is refused (OUT_OF_RANGE) and each
    hole is read alone: the part past the new end reads as zeros, as for a single read."""
    n, half = 2 * SECTORS, SECTORS
    data = pattern(6, 0, n, SS)
    async with running_server(tmp_path / "origin", toml_volume("base", ram(f"{n * SS}"))) as o:
        body = toml_volume("v", ram(f"{n * SS}"), remote(o.grpc_address, "base"))
        async with (
            AsyncClient(o.grpc_address) as oc,
            running_server(tmp_path / "cache", body) as tier,
            AsyncClient(tier.grpc_address, retries=0) as cc,
        ):
            await oc.volume("base").write(0, data)
            vol = cc.volume("v")
            expected = bytearray(data)
            for sector in range(0, n, 256):  # the top holds one sector in 256
                mine = pattern(7, sector, 1, SS)
                await vol.write(sector, mine)
                expected[sector * SS : (sector + 1) * SS] = mine
            resize_events_flow.clear()
            await oc.volume("base").resize(half)
            expected[half * SS :] = bytes((n - half) * SS)  # the origin's zeros past its end
            for sector in range(half, n, 256):
                expected[sector * SS : (sector + 1) * SS] = pattern(7, sector, 1, SS)
            assert await vol.read(0, n) == expected


async def test_a_read_that_finds_a_shrink_and_grow_not_yet_watched_hides_the_layers_below(
    tmp_path: Path, resize_events_flow: asyncio.Event
) -> None:
    """The origin shrinks and grows back (not as far) before the cache tier hears of
    either; a read past the new end makes the tier ask the origin's size. It takes the
    smallest size first, as a new watch stream does, so the layer below the remote top
    stays hidden past it (DESIGN.md §3): the tier reads zeros there, as the origin does,
    also after the held events arrive (the shrink's, older, is not applied again)."""
    n, half, most = 4 * SECTORS, 2 * SECTORS, 3 * SECTORS
    cache = tmp_path / "cache"
    (cache / "data").mkdir(parents=True)
    (cache / "data" / "lower.img").write_bytes(b"\xbb" * n * SS)
    lower = {"kind": "raw", "path": "lower.img", "read_only": True}
    async with running_server(tmp_path / "origin", toml_volume("base", ram(f"{n * SS}"))) as o:
        body = toml_volume("v", remote(o.grpc_address, "base", mode="layer"), lower)
        async with (
            AsyncClient(o.grpc_address) as oc,
            running_server(cache, body) as tier,
            AsyncClient(tier.grpc_address, retries=0) as cc,
        ):
            vol, base = cc.volume("v"), oc.volume("base")
            lower_bytes = b"\xbb" * 8 * SS
            assert await vol.read(half, 8) == lower_bytes  # the origin holds nothing there
            resize_events_flow.clear()
            await base.resize(half)
            await base.resize(most)
            assert await vol.read(n - 8, 8) == bytes(8 * SS)  # past the origin's end
            assert (await vol.info()).sector_count == most
            assert await vol.read(half, 8) == bytes(8 * SS)  # hidden past the smallest size
            assert await vol.read(half - 8, 8) == lower_bytes  # below it, it shows
            resize_events_flow.set()
            await base.resize(n)

            async def grown() -> bool:
                return (await vol.info()).sector_count == n

            await eventually("the cache tier to follow the grow", grown)
            assert await vol.read(half, 8) == bytes(8 * SS)
            assert (await vol.inspect("layers/1"))["visible_sector_count"] == half


async def test_a_lower_remote_that_shrank_and_grew_hides_the_layers_below_it(
    tmp_path: Path,
) -> None:
    """``[ram, remote mid (layer mode), remote base]``: the middle volume is shrunk and
    grown back on its origin. While the cache tier runs (not only after its restart), the
    base stays hidden past the middle's smallest size: the tier reads zeros there, as the
    middle volume itself does, never the base's older data (DESIGN.md §3); and what is
    written to the middle volume there afterwards shows at once."""
    body = toml_volume("mid", ram(f"{SECTORS * SS}")) + toml_volume("base", ram(f"{SECTORS * SS}"))
    async with (
        running_server(tmp_path / "origin", body) as o,
        AsyncClient(o.grpc_address) as oc,
    ):
        mid, base = oc.volume("mid"), oc.volume("base")
        await base.write(0, pattern(2, 0, SECTORS, SS))
        await mid.write(0, BASE)
        tier_body = toml_volume(
            "v", ram(), remote(o.grpc_address, "mid", mode="layer"), remote(o.grpc_address, "base")
        )
        async with (
            running_server(tmp_path / "cache", tier_body) as tier,
            AsyncClient(tier.grpc_address) as cc,
        ):
            vol = cc.volume("v")
            assert await vol.read(SECTORS - 8, 8) == BASE[-8 * SS :]
            await mid.resize(SECTORS // 2)
            await mid.resize(SECTORS)
            assert await mid.read(SECTORS - 8, 8) == bytes(8 * SS)

            async def hidden() -> bool:
                return await vol.read(SECTORS - 8, 8) == bytes(8 * SS)

            await eventually("the base to be hidden past the middle's smallest size", hidden)
            layers = (await vol.inspect("layers"))["value"]
            assert [layer["visible_sector_count"] for layer in layers] == [
                SECTORS,
                SECTORS,  # the middle one is not hidden by its own shrink
                SECTORS // 2,
            ]
            assert await vol.read(0, 8) == BASE[: 8 * SS]
            new = pattern(9, SECTORS - 8, 8, SS)
            await mid.write(SECTORS - 8, new)  # written on the origin after the grow: shows
            assert await vol.read(SECTORS - 8, 8) == new


# -- a resize of this tier while another one resizes the origin ------------------------------

N, FIRST, SECOND = 4 * SECTORS, 3 * SECTORS, 2 * SECTORS
"""The origin's size, the cache tier's resize (its reply held), and someone else's, newer."""


@dataclass
class HeldReply:
    """The origin's reply to a ``Resize`` of ``base`` to ``FIRST`` waits (after the resize
    and its WatchResize event) until ``release`` is set; ``held`` is set when it waits."""

    held: asyncio.Event
    release: asyncio.Event


@pytest.fixture
def held_reply(monkeypatch: pytest.MonkeyPatch) -> HeldReply:
    held = HeldReply(asyncio.Event(), asyncio.Event())
    original = BlockDeviceService.Resize

    async def resize(self: BlockDeviceService, request: Any, context: Any) -> Any:
        reply = await original(self, request, context)
        if request.volume == "base" and request.sector_count == FIRST:
            held.held.set()
            await held.release.wait()
        return reply

    monkeypatch.setattr(BlockDeviceService, "Resize", resize)
    return held


@contextlib.asynccontextmanager
async def tier_over_origin(tmp_path: Path) -> AsyncIterator[tuple[AsyncVolume, AsyncVolume]]:
    """An origin (``base``, ``N`` sectors) and a cache tier whose volume ``top`` is a remote
    layer over it: (the origin's ``base``, the tier's ``top``), each through a client."""
    async with running_server(tmp_path / "origin", toml_volume("base", ram(f"{N * SS}"))) as o:
        body = toml_volume("top", remote(o.grpc_address, "base"))
        async with (
            AsyncClient(o.grpc_address) as oc,
            running_server(tmp_path / "cache", body) as cache,
            AsyncClient(cache.grpc_address, retries=0) as cc,
        ):
            yield oc.volume("base"), cc.volume("top")


async def test_a_resize_reply_overtaken_by_a_newer_resize_does_not_bring_its_size_back(
    tmp_path: Path, held_reply: HeldReply
) -> None:
    """The cache tier resizes its remote top to ``FIRST``; before the origin's reply reaches
    it, someone else resizes the origin to ``SECOND``, and the cache tier's resize watch
    applies both, in order. The late reply must not put ``FIRST`` back: the tier keeps
    ``SECOND``, the origin's size. (The reply is held on the origin, after its resize and
    its WatchResize event, so the race is certain.)"""
    async with tier_over_origin(tmp_path) as (base, top):
        ours = asyncio.create_task(top.resize(FIRST))
        await asyncio.wait_for(held_reply.held.wait(), 10)
        await base.resize(SECOND)

        async def followed() -> bool:
            return (await top.info()).sector_count == SECOND

        await eventually("the cache tier to follow the newer resize", followed)
        held_reply.release.set()
        await asyncio.wait_for(ours, 10)
        assert (await base.info()).sector_count == SECOND
        assert (await top.info()).sector_count == SECOND
        assert (await top.inspect("layers/0"))["sector_count"] == SECOND


async def test_a_resize_reply_overtaken_while_the_watch_reconnects_keeps_the_newer_size(
    tmp_path: Path, held_reply: HeldReply, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, but the cache tier's resize watch is down when it sends its ``Resize``, and
    reconnects after someone else's newer resize: its first event is the newer size, and
    the event of the tier's own resize never comes. The late reply must not put the older
    size back (nor wait for an event that cannot come): the tier keeps the origin's size."""
    streams_may_start, end_streams = asyncio.Event(), asyncio.Event()
    streams_may_start.set()
    original_watch = BlockDeviceService.WatchResize

    async def watch(self: BlockDeviceService, request: Any, context: Any) -> AsyncIterator[Any]:
        await streams_may_start.wait()
        events = original_watch(self, request, context).__aiter__()
        ended = asyncio.ensure_future(end_streams.wait())
        try:
            while True:
                event = asyncio.ensure_future(events.__anext__())
                await asyncio.wait({event, ended}, return_when=asyncio.FIRST_COMPLETED)
                if not event.done():  # told to end: the stream breaks
                    event.cancel()
                    return
                try:
                    yield event.result()
                except StopAsyncIteration:
                    return
        finally:
            ended.cancel()

    monkeypatch.setattr(BlockDeviceService, "WatchResize", watch)
    async with tier_over_origin(tmp_path) as (base, top):

        async def watching(state: bool) -> bool:
            return (await top.inspect("layers/0"))["watching_resizes"] is state

        streams_may_start.clear()
        end_streams.set()  # the cache tier's stream breaks; its reconnect waits
        await eventually("the watch to break", lambda: watching(False))
        end_streams.clear()
        ours = asyncio.create_task(top.resize(FIRST))
        await asyncio.wait_for(held_reply.held.wait(), 10)
        await base.resize(SECOND)  # someone else's, newer
        streams_may_start.set()  # the new stream's first event: SECOND
        await eventually("the watch to be back", lambda: watching(True))
        held_reply.release.set()
        await asyncio.wait_for(ours, 10)
        assert (await base.info()).sector_count == SECOND
        assert (await top.info()).sector_count == SECOND


async def test_a_fault_applying_a_size_is_logged_and_the_watch_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A fault of this server's own while the follower applies a size (here: the layer's
    ``apply`` raising, three times) is logged at error level, naming it, and the follower
    reconnects and goes on (with its backoff) instead of ending without a word, which would
    leave every I/O of the layer checking the geometry with no watch to come back."""
    faults = 3
    applied: list[int] = []

    def apply(sector_count: int) -> None:
        nonlocal faults
        if faults:
            faults -= 1
            raise RuntimeError("a fault of ours")
        applied.append(sector_count)

    async with (
        running_server(tmp_path / "origin", toml_volume("base", ram(f"{SECTORS * SS}"))) as o,
        AsyncClient(o.grpc_address) as oc,
    ):
        vol = oc.volume("base")
        info = await vol.info()
        follower = GeometryFollower(
            where=lambda: "remote origin volume 'base'",
            owner=lambda: "volume 'vm', layer 1: ",
            timeout=2,
            remote=lambda: vol,
            apply=apply,
            smallest=lambda: min(applied, default=SECTORS),
            resumed=lambda: None,
            refused=_never_refused,
            log=logging.getLogger("tierdisk.service.layers.remote"),
        )
        with caplog.at_level(logging.ERROR, logger="tierdisk.service.layers.remote"):
            await follower.start(info.sector_size, info.disk_id, wait=0, name="test watch")
            try:
                await eventually("the follower to apply the size", lambda: applied, 30)
                assert applied == [SECTORS] and follower.watching and follower.checked
                await vol.resize(2 * SECTORS)  # and it follows on
                await eventually("the next size", lambda: applied == [SECTORS, 2 * SECTORS])
            finally:
                await follower.close()
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert said and said[0].startswith(
            "volume 'vm', layer 1: remote origin volume 'base': resize watch failed "
            "(RuntimeError: a fault of ours)"
        ), said


async def _never_refused(problem: str) -> None:
    raise AssertionError(f"the geometry did not change: {problem}")
