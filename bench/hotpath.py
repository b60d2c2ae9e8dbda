"""The server's own per-call Python cost, without the network: a profile aid.

It starts a real :class:`tierdisk.service.server.Server` (and the floor's servicer) in this
process, captures the method handlers and interceptors they register with gRPC, and then
does for each call exactly what ``grpc.aio``'s server does around application code
(resolve the handler, run the interceptor chain, deserialize the request, await the
handler, serialize the reply) in a tight loop, with no transport. The difference between
tierdisk and the floor is what tierdisk's own code adds per call; the rest of a call's cost
is gRPC's (measured end to end by bench/run).

    python bench/hotpath.py                 # table of us/call
    python bench/hotpath.py --profile read4k  # cProfile of one case, top functions

``batch4k`` is one ``ReadBatch`` call of 8 reads of 4 KiB (its figures are per call).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import json
import pstats
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SECTOR, apply_levers

LEVERS = apply_levers()

import grpc  # noqa: E402

from tierdisk.v1 import blockdevice_pb2 as pb  # noqa: E402

_captured: list[dict[str, Any]] = []
_real_server = grpc.aio.server


def _recording_server(*args: Any, **kwargs: Any) -> Any:
    server = _real_server(*args, **kwargs)
    record: dict[str, Any] = {
        "interceptors": tuple(kwargs.get("interceptors") or ()),
        "generic": [],
        "registered": {},
    }
    _captured.append(record)
    add_generic = server.add_generic_rpc_handlers
    add_registered = server.add_registered_method_handlers

    def generic(handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        record["generic"].extend(handlers)
        add_generic(handlers)

    def registered(service: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]) -> None:
        for name, h in handlers.items():
            record["registered"][f"/{service}/{name}"] = h
        add_registered(service, handlers)

    # recording wrappers replace the server's own methods on this instance
    server.add_generic_rpc_handlers = generic  # type: ignore[method-assign,assignment]
    server.add_registered_method_handlers = registered  # type: ignore[method-assign,assignment]
    return server


grpc.aio.server = _recording_server


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata: tuple[Any, ...] = ()


class FakeContext:
    """What handlers use of ``grpc.aio.ServicerContext`` on the success path: metadata, the
    peer, done callbacks (run by :func:`one_call` after each call, as gRPC runs them when a
    call ends: a large Read's reply budget is released by one)."""

    def __init__(self) -> None:
        self._done: list[Any] = []

    def invocation_metadata(self) -> tuple[Any, ...]:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def add_done_callback(self, callback: Any) -> None:
        self._done.append(callback)

    def call_done(self) -> None:
        """Run and forget the done callbacks of the call that just ended."""
        done, self._done = self._done, []
        for callback in done:
            callback(self)

    def code(self) -> Any:
        return None

    async def abort(self, code: Any, details: str = "", trailing_metadata: Any = ()) -> None:
        raise RuntimeError(f"aborted: {code} {details}")


def _resolve(record: dict[str, Any], method: str) -> Any:
    handler = record["registered"].get(method)
    if handler is not None:
        return handler
    for generic in record["generic"]:
        handler = generic.service(_Details(method))
        if handler is not None:
            return handler
    raise LookupError(method)


async def _run_interceptors(interceptors: Any, query: Any, details: Any) -> Any:
    interceptor = next(interceptors, None)
    if interceptor:
        continuation = functools.partial(_run_interceptors, interceptors, query)
        return await interceptor.intercept_service(continuation, details)
    return query(details)


def _is_async_handler(handler: Any) -> bool:  # as grpc's server does, per call
    import inspect

    return (
        inspect.isawaitable(handler)
        or inspect.iscoroutinefunction(handler)
        or inspect.isasyncgenfunction(handler)
    )


async def one_call(record: dict[str, Any], method: str, raw: bytes, ctx: Any) -> bytes:
    details = _Details(method)
    if record["interceptors"]:
        handler = await _run_interceptors(
            iter(record["interceptors"]), lambda d: _resolve(record, d.method), details
        )
    else:
        handler = _resolve(record, method)
    request = handler.request_deserializer(raw)
    fn = handler.unary_unary
    _is_async_handler(fn)
    reply = await fn(request, ctx)
    ctx.call_done()
    out = handler.response_serializer(reply) if handler.response_serializer else reply
    if not isinstance(out, bytes):
        raise TypeError(f"serializer returned {type(out).__name__}, grpc needs bytes")
    return out


CASES = {
    "read4k": ("Read", 4096),
    "read1m": ("Read", 1 << 20),
    "batch4k": ("ReadBatch", 4096),  # a ReadBatch of BATCH reads of 4 KiB at spread places
    "write4k": ("Write", 4096),
    "write1m": ("Write", 1 << 20),
}
BATCH = 8


def _request(method: str, volume: str, nbytes: int, i: int, region: int) -> bytes:
    sector = (i * nbytes) % region // SECTOR
    if method == "ReadBatch":
        step = region // BATCH // SECTOR
        ranges = [
            pb.Extent(
                sector=(sector + k * step) % (region // SECTOR), sector_count=nbytes // SECTOR
            )
            for k in range(BATCH)
        ]
        return pb.ReadBatchRequest(volume=volume, ranges=ranges).SerializeToString()
    if method == "Read":
        return pb.ReadRequest(
            volume=volume, sector=sector, sector_count=nbytes // SECTOR
        ).SerializeToString()
    return pb.WriteRequest(volume=volume, sector=sector, data=b"x" * nbytes).SerializeToString()


async def measure(seconds: float, profile: str | None) -> dict[str, dict[str, float]]:
    from floor_server import FloorServicer

    from tierdisk.service.config import load_config
    from tierdisk.service.server import Server
    from tierdisk.v1 import blockdevice_pb2_grpc as pb_grpc

    region = 64 << 20
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "hot.toml"
        cfg.write_text(
            f'[server]\ndata_dir = "{tmp}"\n'
            '[[volumes]]\nname = "ram"\n[[volumes.layers]]\nkind = "ram"\n'
            f"size = {region}\n"
        )
        server = Server(load_config(str(cfg), flags={"listen": "127.0.0.1:0", "metrics": ""}))
        await server.start()
        floor = grpc.aio.server()
        pb_grpc.add_BlockDeviceServicer_to_server(FloorServicer(), floor)
        try:
            td, fl = _captured[0], _captured[-1]
            ctx = FakeContext()
            # Prefill the ram volume so reads copy real memory.
            for i in range(region // (1 << 20)):
                await one_call(
                    td,
                    "/tierdisk.v1.BlockDevice/Write",
                    _request("Write", "ram", 1 << 20, i, region),
                    ctx,
                )
            cases = [c for c in CASES if not profile or c == profile]
            raws = {
                c: [_request(CASES[c][0], "ram", CASES[c][1], i, region) for i in range(64)]
                for c in cases
            }
            best: dict[tuple[str, str], float] = {}
            prof = cProfile.Profile() if profile else None
            rounds = max(3, int(seconds * 10))
            # Interleaved short batches, minimum per cell: robust on a noisy shared machine.
            for _ in range(rounds):
                for case in cases:
                    path = f"/tierdisk.v1.BlockDevice/{CASES[case][0]}"
                    for name, record in (("floor", fl), ("tierdisk", td)):
                        profiling = prof is not None and name == "tierdisk"
                        n = 0
                        t0 = time.perf_counter()
                        deadline = t0 + 0.05
                        if profiling:
                            prof.enable()  # type: ignore[union-attr]
                        while True:
                            await one_call(record, path, raws[case][n % 64], ctx)
                            n += 1
                            if n % 16 == 0 and time.perf_counter() >= deadline:
                                break
                        if profiling:
                            prof.disable()  # type: ignore[union-attr]
                        us = (time.perf_counter() - t0) / n * 1e6
                        best[case, name] = min(best.get((case, name), us), us)
            if prof is not None:
                pstats.Stats(prof).sort_stats("tottime").print_stats(25)
            results: dict[str, dict[str, float]] = {}
            for case in cases:
                row = {name: round(best[case, name], 2) for name in ("floor", "tierdisk")}
                row["added"] = round(row["tierdisk"] - row["floor"], 2)
                results[case] = row
            return results
        finally:
            await server.stop(grace=0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--seconds",
        type=float,
        default=2.0,
        help="rounds / 10 (a round: 50 ms per case and server)",
    )
    p.add_argument("--profile", choices=sorted(CASES), help="cProfile one case (tierdisk)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    results = asyncio.run(measure(args.seconds, args.profile))
    if args.json:
        print(json.dumps({"levers": LEVERS, "us_per_call": results}))
        return 0
    print(f"{'case':10} {'floor us':>10} {'tierdisk us':>12} {'added us':>10}")
    for case, row in results.items():
        print(f"{case:10} {row['floor']:>10.2f} {row['tierdisk']:>12.2f} {row['added']:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
