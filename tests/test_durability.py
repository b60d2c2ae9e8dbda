"""Durability (tierdisk.service.durability): flushes in rounds, and the write verifier
that says when writes acknowledged before may be lost, through the ``Volume`` API.

Layer doubles (:class:`stacks.MapLayer` subclasses) fail a flush, a FUA write or a resize
on demand, or hold it at a gate, to show when the verifier is renewed (a failure that may
have cost acknowledged writes), when it is not (a failure that loses nothing), and how
rounds group, outlive their callers' cancels and refuse to start after a close. What
clients do with the verifier is in tests/test_verifiers.py.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from conftest import VolumeOpener
from stacks import MapLayer, entry, sector_pattern

from tierdisk.service.errors import NoSpace, StorageError, Unavailable, WritesLost
from tierdisk.service.layers.ram import RamLayer
from tierdisk.service.volume import Volume

SS = 512


def p(tag: int, s: int) -> bytes:
    return sector_pattern(tag, s, SS)


async def write(volume: Volume, sector: int, *sectors: bytes, **kwargs: bool) -> None:
    await volume.write(sector, b"".join(sectors), **kwargs)


class _FailingFlush(MapLayer):
    """A layer whose flushes fail with ``failure`` while it is set (an fsync's EIO, a remote
    tier that lost writes)."""

    def __init__(self, sectors: int) -> None:
        super().__init__(sectors)
        self.failure: Exception | None = None

    async def flush(self) -> None:
        await super().flush()
        if self.failure is not None:
            raise self.failure


@pytest.mark.parametrize(
    ("failure", "raised"),
    [
        (StorageError("fsync: Input/output error"), StorageError),
        (OSError(5, "Input/output error"), OSError),
        # not NoSpace: RESOURCE_EXHAUSTED would say the request changed nothing
        (NoSpace("fsync: No space left on device"), StorageError),
    ],
    ids=["storage", "oserror", "nospace"],
)
async def test_a_flush_failing_in_a_write_path_layers_storage_renews_the_verifier(
    volumes: VolumeOpener, failure: Exception, raised: type[Exception]
) -> None:
    """After such a failure the writes it covered may be gone (a failed fsync may drop the
    pages it was to write, and the next one succeeds): no later flush may vouch for them,
    so the volume's write verifier changes (clients compare it: tests/test_verifiers.py)."""
    below = _FailingFlush(8)
    vol = await volumes(entry(MapLayer(8), wt=True), below)
    before = vol.write_verifier
    await vol.flush()
    assert vol.write_verifier == before
    below.failure = failure
    with pytest.raises(raised):
        await vol.flush()
    assert vol.write_verifier not in (before, 0)


async def test_renewals_in_a_flush_loop_are_logged_once_per_interval(
    volumes: VolumeOpener, caplog: pytest.LogCaptureFixture
) -> None:
    """Clients flushing in a loop over a layer file that was removed renew the verifier at
    every flush: counted each time, logged once in 10 s (6,502 lines in 10 s before)."""
    below = _FailingFlush(8)
    vol = await volumes(entry(MapLayer(8), wt=True), below)
    below.failure = StorageError("flushing: d was removed while served")
    with caplog.at_level(logging.WARNING, logger="tierdisk.service.durability"):
        for _ in range(50):
            with pytest.raises(StorageError):
                await vol.flush()
    assert vol.verifier_changes == 50
    renewed = [r for r in caplog.records if "write verifier renewed" in r.getMessage()]
    assert len(renewed) == 1, [r.getMessage() for r in renewed]


async def test_a_tier_that_lost_writes_renews_the_verifier_and_the_flush_succeeds(
    volumes: VolumeOpener,
) -> None:
    """The tier has flushed now; the renewed verifier tells each caller whether writes of
    its own are at stake (one with nothing unflushed is not told of a loss)."""
    below = _FailingFlush(8)
    vol = await volumes(entry(MapLayer(8), wt=True), below)
    before = vol.write_verifier
    below.failure = WritesLost("the origin restarted")
    await vol.flush()
    assert vol.write_verifier not in (before, 0)


