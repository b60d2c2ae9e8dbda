"""Config loading: the TOML of DESIGN.md §4, precedence, and errors that name the problem."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import pytest

from tierdisk.client import cli_args
from tierdisk.service.config import DEFAULT_SIZE, ServerConfig, load_config
from tierdisk.service.config_values import parse_size
from tierdisk.service.credentials import token_from_file
from tierdisk.service.errors import ConfigError


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return str(path)


GOOD = """
[server]
listen = "127.0.0.1:7411"
max_io = "8MiB"
data_dir = "DATA"

[[volumes]]
name = "vm1"

  [[volumes.layers]]
  kind = "ram"

  [[volumes.layers]]
  kind = "sparse"
  path = "cache/vm1"
  read_cache = true

  [[volumes.layers]]
  kind = "remote"
  target = "origin.example:7400"
  volume = "base-image"
  timeout = 2.5
"""


def test_full_example_parses(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, GOOD.replace("DATA", str(tmp_path / "d"))), environ={})
    assert config.server.listen == "127.0.0.1:7411"
    assert config.server.max_io == 8 << 20
    assert config.server.metrics == ServerConfig().metrics
    (volume,) = config.volumes
    assert [layer.kind for layer in volume.layers] == ["ram", "sparse", "remote"]
    assert volume.layers[1].read_cache and not volume.layers[1].write_through
    assert volume.layers[1].options["path"] == str(tmp_path / "d" / "cache" / "vm1")
    assert volume.layers[2].options == {
        "target": "origin.example:7400",
        "volume": "base-image",
        "timeout": 2.5,
    }


def test_no_config_serves_default_volume(tmp_path: Path) -> None:
    config = load_config(None, flags={"data_dir": str(tmp_path)}, environ={})
    (volume,) = config.volumes
    assert volume.name == "default"
    (layer,) = volume.layers
    assert layer.kind == "sparse"
    assert layer.options["size"] == DEFAULT_SIZE
    assert layer.options["path"].startswith(str(tmp_path))


def test_precedence_flag_env_file_default(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD)
    env = {"TIERDISK_SERVER_LISTEN": "127.0.0.1:1", "TIERDISK_SERVER_METRICS": ""}
    config = load_config(path, environ=env)
    assert config.server.listen == "127.0.0.1:1"  # env beats the file
    assert config.server.metrics == ""  # env can turn metrics off
    config = load_config(path, flags={"listen": "127.0.0.1:2"}, environ=env)
    assert config.server.listen == "127.0.0.1:2"  # the flag beats env
    config = load_config(path, environ={"TIERDISK_SERVER": "x:1"})  # not config
    assert config.server.listen == "127.0.0.1:7411"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (4096, 4096),
        ("4096", 4096),
        ("64MiB", 64 << 20),
        ("1GiB", 1 << 30),
        ("2 kb", 2000),
        ("1.5KiB", 1536),
        ("64M", 64 << 20),  # binary, as on the command line (tierdisk resize VOL 64M)
        ("64m", 64 << 20),
        ("1MB", 10**6),
    ],
)
def test_sizes(value: object, expected: int) -> None:
    assert parse_size(value) == expected
    if isinstance(value, str) and not value.isdigit():
        assert cli_args.size_argument(value) == (expected, True)  # one reading everywhere


@pytest.mark.parametrize("value", ["lots", "12XB", -1, True, 1.5, "1.3B"])
def test_bad_sizes(value: object) -> None:
    with pytest.raises(ConfigError):
        parse_size(value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[server]\nlisten = "x:1"\nbogus = 1\n', "unknown key 'bogus'"),
        (
            "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='floppy'\n",
            "volume 'v', layer 0: unknown layer kind 'floppy'",
        ),
        (
            "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\ncolour='red'\n",
            "volume 'v', layer 0: unknown key 'colour'",
        ),
        (
            "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\n[[volumes.layers]]\nkind='raw'\n",
            "volume 'v', layer 1: a raw layer needs 'path'",
        ),
        (
            "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\nsize='huge'\n",
            "volume 'v', layer 0: size 'huge' is not a size",
        ),
        (
            "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\nsector_size=1000\n",
            "not a power of two",
        ),
        (
            "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='remote'\ntarget='a:1'\nvolume='b'\n"
            "mode='cache'\n",
            "mode must be",
        ),
        ("[[volumes]]\nname='v'\n", "volume 'v': a volume needs at least one"),
        (
            "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\n"
            "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\n",
            "two volumes have this name",
        ),
        ("[[volumes]]\nname='v'\nsize=3\n[[volumes.layers]]\nkind='ram'\n", "unknown key 'size'"),
        ("volumes = 3\n", "volumes must be [[volumes]] tables, not 3"),  # not "defines none"
        ("[server\n", "not valid TOML"),
        ('[server]\nlisten = "::1:7400"\n', "an IPv6 address goes in brackets"),
        ('[server]\nlisten = ":7400"\n', "missing host"),
        ('[server]\nnbd = "::1:10809"\n', "an IPv6 address goes in brackets"),
        (
            "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='remote'\ntarget='a:99999'\n"
            "volume='b'\n",
            "volume 'v', layer 0: target 'a:99999': port 99999 is out of range",
        ),
        (
            "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='remote'\ntarget='a'\nvolume='b'\n",
            "volume 'v', layer 0: target 'a': missing port",
        ),
        (
            "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='remote'\ntarget='a:1'\n"
            "volume='b'\ntoken=\"x\\ty\"\n",
            "volume 'v', layer 0: token contains a character not allowed in a gRPC header: "
            "'\\t' (U+0009) at position 1",
        ),
        ("[other]\n", "unknown top-level key 'other'"),
    ],
)
def test_errors_name_the_problem(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), environ={})
    assert fragment in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(str(tmp_path / "absent.toml"), environ={})


def test_bad_env_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="TIERDISK_SERVER_MAX_IO"):
        load_config(_write(tmp_path, GOOD), environ={"TIERDISK_SERVER_MAX_IO": "lots"})


def test_unknown_env_override_is_named_in_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A misspelt override is not silently ignored, but it does not stop the server either:
    other software sets such names too (Kubernetes service links: TIERDISK_SERVER_PORT)."""
    environ = {
        "TIERDISK_SERVER_LISTN": "127.0.0.1:1",
        "TIERDISK_SERVER_PORT": "tcp://10.0.0.7:7400",
        "TIERDISK_SERVER": "127.0.0.1:1",  # the CLI's server address: not config, no warning
        "TIERDISK_REQUIRE_TOOLS": "1",
    }
    with caplog.at_level(logging.WARNING, logger="tierdisk.service.config"):
        config = load_config(_write(tmp_path, GOOD), environ=environ)
    assert config.server.max_io == 8 << 20
    warned = sorted(r.getMessage().split(":")[0] for r in caplog.records)
    assert warned == [
        "ignoring environment variable TIERDISK_SERVER_LISTN",
        "ignoring environment variable TIERDISK_SERVER_PORT",
    ]


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("LISTEN", "nowhere", "TIERDISK_SERVER_LISTEN address 'nowhere' is not HOST:PORT"),
        ("METRICS", "127.0.0.1:65536", "port 65536 is out of range"),
        ("NBD", "unix:", "names no socket path"),
        # gRPC would listen on /tmp/pA.sock, past the check for a listener at /tmp/p%41.sock
        ("LISTEN", "unix:/tmp/p%41.sock", "a '%' in a unix socket path is not supported"),
        ("MAX_IO", "512KiB", "TIERDISK_SERVER_MAX_IO 524288 is out of range"),
        ("NBD_MAX_CONNECTIONS", "0", "must be a whole number >= 1, not 0"),
        ("NBD_MAX_CONNECTIONS", "many", "must be a whole number >= 1, not 'many'"),
    ],
)
def test_bad_server_values_from_the_environment(
    tmp_path: Path, key: str, value: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, GOOD), environ={f"TIERDISK_SERVER_{key}": value})
    assert fragment in str(info.value)


