"""The standard ``grpc_server_*`` metrics, recorded by wrapping each method handler once,
when it is registered.

Families and labels follow go-grpc-prometheus: ``grpc_server_started_total``,
``grpc_server_handled_total`` (plus ``grpc_code``, the status code name),
``grpc_server_handling_seconds``, ``grpc_server_msg_received_total`` (one per request
message: 1 per unary or server-streaming call, one per message of a client stream) and
``grpc_server_msg_sent_total`` (one per response message: 1 per unary or client-streaming
call that completed OK, one per message of a server stream), all labelled ``grpc_type``
(unary, client_stream, server_stream, bidi_stream), ``grpc_service``
(``tierdisk.v1.BlockDevice``) and ``grpc_method``.

Services register on an :class:`InstrumentedRegistry` instead of the server itself; it wraps
every handler (metrics around the behaviour) and passes it on. A ``grpc.aio`` server
interceptor would do the same per call, but costs a coroutine chain and a handler look-up on
every RPC; here a call pays one wrapper coroutine and the counter updates on label children
bound once per method (bench/README.md, change 6). Calls to methods no service registered are
not counted (as with an interceptor, which never sees a handler for them).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from typing import Any

import grpc

from .loop_metrics import CounterCell
from .metrics import Metrics

__all__ = ["InstrumentedRegistry", "count_status_now"]

_OK = grpc.StatusCode.OK.name
_CANCELLED = grpc.StatusCode.CANCELLED.name
_UNKNOWN = grpc.StatusCode.UNKNOWN.name
_CODE_NAMES: dict[Any, str] = {}
for _status in grpc.StatusCode:
    _CODE_NAMES[_status] = _status.name
    _CODE_NAMES[_status.value[0]] = _status.name  # some grpcio versions hand back the integer


def _code_of(context: Any, default: str) -> str:
    code = context.code()
    if code is None:
        return default
    name = _CODE_NAMES.get(code)
    return name if name is not None else str(code)


_CALL: ContextVar[list[Any] | None] = ContextVar("tierdisk_unary_call", default=None)
"""The unary call the running task serves: ``[its _MethodMetrics, start, counted]``."""


def count_status_now(code: grpc.StatusCode) -> None:
    """Count the running unary call as ended with ``code`` now, before
    ``context.abort()`` sends the status: a caller that sees it and then scrapes
    ``/metrics`` finds it counted (the wrapper's own count comes after the status is sent).
    The wrapper then counts nothing more. Outside a wrapped unary call, nothing."""
    call = _CALL.get()
    if call is not None and not call[2]:
        call[2] = True
        call[0].handled(_CODE_NAMES[code], call[1])


_NOT_COUNTED = CounterCell()
"""A cell no family exposes: what a wrapper counts into where the count is kept elsewhere (the
requests of a client stream, the reply of a streaming handler that writes), so the wrappers
stay branch-free."""

# Handler attribute -> grpc_type label, by (request streaming, response streaming).
_KINDS = (
    ("unary_unary", "unary"),
    ("unary_stream", "server_stream"),
    ("stream_unary", "client_stream"),
    ("stream_stream", "bidi_stream"),
)


class _MethodMetrics:
    """The label children of one method, bound once when its handler is wrapped."""

    def __init__(self, metrics: Metrics, grpc_type: str, service: str, method: str) -> None:
        labels = (grpc_type, service, method)
        self._labels = labels
        self._metrics = metrics
        self.started = metrics.grpc_started.labels(*labels)
        self.seconds = metrics.grpc_seconds.labels(*labels)
        self.received = metrics.grpc_msg_received.labels(*labels)
        self.sent = metrics.grpc_msg_sent.labels(*labels)
        self._handled: dict[str, CounterCell] = {}

    def handled(self, code: str, start: float) -> None:
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = self._metrics.grpc_handled.labels(*self._labels, code)
        child.inc()
        self.seconds.observe(time.perf_counter() - start)


class InstrumentedRegistry:
    """Where services register their handlers (as on a ``grpc.aio.Server``): each handler
    is wrapped with the metrics of its method and registered on ``server``."""

    def __init__(self, server: grpc.aio.Server, metrics: Metrics) -> None:
        self._server = server
        self._metrics = metrics
        self._wrapped: dict[str, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        """Register ``handlers`` (method name -> handler) of ``service``, instrumented."""
        self._server.add_registered_method_handlers(
            service, {name: self._wrap(f"/{service}/{name}", h) for name, h in handlers.items()}
        )

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        """Register generic handlers; whatever handler they resolve is instrumented."""
        self._server.add_generic_rpc_handlers(
            tuple(_InstrumentedGeneric(h, self._wrap) for h in handlers)
        )

    def _wrap(self, method: str, handler: Any) -> grpc.RpcMethodHandler[Any, Any]:
        """``handler`` of ``method`` with metrics around it (the same wrapper each time the
        same handler is registered again, e.g. as registered and as generic)."""
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._instrument(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _instrument(self, method: str, handler: Any) -> grpc.RpcMethodHandler[Any, Any]:
        service, _, name = method.lstrip("/").partition("/")
        for attribute, grpc_type in _KINDS:
            behavior = getattr(handler, attribute)
            if behavior is None:
                continue
            m = _MethodMetrics(self._metrics, grpc_type, service, name)
            received = m.received
            if handler.request_streaming:  # counted per message instead of per call
                behavior = _count_requests(behavior, received)
                received = _NOT_COUNTED
            if handler.response_streaming:
                wrapped = self._stream(behavior, m, received)
            else:
                wrapped = self._unary(behavior, m, received, m.sent)
            return handler._replace(**{attribute: wrapped})  # type: ignore[no-any-return]
        return handler  # type: ignore[no-any-return]

    @staticmethod
    def _unary(
        behavior: Callable[[Any, Any], Awaitable[Any]],
        m: _MethodMetrics,
        received: CounterCell,
        reply: CounterCell,
    ) -> Callable[[Any, Any], Awaitable[Any]]:
        """A handler that returns (its reply, counted in ``reply`` when the call ends OK)."""
        started = m.started
        perf_counter = time.perf_counter

        async def wrapped(request: Any, context: Any) -> Any:
            started.inc()
            received.inc()
            start = perf_counter()
            code = _OK
            call = [m, start, False]  # count_status_now marks it counted
            token = _CALL.set(call)
            try:
                return await behavior(request, context)
            except asyncio.CancelledError:
                code = _CANCELLED
                raise
            except BaseException:
                code = _UNKNOWN
                raise
            finally:
                _CALL.reset(token)
                code = _code_of(context, code)
                if code == _OK:
                    reply.inc()
                if not call[2]:
                    m.handled(code, start)

        return wrapped

    @classmethod
    def _stream(
        cls, behavior: Callable[[Any, Any], Any], m: _MethodMetrics, received: CounterCell
    ) -> Callable[[Any, Any], Any]:
        """A handler that streams its replies, each counted in ``m.sent``."""
        if not inspect.isasyncgenfunction(behavior):
            # A streaming handler that writes with context.write() and returns.
            async def counting(request: Any, context: Any) -> Any:
                return await behavior(request, _CountingContext(context, sent=m.sent))

            return cls._unary(counting, m, received, _NOT_COUNTED)

        async def wrapped(request: Any, context: Any) -> AsyncIterator[Any]:
            m.started.inc()
            received.inc()
            start = time.perf_counter()
            code = _OK
            try:
                async for message in behavior(request, context):
                    m.sent.inc()
                    yield message
            except (asyncio.CancelledError, GeneratorExit):
                code = _CANCELLED
                raise
            except BaseException:
                code = _UNKNOWN
                raise
            finally:
                m.handled(_code_of(context, code), start)

        return wrapped


def _count_requests(behavior: Callable[[Any, Any], Any], received: CounterCell) -> Any:
    """``behavior`` of a client-streaming method with each request message counted in
    ``received``, whether it iterates its requests or calls ``context.read()``; an async
    generator function stays one (grpc.aio and :meth:`InstrumentedRegistry._stream` tell
    the two kinds of handler apart by that)."""
    if inspect.isasyncgenfunction(behavior):

        async def replies(requests: Any, context: Any) -> AsyncIterator[Any]:
            counting = _CountingContext(context, received=received)
            async for message in behavior(_counted(requests, received), counting):
                yield message

        return replies

    async def reply(requests: Any, context: Any) -> Any:
        counting = _CountingContext(context, received=received)
        return await behavior(_counted(requests, received), counting)

    return reply


async def _counted(requests: AsyncIterator[Any], received: CounterCell) -> AsyncIterator[Any]:
    """``requests``, each counted in ``received`` as it arrives."""
    async for request in requests:
        received.inc()
        yield request


class _CountingContext:
    """A servicer context whose ``write()`` also counts the message sent and whose
    ``read()`` the message received."""

    def __init__(
        self,
        context: Any,
        *,
        sent: CounterCell = _NOT_COUNTED,
        received: CounterCell = _NOT_COUNTED,
    ) -> None:
        self._context = context
        self._sent = sent
        self._received = received

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self._sent.inc()

    async def read(self) -> Any:
        message = await self._context.read()
        if message is not grpc.aio.EOF:
            self._received.inc()
        return message

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class _InstrumentedGeneric(grpc.GenericRpcHandler):
    """A generic handler whose resolved handlers are instrumented (each wrapped once). Only
    the methods it serves are remembered: a method name any caller may make up (gRPC asks
    every registered handler about it) is answered None each time, never kept (60,000
    made-up names grew the server by 250 MiB, for good)."""

    def __init__(
        self,
        inner: grpc.GenericRpcHandler,
        wrap: Callable[[str, Any], grpc.RpcMethodHandler[Any, Any]],
    ) -> None:
        self._inner = inner
        self._wrap = wrap
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:  # not ours (another handler's, or made up): not kept
                return None
            wrapped = self._wrapped[method] = self._wrap(method, handler)
        return wrapped
