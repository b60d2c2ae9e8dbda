"""tierdisk.service.layers.sparse_map (service/layers/sparse_map.py): the on-disk presence map
of the ``sparse`` layer, encoded with :func:`encode_header` / :func:`encode_record`, written to
a real file in ``tmp_path`` and read back with :func:`parse`.

What the module promises: the byte layout of the header and of a record; a ``SNAP`` first
(the whole presence) and ``DIFF`` records in ``seq`` order that remove, add, set the size and
drop presence at or past it; the smallest size kept across records; version 1 maps (no
``smallest`` field) read with the smallest size their records show; a last record that fails
its checks (cut short by a crash, or its checksum wrong) is a torn tail, ignored and counted
in :attr:`MapState.torn`; a bad record followed by a valid one, a bad ``SNAP`` or a bad header
is :class:`DataCorruption`."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tierdisk.service.errors import DataCorruption
from tierdisk.service.layers.sparse_map import (
    DIFF,
    HEADER_SIZE,
    MAGIC,
    SNAP,
    VERSION,
    MapState,
    encode_header,
    encode_record,
    flat,
    map_path,
    parse,
)
from tierdisk.service.presence import RunSet
from tierdisk.service.runs import Run

SS = 512


def snap(seq: int, count: int, adds: Iterable[Run] = (), smallest: int | None = None) -> bytes:
    return encode_record(SNAP, seq, count, count if smallest is None else smallest, flat([]),
                         flat(adds))  # fmt: skip


def diff(
    seq: int,
    count: int,
    removes: Iterable[Run] = (),
    adds: Iterable[Run] = (),
    smallest: int | None = None,
) -> bytes:
    return encode_record(DIFF, seq, count, count if smallest is None else smallest,
                         flat(removes), flat(adds))  # fmt: skip


def write_map(directory: Path, blob: bytes) -> Path:
    """``blob`` as the map file of a sparse layer whose data file is ``disk.img``."""
    path = Path(map_path(str(directory / "disk.img")))
    path.write_bytes(blob)
    return path


def read_map(path: Path) -> MapState:
    return parse(path.read_bytes(), str(path))


def corruption(path: Path, match: str) -> None:
    with pytest.raises(DataCorruption, match=match) as info:
        read_map(path)
    assert str(path) in str(info.value)


# -- layout --------------------------------------------------------------------------------


def test_map_path_is_beside_the_data_file() -> None:
    assert map_path("/var/lib/tierdisk/vm1.img") == "/var/lib/tierdisk/vm1.img.map"


def test_header_layout() -> None:
    header = encode_header(4096, 1 << 40)
    assert len(header) == HEADER_SIZE == 28
    assert struct.unpack("<8sIIQI", header) == (
        b"TDSPMAP1",
        2,
        4096,
        1 << 40,
        zlib.crc32(header[:24]),
    )
    assert (MAGIC, VERSION) == (b"TDSPMAP1", 2)


def test_record_layout() -> None:
    record = diff(7, 1000, removes=[(1, 2)], adds=[(3, 4), (5, 6)], smallest=900)
    head = struct.Struct("<4sIIQQQ")
    assert len(record) == head.size + 3 * 16 + 4
    assert head.unpack_from(record) == (b"DIFF", 1, 2, 7, 1000, 900)
    runs = struct.unpack_from("<6q", record, head.size)
    assert runs == (1, 2, 3, 4, 5, 6)  # removes first, then adds, as (start, end) pairs
    (crc,) = struct.unpack_from("<I", record, len(record) - 4)
    assert crc == zlib.crc32(record[:-4])


def test_flat_is_start_end_pairs() -> None:
    assert list(flat([(0, 4), (10, 12)])) == [0, 4, 10, 12]
    assert list(flat([])) == []


# -- round trips ------------------------------------------------------------------------------


def test_a_snapshot_reads_back(tmp_path: Path) -> None:
    record = snap(1, 1000, [(0, 10), (20, 30)])
    path = write_map(tmp_path, encode_header(SS, 1000) + record)
    state = read_map(path)
    assert (state.sector_size, state.sector_count, state.smallest) == (SS, 1000, 1000)
    assert (state.version, state.seq, state.torn) == (VERSION, 1, 0)
    assert list(state.present) == [(0, 10), (20, 30)]
    assert state.end == state.snapshot_end == HEADER_SIZE + len(record) == path.stat().st_size


def test_an_empty_snapshot_reads_back(tmp_path: Path) -> None:
    state = read_map(write_map(tmp_path, encode_header(4096, 0) + snap(0, 0)))
    assert (state.sector_size, state.sector_count, len(state.present)) == (4096, 0, 0)


@given(
    cuts=st.lists(st.integers(0, 1 << 40), unique=True, max_size=60),
    seq=st.integers(0, (1 << 64) - 1),
)
def test_any_snapshot_reads_back_as_its_runs(cuts: list[int], seq: int) -> None:
    edges = sorted(cuts)
    runs = list(zip(edges[0::2], edges[1::2], strict=False))
    count = (edges[-1] if edges else 0) + 1
    blob = encode_header(SS, count) + snap(seq, count, runs)
    state = parse(blob, "mem.map")
    assert state.present == RunSet.from_runs(runs)
    assert (state.seq, state.sector_count, state.end, state.torn) == (seq, count, len(blob), 0)


def test_diffs_replay_in_order(tmp_path: Path) -> None:
    first = snap(5, 100, [(0, 50)])
    records = [
        first,
        diff(6, 100, removes=[(10, 20)], adds=[(60, 70)]),
        diff(7, 40, smallest=40),  # a shrink: presence at or past 40 is dropped
        diff(8, 200, adds=[(150, 200)], smallest=40),  # a grow: the smallest size stays
    ]
    path = write_map(tmp_path, encode_header(SS, 100) + b"".join(records))
    state = read_map(path)
    assert list(state.present) == [(0, 10), (20, 40), (150, 200)]
    assert (state.sector_count, state.smallest, state.seq) == (200, 40, 8)
    assert state.snapshot_end == HEADER_SIZE + len(first)
    assert state.end == path.stat().st_size and state.torn == 0


def test_the_header_size_is_not_the_layer_size(tmp_path: Path) -> None:
    """The header's sector_count is the size when the file was written; the records say
    what the size is now."""
    blob = encode_header(SS, 10) + snap(1, 10) + diff(2, 30, adds=[(20, 30)])
    state = read_map(write_map(tmp_path, blob))
    assert state.sector_count == 30
    assert list(state.present) == [(20, 30)]


def test_a_shrink_drops_presence_even_when_the_record_does_not_remove_it(
    tmp_path: Path,
) -> None:
    blob = encode_header(SS, 100) + snap(1, 100, [(0, 100)]) + diff(2, 30, smallest=100)
    state = read_map(write_map(tmp_path, blob))
    assert list(state.present) == [(0, 30)]
    assert state.smallest == 30  # never above a size a record shows


def test_the_smallest_size_comes_from_the_records(tmp_path: Path) -> None:
    """A snapshot written after a shrink and a grow keeps the smallest size in its own field;
    a field above the record's size counts as that size."""
    kept = read_map(write_map(tmp_path, encode_header(SS, 100) + snap(1, 100, smallest=25)))
    assert (kept.sector_count, kept.smallest) == (100, 25)
    high = read_map(write_map(tmp_path, encode_header(SS, 100) + snap(1, 100, smallest=500)))
    assert high.smallest == 100


