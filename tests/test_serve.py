"""``tierdisk serve`` as a real child process: exit codes, config errors, address in use,
the default volume, and a graceful SIGTERM under load."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from servers import ServerProcess, ram, remote, serve_once, toml_volume, write_config

from tierdisk.client import Client
from tierdisk.service.config import load_config
from tierdisk.service.server import Server
from tierdisk.v1 import blockdevice_pb2 as pb
from tierdisk.v1 import blockdevice_pb2_grpc as pb_grpc

DEAD = "127.0.0.1:1"  # nothing listens on port 1 here: connections are refused


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (
            "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\nsize=1024\nbogus=1\n",
            "volume 'v', layer 0: unknown key 'bogus'",
        ),
        (
            "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='tape'\n",
            "volume 'v', layer 0: unknown layer kind 'tape'",
        ),
        ("[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\nsize='x'\n", "is not a size"),
        # a key of the wrong type is named as such, not as missing
        ("[volumes]\nname='v'\n", "volumes must be [[volumes]] tables, not {'name': 'v'}"),
        ("[[volumes]]\nname='v'\nlayers='x'\n", "volume 'v': layers must be [[volumes.layers]]"),
        # broken stacks, found when the volume is built
        (
            "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\nsize=4096\nwrite_through=true\n",
            "volume 'v', layer 0: the bottom layer cannot be write_through",
        ),
        (
            "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\n[[volumes.layers]]\n"
            "kind='raw'\npath='b.img'\nsize=4096\nread_cache=true\n",
            "volume 'v', layer 1: read_cache needs a layer that can write without overwriting",
        ),
        (
            "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\n",
            "volume 'v', layer 0: ram layer has no size",
        ),
        # broken stacks over a remote tier that is down: refused at once, not retried
        (
            "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\n[[volumes.layers]]\n"
            f"kind='remote'\ntarget='{DEAD}'\nvolume='base'\nread_cache=true\n",
            "volume 'v', layer 1: read_cache needs a layer that can write without overwriting",
        ),
        (
            "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\n[[volumes.layers]]\n"
            "kind='ram'\nwrite_through=true\n[[volumes.layers]]\n"
            f"kind='remote'\ntarget='{DEAD}'\nvolume='base'\n",
            "volume 'v', layer 1: write_through layers must form an unbroken run from the top",
        ),
        (
            "[[volumes]]\nname='v'\nread_only='yes'\n[[volumes.layers]]\nkind='ram'\nsize=4096\n",
            "volume 'v': read_only must be true or false",
        ),
        (
            "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\nsector_size=4096\n"
            "[[volumes.layers]]\nkind='ram'\nsize=8192\n",
            "volume 'v', layer 0: sector size 4096 differs",
        ),
    ],
)
def test_config_errors_exit_2_with_one_line(tmp_path: Path, body: str, fragment: str) -> None:
    config = write_config(tmp_path, body)
    result = serve_once(tmp_path, "--config", str(config), "--listen", "127.0.0.1:0")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--listen", "bogus"], "--listen address 'bogus' is not HOST:PORT or unix:/path"),
        (["--listen", "127.0.0.1"], "--listen address '127.0.0.1' is not HOST:PORT"),
        (["--listen", "127.0.0.1:99999"], "port 99999 is out of range"),
        (["--listen", "unix:"], "names no socket path"),
        (["--listen", "::1:0"], "--listen address '::1:0': not HOST:PORT (an IPv6 address goes in"),
        (["--listen", ":0"], "--listen address ':0': missing host"),
        (["--metrics", "::1:0"], "an IPv6 address goes in brackets"),
        (["--metrics", "bogus"], "--metrics address 'bogus' is not HOST:PORT"),
        (["--nbd", "127.0.0.1:70000"], "port 70000 is out of range"),
        (["--max-io", "64KiB"], "--max-io 65536 is out of range"),
        (["--max-io", "3GiB"], "--max-io 3221225472 is out of range"),
        (["--grace", "-1"], "--grace"),
        (["--grace", "nan"], "--grace"),
        (["--grace", "\u0663"], "is not a number of seconds"),  # an Arabic-Indic 3
        (["--grace", "1e300"], "from 0 to 86400 (one day)"),
    ],
)
def test_bad_server_settings_exit_2_with_one_line(
    tmp_path: Path, args: list[str], fragment: str
) -> None:
    config = write_config(
        tmp_path, "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\nsize=4096\n"
    )
    result = serve_once(tmp_path, "--config", str(config), *args)
    assert result.returncode == 2, result.stderr
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    if args[0] != "--grace":  # argparse's usage line comes first there
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize(
    ("layer", "fragment"),
    [
        (
            "target='127.0.0.1:99999'\nvolume='v'\n",
            "volume 'r', layer 0: target '127.0.0.1:99999': port 99999 is out of range",
        ),
        ("target='localhost'\nvolume='v'\n", "layer 0: target 'localhost': missing port"),
        ("target='::1:7400'\nvolume='v'\n", "an IPv6 address goes in brackets"),
        (
            f"target='{DEAD}'\nvolume='v'\ntoken = 't\u00f6ken'\n",
            "volume 'r', layer 0: token contains a character not allowed in a gRPC header: "
            "'\u00f6' (U+00F6) at position 1",
        ),
        (
            f'target="{DEAD}"\nvolume="v"\ntoken = "secret\\r"\n',
            "token contains a character not allowed in a gRPC header: '\\r'",
        ),
        (
            f"target='{DEAD}'\nvolume='v'\ntoken_file='latin1.tok'\n",
            "volume 'r', layer 0: token_file ",
        ),
        (
            f"target='{DEAD}'\nvolume='v'\ntoken_file='tab.tok'\n",
            "tab.tok: the token contains a character not allowed in a gRPC header: '\\t'",
        ),
        (f"target='{DEAD}'\nvolume='v'\ntoken = ''\n", "volume 'r', layer 0: token is empty"),
        (f"target='{DEAD}'\nvolume='v'\ntoken_file='empty.tok'\n", "empty.tok is empty"),
        (
            f"target='{DEAD}'\nvolume='v'\ntimeout = nan\n",
            "volume 'r', layer 0: timeout must be a number of seconds above 0 and at most "
            "86400 (one day), not nan",
        ),
        (f"target='{DEAD}'\nvolume='v'\ntimeout = inf\n", "layer 0: timeout must be"),
        (f"target='{DEAD}'\nvolume='v'\ntimeout = 1e300\n", "layer 0: timeout must be"),
    ],
)
def test_bad_remote_targets_and_tokens_exit_2_with_one_line(
    tmp_path: Path, layer: str, fragment: str
) -> None:
    """gRPC would use another port (or 443) for a bad target, and fail a token it cannot
    send in a header at the first call (a traceback at start); the token is never shown."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "latin1.tok").write_bytes(b"s\xe9cret\n")
    (tmp_path / "data" / "tab.tok").write_bytes(b"sec\tret\r\n")
    (tmp_path / "data" / "empty.tok").write_bytes(b" \r\n")
    for token in (tmp_path / "data").iterdir():
        token.chmod(0o600)  # the server's own: no warning about who may read it
    config = write_config(
        tmp_path, f"[[volumes]]\nname='r'\n[[volumes.layers]]\nkind='remote'\n{layer}"
    )
    result = serve_once(tmp_path, "--config", str(config), "--listen", "127.0.0.1:0")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert "cret" not in result.stderr and "ken'" not in result.stderr


