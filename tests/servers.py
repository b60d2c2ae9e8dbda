"""Helpers that start real tierdisk servers on 127.0.0.1 port 0 for tests.

* :func:`running_server`: a :class:`~tierdisk.service.server.Server` in the test's own event
  loop (fast; for RPC semantics).
* :class:`ServerProcess`: ``python -m tierdisk.service`` as a child process (for signals,
  exit codes, crashes and restarts). Stopped by PID only.
* :func:`scrape` and its readers (:func:`samples`, :func:`value`, :func:`created_series`,
  :func:`promtool_check_metrics`): a server's ``/metrics`` as text, then as numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from prometheus_client.parser import text_string_to_metric_families
from tools import require_tool

from tierdisk.service.config import load_config
from tierdisk.service.server import Server
from tierdisk.v1 import blockdevice_pb2 as pb

__all__ = [
    "FOUR_VOLUMES",
    "FRAGMENT",
    "FRAGMENT_GAP",
    "ServerProcess",
    "created_series",
    "fragmented_extents",
    "fragmented_server",
    "free_port",
    "metric",
    "promtool_check_metrics",
    "ram",
    "remote",
    "running_server",
    "samples",
    "scrape",
    "serve_once",
    "server_section",
    "toml_volume",
    "tree_of",
    "value",
    "write_config",
]


def limit_open_files(count: int) -> None:
    """Set this process's open-file limit, soft and hard, to ``count`` (in a child, before
    it runs ``tierdisk serve``)."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))


def serve_once(
    cwd: Path, *args: str, open_files: int | None = None
) -> subprocess.CompletedProcess[str]:
    """``tierdisk serve ARGS`` (metrics off) as a child process in ``cwd``, for a start that
    ends by itself (a config error, an address in use): its exit status and output, text.
    Killed (``subprocess.run``'s timeout) if it runs over 60 s. ``open_files``: its hard and
    soft open-file limit."""
    return subprocess.run(
        [sys.executable, "-m", "tierdisk.service", "--metrics", "", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        preexec_fn=None if open_files is None else lambda: limit_open_files(open_files),
    )


def toml_volume(name: str, *layers: dict[str, Any], read_only: bool = False) -> str:
    """A ``[[volumes]]`` table with ``layers`` (top first) as TOML."""
    lines = ["[[volumes]]", f"name = {json.dumps(name)}", f"read_only = {json.dumps(read_only)}"]
    for layer in layers:
        lines.append("[[volumes.layers]]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in layer.items()]
    return "\n".join(lines) + "\n"


def ram(size: str | None = None, **options: Any) -> dict[str, Any]:
    """A ram layer's options."""
    return {"kind": "ram", **({"size": size} if size else {}), **options}


def remote(target: str, volume: str, **options: Any) -> dict[str, Any]:
    """A remote layer's options (short timeout, so failures stay quick)."""
    return {"kind": "remote", "target": target, "volume": volume, "timeout": 2, **options}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


FOUR_VOLUMES = (
    toml_volume("ram", ram("64MiB"))
    + toml_volume(
        "stack", ram(read_cache=True), {"kind": "raw", "path": "base.img", "size": "8MiB"}
    )
    + toml_volume("ro", ram("1MiB"), read_only=True)
    + toml_volume("big4k", ram("4MiB", sector_size=4096))
)
"""The volumes the server, client and CLI tests serve: a RAM volume, a RAM read cache over a
raw file, a read-only volume and one with 4 KiB sectors, in that order."""


def server_section(listen: str, tmp_path: Path) -> str:
    """A ``[server]`` table listening on ``listen`` (a fixed address, e.g. a tier that other
    servers' ``remote`` layers name), with no metrics endpoint and ``tmp_path/data``."""
    return f'[server]\nlisten = "{listen}"\nmetrics = ""\ndata_dir = "{tmp_path / "data"}"\n'


def tree_of(reply: pb.InspectResponse) -> dict[str, Any]:
    """An Inspect reply's tree as plain Python values (numbers are floats)."""
    return json_format.MessageToDict(reply.tree)


def write_config(tmp_path: Path, body: str, name: str = "tierdisk.toml") -> Path:
    """Write a TOML config whose ``[server]`` binds port 0 and uses ``tmp_path/data``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / name
    header = (
        "[server]\n"
        'listen = "127.0.0.1:0"\n'
        'metrics = "127.0.0.1:0"\n'
        f'data_dir = "{tmp_path / "data"}"\n'
    )
    if body.lstrip().startswith("[server]"):
        server_table = body.split("[[volumes]]")[0]
        # else the default, 127.0.0.1:7400: taken by anything serving here (make serve)
        assert "listen" in server_table, "a test's own [server] must set listen (port 0)"
        header = ""
    path.write_text(header + body)
    return path


def metric(server: Server, name: str, **labels: str) -> float:
    """The value of one sample of ``server``'s metrics registry (0 when it has none yet)."""
    return server.metrics.registry.get_sample_value(name, labels) or 0.0


async def scrape(address: str) -> str:
    """The body of ``GET /metrics`` on ``address`` (``host:port``); fails unless 200."""
    reader, writer = await asyncio.open_connection(*address.rsplit(":", 1))
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body.decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape: ``{(name, labels): value}``."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a scrape (KeyError when it has none)."""
    return samples(text)[(name, frozenset(labels.items()))]


def created_series(text: str) -> list[str]:
    """Sample names of a scrape that end in ``_created``: no family here keeps any."""
    return sorted({name for name, _ in samples(text) if name.endswith("_created")})


async def promtool_check_metrics(text: str) -> None:
    """Fail unless ``promtool check metrics`` accepts the scrape ``text`` (skipped, or failed
    under ``TIERDISK_REQUIRE_TOOLS=1``, without promtool)."""
    promtool = require_tool("promtool")
    proc = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(text.encode()), 60)
    assert proc.returncode == 0, out.decode()


@contextlib.asynccontextmanager
async def running_server(
    tmp_path: Path, body: str, *, environ: dict[str, str] | None = None
) -> AsyncIterator[Server]:
    """A started in-process server for the volumes in ``body`` (TOML ``[[volumes]]``)."""
    config = load_config(str(write_config(tmp_path, body)), environ=environ or {})
    server = Server(config)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=5)


