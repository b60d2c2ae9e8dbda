"""Services stacked as cache tiers: two, three and more real servers on 127.0.0.1.

- Three tiers (origin ← regional ← host): data through every tier equals the base; a cache
  hit is proven by counting the origin's reads (its Inspect counters); writes on a host
  stay there unless the layer is write-through; ``mode = "layer"`` lets lower layers show
  through; a remote read-cache layer is filled with no-overwrite semantics.
- Outage: the origin (a child process) is stopped, then killed: uncached reads fail within
  the configured timeout, cached sectors still read; the origin comes back on the same
  address and reads succeed again without restarting the cache tier.
- Start order: the cache tier starts before its origin, reports NOT_SERVING, then SERVING.
- The hop guard: a loop between two servers and a chain of nine tiers fail fast with
  FAILED_PRECONDITION naming the chain; two volumes waiting for each other at start are
  found as a loop, while two servers that only depend on each other both attach.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servers import (
    ServerProcess,
    free_port,
    ram,
    remote,
    running_server,
    scrape,
    server_section,
    toml_volume,
    value,
    write_config,
)
from stacks import pattern
from waiting import eventually

from tierdisk.client import AsyncClient, AsyncVolume
from tierdisk.client import errors as cerr
from tierdisk.service import hops
from tierdisk.service import server as server_module
from tierdisk.service.config import load_config
from tierdisk.service.server import Server
from tierdisk.v1 import blockdevice_pb2 as pb
from tierdisk.v1 import blockdevice_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(90)

T = TypeVar("T")

SS = 512
BASE_SECTORS = 4096  # 2 MiB
BASE = pattern(7, 0, BASE_SECTORS, SS)


# -- helpers ------------------------------------------------------------------------------------


async def origin_reads(vol: AsyncVolume) -> int:
    """Read calls the origin volume's layer served: the proof of hits and misses above it."""
    return int((await vol.inspect("layers/0/counters"))["reads"])


async def health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
        return int(reply.status)


# -- three tiers --------------------------------------------------------------------------------


@pytest.fixture
async def tiers(tmp_path: Path) -> AsyncIterator[tuple[Server, Server, Server]]:
    """origin ← regional ← host, each a real in-process server on its own port."""
    origin_body = (
        toml_volume("base", ram("2MiB"))
        + toml_volume("delta", ram("2MiB"))
        + toml_volume("scratch", ram("2MiB"))
        + toml_volume("cache", ram("2MiB"))
    )
    async with running_server(tmp_path / "origin", origin_body) as origin:
        o = origin.grpc_address
        async with AsyncClient(o) as client:
            await client.volume("base").write(0, BASE)
        regional_body = (
            toml_volume("base", ram(read_cache=True), remote(o, "base"))
            # layer mode passes the origin's presence on to the tier above
            + toml_volume("delta", remote(o, "delta", mode="layer"))
            + toml_volume("scratch", remote(o, "scratch"))
            + toml_volume("cache", remote(o, "cache", mode="layer"))
        )
        async with running_server(tmp_path / "regional", regional_body) as regional:
            r = regional.grpc_address
            host_body = (
                toml_volume("vm", ram(), remote(r, "base"))
                + toml_volume("wt", ram(write_through=True), remote(r, "scratch"))
                + toml_volume("layered", ram(), remote(r, "delta", mode="layer"), remote(r, "base"))
                + toml_volume(
                    "rc", remote(r, "cache", mode="layer", read_cache=True), remote(o, "base")
                )
            )
            async with running_server(tmp_path / "host", host_body) as host:
                yield origin, regional, host


async def test_data_through_every_tier_and_cache_hits_at_the_origin(
    tiers: tuple[Server, Server, Server],
) -> None:
    origin, regional, host = tiers
    async with (
        AsyncClient(origin.grpc_address) as oc,
        AsyncClient(regional.grpc_address) as rc,
        AsyncClient(host.grpc_address) as hc,
    ):
        base = oc.volume("base")
        before = await origin_reads(base)
        assert await hc.volume("vm").read(0, BASE_SECTORS) == BASE  # misses: the origin reads
        after_first = await origin_reads(base)
        assert after_first > before
        # The regional cache now holds it: neither tier above reads the origin again.
        assert await hc.volume("vm").read(0, BASE_SECTORS) == BASE
        assert await rc.volume("base").read(0, BASE_SECTORS) == BASE
        assert await origin_reads(base) == after_first
        cache = await rc.volume("base").inspect("layers/0/counters")
        assert cache["cache_hits"] >= 2 * BASE_SECTORS and cache["cache_fills"] == BASE_SECTORS
        assert (await hc.volume("vm").info()).sector_count == BASE_SECTORS  # inherited
        # A partly cached range: only the missing run goes down, once.
        assert await hc.volume("vm").read(BASE_SECTORS - 8, 8) == BASE[-8 * SS :]
        assert await origin_reads(base) == after_first