def test_a_token_file_written_with_crlf_is_read_without_the_line_end(tmp_path: Path) -> None:
    """The CRLF (and white space) around a token_file's token is not part of it; the tier
    attaches to its origin with it."""
    origin_dir = tmp_path / "origin"
    origin = ServerProcess.start(
        origin_dir, write_config(origin_dir, toml_volume("base", ram("1MiB")))
    )
    with origin:
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "t.tok").write_bytes(b"  secret-token\r\n")
        config = write_config(
            tmp_path, toml_volume("r", remote(origin.grpc, "base", token_file="t.tok"))
        )
        with ServerProcess.start(tmp_path, config) as tier:

            async def size(address: str) -> int:
                async with grpc.aio.insecure_channel(address) as channel:
                    stub = pb_grpc.BlockDeviceStub(channel)
                    reply = await stub.GetVolume(pb.GetVolumeRequest(volume="r"))
                    return int(reply.sector_count * reply.sector_size)

            assert asyncio.run(asyncio.wait_for(size(tier.grpc), 30)) == 1 << 20
            assert tier.terminate() == 0


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"# caf\xe9\n", "tierdisk.toml is not UTF-8 (byte 0xe9 at offset 5)"),
        (b"\xef\xbb\xbf", "tierdisk.toml starts with a UTF-8 byte order mark (offset 0)"),
    ],
)
def test_a_config_file_that_is_not_utf8_exits_2_with_one_line(
    tmp_path: Path, data: bytes, fragment: str
) -> None:
    config = tmp_path / "tierdisk.toml"
    config.write_bytes(data + b"[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\nsize=4096\n")
    result = serve_once(tmp_path, "--config", str(config), "--listen", "127.0.0.1:0")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"tierdisk serve: config error: config {config} ")
    assert fragment in lines[0]


def test_refused_stack_creates_no_files(tmp_path: Path) -> None:
    """A stack refused by a rule that needs no layer (a raw read cache) leaves nothing
    behind: the raw layer never created its image."""
    config = write_config(
        tmp_path,
        "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\n[[volumes.layers]]\n"
        "kind='raw'\npath='cache.img'\nsize=65536\nread_cache=true\n[[volumes.layers]]\n"
        "kind='ram'\nsize=65536\n",
    )
    result = serve_once(tmp_path, "--config", str(config), "--listen", "127.0.0.1:0")
    assert result.returncode == 2, result.stderr
    assert not (tmp_path / "data" / "cache.img").exists()


