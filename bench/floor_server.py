"""The floor: a bare ``grpc.aio`` server of tierdisk's own proto, with no storage.

It answers ``Read`` (and ``ReadBatch``) with a reply whose ``data`` has exactly the requested
size (one cached random payload per size: no storage, no copy out of a store) and ``Write`` by
checking the payload length and dropping it, through the generated servicer and protobuf
serializers, with the same message caps as ``tierdisk serve`` and no handler wrappers,
metrics, engine or drain gate. What it costs is what Python gRPC itself costs here;
``tierdisk serve`` can at best match it.

``--like-tierdisk`` adds what ``tierdisk serve`` wraps around its servicer and costs per
call without doing any storage work: a coroutine around every handler (tierdisk's records
the ``grpc_server_*`` metrics; a pass-through one here), the standard health service and
server reflection. The difference between the two floors is the price of
that composition; the rest of tierdisk's difference is its own code.

It honours the same levers as the server (``TIERDISK_NO_UVLOOP=1``,
``TIERDISK_NO_MALLOC_TUNING=1``)::

    python bench/floor_server.py --listen 127.0.0.1:0 --ready-file R.json

writes ``{"grpc": ADDR, "pid": PID}`` to R.json when serving; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GRPC_SERVER_OPTIONS, SECTOR, apply_levers, apply_poller_lever

LEVERS = apply_levers()  # before grpc allocates anything

import grpc  # noqa: E402

from tierdisk.v1 import blockdevice_pb2 as pb  # noqa: E402
from tierdisk.v1 import blockdevice_pb2_grpc as pb_grpc  # noqa: E402

VOLUME_SECTORS = (1 << 40) // SECTOR  # any sector number is fine: nothing is stored


class FloorServicer(pb_grpc.BlockDeviceServicer):
    """Read and Write with the right message shapes and nothing behind them."""

    def __init__(self) -> None:
        self._payloads: dict[int, bytes] = {}

    def _payload(self, nbytes: int) -> bytes:
        data = self._payloads.get(nbytes)
        if data is None:
            data = self._payloads[nbytes] = os.urandom(nbytes)
        return data

    async def Read(self, request: pb.ReadRequest, context: Any) -> pb.ReadResponse:
        return pb.ReadResponse(data=self._payload(request.sector_count * SECTOR))

    async def ReadBatch(self, request: pb.ReadBatchRequest, context: Any) -> pb.ReadBatchResponse:
        sectors = sum(r.sector_count for r in request.ranges)
        return pb.ReadBatchResponse(data=self._payload(sectors * SECTOR))

    async def Write(self, request: pb.WriteRequest, context: Any) -> pb.WriteResponse:
        if len(request.data) % SECTOR:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not whole sectors")
        return pb.WriteResponse()

    async def GetVolume(self, request: pb.GetVolumeRequest, context: Any) -> pb.Volume:
        return pb.Volume(
            name=request.volume,
            sector_size=SECTOR,
            sector_count=VOLUME_SECTORS,
            physical_sector_size=SECTOR,
        )

    async def _unimplemented(self, request: Any, context: Any) -> Any:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, "the floor serves Read, ReadBatch, Write, GetVolume"
        )

    ListVolumes = Unmap = Flush = GetAllocation = Inspect = Resize = _unimplemented

    async def WatchResize(
        self, request: pb.WatchResizeRequest, context: Any
    ) -> AsyncIterator[pb.ResizeEvent]:
        await self._unimplemented(request, context)
        yield pb.ResizeEvent()  # not reached: abort() raises


def _write_ready(path: str, info: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, path)


class PassThroughHandlers:
    """Registers handlers on ``server`` with a pass-through coroutine around each unary one
    (where tierdisk's ``InstrumentedRegistry`` puts its metrics)."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    @staticmethod
    def _wrap(handler: Any) -> Any:
        if handler.unary_unary is None:
            return handler
        behavior = handler.unary_unary

        async def wrapped(request: Any, context: Any) -> Any:
            return await behavior(request, context)

        return handler._replace(unary_unary=wrapped)

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(handlers)  # registered ones take precedence

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self._server.add_registered_method_handlers(
            service, {name: self._wrap(h) for name, h in handlers.items()}
        )


async def serve(listen: str, ready_file: str | None, like_tierdisk: bool = False) -> None:
    server = grpc.aio.server(options=GRPC_SERVER_OPTIONS)
    if not like_tierdisk:
        pb_grpc.add_BlockDeviceServicer_to_server(FloorServicer(), server)
    else:
        from grpc_health.v1 import health, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

        registry: Any = PassThroughHandlers(server)
        pb_grpc.add_BlockDeviceServicer_to_server(FloorServicer(), registry)
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), registry)
        service = pb.DESCRIPTOR.services_by_name["BlockDevice"].full_name
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(
                (service, health.SERVICE_NAME, reflection.SERVICE_NAME)
            ),
            registry,
        )
    port = server.add_insecure_port(listen)
    if port == 0:
        raise SystemExit(f"floor_server: cannot bind {listen}")
    await server.start()
    apply_poller_lever(LEVERS)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready_file:
        host = listen.rpartition(":")[0]
        _write_ready(ready_file, {"grpc": f"{host}:{port}", "pid": os.getpid(), "levers": LEVERS})
    await stop.wait()
    await server.stop(0.5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--ready-file")
    p.add_argument(
        "--like-tierdisk",
        action="store_true",
        help="add handler wrappers, health and reflection, as tierdisk serve has",
    )
    args = p.parse_args()
    asyncio.run(serve(args.listen, args.ready_file, args.like_tierdisk))


if __name__ == "__main__":
    main()
