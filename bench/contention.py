"""The poller lever under CPU contention: small reads with busy processes beside the server.

Two ``tierdisk serve`` processes, one prefilled ``[ram]`` volume each, one with ``[server]
grpc_poller_batch`` on (gRPC's poller thread in the batch scheduling class, README
"Scheduling") and one without, and ``--busy`` processes that spin on the CPU (each also
ends by itself, a minute after the rounds would have ended). The load generator
(``bench/loadgen.py``, the lever as its server has it) reads 4 KiB at random places at
``--qd`` from each server in turn, for ``--rounds`` alternating rounds, and the medians
are printed: reads/s, p50 and p99 latency, server CPU per read, and the per-round ratio
lever on / off::

    python bench/contention.py                 # 2 busy processes, QD 1, 5 rounds
    python bench/contention.py --busy 0        # the same without contention
    python bench/contention.py --qd 32

On 127.0.0.1 only; every round is bounded in time; every process started is stopped by its
PID, the busy ones too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH, PYTHON, ServerProc, lever_env, stop_pid, volume_toml

SPIN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


def measure(server: ServerProc, env: dict[str, str], qd: int, seconds: float) -> dict[str, Any]:
    """One round of 4 KiB random reads against ``server``; loadgen's JSON line."""
    cmd = [
        PYTHON,
        str(BENCH / "loadgen.py"),
        "--target",
        server.address,
        "--volume",
        "vm",
        "--op",
        "randread",
        "--bs",
        "4096",
        "--qd",
        str(qd),
        "--duration",
        str(seconds),
        "--warmup",
        "0.3",
        "--server-pid",
        str(server.pid),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60 + seconds)
    if out.returncode:
        raise RuntimeError(f"loadgen failed: {out.stderr.strip()[-500:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--busy", type=int, default=2, help="processes spinning on the CPU (2)")
    p.add_argument("--qd", type=int, default=1, help="reads in flight (1)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (5)")
    p.add_argument("--seconds", type=float, default=2.0, help="measured seconds a round (2)")
    args = p.parse_args()
    envs = {"lever off": lever_env(), "lever on": lever_env(poller=True)}
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in envs}
    busy_seconds = args.rounds * 2 * (args.seconds + 5) + 60
    servers: dict[str, ServerProc] = {}
    spinners: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="tierdisk-contention-") as tmp:
        work = Path(tmp)
        config = work / "ram.toml"
        server_table = f'[server]\ndata_dir = "{work / "data"}"\n'
        config.write_text(server_table + volume_toml("vm", [{"kind": "ram", "size": "256MiB"}]))
        try:
            for name, env in envs.items():
                servers[name] = ServerProc.tierdisk(config, work, name.replace(" ", "-"), env=env)
            for server in servers.values():
                server.wait_ready()
            # Busy processes bounded by themselves as well as stopped below.
            spin = SPIN.format(seconds=busy_seconds)
            spinners = [subprocess.Popen([PYTHON, "-c", spin]) for _ in range(args.busy)]
            for _ in range(args.rounds):
                for name, server in servers.items():
                    rows[name].append(measure(server, envs[name], args.qd, args.seconds))
        finally:
            for spinner in spinners:
                stop_pid(spinner)
            for server in servers.values():
                server.stop()
    print(f"4 KiB random reads, QD {args.qd}, {args.busy} busy processes, {args.rounds} rounds")
    print(f"{'':10} {'reads/s':>9} {'p50 us':>8} {'p99 us':>9} {'srv CPU us':>11}")
    for name, results in rows.items():

        def med(key: str, results: list[dict[str, Any]] = results) -> float:
            return statistics.median(float(r[key]) for r in results)

        print(
            f"{name:10} {med('ops_s'):9,.0f} {med('lat_p50_us'):8,.0f} "
            f"{med('lat_p99_us'):9,.0f} {med('srv_cpu_us_op'):11,.0f}"
        )
    ratios = [
        on["ops_s"] / off["ops_s"]
        for on, off in zip(rows["lever on"], rows["lever off"], strict=True)
    ]
    print(
        f"reads/s lever on / off: {statistics.median(ratios):.2f} "
        f"({min(ratios):.2f}-{max(ratios):.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
