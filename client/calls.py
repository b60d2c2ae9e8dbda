"""How the client makes its gRPC calls: :class:`CallRunner`, one per
:class:`~tierdisk.client.aio.AsyncClient`, shared by the client and its volumes.

Each call gets a deadline (the client's ``timeout`` or the method's ``timeout=``), the
client's metadata (then the pairs of its ``metadata_factory``), retries on ``UNAVAILABLE``
and ``CANCELLED`` (:mod:`tierdisk.client.retry`), the ``on_call`` observer per attempt, and
its errors as :mod:`tierdisk.client.errors` exceptions. A call cancelled underneath (not by
its caller's task) raises :class:`~tierdisk.client.errors.ClientClosed` if the client was
closed, else :class:`~tierdisk.client.errors.Interrupted`. A call made in another event loop
than the runner's own raises :class:`RuntimeError` before anything reaches gRPC.

A call that only reads (:data:`LEFT_TO_END_RPCS`: ``Read`` and the calls that ask about a
volume) whose caller is cancelled (its task: a timeout around it, a server handler whose
own caller went away) is not cancelled with it but left to end by itself, its deadline
bounding it, at most :data:`LEFT_TO_END` at a time per client: grpc.aio leaks what a call
cancelled while its reply arrives had received (grpc/grpc#43360: 100-160 KB of native
memory per 1 MiB read, for the life of the process), and a cache tier's remote layer sees
such cancels whenever its clients give up. The caller gets its ``CancelledError`` at once
as before (and :attr:`CallRunner.on_call` counts its attempt ``CANCELLED``, as it ended for
the caller); a call with no deadline, past the cap, or that changes the volume (a write
left to go on could land after the caller's later writes) is cancelled as before, and
:meth:`CallRunner.close` cancels those still running (a channel closed under them can hold
the event loop while a hung server does not answer).
"""

# ASYNC109: ``timeout=`` is the gRPC deadline of a call (with its retries inside it), which
# asyncio.timeout() around the call cannot express.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import enum
import numbers
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any, NoReturn, TypeAlias, TypeVar

import grpc
import grpc.aio

from tierdisk.v1 import blockdevice_pb2 as pb
from tierdisk.v1 import blockdevice_pb2_grpc as pb_grpc

from .checks import sendable_metadata
from .chunking import caller_cancelled
from .errors import (
    ClientClosed,
    DeadlineExceeded,
    Interrupted,
    Unimplemented,
    error_from_rpc,
    status_code,
)
from .retry import RetryPolicy, call_with_retry, is_retryable

__all__ = ["UNSET", "CallObserver", "CallRunner", "MetadataFactory", "Timeout", "deadline_seconds"]

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class _Unset(enum.Enum):
    UNSET = enum.auto()


UNSET = _Unset.UNSET
"""Default of every method's ``timeout=``: use the client's timeout."""

Timeout: TypeAlias = float | _Unset | None
"""A per-call timeout: seconds, ``None`` for no deadline, or ``UNSET`` for the client's."""

LONGEST_DEADLINE = 365 * 24 * 3600.0
"""Seconds past which a timeout means no deadline (a year: gRPC turns a deadline of ~7.4e9 s
or more, and infinity, into one already passed)."""


