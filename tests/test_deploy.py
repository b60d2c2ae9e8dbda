"""The deployment artefacts: Prometheus config and rules, the Grafana dashboard, the compose
stack, the tier configs, the health probe and the origin's entrypoint.

Real tools throughout: promtool and docker-compose from Debian (skipped when missing unless
TIERDISK_REQUIRE_TOOLS=1), a real gRPC health server for the probe, and a real tierdisk server
with its NBD export, driven by libnbd (python3-libnbd), for what the NBD panels and alert read.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from servers import ServerProcess, ram, samples, toml_volume
from tools import REQUIRE_TOOLS_ENV, require_tool
from waiting import eventually

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "tierdisk.json"
TIER_CONFIGS = DEPLOY / "tierdisk"
HEALTHCHECK = DEPLOY / "healthcheck.py"
ENTRYPOINT = DEPLOY / "origin-entrypoint.py"

# DESIGN §5: the metric families a tierdisk server exports. Families beyond §5 (the NBD
# export's) are read from a real server's /metrics instead: see `exported_series`.
COUNTERS = {
    "tierdisk_layer_reads_total",
    "tierdisk_layer_read_sectors_total",
    "tierdisk_cache_hits_total",
    "tierdisk_cache_misses_total",
    "tierdisk_cache_fills_total",
    "tierdisk_cache_fill_errors_total",
    "tierdisk_volume_io_bytes_total",
    "tierdisk_volume_io_requests_total",
    "tierdisk_remote_requests_total",
    "tierdisk_write_verifier_changes_total",  # added to §5's: writes may have been lost
    "grpc_server_handled_total",
}
GAUGES = {
    "tierdisk_layer_present_sectors",
    "tierdisk_volume_sectors",
    "tierdisk_volume_ready",  # added to §5's families: 1 serving, 0 waiting for its tier
}
HISTOGRAMS = {
    "tierdisk_io_duration_seconds",
    "tierdisk_remote_request_duration_seconds",
    "grpc_server_handling_seconds",
}
KNOWN_SERIES = (
    COUNTERS
    | GAUGES
    | {f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
    | {"up"}
)

# DESIGN §4: the keys a config file may hold.
SERVER_KEYS = {"listen", "metrics", "data_dir", "nbd", "max_io"}
VOLUME_KEYS = {"name", "read_only", "layers"}
LAYER_KEYS = {"kind", "read_cache", "write_through"}
KIND_KEYS = {
    "ram": {"size", "sector_size"},
    "raw": {"path", "size", "read_only", "sector_size"},
    "sparse": {"path", "size", "sector_size"},
    "sqlite": {"path", "size", "sector_size"},
    "remote": {"target", "volume", "mode", "timeout", "retries"},
}

# The rows of the dashboard, in order: one per concern.
ROWS = ["I/O", "Latency", "Cache", "Layers", "Remote", "NBD", "Sizes"]


def run(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> str:
    """Run a command; fail the test with its output unless it exits 0. Returns stdout."""
    done = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, (
        f"{' '.join(args)} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout


# ---------------------------------------------------------------------------- a real server

SYSTEM_PYTHON = "/usr/bin/python3"  # the Debian python, where python3-libnbd installs `nbd`


@pytest.fixture(scope="module")
def nbd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A real tierdisk server (a child process, stopped by PID) with its NBD export on
    127.0.0.1, serving volume "base" as the compose stack's tiers do, and taking one NBD
    connection at once (so a second client is refused)."""
    folder = tmp_path_factory.mktemp("nbd-server")
    config = folder / "tierdisk.toml"
    config.write_text(
        '[server]\nnbd = "127.0.0.1:0"\nnbd_max_connections = 1\n'
        + toml_volume("base", ram("1MiB"))
    )
    with ServerProcess.start(folder, config, "--log-level", "warning") as server:
        assert server.nbd, "the server reports no NBD address"
        yield server


def scrape_metrics(address: str) -> str:
    """The body of ``GET /metrics`` on ``address`` (``host:port``)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        body: bytes = reply.read()
    return body.decode()


# The series a family of each type has (a family's name leaves out a counter's _total).
TYPE_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}


def series_names(text: str) -> set[str]:
    """The series names a scrape exports: every family's by its type (a family shows with its
    TYPE line before it has samples) and every sample's."""
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name + suffix for suffix in TYPE_SUFFIXES.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


