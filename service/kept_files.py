"""The layer files a volume keeps its data in, and the refusal to start it without them.

A layer kind with a ``path`` (``raw``, ``sparse``, ``sqlite``) creates its file when it is
missing: that is how a new layer is made. Once a volume has been served from a file,
though, a missing file is no new layer but a lost one (the disk that holds it was not
mounted, a clean-up took the wrong folder), and creating it afresh would serve an empty
volume where clients expect their data, silently. So the server records, per volume, the
files it was served from (in ``DATA_DIR/write-verifiers.json``, with the volume's write
verifier: :mod:`.verifier_store`), and before it opens a volume it refuses one with a layer
file that any volume was served from and that is gone (:func:`check_kept_files`): one line
naming the volume, the layer and the path. That holds whatever the layer's role in the
config now (a layer that took writes, made a read cache or put in a read-only volume,
holds them still) and whatever the volume is called (renamed, it keeps its files). To
start such a layer empty on purpose, give it another path, or delete the entry that
records it from the file (the built-in ``default`` volume has no path to change).

Not recorded, so created as before: a ``read_cache`` layer that never took writes of its
own (below the write path, in a ``read_only`` volume, or ``write_through``: it holds only
copies of what lies below it, so losing it loses nothing), and any file of a volume never
served from this ``data_dir``. A ``read_only`` raw image is not recorded either: its layer
never creates one. A recorded file keeps its place in the record while it stays in its
volume's stack (:class:`KeptFiles`). Paths are compared as written (absolute) and with
their symlinks resolved.

An entry written by a tierdisk from before the record (a verifier and no ``files``) says
the volume was served, not from which files: every file of the volume then counts as
served from, until this start records them (a new layer added in the same restart as the
upgrade is refused too: delete the entry, or add it in a later restart). A start that finds
the record damaged (empty, torn, not its format) writes such an entry for every volume it
is configured with (:mod:`.verifier_store`).

``data_dir`` itself, with the record, may be on the disk that is missing: then nothing
tells a lost volume from a new one. Keep ``data_dir`` on a disk the server cannot start
without, or make the mount point one the server cannot write into (README).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

from .config import VolumeConfig
from .errors import ConfigError, StorageError

__all__ = ["KeptFiles", "check_kept_files", "kept_files", "served_by"]


def _kept(config: VolumeConfig) -> list[tuple[int, str]]:
    """``(layer index, absolute path)`` of each file of ``config`` that holds data of its
    own: every layer with a ``path`` but a ``read_cache`` one that takes no writes of its
    own (below the write path, or in a ``read_only`` volume, or ``write_through``: what it
    takes goes on below it) and a ``read_only`` raw image (never created: its layer
    refuses a missing one itself)."""
    kept = []
    on_write_path = not config.read_only  # the top, and every layer below a write_through one
    for index, layer in enumerate(config.layers):
        path = layer.options.get("path")
        copies_only = layer.read_cache and (layer.write_through or not on_write_path)
        if isinstance(path, str) and not copies_only and not layer.options.get("read_only"):
            kept.append((index, os.path.abspath(path)))
        on_write_path = on_write_path and layer.write_through
    return kept


def kept_files(config: VolumeConfig) -> list[str]:
    """The absolute paths of the files ``config`` keeps its data in (module docs)."""
    return [path for _, path in _kept(config)]


def _spellings(path: str) -> set[str]:
    """``path`` as written (absolute) and with its symlinks resolved: a file recorded under
    one is found under the other. Blocks (``realpath``)."""
    return {os.path.abspath(path), os.path.realpath(path)}


def _layer_paths(config: VolumeConfig) -> list[tuple[int, str]]:
    """``(layer index, absolute path)`` of every layer of ``config`` with a ``path``."""
    paths = ((index, layer.options.get("path")) for index, layer in enumerate(config.layers))
    return [(index, os.path.abspath(path)) for index, path in paths if isinstance(path, str)]


@dataclass(frozen=True)
class KeptFiles:
    """What :func:`check_kept_files` found for a volume that may start: the files to record
    for it (those it keeps its data in, and those of its layer files recorded for it before,
    whatever their role now: a layer that took writes holds them still, as a read cache or
    in a read-only volume), in layer order; the files recorded for it before that no
    layer of its stack is at now (``dropped``: the start warns of them); every layer file
    of its stack now, in layer order (``stack``, recorded too); the files that have left
    its stack since they were last in it, read caches' too (``left``, recorded); and the
    layers now at such a file that holds something (``returned``, ``(layer index, path)``:
    the start warns of them, as their data or copies may be older than what the layers
    below took meanwhile; one deleted to start it afresh is not)."""

    to_record: list[str]
    dropped: list[str]
    stack: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    returned: list[tuple[int, str]] = field(default_factory=list)


def served_by(served: Mapping[str, Sequence[str]]) -> dict[str, set[str]]:
    """``served`` (every recorded file, mapped to the volumes served from it) with each file
    also under its resolved path: what :func:`check_kept_files` looks layer paths up in.
    Blocks (``realpath``): made once per start, off the event loop."""
    owners: dict[str, set[str]] = {}
    for path, volumes in served.items():
        for spelling in _spellings(path):
            owners.setdefault(spelling, set()).update(volumes)
    return owners


def check_kept_files(
    config: VolumeConfig,
    owners: Mapping[str, Collection[str]],
    recorded: Sequence[str] | None,
    record: str,
    stack_before: Sequence[str] = (),
    left_before: Sequence[str] = (),
) -> KeptFiles:
    """Raise a :class:`ConfigError` for the first layer file of ``config`` that a volume was
    served from before and is not there now, or is empty (which its layer would take for a
    creation cut short, and make anew); caused by a :class:`StorageError`: the operator
    looks at the disks. Else what to record, and what was dropped (:class:`KeptFiles`).
    Blocks (``stat``, ``realpath``): call it off the event loop.

    ``owners`` maps every file recorded in the file ``record`` to the volumes served from it
    (any volume: one renamed keeps its files; :func:`served_by`), and every layer with a
    path is looked up, under its path and its resolved path, whatever its role now.
    ``recorded``: the files recorded for this volume, in layer order; ``None`` when its
    entry was written by an older tierdisk that recorded no files, so each file ``config``
    keeps counts as served from by it (the first start after an upgrade must not serve a
    lost volume empty either). Two of them in the other order now are refused too
    (:func:`_refuse_if_reordered`). ``stack_before`` and ``left_before``: the volume's
    ``stack`` and ``left`` as recorded (:class:`KeptFiles`)."""
    kept = set(kept_files(config))
    ours = {spelling for path in recorded or () for spelling in _spellings(path)}
    layers = _layer_paths(config)
    for index, path in layers:
        names = {n for spelling in _spellings(path) for n in owners.get(spelling, ())}
        if not names and recorded is None and path in kept:
            names = {config.name}  # an older build's entry: its files are not known
        if names:
            _refuse_if_lost(config, index, path, sorted(names), recorded is None, record)
    if recorded:
        _refuse_if_reordered(config, layers, recorded, record)
    to_record = [path for _, path in layers if path in kept or _spellings(path) & ours]
    now = {spelling for path in to_record for spelling in _spellings(path)}
    dropped = sorted(path for path in recorded or () if not _spellings(path) & now)
    in_stack = {spelling for _, path in layers for spelling in _spellings(path)}
    gone = [*left_before, *stack_before, *dropped]  # (an older record has no stack)
    left = list(dict.fromkeys(path for path in gone if not _spellings(path) & in_stack))
    was_left = {spelling for path in left_before for spelling in _spellings(path)}
    returned = [
        (index, path)
        for index, path in layers
        if _spellings(path) & was_left and _holds_bytes(path)  # (deleted: made afresh)
    ]
    return KeptFiles(to_record, dropped, [path for _, path in layers], left, returned)


def _holds_bytes(path: str) -> bool:
    """Whether ``path`` is a file with something in it (a layer file deleted, or left
    empty, is made afresh: it holds nothing older than the layers below). Blocks."""
    try:
        return os.stat(path).st_size > 0
    except OSError:
        return False


def _refuse_if_reordered(
    config: VolumeConfig, layers: Sequence[tuple[int, str]], recorded: Sequence[str], record: str
) -> None:
    """A :class:`ConfigError` when two of the files ``recorded`` for the volume (in layer
    order) are layers of ``config`` in the other order: reads would take the lower one's
    sectors over what was written above it since (an edit that swapped two layers)."""
    rank: dict[str, int] = {}
    for place, path in enumerate(recorded):
        for spelling in _spellings(path):
            rank.setdefault(spelling, place)
    seen = []  # (place in the record, layer index, path), in layer order
    for index, path in layers:
        places = [rank[spelling] for spelling in _spellings(path) if spelling in rank]
        if places:
            seen.append((min(places), index, path))
    for (above, upper, upper_path), (below, lower, lower_path) in pairwise(seen):
        if below < above:
            entry = os.path.basename(record)
            raise ConfigError(
                f"{lower_path} is below layer {upper} ({upper_path}) now, but the volume "
                f"was served with it above that layer (as {record} records): reads would "
                f"take {upper_path}'s sectors over what was written to it since. Put the "
                "layers back in that order; to serve them in this order on purpose, delete "
                f"the volume's entry from {entry}",
                volume=config.name,
                layer=lower,
            )


def _refuse_if_lost(
    config: VolumeConfig, index: int, path: str, names: list[str], unlisted: bool, record: str
) -> None:
    """The refusal of :func:`check_kept_files` for layer ``index`` at ``path``, which the
    volumes ``names`` were served from, if it is missing or empty."""
    try:
        found = os.stat(path)
        if found.st_size or not stat.S_ISREG(found.st_mode):  # (a FIFO, a device: its layer
            return  # refuses what is not a regular file, in those words)
        state = "is empty"  # its layer would take it for a creation cut short
    except FileNotFoundError:
        state = "is missing"
    except OSError:
        return  # cannot be looked at (a folder not ours to enter): its layer says so
    entry = os.path.basename(record)
    if unlisted and names == [config.name]:  # an entry without files: only it is a way out
        lost = StorageError(
            f"{path} {state}, but this volume may have been served from it before (its "
            f"entry in {record} does not say which files it was served from: an older "
            "tierdisk wrote it, or a start that found the record damaged, so each file of "
            "the volume counts): is the disk that holds it mounted? Restore the file; if it "
            f"is new, or to start this layer empty, delete the volume's entry from {entry}"
        )
    else:
        if names == [config.name]:
            who, whose = "this volume was", "the volume's entry"
        else:
            listed = ", ".join(repr(name) for name in names)
            who = f"volume {listed} was" if len(names) == 1 else f"volumes {listed} were"
            whose = f"the entry of {listed}" if len(names) == 1 else f"the entries of {listed}"
        lost = StorageError(
            f"{path} {state}, but {who} served from it before (as {record} records): is "
            "the disk that holds it mounted? Restore the file; to start this layer empty "
            f"instead, give it another path (or delete {whose} from {entry})"
        )
    # a ConfigError to locate it, caused by a StorageError: "cannot start", not a
    # config mistake (main._start_failure)
    raise ConfigError(str(lost), volume=config.name, layer=index) from lost
