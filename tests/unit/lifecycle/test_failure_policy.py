"""The one failure policy (lifecycle/failure.py), table-tested with a seeded clock of randomness."""

from __future__ import annotations

import math
import random

import pytest

from certqueue.lifecycle.failure import (
    MAX_COUNTDOWN,
    MAX_ORDER_RETRY_AFTER,
    PARK_CAP,
    PARK_INITIAL,
    TRANSIENT_IN_TASK_RETRIES,
    Action,
    Kind,
    clamp_retry_after,
    countdown,
    decide,
)

TEN_YEARS = 10 * 365 * 24 * 3600.0


@pytest.mark.parametrize(
    ("kind", "retries", "parks", "action"),
    [
        (Kind.TRANSIENT, 0, 0, Action.RETRY),
        (Kind.TRANSIENT, TRANSIENT_IN_TASK_RETRIES - 1, 0, Action.RETRY),
        # past the quick retries a transient error parks the work: it never fails the certificate
        (Kind.TRANSIENT, TRANSIENT_IN_TASK_RETRIES, 0, Action.PARK),
        (Kind.TRANSIENT, 10_000, 500, Action.PARK),
        (Kind.PERMANENT, 0, 0, Action.FAIL),
        (Kind.PERMANENT, 99, 0, Action.FAIL),
        (Kind.KEYSTORE, 0, 0, Action.STOP_WORKER),
        (Kind.KEYSTORE, 99, 3, Action.STOP_WORKER),
        (Kind.INVALID_INPUT, 0, 0, Action.REJECT),
    ],
)
def test_actions(kind: Kind, retries: int, parks: int, action: Action) -> None:
    assert decide(kind, retries=retries, parks=parks, rng=random.Random(1)).action is action


def test_quick_retries_grow_and_stay_under_the_countdown_bound() -> None:
    delays = [
        decide(Kind.TRANSIENT, retries=n, rng=random.Random(7)).delay
        for n in range(TRANSIENT_IN_TASK_RETRIES)
    ]
    assert delays[0] < delays[-1]
    assert all(0 < d <= MAX_COUNTDOWN for d in delays)


def test_parked_delays_grow_to_the_cap() -> None:
    first = decide(Kind.TRANSIENT, retries=TRANSIENT_IN_TASK_RETRIES, parks=0, rng=random.Random(3)).delay
    assert PARK_INITIAL * 0.8 <= first <= PARK_INITIAL * 1.2
    late = decide(Kind.TRANSIENT, retries=TRANSIENT_IN_TASK_RETRIES, parks=40, rng=random.Random(3)).delay
    assert late == pytest.approx(PARK_CAP, rel=0.21) and late <= PARK_CAP


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (-5, None),
        (float("nan"), None),
        ("soon", None),
        (0, 0.0),
        (30, 30.0),
        (TEN_YEARS, 900.0),
        (float("inf"), 900.0),
        (10**400, 900.0),
    ],
)
def test_retry_after_is_clamped(value: object, expected: float | None) -> None:
    assert clamp_retry_after(value, 900.0) == expected  # type: ignore[arg-type]


def test_a_ten_year_retry_after_never_becomes_a_ten_year_wait() -> None:
    quick = decide(Kind.TRANSIENT, retries=0, retry_after=TEN_YEARS)
    assert quick.action is Action.RETRY and quick.delay == MAX_ORDER_RETRY_AFTER <= MAX_COUNTDOWN
    parked = decide(Kind.TRANSIENT, retries=TRANSIENT_IN_TASK_RETRIES, retry_after=TEN_YEARS)
    assert parked.action is Action.PARK and parked.delay == MAX_ORDER_RETRY_AFTER
    assert math.isfinite(countdown(TEN_YEARS)) and countdown(TEN_YEARS) == MAX_COUNTDOWN
    assert countdown(-1) == 0.0


def test_retry_after_is_a_floor() -> None:
    assert decide(Kind.TRANSIENT, retries=0, retry_after=120, rng=random.Random(0)).delay == 120


class _FixedRandom(random.Random):
    """``random()`` always returns ``value``: the jitter factor is ``1 + 0.2 * (2 * value - 1)``."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize(
    ("retries", "expected"),
    [
        (0, 1.0),
        (1, 2.0),
        (2, 4.0),
        (3, 8.0),
        (TRANSIENT_IN_TASK_RETRIES - 1, 2.0 ** (TRANSIENT_IN_TASK_RETRIES - 1)),
    ],
)
def test_the_n_th_quick_retry_waits_initial_times_two_to_the_n(retries: int, expected: float) -> None:
    """No jitter (random() = 0.5): the table's exact values (mutmut: ``retries + 2``, ``retries - 1``)."""
    assert decide(Kind.TRANSIENT, retries=retries, rng=_FixedRandom(0.5)).delay == pytest.approx(expected)


@pytest.mark.parametrize(
    ("parks", "expected"), [(0, PARK_INITIAL), (1, 2 * PARK_INITIAL), (3, 8 * PARK_INITIAL)]
)
def test_the_n_th_parking_waits_park_initial_times_two_to_the_n(parks: int, expected: float) -> None:
    decision = decide(Kind.TRANSIENT, retries=TRANSIENT_IN_TASK_RETRIES, parks=parks, rng=_FixedRandom(0.5))
    assert decision.delay == pytest.approx(expected)


def test_a_first_parking_is_the_default() -> None:
    """``parks`` left out means no earlier parking (not one)."""
    assert decide(
        Kind.TRANSIENT, retries=TRANSIENT_IN_TASK_RETRIES, rng=_FixedRandom(0.5)
    ).delay == pytest.approx(PARK_INITIAL)


@pytest.mark.parametrize("retries", [0, TRANSIENT_IN_TASK_RETRIES])
def test_the_callers_randomness_decides_the_jitter(retries: int) -> None:
    """The jitter comes from the ``rng`` given (a seeded clock of randomness in tests, one per
    worker in production), never from the global one: random() = 1 is the largest factor, 1.2."""
    top = decide(Kind.TRANSIENT, retries=retries, rng=_FixedRandom(1.0)).delay
    bottom = decide(Kind.TRANSIENT, retries=retries, rng=_FixedRandom(0.0)).delay
    assert top == pytest.approx(1.2 * bottom / 0.8)
    assert top / bottom == pytest.approx(1.5)


@pytest.mark.parametrize(("initial", "park_initial"), [(0.25, 5.0), (3.0, 600.0)])
def test_both_schedules_start_where_they_are_told(initial: float, park_initial: float) -> None:
    """``automation.transient_retry_initial_seconds`` and ``automation.park_initial_seconds``
    start the two doubling schedules; the table's shape (retries, then parking) is the same."""
    quick = [
        decide(Kind.TRANSIENT, retries=r, rng=_FixedRandom(0.5), initial=initial).delay
        for r in range(TRANSIENT_IN_TASK_RETRIES)
    ]
    assert quick == pytest.approx([initial * 2**r for r in range(TRANSIENT_IN_TASK_RETRIES)])
    parked = decide(
        Kind.TRANSIENT,
        retries=TRANSIENT_IN_TASK_RETRIES,
        parks=2,
        rng=_FixedRandom(0.5),
        park_initial=park_initial,
    )
    assert parked.action is Action.PARK and parked.delay == pytest.approx(4 * park_initial)
