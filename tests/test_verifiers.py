"""Write verifiers (tierdisk.client.verifiers): a flush that cannot vouch for the writes it
covers says so, once, and a clean restart is not taken for a loss.

The bookkeeping alone (:class:`UnflushedWrites`), then a real server process killed or
stopped and started again on the same address under a client that wrote before it.
"""

from __future__ import annotations

import asyncio
import errno
import json
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest
from servers import (
    ServerProcess,
    free_port,
    ram,
    running_server,
    toml_volume,
    value,
    write_config,
)
from stacks import pattern

from tierdisk.client import AsyncClient, AsyncVolume, Client
from tierdisk.client import errors as cerr
from tierdisk.client.verifiers import UnflushedWrites
from tierdisk.service.config import load_config
from tierdisk.service.errors import ConfigError
from tierdisk.service.server import Server

SS = 512

# -- the bookkeeping ---------------------------------------------------------------------------


def test_a_flush_with_the_same_verifier_vouches_for_the_writes_it_covers() -> None:
    book = UnflushedWrites()
    book.acknowledged(7)
    book.acknowledged(7)
    assert book.flushed(book.mark(), 7) == []
    assert len(book) == 0


def test_a_changed_verifier_is_reported_once() -> None:
    book = UnflushedWrites()
    book.acknowledged(7)
    assert book.flushed(book.mark(), 9) == [7]
    assert book.flushed(book.mark(), 9) == []


def test_the_verifiers_with_unflushed_writes_are_listed_oldest_first() -> None:
    """What ``write --no-flush`` prints for a later ``flush --verifier``."""
    book = UnflushedWrites()
    book.acknowledged(9)
    book.acknowledged(0)  # durable as acknowledged: nothing to vouch for
    book.acknowledged(7)
    book.acknowledged(9)
    assert book.verifiers() == [9, 7]
    book.flushed(book.mark(), 7)
    assert book.verifiers() == []


def test_durable_writes_are_not_kept() -> None:
    book = UnflushedWrites()
    book.acknowledged(0)  # a FUA write the volume respects
    assert len(book) == 0
    assert book.flushed(book.mark(), 9) == []


def test_a_flush_covers_only_the_writes_acknowledged_before_it_started() -> None:
    book = UnflushedWrites()
    book.acknowledged(7)
    mark = book.mark()
    book.acknowledged(7)  # acknowledged while the flush ran: not covered
    assert book.flushed(mark, 7) == []
    assert len(book) == 1
    assert book.flushed(book.mark(), 9) == [7]  # that later write is still unvouched


def test_overlapping_flushes_each_report_a_loss_among_what_they_cover() -> None:
    book = UnflushedWrites()
    book.acknowledged(7)
    first = book.mark()
    book.acknowledged(7)
    second = book.mark()
    assert book.flushed(second, 9) == [7]
    assert book.flushed(first, 9) == []  # reported by the other already


def test_a_flush_answered_after_another_vouched_reports_only_what_it_alone_covers() -> None:
    """Two flushes started together, the first answered with the writes' verifier (it
    vouched for them), the second with a new one: nothing the second covers is unvouched,
    so no loss; writes made meanwhile are reported once, by a later flush."""
    book = UnflushedWrites()
    for _ in range(3):
        book.acknowledged(0xA)
    first, second = book.mark(), book.mark()
    book.acknowledged(0xA)
    book.acknowledged(0xA)
    assert book.flushed(first, 0xA) == []
    assert book.flushed(second, 0xB) == []
    assert book.flushed(book.mark(), 0xB) == [0xA]
    assert book.flushed(book.mark(), 0xB) == []


def test_a_volatile_volumes_flush_vouches_for_nothing_until_its_verifier_changes() -> None:
    """A flush of a volume that keeps nothing past a restart makes nothing durable: the
    writes stay recorded, and a restart (a new verifier) is reported at the next flush."""
    book = UnflushedWrites()
    book.acknowledged(7)
    assert book.flushed(book.mark(), 7, volatile=True) == []
    assert len(book) == 1
    assert book.flushed(book.mark(), 9, volatile=True) == [7]
    assert len(book) == 0


def test_a_server_without_verifiers_vouches_for_nothing_and_forgets_nothing() -> None:
    book = UnflushedWrites()
    book.acknowledged(7)
    assert book.flushed(book.mark(), 0) == []
    assert book.flushed(book.mark(), 9) == [7]