async def test_writes_stay_on_the_host_unless_write_through(
    tiers: tuple[Server, Server, Server],
) -> None:
    origin, regional, host = tiers
    async with (
        AsyncClient(origin.grpc_address) as oc,
        AsyncClient(regional.grpc_address) as rc,
        AsyncClient(host.grpc_address) as hc,
    ):
        new = pattern(9, 100, 10, SS)
        await hc.volume("vm").write(100, new)
        assert await hc.volume("vm").read(100, 10) == new
        assert await rc.volume("base").read(100, 10) == BASE[100 * SS : 110 * SS]
        assert await oc.volume("base").read(100, 10) == BASE[100 * SS : 110 * SS]
        # write_through: the host's ram layer and the remote below it both get the write,
        # and the remote tier passes it on to its own remote top (the origin).
        await hc.volume("wt").write(5, new)
        assert await rc.volume("scratch").read(5, 10) == new
        assert await oc.volume("scratch").read(5, 10) == new


async def test_layer_mode_lets_lower_layers_show_through(
    tiers: tuple[Server, Server, Server],
) -> None:
    origin, _, host = tiers
    async with AsyncClient(origin.grpc_address) as oc, AsyncClient(host.grpc_address) as hc:
        delta = pattern(11, 40, 8, SS)
        await oc.volume("delta").write(40, delta)
        layered = hc.volume("layered")
        assert await layered.read(0, 64) == BASE[: 40 * SS] + delta + BASE[48 * SS : 64 * SS]
        alloc = [(e.sector, e.sector_count, e.depth) for e in await layered.allocation(0, 64)]
        assert alloc == [(0, 40, 2), (40, 8, 1), (48, 16, 2)]


async def test_a_shrink_through_a_remote_top_keeps_lower_data_hidden_after_a_restart(
    tmp_path: Path,
) -> None:
    """DESIGN.md §3 across tiers: a volume whose top is a remote layer (``mode = "layer"``)
    over a local base is shrunk and grown; after the host server restarts, past the old
    end it still reads zeros, not the base's data (the origin's sparse top recorded the
    smallest size, and the remote layer takes it from the origin's Inspect)."""
    base = tmp_path / "base.raw"
    base.write_bytes(BASE)
    origin_body = toml_volume("top", {"kind": "sparse", "path": "top", "size": BASE_SECTORS * SS})
    async with running_server(tmp_path / "origin", origin_body) as origin:
        host_body = toml_volume(
            "vm",
            remote(origin.grpc_address, "top", mode="layer"),
            {"kind": "raw", "path": str(base), "read_only": True},
        )
        async with running_server(tmp_path / "host", host_body) as host:
            async with AsyncClient(host.grpc_address) as hc:
                vm = hc.volume("vm")
                assert await vm.read(0, BASE_SECTORS) == BASE
                await vm.resize(1024)
                await vm.resize(BASE_SECTORS)
                expected = BASE[: 1024 * SS] + bytes((BASE_SECTORS - 1024) * SS)
                assert await vm.read(0, BASE_SECTORS) == expected
        async with AsyncClient(origin.grpc_address) as oc:
            tree = await oc.volume("top").inspect()
            assert tree["smallest_sector_count"] == 1024
        async with running_server(tmp_path / "host", host_body) as host:
            async with AsyncClient(host.grpc_address) as hc:
                vm = hc.volume("vm")
                assert await vm.read(0, BASE_SECTORS) == expected
                assert (await vm.inspect("layers/1/visible_sector_count"))["value"] == 1024


async def test_remote_read_cache_fills_without_overwriting(
    tiers: tuple[Server, Server, Server],
) -> None:
    origin, _, host = tiers
    async with AsyncClient(origin.grpc_address) as oc, AsyncClient(host.grpc_address) as hc:
        cache = oc.volume("cache")  # what the host's remote read-cache layer ends in
        mine = pattern(12, 20, 4, SS)
        await cache.write(20, mine)  # already held by the cache: a fill must not touch it
        base = oc.volume("base")
        before = await origin_reads(base)
        got = await hc.volume("rc").read(0, 64)
        assert got == BASE[: 20 * SS] + mine + BASE[24 * SS : 64 * SS]
        assert await cache.read(0, 64) == got  # filled, sectors 20..23 kept
        misses = await origin_reads(base)
        assert misses > before
        assert await hc.volume("rc").read(0, 64) == got
        assert await origin_reads(base) == misses  # the second read hit the remote cache
        counters = await hc.volume("rc").inspect("layers/0/counters")
        assert counters["cache_fills"] == 60 and counters["cache_hits"] == 4 + 64


# -- outage and restart ---------------------------------------------------------------------------


