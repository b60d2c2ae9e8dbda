"""tierdisk.client.cli (client/cli.py), the ``tierdisk`` command, without a tierdisk server:
argument parsing, usage errors (exit 2), one-line errors for a server that is not listening
(exit 1), file errors, and the hand-over of ``tierdisk serve`` to the server's entry point.
Sizes are in test_sizes.py, the address and token checks in test_checks.py, the wording of
a failed call in test_cli_errors.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from tierdisk.client import cli, cli_args

ROOT = Path(__file__).resolve().parent.parent
TIERDISK = ROOT / ".venv" / "bin" / "tierdisk"
DEAD = "127.0.0.1:1"  # nothing listens on port 1

ENTRY_POINTS = [
    pytest.param([str(TIERDISK)], id="console-script"),
    pytest.param([sys.executable, "-m", "tierdisk.client"], id="python-m-client"),
    pytest.param([sys.executable, "-m", "tierdisk.client.cli"], id="python-m-cli"),
]


def run(
    *args: str, cmd: list[str] | None = None, env: dict[str, str] | None = None, stdin: bytes = b""
) -> subprocess.CompletedProcess[str]:
    base = cmd or [sys.executable, "-m", "tierdisk.client"]
    environ = {k: v for k, v in os.environ.items() if k != "TIERDISK_SERVER"}
    environ.update(env or {})
    return subprocess.run(
        [*base, *args],
        input=stdin.decode(),
        capture_output=True,
        text=True,
        timeout=60,
        env=environ,
    )


def assert_one_line(stderr: str, *needles: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("tierdisk: "), stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], stderr


# -- usage errors: exit 2 --------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["read", "vol", "-1", "4"],
        ["read", "vol", "0"],
        ["write"],
        ["--timeout", "0", "volumes"],
        ["--timeout", "inf", "volumes"],
        ["--timeout", "nan", "volumes"],
        ["--timeout", "\u0663", "volumes"],  # an Arabic-Indic 3: ASCII digits only
        ["--timeout", "1e10", "volumes"],  # gRPC would make that an immediate deadline
        ["--server", DEAD, "serve"],  # client options do not apply to serve
    ],
)
def test_usage_errors_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("tierdisk")


def test_bad_resize_size_is_a_usage_error() -> None:
    result = run("--server", DEAD, "resize", "vol", "12Q")
    assert result.returncode == 2
    assert_one_line(result.stderr, "12Q")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["resize", "vol", "99999999999999999999999"], "over the size limit of any volume"),
        (["resize", "vol", str(1 << 53)], "(9007199254740991 sectors)"),
        (["resize", "vol", f"{1 << 63}B"], "(9223372036854775807 bytes)"),
        (["read", "vol", str(1 << 64), "1"], f"SECTOR {1 << 64}"),
        (["read", "vol", "0", str(1 << 64)], f"COUNT {1 << 64}"),
        (["write", "vol", str(1 << 64)], f"SECTOR {1 << 64}"),
    ],
)
def test_numbers_no_request_can_carry_fail_before_any_call(args: list[str], needle: str) -> None:
    """Exit 2 with one line, whether a server is there or not: no call is made."""
    result = run("--server", DEAD, "--retries", "0", *args)
    assert result.returncode == 2
    assert_one_line(result.stderr, needle)
    assert "internal error" not in result.stderr


def test_help_lists_every_verb(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in [
        "serve",
        "volumes",
        "info",
        "read",
        "write",
        "import",
        "export",
        "inspect",
        "map",
        "watch",
        "resize",
        "flush",
    ]:
        assert verb in out


def test_numbers_are_decimal_with_leading_zeros_allowed() -> None:
    """SECTOR, COUNT and --retries read as resize's SIZE does: decimal digits, so ``08`` is
    8 and ``010`` is 10, not octal."""
    args = cli_args.build_parser().parse_args(["--retries", "010", "read", "vol", "08", "0010"])
    assert (args.retries, args.sector, args.count) == (10, 8, 10)
    assert cli_args.build_parser().parse_args(["write", "vol", "0009"]).sector == 9


@pytest.mark.parametrize("number", ["0x10", "0o7", "0b1", "1_000", "+5", " 5", "1e3", "\u0665"])
def test_numbers_in_anything_but_decimal_digits_are_usage_errors(
    number: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--server", DEAD, "--retries", "0", "read", "vol", number, "1"]) == 2
    err = capsys.readouterr().err
    assert "argument SECTOR: not a whole number in decimal digits" in err, err
    assert cli.main(["--server", DEAD, "--retries", number, "volumes"]) == 2
    assert "argument --retries: not a whole number in decimal digits" in capsys.readouterr().err


NOT_UTF8 = "vm\udcff"
"""How Python hands over an argument holding a byte that is not UTF-8 (``$'vm\\xff'``)."""


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["info", NOT_UTF8], "argument VOL: not valid UTF-8"),
        (["read", NOT_UTF8, "0", "1"], "argument VOL: not valid UTF-8"),
        (["inspect", "vm1", NOT_UTF8], "argument PATH: not valid UTF-8"),
    ],
)
def test_an_argument_that_is_not_utf8_is_a_usage_error_naming_it(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A request carries text as UTF-8: a volume name or inspect PATH that is not is refused
    while parsing (exit 2), not sent (it was an internal error)."""
    assert cli.main(["--server", DEAD, "--retries", "0", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and "internal error" not in err, err


@pytest.mark.parametrize(
    ("args", "env", "source"),
    [
        (["--server", "127.0.0.1\udcff:1"], {}, "--server"),
        ([], {"TIERDISK_SERVER": "127.0.0.1\udcff:1"}, "$TIERDISK_SERVER"),
    ],
)
def test_a_server_address_that_is_not_utf8_is_a_usage_error(
    args: list[str], env: dict[str, str], source: str
) -> None:
    result = run(*args, "--retries", "0", "volumes", env=env)
    assert result.returncode == 2
    assert_one_line(result.stderr, "server address", f"(from {source})", "not UTF-8")


FAKE_PEM = "-----BEGIN {0}-----\nAAAA\n-----END {0}-----\n"


@pytest.mark.parametrize(
    ("given", "missing", "kind"),
    [("--tls-cert", "--tls-key", "CERTIFICATE"), ("--tls-key", "--tls-cert", "PRIVATE KEY")],
)
def test_a_client_certificate_without_its_key_is_a_usage_error(
    tmp_path: Path, given: str, missing: str, kind: str
) -> None:
    """gRPC's C core aborts the process on one without the other (exit 134, no word): the
    CLI refuses it first, in one line naming both options."""
    pem = tmp_path / "half.pem"
    pem.write_text(FAKE_PEM.format(kind))
    result = run("--server", DEAD, "--retries", "0", given, str(pem), "volumes")
    assert result.returncode == 2, result.stderr
    assert_one_line(result.stderr, f"{given} is given without {missing}")


# -- a server that is not there: one line, exit 1 --------------------------------------


@pytest.mark.parametrize("cmd", ENTRY_POINTS)
def test_unreachable_server_is_one_line_exit_1(cmd: list[str]) -> None:
    result = run("--server", DEAD, "--timeout", "5", "volumes", cmd=cmd)
    assert result.returncode == 1
    assert_one_line(result.stderr, f"server {DEAD}", "unavailable")
    assert result.stdout == ""


def test_unreachable_server_names_the_volume() -> None:
    result = run("--server", DEAD, "--timeout", "5", "info", "vm1")
    assert result.returncode == 1
    assert_one_line(result.stderr, "volume 'vm1'", DEAD, "unavailable")


def test_server_address_comes_from_the_environment() -> None:
    result = run("--timeout", "5", "volumes", env={"TIERDISK_SERVER": DEAD})
    assert result.returncode == 1
    assert_one_line(result.stderr, f"server {DEAD}")


@pytest.mark.parametrize(
    ("args", "env", "source", "shown"),
    [
        (["--token", "secret\r"], {}, "--token", "'\\r' (U+000D) at position 6"),
        ([], {"TIERDISK_TOKEN": "s\u00e9cret"}, "$TIERDISK_TOKEN", "(U+00E9) at position 1"),
    ],
)
def test_a_token_grpc_cannot_send_is_a_usage_error_that_hides_it(
    args: list[str], env: dict[str, str], source: str, shown: str
) -> None:
    """Checked before any call (gRPC would fail it with an internal error): one line naming
    where the token came from and the character, never the token."""
    result = run("--server", DEAD, *args, "volumes", env=env)
    assert result.returncode == 2
    assert_one_line(result.stderr, f"token (from {source})", "not allowed in a gRPC header", shown)
    assert "cret" not in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "source"),
    [
        (["--token", ""], {}, "--token"),
        ([], {"TIERDISK_TOKEN": "  "}, "$TIERDISK_TOKEN"),
    ],
)
def test_an_empty_token_is_a_usage_error(args: list[str], env: dict[str, str], source: str) -> None:
    """An empty token would send no credential at all (the server then refuses, or serves
    without one): exit 2 naming where it came from, as the config refuses ``token = ""``."""
    result = run("--server", DEAD, *args, "volumes", env=env)
    assert result.returncode == 2
    assert_one_line(result.stderr, f"token (from {source})", "is empty")