FRAGMENT = 60_000
"""Sectors of each alternating region of :func:`fragmented_server`'s volume ``frag``."""
FRAGMENT_GAP = 1_000
"""Sectors of its long runs: one held, one a hole."""


def fragmented_extents() -> list[tuple[int, int, int]]:
    """The allocation, ``(sector, count, depth)``, of :func:`fragmented_server`'s volume
    ``frag`` (``2 * (FRAGMENT + FRAGMENT_GAP)`` sectors, one layer): ``FRAGMENT`` sectors
    alternating held and hole; ``FRAGMENT_GAP`` held; ``FRAGMENT`` alternating again, starting
    held (so its first sector joins the run before it); a hole of ``FRAGMENT_GAP`` (joined
    with the last alternating sector, a hole). About 120,000 extents, and 1.6 MB as one
    ``GetAllocationResponse``: more than one reply may carry under ``max_io = 1MiB``; each
    half (0.8 MB) fits."""
    f, g = FRAGMENT, FRAGMENT_GAP
    alternating = [(s, 1, 0 if s % 2 == 0 else -1) for s in range(f)]
    second = [(f + g + s, 1, 0 if s % 2 == 0 else -1) for s in range(1, f - 1)]
    return [*alternating, (f, g + 1, 0), *second, (2 * f + g - 1, g + 1, -1)]


@contextlib.asynccontextmanager
async def fragmented_server(tmp_path: Path, body: str = "") -> AsyncIterator[Server]:
    """A started in-process server with the smallest ``max_io`` (1 MiB) and a ram volume
    ``frag`` laid out as :func:`fragmented_extents` says (written sector by sector through
    the engine, in about a second), plus the volumes in ``body``."""
    f, g = FRAGMENT, FRAGMENT_GAP
    head = (
        "[server]\n"
        'listen = "127.0.0.1:0"\n'
        'metrics = "127.0.0.1:0"\n'
        f'data_dir = "{tmp_path / "data"}"\n'
        'max_io = "1MiB"\n'
    )
    frag = toml_volume("frag", ram(str(2 * (f + g) * 512)))
    async with running_server(tmp_path, head + frag + body) as server:
        volume = server.registry.get("frag")
        sector = memoryview(b"\xa5" * 512)
        for s in (*range(0, f, 2), *range(f + g, 2 * f + g, 2)):
            await volume.write(s, sector)
        await volume.write(f, memoryview(b"\x5a" * (g * 512)))
        yield server


@contextlib.contextmanager
def _sighup_default() -> Iterator[None]:
    """SIGHUP at its default action in processes started meanwhile: a server started
    ignoring it (this suite run under ``nohup``) keeps it ignored, as it should, and the
    tests that stop one with SIGHUP would wait for nothing. (Only the main thread may
    change a handler; elsewhere the children inherit what the suite has.)"""
    try:
        previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, previous)


@dataclass
class ServerProcess:
    """A ``tierdisk serve`` child process."""

    proc: subprocess.Popen[bytes]
    ready_file: Path
    info: dict[str, str | int] = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        tmp_path: Path,
        config: Path | None = None,
        *args: str,
        listen: str = "127.0.0.1:0",
        wait: bool = True,
        env: dict[str, str] | None = None,
        open_files: int | None = None,
    ) -> ServerProcess:
        """Start ``tierdisk serve`` (``open_files``: its hard and soft open-file limit)."""
        ready = tmp_path / f"ready-{time.monotonic_ns()}.json"
        cmd = [
            sys.executable,
            "-m",
            "tierdisk.service",
            "--listen",
            listen,
            "--ready-file",
            str(ready),
            *args,
        ]
        if config is not None:
            cmd += ["--config", str(config)]
        if "--metrics" not in args:
            cmd += ["--metrics", "127.0.0.1:0"]
        if "--data-dir" not in args:
            cmd += ["--data-dir", str(tmp_path / "data")]
        with _sighup_default():
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=tmp_path,
                env={**os.environ, **(env or {})},
                preexec_fn=None if open_files is None else lambda: limit_open_files(open_files),
            )
        server = cls(proc, ready)
        if wait:
            server.wait_ready()
        return server

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait for the ready file; raise with the server's stderr if it exited first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                self.info = json.loads(self.ready_file.read_text())
                return
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"server exited with {self.proc.returncode}: {err}")
            time.sleep(0.02)
        self.kill()
        raise TimeoutError("server did not become ready")

    @property
    def grpc(self) -> str:
        return str(self.info["grpc"])

    @property
    def metrics(self) -> str:
        return str(self.info["metrics"])

    @property
    def nbd(self) -> str:
        return str(self.info.get("nbd", ""))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM by PID; wait; return the exit status."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL by PID and reap."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stderr_text(self) -> str:
        """The server's stderr (after it exited)."""
        return self.proc.stderr.read().decode() if self.proc.stderr else ""

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """SIGKILL by PID (if still running), reap, and close its output pipes."""
        self.kill()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()
