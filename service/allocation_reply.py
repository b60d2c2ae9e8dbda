"""The ``GetAllocation`` reply: the extents of a range, built into one message of at most
``max_io`` bytes.

``max_io`` bounds every message that carries sectors' worth of data or metadata: it sits
below the transport's caps (which the server sets above it) and, by default, far below the
client library's 64 MiB receive cap. A reply that would take more is refused
(:class:`~.errors.AllocationTooLarge`): before it is built when even the smallest encoding
of its extents is too large, else once built, measured only when the largest encoding could
be too large (so most replies are serialized once, by gRPC). A reply of many extents is
built with yields to the event loop between them (:data:`_EXTENTS_BETWEEN_YIELDS`).
"""

from __future__ import annotations

import asyncio

from tierdisk.v1 import blockdevice_pb2 as pb

from .errors import AllocationTooLarge
from .volume import AllocationRun

__all__ = ["allocation_reply"]

_EXTENT_MIN_BYTES = 6
"""The fewest bytes an ``AllocationExtent`` takes in a ``GetAllocationResponse``: its field's
tag and length (2), ``sector`` (2; only an extent at sector 0 omits it) and ``sector_count``
(2; never 0). ``depth`` 0 is omitted."""
_DEPTH_MAX_BYTES = 11
"""The most bytes ``depth`` takes: tag (1) and varint (10: an ``int32`` -1, a hole)."""
_EXTENTS_BETWEEN_YIELDS = 65536
"""Extents a ``GetAllocation`` reply is built with between yields to the event loop."""


def _varint_bytes(value: int) -> int:
    """Bytes of ``value`` (non-negative) as a protobuf varint."""
    return max(1, (value.bit_length() + 6) // 7)


async def allocation_reply(
    volume: str, sector: int, count: int, runs: list[AllocationRun], max_io: int
) -> pb.GetAllocationResponse:
    """The reply for ``runs``, the allocation of ``count`` sectors from ``sector`` of the
    volume ``volume`` (:meth:`Volume.allocation`), else :class:`AllocationTooLarge` when it
    would take more than ``max_io`` bytes (:func:`_check_allocation_size`)."""
    _check_allocation_size(volume, sector, count, len(runs), None, max_io)
    reply = pb.GetAllocationResponse()
    add = reply.extents.add  # (4x as fast as messages built, then copied in)
    for done, (a, b, depth) in enumerate(runs, 1):
        add(sector=a, sector_count=b - a, depth=depth)
        if done % _EXTENTS_BETWEEN_YIELDS == 0:
            await asyncio.sleep(0)  # (a million extents: other calls run meanwhile)
    _check_allocation_size(volume, sector, count, len(runs), reply, max_io)
    return reply


def _check_allocation_size(
    volume: str,
    sector: int,
    count: int,
    extents: int,
    reply: pb.GetAllocationResponse | None,
    max_io: int,
) -> None:
    """Refuse (:class:`AllocationTooLarge`) a ``GetAllocation`` reply of ``extents``
    extents for ``count`` sectors from ``sector`` that would take more than ``max_io``
    bytes: asked with ``reply`` None before the reply is built (refused when even the
    smallest encoding of that many extents is too large), then with the reply (measured
    only when the largest encoding could be too large, so most replies are serialized
    once, by gRPC)."""
    if reply is None:
        size = extents * _EXTENT_MIN_BYTES - 2
    else:
        # field tag and length, sector (below sector + count), sector_count, depth
        most = 2 + 1 + _varint_bytes(sector + count) + 1 + _varint_bytes(count)
        most += _DEPTH_MAX_BYTES
        if extents * most <= max_io:
            return
        size = reply.ByteSize()
    if size > max_io:
        raise AllocationTooLarge(
            f"volume {volume!r}: the allocation of sectors [{sector}, {sector + count}) "
            f"has {extents} extents, more than one reply carries (at most {max_io} bytes, "
            f"this server's max_io); ask for a smaller range"
        )
