"""The ``export`` verb of the ``tierdisk`` command: the whole volume into a file, a device,
a pipe or stdout (DESIGN.md §7; the four verbs that move data are introduced in
:mod:`tierdisk.client.transfer`).

Files, devices, pipes and ``-``
    ``export`` writes all ``sector_count * sector_size`` bytes of the volume. Into a
    regular file (or a new one) it is sparse, and IMAGE is replaced, never written in
    place: a new file ``.IMAGE.tierdisk-export-XXXXXXXX`` in IMAGE's folder (created
    exclusively) is sized to the volume at once and only the allocated runs are written
    where they belong; unallocated runs, and chunks that read back all zeros, are left as
    holes (the file reads the same); then it is fsynced, renamed over IMAGE, and the folder
    fsynced. Through a symlink, the file it leads to is replaced and the link kept. The new
    file gets the old one's permission bits (and owner and group, where allowed); a new
    IMAGE those of any new file. Since IMAGE is not opened, exporting onto the very file a
    server's layer reads the volume from does not lose it: the server keeps reading the
    old file, which holds the same bytes (writes it takes later land in that old file,
    not in the new one, which it opens on restart). Until the rename both files take
    space; hard links to the old file keep the old bytes. Into a block device, a pipe, a character
    device or stdout (IMAGE ``-``, ``/dev/stdout``) every byte is written in order, in
    place, zeros for the holes, with no truncating or seeking; a block device is fsynced
    too. A regular file is replaced wherever it is, ``/dev/shm`` included, but for one
    reached through ``/proc`` or ``/sys`` (``/dev/stdout`` redirected to a file); a name
    missing in ``/dev`` itself (not on a filesystem mounted below it) is a missing device:
    an error, not a new file.

A failed export
    A failed export (Ctrl-C, SIGTERM or SIGHUP too) into a regular file removes its
    temporary file and leaves IMAGE as it was, or not there if it was not; the message ends
    with that (``; 'img' is unchanged``, ``; 'img' was not created``). A device or a pipe
    is left as it is (a regular file reached through ``/proc``, such as ``/dev/stdout``
    redirected to a file, is written in place and emptied: ``; emptied the partial file
    …``).

Chunking
    An export reads the allocated runs in windows
    (:func:`~tierdisk.client.chunking.plan_windows`): runs less than :data:`_GAP_BYTES`
    apart share one request, so a fragmented volume is not one request per run; a sparse
    export writes each run's bytes where they belong (``pwrite``, in any order; all-zero
    runs stay holes), an in-order one the whole window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import stat
import sys
from collections.abc import Callable, Iterator

from .aio import AsyncClient, AsyncVolume
from .chunking import ReadWindow, plan_windows, run_bounded, run_ordered, sectors_per_chunk
from .cli_errors import CliError, describe_file, file_error
from .copy_report import progress_bar, reported_with_bytes_out, with_note
from .localfile import Sink, fsync_folder, isatty, open_file, refuse_a_locked_file, std_path
from .models import AllocationExtent, VolumeInfo
from .progress import Progress

__all__ = ["export_image"]


async def export_image(client: AsyncClient, args: argparse.Namespace) -> int:
    """``export VOL IMAGE``: the whole volume into IMAGE (``-``: stdout). Into a regular
    file (or a new one) it is sparse and written under a temporary name in the same folder,
    renamed over IMAGE only once complete and fsynced, so a failure or Ctrl-C leaves an
    existing IMAGE as it was (:func:`_export_replacing`). Into anything else (a device, a
    pipe, stdout) every byte is written in order, in place (see the module's notes)."""
    vol = client.volume(args.volume)
    info = await vol.info()
    extents = await vol.allocation(0, info.sector_count)
    label = f"export {vol.name}"
    path = std_path(args.image)
    if path is None:  # stdout: every byte in order, whatever it is (a pipe, a file, …)
        data_on_tty = isatty(sys.stdout.buffer)
        sink = Sink()
        with (
            reported_with_bytes_out(args, sink, info.size_bytes),
            progress_bar(args, info.size_bytes, label, data_on_tty=data_on_tty) as bar,
        ):
            await _export_in_order(client, vol, info, extents, sink, bar)
        return 0
    target = _replaceable(path)
    if target is not None:
        await _export_replacing(client, args, vol, info, extents, path, target, label)
    else:
        await _export_in_place(client, args, vol, info, extents, path, label)
    return 0


_IN_PLACE_FOLDERS = ("/proc", "/sys")
"""Folders (with those below them) whose entries an export writes in place, whatever they
are: their files are the kernel's (``/proc/self/fd/1``, where ``/dev/stdout`` leads, is
someone's open descriptor), not names to replace or create."""

_DEVICES = "/dev"
"""Where the kernel makes the device nodes: a name missing there is a missing device."""


def _below(folder: str, top: str) -> bool:
    """Whether the folder ``folder`` is ``top`` or lies below it."""
    return folder == top or folder.startswith(top + "/")


def _device_folder(folder: str) -> bool:
    """Whether ``folder`` (links resolved) is on the filesystem of ``/dev`` itself, not on
    one mounted below it (``/dev/shm``): a name missing there is a device that is not
    there, so no file is created in its place (nor an image's worth of memory taken)."""
    if not _below(folder, _DEVICES):
        return False
    try:
        return os.stat(folder).st_dev == os.stat(_DEVICES).st_dev
    except OSError:
        return True  # the open in place reports it


def _replaceable(path: str) -> str | None:
    """The regular file that an export to ``path`` replaces (``path`` itself, or where its
    symlinks lead; it may not exist yet), or ``None`` to write ``path`` in place: it is a
    device, a pipe, a socket or a folder; it lies in ``/proc`` or ``/sys``
    (:data:`_IN_PLACE_FOLDERS`: ``/dev/stdout`` and ``/dev/fd/N`` lead there, to someone's
    open descriptor, not a name to replace); or it does not exist in ``/dev`` itself (a
    missing device: not created, :func:`_device_folder`). A regular file anywhere else,
    ``/dev/shm`` included, is replaced. A symlink loop is left for the open in place to
    report."""
    for _ in range(40):  # the kernel's own limit on symlinks followed (ELOOP)
        folder = os.path.realpath(os.path.dirname(os.path.abspath(path)))
        if any(_below(folder, top) for top in _IN_PLACE_FOLDERS):
            return None
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            # a new file (or a dangling symlink's target); never a missing device
            return None if _device_folder(folder) else path
        except OSError:
            return None  # e.g. a folder on the way is not one: the open reports it
        if stat.S_ISREG(st.st_mode):
            return path
        if not stat.S_ISLNK(st.st_mode):
            return None
        try:
            path = os.path.join(os.path.dirname(path), os.readlink(path))
        except OSError:
            return None
    return None


@contextlib.contextmanager
def _cleaned_up_on_failure(
    args: argparse.Namespace, path: str, clean_up: Callable[[], str]
) -> Iterator[None]:
    """The failure of an export into ``path``, Ctrl-C included, once ``clean_up()`` has
    undone what it can and returned the note saying so (``""``: nothing to say): an
    :class:`Exception` is raised as one line ending with that note (:func:`with_note`),
    anything else (Ctrl-C, a cancellation) as it is."""
    try:
        yield
    except BaseException as exc:
        note = clean_up()
        if isinstance(exc, Exception):
            raise with_note(exc, args, path, note) from None
        raise


async def _export_replacing(
    client: AsyncClient,
    args: argparse.Namespace,
    vol: AsyncVolume,
    info: VolumeInfo,
    extents: list[AllocationExtent],
    path: str,
    target: str,
    label: str,
) -> None:
    """Export into the regular file ``target`` (IMAGE ``path``, or where its symlinks
    lead) by replacing it: the volume is written, sparse, into a new file
    ``.NAME.tierdisk-export-XXXXXXXX`` beside it (created exclusively; :func:`_temp_file`),
    fsynced, renamed over ``target``, and the folder fsynced. ``target`` is never written,
    let alone truncated, and one another process holds an ``flock`` on (a server's layer
    file) is refused (:func:`~tierdisk.client.localfile.refuse_a_locked_file`). On any
    failure, Ctrl-C included, the temporary file is removed and ``target`` is as it was (or
    still does not exist); the message ends with that (``; 'img' is unchanged``)."""
    try:
        old: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        old = None
    except OSError as err:
        raise file_error(path, err) from None
    if old is not None:
        refuse_a_locked_file(
            path,
            target,
            harm="Replacing it would lose every write that process makes to it from now on",
            verb="export",
        )
    fd, temp = _temp_file(path, target, old)
    renamed = False

    def clean_up() -> str:
        if renamed:
            return ""
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        return _remove_temp(temp, path, old)

    with _cleaned_up_on_failure(args, path, clean_up):
        with progress_bar(args, info.size_bytes, label) as bar:
            await _export_sparse(client, vol, info, extents, fd, bar)
        os.fsync(fd)
        fd, closing = -1, fd
        os.close(closing)
        os.rename(temp, target)
        renamed = True
        fsync_folder(os.path.dirname(target))


def _temp_file(path: str, target: str, old: os.stat_result | None) -> tuple[int, str]:
    """A new, empty file beside ``target`` (IMAGE ``path``) to export into:
    ``(fd, its path)``, created exclusively under a random name (``.NAME`` and a suffix,
    NAME cut short for a long one), so no other file is ever opened. It gets the permission
    bits of the ``old`` file it replaces (and its owner and group, where the system allows
    that), before a byte is written; for a new IMAGE, those of any new file (``0o666``
    less the umask)."""
    folder, name = os.path.split(target)
    try:
        longest = os.pathconf(folder or ".", "PC_NAME_MAX")  # bytes
    except (OSError, ValueError):
        longest = 255
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        suffix = f"{_TEMP_INFIX}{secrets.token_hex(4)}"
        # NAME cut short where the whole would be longer than a file name may be
        cut = os.fsdecode(os.fsencode(name)[: longest - 1 - len(suffix)])
        temp = os.path.join(folder, f".{cut}{suffix}")
        try:
            fd = os.open(temp, flags, 0o666)
            break
        except FileExistsError:
            continue
        except OSError as err:
            if old is not None:  # IMAGE is there: it is its folder that refuses
                raise CliError(
                    f"{describe_file(path)}: cannot create a temporary file beside it to "
                    f"export into: {err.strerror or err}"
                ) from None
            raise file_error(path, err) from None
    else:
        raise CliError(f"{describe_file(path)}: cannot find a free temporary name beside it")
    if old is not None:
        try:
            with contextlib.suppress(PermissionError):  # another owner: only root may
                os.fchown(fd, old.st_uid, old.st_gid)
            os.fchmod(fd, stat.S_IMODE(old.st_mode))
        except OSError as err:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise file_error(path, err) from None
    return fd, temp


_TEMP_INFIX = ".tierdisk-export-"
"""In the name of the file an export writes before renaming it over IMAGE:
``.IMAGE.tierdisk-export-XXXXXXXX`` (eight random hex digits), in IMAGE's folder."""


def _remove_temp(temp: str, path: str, old: os.stat_result | None) -> str:
    """After a failed export: remove its temporary file ``temp``. Returns the note for the
    error message: IMAGE (``path``) is unchanged, or was not created; or that ``temp`` is
    left behind, if it could not be removed."""
    try:
        os.unlink(temp)
    except FileNotFoundError:
        pass
    except OSError as err:
        return f"; could not remove the partial file {temp!r}: {err.strerror or err}"
    return f"; {path!r} is unchanged" if old is not None else f"; {path!r} was not created"


_GAP_BYTES = 128 * 1024
"""Bytes: allocated runs of an export closer than this are read by one request, the gap
with them (read as zeros, not written to a sparse file): a 1 MiB read costs about as much
as two small ones."""


def _windows(
    client: AsyncClient, info: VolumeInfo, extents: list[AllocationExtent]
) -> list[ReadWindow]:
    """The read requests of an export: the allocated runs, neighbours closer than
    :data:`_GAP_BYTES` sharing one request of at most ``client.max_io`` bytes."""
    ss = info.sector_size
    return list(
        plan_windows(
            ((e.sector, e.end) for e in extents if e.allocated),
            sectors_per_chunk(client.max_io, ss),
            _GAP_BYTES // ss,
        )
    )


def _write_runs(fd: int, data: bytes, window: ReadWindow, ss: int) -> None:
    """``pwrite`` each run of ``window`` from ``data`` (the window's bytes) where it belongs
    in the file; an all-zero run is left as a hole (the file reads the same)."""
    view = memoryview(data)
    for a, b in window.runs:
        lo, hi = (a - window.sector) * ss, (b - window.sector) * ss
        if data.count(0, lo, hi) == hi - lo:
            continue  # all zeros: the hole reads the same
        offset = a * ss
        while lo < hi:  # a short write (rare for a regular file) goes on where it stopped
            n = os.pwrite(fd, view[lo:hi], offset)
            lo += n
            offset += n


async def _export_sparse(
    client: AsyncClient,
    vol: AsyncVolume,
    info: VolumeInfo,
    extents: list[AllocationExtent],
    fd: int,
    bar: Progress,
) -> None:
    """Export into the empty regular file open as ``fd``: sized to the volume at once, all
    holes; then the allocated runs are written where they belong, a few windows at a
    time."""
    ss = info.sector_size
    os.ftruncate(fd, info.size_bytes)
    bar.skip(sum(e.sector_count for e in extents if not e.allocated) * ss)

    async def one(window: ReadWindow) -> None:
        data = await vol.read(window.sector, window.sector_count)
        await asyncio.to_thread(_write_runs, fd, data, window, ss)
        bar.advance(sum(b - a for a, b in window.runs) * ss)

    await run_bounded(_windows(client, info, extents), one, client.max_in_flight)


async def _export_in_order(
    client: AsyncClient,
    vol: AsyncVolume,
    info: VolumeInfo,
    extents: list[AllocationExtent],
    sink: Sink,
    bar: Progress,
) -> None:
    """Export as one stream of ``sector_count * sector_size`` bytes: the windows of
    allocated runs read ahead in order (the gaps inside a window read as zeros), zeros
    written between them."""
    ss = info.sector_size
    zeros = memoryview(bytes(sectors_per_chunk(client.max_io, ss) * ss))

    async def fill(nbytes: int) -> None:
        while nbytes:
            n = min(nbytes, len(zeros))
            await sink.write(zeros[:n])
            bar.advance(n)
            nbytes -= n

    async def one(window: ReadWindow) -> bytes:
        return await vol.read(window.sector, window.sector_count)

    done = 0  # sectors written so far
    windows = run_ordered(_windows(client, info, extents), one, client.max_in_flight)
    try:
        try:
            async for window, data in windows:
                await fill((window.sector - done) * ss)
                await sink.write(data)
                bar.advance(len(data))
                done = window.sector + window.sector_count
        finally:
            await windows.aclose()
        await fill((info.sector_count - done) * ss)
        sink.flush()
    finally:
        sink.close()


async def _export_in_place(
    client: AsyncClient,
    args: argparse.Namespace,
    vol: AsyncVolume,
    info: VolumeInfo,
    extents: list[AllocationExtent],
    path: str,
    label: str,
) -> None:
    """Export into ``path`` as it is: a device, a pipe, a character device, or a file
    reached through ``/proc`` (``/dev/stdout`` redirected to a file) — never created,
    truncated, or seeked, except that a regular file (the last case) is truncated and
    written sparse, and emptied again if the export fails (``; emptied the partial file
    …``): a full-size file left behind would look complete. A block device is fsynced at
    the end. Anything else is left as it is on a failure."""
    fd = await open_file(path, os.O_WRONLY)
    regular = False

    def clean_up() -> str:
        note = ""
        if fd >= 0:
            if regular:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                    note = f"; emptied the partial file {path!r}"
            with contextlib.suppress(OSError):
                os.close(fd)
        return note

    with _cleaned_up_on_failure(args, path, clean_up):
        st = os.fstat(fd)
        regular = stat.S_ISREG(st.st_mode)
        with progress_bar(args, info.size_bytes, label) as bar:
            if regular:
                os.ftruncate(fd, 0)
                await _export_sparse(client, vol, info, extents, fd, bar)
            else:  # a device, a pipe, …: no truncating, no seeking, no holes
                sink = Sink(fd, path)
                with reported_with_bytes_out(args, sink, info.size_bytes):
                    await _export_in_order(client, vol, info, extents, sink, bar)
        if regular or stat.S_ISBLK(st.st_mode):
            os.fsync(fd)
        fd, closing = -1, fd
        os.close(closing)
