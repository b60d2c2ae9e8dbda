"""NBD transmission commands on a volume: what READ, WRITE, TRIM, WRITE_ZEROES, CACHE and
BLOCK_STATUS do to the engine, and the reply bytes READ and BLOCK_STATUS send back.

Alignment: the minimum block size is the sector size. When the client agreed to the block
sizes (``NBD_OPT_GO`` with ``NBD_INFO_BLOCK_SIZE``) a misaligned request is refused with
``EINVAL``; otherwise misaligned reads read the covering sectors and slice, misaligned writes
read-modify-write the covering sectors under an exclusive hold of the volume's range lock,
and trims shrink to the whole sectors inside the range.

Unmap semantics follow the volume (DESIGN §3): ``WRITE_ZEROES`` unmaps when the volume's
unmapped sectors read as zeros and the client allows a hole, otherwise it writes zeros;
``FAST_ZERO`` fails with ``ENOTSUP`` whenever zeros would have to be written.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import nbd_protocol as P
from .layer import UnmapBehavior
from .read_reply import new_buffer
from .runs import complement
from .volume import Volume

__all__ = [
    "Export",
    "RangeLock",
    "Refuse",
    "block_status",
    "cache",
    "read",
    "trim",
    "write",
    "write_zeroes",
]

_MIN_HOLE = 4096  # smaller holes in a read are sent as data
_MAX_READ_CHUNKS = 64  # a read needing more chunks than this is sent as one data chunk
_MAX_EXTENTS = 1 << 16  # block status descriptors per context in one reply
_ZERO_CHUNK = 1 << 20  # zeros written per call when WRITE_ZEROES cannot unmap
_CACHE_CHUNK = 4 << 20  # bytes read per call by CACHE
_HOLE = P.STATE_HOLE | P.STATE_ZERO  # base:allocation of a run no layer holds


class Refuse(Exception):
    """Answer the request with this NBD error (``code``) and message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class RangeLock:
    """Shared / exclusive holds on sector ranges of one volume.

    Every NBD write, trim and zeroing holds its sectors *shared* (they may overlap each
    other freely, as the engine keeps sectors whole); a read-modify-write holds its covering
    sectors *exclusive*, so no write lands between its read and its write. A waiting
    exclusive hold blocks new overlapping shared holds, so it is not starved. Without an
    exclusive hold held or waiting, taking a shared hold is a dict insert.
    """

    def __init__(self) -> None:
        self._shared: dict[int, tuple[int, int]] = {}
        self._exclusive: dict[int, tuple[int, int]] = {}
        self._pending: dict[int, tuple[int, int]] = {}
        self._next = 0
        self._changed: asyncio.Future[None] | None = None

    @staticmethod
    def _overlaps(start: int, end: int, held: dict[int, tuple[int, int]]) -> bool:
        return any(a < end and start < b for a, b in held.values())

    async def _wait(self) -> None:
        if self._changed is None:
            self._changed = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._changed)

    def _token(self) -> int:
        self._next += 1
        return self._next

    async def acquire_shared(self, start: int, end: int) -> int:
        """Hold ``[start, end)`` shared; returns the token for :meth:`release`."""
        if self._exclusive or self._pending:
            while self._overlaps(start, end, self._exclusive) or self._overlaps(
                start, end, self._pending
            ):
                await self._wait()
        token = self._token()
        self._shared[token] = (start, end)
        return token

    async def acquire_exclusive(self, start: int, end: int) -> int:
        """Hold ``[start, end)`` exclusive; returns the token for :meth:`release`."""
        token = self._token()
        self._pending[token] = (start, end)
        try:
            while self._overlaps(start, end, self._shared) or self._overlaps(
                start, end, self._exclusive
            ):
                await self._wait()
        finally:
            del self._pending[token]
        self._exclusive[token] = (start, end)
        return token

    def release(self, token: int) -> None:
        """Drop a hold; wakes waiters."""
        if self._shared.pop(token, None) is None:
            self._exclusive.pop(token, None)
        changed, self._changed = self._changed, None
        if changed is not None and not changed.done():
            changed.set_result(None)

    @property
    def held(self) -> int:
        """Number of holds (shared and exclusive) now held."""
        return len(self._shared) + len(self._exclusive)


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
    lock: RangeLock  # shared by every session of the volume
    max_io: int  # largest read or write payload
    zeros: Callable[[int], memoryview]  # that many zeros (a view of a shared buffer)


def _check(export: Export, offset: int, length: int, past_end: int) -> bool:
    """Refuse a range past the end (with ``past_end``); True when the range is misaligned
    (refused with EINVAL when the client agreed to the block sizes)."""
    if offset + length > export.size:
        raise Refuse(
            past_end,
            f"bytes [{offset}, {offset + length}) reach past the end of {export.name!r} "
            f"({export.size} bytes)",
        )
    ss = export.sector_size
    misaligned = bool(offset % ss or length % ss)
    if misaligned and export.strict:
        raise Refuse(
            P.EINVAL,
            f"offset {offset} and length {length} must be multiples of the {ss}-byte block size",
        )
    return misaligned


def _check_writable(export: Export) -> None:
    if export.volume.read_only:
        raise Refuse(P.EPERM, f"volume {export.name!r} is read-only")


async def read(export: Export, flags: int, handle: int, offset: int, length: int) -> list[Any]:
    """Read and return the reply: a simple reply with the data, or structured chunks with
    ``OFFSET_HOLE`` for runs no layer holds (unless ``DF``)."""
    if length > export.max_io:
        raise Refuse(P.EINVAL, f"a read of {length} bytes is over the limit of {export.max_io}")
    misaligned = _check(export, offset, length, P.EINVAL)
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