@pytest.mark.parametrize(
    ("layer", "fragment"),
    [
        ("kind='ram'\nsize='1PiB'\n", "layer 0: ram layer: cannot map 1125899906842624 bytes"),
        (
            "kind='raw'\npath='big.img'\nsize=4611686018426339328\n",  # 4 EiB - 1 MiB
            "layer 0: cannot create raw image",
        ),
        ("kind='sparse'\npath='afile/s'\nsize=4096\n", "cannot create the folder"),
        ("kind='sqlite'\npath='afile/q.db'\nsize=4096\n", "cannot create the folder"),
        ("kind='raw'\npath='afile/r.img'\nsize=4096\n", "cannot create the folder"),
    ],
)
def test_layers_that_cannot_be_created_are_config_errors(
    tmp_path: Path, layer: str, fragment: str
) -> None:
    """Impossible sizes and folders that cannot be made: one line naming the layer and the
    reason, and nothing half-made left behind (a later start would trip over it)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "afile").write_text("a file where a folder is wanted")
    config = write_config(tmp_path, f"[[volumes]]\nname='v'\n[[volumes.layers]]\n{layer}")
    result = serve_once(tmp_path, "--config", str(config), "--listen", "127.0.0.1:0")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["afile"]


def _damage_sparse_map(data: Path) -> None:
    (data / "s").write_bytes(b"")
    (data / "s.map").write_bytes(b"garbage!!!")  # shorter than a presence map's header


def _damage_sqlite_pages(data: Path) -> None:
    db = sqlite3.connect(data / "q.db")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value)")  # a real-looking file
    db.executemany("INSERT INTO meta VALUES (?, ?)", [(str(i), "x" * 500) for i in range(40)])
    db.commit()
    db.close()
    size = (data / "q.db").stat().st_size
    with open(data / "q.db", "r+b") as f:
        for offset in range(4096, size, 4096):  # every page but the first
            f.seek(offset)
            f.write(b"\xff" * 64)


def _sparse_data_file_lost(data: Path) -> None:
    data.joinpath("s.map").write_bytes(b"")  # a map (its content is not read) and no data
    # file: the layer existed and lost its data, not a new one


def _map_is_a_folder(data: Path) -> None:
    data.joinpath("s").write_bytes(b"")
    data.joinpath("s.map").mkdir()


def _raw_is_a_folder(data: Path) -> None:
    data.joinpath("r.img").mkdir()


def _foreign_sqlite(data: Path) -> None:
    db = sqlite3.connect(data / "q.db")
    db.execute("CREATE TABLE meta (x)")  # another program's database
    db.commit()
    db.close()


@pytest.mark.parametrize(
    ("layer", "damage", "line", "end"),
    [
        (
            "kind='sparse'\npath='s'\n",
            _damage_sparse_map,
            "tierdisk serve: cannot start: volume 'v', layer 1: presence map ",
            "too short for its header",
        ),
        (
            "kind='sqlite'\npath='q.db'\n",
            _damage_sqlite_pages,
            "tierdisk serve: cannot start: volume 'v', layer 1: sqlite layer ",
            "corrupt",
        ),
        (
            "kind='sparse'\npath='s'\n",
            _sparse_data_file_lost,
            "tierdisk serve: cannot start: volume 'v', layer 1: sparse layer ",
            "exists but the data file is missing",
        ),
        (
            "kind='sparse'\npath='s'\n",
            _map_is_a_folder,
            "tierdisk serve: cannot start: volume 'v', layer 1: cannot read the presence map ",
            "Is a directory",
        ),
        (
            "kind='raw'\npath='r.img'\n",
            _raw_is_a_folder,
            "tierdisk serve: cannot start: volume 'v', layer 1: raw image ",
            "r.img is not a regular file",
        ),
        (
            "kind='sqlite'\npath='q.db'\n",
            _foreign_sqlite,
            "tierdisk serve: config error: volume 'v', layer 1: sqlite layer ",
            "not a tierdisk sqlite layer",
        ),
    ],
)
def test_damaged_layer_files_are_not_called_config_errors(
    tmp_path: Path, layer: str, damage: Any, line: str, end: str
) -> None:
    """Corrupt, lost or unreadable stored data sends the operator to the files ("cannot
    start"), not to the TOML; a file that is another program's database is a config
    mistake, said plainly. Still exit 2 and one line."""
    (tmp_path / "data").mkdir()
    damage(tmp_path / "data")
    config = write_config(
        tmp_path,
        f"[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\n[[volumes.layers]]\n{layer}",
    )
    result = serve_once(tmp_path, "--config", str(config), "--listen", "127.0.0.1:0")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), result.stderr
    assert end in lines[0], result.stderr


def test_a_layer_path_used_twice_in_one_config_is_named(tmp_path: Path) -> None:
    """Not "two servers cannot share a layer": this config uses the path twice."""
    body = "".join(
        f"[[volumes]]\nname='{name}'\n[[volumes.layers]]\nkind='sparse'\npath='s'\nsize='1MiB'\n"
        for name in ("a", "b")
    )
    result = serve_once(tmp_path, "--config", str(write_config(tmp_path, body)))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tierdisk serve: config error: volume 'b', layer 0: path ")
    assert "used twice in this config, also by volume 'a', layer 0" in lines[0]
    assert "two servers" not in lines[0]


def test_data_dir_is_created_even_without_files_in_it(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\nsize=4096\n"
    )
    data_dir = tmp_path / "new" / "data"
    with ServerProcess.start(tmp_path, config, "--data-dir", str(data_dir)) as server:
        assert data_dir.is_dir()
        assert server.terminate() == 0


@pytest.mark.parametrize(
    ("flag", "what"),
    [("--listen", "cannot bind gRPC address"), ("--metrics", "cannot listen for metrics on")],
)
def test_address_in_use_is_named(tmp_path: Path, flag: str, what: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        config = write_config(
            tmp_path, "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\nsize=4096\n"
        )
        args = {"--listen": "127.0.0.1:0", "--metrics": "127.0.0.1:0", flag: address}
        result = serve_once(tmp_path, "--config", str(config), *itertools.chain(*args.items()))
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]  # after gRPC's own log line, if any
    assert last == f"tierdisk serve: cannot start: {what} {address}: address already in use"
    assert "Traceback" not in result.stderr


def test_a_socket_path_that_is_a_file_is_named_without_an_errno(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    config = write_config(
        tmp_path, "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\nsize=4096\n"
    )
    address = f"unix:{tmp_path / 'precious.txt'}"
    result = serve_once(tmp_path, "--config", str(config), "--listen", address)
    assert result.returncode == 1
    assert (
        result.stderr
        == f"tierdisk serve: cannot start: cannot listen for gRPC on {address}: the path exists\n"
    )
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_default_volume_persists_across_restarts(tmp_path: Path) -> None:
    """The built-in volume starts at 1 GiB and keeps its data, and a resize (README's
    ``tierdisk resize default 2GiB``) survives a restart instead of breaking the next start."""
    GiB = 1 << 30

    async def write_then_read(address: str, write: bool, grow_to: int | None) -> tuple[int, bytes]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.BlockDeviceStub(channel)
            volume = await stub.GetVolume(pb.GetVolumeRequest(volume="default"))
            if write:
                await stub.Write(pb.WriteRequest(volume="default", sector=77, data=b"d" * 512))
            if grow_to is not None:
                count = grow_to // volume.sector_size
                await stub.Resize(pb.ResizeRequest(volume="default", sector_count=count))
            reply = await stub.Read(pb.ReadRequest(volume="default", sector=77, sector_count=1))
            return volume.sector_count * volume.sector_size, reply.data

    with ServerProcess.start(tmp_path) as server:
        got = asyncio.run(write_then_read(server.grpc, True, 2 * GiB))
        assert got == (GiB, b"d" * 512)
        assert server.terminate() == 0
    with ServerProcess.start(tmp_path) as server:
        assert asyncio.run(write_then_read(server.grpc, False, None)) == (2 * GiB, b"d" * 512)
        assert server.terminate() == 0


def test_sigterm_under_load_finishes_calls_and_flushes(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='raw'\npath='v.img'\nsize='64MiB'\n",
    )
    server = ServerProcess.start(tmp_path, config)
    acked: dict[int, bytes] = {}
    codes: list[grpc.StatusCode] = []

    async def load() -> None:
        enough = asyncio.Event()
        async with grpc.aio.insecure_channel(server.grpc) as channel:
            stub = pb_grpc.BlockDeviceStub(channel)

            async def writer(n: int) -> None:
                for i in range(400):
                    sector = (n * 1000 + i) * 8
                    data = bytes([(n + i) % 251 + 1]) * 4096
                    try:
                        await stub.Write(pb.WriteRequest(volume="v", sector=sector, data=data))
                    except grpc.aio.AioRpcError as exc:
                        codes.append(exc.code())
                        return
                    acked[sector] = data
                    if len(acked) >= 200:
                        enough.set()

            async def killer() -> None:
                await enough.wait()
                os.kill(server.pid, signal.SIGTERM)

            await asyncio.wait_for(asyncio.gather(killer(), *(writer(n) for n in range(4))), 60)

    try:
        asyncio.run(load())
        assert server.proc.wait(30) == 0, server.stderr_text()
    finally:
        server.kill()
    # Calls refused during the stop say UNAVAILABLE (never CANCELLED or a hang).
    assert set(codes) <= {grpc.StatusCode.UNAVAILABLE}
    image = (tmp_path / "data" / "v.img").read_bytes()
    for sector, data in acked.items():
        assert image[sector * 512 : sector * 512 + 4096] == data


def test_sighup_stops_gracefully_and_keeps_what_was_written(tmp_path: Path) -> None:
    """SIGHUP (a closed terminal or ssh session) stops the server as SIGTERM does: exit 0
    after the final flush. Its default action ended the process at once: a write
    acknowledged but not yet flushed was gone at the next start."""
    config = write_config(
        tmp_path, toml_volume("v", {"kind": "sparse", "path": "v", "size": "1MiB"})
    )

    async def write(address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.BlockDeviceStub(channel)
            await stub.Write(pb.WriteRequest(volume="v", sector=100, data=b"h" * 4096))

    async def read(address: str) -> bytes:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.BlockDeviceStub(channel)
            reply = await stub.Read(pb.ReadRequest(volume="v", sector=100, sector_count=8))
            return bytes(reply.data)

    with ServerProcess.start(tmp_path, config) as server:
        asyncio.run(write(server.grpc))
        os.kill(server.pid, signal.SIGHUP)
        assert server.proc.wait(30) == 0, server.stderr_text()
    with ServerProcess.start(tmp_path, config) as server:
        assert asyncio.run(read(server.grpc)) == b"h" * 4096


def test_sigint_exits_zero(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\nsize=4096\n"
    )
    with ServerProcess.start(tmp_path, config) as server:
        os.kill(server.pid, signal.SIGINT)
        assert server.proc.wait(30) == 0


@contextlib.contextmanager
def silent_tier() -> Iterator[tuple[str, socket.socket]]:
    """A TCP listener that accepts connections and never answers: a remote layer aimed at
    it waits at attach (up to its attach timeout, 2 s), so the server is still starting."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(30)
        yield f"127.0.0.1:{listener.getsockname()[1]}", listener


def starting_stack(tmp_path: Path, target: str) -> Path:
    """A local sparse volume (opens at once) and one over ``target``."""
    local = {"kind": "sparse", "path": "local", "size": "1MiB"}
    return write_config(
        tmp_path, toml_volume("local", local) + toml_volume("r", remote(target, "base"))
    )


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"]
)
def test_a_signal_while_starting_ends_the_start_with_exit_0(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """README: SIGTERM/SIGINT stop gracefully, exit 0; while a remote tier is awaited at
    start too: one log line, no traceback, no ready file."""
    with silent_tier() as (target, listener):
        server = ServerProcess.start(tmp_path, starting_stack(tmp_path, target), wait=False)
        with server:
            connection, _ = listener.accept()  # the remote layer is attaching: still starting
            with connection:
                os.kill(server.pid, sig)
                assert server.proc.wait(30) == 0
            err = server.stderr_text()
    assert "Traceback" not in err, err
    assert "stopped while starting" in err
    assert not server.ready_file.exists()


async def test_a_start_cancelled_closes_what_it_opened(tmp_path: Path) -> None:
    """Cancelled while a remote tier is awaited, the start closes the volumes already open:
    their layers' locks are free for the next server. (Cancelled while a sparse layer is
    still opening in its thread, that layer is not closed: ``tierdisk serve`` exits then.)"""
    with silent_tier() as (target, listener):
        config = load_config(str(starting_stack(tmp_path, target)), environ={})
        server = Server(config)
        starting = asyncio.create_task(server.start())
        connection, _ = await asyncio.to_thread(listener.accept)
        with connection:
            for _ in range(1000):  # the local volume opens at once (10 s at most)
                if server.registry.ready_volumes():
                    break
                await asyncio.sleep(0.01)
            assert server.registry.ready_volumes(), "the local volume did not open"
            starting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(starting, 30)
    local_only = replace(config, volumes=config.volumes[:1])  # the same sparse layer again
    again = Server(local_only)
    await again.start()
    await again.stop(grace=1)


def test_closed_stdio_serve_stops_with_exit_0(tmp_path: Path) -> None:
    """Started with stdin and stdout closed (a supervisor's way), the server serves and stops
    on SIGTERM with exit 0 (libuv, given one of them for its own, used to abort: 134)."""
    config = write_config(
        tmp_path, "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\nsize=4096\n"
    )
    ready = tmp_path / "ready.json"
    cmd = [sys.executable, "-m", "tierdisk.service", "--config", str(config)]
    cmd += ["--listen", "127.0.0.1:0", "--ready-file", str(ready)]
    proc = subprocess.Popen(
        ["sh", "-c", 'exec "$0" "$@" <&- >&-', *cmd], stderr=subprocess.PIPE, cwd=tmp_path
    )
    server = ServerProcess(proc, ready)
    with server:
        server.wait_ready()
        assert server.terminate() == 0
        assert "Traceback" not in server.stderr_text()


def test_corrupt_stored_sector_is_data_loss(tmp_path: Path) -> None:
    """A layer that finds its stored data corrupt answers DATA_LOSS, never bytes."""
    config = write_config(
        tmp_path,
        "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='sqlite'\npath='v.db'\nsize='1MiB'\n",
    )

    async def write(address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.BlockDeviceStub(channel)
            await stub.Write(pb.WriteRequest(volume="v", sector=5, data=b"s" * 1024))
            await stub.Flush(pb.FlushRequest(volume="v"))

    async def read(address: str, sector: int) -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.BlockDeviceStub(channel)
            try:
                await stub.Read(pb.ReadRequest(volume="v", sector=sector, sector_count=1))
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

    with ServerProcess.start(tmp_path, config) as server:
        asyncio.run(write(server.grpc))
        assert server.terminate() == 0
    db = sqlite3.connect(tmp_path / "data" / "v.db")
    with db:  # a torn row: 100 bytes where a 512-byte sector belongs
        db.execute("UPDATE sectors SET data = ? WHERE sector = 6", (b"x" * 100,))
    db.close()
    with ServerProcess.start(tmp_path, config) as server:
        assert asyncio.run(read(server.grpc, 6)) == grpc.StatusCode.DATA_LOSS
        assert asyncio.run(read(server.grpc, 5)) == grpc.StatusCode.OK
        assert server.terminate() == 0


def test_unwritable_ready_file_stops_the_server_with_one_line(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\nsize=4096\n"
    )
    result = serve_once(
        tmp_path, "--config", str(config), "--ready-file", str(tmp_path / "absent" / "r.json")
    )
    assert result.returncode == 1, result.stderr
    assert "cannot write --ready-file" in result.stderr and "Traceback" not in result.stderr


def serving_with_ready_file(
    tmp_path: Path, config: Path, ready: Path, wrapper: Sequence[str] = ()
) -> ServerProcess:
    """``tierdisk serve`` with ``config`` and the ready file ``ready`` (which
    :meth:`ServerProcess.start` chooses itself), run through ``wrapper`` (a shell that sets
    limits, say); not yet waited for."""
    command = [*wrapper, sys.executable, "-m", "tierdisk.service", "--metrics", "", "--listen"]
    command += ["127.0.0.1:0", "--config", str(config), "--ready-file", str(ready)]
    return ServerProcess(subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE), ready)


def test_a_ready_file_that_is_a_folder_stops_the_server_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    config = write_config(
        tmp_path, "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\nsize=4096\n"
    )
    (tmp_path / "folder").mkdir()
    result = serve_once(tmp_path, "--config", str(config), "--ready-file", str(tmp_path / "folder"))
    assert result.returncode == 1, result.stderr
    assert "cannot write --ready-file" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "folder", "tierdisk.toml"]


