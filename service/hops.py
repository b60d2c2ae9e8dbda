"""The loop and depth guard between tiers.

Every call one tier makes to another carries ``tierdisk-hops`` metadata: the ids of the
servers the request already passed through, comma-separated, oldest first. A server that
finds its own id in the chain (a loop, A → B → A), or a chain of :data:`MAX_HOPS` or more,
refuses the call with :class:`~tierdisk.service.errors.FailedPrecondition` naming the chain,
instead of recursing. The chain of the request being served travels in a context variable,
so a remote layer forwards it (plus its own server's id) without being passed it.
"""

from __future__ import annotations

import secrets
from contextvars import ContextVar

from .errors import FailedPrecondition

__all__ = ["HOPS_HEADER", "MAX_HOPS", "check_chain", "current_chain", "new_server_id", "outgoing"]

HOPS_HEADER = "tierdisk-hops"
MAX_HOPS = 8

current_chain: ContextVar[tuple[str, ...]] = ContextVar("tierdisk_hops", default=())
"""Ids of the servers the request being served has passed through, this one last."""

server_identity: ContextVar[str] = ContextVar("tierdisk_server_id", default="")


def new_server_id(address: str) -> str:
    """A process-unique id that still reads well in messages: ``address~nonce``."""
    return f"{address}~{secrets.token_hex(3)}"


def parse(header: str) -> tuple[str, ...]:
    """The chain in a ``tierdisk-hops`` header value."""
    return tuple(part for part in header.split(",") if part)


def check_chain(chain: tuple[str, ...], me: str) -> tuple[str, ...]:
    """The chain extended by ``me``; refuse a loop or a chain deeper than :data:`MAX_HOPS`."""
    path = (*chain, me)
    shown = " → ".join(hop.split("~")[0] for hop in path)
    if me in chain:
        raise FailedPrecondition(f"request loop between tiers: {shown}")
    if len(path) > MAX_HOPS:
        raise FailedPrecondition(f"tier chain deeper than {MAX_HOPS}: {shown}")
    return path


def outgoing() -> str:
    """The ``tierdisk-hops`` value for a call made while serving the current request."""
    chain = current_chain.get()
    if not chain and server_identity.get():
        chain = (server_identity.get(),)
    return ",".join(chain)
