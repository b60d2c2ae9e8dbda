"""The replies of ``Read`` and ``ReadBatch`` as the client takes them: the data, the runs some
layer holds and ``presence_reported`` of a serialized reply, read without copying the data
(:func:`~tierdisk.client.wire.read_reply_view`), or by protobuf when the reply holds fields
that fast path does not handle; and the check that the data is the sectors asked for.

A reply that is malformed, or whose data is not the bytes of the sectors asked for (sizes in
bytes, counts in sectors of the size the caller counts in), is a
:class:`~tierdisk.client.errors.StorageError`: the server misbehaved.
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.message import DecodeError

from tierdisk.v1 import blockdevice_pb2 as pb

from .errors import StorageError
from .models import Extent
from .wire import read_reply_view

__all__ = ["check_reply_size", "decode_read_reply"]


def decode_read_reply(raw: bytes, rpc: str, volume: str) -> tuple[memoryview, list[Extent], bool]:
    """The data (a view of ``raw``), present runs and ``presence_reported`` of a
    serialized ``Read`` or ``ReadBatch`` reply (``rpc``; fields 1 and 2 are the same in both;
    only a ``ReadBatch`` reply has field 3) about ``volume``; :class:`StorageError` if it is
    malformed (the server misbehaved)."""
    try:
        reply = read_reply_view(raw)
    except ValueError as exc:
        raise StorageError(f"malformed {rpc} reply: {exc}", volume=volume) from None
    if reply is None:  # fields this fast path does not handle: let protobuf parse it
        try:
            if rpc == "ReadBatch":
                batch = pb.ReadBatchResponse.FromString(raw)
                extents = _extents(batch.present)
                return memoryview(batch.data), extents, batch.presence_reported
            msg = pb.ReadResponse.FromString(raw)
        except DecodeError as exc:
            raise StorageError(f"malformed {rpc} reply: {exc}", volume=volume) from None
        return memoryview(msg.data), _extents(msg.present), False
    return reply.data, [Extent(a, n) for a, n in reply.present], reply.presence_reported


def check_reply_size(nbytes: int, count: int, sector_size: int, volume: str) -> None:
    """:class:`StorageError` unless a Read reply of ``nbytes`` holds ``count`` sectors
    (the server misbehaved)."""
    if nbytes != count * sector_size:
        raise StorageError(f"server returned {nbytes} bytes for {count} sectors", volume=volume)


def _extents(runs: Sequence[pb.Extent]) -> list[Extent]:
    return [Extent(r.sector, r.sector_count) for r in runs]