async def test_a_flush_failure_that_loses_nothing_keeps_the_verifier(
    volumes: VolumeOpener,
) -> None:
    """A tier that did not answer (its writes wait there, to be flushed by the next try), and
    a read cache below the write path that fails (its fills are fetched again: only
    logged, the flush succeeds)."""
    top, cache = _FailingFlush(8), _FailingFlush(8)
    vol = await volumes(top, entry(cache, rc=True), MapLayer(8))
    before = vol.write_verifier
    top.failure = Unavailable("the origin is restarting")
    with pytest.raises(Unavailable):
        await vol.flush()
    top.failure = None
    for failure in (WritesLost("fills lost"), Unavailable("away"), StorageError("EIO")):
        cache.failure = failure
        await vol.flush()
    assert vol.write_verifier == before


async def test_a_flush_round_waits_for_every_layer(volumes: VolumeOpener) -> None:
    """And raises a layer's own failure (its storage) before a tier's that did not answer,
    whatever their order: a stop forgives the latter when no write is at stake, and must
    not so hide the former (a layer file removed under a tier's write path)."""
    top, below = _FailingFlush(8), _FailingFlush(8)
    vol = await volumes(entry(top, wt=True), below)
    before = vol.write_verifier
    top.failure, below.failure = Unavailable("away"), StorageError("EIO")
    with pytest.raises(StorageError):
        await vol.flush()
    assert top.ops("flush") == below.ops("flush") == [("flush",)]
    assert vol.write_verifier != before


class _GatedFlush(_FailingFlush):
    """Its flushes wait for :attr:`gate`; :attr:`entered` is set as one begins, and
    :attr:`begun` counts them."""

    def __init__(self, sectors: int) -> None:
        super().__init__(sectors)
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()
        self.begun = 0

    async def flush(self) -> None:
        self.entered.set()
        self.begun += 1
        await self.gate.wait()
        await super().flush()


async def test_flushes_waiting_for_a_round_share_the_next_one(volumes: VolumeOpener) -> None:
    """Group commit: a flush waits for the round under way (which may not cover its writes)
    and then joins the next, which serves every flush that waited."""
    layer = _GatedFlush(8)
    vol = await volumes(layer)
    first = asyncio.ensure_future(vol.flush())
    await layer.entered.wait()
    later = [asyncio.ensure_future(vol.flush()) for _ in range(5)]
    await asyncio.sleep(0.01)
    assert layer.begun == 1  # one round at a time: the others wait
    layer.gate.set()
    await asyncio.gather(first, *later)
    assert layer.ops("flush") == [("flush",), ("flush",)]


async def test_a_change_is_unflushed_until_a_round_begun_after_it_succeeds(
    volumes: VolumeOpener,
) -> None:
    """What a stop's final flush asks (``Volume.changed_since_flush``: is a write at
    stake?). A write or an unmap is unflushed until a flush round that began after it
    ended succeeds: a round under way when it ended does not cover it, nor does a round
    that failed. Reads, and a resize that succeeded (it synced), change nothing."""
    top = _GatedFlush(8)
    top.gate.set()
    vol = await volumes(top)
    await vol.read(0, 8)
    await vol.resize(16)
    assert not vol.changed_since_flush
    await write(vol, 0, p(1, 0))
    assert vol.changed_since_flush
    await vol.flush()
    assert not vol.changed_since_flush
    top.gate.clear()
    top.entered.clear()
    under_way = asyncio.ensure_future(vol.flush())
    await top.entered.wait()
    await write(vol, 1, p(2, 1))
    top.gate.set()
    await under_way
    assert vol.changed_since_flush  # it ended after that round began
    await vol.flush()
    assert not vol.changed_since_flush
    await vol.unmap(0, 1)
    top.failure = Unavailable("the origin is restarting")
    with pytest.raises(Unavailable):
        await vol.flush()
    assert vol.changed_since_flush
    top.failure = None
    await vol.flush()
    assert not vol.changed_since_flush


