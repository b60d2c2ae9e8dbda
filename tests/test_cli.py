"""The ``tierdisk`` command as a whole (client/cli.py), against a real server (a ``tierdisk
serve`` child process): a stop signal that comes once the verb has ended (an export that
replaced IMAGE) changing nothing, two quick Ctrl-Cs ending a verb without a traceback, numbers
no volume can have as usage errors (exit 2) and those past this volume's end the server's
(exit 1), a closed stdin or stdout, one-line errors (the volume named once, or the file), a
gRPC server that is not tierdisk named as the server, gRPC's own log lines kept off stderr
unless the user asks for them, and TLS files that hold no PEM, or a key that is not the
certificate's, refused before any connection.

The verbs are tested in the test file of their module (test_volume_verbs.py,
test_transfer.py, test_import_verbs.py, test_export_verb.py), local files and streams in
test_localfile.py, the progress bar and the line a failed copy ends with in
test_copy_report.py; the command without a server in test_cli_unit.py. Their helpers are in
cli_runs.py, the ``server`` and ``exp_data`` fixtures in conftest.py."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from certs import Certs, make_certs
from cli_runs import SIGNALS_AS_THEY_COME, TIERDISK, MiB, one_line_error, tierdisk, watching
from grpc_health.v1 import health, health_pb2_grpc
from servers import ServerProcess

# -- stop signals ----------------------------------------------------------------------


def test_a_ctrl_c_that_comes_after_the_export_replaced_the_image_changes_nothing(
    server: ServerProcess, exp_data: bytes, tmp_path: Path
) -> None:
    """Ctrl-C once the export has replaced IMAGE, as the client closes: the export is done,
    so the command says nothing and exits 0, not "interrupted" with IMAGE replaced behind
    a script's back (it took exit 130 for "the old IMAGE stands"). The command sends the
    signal to itself right after the export verb returned. (SIGTERM and SIGHUP take the
    same branch, but their handler runs in a later turn of the event loop: sent so, it
    finds the command ended, so they cannot show it here.)"""
    out = tmp_path / "out.img"
    out.write_bytes(os.urandom(MiB))
    after_export = SIGNALS_AS_THEY_COME + (
        "import os; from tierdisk.client import cli; verbs = cli._verbs\n"
        "async def export_then_stop(client, args):\n"
        "    rc = await verbs()['export'](client, args)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    return rc\n"
        "cli._verbs = lambda: {**verbs(), 'export': export_then_stop}\n"
        "sys.exit(cli.main())"
    )
    argv = [sys.executable, "-c", after_export, "--server", server.grpc, "export", "exp", str(out)]
    result = subprocess.run(argv, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr.decode() == ""
    assert out.read_bytes() == exp_data
    assert os.listdir(tmp_path) == ["out.img"]


@pytest.mark.parametrize("gap", [0.0, 0.002, 0.01])
def test_two_quick_ctrl_cs_end_watch_without_a_traceback(server: ServerProcess, gap: float) -> None:
    """A second Ctrl-C while the first one's clean-up runs (two presses, or ``timeout -s
    INT``, which signals the process and its group) ends the process as the shell's default
    would: no ``KeyboardInterrupt`` raised in the middle of the clean-up (a traceback, or
    "internal error: RuntimeError: Cannot close a running event loop"), nothing on stderr."""
    with watching(server) as (proc, _, first):
        assert "sector_count=" in first
        proc.send_signal(signal.SIGINT)
        time.sleep(gap)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        # 0: the first ended it before the second came; -SIGINT: the second ended it
        assert proc.returncode in (0, -signal.SIGINT), (proc.returncode, err.decode())
        assert err == b""


# -- numbers ---------------------------------------------------------------------------


HUGE = "99999999999999999999999"  # more than a uint64 field can carry


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("resize", "grow", HUGE), HUGE),
        (("resize", "grow", "--shrink", HUGE), HUGE),
        (("resize", "grow", HUGE + "PiB"), HUGE),
        (("resize", "grow", "9" * 400 + ".5PiB"), "over the size limit of any volume"),
        (("read", "rw", HUGE, "1"), f"SECTOR {HUGE}"),
        (("read", "rw", "0", HUGE), f"COUNT {HUGE}"),
        (("read", "rw", str(1 << 64), "0"), f"SECTOR {1 << 64}"),
        (("write", "rw", HUGE), f"SECTOR {HUGE}"),
        # a request carries them, but no volume has so many sectors
        (("read", "rw", str((1 << 64) - 1), "1"), f"SECTOR {(1 << 64) - 1} is too large"),
        (("read", "rw", "0", str(1 << 53)), f"COUNT {1 << 53} is too large"),
        (("write", "rw", str(1 << 53)), f"SECTOR {1 << 53} is too large"),
    ],
)
def test_numbers_past_every_volume_are_usage_errors(
    server: ServerProcess, args: tuple[str, ...], needle: str
) -> None:
    line = one_line_error(tierdisk(server, *args, check=False), needle, returncode=2)
    assert "internal error" not in line


def test_numbers_that_fit_a_volume_but_not_this_one_are_out_of_range(
    server: ServerProcess,
) -> None:
    """Up to the most sectors a volume can have (``2**53 - 1``), the server decides: exit 1."""
    largest = str((1 << 53) - 1)
    for args in (("read", "rw", largest, "1"), ("read", "rw", "1", largest)):
        one_line_error(tierdisk(server, *args, check=False), "volume 'rw'", "out of range")


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("unbuffered", ["1", ""], ids=["unbuffered", "buffered"])
@pytest.mark.parametrize(
    ("args", "closed", "error"),
    [
        (["volumes"], ">&-", "tierdisk: stdout: Bad file descriptor"),
        (["read", "disk", "0", "1"], ">&-", "tierdisk: stdout: Bad file descriptor"),
        (["write", "rw", "0"], "<&-", "tierdisk: stdin: Bad file descriptor"),
        (["volumes"], "<&-", None),
    ],
)
def test_closed_stdin_or_stdout_is_a_one_line_error(
    server: ServerProcess, args: list[str], closed: str, error: str | None, unbuffered: str
) -> None:
    """A verb run with stdin or stdout closed (``>&-``) fails as on any unusable file: one
    line, exit 1, not an abort in libuv (exit 134), nor an "Exception ignored" as Python
    flushes stdout at exit; a verb that does not use the closed one works."""
    env = {**os.environ, "TIERDISK_SERVER": server.grpc, "PYTHONUNBUFFERED": unbuffered}
    result = subprocess.run(
        ["sh", "-c", f'exec "$0" "$@" {closed}', *TIERDISK, *args],
        capture_output=True,
        timeout=120,
        env=env,
    )
    if error is None:
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout.startswith(b"disk\t") and result.stderr == b""
    else:
        assert one_line_error(result).startswith(error)


def test_errors_are_one_line_naming_the_volume_or_file(
    server: ServerProcess, tmp_path: Path
) -> None:
    one_line_error(tierdisk(server, "info", "x", check=False), "volume 'x'", "not found")
    one_line_error(
        tierdisk(server, "write", "ro", "0", stdin=bytes(512), check=False),
        "volume 'ro'",
        "read-only",
    )
    one_line_error(tierdisk(server, "read", "ro", "2047", "2", check=False), "volume 'ro'")
    one_line_error(tierdisk(server, "map", "nope", check=False), "volume 'nope'")
    missing = tmp_path / "missing.img"
    one_line_error(tierdisk(server, "import", "rw", str(missing), check=False), f"file '{missing}'")
    unwritable = tmp_path / "no-such-dir" / "out.img"
    one_line_error(
        tierdisk(server, "export", "rw", str(unwritable), check=False), f"file '{unwritable}'"
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("write", "ro", "0"), "tierdisk: volume 'ro': read-only: cannot write"),
        (("info", "nope"), "tierdisk: volume 'nope': not found: "),
        (("read", "ro", "2047", "2"), "tierdisk: volume 'ro': out of range: "),
    ],
)
def test_errors_name_the_volume_once_and_keep_the_kind(
    server: ServerProcess, args: tuple[str, ...], expected: str
) -> None:
    """The server's message often starts with `volume 'x'` already: not said twice."""
    line = one_line_error(tierdisk(server, *args, stdin=bytes(512), check=False))
    assert line.startswith(expected), line
    volume = args[1]
    assert line.count(f"volume {volume!r}") == 1, line


