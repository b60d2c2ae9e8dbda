"""Process-wide set-up at start: descriptors 0-2 made safe (:func:`reopen_closed_stdio`),
tuning for moving ~1 MiB messages fast (glibc malloc settings and uvloop), and, opt-in, for
many small calls on a machine of their own (gRPC's poller thread in the batch scheduling
class, :func:`batch_grpc_poller`; ``[server] grpc_poller_batch``).

Measured on this project's machine (DESIGN.md §6, ``perf-baselines.md``): with glibc's default
malloc, every ~1 MiB message is allocated with ``mmap`` and given back with ``munmap``, about
1,000 page faults per message; raising the mmap and trim thresholds and padding the heap top
keeps those buffers in the heap and makes 1 MiB messages 3-4x faster, on the client as on the
server. uvloop adds another 10-30%. Both are process-wide, so the CLI (and the server) call
these once at start; a library user decides for their own process.

Benchmark switches (bench/README.md): ``TIERDISK_NO_MALLOC_TUNING=1`` makes
:func:`tune_malloc` and ``TIERDISK_NO_UVLOOP=1`` makes :func:`install_uvloop` do nothing and
return False, so a benchmark can show what each lever is worth in the same processes.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import importlib
import os
import re
import sys
import threading

__all__ = [
    "NO_MALLOC_TUNING_ENV",
    "NO_UVLOOP_ENV",
    "batch_grpc_poller",
    "install_uvloop",
    "reopen_closed_stdio",
    "tune_malloc",
]

NO_MALLOC_TUNING_ENV = "TIERDISK_NO_MALLOC_TUNING"
"""Set (to anything but "" or "0") to turn :func:`tune_malloc` off: a benchmark switch."""
NO_UVLOOP_ENV = "TIERDISK_NO_UVLOOP"
"""Set (to anything but "" or "0") to turn :func:`install_uvloop` off: a benchmark switch."""


def _switched_off(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


_STDIO = (
    (0, "stdin", os.O_WRONLY, "r", "strict"),
    (1, "stdout", os.O_RDONLY, "w", "strict"),
    (2, "stderr", os.O_WRONLY, "w", "backslashreplace"),
)
"""Per standard descriptor: its ``sys`` name, how /dev/null is opened in its place, and the
mode and ``errors`` of the text stream Python would have made for it."""


def reopen_closed_stdio() -> list[int]:
    """Open /dev/null on each of descriptors 0, 1 and 2 that is closed (``tierdisk … >&-``,
    a supervisor that closes stdin); return those descriptors. Call it first thing at process
    start, before anything opens a descriptor.

    Otherwise the next descriptor opened lands on 0-2: libuv (uvloop) then aborts the process
    (``uv__close: Assertion `fd > STDERR_FILENO' failed``), and a gRPC socket could receive
    what is printed. A closed stdin and stdout stay unusable, so a verb that needs them still
    fails as it would have, with the usual one line: /dev/null is opened for the direction
    they are not used in (stdin write-only, stdout read-only), and reading or writing them
    fails with ``EBADF`` ("Bad file descriptor"), as on the closed descriptor. A closed stderr
    becomes /dev/null for writing: nothing written there is seen, as before, and nothing
    fails. ``sys.stdin``/``sys.stdout``/``sys.stderr``, ``None`` when Python started without
    the descriptor, become text streams on the new ones."""
    reopened = []
    for fd, name, flags, mode, errors in _STDIO:
        try:
            os.fstat(fd)
            continue
        except OSError as exc:
            if exc.errno != errno.EBADF:
                continue
        # The lowest free descriptor is fd itself: those below it are open by now.
        new = os.open(os.devnull, flags)
        if new != fd:
            os.dup2(new, fd)
            os.close(new)
        os.set_inheritable(fd, True)
        reopened.append(fd)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, errors=errors, closefd=False))  # noqa: SIM115
    return reopened


# mallopt() parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20
"""Allocations below this come from the heap, not a fresh mmap (32 MiB is glibc's maximum
on 64-bit)."""
TRIM_THRESHOLD = 512 << 20
"""Free heap top kept instead of trimmed back to the kernel."""
TOP_PAD = 64 << 20
"""Extra heap grown per sbrk, so growth is rare."""


def tune_malloc(
    *,
    mmap_threshold: int = MMAP_THRESHOLD,
    trim_threshold: int = TRIM_THRESHOLD,
    top_pad: int = TOP_PAD,
) -> bool:
    """Set glibc's ``M_MMAP_THRESHOLD``, ``M_TRIM_THRESHOLD`` and ``M_TOP_PAD`` with
    ``mallopt`` (what the ``MALLOC_MMAP_THRESHOLD_`` etc. environment variables do, but from
    inside the process). True when all three were accepted; False, changing nothing, where
    the C library is not glibc, or when ``TIERDISK_NO_MALLOC_TUNING`` is set. Safe to call
    more than once."""
    if _switched_off(NO_MALLOC_TUNING_ENV) or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 -- only glibc has it
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = True
    for param, value in (
        (M_MMAP_THRESHOLD, mmap_threshold),
        (M_TRIM_THRESHOLD, trim_threshold),
        (M_TOP_PAD, top_pad),
    ):
        ok = mallopt(param, value) == 1 and ok
    return ok


def install_uvloop() -> bool:
    """Make uvloop the event loop of later ``asyncio.run()`` calls, if it is installed
    (the ``fast`` extra) and ``TIERDISK_NO_UVLOOP`` is not set. True when it is."""
    if _switched_off(NO_UVLOOP_ENV):
        return False
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


POLLER_THREAD_NAME = re.compile(r"Thread-\d+ \(_poll_wrapper\)")
"""The name of ``grpc.aio``'s completion-queue poller thread: Python names a thread after
its target (``Thread-1 (_poll_wrapper)``)."""


def batch_grpc_poller() -> bool:
    """Put ``grpc.aio``'s completion-queue poller thread in Linux's ``SCHED_BATCH``
    scheduling class; True when it is there (moved now or before). Opt-in: a trade-off,
    below.

    That thread wakes for every completion gRPC's core reports (four or five per unary
    call), hands it to the event loop and sleeps again. In the default class most of those
    wake-ups preempt whatever runs on its CPU, usually the event loop's own thread: three to
    five involuntary context switches of the loop per 4 KiB read (measured on a 2-vCPU VM,
    32 reads in flight). A ``SCHED_BATCH`` thread gets the same share of the CPU but does
    not preempt on wake-up; it runs when a CPU is free or the running thread's slice ends.
    There, a 4 KiB read then cost the server ~15% less CPU and the client ~10-15% less;
    1 MiB calls were not changed. But it does not preempt other processes either: with
    busy processes on every CPU, completions wait for them to yield, and 4 KiB reads did
    fewer per second at one in flight (657 against 1,483) with a 99th percentile latency
    of 8.5 ms against 4.5, and 64 ms against 18 at 32 in flight (bench/README.md, "gRPC's
    poller thread in the batch class"; ``bench/contention.py``). Needs no privilege.

    The thread starts with the process's first ``grpc.aio`` server or channel, and gRPC
    ends it when the last one closes: call this once one exists (before, it finds nothing
    and returns False), and again after a new one replaced them all. Idempotent. Only a
    thread in the default class (``SCHED_OTHER``) is moved: one an operator made real-time
    or idle is left as it is (False). False, changing nothing, off Linux, when the thread
    is not found (a gRPC without it) or when the system refuses (a seccomp policy)."""
    if not hasattr(os, "SCHED_BATCH"):
        return False
    batched = False
    for thread in threading.enumerate():
        tid = thread.native_id
        if tid is None or not POLLER_THREAD_NAME.fullmatch(thread.name):
            continue
        try:
            policy = os.sched_getscheduler(tid)
            if policy == os.SCHED_OTHER:
                os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
            elif policy != os.SCHED_BATCH:
                continue
        except OSError:  # gone meanwhile, or not allowed here
            continue
        batched = True
    return batched