async def test_a_write_that_failed_is_not_at_stake_a_resize_that_failed_is(
    volumes: VolumeOpener,
) -> None:
    """A write or an unmap that failed was acknowledged to no one: whatever it changed in
    the layers above the one that failed, no write is at stake (a cache tier stopped while
    its origin is down, after writes that failed against it, stops clean: its clients were
    told). A resize that failed may have changed some layers and synced none: the next flush
    must count."""
    below = _FailingWrites(8)
    vol = await volumes(entry(MapLayer(8), wt=True), below)
    below.failure = StorageError("write: Input/output error")
    with pytest.raises(StorageError):
        await write(vol, 1, p(1, 1))
    with pytest.raises(StorageError):
        await vol.write_at(100, b"x" * 10)  # unaligned: read, merged, written
    assert not vol.changed_since_flush
    below.failure = None
    await write(vol, 1, p(1, 1))
    assert vol.changed_since_flush  # acknowledged
    await vol.flush()
    assert not vol.changed_since_flush
    below.failure = StorageError("ftruncate: Input/output error")
    with pytest.raises(StorageError):
        await vol.resize(16)
    below.failure = None
    assert vol.changed_since_flush


async def test_a_flush_cancelled_mid_round_still_renews_the_verifier(
    volumes: VolumeOpener,
) -> None:
    """A caller's deadline does not stop the round: the failure it meets is not dropped
    (a later flush would succeed over the pages that failure lost)."""
    layer = _GatedFlush(8)
    vol = await volumes(entry(MapLayer(8), wt=True), layer)
    before = vol.write_verifier
    flushing = asyncio.ensure_future(vol.flush())
    await layer.entered.wait()
    flushing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flushing
    layer.failure = StorageError("fsync: Input/output error")
    layer.gate.set()
    await asyncio.sleep(0.01)
    assert vol.write_verifier != before


async def test_a_flush_after_one_that_failed_reads_the_renewed_verifier(
    volumes: VolumeOpener,
) -> None:
    """Rounds do not overlap, so no flush succeeds beside one that fails and answers with
    the verifier from before the failure."""
    layer = _GatedFlush(8)
    vol = await volumes(entry(MapLayer(8), wt=True), layer)
    before = vol.write_verifier
    layer.failure = StorageError("EIO")
    first = asyncio.ensure_future(vol.flush())
    await layer.entered.wait()
    seen: list[int] = []
    second = asyncio.ensure_future(vol.flush())
    second.add_done_callback(lambda _: seen.append(vol.write_verifier))
    await asyncio.sleep(0.01)
    assert layer.begun == 1  # the second waits for the round under way
    layer.gate.set()
    with pytest.raises(StorageError):
        await first
    layer.failure = None
    await second  # a round of its own, begun after the failure renewed the verifier
    assert seen == [vol.write_verifier] and vol.write_verifier != before
    assert layer.ops("flush") == [("flush",), ("flush",)]


async def test_a_fua_write_into_holes_is_flushed_by_a_round(volumes: VolumeOpener) -> None:
    """write_no_overwrite takes no FUA: the engine flushes after it, through a round, so a
    storage failure there renews the verifier as any flush's does."""
    top = _FailingFlush(8)
    vol = await volumes(top)
    before = vol.write_verifier
    top.failure = StorageError("EIO")
    with pytest.raises(StorageError):
        await write(vol, 1, p(1, 1), fua=True, no_overwrite=True)
    assert vol.write_verifier != before


class _FailingWrites(_FailingFlush):
    """Its writes, and resizes, fail with :attr:`failure` too while it is set; as a remote
    tier (``tier=True``) it reports lost writes itself."""

    def __init__(self, sectors: int, *, tier: bool = False) -> None:
        super().__init__(sectors)
        self.tier = tier

    @property
    def reports_lost_writes(self) -> bool:
        return self.tier

    async def write(self, data: memoryview, sector: int, fua: bool) -> None:
        if self.failure is not None:
            raise self.failure
        await super().write(data, sector, fua)

    async def resize(self, sector_count: int) -> None:
        if self.failure is not None:
            raise self.failure
        await super().resize(sector_count)