async def write(export: Export, flags: int, offset: int, data: Any) -> None:
    """Write ``data`` (bytes or bytearray) at ``offset``."""
    _check_writable(export)
    length = len(data)
    misaligned = _check(export, offset, length, P.ENOSPC)
    fua = bool(flags & P.CMD_FLAG_FUA)
    if misaligned:
        await _read_modify_write(export, offset, memoryview(data), fua)
        return
    ss = export.sector_size
    first = offset // ss
    token = await export.lock.acquire_shared(first, first + length // ss)
    try:
        await _store(export.volume, first, data, fua)
    finally:
        export.lock.release(token)


async def _read_modify_write(export: Export, offset: int, data: memoryview, fua: bool) -> None:
    """Write ``data`` at a misaligned ``offset``: read the partial edge sectors, splice, and
    write the covering sectors, all under an exclusive hold of them."""
    ss = export.sector_size
    volume = export.volume
    end = offset + len(data)
    first = offset // ss
    last = -(-end // ss)
    head = offset - first * ss
    token = await export.lock.acquire_exclusive(first, last)
    try:
        buf = bytearray((last - first) * ss)
        view = memoryview(buf)
        if head:
            await volume.read_into(view[:ss], first)
        if end % ss and (last - 1 > first or not head):
            await volume.read_into(view[-ss:], last - 1)
        view[head : head + len(data)] = data
        await _store(volume, first, view, fua)
    finally:
        export.lock.release(token)


async def trim(export: Export, flags: int, offset: int, length: int) -> None:
    """Discard the whole sectors inside the range (the volume's unmap semantics)."""
    _check_writable(export)
    _check(export, offset, length, P.EINVAL)
    ss = export.sector_size
    first = -(-offset // ss)
    last = (offset + length) // ss
    volume = export.volume
    if first < last:
        token = await export.lock.acquire_shared(first, last)
        try:
            await volume.unmap(first, last - first)
        finally:
            export.lock.release(token)
    if flags & P.CMD_FLAG_FUA:
        await volume.flush()


async def write_zeroes(export: Export, flags: int, offset: int, length: int) -> None:
    """Make the range read as zeros: unmap when that gives zeros and a hole is allowed,
    else write zeros; ``FAST_ZERO`` fails with ENOTSUP (changing nothing) when zeros would
    be written."""
    _check_writable(export)
    misaligned = _check(export, offset, length, P.ENOSPC)
    volume = export.volume
    unmap = volume.unmap_behavior == UnmapBehavior.ZEROES and not flags & P.CMD_FLAG_NO_HOLE
    if flags & P.CMD_FLAG_FAST_ZERO and (not unmap or misaligned):
        why = "the range is not whole sectors" if unmap else "zeros would have to be written"
        raise Refuse(P.ENOTSUP, f"zeroing is not fast here: {why}")
    fua = bool(flags & P.CMD_FLAG_FUA)
    ss = export.sector_size
    end = offset + length
    first = -(-offset // ss)  # the whole sectors inside the range: [first, last)
    last = end // ss
    if misaligned:
        head_end = min(end, first * ss)
        if offset < head_end:
            zeros = export.zeros(head_end - offset)
            await _read_modify_write(export, offset, zeros, fua)
        if end % ss and last * ss >= head_end:
            zeros = export.zeros(end - last * ss)
            await _read_modify_write(export, last * ss, zeros, fua)
    if first >= last:
        return
    token = await export.lock.acquire_shared(first, last)
    try:
        if unmap:
            await volume.unmap(first, last - first)
            if fua:
                await volume.flush()
            return
        step = max(1, min(export.max_io, _ZERO_CHUNK) // ss)
        zeros = export.zeros(step * ss)
        for sector in range(first, last, step):
            n = min(step, last - sector)
            await _store(volume, sector, zeros[: n * ss], fua)
    finally:
        export.lock.release(token)


async def cache(export: Export, offset: int, length: int) -> None:
    """Prefetch: read the covering sectors, which fills the volume's read caches, and drop
    the data. A volume without a read cache has nothing to fill."""
    _check(export, offset, length, P.EINVAL)
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


async def block_status(
    export: Export, flags: int, handle: int, offset: int, length: int
) -> list[Any]:
    """One ``BLOCK_STATUS`` chunk per selected context, from the volume's allocation map.

    ``base:allocation``: runs no layer holds are ``HOLE | ZERO``, the rest 0.
    ``qemu:allocation-depth``: the index of the topmost layer holding the run plus one
    (0 = no layer, 1 = the top layer, …).
    """
    if not export.contexts:
        raise Refuse(P.EINVAL, "no metadata context was selected (NBD_OPT_SET_META_CONTEXT)")
    if not length:
        raise Refuse(P.EINVAL, "block status of zero bytes")
    _check(export, offset, length, P.EINVAL)
    ss = export.sector_size
    end = offset + length
    first = offset // ss
    last = -(-end // ss)
    runs = await export.volume.allocation(first, last - first)
    one = bool(flags & P.CMD_FLAG_REQ_ONE)
    parts: list[Any] = []
    for i, context in enumerate(export.contexts):
        depth_context = context == P.CONTEXT_ALLOCATION_DEPTH
        extents: list[tuple[int, int]] = []  # (length, status)
        for a, b, depth in runs:
            status = depth + 1 if depth_context else (_HOLE if depth < 0 else 0)
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
