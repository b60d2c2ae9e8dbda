"""The per-connection budget of large Read replies (service/reply_budget.py): unit tests of
its accounting, and a real server whose client stops reading its replies."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from servers import ServerProcess, toml_volume, write_config

from tierdisk.service.errors import Unavailable
from tierdisk.service.reply_budget import BUDGETED_FROM_BYTES, READ_BUDGET_BYTES, ReplyBudgets
from tierdisk.v1 import blockdevice_pb2 as pb
from tierdisk.v1 import blockdevice_pb2_grpc as pb_grpc

MiB = 1 << 20
A, B = "ipv4:127.0.0.1:50001", "ipv6:[::1]:50002"  # two TCP connections, as gRPC names them


async def _spin() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_takes_up_to_the_limit_then_waits_in_order() -> None:
    budgets = ReplyBudgets(limit=10)
    first = await budgets.take(A, 6)
    second = await budgets.take(A, 2)
    assert budgets.in_flight(A) == 8
    third = asyncio.create_task(budgets.take(A, 5))
    await _spin()
    fourth = asyncio.create_task(budgets.take(A, 1))  # would fit, but does not overtake
    other = await budgets.take(B, 10)  # another connection has its own budget
    await _spin()
    assert not third.done() and not fourth.done()
    first()
    await _spin()
    assert third.done() and fourth.done() and budgets.in_flight(A) == 8
    for release in (second, third.result(), fourth.result(), other):
        release()
    assert budgets.in_flight(A) == budgets.in_flight(B) == 0


async def test_a_reply_larger_than_the_budget_goes_alone() -> None:
    budgets = ReplyBudgets(limit=10)
    small = await budgets.take(A, 1)
    big = asyncio.create_task(budgets.take(A, 25))
    await _spin()
    assert not big.done()
    small()
    release = await big
    assert budgets.in_flight(A) == 25
    release()
    assert budgets.in_flight(A) == 0


async def test_a_cancelled_wait_takes_nothing_and_lets_the_next_one_in() -> None:
    budgets = ReplyBudgets(limit=10)
    held = await budgets.take(A, 8)
    big = asyncio.create_task(budgets.take(A, 9))
    small = asyncio.create_task(budgets.take(A, 2))
    await _spin()
    big.cancel()
    await _spin()
    assert small.done() and budgets.in_flight(A) == 10
    held()
    small.result()()
    assert budgets.in_flight(A) == 0


async def test_a_wait_cancelled_as_room_frees_ends_cancelled_and_takes_nothing() -> None:
    """The wait is cancelled, and room frees, in the same loop turn: the reply still ends
    ``CancelledError`` (it raised ``ValueError``: the wake had dropped its entry), and holds
    no budget."""
    budgets = ReplyBudgets(limit=100)
    held = await budgets.take(A, 100)
    waiting = asyncio.create_task(budgets.take(A, 50))
    await _spin()
    waiting.cancel()
    held()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert budgets.in_flight(A) == 0


async def test_a_wait_granted_as_it_is_cancelled_gives_the_budget_back() -> None:
    """Room frees first, then the wait is cancelled before it runs: what was granted is
    given back, so later large replies of the connection are not held up for ever."""
    budgets = ReplyBudgets(limit=100)
    held = await budgets.take(A, 100)
    waiting = asyncio.create_task(budgets.take(A, 50))
    await _spin()
    held()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert budgets.in_flight(A) == 0
    release = await asyncio.wait_for(budgets.take(A, 100), 1)  # the whole budget is there
    release()


async def test_no_entry_is_kept_for_idle_connections() -> None:
    budgets = ReplyBudgets(limit=10)
    releases = [await budgets.take(peer, 4) for peer in (A, B, "ipv4:127.0.0.1:50003")]
    waiting = asyncio.create_task(budgets.take(A, 8))
    await _spin()
    assert budgets.connections == 3
    for release in releases:
        release()
    (await waiting)()
    assert budgets.connections == 0


async def test_once_closed_the_waiting_and_any_that_would_wait_are_refused() -> None:
    """As the server stops: a Read waiting for room has read nothing, and its client, which
    does not take its replies, would hold the drain for all of its grace."""
    budgets = ReplyBudgets(limit=10)
    held = await budgets.take(A, 8)
    waiting = asyncio.create_task(budgets.take(A, 5))
    await _spin()
    budgets.close()
    with pytest.raises(Unavailable, match="shutting down"):
        await waiting
    with pytest.raises(Unavailable, match="shutting down"):
        await budgets.take(A, 5)
    fits = await budgets.take(B, 10)  # one that needs no wait still goes
    assert budgets.in_flight(A) == 8 and budgets.in_flight(B) == 10
    held()
    fits()
    assert budgets.in_flight(A) == budgets.in_flight(B) == 0 and budgets.connections == 0


async def test_the_documented_limits() -> None:
    """README: Read replies of 64 KiB and more are bounded to 64 MiB per connection."""
    assert READ_BUDGET_BYTES == 64 << 20
    assert BUDGETED_FROM_BYTES == 64 << 10


async def test_unix_socket_peers_are_not_counted() -> None:
    """gRPC names every client of a unix socket ``unix:``: one budget would let a stalled
    client hold up all the others, so they are not counted."""
    budgets = ReplyBudgets(limit=10)
    releases = [await budgets.take("unix:", 8) for _ in range(3)]
    assert budgets.in_flight("unix:") == 0
    for release in releases:
        release()


STALLED_CLIENT = r"""
import sys, time, grpc
from tierdisk.v1 import blockdevice_pb2 as pb, blockdevice_pb2_grpc as pbg
options = [("grpc.max_receive_message_length", 64 << 20)]
channel = grpc.insecure_channel(sys.argv[1], options=options)
stub = pbg.BlockDeviceStub(channel)
count = int(sys.argv[3]) if len(sys.argv) > 3 else 32768
calls = [stub.Read.future(pb.ReadRequest(volume="v", sector=0, sector_count=count))
         for _ in range(int(sys.argv[2]))]
