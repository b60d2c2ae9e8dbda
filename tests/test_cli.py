"""The ``tierdisk`` command against a real server (a ``tierdisk serve`` child process):
import then export byte-identical with holes, a sparse import (from a file or stdin) that
unmaps the image's holes, or writes zeros there on a volume whose unmap would not read back
as zeros (a layer double in an in-process server), export to devices, pipes and stdout, a
failed or interrupted export (its server cut off, or stalled, by a proxy) leaving IMAGE as it
was and no temporary file, an export onto the raw file the volume is served from losing
nothing, ``-`` for stdin/stdout, read/write through files and pipes, a failed write or import
saying what was written (a failing layer double), every verb's output, resize refusing to
shrink without ``--shrink``, one-line errors (the volume named once), ``watch`` ended by
Ctrl-C or by the server, and the progress bar on a real pseudo-terminal: for import, for read
to a pipe (none when stdout is the terminal; cut to a narrow terminal's width), for write
from a pipe (bytes so far, no total) or a file (with its total)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import json
import os
import pty
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import grpc
import pytest
from certs import Certs, make_certs
from grpc_health.v1 import health, health_pb2_grpc
from servers import (
    FRAGMENT,
    FRAGMENT_GAP,
    ServerProcess,
    fragmented_extents,
    fragmented_server,
    free_port,
    metric,
    ram,
    running_server,
    toml_volume,
    write_config,
)
from stacks import MapLayer, pattern

from tierdisk.client.cli import main as cli_main
from tierdisk.service.errors import NoSpace, StorageError
from tierdisk.service.layer import UnmapBehavior
from tierdisk.service.volume import LayerEntry, Volume

MiB = 1 << 20
TIERDISK = [sys.executable, "-m", "tierdisk.client"]
SIGNALS_AS_THEY_COME = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "[signal.signal(s, signal.SIG_DFL) for s in (signal.SIGTERM, signal.SIGHUP)]\n"
)
"""Python that sets SIGINT, SIGTERM and SIGHUP to Python's own handling, whatever the test
runner inherited: the CLI does not take a signal its parent ignores (as a shell does SIGINT
for ``cmd &``, and ``nohup`` SIGHUP)."""
TIERDISK_SIGNALLED = [
    sys.executable,
    "-c",
    SIGNALS_AS_THEY_COME + "from tierdisk.client.cli import main; sys.exit(main())",
]
"""``TIERDISK`` for the tests that press Ctrl-C (send SIGINT), or send SIGTERM or SIGHUP
(:data:`SIGNALS_AS_THEY_COME` first)."""

STOPS = [
    pytest.param(signal.SIGINT, 130, "interrupted", id="ctrl-c"),
    pytest.param(signal.SIGTERM, 128 + signal.SIGTERM, "interrupted by SIGTERM", id="sigterm"),
    pytest.param(signal.SIGHUP, 128 + signal.SIGHUP, "interrupted by SIGHUP", id="sighup"),
]
"""The signals that stop a verb, each with the exit status and the words that start its
one line."""

VOLUMES = "\n".join(
    (
        toml_volume("disk", ram("16MiB")),
        toml_volume("rw", ram("4MiB")),
        toml_volume("ro", ram("1MiB"), read_only=True),
        toml_volume("grow", ram("1MiB")),
        toml_volume("watched", ram("1MiB")),
        toml_volume("shrink", ram("1MiB")),
        toml_volume("exp", ram("8MiB")),
        toml_volume("intr", ram("64MiB")),
        toml_volume("sparse", {"kind": "sparse", "path": "sparse.img", "size": "16MiB"}),
        toml_volume("piped", ram("4MiB")),
    )
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("cli-server")
    with ServerProcess.start(tmp, write_config(tmp, VOLUMES)) as srv:
        yield srv


def tierdisk(
    server: ServerProcess,
    *args: str,
    stdin: bytes = b"",
    check: bool = True,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "TIERDISK_SERVER"}
    env["TIERDISK_SERVER"] = server.grpc
    result = subprocess.run(
        [*TIERDISK, *args], input=stdin, capture_output=True, timeout=120, env=env, cwd=cwd
    )
    if check:
        assert result.returncode == 0, result.stderr.decode()
        assert result.stderr == b""
    return result


def one_line_error(
    result: subprocess.CompletedProcess[bytes], *needles: str, returncode: int = 1
) -> str:
    assert result.returncode == returncode, result.stderr.decode()
    err = result.stderr.decode()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tierdisk: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


def fs_supports_holes(folder: Path) -> bool:
    probe = folder / "hole-probe"
    with open(probe, "wb") as f:
        f.truncate(8 * MiB)
    supported = os.stat(probe).st_blocks * 512 < MiB
    probe.unlink()
    return supported


# -- listing and info ------------------------------------------------------------------


def test_volumes_lists_one_per_line_name_first(server: ServerProcess) -> None:
    lines = tierdisk(server, "volumes").stdout.decode().splitlines()
    assert sorted(line.split("\t")[0] for line in lines) == [
        "disk",
        "exp",
        "grow",
        "intr",
        "piped",
        "ro",
        "rw",
        "shrink",
        "sparse",
        "watched",
    ]
    ro = next(line for line in lines if line.startswith("ro\t")).split("\t")
    assert ro[1:4] == ["2048", "512", "ro"]


ORPHAN = """
[[volumes]]
name = "orphan"
  [[volumes.layers]]
  kind = "ram"
  [[volumes.layers]]
  kind = "remote"
  target = "127.0.0.1:{port}"
  volume = "base"
  timeout = 1

[[volumes]]
name = "local"
  [[volumes.layers]]
  kind = "ram"
  size = "1MiB"
"""


def test_volumes_shows_a_volume_not_attached_yet_as_not_ready(tmp_path: Path) -> None:
    """A volume whose remote tier is down is listed (name only, sector_size 0), not shown
    as an empty volume."""
    config = write_config(tmp_path, ORPHAN.format(port=free_port()))
    with ServerProcess.start(tmp_path, config) as srv:
        lines = tierdisk(srv, "volumes").stdout.decode().splitlines()
    assert lines == ["orphan\t(not ready)", "local\t2048\t512\trw\t1.0 MiB"]


def test_info_prints_every_field_sector_count_first(server: ServerProcess) -> None:
    lines = tierdisk(server, "info", "disk").stdout.decode().splitlines()
    keys = [line.split(": ", 1)[0] for line in lines]
    assert keys[:2] == ["sector_count", "sector_size"]
    assert set(keys) == {
        "name",
        "sector_size",
        "sector_count",
        "physical_sector_size",
        "read_only",
        "fua_respected",
        "disk_id",
        "unmap_behavior",
        "optimal_unmap_sectors",
        "volatile",
    }  # (and "problem", when the volume refuses all I/O until a restart: none here)
    values = dict(line.split(": ", 1) for line in lines)
    assert values["sector_count"] == str(16 * MiB // 512)
    assert values["sector_size"] == "512"
    assert values["read_only"] == "false"
    assert values["volatile"] == "true"  # a ram volume: a restart loses it
    assert values["unmap_behavior"].startswith("UNMAP_BEHAVIOR_")


# -- import / export -------------------------------------------------------------------


def test_import_then_export_is_byte_identical_with_holes(
    server: ServerProcess, tmp_path: Path
) -> None:
    image = tmp_path / "in.img"
    head, tail = os.urandom(MiB), os.urandom(MiB + 512)
    image.write_bytes(head + bytes(5 * MiB) + tail)  # 7 MiB + 512: zeros in the middle
    size = image.stat().st_size
    tierdisk(server, "import", "disk", str(image))

    # the volume keeps its size; everything past the image is unallocated
    info = dict(
        line.split(": ", 1)
        for line in tierdisk(server, "info", "disk").stdout.decode().split("\n")
        if line
    )
    assert info["sector_count"] == str(16 * MiB // 512)
    runs = [
        tuple(map(int, line.split("\t")))
        for line in tierdisk(server, "map", "disk").stdout.decode().splitlines()
    ]
    assert sum(count for _, count, _ in runs) == 16 * MiB // 512
    assert [r for r in runs if r[0] >= size // 512] == [(size // 512, (16 * MiB - size) // 512, -1)]

    out = tmp_path / "out.img"
    tierdisk(server, "export", "disk", str(out))
    exported = out.read_bytes()
    assert len(exported) == 16 * MiB  # sector_count x sector_size
    assert exported[:size] == image.read_bytes()
    assert exported[size:] == bytes(16 * MiB - size)
    if fs_supports_holes(tmp_path):
        # holes: the 5 MiB of zeros and the unallocated 9 MiB are not written
        assert out.stat().st_blocks * 512 <= 3 * MiB + 64 * 1024
    # a second export over the same file gives the same bytes
    tierdisk(server, "export", "disk", str(out))
    assert out.read_bytes() == exported


def test_import_refuses_partial_sectors_and_oversized_images(
    server: ServerProcess, tmp_path: Path
) -> None:
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    one_line_error(tierdisk(server, "import", "rw", str(odd), check=False), str(odd), "512")
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(8 * MiB)
    one_line_error(tierdisk(server, "import", "rw", str(big), check=False), str(big), "'rw'")


# Data islands at offsets that are not sector (nor block) aligned, between big holes; the
# last two sit 4 KiB apart (a hole shorter than 64 KiB: written as zeros with them).
ISLANDS = [
    (300 * 1024 + 1000, 4000),  # starts and ends mid-sector, after a 300 KiB hole
    (3 * MiB + 777, 200 * 1024),
    (7 * MiB - 10, 20),  # straddles a block boundary
    (7 * MiB + 8 * 1024 + 100, 100),
]


def make_sparse(path: Path, size: int, islands: list[tuple[int, int]]) -> bytes:
    """A file of ``size`` bytes, holes but for random data at ``islands`` (offset, length);
    returns its bytes."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in islands:
            f.seek(offset)
            f.write(os.urandom(length))
    return path.read_bytes()


def allocation(server: ServerProcess, volume: str) -> list[tuple[int, int, int]]:
    """``tierdisk map VOL``: (sector, count, depth) runs, depth -1 where no layer holds them."""
    out = tierdisk(server, "map", volume).stdout.decode()
    return [(a, b, c) for a, b, c in (map(int, line.split("\t")) for line in out.splitlines())]


def present(runs: list[tuple[int, int, int]], lo: int, hi: int) -> int:
    """How many of sectors ``[lo, hi)`` some layer holds."""
    return sum(max(0, min(hi, s + n) - max(lo, s)) for s, n, depth in runs if depth >= 0)


