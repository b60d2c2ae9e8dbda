"""The ``tierdisk`` command against a real server (a ``tierdisk serve`` child process):
import then export byte-identical with holes, read/write through files and pipes, every
verb's output, one-line errors, ``watch`` ended by Ctrl-C, and the progress bar on a tty."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import ServerProcess, write_config

MiB = 1 << 20
TIERDISK = [sys.executable, "-m", "tierdisk.client"]

VOLUMES = """
[[volumes]]
name = "disk"
  [[volumes.layers]]
  kind = "ram"
  size = "16MiB"

[[volumes]]
name = "rw"
  [[volumes.layers]]
  kind = "ram"
  size = "4MiB"

[[volumes]]
name = "ro"
read_only = true
  [[volumes.layers]]
  kind = "ram"
  size = "1MiB"

[[volumes]]
name = "grow"
  [[volumes.layers]]
  kind = "ram"
  size = "1MiB"

[[volumes]]
name = "watched"
  [[volumes.layers]]
  kind = "ram"
  size = "1MiB"
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("cli-server")
    with ServerProcess.start(tmp, write_config(tmp, VOLUMES)) as srv:
        yield srv


def tierdisk(
    server: ServerProcess, *args: str, stdin: bytes = b"", check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "TIERDISK_SERVER"}
    env["TIERDISK_SERVER"] = server.grpc
    result = subprocess.run(
        [*TIERDISK, *args], input=stdin, capture_output=True, timeout=120, env=env
    )
    if check:
        assert result.returncode == 0, result.stderr.decode()
        assert result.stderr == b""
    return result


def one_line_error(result: subprocess.CompletedProcess[bytes], *needles: str) -> str:
    assert result.returncode == 1
    err = result.stderr.decode()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tierdisk: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


def fs_supports_holes(folder: Path) -> bool:
    probe = folder / "hole-probe"
    with open(probe, "wb") as f:
        f.truncate(8 * MiB)
    supported = os.stat(probe).st_blocks * 512 < MiB
    probe.unlink()
    return supported


# -- listing and info ------------------------------------------------------------------


