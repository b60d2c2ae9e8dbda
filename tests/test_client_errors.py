"""tierdisk.client.errors (client/errors.py) without a server: the table from gRPC status
codes, refined by the server's ``tierdisk-error`` name, to the client's exception classes
(:func:`error_from_rpc`), for async and blocking gRPC errors, and the codes of errors the
client raises itself."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest
from rpc_errors import rpc_error

from tierdisk.client.errors import (
    AllocationTooLarge,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NoSpace,
    NotSupported,
    OutOfRange,
    PermissionDenied,
    ReadOnlyVolume,
    StorageError,
    TierdiskError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    VolumeNotFound,
    error_from_rpc,
)

S = grpc.StatusCode


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (S.NOT_FOUND, VolumeNotFound),
        (S.OUT_OF_RANGE, OutOfRange),
        (S.INVALID_ARGUMENT, InvalidArgument),
        (S.FAILED_PRECONDITION, FailedPrecondition),
        (S.UNAUTHENTICATED, Unauthenticated),
        (S.PERMISSION_DENIED, PermissionDenied),
        (S.UNAVAILABLE, Unavailable),
        (S.DEADLINE_EXCEEDED, DeadlineExceeded),
        (S.RESOURCE_EXHAUSTED, NoSpace),
        (S.INTERNAL, StorageError),
        (S.DATA_LOSS, DataLoss),
        (S.CANCELLED, Cancelled),
    ],
)
def test_status_code_picks_the_class(code: grpc.StatusCode, cls: type[TierdiskError]) -> None:
    err = error_from_rpc(rpc_error(code, "the details"), volume="vm1")
    assert type(err) is cls
    assert err.code == code
    assert err.message == "the details" == str(err)
    assert err.volume == "vm1"


@pytest.mark.parametrize(
    ("code", "server_error", "cls"),
    [
        (S.FAILED_PRECONDITION, "ReadOnlyError", ReadOnlyVolume),
        (S.FAILED_PRECONDITION, "NotSupported", NotSupported),
        (S.FAILED_PRECONDITION, "FailedPrecondition", FailedPrecondition),
        (S.NOT_FOUND, "VolumeNotFound", VolumeNotFound),
        (S.RESOURCE_EXHAUSTED, "NoSpace", NoSpace),
        (S.DATA_LOSS, "DataCorruption", DataLoss),
        (S.INTERNAL, "DataCorruption", DataLoss),  # a finer class under INTERNAL's
        (S.INTERNAL, "StorageError", StorageError),
        (S.INVALID_ARGUMENT, "AllocationTooLarge", AllocationTooLarge),
        # a name that does not belong under the code's class is ignored: the code wins
        (S.NOT_FOUND, "ReadOnlyError", VolumeNotFound),
        (S.FAILED_PRECONDITION, "SomethingNew", FailedPrecondition),
    ],
)
def test_server_error_name_refines_the_class(
    code: grpc.StatusCode, server_error: str, cls: type[TierdiskError]
) -> None:
    err = error_from_rpc(rpc_error(code, "msg", server_error))
    assert type(err) is cls
    assert err.code == code
    assert err.server_error == server_error


def test_read_only_is_a_failed_precondition() -> None:
    err = error_from_rpc(rpc_error(S.FAILED_PRECONDITION, "ro", "ReadOnlyError"))
    assert isinstance(err, FailedPrecondition)
    assert isinstance(err, TierdiskError)
    assert issubclass(DataLoss, StorageError)


def test_unlisted_code_is_the_base_class_and_empty_details_get_a_message() -> None:
    err = error_from_rpc(rpc_error(S.ABORTED))
    assert type(err) is TierdiskError
    assert err.code == S.ABORTED
    assert err.message == "aborted"


def test_unimplemented_names_the_server_and_the_method_not_the_volume() -> None:
    """UNIMPLEMENTED: a server that is not tierdisk (or too old for the method)."""
    err = error_from_rpc(rpc_error(S.UNIMPLEMENTED, "Method not found!"), volume="v")
    assert type(err) is Unimplemented
    assert (err.code, err.volume, err.target, err.method) == (S.UNIMPLEMENTED, None, None, None)
    assert err.message == (
        "the server does not serve tierdisk.v1.BlockDevice, or is too old for this call "
        "(UNIMPLEMENTED: Method not found!)"
    )
    named = error_from_rpc(rpc_error(S.UNIMPLEMENTED), target="h:1", method="Resize")
    assert isinstance(named, Unimplemented)
    assert (named.target, named.method) == ("h:1", "Resize")
    assert named.message == (
        "the server at h:1 does not serve tierdisk.v1.BlockDevice, or is too old for Resize "
        "(UNIMPLEMENTED: unimplemented)"
    )


def test_sync_style_rpc_error_maps_too() -> None:
    class SyncError(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return S.FAILED_PRECONDITION

        def details(self) -> str:
            return "read-only"

        # grpc-stubs types the entries as its _Metadatum class; real sync errors give
        # (key, value) tuples, which is what this stands in for.
        def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:  # type: ignore[override]
            return (("other", b"x"), ("tierdisk-error", b"ReadOnlyError"))

    err = error_from_rpc(SyncError())
    assert type(err) is ReadOnlyVolume
    assert err.message == "read-only"


def test_client_side_errors_carry_the_code_the_server_would_use() -> None:
    assert InvalidArgument("x").code == S.INVALID_ARGUMENT
    assert ReadOnlyVolume("x").code == S.FAILED_PRECONDITION
    assert DataLoss("x").code == S.DATA_LOSS
