"""The blocking file primitives the file-backed layers share."""

from __future__ import annotations

import os
from pathlib import Path

from tierdisk.service.fileio import pread_cached, pread_into


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
