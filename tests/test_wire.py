"""client/wire.py: the data of a serialized ReadResponse, taken without protobuf, agrees with
protobuf's parse for every shape a server sends, and refuses what it cannot handle; a
WriteRequest encoded here is byte for byte protobuf's; varints read and written as protobuf
does."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tierdisk.client.wire import (
    decode_varint,
    encode_varint,
    encode_write,
    read_reply_view,
)
from tierdisk.v1 import blockdevice_pb2 as pb


@given(st.binary(max_size=70_000))
def test_data_only_replies_match_protobuf(data: bytes) -> None:
    raw = pb.ReadResponse(data=data).SerializeToString()
    reply = read_reply_view(raw)
    assert reply is not None
    view, extents, reported = reply
    assert bytes(view) == pb.ReadResponse.FromString(raw).data == data
    assert extents == []
    assert not reported
    assert view.obj is raw or len(data) == 0  # a view of the reply, no copy


def test_an_empty_reply_has_empty_data() -> None:
    assert read_reply_view(b"") == (memoryview(b""), [], False)


def test_the_last_data_field_wins_as_in_protobuf() -> None:
    raw = (
        pb.ReadResponse(data=b"first").SerializeToString()
        + pb.ReadResponse(data=b"second!").SerializeToString()
    )
    reply = read_reply_view(raw)
    assert reply is not None
    assert bytes(reply[0]) == pb.ReadResponse.FromString(raw).data == b"second!"


def test_an_unknown_field_is_left_to_protobuf() -> None:
    raw = pb.ReadResponse(data=b"x" * 512).SerializeToString() + b"\x78\x01"  # field 15
    assert read_reply_view(raw) is None


@pytest.mark.parametrize(
    "raw",
    [
        b"\x0a",  # tag, no length
        b"\x0a\x80",  # length varint cut short
        b"\x0a\x05abc",  # length past the end
        b"\x0a" + b"\xff" * 11,  # overlong varint
    ],
)
def test_malformed_replies_are_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):
        read_reply_view(raw)


@given(
    volume=st.text(max_size=30),
    sector=st.integers(0, (1 << 64) - 1),
    data=st.binary(max_size=5000),
    fua=st.booleans(),
    no_overwrite=st.booleans(),
    sector_size=st.sampled_from([0, 512, 4096, 1 << 16, (1 << 32) - 1]),
)
def test_encode_write_is_what_protobuf_serializes(
    volume: str, sector: int, data: bytes, fua: bool, no_overwrite: bool, sector_size: int
) -> None:
    expected = pb.WriteRequest(
        volume=volume,
        sector=sector,
        data=data,
        fua=fua,
        no_overwrite=no_overwrite,
        sector_size=sector_size,
    ).SerializeToString()
    got = encode_write(
        volume,
        sector,
        memoryview(data),
        fua=fua,
        no_overwrite=no_overwrite,
        sector_size=sector_size,
    )
    assert got == expected


@given(st.integers(0, (1 << 64) - 1), st.binary(max_size=3))
def test_varints_round_trip(n: int, after: bytes) -> None:
    raw = encode_varint(n) + after
    assert decode_varint(raw, 0) == (n, len(raw) - len(after))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "ends inside"),
        (b"\x80\x80", "ends inside"),
        (b"\xff" * 10 + b"\x01", "longer than 10 bytes"),
    ],
)
def test_decode_varint_refuses_cut_or_overlong(raw: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_varint(raw, 0)


def test_decode_varint_keeps_the_low_64_bits_of_a_10_byte_varint() -> None:
    """As protobuf reads it (a negative int64 is sent as 10 bytes)."""
    raw = pb.WriteRequest(sector=(1 << 64) - 1).SerializeToString()[1:]  # after the tag
    assert decode_varint(raw, 0) == ((1 << 64) - 1, 10)
    assert decode_varint(b"\xff" * 9 + b"\x7f", 0) == ((1 << 64) - 1, 10)


@given(
    data=st.binary(max_size=5000),
    present=st.lists(
        st.tuples(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1)), max_size=6
    ),
)
def test_replies_with_presence_match_protobuf(data: bytes, present: list[tuple[int, int]]) -> None:
    message = pb.ReadResponse(data=data)
    for sector, count in present:
        message.present.append(pb.Extent(sector=sector, sector_count=count))
    raw = message.SerializeToString()
    reply = read_reply_view(raw)
    assert reply is not None
    view, extents, reported = reply
    parsed = pb.ReadResponse.FromString(raw)
    assert bytes(view) == parsed.data
    assert extents == [(e.sector, e.sector_count) for e in parsed.present]
    assert not reported
    assert view.obj is raw or not data  # a view of the reply, no copy


@given(
    data=st.binary(max_size=5000),
    present=st.lists(st.tuples(st.integers(0, 1 << 40), st.integers(0, 1 << 20)), max_size=6),
    reported=st.booleans(),
)
def test_batch_replies_match_protobuf(
    data: bytes, present: list[tuple[int, int]], reported: bool
) -> None:
    message = pb.ReadBatchResponse(data=data, presence_reported=reported)
    for sector, count in present:
        message.present.append(pb.Extent(sector=sector, sector_count=count))
    raw = message.SerializeToString()
    reply = read_reply_view(raw)
    assert reply is not None
    parsed = pb.ReadBatchResponse.FromString(raw)
    assert bytes(reply.data) == parsed.data
    assert reply.present == [(e.sector, e.sector_count) for e in parsed.present]
    assert reply.presence_reported is parsed.presence_reported is reported


def test_the_last_presence_reported_field_wins_as_in_protobuf() -> None:
    raw = b"\x18\x01" + pb.ReadBatchResponse(data=b"x").SerializeToString() + b"\x18\x00"
    reply = read_reply_view(raw)
    assert reply is not None
    assert reply.presence_reported is pb.ReadBatchResponse.FromString(raw).presence_reported
    assert not reply.presence_reported
    with pytest.raises(ValueError):
        read_reply_view(b"\x18\x80")  # its varint cut short


def test_an_extent_with_a_field_it_does_not_know_is_left_to_protobuf() -> None:
    extent = pb.Extent(sector=4, sector_count=2).SerializeToString() + b"\x18\x01"  # field 3
    raw = pb.ReadResponse(data=b"x" * 512).SerializeToString() + b"\x12" + bytes([len(extent)])
    assert read_reply_view(raw + extent) is None


@pytest.mark.parametrize(
    "raw",
    [
        b"\x12\x05\x08\x01",  # an extent longer than the reply
        b"\x12\x02\x08\x80",  # a varint cut by the extent's end
    ],
)
def test_malformed_presence_is_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):
        read_reply_view(raw)


# Where a varint grows by a byte (2**7, 2**14, 2**21, ...), and either side of it.
_EDGES = (1 << 7, 1 << 14, 1 << 21, 1 << 28, 1 << 35, 1 << 63)
VARINT_EDGES = [edge + delta for edge in _EDGES for delta in (-1, 0, 1)] + [1, (1 << 64) - 1]


@pytest.mark.parametrize("n", VARINT_EDGES)
def test_varints_at_each_byte_boundary_are_what_protobuf_writes(n: int) -> None:
    canonical = pb.Extent(sector=n).SerializeToString()[1:]  # after the tag
    assert encode_varint(n) == canonical
    assert len(canonical) == (n.bit_length() + 6) // 7
    assert decode_varint(canonical, 0) == (n, len(canonical))


def test_zero_is_one_byte() -> None:
    assert encode_varint(0) == b"\x00"
    assert decode_varint(b"\x00", 0) == (0, 1)


# Payloads whose length varint is at a byte boundary: 1/2 bytes (127, 128), 2/3 bytes
# (16 KiB - 1, 16 KiB: a 32-sector I/O), 3/4 bytes (2 MiB - 1, 2 MiB).
BOUNDARY_SIZES = [127, 128, (16 << 10) - 1, 16 << 10, (2 << 20) - 1, 2 << 20]


@pytest.mark.parametrize("nbytes", BOUNDARY_SIZES)
@pytest.mark.parametrize("flags", [False, True])
def test_writes_with_a_length_at_a_varint_boundary_round_trip(nbytes: int, flags: bool) -> None:
    data = bytes(range(256)) * (nbytes // 256) + bytes(range(nbytes % 256))
    raw = encode_write("vol", 1 << 21, memoryview(data), fua=flags, no_overwrite=flags)
    expected = pb.WriteRequest(
        volume="vol", sector=1 << 21, data=data, fua=flags, no_overwrite=flags
    ).SerializeToString()
    assert raw == expected
    parsed = pb.WriteRequest.FromString(raw)
    assert (parsed.volume, parsed.sector, parsed.data) == ("vol", 1 << 21, data)
    assert parsed.fua == parsed.no_overwrite == flags


@pytest.mark.parametrize("nbytes", BOUNDARY_SIZES)
def test_replies_with_a_length_at_a_varint_boundary_are_read(nbytes: int) -> None:
    data = bytes(range(256)) * (nbytes // 256) + bytes(range(nbytes % 256))
    message = pb.ReadResponse(data=data)
    message.present.append(pb.Extent(sector=1 << 14, sector_count=1 << 21))
    raw = message.SerializeToString()
    reply = read_reply_view(raw)
    assert reply is not None
    view, extents, _ = reply
    assert view == data
    assert view.obj is raw
    assert extents == [(1 << 14, 1 << 21)]
