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
config time (:mod:`.tls_files`), so a missing, unreadable or broken file, or a key
that is not the certificate's, is a config error naming the key and the file; the server
loads them again when it starts its NBD export. A remote layer's client certificate and key
(``cert_file``, ``key_file`` with ``tls``) are checked to go together at load too. Layer
files used twice are refused (:mod:`.config_paths`); tokens are checked and secrets others
can read are warned about (:mod:`.credentials`).

What can never work is refused here rather than found later (or never, by a server that
retries): an address with white space, a control character or an undecodable byte, a
target gRPC cannot reach (:func:`~tierdisk.client.checks.server_address_problem`), a path
with a NUL (the value parsers of :mod:`.config_values`), a ``sector_size`` larger than
``max_io``. The config file and every PEM file
are read through :func:`~tierdisk.client.pem.read_small_file`: at most
:data:`~tierdisk.client.pem.MAX_FILE_BYTES` (``/dev/zero`` is refused, never read until
memory runs out); PEM and token files, which OpenSSL or a reconnect reads again by name,
must be regular files (a FIFO is refused, not waited for), the config file may be a pipe.
Values shown in messages are shortened (:func:`~.config_values.show`), so an error is one
line of sensible length.
"""

from __future__ import annotations

import logging
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from tierdisk.client.chunking import DEFAULT_MAX_IO
from tierdisk.client.pem import read_small_file

from .config_paths import check_server_files, check_shared_paths
from .config_values import (
    parse_bool,
    parse_count,
    parse_grpc_address,
    parse_mode,
    parse_nbd_source,
    parse_nonempty_str,
    parse_optional_address,
    parse_optional_path,
    parse_path,
    parse_positive_count,
    parse_seconds,
    parse_sector_size,
    parse_server_name,
    parse_size,
    parse_switch,
    parse_target,
    show,
)
from .credentials import parse_token, utf8_text, warn_about_secrets
from .errors import ConfigError
from .tls_files import check_client_certificate, check_nbd_tls

__all__ = [
    "DEFAULT_SIZE",
    "LAYER_OPTIONS",
    "Config",
    "LayerConfig",
    "ServerConfig",
    "VolumeConfig",
    "default_volumes",
    "load_config",
]

log = logging.getLogger(__name__)

DEFAULT_SIZE = 1 << 30
"""Size of the built-in ``default`` volume (1 GiB)."""


_Parser = Callable[[object, str], Any]
_PATH = "path"  # marker: a string resolved against data_dir

LAYER_OPTIONS: dict[str, dict[str, _Parser | str]] = {
    "ram": {"size": parse_size, "sector_size": parse_sector_size},
    "raw": {
        "path": _PATH,
        "size": parse_size,
        "read_only": parse_bool,
        "sector_size": parse_sector_size,
    },
    "sparse": {"path": _PATH, "size": parse_size, "sector_size": parse_sector_size},
    "sqlite": {"path": _PATH, "size": parse_size, "sector_size": parse_sector_size},
    "remote": {
        "target": parse_target,
        "volume": parse_nonempty_str,
        "mode": parse_mode,
        "timeout": parse_seconds,
        "retries": parse_count,
        "tls": parse_bool,
        "ca_file": _PATH,
        "cert_file": _PATH,
        "key_file": _PATH,
        "server_name": parse_server_name,
        "token": parse_token,
        "token_file": _PATH,
        "nbd": parse_nbd_source,
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
    "listen": parse_grpc_address,
    "metrics": parse_optional_address,
    "data_dir": parse_path,
    "nbd": parse_optional_address,
    "max_io": lambda v, what: parse_size(v, what),
    "nbd_max_connections": parse_positive_count,
    "nbd_tls_cert": parse_optional_path,  # file paths: "" = not set; resolved against data_dir
    "nbd_tls_key": parse_optional_path,
    "nbd_tls_ca": parse_optional_path,
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
        raise ConfigError(f"volumes must be [[volumes]] tables, not {show(raw_volumes)}")
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
    check_shared_paths(volumes)
    check_server_files(volumes, server.data_dir)
    _check_sector_sizes(volumes, server.max_io)
    warn_about_secrets(server, volumes, log)
    return Config(server, tuple(volumes))


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
    text = utf8_text(data, f"config {path}")
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
    check_nbd_tls(config, sources)
    return config


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
        read_only = parse_bool(raw.get("read_only", False), "read_only")
    except ConfigError as exc:
        raise exc.located(volume=name) from None
    layers_raw = raw.get("layers")
    if layers_raw is not None and not isinstance(layers_raw, list):
        raise ConfigError(
            f"layers must be [[volumes.layers]] tables, not {show(layers_raw)}",
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
        raise ConfigError(f"unknown layer kind {show(kind)} (known kinds: {known})")
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
            options[key] = os.path.join(os.path.abspath(data_dir), parse_path(raw[key], key))
        else:
            assert callable(parse)
            options[key] = parse(raw[key], key)
    if kind == "remote" and options.get("tls"):
        check_client_certificate(options)
    return LayerConfig(
        kind,
        read_cache=parse_bool(raw.get("read_cache", False), "read_cache"),
        write_through=parse_bool(raw.get("write_through", False), "write_through"),
        options=options,
    )
