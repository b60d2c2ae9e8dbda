"""Crash consistency through a real server: SIGKILL ``tierdisk serve`` at random moments
while a client streams writes, fua writes, unmaps and flushes over gRPC, restart it on the
same data, and check with :func:`crashcheck.check_recovery` that every flushed or
FUA-acknowledged write survived, nothing is garbage, and presence never runs ahead of data.

Bounded: a fixed number of rounds per layer kind and a time budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from pathlib import Path

import grpc
import pytest
from crashcheck import History, check_recovery, sector_value
from servers import ServerProcess, write_config

from tierdisk.v1 import blockdevice_pb2 as pb
from tierdisk.v1 import blockdevice_pb2_grpc as pb_grpc

SECTOR_SIZE = 512
SIZE = 4 << 20
SECTORS = SIZE // SECTOR_SIZE
ROUNDS = 6
BUDGET_S = 20.0


async def _stream_until_killed(
    address: str, server: ServerProcess, history: History, first_id: int, rng: random.Random
) -> int:
    """Write over gRPC until the server is SIGKILLed after a random delay; return the
    next free op id."""
    next_id = first_id
    lines = 0

    def say(line: str) -> None:
        nonlocal lines
        lines += 1
        history.feed(line)

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.BlockDeviceStub(channel)

        async def one(op_id: int) -> None:
            count = rng.choice((1, 2, 8, 33))
            start = rng.randrange(0, min(SECTORS, 2048) - count)
            if rng.random() < 0.15:
                say(f"I {op_id} U {start} {count}")
                await stub.Unmap(pb.UnmapRequest(volume="v", sector=start, sector_count=count))
            else:
                fua = rng.random() < 0.2
                say(f"I {op_id} W {start} {count} {int(fua)}")
                data = b"".join(
                    sector_value(op_id, s, SECTOR_SIZE) for s in range(start, start + count)
                )
                await stub.Write(pb.WriteRequest(volume="v", sector=start, data=data, fua=fua))
            say(f"A {op_id}")

        async def writer() -> None:
            nonlocal next_id
            flushes = 0
            while True:
                roll = rng.random()
                if roll < 0.15:
                    flushes += 1
                    say(f"F {flushes}")
                    await stub.Flush(pb.FlushRequest(volume="v"))
                    say(f"D {flushes}")
                elif roll < 0.4:
                    batch = list(range(next_id, next_id + rng.randint(2, 4)))
                    next_id += len(batch)
                    await asyncio.gather(*(one(i) for i in batch))
                else:
                    next_id += 1
                    await one(next_id - 1)

        task = asyncio.create_task(writer())
        await asyncio.sleep(rng.uniform(0.2, 1.0))
        server.kill()
        with contextlib.suppress(grpc.aio.AioRpcError):
            await asyncio.wait_for(task, 30)
    return next_id + 1


async def _check(address: str, history: History) -> list[str]:
    options = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = pb_grpc.BlockDeviceStub(channel)

        async def read(sector: int, count: int) -> tuple[bytes, list[tuple[int, int]]]:
            reply = await stub.Read(
                pb.ReadRequest(volume="v", sector=sector, sector_count=count, report_presence=True)
            )
            return reply.data, [(e.sector, e.sector + e.sector_count) for e in reply.present]

        return await check_recovery(read, history)


@pytest.mark.parametrize("kind", ["sparse", "sqlite"])
async def test_sigkill_server_keeps_every_durable_write(kind: str, tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        f"[[volumes]]\nname = 'v'\n[[volumes.layers]]\nkind = '{kind}'\npath = 'v.{kind}'\n"
        f"size = {SIZE}\n",
    )
    rng = random.Random(f"server-crash-{kind}")
    history = History(SECTOR_SIZE, SECTORS)
    first_id = 1
    durable = acknowledged = rounds = 0
    deadline = time.monotonic() + BUDGET_S
    for rnd in range(ROUNDS):
        if rnd and time.monotonic() > deadline:
            break
        server = await asyncio.to_thread(ServerProcess.start, tmp_path, config)
        try:
            history.ready = True
            first_id = await _stream_until_killed(server.grpc, server, history, first_id, rng)
        finally:
            server.kill()
        durable += history.durable
        acknowledged += history.acknowledged
        checker = await asyncio.to_thread(ServerProcess.start, tmp_path, config)
        try:
            problems = await _check(checker.grpc, history)
        finally:
            checker.kill()
        assert not problems, f"{kind} round {rnd}:\n" + "\n".join(problems)
        rounds += 1
    assert rounds >= 3
    assert durable > 0 and acknowledged > durable, (durable, acknowledged)
