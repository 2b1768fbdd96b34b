"""certqueue.lifecycle.backoff: ``initial * 2^(n-1)``, capped, with jitter, and Retry-After as a floor."""

from __future__ import annotations

import random

import pytest

from certqueue.lifecycle.backoff import backoff


class FixedRandom(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(1, 5), (2, 10), (3, 20), (4, 40), (5, 80), (6, 160), (7, 300), (8, 300), (50, 300)],
)
def test_doubling_then_cap_without_jitter(attempt: int, expected: float) -> None:
    assert backoff(attempt, initial=5, cap=300, jitter=0) == expected


@pytest.mark.parametrize("attempt", [0, -1, -100])
def test_attempts_below_one_count_as_the_first(attempt: int) -> None:
    assert backoff(attempt, initial=5, cap=300, jitter=0) == 5


@pytest.mark.parametrize("attempt", [1_000, 10_000, 2**31])
def test_huge_attempt_counts_stay_at_the_cap(attempt: int) -> None:
    """A certificate failing for months must not overflow the float conversion."""
    assert backoff(attempt, initial=0.25, cap=3600, jitter=0) == 3600
    assert 0 < backoff(attempt, initial=0.25, cap=3600, jitter=0.2, rng=random.Random(1)) <= 3600


@pytest.mark.parametrize(
    ("attempt", "retry_after", "expected"),
    [
        (1, 60, 60),  # the CA asked for more than our 5 s
        (3, 10, 20),  # ours is longer already
        (3, 20, 20),
        (10, 7200, 7200),  # a floor even above the cap: never retry sooner than asked
        (1, 0, 5),
        (1, None, 5),
    ],
)
def test_retry_after_is_a_floor(attempt: int, retry_after: float | None, expected: float) -> None:
    assert backoff(attempt, initial=5, cap=300, jitter=0, retry_after=retry_after) == expected


@pytest.mark.parametrize("retry_after", [30.0, 299.0, 1000.0])
def test_retry_after_floor_holds_with_jitter(retry_after: float) -> None:
    rng = random.Random(3)
    for attempt in range(1, 12):
        assert (
            backoff(attempt, initial=5, cap=300, jitter=0.5, rng=rng, retry_after=retry_after) >= retry_after
        )


@pytest.mark.parametrize("jitter", [0.1, 0.2, 0.5])
def test_jitter_bounds(jitter: float) -> None:
    rng = random.Random(11)
    for attempt in range(1, 10):
        base = min(300.0, 5 * 2 ** (attempt - 1))
        seen = [backoff(attempt, initial=5, cap=300, jitter=jitter, rng=rng) for _ in range(300)]
        assert all(base * (1 - jitter) <= s <= min(300.0, base * (1 + jitter)) for s in seen)
        if base * (1 + jitter) < 300:
            assert len(set(seen)) > 250  # it does spread (at the cap, values above it collapse onto it)
    # the extremes of rng.random() in [0, 1)
    assert backoff(2, initial=5, cap=300, jitter=0.2, rng=FixedRandom(0.0)) == pytest.approx(8.0)
    assert backoff(2, initial=5, cap=300, jitter=0.2, rng=FixedRandom(0.5)) == pytest.approx(10.0)
    assert backoff(2, initial=5, cap=300, jitter=0.2, rng=FixedRandom(0.999999)) == pytest.approx(
        12.0, rel=1e-5
    )


def test_jitter_never_exceeds_the_cap() -> None:
    assert backoff(20, initial=5, cap=300, jitter=0.5, rng=FixedRandom(0.999)) == 300
    assert backoff(7, initial=5, cap=300, jitter=0.5, rng=FixedRandom(0.999)) == 300
    assert backoff(6, initial=5, cap=200, jitter=0.5, rng=FixedRandom(0.999)) == 200  # 160 * 1.499 > 200


def test_seeded_rng_is_deterministic() -> None:
    a = [backoff(n, initial=1, cap=600, jitter=0.3, rng=random.Random(9)) for n in range(1, 8)]
    b = [backoff(n, initial=1, cap=600, jitter=0.3, rng=random.Random(9)) for n in range(1, 8)]
    assert a == b
    assert a == sorted(a)  # with a 0.3 jitter, doubling still dominates
