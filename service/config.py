"""Configuration: the TOML file of DESIGN.md §4, flags and ``TIERDISK_SERVER_*`` overrides.

Precedence for ``[server]`` keys: flag, then environment (``TIERDISK_SERVER_<KEY>``), then the
file, then the default. Unknown keys and kinds, bad values and broken stacks raise
:class:`~tierdisk.service.errors.ConfigError` naming the volume, the layer index and the
problem. Sizes are integers (bytes) or strings like ``"64MiB"``; durations are seconds.
Relative file paths are resolved against ``data_dir``: a layer's ``path``, a remote layer's
``ca_file``/``cert_file``/``key_file``/``token_file``, and the ``[server]`` keys
``nbd_tls_cert``/``nbd_tls_key``/``nbd_tls_ca`` (from the file, a flag or the environment
alike).

``nbd_tls_cert`` and ``nbd_tls_key`` (PEM: the server's certificate chain and its unencrypted
private key) turn on TLS for the NBD export, which then requires it (:mod:`.nbd_handshake`);
``nbd_tls_ca`` (a PEM CA bundle) also makes every client present a certificate signed by one
of those CAs (mutual TLS: how NBD clients are authenticated). The three files are loaded at
config time (:func:`nbd_tls_context`), so a missing, unreadable or broken file, or a key
that is not the certificate's, is a config error naming the key and the file; the server
loads them again when it starts its NBD export. A remote layer's client certificate and key
(``cert_file``, ``key_file`` with ``tls``) are checked to go together at load too.

What can never work is refused here rather than found later (or never, by a server that
retries): an address with white space, a control character or an undecodable byte, a
target gRPC cannot reach (:func:`~tierdisk.client.checks.server_address_problem`), a path
with a NUL, a ``sector_size`` larger than ``max_io``. The config file and every PEM file
are read through :func:`~tierdisk.client.pem.read_small_file`: at most
:data:`~tierdisk.client.pem.MAX_FILE_BYTES` (``/dev/zero`` is refused, never read until
memory runs out); PEM and token files, which OpenSSL or a reconnect reads again by name,
must be regular files (a FIFO is refused, not waited for), the config file may be a pipe.
Values shown in messages are shortened (:func:`_show`), so an error is one line of sensible
length.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import reprlib
import ssl
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from tierdisk.client import sizes
from tierdisk.client.checks import (
    address_text_problem,
    server_address_problem,
    stays_on_this_host,
    token_problem,
)
from tierdisk.client.chunking import DEFAULT_MAX_IO
from tierdisk.client.pem import key_pair_problem, read_small_file

from .errors import ConfigError
from .netaddr import split_host_port
from .verifier_store import FILE_NAME as VERIFIERS_FILE
from .verifier_store import NEW_SUFFIX as VERIFIERS_NEW_SUFFIX

__all__ = [
    "DEFAULT_SIZE",
    "LAYER_OPTIONS",
    "MAX_SECONDS",
    "Config",
    "LayerConfig",
    "ServerConfig",
    "VolumeConfig",
    "default_volumes",
    "load_config",
    "nbd_tls_context",
    "parse_size",
    "parse_switch",
    "token_from_file",
]

log = logging.getLogger(__name__)

DEFAULT_SIZE = 1 << 30
"""Size of the built-in ``default`` volume (1 GiB)."""
MAX_SECONDS = 86_400
"""The longest duration any option takes: one day. No wait of tierdisk's is meant to be
longer, and gRPC turns a deadline far enough out (``1e300``) into an immediate
``DEADLINE_EXCEEDED``."""


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel = 3


def _show(value: object) -> str:
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
    raise ConfigError(f"{what} {_show(value)} is not a size (an integer or a string like '64MiB')")


# -- option types -------------------------------------------------------------------------


def _str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a string, not {_show(value)}")
    return value


def _nonempty_str(value: object, what: str) -> str:
    text = _str(value, what)
    if not text:
        raise ConfigError(f"{what} must not be empty")
    return text


def _path(value: object, what: str) -> str:
    """A file or folder path: a string, not empty, without a NUL (which no path can hold:
    every system call would refuse it)."""
    text = _nonempty_str(value, what)
    position = text.find("\0")
    if position >= 0:
        raise ConfigError(
            f"{what} {_show(text)} contains a NUL character (U+0000) at position {position}, "
            "which no path can hold"
        )
    return text


def _optional_path(value: object, what: str) -> str:
    """A path as :func:`_path`, or ``""`` for not set."""
    return _path(value, what) if _str(value, what) else ""


_UNIX_PATH_MAX = 107
"""The longest unix socket path, in bytes (``sun_path`` holds 108 with its NUL)."""


def _address(value: object, what: str) -> str:
    """A listen address: ``HOST:PORT`` (``[v6]:PORT``; port 0 = any free one; an empty host
    is every interface) or ``unix:PATH``; no white space, control character or undecodable
    byte anywhere (a NUL would cut the address gRPC binds short: another port)."""
    text = _nonempty_str(value, what)
    problem = address_text_problem(text)
    if problem is not None:
        raise ConfigError(f"{what} address {_show(text)} {problem}")
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ConfigError(f"{what} {text!r} names no socket path")
        if len(os.fsencode(path)) > _UNIX_PATH_MAX:
            raise ConfigError(
                f"{what} {_show(text)}: the socket path is {len(os.fsencode(path))} bytes "
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


def _grpc_address(value: object, what: str) -> str:
    """The gRPC listen address: as :func:`_address`, but with a host (gRPC binds no empty
    one; ``0.0.0.0`` or ``[::]`` is every interface)."""
    text = _address(value, what)
    if text.startswith("unix:") and "%" in text:
        # gRPC reads %XX in a unix: address as an escape: it would bind another path than
        # the one checked for a listener already there (two servers on one socket)
        raise ConfigError(
            f"{what} address {_show(text)}: a '%' in a unix socket path is not supported "
            "(gRPC reads %XX as an escape and would listen on another path)"
        )
    problem = None if text.startswith("unix:") else server_address_problem(text)
    if problem is not None:
        if not split_host_port(text, what)[0]:
            problem += "; 0.0.0.0 or [::] listens on every interface"
        raise ConfigError(f"{what} address {text!r}: {problem}")
    return text


def _target(value: object, what: str) -> str:
    """A remote layer's ``target``: a gRPC address as the client takes for ``--server``
    (``HOST:PORT``, ``[v6]:PORT``, or one of the gRPC forms of
    :data:`~tierdisk.client.checks.TARGET_SCHEMES`: ``dns:``, ``ipv4:``, ``ipv6:``,
    ``unix:PATH``, ``unix-abstract:NAME``); gRPC would silently use another port for
    ``HOST:99999``, 443 for a missing one or after a NUL, and retry for ever a target it can
    never reach (``http://…``, ``unix:`` without a path, white space)."""
    text = _nonempty_str(value, what)
    problem = server_address_problem(text)
    if problem is not None:
        raise ConfigError(f"{what} {_show(text)}: {problem}")
    return text


def _server_name(value: object, what: str) -> str:
    """A remote layer's ``server_name`` (the name its certificate is checked against, and the
    ``:authority``): a host name, so no white space or control character (a NUL would cut
    it short); ``""`` = the target's host."""
    text = _str(value, what)
    problem = address_text_problem(text)
    if problem is not None:
        raise ConfigError(f"{what} {_show(text)} {problem}")
    return text


def _token(value: object, what: str) -> str:
    """A bearer token: what gRPC can send in a header (the token itself is never shown,
    not even when it is not a string; :func:`~tierdisk.client.checks.token_problem`, which
    refuses an empty one too)."""
    if not isinstance(value, str):
        kinds = {bool: "true or false", int: "a number", float: "a number", list: "a list"}
        kind = kinds.get(type(value), "a table" if isinstance(value, dict) else "another type")
        raise ConfigError(f"{what} must be a string in quotes, not {kind}")
    text = value
    problem = token_problem(text)
    if problem is not None:
        raise ConfigError(f"{what} {problem}")
    return text


def token_from_file(data: bytes, path: str) -> str:
    """The token in a remote layer's ``token_file`` (its bytes ``data``): UTF-8 text without
    the white space around it (the line end of a file saved with ``\n`` or ``\r\n``).
    :class:`ConfigError` naming ``path`` when it is empty, not UTF-8, or holds a character
    no gRPC header can carry; the token itself is never shown."""
    what = f"token_file {path}"
    token = _utf8_text(data, what).strip()
    if not token:
        raise ConfigError(f"{what} is empty")  # not "the token is empty": the file is
    problem = token_problem(token)
    if problem is not None:
        raise ConfigError(f"{what}: the token {problem}")
    return token


def _utf8_text(data: bytes, what: str) -> str:
    """``data`` decoded as UTF-8; :class:`ConfigError` saying ``what`` is not, at which
    offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        byte = data[exc.start]
        raise ConfigError(
            f"{what} is not UTF-8 (byte 0x{byte:02x} at offset {exc.start})"
        ) from None


def _optional_address(value: object, what: str) -> str:
    """An address as :func:`_address`, or ``""`` for off."""
    return _address(value, what) if _str(value, what) else ""


def _nbd_source(value: object, what: str) -> str:
    """A remote layer's ``nbd``: an address to connect to (``HOST:PORT`` with a host and a
    port, or ``unix:PATH``), ``"auto"`` (ask the target; ``NBD_AUTO`` of
    :mod:`.layers.remote_nbd`), or ``""`` for off."""
    if value == "auto":
        return "auto"
    text = _optional_address(value, what)
    if text and not text.startswith("unix:"):
        host, port = split_host_port(text, what)
        if not host or port == 0:  # what a listener takes, no place to connect to
            missing = "no host" if not host else "port 0"
            raise ConfigError(
                f"{what} address {text!r} has {missing}: give the NBD export's HOST:PORT "
                '(or "auto", to ask the origin)'
            )
    return text


def _bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{what} must be true or false, not {_show(value)}")
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
    return _bool(value, what)


def _sector_size(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{what} must be an integer, not {_show(value)}")
    if not sizes.is_sector_size(value):
        raise ConfigError(f"{what} {value} is not a power of two of at least 512")
    return value


def _seconds(value: object, what: str) -> float:
    """A duration: a number of seconds above 0 and at most :data:`MAX_SECONDS` (one day);
    ``nan`` and ``inf`` (TOML has both) are refused."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 < value <= MAX_SECONDS  # false for nan too; no float() of a huge int
    ):
        raise ConfigError(
            f"{what} must be a number of seconds above 0 and at most {MAX_SECONDS} "
            f"(one day), not {_show(value)}"
        )
    return float(value)


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{what} must be a whole number >= 0, not {_show(value)}")
    return value


