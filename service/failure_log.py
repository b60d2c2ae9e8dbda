"""The server's log of storage failures, for both front ends (gRPC and NBD).

A client told ``INTERNAL``, ``DATA_LOSS`` or ``RESOURCE_EXHAUSTED`` (an NBD client: ``EIO``,
``ENOSPC``, …) learns only the status; the operator needs the volume, the request and the
error (the layer's file and errno) in the log. Errors of the request or of a tier (out of
range, read-only, a remote layer unavailable, …) are the caller's to handle and are not logged
here (the metrics count them all).
"""

from __future__ import annotations

import logging

from .errors import NoSpace, StorageError, TierdiskError
from .ratelimit import RateLimitedLog

__all__ = ["StorageFailureLog", "is_storage_failure"]

log = logging.getLogger("tierdisk.service")


def is_storage_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure of a layer's storage: :class:`StorageError` (and so
    :class:`DataCorruption`), :class:`NoSpace`, or an ``OSError`` no layer turned into one."""
    return isinstance(exc, (StorageError, NoSpace)) or (
        isinstance(exc, OSError) and not isinstance(exc, TierdiskError)
    )


class StorageFailureLog:
    """Logs storage failures at error level, at most one line every ``interval`` seconds
    for each volume, request and kind of error (lines held back are told when their interval
    ends: :class:`~.ratelimit.RateLimitedLog`), so failing reads and writes in turn are each
    limited. An ``OSError`` that no
    layer turned into a domain error is a fault of ours and is logged with its traceback."""

    def __init__(self, logger: logging.Logger = log, interval: float = 10.0) -> None:
        self._logger = logger
        self._interval = interval
        self._lines: dict[tuple[str, str, type[BaseException]], RateLimitedLog] = {}

    def note(self, volume: str, request: str, status: str, exc: BaseException) -> None:
        """``request`` (e.g. "gRPC Write", "NBD read") on ``volume`` failed with ``exc``,
        answered ``status``: log it if it is a storage failure (:func:`is_storage_failure`).
        Only served volumes fail in storage, and requests and error kinds are few, so the
        limiters kept are bounded."""
        if not is_storage_failure(exc):
            return
        key = (volume, request, type(exc))
        lines = self._lines.get(key)
        if lines is None:
            lines = self._lines[key] = RateLimitedLog(self._logger, self._interval)
        lines.error(
            "volume %r: %s failed (%s): %s",
            volume,
            request,
            status,
            exc,
            exc_info=None if isinstance(exc, TierdiskError) else exc,
        )