async def test_a_fua_write_or_a_resize_failing_in_storage_renews_the_verifier(
    volumes: VolumeOpener,
) -> None:
    """Each syncs (the layer's ``fdatasync``, a resize's ``fsync``); its failure may drop
    other writes' pages as a flush's may. A plain write that fails syncs nothing."""
    below = _FailingWrites(8)
    vol = await volumes(entry(MapLayer(8), wt=True), below)
    before = vol.write_verifier
    below.failure = StorageError("write: Input/output error")
    with pytest.raises(StorageError):
        await write(vol, 1, p(1, 1))
    assert vol.write_verifier == before
    with pytest.raises(StorageError):
        await write(vol, 1, p(1, 1), fua=True)
    after_write = vol.write_verifier
    assert after_write != before
    with pytest.raises(StorageError):
        await vol.resize(4)
    assert vol.write_verifier not in (before, after_write)


async def test_a_fua_write_or_a_resize_refused_for_space_renews_nothing(
    volumes: VolumeOpener,
) -> None:
    """Refused before anything was synced (the space could not be reserved or mapped): no
    write is at stake, and no client is told of a loss (nor the alert raised)."""
    below = _FailingWrites(8)
    vol = await volumes(entry(MapLayer(8), wt=True), below)
    before = vol.write_verifier
    below.failure = NoSpace("no space left to reserve")
    with pytest.raises(StorageError):  # the top took it: "after a change"
        await write(vol, 1, p(1, 1), fua=True)
    with pytest.raises(NoSpace):
        await vol.resize(16)
    assert vol.write_verifier == before


class _GatedFailingWrite(_FailingWrites):
    """Its FUA writes wait for :attr:`gate`, then fail with :attr:`failure` (a sync that
    takes long and fails: a failing disk)."""

    def __init__(self, sectors: int) -> None:
        super().__init__(sectors)
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def write(self, data: memoryview, sector: int, fua: bool) -> None:
        self.entered.set()
        await self.gate.wait()
        await super().write(data, sector, fua)


async def test_a_change_under_way_is_unflushed(volumes: VolumeOpener) -> None:
    """A write that has begun changing the layers and not ended (a call a stop's grace did
    not wait out) is at stake: a round that succeeds meanwhile does not cover it."""
    layer = _GatedFailingWrite(8)
    vol = await volumes(layer)
    writing = asyncio.ensure_future(write(vol, 0, p(1, 0)))
    await layer.entered.wait()
    assert vol.changed_since_flush
    await vol.flush()
    assert vol.changed_since_flush
    layer.gate.set()
    await writing
    await vol.flush()
    assert not vol.changed_since_flush


async def test_a_fua_write_whose_caller_is_cancelled_still_renews_on_a_failed_sync(
    volumes: VolumeOpener,
) -> None:
    """The layer's sync runs to its end anyway; its failure (which may have cost other
    writes their pages) is not dropped with the cancel."""
    layer = _GatedFailingWrite(8)
    vol = await volumes(layer)
    before = vol.write_verifier
    writing = asyncio.ensure_future(write(vol, 1, p(1, 1), fua=True))
    await layer.entered.wait()
    writing.cancel()
    await asyncio.sleep(0.01)
    assert not writing.done()  # the cancel waits for the write to end
    layer.failure = StorageError("fdatasync: Input/output error")
    layer.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await writing
    assert vol.write_verifier != before