# -- version 1 --------------------------------------------------------------------------------


def v1_header(sector_size: int, sector_count: int) -> bytes:
    head = struct.pack("<8sIIQ", MAGIC, 1, sector_size, sector_count)
    return head + struct.pack("<I", zlib.crc32(head))


def v1_record(kind: bytes, seq: int, count: int, removes: list[Run], adds: list[Run]) -> bytes:
    body = struct.pack("<4sIIQQ", kind, len(removes), len(adds), seq, count)
    for run in (*removes, *adds):
        body += struct.pack("<qq", *run)
    return body + struct.pack("<I", zlib.crc32(body))


def test_a_version_1_map_reads_with_the_smallest_size_its_records_show(tmp_path: Path) -> None:
    blob = (
        v1_header(SS, 100)
        + v1_record(SNAP, 1, 100, [], [(0, 100)])
        + v1_record(DIFF, 2, 60, [], [])
        + v1_record(DIFF, 3, 80, [(0, 10)], [(70, 80)])
    )
    state = read_map(write_map(tmp_path, blob))
    assert state.version == 1
    assert (state.sector_count, state.smallest, state.seq) == (80, 60, 3)
    assert list(state.present) == [(10, 60), (70, 80)]
    assert state.end == len(blob) and state.torn == 0


def test_a_torn_version_1_record_is_a_torn_tail(tmp_path: Path) -> None:
    last = v1_record(DIFF, 2, 60, [], [(0, 60)])
    blob = v1_header(SS, 100) + v1_record(SNAP, 1, 100, [], [])
    state = read_map(write_map(tmp_path, blob + last[:-1]))
    assert (state.seq, state.end, state.torn) == (1, len(blob), len(last) - 1)