@pytest.mark.parametrize("nbd", [False, True], ids=["grpc", "nbd-reads"])
async def test_origin_outage_and_restart(
    tmp_path: Path, nbd: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A hung, then a dead origin: the tier answers what it holds, fails the rest within its
    timeout, and follows the origin back. Its log names the local volume and layer of each
    failed call, and says when the origin answers again."""
    caplog.set_level(logging.INFO, logger="tierdisk.service.layers.remote")
    port = free_port()
    listen = f"127.0.0.1:{port}"
    origin_dir = tmp_path / "origin"
    config = write_config(
        origin_dir, toml_volume("base", {"kind": "raw", "path": "base.img", "size": "1MiB"})
    )
    # With nbd, the cache tier reads over the origin's NBD export (the remote's nbd option).
    nbd_args = ("--nbd", f"127.0.0.1:{free_port()}") if nbd else ()
    origin = ServerProcess.start(origin_dir, config, *nbd_args, listen=listen)
    try:
        async with AsyncClient(listen) as oc:
            await oc.volume("base").write(0, BASE[: 2048 * SS])
            await oc.volume("base").flush()
        timeout = 1.0
        options: dict[str, Any] = {"timeout": timeout, "retries": 2}
        if nbd:
            options["nbd"] = origin.nbd
        body = toml_volume("vm", ram(read_cache=True), remote(listen, "base", **options))
        async with (
            running_server(tmp_path / "cache", body) as cache,
            AsyncClient(cache.grpc_address, retries=0, timeout=10) as client,
        ):
            vol = client.volume("vm")
            assert await vol.read(0, 64) == BASE[: 64 * SS]  # now cached
            if nbd:
                assert (await vol.inspect("layers/1"))["requests"]["NbdRead"] == {"OK": 1}

            # A hung origin: uncached reads fail within the timeout, cached ones still work.
            os.kill(origin.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(cerr.DeadlineExceeded):
                    await vol.read(64, 64)
                assert time.monotonic() - started < timeout + 1.5
                # inspect tells: the channel may still say READY
                failure = (await vol.inspect("layers/1"))["last_failure"]
                assert failure["code"] == "DEADLINE_EXCEEDED" and failure["seconds_ago"] < 30
                assert await vol.read(0, 64) == BASE[: 64 * SS]
            finally:
                os.kill(origin.pid, signal.SIGCONT)
            assert await vol.read(64, 8) == BASE[64 * SS : 72 * SS]

            # A dead origin: UNAVAILABLE within the timeout; the cache still answers.
            origin.kill()
            started = time.monotonic()
            with pytest.raises(cerr.Unavailable) as info:
                await vol.read(128, 64)
            assert time.monotonic() - started < timeout + 1.5
            assert listen in str(info.value)
            assert await vol.read(0, 64) == BASE[: 64 * SS]

            # The origin comes back on the same address: reads succeed, no restart here.
            close_streams(origin)
            origin = ServerProcess.start(origin_dir, config, *nbd_args, listen=listen)

            async def uncached_read() -> bool:
                return await vol.read(128, 64) == BASE[128 * SS : 192 * SS]

            await eventually(
                "a read after the origin restarted", uncached_read, retry_on=cerr.TierdiskError
            )
            assert await health(cache.grpc_address) == health_pb2.HealthCheckResponse.SERVING
            lines = [r.getMessage() for r in caplog.records]
            where = f"volume 'vm', layer 1: remote {listen} volume 'base': "
            failed = [line for line in lines if " answered " in line and "OK" not in line]
            assert failed and all(line.startswith(where) for line in failed), lines
            assert any(line.startswith(where + "answers again") for line in lines), lines

            async def watching() -> bool:
                return bool((await vol.inspect("layers/1"))["watching_resizes"])

            await eventually("the resize watch reconnected", watching, retry_on=cerr.TierdiskError)
            if nbd:
                fresh = iter(range(256, 2048, 8))  # uncached sectors, one run per try

                async def nbd_again() -> bool:
                    before = (await vol.inspect("layers/1"))["requests"].get("NbdRead", {})
                    s = next(fresh)
                    assert await vol.read(s, 8) == BASE[s * SS : (s + 8) * SS]
                    after = (await vol.inspect("layers/1"))["requests"]["NbdRead"]
                    return bool(after.get("OK", 0) > before.get("OK", 0))

                await eventually("reads over NBD again", nbd_again, retry_on=cerr.TierdiskError)
    finally:
        origin.kill()
        close_streams(origin)


def origin_process(folder: Path, layer: dict[str, Any]) -> tuple[str, Path, ServerProcess]:
    """A server process in ``folder`` serving the volume ``base`` (one ``layer``) on an
    address of its own (a tier reconnects to it there after a restart): the address, the
    config (``ServerProcess.start(config.parent, config, listen=address)`` restarts it) and
    the process."""
    listen = f"127.0.0.1:{free_port()}"
    config = write_config(folder, toml_volume("base", layer))
    return listen, config, ServerProcess.start(folder, config, listen=listen)


def close_streams(server: ServerProcess) -> None:
    for stream in (server.proc.stdout, server.proc.stderr):
        if stream:
            stream.close()


async def _failed_calls(vol: AsyncVolume) -> int:
    """The calls the volume's remote layer (index 1) made that failed, its resize watch
    aside (a watch is followed again in the background)."""
    requests = (await vol.inspect("layers/1/requests")) or {}
    return sum(
        int(count)
        for rpc, codes in requests.items()
        if rpc != "WatchResize"
        for code, count in codes.items()
        if code != "OK"
    )


async def test_only_the_tier_nearest_the_client_retries_a_down_origin(tmp_path: Path) -> None:
    """With the origin of host → regional → origin down, a read at the host is retried by
    the host's remote layer (``retries = 3``: 4 attempts), and the regional tries each of
    those once, not 4 times more (retries inside retries: 16 calls at the origin); the
    caller hears UNAVAILABLE naming the origin. A read of the regional's own client is
    retried there, as configured."""
    listen, _, origin = origin_process(tmp_path / "origin", ram("1MiB"))
    try:
        async with running_server(
            tmp_path / "regional", toml_volume("base", ram(), remote(listen, "base", retries=3))
        ) as regional:
            body = toml_volume("vm", ram(), remote(regional.grpc_address, "base", retries=3))
            async with (
                running_server(tmp_path / "host", body) as host,
                AsyncClient(host.grpc_address, retries=0, timeout=20) as host_client,
                AsyncClient(regional.grpc_address, retries=0, timeout=20) as regional_client,
            ):
                at_host = host_client.volume("vm")
                at_regional = regional_client.volume("base")
                origin.kill()
                host_before = await _failed_calls(at_host)
                regional_before = await _failed_calls(at_regional)
                with pytest.raises(cerr.Unavailable) as info:
                    await at_host.read(0, 8)
                assert listen in str(info.value)  # the origin's address
                assert await _failed_calls(at_host) - host_before == 4
                assert await _failed_calls(at_regional) - regional_before == 4  # once each
                with pytest.raises(cerr.Unavailable):
                    await at_regional.read(0, 8)  # its own client's: retried here
                assert await _failed_calls(at_regional) - regional_before == 8
    finally:
        origin.kill()
        close_streams(origin)


async def test_cache_tier_starts_before_its_origin(tmp_path: Path) -> None:
    listen = f"127.0.0.1:{free_port()}"
    body = toml_volume("vm", ram(), remote(listen, "base", timeout=1))
    async with (
        running_server(tmp_path / "cache", body) as cache,
        AsyncClient(cache.grpc_address, retries=0) as client,
    ):
        assert await health(cache.grpc_address) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(cerr.Unavailable):
            await client.volume("vm").read(0, 8)
        origin_body = server_section(listen, tmp_path / "origin") + toml_volume("base", ram("1MiB"))
        async with running_server(tmp_path / "origin", origin_body) as origin:
            async with AsyncClient(origin.grpc_address) as oc:
                await oc.volume("base").write(0, BASE[: 8 * SS])

            async def serving() -> bool:
                status = await health(cache.grpc_address)
                return status == int(health_pb2.HealthCheckResponse.SERVING)

            await eventually("the cache tier to turn SERVING", serving)
            assert await client.volume("vm").read(0, 8) == BASE[: 8 * SS]
            assert (await client.volume("vm").info()).sector_count == 2048


async def test_callers_refused_during_an_outage_do_not_keep_the_tier_down(
    tmp_path: Path,
) -> None:
    """Callers refused while the origin is down are remembered and passed on in the attach
    attempts' ``tierdisk-waiting``; a crowd of them (here three calls that each say they wait
    for 200 volumes) made that header pass gRPC's metadata limit, so the tier never attached,
    also once its origin was back. It attaches now."""
    listen = f"127.0.0.1:{free_port()}"
    body = toml_volume("vm", ram(), remote(listen, "base", timeout=1))
    async with running_server(tmp_path / "cache", body) as cache:
        async with grpc.aio.insecure_channel(cache.grpc_address) as channel:
            stub = pb_grpc.BlockDeviceStub(channel)
            for c in range(3):
                waiting = ",".join(f"10.9.{c}.{i}:7400~{i:06x}/vm-{i:04d}" for i in range(200))
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.GetVolume(
                        pb.GetVolumeRequest(volume="vm"),
                        metadata=((hops.WAITING_HEADER, waiting),),
                        timeout=5,
                    )
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        origin_body = server_section(listen, tmp_path / "origin") + toml_volume("base", ram("1MiB"))
        async with running_server(tmp_path / "origin", origin_body):

            async def serving() -> bool:
                status = await health(cache.grpc_address)
                return status == int(health_pb2.HealthCheckResponse.SERVING)

            await eventually("the cache tier to turn SERVING", serving, 20)


# -- the hop guard ---------------------------------------------------------------------------------


async def test_a_loop_between_two_servers_fails_fast(tmp_path: Path) -> None:
    """A's volume is remote → B's, and B's is remote → A's. Neither could attach while the
    other is not ready, so B first serves a plain volume; A attaches to it; then B is
    replaced on the same address by one whose volume is remote → A's. A read now loops."""
    a_listen, b_listen = (f"127.0.0.1:{free_port()}" for _ in range(2))
    a_body = server_section(a_listen, tmp_path / "a") + toml_volume(
        "va", remote(b_listen, "vb", timeout=2, retries=1)
    )
    b1_body = server_section(b_listen, tmp_path / "b1") + toml_volume("vb", ram("1MiB"))
    b2_body = server_section(b_listen, tmp_path / "b2") + toml_volume(
        "vb", remote(a_listen, "va", timeout=2, retries=1)
    )
    async with running_server(tmp_path / "b1", b1_body):
        a_cm = running_server(tmp_path / "a", a_body)
        a = await a_cm.__aenter__()
    try:
        async with (
            running_server(tmp_path / "b2", b2_body),
            AsyncClient(a.grpc_address, retries=0, timeout=10) as client,
        ):

            async def refused() -> cerr.FailedPrecondition | None:
                started = time.monotonic()
                try:
                    await client.volume("va").read(0, 8)
                except cerr.FailedPrecondition as exc:
                    assert time.monotonic() - started < 2  # not retried, not recursed
                    return exc
                except cerr.Unavailable:
                    return None  # A's channel is still reconnecting to the new B
                raise AssertionError("a read through a loop of tiers succeeded")

            exc = await eventually("the loop to be refused", refused, retry_on=cerr.TierdiskError)
            assert exc.code == grpc.StatusCode.FAILED_PRECONDITION
            assert isinstance(exc, cerr.TierLoop)  # passed on as such by the tier between
            assert "loop" in exc.message
            assert f"{a_listen}/va → {b_listen}/vb → {a_listen}/va" in exc.message
    finally:
        await a_cm.__aexit__(None, None, None)


