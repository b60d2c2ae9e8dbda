"""Warnings that can repeat per request are rate-limited, and say how many were held back."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tierdisk.service.ratelimit import RateLimitedLog, tell_held_lines


def test_one_warning_per_interval_with_a_count(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [100.0]
    monkeypatch.setattr("tierdisk.service.ratelimit.time.monotonic", lambda: now[0])
    log = RateLimitedLog(logging.getLogger("t"), interval=10.0)
    with caplog.at_level(logging.WARNING, logger="t"):
        for _ in range(5):
            log.warning("fill failed: %s", "boom")
        now[0] += 10.0
        log.warning("fill failed: %s", "again")
    assert [r.getMessage() for r in caplog.records] == [
        "fill failed: boom",
        "fill failed: again (4 similar messages suppressed)",
    ]


def test_a_new_key_is_logged_at_once_at_its_level(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new reason (``key``) is news: logged at once; the same one again is held back. The
    count of lines held back names their kind: the last one logged, not the new one."""
    now = [100.0]
    monkeypatch.setattr("tierdisk.service.ratelimit.time.monotonic", lambda: now[0])
    log = RateLimitedLog(logging.getLogger("t"), interval=60.0)
    with caplog.at_level(logging.ERROR, logger="t"):
        for reason in ("down", "down", "no volume", "no volume", "down"):
            log.error("attach: %s", reason, key=reason)
            now[0] += 1.0
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.ERROR, "attach: down"),
        (logging.ERROR, "attach: no volume (1 more of the previous kind were held back)"),
        (logging.ERROR, "attach: down (1 more of the previous kind were held back)"),
    ]


def test_the_end_of_a_condition_says_what_was_held_back(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lines held back after the last one logged are counted in the line that ends the
    condition (they were never told once it ended). A condition that comes and goes on
    every call is a few lines per interval (each end once let the next failure through:
    two lines per call)."""
    now = [100.0]
    monkeypatch.setattr("tierdisk.service.ratelimit.time.monotonic", lambda: now[0])
    log = RateLimitedLog(logging.getLogger("t"), interval=10.0)
    with caplog.at_level(logging.INFO, logger="t"):
        for _ in range(4):
            log.warning("call failed")
        log.ended("answers again")
        for _ in range(50):  # flapping, within the interval
            now[0] += 0.1
            log.warning("call failed")
            log.ended("answers again")
        now[0] += 10.0
        log.warning("call failed")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "call failed"),
        (logging.INFO, "answers again (3 more like the last failure were held back)"),
        (logging.WARNING, "call failed"),  # a new episode: news
        (logging.INFO, "answers again"),  # (it was logged: its end is told)
        (logging.WARNING, "call failed (49 similar messages suppressed)"),
    ]


def test_every_episode_whose_failure_was_logged_has_its_end_logged(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two outages a few seconds apart, each logged, each end logged: the last word on the
    condition is never a failure that is over (the end of the second was dropped, and an
    outage soon after an end could go unlogged)."""
    now = [100.0]
    monkeypatch.setattr("tierdisk.service.ratelimit.time.monotonic", lambda: now[0])
    log = RateLimitedLog(logging.getLogger("t"), interval=10.0)
    with caplog.at_level(logging.INFO, logger="t"):
        for start in (0.0, 12.0, 15.0):  # the third begins 3 s after the second ended
            now[0] = 100.0 + start
            log.warning("call failed")
            now[0] += 1.0
            log.warning("call failed")
            log.ended("answers again")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "call failed"),
        (logging.INFO, "answers again (1 more like the last failure were held back)"),
        (logging.WARNING, "call failed"),
        (logging.INFO, "answers again (1 more like the last failure were held back)"),
        (logging.WARNING, "call failed"),
        (logging.INFO, "answers again (1 more like the last failure were held back)"),
    ]


async def test_lines_held_back_are_told_when_their_interval_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On an event loop, a burst held back with no later line of its kind is not lost: the
    last line held is logged with the count when the interval ends, once; a line logged
    before then tells them itself, and nothing more is logged for them."""
    log = RateLimitedLog(logging.getLogger("t"), interval=0.2)
    with caplog.at_level(logging.WARNING, logger="t"):
        for n in range(4):
            log.warning("call failed: %s", n)
        await asyncio.sleep(0.5)
        assert [r.getMessage() for r in caplog.records] == [
            "call failed: 0",
            "call failed: 3 (the last of 3 similar messages held back)",
        ]
        caplog.clear()
        await asyncio.sleep(0.3)  # (the interval the told line began is over)
        log.warning("call failed: %s", 4)
        log.warning("call failed: %s", 5)
        log.warning("other", key="other")  # a new reason: logged at once, with the count
        await asyncio.sleep(0.5)
    assert [r.getMessage() for r in caplog.records] == [
        "call failed: 4",
        "other (1 more of the previous kind were held back)",
    ]


async def test_failures_held_then_an_end_held_are_told_by_the_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A condition that comes and goes within an interval: its held failures are told when
    the interval ends, by its end (it answers again) with their count, not by a failure
    line that would make the log end on a failure long over."""
    log = RateLimitedLog(logging.getLogger("t"), interval=0.2)
    with caplog.at_level(logging.INFO, logger="t"):
        for _ in range(3):  # fails and answers in turn, within an interval
            log.warning("call failed")
            log.ended("answers again")
        await asyncio.sleep(0.5)
    assert [r.getMessage() for r in caplog.records] == [
        "call failed",
        "answers again",
        "call failed",  # (a new episode: news)
        "answers again",
        # the third failure and end were held; told together, the end last
        "answers again (1 more like the last failure were held back)",
    ]


async def test_a_line_held_back_keeps_its_text_and_tells_it_whole(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A held line keeps the text its arguments made, not the arguments (an error and the
    frames of its traceback, a request's data), and tells it as it was, ``%`` and all."""
    freed: list[str] = []

    class Tracked(OSError):
        def __del__(self) -> None:
            freed.append(str(self))

    log = RateLimitedLog(logging.getLogger("t"), interval=0.2)
    with caplog.at_level(logging.WARNING, logger="t"):
        log.warning("disk 100%% full: %s", "first")
        log.warning("disk 100%% full: %s", Tracked("held"))
        assert freed == ["held"]
        log.warning("no args, 100% full")  # held after the one before: its text kept too
        await asyncio.sleep(0.5)
    assert [r.getMessage() for r in caplog.records] == [
        "disk 100% full: first",
        "no args, 100% full (the last of 2 similar messages held back)",
    ]


async def test_lines_held_back_are_told_at_a_stop(caplog: pytest.LogCaptureFixture) -> None:
    """A stop within the interval tells the lines held back then, with their count, once,
    instead of taking them with it; a log with nothing held says nothing."""
    failing = RateLimitedLog(logging.getLogger("t"), interval=60)
    quiet = RateLimitedLog(logging.getLogger("t"), interval=60)
    with caplog.at_level(logging.INFO, logger="t"):
        for n in range(3):
            failing.warning("call failed: %s", n)
        quiet.warning("once")
        caplog.clear()
        tell_held_lines()
        tell_held_lines()  # (told once)
        await asyncio.sleep(0)
    assert [r.getMessage() for r in caplog.records] == [
        "call failed: 2 (the last of 2 similar messages held back)"
    ]
