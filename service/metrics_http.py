"""A minimal asyncio HTTP endpoint serving ``GET /metrics`` from one registry.

It runs on the server's event loop, so collectors read engine counters on the thread that
changes them. Anything but ``GET`` or ``HEAD`` of ``/metrics`` (and ``/``) gets 404; one
request per connection.
"""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .netaddr import SocketFile, bind_tcp_or_unix

__all__ = ["MetricsEndpoint"]


class MetricsEndpoint:
    """Serves ``registry`` on ``address`` ("HOST:PORT", port 0 picks one)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._server: asyncio.Server | None = None
        self._socket_file: SocketFile | None = None
        self.address = ""

    async def start(self, address: str) -> None:
        self._server, self.address, self._socket_file = await bind_tcp_or_unix(
            address, self._handle, "metrics"
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._socket_file is not None:
            self._socket_file.remove()
            self._socket_file = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):  # not wait_for: see nbd_session._handshake
                request = await reader.readuntil(b"\r\n\r\n")
            method, path, *_ = request.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            path = path.split("?", 1)[0]
            if method in ("GET", "HEAD") and path in ("/metrics", "/"):
                body = generate_latest(self._registry)
                status, ctype = "200 OK", CONTENT_TYPE_LATEST
            else:
                body, status, ctype = b"not found: try /metrics\n", "404 Not Found", "text/plain"
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.writelines([head.encode(), b"" if method == "HEAD" else body])
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            pass
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