# -- against a server that restarts ------------------------------------------------------------


SPARSE = {"kind": "sparse", "path": "v.sparse", "size": "1MiB"}


class Served:
    """A volume ``v`` of ``layers`` (default: one ``sparse``) served by a server process on a
    fixed address (so a client reconnects to it after a restart)."""

    def __init__(self, folder: Path, *layers: dict[str, str], read_only: bool = False) -> None:
        self.listen = f"127.0.0.1:{free_port()}"
        self.config = write_config(
            folder, toml_volume("v", *(layers or (SPARSE,)), read_only=read_only)
        )
        self.server = ServerProcess.start(folder, self.config, listen=self.listen)

    def restart(
        self, how: str, *, then: tuple[dict[str, str], ...] = (), read_only: bool | None = None
    ) -> None:
        """Stop the server (``"kill"``: SIGKILL; ``"terminate"``: SIGTERM, a clean stop
        that must exit 0) and start it again (``then``: with these layers instead;
        ``read_only``: the volume read-only or not, with ``then``)."""
        if how == "terminate":
            assert self.server.terminate() == 0
        self.server.close()
        if then:
            write_config(self.config.parent, toml_volume("v", *then, read_only=bool(read_only)))
        self.server = ServerProcess.start(self.config.parent, self.config, listen=self.listen)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Served, AsyncVolume]]:
    """The server, and its volume ``v`` through a client."""
    served = Served(tmp_path)
    try:
        async with AsyncClient(served.listen, timeout=10) as client:
            yield served, client.volume("v")
    finally:
        served.server.close()


async def _flush_after_restart(vol: AsyncVolume, verifiers: Sequence[int] = ()) -> Exception | None:
    """Flush ``vol`` (for ``verifiers`` too) once its server answers again; what the flush
    raised, or None."""
    deadline = time.monotonic() + 30
    while True:
        try:
            await vol.flush(verifiers=verifiers)
            return None
        except (cerr.Unavailable, cerr.DeadlineExceeded) as exc:
            if time.monotonic() > deadline:
                return exc
            await asyncio.sleep(0.1)
        except cerr.TierdiskError as exc:
            return exc


async def test_a_flush_after_a_kill_and_restart_reports_the_unflushed_writes_once(
    served: tuple[Served, AsyncVolume],
) -> None:
    server, vol = served
    await vol.write(0, pattern(1, 0, 8, SS))
    await vol.flush()  # vouched for: these are durable
    await vol.write(8, pattern(2, 8, 8, SS))  # acknowledged, not yet durable
    server.restart("kill")

    # Through another handle: the client keeps one record per volume.
    lost = await _flush_after_restart(vol.client.volume("v"))
    assert isinstance(lost, cerr.WritesLost), lost
    assert lost.code == grpc.StatusCode.DATA_LOSS
    assert "'v'" in str(lost) and "may be lost" in str(lost)

    await vol.flush()  # said once
    await vol.write(16, pattern(3, 16, 8, SS))
    await vol.flush()  # writes made after the restart are vouched for
    assert await vol.read(0, 8) == pattern(1, 0, 8, SS)  # flushed before: kept


async def test_a_flush_for_another_clients_writes_reports_their_loss(
    served: tuple[Served, AsyncVolume],
) -> None:
    """``flush(verifiers=...)``: a flush made through another client (another process)
    vouches for the writes those verifiers acknowledged, or reports them lost. A 0 among
    them (a write durable when acknowledged) needs no flush and is skipped."""
    server, vol = served
    await vol.write(0, pattern(1, 0, 8, SS))
    theirs = vol.unflushed_verifiers
    assert len(theirs) == 1
    async with AsyncClient(server.listen, timeout=10) as other:
        flusher = other.volume("v")
        await flusher.flush(verifiers=theirs)
        await flusher.flush(verifiers=[0])  # before: WritesLost "changed from 0x0…0"
        server.restart("kill")
        lost = await _flush_after_restart(flusher, theirs)
        assert isinstance(lost, cerr.WritesLost), lost
        assert f"{theirs[0]:#018x}" in str(lost)


