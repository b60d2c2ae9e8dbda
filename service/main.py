"""``tierdisk serve``: parse flags, load the config, run the server until SIGTERM/SIGINT/SIGHUP.

Exit status: 0 after a clean stop; 2 for a config error (one line naming the volume, the
layer index and the problem, ``config error: …``), and for a volume whose layer's files are
corrupt, lost, or cannot be opened, read or created (``cannot start: …``, so the operator
looks at the files, not at the config); 1 when the server itself cannot start (e.g. an
address in use).
SIGTERM, SIGINT and SIGHUP (a closed terminal or ssh session; unless ignored, as under
``nohup``) stop the server gracefully from the moment it starts: one that arrives while it is
still starting (a remote tier can take seconds to answer) ends the start instead, closing what
was opened (``stopped while starting``), and the exit status is 0 as for any stop: 1, with
a line naming them, when the final flush of some volume failed (writes acknowledged since
their last Flush may not be durable).
``--ready-file FILE`` writes ``{"grpc": …, "metrics": …, "nbd": …, "nbd_tls": …, "pid": …}``
once serving, so scripts and tests can start a server on port 0 and find it (``nbd_tls``: true
when the NBD export requires TLS); it is removed as the server stops, and a start removes
one that names a process no longer running (:func:`_remove_ready_file`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import resource
import secrets
import signal

from tierdisk.client.checks import ascii_float
from tierdisk.client.tune import (
    batch_grpc_poller,
    install_uvloop,
    reopen_closed_stdio,
    tune_malloc,
)

from .attach_retry import failure_chain
from .config import Config, load_config
from .config_values import MAX_SECONDS
from .errors import ConfigError, StorageError
from .logs import configure_logging, say
from .ratelimit import tell_held_lines
from .server import Server

__all__ = ["main"]

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tierdisk serve",
        description="Serve layered volumes over gRPC. With no --config, serves one volume "
        "'default': a 1 GiB sparse layer in the data dir.",
    )
    p.add_argument("--config", metavar="FILE", help="TOML config (the README's 'Configure')")
    p.add_argument("--listen", help="gRPC address, HOST:PORT or unix:PATH (127.0.0.1:7400)")
    p.add_argument(
        "--metrics", help="Prometheus /metrics address (127.0.0.1:9400); '' turns it off"
    )
    p.add_argument("--data-dir", help="where relative layer paths live (./tierdisk-data)")
    p.add_argument("--max-io", help="largest Read/Write payload, 1MiB to 256MiB (16MiB)")
    p.add_argument(
        "--nbd", help="NBD export address, HOST:PORT or unix:PATH ('': off, the default)"
    )
    p.add_argument(
        "--nbd-max-connections", help="NBD connections taken at once; more are refused (64)"
    )
    p.add_argument(
        "--nbd-tls-cert",
        metavar="FILE",
        help="PEM certificate (chain) of the NBD export: with --nbd-tls-key, the export "
        "requires TLS ('': no TLS, the default; relative to the data dir)",
    )
    p.add_argument("--nbd-tls-key", metavar="FILE", help="PEM private key of --nbd-tls-cert")
    p.add_argument(
        "--nbd-tls-ca",
        metavar="FILE",
        help="PEM CA bundle: NBD clients must present a certificate it signed (mutual TLS)",
    )
    p.add_argument(
        "--grpc-poller-batch",
        metavar="BOOL",
        help="true: gRPC's poller thread in Linux's SCHED_BATCH class, for a machine of its "
        "own (faster small calls; slower tails when other processes keep the CPUs busy). "
        "false, the default",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log messages at this level and above (info)",
    )
    p.add_argument(
        "--log-format", default="text", choices=["text", "json"], help="format of log lines (text)"
    )
    p.add_argument(
        "--ready-file",
        metavar="FILE",
        help="when serving, write the bound addresses, nbd_tls and the pid here as JSON "
        "(removed at the stop)",
    )
    p.add_argument(
        "--grace", type=_seconds, default=30.0, help="seconds calls in flight get at stop (30)"
    )
    return p


def _seconds(text: str) -> float:
    """A number of seconds from 0 to :data:`~.config_values.MAX_SECONDS` (one day), for argparse."""
    try:
        value = ascii_float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= MAX_SECONDS:  # false for nan too
        raise argparse.ArgumentTypeError(
            f"{text} is not a number of seconds from 0 to {MAX_SECONDS} (one day)"
        )
    return value


def main(argv: list[str] | None = None) -> int:
    """Run ``tierdisk serve`` with ``argv`` (without the ``serve`` word); return the status."""
    reopen_closed_stdio()  # first: before anything (uvloop, gRPC) opens a descriptor
    args = _parser().parse_args(argv)
    stops = _stop_signals()
    # Until the event loop handles them (_serve), they stop the start as SIGINT does.
    for sig in stops:
        signal.signal(sig, signal.default_int_handler)
    try:
        return _main(args, stops)
    except KeyboardInterrupt:
        log.info("stopped while starting")
        return 0


MIN_OPEN_FILES = 64
"""The fewest open files ``tierdisk serve`` starts with: gRPC, the event loop and Python's
imports take ~25 before any volume (below that gRPC's start crashed, or a Python module
could not be imported)."""


def _raise_open_file_limit() -> int:
    """Raise the soft limit of open files to the hard one, and return it. Each gRPC
    connection, NBD session, layer file and socket takes a descriptor, and the usual soft
    limit (1,024, what systemd and Docker give) let ~1,000 idle connections lock every new
    client out of gRPC, NBD and /metrics alike; the hard limit (often 524,288) is the
    operator's choice. Nothing here uses ``select()``, which a descriptor over 1,023 would
    break."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:  # refused (a sandbox): keep what there is
            log.debug("open file limit stays %d: %s", soft, exc)
        else:
            soft = hard
    return soft if soft != resource.RLIM_INFINITY else 1 << 30