print("sent", flush=True)
time.sleep(60)
"""


@contextlib.contextmanager
def stalled_client(address: str, *args: str) -> Iterator[None]:
    """A client (STALLED_CLIENT with ``args``) that sends its Reads, then is stopped
    (SIGSTOP) before it reads a reply; killed when the block ends."""
    client = subprocess.Popen(
        [sys.executable, "-c", STALLED_CLIENT, address, *args], stdout=subprocess.PIPE
    )
    try:
        assert client.stdout is not None and client.stdout.readline() == b"sent\n"
        time.sleep(0.5)
        os.kill(client.pid, signal.SIGSTOP)
        yield
    finally:
        client.kill()
        client.wait()


def _peak_rss_mib(pid: int) -> float:
    """The most RSS of process ``pid`` over 2 s (by then a server has made every reply it
    is going to)."""
    peak = 0.0
    for _ in range(10):
        time.sleep(0.2)
        peak = max(peak, _rss_mib(pid))
    return peak


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_client_that_stops_reading_pins_only_its_budget(tmp_path: Path) -> None:
    """48 Reads of 16 MiB whose client is stopped right after sending them: the server
    keeps about one budget of replies (64 MiB) plus one reply, not all 768 MiB, still
    serves other clients, and gives the budget back when that client goes away."""
    layer = {"kind": "ram", "size": "64MiB"}
    config = write_config(tmp_path, toml_volume("v", layer))
    with ServerProcess.start(tmp_path, config) as srv:
        before = _rss_mib(srv.pid)
        with stalled_client(srv.grpc, "48"):
            peak = _peak_rss_mib(srv.pid)
            assert peak - before < (READ_BUDGET_BYTES + 16 * MiB) / MiB + 150, (before, peak)
            with grpc.insecure_channel(srv.grpc) as channel:
                reply = pb_grpc.BlockDeviceStub(channel).GetVolume(
                    pb.GetVolumeRequest(volume="v"), timeout=5
                )
                assert reply.sector_count == 64 * MiB // 512
        options = [("grpc.max_receive_message_length", 64 << 20)]
        with grpc.insecure_channel(srv.grpc, options=options) as channel:
            stub = pb_grpc.BlockDeviceStub(channel)
            request = pb.ReadRequest(volume="v", sector=0, sector_count=32768)
            for _ in range(8):  # 128 MiB through a new connection: nothing left pinned
                assert len(stub.Read(request, timeout=10).data) == 16 * MiB


@pytest.mark.parametrize("sectors", [510, 128])
def test_a_client_that_stops_reading_smaller_replies_pins_only_its_budget(
    tmp_path: Path, sectors: int
) -> None:
    """8,000 Reads of 255 KiB or of 64 KiB whose client stops right after sending them: gRPC
    keeps a finished reply until the client takes it, and the budget bounds them too, so the
    server pins about one budget's worth (held twice), not 0.5-2 GiB (replies under 256 KiB
    were not counted)."""
    layer = {"kind": "ram", "size": "64MiB"}
    config = write_config(tmp_path, toml_volume("v", layer))
    with ServerProcess.start(tmp_path, config) as srv:
        before = _rss_mib(srv.pid)
        with stalled_client(srv.grpc, "8000", str(sectors)):
            peak = _peak_rss_mib(srv.pid)
            assert peak - before < 2 * READ_BUDGET_BYTES / MiB + 150, (before, peak)


def test_a_stop_does_not_wait_for_reads_a_stalled_client_left_waiting(tmp_path: Path) -> None:
    """Reads waiting for room in a stalled client's budget are refused as the stop begins:
    the stop drains at once and stays clean (the next start keeps the write verifiers and
    does not warn of an unclean stop), instead of waiting out ``--grace`` and renewing every
    volume's verifier as if writes might be lost."""
    layer = {"kind": "sparse", "path": str(tmp_path / "v.sparse"), "size": "64MiB"}
    config = write_config(tmp_path, toml_volume("v", layer))
    with ServerProcess.start(tmp_path, config, "--grace", "8") as srv:  # (< TCP timeout)
        with stalled_client(srv.grpc, "1024", "2048"):
            time.sleep(0.5)
            assert srv.terminate() == 0
            assert "still in flight" not in srv.stderr_text()  # (it waited out --grace)
    with ServerProcess.start(tmp_path, config) as srv:
        assert srv.terminate() == 0
        assert "did not stop cleanly" not in srv.stderr_text()


pytestmark = pytest.mark.timeout(90)
