"""PEM files named by TLS options (the CLI's ``--tls-*``, a remote layer's ``*_file``).

gRPC takes their bytes as they are and, given a file without the right PEM block, a key
that is not the certificate's or an encrypted key, fails the connection with "Failed to
create security handshaker": :func:`read_pem` and :func:`key_pair_problem` find that out
first, so the error can name the option and the file.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path

__all__ = ["CERTIFICATE", "PRIVATE_KEY", "key_pair_problem", "read_pem"]

CERTIFICATE = "CERTIFICATE"
PRIVATE_KEY = "PRIVATE KEY"  # also matches "RSA PRIVATE KEY", "EC PRIVATE KEY", …


def read_pem(path: str, kind: str) -> bytes:
    """The bytes of ``path``, which must hold at least one PEM block of ``kind``
    (:data:`CERTIFICATE` or :data:`PRIVATE_KEY`): :class:`OSError` when the file cannot be
    read, :class:`ValueError` (saying what is missing) when it holds no such block."""
    data = Path(path).read_bytes()
    if not re.search(rb"-----BEGIN (?:[A-Z0-9]+ )*" + kind.encode() + rb"-----", data):
        article = "an" if kind[0] in "AEIOU" else "a"
        raise ValueError(
            f"no PEM {kind.lower()} in it (expected {article} '-----BEGIN {kind}-----' block)"
        )
    return data


class _Encrypted(Exception):
    """Raised by :func:`_no_passphrase`: the key asked for a passphrase."""


def _no_passphrase() -> bytes:
    """The ``password`` callback of ``load_cert_chain``: called only for an encrypted key,
    which is refused (never a passphrase prompt)."""
    raise _Encrypted


def key_pair_problem(cert: str, key: str, cert_name: str) -> str | None:
    """What keeps the PEM private key in the file ``key`` from going with the certificate
    chain in the file ``cert`` (named ``cert_name`` in the words, e.g. ``"--tls-cert
    c.pem"``), worded to follow the key's name: it is encrypted, it is not the
    certificate's key, or ssl refuses the pair for another reason. ``None`` when they go
    together. :class:`OSError` (not an :class:`ssl.SSLError`) when a file cannot be read.
    Checked with ``ssl``'s ``load_cert_chain``, as a TLS connection would load them."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key, password=_no_passphrase)
    except _Encrypted:
        return "is encrypted (it asks for a passphrase): give the key unencrypted"
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            return f"is not the private key of the certificate in {cert_name}"
        return f"cannot be used with {cert_name} ({exc.reason or exc})"
    return None