def _positive_count(value: object, what: str) -> int:
    """A whole number >= 1; a string of ASCII digits too (flags and environment variables:
    ``int()`` alone would read ``"٣"`` as 3)."""
    if isinstance(value, str):
        digits = value.strip()
        if not (digits.isascii() and digits.isdigit()):
            raise ConfigError(f"{what} must be a whole number >= 1, not {_show(value)}")
        if len(digits.lstrip("0")) > 18:  # (int() refuses 4,300 digits with a traceback)
            raise ConfigError(f"{what} is too large: {len(digits)} digits")
        value = int(digits, 10)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a whole number >= 1, not {_show(value)}")
    return value


def _mode(value: object, what: str) -> str:
    if not isinstance(value, str) or value not in ("disk", "layer"):
        raise ConfigError(f'{what} must be "disk" or "layer", not {_show(value)}')
    return value


_Parser = Callable[[object, str], Any]
_PATH = "path"  # marker: a string resolved against data_dir

LAYER_OPTIONS: dict[str, dict[str, _Parser | str]] = {
    "ram": {"size": parse_size, "sector_size": _sector_size},
    "raw": {"path": _PATH, "size": parse_size, "read_only": _bool, "sector_size": _sector_size},
    "sparse": {"path": _PATH, "size": parse_size, "sector_size": _sector_size},
    "sqlite": {"path": _PATH, "size": parse_size, "sector_size": _sector_size},
    "remote": {
        "target": _target,
        "volume": _nonempty_str,
        "mode": _mode,
        "timeout": _seconds,
        "retries": _count,
        "tls": _bool,
        "ca_file": _PATH,
        "cert_file": _PATH,
        "key_file": _PATH,
        "server_name": _server_name,
        "token": _token,
        "token_file": _PATH,
        "nbd": _nbd_source,
    },
}
"""Per layer kind, the options it takes (besides kind, read_cache, write_through)."""

