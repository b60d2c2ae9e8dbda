"""Smoke test of the benchmark's load generator (bench/loadgen.py): it runs for about a
second against a real ``tierdisk serve`` process and prints one valid JSON result. No timing
is asserted: benchmarks print figures, tests check that the tools work."""

from __future__ import annotations

import json
import subprocess
import sys
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
        assert server.terminate() == 0
    for result, op in ((written, "seqwrite"), (read, "randread")):
        assert result["op"] == op
        assert isinstance(result["ops"], int) and result["ops"] > 0
        assert isinstance(result["ops_s"], float) and result["ops_s"] > 0
        for key in ("mb_s", "lat_p50_us", "cli_cpu_us_op", "srv_cpu_us_op", "seconds"):
            assert key in result, key
    assert read["bs"] == 4096 and read["qd"] == 4


def test_bench_run_tiers_only_measures_every_tier_row(tmp_path: Path) -> None:
    """``bench/run --tiers-only --runs 1``: every cache-tier row (over gRPC and over NBD,
    cold and warm, the direct and local reads, the fresh-memory write) has its one result,
    and the targets it feeds have ratios. About 10 s: a 512 MiB image, four servers and a
    load generator."""
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "runner.py"),
            "--tiers-only",
            "--runs",
            "1",
            "--workdir",
            str(tmp_path / "work"),
            "--json",
            str(tmp_path / "result.json"),
        ],
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
    targets = {t["target"]: t for t in result["report"]["targets"]}
    for name in (
        "cache tier cold read / direct origin read, 256 MiB",
        "cache tier cold read, reads over NBD between tiers / direct origin read",
    ):
        assert targets[name]["ratio"]["med"] > 0, name
