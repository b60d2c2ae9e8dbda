"""Domain exception → what a front end answers: the one place that decides it.

- :data:`STATUS_NAMES`, the status code name (DESIGN.md §2). gRPC replies use it
  (:mod:`.grpc_refusal` turns a name into a ``grpc.StatusCode``), and so do the metrics of
  the NBD export, so a failure counts under one ``code`` in the shared volume families
  (``tierdisk_volume_io_requests_total``, …) whichever front end it came through. The
  module knows nothing of gRPC: names are the ``grpc.StatusCode`` member names.
- :data:`NBD_ERRORS`, the NBD error value an NBD client gets (:func:`nbd_error`), for the
  engine's failures and for the export's own refusals (:class:`.nbd_commands.Refuse`).
"""

from __future__ import annotations

import errno

from . import nbd_protocol as P
from .errors import (
    OUT_OF_SPACE_ERRNOS,
    ConfigError,
    DataCorruption,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NoSpace,
    OutOfRange,
    PermissionDenied,
    ReadOnlyError,
    StorageError,
    TierdiskError,
    Unauthenticated,
    Unavailable,
    VolumeNotFound,
)

__all__ = [
    "NBD_ERRORS",
    "STATUS_NAMES",
    "nbd_error",
    "nbd_error_of",
    "status_name",
    "status_name_of",
]

STATUS_NAMES: dict[type[TierdiskError], str] = {
    VolumeNotFound: "NOT_FOUND",
    OutOfRange: "OUT_OF_RANGE",
    InvalidArgument: "INVALID_ARGUMENT",
    FailedPrecondition: "FAILED_PRECONDITION",
    Unauthenticated: "UNAUTHENTICATED",
    PermissionDenied: "PERMISSION_DENIED",
    Unavailable: "UNAVAILABLE",
    DeadlineExceeded: "DEADLINE_EXCEEDED",
    NoSpace: "RESOURCE_EXHAUSTED",
    DataCorruption: "DATA_LOSS",
    StorageError: "INTERNAL",
    ConfigError: "FAILED_PRECONDITION",  # a layer's files found unusable while serving
}
"""Domain exception → status code name (DESIGN.md §2). Subclasses map through their bases:
``ReadOnlyError``, ``NotSupported`` and ``TierLoop`` are ``FAILED_PRECONDITION``."""


def status_name(exc: BaseException) -> str:
    """The status code name for ``exc``: its nearest class's entry in :data:`STATUS_NAMES`;
    any other storage failure (``OSError``) is ``INTERNAL``, anything else ``UNKNOWN``."""
    return status_name_of(type(exc))


def status_name_of(kind: type[BaseException]) -> str:
    """:func:`status_name` of an exception of class ``kind``."""
    for cls in kind.__mro__:
        name = STATUS_NAMES.get(cls)
        if name is not None:
            return name
    return "INTERNAL" if issubclass(kind, OSError) else "UNKNOWN"


NBD_ERRORS: dict[type[TierdiskError], int] = {
    ReadOnlyError: P.EPERM,
    PermissionDenied: P.EPERM,
    Unauthenticated: P.EPERM,
    NoSpace: P.ENOSPC,
    InvalidArgument: P.EINVAL,
    TierdiskError: P.EIO,  # Unavailable, DeadlineExceeded, StorageError, …: the session goes on
}
"""Domain exception → NBD error value, through the nearest class as :data:`STATUS_NAMES`.
:class:`OutOfRange` is not here: past the end is ``ENOSPC`` for a write and ``EINVAL``
otherwise, as the NBD spec has it (:func:`nbd_error_of`)."""

_NBD_ERRNOS = {
    errno.EPERM: P.EPERM,
    errno.EACCES: P.EPERM,
    errno.EROFS: P.EPERM,
    errno.EINVAL: P.EINVAL,
    **dict.fromkeys(OUT_OF_SPACE_ERRNOS, P.ENOSPC),
}
"""A storage failure no layer named (an ``OSError``): its errno → NBD error value."""


def nbd_error(exc: BaseException, *, writing: bool) -> int:
    """The NBD error value for ``exc``, raised by a request that changes data (``writing``:
    a write, a write of zeros) or not: :func:`nbd_error_of` its class; an ``OSError`` keeps
    its kind (read-only and denied ``EPERM``, out of space ``ENOSPC``, a bad argument
    ``EINVAL``); anything else is ``EIO``."""
    if isinstance(exc, OSError) and not isinstance(exc, TierdiskError):
        return _NBD_ERRNOS.get(exc.errno or 0, P.EIO)
    return nbd_error_of(type(exc), writing=writing)


def nbd_error_of(kind: type[BaseException], *, writing: bool) -> int:
    """:func:`nbd_error` of a domain exception of class ``kind`` (``EIO`` for any other)."""
    if issubclass(kind, OutOfRange):
        return P.ENOSPC if writing else P.EINVAL
    for cls in kind.__mro__:
        value = NBD_ERRORS.get(cls)
        if value is not None:
            return value
    return P.EIO
