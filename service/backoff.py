"""Exponential backoff with jitter: the waits between the retries of a background task.

Units: seconds, for every delay here (``first``, ``cap``, what :meth:`Backoff.next` returns).

One :class:`Backoff` per retry loop: call :meth:`~Backoff.next` before each wait for the
delay to wait, and :meth:`~Backoff.reset` when the retried thing worked (or the situation
changed), so the next failure starts again from ``first``.

Not the client library's :class:`tierdisk.client.retry.RetryPolicy`, on purpose: a caller's
retries are few and bounded, and its "full jitter" (a wait anywhere from 0) spreads many
callers best; a background loop here retries for as long as the server runs, and a wait
that never falls below half the delay keeps a down peer from being asked again at once.
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["Backoff"]


class Backoff:
    """Delays (seconds) that start at ``first`` and grow by ``factor`` after each
    :meth:`next`, up to ``cap``; each delay returned is jittered.

    ``jitter`` is the relative spread: :meth:`next` returns the current delay times a
    factor drawn uniformly from ``1 - jitter`` to ``1 + jitter``. The default, 0.5, gives
    ``delay * (0.5 + r)`` with ``r`` in ``[0, 1)``, so a jittered delay may pass ``cap`` by
    up to half of it. ``jitter=0`` gives the plain delays ``first, first * factor, …, cap``
    and draws no random number.

    ``rand`` returns floats in ``[0, 1)`` (default :func:`random.random`); tests pass a
    seeded one.
    """

    __slots__ = ("_delay", "_rand", "cap", "factor", "first", "jitter")

    def __init__(
        self,
        first: float,
        cap: float,
        factor: float = 2.0,
        *,
        jitter: float = 0.5,
        rand: Callable[[], float] | None = None,
    ) -> None:
        if first <= 0:
            raise ValueError(f"first must be positive, not {first}")
        if cap < first:
            raise ValueError(f"cap ({cap}) must not be less than first ({first})")
        if factor < 1:
            raise ValueError(f"factor must be at least 1, not {factor}")
        if not 0 <= jitter <= 1:
            raise ValueError(f"jitter must be from 0 to 1, not {jitter}")
        self.first = first
        self.cap = cap
        self.factor = factor
        self.jitter = jitter
        self._rand = random.random if rand is None else rand
        self._delay = first

    @property
    def delay(self) -> float:
        """The delay (seconds) the next :meth:`next` jitters, before jitter."""
        return self._delay

    def next(self) -> float:
        """The delay to wait now, in seconds (jittered); the delay after it grows."""
        delay = self._delay
        self._delay = min(delay * self.factor, self.cap)
        if not self.jitter:
            return delay
        return delay * (1.0 - self.jitter + 2.0 * self.jitter * self._rand())

    def reset(self) -> None:
        """Start again from ``first`` (the retried thing worked, or the situation changed)."""
        self._delay = self.first
