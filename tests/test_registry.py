"""The volume registry: lookups of volumes still attaching, and whom they refused.

A volume that attaches remembers the callers it refused (and whom they wait for), and its
attach attempts tell the next tier in ``tierdisk-waiting`` (tierdisk.service.hops). Any
number of callers may be refused during an outage; what it remembers and sends is bounded.
"""

from __future__ import annotations

import contextvars

import pytest

from tierdisk.service import hops
from tierdisk.service.errors import Unavailable, VolumeNotFound
from tierdisk.service.registry import VolumeRegistry


def refuse(registry: VolumeRegistry, caller: str, waiting: frozenset[str] = frozenset()) -> None:
    """A call for ``img`` from ``caller`` (its hop id), waiting for ``waiting``, refused."""

    def call() -> None:
        hops.current_chain.set((caller, "regional~1/img"))
        hops.caller_waiting.set(waiting)
        with pytest.raises(Unavailable, match="not ready yet"):
            registry.get("img")

    contextvars.copy_context().run(call)


def test_an_attaching_volume_remembers_whom_it_refused() -> None:
    registry = VolumeRegistry(["img"])
    refuse(registry, "host-a~1/vm")
    refuse(registry, "host-b~2/vm", frozenset({"far~3/x"}))
    assert registry.refused("img") == {"host-a~1/vm", "host-b~2/vm", "far~3/x"}
    with pytest.raises(VolumeNotFound):
        registry.get("other")


def test_what_it_sends_on_stays_within_a_header_after_any_number_of_callers() -> None:
    """Thousands of host tiers refused during an origin outage (and one caller's own long
    ``tierdisk-waiting``): the header the attach sends stays within
    :data:`~tierdisk.service.hops.MAX_WAITING_BYTES` (an unbounded one passed gRPC's 16 KiB
    limit, and then every attach failed, also once the origin was back), keeping the callers
    refused last."""
    registry = VolumeRegistry(["img"])
    many = frozenset(f"10.9.0.{i}:7400~{i:06x}/vm-{i:04d}" for i in range(300))
    refuse(registry, "crowd~0/vm", many)
    for i in range(3000):
        refuse(registry, f"host-{i:05d}.tiers.example:7400~{i:06x}/vm")
    sent = registry.refused("img")
    header = ",".join(sorted(sent))
    assert len(header.encode()) <= hops.MAX_WAITING_BYTES
    assert "host-02999.tiers.example:7400~000bb7/vm" in sent  # the latest are kept
    assert len(sent) > 50
