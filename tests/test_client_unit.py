"""The client library without a tierdisk server: the error table, chunk planning, the retry
schedule, the concurrency helpers, the progress bar, malloc tuning, the dependency
direction — and the client's wire behaviour (request sizes, requests in flight, metadata,
pagination, retries) against a small scripted BlockDevice servicer on 127.0.0.1 port 0."""

from __future__ import annotations

import ast
import asyncio
import io
import itertools
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NoReturn

import grpc
import grpc.aio
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tierdisk.client as client_pkg
from tierdisk.client import (
    AsyncClient,
    Cancelled,
    Client,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NoSpace,
    NotSupported,
    OutOfRange,
    PermissionDenied,
    ReadOnlyVolume,
    ReadResult,
    RetryPolicy,
    StorageError,
    TierdiskError,
    Unauthenticated,
    Unavailable,
    UnmapBehavior,
    VolumeInfo,
    VolumeNotFound,
    error_from_rpc,
    install_uvloop,
    tune_malloc,
)
from tierdisk.client.chunking import (
    Chunk,
    ReadWindow,
    merge_extents,
    plan_chunks,
    plan_windows,
    run_bounded,
    run_ordered,
    sectors_per_chunk,
)
from tierdisk.client.errors import AllocationTooLarge, Unimplemented
from tierdisk.client.models import Extent
from tierdisk.client.progress import Progress, format_bytes, format_duration
from tierdisk.client.retry import call_with_retry
from tierdisk.v1 import blockdevice_pb2 as pb
from tierdisk.v1 import blockdevice_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
S = grpc.StatusCode


def rpc_error(code: grpc.StatusCode, details: str = "", server_error: str | None = None) -> Any:
    trailing = grpc.aio.Metadata()
    if server_error is not None:
        trailing.add("tierdisk-error", server_error)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details)


# -- the error table ---------------------------------------------------------------------


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


# -- chunk planning ----------------------------------------------------------------------


def test_sectors_per_chunk() -> None:
    assert sectors_per_chunk(1 << 20, 512) == 2048
    assert sectors_per_chunk(1 << 20, 4096) == 256
    assert sectors_per_chunk(1000, 512) == 1  # never zero: one sector at least
    assert sectors_per_chunk(100, 4096) == 1
    with pytest.raises(ValueError):
        sectors_per_chunk(1 << 20, 0)


def test_plan_chunks_examples() -> None:
    assert list(plan_chunks(10, 0, 4)) == []
    assert list(plan_chunks(10, 4, 4)) == [Chunk(10, 4, 0)]
    assert list(plan_chunks(10, 9, 4)) == [Chunk(10, 4, 0), Chunk(14, 4, 4), Chunk(18, 1, 8)]
    with pytest.raises(ValueError):
        list(plan_chunks(0, 1, 0))


@given(
    sector=st.integers(0, 1 << 40),
    count=st.integers(0, 5000),
    max_sectors=st.integers(1, 700),
)
def test_plan_chunks_cover_the_range_exactly(sector: int, count: int, max_sectors: int) -> None:
    chunks = list(plan_chunks(sector, count, max_sectors))
    assert sum(c.sector_count for c in chunks) == count
    expected_sector, expected_offset = sector, 0
    for c in chunks:
        assert 0 < c.sector_count <= max_sectors
        assert c.sector == expected_sector and c.offset == expected_offset
        expected_sector += c.sector_count
        expected_offset += c.sector_count
    # only the last chunk may be short
    assert all(c.sector_count == max_sectors for c in chunks[:-1])


def test_plan_windows_examples() -> None:
    assert list(plan_windows([], 8, 2)) == []
    # close runs share a window; a far one starts another; a long one is split
    assert list(plan_windows([(0, 1), (3, 4), (10, 12), (20, 37)], 8, 2)) == [
        ReadWindow(0, 4, ((0, 1), (3, 4))),
        ReadWindow(10, 2, ((10, 12),)),
        ReadWindow(20, 8, ((20, 28),)),
        ReadWindow(28, 8, ((28, 36),)),
        ReadWindow(36, 1, ((36, 37),)),
    ]
    # a window never passes max_sectors, even when the next run is close
    assert list(plan_windows([(0, 6), (7, 10)], 8, 2)) == [
        ReadWindow(0, 8, ((0, 6), (7, 8))),
        ReadWindow(8, 2, ((8, 10),)),
    ]
    with pytest.raises(ValueError):
        list(plan_windows([(0, 1)], 0, 0))


