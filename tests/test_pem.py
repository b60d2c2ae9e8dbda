"""client/pem.py: which files count as holding a PEM certificate or private key."""

from __future__ import annotations

from pathlib import Path

import pytest

from tierdisk.client.pem import CERTIFICATE, PRIVATE_KEY, read_pem


def block(label: str) -> str:
    return f"-----BEGIN {label}-----\nAAAA\n-----END {label}-----\n"


@pytest.mark.parametrize(
    ("content", "kind", "ok"),
    [
        (block("CERTIFICATE"), CERTIFICATE, True),
        ("subject=...\n" + block("CERTIFICATE") + block("CERTIFICATE"), CERTIFICATE, True),
        (block("PRIVATE KEY"), PRIVATE_KEY, True),
        (block("RSA PRIVATE KEY"), PRIVATE_KEY, True),
        (block("EC PRIVATE KEY"), PRIVATE_KEY, True),
        (block("ENCRYPTED PRIVATE KEY"), PRIVATE_KEY, True),
        (block("PRIVATE KEY"), CERTIFICATE, False),  # a key where a certificate belongs
        (block("CERTIFICATE"), PRIVATE_KEY, False),
        (block("X509 CRL"), CERTIFICATE, False),
        ("", CERTIFICATE, False),
        ("just text\n", PRIVATE_KEY, False),
    ],
)
def test_read_pem(tmp_path: Path, content: str, kind: str, ok: bool) -> None:
    path = tmp_path / "f.pem"
    path.write_text(content)
    if ok:
        assert read_pem(str(path), kind) == content.encode()
    else:
        with pytest.raises(ValueError, match=f"no PEM {kind.lower()}"):
            read_pem(str(path), kind)


def test_a_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_pem(str(tmp_path / "nope.pem"), CERTIFICATE)
