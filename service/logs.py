"""Logging set-up for ``tierdisk serve``: ``--log-level`` and ``--log-format json|text``."""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["ClientGoneFilter", "JsonFormatter", "configure_logging", "say"]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exception text)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class ClientGoneFilter(logging.Filter):
    """gRPC logs an ERROR with a traceback ("ExecuteBatchError raised in core by servicer
    method ...") when a handler's reply cannot be sent because the client cancelled the call
    or went away meanwhile: routine for a storage server, whose clients time out and cancel
    large reads. Such records become one DEBUG line without the traceback (dropped unless
    debug logging is on); every other record passes unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or type(exc).__name__ != "ExecuteBatchError":
            return True
        if not logging.getLogger().isEnabledFor(logging.DEBUG):
            return False
        method = record.getMessage().rpartition(" ")[2]
        record.msg, record.args = "a client went away before the reply to %s was sent", (method,)
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info = record.exc_text = None
        return True


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Log to stderr at ``level`` in ``fmt`` ("text" or "json"), with gRPC's errors for
    replies to vanished clients quietened (:class:`ClientGoneFilter`)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:  # UTC, as the JSON records' times: one clock for every tier's log
        text = logging.Formatter(
            "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s",
            datefmt="%Y-%m-%dT%H:%M:%S",
        )
        text.converter = time.gmtime
        handler.setFormatter(text)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, ClientGoneFilter) for f in grpc_log.filters):
        grpc_log.addFilter(ClientGoneFilter())


def say(line: str) -> None:
    """Write ``line``, one a command ends with (why it did not start, why it exits 1), to
    stderr as it is; or, when the log is JSON (:func:`configure_logging`), as one more JSON
    record at error level, so that a pipeline reading the log as JSON sees it too."""
    if any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers):
        logging.getLogger("tierdisk.service").error("%s", line)
    else:
        print(line, file=sys.stderr)
