"""Sizes written as text, one reading for the server's config and the command line.

``"64MiB"``, ``"64M"`` and ``"64m"`` are 64 * 2**20 bytes: ``K``, ``M``, ``G``, ``T``, ``P``
and ``E``, with or without ``iB``, are binary (as in ``qemu-img``); ``kB``, ``MB``, … are
decimal; ``B`` is bytes. Units are case-insensitive, a space may separate number and unit, and
a fraction is allowed when the result is a whole number of bytes (``"1.5GiB"``); digits and
spaces are ASCII. A bare whole number has no unit: the caller says what it counts (the config
reads bytes, ``tierdisk resize`` sectors). :data:`MAX_BYTES` and :data:`MAX_SECTORS` bound
every size, for the server and the command line alike (:func:`size_limit_problem`).
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = [
    "MAX_BYTES",
    "MAX_SECTORS",
    "UNITS",
    "is_sector_size",
    "parse_size",
    "size_limit_problem",
]

UNITS: dict[str, int] = {
    "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
    "p": 1 << 50, "pib": 1 << 50, "pb": 10**15,
    "e": 1 << 60, "eib": 1 << 60, "eb": 10**18,
}  # fmt: skip
"""Bytes per unit, by the unit's lower-case spelling."""

MAX_BYTES = (1 << 63) - 1
"""The largest size of a layer or volume in bytes: byte offsets are signed 64-bit (``off_t``
for files, ``ssize_t`` for memory, int64 in most block-device clients)."""

MAX_SECTORS = (1 << 53) - 1
"""The largest size in sectors, whatever the sector size: sizes travel in ``Inspect``'s
tree, a ``google.protobuf.Struct`` whose numbers are doubles, exact only below ``2**53`` (a
tier over a larger volume would read its size rounded). 4 EiB of 512-byte sectors."""


def is_sector_size(value: object) -> bool:
    """Whether ``value`` is a sector size a volume may have: an ``int`` (not a ``bool``), a
    power of two of at least 512 bytes."""
    return type(value) is int and value >= 512 and not value & (value - 1)


def size_limit_problem(sector_size: int, sector_count: int) -> str | None:
    """Why ``sector_count`` sectors of ``sector_size`` bytes are over the size limit
    (:data:`MAX_BYTES`, :data:`MAX_SECTORS`), stating it; None when they are not."""
    most = min(MAX_BYTES // sector_size, MAX_SECTORS)
    if sector_count <= most:
        return None
    return (
        f"{sector_count} sectors of {sector_size} bytes is over the size limit of {most} "
        f"sectors ({most * sector_size} bytes)"
    )


_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", re.ASCII)
"""ASCII digits only: ``\\d`` and ``Fraction`` would read ``"٣KiB"`` (an Arabic-Indic 3) as
3 KiB, where a port or a count of the same digits is refused."""


def parse_size(text: str) -> tuple[int, bool]:
    """``(value, has_unit)``: ``"2GiB"`` gives ``(2 << 30, True)``, ``"2048"`` gives
    ``(2048, False)``. Raises :class:`ValueError`, with a message that quotes ``text``, for
    anything else (no number, an unknown unit, a fraction of a byte or a fractional bare
    number)."""
    m = _SIZE.fullmatch(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (a whole number, or one with a unit: 64MiB)")
    number, unit = m.groups()
    if len(number) > 4000:  # int() refuses 4,300 digits (a ValueError telling to raise it)
        raise ValueError(f"{text[:40]!r}…: too large ({len(number)} digits)")
    if not unit:
        if "." in number:
            raise ValueError(f"{text!r}: a number without a unit must be whole")
        return int(number), False
    factor = UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(
            f"{text!r}: unknown unit {unit!r} (use B; K, M, G, T, P, E with or without iB, "
            "binary; or kB, MB, GB, TB, PB, EB, decimal)"
        )
    value = Fraction(number) * factor  # exact: no float rounding, no overflow to inf
    if value.denominator != 1:
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(value), True