async def test_two_volumes_waiting_for_each_other_at_start_are_a_loop(tmp_path: Path) -> None:
    """A's volume is remote → B's and B's remote → A's, both started from nothing: no call
    chain forms (each only answers the other "not ready"), yet both must end with the loop
    named (and keep retrying at the attach backoff), instead of waiting silently."""
    a_listen, b_listen = (f"127.0.0.1:{free_port()}" for _ in range(2))
    a_body = server_section(a_listen, tmp_path / "a") + toml_volume(
        "va", remote(b_listen, "vb", timeout=2, retries=0)
    )
    b_body = server_section(b_listen, tmp_path / "b") + toml_volume(
        "vb", ram(), remote(a_listen, "va", timeout=2, retries=0)
    )
    async with (
        running_server(tmp_path / "a", a_body) as a,
        running_server(tmp_path / "b", b_body) as b,
        AsyncClient(a.grpc_address, retries=0, timeout=5) as ca,
        AsyncClient(b.grpc_address, retries=0, timeout=5) as cb,
    ):
        for client, name in ((ca, "va"), (cb, "vb")):

            async def looped(client: AsyncClient = client, name: str = name) -> str | None:
                try:
                    await client.volume(name).info()
                except cerr.Unavailable as exc:
                    return exc.message if "request loop between tiers" in exc.message else None
                raise AssertionError(f"{name} attached through a loop")

            message = await eventually(
                f"{name} to report the loop", looped, seconds=30, retry_on=cerr.TierdiskError
            )
            assert f"{a_listen}/va → {b_listen}/vb → {a_listen}/va" in message or (
                f"{b_listen}/vb → {a_listen}/va → {b_listen}/vb" in message
            )
        assert not a.registry.all_ready and not b.registry.all_ready


