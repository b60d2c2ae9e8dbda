"""The types of config values: one parser per type, ``parse_X(value, what)``.

Each parser takes a value as TOML (or a flag or an environment variable) gives it and
``what`` (how the option is named in messages: a key, a flag, a variable) and returns the
parsed value or raises :class:`~.errors.ConfigError` saying what is wrong with it. Sizes are
in bytes (:func:`parse_size`: an integer or a string like ``"64MiB"``), durations in seconds
(:func:`parse_seconds`: at most :data:`MAX_SECONDS`); paths are strings without a NUL
(resolved against ``data_dir`` by :mod:`.config`, not here); addresses are checked as gRPC
and the NBD export will take them. Values shown in messages are shortened (:func:`show`),
so an error is one line of sensible length.
"""

from __future__ import annotations

import os
import reprlib

from tierdisk.client import sizes
from tierdisk.client.checks import address_text_problem, server_address_problem

from .errors import ConfigError
from .netaddr import split_host_port

__all__ = [
    "MAX_SECONDS",
    "parse_bool",
    "parse_count",
    "parse_grpc_address",
    "parse_mode",
    "parse_nbd_source",
    "parse_nonempty_str",
    "parse_optional_address",
    "parse_optional_path",
    "parse_path",
    "parse_positive_count",
    "parse_seconds",
    "parse_sector_size",
    "parse_server_name",
    "parse_size",
    "parse_switch",
    "parse_target",
    "show",
]

MAX_SECONDS = 86_400
"""The longest duration any option takes: one day. No wait of tierdisk's is meant to be
longer, and gRPC turns a deadline far enough out (``1e300``) into an immediate
``DEADLINE_EXCEEDED``."""


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel = 3


def show(value: object) -> str:
    """``repr(value)`` for a message: at most about 80 characters, a few items and levels of a
    list or table (a value nested thousands deep, or a huge list, is still one short line)."""
    return _REPR.repr(value)


