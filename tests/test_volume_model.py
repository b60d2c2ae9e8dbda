"""The engine against a reference model (the main oracle for DESIGN.md §3).

Hypothesis builds random valid stacks (1 to 4 layers of random small sizes and flags: RAM layers
with each unmap behaviour, writable and read-only raw images, read caches, write-through
runs, read-only volumes), seeds the layers with data, and runs a random sequence of reads,
writes, no-overwrite writes, unmaps, resizes, flushes and allocation queries against both
the engine and :class:`Model`: a deliberately simple dict of sectors per layer that follows
§3 sector by sector. Every result, every error, every allocation map, every layer's present
count and visible size and every per-layer counter must agree.
"""

from __future__ import annotations

import asyncio
import os
import struct
import tempfile
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runs_model import runs_of

from tierdisk.service.errors import (
    InvalidArgument,
    NotSupported,
    OutOfRange,
    ReadOnlyError,
    StorageError,
    TierdiskError,
)
from tierdisk.service.layer import Layer, UnmapBehavior
from tierdisk.service.layers.ram import RamLayer
from tierdisk.service.layers.raw import RawLayer
from tierdisk.service.volume import AllocationRun, LayerEntry, Volume

T = TypeVar("T")
U = TypeVar("U")


class Draw(Protocol):
    """What draws values: ``st.DrawFn`` inside ``@st.composite``, or ``DataObject.draw``
    (a bound method, which ``st.DrawFn`` itself does not accept)."""

    def __call__(self, strategy: st.SearchStrategy[T], label: object = None) -> T: ...


# -- layer kinds under test ----------------------------------------------------------------


class AnyRamLayer(RamLayer):
    """A RAM layer reporting ``UNMAP_BEHAVIOR_ANY``."""

    @property
    def unmap_behavior(self) -> UnmapBehavior:
        return UnmapBehavior.ANY


class IgnoringRamLayer(RamLayer):
    """A RAM layer reporting ``UNMAP_BEHAVIOR_IGNORED``."""

    @property
    def unmap_behavior(self) -> UnmapBehavior:
        return UnmapBehavior.IGNORED


RAM_KINDS = {
    "ram": (RamLayer, UnmapBehavior.ZEROES),
    "ram-any": (AnyRamLayer, UnmapBehavior.ANY),
    "ram-ignored": (IgnoringRamLayer, UnmapBehavior.IGNORED),
}
RAW_KINDS = ("raw", "raw-ro")


