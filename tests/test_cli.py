"""The ``tierdisk`` command against a real server (a ``tierdisk serve`` child process):
import then export byte-identical with holes, read/write through files and pipes, every
verb's output, one-line errors, ``watch`` ended by Ctrl-C, and the progress bar on a real
pseudo-terminal: for import, for read to a pipe (none when stdout is the terminal), for write
from a pipe (bytes so far, no total) or a file (with its total)."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import termios
import threading
from collections.abc import Callable, Iterator
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


class OnTerminal:
    """``tierdisk ARGS`` with stderr on a real pseudo-terminal (stdout too, with
    ``stdout_on_tty``), as a user at a terminal runs it. Threads collect what reaches the
    terminal (:attr:`screen`) and what a piped stdout carries (:attr:`stdout`)."""

    def __init__(
        self,
        server: ServerProcess,
        *args: str,
        stdin: int = subprocess.PIPE,
        stdout_on_tty: bool = False,
        tty_setup: Callable[[int], None] | None = None,
    ) -> None:
        self._master, slave = pty.openpty()
        if tty_setup is not None:
            tty_setup(slave)
        env = {**os.environ, "TIERDISK_SERVER": server.grpc, "COLUMNS": "120"}
        try:
            self.proc = subprocess.Popen(
                [*TIERDISK, *args],
                stdin=slave if stdin == TTY else stdin,
                stdout=slave if stdout_on_tty else subprocess.PIPE,
                stderr=slave,
                env=env,
            )
        finally:
            os.close(slave)
        self._screen = bytearray()
        self._stdout = bytearray()
        self._closed = False
        self._changed = threading.Condition()
        self._threads = [threading.Thread(target=self._collect_screen, daemon=True)]
        if self.proc.stdout is not None:
            self._threads.append(threading.Thread(target=self._collect_stdout, daemon=True))
        for thread in self._threads:
            thread.start()

    def _collect_screen(self) -> None:
        while True:
            try:
                chunk = os.read(self._master, 1 << 16)
            except OSError:  # EIO: every holder of the terminal has closed it
                chunk = b""
            with self._changed:
                if not chunk:
                    self._closed = True
                else:
                    self._screen += chunk
                self._changed.notify_all()
            if not chunk:
                return

    def _collect_stdout(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()  # raw reads: the buffered object is never read
        while chunk := os.read(fd, 1 << 16):
            self._stdout += chunk

    def type(self, data: bytes) -> None:
        """Input at the terminal (``stdin=TTY``)."""
        os.write(self._master, data)

    @property
    def screen(self) -> str:
        with self._changed:
            return bytes(self._screen).decode(errors="replace")

    @property
    def stdout(self) -> bytes:
        return bytes(self._stdout)

    def wait_for(self, text: str, timeout: float = 30) -> str:
        """Wait until ``text`` has reached the terminal (or it was closed): the screen."""
        with self._changed:
            self._changed.wait_for(lambda: text.encode() in self._screen or self._closed, timeout)
        return self.screen

    def finish(self, timeout: float = 30) -> int:
        """End stdin (if a pipe), wait for the exit and for everything it wrote."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        returncode = self.proc.wait(timeout)
        for thread in self._threads:
            thread.join(timeout)
            assert not thread.is_alive()
        return returncode

    def __enter__(self) -> OnTerminal:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for thread in self._threads:
            thread.join(5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        os.close(self._master)


TTY = -100
"""``OnTerminal(stdin=TTY)``: stdin is the terminal too."""


def last_line(screen: str) -> str:
    """What the terminal shows last: the final redraw of the last line."""
    lines = screen.replace("\r\n", "\n").rstrip("\n").split("\n")
    return lines[-1].split("\r")[-1].rstrip()


def test_progress_bar_only_on_a_terminal(server: ServerProcess, tmp_path: Path) -> None:
    image = tmp_path / "p.img"
    image.write_bytes(os.urandom(2 * MiB))
    # stderr a pipe: nothing
    assert tierdisk(server, "import", "rw", str(image)).stderr == b""
    # stderr a terminal: a bar that reaches 100%
    with OnTerminal(server, "import", "rw", str(image), stdin=subprocess.DEVNULL) as run:
        assert run.finish() == 0
    shown = last_line(run.screen)
    assert "import rw" in shown and "100%" in shown and "2.0 MiB / 2.0 MiB" in shown
    assert run.screen.endswith("\r\n")  # the line is ended: a later message starts clean


@pytest.mark.timeout(90)
def test_read_to_a_pipe_shows_the_bar_on_a_terminal_stderr(
    server: ServerProcess, tmp_path: Path
) -> None:
    """`tierdisk read vm1 0 N | gzip > img.gz` at a terminal: the bar on stderr, the data
    on stdout untouched."""
    data = os.urandom(3 * MiB)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    tierdisk(server, "write", "rw", "0", "-i", str(src))
    count = str(len(data) // 512)

    with OnTerminal(server, "read", "rw", "0", count, stdin=subprocess.DEVNULL) as run:
        assert run.finish() == 0
    assert run.stdout == data
    shown = last_line(run.screen)
    assert shown.startswith("read rw [################] 100% 3.0 MiB / 3.0 MiB "), shown
    assert shown.endswith("ETA 0:00")

    # stderr a pipe: no bar, the same bytes
    piped = tierdisk(server, "read", "rw", "0", count)
    assert piped.stderr == b"" and piped.stdout == data
    # --no-progress: nothing on the terminal either
    args = ("--no-progress", "read", "rw", "0", count)
    with OnTerminal(server, *args, stdin=subprocess.DEVNULL) as run:
        assert run.finish() == 0
    assert run.stdout == data and run.screen == ""


@pytest.mark.timeout(60)
def test_read_to_a_terminal_stdout_shows_only_the_data(server: ServerProcess) -> None:
    """stdout and stderr the same terminal: the bar would be redrawn through the data, so
    there is none; the terminal shows exactly the bytes read."""
    tierdisk(server, "write", "rw", "0", stdin=b"x" * 4096)
    with OnTerminal(
        server, "read", "rw", "0", "8", stdin=subprocess.DEVNULL, stdout_on_tty=True
    ) as run:
        assert run.finish() == 0
    assert run.screen == "x" * 4096


@pytest.mark.timeout(90)
def test_write_from_a_pipe_shows_bytes_written_as_they_arrive(server: ServerProcess) -> None:
    """`cat img | tierdisk write vm1 0` at a terminal: no total to show, so the bytes
    written so far and the rate, updated while the pipe is still open."""
    data = os.urandom(3 * MiB)
    with OnTerminal(server, "write", "rw", "0") as run:
        assert run.proc.stdin is not None
        run.proc.stdin.write(data[: 2 * MiB])
        run.proc.stdin.flush()
        midway = run.wait_for("B/s")
        # the pipe is open, yet the user already sees bytes written
        assert run.proc.poll() is None
        assert "write rw 1.0 MiB " in midway or "write rw 2.0 MiB " in midway, midway
        run.proc.stdin.write(data[2 * MiB :])
        assert run.finish() == 0
    shown = last_line(run.screen)
    assert re.fullmatch(r"write rw 3\.0 MiB [\d.]+ [KMG]?i?B/s elapsed \d+:\d\d", shown), shown
    assert "%" not in run.screen and "ETA" not in run.screen
    assert run.stdout == b""
    assert tierdisk(server, "read", "rw", "0", str(len(data) // 512)).stdout == data

    # stderr a pipe: nothing on it, the data written all the same
    again = os.urandom(3 * MiB)
    assert tierdisk(server, "write", "rw", "0", stdin=again).stderr == b""
    assert tierdisk(server, "read", "rw", "0", str(len(again) // 512)).stdout == again


@pytest.mark.timeout(60)
def test_write_from_a_file_on_stdin_shows_the_bar_with_its_total(
    server: ServerProcess, tmp_path: Path
) -> None:
    """`tierdisk write vm1 0 < img`: stdin's size is known, from where it stands."""
    data = os.urandom(2 * MiB + 4096)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    fd = os.open(src, os.O_RDONLY)
    try:
        os.lseek(fd, 4096, os.SEEK_SET)  # as after `{ head -c 4096 >/dev/null; tierdisk …; }`
        with OnTerminal(server, "write", "rw", "0", stdin=fd) as run:
            assert run.finish() == 0
        assert os.lseek(fd, 0, os.SEEK_CUR) == len(data)  # consumed, as a plain read would
    finally:
        os.close(fd)
    shown = last_line(run.screen)
    assert shown.startswith("write rw [################] 100% 2.0 MiB / 2.0 MiB "), shown
    rest = data[4096:]
    assert tierdisk(server, "read", "rw", "0", str(len(rest) // 512)).stdout == rest


@pytest.mark.timeout(60)
def test_write_from_a_terminal_stdin_shows_no_bar(server: ServerProcess) -> None:
    """Sectors typed at the terminal (echo off): no bar redrawn over the input."""

    def no_echo(fd: int) -> None:
        attrs = termios.tcgetattr(fd)
        attrs[3] &= ~termios.ECHO
        termios.tcsetattr(fd, termios.TCSANOW, attrs)

    with OnTerminal(server, "write", "rw", "0", stdin=TTY, tty_setup=no_echo) as run:
        run.type(b"y" * 511 + b"\n")
        run.type(b"\x04")  # Ctrl-D at the start of a line: end of input
        assert run.finish() == 0
    assert run.screen == ""
    assert tierdisk(server, "read", "rw", "0", "1").stdout == b"y" * 511 + b"\n"


def test_write_from_a_pipe_refuses_a_bad_chunk_after_writing_those_before(
    server: ServerProcess,
) -> None:
    """From a pipe the length is known only at its end: whole chunks before a partial
    sector, or before the end of the volume, are written, and the message says so."""
    head = os.urandom(MiB)
    untouched = tierdisk(server, "read", "rw", "2048", "2").stdout
    bad = tierdisk(server, "write", "rw", "0", stdin=head + b"z" * 700, check=False)
    one_line_error(bad, "stdin", f"{MiB + 700} bytes", f"the {MiB} bytes before were written")
    assert tierdisk(server, "read", "rw", "0", "2048").stdout == head
    assert tierdisk(server, "read", "rw", "2048", "2").stdout == untouched

    # rw is 4 MiB: from its last MiB, 2 MiB reach past the end
    last = 8192 - 2048
    tail = tierdisk(server, "read", "rw", str(last), "2048").stdout
    over = tierdisk(server, "write", "rw", str(last), stdin=os.urandom(2 * MiB), check=False)
    one_line_error(over, "volume 'rw'", "past the end", f"the {MiB} bytes before were written")
    assert tierdisk(server, "read", "rw", str(last), "2048").stdout != tail
