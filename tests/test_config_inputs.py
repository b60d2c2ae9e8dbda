"""``tierdisk serve`` given config inputs that can never work: each ends the start with one
line naming the key or flag (``config error: …``, exit 2; ``cannot start: …``, exit 1, for a
listener that cannot be bound), never a traceback, a hang, memory read full of ``/dev/zero``,
or a server that starts and then retries for ever. Real child processes, real files, a real
FIFO, real certificates (``openssl``). The rules one by one, in process: test_config.py,
test_checks.py, test_netaddr.py."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
from certs import Certs, make_certs
from servers import write_config

from tierdisk.service.config import load_config
from tierdisk.service.errors import ConfigError
from tierdisk.service.layers.remote import RemoteLayer

RAM = "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\nsize=4096\n"
DEAD = "127.0.0.1:1"  # nothing listens on port 1 here
ADDRESS_SPACE_KIB = 2 << 20
"""The child's address space cap (``ulimit -v``, KiB: 2 GiB): a server that read
``/dev/zero`` whole (as it used to) fails with MemoryError instead of taking the machine's
memory. Set by ``sh`` before the exec, not by a ``preexec_fn``: Python code between fork and
exec in a process with gRPC's threads (the test process) can abort the child."""


def serve(
    cwd: Path,
    *args: str | bytes,
    env: Mapping[str, str | bytes] | None = None,
    metrics_off: bool = True,
) -> subprocess.CompletedProcess[str]:
    """``tierdisk serve ARGS`` (with ``--metrics ''`` first unless not ``metrics_off``) in
    ``cwd`` with ``env`` added to the environment (bytes for what is not UTF-8), its memory
    capped; killed after 30 s (a start that waits for a FIFO, or a server that started and
    retries, fails the test by that)."""
    environ: dict[str | bytes, str | bytes] = {
        k: v for k, v in os.environ.items() if not k.startswith("TIERDISK_SERVER")
    }
    environ.update(env or {})
    return subprocess.run(
        [
            *("sh", "-c", f'ulimit -v {ADDRESS_SPACE_KIB} && exec "$0" "$@"'),
            *(sys.executable, "-m", "tierdisk.service"),
            *(["--metrics", ""] if metrics_off else []),
            *args,
        ],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=30,
        cwd=cwd,
        env=environ,  # type: ignore[arg-type]  # subprocess takes bytes keys and values too
    )


def one_line(result: subprocess.CompletedProcess[str], status: int = 2) -> str:
    """The one line a start that failed printed (after ``tierdisk serve: ``), checking the exit
    status, that there is one line and no traceback."""
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tierdisk serve: "), lines[0]
    return lines[0][len("tierdisk serve: ") :]


def config_error(result: subprocess.CompletedProcess[str]) -> str:
    """The text of the ``config error: …`` line of ``result`` (exit 2)."""
    line = one_line(result, 2)
    assert line.startswith("config error: "), line
    return line[len("config error: ") :]


def _remote(target: str, extra: str = "") -> str:
    return (
        f'[[volumes]]\nname="v"\n[[volumes.layers]]\nkind="remote"\ntarget="{target}"\n'
        f'volume="x"\n{extra}'
    )


# -- finding 4: remote targets that can never work ---------------------------------------


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (
            "http://127.0.0.1:7401",
            "volume 'v', layer 0: target 'http://127.0.0.1:7401': scheme http: is not taken: "
            "gRPC takes no URL: HOST:PORT",
        ),
        ("unix:", "volume 'v', layer 0: target 'unix:': names no socket path (unix:PATH)"),
        (
            "127.0.0.1 :7401",
            "volume 'v', layer 0: target '127.0.0.1 :7401': contains white space: ' ' (U+0020) "
            "at position 9",
        ),
        ("xyz:///foo", "volume 'v', layer 0: target 'xyz:///foo': unknown scheme xyz: "),
        (
            "127.0.0.1\\u0000:7401",
            "volume 'v', layer 0: target '127.0.0.1\\x00:7401': contains a control character: "
            "'\\x00' (U+0000) at position 9",
        ),
    ],
)
def test_a_target_that_can_never_work_stops_the_start(
    tmp_path: Path, target: str, message: str
) -> None:
    """Each started a server whose volume retried "a remote tier is not reachable" for ever
    (the NUL one connected to port 443)."""
    config = write_config(tmp_path, _remote(target))
    result = serve(tmp_path, "--config", str(config), "--listen", "127.0.0.1:0")
    assert config_error(result).startswith(message)


