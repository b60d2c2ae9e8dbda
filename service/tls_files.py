"""The TLS files a config names, loaded at config time: a bad file stops the start.

The NBD export's ``nbd_tls_cert``, ``nbd_tls_key`` and ``nbd_tls_ca`` (PEM: the server's
certificate chain, its unencrypted private key, the CA bundle that signs the clients'
certificates): :func:`check_nbd_tls` applies the rules of the three keys and loads them
(:func:`nbd_tls_context`, which the server calls again when it starts its NBD export), and
:func:`load_key_pair` loads a certificate with its key (the NBD export's, a remote layer's
client pair for its NBD data path). A remote layer's client certificate and key
(``cert_file``, ``key_file`` with ``tls``) are checked to go together
(:func:`check_client_certificate`). What cannot be read, holds no PEM block of its kind, is
encrypted or is another certificate's key is a :class:`~.errors.ConfigError` naming the key
and the file. Files are read through :func:`~tierdisk.client.pem.read_small_file`: regular
files of at most :data:`~tierdisk.client.pem.MAX_FILE_BYTES`, since ssl reads them again by
name.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tierdisk.client.pem import PRIVATE_KEY, key_pair_problem, pem_problem, read_small_file

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import ServerConfig

__all__ = ["check_client_certificate", "check_nbd_tls", "load_key_pair", "nbd_tls_context"]


def check_nbd_tls(config: ServerConfig, sources: Mapping[str, str]) -> None:
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
    if pem_problem(texts["nbd_tls_key"], PRIVATE_KEY) is not None:  # the remote layer's rule
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


def check_client_certificate(options: Mapping[str, Any]) -> None:
    """A remote layer's client certificate and key (``cert_file``, ``key_file``), when both
    are given: :class:`ConfigError` naming the files when they do not go together (not
    readable PEM files of their kinds, an encrypted key, another certificate's key), as the
    layer would find at attach (:func:`.layers.remote_connect.check_key_pair`); found here,
    before anything is bound. (One without the other is refused when the layer is made.)"""
    cert, key = options.get("cert_file"), options.get("key_file")
    if cert is None or key is None:
        return
    from .layers.remote_connect import check_key_pair  # here: the layers package imports .config

    check_key_pair(cert, key)
