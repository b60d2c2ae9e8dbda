"""Each volume's write verifier, kept across clean stops in ``DATA_DIR/write-verifiers.json``.

A write verifier (:mod:`tierdisk.client.verifiers` says what clients do with it) is a
non-zero 64-bit number that must change whenever writes a volume acknowledged without making
them durable may have been lost. A server that stopped cleanly (calls drained, every final
flush succeeded) lost none, so its volumes keep their verifiers: a client that wrote before
a rolling restart and flushes after it is not told of a loss that did not happen. Any other
end (a crash, a kill, a power loss, a final flush that failed, a server that never got to
write this file) gives the volume a new one at the next start.

The file holds, per volume name, ``{"verifier": N, "clean": bool, "kept_writes": bool,
"files": [PATH, …], "stack": [PATH, …], "left": [PATH, …]}``: ``kept_writes`` says
whether the run that wrote the entry (the one that stopped, or the one that marked it and
then crashed) keeps its writes past its stop (false for a write path that is ``ram`` only:
it lost them however it stopped, so the next start draws a new verifier, whatever the
volume's config is then, and a crash of such a run is no unclean stop worth a warning:
nothing it held was to outlive it); an entry without it, written by an older build, gets a
new one only if the volume's write path is ``ram`` only now, as that build did;
``crash_untold`` (a clean entry) says a crash before the run that wrote it was counted
by no server that went on serving (that run's start was refused), so the next start warns
and counts it (:meth:`VerifierStore.close`);
``files`` are the layer files the volume was last served from (:mod:`.kept_files`, which
refuses to start a volume whose kept file went missing; :attr:`VerifierStore.files` says
what to write, :meth:`VerifierStore.recorded_files` what the last run wrote), in layer
order; ``stack`` every layer file of its stack then, read caches' too, and ``left`` the files
that have left its stack since they were last in it (a start warns of a layer back at one:
:class:`~.kept_files.KeptFiles`). An older build drops the last two. At start
(:meth:`VerifierStore.open`) the server reads it, takes the verifier of each volume whose
entry is clean and draws a new one for every other; before it serves a volume
(:meth:`VerifierStore.mark_unclean`) it writes that volume back as not clean (synced; volumes
that open together share one write): a crash from then on leaves it not clean. A volume not
served in a run (a start that failed, a tier that never answered) keeps its entry. At a
clean stop (:meth:`VerifierStore.close`) it writes the served volumes that stopped cleanly
as clean, with their verifiers then (a volume's verifier also changes while it runs, when a
flush finds writes lost: :attr:`~tierdisk.service.volume.Volume.write_verifier`). A volume
served read-only is written clean at its mark and at any stop: it acknowledges no write, so
no end of its run loses one. Entries of volumes no longer configured are kept as they are.

The file is replaced whole, never rewritten in place: the new record goes into
``write-verifiers.json.new``, is synced, and is renamed over the old one (the folder synced
after), so a crash or a power cut at any moment leaves the old record or the new one, never a
torn one (a torn record would lose the kept-files guard of every volume). ``data_dir`` is
``flock``ed for the server's life (and the record too, as older builds lock it). When the file
cannot be used (another server holds it, the folder is read-only, it cannot be synced) the
server logs a warning and draws new verifiers, keeping nothing: each restart then counts as
unclean for its clients (their next flush after it raises ``WritesLost`` if they had unflushed
writes), which is safe; what it records of each volume's files still counts. A file that
cannot be read as this format (empty, torn by an older build's crash, damaged, no regular
file) has no clean entry, and does not say which files any volume was served from: each
configured volume gets an entry that says so (a verifier, not clean, no ``files``), so each
file of the volume counts as served from (:mod:`.kept_files` refuses a missing one) until a
run that serves the volume records its files.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import secrets
import stat
from collections.abc import Collection, Iterable, Mapping, Sequence

from .fileio import fsync_folder, replace_with_new_file

__all__ = ["FILE_NAME", "NEW_SUFFIX", "VerifierStore", "new_verifier"]

log = logging.getLogger(__name__)

FILE_NAME = "write-verifiers.json"
"""The file in ``data_dir`` (DESIGN.md §4) that keeps the verifiers."""

NEW_SUFFIX = ".new"
"""The next record is written to ``FILE_NAME + NEW_SUFFIX``, then renamed over the record
(one a crash left behind is written over by the next)."""

_MAX_BYTES = 4 << 20
"""The most of the file read: far more than any number of volumes a config holds."""


def new_verifier(old: int = 0) -> int:
    """A random non-zero 64-bit verifier other than ``old``."""
    while True:
        value = secrets.randbits(64)
        if value and value != old:
            return value


class VerifierStore:
    """The verifiers of one server's volumes, and the file that keeps them (module docs).
    Its methods do blocking file I/O: call them off the event loop. Never raises for the
    file: a problem is logged and the verifiers are drawn anew, with nothing kept."""

    def __init__(self, path: str, names: Sequence[str]) -> None:
        self.path = path
        self._names = list(names)
        self._folder_fd: int | None = None  # data_dir, locked (None: given up)
        self._fd: int | None = None  # the record, locked (None: not there yet, or given up)
        self.usable = True
        """False once the file could not be used: nothing is kept (module docs)."""
        self.marked: set[str] = set()
        """The volumes written as not clean (:meth:`mark_unclean`): they may be served."""
        self._entries: dict[str, dict[str, object]] = {}
        self.verifiers: dict[str, int] = {}
        """Each configured volume's verifier for this run (before any change while it runs)."""
        self.files: dict[str, list[str]] = {}
        """The files each volume keeps its data in (:func:`~.kept_files.kept_files`), written
        with its entry when it is marked (:meth:`mark_unclean`) and at the stop."""
        self.stacks: dict[str, list[str]] = {}
        """Every layer file of each volume's stack in this run (read caches' too), in layer
        order, written with its entry as ``stack`` (:class:`~.kept_files.KeptFiles`)."""
        self.left: dict[str, list[str]] = {}
        """The files that left each volume's stack since they were last in it, written with
        its entry as ``left``: a later start warns of a layer back at one."""
        self.kept_writes: dict[str, bool] = {}
        """Whether each volume served in this run keeps its writes past the stop (its
        write path is not ``ram`` only), written with its entry (``kept_writes``) when it
        is marked (:meth:`mark_unclean`) and at the stop."""
        self.read_only: set[str] = set()
        """The volumes served read-only in this run: they acknowledge no write, so no end
        of the run can lose one; each is written as clean when it is marked
        (:meth:`mark_unclean`) and at the stop, so a crash of the run is no unclean stop
        (no new verifier, no warning at the next start)."""
        self.untold: set[str] = set()
        """The volumes among :attr:`unclean` whose entry is clean but says a crash before it
        was never counted by a server that went on serving (``crash_untold``: the run after
        the crash was a start refused or stopped before it served; :meth:`close`)."""
        self._untold_out: set[str] = set()  # written as crash_untold by close()
        self.loss_unknown: set[str] = set()
        """The volumes whose clean entry an older build wrote, without ``kept_writes``: the
        server gives each a new verifier if its write path is ``ram`` only now, as that
        build did."""
        self.unclean: dict[str, bool | None] = {}
        """The volumes whose last run did not stop cleanly (a crash, a kill, a final flush
        that failed): their verifiers are new ones because writes may have been lost. Not
        a volume new to the file, nor any when the file cannot be used. Each maps to
        whether that run kept its writes (``kept_writes``: a run whose write path was
        ``ram`` only lost nothing by its crash that it was to keep; ``None``: an older
        build's entry, which does not say)."""

    @classmethod
    def open(cls, data_dir: str, names: Sequence[str]) -> VerifierStore:
        """Read the file in ``data_dir`` (if there is one: nothing is written before
        :meth:`mark_unclean`) and choose each volume's verifier."""
        store = cls(os.path.join(data_dir, FILE_NAME), names)
        damaged = False
        try:
            store._folder_fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.flock(store._folder_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            try:
                store._fd = _open_record(store.path, os.O_NOFOLLOW)
            except FileNotFoundError:
                pass  # the first start here: the file is made by mark_unclean
            else:  # (an older build locks the record itself)
                fcntl.flock(store._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                store._entries, damaged = _parse(store.path, os.pread(store._fd, _MAX_BYTES, 0))
        except OSError as exc:
            store._give_up(exc)
            store._read_for_the_files()
            return store
        for name in names:
            entry = store._entries.get(name, {})
            value = entry.get("verifier")
            old = value if isinstance(value, int) and type(value) is int else 0
            if not 0 < old < 1 << 64:
                old = 0
            clean = old != 0 and entry.get("clean") is True
            said = entry.get("kept_writes")
            kept_writes = said if isinstance(said, bool) else None
            if kept_writes is None and entry.get("files") == []:
                kept_writes = False  # an older build's run served from no file: ram only
            store.verifiers[name] = old if clean and kept_writes is not False else new_verifier(old)
            if old and not clean:
                # (not the guess from no files: a remote-only stack has none and keeps its
                # writes; whether to warn of an older build's crash is judged by the stack)
                store.unclean[name] = said if isinstance(said, bool) else None
            elif clean and entry.get("crash_untold") is True:  # (its verifier is new already)
                store.unclean[name] = True
                store.untold.add(name)
            elif clean and kept_writes is None:  # an older build's entry (module docs)
                store.loss_unknown.add(name)
        if damaged:
            store._files_unknown()
        return store

    def _files_unknown(self) -> None:
        """The record cannot be read: which files each volume was served from is not
        known, so each configured volume gets an entry that says so (module docs)."""
        for name in self._names:
            self._entries[name] = {"verifier": self.verifiers[name], "clean": False}

    def _read_for_the_files(self) -> None:
        """The file cannot be used (:meth:`_give_up`), but what it records of the files
        each volume was served from still holds (another server holds it, it is a
        symlink, …): read it for that alone, as it is; one that exists and cannot be read
        counts as damaged (each file of each volume counts: :mod:`.kept_files`)."""
        try:
            fd = _open_record(self.path)
            try:
                self._entries, damaged = _parse(self.path, os.pread(fd, _MAX_BYTES, 0))
            finally:
                os.close(fd)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("%s cannot be read (%s)", self.path, exc.strerror)
            damaged = True
        if damaged:
            self._files_unknown()

    def recorded_files(self, name: str) -> tuple[str, ...] | None:
        """The files the volume ``name`` was served from in the last run that recorded any,
        in layer order (none for a volume new to the file; read also when the file cannot
        be used: :meth:`_read_for_the_files`); ``None`` when it was served, but its entry
        does not say from which files (a build of tierdisk that recorded none, a damaged
        record): which of its files it used is not known."""
        entry = self._entries.get(name, {})
        files = entry.get("files")
        if not isinstance(files, list):  # (not a list: damaged, so not known either)
            return None if entry else ()
        return tuple(path for path in files if _is_path(path))

    def recorded_paths(self, name: str, key: str) -> tuple[str, ...]:
        """The paths the entry of volume ``name`` records under ``key`` (``stack``,
        ``left``: :attr:`stacks`, :attr:`left`), in their order; none when it records none
        (a volume new to the file, an entry of an older build, a damaged one)."""
        paths = self._entries.get(name, {}).get(key)
        return tuple(path for path in paths if _is_path(path)) if isinstance(paths, list) else ()

    def served_files(self) -> dict[str, list[str]]:
        """Every file any entry records (of any volume, configured or not), mapped to the
        volumes served from it, in the file's order."""
        served: dict[str, list[str]] = {}
        for name, entry in self._entries.items():
            files = entry.get("files")
            if isinstance(files, list):
                for path in files:
                    if _is_path(path) and name not in served.get(path, ()):
                        served.setdefault(path, []).append(name)
        return served

    def mark_unclean(self, names: Iterable[str]) -> None:
        """Write the volumes ``names`` as not clean, synced, before they are served: a crash
        from then on gives them new verifiers at the next start (volumes never served keep
        their entries; a volume served read-only, :attr:`read_only`, is written clean).
        When that fails, every verifier not yet in use is drawn anew and nothing is kept
        (:attr:`usable` is False)."""
        if not self.usable:
            return
        names = [name for name in names if name not in self.marked]
        try:
            self._write({name: name in self.read_only for name in names})
        except OSError as exc:
            self._give_up(exc)
            return
        self.marked.update(names)

    def close(
        self,
        verifiers: Mapping[str, int],
        clean: Collection[str],
        untold: Collection[str] = (),
    ) -> None:
        """Keep ``verifiers`` (each served volume's at the stop, by name), the served
        volumes in ``clean`` (and those served read-only) as stopped cleanly, the others
        not; release the file. A volume marked but not served (its start was stopped) served
        nothing under its verifier: clean. Volumes never marked keep their entries. A
        failure is logged (the next start then draws new verifiers for the marked volumes:
        safe). The clean volumes in ``untold`` are written as ``crash_untold``: a crash
        before this run that no server went on serving after (this run's start was refused):
        the next start warns of it and counts it, keeping the verifier."""
        self._untold_out = set(untold)
        try:
            if self.marked and self._folder_fd is not None:
                self.verifiers.update(verifiers)
                self._write(
                    {
                        name: name in clean or name not in verifiers or name in self.read_only
                        for name in self.marked
                    }
                )
        except OSError as exc:
            log.warning("write verifiers not kept in %s at the stop: %s", self.path, exc.strerror)
        finally:
            self._release()

    def _give_up(self, exc: OSError) -> None:
        """The file cannot be used: say so, keep nothing, draw every verifier anew."""
        self._release()
        self.usable = False
        why = "another server holds it" if isinstance(exc, BlockingIOError) else exc.strerror
        if exc.filename and exc.filename not in (self.path, os.path.dirname(self.path)):
            why = f"{exc.filename}: {why}"  # (the new record written before it, say)
        log.warning(
            "write verifiers cannot be kept in %s (%s): every restart of this server counts "
            "as unclean for its clients",
            self.path,
            why,
        )
        # (a volume served already keeps the one it has: it was marked, so a crash renews it)
        self.verifiers = {name: new_verifier(self.verifiers.get(name, 0)) for name in self._names}

    def _release(self) -> None:
        for fd in (self._fd, self._folder_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._folder_fd = None

    def _write(self, clean: Mapping[str, bool]) -> None:
        """Replace the file with one of :attr:`verifiers` and ``clean`` (:meth:`_replace`)."""
        assert self._folder_fd is not None
        for name, is_clean in clean.items():
            entry: dict[str, object] = {"verifier": self.verifiers[name], "clean": is_clean}
            old = self._entries.get(name, {})
            kept_writes = self.kept_writes.get(name, old.get("kept_writes"))
            if kept_writes is not None:
                entry["kept_writes"] = kept_writes
            for key, now in (("files", self.files), ("stack", self.stacks), ("left", self.left)):
                paths = now.get(name, old.get(key))
                if paths is not None:
                    entry[key] = paths
            if is_clean and name in self._untold_out:
                entry["crash_untold"] = True
            self._entries[name] = entry
        data = (json.dumps({"format": 1, "volumes": self._entries}, indent=1) + "\n").encode()
        self._replace(data)

    def _replace(self, data: bytes) -> None:
        """Make ``data`` the file's contents, whole or not at all
        (:func:`~tierdisk.service.fileio.replace_with_new_file`, locked: the lock goes with
        it), the folder synced. A crash at any point leaves the old record or the new one."""
        fd = replace_with_new_file(self.path, self.path + NEW_SUFFIX, data, lock=True)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        fsync_folder(self.path)  # the new name reaches the disk


def _open_record(path: str, flags: int = 0) -> int:
    """The record at ``path``, open to read (never waiting, as a FIFO there would make it);
    :class:`OSError` when it is no regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | flags)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", path)
    return fd


def _parse(path: str, data: bytes) -> tuple[dict[str, dict[str, object]], bool]:
    """The entries of a file's contents, and whether they could not be read: ``({}, True)``
    (logged) when the file is empty or not this format."""
    try:
        if not data:
            raise ValueError("it is empty")
        doc = json.loads(data)
        volumes = doc["volumes"]
        if doc.get("format") != 1 or not isinstance(volumes, dict):
            raise ValueError("not format 1")
        if not all(isinstance(v, dict) for v in volumes.values()):
            raise ValueError("an entry is not a table")
        return {str(k): v for k, v in volumes.items()}, False
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        log.warning(
            "%s is not a write verifier file (%s): new verifiers for all, and which files "
            "each volume was served from is not known: a volume with a layer file missing "
            "or empty is refused until a run that serves it records its files",
            path,
            exc,
        )
        return {}, True


def _is_path(value: object) -> bool:
    """Whether a recorded file is one a path can name (a damaged or hand-edited record may
    hold anything: a NUL byte made the start a traceback)."""
    return isinstance(value, str) and "\0" not in value