# -- finding 6: a NUL (or white space) in a listen address ---------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("listen", "127.0.0.1\\u0000:0"),  # bound 127.0.0.1:443 (gRPC's string ends at the NUL)
        ("metrics", "127.0.0.1\\u0000:0"),  # Python's "embedded null byte", a traceback
        ("nbd", "127.0.0.1\\u0000:0"),
        ("listen", "127.0.0.1: 0"),
    ],
)
def test_a_listen_address_with_a_control_character_stops_the_start(
    tmp_path: Path, key: str, value: str
) -> None:
    server = '[server]\nlisten = "127.0.0.1:0"\n' if key != "listen" else "[server]\n"
    config = write_config(tmp_path, f'{server}{key} = "{value}"\n{RAM}')
    result = serve(tmp_path, "--config", str(config), metrics_off=key != "metrics")
    message = config_error(result)
    assert message.startswith(f"[server] {key} address '127.0.0.1"), message
    assert "contains a control character" in message or "contains white space" in message


# -- finding 5: what ended in a traceback --------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind=['ram']\n",
            "volume 'v', layer 0: unknown layer kind ['ram'] (known kinds: ",
        ),
        (
            "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind={a=1}\n",
            "volume 'v', layer 0: unknown layer kind {'a': 1} (known kinds: ",
        ),
        (
            '[[volumes]]\nname="v"\n[[volumes.layers]]\nkind="sparse"\npath="a\\u0000b"\n'
            "size=4096\n",
            "volume 'v', layer 0: path 'a\\x00b' contains a NUL character (U+0000) at position 1",
        ),
        (
            '[server]\nlisten="127.0.0.1:0"\ndata_dir="a\\u0000b"\n' + RAM,
            "[server] data_dir 'a\\x00b' contains a NUL character (U+0000) at position 1",
        ),
        (
            '[server]\nlisten="127.0.0.1:0"\nnbd="127.0.0.1:0"\nnbd_tls_cert="a\\u0000b"\n'
            'nbd_tls_key="k"\n' + RAM,
            "[server] nbd_tls_cert 'a\\x00b' contains a NUL character (U+0000) at position 1",
        ),
        (
            "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind=" + "[" * 2000 + "]" * 2000 + "\n",
            "nests arrays or tables too deeply to be read (a few hundred levels at most)",
        ),
    ],
)
def test_values_that_were_tracebacks_stop_the_start_in_one_line(
    tmp_path: Path, body: str, message: str
) -> None:
    config = write_config(tmp_path, body)
    result = serve(tmp_path, "--config", str(config), "--listen", "127.0.0.1:0")
    assert message in config_error(result)


@pytest.mark.parametrize("source", ["--listen", "TIERDISK_SERVER_LISTEN"])
@pytest.mark.parametrize("address", [b"unix:SOCKDIR/s\xff.sock", b"h\xff:0"])
def test_a_listen_address_that_is_not_utf8_stops_the_start(
    tmp_path: Path, source: str, address: bytes
) -> None:
    """A UnicodeEncodeError inside gRPC, a traceback: refused with the config, naming where it
    came from."""
    address = address.replace(b"SOCKDIR", os.fsencode(tmp_path))
    config = write_config(tmp_path, RAM)
    if source == "--listen":
        result = serve(tmp_path, "--config", str(config), b"--listen", address)
    else:
        env: dict[str, str | bytes] = {"TIERDISK_SERVER_LISTEN": address}
        result = serve(tmp_path, "--config", str(config), env=env)
    message = config_error(result)
    position = os.fsdecode(address).index("\udcff")
    assert message.startswith(f"{source} address "), message
    assert message.endswith(f" is not UTF-8 (byte 0xff at position {position})"), message


def test_a_config_that_never_ends_stops_the_start_at_once(tmp_path: Path) -> None:
    """``--config /dev/zero`` was read until memory ran out (SIGTERM ignored meanwhile)."""
    result = serve(tmp_path, "--config", "/dev/zero", "--listen", "127.0.0.1:0")
    assert config_error(result) == (
        "config /dev/zero holds more than 4 MiB (4194304 bytes), the most read from such a file"
    )


def test_a_config_larger_than_the_limit_stops_the_start(tmp_path: Path) -> None:
    config = tmp_path / "big.toml"
    config.write_bytes(RAM.encode() + b"# padding\n" * (500 << 10))
    result = serve(tmp_path, "--config", str(config), "--listen", "127.0.0.1:0")
    assert config_error(result) == (
        f"config {config} holds more than 4 MiB (4194304 bytes), the most read from such a file"
    )


def test_nbd_tls_files_that_are_no_regular_files_stop_the_start(tmp_path: Path) -> None:
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo)
    config = write_config(tmp_path, RAM)
    for path, kind in (("/dev/zero", "a character device"), (str(fifo), "a pipe (FIFO)")):
        result = serve(
            tmp_path, "--config", str(config), "--listen", "127.0.0.1:0", "--nbd", "127.0.0.1:0",
            "--nbd-tls-cert", path, "--nbd-tls-key", path,
        )  # fmt: skip
        assert config_error(result) == f"--nbd-tls-cert {path} is {kind}, not a regular file"


