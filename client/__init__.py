"""tierdisk's client library: typed async and blocking clients for the BlockDevice API.

    from tierdisk.client import AsyncClient, Client

    async with AsyncClient("127.0.0.1:7400") as client:
        data = await client.volume("vm1").read(0, 8)

    with Client("127.0.0.1:7400") as client:
        client.volume("vm1").write(0, data)

Depends only on :mod:`tierdisk.v1` and grpc, never on the server (DESIGN.md §1).
"""

from __future__ import annotations

from .aio import (
    DEFAULT_CHANNEL_OPTIONS,
    UNSET,
    AsyncClient,
    AsyncVolume,
    CallObserver,
    ClientOptions,
    MetadataFactory,
    Timeout,
)
from .chunking import DEFAULT_IN_FLIGHT, DEFAULT_MAX_IO
from .errors import (
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
    VolumeNotFound,
    error_from_rpc,
)
from .models import (
    AllocationExtent,
    Extent,
    ReadResult,
    ResizeEvent,
    UnmapBehavior,
    VolumeInfo,
)
from .retry import RetryPolicy
from .sync import Client, Volume
from .tune import install_uvloop, tune_malloc

__all__ = [
    "DEFAULT_CHANNEL_OPTIONS",
    "DEFAULT_IN_FLIGHT",
    "DEFAULT_MAX_IO",
    "UNSET",
    "AllocationExtent",
    "AsyncClient",
    "AsyncVolume",
    "CallObserver",
    "Cancelled",
    "Client",
    "ClientOptions",
    "DataLoss",
    "DeadlineExceeded",
    "Extent",
    "FailedPrecondition",
    "InvalidArgument",
    "MetadataFactory",
    "NoSpace",
    "NotSupported",
    "OutOfRange",
    "PermissionDenied",
    "ReadOnlyVolume",
    "ReadResult",
    "ResizeEvent",
    "RetryPolicy",
    "StorageError",
    "TierdiskError",
    "Timeout",
    "Unauthenticated",
    "Unavailable",
    "UnmapBehavior",
    "Volume",
    "VolumeInfo",
    "VolumeNotFound",
    "error_from_rpc",
    "install_uvloop",
    "tune_malloc",
]