def test_volumes_lists_one_per_line_name_first(server: ServerProcess) -> None:
    lines = tierdisk(server, "volumes").stdout.decode().splitlines()
    assert sorted(line.split("\t")[0] for line in lines) == [
        "disk",
        "grow",
        "ro",
        "rw",
        "watched",
    ]
    ro = next(line for line in lines if line.startswith("ro\t")).split("\t")
    assert ro[1:4] == ["2048", "512", "ro"]


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
    }
    values = dict(line.split(": ", 1) for line in lines)
    assert values["sector_count"] == str(16 * MiB // 512)
    assert values["sector_size"] == "512"
    assert values["read_only"] == "false"
    assert values["unmap_behavior"].startswith("UNMAP_BEHAVIOR_")


# -- import / export -------------------------------------------------------------------


def test_import_then_export_is_byte_identical_with_holes(
    server: ServerProcess, tmp_path: Path
) -> None:
    image = tmp_path / "in.img"
    head, tail = os.urandom(MiB), os.urandom(MiB + 512)
    image.write_bytes(head + bytes(5 * MiB) + tail)  # 7 MiB + 512: zeros in the middle
    size = image.stat().st_size
    tierdisk(server, "import", "disk", str(image))

    # the volume keeps its size; everything past the image is unallocated
    info = dict(
        line.split(": ", 1)
        for line in tierdisk(server, "info", "disk").stdout.decode().split("\n")
        if line
    )
    assert info["sector_count"] == str(16 * MiB // 512)
    runs = [
        tuple(map(int, line.split("\t")))
        for line in tierdisk(server, "map", "disk").stdout.decode().splitlines()
    ]
    assert sum(count for _, count, _ in runs) == 16 * MiB // 512
    assert [r for r in runs if r[0] >= size // 512] == [(size // 512, (16 * MiB - size) // 512, -1)]

    out = tmp_path / "out.img"
    tierdisk(server, "export", "disk", str(out))
    exported = out.read_bytes()
    assert len(exported) == 16 * MiB  # sector_count x sector_size
    assert exported[:size] == image.read_bytes()
    assert exported[size:] == bytes(16 * MiB - size)
    if fs_supports_holes(tmp_path):
        # holes: the 5 MiB of zeros and the unallocated 9 MiB are not written
        assert out.stat().st_blocks * 512 <= 3 * MiB + 64 * 1024
    # a second export over the same file gives the same bytes
    tierdisk(server, "export", "disk", str(out))
    assert out.read_bytes() == exported


def test_import_refuses_partial_sectors_and_oversized_images(
    server: ServerProcess, tmp_path: Path
) -> None:
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    one_line_error(tierdisk(server, "import", "rw", str(odd), check=False), str(odd), "512")
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(8 * MiB)
    one_line_error(tierdisk(server, "import", "rw", str(big), check=False), str(big), "'rw'")


# -- read / write ----------------------------------------------------------------------


def test_write_and_read_through_files_and_pipes(server: ServerProcess, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 4096)  # more than one chunk
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    tierdisk(server, "write", "rw", "16", "-i", str(src))
    dst = tmp_path / "dst.bin"
    tierdisk(server, "read", "rw", "16", str(len(data) // 512), "-o", str(dst))
    assert dst.read_bytes() == data
    assert tierdisk(server, "read", "rw", "16", "8").stdout == data[:4096]

    tierdisk(server, "write", "rw", "0", stdin=b"\x42" * 1024)
    assert tierdisk(server, "read", "rw", "0", "2").stdout == b"\x42" * 1024
    assert tierdisk(server, "read", "rw", "0", "0").stdout == b""


def test_write_refuses_partial_sectors_before_writing(server: ServerProcess) -> None:
    before = tierdisk(server, "read", "rw", "100", "1").stdout
    one_line_error(tierdisk(server, "write", "rw", "100", stdin=b"z" * 700, check=False), "700")
    assert tierdisk(server, "read", "rw", "100", "1").stdout == before


# -- other verbs -----------------------------------------------------------------------


def test_inspect_prints_json(server: ServerProcess) -> None:
    tree = json.loads(tierdisk(server, "inspect", "disk").stdout)
    assert tree["name"] == "disk" and tree["layers"][0]["kind"] == "ram"
    layer = json.loads(tierdisk(server, "inspect", "disk", "layers/0").stdout)
    assert layer["index"] == 0


def test_resize_in_sectors_and_bytes(server: ServerProcess) -> None:
    out = tierdisk(server, "resize", "grow", "4096").stdout.decode()
    assert "sector_count: 4096" in out.splitlines()
    tierdisk(server, "resize", "grow", "3MiB")
    assert "sector_count: 6144" in tierdisk(server, "info", "grow").stdout.decode().splitlines()
    bad = tierdisk(server, "resize", "grow", "1000B", check=False)
    assert bad.returncode == 2 and "1000" in bad.stderr.decode()


def test_flush(server: ServerProcess) -> None:
    assert tierdisk(server, "flush", "disk").stdout == b""


def test_watch_prints_each_resize_and_ctrl_c_exits_0(server: ServerProcess) -> None:
    env = {**os.environ, "TIERDISK_SERVER": server.grpc}
    proc = subprocess.Popen(
        [*TIERDISK, "watch", "watched"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().decode()
        assert "sector_count=2048" in first and "generation=" in first
        tierdisk(server, "resize", "watched", "4096")
        second = proc.stdout.readline().decode()
        assert "sector_count=4096" in second
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert proc.stderr is not None and proc.stderr.read() == b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- errors ----------------------------------------------------------------------------


def test_errors_are_one_line_naming_the_volume_or_file(
    server: ServerProcess, tmp_path: Path
) -> None:
    one_line_error(tierdisk(server, "info", "x", check=False), "volume 'x'", "not found")
    one_line_error(
        tierdisk(server, "write", "ro", "0", stdin=bytes(512), check=False),
        "volume 'ro'",
        "read-only",
    )
    one_line_error(tierdisk(server, "read", "ro", "2047", "2", check=False), "volume 'ro'")
    one_line_error(tierdisk(server, "map", "nope", check=False), "volume 'nope'")
    missing = tmp_path / "missing.img"
    one_line_error(tierdisk(server, "import", "rw", str(missing), check=False), f"file '{missing}'")
    unwritable = tmp_path / "no-such-dir" / "out.img"
    one_line_error(
        tierdisk(server, "export", "rw", str(unwritable), check=False), f"file '{unwritable}'"
    )


# -- progress bar ----------------------------------------------------------------------


def test_progress_bar_only_on_a_terminal(server: ServerProcess, tmp_path: Path) -> None:
    image = tmp_path / "p.img"
    image.write_bytes(os.urandom(2 * MiB))
    # stderr a pipe: nothing
    assert tierdisk(server, "import", "rw", str(image)).stderr == b""
    # stderr a terminal: a bar that reaches 100%
    master, slave = pty.openpty()
    env = {**os.environ, "TIERDISK_SERVER": server.grpc, "COLUMNS": "120"}
    proc = subprocess.Popen(
        [*TIERDISK, "import", "rw", str(image)], stderr=slave, stdout=subprocess.PIPE, env=env
    )
    os.close(slave)
    chunks: list[bytes] = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 30)
            if not ready:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(30) == 0
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    shown = b"".join(chunks).decode(errors="replace")
    assert "import rw" in shown and "100%" in shown and "2.0 MiB / 2.0 MiB" in shown
