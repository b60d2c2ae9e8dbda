"""tierdisk.client.sizes (client/sizes.py): sizes written as text (``2GiB``, ``1.5GiB``,
``2048``), read through the ``tierdisk`` command's :func:`~tierdisk.client.cli_args.size_argument`,
which turns the module's ValueError into a usage error."""

from __future__ import annotations

import re

import pytest

from tierdisk.client import cli_args
from tierdisk.client.cli_errors import UsageError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2048", (2048, False)),
        ("0", (0, False)),
        ("2GiB", (2 << 30, True)),
        ("2 GiB", (2 << 30, True)),
        ("512B", (512, True)),
        ("4k", (4096, True)),
        ("1M", (1 << 20, True)),
        ("1.5GiB", (3 << 29, True)),
        ("1GB", (10**9, True)),
        ("3tib", (3 << 40, True)),
        ("2EiB", (2 << 60, True)),
        ("1e", (1 << 60, True)),
        ("4EB", (4 * 10**18, True)),
    ],
)
def test_parse_size(text: str, expected: tuple[int, bool]) -> None:
    assert cli_args.size_argument(text) == expected


@pytest.mark.parametrize(
    "text", ["", "-1", "1.5", "12Q", "GiB", "1.3B", "0x10", "1.0000000000000000001KiB"]
)
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(UsageError):
        cli_args.size_argument(text)


def test_parse_size_is_exact_for_any_number_of_digits() -> None:
    """A fraction is computed exactly: no float rounding, no overflow to infinity."""
    value, in_bytes = cli_args.size_argument("9" * 400 + ".5PiB")
    assert in_bytes and value == (10**400 * 2 - 1) * (1 << 49)


@pytest.mark.parametrize("text", ["\u0663KiB", "\u0663", "1.\u0665GiB", "\uff14096", "\u00b2"])
def test_parse_size_takes_ascii_digits_only(text: str) -> None:
    """``\\d`` and ``Fraction`` take any Unicode digit: ``"٣KiB"`` was 3 KiB, while a port
    or a count written so is refused. One reading: ASCII digits, here as everywhere."""
    with pytest.raises(UsageError, match="is not a size"):
        cli_args.size_argument(text)


def test_an_unknown_unit_names_every_unit_there_is() -> None:
    """The refusal lists the units read (each binary one with or without ``iB``)."""
    with pytest.raises(UsageError) as info:
        cli_args.size_argument("12XB")
    words = set(re.findall(r"[A-Za-z]+", str(info.value).split("(use ", 1)[1]))
    assert {"B", "K", "M", "G", "T", "P", "E", "iB", "kB", "MB", "GB", "TB", "PB", "EB"} <= words