@pytest.mark.parametrize("value", ["0", "-3", "2.5", "true", '"8 x"'])
def test_nbd_max_connections_in_the_file_is_a_whole_number_from_1(
    tmp_path: Path, value: str
) -> None:
    text = GOOD.replace("[server]\n", f"[server]\nnbd_max_connections = {value}\n", 1)
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), environ={})
    assert "[server] nbd_max_connections must be a whole number >= 1" in str(info.value)


def test_nbd_max_connections_defaults_to_64_and_takes_the_flag_first(tmp_path: Path) -> None:
    text = GOOD.replace("[server]\n", "[server]\nnbd_max_connections = 8\n", 1)
    assert load_config(_write(tmp_path, GOOD), environ={}).server.nbd_max_connections == 64
    assert load_config(_write(tmp_path, text), environ={}).server.nbd_max_connections == 8
    environ = {"TIERDISK_SERVER_NBD_MAX_CONNECTIONS": "16"}
    assert load_config(_write(tmp_path, text), environ=environ).server.nbd_max_connections == 16
    flags = {"nbd_max_connections": "2"}
    config = load_config(_write(tmp_path, text), environ=environ, flags=flags)
    assert config.server.nbd_max_connections == 2


def test_grpc_poller_batch_is_off_unless_set_and_takes_true_or_false(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, GOOD), environ={}).server.grpc_poller_batch is False
    text = GOOD.replace("[server]\n", "[server]\ngrpc_poller_batch = true\n", 1)
    assert load_config(_write(tmp_path, text), environ={}).server.grpc_poller_batch is True
    environ = {"TIERDISK_SERVER_GRPC_POLLER_BATCH": "Off"}  # the environment over the file
    assert load_config(_write(tmp_path, text), environ=environ).server.grpc_poller_batch is False
    for word in ("true", "1", "yes", "ON"):
        flags = {"grpc_poller_batch": word}  # the flag over both
        config = load_config(_write(tmp_path, text), environ=environ, flags=flags)
        assert config.server.grpc_poller_batch is True
    with pytest.raises(ConfigError, match="--grpc-poller-batch must be true or false, not 'maybe'"):
        load_config(_write(tmp_path, GOOD), environ={}, flags={"grpc_poller_batch": "maybe"})
    bad = GOOD.replace("[server]\n", '[server]\ngrpc_poller_batch = "sometimes"\n', 1)
    with pytest.raises(ConfigError, match="grpc_poller_batch must be true or false"):
        load_config(_write(tmp_path, bad), environ={})


