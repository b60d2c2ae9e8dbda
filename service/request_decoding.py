"""Request bytes to request messages, for the servicer's handlers: the message, or an
:class:`Undecodable` saying why not.

A deserializer that raises inside gRPC makes it answer ``UNKNOWN`` with a Python exception's
text; the deserializers made here (:func:`decoder`) hand the servicer an
:class:`Undecodable` instead, which it answers ``INVALID_ARGUMENT``
(:func:`~.grpc_refusal.refuse_undecodable`). A ``ReadBatchRequest`` is checked for size
(bytes) before it is decoded (:func:`parse_read_batch`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf.message import DecodeError

from tierdisk.client.chunking import MAX_BATCH_RANGES
from tierdisk.v1 import blockdevice_pb2 as pb

from .write_request import MalformedRequest

__all__ = ["Undecodable", "decoder", "parse_read_batch"]


class Undecodable:
    """What a request deserializer of :func:`~.grpc_handlers.add_to_server` hands the
    servicer for bytes that are not the method's request message, instead of raising inside
    gRPC (which answers ``UNKNOWN`` with a Python exception's text): the servicer answers
    ``INVALID_ARGUMENT`` with :attr:`problem`."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem


_BATCH_REQUEST_MAX = 64 << 10
"""The most bytes a ``ReadBatchRequest`` may take, checked before it is decoded: its 256
ranges take at most 6 KiB (24 bytes a range) beside the volume's name. Decoded, a request of
millions of ranges (up to the transport's cap of ``4 * max_io + 1 MiB``) took ~8 times its
bytes of memory and a third of a second of the event loop, only to be refused."""


def parse_read_batch(raw: bytes) -> pb.ReadBatchRequest:
    """A ``ReadBatchRequest``, unless ``raw`` is larger than any the server takes."""
    if len(raw) > _BATCH_REQUEST_MAX:
        raise MalformedRequest(
            f"{len(raw)} bytes, more than a batch of {MAX_BATCH_RANGES} reads takes "
            f"(at most {_BATCH_REQUEST_MAX} bytes); split it"
        )
    return pb.ReadBatchRequest.FromString(raw)


def decoder(name: str, parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """The request deserializer that reads the message ``name`` with ``parse``: the
    request, or an :class:`Undecodable` saying what ``parse`` refused."""

    def decode(raw: bytes) -> Any:
        try:
            return parse(raw)
        except DecodeError as exc:
            why = str(exc).rpartition(": ")[2]  # after protobuf's "Error parsing message …"
            return Undecodable(f"malformed {name}: {why}")
        except MalformedRequest as exc:
            return Undecodable(f"malformed {name}: {exc}")

    return decode
