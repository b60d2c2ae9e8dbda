"""Persistent layers survive SIGKILL at any moment (DESIGN.md §3 Flush and FUA, §4).

Each round starts a real child process (tests/crashcheck.py) that opens the layer through
the engine and streams writes, fua writes, unmaps and flushes (some concurrently), reporting
each intent and acknowledgement over a pipe. The test SIGKILLs it after a random delay,
reopens the layer in this process and checks, with :func:`crashcheck.check_recovery`, that
every flushed or FUA-acknowledged write is there, that no sector holds garbage or an
overwritten value, and that presence never claims a sector nobody wrote. The next round
runs on top of what survived. Rounds alternate between the layer alone (unmaps drop
sectors) and the layer over a RAM layer (unmaps keep sectors present as zeros); for sparse,
some rounds compact the presence map all the time, so kills also land mid-compaction.

Bounded: a fixed number of rounds and a time budget per kind (the last round is cut short
rather than the budget exceeded).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
from crashcheck import History, check_recovery, sector_value

from tierdisk.service.layer import Layer
from tierdisk.service.layers.sparse import SparseLayer
from tierdisk.service.layers.sqlite import SqliteLayer
from tierdisk.service.runs import Run
from tierdisk.service.volume import LayerEntry, Volume

CHILD = Path(__file__).resolve().parent / "crashcheck.py"
SECTOR_SIZE = 512
SIZE = 8 << 20
ROUNDS = 20
BUDGET_S = 12.0

KINDS: dict[str, type[SparseLayer] | type[SqliteLayer]] = {
    "sparse": SparseLayer,
    "sqlite": SqliteLayer,
}


async def run_until_killed(argv: list[str], delay: float, history: History) -> int:
    """Run the child ``argv``, SIGKILL it ``delay`` seconds after it reports READY, and feed
    every line it wrote to ``history``. Returns the child's exit status (negative: signal)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    stdout, stderr = proc.stdout, proc.stderr

    ready = asyncio.Event()

    async def pump() -> None:
        while line := await stdout.readline():
            history.feed(line.decode(errors="replace"))
            if history.ready:
                ready.set()
        ready.set()  # the child ended before it was ready: stop waiting

    pumping = asyncio.create_task(pump())
    try:
        await asyncio.wait_for(ready.wait(), 20)
        if history.ready:
            await asyncio.sleep(delay)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        status = await proc.wait()
        await pumping
    if not history.ready:
        err = (await stderr.read()).decode(errors="replace")
        pytest.fail(f"crash child never became ready (status {status}):\n{err}")
    return status


async def open_and_check(kind: str, path: str, history: History) -> list[str]:
    """Reopen the layer alone and check it against ``history``."""
    layer: Layer = KINDS[kind](path)
    volume = await Volume.open("recovered", [LayerEntry(layer)])
    try:

        async def read(sector: int, count: int) -> tuple[bytes, list[Run]]:
            data, runs = await volume.read(sector, count)
            return bytes(data), runs

        assert volume.sector_count * SECTOR_SIZE == SIZE
        return await check_recovery(read, history)
    finally:
        await volume.close()


@pytest.mark.parametrize("kind", sorted(KINDS))
async def test_sigkill_at_random_moments_keeps_every_durable_write(
    kind: str, tmp_path: Path
) -> None:
    path = str(tmp_path / "layer" / f"disk.{kind}")
    rng = random.Random(f"crash-{kind}")
    history = History(SECTOR_SIZE, SIZE // SECTOR_SIZE)
    first_id = 1
    deadline = time.monotonic() + BUDGET_S
    durable = acknowledged = 0
    rounds = 0
    for rnd in range(ROUNDS):
        if rnd and time.monotonic() > deadline:
            break
        argv = [
            sys.executable,
            str(CHILD),
            "--kind",
            kind,
            "--path",
            path,
            "--size",
            str(SIZE),
            "--sector-size",
            str(SECTOR_SIZE),
            "--first-id",
            str(first_id),
            "--seed",
            str(rng.randrange(1 << 30)),
        ]
        if rnd % 2:
            argv.append("--over-ram")
        if kind == "sparse" and rnd % 3 == 2:
            argv += ["--compact-min", "512"]
        status = await run_until_killed(argv, rng.uniform(0.05, 0.6), history)
        assert status == -signal.SIGKILL, f"round {rnd}: the child exited by itself ({status})"
        durable += history.durable
        acknowledged += history.acknowledged
        first_id = max((op.op_id for op in history.ops), default=first_id) + 1
        problems = await open_and_check(kind, path, history)
        assert not problems, f"round {rnd} ({' '.join(argv[2:])}):\n" + "\n".join(problems)
        rounds += 1
    # The test proves something only if writes were acknowledged and made durable.
    assert rounds >= 3
    assert durable > 0 and acknowledged > durable, (durable, acknowledged)


async def test_checker_catches_a_lost_durable_write(tmp_path: Path) -> None:
    """The checker itself: a flushed write that did not survive is reported."""
    history = History(SECTOR_SIZE, 64)
    for line in ["READY", "I 1 W 3 2 0", "A 1", "F 1", "D 1", "I 2 W 4 1 1", "A 2"]:
        history.feed(line)
    layer = SparseLayer(str(tmp_path / "d"), size=64 * SECTOR_SIZE)
    volume = await Volume.open("v", [LayerEntry(layer)])
    try:

        async def read(sector: int, count: int) -> tuple[bytes, list[Run]]:
            data, runs = await volume.read(sector, count)
            return bytes(data), runs

        problems = await check_recovery(read, history)
        assert len(problems) == 2 and all("may survive" in p for p in problems), problems
        await volume.write(3, sector_value(1, 3, SECTOR_SIZE) + sector_value(2, 4, SECTOR_SIZE))
        assert await check_recovery(read, history) == []
        await volume.write(9, b"\x01" * SECTOR_SIZE)
        await volume.write(10, sector_value(7, 10, SECTOR_SIZE))
        problems = await check_recovery(read, history)
        assert [p.split(":")[0] for p in problems] == ["sector 9", "sector 10", "sector 10"]
        assert "garbage" in problems[0] and "changed" in problems[1] and "present" in problems[2]
    finally:
        await volume.close()


def test_child_refuses_to_start_on_a_locked_layer(tmp_path: Path) -> None:
    """Sanity of the harness: the child really goes through the layer's lock."""
    path = str(tmp_path / "d")

    async def scenario() -> None:
        layer = SparseLayer(path, size=SIZE)
        volume = await Volume.open("v", [LayerEntry(layer)])
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(CHILD),
                "--kind=sparse",
                f"--path={path}",
                f"--size={SIZE}",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(), 20)
            assert proc.returncode != 0 and b"READY" not in out
            assert b"already open" in err and path.encode() in err
        finally:
            await volume.close()

    asyncio.run(scenario())
    assert os.path.exists(path + ".map")
