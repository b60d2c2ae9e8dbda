"""The ``remote`` layer against real servers on 127.0.0.1 (in-process, port 0).

One origin server and one proxy whose volumes use ``remote`` layers pointing at it: geometry
inherited at attach, whole-run I/O split only at 1 MiB chunks, layer-mode presence and
unmap, resize both ways (Resize forwarded; origin resizes reach the proxy's WatchResize and
GetVolume), the loop-guard header on every call, the error table, Inspect and metrics, and a
target that does not answer. Multi-tier topologies, outages and start order are in
tests/test_tiers.py; reads over the origin's NBD export (the ``nbd`` option) in
tests/test_remote_nbd.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from remote_origin import ServedRemoteLayer
from servers import (
    free_port,
    metric,
    ram,
    remote,
    running_server,
    server_section,
    toml_volume,
)
from stacks import STACKS, VOLUME_BYTES, MapLayer, NamedStack, pattern
from waiting import eventually

from tierdisk.client import AsyncClient, AsyncVolume
from tierdisk.client import errors as cerr
from tierdisk.service import errors
from tierdisk.service.errors import ConfigError
from tierdisk.service.grpc_api import BlockDeviceService
from tierdisk.service.grpc_refusal import status_for
from tierdisk.service.layer import UnmapBehavior
from tierdisk.service.layers.remote import MAX_REMOTE_MESSAGE, RemoteLayer, domain_error
from tierdisk.service.server import Server
from tierdisk.service.volume import LayerEntry, Volume

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
SS = 512


# -- helpers ----------------------------------------------------------------------------------


async def reads_at(vol: AsyncVolume) -> int:
    """Read calls the volume's top layer has served (its Inspect counter)."""
    return int((await vol.inspect("layers/0/counters"))["reads"])


ORIGIN = (
    toml_volume("base", ram("4MiB"))
    + toml_volume("delta", ram("4MiB"))
    + toml_volume("small", ram("1MiB"))
    + toml_volume("ro", ram("1MiB"), read_only=True)
    + toml_volume("big", ram("1MiB", sector_size=4096))
)


@pytest.fixture
async def origin(tmp_path: Path) -> AsyncIterator[Server]:
    async with running_server(tmp_path / "origin", ORIGIN) as srv:
        yield srv


@pytest.fixture
async def oclient(origin: Server) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(origin.grpc_address, timeout=10) as client:
        yield client


# -- geometry -----------------------------------------------------------------------------


async def test_geometry_comes_from_the_origin(
    origin: Server, oclient: AsyncClient, tmp_path: Path
) -> None:
    at = origin.grpc_address
    body = (
        toml_volume("inherit", ram(), remote(at, "big"))  # ram takes its size from below
        + toml_volume("ro", remote(at, "ro"), read_only=True)
        + toml_volume("top", remote(at, "base"))
    )
    async with (
        running_server(tmp_path / "proxy", body) as proxy,
        AsyncClient(proxy.grpc_address) as client,
    ):
        inherit = await client.volume("inherit").info()
        assert (inherit.sector_size, inherit.sector_count) == (4096, 256)
        ro = await client.volume("ro").info()
        assert ro.read_only and ro.sector_count == 2048
        assert (await client.volume("ro").inspect("layers/0"))["read_only"] is True
        top, base = await client.volume("top").info(), await oclient.volume("base").info()
        for field in (
            "sector_size",
            "sector_count",
            "physical_sector_size",
            "fua_respected",
            "disk_id",
            "unmap_behavior",
            "optimal_unmap_sectors",
            "read_only",
        ):
            assert getattr(top, field) == getattr(base, field), field


async def test_every_volume_field_is_inherited(origin: Server, tmp_path: Path) -> None:
    """disk id, FUA, unmap behaviour and physical sector size of an origin volume whose
    layer (a test double) sets all of them pass through a remote top layer."""
    odd = await Volume.open(
        "small",
        [
            LayerEntry(
                MapLayer(
                    2048,
                    disk_id=bytes(range(16)),
                    fua_respected=False,
                    physical_sector_size=4096,
                    unmap_behavior=UnmapBehavior.ANY,
                    optimal_unmap_sectors=8,
                )
            )
        ],
    )
    replaced = origin.registry.get("small")
    origin.registry.set_ready(odd)  # the origin now serves the double as "small"
    await replaced.close()
    body = toml_volume("odd", remote(origin.grpc_address, "small"))
    async with (
        running_server(tmp_path / "proxy", body) as proxy,
        AsyncClient(proxy.grpc_address) as client,
    ):
        info = await client.volume("odd").info()
    assert info.disk_id == bytes(range(16))
    assert not info.fua_respected
    assert info.physical_sector_size == 4096
    assert info.unmap_behavior == "UNMAP_BEHAVIOR_ANY"
    assert info.optimal_unmap_sectors == 8


# -- data path ------------------------------------------------------------------------------


