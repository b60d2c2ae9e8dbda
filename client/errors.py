"""The client's exception tree, and the one table that maps gRPC status codes onto it.

Every failed call raises a :class:`TierdiskError` subclass chosen from the status code
(DESIGN.md §2). Where the server names its domain error in the trailing metadata key
``tierdisk-error`` (e.g. ``"ReadOnlyError"``), a finer subclass of the code's class is chosen
when one declares that name in ``server_names`` — a read-only refusal is a
:class:`ReadOnlyVolume`, which is still a :class:`FailedPrecondition`. A name that does not
belong under the status code's class is ignored: the code always wins.

Errors the client detects itself (a misaligned byte offset, say) use the same classes, so
callers handle both alike.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import ClassVar, Self

import grpc

__all__ = [
    "ERROR_METADATA_KEY",
    "SERVICE_NAME",
    "STATUS_TABLE",
    "AllocationTooLarge",
    "Cancelled",
    "ClientClosed",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Interrupted",
    "InvalidArgument",
    "MessageTooLarge",
    "NoSpace",
    "NotSupported",
    "OutOfRange",
    "PermissionDenied",
    "ReadOnlyVolume",
    "SectorSizeChanged",
    "StorageError",
    "TierLoop",
    "TierdiskError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "VolumeNotFound",
    "WritesLost",
    "changed_nothing",
    "error_from_rpc",
    "status_code",
]

ERROR_METADATA_KEY = "tierdisk-error"
"""Trailing metadata key in which the server names its domain error class."""
SERVICE_NAME = "tierdisk.v1.BlockDevice"
"""The gRPC service a tierdisk server serves (the proto's ``service BlockDevice``)."""


class TierdiskError(Exception):
    """Base of every error the client raises on purpose.

    ``code`` is the gRPC status code of the failed call (for errors detected client-side, the
    code the server would have answered), ``message`` the text meant for a person,
    ``volume`` the volume the call addressed (when there was one) and ``server_error`` the
    domain error class the server named in ``tierdisk-error`` (when it did).
    """

    default_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    label: ClassVar[str] = "error"
    """A few words naming the kind of failure, for one-line messages (``"not found"``)."""
    server_names: ClassVar[tuple[str, ...]] = ()
    """Domain error class names (``tierdisk-error`` values) that select this class."""
    partial: bool = False
    """Whether the call this error ends was split into several requests (a write of more
    than the client's ``max_io`` bytes) of which some may have changed the volume before
    it failed; :func:`changed_nothing` is then false, whatever the class."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        volume: str | None = None,
        server_error: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.volume = volume
        self.server_error = server_error

    def __str__(self) -> str:
        return self.message or self.label

    def with_note(self, note: str, *, partial: bool = False) -> Self:
        """This error again (its class, code, volume and server error), ``note`` after its
        message (``"…; 3 of 8 bytes had been written"``), :attr:`partial` if ``partial``."""
        again = copy.copy(self)
        again.message = f"{self.message}; {note}"
        again.args = (again.message,)
        again.partial = self.partial or partial
        return again

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code.name})"


class VolumeNotFound(TierdiskError):
    """No volume of that name is served there (``NOT_FOUND``)."""

    default_code = grpc.StatusCode.NOT_FOUND
    label = "not found"
    server_names = ("VolumeNotFound",)


class OutOfRange(TierdiskError):
    """A sector range reaches past the end of the volume (``OUT_OF_RANGE``)."""

    default_code = grpc.StatusCode.OUT_OF_RANGE
    label = "out of range"
    server_names = ("OutOfRange",)


class InvalidArgument(TierdiskError):
    """A malformed request: not whole sectors, over a size limit, misaligned bytes, …"""

    default_code = grpc.StatusCode.INVALID_ARGUMENT
    label = "invalid argument"
    server_names: ClassVar[tuple[str, ...]] = ("InvalidArgument",)


class AllocationTooLarge(InvalidArgument):
    """A ``GetAllocation`` range with more extents than one reply may carry (server error
    ``AllocationTooLarge``): ask for a smaller range. :meth:`AsyncVolume.allocation
    <tierdisk.client.aio.AsyncVolume.allocation>` does, so its callers never see this."""

    label = "too many extents"
    server_names = ("AllocationTooLarge",)


class MessageTooLarge(InvalidArgument):
    """gRPC's own cap on one message refused it, before any tierdisk code saw it (no
    ``tierdisk-error`` trailer; ``RESOURCE_EXHAUSTED`` on the wire): a request far over the
    server's ``max_io``, or a reply over this client's receive cap. Nothing changed.
    :meth:`AsyncVolume.allocation <tierdisk.client.aio.AsyncVolume.allocation>` asks for a
    smaller range on it."""

    label = "message too large"
    server_names: ClassVar[tuple[str, ...]] = ()


class FailedPrecondition(TierdiskError):
    """The volume's state or configuration refuses the request (``FAILED_PRECONDITION``)."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION
    label = "refused"
    server_names: ClassVar[tuple[str, ...]] = ("FailedPrecondition",)


