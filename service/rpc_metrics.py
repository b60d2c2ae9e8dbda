"""The standard ``grpc_server_*`` metrics, recorded by wrapping each method handler once,
when it is registered.

Labels follow go-grpc-prometheus: ``grpc_type`` (unary, server_stream), ``grpc_service``
(``tierdisk.v1.BlockDevice``), ``grpc_method`` and, on ``grpc_server_handled_total``,
``grpc_code`` (the status code name).

Services register on an :class:`InstrumentedRegistry` instead of the server itself; it wraps
every handler (metrics around the behaviour) and passes it on. A ``grpc.aio`` server
interceptor would do the same per call, but costs a coroutine chain and a handler look-up on
every RPC; here a call pays one wrapper coroutine and the counter updates (bench/README.md,
change 6). Calls to methods no service registered are not counted (as with an
interceptor, which never sees a handler for them).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

import grpc

from .loop_metrics import CounterCell
from .metrics import Metrics

__all__ = ["InstrumentedRegistry"]

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


class _MethodMetrics:
    def __init__(self, metrics: Metrics, grpc_type: str, service: str, method: str) -> None:
        labels = (grpc_type, service, method)
        self._labels = labels
        self._metrics = metrics
        self.started = metrics.grpc_started.labels(*labels)
        self.seconds = metrics.grpc_seconds.labels(*labels)
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
        if handler.unary_unary is not None:
            m = _MethodMetrics(self._metrics, "unary", service, name)
            return handler._replace(  # type: ignore[no-any-return]
                unary_unary=self._unary(handler.unary_unary, m)
            )
        if handler.unary_stream is not None:
            m = _MethodMetrics(self._metrics, "server_stream", service, name)
            return handler._replace(  # type: ignore[no-any-return]
                unary_stream=self._stream(handler.unary_stream, m)
            )
        return handler  # type: ignore[no-any-return]

    @staticmethod
    def _unary(
        behavior: Callable[[Any, Any], Awaitable[Any]], m: _MethodMetrics
    ) -> Callable[[Any, Any], Awaitable[Any]]:
        started = m.started
        perf_counter = time.perf_counter

        async def wrapped(request: Any, context: Any) -> Any:
            started.inc()
            start = perf_counter()
            code = _OK
            try:
                return await behavior(request, context)
            except asyncio.CancelledError:
                code = _CANCELLED
                raise
            except BaseException:
                code = _UNKNOWN
                raise
            finally:
                m.handled(_code_of(context, code), start)

        return wrapped

    @classmethod
    def _stream(
        cls, behavior: Callable[[Any, Any], Any], m: _MethodMetrics
    ) -> Callable[[Any, Any], Any]:
        if not inspect.isasyncgenfunction(behavior):
            # A streaming handler that writes with context.write() and returns.
            async def counting(request: Any, context: Any) -> Any:
                return await behavior(request, _CountingContext(context, m.sent))

            return cls._unary(counting, m)

        async def wrapped(request: Any, context: Any) -> AsyncIterator[Any]:
            m.started.inc()
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


class _CountingContext:
    """A servicer context whose ``write()`` also counts the message sent."""

    def __init__(self, context: Any, sent: CounterCell) -> None:
        self._context = context
        self._sent = sent

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self._sent.inc()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class _InstrumentedGeneric(grpc.GenericRpcHandler):
    """A generic handler whose resolved handlers are instrumented (each wrapped once)."""

    def __init__(
        self,
        inner: grpc.GenericRpcHandler,
        wrap: Callable[[str, Any], grpc.RpcMethodHandler[Any, Any]],
    ) -> None:
        self._inner = inner
        self._wrap = wrap
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any] | None] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = handler_call_details.method
        if method in self._wrapped:
            return self._wrapped[method]
        handler = self._inner.service(handler_call_details)
        wrapped = None if handler is None else self._wrap(method, handler)
        self._wrapped[method] = wrapped
        return wrapped
