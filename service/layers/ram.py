"""The ``ram`` layer: sectors in memory, lost at exit.

Data lives in one anonymous private mapping (``MAP_NORESERVE``) the size of the layer, so
only touched pages cost memory and a run moves with one slice copy; presence is a
:class:`~tierdisk.service.presence.RunSet`. An unmap over sectors the layers below may hold
keeps them present as zeros, so the layer reports ``UNMAP_BEHAVIOR_ZEROES``. Resizable; data
written past the old size after a grow reads back (the upstream ``zero_after`` defect is not
reproduced).

A grow past the current mapping maps a new one and copies the present runs into it, a few
MiB at a time with the event loop running between (a GiB held is seconds of copying, which
held every client of the server); reads go on from the old mapping meanwhile, writes and
unmaps wait for the move. When the
system will not map that much (``ENOMEM``: out of memory or address space, e.g. 2**40
512-byte sectors = 512 TiB against x86-64's 128 TiB of user address space), the resize
raises :class:`NoSpace` (RESOURCE_EXHAUSTED: memory is this layer's storage, and the request
changed nothing); a byte count no mapping can have (over ``2**63 - 1``), or a size of no
sectors, is :class:`InvalidArgument`. Either way the layer keeps its size, data and mapping.
"""

from __future__ import annotations

import asyncio
import errno
import mmap
from typing import Any

from ..errors import InvalidArgument, NoSpace, StorageError
from ..layer import LayerMetadata, PartialLayer, layer_closed, new_geometry
from ..presence import RunSet
from ..runs import Run, complement

__all__ = ["RamLayer"]

_MAP_NORESERVE = 0x4000  # Linux; not exported by the mmap module
_PAGE = mmap.PAGESIZE
_MOVE_CHUNK = 4 << 20
"""Bytes a grow copies into the new mapping between yields to the event loop (~ms each)."""


