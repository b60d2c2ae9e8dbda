"""Profile the server's read path with py-spy: where a ``tierdisk serve`` process spends its
time under one workload of the load generator.

Starts ``tierdisk serve`` with one prefilled [ram] volume (or a [ram, raw] one with
``--stack ram-raw``), runs bench/loadgen.py against it, samples the server with
``py-spy record`` meanwhile, and prints the functions with the most samples (own time and
inclusive), grouped into gRPC's native code and the Python code that runs per call.
py-spy is not a dependency: ``.venv/bin/pip install py-spy``.

    python bench/profile_server.py --op randread --bs 4096 --qd 32 --seconds 6
    python bench/profile_server.py --op seqread --bs 1048576 --qd 4
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH, PYTHON, ServerProc, lever_env

_LINE = re.compile(r":\d+\)$")


def fold(path: Path, top: int) -> str:
    """Own and inclusive sample shares per frame of a py-spy raw (collapsed) profile."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n_text = line.rpartition(" ")
        if not stack:
            continue
        n = int(n_text)
        total += n
        frames = [_LINE.sub(")", f) for f in stack.split(";")]  # per function, not line
        for frame in set(frames):
            incl[frame] += n
        own[frames[-1]] += n
    if not total:
        return "no samples"
    out = [f"{total} samples", "", "own time:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    out += ["", "inclusive (frames in tierdisk, prometheus_client, grpc, asyncio):"]
    keep = ("service/", "prometheus_client", "grpc", "asyncio", "layers/")
    shown = [(f, n) for f, n in incl.most_common() if any(k in f for k in keep)]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in shown[:top]]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--op", default="randread")
    p.add_argument("--bs", type=int, default=4096)
    p.add_argument("--qd", type=int, default=32)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--stack", choices=("ram", "ram-raw"), default="ram")
    p.add_argument("--native", action="store_true", help="py-spy --native")
    p.add_argument("--raw-out", help="keep py-spy's raw (collapsed stacks) output here")
    args = p.parse_args()
    spy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
    if not os.path.exists(spy):
        print("py-spy is not installed: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        layers = '[[volumes.layers]]\nkind = "ram"\nsize = 268435456\n'
        if args.stack == "ram-raw":
            image = work / "image.raw"
            with open(image, "wb") as f:
                f.write(os.urandom(256 << 20))
            layers = (
                '[[volumes.layers]]\nkind = "ram"\n[[volumes.layers]]\nkind = "raw"\n'
                f'path = "{image}"\nread_only = true\n'
            )
        config = work / "profile.toml"
        config.write_text(f'[server]\ndata_dir = "{work}"\n[[volumes]]\nname = "v"\n{layers}')
        server = ServerProc.tierdisk(config, work, "profiled", env=lever_env()).wait_ready()
        try:
            load = [
                PYTHON,
                str(BENCH / "loadgen.py"),
                "--target",
                server.address,
                "--volume",
                "v",
                "--server-pid",
                str(server.pid),
            ]
            if args.stack == "ram":
                subprocess.run(
                    [
                        *load,
                        "--op",
                        "seqwrite",
                        "--bs",
                        str(1 << 20),
                        "--qd",
                        "4",
                        "--warmup",
                        "0",
                        "--duration",
                        "60",
                        "--max-ops",
                        "256",
                    ],
                    check=True,
                    capture_output=True,
                    env=lever_env(),
                )
            gen = subprocess.Popen(
                [
                    *load,
                    "--op",
                    args.op,
                    "--bs",
                    str(args.bs),
                    "--qd",
                    str(args.qd),
                    "--warmup",
                    "0.5",
                    "--duration",
                    str(args.seconds + 1.5),
                ],
                stdout=subprocess.PIPE,
                text=True,
                env=lever_env(),
            )
            raw = work / "profile.txt"
            cmd = [
                spy,
                "record",
                "-p",
                str(server.pid),
                "-d",
                str(int(args.seconds)),
                "-r",
                str(args.rate),
                "-f",
                "raw",
                "-o",
                str(raw),
            ]
            if args.native:
                cmd.append("--native")
            subprocess.run(["sleep", "0.7"], check=True)
            subprocess.run(cmd, check=True, capture_output=True)
            out, _ = gen.communicate(timeout=args.seconds + 60)
        finally:
            server.stop()
        result = json.loads(out)
        print(
            f"workload: {args.op} {args.bs} B QD{args.qd} on [{args.stack}]: "
            f"{result['ops_s']:.0f} ops/s while sampled, server CPU "
            f"{result['srv_cpu_us_op']} us/op"
        )
        print(fold(raw, args.top))
        if args.raw_out:
            shutil.copyfile(raw, args.raw_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
