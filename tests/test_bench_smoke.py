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
