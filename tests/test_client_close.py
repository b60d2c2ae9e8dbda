"""Closing a client while its calls are in flight, against a real server: every call cut short
raises (``ClientClosed``) and none returns as if it had completed — a split read does not
hand back a buffer with zeros where chunks were never read, a split write does not report
success for data never sent. Cancelling the caller's own task still raises
``CancelledError``. And a call waiting to retry on a closed client stops at once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from servers import ServerProcess, free_port, ram, running_server, toml_volume, write_config
from waiting import eventually

from tierdisk.client import (
    AsyncClient,
    Client,
    ClientClosed,
    DeadlineExceeded,
    Interrupted,
    TierdiskError,
    Unavailable,
)
from tierdisk.client import calls as calls_module
from tierdisk.service.server import Server
from tierdisk.v1 import blockdevice_pb2 as pb

MiB = 1 << 20
SIZE = 64 * MiB
"""The range each large call moves: 256 chunks at :data:`CHUNK` bytes."""
CHUNK = 256 * 1024
IN_FLIGHT = 4
CLOSE_AFTER = 16
"""Chunk calls that complete before the test closes the client (or cancels the caller)."""
FILL = b"\xab"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with running_server(tmp_path, toml_volume("v", ram("160MiB"))) as srv:
        async with AsyncClient(srv.grpc_address) as c:
            await c.volume("v").write(0, FILL * SIZE)
        yield srv


class Calls:
    """An ``on_call`` hook: counts the client's calls of one RPC that answered OK, and sets
    :attr:`reached` (an asyncio and a threading event) once ``after`` of them have."""

    def __init__(self, rpc: str, after: int, loop: asyncio.AbstractEventLoop | None) -> None:
        self.rpc = rpc
        self.after = after
        self.count = 0
        self.reached = asyncio.Event() if loop is not None else None
        self.reached_thread = threading.Event()
        self.loop = loop

    def __call__(self, rpc: str, code: grpc.StatusCode, seconds: float) -> None:
        if rpc != self.rpc or code != grpc.StatusCode.OK:
            return
        self.count += 1
        if self.count == self.after:
            self.reached_thread.set()
            if self.reached is not None:
                self.reached.set()


def _client(server: Server, calls: Calls) -> AsyncClient:
    return AsyncClient(
        server.grpc_address, max_io=CHUNK, max_in_flight=IN_FLIGHT, on_call=calls, timeout=30
    )


async def _close_when(calls: Calls, client: AsyncClient) -> None:
    assert calls.reached is not None
    await calls.reached.wait()
    await client.close()


@pytest.mark.parametrize("how", ["read", "read_into", "read_present_into"])
async def test_a_large_read_cut_short_by_close_raises(server: Server, how: str) -> None:
    calls = Calls("Read", CLOSE_AFTER, asyncio.get_running_loop())
    client = _client(server, calls)
    vol = client.volume("v")
    await vol.sector_size()
    buf = bytearray(SIZE)
    call: Awaitable[object]
    if how == "read":
        call = vol.read(0, SIZE // 512)
    elif how == "read_into":
        call = vol.read_into(0, buf)
    else:
        call = vol.read_present_into(0, buf)
    closer = asyncio.create_task(_close_when(calls, client))
    with pytest.raises(ClientClosed) as info:
        await call  # before the fix: returned, with zeros where chunks were never read
    await closer
    assert calls.count < SIZE // CHUNK  # it was cut short indeed
    err = info.value
    assert isinstance(err, Unavailable) and isinstance(err, RuntimeError)
    assert err.volume == "v"
    assert "closed" in str(err)
    assert f"of {SIZE} bytes had been read" in str(err)


async def test_a_large_write_cut_short_by_close_raises(server: Server) -> None:
    calls = Calls("Write", CLOSE_AFTER, asyncio.get_running_loop())
    client = _client(server, calls)
    vol = client.volume("v")
    await vol.sector_size()
    at = SIZE // 512 + 2048  # past the data the fixture wrote
    closer = asyncio.create_task(_close_when(calls, client))
    with pytest.raises(ClientClosed, match=f"of {SIZE} bytes had been written"):
        await vol.write(at, b"\xcd" * SIZE)  # before the fix: "succeeded", written in part
    await closer
    assert calls.count < SIZE // CHUNK
    async with AsyncClient(server.grpc_address) as check:  # indeed not all of it is there
        assert await check.volume("v").read(at, SIZE // 512) != b"\xcd" * SIZE


async def test_a_large_write_bytes_cut_short_by_close_raises(server: Server) -> None:
    calls = Calls("Write", CLOSE_AFTER, asyncio.get_running_loop())
    client = _client(server, calls)
    vol = client.volume("v")
    await vol.sector_size()
    closer = asyncio.create_task(_close_when(calls, client))
    with pytest.raises(ClientClosed, match="closed"):
        await vol.write_bytes(SIZE + MiB, b"\xcd" * SIZE)
    await closer
    assert calls.count < SIZE // CHUNK


async def test_cancelling_the_caller_of_a_large_read_raises_cancelled_error(
    server: Server,
) -> None:
    calls = Calls("Read", CLOSE_AFTER, asyncio.get_running_loop())
    async with _client(server, calls) as client:
        vol = client.volume("v")
        task = asyncio.create_task(vol.read(0, SIZE // 512))
        assert calls.reached is not None
        await calls.reached.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()
        stopped_at = calls.count
        assert stopped_at < SIZE // CHUNK
        await asyncio.sleep(0.2)  # negative check: can only pass vacuously, never fail falsely
        assert calls.count <= stopped_at + IN_FLIGHT  # the chunks in flight were cancelled
        # the client is not closed, and still reads right
        assert not client.closed
        assert await vol.read(0, 2 * CHUNK // 512) == FILL * (2 * CHUNK)


async def test_a_stream_read_cut_short_by_close_raises(server: Server) -> None:
    calls = Calls("Read", CLOSE_AFTER, asyncio.get_running_loop())
    client = _client(server, calls)
    got = 0
    closer = asyncio.create_task(_close_when(calls, client))
    with pytest.raises(ClientClosed):  # before the fix: CancelledError
        async for _, data in client.volume("v").stream_read(0, SIZE // 512):
            got += len(data)
    await closer
    assert got < SIZE


async def test_a_watch_cut_short_by_close_raises(server: Server) -> None:
    client = AsyncClient(server.grpc_address)
    events = client.volume("v").watch_resize()
    assert isinstance(events, types.AsyncGeneratorType)
    await anext(events)  # the stream is open, waiting for a resize
    nxt = asyncio.ensure_future(anext(events))
    # The generator is suspended in an await (the stream's next message), not at its yield.
    await eventually("the watch to wait on the stream", lambda: events.ag_await is not None)
    await client.close()
    with pytest.raises(ClientClosed):
        await nxt  # before the fix: CancelledError, though the caller cancelled nothing
    await events.aclose()


async def test_a_call_waiting_to_retry_on_a_closed_client_stops_at_once(tmp_path: Path) -> None:
    # Nothing listens there: every attempt is UNAVAILABLE, retried with waits of up to 5 s,
    # 100 times. Closing the client must end the call at once, not let it retry on.
    client = AsyncClient(
        f"127.0.0.1:{free_port()}", retries=100, backoff=5.0, max_backoff=5.0, timeout=None
    )
    call = asyncio.ensure_future(client.volume("v").info())
    await asyncio.sleep(0.3)  # negative check: can only pass vacuously, never fail falsely
    assert not call.done()
    started = time.monotonic()
    await client.close()
    with pytest.raises(ClientClosed, match="closed"):  # waiting, or in an attempt
        await asyncio.wait_for(call, 5)
    assert time.monotonic() - started < 1.0  # not after the wait it was in


async def test_a_single_call_in_flight_when_closed_raises(tmp_path: Path) -> None:
    config = write_config(tmp_path, toml_volume("v", ram("8MiB")))
    with ServerProcess.start(tmp_path, config) as srv:
        made: list[None] = []  # one per call the client makes, when it makes it

        def count_call() -> tuple[tuple[str, str], ...]:
            made.append(None)
            return ()

        client = AsyncClient(srv.grpc, retries=0, timeout=30, metadata_factory=count_call)
        vol = client.volume("v")
        await vol.sector_size()
        os.kill(srv.pid, signal.SIGSTOP)  # the call stays in flight until we close
        try:
            before = len(made)
            call = asyncio.ensure_future(vol.read(0, 8))
            # The client asks for a call's metadata as it starts the call, and its first
            # wait after that is the call itself: once asked, the read is in flight.
            await eventually("the read to be sent", lambda: len(made) > before)
            assert not call.done()
            await client.close()
            with pytest.raises(ClientClosed, match="in flight") as info:
                await asyncio.wait_for(call, 10)  # before the fix: CancelledError
            assert info.value.volume == "v"
        finally:
            os.kill(srv.pid, signal.SIGCONT)


async def test_a_large_write_to_a_stalled_server_over_a_unix_socket_ends_at_its_deadline(
    tmp_path: Path,
) -> None:
    """gRPC 1.85 lets a large request over a unix socket to a server that stopped reading
    wait past its deadline (over TCP it ends there); the client ends it itself, shortly
    after: ``DeadlineExceeded``, and the next call gets its deadline too."""
    config = write_config(tmp_path, toml_volume("v", ram("8MiB")))
    socket_path = tmp_path / "s.sock"
    with ServerProcess.start(tmp_path, config, listen=f"unix:{socket_path}") as srv:
        async with AsyncClient(f"unix:{socket_path}", retries=0, timeout=1) as client:
            vol = client.volume("v")
            await vol.write(0, bytes(512))
            os.kill(srv.pid, signal.SIGSTOP)
            try:
                with pytest.raises(DeadlineExceeded):
                    await asyncio.wait_for(vol.write(0, bytes(MiB)), 10)  # before: 10 s, then
                with pytest.raises(DeadlineExceeded):  # TimeoutError from wait_for
                    await asyncio.wait_for(vol.flush(), 10)
            finally:
                os.kill(srv.pid, signal.SIGCONT)


# -- the blocking client ---------------------------------------------------------------


def _in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Run ``fn()`` on a daemon thread; its result or exception lands in the list."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


async def test_a_blocking_read_cut_short_by_close_from_another_thread_raises(
    server: Server,
) -> None:
    calls = Calls("Read", CLOSE_AFTER, None)
    client = await asyncio.to_thread(
        Client, server.grpc_address, max_io=CHUNK, max_in_flight=IN_FLIGHT, timeout=30
    )
    client.aio.on_call = calls
    vol = client.volume("v")
    await asyncio.to_thread(vol.sector_size)
    reader, out = _in_thread(lambda: vol.read(0, SIZE // 512))
    assert await asyncio.to_thread(calls.reached_thread.wait, 30)
    await asyncio.to_thread(client.close)
    await asyncio.to_thread(reader.join, 30)
    assert not reader.is_alive()
    assert len(out) == 1
    assert isinstance(out[0], ClientClosed), out[0]  # before the fix: the bytes, part zeros
    with pytest.raises(ClientClosed, match="the client is closed"):
        await asyncio.to_thread(vol.info)


async def test_a_blocking_call_waiting_to_retry_ends_when_closed() -> None:
    client = await asyncio.to_thread(
        Client, f"127.0.0.1:{free_port()}", retries=100, backoff=5.0, max_backoff=5.0
    )
    caller, out = _in_thread(lambda: client.volume("v").info())
    await asyncio.sleep(0.5)
    assert caller.is_alive()
    await asyncio.to_thread(client.close)
    await asyncio.to_thread(caller.join, 10)  # before the fix: waited forever
    assert not caller.is_alive()
    assert len(out) == 1
    assert isinstance(out[0], ClientClosed), out[0]


async def test_a_blocking_watch_closed_from_another_thread_ends_its_loop(server: Server) -> None:
    """One watcher thread per VM disk, stopped from a control thread: ``close()`` of the
    watch there ends the watcher's ``for`` loop (no error), the client still serves, and
    the volume's watches on the server end (its stream was cancelled). Before, the close
    raised ``ValueError: generator already executing`` and the watcher waited on."""
    client = await asyncio.to_thread(Client, server.grpc_address, timeout=30)
    try:
        vol = client.volume("v")
        watch = vol.watch_resize()
        seen: list[int] = []
        first = threading.Event()

        def follow() -> None:
            for event in watch:
                seen.append(event.sector_count)
                first.set()

        watcher, out = _in_thread(follow)
        assert await asyncio.to_thread(first.wait, 10)
        assert len(seen) == 1  # the size now: the watcher waits for the next
        await asyncio.to_thread(watch.close)
        await asyncio.to_thread(watcher.join, 10)
        assert not watcher.is_alive()
        assert out == [None], out  # its loop ended, with no error
        watch.close()  # again: nothing
        assert await asyncio.to_thread(vol.sector_size) == 512  # the client serves on

        def read_a_chunk_then_stop() -> tuple[int, list[object]]:
            with vol.stream_read(0, SIZE // 512) as chunks:  # a Stream too
                first = next(chunks)[0]
                chunks.close()  # the reads running ahead are cancelled
                return first, list(chunks)

        assert await asyncio.to_thread(read_a_chunk_then_stop) == (0, [])
    finally:
        await asyncio.to_thread(client.close)


def test_client_closed_is_an_unavailable_and_a_runtime_error() -> None:
    err = ClientClosed("the client is closed")
    assert isinstance(err, Interrupted)
    assert isinstance(err, Unavailable)
    assert isinstance(err, TierdiskError)
    assert isinstance(err, RuntimeError)
    assert err.code == grpc.StatusCode.UNAVAILABLE


def test_a_blocking_client_dropped_unclosed_warns_and_gives_back_its_thread() -> None:
    """A ``Client`` garbage collected without close(): a ResourceWarning, as for an
    unclosed file, and its thread, loop and descriptors are given back (300 dropped
    clients kept 300 threads and 900 descriptors for the life of the process)."""
    import gc

    threads = threading.active_count()
    with pytest.warns(ResourceWarning, match=r"unclosed tierdisk Client\('127.0.0.1:1'\)"):
        for _ in range(10):
            Client("127.0.0.1:1")  # nothing listens there: no call is made
            gc.collect()

    def gone() -> bool:
        return threading.active_count() <= threads

    deadline = time.monotonic() + 10
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(), f"{threading.active_count() - threads} client threads left"


_CYCLE = """
import gc, sys, threading, warnings
warnings.simplefilter("ignore", ResourceWarning)
from tierdisk.client.sync import Client