def test_closed_stderr_leaves_the_exit_status() -> None:
    """With descriptor 2 closed the error line has nowhere to go, but the command still exits
    1 (libuv, given a descriptor 0-2 of its own, used to abort it: 134)."""
    cmd = [sys.executable, "-m", "tierdisk.client", "--server", DEAD, "--timeout", "5", "volumes"]
    result = subprocess.run(
        ["sh", "-c", 'exec "$0" "$@" 2>&-', *cmd], capture_output=True, timeout=60
    )
    assert result.returncode == 1
    assert result.stdout == b""


def test_bad_server_address_is_a_usage_error_naming_where_it_came_from() -> None:
    """gRPC would read port 99999 as another port, and use 443 for a missing one."""
    result = run("--server", "127.0.0.1:99999", "volumes")
    assert result.returncode == 2
    assert_one_line(result.stderr, "'127.0.0.1:99999'", "--server", "99999", "0-65535")
    result = run("volumes", env={"TIERDISK_SERVER": "localhost"})
    assert result.returncode == 2
    assert_one_line(result.stderr, "'localhost'", "$TIERDISK_SERVER", "missing port")
    # other target forms go to gRPC as they are
    result = run("--server", "unix:/nonexistent/tierdisk.sock", "--retries", "0", "volumes")
    assert result.returncode == 1
    assert_one_line(result.stderr, "server unix:/nonexistent/tierdisk.sock", "unavailable")