async def test_a_clean_restart_keeps_the_verifier(served: tuple[Served, AsyncVolume]) -> None:
    """A rolling restart (SIGTERM: drain, final flush) lost nothing: the client's next
    flush succeeds although it wrote before the restart and did not flush."""
    server, vol = served
    before = (await vol.inspect())["write_verifier"]
    await vol.write(0, pattern(1, 0, 8, SS))
    server.restart("terminate")
    assert await _flush_after_restart(vol) is None
    assert (await vol.inspect())["write_verifier"] == before
    assert await vol.read(0, 8) == pattern(1, 0, 8, SS)

    # ...and a kill after that clean start still counts: the start marked it.
    await vol.write(8, pattern(2, 8, 8, SS))
    server.restart("kill")
    assert isinstance(await _flush_after_restart(vol), cerr.WritesLost)
    assert (await vol.inspect())["write_verifier"] != before


def _verifier_changes(server: ServerProcess) -> float:
    """``tierdisk_write_verifier_changes_total{volume="v"}`` as ``/metrics`` shows it."""
    url = f"http://{server.metrics}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return value(text, "tierdisk_write_verifier_changes_total", volume="v")


@pytest.mark.parametrize(
    ("layer", "then"),
    [(SPARSE, SPARSE), (ram("1MiB"), ram("1MiB")), (SPARSE, ram("1MiB")), (ram("1MiB"), SPARSE)],
    ids=["sparse", "ram", "sparse-restarted-as-ram", "ram-restarted-as-sparse"],
)
def test_a_start_after_an_unclean_stop_is_logged_and_counted(
    tmp_path: Path, layer: dict[str, str], then: dict[str, str]
) -> None:
    """The verifier a start draws because the last run did not stop cleanly is a warning
    naming the volume and one change in ``tierdisk_write_verifier_changes_total`` (so the
    alert on it fires for a tier that crashed and came back at once); a clean restart, and
    a run of a ``ram`` volume (a new verifier at every start: nothing it held was to outlive
    the server), count none. What counts is the stack of the run that crashed, not the
    config the server restarts with."""
    unclean = layer is SPARSE
    served = Served(tmp_path, layer)
    try:
        assert _verifier_changes(served.server) == 0  # the first start
        served.restart("kill", then=(then,))
        assert _verifier_changes(served.server) == (1 if unclean else 0)
        assert served.server.terminate() == 0
        warning = "volume 'v': the last run did not stop cleanly"
        told = served.server.stderr_text()
        assert (warning in told) == unclean
        # the one cause a stop with no crash has: its end not recorded (a full disk, say)
        assert ("could not record its end in " in told) == unclean
        assert ("write-verifiers.json: that run's log says which" in told) == unclean
        served.restart("terminate")  # (stopped already, cleanly)
        assert _verifier_changes(served.server) == 0
        assert served.server.terminate() == 0
        assert warning not in served.server.stderr_text()
    finally:
        served.server.close()


def test_a_crash_of_a_read_only_run_is_no_unclean_stop(tmp_path: Path) -> None:
    """A volume served read-only acknowledges no write, so a kill of its run loses none:
    the next start neither warns nor counts a verifier change (the critical alert on that
    counter fired for every origin crash of a tier stack whose origin serves golden images
    read-only) and keeps the verifier. A crash of a run that could write still counts when
    the volume comes back read-only; the read-only run's own kill after that does not."""
    warning = "volume 'v': the last run did not stop cleanly"

    def verifier(served: Served) -> int:
        with Client(served.listen, timeout=10) as client:
            return int(client.volume("v").inspect()["write_verifier"], 16)

    served = Served(tmp_path, SPARSE, read_only=True)
    try:
        before = verifier(served)
        served.restart("kill")
        assert _verifier_changes(served.server) == 0
        assert verifier(served) == before
        # a run that could write, killed, back read-only: that crash is told
        served.restart("terminate", then=(SPARSE,), read_only=False)
        served.restart("kill", then=(SPARSE,), read_only=True)
        assert _verifier_changes(served.server) == 1
        after = verifier(served)
        assert after != before
        assert served.server.terminate() == 0
        assert warning in served.server.stderr_text()
        # ...and the read-only run's own kill is not
        served.restart("terminate")  # (stopped already, cleanly)
        served.restart("kill")
        assert _verifier_changes(served.server) == 0
        assert verifier(served) == after
        assert served.server.terminate() == 0
        assert warning not in served.server.stderr_text()
    finally:
        served.server.close()


