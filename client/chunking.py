"""Splitting large I/O into chunks, and running a few chunk requests at once.

About 1 MiB per message moves data best (DESIGN.md §6: 64 KiB messages are 6x slower per
byte, and the server refuses more than ``server.max_io``, 16 MiB by default), and a few
requests in flight hide the round trip. These helpers are plain asyncio, no gRPC.

The requests of a sparse import are planned here too: which sectors of the file it copies
hold data (:func:`sector_runs`), and the requests that write those and unmap, or write as
zeros, the holes between them (:func:`plan_pieces`).

And an allocation map too large for one reply is asked for in windows that adapt to it
(:func:`allocation_in_windows`).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import NamedTuple, TypeVar

from .errors import AllocationTooLarge, Interrupted, MessageTooLarge, NoSpace
from .models import AllocationExtent, Extent

__all__ = [
    "DEFAULT_IN_FLIGHT",
    "DEFAULT_MAX_IO",
    "MAX_BATCH_RANGES",
    "MIN_HOLE_BYTES",
    "UNMAP_MAX_BYTES",
    "Chunk",
    "Piece",
    "ReadWindow",
    "allocation_in_windows",
    "caller_cancelled",
    "merge_extents",
    "plan_batches",
    "plan_chunks",
    "plan_pieces",
    "plan_windows",
    "run_bounded",
    "run_ordered",
    "sector_runs",
    "sectors_per_chunk",
]

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_MAX_IO = 1 << 20
"""Bytes of data per Read/Write request: 1 MiB, the measured sweet spot."""
DEFAULT_IN_FLIGHT = 4
"""Chunk requests kept in flight for one large read or write."""
MAX_BATCH_RANGES = 256
"""The most ranges one ``ReadBatch`` request carries: a server refuses more
(``INVALID_ARGUMENT``); the client library splits a larger batch into several calls."""


class Chunk(NamedTuple):
    """One request's share of a larger range: ``sector_count`` sectors from ``sector``, which sit
    ``offset`` sectors into the range."""

    sector: int
    sector_count: int
    offset: int


def sectors_per_chunk(max_io: int, sector_size: int) -> int:
    """How many whole sectors fit in ``max_io`` bytes (at least one)."""
    if sector_size <= 0:
        raise ValueError(f"sector size must be positive, not {sector_size}")
    return max(1, max_io // sector_size)


def plan_chunks(sector: int, count: int, max_sectors: int) -> Iterator[Chunk]:
    """The chunks, in order, that cover ``count`` sectors from ``sector`` with at most
    ``max_sectors`` each; nothing for ``count == 0``."""
    if max_sectors <= 0:
        raise ValueError(f"chunk size must be positive, not {max_sectors}")
    for offset in range(0, count, max_sectors):
        yield Chunk(sector + offset, min(max_sectors, count - offset), offset)


def plan_batches(
    counts: Sequence[int], max_sectors: int, max_ranges: int = MAX_BATCH_RANGES
) -> list[list[int]]:
    """Group ranges of ``counts`` sectors, in order, into ``ReadBatch`` calls: lists of
    indices into ``counts``, each of at most ``max_ranges`` ranges and ``max_sectors``
    sectors in all (``max_io``'s worth). A range larger than ``max_sectors`` is a group of
    its own (read in chunks, as a plain read)."""
    groups: list[list[int]] = []
    group: list[int] = []
    sectors = 0
    for index, count in enumerate(counts):
        if count > max_sectors:
            groups.append([index])
            continue
        if group and (len(group) == max_ranges or sectors + count > max_sectors):
            groups.append(group)
            group, sectors = [], 0
        group.append(index)
        sectors += count
    if group:
        groups.append(group)
    return groups


class ReadWindow(NamedTuple):
    """One read request covering data runs close together: ``sector_count`` sectors from
    ``sector``; ``runs`` are the ``(start, end)`` runs in it that hold data (absolute
    sectors, sorted); the sectors between them are read too."""

    sector: int
    sector_count: int
    runs: tuple[tuple[int, int], ...]


def plan_windows(
    runs: Iterable[tuple[int, int]], max_sectors: int, max_gap: int
) -> Iterator[ReadWindow]:
    """Read requests, in order, covering the sorted, disjoint ``runs``: a run starts a new
    request when it lies more than ``max_gap`` sectors past the last one or the request
    would pass ``max_sectors``; a run longer than that is split. Reading a small gap costs
    less than a request more (a fragmented volume has runs of a sector or two)."""
    if max_sectors <= 0:
        raise ValueError(f"window size must be positive, not {max_sectors}")
    inside: list[tuple[int, int]] = []
    start = 0
    for a, b in runs:
        while a < b:
            if inside and (a - inside[-1][1] > max_gap or a - start >= max_sectors):
                yield ReadWindow(start, inside[-1][1] - start, tuple(inside))
                inside = []
            if not inside:
                start = a
            end = min(b, start + max_sectors)
            inside.append((a, end))
            a = end
    if inside:
        yield ReadWindow(start, inside[-1][1] - start, tuple(inside))


MIN_HOLE_BYTES = 64 * 1024
"""Bytes: a hole of a sparse import shorter than this is written as zeros together with the
data around it, as one run; a filesystem with fragmented small holes (4 KiB here and there)
would otherwise turn its data into many small requests, each costing a round trip."""

UNMAP_MAX_BYTES = 1 << 30
"""Bytes: the most one unmap request of a sparse import covers (whole sectors), so that no
single call outlasts the per-call timeout on a layer that must write zeros to unmap."""


class Piece(NamedTuple):
    """A request of a copy onto a volume: ``sector_count`` sectors ``offset`` sectors into
    the source; ``data``: read from the source and written, else a hole (unmapped or
    written as zeros)."""

    offset: int
    sector_count: int
    data: bool


def sector_runs(
    runs: list[tuple[int, int]], start: int, ss: int, count: int
) -> list[tuple[int, int]]:
    """The data ``runs`` (byte offsets in the file, the copy starting at ``start``) as runs of
    sectors ``[lo, hi)`` of the ``count``-sector copy: widened outward to whole sectors (a
    sector that holds any data is written whole; the holes shrink inward), and joined where
    what lies between them is shorter than :data:`MIN_HOLE_BYTES`, the two ends included."""
    gap = max(1, MIN_HOLE_BYTES // ss)
    out: list[tuple[int, int]] = []
    for a, b in runs:
        lo, hi = (a - start) // ss, -(-(b - start) // ss)
        if lo - (out[-1][1] if out else 0) < gap:
            lo = out.pop()[0] if out else 0
        out.append((lo, min(count, hi)))
    if out and count - out[-1][1] < gap:
        out[-1] = (out[-1][0], count)
    return out


def plan_pieces(
    data: list[tuple[int, int]], count: int, per_chunk: int, unmap: bool, ss: int
) -> list[Piece]:
    """The requests, in order, that copy ``count`` sectors whose ``data`` runs (sorted, not
    touching) are written in chunks of ``per_chunk`` sectors; the holes between them are
    unmapped (``unmap``) in pieces of at most :data:`UNMAP_MAX_BYTES` bytes, or written as
    zeros in chunks of ``per_chunk``."""
    hole_chunk = max(1, UNMAP_MAX_BYTES // ss) if unmap else per_chunk
    pieces: list[Piece] = []
    pos = 0
    for lo, hi in [*data, (count, count)]:
        pieces += (
            Piece(c.sector, c.sector_count, False) for c in plan_chunks(pos, lo - pos, hole_chunk)
        )
        pieces += (
            Piece(c.sector, c.sector_count, True) for c in plan_chunks(lo, hi - lo, per_chunk)
        )
        pos = hi
    return pieces


def merge_extents(extents: Iterable[Extent]) -> list[Extent]:
    """Sorted runs with touching or overlapping neighbours joined (runs from consecutive
    chunks of one read meet at the chunk boundary)."""
    merged: list[Extent] = []
    for ext in sorted(extents, key=lambda e: e.sector):
        if ext.sector_count == 0:
            continue
        if merged and ext.sector <= merged[-1].end:
            last = merged[-1]
            merged[-1] = Extent(last.sector, max(last.end, ext.end) - last.sector)
        else:
            merged.append(ext)
    return merged


def caller_cancelled() -> bool:
    """Whether the running task has been asked to cancel (``Task.cancelling()``): told apart
    from a :class:`asyncio.CancelledError` that only came up from something it awaited, as
    gRPC raises in a call whose channel was closed under it."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def run_bounded(items: Iterable[T], fn: Callable[[T], Awaitable[None]], limit: int) -> None:
    """Await ``fn(item)`` for every item, at most ``limit`` at a time, in no particular
    order of completion. The first failure cancels the rest and is raised as it is.

    Every item must complete: a call of ``fn`` that ends cancelled though the caller was not
    (gRPC cancels the calls on a channel that is closed) stops the rest too and raises
    :class:`~tierdisk.client.errors.Interrupted`, saying how many items had completed. The
    caller's own cancellation is raised as :class:`asyncio.CancelledError`, once the calls
    in flight are cancelled."""
    it = iter(items)
    completed = 0

    async def worker() -> None:
        nonlocal completed
        for item in it:  # shared iterator: each item goes to exactly one worker
            await fn(item)
            completed += 1

    tasks = [asyncio.ensure_future(worker()) for _ in range(max(1, limit))]
    pending = set(tasks)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(task.cancelled() or task.exception() is not None for task in done):
                break  # a failure, or a worker cancelled underneath: stop sending the rest
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    # A failure says more than a cancellation its cause brought.
    failed = (t.exception() for t in tasks if not t.cancelled())
    failure = next((exc for exc in failed if exc is not None), None)
    interrupted = any(t.cancelled() for t in tasks)  # underneath: the caller's was raised above
    # The error raised holds this frame (its traceback): were the tasks, which hold the
    # error, still among its locals, that cycle would keep every request's data until a
    # garbage collection.
    del tasks, pending, done, task, failed
    if failure is not None:
        try:
            raise failure
        finally:
            del failure
    if interrupted:
        raise Interrupted(
            f"cancelled mid-call, though not by its caller (was the client closed?): "
            f"{completed} request(s) had completed"
        )


async def run_ordered(
    items: Iterable[T], fn: Callable[[T], Awaitable[R]], limit: int
) -> AsyncGenerator[tuple[T, R], None]:
    """Yield ``(item, await fn(item))`` in the order of ``items`` while keeping up to
    ``limit`` calls running ahead. Closing the iterator early cancels the calls in flight.
    A call that ends cancelled though the consumer was not raises
    :class:`~tierdisk.client.errors.Interrupted`, as in :func:`run_bounded`."""
    window: collections.deque[tuple[T, asyncio.Future[R]]] = collections.deque()
    it = iter(items)
    yielded = 0
    try:
        while True:
            for item in it:
                window.append((item, asyncio.ensure_future(fn(item))))
                if len(window) >= max(1, limit):
                    break
            if not window:
                return
            item, fut = window.popleft()
            try:
                result = await fut
            except asyncio.CancelledError:
                if caller_cancelled() or not fut.cancelled():
                    raise
                raise Interrupted(
                    f"cancelled mid-call, though not by its caller (was the client closed?): "
                    f"{yielded} request(s) had completed"
                ) from None
            yield item, result
            yielded += 1
    finally:
        for _, fut in window:
            fut.cancel()
        if window:
            await asyncio.gather(*(f for _, f in window), return_exceptions=True)


async def allocation_in_windows(
    fetch: Callable[[int, int], Awaitable[list[AllocationExtent]]], sector: int, count: int
) -> list[AllocationExtent]:
    """The allocation runs of ``count`` sectors from ``sector``, asked of ``fetch(sector,
    count)`` (one GetAllocation) for the whole range first, then in windows if it must be:
    the window halves on each refusal (:class:`~tierdisk.client.errors.AllocationTooLarge`;
    the transport's message cap: :class:`~tierdisk.client.errors.MessageTooLarge`, or any
    other :class:`~tierdisk.client.errors.NoSpace` with no ``tierdisk-error`` trailer) and
    doubles after two answers in a row. The answers are joined
    into one list; runs of one depth that meet at a window border become one run. A refusal
    of a single sector, or a :class:`~tierdisk.client.errors.NoSpace` the server sent, is
    raised."""
    end = sector + count
    extents: list[AllocationExtent] = []
    window = count  # the whole range first: most volumes answer in one reply
    answered = 0  # answers in a row at this window size
    while True:
        span = min(window, end - sector)
        try:
            part = await fetch(sector, span)
        except (AllocationTooLarge, MessageTooLarge, NoSpace) as exc:
            if span <= 1 or (isinstance(exc, NoSpace) and exc.server_error):
                raise  # one sector is one extent; or a real NoSpace (never expected)
            window, answered = span // 2, 0
            continue
        if extents and part and _joins(extents[-1], part[0]):
            last = extents[-1]
            extents[-1] = AllocationExtent(
                last.sector, last.sector_count + part[0].sector_count, last.depth
            )
            extents.extend(part[1:])
        else:
            extents.extend(part)
        sector += span
        if sector >= end:
            return extents
        answered += 1
        if answered == 2:
            window, answered = window * 2, 0


def _joins(before: AllocationExtent, after: AllocationExtent) -> bool:
    """Whether ``after`` continues ``before``: it starts where ``before`` ends, same depth."""
    return before.end == after.sector and before.depth == after.depth