async def test_a_grpc_server_that_is_not_tierdisk_is_named_not_the_volume() -> None:
    """Another gRPC service on the address (here: health only) answers UNIMPLEMENTED: the
    one-line error blames the server, not the volume the verb names."""
    other = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), other)
    address = f"127.0.0.1:{other.add_insecure_port('127.0.0.1:0')}"
    await other.start()
    try:
        for args, method in (
            (("volumes",), "ListVolumes"),
            (("export", "x", os.devnull), "GetVolume"),
            (("map", "x"), "GetVolume"),
        ):
            result = await asyncio.to_thread(
                subprocess.run,
                [*TIERDISK, "--server", address, *args],
                capture_output=True,
                timeout=60,
            )
            line = one_line_error(result)
            assert line == (
                f"tierdisk: server {address}: does not serve tierdisk.v1.BlockDevice, or is too "
                f"old for {method} (UNIMPLEMENTED: Method not found!)"
            )
    finally:
        await other.stop(0)


# -- gRPC's own logs -------------------------------------------------------------------


GRPC_LOG_ENV = ("GRPC_VERBOSITY", "GRPC_TRACE")


C_CORE_LOG_LINE = re.compile(r"^[DIWEF]\d{4} ")
"""How a line logged by gRPC's C core starts: ``E1126 00:45:32.716209 …``."""


