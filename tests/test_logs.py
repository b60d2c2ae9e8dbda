"""Server logging: the JSON format, and gRPC's errors for replies to vanished clients."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator

import pytest

from tierdisk.service.logs import ClientGoneFilter, JsonFormatter, configure_logging


class ExecuteBatchError(Exception):
    """Named as gRPC's (grpc._cython.cygrpc.ExecuteBatchError cannot be made here)."""


def _record(exc: BaseException | None, level: int = logging.ERROR) -> logging.LogRecord:
    exc_info = (type(exc), exc, None) if exc is not None else None
    return logging.LogRecord(
        "grpc._cython.cygrpc", level, __file__, 1,
        "ExecuteBatchError raised in core by servicer method [%s]",
        ("/tierdisk.v1.BlockDevice/Read",), exc_info,
    )  # fmt: skip


@pytest.fixture
def root_level() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    before = root.level
    yield root
    root.setLevel(before)


def test_reply_to_a_vanished_client_is_dropped_below_debug(root_level: logging.Logger) -> None:
    root_level.setLevel(logging.INFO)
    assert ClientGoneFilter().filter(_record(ExecuteBatchError("Failed execute_batch"))) is False


def test_reply_to_a_vanished_client_is_one_debug_line_at_debug(
    root_level: logging.Logger,
) -> None:
    root_level.setLevel(logging.DEBUG)
    record = _record(ExecuteBatchError("Failed execute_batch"))
    assert ClientGoneFilter().filter(record) is True
    assert record.levelno == logging.DEBUG and record.exc_info is None
    assert record.getMessage() == (
        "a client went away before the reply to [/tierdisk.v1.BlockDevice/Read] was sent"
    )


def test_other_errors_pass_unchanged(root_level: logging.Logger) -> None:
    root_level.setLevel(logging.INFO)
    for exc in (RuntimeError("boom"), None):
        record = _record(exc)
        assert ClientGoneFilter().filter(record) is True
        assert record.levelno == logging.ERROR
        assert record.exc_info == ((type(exc), exc, None) if exc is not None else None)


def test_json_lines_carry_the_exception() -> None:
    try:
        raise ValueError("bad")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "m %d", (1,), sys.exc_info())
    entry = json.loads(JsonFormatter().format(record))
    assert (entry["level"], entry["logger"], entry["message"]) == ("error", "x", "m 1")
    assert "ValueError: bad" in entry["exception"]


def test_text_lines_are_stamped_in_utc_as_json_records_are() -> None:
    """One clock for every tier's log, whatever the host's time zone: ISO 8601, UTC."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        configure_logging("info", "text")
        record = logging.LogRecord("t", logging.INFO, __file__, 1, "hello", None, None)
        record.created, record.msecs = 86400.25, 250
        line = root.handlers[0].format(record)
    finally:
        root.handlers[:], root.level = saved, level
    assert line == "1970-01-02T00:00:00.250Z INFO t: hello"