def deadline_seconds(timeout: float | None) -> float | None:
    """``timeout`` as a call's deadline in seconds: ``None`` (no deadline) for ``None``,
    infinity and anything over :data:`LONGEST_DEADLINE`; :class:`ValueError` for NaN, zero
    and negative values (gRPC would end the call at once with ``DEADLINE_EXCEEDED``);
    :class:`TypeError` for anything but a real number (``"5"``, ``True``, a ``Decimal``)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout must be seconds (a number) or None, not {type(timeout).__name__}")
    if not timeout > 0:  # NaN too
        raise ValueError(f"timeout must be positive or None, not {timeout}")
    return None if timeout > LONGEST_DEADLINE else float(timeout)


MetadataFactory: TypeAlias = Callable[[], Sequence[tuple[str, str]]]
"""Called for every call: more ``(key, value)`` pairs to send, for values that change per call."""

CallObserver: TypeAlias = Callable[[str, grpc.StatusCode, float], None]
"""Called after every call attempt with the RPC name (``"Read"``), its status code and the
seconds it took."""


LEFT_TO_END = 64
"""Unary calls whose callers were cancelled that a client leaves to end by themselves at
one time (each holds its reply once it arrives, until it ends)."""

OVERDUE = 1.0
"""Seconds past its deadline after which a call that has not ended is cancelled here (gRPC
ends it at its deadline, but for a large request over a unix socket to a stalled server)."""

LEFT_TO_END_RPCS = frozenset(
    {"Read", "ReadBatch", "GetVolume", "ListVolumes", "GetAllocation", "Inspect"}
)
"""The calls left to end by themselves when their callers are cancelled: those that change
nothing."""


_WRONG_LOOP = (
    "this AsyncClient (for {target}) was made in another event loop than the one calling it "
    "(a previous asyncio.run(), say), and an AsyncClient is made in the event loop that uses "
    "it: make one in this loop; blocking code uses tierdisk.client.Client"
)
"""The message of the :class:`RuntimeError` for a call made in another loop than the
runner's (gRPC's own would be "Event loop is closed", or a call that never completes)."""


class _Closed:
    """What a closed :class:`CallRunner` holds instead of its channel, stub and raw methods
    (dropped at close, so that gRPC can end its poller thread while the closed client is
    still referenced): reading an attribute of it or calling it raises
    :class:`~tierdisk.client.errors.ClientClosed`, never an ``AttributeError``."""

    __slots__ = ()

    def __getattr__(self, name: str) -> NoReturn:
        if name.startswith("__"):  # (copy, pickle, hasattr probes: the usual answer)
            raise AttributeError(name)
        raise ClientClosed("the client is closed")

    def __call__(self, *args: object, **kwargs: object) -> NoReturn:
        raise ClientClosed("the client is closed")

    def __repr__(self) -> str:
        return "<closed>"


_CLOSED: Any = _Closed()


class CallRunner:
    """Makes the calls of one client on its ``channel``; ``target`` names the server in
    errors. The settings (``policy``, ``timeout``, ``metadata``, ``metadata_factory``,
    ``on_call``) are read at every call: changing one changes the calls made after.
    ``policy_factory``, when set, is called at every call instead of reading ``policy``
    (a remote layer retries only its own server's requests, not those another tier sent).

    ``stub`` is the channel's BlockDevice stub; ``read_raw``, ``read_batch_raw`` and
    ``write_raw`` are Read, ReadBatch and Write with the reply, or the request, left
    serialized (:mod:`tierdisk.client.wire`). Once closed, ``channel``, ``stub`` and the
    raw methods no longer refer to
    gRPC's objects (gRPC keeps a poller thread while any channel object lives): using them
    raises :class:`~tierdisk.client.errors.ClientClosed`.

    It is made in a running event loop, the one its calls are made in (a grpc.aio channel
    belongs to one loop): a call made in another loop raises :class:`RuntimeError` saying so,
    before gRPC is called. :meth:`close` may be awaited in any loop."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        target: str,
        policy: RetryPolicy,
        timeout: float | None,
        metadata: tuple[tuple[str, str], ...] = (),
        metadata_factory: MetadataFactory | None = None,
        on_call: CallObserver | None = None,
    ) -> None:
        self.channel = channel
        self.target = target
        self.policy = policy
        self.policy_factory: Callable[[], RetryPolicy] | None = None
        self.timeout = timeout
        self.metadata = metadata
        self.metadata_factory = metadata_factory
        self.on_call = on_call
        self._closed = False
        self._closing = asyncio.Event()  # set by close(): ends the wait before a retry
        self._loop = asyncio.get_running_loop()  # the loop the calls are made in
        self._left: set[grpc.aio.Call] = set()  # calls of cancelled callers still running
        self.stub: pb_grpc.BlockDeviceAsyncStub = pb_grpc.BlockDeviceStub(channel)
        # Read with the reply left serialized: wire.read_reply_view takes the data from it
        # without protobuf's two copies.
        self.read_raw: grpc.aio.UnaryUnaryMultiCallable[pb.ReadRequest, bytes] = (
            channel.unary_unary(
                "/tierdisk.v1.BlockDevice/Read",
                request_serializer=pb.ReadRequest.SerializeToString,
                response_deserializer=None,
            )
        )
        # ReadBatch likewise: its reply's data is field 1, as a ReadResponse's.
        self.read_batch_raw: grpc.aio.UnaryUnaryMultiCallable[pb.ReadBatchRequest, bytes] = (
            channel.unary_unary(
                "/tierdisk.v1.BlockDevice/ReadBatch",
                request_serializer=pb.ReadBatchRequest.SerializeToString,
                response_deserializer=None,
            )
        )
        # Write with the request serialized here: wire.encode_write copies the data once.
        self.write_raw: grpc.aio.UnaryUnaryMultiCallable[bytes, pb.WriteResponse] = (
            channel.unary_unary(
                "/tierdisk.v1.BlockDevice/Write",
                request_serializer=None,
                response_deserializer=pb.WriteResponse.FromString,
            )
        )

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed

    def check_open(self) -> None:
        """:class:`ClientClosed` ("the client is closed") once :meth:`close` was called."""
        if self._closed:
            raise ClientClosed("the client is closed")

    def _check_loop(self) -> None:
        """:class:`RuntimeError` naming the rule unless the running event loop is the one
        the runner was made in (one identity comparison: this is on every call's path)."""
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError(_WRONG_LOOP.format(target=self.target))

    async def close(self) -> None:
        """Refuse calls from now on, end the waits before retries, and close the channel
        (gRPC cancels the calls in flight); then drop the channel, the stub and the raw
        methods, so that nothing of gRPC's outlives the close through this runner.
        Idempotent; may be awaited in any event loop."""
        self._closed = True
        self._closing.set()
        channel = self.channel
        if isinstance(channel, _Closed):
            return
        if self._left:  # cancelled before the channel closes under them (module docs)
            for call in list(self._left):
                call.cancel()
            await asyncio.sleep(0)
        try:
            await channel.close()
        finally:
            self.channel = self.stub = self.read_raw = self.write_raw = _CLOSED
            self.read_batch_raw = _CLOSED

    async def unary(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp],
        request: Req,
        *,
        timeout: Timeout,
        volume: str | None = None,
        rpc: str | None = None,
    ) -> Resp:
        """One call of ``method`` with the client's metadata, deadline and retries, naming
        ``volume`` in its errors; ``rpc`` names it for :attr:`on_call` and in an
        :class:`Unimplemented` (by default ``<Rpc>Request`` minus ``Request``: pass it for a
        request sent already serialized)."""
        self.check_open()
        self._check_loop()
        metadata = self._call_metadata()
        name = rpc or type(request).__name__.removesuffix("Request")  # DESIGN §2
        leave = name in LEFT_TO_END_RPCS  # (left to end by itself if its caller goes)
        if self.on_call is None:

            async def attempt(remaining: float | None) -> Resp:
                self.check_open()  # closed while an earlier attempt waited to retry
                call = method(request, timeout=remaining, metadata=metadata)
                return await self._reply(call, remaining, leave=leave)

        else:

            async def attempt(remaining: float | None) -> Resp:
                self.check_open()
                started = time.perf_counter()
                code = grpc.StatusCode.CANCELLED
                try:
                    call = method(request, timeout=remaining, metadata=metadata)
                    reply = await self._reply(call, remaining, leave=leave)
                    code = grpc.StatusCode.OK
                    return reply
                except grpc.RpcError as err:
                    code = status_code(err)
                    raise
                finally:
                    self._observe(name, code, started)

        seconds = self.timeout if timeout is UNSET else deadline_seconds(timeout)
        try:
            return await call_with_retry(
                attempt,
                policy=self.policy if self.policy_factory is None else self.policy_factory(),
                timeout=seconds,
                volume=volume,
                target=self.target,
                sleep=self._backoff,
            )
        except DeadlineExceeded as exc:
            if not isinstance(exc.__cause__, grpc.RpcError):
                raise  # the retry loop's own: its deadline passed before an attempt
            raise self._timed_out(exc, f"the {name} call", seconds) from exc.__cause__
        except asyncio.CancelledError:
            if caller_cancelled():
                raise
            raise self._cut_short(f"the {name} call", volume) from None
        except Unimplemented as exc:  # name this server and the method, not the volume
            cause = exc.__cause__
            if not isinstance(cause, grpc.RpcError):
                raise
            raise error_from_rpc(cause, target=self.target, method=name) from cause

    async def _reply(
        self, call: grpc.aio.UnaryUnaryCall[Req, Resp], seconds: float | None, *, leave: bool
    ) -> Resp:
        """The reply of ``call``, whose deadline is ``seconds`` away (``None``: none). With
        ``leave`` (a call that changes nothing) and a deadline, a caller cancelled meanwhile
        does not cancel the call: it is left to end by itself (module docs), unless
        :data:`LEFT_TO_END` calls are left already. A call not ended :data:`OVERDUE`
        seconds after its deadline is cancelled and raises ``DEADLINE_EXCEEDED`` as gRPC
        would have (gRPC 1.85 over a unix socket lets a large request to a stalled server
        wait past its deadline)."""
        ended: asyncio.Future[None] = self._loop.create_future()

        def end(_call: object) -> None:
            if not ended.done():  # (not when the caller was cancelled first)
                ended.set_result(None)

        call.add_done_callback(end)
        try:
            async with asyncio.timeout(None if seconds is None else seconds + OVERDUE):
                await ended
        except TimeoutError:
            call.cancel()
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                f"Deadline Exceeded (the call had not ended {OVERDUE:g} s past it)",
            ) from None
        except asyncio.CancelledError:
            if not leave or seconds is None or len(self._left) >= LEFT_TO_END or self._closed:
                call.cancel()
            else:
                self._left.add(call)
                call.add_done_callback(self._left.discard)
            raise
        return await call  # ended: its reply, or its error

    @property
    def left_to_end(self) -> int:
        """Calls of cancelled callers still running (module docs)."""
        return len(self._left)

    async def stream(
        self,
        method: grpc.aio.UnaryStreamMultiCallable[Req, Resp],
        request: Req,
        *,
        timeout: float | None,
        volume: str | None = None,
        rpc: str | None = None,
    ) -> AsyncGenerator[Resp, None]:
        """The replies of a server-streaming call of ``method``, until the stream ends (or
        ``timeout`` seconds pass; ``None``: never). ``UNAVAILABLE`` or ``CANCELLED`` before
        the first reply is retried with the client's policy (each attempt with fresh
        metadata), within the one deadline, as :func:`~.retry.call_with_retry` does (a
        retry whose wait would pass it raises the attempt's error); once replies have
        arrived, any error is raised. :attr:`on_call` is called when each attempt's stream
        ends; ``rpc`` names it as in :meth:`unary`."""
        name = rpc or type(request).__name__.removesuffix("Request")
        policy = self.policy if self.policy_factory is None else self.policy_factory()
        timeout = deadline_seconds(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        retry = 0
        self.check_open()
        self._check_loop()
        while True:
            self.check_open()
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            call = method(request, timeout=remaining, metadata=self._call_metadata())
            started = False
            began = time.perf_counter()
            code = grpc.StatusCode.CANCELLED
            try:
                async for reply in call:
                    started = True
                    yield reply
                code = grpc.StatusCode.OK
                return
            except grpc.RpcError as err:
                code = status_code(err)
                wait = policy.delay(retry)
                if (
                    started
                    or not is_retryable(err)
                    or retry >= policy.retries
                    or (deadline is not None and time.monotonic() + wait >= deadline)
                ):
                    error = error_from_rpc(err, volume=volume, target=self.target, method=name)
                    if isinstance(error, DeadlineExceeded):
                        error = self._timed_out(error, f"the {name} stream", timeout)
                    try:
                        raise error from err
                    finally:  # (its traceback holds this frame: no cycle through a local)
                        del error
            except asyncio.CancelledError:
                if caller_cancelled():
                    raise
                raise self._cut_short(f"the {name} stream", volume) from None
            finally:
                call.cancel()
                self._observe(name, code, began)
            await self._backoff(wait)
            retry += 1

    def _call_metadata(self) -> tuple[tuple[str, str], ...]:
        if self.metadata_factory is None:
            return self.metadata
        return (*self.metadata, *sendable_metadata(self.metadata_factory(), "metadata_factory: "))

    def _observe(self, rpc: str, code: grpc.StatusCode, started: float) -> None:
        if self.on_call is not None:
            self.on_call(rpc, code, time.perf_counter() - started)

    async def _backoff(self, seconds: float) -> None:
        """The wait before a retry, ended early by :meth:`close`: the retry then raises
        :class:`ClientClosed` at once, rather than after the wait."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._closing.wait()

    def _timed_out(
        self, exc: DeadlineExceeded, what: str, seconds: float | None
    ) -> DeadlineExceeded:
        """``exc`` saying which server ``what`` (``"the Read call"``) waited for and how
        long, when it was this client's own deadline that passed (the server named no
        error of its own: gRPC says only "Deadline Exceeded")."""
        if exc.server_error is not None or seconds is None:
            return exc
        return exc.with_note(
            f"{what} to {self.target} did not complete within its timeout of {seconds:g} s"
            " (retries included)"
        )

    def _cut_short(self, what: str, volume: str | None) -> Interrupted:
        """The error for ``what`` (``"the Read call"``) ending cancelled though its caller's
        task was not cancelled: :class:`ClientClosed` when the client was closed (gRPC
        cancels a closed channel's calls), else :class:`Interrupted`."""
        if self._closed:
            return ClientClosed(f"the client was closed while {what} was in flight", volume=volume)
        return Interrupted(f"{what} was cancelled, though not by its caller", volume=volume)