def test_good_addresses_pass(tmp_path: Path) -> None:
    environ = {
        "TIERDISK_SERVER_LISTEN": "[::1]:0",
        "TIERDISK_SERVER_METRICS": "",
        "TIERDISK_SERVER_NBD": "unix:/tmp/tierdisk-nbd.sock",
    }
    server = load_config(_write(tmp_path, GOOD), environ=environ).server
    assert (server.listen, server.metrics, server.nbd) == (
        "[::1]:0",
        "",
        "unix:/tmp/tierdisk-nbd.sock",
    )


@pytest.mark.parametrize(
    "target",
    ["origin.example:7400", "[::1]:7400", "unix:/run/origin.sock", "dns:///origin.example:7400"],
)
def test_remote_targets_in_the_forms_grpc_takes_pass(tmp_path: Path, target: str) -> None:
    text = f"[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='remote'\ntarget='{target}'\n"
    config = load_config(_write(tmp_path, text + "volume='b'\n"), environ={})
    assert config.volumes[0].layers[0].options["target"] == target


def test_an_empty_host_is_every_interface_for_metrics_and_nbd(tmp_path: Path) -> None:
    environ = {"TIERDISK_SERVER_METRICS": ":9400", "TIERDISK_SERVER_NBD": ":10809"}
    server = load_config(_write(tmp_path, GOOD), environ=environ).server
    assert (server.metrics, server.nbd) == (":9400", ":10809")


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"# caf\xe9\n", "is not UTF-8 (byte 0xe9 at offset 5)"),
        (b"\xef\xbb\xbf", "starts with a UTF-8 byte order mark (offset 0)"),
    ],
)
def test_a_config_that_is_not_plain_utf8_is_named_with_the_offset(
    tmp_path: Path, data: bytes, fragment: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(data + GOOD.encode())
    with pytest.raises(ConfigError) as info:
        load_config(str(path), environ={})
    assert str(info.value).startswith(f"config {path} ")
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("data", "token"),
    [(b"secret\n", "secret"), (b"secret\r\n", "secret"), (b"  secret \t\n\n", "secret")],
)
def test_token_file_loses_the_white_space_around_the_token(data: bytes, token: str) -> None:
    assert token_from_file(data, "/t") == token


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"zqv\xffxw\n", "token_file /t is not UTF-8 (byte 0xff at offset 3)"),
        (b"\r\n", "token_file /t is empty"),
        (b"zq\rxw\n", "token_file /t: the token contains a character not allowed"),
        ("zq\u00f6xw".encode(), "'\u00f6' (U+00F6) at position 2"),
    ],
)
def test_token_file_that_grpc_cannot_send_is_a_config_error(data: bytes, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        token_from_file(data, "/t")
    assert fragment in str(info.value)
    assert "zq" not in str(info.value) and "xw" not in str(info.value)  # the token is not shown


def _remote_volume(option: str) -> str:
    return (
        "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\n[[volumes.layers]]\n"
        f"kind='remote'\ntarget='a:1'\nvolume='b'\n{option}\n"
    )


@pytest.mark.parametrize("value", ["nan", "inf", "+inf", "-inf", "1e300", "86401", "0", "-1"])
def test_a_timeout_that_is_not_a_sane_number_of_seconds_is_refused(
    tmp_path: Path, value: str
) -> None:
    """nan passed a ``<= 0`` check (the volume then never attached), and inf or 1e300 made
    every call an immediate DEADLINE_EXCEEDED: refused, naming the volume, the layer and the
    bound."""
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, _remote_volume(f"timeout = {value}")), environ={})
    message = str(info.value)
    assert message.startswith("volume 'v', layer 1: timeout must be a number of seconds")
    assert "at most 86400 (one day)" in message


@pytest.mark.parametrize("value", ["0.001", "1", "86400", "86400.0"])
def test_timeouts_up_to_a_day_pass(tmp_path: Path, value: str) -> None:
    config = load_config(_write(tmp_path, _remote_volume(f"timeout = {value}")), environ={})
    assert config.volumes[0].layers[1].options["timeout"] == float(value)


