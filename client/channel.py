"""The client's gRPC channel: the options every client starts from, the check of its
target, and opening one.

:class:`~tierdisk.client.aio.AsyncClient` opens its channel with :func:`open_channel`; the
calls made on it go through a :class:`~tierdisk.client.calls.CallRunner`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio

from .checks import server_address_problem
from .pem import CERTIFICATE, PRIVATE_KEY, pem_problem

__all__ = [
    "DEFAULT_CHANNEL_OPTIONS",
    "MAX_MESSAGE_BYTES",
    "MESSAGE_FRAMING_BYTES",
    "check_target",
    "open_channel",
]

MAX_MESSAGE_BYTES = 64 << 20
"""The channel's message cap in each direction, unless ``max_io`` needs more (then
``max_io`` plus :data:`MESSAGE_FRAMING_BYTES`)."""
MESSAGE_FRAMING_BYTES = 1 << 20
"""Room for a message's fields around its ``max_io`` bytes of data."""

DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # We retry ourselves (tierdisk.client.retry); one policy, not two stacked.
    ("grpc.enable_retries", 0),
    # Reconnect soon after a server restart, so our own short retries can find it again.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)
"""Channel options every client starts from; ``channel_options`` adds to or overrides them."""


def check_target(target: str) -> None:
    """Refuse a ``target`` gRPC would not reach as written, as the ``tierdisk`` command
    refuses its ``--server`` (:func:`~tierdisk.client.checks.server_address_problem`):
    :class:`ValueError` naming the problem for a missing port (gRPC would use 443; an empty
    target too), a NUL or other control character or white space (a NUL cuts the address:
    another host or port), a port out of range, an unknown scheme or a URL; :class:`TypeError`
    for anything but a ``str``. ``HOST:PORT`` (a name such as ``localhost:7400``, or an
    address), ``[v6]:PORT``, ``unix:PATH`` and gRPC's ``dns:``, ``ipv4:``, ``ipv6:`` and
    ``unix-abstract:`` forms pass."""
    if not isinstance(target, str):
        raise TypeError(f"target must be a str (HOST:PORT), not {type(target).__name__}")
    problem = server_address_problem(target)
    if problem is not None:
        raise ValueError(f"target {target!r}: {problem}")


def open_channel(
    target: str,
    *,
    max_io: int,
    channel_options: Sequence[tuple[str, Any]] = (),
    secure: bool = False,
    root_certificates: bytes | None = None,
    certificate_chain: bytes | None = None,
    private_key: bytes | None = None,
) -> grpc.aio.Channel:
    """A channel to ``target`` (checked first: :func:`check_target`) with
    :data:`DEFAULT_CHANNEL_OPTIONS`, its message caps raised to fit ``max_io`` bytes of data
    per message, then ``channel_options`` over them. TLS
    when ``secure`` is true or any of ``root_certificates`` / ``certificate_chain`` /
    ``private_key`` (PEM bytes) is given. A client certificate goes with its key:
    :class:`ValueError` when only one of ``certificate_chain`` and ``private_key`` is given
    (an argument is given when it is not ``None``): gRPC's C core would abort the process;
    :class:`TypeError` when one is not :class:`bytes`; and when one of them holds no PEM
    block of its kind (a certificate, a private key): gRPC would fail every connection
    ("Failed to create security handshaker"), retried for seconds; empty bytes too, which
    are given: a CA file read empty never means a channel in clear."""
    check_target(target)
    if (certificate_chain is None) != (private_key is None):
        given, missing = ("certificate_chain", "private_key")
        if private_key is not None:
            given, missing = missing, given
        raise ValueError(f"{given} without {missing}: a client certificate goes with its key")
    for name, data, kind in (
        ("root_certificates", root_certificates, CERTIFICATE),
        ("certificate_chain", certificate_chain, CERTIFICATE),
        ("private_key", private_key, PRIVATE_KEY),
    ):
        if data is None:
            continue
        if not isinstance(data, bytes):
            raise TypeError(f"{name} must be PEM bytes, not {type(data).__name__}")
        if (problem := pem_problem(data, kind)) is not None:
            raise ValueError(f"{name}: {problem}")  # empty bytes too: never TLS turned off
    options: dict[str, Any] = dict(DEFAULT_CHANNEL_OPTIONS)
    if max_io + MESSAGE_FRAMING_BYTES > MAX_MESSAGE_BYTES:  # room for max_io per message
        cap = max_io + MESSAGE_FRAMING_BYTES
        options["grpc.max_send_message_length"] = cap
        options["grpc.max_receive_message_length"] = cap
    options.update(channel_options)
    option_list = list(options.items())
    if secure or root_certificates is not None or certificate_chain is not None:
        creds = grpc.ssl_channel_credentials(
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
        )
        return grpc.aio.secure_channel(target, creds, options=option_list)
    return grpc.aio.insecure_channel(target, options=option_list)
