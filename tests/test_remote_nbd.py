"""The ``remote`` layer's ``nbd`` option (:mod:`tierdisk.service.layers.remote_nbd`) against
real servers on 127.0.0.1 (in-process, port 0): reads go over the origin's NBD export (an
address, or ``"auto"``: asked of the origin), an export that is not usable or belongs to
another server (or to the reading server itself) is not used and ``inspect`` says why,
and says it as things are now (a connection that breaks with no read in flight; a target
that came back), reads follow the origin as it grows, and the option's rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from servers import (
    ServerProcess,
    free_port,
    metric,
    ram,
    remote,
    running_server,
    toml_volume,
    write_config,
)
from stacks import pattern
from waiting import eventually

from tierdisk.client import AsyncClient
from tierdisk.client import errors as cerr
from tierdisk.service.errors import ConfigError
from tierdisk.service.layers import remote_nbd
from tierdisk.service.layers.remote import RemoteLayer
from tierdisk.service.server import Server

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
SS = 512


NBD_BASE = pattern(5, 0, 4 * MiB // SS, SS)


def nbd_server_config(data_dir: Path, size: str) -> str:
    """A server with its NBD export on (port 0) and one RAM volume ``base`` of ``size``."""
    return (
        '[server]\nlisten = "127.0.0.1:0"\nmetrics = ""\nnbd = "127.0.0.1:0"\n'
        f'data_dir = "{data_dir}"\n'
    ) + toml_volume("base", ram(size))


@pytest.fixture
async def nbd_origin(tmp_path: Path) -> AsyncIterator[Server]:
    """An origin with its NBD export on: ``base`` (4 MiB of a pattern)."""
    body = nbd_server_config(tmp_path / "nbd-origin", "4MiB")
    async with running_server(tmp_path / "nbd-origin", body) as srv:
        async with AsyncClient(srv.grpc_address) as client:
            await client.volume("base").write(0, NBD_BASE)
        yield srv


async def test_reads_go_over_the_origins_nbd_export(nbd_origin: Server, tmp_path: Path) -> None:
    o = nbd_origin
    body = toml_volume("vm", ram(), remote(o.grpc_address, "base", nbd=o.nbd_address))
    async with (
        running_server(tmp_path / "proxy", body) as proxy,
        AsyncClient(proxy.grpc_address) as client,
    ):
        vol = client.volume("vm")
        assert await vol.read(0, 4 * MiB // SS) == NBD_BASE
        await vol.write(8, b"w" * SS)  # lands on the ram layer on top
        assert await vol.read(0, 16) == NBD_BASE[: 8 * SS] + b"w" * SS + NBD_BASE[9 * SS : 16 * SS]
        tree = await vol.inspect("layers/1")
        assert isinstance(tree["nbd"].pop("checked_s_ago"), (int, float))
        assert tree["nbd"] == {
            "option": o.nbd_address,
            "address": o.nbd_address,
            "connected": True,
            "export_bytes": 4 * MiB,
            "problem": "",
            "tls": False,
        }
        assert "Read" not in tree["requests"]  # no data over gRPC
        nbd_reads = tree["requests"]["NbdRead"]["OK"]
        assert nbd_reads >= 2
        labels = {"volume": "vm", "layer": "1"}
        counted = metric(
            proxy, "tierdisk_remote_requests_total", method="NbdRead", code="OK", **labels
        )
        assert counted == nbd_reads
        # the origin served them on its NBD export
        assert (
            metric(o, "tierdisk_volume_io_requests_total", volume="base", op="read", code="OK") >= 2
        )


async def test_nbd_auto_asks_the_target_where_its_export_is(
    nbd_origin: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``nbd = "auto"``: the layer takes the NBD address from the origin (its Inspect tree's
    ``nbd/address``) and reads over it; an origin without an NBD export leaves the reads on
    gRPC, and the layer says why, in ``inspect`` and once in the log, not as a warning (with
    ``auto`` that is no fault)."""
    caplog.set_level(logging.INFO, logger="tierdisk.service.layers.remote_nbd")
    o = nbd_origin
    plain = tmp_path / "plain"
    plain_body = f'[server]\nlisten = "127.0.0.1:0"\nmetrics = ""\ndata_dir = "{plain}"\n'
    async with running_server(plain, plain_body + toml_volume("base", ram("4MiB"))) as no_nbd:
        async with AsyncClient(no_nbd.grpc_address) as client:
            await client.volume("base").write(0, NBD_BASE)
        body = toml_volume("vm", ram(), remote(o.grpc_address, "base", nbd="auto"))
        body += toml_volume("plain", remote(no_nbd.grpc_address, "base", nbd="auto"))
        async with (
            running_server(tmp_path / "proxy", body) as proxy,
            AsyncClient(proxy.grpc_address) as client,
        ):
            vol = client.volume("vm")
            assert await vol.read(0, 4 * MiB // SS) == NBD_BASE
            tree = await vol.inspect("layers/1")
            assert isinstance(tree["nbd"].pop("checked_s_ago"), (int, float))
            assert tree["nbd"] == {
                "option": "auto",
                "address": o.nbd_address,
                "connected": True,
                "export_bytes": 4 * MiB,
                "problem": "",
                "tls": False,
            }
            assert "Read" not in tree["requests"] and tree["requests"]["NbdRead"]["OK"] >= 2

            plain_vol = client.volume("plain")
            assert await plain_vol.read(0, 64) == NBD_BASE[: 64 * SS]
            tree = await plain_vol.inspect("layers/0")
            assert tree["nbd"]["option"] == "auto" and tree["nbd"]["address"] == ""
            assert tree["nbd"]["connected"] is False
            assert "serves no NBD export" in tree["nbd"]["problem"]
            assert tree["requests"]["Read"] == {"OK": 1} and "NbdRead" not in tree["requests"]
            # asking where the export is is no failed call (the remote-errors alert reads them)
            codes = {code for calls in tree["requests"].values() for code in calls}
            assert codes == {"OK"}, tree["requests"]
    said = [r for r in caplog.records if "serves no NBD export" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.INFO]
    # Each line names the local volume and layer first (two volumes over one origin).
    assert said[0].getMessage().startswith(f"volume 'plain', layer 0: remote {no_nbd.grpc_address}")
    using = [r.getMessage() for r in caplog.records if "reading over NBD at" in r.getMessage()]
    assert using and using[0].startswith(f"volume 'vm', layer 1: remote {o.grpc_address}"), using


async def test_by_default_reads_stay_on_grpc_where_the_target_exports_nbd(
    nbd_origin: Server, tmp_path: Path
) -> None:
    """With no ``nbd`` option a layer reads over gRPC, also from an origin that exports NBD
    (NBD reads pass the loop and depth guard by: the layer's docstring); ``nbd = "auto"``
    reads over the export."""
    o = nbd_origin
    body = toml_volume("vm", remote(o.grpc_address, "base"))
    body += toml_volume("auto", remote(o.grpc_address, "base", nbd="auto"))
    async with (
        running_server(tmp_path / "proxy", body) as proxy,
        AsyncClient(proxy.grpc_address) as client,
    ):
        vol = client.volume("vm")
        assert await vol.read(0, 4 * MiB // SS) == NBD_BASE
        tree = await vol.inspect("layers/0")
        assert "nbd" not in tree and "NbdRead" not in tree["requests"]
        assert tree["requests"]["Read"]["OK"] >= 1

        auto = client.volume("auto")
        assert await auto.read(0, 4 * MiB // SS) == NBD_BASE
        tree = await auto.inspect("layers/0")
        assert tree["nbd"]["address"] == o.nbd_address and tree["nbd"]["connected"] is True
        assert "Read" not in tree["requests"] and tree["requests"]["NbdRead"]["OK"] >= 1


@pytest.mark.parametrize(
    ("options", "nbd"),
    [
        ({}, None),
        ({"nbd": ""}, None),
        ({"nbd": "auto"}, "auto"),
        ({"nbd": "127.0.0.1:10809"}, "127.0.0.1:10809"),
    ],
)
def test_the_nbd_option_is_off_unless_given(options: dict[str, Any], nbd: str | None) -> None:
    layer = RemoteLayer("127.0.0.1:1", "base", **options)
    shown = layer.inspect().get("nbd")
    assert (shown["option"] if shown else None) == nbd


async def test_without_a_usable_nbd_export_reads_go_over_grpc(
    nbd_origin: Server, tmp_path: Path
) -> None:
    o = nbd_origin
    # another server whose NBD export "base" is a smaller volume: not this layer's volume
    other = nbd_server_config(tmp_path / "other", "1MiB")
    async with running_server(tmp_path / "other", other) as wrong:
        body = toml_volume("a", remote(o.grpc_address, "base", nbd=f"127.0.0.1:{free_port()}"))
        body += toml_volume("b", remote(o.grpc_address, "base", nbd=wrong.nbd_address))
        async with (
            running_server(tmp_path / "proxy", body) as proxy,
            AsyncClient(proxy.grpc_address) as client,
        ):
            for name, problem in (("a", "not usable"), ("b", "is 1048576 bytes")):
                vol = client.volume(name)
                assert await vol.read(0, 64) == NBD_BASE[: 64 * SS]
                tree = await vol.inspect("layers/0")
                assert tree["nbd"]["connected"] is False, name
                assert problem in tree["nbd"]["problem"], name
                assert tree["requests"]["Read"] == {"OK": 1}, name
                assert "NbdRead" not in tree["requests"], name


async def test_an_nbd_export_of_another_server_is_not_used(
    nbd_origin: Server, tmp_path: Path
) -> None:
    """``nbd`` naming another server with a volume of the same name and size (a wrong port,
    another region's origin): its data must never be read as the target's. The export names
    its server in its description; the layer compares that with the target's own id."""
    o = nbd_origin
    other = nbd_server_config(tmp_path / "other", "4MiB")
    async with running_server(tmp_path / "other", other) as wrong:
        async with AsyncClient(wrong.grpc_address) as wclient:
            await wclient.volume("base").write(0, b"\xee" * (64 * SS))  # not the origin's data
        body = toml_volume("vm", remote(o.grpc_address, "base", nbd=wrong.nbd_address))
        async with (
            running_server(tmp_path / "proxy", body) as proxy,
            AsyncClient(proxy.grpc_address) as client,
        ):
            vol = client.volume("vm")
            assert await vol.read(0, 64) == NBD_BASE[: 64 * SS]
            tree = await vol.inspect("layers/0")
            assert tree["nbd"]["connected"] is False
            problem = tree["nbd"]["problem"]
            assert f"is served by {wrong.server_id}" in problem, problem
            assert o.server_id in problem, problem
            assert "NbdRead" not in tree["requests"]


async def test_an_nbd_address_of_the_server_itself_is_not_used(
    nbd_origin: Server, tmp_path: Path
) -> None:
    """A cache server whose ``nbd`` names its own export of the volume: reading it would be
    reading itself, each read waiting on another. It reads over gRPC from the target."""
    o = nbd_origin
    sock = tmp_path / "self.nbd"
    body = (
        f'[server]\nlisten = "127.0.0.1:0"\nmetrics = ""\nnbd = "unix:{sock}"\n'
        f'data_dir = "{tmp_path / "proxy"}"\n'
    ) + toml_volume("base", ram(), remote(o.grpc_address, "base", nbd=f"unix:{sock}"))
    async with (
        running_server(tmp_path / "proxy", body) as proxy,
        AsyncClient(proxy.grpc_address) as client,
    ):
        vol = client.volume("base")
        assert (await vol.inspect("server"))["value"] == proxy.server_id
        # The export starts after the volumes attach: the layer tries again in the background.
        deadline = time.monotonic() + 15
        while (
            f"is served by {proxy.server_id}"
            not in (nbd := await vol.inspect("layers/1/nbd"))["problem"]
        ):
            assert time.monotonic() < deadline, nbd
            await asyncio.sleep(0.05)
        assert nbd["connected"] is False
        assert await vol.read(0, 64) == NBD_BASE[: 64 * SS]
        assert "NbdRead" not in (await vol.inspect("layers/1"))["requests"]


async def test_nbd_reads_follow_the_origin_as_it_grows(nbd_origin: Server, tmp_path: Path) -> None:
    o = nbd_origin
    body = toml_volume("vm", remote(o.grpc_address, "base", nbd=o.nbd_address))
    async with (
        running_server(tmp_path / "proxy", body) as proxy,
        AsyncClient(proxy.grpc_address) as client,
        AsyncClient(o.grpc_address) as oclient,
    ):
        vol = client.volume("vm")
        await oclient.volume("base").resize(8 * MiB // SS)
        news = pattern(9, 0, 64, SS)
        await oclient.volume("base").write(6 * MiB // SS, news)

        async def grown() -> bool:
            tree = await vol.inspect("layers/0")
            return bool(tree["nbd"]["export_bytes"] == 8 * MiB and tree["nbd"]["connected"])

        deadline = time.monotonic() + 15
        while not await grown():
            assert time.monotonic() < deadline, "the NBD connection did not learn the new size"
            await asyncio.sleep(0.05)
        assert "NbdRead" not in (await vol.inspect("layers/0"))["requests"]
        assert await vol.read(6 * MiB // SS, 64) == news
        assert (await vol.inspect("layers/0"))["requests"]["NbdRead"] == {"OK": 1}


async def test_a_connection_that_breaks_shows_in_inspect_without_a_read(tmp_path: Path) -> None:
    """FINDINGS F7: the origin goes away while no read is in flight. ``inspect`` must not
    keep showing an unused connection with no problem until the next read: the break is
    seen at once, and so is why no new connection is made."""
    body = nbd_server_config(tmp_path / "origin", "4MiB")
    async with contextlib.AsyncExitStack() as stack:
        o = await stack.enter_async_context(running_server(tmp_path / "origin", body))
        proxy_body = toml_volume("vm", remote(o.grpc_address, "base", nbd=o.nbd_address))
        proxy = await stack.enter_async_context(running_server(tmp_path / "proxy", proxy_body))
        vol = (await stack.enter_async_context(AsyncClient(proxy.grpc_address))).volume("vm")
        assert await vol.read(0, 8) == bytes(8 * SS)
        assert (await vol.inspect("layers/0/nbd"))["connected"] is True
        await o.stop(grace=1)
        deadline = time.monotonic() + 5
        while (nbd := await vol.inspect("layers/0/nbd"))["problem"] == "":
            assert time.monotonic() < deadline, nbd
            await asyncio.sleep(0.05)
        assert nbd["connected"] is False and o.nbd_address in nbd["problem"], nbd
        assert (await vol.inspect("layers/0"))["requests"]["NbdRead"] == {"OK": 1}  # no other


async def test_the_nbd_problem_is_asked_anew_when_the_target_comes_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FINDINGS F7: ``nbd`` names another server's export, so it is not used, and the reason
    names the target's server id. The target restarts (a new id). The reason must follow
    when the target is back (the resize watch reconnected), not at the end of the NBD
    backoff, made long here (30 s) so only that can bring it."""
    monkeypatch.setattr(remote_nbd, "_BACKOFF", (30.0, 30.0))
    listen = f"127.0.0.1:{free_port()}"

    def target(folder: Path) -> str:
        return (
            f'[server]\nlisten = "{listen}"\nmetrics = ""\ndata_dir = "{folder}"\n'
            + toml_volume("base", ram("4MiB"))
        )

    other = nbd_server_config(tmp_path / "other", "4MiB")
    async with contextlib.AsyncExitStack() as stack:
        wrong = await stack.enter_async_context(running_server(tmp_path / "other", other))
        first = await stack.enter_async_context(
            running_server(tmp_path / "t1", target(tmp_path / "t1"))
        )
        proxy_body = toml_volume("vm", remote(listen, "base", nbd=wrong.nbd_address))
        proxy = await stack.enter_async_context(running_server(tmp_path / "proxy", proxy_body))
        vol = (await stack.enter_async_context(AsyncClient(proxy.grpc_address))).volume("vm")
        nbd = await vol.inspect("layers/0/nbd")
        assert f"is served by {wrong.server_id}" in nbd["problem"], nbd
        assert first.server_id in nbd["problem"], nbd
        await first.stop(grace=1)
        second = await stack.enter_async_context(
            running_server(tmp_path / "t2", target(tmp_path / "t2"))
        )
        assert second.server_id != first.server_id
        deadline = time.monotonic() + 10
        while second.server_id not in (nbd := await vol.inspect("layers/0/nbd"))["problem"]:
            assert time.monotonic() < deadline, nbd
            await asyncio.sleep(0.05)
        assert f"is served by {wrong.server_id}" in nbd["problem"], nbd
        assert nbd["checked_s_ago"] < 10
        assert await vol.read(0, 8) == bytes(8 * SS)


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"nbd": "127.0.0.1:10809", "mode": "layer"}, 'mode = "disk"'),
        ({"nbd": "127.0.0.1:10809", "token": "t"}, "nbd cannot be combined with a token"),
        ({"nbd": "127.0.0.1:10809", "tls": True, "token": "t"}, "with a token"),
        ({"nbd": "127.0.0.1"}, "127.0.0.1"),
        ({"nbd": "auto", "mode": "layer"}, 'mode = "disk"'),
        ({"nbd": "auto", "token": "t"}, "with a token"),
    ],
)
async def test_nbd_option_rules(tmp_path: Path, options: dict[str, Any], problem: str) -> None:
    body = toml_volume("vm", remote("127.0.0.1:1", "base", **options))
    with pytest.raises(ConfigError) as info:
        async with running_server(tmp_path, body):
            pass
    assert info.value.volume == "vm" and info.value.layer == 0 and problem in str(info.value)


async def test_reads_in_flight_when_one_gets_no_answer_end_with_it(tmp_path: Path) -> None:
    """The origin hangs (SIGSTOP) with NBD reads in flight: the first to reach the layer's
    ``timeout`` ends ``DEADLINE_EXCEEDED`` and closes the connection, and so do the others
    on it, at once. They were tried again over gRPC, each waiting a whole ``timeout`` more
    for the hung origin (up to twice the timeout in all), and counted as NBD connections
    that failed (``UNAVAILABLE``)."""
    config = write_config(tmp_path / "origin", nbd_server_config(tmp_path / "o-data", "4MiB"))
    with ServerProcess.start(tmp_path / "origin", config) as origin:
        body = toml_volume("vm", remote(origin.grpc, "base", nbd="auto", timeout=1))
        async with (
            running_server(tmp_path / "tier", body) as tier,
            AsyncClient(tier.grpc_address, retries=0, timeout=30) as client,
        ):
            vol = client.volume("vm")
            assert await vol.read(0, 8) == bytes(8 * SS)

            async def connected() -> bool:
                return bool((await vol.inspect("layers/0/nbd"))["connected"])

            await eventually("the NBD connection", connected)
            os.kill(origin.pid, signal.SIGSTOP)
            try:
                first = asyncio.ensure_future(vol.read(8, 8))
                await asyncio.sleep(0.4)  # the others start later: their own timeout is later
                others = [asyncio.ensure_future(vol.read(16 + 8 * i, 8)) for i in range(4)]
                results = await asyncio.gather(first, *others, return_exceptions=True)
            finally:
                os.kill(origin.pid, signal.SIGCONT)
            assert all(isinstance(r, cerr.DeadlineExceeded) for r in results), results
            requests = await vol.inspect("layers/0/requests")
            assert requests["NbdRead"].get("DEADLINE_EXCEEDED") == 5, requests
            assert "UNAVAILABLE" not in requests["NbdRead"], requests
            assert "Read" not in requests, requests  # none tried again over gRPC


async def test_a_connection_opened_as_the_layer_closes_is_closed_too(
    nbd_origin: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tier stops while its NBD path, connecting anew after the origin grew, asks the
    target who serves the export it has just opened: that connection is closed with the
    layer, not left holding one of the origin's ``nbd_max_connections``."""
    o = nbd_origin
    body = toml_volume("vm", remote(o.grpc_address, "base", nbd=o.nbd_address))
    sessions = {"volume": "base"}
    asking, never = asyncio.Event(), asyncio.Event()

    async def slow_answer(self: remote_nbd.NbdDataPath, served_by: str) -> str:
        asking.set()
        await never.wait()  # the target's Inspect does not come back before the stop
        return ""

    async with (
        running_server(tmp_path / "tier", body) as tier,
        AsyncClient(tier.grpc_address) as client,
        AsyncClient(o.grpc_address) as origin,
    ):
        vol = client.volume("vm")
        assert (await vol.inspect("layers/0/nbd"))["connected"]
        monkeypatch.setattr(remote_nbd.NbdDataPath, "_served_elsewhere", slow_answer)
        await origin.volume("base").resize(16 * MiB // SS)  # the tier connects anew
        await asyncio.wait_for(asking.wait(), 30)
        assert metric(o, "tierdisk_nbd_sessions_active", **sessions) == 2  # old and new

    async def closed() -> bool:
        return metric(o, "tierdisk_nbd_sessions_active", **sessions) == 0

    await eventually("the origin to see the tier's NBD connections end", closed)


async def test_a_grow_while_the_nbd_path_connects_is_followed(
    nbd_origin: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The origin grows again while the tier's NBD path is connecting anew after a grow
    (here: while it asks the target who serves the export): the path connects once more,
    so the export it reads is the volume's size, not the one it had a moment before."""
    o = nbd_origin
    body = toml_volume("vm", remote(o.grpc_address, "base", nbd=o.nbd_address))
    real = remote_nbd.NbdDataPath._served_elsewhere
    async with (
        running_server(tmp_path / "tier", body) as tier,
        AsyncClient(tier.grpc_address) as client,
        AsyncClient(o.grpc_address) as origin,
    ):
        vol = client.volume("vm")
        grown = False

        async def grow_meanwhile(self: remote_nbd.NbdDataPath, served_by: str) -> str:
            nonlocal grown
            if not grown:
                grown = True
                await origin.volume("base").resize(16 * MiB // SS)

                async def seen() -> bool:
                    return (await vol.info()).sector_count == 16 * MiB // SS

                await eventually("the tier to follow the second grow", seen)
            return await real(self, served_by)

        assert (await vol.inspect("layers/0/nbd"))["connected"]
        monkeypatch.setattr(remote_nbd.NbdDataPath, "_served_elsewhere", grow_meanwhile)
        await origin.volume("base").resize(8 * MiB // SS)

        async def follows() -> bool:
            tree = await vol.inspect("layers/0/nbd")
            return bool(grown and tree["connected"] and tree["export_bytes"] == 16 * MiB)

        await eventually("the NBD path to read the 16 MiB export", follows)
