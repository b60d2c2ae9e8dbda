"""Waiting in tests on observable state, never on a fixed delay.

    from waiting import eventually
    await eventually("the session to end", lambda: stats.sessions_active == 0)
    status = await eventually("the tier to serve", serving, retry_on=cerr.Unavailable)

A test that sleeps for "long enough" and then assumes something happened fails on a loaded
machine; one that polls for the state it needs, with a generous bound, does not, and still
fails (naming what did not happen) when the behaviour is wrong.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, TypeVar, overload

__all__ = ["eventually"]

T = TypeVar("T")
Errors: TypeAlias = type[BaseException] | tuple[type[BaseException], ...]


@overload
async def eventually(
    what: str,
    check: Callable[[], Awaitable[T | None]],
    seconds: float = ...,
    *,
    retry_on: Errors = ...,
    interval: float = ...,
) -> T: ...


@overload
async def eventually(
    what: str,
    check: Callable[[], T | None],
    seconds: float = ...,
    *,
    retry_on: Errors = ...,
    interval: float = ...,
) -> T: ...


async def eventually(
    what: str,
    check: Callable[[], Any],
    seconds: float = 15.0,
    *,
    retry_on: Errors = (),
    interval: float = 0.05,
) -> Any:
    """Call ``check`` (a function or a coroutine function) every ``interval`` seconds until
    it returns a true value, and return that value (so never None: a false value, None
    included, means "not yet"); raise :class:`AssertionError` naming ``what`` if it has not
    after ``seconds``.

    ``check`` runs at least once, however late. An exception of a class in ``retry_on``
    counts as "not yet" (the last one is named in the failure); any other propagates at
    once."""
    deadline = time.monotonic() + seconds
    last: BaseException | None = None
    while True:
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
        except retry_on as exc:
            last = exc
        if time.monotonic() >= deadline:
            because = f" (last error: {last!r})" if last is not None else ""
            raise AssertionError(f"{what} did not happen within {seconds} s{because}")
        await asyncio.sleep(interval)