def test_the_ready_file_is_never_written_through_a_name_planted_beside_it(
    tmp_path: Path,
) -> None:
    """A ready file in a folder others can write: a symlink planted at a name the server
    might use for its temporary file (``FILE.tmp`` was) must not make it overwrite the
    link's target."""
    config = write_config(
        tmp_path, "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\nsize=4096\n"
    )
    victim = tmp_path / "victim"
    victim.write_text("precious")
    ready = tmp_path / "ready.json"
    os.symlink(victim, f"{ready}.tmp")
    with serving_with_ready_file(tmp_path, config, ready) as server:
        server.wait_ready()
        assert json.loads(ready.read_text())["pid"] == server.pid
        assert server.terminate() == 0
    assert victim.read_text() == "precious"


def test_the_ready_file_names_a_running_server_only(tmp_path: Path) -> None:
    """The ready file is removed as the server stops; one left by a server that was killed
    is removed when the next one starts (here, a start that then fails), and one naming a
    server that runs is left: whoever waits for the file never takes a dead server's
    address."""
    config = write_config(
        tmp_path, "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\nsize=4096\n"
    )
    with ServerProcess.start(tmp_path, config) as server:
        assert json.loads(server.ready_file.read_text())["pid"] == server.pid
        assert server.terminate() == 0
    assert not server.ready_file.exists()
    with ServerProcess.start(tmp_path, config) as killed:
        killed.kill()
        stale = killed.ready_file
        assert stale.exists()  # SIGKILL: nothing removed it
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            address = f"127.0.0.1:{taken.getsockname()[1]}"
            live = tmp_path / "live.json"
            live.write_text(json.dumps({"pid": os.getpid()}))  # a process that runs
            others = [tmp_path / f"other-{i}.json" for i in range(4)]  # not a server's
            for other, text in zip(
                others,
                ['{"pid": 99999999999}', '{"pid": "abc"}', '{"pid": 1e400}', "[]"],
                strict=True,
            ):
                other.write_text(text)
            for ready in (stale, live, *others):
                result = serve_once(
                    tmp_path, "--config", str(config), "--ready-file", str(ready),
                    "--listen", address,
                )  # fmt: skip
                assert result.returncode == 1, result.stderr
                assert "Traceback" not in result.stderr
    assert not stale.exists() and live.exists() and all(other.exists() for other in others)