class ReadOnlyVolume(FailedPrecondition):
    """A write, unmap or resize on a read-only volume (server error ``ReadOnlyError``)."""

    label = "read-only"
    server_names = ("ReadOnlyError", "ReadOnlyVolume")


class TierLoop(FailedPrecondition):
    """The server's hop guard refused the call (server error ``TierLoop``): a loop of tiers
    or too deep a chain of them; retrying cannot help."""

    server_names = ("TierLoop",)


class SectorSizeChanged(FailedPrecondition):
    """The volume's sector size is not the one the request counted in (server error
    ``SectorSizeChanged``, or the library's own check of a split call): it was re-created
    with another since this client asked. Nothing changed; the client no longer uses the
    size it kept (it asks again, or has just asked), and the caller works out its sector
    numbers anew."""

    label = "sector size changed"
    server_names = ("SectorSizeChanged",)


class NotSupported(FailedPrecondition):
    """The volume's layers cannot do this (a layer kind that cannot be resized; none of
    the kinds tierdisk ships, when writable)."""

    label = "not supported"
    server_names = ("NotSupported",)


class Unauthenticated(TierdiskError):
    """Missing or wrong credentials (``UNAUTHENTICATED``)."""

    default_code = grpc.StatusCode.UNAUTHENTICATED
    label = "unauthenticated"
    server_names = ("Unauthenticated",)


class PermissionDenied(TierdiskError):
    """The caller may not use this volume (``PERMISSION_DENIED``)."""

    default_code = grpc.StatusCode.PERMISSION_DENIED
    label = "permission denied"
    server_names = ("PermissionDenied",)


class Unavailable(TierdiskError):
    """The server, or a remote layer behind it, cannot be reached (``UNAVAILABLE``).

    Safe to retry; the client already did, ``retries`` times, before raising this.
    """

    default_code = grpc.StatusCode.UNAVAILABLE
    label = "unavailable"
    server_names: ClassVar[tuple[str, ...]] = ("Unavailable",)


class Interrupted(Unavailable):
    """The call was cut short on this side, though its caller did not cancel it: a request
    it made was cancelled underneath it. gRPC cancels every call in flight on a channel that
    is closed, so this is nearly always :class:`ClientClosed`.

    The call did not complete, and never returns as if it had: a read's data is not
    returned, and a write may have landed in part. Nothing was retried: a retry on a closed
    client fails the same way."""

    label = "interrupted"
    server_names = ()


class ClientClosed(Interrupted, RuntimeError):
    """The client is closed: the call was made after :meth:`close
    <tierdisk.client.aio.AsyncClient.close>`, or it was in flight when ``close()`` was called
    (from another task or thread) and did not complete.

    Also a :class:`RuntimeError`, as a closed client's calls raised before, and a
    :class:`Unavailable`: to a server whose remote layer reads through the client, a client
    closed under a call (the server is stopping) is a tier that cannot be reached."""

    label = "client closed"


