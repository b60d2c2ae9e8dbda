"""The ``raw`` layer: a plain image file; every sector is present.

Reads and writes use ``preadv``/``pwritev`` on the file off the event loop (a read the page
cache can serve whole is done on the loop with ``RWF_NOWAIT``, which never blocks); ``flush`` is
``fdatasync``; a ``fua`` write is followed by ``fdatasync`` before it returns. A missing file
is created (sparse) with ``size``, or with the size of the layer below. An existing file keeps
its size; a configured ``size`` that disagrees is refused. Unmap punches holes (reads then
see zeros), so the layer reports ``UNMAP_BEHAVIOR_ZEROES``. Reads hold their sectors shared
and writes and unmaps exclusive (:class:`~tierdisk.service.sector_lock.SectorLock`): a
buffered read copying a page while a write copies into it would return a torn sector.

Out of space. The image is sparse, so a write into a hole needs new blocks. Before writing,
the layer reserves them (one ``fallocate`` with ``FALLOC_FL_KEEP_SIZE`` over the write's
range, :class:`~tierdisk.service.fileio.Reserver`, as the sparse layer does); when that
fails with ``ENOSPC`` nothing was written and the write raises :class:`NoSpace`
(RESOURCE_EXHAUSTED: the request changed nothing). Blocks the failed reservation did
allocate are not given back (every sector is present, so the layer cannot tell them from
blocks that held data before); they read as zeros, as the holes did. On a filesystem that
cannot reserve, a write can still run out of space part-way.

Resize ``ftruncate``-s the image (:func:`~tierdisk.service.fileio.set_file_size`): a size
of no sectors or over ``2**63 - 1`` bytes is :class:`InvalidArgument`, one the filesystem
refuses (``EFBIG``) is :class:`FailedPrecondition`; either way the layer keeps its size and
data.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError, InvalidArgument, ReadOnlyError, StorageError
from ..fileio import (
    PartlyWritten,
    Reserver,
    as_storage_error,
    changed_in_part,
    check_still_named,
    fsync_folder,
    lock_or_refuse,
    make_parent_folder,
    pread_cached,
    pread_into,
    pwrite_all,
    regular_file_size,
    set_file_size,
    zero_range,
)
from ..layer import (
    Layer,
    LayerMetadata,
    check_recorded_size,
    check_sector_size,
    layer_closed,
    new_geometry,
)
from ..runs import Run
from ..sector_lock import EVERY_SECTOR, SectorLock
from ..unstoppable import run_to_end
from .layer_files import refuse_another_kinds_file

__all__ = ["RawLayer"]


class RawLayer(Layer):
    """A plain image file at ``path`` (bytes ``[s*ss, (s+1)*ss)`` hold sector ``s``)."""

    kind = "raw"

    def __init__(
        self,
        path: str,
        size: int | None = None,
        read_only: bool = False,
        sector_size: int | None = None,
    ) -> None:
        super().__init__()
        self.path = path
        self._size_bytes = size
        self._read_only = read_only
        self._wanted_sector_size = sector_size
        self._fd = -1
        self._reserve = Reserver()
        self._sectors = SectorLock()  # reads shared, writes and unmaps exclusive: no torn sector
        self._sizing = asyncio.Lock()  # a flush's size check never sees a resize half done

    @property
    def configured_size(self) -> int | None:
        return self._size_bytes

    async def attach(self, lower: LayerMetadata | None) -> None:
        await self._open_in_thread(lambda: self._open(lower), self._close_file)

    def _open(self, lower: LayerMetadata | None) -> None:
        what = f"raw image {self.path}"
        refuse_another_kinds_file(self.path, "raw", what)  # a sparse or sqlite layer's
        found = regular_file_size(self.path, what)  # a device, a FIFO, a folder: refused
        exists = bool(found)  # an empty file is a creation cut short: it is made again
        if exists:
            ss = self._wanted_sector_size or (lower.sector_size if lower else 512)
            try:
                check_sector_size(ss)
            except ValueError as exc:
                raise ConfigError(f"{what}: {exc}") from None
        else:
            if self._read_only:
                missing = "is empty" if found == 0 else "does not exist"
                raise ConfigError(f"{what} {missing} (and read_only is set)")
            ss, count = new_geometry(what, self._size_bytes, self._wanted_sector_size, lower)
            nbytes = ss * count
            make_parent_folder(self.path, what)
        flags = (os.O_RDONLY if self._read_only else os.O_RDWR | os.O_CREAT) | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            raise StorageError(f"cannot open raw image {self.path}: {exc.strerror}") from None
        try:
            lock_or_refuse(fd, what, shared=self._read_only)
            if not exists:
                try:
                    os.ftruncate(fd, nbytes)
                    os.fsync(fd)  # its size, then its name: a flush later relies on both
                    fsync_folder(os.path.realpath(self.path))
                except OSError as exc:
                    os.unlink(os.path.realpath(self.path))  # ours, just made (not a symlink to it)
                    raise StorageError(
                        f"cannot create raw image {self.path} of {nbytes} bytes: {exc.strerror}"
                    ) from None
            size = os.fstat(fd).st_size
            if size % ss:
                raise ConfigError(
                    f"raw image {self.path} is {size} bytes, "
                    f"not a whole number of {ss}-byte sectors"
                )
            if size == 0:
                raise ConfigError(f"raw image {self.path} is empty")
            if exists:
                check_recorded_size(f"raw image {self.path}", size, self._size_bytes)
            self._set_geometry(ss, size // ss)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    async def close(self) -> None:
        """Let the reads and writes under way on threads finish (a closed descriptor, or
        its number reused by another file, must never be written), then close the file.
        Later I/O is ``UNAVAILABLE`` (:func:`layer_closed`)."""
        if self._fd < 0:
            return
        token = await self._sectors.hold_for_close()
        if token is None:
            return
        try:
            self._close_file()
        finally:
            self._sectors.release(token)

    def _close_file(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def can_resize(self) -> bool:
        return not self._read_only

    def _refuse_if_read_only(self) -> None:
        if self._read_only:
            raise ReadOnlyError(f"raw image {self.path} is opened read-only")

    async def read(self, buf: memoryview, sector: int) -> list[Run]:
        ss = self._sector_size
        count = len(buf) // ss
        self._check_range(sector, count)
        lock = self._sectors
        token = lock.try_shared(sector, sector + count)
        if token is None:  # a write (or a shrink) of some of these sectors is under way: after it
            token = await lock.acquire_shared(sector, sector + count)
            try:
                self._check_range(sector, count)  # a shrink meanwhile cut them: OUT_OF_RANGE
            except BaseException:
                lock.release(token)
                raise
        try:
            if self._fd < 0:
                raise layer_closed(f"raw image {self.path}")
            if not pread_cached(self._fd, buf, sector * ss):
                await asyncio.get_running_loop().run_in_executor(
                    None, pread_into, self._fd, buf, sector * ss
                )
        except OSError as exc:
            raise as_storage_error(exc, f"reading {self.path}") from None
        finally:
            lock.release(token)
        return [(sector, sector + count)]

    async def _mutate(self, what: str, start: int, end: int, fn: Callable[[], None]) -> None:
        """Run ``fn`` (a write or unmap of sectors ``[start, end)``) on a thread, holding the
        sectors exclusive: no read, and no other write, copies those pages meanwhile."""
        token = await self._sectors.acquire_exclusive(start, end)
        try:
            if self._fd < 0:
                raise layer_closed(f"raw image {self.path}")
            # Cancelled meanwhile, the hold lasts until the thread is done with the file.
            await run_to_end(asyncio.get_running_loop().run_in_executor(None, fn))
        except OSError as exc:
            raise as_storage_error(exc, f"{what} {self.path}") from None
        finally:
            self._sectors.release(token)

    async def write(self, data: memoryview, sector: int, fua: bool) -> None:
        self._refuse_if_read_only()
        ss = self._sector_size
        end = sector + len(data) // ss
        self._check_range(sector, end - sector)
        await self._mutate("writing", sector, end, lambda: self._write_sync(data, sector * ss, fua))

    def _write_sync(self, data: memoryview, offset: int, fua: bool) -> None:
        self._reserve(self._fd, offset, len(data))  # out of space here: nothing written
        try:
            pwrite_all(self._fd, data, offset)
        except PartlyWritten as exc:  # (cut short at a file size limit, say)
            raise changed_in_part(exc, f"writing {self.path}") from None
        if fua:  # durable for good once it returns: only if the image still has its name
            os.fdatasync(self._fd)
            check_still_named(self.path, os.fstat(self._fd), f"writing raw image {self.path}")

    async def unmap(
        self, sector: int, count: int, block_level_only: bool, next_is_zero: bool
    ) -> None:
        self._refuse_if_read_only()
        self._check_range(sector, count)
        ss = self._sector_size
        await self._mutate(
            "unmapping in",
            sector,
            sector + count,
            lambda: zero_range(self._fd, sector * ss, count * ss),
        )

    async def flush(self) -> None:
        if self._read_only:
            return
        async with self._sizing:
            if self._fd < 0:
                raise layer_closed(f"raw image {self.path}")
            fd, nbytes = self._fd, self._sector_count * self._sector_size
            try:
                await asyncio.get_running_loop().run_in_executor(None, self._flush_sync, fd, nbytes)
            except OSError as exc:
                raise as_storage_error(exc, f"flushing {self.path}") from None

    def _flush_sync(self, fd: int, nbytes: int) -> None:
        """Sync the image, then make sure it is still the file at :attr:`path`, of at least
        ``nbytes`` (:func:`~..fileio.check_still_named`)."""
        os.fdatasync(fd)
        check_still_named(
            self.path, os.fstat(fd), f"flushing raw image {self.path}", at_least=nbytes
        )

    async def resize(self, sector_count: int) -> None:
        """Resize the image file; runs to its end if the caller is cancelled meanwhile (the
        file and the size this layer reports must agree)."""
        await run_to_end(self._resize(sector_count))

    async def _resize(self, sector_count: int) -> None:
        async with self._sizing:
            await self._resize_locked(sector_count)

    async def _resize_locked(self, sector_count: int) -> None:
        self._refuse_if_read_only()
        if sector_count <= 0:
            raise InvalidArgument(
                f"raw image {self.path}: size must be at least one sector, not {sector_count}"
            )
        token = await self._sectors.acquire_exclusive(0, EVERY_SECTOR)  # close waits for it
        what = f"resizing raw image {self.path}"
        loop = asyncio.get_running_loop()
        try:
            if self._fd < 0:
                raise layer_closed(f"raw image {self.path}")
            fd = self._fd
            unsynced = await loop.run_in_executor(None, self._resize_sync, fd, sector_count, what)
        finally:
            self._sectors.release(token)
        self._sector_count = sector_count
        self._notify_resized()
        if unsynced is not None:
            raise unsynced

    def _resize_sync(self, fd: int, sector_count: int, what: str) -> StorageError | None:
        """Set the image's size and sync it (the new size must outlast a power cut, as a
        sparse or sqlite layer's does). A grow whose sync fails puts the old size back and
        raises (the layer keeps its size); a shrink whose sync fails cannot be undone (the
        data past the new end is gone), so it stands, and the error to raise once the layer
        has its new size is returned (INTERNAL: made, not durable)."""
        old = self._sector_count * self._sector_size
        set_file_size(fd, sector_count * self._sector_size, what)
        try:
            os.fsync(fd)
        except OSError as exc:
            if sector_count * self._sector_size < old:
                return StorageError(f"{what}: done, but not durable: {exc.strerror or exc}")
            with contextlib.suppress(OSError):
                os.ftruncate(fd, old)
            raise as_storage_error(exc, what) from None
        return None

    def inspect(self) -> dict[str, Any]:
        details: dict[str, Any] = {"path": os.path.abspath(self.path)}
        if self._fd >= 0:
            st = os.fstat(self._fd)
            details["file_bytes"] = st.st_size
            details["allocated_bytes"] = st.st_blocks * 512
        return details