def test_clients_that_cancel_leave_no_error_tracebacks(tmp_path: Path) -> None:
    """A client cancelling large reads is routine: gRPC's "ExecuteBatchError raised in core"
    tracebacks (a reply that could not be sent) stay out of the server's log."""
    config = write_config(
        tmp_path, "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\nsize='8MiB'\n"
    )

    async def cancel_reads(address: str) -> None:
        options = [("grpc.max_receive_message_length", 64 << 20)]
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            stub = pb_grpc.BlockDeviceStub(channel)
            for r in range(40):
                calls = [
                    stub.Read(pb.ReadRequest(volume="v", sector=0, sector_count=8192))
                    for _ in range(8)
                ]
                await asyncio.sleep(0.002 * (r % 5))
                for call in calls:
                    call.cancel()
                await asyncio.gather(*calls, return_exceptions=True)

    with ServerProcess.start(tmp_path, config, "--log-level", "info") as server:
        asyncio.run(asyncio.wait_for(cancel_reads(server.grpc), 60))
        assert server.terminate() == 0
        log = server.stderr_text()
    assert "ExecuteBatchError" not in log and "Traceback" not in log, log[-2000:]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--nbd-tls-cert", "c.pem"], "--nbd-tls-cert is set but nbd_tls_key is not"),
        (["--nbd-tls-key", "k.pem"], "--nbd-tls-key is set but nbd_tls_cert is not"),
        (["--nbd-tls-ca", "ca.pem"], "--nbd-tls-ca is set but nbd_tls_cert and nbd_tls_key"),
        (
            ["--nbd", "", "--nbd-tls-cert", "c.pem", "--nbd-tls-key", "k.pem"],
            "--nbd-tls-cert is set but the NBD export is off",
        ),
        (
            ["--nbd-tls-cert", "c.pem", "--nbd-tls-key", "k.pem"],
            "cannot read --nbd-tls-cert DATA/c.pem: No such file or directory",
        ),
        (
            ["--nbd-tls-cert", "bad.pem", "--nbd-tls-key", "bad.pem"],
            "--nbd-tls-cert DATA/bad.pem holds no PEM certificate",
        ),
    ],
)
def test_bad_nbd_tls_settings_exit_2_with_one_line(
    tmp_path: Path, args: list[str], fragment: str
) -> None:
    """The NBD export's TLS keys (``--nbd-tls-*``): each broken rule or unusable file is a
    config error, one line naming the flag (and the file, resolved against the data dir),
    before anything is bound. (Certificates that do not fit: tests/test_nbd_tls.py.)"""
    data = tmp_path / "data"
    data.mkdir()
    (data / "bad.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    config = write_config(
        tmp_path, "[[volumes]]\nname='v'\n[[volumes.layers]]\nkind='ram'\nsize=4096\n"
    )
    result = serve_once(
        tmp_path, "--config", str(config), "--listen", "127.0.0.1:0", "--data-dir", str(data),
        "--nbd", "127.0.0.1:0", *args,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tierdisk serve: config error: "), lines[0]
    assert fragment.replace("DATA", str(data)) in lines[0], lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("kind", "flushed"), [("sqlite", False), ("sparse", False), ("sparse", True)]
)
def test_a_final_flush_that_fails_exits_1_naming_the_volume(
    tmp_path: Path, kind: str, flushed: bool
) -> None:
    """A stop whose final flush fails (here the layer's file was removed while served: what
    was written since lives only in a file with no name) exits 1 with a line naming the
    volume, not 0 as if every acknowledged write were durable: a supervisor must be able
    to tell. Also when the client flushed just before the removal and the stop comes at
    once (a sparse layer's idle flush may skip its look then: its last commit, at close,
    fails, and counts; it was a warning, exit 0, the entry clean)."""

    async def write(address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.BlockDeviceStub(channel)
            await stub.Write(pb.WriteRequest(volume="v", sector=0, data=b"w" * 512))
            if flushed:
                await stub.Flush(pb.FlushRequest(volume="v"))

    body = toml_volume("v", {"kind": kind, "path": "v.img", "size": "1MiB"})
    config = write_config(tmp_path, body)
    with ServerProcess.start(tmp_path, config) as server:
        asyncio.run(write(server.grpc))
        (tmp_path / "data" / "v.img").unlink()
        os.kill(server.pid, signal.SIGTERM)
        status = server.proc.wait(60)
        stderr = server.stderr_text()
        assert status == 1, stderr
        assert "the final flush failed for volume(s) 'v'" in stderr
        assert "v.img was removed while served" in stderr
    entry = json.loads((tmp_path / "data" / "write-verifiers.json").read_text())["volumes"]["v"]
    assert entry["clean"] is False


@pytest.mark.parametrize("recorded_by", ["this build", "an older build", "a torn record"])
def test_a_volume_whose_kept_file_went_missing_is_refused_not_made_empty(
    tmp_path: Path, recorded_by: str
) -> None:
    """A volume served from a layer file whose disk is not mounted at the next start (here:
    its folder moved away) is refused, naming the volume, layer and path, instead of
    starting empty on a new file; with the disk back it starts with its data. A read cache
    below the write path holds only copies, so its file is made again; a new path starts a
    layer empty on purpose. The same on the first start after an upgrade from a build that
    recorded no files (its entries: a verifier, no ``files``): that start once served the
    volume empty; and after a record left empty by an older build's crash while it
    rewrote it in place (a power cut, then the disk not mounted at the reboot)."""
    disk = tmp_path / "disk"
    body = toml_volume(
        "v",
        {"kind": "sparse", "path": str(disk / "v"), "size": "1MiB"},
        {"kind": "sparse", "path": str(disk / "cache"), "read_cache": True},
        {"kind": "raw", "path": str(tmp_path / "base.img"), "size": "1MiB"},
    )
    config = write_config(tmp_path, body)

    async def write_and_read(address: str, data: bytes | None) -> bytes:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.BlockDeviceStub(channel)
            if data is not None:
                await stub.Write(pb.WriteRequest(volume="v", sector=3, data=data))
            reply = await stub.Read(pb.ReadRequest(volume="v", sector=3, sector_count=1))
            return reply.data

    mine = b"m" * 512
    with ServerProcess.start(tmp_path, config) as server:
        assert asyncio.run(write_and_read(server.grpc, mine)) == mine
        assert server.terminate() == 0
    record = tmp_path / "data" / "write-verifiers.json"
    if recorded_by == "an older build":
        doc = json.loads(record.read_text())
        for entry in doc["volumes"].values():
            del entry["files"]
        record.write_text(json.dumps(doc))
    elif recorded_by == "a torn record":
        record.write_bytes(b"")
    os.rename(disk, tmp_path / "unmounted")
    disk.mkdir()  # the mount point stays
    result = serve_once(tmp_path, "--config", str(config), "--listen", "127.0.0.1:0")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    if recorded_by == "a torn record":
        assert f"{record} is not a write verifier file (it is empty)" in lines.pop(0)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"tierdisk serve: cannot start: volume 'v', layer 0: {disk / 'v'}")
    if recorded_by == "this build":
        assert "is missing, but this volume was served from it before" in lines[0]
    else:
        assert "is missing, but this volume may have been served from it before" in lines[0]
        assert "an older tierdisk wrote it, or a start that found the record damaged" in lines[0]
        assert "delete the volume's entry from write-verifiers.json" in lines[0]
    assert "is the disk that holds it mounted?" in lines[0]
    assert list(disk.iterdir()) == [], "nothing made in its place"

    disk.rmdir()
    os.rename(tmp_path / "unmounted", disk)
    (disk / "cache").unlink()  # the read cache's file, lost: made again
    (disk / "cache.map").unlink()
    with ServerProcess.start(tmp_path, config) as server:
        assert asyncio.run(write_and_read(server.grpc, None)) == mine
        assert server.terminate() == 0

    os.rename(disk / "v", tmp_path / "old-v")
    os.rename(disk / "v.map", tmp_path / "old-v.map")
    anew = write_config(tmp_path, body.replace(str(disk / "v"), str(disk / "v2")))
    with ServerProcess.start(tmp_path, anew) as server:
        assert asyncio.run(write_and_read(server.grpc, None)) == bytes(512)
        assert server.terminate() == 0


