"""tierdisk.client.export_verb (client/export_verb.py): ``export`` through the ``tierdisk``
command against a real server (a ``tierdisk serve`` child process): a failed or interrupted
export (its server cut off, or stalled, by a proxy) leaving IMAGE as it was and no temporary
file, or a FIFO as it was; every byte in order into a device, a pipe or stdout, and in place
into a file ``/dev/stdout`` is redirected to; never a new name in ``/dev``, but a file in
``/dev/shm`` replaced as anywhere else; through a symlink; to the longest file name there is;
onto the raw file, map or database a server serves the volume from, refused; a fragmented
volume read in runs that share requests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from cli_runs import (
    STOPS,
    TIERDISK,
    CuttingProxy,
    MiB,
    one_line_error,
    stopped_through_a_stall,
    tierdisk,
)
from servers import (
    FRAGMENT,
    FRAGMENT_GAP,
    ServerProcess,
    fragmented_server,
    metric,
    toml_volume,
    write_config,
)

# -- a failed export -------------------------------------------------------------------


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


# -- files, devices, pipes and stdout --------------------------------------------------


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


# -- chunking --------------------------------------------------------------------------


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
