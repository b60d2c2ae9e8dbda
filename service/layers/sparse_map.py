"""The on-disk presence map of the ``sparse`` layer: a checksummed header, then records.

Pure encoding and decoding (no file descriptors, no asyncio); :mod:`.sparse` owns the files
and the ordering that makes them crash-safe.

Layout (every integer little-endian; units: sectors of the header's ``sector_size``):

``header`` (28 bytes)
    magic ``b"TDSPMAP1"``, version ``u32`` (2), sector_size ``u32``, sector_count ``u64``
    (the size when the file was written), crc32 ``u32`` of the 24 bytes before it.
``record``
    kind ``4s`` (``b"SNAP"`` or ``b"DIFF"``), n_remove ``u32``, n_add ``u32``, seq ``u64``,
    sector_count ``u64`` (the layer size after this record), smallest ``u64`` (the smallest
    size the layer has had since it was created, as of this record), then
    ``n_remove + n_add`` runs as ``(start i64, end i64)`` pairs, removes first, then crc32
    ``u32`` of everything before it in the record.

The first record is a ``SNAP``: the whole presence, sorted and disjoint. Every later record
is a ``DIFF`` whose ``seq`` is one more than the one before it: replaying it removes its
remove runs, adds its add runs, sets the size and drops presence at or past the size. The
smallest size is what keeps a shrink's effect on the layers below across restarts (a volume
never shows lower data at or past it, DESIGN.md §3). Version 1 records have no ``smallest``
field: such a map reads with the smallest size its records show, and the layer rewrites it
as version 2 at its next commit. A
record is written by one append and made durable before the next is appended, so only the
*last* record can be torn by a crash: a record that fails its checks with nothing valid after
it is a torn tail (ignored, :attr:`MapState.torn` bytes); one followed by a valid record, a
bad ``SNAP``, or a bad header is corruption (:class:`DataCorruption`).
"""

from __future__ import annotations

import struct
import sys
import zlib
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain

from tierdisk.client.layer_layout import SPARSE_MAP_SUFFIX

from ..errors import DataCorruption
from ..presence import RunSet
from ..runs import Run

__all__ = [
    "HEADER_SIZE",
    "MapState",
    "check_header",
    "encode_header",
    "encode_record",
    "flat",
    "map_path",
    "parse",
]


def map_path(data_path: str) -> str:
    """Where the presence map of the sparse layer whose data file is ``data_path`` lives."""
    return data_path + SPARSE_MAP_SUFFIX


MAGIC = b"TDSPMAP1"
VERSION = 2
SNAP = b"SNAP"
DIFF = b"DIFF"
_HEADER = struct.Struct("<8sIIQ")
_CRC = struct.Struct("<I")
_RECORD = struct.Struct("<4sIIQQQ")
_RECORD_V1 = struct.Struct("<4sIIQQ")  # no ``smallest``
HEADER_SIZE = _HEADER.size + _CRC.size
"""Bytes of the header, checksum included."""
_RUN_BYTES = 16
_LITTLE = sys.byteorder == "little"
_NOWHERE = 1 << 62
"""An end past any sector: ``remove(size, _NOWHERE)`` drops everything at or past ``size``."""


@dataclass
class MapState:
    """What a map file says, as of its last valid record."""

    sector_size: int
    sector_count: int
    smallest: int
    """The smallest size the layer has had (for a version 1 map: the smallest its records
    show)."""
    version: int
    present: RunSet
    seq: int
    """``seq`` of the last valid record."""
    end: int
    """Offset just past the last valid record: where the next record goes."""
    snapshot_end: int
    """Offset just past the ``SNAP`` record."""
    torn: int
    """Bytes past :attr:`end` that were ignored (a torn tail); 0 when the file is clean."""


def flat(runs: Iterable[Run]) -> array[int]:
    """Runs as one flat ``array('q')`` ``[start0, end0, start1, end1, …]`` (no per-run
    Python frame: the iteration runs in C)."""
    return array("q", chain.from_iterable(runs))


def _to_le(values: array[int]) -> bytes:
    if _LITTLE:
        return values.tobytes()
    swapped = array("q", values)
    swapped.byteswap()
    return swapped.tobytes()


def _from_le(raw: bytes | memoryview) -> array[int]:
    values: array[int] = array("q")
    values.frombytes(raw)
    if not _LITTLE:
        values.byteswap()
    return values


def encode_header(sector_size: int, sector_count: int) -> bytes:
    """The 28-byte header of a new map file."""
    head = _HEADER.pack(MAGIC, VERSION, sector_size, sector_count)
    return head + _CRC.pack(zlib.crc32(head))


