"""TLS on a ``remote`` layer's NBD reads (``nbd`` with ``tls = true``): the NBD client
(:class:`tierdisk.service.nbd_client.NbdReader` with an :class:`ssl.SSLContext`) and the
layer's data path (:class:`tierdisk.service.layers.remote_nbd.NbdDataPath`) against real
servers on 127.0.0.1 (in-process, port 0) whose NBD export requires TLS, with certificates
made by the ``openssl`` command.

A tierdisk server's gRPC listener has no TLS, so a whole remote layer with ``tls = true``
cannot attach to one here: the data path is built directly, lent a clear-text gRPC client of
the origin for its questions (``Inspect``), as the layer would lend it its TLS one.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from certs import Certs, make_certs
from servers import ram, running_server, toml_volume
from waiting import eventually

from tierdisk.client import AsyncClient
from tierdisk.service.errors import ConfigError
from tierdisk.service.layers.remote import RemoteLayer
from tierdisk.service.layers.remote_nbd import NbdDataPath, tls_context
from tierdisk.service.nbd_client import (
    NbdError,
    NbdReader,
    NbdTlsRequired,
    NbdTlsUnavailable,
)
from tierdisk.service.server import Server

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
SS = 512
SIZE = 4 * MiB
DATA = random.Random(11).randbytes(SIZE)


# -- certificates -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """:func:`certs.make_certs`, once for the module."""
    return make_certs(tmp_path_factory.mktemp("certs"))


# -- servers and the data path ---------------------------------------------------------------


def origin_config(data_dir: Path, certs: Certs | None, *, client_ca: bool = False) -> str:
    """An origin with its NBD export (port 0), requiring TLS when given ``certs`` (and client
    certificates of their CA with ``client_ca``), and the volume ``vm`` (4 MiB)."""
    lines = [
        "[server]",
        'listen = "127.0.0.1:0"',
        'metrics = ""',
        'nbd = "127.0.0.1:0"',
        f'data_dir = "{data_dir}"',
    ]
    if certs is not None:
        lines += [f'nbd_tls_cert = "{certs.server_cert}"', f'nbd_tls_key = "{certs.server_key}"']
        if client_ca:
            lines.append(f'nbd_tls_ca = "{certs.ca}"')
    return "\n".join(lines) + "\n" + toml_volume("vm", ram(str(SIZE)))


@contextlib.asynccontextmanager
async def origin(
    tmp_path: Path, certs: Certs | None, *, client_ca: bool = False
) -> AsyncIterator[Server]:
    """:func:`origin_config` running in this process, ``vm`` holding :data:`DATA`."""
    async with running_server(
        tmp_path, origin_config(tmp_path / "data", certs, client_ca=client_ca)
    ) as srv:
        assert srv.nbd_tls is (certs is not None)
        async with AsyncClient(srv.grpc_address) as client:
            await client.volume("vm").write(0, DATA)
        yield srv


@contextlib.asynccontextmanager
async def data_path(
    srv: Server, address: str | None = None, **options: Any
) -> AsyncIterator[NbdDataPath]:
    """A started :class:`NbdDataPath` for ``vm`` of ``srv`` (its NBD ``address`` unless
    given), with the layer options ``options`` (``tls``, ``ca_file``, …)."""
    async with AsyncClient(srv.grpc_address) as client:
        path = NbdDataPath(
            address or srv.nbd_address,
            target=srv.grpc_address,
            volume="vm",
            where="test",
            timeout=5.0,
            wait=options.pop("wait", 5.0),
            remote=lambda: client.volume("vm"),
            size=lambda: SIZE,
            observe=lambda rpc, code, seconds: None,
            **options,
        )
        try:
            await path.start()
            yield path
        finally:
            await path.close()


async def read_all(path: NbdDataPath) -> bytes | None:
    """All of ``vm`` over the data path, in one read (pipelined 1 MiB requests); None when
    the path does not serve it."""
    buf = bytearray(SIZE)
    return bytes(buf) if await path.read(memoryview(buf), 0) else None


# -- reads over TLS ---------------------------------------------------------------------------


async def test_reads_over_tls_return_the_exports_bytes(tmp_path: Path, certs: Certs) -> None:
    """With ``tls`` and ``ca_file`` the path does STARTTLS, checks the server's certificate
    for 127.0.0.1 (its IP SAN) and reads the export's bytes over TLS; also a read split into
    pipelined requests, and the NBD client on its own."""
    async with origin(tmp_path, certs) as srv:
        async with data_path(srv, tls=True, ca_file=str(certs.ca)) as path:
            assert path.problem == "", path.problem
            assert path.inspect()["connected"] is True
            assert await read_all(path) == DATA
            buf = bytearray(3 * SS)
            assert await path.read(memoryview(buf), 5 * SS)
            assert bytes(buf) == DATA[5 * SS : 8 * SS]
        reader = await NbdReader.connect(
            srv.nbd_address, "vm", tls=tls_context(str(certs.ca), None, None)
        )
        try:
            buf = bytearray(2 * MiB + SS)
            await reader.read_into(MiB - SS, memoryview(buf))
            assert bytes(buf) == DATA[MiB - SS : 3 * MiB]
        finally:
            await reader.close()


async def test_server_name_replaces_the_address_in_the_certificate_check(
    tmp_path: Path, certs: Certs
) -> None:
    """``server_name`` is the name checked: ``localhost`` (a DNS SAN) passes, a name the
    certificate does not carry is refused and ``problem`` names the mismatch."""
    async with origin(tmp_path, certs) as srv:
        async with data_path(srv, tls=True, ca_file=str(certs.ca), server_name="localhost") as ok:
            assert ok.problem == ""
            assert await read_all(ok) == DATA
        async with data_path(srv, tls=True, ca_file=str(certs.ca), server_name="other.test") as bad:
            assert bad.inspect()["connected"] is False
            assert (
                f"the TLS handshake with the NBD export at {srv.nbd_address} failed" in bad.problem
            )
            assert "other.test" in bad.problem, bad.problem
            assert await read_all(bad) is None  # left to gRPC


async def test_a_server_name_ssl_refuses_leaves_nbd_unused_with_the_reason(
    tmp_path: Path, certs: Certs
) -> None:
    """A ``server_name`` that is no host name ssl takes (an empty label) is a connection that
    failed, named in ``problem``, not an error out of the data path's start or reconnects."""
    async with origin(tmp_path, certs) as srv:
        async with data_path(srv, tls=True, ca_file=str(certs.ca), server_name=".example") as bad:
            assert bad.inspect()["connected"] is False
            assert f"the NBD export at {srv.nbd_address} is not usable" in bad.problem
            assert await read_all(bad) is None  # left to gRPC


