"""The event loop's lag, sampled into ``tierdisk_event_loop_lag_seconds`` (service.loop_lag)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from servers import ram, running_server, scrape, toml_volume, value

from tierdisk.service.loop_lag import LoopLagMonitor
from tierdisk.service.loop_metrics import HistogramCell, LoopHistogram


async def test_a_stall_of_the_loop_is_observed_as_its_length() -> None:
    """A free loop's samples are small; work that holds the loop for 0.3 s shows as one
    sample of about that length; nothing is observed after close."""
    family = LoopHistogram("lag", "lag", [], buckets=(0.05, 0.25, 1.0))
    cell: HistogramCell = family.labels()
    monitor = LoopLagMonitor(cell, interval=0.02)
    monitor.start()
    try:
        await asyncio.sleep(0.2)
        free = sum(cell.counts)
        assert free >= 3 and cell.counts[0] == free, cell.counts  # all under 50 ms
        time.sleep(0.3)  # noqa: ASYNC251 (work that holds the loop: what is measured)
        await asyncio.sleep(0.1)
        assert cell.counts[2] == 1, cell.counts  # one sample in (0.25, 1]
        assert 0.25 < cell.sum < 1.0 + 0.05 * sum(cell.counts)
    finally:
        await monitor.close()
    counted = sum(cell.counts)
    await asyncio.sleep(0.1)
    assert sum(cell.counts) == counted


async def test_the_server_exports_its_loop_lag(tmp_path: Path) -> None:
    """``/metrics`` shows the lag of the loop every request runs on, stalls included
    (which the requests' own durations do not show)."""
    async with running_server(tmp_path, toml_volume("v", ram("1MiB"))) as server:
        await asyncio.sleep(0.3)
        time.sleep(0.6)  # noqa: ASYNC251 (on the server's loop: a request that holds it)
        await asyncio.sleep(0.15)
        text = await scrape(server.metrics_address)
    name = "tierdisk_event_loop_lag_seconds"
    assert value(text, f"{name}_count") >= 3
    stalls = value(text, f"{name}_count") - value(text, f"{name}_bucket", le="0.5")
    assert stalls == 1, text
