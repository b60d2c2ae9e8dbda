"""The ``sqlite`` layer: a persistent layer in one SQLite file, one row per present sector.

Schema (format version 1; sector numbers in units of the layer's ``sector_size``):

- ``sectors(sector INTEGER PRIMARY KEY, data BLOB)``: a row means the sector is present;
  ``data`` is exactly ``sector_size`` bytes, or NULL for an all-zero sector.
- ``meta(key TEXT PRIMARY KEY, value)``: ``format`` (``"tierdisk-sqlite"``), ``version``
  (1), ``sector_size`` and ``sector_count`` (the size, kept up to date by resize),
  ``smallest_sector_count`` (the smallest size the layer has had, lowered by a shrink in the
  same transaction; a file without it, from an older build, reads as its size) and
  ``flushes`` (bumped by a flush whose checkpoint could not complete).

The database runs in WAL mode with ``synchronous=NORMAL``: every request is one transaction
(committed to the WAL, so a process crash loses nothing acknowledged, and a power cut rolls
back to a consistent, older state). ``flush`` runs a checkpoint, which in this mode fsyncs
the WAL before copying it into the database and the database after, so every commit is
durable and the WAL starts over (it holds at most what was written between two flushes; it
is cut back to 4 MiB when it starts over); should the checkpoint not complete, a one-row
update committed with ``synchronous=FULL`` fsyncs the WAL instead. A checkpoint that runs
out of space (``SQLITE_FULL``: the database file cannot grow to take the WAL's pages) still
makes a successful flush: the WAL, which holds every commit, is fsynced by itself (no new
space needed), and only a failure of that sync fails the flush. A ``fua`` write and a
resize commit their own transaction with ``synchronous=FULL``, so the layer honours FUA. A
new layer is formatted in ``<path>.tmp`` and renamed into place, so a crash never leaves a
half-made layer; a creation that fails (no space, say) removes what it made, the lock file
too, and is a :class:`StorageError` ("cannot start"), never a config error. Each flush
first checks that the database file the layer has open is still the one at ``path``
(:func:`~tierdisk.service.fileio.check_still_named`): a database removed, or replaced by
another file (a backup renamed over it), while served fails the flush with a
:class:`StorageError`, as what the layer writes would be lost at its next start.

All SQLite work runs on one worker thread per layer that owns the only connection, in
submission order: no request waits on the event loop, and a read-cache fill
(``INSERT OR IGNORE``) never overwrites a sector a write reached first. That order is also
why a write or unmap whose caller is cancelled needs no
:func:`~tierdisk.service.unstoppable.run_to_end` here (``raw`` and ``sparse`` need it): the
caller stops waiting, and the volume may release its sectors, but the work queued for the
thread runs (or, not started yet, is dropped) before any request submitted after the
cancel, so none of those can be overtaken by it.

Per-sector work. One row per sector is what this format is, so rows are the one place the
layer takes a Python step per sector: a write packs its rows with ``executemany`` over a
generator of ``memoryview`` slices (an all-zero sector becomes NULL by one comparison), a read
runs one ``SELECT`` over the range and copies each blob into the caller's buffer, building
the present runs as it goes. Presence queries and unmap-to-zeros stay in SQL (a window
query and a recursive CTE). This layer suits tests and small disks; ``sparse`` is the one
for large ones.

Locking: ``<path>.lock`` (beside the database, through any symlink) and the database file
itself are ``flock``-ed exclusively while the layer is open, so a second open of the same
layer, under this name or another (a hard link), fails with a :class:`ConfigError` naming
the path (:meth:`SqliteLayer._open`; its descriptor is closed only after SQLite's own, whose
POSIX locks a close would drop). Those locks are invisible to SQLite, so the connection
also runs with ``locking_mode=EXCLUSIVE``, set before its first read, and takes the write
lock at open: the database file stays locked (SQLite's POSIX locks) against every other
SQLite connection until the layer closes, so an ``sqlite3`` session can neither read nor
change rows under the server, nor stall its writes; one that holds a lock when the layer
opens makes the open fail at once with the same "already open" :class:`ConfigError`. In
that mode the WAL index lives in the process's memory: the layer makes no ``-shm`` file.
A lock file is removed only by an open that holds it (a creation that failed); an open
checks that the lock file it holds is still the one named ``<path>.lock``.

Permissions: the database, its WAL and the lock file must be writable (SQLite would
otherwise open the database read-only and fail every write); the open refuses one that is
not with a :class:`StorageError` naming that file (``cannot open sqlite layer …: …:
Permission denied``), and one SQLite can only read for another reason (``SQLITE_READONLY``
on the write lock at open: a read-only folder, say) likewise. A path that is not a regular
file is refused before anything is made beside it.

Errors: SQLite's ``SQLITE_FULL`` is :class:`NoSpace`: the transaction rolled back, so the
request changed nothing (so is the I/O error of a write past the process's file size limit,
``ulimit -f``, once the database or its WAL has grown to it); the WAL is then checkpointed
and truncated, now and before each later transaction until that works, to give back the
space of the rolled-back frames. That checkpoint copies the WAL's pages into the database
first, which grows it: after a full disk, writes resume only once there is room for that
growth (up to the WAL's size, a few MiB) plus the write itself; space freed below that goes
into the checkpoint and the filesystem fills again. SQLite needs some free space to delete
too (the WAL records the pages a delete changes; ``secure_delete=FAST`` keeps that small),
so on a full filesystem an unmap can fail with :class:`NoSpace` until space is freed
elsewhere. A corrupt file is :class:`DataCorruption`;
other failures are :class:`StorageError`. An existing layer keeps its recorded size and
sector size; a configured ``size`` or ``sector_size`` that disagrees is a
:class:`ConfigError`; a new one takes ``size``, else the layer below's, and with neither it
is a :class:`ConfigError`. ``unmap_behavior`` is ZEROES: ``next_is_zero`` deletes the rows,
otherwise each sector becomes a NULL row.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ..errors import (
    ConfigError,
    DataCorruption,
    InvalidArgument,
    NoSpace,
    StorageError,
    TierdiskError,
)
from ..fileio import (
    check_still_named,
    file_size_limit,
    fsync_folder,
    lock_or_refuse,
    make_parent_folder,
    missing_target,
    regular_file_size,
)
from ..layer import LayerMetadata, PartialLayer, check_recorded_geometry, layer_closed, new_geometry
from ..runs import Run
from ..unstoppable import run_to_end
from .layer_files import SQLITE_APPLICATION_ID, file_kind, refuse_another_kinds_file

__all__ = ["SqliteLayer"]

FORMAT = "tierdisk-sqlite"
VERSION = 1
_WAL_LIMIT = 4 << 20
"""Bytes the WAL file is cut back to when it starts over after a checkpoint."""

_MAX_INTEGER = (1 << 63) - 1
"""SQLite's largest INTEGER: the largest ``sector_count`` the ``meta`` table can record."""