@pytest.mark.parametrize(("token", "fragment"), [('""', "token is empty"), ('"  "', "only white")])
def test_an_empty_token_is_refused(tmp_path: Path, token: str, fragment: str) -> None:
    """``token = ""`` was taken, and no token sent: refused (leave it out to send none)."""
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, _remote_volume(f"token = {token}")), environ={})
    assert str(info.value).startswith("volume 'v', layer 1: token is empty")
    assert fragment in str(info.value)


def test_a_layer_path_used_twice_names_both_layers(tmp_path: Path) -> None:
    """Found in the config, not by the second layer finding the file locked ("two servers
    cannot share a layer", with a single server)."""
    text = (
        "[[volumes]]\nname='a'\n[[volumes.layers]]\nkind='ram'\n[[volumes.layers]]\n"
        "kind='sparse'\npath='x/img'\nsize=4096\n"
        "[[volumes]]\nname='b'\n[[volumes.layers]]\nkind='sqlite'\n"
        f"path='{tmp_path / 'd' / 'x' / 'img'}'\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), flags={"data_dir": str(tmp_path / "d")}, environ={})
    message = str(info.value)
    assert message.startswith("volume 'b', layer 0: path ")
    assert "is used twice in this config, also by volume 'a', layer 1" in message


@pytest.mark.parametrize(
    ("first", "second", "said"),
    [
        (
            "kind='sqlite'\npath='y'",
            "kind='raw'\npath='y-wal'\nsize=4096",
            "path {d}/y-wal is a file that volume 'a', layer 0 (at {d}/y) makes beside its own",
        ),
        (
            "kind='sqlite'\npath='y'",
            "kind='sparse'\npath='y-journal'\nsize=4096",
            "path {d}/y-journal is a file that volume 'a', layer 0 (at {d}/y) makes beside",
        ),
        (
            "kind='raw'\npath='y.map'\nsize=4096",
            "kind='sparse'\npath='y'\nsize=4096",
            "the sparse layer at {d}/y makes {d}/y.map beside it, which volume 'a', layer 0 is at",
        ),
        (  # (what either makes beside its own: the map's compaction, the new database)
            "kind='sparse'\npath='y'\nsize=4096",
            "kind='sqlite'\npath='y.map.tmp'\nsize=4096",
            "path {d}/y.map.tmp is a file that volume 'a', layer 0 (at {d}/y) makes beside",
        ),
        (
            "kind='sparse'\npath='y.lock'\nsize=4096",
            "kind='sqlite'\npath='y'\nsize=4096",
            "the sqlite layer at {d}/y makes {d}/y.lock beside it, which volume 'a', layer 0 is at",
        ),
    ],
)
def test_a_layer_at_a_file_another_layer_makes_beside_its_own_is_refused(
    tmp_path: Path, first: str, second: str, said: str
) -> None:
    """A sqlite layer's WAL, journal and lock file, a sparse layer's map: a layer there
    would have its file replaced or removed under it by the other (acknowledged writes
    lost), so the config names both layers, as for a path used twice."""
    text = (
        f"[[volumes]]\nname='a'\n[[volumes.layers]]\n{first}\n"
        f"[[volumes]]\nname='b'\n[[volumes.layers]]\n{second}\n"
    )
    data = tmp_path / "d"
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), flags={"data_dir": str(data)}, environ={})
    assert str(info.value).startswith("volume 'b', layer 0: ")
    assert said.format(d=data) in str(info.value)


@pytest.mark.parametrize("name", ["write-verifiers.json", "write-verifiers.json.new"])
def test_a_layer_at_the_servers_own_record_is_refused(tmp_path: Path, name: str) -> None:
    """A layer file that is the server's record of write verifiers (or the new one it
    writes before replacing it) would have its data replaced at the record's next change:
    refused at load, naming the layer."""
    text = f"[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='raw'\npath='{name}'\nsize=4096\n"
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), flags={"data_dir": str(tmp_path / "d")}, environ={})
    assert str(info.value).startswith(f"volume 'v', layer 0: path {tmp_path / 'd' / name} is ")
    assert "the server's own record of write verifiers" in str(info.value)


@pytest.mark.parametrize("kind", ["raw", "sparse", "sqlite"])
def test_a_layer_file_under_two_names_is_a_path_used_twice(tmp_path: Path, kind: str) -> None:
    """Two hard links of one file (or a symlink to it) are one file: the config names both
    layers, instead of the second layer finding the file locked by the first ("two servers
    cannot share a layer", with a single server, naming whichever opened second)."""
    data = tmp_path / "d"
    data.mkdir()
    (data / "one").write_bytes(b"\0" * 4096)
    os.link(data / "one", data / "two")
    os.symlink(data / "one", data / "three")
    for other in ("two", "three"):
        text = "".join(
            f"[[volumes]]\nname='{name}'\n[[volumes.layers]]\nkind='{kind}'\npath='{path}'\n"
            for name, path in (("a", "one"), ("b", other))
        )
        with pytest.raises(ConfigError) as info:
            load_config(_write(tmp_path, text), flags={"data_dir": str(data)}, environ={})
        assert str(info.value).startswith(f"volume 'b', layer 0: path {data / other} is used twice")
        assert "also by volume 'a', layer 0" in str(info.value)


