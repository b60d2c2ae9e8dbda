"""/metrics of a real server: exact engine counters, promtool on a live scrape, a real
Prometheus scraping it, and Inspect agreeing with the metrics (DESIGN.md §5)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from servers import (
    created_series,
    free_port,
    promtool_check_metrics,
    ram,
    remote,
    running_server,
    samples,
    scrape,
    server_section,
    toml_volume,
    tree_of,
    value,
)
from stacks import MapLayer
from tools import require_tool
from waiting import eventually

from tierdisk.service.runs import Run
from tierdisk.service.server import Server
from tierdisk.service.volume import LayerEntry, Volume
from tierdisk.v1 import blockdevice_pb2 as pb
from tierdisk.v1 import blockdevice_pb2_grpc as pb_grpc

STACK = """
[[volumes]]
name = "cached"
  [[volumes.layers]]
  kind = "ram"
  read_cache = true
  [[volumes.layers]]
  kind = "raw"
  path = "base.img"
  size = "1MiB"
"""


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with running_server(tmp_path, STACK) as srv:
        yield srv


async def _read_sequence(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.BlockDeviceStub(channel)
        # 1. sectors 0..8: all miss the cache (1 call into each layer); fills 8
        await stub.Read(pb.ReadRequest(volume="cached", sector=0, sector_count=8))
        # 2. sectors 4..12: 4 hits; misses 8..12 (1 call into raw); fills 4
        await stub.Read(pb.ReadRequest(volume="cached", sector=4, sector_count=8))
        # 3. sectors 0..16 now hold 0..12: 12 hits; 12..16 missing: 1 call into raw
        await stub.Read(pb.ReadRequest(volume="cached", sector=0, sector_count=16))
        # 4. a write lands in the cache (top); then 16..24 with a hole pattern
        await stub.Write(pb.WriteRequest(volume="cached", sector=18, data=bytes(1024)))
        # 16..18 and 20..24 miss: 2 calls into raw (two runs)
        await stub.Read(pb.ReadRequest(volume="cached", sector=16, sector_count=8))


async def test_exact_counters_from_a_scrape(server: Server) -> None:
    await _read_sequence(server.grpc_address)
    text = await scrape(server.metrics_address)
    top = {"volume": "cached", "layer": "0"}
    base = {"volume": "cached", "layer": "1", "kind": "raw"}
    assert value(text, "tierdisk_layer_reads_total", **top, kind="ram") == 4
    assert value(text, "tierdisk_layer_read_sectors_total", **top, kind="ram") == 4 + 12 + 2
    assert value(text, "tierdisk_cache_hits_total", **top) == 4 + 12 + 2
    assert value(text, "tierdisk_cache_misses_total", **top) == 8 + 4 + 4 + 6
    assert value(text, "tierdisk_cache_fills_total", **top) == 8 + 4 + 4 + 6
    assert value(text, "tierdisk_cache_fill_errors_total", **top) == 0
    assert value(text, "tierdisk_layer_reads_total", **base) == 1 + 1 + 1 + 2
    assert value(text, "tierdisk_layer_read_sectors_total", **base) == 8 + 4 + 4 + 6
    assert value(text, "tierdisk_layer_present_sectors", **top, kind="ram") == 24
    assert value(text, "tierdisk_layer_present_sectors", **base) == 2048
    assert value(text, "tierdisk_volume_sectors", volume="cached") == 2048
    assert (
        value(text, "tierdisk_volume_io_requests_total", volume="cached", op="read", code="OK") == 4
    )
    assert value(text, "tierdisk_volume_io_bytes_total", volume="cached", op="read") == (
        (8 + 8 + 16 + 8) * 512
    )
    assert value(text, "tierdisk_volume_io_bytes_total", volume="cached", op="write") == 1024
    assert (
        value(
            text,
            "grpc_server_handled_total",
            grpc_type="unary",
            grpc_service="tierdisk.v1.BlockDevice",
            grpc_method="Read",
            grpc_code="OK",
        )
        == 4
    )
    assert value(text, "tierdisk_io_duration_seconds_count", op="read") == 4


async def test_error_codes_are_counted(server: Server) -> None:
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.BlockDeviceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Read(pb.ReadRequest(volume="cached", sector=4096, sector_count=1))
    text = await scrape(server.metrics_address)
    assert (
        value(
            text,
            "tierdisk_volume_io_requests_total",
            volume="cached",
            op="read",
            code="OUT_OF_RANGE",
        )
        == 1
    )
    assert (
        value(
            text,
            "grpc_server_handled_total",
            grpc_type="unary",
            grpc_service="tierdisk.v1.BlockDevice",
            grpc_method="Read",
            grpc_code="OUT_OF_RANGE",
        )
        == 1
    )


class _Faulty(MapLayer):
    """A layer whose reads and writes fail with an exception no layer should raise (a bug):
    not a domain error, not an ``OSError``."""

    async def read(self, buf: memoryview, sector: int) -> list[Run]:
        raise RuntimeError("a fault of the layer")

    async def write(self, data: memoryview, sector: int, fua: bool) -> None:
        raise RuntimeError("a fault of the layer")


async def test_a_fault_of_ours_is_counted_unknown_as_the_caller_sees_it(server: Server) -> None:
    """A request that fails with an exception no layer should raise is ``UNKNOWN`` to the
    caller, and counted so in ``tierdisk_volume_io_requests_total`` (as over NBD), not
    ``OK``: the error-rate alert counts it."""
    replaced = server.registry.get("cached")
    server.registry.set_ready(await Volume.open("cached", [LayerEntry(_Faulty(2048))]))
    await replaced.close()
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.BlockDeviceStub(channel)
        for call in (
            stub.Read(pb.ReadRequest(volume="cached", sector=0, sector_count=1)),
            stub.Write(pb.WriteRequest(volume="cached", sector=0, data=bytes(512))),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.UNKNOWN
    text = await scrape(server.metrics_address)
    for op in ("read", "write"):
        counted = {
            dict(labels)["code"]: n
            for (name, labels), n in samples(text).items()
            if name == "tierdisk_volume_io_requests_total"
            and ("volume", "cached") in labels
            and ("op", op) in labels
        }
        assert counted == {"OK": 0.0, "UNKNOWN": 1.0}, counted  # (OK from 0: from the start)


async def test_unknown_volume_names_do_not_grow_the_volume_label(server: Server) -> None:
    """Requests naming volumes the server does not have are counted, under volume="": a
    client (or a typo) cannot add series without limit (DESIGN.md §5: bounded by the config)."""
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.BlockDeviceStub(channel)
        for i in range(5):
            for call in (
                stub.Read(pb.ReadRequest(volume=f"junk-{i}", sector=0, sector_count=1)),
                stub.Write(pb.WriteRequest(volume=f"wjunk-{i}", sector=0, data=bytes(512))),
                stub.Flush(pb.FlushRequest(volume=f"fjunk-{i}")),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert info.value.code() == grpc.StatusCode.NOT_FOUND
    text = await scrape(server.metrics_address)
    volumes = {
        dict(labels).get("volume")
        for name, labels in samples(text)
        if name.startswith("tierdisk_volume_io_")
    }
    assert volumes <= {"cached", ""}
    for op in ("read", "write", "flush"):
        got = value(text, "tierdisk_volume_io_requests_total", volume="", op=op, code="NOT_FOUND")
        assert got == 5


async def test_calls_refused_before_the_volume_lookup_count_under_no_volume(
    server: Server,
) -> None:
    """Calls refused before the volume is looked up — a hop chain too deep, a server
    draining — count under the name they gave only when the server serves it; any other
    name counts under volume="" (DESIGN.md §5: the label is bounded by the config)."""
    too_deep = (("tierdisk-hops", ",".join(f"hop{i}" for i in range(9))),)
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.BlockDeviceStub(channel)
        for name in ("bogus-hops", "cached"):
            for call in (
                stub.Read(pb.ReadRequest(volume=name, sector_count=1), metadata=too_deep),
                stub.Write(pb.WriteRequest(volume=name, data=bytes(512)), metadata=too_deep),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        await server.gate.drain(1)
        for name in ("bogus-drain", "cached"):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Read(pb.ReadRequest(volume=name, sector_count=1))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    text = await scrape(server.metrics_address)
    volumes = {
        dict(labels).get("volume")
        for name, labels in samples(text)
        if name.startswith("tierdisk_volume_io_")
    }
    assert volumes == {"cached", ""}
    for volume in ("", "cached"):
        for op, code in (
            ("read", "FAILED_PRECONDITION"),
            ("write", "FAILED_PRECONDITION"),
            ("read", "UNAVAILABLE"),
        ):
            got = value(text, "tierdisk_volume_io_requests_total", volume=volume, op=op, code=code)
            assert got == 1, (volume, op, code)


async def test_inspect_counters_agree_with_metrics(server: Server) -> None:
    await _read_sequence(server.grpc_address)
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.BlockDeviceStub(channel)
        tree = tree_of(await stub.Inspect(pb.InspectRequest(volume="cached")))
    text = await scrape(server.metrics_address)
    for layer in tree["layers"]:
        index = str(int(layer["index"]))
        counters = layer["counters"]
        labels = {"volume": "cached", "layer": index, "kind": layer["kind"]}
        assert counters["reads"] == value(text, "tierdisk_layer_reads_total", **labels)
        assert counters["read_sectors"] == value(
            text, "tierdisk_layer_read_sectors_total", **labels
        )
        assert layer["present_sectors"] == value(text, "tierdisk_layer_present_sectors", **labels)
        if layer["read_cache"]:
            short = {"volume": "cached", "layer": index}
            for key in ("cache_hits", "cache_misses", "cache_fills", "cache_fill_errors"):
                assert counters[key] == value(text, f"tierdisk_{key}_total", **short)


async def test_promtool_check_metrics_on_live_scrape(server: Server) -> None:
    require_tool("promtool")
    await _read_sequence(server.grpc_address)
    await promtool_check_metrics(await scrape(server.metrics_address))


async def test_a_call_its_caller_gave_up_on_counts_as_cancelled(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Read and a Write still in the volume when the caller's deadline passes count under
    ``code="CANCELLED"`` in the volume families, not ``OK`` (the handler is cancelled)."""
    stalled = asyncio.Event()

    async def stall(*args: object, **kwargs: object) -> None:
        stalled.set()
        await asyncio.Event().wait()  # until cancelled

    monkeypatch.setattr(Volume, "read_into", stall)
    monkeypatch.setattr(Volume, "write", stall)
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.BlockDeviceStub(channel)
        for call in (
            lambda: stub.Read(
                pb.ReadRequest(volume="cached", sector=0, sector_count=8), timeout=0.3
            ),
            lambda: stub.Write(
                pb.WriteRequest(volume="cached", sector=0, data=bytes(4096)), timeout=0.3
            ),
        ):
            stalled.clear()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call()
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert stalled.is_set()  # it was in the volume, not refused before
    assert server.metrics_address
    address = server.metrics_address

    async def counted() -> bool:
        text = await scrape(address)
        return all(
            samples(text).get(
                (
                    "tierdisk_volume_io_requests_total",
                    frozenset({"volume": "cached", "op": op, "code": "CANCELLED"}.items()),
                )
            )
            == 1
            for op in ("read", "write")
        )

    await eventually("both calls to count as CANCELLED", counted)
    text = await scrape(address)
    for op in ("read", "write"):
        assert samples(text)[("tierdisk_volume_io_requests_total", frozenset(
            {"volume": "cached", "op": op, "code": "OK"}.items()
        ))] == 0  # fmt: skip


