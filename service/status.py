"""Domain exception → status code name: the one table (DESIGN.md §2), for every front end.

gRPC replies use it (:mod:`.grpc_refusal` turns a name into a ``grpc.StatusCode``), and so do the
metrics of the NBD export, so a failure counts under one ``code`` in the shared volume
families (``tierdisk_volume_io_requests_total``, …) whichever front end it came through. The
module knows nothing of gRPC: names are the ``grpc.StatusCode`` member names.
"""

from __future__ import annotations

from .errors import (
    ConfigError,
    DataCorruption,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NoSpace,
    OutOfRange,
    PermissionDenied,
    StorageError,
    TierdiskError,
    Unauthenticated,
    Unavailable,
    VolumeNotFound,
)

__all__ = ["STATUS_NAMES", "status_name", "status_name_of"]

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