def tls_failure(
    server: ServerProcess, tmp_path: Path, how: str, **env: str
) -> subprocess.CompletedProcess[bytes]:
    """``tierdisk volumes`` whose TLS cannot work against the plaintext ``server``: gRPC's
    C core logs why on stderr (at INFO for ``--tls``, ERROR for roots without a
    certificate), unless told not to. ``env``: GRPC_* variables as the user set them."""
    tls = ["--tls"]
    if how == "ca-without-a-certificate":
        ca = tmp_path / "ca.pem"  # PEM-shaped, so the CLI's own check passes it to gRPC
        ca.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        tls = ["--tls-ca", str(ca)]
    environ = {k: v for k, v in os.environ.items() if k not in ("TIERDISK_SERVER", *GRPC_LOG_ENV)}
    environ.update(env)
    return subprocess.run(
        [*TIERDISK, "--server", server.grpc, "--retries", "0", "--timeout", "10", *tls, "volumes"],
        capture_output=True,
        timeout=60,
        env=environ,
    )


@pytest.mark.parametrize("how", ["tls-against-plaintext", "ca-without-a-certificate"])
def test_grpc_core_logs_stay_off_stderr(server: ServerProcess, tmp_path: Path, how: str) -> None:
    """A failed handshake or roots that do not load make gRPC's C core log lines like
    ``E… ssl_transport_security.cc:…] Handshake failed``: the CLI turns its logging off
    (``GRPC_VERBOSITY=NONE``; ``ERROR`` would still show those), so stderr is our one line."""
    one_line_error(tls_failure(server, tmp_path, how), f"server {server.grpc}", "unavailable")


@pytest.mark.parametrize("env", [{"GRPC_VERBOSITY": "ERROR"}, {"GRPC_TRACE": "api"}])
def test_grpc_core_logs_show_when_the_user_asks(
    server: ServerProcess, tmp_path: Path, env: dict[str, str]
) -> None:
    """GRPC_VERBOSITY (or GRPC_TRACE) set by the user is theirs: gRPC logs as they asked,
    around our one line."""
    result = tls_failure(server, tmp_path, "ca-without-a-certificate", **env)
    assert result.returncode == 1
    lines = result.stderr.decode().splitlines()
    assert any(C_CORE_LOG_LINE.match(line) for line in lines), lines
    ours = [line for line in lines if line.startswith("tierdisk: ")]
    assert len(ours) == 1 and ours[0].startswith(f"tierdisk: server {server.grpc}: unavailable")


# -- TLS files -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "what"),
    [("--tls-ca", "certificate"), ("--tls-cert", "certificate"), ("--tls-key", "private key")],
)
def test_tls_files_without_pem_are_usage_errors(
    server: ServerProcess, tmp_path: Path, option: str, what: str
) -> None:
    """A file with no PEM block of the right kind is named before any connection (gRPC
    would only say "Failed to create security handshaker")."""
    junk = tmp_path / "junk.pem"
    junk.write_text("not PEM at all\n")
    options = [option, str(junk)]
    if option != "--tls-ca":  # a client certificate and its key go together
        pair = {"--tls-cert": "--tls-key", "--tls-key": "--tls-cert"}[option]
        good = tmp_path / "good.pem"
        good.write_text(
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
        )
        options += [pair, str(good)]
    result = tierdisk(server, "--retries", "0", "--tls", *options, "volumes", check=False)
    line = one_line_error(result, option, str(junk), f"no PEM {what}", returncode=2)
    assert server.grpc not in line


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ("other_key", "is not the private key of the certificate in --tls-cert {cert}"),
        ("encrypted_client_key", "is encrypted (it asks for a passphrase)"),
    ],
    ids=["another-key", "encrypted"],
)
def test_a_tls_key_that_does_not_go_with_the_certificate_is_a_usage_error(
    server: ServerProcess, certs: Certs, key: str, words: str
) -> None:
    """A key that is not the certificate's, or an encrypted one, is named before any
    connection (gRPC would only fail every connection: "server unavailable" after the
    retries). The certificate's own key passes: the connection is tried."""
    cert, bad = certs.client_cert, getattr(certs, key)
    tls = ["--retries", "0", "--tls-ca", str(certs.ca), "--tls-cert", str(cert)]
    result = tierdisk(server, *tls, "--tls-key", str(bad), "volumes", check=False)
    line = one_line_error(result, f"--tls-key {bad} {words.format(cert=cert)}", returncode=2)
    assert server.grpc not in line
    result = tierdisk(server, *tls, "--tls-key", str(certs.client_key), "volumes", check=False)
    # a plaintext server: said so, not only in BoringSSL's words
    one_line_error(result, f"server {server.grpc}", "unavailable", "leave out --tls?")
