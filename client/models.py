"""Plain, immutable values the client hands back instead of protobuf messages."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from tierdisk.v1 import blockdevice_pb2 as pb

from .errors import OutOfRange

__all__ = [
    "AllocationExtent",
    "Extent",
    "ReadResult",
    "ResizeEvent",
    "UnmapBehavior",
    "VolumeInfo",
]


class UnmapBehavior(enum.StrEnum):
    """What reads of unmapped sectors return; the values are the proto enum names."""

    UNSPECIFIED = "UNMAP_BEHAVIOR_UNSPECIFIED"
    ANY = "UNMAP_BEHAVIOR_ANY"
    """Unmapped sectors read as some unspecified but stable content."""
    ZEROES = "UNMAP_BEHAVIOR_ZEROES"
    """Unmapped sectors read as zeros."""
    IGNORED = "UNMAP_BEHAVIOR_IGNORED"
    """Unmap does nothing; sectors keep their contents."""

    @classmethod
    def from_proto(cls, value: int) -> UnmapBehavior:
        """The member for a wire value; values this client does not know are UNSPECIFIED."""
        try:
            return cls(pb.UnmapBehavior.Name(value))  # type: ignore[arg-type]
        except ValueError:
            return cls.UNSPECIFIED


@dataclass(frozen=True, slots=True)
class VolumeInfo:
    """A volume's geometry and capabilities (the ``Volume`` message).

    The field docs describe a :attr:`ready` volume. One that is configured but not ready yet
    (waiting for its remote tier to answer), as :meth:`AsyncClient.list_volumes
    <tierdisk.client.aio.AsyncClient.list_volumes>` lists it, has only its ``name``: every
    other field is zero, false or empty (``sector_size`` 0, ``unmap_behavior``
    ``UNSPECIFIED``), and :attr:`ready` is false. ``info()`` never returns one: it raises
    :class:`~tierdisk.client.errors.Unavailable` naming the reason."""

    name: str
    sector_size: int
    """Bytes per sector: a power of two, at least 512 (0 when not :attr:`ready`)."""
    sector_count: int
    """Size of the volume in sectors."""
    physical_sector_size: int
    read_only: bool
    fua_respected: bool
    """True when a ``fua`` write is durable when acknowledged (else after the next flush)."""
    disk_id: bytes
    """16 bytes, or empty when no layer has one."""
    unmap_behavior: UnmapBehavior
    optimal_unmap_sectors: int
    """Preferred unmap granularity in sectors; 0 = no preference."""
    volatile: bool = False
    """True when a restart of its server loses what the volume holds (its write path is
    memory only, or a tier over a volatile origin): a flush makes nothing durable past a
    restart. False also from a server that predates the field."""
    problem: str = ""
    """Why the volume refuses all I/O until its server restarts (a layer's problem, naming
    the layer: its remote volume was re-created with another geometry, say; for a volume
    not :attr:`ready`, why its server stopped trying to open it: its remote tier came up
    with a geometry its stack cannot take, say); "" while it serves or is being opened, and
    from a server that predates the field."""

    @property
    def ready(self) -> bool:
        """True when the server gave the volume's geometry (its ``sector_size`` is not 0):
        false for a volume that is configured but not ready yet, listed by name only."""
        return self.sector_size > 0

    @property
    def size_bytes(self) -> int:
        """The volume's size in bytes."""
        return self.sector_count * self.sector_size

    def check_fits(self, sector: int, count: int) -> None:
        """:class:`~tierdisk.client.errors.OutOfRange` naming the whole range if ``count``
        sectors from ``sector`` reach past the end of the volume as of this value."""
        if sector + count > self.sector_count:
            what = (
                f"sectors [{sector}, {sector + count}) reach past the end"
                if count
                else f"sector {sector} is past the end"  # (nothing to write, from there)
            )
            raise OutOfRange(
                f"volume {self.name!r}: {what} ({self.sector_count} sectors of "
                f"{self.sector_size} bytes)",
                volume=self.name,
            )

    @classmethod
    def from_proto(cls, msg: pb.Volume) -> VolumeInfo:
        return cls(
            name=msg.name,
            sector_size=msg.sector_size,
            sector_count=msg.sector_count,
            physical_sector_size=msg.physical_sector_size,
            read_only=msg.read_only,
            fua_respected=msg.fua_respected,
            disk_id=bytes(msg.disk_id),
            unmap_behavior=UnmapBehavior.from_proto(msg.unmap_behavior),
            optimal_unmap_sectors=msg.optimal_unmap_sectors,
            volatile=msg.volatile,
            problem=msg.problem,
        )


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of sectors: ``sector_count`` sectors from ``sector``."""

    sector: int
    sector_count: int

    @property
    def end(self) -> int:
        """The first sector after the run."""
        return self.sector + self.sector_count


@dataclass(frozen=True, slots=True)
class AllocationExtent:
    """A run of sectors and the topmost layer holding it (``depth`` -1: no layer, reads zeros)."""

    sector: int
    sector_count: int
    depth: int

    @property
    def end(self) -> int:
        return self.sector + self.sector_count

    @property
    def allocated(self) -> bool:
        """True when some layer holds the run."""
        return self.depth >= 0


@dataclass(frozen=True, slots=True)
class ReadResult:
    """Data of a read with ``report_presence``: ``present`` lists the runs some layer holds
    (absolute sectors, sorted, merged across the chunks the read was split into)."""

    data: bytes
    present: tuple[Extent, ...]


@dataclass(frozen=True, slots=True)
class ResizeEvent:
    """A volume's size at one generation; ``generation`` grows with every change."""

    sector_count: int
    generation: int