async def test_head_and_unknown_paths(server: Server) -> None:
    """``HEAD /metrics`` (as some probes send) answers 200 with the length and no body;
    another path is 404."""

    async def ask(line: bytes) -> bytes:
        assert server.metrics_address
        reader, writer = await asyncio.open_connection(*server.metrics_address.rsplit(":", 1))
        writer.write(line + b"\r\nHost: x\r\n\r\n")
        await writer.drain()
        raw = await reader.read()
        writer.close()
        return raw

    head, _, body = (await ask(b"HEAD /metrics HTTP/1.1")).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == b"", head
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    assert length > 1000  # what a GET would carry
    assert (await ask(b"GET /nope HTTP/1.1")).startswith(b"HTTP/1.1 404")


async def test_no_created_series(server: Server) -> None:
    await _read_sequence(server.grpc_address)
    assert created_series(await scrape(server.metrics_address)) == []


async def test_a_volume_waiting_for_its_remote_tier_is_visible(tmp_path: Path) -> None:
    """README: a remote tier down at start leaves its volume attaching in the background,
    answering UNAVAILABLE. /metrics shows it: ``tierdisk_volume_ready`` 0 (then 1 once the
    origin is up), its UNAVAILABLE requests under its own name, and the failed attach calls
    in ``tierdisk_remote_requests_total``, which agrees with the histogram's count; its
    ``tierdisk_write_verifier_changes_total`` is there already, at 0."""
    listen = f"127.0.0.1:{free_port()}"  # nothing listens there yet
    body = toml_volume("late", ram(), remote(listen, "base", timeout=1))
    body += toml_volume("local", ram("1MiB"))
    async with running_server(tmp_path / "cache", body) as cache:
        address = cache.metrics_address

        async def attach_failed_twice() -> bool:
            text = await scrape(address)
            return (
                samples(text).get(
                    (
                        "tierdisk_remote_request_duration_seconds_count",
                        frozenset({("method", "GetVolume")}),
                    ),
                    0.0,
                )
                >= 2
            )

        await eventually("a second failed attach", attach_failed_twice)
        async with grpc.aio.insecure_channel(cache.grpc_address) as channel:
            stub = pb_grpc.BlockDeviceStub(channel)
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Read(pb.ReadRequest(volume="late", sector=0, sector_count=1))
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        text = await scrape(address)
        assert value(text, "tierdisk_volume_ready", volume="late") == 0
        assert value(text, "tierdisk_volume_ready", volume="local") == 1
        # from 0 while it waits: the change an unclean start counts when it opens is a
        # rise the alert sees, however late that is (a series born at 1 was none)
        assert value(text, "tierdisk_write_verifier_changes_total", volume="late") == 0
        assert (
            value(
                text,
                "tierdisk_volume_io_requests_total",
                volume="late",
                op="read",
                code="UNAVAILABLE",
            )
            == 3
        )
        waiting = remote_calls(text, "late")
        assert any(code != "OK" for _, code in waiting), waiting
        # no call answered OK, but OK is there from the start: rate() sees the first one
        assert {n for (_, code), n in waiting.items() if code == "OK"} == {0}, waiting
        assert ("GetVolume", "OK") in waiting
        assert_remote_counts_agree(text)
        await promtool_check_metrics(text)

        origin_body = server_section(listen, tmp_path / "origin") + toml_volume("base", ram("1MiB"))
        async with running_server(tmp_path / "origin", origin_body):

            async def ready() -> bool:
                return value(await scrape(address), "tierdisk_volume_ready", volume="late") == 1

            await eventually("the waiting volume to attach", ready)
            text = await scrape(address)
            attached = remote_calls(text, "late")
            assert attached[("GetVolume", "OK")] == 1
            for key, calls in waiting.items():  # the failed attempts are still counted
                assert attached[key] >= calls, key
            assert_remote_counts_agree(text)


