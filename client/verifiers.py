"""Write verifiers: a flush that cannot vouch for the writes it covers says so.

A server answers every ``Write`` and ``Unmap`` that is acknowledged but not yet durable with
its volume's *write verifier*, a non-zero 64-bit number, and every ``Flush`` with the verifier
current when the flush ended (``0``: a write durable for good when acknowledged, or a server
that predates verifiers). The verifier changes whenever writes the volume acknowledged
without making them durable may have been lost: at a start that does not follow a clean
stop (a crash, or a stop whose final flush failed), when a flush, a FUA write or a resize
fails in a layer's storage, and when a tier below the volume lost such writes. A clean stop
keeps it. So a flush answered
with another verifier than a write it covers was acknowledged with is no proof that the
write is durable: the client raises :class:`~tierdisk.client.errors.WritesLost` (this is
NFS's write verifier, per volume).

:class:`UnflushedWrites` keeps, for one volume of one client, which verifiers acknowledged
writes that no flush has vouched for yet: for each verifier, the numbers of the first and the
last such write (writes are numbered as they are acknowledged). It holds one entry per
verifier, so it stays small however many writes are made.
"""

from __future__ import annotations

__all__ = ["UnflushedWrites"]


class UnflushedWrites:
    """The writes of one volume acknowledged with a verifier and not yet vouched for by a
    flush. Flushes may overlap: each covers the writes acknowledged before it started
    (:meth:`mark`), and each reports a loss among those until one has reported it."""

    __slots__ = ("_count", "_spans")

    def __init__(self) -> None:
        self._count = 0
        self._spans: dict[int, list[int]] = {}  # verifier -> [first, last] write number

    def acknowledged(self, verifier: int) -> None:
        """A write or unmap was acknowledged with ``verifier`` (0: durable for good)."""
        if not verifier:
            return
        self._count += 1
        span = self._spans.get(verifier)
        if span is None:
            self._spans[verifier] = [self._count, self._count]
        else:
            span[1] = self._count

    def mark(self) -> int:
        """Where a flush starts: it covers the writes acknowledged up to here."""
        return self._count

    def flushed(self, mark: int, verifier: int, *, volatile: bool = False) -> list[int]:
        """A flush that started at ``mark`` succeeded, answered with ``verifier``. Returns the
        other verifiers that acknowledged writes it covers (those writes may be lost; empty:
        it vouches for them all), and forgets those writes: durable, or reported lost. A
        ``volatile`` volume's flush (it keeps nothing past a restart) vouches for nothing: it
        forgets only what it reports lost, so a restart is reported at the next flush after
        it. A ``verifier`` of 0 (a server without verifiers) vouches for nothing and forgets
        nothing."""
        if not verifier:
            return []
        lost = [v for v, (first, _) in self._spans.items() if first <= mark and v != verifier]
        self._forget(mark, lost if volatile else None)
        return lost

    def _forget(self, mark: int, only: list[int] | None = None) -> None:
        """Forget the writes acknowledged up to ``mark`` (a flush started there vouched for
        them, or reported them lost), of the verifiers ``only`` (None: all); later ones
        stay."""
        for v, span in list(self._spans.items()):
            if only is not None and v not in only:
                continue
            if span[1] <= mark:
                del self._spans[v]
            elif span[0] <= mark:
                span[0] = mark + 1

    def verifiers(self) -> list[int]:
        """The verifiers that acknowledged writes no flush has vouched for yet, oldest
        first."""
        return sorted(self._spans, key=lambda v: self._spans[v][0])

    def __len__(self) -> int:
        """How many verifiers have writes no flush has vouched for."""
        return len(self._spans)
