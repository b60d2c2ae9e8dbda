"""Warnings that can repeat per request are rate-limited, and say how many were held back."""

from __future__ import annotations

import logging

import pytest

from tierdisk.service.ratelimit import RateLimitedLog


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
        "fill failed: again (4 similar warnings suppressed)",
    ]
