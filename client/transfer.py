"""The verbs that move bytes between a volume and a file, a device, a pipe or stdin/stdout:
``read``, ``write``, ``import`` and ``export`` of the ``tierdisk`` command (DESIGN.md §7).
``read`` is here; ``write`` and ``import`` are in :mod:`tierdisk.client.import_verbs`,
``export`` in :mod:`tierdisk.client.export_verb`, all four importable from here. What they
share: local files and streams (:mod:`tierdisk.client.localfile`), planning requests
(:mod:`tierdisk.client.chunking`), and the progress bar and failure messages
(:mod:`tierdisk.client.copy_report`).

Each is a :data:`tierdisk.client.cli.Verb`: ``await verb(client, args)`` returns the exit
status, ``args`` being the parsed command line (:func:`tierdisk.client.cli_args.build_parser`).
A failure is raised for :func:`tierdisk.client.cli.main` to report in one line: a
:class:`~tierdisk.client.cli_errors.CliError` naming the file (or stdin, stdout), a
:class:`~tierdisk.client.errors.TierdiskError` from the server, or a
:class:`BrokenPipeError` when the reader of stdout went away.

Files, devices, pipes and ``-``
    ``-`` (as IMAGE, ``-i FILE`` or ``-o FILE``) is stdin or stdout; ``./-`` names a file.

    ``read`` writes its COUNT sectors in order, to stdout or to ``-o FILE`` (created, or
    truncated first). Without ``-o``, it refuses (a usage error, before any call) to write
    sectors to stdout when stdout is a terminal: raw bytes there garble the terminal and are
    rarely what was meant; ``-o -`` writes them there all the same (as ``curl`` does).
    The ``-o FILE`` of a failed or interrupted ``read`` keeps what was written before, and
    when it is a regular file the message ends saying how much (``; file 'F' holds only the
    N bytes written before``: it is not the file it was, nor whole); to stdout, a device or a
    FIFO, ``; N of T bytes went to stdout before``. A FILE that is a running tierdisk server's
    layer file (another process holds its ``flock``) is refused, not truncated, as
    ``export`` refuses to replace one.

Chunking
    Each request carries at most ``client.max_io`` bytes, a whole number of sectors
    (:func:`~tierdisk.client.chunking.sectors_per_chunk`; 1 MiB by default), with
    ``client.max_in_flight`` requests running at a time. ``read`` uses
    :meth:`~tierdisk.client.aio.AsyncVolume.stream_read`, which reads ahead in order.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import stat
import sys

from .aio import AsyncClient
from .cli_errors import UsageError, describe_file
from .copy_report import CopyInterrupted, progress_bar, reported_with_bytes_out, with_note
from .export_verb import export_image
from .import_verbs import import_image, write_sectors
from .localfile import (
    STD_STREAM,
    Sink,
    closing,
    isatty,
    open_file,
    refuse_a_locked_file,
    std_path,
)
from .progress import Progress

__all__ = ["STD_STREAM", "export_image", "import_image", "read_sectors", "write_sectors"]


async def read_sectors(client: AsyncClient, args: argparse.Namespace) -> int:
    """``read VOL SECTOR COUNT [-o FILE]``: the COUNT sectors from SECTOR, in order, to
    stdout or to FILE (created, or truncated first). Refused before anything is written if
    they reach past the end of the volume, or if FILE is a running server's layer file
    (:func:`_refuse_a_layer_file`). Without ``-o``, refused if stdout is a terminal
    (:func:`_refuse_a_terminal`)."""
    _refuse_a_terminal(args)
    vol = client.volume(args.volume)
    info = await vol.info()
    info.check_fits(args.sector, args.count)
    path = std_path(args.output)
    total = args.count * info.sector_size
    label = f"read {vol.name}"

    async def copy(sink: Sink, bar: Progress) -> None:
        try:
            with bar:
                async for _sector, data in vol.stream_read(args.sector, args.count):
                    await sink.write(data)
                    bar.advance(len(data))
            sink.flush()
        finally:
            sink.close()

    if path is None:
        # The bar is on stderr (if a terminal), so `read … | gzip > img.gz` shows one; but
        # not when stdout is a terminal too: raw sectors and a redrawn line would mix.
        data_on_tty = isatty(sys.stdout.buffer)
        sink = Sink()
        with reported_with_bytes_out(args, sink, total):
            await copy(sink, progress_bar(args, total, label, data_on_tty=data_on_tty))
        return 0
    _refuse_a_layer_file(path)
    fd = await open_file(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    sink = Sink(fd, path)
    said = (  # a device, a FIFO: how much went there (a regular file: what it holds, below)
        contextlib.nullcontext()
        if stat.S_ISREG(os.fstat(fd).st_mode)
        else reported_with_bytes_out(args, sink, total)
    )
    try:
        with closing(fd, path), said:
            await copy(sink, progress_bar(args, total, label))
    except Exception as exc:
        note = _what_it_holds(path)
        raise with_note(exc, args, path, f"; {note}" if note else "") from None
    except asyncio.CancelledError:  # Ctrl-C, SIGTERM, SIGHUP: say so too
        note = _what_it_holds(path)
        if note:
            raise CopyInterrupted(note) from None
        raise
    return 0


def _refuse_a_terminal(args: argparse.Namespace) -> None:
    """:class:`UsageError` for a ``read`` of one sector or more with no ``-o`` while stdout
    is a terminal: binary sectors would garble it. ``-o -`` (stdout, asked for by name)
    writes them there."""
    if args.output is None and args.count and isatty(sys.stdout.buffer):
        raise UsageError(
            f"read {args.volume}: stdout is a terminal; binary sectors would garble it: "
            "give -o FILE, pipe the output (| xxd), or -o - to write them there anyway"
        )


def _what_it_holds(path: str) -> str:
    """The note that ends the message of a failed or interrupted ``read -o FILE``: how many
    bytes the regular file ``path`` (truncated at the start) holds now; "" for anything else
    (a device, a pipe: nothing is left there to take for the data)."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    if not stat.S_ISREG(st.st_mode):
        return ""
    return f"{describe_file(path)} holds only the {st.st_size} bytes written before"


def _refuse_a_layer_file(path: str) -> None:
    """Refuse ``-o FILE`` (``path``) when it is a regular file, through any symlinks, that
    a running tierdisk server's layer holds (its ``flock``:
    :func:`~tierdisk.client.localfile.refuse_a_locked_file`): truncated, the layer's data
    would be gone. Anything else (a new file, a device, a pipe) is left to the open."""
    target = os.path.realpath(path)
    try:
        regular = stat.S_ISREG(os.stat(target).st_mode)
    except OSError:
        return
    if regular:
        refuse_a_locked_file(
            path, target, harm="Truncating it would destroy that layer's data", verb="read"
        )