class DeadlineExceeded(TierdiskError):
    """The call's deadline passed (``DEADLINE_EXCEEDED``)."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED
    label = "timed out"
    server_names = ("DeadlineExceeded",)


class NoSpace(TierdiskError):
    """A layer's storage is out of space; the request changed nothing (``RESOURCE_EXHAUSTED``)."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    label = "no space"
    server_names = ("NoSpace",)


class StorageError(TierdiskError):
    """A layer's storage failed: I/O error or corrupt data (``INTERNAL``)."""

    default_code = grpc.StatusCode.INTERNAL
    label = "storage error"
    server_names: ClassVar[tuple[str, ...]] = ("StorageError",)


class DataLoss(StorageError):
    """A layer's stored data is lost or corrupt (``DATA_LOSS``).

    A subclass of :class:`StorageError`: DESIGN §2 allows either code for a storage failure.
    """

    default_code = grpc.StatusCode.DATA_LOSS
    label = "data loss"
    server_names: ClassVar[tuple[str, ...]] = ("DataCorruption", "DataLoss")


class WritesLost(DataLoss):
    """A flush cannot vouch for writes it covers (``DATA_LOSS``): the volume's write
    verifier changed since they were acknowledged (:mod:`tierdisk.client.verifiers`). The
    server restarted without a clean stop, a flush failed in its storage, or a tier below it
    lost writes, in between: the writes acknowledged since the last successful flush may be
    lost. Raised once for them; the next flush vouches only for writes acknowledged after."""

    label = "writes lost"
    server_names = ("WritesLost",)


class Cancelled(TierdiskError):
    """The server or the transport cancelled the call (``CANCELLED``), e.g. a server shutting
    down with the call still queued, or a burst of calls over what one channel admits.

    Safe to retry (every BlockDevice call is idempotent); the client already did, ``retries``
    times, before raising this. A cancellation made by the caller is
    :class:`asyncio.CancelledError`, never this."""

    default_code = grpc.StatusCode.CANCELLED
    label = "cancelled"


class Unimplemented(TierdiskError):
    """The server does not implement the BlockDevice method called (``UNIMPLEMENTED``): it
    is no tierdisk server (another gRPC service listens there), or a tierdisk server too old
    for that method. The message says so, naming the server (``target``) and the method
    (``method``) when the caller knows them; the volume is not the problem, so ``volume`` is
    left unset."""

    default_code = grpc.StatusCode.UNIMPLEMENTED
    label = "not tierdisk"

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        volume: str | None = None,
        server_error: str | None = None,
        target: str | None = None,
        method: str | None = None,
    ) -> None:
        super().__init__(message, code=code, volume=volume, server_error=server_error)
        self.target = target
        self.method = method

    @classmethod
    def of_call(
        cls, details: str, *, target: str | None = None, method: str | None = None
    ) -> Unimplemented:
        """The error for a call of ``method`` to ``target`` that the server answered
        ``UNIMPLEMENTED`` with ``details``."""
        server = f"the server at {target}" if target else "the server"
        call = method or "this call"
        return cls(
            f"{server} does not serve {SERVICE_NAME}, or is too old for {call} "
            f"(UNIMPLEMENTED: {details})",
            target=target,
            method=method,
        )


_BY_CODE: tuple[type[TierdiskError], ...] = (
    VolumeNotFound,
    OutOfRange,
    InvalidArgument,
    FailedPrecondition,
    Unauthenticated,
    PermissionDenied,
    Unavailable,
    DeadlineExceeded,
    NoSpace,
    StorageError,
    DataLoss,
    Cancelled,
    Unimplemented,
)
STATUS_TABLE: dict[grpc.StatusCode, type[TierdiskError]] = {
    cls.default_code: cls for cls in _BY_CODE
}
"""The table: status code → exception class (each class's ``default_code``). Codes not
listed map to :class:`TierdiskError`.
Finer classes (``ReadOnlyVolume``, ``NotSupported``, …) are subclasses of these, chosen by
the server's ``tierdisk-error`` name."""


