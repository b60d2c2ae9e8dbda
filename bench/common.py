"""Shared helpers of the benchmarks: levers, process accounting, child processes, statistics.

Nothing here measures anything by itself. Every child process is started by us and stopped
by its PID (SIGTERM, then SIGKILL after a timeout); nothing is ever killed by name.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
PYTHON = sys.executable
SECTOR = 512
KiB = 1 << 10
MiB = 1 << 20

NO_UVLOOP = "TIERDISK_NO_UVLOOP"
NO_MALLOC = "TIERDISK_NO_MALLOC_TUNING"
POLLER_BATCH = "TIERDISK_SERVER_GRPC_POLLER_BATCH"  # tierdisk serve's [server] override
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

GRPC_SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", 17 << 20),
    ("grpc.max_send_message_length", 17 << 20),
]
GRPC_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.enable_retries", 0),
]


def switched_off(name: str) -> bool:
    """True when the benchmark switch ``name`` (an environment variable) is set."""
    return os.environ.get(name, "") not in ("", "0")


def apply_levers() -> dict[str, bool]:
    """Tune malloc and install uvloop in this process, unless the benchmark switches
    (``TIERDISK_NO_MALLOC_TUNING``, ``TIERDISK_NO_UVLOOP``) say not to. Returns what is on;
    ``poller`` stays False until :func:`apply_poller_lever`."""
    from tierdisk.client.tune import install_uvloop, tune_malloc

    malloc = False if switched_off(NO_MALLOC) else tune_malloc()
    uvloop = False if switched_off(NO_UVLOOP) else install_uvloop()
    return {"malloc": malloc, "uvloop": uvloop, "poller": False}


def apply_poller_lever(levers: dict[str, bool]) -> None:
    """The opt-in lever: when ``TIERDISK_SERVER_GRPC_POLLER_BATCH`` is true (what
    ``tierdisk serve`` reads as ``[server] grpc_poller_batch``), put this process's gRPC
    poller thread in the batch scheduling class (``tune.batch_grpc_poller``) and note it in
    ``levers``. Call it once this process's first ``grpc.aio`` server or channel exists:
    the thread starts with it."""
    from tierdisk.client.tune import batch_grpc_poller
    from tierdisk.service.config_values import parse_switch

    wanted = parse_switch(os.environ.get(POLLER_BATCH, "false"), POLLER_BATCH)
    if wanted and not levers["poller"]:
        levers["poller"] = batch_grpc_poller()


def lever_env(*, uvloop: bool = True, malloc: bool = True, poller: bool = False) -> dict[str, str]:
    """The environment of a child process with the given levers (server or client);
    ``poller`` is opt-in, off by default as in ``tierdisk serve``."""
    switches = (NO_UVLOOP, NO_MALLOC, POLLER_BATCH, *MALLOC_ENV)
    env = {k: v for k, v in os.environ.items() if k not in switches}
    env["PYTHONUNBUFFERED"] = "1"
    if not uvloop:
        env[NO_UVLOOP] = "1"
    if not malloc:
        env[NO_MALLOC] = "1"
    if poller:
        env[POLLER_BATCH] = "1"
    return env


def have_module(name: str) -> bool:
    """True when ``name`` (e.g. ``tierdisk.service.layers.sparse``) can be imported."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def volume_toml(name: str, layers: list[dict[str, Any]], read_only: bool = False) -> str:
    """A ``[[volumes]]`` table of a tierdisk config with ``layers`` (top first)."""
    out = [f'[[volumes]]\nname = "{name}"\n']
    if read_only:
        out.append("read_only = true\n")
    for layer in layers:
        out.append("  [[volumes.layers]]\n")
        for key, value in layer.items():
            out.append(f"  {key} = {json.dumps(value)}\n")
    return "".join(out)


# -- process accounting -----------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class CpuSample:
    """CPU seconds (user + system, all threads) and minor page faults of a process."""

    cpu: float
    minflt: int


def proc_sample(pid: int) -> CpuSample | None:
    """A :class:`CpuSample` of process ``pid`` from /proc, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): minflt = 10, utime = 14, stime = 15 (1-based).
    return CpuSample((int(fields[11]) + int(fields[12])) / _TICK, int(fields[7]))


MEMORY_STALLS = ("compact_stall", "allocstall_normal", "allocstall_movable", "pgsteal_direct")
"""/proc/vmstat counters of the kernel making room for an allocation in the allocating
thread (direct compaction, direct reclaim): CPU a process pays for the machine's memory
state, not for its own work."""


def memory_stalls() -> dict[str, int]:
    """The :data:`MEMORY_STALLS` counters now (empty where /proc/vmstat is missing)."""
    try:
        with open("/proc/vmstat") as f:
            pairs = (line.split() for line in f)
            return {k: int(v) for k, v in pairs if k in MEMORY_STALLS}
    except OSError:
        return {}


def self_sample() -> CpuSample:
    """A :class:`CpuSample` of this process (getrusage: finer than /proc ticks)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return CpuSample(ru.ru_utime + ru.ru_stime, ru.ru_minflt)


