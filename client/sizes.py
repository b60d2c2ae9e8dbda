"""Sizes written as text, one reading for the server's config and the command line.

``"64MiB"``, ``"64M"`` and ``"64m"`` are 64 * 2**20 bytes: ``K``/``M``/``G``/``T``/``P``, with or
without ``iB``, are binary (as in ``qemu-img``); ``kB``, ``MB``, … are decimal; ``B`` is bytes.
Units are case-insensitive, a space may separate number and unit, and a fraction is allowed
when the result is a whole number of bytes (``"1.5GiB"``); digits and spaces are ASCII. A bare
whole number has no unit: the caller says what it counts (the config reads bytes, ``tierdisk
resize`` sectors).
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["UNITS", "parse_size"]

UNITS: dict[str, int] = {
    "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
    "p": 1 << 50, "pib": 1 << 50, "pb": 10**15,
}  # fmt: skip
"""Bytes per unit, by the unit's lower-case spelling."""

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
        raise ValueError(f"{text!r}: unknown unit {unit!r} (use B, KiB, MiB, GiB, TiB, or MB, GB)")
    value = Fraction(number) * factor  # exact: no float rounding, no overflow to inf
    if value.denominator != 1:
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(value), True
