"""tierdisk.client.checks (client/checks.py): the checks of a gRPC server address and of a
bearer token made before anything is sent, each a problem in words or None."""

from __future__ import annotations

import pytest

from tierdisk.client import checks


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        ("127.0.0.1:7400", None),
        ("localhost:0", None),
        ("[::1]:7400", None),
        ("unix:/run/tierdisk.sock", None),
        ("unix-abstract:tierdisk", None),
        ("dns:///example.com:7400", None),
        ("ipv4:127.0.0.1:7400", None),
        ("127.0.0.1:99999", "port 99999 is out of range (0-65535)"),
        ("127.0.0.1:65536", "out of range"),
        ("[::1]:70000", "out of range"),
        ("localhost", "missing port"),
        ("localhost:", "missing port"),
        ("[::1]", "missing port"),
        ("::1", "an IPv6 address goes in brackets: [::1]:7400"),
        ("::1:7400", "an IPv6 address goes in brackets"),
        ("host:http", "not a number"),
        (":7400", "missing host"),
        ("[]:7400", "missing host"),
    ],
)
def test_server_address_problem(target: str, problem: str | None) -> None:
    found = checks.server_address_problem(target)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_an_empty_host_is_every_interface_only_where_asked() -> None:
    """For a listener (``/metrics``, NBD) ``:9400`` is every interface; gRPC needs a host."""
    assert checks.server_address_problem(":9400", empty_host=True) is None
    assert checks.server_address_problem("[]:9400", empty_host=True) is None
    found = checks.server_address_problem("::1:9400", empty_host=True)
    assert found is not None and "brackets" in found


@pytest.mark.parametrize(
    ("token", "problem"),
    [
        ("s3cr3t-token_.~+/=", None),
        ("with inner space", None),  # gRPC sends a space in a header value
        ("secret\r", "'\\r' (U+000D) at position 6"),
        ("sec\tret", "'\\t' (U+0009) at position 3"),
        ("t\u00f6ken", "'\u00f6' (U+00F6) at position 1"),
        ("\x7f", "(U+007F) at position 0"),
        ("abc\u20ac", "(U+20AC) at position 3"),
    ],
)
def test_token_problem_names_the_first_bad_character(token: str, problem: str | None) -> None:
    found = checks.token_problem(token)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert found.startswith("contains a character not allowed in a gRPC header")
        assert found.endswith(problem)
