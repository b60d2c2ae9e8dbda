"""tierdisk.client.checks (client/checks.py): the checks of a gRPC server address and of a
bearer token made before anything is sent, each a problem in words or None."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

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


# -- targets that can never work (gRPC would retry them for ever, or go elsewhere) --------


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        ("http://127.0.0.1:7401", "scheme http: is not taken: gRPC takes no URL"),
        ("https://origin.example:7400", "scheme https: is not taken"),
        ("xyz:///foo", "unknown scheme xyz: (gRPC targets are HOST:PORT, [v6]:PORT, dns:"),
        ("vsock:2:7400", "scheme vsock: is not taken"),
        ("xds:///origin:7400", "scheme xds: is not taken"),
        ("DNS:///127.0.0.1:7400", "the scheme is written in lower case: dns:"),
        ("unix:", "names no socket path (unix:PATH)"),
        ("unix:///", "names no socket path"),
        ("unix://host/run/t.sock", "names a host, which a unix socket has none of"),
        ("unix-abstract:", "names no socket (unix-abstract:NAME)"),
        ("dns:///127.0.0.1", "after dns: missing port"),
        ("dns://8.8.8.8/origin:7400", "a DNS server in the target (dns://SERVER/…)"),
        ("ipv4:127.0.0.1", "'127.0.0.1': missing port"),
        ("ipv4:origin:7400", "'origin' is not an IPv4 address (ipv4:ADDR:PORT[,…])"),
        ("ipv4:127.0.0.1:7400,127.0.0.2:http", "'127.0.0.2:http': port 'http' is not a number"),
        ("ipv6:::1:7400", "an IPv6 address goes in brackets"),
        ("ipv6:[127.0.0.1]:7400", "'127.0.0.1' is not an IPv6 address"),
        ("127.0.0.1 :7401", "contains white space: ' ' (U+0020) at position 9"),
        ("127.0.0.1:7400\n", "contains white space: '\\n' (U+000A) at position 14"),
        ("\u00a0127.0.0.1:7400", "contains white space: '\\xa0' (U+00A0) at position 0"),
        ("127.0.0.1\x00:7401", "contains a control character: '\\x00' (U+0000) at position 9"),
        ("unix:/run/t\x00.sock", "contains a control character: '\\x00' (U+0000) at position 11"),
        ("orig\u200bin:7400", "contains an invisible format character: '\\u200b' (U+200B)"),
        ("127.0.0.1\udcff:1", "is not UTF-8 (byte 0xff at position 9)"),
        ("127.0.0.1:\u00b2", "port '\u00b2' is not a number"),
        ("127.0.0.1:\u0663", "port '\u0663' is not a number"),
    ],
)
def test_targets_that_can_never_work_are_refused(target: str, problem: str) -> None:
    """Each was passed to gRPC, which retried it for ever (``http://…``, ``unix:``, a space),
    cut it at the NUL (port 443) or failed inside the C core (not UTF-8)."""
    found = checks.server_address_problem(target)
    assert found is not None and problem in found, found


@pytest.mark.parametrize(
    "target",
    [
        "unix:relative.sock",
        "unix:///run/tierdisk.sock",
        "dns:origin.example:7400",
        "ipv4:127.0.0.1:7400,127.0.0.2:7401",
        "ipv6:[::1]:7400",
        "ipv6:[::1]:7400,[fd00::5]:7400",
        "localhost:7400",  # a host that looks like a scheme
    ],
)
def test_the_grpc_target_forms_pass(target: str) -> None:
    assert checks.server_address_problem(target) is None


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        ("dns:///127.0.0.1:7400", "a listen address is HOST:PORT or unix:PATH (not dns:…)"),
        ("unix-abstract:tierdisk", "(not unix-abstract:…)"),
        ("ipv4:127.0.0.1:7400", "(not ipv4:…)"),
        ("127.0.0.1\x00:7400", "contains a control character"),
    ],
)
def test_a_listener_takes_host_port_or_unix_only(target: str, problem: str) -> None:
    found = checks.server_address_problem(target, listener=True)
    assert found is not None and problem in found, found
    for address in ("127.0.0.1:0", "unix:/run/t.sock", "[::]:7400"):
        assert checks.server_address_problem(address, listener=True) is None


def test_address_text_problem_names_the_first_bad_character() -> None:
    assert checks.address_text_problem("origin.example:7400") is None
    assert checks.address_text_problem("unix:/srv/caf\u00e9.sock") is None  # UTF-8 is fine
    assert checks.address_text_problem("unix:/srv/my disks/t.sock") is None  # a file name's
    assert checks.address_text_problem("unix:/srv/a\tb.sock") == (
        "contains white space: '\\t' (U+0009) at position 11"
    )
    assert checks.address_text_problem("a\tb\x00") == (
        "contains white space: '\\t' (U+0009) at position 1"
    )


def test_every_form_taken_reaches_a_real_server(tmp_path: Path) -> None:
    """What the check lets through, gRPC takes: each form reaches a real gRPC server (a
    health check on 127.0.0.1 port 0, a unix socket and an abstract one)."""

    async def check_all() -> list[str]:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        (tmp_path / "my disks").mkdir()
        sock = tmp_path / "my disks" / "t.sock"  # a space in a socket's path is fine
        server.add_insecure_port(f"unix:{sock}")
        abstract = f"tierdisk-test-{os.getpid()}-{port}"
        server.add_insecure_port(f"unix-abstract:{abstract}")
        await server.start()
        targets = [
            f"127.0.0.1:{port}",
            f"localhost:{port}",
            f"dns:127.0.0.1:{port}",
            f"dns:///127.0.0.1:{port}",
            f"ipv4:127.0.0.1:{port}",
            f"unix:{sock}",
            f"unix://{sock}",
            f"unix-abstract:{abstract}",
        ]
        reached = []
        try:
            for target in targets:
                assert checks.server_address_problem(target) is None, target
                async with grpc.aio.insecure_channel(target) as channel:
                    stub = health_pb2_grpc.HealthStub(channel)
                    await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                reached.append(target)
        finally:
            await server.stop(0)
        return reached

    assert len(asyncio.run(check_all())) == 8


@pytest.mark.parametrize(
    ("server", "problem"),
    [
        ("http://127.0.0.1:7401", "scheme http: is not taken"),
        ("unix:", "names no socket path"),
        ("127.0.0.1 :7401", "contains white space"),
        ("xyz:///foo", "unknown scheme xyz:"),
    ],
)
def test_the_command_line_refuses_the_same_targets(server: str, problem: str) -> None:
    """``tierdisk --server`` goes through the same check: a usage error, one line, exit 2
    (it used to try gRPC, which gave up after its retries with "unavailable")."""
    result = subprocess.run(
        [sys.executable, "-m", "tierdisk.client", "--server", server, "--retries", "0", "volumes"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "TIERDISK_SERVER"},
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tierdisk: "), result.stderr
    assert f"server address {server!r} (from --server): {problem}" in lines[0], result.stderr


@pytest.mark.parametrize(
    ("target", "local"),
    [
        ("127.0.0.1:7400", True),
        ("127.8.9.1:7400", True),
        ("[::1]:7400", True),
        ("localhost:7400", True),
        ("unix:/run/tierdisk.sock", True),
        ("unix-abstract:tierdisk", True),
        ("dns:///localhost:7400", True),
        ("ipv4:127.0.0.1:1,127.0.0.2:2", True),
        ("ipv4:127.0.0.1:1,10.0.0.1:2", False),
        ("origin.example:7400", False),
        ("10.1.2.3:7400", False),
        ("[2001:db8::1]:7400", False),
        ("dns:origin.example:7400", False),
        ("localhost.:7400", False),  # gRPC asks the network's DNS for it
        ("LOCALHOST:7400", True),
        ("[::ffff:127.0.0.1]:7400", True),
        ("[::ffff:10.0.0.1]:7400", False),
    ],
)
def test_stays_on_this_host(target: str, local: bool) -> None:
    """What a token without TLS may be sent to without crossing a network."""
    assert checks.stays_on_this_host(target) is local


def test_a_percent_in_a_unix_target_is_refused() -> None:
    """gRPC decodes %XX in a unix: target: ``unix:/run/x%41.sock`` would reach
    ``/run/xA.sock``, another socket than the one named."""
    problem = checks.server_address_problem("unix:/run/x%41.sock")
    assert problem is not None and "'%' in a unix socket path is not supported" in problem