async def test_fua_writes_the_volume_respects_need_no_flush(
    served: tuple[Served, AsyncVolume],
) -> None:
    server, vol = served
    assert (await vol.info()).fua_respected
    await vol.write(0, pattern(1, 0, 8, SS), fua=True)
    server.restart("kill")
    assert await _flush_after_restart(vol) is None
    assert await vol.read(0, 8) == pattern(1, 0, 8, SS)


async def test_a_fua_write_to_a_volume_that_keeps_no_writes_is_vouched_for_by_a_flush(
    tmp_path: Path,
) -> None:
    """A ram volume respects FUA, but a restart, clean or not, loses what it holds: its FUA
    writes are answered with the verifier, and a flush after the restart says so."""
    served = Served(tmp_path, ram("1MiB"))
    try:
        async with AsyncClient(served.listen, timeout=10) as client:
            vol = client.volume("v")
            assert (await vol.info()).fua_respected
            await vol.write(0, pattern(1, 0, 8, SS), fua=True)
            served.restart("terminate")
            assert isinstance(await _flush_after_restart(vol), cerr.WritesLost)
    finally:
        served.server.close()


async def test_a_volatile_volume_reports_a_restart_to_every_client_that_wrote(
    tmp_path: Path,
) -> None:
    """A ram volume says it is volatile; its flushes make nothing durable, so a client that
    wrote and flushed still learns, at its first flush after a restart, that its writes
    are gone."""
    served = Served(tmp_path, ram("1MiB"))
    try:
        async with AsyncClient(served.listen, timeout=10) as client:
            vol = client.volume("v")
            assert (await vol.info()).volatile
            await vol.write(0, pattern(1, 0, 8, SS))
            await vol.flush()
            served.restart("terminate")
            lost = await _flush_after_restart(vol)
            assert isinstance(lost, cerr.WritesLost)
            # a clean stop: the message gives the reason that holds, not only a crash's
            assert "flushed ones too" in str(lost) and "restarted at all if the volume is" in str(
                lost
            )
            assert await vol.read(0, 8) == bytes(8 * SS)
            await vol.flush()  # said once
    finally:
        served.server.close()


@pytest.mark.parametrize(
    ("before", "after", "told"),
    [((ram("1MiB"),), (SPARSE,), True), ((SPARSE,), (ram(), SPARSE), False)],
    ids=["ram-to-sparse", "sparse-under-a-new-ram-top"],
)
async def test_a_clean_restart_tells_of_writes_lost_by_the_run_that_stopped(
    tmp_path: Path,
    before: tuple[dict[str, str], ...],
    after: tuple[dict[str, str], ...],
    told: bool,
) -> None:
    """Whether a client with unflushed writes hears of a loss over a clean restart follows
    the run that stopped, not the config it restarts with: a ram-only write path lost its
    writes at the stop, so the client is told though the volume now keeps its writes (it
    kept the ram run's verifier: the loss went unreported); a volume that kept them (the
    stop flushed them) is not made to say so because a ram top was added (a false
    WritesLost)."""
    served = Served(tmp_path, *before)
    try:
        async with AsyncClient(served.listen, timeout=10) as client:
            vol = client.volume("v")
            await vol.write(0, pattern(1, 0, 8, SS))  # not flushed: the clean stop does
            served.restart("terminate", then=after)
            outcome = await _flush_after_restart(vol)
            assert isinstance(outcome, cerr.WritesLost) if told else outcome is None, outcome
            assert await vol.read(0, 8) == (bytes(8 * SS) if told else pattern(1, 0, 8, SS))
    finally:
        served.server.close()


