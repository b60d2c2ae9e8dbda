"""Which layer kind made a file, so a file configured as another kind is refused unread.

An operator who changes a layer's ``kind`` and keeps its ``path`` (a config edit, a copy and
paste) points one kind's layer at another kind's file. Served that way the file is wrong
data: a ``sparse`` layer's data file as ``raw`` reads zeros from its holes over the layers
below; a ``sqlite`` layer's database as ``raw`` serves the database's own bytes, and the
first write overwrites its header, which loses every sector it held. So each layer kind
with a file looks, before it reads or makes anything, for the marks the other kinds leave:

- a ``sparse`` layer's presence map beside its data file (``PATH.map``, which begins with
  :data:`~.sparse_map.MAGIC`);
- a ``sqlite`` layer's database header (SQLite's ``SQLite format 3`` string and tierdisk's
  :data:`SQLITE_APPLICATION_ID` at byte 68, ``PRAGMA application_id``, which no other SQLite
  database carries) with the layer's lock file ``PATH.lock`` beside it: the header alone could
  be what a client wrote into sector 0 of a raw volume, which must not stop it starting.

A ``raw`` image has no mark: any bytes are a raw image. Files are opened without blocking
(``O_NONBLOCK``: a FIFO there never holds a start) and only regular files are looked at.
"""

from __future__ import annotations

import os
import stat

from tierdisk.client.layer_layout import FILES_BESIDE

from ..errors import ConfigError
from . import sparse_map

__all__ = ["SQLITE_APPLICATION_ID", "file_kind", "files_beside", "refuse_another_kinds_file"]

SQLITE_APPLICATION_ID = 0x54445351
"""``PRAGMA application_id`` of a tierdisk ``sqlite`` layer ("TDSQ"), big-endian at byte 68
of the database header."""

_SQLITE_MAGIC = b"SQLite format 3\x00"
_APPLICATION_ID_AT = 68


def files_beside(kind: str, path: str) -> list[str]:
    """The files a layer of ``kind`` at ``path`` makes or uses beside its own, as it names
    them (:data:`~tierdisk.client.layer_layout.FILES_BESIDE`: a sparse layer's beside
    ``path``, a sqlite layer's beside the database's resolved path): no other layer's file
    may be one of them, or the two layers would replace or remove each other's files.
    Blocks (``realpath``)."""
    stem = os.path.realpath(path) if kind == "sqlite" else path
    return [stem + suffix for suffix in FILES_BESIDE.get(kind, ())]


def _head(path: str, size: int) -> bytes:
    """The first ``size`` bytes of the regular file ``path``; ``b""`` when there is none, it
    is no regular file, or it cannot be read (its layer says why when it opens it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        return os.pread(fd, size, 0) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
    except OSError:
        return b""
    finally:
        os.close(fd)


def file_kind(path: str) -> str | None:
    """``"sparse"`` when a sparse layer's presence map lies beside ``path``, ``"sqlite"``
    when ``path`` is a tierdisk sqlite layer's database with its lock file beside it, else
    None (no file, or one no layer kind marks: a raw image, or nothing yet). Blocks (file
    reads)."""
    if _head(sparse_map.map_path(path), len(sparse_map.MAGIC)) == sparse_map.MAGIC:
        return "sparse"
    head = _head(path, _APPLICATION_ID_AT + 4)
    ours = SQLITE_APPLICATION_ID.to_bytes(4, "big")
    ours_by_header = head.startswith(_SQLITE_MAGIC) and head[_APPLICATION_ID_AT:] == ours
    if ours_by_header and os.path.lexists(os.path.realpath(path) + ".lock"):
        return "sqlite"
    return None


_AS_ANOTHER_KIND = {
    ("sparse", "raw"): "as a raw image its holes would read as zeros over the layers below, "
    "and its writes would not be in the map",
    ("sparse", "sqlite"): "it is no database",
    ("sqlite", "raw"): "as a raw image it is the database's own bytes, and a write would "
    "overwrite the database, losing every sector it holds",
    ("sqlite", "sparse"): "its bytes are no sparse layer's data",
}


def refuse_another_kinds_file(path: str, kind: str, what: str) -> None:
    """Raise a :class:`ConfigError` when the file at ``path``, configured as a layer of
    ``kind`` (``what`` names it in the message), was made by a layer of another kind
    (:func:`file_kind`), saying which kind to serve it as and what to move away if it is
    truly a file of ``kind`` now. Blocks (file reads)."""
    found = file_kind(path)
    if found is None or found == kind:
        return
    why = _AS_ANOTHER_KIND.get((found, kind), f"it is no {kind} layer's file")
    if found == "sparse":
        mark = sparse_map.map_path(path)
        raise ConfigError(
            f"{what} has a sparse layer's presence map beside it ({mark}): it is that "
            f'layer\'s data file; serve it as kind = "sparse" ({why}), or move the map away '
            f"if the file is a {kind} layer's now"
        )
    raise ConfigError(
        f"{what} is a tierdisk sqlite layer's database (its header says so, and its lock file "
        f'{os.path.realpath(path)}.lock is beside it): serve it as kind = "sqlite" ({why}), '
        f"or remove the lock file if the file is a {kind} layer's now"
    )
