"""The log of storage failures (service/failure_log.py): what is logged, rate limits, and a
server whose layer's disk fails under a gRPC and an NBD write."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import grpc
import pytest
from nbd_raw import CMD_WRITE, Raw
from servers import running_server

from tierdisk.service.errors import (
    DataCorruption,
    NoSpace,
    OutOfRange,
    StorageError,
    Unavailable,
)
from tierdisk.service.failure_log import StorageFailureLog, is_storage_failure
from tierdisk.service.layers import raw as raw_module
from tierdisk.v1 import blockdevice_pb2 as pb
from tierdisk.v1 import blockdevice_pb2_grpc as pb_grpc

LOGGER = "tierdisk.test.failures"


def _lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER]


def test_storage_failures_are_told_from_errors_of_the_request() -> None:
    assert is_storage_failure(StorageError("x"))
    assert is_storage_failure(DataCorruption("x"))
    assert is_storage_failure(NoSpace("x"))
    assert is_storage_failure(OSError(errno.EIO, "Input/output error"))
    assert not is_storage_failure(OutOfRange("x"))
    assert not is_storage_failure(Unavailable("a remote tier is down"))


def test_a_storage_failure_is_logged_with_volume_request_status_and_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures = StorageFailureLog(logging.getLogger(LOGGER))
    with caplog.at_level(logging.ERROR, LOGGER):
        failures.note("vm1", "gRPC write", "INTERNAL", StorageError("writing raw layer d: EIO"))
        failures.note("vm1", "gRPC read", "OUT_OF_RANGE", OutOfRange("past the end"))
    (line,) = _lines(caplog)
    assert line.levelno == logging.ERROR and line.exc_info is None
    assert (
        line.getMessage() == "volume 'vm1': gRPC write failed (INTERNAL): writing raw layer d: EIO"
    )


def test_repeats_are_held_back_per_volume_request_and_kind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Reads and writes failing in turn (a dying disk under traffic) are each limited: one
    line each per interval, not one per request."""
    failures = StorageFailureLog(logging.getLogger(LOGGER), interval=60)
    with caplog.at_level(logging.ERROR, LOGGER):
        for _ in range(5):
            failures.note("a", "NBD write", "INTERNAL", StorageError("EIO"))
            failures.note("a", "NBD read", "INTERNAL", StorageError("EIO"))
        failures.note("b", "NBD write", "INTERNAL", StorageError("EIO"))  # another volume
        failures.note("a", "NBD write", "RESOURCE_EXHAUSTED", NoSpace("full"))  # a new kind
    messages = [r.getMessage() for r in _lines(caplog)]
    assert messages == [
        "volume 'a': NBD write failed (INTERNAL): EIO",
        "volume 'a': NBD read failed (INTERNAL): EIO",
        "volume 'b': NBD write failed (INTERNAL): EIO",
        "volume 'a': NBD write failed (RESOURCE_EXHAUSTED): full",
    ]


def test_a_line_held_back_keeps_its_text_not_the_error() -> None:
    """A failure held back (told when its interval ends) keeps the line's text only: the
    error, and with it the frames of its traceback and every request they hold (a write's
    data), goes as soon as the request is answered."""
    freed: list[str] = []

    class Tracked(StorageError):
        def __del__(self) -> None:
            freed.append(str(self))

    failures = StorageFailureLog(logging.getLogger(LOGGER), interval=60)
    failures.note("a", "gRPC write", "INTERNAL", Tracked("first"))  # logged (pytest keeps it)
    failures.note("a", "gRPC write", "INTERNAL", Tracked("held"))  # held back
    assert freed == ["held"]


def test_an_oserror_no_layer_turned_into_a_domain_error_keeps_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures = StorageFailureLog(logging.getLogger(LOGGER))
    with caplog.at_level(logging.ERROR, LOGGER):
        try:
            raise OSError(errno.EIO, "Input/output error")
        except OSError as exc:
            failures.note("v", "gRPC flush", "INTERNAL", exc)
    (line,) = _lines(caplog)
    assert line.exc_info is not None and line.exc_info[0] is OSError


async def test_a_failing_disk_is_named_in_the_server_log_for_grpc_and_nbd_writes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client sees only INTERNAL (gRPC) or EIO (NBD); the log says which volume, which
    request and the error with the layer's file."""
    body = (
        f'[server]\nlisten = "127.0.0.1:0"\nmetrics = ""\nnbd = "127.0.0.1:0"\n'
        f'data_dir = "{tmp_path / "data"}"\n'
        '[[volumes]]\nname = "disk"\n  [[volumes.layers]]\n  kind = "raw"\n'
        '  path = "disk.img"\n  size = "1MiB"\n'
    )

    def failing_disk(fd: int, data: memoryview, offset: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    async with running_server(tmp_path, body) as server:
        monkeypatch.setattr(raw_module, "pwrite_all", failing_disk)
        with caplog.at_level(logging.ERROR, "tierdisk.service"):
            async with grpc.aio.insecure_channel(server.grpc_address) as channel:
                stub = pb_grpc.BlockDeviceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Write(pb.WriteRequest(volume="disk", sector=0, data=bytes(512)))
                assert info.value.code() == grpc.StatusCode.INTERNAL
            client = await Raw.open(server.nbd_address)
            await client.go("disk")
            with pytest.raises(AssertionError):  # the reply carries EIO (5), not 0
                await client.request(CMD_WRITE, 0, 512, bytes(512))
            await client.close()
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    path = tmp_path / "data" / "disk.img"
    assert f"volume 'disk': gRPC write failed (INTERNAL): writing {path}: Input/output error" in (
        lines
    ), lines
    assert f"volume 'disk': NBD write failed (INTERNAL): writing {path}: Input/output error" in (
        lines
    ), lines