async def test_whole_runs_split_only_at_one_mib(
    origin: Server, oclient: AsyncClient, tmp_path: Path
) -> None:
    data = pattern(1, 0, 8192, SS)  # 4 MiB
    await oclient.volume("base").write(0, data)
    body = toml_volume("vm", remote(origin.grpc_address, "base"))
    async with (
        running_server(tmp_path / "proxy", body) as proxy,
        # a client that sends the whole read as one request, so the layer does the split
        AsyncClient(proxy.grpc_address, max_io=16 * MiB) as client,
    ):
        vol = client.volume("vm")
        before = await reads_at(oclient.volume("base"))
        assert await vol.read(0, 8192) == data
        assert await reads_at(oclient.volume("base")) - before == 4  # 4 chunks of 1 MiB
        before = await reads_at(oclient.volume("base"))
        assert await vol.read(1000, 1500) == data[1000 * SS : 2500 * SS]
        assert await reads_at(oclient.volume("base")) - before == 1  # one run, one call
        writes = metric(
            origin, "tierdisk_volume_io_requests_total", volume="base", op="write", code="OK"
        )
        await vol.write(0, bytes(3 * MiB))
        assert (
            metric(
                origin, "tierdisk_volume_io_requests_total", volume="base", op="write", code="OK"
            )
            - writes
            == 3
        )
        assert await oclient.volume("base").read(0, 6144) == bytes(3 * MiB)


def _origin_calls(origin: Server, method: str) -> float:
    labels = {"grpc_service": "tierdisk.v1.BlockDevice", "grpc_method": method}
    return metric(origin, "grpc_server_handled_total", grpc_type="unary", grpc_code="OK", **labels)


async def _read_through_holes(
    origin: Server,
    oclient: AsyncClient,
    tmp_path: Path,
    delta: tuple[tuple[int, int], ...] = (),
) -> tuple[float, float]:
    """Through ``[ram, remote -> base]`` whose top holds every 64th sector (written there),
    read 2048 sectors (33 holes in the top): the data is the origin's with the top's
    sectors over it. With ``delta`` runs ``(sector, count)``, written to the origin's
    ``delta``, the stack is ``[ram, remote -> delta (layer mode), remote -> base]``: each
    sector comes from the topmost layer that holds it. Returns the origin's ``ReadBatch``
    and ``Read`` calls it took."""
    base = pattern(4, 0, 2048, SS)
    await oclient.volume("base").write(0, base)
    expected = bytearray(base)
    for sector, count in delta:
        mine = pattern(6, sector, count, SS)
        await oclient.volume("delta").write(sector, mine)
        expected[sector * SS : (sector + count) * SS] = mine
    at = origin.grpc_address
    layers = [ram(), remote(at, "base")]
    if delta:
        layers.insert(1, remote(at, "delta", mode="layer"))
    async with (
        running_server(tmp_path / "proxy", toml_volume("vm", *layers)) as proxy,
        AsyncClient(proxy.grpc_address) as client,
    ):
        vol = client.volume("vm")
        for sector in range(0, 2048, 64):
            mine = pattern(5, sector, 1, SS)
            await vol.write(sector, mine)
            expected[sector * SS : (sector + 1) * SS] = mine
        batches, reads = _origin_calls(origin, "ReadBatch"), _origin_calls(origin, "Read")
        assert await vol.read(0, 2048) == expected
        return _origin_calls(origin, "ReadBatch") - batches, _origin_calls(origin, "Read") - reads


async def test_the_holes_of_a_read_go_to_the_remote_in_one_call(
    origin: Server, oclient: AsyncClient, tmp_path: Path
) -> None:
    """A read through a fragmented layer above a remote one asks the origin for every hole
    in one ``ReadBatch`` call (it was a Read per hole), each hole counted as one read."""
    reads = metric(origin, "tierdisk_volume_io_requests_total", volume="base", op="read", code="OK")
    assert await _read_through_holes(origin, oclient, tmp_path) == (1, 0)
    after = metric(origin, "tierdisk_volume_io_requests_total", volume="base", op="read", code="OK")
    assert after - reads == 32  # the holes between the top's sectors


