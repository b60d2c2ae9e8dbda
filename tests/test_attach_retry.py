"""A volume attaching in the background (its remote tier was down at start): which answers
of the tier keep it retrying, and which make it give up. Real servers on 127.0.0.1.

- A tier that comes up answering "no such volume", or a gRPC server that is no tierdisk,
  and then turns into the right origin: the volume keeps retrying and attaches; meanwhile
  its ``UNAVAILABLE`` names the latest reason (not a stale one), and the refusal is logged
  at error level once, not on every attempt.
- A problem of the server's own, found once the remote answers (a layer's sector size that
  differs from the remote's): given up on, naming the problem; retrying cannot fix it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from servers import (
    ServerProcess,
    free_port,
    ram,
    remote,
    running_server,
    samples,
    server_section,
    toml_volume,
    write_config,
)

from tierdisk.client import AsyncClient
from tierdisk.client import errors as cerr
from tierdisk.service.ratelimit import tell_held_lines
from tierdisk.service.server import Server

pytestmark = pytest.mark.timeout(90)

SS = 512
DATA = bytes(range(256)) * (8 * SS // 256)


async def not_ready_reason(client: AsyncClient) -> str:
    """The reason the cache tier's volume ``v`` gives for not being ready ("" once it is)."""
    try:
        await client.volume("v").info()
    except (cerr.Unavailable, cerr.FailedPrecondition) as exc:  # (the latter: given up)
        return exc.message
    return ""


async def eventually_reason(client: AsyncClient, fragment: str, seconds: float = 20.0) -> str:
    """Poll until the not-ready reason contains ``fragment``; fail naming the last one."""
    deadline = asyncio.get_running_loop().time() + seconds
    last = ""
    while asyncio.get_running_loop().time() < deadline:
        last = await not_ready_reason(client)
        if fragment in last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"no reason with {fragment!r} within {seconds} s; last: {last!r}")


def refused_attempts(cache: Server, code: str) -> int:
    """GetVolume calls of the cache tier's remote layer (volume v, layer 1) answered ``code``."""
    return cache.metrics.remote_counts("v", 1).get(("GetVolume", code), 0)


@contextlib.asynccontextmanager
async def wrong_tier(kind: str, listen: str, tmp_path: Path) -> AsyncIterator[None]:
    """Something on ``listen`` that answers, but cannot serve volume ``base``."""
    if kind == "missing volume":  # a tierdisk without it (e.g. started with an old config)
        body = server_section(listen, tmp_path) + toml_volume("other", ram("1MiB"))
        async with running_server(tmp_path, body):
            yield
        return
    server = grpc.aio.server()  # a gRPC server, but not tierdisk: UNIMPLEMENTED
    server.add_insecure_port(listen)
    await server.start()
    try:
        yield
    finally:
        await server.stop(0)


WRONG_TIERS = {
    "missing volume": ("no volume named 'base'", "NOT_FOUND"),
    "not tierdisk": ("does not serve tierdisk.v1.BlockDevice", "UNIMPLEMENTED"),
}


