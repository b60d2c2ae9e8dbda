"""Batched reads (``ReadBatch``): what :meth:`AsyncVolume.read_batch
<tierdisk.client.aio.AsyncVolume.read_batch>` and its ``*_into`` forms send and how they
take the reply apart; the volume plans the calls (:func:`~tierdisk.client.chunking.plan_batches`)
and makes them.

A batch is a list of ``(sector, count)`` ranges (sectors of the size the caller counts in);
a call carries a group of them, given as their indexes in that list. Its reply's data is the
ranges' bytes one after the other, in the group's order: :func:`split_batch_reply` hands each
range its part (a view of the reply, no copy). A caller's buffers (one per range, each
exactly the range's bytes) are checked by :func:`buffer_views` and
:func:`check_buffer_sizes` before any call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tierdisk.v1 import blockdevice_pb2 as pb

from .errors import InvalidArgument, Unimplemented
from .read_replies import check_reply_size

__all__ = [
    "batch_request",
    "buffer_views",
    "check_buffer_sizes",
    "presence_not_reported",
    "split_batch_reply",
]


def batch_request(
    volume: str,
    wanted: Sequence[tuple[int, int]],
    group: Sequence[int],
    sector_size: int,
    presence: bool,
) -> pb.ReadBatchRequest:
    """The ``ReadBatch`` request for the ranges of ``wanted`` whose indexes are ``group``,
    counted in sectors of ``sector_size`` bytes; ``presence``: report the runs held."""
    return pb.ReadBatchRequest(
        volume=volume,
        ranges=[pb.Extent(sector=wanted[i][0], sector_count=wanted[i][1]) for i in group],
        sector_size=sector_size,
        report_presence=presence,
    )


def presence_not_reported(target: str) -> Unimplemented:
    """The error for a ``ReadBatch`` reply asked for presence that says nothing of it: the
    server at ``target`` predates presence in ``ReadBatch``."""
    return Unimplemented(
        f"the server at {target} does not report presence in "
        "ReadBatch (a tierdisk from before commit f972819): read each range "
        "with read_present_into",
        target=target,
        method="ReadBatch",
    )


def split_batch_reply(
    data: memoryview,
    wanted: Sequence[tuple[int, int]],
    group: Sequence[int],
    sector_size: int,
    put: Callable[[int, memoryview], None],
    *,
    volume: str,
) -> None:
    """Hand each range of ``group`` its part of a reply's ``data``: ``put(index, view)``;
    :class:`~tierdisk.client.errors.StorageError` first if ``data`` is not the bytes of all
    of them (the server misbehaved)."""
    counts = [wanted[i][1] for i in group]
    check_reply_size(len(data), sum(counts), sector_size, volume)
    offset = 0
    for index, count in zip(group, counts, strict=True):
        put(index, data[offset : offset + count * sector_size])
        offset += count * sector_size


def buffer_views(
    ranges: Sequence[tuple[int, int]], buffers: Sequence[bytearray | memoryview]
) -> list[memoryview]:
    """A byte view of each of ``buffers``, one per range: :class:`ValueError` if there are
    not as many as ranges, :class:`TypeError` if one is read-only."""
    if len(buffers) != len(ranges):
        raise ValueError(f"{len(buffers)} buffers for {len(ranges)} ranges")
    views = [memoryview(b).cast("B") for b in buffers]
    if any(view.readonly for view in views):
        raise TypeError("a buffer to read into is read-only")
    return views


def check_buffer_sizes(
    ranges: Sequence[tuple[int, int]],
    views: Sequence[memoryview],
    sector_size: int,
    *,
    volume: str,
) -> None:
    """:class:`InvalidArgument` unless each view is exactly its range's bytes."""
    for (_, count), view in zip(ranges, views, strict=True):
        if len(view) != count * sector_size:
            raise InvalidArgument(
                f"a buffer of {len(view)} bytes for {count} sectors of {sector_size} bytes",
                volume=volume,
            )