async def test_an_origin_without_read_batch_gets_a_read_per_hole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An origin that answers ``ReadBatch`` UNIMPLEMENTED (a tierdisk older than it): the
    layer says so once and reads each hole alone, with the same data."""

    async def unimplemented(self: BlockDeviceService, request: Any, context: Any) -> bytes:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        raise AssertionError("not reached")

    monkeypatch.setattr(BlockDeviceService, "read_batch_encoded", unimplemented)
    caplog.set_level(logging.INFO, logger="tierdisk.service.layers.remote")
    async with (
        running_server(tmp_path / "origin", ORIGIN) as origin,
        AsyncClient(origin.grpc_address, timeout=10) as oclient,
    ):
        assert await _read_through_holes(origin, oclient, tmp_path) == (0, 32)
    told = [r.getMessage() for r in caplog.records if "ReadBatch" in r.getMessage()]
    assert len(told) == 1 and "does not serve ReadBatch" in told[0]


async def test_reads_at_once_from_an_origin_without_read_batch_say_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Eight reads at once through the holes, from an origin without ``ReadBatch``: one
    line says so, and every read has the origin's data. Once the origin comes back as a
    tierdisk that serves it (a restart on the same address), the holes go in ReadBatch
    calls again, without a restart of the tier."""

    async def unimplemented(self: BlockDeviceService, request: Any, context: Any) -> bytes:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        raise AssertionError("not reached")

    caplog.set_level(logging.INFO, logger="tierdisk.service.layers.remote")
    listen = f"127.0.0.1:{free_port()}"
    origin_body = server_section(listen, tmp_path / "origin") + toml_volume("base", ram("1MiB"))
    base = pattern(8, 0, 2048, SS)
    top = {sector: pattern(9, sector, 1, SS) for sector in range(0, 2048, 64)}
    expected = bytearray(base)
    for sector, data in top.items():
        expected[sector * SS : (sector + 1) * SS] = data
    body = toml_volume("vm", ram(), remote(listen, "base"))
    async with contextlib.AsyncExitStack() as stack:  # the tier outlives the first origin
        with monkeypatch.context() as patch:
            patch.setattr(BlockDeviceService, "read_batch_encoded", unimplemented)
            async with running_server(tmp_path / "origin", origin_body) as origin:
                async with AsyncClient(listen) as oclient:
                    await oclient.volume("base").write(0, base)
                proxy = await stack.enter_async_context(running_server(tmp_path / "proxy", body))
                async with AsyncClient(proxy.grpc_address) as client:
                    vol = client.volume("vm")
                    for sector, data in top.items():
                        await vol.write(sector, data)
                    reads = await asyncio.gather(*(vol.read(0, 2048) for _ in range(8)))
                    assert all(got == expected for got in reads)
                    assert _origin_calls(origin, "Read") == 8 * 32
        said = [r.getMessage() for r in caplog.records]
        assert len([m for m in said if "does not serve ReadBatch" in m]) == 1
        async with running_server(tmp_path / "origin", origin_body) as origin:
            async with AsyncClient(listen) as oclient:
                await oclient.volume("base").write(0, base)
            async with AsyncClient(proxy.grpc_address) as client:
                vol = client.volume("vm")

                async def batched() -> bool:
                    assert await vol.read(0, 2048) == expected
                    return _origin_calls(origin, "ReadBatch") > 0

                await eventually("the tier to send ReadBatch to the new origin", batched)


DELTA_RUNS = ((100, 10), (126, 4), (1500, 300))
"""Runs of the origin's ``delta`` for the layer-mode reads (one across a hole's edge)."""


async def test_the_holes_of_a_read_go_to_a_remote_in_layer_mode_in_one_call(
    origin: Server, oclient: AsyncClient, tmp_path: Path
) -> None:
    """In layer mode the holes go to the remote in one ``ReadBatch`` asking for presence,
    and what it does not hold goes to the layer below in one more: two calls in all,
    where each hole took a Read of each remote before."""
    assert await _read_through_holes(origin, oclient, tmp_path, DELTA_RUNS) == (2, 0)


async def test_an_allocation_walk_asks_a_remote_in_layer_mode_once_for_holes_close_together(
    origin: Server, oclient: AsyncClient, tmp_path: Path
) -> None:
    """``GetAllocation`` through ``[ram, remote -> delta (layer mode), remote -> base]``
    whose top holds every 64th sector: the remote in layer mode is asked once for the span
    of the top's holes (it was a ``GetAllocation`` per hole, one after another: a cache
    tier with 40,000 holes took longer than the CLI's timeout), and each sector is
    attributed to the topmost layer holding it. Holes far apart are asked about one by
    one."""
    for sector, count in DELTA_RUNS:
        await oclient.volume("delta").write(sector, pattern(6, sector, count, SS))
    at = origin.grpc_address
    stack = toml_volume("vm", ram(), remote(at, "delta", mode="layer"), remote(at, "base"))
    async with (
        running_server(tmp_path / "proxy", stack) as proxy,
        AsyncClient(proxy.grpc_address) as client,
    ):
        vol = client.volume("vm")
        for sector in range(0, 2048, 64):
            await vol.write(sector, pattern(5, sector, 1, SS))
        before = _origin_calls(origin, "GetAllocation")
        extents = await vol.allocation(0, 2048)
        assert _origin_calls(origin, "GetAllocation") - before == 1
        # Holes far apart (the top holds all but a sector at each end of 3 MiB): asked
        # one at a time, not over the span, which would list all the origin has between.
        await vol.write(2048, bytes((6144 - 2049) * SS))
        before = _origin_calls(origin, "GetAllocation")
        far = await vol.allocation(2047, 6144 - 2047)
        assert _origin_calls(origin, "GetAllocation") - before == 2
    depth = [2] * 2048
    for sector, count in DELTA_RUNS:
        depth[sector : sector + count] = [1] * count
    depth[::64] = [0] * 32
    assert [e.depth for e in extents for _ in range(e.sector_count)] == depth
    assert [(e.sector, e.sector_count, e.depth) for e in far] == [
        (2047, 1, 2),
        (2048, 6144 - 2049, 0),
        (6143, 1, 2),
    ]