@pytest.mark.parametrize(
    ("layers", "then", "told"),
    [((ram("1MiB"),), (), True), ((SPARSE,), (), False), ((ram("1MiB"),), (SPARSE,), True)],
    ids=["ram", "sparse", "ram-then-sparse"],
)
async def test_an_older_builds_clean_entry_follows_the_volume_as_it_is_now(
    tmp_path: Path,
    layers: tuple[dict[str, str], ...],
    then: tuple[dict[str, str], ...],
    told: bool,
) -> None:
    """An entry without ``kept_writes`` (an older build wrote it) does not say whether that
    run kept its writes: a volume whose write path is ram only now gets a new verifier, as
    that build gave it (a ram volume's writes went unreported over the upgrade), and one
    that keeps its writes keeps its verifier; an entry that records no file at all was
    served from ram only, whatever the volume is now."""
    served = Served(tmp_path, *layers)
    try:
        async with AsyncClient(served.listen, timeout=10) as client:
            vol = client.volume("v")
            await vol.write(0, pattern(1, 0, 8, SS))
            assert served.server.terminate() == 0
            record = tmp_path / "data" / "write-verifiers.json"
            doc = json.loads(record.read_text())
            del doc["volumes"]["v"]["kept_writes"]
            record.write_text(json.dumps(doc))
            served.restart("kill", then=then)  # (stopped already, cleanly)
            outcome = await _flush_after_restart(vol)
            assert isinstance(outcome, cerr.WritesLost) if told else outcome is None, outcome
    finally:
        served.server.close()


async def test_a_refused_start_leaves_the_volumes_it_opened_stopped_cleanly(
    tmp_path: Path,
) -> None:
    """A start refused for one volume's config (a size its file disagrees with) opened the
    others, which could take writes meanwhile: they are flushed and stay clean, so fixing
    the config gives them back their verifiers (they got new ones: every client that had
    written was told its writes may be lost, and the alert fired)."""
    a = {"kind": "sparse", "path": "a.sparse", "size": "1MiB"}
    good = toml_volume("a", a) + toml_volume("b", {**a, "path": "b.sparse"})
    bad = toml_volume("a", a) + toml_volume("b", {**a, "path": "b.sparse", "size": "2MiB"})

    async def verifier_of_a() -> str:
        async with running_server(tmp_path, good) as server:
            async with AsyncClient(server.grpc_address) as client:
                return str((await client.volume("a").inspect())["write_verifier"])

    first = await verifier_of_a()
    refused = Server(load_config(str(write_config(tmp_path, bad)), environ={}))
    with pytest.raises(ConfigError, match="volume 'b'"):
        await refused.start()
    assert await verifier_of_a() == first


async def test_an_unmap_is_vouched_for_like_a_write(served: tuple[Served, AsyncVolume]) -> None:
    server, vol = served
    await vol.write(0, pattern(1, 0, 8, SS), fua=True)
    await vol.unmap(0, 8)
    server.restart("kill")
    assert isinstance(await _flush_after_restart(vol), cerr.WritesLost)


@pytest.mark.parametrize("how", ["kill", "terminate"])
async def test_writes_after_the_last_flush_only_are_at_stake(
    served: tuple[Served, AsyncVolume], how: str
) -> None:
    """A client that flushed everything it wrote has nothing at stake in a restart, clean
    or not: its next flush succeeds."""
    server, vol = served
    await vol.write(0, pattern(1, 0, 8, SS))
    await vol.flush()
    server.restart(how)
    assert await _flush_after_restart(vol) is None


async def test_only_a_volume_whose_writes_outlive_the_server_keeps_its_verifier(
    tmp_path: Path,
) -> None:
    """Over a clean stop (in-process servers, one after the other on the same data_dir),
    the verifier of a volume whose write path keeps its writes (a sparse layer; a ram top
    written through to one) is kept; one whose writes land in ram only lost them all at
    the stop, and gets a new one."""
    sparse = {"kind": "sparse", "path": "s.sparse", "size": "1MiB"}
    body = (
        toml_volume("mem", ram("1MiB"))
        + toml_volume("disk", sparse)
        + toml_volume("wt", ram(write_through=True), {**sparse, "path": "wt.sparse"})
        + toml_volume("top", ram(), {**sparse, "path": "top.sparse"})
    )

    async def verifiers() -> dict[str, str]:
        async with running_server(tmp_path, body) as server:
            async with AsyncClient(server.grpc_address) as client:
                names = ("mem", "disk", "wt", "top")
                return {n: (await client.volume(n).inspect())["write_verifier"] for n in names}

    first, second = await verifiers(), await verifiers()
    assert {n for n in first if first[n] == second[n]} == {"disk", "wt"}


# -- a flush failing in storage while other calls run (in-process server) --------------------


