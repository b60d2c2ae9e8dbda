"""tierdisk.client.tune (client/tune.py): process-wide tuning, glibc malloc settings,
uvloop and gRPC's poller thread in the batch scheduling class."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from servers import ServerProcess, ram, server_section, toml_volume, write_config

from tierdisk.client.tune import (
    POLLER_THREAD_NAME,
    batch_grpc_poller,
    install_uvloop,
    tune_malloc,
)

linux_scheduling = pytest.mark.skipif(
    not hasattr(os, "SCHED_BATCH"), reason="scheduling classes are Linux's"
)


def in_default_class() -> None:
    """Skip unless this process runs in the default class (a suite started under ``chrt -b``
    or ``-i`` gives every thread that class: nothing to tell the poller apart by)."""
    if os.sched_getscheduler(0) != os.SCHED_OTHER:
        pytest.skip("the suite runs outside the default scheduling class (chrt)")


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


def policies(pid: int) -> dict[int, int]:
    """Thread id -> scheduling policy, for every thread of process ``pid``."""
    found = {}
    for name in os.listdir(f"/proc/{pid}/task"):
        try:
            found[int(name)] = os.sched_getscheduler(int(name))
        except OSError:  # ended meanwhile
            continue
    return found


def pollers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if POLLER_THREAD_NAME.fullmatch(t.name)]


@contextmanager
def poller_in_default_class() -> Iterator[threading.Thread]:
    """This process's grpc.aio poller thread, put back in the default class before and
    after (an earlier test may have moved it)."""
    (poller,) = pollers()
    assert poller.native_id is not None
    default = os.sched_param(0)
    os.sched_setscheduler(poller.native_id, os.SCHED_OTHER, default)
    try:
        yield poller
    finally:
        os.sched_setscheduler(poller.native_id, os.SCHED_OTHER, default)


@linux_scheduling
async def test_batch_grpc_poller_moves_only_the_poller_thread() -> None:
    in_default_class()
    channel = grpc.aio.insecure_channel("127.0.0.1:1")  # starts grpc.aio (never connects)
    # A thread of ours whose name only ends like the poller's is not moved.
    stop = threading.Event()
    decoy = threading.Thread(target=stop.wait, name="not gRPC's (_poll_wrapper)", daemon=True)
    decoy.start()
    try:
        with poller_in_default_class() as poller:
            before = policies(os.getpid())
            assert batch_grpc_poller() is True
            after = policies(os.getpid())
            assert after.pop(poller.native_id or 0) == os.SCHED_BATCH
            assert after == {tid: before[tid] for tid in after}
            assert batch_grpc_poller() is True  # idempotent
    finally:
        stop.set()
        decoy.join(5)
        await channel.close()


@linux_scheduling
async def test_batch_grpc_poller_leaves_a_poller_in_another_class_alone() -> None:
    """A poller an operator put in another class (here the idle one, which needs no
    privilege) is not moved: False, and it stays there."""
    in_default_class()
    channel = grpc.aio.insecure_channel("127.0.0.1:1")
    try:
        with poller_in_default_class() as poller:
            tid = poller.native_id or 0
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            assert batch_grpc_poller() is False
            assert os.sched_getscheduler(tid) == os.SCHED_IDLE
    finally:
        await channel.close()


ONE_VOLUME = toml_volume("w", ram("1MiB"))


@linux_scheduling
@pytest.mark.parametrize("how", ["default", "flag", "config", "environment"])
def test_serve_puts_one_thread_in_the_batch_class_only_when_asked(
    tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``[server] grpc_poller_batch`` (its flag, its environment override) is opt-in: a
    running ``tierdisk serve`` then has exactly one thread in ``SCHED_BATCH`` (gRPC's
    poller), and none by default."""
    in_default_class()
    monkeypatch.delenv("TIERDISK_SERVER_GRPC_POLLER_BATCH", raising=False)
    body = ONE_VOLUME
    args: list[str] = []
    env: dict[str, str] = {}
    if how == "flag":
        args = ["--grpc-poller-batch", "true"]
    elif how == "config":
        body = server_section("127.0.0.1:0", tmp_path) + "grpc_poller_batch = true\n" + body
    elif how == "environment":
        env = {"TIERDISK_SERVER_GRPC_POLLER_BATCH": "yes"}
    config = write_config(tmp_path, body)
    with ServerProcess.start(tmp_path, config, *args, env=env) as srv:
        batched = [p for p in policies(srv.pid).values() if p == os.SCHED_BATCH]
        assert len(batched) == (0 if how == "default" else 1)
        assert srv.terminate() == 0
        assert "grpc_poller_batch" not in srv.stderr_text()  # no "not moved" warning


@linux_scheduling
def test_serve_warns_when_asked_and_the_poller_is_not_moved(tmp_path: Path) -> None:
    """A server started in the idle class (its poller with it: not the default class, so
    not moved) and asked for the lever says so in one warning, and serves."""
    in_default_class()
    config = write_config(tmp_path, ONE_VOLUME)
    ready = tmp_path / "ready.json"
    cmd = [sys.executable, "-m", "tierdisk.service", "--config", str(config)]
    cmd += ["--ready-file", str(ready), "--grpc-poller-batch", "true"]
    env = {k: v for k, v in os.environ.items() if k != "TIERDISK_SERVER_GRPC_POLLER_BATCH"}

    def idle() -> None:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))

    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env=env, preexec_fn=idle)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the server did not start"
        assert set(policies(proc.pid).values()) == {os.SCHED_IDLE}  # nothing moved
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    warnings = [line for line in err.decode().splitlines() if "grpc_poller_batch" in line]
    assert len(warnings) == 1 and "not moved" in warnings[0], err.decode()
