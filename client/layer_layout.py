"""The files a tierdisk server's layer keeps beside its own file, and which one it locks.

One table for both packages: the server refuses a layer whose file is one of another
layer's (:mod:`tierdisk.service.layers.layer_files`), and the CLI refuses to replace or
truncate a running layer's file (``export``, ``read -o``: :mod:`.localfile`). A layer at
``PATH`` (the layer kinds' module docstrings say what each file holds):

- ``raw``: the image ``PATH``, ``flock``-ed itself while the layer runs;
- ``sparse``: the data file ``PATH`` (``flock``-ed), its presence map ``PATH.map`` and the
  map's compaction ``PATH.map.tmp``;
- ``sqlite``: the database ``PATH``, its lock file ``PATH.lock`` (``flock``-ed; beside the
  database's resolved path), SQLite's ``PATH-wal``, ``PATH-shm`` and ``PATH-journal``, and a
  new database's ``PATH.tmp`` with SQLite's files of it.
"""

from __future__ import annotations

__all__ = ["FILES_BESIDE", "LOCK_SUFFIX", "SPARSE_MAP_SUFFIX", "lock_files"]

SPARSE_MAP_SUFFIX = ".map"
"""A sparse layer's presence map is ``PATH.map``."""

_SQLITE_JOURNALS = ("-wal", "-shm", "-journal")

FILES_BESIDE: dict[str, tuple[str, ...]] = {
    "raw": (),
    "sparse": (SPARSE_MAP_SUFFIX, SPARSE_MAP_SUFFIX + ".tmp"),
    "sqlite": (".lock", *_SQLITE_JOURNALS, ".tmp", *(".tmp" + j for j in _SQLITE_JOURNALS)),
}
"""Layer kind → the suffixes of the files a layer at ``PATH`` makes or uses beside ``PATH``
(``PATH + suffix``)."""

LOCK_SUFFIX: dict[str, str] = {"raw": "", "sparse": "", "sqlite": ".lock"}
"""Layer kind → the suffix of the file a running layer at ``PATH`` holds an ``flock`` on:
its own file, or a sqlite database's lock file."""


def lock_files(target: str) -> list[str]:
    """The files whose ``flock`` would show that ``target`` is a running layer's file (its
    own file, or one beside it): for each kind and each file it keeps, where ``target``
    would be that file, the file that kind locks. First those of the file itself."""
    found: list[str] = []
    for kind, beside in FILES_BESIDE.items():
        for suffix in ("", *beside):
            if target.endswith(suffix) and len(target) > len(suffix):
                lock = target[: len(target) - len(suffix)] + LOCK_SUFFIX[kind]
                if lock not in found:
                    found.append(lock)
    return found