async def test_an_origin_without_presence_in_read_batch_gets_a_read_per_hole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An origin whose ``ReadBatch`` ignores ``report_presence`` (a tierdisk from before
    presence in it): a layer-mode remote reads each hole alone with presence, says so once,
    and the data is right (taking its empty ``present`` for "nothing held" would have shown
    the layer below instead); the disk-mode remote under it still batches."""
    serve = BlockDeviceService.read_batch_encoded

    async def older(self: BlockDeviceService, request: Any, context: Any) -> bytes:
        request.report_presence = False  # what a server without the field reads
        return await serve(self, request, context)

    monkeypatch.setattr(BlockDeviceService, "read_batch_encoded", older)
    caplog.set_level(logging.INFO, logger="tierdisk.service.layers.remote")
    async with (
        running_server(tmp_path / "origin", ORIGIN) as origin,
        AsyncClient(origin.grpc_address, timeout=10) as oclient,
    ):
        batches, reads = await _read_through_holes(origin, oclient, tmp_path, DELTA_RUNS)
    assert reads == 32  # the holes, each from delta with presence
    assert batches == 2  # the refused one to delta, then base's
    told = [r.getMessage() for r in caplog.records if "ReadBatch" in r.getMessage()]
    assert len(told) == 1 and "does not serve ReadBatch with presence" in told[0]


async def test_writes_and_reads_through_a_remote_top(
    origin: Server, oclient: AsyncClient, tmp_path: Path
) -> None:
    body = toml_volume("vm", remote(origin.grpc_address, "base"))
    async with (
        running_server(tmp_path / "proxy", body) as proxy,
        AsyncClient(proxy.grpc_address) as client,
    ):
        vol = client.volume("vm")
        await vol.write(8, pattern(2, 8, 8, SS), fua=True)
        assert await oclient.volume("base").read(8, 8) == pattern(2, 8, 8, SS)
        await oclient.volume("base").write(100, pattern(3, 100, 4, SS))
        assert await vol.read(100, 4) == pattern(3, 100, 4, SS)
        await vol.flush()
        # disk mode: every sector present, at depth 0
        assert [(e.sector, e.sector_count, e.depth) for e in await vol.allocation()] == [
            (0, 8192, 0)
        ]
        await vol.unmap(8, 8)
        assert await oclient.volume("base").read(8, 8) == bytes(8 * SS)


async def test_layer_mode_shows_lower_layers_and_keeps_unmapped_zeros(
    origin: Server, oclient: AsyncClient, tmp_path: Path
) -> None:
    at = origin.grpc_address
    base = pattern(1, 0, 8192, SS)
    await oclient.volume("base").write(0, base)
    delta = pattern(2, 10, 10, SS)
    await oclient.volume("delta").write(10, delta)
    body = toml_volume("vm", remote(at, "delta", mode="layer"), remote(at, "base")) + toml_volume(
        "alone", remote(at, "small", mode="layer")
    )
    async with (
        running_server(tmp_path / "proxy", body) as proxy,
        AsyncClient(proxy.grpc_address) as client,
    ):
        vol = client.volume("vm")
        got = await vol.read(0, 64)
        assert got == base[: 10 * SS] + delta + base[20 * SS : 64 * SS]
        alloc = [(e.sector, e.sector_count, e.depth) for e in await vol.allocation(0, 64)]
        assert alloc == [(0, 10, 1), (10, 10, 0), (20, 44, 1)]
        # Unmap over sectors the layer below holds: they must read as zeros, not show the
        # base through (the remote keeps them present as zeros).
        await vol.unmap(0, 4)
        assert await vol.read(0, 8) == bytes(4 * SS) + base[4 * SS : 8 * SS]
        assert [(e.sector, e.sector_count, e.depth) for e in await vol.allocation(0, 8)] == [
            (0, 4, 0),
            (4, 4, 1),
        ]
        # With nothing below, the unmap is forwarded and the origin may drop the sectors.
        alone = client.volume("alone")
        await alone.write(0, pattern(3, 0, 8, SS))
        await alone.unmap(0, 8)
        assert await alone.read(0, 8) == bytes(8 * SS)
        small = await oclient.volume("small").allocation(0, 8)
        assert [(e.sector, e.sector_count, e.depth) for e in small] == [(0, 8, -1)]
        tree = await vol.inspect("layers/0")
        assert tree["mode"] == "layer" and tree["present_sectors"] > 0


async def test_resize_forwarded_and_followed(
    origin: Server, oclient: AsyncClient, tmp_path: Path
) -> None:
    at = origin.grpc_address
    body = toml_volume("top", remote(at, "base")) + toml_volume("under", ram(), remote(at, "delta"))
    async with (
        running_server(tmp_path / "proxy", body) as proxy,
        AsyncClient(proxy.grpc_address) as client,
    ):
        top = client.volume("top")
        # Resize of the proxy goes to the origin.
        assert (await top.resize(10000)).sector_count == 10000
        assert (await oclient.volume("base").info()).sector_count == 10000
        # A resize of the origin reaches the proxy's watchers and GetVolume.
        watch = top.watch_resize(timeout=10)
        first = await anext(watch)
        assert first.sector_count == 10000
        await oclient.volume("base").resize(12000)
        event = await asyncio.wait_for(anext(watch), 10)
        assert event.sector_count == 12000 and event.generation > first.generation
        assert isinstance(watch, AsyncGenerator)  # watch_resize is an async generator
        await watch.aclose()
        assert (await top.info()).sector_count == 12000
        assert await top.read(11990, 10) == bytes(10 * SS)  # the grown part reads as zeros
        # Below a ram top, the remote layer follows its size but the volume keeps its own.
        await oclient.volume("delta").resize(9000)
        under = client.volume("under")
        for _ in range(200):
            if (await under.inspect("layers/1"))["sector_count"] == 9000:
                break
            await asyncio.sleep(0.02)
        assert (await under.inspect("layers/1"))["sector_count"] == 9000
        assert (await under.info()).sector_count == 8192


async def test_read_only_remotes(origin: Server, tmp_path: Path) -> None:
    at = origin.grpc_address
    # On the write path of a writable volume: refused at start, naming volume and layer.
    with pytest.raises(ConfigError) as info:
        async with running_server(tmp_path / "p1", toml_volume("v", remote(at, "ro"))):
            pass
    assert info.value.volume == "v" and info.value.layer == 0 and "read-only" in str(info.value)
    # disk mode can never be a read cache; layer mode can, unless the remote is read-only
    for layer, why in (
        (remote(at, "base", read_cache=True), 'a remote layer in mode = "disk" holds every'),
        (remote(at, "ro", mode="layer", read_cache=True), "the remote volume 'ro' is read-only"),
    ):
        with pytest.raises(ConfigError) as info:
            async with running_server(tmp_path / "p2", toml_volume("v", ram(), layer)):
                pass
        assert info.value.layer == 1 and why in str(info.value)
    body = toml_volume("v", ram(), remote(at, "ro")) + toml_volume(
        "r", remote(at, "ro"), read_only=True
    )
    async with (
        running_server(tmp_path / "p3", body) as proxy,
        AsyncClient(proxy.grpc_address, retries=0) as client,
    ):
        await client.volume("v").write(0, bytes(SS))  # lands on the ram layer
        with pytest.raises(cerr.ReadOnlyVolume):
            await client.volume("r").resize(100)


# -- the loop guard header, metrics, inspect ------------------------------------------------------


async def test_every_call_carries_the_hop_chain(
    origin: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, str, str | None]] = []  # (server id, rpc, tierdisk-hops)

    def record(self: BlockDeviceService, rpc: str, context: Any) -> None:
        md = dict(context.invocation_metadata() or ())
        seen.append((self._server_id, rpc, md.get("tierdisk-hops")))

    def unary(rpc: str, attribute: str) -> Callable[..., Any]:
        method = getattr(BlockDeviceService, attribute)

        async def wrapper(self: BlockDeviceService, request: Any, context: Any) -> Any:
            record(self, rpc, context)
            return await method(self, request, context)

        return wrapper

    async def watch(self: BlockDeviceService, request: Any, context: Any) -> AsyncIterator[Any]:
        record(self, "WatchResize", context)
        async for event in original_watch(self, request, context):
            yield event

    original_watch = BlockDeviceService.WatchResize
    for rpc in ("GetVolume", "Read", "Write", "Unmap", "Flush", "GetAllocation", "Resize"):
        # what the server registers
        attribute = {"Read": "read_encoded", "Write": "write_parsed"}.get(rpc, rpc)
        monkeypatch.setattr(BlockDeviceService, attribute, unary(rpc, attribute))
    monkeypatch.setattr(BlockDeviceService, "WatchResize", watch)
    # The origin fixture started before the patch; start one that uses it.
    at = origin.grpc_address
    async with running_server(tmp_path / "origin2", toml_volume("delta", ram("1MiB"))) as o2:
        body = toml_volume("vm", remote(o2.grpc_address, "delta", mode="layer"), remote(at, "base"))
        body += toml_volume("disk", remote(o2.grpc_address, "delta"))
        async with (
            running_server(tmp_path / "proxy", body) as proxy,
            AsyncClient(proxy.grpc_address) as client,
        ):
            vol = client.volume("vm")
            await vol.write(0, bytes(4 * SS))
            await vol.read(0, 64)
            await vol.allocation(0, 64)
            await vol.unmap(0, 2)  # over the base: zeros are written
            await client.volume("disk").unmap(0, 2)  # forwarded
            await vol.flush()
            await vol.resize(2048)
            for _ in range(100):  # the resize follower's stream starts in the background
                if {"WatchResize"} <= {rpc for sid, rpc, _ in seen if sid == o2.server_id}:
                    break
                await asyncio.sleep(0.02)
            at_origin = [(rpc, chain) for sid, rpc, chain in seen if sid == o2.server_id]
    assert {rpc for rpc, _ in at_origin} >= {
        "GetVolume",
        "WatchResize",
        "Read",
        "Write",
        "GetAllocation",
        "Unmap",
        "Flush",
        "Resize",
    }
    # Each volume's calls carry its own entry (the hop chain names volumes, not servers).
    chains = {chain for _, chain in at_origin}
    assert chains == {f"{proxy.server_id}/vm", f"{proxy.server_id}/disk"}, at_origin


async def test_inspect_and_metrics_count_remote_calls(
    origin: Server, oclient: AsyncClient, tmp_path: Path
) -> None:
    body = toml_volume("vm", ram(), remote(origin.grpc_address, "base"))
    async with (
        running_server(tmp_path / "proxy", body) as proxy,
        AsyncClient(proxy.grpc_address) as client,
    ):
        vol = client.volume("vm")
        for sector in (0, 100, 200):
            await vol.read(sector, 8)
        tree = await vol.inspect("layers/1")
        assert tree["kind"] == "remote"
        assert tree["target"] == origin.grpc_address
        assert tree["remote_volume"] == "base"
        assert tree["mode"] == "disk"
        assert tree["connection"] == "READY"
        assert tree["requests"]["Read"] == {"OK": 3}
        assert tree["requests"]["GetVolume"] == {"OK": 1}
        assert 0 <= tree["last_answer_seconds_ago"] < 30 and tree["last_failure"] is None
        labels = {"volume": "vm", "layer": "1"}
        assert (
            metric(proxy, "tierdisk_remote_requests_total", method="Read", code="OK", **labels) == 3
        )
        assert metric(proxy, "tierdisk_remote_request_duration_seconds_count", method="Read") == 3
        assert (
            metric(proxy, "tierdisk_remote_request_duration_seconds_count", method="GetVolume") == 1
        )


async def _layer_mode_inspected_for_a_second(
    origin: Server, folder: Path, until: Callable[[], bool] = lambda: False, seconds: float = 1.0
) -> Any:
    """A tier whose volume ``vm`` is a layer-mode remote of the origin's ``base``, its layer
    asked for (Inspect: its present sectors) every 50 ms for ``seconds``, or until
    ``until()``: the last tree."""
    body = toml_volume("vm", remote(origin.grpc_address, "base", mode="layer"))
    async with (
        running_server(folder / "proxy", body) as proxy,
        AsyncClient(proxy.grpc_address) as client,
    ):
        vol = client.volume("vm")
        deadline = time.monotonic() + seconds
        tree = await vol.inspect("layers/0")
        while time.monotonic() < deadline and not until():
            await asyncio.sleep(0.05)
            tree = await vol.inspect("layers/0")
        return tree


async def test_a_remote_whose_map_takes_long_to_read_is_asked_for_it_less_often(
    origin: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A layer-mode remote shows its present sectors from the remote volume's whole map,
    refreshed in the background when scrapes and Inspect ask; an origin whose map takes
    long to read (a million runs: seconds of its CPU, every scrape) is asked again only
    after a hundred times as long as the last answer took, not every few seconds."""
    monkeypatch.setattr("tierdisk.service.layers.remote._PRESENT_REFRESH", 0.05)
    allocation = AsyncVolume.allocation

    async def slow_allocation(self: AsyncVolume, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.1)  # (a big map)
        return await allocation(self, *args, **kwargs)

    monkeypatch.setattr(AsyncVolume, "allocation", slow_allocation)
    tree = await _layer_mode_inspected_for_a_second(origin, tmp_path)
    assert tree["requests"]["GetAllocation"] == {"OK": 1}, tree["requests"]