_REQUIRED = {
    "raw": ("path",),
    "sparse": ("path",),
    "sqlite": ("path",),
    "remote": ("target", "volume"),
}
_LAYER_COMMON = ("kind", "read_cache", "write_through")


@dataclass(frozen=True)
class ServerConfig:
    """The ``[server]`` table."""

    listen: str = "127.0.0.1:7400"  # gRPC address: "HOST:PORT" or "unix:/path"
    metrics: str = "127.0.0.1:9400"  # Prometheus /metrics address; "" = off
    data_dir: str = "./tierdisk-data"  # where relative layer paths live
    nbd: str = ""  # NBD export address; "" = off
    max_io: int = 16 << 20  # bytes: the largest Read or Write payload
    nbd_max_connections: int = 64  # NBD connections taken at once; more are refused
    nbd_tls_cert: str = ""  # PEM certificate chain of the NBD export's TLS; "" = no TLS
    nbd_tls_key: str = ""  # PEM private key of nbd_tls_cert (unencrypted)
    nbd_tls_ca: str = ""  # PEM CA bundle: clients must present a certificate it signed
    grpc_poller_batch: bool = False  # gRPC's poller thread in SCHED_BATCH (client/tune.py)


_SERVER_KEYS: dict[str, _Parser] = {
    "listen": _grpc_address,
    "metrics": _optional_address,
    "data_dir": _path,
    "nbd": _optional_address,
    "max_io": lambda v, what: parse_size(v, what),
    "nbd_max_connections": _positive_count,
    "nbd_tls_cert": _optional_path,  # file paths: "" = not set; resolved against data_dir
    "nbd_tls_key": _optional_path,
    "nbd_tls_ca": _optional_path,
    "grpc_poller_batch": parse_switch,
}
_NBD_TLS_KEYS = ("nbd_tls_cert", "nbd_tls_key", "nbd_tls_ca")
MIN_MAX_IO = DEFAULT_MAX_IO
"""The smallest ``max_io`` a server takes (1 MiB): the client library and remote layers send up
to that much per request, so a lower limit would refuse their large reads and writes."""
MAX_MAX_IO = 256 << 20
"""The largest ``max_io``: one request's buffer, and gRPC's message caps (4x it) must fit."""


