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
