"""A bound on the bytes of large ``Read`` replies each gRPC connection has in flight.

A client that sends many large Reads and never reads the replies would otherwise make the
server hold every reply in full (48 stalled 16 MiB reads took a server from 49 MiB to
1.4 GiB). gRPC keeps a reply until the client's flow control lets it out, and ends the call
only then, so a reply counts against its connection (``context.peer()``: one per channel
and address) from before its buffer is made until gRPC reports the call done
(``context.add_done_callback``). A Read that would take its connection past
:data:`READ_BUDGET_BYTES` waits until enough of them are done; one larger than the whole
budget waits until its connection has none in flight. Each reply is held twice until its
call ends (the server's buffer and gRPC's), so a client that stops reading pins about twice
the budget. Replies under :data:`BUDGETED_FROM_BYTES` are not counted, so the small-read
path pays nothing (counting every Read cost 4 KiB reads ~7% more server CPU: 536 against
499 µs a read, 10 alternating rounds): a client that stops reading pins its small Reads in
flight in full (a guest's queue depth of them, usually; a client that sends thousands more,
thousands). As the server stops (:meth:`ReplyBudgets.close`), the
Reads waiting for room are refused. The NBD export bounds a session alike.

Only TCP peers are budgeted: gRPC names every client of a unix socket alike (``unix:``),
so there one stalled client would hold up all the others; unix-socket clients, local
processes, are not bounded.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from .errors import SERVER_STOPPING, Unavailable

__all__ = ["BUDGETED_FROM_BYTES", "READ_BUDGET_BYTES", "ReplyBudgets"]

READ_BUDGET_BYTES = 64 << 20
"""Bytes of large Read replies one connection may have in flight."""

BUDGETED_FROM_BYTES = 64 << 10
"""Replies of this size and larger count against the budget (``context.peer()`` and a done
callback per read: nothing next to a 64 KiB reply, ~7% of a 4 KiB read's server CPU). It was
256 KiB: 8,000 stalled Reads of 255 KiB pinned ~2.2 GiB."""


_TCP_PEERS = ("ipv4:", "ipv6:")
"""How gRPC names a TCP peer: address and port, one connection each."""


def _nothing() -> None:
    pass


class _Budget:
    """One connection's bytes in flight and the Reads waiting for room, in arrival order."""

    __slots__ = ("used", "waiting")

    def __init__(self) -> None:
        self.used = 0
        self.waiting: deque[tuple[int, asyncio.Future[None]]] = deque()


class ReplyBudgets:
    """Per-connection budgets of :data:`READ_BUDGET_BYTES` (event-loop use only)."""

    def __init__(self, limit: int = READ_BUDGET_BYTES) -> None:
        self._limit = limit
        self._peers: dict[str, _Budget] = {}
        self._closed = False

    def close(self) -> None:
        """The server is stopping: every Read waiting for room, and any that would wait from
        now on, raises :class:`~.errors.Unavailable` (retry elsewhere or later). Such a
        Read has read nothing yet, and its client, which does not take the replies it has,
        would otherwise hold the stop's drain for all of its grace (and so cost every volume
        its write verifier: a stop that did not drain is not clean)."""
        self._closed = True
        for budget in self._peers.values():
            for _, turn in budget.waiting:
                if not turn.done():
                    turn.set_exception(Unavailable(SERVER_STOPPING))

    def in_flight(self, peer: str) -> int:
        """Bytes ``peer`` has in flight now."""
        budget = self._peers.get(peer)
        return budget.used if budget is not None else 0

    @property
    def connections(self) -> int:
        """Connections with replies in flight or waiting (no entry is kept for the others)."""
        return len(self._peers)

    async def take(self, peer: str, nbytes: int) -> Callable[[], None]:
        """Wait until ``peer`` has room for ``nbytes``, count them, and return the function
        that gives them back (call it exactly once). First come, first served: a Read does
        not overtake one waiting before it on the same connection. A peer that names no
        one connection (not ``ipv4:``/``ipv6:``) is not counted."""
        if not peer.startswith(_TCP_PEERS):
            return _nothing
        budget = self._peers.get(peer)
        if budget is None:
            budget = self._peers[peer] = _Budget()
        if budget.waiting or not self._fits(budget, nbytes):
            if self._closed:
                raise Unavailable(SERVER_STOPPING)
            turn = asyncio.get_running_loop().create_future()
            entry = (nbytes, turn)
            budget.waiting.append(entry)
            try:
                await turn
            except BaseException:
                if turn.done() and not turn.cancelled() and turn.exception() is None:
                    self._give(peer, budget, nbytes)  # granted as we were cancelled
                else:
                    if entry in budget.waiting:  # (a wake may have dropped it already)
                        budget.waiting.remove(entry)
                    self._wake(peer, budget)
                raise
        else:
            budget.used += nbytes
        return lambda: self._give(peer, budget, nbytes)

    def _fits(self, budget: _Budget, nbytes: int) -> bool:
        return budget.used == 0 or budget.used + nbytes <= self._limit

    def _give(self, peer: str, budget: _Budget, nbytes: int) -> None:
        budget.used -= nbytes
        self._wake(peer, budget)

    def _wake(self, peer: str, budget: _Budget) -> None:
        while budget.waiting and self._fits(budget, budget.waiting[0][0]):
            nbytes, turn = budget.waiting.popleft()
            if not turn.done():
                budget.used += nbytes
                turn.set_result(None)
        if not budget.used and not budget.waiting and self._peers.get(peer) is budget:
            del self._peers[peer]  # no entry per connection that came and went
