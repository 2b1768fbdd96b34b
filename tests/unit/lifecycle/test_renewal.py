"""certqueue.lifecycle.renewal: the renewal window rule, jitter bounds and fleet spread.

The rule under test (the module's docstring): the window is ``renewal_threshold_days`` when that is
less than half the lifetime; otherwise a third of the lifetime, or a half for lifetimes under 10 days.
"""

from __future__ import annotations

import datetime as dt
import random
from collections import Counter

import pytest

from certqueue.lifecycle.renewal import is_due, renew_at, renewal_window

T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
D = dt.timedelta(days=1)


class FixedRandom(random.Random):
    """An rng whose ``random()`` always returns ``value`` (the extremes of the jitter range)."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


# lifetime days, threshold days, expected window
WINDOWS = [
    # the table
    (90, 30, 30 * D),  # 30 < 45: the threshold as configured
    (90, 45, 30 * D),  # 45 is not < 45: a third of 90
    (45, 30, 15 * D),  # 30 >= 22.5: a third of 45
    (45, 45, 15 * D),
    (6, 30, 3 * D),  # under 10 days: a half
    (6, 45, 3 * D),
    # around the edges
    (90, 44.9, dt.timedelta(days=44.9)),  # just under half: still the threshold
    (6, 2, 2 * D),  # a small threshold below half of a short lifetime is honoured
    (6, 3, 3 * D),  # 3 is not < 3: a half (the same value, by the other branch)
    (10, 30, dt.timedelta(days=10) / 3),  # exactly 10 days is not "under 10": a third
    (9.5, 30, dt.timedelta(days=9.5) / 2),
    (398, 30, 30 * D),  # the longest public TLS lifetime
    (47, 30, dt.timedelta(days=47) / 3),  # the CA/B Forum's 2029 maximum
    (1, 30, D / 2),
]


@pytest.mark.parametrize(("lifetime", "threshold", "window"), WINDOWS)
def test_renewal_window(lifetime: float, threshold: float, window: dt.timedelta) -> None:
    not_after = T0 + dt.timedelta(days=lifetime)
    assert renewal_window(T0, not_after, threshold) == window
    # without jitter the renewal time is exactly the window before expiry
    assert renew_at(T0, not_after, threshold, jitter=0) == not_after - window


@pytest.mark.parametrize("lifetime", [0, -1])
def test_zero_or_negative_lifetime_has_no_window(lifetime: float) -> None:
    not_after = T0 + dt.timedelta(days=lifetime)
    assert renewal_window(T0, not_after, 30) == dt.timedelta(0)
    assert renew_at(T0, not_after, 30, jitter=0.5, rng=FixedRandom(0.9)) == not_after


@pytest.mark.parametrize(("lifetime", "threshold", "window"), WINDOWS)
@pytest.mark.parametrize("jitter", [0.1, 0.5])
def test_jitter_bounds(lifetime: float, threshold: float, window: dt.timedelta, jitter: float) -> None:
    not_after = T0 + dt.timedelta(days=lifetime)
    latest = not_after - window  # never later than the unjittered time
    earliest = latest - window * jitter  # never earlier than the window times the jitter
    # the extremes of rng.random() in [0, 1)
    assert renew_at(T0, not_after, threshold, jitter=jitter, rng=FixedRandom(0.0)) == latest
    top = renew_at(T0, not_after, threshold, jitter=jitter, rng=FixedRandom(0.999999))
    assert earliest <= top < latest
    assert top - earliest < window * jitter * 1e-5
    rng = random.Random(1)
    for _ in range(500):
        when = renew_at(T0, not_after, threshold, jitter=jitter, rng=rng)
        assert earliest <= when <= latest
        assert when > T0  # renewal never starts before issuance


def test_same_seed_same_times() -> None:
    not_after = T0 + 90 * D
    a = [renew_at(T0, not_after, 30, rng=random.Random(42)) for _ in range(3)]
    b = [renew_at(T0, not_after, 30, rng=random.Random(42)) for _ in range(3)]
    assert a == b
    rng1, rng2 = random.Random(42), random.Random(42)
    seq1 = [renew_at(T0, not_after, 30, rng=rng1) for _ in range(50)]
    seq2 = [renew_at(T0, not_after, 30, rng=rng2) for _ in range(50)]
    assert seq1 == seq2
    assert len(set(seq1)) == 50  # and the jitter does move them
    assert seq1 != [renew_at(T0, not_after, 30, rng=random.Random(43)) for _ in range(50)]


def test_a_fleet_issued_in_one_minute_spreads_out() -> None:
    """1000 90-day certificates issued within the same minute, default jitter 0.1 of a 30-day window:
    renewals spread over up to 3 days instead of landing in one minute."""
    rng = random.Random(2026)
    times = []
    for i in range(1000):
        nb = T0 + dt.timedelta(seconds=rng.uniform(0, 60))
        times.append(renew_at(nb, nb + 90 * D, 30, jitter=0.1, rng=random.Random(i)))
    spread = max(times) - min(times)
    assert spread >= dt.timedelta(hours=60)  # of a possible 72
    per_hour = Counter(t.replace(minute=0, second=0, microsecond=0) for t in times)
    assert len(per_hour) >= 60
    assert max(per_hour.values()) <= 40  # ~14 per hour on average; nothing close to a stampede
    for t in times:  # and every one still renews inside the 30-day window or a little before
        assert T0 + 57 * D <= t <= T0 + 60 * D + dt.timedelta(minutes=1)


def test_jitter_uses_the_module_rng_by_default() -> None:
    not_after = T0 + 90 * D
    random.seed(5)
    a = renew_at(T0, not_after, 30, jitter=0.1)
    random.seed(5)
    assert renew_at(T0, not_after, 30, jitter=0.1) == a
    assert a < not_after - 30 * D


@pytest.mark.parametrize(
    ("renew_time", "now", "due"),
    [
        (None, T0, False),  # external / auto_renew off: never due
        (T0, T0, True),
        (T0 - dt.timedelta(seconds=1), T0, True),
        (T0 + dt.timedelta(seconds=1), T0, False),
    ],
)
def test_is_due(renew_time: dt.datetime | None, now: dt.datetime, due: bool) -> None:
    assert is_due(renew_time, now) is due