# -- child processes --------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for tools that cannot take 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_pid(proc: subprocess.Popen[Any], timeout: float = 20.0) -> None:
    """SIGTERM ``proc`` by its PID, wait, SIGKILL by PID if it does not exit."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


class ServerProc:
    """A server child process that writes a ready file (``tierdisk serve`` or the floor)."""

    def __init__(
        self,
        cmd: Sequence[str],
        ready: Path,
        *,
        env: dict[str, str] | None = None,
        log: Path | None = None,
        name: str = "server",
    ) -> None:
        self.name = name
        self.ready = ready
        with contextlib.suppress(FileNotFoundError):
            ready.unlink()
        self._log = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env=env,
            cwd=REPO,
        )
        self.info: dict[str, Any] = {}

    @classmethod
    def tierdisk(
        cls,
        config: Path,
        workdir: Path,
        name: str,
        *,
        env: dict[str, str] | None = None,
        extra: Sequence[str] = (),
    ) -> ServerProc:
        ready = workdir / f"ready-{name}.json"
        cmd = [
            PYTHON,
            "-m",
            "tierdisk.service",
            "--config",
            str(config),
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "",
            "--log-level",
            "warning",
            "--ready-file",
            str(ready),
            *extra,
        ]
        return cls(cmd, ready, env=env, log=workdir / f"{name}.log", name=name)

    @classmethod
    def floor(
        cls, workdir: Path, name: str = "floor", *extra: str, env: dict[str, str] | None = None
    ) -> ServerProc:
        """``bench/floor_server.py`` (the bare grpc.aio floor; ``extra``: its flags) on
        127.0.0.1, port 0; with the benchmark levers on unless ``env`` says otherwise."""
        ready = workdir / f"ready-{name}.json"
        cmd = [
            PYTHON,
            str(BENCH / "floor_server.py"),
            "--listen",
            "127.0.0.1:0",
            "--ready-file",
            str(ready),
            *extra,
        ]
        env = lever_env() if env is None else env
        return cls(cmd, ready, env=env, log=workdir / f"{name}.log", name=name)

    def wait_ready(self, timeout: float = 60.0) -> ServerProc:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready.exists():
                self.info = json.loads(self.ready.read_text())
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode}")
            time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"{self.name} did not become ready in {timeout:.0f} s")

    @property
    def address(self) -> str:
        return str(self.info["grpc"])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        stop_pid(self.proc)
        if self._log is not subprocess.DEVNULL:
            self._log.close()  # type: ignore[union-attr]


# -- statistics -------------------------------------------------------------------------


def summary(values: Iterable[float | None]) -> dict[str, float] | None:
    """Median, min and max of the values that are not None (None when there are none)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"med": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


VIRTIO_BALLOON = 5
"""virtio device id of the memory balloon."""
BALLOON_F_REPORTING = 5
"""Its feature bit for free page reporting (``VIRTIO_BALLOON_F_REPORTING``)."""
PAGE_REPORTING_DELAY_S = 2.0
"""How long Linux waits after freeing memory before reporting it to the host (the kernel's
``PAGE_REPORTING_DELAY``, 2 s, not tunable)."""


def free_page_reporting(devices: Path = Path("/sys/bus/virtio/devices")) -> bool:
    """Whether this machine is a VM that hands free memory back to its host: a virtio balloon
    that negotiated free page reporting. Memory freed here is then reported a couple of
    seconds later (:data:`PAGE_REPORTING_DELAY_S`), the host drops it, and the next touch of
    it costs a host page fault per page: ~2,000-3,000 µs of CPU per MiB written into new page
    cache instead of ~200-300 (bench/README.md, "Fresh memory on this VM")."""
    for device in devices.glob("*"):
        try:
            if int((device / "device").read_text(), 16) != VIRTIO_BALLOON:
                continue
            features = (device / "features").read_text().strip()
        except (OSError, ValueError):
            continue
        if len(features) > BALLOON_F_REPORTING and features[BALLOON_F_REPORTING] == "1":
            return True
    return False


def machine() -> dict[str, Any]:
    """nproc, CPU model, kernel and versions of what is measured."""
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str] = {"python": sys.version.split()[0]}
    from importlib import metadata

    for dist in ("grpcio", "protobuf", "uvloop", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "absent"
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) * 1024
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": os.uname().release,
        "mem_bytes": mem,
        "free_page_reporting": free_page_reporting(),
        "versions": versions,
    }
