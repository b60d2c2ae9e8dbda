"""Local files and streams as the verbs that move data use them: stdin and stdout
(``-``), opening, writing and closing a file with any failure worded as one line naming it
(:func:`~tierdisk.client.cli_errors.file_error`), the length of a regular file or a block
device, the data runs of a sparse file (``lseek`` ``SEEK_DATA``/``SEEK_HOLE``), reading a
pipe or a terminal a chunk at a time, fsyncing a folder, and refusing to overwrite a running
server's layer file (:func:`refuse_a_locked_file`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import io
import os
import queue
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, TypeVar

from .cli_errors import CliError, describe_file, file_error, stdout_error
from .layer_layout import lock_files

__all__ = [
    "STD_STREAM",
    "Sink",
    "ThreadReader",
    "closing",
    "data_runs",
    "file_size",
    "fileno",
    "fsync_folder",
    "is_sized",
    "isatty",
    "open_file",
    "read_up_to",
    "reader",
    "refuse_a_locked_file",
    "std_path",
]

_T = TypeVar("_T")

STD_STREAM = "-"
"""As IMAGE (``import``/``export``), ``-i`` or ``-o``: stdin or stdout (``./-`` names a file)."""


async def open_file(path: str, flags: int, mode: int = 0o666) -> int:
    """``os.open(path, flags, mode)``, close-on-exec; a failure is a :class:`CliError`
    naming ``path``. A FIFO is opened on a :class:`_DaemonWorker`: its open blocks until the
    other end is opened, and the stop signals must still end the verb meanwhile (on the
    event loop's thread the open would be retried after each signal, PEP 475, and the loop
    never run its handlers); nothing waits for an open left blocked."""

    def call() -> int:
        try:
            return os.open(path, flags | getattr(os, "O_CLOEXEC", 0), mode)
        except OSError as err:
            raise file_error(path, err) from None

    try:
        fifo = stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        fifo = False  # missing, say: the open says why (or creates it)
    if not fifo:
        return call()
    worker = _DaemonWorker("tierdisk-open")
    try:
        return await worker.run(call)
    finally:
        worker.close()


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


class _DaemonWorker:
    """Runs calls one at a time, in order, on a daemon thread of its own, so that the event
    loop (and the stop signals it handles) goes on while one blocks on a pipe whose other
    end stalls; neither the loop's executor nor the process's exit waits for the thread (a
    call blocked for good is left with it). Create it in the event loop; :meth:`close` ends
    the thread once the call under way returns, then runs ``on_exit`` there."""

    def __init__(self, name: str, on_exit: Callable[[], object] = lambda: None) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_exit = on_exit
        self._jobs: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        try:
            while (job := self._jobs.get()) is not None:
                call, done = job
                result, error = None, None
                try:
                    result = call()
                except BaseException as exc:
                    error = exc
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                    self._loop.call_soon_threadsafe(_settle, done, result, error)
        finally:
            self._on_exit()

    async def run(self, call: Callable[[], _T]) -> _T:
        """``call()``'s result, once the thread ran it (after the calls before it)."""
        done: asyncio.Future[_T] = self._loop.create_future()
        self._jobs.put((call, done))
        return await done

    def close(self) -> None:
        self._jobs.put(None)


_Job = tuple[Callable[[], _T], "asyncio.Future[_T]"]


def _settle(done: asyncio.Future[_T], result: _T, error: BaseException | None) -> None:
    """Complete ``done`` (in the event loop) with ``result``, or ``error``; a future its
    waiter gave up (cancelled) is left as it is."""
    if done.done():
        return
    if error is None:
        done.set_result(result)
    else:
        done.set_exception(error)


class ThreadReader:
    """Reads ``fd`` (a pipe, a FIFO, a terminal) a chunk at a time (:meth:`read`) on a
    :class:`_DaemonWorker`, so that a writer that stalls does not hold up a stop: a verb
    cancelled meanwhile stops waiting, and nothing waits for the read still blocked. It
    reads a duplicate of ``fd``, closed on its thread, so the caller may close ``fd`` at
    any time. Create it in the event loop; :meth:`close` when done."""

    def __init__(self, fd: int) -> None:
        self._raw = io.FileIO(os.dup(fd), "rb")  # unbuffered: no lock a blocked read holds
        self._worker = _DaemonWorker("input-reader", on_exit=self._raw.close)

    async def read(self, size: int) -> bytes:
        """``size`` bytes, fewer only at the end (:func:`read_up_to`)."""
        return await self._worker.run(lambda: read_up_to(self._raw, size))

    def close(self) -> None:
        self._worker.close()


_STREAM_WRITE = 64 << 10
"""The most bytes written to a stream (a pipe: its default capacity) per call."""


