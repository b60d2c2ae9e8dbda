"""Helpers for the tests of the ``tierdisk`` command against real servers: test_cli.py (the
command as a whole) and the test files of the client modules behind its verbs
(test_volume_verbs.py, test_transfer.py, test_import_verbs.py, test_export_verb.py,
test_localfile.py, test_copy_report.py).

* :func:`tierdisk`: the command (:data:`TIERDISK`) as a child process against a
  :class:`~servers.ServerProcess`, and :func:`one_line_error`, the check of a failure's one
  line on stderr. :data:`VOLUMES`: the volumes of the server the ``server`` fixture starts
  (conftest.py), one per test module.
* Stop signals: :data:`TIERDISK_SIGNALLED` (the command taking SIGINT, SIGTERM and SIGHUP
  as they come), :data:`STOPS` (each signal with its exit status and words),
  :func:`watching` (``tierdisk watch`` running).
* A server that goes away or silent mid-transfer: :class:`CuttingProxy`,
  :func:`stopped_through_a_stall`.
* :class:`OnTerminal`: the command with stderr (and stdout, or stdin: :data:`TTY`) on a real
  pseudo-terminal, as a user at a terminal runs it.
* :func:`fs_supports_holes`: whether a folder's filesystem keeps holes.

Sizes are in bytes (:data:`MiB`); timeouts in seconds.
"""

from __future__ import annotations

import contextlib
import os
import pty
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest
from servers import ServerProcess, ram, toml_volume

__all__ = [
    "SIGNALS_AS_THEY_COME",
    "STOPS",
    "TIERDISK",
    "TIERDISK_SIGNALLED",
    "TTY",
    "VOLUMES",
    "CuttingProxy",
    "MiB",
    "OnTerminal",
    "fs_supports_holes",
    "one_line_error",
    "stopped_through_a_stall",
    "tierdisk",
    "watching",
]


MiB = 1 << 20


TIERDISK = [sys.executable, "-m", "tierdisk.client"]


SIGNALS_AS_THEY_COME = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "[signal.signal(s, signal.SIG_DFL) for s in (signal.SIGTERM, signal.SIGHUP)]\n"
)
"""Python that sets SIGINT, SIGTERM and SIGHUP to Python's own handling, whatever the test
runner inherited: the CLI does not take a signal its parent ignores (as a shell does SIGINT
for ``cmd &``, and ``nohup`` SIGHUP)."""


TIERDISK_SIGNALLED = [
    sys.executable,
    "-c",
    SIGNALS_AS_THEY_COME + "from tierdisk.client.cli import main; sys.exit(main())",
]
"""``TIERDISK`` for the tests that press Ctrl-C (send SIGINT), or send SIGTERM or SIGHUP
(:data:`SIGNALS_AS_THEY_COME` first)."""


STOPS = [
    pytest.param(signal.SIGINT, 130, "interrupted", id="ctrl-c"),
    pytest.param(signal.SIGTERM, 128 + signal.SIGTERM, "interrupted by SIGTERM", id="sigterm"),
    pytest.param(signal.SIGHUP, 128 + signal.SIGHUP, "interrupted by SIGHUP", id="sighup"),
]
"""The signals that stop a verb, each with the exit status and the words that start its
one line."""


VOLUMES = "\n".join(
    (
        toml_volume("disk", ram("16MiB")),
        toml_volume("rw", ram("4MiB")),
        toml_volume("ro", ram("1MiB"), read_only=True),
        toml_volume("grow", ram("1MiB")),
        toml_volume("watched", ram("1MiB")),
        toml_volume("shrink", ram("1MiB")),
        toml_volume("exp", ram("8MiB")),
        toml_volume("intr", ram("64MiB")),
        toml_volume("sparse", {"kind": "sparse", "path": "sparse.img", "size": "16MiB"}),
        toml_volume("piped", ram("4MiB")),
    )
)


