"""The ``tierdisk`` command (DESIGN.md §7): its entry points, and the running of a verb. Its
arguments are read by :mod:`tierdisk.client.cli_args`.

    tierdisk [--server ADDR] VERB ...   a client verb (ADDR: $TIERDISK_SERVER, else 127.0.0.1:7400)
    tierdisk serve ...                  the server; every argument after ``serve`` is its own

The verbs that move data (``read``, ``write``, ``import``, ``export``) are in
:mod:`tierdisk.client.transfer`, the others in :mod:`tierdisk.client.volume_verbs`. Errors
print one line on stderr naming the volume, file or server, and exit 1 (2 for usage errors);
no traceback (:mod:`tierdisk.client.cli_errors`).
Ctrl-C stops a verb (its clean-up done) with ``interrupted``, exit 130; SIGTERM and SIGHUP
likewise, ``interrupted by SIGTERM``, exit 128 + the signal's number (:func:`_stop_signals`);
``watch`` exits 0 on any of them.
gRPC's own log lines are off for the client verbs (:func:`quiet_grpc_logs`), so that line is
all there is on stderr; ``serve`` keeps gRPC's logging as configured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from types import FrameType
from typing import TYPE_CHECKING, TypeAlias

# Nothing imported here imports grpc (see quiet_grpc_logs): the rest is imported by main().
from .cli_args import build_parser, check_connection_args, check_request_numbers
from .cli_errors import (
    EXIT_ERROR,
    EXIT_USAGE,
    CliError,
    UsageError,
    describe,
    file_error,
    one_line,
    stdout_error,
)
from .pem import CERTIFICATE, PRIVATE_KEY, key_pair_problem, read_pem
from .tune import install_uvloop, reopen_closed_stdio, tune_malloc
from .volume_verbs import (
    flush_volume,
    print_info,
    print_map,
    print_tree,
    print_volumes,
    resize_volume,
    watch_size,
)

if TYPE_CHECKING:
    from .aio import AsyncClient

__all__ = ["SERVER_ENTRY", "main"]

SERVER_ENTRY = "tierdisk.service.main"
"""Module whose ``main(argv: list[str]) -> int`` runs ``tierdisk serve``; imported only then,
so the client never imports the server otherwise (DESIGN.md §1)."""


# -- verbs -------------------------------------------------------------------------------

Verb: TypeAlias = "Callable[[AsyncClient, argparse.Namespace], Awaitable[int]]"
"""A client verb: ``await verb(client, args)`` does it and returns the exit status; a
failure is raised, for :func:`main` to report in one line."""


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except OSError as err:
        raise stdout_error(err) from None


def _verbs() -> dict[str, Verb]:
    """Each client verb by name. Those that move no data are in
    :mod:`tierdisk.client.volume_verbs`; those that move data are in
    :mod:`tierdisk.client.transfer`, imported now, not with this module: it imports grpc
    (:func:`quiet_grpc_logs`)."""
    from .transfer import export_image, import_image, read_sectors, write_sectors

    return {
        "volumes": print_volumes,
        "info": print_info,
        "read": read_sectors,
        "write": write_sectors,
        "import": import_image,
        "export": export_image,
        "inspect": print_tree,
        "map": print_map,
        "watch": watch_size,
        "resize": resize_volume,
        "flush": flush_volume,
    }


def _read_pem(path: str | None, kind: str, option: str) -> bytes | None:
    """The PEM file given to ``option`` (None when not given); a file that cannot be read
    or holds no PEM block of ``kind`` is an error naming the option and the file."""
    if path is None:
        return None
    try:
        return read_pem(path, kind)
    except OSError as err:
        raise file_error(path, err) from None
    except ValueError as err:
        raise UsageError(f"{option} {path}: {err}") from None


def _check_key_pair(cert: str, key: str) -> None:
    """:class:`UsageError` naming ``--tls-key`` and the file when the key in ``key`` does
    not go with the certificate in ``cert`` (encrypted, or another certificate's: gRPC
    would only fail every connection, :func:`~tierdisk.client.pem.key_pair_problem`)."""
    try:
        problem = key_pair_problem(cert, key, f"--tls-cert {cert}")
    except OSError as err:
        raise file_error(err.filename if isinstance(err.filename, str) else key, err) from None
    if problem is not None:
        raise UsageError(f"--tls-key {key} {problem}")


async def _run(args: argparse.Namespace) -> int:
    from .aio import AsyncClient
    from .copy_report import CopyInterrupted

    verb = _verbs()[args.verb]
    roots = _read_pem(args.tls_ca, CERTIFICATE, "--tls-ca")
    chain = _read_pem(args.tls_cert, CERTIFICATE, "--tls-cert")
    key = _read_pem(args.tls_key, PRIVATE_KEY, "--tls-key")
    if args.tls_cert is not None and args.tls_key is not None:
        _check_key_pair(args.tls_cert, args.tls_key)
    rc: int | None = None
    with _stop_signals() as stopped:
        try:
            async with AsyncClient(
                args.server,
                timeout=args.timeout,
                retries=args.retries,
                token=args.token,
                secure=args.tls,
                root_certificates=roots,
                certificate_chain=chain,
                private_key=key,
            ) as client:
                rc = await verb(client, args)
            _flush_stdout()  # here, not at exit: a full disk or a closed pipe is reported
            # A stop asked for meanwhile is taken here, not as this task ends (the task
            # would end cancelled: "interrupted" after all was done).
            await asyncio.sleep(0)
        except (asyncio.CancelledError, CopyInterrupted) as exc:
            if rc is not None:
                # The verb had ended (an export had replaced IMAGE, a write was written):
                # a stop that came as the client closed changes nothing; the result stands
                # (a Ctrl-C so taken is no KeyboardInterrupt: asyncio.run()).
                _flush_stdout()
                return rc
            if not stopped:
                raise  # Ctrl-C: asyncio.run() makes it a KeyboardInterrupt, main() reports it
            if args.verb == "watch":
                return 0  # it runs until stopped: that is its end, as for Ctrl-C
            note = exc.note if isinstance(exc, CopyInterrupted) else ""
            raise _stopped_by(stopped[0], note) from None
    return rc


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
"""Signals that stop a client verb as Ctrl-C (SIGINT) does (:func:`_stop_signals`)."""


@contextlib.contextmanager
def _stop_signals() -> Iterator[list[int]]:
    """While a verb runs, take :data:`STOP_SIGNALS` as Ctrl-C is taken: the first one
    cancels the running task, so that the verb's clean-up runs (an export's temporary file
    is removed, a write or import says what it wrote), and is appended to the list yielded.
    The handlers are then removed, so that another signal acts as it would have (ends the
    process). Ctrl-C is ``asyncio.run()``'s to take (it cancels the task); the first one
    also gives SIGINT back its default action, so that a second one ends the process at
    once, as the shell's would, rather than raising ``KeyboardInterrupt`` wherever the clean-up
    stands (a traceback, or "internal error: … Cannot close a running event loop": two
    Ctrl-Cs in a row, or ``timeout -s INT``, which signals the process and its group). A
    signal the process ignores (``nohup``) stays ignored. Call it in the event loop, from
    the task to cancel."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    stopped: list[int] = []
    handled = [sig for sig in STOP_SIGNALS if signal.getsignal(sig) == signal.SIG_DFL]
    interrupt = signal.getsignal(signal.SIGINT)  # asyncio.run()'s, in the main thread
    take_interrupt: Callable[[int, FrameType | None], object] | None = (
        interrupt if callable(interrupt) else None
    )

    def interrupted(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # the next Ctrl-C ends the process
        if take_interrupt is not None:
            take_interrupt(signum, frame)

    def release() -> None:
        for sig in handled:
            loop.remove_signal_handler(sig)
        handled.clear()

    def stop(signum: int) -> None:
        stopped.append(signum)
        release()
        if task is not None:
            task.cancel()

    for sig in handled:
        loop.add_signal_handler(sig, stop, sig)
    if take_interrupt is not None:
        signal.signal(signal.SIGINT, interrupted)
    try:
        yield stopped
    finally:
        release()
        if take_interrupt is not None and signal.getsignal(signal.SIGINT) is interrupted:
            signal.signal(signal.SIGINT, take_interrupt)  # no Ctrl-C came: asyncio.run()'s


def _stopped_by(signum: int, note: str) -> CliError:
    """The one-line error of a verb stopped by the signal ``signum`` (one of
    :data:`STOP_SIGNALS`): ``interrupted by SIGTERM``, then ``; `` and ``note`` if any (what
    a write or import had written, as after Ctrl-C:
    :class:`~tierdisk.client.copy_report.CopyInterrupted`); exit ``128 + signum``, as a
    shell reports a process the signal ended."""
    err = CliError(f"interrupted by {signal.Signals(signum).name}" + (f"; {note}" if note else ""))
    err.exit_code = 128 + signum
    return err


# -- entry points ------------------------------------------------------------------------


def quiet_grpc_logs() -> None:
    """Turn off the log lines of gRPC's C core (``E1126 12:00:00.000000 … Handshake
    failed …``) for a client verb: :func:`main` reports every failure in one line, which those
    only precede with gRPC's own words. ``GRPC_VERBOSITY=NONE``, since ``ERROR`` lets some
    through (roots without a certificate log four lines). Not if the user set
    ``GRPC_VERBOSITY`` (theirs is kept) or ``GRPC_TRACE`` (they asked for gRPC's traces).

    The C core reads ``GRPC_VERBOSITY`` once, when grpc is imported, so this is called
    before anything imports it: neither this module nor the package imports it up front. If
    grpc is loaded already (:func:`main` called in a process that uses it), nothing is
    changed: it would not take effect, only pass on to child processes."""
    if "grpc" in sys.modules or os.environ.get("GRPC_TRACE"):
        return
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")


def serve(argv: Sequence[str]) -> int:
    """``tierdisk serve ARGS``: hand ``ARGS`` untouched to the server's ``main``."""
    try:
        module = importlib.import_module(SERVER_ENTRY)
        entry = module.main
    except (ImportError, AttributeError) as err:
        print(
            f"tierdisk: serve: cannot load the server ({SERVER_ENTRY}): {one_line(str(err))}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    rc = entry(list(argv))
    return int(rc) if rc is not None else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tierdisk`` command; returns the exit status. A Ctrl-C at any point after
    this module was imported (gRPC and uvloop are imported later, and take a while) is
    ``tierdisk: interrupted``, exit 130, never a traceback."""
    reopen_closed_stdio()  # first: before anything (uvloop, gRPC) opens a descriptor
    try:
        rc = _main(argv)
    except KeyboardInterrupt:
        print("tierdisk: interrupted", file=sys.stderr)
        return 130
    _settle_stdout()
    return rc


def _main(argv: Sequence[str] | None) -> int:
    tune_malloc()
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["serve"]:
        return serve(args_list[1:])  # gRPC's logging as configured: a server's logs are wanted
    quiet_grpc_logs()
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    if args.verb == "serve":
        parser.print_usage(sys.stderr)
        print(
            "tierdisk: serve: client options do not apply to serve; "
            "put the server's own flags after it (tierdisk serve --help)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        check_connection_args(args)
        check_request_numbers(args)
    except UsageError as err:
        print(f"tierdisk: {one_line(str(err))}", file=sys.stderr)
        return err.exit_code
    from .errors import TierdiskError  # imports grpc: after quiet_grpc_logs()

    install_uvloop()
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        if args.verb == "watch":
            return 0
        print("tierdisk: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`tierdisk read … | head`); say nothing more on a dead pipe.
        _silence_stdout()
        return EXIT_ERROR
    except TierdiskError as err:
        print(f"tierdisk: {describe(err, args.server)}", file=sys.stderr)
        return EXIT_ERROR
    except CliError as err:
        print(f"tierdisk: {one_line(str(err))}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        print(f"tierdisk: {one_line(str(err))}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as err:  # a bug: still one line, never a traceback
        print(
            f"tierdisk: internal error: {type(err).__name__}: {one_line(str(err))}",
            file=sys.stderr,
        )
        return EXIT_ERROR


def _settle_stdout() -> None:
    """Write out what stdout still buffers (after a failure, output printed before it); if
    stdout cannot take it, the failure was reported already, or is (a closed pipe) not to
    be: the rest goes to /dev/null rather than to Python's "Exception ignored" at exit."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except (OSError, ValueError):
        _silence_stdout()


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
