"""The ``Write`` request read straight from its wire format, its data a view of the bytes gRPC
received.

Through protobuf, a 1 MiB ``WriteRequest`` is copied twice before the engine sees it: once
into the parsed message, once more by every read of its ``data`` field. :func:`parse_write`
instead walks the wire format (``tierdisk/v1/blockdevice.proto``: ``volume`` = 1, ``sector`` =
2, ``data`` = 3, ``fua`` = 4, ``no_overwrite`` = 5, ``sector_size`` = 6) and hands the
engine a ``memoryview`` into the received bytes, so the data is copied once, into the layer
that stores it.

It reads what protobuf reads: fields in any order, the last occurrence of a field wins,
unknown fields (groups included) and fields of an unexpected wire type are skipped,
``volume`` must be UTF-8 (``tests/test_write_request.py`` holds it to protobuf's own parser
on generated and random input). Input protobuf would refuse (a truncated field, a varint
over 10 bytes, field number 0, an unmatched group end, a reserved wire type, bad UTF-8) is
raises :class:`MalformedRequest` saying what is wrong; the servicer answers it
``INVALID_ARGUMENT`` (``request_decoding.Undecodable``).
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from tierdisk.client.wire import decode_varint
from tierdisk.v1 import blockdevice_pb2 as pb

__all__ = ["MalformedRequest", "WriteRequestView", "parse_write", "parse_write_wire"]

_EMPTY = memoryview(b"")
_PROTOBUF_BELOW = 32 << 10  # requests smaller than this are parsed by protobuf
_VARINT, _FIXED64, _LENGTH, _START_GROUP, _END_GROUP, _FIXED32 = 0, 1, 2, 3, 4, 5
_MAX_FIELD = 1 << 29  # field numbers are below this
_MAX_DEPTH = 100  # groups nested deeper are refused (protobuf's own recursion limit)
_VOLUME, _SECTOR, _DATA, _FUA, _NO_OVERWRITE, _SECTOR_SIZE = 1, 2, 3, 4, 5, 6
_UINT32 = (1 << 32) - 1  # a uint32 field keeps the low 32 bits of its varint, as protobuf


@dataclass(slots=True)
class WriteRequestView:
    """A ``WriteRequest``: the fields the servicer reads, ``data`` without a copy."""

    volume: str = ""
    sector: int = 0
    data: memoryview = _EMPTY
    fua: bool = False
    no_overwrite: bool = False
    sector_size: int = 0

    @classmethod
    def of(cls, message: pb.WriteRequest) -> WriteRequestView:
        """The view of a parsed message (its ``data`` copied once, by the field read)."""
        return cls(
            message.volume,
            message.sector,
            memoryview(message.data),
            message.fua,
            message.no_overwrite,
            message.sector_size,
        )


class MalformedRequest(ValueError):
    """The bytes are not a ``WriteRequest``; the message says what is wrong."""


def _varint(raw: bytes, pos: int, end: int) -> tuple[int, int]:
    try:
        return decode_varint(raw, pos, end)
    except ValueError as exc:
        raise MalformedRequest(str(exc)) from None


def parse_write(raw: bytes) -> WriteRequestView:
    """The ``WriteRequest`` in ``raw`` (a serialized message); :class:`MalformedRequest` if
    it is not one.

    Below :data:`_PROTOBUF_BELOW` bytes protobuf's own parser is faster (its C parse and the
    copy of a small payload cost less than this module's Python: 1.3 against 2.5 µs for a
    4 KiB write), so it reads those; this module reads the rest, and anything protobuf
    refuses, to say what is wrong with it."""
    if len(raw) < _PROTOBUF_BELOW:
        try:
            return WriteRequestView.of(pb.WriteRequest.FromString(raw))
        except DecodeError:
            pass
    return parse_write_wire(raw)


def parse_write_wire(raw: bytes) -> WriteRequestView:
    """:func:`parse_write` by this module's own reader, whatever the size."""
    view = WriteRequestView()
    _parse_into(view, raw)
    return view


def _parse_into(view: WriteRequestView, raw: bytes) -> None:
    pos = 0
    end = len(raw)
    whole = memoryview(raw)
    while pos < end:
        tag, pos = _varint(raw, pos, end)
        field, wire = tag >> 3, tag & 7
        if wire == _VARINT and field in (_SECTOR, _FUA, _NO_OVERWRITE, _SECTOR_SIZE):
            value, pos = _varint(raw, pos, end)
            if field == _SECTOR:
                view.sector = value
            elif field == _FUA:
                view.fua = value != 0
            elif field == _NO_OVERWRITE:
                view.no_overwrite = value != 0
            else:
                view.sector_size = value & _UINT32
        elif wire == _LENGTH and field in (_DATA, _VOLUME):
            length, pos = _varint(raw, pos, end)
            stop = pos + length
            if stop > end:
                raise MalformedRequest(f"field {field} runs past the end of the message")
            if field == _DATA:
                view.data = whole[pos:stop]
            else:
                try:
                    view.volume = raw[pos:stop].decode()
                except UnicodeDecodeError:
                    raise MalformedRequest("volume is not UTF-8") from None
            pos = stop
        else:
            if field == 0:
                raise MalformedRequest("field number 0")
            pos = _skip(raw, pos, end, field, wire, 0)


def _skip(raw: bytes, pos: int, end: int, field: int, wire: int, depth: int) -> int:
    """The position after the value of an unknown ``field`` of type ``wire`` at ``pos``
    (inside a group, protobuf lets field number 0 pass too)."""
    if field >= _MAX_FIELD:
        raise MalformedRequest(f"field number {field}")
    if wire == _VARINT:
        return _varint(raw, pos, end)[1]
    if wire == _LENGTH:
        length, pos = _varint(raw, pos, end)
        pos += length
    elif wire == _FIXED64:
        pos += 8
    elif wire == _FIXED32:
        pos += 4
    elif wire == _START_GROUP:
        return _skip_group(raw, pos, end, field, depth + 1)
    else:
        raise MalformedRequest(f"wire type {wire} (field {field})")
    if pos > end:
        raise MalformedRequest(f"field {field} runs past the end of the message")
    return pos


def _skip_group(raw: bytes, pos: int, end: int, field: int, depth: int) -> int:
    """The position after the group of ``field`` whose fields start at ``pos``."""
    if depth > _MAX_DEPTH:
        raise MalformedRequest(f"groups nested more than {_MAX_DEPTH} deep")
    while pos < end:
        tag, pos = _varint(raw, pos, end)
        inner, wire = tag >> 3, tag & 7
        if wire == _END_GROUP:
            if inner != field:
                raise MalformedRequest(f"group {field} ended as group {inner}")
            return pos
        pos = _skip(raw, pos, end, inner, wire, depth)
    raise MalformedRequest(f"the message ends inside group {field}")