@given(
    cuts=st.lists(st.integers(0, 10_000), unique=True, max_size=40),
    max_sectors=st.integers(1, 300),
    max_gap=st.integers(0, 50),
)
def test_plan_windows_cover_the_runs_exactly(
    cuts: list[int], max_sectors: int, max_gap: int
) -> None:
    edges = sorted(cuts)
    runs = list(zip(edges[0::2], edges[1::2], strict=False))
    windows = list(plan_windows(runs, max_sectors, max_gap))
    inside = [run for w in windows for run in w.runs]
    assert merge_extents(Extent(a, b - a) for a, b in inside) == merge_extents(
        Extent(a, b - a) for a, b in runs
    )
    for w in windows:
        assert 0 < w.sector_count <= max_sectors
        assert w.runs[0][0] == w.sector and w.runs[-1][1] == w.sector + w.sector_count
        assert all(b - a <= max_gap for (_, a), (b, _) in itertools.pairwise(w.runs))
    assert all(a.sector + a.sector_count <= b.sector for a, b in itertools.pairwise(windows))


def test_plan_chunks_is_lazy_for_huge_ranges() -> None:
    it = plan_chunks(0, 1 << 50, 2048)
    assert next(it) == Chunk(0, 2048, 0)


def test_merge_extents_joins_runs_meeting_at_chunk_boundaries() -> None:
    runs = [Extent(4, 4), Extent(0, 4), Extent(8, 2), Extent(20, 5), Extent(22, 1), Extent(30, 0)]
    assert merge_extents(runs) == [Extent(0, 10), Extent(20, 5)]
    assert merge_extents([]) == []


# -- retry schedule ----------------------------------------------------------------------


def test_backoff_ceiling_doubles_up_to_the_cap() -> None:
    policy = RetryPolicy(retries=10, backoff=0.05, max_backoff=2.0)
    assert [policy.ceiling(n) for n in range(7)] == pytest.approx(
        [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0]
    )
    assert policy.ceiling(10_000) == 2.0  # no overflow
    assert policy.delay(3, rng=lambda: 0.0) == 0.0
    assert policy.delay(3, rng=lambda: 0.5) == pytest.approx(0.2)


@given(
    attempt=st.integers(0, 200),
    backoff=st.floats(0, 10),
    cap=st.floats(0, 60),
    r=st.floats(0, 1, exclude_max=True),
)
def test_backoff_delay_stays_within_full_jitter_bounds(
    attempt: int, backoff: float, cap: float, r: float
) -> None:
    policy = RetryPolicy(retries=3, backoff=backoff, max_backoff=cap)
    delay = policy.delay(attempt, rng=lambda: r)
    assert 0.0 <= delay <= min(cap, backoff * 2.0 ** min(attempt, 64))


def test_retry_policy_refuses_negative_values() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(retries=-1)
    with pytest.raises(ValueError):
        RetryPolicy(backoff=-0.1)


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


async def test_retries_unavailable_then_succeeds() -> None:
    t = FakeTime()
    remaining: list[float | None] = []

    async def attempt(left: float | None) -> str:
        remaining.append(left)
        t.now += 1.0  # each attempt takes a second
        if len(remaining) < 3:
            raise rpc_error(S.UNAVAILABLE, "down")
        return "ok"

    policy = RetryPolicy(retries=3, backoff=0.5, max_backoff=10)
    result = await call_with_retry(
        attempt, policy=policy, timeout=30, clock=t.clock, sleep=t.sleep, rng=lambda: 1.0
    )
    assert result == "ok"
    assert t.sleeps == [0.5, 1.0]
    # every attempt gets what is left of the one deadline
    assert remaining == pytest.approx([30.0, 28.5, 26.5])


async def test_retries_run_out_and_raise_unavailable() -> None:
    t = FakeTime()
    calls = 0

    async def attempt(left: float | None) -> None:
        nonlocal calls
        calls += 1
        raise rpc_error(S.UNAVAILABLE, "down")

    with pytest.raises(Unavailable, match="down") as info:
        await call_with_retry(
            attempt,
            policy=RetryPolicy(retries=2),
            timeout=None,
            volume="v",
            clock=t.clock,
            sleep=t.sleep,
        )
    assert calls == 3
    assert info.value.volume == "v"


