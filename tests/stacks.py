"""Stacks the engine tests run against, and the shared test doubles.

The conformance suite (tests/test_conformance.py) runs every test against every entry of
:data:`STACKS`. An entry is a name and an async factory ``Callable[[Path], Awaitable[Volume]]``
that builds a fresh, writable, all-zero volume of :data:`VOLUME_BYTES` inside the given
folder. Stacks are described by a spec string, top first, layers separated by ``/``; each
layer is a kind from :data:`LAYER_KINDS` with optional flags: ``-rc`` (read_cache), ``-wt``
(write_through). For example ``"ram/ram-rc/raw"`` is a RAM top over a RAM read cache over a
raw image.

To run the whole conformance suite over a new layer kind, add a builder to
:data:`LAYER_KINDS` and register stacks using it::

    LAYER_KINDS["sparse"] = lambda folder, index, sector_size, size: SparseLayer(
        str(folder / f"layer{index}.sparse"), size=size, sector_size=sector_size)
    register_spec("sparse")
    register_spec("ram-rc/sparse")

(or append any ``NamedStack(name, factory)`` to :data:`STACKS`).
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierdisk.service.errors import StorageError
from tierdisk.service.layer import Layer, LayerMetadata, UnmapBehavior
from tierdisk.service.layers.ram import RamLayer
from tierdisk.service.layers.raw import RawLayer
from tierdisk.service.runs import Run
from tierdisk.service.volume import LayerEntry, Volume

__all__ = [
    "LAYER_KINDS",
    "STACKS",
    "VOLUME_BYTES",
    "MapLayer",
    "NamedStack",
    "StackFactory",
    "build_stack",
    "entry",
    "pattern",
    "register_spec",
    "sector_pattern",
]

StackFactory = Callable[[Path], Awaitable[Volume]]
"""Builds a fresh writable volume (all zeros, :data:`VOLUME_BYTES`) in the given folder."""

LayerBuilder = Callable[[Path, int, int, int | None], Layer]
"""``(folder, index, sector_size, size_bytes or None) -> Layer`` (not attached yet)."""

VOLUME_BYTES = 32 << 20
"""Size of every conformance volume: room for one 16 MiB I/O and more."""


# -- data patterns -----------------------------------------------------------------------


def sector_pattern(tag: int, sector: int, sector_size: int) -> bytes:
    """One sector's worth of bytes that names ``tag`` and ``sector`` (never all zeros)."""
    return struct.pack("<QQ", tag | 1 << 63, sector) * (sector_size // 16)


def pattern(tag: int, sector: int, count: int, sector_size: int) -> bytes:
    """``count`` sectors from ``sector``, each :func:`sector_pattern` of its own number, so a
    sector that lands in the wrong place or is torn is caught."""
    return b"".join(sector_pattern(tag, s, sector_size) for s in range(sector, sector + count))


# -- stack registry --------------------------------------------------------------------------


def _ram(folder: Path, index: int, sector_size: int, size: int | None) -> Layer:
    return RamLayer(size=size, sector_size=sector_size)


def _raw(folder: Path, index: int, sector_size: int, size: int | None) -> Layer:
    return RawLayer(str(folder / f"layer{index}.raw"), size=size, sector_size=sector_size)


LAYER_KINDS: dict[str, LayerBuilder] = {"ram": _ram, "raw": _raw}
"""Layer kinds usable in stack specs. Append new kinds here."""


async def build_stack(
    spec: str,
    folder: Path,
    *,
    sector_size: int = 512,
    size_bytes: int = VOLUME_BYTES,
    name: str = "vol",
    read_only: bool = False,
) -> Volume:
    """Open the stack ``spec`` (e.g. ``"ram-wt/raw"``) with files inside ``folder``.

    The bottom layer gets ``size_bytes``; the layers above inherit it, except persistent
    ones, which are given the size explicitly too.
    """
    entries: list[LayerEntry] = []
    tokens = spec.split("/")
    for index, token in enumerate(tokens):
        kind, *flags = token.split("-")
        unknown = set(flags) - {"rc", "wt"}
        if unknown or kind not in LAYER_KINDS:
            raise ValueError(f"bad stack spec {spec!r} at {token!r}")
        size = None if kind == "ram" and index < len(tokens) - 1 else size_bytes
        layer = LAYER_KINDS[kind](folder, index, sector_size, size)
        entries.append(LayerEntry(layer, read_cache="rc" in flags, write_through="wt" in flags))
    return await Volume.open(name, entries, read_only=read_only)


@dataclass(frozen=True)
class NamedStack:
    """An entry of the registry: ``name`` (the pytest id) and its factory."""

    name: str
    factory: StackFactory
    tags: frozenset[str] = field(default_factory=frozenset)


STACKS: list[NamedStack] = []
"""Every stack the conformance suite runs against."""


def register_spec(spec: str, sector_sizes: tuple[int, ...] = (512, 4096)) -> None:
    """Register ``spec`` once per sector size, named ``"<spec>@<sector size>"``."""
    for ss in sector_sizes:

        async def factory(folder: Path, spec: str = spec, ss: int = ss) -> Volume:
            return await build_stack(spec, folder, sector_size=ss)

        STACKS.append(NamedStack(f"{spec}@{ss}", factory, frozenset(spec.split("/"))))


for _spec in ("ram", "raw", "ram/raw", "ram-rc/raw", "ram/ram-rc/raw", "ram-wt/raw"):
    register_spec(_spec)


def entry(layer: Layer, *, rc: bool = False, wt: bool = False) -> LayerEntry:
    """A layer entry with flags, for readable stack literals in tests."""
    return LayerEntry(layer, read_cache=rc, write_through=wt)


# -- a map layer test double ------------------------------------------------------------------


class MapLayer(Layer):
    """A layer double: a dict of present sectors, like the layer in upstream's tests.

    ``full`` makes every sector present (like a disk): sectors not written read as
    ``full(sector)``. Each call is recorded in :attr:`calls` as ``(op, sector, count)`` (and
    ``fua`` for writes), so tests can see exactly what the engine asked. Set
    :attr:`fail_reads` / :attr:`fail_fills` to make reads / no-overwrite writes fail.
    A per-sector dict is fine in a double; the engine under test never loops per sector.
    """

    kind = "map"

    def __init__(
        self,
        sectors: int,
        *,
        sector_size: int = 512,
        data: dict[int, bytes] | None = None,
        full: Callable[[int], bytes] | None = None,
        read_only: bool = False,
        can_read_cache: bool = True,
        fua_respected: bool = True,
        unmap_behavior: UnmapBehavior = UnmapBehavior.ZEROES,
        disk_id: bytes | None = None,
        physical_sector_size: int | None = None,
        optimal_unmap_sectors: int = 1,
        resizable: bool = True,
    ) -> None:
        super().__init__()
        self._sectors = sectors
        self._ss = sector_size
        self.data: dict[int, bytes] = dict(data or {})
        self.full = full
        self._ro = read_only
        self._rc = can_read_cache
        self._fua = fua_respected
        self._unmap = unmap_behavior
        self._id = disk_id
        self._phys = physical_sector_size
        self._opt = optimal_unmap_sectors
        self._resizable = resizable
        self.calls: list[tuple[Any, ...]] = []
        self.fail_reads = False
        self.fail_fills = False
        self.closed = False

    async def attach(self, lower: LayerMetadata | None) -> None:
        # Bypass check_sector_size on purpose: the engine's own checks are under test.
        self._sector_size = self._ss
        self._sector_count = self._sectors
        self._physical_sector_size = self._phys or self._ss
        if self._ss < 512 or self._ss & (self._ss - 1):
            raise ValueError(f"sector_size {self._ss} is not a power of two >= 512")

    async def close(self) -> None:
        self.closed = True

    @property
    def disk_id(self) -> bytes | None:
        return self._id

    @property
    def fua_respected(self) -> bool:
        return self._fua

    @property
    def read_only(self) -> bool:
        return self._ro

    @property
    def unmap_behavior(self) -> UnmapBehavior:
        return self._unmap

    @property
    def optimal_unmap_sectors(self) -> int:
        return self._opt

    @property
    def can_read_cache(self) -> bool:
        return self._rc

    @property
    def can_resize(self) -> bool:
        return self._resizable

    @property
    def present_sectors(self) -> int:
        return self._sector_count if self.full else len(self.data)

    def holds(self, sector: int) -> bool:
        return self.full is not None or sector in self.data

    def get(self, sector: int) -> bytes:
        if sector in self.data:
            return self.data[sector]
        assert self.full is not None
        return self.full(sector)

    def _runs(self, sector: int, count: int) -> list[Run]:
        runs: list[Run] = []
        for s in range(sector, sector + count):
            if self.holds(s):
                if runs and runs[-1][1] == s:
                    runs[-1] = (runs[-1][0], s + 1)
                else:
                    runs.append((s, s + 1))
        return runs

    def ops(self, op: str) -> list[tuple[Any, ...]]:
        """The recorded calls of one kind."""
        return [c for c in self.calls if c[0] == op]

    async def read(self, buf: memoryview, sector: int) -> list[Run]:
        ss = self._sector_size
        count = len(buf) // ss
        self.calls.append(("read", sector, count))
        self._check_range(sector, count)
        if self.fail_reads:
            raise StorageError("map layer: injected read failure")
        runs = self._runs(sector, count)
        for a, b in runs:
            for s in range(a, b):
                buf[(s - sector) * ss : (s - sector + 1) * ss] = self.get(s)
        return runs

    async def presence(self, sector: int, count: int) -> list[Run]:
        return self._runs(sector, count)

    def _store(self, data: memoryview, sector: int, overwrite: bool) -> int:
        """Store the sectors (only those absent unless ``overwrite``); how many stored."""
        ss = self._sector_size
        count = len(data) // ss
        self._check_range(sector, count)
        stored = 0
        for i in range(count):
            if overwrite or not self.holds(sector + i):
                self.data[sector + i] = bytes(data[i * ss : (i + 1) * ss])
                stored += 1
        return stored

    async def write(self, data: memoryview, sector: int, fua: bool) -> None:
        self.calls.append(("write", sector, len(data) // self._sector_size, fua))
        self._store(data, sector, True)

    async def write_no_overwrite(self, data: memoryview, sector: int) -> int:
        self.calls.append(("fill", sector, len(data) // self._sector_size))
        if not self._rc:
            return await super().write_no_overwrite(data, sector)
        if self.fail_fills:
            raise StorageError("map layer: injected fill failure")
        return self._store(data, sector, False)

    async def unmap(
        self, sector: int, count: int, block_level_only: bool, next_is_zero: bool
    ) -> None:
        self.calls.append(("unmap", sector, count, next_is_zero))
        self._check_range(sector, count)
        for s in range(sector, sector + count):
            if next_is_zero and self.full is None:
                self.data.pop(s, None)
            else:
                self.data[s] = bytes(self._sector_size)

    async def flush(self) -> None:
        self.calls.append(("flush",))

    async def resize(self, sector_count: int) -> None:
        self.calls.append(("resize", sector_count))
        for s in [s for s in self.data if s >= sector_count]:
            del self.data[s]
        old, self._sector_count = self._sector_count, sector_count
        if self.full is not None and sector_count > old:
            # growing exposes zeros, not whatever `full` would say
            for s in range(old, sector_count):
                self.data[s] = bytes(self._sector_size)
        self._notify_resized()


# -- remote stacks: each remote layer starts its own in-process origin and stops it at close --

from remote_origin import ServedRemoteLayer  # noqa: E402  (tests/remote_origin.py)

LAYER_KINDS["remote"] = ServedRemoteLayer.builder  # layer mode over an origin ram volume
register_spec("remote")
for _spec in ("ram/remote", "remote-rc/raw", "ram-wt/remote"):
    register_spec(_spec, (512,))
LAYER_KINDS["nbdremote"] = ServedRemoteLayer.nbd_builder  # disk mode, reads over NBD
for _spec in ("ram/nbdremote", "ram-rc/nbdremote", "ram-wt/nbdremote"):
    register_spec(_spec, (512,))


# -- persistent stacks: sparse and sqlite layers on files in the test's folder ---------------

from tierdisk.service.layers.sparse import SparseLayer  # noqa: E402
from tierdisk.service.layers.sqlite import SqliteLayer  # noqa: E402


def _sparse(folder: Path, index: int, sector_size: int, size: int | None) -> Layer:
    return SparseLayer(str(folder / f"layer{index}.sparse"), size=size, sector_size=sector_size)


def _sqlite(folder: Path, index: int, sector_size: int, size: int | None) -> Layer:
    return SqliteLayer(str(folder / f"layer{index}.db"), size=size, sector_size=sector_size)


LAYER_KINDS["sparse"] = _sparse
LAYER_KINDS["sqlite"] = _sqlite
register_spec("sparse")
register_spec("sqlite")
for _spec in ("ram/sparse-rc/raw", "sparse-rc/raw", "sqlite-wt/raw", "ram/sqlite-rc/sparse"):
    register_spec(_spec, (512,))
