"""tierdisk.client.localfile (client/localfile.py): local files and streams as the verbs that
move data use them, through the ``tierdisk`` command against a real server (a ``tierdisk
serve`` child process): output to a pipe or a FIFO whose reader stalls (``read``, ``export``,
``map``), input from a pipe whose writer stalls, a FIFO that nobody opens: each ended at once
by a stop signal (written, read or opened off the event loop's thread); a folder given as a
file, and a failed write to a file or stdout, named in one line; a failed copy to stdout
leaving no writer thread behind."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import os
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
from cli_runs import STOPS, TIERDISK, TIERDISK_SIGNALLED, MiB, one_line_error, tierdisk
from servers import ServerProcess, fragmented_server

from tierdisk.client.cli import main as cli_main

# -- stalled pipes and FIFOs -----------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("sig", "status", "words"), STOPS)
@pytest.mark.parametrize("verb", ["read", "export"])
def test_a_verb_writing_to_a_stalled_pipe_stops_on_a_signal(
    server: ServerProcess,
    exp_data: bytes,
    verb: str,
    sig: signal.Signals,
    status: int,
    words: str,
) -> None:
    """``export VOL - | ssh …`` with the reader stalled: a stop signal ends the verb at
    once, with its one line and status (stdout was written on the event loop's thread, so
    the signal waited until the pipe moved again, or closed); the line says how many bytes
    went out (the reader cannot tell a short stream from a whole one)."""
    args = (
        ["read", "exp", "0", str(len(exp_data) // 512)]
        if verb == "read"
        else ["export", "exp", "-"]
    )
    read_end, write_end = os.pipe()  # a pipe nobody reads: it takes 64 KiB, then stalls
    pipe_bytes = fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)
    try:
        returncode, err = _stopped_once_stalled(server.grpc, args, sig, read_end, stdout=write_end)
    finally:
        os.close(read_end)
    assert returncode == status, err
    # what the pipe took (it was never read), and what the whole would have been
    assert err.splitlines() == [
        f"tierdisk: {words}; {pipe_bytes} of {len(exp_data)} bytes went to stdout before"
    ]


def _stopped_once_stalled(
    address: str,
    args: list[str],
    sig: signal.Signals,
    reader: int,
    *,
    stdout: int | None = None,
) -> tuple[int, str]:
    """Run ``tierdisk ARGS`` against the server at ``address`` (its stdout the descriptor
    ``stdout``, closed here once handed over), whose output stalls: ``reader`` is the read
    end of the pipe or FIFO it writes, which nobody reads. Once that is full (the command
    waits on it: never a false pass, and no guess at how long a loaded machine takes to get
    there), send it ``sig``; its exit status and stderr. It must end within 10 s of the
    signal, not when the output moves again (never, here)."""
    env = {**os.environ, "TIERDISK_SERVER": address}
    try:
        proc = subprocess.Popen(
            [*TIERDISK_SIGNALLED, *args], stdout=stdout, stderr=subprocess.PIPE, env=env
        )
    finally:
        if stdout is not None:
            os.close(stdout)
    try:
        _wait_until_full(reader, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return proc.returncode, err.decode()


def _wait_until_full(reader: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Return once the pipe whose read end is ``reader`` holds all it can take (what
    ``proc`` wrote into it), and a moment more for ``proc`` to block on its next write;
    fail if ``proc`` ends first or ``timeout`` seconds pass."""
    capacity = fcntl.fcntl(reader, fcntl.F_GETPIPE_SZ)
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "the command ended before its output stalled"
        held = struct.unpack("i", fcntl.ioctl(reader, termios.FIONREAD, b"\0\0\0\0"))[0]
        if held >= capacity:
            break
        assert time.monotonic() < deadline, f"the pipe holds {held} of {capacity} bytes"
        time.sleep(0.02)
    time.sleep(0.2)


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("sig", "status", "words"), STOPS)
def test_a_read_into_a_stalled_fifo_stops_on_a_signal(
    server: ServerProcess,
    exp_data: bytes,
    tmp_path: Path,
    sig: signal.Signals,
    status: int,
    words: str,
) -> None:
    """``read … -o FIFO`` whose reader stalls: a stop signal ends it at once (it was
    written on the event loop's thread: the signal waited for the reader to go away, and
    the verb then said only "Broken pipe"), saying how much went there."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # opened, never read
    try:
        pipe_bytes = fcntl.fcntl(reader, fcntl.F_GETPIPE_SZ)
        args = ["read", "exp", "0", str(len(exp_data) // 512), "-o", str(fifo)]
        returncode, err = _stopped_once_stalled(server.grpc, args, sig, reader)
    finally:
        os.close(reader)
    assert returncode == status, err
    assert err.splitlines() == [
        f"tierdisk: {words}; {pipe_bytes} of {len(exp_data)} bytes went to file '{fifo}' before"
    ]


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("sig", "status", "words"), STOPS)
async def test_a_map_into_a_stalled_pipe_stops_on_a_signal(
    tmp_path: Path, sig: signal.Signals, status: int, words: str
) -> None:
    """``map`` (1.5 MB of lines here) into a pipe whose reader stalls: a stop signal ends it
    at once, as it ends ``export VOL -`` (its lines were written on the event loop's
    thread, so the signal waited until the pipe moved again)."""
    async with fragmented_server(tmp_path) as srv:
        read_end, write_end = os.pipe()  # nobody reads it: it takes 64 KiB, then stalls
        try:
            returncode, err = await asyncio.to_thread(
                _stopped_once_stalled,
                srv.grpc_address,
                ["map", "frag"],
                sig,
                read_end,
                stdout=write_end,
            )
        finally:
            os.close(read_end)
    assert returncode == status, err
    assert err.splitlines() == [f"tierdisk: {words}"]


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("sig", "status", "words"), STOPS)
@pytest.mark.parametrize("source", ["stdin", "fifo"])
def test_a_write_from_a_stalled_pipe_stops_on_a_signal(
    server: ServerProcess,
    tmp_path: Path,
    source: str,
    sig: signal.Signals,
    status: int,
    words: str,
) -> None:
    """``write`` from a pipe whose writer sent 1 MiB and then stalls (keeps it open, sends
    nothing): a stop signal ends it at once, saying the 1 MiB was written (a read blocked on
    the pipe held the exit, or the closing of the input, until the writer closed it)."""
    env = {**os.environ, "TIERDISK_SERVER": server.grpc}
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    read_end, write_end = os.pipe() if source == "stdin" else (-1, -1)
    args = ["write", "intr", "0"] + (["-i", str(fifo)] if source == "fifo" else [])
    proc = subprocess.Popen(
        [*TIERDISK_SIGNALLED, *args],
        stdin=read_end if source == "stdin" else subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    if source == "stdin":
        os.close(read_end)
    else:
        write_end = os.open(fifo, os.O_WRONLY)  # waits for the verb to open it
    try:
        os.write(write_end, os.urandom(MiB))  # one whole chunk, then nothing more
        time.sleep(1.5)  # the chunk is written, the next read waits (never a false pass)
        assert proc.poll() is None
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=10)  # not when the writer closes: never here
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(write_end)
    assert proc.returncode == status, err.decode()
    line = err.decode().splitlines()[-1]
    assert line.startswith(f"tierdisk: {words}"), line
    assert "the 1048576 bytes before were written from sector 0" in line, line


@pytest.mark.parametrize(("sig", "status", "words"), STOPS)
@pytest.mark.parametrize("verb", ["read", "export", "write", "import"])
def test_a_verb_opening_a_fifo_nobody_opens_stops_on_a_signal(
    server: ServerProcess,
    tmp_path: Path,
    verb: str,
    sig: signal.Signals,
    status: int,
    words: str,
) -> None:
    """``-o FIFO``, ``-i FIFO`` or IMAGE a FIFO whose other end nobody opens: the open
    blocks, and a stop signal still ends the verb at once, with its one line and status
    (opened on the event loop's thread, the open was retried after each signal and the
    verb ran on until SIGKILL or a second Ctrl-C)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    args = {
        "read": ["read", "exp", "0", "8", "-o", str(fifo)],
        "export": ["export", "exp", str(fifo)],
        "write": ["write", "exp", "0", "-i", str(fifo)],
        "import": ["import", "exp", str(fifo)],
    }[verb]
    env = {**os.environ, "TIERDISK_SERVER": server.grpc}
    proc = subprocess.Popen(
        [*TIERDISK_SIGNALLED, *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env
    )
    try:
        time.sleep(1.0)  # it waits in the open (never a false pass)
        assert proc.poll() is None
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == status, err.decode()
    assert err.decode().splitlines()[0].startswith(f"tierdisk: {words}"), err.decode()


# -- errors ----------------------------------------------------------------------------


def test_a_folder_given_as_input_or_output_is_named(server: ServerProcess, tmp_path: Path) -> None:
    folder = tmp_path / "adir"
    folder.mkdir()
    for args in (
        ("write", "rw", "0", "-i", str(folder)),
        ("import", "rw", str(folder)),
        ("read", "rw", "0", "1", "-o", str(folder)),
        ("export", "rw", str(folder)),
    ):
        one_line_error(tierdisk(server, *args, check=False), f"file {str(folder)!r}", "directory")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_write_errors_name_the_file_or_stdout(server: ServerProcess, tmp_path: Path) -> None:
    one_line_error(
        tierdisk(server, "read", "rw", "0", "1", "-o", "/dev/full", check=False),
        "file '/dev/full'",
        "No space left on device; 0 of 512 bytes went to file '/dev/full' before",
    )
    env = {**os.environ, "TIERDISK_SERVER": server.grpc}
    for args in (("read", "rw", "0", "1"), ("export", "ro", "-"), ("volumes",), ("info", "rw")):
        with open("/dev/full", "wb") as full:
            result = subprocess.run(
                [*TIERDISK, *args],
                stdout=full,
                stderr=subprocess.PIPE,
                env=env,
                timeout=60,
                cwd=tmp_path,
            )
        assert result.returncode == 1, args
        lines = result.stderr.decode().splitlines()
        said = "tierdisk: stdout: No space left on device"
        if args[0] in ("read", "export"):  # a copy out says how much went out: nothing
            said += f"; 0 of {512 if args[0] == 'read' else 1 << 20} bytes went to stdout before"
        assert lines == [said], (args, lines)


def test_a_failed_copy_to_stdout_leaves_no_writer_thread(
    server: ServerProcess, exp_data: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``read`` into a pipe whose reader goes away (a broken pipe: exit 1, quietly) ends its
    stdout writer thread too, as a copy that succeeds does: a process that runs verbs in
    turn (``main()`` called in-process) keeps no thread per failed copy."""
    monkeypatch.setenv("TIERDISK_NO_UVLOOP", "1")  # leave this process's loop policy alone

    def writers() -> int:
        return sum(t.name == "stdout-writer" and t.is_alive() for t in threading.enumerate())

    def read_a_little_and_go(fd: int) -> None:
        os.read(fd, 1000)
        os.close(fd)

    before = writers()
    for _ in range(3):
        r, w = os.pipe()
        reader = threading.Thread(target=read_a_little_and_go, args=(r,))
        reader.start()
        out = io.TextIOWrapper(io.FileIO(w, "wb"))
        monkeypatch.setattr(sys, "stdout", out)
        args = ["--server", server.grpc, "--no-progress", "read", "exp", "0", "16384"]
        assert cli_main(args) == 1
        reader.join(10)
        monkeypatch.undo()
        monkeypatch.setenv("TIERDISK_NO_UVLOOP", "1")
        with contextlib.suppress(OSError, ValueError):
            out.close()
    deadline = time.monotonic() + 10
    while writers() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert writers() == before