class Sink:
    """Where ``read`` and ``export`` put bytes in order: stdout (``path`` ``None``) or the
    file open as ``fd``. A failed write raises a one-line :class:`CliError` naming it (a
    broken stdout pipe stays a :class:`BrokenPipeError`: see :func:`tierdisk.client.cli.main`).

    Bytes go straight to the descriptor (stdout's buffer is flushed first), so
    :attr:`written` counts what the system took. One that is not a regular file or a
    block device (a pipe, a FIFO, a terminal, a socket) is written on a thread of its own
    (:class:`_DaemonWorker`): a reader that stalls (``export VOL - | ssh …``) must not
    block the event loop, or Ctrl-C, SIGTERM and SIGHUP would not stop the verb until the
    pipe moved again. Create it in the event loop."""

    def __init__(self, fd: int | None = None, path: str | None = None) -> None:
        self.fd = fd
        self.path = path
        self.written = 0
        """Bytes written so far (of a write under way on the thread, what went so far)."""
        self._stopped = False
        self._thread: _DaemonWorker | None = None
        self._out = fileno(sys.stdout.buffer) if fd is None else fd
        if fd is None and self._out is not None:
            with contextlib.suppress(OSError):  # (a stdout that fails says so at the write)
                sys.stdout.buffer.flush()  # what was printed before comes first
        if self._out is not None and not is_sized(self._out):
            self._thread = _DaemonWorker("stdout-writer" if fd is None else "file-writer")

    def _failed(self, err: OSError) -> OSError | CliError:
        return stdout_error(err) if self.fd is None else file_error(self.path, err)

    async def write(self, data: bytes | memoryview) -> None:
        out = self._out
        try:
            if out is None:  # a stdout with no descriptor (a stand-in): as it buffers
                sys.stdout.buffer.write(data)
                self.written += len(data)
            elif self._thread is not None:
                await self._thread.run(lambda: self._write_all(out, data, _STREAM_WRITE))
            else:
                self._write_all(out, data)
        except OSError as err:
            raise self._failed(err) from None

    def _write_all(self, fd: int, data: bytes | memoryview, most: int | None = None) -> None:
        """Write ``data`` to ``fd``, at most ``most`` bytes a call (a pipe's write of more
        returns only once all of it went: counted per call, a stalled reader's share would
        not show in :attr:`written`); no more once :meth:`close` was called (the
        descriptor may be closed, its number taken by another file)."""
        view = memoryview(data).cast("B")
        while view and not self._stopped:
            done = os.write(fd, view[:most])
            self.written += done
            view = view[done:]

    def close(self) -> None:
        """End the writer thread, if any (once its write under way returns): call it when
        done, whether the copy succeeded or not, before the descriptor is closed."""
        self._stopped = True
        if self._thread is not None:
            self._thread.close()
            self._thread = None

    def flush(self) -> None:
        """Write out what a stdout without a descriptor buffers."""
        if self._out is None:
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


def reader(fd: int) -> BinaryIO:
    """A binary stream over ``fd`` (a pipe, say), so that a named input is handled as stdin
    is (its ``fileno`` read by a :class:`ThreadReader`, its ``isatty`` for the progress
    bar); closing it leaves ``fd`` open."""
    return open(fd, "rb", closefd=False)


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


def _locked(path: str) -> bool:
    """Whether another process holds an ``flock`` on ``path`` (``False`` when it cannot be
    opened or the filesystem has no ``flock``: nothing to learn)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # drops the lock, if we took it
    return False


def refuse_a_locked_file(path: str, target: str, *, harm: str, verb: str) -> None:
    """Refuse (a :class:`CliError`) to replace or overwrite ``target`` (the file ``path``
    names, its symlinks followed) while it is a running tierdisk layer's file: a ``raw`` or
    ``sparse`` data file, a ``sparse`` map, a ``sqlite`` database or its journals
    (:mod:`.layer_layout`), seen by the ``flock`` the server holds. The message says
    what doing it would do (``harm``, a sentence) and to ``verb`` into another file.

    ``export`` replaces its IMAGE: the server would go on writing into the file replaced,
    and every write it acknowledged after the export would be gone at its next start,
    which opens the new one (or, for a map or a database, would find the layer
    unreadable). ``read -o`` truncates its FILE: the layer's data would be gone at once."""
    for lock in lock_files(target):
        if _locked(lock):
            whose = "" if lock == target else f" ({describe_file(lock)} is)"
            raise CliError(
                f"{describe_file(path)} is locked by another process{whose}: a tierdisk "
                f"server's layer file? {harm}; {verb} to another file, or stop that process "
                "first"
            )