@pytest.mark.parametrize("option", ["ca_file", "token_file"])
def test_a_remote_layers_file_that_is_no_regular_file_stops_the_start(
    tmp_path: Path, option: str
) -> None:
    """Read when the layer attaches (at start): ``/dev/zero`` was read until memory ran out,
    a FIFO waited for a writer."""
    fifo = tmp_path / "f.fifo"
    os.mkfifo(fifo)
    tls = "tls = true\n" if option == "ca_file" else ""
    for path, kind in (("/dev/zero", "a character device"), (str(fifo), "a pipe (FIFO)")):
        config = write_config(tmp_path, _remote(DEAD, f"{tls}{option} = '{path}'\n"))
        result = serve(tmp_path, "--config", str(config), "--listen", "127.0.0.1:0")
        assert config_error(result) == (
            f"volume 'v', layer 0: {option} {path}: is {kind}, not a regular file"
        )


# -- finding 8: a sector larger than max_io ------------------------------------------------


def test_a_sector_larger_than_max_io_stops_the_start(tmp_path: Path) -> None:
    """It started, and refused every read and write (even of one sector)."""
    body = "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\nsize='64MiB'\n"
    config = write_config(tmp_path, body + "sector_size=33554432\n")
    result = serve(tmp_path, "--config", str(config), "--listen", "127.0.0.1:0")
    assert config_error(result).startswith(
        "volume 'v', layer 0: sector_size 33554432 is larger than max_io 16777216"
    )


# -- finding 10: messages that named neither the listener nor the key ----------------------


@pytest.mark.parametrize(("flag", "what"), [("--listen", "gRPC"), ("--metrics", "metrics")])
def test_a_unix_socket_under_a_file_names_the_listener(
    tmp_path: Path, flag: str, what: str
) -> None:
    """It was ``cannot start: [Errno 20] Not a directory: '…'``."""
    (tmp_path / "afile").write_text("keep me")
    address = f"unix:{tmp_path / 'afile'}/s.sock"
    config = write_config(tmp_path, RAM)
    args = {"--listen": "127.0.0.1:0", "--metrics": "127.0.0.1:0", flag: address}
    result = serve(tmp_path, "--config", str(config), *(x for kv in args.items() for x in kv))
    assert one_line(result, 1) == (
        f"cannot start: cannot listen for {what} on {address}: {tmp_path / 'afile'} is not a folder"
    )
    assert (tmp_path / "afile").read_text() == "keep me"


def test_a_port_of_other_digits_names_the_flag(tmp_path: Path) -> None:
    """It was ``config error: invalid literal for int() with base 10: '²'``."""
    config = write_config(tmp_path, RAM)
    result = serve(tmp_path, "--config", str(config), "--metrics", "127.0.0.1:\u00b2")
    assert (
        config_error(result)
        == "--metrics address '127.0.0.1:\u00b2' is not HOST:PORT or unix:/path"
    )


# -- finding 3: a remote layer's client key that is not its certificate's -------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _tls_remote(certs: Certs, key: Path) -> str:
    return _remote(
        DEAD,
        f"tls = true\nca_file = '{certs.ca}'\nserver_name = 'localhost'\n"
        f"cert_file = '{certs.client_cert}'\nkey_file = '{key}'\n",
    )


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("server_key", "is not the private key of the certificate in cert_file CERT"),
        (
            "encrypted_client_key",
            "is encrypted (it asks for a passphrase): give the key unencrypted",
        ),
    ],
)
def test_a_client_key_that_does_not_fit_stops_the_start(
    tmp_path: Path, certs: Certs, key: str, problem: str
) -> None:
    """The server started and retried for ever "a remote tier is not reachable (… Failed to
    create security handshaker.)"; the tier being down or up made no difference."""
    key_path: Path = getattr(certs, key)
    config = write_config(tmp_path, _tls_remote(certs, key_path))
    result = serve(tmp_path, "--config", str(config), "--listen", "127.0.0.1:0")
    expected = f"volume 'v', layer 0: key_file {key_path} " + problem.replace(
        "CERT", str(certs.client_cert)
    )
    assert config_error(result) == expected
    with pytest.raises(ConfigError) as info:  # found when the config is read
        load_config(str(config), environ={})
    assert str(info.value) == expected


async def test_a_remote_layer_made_directly_checks_its_key_pair(certs: Certs) -> None:
    """Without the config (the library's own use): the layer's attach refuses the pair before
    it connects, a ConfigError, not an Unavailable to retry."""
    layer = RemoteLayer(
        DEAD, "x", tls=True, cert_file=str(certs.client_cert), key_file=str(certs.other_key)
    )
    try:
        with pytest.raises(ConfigError, match="is not the private key of the certificate"):
            await layer.attach(None)
    finally:
        await layer.close()


def test_a_client_key_that_fits_passes(tmp_path: Path, certs: Certs) -> None:
    config = write_config(tmp_path, _tls_remote(certs, certs.client_key))
    layer = load_config(str(config), environ={}).volumes[0].layers[0]
    assert layer.options["key_file"] == str(certs.client_key)
