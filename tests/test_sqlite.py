"""The ``sqlite`` layer: the shared persistent-layer contract, plus what is SQLite's own.

Real SQLite files in a temporary folder; the schema is checked with the ``sqlite3`` module
the way an operator would look at a layer file (reference scenarios 56 to 59).
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import VolumeOpener
from persistent_contract import SIZE, SS, PersistentLayerContract, fill_up, tiny_filesystem
from stacks import pattern
from tools import require_tool

from tierdisk.service.errors import (
    ConfigError,
    DataCorruption,
    NoSpace,
    StorageError,
    Unavailable,
)
from tierdisk.service.layer import Layer
from tierdisk.service.layers.raw import RawLayer
from tierdisk.service.layers.sqlite import SqliteLayer


class TestSqliteContract(PersistentLayerContract):
    layer_class = SqliteLayer

    def hold_shrink(
        self, layer: Layer, monkeypatch: pytest.MonkeyPatch, fail: bool
    ) -> tuple[threading.Event, threading.Event]:
        assert isinstance(layer, SqliteLayer)
        entered, go = threading.Event(), threading.Event()
        real = layer._resize_sync

        def held(sector_count: int) -> None:  # on the layer's worker thread
            entered.set()
            go.wait(10)
            if fail:
                raise sqlite3.OperationalError("disk I/O error")
            real(sector_count)

        monkeypatch.setattr(layer, "_resize_sync", held)
        return entered, go


def rows(path: Path, sql: str, *args: object) -> list[tuple[object, ...]]:
    db = sqlite3.connect(path)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


async def test_a_zero_sector_is_a_null_row_that_hides_the_layer_below(
    tmp_path: Path, volumes: VolumeOpener
) -> None:
    path = tmp_path / "top.db"
    raw = RawLayer(str(tmp_path / "lower.raw"), size=SIZE)
    volume = await volumes(SqliteLayer(str(path), size=SIZE), raw)
    await raw.write(memoryview(pattern(9, 0, 8, SS)), 0, False)
    await volume.write(2, bytes(SS) + pattern(1, 3, 1, SS))
    data, _ = await volume.read(0, 8)
    assert data[2 * SS : 3 * SS] == bytes(SS)  # scenario 56: zeros, present, lower hidden
    assert data[3 * SS : 4 * SS] == pattern(1, 3, 1, SS)
    assert await volume.allocation(0, 8) == [(0, 2, 1), (2, 4, 0), (4, 8, 1)]
    await volume.close()
    assert rows(path, "SELECT sector, data IS NULL, length(data) FROM sectors") == [
        (2, 1, None),
        (3, 0, SS),
    ]


async def test_unmap_rows(tmp_path: Path) -> None:
    path = tmp_path / "d.db"
    layer = SqliteLayer(str(path), size=SIZE)
    await layer.attach(None)
    await layer.write(memoryview(pattern(1, 0, 10, SS)), 0, False)
    await layer.unmap(2, 3, False, True)  # dropped: rows deleted
    await layer.unmap(6, 6, False, False)  # kept as zeros: NULL rows
    assert await layer.presence(0, 20) == [(0, 2), (5, 12)]
    assert layer.present_sectors == 9
    await layer.close()
    assert rows(path, "SELECT sector FROM sectors WHERE data IS NULL") == [
        (s,) for s in range(6, 12)
    ]
    assert rows(path, "SELECT sector FROM sectors WHERE data IS NOT NULL") == [(0,), (1,), (5,)]


async def test_no_overwrite_keeps_an_existing_row(tmp_path: Path) -> None:
    path = tmp_path / "d.db"
    layer = SqliteLayer(str(path), size=SIZE)
    await layer.attach(None)
    await layer.write(memoryview(bytes(SS)), 4, False)
    await layer.write_no_overwrite(memoryview(pattern(2, 3, 3, SS)), 3)  # scenario 57
    assert layer.present_sectors == 3
    await layer.close()
    assert rows(path, "SELECT sector, data IS NULL FROM sectors") == [(3, 0), (4, 1), (5, 0)]


async def test_meta_records_geometry_in_a_wal_database(tmp_path: Path) -> None:
    path = tmp_path / "d.db"
    layer = SqliteLayer(str(path), size=SIZE, sector_size=4096)
    await layer.attach(None)
    await layer.resize(SIZE // 4096 + 5)
    await layer.close()
    meta = {key: value for key, value in rows(path, "SELECT key, value FROM meta")}
    assert meta["sector_size"] == 4096 and meta["sector_count"] == SIZE // 4096 + 5
    assert meta["format"] == "tierdisk-sqlite" and meta["version"] == 1
    assert rows(path, "PRAGMA journal_mode") == [("wal",)]
    assert sorted(os.listdir(tmp_path)) == ["d.db", "d.db.lock"]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        # scenario 59
        ("CREATE TABLE sectors (sector INTEGER PRIMARY KEY, data BLOB)", "missing meta table"),
        # a table called meta without tierdisk's columns: not "no such column: key"
        ("CREATE TABLE meta (x)", ".*not a tierdisk sqlite layer"),
    ],
    ids=["no meta", "another program's meta"],
)
async def test_a_database_of_another_program_is_refused(
    tmp_path: Path, table: str, message: str
) -> None:
    path = tmp_path / "d.db"
    db = sqlite3.connect(path)
    db.execute(table)
    db.commit()
    db.close()
    with pytest.raises(ConfigError, match=rf"{path}: {message}"):
        await SqliteLayer(str(path), size=SIZE).attach(None)


async def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.db"
    path.write_bytes(b"definitely not a database" * 200)
    with pytest.raises(ConfigError, match=rf"{path} is not a readable SQLite database"):
        await SqliteLayer(str(path)).attach(None)


async def test_damaged_pages_are_data_corruption_at_open(tmp_path: Path) -> None:
    """A tierdisk sqlite file whose pages were overwritten is corrupt data, not a config
    mistake (``tierdisk serve`` then says "cannot start", not "config error")."""
    path = tmp_path / "d.db"
    layer = SqliteLayer(str(path), size=SIZE)
    await layer.attach(None)
    await layer.close()
    damaged = bytearray(path.read_bytes())
    for offset in range(4096, len(damaged), 4096):  # every page but the first (the header)
        damaged[offset : offset + 64] = b"\xff" * 64
    path.write_bytes(damaged)
    with pytest.raises(DataCorruption, match=rf"{path}: the database file is corrupt"):
        await SqliteLayer(str(path)).attach(None)


async def test_a_blob_of_the_wrong_length_is_data_corruption(tmp_path: Path) -> None:
    path = tmp_path / "d.db"
    layer = SqliteLayer(str(path), size=SIZE)
    await layer.attach(None)
    await layer.close()
    db = sqlite3.connect(path)
    db.execute("INSERT INTO sectors VALUES (7, x'0102')")
    db.commit()
    db.close()
    layer = SqliteLayer(str(path))
    await layer.attach(None)
    try:
        with pytest.raises(DataCorruption, match="sector 7 holds 2 bytes"):
            await layer.read(memoryview(bytearray(16 * SS)), 0)
    finally:
        await layer.close()


@pytest.mark.parametrize(
    ("value", "held"),
    [(12345, "a value of type int"), ("x" * SS, "a value of type str")],
    ids=["int", "text"],
)
async def test_a_value_that_is_not_a_blob_is_data_corruption(
    tmp_path: Path, value: object, held: str
) -> None:
    """The ``data`` column takes any type: a damaged or hand-edited database holding a
    number or text there is DATA_LOSS naming the sector, not a Python error (UNKNOWN)."""
    path = tmp_path / "d.db"
    layer = SqliteLayer(str(path), size=SIZE)
    await layer.attach(None)
    await layer.close()
    db = sqlite3.connect(path)
    db.execute("INSERT INTO sectors VALUES (3, ?)", (value,))
    db.commit()
    db.close()
    layer = SqliteLayer(str(path))
    await layer.attach(None)
    try:
        with pytest.raises(DataCorruption, match=f"sector 3 holds {held}, not {SS} bytes"):
            await layer.read(memoryview(bytearray(16 * SS)), 0)
    finally:
        await layer.close()


async def test_a_large_write_is_one_transaction_of_rows(tmp_path: Path) -> None:
    path = tmp_path / "d.db"
    layer = SqliteLayer(str(path), size=SIZE)
    await layer.attach(None)
    data = bytearray(pattern(3, 0, 200, SS))
    data[50 * SS : 60 * SS] = bytes(10 * SS)
    await layer.write(memoryview(data), 0, True)
    buf = bytearray(200 * SS)
    assert await layer.read(memoryview(buf), 0) == [(0, 200)]
    assert buf == data
    await layer.close()
    assert rows(path, "SELECT count(*), sum(data IS NULL) FROM sectors") == [(200, 10)]


async def test_calls_queued_before_close_finish_and_later_ones_are_unavailable(
    tmp_path: Path,
) -> None:
    """A write queued on the worker when close begins is written (close runs after it);
    one made after close began is UNAVAILABLE, not an internal error."""
    path = str(tmp_path / "db")
    layer = SqliteLayer(path, size=SIZE)
    await layer.attach(None)
    queued = asyncio.create_task(layer.write(memoryview(pattern(1, 3, 1, SS)), 3, False))
    await asyncio.sleep(0)
    closing = asyncio.create_task(layer.close())
    await asyncio.sleep(0)
    with pytest.raises(Unavailable, match="closed"):
        await layer.write(memoryview(pattern(2, 5, 1, SS)), 5, False)
    await queued
    await closing
    with pytest.raises(Unavailable, match="closed"):
        await layer.read(memoryview(bytearray(SS)), 3)
    again = SqliteLayer(path)
    await again.attach(None)
    try:
        buf = bytearray(SS)
        assert await again.read(memoryview(buf), 3) == [(3, 4)] and bytes(buf) == pattern(
            1, 3, 1, SS
        )
    finally:
        await again.close()


async def test_a_layer_made_afresh_ignores_an_old_databases_wal(tmp_path: Path) -> None:
    """Deleting a layer's database to start afresh (after a crash, its WAL still beside it)
    gives an empty layer, not the old WAL's sectors replayed into the new one."""
    path = tmp_path / "v.db"
    layer = SqliteLayer(str(path), size=SIZE)
    await layer.attach(None)
    await layer.write(memoryview(pattern(1, 0, 8, SS)), 0, False)
    wal = (tmp_path / "v.db-wal").read_bytes()  # as a crash would leave it
    await layer.close()
    path.unlink()
    (tmp_path / "v.db-wal").write_bytes(wal)
    fresh = SqliteLayer(str(path), size=SIZE)
    await fresh.attach(None)
    try:
        assert fresh.present_sectors == 0
        buf = bytearray(8 * SS)
        assert await fresh.read(memoryview(buf), 0) == [] and bytes(buf) == bytes(8 * SS)
    finally:
        await fresh.close()


