"""The progress bar's text with no total (``tierdisk write`` from a pipe): bytes done, rate and
time so far, never a percentage or an ETA; drawn only on a terminal. The bar with a total is
covered in test_client_unit.py; the CLI's use of both, on a real pseudo-terminal, in
test_cli.py."""

from __future__ import annotations

import io

import pytest

from tierdisk.client.progress import Progress

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