@pytest.mark.parametrize("code", [S.NOT_FOUND, S.INTERNAL, S.DEADLINE_EXCEEDED])
async def test_other_codes_are_not_retried(code: grpc.StatusCode) -> None:
    calls = 0

    async def attempt(left: float | None) -> None:
        nonlocal calls
        calls += 1
        raise rpc_error(code)

    with pytest.raises(TierdiskError) as info:
        await call_with_retry(attempt, policy=RetryPolicy(retries=5), timeout=1)
    assert calls == 1
    assert info.value.code == code


async def test_cancelled_is_retried_like_unavailable() -> None:
    # CANCELLED as an RpcError comes from the peer (a server shutting down, a channel
    # overloaded); a local cancellation is asyncio.CancelledError. Same schedule as UNAVAILABLE.
    t = FakeTime()
    calls = 0

    async def attempt(left: float | None) -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise rpc_error(S.CANCELLED if calls == 1 else S.UNAVAILABLE)
        return "ok"

    policy = RetryPolicy(retries=3, backoff=0.5, max_backoff=10)
    result = await call_with_retry(
        attempt, policy=policy, timeout=30, clock=t.clock, sleep=t.sleep, rng=lambda: 1.0
    )
    assert (result, calls, t.sleeps) == ("ok", 3, [0.5, 1.0])

    async def always_cancelled(left: float | None) -> None:
        raise rpc_error(S.CANCELLED, "shutting down")

    with pytest.raises(Cancelled, match="shutting down"):
        await call_with_retry(
            always_cancelled, policy=RetryPolicy(retries=2), timeout=None, sleep=t.sleep
        )


def test_default_policy_rides_through_a_two_second_restart() -> None:
    policy = RetryPolicy()
    assert (policy.retries, policy.backoff, policy.max_backoff) == (8, 0.1, 2.0)
    ceilings = [policy.ceiling(n) for n in range(policy.retries)]
    assert ceilings == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0])
    # full jitter: the expected total wait is half the ceilings' sum, ~4.5 s, twice a 2 s
    # restart; and with every draw at the 25th percentile the waits still cover 2 s
    assert sum(ceilings) / 2 > 2 * 2.0
    assert sum(ceilings) / 4 > 2.0
    client = AsyncClient.__init__.__kwdefaults__ or {}
    assert (client["retries"], client["backoff"], client["max_backoff"]) == (8, 0.1, 2.0)


async def test_retries_stop_where_the_wait_would_cross_the_deadline() -> None:
    t = FakeTime()
    calls = 0

    async def attempt(left: float | None) -> None:
        nonlocal calls
        calls += 1
        t.now += 0.4
        raise rpc_error(S.UNAVAILABLE, "down")

    policy = RetryPolicy(retries=100, backoff=0.5, max_backoff=0.5)
    with pytest.raises(Unavailable):
        await call_with_retry(
            attempt, policy=policy, timeout=2.0, clock=t.clock, sleep=t.sleep, rng=lambda: 1.0
        )
    # 0.4 + 0.5 + 0.4 + 0.5 + 0.4 = 2.2 > 2: the third wait would cross the deadline
    assert calls == 3
    assert t.now - 100.0 <= 2.0 + 0.4


# -- bounded concurrency ---------------------------------------------------------------


async def test_run_bounded_limits_calls_in_flight_and_does_every_item() -> None:
    active = peak = 0
    done: list[int] = []

    async def fn(i: int) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.001 * (i % 3))
        active -= 1
        done.append(i)

    await run_bounded(range(50), fn, 4)
    assert sorted(done) == list(range(50))
    assert peak == 4


async def test_run_bounded_raises_the_first_failure_and_cancels_the_rest() -> None:
    started: list[int] = []
    cancelled: list[int] = []

    async def fn(i: int) -> None:
        started.append(i)
        if i == 2:
            raise OutOfRange("boom")
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(i)
            raise

    with pytest.raises(OutOfRange, match="boom"):
        await asyncio.wait_for(run_bounded(range(100), fn, 4), 5)
    assert len(started) <= 4 + 1
    assert sorted(cancelled) == [i for i in started if i != 2]


