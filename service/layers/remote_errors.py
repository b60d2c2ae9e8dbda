"""How a ``remote`` layer's failures become this server's: client exception → domain exception.

A :class:`~.remote.RemoteLayer` talks to the other tierdisk through
:class:`tierdisk.client.AsyncClient`, whose failures are :mod:`tierdisk.client.errors`
exceptions. This module is the one place they are translated into the service's own
(:mod:`tierdisk.service.errors`), by :data:`ERROR_MAP`, with the remote named in the message
and the remote's own message cut to :data:`MAX_REMOTE_MESSAGE` characters; the status table
(:data:`~..status.STATUS_NAMES`) then picks the status code this server answers with.
:class:`Translate` applies it to a ``with`` block.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

from tierdisk.client import errors as client_errors

from .. import errors

__all__ = ["ERROR_MAP", "MAX_REMOTE_MESSAGE", "Translate", "domain_error"]

ERROR_MAP: tuple[tuple[type[client_errors.TierdiskError], type[errors.TierdiskError]], ...] = (
    (client_errors.ReadOnlyVolume, errors.ReadOnlyError),
    (client_errors.NotSupported, errors.NotSupported),
    (client_errors.TierLoop, errors.TierLoop),  # a lower tier's hop guard: passed on as such
    (client_errors.FailedPrecondition, errors.FailedPrecondition),
    (client_errors.VolumeNotFound, errors.FailedPrecondition),  # our config names a volume
    # the remote does not serve: a refusal of this layer, not "no such volume" here
    (client_errors.OutOfRange, errors.OutOfRange),
    (client_errors.InvalidArgument, errors.InvalidArgument),
    # The remote refused this layer's credentials: the server's configuration, which the
    # caller (whose own credentials were fine) cannot fix.
    (client_errors.Unauthenticated, errors.FailedPrecondition),
    (client_errors.PermissionDenied, errors.FailedPrecondition),
    (client_errors.Unavailable, errors.Unavailable),
    (client_errors.Cancelled, errors.Unavailable),  # the remote is shutting down: retry
    (client_errors.DeadlineExceeded, errors.DeadlineExceeded),
    (client_errors.NoSpace, errors.NoSpace),
    (client_errors.WritesLost, errors.WritesLost),
    (client_errors.DataLoss, errors.DataCorruption),
    (client_errors.StorageError, errors.StorageError),
    (client_errors.TierdiskError, errors.StorageError),  # UNKNOWN and other codes
)
"""Client exception → domain exception, first match wins (subclasses come first). The one
place a remote failure is translated; the status table (:data:`~..status.STATUS_NAMES`) then
picks the status code."""

MAX_REMOTE_MESSAGE = 300
"""Characters of a remote's error message kept in ours. Bounded, because the message may
itself quote a lower tier's (and, in a loop of tiers that wait on each other, our own older
one): unbounded, it grew with every retry until gRPC refused the metadata."""


def domain_error(exc: client_errors.TierdiskError, where: str) -> errors.TierdiskError:
    """The domain exception for a client failure (:data:`ERROR_MAP`), prefixed by ``where``;
    the remote's message is cut to :data:`MAX_REMOTE_MESSAGE` characters."""
    text = str(exc)
    if len(text) > MAX_REMOTE_MESSAGE:
        text = text[: MAX_REMOTE_MESSAGE - 1] + "…"
    for client_cls, domain_cls in ERROR_MAP:
        if isinstance(exc, client_cls):
            return domain_cls(f"{where}: {text}")
    return errors.StorageError(f"{where}: {text}")  # pragma: no cover - the base matches


class Translate:
    """``with translate:`` re-raises client failures as domain errors naming the remote.
    Holds no state per use, so one instance serves every call of a layer.

    ``where`` gives the name of the remote for the message; it is asked only when a failure
    is translated, so it names the remote as it is then (a layer's target may be set after
    the layer is made, as by a test layer that starts its own origin at attach)."""

    __slots__ = ("where",)

    def __init__(self, where: Callable[[], str]) -> None:
        self.where = where

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, client_errors.TierdiskError):
            raise domain_error(exc, self.where()) from exc
