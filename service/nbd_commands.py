"""NBD transmission commands on a volume: what READ, WRITE, TRIM, WRITE_ZEROES, CACHE and
BLOCK_STATUS do to the engine, and the reply bytes READ and BLOCK_STATUS send back.

Alignment: the minimum block size is the sector size. When the client agreed to the block
sizes (``NBD_OPT_GO`` with ``NBD_INFO_BLOCK_SIZE``) a misaligned request is refused with
``EINVAL``; otherwise misaligned reads read the covering sectors and slice, misaligned writes
(and the misaligned edges of ``WRITE_ZEROES``) go to :meth:`Volume.write_at`, which
read-modify-writes the covering sectors under an exclusive hold of the volume's sector lock
(every writer of the volume, gRPC included, honours it), and trims shrink to the whole
sectors inside the range.

Unmap semantics follow the volume (DESIGN §3): ``WRITE_ZEROES`` unmaps when the volume's
unmapped sectors read as zeros and the client allows a hole, otherwise it writes zeros;
``FAST_ZERO`` fails with ``ENOTSUP`` whenever zeros would have to be written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tierdisk.client.verifiers import UnflushedWrites

from . import nbd_protocol as P
from .errors import (
    FailedPrecondition,
    InvalidArgument,
    OutOfRange,
    ReadOnlyError,
    TierdiskError,
    WritesLost,
)
from .layer import UnmapBehavior
from .read_reply import new_buffer
from .runs import complement
from .status import nbd_error_of, status_name_of
from .volume import Volume

__all__ = [
    "Export",
    "Refuse",
    "block_status",
    "cache",
    "flush",
    "read",
    "reply_bytes",
    "trim",
    "write",
    "write_zeroes",
]

_MIN_HOLE = 4096  # smaller holes in a read are sent as data
_MAX_READ_CHUNKS = 64  # a read needing more chunks than this is sent as one data chunk
_MAX_EXTENTS = 1 << 16  # block status descriptors per context in one reply
_STATUS_WINDOW = 64 << 20
"""Bytes of the volume's allocation a ``BLOCK_STATUS`` asks for at a time: a request may
span 4 GiB, and a fragmented volume has up to a run per sector, so the map is read a window
at a time until the reply has its :data:`_MAX_EXTENTS` descriptors (the spec lets a reply
cover less than was asked)."""
_FIRST_WINDOW = 64 << 10
"""Bytes of allocation a ``REQ_ONE`` ``BLOCK_STATUS`` asks for first; the window doubles (up
to :data:`_STATUS_WINDOW`) while every context's first extent fills it. QEMU's client walks
a volume with one such request per extent, so its cost must follow the extent, not the runs
after it (a full window each time made that walk quadratic in a fragmented volume's runs)."""
_ZERO_CHUNK = 1 << 20  # zeros written per call when WRITE_ZEROES cannot unmap
_CACHE_CHUNK = 4 << 20  # bytes read per call by CACHE
_HOLE = P.STATE_HOLE | P.STATE_ZERO  # base:allocation of a run no layer holds


class Refuse(Exception):
    """Answer the request with the NBD error of ``kind`` (:func:`.status.nbd_error_of`, for a
    request that changes data when ``writing``; ``code`` instead, for a refusal only NBD
    has) and ``message``; :attr:`status` is the status code name a gRPC request refused for
    the same reason gets (what the shared volume metrics count it under, :mod:`.status`)."""

    def __init__(
        self,
        message: str,
        kind: type[TierdiskError] = InvalidArgument,
        *,
        writing: bool = False,
        code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = nbd_error_of(kind, writing=writing) if code is None else code
        self.status = status_name_of(kind)
        """The status code name of ``kind``, the domain error a gRPC request refused for the
        same reason raises (:mod:`.status`)."""


@dataclass
class Export:
    """The volume a session serves and what was negotiated for it."""

    volume: Volume
    name: str
    size: int  # bytes, as advertised at the handshake
    sector_size: int
    flags: int  # transmission flags
    structured: bool  # structured replies negotiated
    strict: bool  # the client agreed to the block sizes: misaligned requests are refused
    contexts: list[str]  # selected metadata contexts, in reply order
    has_read_cache: bool
    max_io: int  # largest read or write payload
    zeros: Callable[[int], memoryview]  # that many zeros (a view of a shared buffer)
    unflushed: UnflushedWrites = field(default_factory=UnflushedWrites)
    """This connection's writes that no flush has vouched for yet (:func:`flush`)."""


def reply_bytes(export: Export, cmd: int, length: int) -> int:
    """The most reply payload bytes a request can make the server hold: the data of a READ
    (0 for one over ``max_io``, refused), the extents of a BLOCK_STATUS (8 bytes per sector,
    at most ``_MAX_EXTENTS`` per selected context), 0 for the others."""
    if cmd == P.CMD_READ:
        return length if length <= export.max_io else 0
    if cmd == P.CMD_BLOCK_STATUS:
        sectors = -(-length // export.sector_size)
        return 8 * min(sectors, _MAX_EXTENTS) * len(export.contexts)
    return 0


def _check(
    export: Export, offset: int, length: int, *, writing: bool = False, hint: bool = False
) -> bool:
    """Refuse a range past the end (:class:`OutOfRange`: ``ENOSPC`` for a request that
    changes data, ``writing``, else ``EINVAL``); True when the range is misaligned
    (refused with EINVAL when the client agreed to the block sizes, unless the command is
    a ``hint`` — TRIM, CACHE — which changes no data it only partly covers: qemu sends a
    discard's unaligned head as a TRIM of its own even then)."""
    if offset + length > export.size:
        raise Refuse(
            f"bytes [{offset}, {offset + length}) reach past the end of {export.name!r} "
            f"({export.size} bytes)",
            OutOfRange,
            writing=writing,
        )
    ss = export.sector_size
    misaligned = bool(offset % ss or length % ss)
    if misaligned and export.strict and not hint:
        raise Refuse(
            f"offset {offset} and length {length} must be multiples of the {ss}-byte block size",
        )
    return misaligned


def _check_writable(export: Export) -> None:
    if export.volume.read_only:
        raise Refuse(f"volume {export.name!r} is read-only", ReadOnlyError)


async def read(export: Export, flags: int, handle: int, offset: int, length: int) -> list[Any]:
    """Read and return the reply: a simple reply with the data, or structured chunks with
    ``OFFSET_HOLE`` for runs no layer holds (unless ``DF``)."""
    if length > export.max_io:
        raise Refuse(f"a read of {length} bytes is over the limit of {export.max_io}")
    misaligned = _check(export, offset, length)
    ss = export.sector_size
    end = offset + length
    first = offset // ss
    last = -(-end // ss)
    _, view = new_buffer((last - first) * ss)  # read_into writes every byte of it
    present = await export.volume.read_into(view, first)
    data = view[offset - first * ss : offset - first * ss + length] if misaligned else view
    if not export.structured:
        return [P.simple_reply(handle), data] if length else [P.simple_reply(handle)]
    if not length:
        return [P.chunk_header(handle, P.REPLY_TYPE_NONE, 0)]
    holes: list[tuple[int, int]] = []
    if not flags & P.CMD_FLAG_DF and present != [(first, last)]:
        for a, b in complement(first, last, present):
            hs, he = max(a * ss, offset), min(b * ss, end)
            if he - hs >= _MIN_HOLE or (hs, he) == (offset, end):
                holes.append((hs, he))
    if not holes or 2 * len(holes) + 1 > _MAX_READ_CHUNKS:
        return [P.chunk_data_header(handle, offset, length, True), data]
    pieces: list[tuple[bool, int, int]] = []  # (is a hole, start, end)
    pos = offset
    for hs, he in holes:
        if hs > pos:
            pieces.append((False, pos, hs))
        pieces.append((True, hs, he))
        pos = he
    if pos < end:
        pieces.append((False, pos, end))
    parts: list[Any] = []
    final = len(pieces) - 1
    for i, (is_hole, a, b) in enumerate(pieces):
        if is_hole:
            parts.append(P.chunk_hole(handle, a, b - a, i == final))
        else:
            parts.append(P.chunk_data_header(handle, a, b - a, i == final))
            parts.append(data[a - offset : b - offset])
    return parts


async def _store(volume: Volume, sector: int, data: Any, fua: bool) -> None:
    await volume.write(sector, data, fua=fua)
    if fua and not volume.fua_respected:
        await volume.flush()  # FUA must be durable before the reply


async def _store_at(volume: Volume, offset: int, data: Any, fua: bool) -> None:
    """A write at a misaligned byte offset: the engine's atomic read-modify-write."""
    await volume.write_at(offset, data, fua=fua)
    if fua and not volume.fua_respected:
        await volume.flush()


async def flush(export: Export) -> None:
    """FLUSH: the volume's flush; ``EIO`` when it cannot vouch for writes this connection
    made (:attr:`Export.unflushed`): the volume's write verifier changed since they were
    acknowledged, as after a flush that failed in a layer's storage, or a tier below that
    lost writes (``tierdisk.client.verifiers``). Said once: the next flush vouches for later
    writes only. NBD has no verifier of its own; without this, the flush that retries a
    failed one would succeed over writes that failure may have lost."""
    unflushed, volume = export.unflushed, export.volume
    mark = unflushed.mark()
    await volume.flush()
    if unflushed.flushed(mark, volume.write_verifier, volatile=volume.volatile):
        raise Refuse(
            f"writes to {export.name!r} since the last flush may have been lost (a failed "
            "flush in its storage, or a tier below that lost writes)",
            WritesLost,
        )


async def write(export: Export, flags: int, offset: int, data: Any) -> None:
    """Write ``data`` (bytes or bytearray) at ``offset``."""
    _check_writable(export)
    misaligned = _check(export, offset, len(data), writing=True)
    fua = bool(flags & P.CMD_FLAG_FUA)
    if misaligned:
        await _store_at(export.volume, offset, data, fua)
    else:
        await _store(export.volume, offset // export.sector_size, data, fua)


async def trim(export: Export, flags: int, offset: int, length: int) -> None:
    """Discard the whole sectors inside the range (the volume's unmap semantics); a range
    with none, e.g. an unaligned head, changes nothing and succeeds."""
    _check_writable(export)
    _check(export, offset, length, hint=True)
    ss = export.sector_size
    first = -(-offset // ss)
    last = (offset + length) // ss
    volume = export.volume
    if first < last:
        await volume.unmap(first, last - first)
    if flags & P.CMD_FLAG_FUA:
        await volume.flush()


async def write_zeroes(export: Export, flags: int, offset: int, length: int) -> None:
    """Make the range read as zeros: unmap when that gives zeros and a hole is allowed,
    else write zeros; ``FAST_ZERO`` fails with ENOTSUP (changing nothing) when zeros would
    be written.

    Refused past the end (ENOSPC), it changes nothing, as a write so refused: the range is
    checked against the volume's size now (the export's is the handshake's, and a shrink
    since makes it larger) before any part is zeroed, and the parts (a misaligned tail's
    read-modify-write, the whole sectors, a misaligned head's) go from the end down, so a
    shrink that lands part way refuses the next part with every part done past the new end,
    cut off by it."""
    _check_writable(export)
    misaligned = _check(export, offset, length, writing=True)
    volume = export.volume
    unmap = volume.unmap_behavior == UnmapBehavior.ZEROES and not flags & P.CMD_FLAG_NO_HOLE
    if flags & P.CMD_FLAG_FAST_ZERO and (not unmap or misaligned):
        why = "the range is not whole sectors" if unmap else "zeros would have to be written"
        raise Refuse(f"zeroing is not fast here: {why}", FailedPrecondition, code=P.ENOTSUP)
    fua = bool(flags & P.CMD_FLAG_FUA)
    ss = export.sector_size
    end = offset + length
    if end > volume.sector_count * ss:
        raise Refuse(
            f"bytes [{offset}, {end}) reach past the end of {export.name!r} "
            f"({volume.sector_count * ss} bytes since it was resized)",
            OutOfRange,
            writing=True,
        )
    first = -(-offset // ss)  # the whole sectors inside the range: [first, last)
    last = end // ss
    head_end = min(end, first * ss)  # (misaligned: the head is [offset, head_end))
    if misaligned and end % ss and last * ss >= head_end:
        await _store_at(volume, last * ss, export.zeros(end - last * ss), fua)
    if first < last and unmap:
        await volume.unmap(first, last - first)
        if fua:
            await volume.flush()
    elif first < last:
        step = max(1, min(export.max_io, _ZERO_CHUNK) // ss)
        zeros = export.zeros(step * ss)
        for sector in range(last, first, -step):
            n = min(step, sector - first)
            await _store(volume, sector - n, zeros[: n * ss], fua)
    if misaligned and offset < head_end:
        await _store_at(volume, offset, export.zeros(head_end - offset), fua)


async def cache(export: Export, offset: int, length: int) -> None:
    """Prefetch: read the covering sectors, which fills the volume's read caches, and drop
    the data. A volume without a read cache has nothing to fill."""
    _check(export, offset, length, hint=True)
    if not export.has_read_cache or not length:
        return
    ss = export.sector_size
    first = offset // ss
    last = -(-(offset + length) // ss)
    step = max(1, min(export.max_io, _CACHE_CHUNK) // ss)
    buf = memoryview(bytearray(min(step, last - first) * ss))
    for sector in range(first, last, step):
        n = min(step, last - sector)
        await export.volume.read_into(buf[: n * ss], sector)


def _status(context: str, depth: int) -> int:
    """A run's status in ``context``: its depth plus one in ``qemu:allocation-depth``;
    ``HOLE | ZERO`` where no layer holds it, else 0, in ``base:allocation``."""
    if context == P.CONTEXT_ALLOCATION_DEPTH:
        return depth + 1
    return _HOLE if depth < 0 else 0


async def _first_extents(
    volume: Volume, contexts: list[str], first: int, last: int, most: int
) -> list[tuple[int, int, int]]:
    """The allocation of ``[first, last)`` from its start, for a ``REQ_ONE`` reply: in a
    window of :data:`_FIRST_WINDOW` bytes that doubles (up to ``most`` sectors) while the
    first extent of every context fills it. The shortest first extent is then whole, the
    others whole or cut at the window's end (a reply may cover less than was asked), and
    the cost follows the shortest extent, by which a client walks the volume."""
    window = max(1, _FIRST_WINDOW // volume.sector_size)
    while True:
        step = min(window, most, last - first)
        runs = await volume.allocation(first, step)
        if step in (most, last - first):
            return runs
        for context in contexts:
            status = _status(context, runs[0][2])
            if any(_status(context, depth) != status for _, _, depth in runs):
                return runs  # this context's first extent ends inside the window
        window *= 2


async def block_status(
    export: Export, flags: int, handle: int, offset: int, length: int
) -> list[Any]:
    """One ``BLOCK_STATUS`` chunk per selected context, from the volume's allocation map.

    ``base:allocation``: runs no layer holds are ``HOLE | ZERO``, the rest 0.
    ``qemu:allocation-depth``: the index of the topmost layer holding the run plus one
    (0 = no layer, 1 = the top layer, …).
    """
    if not export.contexts:
        raise Refuse("no metadata context was selected (NBD_OPT_SET_META_CONTEXT)")
    if not length:
        raise Refuse("block status of zero bytes")
    _check(export, offset, length)
    ss = export.sector_size
    end = offset + length
    first = offset // ss
    last = -(-end // ss)
    one = bool(flags & P.CMD_FLAG_REQ_ONE)
    window = max(1, _STATUS_WINDOW // ss)
    if one:
        runs = await _first_extents(export.volume, export.contexts, first, last, window)
    else:
        runs = []
        while first < last and len(runs) < _MAX_EXTENTS:
            step = min(window, last - first)
            runs += await export.volume.allocation(first, step)
            first += step
    end = min(end, runs[-1][1] * ss)  # where the runs asked for end
    parts: list[Any] = []
    for i, context in enumerate(export.contexts):
        extents: list[tuple[int, int]] = []  # (length, status)
        for a, b, depth in runs:
            status = _status(context, depth)
            nbytes = min(b * ss, end) - max(a * ss, offset)
            if extents and extents[-1][1] == status:
                extents[-1] = (extents[-1][0] + nbytes, status)
            elif one and extents:
                break
            elif len(extents) < _MAX_EXTENTS:
                extents.append((nbytes, status))
            else:
                break
        done = i == len(export.contexts) - 1
        parts.append(P.chunk_block_status(handle, P.CONTEXT_IDS[context], extents, done))
    return parts