async def test_a_loop_claimed_by_a_forged_waiting_header_does_not_keep_a_volume_down(
    tmp_path: Path,
) -> None:
    """S's v is remote → T's t, and t remote → O's o, O not started yet: both attach in the
    background. A caller with no standing tells S that T/t waits for v (a forged
    ``tierdisk-waiting`` header), so T refuses v's next attach as a loop. Once O is up and
    t attaches, v must attach too: the loop refusal is retried like any other answer of a
    remote tier, not taken as final (which kept v down until a restart)."""
    s_listen, t_listen, o_listen = (f"127.0.0.1:{free_port()}" for _ in range(3))
    s_body = server_section(s_listen, tmp_path / "s") + toml_volume(
        "v", remote(t_listen, "t", timeout=2, retries=0)
    )
    t_body = server_section(t_listen, tmp_path / "t") + toml_volume(
        "t", remote(o_listen, "o", timeout=2, retries=0)
    )
    o_body = server_section(o_listen, tmp_path / "o") + toml_volume("o", ram("1MiB"))
    async with (
        running_server(tmp_path / "t", t_body) as t,
        running_server(tmp_path / "s", s_body) as s,
        grpc.aio.insecure_channel(s_listen) as channel,
    ):
        stub = pb_grpc.BlockDeviceStub(channel)
        forged = ((hops.WAITING_HEADER, hops.hop_id(t.server_id, "t")),)

        async def refused_as_a_loop() -> bool:
            try:
                await stub.GetVolume(pb.GetVolumeRequest(volume="v"), metadata=forged)
            except grpc.aio.AioRpcError as err:  # not ready yet, and why
                return "request loop between tiers" in (err.details() or "")
            raise AssertionError("v attached with t not ready")

        await eventually("v's attach to be refused as a loop", refused_as_a_loop, seconds=30)
        async with running_server(tmp_path / "o", o_body):

            async def both_ready() -> bool:
                return t.registry.all_ready and s.registry.all_ready

            await eventually("t, then v, to attach", both_ready, seconds=60)


async def test_three_volumes_waiting_in_a_cycle_at_start_are_a_loop(tmp_path: Path) -> None:
    """A → B → C → A, all started from nothing: each attach tells the next tier who waits
    for it, passed on, so the cycle is found however long it is, not retried forever."""
    listens = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    names = ["va", "vb", "vc"]
    bodies = [
        server_section(listens[i], tmp_path / names[i])
        + toml_volume(names[i], ram(), remote(listens[(i + 1) % 3], names[(i + 1) % 3], timeout=2))
        for i in range(3)
    ]
    async with contextlib.AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(running_server(tmp_path / names[i], bodies[i]))
            for i in range(3)
        ]
        client = await stack.enter_async_context(
            AsyncClient(servers[0].grpc_address, retries=0, timeout=5)
        )

        async def looped() -> str | None:
            try:
                await client.volume("va").info()
            except cerr.Unavailable as exc:
                return exc.message if "request loop between tiers" in exc.message else None
            raise AssertionError("va attached through a loop")

        await eventually("va to report the loop", looped, seconds=30, retry_on=cerr.TierdiskError)
        assert not any(s.registry.all_ready for s in servers)