def test_read_only_raw_images_can_be_shared(tmp_path: Path) -> None:
    """Any number of layers may read one image (they lock it shared)."""
    body = "".join(
        f"[[volumes]]\nname='{name}'\nread_only={ro}\n[[volumes.layers]]\nkind='ram'\n"
        f"[[volumes.layers]]\nkind='raw'\npath='base.img'\nread_only=true\n"
        for name, ro in (("a", "false"), ("b", "true"))
    )
    config = load_config(_write(tmp_path, body), environ={})
    assert [v.name for v in config.volumes] == ["a", "b"]
    with pytest.raises(ConfigError, match=r"volume 'c', layer 0: path .* used twice"):
        load_config(
            _write(
                tmp_path,
                body + "[[volumes]]\nname='c'\n[[volumes.layers]]\nkind='raw'\npath='base.img'\n",
            ),
            environ={},
        )


# -- [server] nbd_tls_cert, nbd_tls_key, nbd_tls_ca (with real certificates: test_nbd_tls.py) --


def test_no_nbd_tls_by_default(tmp_path: Path) -> None:
    server = load_config(_write(tmp_path, GOOD), environ={}).server
    assert (server.nbd_tls_cert, server.nbd_tls_key, server.nbd_tls_ca) == ("", "", "")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"TIERDISK_SERVER_NBD_TLS_CERT": "c.pem"},
            "TIERDISK_SERVER_NBD_TLS_CERT is set but nbd_tls_key is not: TLS for the NBD "
            "export needs the certificate and its private key",
        ),
        (
            {"--nbd-tls-key": "k.pem"},
            "--nbd-tls-key is set but nbd_tls_cert is not: TLS for the NBD export needs the "
            "certificate and its private key",
        ),
        (
            {"[server] nbd_tls_ca": "ca.pem"},
            "[server] nbd_tls_ca is set but nbd_tls_cert and nbd_tls_key are not",
        ),
        (
            {"--nbd-tls-cert": "c.pem", "--nbd-tls-key": "k.pem", "TIERDISK_SERVER_NBD": ""},
            "--nbd-tls-cert is set but the NBD export is off (nbd is empty)",
        ),
        (
            {"[server] nbd_tls_cert": "c.pem", "[server] nbd_tls_key": "k.pem"},
            "cannot read [server] nbd_tls_cert DATA/c.pem: No such file or directory",
        ),
        (  # the flag comes first, and a relative path is the data dir's
            {
                "--nbd-tls-cert": "flag.pem",
                "TIERDISK_SERVER_NBD_TLS_CERT": "env.pem",
                "[server] nbd_tls_cert": "file.pem",
                "--nbd-tls-key": "k.pem",
            },
            "cannot read --nbd-tls-cert DATA/flag.pem: No such file or directory",
        ),
        (
            {"TIERDISK_SERVER_NBD_TLS_CERT": "/nonexistent/c.pem", "--nbd-tls-key": "k.pem"},
            "cannot read TIERDISK_SERVER_NBD_TLS_CERT /nonexistent/c.pem: No such file",
        ),
        (
            {"--nbd-tls-cert": "not.pem", "--nbd-tls-key": "not.pem"},
            "--nbd-tls-cert DATA/not.pem holds no PEM certificate",
        ),
    ],
)
def test_nbd_tls_rules_name_the_key(tmp_path: Path, settings: dict[str, str], message: str) -> None:
    """The certificate and key go together, the CA bundle needs them, all need the NBD
    export; the files are read at config time (a relative path is the data dir's). Each
    refusal names the key as it was given."""
    data = tmp_path / "d"
    data.mkdir()
    (data / "not.pem").write_text("not a certificate\n")
    table = {k[len("[server] ") :]: v for k, v in settings.items() if k.startswith("[server] ")}
    flags = {k[2:].replace("-", "_"): v for k, v in settings.items() if k.startswith("--")}
    environ = {k: v for k, v in settings.items() if k.startswith("TIERDISK_")}
    text = GOOD.replace("DATA", str(data)).replace(
        "[server]\n", "[server]\nnbd = '127.0.0.1:0'\n" + "".join(
            f"{key} = '{value}'\n" for key, value in table.items()
        ), 1
    )  # fmt: skip
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), flags=flags, environ=environ)
    assert str(info.value).startswith(message.replace("DATA", str(data))), str(info.value)


# -- inputs that used to pass the config and fail later, or end in a traceback -------------

RAM = "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\nsize=4096\n"


