"""A server interceptor that records the standard ``grpc_server_*`` metrics.

Labels follow go-grpc-prometheus: ``grpc_type`` (unary, server_stream), ``grpc_service``
(``tierdisk.v1.BlockDevice``), ``grpc_method`` and, on ``grpc_server_handled_total``,
``grpc_code`` (the status code name). Label children are cached per method so a call costs a
few dictionary look-ups.
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


def _code_of(context: Any, default: grpc.StatusCode) -> str:
    code = context.code()
    if code is None:
        return default.name
    if isinstance(code, grpc.StatusCode):
        return code.name
    for status in grpc.StatusCode:  # some grpcio versions hand back the integer
        if status.value[0] == code:
            return status.name
    return str(code)


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
        self._per_method: dict[str, _MethodMetrics] = {}

    def _for(self, full_method: str, grpc_type: str) -> _MethodMetrics:
        found = self._per_method.get(full_method)
        if found is None:
            service, _, method = full_method.lstrip("/").partition("/")
            found = _MethodMetrics(self._metrics, grpc_type, service, method)
            self._per_method[full_method] = found
        return found

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        if handler.unary_unary is not None:
            return handler._replace(  # type: ignore[no-any-return]
                unary_unary=self._unary(handler.unary_unary, self._for(method, "unary"))
            )
        if handler.unary_stream is not None:
            return handler._replace(  # type: ignore[no-any-return]
                unary_stream=self._stream(handler.unary_stream, self._for(method, "server_stream"))
            )
        return handler  # type: ignore[no-any-return]

    @staticmethod
    def _unary(
        behavior: Callable[[Any, Any], Awaitable[Any]], m: _MethodMetrics
    ) -> Callable[[Any, Any], Awaitable[Any]]:
        async def wrapped(request: Any, context: Any) -> Any:
            m.started.inc()
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                return await behavior(request, context)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except BaseException:
                code = grpc.StatusCode.UNKNOWN
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
            code = grpc.StatusCode.OK
            try:
                async for message in behavior(request, context):
                    m.sent.inc()
                    yield message
            except (asyncio.CancelledError, GeneratorExit):
                code = grpc.StatusCode.CANCELLED
                raise
            except BaseException:
                code = grpc.StatusCode.UNKNOWN
                raise
            finally:
                m.handled(_code_of(context, code), start)

        return wrapped