async def test_run_ordered_keeps_order_and_limit() -> None:
    active = peak = 0

    async def fn(i: int) -> int:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.002 * ((7 * i) % 5))
        active -= 1
        return i * i

    got = [(i, r) async for i, r in run_ordered(range(30), fn, 4)]
    assert got == [(i, i * i) for i in range(30)]
    assert peak <= 4


async def test_run_ordered_closed_early_cancels_work_in_flight() -> None:
    cancelled = 0

    async def fn(i: int) -> int:
        nonlocal cancelled
        try:
            await asyncio.sleep(0 if i == 0 else 10)
        except asyncio.CancelledError:
            cancelled += 1
            raise
        return i

    gen = run_ordered(range(100), fn, 4)
    assert await anext(gen) == (0, 0)
    await gen.aclose()
    assert cancelled == 3


# -- models ----------------------------------------------------------------------------


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


# -- progress bar ------------------------------------------------------------------------


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_on_a_tty_at_most_ten_times_a_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    now = [0.0]
    out = Tty()
    bar = Progress(100 << 20, label="import vm1", stream=out, clock=lambda: now[0])
    for _ in range(100):  # 100 updates within 50 ms: one draw
        now[0] += 0.0005
        bar.advance(1 << 20)
    assert out.getvalue().count("\r") == 1
    now[0] = 10.0
    bar.advance(0)
    bar.close()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n")
    last = text.rstrip("\n").split("\r")[-1]
    assert "import vm1" in last and "100%" in last and "100.0 MiB / 100.0 MiB" in last
    assert "10.0 MiB/s" in last and "ETA 0:00" in last


def test_progress_shows_rate_and_eta_midway() -> None:
    bar = Progress(100 << 20, stream=Tty(), clock=lambda: 0.0)
    bar.done = 25 << 20
    text = bar.render(now=5.0)
    assert " 25%" in text and "5.0 MiB/s" in text and "ETA 0:15" in text


def test_progress_is_silent_off_a_terminal() -> None:
    out = io.StringIO()
    with Progress(10, stream=out) as bar:
        bar.advance(10)
    assert out.getvalue() == ""


def test_formatting_helpers() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 << 30) == "3.0 GiB"
    assert format_duration(7) == "0:07"
    assert format_duration(3725) == "1:02:05"


# -- tuning ----------------------------------------------------------------------------


def test_tune_malloc_applies_on_glibc() -> None:
    import platform

    expected = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert tune_malloc() is expected
    assert tune_malloc() is expected  # idempotent


def test_install_uvloop_sets_the_policy_when_available() -> None:
    before = asyncio.get_event_loop_policy()
    try:
        installed = install_uvloop()
        try:
            import uvloop  # noqa: F401
        except ImportError:
            assert installed is False
        else:
            assert installed is True
            assert type(asyncio.get_event_loop_policy()).__module__.startswith("uvloop")
    finally:
        asyncio.set_event_loop_policy(before)


# -- package shape ---------------------------------------------------------------------


def test_all_is_explicit_and_resolves() -> None:
    assert len(set(client_pkg.__all__)) == len(client_pkg.__all__)
    for name in client_pkg.__all__:
        assert hasattr(client_pkg, name), name
    assert (ROOT / "client" / "py.typed").exists()


