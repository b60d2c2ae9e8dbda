"""Failed gRPC calls as the client library receives them, built without a server: for
unit tests of the error mapping and the retry policy."""

from __future__ import annotations

from typing import Any

import grpc
import grpc.aio

__all__ = ["rpc_error"]


def rpc_error(code: grpc.StatusCode, details: str = "", server_error: str | None = None) -> Any:
    """A ``grpc.aio.AioRpcError`` with ``code`` and ``details``, naming the server's domain
    error class ``server_error`` in the ``tierdisk-error`` trailer when given."""
    trailing = grpc.aio.Metadata()
    if server_error is not None:
        trailing.add("tierdisk-error", server_error)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details)