_T = TypeVar("_T")

_SCHEMA = (
    "CREATE TABLE sectors (sector INTEGER PRIMARY KEY, data BLOB)",
    "CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value NOT NULL) WITHOUT ROWID",
)

_RUNS_SQL = """
SELECT MIN(sector), MAX(sector) + 1 FROM (
    SELECT sector, sector - ROW_NUMBER() OVER (ORDER BY sector) AS island
    FROM sectors WHERE sector >= ? AND sector < ?
) GROUP BY island ORDER BY 1
"""

_ZERO_ROWS_SQL = """
WITH RECURSIVE s(n) AS (SELECT ? UNION ALL SELECT n + 1 FROM s WHERE n + 1 < ?)
INSERT OR REPLACE INTO sectors (sector, data) SELECT n, NULL FROM s
"""


def _code(exc: BaseException) -> int:
    """SQLite's primary result code of ``exc`` (0 when it is not an SQLite error)."""
    code = getattr(exc, "sqlite_errorcode", None) or 0
    return code & 0xFF if isinstance(exc, sqlite3.Error) else 0


def _is_full(exc: BaseException) -> bool:
    return _code(exc) == sqlite3.SQLITE_FULL


def _domain_error(exc: sqlite3.Error, what: str) -> TierdiskError:
    """The domain error for SQLite's ``exc`` raised while doing ``what``: out of space,
    a corrupt database (or none), or another storage failure."""
    code = _code(exc)
    if code == sqlite3.SQLITE_FULL:
        return NoSpace(f"{what}: out of space ({exc})")
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return DataCorruption(f"{what}: {exc}")
    return StorageError(f"{what}: {exc}")


