"""The ``tierdisk`` verbs about volumes that move no data (DESIGN.md §7): ``volumes``,
``info``, ``inspect``, ``map`` and ``watch`` print about them, ``resize`` and ``flush``
change them. Each is a :data:`tierdisk.client.cli.Verb`: ``await verb(client, args)``
returns the exit status (``args`` as :func:`tierdisk.client.cli_args.build_parser` parses
them); a failure is raised, for :func:`tierdisk.client.cli.main` to report in one line.

Sizes are in sectors of the volume (``resize`` also takes bytes with a unit); every line
goes to stdout through a :class:`~tierdisk.client.localfile.Sink` (:func:`_out`). The verbs
that move data are in :mod:`tierdisk.client.transfer`. Nothing imported here up front
imports grpc (:func:`tierdisk.client.cli.quiet_grpc_logs`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from typing import TYPE_CHECKING

from . import sizes
from .cli_args import size_argument
from .cli_errors import CliError, UsageError, describe_parts
from .localfile import Sink
from .progress import format_bytes

if TYPE_CHECKING:
    from .aio import AsyncClient
    from .models import ResizeEvent, VolumeInfo

__all__ = [
    "flush_volume",
    "print_info",
    "print_map",
    "print_tree",
    "print_volumes",
    "resize_volume",
    "watch_size",
]


async def _out(*lines: str, sink: Sink | None = None) -> None:
    """Print ``lines`` on stdout through ``sink``, else a :class:`~.localfile.Sink` of
    their own: to a pipe, a terminal or a socket it writes from a thread of its own, so a
    reader that stalls (``tierdisk map VOL | less``, paused) does not keep Ctrl-C, SIGTERM
    or SIGHUP from stopping the verb (on the event loop's thread the write would be retried
    after each signal, PEP 475, and the loop never run their handlers)."""
    text = "".join(line + "\n" for line in lines)
    data = text.encode(sys.stdout.encoding or "utf-8", sys.stdout.errors or "strict")
    own = sink is None
    out = Sink() if sink is None else sink
    try:
        await out.write(data)
        out.flush()
    finally:
        if own:
            out.close()


def _info_lines(info: VolumeInfo) -> list[str]:
    values: list[tuple[str, object]] = [
        ("sector_count", info.sector_count),
        ("sector_size", info.sector_size),
        ("name", info.name),
        ("physical_sector_size", info.physical_sector_size),
        ("read_only", info.read_only),
        ("fua_respected", info.fua_respected),
        ("disk_id", info.disk_id.hex()),
        ("unmap_behavior", info.unmap_behavior.value),
        ("optimal_unmap_sectors", info.optimal_unmap_sectors),
        ("volatile", info.volatile),
    ]
    if info.problem:  # only a volume that refuses all I/O until its server restarts
        values.append(("problem", info.problem))
    return [f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in values]


async def print_volumes(client: AsyncClient, args: argparse.Namespace) -> int:
    lines = []
    for v in await client.list_volumes():
        if not v.ready and not v.problem:  # configured, not attached yet (a remote tier
            lines.append(f"{v.name}\t(not ready)")  # is down): name only
            continue
        if v.problem:  # it refuses all I/O until its server restarts (or never opened)
            lines.append(f"{v.name}\t(stopped until a restart: {v.problem})")
            continue
        mode = "ro" if v.read_only else "rw"
        size = format_bytes(v.size_bytes)
        lines.append(f"{v.name}\t{v.sector_count}\t{v.sector_size}\t{mode}\t{size}")
    await _out(*lines)
    return 0


async def print_info(client: AsyncClient, args: argparse.Namespace) -> int:
    await _out(*_info_lines(await client.volume(args.volume).info()))
    return 0


async def print_tree(client: AsyncClient, args: argparse.Namespace) -> int:
    tree = await client.volume(args.volume).inspect(args.path)
    # Sorted keys, fixed indentation: outputs diff cleanly.
    await _out(json.dumps(tree, indent=2, sort_keys=True))
    return 0


async def print_map(client: AsyncClient, args: argparse.Namespace) -> int:
    extents = await client.volume(args.volume).allocation()
    await _out(*(f"{ext.sector}\t{ext.sector_count}\t{ext.depth}" for ext in extents))
    return 0


_WHY_SECONDS = 2.0
"""Seconds :func:`watch_size` gives the one call that says why no first event came."""


async def _print_size(event: ResizeEvent, sink: Sink) -> None:
    await _out(f"generation={event.generation} sector_count={event.sector_count}", sink=sink)


async def watch_size(client: AsyncClient, args: argparse.Namespace) -> int:
    """Runs until interrupted (exit 0, see :func:`main`); the server ending the stream (it
    shut down, or the connection broke) is an error: the sizes printed stop being current.
    ``--timeout`` bounds the wait for the first event (the size now), as it bounds any
    call: a peer that takes the call and never answers is an error, not a silent wait."""
    from .errors import DeadlineExceeded, TierdiskError

    vol = client.volume(args.volume)
    watching = False
    events = vol.watch_resize()
    sink = Sink()
    try:
        try:
            async with asyncio.timeout(args.timeout):
                first = await anext(events)
        except TimeoutError:
            # Why: a server that is down (its retries filled the time) says so to one call
            # (UNAVAILABLE, "connection refused"); one that answers it just did not watch.
            with contextlib.suppress(DeadlineExceeded):  # silent too: the watch's own words
                await vol.info(timeout=min(args.timeout, _WHY_SECONDS))
            raise DeadlineExceeded(
                f"no answer to the watch within {args.timeout:g} s", volume=vol.name
            ) from None
        watching = True
        await _print_size(first, sink)
        async for event in events:
            await _print_size(event, sink)
    except TierdiskError as err:
        if not watching:
            raise
        where, why = describe_parts(err, args.server)
        raise CliError(f"{where}: the server ended the watch: {why}") from None
    finally:
        sink.close()
    raise CliError(f"volume {vol.name!r} on {args.server}: the server ended the watch")


async def resize_volume(client: AsyncClient, args: argparse.Namespace) -> int:
    """``resize VOL SIZE``: a size no volume can have (no sector, over the size limit,
    :func:`~tierdisk.client.sizes.size_limit_problem`) or not whole sectors is a bad
    argument (exit 2), as is a shrink not asked for; only the volume's size and sector
    size are asked for first."""
    value, in_bytes = size_argument(args.size)
    vol = client.volume(args.volume)
    if value > (sizes.MAX_BYTES if in_bytes else sizes.MAX_SECTORS):  # whatever the sector size
        most = f"{sizes.MAX_BYTES} bytes" if in_bytes else f"{sizes.MAX_SECTORS} sectors"
        raise UsageError(f"size {args.size!r} is over the size limit of any volume ({most})")
    info = await vol.info()  # the sector size, and the size now: shrinking must be asked for
    ss = info.sector_size
    sectors = value
    if in_bytes:
        if value % ss:
            raise UsageError(
                f"size {args.size!r} ({value} bytes) is not a whole number of "
                f"{ss}-byte sectors of volume {vol.name!r}"
            )
        sectors = value // ss
    if sectors == 0:
        raise UsageError(f"volume {vol.name!r}: size {args.size!r}: a volume has a sector or more")
    problem = sizes.size_limit_problem(ss, sectors)
    if problem is not None:
        raise UsageError(f"volume {vol.name!r}: size {args.size!r}: {problem}")
    if sectors < info.sector_count and not args.shrink:
        asked = (
            f"{args.size} ({sectors} sectors)"
            if in_bytes
            else f"{sectors} sectors ({format_bytes(sectors * ss)})"
        )
        raise UsageError(
            f"volume {vol.name!r}: {asked} is smaller than its {info.sector_count} sectors "
            f"({format_bytes(info.size_bytes)}); pass --shrink to shrink it and lose the data "
            "past the new end"
        )
    await _out(*_info_lines(await vol.resize(sectors)))
    return 0


async def flush_volume(client: AsyncClient, args: argparse.Namespace) -> int:
    await client.volume(args.volume).flush(verifiers=args.verifier)
    return 0