def fill(server: ServerProcess, volume: str, size: int) -> bytes:
    """Write ``size`` bytes of non-zero data onto ``volume`` from sector 0; return them."""
    old = b"\xa5" * size
    tierdisk(server, "write", volume, "0", stdin=old)
    return old


def sparse_data_file(server: ServerProcess, volume: str) -> Path:
    """The data file of ``volume``'s top (sparse) layer (Inspect gives its absolute path)."""
    tree = json.loads(tierdisk(server, "inspect", volume).stdout)
    return Path(tree["layers"][0]["path"])


def assert_holes_unallocated(
    server: ServerProcess, volume: str, image: Path, start: int, islands: list[tuple[int, int]]
) -> None:
    """After importing ``image`` from byte ``start`` into ``volume`` (a sparse layer over
    nothing, full of old data before): each island's sectors are held, the holes are not
    (but for a few KiB where an island shares a block, or holes under 64 KiB)."""
    runs = allocation(server, volume)
    size = image.stat().st_size - start
    for offset, length in islands:
        lo, hi = (offset - start) // 512, -(-(offset + length - start) // 512)
        assert present(runs, lo, hi) == hi - lo, (offset, length, runs)
    # the islands hold about 220 KiB (228 KiB of 4 KiB blocks); the rest were holes
    assert present(runs, 0, size // 512) * 512 <= 512 * 1024, runs
    assert present(runs, 1 * MiB // 512, (3 * MiB - 4096) // 512) == 0, runs
    # the layer's data file: only the islands, and what lies past the image (old data)
    past = 16 * MiB - size
    data_file = sparse_data_file(server, volume)
    assert data_file.stat().st_blocks * 512 <= past + 512 * 1024


def test_import_of_a_sparse_file_unmaps_its_holes(server: ServerProcess, tmp_path: Path) -> None:
    """A sparse image over a volume full of older data: a full read gives the image (zeros in
    its holes) and then the older data past its end; the holes take no space."""
    old = fill(server, "sparse", 16 * MiB)
    image = tmp_path / "sparse.img"
    expected = make_sparse(image, 12 * MiB, ISLANDS)
    tierdisk(server, "import", "sparse", str(image))
    got = tierdisk(server, "read", "sparse", "0", str(16 * MiB // 512)).stdout
    assert got[: 12 * MiB] == expected
    assert got[12 * MiB :] == old[12 * MiB :]  # past the image the volume is left alone
    if fs_supports_holes(tmp_path):
        assert_holes_unallocated(server, "sparse", image, 0, ISLANDS)
    # a fully sparse image: nothing allocated in its range, all zeros
    image.unlink()
    expected = make_sparse(image, 8 * MiB, [])
    tierdisk(server, "import", "sparse", str(image))
    assert tierdisk(server, "read", "sparse", "0", str(8 * MiB // 512)).stdout == expected
    if fs_supports_holes(tmp_path):
        assert present(allocation(server, "sparse"), 0, 8 * MiB // 512) == 0


def test_import_of_a_sparse_file_on_stdin_unmaps_its_holes(
    server: ServerProcess, tmp_path: Path
) -> None:
    """Stdin redirected from a sparse file, positioned 100 bytes in: the image is the rest of
    the file, whose holes (block aligned in the file) start and end mid-sector in the image;
    only whole sectors are unmapped, and it reads back byte for byte."""
    old = fill(server, "sparse", 16 * MiB)
    start = 100
    image = tmp_path / "sparse.img"
    islands = [(0, start)] + [(offset + start, length) for offset, length in ISLANDS]
    islands.append((start + 12 * MiB - 3000, 3000))  # data up to the end
    content = make_sparse(image, start + 12 * MiB, islands)
    fd = os.open(image, os.O_RDONLY)
    try:
        os.lseek(fd, start, os.SEEK_SET)
        env = {**os.environ, "TIERDISK_SERVER": server.grpc}
        result = subprocess.run(
            [*TIERDISK, "import", "sparse", "-"], stdin=fd, capture_output=True, env=env
        )
        assert result.returncode == 0 and result.stderr == b"", result.stderr.decode()
        assert os.lseek(fd, 0, os.SEEK_CUR) == len(content)  # read to the end, as cat would
    finally:
        os.close(fd)
    got = tierdisk(server, "read", "sparse", "0", str(16 * MiB // 512)).stdout
    assert got[: 12 * MiB] == content[start:]
    assert got[12 * MiB :] == old[12 * MiB :]
    if fs_supports_holes(tmp_path):
        assert_holes_unallocated(server, "sparse", image, start, islands[1:])


@pytest.mark.parametrize(
    "behavior", [UnmapBehavior.IGNORED, UnmapBehavior.ANY], ids=["ignored", "any"]
)
async def test_import_writes_zeros_in_holes_where_unmap_would_not_give_zeros(
    tmp_path: Path, behavior: UnmapBehavior
) -> None:
    """Where an unmap would not read back as zeros, the holes of a sparse image are written
    as zeros. No layer kind reports anything but ZEROES (a remote passes on its origin's),
    so the volume here is a layer double, full of old data, in an in-process server."""
    async with running_server(tmp_path / "srv", toml_volume("odd", ram("4MiB"))) as srv:
        layer = MapLayer(8192, full=lambda s: b"\xa5" * 512, unmap_behavior=behavior)
        replaced = srv.registry.get("odd")
        srv.registry.set_ready(await Volume.open("odd", [LayerEntry(layer)]))
        await replaced.close()
        image = tmp_path / "sparse.img"
        expected = make_sparse(image, 3 * MiB + 512, [(MiB + 777, 5000)])
        env = {**os.environ, "TIERDISK_SERVER": srv.grpc_address}

        def cli(*args: str) -> bytes:
            result = subprocess.run([*TIERDISK, *args], capture_output=True, env=env, timeout=60)
            assert result.returncode == 0 and result.stderr == b"", result.stderr.decode()
            return result.stdout

        await asyncio.to_thread(cli, "import", "odd", str(image))
        got = await asyncio.to_thread(cli, "read", "odd", "0", str(8192))
    assert got[: len(expected)] == expected
    assert got[len(expected) :] == b"\xa5" * (4 * MiB - len(expected))


class _HeldFlush(MapLayer):
    """A layer whose flushes wait for :attr:`release` (a slow disk, a hung tier);
    :attr:`entered` is set when one starts."""

    def __init__(self, sectors: int) -> None:
        super().__init__(sectors)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def flush(self) -> None:
        self.entered.set()
        await self.release.wait()
        await super().flush()


@pytest.mark.parametrize(("sig", "status", "words"), STOPS)
@pytest.mark.parametrize("verb", ["write", "import"])
async def test_a_stop_during_the_final_flush_says_everything_was_written(
    tmp_path: Path, verb: str, sig: signal.Signals, status: int, words: str
) -> None:
    """``write`` and ``import`` end with a flush; a stop signal while it runs (after a
    large import the bar sits at 100% then) says that all of it was written and that it
    may not be durable yet, not only ``interrupted``."""
    async with running_server(tmp_path / "srv", toml_volume("slow", ram("4MiB"))) as srv:
        layer = _HeldFlush(8192)
        replaced = srv.registry.get("slow")
        srv.registry.set_ready(await Volume.open("slow", [LayerEntry(layer)]))
        await replaced.close()
        src = tmp_path / "src.bin"
        src.write_bytes(os.urandom(MiB))
        args = ["write", "slow", "0", "-i", str(src)] if verb == "write" else ["import", "slow"]
        args += [str(src)] if verb == "import" else []
        env = {**os.environ, "TIERDISK_SERVER": srv.grpc_address}
        proc = await asyncio.create_subprocess_exec(
            *TIERDISK_SIGNALLED, *args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
        )
        try:
            await asyncio.wait_for(layer.entered.wait(), 30)
            proc.send_signal(sig)
            _, err = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            layer.release.set()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == status, err.decode()
    # and the command that flushes it later, telling of writes lost meanwhile
    verifier = f"{srv.registry.get('slow').write_verifier:#018x}"
    assert err.decode().splitlines() == [
        f"tierdisk: {words}; all of it was written, but the flush after it ({verb}) did not "
        f"end: it may not be durable yet (`tierdisk flush slow --verifier {verifier}`)"
    ]


class CuttingProxy:
    """A TCP proxy in front of the server that, once ``limit`` bytes have come back from
    it, drops every connection and stops listening: to the client, the server went away
    mid-transfer, at a point the test controls. With ``stall``, it holds the connections
    open instead and passes nothing more until it is closed: the transfer hangs there."""

    def __init__(self, target: str, limit: int, *, stall: bool = False) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._limit = limit
        self._stall = stall  # at the limit, hold the connections open, silent, till the end
        self._released = threading.Event()
        self._passed = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.cut = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self.cut.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            upstream = socket.create_connection(self._target)
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst, counted in ((client, upstream, False), (upstream, client, True)):
                thread = threading.Thread(target=self._pump, args=(src, dst, counted), daemon=True)
                thread.start()
                self._threads.append(thread)
        self._listener.close()

    def _pump(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if counted:
                    with self._lock:
                        self._passed += len(data)
                        over = self._passed >= self._limit
                    if over:
                        if self._stall:
                            self.cut.set()
                            self._released.wait(60)
                        self._drop()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def _drop(self) -> None:
        self.cut.set()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> CuttingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self._released.set()
        self._drop()
        for thread in self._threads:
            thread.join(5)
        for sock in self._sockets:
            sock.close()


def export_through_a_cut(
    server: ServerProcess, target: str, limit: int = 2 * MiB
) -> subprocess.CompletedProcess[bytes]:
    """``tierdisk export exp TARGET`` whose server goes away after ``limit`` bytes."""
    with CuttingProxy(server.grpc, limit) as proxy:
        result = tierdisk(
            server, "--server", proxy.address, "--retries", "0", "export", "exp", target,
            check=False,
        )  # fmt: skip
        assert proxy.cut.is_set()  # it did fail mid-way
    return result


@pytest.fixture(scope="module")
def exp_data(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The 8 MiB volume `exp`, every sector written (allocated)."""
    data = os.urandom(8 * MiB)
    src = tmp_path_factory.mktemp("exp") / "exp.bin"
    src.write_bytes(data)
    tierdisk(server, "write", "exp", "0", "-i", str(src))
    return data


def temp_files(folder: Path) -> list[str]:
    """The temporary files an export left in ``folder`` (``.NAME.tierdisk-export-…``)."""
    return [name for name in os.listdir(folder) if ".tierdisk-export-" in name]


def test_failed_export_leaves_the_image_as_it_was(
    server: ServerProcess, exp_data: bytes, tmp_path: Path
) -> None:
    """The export is written beside IMAGE and renamed over it only once complete: a failure
    leaves an older IMAGE byte for byte, creates none, and leaves no temporary file."""
    out = tmp_path / "out.img"
    line = one_line_error(export_through_a_cut(server, str(out)), "volume 'exp'")
    assert line.endswith(f"; '{out}' was not created"), line
    assert os.listdir(tmp_path) == []

    old = os.urandom(3 * MiB + 512)
    out.write_bytes(old)
    out.chmod(0o640)
    line = one_line_error(export_through_a_cut(server, str(out)), "volume 'exp'")
    assert line.endswith(f"; '{out}' is unchanged"), line
    assert out.read_bytes() == old
    assert os.listdir(tmp_path) == ["out.img"]
    # a volume that does not exist: nothing is created
    one_line_error(tierdisk(server, "export", "nope", str(out), check=False), "volume 'nope'")
    assert out.read_bytes() == old and os.listdir(tmp_path) == ["out.img"]

    # unless the server stays, the export completes as usual, keeping the file's mode
    tierdisk(server, "export", "exp", str(out))
    assert out.read_bytes() == exp_data
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert os.listdir(tmp_path) == ["out.img"]


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("sig", "status", "words"), STOPS)
def test_export_interrupted_leaves_the_image_as_it_was(
    server: ServerProcess,
    exp_data: bytes,
    tmp_path: Path,
    sig: signal.Signals,
    status: int,
    words: str,
) -> None:
    """Ctrl-C mid-export: "interrupted", exit 130, the old IMAGE intact, no temporary file;
    SIGTERM and SIGHUP alike ("interrupted by SIGTERM", exit 143; SIGHUP: 129)."""
    out = tmp_path / "out.img"
    old = os.urandom(MiB)
    out.write_bytes(old)

    def mid_export() -> None:
        assert temp_files(tmp_path)  # it is writing beside IMAGE, not into it

    rc, err = stopped_through_a_stall(server, sig, "export", "exp", str(out), then=mid_export)
    assert rc == status, err
    assert err.splitlines() == [f"tierdisk: {words}"]
    assert out.read_bytes() == old
    assert os.listdir(tmp_path) == ["out.img"]


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


def stopped_through_a_stall(
    server: ServerProcess, sig: signal.Signals, *argv: str, then: Callable[[], object]
) -> tuple[int, str]:
    """``tierdisk --server PROXY ARGV`` whose server goes silent after 2 MiB have come back
    (the proxy holds the connection open): then ``then()``, then ``sig``; the exit status
    and stderr."""
    env = {**os.environ, "TIERDISK_SERVER": server.grpc}
    with CuttingProxy(server.grpc, 2 * MiB, stall=True) as proxy:
        proc = subprocess.Popen(
            [*TIERDISK_SIGNALLED, "--server", proxy.address, *argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            assert proxy.cut.wait(60)  # 2 MiB of the volume have come back: mid-way
            then()
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    return proc.returncode, err.decode()


@pytest.mark.parametrize(("sig", "status", "words"), STOPS)
def test_an_interrupted_read_says_how_much_its_output_file_holds(
    server: ServerProcess, tmp_path: Path, sig: signal.Signals, status: int, words: str
) -> None:
    """``read -o FILE`` stopped mid-way (its server has gone silent): FILE, truncated at the
    start, holds what came before, and the one line says how much."""
    out = tmp_path / "out.img"
    out.write_bytes(b"precious" * 1000)
    argv = ("read", "exp", "0", "16384", "-o", str(out))
    rc, err = stopped_through_a_stall(server, sig, *argv, then=lambda: time.sleep(0.5))
    assert rc == status, err
    size = out.stat().st_size
    assert err.splitlines() == [
        f"tierdisk: {words}; file '{out}' holds only the {size} bytes written before"
    ]
    assert size < 16384 * 512


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("sig", "status", "words"), STOPS)
@pytest.mark.parametrize("verb", ["read", "export"])
def test_a_verb_writing_to_a_stalled_pipe_stops_on_a_signal(
    server: ServerProcess,
    exp_data: bytes,
    verb: str,
    sig: signal.Signals,
    status: int,
    words: str,
) -> None:
    """``export VOL - | ssh …`` with the reader stalled: a stop signal ends the verb at
    once, with its one line and status (stdout was written on the event loop's thread, so
    the signal waited until the pipe moved again, or closed); the line says how many bytes
    went out (the reader cannot tell a short stream from a whole one)."""
    args = (
        ["read", "exp", "0", str(len(exp_data) // 512)]
        if verb == "read"
        else ["export", "exp", "-"]
    )
    read_end, write_end = os.pipe()  # a pipe nobody reads: it takes 64 KiB, then stalls
    pipe_bytes = fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)
    try:
        returncode, err = _stopped_once_stalled(server.grpc, args, sig, read_end, stdout=write_end)
    finally:
        os.close(read_end)
    assert returncode == status, err
    # what the pipe took (it was never read), and what the whole would have been
    assert err.splitlines() == [
        f"tierdisk: {words}; {pipe_bytes} of {len(exp_data)} bytes went to stdout before"
    ]


def _stopped_once_stalled(
    address: str,
    args: list[str],
    sig: signal.Signals,
    reader: int,
    *,
    stdout: int | None = None,
) -> tuple[int, str]:
    """Run ``tierdisk ARGS`` against the server at ``address`` (its stdout the descriptor
    ``stdout``, closed here once handed over), whose output stalls: ``reader`` is the read
    end of the pipe or FIFO it writes, which nobody reads. Once that is full (the command
    waits on it: never a false pass, and no guess at how long a loaded machine takes to get
    there), send it ``sig``; its exit status and stderr. It must end within 10 s of the
    signal, not when the output moves again (never, here)."""
    env = {**os.environ, "TIERDISK_SERVER": address}
    try:
        proc = subprocess.Popen(
            [*TIERDISK_SIGNALLED, *args], stdout=stdout, stderr=subprocess.PIPE, env=env
        )
    finally:
        if stdout is not None:
            os.close(stdout)
    try:
        _wait_until_full(reader, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return proc.returncode, err.decode()


def _wait_until_full(reader: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Return once the pipe whose read end is ``reader`` holds all it can take (what
    ``proc`` wrote into it), and a moment more for ``proc`` to block on its next write;
    fail if ``proc`` ends first or ``timeout`` seconds pass."""
    capacity = fcntl.fcntl(reader, fcntl.F_GETPIPE_SZ)
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "the command ended before its output stalled"
        held = struct.unpack("i", fcntl.ioctl(reader, termios.FIONREAD, b"\0\0\0\0"))[0]
        if held >= capacity:
            break
        assert time.monotonic() < deadline, f"the pipe holds {held} of {capacity} bytes"
        time.sleep(0.02)
    time.sleep(0.2)


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("sig", "status", "words"), STOPS)
def test_a_read_into_a_stalled_fifo_stops_on_a_signal(
    server: ServerProcess,
    exp_data: bytes,
    tmp_path: Path,
    sig: signal.Signals,
    status: int,
    words: str,
) -> None:
    """``read … -o FIFO`` whose reader stalls: a stop signal ends it at once (it was
    written on the event loop's thread: the signal waited for the reader to go away, and
    the verb then said only "Broken pipe"), saying how much went there."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # opened, never read
    try:
        pipe_bytes = fcntl.fcntl(reader, fcntl.F_GETPIPE_SZ)
        args = ["read", "exp", "0", str(len(exp_data) // 512), "-o", str(fifo)]
        returncode, err = _stopped_once_stalled(server.grpc, args, sig, reader)
    finally:
        os.close(reader)
    assert returncode == status, err
    assert err.splitlines() == [
        f"tierdisk: {words}; {pipe_bytes} of {len(exp_data)} bytes went to file '{fifo}' before"
    ]


def test_no_flush_whose_verifier_cannot_be_printed_says_it_was_written(
    server: ServerProcess,
) -> None:
    """``write --no-flush`` prints the write verifier for a later flush; when stdout
    fails, the one line says the data was written and names the flush to run."""
    env = {**os.environ, "TIERDISK_SERVER": server.grpc}
    with open("/dev/full", "wb") as full:
        result = subprocess.run(
            [*TIERDISK, "write", "--no-flush", "rw", "0"],
            input=bytes(512),
            stdout=full,
            stderr=subprocess.PIPE,
            env=env,
            timeout=60,
        )
    line = one_line_error(result, "write: all of it was written (not flushed: `tierdisk flush")
    assert re.search(r"flush rw --verifier 0x[0-9a-f]{16}`\)", line), line
    assert line.endswith("its write verifier could not be printed: stdout: No space left on device")


@pytest.mark.parametrize(("sig", "status", "words"), STOPS)
@pytest.mark.parametrize("verb", ["read", "export", "write", "import"])
def test_a_verb_opening_a_fifo_nobody_opens_stops_on_a_signal(
    server: ServerProcess,
    tmp_path: Path,
    verb: str,
    sig: signal.Signals,
    status: int,
    words: str,
) -> None:
    """``-o FIFO``, ``-i FIFO`` or IMAGE a FIFO whose other end nobody opens: the open
    blocks, and a stop signal still ends the verb at once, with its one line and status
    (opened on the event loop's thread, the open was retried after each signal and the
    verb ran on until SIGKILL or a second Ctrl-C)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    args = {
        "read": ["read", "exp", "0", "8", "-o", str(fifo)],
        "export": ["export", "exp", str(fifo)],
        "write": ["write", "exp", "0", "-i", str(fifo)],
        "import": ["import", "exp", str(fifo)],
    }[verb]
    env = {**os.environ, "TIERDISK_SERVER": server.grpc}
    proc = subprocess.Popen(
        [*TIERDISK_SIGNALLED, *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env
    )
    try:
        time.sleep(1.0)  # it waits in the open (never a false pass)
        assert proc.poll() is None
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == status, err.decode()
    assert err.decode().splitlines()[0].startswith(f"tierdisk: {words}"), err.decode()


def test_export_never_creates_or_replaces_a_name_in_dev(
    server: ServerProcess, exp_data: bytes
) -> None:
    """/dev holds devices and links to open descriptors (/dev/stdout): an export writes
    there in place, so a name that does not exist is an error, not a new file."""
    name = f"/dev/tierdisk-test-{os.getpid()}-{os.urandom(4).hex()}"
    result = tierdisk(server, "export", "exp", name, check=False)
    one_line_error(result, name)
    assert not os.path.lexists(name)
    assert not [n for n in os.listdir("/dev") if ".tierdisk-export-" in n]


def test_export_into_dev_shm_replaces_a_regular_file_as_anywhere_else(
    server: ServerProcess, exp_data: bytes
) -> None:
    """/dev/shm is a filesystem for files, though below /dev: an export creates a new file
    there, and replaces an existing one through a temporary file beside it, so a failure
    leaves it as it was (it was written in place, and emptied)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm")
    image = shm / f"tierdisk-test-{os.getpid()}-{os.urandom(4).hex()}.img"

    def temp_files_of_image() -> list[str]:
        return [n for n in os.listdir(shm) if n.startswith(f".{image.name}.tierdisk-export-")]

    try:
        tierdisk(server, "export", "exp", str(image))
        assert image.read_bytes() == exp_data
        old = os.urandom(MiB)
        image.write_bytes(old)
        line = one_line_error(export_through_a_cut(server, str(image)), "volume 'exp'")
        assert line.endswith(f"; '{image}' is unchanged"), line
        assert image.read_bytes() == old
        assert temp_files_of_image() == []
    finally:
        for name in [image.name, *temp_files_of_image()]:
            with contextlib.suppress(FileNotFoundError):
                (shm / name).unlink()


def test_export_to_dev_stdout_redirected_to_a_file_writes_it_in_place(
    server: ServerProcess, exp_data: bytes, tmp_path: Path
) -> None:
    """/dev/stdout leads through /proc to the descriptor the command was given: that file
    is written in place (no name is replaced), whatever it is."""
    out = tmp_path / "out.img"
    env = {**os.environ, "TIERDISK_SERVER": server.grpc}
    with open(out, "wb") as f:
        done = subprocess.run(
            [*TIERDISK, "export", "exp", "/dev/stdout"], stdout=f, stderr=subprocess.PIPE,
            env=env, timeout=120,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    assert out.read_bytes() == exp_data
    assert os.listdir(tmp_path) == ["out.img"]


def test_export_through_a_symlink_replaces_its_target_and_keeps_the_link(
    server: ServerProcess, exp_data: bytes, tmp_path: Path
) -> None:
    target = tmp_path / "target.img"
    target.write_bytes(b"old")
    link = tmp_path / "link.img"
    link.symlink_to(target.name)  # relative, as `ln -s target.img link.img` makes it
    line = one_line_error(export_through_a_cut(server, str(link)))
    assert line.endswith(f"; '{link}' is unchanged"), line
    assert link.is_symlink() and target.read_bytes() == b"old"
    assert temp_files(tmp_path) == []
    tierdisk(server, "export", "exp", str(link))
    assert link.is_symlink() and os.readlink(link) == "target.img"
    assert target.read_bytes() == exp_data
    assert temp_files(tmp_path) == []


def test_a_failed_read_says_how_much_its_output_file_holds(
    server: ServerProcess, exp_data: bytes, tmp_path: Path
) -> None:
    """``read -o FILE`` over an existing FILE whose server goes away mid-way: FILE holds
    what was read before (it was truncated at the start; only ``export`` replaces a file
    whole), and the one line says how much, so nobody takes it for the old file or a
    whole one."""
    out = tmp_path / "out.img"
    out.write_bytes(b"precious" * 1000)
    with CuttingProxy(server.grpc, 2 * MiB) as proxy:
        result = tierdisk(
            server, "--server", proxy.address, "--retries", "0",
            "read", "exp", "0", str(len(exp_data) // 512), "-o", str(out), check=False,
        )  # fmt: skip
        assert proxy.cut.is_set()
    line = one_line_error(result)
    match = re.search(
        rf"; file '{re.escape(str(out))}' holds only the (\d+) bytes written before$", line
    )
    assert match, line
    assert out.read_bytes() == exp_data[: int(match.group(1))]
    if os.path.exists("/dev/full"):  # not a file: nothing said of what it holds
        result = tierdisk(server, "read", "exp", "0", "8", "-o", "/dev/full", check=False)
        line = one_line_error(result, "'/dev/full'", "No space left on device")
        assert "holds" not in line, line


def test_export_to_a_file_with_the_longest_name_there_is(
    server: ServerProcess, exp_data: bytes, tmp_path: Path
) -> None:
    """A file name of 255 bytes (the longest a Linux filesystem takes; the temporary file
    beside it is named after it, cut short) is exported to, new and over an old file."""
    image = tmp_path / ("i" * 251 + ".img")
    tierdisk(server, "export", "exp", str(image))
    assert image.read_bytes() == exp_data
    image.write_bytes(b"old")
    tierdisk(server, "export", "exp", str(image))
    assert image.read_bytes() == exp_data
    assert os.listdir(tmp_path) == [image.name]


@pytest.mark.parametrize("read_only", [True, False], ids=["read-only", "writable"])
def test_export_onto_the_volumes_own_raw_image_is_refused(tmp_path: Path, read_only: bool) -> None:
    """`export VOL F` where F is the raw file the server serves VOL from (an operator's
    slip) is refused while the server holds it: replaced, the server would go on writing
    into the old file and lose every later write at its next start (which opens the new
    file). Writing F in place would have zeroed it. F and the volume stay as they were."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    base = data_dir / "base.img"
    original = os.urandom(MiB)
    base.write_bytes(original)
    layer = {"kind": "raw", "path": "base.img", "read_only": read_only}
    config = write_config(tmp_path, toml_volume("v", layer, read_only=read_only))
    with ServerProcess.start(tmp_path, config) as srv:
        result = tierdisk(srv, "export", "v", str(base), check=False)
        one_line_error(result, str(base), "locked by another process")
        assert base.read_bytes() == original
        assert tierdisk(srv, "read", "v", "0", str(MiB // 512)).stdout == original
        assert temp_files(data_dir) == []


@pytest.mark.parametrize("through", ["the-file", "a-symlink"])
def test_read_into_the_volumes_own_raw_image_is_refused(tmp_path: Path, through: str) -> None:
    """`read VOL SECTOR COUNT -o F`, F (or a symlink to it) the raw file the server serves
    VOL from, is refused while the server holds it, as export is: F would be truncated,
    the volume's data gone. F and the volume stay as they were."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    base = data_dir / "base.img"
    original = os.urandom(MiB)
    base.write_bytes(original)
    output = base
    if through == "a-symlink":
        output = tmp_path / "link.img"
        output.symlink_to(base)
    config = write_config(tmp_path, toml_volume("v", {"kind": "raw", "path": "base.img"}))
    with ServerProcess.start(tmp_path, config) as srv:
        result = tierdisk(srv, "read", "v", "0", "1", "-o", str(output), check=False)
        line = one_line_error(result, str(output), "locked by another process")
        assert "read to another file" in line, line
        assert base.read_bytes() == original
        assert tierdisk(srv, "read", "v", "0", str(MiB // 512)).stdout == original


@pytest.mark.parametrize(
    ("kind", "file"),
    [("sparse", "top.img.map"), ("sqlite", "top.db"), ("sqlite", "top.db-wal")],
    ids=["sparse-map", "sqlite-database", "sqlite-wal"],
)
def test_export_onto_a_layers_map_or_database_is_refused(
    tmp_path: Path, kind: str, file: str
) -> None:
    """A sparse layer's map and a sqlite layer's database (and its WAL) are the layer's
    files too, though the server locks another file for them (the data file, the
    database's ``.lock``): an export onto one is refused, and the volume keeps its data
    across a restart."""
    path = "top.img" if kind == "sparse" else "top.db"
    config = write_config(tmp_path, toml_volume("v", {"kind": kind, "path": path, "size": "1MiB"}))
    data = os.urandom(64 * 1024)
    with ServerProcess.start(tmp_path, config) as srv:
        tierdisk(srv, "write", "v", "0", stdin=data)
        tierdisk(srv, "flush", "v")
        victim = tmp_path / "data" / file
        assert victim.exists(), sorted(os.listdir(tmp_path / "data"))
        before = victim.read_bytes()
        result = tierdisk(srv, "export", "v", str(victim), check=False)
        one_line_error(result, str(victim), "locked by another process")
        assert victim.read_bytes() == before
    with ServerProcess.start(tmp_path, config) as srv:
        assert tierdisk(srv, "read", "v", "0", str(len(data) // 512)).stdout == data


def drain_fifo(fifo: Path) -> tuple[bytearray, threading.Thread]:
    """A started thread reading ``fifo`` to its end into the returned buffer."""
    got = bytearray()

    def drain() -> None:
        with open(fifo, "rb") as f:
            while chunk := f.read(1 << 16):
                got.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    return got, reader


def test_failed_export_into_a_fifo_leaves_the_fifo(
    server: ServerProcess, exp_data: bytes, tmp_path: Path
) -> None:
    """Only regular files are removed: never a device, a pipe, or anything not created
    as a regular file."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got, reader = drain_fifo(fifo)
    line = one_line_error(export_through_a_cut(server, str(fifo)), "volume 'exp'")
    reader.join(30)
    assert "the partial file" not in line
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert 0 < len(got) < len(exp_data) and exp_data.startswith(bytes(got))


def test_export_to_a_device_a_pipe_or_stdout_writes_every_byte(
    server: ServerProcess, exp_data: bytes, tmp_path: Path
) -> None:
    """No truncate, no seek, no holes: the bytes in order, zeros included."""
    # a volume with holes: `rw` has data at its start, unallocated sectors after
    tierdisk(server, "write", "rw", "0", stdin=b"\x5a" * 4096)
    expected = tierdisk(server, "read", "rw", "0", str(4 * MiB // 512)).stdout
    assert len(expected) == 4 * MiB
    # (in tmp_path: a CLI that took `-` for a file name would leave it there)
    assert tierdisk(server, "export", "rw", "-", cwd=tmp_path).stdout == expected
    assert tierdisk(server, "export", "rw", "/dev/stdout").stdout == expected  # a pipe here
    assert tierdisk(server, "export", "exp", "-", cwd=tmp_path).stdout == exp_data
    assert tierdisk(server, "export", "rw", "/dev/null").stdout == b""

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got, reader = drain_fifo(fifo)
    tierdisk(server, "export", "rw", str(fifo))
    reader.join(30)
    assert bytes(got) == expected


def test_dash_is_stdin_or_stdout(server: ServerProcess, tmp_path: Path) -> None:
    """`-` as IMAGE, `-o -` or `-i -`: stdin or stdout, never a file named `-`."""
    data = os.urandom(64 * 1024)
    tierdisk(server, "write", "rw", "8", "-i", "-", stdin=data, cwd=tmp_path)
    assert tierdisk(server, "read", "rw", "8", "128", "-o", "-", cwd=tmp_path).stdout == data
    image = os.urandom(MiB)
    tierdisk(server, "import", "rw", "-", stdin=image, cwd=tmp_path)
    assert tierdisk(server, "read", "rw", "0", "2048").stdout == image
    exported = tierdisk(server, "export", "rw", "-", cwd=tmp_path).stdout
    assert exported[:MiB] == image and len(exported) == 4 * MiB
    # from a file on stdin too (its size known up front), refused whole when too large
    big = tmp_path / "big.img"
    big.write_bytes(bytes(8 * MiB))
    with open(big, "rb") as f:
        env = {**os.environ, "TIERDISK_SERVER": server.grpc}
        result = subprocess.run(
            [*TIERDISK, "import", "rw", "-"], stdin=f, capture_output=True, env=env, cwd=tmp_path
        )
    one_line_error(result, "stdin", "larger than volume 'rw'")
    assert not (tmp_path / "-").exists()


# -- read / write ----------------------------------------------------------------------


def test_write_and_read_through_files_and_pipes(server: ServerProcess, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 4096)  # more than one chunk
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    tierdisk(server, "write", "rw", "16", "-i", str(src))
    dst = tmp_path / "dst.bin"
    tierdisk(server, "read", "rw", "16", str(len(data) // 512), "-o", str(dst))
    assert dst.read_bytes() == data
    assert tierdisk(server, "read", "rw", "16", "8").stdout == data[:4096]

    tierdisk(server, "write", "rw", "0", stdin=b"\x42" * 1024)
    assert tierdisk(server, "read", "rw", "0", "2").stdout == b"\x42" * 1024
    assert tierdisk(server, "read", "rw", "0", "0").stdout == b""


def feed_fifo(fifo: Path, data: bytes) -> threading.Thread:
    """A started thread writing ``data`` into ``fifo`` (once a reader opens it), then
    closing it."""

    def feed() -> None:
        with open(fifo, "wb") as f, contextlib.suppress(BrokenPipeError):
            f.write(data)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    return writer


@pytest.mark.parametrize("how", ["fifo", "dev-fd", "dev-stdin"])
def test_an_input_file_that_is_a_pipe_is_written_as_it_arrives(
    server: ServerProcess, tmp_path: Path, how: str
) -> None:
    """``-i FILE`` or IMAGE that is a pipe (a FIFO; ``<(cmd)``, which is ``/dev/fd/N``;
    ``/dev/stdin`` from a pipe) is read as it arrives, as stdin from a pipe is: not seeked
    ("Illegal seek")."""
    data = os.urandom(3 * MiB + 4096)  # over one chunk: written as it arrives
    count = str(len(data) // 512)
    tierdisk(server, "write", "piped", "0", stdin=bytes(len(data)))
    if how == "fifo":
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        writer = feed_fifo(fifo, data)
        tierdisk(server, "write", "piped", "0", "-i", str(fifo))
        writer.join(30)
    elif how == "dev-stdin":
        tierdisk(server, "import", "piped", "/dev/stdin", stdin=data)
    else:
        read_end, write_end = os.pipe()
        env = {**os.environ, "TIERDISK_SERVER": server.grpc}
        with subprocess.Popen(
            [*TIERDISK, "import", "piped", f"/dev/fd/{read_end}"],
            pass_fds=[read_end], stderr=subprocess.PIPE, env=env,
        ) as proc:  # fmt: skip
            os.close(read_end)
            with open(write_end, "wb") as f:
                f.write(data)
            _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    assert tierdisk(server, "read", "piped", "0", count).stdout == data


def test_a_bad_length_from_a_named_pipe_names_it(server: ServerProcess, tmp_path: Path) -> None:
    """A pipe's length is known at its end: a part sector there is refused then, naming the
    file, with what was written, as from stdin."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = feed_fifo(fifo, bytes(1000))
    result = tierdisk(server, "write", "piped", "0", "-i", str(fifo), check=False)
    writer.join(30)
    one_line_error(
        result, f"file '{fifo}': 1000 bytes is not a whole number of 512-byte sectors",
        "nothing was written",
    )  # fmt: skip


def test_write_refuses_partial_sectors_before_writing(server: ServerProcess) -> None:
    before = tierdisk(server, "read", "rw", "100", "1").stdout
    one_line_error(tierdisk(server, "write", "rw", "100", stdin=b"z" * 700, check=False), "700")
    assert tierdisk(server, "read", "rw", "100", "1").stdout == before


# -- other verbs -----------------------------------------------------------------------


def test_inspect_prints_json(server: ServerProcess) -> None:
    tree = json.loads(tierdisk(server, "inspect", "disk").stdout)
    assert tree["name"] == "disk" and tree["layers"][0]["kind"] == "ram"
    layer = json.loads(tierdisk(server, "inspect", "disk", "layers/0").stdout)
    assert layer["index"] == 0


def test_inspect_prints_sorted_keys_with_stable_indentation(server: ServerProcess) -> None:
    """Outputs diff cleanly: keys sorted at every level, two-space indentation."""
    for args in (("disk",), ("disk", "layers/0"), ("rw",)):
        out = tierdisk(server, "inspect", *args).stdout.decode()
        assert out == json.dumps(json.loads(out), indent=2, sort_keys=True) + "\n"
        assert out.count("\n") > 3  # indented, one key a line


def test_resize_in_sectors_and_bytes(server: ServerProcess) -> None:
    out = tierdisk(server, "resize", "grow", "4096").stdout.decode()
    assert "sector_count: 4096" in out.splitlines()
    tierdisk(server, "resize", "grow", "3MiB")
    assert "sector_count: 6144" in tierdisk(server, "info", "grow").stdout.decode().splitlines()
    bad = tierdisk(server, "resize", "grow", "1000B", check=False)
    assert bad.returncode == 2 and "1000" in bad.stderr.decode()


def sector_count(server: ServerProcess, volume: str) -> int:
    info = dict(
        line.split(": ", 1)
        for line in tierdisk(server, "info", volume).stdout.decode().split("\n")
        if line
    )
    return int(info["sector_count"])


def test_resize_refuses_to_shrink_without_the_flag(server: ServerProcess) -> None:
    """As qemu-img: a smaller size is refused (exit 2, one line with both sizes) unless
    --shrink is given; the volume and its data are untouched."""
    data = os.urandom(512 * 48)
    tierdisk(server, "write", "shrink", "2000", stdin=data)  # the last 48 of 2048 sectors
    for size, asked in (("1000", "1000 sectors"), ("256KiB", "512 sectors")):
        line = one_line_error(
            tierdisk(server, "resize", "shrink", size, check=False),
            "volume 'shrink'",
            asked,
            "2048 sectors",
            "1.0 MiB",
            "--shrink",
            returncode=2,
        )
        assert "internal error" not in line
    assert sector_count(server, "shrink") == 2048
    assert tierdisk(server, "read", "shrink", "2000", "48").stdout == data
    # the same size, or larger, needs no flag
    tierdisk(server, "resize", "shrink", "1MiB")
    tierdisk(server, "resize", "shrink", "4096")
    out = tierdisk(server, "resize", "shrink", "1000", "--shrink").stdout.decode()
    assert "sector_count: 1000" in out.splitlines()
    assert sector_count(server, "shrink") == 1000
    # the help says so
    assert "--shrink" in tierdisk(server, "resize", "--help").stdout.decode()


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


@pytest.mark.parametrize(
    ("size", "needle"),
    [
        ("0", "size '0': a volume has a sector or more"),
        ("0B", "size '0B': a volume has a sector or more"),
        ("1000B", "is not a whole number of 512-byte sectors"),
        # 2**53 sectors of 512 bytes: within a request and the byte limit, not the sectors'
        ("4096PiB", "over the size limit of 9007199254740991 sectors"),
    ],
)
def test_a_size_no_volume_can_have_is_a_usage_error(
    server: ServerProcess, size: str, needle: str
) -> None:
    """Exit 2 with one line naming the volume, as every bad argument, whether the
    command or the server would have found it (the server's refusal was exit 1); the
    volume keeps its size."""
    before = sector_count(server, "grow")
    line = one_line_error(
        tierdisk(server, "resize", "grow", size, "--shrink", check=False), needle, returncode=2
    )
    assert line.count("volume 'grow'") == 1, line
    assert sector_count(server, "grow") == before


def test_numbers_that_fit_a_volume_but_not_this_one_are_out_of_range(
    server: ServerProcess,
) -> None:
    """Up to the most sectors a volume can have (``2**53 - 1``), the server decides: exit 1."""
    largest = str((1 << 53) - 1)
    for args in (("read", "rw", largest, "1"), ("read", "rw", "1", largest)):
        one_line_error(tierdisk(server, *args, check=False), "volume 'rw'", "out of range")


def test_flush(server: ServerProcess) -> None:
    assert tierdisk(server, "flush", "disk").stdout == b""


@contextlib.contextmanager
def watching(
    server: ServerProcess,
) -> Iterator[tuple[subprocess.Popen[bytes], IO[bytes], str]]:
    """``tierdisk watch watched`` running (signals reach it as they come): the process, its
    stdout, and the first line it printed (the size now); killed at the end if still up."""
    env = {**os.environ, "TIERDISK_SERVER": server.grpc}
    proc = subprocess.Popen(
        [*TIERDISK_SIGNALLED, "watch", "watched"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        yield proc, proc.stdout, proc.stdout.readline().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["ctrl-c", "sigterm", "sighup"]
)
def test_watch_prints_each_resize_and_a_stop_signal_exits_0(
    server: ServerProcess, sig: signal.Signals
) -> None:
    """``watch`` prints the size now, then a line per change, until it is stopped: Ctrl-C,
    SIGTERM or SIGHUP end it with exit 0 and nothing on stderr."""
    with watching(server) as (proc, stdout, first):
        assert "sector_count=" in first and "generation=" in first
        size = int(first.split("sector_count=")[1].split()[0]) + 2048
        tierdisk(server, "resize", "watched", str(size))
        assert f"sector_count={size}" in stdout.readline().decode()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err.decode()
        assert err == b""


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


WATCHED_ONLY = """
[[volumes]]
name = "w"
  [[volumes.layers]]
  kind = "ram"
  size = "1MiB"
"""


@pytest.mark.parametrize("how", ["shutdown", "crash"])
def test_watch_ended_by_the_server_is_one_line_exit_1(tmp_path: Path, how: str) -> None:
    """The sizes printed stop being current: that is reported, not an exit 0. A server
    shutting down ends the stream cleanly (no status to show); a crash breaks it."""
    with ServerProcess.start(tmp_path, write_config(tmp_path, WATCHED_ONLY)) as srv:
        env = {**os.environ, "TIERDISK_SERVER": srv.grpc}
        proc = subprocess.Popen(
            [*TIERDISK, "watch", "w"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        try:
            assert proc.stdout is not None and proc.stderr is not None
            assert "sector_count=2048" in proc.stdout.readline().decode()
            if how == "shutdown":
                assert srv.terminate() == 0
            else:
                srv.kill()
            assert proc.wait(30) == 1
            err = proc.stderr.read().decode()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"tierdisk: volume 'w' on {srv.grpc}: the server ended the watch")
    if how == "crash":
        assert "unavailable" in lines[0]


def test_watch_of_a_server_that_never_answers_ends_at_the_timeout(tmp_path: Path) -> None:
    """``--timeout`` bounds the wait for the first event as it bounds any call: a server
    that takes the connection and never answers (SIGSTOPped) is one line and exit 1, not a
    wait without end (it was gRPC's 20 s connect timeout here, for ever behind a proxy whose
    upstream hung)."""
    with ServerProcess.start(tmp_path, write_config(tmp_path, WATCHED_ONLY)) as srv:
        env = {**os.environ, "TIERDISK_SERVER": srv.grpc}
        os.kill(srv.pid, signal.SIGSTOP)
        try:
            result = subprocess.run(
                [*TIERDISK, "--timeout", "1.5", "watch", "w"],
                capture_output=True,
                timeout=60,  # gRPC's own connect timeout (20 s) ended it before the fix
                env=env,
            )
        finally:
            os.kill(srv.pid, signal.SIGCONT)
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "no answer to the watch within 1.5 s" in err


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


def test_a_folder_given_as_input_or_output_is_named(server: ServerProcess, tmp_path: Path) -> None:
    folder = tmp_path / "adir"
    folder.mkdir()
    for args in (
        ("write", "rw", "0", "-i", str(folder)),
        ("import", "rw", str(folder)),
        ("read", "rw", "0", "1", "-o", str(folder)),
        ("export", "rw", str(folder)),
    ):
        one_line_error(tierdisk(server, *args, check=False), f"file {str(folder)!r}", "directory")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_write_errors_name_the_file_or_stdout(server: ServerProcess, tmp_path: Path) -> None:
    one_line_error(
        tierdisk(server, "read", "rw", "0", "1", "-o", "/dev/full", check=False),
        "file '/dev/full'",
        "No space left on device; 0 of 512 bytes went to file '/dev/full' before",
    )
    env = {**os.environ, "TIERDISK_SERVER": server.grpc}
    for args in (("read", "rw", "0", "1"), ("export", "ro", "-"), ("volumes",), ("info", "rw")):
        with open("/dev/full", "wb") as full:
            result = subprocess.run(
                [*TIERDISK, *args],
                stdout=full,
                stderr=subprocess.PIPE,
                env=env,
                timeout=60,
                cwd=tmp_path,
            )
        assert result.returncode == 1, args
        lines = result.stderr.decode().splitlines()
        said = "tierdisk: stdout: No space left on device"
        if args[0] in ("read", "export"):  # a copy out says how much went out: nothing
            said += f"; 0 of {512 if args[0] == 'read' else 1 << 20} bytes went to stdout before"
        assert lines == [said], (args, lines)


# -- progress bar ----------------------------------------------------------------------


class OnTerminal:
    """``tierdisk ARGS`` with stderr on a real pseudo-terminal (stdout too, with
    ``stdout_on_tty``), as a user at a terminal runs it. Threads collect what reaches the
    terminal (:attr:`screen`) and what a piped stdout carries (:attr:`stdout`).
    ``$COLUMNS`` is ``columns_env`` (``None``: unset)."""

    def __init__(
        self,
        server: ServerProcess,
        *args: str,
        stdin: int = subprocess.PIPE,
        stdout_on_tty: bool = False,
        tty_setup: Callable[[int], None] | None = None,
        columns_env: str | None = "120",
    ) -> None:
        self._master, slave = pty.openpty()
        if tty_setup is not None:
            tty_setup(slave)
        env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
        env["TIERDISK_SERVER"] = server.grpc
        if columns_env is not None:  # None: unset, as a shell leaves it; the terminal's size
            env["COLUMNS"] = columns_env
        try:
            self.proc = subprocess.Popen(
                [*TIERDISK, *args],
                stdin=slave if stdin == TTY else stdin,
                stdout=slave if stdout_on_tty else subprocess.PIPE,
                stderr=slave,
                env=env,
            )
        finally:
            os.close(slave)
        self._screen = bytearray()
        self._stdout = bytearray()
        self._closed = False
        self._changed = threading.Condition()
        self._threads = [threading.Thread(target=self._collect_screen, daemon=True)]
        if self.proc.stdout is not None:
            self._threads.append(threading.Thread(target=self._collect_stdout, daemon=True))
        for thread in self._threads:
            thread.start()

    def _collect_screen(self) -> None:
        while True:
            try:
                chunk = os.read(self._master, 1 << 16)
            except OSError:  # EIO: every holder of the terminal has closed it
                chunk = b""
            with self._changed:
                if not chunk:
                    self._closed = True
                else:
                    self._screen += chunk
                self._changed.notify_all()
            if not chunk:
                return

    def _collect_stdout(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()  # raw reads: the buffered object is never read
        while chunk := os.read(fd, 1 << 16):
            self._stdout += chunk

    def type(self, data: bytes) -> None:
        """Input at the terminal (``stdin=TTY``)."""
        os.write(self._master, data)

    @property
    def screen(self) -> str:
        with self._changed:
            return bytes(self._screen).decode(errors="replace")

    @property
    def stdout(self) -> bytes:
        return bytes(self._stdout)

    def wait_for(self, text: str, timeout: float = 30) -> str:
        """Wait until ``text`` has reached the terminal (or it was closed): the screen."""
        with self._changed:
            self._changed.wait_for(lambda: text.encode() in self._screen or self._closed, timeout)
        return self.screen

    def finish(self, timeout: float = 30) -> int:
        """End stdin (if a pipe), wait for the exit and for everything it wrote."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        returncode = self.proc.wait(timeout)
        for thread in self._threads:
            thread.join(timeout)
            assert not thread.is_alive()
        return returncode

    def __enter__(self) -> OnTerminal:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for thread in self._threads:
            thread.join(5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        os.close(self._master)


TTY = -100
"""``OnTerminal(stdin=TTY)``: stdin is the terminal too."""


def last_line(screen: str) -> str:
    """What the terminal shows last: the final redraw of the last line."""
    lines = screen.replace("\r\n", "\n").rstrip("\n").split("\n")
    return lines[-1].split("\r")[-1].rstrip()


def test_progress_bar_only_on_a_terminal(server: ServerProcess, tmp_path: Path) -> None:
    image = tmp_path / "p.img"
    image.write_bytes(os.urandom(2 * MiB))
    # stderr a pipe: nothing
    assert tierdisk(server, "import", "rw", str(image)).stderr == b""
    # stderr a terminal: a bar that reaches 100%
    with OnTerminal(server, "import", "rw", str(image), stdin=subprocess.DEVNULL) as run:
        assert run.finish() == 0
    shown = last_line(run.screen)
    assert "import rw" in shown and "100%" in shown and "2.0 MiB / 2.0 MiB" in shown
    assert run.screen.endswith("\r\n")  # the line is ended: a later message starts clean


@pytest.mark.timeout(90)
def test_read_to_a_pipe_shows_the_bar_on_a_terminal_stderr(
    server: ServerProcess, tmp_path: Path
) -> None:
    """`tierdisk read vm1 0 N | gzip > img.gz` at a terminal: the bar on stderr, the data
    on stdout untouched."""
    data = os.urandom(3 * MiB)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    tierdisk(server, "write", "rw", "0", "-i", str(src))
    count = str(len(data) // 512)

    with OnTerminal(server, "read", "rw", "0", count, stdin=subprocess.DEVNULL) as run:
        assert run.finish() == 0
    assert run.stdout == data
    shown = last_line(run.screen)
    assert shown.startswith("read rw [################] 100% 3.0 MiB / 3.0 MiB "), shown
    assert shown.endswith("ETA 0:00")

    # stderr a pipe: no bar, the same bytes
    piped = tierdisk(server, "read", "rw", "0", count)
    assert piped.stderr == b"" and piped.stdout == data
    # --no-progress: nothing on the terminal either
    args = ("--no-progress", "read", "rw", "0", count)
    with OnTerminal(server, *args, stdin=subprocess.DEVNULL) as run:
        assert run.finish() == 0
    assert run.stdout == data and run.screen == ""


@pytest.mark.timeout(90)
def test_the_bar_fits_a_narrow_terminal_on_stderr(server: ServerProcess, tmp_path: Path) -> None:
    """`tierdisk read … | gzip` on a 40-column terminal: the bar is sized to stderr, where
    it is drawn (stdout is the pipe), so no redraw wraps into a new line."""
    data = os.urandom(3 * MiB)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    tierdisk(server, "write", "rw", "0", "-i", str(src))

    def forty_columns(fd: int) -> None:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 40, 0, 0))

    args = ("read", "rw", "0", str(len(data) // 512))
    with OnTerminal(
        server, *args, stdin=subprocess.DEVNULL, tty_setup=forty_columns, columns_env=None
    ) as run:
        assert run.finish() == 0
    assert run.stdout == data
    redraws = run.screen.removesuffix("\r\n").split("\r")[1:]
    assert redraws and all(len(line) <= 39 for line in redraws), redraws
    assert "\n" not in run.screen.removesuffix("\r\n")
    assert last_line(run.screen).startswith("read rw [################] 100% 3.0 MiB")


@pytest.mark.timeout(60)
def test_read_to_a_terminal_stdout_needs_dash_o_dash(server: ServerProcess) -> None:
    """A ``read`` with no ``-o`` at a terminal is refused before it reads (binary sectors
    would garble the terminal): one line, exit 2, no data on the screen."""
    tierdisk(server, "write", "rw", "0", stdin=b"x" * 4096)
    with OnTerminal(
        server, "read", "rw", "0", "8", stdin=subprocess.DEVNULL, stdout_on_tty=True
    ) as run:
        assert run.finish() == 2
    assert "x" not in run.screen.replace("xxd", "")
    (line,) = run.screen.strip().splitlines()
    assert line.startswith("tierdisk: read rw: stdout is a terminal"), line
    assert "-o -" in line, line


@pytest.mark.timeout(60)
def test_read_to_a_terminal_stdout_shows_only_the_data(server: ServerProcess) -> None:
    """``-o -`` at a terminal: stdout and stderr the same terminal, the bar would be redrawn
    through the data, so there is none; the terminal shows exactly the bytes read. A read
    of no sectors writes nothing, so it needs no ``-o -``."""
    tierdisk(server, "write", "rw", "0", stdin=b"x" * 4096)
    with OnTerminal(
        server, "read", "rw", "0", "8", "-o", "-", stdin=subprocess.DEVNULL, stdout_on_tty=True
    ) as run:
        assert run.finish() == 0
    assert run.screen == "x" * 4096
    with OnTerminal(
        server, "read", "rw", "0", "0", stdin=subprocess.DEVNULL, stdout_on_tty=True
    ) as run:
        assert run.finish() == 0
    assert run.screen == ""


@pytest.mark.timeout(90)
def test_write_from_a_pipe_shows_bytes_written_as_they_arrive(server: ServerProcess) -> None:
    """`cat img | tierdisk write vm1 0` at a terminal: no total to show, so the bytes
    written so far and the rate, updated while the pipe is still open."""
    data = os.urandom(3 * MiB)
    with OnTerminal(server, "write", "rw", "0") as run:
        assert run.proc.stdin is not None
        run.proc.stdin.write(data[: 2 * MiB])
        run.proc.stdin.flush()
        midway = run.wait_for("B/s")
        # the pipe is open, yet the user already sees bytes written
        assert run.proc.poll() is None
        assert "write rw 1.0 MiB " in midway or "write rw 2.0 MiB " in midway, midway
        run.proc.stdin.write(data[2 * MiB :])
        assert run.finish() == 0
    shown = last_line(run.screen)
    assert re.fullmatch(r"write rw 3\.0 MiB [\d.]+ [KMG]?i?B/s elapsed \d+:\d\d", shown), shown
    assert "%" not in run.screen and "ETA" not in run.screen
    assert run.stdout == b""
    assert tierdisk(server, "read", "rw", "0", str(len(data) // 512)).stdout == data

    # stderr a pipe: nothing on it, the data written all the same
    again = os.urandom(3 * MiB)
    assert tierdisk(server, "write", "rw", "0", stdin=again).stderr == b""
    assert tierdisk(server, "read", "rw", "0", str(len(again) // 512)).stdout == again


@pytest.mark.timeout(60)
def test_write_from_a_file_on_stdin_shows_the_bar_with_its_total(
    server: ServerProcess, tmp_path: Path
) -> None:
    """`tierdisk write vm1 0 < img`: stdin's size is known, from where it stands."""
    data = os.urandom(2 * MiB + 4096)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    fd = os.open(src, os.O_RDONLY)
    try:
        os.lseek(fd, 4096, os.SEEK_SET)  # as after `{ head -c 4096 >/dev/null; tierdisk …; }`
        with OnTerminal(server, "write", "rw", "0", stdin=fd) as run:
            assert run.finish() == 0
        assert os.lseek(fd, 0, os.SEEK_CUR) == len(data)  # consumed, as a plain read would
    finally:
        os.close(fd)
    shown = last_line(run.screen)
    assert shown.startswith("write rw [################] 100% 2.0 MiB / 2.0 MiB "), shown
    rest = data[4096:]
    assert tierdisk(server, "read", "rw", "0", str(len(rest) // 512)).stdout == rest


@pytest.mark.timeout(60)
def test_write_from_a_terminal_stdin_shows_no_bar(server: ServerProcess) -> None:
    """Sectors typed at the terminal (echo off): no bar redrawn over the input."""

    def no_echo(fd: int) -> None:
        attrs = termios.tcgetattr(fd)
        attrs[3] &= ~termios.ECHO
        termios.tcsetattr(fd, termios.TCSANOW, attrs)

    with OnTerminal(server, "write", "rw", "0", stdin=TTY, tty_setup=no_echo) as run:
        run.type(b"y" * 511 + b"\n")
        run.type(b"\x04")  # Ctrl-D at the start of a line: end of input
        assert run.finish() == 0
    assert run.screen == ""
    assert tierdisk(server, "read", "rw", "0", "1").stdout == b"y" * 511 + b"\n"


def test_write_from_a_pipe_refuses_a_bad_chunk_after_writing_those_before(
    server: ServerProcess,
) -> None:
    """From a pipe the length is known only at its end: whole chunks before a partial
    sector, or before the end of the volume, are written, and the message says so."""
    head = os.urandom(MiB)
    untouched = tierdisk(server, "read", "rw", "2048", "2").stdout
    bad = tierdisk(server, "write", "rw", "0", stdin=head + b"z" * 700, check=False)
    one_line_error(bad, "stdin", f"{MiB + 700} bytes", f"the {MiB} bytes before were written")
    assert tierdisk(server, "read", "rw", "0", "2048").stdout == head
    assert tierdisk(server, "read", "rw", "2048", "2").stdout == untouched

    # rw is 4 MiB: from its last MiB, 2 MiB reach past the end
    last = 8192 - 2048
    tail = tierdisk(server, "read", "rw", str(last), "2048").stdout
    over = tierdisk(server, "write", "rw", str(last), stdin=os.urandom(2 * MiB), check=False)
    one_line_error(over, "volume 'rw'", "past the end", f"the {MiB} bytes before were written")
    assert tierdisk(server, "read", "rw", str(last), "2048").stdout != tail

    # nothing to write, from a sector past the end: that sector is named, not a range
    empty = tierdisk(server, "write", "rw", "8193", stdin=b"", check=False)
    assert one_line_error(empty, "volume 'rw'").endswith(
        "sector 8193 is past the end (8192 sectors of 512 bytes)"
    )


class FullFrom(MapLayer):
    """A disk (every sector present, reading ``\\xa5``) whose writes reaching sector
    ``limit`` or past fail with ``error``: a layer whose storage filled up there (``NoSpace``:
    the request changed nothing, DESIGN.md §2), or failed there (``StorageError``: it may
    have written part of the request)."""

    def __init__(self, sectors: int, limit: int, error: type[Exception]) -> None:
        super().__init__(sectors, full=lambda _: b"\xa5" * 512)
        self.limit = limit
        self.error = error

    async def write(self, data: memoryview, sector: int, fua: bool) -> None:
        if sector + len(data) // 512 > self.limit:
            raise self.error(f"map layer: failed at sector {self.limit}")
        await super().write(data, sector, fua)


@pytest.mark.parametrize("how", ["write -i", "import", "write < pipe"])
@pytest.mark.parametrize("error", [NoSpace, StorageError], ids=["no-space", "storage-error"])
async def test_a_failed_write_or_import_says_what_was_written(
    tmp_path: Path, how: str, error: type[Exception]
) -> None:
    """4 MiB in 1 MiB requests, four in flight, onto a volume whose writes past its first
    MiB fail: the first MiB is written, and the message says so, from a file, an image or
    a pipe alike. Requests past it failed; where the failure may have left part of one
    written (not "no space", which changes nothing), it says those sectors may have been."""
    async with running_server(tmp_path / "srv", toml_volume("full", ram("4MiB"))) as srv:
        replaced = srv.registry.get("full")
        srv.registry.set_ready(await Volume.open("full", [LayerEntry(FullFrom(8192, 2048, error))]))
        await replaced.close()
        data = os.urandom(4 * MiB)
        src = tmp_path / "src.bin"
        src.write_bytes(data)
        env = {**os.environ, "TIERDISK_SERVER": srv.grpc_address}
        args = {
            "write -i": ["write", "full", "0", "-i", str(src)],
            "import": ["import", "full", str(src)],
            "write < pipe": ["write", "full", "0"],
        }[how]

        def cli(*argv: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                [*TIERDISK, *argv], input=stdin, capture_output=True, env=env, timeout=60
            )

        stdin = data if how == "write < pipe" else b""
        result = await asyncio.to_thread(cli, *args, stdin=stdin)
        got = (await asyncio.to_thread(cli, "read", "full", "0", "8192")).stdout
    line = one_line_error(result, "volume 'full'", "failed at sector 2048")
    written = "; the 1048576 bytes before were written from sector 0"
    if error is NoSpace:
        assert line.endswith(written), line
    elif how == "write < pipe":  # read as they are written: later chunks may not be sent
        assert re.search(written + r"; sectors 2048\.\.(4096|6144|8192) may have been "
                         r"written in part$", line), line  # fmt: skip
    else:
        assert line.endswith(written + "; sectors 2048..8192 may have been written in part"), line
    assert got[:MiB] == data[:MiB]
    assert got[MiB:] == b"\xa5" * (3 * MiB)


def test_a_write_refused_outright_says_nothing_was_written(
    server: ServerProcess, tmp_path: Path
) -> None:
    src = tmp_path / "one.bin"
    src.write_bytes(bytes(512))
    for args, stdin in ((("-i", str(src)), b""), ((), bytes(512))):
        result = tierdisk(server, "write", "ro", "0", *args, stdin=stdin, check=False)
        line = one_line_error(result, "volume 'ro'", "read-only")
        assert line.endswith("; nothing was written"), line


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


async def test_map_of_a_fragmented_volume_prints_every_run(tmp_path: Path) -> None:
    """A volume with more runs than one GetAllocation reply carries (max_io 1 MiB): ``map``
    prints them all, as if one reply had (the client asks in windows)."""
    async with fragmented_server(tmp_path) as srv:
        env = {**os.environ, "TIERDISK_SERVER": srv.grpc_address}
        result = await asyncio.to_thread(
            subprocess.run, [*TIERDISK, "map", "frag"], capture_output=True, env=env, timeout=60
        )
    assert result.returncode == 0 and result.stderr == b"", result.stderr.decode()
    runs = [tuple(map(int, line.split("\t"))) for line in result.stdout.decode().splitlines()]
    assert runs == fragmented_extents()


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("sig", "status", "words"), STOPS)
async def test_a_map_into_a_stalled_pipe_stops_on_a_signal(
    tmp_path: Path, sig: signal.Signals, status: int, words: str
) -> None:
    """``map`` (1.5 MB of lines here) into a pipe whose reader stalls: a stop signal ends it
    at once, as it ends ``export VOL -`` (its lines were written on the event loop's
    thread, so the signal waited until the pipe moved again)."""
    async with fragmented_server(tmp_path) as srv:
        read_end, write_end = os.pipe()  # nobody reads it: it takes 64 KiB, then stalls
        try:
            returncode, err = await asyncio.to_thread(
                _stopped_once_stalled,
                srv.grpc_address,
                ["map", "frag"],
                sig,
                read_end,
                stdout=write_end,
            )
        finally:
            os.close(read_end)
    assert returncode == status, err
    assert err.splitlines() == [f"tierdisk: {words}"]


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


def export_bytes(server_address: str, volume: str, into: Path | None) -> bytes:
    """What ``tierdisk export VOLUME`` writes into the file ``into``, or to a pipe (None)."""
    env = {**os.environ, "TIERDISK_SERVER": server_address}
    result = subprocess.run(
        [*TIERDISK, "export", volume, str(into) if into else "-"],
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr.decode()
    return into.read_bytes() if into else result.stdout


@pytest.mark.parametrize("into", ["file", "pipe"])
async def test_export_of_a_fragmented_volume_reads_runs_together(tmp_path: Path, into: str) -> None:
    """~60,000 one-sector runs: the export is byte for byte the volume, and runs close
    together share a Read (a request per run took half a minute)."""
    f, g = FRAGMENT, FRAGMENT_GAP
    expected = bytearray(2 * (f + g) * 512)
    for s in (*range(0, f, 2), *range(f + g, 2 * f + g, 2)):
        expected[s * 512 : (s + 1) * 512] = b"\xa5" * 512
    expected[f * 512 : (f + g) * 512] = b"\x5a" * (g * 512)
    out = tmp_path / "frag.img" if into == "file" else None
    async with fragmented_server(tmp_path) as srv:
        exported = await asyncio.to_thread(export_bytes, srv.grpc_address, "frag", out)
        labels = {"volume": "frag", "op": "read", "code": "OK"}
        reads = metric(srv, "tierdisk_volume_io_requests_total", **labels)
    assert exported == expected
    # 62 MB of volume, 60,000 runs of one sector 512 bytes apart: read in 1 MiB windows
    assert 0 < reads <= 2 * len(expected) // (1 << 20) + 4


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("sig", "status", "words"), STOPS)
@pytest.mark.parametrize("source", ["stdin", "fifo"])
def test_a_write_from_a_stalled_pipe_stops_on_a_signal(
    server: ServerProcess,
    tmp_path: Path,
    source: str,
    sig: signal.Signals,
    status: int,
    words: str,
) -> None:
    """``write`` from a pipe whose writer sent 1 MiB and then stalls (keeps it open, sends
    nothing): a stop signal ends it at once, saying the 1 MiB was written (a read blocked on
    the pipe held the exit, or the closing of the input, until the writer closed it)."""
    env = {**os.environ, "TIERDISK_SERVER": server.grpc}
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    read_end, write_end = os.pipe() if source == "stdin" else (-1, -1)
    args = ["write", "intr", "0"] + (["-i", str(fifo)] if source == "fifo" else [])
    proc = subprocess.Popen(
        [*TIERDISK_SIGNALLED, *args],
        stdin=read_end if source == "stdin" else subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    if source == "stdin":
        os.close(read_end)
    else:
        write_end = os.open(fifo, os.O_WRONLY)  # waits for the verb to open it
    try:
        os.write(write_end, os.urandom(MiB))  # one whole chunk, then nothing more
        time.sleep(1.5)  # the chunk is written, the next read waits (never a false pass)
        assert proc.poll() is None
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=10)  # not when the writer closes: never here
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(write_end)
    assert proc.returncode == status, err.decode()
    line = err.decode().splitlines()[-1]
    assert line.startswith(f"tierdisk: {words}"), line
    assert "the 1048576 bytes before were written from sector 0" in line, line


@pytest.mark.parametrize(("sig", "status", "words"), STOPS[:2])
@pytest.mark.parametrize("source", ["file", "pipe"])
def test_write_interrupted_says_what_was_written(
    server: ServerProcess,
    tmp_path: Path,
    source: str,
    sig: signal.Signals,
    status: int,
    words: str,
) -> None:
    """Ctrl-C mid-write: exit 130 and one line, ``interrupted; `` and what was written; the
    volume holds the data that far, and nothing past what may have been written in part.
    SIGTERM alike: exit 143, ``interrupted by SIGTERM; `` and what was written."""
    size = 64 * MiB
    zeros, data = tmp_path / "zeros.bin", tmp_path / "data.bin"
    zeros.write_bytes(bytes(size))
    data.write_bytes(os.urandom(size))
    tierdisk(server, "write", "intr", "0", "-i", str(zeros))
    # ~65 bytes come back per 1 MiB write: the proxy stalls some 20 writes in
    with CuttingProxy(server.grpc, 1500, stall=True) as proxy:
        args = ["write", "intr", "0"] + (["-i", str(data)] if source == "file" else [])
        proc = subprocess.Popen(
            [*TIERDISK_SIGNALLED, "--server", proxy.address, *args],
            stdin=subprocess.PIPE if source == "pipe" else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

        def feed() -> None:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError), open(data, "rb") as f:
                while chunk := f.read(MiB):
                    proc.stdin.write(chunk)
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()

        feeder = threading.Thread(target=feed, daemon=True)
        if source == "pipe":
            feeder.start()
        try:
            assert proxy.cut.wait(60)
            proc.send_signal(sig)
            assert proc.stderr is not None
            err = proc.stderr.read()
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        if source == "pipe":
            feeder.join(10)
    assert proc.returncode == status, err.decode()
    line = one_line_error(
        subprocess.CompletedProcess(proc.args, status, b"", err), returncode=status
    )
    found = re.fullmatch(
        f"tierdisk: {words}; "
        r"(?:nothing was written|nothing was written for sure"
        r"|the (\d+) bytes before were written from sector 0)"
        r"(?:; sectors (\d+)\.\.(\d+) may have been written in part)?",
        line,
    )
    assert found, line
    prefix = int(found[1] or 0)
    reach = int(found[3]) * 512 if found[3] else prefix
    assert prefix > 0  # some 20 writes were answered before the stall
    volume = tierdisk(server, "read", "intr", "0", str(size // 512)).stdout
    assert volume[:prefix] == data.read_bytes()[:prefix]
    assert volume[reach:] == bytes(size - reach)


def test_a_failed_copy_to_stdout_leaves_no_writer_thread(
    server: ServerProcess, exp_data: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``read`` into a pipe whose reader goes away (a broken pipe: exit 1, quietly) ends its
    stdout writer thread too, as a copy that succeeds does: a process that runs verbs in
    turn (``main()`` called in-process) keeps no thread per failed copy."""
    monkeypatch.setenv("TIERDISK_NO_UVLOOP", "1")  # leave this process's loop policy alone

    def writers() -> int:
        return sum(t.name == "stdout-writer" and t.is_alive() for t in threading.enumerate())

    def read_a_little_and_go(fd: int) -> None:
        os.read(fd, 1000)
        os.close(fd)

    before = writers()
    for _ in range(3):
        r, w = os.pipe()
        reader = threading.Thread(target=read_a_little_and_go, args=(r,))
        reader.start()
        out = io.TextIOWrapper(io.FileIO(w, "wb"))
        monkeypatch.setattr(sys, "stdout", out)
        args = ["--server", server.grpc, "--no-progress", "read", "exp", "0", "16384"]
        assert cli_main(args) == 1
        reader.join(10)
        monkeypatch.undo()
        monkeypatch.setenv("TIERDISK_NO_UVLOOP", "1")
        with contextlib.suppress(OSError, ValueError):
            out.close()
    deadline = time.monotonic() + 10
    while writers() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert writers() == before


@pytest.mark.parametrize("verb", ["write", "import"])
def test_write_and_import_return_once_the_data_is_durable(tmp_path: Path, verb: str) -> None:
    """They end with a flush: a kill of the server right after the command returns loses
    nothing (a ``sparse`` layer keeps what was written before its last flush)."""
    listen = f"127.0.0.1:{free_port()}"
    config = write_config(
        tmp_path, toml_volume("v", {"kind": "sparse", "path": "v.sparse", "size": "1MiB"})
    )
    data = pattern(5, 0, 16, 512)
    image = tmp_path / "in.img"
    image.write_bytes(data)
    args = ["write", "v", "0", "-i", str(image)] if verb == "write" else ["import", "v", str(image)]
    srv = ServerProcess.start(tmp_path, config, listen=listen)
    try:
        tierdisk(srv, *args)
        srv.close()
        srv = ServerProcess.start(tmp_path, config, listen=listen)
        assert tierdisk(srv, "read", "v", "0", "16").stdout == data
    finally:
        srv.close()


# -- a flush later, for writes of an earlier command ---------------------------------------


@pytest.mark.parametrize("restart", ["none", "clean", "crash"])
def test_a_later_flush_given_the_verifier_tells_of_writes_lost_between(
    tmp_path: Path, restart: str
) -> None:
    """``import --no-flush`` prints the write verifier its writes were acknowledged with;
    ``flush VOL --verifier V`` later fails (writes lost, exit 1) when the server restarted
    without a clean stop in between, as the import's own flush would have. A plain
    ``flush`` cannot tell (it wrote nothing itself): it answers 0. A clean restart keeps the
    verifier: the later flush vouches for the writes."""
    sparse = {"kind": "sparse", "path": "v", "size": "1MiB"}
    config = write_config(tmp_path, toml_volume("v", sparse))
    image = tmp_path / "d.bin"
    image.write_bytes(os.urandom(64 * 1024))
    server = ServerProcess.start(tmp_path, config)
    try:
        done = tierdisk(server, "--no-progress", "import", "--no-flush", "v", str(image))
        verifier = re.fullmatch(rb"write verifier (0x[0-9a-f]{16})\n", done.stdout)
        assert verifier is not None, done.stdout
        if restart != "none":
            if restart == "crash":
                server.kill()
            else:
                assert server.terminate() == 0
            server = ServerProcess.start(tmp_path, config)
        assert tierdisk(server, "flush", "v").returncode == 0  # nothing of its own to vouch for
        later = tierdisk(server, "flush", "v", "--verifier", verifier[1].decode(), check=False)
        if restart == "crash":
            one_line_error(later, "writes lost", verifier[1].decode())
        else:
            assert later.returncode == 0, later.stderr.decode()
    finally:
        server.kill()


@pytest.mark.parametrize("given", ["12", "0x", "0x0", "0xfffffffffffffffff", "0xg1"])
def test_a_flush_verifier_that_is_no_verifier_is_refused(server: ServerProcess, given: str) -> None:
    """A bad argument: argparse's usage line and the error naming it, exit 2."""
    bad = tierdisk(server, "flush", "rw", "--verifier", given, check=False)
    assert bad.returncode == 2
    assert "argument --verifier: not a write verifier" in bad.stderr.decode()
    assert repr(given) in bad.stderr.decode()