def test_default_server_address() -> None:
    args = cli_args.build_parser().parse_args(["volumes"])
    if "TIERDISK_SERVER" not in os.environ:
        assert args.server == "127.0.0.1:7400"


def test_missing_input_file_is_named_before_any_call(tmp_path: Path) -> None:
    missing = tmp_path / "nope.img"
    for args in (["import", "vm1", str(missing)], ["write", "vm1", "0", "-i", str(missing)]):
        result = run("--server", DEAD, *args)
        assert result.returncode == 1
        assert_one_line(result.stderr, f"file '{missing}'", "No such file")


# -- serve -----------------------------------------------------------------------------


def test_serve_passes_every_argument_through(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        return 7

    module = types.ModuleType("fake_tierdisk_server")
    module.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_tierdisk_server", module)
    monkeypatch.setattr(cli, "SERVER_ENTRY", "fake_tierdisk_server")
    monkeypatch.setenv("TIERDISK_SERVER", "10.0.0.1:9")
    argv = ["--listen", "127.0.0.1:0", "--server", "x", "--help", "volumes"]
    assert cli.main(["serve", *argv]) == 7
    assert seen == [argv]


@pytest.mark.parametrize(
    ("args", "option"),
    [(["info", "vol", "--server", DEAD], "--server"), (["volumes", "--timeout=3"], "--timeout")],
)
def test_a_command_option_after_the_verb_is_named_as_misplaced(
    args: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith(f"({option} is an option of the command: give it before the verb, "
                         f"as in tierdisk {option} … VERB …)"), last  # fmt: skip


@pytest.mark.parametrize("verb", [["volumes"], ["serve"]])
def test_ctrl_c_while_the_command_starts_up_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], verb: list[str]
) -> None:
    """Ctrl-C while the command imports gRPC and uvloop or the server (a tenth of a second
    after it starts, before any handler of its own): ``tierdisk: interrupted``, exit 130,
    not a traceback."""

    def ctrl_c(*_: object) -> None:
        raise KeyboardInterrupt

    module = types.ModuleType("fake_tierdisk_server")
    module.main = ctrl_c  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_tierdisk_server", module)
    monkeypatch.setattr(cli, "SERVER_ENTRY", "fake_tierdisk_server")
    monkeypatch.setattr(cli, "install_uvloop", ctrl_c)
    assert cli.main(verb) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "tierdisk: interrupted"


def test_serve_without_a_server_module_exits_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "SERVER_ENTRY", "tierdisk_no_such_module_for_tests")
    assert cli.main(["serve", "--listen", "127.0.0.1:0"]) == 2
    assert_one_line(capsys.readouterr().err, "serve", "tierdisk_no_such_module_for_tests")