@dataclass(frozen=True)
class LayerConfig:
    """One ``[[volumes.layers]]`` entry; ``options`` are parsed values, paths absolute."""

    kind: str
    read_cache: bool = False
    write_through: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class VolumeConfig:
    """One ``[[volumes]]`` entry."""

    name: str
    layers: tuple[LayerConfig, ...]
    read_only: bool = False


@dataclass(frozen=True)
class Config:
    """The whole server configuration."""

    server: ServerConfig
    volumes: tuple[VolumeConfig, ...]


def default_volumes(data_dir: str) -> tuple[VolumeConfig, ...]:
    """The built-in volume served with no ``--config``: ``default``, a sparse layer created
    at 1 GiB. Once it exists it keeps its own size, so a resized ``default`` stays resized
    across restarts (the 1 GiB is where it starts, not a setting it must agree with)."""
    from .layers.sparse_map import map_path  # here: the layers package imports this module

    path = os.path.join(os.path.abspath(data_dir), "default")
    options: dict[str, Any] = {"path": path}
    if not os.path.exists(map_path(path)):
        options["size"] = DEFAULT_SIZE
    return (VolumeConfig("default", (LayerConfig("sparse", options=options),)),)


def load_config(
    path: str | None,
    *,
    flags: Mapping[str, str | None] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read ``path`` (None: no file, serve the default volume) and apply overrides.

    ``flags`` maps server keys to flag values (None = not given); ``environ`` defaults to
    ``os.environ``.
    """
    environ = os.environ if environ is None else environ
    doc: dict[str, Any] = {}
    if path is not None:
        doc = _read_toml(path)
    unknown = sorted(set(doc) - {"server", "volumes"})
    if unknown:
        raise ConfigError(f"unknown top-level key {unknown[0]!r} (expected [server], [[volumes]])")
    server = _server(doc.get("server", {}), flags or {}, environ)
    if path is None:
        return Config(server, default_volumes(server.data_dir))
    raw_volumes = doc.get("volumes", [])
    if not isinstance(raw_volumes, list):
        raise ConfigError(f"volumes must be [[volumes]] tables, not {_show(raw_volumes)}")
    if not raw_volumes:
        raise ConfigError("the config defines no [[volumes]]")
    volumes: list[VolumeConfig] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_volumes):
        volume = _volume(raw, index, server.data_dir)
        if volume.name in seen:
            raise ConfigError("two volumes have this name", volume=volume.name)
        seen.add(volume.name)
        volumes.append(volume)
    _check_shared_paths(volumes)
    _check_server_files(volumes, server.data_dir)
    _check_sector_sizes(volumes, server.max_io)
    _warn_about_secrets(server, volumes)
    return Config(server, tuple(volumes))


def _warn_about_secrets(server: ServerConfig, volumes: list[VolumeConfig]) -> None:
    """Warn (the config still loads) about a secret others can read: a private key or
    token file whose mode lets the group or others read it, and a remote layer's bearer
    token sent without ``tls`` to another host (in clear text: anyone on the path can read
    it and use it)."""
    secrets = [("nbd_tls_key", server.nbd_tls_key)] if server.nbd_tls_key else []
    for volume in volumes:
        for index, layer in enumerate(volume.layers):
            where = f"volume {volume.name!r}, layer {index}"
            options = layer.options
            secrets += [
                (f"{where}: {key}", options[key])
                for key in ("key_file", "token_file")
                if options.get(key)
            ]
            token = options.get("token") or options.get("token_file")
            target = options.get("target", "")
            if token and not options.get("tls") and not stays_on_this_host(target):
                log.warning(
                    "%s: its bearer token is sent in clear text (tls is off): anyone on "
                    "the network path can read it and use it; set tls = true",
                    where,
                )
    for what, path in secrets:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            continue  # a missing file is refused where it is read
        if stat.S_ISREG(mode) and mode & 0o077:  # (anything else is refused where it is read)
            log.warning(
                "%s %s is readable or writable by others (mode %03o): keep it the server's "
                "own (chmod 600)",
                what,
                path,
                mode & 0o777,
            )


def _check_sector_sizes(volumes: list[VolumeConfig], max_io: int) -> None:
    """Refuse a layer's ``sector_size`` larger than ``max_io``: every request carries whole
    sectors, so not even a one-sector read or write could be served (the volume would start
    and refuse all I/O)."""
    for volume in volumes:
        for index, layer in enumerate(volume.layers):
            sector_size = layer.options.get("sector_size")
            if sector_size is not None and (problem := sector_size_problem(sector_size, max_io)):
                raise ConfigError(f"sector_size {problem}", volume=volume.name, layer=index)


def sector_size_problem(sector_size: int, max_io: int) -> str | None:
    """Why sectors of ``sector_size`` bytes cannot be served under ``max_io`` (every request
    carries whole sectors), as the end of a sentence naming the size; None when they can.
    Checked for a configured ``sector_size`` at load, and for the size a volume takes from
    an existing layer or a remote origin once it is open (the server)."""
    if sector_size <= max_io:
        return None
    fix = f"a max_io of at least {sector_size}" if sector_size <= MAX_MAX_IO else "smaller sectors"
    return (
        f"{sector_size} is larger than max_io {max_io}, the largest request: not even one "
        f"sector could be read or written; use sectors of at most {max_io} bytes or {fix} "
        f"(max_io is at most {MAX_MAX_IO})"
    )


def _file_keys(path: str) -> list[str]:
    """``path`` with its symlinks resolved and, for a file that exists, its device and inode
    numbers: the keys under which two layers' files are one file (a hard link is one file
    under another name)."""
    keys = [os.path.realpath(path)]
    with contextlib.suppress(OSError):
        found = os.stat(path)
        keys.append(f"inode {found.st_dev}:{found.st_ino}")
    return keys


def _check_shared_paths(volumes: list[VolumeConfig]) -> None:
    """Refuse a layer file used by two layers of this config (the second would find it
    locked, "in use by another process"), naming both, whether the two paths name it
    through a symlink or a hard link; read-only raw images are the exception: any number of
    layers may read one. A file a layer makes beside its own (a
    sparse layer's map, a sqlite layer's lock file and WAL:
    :func:`~.layers.layer_files.files_beside`) counts as that layer's: another layer there
    would have it replaced or removed under it."""
    from .layers.layer_files import files_beside  # (the layers package imports this module)

    users: dict[str, tuple[str, int, str, bool, bool]] = {}  # _file_keys -> first user
    for volume in volumes:
        for index, layer in enumerate(volume.layers):
            path = layer.options.get("path")
            if not isinstance(path, str):
                continue
            shareable = layer.kind == "raw" and bool(layer.options.get("read_only"))
            files = [(path, False)] + [(f, True) for f in files_beside(layer.kind, path)]
            for file, beside in files:
                keys = _file_keys(file)
                first = next((users[key] for key in keys if key in users), None)
                if first is None:
                    for key in keys:
                        users[key] = (volume.name, index, path, beside, shareable and not beside)
                    continue
                if shareable and not beside and first[4]:
                    continue
                other = f"volume {first[0]!r}, layer {first[1]}"
                if not beside and not first[3]:
                    problem = f"path {path} is used twice in this config, also by {other}"
                elif not beside:
                    problem = (
                        f"path {path} is a file that {other} (at {first[2]}) makes beside its own"
                    )
                else:
                    their = f"makes beside its own (at {first[2]})" if first[3] else "is at"
                    problem = (
                        f"the {layer.kind} layer at {path} makes {file} beside it, which "
                        f"{other} {their}"
                    )
                raise ConfigError(
                    f"{problem}: a layer's files hold one layer (only read_only raw images "
                    "can be shared)",
                    volume=volume.name,
                    layer=index,
                )


def _check_server_files(volumes: list[VolumeConfig], data_dir: str) -> None:
    """Refuse a layer file that is one of the server's own files in ``data_dir`` (the
    write verifier record, or the new one written before it replaces it:
    :mod:`.verifier_store`): the record's next change would replace the layer's data."""
    record = os.path.realpath(os.path.join(data_dir, VERIFIERS_FILE))
    ours = {record, record + VERIFIERS_NEW_SUFFIX}
    for volume in volumes:
        for index, layer in enumerate(volume.layers):
            path = layer.options.get("path")
            if path is not None and os.path.realpath(path) in ours:
                raise ConfigError(
                    f"path {path} is the server's own record of write verifiers (in "
                    "data_dir): a layer's file needs a path of its own",
                    volume=volume.name,
                    layer=index,
                )


_BOM = "\ufeff"


def _digits(exc: ValueError) -> str:
    """How many digits the number Python refused to read had (its message says), or a
    general description."""
    found = re.search(r"has (\d+) digits", str(exc))
    return f"{found.group(1)} digits" if found else "over 4,300 digits"


def _read_toml(path: str) -> dict[str, Any]:
    """The TOML document in the file ``path`` (a pipe too: ``--config <(envsubst < t)``);
    :class:`ConfigError` naming it when it cannot be read, holds more than
    :data:`~tierdisk.client.pem.MAX_FILE_BYTES` (``/dev/zero``), is not UTF-8 (naming the offset),
    starts with a byte order mark (which TOML does not allow), is not TOML, or nests deeper
    than the TOML reader can follow (it recurses: a few hundred levels)."""
    try:
        data = read_small_file(path, regular=False)  # read once: a pipe will do
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"config {path} {exc}") from None
    text = _utf8_text(data, f"config {path}")
    if text.startswith(_BOM):
        raise ConfigError(
            f"config {path} starts with a UTF-8 byte order mark (offset 0), which TOML does "
            "not allow: save it as UTF-8 without a BOM"
        )
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
    except ValueError as exc:  # an integer of over 4,300 digits: Python will not read it
        too_long = _digits(exc)
        raise ConfigError(f"config {path} holds a number too long to read: {too_long}") from None
    except RecursionError:
        raise ConfigError(
            f"config {path} nests arrays or tables too deeply to be read (a few hundred "
            "levels at most)"
        ) from None


def _server(
    table: object, flags: Mapping[str, str | None], environ: Mapping[str, str]
) -> ServerConfig:
    if not isinstance(table, dict):
        raise ConfigError("[server] must be a table")
    unknown = sorted(set(table) - set(_SERVER_KEYS))
    if unknown:
        raise ConfigError(f"[server]: unknown key {unknown[0]!r}")
    prefix = "TIERDISK_SERVER_"
    stray = sorted(
        k for k in environ if k.startswith(prefix) and k[len(prefix) :].lower() not in _SERVER_KEYS
    )
    for name in stray:
        # A warning, not an error: a misspelt override should not pass without a word, but
        # others set such names too (Kubernetes service links for a Service named
        # "tierdisk-server": TIERDISK_SERVER_PORT, TIERDISK_SERVER_SERVICE_HOST, ...).
        known = ", ".join(prefix + k.upper() for k in _SERVER_KEYS)
        log.warning("ignoring environment variable %s: not a [server] key (%s)", name, known)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}  # key -> where its value came from, for messages
    for key, parse in _SERVER_KEYS.items():
        env_name = f"TIERDISK_SERVER_{key.upper()}"
        if flags.get(key) is not None:
            sources[key] = f"--{key.replace('_', '-')}"
            values[key] = parse(flags[key], sources[key])
        elif env_name in environ:
            sources[key] = env_name
            values[key] = parse(environ[env_name], env_name)
        elif key in table:
            sources[key] = f"[server] {key}"
            values[key] = parse(table[key], sources[key])
    data_dir = os.path.abspath(values.get("data_dir", ServerConfig.data_dir))
    for key in _NBD_TLS_KEYS:
        if values.get(key):
            values[key] = os.path.join(data_dir, values[key])  # an absolute path stays
    config = replace(ServerConfig(), **values)
    if not MIN_MAX_IO <= config.max_io <= MAX_MAX_IO:
        raise ConfigError(
            f"{sources.get('max_io', 'max_io')} {config.max_io} is out of range: from "
            f"{MIN_MAX_IO} (1MiB, the size of the clients' requests) to {MAX_MAX_IO} (256MiB) "
            "bytes"
        )
    _check_nbd_tls(config, sources)
    return config


def _check_nbd_tls(config: ServerConfig, sources: Mapping[str, str]) -> None:
    """The rules of the ``nbd_tls_*`` keys: the certificate and the key go together, the CA
    bundle needs both, all need the NBD export on, and the files must load
    (:func:`nbd_tls_context`). :class:`ConfigError` naming the key (as it was given: flag,
    environment variable or ``[server]`` key)."""

    def name(key: str) -> str:
        return sources.get(key, key)

    cert, key, ca = config.nbd_tls_cert, config.nbd_tls_key, config.nbd_tls_ca
    if cert and not key:
        raise ConfigError(
            f"{name('nbd_tls_cert')} is set but nbd_tls_key is not: TLS for the NBD export "
            "needs the certificate and its private key"
        )
    if key and not cert:
        raise ConfigError(
            f"{name('nbd_tls_key')} is set but nbd_tls_cert is not: TLS for the NBD export "
            "needs the certificate and its private key"
        )
    if ca and not cert:
        raise ConfigError(
            f"{name('nbd_tls_ca')} is set but nbd_tls_cert and nbd_tls_key are not: the CA "
            "bundle that checks the clients' certificates needs TLS, which needs the server's "
            "own certificate and key"
        )
    if cert and not config.nbd:
        raise ConfigError(
            f"{name('nbd_tls_cert')} is set but the NBD export is off (nbd is empty): TLS "
            "is for the NBD export"
        )
    nbd_tls_context(config, sources)


def nbd_tls_context(
    config: ServerConfig, sources: Mapping[str, str] | None = None
) -> ssl.SSLContext | None:
    """The server-side TLS context of the NBD export, or None when ``config`` sets no
    ``nbd_tls_cert``.

    TLS 1.2 at least, no renegotiation; with ``nbd_tls_ca``, a client must present a
    certificate signed by one of its CAs (``CERT_REQUIRED``), else none is asked for.
    :class:`ConfigError` naming the key (``sources[key]``, e.g. ``--nbd-tls-cert``; else the
    key) and the file when a file cannot be read, holds no PEM certificate (the certificate,
    the CA bundle) or no PEM private key, the key is encrypted (a passphrase) or is not the
    certificate's.
    """
    if not config.nbd_tls_cert:
        return None
    named = sources or {}

    def what(key: str, path: str) -> str:
        return f"{named.get(key, key)} {path}"

    cert, key, ca = config.nbd_tls_cert, config.nbd_tls_key, config.nbd_tls_ca
    texts = {}
    for option, path in (("nbd_tls_cert", cert), ("nbd_tls_key", key), ("nbd_tls_ca", ca)):
        if path:  # ssl reads them again by name: regular files only (read_small_file)
            try:
                texts[option] = read_small_file(path)
            except OSError as exc:
                raise ConfigError(f"cannot read {what(option, path)}: {exc.strerror}") from None
            except ValueError as exc:
                raise ConfigError(f"{what(option, path)} {exc}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert)
    except (ssl.SSLError, OSError):
        raise ConfigError(f"{what('nbd_tls_cert', cert)} holds no PEM certificate") from None
    if b"PRIVATE KEY-----" not in texts["nbd_tls_key"]:
        raise ConfigError(f"{what('nbd_tls_key', key)} holds no PEM private key")
    load_key_pair(
        context, cert, key, cert_name=what("nbd_tls_cert", cert), key_name=what("nbd_tls_key", key)
    )
    if ca:
        try:
            context.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError):
            raise ConfigError(
                f"{what('nbd_tls_ca', ca)} holds no PEM certificate (a CA bundle)"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def load_key_pair(
    context: ssl.SSLContext, cert: str, key: str, *, cert_name: str, key_name: str
) -> None:
    """Load the certificate chain ``cert`` and its private key ``key`` (PEM files) into
    ``context``, or raise :class:`ConfigError` saying why, the files named as ``cert_name``
    and ``key_name`` (e.g. ``"nbd_tls_key /etc/k.pem"``): an encrypted key (never a
    passphrase prompt), a key that is not the certificate's, anything else ssl refuses
    (:func:`~tierdisk.client.pem.key_pair_problem`)."""
    try:
        problem = key_pair_problem(cert, key, cert_name, context)
    except OSError as exc:
        problem = f"cannot be used with {cert_name} ({_ssl_reason(exc)})"
    if problem is not None:
        raise ConfigError(f"{key_name} {problem}")


def _ssl_reason(exc: BaseException) -> str:
    """A short reason for an :mod:`ssl` failure: OpenSSL's reason code when it has one."""
    reason = getattr(exc, "reason", None)
    return str(reason) if reason else str(exc)