def remote_calls(text: str, volume: str) -> dict[tuple[str, str], float]:
    """``tierdisk_remote_requests_total`` of layer 1 of ``volume``: {(method, code): calls}."""
    out = {}
    for (name, labels), calls in samples(text).items():
        tags = dict(labels)
        if name == "tierdisk_remote_requests_total" and tags["volume"] == volume:
            assert tags["layer"] == "1"
            out[tags["method"], tags["code"]] = calls
    return out


def assert_remote_counts_agree(text: str) -> None:
    """Per method, the counter's calls (all volumes and codes) equal the histogram's count
    (WatchResize streams are counted, not timed; a method never called has its ``OK``
    series at 0 and no histogram series)."""
    counted: dict[str, float] = {}
    timed: dict[str, float] = {}
    for (name, labels), n in samples(text).items():
        method = dict(labels).get("method", "")
        if name == "tierdisk_remote_requests_total" and method != "WatchResize":
            counted[method] = counted.get(method, 0.0) + n
        elif name == "tierdisk_remote_request_duration_seconds_count":
            timed[method] = n
    assert {m: n for m, n in counted.items() if n or m in timed} == timed


async def test_fresh_registry_per_server(tmp_path: Path) -> None:
    async with (
        running_server(tmp_path / "a", STACK) as a,
        running_server(tmp_path / "b", STACK) as b,
    ):
        await _read_sequence(a.grpc_address)
        text_b = await scrape(b.metrics_address)
        assert (
            value(text_b, "tierdisk_layer_reads_total", volume="cached", layer="1", kind="raw") == 0
        )