def test_serve_is_imported_only_when_used() -> None:
    code = (
        "import sys; from tierdisk.client import cli, cli_args; cli_args.build_parser();"
        "print(any(m.startswith('tierdisk.service') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


GRPC_WHEN = """
import json, os, sys, types
seen = {}
import tierdisk.client
seen["package"] = "grpc" in sys.modules
from tierdisk.client import cli, cli_args
cli_args.build_parser()
seen["cli"] = "grpc" in sys.modules
server = types.ModuleType("fake_tierdisk_server")
server.main = lambda argv: seen.update(serve=os.environ.get("GRPC_VERBOSITY")) or 0
sys.modules["fake_tierdisk_server"] = server
cli.SERVER_ENTRY = "fake_tierdisk_server"
cli.main(["serve"])
cli.main(["--server", "127.0.0.1:1", "--retries", "0", "volumes"])
seen["verb"] = os.environ.get("GRPC_VERBOSITY"), "grpc" in sys.modules
print(json.dumps(seen))
"""


@pytest.mark.parametrize(
    ("env", "verb"),
    [({}, "NONE"), ({"GRPC_VERBOSITY": "DEBUG"}, "DEBUG"), ({"GRPC_TRACE": "api"}, None)],
)
def test_grpc_logging_is_turned_off_before_grpc_loads_for_client_verbs_only(
    env: dict[str, str], verb: str | None
) -> None:
    """gRPC's C core reads GRPC_VERBOSITY once, when grpc is imported: importing the package
    or the CLI does not import it; a client verb sets GRPC_VERBOSITY=NONE first unless the
    user set it or GRPC_TRACE; ``serve`` leaves gRPC's logging alone."""
    environ = {k: v for k, v in os.environ.items() if k not in ("GRPC_VERBOSITY", "GRPC_TRACE")}
    out = subprocess.run(
        [sys.executable, "-c", GRPC_WHEN],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**environ, **env},
    ).stdout
    seen = json.loads(out)
    assert seen == {
        "package": False,
        "cli": False,
        "serve": env.get("GRPC_VERBOSITY"),
        "verb": [verb, True],
    }


@pytest.mark.parametrize(
    ("server", "tls", "warned"),
    [
        ("origin.example:7400", [], True),
        ("10.1.2.3:7400", [], True),
        ("origin.example:7400", ["--tls"], False),
        ("127.0.0.1:7400", [], False),
        ("[::1]:7400", [], False),
        ("localhost:7400", [], False),
        ("unix:/run/tierdisk.sock", [], False),
    ],
)
def test_a_token_sent_in_clear_text_to_another_host_is_warned_about(
    server: str, tls: list[str], warned: bool
) -> None:
    """A bearer token without TLS crosses the network readable by anyone on the path: the
    command says so on stderr (and goes on); not for this host's own addresses. No call is
    made (a SECTOR no request can carry ends the command first): no connection here to
    another host."""
    too_far = ["read", "vol", str(1 << 64), "1"]
    result = run("--server", server, "--token", "s3cret", *tls, *too_far)
    assert result.returncode == 2, result.stderr
    assert ("is sent in clear text" in result.stderr) == warned, result.stderr
    assert "s3cret" not in result.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["read", "vol", "9" * 5000, "1"], "SECTOR: too large: 5000 digits"),
        (["resize", "vol", "9" * 5000 + "MiB"], "too large (5000 digits)"),
        (["--server", "127.0.0.1:" + "9" * 5000, "volumes"], "(5000 digits) is out of range"),
    ],
)
def test_numbers_of_thousands_of_digits_are_one_line(args: list[str], needle: str) -> None:
    """Python refuses to read an integer of over 4,300 digits with a ValueError (a
    traceback, or a message telling the user to call sys.set_int_max_str_digits)."""
    result = run("--server", DEAD, *args) if args[0] != "--server" else run(*args)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "set_int_max_str_digits" not in result.stderr


def test_a_watch_of_a_server_that_is_down_says_why() -> None:
    """Its retries of the first event fill --timeout; the line then says what a single call
    says (unavailable, connection refused), not only that time ran out."""
    result = run("--server", DEAD, "--retries", "100", "--timeout", "2", "watch", "v")
    assert result.returncode == 1
    assert_one_line(result.stderr, "volume 'v' on", "unavailable", "Connection refused")