async def test_no_fua_change_through_a_tier_is_durable_for_good(volumes: VolumeOpener) -> None:
    """A remote tier's FUA write is durable only if its origin answered so, which the layer
    does not pass up: such a write is answered with the verifier, for a flush to vouch for."""
    local = await volumes(MapLayer(8), name="local")
    assert local.durable_since(local.write_verifier)
    tiered = await volumes(entry(MapLayer(8), wt=True), _FailingWrites(8, tier=True))
    assert not tiered.durable_since(tiered.write_verifier)


async def test_a_tiers_own_failures_do_not_renew_the_verifier(volumes: VolumeOpener) -> None:
    """A remote tier answers for its writes with its own verifier: its failed flush or FUA
    write (an error it lost nothing in, e.g. UNKNOWN) renews nothing here; its
    :class:`WritesLost` does."""
    tier = _FailingWrites(8, tier=True)
    vol = await volumes(entry(MapLayer(8), wt=True), tier)
    before = vol.write_verifier
    tier.failure = StorageError("remote: UNKNOWN")
    with pytest.raises(StorageError):
        await vol.flush()
    with pytest.raises(StorageError):
        await write(vol, 1, p(1, 1), fua=True)
    assert vol.write_verifier == before
    tier.failure = WritesLost("the origin restarted")
    await vol.flush()
    assert vol.write_verifier != before


async def test_a_fua_write_is_durable_only_if_no_loss_was_found_while_it_ran(
    volumes: VolumeOpener,
) -> None:
    """A FUA write into holes is made durable by a flush round; one that found a tier's
    loss renewed the verifier meanwhile, so the write is not durable for good (the server
    answers it with the verifier it began under, for the next flush to judge). Nor is a
    FUA write to a volume that keeps no writes (a ram-only write path)."""
    top = _FailingFlush(8)
    vol = await volumes(top)
    begun = vol.write_verifier
    top.failure = WritesLost("the origin restarted")
    await write(vol, 1, p(1, 1), fua=True, no_overwrite=True)
    assert not vol.durable_since(begun)
    assert vol.durable_since(vol.write_verifier)
    ram = await volumes(RamLayer(8 * SS), name="ram")
    assert not ram.durable_since(ram.write_verifier)


async def test_a_read_cache_off_the_write_path_does_not_hold_up_flushes(
    volumes: VolumeOpener,
) -> None:
    """Its flush starts beside each round and is not waited for (a cache tier that hangs
    would make every flush wait for its timeout); a new one starts only after the last has
    ended; closing the volume waits for it."""
    cache = _GatedFlush(8)
    vol = await volumes(MapLayer(8), entry(cache, rc=True), MapLayer(8))
    await asyncio.wait_for(vol.flush(), 5)
    await asyncio.wait_for(vol.flush(), 5)
    assert cache.begun == 1
    closing = asyncio.ensure_future(vol.close())
    await asyncio.sleep(0.01)
    assert not closing.done()
    cache.gate.set()
    await asyncio.wait_for(closing, 5)
    assert cache.ops("flush") == [("flush",)]


class _FailingClose(MapLayer):
    """A layer whose close fails (a sparse layer's last commit into a removed file)."""

    async def close(self) -> None:
        await super().close()
        raise StorageError("the flush at close failed: d was removed while served")


async def test_a_close_that_fails_on_the_write_path_is_told_a_read_caches_is_not(
    volumes: VolumeOpener,
) -> None:
    """What ``Volume.close`` returns, the server counts as a failed final flush (exit 1,
    writes may be lost): a write-path layer's failure; a read cache off the write path
    holds copies only (logged)."""
    through = await volumes(entry(MapLayer(8), wt=True), _FailingClose(8))
    failures = await through.close()
    assert [str(exc) for exc in failures] == [
        "the flush at close failed: d was removed while served"
    ]
    cached = await volumes(MapLayer(8), entry(_FailingClose(8), rc=True))
    assert await cached.close() == []


async def test_a_flush_after_close_is_refused(volumes: VolumeOpener) -> None:
    vol = await volumes(MapLayer(8))
    await vol.close()
    with pytest.raises(Unavailable, match="closing"):
        await vol.flush()