@pytest.mark.parametrize("kind", sorted(WRONG_TIERS))
async def test_a_refusing_tier_is_retried_until_the_origin_serves_the_volume(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    reason, code = WRONG_TIERS[kind]
    listen = f"127.0.0.1:{free_port()}"
    body = toml_volume("v", ram(), remote(listen, "base", timeout=1))
    async with (
        running_server(tmp_path / "cache", body) as cache,
        AsyncClient(cache.grpc_address, retries=0, timeout=5) as client,
    ):
        assert "not reachable" in await not_ready_reason(client)  # the origin is down
        async with wrong_tier(kind, listen, tmp_path / "wrong"):
            await eventually_reason(client, reason)
            deadline = asyncio.get_running_loop().time() + 20
            while refused_attempts(cache, code) < 3:  # refused again and again, not given up
                assert asyncio.get_running_loop().time() < deadline, "stopped retrying"
                await asyncio.sleep(0.1)
            assert "retrying" in await eventually_reason(client, reason)
        # The latest reason, not the refusal of a tier that is gone.
        await eventually_reason(client, "not reachable")
        origin_body = server_section(listen, tmp_path / "origin") + toml_volume("base", ram("1MiB"))
        async with running_server(tmp_path / "origin", origin_body) as origin:
            async with AsyncClient(origin.grpc_address) as oc:
                await oc.volume("base").write(0, DATA)
            deadline = asyncio.get_running_loop().time() + 30
            while (last := await not_ready_reason(client)) != "":
                assert asyncio.get_running_loop().time() < deadline, f"never attached: {last}"
                await asyncio.sleep(0.1)
            assert await client.volume("v").read(0, len(DATA) // SS) == DATA
            assert cache.registry.all_ready
    logged = [
        r
        for r in caplog.records
        if r.name == "tierdisk.service.server" and reason in r.getMessage()
    ]
    # At error level, and once: the same refusal is not logged on every attempt.
    assert [r.levelno for r in logged] == [logging.ERROR], [r.getMessage() for r in logged]


async def test_a_problem_of_the_servers_own_is_not_retried(tmp_path: Path) -> None:
    """The top layer's sector size differs from the origin's: only a new config fixes
    that, so once the origin answers, the volume stops retrying and names the rule."""
    listen = f"127.0.0.1:{free_port()}"
    body = toml_volume("v", ram(sector_size=4096), remote(listen, "base", timeout=1))
    async with (
        running_server(tmp_path / "cache", body) as cache,
        AsyncClient(cache.grpc_address, retries=0, timeout=5) as client,
    ):
        origin_body = server_section(listen, tmp_path / "origin") + toml_volume("base", ram("1MiB"))
        async with running_server(tmp_path / "origin", origin_body):
            message = await eventually_reason(client, "sector size 4096 differs")
            assert "retrying" not in message
            deadline = asyncio.get_running_loop().time() + 5
            while not all(task.done() for task in cache._attaching.tasks):
                assert asyncio.get_running_loop().time() < deadline, "still retrying"
                await asyncio.sleep(0.05)
            attempts = refused_attempts(cache, "OK")
            await asyncio.sleep(1)
            assert refused_attempts(cache, "OK") == attempts
            assert not cache.registry.all_ready
            # told as what it is: no retry helps (not UNAVAILABLE "not ready yet"), and why
            with pytest.raises(cerr.FailedPrecondition, match="the server stopped trying"):
                await client.volume("v").info()
            [listed] = await client.list_volumes()
            assert not listed.ready and "sector size 4096 differs" in listed.problem
            cli = await asyncio.create_subprocess_exec(  # (this loop serves the cache tier)
                sys.executable,
                "-m",
                "tierdisk.client",
                "--server",
                cache.grpc_address,
                "volumes",
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await asyncio.wait_for(cli.communicate(), 60)
            assert out.decode().startswith("v\t(stopped until a restart: volume 'v', layer 0: ")


async def test_a_volume_given_up_on_is_the_last_word_of_its_attach_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The "still waiting for its remote tier" lines held back while the origin was down are
    counted in the line that gives up, not told later (at the stop, with its time) as if
    the server still waited and retried."""
    caplog.set_level(logging.INFO, logger="tierdisk.service.server")
    listen = f"127.0.0.1:{free_port()}"
    body = toml_volume("v", ram(sector_size=4096), remote(listen, "base", timeout=1))
    async with running_server(tmp_path / "cache", body) as cache:
        deadline = asyncio.get_running_loop().time() + 20
        while refused_attempts(cache, "UNAVAILABLE") < 3:  # the 2nd and 3rd held back
            assert asyncio.get_running_loop().time() < deadline, "not retrying"
            await asyncio.sleep(0.05)
        origin_body = server_section(listen, tmp_path / "origin") + toml_volume("base", ram("1MiB"))
        async with running_server(tmp_path / "origin", origin_body):
            while not all(task.done() for task in cache._attaching.tasks):
                assert asyncio.get_running_loop().time() < deadline, "still retrying"
                await asyncio.sleep(0.05)
        tell_held_lines()  # what `tierdisk serve` does as it stops
    said = [r.getMessage() for r in caplog.records if r.name == "tierdisk.service.server"]
    [gave_up] = [i for i, line in enumerate(said) if "not retrying" in line]
    assert "more of the previous kind were held back" in said[gave_up], said
    assert not [line for line in said[gave_up:] if "still waiting" in line], said


async def test_a_tier_that_stays_down_is_logged_once_a_minute_naming_the_volume(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """While the remote tier is down, the log says once which volume waits for it, then at
    most once a minute: not a line per attempt (about 13 a minute per volume) from the
    remote layer, which named only the remote's volume and a retry count the attach does
    not use."""
    listen = f"127.0.0.1:{free_port()}"
    body = toml_volume("v", ram(), remote(listen, "base", timeout=1))
    with caplog.at_level(logging.INFO, "tierdisk"):
        async with running_server(tmp_path / "cache", body) as cache:
            deadline = asyncio.get_running_loop().time() + 20
            while refused_attempts(cache, "UNAVAILABLE") < 5:  # five attempts, all refused
                assert asyncio.get_running_loop().time() < deadline, "stopped retrying"
                await asyncio.sleep(0.1)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    waiting = [line for line in lines if "base" in line or "not reachable" in line]
    assert all(line.startswith("volume 'v': ") for line in waiting), waiting
    assert 1 <= len(waiting) <= 2, waiting


def _refused_calls(metrics: str) -> float:
    """Calls of a server's remote layers answered ``UNAVAILABLE`` (its ``/metrics``)."""
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as reply:
        found = samples(reply.read().decode())
    return sum(
        count
        for (name, labels), count in found.items()
        if name == "tierdisk_remote_requests_total" and ("code", "UNAVAILABLE") in labels
    )


def test_lines_held_back_are_told_when_tierdisk_serve_stops(tmp_path: Path) -> None:
    """A volume waiting for a tier that is down is logged once, its later attempts held
    back (at most a line a minute); ``tierdisk serve`` stopping within that minute tells
    them, with their count, before it says it stopped."""
    body = toml_volume("v", ram(), remote(f"127.0.0.1:{free_port()}", "base", timeout=1))
    server = ServerProcess.start(tmp_path, write_config(tmp_path, body))
    try:
        deadline = time.monotonic() + 20
        while _refused_calls(server.metrics) < 6:  # (the lines of the last are held back)
            assert time.monotonic() < deadline, "stopped retrying"
            time.sleep(0.1)
    finally:
        assert server.terminate() == 0
    lines = server.stderr_text().splitlines()
    waiting = [line for line in lines if "retrying in the background" in line]
    stopped = next(i for i, line in enumerate(lines) if line.endswith("stopped"))
    assert 2 <= len(waiting) <= 3, lines  # (once or twice as it starts, then at the stop)
    assert waiting[-1].endswith("similar messages held back)"), waiting
    assert lines.index(waiting[-1]) < stopped
