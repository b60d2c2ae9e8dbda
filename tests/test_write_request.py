"""The wire-format ``WriteRequest`` reader reads what protobuf's parser reads, and refuses
(:class:`MalformedRequest`) what it refuses; its data is a view of the received bytes, not a
copy."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import example, given
from hypothesis import strategies as st

from tierdisk.client.wire import encode_varint
from tierdisk.service.write_request import (
    MalformedRequest,
    WriteRequestView,
    parse_write,
    parse_write_wire,
)
from tierdisk.v1 import blockdevice_pb2 as pb

UINT64 = st.integers(0, (1 << 64) - 1)


def _field(number: int, wire: int, body: bytes) -> bytes:
    return encode_varint(number << 3 | wire) + body


@st.composite
def unknown_field(draw: st.DrawFn, depth: int = 0) -> bytes:
    """One field protobuf keeps as unknown: a number the message does not define, or a known
    number with another wire type; groups (nested) included."""
    number = draw(st.one_of(st.integers(7, 5000), st.integers(1, 6)))
    kinds = ["varint", "fixed64", "fixed32", "bytes"] + (["group"] if depth < 3 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "varint":
        if number in (2, 4, 5, 6):  # known varint fields: that would be a value, not unknown
            number += 10
        return _field(number, 0, encode_varint(draw(UINT64)))
    if kind == "fixed64":
        return _field(number, 1, draw(st.binary(min_size=8, max_size=8)))
    if kind == "fixed32":
        return _field(number, 5, draw(st.binary(min_size=4, max_size=4)))
    if kind == "bytes":
        if number in (1, 3):  # known length-delimited fields
            number += 10
        body = draw(st.binary(max_size=20))
        return _field(number, 2, encode_varint(len(body)) + body)
    inner = b"".join(draw(st.lists(unknown_field(depth + 1), max_size=3)))
    return _field(number, 3, inner) + _field(number, 4, b"")


def _same(view: WriteRequestView, message: pb.WriteRequest) -> None:
    assert view.volume == message.volume
    assert view.sector == message.sector
    assert bytes(view.data) == message.data
    assert view.fua == message.fua
    assert view.no_overwrite == message.no_overwrite
    assert view.sector_size == message.sector_size


@given(
    volume=st.text(max_size=20),
    sector=UINT64,
    data=st.binary(max_size=3000),
    fua=st.booleans(),
    no_overwrite=st.booleans(),
    sector_size=st.integers(0, (1 << 32) - 1),
    noise=st.lists(unknown_field(), max_size=4),
    repeat=st.booleans(),
)
def test_reads_what_protobuf_serializes(
    volume: str,
    sector: int,
    data: bytes,
    fua: bool,
    no_overwrite: bool,
    sector_size: int,
    noise: list[bytes],
    repeat: bool,
) -> None:
    """Fields in any order, unknown fields in between, and a field given twice (the last
    one wins) read as protobuf reads them."""
    message = pb.WriteRequest(
        volume=volume,
        sector=sector,
        data=data,
        fua=fua,
        no_overwrite=no_overwrite,
        sector_size=sector_size,
    )
    raw = message.SerializeToString()
    if repeat:  # an earlier occurrence of every field, with other values
        earlier = pb.WriteRequest(
            volume="x", sector=7, data=b"old", fua=True, no_overwrite=True, sector_size=4096
        )
        raw = earlier.SerializeToString() + raw
    raw = b"".join(noise[:2]) + raw + b"".join(noise[2:])
    _same(parse_write_wire(raw), pb.WriteRequest.FromString(raw))


@given(st.binary(max_size=40))
@example(b"\x0a\x05ab")  # a string longer than what is left
@example(b"\x0a\x02\xff\xfe")  # volume not UTF-8
@example(b"\x10" + b"\xff" * 10 + b"\x01")  # an 11-byte varint
@example(b"\x10" + b"\xff" * 9 + b"\x7f")  # a 10-byte varint: the low 64 bits
@example(b"\x00\x01")  # field number 0
@example(b"\x33\x34")  # an empty group of field 6
@example(b"\x33\x3c")  # a group of field 6 that ends as field 7
@example(b"\x34")  # a group end with no group
@example(b"\x33\x00\x08\x34")  # field number 0 inside a group: protobuf lets it pass
@example(b"\x37\x00")  # wire type 7
@example(b"\x31" + b"\x00" * 7)  # a fixed64 one byte short
def test_refuses_what_protobuf_refuses(raw: bytes) -> None:
    try:
        message = pb.WriteRequest.FromString(raw)
    except DecodeError:
        with pytest.raises(MalformedRequest):
            parse_write_wire(raw)
        with pytest.raises(MalformedRequest):  # below 32 KiB protobuf, then the wire reader
            parse_write(raw)
    else:
        _same(parse_write_wire(raw), message)
        assert parse_write(raw) == parse_write_wire(raw)


@pytest.mark.parametrize("nbytes", [32 << 10, 1 << 20])
def test_large_data_is_a_view_of_the_received_bytes(nbytes: int) -> None:
    payload = bytes(range(256)) * (nbytes // 256)
    raw = pb.WriteRequest(volume="v", sector=8, data=payload).SerializeToString()
    view = parse_write(raw)
    assert view.data.obj is raw  # no copy: a window on the message
    assert view.data == payload


def test_small_requests_read_by_protobuf_read_the_same() -> None:
    raw = pb.WriteRequest(volume="v", sector=8, data=b"\x01" * 4096, fua=True).SerializeToString()
    assert parse_write(raw) == parse_write_wire(raw)
    assert parse_write(raw).data.obj is not raw  # protobuf's copy: cheaper at this size


@pytest.mark.parametrize("fua", [False, True])
def test_of_a_message(fua: bool) -> None:
    message = pb.WriteRequest(volume="v", sector=3, data=b"abc", fua=fua)
    _same(WriteRequestView.of(message), message)


# -- explicit false on the wire -----------------------------------------------------------------

_FUA, _NO_OVERWRITE, _SECTOR_SIZE = 4, 5, 6  # WriteRequest's varint fields (and sector, 2)


def _varint_field(number: int, value: int, pad: int = 0) -> bytes:
    """Field ``number`` as a varint of ``value``, ``pad`` continuation bytes longer than it
    needs (as a non-canonical encoder may write it)."""
    body = bytearray(encode_varint(value))
    if pad:
        body[-1] |= 0x80
        body += b"\x80" * (pad - 1) + b"\x00"
    return _field(number, 0, bytes(body))


@pytest.mark.parametrize(
    ("before", "after", "fua", "no_overwrite"),
    [
        (b"", _varint_field(_FUA, 0) + _varint_field(_NO_OVERWRITE, 0), False, False),
        (b"", _varint_field(_NO_OVERWRITE, 0, pad=3) + _varint_field(_FUA, 0, pad=9), False, False),
        (b"", _varint_field(_NO_OVERWRITE, 1 << 64) + _varint_field(_FUA, 1 << 64), False, False),
        (b"", _varint_field(_NO_OVERWRITE, 2) + _varint_field(_FUA, 1 << 40), True, True),
        (
            b"",
            _varint_field(_NO_OVERWRITE, 0)
            + _varint_field(_NO_OVERWRITE, 7)
            + _varint_field(_FUA, 0),
            False,
            True,
        ),
        (_varint_field(_NO_OVERWRITE, 0) + _varint_field(_FUA, 0), b"", None, None),
    ],
)
@pytest.mark.parametrize("in_message", [False, True])
def test_an_explicit_zero_is_false_in_a_large_write(
    before: bytes, after: bytes, fua: bool | None, no_overwrite: bool | None, in_message: bool
) -> None:
    """protobuf never writes a false ``bool``, but reads one (a non-canonical encoder, or a
    later occurrence overriding an earlier ``true``): an explicit 0 is False (a varint's low
    64 bits, as ``1 << 64`` is), any other value True, the last occurrence winning. A large
    write (from 32 KiB, read by this module) that took a 0 for True would skip every sector
    already written (``no_overwrite``) and still be acknowledged. None: the value in the
    message (``in_message``), which comes after ``before``."""
    message = pb.WriteRequest(
        volume="v", sector=8, data=b"\x5a" * (32 << 10), fua=in_message, no_overwrite=in_message
    )
    raw = before + message.SerializeToString() + after
    want = (
        in_message if fua is None else fua,
        in_message if no_overwrite is None else no_overwrite,
    )
    expected = pb.WriteRequest.FromString(raw)
    assert (expected.fua, expected.no_overwrite) == want
    for parse in (parse_write, parse_write_wire):
        view = parse(raw)
        _same(view, expected)
        assert (view.fua, view.no_overwrite) == want
    assert parse_write(raw).data.obj is raw  # read by this module, not protobuf


@given(
    message=st.builds(
        pb.WriteRequest,
        volume=st.text(max_size=10),
        sector=UINT64,
        data=st.binary(max_size=100),
        fua=st.booleans(),
        no_overwrite=st.booleans(),
        sector_size=st.integers(0, (1 << 32) - 1),
    ),
    explicit=st.lists(
        st.tuples(
            st.sampled_from([2, _FUA, _NO_OVERWRITE, _SECTOR_SIZE]),
            st.one_of(st.just(0), st.just(1), UINT64, st.integers(1 << 64, (1 << 70) - 1)),
            st.integers(0, 3),
        ),
        min_size=1,
        max_size=4,
    ),
    at_end=st.booleans(),
)
def test_explicit_varint_fields_read_as_protobuf_reads_them(
    message: pb.WriteRequest, explicit: list[tuple[int, int, int]], at_end: bool
) -> None:
    """The varint fields (``sector``, ``fua``, ``no_overwrite``, ``sector_size``: a uint32,
    which keeps the low 32 bits of a longer value) given explicitly, zero or
    not, canonical or padded, before or after the message's own."""
    fields = b"".join(
        _varint_field(number, value, pad)
        for number, value, pad in explicit
        if len(encode_varint(value)) + pad <= 10  # protobuf refuses longer varints
    )
    raw = message.SerializeToString()
    raw = raw + fields if at_end else fields + raw
    _same(parse_write_wire(raw), pb.WriteRequest.FromString(raw))