@pytest.fixture
async def in_process(tmp_path: Path) -> AsyncIterator[tuple[Server, AsyncVolume]]:
    """A server in this process (its sparse layer can be made slow or failing), and its
    volume ``v`` through a client."""
    async with (
        running_server(tmp_path, toml_volume("v", SPARSE)) as server,
        AsyncClient(server.grpc_address, timeout=10) as client,
    ):
        yield server, client.volume("v")


@pytest.mark.parametrize("op", ["write", "unmap"])
async def test_a_call_a_failed_flush_may_have_lost_is_reported(
    in_process: tuple[Server, AsyncVolume], monkeypatch: pytest.MonkeyPatch, op: str
) -> None:
    """A write or unmap that has landed in the layer but not yet been answered when another
    client's flush fails in storage (a failed fsync may drop its pages) is answered with the
    verifier of before the failure: its client's next flush says it may be lost."""
    server, vol = in_process
    layer = server.registry.get("v").entries[0].layer
    await vol.write(0, pattern(1, 0, 4, SS))
    await vol.flush()
    landed, release = asyncio.Event(), asyncio.Event()
    real = getattr(layer, op)

    async def held(*args: object) -> object:
        done = await real(*args)
        landed.set()
        await release.wait()
        return done

    async def failing_flush() -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(layer, op, held)
    call = asyncio.ensure_future(
        vol.write(8, pattern(2, 8, 1, SS)) if op == "write" else vol.unmap(0, 2)
    )
    await asyncio.wait_for(landed.wait(), 10)
    monkeypatch.setattr(layer, "flush", failing_flush)
    async with AsyncClient(server.grpc_address, timeout=10) as other:
        with pytest.raises(cerr.StorageError):
            await other.volume("v").flush()
    monkeypatch.undo()
    release.set()
    await call
    with pytest.raises(cerr.WritesLost):
        await vol.flush()


async def test_a_write_acknowledged_while_a_flush_runs_is_not_vouched_for_by_it(
    in_process: tuple[Server, AsyncVolume], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush vouches only for the writes acknowledged before it started: one acknowledged
    while it ran, then lost by a flush that fails, is reported at the next flush."""
    server, vol = in_process
    layer = server.registry.get("v").entries[0].layer
    real_flush = layer.flush
    started, release = asyncio.Event(), asyncio.Event()

    async def slow_flush() -> None:
        await real_flush()
        started.set()
        await release.wait()

    monkeypatch.setattr(layer, "flush", slow_flush)
    flushing = asyncio.ensure_future(vol.flush())
    await asyncio.wait_for(started.wait(), 10)
    await vol.write(0, pattern(1, 0, 1, SS))  # acknowledged while the flush runs
    release.set()
    await flushing

    async def failing_flush() -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(layer, "flush", failing_flush)
    with pytest.raises(cerr.StorageError):
        await vol.flush()
    monkeypatch.setattr(layer, "flush", real_flush)
    with pytest.raises(cerr.WritesLost):
        await vol.flush()


def test_a_crash_before_a_refused_start_is_counted_by_the_next_start(tmp_path: Path) -> None:
    """A crash, then a start refused for another volume's config (it stops at once, its
    count seen by no scrape), then a start that serves: the crash is warned of and counted
    in the process that goes on serving (so TierdiskWritesMayBeLost sees it), with the
    verifier the refused start drew (clients told once, not twice)."""
    a = {"kind": "sparse", "path": "a.sparse", "size": "1MiB"}
    good = toml_volume("v", a) + toml_volume("b", {**a, "path": "b.sparse"})
    bad = toml_volume("v", a) + toml_volume("b", {**a, "path": "b.sparse", "size": "2MiB"})
    config = write_config(tmp_path, good)
    with ServerProcess.start(tmp_path, config) as first:
        before = _verifier_changes(first)
    assert before == 0  # (killed on leaving: a crash)
    write_config(tmp_path, bad)
    refused = ServerProcess.start(tmp_path, config, wait=False)
    assert refused.proc.wait(30) == 2
    refused.close()
    write_config(tmp_path, good)
    with ServerProcess.start(tmp_path, config) as fixed:
        assert _verifier_changes(fixed) == 1
        assert fixed.terminate() == 0
        said = fixed.stderr_text()
    assert "volume 'v': a run before the last (whose start was refused or stopped)" in said
    with ServerProcess.start(tmp_path, config) as after:  # counted once
        assert _verifier_changes(after) == 0
