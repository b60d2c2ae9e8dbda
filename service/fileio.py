"""Blocking file primitives shared by the file-backed layers (raw, sparse, sqlite).

Everything here but :func:`pread_cached` blocks: callers run it off the event loop
(``run_in_executor``). :func:`pread_cached` never blocks (``RWF_NOWAIT``), so the loop may
call it first and fall back to the executor. Data moves as whole buffers with
``preadv``/``pwritev``; errors become domain exceptions through :func:`as_storage_error`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import resource
import stat

from .errors import (
    OUT_OF_SPACE_ERRNOS,
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    NoSpace,
    StorageError,
    TierdiskError,
)

__all__ = [
    "MAX_FILE_BYTES",
    "PartlyWritten",
    "Reserver",
    "as_storage_error",
    "changed_in_part",
    "check_still_named",
    "file_size_limit",
    "fsync_folder",
    "lock_or_refuse",
    "make_parent_folder",
    "missing_target",
    "pread_cached",
    "pread_into",
    "punch_hole",
    "punch_unused_blocks",
    "pwrite_all",
    "regular_file_size",
    "replace_with_new_file",
    "reserve",
    "set_file_size",
    "zero_range",
]

MAX_FILE_BYTES = (1 << 63) - 1
"""The largest file size the kernel can represent (``off_t`` is a signed 64-bit integer)."""

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def pread_into(fd: int, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` from ``offset``; bytes past the end of the file read as zeros."""
    done = 0
    size = len(buf)
    while done < size:
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            buf[done:] = bytes(size - done)
            return
        done += n


_nowait = hasattr(os, "RWF_NOWAIT")


def pread_cached(fd: int, buf: memoryview, offset: int) -> bool:
    """Fill ``buf`` from ``offset`` only if that needs no disk I/O: ``preadv`` with
    ``RWF_NOWAIT`` copies what the page cache holds and never blocks. Returns True when
    ``buf`` is complete; False means "do it off the event loop" (``buf`` may be partly
    written). Lets the event loop serve cached reads without a thread hand-off (~50 µs).
    A filesystem that cannot (``EOPNOTSUPP``: tmpfs) costs one failed call per read and
    leaves files elsewhere served; a kernel without the flag turns it off for good.
    """
    global _nowait
    if not _nowait:
        return False
    done = 0
    size = len(buf)
    try:
        while done < size:
            n = os.preadv(fd, [buf[done:]], offset + done, os.RWF_NOWAIT)
            if n == 0:
                buf[done:] = bytes(size - done)
                return True
            done += n
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno == errno.EOPNOTSUPP:
            return False  # this file's filesystem cannot (tmpfs); others may, so go on trying
        if exc.errno in (errno.EINVAL, errno.ENOSYS):
            _nowait = False  # the kernel does not know the flag: stop trying
            return False
        raise
    return True


class PartlyWritten(OSError):
    """The ``OSError`` of :func:`pwrite_all` once part of its data was written (a write cut
    short at a file size limit, or out of space where blocks could not be reserved)."""


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset``; a failure after some of it was written is
    :class:`PartlyWritten`."""
    done = 0
    size = len(data)
    while done < size:
        try:
            done += os.pwritev(fd, [data[done:]], offset + done)
        except OSError as exc:
            if not done:
                raise
            raise PartlyWritten(
                exc.errno, f"{exc.strerror}, after {done} of {size} bytes were written"
            ) from None


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate ``[offset, offset + length)`` keeping the file size; it then reads as
    zeros. Returns False when the filesystem cannot punch holes."""
    if length <= 0:
        return True
    if _fallocate(fd, _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, os.strerror(err))