class Holder:
    pass

held = Holder()
held.me = held  # a reference cycle: the client and its iterator are collected together
held.client = Client(sys.argv[1])
held.events = held.client.volume("v").watch_resize()
next(held.events)
del held
collecting = threading.Thread(target=gc.collect, daemon=True)
collecting.start()
collecting.join(20)
print("collected" if not collecting.is_alive() else "gc.collect() hung", flush=True)
"""


@pytest.mark.parametrize("ending", ["collected", "exit"])
def test_a_blocking_client_and_its_open_watch_dropped_together_end(
    tmp_path: Path, ending: str
) -> None:
    """A Client and its open watch_resize iterator in one reference cycle: the garbage
    collector finalizes the client (its loop stops) and then the iterator, whose clean-up
    must not wait for that stopped loop (gc.collect() never returned); nor may a script
    that exits with both still open hang at exit."""
    script = (
        _CYCLE
        if ending == "collected"
        else _CYCLE.split("held.me = held")[0]
        + (
            "client = Client(sys.argv[1])\n"
            "events = client.volume('v').watch_resize()\n"
            "next(events)\n"
            "print('exiting', flush=True)\n"
        )
    )
    result = _run_against_a_server(tmp_path, script)  # (its timeout: a hang fails)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("collected" if ending == "collected" else "exiting")


def _run_against_a_server(tmp_path: Path, script: str) -> subprocess.CompletedProcess[str]:
    """Run the Python ``script`` in a child process, its address argument a server of one
    1 MiB ``[ram]`` volume ``v``; what it printed (a minute at most: a hang fails)."""
    with ServerProcess.start(
        tmp_path, write_config(tmp_path, toml_volume("v", ram("1MiB")))
    ) as srv:
        return subprocess.run(
            [sys.executable, "-c", script, srv.grpc],
            capture_output=True,
            text=True,
            timeout=60,
        )


_KEPT_AFTER_CLOSE = """
import asyncio, sys, threading, time
from tierdisk.client import AsyncClient, Client, ClientClosed

