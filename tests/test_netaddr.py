"""Listen addresses are bound exclusively, the same way for every front end."""

from __future__ import annotations

from pathlib import Path

import pytest

from tierdisk.service.netaddr import (
    AddressInUse,
    bind_failure,
    bound_address,
    listen_socket,
    reachable_address,
    split_host_port,
)


def test_tcp_port_zero_reports_the_real_port_and_refuses_a_second_listener() -> None:
    first = listen_socket("127.0.0.1:0", "metrics")
    try:
        address = bound_address(first)
        assert address.startswith("127.0.0.1:") and not address.endswith(":0")
        with pytest.raises(AddressInUse, match=f"metrics on {address}: address already in use"):
            listen_socket(address, "metrics")
    finally:
        first.close()


def test_refusals_read_as_sentences_without_an_errno() -> None:
    """``str()`` of the error is the one line ``tierdisk serve`` prints: no ``[Errno 98]``."""
    first = listen_socket("127.0.0.1:0", "NBD")
    try:
        address = bound_address(first)
        with pytest.raises(AddressInUse) as info:
            listen_socket(address, "NBD")
        assert str(info.value) == f"cannot listen for NBD on {address}: address already in use"
        assert bind_failure(address) == "address already in use"  # the reason gRPC won't give
    finally:
        first.close()
    assert bind_failure(address) == "not available"  # free again: no reason found here


def test_unix_socket_in_use_refused_and_stale_one_reclaimed(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "api.sock"  # the parent folder is created
    first = listen_socket(f"unix:{path}", "gRPC")
    assert bound_address(first) == f"unix:{path}"
    with pytest.raises(AddressInUse, match="in use"):
        listen_socket(f"unix:{path}", "gRPC")
    first.close()  # the socket file stays behind, as after a crash
    again = listen_socket(f"unix:{path}", "gRPC")
    again.close()


def test_a_path_that_is_not_a_socket_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("data")
    with pytest.raises(AddressInUse, match="the path exists"):
        listen_socket(f"unix:{tmp_path / 'f'}", "NBD")
    assert (tmp_path / "f").read_text() == "data"


@pytest.mark.parametrize("bad", ["no-port", "host:http", "127.0.0.1:70000", "unix:"])
def test_malformed_addresses(bad: str) -> None:
    with pytest.raises(ValueError):
        listen_socket(bad, "NBD")


def test_split_host_port() -> None:
    assert split_host_port("[::1]:7400") == ("::1", 7400)
    assert split_host_port(":9400") == ("", 9400)


async def test_metrics_endpoint_removes_its_socket_file_and_only_its_own(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from tierdisk.service.metrics_http import MetricsEndpoint

    path = tmp_path / "metrics.sock"
    endpoint = MetricsEndpoint(CollectorRegistry())
    await endpoint.start(f"unix:{path}")
    assert endpoint.address == f"unix:{path}" and path.exists()
    await endpoint.close()
    assert not path.exists()  # a clean stop leaves nothing behind

    endpoint = MetricsEndpoint(CollectorRegistry())
    await endpoint.start(f"unix:{path}")
    path.unlink()
    other = listen_socket(f"unix:{path}", "someone else")  # a new server took the path
    try:
        await endpoint.close()
        assert path.exists()  # not ours any more: left alone
    finally:
        other.close()


@pytest.mark.parametrize(
    ("bound", "via", "reached"),
    [
        ("127.0.0.1:10809", "origin.example:7400", "127.0.0.1:10809"),  # a host: as it is
        ("0.0.0.0:10809", "origin.example:7400", "origin.example:10809"),
        ("[::]:10809", "10.0.0.5:7400", "10.0.0.5:10809"),
        (":10809", "[fd00::5]:7400", "[fd00::5]:10809"),
        ("0.0.0.0:10809", "unix:/run/tierdisk.sock", "127.0.0.1:10809"),
        ("unix:/run/nbd.sock", "origin.example:7400", "unix:/run/nbd.sock"),
    ],
)
def test_reachable_address(bound: str, via: str, reached: str) -> None:
    """Where a client that reaches a server at ``via`` finds its listener bound at ``bound``
    (how a remote layer with ``nbd = "auto"`` turns the origin's NBD address into one)."""
    assert reachable_address(bound, via) == reached


@pytest.mark.parametrize("port", ["\u00b2", "\u0663", "\uff17400"])
def test_a_port_of_other_digits_than_ascii_is_malformed(port: str) -> None:
    """``str.isdigit`` takes ``²`` (which ``int`` then refused with "invalid literal for int()",
    naming no address) and ``٣`` (which ``int`` reads as 3): only 0-9 make a port."""
    with pytest.raises(ValueError) as info:
        split_host_port(f"127.0.0.1:{port}", "--metrics")
    assert str(info.value) == f"--metrics address '127.0.0.1:{port}' is not HOST:PORT or unix:/path"


@pytest.mark.parametrize("below", ["", "deeper/"])
def test_a_unix_socket_under_a_file_names_the_listener_and_the_file(
    tmp_path: Path, below: str
) -> None:
    """A parent of the socket path that is a file: before, a bare ``[Errno 20] Not a
    directory: '…'`` that said neither which listener nor which file."""
    (tmp_path / "afile").write_text("data")
    address = f"unix:{tmp_path / 'afile'}/{below}nbd.sock"
    with pytest.raises(AddressInUse) as info:
        listen_socket(address, "NBD")
    assert (
        str(info.value)
        == f"cannot listen for NBD on {address}: {tmp_path / 'afile'} is not a folder"
    )
    assert (tmp_path / "afile").read_text() == "data"
