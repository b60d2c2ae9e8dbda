"""The loop and depth guard between tiers.

Every call one tier makes to another carries ``tierdisk-hops`` metadata: the ids of the
servers the request already passed through, comma-separated, oldest first. A server that
finds its own id in the chain (a loop, A → B → A), or a chain of :data:`MAX_HOPS` or more,
refuses the call with :class:`~tierdisk.service.errors.FailedPrecondition` naming the chain,
instead of recursing. The chain of the request being served travels in a context variable,
so a remote layer forwards it (plus its own server's id) without being passed it.

A loop can also form without any call chain: two servers whose volumes each wait at start
for the other's (A's volume is a remote of B's, B's a remote of A's) only ever answer each
other "not ready". So a volume that is still attaching records the servers whose calls it
refused (:meth:`~tierdisk.service.registry.VolumeRegistry.refused`), and its attach attempts
carry them in ``tierdisk-waiting`` (:data:`waiting_for_me`). A server asked for a volume that is
itself still attaching, by a caller that is waiting for this very server, answers
:class:`~tierdisk.service.errors.FailedPrecondition` (:func:`check_waiting`): each side waits
for the other, so neither would ever be ready.
"""

from __future__ import annotations

import secrets
from contextvars import ContextVar

from .errors import FailedPrecondition

__all__ = [
    "HOPS_HEADER",
    "MAX_HOPS",
    "WAITING_HEADER",
    "caller_waiting",
    "check_chain",
    "check_waiting",
    "current_chain",
    "new_server_id",
    "outgoing",
    "waiting_for_me",
]

HOPS_HEADER = "tierdisk-hops"
WAITING_HEADER = "tierdisk-waiting"
MAX_HOPS = 8

current_chain: ContextVar[tuple[str, ...]] = ContextVar("tierdisk_hops", default=())
"""Ids of the servers the request being served has passed through, this one last."""

server_identity: ContextVar[str] = ContextVar("tierdisk_server_id", default="")

caller_waiting: ContextVar[frozenset[str]] = ContextVar(
    "tierdisk_caller_waiting", default=frozenset()
)
"""Ids of the servers the caller of the request being served is waiting for (its volume is
attaching and they refused it): the request's ``tierdisk-waiting`` header."""

waiting_for_me: ContextVar[frozenset[str]] = ContextVar(
    "tierdisk_waiting_for_me", default=frozenset()
)
"""Set while a volume attaches: ids of the servers whose calls it refused as not ready yet;
the remote layers' calls carry them in ``tierdisk-waiting``."""


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


def check_waiting(me: str, volume: str) -> None:
    """Refuse a call for ``volume`` (still attaching here) from a caller that is waiting for
    this server (``me``): the two wait for each other."""
    if me and me in caller_waiting.get():
        chain = current_chain.get()
        caller = chain[-2] if len(chain) >= 2 else "the caller"
        shown = " → ".join(hop.split("~")[0] for hop in (me, caller, me))
        raise FailedPrecondition(
            f"request loop between tiers: {shown} (volume {volume!r} here waits for the "
            "caller's volume, which waits for it)"
        )


def outgoing() -> str:
    """The ``tierdisk-hops`` value for a call made while serving the current request."""
    chain = current_chain.get()
    if not chain and server_identity.get():
        chain = (server_identity.get(),)
    return ",".join(chain)
