"""How a ``remote`` layer connects to the other tierdisk: channel, credentials, client, hops.

:func:`connect` makes the :class:`~tierdisk.client.AsyncClient` a
:class:`~.remote.RemoteLayer` uses, over a channel with :data:`CHANNEL_OPTIONS` (keepalive
pings, and gRPC's own reconnect backoff from 0.1 s up to 2 s, so the channel reconnects by
itself after the remote restarts). :func:`credentials` turns the layer's ``tls``,
``ca_file``, ``cert_file``, ``key_file``, ``token`` and ``token_file`` options into the
client's keyword arguments, reading the files named (:func:`read_file`; a file that cannot be
read, is not a regular file or is larger than :data:`~tierdisk.client.pem.MAX_FILE_BYTES` is
a :class:`~..errors.ConfigError`) and checking that the client key goes with its certificate
(:func:`check_key_pair`, which the config loader calls too: a bad pair stops the start, where
gRPC would fail every handshake). :func:`hop_metadata` is the metadata every call carries: the
``tierdisk-hops`` chain (:mod:`tierdisk.service.hops`), so a loop or too deep a chain of tiers
fails fast. The options themselves are described in :mod:`.remote`'s docstring. Times are in
seconds unless a name says otherwise (``_ms``: milliseconds).
"""

from __future__ import annotations

from typing import Any

from tierdisk.client.aio import AsyncClient, CallObserver, MetadataFactory
from tierdisk.client.pem import (
    CERTIFICATE,
    PRIVATE_KEY,
    key_pair_problem,
    read_pem,
    read_small_file,
)

from .. import hops
from ..credentials import token_from_file
from ..errors import ConfigError

__all__ = [
    "BACKOFF",
    "CHANNEL_OPTIONS",
    "MAX_BACKOFF",
    "check_key_pair",
    "connect",
    "credentials",
    "hop_metadata",
    "read_file",
]

BACKOFF = 0.15
"""Seconds: the first retry wait's ceiling (full jitter), doubling per retry. With the default
3 retries a call waits up to 1.05 s (0.5 s on average) for a remote that answers
``UNAVAILABLE``: a remote that just restarted is reconnected by then most of the time (the
channel's own reconnect backoff starts at 0.1 s), and one that stays down is reported
within about a second. (Writes through a tier sent right after its origin restarted failed
in 4 of 16 tries at 0.05 s, ~0.35 s in all, and 1 of 16 at 0.15 s: EIO to NBD clients,
which do not retry.)"""
MAX_BACKOFF = 2.0  # seconds: the largest retry wait ceiling

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 15_000),  # the server accepts pings every 10 s or slower
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),  # keep pinging along an idle WatchResize
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)
"""The remote layer's gRPC channel options (the times in milliseconds)."""


def read_file(path: str | None, what: str, kind: str | None = None) -> bytes | None:
    """The bytes of the file at ``path`` (None when ``path`` is None); a PEM file must hold a
    block of ``kind``. ``what`` names the option in the :class:`~..errors.ConfigError` raised
    when the file cannot be read, holds no such block, is not a regular file (``/dev/zero``,
    a FIFO: never waited for) or holds more than
    :data:`~tierdisk.client.pem.MAX_FILE_BYTES` (:func:`~tierdisk.client.pem.read_small_file`).
    """
    if path is None:
        return None
    try:
        return read_small_file(path) if kind is None else read_pem(path, kind, regular=True)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"{what} {path}: {exc}") from None


def check_key_pair(cert_file: str, key_file: str) -> None:
    """:class:`~..errors.ConfigError` naming the files when the client certificate
    ``cert_file`` and its key ``key_file`` cannot go together: either is not a readable
    regular PEM file of its kind (:func:`read_file`), the key is encrypted or is another
    certificate's (:func:`~tierdisk.client.pem.key_pair_problem`). gRPC takes such a pair
    and then fails every handshake ("Failed to create security handshaker"), which the
    server would retry for ever as a tier that is not reachable."""
    read_file(cert_file, "cert_file", CERTIFICATE)
    read_file(key_file, "key_file", PRIVATE_KEY)
    try:
        problem = key_pair_problem(cert_file, key_file, f"cert_file {cert_file}")
    except OSError as exc:
        raise ConfigError(f"cannot read key_file {key_file}: {exc.strerror}") from None
    if problem is not None:
        raise ConfigError(f"key_file {key_file} {problem}")


def credentials(
    *,
    tls: bool,
    ca_file: str | None,
    cert_file: str | None,
    key_file: str | None,
    token: str | None,
    token_file: str | None,
) -> dict[str, Any]:
    """Client keyword arguments for TLS and the token, reading the files named."""
    if token_file is not None:
        raw = read_file(token_file, "token_file")
        token = token_from_file(raw or b"", token_file)
    options: dict[str, Any] = {"token": token or None}
    if tls:
        if cert_file is not None and key_file is not None:
            check_key_pair(cert_file, key_file)
        options.update(
            secure=True,
            root_certificates=read_file(ca_file, "ca_file", CERTIFICATE),
            certificate_chain=read_file(cert_file, "cert_file", CERTIFICATE),
            private_key=read_file(key_file, "key_file", PRIVATE_KEY),
        )
    return options


def connect(
    target: str,
    client_credentials: dict[str, Any],
    *,
    timeout: float,
    server_name: str | None,
    max_io: int,
    max_in_flight: int,
    metadata_factory: MetadataFactory,
    on_call: CallObserver,
) -> AsyncClient:
    """A client of the tierdisk server at ``target``, for attach: no retries (a tier that is
    down is reported at once; the server retries the volume), ``timeout`` seconds per call,
    ``client_credentials`` from :func:`credentials`, and ``server_name`` (when given) as the
    name the server's certificate is checked against and the ``:authority``. The caller sets
    the client's retry policy once attached."""
    channel_options: list[tuple[str, Any]] = list(CHANNEL_OPTIONS)
    if server_name:
        channel_options += [
            ("grpc.ssl_target_name_override", server_name),
            ("grpc.default_authority", server_name),
        ]
    return AsyncClient(
        target,
        timeout=timeout,
        retries=0,  # attach: report a tier that is down at once; the server retries
        backoff=BACKOFF,
        max_backoff=MAX_BACKOFF,
        channel_options=channel_options,
        max_io=max_io,
        max_in_flight=max_in_flight,
        metadata_factory=metadata_factory,
        on_call=on_call,
        **client_credentials,
    )


def hop_metadata(home_chain: str) -> tuple[tuple[str, str], ...]:
    """The metadata of a call to the remote: the ``tierdisk-hops`` chain of the request being
    served, or ``home_chain`` (this server's own id, captured at attach) for a call made
    outside a request; and, while attaching, who waits for this volume (hops module docs)."""
    chain = hops.outgoing() if hops.current_chain.get() else home_chain
    metadata: tuple[tuple[str, str], ...] = ((hops.HOPS_HEADER, chain),) if chain else ()
    waiting = hops.waiting_for_me.get()
    if waiting:  # attaching: who waits for this volume (hops module docs)
        metadata += ((hops.WAITING_HEADER, ",".join(sorted(waiting))),)
    return metadata
