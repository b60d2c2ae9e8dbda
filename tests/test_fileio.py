"""The blocking file primitives the file-backed layers share."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tierdisk.service.errors import ConfigError
from tierdisk.service.fileio import (
    make_parent_folder,
    pread_cached,
    pread_into,
    punch_unused_blocks,
    replace_with_new_file,
)
from tierdisk.service.layers.raw import RawLayer


def test_cached_read_serves_page_cache_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = os.urandom(1 << 20)
    path.write_bytes(data)  # just written: in the page cache
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(64 << 10)
        assert pread_cached(fd, memoryview(buf), 4096) is True
        assert buf == data[4096 : 4096 + len(buf)]
        # Past the end of the file reads as zeros, like pread_into.
        tail = bytearray(b"\xff" * 8192)
        assert pread_cached(fd, memoryview(tail), len(data) - 4096) is True
        assert tail == data[-4096:] + bytes(4096)
    finally:
        os.close(fd)


def test_cached_and_blocking_reads_agree(tmp_path: Path) -> None:
    path = tmp_path / "g"
    data = os.urandom(256 << 10)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        a, b = bytearray(100_000), bytearray(100_000)
        if not pread_cached(fd, memoryview(a), 777):
            pread_into(fd, memoryview(a), 777)  # not cached: the caller's fallback
        pread_into(fd, memoryview(b), 777)
        assert a == b == data[777 : 777 + 100_000]
    finally:
        os.close(fd)


async def test_no_layer_file_is_made_in_dev() -> None:
    """A layer path in /dev names a device (here, one that is not there): it is refused,
    never created as a regular file in /dev's memory-backed filesystem."""
    path = "/dev/tierdisk-test-no-such-device"
    folder = "/dev/tierdisk-test-no-such-folder"
    with pytest.raises(ConfigError, match=f"{path} is in /dev, where layer files are never"):
        await RawLayer(path, size=1 << 20).attach(None)
    with pytest.raises(ConfigError, match=f"is in {folder}"):
        make_parent_folder(f"{folder}/x", "a layer")
    assert not any(map(os.path.lexists, [path, folder]))


def test_a_folder_of_its_own_filesystem_under_dev_is_a_place_like_any_other() -> None:
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat("/dev").st_dev:
        pytest.skip("no /dev/shm filesystem of its own here")
    make_parent_folder("/dev/shm/x", "a layer")  # no error


def test_punch_unused_blocks_frees_whole_blocks_only(tmp_path: Path) -> None:
    """Whole blocks inside the ranges are punched; a block shared with bytes outside them
    keeps its data (a partial punch would write zeros into it); holes cost nothing."""
    path = tmp_path / "f"
    data = os.urandom(64 << 10)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    try:
        block = os.fstat(fd).st_blksize
        before = os.fstat(fd).st_blocks
        freed = punch_unused_blocks(fd, [(100, 3 * block + 100), (8 * block, 10 * block)])
        assert freed == 4 * block  # [block, 3 blocks) and [8, 10 blocks)
        assert os.fstat(fd).st_blocks == before - freed // 512
        assert punch_unused_blocks(fd, [(8 * block, 10 * block)]) == 0  # a hole already
    finally:
        os.close(fd)
    got = path.read_bytes()
    assert got[:block] == data[:block]
    assert got[block : 3 * block] == bytes(2 * block)
    assert got[3 * block : 8 * block] == data[3 * block : 8 * block]
    assert got[8 * block : 10 * block] == bytes(2 * block)
    assert got[10 * block :] == data[10 * block :]


def test_replace_with_new_file_writes_through_no_link_and_leaves_nothing_on_failure(
    tmp_path: Path,
) -> None:
    """The new contents land at ``path`` and the returned fd is the new file; a symlink
    (or a crash's leftover) at the new file's name is removed, its target untouched; a
    failure before the rename leaves the old file and no new one."""
    path, new, victim = tmp_path / "map", tmp_path / "map.tmp", tmp_path / "victim"
    path.write_bytes(b"old")
    victim.write_bytes(b"precious")
    new.symlink_to(victim)
    fd = replace_with_new_file(str(path), str(new), b"new contents")
    try:
        assert os.pread(fd, 100, 0) == b"new contents"
        assert os.fstat(fd).st_ino == path.stat().st_ino
    finally:
        os.close(fd)
    assert path.read_bytes() == b"new contents" and victim.read_bytes() == b"precious"
    assert not new.exists() and not new.is_symlink()
    (tmp_path / "gone").mkdir()
    with pytest.raises(OSError):  # the rename target is a folder: no rename
        replace_with_new_file(str(tmp_path / "gone"), str(new), b"x")
    assert not new.exists() and path.read_bytes() == b"new contents"
