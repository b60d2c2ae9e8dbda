"""The presence map file of a ``sparse`` layer, kept as a log: its format is in
:mod:`.sparse_map`; what each record says, and when one is written, is the layer's
(:mod:`.sparse`).

:class:`MapLog` holds the open map (``<path>.map``) and where its log stands: the last
record's ``seq``, the end of its ``SNAP`` record (``snapshot_end``) and of the log
(``log_end``), in bytes from the start of the file. It reads the map whole at open (the
header checked first), cuts off a torn tail, appends a ``DIFF`` record (durable, by
``fdatasync``, before it returns), and replaces the whole map with a fresh header and
``SNAP`` record atomically: written to ``<path>.map.tmp``, fsynced, renamed over the map,
then the folder fsynced.

An append that fails cuts the map back to its last record, so the map stays whole; if even
that fails, :attr:`MapLog.rewrite` is set, as it is for a map of an older format: its tail
is not to be appended to, and the next commit writes a snapshot. The layer writes a record
only after the ``fdatasync`` of its data file, so the map never names a sector whose data
is not durable.
"""

from __future__ import annotations

import os
from array import array

from ..errors import StorageError
from ..fileio import fsync_folder, pwrite_all, replace_with_new_file
from ..presence import RunSet
from . import sparse_map
from .sparse_map import DIFF, HEADER_SIZE, SNAP, MapState, encode_header, encode_record, flat

__all__ = ["MapLog"]


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    parts: list[bytes] = []
    done = 0
    while done < size:
        part = os.pread(fd, size - done, done)
        if not part:
            break
        parts.append(part)
        done += len(part)
    return b"".join(parts)


class MapLog:
    """The presence map at ``path``; not open (``fd`` -1) until :meth:`read` or
    :meth:`write_snapshot` opens it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        self.seq = 0  # the last record's
        self.log_end = 0
        self.snapshot_end = 0
        self.rewrite = False  # the map's tail is unusable: the next commit rewrites it

    def read(self) -> bytes:
        """Open the map and read it whole; :class:`StorageError` if it cannot be read or
        does not fit in memory."""
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            # its header first: a file that is no map (an image put there by mistake, a
            # size damaged to terabytes) is refused before it is read into memory
            sparse_map.check_header(os.pread(self.fd, HEADER_SIZE, 0), self.path)
            return _read_all(self.fd)
        except OSError as exc:
            raise StorageError(
                f"cannot read the presence map {self.path}: {exc.strerror}"
            ) from None
        except MemoryError:
            raise StorageError(
                f"cannot read the presence map {self.path}: its "
                f"{os.fstat(self.fd).st_size} bytes do not fit in memory"
            ) from None

    def cut_torn_tail(self, end: int) -> None:
        """Cut the map read at ``end`` (the end of its last complete record), durably."""
        try:
            os.ftruncate(self.fd, end)
            os.fsync(self.fd)
        except OSError as exc:
            raise StorageError(
                f"cannot cut the torn end off the presence map {self.path}: {exc.strerror}"
            ) from None

    def resume(self, state: MapState) -> None:
        """Go on from the map as read (``state``): appends follow its last record."""
        self.rewrite = state.version < sparse_map.VERSION  # never append to an older format
        self.seq = state.seq
        self.log_end = state.end
        self.snapshot_end = state.snapshot_end

    def append(self, removed: RunSet, added: RunSet, size: int, smallest: int) -> None:
        record = encode_record(DIFF, self.seq + 1, size, smallest, flat(removed), flat(added))
        try:
            pwrite_all(self.fd, memoryview(record), self.log_end)
            os.fdatasync(self.fd)
        except OSError:
            try:
                os.ftruncate(self.fd, self.log_end)
            except OSError:
                self.rewrite = True
            raise
        self.seq += 1
        self.log_end += len(record)

    def write_snapshot(self, sector_size: int, runs: array[int], size: int, smallest: int) -> None:
        """Replace the map with header + one SNAP record, atomically
        (:func:`~tierdisk.service.fileio.replace_with_new_file` through ``PATH.map.tmp``)."""
        blob = encode_header(sector_size, size) + encode_record(
            SNAP, self.seq + 1, size, smallest, array("q"), runs
        )
        fd = replace_with_new_file(self.path, self.path + ".tmp", blob)
        old, self.fd = self.fd, fd
        if old >= 0:
            os.close(old)
        self.seq += 1
        self.log_end = self.snapshot_end = len(blob)
        self.rewrite = False
        fsync_folder(self.path)

    def close(self) -> None:
        """Close the map, if it is open."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
