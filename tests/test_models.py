"""tierdisk.client.models (client/models.py): the client's value types made from protobuf
messages."""

from __future__ import annotations

import pytest

from tierdisk.client.models import UnmapBehavior, VolumeInfo
from tierdisk.v1 import blockdevice_pb2 as pb


def test_volume_info_from_proto() -> None:
    msg = pb.Volume(
        name="vm1",
        sector_size=4096,
        sector_count=10,
        physical_sector_size=4096,
        read_only=True,
        fua_respected=True,
        disk_id=b"\x01" * 16,
        unmap_behavior=pb.UNMAP_BEHAVIOR_ZEROES,
        optimal_unmap_sectors=8,
    )
    info = VolumeInfo.from_proto(msg)
    assert info == VolumeInfo("vm1", 4096, 10, 4096, True, True, b"\x01" * 16,
                              UnmapBehavior.ZEROES, 8)  # fmt: skip
    assert info.size_bytes == 40960
    assert info.unmap_behavior == "UNMAP_BEHAVIOR_ZEROES"
    assert UnmapBehavior.from_proto(99) is UnmapBehavior.UNSPECIFIED
    with pytest.raises(AttributeError):
        info.name = "x"  # type: ignore[misc]
