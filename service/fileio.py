"""Blocking file primitives shared by the file-backed layers (raw, sparse).

Everything here but :func:`pread_cached` blocks: callers run it off the event loop
(``run_in_executor``). :func:`pread_cached` never blocks (``RWF_NOWAIT``), so the loop may
call it first and fall back to the executor. Data moves as whole buffers with
``preadv``/``pwritev``; errors become domain exceptions through :func:`as_storage_error`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os

from .errors import ConfigError, NoSpace, StorageError, TierdiskError

__all__ = [
    "as_storage_error",
    "lock_or_refuse",
    "pread_cached",
    "pread_into",
    "punch_hole",
    "pwrite_all",
    "reserve",
    "zero_range",
]

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
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            _nowait = False  # the kernel or filesystem cannot; stop trying
            return False
        raise
    return True


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset``."""
    done = 0
    size = len(data)
    while done < size:
        done += os.pwritev(fd, [data[done:]], offset + done)


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
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"{what}: out of space ({exc.strerror})")
    return StorageError(f"{what}: {exc.strerror or exc}")


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