class SqliteLayer(PartialLayer):
    """An SQLite database at ``path`` (see the module docstring for the schema)."""

    kind = "sqlite"

    def __init__(self, path: str, size: int | None = None, sector_size: int | None = None) -> None:
        super().__init__()
        self.path = path
        self._size_bytes = size
        self._wanted_sector_size = sector_size
        self._worker: ThreadPoolExecutor | None = None
        self._closing = False  # close() began: later calls are refused
        self._db: sqlite3.Connection | None = None  # used on the worker thread only
        self._lock_fd = -1  # the lock file's (flock): this name, taken before a new file
        self._db_fd = -1  # the database file's (flock): any other name of the same file
        self._real = ""  # the database's path through any symlink (its WAL is beside it)
        self._present = 0  # rows in `sectors`
        self._smallest = 0  # meta's smallest_sector_count
        self._dirty = False  # committed without an fsync of the WAL since
        self._starved = False  # ran out of space: reclaim the WAL before the next write
        self._zero = b""

    # -- open and close -------------------------------------------------------------------

    async def _call(self, what: str, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn`` on the worker thread, in submission order (after a close began:
        ``UNAVAILABLE``, :func:`layer_closed`)."""
        if self._worker is None or (self._closing and fn != self._release_sync):
            raise layer_closed(f"sqlite layer {self.path}")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)
        except sqlite3.Error as exc:
            raise _domain_error(exc, f"{what} sqlite layer {self.path}") from None
        except OSError as exc:
            raise StorageError(f"{what} sqlite layer {self.path}: {exc.strerror}") from None

    @property
    def configured_size(self) -> int | None:
        return self._size_bytes

    async def attach(self, lower: LayerMetadata | None) -> None:
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="sqlite-layer")
        try:
            await self._call("opening", self._open, lower)
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError)
            if cancelled:  # the open goes on in the worker: close what it opens, there, after
                self._worker.submit(self._release_sync)
            self._worker.shutdown(wait=not cancelled)
            self._worker = None
            if isinstance(exc, NoSpace):  # at start, the storage's failure ("cannot start")
                raise StorageError(str(exc)) from exc
            raise

    def _open(self, lower: LayerMetadata | None) -> None:
        """Lock, create when there is no file (or an empty one), lock the database file,
        connect. Through a symlink, the database, its WAL, lock and temporary files are
        the target's (a new database is made there, not in place of the link). Anything but
        a regular file is refused, never replaced, before the lock file is made beside it.
        The lock file guards a new database's creation; the flock on the database file
        itself refuses the same database under another name (a hard link), whose lock file
        differs. (SQLite's own locks are POSIX record locks, independent of ``flock``: the
        connection takes them in exclusive mode, :meth:`_connect`.) An open that fails
        with no database there removes the lock file it holds."""
        what = f"sqlite layer {self.path}"
        make_parent_folder(self.path, what)
        real = os.path.realpath(self.path)
        if not os.path.isdir(os.path.dirname(real)):  # a link into a missing (unmounted?) folder
            raise missing_target(what, self.path)
        regular_file_size(real, what)  # a device, a FIFO: refused before PATH.lock is made
        refuse_another_kinds_file(self.path, "sqlite", what)  # a sparse layer's data file
        lock = real + ".lock"
        lock_fd = self._lock(lock, what)
        db_fd = -1
        try:
            if not regular_file_size(real, what):
                self._format(lower, real)
            try:
                db_fd = os.open(real, os.O_RDWR | os.O_CLOEXEC)  # writable, or SQLite reads only
            except OSError as exc:
                raise StorageError(f"cannot open {what}: {exc.strerror}") from None
            lock_or_refuse(db_fd, what)
            wal = real + "-wal"
            try:  # a crash's WAL SQLite would open read-only (every write then fails)
                os.close(os.open(wal, os.O_RDWR | os.O_CLOEXEC))
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StorageError(f"cannot open {what}: its WAL {wal}: {exc.strerror}") from None
            self._db = self._connect(real)
            # the file SQLite opened is the one locked (not another renamed there meanwhile)
            check_still_named(real, os.fstat(db_fd), f"opening {what}")
        except BaseException:
            if self._db is not None:
                db, self._db = self._db, None
                db.close()
            if db_fd >= 0:
                os.close(db_fd)
            if not os.path.lexists(real) or file_kind(real) != "sqlite":
                # a failed creation, or a file that is no database of ours (an image put
                # there by mistake): the lock file guards nothing, and is not left behind
                with contextlib.suppress(OSError):
                    os.unlink(lock)  # held: an open that has it open too sees it renamed
            os.close(lock_fd)
            raise
        self._lock_fd, self._db_fd, self._real = lock_fd, db_fd, real

    def _lock(self, lock: str, what: str) -> int:
        """Open and ``flock`` the lock file ``lock``; its descriptor. A lock file that is
        no longer named ``lock`` once locked was removed by a failed creation that held it:
        the lock is then taken on the one there now."""
        for _ in range(100):
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise StorageError(
                    f"cannot open {what}: its lock file {lock}: {exc.strerror}"
                ) from None
            try:
                lock_or_refuse(fd, what)
                held = os.fstat(fd)
                with contextlib.suppress(FileNotFoundError):
                    named = os.stat(lock)
                    if (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
                        return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise ConfigError(
            f"{what} is already open (its lock file {lock} keeps being replaced); two "
            "servers cannot share a layer"
        )

    def _format(self, lower: LayerMetadata | None, real: str) -> None:
        """Make a new database at ``real`` (the layer's path, through any symlink): built
        as a temporary file beside it, synced, then renamed into place."""
        ss, count = new_geometry(
            f"sqlite layer {self.path}", self._size_bytes, self._wanted_sector_size, lower
        )
        nbytes = ss * count
        tmp = real + ".tmp"
        made = (tmp, tmp + "-wal", tmp + "-shm", tmp + "-journal")
        for leftover in made:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        try:
            self._build(tmp, ss, nbytes // ss)
            for leftover in (real + "-wal", real + "-shm", real + "-journal"):
                # An old database's (deleted to start afresh): SQLite would replay its WAL
                # into the new one, bringing back its sectors or a "malformed" database.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)
            os.replace(tmp, real)
            fsync_folder(real)
        except (sqlite3.Error, OSError) as exc:
            for leftover in made:  # nothing half-made is left (a later start would retry)
                with contextlib.suppress(OSError):
                    os.unlink(leftover)
            if _is_full(exc):
                reason = f"out of space ({exc})"
            elif isinstance(exc, OSError):
                reason = exc.strerror or str(exc)
            else:
                reason = str(exc)
            raise StorageError(
                f"cannot create sqlite layer {self.path} of {nbytes} bytes: {reason}"
            ) from None

    @staticmethod
    def _build(tmp: str, ss: int, count: int) -> None:
        """Make the database file ``tmp`` (its schema and meta) and sync it."""
        db = sqlite3.connect(tmp, isolation_level=None)
        try:
            db.execute("PRAGMA locking_mode=EXCLUSIVE")  # no -shm to make
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA application_id={SQLITE_APPLICATION_ID}")
            db.execute("BEGIN")
            for statement in _SCHEMA:
                db.execute(statement)
            db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [
                    ("format", FORMAT),
                    ("version", VERSION),
                    ("sector_size", ss),
                    ("sector_count", count),
                    ("smallest_sector_count", count),
                    ("flushes", 0),
                ],
            )
            db.execute("COMMIT")
            # checkpoint here, where a failure is seen (close would keep it to itself)
            busy, frames, copied = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if busy or frames != copied:
                raise OSError(errno.EIO, "the new database's checkpoint did not complete")
        finally:
            db.close()  # removes the WAL
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _refusal(self, exc: sqlite3.Error, real: str) -> TierdiskError | None:
        """What an open refused by SQLite says: a lock held by another connection is "already
        open", a database SQLite can only read is a :class:`StorageError`; else None."""
        if _code(exc) == sqlite3.SQLITE_BUSY:
            return ConfigError(
                f"sqlite layer {self.path} is already open (its database is locked by another "
                f"process or SQLite connection: {exc}); two servers cannot share a layer"
            )
        if _code(exc) == sqlite3.SQLITE_READONLY:
            folder = os.path.dirname(real)
            if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_READONLY_DIRECTORY:
                why = f"its folder {folder} is not writable (SQLite makes its WAL there)"
            else:
                why = f"its folder {folder} or a file beside it is write-protected"
            return StorageError(
                f"cannot open sqlite layer {self.path}: SQLite can only read it ({exc}): {why}"
            )
        return None

    def _connect(self, real: str) -> sqlite3.Connection:
        """Connect in exclusive locking mode (set before the first read: the WAL index then
        lives in this process's memory, and the database file stays locked against every
        other connection until close), check the meta table, and take the write lock (which
        also tells a database SQLite can only read)."""
        try:
            db = sqlite3.connect(real, isolation_level=None, timeout=0)  # never wait for a lock
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open sqlite layer {self.path}: {exc}") from None
        try:
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            try:
                rows = dict(db.execute("SELECT key, value FROM meta").fetchall())
            except sqlite3.OperationalError as exc:
                if refusal := self._refusal(exc, real):
                    raise refusal from None
                if "no such table" in str(exc):
                    raise ConfigError(
                        f"sqlite layer {self.path}: missing meta table (not a tierdisk "
                        "sqlite layer)"
                    ) from None
                if "no such column" in str(exc):  # another program's table called meta
                    raise ConfigError(
                        f"sqlite layer {self.path}: its meta table is not tierdisk's "
                        f"({exc}): not a tierdisk sqlite layer"
                    ) from None
                raise
            except sqlite3.DatabaseError as exc:
                code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
                if code == sqlite3.SQLITE_CORRUPT:  # ours or not, its pages are damaged
                    raise DataCorruption(
                        f"sqlite layer {self.path}: the database file is corrupt ({exc})"
                    ) from None
                raise ConfigError(
                    f"sqlite layer {self.path} is not a readable SQLite database: {exc}"
                ) from None
            try:  # the write lock, held until close (exclusive mode)
                db.execute("BEGIN EXCLUSIVE")
                db.execute("ROLLBACK")
            except sqlite3.OperationalError as exc:
                if refusal := self._refusal(exc, real):
                    raise refusal from None
                raise
            if rows.get("format") != FORMAT or rows.get("version") != VERSION:
                raise ConfigError(
                    f"sqlite layer {self.path}: meta says format {rows.get('format')!r} "
                    f"version {rows.get('version')!r}; this build reads {FORMAT!r} {VERSION}"
                )
            ss, count = rows.get("sector_size"), rows.get("sector_count")
            smallest = rows.get("smallest_sector_count", count)
            if (
                not isinstance(ss, int)
                or not isinstance(count, int)
                or count <= 0
                or not isinstance(smallest, int)
                or not 0 < smallest <= count
            ):
                raise DataCorruption(
                    f"sqlite layer {self.path}: bad sector_size/sector_count/"
                    "smallest_sector_count in meta"
                )
            self._smallest = smallest
            check_recorded_geometry(
                f"sqlite layer {self.path}", ss, count, self._wanted_sector_size, self._size_bytes
            )
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT}")
            db.execute("PRAGMA secure_delete=FAST")  # deleting rows must not rewrite pages
            (self._present,) = db.execute("SELECT COUNT(*) FROM sectors").fetchone()
        except BaseException:
            db.close()
            raise
        self._set_geometry(ss, count)
        self._zero = bytes(ss)
        return db

    async def close(self) -> None:
        """Close the database after the calls already queued on the worker (they finish
        first, in order); calls made from now on are ``UNAVAILABLE``."""
        if self._worker is None or self._closing:
            return
        self._closing = True
        try:
            await self._call("closing", self._release_sync)
        finally:
            self._worker.shutdown()
            self._worker = None

    def _release_sync(self) -> None:
        """Close the database (on the worker: the connection belongs to it), then the locks
        (after it: closing a descriptor of the file drops this process's POSIX locks on it,
        SQLite's included)."""
        try:
            if self._db is not None:
                db, self._db = self._db, None
                db.close()  # checkpoints the WAL into the database and syncs both
        finally:
            for fd in (self._db_fd, self._lock_fd):
                if fd >= 0:
                    os.close(fd)
            self._db_fd = self._lock_fd = -1

    # -- capabilities -----------------------------------------------------------------------

    @property
    def zeros_cost_per_sector(self) -> bool:
        return True  # a row each

    @property
    def present_sectors(self) -> int:
        return self._present

    def _conn(self) -> sqlite3.Connection:
        assert self._db is not None, "sqlite layer used before attach or after close"
        return self._db

    @contextlib.contextmanager
    def _transaction(self, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction; ``durable`` commits it with ``synchronous=FULL``."""
        db = self._conn()
        if self._starved:
            self._reclaim_wal(db)
        if durable:
            db.execute("PRAGMA synchronous=FULL")
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                limit = self._file_size_limit_reached(exc)
                if _is_full(exc) or limit:
                    self._starved = True
                    self._reclaim_wal(db)
                if limit:  # rolled back too: changed nothing, as SQLITE_FULL
                    raise NoSpace(
                        f"sqlite layer {self.path}: beyond the file size limit "
                        f"({limit} bytes; {exc})"
                    ) from None
                raise
        finally:
            if durable:
                db.execute("PRAGMA synchronous=NORMAL")
        self._dirty = not durable  # a FULL commit fsyncs the WAL: every commit before it

    def _file_size_limit_reached(self, exc: BaseException) -> int:
        """The process's file size limit (``RLIMIT_FSIZE``: ``ulimit -f``, systemd's
        ``LimitFSIZE=``) when ``exc`` is the I/O error SQLite makes of the ``EFBIG`` a write
        past it gets (it keeps the errno to itself) and the database or its WAL has grown to
        it; else 0."""
        limit = file_size_limit()
        if _code(exc) != sqlite3.SQLITE_IOERR or limit is None:
            return 0
        for name in (self._real, self._real + "-wal"):
            with contextlib.suppress(OSError):
                if os.stat(name).st_size >= limit:
                    return limit
        return 0

    def _reclaim_wal(self, db: sqlite3.Connection) -> None:
        """After running out of space: checkpoint and truncate the WAL, giving back the space
        of rolled-back frames (best effort; retried before each transaction until it works)."""
        try:
            busy, frames, copied = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error:
            return
        if not busy and frames == copied:
            self._starved = False

    def _count(self, db: sqlite3.Connection, a: int, b: int) -> int:
        row = db.execute(
            "SELECT COUNT(*) FROM sectors WHERE sector >= ? AND sector < ?", (a, b)
        ).fetchone()
        return int(row[0])

    # -- I/O ----------------------------------------------------------------------------------

    async def read(self, buf: memoryview, sector: int) -> list[Run]:
        self._check_range(sector, len(buf) // self._sector_size)
        if self._shrink_end is not None:  # past the end of a shrink under way: its outcome
            await self._await_shrink(sector, len(buf) // self._sector_size)
        return await self._call("reading", self._read_sync, buf, sector)

    def _read_sync(self, buf: memoryview, sector: int) -> list[Run]:
        ss = self._sector_size
        end = sector + len(buf) // ss
        runs: list[Run] = []
        start = last = -2
        zero = self._zero
        rows = self._conn().execute(
            "SELECT sector, data FROM sectors WHERE sector >= ? AND sector < ?", (sector, end)
        )
        for s, data in rows:  # one step per present sector: inherent to one row per sector
            off = (s - sector) * ss
            if data is None:
                buf[off : off + ss] = zero
            elif type(data) is bytes and len(data) == ss:
                buf[off : off + ss] = data
            else:  # a damaged or hand-edited file: the column takes any type
                held = (
                    f"{len(data)} bytes"
                    if type(data) is bytes
                    else f"a value of type {type(data).__name__}"
                )
                raise DataCorruption(
                    f"sqlite layer {self.path}: sector {s} holds {held}, not {ss} bytes"
                )
            if s != last + 1:
                if start >= 0:
                    runs.append((start, last + 1))
                start = s
            last = s
        if start >= 0:
            runs.append((start, last + 1))
        return runs

    async def presence(self, sector: int, count: int) -> list[Run]:
        if self._shrink_end is not None:
            await self._await_shrink(sector, count)
        return await self._call("reading", self._presence_sync, sector, sector + count)

    def _presence_sync(self, a: int, b: int) -> list[Run]:
        return [(int(s), int(e)) for s, e in self._conn().execute(_RUNS_SQL, (a, b))]

    async def write(self, data: memoryview, sector: int, fua: bool) -> None:
        self._check_range(sector, len(data) // self._sector_size)
        if self._shrink_end is not None:
            await self._await_shrink(sector, len(data) // self._sector_size)
        await self._call("writing", self._write_sync, data, sector, fua, False)

    async def write_no_overwrite(self, data: memoryview, sector: int) -> int:
        self._check_range(sector, len(data) // self._sector_size)
        if self._shrink_end is not None:
            await self._await_shrink(sector, len(data) // self._sector_size)
        return await self._call("writing", self._write_sync, data, sector, False, True)

    def _write_sync(self, data: memoryview, sector: int, fua: bool, keep_present: bool) -> int:
        """Store ``data`` at ``sector`` (only the absent sectors with ``keep_present``);
        return how many sectors were not present before."""
        ss = self._sector_size
        count = len(data) // ss
        zero = self._zero
        rows = (
            (sector + i, None if (chunk := data[i * ss : (i + 1) * ss]) == zero else chunk)
            for i in range(count)
        )
        with self._transaction(durable=fua) as db:
            if keep_present:
                cur = db.executemany(
                    "INSERT OR IGNORE INTO sectors (sector, data) VALUES (?, ?)", rows
                )
                added = cur.rowcount
            else:
                added = count - self._count(db, sector, sector + count)
                db.executemany("INSERT OR REPLACE INTO sectors (sector, data) VALUES (?, ?)", rows)
        self._present += added
        if fua:  # durable for good once it returns: only if the database still has its name
            what = f"writing sqlite layer {self.path}"
            check_still_named(self.path, os.fstat(self._db_fd), what)
        return added

    async def unmap(
        self, sector: int, count: int, block_level_only: bool, next_is_zero: bool
    ) -> None:
        self._check_range(sector, count)
        if self._shrink_end is not None:
            await self._await_shrink(sector, count)
        if count:
            await self._call("unmapping in", self._unmap_sync, sector, sector + count, next_is_zero)

    def _unmap_sync(self, a: int, b: int, next_is_zero: bool) -> None:
        with self._transaction() as db:
            if next_is_zero:
                change = -db.execute(
                    "DELETE FROM sectors WHERE sector >= ? AND sector < ?", (a, b)
                ).rowcount
            else:
                change = (b - a) - self._count(db, a, b)
                db.execute(_ZERO_ROWS_SQL, (a, b))
        self._present += change

    async def flush(self) -> None:
        await self._call("flushing", self._flush_sync)

    def _flush_sync(self) -> None:
        # A database removed or replaced while served: what follows would sync a file the
        # next start does not open (fstat now: also tells a file left with no name).
        check_still_named(self.path, os.fstat(self._db_fd), f"flushing sqlite layer {self.path}")
        if not self._dirty:
            return
        db = self._conn()
        # With synchronous=NORMAL a checkpoint fsyncs the WAL before copying it and the
        # database after: a complete one makes every commit durable and lets the WAL start
        # over (so it holds at most what was written between two flushes).
        try:
            busy, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            if not (_is_full(exc) or self._file_size_limit_reached(exc)):
                raise
            # Out of space copying pages into the database, which cannot grow: the WAL
            # holds every commit, and syncing it needs no space.
            self._starved = True
            self._sync_wal(exc)
            self._dirty = False
            return
        if busy or frames != copied:  # not complete: fsync the WAL through a FULL commit
            with self._transaction(durable=True):
                db.execute("UPDATE meta SET value = value + 1 WHERE key = 'flushes'")
        self._dirty = False

    def _sync_wal(self, full: sqlite3.Error) -> None:
        """fsync the WAL (and its folder, for its name) by itself, after a checkpoint that
        ran out of space (``full``); a :class:`StorageError` saying both when that fails."""
        wal = self._real + "-wal"
        try:
            fd = os.open(wal, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_folder(wal)
        except OSError as exc:
            raise StorageError(
                f"flushing sqlite layer {self.path}: the checkpoint ran out of space ({full}) "
                f"and syncing its WAL {wal} failed: {exc.strerror or exc}"
            ) from None

    @property
    def smallest_size(self) -> int:
        return self._smallest

    async def resize(self, sector_count: int) -> None:
        """Resize the layer; runs to its end if the caller is cancelled meanwhile (the rows
        deleted by a shrink and the size this layer reports must agree)."""
        await run_to_end(self._resize(sector_count))

    async def _resize(self, sector_count: int) -> None:
        if sector_count <= 0:
            raise InvalidArgument(
                f"sqlite layer {self.path}: size must be at least one sector, not {sector_count}"
            )
        if sector_count > _MAX_INTEGER:  # SQLite cannot store it; the layer stays as it is
            raise InvalidArgument(
                f"sqlite layer {self.path}: {sector_count} sectors is more than SQLite can "
                f"record ({_MAX_INTEGER})"
            )
        old = self._sector_count
        if sector_count == old:
            return
        # A shrink shows once committed; I/O past its end waits for it (Layer._shrinking).
        shrink = sector_count < old
        with self._shrinking(sector_count) if shrink else contextlib.nullcontext():
            await self._call("resizing", self._resize_sync, sector_count)
            self._sector_count = sector_count
            self._notify_resized()

    def _resize_sync(self, sector_count: int) -> None:
        smallest = min(self._smallest, sector_count)
        with self._transaction(durable=True) as db:
            dropped = db.execute("DELETE FROM sectors WHERE sector >= ?", (sector_count,)).rowcount
            db.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                [("sector_count", sector_count), ("smallest_sector_count", smallest)],
            )
        self._present -= dropped
        self._smallest = smallest

    # -- diagnostics ----------------------------------------------------------------------------

    def inspect(self) -> dict[str, Any]:
        details: dict[str, Any] = {"path": os.path.abspath(self.path)}
        real = os.path.realpath(self.path)  # the WAL is beside the database, not a link to it
        for key, name in (("file_bytes", real), ("wal_bytes", real + "-wal")):
            with contextlib.suppress(OSError):
                details[key] = os.stat(name).st_size
        return details