def grpc_threads():
    return [t.name for t in threading.enumerate() if "_poll_wrapper" in t.name]

def wait_for_no_grpc_thread(what):
    deadline = time.monotonic() + 10
    while grpc_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    print(what, grpc_threads(), flush=True)

def refused(call):
    try:
        call()
    except ClientClosed as exc:
        return f"ClientClosed: {exc}"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"

with Client(sys.argv[1]) as client:
    vol = client.volume("v")
    vol.info()
    watch = vol.watch_resize()
    next(watch)
wait_for_no_grpc_thread("blocking:")
print(refused(lambda: vol.read(0, 1)), flush=True)
print(refused(lambda: client.volume("v").info()), flush=True)
print(client.connectivity().name, flush=True)

kept = []

async def use():
    async with AsyncClient(sys.argv[1]) as client:
        vol = client.volume("v")
        await vol.info()
        await vol.read(0, 1)
    kept.append((client, vol))

asyncio.run(use())
wait_for_no_grpc_thread("async:")

async def after(client, vol):
    print(client.connectivity().name, flush=True)
    for call in (vol.info, lambda: vol.read(0, 1), lambda: vol.unmap(0, 1), vol.flush,
                 lambda: client.volume("v").inspect(), client.list_volumes,
                 lambda: anext(vol.watch_resize()), lambda: anext(vol.stream_read(0, 1))):
        try:
            await call()
            print("no error", flush=True)
        except ClientClosed as exc:
            print(f"ClientClosed: {exc}", flush=True)
        except Exception as exc:
            print(f"{type(exc).__name__}: {exc}", flush=True)