async def test_a_server_certificate_of_another_ca_is_refused(tmp_path: Path, certs: Certs) -> None:
    """``ca_file`` replaces the roots: a server whose certificate another CA signed is not
    used, and ``problem`` says the certificate did not verify."""
    async with origin(tmp_path, certs) as srv:
        async with data_path(srv, tls=True, ca_file=str(certs.other_ca)) as path:
            assert path.inspect()["connected"] is False
            assert (
                f"the TLS handshake with the NBD export at {srv.nbd_address} failed" in path.problem
            )
            assert "CERTIFICATE_VERIFY_FAILED" in path.problem, path.problem
            assert await read_all(path) is None
        # without ca_file: the system roots, which did not sign it either
        async with data_path(srv, tls=True) as path:
            assert "CERTIFICATE_VERIFY_FAILED" in path.problem, path.problem


async def test_with_tls_an_export_without_tls_is_not_used(tmp_path: Path, certs: Certs) -> None:
    """``tls = true`` requires TLS of the export too: one that does not do it (it answers
    ``NBD_OPT_STARTTLS`` with an error) is not used, never read in clear text, and
    ``problem`` says so; it is asked again only every minute."""
    async with origin(tmp_path, None) as srv:
        with pytest.raises(NbdTlsUnavailable):
            await NbdReader.connect(
                srv.nbd_address, "vm", tls=tls_context(str(certs.ca), None, None)
            )
        async with data_path(srv, tls=True, ca_file=str(certs.ca)) as path:
            assert path.inspect()["connected"] is False
            assert (
                f"the NBD export at {srv.nbd_address} does not do TLS, which this layer's NBD "
                "reads require (tls = true)"
            ) in path.problem, path.problem
            assert await read_all(path) is None
            assert path._no_export  # the slow retry: the export will not change by itself
        # without tls the same export is read in clear text, as before
        async with data_path(srv) as clear:
            assert clear.problem == ""
            assert await read_all(clear) == DATA