def punch_unused_blocks(fd: int, ranges: list[tuple[int, int]]) -> int:
    """Give back the disk blocks that lie wholly inside ``ranges`` (byte ranges, sorted,
    disjoint) and hold data: each range is cut inward to whole filesystem blocks, its data
    found with ``SEEK_DATA``/``SEEK_HOLE`` and punched out. A block shared with bytes
    outside the ranges is left alone (punching part of a block would write zeros into it).
    Returns the bytes punched; 0 when the filesystem cannot punch holes. Costs one
    ``lseek`` per range without data (about 2 µs on ext4)."""
    block = max(os.fstat(fd).st_blksize, 512)
    punched = 0
    for start, end in ranges:
        offset = -(-start // block) * block
        end -= end % block
        while offset < end:
            try:
                data = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data from here to the end of the file
                    return punched
                raise
            if data >= end:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            if not punch_hole(fd, data, hole - data):
                return punched
            punched += hole - data
            offset = hole
    return punched


def zero_range(fd: int, offset: int, length: int) -> None:
    """Make ``[offset, offset + length)`` read as zeros: punch a hole, else write zeros."""
    if punch_hole(fd, offset, length):
        return
    chunk = bytes(min(length, 1 << 20))
    done = 0
    while done < length:
        n = min(len(chunk), length - done)
        pwrite_all(fd, memoryview(chunk)[:n], offset + done)
        done += n


def as_storage_error(exc: OSError, what: str) -> TierdiskError:
    """The domain error for an ``OSError`` raised while doing ``what``."""
    if exc.errno in OUT_OF_SPACE_ERRNOS:
        why = "beyond the file size limit" if exc.errno == errno.EFBIG else "out of space"
        return NoSpace(f"{what}: {why} ({exc.strerror})")
    return StorageError(f"{what}: {exc.strerror or exc}")


def changed_in_part(exc: PartlyWritten, what: str) -> TierdiskError:
    """The domain error for a write of sectors' data that :func:`pwrite_all` cut short and
    the caller could not undo: never :class:`NoSpace` ("changed nothing"). (A caller that
    undoes the partial write, as the metadata writers do by truncating or discarding the
    file, uses :func:`as_storage_error`.)"""
    error = as_storage_error(exc, what)
    if isinstance(error, NoSpace):
        return error.after_a_change("the sectors it covers may hold old or new data")
    return error


def reserve(fd: int, offset: int, length: int) -> bool:
    """Allocate the blocks of ``[offset, offset + length)`` keeping the file size, so a
    write there cannot run out of space half-way. Returns False when the filesystem cannot
    (then nothing was reserved); raises ``OSError`` (``ENOSPC``) when space is short."""
    if _fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, os.strerror(err))


class Reserver:
    """:func:`reserve` for the writes to one file, remembering when its filesystem cannot
    (from then on a no-op). Raises ``OSError`` (``ENOSPC``) when space is short.

    Costs one ``fallocate`` per call (about 3 µs on ext4 when the blocks already exist).
    Where the filesystem cannot reserve, or reserves without guaranteeing the later write
    (copy-on-write filesystems), a write can still run out of space part-way.
    """

    __slots__ = ("supported",)

    def __init__(self) -> None:
        self.supported = True

    def __call__(self, fd: int, offset: int, length: int) -> None:
        if self.supported and length > 0:
            self.supported = reserve(fd, offset, length)