asyncio.run(after(*kept[0]))
"""


def test_a_closed_client_still_referenced_keeps_no_grpc_thread(tmp_path: Path) -> None:
    """A closed Client or AsyncClient the program still holds (and its volume handles, an
    open watch) let go of the grpc.aio channel, so gRPC ends its ``_poll_wrapper`` thread
    (it stayed for as long as the closed client lived); their methods still raise
    ClientClosed, not an AttributeError about what was let go, and ``connectivity()`` says
    SHUTDOWN. In a child process: other tests' channels keep gRPC's thread in this one."""
    result = _run_against_a_server(tmp_path, _KEPT_AFTER_CLOSE)
    assert result.returncode == 0, result.stderr
    closed = "ClientClosed: the client is closed"
    assert result.stdout.splitlines() == [
        "blocking: []",
        closed,
        closed,
        "SHUTDOWN",
        "async: []",
        "SHUTDOWN",
        *[closed] * 8,
    ], result.stderr


# -- a caller cancelled: its call left to end by itself ------------------------------------


class _SlowServer:
    """A server whose ``GetVolume`` and ``Write`` answer after ``seconds``, recording how
    each call ended there: ``"answered"``, or ``"cancelled"`` (the client cancelled it on
    the wire)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = 0
        self.ended: list[str] = []

    async def _slowly(self) -> None:
        self.started += 1
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self.ended.append("cancelled")
            raise
        self.ended.append("answered")

    async def get_volume(self, request: pb.GetVolumeRequest, context: object) -> pb.Volume:
        await self._slowly()
        return pb.Volume(
            name=request.volume, sector_size=512, sector_count=8, physical_sector_size=512
        )

    async def write(self, request: pb.WriteRequest, context: object) -> pb.WriteResponse:
        await self._slowly()
        return pb.WriteResponse(write_verifier=5)

    async def __aenter__(self) -> str:
        """Serve on 127.0.0.1 (port 0); the address."""
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "tierdisk.v1.BlockDevice",
                    {
                        "GetVolume": grpc.unary_unary_rpc_method_handler(
                            self.get_volume,
                            pb.GetVolumeRequest.FromString,
                            pb.Volume.SerializeToString,
                        ),
                        "Write": grpc.unary_unary_rpc_method_handler(
                            self.write,
                            pb.WriteRequest.FromString,
                            pb.WriteResponse.SerializeToString,
                        ),
                    },
                ),
            )
        )
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return f"127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        await self._server.stop(None)