def _refine(base: type[TierdiskError], server_error: str) -> type[TierdiskError] | None:
    """The class under ``base`` (itself included) whose ``server_names`` has ``server_error``."""
    if server_error in base.server_names:
        return base
    for sub in base.__subclasses__():
        found = _refine(sub, server_error)
        if found is not None:
            return found
    return None


def _metadata_value(metadata: Iterable[tuple[str, str | bytes]] | None, key: str) -> str | None:
    for k, v in metadata or ():
        if k == key:
            return v.decode("utf-8", "replace") if isinstance(v, bytes) else v
    return None


_TOO_LARGE = "larger than max"
"""In gRPC's own ``RESOURCE_EXHAUSTED`` for a message over a receive cap ("Received message
larger than max (… vs. …)")."""


def status_code(err: grpc.RpcError) -> grpc.StatusCode:
    """The status code of a failed call; UNKNOWN when the error carries none."""
    code_fn = getattr(err, "code", None)
    code = code_fn() if callable(code_fn) else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def error_from_rpc(
    err: grpc.RpcError,
    *,
    volume: str | None = None,
    target: str | None = None,
    method: str | None = None,
) -> TierdiskError:
    """The :class:`TierdiskError` for a failed call (``grpc.aio.AioRpcError`` or a sync
    ``grpc.RpcError`` that is also a ``grpc.Call``) of the RPC ``method`` (``"Read"``) on
    the server ``target`` about ``volume``, each when known. ``UNIMPLEMENTED`` becomes an
    :class:`Unimplemented` naming the server and the method, not the volume."""
    code = status_code(err)
    details_fn = getattr(err, "details", None)
    details = details_fn() if callable(details_fn) else None
    message = str(details) if details else code.name.lower().replace("_", " ")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return Unimplemented.of_call(message, target=target, method=method)
    trailing_fn = getattr(err, "trailing_metadata", None)
    trailing = trailing_fn() if callable(trailing_fn) else None
    server_error = _metadata_value(trailing, ERROR_METADATA_KEY)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not server_error and _TOO_LARGE in message:
        # gRPC's own cap on a message (no tierdisk server said it): a request far over the
        # server's max_io (which it refuses, INVALID_ARGUMENT, below its cap), or a reply
        # over this client's receive cap ("CLIENT: Received message larger than max").
        if "CLIENT:" in message:
            what = (
                f"the reply is larger than this client takes ({message}): give the client "
                "the server's max_io"
            )
        else:
            what = (
                f"the request is larger than the server takes ({message}): a Read or Write "
                "carries at most the server's max_io bytes; give the client a smaller max_io"
            )
        return MessageTooLarge(what, code=code, volume=volume)
    cls = STATUS_TABLE.get(code, TierdiskError)
    if server_error:
        cls = _refine(cls, server_error) or cls
    if code == grpc.StatusCode.NOT_FOUND and target:  # "on this server" says not which one
        message = f"{message} ({target})"
    return cls(message, code=code, volume=volume, server_error=server_error)


_CHANGED_NOTHING: tuple[type[TierdiskError], ...] = (
    VolumeNotFound,
    OutOfRange,
    InvalidArgument,
    FailedPrecondition,
    Unauthenticated,
    PermissionDenied,
    NoSpace,
    Unimplemented,
)


def changed_nothing(exc: BaseException) -> bool:
    """Whether ``exc``, the failure of a write or unmap request, says the request changed
    nothing (DESIGN.md §2: a read-only volume, a range past the end, out of space, …; a
    server that is not tierdisk). Any other failure (a timeout, a lost connection, a
    storage error) may come after part of the request was written; so may any failure of a
    write the client split into several requests (:attr:`TierdiskError.partial`)."""
    return isinstance(exc, _CHANGED_NOTHING) and not exc.partial