def test_a_kept_file_counts_whatever_its_role_or_its_volume_s_name_now(tmp_path: Path) -> None:
    """A read-cache top that took the volume's writes is recorded; made read-only (its top
    then holds copies only, by its role) the record keeps it, so with its disk missing the
    start is refused, as it is for the volume renamed: both started on an empty file."""
    disk = tmp_path / "disk"
    layers = (
        {"kind": "sparse", "path": str(disk / "c"), "size": "1MiB", "read_cache": True},
        {"kind": "raw", "path": str(tmp_path / "base.img"), "size": "1MiB"},
    )
    config = write_config(tmp_path, toml_volume("v", *layers))
    with ServerProcess.start(tmp_path, config) as server:
        with Client(server.grpc) as client:
            client.volume("v").write(3, b"m" * 512)
        assert server.terminate() == 0
    read_only = write_config(tmp_path, toml_volume("v", *layers, read_only=True))
    with ServerProcess.start(tmp_path, read_only) as server:
        assert server.terminate() == 0
    os.rename(disk, tmp_path / "unmounted")
    disk.mkdir()
    renamed = write_config(tmp_path, toml_volume("w", *layers), name="renamed.toml")
    for start, who in ((read_only, "this volume"), (renamed, "volume 'v'")):
        result = serve_once(tmp_path, "--config", str(start), "--listen", "127.0.0.1:0")
        assert result.returncode == 2, result.stderr
        line = result.stderr.strip()
        assert f"layer 0: {disk / 'c'} is missing, but {who} was served from it before" in line
    assert list(disk.iterdir()) == [], "nothing made in its place"


