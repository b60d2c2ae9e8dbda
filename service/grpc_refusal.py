"""How a failed gRPC call ends: the status code of an exception, its message and trailer.

Domain exceptions become gRPC status codes by the one table of DESIGN.md §2
(:data:`~.status.STATUS_NAMES`, which the NBD export's metrics use too). The reply of a
domain error also carries the trailing metadata ``tierdisk-error`` (:data:`ERROR_HEADER`, the
client's ``ERROR_METADATA_KEY``) with the exception class name, so the client can pick a
finer exception than the status code alone (``ReadOnlyError`` vs other
``FAILED_PRECONDITION``); a storage failure no layer named (an ``OSError``: ``INTERNAL``,
"storage failure: …") carries none, and the client makes it a ``StorageError`` by its code.
A status message is at most :data:`_MAX_DETAILS` bytes (UTF-8).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NoReturn

import grpc

from tierdisk.client.errors import ERROR_METADATA_KEY

from .errors import InvalidArgument, TierdiskError
from .request_decoding import Undecodable
from .rpc_metrics import count_status_now
from .status import status_name

__all__ = ["ERROR_HEADER", "as_done_callback", "refuse", "refuse_undecodable", "status_for"]

ERROR_HEADER = ERROR_METADATA_KEY
"""The trailer naming an error reply's exception class (``tierdisk-error``)."""

_CODES_BY_NAME = {code.name: code for code in grpc.StatusCode}

_MAX_DETAILS = 1024
"""Longest status message sent, in UTF-8 bytes (gRPC percent-encodes it into a header, and
all headers of a reply must fit in 8 KiB, or the client gets RESOURCE_EXHAUSTED instead)."""


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code for ``exc`` (:func:`~.status.status_name`): its nearest class's in
    the table, ``INTERNAL`` for any other storage failure (``OSError``), else ``UNKNOWN``."""
    return _CODES_BY_NAME[status_name(exc)]


def as_done_callback(release: Callable[[], None]) -> Callable[[Any], None]:
    """``release`` as a gRPC done callback (called with the call's context)."""
    return lambda _context: release()


def _forget_frames(aborted: BaseException) -> None:
    """Drop what ``aborted`` refers to, once its call has ended.

    ``context.abort()`` raises an ``AbortError`` that gRPC keeps on the call's state, which
    the handler frames of the error's traceback refer to (``context``): a cycle that only
    the cycle collector frees, and with it every request those frames hold (16 refused
    Writes of 60 MiB took a server from 49 MB to 1 GB until a collection). Dropping the
    traceback and the error it was raised over (whose own traceback holds the request's
    data) when the call is done breaks it: the frames and the request go at once."""
    aborted.__traceback__ = None
    aborted.__context__ = None


def _status_details(text: str) -> str:
    """``text`` cut in the middle to at most :data:`_MAX_DETAILS` bytes: a message naming
    something a client sent (a made-up volume name of 20,000 characters) keeps its start
    and end."""
    raw = text.encode()
    if len(raw) <= _MAX_DETAILS:
        return text
    half = _MAX_DETAILS // 2 - 2
    head = raw[:half].decode(errors="ignore")
    tail = raw[-half:].decode(errors="ignore")
    return f"{head}…{tail}"


async def refuse(
    context: grpc.aio.ServicerContext[Any, Any],
    code: grpc.StatusCode,
    exc: TierdiskError | OSError,
) -> None:
    """End the call with ``code``: a domain error's message and class name (trailer
    ``tierdisk-error``), or a storage failure that no layer turned into one (an
    ``OSError``; logged by the caller, :class:`~.failure_log.StorageFailureLog`).
    ``grpc_server_handled_total`` counts it first (:func:`~.rpc_metrics.count_status_now`):
    the caller may scrape as soon as it sees the status."""
    count_status_now(code)
    try:
        if isinstance(exc, TierdiskError):
            await context.abort(
                code,
                _status_details(str(exc)),
                trailing_metadata=((ERROR_HEADER, type(exc).__name__),),
            )
        await context.abort(code, _status_details(f"storage failure: {exc}"))
    except BaseException as aborted:  # grpc.aio's AbortError (or a cancel), raised on
        forget = as_done_callback(functools.partial(_forget_frames, aborted))
        # (grpc-stubs types the callback as a class of its own, no plain function fits)
        context.add_done_callback(forget)  # type: ignore[arg-type]
        raise


async def refuse_undecodable(
    context: grpc.aio.ServicerContext[Any, Any], request: Undecodable
) -> NoReturn:
    """End a call whose request could not be read: ``INVALID_ARGUMENT``."""
    invalid = InvalidArgument(request.problem)
    await refuse(context, status_for(invalid), invalid)
    raise AssertionError("not reached: abort() raises")
