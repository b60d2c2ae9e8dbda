"""The data of a serialized ``ReadResponse``, as a view of the received bytes.

Parsing a 1 MiB reply with protobuf and reading its ``data`` field copies the data twice
(into the message, then out into a new ``bytes``). A reply of a read without
``report_presence`` holds only field 1 (``data``), so the client asks gRPC for the raw reply
and takes a :class:`memoryview` of the data part: the caller's own copy (into its buffer) is
the only one. Anything else in the reply (``present`` extents, a field this client does not
know) makes :func:`read_data_view` return None, and the caller parses it with protobuf.
"""

from __future__ import annotations

__all__ = ["read_data_view"]

_DATA_TAG = 0x0A  # ReadResponse.data: field 1, wire type 2 (length-delimited)


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``raw[pos:]`` and the position after it; ValueError if cut short."""
    value = 0
    shift = 0
    while True:
        if pos >= len(raw) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def read_data_view(raw: bytes) -> memoryview | None:
    """The ``data`` of the serialized ``ReadResponse`` ``raw`` as a view of ``raw`` (empty
    if the field is absent), or None if ``raw`` holds any other field.

    Raises ValueError for bytes that are not a well-formed message of that shape (a length
    past the end, a truncated varint). As protobuf does, the last ``data`` field wins.
    """
    view = memoryview(raw)
    data = view[:0]
    pos = 0
    end = len(raw)
    while pos < end:
        if raw[pos] != _DATA_TAG:
            return None
        length, pos = _varint(raw, pos + 1)
        if pos + length > end:
            raise ValueError(f"data field of {length} bytes runs past the reply's end")
        data = view[pos : pos + length]
        pos += length
    return data