async def test_without_tls_an_export_that_requires_tls_is_not_used(
    tmp_path: Path, certs: Certs
) -> None:
    """The layer without ``tls`` keeps the clear-text client: an export that requires TLS is
    :class:`NbdTlsRequired` and not used, ``problem`` saying what would make it usable."""
    async with origin(tmp_path, certs) as srv:
        with pytest.raises(NbdTlsRequired):
            await NbdReader.connect(srv.nbd_address, "vm")
        async with data_path(srv) as path:
            assert f"the NBD export at {srv.nbd_address} requires TLS" in path.problem
            assert "tls = true" in path.problem, path.problem
            assert await read_all(path) is None


async def test_a_client_certificate_is_presented_when_given(tmp_path: Path, certs: Certs) -> None:
    """Against an export with ``nbd_tls_ca`` (client certificates required), ``cert_file`` +
    ``key_file`` get in; without them the export is not used and ``problem`` says why."""
    async with origin(tmp_path, certs, client_ca=True) as srv:
        async with data_path(
            srv,
            tls=True,
            ca_file=str(certs.ca),
            cert_file=str(certs.client_cert),
            key_file=str(certs.client_key),
        ) as path:
            assert path.problem == "", path.problem
            assert await read_all(path) == DATA
        async with data_path(srv, tls=True, ca_file=str(certs.ca)) as path:
            assert path.inspect()["connected"] is False
            assert f"the NBD export at {srv.nbd_address} is not usable" in path.problem
            assert "client certificate" in path.problem, path.problem
            assert await read_all(path) is None


async def test_a_tls_connection_that_breaks_is_seen_without_a_read(
    tmp_path: Path, certs: Certs
) -> None:
    """The origin goes away while no read is in flight: the break of the TLS connection is
    seen at once (``problem``), as over clear text."""
    async with contextlib.AsyncExitStack() as stack:
        srv = await stack.enter_async_context(origin(tmp_path, certs))
        path = await stack.enter_async_context(data_path(srv, tls=True, ca_file=str(certs.ca)))
        assert path.problem == "" and path.inspect()["connected"] is True
        await srv.stop(grace=1)
        problem = await eventually("the break seen", lambda: path.problem or None, 5)
        # the break, or already the first attempt to connect anew that it started
        assert srv.nbd_address in problem, problem
        assert path.inspect()["connected"] is False


