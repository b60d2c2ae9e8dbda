"""bench/run: tierdisk against its floor and its peers, in one run (see bench/README.md).

Starts every server it needs (each in its own process, on 127.0.0.1 port 0 or a port it
just found free), the load generators (bench/loadgen.py workers), qemu-nbd and fio when
present, and then measures every cell once per run, runs interleaved (run-major order,
rotated), so that every figure is a median of several runs and every ratio is taken within a
run. Prints one table; writes bench/results/latest.json. Everything it started is stopped
by PID at the end, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BENCH,
    PAGE_REPORTING_DELAY_S,
    PYTHON,
    REPO,
    KiB,
    MiB,
    ServerProc,
    free_page_reporting,
    free_port,
    have_module,
    lever_env,
    machine,
    memory_stalls,
    proc_sample,
    stop_pid,
    summary,
    volume_toml,
)

RESULTS = BENCH / "results"
VOLUME_BYTES = 512 * MiB
READ_OFF, READ_SIZE = 0, 256 * MiB  # reads stay here (prefilled / warm)
WRITE_OFF, WRITE_SIZE = 256 * MiB, 256 * MiB  # writes go here, so reads stay as set up
TIER_BYTES = 256 * MiB  # the cache-tier read
TIER_COLD_NBD = "tier cold, NBD between tiers"  # the remote layer's nbd option
TIER_WARM_NBD = "tier warm, NBD between tiers"
FRESH_WRITE = "256 MiB into a new file, right before each cold read"
SCALE_TIMEOUT = 600  # seconds bench/sparse_scale.py may take at most
FULL_BUDGET = 14 * 60  # seconds the full run may take in all


@dataclass(frozen=True)
class Workload:
    op: str
    bs: int
    qd: int

    @property
    def name(self) -> str:
        size = f"{self.bs // MiB}M" if self.bs >= MiB else f"{self.bs // KiB}K"
        return f"{self.op} {size} QD{self.qd}"

    @property
    def is_read(self) -> bool:
        return self.op.endswith("read")

    @property
    def region(self) -> tuple[int, int]:
        return (READ_OFF, READ_SIZE) if self.is_read else (WRITE_OFF, WRITE_SIZE)


RR4K_1 = Workload("randread", 4 * KiB, 1)
RR4K_32 = Workload("randread", 4 * KiB, 32)
SR1M_1 = Workload("seqread", MiB, 1)
SR1M_4 = Workload("seqread", MiB, 4)
SW1M_1 = Workload("seqwrite", MiB, 1)
SW1M_4 = Workload("seqwrite", MiB, 4)
SR64K_4 = Workload("seqread", 64 * KiB, 4)
MAIN = [RR4K_1, RR4K_32, SR1M_1, SR1M_4, SW1M_1, SW1M_4]
LEVER_WORKLOADS = [RR4K_32, SR1M_4]
TIER_READ = Workload("seqread", MiB, 4)

FLOOR_LIKE = "floor + handler wrappers, health, reflection"
BATCH = 8  # reads a ReadBatch call carries in the batch rows (QD 32: 4 calls in flight)
BATCH_FLOOR = f"floor, ReadBatch of {BATCH} (bare grpc.aio)"
BATCH_STACKS = ("ram", "ram-raw")


def batch_label(stack: str) -> str:
    """The label of the row reading ``stack`` by ``ReadBatch`` calls of :data:`BATCH`."""
    return f"tierdisk {STACKS[stack]}, ReadBatch of {BATCH}"


STACKS = {
    "ram": "[ram]",
    "ram-raw": "[ram, raw]",
    "ram-sparse-raw": "[ram, sparse read_cache, raw] warm",
}


@dataclass
class Row:
    """One line of the table: a figure measured once per run."""

    section: str
    target: str
    workload: Workload
    measure: Callable[[int], dict[str, Any] | None] | None
    baseline: tuple[str, str] | None = None  # (section, target) of the ratio's denominator
    note: str = ""
    invert: bool = False  # ratio = baseline / this row (e.g. after / before)
    runs: list[dict[str, Any] | None] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.section, self.target, self.workload.name)


class Worker:
    """A bench/loadgen.py --worker process: JSON commands in, JSON results out."""

    def __init__(
        self, name: str, env: dict[str, str], workdir: Path, inproc_config: Path | None = None
    ) -> None:
        cmd = [PYTHON, str(BENCH / "loadgen.py"), "--worker"]
        if inproc_config is not None:
            cmd += ["--inproc-config", str(inproc_config)]
        self.name = name
        self._err = open(workdir / f"worker-{name}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            env=env,
            cwd=REPO,
            text=True,
        )
        self.hello: dict[str, Any] = {}

    def wait_hello(self) -> None:
        """Wait for the worker's first line (``{"ready": true, ...}``) into :attr:`hello`."""
        self.hello = self._read(60.0)

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"load generator {self.name} did not answer in {timeout:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load generator {self.name} exited ({self.proc.poll()})")
        result: dict[str, Any] = json.loads(line)
        return result

    def run(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": "run", **cmd}) + "\n")
        self.proc.stdin.flush()
        timeout = float(cmd.get("duration", 10)) + float(cmd.get("warmup", 0)) + 90
        return self._read(timeout)

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.write('{"cmd": "quit"}\n')
            self.proc.stdin.flush()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            stop_pid(self.proc)
        self._err.close()


def _wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


class _Stop:
    """SIGTERM and Ctrl-C end a run through :meth:`Bench.teardown` (``SystemExit``,
    ``KeyboardInterrupt``): by default SIGTERM skipped it and left the run's servers, load
    generators and qemu-nbd running. While a child process is being started and recorded
    (:meth:`held`) a stop waits until the child is recorded, so that the teardown knows it:
    a stop that landed between the two left one server running."""

    def __init__(self) -> None:
        self._holding = 0
        self._pending: int | None = None

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self._holding:
            self._pending = signum
        else:
            self._stop(signum)

    @staticmethod
    def _stop(signum: int) -> NoReturn:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """A stop arriving inside waits for the end of the block."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
            if not self._holding and self._pending is not None:
                signum, self._pending = self._pending, None
                self._stop(signum)


STOP = _Stop()


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick: bool = args.quick
        self.reports_free_memory = free_page_reporting()  # see fresh_write
        self.freed_at = 0.0  # time.monotonic() when this runner last freed a lot of memory
        self.runs: int = args.runs or (3 if self.quick else 5)
        self.warmup: float = (
            args.warmup if args.warmup is not None else (0.15 if self.quick else 0.4)
        )
        self.duration: float = (
            args.duration if args.duration is not None else (0.4 if self.quick else 1.5)
        )
        self.work = Path(args.workdir or RESULTS / "work").resolve()
        self.image = self.work / "image.raw"
        self.servers: list[ServerProc] = []
        self.workers: list[Worker] = []
        self.children: list[subprocess.Popen[Any]] = []
        self.rows: list[Row] = []
        self.skipped: list[tuple[str, str, str]] = []  # (section, target, reason)
        self.notes: list[str] = []
        self.have_sparse = have_module("tierdisk.service.layers.sparse")
        self.have_remote = have_module("tierdisk.service.layers.remote")
        self.have_nbd = have_module("tierdisk.service.nbd")
        self.have_fio = bool(shutil.which("fio") and shutil.which("qemu-nbd"))
        self.have_nbdkit = bool(self.have_fio and shutil.which("nbdkit"))
        self.stacks = [s for s in STACKS if s != "ram-sparse-raw" or self.have_sparse]
        self.started = time.monotonic()

    # -- setup ----------------------------------------------------------------------------

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def make_image(self) -> None:
        if self.image.exists() and self.image.stat().st_size == VOLUME_BYTES:
            return
        self.log(f"creating {VOLUME_BYTES >> 20} MiB image of random data")
        rng = random.Random(42)
        tmp = self.image.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for _ in range(VOLUME_BYTES // (16 * MiB)):
                f.write(rng.randbytes(16 * MiB))
        tmp.replace(self.image)

    def refresh_image_cache(self) -> None:
        """Drop the image's pages from the page cache and read it back in order, so every
        run starts with the image cached the same way. How its pages got there matters: the
        same 1 MiB read took 84 µs by ``preadv`` alone from pages the page cache had filled
        for 4 KiB reads (an earlier run's random reads after an eviction, or qemu-nbd's) and
        41 µs after this (large folios), moving the ``[ram, raw]`` 1 MiB rows by a third
        from run to run."""
        fd = os.open(self.image, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # (dirty pages would not drop)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            while os.read(fd, 16 * MiB):
                pass
        finally:
            os.close(fd)

    def write_configs(self) -> None:
        data = self.work / "data"
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(self.work / "engine-data", ignore_errors=True)
        head = f'[server]\ndata_dir = "{data}"\n'
        if self.have_nbd:
            head += 'nbd = "127.0.0.1:0"\n'
        raw: dict[str, Any] = {"kind": "raw", "path": str(self.image), "read_only": True}
        volumes: dict[str, list[dict[str, Any]]] = {
            "ram": [{"kind": "ram", "size": VOLUME_BYTES}],
            "ram-raw": [{"kind": "ram"}, raw],
            "ram-sparse-raw": [
                {"kind": "ram"},
                {"kind": "sparse", "path": "cache/ram-sparse-raw", "read_cache": True},
                raw,
            ],
        }
        self.main_config = self.work / "main.toml"
        self.main_config.write_text(
            head + "".join(volume_toml(name, volumes[name]) for name in self.stacks)
        )
        self.lever_config = self.work / "lever.toml"
        self.lever_config.write_text(
            f'[server]\ndata_dir = "{data}"\n' + volume_toml("ram", volumes["ram"])
        )
        self.origin_config = self.work / "origin.toml"
        self.origin_config.write_text(
            head + volume_toml("base", [raw], read_only=True)  # with the NBD export
        )

    def start_server(
        self, name: str, config: Path, env: dict[str, str] | None = None, **levers: bool
    ) -> ServerProc:
        with STOP.held():
            server = ServerProc.tierdisk(
                config, self.work, name, env=lever_env(**levers) if env is None else env
            )
            self.servers.append(server)
        return server.wait_ready()

    def start_floor(self, name: str = "floor", *extra: str) -> ServerProc:
        with STOP.held():
            server = ServerProc.floor(self.work, name, *extra)
            self.servers.append(server)
        return server.wait_ready()

    def start_worker(self, name: str, inproc: Path | None = None, **levers: bool) -> Worker:
        with STOP.held():
            worker = Worker(name, lever_env(**levers), self.work, inproc)
            self.workers.append(worker)
        worker.wait_hello()
        return worker

    def run_child(
        self, cmd: list[str], *, timeout: float, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` to its end (stdout and stderr captured), as ``subprocess.run`` does,
        but started and recorded under :data:`STOP`, so a stop at any moment, even while it
        is being started, ends it in the teardown. A timeout stops it and raises
        ``subprocess.TimeoutExpired``."""
        with STOP.held():
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                cwd=REPO,
            )
            self.children.append(proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_pid(proc)
            proc.communicate()
            raise
        self.children.remove(proc)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def fill(
        self,
        worker: Worker,
        target: str,
        volume: str,
        *,
        write: bool,
        pid: int = 0,
        offset: int = READ_OFF,
        size: int = READ_SIZE,
    ) -> None:
        """Write (prefill) or read (warm a cache) a region once (default: the read region),
        1 MiB at a time."""
        result = worker.run(
            target=target,
            volume=volume,
            op="seqwrite" if write else "seqread",
            bs=MiB,
            qd=4,
            offset=offset,
            size=size,
            warmup=0,
            duration=300,
            max_ops=size // MiB,
            server_pid=pid,
        )
        if "error" in result:
            raise RuntimeError(f"filling {volume} on {target}: {result['error']}")

    def setup(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.make_image()
        self.refresh_image_cache()
        self.write_configs()
        self.log("starting servers")
        if self.args.tiers_only:
            self.setup_tiers_only()
            return
        self.floor = self.start_floor()
        self.floor_like = self.start_floor("floor-like", "--like-tierdisk")
        self.main = self.start_server("tierdisk", self.main_config)
        self.levers_on = self.start_server("tierdisk-levers-on", self.lever_config)
        self.no_uvloop = self.start_server("tierdisk-no-uvloop", self.lever_config, uvloop=False)
        self.no_malloc = self.start_server("tierdisk-no-malloc", self.lever_config, malloc=False)
        self.poller = self.start_server("tierdisk-poller", self.lever_config, poller=True)
        self.lg = self.start_worker("main")
        self.lg_no_uvloop = self.start_worker("no-uvloop", uvloop=False)
        self.lg_no_malloc = self.start_worker("no-malloc", malloc=False)
        self.lg_poller = self.start_worker("poller", poller=True)
        self.lg_inproc = self.start_worker("inproc", inproc=self.lever_config)
        self.inproc_addr = str(self.lg_inproc.hello["inproc"])
        self.log("prefilling [ram] volumes, warming the read cache")
        self.fill(self.lg, self.main.address, "ram", write=True, pid=self.main.pid)
        self.fill(self.lg, self.levers_on.address, "ram", write=True)
        self.fill(self.lg_no_uvloop, self.no_uvloop.address, "ram", write=True)
        self.fill(self.lg_no_malloc, self.no_malloc.address, "ram", write=True)
        self.fill(self.lg_poller, self.poller.address, "ram", write=True)
        self.fill(self.lg_inproc, self.inproc_addr, "ram", write=True)
        if self.have_sparse:
            self.fill(self.lg, self.main.address, "ram-sparse-raw", write=False)
        # Writes are measured in steady state: the RAM pages of the write region exist.
        for stack in self.stacks:
            self.fill(
                self.lg, self.main.address, stack, write=True, offset=WRITE_OFF, size=WRITE_SIZE
            )
        if self.have_fio:
            self.start_qemu_nbd()
        if self.have_nbdkit:
            self.start_nbdkit()
        if self.have_remote:
            self.origin = self.start_server("origin", self.origin_config)
        if self.args.compare:
            env = lever_env()
            env["PYTHONPATH"] = str(Path(self.args.compare).resolve())
            self.compare = self.start_server("compare", self.lever_config, env=env)
            self.fill(self.lg, self.compare.address, "ram", write=True)
        self.build_rows()

    def setup_tiers_only(self) -> None:
        """``--tiers-only``: the origin, the ``[ram]`` server it is compared with, one load
        generator, and only the rows of the tiers section."""
        if not (self.have_remote and self.have_sparse):
            raise SystemExit("bench/run --tiers-only: needs the remote and sparse layers")
        self.main = self.start_server("tierdisk", self.main_config)
        self.lg = self.start_worker("main")
        self.log("prefilling [ram]")
        self.fill(self.lg, self.main.address, "ram", write=True, pid=self.main.pid)
        self.origin = self.start_server("origin", self.origin_config)
        self.add_tier_rows()

    def start_qemu_nbd(self) -> None:
        self.qemu, self.nbd_port = self.start_nbd_peer(
            "qemu-nbd",
            lambda port: [
                "qemu-nbd",
                "--persistent",
                "--shared=16",
                "-b",
                "127.0.0.1",
                "-p",
                str(port),
                "-f",
                "raw",
                "--cache=writeback",
                "--aio=threads",
                str(self.image),
            ],
        )

    def start_nbdkit(self) -> None:
        self.nbdkit, self.nbdkit_port = self.start_nbd_peer(
            "nbdkit",
            lambda port: [
                "nbdkit",
                "-f",
                "-i",
                "127.0.0.1",
                "-p",
                str(port),
                "file",
                str(self.image),
            ],
        )

    def start_nbd_peer(
        self, name: str, command: Callable[[int], list[str]]
    ) -> tuple[subprocess.Popen[bytes], int]:
        """Start an NBD server of ours to compare with on a free loopback port."""
        for _ in range(5):
            port = free_port()
            log = open(self.work / f"{name}.log", "ab")  # noqa: SIM115
            with STOP.held():
                proc = subprocess.Popen(
                    command(port), stdin=subprocess.DEVNULL, stdout=log, stderr=log
                )
                self.children.append(proc)
            log.close()
            try:
                _wait_port(port, 10)
            except TimeoutError:
                stop_pid(proc)
                continue
            if proc.poll() is None:
                return proc, port
        raise RuntimeError(f"{name} did not start")

    # -- the rows -------------------------------------------------------------------------

    def grpc_cell(
        self,
        worker: Worker,
        target: Callable[[], str],
        volume: str,
        wl: Workload,
        pid: Callable[[], int],
        batch: int = 1,
    ) -> Callable[[int], dict[str, Any] | None]:
        """Measure ``wl`` against ``volume`` at ``target()``: one ``Read``/``Write`` per
        block, or with ``batch`` > 1 ``ReadBatch`` calls of ``batch`` blocks (``wl.qd``
        blocks in flight in all)."""

        def measure(run: int) -> dict[str, Any] | None:
            offset, size = wl.region
            return worker.run(
                batch=batch,
                target=target(),
                volume=volume,
                op=wl.op,
                bs=wl.bs,
                qd=wl.qd,
                offset=offset,
                size=size,
                warmup=self.warmup,
                duration=self.duration,
                max_ops=2_000_000,
                server_pid=pid(),
                seed=run + 1,
            )

        return measure

    def fio_cell(
        self, uri: Callable[[], str], wl: Workload, pid: Callable[[], int]
    ) -> Callable[[int], dict[str, Any] | None]:
        def measure(run: int) -> dict[str, Any] | None:
            return self.fio(uri(), wl, pid())

        return measure

    def fio(self, uri: str, wl: Workload, pid: int) -> dict[str, Any]:
        offset, size = wl.region
        rw = {
            "randread": "randread",
            "seqread": "read",
            "seqwrite": "write",
            "randwrite": "randwrite",
        }[wl.op]
        runtime_ms = int(self.duration * 1000)
        ramp_ms = int(self.warmup * 1000)
        cmd = [
            "fio",
            "--name=j",
            "--ioengine=nbd",
            f"--uri={uri}",
            f"--rw={rw}",
            f"--bs={wl.bs}",
            f"--iodepth={wl.qd}",
            f"--offset={offset}",
            f"--size={size}",
            "--time_based",
            f"--runtime={runtime_ms}ms",
            f"--ramp_time={ramp_ms}ms",
            "--output-format=json",
        ]
        srv0 = proc_sample(pid)
        t0 = time.perf_counter()
        out = self.run_child(cmd, timeout=self.duration + self.warmup + 60)
        wall = time.perf_counter() - t0
        srv1 = proc_sample(pid)
        if out.returncode != 0:
            return {"error": f"fio exited {out.returncode}: {out.stderr.strip()[-300:]}"}
        job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]
        side = job["read" if wl.is_read else "write"]
        iops = float(side["iops"])
        ops = int(side["total_ios"])
        pct = side.get("clat_ns", {}).get("percentile", {})
        p50 = pct.get("50.000000")
        cli = (job["usr_cpu"] + job["sys_cpu"]) / 100 * runtime_ms / 1000
        srv = None
        if srv0 and srv1 and iops:
            # qemu-nbd's CPU over the whole fio process, per op at the measured rate.
            srv = (srv1.cpu - srv0.cpu) * 1e6 / (iops * wall)
        return {
            "op": wl.op,
            "bs": wl.bs,
            "qd": wl.qd,
            "ops": ops,
            "ops_s": iops,
            "mb_s": float(side["bw_bytes"]) / 1e6,
            "lat_p50_us": p50 / 1000 if p50 else None,
            "cli_cpu_us_op": cli * 1e6 / ops if ops else None,
            "srv_cpu_us_op": srv,
            "seconds": runtime_ms / 1000,
        }

    def build_rows(self) -> None:
        main, floor, lg = self.main, self.floor, self.lg
        floor_like = self.floor_like
        for wl in MAIN:
            self.rows.append(
                Row(
                    "main",
                    "floor (bare grpc.aio)",
                    wl,
                    self.grpc_cell(lg, lambda: floor.address, "ram", wl, lambda: floor.pid),
                )
            )
            if wl in LEVER_WORKLOADS:
                # What tierdisk serve's composition costs without storage: handler wrappers,
                # health and reflection around the same servicer.
                self.rows.append(
                    Row(
                        "main",
                        FLOOR_LIKE,
                        wl,
                        self.grpc_cell(
                            lg, lambda: floor_like.address, "ram", wl, lambda: floor_like.pid
                        ),
                        baseline=("main", "floor (bare grpc.aio)"),
                    )
                )
            if wl == RR4K_32:
                self.add_batch_rows(wl)
            for stack in STACKS:
                label = f"tierdisk {STACKS[stack]}"
                if stack not in self.stacks:
                    if wl == MAIN[0]:
                        self.skipped.append(("main", label, "skipped: sparse layer not built yet"))
                    continue
                self.rows.append(
                    Row(
                        "main",
                        label,
                        wl,
                        self.grpc_cell(lg, lambda: main.address, stack, wl, lambda: main.pid),
                        baseline=("main", "floor (bare grpc.aio)"),
                    )
                )
            if self.have_fio:
                self.rows.append(
                    Row(
                        "main",
                        "qemu-nbd + fio (raw image)",
                        wl,
                        self.fio_cell(
                            lambda: f"nbd://127.0.0.1:{self.nbd_port}/", wl, lambda: self.qemu.pid
                        ),
                    )
                )
            elif wl == MAIN[0]:
                self.skipped.append(
                    (
                        "main",
                        "qemu-nbd + fio",
                        "skipped: qemu-nbd or fio not installed (apt-get install qemu-utils fio)",
                    )
                )
            if self.have_nbdkit:
                self.rows.append(
                    Row(
                        "main",
                        "nbdkit file + fio (raw image)",
                        wl,
                        self.fio_cell(
                            lambda: f"nbd://127.0.0.1:{self.nbdkit_port}/",
                            wl,
                            lambda: self.nbdkit.pid,
                        ),
                        baseline=("main", "qemu-nbd + fio (raw image)"),
                    )
                )
            elif wl == MAIN[0]:
                self.skipped.append(
                    (
                        "main",
                        "nbdkit + fio",
                        "skipped: nbdkit not installed (apt-get install nbdkit)",
                    )
                )
            if self.have_nbd and self.have_fio:
                self.rows.append(
                    Row(
                        "main",
                        f"tierdisk NBD {STACKS['ram-raw']} + fio",  # the image qemu-nbd exports
                        wl,
                        self.fio_cell(
                            lambda: self.tierdisk_nbd_uri("ram-raw"), wl, lambda: main.pid
                        ),
                        baseline=("main", "qemu-nbd + fio (raw image)"),
                    )
                )
            elif wl == MAIN[0]:
                self.skipped.append(
                    (
                        "main",
                        "tierdisk NBD export + fio",
                        "skipped: NBD export (service/nbd.py) not built yet"
                        if not self.have_nbd
                        else "skipped: fio not installed",
                    )
                )
        # Levers, on [ram]: each switched off alone, against everything on, measured next to
        # each other on servers of the same config.
        on = ("levers", "all levers on")
        levers_on = self.levers_on
        for wl in LEVER_WORKLOADS:
            self.rows.append(
                Row(
                    "levers",
                    "all levers on",
                    wl,
                    self.grpc_cell(lg, lambda: levers_on.address, "ram", wl, lambda: levers_on.pid),
                )
            )
            self.rows.append(
                Row(
                    "levers",
                    "uvloop off (server+client)",
                    wl,
                    self.grpc_cell(
                        self.lg_no_uvloop,
                        lambda: self.no_uvloop.address,
                        "ram",
                        wl,
                        lambda: self.no_uvloop.pid,
                    ),
                    baseline=on,
                )
            )
            self.rows.append(
                Row(
                    "levers",
                    "malloc tuning off (server+client)",
                    wl,
                    self.grpc_cell(
                        self.lg_no_malloc,
                        lambda: self.no_malloc.address,
                        "ram",
                        wl,
                        lambda: self.no_malloc.pid,
                    ),
                    baseline=on,
                )
            )
            self.rows.append(
                Row(
                    "levers",
                    "+ gRPC poller in the batch class (opt-in; server+client)",
                    wl,
                    self.grpc_cell(
                        self.lg_poller,
                        lambda: self.poller.address,
                        "ram",
                        wl,
                        lambda: self.poller.pid,
                    ),
                    baseline=on,
                )
            )
            self.rows.append(
                Row(
                    "levers",
                    "server in the client's process",
                    wl,
                    self.grpc_cell(
                        self.lg_inproc,
                        lambda: self.inproc_addr,
                        "ram",
                        wl,
                        lambda: self.lg_inproc.proc.pid,
                    ),
                    baseline=on,
                )
            )
        self.rows.append(
            Row(
                "levers",
                "64 KiB messages (same bytes)",
                SR64K_4,
                self.grpc_cell(
                    lg, lambda: levers_on.address, "ram", SR64K_4, lambda: levers_on.pid
                ),
                baseline=on,
                note="ratio in MB/s against 1 MiB messages",
            )
        )
        # Another source tree (e.g. before a change), [ram], same load generator.
        if self.args.compare:
            label = f"tierdisk [ram] from {self.args.compare}"
            for wl in MAIN:
                self.rows.append(
                    Row(
                        "compare",
                        label,
                        wl,
                        self.grpc_cell(
                            lg, lambda: self.compare.address, "ram", wl, lambda: self.compare.pid
                        ),
                        baseline=("main", "tierdisk [ram]"),
                        invert=True,
                        note="ratio: this tree's [ram] / that tree's",
                    )
                )
        # The engine alone, in-process, no gRPC.
        engine_stacks = self.stacks
        for stack in engine_stacks:
            for wl in MAIN:
                if wl.is_read:
                    self.rows.append(Row("engine", f"engine {STACKS[stack]}", wl, None))
        # Cache tiers.
        if self.have_remote and self.have_sparse:
            self.add_tier_rows()
        else:
            missing = [
                k
                for k, ok in (("remote", self.have_remote), ("sparse", self.have_sparse))
                if not ok
            ]
            self.skipped.append(
                (
                    "tiers",
                    "cache tiers (256 MiB through [ram, sparse read_cache, remote -> origin])",
                    f"skipped: {' and '.join(missing)} layer not built yet",
                )
            )

    def add_batch_rows(self, wl: Workload) -> None:
        """Small reads by ``ReadBatch`` (tierdisk's own RPC): the floor's and tierdisk's,
        each against the bare floor's single Reads (how far past the floor batching goes)."""
        floor, main, lg = self.floor, self.main, self.lg
        self.rows.append(
            Row(
                "main",
                BATCH_FLOOR,
                wl,
                self.grpc_cell(lg, lambda: floor.address, "ram", wl, lambda: floor.pid, BATCH),
                baseline=("main", "floor (bare grpc.aio)"),
            )
        )
        for stack in BATCH_STACKS:
            cell = self.grpc_cell(lg, lambda: main.address, stack, wl, lambda: main.pid, BATCH)
            self.rows.append(
                Row(
                    "main", batch_label(stack), wl, cell, baseline=("main", "floor (bare grpc.aio)")
                )
            )

    def add_tier_rows(self) -> None:
        targets = ["origin direct", "[ram] local", "tier cold", "tier warm"]
        if self.have_nbd:
            targets += [TIER_COLD_NBD, TIER_WARM_NBD]
        for target in targets:
            self.rows.append(Row("tiers", target, TIER_READ, None))
        self.rows.append(Row("tiers", FRESH_WRITE, Workload("seqwrite", MiB, 1), None))

    def tierdisk_nbd_uri(self, volume: str) -> str:
        address = str(self.main.info.get("nbd", ""))
        return f"nbd://{address}/{volume}"

    # -- per-run extras: engine, tiers ----------------------------------------------------

    def run_engine(self, run: int) -> None:
        rows = {r.workload.name + "|" + r.target: r for r in self.rows if r.section == "engine"}
        if not rows:
            return
        cmd = [
            PYTHON,
            str(BENCH / "engine.py"),
            "--config",
            str(self.main_config),
            "--data-dir",
            str(self.work / "engine-data" / str(run)),
            "--offset",
            str(READ_OFF),
            "--size",
            str(READ_SIZE),
            "--warmup",
            str(self.warmup / 2),
            "--duration",
            str(self.duration / 2),
        ]
        for stack in self.stacks:
            cmd += ["--volume", stack]
        cmd += ["--prefill", "ram"]
        if "ram-sparse-raw" in self.stacks:
            cmd += ["--warm", "ram-sparse-raw"]
        for wl in MAIN:
            if wl.is_read:
                cmd += ["--workload", f"{wl.op}:{wl.bs}:{wl.qd}"]
        out = self.run_child(cmd, timeout=300, env=lever_env())
        shutil.rmtree(self.work / "engine-data" / str(run), ignore_errors=True)
        self.freed_at = time.monotonic()  # the engine process's volumes, its data folder
        got: dict[str, dict[str, Any]] = {}
        for line in out.stdout.splitlines():
            res = json.loads(line)
            wl = Workload(res["op"], res["bs"], res["qd"])
            got[wl.name + "|" + f"engine {STACKS[res['volume']]}"] = res
        for key, row in rows.items():
            row.runs.append(got.get(key) or {"error": out.stderr.strip()[-300:] or "no result"})

    def run_tiers(self, run: int) -> None:
        rows = {r.target: r for r in self.rows if r.section == "tiers"}
        if not rows:
            return
        variants: list[tuple[Row, Row, str | None]] = [
            (rows["tier cold"], rows["tier warm"], None)  # no nbd option: reads over gRPC
        ]
        if TIER_COLD_NBD in rows:  # the origin exports NBD; the tier asks it where
            variants.append((rows[TIER_COLD_NBD], rows[TIER_WARM_NBD], "auto"))
        if run % 2:
            variants.reverse()  # each goes first in every other run (fresh-memory cost)
        for cold, warm, address in variants:
            self.run_tier(run, cold, warm, rows[FRESH_WRITE], nbd=address)
        rows["origin direct"].runs.append(
            self.read_tier(self.origin.address, "base", self.origin.pid)
        )
        rows["[ram] local"].runs.append(self.read_tier(self.main.address, "ram", self.main.pid))

    def fresh_write(self) -> dict[str, Any]:
        """Write TIER_BYTES into a new file, 1 MiB per ``pwrite``, in this process, and
        delete it: the page cache a cold tier read's fills create, without the tiers.

        Run right before each cold read, so that read's fills get memory the guest used a
        moment ago. This VM returns free memory to its host (virtio-balloon free page
        reporting, :data:`PAGE_REPORTING_DELAY_S` after it is freed), and touching such memory
        again costs host page faults: ~2,500 µs of CPU per MiB instead of ~250, landing on
        whichever process touches it first. With this write, this process pays it, and its row
        (``cli CPU`` = this process's CPU per MiB) shows how much there was; the cold read
        that follows (well within the delay) reuses the memory the delete freed. Where the
        machine reports free memory, :meth:`run_tier` first waits out the report this
        runner's last big free started (the engine process's volumes, the last cache server's
        page cache; ``freed_at``): one landing during the cold read handed the rest of its
        fills reported memory (the fills went from ~0.3 to ~4.5 ms per MiB in the middle of
        a read; "the variant that goes second is slow")."""
        path = self.work / "fresh-write.tmp"
        data = random.Random(1).randbytes(MiB)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            started, cpu = time.perf_counter(), time.thread_time()
            for i in range(TIER_BYTES // MiB):
                os.pwrite(fd, data, i * MiB)
            seconds = time.perf_counter() - started
            cpu = time.thread_time() - cpu
        finally:
            os.close(fd)
            path.unlink()
        n = TIER_BYTES // MiB
        return {
            "ops_s": n / seconds,
            "mb_s": TIER_BYTES / seconds / 1e6,
            "cli_cpu_us_op": cpu * 1e6 / n,
        }

    def read_tier(self, target: str, volume: str, pid: int) -> dict[str, Any]:
        """The 256 MiB tier read from ``target``'s ``volume``, once."""
        wl = TIER_READ
        return self.lg.run(
            target=target,
            volume=volume,
            op=wl.op,
            bs=wl.bs,
            qd=wl.qd,
            offset=READ_OFF,
            size=TIER_BYTES,
            warmup=0,
            duration=300,
            max_ops=TIER_BYTES // wl.bs,
            server_pid=pid,
            check=False,
        )

    def run_tier(self, run: int, cold: Row, warm: Row, fresh: Row, nbd: str | None) -> None:
        """A cache server over the origin, started empty: read it cold (right after a
        :meth:`fresh_write`, recorded in ``fresh``), then warm; its remote layer's ``nbd``
        option is ``nbd`` (``None``: not given, the default, off: reads over gRPC). With
        NBD, the cold row
        records how many reads the layer made over NBD (``nbd_reads``), and is an error if
        none: a row named "NBD" that measured gRPC would mislead."""
        cache_dir = self.work / f"tier-{run}"
        shutil.rmtree(cache_dir, ignore_errors=True)
        config = self.work / "tier.toml"
        remote: dict[str, Any] = {"kind": "remote", "target": self.origin.address}
        remote["volume"] = "base"
        if nbd is not None:
            remote["nbd"] = nbd
        config.write_text(
            f'[server]\ndata_dir = "{cache_dir}"\n'
            + volume_toml(
                "tier",
                [
                    {"kind": "ram"},
                    {"kind": "sparse", "path": "cache/tier", "read_cache": True},
                    remote,
                ],
            )
        )
        over_nbd = bool(nbd)
        cache = self.start_server(f"tier-{run}{'-nbd' if over_nbd else ''}", config)
        try:
            # Connect first (outside the measured range), so the cold read times reads only.
            self.lg.run(
                target=cache.address,
                volume="tier",
                op="randread",
                bs=4 * KiB,
                qd=1,
                offset=TIER_BYTES,
                size=4 * KiB,
                warmup=0,
                duration=5,
                max_ops=1,
            )
            if self.reports_free_memory:
                # Let the report of memory this runner freed last (the engine's volumes, the
                # last cache server's page cache) happen now, not in the middle of the cold
                # read.
                time.sleep(
                    max(0.0, self.freed_at + PAGE_REPORTING_DELAY_S + 0.5 - time.monotonic())
                )
            fresh.runs.append(self.fresh_write())
            before = memory_stalls()
            result = self.read_tier(cache.address, "tier", cache.pid)
            after = memory_stalls()
            result["memory_stalls"] = {k: after[k] - before.get(k, 0) for k in after}
            if over_nbd:
                result.update(_nbd_reads(cache.address))
            cold.runs.append(result)
            warm.runs.append(self.read_tier(cache.address, "tier", cache.pid))
        finally:
            cache.stop()
            self.servers.remove(cache)
            shutil.rmtree(cache_dir, ignore_errors=True)
            self.freed_at = time.monotonic()

    # -- the run --------------------------------------------------------------------------

    def run(self) -> None:
        cells = [r for r in self.rows if r.measure is not None]
        for run in range(self.runs):
            self.log(f"run {run + 1}/{self.runs}: {len(cells)} cells, engine, tiers")
            started = time.monotonic()
            shift = (run * 7) % max(1, len(cells))
            for row in cells[shift:] + cells[:shift]:
                assert row.measure is not None
                try:
                    result = row.measure(run)
                except Exception as exc:  # keep going: one broken cell is one empty row
                    result = {"error": f"{type(exc).__name__}: {exc}"}
                row.runs.append(result)
            cells_done = time.monotonic()
            if not self.args.tiers_only:
                self.run_engine(run)
            engine_done = time.monotonic()
            self.run_tiers(run)
            self.log(
                f"run {run + 1}/{self.runs} took {cells_done - started:.0f} s for the cells, "
                f"{engine_done - cells_done:.0f} s for the engine, "
                f"{time.monotonic() - engine_done:.0f} s for the tiers"
            )
        self.scale = None if self.args.tiers_only else self.run_scale()

    def run_scale(self) -> dict[str, Any] | None:
        script = BENCH / "sparse_scale.py"
        if not script.exists():
            self.skipped.append(
                (
                    "scale",
                    "sparse layer at 1 TiB, 100k runs",
                    "skipped: bench/sparse_scale.py not written yet",
                )
            )
            return None
        if self.quick and not self.args.scale:
            self.skipped.append(
                (
                    "scale",
                    "sparse layer at 1 TiB, 100k runs",
                    "skipped in --quick (it takes minutes): bench/run, or "
                    "bench/run --quick --scale",
                )
            )
            return None
        self.log("sparse scale (bench/sparse_scale.py)")
        cmd = [PYTHON, str(script)]
        usage = self.run_child([*cmd, "--help"], timeout=60).stdout
        if "--json" in usage:
            cmd.append("--json")
        if self.quick and "--repeat" in usage:
            cmd += ["--repeat", "3"]
        self.scale_command = " ".join(["sparse_scale.py", *cmd[2:]])
        # The full run stays within its 15 minutes: the scale script gets what is left.
        left = FULL_BUDGET - (time.monotonic() - self.started)
        timeout = SCALE_TIMEOUT if self.quick else int(max(60.0, min(SCALE_TIMEOUT, left)))
        try:
            out = self.run_child(cmd, timeout=timeout, env=lever_env())
        except subprocess.TimeoutExpired:
            self.skipped.append(
                (
                    "scale",
                    "sparse_scale.py",
                    f"timed out after {timeout} s (the time left of the run's "
                    "budget); run python bench/sparse_scale.py alone",
                )
            )
            return None
        if out.returncode != 0:
            self.skipped.append(
                (
                    "scale",
                    "sparse_scale.py",
                    f"failed ({out.returncode}): {out.stderr.strip()[-200:]}",
                )
            )
            return None
        for line in reversed(out.stdout.splitlines()):
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    result: dict[str, Any] = json.loads(line)
                    result["table"] = out.stdout[: out.stdout.rfind(line)].rstrip()
                    result["command"] = self.scale_command
                    return result
        self.skipped.append(("scale", "sparse_scale.py", "printed no JSON"))
        return None

    def teardown(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(Exception):
                worker.stop()
        for server in reversed(self.servers):
            with contextlib.suppress(Exception):
                server.stop()
        for child in self.children:
            with contextlib.suppress(Exception):
                stop_pid(child)

    # -- report ---------------------------------------------------------------------------

    def ratio(self, row: Row, base: Row, metric: str = "ops_s") -> dict[str, float] | None:
        values = []
        for mine, theirs in zip(row.runs, base.runs, strict=False):
            if (
                mine
                and theirs
                and mine.get(metric)
                and theirs.get(metric)
                and "error" not in mine
                and "error" not in theirs
            ):
                values.append(mine[metric] / theirs[metric])
        return summary(values)

    def find(self, section: str, target: str, wl: Workload) -> Row | None:
        for row in self.rows:
            if row.key == (section, target, wl.name):
                return row
        return None

    def report(self) -> dict[str, Any]:
        table = []
        for row in self.rows:
            ok = [r for r in row.runs if r and "error" not in r]
            errors = [r["error"] for r in row.runs if r and "error" in r]
            entry: dict[str, Any] = {
                "section": row.section,
                "target": row.target,
                "workload": row.workload.name,
                "ops_s": summary(r["ops_s"] for r in ok),
                "mb_s": summary(r["mb_s"] for r in ok),
                "lat_p50_us": summary(r.get("lat_p50_us") for r in ok),
                "srv_cpu_us_op": summary(r.get("srv_cpu_us_op") for r in ok),
                "cli_cpu_us_op": summary(r.get("cli_cpu_us_op") for r in ok),
                "errors": errors[:3],
                "note": row.note,
            }
            if row.baseline is not None:
                base = self.find(
                    row.baseline[0],
                    row.baseline[1],
                    SR1M_4 if row.workload == SR64K_4 else row.workload,
                )
                if base is not None:
                    metric = "mb_s" if row.workload == SR64K_4 else "ops_s"
                    if row.invert:
                        entry["ratio"] = self.ratio(base, row, metric)
                        entry["ratio_vs"] = f"{row.baseline[1]} / this row"
                    else:
                        entry["ratio"] = self.ratio(row, base, metric)
                        entry["ratio_vs"] = row.baseline[1]
            table.append(entry)
        tiers = {r.target: r for r in self.rows if r.section == "tiers"}
        for entry in table:
            if entry["section"] != "tiers":
                continue
            if entry["target"] in ("tier warm", TIER_WARM_NBD):
                entry["ratio"] = self.ratio(tiers[entry["target"]], tiers["[ram] local"])
                entry["ratio_vs"] = "[ram] local"
            elif entry["target"] in ("tier cold", TIER_COLD_NBD):
                entry["ratio"] = self.ratio(tiers[entry["target"]], tiers["origin direct"])
                entry["ratio_vs"] = "origin direct"
        return {"table": table, "targets": self.targets(table)}

    def targets(self, table: list[dict[str, Any]]) -> list[dict[str, Any]]:
        def row(section: str, target: str, wl: Workload) -> Row | None:
            return self.find(section, target, wl)

        out: list[dict[str, Any]] = []

        def check(what: str, mine: Row | None, base: Row | None, goal: float | None) -> None:
            ratio = self.ratio(mine, base) if mine and base else None
            met = None if ratio is None or goal is None else ratio["med"] >= goal
            out.append({"target": what, "goal": goal, "ratio": ratio, "met": met})

        floor = "floor (bare grpc.aio)"
        qemu = "qemu-nbd + fio (raw image)"
        for stack, goal in (("ram", 0.95), ("ram-raw", 0.9)):
            for wl in (RR4K_32, SR1M_4):
                check(
                    f"tierdisk {STACKS[stack]} / floor, {wl.name}",
                    row("main", f"tierdisk {STACKS[stack]}", wl),
                    row("main", floor, wl),
                    goal,
                )
        for wl in (RR4K_32, SR1M_4):
            check(
                f"(no goal) tierdisk [ram] / {FLOOR_LIKE}, {wl.name}",
                row("main", "tierdisk [ram]", wl),
                row("main", FLOOR_LIKE, wl),
                None,
            )
        check(
            f"(no goal) {batch_label('ram')} / {BATCH_FLOOR}, {RR4K_32.name}",
            row("main", batch_label("ram"), RR4K_32),
            row("main", BATCH_FLOOR, RR4K_32),
            None,
        )
        tiers = {r.target: r for r in self.rows if r.section == "tiers"}
        if tiers:
            check(
                "cache tier warm re-read (gRPC between tiers, the default) / local [ram] read",
                tiers["tier warm"],
                tiers["[ram] local"],
                0.9,
            )
            check(
                "cache tier cold read (gRPC between tiers, the default) / direct origin read",
                tiers["tier cold"],
                tiers["origin direct"],
                0.5,
            )
            if TIER_COLD_NBD in tiers:
                check(
                    'cache tier cold read, nbd = "auto" (reads over the origin\'s NBD export) '
                    "/ direct origin read",
                    tiers[TIER_COLD_NBD],
                    tiers["origin direct"],
                    0.5,
                )
                check(
                    'cache tier warm re-read, nbd = "auto" (reads over the origin\'s NBD export) '
                    "/ local [ram] read",
                    tiers[TIER_WARM_NBD],
                    tiers["[ram] local"],
                    0.9,
                )
        else:
            out.append(
                {
                    "target": "cache tiers (warm >= 0.9x local, cold >= 0.5x origin)",
                    "goal": None,
                    "ratio": None,
                    "met": None,
                    "note": "skipped: remote/sparse layer not built yet",
                }
            )
        if self.have_fio:
            for wl in (SR1M_1, SR1M_4):
                check(
                    f"tierdisk [ram, raw] / qemu-nbd + fio, {wl.name}",
                    row("main", "tierdisk [ram, raw]", wl),
                    row("main", qemu, wl),
                    1.0,
                )
            check(
                f"(no goal) tierdisk [ram, raw] / qemu-nbd + fio, {RR4K_32.name}",
                row("main", "tierdisk [ram, raw]", RR4K_32),
                row("main", qemu, RR4K_32),
                None,
            )
            check(
                f"(no goal) {batch_label('ram-raw')} / qemu-nbd + fio, {RR4K_32.name}",
                row("main", batch_label("ram-raw"), RR4K_32),
                row("main", qemu, RR4K_32),
                None,
            )
        return out


# -- printing ---------------------------------------------------------------------------


def _nbd_reads(address: str) -> dict[str, Any]:
    """``{"nbd_reads": N}``: the reads the tier volume's remote layer (index 2) made over NBD,
    from its ``inspect``; with an ``error`` naming the layer's reason when it made none."""
    from tierdisk.client import Client

    with Client(address) as client:
        layer = client.volume("tier").inspect("layers/2")
    count = int(layer.get("requests", {}).get("NbdRead", {}).get("OK", 0))
    if count:
        return {"nbd_reads": count}
    problem = layer.get("nbd", {}).get("problem") or "no NbdRead counted"
    return {"nbd_reads": 0, "error": f"the reads did not go over NBD: {problem}"}


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _cell(s: dict[str, float] | None, digits: int = 0, spread: bool = False) -> str:
    if not s:
        return "-"
    text = _fmt(s["med"], digits)
    if spread:
        text += f" ({_fmt(s['min'], digits)}-{_fmt(s['max'], digits)})"
    return text


def render(result: dict[str, Any]) -> str:
    lines = []
    header = (
        "| section | target | workload | ops/s med (min-max) | MB/s | p50 µs | "
        "srv CPU µs/op | cli CPU µs/op | ratio med (min-max) | vs |"
    )
    lines.append(header)
    lines.append("|" + "---|" * 10)
    for e in result["report"]["table"]:
        ratio = _cell(e.get("ratio"), 2, spread=True) if e.get("ratio") else ""
        errs = f" ERR: {e['errors'][0][:80]}" if e["errors"] else ""
        lines.append(
            f"| {e['section']} | {e['target']} | {e['workload']} | "
            f"{_cell(e['ops_s'], 0, spread=True)} | {_cell(e['mb_s'], 1)} | "
            f"{_cell(e['lat_p50_us'])} | {_cell(e['srv_cpu_us_op'])} | "
            f"{_cell(e['cli_cpu_us_op'])} | {ratio} | {e.get('ratio_vs', '')}{errs} |"
        )
    for section, target, reason in result["skipped"]:
        lines.append(f"| {section} | {target} | - | {reason} | | | | | | |")
    lines.append("")
    lines.append("| target | goal | measured ratio med (min-max) | met |")
    lines.append("|---|---|---|---|")
    for t in result["report"]["targets"]:
        goal = f"≥ {t['goal']:.2f}" if t["goal"] is not None else "-"
        met = {True: "yes", False: "NO", None: "-"}[t["met"]]
        lines.append(
            f"| {t['target']} | {goal} | "
            f"{_cell(t['ratio'], 2, spread=True) if t['ratio'] else t.get('note', '-')}"
            f" | {met} |"
        )
    scale = result.get("scale")
    if scale:
        lines.append("")
        lines.append(f"scale: python bench/{scale.get('command', 'sparse_scale.py')}")
        lines.append("```")
        body = {k: v for k, v in scale.items() if k not in ("table", "command")}
        lines.append(scale.get("table") or json.dumps(body, indent=1)[:3000])
        lines.append("```")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 short runs (< 3 min)")
    p.add_argument("--runs", type=int, help="runs (default 3 quick, 5 full)")
    p.add_argument("--duration", type=float, help="measured seconds per cell")
    p.add_argument("--warmup", type=float, help="warm-up seconds per cell")
    p.add_argument(
        "--scale",
        action="store_true",
        help="also run bench/sparse_scale.py in --quick (the full run always does)",
    )
    p.add_argument(
        "--compare",
        metavar="TREE",
        help="also measure [ram] served from another source tree: a folder with a "
        "tierdisk/ package (service, client, v1), put first on PYTHONPATH",
    )
    p.add_argument(
        "--tiers-only",
        action="store_true",
        help="only the cache-tier rows (with the origin and [ram] servers they need)",
    )
    p.add_argument("--workdir", help="scratch folder (default bench/results/work)")
    p.add_argument("--json", default=str(RESULTS / "latest.json"), help="result file")
    args = p.parse_args(argv)
    STOP.install()
    bench = Bench(args)
    started = datetime.datetime.now(datetime.UTC)
    try:
        bench.setup()
        bench.run()
    finally:
        bench.teardown()
    result: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "command": "bench/run " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "machine": machine(),
        "settings": {
            "runs": bench.runs,
            "warmup_s": bench.warmup,
            "duration_s": bench.duration,
            "quick": bench.quick,
        },
        "elapsed_s": round(time.monotonic() - bench.started, 1),
        "built": {
            "sparse": bench.have_sparse,
            "remote": bench.have_remote,
            "nbd": bench.have_nbd,
            "fio+qemu-nbd": bench.have_fio,
        },
        "skipped": bench.skipped,
        "report": bench.report(),
        "scale": getattr(bench, "scale", None),
        "raw": [
            {"section": r.section, "target": r.target, "workload": r.workload.name, "runs": r.runs}
            for r in bench.rows
        ],
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    m = result["machine"]
    print(
        f"tierdisk bench — {result['date']} — {m['nproc']} x {m['cpu_model']} — "
        f"{result['command']} — {bench.runs} runs x {bench.duration:g} s "
        f"(+{bench.warmup:g} s warm-up), {result['elapsed_s']:.0f} s in all"
    )
    print(render(result))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
