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