async def test_the_wait_covers_the_tls_handshake(tmp_path: Path, certs: Certs) -> None:
    """A server that acknowledges ``NBD_OPT_STARTTLS`` and then never answers the TLS
    handshake: the attempt ends after ``wait``, as any connection that does not answer."""
    greeting = (0x4E42444D41474943).to_bytes(8, "big") + (0x49484156454F5054).to_bytes(8, "big")
    greeting += (3).to_bytes(2, "big")  # fixed newstyle, no zeroes

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        await reader.readexactly(4 + 16)  # client flags, the STARTTLS option
        ack = (0x3E889045565A9).to_bytes(8, "big") + (5).to_bytes(4, "big")
        writer.write(ack + (1).to_bytes(4, "big") + bytes(4))  # NBD_REP_ACK
        with contextlib.suppress(Exception):
            await reader.read()  # the ClientHello, never answered

    server = await asyncio.start_server(stall, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with origin(tmp_path, certs) as srv:
            started = asyncio.get_running_loop().time()
            async with data_path(
                srv, f"127.0.0.1:{port}", tls=True, ca_file=str(certs.ca), wait=0.5
            ) as path:
                assert asyncio.get_running_loop().time() - started < 5
                assert path.problem == f"the NBD export at 127.0.0.1:{port} did not answer in 0.5 s"
    finally:
        server.close()


async def test_tls_required_after_tls_is_up_is_a_refusal_not_a_hint(
    tmp_path: Path, certs: Certs
) -> None:
    """A server that, with TLS already on, still answers ``NBD_REP_ERR_TLS_REQD``: a refusal
    like any other (the export is not used), and ``problem`` does not tell the operator to
    turn on ``tls = true``, which is on."""
    magic = (0x3E889045565A9).to_bytes(8, "big")
    greeting = (0x4E42444D41474943).to_bytes(8, "big") + (0x49484156454F5054).to_bytes(8, "big")
    greeting += (3).to_bytes(2, "big")  # fixed newstyle, no zeroes
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(certs.server_cert, certs.server_key)

    async def confused(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            writer.write(greeting)
            await reader.readexactly(4 + 16)  # client flags, the STARTTLS option
            writer.write(magic + (5).to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes(4))
            await writer.drain()
            await writer.start_tls(server_tls)
            _, option, length = struct.unpack(">QII", await reader.readexactly(16))
            await reader.readexactly(length)
            text = b"TLS please"
            tls_reqd = (1 << 31) + 5
            writer.write(magic + struct.pack(">III", option, tls_reqd, len(text)) + text)
            await writer.drain()
            await reader.read()

    server = await asyncio.start_server(confused, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    context = tls_context(str(certs.ca), None, None)
    try:
        with pytest.raises(
            NbdError, match=r"asked for TLS with TLS already on \(TLS please\)"
        ) as caught:
            await NbdReader.connect(address, "vm", tls=context)
        assert not isinstance(caught.value, NbdTlsRequired)
        async with origin(tmp_path, certs) as srv:
            async with data_path(srv, address, tls=True, ca_file=str(certs.ca)) as path:
                assert f"the NBD export at {address} is not usable" in path.problem
                assert "asked for TLS with TLS already on (TLS please)" in path.problem, (
                    path.problem
                )
                assert "tls = true" not in path.problem
                assert await read_all(path) is None
    finally:
        server.close()


def test_tls_reads_under_uvloop(tmp_path: Path, certs: Certs) -> None:
    """The same on uvloop (the loop ``tierdisk serve`` runs): STARTTLS on its transports,
    replies received in place through its TLS protocol, and a break seen without a read."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        async with origin(tmp_path, certs) as srv:
            async with data_path(srv, tls=True, ca_file=str(certs.ca)) as path:
                assert path.problem == ""
                assert await read_all(path) == DATA
                await srv.stop(grace=1)
                problem = await eventually("the break seen", lambda: path.problem or None, 5)
                assert srv.nbd_address in problem, problem

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()


# -- options ---------------------------------------------------------------------------------


def test_the_tls_context_refuses_files_that_do_not_load(tmp_path: Path, certs: Certs) -> None:
    """The context's files are checked as gRPC's are (same messages), and a key that is not
    the certificate's or is encrypted is a config error too (never a passphrase prompt)."""
    junk = tmp_path / "junk.pem"
    junk.write_text("not PEM at all\n")
    cases = [
        ((str(junk), None, None), "no PEM certificate"),
        ((str(tmp_path / "missing.pem"), None, None), "missing.pem"),
        ((None, str(certs.client_cert), str(junk)), "no PEM private key"),
        ((None, str(certs.client_cert), str(certs.other_key)), "is not the private key of"),
        ((None, str(certs.client_cert), str(certs.encrypted_client_key)), "encrypted"),
    ]
    for files, problem in cases:
        with pytest.raises(ConfigError) as info:
            tls_context(*files)
        assert problem in str(info.value), (files, str(info.value))
    assert tls_context(str(certs.ca), str(certs.client_cert), str(certs.client_key))


async def test_nbd_goes_with_tls_but_not_with_a_token(tmp_path: Path, certs: Certs) -> None:
    RemoteLayer("127.0.0.1:1", "base", tls=True, ca_file=str(certs.ca), nbd="auto")
    RemoteLayer("127.0.0.1:1", "base", tls=True, nbd="127.0.0.1:10809", server_name="o.test")
    tokens: list[dict[str, Any]] = [{"token": "t"}, {"token_file": "t"}]
    for token in tokens:
        with pytest.raises(ValueError, match="nbd cannot be combined with a token"):
            RemoteLayer("127.0.0.1:1", "base", tls=True, nbd="auto", **token)


@pytest.mark.parametrize("tls", [True, False])
def test_the_layer_hands_its_tls_to_the_nbd_path(certs: Certs, tls: bool) -> None:
    """A layer with ``tls = true`` (and its CA) gives its NBD reads TLS too (``inspect``
    says so), one without does not: the wiring the data-path tests above take as given."""
    options: dict[str, Any] = {"tls": True, "ca_file": str(certs.ca)} if tls else {}
    layer = RemoteLayer("127.0.0.1:1", "base", nbd="127.0.0.1:10809", **options)
    assert layer.inspect()["nbd"]["tls"] is tls
