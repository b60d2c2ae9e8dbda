"""tierdisk.client.import_verbs (client/import_verbs.py): ``write`` and ``import`` through the
``tierdisk`` command against a real server (a ``tierdisk serve`` child process, or an
in-process server with a layer double): partial sectors and oversized images refused before
anything is written; a sparse import (from a file or stdin) that unmaps the image's holes, or
writes zeros there on a volume whose unmap would not read back as zeros; an input file that is
a pipe written as it arrives (a bad length at its end naming it; a bad chunk from a pipe
refused once those before it are written); and the flush they end with: the data durable once
they return, a stop during it, or ``--no-flush`` whose verifier cannot be printed, saying that
all of it was written."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from cli_runs import (
    STOPS,
    TIERDISK,
    TIERDISK_SIGNALLED,
    MiB,
    fs_supports_holes,
    one_line_error,
    tierdisk,
)
from servers import ServerProcess, free_port, ram, running_server, toml_volume, write_config
from stacks import MapLayer, pattern

from tierdisk.service.layer import UnmapBehavior
from tierdisk.service.volume import LayerEntry, Volume

# -- import ----------------------------------------------------------------------------


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


@pytest.mark.parametrize(
    ("magic", "name"),
    [(b"QFI\xfb", "qcow2"), (b"KDMV", "VMDK"), (b"vhdxfile", "VHDX"), (b"conectix", "VHD")],
    ids=["qcow2", "vmdk", "vhdx", "vhd"],
)
def test_import_refuses_another_image_formats_file_unless_raw(
    server: ServerProcess, tmp_path: Path, magic: bytes, name: str
) -> None:
    """An image that begins with a qcow2 (VMDK, …) header would put that file's bytes on
    the volume, not the disk in it: refused before anything is written, from a file, from
    stdin redirected from it and from a pipe, naming the format and the conversion; with
    ``--raw`` its bytes are written as they are."""
    before = os.urandom(4096)
    tierdisk(server, "write", "rw", "0", stdin=before)
    image = tmp_path / f"disk.{name.lower()}"
    head = magic + os.urandom(4096 - len(magic))
    image.write_bytes(head)
    hint = f"qemu-img convert -O raw {image} OUT.raw"
    one_line_error(tierdisk(server, "import", "rw", str(image), check=False), name, hint)
    with open(image, "rb") as f:  # stdin from the file
        redirected = subprocess.run(
            [*TIERDISK, "--server", server.grpc, "import", "rw", "-"],
            stdin=f,
            capture_output=True,
            timeout=120,
        )
    one_line_error(redirected, f"stdin begins with a {name} header", "--raw")
    piped = tierdisk(server, "import", "rw", "-", stdin=head, check=False)  # a pipe
    one_line_error(piped, f"stdin begins with a {name} header", "nothing was written")
    assert tierdisk(server, "read", "rw", "0", "8").stdout == before
    tierdisk(server, "import", "rw", str(image), "--raw")
    assert tierdisk(server, "read", "rw", "0", "8").stdout == head


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


# -- write -----------------------------------------------------------------------------


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


# -- the flush they end with -----------------------------------------------------------


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
