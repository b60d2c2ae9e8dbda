"""The ``sqlite`` layer: the shared persistent-layer contract, plus what is SQLite's own.

Real SQLite files in a temporary folder; the schema is checked with the ``sqlite3`` module
the way an operator would look at a layer file (reference scenarios 56 to 59).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

import pytest
from conftest import VolumeOpener
from persistent_contract import SIZE, SS, PersistentLayerContract
from stacks import pattern

from tierdisk.service.errors import ConfigError, DataCorruption, Unavailable
from tierdisk.service.layers.raw import RawLayer
from tierdisk.service.layers.sqlite import SqliteLayer


class TestSqliteContract(PersistentLayerContract):
    layer_class = SqliteLayer


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