async def test_a_failed_map_read_does_not_put_off_the_next(
    origin: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refresh of present_sectors that failed (the origin paused past the layer's
    timeout) says nothing of what a map read costs: the next one is not put off by a
    hundred times its wait, and the count is fresh again once the origin answers."""
    monkeypatch.setattr("tierdisk.service.layers.remote._PRESENT_REFRESH", 0.05)
    allocation = AsyncVolume.allocation
    calls: list[str] = []

    async def failing_once(self: AsyncVolume, *args: Any, **kwargs: Any) -> Any:
        calls.append("call")
        if len(calls) == 2:  # (the first is the attach's)
            await asyncio.sleep(0.1)
            raise cerr.DeadlineExceeded("the origin did not answer in time")
        return await allocation(self, *args, **kwargs)

    monkeypatch.setattr(AsyncVolume, "allocation", failing_once)
    # (a hundred times the failed call's 0.1 s would be 10 s: 5 s tells them apart, and
    # leaves a loaded machine the time its four calls take)
    await _layer_mode_inspected_for_a_second(
        origin, tmp_path, until=lambda: len(calls) >= 4, seconds=5.0
    )
    assert len(calls) >= 4, calls


# -- errors ---------------------------------------------------------------------------------


REMOTE_ERRORS: list[
    tuple[type[cerr.TierdiskError], type[errors.TierdiskError], grpc.StatusCode]
] = [
    (cerr.ReadOnlyVolume, errors.ReadOnlyError, grpc.StatusCode.FAILED_PRECONDITION),
    (cerr.NotSupported, errors.NotSupported, grpc.StatusCode.FAILED_PRECONDITION),
    (cerr.FailedPrecondition, errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (cerr.VolumeNotFound, errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (cerr.OutOfRange, errors.OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (cerr.InvalidArgument, errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    # the remote refused the tier's credentials: not the caller's to fix
    (cerr.Unauthenticated, errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (cerr.PermissionDenied, errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (cerr.Unavailable, errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (cerr.Cancelled, errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (cerr.DeadlineExceeded, errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (cerr.NoSpace, errors.NoSpace, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (cerr.DataLoss, errors.DataCorruption, grpc.StatusCode.DATA_LOSS),
    (cerr.StorageError, errors.StorageError, grpc.StatusCode.INTERNAL),
    (cerr.TierdiskError, errors.StorageError, grpc.StatusCode.INTERNAL),
    # a lower tier's hop guard passes up as such; a lower tier's writes lost too
    (cerr.TierLoop, errors.TierLoop, grpc.StatusCode.FAILED_PRECONDITION),
    (cerr.WritesLost, errors.WritesLost, grpc.StatusCode.DATA_LOSS),
    # the client's own, found before or after a call: by the class they are kinds of
    (cerr.AllocationTooLarge, errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (cerr.MessageTooLarge, errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (cerr.SectorSizeChanged, errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (cerr.Interrupted, errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (cerr.ClientClosed, errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (cerr.Unimplemented, errors.StorageError, grpc.StatusCode.INTERNAL),
]
"""Every client exception a remote layer may meet -> the domain error and status its
server answers with (:data:`~tierdisk.service.layers.remote_errors.ERROR_MAP`)."""


def test_the_error_table_covers_every_client_error() -> None:
    """A new client exception must be given its translation here."""
    public = {
        cls
        for name in cerr.__all__
        if isinstance(cls := getattr(cerr, name), type) and issubclass(cls, cerr.TierdiskError)
    }
    assert public == {client_error for client_error, _, _ in REMOTE_ERRORS}


@pytest.mark.parametrize(("client_error", "domain", "code"), REMOTE_ERRORS)
def test_error_table(
    client_error: type[cerr.TierdiskError],
    domain: type[errors.TierdiskError],
    code: grpc.StatusCode,
) -> None:
    exc = domain_error(client_error("it broke"), "remote x volume 'v'")
    assert type(exc) is domain
    assert str(exc) == "remote x volume 'v': it broke"
    assert status_for(exc) == code


def test_remote_messages_are_bounded() -> None:
    """A remote's message may quote a lower tier's, and so on; ours keeps a bounded part."""
    exc = domain_error(cerr.Unavailable("x" * 10_000), "remote x volume 'v'")
    assert str(exc).startswith("remote x volume 'v': xxx") and str(exc).endswith("…")
    assert len(str(exc)) == len("remote x volume 'v': ") + MAX_REMOTE_MESSAGE


async def test_attach_to_a_silent_target_fails_fast() -> None:
    layer = RemoteLayer(f"127.0.0.1:{free_port()}", "v", timeout=30)
    started = time.monotonic()
    with pytest.raises(errors.Unavailable) as info:
        await layer.attach(None)
    assert time.monotonic() - started < 2 + 1.5  # the attach timeout, not the 30 s one
    assert "127.0.0.1" in str(info.value)
    await layer.close()


async def test_an_attach_cancelled_anywhere_leaves_nothing_running(origin: Server) -> None:
    """An attach cancelled at any point (a server stopped while its volumes attach) leaves
    no resize watch task and no open channel behind: the engine closes only layers whose
    attach returned, so the layer must stop what it started itself."""

    def watches() -> list[asyncio.Task[Any]]:
        return [
            t
            for t in asyncio.all_tasks()
            if t.get_name().startswith("watch-resize") and not t.done()
        ]

    cancelled_after_connect = 0
    for turns in range(2000):  # cancel after more and more loop turns, until it is done
        layer = RemoteLayer(origin.grpc_address, "base")
        attach = asyncio.create_task(layer.attach(None))
        for _ in range(turns):
            await asyncio.sleep(0)
            if attach.done():
                break
        if attach.done():
            await attach
            assert len(watches()) == 1
            await layer.close()
            assert not watches()
            break
        attach.cancel()
        with pytest.raises(asyncio.CancelledError):
            await attach
        cancelled_after_connect += layer.sector_count > 0  # GetVolume had answered
        assert not watches(), f"cancelled after {turns} turns"
        assert layer._client is None, f"cancelled after {turns} turns: the channel is open"
    else:
        raise AssertionError("the attach never finished")
    for _ in range(50):  # and once at least right after GetVolume answered (the loop above
        if cancelled_after_connect:  # may have stepped over that turn)
            break
        layer = RemoteLayer(origin.grpc_address, "base")
        attach = asyncio.create_task(layer.attach(None))
        for _ in range(10_000):  # loop turns, until GetVolume answered or the attach ended
            if attach.done() or layer.sector_count:
                break
            await asyncio.sleep(0)
        if attach.done():
            await attach
            await layer.close()
            continue
        attach.cancel()
        with pytest.raises(asyncio.CancelledError):
            await attach
        cancelled_after_connect += 1
        assert not watches(), "cancelled right after GetVolume"
        assert layer._client is None, "cancelled right after GetVolume: the channel is open"
    assert cancelled_after_connect > 0  # some cancellations came after GetVolume


async def test_server_starts_with_the_remote_down(tmp_path: Path) -> None:
    port = free_port()
    body = toml_volume("vm", ram(), remote(f"127.0.0.1:{port}", "base", timeout=1))
    body += toml_volume("local", ram("1MiB"))
    async with (
        running_server(tmp_path / "proxy", body) as proxy,
        AsyncClient(proxy.grpc_address, retries=0) as client,
        grpc.aio.insecure_channel(proxy.grpc_address) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(cerr.Unavailable) as info:
            await client.volume("vm").read(0, 1)
        assert "not ready" in str(info.value)
        assert await client.volume("local").read(0, 1) == bytes(SS)


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"ca_file": "ca.pem"}, "tls = true"),
        ({"tls": True, "cert_file": "c.pem"}, "key_file"),
        ({"token": "a", "token_file": "t"}, "token"),
        ({"tls": True, "ca_file": "missing.pem"}, "missing.pem"),
        ({"tls": True, "ca_file": "junk.pem"}, "no PEM certificate"),
        ({"tls": True, "cert_file": "junk.pem", "key_file": "junk.pem"}, "no PEM certificate"),
        ({"token_file": "missing-token"}, "missing-token"),
    ],
)
async def test_tls_and_token_options_are_checked(
    tmp_path: Path, options: dict[str, Any], problem: str
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "junk.pem").write_text("not PEM at all\n")  # data_dir-relative
    body = toml_volume("vm", remote("127.0.0.1:1", "base", **options))
    with pytest.raises(ConfigError) as info:
        async with running_server(tmp_path, body):
            pass
    assert info.value.volume == "vm" and info.value.layer == 0 and problem in str(info.value)


async def test_token_is_sent_as_bearer(
    origin: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens: list[str | None] = []
    get_volume = BlockDeviceService.GetVolume

    async def record(self: BlockDeviceService, request: Any, context: Any) -> Any:
        tokens.append(dict(context.invocation_metadata() or ()).get("authorization"))
        return await get_volume(self, request, context)

    monkeypatch.setattr(BlockDeviceService, "GetVolume", record)
    (tmp_path / "token").write_text("s3cret\n")
    async with running_server(tmp_path / "o2", toml_volume("v", ram("1MiB"))) as o2:
        at = o2.grpc_address
        body = toml_volume("a", remote(at, "v", token_file=str(tmp_path / "token")))
        body += toml_volume("b", remote(at, "v", token="other"))
        async with running_server(tmp_path / "proxy", body):
            pass
    assert sorted(t or "" for t in tokens) == ["Bearer other", "Bearer s3cret"]


async def test_tls_against_a_plaintext_server_is_unavailable(origin: Server) -> None:
    layer = RemoteLayer(origin.grpc_address, "base", tls=True, server_name="origin.test")
    with pytest.raises(errors.Unavailable):
        await layer.attach(None)
    await layer.close()


# -- the remote stacks of the conformance registry (tests/stacks.py) ---------------------------

REMOTE_STACKS = [s for s in STACKS if "remote" in s.tags or "remote-rc" in s.tags]


@pytest.mark.parametrize("stack", REMOTE_STACKS, ids=[s.name for s in REMOTE_STACKS])
async def test_registry_remote_stacks_work_and_clean_up(stack: NamedStack, tmp_path: Path) -> None:
    vol = await stack.factory(tmp_path)
    layers = [e.layer for e in vol.entries if isinstance(e.layer, ServedRemoteLayer)]
    assert layers
    targets = [layer.target for layer in layers]
    try:
        ss = vol.sector_size
        assert vol.sector_count * ss == VOLUME_BYTES
        bottom = -1 if vol.entries[-1].layer in layers else len(vol.entries) - 1
        assert await vol.allocation(0, 64) == [(0, 64, bottom)]
        assert (await vol.read(0, 64))[0] == bytes(64 * ss)
        big = pattern(5, 100, (16 << 20) // ss, ss)  # one 16 MiB write and read
        await vol.write(100, big)
        assert (await vol.read(100, len(big) // ss))[0] == big
        await vol.unmap(100, 8)
        assert (await vol.read(100, 16))[0] == bytes(8 * ss) + big[8 * ss : 16 * ss]
        await vol.flush()
    finally:
        await vol.close()
    assert all(layer.origin is None for layer in layers)
    for target in targets:  # the origins are gone
        async with AsyncClient(target, retries=0, timeout=2) as client:
            with pytest.raises(cerr.Unavailable):
                await client.list_volumes()