_OPEN_FILES_PER_LAYER = {"raw": 1, "sparse": 2, "sqlite": 4}
"""Descriptors a layer of each kind with a file holds open: a raw image; a sparse layer's
data file and map; a sqlite layer's database, WAL, lock file and SQLite's own descriptor of
the database (measured: 4)."""


def _open_files_needed(config: Config) -> int:
    """About the most descriptors ``config`` may use at once: :data:`MIN_OPEN_FILES`, those
    of each layer file (:data:`_OPEN_FILES_PER_LAYER`), one per NBD connection it takes, and
    room for gRPC connections and remote tiers."""
    files = sum(
        _OPEN_FILES_PER_LAYER.get(layer.kind, 0) for v in config.volumes for layer in v.layers
    )
    nbd = config.server.nbd_max_connections if config.server.nbd else 0
    return MIN_OPEN_FILES + files + nbd + 64


def _stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop the server: SIGTERM, SIGINT, and SIGHUP unless the process
    ignores it (``nohup``). SIGHUP's default action would end the process at once, without
    the final flush: writes acknowledged since the last Flush would be lost."""
    stops = [signal.SIGTERM, signal.SIGINT]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        stops.append(signal.SIGHUP)
    return tuple(stops)


def _main(args: argparse.Namespace, stops: tuple[signal.Signals, ...]) -> int:
    tune_malloc()
    configure_logging(args.log_level, args.log_format)
    open_files = _raise_open_file_limit()
    if open_files < MIN_OPEN_FILES:
        say(
            f"tierdisk serve: cannot start: the open-file limit is {open_files} (ulimit -n, "
            f"systemd's LimitNOFILE=); tierdisk needs at least {MIN_OPEN_FILES}"
        )
        return 1
    flags = {
        "listen": args.listen,
        "metrics": args.metrics,
        "data_dir": args.data_dir,
        "max_io": args.max_io,
        "nbd": args.nbd,
        "nbd_max_connections": args.nbd_max_connections,
        "nbd_tls_cert": args.nbd_tls_cert,
        "nbd_tls_key": args.nbd_tls_key,
        "nbd_tls_ca": args.nbd_tls_ca,
        "grpc_poller_batch": args.grpc_poller_batch,
    }
    try:
        config = load_config(args.config, flags=flags)
    except ConfigError as exc:
        say(f"tierdisk serve: config error: {exc}")
        return 2
    if open_files < (needed := _open_files_needed(config)):
        nbd = bool(config.server.nbd)
        log.warning(
            "the open-file limit is %d, and this config may use about %d descriptors (1-4 per "
            "layer file, %sand gRPC's): past it, %sgRPC clients wait, without a line of ours; "
            "raise it (ulimit -n, systemd's LimitNOFILE=)",
            open_files,
            needed,
            "1 per NBD connection up to nbd_max_connections, " if nbd else "",
            "new NBD clients are closed before the greeting and " if nbd else "",
        )
    install_uvloop()
    return asyncio.run(_serve(config, args.ready_file, args.grace, stops))


async def _serve(
    config: Config, ready_file: str | None, grace: float, stops: tuple[signal.Signals, ...]
) -> int:
    if ready_file:
        _remove_ready_file(ready_file, None)  # a killed server's: not this start's
    server = Server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in stops:
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(server.start(), name="start")
    stopping = asyncio.create_task(stop.wait(), name="stop signal")
    await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not starting.done():
        starting.cancel()  # Server.start closes what it opened (volumes opened are flushed)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await starting
        log.info("stopped while starting")
        return _unflushed(server.unflushed)
    try:
        starting.result()
    except ConfigError as exc:
        say(f"tierdisk serve: {_start_failure(exc)}: {exc}")
        return 2
    except OSError as exc:  # AddressInUse too
        say(f"tierdisk serve: cannot start: {_reason(exc)}")
        return 1
    if config.server.grpc_poller_batch and not batch_grpc_poller():  # (started with the server)
        log.warning("grpc_poller_batch: gRPC's poller thread was not found or not moved")
    if ready_file:
        try:
            _write_ready_file(ready_file, server)
        except OSError as exc:
            say(f"tierdisk serve: cannot write --ready-file {ready_file}: {exc.strerror}")
            await server.stop(0)
            return 1
    try:
        await stop.wait()
        log.info("stopping: finishing calls in flight, then flushing every volume")
        unflushed = await server.stop(grace)
    finally:
        if ready_file:
            _remove_ready_file(ready_file, os.getpid())
        tell_held_lines()  # (failures held back in their interval: told before the end)
    log.info("stopped")
    return _unflushed(unflushed)


def _unflushed(volumes: list[str]) -> int:
    """The exit status of a stop whose final flush failed for ``volumes`` (none: 0), saying
    so on stderr."""
    if not volumes:
        return 0
    names = ", ".join(repr(name) for name in volumes)
    say(
        f"tierdisk serve: the final flush failed for volume(s) {names}: writes acknowledged "
        "since their last Flush may not be durable (the log says why)"
    )
    return 1


def _start_failure(exc: ConfigError) -> str:
    """How the one line about a volume that did not open starts: ``cannot start`` when a
    layer's storage failed or its stored data is corrupt (a :class:`StorageError`, e.g.
    :class:`~.errors.DataCorruption`, under the :class:`ConfigError` that names the volume
    and layer), so the operator looks at the files; else ``config error``."""
    if any(isinstance(cause, StorageError) for cause in failure_chain(exc)):
        return "cannot start"
    return "config error"


def _reason(exc: OSError) -> str:
    """``exc`` for a one-line message: without Python's ``[Errno 98]`` prefix when its text
    is a sentence of ours (``OSError(errno, "cannot listen for … on …: …")``)."""
    if exc.strerror and exc.filename is None:
        return exc.strerror
    return str(exc)


def _remove_ready_file(path: str, pid: int | None) -> None:
    """Remove the ready file ``path`` if it names ``pid`` (this server, as it stops: a
    supervisor waiting for the next start must not take its address), or, for ``None``, a
    process that no longer runs (a server killed before, found at a start); anything else
    (another server's, a file that is not one) is left."""
    try:
        with open(path) as f:
            named = json.load(f)["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if type(named) is not int or not 0 < named < 1 << 31:
        return  # not a pid
    if pid is None:
        try:
            os.kill(named, 0)
            return  # it runs
        except ProcessLookupError:
            pass
        except OSError:
            return  # it runs, as another user
    elif named != pid:
        return
    with contextlib.suppress(OSError):
        os.unlink(path)


def _write_ready_file(path: str, server: Server) -> None:
    info = {
        "grpc": server.grpc_address,
        "metrics": server.metrics_address,
        "nbd": server.nbd_address,
        "nbd_tls": server.nbd_tls,
        "pid": os.getpid(),
    }
    # A temporary file of a fresh random name, made exclusively (never a name planted in a
    # shared folder beforehand, such as a symlink to a file of the server's user), then
    # renamed over ``path`` so a reader sees the whole file or none.
    # (a name of its own length: any name the ready file may have, up to NAME_MAX, works)
    tmp = os.path.join(os.path.dirname(path), f".tierdisk-ready-{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
