"""The ``nbd`` option of a ``remote`` layer: its reads over the remote server's NBD export.

A :class:`NbdDataPath` belongs to one :class:`~.remote.RemoteLayer` and serves only that
layer's reads; everything else (attach, writes, fills, flush, unmap, resize, the resize
watch) stays on gRPC, and so does any read this path cannot serve. The semantics (which
export is used, what happens on errors and timeouts, what ``inspect`` shows) are the ``nbd``
option's, in :mod:`.remote`'s docstring.

``problem`` (in ``inspect``) follows the situation: a connection that breaks is noticed at
once, read or not (the reason is shown and a new connection is sought at once); while none is
usable, attempts follow a backoff, and the layer calls :meth:`NbdDataPath.retry_now` when its
gRPC target answers again (its resize watch reconnected: the target restarted, or came back),
so a reason found while the target was away is not kept through the backoff; ``checked_s_ago``
says how old the reason is.

TLS follows the layer's ``tls``. With ``tls = true`` the NBD connection is TLS too, and only
TLS: ``NBD_OPT_STARTTLS``, then the TLS handshake with an :class:`ssl.SSLContext` made once, at
the first attach, from the layer's own options (the server's certificate checked against
``ca_file``, else the system roots, and against the name ``server_name``, else the NBD address's
host; ``cert_file`` + ``key_file`` presented as the client certificate; the files read as for
gRPC, :func:`.remote_connect.read_file`, so a bad one is the same
:class:`~..errors.ConfigError`). An export that does not do TLS is then not used (``problem``:
"… does not do TLS, which this layer's NBD reads require (tls = true)"; there is no fallback
to clear text), and a TLS handshake that fails (a certificate the CA did not sign, another
name, a client certificate the server refuses) is a connection that failed: ``problem`` names
the reason and attempts follow the backoff. Without ``tls`` the connection is clear text, and an
export that requires TLS (its server's ``[server] nbd_tls_cert``; it answers
``NBD_REP_ERR_TLS_REQD``) is not used: ``problem`` says "… requires TLS; this layer's NBD reads
use TLS only with tls = true". Either TLS mismatch is logged once (at info level with
``"auto"``, where that is no fault, else as a warning) and asked again every minute, as for a
target without an export; the reads go over gRPC meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

from tierdisk.client import errors as client_errors
from tierdisk.client.aio import AsyncVolume
from tierdisk.client.pem import CERTIFICATE, PRIVATE_KEY

from .. import errors
from ..backoff import Backoff
from ..errors import ConfigError
from ..nbd_client import (
    NbdClosed,
    NbdError,
    NbdHung,
    NbdReader,
    NbdTlsRequired,
    NbdTlsUnavailable,
)
from ..nbd_protocol import described_server
from ..netaddr import reachable_address
from ..ratelimit import RateLimitedLog
from ..status import status_name_of
from ..tls_files import load_key_pair
from .remote_connect import read_file

__all__ = ["NBD_AUTO", "NbdDataPath", "tls_context"]

log = logging.getLogger(__name__)

_TIMED_OUT = status_name_of(errors.DeadlineExceeded)
_BROKEN = status_name_of(errors.Unavailable)
_FAILED = status_name_of(errors.StorageError)
"""The status code names an NBD read is counted under (with ``OK``) in the remote's request
metrics, beside its gRPC calls: no answer in time, the connection broke, an error reply."""

NBD_AUTO = "auto"
"""The ``nbd`` value that takes the NBD address from the target's server."""

_BACKOFF = (0.1, 5.0)
"""``(first, cap)`` in seconds: the reconnect delays (:class:`~tierdisk.service.backoff.Backoff`,
doubling, jittered to 0.5-1.5 times)."""
_NO_EXPORT_RETRY = 60.0
"""Seconds between questions to a target that said it serves no NBD export (with ``"auto"``),
or whose export's TLS does not match the layer's (it may be restarted with one this path can
use)."""


def tls_context(ca_file: str | None, cert_file: str | None, key_file: str | None) -> ssl.SSLContext:
    """The client context of a layer with ``tls = true``: the server's certificate verified
    against ``ca_file`` (else the system roots) and its name checked; ``cert_file`` +
    ``key_file`` as the client certificate. A file that cannot be read, holds no PEM block of
    its kind, or does not load (a key that is not the certificate's, an encrypted key) is a
    :class:`~..errors.ConfigError` naming it."""
    ca = read_file(ca_file, "ca_file", CERTIFICATE)
    read_file(cert_file, "cert_file", CERTIFICATE)
    read_file(key_file, "key_file", PRIVATE_KEY)
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cadata=ca.decode("ascii", "replace") if ca else None
        )
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"ca_file {ca_file}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # (the default today; said, not assumed)
    if cert_file is not None and key_file is not None:
        load_key_pair(
            context,
            cert_file,
            key_file,
            cert_name=f"cert_file {cert_file}",
            key_name=f"key_file {key_file}",
        )
    return context


