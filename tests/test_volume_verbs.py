"""tierdisk.client.volume_verbs (client/volume_verbs.py): the verbs that move no data, through
the ``tierdisk`` command against a real server (a ``tierdisk serve`` child process):
``volumes`` (one a line, name first; a volume not attached yet shown as not ready), ``info``
(every field, sector count first), ``inspect`` (JSON, keys sorted), ``resize`` (in sectors
or bytes; refusing to shrink without ``--shrink``; a size no volume can have a usage error),
``flush`` (``--verifier`` telling of writes lost since an earlier command's; a verifier that
is none refused), ``watch`` (each resize printed and a stop signal exit 0; ended by the
server, or a server that never answers: one line, exit 1) and ``map`` of a volume with more
runs than one reply carries."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from cli_runs import TIERDISK, MiB, one_line_error, tierdisk, watching
from servers import (
    ServerProcess,
    fragmented_extents,
    fragmented_server,
    free_port,
    toml_volume,
    write_config,
)

# -- listing and info ------------------------------------------------------------------


def test_volumes_lists_one_per_line_name_first(server: ServerProcess) -> None:
    lines = tierdisk(server, "volumes").stdout.decode().splitlines()
    assert sorted(line.split("\t")[0] for line in lines) == [
        "disk",
        "exp",
        "grow",
        "intr",
        "piped",
        "ro",
        "rw",
        "shrink",
        "sparse",
        "watched",
    ]
    ro = next(line for line in lines if line.startswith("ro\t")).split("\t")
    assert ro[1:4] == ["2048", "512", "ro"]


ORPHAN = """
[[volumes]]
name = "orphan"
  [[volumes.layers]]
  kind = "ram"
  [[volumes.layers]]
  kind = "remote"
  target = "127.0.0.1:{port}"
  volume = "base"
  timeout = 1

[[volumes]]
name = "local"
  [[volumes.layers]]
  kind = "ram"
  size = "1MiB"
