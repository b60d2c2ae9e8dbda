"""PEM files named by TLS options (the CLI's ``--tls-*``, a remote layer's ``*_file``).

gRPC takes their bytes as they are and, given a file without the right PEM block, fails the
connection with "Failed to create security handshaker": :func:`read_pem` finds that out
first, so the error can name the option and the file.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["CERTIFICATE", "PRIVATE_KEY", "read_pem"]

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