# -- group nesting ------------------------------------------------------------------------------


def _nested_groups(depth: int) -> bytes:
    """``depth`` groups of field 6, each inside the one before."""
    return b"\x33" * depth + b"\x34" * depth


@pytest.mark.parametrize("large", [False, True])
def test_groups_nested_100_deep_are_read_as_protobuf_reads_them(large: bool) -> None:
    data = b"\x01" * ((32 << 10) if large else 16)
    raw = _nested_groups(100) + pb.WriteRequest(volume="v", data=data).SerializeToString()
    expected = pb.WriteRequest.FromString(raw)  # protobuf's own limit: 100
    _same(parse_write_wire(raw), expected)
    _same(parse_write(raw), expected)


@pytest.mark.parametrize("depth", [101, 102, 5000, 100_000])
@pytest.mark.parametrize("large", [False, True])
def test_groups_nested_deeper_than_100_are_a_malformed_request(depth: int, large: bool) -> None:
    """Refused as protobuf refuses them, and as a :class:`MalformedRequest` (the servicer's
    ``INVALID_ARGUMENT``) however deep: never a RecursionError, an unexpected error in the
    handler."""
    data = b"\x01" * ((32 << 10) if large else 16)
    raw = pb.WriteRequest(volume="v", data=data).SerializeToString() + _nested_groups(depth)
    with pytest.raises(DecodeError):
        pb.WriteRequest.FromString(raw)
    for parse in (parse_write_wire, parse_write):
        with pytest.raises(MalformedRequest, match="groups nested more than 100 deep"):
            parse(raw)
