"""tierdisk.client.progress (client/progress.py): the progress bar.

Its text with no total (``tierdisk write`` from a pipe): bytes done, rate and time so far,
never a percentage or an ETA; drawn only on a terminal. Its width: that of the terminal it is
drawn on (a real pseudo-terminal sized with ``TIOCSWINSZ``), not stdout's, and every redraw
fits in it. With a total: drawn at most ten times a second, with rate and ETA; silent off a
terminal; and the byte and duration formats. The CLI's use of both, on a real
pseudo-terminal, is in test_copy_report.py."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import struct
import termios
from collections.abc import Iterator

import pytest

from tierdisk.client.progress import Progress, format_bytes, format_duration, terminal_columns

MiB = 1 << 20


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_without_a_total_it_shows_bytes_rate_and_elapsed_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    now = [0.0]
    out = Tty()
    with Progress(None, label="write vm1", stream=out, clock=lambda: now[0]) as bar:
        now[0] = 1.0
        bar.advance(MiB)  # the first advance draws at once
        assert out.getvalue() == "\rwrite vm1 1.0 MiB 1.0 MiB/s elapsed 0:01"
        now[0] = 1.05
        bar.advance(MiB)  # within 0.1 s of the last draw: not drawn yet
        assert out.getvalue().count("\r") == 1
        now[0] = 3.0
        bar.advance(MiB)
    text = out.getvalue()
    assert text.endswith("\n")
    last = text.rstrip("\n").split("\r")[-1]
    assert last.rstrip() == "write vm1 3.0 MiB 1.0 MiB/s elapsed 0:03"
    assert "%" not in text and "ETA" not in text and " / " not in text


def test_without_a_total_nothing_is_drawn_off_a_terminal() -> None:
    out = io.StringIO()
    with Progress(None, label="write vm1", stream=out) as bar:
        bar.advance(MiB)
    assert out.getvalue() == ""


def test_without_a_total_zero_bytes_is_not_an_error() -> None:
    bar = Progress(None, stream=Tty(), clock=lambda: 0.0)
    assert bar.render(now=0.0) == "0 B 0 B/s elapsed 0:00"


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, int]]:
    """A pseudo-terminal ``(master, slave)``; ``$COLUMNS`` unset, as in a user's shell
    (which does not export it)."""
    monkeypatch.delenv("COLUMNS", raising=False)
    master, slave = pty.openpty()
    try:
        yield master, slave
    finally:
        os.close(master)
        os.close(slave)


def set_columns(fd: int, columns: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))


def drain(master: int) -> bytes:
    """What reached the terminal so far (all of it is buffered: the writes are small)."""
    out = b""
    os.set_blocking(master, False)
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def test_the_bar_fits_the_terminal_it_is_drawn_on(terminal: tuple[int, int]) -> None:
    """A 40-column terminal as the bar's stream while stdout is not one (here pytest's
    capture; in `tierdisk read … | gzip` a pipe): every redraw is cut to 39 columns, never
    to stdout's 80-column fallback, which would wrap and leave a line per redraw."""
    master, slave = terminal
    set_columns(slave, 40)
    now = [0.0]
    total = 3 * 1024 * MiB
    with open(slave, "w", closefd=False) as stream:  # the fixture closes the descriptor
        assert terminal_columns(stream) == 40
        with Progress(
            total, label="read a-long-volume-name", stream=stream, clock=lambda: now[0]
        ) as bar:
            for _ in range(30):
                now[0] += 0.5
                bar.advance(100 * MiB)
            set_columns(slave, 30)  # the window narrowed mid-transfer: the next redraw fits
            now[0] += 0.5
            bar.advance(MiB)
    screen = drain(master).decode()
    assert screen.endswith("\r\n")
    redraws = screen.removesuffix("\r\n").split("\r")[1:]
    assert len(redraws) == 32  # 31 advances, each past the interval, and the final draw
    assert all(len(line) <= 39 for line in redraws), [len(line) for line in redraws]
    assert all(len(line) <= 29 for line in redraws[-2:]), redraws[-2:]
    assert redraws[0].startswith("read a-long-volume-name [")
    assert len(redraws[0].rstrip()) == 39  # the text was longer: cut at the width


def test_columns_fall_back_off_a_terminal_and_follow_columns_env(
    terminal: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, slave = terminal
    with open(slave, "w", closefd=False) as fresh:
        assert terminal_columns(fresh) == 80  # a terminal whose size was never set reports 0
        set_columns(slave, 50)
        assert terminal_columns(fresh) == 50
        monkeypatch.setenv("COLUMNS", "100")  # the user's override wins, as for shutil's
        assert terminal_columns(fresh) == 100
    monkeypatch.setenv("COLUMNS", "junk")
    assert terminal_columns(io.StringIO()) == 80  # no descriptor
    with open(os.devnull, "w") as null:
        assert terminal_columns(null, fallback=72) == 72  # not a terminal


# -- with a total ------------------------------------------------------------------------


def test_progress_draws_on_a_tty_at_most_ten_times_a_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    now = [0.0]
    out = Tty()
    bar = Progress(100 << 20, label="import vm1", stream=out, clock=lambda: now[0])
    for _ in range(100):  # 100 updates within 50 ms: one draw
        now[0] += 0.0005
        bar.advance(1 << 20)
    assert out.getvalue().count("\r") == 1
    now[0] = 10.0
    bar.advance(0)
    bar.close()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n")
    last = text.rstrip("\n").split("\r")[-1]
    assert "import vm1" in last and "100%" in last and "100.0 MiB / 100.0 MiB" in last
    assert "10.0 MiB/s" in last and "ETA 0:00" in last


def test_progress_shows_rate_and_eta_midway() -> None:
    bar = Progress(100 << 20, stream=Tty(), clock=lambda: 0.0)
    bar.done = 25 << 20
    text = bar.render(now=5.0)
    assert " 25%" in text and "5.0 MiB/s" in text and "ETA 0:15" in text


def test_skipped_bytes_count_as_done_but_not_in_the_rate() -> None:
    """An export counts the volume's holes at once (they are left as holes): its first
    redraw showed 1.3 TiB/s and "ETA 0:00"; the rate is of the bytes that moved."""
    now = [0.0]
    bar = Progress(100 << 20, stream=Tty(), clock=lambda: now[0])
    bar.skip(50 << 20)
    now[0] = 2.0
    bar.advance(10 << 20)
    text = bar.render(now=2.0)
    assert " 60%" in text and "5.0 MiB/s" in text and "ETA 0:08" in text


def test_progress_is_silent_off_a_terminal() -> None:
    out = io.StringIO()
    with Progress(10, stream=out) as bar:
        bar.advance(10)
    assert out.getvalue() == ""


def test_formatting_helpers() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 << 30) == "3.0 GiB"
    assert format_bytes(3 << 60) == "3.0 EiB"
    assert format_duration(7) == "0:07"
    assert format_duration(3725) == "1:02:05"