def tierdisk(
    server: ServerProcess,
    *args: str,
    stdin: bytes = b"",
    check: bool = True,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "TIERDISK_SERVER"}
    env["TIERDISK_SERVER"] = server.grpc
    result = subprocess.run(
        [*TIERDISK, *args], input=stdin, capture_output=True, timeout=120, env=env, cwd=cwd
    )
    if check:
        assert result.returncode == 0, result.stderr.decode()
        assert result.stderr == b""
    return result


def one_line_error(
    result: subprocess.CompletedProcess[bytes], *needles: str, returncode: int = 1
) -> str:
    assert result.returncode == returncode, result.stderr.decode()
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


class CuttingProxy:
    """A TCP proxy in front of the server that, once ``limit`` bytes have come back from
    it, drops every connection and stops listening: to the client, the server went away
    mid-transfer, at a point the test controls. With ``stall``, it holds the connections
    open instead and passes nothing more until it is closed: the transfer hangs there."""

    def __init__(self, target: str, limit: int, *, stall: bool = False) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._limit = limit
        self._stall = stall  # at the limit, hold the connections open, silent, till the end
        self._released = threading.Event()
        self._passed = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.cut = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self.cut.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            upstream = socket.create_connection(self._target)
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst, counted in ((client, upstream, False), (upstream, client, True)):
                thread = threading.Thread(target=self._pump, args=(src, dst, counted), daemon=True)
                thread.start()
                self._threads.append(thread)
        self._listener.close()

    def _pump(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if counted:
                    with self._lock:
                        self._passed += len(data)
                        over = self._passed >= self._limit
                    if over:
                        if self._stall:
                            self.cut.set()
                            self._released.wait(60)
                        self._drop()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def _drop(self) -> None:
        self.cut.set()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> CuttingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self._released.set()
        self._drop()
        for thread in self._threads:
            thread.join(5)
        for sock in self._sockets:
            sock.close()


def stopped_through_a_stall(
    server: ServerProcess, sig: signal.Signals, *argv: str, then: Callable[[], object]
) -> tuple[int, str]:
    """``tierdisk --server PROXY ARGV`` whose server goes silent after 2 MiB have come back
    (the proxy holds the connection open): then ``then()``, then ``sig``; the exit status
    and stderr."""
    env = {**os.environ, "TIERDISK_SERVER": server.grpc}
    with CuttingProxy(server.grpc, 2 * MiB, stall=True) as proxy:
        proc = subprocess.Popen(
            [*TIERDISK_SIGNALLED, "--server", proxy.address, *argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            assert proxy.cut.wait(60)  # 2 MiB of the volume have come back: mid-way
            then()
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    return proc.returncode, err.decode()


@contextlib.contextmanager
def watching(
    server: ServerProcess,
) -> Iterator[tuple[subprocess.Popen[bytes], IO[bytes], str]]:
    """``tierdisk watch watched`` running (signals reach it as they come): the process, its
    stdout, and the first line it printed (the size now); killed at the end if still up."""
    env = {**os.environ, "TIERDISK_SERVER": server.grpc}
    proc = subprocess.Popen(
        [*TIERDISK_SIGNALLED, "watch", "watched"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        yield proc, proc.stdout, proc.stdout.readline().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class OnTerminal:
    """``tierdisk ARGS`` with stderr on a real pseudo-terminal (stdout too, with
    ``stdout_on_tty``), as a user at a terminal runs it. Threads collect what reaches the
    terminal (:attr:`screen`) and what a piped stdout carries (:attr:`stdout`).
    ``$COLUMNS`` is ``columns_env`` (``None``: unset)."""

    def __init__(
        self,
        server: ServerProcess,
        *args: str,
        stdin: int = subprocess.PIPE,
        stdout_on_tty: bool = False,
        tty_setup: Callable[[int], None] | None = None,
        columns_env: str | None = "120",
    ) -> None:
        self._master, slave = pty.openpty()
        if tty_setup is not None:
            tty_setup(slave)
        env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
        env["TIERDISK_SERVER"] = server.grpc
        if columns_env is not None:  # None: unset, as a shell leaves it; the terminal's size
            env["COLUMNS"] = columns_env
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
