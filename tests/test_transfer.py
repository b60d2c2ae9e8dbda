"""tierdisk.client.transfer (client/transfer.py): the verbs that move data, through the
``tierdisk`` command against a real server (a ``tierdisk serve`` child process): an import
then an export byte-identical with holes, ``-`` for stdin/stdout, write and read through
files and pipes; and ``read``, the verb that module holds: its ``-o FILE``, after a failed or
interrupted read, said to hold only what was read before; refused into the raw file a server
serves the volume from; refused to a terminal stdout without ``-o -``. ``write`` and
``import`` are in test_import_verbs.py, ``export`` in test_export_verb.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli_runs import (
    STOPS,
    TIERDISK,
    CuttingProxy,
    MiB,
    OnTerminal,
    fs_supports_holes,
    one_line_error,
    stopped_through_a_stall,
    tierdisk,
)
from servers import ServerProcess, toml_volume, write_config

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


# -- read ------------------------------------------------------------------------------


@pytest.mark.parametrize(("sig", "status", "words"), STOPS)
def test_an_interrupted_read_says_how_much_its_output_file_holds(
    server: ServerProcess, tmp_path: Path, sig: signal.Signals, status: int, words: str
) -> None:
    """``read -o FILE`` stopped mid-way (its server has gone silent): FILE, truncated at the
    start, holds what came before, and the one line says how much."""
    out = tmp_path / "out.img"
    out.write_bytes(b"precious" * 1000)
    argv = ("read", "exp", "0", "16384", "-o", str(out))
    rc, err = stopped_through_a_stall(server, sig, *argv, then=lambda: time.sleep(0.5))
    assert rc == status, err
    size = out.stat().st_size
    assert err.splitlines() == [
        f"tierdisk: {words}; file '{out}' holds only the {size} bytes written before"
    ]
    assert size < 16384 * 512


def test_a_failed_read_says_how_much_its_output_file_holds(
    server: ServerProcess, exp_data: bytes, tmp_path: Path
) -> None:
    """``read -o FILE`` over an existing FILE whose server goes away mid-way: FILE holds
    what was read before (it was truncated at the start; only ``export`` replaces a file
    whole), and the one line says how much, so nobody takes it for the old file or a
    whole one."""
    out = tmp_path / "out.img"
    out.write_bytes(b"precious" * 1000)
    with CuttingProxy(server.grpc, 2 * MiB) as proxy:
        result = tierdisk(
            server, "--server", proxy.address, "--retries", "0",
            "read", "exp", "0", str(len(exp_data) // 512), "-o", str(out), check=False,
        )  # fmt: skip
        assert proxy.cut.is_set()
    line = one_line_error(result)
    match = re.search(
        rf"; file '{re.escape(str(out))}' holds only the (\d+) bytes written before$", line
    )
    assert match, line
    assert out.read_bytes() == exp_data[: int(match.group(1))]
    if os.path.exists("/dev/full"):  # not a file: nothing said of what it holds
        result = tierdisk(server, "read", "exp", "0", "8", "-o", "/dev/full", check=False)
        line = one_line_error(result, "'/dev/full'", "No space left on device")
        assert "holds" not in line, line


@pytest.mark.parametrize("through", ["the-file", "a-symlink"])
def test_read_into_the_volumes_own_raw_image_is_refused(tmp_path: Path, through: str) -> None:
    """`read VOL SECTOR COUNT -o F`, F (or a symlink to it) the raw file the server serves
    VOL from, is refused while the server holds it, as export is: F would be truncated,
    the volume's data gone. F and the volume stay as they were."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    base = data_dir / "base.img"
    original = os.urandom(MiB)
    base.write_bytes(original)
    output = base
    if through == "a-symlink":
        output = tmp_path / "link.img"
        output.symlink_to(base)
    config = write_config(tmp_path, toml_volume("v", {"kind": "raw", "path": "base.img"}))
    with ServerProcess.start(tmp_path, config) as srv:
        result = tierdisk(srv, "read", "v", "0", "1", "-o", str(output), check=False)
        line = one_line_error(result, str(output), "locked by another process")
        assert "read to another file" in line, line
        assert base.read_bytes() == original
        assert tierdisk(srv, "read", "v", "0", str(MiB // 512)).stdout == original


# -- files, pipes and - ----------------------------------------------------------------


def test_dash_is_stdin_or_stdout(server: ServerProcess, tmp_path: Path) -> None:
    """`-` as IMAGE, `-o -` or `-i -`: stdin or stdout, never a file named `-`."""
    data = os.urandom(64 * 1024)
    tierdisk(server, "write", "rw", "8", "-i", "-", stdin=data, cwd=tmp_path)
    assert tierdisk(server, "read", "rw", "8", "128", "-o", "-", cwd=tmp_path).stdout == data
    image = os.urandom(MiB)
    tierdisk(server, "import", "rw", "-", stdin=image, cwd=tmp_path)
    assert tierdisk(server, "read", "rw", "0", "2048").stdout == image
    exported = tierdisk(server, "export", "rw", "-", cwd=tmp_path).stdout
    assert exported[:MiB] == image and len(exported) == 4 * MiB
    # from a file on stdin too (its size known up front), refused whole when too large
    big = tmp_path / "big.img"
    big.write_bytes(bytes(8 * MiB))
    with open(big, "rb") as f:
        env = {**os.environ, "TIERDISK_SERVER": server.grpc}
        result = subprocess.run(
            [*TIERDISK, "import", "rw", "-"], stdin=f, capture_output=True, env=env, cwd=tmp_path
        )
    one_line_error(result, "stdin", "larger than volume 'rw'")
    assert not (tmp_path / "-").exists()


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


@pytest.mark.timeout(60)
def test_read_to_a_terminal_stdout_needs_dash_o_dash(server: ServerProcess) -> None:
    """A ``read`` with no ``-o`` at a terminal is refused before it reads (binary sectors
    would garble the terminal): one line, exit 2, no data on the screen."""
    tierdisk(server, "write", "rw", "0", stdin=b"x" * 4096)
    with OnTerminal(
        server, "read", "rw", "0", "8", stdin=subprocess.DEVNULL, stdout_on_tty=True
    ) as run:
        assert run.finish() == 2
    assert "x" not in run.screen.replace("xxd", "")
    (line,) = run.screen.strip().splitlines()
    assert line.startswith("tierdisk: read rw: stdout is a terminal"), line
    assert "-o -" in line, line
