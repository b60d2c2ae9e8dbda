"""The wire-format Read reply is byte-for-byte what protobuf would serialize."""

from __future__ import annotations

import os

import pytest

from tierdisk.service.read_reply import ReadReply
from tierdisk.v1 import blockdevice_pb2 as pb


@pytest.mark.parametrize("nbytes", [512, 4096, 127 << 10, 128 << 10, 1 << 20, 16 << 20])
@pytest.mark.parametrize("present", [None, [], [(3, 9), (20, 21)]])
def test_matches_protobuf(nbytes: int, present: list[tuple[int, int]] | None) -> None:
    data = os.urandom(nbytes)
    reply = ReadReply(nbytes)
    reply.data[:] = data
    encoded = reply.encode(present)
    expected = pb.ReadResponse(data=data)
    for a, b in present or ():
        expected.present.append(pb.Extent(sector=a, sector_count=b - a))
    assert encoded == expected.SerializeToString()
    assert isinstance(encoded, bytes)
    parsed = pb.ReadResponse.FromString(encoded)
    assert parsed.data == data