def test_with_a_json_log_the_line_a_refused_start_ends_with_is_json_too(tmp_path: Path) -> None:
    """A pipeline reading the log as JSON sees why the server did not start: the one line
    is a record of level error (it was plain text among JSON records)."""
    config = write_config(tmp_path, toml_volume("v", {"kind": "sparse", "path": "v", "size": 7}))
    result = serve_once(
        tmp_path, "--log-format", "json", "--config", str(config), "--listen", "127.0.0.1:0"
    )
    assert result.returncode == 2, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert records[-1]["level"] == "error"
    assert records[-1]["message"].startswith("tierdisk serve: config error: volume 'v'")


def test_a_layer_file_taken_out_of_the_stack_is_a_warning(tmp_path: Path) -> None:
    """Its data leaves the volume (the operator asked for it, but may not know a flushed
    write lives there): the start says which file, and that it is left as it is."""
    top, base = (
        {"kind": "sparse", "path": str(tmp_path / name), "size": "1MiB"} for name in ("t", "b")
    )
    with ServerProcess.start(tmp_path, write_config(tmp_path, toml_volume("v", top, base))) as s:
        assert s.terminate() == 0
    with ServerProcess.start(tmp_path, write_config(tmp_path, toml_volume("v", base))) as s:
        assert s.terminate() == 0
        warning = f"volume 'v': no layer of its stack is at {tmp_path / 't'}, which it was served"
        assert warning in s.stderr_text()
    with ServerProcess.start(tmp_path, write_config(tmp_path, toml_volume("v", base))) as s:
        assert s.terminate() == 0
        assert "no layer of its stack is at" not in s.stderr_text(), "said once: not recorded now"


def test_layers_swapped_by_an_edit_are_refused_and_a_layer_back_in_the_stack_is_a_warning(
    tmp_path: Path,
) -> None:
    """Two persistent layers in the other order than they were served in: reads would take
    the older layer's sectors over the newer one's, so the start is refused, naming both
    (exit 2, one line). A layer that left the stack in one start and is back in a later one
    (a top, or a read cache with copies only) may hide what the layers below took meanwhile:
    the start serves it and warns, once."""
    top, cache, base = (
        {"kind": "sparse", "path": str(tmp_path / name), "size": "1MiB", "read_cache": name == "c"}
        for name in ("t", "c", "b")
    )
    with ServerProcess.start(tmp_path, write_config(tmp_path, toml_volume("v", top, base))) as s:
        assert s.terminate() == 0
    swapped = write_config(tmp_path, toml_volume("v", base, top))
    result = serve_once(tmp_path, "--config", str(swapped), "--listen", "127.0.0.1:0")
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(
        f"tierdisk serve: config error: volume 'v', layer 1: {tmp_path / 't'} is below layer 0"
    )
    with ServerProcess.start(tmp_path, write_config(tmp_path, toml_volume("v", base))) as s:
        assert s.terminate() == 0  # the top leaves the stack (warned: "no layer … is at")
    for stack in ((cache, base), (base,), (top, cache, base)):
        with ServerProcess.start(tmp_path, write_config(tmp_path, toml_volume("v", *stack))) as s:
            assert s.terminate() == 0
            told = [ln for ln in s.stderr_text().splitlines() if "left the volume's stack" in ln]
        if stack[0] is top:  # back: the top, and the cache that left in the start before
            assert len(told) == 2, told
            assert f"layer 0 is at {tmp_path / 't'}, which left the volume's stack" in told[0]
            assert f"layer 1 is at {tmp_path / 'c'}, which left" in told[1]
        else:
            assert not told, told  # the cache's first start; then only the base