@pytest.fixture(scope="module")
def exported_series(nbd_server: ServerProcess) -> set[str]:
    """What a real server with an NBD export has on /metrics, for the checks that rules and
    panels read only exported series (with DESIGN §5's families, KNOWN_SERIES)."""
    names = series_names(scrape_metrics(nbd_server.metrics))
    assert "tierdisk_nbd_requests_total" in names, sorted(names)
    return names


def require_libnbd() -> str:
    """The system python with python3-libnbd (a real NBD client library); skip, or fail when
    TIERDISK_REQUIRE_TOOLS=1, without it."""
    reason = f"python3-libnbd is not importable by {SYSTEM_PYTHON} (apt-get install python3-libnbd)"
    try:
        found = subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True, timeout=30)
    except FileNotFoundError:
        found = None
    if found is not None and found.returncode == 0:
        return SYSTEM_PYTHON
    if os.environ.get(REQUIRE_TOOLS_ENV) == "1":
        pytest.fail(f"{reason}; {REQUIRE_TOOLS_ENV}=1 requires it", pytrace=False)
    pytest.skip(reason)


# An NBD client's session with libnbd: each command once, a read past the end (strict mode
# off, so the server answers it: EINVAL), then a second connection, which the server refuses
# (it takes one at once). It prints "ready" and keeps its session open until stdin closes.
LIBNBD_CLIENT = r"""
import nbd, sys
uri = sys.argv[1]
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(uri)
size = h.get_size()
h.pwrite(b"\xa5" * 65536, 0)
assert h.pread(65536, 0) == b"\xa5" * 65536
h.flush()
h.trim(4096, 65536)
h.zero(4096, 131072)
h.cache(65536, 0)
h.block_status(65536, 0, lambda *args: 0)
h.set_strict_mode(0)
try:
    h.pread(1024, size - 512)
except nbd.Error as exc:
    assert exc.errno == "EINVAL", exc
else:
    raise AssertionError("a read past the end succeeded")
g = nbd.NBD()
try:
    g.connect_uri(uri)
except nbd.Error:
    pass
else:
    raise AssertionError("a second connection was taken")
print("ready", flush=True)
sys.stdin.readline()
h.shutdown()
"""