async def test_servers_depending_on_each_other_without_a_loop_both_attach(
    tmp_path: Path,
) -> None:
    """O's v1 is remote → R's y, and R's y remote → O's v2 (a plain volume): the servers
    depend on each other, the volumes do not loop. Started in the awkward order (O first,
    its v1 waiting for R), both must become ready."""
    o_listen, r_listen = (f"127.0.0.1:{free_port()}" for _ in range(2))
    o_body = server_section(o_listen, tmp_path / "o") + (
        toml_volume("v1", remote(r_listen, "y", timeout=2, retries=0))
        + toml_volume("v2", ram("1MiB"))
    )
    r_body = server_section(r_listen, tmp_path / "r") + toml_volume(
        "y", remote(o_listen, "v2", timeout=2, retries=0)
    )
    async with running_server(tmp_path / "o", o_body) as o:
        assert not o.registry.all_ready
        async with running_server(tmp_path / "r", r_body) as r:

            async def both_ready() -> bool:
                return o.registry.all_ready and r.registry.all_ready

            await eventually("both servers to be ready", both_ready, seconds=30)


async def test_one_server_may_serve_several_tiers_of_a_chain(tmp_path: Path) -> None:
    """A loop is a volume reached twice, not a server: A/a -> B/b -> A/base is a chain, and
    so is a volume whose remote is another volume of its own server (both are refused by a
    guard that counts servers)."""
    a_listen = f"127.0.0.1:{free_port()}"
    async with running_server(tmp_path / "b0", toml_volume("parked", ram("64KiB"))) as b0:
        b_listen = b0.grpc_address
    a_body = (
        server_section(a_listen, tmp_path / "a")
        + toml_volume("base", ram("2MiB"))
        + toml_volume("a", ram(), remote(b_listen, "b", timeout=2))
        + toml_volume("self", ram(), remote(a_listen, "base", timeout=2))
    )
    b_body = server_section(b_listen, tmp_path / "b") + toml_volume(
        "b", ram(), remote(a_listen, "base", timeout=2)
    )
    async with running_server(tmp_path / "a", a_body) as a:
        async with AsyncClient(a.grpc_address) as client:
            await client.volume("base").write(0, BASE)
            assert await client.volume("self").read(0, BASE_SECTORS) == BASE
            async with running_server(tmp_path / "b", b_body):

                async def attached() -> bool:
                    try:
                        return await client.volume("a").read(0, 64) == BASE[: 64 * SS]
                    except cerr.Unavailable:
                        return False  # A's volume "a" attaches in the background

                assert await eventually(
                    "A/a -> B/b -> A/base to read", attached, retry_on=cerr.TierdiskError
                )


async def test_a_chain_deeper_than_eight_fails_fast(tmp_path: Path) -> None:
    """Nine tiers in a row: a read entering at the top would pass nine servers (refused);
    entering at the second it passes eight (allowed)."""
    async with contextlib.AsyncExitStack() as stack:
        below = await stack.enter_async_context(
            running_server(tmp_path / "s9", toml_volume("v", ram("64KiB")))
        )
        async with AsyncClient(below.grpc_address) as c:
            await c.volume("v").write(0, BASE[: 8 * SS])
        servers = [below]
        for n in range(8, 0, -1):
            body = toml_volume("v", remote(servers[-1].grpc_address, "v"))
            servers.append(
                await stack.enter_async_context(running_server(tmp_path / f"s{n}", body))
            )
        top, second = servers[-1], servers[-2]
        async with AsyncClient(second.grpc_address, retries=0) as c:
            assert await c.volume("v").read(0, 8) == BASE[: 8 * SS]
        async with AsyncClient(top.grpc_address, retries=0) as c:
            with pytest.raises(cerr.FailedPrecondition) as info:
                await c.volume("v").read(0, 8)
        assert "deeper than 8" in info.value.message
        assert isinstance(info.value, cerr.TierLoop)
        assert top.grpc_address in info.value.message
        assert below.grpc_address in info.value.message


async def test_a_stop_right_after_the_origin_restarted_still_flushes_through_it(
    tmp_path: Path,
) -> None:
    """The final flush of a write-through tier asks an origin that answers ``UNAVAILABLE``
    again for a few seconds: an origin that restarts while the tier stops is back before
    the tier's channel to it has reconnected, and the flush went out (and failed: exit 1)
    while the channel still waited. Here the origin is down when the stop begins and is
    back 0.5 s later."""
    raw = {"kind": "raw", "path": "base.img", "size": "1MiB"}
    listen, config, origin = origin_process(tmp_path / "origin", raw)
    try:
        body = toml_volume("vm", ram(write_through=True), remote(listen, "base", timeout=1))
        async with running_server(tmp_path / "cache", body) as cache:
            async with AsyncClient(cache.grpc_address) as client:
                await client.volume("vm").write(0, BASE[: 8 * SS])
            origin.terminate()
            close_streams(origin)
            stopping = asyncio.ensure_future(cache.stop(grace=1))
            await asyncio.sleep(0.5)
            # (off the loop: the cache server runs on it, and a start that blocked it for
            # longer than the flush's 1 s timeout failed the flush on a loaded machine)
            origin = await asyncio.to_thread(
                ServerProcess.start, config.parent, config, listen=listen
            )
            assert await asyncio.wait_for(stopping, 30) == []  # no volume's flush failed
        async with AsyncClient(listen) as oc:
            assert await oc.volume("base").read(0, 8) == BASE[: 8 * SS]
    finally:
        origin.kill()
        close_streams(origin)


