"""The numbers a request carries, checked before any call is made: sector numbers and
counts (``uint64`` on the wire), ``page_size`` (``uint32``), byte offsets and lengths (which
must be whole sectors).

Each must be an ``int`` (not ``bool``): another type raises :class:`TypeError` (a
programming error, as Python's own APIs do); an ``int`` no request can carry (negative, or
at or over its field's limit) raises :class:`~tierdisk.client.errors.InvalidArgument`
naming the argument (and the volume, when given).
"""

from __future__ import annotations

from .errors import InvalidArgument

__all__ = ["UINT32_LIMIT", "UINT64_LIMIT", "check_aligned", "check_number", "check_range"]

UINT64_LIMIT = 1 << 64
"""Sector numbers and counts travel as ``uint64``: each must be below this."""
UINT32_LIMIT = 1 << 32
"""``page_size`` travels as ``uint32``."""


def check_number(
    name: str, value: object, *, limit: int | None = UINT64_LIMIT, volume: str | None = None
) -> int:
    """``value`` if it is an ``int`` (not a ``bool``) in ``[0, limit)`` (``limit`` None: any
    ``int`` from 0); :class:`TypeError` for another type, :class:`InvalidArgument` naming
    ``name`` for a number no request can carry — checked before any call is made."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0:
        raise InvalidArgument(f"{name} {value} must not be negative", volume=volume)
    if limit is not None and value >= limit:
        bits = limit.bit_length() - 1
        bound = f"2**{bits}" if limit == 1 << bits else str(limit)
        raise InvalidArgument(f"{name} {value} is too large (must be below {bound})", volume=volume)
    return value


def check_range(sector: object, count: object, *, volume: str) -> None:
    check_number("sector", sector, volume=volume)
    check_number("count", count, volume=volume)


def check_aligned(offset: int, length: int, size: int, *, volume: str) -> None:
    """The byte range ``offset``, ``length`` of the ``*_bytes`` methods: numbers a request
    can carry once counted in sectors of ``size`` bytes, and whole sectors."""
    check_number("offset", offset, limit=UINT64_LIMIT * size, volume=volume)
    check_number("length", length, limit=UINT64_LIMIT * size, volume=volume)
    if offset % size or length % size:
        raise InvalidArgument(
            f"byte range {offset}+{length} is not aligned to the {size}-byte sector size",
            volume=volume,
        )