@pytest.fixture(scope="module")
def nbd_traffic(nbd_server: ServerProcess) -> str:
    """``nbd_server``'s /metrics after a real NBD client (:data:`LIBNBD_CLIENT`) used it,
    scraped while the client's session is still open."""
    python = require_libnbd()
    uri = f"nbd://{nbd_server.nbd}/base"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    client = subprocess.Popen(
        [python, "-c", LIBNBD_CLIENT, uri],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert client.stdin is not None and client.stdout is not None

    def failed(what: str) -> str:
        if client.poll() is None:
            client.kill()  # by its PID
        client.wait(10)
        err = client.stderr.read() if client.stderr else ""
        return f"the libnbd client {what} (exit {client.returncode}):\n{err}"

    try:
        readable, _, _ = select.select([client.stdout], [], [], 60)
        line = client.stdout.readline() if readable else ""
        assert line == "ready\n", failed(f"did not get ready: {line!r}")
        text = ""

        def counted() -> bool:
            nonlocal text
            text = scrape_metrics(nbd_server.metrics)
            got = samples(text)
            return all(
                got.get((name, frozenset(labels.items()))) == count
                for name, labels, count in [
                    ("tierdisk_nbd_requests_total",
                     {"volume": "base", "command": "read", "result": "EINVAL"}, 1),
                    ("tierdisk_nbd_requests_total",
                     {"volume": "base", "command": "block_status", "result": "ok"}, 1),
                    ("tierdisk_nbd_connections_refused_total", {}, 1),
                    ("tierdisk_nbd_sessions_active", {"volume": "base"}, 1),
                ]
            )  # fmt: skip

        try:  # the server counts an NBD request after its reply: the client may be ahead
            asyncio.run(eventually("the client's session in /metrics", counted))
        except AssertionError:
            seen = [
                entry
                for entry in text.splitlines()
                if re.match(r"tierdisk_nbd_(?!\w*_bucket)", entry)
            ]
            pytest.fail(
                "the client's requests, refusal or session not counted:\n" + "\n".join(seen)
            )
        client.stdin.close()
        assert client.wait(30) == 0, failed("failed")
        return text
    finally:
        if client.poll() is None:
            client.kill()  # by its PID
            client.wait(10)
        for stream in (client.stdout, client.stderr):
            if stream:
                stream.close()


# ---------------------------------------------------------------------------- Prometheus


def test_prometheus_config_is_valid() -> None:
    promtool = require_tool("promtool")
    out = run(promtool, "check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert "2 rule files found" in out


def test_rules_are_valid() -> None:
    promtool = require_tool("promtool")
    run(
        promtool,
        "check",
        "rules",
        str(PROMETHEUS / "recording.yml"),
        str(PROMETHEUS / "alerts.yml"),
    )


def test_rules_unit_tests_pass() -> None:
    promtool = require_tool("promtool")
    run(promtool, "test", "rules", "rules_test.yml", cwd=PROMETHEUS)


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert:\s*(\S+)", (PROMETHEUS / "alerts.yml").read_text(), re.M)


def recording_names() -> list[str]:
    return re.findall(r"^\s*- record:\s*(\S+)", (PROMETHEUS / "recording.yml").read_text(), re.M)


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    tests = (PROMETHEUS / "rules_test.yml").read_text()
    # Split the unit test file into alert_rule_test entries: (alertname, fires?).
    cases = re.findall(r"alertname:\s*(\S+)\s*\n\s*exp_alerts:\s*(\[\])?", tests)
    names = alert_names()
    assert {"TierdiskTierDown", "TierdiskRemoteLayerErrors", "TierdiskCacheFillErrors",
            "TierdiskErrorRateSpike", "TierdiskVolumeNotReady",
            "TierdiskNbdConnectionsRefused"} <= set(names)  # fmt: skip
    for name in names:
        outcomes = {quiet == "" for alert, quiet in cases if alert == name}
        assert outcomes == {True, False}, f"{name} needs a firing and a quiet case"
    assert "tier_volume_layer:tierdisk_cache_hit_ratio:ratio_rate5m" in tests


def test_rules_use_only_exported_metrics(exported_series: set[str]) -> None:
    known = KNOWN_SERIES | exported_series | set(recording_names())
    for name in ("recording.yml", "alerts.yml"):
        text = "\n".join(
            line
            for line in (PROMETHEUS / name).read_text().splitlines()
            if not line.lstrip().startswith(("#", "- record:", "- alert:"))
        )
        unknown = metric_names(text) - known
        assert not unknown, f"{name} uses series no server or rule exports: {sorted(unknown)}"


def metric_names(promql: str) -> set[str]:
    """Series names a PromQL text refers to (tierdisk's, gRPC's, the process's, recording
    rules', up)."""
    names = set(
        re.findall(r'(?<![\w:"$.])(tierdisk_\w+|grpc_server_\w+|process_\w+|\w+:\w+:\w+)', promql)
    )
    if re.search(r"(?<![\w:\"$.])up\s*\{", promql):
        names.add("up")
    return names


def scrape_targets() -> list[dict[str, str]]:
    """The tierdisk job's targets as Prometheus discovers them (labels after relabelling)."""
    promtool = require_tool("promtool")
    out = run(
        promtool,
        "check",
        "service-discovery",
        "--timeout=1s",
        str(PROMETHEUS / "prometheus.yml"),
        "tierdisk",
    )
    return [target["labels"] for target in json.loads(out)]


def test_scrape_config_scrapes_every_tier_with_its_tier_label() -> None:
    targets = scrape_targets()
    tiers = {config.stem: config for config in TIER_CONFIGS.glob("*.toml")}
    assert sorted(t["tier"] for t in targets) == sorted(tiers)
    for target in targets:
        host, port = target["__address__"].rsplit(":", 1)
        assert host == target["tier"], "the target is the compose service of its tier"
        server = load_toml(tiers[host])["server"]
        assert server["metrics"].rsplit(":", 1)[1] == port
        assert target["job"] == "tierdisk"


# ---------------------------------------------------------------------------- Grafana


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for every panel target and every template variable query."""
    queries = []
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("expr"):
                queries.append((f"panel {panel['title']!r} ref {target['refId']}", target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query)
            expr = match[1] if match else query
            queries.append((f"variable {variable['name']!r}", expr))
    return queries


# What Grafana puts in place of its variables: "All" (the variables' allValue), and a
# multi-value selection, which Grafana formats as a regex alternation.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
SELECTIONS = {
    "all": {"tier": ".*", "volume": ".*"},
    "several": {"tier": "(origin|cache)", "volume": "(base|vm1)"},
}


def interpolate(expr: str, values: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        assert name in values, f"unknown Grafana variable ${name} in {expr!r}"
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)


@pytest.mark.parametrize("selection", sorted(SELECTIONS))
def test_every_dashboard_query_is_valid_promql(selection: str, tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    values = GRAFANA_BUILTINS | SELECTIONS[selection]
    queries = dashboard_queries(load_dashboard())
    assert len(queries) > 20
    # One group per query, named after its panel: promtool names the group that fails.
    groups = [
        {
            "name": f"{i}: {where}",
            "rules": [{"record": "dashboard:check:expr", "expr": interpolate(expr, values)}],
        }
        for i, (where, expr) in enumerate(queries)
    ]
    rules = tmp_path / "dashboard-queries.yml"
    rules.write_text(json.dumps({"groups": groups}, indent=1))
    run(promtool, "check", "rules", str(rules))


def test_dashboard_uses_only_exported_metrics(exported_series: set[str]) -> None:
    known = KNOWN_SERIES | exported_series | set(recording_names())
    for where, expr in dashboard_queries(load_dashboard()):
        unknown = metric_names(expr) - known
        assert not unknown, f"{where} uses series no server or rule exports: {sorted(unknown)}"
        assert metric_names(expr), f"{where} reads no tierdisk series: {expr}"


def input_series(nbd: str) -> list[dict[str, str]]:
    """A plausible 10-minute scrape of the compose stack, every 15 s: both tiers, volume
    "base", the cache's three layers, some errors. Counters grow linearly.

    Both tiers have their NBD export on (deploy/README.md: the origin's serves the cache
    tier's reads, a cache tier's serves VMs), with the NBD series of ``nbd``, a real server's
    scrape after a real client's session (``nbd_traffic``): each counter and histogram series
    grows by its value there every 15 s, each gauge keeps its value."""
    series: list[dict[str, str]] = []

    def add(name: str, labels: dict[str, str], step: float, *, constant: bool = False) -> None:
        text = ",".join(f'{k}="{v}"' for k, v in labels.items())
        values = f"{step:g}x40" if constant else f"0+{step:g}x40"
        series.append({"series": f"{name}{{{text}}}", "values": values})

    for tier, layers in {
        "origin": [("0", "raw")],
        "cache": [("0", "ram"), ("1", "sparse"), ("2", "remote")],
    }.items():
        target = {"job": "tierdisk", "instance": f"{tier}:9400", "tier": tier}
        vol = target | {"volume": "base"}
        add("up", target, 1, constant=True)
        add("tierdisk_volume_sectors", vol, 131072, constant=True)
        add("tierdisk_volume_ready", vol, 1, constant=True)
        add("tierdisk_write_verifier_changes_total", vol, 0, constant=True)
        for le, share in {"0.001": 0.9, "0.01": 0.99, "1.0": 1, "+Inf": 1}.items():
            add("tierdisk_event_loop_lag_seconds_bucket", target | {"le": le}, 150 * share)
        add("tierdisk_event_loop_lag_seconds_count", target, 150)
        for op, step in {"read": 60, "write": 10, "flush": 1}.items():
            add("tierdisk_volume_io_requests_total", vol | {"op": op, "code": "OK"}, step)
            add("tierdisk_volume_io_bytes_total", vol | {"op": op}, step * 65536 * (op != "flush"))
            for le, share in {"0.001": 0.5, "0.01": 0.9, "0.1": 1, "+Inf": 1}.items():
                add(
                    "tierdisk_io_duration_seconds_bucket",
                    target | {"op": op, "le": le},
                    step * share,
                )
            add("tierdisk_io_duration_seconds_count", target | {"op": op}, step)
            add("tierdisk_io_duration_seconds_sum", target | {"op": op}, step * 0.004)
        add("tierdisk_volume_io_requests_total", vol | {"op": "read", "code": "NOT_FOUND"}, 1)
        add("tierdisk_volume_io_requests_total", vol | {"op": "read", "code": "UNAVAILABLE"}, 1)
        rpc = target | {"grpc_service": "tierdisk.v1.BlockDevice", "grpc_type": "unary"}
        for method in ("Read", "Write", "GetVolume"):
            add("grpc_server_handled_total", rpc | {"grpc_method": method, "grpc_code": "OK"}, 20)
            for le, share in {"0.001": 0.5, "0.01": 0.9, "+Inf": 1}.items():
                add("grpc_server_handling_seconds_bucket", rpc | {"grpc_method": method, "le": le},
                    20 * share)  # fmt: skip
        for layer, kind in layers:
            lay = vol | {"layer": layer, "kind": kind}
            add("tierdisk_layer_reads_total", lay, 10)
            add("tierdisk_layer_read_sectors_total", lay, 1280)
            add("tierdisk_layer_present_sectors", lay, 4096 if kind != "raw" else 131072,
                constant=True)  # fmt: skip
        if tier == "cache":
            cache = vol | {"layer": "1"}
            add("tierdisk_cache_hits_total", cache, 1000)
            add("tierdisk_cache_misses_total", cache, 280)
            add("tierdisk_cache_fills_total", cache, 280)
            add("tierdisk_cache_fill_errors_total", cache, 0)
            remote = vol | {"layer": "2"}
            add("tierdisk_remote_requests_total", remote | {"method": "Read", "code": "OK"}, 10)
            add(
                "tierdisk_remote_requests_total",
                remote | {"method": "Read", "code": "UNAVAILABLE"},
                1,
            )
            for le, share in {"0.01": 0.5, "0.1": 0.99, "+Inf": 1}.items():
                add("tierdisk_remote_request_duration_seconds_bucket",
                    target | {"method": "Read", "le": le}, 11 * share)  # fmt: skip
        for family in text_string_to_metric_families(nbd):
            if family.name.startswith("tierdisk_nbd_"):
                for sample in family.samples:
                    add(sample.name, target | sample.labels, sample.value,
                        constant=family.type == "gauge")  # fmt: skip
    return series


def test_every_dashboard_panel_shows_data_for_a_plausible_stack(
    tmp_path: Path, nbd_traffic: str
) -> None:
    """Each query, with the recording rules loaded, returns series for a scrape of the
    compose stack: catches wrong names, labels that do not match and filters that drop all."""
    promtool = require_tool("promtool")
    values = GRAFANA_BUILTINS | SELECTIONS["all"]
    queries = dashboard_queries(load_dashboard())
    checks = [
        {
            # count() of an empty result is empty, so this is 1 exactly when there is data.
            "expr": f"label_replace(clamp_max(count({interpolate(expr, values)}), 1), "
            f'"check", "{i}", "", "")',
            "eval_time": "10m",
            "exp_samples": [{"labels": f'{{check="{i}"}}', "value": 1}],
        }
        for i, (_, expr) in enumerate(queries)
    ]
    tests = {
        "rule_files": [str(PROMETHEUS / "recording.yml")],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": input_series(nbd_traffic),
                "promql_expr_test": checks,
            }
        ],
    }
    path = tmp_path / "dashboard_test.yml"
    path.write_text(json.dumps(tests, indent=1))
    done = subprocess.run(
        [promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    output = done.stdout + done.stderr
    empty = sorted({int(i) for i in re.findall(r'exp: \{check="(\d+)"\}', output)})
    assert done.returncode == 0, (
        "no data for: " + "; ".join(queries[i][0] for i in empty) + "\n" + output
    )


def test_dashboard_has_one_row_per_concern_and_a_sound_layout() -> None:
    dashboard = load_dashboard()
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert len(rows) == len(ROWS)
    for title, concern in zip(rows, ROWS, strict=True):
        assert title.startswith(concern), rows
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    boxes: list[tuple[str, dict[str, int]]] = []
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for other, box in boxes:
            apart = (
                pos["x"] >= box["x"] + box["w"]
                or box["x"] >= pos["x"] + pos["w"]
                or pos["y"] >= box["y"] + box["h"]
                or box["y"] >= pos["y"] + pos["h"]
            )
            assert apart, f"{panel['title']!r} overlaps {other!r}"
        boxes.append((panel["title"], pos))
    # Every row holds at least one panel: the next panel after a row is not a row.
    kinds = [p["type"] for p in dashboard["panels"]]
    for i, kind in enumerate(kinds):
        if kind == "row":
            assert i + 1 < len(kinds) and kinds[i + 1] != "row", dashboard["panels"][i]["title"]


def test_dashboard_and_provisioning_agree() -> None:
    datasource = (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    uid = re.search(r"^\s*uid:\s*(\S+)", datasource, re.M)
    assert uid is not None
    assert re.search(r"^\s*url:\s*http://prometheus:9090\s*$", datasource, re.M)
    dashboard = load_dashboard()
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            continue
        sources = [panel.get("datasource")] + [t.get("datasource") for t in panel["targets"]]
        for source in sources:
            assert source == {"type": "prometheus", "uid": uid[1]}, panel["title"]
    providers = (GRAFANA / "provisioning" / "dashboards" / "tierdisk.yml").read_text()
    path = re.search(r"^\s*path:\s*(\S+)", providers, re.M)
    assert path is not None
    compose = (ROOT / "docker-compose.yml").read_text()
    assert f"./deploy/grafana/dashboards:{path[1]}:ro" in compose
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in compose


# ---------------------------------------------------------------------------- compose


def compose(*args: str) -> str:
    tool = require_tool("docker-compose")
    env = {k: v for k, v in os.environ.items() if k not in {"BIND_ADDRESS", "BASE_IMAGE_SIZE"}}
    return run(tool, "-f", "docker-compose.yml", *args, env=env)


def test_compose_file_is_valid() -> None:
    compose("config", "-q")


def test_compose_services_and_volumes() -> None:
    assert set(compose("config", "--services").split()) == {
        "origin", "cache", "prometheus", "grafana",
    }  # fmt: skip
    assert set(compose("config", "--volumes").split()) == {
        "origin-data", "cache-data", "prometheus-data", "grafana-data",
    }  # fmt: skip
    resolved = compose("config")
    assert "GF_AUTH_ANONYMOUS_ENABLED: 'true'" in resolved or (
        'GF_AUTH_ANONYMOUS_ENABLED: "true"' in resolved
    )
    assert "GF_AUTH_ANONYMOUS_ORG_ROLE: Viewer" in resolved
    assert resolved.count("tierdisk-healthcheck") == 2
    assert "condition: service_healthy" in resolved


# ---------------------------------------------------------------------------- tier configs


def load_toml(path: Path) -> dict[str, Any]:
    with path.open("rb") as file:
        return tomllib.load(file)


def tier_configs() -> list[Path]:
    return sorted(TIER_CONFIGS.glob("*.toml"))


def test_there_is_a_config_per_tierdisk_service() -> None:
    assert [p.stem for p in tier_configs()] == ["cache", "origin"]


@pytest.mark.parametrize("path", tier_configs(), ids=lambda p: p.name)
def test_tier_config_uses_only_design_keys(path: Path) -> None:
    config = load_toml(path)
    assert set(config) <= {"server", "volumes"}
    assert set(config["server"]) <= SERVER_KEYS
    assert config["volumes"], "at least one volume"
    names = [volume["name"] for volume in config["volumes"]]
    assert len(names) == len(set(names))
    for volume in config["volumes"]:
        assert set(volume) <= VOLUME_KEYS, volume["name"]
        layers = volume["layers"]
        assert layers, f"volume {volume['name']} has no layers"
        for index, layer in enumerate(layers):
            where = f"{path.name}: volume {volume['name']} layer {index}"
            assert layer["kind"] in KIND_KEYS, where
            assert set(layer) <= LAYER_KEYS | KIND_KEYS[layer["kind"]], where
            if layer.get("read_cache"):
                holds_everything = layer["kind"] == "raw" or (
                    layer["kind"] == "remote" and layer.get("mode", "disk") == "disk"
                )
                assert not holds_everything, f"{where}: cannot be a read cache"
        through = [bool(layer.get("write_through")) for layer in layers]
        assert not through[-1] and through == sorted(through, reverse=True)


@pytest.mark.parametrize("path", tier_configs(), ids=lambda p: p.name)
def test_tier_config_loads_with_the_servers_loader(path: Path) -> None:
    from tierdisk.service.config import load_config

    config = load_config(str(path), environ={})
    assert [v.name for v in config.volumes] == [v["name"] for v in load_toml(path)["volumes"]]


def test_cache_tier_stacks_on_the_origin() -> None:
    origin = load_toml(TIER_CONFIGS / "origin.toml")
    cache = load_toml(TIER_CONFIGS / "cache.toml")
    (volume,) = cache["volumes"]
    kinds = [(layer["kind"], bool(layer.get("read_cache"))) for layer in volume["layers"]]
    assert kinds == [("ram", False), ("sparse", True), ("remote", False)]
    assert volume["layers"][1]["path"] == "cache/base"
    remote = volume["layers"][2]
    host, port = remote["target"].rsplit(":", 1)
    assert host == "origin"
    assert origin["server"]["listen"].rsplit(":", 1)[1] == port
    assert remote["volume"] in {v["name"] for v in origin["volumes"]}
    for config in (origin, cache):
        # In a container: reachable from the other services, data on the named volume.
        assert config["server"]["listen"].startswith("0.0.0.0:")
        assert config["server"]["metrics"].startswith("0.0.0.0:")
        assert config["server"]["data_dir"] == "/var/lib/tierdisk"


# ---------------------------------------------------------------------------- Dockerfile


def test_dockerfile_builds_the_image_the_stack_expects() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.M)
    assert 'pip install ".[fast]"' in dockerfile
    # The processes tune malloc themselves; glibc's MALLOC_* variables in the image would
    # keep it tuned when TIERDISK_NO_MALLOC_TUNING=1 (README, "Memory") asks for it off.
    assert not re.search(r"\bMALLOC_\w+=", dockerfile)
    assert re.search(r"^USER (?!root\b)\S+", dockerfile, re.M)
    assert re.search(r"^EXPOSE 7400 9400$", dockerfile, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*tierdisk-healthcheck", dockerfile, re.M)
    assert re.search(r'^ENTRYPOINT \["tierdisk"\]$', dockerfile, re.M)
    # What the build needs is in the build context.
    ignored = [
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    needed = [
        "pyproject.toml", "README.md", "service", "client", "protos",
        "deploy/healthcheck.py", "deploy/origin-entrypoint.py", "deploy/tierdisk/origin.toml",
    ]  # fmt: skip
    for path in needed:
        parts = path.split("/")
        prefixes = {"/".join(parts[: i + 1]) for i in range(len(parts))}
        assert not prefixes & set(ignored), f".dockerignore drops {path}"


# ---------------------------------------------------------------------------- health probe


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


def probe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def test_probe_exits_0_when_serving(health_server: tuple[str, health.HealthServicer]) -> None:
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    done = probe(address)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{address} service '': SERVING"


def test_probe_exits_1_when_not_serving(health_server: tuple[str, health.HealthServicer]) -> None:
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("tierdisk.v1.BlockDevice", health_pb2.HealthCheckResponse.NOT_SERVING)
    done = probe(address, "tierdisk.v1.BlockDevice")
    assert done.returncode == 1
    assert done.stderr.strip() == f"{address} service 'tierdisk.v1.BlockDevice': NOT_SERVING"
    unknown = probe(address, "no.such.Service")
    assert unknown.returncode == 1
    assert "NOT_FOUND" in unknown.stderr


def test_probe_exits_1_when_nothing_answers() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    server.stop(None).wait()  # the port is free again: nothing listens there
    for address in (f"127.0.0.1:{port}", "unix:/nonexistent/tierdisk.sock"):
        done = probe(address, "--timeout", "0.5")
        assert done.returncode == 1, address
        assert "UNAVAILABLE" in done.stderr or "DEADLINE_EXCEEDED" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------- origin entrypoint


@pytest.fixture
def fake_tierdisk(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment whose `tierdisk` on PATH records its arguments instead of serving."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    recorded = tmp_path / "argv"
    script = bin_dir / "tierdisk"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{recorded}"\n')
    script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERDISK_SERVER_")}
    env.pop("BASE_IMAGE_SIZE", None)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env, recorded


def entrypoint(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ENTRYPOINT), *args],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_origin_entrypoint_creates_the_base_image_once_then_serves(
    fake_tierdisk: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    env, recorded = fake_tierdisk
    env["BASE_IMAGE_SIZE"] = "1MiB"
    config = str(TIER_CONFIGS / "origin.toml")
    data = tmp_path / "data"
    done = entrypoint(env, "--config", config, "--data-dir", str(data), "--listen", "127.0.0.1:0")
    assert done.returncode == 0, done.stderr
    assert recorded.read_text().split() == [
        "serve", "--config", config, "--data-dir", str(data), "--listen", "127.0.0.1:0",
    ]  # fmt: skip
    image = data / "base.img"
    content = image.read_bytes()
    assert len(content) == 1 << 20
    for n in (0, 1, 2047):
        sector = content[n * 512 : (n + 1) * 512]
        head = b"tierdisk base sector %d\n" % n
        assert sector == head + bytes([n % 251 + 1]) * (512 - len(head))
    assert [p.name for p in data.iterdir()] == ["base.img"]

    # A second start keeps the image (and whatever it holds).
    image.write_bytes(b"x" * 4096)
    env["BASE_IMAGE_SIZE"] = "2MiB"
    assert entrypoint(env, "--config", config, "--data-dir", str(data)).returncode == 0
    assert image.read_bytes() == b"x" * 4096


def test_origin_entrypoint_follows_data_dir_env_and_refuses_bad_sizes(
    fake_tierdisk: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    env, recorded = fake_tierdisk
    config = str(TIER_CONFIGS / "origin.toml")
    env["TIERDISK_SERVER_DATA_DIR"] = str(tmp_path / "env-data")
    for bad in ("lots", "1000", "0"):
        env["BASE_IMAGE_SIZE"] = bad
        done = entrypoint(env, "--config", config)
        assert done.returncode == 2, bad
        assert "BASE_IMAGE_SIZE" in done.stderr
        assert not recorded.exists()
    env["BASE_IMAGE_SIZE"] = "2M"  # units as the server reads them: 2 MiB
    assert entrypoint(env, "--config", config).returncode == 0
    assert (tmp_path / "env-data" / "base.img").stat().st_size == 2 << 20
    (tmp_path / "env-data" / "base.img").unlink()
    del env["BASE_IMAGE_SIZE"]  # default: 64 MiB
    assert entrypoint(env, "--config", config).returncode == 0
    assert (tmp_path / "env-data" / "base.img").stat().st_size == 64 << 20


def test_origin_entrypoint_says_in_one_line_what_it_cannot_read_or_run(
    fake_tierdisk: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    """A config it cannot read or parse exits 2, a `tierdisk` not on PATH 127 (as a shell
    says it), each with one line naming it, never a traceback."""
    env, recorded = fake_tierdisk
    env["BASE_IMAGE_SIZE"] = "1MiB"
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b"# caf\xe9\n[server]\n")
    for config, status, words in (
        (tmp_path / "missing.toml", 2, "No such file"),
        (bad, 2, str(bad)),
        (latin1, 2, str(latin1)),
    ):
        done = entrypoint(env, "--config", str(config), "--data-dir", str(tmp_path / "d"))
        assert done.returncode == status, done.stderr
        assert done.stderr.count("\n") == 1 and words in done.stderr, done.stderr
    # a config of the wrong shape, or a sector size the server refuses, is the server's to
    # refuse (with its own line): no image is made from it
    layer = '[[volumes]]\nname = "base"\n[[volumes.layers]]\nkind = "raw"\npath = "b.img"\n'
    for n, text in enumerate(
        [
            'volumes = "abc"\n',
            'server = "x"\n',
            "[server]\ndata_dir = 5\n",
            *(f"{layer}sector_size = {ss}\n" for ss in ("0", "-512", "1", "true", "1000")),
        ]
    ):
        shapeless = tmp_path / f"shapeless{n}.toml"
        shapeless.write_text(text)
        where = ["--data-dir", str(tmp_path / "d")] if "[[volumes]]" in text else []
        done = entrypoint(env, "--config", str(shapeless), *where)
        assert done.returncode == 0 and not done.stderr, (text, done.stderr)
        assert recorded.read_text().split()[:3] == ["serve", "--config", str(shapeless)]
        assert not (tmp_path / "d").exists(), text
        recorded.unlink()
    env["PATH"] = str(tmp_path / "nowhere")
    origin = str(TIER_CONFIGS / "origin.toml")
    done = entrypoint(env, "--config", origin, "--data-dir", str(tmp_path / "d"))
    assert done.returncode == 127, done.stderr
    last = done.stderr.splitlines()[-1]  # after the line saying it created the image
    assert last.startswith("origin-entrypoint: cannot run tierdisk: No such file"), done.stderr
    assert "Traceback" not in done.stderr
    assert not recorded.exists()