def _remote(target: str) -> str:
    """A volume of one remote layer whose ``target`` is ``target`` (a TOML basic string: escapes
    such as ``\\u0000`` are read as the character)."""
    return (
        f'[[volumes]]\nname="v"\n[[volumes.layers]]\nkind="remote"\ntarget="{target}"\nvolume="b"\n'
    )


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        ("http://127.0.0.1:7401", "target 'http://127.0.0.1:7401': scheme http: is not taken"),
        ("unix:", "target 'unix:': names no socket path"),
        ("127.0.0.1 :7401", "target '127.0.0.1 :7401': contains white space: ' ' (U+0020)"),
        ("xyz:///foo", "target 'xyz:///foo': unknown scheme xyz:"),
        ("127.0.0.1\\u0000:7401", "target '127.0.0.1\\x00:7401': contains a control character"),
        ("dns:///127.0.0.1", "target 'dns:///127.0.0.1': after dns: missing port"),
    ],
)
def test_remote_targets_that_can_never_work_are_refused(
    tmp_path: Path, target: str, fragment: str
) -> None:
    """The server started with each and retried it for ever as "not reachable" (the NUL one
    went to port 443): a config error naming the volume, the layer and the target."""
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, _remote(target)), environ={})
    assert str(info.value).startswith(f"volume 'v', layer 0: {fragment}"), str(info.value)


@pytest.mark.parametrize("key", ["listen", "metrics", "nbd"])
@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("127.0.0.1\\u0000:7411", "'127.0.0.1\\x00:7411' contains a control character: '\\x00'"),
        ("127.0.0.1 :7411", "'127.0.0.1 :7411' contains white space: ' ' (U+0020) at position 9"),
        ("127.0.0.1:7411\\t", "contains white space: '\\t' (U+0009) at position 14"),
        (
            "unix:/run/t\\u0000.sock",
            "contains a control character: '\\x00' (U+0000) at position 11",
        ),
        ("dns:///127.0.0.1:0", "a listen address is HOST:PORT or unix:PATH (not dns:…)"),
    ],
)
def test_listen_addresses_with_control_characters_are_refused(
    tmp_path: Path, key: str, value: str, fragment: str
) -> None:
    """A NUL in ``listen`` bound port 443 (gRPC's C string ends there); in ``metrics`` and
    ``nbd`` it was Python's "embedded null byte" at start."""
    text = f'[server]\n{key} = "{value}"\n' + RAM
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), environ={})
    assert str(info.value).startswith(f"[server] {key} address "), str(info.value)
    assert fragment in str(info.value)


def test_a_remote_layers_nbd_address_is_checked_alike(tmp_path: Path) -> None:
    text = _remote("127.0.0.1:1") + 'nbd = "127.0.0.1\\u0000:10809"\n'
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), environ={})
    assert str(info.value).startswith("volume 'v', layer 0: nbd address '127.0.0.1\\x00:10809' ")


@pytest.mark.parametrize(("value", "missing"), [(":10809", "no host"), ("[::1]:0", "port 0")])
def test_a_remote_layers_nbd_address_is_one_to_connect_to(
    tmp_path: Path, value: str, missing: str
) -> None:
    """A listener's forms (an empty host: every interface; port 0: any free one) name no
    export: ``:10809`` connected to this host, not the origin's."""
    text = _remote("127.0.0.1:1") + f'nbd = "{value}"\n'
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), environ={})
    assert str(info.value) == (
        f"volume 'v', layer 0: nbd address {value!r} has {missing}: give the NBD export's "
        'HOST:PORT (or "auto", to ask the origin)'
    )


