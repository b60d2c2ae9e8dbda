"""The blocking client: :class:`Client` and :class:`Volume`, the same methods as the async
ones, for code that does not run an event loop.

There is one implementation: each ``Client`` runs an :class:`~tierdisk.client.aio.AsyncClient`
on a private event loop in a background thread, and every method here submits the async
method's coroutine to that loop and waits for it. Do not call a ``Client`` from inside its
own loop (i.e. from code the async client calls back); from any other thread, or from a
coroutine of another loop (it blocks that loop), it works.

:meth:`Client.close` may be called from another thread while calls are in flight: they raise
:class:`~tierdisk.client.errors.ClientClosed`, as they do on the async client, and never
return as if complete. A client dropped without :meth:`~Client.close` (garbage collected)
warns (``ResourceWarning``, as an unclosed file does) and closes its channel and ends its
thread and loop in the background, rather than keeping them for the life of the process.

    with Client("127.0.0.1:7400") as client:
        vol = client.volume("vm1")
        vol.write(0, b"\\0" * vol.sector_size())
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import warnings
import weakref
from collections.abc import AsyncGenerator, Coroutine, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, Unpack, overload

import grpc

from .aio import AsyncClient, AsyncVolume, Buffer, ClientOptions
from .calls import UNSET, Timeout
from .errors import ClientClosed, Interrupted
from .models import AllocationExtent, Extent, ReadResult, ResizeEvent, VolumeInfo
from .verifiers import UnflushedWrites

__all__ = ["Client", "Stream", "Volume"]

T = TypeVar("T")

_SETTLE = 1.0
"""Seconds :meth:`Client.close` lets the calls it cut short end on their own (they fail at
once, with how far they got), and then lets those it cancelled wind up."""


class _ClosedOnExit:
    """A context manager whose exit calls :meth:`close`."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Client(_ClosedOnExit):
    """A blocking connection to one tierdisk server; takes the same arguments as
    :class:`~tierdisk.client.aio.AsyncClient` (``metadata_factory`` and ``on_call`` are
    called on the client's own thread: they must not call it). Use it as a context manager,
    or call :meth:`close`; a closed client's methods raise
    :class:`~tierdisk.client.errors.ClientClosed` (a ``RuntimeError``). Closing ends its
    thread and loop and lets go of its gRPC channel: a closed client that is still
    referenced keeps no thread of its own or of gRPC's.

    Its ``target`` is checked when it is made (a :class:`ValueError` naming the problem; see
    :class:`~tierdisk.client.aio.AsyncClient`)."""

    def __init__(self, target: str, **options: Unpack[ClientOptions]) -> None:
        self.target = target
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=_run_loop, args=(self._loop,), name=f"tierdisk-client {target}", daemon=True
        )
        self._thread.start()
        self._closed = False
        self._lock = threading.Lock()  # _closed, against calls submitted from other threads
        self._abandoned = threading.Event()  # set by _dropped: the loop is stopping for good

        async def make() -> AsyncClient:
            return AsyncClient(target, **options)

        try:
            self._async = self._run(make())
        except BaseException:
            self._stop_loop()
            raise
        # (never a reference to self: the client must stay collectable)
        self._dropped = weakref.finalize(
            self, _dropped, target, self._loop, self._async, self._abandoned
        )

    def __repr__(self) -> str:
        return f"Client({self.target!r})"

    @property
    def aio(self) -> AsyncClient:
        """The async client underneath (it lives on this client's private loop)."""
        return self._async

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed

    def connectivity(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """The channel's connection state (``READY``, ``IDLE``, ``TRANSIENT_FAILURE``, …),
        asked on the client's loop; ``SHUTDOWN`` once the client is closed."""
        if self._closed:
            return grpc.ChannelConnectivity.SHUTDOWN

        async def state() -> grpc.ChannelConnectivity:
            return self._async.connectivity(try_to_connect)

        return self._run(state())

    def unflushed_writes(self, volume: str) -> UnflushedWrites:
        """See :meth:`AsyncClient.unflushed_writes
        <tierdisk.client.aio.AsyncClient.unflushed_writes>`."""
        return self._async.unflushed_writes(volume)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a blocking Client cannot be called from its own event loop")
        return self._wait(self._submit(coro))

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """``coro`` started on the client's loop (:class:`ClientClosed` once it is closed)."""
        with self._lock:  # submitted before close() marks the client closed, or not at all
            if self._closed or self._abandoned.is_set():  # (never to a loop that stopped)
                coro.close()
                raise ClientClosed("the client is closed")
            return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _wait(self, future: concurrent.futures.Future[T]) -> T:
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            # Not cancelled here (that is the branch below): close() cancelled it, or
            # something on the loop did. Never a result: the call did not complete.
            if self._closed:
                raise ClientClosed("the client was closed while the call was in flight") from None
            raise Interrupted("the call was cancelled, though not by its caller") from None
        except BaseException:
            # KeyboardInterrupt and the like: stop the call rather than leave it running.
            future.cancel()
            raise

    def _stop_loop(self) -> None:
        async def drain() -> None:
            await self._loop.shutdown_asyncgens()

        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            asyncio.run_coroutine_threadsafe(drain(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()  # the thread closes the loop (_run_loop)

    def close(self) -> None:
        """Close the channel and stop the background loop; idempotent. Calls in flight on
        other threads raise :class:`~tierdisk.client.errors.ClientClosed`."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("a blocking Client cannot be closed from its own event loop")
        with self._lock:
            if self._closed:
                return
            self._closed = True  # no call is submitted from now on
        self._dropped.detach()
        try:
            self._wait(asyncio.run_coroutine_threadsafe(self._shut(), self._loop))
        finally:
            self._stop_loop()

    async def _shut(self) -> None:
        """On the loop: close the async client, then end every call still running there
        before the loop stops — else a thread waiting for one would wait forever. Closing
        the channel fails the calls it cut short (``ClientClosed``); one waiting to retry,
        or on anything else, is cancelled, which its thread takes as ``ClientClosed`` too."""
        await self._async.close()
        calls = asyncio.all_tasks() - {asyncio.current_task()}
        if calls:
            _, running = await asyncio.wait(calls, timeout=_SETTLE)
            for task in running:
                task.cancel()
            if running:
                await asyncio.wait(running, timeout=_SETTLE)

    def volume(self, name: str) -> Volume:
        """A handle on the volume ``name`` (no call is made until it is used)."""
        return Volume(self, self._async.volume(name))

    def list_volumes(self, *, page_size: int = 0, timeout: Timeout = UNSET) -> list[VolumeInfo]:
        """Every volume the server serves (see ``AsyncClient.list_volumes``)."""
        return self._run(self._async.list_volumes(page_size=page_size, timeout=timeout))

    def _iterate(self, agen: AsyncGenerator[T, None]) -> Stream[T]:
        """``agen``'s items, each fetched on the client's loop (:class:`Stream`)."""
        return Stream(self, agen)


class Stream(_ClosedOnExit, Iterator[T]):
    """The items of a stream a :class:`Client` method returns (``Volume.watch_resize``,
    ``Volume.stream_read``), each fetched on the client's loop as it is asked for.

    :meth:`close` stops it from any thread: the stream's calls are cancelled (the watch's
    gRPC stream, the reads running ahead), and an iteration waiting for the next item in
    another thread ends as the stream does (``StopIteration``; a ``for`` loop just ends).
    It is a context manager that closes it, and closing it again does nothing. Dropped
    unclosed, it is closed in the background."""

    def __init__(self, client: Client, agen: AsyncGenerator[T, None]) -> None:
        self._client = client
        self._agen = agen
        self._lock = threading.Lock()
        self._closed = False
        self._step: concurrent.futures.Future[tuple[T] | None] | None = None

    def __iter__(self) -> Stream[T]:
        return self

    def __next__(self) -> T:
        with self._lock:
            if self._closed:
                raise StopIteration
            step = self._step = self._client._submit(self._next_item())
        try:
            got = self._client._wait(step)
        except Interrupted:  # (cancelled on the loop: by close(), or by the loop's end)
            if self._closed:
                raise StopIteration from None
            raise
        finally:
            with self._lock:
                self._step = None
        if got is None:
            with self._lock:
                self._closed = True
            raise StopIteration
        return got[0]

    async def _next_item(self) -> tuple[T] | None:
        try:
            return (await anext(self._agen),)
        except StopAsyncIteration:
            return None

    def close(self) -> None:
        """Stop the stream, from any thread (see the class); idempotent. Returns once its
        calls are cancelled (at once when called on the client's own loop, as when it is
        garbage collected there)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            step = self._step
        if step is not None:
            step.cancel()  # the item under way: its stream is cancelled where it waits
        try:
            done = self._client._submit(self._shut(step))
        except ClientClosed:
            return  # closed with the client: nothing runs any more
        if threading.current_thread() is not self._client._thread:
            with contextlib.suppress(ClientClosed, Interrupted):
                self._client._wait(done)

    async def _shut(self, step: concurrent.futures.Future[tuple[T] | None] | None) -> None:
        """On the loop: once the item under way (``step``, cancelled) has wound up, close
        the async generator (a generator still running cannot be closed)."""
        if step is not None:
            await asyncio.wait([asyncio.wrap_future(step)])  # (its outcome is its thread's)
        await self._agen.aclose()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    """A client's thread: run ``loop`` until it is stopped, then close it."""
    try:
        loop.run_forever()
    finally:
        loop.close()


def _dropped(
    target: str, loop: asyncio.AbstractEventLoop, client: AsyncClient, abandoned: threading.Event
) -> None:
    """A :class:`Client` for ``target`` was garbage collected unclosed (or is still open at
    exit): warn, close its async ``client`` on its ``loop`` and stop the loop (its thread
    then closes it), without waiting (this may run on any thread, the loop's own included).
    ``abandoned`` is set first: what still refers to the client (an iterator collected in
    the same cycle, whose ``finally`` closes its stream) is then refused at once
    (:class:`ClientClosed`) instead of waiting for a loop that will not run it."""
    abandoned.set()
    warnings.warn(f"unclosed tierdisk Client({target!r})", ResourceWarning, stacklevel=2)

    async def close() -> None:
        try:
            await client.close()
        finally:
            asyncio.get_running_loop().stop()

    with contextlib.suppress(RuntimeError):  # the loop is closed already (interpreter exit)
        loop.call_soon_threadsafe(lambda: loop.create_task(close()))


class Volume:
    """One volume, blocking; the methods mirror :class:`~tierdisk.client.aio.AsyncVolume`."""

    def __init__(self, client: Client, aio: AsyncVolume) -> None:
        self.client = client
        self.aio = aio
        self.name = aio.name

    def __repr__(self) -> str:
        return f"Volume({self.name!r} on {self.client.target!r})"

    def info(self, *, timeout: Timeout = UNSET) -> VolumeInfo:
        """The volume's geometry and capabilities, fresh from the server."""
        return self.client._run(self.aio.info(timeout=timeout))

    def sector_size(self, *, timeout: Timeout = UNSET) -> int:
        """Bytes per sector (cached after the first call)."""
        return self.client._run(self.aio.sector_size(timeout=timeout))

    @overload
    def read(
        self,
        sector: int,
        count: int,
        *,
        report_presence: Literal[False] = False,
        timeout: Timeout = UNSET,
    ) -> bytes: ...

    @overload
    def read(
        self, sector: int, count: int, *, report_presence: Literal[True], timeout: Timeout = UNSET
    ) -> ReadResult: ...

    @overload
    def read(
        self, sector: int, count: int, *, report_presence: bool, timeout: Timeout = UNSET
    ) -> bytes | ReadResult: ...

    def read(
        self, sector: int, count: int, *, report_presence: bool = False, timeout: Timeout = UNSET
    ) -> bytes | ReadResult:
        """``count`` sectors from ``sector`` (see ``AsyncVolume.read``)."""
        return self.client._run(
            self.aio.read(sector, count, report_presence=report_presence, timeout=timeout)
        )

    def read_into(
        self, sector: int, buffer: bytearray | memoryview, *, timeout: Timeout = UNSET
    ) -> None:
        """Fill ``buffer`` with the sectors from ``sector`` (see ``AsyncVolume.read_into``)."""
        self.client._run(self.aio.read_into(sector, buffer, timeout=timeout))

    def read_present_into(
        self, sector: int, buffer: bytearray | memoryview, *, timeout: Timeout = UNSET
    ) -> list[Extent]:
        """Fill ``buffer`` and return the runs some layer holds (see
        ``AsyncVolume.read_present_into``)."""
        return self.client._run(self.aio.read_present_into(sector, buffer, timeout=timeout))

    def stream_read(
        self, sector: int, count: int, *, timeout: Timeout = UNSET
    ) -> Stream[tuple[int, bytes]]:
        """``(sector, data)`` chunks of the range, in order, read ahead in the background.
        A :class:`Stream`: ``close()`` it (from any thread; or use it in ``with``) to stop
        early and cancel the reads running ahead."""
        return self.client._iterate(self.aio.stream_read(sector, count, timeout=timeout))

    def read_bytes(self, offset: int, length: int, *, timeout: Timeout = UNSET) -> bytes:
        """``length`` bytes from byte ``offset`` (both sector-aligned)."""
        return self.client._run(self.aio.read_bytes(offset, length, timeout=timeout))

    def read_batch(
        self, ranges: Iterable[tuple[int, int]], *, timeout: Timeout = UNSET
    ) -> list[bytes]:
        """The data of each ``(sector, count)`` range, in order, in few calls (see
        ``AsyncVolume.read_batch``)."""
        return self.client._run(self.aio.read_batch(ranges, timeout=timeout))

    def read_batch_into(
        self,
        ranges: Sequence[tuple[int, int]],
        buffers: Sequence[bytearray | memoryview],
        *,
        timeout: Timeout = UNSET,
    ) -> None:
        """Fill one buffer per range (see ``AsyncVolume.read_batch_into``)."""
        self.client._run(self.aio.read_batch_into(ranges, buffers, timeout=timeout))

    def read_batch_present_into(
        self,
        ranges: Sequence[tuple[int, int]],
        buffers: Sequence[bytearray | memoryview],
        *,
        timeout: Timeout = UNSET,
    ) -> list[Extent]:
        """Fill one buffer per range and return the runs some layer holds (see
        ``AsyncVolume.read_batch_present_into``)."""
        return self.client._run(self.aio.read_batch_present_into(ranges, buffers, timeout=timeout))

    def write(
        self,
        sector: int,
        data: Buffer,
        *,
        fua: bool = False,
        no_overwrite: bool = False,
        timeout: Timeout = UNSET,
    ) -> None:
        """Write ``data`` (whole sectors) from ``sector`` (see ``AsyncVolume.write``)."""
        self.client._run(
            self.aio.write(sector, data, fua=fua, no_overwrite=no_overwrite, timeout=timeout)
        )

    def write_bytes(
        self, offset: int, data: Buffer, *, fua: bool = False, timeout: Timeout = UNSET
    ) -> None:
        """Write ``data`` at byte ``offset`` (both sector-aligned)."""
        self.client._run(self.aio.write_bytes(offset, data, fua=fua, timeout=timeout))

    def unmap(
        self,
        sector: int,
        count: int,
        *,
        block_level_only: bool = False,
        timeout: Timeout = UNSET,
    ) -> None:
        """Discard ``count`` sectors from ``sector``."""
        self.client._run(
            self.aio.unmap(sector, count, block_level_only=block_level_only, timeout=timeout)
        )

    @property
    def unflushed_verifiers(self) -> list[int]:
        """The write verifiers of writes through this client no flush has vouched for yet
        (:attr:`AsyncVolume.unflushed_verifiers`)."""
        return self.aio.unflushed_verifiers

    def flush(self, *, verifiers: Iterable[int] = (), timeout: Timeout = UNSET) -> None:
        """Make every write acknowledged before this call durable; ``WritesLost`` when the
        server cannot vouch for some, or for writes of another client acknowledged with
        ``verifiers`` (:meth:`AsyncVolume.flush`)."""
        self.client._run(self.aio.flush(verifiers=verifiers, timeout=timeout))

    def resize(self, sector_count: int, *, timeout: Timeout = UNSET) -> VolumeInfo:
        """Change the volume's size to ``sector_count`` sectors."""
        return self.client._run(self.aio.resize(sector_count, timeout=timeout))

    def allocation(
        self, sector: int = 0, count: int | None = None, *, timeout: Timeout = UNSET
    ) -> list[AllocationExtent]:
        """Which layer holds each run of the range (holes: ``depth == -1``)."""
        return self.client._run(self.aio.allocation(sector, count, timeout=timeout))

    def inspect(self, path: str = "", *, timeout: Timeout = UNSET) -> dict[str, Any]:
        """The volume's diagnostic tree, or the subtree ``path`` selects."""
        return self.client._run(self.aio.inspect(path, timeout=timeout))

    def watch_resize(self, *, timeout: float | None = None) -> Stream[ResizeEvent]:
        """The volume's size now, then once per change (see ``AsyncVolume.watch_resize``).
        A :class:`Stream`: ``close()`` it to stop, from any thread (a control thread that
        stops the watcher thread of a VM's disk: the watcher's ``for`` loop ends), or use
        it in ``with``; that cancels the watch's stream."""
        return self.client._iterate(self.aio.watch_resize(timeout=timeout))
