"""The servicer's methods registered on a gRPC server (:func:`add_to_server`), each with
the request deserializer of its method.

Like the generated ``add_BlockDeviceServicer_to_server``, except for the hot paths: ``Read``
and ``ReadBatch`` are served by methods whose reply is already in wire format and is sent
without a serializer, ``Write`` by one whose request is read without copying its data
(:func:`~.write_request.parse_write`). Request bytes that are not the method's message are
answered ``INVALID_ARGUMENT`` (:class:`~.request_decoding.Undecodable`), not gRPC's
``UNKNOWN``: the three methods above check for it themselves (no wrapper on the hot path),
every other method is wrapped to.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Protocol

import grpc

from tierdisk.v1 import blockdevice_pb2 as pb

from .grpc_api import BlockDeviceService
from .grpc_refusal import refuse_undecodable
from .request_decoding import Undecodable, decoder, parse_read_batch
from .write_request import parse_write

__all__ = ["HandlerRegistry", "add_to_server"]


class HandlerRegistry(Protocol):
    """Where handlers are registered: a ``grpc.aio.Server``, or a wrapper of one."""

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None: ...

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None: ...


def _refusing_undecodable(
    behavior: Callable[[Any, Any], Awaitable[Any]],
) -> Callable[[Any, Any], Awaitable[Any]]:
    """``behavior`` (a unary handler), answering an :class:`Undecodable` request
    ``INVALID_ARGUMENT`` instead."""

    async def handler(request: Any, context: Any) -> Any:
        if isinstance(request, Undecodable):
            await refuse_undecodable(context, request)
        return await behavior(request, context)

    return handler


def _refusing_undecodable_stream(
    behavior: Callable[[Any, Any], AsyncIterator[Any]],
) -> Callable[[Any, Any], AsyncIterator[Any]]:
    """The same for a server-streaming handler (an async generator)."""

    async def handler(request: Any, context: Any) -> AsyncIterator[Any]:
        if isinstance(request, Undecodable):
            await refuse_undecodable(context, request)
        async for message in behavior(request, context):
            yield message

    return handler


def add_to_server(service: BlockDeviceService, server: HandlerRegistry) -> None:
    """Register ``service`` on ``server``, like the generated
    ``add_BlockDeviceServicer_to_server``, except that ``Read`` is served by
    :meth:`BlockDeviceService.read_encoded`, whose reply is already in wire format and is
    sent without a serializer (one copy of the data instead of four), and ``Write`` by
    :meth:`BlockDeviceService.write_parsed`, whose request is read without copying its data
    (:func:`~.write_request.parse_write`). Request bytes that are not the method's message
    are answered ``INVALID_ARGUMENT`` (:class:`Undecodable`), not gRPC's ``UNKNOWN``."""
    descriptor = pb.DESCRIPTOR.services_by_name["BlockDevice"]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in descriptor.methods:
        request = getattr(pb, method.input_type.name)
        reply = getattr(pb, method.output_type.name)
        if method.name == "Read":  # checks for Undecodable itself: no wrapper on the hot path
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                service.read_encoded,
                request_deserializer=decoder(method.input_type.name, request.FromString),
            )
        elif method.name == "ReadBatch":  # checks for Undecodable itself, as Read does
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                service.read_batch_encoded,
                request_deserializer=decoder(method.input_type.name, parse_read_batch),
            )
        elif method.name == "Write":  # checks for Undecodable itself, as Read does
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                service.write_parsed,
                request_deserializer=decoder(method.input_type.name, parse_write),
                response_serializer=reply.SerializeToString,
            )
        elif method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _refusing_undecodable_stream(getattr(service, method.name)),
                request_deserializer=decoder(method.input_type.name, request.FromString),
                response_serializer=reply.SerializeToString,
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _refusing_undecodable(getattr(service, method.name)),
                request_deserializer=decoder(method.input_type.name, request.FromString),
                response_serializer=reply.SerializeToString,
            )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(descriptor.full_name, handlers),)
    )
    server.add_registered_method_handlers(descriptor.full_name, handlers)
