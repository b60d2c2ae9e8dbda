"""Parsing and exclusive binding of listen addresses: ``HOST:PORT``, ``[v6]:PORT``, ``unix:PATH``.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable

__all__ = ["AddressInUse", "bind_tcp_or_unix", "claim_unix_path", "split_host_port"]

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class AddressInUse(OSError):
    """The address is taken by another process; the message names it."""


def split_host_port(address: str) -> tuple[str, int]:
    """``("127.0.0.1", 7400)`` from ``"127.0.0.1:7400"`` (``[::1]:7400`` for IPv6)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is not HOST:PORT or unix:/path")
    return host.strip("[]") or "0.0.0.0", int(port)


def claim_unix_path(path: str, what: str) -> None:
    """Refuse a unix socket path another process is listening on; remove a stale one."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: a leftover of a crashed server
        return
    finally:
        probe.close()
    raise AddressInUse(f"{what} address unix:{path} is in use by another process")


async def bind_tcp_or_unix(address: str, handler: Handler, what: str) -> tuple[asyncio.Server, str]:
    """Start an asyncio server on ``address`` without SO_REUSEPORT; return it and the bound
    address (the real port when 0 was asked for)."""
    if address.startswith("unix:"):
        path = address[5:]
        claim_unix_path(path, what)
        server = await asyncio.start_unix_server(handler, path)
        return server, address
    host, port = split_host_port(address)
    try:
        server = await asyncio.start_server(handler, host, port, reuse_port=False)
    except OSError as exc:
        raise AddressInUse(f"cannot bind {what} address {address}: {exc.strerror}") from None
    sockname = server.sockets[0].getsockname()
    bound_host = f"[{sockname[0]}]" if ":" in sockname[0] else sockname[0]
    return server, f"{bound_host}:{sockname[1]}"
