"""Test certificates made by the ``openssl`` command line (a Debian tool: the tests that
need them skip without it, and fail under ``TIERDISK_REQUIRE_TOOLS=1``).

    from certs import Certs, make_certs
    certs = make_certs(tmp_path_factory.mktemp("certs"))

Two CAs, a server certificate for 127.0.0.1 and ``localhost``, client certificates of each
CA, and client folders laid out as libnbd's ``tls-certificates=DIR`` and qemu's
``tls-creds-x509,dir=DIR,endpoint=client`` read them.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tools import TOOL_TIMEOUT, require_tool

__all__ = ["Certs", "make_certs"]


@dataclass(frozen=True)
class Certs:
    """What :func:`make_certs` made. The client folders hold ``ca-cert.pem`` (the CA that
    signed the server), ``client-cert.pem`` and ``client-key.pem``."""

    root: Path
    ca: Path  # the CA that signed the server's and the good client's certificates
    server_cert: Path  # IP SAN 127.0.0.1, DNS localhost
    server_key: Path
    other_ca: Path  # a second CA
    client_cert: Path  # a client certificate of ``ca``
    client_key: Path
    good: Path  # client folder: the client certificate of ``ca``
    no_cert: Path  # client folder: the CA only, no client certificate
    other_cert: Path  # client folder: a client certificate of ``other_ca`` (trusts both CAs)
    distrust: Path  # client folder: trusts only ``other_ca``, so not the server
    encrypted_key: Path  # the server's key, encrypted with a passphrase
    encrypted_client_key: Path  # the client's key, encrypted with a passphrase
    other_key: Path  # a key that is no certificate's here


def _openssl(openssl: str, cwd: Path, *args: str) -> None:
    done = subprocess.run(
        [openssl, *args], cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT
    )
    assert done.returncode == 0, f"openssl {' '.join(args)}:\n{done.stderr}"


def _new_key(openssl: str, cwd: Path, name: str) -> None:
    _openssl(openssl, cwd, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", name)  # fmt: skip


def _new_ca(openssl: str, cwd: Path, name: str, subject: str) -> None:
    _new_key(openssl, cwd, f"{name}-key.pem")
    _openssl(openssl, cwd, "req", "-x509", "-new", "-key", f"{name}-key.pem", "-days", "2",
             "-subj", subject, "-out", f"{name}-cert.pem",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip


def _new_cert(openssl: str, cwd: Path, name: str, ca: str, subject: str, ext: str) -> None:
    """``name-key.pem`` and ``name-cert.pem`` signed by ``ca`` with the extensions ``ext``."""
    _new_key(openssl, cwd, f"{name}-key.pem")
    _openssl(openssl, cwd, "req", "-new", "-key", f"{name}-key.pem", "-subj", subject,
             "-out", f"{name}.csr")  # fmt: skip
    (cwd / f"{name}.ext").write_text(ext)
    _openssl(openssl, cwd, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}-cert.pem",
             "-CAkey", f"{ca}-key.pem", "-CAcreateserial", "-days", "2",
             "-extfile", f"{name}.ext", "-out", f"{name}-cert.pem")  # fmt: skip


def _client_folder(
    root: Path, name: str, cas: list[Path], cert: Path | None, key: Path | None
) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "ca-cert.pem").write_bytes(b"".join(ca.read_bytes() for ca in cas))
    if cert is not None and key is not None:
        (folder / "client-cert.pem").write_bytes(cert.read_bytes())
        (folder / "client-key.pem").write_bytes(key.read_bytes())
        (folder / "client-key.pem").chmod(0o600)
    return folder


def make_certs(root: Path) -> Certs:
    """Make the certificates and folders of :class:`Certs` in ``root`` (skips the test
    without ``openssl``)."""
    openssl = require_tool("openssl")
    _new_ca(openssl, root, "ca", "/CN=tierdisk test CA")
    _new_ca(openssl, root, "other-ca", "/CN=another CA")
    server_ext = (
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    client_ext = (
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=clientAuth\n"
    )
    _new_cert(openssl, root, "server", "ca", "/CN=localhost", server_ext)
    _new_cert(openssl, root, "client", "ca", "/CN=good client", client_ext)
    _new_cert(openssl, root, "stranger", "other-ca", "/CN=stranger", client_ext)
    for key, encrypted in (("server", "encrypted-key.pem"), ("client", "encrypted-client-key.pem")):
        _openssl(openssl, root, "pkey", "-in", f"{key}-key.pem", "-aes-256-cbc",
                 "-passout", "pass:secret", "-out", encrypted)  # fmt: skip
    _new_key(openssl, root, "other-key.pem")
    ca, other_ca = root / "ca-cert.pem", root / "other-ca-cert.pem"
    client = (root / "client-cert.pem", root / "client-key.pem")
    stranger = (root / "stranger-cert.pem", root / "stranger-key.pem")
    return Certs(
        root=root,
        ca=ca,
        server_cert=root / "server-cert.pem",
        server_key=root / "server-key.pem",
        other_ca=other_ca,
        client_cert=client[0],
        client_key=client[1],
        good=_client_folder(root, "good", [ca], *client),
        no_cert=_client_folder(root, "no-cert", [ca], None, None),
        # both CAs: qemu checks its own certificate against the bundle before it connects
        other_cert=_client_folder(root, "other-cert", [ca, other_ca], *stranger),
        distrust=_client_folder(root, "distrust", [other_ca], *client),
        encrypted_key=root / "encrypted-key.pem",
        encrypted_client_key=root / "encrypted-client-key.pem",
        other_key=root / "other-key.pem",
    )
