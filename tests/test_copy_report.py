"""tierdisk.client.copy_report (client/copy_report.py): how a copy reports on itself, through
the ``tierdisk`` command against a real server (a ``tierdisk serve`` child process, or an
in-process server with a layer double): the progress bar on a real pseudo-terminal, only on a
terminal (for import; for read to a pipe, cut to a narrow terminal's width; none when the
data is on the terminal), for write from a pipe (bytes so far, no total) or a file (with its
total); and the line that ends a failed, refused or interrupted write or import, saying what
was written. The bar itself is in test_progress.py."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import signal
import struct
import subprocess
import termios
import threading
from pathlib import Path

import pytest
from cli_runs import (
    STOPS,
    TIERDISK,
    TIERDISK_SIGNALLED,
    TTY,
    CuttingProxy,
    MiB,
    OnTerminal,
    one_line_error,
    tierdisk,
)
from servers import ServerProcess, ram, running_server, toml_volume
from stacks import MapLayer

from tierdisk.service.errors import NoSpace, StorageError
from tierdisk.service.volume import LayerEntry, Volume

# -- progress bar ----------------------------------------------------------------------


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


@pytest.mark.timeout(90)
def test_the_bar_fits_a_narrow_terminal_on_stderr(server: ServerProcess, tmp_path: Path) -> None:
    """`tierdisk read … | gzip` on a 40-column terminal: the bar is sized to stderr, where
    it is drawn (stdout is the pipe), so no redraw wraps into a new line."""
    data = os.urandom(3 * MiB)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    tierdisk(server, "write", "rw", "0", "-i", str(src))

    def forty_columns(fd: int) -> None:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 40, 0, 0))

    args = ("read", "rw", "0", str(len(data) // 512))
    with OnTerminal(
        server, *args, stdin=subprocess.DEVNULL, tty_setup=forty_columns, columns_env=None
    ) as run:
        assert run.finish() == 0
    assert run.stdout == data
    redraws = run.screen.removesuffix("\r\n").split("\r")[1:]
    assert redraws and all(len(line) <= 39 for line in redraws), redraws
    assert "\n" not in run.screen.removesuffix("\r\n")
    assert last_line(run.screen).startswith("read rw [################] 100% 3.0 MiB")


@pytest.mark.timeout(60)
def test_read_to_a_terminal_stdout_shows_only_the_data(server: ServerProcess) -> None:
    """``-o -`` at a terminal: stdout and stderr the same terminal, the bar would be redrawn
    through the data, so there is none; the terminal shows exactly the bytes read. A read
    of no sectors writes nothing, so it needs no ``-o -``."""
    tierdisk(server, "write", "rw", "0", stdin=b"x" * 4096)
    with OnTerminal(
        server, "read", "rw", "0", "8", "-o", "-", stdin=subprocess.DEVNULL, stdout_on_tty=True
    ) as run:
        assert run.finish() == 0
    assert run.screen == "x" * 4096
    with OnTerminal(
        server, "read", "rw", "0", "0", stdin=subprocess.DEVNULL, stdout_on_tty=True
    ) as run:
        assert run.finish() == 0
    assert run.screen == ""


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


# -- what was written ------------------------------------------------------------------


class FullFrom(MapLayer):
    """A disk (every sector present, reading ``\\xa5``) whose writes reaching sector
    ``limit`` or past fail with ``error``: a layer whose storage filled up there (``NoSpace``:
    the request changed nothing, DESIGN.md §2), or failed there (``StorageError``: it may
    have written part of the request)."""

    def __init__(self, sectors: int, limit: int, error: type[Exception]) -> None:
        super().__init__(sectors, full=lambda _: b"\xa5" * 512)
        self.limit = limit
        self.error = error

    async def write(self, data: memoryview, sector: int, fua: bool) -> None:
        if sector + len(data) // 512 > self.limit:
            raise self.error(f"map layer: failed at sector {self.limit}")
        await super().write(data, sector, fua)


@pytest.mark.parametrize("how", ["write -i", "import", "write < pipe"])
@pytest.mark.parametrize("error", [NoSpace, StorageError], ids=["no-space", "storage-error"])
async def test_a_failed_write_or_import_says_what_was_written(
    tmp_path: Path, how: str, error: type[Exception]
) -> None:
    """4 MiB in 1 MiB requests, four in flight, onto a volume whose writes past its first
    MiB fail: the first MiB is written, and the message says so, from a file, an image or
    a pipe alike. Requests past it failed; where the failure may have left part of one
    written (not "no space", which changes nothing), it says those sectors may have been."""
    async with running_server(tmp_path / "srv", toml_volume("full", ram("4MiB"))) as srv:
        replaced = srv.registry.get("full")
        srv.registry.set_ready(await Volume.open("full", [LayerEntry(FullFrom(8192, 2048, error))]))
        await replaced.close()
        data = os.urandom(4 * MiB)
        src = tmp_path / "src.bin"
        src.write_bytes(data)
        env = {**os.environ, "TIERDISK_SERVER": srv.grpc_address}
        args = {
            "write -i": ["write", "full", "0", "-i", str(src)],
            "import": ["import", "full", str(src)],
            "write < pipe": ["write", "full", "0"],
        }[how]

        def cli(*argv: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                [*TIERDISK, *argv], input=stdin, capture_output=True, env=env, timeout=60
            )

        stdin = data if how == "write < pipe" else b""
        result = await asyncio.to_thread(cli, *args, stdin=stdin)
        got = (await asyncio.to_thread(cli, "read", "full", "0", "8192")).stdout
    line = one_line_error(result, "volume 'full'", "failed at sector 2048")
    written = "; the 1048576 bytes before were written from sector 0"
    if error is NoSpace:
        assert line.endswith(written), line
    elif how == "write < pipe":  # read as they are written: later chunks may not be sent
        assert re.search(written + r"; sectors 2048\.\.(4096|6144|8192) may have been "
                         r"written in part$", line), line  # fmt: skip
    else:
        assert line.endswith(written + "; sectors 2048..8192 may have been written in part"), line
    assert got[:MiB] == data[:MiB]
    assert got[MiB:] == b"\xa5" * (3 * MiB)


def test_a_write_refused_outright_says_nothing_was_written(
    server: ServerProcess, tmp_path: Path
) -> None:
    src = tmp_path / "one.bin"
    src.write_bytes(bytes(512))
    for args, stdin in ((("-i", str(src)), b""), ((), bytes(512))):
        result = tierdisk(server, "write", "ro", "0", *args, stdin=stdin, check=False)
        line = one_line_error(result, "volume 'ro'", "read-only")
        assert line.endswith("; nothing was written"), line


@pytest.mark.parametrize(("sig", "status", "words"), STOPS[:2])
@pytest.mark.parametrize("source", ["file", "pipe"])
def test_write_interrupted_says_what_was_written(
    server: ServerProcess,
    tmp_path: Path,
    source: str,
    sig: signal.Signals,
    status: int,
    words: str,
) -> None:
    """Ctrl-C mid-write: exit 130 and one line, ``interrupted; `` and what was written; the
    volume holds the data that far, and nothing past what may have been written in part.
    SIGTERM alike: exit 143, ``interrupted by SIGTERM; `` and what was written."""
    size = 64 * MiB
    zeros, data = tmp_path / "zeros.bin", tmp_path / "data.bin"
    zeros.write_bytes(bytes(size))
    data.write_bytes(os.urandom(size))
    tierdisk(server, "write", "intr", "0", "-i", str(zeros))
    # ~65 bytes come back per 1 MiB write: the proxy stalls some 20 writes in
    with CuttingProxy(server.grpc, 1500, stall=True) as proxy:
        args = ["write", "intr", "0"] + (["-i", str(data)] if source == "file" else [])
        proc = subprocess.Popen(
            [*TIERDISK_SIGNALLED, "--server", proxy.address, *args],
            stdin=subprocess.PIPE if source == "pipe" else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

        def feed() -> None:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError), open(data, "rb") as f:
                while chunk := f.read(MiB):
                    proc.stdin.write(chunk)
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()

        feeder = threading.Thread(target=feed, daemon=True)
        if source == "pipe":
            feeder.start()
        try:
            assert proxy.cut.wait(60)
            proc.send_signal(sig)
            assert proc.stderr is not None
            err = proc.stderr.read()
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        if source == "pipe":
            feeder.join(10)
    assert proc.returncode == status, err.decode()
    line = one_line_error(
        subprocess.CompletedProcess(proc.args, status, b"", err), returncode=status
    )
    found = re.fullmatch(
        f"tierdisk: {words}; "
        r"(?:nothing was written|nothing was written for sure"
        r"|the (\d+) bytes before were written from sector 0)"
        r"(?:; sectors (\d+)\.\.(\d+) may have been written in part)?",
        line,
    )
    assert found, line
    prefix = int(found[1] or 0)
    reach = int(found[3]) * 512 if found[3] else prefix
    assert prefix > 0  # some 20 writes were answered before the stall
    volume = tierdisk(server, "read", "intr", "0", str(size // 512)).stdout
    assert volume[:prefix] == data.read_bytes()[:prefix]
    assert volume[reach:] == bytes(size - reach)
