"""Volumes attaching in the background: their tier was down at start, so each is retried,
in a task of its own, with capped exponential backoff and jitter, until it is open or the
server stops (:class:`BackgroundAttaches`).

Whether an attach goes on is decided by who said no. Kept retrying: a tier that does not
answer (``Unavailable``, ``DeadlineExceeded``), and any other answer of a remote tier
(:func:`remote_answer`: the volume is not served there, its credentials are refused, it is
no tierdisk server, …), which may change without this server changing (an origin restarted
with the right config); the latter is logged at error level, at most every
:data:`_ATTACH_LOG_INTERVAL` seconds for the same reason. The hop guard's refusal (a loop,
e.g. two volumes waiting for each other) is such an answer too: a real loop is found again
at every attempt, but the claim it rests on (who waits for this volume, the
``tierdisk-waiting`` header of any caller) may be stale or forged, and a volume that gave up
on it would stay down until a restart after the claim was gone. Given up on, logged once:
problems of this server's own (a local layer that cannot be opened, a construction rule
broken once the remote's geometry is known). While it retries, the volume answers
``UNAVAILABLE`` naming the latest reason; once given up, ``FAILED_PRECONDITION`` (no retry
helps), and ``ListVolumes`` gives the reason as its ``problem``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator

from tierdisk.client import errors as client_errors

from . import hops
from .backoff import Backoff
from .config import VolumeConfig
from .errors import ConfigError, DeadlineExceeded, Unavailable
from .ratelimit import RateLimitedLog
from .registry import VolumeRegistry
from .volume import Volume

__all__ = ["BackgroundAttaches", "failure_chain", "remote_answer"]

_ATTACH_LOG_INTERVAL = 60.0
"""Seconds between error logs of a background attach refused for the same reason."""

_ATTACH_BACKOFF = (0.2, 10.0)
"""``(first, cap)`` in seconds: the waits before the attempts of a background attach
(:class:`~tierdisk.service.backoff.Backoff`, doubling, jittered to 0.5-1.5 times)."""


class BackgroundAttaches:
    """The background attaches of a server's volumes in ``registry``: each attempt opens a
    volume with ``build``; one opened is handed to ``serve``, then health is updated
    (``update_health``). ``stopped`` says whether the server stops (no more attempts; a
    volume opened meanwhile is closed). Logged through ``log``, the server's logger."""

    def __init__(
        self,
        registry: VolumeRegistry,
        *,
        build: Callable[[VolumeConfig], Awaitable[Volume]],
        serve: Callable[[Volume], Awaitable[None]],
        update_health: Callable[[], Awaitable[None]],
        stopped: Callable[[], bool],
        log: logging.Logger,
    ) -> None:
        self._registry = registry
        self._build = build
        self._serve = serve
        self._update_health = update_health
        self._stopped = stopped
        self._log = log
        self.tasks: list[asyncio.Task[None]] = []
        """The attach tasks, one per volume whose tier was down at start (done once it is
        open, given up on, or the server stops)."""

    def start(self, config: VolumeConfig) -> None:
        """Attach ``config`` in the background, in a task of its own (in a copy of the
        caller's context: the server's id, :data:`~.hops.server_identity`)."""
        self.tasks.append(asyncio.create_task(self._keep_attaching(config)))

    def cancel(self) -> None:
        """Cancel every attach under way (the server stops)."""
        for task in self.tasks:
            task.cancel()

    async def wait(self) -> None:
        """Wait for every attach task to end, whatever it ended with."""
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _keep_attaching(self, config: VolumeConfig) -> None:
        """Attach ``config`` until it is open, given up on, or the server stops (module
        docs)."""
        backoff = Backoff(*_ATTACH_BACKOFF)
        attach_log = RateLimitedLog(self._log, interval=_ATTACH_LOG_INTERVAL)
        while not self._stopped():
            await asyncio.sleep(backoff.next())
            # Tell the tiers below who waits for this volume, so that two volumes waiting
            # for each other are found (hops module docs).
            hops.waiting_for_me.set(self._registry.refused(config.name))
            try:
                volume = await self._build(config)
            except (Unavailable, DeadlineExceeded) as exc:
                self._registry.set_waiting(config.name, f"a remote tier is not reachable ({exc})")
                attach_log.warning(
                    "volume %r: still waiting for its remote tier: %s; retrying in the background",
                    config.name,
                    exc,
                    key="unreachable",  # at most one line a minute, whatever the details
                )
                continue
            except ConfigError as exc:
                answer = remote_answer(exc)
                if answer is None:
                    self._registry.give_up(config.name, str(exc))
                    attach_log.error(  # with the count of waiting lines held back, told now
                        "volume %r cannot be opened: %s; not retrying (restart the server "
                        "once this is fixed)",
                        config.name,
                        exc,
                        key="given up",
                    )
                    return
                self._registry.set_waiting(
                    config.name, f"its remote tier refuses it for now ({exc}); retrying"
                )
                attach_log.error(
                    "volume %r cannot be opened yet: %s; retrying in the background",
                    config.name,
                    exc,
                    key=str(exc),  # a new reason is logged at once
                )
                continue
            if self._stopped():
                await volume.close()
                return
            await self._serve(volume)
            attach_log.ended("volume %r attached", config.name)  # (with what it held back)
            await self._update_health()
            return


def failure_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then the exception it was raised from or while handling (``__cause__``,
    else ``__context__``: also when ``raise … from None`` hid it from tracebacks), and so
    on: what a failure to open a volume comes from (a layer's error wrapped in a
    :class:`ConfigError` by :meth:`Volume.open`, a remote's answer under that)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def remote_answer(exc: BaseException) -> client_errors.TierdiskError | None:
    """The error a remote tier answered that ``exc`` (a failed open) comes from, or None
    when it comes from this server itself (its config, its own layers' files)."""
    for cause in failure_chain(exc):
        if isinstance(cause, client_errors.TierdiskError):
            return cause
    return None
