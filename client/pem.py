"""PEM files named by TLS options (the CLI's ``--tls-*``, a remote layer's ``*_file``).

gRPC takes their bytes as they are and, given a file without the right PEM block, a key
that is not the certificate's or an encrypted key, fails the connection with "Failed to
create security handshaker": :func:`read_pem` and :func:`key_pair_problem` find that out
first, so the error can name the option and the file.

Such files are read through :func:`read_small_file`: at most :data:`MAX_FILE_BYTES`, so a
path such as ``/dev/zero`` is refused instead of read until memory runs out (the server's
config file is read through it too).
"""

from __future__ import annotations

import errno
import os
import re
import ssl
import stat

__all__ = [
    "CERTIFICATE",
    "MAX_FILE_BYTES",
    "PRIVATE_KEY",
    "key_pair_problem",
    "pem_problem",
    "read_pem",
    "read_small_file",
]

CERTIFICATE = "CERTIFICATE"
PRIVATE_KEY = "PRIVATE KEY"  # also matches "RSA PRIVATE KEY", "EC PRIVATE KEY", …

MAX_FILE_BYTES = 4 << 20
"""The most :func:`read_small_file` reads: 4 MiB (a bundle of every public root CA is about
200 KiB, a config of a thousand volumes about as much)."""

_FILE_KINDS = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
)


def read_small_file(path: str, *, regular: bool = True, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of the file at ``path``, at most ``limit`` of them.

    :class:`OSError` when it cannot be opened or read; :class:`ValueError`, worded to follow
    the file's name (``"is a character device, not a regular file"``), when it holds more
    than ``limit`` bytes or, with ``regular`` (a file read more than once, or by OpenSSL by
    its name), is not a regular file. A FIFO is opened without waiting for a writer, so
    it is refused at once rather than waited for. ``regular=False`` reads a pipe or a
    device too (``<(…)`` on a command line), still at most ``limit`` bytes."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | (os.O_NONBLOCK if regular else 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):  # an OSError, as reading one would be
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if regular and not stat.S_ISREG(mode):
            kind = next((name for test, name in _FILE_KINDS if test(mode)), "a special file")
            raise ValueError(f"is {kind}, not a regular file")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise ValueError(f"holds more than {_bytes_text(limit)}, the most read from such a file")
    return b"".join(chunks)


def _bytes_text(count: int) -> str:
    """``"4 MiB (4194304 bytes)"`` for a whole number of MiB, else ``"N bytes"``."""
    if count % (1 << 20) == 0:
        return f"{count >> 20} MiB ({count} bytes)"
    return f"{count} bytes"


def read_pem(path: str, kind: str, *, regular: bool = False) -> bytes:
    """The bytes of ``path``, which must hold at least one PEM block of ``kind``
    (:data:`CERTIFICATE` or :data:`PRIVATE_KEY`): :class:`OSError` when the file cannot be
    read, :class:`ValueError` (saying what is wrong) when it holds no such block, more than
    :data:`MAX_FILE_BYTES`, or (``regular``) is not a regular file (:func:`read_small_file`)."""
    data = read_small_file(path, regular=regular)
    problem = pem_problem(data, kind)
    if problem is not None:
        raise ValueError(problem)
    return data


def pem_problem(data: bytes, kind: str) -> str | None:
    """``"no PEM … in it (expected a '-----BEGIN …-----' block)"`` when ``data`` holds no
    PEM block of ``kind`` (:data:`CERTIFICATE` or :data:`PRIVATE_KEY`); else ``None``."""
    if re.search(rb"-----BEGIN (?:[A-Z0-9]+ )*" + kind.encode() + rb"-----", data):
        return None
    article = "an" if kind[0] in "AEIOU" else "a"
    return f"no PEM {kind.lower()} in it (expected {article} '-----BEGIN {kind}-----' block)"


class _Encrypted(Exception):
    """Raised by :func:`_no_passphrase`: the key asked for a passphrase."""


def _no_passphrase() -> bytes:
    """The ``password`` callback of ``load_cert_chain``: called only for an encrypted key,
    which is refused (never a passphrase prompt)."""
    raise _Encrypted


def key_pair_problem(
    cert: str, key: str, cert_name: str, context: ssl.SSLContext | None = None
) -> str | None:
    """What keeps the PEM private key in the file ``key`` from going with the certificate
    chain in the file ``cert`` (named ``cert_name`` in the words, e.g. ``"--tls-cert
    c.pem"``), worded to follow the key's name: it is encrypted, it is not the
    certificate's key, or ssl refuses the pair for another reason. ``None`` when they go
    together, and then loaded into ``context`` if given. :class:`OSError` (not an
    :class:`ssl.SSLError`) when a file cannot be read. Checked with ``ssl``'s
    ``load_cert_chain``, as a TLS connection would load them."""
    context = context or ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except _Encrypted:
        return "is encrypted (it asks for a passphrase): give the key unencrypted"
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            return f"is not the private key of the certificate in {cert_name}"
        return f"cannot be used with {cert_name} ({exc.reason or exc})"
    return None
