"""tierdisk's client library: typed async and blocking clients for the BlockDevice API.

    from tierdisk.client import AsyncClient, Client

    async with AsyncClient("127.0.0.1:7400") as client:
        data = await client.volume("vm1").read(0, 8)

    with Client("127.0.0.1:7400") as client:
        client.volume("vm1").write(0, data)

Depends only on :mod:`tierdisk.v1` and grpc, never on the server (DESIGN.md §1). What a
program using the library needs is here; hooks for the server's remote layer and process
tuning (``errors.error_from_rpc``, ``tune.tune_malloc``, ``tune.install_uvloop``,
``tune.batch_grpc_poller``) are in their submodules.

The names below are imported on first use (PEP 562), not with the package: gRPC's C core
reads ``GRPC_VERBOSITY`` once, when grpc is imported, and the ``tierdisk`` command
(:mod:`tierdisk.client.cli`) must set it before that, for its client verbs only.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .aio import AsyncClient, AsyncVolume, ClientOptions
    from .calls import UNSET, CallObserver, MetadataFactory, Timeout
    from .channel import DEFAULT_CHANNEL_OPTIONS
    from .chunking import DEFAULT_IN_FLIGHT, DEFAULT_MAX_IO
    from .errors import (
        AllocationTooLarge,
        Cancelled,
        ClientClosed,
        DataLoss,
        DeadlineExceeded,
        FailedPrecondition,
        Interrupted,
        InvalidArgument,
        MessageTooLarge,
        NoSpace,
        NotSupported,
        OutOfRange,
        PermissionDenied,
        ReadOnlyVolume,
        SectorSizeChanged,
        StorageError,
        TierdiskError,
        TierLoop,
        Unauthenticated,
        Unavailable,
        Unimplemented,
        VolumeNotFound,
        WritesLost,
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
    from .sync import Client, Stream, Volume

__all__ = [
    "DEFAULT_CHANNEL_OPTIONS",
    "DEFAULT_IN_FLIGHT",
    "DEFAULT_MAX_IO",
    "UNSET",
    "AllocationExtent",
    "AllocationTooLarge",
    "AsyncClient",
    "AsyncVolume",
    "CallObserver",
    "Cancelled",
    "Client",
    "ClientClosed",
    "ClientOptions",
    "DataLoss",
    "DeadlineExceeded",
    "Extent",
    "FailedPrecondition",
    "Interrupted",
    "InvalidArgument",
    "MessageTooLarge",
    "MetadataFactory",
    "NoSpace",
    "NotSupported",
    "OutOfRange",
    "PermissionDenied",
    "ReadOnlyVolume",
    "ReadResult",
    "ResizeEvent",
    "RetryPolicy",
    "SectorSizeChanged",
    "StorageError",
    "Stream",
    "TierLoop",
    "TierdiskError",
    "Timeout",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "UnmapBehavior",
    "Volume",
    "VolumeInfo",
    "VolumeNotFound",
    "WritesLost",
]

_DEFINED_IN = {
    "DEFAULT_CHANNEL_OPTIONS": "channel",
    "DEFAULT_IN_FLIGHT": "chunking",
    "DEFAULT_MAX_IO": "chunking",
    "UNSET": "calls",
    "AllocationExtent": "models",
    "AllocationTooLarge": "errors",
    "MessageTooLarge": "errors",
    "AsyncClient": "aio",
    "AsyncVolume": "aio",
    "CallObserver": "calls",
    "Cancelled": "errors",
    "Client": "sync",
    "Stream": "sync",
    "ClientClosed": "errors",
    "ClientOptions": "aio",
    "DataLoss": "errors",
    "DeadlineExceeded": "errors",
    "Extent": "models",
    "FailedPrecondition": "errors",
    "Interrupted": "errors",
    "InvalidArgument": "errors",
    "MetadataFactory": "calls",
    "NoSpace": "errors",
    "NotSupported": "errors",
    "OutOfRange": "errors",
    "PermissionDenied": "errors",
    "ReadOnlyVolume": "errors",
    "ReadResult": "models",
    "ResizeEvent": "models",
    "RetryPolicy": "retry",
    "SectorSizeChanged": "errors",
    "StorageError": "errors",
    "TierLoop": "errors",
    "TierdiskError": "errors",
    "Timeout": "calls",
    "Unauthenticated": "errors",
    "Unavailable": "errors",
    "Unimplemented": "errors",
    "UnmapBehavior": "models",
    "Volume": "sync",
    "VolumeInfo": "models",
    "VolumeNotFound": "errors",
    "WritesLost": "errors",
}
"""The submodule that defines each name of :data:`__all__`."""
_SUBMODULES = frozenset(_DEFINED_IN.values())
"""Those submodules: attributes of the package, as when it imported them all up front."""


def __getattr__(name: str) -> object:
    """A name of :data:`__all__`, or a submodule of :data:`_SUBMODULES`, imported now."""
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)  # now an attribute too
    module = _DEFINED_IN.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBMODULES})