@pytest.mark.parametrize(
    ("done", "at_stake"),
    [
        ("read, read-only volume", False),
        ("read and resized", False),
        ("written and flushed", False),
        ("written after its flush", True),
        ("written and flushed, volatile origin", True),
        ("written and flushed, then a write failed", False),
    ],
)
async def test_a_tier_stopped_while_its_origin_is_down_fails_its_stop_only_for_writes_at_stake(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    done: str,
    at_stake: bool,
) -> None:
    """A tier whose origin is down when it stops cannot flush through it. That fails the
    stop (``Server.unflushed``: exit 1, the volume's verifier entry unclean, the next start
    says it did not stop cleanly) only when a write is at stake: one acknowledged since the
    volume's last flush, or on a volatile write path (an origin that keeps nothing past
    its restart) any write at all, flushed or not (its clients learn of the origin's
    restart only through the tier's verifier). A read-only volume, one only read or resized
    (a resize syncs), one whose writes were all flushed to a durable origin, have none:
    their stop warns and is clean; so does one whose only write since its last flush
    failed (against the origin, down by then): it was acknowledged to no one."""
    monkeypatch.setattr(server_module, "_FINAL_FLUSH_PATIENCE", 0.3)
    base = ram("1MiB") if "volatile" in done else {"kind": "raw", "path": "b.img", "size": "1MiB"}
    async with running_server(tmp_path / "origin", toml_volume("base", base)) as origin:
        async with AsyncClient(origin.grpc_address) as client:
            await client.volume("base").write(0, BASE[: 8 * SS])
        body = toml_volume(
            "vm", remote(origin.grpc_address, "base", timeout=1), read_only="read-only" in done
        )
        async with running_server(tmp_path / "tier", body) as tier:
            async with AsyncClient(tier.grpc_address, retries=0) as client:
                vol = client.volume("vm")
                assert await vol.read(0, 8) == BASE[: 8 * SS]
                if "resized" in done:
                    await vol.resize(4096)
                if "written" in done:
                    await vol.write(8, BASE[: 8 * SS])
                    await vol.flush()
                if "after" in done:
                    await vol.write(16, BASE[: 8 * SS])
            await origin.stop(grace=1)
            if "failed" in done:
                async with AsyncClient(tier.grpc_address, retries=0, timeout=5) as client:
                    with pytest.raises((cerr.Unavailable, cerr.DeadlineExceeded)):
                        await client.volume("vm").write(24, BASE[: 8 * SS])
            with caplog.at_level(logging.WARNING, logger="tierdisk.service.server"):
                unflushed = await tier.stop(grace=1)
    assert unflushed == (["vm"] if at_stake else [])
    record = json.loads((tmp_path / "tier" / "data" / "write-verifiers.json").read_text())
    assert record["volumes"]["vm"]["clean"] is not at_stake
    warned = [r.getMessage() for r in caplog.records if "no write is at stake" in r.getMessage()]
    assert len(warned) == (0 if at_stake else 1), caplog.text