def _check_client_certificate(options: Mapping[str, Any]) -> None:
    """A remote layer's client certificate and key (``cert_file``, ``key_file``), when both
    are given: :class:`ConfigError` naming the files when they do not go together (not
    readable PEM files of their kinds, an encrypted key, another certificate's key), as the
    layer would find at attach (:func:`.layers.remote_connect.check_key_pair`); found here,
    before anything is bound. (One without the other is refused when the layer is made.)"""
    cert, key = options.get("cert_file"), options.get("key_file")
    if cert is None or key is None:
        return
    from .layers.remote_connect import check_key_pair  # here: that module imports this one

    check_key_pair(cert, key)


def _name_problem(name: str) -> str:
    """What is wrong with the volume name ``name`` (not a valid one), in a few words."""
    if len(name) > 128:
        return f"this one is {len(name)} characters long"
    if not re.match(r"[A-Za-z0-9]", name):
        return f"this one starts with {name[0]!r}"
    bad = next(c for c in name if not re.fullmatch(r"[A-Za-z0-9._-]", c))
    return f"this one holds {bad!r} (U+{ord(bad):04X})"


def _volume(raw: object, index: int, data_dir: str) -> VolumeConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"[[volumes]] entry {index} must be a table")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"[[volumes]] entry {index} needs a name")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name):
        raise ConfigError(
            "a name is 1 to 128 ASCII letters, digits, '.', '_' and '-', starting with a "
            f"letter or digit ({_name_problem(name)})",
            volume=name if len(name) <= 80 else f"{name[:60]}…",
        )
    unknown = sorted(set(raw) - {"name", "read_only", "layers"})
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}", volume=name)
    try:
        read_only = _bool(raw.get("read_only", False), "read_only")
    except ConfigError as exc:
        raise exc.located(volume=name) from None
    layers_raw = raw.get("layers")
    if layers_raw is not None and not isinstance(layers_raw, list):
        raise ConfigError(
            f"layers must be [[volumes.layers]] tables, not {_show(layers_raw)}",
            volume=name,
        )
    if not layers_raw:
        raise ConfigError("a volume needs at least one [[volumes.layers]] entry", volume=name)
    layers = []
    for i, layer in enumerate(layers_raw):
        try:
            layers.append(_layer(layer, data_dir))
        except ConfigError as exc:
            raise exc.located(volume=name, layer=i) from None
    return VolumeConfig(name, tuple(layers), read_only)


