"""The committed bindings of protos/tierdisk/v1/blockdevice.proto: fresh, and true to DESIGN §2.

The freshness test regenerates the code with the pinned generators (through the same
`generate()` that scripts/gen-proto uses) and compares it byte for byte with the
committed files. The other tests check the API surface that DESIGN §2 fixes, through the
descriptors a client or server actually loads.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import tomllib
from importlib.machinery import SourceFileLoader
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from tierdisk.v1 import blockdevice_pb2 as pb
from tierdisk.v1 import blockdevice_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
GEN_PROTO = ROOT / "scripts" / "gen-proto"
V1_DIR = ROOT / "protos" / "tierdisk" / "v1"
F = FieldDescriptor


def _load_gen_proto() -> ModuleType:
    loader = SourceFileLoader("tierdisk_gen_proto", str(GEN_PROTO))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _require_generators() -> None:
    missing = [m for m in ("grpc_tools", "mypy_protobuf") if importlib.util.find_spec(m) is None]
    if not missing:
        return
    reason = (
        f"{' and '.join(missing)} not importable: install the dev extra "
        "(pip install -e '.[dev]') to check the generated protobuf code"
    )
    if os.environ.get("TIERDISK_REQUIRE_TOOLS") == "1":
        pytest.fail(f"TIERDISK_REQUIRE_TOOLS=1 but {reason}")
    pytest.skip(reason)


def _diff_excerpt(committed: Path, fresh: Path, limit: int = 40) -> str:
    try:
        old = committed.read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return "    (the committed file is missing)\n"
    new = fresh.read_text().splitlines(keepends=True)
    diff = list(difflib.unified_diff(old, new, "committed", "regenerated"))
    text = "".join(diff[:limit])
    if len(diff) > limit:
        text += f"... ({len(diff) - limit} more diff lines)\n"
    return text


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    _require_generators()
    gen = _load_gen_proto()
    problems = gen.check_versions()
    assert not problems, "generator versions differ from the pins in scripts/gen-proto:\n" + (
        "\n".join(problems)
    )

    gen.generate(tmp_path)

    stale = []
    for rel in gen.GENERATED:
        committed, fresh = gen.PROTO_ROOT / rel, tmp_path / rel
        if not committed.is_file() or committed.read_bytes() != fresh.read_bytes():
            stale.append(f"{committed.relative_to(ROOT)}:\n{_diff_excerpt(committed, fresh)}")
    assert not stale, (
        "committed generated code is stale; run scripts/gen-proto and commit the result.\n"
        + "\n".join(stale)
    )


def test_generated_files_are_the_committed_set() -> None:
    """Exactly the four generated files sit beside the .proto, and the package is typed."""
    names = {p.name for p in V1_DIR.iterdir() if p.is_file()} - {"__init__.py"}
    assert names == {
        "blockdevice.proto",
        "blockdevice_pb2.py",
        "blockdevice_pb2.pyi",
        "blockdevice_pb2_grpc.py",
        "blockdevice_pb2_grpc.pyi",
        "py.typed",
    }


def test_grpc_module_imports_messages_by_package_path() -> None:
    source = (V1_DIR / "blockdevice_pb2_grpc.py").read_text()
    assert "from tierdisk.v1 import blockdevice_pb2 as" in source


def _dependency_lower_bound(name: str) -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        m = re.fullmatch(rf"{re.escape(name)}\s*>=\s*([0-9][0-9.]*)\s*(,.*)?", dep)
        if m:
            return m.group(1)
    raise AssertionError(f"pyproject.toml has no '{name}>=' dependency")


def test_runtime_lower_bounds_equal_generator_versions() -> None:
    """DESIGN §1: grpcio/protobuf lower bounds are what the generated code requires."""
    grpc_source = (V1_DIR / "blockdevice_pb2_grpc.py").read_text()
    m = re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'$", grpc_source, re.M)
    assert m, "GRPC_GENERATED_VERSION not found in blockdevice_pb2_grpc.py"
    assert _dependency_lower_bound("grpcio") == m.group(1)

    pb_source = (V1_DIR / "blockdevice_pb2.py").read_text()
    m = re.search(
        r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,"
        r"\s*(\d+),\s*(\d+),\s*(\d+),",
        pb_source,
    )
    assert m, "ValidateProtobufRuntimeVersion call not found in blockdevice_pb2.py"
    assert _dependency_lower_bound("protobuf") == ".".join(m.groups())


# DESIGN §2: rpc -> (request message, response message, server streaming)
RPCS = {
    "ListVolumes": ("ListVolumesRequest", "ListVolumesResponse", False),
    "GetVolume": ("GetVolumeRequest", "Volume", False),
    "Read": ("ReadRequest", "ReadResponse", False),
    "ReadBatch": ("ReadBatchRequest", "ReadBatchResponse", False),  # ours, not DESIGN's
    "Write": ("WriteRequest", "WriteResponse", False),
    "Unmap": ("UnmapRequest", "UnmapResponse", False),
    "Flush": ("FlushRequest", "FlushResponse", False),
    "GetAllocation": ("GetAllocationRequest", "GetAllocationResponse", False),
    "Inspect": ("InspectRequest", "InspectResponse", False),
    "Resize": ("ResizeRequest", "Volume", False),
    "WatchResize": ("WatchResizeRequest", "ResizeEvent", True),
}


def test_service_has_every_rpc_with_its_types_and_streaming() -> None:
    assert pb.DESCRIPTOR.package == "tierdisk.v1"
    service = pb.DESCRIPTOR.services_by_name["BlockDevice"]
    assert service.full_name == "tierdisk.v1.BlockDevice"
    assert set(service.methods_by_name) == set(RPCS)
    for name, (request, response, server_streaming) in RPCS.items():
        method = service.methods_by_name[name]
        assert method.input_type.full_name == f"tierdisk.v1.{request}", name
        assert method.output_type.full_name == f"tierdisk.v1.{response}", name
        assert method.client_streaming is False, name
        assert method.server_streaming is server_streaming, name


def test_grpc_module_exposes_stub_servicer_and_registration() -> None:
    for name in RPCS:
        assert callable(getattr(pb_grpc.BlockDeviceServicer, name)), name
    assert callable(pb_grpc.BlockDeviceStub)
    assert callable(pb_grpc.add_BlockDeviceServicer_to_server)


U64, U32, I32 = F.TYPE_UINT64, F.TYPE_UINT32, F.TYPE_INT32
STR, BOOL, BYTES, ENUM, MSG = F.TYPE_STRING, F.TYPE_BOOL, F.TYPE_BYTES, F.TYPE_ENUM, F.TYPE_MESSAGE
F64 = F.TYPE_FIXED64

# DESIGN §2: message -> {field: (type, repeated, message/enum type or None)}
FIELDS: dict[str, dict[str, tuple[int, bool, str | None]]] = {
    "Volume": {
        "name": (STR, False, None),
        "sector_size": (U32, False, None),
        "sector_count": (U64, False, None),
        "physical_sector_size": (U32, False, None),
        "read_only": (BOOL, False, None),
        "fua_respected": (BOOL, False, None),
        "disk_id": (BYTES, False, None),
        "unmap_behavior": (ENUM, False, "tierdisk.v1.UnmapBehavior"),
        "optimal_unmap_sectors": (U64, False, None),
        "volatile": (BOOL, False, None),
        "problem": (STR, False, None),
    },
    "Extent": {"sector": (U64, False, None), "sector_count": (U64, False, None)},
    "AllocationExtent": {
        "sector": (U64, False, None),
        "sector_count": (U64, False, None),
        "depth": (I32, False, None),
    },
    "ResizeEvent": {"sector_count": (U64, False, None), "generation": (U64, False, None)},
    "ListVolumesRequest": {"page_size": (U32, False, None), "page_token": (STR, False, None)},
    "ListVolumesResponse": {
        "volumes": (MSG, True, "tierdisk.v1.Volume"),
        "next_page_token": (STR, False, None),
    },
    "GetVolumeRequest": {"volume": (STR, False, None)},
    "ReadRequest": {
        "volume": (STR, False, None),
        "sector": (U64, False, None),
        "sector_count": (U64, False, None),
        "report_presence": (BOOL, False, None),
        "sector_size": (U32, False, None),
    },
    "ReadResponse": {
        "data": (BYTES, False, None),
        "present": (MSG, True, "tierdisk.v1.Extent"),
    },
    "ReadBatchRequest": {  # ours, not DESIGN's; its reply's data is field 1 as Read's
        "volume": (STR, False, None),
        "ranges": (MSG, True, "tierdisk.v1.Extent"),
        "sector_size": (U32, False, None),
        "report_presence": (BOOL, False, None),
    },
    "ReadBatchResponse": {
        "data": (BYTES, False, None),
        "present": (MSG, True, "tierdisk.v1.Extent"),
        "presence_reported": (BOOL, False, None),
    },
    "WriteRequest": {
        "volume": (STR, False, None),
        "sector": (U64, False, None),
        "data": (BYTES, False, None),
        "fua": (BOOL, False, None),
        "no_overwrite": (BOOL, False, None),
        "sector_size": (U32, False, None),
    },
    "WriteResponse": {"write_verifier": (F64, False, None)},
    "UnmapRequest": {
        "volume": (STR, False, None),
        "sector": (U64, False, None),
        "sector_count": (U64, False, None),
        "block_level_only": (BOOL, False, None),
        "sector_size": (U32, False, None),
    },
    "UnmapResponse": {"write_verifier": (F64, False, None)},
    "FlushRequest": {"volume": (STR, False, None)},
    "FlushResponse": {"write_verifier": (F64, False, None), "volatile": (BOOL, False, None)},
    "GetAllocationRequest": {
        "volume": (STR, False, None),
        "sector": (U64, False, None),
        "sector_count": (U64, False, None),
        "sector_size": (U32, False, None),
    },
    "GetAllocationResponse": {"extents": (MSG, True, "tierdisk.v1.AllocationExtent")},
    "InspectRequest": {"volume": (STR, False, None), "path": (STR, False, None)},
    "InspectResponse": {"tree": (MSG, False, "google.protobuf.Struct")},
    "ResizeRequest": {
        "volume": (STR, False, None),
        "sector_count": (U64, False, None),
        "sector_size": (U32, False, None),
    },
    "WatchResizeRequest": {"volume": (STR, False, None)},
}


def _type_name(field: FieldDescriptor) -> str | None:
    if field.type == F.TYPE_MESSAGE:
        assert field.message_type is not None
        return field.message_type.full_name
    if field.type == F.TYPE_ENUM:
        assert field.enum_type is not None
        return field.enum_type.full_name
    return None


@pytest.mark.parametrize("message", sorted(FIELDS))
def test_message_fields(message: str) -> None:
    descriptor: Descriptor = pb.DESCRIPTOR.message_types_by_name[message]
    actual = {f.name: (f.type, f.is_repeated, _type_name(f)) for f in descriptor.fields}
    # Exactly DESIGN's fields today; when fields are added to the API, add them here too.
    assert actual == FIELDS[message]


def test_every_message_is_checked() -> None:
    assert set(pb.DESCRIPTOR.message_types_by_name) == set(FIELDS)
    assert {m for r, s, _ in RPCS.values() for m in (r, s)} <= set(FIELDS)


def test_unmap_behavior_enum() -> None:
    enum = pb.DESCRIPTOR.enum_types_by_name["UnmapBehavior"]
    assert {v.name: v.number for v in enum.values} == {
        "UNMAP_BEHAVIOR_UNSPECIFIED": 0,
        "UNMAP_BEHAVIOR_ANY": 1,
        "UNMAP_BEHAVIOR_ZEROES": 2,
        "UNMAP_BEHAVIOR_IGNORED": 3,
    }
    assert pb.Volume().unmap_behavior == pb.UNMAP_BEHAVIOR_UNSPECIFIED


def test_messages_round_trip_with_sentinel_values() -> None:
    """Wide values survive the wire: 64-bit sector numbers, depth -1, 16-byte disk_id."""
    volume = pb.Volume(
        name="vm1",
        sector_size=4096,
        sector_count=2**64 - 1,
        physical_sector_size=4096,
        read_only=True,
        fua_respected=True,
        disk_id=bytes(range(16)),
        unmap_behavior=pb.UNMAP_BEHAVIOR_ZEROES,
        optimal_unmap_sectors=2**40,
    )
    assert pb.Volume.FromString(volume.SerializeToString()) == volume
    allocation = pb.GetAllocationResponse(
        extents=[pb.AllocationExtent(sector=2**63, sector_count=8, depth=-1)]
    )
    back = pb.GetAllocationResponse.FromString(allocation.SerializeToString())
    assert back.extents[0].depth == -1
    assert back.extents[0].sector == 2**63
    inspect = pb.InspectResponse()
    inspect.tree.update({"name": "vm1", "layers": [{"index": 0, "kind": "ram"}]})
    back_tree = pb.InspectResponse.FromString(inspect.SerializeToString()).tree
    assert back_tree == inspect.tree
    layer = back_tree.fields["layers"].list_value.values[0].struct_value
    assert layer.fields["kind"].string_value == "ram"
