"""Secrets in a config: bearer tokens, and the private key and token files' permissions.

A remote layer's ``token`` option (:func:`parse_token`) and the token read from its
``token_file`` (:func:`token_from_file`, also read again at each attach by
:func:`~.layers.remote_connect.credentials`) must be what gRPC can send in a header
(:func:`~tierdisk.client.checks.token_problem`); a bad one is a
:class:`~.errors.ConfigError` that never shows the token itself. Files are text in UTF-8
(:func:`utf8_text`, which the config file is read with too). Once a config is parsed,
:func:`warn_about_secrets` logs (it refuses nothing) a private key or token file that the
group or others may read (its mode, as ``chmod`` gives it), and a bearer token sent without
TLS to another host.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import TYPE_CHECKING

from tierdisk.client.checks import stays_on_this_host, token_problem

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import ServerConfig, VolumeConfig

__all__ = ["parse_token", "token_from_file", "utf8_text", "warn_about_secrets"]


def parse_token(value: object, what: str) -> str:
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
    token = utf8_text(data, what).strip()
    if not token:
        raise ConfigError(f"{what} is empty")  # not "the token is empty": the file is
    problem = token_problem(token)
    if problem is not None:
        raise ConfigError(f"{what}: the token {problem}")
    return token


def utf8_text(data: bytes, what: str) -> str:
    """``data`` decoded as UTF-8; :class:`ConfigError` saying ``what`` is not, at which
    offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        byte = data[exc.start]
        raise ConfigError(
            f"{what} is not UTF-8 (byte 0x{byte:02x} at offset {exc.start})"
        ) from None


def warn_about_secrets(
    server: ServerConfig, volumes: list[VolumeConfig], log: logging.Logger
) -> None:
    """Warn on ``log`` (the config still loads) about a secret others can read: a private key
    or token file whose mode lets the group or others read it, and a remote layer's bearer
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