async def test_unknown_path_is_404(server: Server) -> None:
    reader, writer = await asyncio.open_connection(*server.metrics_address.rsplit(":", 1))
    writer.write(b"GET /nope HTTP/1.1\r\n\r\n")
    await writer.drain()
    assert (await reader.read()).startswith(b"HTTP/1.1 404")
    writer.close()


def _get_json(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.loads(reply.read())  # type: ignore[no-any-return]


async def test_real_prometheus_scrapes_cache_hits(server: Server, tmp_path: Path) -> None:
    prometheus = require_tool("prometheus")
    await _read_sequence(server.grpc_address)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: tierdisk\n    static_configs:\n"
        f"      - targets: ['{server.metrics_address}']\n"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        prometheus,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        query = urllib.parse.quote('tierdisk_cache_hits_total{volume="cached"}')
        url = f"http://127.0.0.1:{port}/api/v1/query?query={query}"
        deadline = time.monotonic() + 45
        result: list[object] = []
        while time.monotonic() < deadline and not result:
            await asyncio.sleep(0.5)
            try:
                reply = await asyncio.to_thread(_get_json, url)
            except OSError:
                continue
            data = reply.get("data")
            result = data.get("result", []) if isinstance(data, dict) else []
        assert result, "Prometheus never returned tierdisk_cache_hits_total"
        (series,) = result
        assert isinstance(series, dict)
        assert series["metric"]["volume"] == "cached"
        assert float(series["value"][1]) == 18
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)
