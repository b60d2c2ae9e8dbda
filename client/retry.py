"""Retries with exponential backoff and full jitter, on ``UNAVAILABLE`` only, within a deadline.

``UNAVAILABLE`` is the one code DESIGN.md §2 calls safe to retry: the server (or a remote
layer behind it) could not be reached, so the request did not run — or, for a write, ran
with the same data at the same place, which a retry repeats harmlessly. Every other code is
final and raised at once as a :mod:`tierdisk.client.errors` exception.

gRPC's own retry machinery is switched off on our channels (``grpc.enable_retries = 0``) so
that exactly one policy applies.
"""

# ASYNC109: ``timeout`` is the deadline the retries share, handed to each gRPC attempt.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from .errors import DeadlineExceeded, error_from_rpc, status_code

__all__ = ["RetryPolicy", "call_with_retry"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``retries`` further attempts after the first; the wait before retry ``n`` (0-based) is
    uniform in ``[0, min(max_backoff, backoff * 2**n)]`` ("full jitter")."""

    retries: int = 3
    backoff: float = 0.05
    max_backoff: float = 2.0

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, not {self.retries}")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("backoff and max_backoff must be >= 0")

    def ceiling(self, attempt: int) -> float:
        """The longest wait before retry number ``attempt`` (0-based)."""
        # Cap the exponent so huge attempt numbers cannot overflow a float.
        return min(self.max_backoff, self.backoff * 2.0 ** min(attempt, 64))

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """The wait before retry number ``attempt`` (0-based): full jitter under the ceiling."""
        return rng() * self.ceiling(attempt)


async def call_with_retry(
    attempt: Callable[[float | None], Awaitable[T]],
    *,
    policy: RetryPolicy,
    timeout: float | None,
    volume: str | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rng: Callable[[], float] = random.random,
) -> T:
    """Run ``attempt(remaining_seconds)`` until it succeeds, fails with a code other than
    ``UNAVAILABLE``, runs out of retries, or the deadline ``timeout`` seconds from now would
    pass during the next wait. ``remaining_seconds`` (None = no deadline) is the time left
    for that attempt; pass it to gRPC as the call's timeout.

    gRPC errors are raised as :mod:`tierdisk.client.errors` exceptions naming ``volume``.
    """
    deadline = None if timeout is None else clock() + timeout
    retry = 0
    while True:
        remaining = None if deadline is None else deadline - clock()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded(
                f"deadline of {timeout:g} s passed before the call could be made",
                volume=volume,
            )
        try:
            return await attempt(remaining)
        except grpc.RpcError as err:
            if status_code(err) != grpc.StatusCode.UNAVAILABLE or retry >= policy.retries:
                raise error_from_rpc(err, volume=volume) from err
            wait = policy.delay(retry, rng)
            if deadline is not None and clock() + wait >= deadline:
                raise error_from_rpc(err, volume=volume) from err
            retry += 1
        await sleep(wait)
