"""A server interceptor that records the standard ``grpc_server_*`` metrics.

Labels follow go-grpc-prometheus: ``grpc_type`` (unary, server_stream), ``grpc_service``
(``tierdisk.v1.BlockDevice``), ``grpc_method`` and, on ``grpc_server_handled_total``,
``grpc_code`` (the status code name).

The method handlers are static once the server runs, so each method's wrapped handler is
built once, on its first call, and reused: a call costs one dictionary look-up here plus the
counter updates.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from .metrics import Metrics

__all__ = ["MetricsInterceptor"]

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
        self._handled: dict[str, Any] = {}

    def handled(self, code: str, start: float) -> None:
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = self._metrics.grpc_handled.labels(*self._labels, code)
        child.inc()
        self.seconds.observe(time.perf_counter() - start)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts started and handled RPCs and times them."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = handler_call_details.method
        wrapped = self._handlers.get(method)
        if wrapped is not None:
            return wrapped
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return None
        wrapped = self._wrap(method, handler)
        self._handlers[method] = wrapped
        return wrapped

    def _wrap(self, method: str, handler: Any) -> grpc.RpcMethodHandler[Any, Any]:
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
            return cls._unary(behavior, m)

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