def test_client_never_imports_the_server() -> None:
    """DESIGN §1: tierdisk.client depends only on tierdisk.v1 and grpc."""
    for path in (ROOT / "client").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
                if node.level:
                    assert node.module != "service", path
            for name in names:
                assert not name.startswith("tierdisk.service"), f"{path.name} imports {name}"
    code = (
        "import sys, tierdisk.client, tierdisk.client.cli, tierdisk.client.sync;"
        "print(sorted(m for m in sys.modules if m.startswith('tierdisk.service')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


# -- wire behaviour against a scripted servicer ------------------------------------------


class Scripted(pb_grpc.BlockDeviceServicer):
    """A tiny in-memory BlockDevice that records what the client sends."""

    def __init__(self, sector_size: int = 512, sectors: int = 4096) -> None:
        self.sector_size = sector_size
        self.disk = bytearray(sector_size * sectors)
        self.present: set[int] = set()
        self.requests: list[tuple[str, int, int]] = []  # (rpc, sector, sectors)
        self.metadata: list[dict[str, str]] = []
        self.active = self.peak = 0
        self.fail_next: list[tuple[grpc.StatusCode, str | None]] = []
        self.volumes = [f"v{i}" for i in range(5)]

    async def _enter(self, context: Any, rpc: str, sector: int = 0, count: int = 0) -> None:
        self.requests.append((rpc, sector, count))
        self.metadata.append({k: str(v) for k, v in context.invocation_metadata() or ()})
        if self.fail_next:
            code, name = self.fail_next.pop(0)
            trailing = (("tierdisk-error", name),) if name else ()
            await context.abort(code, f"scripted {code.name}", trailing_metadata=trailing)

    def _volume(self, name: str) -> pb.Volume:
        return pb.Volume(
            name=name,
            sector_size=self.sector_size,
            sector_count=len(self.disk) // self.sector_size,
            unmap_behavior=pb.UNMAP_BEHAVIOR_ZEROES,
        )

    async def ListVolumes(self, request: Any, context: Any) -> pb.ListVolumesResponse:
        await self._enter(context, "ListVolumes")
        start = int(request.page_token or 0)
        page = self.volumes[start : start + 2]
        token = str(start + 2) if start + 2 < len(self.volumes) else ""
        return pb.ListVolumesResponse(
            volumes=[self._volume(n) for n in page], next_page_token=token
        )

    async def GetVolume(self, request: Any, context: Any) -> pb.Volume:
        await self._enter(context, "GetVolume")
        return self._volume(request.volume)

    async def Read(self, request: Any, context: Any) -> pb.ReadResponse:
        await self._enter(context, "Read", request.sector, request.sector_count)
        self.active += 1
        self.peak = max(self.peak, self.active)
        await asyncio.sleep(0.005)
        self.active -= 1
        ss = self.sector_size
        start, end = request.sector * ss, (request.sector + request.sector_count) * ss
        reply = pb.ReadResponse(data=bytes(self.disk[start:end]))
        if request.report_presence:
            for s in range(request.sector, request.sector + request.sector_count):
                if s in self.present:
                    reply.present.add(sector=s, sector_count=1)
        return reply

    async def Write(self, request: Any, context: Any) -> pb.WriteResponse:
        count = len(request.data) // self.sector_size
        await self._enter(context, "Write", request.sector, count)
        self.active += 1
        self.peak = max(self.peak, self.active)
        await asyncio.sleep(0.005)
        self.active -= 1
        start = request.sector * self.sector_size
        self.disk[start : start + len(request.data)] = request.data
        self.present.update(range(request.sector, request.sector + count))
        return pb.WriteResponse()

    async def Inspect(self, request: Any, context: Any) -> pb.InspectResponse:
        await self._enter(context, "Inspect")
        reply = pb.InspectResponse()
        reply.tree.update({"sector_count": 4096, "ratio": 0.5, "layers": [{"index": 0}]})
        return reply

    async def WatchResize(self, request: Any, context: Any) -> AsyncIterator[pb.ResizeEvent]:
        await self._enter(context, "WatchResize")
        for g in range(3):
            yield pb.ResizeEvent(sector_count=100 + g, generation=g)

    # Not scripted: these answer as the generated base class does (UNIMPLEMENTED), but
    # spelled out, since the servicer stub declares every RPC abstract.
    @staticmethod
    def _unscripted(context: Any) -> NoReturn:
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        context.set_details("Method not implemented!")
        raise NotImplementedError("Method not implemented!")

    async def Unmap(self, request: Any, context: Any) -> pb.UnmapResponse:
        self._unscripted(context)

    async def Flush(self, request: Any, context: Any) -> pb.FlushResponse:
        self._unscripted(context)

    async def GetAllocation(self, request: Any, context: Any) -> pb.GetAllocationResponse:
        self._unscripted(context)

    async def Resize(self, request: Any, context: Any) -> pb.Volume:
        self._unscripted(context)


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[Scripted, str]]:
    servicer = Scripted()
    server = grpc.aio.server()
    pb_grpc.add_BlockDeviceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def pattern(n: int) -> bytes:
    return bytes((i * 31 + i // 512) & 0xFF for i in range(n))


async def test_large_io_is_split_into_max_io_chunks_with_four_in_flight(
    scripted: tuple[Scripted, str],
) -> None:
    servicer, target = scripted
    async with AsyncClient(target, max_io=8 * 512) as client:
        vol = client.volume("v")
        data = pattern(100 * 512)
        await vol.write(3, data)
        writes = [r for r in servicer.requests if r[0] == "Write"]
        assert sorted(writes) == sorted(
            ("Write", 3 + 8 * i, min(8, 100 - 8 * i)) for i in range(13)
        )
        assert servicer.peak == 4
        servicer.peak = 0
        got = await vol.read(3, 100)
        assert got == data and isinstance(got, bytes)
        assert servicer.peak == 4
        assert all(r[2] <= 8 for r in servicer.requests if r[0] == "Read")
        # one GetVolume for the sector size (cached afterwards), and one per split request
        # to check its range against the volume's size before any chunk is sent
        assert [r[0] for r in servicer.requests].count("GetVolume") == 3


async def test_read_with_presence_merges_runs_across_chunks(
    scripted: tuple[Scripted, str],
) -> None:
    _servicer, target = scripted
    async with AsyncClient(target, max_io=4 * 512) as client:
        vol = client.volume("v")
        await vol.write(2, pattern(10 * 512))  # sectors 2..12, split 4/4/2
        result = await vol.read(0, 20, report_presence=True)
        assert isinstance(result, ReadResult)
        assert result.present == (Extent(2, 10),)
        assert result.data[2 * 512 : 12 * 512] == pattern(10 * 512)
        small = await vol.read(0, 3, report_presence=True)
        assert small.present == (Extent(2, 1),)


async def test_read_into_and_stream_read(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    async with AsyncClient(target, max_io=4 * 512) as client:
        vol = client.volume("v")
        data = pattern(30 * 512)
        await vol.write(0, data)
        buf = bytearray(30 * 512)
        asked = [r[0] for r in servicer.requests].count("GetVolume")
        await vol.read_into(0, buf)
        assert buf == data
        present = await vol.read_present_into(0, buf)
        assert buf == data and present == [Extent(0, 30)]
        # into a caller's buffer, a split read asks nothing before its chunks
        assert [r[0] for r in servicer.requests].count("GetVolume") == asked
        chunks = [c async for c in vol.stream_read(0, 30)]
        assert [s for s, _ in chunks] == list(range(0, 30, 4))
        assert b"".join(d for _, d in chunks) == data


async def test_byte_helpers_require_alignment(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    async with AsyncClient(target) as client:
        vol = client.volume("v")
        await vol.write_bytes(1024, b"\x07" * 1024)
        assert await vol.read_bytes(1024, 1024) == b"\x07" * 1024
        before = len(servicer.requests)
        for call in (
            vol.read_bytes(100, 512),
            vol.read_bytes(512, 100),
            vol.write_bytes(1, b"\0" * 512),
            vol.write(0, b"\0" * 100),
        ):
            with pytest.raises(InvalidArgument) as info:
                await call
            assert info.value.volume == "v"
        assert len(servicer.requests) == before  # refused without a call


async def test_metadata_token_and_pagination(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    async with AsyncClient(target, metadata=[("tierdisk-hops", "a,b")], token="s3cret") as c:
        names = [v.name for v in await c.list_volumes()]
    assert names == servicer.volumes
    assert [r[0] for r in servicer.requests] == ["ListVolumes"] * 3
    for md in servicer.metadata:
        assert md["tierdisk-hops"] == "a,b"
        assert md["authorization"] == "Bearer s3cret"


async def test_server_errors_map_through_trailing_metadata(
    scripted: tuple[Scripted, str],
) -> None:
    servicer, target = scripted
    async with AsyncClient(target, retries=0) as client:
        vol = client.volume("v")
        await vol.sector_size()
        servicer.fail_next = [(S.FAILED_PRECONDITION, "ReadOnlyError")]
        with pytest.raises(ReadOnlyVolume) as info:
            await vol.write(0, b"\0" * 512)
        assert info.value.volume == "v" and "FAILED_PRECONDITION" in info.value.message
        servicer.fail_next = [(S.NOT_FOUND, None)]
        with pytest.raises(VolumeNotFound):
            await vol.info()


async def test_unavailable_is_retried_then_raised(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    async with AsyncClient(target, retries=2, backoff=0.001) as client:
        vol = client.volume("v")
        servicer.fail_next = [(S.UNAVAILABLE, None)] * 2
        await vol.info()
        assert [r[0] for r in servicer.requests] == ["GetVolume"] * 3
        servicer.fail_next = [(S.UNAVAILABLE, None)] * 3
        with pytest.raises(Unavailable):
            await vol.info()


async def test_cancelled_from_the_server_is_retried_then_raised(
    scripted: tuple[Scripted, str],
) -> None:
    servicer, target = scripted
    async with AsyncClient(target, retries=2, backoff=0.001) as client:
        vol = client.volume("v")
        await vol.write(8, pattern(2 * 512))
        servicer.fail_next = [(S.CANCELLED, None)] * 2
        assert await vol.read(8, 2) == pattern(2 * 512)
        assert [r[0] for r in servicer.requests[-3:]] == ["Read"] * 3
        servicer.fail_next = [(S.CANCELLED, None)]
        await vol.write(10, pattern(512))
        assert [r[0] for r in servicer.requests[-2:]] == ["Write"] * 2
    async with AsyncClient(target, retries=0) as client:
        vol = client.volume("v")
        await vol.sector_size()
        servicer.fail_next = [(S.CANCELLED, None)]
        with pytest.raises(Cancelled) as info:
            await vol.read(8, 2)
        assert info.value.code == S.CANCELLED and info.value.volume == "v"


BAD_NUMBERS: list[tuple[str, Any, str]] = [
    ("read", (-1, 1), "sector"),
    ("read", (0, -1), "count"),
    ("read", (2**64, 1), "sector"),
    ("read", (0, 2**64), "count"),
    ("read_into", (2**64, bytearray(512)), "sector"),
    ("stream_read", (0, 2**64), "count"),
    ("write", (-1, b"\0" * 512), "sector"),
    ("write", (2**64, b"\0" * 512), "sector"),
    ("unmap", (2**64, 1), "sector"),
    ("unmap", (0, 2**64), "count"),
    ("resize", (2**64,), "sector_count"),
    ("resize", (-5,), "sector_count"),
    ("allocation", (2**64, 1), "sector"),
    ("allocation", (0, -1), "count"),
    ("read_bytes", (-512, 512), "offset"),
    ("write_bytes", (2**80, b"\0" * 512), "offset"),
]


async def _call_volume(vol: Any, method: str, args: tuple[Any, ...]) -> None:
    if method == "stream_read":
        async for _ in vol.stream_read(*args):
            pass
    else:
        await getattr(vol, method)(*args)


@pytest.mark.parametrize(("method", "args", "name"), BAD_NUMBERS)
async def test_numbers_no_request_can_carry_are_invalid_arguments(
    scripted: tuple[Scripted, str], method: str, args: tuple[Any, ...], name: str
) -> None:
    servicer, target = scripted
    async with AsyncClient(target, retries=0) as client:
        vol = client.volume("v")
        await vol.sector_size()
        before = len(servicer.requests)
        with pytest.raises(InvalidArgument, match=rf"\b{name}\b") as info:
            await _call_volume(vol, method, args)
        assert info.value.volume == "v"
        assert len(servicer.requests) == before  # refused without a call


@pytest.mark.parametrize(
    ("method", "args", "name"),
    [
        ("read", ("0", 1), "sector"),
        ("read", (0, 1.0), "count"),
        ("write", (True, b"\0" * 512), "sector"),
        ("unmap", (0, None), "count"),
        ("resize", (False,), "sector_count"),
        ("allocation", (b"0", 1), "sector"),
        ("read_bytes", (0, "512"), "length"),
    ],
)
async def test_numbers_of_the_wrong_type_are_type_errors(
    scripted: tuple[Scripted, str], method: str, args: tuple[Any, ...], name: str
) -> None:
    servicer, target = scripted
    async with AsyncClient(target, retries=0) as client:
        vol = client.volume("v")
        await vol.sector_size()
        before = len(servicer.requests)
        with pytest.raises(TypeError, match=rf"\b{name}\b must be an int"):
            await _call_volume(vol, method, args)
        assert len(servicer.requests) == before


@pytest.mark.parametrize("page_size", [-1, 2**32, 2**40])
async def test_list_volumes_page_size_out_of_range(
    scripted: tuple[Scripted, str], page_size: int
) -> None:
    servicer, target = scripted
    async with AsyncClient(target, retries=0) as client:
        with pytest.raises(InvalidArgument, match="page_size"):
            await client.list_volumes(page_size=page_size)
        with pytest.raises(TypeError, match="page_size must be an int"):
            await client.list_volumes(page_size=True)
    assert servicer.requests == []


async def test_a_closed_async_client_says_so(scripted: tuple[Scripted, str]) -> None:
    _, target = scripted
    client = AsyncClient(target)
    vol = client.volume("v")
    await vol.info()
    await client.close()
    for call in (vol.info, lambda: vol.read(0, 1), client.list_volumes):
        with pytest.raises(RuntimeError, match="the client is closed"):
            await call()
    with pytest.raises(RuntimeError, match="the client is closed"):
        await anext(vol.watch_resize())
    await client.close()  # idempotent


async def test_a_failed_chunk_fails_the_whole_write(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    async with AsyncClient(target, retries=0, max_io=512) as client:
        vol = client.volume("v")
        await vol.sector_size()
        servicer.fail_next = [(S.RESOURCE_EXHAUSTED, "NoSpace")]
        with pytest.raises(NoSpace):
            await vol.write(0, pattern(16 * 512))


async def test_inspect_turns_whole_numbers_back_into_ints(
    scripted: tuple[Scripted, str],
) -> None:
    _, target = scripted
    async with AsyncClient(target) as client:
        tree = await client.volume("v").inspect()
    assert tree == {"sector_count": 4096, "ratio": 0.5, "layers": [{"index": 0}]}
    assert isinstance(tree["sector_count"], int)


async def test_watch_resize_yields_events(scripted: tuple[Scripted, str]) -> None:
    _, target = scripted
    async with AsyncClient(target) as client:
        events = [e async for e in client.volume("v").watch_resize()]
    assert [(e.sector_count, e.generation) for e in events] == [(100, 0), (101, 1), (102, 2)]


async def test_blocking_client_has_the_same_methods(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted

    def use() -> tuple[bytes, list[str], list[int]]:
        with Client(target, max_io=4 * 512) as client:
            vol = client.volume("v")
            vol.write(1, pattern(10 * 512))
            data = vol.read(1, 10)
            names = [v.name for v in client.list_volumes()]
            gens = [e.generation for e in vol.watch_resize()]
            with pytest.raises(InvalidArgument):
                vol.read_bytes(3, 512)
        with pytest.raises(RuntimeError):
            client.list_volumes()
        return data, names, gens

    data, names, gens = await asyncio.to_thread(use)  # the servicer runs on this loop
    assert data == pattern(10 * 512)
    assert names == servicer.volumes
    assert gens == [0, 1, 2]


def test_blocking_and_async_volumes_expose_the_same_public_methods() -> None:
    from tierdisk.client import AsyncVolume, Volume

    def public(cls: type) -> set[str]:
        return {n for n in vars(cls) if not n.startswith("_")}

    assert public(AsyncVolume) <= public(Volume) | {"client"}
    assert {"list_volumes", "volume", "close"} <= public(Client)


def test_blocking_client_stops_its_thread_on_close() -> None:
    import threading

    before = {t.name for t in threading.enumerate()}
    client = Client("127.0.0.1:1", timeout=1)
    client.close()
    client.close()  # idempotent
    assert {t.name for t in threading.enumerate()} <= before


@pytest.mark.parametrize("token", ["", "  ", "secret\r"])
async def test_a_token_that_cannot_be_sent_is_refused_at_construction(token: str) -> None:
    """An empty token would send no credential; a control character fails every call:
    either is a ValueError when the client is made, naming the problem, never the token."""
    with pytest.raises(ValueError, match=r"^token (is empty|contains)") as info:
        AsyncClient("127.0.0.1:1", token=token)
    assert "secret" not in str(info.value)
