"""Smoke tests of the benchmark: its load generator (bench/loadgen.py) runs for about a second
against a real ``tierdisk serve`` process and prints one valid JSON result; ``bench/run
--tiers-only`` fills every tier row; a ``bench/run`` stopped with SIGTERM leaves none of its
processes behind; ``bench/hotpath.py`` times every case; ``bench/contention.py`` measures both
of its servers. No timing is asserted: benchmarks
print figures, tests check that the tools work."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from servers import ServerProcess, write_config

REPO = Path(__file__).resolve().parent.parent
LOADGEN = REPO / "bench" / "loadgen.py"

CONFIG = """
[[volumes]]
name = "ram"
  [[volumes.layers]]
  kind = "ram"
  size = "8MiB"
"""


def _loadgen(*args: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, str(LOADGEN), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout
    result: dict[str, object] = json.loads(lines[0])
    return result


def test_loadgen_reads_and_writes_against_a_real_server(tmp_path: Path) -> None:
    config = write_config(tmp_path, CONFIG)
    with ServerProcess.start(tmp_path, config) as server:
        common = [
            "--target",
            server.grpc,
            "--volume",
            "ram",
            "--server-pid",
            str(server.pid),
            "--size",
            str(8 << 20),
            "--warmup",
            "0.1",
        ]
        written = _loadgen(
            *common, "--op", "seqwrite", "--bs", str(1 << 20), "--qd", "2", "--duration", "0.5"
        )
        read = _loadgen(*common, "--op", "randread", "--bs", "4096", "--qd", "4", "--duration", "1")
        batched = _loadgen(
            *common, "--op", "randread", "--bs", "4096", "--qd", "8", "--batch", "4"
        )  # ReadBatch calls of 4 reads, 2 calls in flight
        assert server.terminate() == 0
    assert batched["batch"] == 4 and isinstance(batched["ops"], int) and batched["ops"] % 4 == 0
    for result, op in ((written, "seqwrite"), (read, "randread"), (batched, "randread")):
        assert result["op"] == op
        assert isinstance(result["ops"], int) and result["ops"] > 0
        assert isinstance(result["ops_s"], float) and result["ops_s"] > 0
        for key in ("mb_s", "lat_p50_us", "cli_cpu_us_op", "srv_cpu_us_op", "seconds"):
            assert key in result, key
    assert read["bs"] == 4096 and read["qd"] == 4


def _tiers_only(tmp_path: Path, runs: int) -> list[str]:
    """``bench/run --tiers-only`` with its scratch folder (``work``) and JSON in ``tmp_path``."""
    return [
        sys.executable,
        str(REPO / "bench" / "runner.py"),
        "--tiers-only",
        "--runs",
        str(runs),
        "--workdir",
        str(tmp_path / "work"),
        "--json",
        str(tmp_path / "result.json"),
    ]


def test_hotpath_times_every_case() -> None:
    """The per-call timer drives both servicers through every case (the 1 MiB read takes
    and releases the reply budget through its done callback, as in gRPC; a ReadBatch of 8)."""
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "hotpath.py"), "--seconds", "0.1", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    timed = json.loads(out.stdout.strip().splitlines()[-1])["us_per_call"]
    assert sorted(timed) == ["batch4k", "read1m", "read4k", "write1m", "write4k"]
    for case, row in timed.items():
        assert row["floor"] > 0 and row["tierdisk"] > 0, (case, row)


CONTENTION_QUICK = ["--busy", "1", "--rounds", "1", "--seconds", "0.3"]


def test_contention_measures_both_servers_with_busy_processes() -> None:
    """bench/contention.py reads from a server with the poller lever and one without, with
    a busy process beside them, and prints a row for each and their ratio."""
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "contention.py"), *CONTENTION_QUICK],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for name in ("lever off", "lever on"):
        (row,) = [line for line in lines if line.startswith(name)]
        assert float(row.split()[2].replace(",", "")) > 0, row  # reads/s
    assert any(line.startswith("reads/s lever on / off: ") for line in lines), out.stdout


def test_bench_run_tiers_only_measures_every_tier_row(tmp_path: Path) -> None:
    """``bench/run --tiers-only --runs 1``: every cache-tier row (over gRPC and over NBD,
    cold and warm, the direct and local reads, the fresh-memory write) has its one result,
    and the targets it feeds have ratios. About 10 s: a 512 MiB image, four servers and a
    load generator."""
    out = subprocess.run(
        _tiers_only(tmp_path, runs=1),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "result.json").read_text())
    rows = {row["target"]: row["runs"] for row in result["raw"]}
    assert set(rows) == {
        "origin direct",
        "[ram] local",
        "tier cold",
        "tier warm",
        "tier cold, NBD between tiers",
        "tier warm, NBD between tiers",
        "256 MiB into a new file, right before each cold read",
    }
    for target, runs in rows.items():
        expected = 2 if target.startswith("256 MiB") else 1  # one per cold read
        assert len(runs) == expected, target
        assert all(run and "error" not in run and run["ops_s"] > 0 for run in runs), target
    assert "memory_stalls" in rows["tier cold"][0]
    # the NBD rows did read over NBD (the tier's nbd = "auto" found the origin's export):
    # the 256 cold reads of 1 MiB (and the 4 KiB read that connects first); the gRPC rows
    # (no nbd option) have no NBD path
    assert rows["tier cold, NBD between tiers"][0]["nbd_reads"] >= 256
    assert "nbd_reads" not in rows["tier cold"][0]
    targets = {t["target"]: t for t in result["report"]["targets"]}
    for name in (
        "cache tier cold read (gRPC between tiers, the default) / direct origin read",
        'cache tier cold read, nbd = "auto" (reads over the origin\'s NBD export) '
        "/ direct origin read",
    ):
        assert targets[name]["ratio"]["med"] > 0, name


def _process_tree(pid: int) -> set[int]:
    """The PIDs of ``pid``'s children, theirs, and so on (parents read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _mentioning(text: str) -> set[int]:
    """The PIDs of live processes whose command line contains ``text``."""
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and _running(int(entry.name)):
            found.add(int(entry.name))
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_stopped_bench_run_stops_everything_it_started(tmp_path: Path) -> None:
    """SIGTERM to a running ``bench/run`` ends it through its teardown: no server, load
    generator or other child outlives it, neither one running when the signal came nor one
    it was starting just then (found by its command line, which names the run's folder)."""
    work = tmp_path / "work"
    proc = subprocess.Popen(
        _tiers_only(tmp_path, runs=5),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 120
        while len(list(work.glob("ready-*.json"))) < 2:  # the origin and the [ram] server
            assert proc.poll() is None, "bench/run ended before its servers started"
            assert time.monotonic() < deadline, "bench/run did not start its servers"
            time.sleep(0.05)
        started = _process_tree(proc.pid)
        assert len(started) >= 3  # two servers and the load generator at least
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 30
    while left := {pid for pid in started if _running(pid)} | _mentioning(str(work)):
        assert time.monotonic() < deadline, f"still running after bench/run stopped: {left}"
        time.sleep(0.1)


def test_free_page_reporting_is_read_from_the_balloon_features(tmp_path: Path) -> None:
    """bench/common.py tells a VM that hands free memory to its host (a virtio balloon with
    feature bit 5) from one that does not; the runner waits out pending reports only there."""

    def device(name: str, device_id: str, features: str) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "device").write_text(device_id + "\n")
        (tmp_path / name / "features").write_text(features + "\n")

    def reporting() -> str:
        code = (
            "import sys, pathlib, common\n"
            "print(common.free_page_reporting(pathlib.Path(sys.argv[1])))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO / "bench",
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    device("virtio0", "0x0001", "0000010000")  # a network card with bit 5: not a balloon
    assert reporting() == "False"
    device("virtio1", "0x0005", "0110000000")  # a balloon without reporting
    assert reporting() == "False"
    device("virtio2", "0x0005", "0110010100")
    assert reporting() == "True"
