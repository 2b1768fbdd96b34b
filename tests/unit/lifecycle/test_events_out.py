"""certqueue.lifecycle.events_out: which audit events are announced, and what an attempt's answer
means (table-driven, pure)."""

from __future__ import annotations

import pytest

from certqueue.lifecycle.events_out import EVENT_TYPES, Outcome, after_attempt, public_event, wants


@pytest.mark.parametrize(
    ("kind", "src", "dst", "reason", "expected"),
    [
        ("issuance", None, None, "success", "issued"),
        ("issuance", None, None, "failure", None),  # the move to FAILED announces it, once
        ("renewal", None, None, "success", "renewed"),
        ("renewal", None, None, "failure", "failed"),
        ("propagation", None, None, "success", "deployed"),
        ("propagation", None, None, "failure", "failed"),
        ("transition", "ISSUING", "FAILED", "acme:rejectedIdentifier", "failed"),
        ("transition", "ACTIVE", "REVOKED", "keyCompromise", "revoked"),
        ("transition", "ACTIVE", "EXPIRED", "not_after passed", "expired"),
        ("transition", "ISSUING", "ISSUED", "issued", None),
        ("transition", "ISSUED", "ACTIVE", "propagated", None),
        ("transition", "ACTIVE", "RENEWING", "due", None),
        ("revocation", None, None, "keyCompromise", None),  # the move to REVOKED announces it
        ("revocation", None, None, "failure", "failed"),
        ("expiring", None, None, "issuance:7", "expiring"),
        ("requested", None, None, None, None),
        ("order", None, None, "issue", None),
        ("backoff", None, None, "network", None),
        ("validation_error", None, None, "unauthorized", None),
    ],
)
def test_public_event(kind, src, dst, reason, expected) -> None:
    assert public_event(kind, src, dst, reason) == expected


def test_every_announced_type_is_a_known_type() -> None:
    produced = {
        public_event(k, None, d, r)
        for k, d, r in [
            ("issuance", None, "success"),
            ("renewal", None, "success"),
            ("propagation", None, "success"),
            ("transition", "FAILED", None),
            ("transition", "REVOKED", None),
            ("transition", "EXPIRED", None),
            ("expiring", None, None),
        ]
    }
    assert produced == set(EVENT_TYPES)


def test_empty_subscription_means_all() -> None:
    assert wants([], "issued") and wants(["issued"], "issued") and not wants(["revoked"], "issued")


KW = {"max_attempts": 5, "initial": 10.0, "cap": 100.0, "jitter": 0.0}


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_is_delivered(status: int) -> None:
    assert after_attempt(status, 1, **KW).outcome is Outcome.DELIVERED


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 413, 422])
def test_refusing_4xx_is_dead_at_once(status: int) -> None:
    assert after_attempt(status, 1, **KW).outcome is Outcome.DEAD


@pytest.mark.parametrize("status", [None, 408, 409, 425, 429, 500, 502, 503, 504, 300, 301, 199])
def test_no_answer_5xx_and_try_later_4xx_retry_with_backoff(status: int | None) -> None:
    d1, d3 = after_attempt(status, 1, **KW), after_attempt(status, 3, **KW)
    assert d1.outcome is Outcome.RETRY and d1.delay == 10.0
    assert d3.outcome is Outcome.RETRY and d3.delay == 40.0


def test_delay_is_capped() -> None:
    assert after_attempt(503, 4, max_attempts=50, initial=10.0, cap=30.0, jitter=0.0).delay == 30.0


def test_last_attempt_is_dead() -> None:
    assert after_attempt(503, 4, **KW).outcome is Outcome.RETRY
    assert after_attempt(503, 5, **KW).outcome is Outcome.DEAD
    assert after_attempt(None, 6, **KW).outcome is Outcome.DEAD


@pytest.mark.parametrize(("retry_after", "expected"), [(55.0, 55.0), (1.0, 10.0), (0.0, 10.0), (None, 10.0)])
def test_retry_after_is_a_floor(retry_after: float | None, expected: float) -> None:
    assert after_attempt(429, 1, retry_after=retry_after, **KW).delay == expected


def test_retry_after_is_clamped() -> None:
    assert after_attempt(503, 1, retry_after=10**9, **KW).delay == 3600.0


@pytest.mark.parametrize("retry_after", [0.5, 1.0])
def test_a_retry_after_of_a_second_or_less_is_still_a_floor(retry_after: float) -> None:
    d = after_attempt(429, 1, max_attempts=5, initial=0.25, cap=100.0, jitter=0.0, retry_after=retry_after)
    assert d.delay == retry_after