def file_size_limit() -> int | None:
    """This process's file size limit in bytes (the soft ``RLIMIT_FSIZE``: ``ulimit -f``,
    systemd's ``LimitFSIZE=``), None when there is none. A write past it fails ``EFBIG``."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if limit == resource.RLIM_INFINITY else limit


def set_file_size(fd: int, nbytes: int, what: str) -> None:
    """``ftruncate`` ``fd`` to ``nbytes`` for a resize; ``what`` names it in errors.

    A size the kernel cannot represent (over :data:`MAX_FILE_BYTES`) is
    :class:`InvalidArgument`; a size the filesystem refuses (``EFBIG``: over its largest
    file, e.g. 16 TiB on ext4 with 4 KiB blocks) is :class:`FailedPrecondition`, as no
    amount of freed space would help; other failures as :func:`as_storage_error` says. On
    every failure the file keeps its size.
    """
    if nbytes > MAX_FILE_BYTES:
        raise InvalidArgument(
            f"{what}: {nbytes} bytes is more than the largest file size, "
            f"{MAX_FILE_BYTES} bytes (2**63 - 1)"
        )
    try:
        os.ftruncate(fd, nbytes)
    except OSError as exc:
        if exc.errno == errno.EFBIG:
            limit = file_size_limit()
            holder = "the filesystem"
            if limit is not None and nbytes > limit:
                holder = f"this process (its file size limit, ulimit -f, is {limit} bytes)"
            raise FailedPrecondition(
                f"{what}: {holder} cannot hold a file of {nbytes} bytes "
                f"({exc.strerror}); the size is unchanged"
            ) from None
        raise as_storage_error(exc, what) from None


def fsync_folder(path: str) -> None:
    """``fsync`` the folder ``path`` lives in, so a file created or renamed there outlives
    a power cut (the new name is in the folder's own blocks). Raises ``OSError``."""
    fd = os.open(
        os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    )
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_with_new_file(path: str, new: str, data: bytes, *, lock: bool = False) -> int:
    """Make ``data`` the contents of ``path``, whole or not at all, and return the new file
    open for reading and writing: written to the file ``new`` (made afresh: one a crash left
    there is removed first, and a symlink there is removed, never written through), locked
    first when ``lock`` (``flock``: the lock goes with the file), synced, then renamed over
    ``path``. A crash at any point leaves the old file or the new one at ``path``. The caller
    calls :func:`fsync_folder` once it uses the new file, so the new name outlives a power
    cut; on an error ``new`` is removed and nothing is open. Raises ``OSError``."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(new)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(new, flags, 0o644)
    try:
        if lock:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        pwrite_all(fd, memoryview(data), 0)
        os.fsync(fd)
        os.rename(new, path)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(new)
        raise
    return fd


def make_parent_folder(path: str, what: str) -> None:
    """Create the folder ``path`` lives in (and its parents) when missing; a
    :class:`ConfigError` naming ``what`` and the folder when that is not possible, or when
    the folder is ``/dev``'s own filesystem: a layer's file is a regular file, so a path
    there names a device (one that is missing, if the file is), never a place to create an
    image in (``/dev/shm``, a filesystem of its own, is a place like any other)."""
    folder = os.path.dirname(os.path.abspath(path))
    real = os.path.realpath(folder)
    if (real == "/dev" or real.startswith("/dev/")) and _on_dev_filesystem(real):
        raise ConfigError(
            f"{what}: {path} is in {real}, where layer files are never made or used (a "
            "layer needs a regular file, not a device)"
        )
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot create the folder {folder}: {exc.strerror}") from None


def _on_dev_filesystem(folder: str) -> bool:
    """True when ``folder`` (a real path under ``/dev``), or the nearest folder above it
    that exists, is on ``/dev``'s own filesystem."""
    while True:
        try:
            return os.stat(folder).st_dev == os.stat("/dev").st_dev
        except FileNotFoundError:
            folder = os.path.dirname(folder)
        except OSError:
            return True


def missing_target(what: str, path: str) -> StorageError:
    """``cannot create {what}``, naming the target when ``path`` is a symlink (into a
    folder that is not there: an unmounted disk, say): for a layer file that cannot be made
    because a folder on its way is missing."""
    link = f" (a symlink to {os.readlink(path)})" if os.path.islink(path) else ""
    return StorageError(f"cannot create {what}{link}: No such file or directory")


def regular_file_size(path: str, what: str) -> int | None:
    """The size in bytes of the file at ``path`` (through symlinks), ``None`` when there is
    none (nor its folder); a :class:`StorageError` naming ``what`` when it is not a regular
    file (a device, a FIFO, a folder), which a layer that creates or replaces its file must
    never take for an empty one, or cannot be looked at."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise StorageError(f"{what}: cannot use {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise StorageError(f"{what}: {path} is not a regular file")
    return st.st_size


def check_still_named(path: str, opened: os.stat_result, what: str, *, at_least: int = 0) -> None:
    """Raise a :class:`StorageError` naming ``what`` when the file a layer has open has lost
    its name, as when someone removed it, renamed another file over it or restored a backup
    in its place while the server ran: what the layer writes and syncs then lives only in
    the open file, and the next start would open (or create) another. Also when it is
    shorter than ``at_least`` bytes (truncated by someone else: what lay past its end reads
    as zeros). ``opened`` is the open file's ``os.fstat``: its link count tells a file with
    no name left, so a check that finds nothing wrong costs no more than that one call (a
    flush's); ``path`` is looked at only to say which of the two happened. A file that
    keeps another name (a hard link elsewhere) is not told from one that keeps this one."""
    if opened.st_nlink == 0:
        try:
            os.stat(path)
            gone = "replaced by another file"
        except OSError:
            gone = "removed"
        raise StorageError(
            f"{what}: {path} was {gone} while served: the file this server writes has no "
            f"name there any more and is lost when it stops (while it runs, copy it back "
            f"from /proc/{os.getpid()}/fd); writes acknowledged before may be lost"
        )
    if opened.st_size < at_least:
        raise StorageError(
            f"{what}: {path} is {opened.st_size} bytes, less than the layer's {at_least}: "
            "it was truncated while served; writes acknowledged before may be lost"
        )


def lock_or_refuse(fd: int, what: str, *, shared: bool = False) -> None:
    """``flock`` ``fd`` (exclusive, or shared for read-only use) without waiting; raise a
    :class:`ConfigError` naming ``what`` when another layer or process holds it."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(
            f"{what} is already open (in use and locked by this or another process); "
            "two servers cannot share a layer"
        ) from None
