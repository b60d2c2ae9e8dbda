"""Domain exceptions raised by the engine, the layers and the config loader.

Nothing here knows about gRPC: :mod:`tierdisk.service.status` holds the one table that maps
these classes to status codes (DESIGN.md §2), and the client library maps the codes back to
its own exception tree.
"""

from __future__ import annotations

import errno

__all__ = [
    "OUT_OF_SPACE_ERRNOS",
    "SERVER_STOPPING",
    "SHUTTING_DOWN",
    "AllocationTooLarge",
    "ConfigError",
    "DataCorruption",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "NoSpace",
    "NotSupported",
    "OutOfRange",
    "PermissionDenied",
    "ReadOnlyError",
    "SectorSizeChanged",
    "StorageError",
    "TierLoop",
    "TierdiskError",
    "Unauthenticated",
    "Unavailable",
    "VolumeNotFound",
    "WritesLost",
]


SHUTTING_DOWN = "the server is shutting down"
"""How every refusal because the server is stopping begins (gRPC calls, WatchResize
streams, NBD options and commands), so one search of a log finds them all."""

SERVER_STOPPING = f"{SHUTTING_DOWN}; retry on another server or later"
""":class:`Unavailable`'s message for a gRPC call refused because the server is stopping."""


class TierdiskError(Exception):
    """Base of every error tierdisk raises on purpose; its message is meant for a person."""


class VolumeNotFound(TierdiskError):
    """No volume of that name is served here."""


class OutOfRange(TierdiskError):
    """A sector range reaches past the end of the volume or layer."""


class InvalidArgument(TierdiskError):
    """A malformed request: data not a whole number of sectors, over a size limit, …"""


class AllocationTooLarge(InvalidArgument):
    """A ``GetAllocation`` range with more extents than one reply may carry.

    DESIGN.md §2 requires a reply to cover the whole range asked for, so the server never cuts
    one short: it refuses the call, and the caller asks for smaller ranges (the client library
    does so by itself). The code is ``INVALID_ARGUMENT``, the table's code for size limits —
    not ``RESOURCE_EXHAUSTED``, which says a layer's storage is out of space, nor
    ``OUT_OF_RANGE``, which says the range reaches past the end of the volume. The class
    name travels in the ``tierdisk-error`` trailer, so clients can tell this refusal from
    other invalid arguments."""


class FailedPrecondition(TierdiskError):
    """The request is well formed but the volume's state or configuration refuses it."""


class TierLoop(FailedPrecondition):
    """The hop guard refused a call (:mod:`tierdisk.service.hops`): a loop of tiers (a
    volume reached twice, or volumes waiting for each other at start) or a chain of tiers
    deeper than its limit. Retrying cannot end it."""


class SectorSizeChanged(FailedPrecondition):
    """A request counted in another sector size than the volume's (the request's
    ``sector_size``): the volume was re-created with another one since the caller asked,
    and its sectors would be other bytes. Nothing changed; the caller asks the volume's
    geometry again."""


class ReadOnlyError(FailedPrecondition):
    """A write, unmap or resize on a read-only volume or layer."""


class NotSupported(FailedPrecondition):
    """A layer cannot do this (a layer kind that cannot be resized, or write without
    overwriting; none of the kinds tierdisk ships, when writable: a config that puts a
    read-only layer on a writable volume's write path is refused at start)."""


class Unauthenticated(TierdiskError):
    """Missing or wrong credentials."""


class PermissionDenied(TierdiskError):
    """The caller is not allowed to use this volume."""


class Unavailable(TierdiskError):
    """A remote layer cannot be reached, or the volume is not attached yet; safe to retry."""


class DeadlineExceeded(TierdiskError):
    """A call to a remote layer ran out of time."""


OUT_OF_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""The errno values of a write refused for want of space, which :class:`NoSpace` stands for
(and NBD's ``ENOSPC``): the filesystem's, a quota's, or the process's file size limit
(``EFBIG`` from a write: ``ulimit -f``, ``LimitFSIZE=``)."""


class NoSpace(TierdiskError):
    """A layer's storage is out of space; the request changed nothing.

    Where a request did change something before running out of space (the data was
    written, its record was not; upper layers took a write a lower one could not), raise
    :meth:`after_a_change` instead: ``RESOURCE_EXHAUSTED`` would tell the caller the old
    data is still there."""

    def after_a_change(self, change: str) -> StorageError:
        """This shortage as the :class:`StorageError` of a request that changed something
        (``change`` says what; it goes after the shortage in the message)."""
        return StorageError(f"{self}; {change}")


class StorageError(TierdiskError):
    """A layer's storage failed (I/O error)."""


class DataCorruption(StorageError):
    """A layer found its stored data or metadata corrupt."""


class WritesLost(DataCorruption):
    """Writes acknowledged without being durable may have been lost (a remote tier restarted
    without a clean stop before a flush made them durable): a flush cannot vouch for them.
    The volume's write verifier changes with it (:attr:`Volume.write_verifier`)."""


class ConfigError(TierdiskError):
    """A configuration or a layer stack is invalid.

    ``volume`` and ``layer`` (the top-down layer index) locate the problem when known; the
    string form names both, so one line is enough for an operator.
    """

    def __init__(self, problem: str, *, volume: str | None = None, layer: int | None = None):
        self.problem = problem
        self.volume = volume
        self.layer = layer
        super().__init__(self._describe())

    def _describe(self) -> str:
        where = []
        if self.volume is not None:
            where.append(f"volume {self.volume!r}")
        if self.layer is not None:
            where.append(f"layer {self.layer}")
        return f"{', '.join(where)}: {self.problem}" if where else self.problem

    def located(self, *, volume: str | None = None, layer: int | None = None) -> ConfigError:
        """A copy of this error with the volume and layer filled in where still unknown."""
        return ConfigError(
            self.problem,
            volume=self.volume if self.volume is not None else volume,
            layer=self.layer if self.layer is not None else layer,
        )