async def test_a_stop_that_ends_the_start_reports_a_failed_final_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Volumes are served as they open, so a stop that ends a start (one volume's tier
    slow to answer) flushes volumes that took writes; a flush that fails there is reported
    (``Server.unflushed``: ``tierdisk serve`` exits 1) as at any stop, not dropped."""
    monkeypatch.setattr(server_module, "_FINAL_FLUSH_PATIENCE", 0.3)
    with socket.socket() as silent:  # accepts connections, never answers: an attach waits
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        slow = f"127.0.0.1:{silent.getsockname()[1]}"
        origin_body = toml_volume("base", ram("1MiB"))
        async with running_server(tmp_path / "origin", origin_body) as origin:
            body = toml_volume(
                "a", ram(write_through=True), remote(origin.grpc_address, "base")
            ) + toml_volume("b", ram(), remote(slow, "base", timeout=10))
            server = Server(load_config(str(write_config(tmp_path / "cache", body)), environ={}))
            starting = asyncio.ensure_future(server.start())

            def a_served() -> bool:
                return any(v.name == "a" for v in server.registry.ready_volumes())

            await eventually("volume a to be served", a_served)
            async with AsyncClient(server.grpc_address) as client:
                await client.volume("a").write(0, BASE[:SS])
        # the origin is gone: a's final flush cannot reach it
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
    assert server.unflushed == ["a"]


async def test_a_flush_through_a_tier_whose_origin_was_killed_reports_writes_lost(
    tmp_path: Path,
) -> None:
    """Writes a write-through tier passed on, which the origin acknowledged and lost in a
    kill before any flush: the tier's next flush cannot vouch for them. Its remote layer
    learns it from the origin's verifier and the tier renews its own, so every caller that
    wrote before is told (``WritesLost``, ``DATA_LOSS``) at its next flush, whichever
    flush found the loss; each once. A caller with nothing unflushed is not told, also when
    its flush is the one that found it. (A SIGTERM of the origin, a clean stop, tells
    nobody: tests/test_verifiers.py.)"""
    sparse = {"kind": "sparse", "path": "b.sparse", "size": "1MiB"}
    listen, config, origin = origin_process(tmp_path / "origin", sparse)
    try:
        body = toml_volume("vm", ram(write_through=True), remote(listen, "base", timeout=2))
        async with (
            running_server(tmp_path / "tier", body) as tier,
            AsyncClient(tier.grpc_address, timeout=20) as first,
            AsyncClient(tier.grpc_address, timeout=20) as second,
            AsyncClient(tier.grpc_address, timeout=20) as reader,
        ):
            a, b, idle = first.volume("vm"), second.volume("vm"), reader.volume("vm")
            await a.write(0, pattern(1, 0, 8, SS))
            await b.write(8, pattern(2, 8, 8, SS))
            origin.close()
            origin = ServerProcess.start(config.parent, config, listen=listen)

            outcome = await eventually(  # the flush that finds the loss
                "a flush through the tier",
                lambda: _boxed(flushed(idle)),
                retry_on=(cerr.Unavailable, cerr.DeadlineExceeded),
            )
            assert outcome == [None]  # it wrote nothing: nothing of its own is at stake
            text = await scrape(tier.metrics_address)  # the operator's alert
            assert value(text, "tierdisk_write_verifier_changes_total", volume="vm") == 1
            for vol in (a, b):
                lost = await flushed(vol)
                assert isinstance(lost, cerr.WritesLost), lost
                assert lost.code == grpc.StatusCode.DATA_LOSS
            assert await flushed(a) is None and await flushed(b) is None  # once each
            await a.write(16, pattern(3, 16, 8, SS))
            assert await flushed(a) is None
    finally:
        origin.close()


async def test_a_tier_over_a_volatile_origin_is_volatile_and_reports_its_restart(
    tmp_path: Path,
) -> None:
    """An origin volume in memory keeps nothing past a restart (``Volume.volatile``): a
    tier whose writes land only there is volatile too, and says so up the chain; a caller
    that wrote and flushed through it learns at its first flush after the origin
    restarted (cleanly) that its writes are gone."""
    listen, config, origin = origin_process(tmp_path / "origin", ram("1MiB"))
    try:
        body = toml_volume("vm", ram(write_through=True), remote(listen, "base", timeout=2))
        async with (
            running_server(tmp_path / "tier", body) as tier,
            AsyncClient(tier.grpc_address, timeout=20) as client,
        ):
            vol = client.volume("vm")
            assert (await vol.info()).volatile
            await vol.write(0, pattern(1, 0, 8, SS))
            await vol.flush()
            assert origin.terminate() == 0
            origin.close()
            origin = ServerProcess.start(config.parent, config, listen=listen)

            outcome = await eventually(
                "a flush through the tier",
                lambda: _boxed(flushed(vol)),
                retry_on=(cerr.Unavailable, cerr.DeadlineExceeded),
            )
            assert isinstance(outcome[0], cerr.WritesLost), outcome
    finally:
        origin.close()


async def flushed(vol: AsyncVolume) -> BaseException | None:
    """What ``vol.flush()`` raised (None: it succeeded). A tier whose channel to its origin
    is not back yet (``UNAVAILABLE``, ``DEADLINE_EXCEEDED``) raises, for ``eventually`` to
    try again."""
    try:
        await vol.flush()
    except (cerr.Unavailable, cerr.DeadlineExceeded):
        raise
    except cerr.TierdiskError as exc:
        return exc
    return None


async def _boxed(result: Awaitable[T]) -> list[T]:
    """``[await result]``: a value ``eventually`` takes as an answer, even None."""
    return [await result]


async def test_a_clean_restart_of_a_tier_over_a_volatile_origin_loses_nothing(
    tmp_path: Path,
) -> None:
    """The tier is volatile (its origin is), but its own restart loses nothing (the origin
    keeps running): it keeps its verifier over a clean stop, and a caller that wrote and
    flushed before is not told of a loss."""
    listen, _, origin = origin_process(tmp_path / "origin", ram("1MiB"))
    try:
        tier_listen = f"127.0.0.1:{free_port()}"
        body = server_section(tier_listen, tmp_path / "tier") + toml_volume(
            "vm", remote(listen, "base", timeout=2)
        )
        async with AsyncClient(tier_listen, timeout=20) as client:
            vol = client.volume("vm")
            async with running_server(tmp_path / "tier", body):
                assert (await vol.info()).volatile
                await vol.write(0, pattern(1, 0, 8, SS))
                await vol.flush()
                before = (await vol.inspect())["write_verifier"]
            async with running_server(tmp_path / "tier", body):
                await vol.flush()
                assert (await vol.inspect())["write_verifier"] == before
                assert await vol.read(0, 8) == pattern(1, 0, 8, SS)
    finally:
        origin.close()