def sector_data(tag: int, sector: int, ss: int) -> bytes:
    return struct.pack("<II", tag, sector) * (ss // 8)


# -- the model -----------------------------------------------------------------------------


@dataclass
class MLayer:
    """One layer of the model: a size and a dict of the sectors it holds."""

    kind: str
    size: int
    rc: bool
    wt: bool
    data: dict[int, bytes] = field(default_factory=dict)

    @property
    def full(self) -> bool:
        return self.kind.startswith("raw")

    @property
    def behavior(self) -> UnmapBehavior:
        return RAM_KINDS[self.kind][1] if self.kind in RAM_KINDS else UnmapBehavior.ZEROES

    def holds(self, s: int) -> bool:
        return self.full or s in self.data

    def get(self, s: int, ss: int) -> bytes:
        return self.data.get(s, bytes(ss))


@dataclass
class MStats:
    reads: int = 0
    read_sectors: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_fills: int = 0
    cache_fill_errors: int = 0


class Model:
    """DESIGN.md §3, one sector at a time."""

    def __init__(self, layers: list[MLayer], ss: int, read_only: bool) -> None:
        self.layers = layers
        self.ss = ss
        self.read_only = read_only
        self.overlap: list[int] = []
        smallest = layers[0].size
        for ly in layers:
            smallest = min(smallest, ly.size)
            self.overlap.append(smallest)
        self.path = 1
        while layers[self.path - 1].wt:
            self.path += 1
        behaviors = [ly.behavior for ly in layers[: self.path]]
        if self.path == 1:
            self.behavior = behaviors[0]
        elif all(b == UnmapBehavior.ZEROES for b in behaviors):
            self.behavior = UnmapBehavior.ZEROES
        else:
            self.behavior = UnmapBehavior.IGNORED
        self.stats = [MStats() for _ in layers]

    @property
    def size(self) -> int:
        return self.layers[0].size

    def visible(self, i: int, s: int) -> bool:
        return i == 0 or s < self.overlap[i]

    def takes_writes(self, i: int, s: int) -> bool:
        """A write-path layer takes every write within its own size (past its overlap too)."""
        return s < self.layers[i].size

    def check(self, s: int, n: int) -> None:
        if s + n > self.size:
            raise OutOfRange()

    def writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError()

    def depth(self, s: int) -> int:
        for i, ly in enumerate(self.layers):
            if not self.visible(i, s):
                break
            if ly.holds(s):
                return i
        return -1

    def read(self, s: int, n: int) -> tuple[bytes, list[tuple[int, int]]]:
        self.check(s, n)
        values: list[bytes] = []
        present: list[int] = []
        asked: list[list[int]] = [[] for _ in self.layers]
        fills: list[list[int]] = [[] for _ in self.layers]
        for x in range(s, s + n):
            value = bytes(self.ss)
            for i, ly in enumerate(self.layers):
                if not self.visible(i, x):
                    break
                asked[i].append(x)
                if ly.holds(x):
                    value = ly.get(x, self.ss)
                    present.append(x)
                    self.stats[i].read_sectors += 1
                    if ly.rc:
                        self.stats[i].cache_hits += 1
                    break
                if ly.rc:
                    self.stats[i].cache_misses += 1
                    fills[i].append(x)
            values.append(value)
        for i, ly in enumerate(self.layers):
            self.stats[i].reads += len(runs_of(asked[i]))
            for x in fills[i]:
                assert x not in ly.data
                ly.data[x] = values[x - s]
                self.stats[i].cache_fills += 1
        return b"".join(values), runs_of(present)

    def write(self, s: int, data: bytes, no_overwrite: bool = False) -> None:
        self.writable()
        n = len(data) // self.ss
        self.check(s, n)
        holes = {x for x in range(s, s + n) if self.depth(x) < 0} if no_overwrite else None
        short = False  # a write-path layer smaller than the top missed some of it
        for i in range(self.path):
            ly = self.layers[i]
            for x in range(s, s + n):
                if holes is not None and x not in holes:
                    continue
                if not self.takes_writes(i, x):
                    short = True
                    continue
                if no_overwrite and not ly.full and x in ly.data:
                    continue
                ly.data[x] = data[(x - s) * self.ss : (x - s + 1) * self.ss]
        if short:
            raise StorageError()  # written where it fits, not durable past that layer

    def unmap(self, s: int, n: int) -> None:
        self.writable()
        self.check(s, n)
        if self.behavior == UnmapBehavior.IGNORED:
            return
        bottom = len(self.layers) - 1
        for i in range(self.path):
            ly = self.layers[i]
            for x in range(s, s + n):
                if not self.takes_writes(i, x):
                    continue
                next_is_zero = i == bottom or x >= self.overlap[i + 1]
                if next_is_zero and not ly.full:
                    ly.data.pop(x, None)
                else:
                    ly.data[x] = bytes(self.ss)

    def resize(self, size: int) -> None:
        self.writable()
        if size <= 0:
            raise InvalidArgument()
        path = self.layers[: self.path]  # the write path is resized with the top
        if any(ly.kind == "raw-ro" for ly in path):
            raise NotSupported()
        for ly in path:
            for x in [x for x in ly.data if x >= size]:
                del ly.data[x]
            ly.size = size
        self.overlap[0] = size
        for i in range(1, len(self.overlap)):
            self.overlap[i] = min(self.overlap[i], size)

    def allocation(self, s: int, n: int) -> list[AllocationRun]:
        self.check(s, n)
        out: list[AllocationRun] = []
        for x in range(s, s + n):
            d = self.depth(x)
            if out and out[-1][1] == x and out[-1][2] == d:
                out[-1] = (out[-1][0], x + 1, d)
            else:
                out.append((x, x + 1, d))
        return out


# -- strategies ----------------------------------------------------------------------------


@st.composite
def stacks(draw: st.DrawFn) -> tuple[list[MLayer], list[int | None], int, bool]:
    """Random valid stacks: the model layers, the configured sizes (None: inherit), the
    sector size and whether the volume is read-only."""
    n = draw(st.integers(1, 4))
    read_only = draw(st.integers(0, 3)) == 0
    wt_run = draw(st.integers(0, n - 1))  # layers 0..wt_run-1 are write-through
    layers: list[MLayer] = []
    for i in range(n):
        on_path = i <= wt_run
        kinds = [*RAM_KINDS, "raw"]
        if read_only or not on_path:
            kinds.append("raw-ro")
        kind = draw(st.sampled_from(kinds))
        rc = kind in RAM_KINDS and draw(st.booleans())
        size = draw(st.integers(1, 20))
        layers.append(MLayer(kind, size, rc, wt=i < wt_run))
    configured: list[int | None] = []
    for i, ly in enumerate(layers):
        inherit = ly.kind in RAM_KINDS and i < n - 1 and draw(st.booleans())
        configured.append(None if inherit else ly.size)
    # inherited sizes come from the layer below
    for i in reversed(range(n)):
        if configured[i] is None:
            layers[i].size = layers[i + 1].size
    ss = draw(st.sampled_from([512, 512, 4096]))
    return layers, configured, ss, read_only


def _range(draw: Draw, size: int) -> tuple[int, int]:
    """A sector range, mostly inside the volume, sometimes reaching past its end."""
    if draw(st.integers(0, 9)) == 0:
        s = draw(st.integers(0, size + 2))
        return s, draw(st.integers(max(0, size - s + 1), size - s + 4))
    s = draw(st.integers(0, size))
    return s, draw(st.integers(0, size - s))


# -- the test ------------------------------------------------------------------------------


def make_images(folder: Path, layers: list[MLayer], ss: int) -> None:
    """Raw images start with a pattern in every sector."""
    for i, ly in enumerate(layers):
        if ly.full:
            blocks = [sector_data(1000 + i, x, ss) for x in range(ly.size)]
            (folder / f"layer{i}.raw").write_bytes(b"".join(blocks))
            ly.data.update(enumerate(blocks))


async def open_engine(
    folder: Path, layers: list[MLayer], configured: list[int | None], ss: int, read_only: bool
) -> Volume:
    entries: list[LayerEntry] = []
    for i, (ly, size) in enumerate(zip(layers, configured, strict=True)):
        layer: Layer
        if ly.kind in RAM_KINDS:
            cls = RAM_KINDS[ly.kind][0]
            layer = cls(size=None if size is None else size * ss, sector_size=ss)
        else:
            path = folder / f"layer{i}.raw"
            layer = RawLayer(str(path), read_only=ly.kind == "raw-ro", sector_size=ss)
        entries.append(LayerEntry(layer, read_cache=ly.rc, write_through=ly.wt))
    return await Volume.open("model", entries, read_only=read_only)


async def seed_ram(draw: Draw, volume: Volume, model: Model) -> None:
    """Put data and present zeros into the RAM layers directly."""
    ss = model.ss
    for i, (entry, ly) in enumerate(zip(volume.entries, model.layers, strict=True)):
        if ly.full:
            continue
        for _ in range(draw(st.integers(0, 3))):
            s = draw(st.integers(0, ly.size - 1))
            n = draw(st.integers(1, ly.size - s))
            if draw(st.integers(0, 3)) == 0:
                await entry.layer.unmap(s, n, False, False)
                for x in range(s, s + n):
                    ly.data[x] = bytes(ss)
            else:
                data = b"".join(sector_data(2000 + i, x, ss) for x in range(s, s + n))
                await entry.layer.write(memoryview(data), s, False)
                for x in range(s, s + n):
                    ly.data[x] = data[(x - s) * ss : (x - s + 1) * ss]


async def expect_same(
    engine_call: Coroutine[Any, Any, T], model_call: Callable[[], U]
) -> tuple[T, U] | None:
    """Run both; they must raise the same error class, or both succeed: then return
    (engine's result, model's result)."""
    try:
        expected = model_call()
    except TierdiskError as exc:
        expected_exc: type[TierdiskError] | None = type(exc)
    else:
        expected_exc = None
    try:
        got = await engine_call
    except TierdiskError as exc:
        assert expected_exc is not None, f"engine raised {exc!r}, model succeeded"
        assert isinstance(exc, expected_exc), f"engine raised {exc!r}, model {expected_exc}"
        return None
    assert expected_exc is None, f"engine succeeded, model raised {expected_exc}"
    return got, expected


def compare_state(volume: Volume, model: Model) -> None:
    assert volume.sector_count == model.size
    tree = volume.inspect()
    for i, (info, ly) in enumerate(zip(tree["layers"], model.layers, strict=True)):
        assert info["visible_sector_count"] == model.overlap[i], f"layer {i}"
        assert info["present_sectors"] == (ly.size if ly.full else len(ly.data)), f"layer {i}"
    for i, (entry, stats) in enumerate(zip(volume.entries, model.stats, strict=True)):
        assert vars(entry.stats) == vars(stats), f"counters of layer {i}"


async def run_example(
    data: st.DataObject,
    folder: Path,
    layers: list[MLayer],
    configured: list[int | None],
    ss: int,
    read_only: bool,
) -> None:
    volume = await open_engine(folder, layers, configured, ss, read_only)
    try:
        model = Model(layers, ss, read_only)
        assert volume.unmap_behavior == model.behavior
        await seed_ram(data.draw, volume, model)
        tag = 1
        for _ in range(data.draw(st.integers(1, 30), label="ops")):
            op = data.draw(
                st.sampled_from(
                    ["read", "read", "read", "write", "write", "no_overwrite", "unmap",
                     "resize", "flush", "allocation"]
                ),
                label="op",
            )  # fmt: skip
            size = model.size
            if op == "read":
                s, n = _range(data.draw, size)
                if data.draw(st.booleans()):
                    out = await expect_same(volume.read(s, n), partial(model.read, s, n))
                else:  # into a dirty buffer: every byte must be written
                    buf = bytearray(b"\xee" * (n * ss))
                    into = await expect_same(
                        volume.read_into(memoryview(buf), s), partial(model.read, s, n)
                    )
                    out = ((buf, into[0]), into[1]) if into else None
                if out:
                    (got, present), (want, want_present) = out
                    assert bytes(got) == want, f"read {s}+{n}"
                    assert present == want_present, f"present of read {s}+{n}"
            elif op in ("write", "no_overwrite"):
                s, n = _range(data.draw, size)
                tag += 1
                payload = b"".join(sector_data(tag, x, ss) for x in range(s, s + n))
                fua = data.draw(st.booleans())
                nov = op == "no_overwrite"
                await expect_same(
                    volume.write(s, payload, fua=fua, no_overwrite=nov),
                    partial(model.write, s, payload, nov),
                )
            elif op == "unmap":
                s, n = _range(data.draw, size)
                await expect_same(volume.unmap(s, n), partial(model.unmap, s, n))
            elif op == "resize":
                new = data.draw(st.integers(0, 24))
                await expect_same(volume.resize(new), partial(model.resize, new))
            elif op == "flush":
                await volume.flush()
            else:
                s, n = _range(data.draw, size)
                runs = await expect_same(volume.allocation(s, n), partial(model.allocation, s, n))
                if runs:
                    assert runs[0] == runs[1], f"allocation {s}+{n}"
            compare_state(volume, model)
            if size:
                whole = await volume.allocation(0, model.size)
                assert whole == model.allocation(0, model.size)
        # Finally every sector reads as the model says (this fills caches too).
        got, present = await volume.read(0, model.size)
        want, want_present = model.read(0, model.size)
        assert bytes(got) == want and present == want_present
        compare_state(volume, model)
    finally:
        await volume.close()


@settings(
    max_examples=int(os.environ.get("TIERDISK_MODEL_EXAMPLES", "400")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.data())
def test_engine_matches_model(data: st.DataObject) -> None:
    layers, configured, ss, read_only = data.draw(stacks(), label="stack")
    with tempfile.TemporaryDirectory() as folder:
        make_images(Path(folder), layers, ss)
        asyncio.run(run_example(data, Path(folder), layers, configured, ss, read_only))
