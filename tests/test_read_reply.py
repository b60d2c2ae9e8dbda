"""The wire-format Read reply is byte-for-byte what protobuf would serialize (a batch's
``presence_reported`` first); a buffer from :func:`new_buffer` is a writable view of all of
it, and the view alone keeps it alive."""

from __future__ import annotations

import gc
import os
import sys

import pytest

from tierdisk.client.wire import read_reply_view
from tierdisk.service.read_reply import _DIRECT_MIN, PRESENCE_REPORTED, ReadReply, new_buffer
from tierdisk.v1 import blockdevice_pb2 as pb


# 127/128, 16383/16384 and 2 MiB - 1 / 2 MiB: the data length's varint grows by a byte there
@pytest.mark.parametrize(
    "nbytes",
    [127, 128, 512, 4096, 16383, 16 << 10, 127 << 10, 128 << 10, 1 << 20, (2 << 20) - 1, 2 << 20,
     16 << 20],
)  # fmt: skip
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


@pytest.mark.parametrize("nbytes", [512, 4096, _DIRECT_MIN - 1, _DIRECT_MIN, 1 << 20])
@pytest.mark.parametrize("present", [[], [(3, 9), (20, 21)]])
def test_a_batch_reply_says_presence_was_reported_before_its_data(
    nbytes: int, present: list[tuple[int, int]]
) -> None:
    """A ``ReadBatchResponse`` asked for presence: ``presence_reported`` first (protobuf
    parses fields in any order), then the data and any runs, so an answer with nothing held
    is the frame as built (from 128 KiB: no copy, the same object each time)."""
    data = os.urandom(nbytes)
    reply = ReadReply(nbytes, prefix=PRESENCE_REPORTED)
    reply.data[:] = data
    encoded = reply.encode(present)
    expected = pb.ReadBatchResponse(data=data)
    for a, b in present:
        expected.present.append(pb.Extent(sector=a, sector_count=b - a))
    assert encoded == PRESENCE_REPORTED + expected.SerializeToString()
    parsed = pb.ReadBatchResponse.FromString(encoded)
    assert parsed.presence_reported and parsed.data == data
    assert [(e.sector, e.sector_count) for e in parsed.present] == [(a, b - a) for a, b in present]
    view = read_reply_view(encoded)
    assert view is not None and view.presence_reported and bytes(view.data) == data
    if nbytes >= _DIRECT_MIN and not present:
        assert reply.encode(present) is encoded


@pytest.mark.parametrize("nbytes", [0, 512, 4096, _DIRECT_MIN - 1, _DIRECT_MIN, 1 << 20])
def test_new_buffer_is_a_writable_view_of_all_of_the_buffer(nbytes: int) -> None:
    buffer, view = new_buffer(nbytes)
    assert isinstance(buffer, bytes | bytearray)
    assert (len(buffer), view.nbytes, view.format, view.readonly) == (nbytes, nbytes, "B", False)
    if nbytes < _DIRECT_MIN:  # a zeroed bytearray (from 128 KiB on, undefined until written)
        assert isinstance(buffer, bytearray)
        assert bytes(view) == bytes(nbytes)
    pattern = bytes(range(256)) * (nbytes // 256) + bytes(nbytes % 256)
    view[:] = pattern
    assert buffer == pattern  # the view writes into the buffer itself, not a copy


@pytest.mark.skipif(sys.implementation.name != "cpython", reason="reference counts: CPython")
@pytest.mark.parametrize("nbytes", [4096, _DIRECT_MIN, 1 << 20])
def test_the_view_alone_keeps_the_buffer_alive(nbytes: int) -> None:
    """``nbd_commands.read`` keeps only the view (``_, view = new_buffer(n)``) while the
    volume reads into it and the reply is sent: the view must hold a reference to the
    buffer, or the 1 MiB ``bytes`` filled in place is freed under it."""
    buffer, view = new_buffer(nbytes)
    held = sys.getrefcount(buffer)
    del view
    gc.collect()
    assert sys.getrefcount(buffer) == held - 1  # the view's reference went with it