def encode_record(
    kind: bytes,
    seq: int,
    sector_count: int,
    smallest: int,
    removes: array[int],
    adds: array[int],
) -> bytes:
    """One record (of the current version); ``removes`` and ``adds`` are flat run arrays
    (see :func:`flat`)."""
    body = (
        _RECORD.pack(kind, len(removes) // 2, len(adds) // 2, seq, sector_count, smallest)
        + _to_le(removes)
        + _to_le(adds)
    )
    return body + _CRC.pack(zlib.crc32(body))


@dataclass
class _Record:
    kind: bytes
    seq: int
    sector_count: int
    smallest: int
    removes: array[int]
    adds: array[int]
    end: int


def _record_at(blob: memoryview, offset: int, layout: struct.Struct) -> _Record | None:
    """The record at ``offset`` if it is complete and its checksum matches, else None.
    ``layout`` is the record head of the map's version."""
    if offset + layout.size + _CRC.size > len(blob):
        return None
    kind, n_remove, n_add, seq, sector_count, *rest = layout.unpack_from(blob, offset)
    if kind not in (SNAP, DIFF):
        return None
    smallest = rest[0] if rest else sector_count
    runs_end = offset + layout.size + (n_remove + n_add) * _RUN_BYTES
    end = runs_end + _CRC.size
    if end > len(blob):
        return None
    (crc,) = _CRC.unpack_from(blob, runs_end)
    if crc != zlib.crc32(blob[offset:runs_end]):
        return None
    split = offset + layout.size + n_remove * _RUN_BYTES
    removes = _from_le(blob[offset + layout.size : split])
    adds = _from_le(blob[split:runs_end])
    return _Record(kind, seq, sector_count, smallest, removes, adds, end)


def _valid_record_after(blob: bytes, offset: int, layout: struct.Struct) -> int | None:
    """The offset of a valid record anywhere after ``offset``, or None."""
    view = memoryview(blob)
    for magic in (DIFF, SNAP):
        pos = blob.find(magic, offset + 1)
        while pos >= 0:
            if _record_at(view, pos, layout) is not None:
                return pos
            pos = blob.find(magic, pos + 1)
    return None


def _pairs(values: array[int]) -> Iterable[Run]:
    it = iter(values)
    return zip(it, it, strict=True)


def _check_runs(values: array[int], limit: int, path: str, offset: int) -> None:
    if not values:
        return
    starts, ends = values[0::2], values[1::2]
    empty = any(s >= e for s, e in zip(starts, ends, strict=True))
    if empty or min(starts) < 0 or max(ends) > limit:
        raise DataCorruption(
            f"presence map {path}: record at offset {offset} has runs outside "
            f"[0, {limit}) or empty runs"
        )


def check_header(head: bytes | memoryview, path: str) -> tuple[int, int]:
    """The format version and sector size of a map whose first bytes are ``head`` (at least
    :data:`HEADER_SIZE` of them, or the whole file); :class:`DataCorruption` when they are
    not a map header this build reads. A caller may check it before reading the rest of a
    file that may not be a map at all (an image copied there by mistake, say)."""
    if len(head) < HEADER_SIZE:
        raise DataCorruption(f"presence map {path} is {len(head)} bytes, too short for its header")
    magic, version, sector_size, _header_count = _HEADER.unpack_from(head)
    if magic != MAGIC:
        raise DataCorruption(f"{path} is not a tierdisk sparse presence map (bad magic)")
    (crc,) = _CRC.unpack_from(head, _HEADER.size)
    if crc != zlib.crc32(memoryview(head)[: _HEADER.size]):
        raise DataCorruption(f"presence map {path}: the header checksum does not match")
    if version not in (1, VERSION):
        raise DataCorruption(
            f"presence map {path} has format version {version}; this build reads 1 and {VERSION}"
        )
    return version, sector_size


def parse(blob: bytes, path: str) -> MapState:
    """Decode a whole map file (``path`` names it in messages).

    Raises :class:`DataCorruption` for a bad header, a bad first record or a bad record in
    the middle; a last record cut short or failing its checksum (what a crash during an
    append leaves) is reported as :attr:`MapState.torn` instead. A last record that is whole
    and checksummed but wrong (out of sequence, a second ``SNAP``, runs past its size) is
    :class:`DataCorruption` too: no crash writes one.
    """
    view = memoryview(blob)
    version, sector_size = check_header(view, path)
    layout = _RECORD if version == VERSION else _RECORD_V1
    first = _record_at(view, HEADER_SIZE, layout)
    if first is None or first.kind != SNAP or first.removes:
        raise DataCorruption(f"presence map {path}: its snapshot record is missing or corrupt")
    _check_runs(first.adds, first.sector_count, path, HEADER_SIZE)
    try:
        present = RunSet.from_runs(_pairs(first.adds))
    except ValueError:
        raise DataCorruption(f"presence map {path}: its snapshot is not sorted") from None
    state = MapState(
        sector_size=sector_size,
        sector_count=first.sector_count,
        smallest=min(first.smallest, first.sector_count),
        version=version,
        present=present,
        seq=first.seq,
        end=first.end,
        snapshot_end=first.end,
        torn=0,
    )
    offset = first.end
    while offset < len(blob):
        rec = _record_at(view, offset, layout)
        if rec is None:
            later = _valid_record_after(blob, offset, layout)
            if later is not None:
                raise DataCorruption(
                    f"presence map {path}: the record at offset {offset} is corrupt but "
                    f"a valid record follows it (at offset {later})"
                )
            state.torn = len(blob) - offset
            break
        if rec.kind != DIFF or rec.seq != state.seq + 1:
            raise DataCorruption(
                f"presence map {path}: unexpected {rec.kind.decode()} record #{rec.seq} at "
                f"offset {offset} (after #{state.seq})"
            )
        _check_runs(rec.removes, _NOWHERE, path, offset)
        _check_runs(rec.adds, rec.sector_count, path, offset)
        for a, b in _pairs(rec.removes):
            present.remove(a, b)
        for a, b in _pairs(rec.adds):
            present.add(a, b)
        if rec.sector_count < state.sector_count:
            present.remove(rec.sector_count, _NOWHERE)
        state.sector_count = rec.sector_count
        state.smallest = min(state.smallest, rec.smallest, rec.sector_count)
        state.seq = rec.seq
        state.end = offset = rec.end
    return state
