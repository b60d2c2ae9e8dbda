"""The volumes a server serves, by name, including ones still attaching.

Front ends (gRPC, NBD) look volumes up here; a volume whose layers are still attaching (a
remote tier that has not answered yet) answers :class:`Unavailable` until it is ready.
"""

from __future__ import annotations

from . import hops
from .errors import FailedPrecondition, Unavailable, VolumeNotFound
from .volume import Volume

__all__ = ["VolumeRegistry"]

_REMEMBERED = 512
"""Refused callers kept per attaching volume (the latest; each id is ~30-200 bytes)."""


class VolumeRegistry:
    """Name → volume, in config order; knows which configured volumes are not ready yet."""

    def __init__(self, names: list[str]) -> None:
        self._order = list(names)
        self._ready: dict[str, Volume] = {}
        self._waiting: dict[str, str] = {name: "attaching" for name in names}
        self._given_up: dict[str, str] = {}  # waiting volumes the server stopped opening: why
        # volume -> ids refused while it attaches, oldest first (a dict kept in call order)
        self._refused: dict[str, dict[str, None]] = {}

    def names(self) -> list[str]:
        """Every configured volume name, in config order."""
        return list(self._order)

    def get(self, name: str) -> Volume:
        """The ready volume ``name``; :class:`VolumeNotFound` or :class:`Unavailable`."""
        volume = self._ready.get(name)
        if volume is not None:
            return volume
        if name in self._given_up:
            raise FailedPrecondition(
                f"volume {name!r} cannot be opened: {self._given_up[name]}; the server stopped "
                "trying (restart it once this is fixed)"
            )
        if name in self._waiting:
            chain = hops.current_chain.get()  # (..., the caller, this volume) over gRPC
            if chain:
                # The caller waits for this volume, and so does whoever waits for it: passed
                # on, a cycle of any length comes back to a volume that finds itself here.
                refused = self._refused.setdefault(name, {})
                for hop in (*chain[:-1], *hops.caller_waiting.get()):
                    refused.pop(hop, None)
                    refused[hop] = None  # now the latest
                for hop in list(refused)[: max(0, len(refused) - _REMEMBERED)]:
                    del refused[hop]
                hops.check_waiting(chain[-1], name)
            raise Unavailable(f"volume {name!r} is not ready yet: {self._waiting[name]}")
        raise VolumeNotFound(f"no volume named {name!r} on this server")

    def refused(self, name: str) -> frozenset[str]:
        """Ids of the servers whose calls for ``name`` were refused while it attached (see
        :mod:`tierdisk.service.hops`: they wait for it): the latest ones, as many as a
        ``tierdisk-waiting`` header of :data:`~.hops.MAX_WAITING_BYTES` carries."""
        kept: list[str] = []
        size = 0
        for hop in reversed(self._refused.get(name, {})):
            size += len(hop.encode()) + 1  # and a comma
            if size > hops.MAX_WAITING_BYTES:
                break
            kept.append(hop)
        return frozenset(kept)

    def ready_volumes(self) -> list[Volume]:
        """The volumes that are ready, in config order."""
        return [self._ready[n] for n in self._order if n in self._ready]

    @property
    def all_ready(self) -> bool:
        """True when every configured volume is open and none has a :attr:`Volume.problem`."""
        return not self._waiting and not any(v.problem for v in self._ready.values())

    def set_waiting(self, name: str, reason: str) -> None:
        """Record why ``name`` is not ready yet (shown in ``Unavailable`` messages)."""
        self._waiting[name] = reason

    def give_up(self, name: str, reason: str) -> None:
        """Record that the server stopped trying to open ``name`` (a problem of its own
        that only a restart with a fixed config or files can mend): its calls are refused
        with :class:`FailedPrecondition` naming ``reason`` (no retry helps), and
        :meth:`problem` says it."""
        self._waiting[name] = reason
        self._given_up[name] = reason

    def problem(self, name: str) -> str:
        """Why the server stopped trying to open the configured volume ``name``; "" while it
        is open or still being opened."""
        return self._given_up.get(name, "")

    def set_ready(self, volume: Volume) -> None:
        """Mark ``volume`` open and serving."""
        self._waiting.pop(volume.name, None)
        self._refused.pop(volume.name, None)
        self._ready[volume.name] = volume
