"""certqueue.lifecycle: the cases ``make mutation`` found untested (table tests, fixed random sources).

Each test names the behaviour a surviving mutant broke. Mutants judged equivalent (no input the
policies accept can tell them apart) are listed in docs/testing.md, not tested here.
"""

from __future__ import annotations

import datetime as dt
import math

import pytest
from sqlalchemy import select

from certqueue import events
from certqueue.config import Settings
from certqueue.db import session_scope
from certqueue.lifecycle.ari_policy import RenewalInfo
from certqueue.lifecycle.backoff import backoff
from certqueue.lifecycle.renewal import renew_at
from certqueue.models import Certificate, Event, State

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


class Fixed:
    """A random source that always answers ``value`` (a fake ``random.Random``)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


# --- backoff ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("r", "expected"),
    [(0.0, 32.0), (0.5, 40.0), (0.999999, 48.0)],  # 40 s +- the default 20 %
)
def test_backoff_default_jitter_is_twenty_percent_either_way(r: float, expected: float) -> None:
    assert backoff(3, initial=10, cap=1000, rng=Fixed(r)) == pytest.approx(expected, abs=1e-3)  # type: ignore[arg-type]


def test_backoff_below_one_second_is_not_rounded_up() -> None:
    assert backoff(1, initial=0.25, cap=10, jitter=0) == 0.25
    assert backoff(1, initial=0.0, cap=10, jitter=0) == 0.0


def test_backoff_exponent_is_bounded_at_1000_doublings() -> None:
    """A huge attempt count costs nothing and stays finite even with no cap."""
    assert backoff(10**9, initial=1.0, cap=math.inf, jitter=0) == 2.0**1000


# --- renewal ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [0.0, 0.5, 0.999999])
def test_renew_at_default_jitter_takes_at_most_a_tenth_of_the_window(r: float) -> None:
    not_before, not_after = T0, T0 + dt.timedelta(days=90)
    start = not_after - dt.timedelta(days=30)
    got = renew_at(not_before, not_after, 30, rng=Fixed(r))  # type: ignore[arg-type]
    assert got == start - dt.timedelta(days=30) * (0.1 * r)
    assert start - dt.timedelta(days=3) <= got <= start


# --- ARI renewal information ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (T0.replace(tzinfo=None), T0 + dt.timedelta(days=1)),
        (T0, (T0 + dt.timedelta(days=1)).replace(tzinfo=None)),
        (T0.replace(tzinfo=None), (T0 + dt.timedelta(days=1)).replace(tzinfo=None)),
    ],
)
def test_renewal_info_refuses_any_naive_datetime(start: dt.datetime, end: dt.datetime) -> None:
    with pytest.raises(ValueError, match=r"^renewal window needs timezone-aware datetimes$"):
        RenewalInfo(start, end)


@pytest.mark.parametrize("end", [T0, T0 - dt.timedelta(seconds=1)])
def test_renewal_info_refuses_an_empty_or_reversed_window(end: dt.datetime) -> None:
    with pytest.raises(ValueError, match=r"^renewal window must end after it starts$"):
        RenewalInfo(T0, end)


@pytest.mark.parametrize("retry_after", [None, 60.0, 3600.5])
def test_renewal_info_round_trips_through_json(retry_after: float | None) -> None:
    info = RenewalInfo(T0, T0 + dt.timedelta(days=2), "https://ca.example/why", retry_after)
    data = info.to_json()
    assert data["retry_after_seconds"] == retry_after
    assert RenewalInfo.from_json(data) == info


@pytest.mark.parametrize(("raw", "expected"), [("90", 90.0), (120, 120.0), (None, None), ([1], None)])
def test_renewal_info_from_json_reads_retry_after(raw: object, expected: float | None) -> None:
    data = RenewalInfo(T0, T0 + dt.timedelta(days=2)).to_json() | {"retry_after_seconds": raw}
    assert RenewalInfo.from_json(data).retry_after_seconds == expected


# --- events that are not transitions ----------------------------------------------------------------


def test_record_stores_every_field_it_is_given(db_settings: Settings) -> None:
    with session_scope() as s:
        events.record(s, "cert_x", "renewal", reason="due", actor="scan", data={"attempt": 2})
        events.record(s, None, "validation_error")
    with session_scope(write=False) as s:
        rows = s.execute(select(Event).order_by(Event.id)).scalars().all()
        got = [(e.certificate_id, e.kind, e.reason, e.actor, e.data) for e in rows]
    assert got == [
        ("cert_x", "renewal", "due", "scan", {"attempt": 2}),
        (None, "validation_error", None, "certqueue", None),
    ]


def test_transition_records_certqueue_as_the_default_actor(db_settings: Settings) -> None:
    with session_scope() as s:
        s.add(Certificate(id="cert_t", domains=["t.example.com"], dedupe_key="t", state=State.REQUESTED,
                          directory_url="https://acme.example/dir"))  # fmt: skip
    with session_scope() as s:
        cert = s.get(Certificate, "cert_t")
        assert cert is not None
        events.transition(s, cert, State.ISSUING)
    with session_scope(write=False) as s:
        (ev,) = s.execute(select(Event).where(Event.certificate_id == "cert_t")).scalars().all()
        assert (ev.from_state, ev.to_state, ev.actor) == ("REQUESTED", "ISSUING", "certqueue")
