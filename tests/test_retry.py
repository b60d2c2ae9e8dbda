"""tierdisk.client.retry (client/retry.py): :class:`RetryPolicy`'s backoff schedule (full
jitter, doubling to a cap) and :func:`call_with_retry` (what is retried, one deadline for all
attempts), on a fake clock: no server, no real sleeps."""

from __future__ import annotations

import random

import grpc
import grpc.aio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from rpc_errors import rpc_error

from tierdisk.client.aio import AsyncClient
from tierdisk.client.errors import Cancelled, TierdiskError, Unavailable
from tierdisk.client.retry import RetryPolicy, call_with_retry

S = grpc.StatusCode


def test_backoff_ceiling_doubles_up_to_the_cap() -> None:
    policy = RetryPolicy(retries=10, backoff=0.05, max_backoff=2.0)
    assert [policy.ceiling(n) for n in range(7)] == pytest.approx(
        [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0]
    )
    assert policy.ceiling(10_000) == 2.0  # no overflow
    assert policy.delay(3, rng=lambda: 0.0) == 0.0
    assert policy.delay(3, rng=lambda: 0.5) == pytest.approx(0.2)


@given(
    attempt=st.integers(0, 200),
    backoff=st.floats(0, 10),
    cap=st.floats(0, 60),
    r=st.floats(0, 1, exclude_max=True),
)
def test_backoff_delay_stays_within_full_jitter_bounds(
    attempt: int, backoff: float, cap: float, r: float
) -> None:
    policy = RetryPolicy(retries=3, backoff=backoff, max_backoff=cap)
    delay = policy.delay(attempt, rng=lambda: r)
    assert 0.0 <= delay <= min(cap, backoff * 2.0 ** min(attempt, 64))


def test_retry_policy_refuses_negative_values() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(retries=-1)
    with pytest.raises(ValueError):
        RetryPolicy(backoff=-0.1)
    for bad in (float("nan"), float("inf")):  # a wait for ever, or NaN seconds
        with pytest.raises(ValueError, match="finite"):
            RetryPolicy(backoff=bad)
        with pytest.raises(ValueError, match="finite"):
            RetryPolicy(max_backoff=bad)


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


async def test_retries_unavailable_then_succeeds() -> None:
    t = FakeTime()
    remaining: list[float | None] = []

    async def attempt(left: float | None) -> str:
        remaining.append(left)
        t.now += 1.0  # each attempt takes a second
        if len(remaining) < 3:
            raise rpc_error(S.UNAVAILABLE, "down")
        return "ok"

    policy = RetryPolicy(retries=3, backoff=0.5, max_backoff=10)
    result = await call_with_retry(
        attempt, policy=policy, timeout=30, clock=t.clock, sleep=t.sleep, rng=lambda: 1.0
    )
    assert result == "ok"
    assert t.sleeps == [0.5, 1.0]
    # every attempt gets what is left of the one deadline
    assert remaining == pytest.approx([30.0, 28.5, 26.5])


async def test_retries_run_out_and_raise_unavailable() -> None:
    t = FakeTime()
    calls = 0

    async def attempt(left: float | None) -> None:
        nonlocal calls
        calls += 1
        raise rpc_error(S.UNAVAILABLE, "down")

    with pytest.raises(Unavailable, match="down") as info:
        await call_with_retry(
            attempt,
            policy=RetryPolicy(retries=2),
            timeout=None,
            volume="v",
            clock=t.clock,
            sleep=t.sleep,
        )
    assert calls == 3
    assert info.value.volume == "v"


@pytest.mark.parametrize(
    "code", [c for c in S if c not in (S.OK, S.UNAVAILABLE, S.CANCELLED)], ids=lambda c: c.name
)
async def test_other_codes_are_not_retried(code: grpc.StatusCode) -> None:
    """Every code but UNAVAILABLE and CANCELLED is final: UNKNOWN (a fault of the server's),
    DATA_LOSS, RESOURCE_EXHAUSTED... are not made again (a retried write could land twice,
    a server fault would be asked again and again)."""
    calls = 0

    async def attempt(left: float | None) -> None:
        nonlocal calls
        calls += 1
        raise rpc_error(code)

    with pytest.raises(TierdiskError) as info:
        await call_with_retry(attempt, policy=RetryPolicy(retries=5), timeout=1)
    assert calls == 1
    assert info.value.code == code


async def test_cancelled_is_retried_like_unavailable() -> None:
    # CANCELLED as an RpcError comes from the peer (a server shutting down, a channel
    # overloaded); a local cancellation is asyncio.CancelledError. Same schedule as UNAVAILABLE.
    t = FakeTime()
    calls = 0

    async def attempt(left: float | None) -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise rpc_error(S.CANCELLED if calls == 1 else S.UNAVAILABLE)
        return "ok"

    policy = RetryPolicy(retries=3, backoff=0.5, max_backoff=10)
    result = await call_with_retry(
        attempt, policy=policy, timeout=30, clock=t.clock, sleep=t.sleep, rng=lambda: 1.0
    )
    assert (result, calls, t.sleeps) == ("ok", 3, [0.5, 1.0])

    async def always_cancelled(left: float | None) -> None:
        raise rpc_error(S.CANCELLED, "shutting down")

    with pytest.raises(Cancelled, match="shutting down"):
        await call_with_retry(
            always_cancelled, policy=RetryPolicy(retries=2), timeout=None, sleep=t.sleep
        )


def test_default_policy_rides_through_a_four_second_outage() -> None:
    """A restart on a loaded machine (1.7-3 s), plus the channel's reconnect (up to 2 s
    later): an outage of ~4 s. Eight retries waited less than that one call in three."""
    policy = RetryPolicy()
    assert (policy.retries, policy.backoff, policy.max_backoff) == (12, 0.1, 2.0)
    ceilings = [policy.ceiling(n) for n in range(policy.retries)]
    assert ceilings == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6] + [2.0] * 7)
    # full jitter: the expected total wait is half the ceilings' sum, ~8.5 s, twice a 4 s
    # outage; and with every draw at the 25th percentile the waits still cover 4 s
    assert sum(ceilings) / 2 > 2 * 4.0
    assert sum(ceilings) / 4 > 4.0
    # and the sum of the draws is under 4 s in fewer than 1 call in 200 (seeded)
    rng = random.Random(7)
    short = sum(sum(rng.random() * c for c in ceilings) < 4.0 for _ in range(20_000))
    assert short < 100, short
    client = AsyncClient.__init__.__kwdefaults__ or {}
    assert (client["retries"], client["backoff"], client["max_backoff"]) == (12, 0.1, 2.0)


async def test_retries_stop_where_the_wait_would_cross_the_deadline() -> None:
    t = FakeTime()
    calls = 0

    async def attempt(left: float | None) -> None:
        nonlocal calls
        calls += 1
        t.now += 0.4
        raise rpc_error(S.UNAVAILABLE, "down")

    policy = RetryPolicy(retries=100, backoff=0.5, max_backoff=0.5)
    with pytest.raises(Unavailable):
        await call_with_retry(
            attempt, policy=policy, timeout=2.0, clock=t.clock, sleep=t.sleep, rng=lambda: 1.0
        )
    # 0.4 + 0.5 + 0.4 + 0.5 + 0.4 = 2.2 > 2: the third wait would cross the deadline
    assert calls == 3
    assert t.now - 100.0 <= 2.0 + 0.4