# -- a torn tail --------------------------------------------------------------------------------


def test_a_last_record_cut_short_anywhere_is_a_torn_tail(tmp_path: Path) -> None:
    good = encode_header(SS, 100) + snap(1, 100, [(0, 10)]) + diff(2, 100, adds=[(20, 30)])
    last = diff(3, 100, removes=[(0, 10)], adds=[(40, 50), (60, 70)])
    for cut in range(1, len(last)):
        state = read_map(write_map(tmp_path, good + last[:cut]))
        assert (state.torn, state.end, state.seq) == (cut, len(good), 2), cut
        assert list(state.present) == [(0, 10), (20, 30)], cut


def test_a_last_record_whose_checksum_fails_is_a_torn_tail(tmp_path: Path) -> None:
    good = encode_header(SS, 100) + snap(1, 100) + diff(2, 100, adds=[(0, 5)])
    last = bytearray(diff(3, 100, adds=[(50, 60)]))
    last[-1] ^= 0xFF  # the checksum
    state = read_map(write_map(tmp_path, good + bytes(last)))
    assert (state.torn, state.end, state.seq) == (len(last), len(good), 2)
    last[-1] ^= 0xFF
    last[-5] ^= 0x01  # a run's byte instead
    state = read_map(write_map(tmp_path, good + bytes(last)))
    assert (state.torn, state.seq) == (len(last), 2)
    assert list(state.present) == [(0, 5)]


def test_zeros_after_the_last_record_are_a_torn_tail(tmp_path: Path) -> None:
    good = encode_header(SS, 100) + snap(1, 100, [(0, 10)])
    state = read_map(write_map(tmp_path, good + bytes(4096)))
    assert (state.torn, state.end) == (4096, len(good))


def test_the_next_record_goes_where_the_torn_tail_began(tmp_path: Path) -> None:
    """The layer truncates the file to :attr:`MapState.end` and appends there: a record
    written after that follows on cleanly."""
    good = encode_header(SS, 100) + snap(1, 100)
    path = write_map(tmp_path, good + diff(2, 100, adds=[(0, 50)])[:20])
    state = read_map(path)
    with path.open("r+b") as f:
        f.truncate(state.end)
        f.seek(state.end)
        f.write(diff(state.seq + 1, 100, adds=[(5, 6)]))
    again = read_map(path)
    assert (again.seq, again.torn, list(again.present)) == (2, 0, [(5, 6)])


# -- corruption ---------------------------------------------------------------------------------


def test_a_header_checksum_mismatch_is_refused(tmp_path: Path) -> None:
    header = bytearray(encode_header(SS, 100))
    header[12] ^= 0x02  # the sector size: 512 becomes 514, the checksum no longer matches
    corruption(write_map(tmp_path, bytes(header) + snap(1, 100)), "header checksum")


def test_a_snapshot_checksum_mismatch_is_refused(tmp_path: Path) -> None:
    """The first record is never a torn tail: a map is created whole before it is used."""
    record = bytearray(snap(1, 100, [(0, 10)]))
    record[-1] ^= 0xFF
    path = write_map(tmp_path, encode_header(SS, 100) + bytes(record))
    corruption(path, "snapshot record is missing or corrupt")
    corruption(write_map(tmp_path, encode_header(SS, 100) + snap(1, 100)[:-1]), "snapshot")
    corruption(write_map(tmp_path, encode_header(SS, 100)), "snapshot")