def _anonymous(nbytes: int) -> mmap.mmap:
    return mmap.mmap(
        -1, max(nbytes, _PAGE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
    )


def _map_of(nbytes: int) -> mmap.mmap:
    """A fresh mapping of ``nbytes`` (at attach, and for a grow); failures as domain errors
    (module docs)."""
    try:
        return _anonymous(nbytes)
    except OverflowError:
        raise InvalidArgument(
            f"ram layer: {nbytes} bytes is more than a memory mapping can hold (2**63 - 1 bytes)"
        ) from None
    except OSError as exc:
        if exc.errno == errno.ENOMEM:
            raise NoSpace(
                f"ram layer: cannot map {nbytes} bytes: out of memory or address space "
                f"({exc.strerror})"
            ) from None
        raise StorageError(f"ram layer: cannot map {nbytes} bytes: {exc.strerror}") from None


class RamLayer(PartialLayer):
    """In-memory layer. ``size`` in bytes and ``sector_size`` default to the layer below's
    (else 512 for the sector size; a bottom layer needs ``size``)."""

    kind = "ram"

    @property
    def keeps_writes(self) -> bool:
        return False  # lost at exit

    @property
    def lost_at_exit(self) -> bool:
        return True

    def __init__(self, size: int | None = None, sector_size: int | None = None) -> None:
        super().__init__()
        self._size_bytes = size
        self._wanted_sector_size = sector_size
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._present = RunSet()
        self._moving: asyncio.Event | None = None  # set when a grow's move is over (_grow)

    async def attach(self, lower: LayerMetadata | None) -> None:
        ss, count = new_geometry("ram layer", self._size_bytes, self._wanted_sector_size, lower)
        self._set_geometry(ss, count)
        self._map = _map_of(ss * count)
        self._view = memoryview(self._map)

    async def close(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._map is not None:
            self._map.close()
            self._map = None

    @property
    def present_sectors(self) -> int:
        return self._present.sectors

    def _mem(self) -> memoryview:
        view = self._view
        if view is None:  # after close (a call a stop's grace cut short), or before attach
            raise layer_closed("ram layer")
        return view

    async def read(self, buf: memoryview, sector: int) -> list[Run]:
        ss = self._sector_size
        count = len(buf) // ss
        self._check_range(sector, count)
        runs = self._present.runs_in(sector, sector + count)
        mem = self._mem()
        for a, b in runs:
            buf[(a - sector) * ss : (b - sector) * ss] = mem[a * ss : b * ss]
        return runs

    async def presence(self, sector: int, count: int) -> list[Run]:
        return self._present.runs_in(sector, sector + count)

    async def _moved(self) -> None:
        """Wait until no grow is moving the data (a change now could miss the new mapping)."""
        while self._moving is not None:
            await self._moving.wait()

    async def write(self, data: memoryview, sector: int, fua: bool) -> None:
        if self._moving is not None:
            await self._moved()
        ss = self._sector_size
        count = len(data) // ss
        self._check_range(sector, count)
        self._mem()[sector * ss : (sector + count) * ss] = data
        self._present.add(sector, sector + count)

    async def write_no_overwrite(self, data: memoryview, sector: int) -> int:
        if self._moving is not None:
            await self._moved()
        ss = self._sector_size
        end = sector + len(data) // ss
        self._check_range(sector, end - sector)
        mem = self._mem()
        stored = 0
        for a, b in complement(sector, end, self._present.runs_in(sector, end)):
            mem[a * ss : b * ss] = data[(a - sector) * ss : (b - sector) * ss]
            self._present.add(a, b)
            stored += b - a
        return stored

    async def unmap(
        self, sector: int, count: int, block_level_only: bool, next_is_zero: bool
    ) -> None:
        if self._moving is not None:
            await self._moved()
        self._check_range(sector, count)
        self._zero(sector, sector + count)
        if next_is_zero:
            self._present.remove(sector, sector + count)
        else:
            self._present.add(sector, sector + count)

    def _zero(self, a: int, b: int) -> None:
        """Make sectors ``[a, b)`` hold zeros, returning whole pages to the system."""
        assert self._map is not None
        ss = self._sector_size
        lo, hi = a * ss, b * ss
        page_lo = -(-lo // _PAGE) * _PAGE
        page_hi = hi // _PAGE * _PAGE
        mem = self._mem()
        if page_lo < page_hi:
            mem[lo:page_lo] = bytes(page_lo - lo)
            self._map.madvise(mmap.MADV_DONTNEED, page_lo, page_hi - page_lo)
            mem[page_hi:hi] = bytes(hi - page_hi)
        else:
            mem[lo:hi] = bytes(hi - lo)

    async def flush(self) -> None:
        return None

    async def resize(self, sector_count: int) -> None:
        if sector_count <= 0:
            raise InvalidArgument(
                f"ram layer: size must be at least one sector, not {sector_count}"
            )
        ss = self._sector_size
        old = self._sector_count
        if sector_count < old:
            self._present.remove(sector_count, old)
            self._zero(sector_count, min(old, len(self._mem()) // ss))
        elif sector_count * ss > len(self._mem()):
            await self._grow(_map_of(sector_count * ss))
        self._sector_count = sector_count
        self._notify_resized()

    async def _grow(self, grown: mmap.mmap) -> None:
        """Move the data into ``grown`` (module docs) and make it the layer's mapping."""
        await self._moved()
        moving = self._moving = asyncio.Event()
        view = memoryview(grown)
        try:
            ss = self._sector_size
            since_yield = 0
            for a, b in list(self._present):
                for lo in range(a * ss, b * ss, _MOVE_CHUNK):
                    hi = min(lo + _MOVE_CHUNK, b * ss)
                    view[lo:hi] = self._mem()[lo:hi]  # (closed meanwhile: raises)
                    since_yield += hi - lo + _PAGE  # (a run costs a page's copy at least)
                    if since_yield >= _MOVE_CHUNK:
                        since_yield = 0
                        await asyncio.sleep(0)
            self._mem().release()  # (closed during the last yield: raises, grown dropped)
            old, self._map, self._view = self._map, grown, view
        except BaseException:
            view.release()
            grown.close()
            raise
        finally:
            self._moving = None
            moving.set()
        if old is not None:  # (returning a GiB of pages takes the kernel a while)
            await asyncio.to_thread(old.close)

    def inspect(self) -> dict[str, Any]:
        """``present_bytes``: the sectors the layer holds, in bytes. Not its memory: sectors
        unmapped over a layer below stay present as zeros, and their pages are given back."""
        return {
            "present_bytes": self._present.sectors * self._sector_size,
            "present_runs": len(self._present),
        }
