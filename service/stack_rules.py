"""The construction rules of a layer stack, and what its layers make of the volume (DESIGN.md §3).

Pure functions, no I/O and no asyncio: :func:`.stack_attach.attach_stack` (for
:meth:`tierdisk.service.volume.Volume.open`) calls the ``check_*`` functions while it attaches
a stack, and :meth:`StackProperties.of` derives the
volume's properties from the attached layers. They read only what :class:`LayerFacts` and
:class:`EntryFacts` describe (a :class:`~tierdisk.service.volume.LayerEntry` and its
:class:`~tierdisk.service.layer.Layer` have all of it), so a test may pass plain objects.

Conventions: a stack is a sequence of entries, index 0 the top; sizes are in sectors of the
stack's one sector size, sector sizes in bytes. A broken rule is a
:class:`~tierdisk.service.errors.ConfigError` naming the volume, the layer index and the rule.

The *write path* is the top and every layer below a ``write_through`` one: a write or unmap
reaches each of them, and a resize resizes them together. Layer ``i``'s *overlap* is the end
below which a read may ask it: the smallest size of layers ``0..i`` and the smallest size
any layer above ``i`` has had (:attr:`Layer.smallest_size`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .errors import ConfigError
from .layer import UnmapBehavior, sector_size_mismatch

__all__ = [
    "EntryFacts",
    "LayerFacts",
    "StackProperties",
    "check_read_cache",
    "check_same_sector_size",
    "check_write_path",
    "check_write_through",
    "merge_unmap_behavior",
    "overlaps_of",
    "smallest_of",
    "write_path_length",
]


class LayerFacts(Protocol):
    """What the rules read of a layer (every :class:`~tierdisk.service.layer.Layer` has it)."""

    @property
    def kind(self) -> str: ...
    @property
    def read_only(self) -> bool: ...
    @property
    def can_read_cache(self) -> bool: ...
    @property
    def read_cache_refusal(self) -> str: ...
    @property
    def sector_count(self) -> int: ...
    @property
    def smallest_size(self) -> int: ...
    @property
    def fua_respected(self) -> bool: ...
    @property
    def keeps_writes(self) -> bool: ...
    @property
    def lost_at_exit(self) -> bool: ...
    @property
    def unmap_behavior(self) -> UnmapBehavior: ...
    @property
    def optimal_unmap_sectors(self) -> int: ...


class EntryFacts(Protocol):
    """What the rules read of a stack entry (a :class:`~tierdisk.service.volume.LayerEntry`)."""

    @property
    def layer(self) -> LayerFacts: ...
    @property
    def read_cache(self) -> bool: ...
    @property
    def write_through(self) -> bool: ...


# -- construction rules --------------------------------------------------------------------


def check_write_through(name: str, entries: Sequence[EntryFacts]) -> None:
    """``write_through`` layers form an unbroken run from the top, and the bottom layer is
    not one (there is nothing below it). Needs no attached layer. ``entries`` is not empty."""
    on_write_path = True
    for i, entry in enumerate(entries):
        if entry.write_through and not on_write_path:
            raise ConfigError(
                "write_through layers must form an unbroken run from the top",
                volume=name,
                layer=i,
            )
        on_write_path = entry.write_through
    if entries[-1].write_through:
        raise ConfigError(
            "the bottom layer cannot be write_through: there is nothing below it",
            volume=name,
            layer=len(entries) - 1,
        )


def check_read_cache(name: str, index: int, entry: EntryFacts) -> None:
    """A ``read_cache`` layer (``entry``, at ``index``) must be able to write without
    overwriting. Checked before attach and again after (a remote may turn out read-only)."""
    if entry.read_cache and not entry.layer.can_read_cache:
        raise ConfigError(
            "read_cache needs a layer that can write without overwriting; "
            + entry.layer.read_cache_refusal,
            volume=name,
            layer=index,
        )


def check_same_sector_size(
    name: str, index: int, sector_size: int, bottom_sector_size: int
) -> None:
    """Every layer has the bottom layer's sector size (bytes). Checked for each layer as it
    is attached, bottom-up, so a stack is refused before the layers above it are attached."""
    if sector_size != bottom_sector_size:
        raise ConfigError(
            sector_size_mismatch(sector_size, bottom_sector_size),
            volume=name,
            layer=index,
        )


def check_write_path(name: str, entries: Sequence[EntryFacts], read_only: bool) -> None:
    """No layer on the write path of a writable volume is read-only (the topmost one that
    is is named). Checked once every layer is attached (a remote's is known only then)."""
    for i, entry in enumerate(entries):
        if entry.layer.read_only and not read_only:
            raise ConfigError(
                f"the {entry.layer.kind} layer is read-only but on the write path "
                "of a writable volume (set the volume read_only, or put a "
                "writable layer above it)",
                volume=name,
                layer=i,
            )
        if not entry.write_through:
            break  # the write path ends here


# -- derived properties --------------------------------------------------------------------


def write_path_length(entries: Sequence[EntryFacts]) -> int:
    """How many layers, from the top, form the write path: the top and every layer below a
    ``write_through`` one (at least 1, at most ``len(entries)``)."""
    path = 1
    while path < len(entries) and entries[path - 1].write_through:
        path += 1
    return path


def merge_unmap_behavior(behaviors: Sequence[UnmapBehavior]) -> UnmapBehavior:
    """What reads of the volume see after an unmap, given its write-path layers' behaviours
    (top first, not empty): without write-through the top's; over several layers
    ``ZEROES`` when every one zeroes, else ``IGNORED`` (the layers must not disagree)."""
    if len(behaviors) == 1:
        return behaviors[0]
    if all(b == UnmapBehavior.ZEROES for b in behaviors):
        return UnmapBehavior.ZEROES
    return UnmapBehavior.IGNORED


def overlaps_of(layers: Sequence[LayerFacts]) -> tuple[int, ...]:
    """Each layer's overlap (top first, not empty): index 0 is the top's size; layer ``i >=
    1`` shows only below the smallest size of layers ``0..i`` and the smallest size any
    layer above it has had (:attr:`Layer.smallest_size`), so a shrink before a restart keeps
    hiding lower data past it. Never larger than the one above."""
    top = layers[0]
    overlaps = [top.sector_count]
    bound = min(top.sector_count, top.smallest_size)
    for layer in layers[1:]:
        overlaps.append(min(bound, layer.sector_count))
        bound = min(bound, layer.sector_count, layer.smallest_size)
    return tuple(overlaps)


def smallest_of(layers: Sequence[LayerFacts], write_path: int) -> int:
    """The smallest size the volume has been shrunk to, as its write-path layers (the first
    ``write_path`` of ``layers``) record it: the top's size and smallest size, and the
    smallest size of each lower write-path layer that records one below its own size
    (write-path layers are resized together, so any of them may have recorded a shrink; a
    smaller size it was merely created with is no shrink of the volume)."""
    top = layers[0]
    return min(
        [top.sector_count, top.smallest_size]
        + [
            layer.smallest_size
            for layer in layers[1:write_path]
            if layer.smallest_size < layer.sector_count
        ]
    )


@dataclass(frozen=True)
class StackProperties:
    """What an attached stack's layers make of the volume, derived once at open."""

    write_path: int
    """Layers on the write path, from the top (:func:`write_path_length`)."""
    fua_respected: bool
    """A ``fua`` write is durable on return: every write-path layer respects it."""
    keeps_writes: bool
    """Writes outlive every server: some write-path layer keeps them (else the volume is
    volatile: only ``ram``, or a remote tier over a volatile origin)."""
    lost_at_exit: bool
    """This server's exit loses the writes: every write-path layer is ``ram``."""
    unmap_behavior: UnmapBehavior
    """What reads see after an unmap (:func:`merge_unmap_behavior` of the write path)."""
    optimal_unmap_sectors: int
    """Preferred unmap granularity in sectors: the largest of the write path's."""
    overlaps: tuple[int, ...]
    """Each layer's overlap in sectors, top first (:func:`overlaps_of`)."""
    smallest: int
    """The smallest size in sectors the volume has been shrunk to (:func:`smallest_of`)."""

    @classmethod
    def of(cls, entries: Sequence[EntryFacts]) -> StackProperties:
        """The properties of ``entries`` (top first, not empty, attached: sizes are read)."""
        layers = [entry.layer for entry in entries]
        path = write_path_length(entries)
        on_path = layers[:path]
        return cls(
            write_path=path,
            fua_respected=all(layer.fua_respected for layer in on_path),
            keeps_writes=any(layer.keeps_writes for layer in on_path),
            lost_at_exit=all(layer.lost_at_exit for layer in on_path),
            unmap_behavior=merge_unmap_behavior([layer.unmap_behavior for layer in on_path]),
            optimal_unmap_sectors=max(layer.optimal_unmap_sectors for layer in on_path),
            overlaps=overlaps_of(layers),
            smallest=smallest_of(layers, path),
        )