@pytest.mark.parametrize(
    ("flags", "environ", "message"),
    [
        (
            {"listen": os.fsdecode(b"unix:/run/s\xff.sock")},
            {},
            "--listen address 'unix:/run/s\\udcff.sock' is not UTF-8 (byte 0xff at position 11)",
        ),
        (
            {},
            {"TIERDISK_SERVER_LISTEN": os.fsdecode(b"h\xff:0")},
            "TIERDISK_SERVER_LISTEN address 'h\\udcff:0' is not UTF-8 (byte 0xff at position 1)",
        ),
        (
            {"metrics": "127.0.0.1:\u00b2"},
            {},
            "--metrics address '127.0.0.1:\u00b2' is not HOST:PORT or unix:/path",
        ),
        (
            {},
            {"TIERDISK_SERVER_NBD": "127.0.0.1:\u0663"},
            "TIERDISK_SERVER_NBD address '127.0.0.1:\u0663' is not HOST:PORT or unix:/path",
        ),
        (
            {"nbd_max_connections": "\u0663"},
            {},
            "--nbd-max-connections must be a whole number >= 1, not '\u0663'",
        ),
        (
            {"metrics": "unix:/" + "m" * 120},
            {},
            "the socket path is 121 bytes long, more than a unix socket's can be (107)",
        ),
    ],
)
def test_server_flags_grpc_or_python_cannot_take_are_named(
    tmp_path: Path, flags: dict[str, str], environ: dict[str, str], message: str
) -> None:
    """A non-UTF-8 listen address was a UnicodeEncodeError inside gRPC at start; a port of
    ``²`` was "invalid literal for int()" naming no key; ``٣`` was taken as 3."""
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, RAM), flags=flags, environ=environ)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind=['ram']\n",
            "volume 'v', layer 0: unknown layer kind ['ram'] (known kinds: ram, raw, remote, "
            "sparse, sqlite)",
        ),
        (
            "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind={a=1}\n",
            "volume 'v', layer 0: unknown layer kind {'a': 1} (known kinds:",
        ),
        (
            "[[volumes]]\nname='v'\n[[volumes.layers]]\nsize=4096\n",
            "volume 'v', layer 0: a layer needs 'kind' (one of: ram, raw, remote, sparse, sqlite)",
        ),
        (
            "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='sparse'\npath=\"a\\u0000b\"\n",
            "volume 'v', layer 0: path 'a\\x00b' contains a NUL character (U+0000) at position 1, "
            "which no path can hold",
        ),
        (
            '[server]\nlisten="127.0.0.1:0"\ndata_dir="a\\u0000b"\n' + RAM,
            "[server] data_dir 'a\\x00b' contains a NUL character (U+0000) at position 1",
        ),
        (
            '[server]\nnbd="127.0.0.1:0"\nnbd_tls_cert="a\\u0000b"\nnbd_tls_key="k"\n' + RAM,
            "[server] nbd_tls_cert 'a\\x00b' contains a NUL character (U+0000) at position 1",
        ),
        (
            _remote("127.0.0.1:1") + 'tls=true\nserver_name="a\\u0000b"\n',
            "volume 'v', layer 0: server_name 'a\\x00b' contains a control character",
        ),
        (
            "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\nsize='\u0663KiB'\n",
            "volume 'v', layer 0: size '\u0663KiB' is not a size",
        ),
    ],
)
def test_values_that_were_tracebacks_are_config_errors(
    tmp_path: Path, text: str, message: str
) -> None:
    """An unhashable ``kind`` was a TypeError, a NUL in a path Python's ValueError "embedded
    null byte" (at start, or when the NBD TLS files were read); ``size = "٣KiB"`` was 3 KiB."""
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), environ={})
    assert str(info.value).startswith(message), str(info.value)


def test_a_value_nested_deep_or_long_is_shown_short(tmp_path: Path) -> None:
    """A TOML nested too deep for the reader (a RecursionError), and values whose ``repr``
    would be thousands of levels deep (dotted keys build those without recursion) or a
    megabyte long: each a one-line config error of sensible length."""
    texts = {
        "nested": "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind = "
        + "[" * 2000
        + "]" * 2000
        + "\n",
        "dotted": "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind."
        + ".".join(["a"] * 3000)
        + " = 1\n",
        "long": "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\nsize=["
        + ",".join(["1"] * 100_000)
        + "]\n",
    }
    messages = {}
    for name, text in texts.items():
        with pytest.raises(ConfigError) as info:
            load_config(_write(tmp_path, text), environ={})
        messages[name] = str(info.value)
        assert "\n" not in messages[name] and len(messages[name]) < 300, messages[name]
    assert messages["nested"].endswith(
        "c.toml nests arrays or tables too deeply to be read (a few hundred levels at most)"
    )
    assert messages["dotted"].startswith("volume 'v', layer 0: unknown layer kind {'a': {'a': ")
    assert messages["long"].startswith("volume 'v', layer 0: size [1, 1, 1, 1, 1, 1, ...] is not")


def test_a_sector_larger_than_max_io_is_refused(tmp_path: Path) -> None:
    """Every request carries whole sectors: a 32 MiB sector under the default 16 MiB max_io
    started and refused every read and write. A max_io that holds one sector passes."""
    text = "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\nsize='64MiB'\n"
    text += "sector_size=33554432\n"
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), environ={})
    assert str(info.value).startswith(
        "volume 'v', layer 0: sector_size 33554432 is larger than max_io 16777216, the largest "
        "request: not even one sector could be read or written"
    )
    config = load_config(_write(tmp_path, text), flags={"max_io": "32MiB"}, environ={})
    assert config.volumes[0].layers[0].options["sector_size"] == 32 << 20


# -- files read at config time: regular files of at most 4 MiB ------------------------------


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    """A FIFO nobody writes to: opened for reading the usual way, it waits for ever."""
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


def test_a_config_may_come_through_a_pipe_but_not_endlessly(tmp_path: Path, fifo: Path) -> None:
    """``--config <(envsubst < template)`` is read (a pipe: read once); ``--config /dev/zero``
    was read until memory ran out: it stops at 4 MiB."""
    with pytest.raises(ConfigError) as info:
        load_config("/dev/zero", environ={})
    assert str(info.value) == (
        "config /dev/zero holds more than 4 MiB (4194304 bytes), the most read from such a file"
    )
    writer = threading.Thread(target=fifo.write_text, args=(RAM,))
    writer.start()
    try:
        config = load_config(str(fifo), environ={})
    finally:
        writer.join(10)
    assert [volume.name for volume in config.volumes] == ["v"]