def _layer(raw: object, data_dir: str) -> LayerConfig:
    if not isinstance(raw, dict):
        raise ConfigError("a layer must be a table")
    kind = raw.get("kind")
    if not isinstance(kind, str) or kind not in LAYER_OPTIONS:  # a list or table: unhashable
        known = ", ".join(sorted(LAYER_OPTIONS))
        if kind is None:
            raise ConfigError(f"a layer needs 'kind' (one of: {known})")
        raise ConfigError(f"unknown layer kind {_show(kind)} (known kinds: {known})")
    allowed = LAYER_OPTIONS[kind]
    unknown = sorted(set(raw) - set(allowed) - set(_LAYER_COMMON))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} for a {kind} layer")
    for key in _REQUIRED.get(kind, ()):
        if key not in raw:
            raise ConfigError(f"a {kind} layer needs {key!r}")
    options: dict[str, Any] = {}
    for key, parse in allowed.items():
        if key not in raw:
            continue
        if parse == _PATH:
            options[key] = os.path.join(os.path.abspath(data_dir), _path(raw[key], key))
        else:
            assert callable(parse)
            options[key] = parse(raw[key], key)
    if kind == "remote" and options.get("tls"):
        _check_client_certificate(options)
    return LayerConfig(
        kind,
        read_cache=_bool(raw.get("read_cache", False), "read_cache"),
        write_through=_bool(raw.get("write_through", False), "write_through"),
        options=options,
    )
