"""client/wire.py: the data of a serialized ReadResponse, taken without protobuf, agrees with
protobuf's parse for every shape a server sends, and refuses what it cannot handle."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tierdisk.client.wire import read_data_view
from tierdisk.v1 import blockdevice_pb2 as pb


@given(st.binary(max_size=70_000))
def test_data_only_replies_match_protobuf(data: bytes) -> None:
    raw = pb.ReadResponse(data=data).SerializeToString()
    view = read_data_view(raw)
    assert view is not None
    assert bytes(view) == pb.ReadResponse.FromString(raw).data == data
    assert view.obj is raw or len(data) == 0  # a view of the reply, no copy


def test_an_empty_reply_has_empty_data() -> None:
    view = read_data_view(b"")
    assert view is not None and len(view) == 0


def test_the_last_data_field_wins_as_in_protobuf() -> None:
    raw = (
        pb.ReadResponse(data=b"first").SerializeToString()
        + pb.ReadResponse(data=b"second!").SerializeToString()
    )
    view = read_data_view(raw)
    assert view is not None
    assert bytes(view) == pb.ReadResponse.FromString(raw).data == b"second!"


def test_a_reply_with_present_extents_is_left_to_protobuf() -> None:
    raw = pb.ReadResponse(
        data=bytes(1024), present=[pb.Extent(sector=0, sector_count=2)]
    ).SerializeToString()
    assert read_data_view(raw) is None


def test_an_unknown_field_is_left_to_protobuf() -> None:
    raw = pb.ReadResponse(data=b"x" * 512).SerializeToString() + b"\x78\x01"  # field 15
    assert read_data_view(raw) is None


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
        read_data_view(raw)