def test_a_config_larger_than_4_mib_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.toml"
    path.write_bytes(RAM.encode() + b"#" * (4 << 20) + b"\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), environ={})
    assert str(info.value) == (
        f"config {path} holds more than 4 MiB (4194304 bytes), the most read from such a file"
    )


def test_nbd_tls_files_that_are_no_regular_files_are_refused(tmp_path: Path, fifo: Path) -> None:
    """An nbd_tls_* file of /dev/zero was read until memory ran out."""
    for path, kind in (("/dev/zero", "a character device"), (str(fifo), "a pipe (FIFO)")):
        flags = {"nbd": "127.0.0.1:0", "nbd_tls_cert": path, "nbd_tls_key": path}
        with pytest.raises(ConfigError) as info:
            load_config(_write(tmp_path, RAM), flags=flags, environ={})
        assert str(info.value) == f"--nbd-tls-cert {path} is {kind}, not a regular file"


def test_a_token_that_is_not_a_string_is_refused_without_showing_it(tmp_path: Path) -> None:
    body = "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='remote'\ntarget='127.0.0.1:1'\n"
    body += "volume='o'\ntoken=982451653104729\n"
    with pytest.raises(
        ConfigError, match=r"token must be a string in quotes, not a number$"
    ) as info:
        load_config(_write(tmp_path, body), environ={})
    assert "982451653104729" not in str(info.value)


@pytest.mark.parametrize(
    ("target", "options", "warned"),
    [
        ("origin.example:7400", "", True),
        ("origin.example:7400", "tls = true\n", False),
        ("127.0.0.1:7400", "", False),
        ("unix:/run/origin.sock", "", False),
    ],
)
def test_a_token_sent_in_clear_text_to_another_host_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, target: str, options: str, warned: bool
) -> None:
    body = f"[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='remote'\ntarget='{target}'\n"
    body += f"volume='o'\ntoken='s3cret'\n{options}"
    with caplog.at_level(logging.WARNING, logger="tierdisk.service.config"):
        load_config(_write(tmp_path, body), environ={})
    said = " ".join(r.getMessage() for r in caplog.records)
    assert ("volume 'v', layer 0: its bearer token is sent in clear text" in said) == warned
    assert "s3cret" not in said


@pytest.mark.parametrize(("mode", "warned"), [(0o600, False), (0o640, True), (0o644, True)])
def test_secret_files_others_can_read_are_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int, warned: bool
) -> None:
    """A token file (or a private key) the group or others can read: a warning naming it
    and its mode; the config still loads (the operator may have reasons)."""
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(mode)
    body = "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='remote'\n"
    body += f"target='127.0.0.1:1'\nvolume='o'\ntoken_file='{token}'\n"
    with caplog.at_level(logging.WARNING, logger="tierdisk.service.config"):
        load_config(_write(tmp_path, body), environ={})
    said = " ".join(r.getMessage() for r in caplog.records)
    expected = f"volume 'v', layer 0: token_file {token} is readable or writable by others"
    assert (expected in said) == warned, said
    if warned:
        assert f"(mode {mode:03o})" in said


@pytest.mark.parametrize(
    ("name", "why"),
    [
        (".hidden", "this one starts with '.'"),
        ("-v", "this one starts with '-'"),
        ("a" * 129, "this one is 129 characters long"),
        ("vm 1", "this one holds ' ' (U+0020)"),
        ("vm\u0435", "this one holds '\u0435' (U+0435)"),  # a Cyrillic look-alike of 'e'
    ],
)
def test_a_bad_volume_name_says_the_rule_and_what_breaks_it(
    tmp_path: Path, name: str, why: str
) -> None:
    body = f"[[volumes]]\nname = {json.dumps(name)}\n[[volumes.layers]]\nkind='ram'\nsize=4096\n"
    with pytest.raises(ConfigError, match="a name is 1 to 128 ASCII letters") as info:
        load_config(_write(tmp_path, body), environ={})
    assert why in str(info.value)


RAM_VOLUME = '[[volumes]]\nname = "v"\n[[volumes.layers]]\nkind = "ram"\nsize = "1MiB"\n'


@pytest.mark.parametrize(
    ("value", "ok"),
    [("1MiB", True), ("256MiB", True), (str((1 << 20) - 1), False), (str((256 << 20) + 1), False)],
)
def test_max_io_is_1_to_256_mib_inclusive(tmp_path: Path, value: str, ok: bool) -> None:
    """README: max_io is 1 MiB to 256 MiB; both ends are taken, a byte past either is not."""
    text = f'[server]\nmax_io = "{value}"\n' + RAM_VOLUME
    if ok:
        assert load_config(_write(tmp_path, text), environ={}).server.max_io == parse_size(
            value, "max_io"
        )
    else:
        with pytest.raises(ConfigError, match="max_io"):
            load_config(_write(tmp_path, text), environ={})