class NbdDataPath:
    """Reads of one remote layer over the remote server's NBD export ``option`` (an address,
    or :data:`NBD_AUTO`), with what the layer lends it: the remote volume's gRPC client
    (``remote``, for ``Inspect``), the volume's current size in bytes (``size``), and
    ``observe(rpc, code, seconds)`` to count each NBD read as method ``NbdRead``. ``timeout``
    bounds each read, ``wait`` each connection attempt (its TLS handshake included) and each
    question to the target (seconds). ``tls`` and the files and name after it are the
    layer's options of those names: with ``tls`` the connection is TLS only."""

    def __init__(
        self,
        option: str,
        *,
        target: str,
        volume: str,
        where: str,
        owner: Callable[[], str] = lambda: "",
        timeout: float,
        wait: float,
        remote: Callable[[], AsyncVolume],
        size: Callable[[], int],
        observe: Callable[[str, str, float], None],
        tls: bool = False,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        server_name: str | None = None,
    ) -> None:
        self.option = option
        self.address = "" if option == NBD_AUTO else option  # with "auto": once the target said
        self.problem = ""  # why the NBD export is not used ("" when it is)
        self._checked_at: float | None = None  # when problem was last found (monotonic)
        self._target = target
        self._volume_name = volume
        self._where = where
        self._owner = owner  # where the layer serves, before its log lines (RemoteLayer.owner)
        self._timeout = timeout
        self._wait = wait
        self._remote = remote
        self._size = size
        self._observe = observe
        self._reader: NbdReader | None = None
        self._target_server = ""  # the id the target's server gave (Inspect "server")
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._no_export = False  # no NBD export ("auto"), or one that requires TLS: ask slowly
        self._wake = asyncio.Event()  # set by retry_now: the next attempt is due at once
        self._log = RateLimitedLog(log)
        self._tls = tls
        self._tls_files = (ca_file, cert_file, key_file)
        self._server_name = server_name or None
        self._ssl: ssl.SSLContext | None = None  # made at the first start (with tls)

    async def start(self) -> None:
        """Connect (at attach); when that fails, keep trying in the background. With
        ``tls``, the first start makes the TLS context (:func:`tls_context`:
        :class:`~..errors.ConfigError` for a file that does not load)."""
        self._closed = False
        if self._tls and self._ssl is None:
            self._ssl = tls_context(*self._tls_files)
        await self._connect()
        if self._reader is None:
            self._reconnect()

    async def close(self) -> None:
        """Stop reconnecting and close the connection (at the layer's close)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        reader, self._reader = self._reader, None
        if reader is not None:
            await reader.close()

    async def refuse(self, problem: str) -> None:
        """Stop using the export for good (the layer refuses all I/O: ``problem`` says why,
        and ``inspect`` shows it)."""
        await self.close()
        self._set_problem(problem)

    def size_changed(self) -> None:
        """The remote volume changed size: connect anew to learn the export's size."""
        if self._reader is not None or self._task is not None:
            self._reconnect()

    def retry_now(self) -> None:
        """The target answers again (the layer's resize watch reconnected): if no usable
        connection is being sought, try again now instead of at the end of the backoff (or of
        the minute of "auto" with no export): the reason for not using NBD may have gone."""
        if self._task is not None and not self._task.done():
            self._wake.set()

    async def read(self, buf: memoryview, offset: int) -> bool:
        """Fill ``buf`` from byte ``offset`` of the export; False when the read is not
        served here (no connection, a range past the export's size as negotiated, a failed
        read: logged and counted) and gRPC must serve it instead.

        No answer within the layer's ``timeout`` is :class:`~..errors.DeadlineExceeded`, as
        over gRPC (a second try over gRPC would double the wait for a hung remote), and so
        is every other read then in flight on that connection, which is closed."""
        reader = self._reader
        if reader is None or offset + len(buf) > reader.export.size:
            return False
        return await self._read(reader, buf, offset)

    async def _connect(self) -> None:
        """Open the NBD export and use it, if it is the remote volume's size and is served
        by the same server process as the gRPC target (else log why not, and keep the reason
        for ``inspect``). Failures leave the data path on gRPC."""
        self._no_export = False
        if self.option == NBD_AUTO and not await self._ask_address():
            return
        try:
            async with asyncio.timeout(self._wait):
                reader = await NbdReader.connect(
                    self.address,
                    self._volume_name,
                    tls=self._ssl,
                    server_hostname=self._server_name,
                )
        except NbdTlsRequired:
            self._tls_mismatch(
                f"the NBD export at {self.address} requires TLS; this layer's NBD reads use "
                "TLS only with tls = true"
            )
            return
        except NbdTlsUnavailable as exc:
            self._tls_mismatch(
                f"the NBD export at {self.address} does not do TLS, which this layer's NBD "
                f"reads require (tls = true): {exc}"
            )
            return
        except ssl.SSLError as exc:
            self._not_used(
                f"the TLS handshake with the NBD export at {self.address} failed ({exc})"
            )
            return
        except TimeoutError:
            self._not_used(f"the NBD export at {self.address} did not answer in {self._wait:g} s")
            return
        except (OSError, NbdError, ValueError) as exc:  # ValueError: a name ssl refuses
            self._not_used(f"the NBD export at {self.address} is not usable ({exc})")
            return
        size = self._size()
        try:  # cancelled meanwhile (the layer closes), the new connection is closed too
            if reader.export.size < size:
                problem = (
                    f"the NBD export {self._volume_name!r} at {self.address} is "
                    f"{reader.export.size} bytes, the volume {size}"
                )
            else:
                served_by = described_server(reader.export.description)
                problem = await self._served_elsewhere(served_by)
        except BaseException:
            await reader.close()
            raise
        if problem:
            await reader.close()
            self._not_used(problem)
            return
        old, self._reader = self._reader, reader
        self._set_problem("")
        if old is not None:  # let its reads in flight finish: no needless gRPC retries
            try:
                await old.close(drain=self._timeout)
            except BaseException:  # cancelled while they finish: closed at once
                await old.close()
                raise
        log.info("%s: reading over NBD at %s", self._logged_where, self.address)
        reader.on_close(lambda error: self._lost(reader, error))

    @property
    def _logged_where(self) -> str:
        """Names the remote in log lines, after the local volume and layer."""
        return self._owner() + self._where

    def _tls_mismatch(self, problem: str) -> None:
        """The export's TLS does not match the layer's: not a passing fault, so said once
        (at info level with "auto") and asked again only every minute."""
        if problem != self.problem:
            level = logging.INFO if self.option == NBD_AUTO else logging.WARNING
            log.log(level, "%s: %s; reading over gRPC", self._logged_where, problem)
        self._set_problem(problem)
        self._no_export = True

    def _lost(self, reader: NbdReader, error: NbdClosed) -> None:
        """``reader``'s connection became unusable; when it is the one in use (not one this
        path closed itself), say so and seek a new one now, not at the next read."""
        if self._reader is not reader or self._closed:
            return
        self._reader = None
        self._not_used(f"the NBD connection to {self.address} broke ({error}); connecting anew")
        self._reconnect()

    async def _ask_address(self) -> bool:
        """``nbd = "auto"``: take the NBD address from the target's server (its ``Inspect``
        tree's ``nbd/address``, as this layer reaches it); False (with the reason kept) when
        it has none or does not say. The whole tree is asked for, not the path: a server
        without an export refuses the path as ``INVALID_ARGUMENT``, which the layer's metrics
        would count as a failed call once a minute (and the remote-errors alert read)."""
        self._no_export = False
        try:
            tree = await self._remote().inspect(timeout=self._wait)
        except client_errors.TierdiskError as exc:
            self._not_used(f"{self._target} did not say where its NBD export is ({exc})")
            return False
        nbd = tree.get("nbd")
        if not isinstance(nbd, dict) or not nbd.get("address"):  # the server exports no NBD
            # Not a fault with "auto": said once at info level, asked again now and then.
            problem = (
                f"{self._target} serves no NBD export (its [server] nbd is off, or it is a "
                "tierdisk too old to say where its export is: give the address as nbd)"
            )
            if problem != self.problem:
                log.info("%s: %s; reading over gRPC", self._logged_where, problem)
            self._set_problem(problem)
            self._no_export = True
            return False
        try:
            self.address = reachable_address(str(nbd["address"]), self._target)
        except ValueError as exc:
            self._not_used(f"{self._target} gave an NBD address that is no address ({exc})")
            return False
        return True

    def _not_used(self, problem: str) -> None:
        self._set_problem(problem)
        self._log.warning("%s: %s; reading over gRPC", self._logged_where, problem)

    def _set_problem(self, problem: str) -> None:
        self.problem = problem
        self._checked_at = time.monotonic()

    async def _served_elsewhere(self, served_by: str) -> str:
        """Why the NBD export named ``served_by`` (the server id in its description) must not
        be used, or an empty string when that is the server answering this layer's gRPC
        calls. A wrong ``nbd`` address could otherwise serve another server's volume of the
        same name and size (wrong data) or this server's own (reads that loop). The target's
        id (``Inspect`` path ``server``) is kept, and asked again whenever an export names
        another: after a restart the remote server has a new one."""
        if not served_by or served_by != self._target_server:
            try:
                tree = await self._remote().inspect("server", timeout=self._wait)
            except client_errors.TierdiskError as exc:
                return f"{self._target} did not say which server it is ({exc})"
            self._target_server = str(tree.get("value", ""))
        if served_by and served_by == self._target_server:
            return ""
        return (
            f"the NBD export at {self.address} is served by "
            f"{served_by or 'a server that does not name itself'}, not by the gRPC "
            f"target {self._target} ({self._target_server or 'no id'})"
        )

    def _reconnect(self) -> None:
        """Remake the NBD connection in the background (with backoff) unless already doing so."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._keep_trying(), name=f"nbd {self.address or self.option}/{self._volume_name}"
            )

    async def _keep_trying(self) -> None:
        backoff = Backoff(*_BACKOFF)
        self._wake.clear()  # a retry_now from before this task is no news to it
        while not self._closed:
            await self._connect()
            nbd = self._reader
            # the size now: one that grew while it connected asks for another connection
            # (size_changed found this task running and left it to notice)
            if nbd is not None and not nbd.closed and nbd.export.size >= self._size():
                return
            wait = _NO_EXPORT_RETRY if self._no_export else backoff.next()
            if await self._sleep(wait):  # retry_now: the situation changed, start over
                backoff.reset()

    async def _sleep(self, seconds: float) -> bool:
        """Wait ``seconds``, or less if :meth:`retry_now` is called (True then)."""
        try:
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        except TimeoutError:
            return False
        self._wake.clear()
        return True

    async def _read(self, nbd: NbdReader, buf: memoryview, offset: int) -> bool:
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._timeout):
                await nbd.read_into(offset, buf)
        except TimeoutError:
            self._observe("NbdRead", _TIMED_OUT, self._timeout)
            self._log.warning(
                "%s: no answer over NBD at %s within %g s; connecting anew",
                self._logged_where,
                self.address,
                self._timeout,
            )
            problem = f"no answer over NBD at {self.address} within {self._timeout:g} s"
            await self._drop(nbd, f"{problem}; connecting anew", hung=NbdHung(problem))
            raise errors.DeadlineExceeded(f"{self._where}: {problem}") from None
        except NbdHung as exc:  # another read on the connection got no answer in time: the
            # remote is hung, and a try over gRPC would wait a second `timeout` for it
            self._observe("NbdRead", _TIMED_OUT, time.monotonic() - started)
            raise errors.DeadlineExceeded(f"{self._where}: {exc}") from None
        except NbdError as exc:
            closed = isinstance(exc, NbdClosed)
            code = _BROKEN if closed else _FAILED
            self._observe("NbdRead", code, time.monotonic() - started)
            self._log.warning(
                "%s: NBD read at %s failed (%s); reading over gRPC",
                self._logged_where,
                self.address,
                exc,
            )
            if closed:
                await self._drop(nbd, f"the NBD connection to {self.address} broke ({exc})")
            return False
        self._observe("NbdRead", "OK", time.monotonic() - started)
        return True

    async def _drop(self, nbd: NbdReader, problem: str, hung: NbdHung | None = None) -> None:
        """Stop using a broken or hung connection (``problem`` says why) and make a new one
        in the background; the reads still in flight on a ``hung`` one fail with it."""
        if self._reader is nbd:
            self._reader = None
            self._set_problem(problem)
            self._reconnect()
        await nbd.close(why=hung)

    def inspect(self) -> dict[str, Any]:
        """The ``nbd`` part of the layer's ``inspect`` tree."""
        reader = self._reader
        checked = self._checked_at
        return {
            "option": self.option,
            "address": self.address,
            "tls": self._tls,  # the reads use TLS (the layer's tls = true), never clear text
            "connected": reader is not None and not reader.closed,
            "export_bytes": reader.export.size if reader is not None else None,
            "problem": self.problem,
            # how old problem is: since the last attempt to connect (or the break it names)
            "checked_s_ago": None if checked is None else round(time.monotonic() - checked, 1),
        }