@pytest.mark.parametrize(
    ("call", "callers", "deadline", "ended"),
    [
        ("info", 1, 30.0, ["answered"]),  # left to end by itself
        ("info", 1, None, ["cancelled"]),  # no deadline to bound it: cancelled as before
        ("info", 2, 30.0, ["cancelled", "answered"]),  # past the cap (1 here): cancelled
        ("write", 1, 30.0, ["cancelled"]),  # a write: never to land after later ones
    ],
)
async def test_a_read_whose_caller_is_cancelled_is_left_to_end_by_itself(
    monkeypatch: pytest.MonkeyPatch,
    call: str,
    callers: int,
    deadline: float | None,
    ended: list[str],
) -> None:
    """grpc.aio leaks what a call cancelled while its reply arrives had received
    (grpc/grpc#43360: 100-160 KB per 1 MiB read, for good), so a call that changes nothing
    whose caller's task is cancelled is not cancelled with it: the server answers it (its
    deadline bounds it), at most ``LEFT_TO_END`` at a time per client. The caller gets its
    ``CancelledError`` at once, while the server still works on the call. A write is
    cancelled as before: left to go on, it could land after the caller's later writes."""
    monkeypatch.setattr(calls_module, "LEFT_TO_END", 1)
    servicer = _SlowServer(0.5)
    async with (
        servicer as address,
        AsyncClient(address, timeout=deadline, retries=0) as client,
    ):
        vol = client.volume("v")
        if call == "write":  # (the handle asks the sector size first)
            await vol.info()
            servicer.started, servicer.ended = 0, []
        tasks = [
            asyncio.create_task(vol.info() if call == "info" else vol.write(0, bytes(512)))
            for _ in range(callers)
        ]
        await eventually("the calls reach the server", lambda: servicer.started == callers)
        for task in tasks:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert servicer.ended == [] or call == "write"  # the callers did not wait
        await eventually("the calls end", lambda: len(servicer.ended) == callers)
        assert servicer.ended == ended
        await eventually("none left", lambda: client.runner.left_to_end == 0)


async def test_closing_a_client_cancels_the_reads_left_to_end() -> None:
    """A read left to end by itself is cancelled when its client closes (a channel closed
    under a call still sending could hold the event loop while a hung server does not
    answer), and the close returns."""
    servicer = _SlowServer(30.0)
    async with servicer as address:
        client = AsyncClient(address, timeout=60, retries=0)
        task = asyncio.create_task(client.volume("v").info())
        await eventually("the call reaches the server", lambda: servicer.started == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert client.runner.left_to_end == 1
        await client.close()
        assert client.runner.left_to_end == 0
        await eventually("the server sees it cancelled", lambda: servicer.ended == ["cancelled"])