def parse_size(value: object, what: str = "size") -> int:
    """Bytes from an integer or a string like ``"64MiB"``, ``"1.5GiB"``, ``"4096"`` (units as
    on the command line: :mod:`tierdisk.client.sizes`; ``M`` is MiB, ``MB`` is 10**6; ASCII
    digits only)."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a size in bytes or a string like '64MiB', not {value}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{what} must not be negative ({value})")
        return value
    if isinstance(value, str):
        try:
            return sizes.parse_size(value)[0]
        except ValueError as exc:
            raise ConfigError(f"{what} {exc}") from None
    raise ConfigError(f"{what} {show(value)} is not a size (an integer or a string like '64MiB')")


# -- option types -------------------------------------------------------------------------


def _str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a string, not {show(value)}")
    return value


def parse_nonempty_str(value: object, what: str) -> str:
    """A string, not empty."""
    text = _str(value, what)
    if not text:
        raise ConfigError(f"{what} must not be empty")
    return text


def parse_path(value: object, what: str) -> str:
    """A file or folder path: a string, not empty, without a NUL (which no path can hold:
    every system call would refuse it)."""
    text = parse_nonempty_str(value, what)
    position = text.find("\0")
    if position >= 0:
        raise ConfigError(
            f"{what} {show(text)} contains a NUL character (U+0000) at position {position}, "
            "which no path can hold"
        )
    return text


def parse_optional_path(value: object, what: str) -> str:
    """A path as :func:`parse_path`, or ``""`` for not set."""
    return parse_path(value, what) if _str(value, what) else ""


_UNIX_PATH_MAX = 107
"""The longest unix socket path, in bytes (``sun_path`` holds 108 with its NUL)."""


def _address(value: object, what: str) -> str:
    """A listen address: ``HOST:PORT`` (``[v6]:PORT``; port 0 = any free one; an empty host
    is every interface) or ``unix:PATH``; no white space, control character or undecodable
    byte anywhere (a NUL would cut the address gRPC binds short: another port)."""
    text = parse_nonempty_str(value, what)
    problem = address_text_problem(text)
    if problem is not None:
        raise ConfigError(f"{what} address {show(text)} {problem}")
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ConfigError(f"{what} {text!r} names no socket path")
        if len(os.fsencode(path)) > _UNIX_PATH_MAX:
            raise ConfigError(
                f"{what} {show(text)}: the socket path is {len(os.fsencode(path))} bytes "
                f"long, more than a unix socket's can be ({_UNIX_PATH_MAX})"
            )
        return text
    try:
        split_host_port(text, what)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    # e.g. IPv6 not in brackets, or a gRPC target form (dns:…) that nothing binds
    problem = server_address_problem(text, empty_host=True, listener=True)
    if problem is not None:
        raise ConfigError(f"{what} address {text!r}: {problem}")
    return text


def parse_grpc_address(value: object, what: str) -> str:
    """The gRPC listen address: as :func:`_address`, but with a host (gRPC binds no empty
    one; ``0.0.0.0`` or ``[::]`` is every interface)."""
    text = _address(value, what)
    if text.startswith("unix:") and "%" in text:
        # gRPC reads %XX in a unix: address as an escape: it would bind another path than
        # the one checked for a listener already there (two servers on one socket)
        raise ConfigError(
            f"{what} address {show(text)}: a '%' in a unix socket path is not supported "
            "(gRPC reads %XX as an escape and would listen on another path)"
        )
    problem = None if text.startswith("unix:") else server_address_problem(text)
    if problem is not None:
        if not split_host_port(text, what)[0]:
            problem += "; 0.0.0.0 or [::] listens on every interface"
        raise ConfigError(f"{what} address {text!r}: {problem}")
    return text


def parse_target(value: object, what: str) -> str:
    """A remote layer's ``target``: a gRPC address as the client takes for ``--server``
    (``HOST:PORT``, ``[v6]:PORT``, or one of the gRPC forms of
    :data:`~tierdisk.client.checks.TARGET_SCHEMES`: ``dns:``, ``ipv4:``, ``ipv6:``,
    ``unix:PATH``, ``unix-abstract:NAME``); gRPC would silently use another port for
    ``HOST:99999``, 443 for a missing one or after a NUL, and retry for ever a target it can
    never reach (``http://…``, ``unix:`` without a path, white space)."""
    text = parse_nonempty_str(value, what)
    problem = server_address_problem(text)
    if problem is not None:
        raise ConfigError(f"{what} {show(text)}: {problem}")
    return text


def parse_server_name(value: object, what: str) -> str:
    """A remote layer's ``server_name`` (the name its certificate is checked against, and the
    ``:authority``): a host name, so no white space or control character (a NUL would cut
    it short); ``""`` = the target's host."""
    text = _str(value, what)
    problem = address_text_problem(text)
    if problem is not None:
        raise ConfigError(f"{what} {show(text)} {problem}")
    return text


def parse_optional_address(value: object, what: str) -> str:
    """An address as :func:`_address`, or ``""`` for off."""
    return _address(value, what) if _str(value, what) else ""


def parse_nbd_source(value: object, what: str) -> str:
    """A remote layer's ``nbd``: an address to connect to (``HOST:PORT`` with a host and a
    port, or ``unix:PATH``), ``"auto"`` (ask the target; ``NBD_AUTO`` of
    :mod:`.layers.remote_nbd`), or ``""`` for off."""
    if value == "auto":
        return "auto"
    text = parse_optional_address(value, what)
    if text and not text.startswith("unix:"):
        host, port = split_host_port(text, what)
        if not host or port == 0:  # what a listener takes, no place to connect to
            missing = "no host" if not host else "port 0"
            raise ConfigError(
                f"{what} address {text!r} has {missing}: give the NBD export's HOST:PORT "
                '(or "auto", to ask the origin)'
            )
    return text


def parse_bool(value: object, what: str) -> bool:
    """true or false (a TOML boolean)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{what} must be true or false, not {show(value)}")
    return value


def parse_switch(value: object, what: str) -> bool:
    """true or false; from a flag or an environment variable the words ``true``/``false``
    (any case), ``1``/``0``, ``yes``/``no`` or ``on``/``off``."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("true", "1", "yes", "on"):
            return True
        if word in ("false", "0", "no", "off"):
            return False
    return parse_bool(value, what)


def parse_sector_size(value: object, what: str) -> int:
    """A sector size in bytes: a power of two of at least 512."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{what} must be an integer, not {show(value)}")
    if not sizes.is_sector_size(value):
        raise ConfigError(f"{what} {value} is not a power of two of at least 512")
    return value


def parse_seconds(value: object, what: str) -> float:
    """A duration: a number of seconds above 0 and at most :data:`MAX_SECONDS` (one day);
    ``nan`` and ``inf`` (TOML has both) are refused."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 < value <= MAX_SECONDS  # false for nan too; no float() of a huge int
    ):
        raise ConfigError(
            f"{what} must be a number of seconds above 0 and at most {MAX_SECONDS} "
            f"(one day), not {show(value)}"
        )
    return float(value)


def parse_count(value: object, what: str) -> int:
    """A whole number >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{what} must be a whole number >= 0, not {show(value)}")
    return value


def parse_positive_count(value: object, what: str) -> int:
    """A whole number >= 1; a string of ASCII digits too (flags and environment variables:
    ``int()`` alone would read ``"٣"`` as 3)."""
    if isinstance(value, str):
        digits = value.strip()
        if not (digits.isascii() and digits.isdigit()):
            raise ConfigError(f"{what} must be a whole number >= 1, not {show(value)}")
        if len(digits.lstrip("0")) > 18:  # (int() refuses 4,300 digits with a traceback)
            raise ConfigError(f"{what} is too large: {len(digits)} digits")
        value = int(digits, 10)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a whole number >= 1, not {show(value)}")
    return value


def parse_mode(value: object, what: str) -> str:
    """A remote layer's ``mode``: ``"disk"`` or ``"layer"``."""
    if not isinstance(value, str) or value not in ("disk", "layer"):
        raise ConfigError(f'{what} must be "disk" or "layer", not {show(value)}')
    return value
