"""Local files and streams as the verbs that move data use them: stdin and stdout
(``-``), opening, writing and closing a file with any failure worded as one line naming it
(:func:`~tierdisk.client.cli_errors.file_error`), the length of a regular file or a block
device, the data runs of a sparse file (``lseek`` ``SEEK_DATA``/``SEEK_HOLE``), reading a
pipe or a terminal a chunk at a time, and fsyncing a folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
from collections.abc import Iterator
from typing import BinaryIO

from .cli_errors import CliError, describe_file, file_error, stdout_error

__all__ = [
    "STD_STREAM",
    "Sink",
    "closing",
    "data_runs",
    "file_size",
    "fileno",
    "fsync_folder",
    "is_sized",
    "isatty",
    "open_file",
    "read_up_to",
    "std_path",
]

STD_STREAM = "-"
"""As IMAGE (``import``/``export``), ``-i`` or ``-o``: stdin or stdout (``./-`` names a file)."""


def open_file(path: str, flags: int, mode: int = 0o666) -> int:
    """``os.open(path, flags, mode)``, close-on-exec; a failure is a :class:`CliError`
    naming ``path``."""
    try:
        return os.open(path, flags | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as err:
        raise file_error(path, err) from None


def isatty(stream: BinaryIO) -> bool:
    """Whether ``stream`` is a terminal; ``False`` when it cannot tell."""
    try:
        return stream.isatty()
    except (OSError, ValueError):  # closed, or no file behind it
        return False


def fileno(stream: BinaryIO) -> int | None:
    """The file descriptor behind ``stream``, or ``None`` if there is none."""
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # e.g. io.BytesIO in place of stdin
        return None


def std_path(path: str | None) -> str | None:
    """``path`` as given to ``-i``/``-o``/IMAGE, ``None`` for stdin or stdout (``-``)."""
    return None if path == STD_STREAM else path


class Sink:
    """Where ``read`` and ``export`` put bytes in order: stdout (``path`` ``None``) or the
    file open as ``fd``. A failed write raises a one-line :class:`CliError` naming it (a
    broken stdout pipe stays a :class:`BrokenPipeError`: see :func:`tierdisk.client.cli.main`)."""

    def __init__(self, fd: int | None = None, path: str | None = None) -> None:
        self.fd = fd
        self.path = path

    def _failed(self, err: OSError) -> OSError | CliError:
        return stdout_error(err) if self.fd is None else file_error(self.path, err)

    def write(self, data: bytes | memoryview) -> None:
        try:
            if self.fd is None:
                sys.stdout.buffer.write(data)
                return
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as err:
            raise self._failed(err) from None

    def flush(self) -> None:
        if self.fd is None:
            try:
                sys.stdout.buffer.flush()
            except OSError as err:
                raise self._failed(err) from None


@contextlib.contextmanager
def closing(fd: int, path: str) -> Iterator[int]:
    """Close ``fd`` (the file ``path``) at the end; a failed close is a failed write."""
    try:
        yield fd
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    try:
        os.close(fd)
    except OSError as err:
        raise file_error(path, err) from None


def is_sized(fd: int) -> bool:
    """Whether ``fd`` is a regular file or a block device: its length is known up front."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode) or stat.S_ISBLK(mode)


def file_size(fd: int, path: str | None) -> int:
    """The length in bytes of the regular file or block device open as ``fd`` (``path``;
    ``None``: stdin); a :class:`CliError` for anything else."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    if not stat.S_ISREG(st.st_mode):
        raise CliError(f"{describe_file(path)}: not a regular file or block device")
    return st.st_size


def read_up_to(src: BinaryIO, size: int) -> bytes:
    """``size`` bytes from ``src``, fewer only at its end. One raw read at a time (``read1``):
    a pipe returns less per read, and a terminal's end (Ctrl-D) is one empty read, not a
    lasting state, so it must be seen, not absorbed by a buffered ``read(size)``."""
    read1 = getattr(src, "read1", src.read)
    parts: list[bytes] = []
    got = 0
    while got < size:
        part: bytes = read1(size - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


_SEEK_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}
"""``lseek`` errors meaning "SEEK_DATA/SEEK_HOLE not supported here"."""


def data_runs(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The runs ``(a, b)`` of bytes in ``[start, end)`` of the regular file open as ``fd``
    that hold data, in order; the rest are holes (read as zeros). Found with ``lseek``
    ``SEEK_DATA``/``SEEK_HOLE`` (the file position is put back at ``start``); where those
    are not supported the rest of the file counts as data (always correct, just not sparse)."""
    seek_data = getattr(os, "SEEK_DATA", None)
    seek_hole = getattr(os, "SEEK_HOLE", None)
    if seek_data is None or seek_hole is None:
        return [(start, end)] if start < end else []
    runs: list[tuple[int, int]] = []
    pos = start
    try:
        while pos < end:
            try:
                a = os.lseek(fd, pos, seek_data)
                b = os.lseek(fd, a, seek_hole) if a < end else end
            except OSError as err:
                if err.errno == errno.ENXIO:  # no data from pos to the end of the file
                    break
                if err.errno in _SEEK_UNSUPPORTED:
                    runs.append((pos, end))
                    break
                raise
            if a >= end:
                break
            b = min(b, end)
            if b <= a:  # a filesystem that says otherwise: take the rest as data, to be safe
                b = end
            runs.append((a, b))
            pos = b
    finally:
        os.lseek(fd, start, os.SEEK_SET)
    return runs


def fsync_folder(folder: str) -> None:
    """fsync the folder ``folder`` (``""``: the current one), so a rename in it is durable.
    A filesystem that cannot fsync a folder (``EINVAL``) is left at that."""
    fd = os.open(folder or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)
