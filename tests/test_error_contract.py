"""The error contract between the server and the client library (DESIGN.md §2).

The server answers a domain error with the status code of its table (``service/status.py``)
and names the exception class in the ``tierdisk-error`` trailer; the client maps the code to
its class and refines it by that name (``client/errors.py``). The two halves are written
apart, so this pins them together: each server class, through a real server reply, comes
back as the client class meant for it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from servers import ram, running_server, toml_volume

from tierdisk.client import AsyncClient
from tierdisk.client import errors as cerr
from tierdisk.client.errors import ERROR_METADATA_KEY, SERVICE_NAME
from tierdisk.service import errors as serr
from tierdisk.service.grpc_api import BlockDeviceService
from tierdisk.service.grpc_refusal import ERROR_HEADER, status_for
from tierdisk.service.server import SERVICE_NAME as SERVER_SERVICE_NAME
from tierdisk.service.status import status_name

S = grpc.StatusCode

DESIGN_TABLE: dict[type[serr.TierdiskError], tuple[grpc.StatusCode, type[cerr.TierdiskError]]] = {
    serr.VolumeNotFound: (S.NOT_FOUND, cerr.VolumeNotFound),
    serr.OutOfRange: (S.OUT_OF_RANGE, cerr.OutOfRange),
    serr.InvalidArgument: (S.INVALID_ARGUMENT, cerr.InvalidArgument),
    serr.AllocationTooLarge: (S.INVALID_ARGUMENT, cerr.AllocationTooLarge),
    serr.FailedPrecondition: (S.FAILED_PRECONDITION, cerr.FailedPrecondition),
    serr.ReadOnlyError: (S.FAILED_PRECONDITION, cerr.ReadOnlyVolume),
    serr.NotSupported: (S.FAILED_PRECONDITION, cerr.NotSupported),
    serr.TierLoop: (S.FAILED_PRECONDITION, cerr.TierLoop),
    serr.SectorSizeChanged: (S.FAILED_PRECONDITION, cerr.SectorSizeChanged),
    serr.ConfigError: (S.FAILED_PRECONDITION, cerr.FailedPrecondition),
    serr.Unauthenticated: (S.UNAUTHENTICATED, cerr.Unauthenticated),
    serr.PermissionDenied: (S.PERMISSION_DENIED, cerr.PermissionDenied),
    serr.Unavailable: (S.UNAVAILABLE, cerr.Unavailable),
    serr.DeadlineExceeded: (S.DEADLINE_EXCEEDED, cerr.DeadlineExceeded),
    serr.NoSpace: (S.RESOURCE_EXHAUSTED, cerr.NoSpace),
    serr.StorageError: (S.INTERNAL, cerr.StorageError),
    serr.DataCorruption: (S.DATA_LOSS, cerr.DataLoss),
    serr.WritesLost: (S.DATA_LOSS, cerr.WritesLost),
}
"""DESIGN.md §2's table, written out: server class -> (status code, client class)."""


def test_every_server_error_class_is_in_the_contract() -> None:
    """A new domain error must be given its code here (and so a client class)."""
    public = {
        cls
        for name in serr.__all__
        if isinstance(cls := getattr(serr, name), type) and issubclass(cls, serr.TierdiskError)
    } - {serr.TierdiskError}
    assert public == set(DESIGN_TABLE)


@pytest.mark.parametrize("cls", list(DESIGN_TABLE), ids=lambda cls: cls.__name__)
def test_the_server_answers_each_class_with_its_code(cls: type[serr.TierdiskError]) -> None:
    code, _ = DESIGN_TABLE[cls]
    assert status_for(cls("x")) == code
    assert status_name(cls("x")) == code.name


def test_storage_failures_and_bugs() -> None:
    """An ``OSError`` from storage is ``INTERNAL``; anything else ``UNKNOWN``."""
    assert status_for(OSError(5, "Input/output error")) == S.INTERNAL
    assert status_for(ValueError("a bug")) == S.UNKNOWN


def test_the_wire_names_agree() -> None:
    """The trailer's name is part of the wire contract; the client's service name is a
    literal, the server's comes from the proto."""
    assert ERROR_HEADER == ERROR_METADATA_KEY == "tierdisk-error"
    assert SERVICE_NAME == SERVER_SERVICE_NAME == "tierdisk.v1.BlockDevice"


def test_every_server_name_the_client_knows_is_a_server_class_or_an_alias() -> None:
    """A renamed server class would silently lose the client's finer class."""
    server_classes = {cls.__name__ for cls in DESIGN_TABLE}
    aliases = {"ReadOnlyVolume", "DataLoss"}  # the client's own names, accepted as well
    named: set[str] = set()
    pending: list[type[cerr.TierdiskError]] = [cerr.TierdiskError]
    while pending:
        cls = pending.pop()
        named.update(cls.server_names)
        pending.extend(cls.__subclasses__())
    assert named - aliases <= server_classes, named - aliases - server_classes


class _Refusal:
    """The domain error every ``Flush`` of the patched servicer raises."""

    error: serr.TierdiskError = serr.TierdiskError("unset")


@pytest.fixture
async def refusing_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """A real server whose ``Flush`` raises :attr:`_Refusal.error` inside the servicer's
    usual call path (the error mapping under test); its address."""

    async def flush(self: BlockDeviceService, request: Any, context: Any) -> Any:
        async def body() -> tuple[Any, int]:
            raise _Refusal.error

        return await self._call(context, body, "flush", request.volume)

    monkeypatch.setattr(BlockDeviceService, "Flush", flush)
    async with running_server(tmp_path, toml_volume("v", ram("1MiB"))) as server:
        yield server.grpc_address


async def test_each_server_class_comes_back_as_its_client_class(refusing_server: str) -> None:
    """Through a real server and the client library: code, class, trailer and message."""
    async with AsyncClient(refusing_server, retries=0, timeout=10) as client:
        for server_cls, (code, client_cls) in DESIGN_TABLE.items():
            _Refusal.error = server_cls(f"refused by {server_cls.__name__}")
            with pytest.raises(cerr.TierdiskError) as info:
                await client.volume("v").flush()
            assert type(info.value) is client_cls, (server_cls, type(info.value))
            assert info.value.code == code
            assert info.value.server_error == server_cls.__name__
            assert f"refused by {server_cls.__name__}" in info.value.message


@pytest.mark.parametrize(
    ("cls", "nothing"),
    [
        (cerr.VolumeNotFound, True),
        (cerr.OutOfRange, True),
        (cerr.InvalidArgument, True),
        (cerr.ReadOnlyVolume, True),
        (cerr.Unauthenticated, True),
        (cerr.PermissionDenied, True),
        (cerr.NoSpace, True),  # DESIGN.md §2: "the request changed nothing"
        (cerr.Unimplemented, True),  # not a tierdisk server: it wrote nothing of ours
        (cerr.Unavailable, False),  # the connection may have dropped after the write
        (cerr.DeadlineExceeded, False),
        (cerr.StorageError, False),
        (cerr.DataLoss, False),
        (cerr.Cancelled, False),
        (cerr.TierdiskError, False),
    ],
    ids=lambda value: value.__name__ if isinstance(value, type) else str(value),
)
def test_which_write_failures_changed_nothing(cls: type[cerr.TierdiskError], nothing: bool) -> None:
    """What the CLI's "may have been written in part" rests on (client/errors.py)."""
    assert cerr.changed_nothing(cls("x")) is nothing
