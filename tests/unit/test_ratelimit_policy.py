"""certqueue.lifecycle.ratelimit_policy: which rules apply to a CA and what each purpose is charged
(pure, table-driven, fake clock)."""

from __future__ import annotations

import datetime as dt

import pytest

from certqueue.config import RateLimitSettings
from certqueue.lifecycle.ratelimit_policy import (
    LETS_ENCRYPT_PRODUCTION_URL,
    LETS_ENCRYPT_STAGING_URL,
    Charge,
    PreviousIssuance,
    Purpose,
    applied_rules,
    ca_block,
    charge,
    classify_order,
    is_pause,
    rules_from_settings,
)

T0 = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)
CA = "https://ca.test:14000/dir"
DAY = dt.timedelta(days=1)


def prev(
    names: tuple[str, ...] = ("a.example.com", "b.example.com"),
    directory: str = CA,
    age: dt.timedelta = 60 * DAY,
    window: tuple[float, float] | None = (-1.0, 1.0),
) -> PreviousIssuance:
    """A certificate issued ``age`` before T0, its ARI window ``window`` days around T0."""
    start = end = None
    if window is not None:
        start, end = T0 + window[0] * DAY, T0 + window[1] * DAY
    return PreviousIssuance(list(names), directory, T0 - age, start, end)


@pytest.mark.parametrize(
    ("names", "previous", "replaces", "expected"),
    [
        (["a.example.com", "b.example.com"], None, None, Purpose.NEW),
        (["a.example.com", "b.example.com"], prev(), None, Purpose.RENEWAL),
        (["B.example.com.", "a.example.com"], prev(), None, Purpose.RENEWAL),  # case, order, dot ignored
        (["a.example.com"], prev(), None, Purpose.NEW),  # a different set is a new certificate
        (["a.example.com", "b.example.com"], prev(age=121 * DAY), None, Purpose.NEW),  # past 120 days
        (["a.example.com", "b.example.com"], prev(directory="https://other/dir"), None, Purpose.NEW),
        (["a.example.com", "b.example.com"], prev(), "aki.serial", Purpose.ARI_RENEWAL),
        (["a.example.com", "c.example.com"], prev(), "aki.serial", Purpose.ARI_RENEWAL),  # one name shared
        (["c.example.com"], prev(), "aki.serial", Purpose.NEW),  # shares no name
        (["a.example.com", "b.example.com"], prev(window=(1.0, 2.0)), "aki.serial", Purpose.RENEWAL),
        (["a.example.com", "b.example.com"], prev(window=(-3.0, -2.0)), "aki.serial", Purpose.RENEWAL),
        (["a.example.com", "b.example.com"], prev(window=None), "aki.serial", Purpose.RENEWAL),
        (["c.example.com"], prev(window=(1.0, 2.0)), "aki.serial", Purpose.NEW),
    ],
)
def test_classify_order(
    names: list[str], previous: PreviousIssuance | None, replaces: str | None, expected: Purpose
) -> None:
    assert classify_order(names, directory_url=CA, previous=previous, replaces=replaces, now=T0) == expected


S, C, E = Charge.SPEND, Charge.CHECK, Charge.EXEMPT


@pytest.mark.parametrize(
    ("purpose", "expected"),
    [
        # new_orders, certs_per_domain, duplicate_certs, failed_authz, consecutive_failed_authz
        (Purpose.NEW, (S, S, S, C, C)),
        (Purpose.RENEWAL, (E, E, S, C, C)),
        (Purpose.ARI_RENEWAL, (E, E, E, E, C)),
    ],
)
def test_what_each_purpose_is_charged(purpose: Purpose, expected: tuple[Charge, ...]) -> None:
    scopes = ("new_orders", "certs_per_domain", "duplicate_certs", "failed_authz", "consecutive_failed_authz")
    assert tuple(charge(purpose, s) for s in scopes) == expected


def test_config_show_lists_the_rules_of_each_ca() -> None:
    rules = rules_from_settings(RateLimitSettings(ca_rules=["https://ca.test:14000/dir=custom"]))
    shown = applied_rules(
        rules, [LETS_ENCRYPT_PRODUCTION_URL, LETS_ENCRYPT_STAGING_URL, CA, "https://zerossl.test/dir"]
    )
    assert [(r["rules"], r["source"]) for r in shown] == [
        ("letsencrypt", "built in (a Let's Encrypt directory)"),
        ("letsencrypt-staging", "built in (a Let's Encrypt directory)"),
        ("custom", "rate_limits.ca_rules"),
        ("none", "built in (not a Let's Encrypt directory: no client-side budget)"),
    ]
    assert shown[0]["limits"] == {
        "new_orders": "300 per 3 hours",
        "certs_per_domain": "50 per 7 days",
        "duplicate_certs": "5 per 7 days",
        "failed_authz": "5 per 1 hour",
        "consecutive_failed_authz": "1152 per 1152 days",
    }
    assert shown[3]["limits"] == dict.fromkeys(shown[3]["limits"])


@pytest.mark.parametrize(
    ("detail", "expected"),
    [
        (
            "Your account is temporarily prevented from requesting certificates for a.example.com and "
            "possibly others. Please visit: https://portal.letsencrypt.org/sfe/v1/unpause?jwt=x",
            True,
        ),
        ('too many certificates (50) already issued for "example.com" in the last 168h0m0s', False),
        (None, False),
    ],
)
def test_is_pause(detail: str | None, expected: bool) -> None:
    assert is_pause(detail) is expected


@pytest.mark.parametrize(
    ("detail", "retry_after", "expected"),
    [
        ("too many new orders (300) from this account", 120.0, dt.timedelta(minutes=2)),
        ("too many new orders (300) from this account", None, dt.timedelta(hours=1)),
        ("Your account is temporarily prevented from requesting certificates for a.example", 60.0, DAY),
        (
            "Your account is temporarily prevented from requesting certificates for a.example",
            3 * 86400.0,
            3 * DAY,
        ),
    ],
)
def test_ca_block(detail: str, retry_after: float | None, expected: dt.timedelta) -> None:
    assert ca_block(detail, retry_after) == expected
