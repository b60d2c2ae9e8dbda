"""tierdisk.service.layers.layer_files (service/layers/layer_files.py): a layer file
configured as another kind is refused before it is read or written, naming the kind to serve
it as; real layers on real files, no mocks.

What its docstrings promise: a tierdisk ``sqlite`` layer's database (its header, and its lock
file beside it) is refused as ``raw`` (a write would overwrite the database) and as
``sparse``, and left unchanged, but the header alone, written by a client into a raw volume,
is not; a ``sparse``
layer's data file is refused as ``sqlite`` with no lock file left behind (as ``raw``:
``tests/test_raw.py``); any other SQLite database, or a file with no mark, is no other
kind's file; a ``sqlite`` open refused for a file that is no database of ours leaves no
``PATH.lock`` beside it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from stacks import pattern

from tierdisk.service.errors import ConfigError
from tierdisk.service.layers.layer_files import file_kind
from tierdisk.service.layers.raw import RawLayer
from tierdisk.service.layers.sparse import SparseLayer
from tierdisk.service.layers.sqlite import SqliteLayer

SS = 512


async def made(layer: RawLayer | SparseLayer | SqliteLayer) -> None:
    """Attach ``layer``, write sectors 2-3, flush and close it: a layer file holding data."""
    await layer.attach(None)
    await layer.write(memoryview(pattern(1, 2, 2, SS)), 2, fua=False)
    await layer.flush()
    await layer.close()


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("read_only", [False, True])
async def test_a_sqlite_layers_database_is_refused_as_raw_and_left_unchanged(
    tmp_path: Path, read_only: bool
) -> None:
    path = tmp_path / "v.db"
    await made(SqliteLayer(str(path), size=SS * 16))
    before = path.read_bytes()
    assert file_kind(str(path)) == "sqlite"
    with pytest.raises(ConfigError, match=f"raw image {path} is a tierdisk sqlite") as info:
        await RawLayer(str(path), read_only=read_only).attach(None)
    assert 'serve it as kind = "sqlite"' in str(info.value)
    assert path.read_bytes() == before
    layer = SqliteLayer(str(path))  # still the database it was, with its data
    await layer.attach(None)
    buf = bytearray(2 * SS)
    await layer.read(memoryview(buf), 2)
    await layer.close()
    assert bytes(buf) == pattern(1, 2, 2, SS)


@pytest.mark.parametrize(
    ("made_as", "served_as", "refusal", "advice"),
    [
        (SqliteLayer, SparseLayer, "sparse layer {path} is a tierdisk sqlite", 'kind = "sqlite"'),
        (SparseLayer, SqliteLayer, "{path}.map", 'serve it as kind = "sparse"'),
    ],
)
async def test_a_layer_file_served_as_another_file_kind_is_refused_and_left_as_it_is(
    tmp_path: Path,
    made_as: type[SparseLayer | SqliteLayer],
    served_as: type[SparseLayer | SqliteLayer],
    refusal: str,
    advice: str,
) -> None:
    """A sqlite layer's database as sparse (no map is made beside it), a sparse layer's data
    file as sqlite (no lock file is left beside it): refused, naming the kind to serve it as,
    and every file there as it was."""
    path = tmp_path / "v.layer"
    await made(made_as(str(path), size=SS * 16))
    before, names = path.read_bytes(), files_in(tmp_path)
    with pytest.raises(ConfigError, match=refusal.format(path=path)) as info:
        await served_as(str(path)).attach(None)
    assert advice in str(info.value)
    assert path.read_bytes() == before and files_in(tmp_path) == names


async def test_a_raw_image_refused_as_sqlite_leaves_no_lock_file(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    await made(RawLayer(str(path), size=SS * 16))
    with pytest.raises(ConfigError, match="not a readable SQLite database"):
        await SqliteLayer(str(path)).attach(None)
    assert files_in(tmp_path) == ["disk.img"]


async def test_a_raw_volume_whose_first_sector_holds_a_sqlite_header_still_starts(
    tmp_path: Path,
) -> None:
    """A client may write anything into a raw volume, a tierdisk sqlite database's header
    too: without the sqlite layer's lock file beside it, that is no sqlite layer's file, and
    the volume starts again as raw."""
    database = tmp_path / "v.db"
    await made(SqliteLayer(str(database), size=SS * 16))
    header = database.read_bytes()[:SS]
    path = tmp_path / "disk.img"
    layer = RawLayer(str(path), size=SS * 16)
    await layer.attach(None)
    await layer.write(memoryview(header), 0, fua=False)
    await layer.flush()
    await layer.close()
    assert file_kind(str(database)) == "sqlite" and file_kind(str(path)) is None
    again = RawLayer(str(path))
    await again.attach(None)
    await again.close()


async def test_files_no_layer_kind_marks_are_served_as_raw(tmp_path: Path) -> None:
    """Another program's SQLite database, and a file beside a presence map that is not one,
    carry no mark: a raw image may hold any bytes."""
    other = tmp_path / "app.db"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    plain = tmp_path / "plain.img"
    plain.write_bytes(b"\0" * SS * 4)
    (tmp_path / "plain.img.map").write_bytes(b"my notes")
    for path in (other, plain, tmp_path / "missing.img"):
        assert file_kind(str(path)) is None
    for path in (other, plain):
        layer = RawLayer(str(path))
        await layer.attach(None)
        await layer.close()