def test_a_bad_record_followed_by_a_valid_one_is_refused(tmp_path: Path) -> None:
    middle = bytearray(diff(2, 100, adds=[(0, 10)]))
    middle[-1] ^= 0xFF
    good = encode_header(SS, 100) + snap(1, 100)
    blob = good + bytes(middle) + diff(3, 100, adds=[(20, 30)])
    corruption(
        write_map(tmp_path, blob),
        rf"record at offset {len(good)} is corrupt but a valid record follows it "
        rf"\(at offset {len(good) + len(middle)}\)",
    )


def test_a_record_cut_short_in_the_middle_is_refused(tmp_path: Path) -> None:
    good = encode_header(SS, 100) + snap(1, 100)
    blob = good + diff(2, 100, adds=[(0, 10)])[:-7] + diff(3, 100, adds=[(20, 30)])
    corruption(write_map(tmp_path, blob), "a valid record follows it")


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"", "is 0 bytes, too short for its header"),
        (encode_header(SS, 1)[:-1], "is 27 bytes, too short"),
        (b"NOTAMAP!" + encode_header(SS, 1)[8:] + snap(1, 1), "not a tierdisk sparse presence map"),
    ],
)
def test_a_bad_header_is_refused(tmp_path: Path, blob: bytes, match: str) -> None:
    corruption(write_map(tmp_path, blob), match)


def test_an_unknown_version_is_refused(tmp_path: Path) -> None:
    head = struct.pack("<8sIIQ", MAGIC, 3, SS, 100)
    header = head + struct.pack("<I", zlib.crc32(head))
    corruption(write_map(tmp_path, header + snap(1, 100)), "format version 3; this build reads 1")


@pytest.mark.parametrize(
    ("records", "match"),
    [
        ([diff(1, 100)], "snapshot record is missing"),  # a DIFF first
        ([encode_record(SNAP, 1, 100, 100, flat([(0, 1)]), flat([]))], "snapshot"),  # removes
        ([snap(1, 100), snap(2, 100)], "unexpected SNAP record #2"),
        ([snap(1, 100), diff(3, 100)], r"unexpected DIFF record #3 at offset \d+ \(after #1\)"),
        ([snap(1, 100), diff(2, 100), diff(2, 100)], r"unexpected DIFF record #2"),
        ([snap(1, 100, [(10, 20), (0, 5)])], "snapshot is not sorted"),
        ([snap(1, 100, [(0, 10), (5, 20)])], "snapshot is not sorted"),
        ([snap(1, 100, [(90, 101)])], r"runs outside \[0, 100\) or empty runs"),
        ([snap(1, 100, [(5, 5)])], "empty runs"),
        ([snap(1, 100, [(-1, 5)])], "runs outside"),
        ([snap(1, 100), diff(2, 100, adds=[(50, 150)])], "runs outside"),
        ([snap(1, 100), diff(2, 100, removes=[(7, 3)])], "empty runs"),
        # the bad run not first (or not last): every run is checked, not the extreme one only
        ([snap(1, 100, [(-5, 2), (10, 20)])], "runs outside"),
        ([snap(1, 100, [(0, 10), (90, 101)])], "runs outside"),
        ([snap(1, 100, [(0, 10), (20, 20), (30, 40)])], "empty runs"),
        ([snap(1, 100), diff(2, 100, adds=[(-3, 1), (5, 6)])], "runs outside"),
        ([snap(1, 100), diff(2, 100, adds=[(0, 5), (95, 120)])], "runs outside"),
        ([snap(1, 100), diff(2, 100, removes=[(-3, 1), (5, 6)])], "runs outside"),
    ],
)
def test_records_a_crash_cannot_make_are_refused(
    tmp_path: Path, records: list[bytes], match: str
) -> None:
    """Each of these records is whole and its checksum matches, so no crash made it: it is
    corruption even as the last record, never a torn tail."""
    corruption(write_map(tmp_path, encode_header(SS, 100) + b"".join(records)), match)