@pytest.mark.parametrize("limit", [12, 16, 23, 63])
def test_an_open_file_limit_too_low_to_start_is_one_line(tmp_path: Path, limit: int) -> None:
    """Below 64 descriptors gRPC's start crashed (SIGSEGV, SIGABRT) or a Python module could
    not be imported (naming the module): one line naming the limit instead, exit 1."""
    result = serve_once(tmp_path, "--listen", "127.0.0.1:0", open_files=limit)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == (
        f"tierdisk serve: cannot start: the open-file limit is {limit} (ulimit -n, systemd's "
        "LimitNOFILE=); tierdisk needs at least 64"
    )


def test_an_open_file_limit_below_what_the_config_may_use_is_a_warning(tmp_path: Path) -> None:
    """Past the limit, new NBD clients are closed before the greeting by the event loop,
    with no line of ours: the start says so, and serves."""
    config = write_config(tmp_path, toml_volume("v", ram("1MiB")))
    with ServerProcess.start(tmp_path, config, "--nbd", "127.0.0.1:0", open_files=100) as srv:
        assert srv.terminate() == 0
        err = srv.stderr_text()
        assert "the open-file limit is 100, and this config may use about 192" in err
        assert "new NBD clients are closed before the greeting" in err
    with ServerProcess.start(tmp_path, config, open_files=100) as srv:  # no NBD export
        assert srv.terminate() == 0
        told = [ln for ln in srv.stderr_text().splitlines() if "open-file limit" in ln]
        assert len(told) == 1 and "may use about 128" in told[0] and "NBD" not in told[0], told
    with ServerProcess.start(tmp_path, config, open_files=1000) as srv:
        assert srv.terminate() == 0
        assert "open-file limit" not in srv.stderr_text()


@pytest.mark.parametrize("kind", ["raw", "sparse", "sqlite", "ram"])
@pytest.mark.parametrize("size", [2**63, 2**53 * 512, 2**72])
def test_a_layer_size_over_the_limit_is_one_line_and_makes_no_file(
    tmp_path: Path, kind: str, size: int
) -> None:
    """Over 2**63 - 1 bytes or 2**53 - 1 sectors: refused with one line stating the limit,
    before a file is made (a sparse layer left a map of 2**64 bytes behind, which then
    refused every config), never an OverflowError traceback."""
    path = {} if kind == "ram" else {"path": f"v.{kind}"}
    config = write_config(tmp_path, toml_volume("v", {"kind": kind, "size": size, **path}))
    result = serve_once(tmp_path, "--config", str(config), "--listen", "127.0.0.1:0")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tierdisk serve: config error: volume 'v', layer 0: ")
    assert "is over the size limit of" in lines[0]
    data = tmp_path / "tierdisk-data"
    assert not data.exists() or [p.name for p in data.iterdir()] == []


def test_sectors_taken_from_an_existing_layer_larger_than_max_io_are_refused(
    tmp_path: Path,
) -> None:
    """A sector size the config does not state (an existing layer's, a remote origin's)
    is checked against max_io once the volume is open: larger, not even one sector could
    be read or written, so the start says so instead of serving a volume that refuses all
    I/O."""
    layer = {"kind": "sparse", "path": "big-sectors", "size": "8MiB"}
    made = write_config(
        tmp_path,
        "[server]\nlisten = '127.0.0.1:0'\nmax_io = '2MiB'\n"
        + toml_volume("v", {**layer, "sector_size": 2 << 20}),
    )
    with ServerProcess.start(tmp_path, made) as server:
        assert server.terminate() == 0
    smaller = write_config(
        tmp_path, "[server]\nlisten = '127.0.0.1:0'\nmax_io = '1MiB'\n" + toml_volume("v", layer)
    )
    data = str(tmp_path / "data")  # where ServerProcess made the layer
    result = serve_once(tmp_path, "--config", str(smaller), "--data-dir", data)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tierdisk serve: config error: volume 'v': its sector size ")
    assert "2097152 is larger than max_io 1048576" in lines[0]


def test_the_open_file_limit_is_raised_to_the_hard_limit(tmp_path: Path) -> None:
    """Every connection holds a descriptor: with the usual soft limit of 1,024, about
    1,000 idle connections locked every new client out. The server raises its soft limit
    to the hard one (the operator's choice)."""
    config = write_config(tmp_path, toml_volume("v", ram("1MiB")))
    ready = tmp_path / "ready.json"
    limited = ["sh", "-c", 'ulimit -S -n 1024 && ulimit -H -n 4096 && exec "$@"', "sh"]
    with serving_with_ready_file(tmp_path, config, ready, limited) as server:
        server.wait_ready()
        limits = Path(f"/proc/{server.pid}/limits").read_text()
        line = next(row for row in limits.splitlines() if row.startswith("Max open files"))
        assert line.split()[3:5] == ["4096", "4096"], line
        assert server.terminate() == 0


@pytest.mark.parametrize(
    ("body", "flags", "needle"),
    [
        (
            "[server]\nlisten = '127.0.0.1:0'\nnbd_max_connections = " + "9" * 5000,
            [],
            "5000 digits",
        ),
        ("", ["--nbd-max-connections", "9" * 5000], "too large: 5000 digits"),
        (
            "[server]\nlisten = '127.0.0.1:0'\nnbd = '127.0.0.1:" + "9" * 5000 + "'",
            [],
            "out of range",
        ),
    ],
)
def test_numbers_of_thousands_of_digits_are_one_config_error(
    tmp_path: Path, body: str, flags: list[str], needle: str
) -> None:
    """Python will not read an integer of over 4,300 digits (ValueError): one line, exit 2,
    never a traceback."""
    config = write_config(tmp_path, body + "\n" + toml_volume("v", ram("1MiB")))
    result = serve_once(tmp_path, "--config", str(config), "--listen", "127.0.0.1:0", *flags)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr


def test_a_ready_file_of_the_longest_name_is_written(tmp_path: Path) -> None:
    """The temporary file has a name of its own length: a ready file of 255 bytes works."""
    config = write_config(tmp_path, toml_volume("v", ram("1MiB")))
    ready = tmp_path / ("r" * 250 + ".json")
    with serving_with_ready_file(tmp_path, config, ready) as server:
        server.wait_ready()
        assert json.loads(ready.read_text())["pid"] == server.pid
        assert server.terminate() == 0