"""


def test_volumes_shows_a_volume_not_attached_yet_as_not_ready(tmp_path: Path) -> None:
    """A volume whose remote tier is down is listed (name only, sector_size 0), not shown
    as an empty volume."""
    config = write_config(tmp_path, ORPHAN.format(port=free_port()))
    with ServerProcess.start(tmp_path, config) as srv:
        lines = tierdisk(srv, "volumes").stdout.decode().splitlines()
    assert lines == ["orphan\t(not ready)", "local\t2048\t512\trw\t1.0 MiB"]


def test_info_prints_every_field_sector_count_first(server: ServerProcess) -> None:
    lines = tierdisk(server, "info", "disk").stdout.decode().splitlines()
    keys = [line.split(": ", 1)[0] for line in lines]
    assert keys[:2] == ["sector_count", "sector_size"]
    assert set(keys) == {
        "name",
        "sector_size",
        "sector_count",
        "physical_sector_size",
        "read_only",
        "fua_respected",
        "disk_id",
        "unmap_behavior",
        "optimal_unmap_sectors",
        "volatile",
    }  # (and "problem", when the volume refuses all I/O until a restart: none here)
    values = dict(line.split(": ", 1) for line in lines)
    assert values["sector_count"] == str(16 * MiB // 512)
    assert values["sector_size"] == "512"
    assert values["read_only"] == "false"
    assert values["volatile"] == "true"  # a ram volume: a restart loses it
    assert values["unmap_behavior"].startswith("UNMAP_BEHAVIOR_")


# -- other verbs -----------------------------------------------------------------------


def test_inspect_prints_json(server: ServerProcess) -> None:
    tree = json.loads(tierdisk(server, "inspect", "disk").stdout)
    assert tree["name"] == "disk" and tree["layers"][0]["kind"] == "ram"
    layer = json.loads(tierdisk(server, "inspect", "disk", "layers/0").stdout)
    assert layer["index"] == 0


def test_inspect_prints_sorted_keys_with_stable_indentation(server: ServerProcess) -> None:
    """Outputs diff cleanly: keys sorted at every level, two-space indentation."""
    for args in (("disk",), ("disk", "layers/0"), ("rw",)):
        out = tierdisk(server, "inspect", *args).stdout.decode()
        assert out == json.dumps(json.loads(out), indent=2, sort_keys=True) + "\n"
        assert out.count("\n") > 3  # indented, one key a line


def test_resize_in_sectors_and_bytes(server: ServerProcess) -> None:
    out = tierdisk(server, "resize", "grow", "4096").stdout.decode()
    assert "sector_count: 4096" in out.splitlines()
    tierdisk(server, "resize", "grow", "3MiB")
    assert "sector_count: 6144" in tierdisk(server, "info", "grow").stdout.decode().splitlines()
    bad = tierdisk(server, "resize", "grow", "1000B", check=False)
    assert bad.returncode == 2 and "1000" in bad.stderr.decode()


def sector_count(server: ServerProcess, volume: str) -> int:
    info = dict(
        line.split(": ", 1)
        for line in tierdisk(server, "info", volume).stdout.decode().split("\n")
        if line
    )
    return int(info["sector_count"])


def test_resize_refuses_to_shrink_without_the_flag(server: ServerProcess) -> None:
    """As qemu-img: a smaller size is refused (exit 2, one line with both sizes) unless
    --shrink is given; the volume and its data are untouched."""
    data = os.urandom(512 * 48)
    tierdisk(server, "write", "shrink", "2000", stdin=data)  # the last 48 of 2048 sectors
    for size, asked in (("1000", "1000 sectors"), ("256KiB", "512 sectors")):
        line = one_line_error(
            tierdisk(server, "resize", "shrink", size, check=False),
            "volume 'shrink'",
            asked,
            "2048 sectors",
            "1.0 MiB",
            "--shrink",
            returncode=2,
        )
        assert "internal error" not in line
    assert sector_count(server, "shrink") == 2048
    assert tierdisk(server, "read", "shrink", "2000", "48").stdout == data
    # the same size, or larger, needs no flag
    tierdisk(server, "resize", "shrink", "1MiB")
    tierdisk(server, "resize", "shrink", "4096")
    out = tierdisk(server, "resize", "shrink", "1000", "--shrink").stdout.decode()
    assert "sector_count: 1000" in out.splitlines()
    assert sector_count(server, "shrink") == 1000
    # the help says so
    assert "--shrink" in tierdisk(server, "resize", "--help").stdout.decode()


@pytest.mark.parametrize(
    ("size", "needle"),
    [
        ("0", "size '0': a volume has a sector or more"),
        ("0B", "size '0B': a volume has a sector or more"),
        ("1000B", "is not a whole number of 512-byte sectors"),
        # 2**53 sectors of 512 bytes: within a request and the byte limit, not the sectors'
        ("4096PiB", "over the size limit of 9007199254740991 sectors"),
    ],
)
def test_a_size_no_volume_can_have_is_a_usage_error(
    server: ServerProcess, size: str, needle: str
) -> None:
    """Exit 2 with one line naming the volume, as every bad argument, whether the
    command or the server would have found it (the server's refusal was exit 1); the
    volume keeps its size."""
    before = sector_count(server, "grow")
    line = one_line_error(
        tierdisk(server, "resize", "grow", size, "--shrink", check=False), needle, returncode=2
    )
    assert line.count("volume 'grow'") == 1, line
    assert sector_count(server, "grow") == before


def test_flush(server: ServerProcess) -> None:
    assert tierdisk(server, "flush", "disk").stdout == b""


@pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["ctrl-c", "sigterm", "sighup"]
)
def test_watch_prints_each_resize_and_a_stop_signal_exits_0(
    server: ServerProcess, sig: signal.Signals
) -> None:
    """``watch`` prints the size now, then a line per change, until it is stopped: Ctrl-C,
    SIGTERM or SIGHUP end it with exit 0 and nothing on stderr."""
    with watching(server) as (proc, stdout, first):
        assert "sector_count=" in first and "generation=" in first
        size = int(first.split("sector_count=")[1].split()[0]) + 2048
        tierdisk(server, "resize", "watched", str(size))
        assert f"sector_count={size}" in stdout.readline().decode()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err.decode()
        assert err == b""


WATCHED_ONLY = """
[[volumes]]
name = "w"
  [[volumes.layers]]
  kind = "ram"
  size = "1MiB"
"""


@pytest.mark.parametrize("how", ["shutdown", "crash"])
def test_watch_ended_by_the_server_is_one_line_exit_1(tmp_path: Path, how: str) -> None:
    """The sizes printed stop being current: that is reported, not an exit 0. A server
    shutting down ends the stream cleanly (no status to show); a crash breaks it."""
    with ServerProcess.start(tmp_path, write_config(tmp_path, WATCHED_ONLY)) as srv:
        env = {**os.environ, "TIERDISK_SERVER": srv.grpc}
        proc = subprocess.Popen(
            [*TIERDISK, "watch", "w"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        try:
            assert proc.stdout is not None and proc.stderr is not None
            assert "sector_count=2048" in proc.stdout.readline().decode()
            if how == "shutdown":
                assert srv.terminate() == 0
            else:
                srv.kill()
            assert proc.wait(30) == 1
            err = proc.stderr.read().decode()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"tierdisk: volume 'w' on {srv.grpc}: the server ended the watch")
    if how == "crash":
        assert "unavailable" in lines[0]


def test_watch_of_a_server_that_never_answers_ends_at_the_timeout(tmp_path: Path) -> None:
    """``--timeout`` bounds the wait for the first event as it bounds any call: a server
    that takes the connection and never answers (SIGSTOPped) is one line and exit 1, not a
    wait without end (it was gRPC's 20 s connect timeout here, for ever behind a proxy whose
    upstream hung)."""
    with ServerProcess.start(tmp_path, write_config(tmp_path, WATCHED_ONLY)) as srv:
        env = {**os.environ, "TIERDISK_SERVER": srv.grpc}
        os.kill(srv.pid, signal.SIGSTOP)
        try:
            result = subprocess.run(
                [*TIERDISK, "--timeout", "1.5", "watch", "w"],
                capture_output=True,
                timeout=60,  # gRPC's own connect timeout (20 s) ended it before the fix
                env=env,
            )
        finally:
            os.kill(srv.pid, signal.SIGCONT)
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "no answer to the watch within 1.5 s" in err


async def test_map_of_a_fragmented_volume_prints_every_run(tmp_path: Path) -> None:
    """A volume with more runs than one GetAllocation reply carries (max_io 1 MiB): ``map``
    prints them all, as if one reply had (the client asks in windows)."""
    async with fragmented_server(tmp_path) as srv:
        env = {**os.environ, "TIERDISK_SERVER": srv.grpc_address}
        result = await asyncio.to_thread(
            subprocess.run, [*TIERDISK, "map", "frag"], capture_output=True, env=env, timeout=60
        )
    assert result.returncode == 0 and result.stderr == b"", result.stderr.decode()
    runs = [tuple(map(int, line.split("\t"))) for line in result.stdout.decode().splitlines()]
    assert runs == fragmented_extents()


# -- a flush later, for writes of an earlier command -----------------------------------


@pytest.mark.parametrize("restart", ["none", "clean", "crash"])
def test_a_later_flush_given_the_verifier_tells_of_writes_lost_between(
    tmp_path: Path, restart: str
) -> None:
    """``import --no-flush`` prints the write verifier its writes were acknowledged with;
    ``flush VOL --verifier V`` later fails (writes lost, exit 1) when the server restarted
    without a clean stop in between, as the import's own flush would have. A plain
    ``flush`` cannot tell (it wrote nothing itself): it answers 0. A clean restart keeps the
    verifier: the later flush vouches for the writes."""
    sparse = {"kind": "sparse", "path": "v", "size": "1MiB"}
    config = write_config(tmp_path, toml_volume("v", sparse))
    image = tmp_path / "d.bin"
    image.write_bytes(os.urandom(64 * 1024))
    server = ServerProcess.start(tmp_path, config)
    try:
        done = tierdisk(server, "--no-progress", "import", "--no-flush", "v", str(image))
        verifier = re.fullmatch(rb"write verifier (0x[0-9a-f]{16})\n", done.stdout)
        assert verifier is not None, done.stdout
        if restart != "none":
            if restart == "crash":
                server.kill()
            else:
                assert server.terminate() == 0
            server = ServerProcess.start(tmp_path, config)
        assert tierdisk(server, "flush", "v").returncode == 0  # nothing of its own to vouch for
        later = tierdisk(server, "flush", "v", "--verifier", verifier[1].decode(), check=False)
        if restart == "crash":
            one_line_error(later, "writes lost", verifier[1].decode())
        else:
            assert later.returncode == 0, later.stderr.decode()
    finally:
        server.kill()


@pytest.mark.parametrize("given", ["12", "0x", "0x0", "0xfffffffffffffffff", "0xg1"])
def test_a_flush_verifier_that_is_no_verifier_is_refused(server: ServerProcess, given: str) -> None:
    """A bad argument: argparse's usage line and the error naming it, exit 2."""
    bad = tierdisk(server, "flush", "rw", "--verifier", given, check=False)
    assert bad.returncode == 2
    assert "argument --verifier: not a write verifier" in bad.stderr.decode()
    assert repr(given) in bad.stderr.decode()
