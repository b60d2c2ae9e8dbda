"""The loop and depth guard between tiers.

Every call one tier makes to another carries ``tierdisk-hops`` metadata: the volumes the
request already passed through, each as ``SERVER_ID/VOLUME`` (:func:`hop_id`),
comma-separated, oldest first. A server asked for a volume that is already in the chain (a
loop, A/a → B/b → A/a), or given a chain of :data:`MAX_HOPS` or more, refuses the call with
:class:`~tierdisk.service.errors.TierLoop` (``FAILED_PRECONDITION``) naming the chain, instead of
recursing. A loop is a volume reached twice, not a server: A/a → B/b → A/base, or a volume
whose remote is another volume of its own server, are chains, not loops. The chain of the
request being served travels in a context variable, so a remote layer forwards it (plus
its own entry) without being passed it; a volume's attach and background calls start the
chain with the volume's own entry.

A loop can also form without any call chain: two servers whose volumes each wait at start
for the other's (A's volume is a remote of B's, B's a remote of A's) only ever answer each
other "not ready". So a volume that is still attaching records the volumes whose calls it
refused, with the volumes those were waiting for (their ``tierdisk-waiting``, so a cycle of
any length closes; :meth:`~tierdisk.service.registry.VolumeRegistry.refused`), and its
attach attempts carry them in ``tierdisk-waiting`` (:data:`waiting_for_me`; the ones
refused last, at most :data:`MAX_WAITING_BYTES` of them, so many callers during an outage
cannot make the header too large for gRPC and keep the volume from ever attaching). A server
asked for a volume that is itself still attaching, by a caller that is waiting for this
very volume, answers :class:`~tierdisk.service.errors.TierLoop`
(:func:`check_waiting`): each side waits for the other, so neither would ever be ready.
"""

from __future__ import annotations

import secrets
from contextvars import ContextVar

from .errors import TierLoop

__all__ = [
    "HOPS_HEADER",
    "MAX_HOPS",
    "MAX_WAITING_BYTES",
    "WAITING_HEADER",
    "caller_waiting",
    "check_chain",
    "check_waiting",
    "current_chain",
    "hop_id",
    "new_server_id",
    "outgoing",
    "waiting_for_me",
]

HOPS_HEADER = "tierdisk-hops"
WAITING_HEADER = "tierdisk-waiting"
MAX_HOPS = 8
MAX_WAITING_BYTES = 4096
"""The most a ``tierdisk-waiting`` header carries (gRPC refuses metadata over 16 KiB, and
its default soft limit is 8 KiB for all of a call's headers)."""

current_chain: ContextVar[tuple[str, ...]] = ContextVar("tierdisk_hops", default=())
"""The volumes (:func:`hop_id`) the request being served has passed through, this one last."""

server_identity: ContextVar[str] = ContextVar("tierdisk_server_id", default="")

caller_waiting: ContextVar[frozenset[str]] = ContextVar(
    "tierdisk_caller_waiting", default=frozenset()
)
"""The volumes (:func:`hop_id`) the caller of the request being served is waiting for (its
volume is attaching and they refused it): the request's ``tierdisk-waiting`` header."""

waiting_for_me: ContextVar[frozenset[str]] = ContextVar(
    "tierdisk_waiting_for_me", default=frozenset()
)
"""Set while a volume attaches: the volumes (:func:`hop_id`) whose calls it refused as not
ready yet; the remote layers' calls carry them in ``tierdisk-waiting``."""


def new_server_id(address: str) -> str:
    """A process-unique id that still reads well in messages: ``address~nonce``."""
    return f"{address}~{secrets.token_hex(3)}"


def hop_id(server_id: str, volume: str) -> str:
    """The chain entry of ``volume`` on the server ``server_id`` (the server alone for a
    call that names no volume). Volume names hold no ``/`` or ``,``."""
    return f"{server_id}/{volume}" if volume else server_id


def _shown(hop: str) -> str:
    """A chain entry as messages show it: the server's address, then ``/VOLUME``."""
    server, _, volume = hop.rpartition("/")
    if not server or "~" in volume:  # a server alone (its id ends in ``~nonce``)
        return hop.split("~")[0]
    return f"{server.split('~')[0]}/{volume}"


def _shown_chain(chain: tuple[str, ...]) -> str:
    return " → ".join(_shown(hop) for hop in chain)


def parse(header: str) -> tuple[str, ...]:
    """The chain in a ``tierdisk-hops`` header value."""
    return tuple(part for part in header.split(",") if part)


def check_chain(chain: tuple[str, ...], me: str) -> tuple[str, ...]:
    """The chain extended by ``me``; refuse a loop or a chain deeper than :data:`MAX_HOPS`."""
    path = (*chain, me)
    if me in chain:
        raise TierLoop(f"request loop between tiers: {_shown_chain(path)}")
    if len(path) > MAX_HOPS:
        raise TierLoop(f"tier chain deeper than {MAX_HOPS}: {_shown_chain(path)}")
    return path


def check_waiting(me: str, volume: str) -> None:
    """Refuse a call for ``volume`` (still attaching here; ``me`` is its :func:`hop_id`) from
    a caller that is waiting for it: the two wait for each other."""
    if me and me in caller_waiting.get():
        chain = current_chain.get()
        caller = chain[-2] if len(chain) >= 2 else "the caller"
        raise TierLoop(
            f"request loop between tiers: {_shown_chain((me, caller, me))} (volume {volume!r} "
            "here is attaching and waits, directly or through other tiers, for the caller's "
            "volume, which waits for it)"
        )


def outgoing() -> str:
    """The ``tierdisk-hops`` value for a call made while serving the current request."""
    chain = current_chain.get()
    if not chain and server_identity.get():
        chain = (server_identity.get(),)
    return ",".join(chain)
