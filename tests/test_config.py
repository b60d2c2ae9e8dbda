"""Config loading: the TOML of DESIGN.md §4, precedence, and errors that name the problem."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tierdisk.client import cli
from tierdisk.service.config import (
    DEFAULT_SIZE,
    ServerConfig,
    load_config,
    parse_size,
    token_from_file,
)
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
        assert cli.size_argument(value) == (expected, True)  # one reading everywhere


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
        ("volumes = 3\n", "defines no [[volumes]]"),
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
