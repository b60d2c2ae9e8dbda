"""Messages of the data path read and written in protobuf's wire format, without the copies
protobuf makes of their data.

Parsing a 1 MiB ``ReadResponse`` with protobuf and reading its ``data`` field copies the data
twice (into the message, then out into a new ``bytes``). A reply holds field 1 (``data``) and,
for a read with ``report_presence``, field 2 (``present`` extents); a ``ReadBatchResponse``
has the same two fields and field 3 (``presence_reported``). So the client asks gRPC for
the raw reply and takes a :class:`memoryview` of the data part and the extents
(:func:`read_reply_view`): the caller's own copy (into its buffer) is the only one. A field
this client does not know makes it return None, and the caller parses the reply with
protobuf.

Building a ``WriteRequest`` through protobuf copies the payload into the message and again
into the serialized bytes; :func:`encode_write` serializes the small fields with protobuf and
appends the data field itself, one copy in all.

:func:`decode_varint` and :func:`encode_varint` are the wire format's base-128 integers, as
protobuf reads and writes them (the server's wire-format readers use them too).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from tierdisk.v1 import blockdevice_pb2 as pb

__all__ = ["ReplyView", "decode_varint", "encode_varint", "encode_write", "read_reply_view"]

_DATA_TAG = 0x0A  # ReadResponse.data: field 1, wire type 2 (length-delimited)
_PRESENT_TAG = 0x12  # ReadResponse.present: field 2, wire type 2 (an Extent message)
_REPORTED_TAG = 0x18  # ReadBatchResponse.presence_reported: field 3, varint (a bool)
_SECTOR_TAG, _COUNT_TAG = 0x08, 0x10  # Extent.sector, Extent.sector_count: varints
_WRITE_DATA_TAG = 0x1A  # WriteRequest.data: field 3, wire type 2
_FUA_TRUE = b"\x20\x01"  # WriteRequest.fua = true: field 4, varint 1
_NO_OVERWRITE_TRUE = b"\x28\x01"  # WriteRequest.no_overwrite = true: field 5, varint 1
_SECTOR_SIZE_TAG = b"\x30"  # WriteRequest.sector_size: field 6, varint
_UINT64 = (1 << 64) - 1


def decode_varint(raw: bytes, pos: int, end: int | None = None) -> tuple[int, int]:
    """The varint at ``raw[pos:end]`` and the position after it, as protobuf reads it: at
    most 10 bytes, the low 64 bits kept. ValueError if it is cut short or longer."""
    stop = len(raw) if end is None else end
    value = 0
    shift = 0
    while pos < stop:
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & _UINT64, pos
        shift += 7
        if shift >= 70:
            raise ValueError("a varint longer than 10 bytes")
    raise ValueError("the message ends inside a varint")


def encode_varint(n: int) -> bytes:
    """``n`` (0 <= n < 2**64) as a varint."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class ReplyView(NamedTuple):
    """A serialized ``ReadResponse`` or ``ReadBatchResponse``, read by :func:`read_reply_view`."""

    data: memoryview
    """``data``: a view of the reply (empty if the field is absent)."""
    present: list[tuple[int, int]]
    """``present``: ``(sector, sector_count)`` pairs as they came."""
    presence_reported: bool = False
    """``presence_reported`` (only a ``ReadBatchResponse`` has it)."""


def read_reply_view(raw: bytes) -> ReplyView | None:
    """The fields of the serialized ``ReadResponse`` or ``ReadBatchResponse`` ``raw``, the
    data a view of ``raw``, or None if ``raw`` holds any other field (then parse it with
    protobuf).

    Raises ValueError for bytes that are not a well-formed message of that shape (a length
    past the end, a truncated varint). As protobuf does, the last ``data`` and
    ``presence_reported`` fields win, and every ``present`` field adds an extent.
    """
    view = memoryview(raw)
    data = view[:0]
    extents: list[tuple[int, int]] = []
    reported = False
    pos = 0
    end = len(raw)
    while pos < end:
        tag = raw[pos]
        if tag == _REPORTED_TAG:
            value, pos = decode_varint(raw, pos + 1)
            reported = value != 0
            continue
        if tag != _DATA_TAG and tag != _PRESENT_TAG:
            return None
        length, pos = decode_varint(raw, pos + 1)
        stop = pos + length
        if stop > end:
            raise ValueError(f"field of {length} bytes runs past the reply's end")
        if tag == _DATA_TAG:
            data = view[pos:stop]
        else:
            extent = _extent(raw, pos, stop)
            if extent is None:
                return None
            extents.append(extent)
        pos = stop
    return ReplyView(data, extents, reported)


def _extent(raw: bytes, pos: int, end: int) -> tuple[int, int] | None:
    """The ``Extent`` message in ``raw[pos:end]`` (None if it holds another field)."""
    sector = count = 0
    while pos < end:
        tag = raw[pos]
        if tag != _SECTOR_TAG and tag != _COUNT_TAG:
            return None
        value, pos = decode_varint(raw, pos + 1, end)
        if tag == _SECTOR_TAG:
            sector = value
        else:
            count = value
    return sector, count


@functools.lru_cache(maxsize=16)
def _sector_size_field(sector_size: int) -> bytes:
    """``WriteRequest.sector_size`` as it goes on the wire (a handful of sizes exist)."""
    return _SECTOR_SIZE_TAG + encode_varint(sector_size)


def encode_write(
    volume: str,
    sector: int,
    data: memoryview,
    *,
    fua: bool,
    no_overwrite: bool,
    sector_size: int = 0,
) -> bytes:
    """The serialized ``WriteRequest``, byte for byte what protobuf writes for the same
    fields, with ``data`` copied once (into the result)."""
    head = pb.WriteRequest(volume=volume, sector=sector).SerializeToString()  # fields 1, 2
    tail = (_FUA_TRUE if fua else b"") + (_NO_OVERWRITE_TRUE if no_overwrite else b"")
    if sector_size:  # field 6, after fua (4) and no_overwrite (5), as protobuf orders them
        tail += _sector_size_field(sector_size)
    if not len(data):  # proto3 leaves an empty field out
        return head + tail
    tag = bytes((_WRITE_DATA_TAG,)) + encode_varint(len(data))
    return b"".join((head, tag, data, tail))
