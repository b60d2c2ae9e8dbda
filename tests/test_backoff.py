"""Jittered exponential backoff (service/backoff.py): bounds, growth, cap, reset.

Deterministic: every test injects its random function (a seeded ``random.Random`` or a
constant).
"""

from __future__ import annotations

import math
import random

import pytest

from tierdisk.service.backoff import Backoff

JUST_BELOW_ONE = math.nextafter(1.0, 0.0)


def constant(value: float) -> random.Random:
    """A ``random.Random`` whose ``random()`` always returns ``value``."""

    class Constant(random.Random):
        def random(self) -> float:
            return value

    return Constant()


def never() -> float:
    raise AssertionError("no random number may be drawn")


def test_plain_delays_double_up_to_the_cap() -> None:
    backoff = Backoff(0.1, 1.0, jitter=0, rand=never)
    assert [backoff.next() for _ in range(7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    assert backoff.delay == 1.0


def test_factor() -> None:
    backoff = Backoff(1.0, 100.0, factor=3.0, jitter=0)
    assert [backoff.next() for _ in range(6)] == [1.0, 3.0, 9.0, 27.0, 81.0, 100.0]


def test_default_jitter_is_half_to_one_and_a_half_times_the_delay() -> None:
    """Bit for bit ``delay * (0.5 + random())``, then ``delay = min(delay * 2, cap)``: the
    loops Backoff replaced computed exactly this."""
    backoff = Backoff(0.2, 10.0, rand=random.Random(1234).random)
    twin = random.Random(1234)
    delay = 0.2
    for _ in range(12):
        assert backoff.next() == delay * (0.5 + twin.random())
        delay = min(delay * 2, 10.0)


@pytest.mark.parametrize("jitter", [0.5, 0.25, 1.0])
def test_bounds(jitter: float) -> None:
    low = Backoff(2.0, 8.0, jitter=jitter, rand=constant(0.0).random)
    high = Backoff(2.0, 8.0, jitter=jitter, rand=constant(JUST_BELOW_ONE).random)
    for delay in (2.0, 4.0, 8.0, 8.0):
        assert low.next() == pytest.approx(delay * (1 - jitter))
        assert delay * (1 - jitter) <= high.next() <= delay * (1 + jitter)


def test_seeded_delays_stay_in_bounds_and_grow_to_the_cap() -> None:
    rng = random.Random(99)
    backoff = Backoff(0.05, 2.0, rand=rng.random)
    bases: list[float] = []
    for _ in range(200):
        base = backoff.delay
        wait = backoff.next()
        assert 0.5 * base <= wait <= 1.5 * base
        bases.append(base)
    assert bases[:4] == [0.05, 0.1, 0.2, 0.4]
    assert bases == sorted(bases), "the delay never shrinks without a reset"
    assert max(bases) == 2.0 and bases[-1] == 2.0


def test_reset_starts_again_from_first() -> None:
    backoff = Backoff(0.1, 5.0, jitter=0)
    for _ in range(10):
        backoff.next()
    assert backoff.delay == 5.0
    backoff.reset()
    assert backoff.delay == 0.1
    assert [backoff.next() for _ in range(3)] == [0.1, 0.2, 0.4]
    backoff.reset()
    backoff.reset()  # idempotent
    assert backoff.next() == 0.1


def test_same_seed_same_delays() -> None:
    one = Backoff(0.1, 5.0, rand=random.Random(7).random)
    two = Backoff(0.1, 5.0, rand=random.Random(7).random)
    assert [one.next() for _ in range(20)] == [two.next() for _ in range(20)]


def test_default_random_is_the_random_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(random, "random", lambda: 0.25)
    assert Backoff(1.0, 4.0).next() == 0.75


def test_first_and_cap_are_kept() -> None:
    backoff = Backoff(0.1, 5.0)
    assert (backoff.first, backoff.cap, backoff.factor, backoff.jitter) == (0.1, 5.0, 2.0, 0.5)


def test_cap_equal_to_first_is_a_constant_delay() -> None:
    backoff = Backoff(60.0, 60.0, jitter=0)
    assert [backoff.next() for _ in range(3)] == [60.0, 60.0, 60.0]


@pytest.mark.parametrize(
    ("first", "cap", "factor", "jitter"),
    [
        (0.0, 1.0, 2.0, 0.5),
        (-1.0, 1.0, 2.0, 0.5),
        (2.0, 1.0, 2.0, 0.5),
        (0.1, 1.0, 0.5, 0.5),
        (0.1, 1.0, 2.0, -0.1),
        (0.1, 1.0, 2.0, 1.5),
    ],
)
def test_bad_arguments(first: float, cap: float, factor: float, jitter: float) -> None:
    with pytest.raises(ValueError):
        Backoff(first, cap, factor, jitter=jitter)