# -- a full disk (a real tmpfs, mounted by the test) ------------------------------------------


def inode(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


async def full_after_writes(layer: SqliteLayer, mnt: Path) -> bytes:
    """Write and flush sectors 0-63, fill the filesystem, then write sectors 500-507 (they
    fit in the WAL's blocks, which it reuses after a checkpoint; the database would have to
    grow to take them). Returns what those 8 sectors hold."""
    await layer.write(memoryview(pattern(1, 0, 64, 4096)), 0, False)
    await layer.flush()
    fill_up(mnt / "ballast")
    data = pattern(2, 500, 8, 4096)
    await layer.write(memoryview(data), 500, False)  # acknowledged: in the WAL
    return data


async def test_a_flush_whose_checkpoint_runs_out_of_space_syncs_the_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a full disk a checkpoint fails copying pages into the database, which cannot grow
    (SQLITE_FULL), though every commit is in the WAL: the flush syncs the WAL by itself (no
    space needed) and succeeds, not "writes acknowledged before may be lost" (a false alarm
    that renewed the write verifier). The acknowledged sectors are in the files as a crash
    would leave them, and in the layer after a restart."""
    synced: list[tuple[int, int]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(inode(fd))
        real_fsync(fd)

    with tiny_filesystem(tmp_path / "tiny") as mnt:
        path = mnt / "l"
        layer = SqliteLayer(str(path), size=8 << 20, sector_size=4096)
        await layer.attach(None)
        try:
            data = await full_after_writes(layer, mnt)
            monkeypatch.setattr(os, "fsync", fsync)
            await layer.flush()
            monkeypatch.undo()
            wal = os.stat(f"{path}-wal")
            assert (wal.st_dev, wal.st_ino) in synced, "the WAL was not synced"
            crashed = tmp_path / "crashed"
            crashed.mkdir()
            shutil.copy(path, crashed / "l")
            shutil.copy(f"{path}-wal", crashed / "l-wal")
            await layer.flush()  # nothing new: fine
        finally:
            await layer.close()
        await _holds(path, data)  # opened again, on the disk still full
    await _holds(crashed / "l", data)  # what a crash right after the flush leaves


async def _holds(path: Path, data: bytes) -> None:
    """The sqlite layer at ``path`` opens and holds ``data`` at sectors 500-507 (4 KiB)."""
    layer = SqliteLayer(str(path))
    await layer.attach(None)
    try:
        buf = bytearray(8 * 4096)
        assert await layer.read(memoryview(buf), 500) == [(500, 508)] and buf == data
    finally:
        await layer.close()


async def test_a_flush_that_can_sync_neither_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real failure is still reported: a checkpoint out of space and a WAL whose fsync
    fails too (EIO) fail the flush, saying both."""
    with tiny_filesystem(tmp_path / "tiny") as mnt:
        path = mnt / "l"
        layer = SqliteLayer(str(path), size=8 << 20, sector_size=4096)
        await layer.attach(None)
        try:
            await full_after_writes(layer, mnt)
            wal = os.stat(f"{path}-wal")
            real_fsync = os.fsync

            def fsync(fd: int) -> None:
                if inode(fd) == (wal.st_dev, wal.st_ino):
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
                real_fsync(fd)

            monkeypatch.setattr(os, "fsync", fsync)
            with pytest.raises(StorageError) as info:
                await layer.flush()
            monkeypatch.undo()
            assert not isinstance(info.value, NoSpace)
            message = str(info.value)
            assert "out of space" in message and f"{path}-wal failed: Input/output error" in message
        finally:
            await layer.close()


async def test_a_new_layer_on_a_full_disk_cannot_start_and_leaves_nothing(tmp_path: Path) -> None:
    """Creating a layer on a full filesystem is a storage failure ("cannot start"), not a
    config error (NoSpace), and removes what it made: no ``.tmp`` (or its WAL), no
    ``.lock``. Once there is room, the same layer is made."""
    with tiny_filesystem(tmp_path / "tiny", "1m") as mnt:
        fill_up(mnt / "ballast")
        path = mnt / "new.db"
        with pytest.raises(
            StorageError, match=rf"cannot create sqlite layer {path} .*out of space"
        ):
            await SqliteLayer(str(path), size=SIZE).attach(None)
        assert sorted(os.listdir(mnt)) == ["ballast"]
        (mnt / "ballast").unlink()
        layer = SqliteLayer(str(path), size=SIZE)
        await layer.attach(None)
        await layer.close()
        assert sorted(os.listdir(mnt)) == ["new.db", "new.db.lock"]


# -- a path that is not a regular file --------------------------------------------------------


async def test_a_path_that_is_not_a_regular_file_gets_no_lock_file_beside_it(
    tmp_path: Path,
) -> None:
    """A FIFO (``/dev/null``, a folder) is refused before ``PATH.lock`` is made beside it
    (``path = "/dev/null"`` made ``/dev/null.lock``)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    for path in (fifo, folder):
        with pytest.raises(StorageError, match=rf"{path} is not a regular file"):
            await asyncio.wait_for(SqliteLayer(str(path), size=SIZE).attach(None), 10)
    assert sorted(os.listdir(tmp_path)) == ["fifo", "folder"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


# -- write-protected files ----------------------------------------------------------------------

OPEN_AND_WRITE = """
import asyncio, sys
from tierdisk.service.layers.sqlite import SqliteLayer

async def main() -> None:
    layer = SqliteLayer(sys.argv[1])
    try:
        await layer.attach(None)
    except Exception as exc:
        print(f"REFUSED {type(exc).__name__}: {exc}")
        return
    try:
        await layer.write(memoryview(bytes(512)), 0, True)
        await layer.flush()
        print("SERVED")
    except Exception as exc:
        print(f"FAILED {type(exc).__name__}: {exc}")
    finally:
        await layer.close()

asyncio.run(main())
"""


async def run_python(*args: str, prefix: tuple[str, ...] = ()) -> str:
    """Run ``python -c`` ``args`` in a child process (after the command ``prefix``); its
    stdout, asserting it exited 0."""
    proc = await asyncio.create_subprocess_exec(
        *prefix,
        sys.executable,
        "-c",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode(errors="replace")
    return out.decode()


def protect(path: Path, protected: str, wal: bytes) -> None:
    """Put beside the closed layer ``path`` the WAL ``wal`` (as a crash would leave it) and
    a ``-shm`` (an old build's, or another program's), then write-protect
    ``PATH{protected}`` (``/``: the folder, without the WAL, which SQLite must then make)."""
    Path(f"{path}-shm").write_bytes(bytes(32768))
    if protected == "/":
        path.parent.chmod(0o555)
    else:
        Path(f"{path}-wal").write_bytes(wal)
        Path(f"{path}{protected}").chmod(0o444)


def without_root_powers() -> tuple[str, ...]:
    """The command prefix that runs a process the way permission bits apply to it: as root
    (the tests' usual user), without the capabilities that bypass them (``setpriv`` drops
    them from the bounding set; the files stay root's, so their owner bits count); else
    nothing. Skips when that is not possible."""
    if os.geteuid() != 0:
        return ()
    setpriv = require_tool("setpriv")
    prefix = (setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner")
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot drop capabilities with setpriv: {probe.stderr.strip()}")
    return prefix


@pytest.mark.parametrize(
    ("protected", "says"),
    [
        ("", "REFUSED StorageError: cannot open sqlite layer PATH: Permission denied"),
        (
            "-wal",
            "REFUSED StorageError: cannot open sqlite layer PATH: its WAL PATH-wal: "
            "Permission denied",
        ),
        (
            ".lock",
            "REFUSED StorageError: cannot open sqlite layer PATH: its lock file PATH.lock: "
            "Permission denied",
        ),
        ("-shm", "SERVED"),  # the layer makes and needs no -shm (exclusive mode)
        (
            "/",
            "REFUSED StorageError: cannot open sqlite layer PATH: SQLite can only read it "
            "(attempt to write a readonly database): its folder FOLDER is not writable",
        ),
    ],
    ids=["database", "wal", "lock-file", "shm", "folder"],
)
async def test_a_write_protected_file_is_refused_at_open_naming_it(
    tmp_path: Path, protected: str, says: str
) -> None:
    """SQLite opens a database it cannot write read-only, quietly: the server started and
    every write then failed INTERNAL ("attempt to write a readonly database"). The open is
    refused instead, naming the file at fault (the lock file's fault named the database
    before). Run in a child process without root's power to ignore permission bits."""
    prefix = without_root_powers()
    folder = tmp_path / "layer"
    folder.mkdir()
    path = folder / "l.db"
    layer = SqliteLayer(str(path), size=SIZE)
    await layer.attach(None)
    await layer.write(memoryview(pattern(1, 0, 8, SS)), 0, False)
    wal = (folder / "l.db-wal").read_bytes()
    await layer.close()
    protect(path, protected, wal)
    try:
        out = await run_python(OPEN_AND_WRITE, str(path), prefix=prefix)
    finally:
        folder.chmod(0o755)
    expected = says.replace("PATH", str(path)).replace("FOLDER", str(folder))
    assert out.startswith(expected), out


# -- other SQLite clients -------------------------------------------------------------------------

HOLD_A_WRITE_LOCK = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=0)
db.execute("BEGIN IMMEDIATE")
db.execute("DELETE FROM sectors WHERE sector < 4")
print("held", flush=True)
sys.stdin.read()  # until the test closes it
db.execute("ROLLBACK")
"""

TRY_READ_AND_DELETE = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=0)
for sql in ("SELECT COUNT(*) FROM sectors", "DELETE FROM sectors WHERE sector < 4"):
    try:
        db.execute(sql).fetchall()
        print(sql.split()[0], "done")
    except sqlite3.Error as exc:
        print(sql.split()[0], exc)
"""


async def test_a_lock_held_by_another_sqlite_connection_refuses_the_open(tmp_path: Path) -> None:
    """An ``sqlite3`` session holding a write transaction (an operator's, say) made the
    server start anyway, then stall each write for 5 s and fail it "database is locked".
    Now the open is refused at once, as a second server's would be."""
    path = tmp_path / "d.db"
    layer = SqliteLayer(str(path), size=SIZE)
    await layer.attach(None)
    await layer.write(memoryview(pattern(1, 0, 8, SS)), 0, True)
    await layer.close()
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLD_A_WRITE_LOCK,
        str(path),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert await asyncio.wait_for(holder.stdout.readline(), 30) == b"held\n"
        started = time.monotonic()
        with pytest.raises(ConfigError, match=rf"sqlite layer {path} is already open .*locked"):
            await SqliteLayer(str(path)).attach(None)
        assert time.monotonic() - started < 2, "the open waited for the lock"
    finally:
        holder.stdin.close()
        assert await asyncio.wait_for(holder.wait(), 30) == 0
    again = SqliteLayer(str(path))  # released: it opens, with its sectors
    await again.attach(None)
    try:
        assert again.present_sectors == 8
    finally:
        await again.close()


async def test_other_sqlite_connections_cannot_touch_a_served_layer(tmp_path: Path) -> None:
    """While the layer is open, another connection can neither read nor delete its rows
    (it deleted acknowledged, flushed sectors under the server, and inspect went on
    counting them), and the layer's own writes never wait for it."""
    path = tmp_path / "d.db"
    layer = SqliteLayer(str(path), size=SIZE)
    await layer.attach(None)
    try:
        await layer.write(memoryview(pattern(1, 0, 8, SS)), 0, False)
        await layer.flush()
        out = await run_python(TRY_READ_AND_DELETE, str(path))
        assert out.splitlines() == ["SELECT database is locked", "DELETE database is locked"], out
        started = time.monotonic()
        await layer.write(memoryview(pattern(2, 8, 1, SS)), 8, False)
        await layer.flush()
        await layer.resize(SIZE // SS + 8)
        assert time.monotonic() - started < 2
        buf = bytearray(9 * SS)
        assert await layer.read(memoryview(buf), 0) == [(0, 9)]
        assert buf == pattern(1, 0, 8, SS) + pattern(2, 8, 1, SS)
        assert layer.present_sectors == 9
        assert sorted(os.listdir(tmp_path)) == ["d.db", "d.db-wal", "d.db.lock"]  # no -shm
    finally:
        await layer.close()
    assert rows(path, "SELECT COUNT(*) FROM sectors") == [(9,)]  # closed: others may read


# -- a database removed or replaced while served --------------------------------------------------


@pytest.mark.parametrize("how", ["removed", "replaced by another file"])
async def test_a_database_removed_or_replaced_while_served_fails_the_flush(
    tmp_path: Path, how: str
) -> None:
    """``rm`` of the database, or an older copy renamed over it (a backup restored), while
    the server runs: what it writes and syncs goes to a file the next start does not open
    (or replays the WAL onto the restored copy: "malformed"). Flush answered OK; now it
    fails, every time, with or without writes since."""
    path = tmp_path / "d.db"
    layer = SqliteLayer(str(path), size=SIZE)
    await layer.attach(None)
    try:
        await layer.write(memoryview(pattern(1, 0, 8, SS)), 0, False)
        await layer.flush()
        if how == "removed":
            path.unlink()
        else:
            shutil.copy(path, tmp_path / "backup.db")
            os.replace(tmp_path / "backup.db", path)
        with pytest.raises(StorageError, match=rf"flushing sqlite layer {path}: {path} was {how}"):
            await layer.flush()
        await layer.write(memoryview(pattern(2, 8, 1, SS)), 8, False)
        with pytest.raises(StorageError, match=f"was {how} while served"):
            await layer.flush()
        # a FUA write is durable for good once answered: not so either
        with pytest.raises(StorageError, match=f"writing sqlite layer {path}: .*was {how}"):
            await layer.write(memoryview(pattern(3, 9, 1, SS)), 9, True)
    finally:
        await layer.close()


async def test_a_fua_write_commits_with_a_full_sync(tmp_path: Path) -> None:
    """A FUA write is durable when it returns: its transaction commits with
    ``synchronous=FULL`` (the WAL synced), where a plain write commits as ``NORMAL`` (synced
    by the next flush). Only a power cut would show the difference, so the statements the
    layer runs are traced."""
    layer = SqliteLayer(str(tmp_path / "d.db"), size=SIZE)
    await layer.attach(None)
    try:
        run: list[str] = []
        await layer._call("tracing", lambda: layer._conn().set_trace_callback(run.append))
        await layer.write(memoryview(pattern(1, 1, 1, SS)), 1, True)
        assert run[0] == "PRAGMA synchronous=FULL", run
        assert run[-2:] == ["COMMIT", "PRAGMA synchronous=NORMAL"], run
        run.clear()
        await layer.write(memoryview(pattern(2, 2, 1, SS)), 2, False)
        assert "COMMIT" in run and not any("synchronous" in sql for sql in run), run
    finally:
        await layer.close()
