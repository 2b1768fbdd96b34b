"""certqueue.lifecycle.ratelimit_policy: which rules apply to a CA and what each purpose is charged
(pure, table-driven, fake clock)."""

from __future__ import annotations

import datetime as dt

import pytest

from certqueue.config import RateLimitSettings
from certqueue.lifecycle.ratelimit_policy import (
    LETS_ENCRYPT,
    LETS_ENCRYPT_PRODUCTION_URL,
    LETS_ENCRYPT_STAGING_URL,
    Charge,
    Limit,
    PreviousIssuance,
    Purpose,
    RateLimitPolicy,
    RateLimitRules,
    applied_rules,
    ca_block,
    charge,
    classify_order,
    custom_policy,
    is_pause,
    normalise_directory,
    parse_ca_rule,
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


# --- the smaller rules, case by case (each pins an edge the mutation run found untested) ----------


@pytest.mark.parametrize(
    ("count", "period"),
    [
        (0, dt.timedelta(hours=1)),
        (-1, dt.timedelta(hours=1)),
        (1, dt.timedelta(0)),
        (1, -dt.timedelta(seconds=1)),
    ],
)
def test_a_limit_needs_a_positive_count_and_period(count: int, period: dt.timedelta) -> None:
    with pytest.raises(ValueError, match=r"^a limit needs count >= 1 and a positive period$"):
        Limit(count, period)


def test_a_limit_of_one_per_a_microsecond_is_valid() -> None:
    assert Limit(1, dt.timedelta(microseconds=1)) == Limit(1, dt.timedelta(microseconds=1))
    assert Limit(1, dt.timedelta(hours=1)).describe() == "1 per 1 hour"


@pytest.mark.parametrize(
    ("period", "text"),
    [
        (dt.timedelta(days=7), "7 days"),
        (dt.timedelta(hours=3), "3 hours"),
        (dt.timedelta(minutes=30), "30 minutes"),
        (dt.timedelta(minutes=1), "1 minute"),
        (dt.timedelta(minutes=90), "90 minutes"),  # not a whole number of hours
        (dt.timedelta(hours=36), "36 hours"),  # not a whole number of days
        (dt.timedelta(seconds=90), "90 seconds"),
        (dt.timedelta(seconds=1.5), "1.5 seconds"),
    ],
)
def test_a_limit_describes_its_period_in_the_largest_whole_unit(period: dt.timedelta, text: str) -> None:
    assert Limit(2, period).describe() == f"2 per {text}"


def test_a_policy_has_limits_only_for_its_budget_scopes() -> None:
    assert LETS_ENCRYPT.limit("new_orders") == Limit(300, dt.timedelta(hours=3))
    assert LETS_ENCRYPT.limit("name") is None  # an attribute, but not a budget
    assert LETS_ENCRYPT.limit("ca") is None  # the CA's own blocks: no client-side limit
    assert LETS_ENCRYPT.limit("no_such_scope") is None


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        # scheme and host lower case, the path keeps its case
        ("  HTTPS://CA.Example:14000/Dir/Sub/ ", "https://ca.example:14000/Dir/Sub"),
        ("https://ca.example/BOX/", "https://ca.example/BOX"),  # only slashes are stripped
        ("HTTPS://CA.Example/next/http://X/", "https://ca.example/next/http://X"),  # the first :// splits
        ("ca.example/BOX/", "ca.example/BOX"),  # no scheme: compared as given, without the trailing slash
        ("/ca.example/", "/ca.example"),
    ],
)
def test_normalise_directory(url: str, expected: str) -> None:
    assert normalise_directory(url) == expected


def test_rules_source_says_why_a_ca_has_its_rules() -> None:
    assert RateLimitRules(enabled=False).source(CA) == "rate_limits.enabled is false"
    wildcard = rules_from_settings(RateLimitSettings(ca_rules=["*=letsencrypt"]))
    assert wildcard.source(CA) == "rate_limits.ca_rules (*)"
    assert wildcard.for_ca(CA) is LETS_ENCRYPT


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("https://CA.test/dir/=custom", ("https://ca.test/dir", "custom")),
        ("http://ca.test/dir = none", ("http://ca.test/dir", "none")),  # plain http is a directory too
        # the last = splits
        ("https://ca.test/dir?a=b=letsencrypt", ("https://ca.test/dir?a=b", "letsencrypt")),
        (" * =letsencrypt-staging", ("*", "letsencrypt-staging")),
    ],
)
def test_parse_ca_rule(item: str, expected: tuple[str, str]) -> None:
    assert parse_ca_rule(item) == expected


@pytest.mark.parametrize("item", ["=none", "  =none", "https://ca.test/dir", "https://ca.test/dir=strict"])
def test_a_malformed_ca_rule_names_the_accepted_form(item: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_ca_rule(item)
    assert str(exc.value) == (
        f"{item!r} is not <directory URL or *>=<rules> with rules one of "
        "letsencrypt, letsencrypt-staging, custom, none"
    )


def test_a_ca_rule_for_a_non_http_directory_is_refused() -> None:
    with pytest.raises(ValueError) as exc:
        parse_ca_rule("ftp://ca.test/dir=none")
    assert str(exc.value) == "'ftp://ca.test/dir=none': the directory must be an http(s) URL or *"


def test_custom_policy_takes_every_count_and_period_from_the_settings() -> None:
    settings = RateLimitSettings(
        new_orders_per_account=1,
        new_orders_period_hours=2,
        certificates_per_registered_domain=3,
        certificates_per_registered_domain_period_days=4,
        duplicate_certificates=5,
        duplicate_certificates_period_days=6,
        failed_authorizations_per_identifier=7,
        failed_authorizations_period_hours=8,
        consecutive_failed_authorizations_per_identifier=9,
        consecutive_failed_authorizations_period_days=10,
    )
    assert custom_policy(settings) == RateLimitPolicy(
        new_orders=Limit(1, dt.timedelta(hours=2)),  # a count of 1 is a limit; only 0 turns it off
        certs_per_domain=Limit(3, dt.timedelta(days=4)),
        duplicate_certs=Limit(5, dt.timedelta(days=6)),
        failed_authz=Limit(7, dt.timedelta(hours=8)),
        consecutive_failed_authz=Limit(9, dt.timedelta(days=10)),
        name="custom",
    )
    assert custom_policy(RateLimitSettings(duplicate_certificates=0)).duplicate_certs is None


def test_config_show_lists_each_ca_once_under_the_url_given() -> None:
    rules = rules_from_settings(RateLimitSettings())
    shown = applied_rules(rules, [CA, "HTTPS://CA.test:14000/dir/", LETS_ENCRYPT_PRODUCTION_URL, CA])
    assert [(r["directory"], r["rules"]) for r in shown] == [
        (CA, "none"),
        (LETS_ENCRYPT_PRODUCTION_URL, "letsencrypt"),
    ]


@pytest.mark.parametrize(
    ("ours", "theirs", "expected"),
    [
        (["WWW.Example.BOX."], ["www.example.box"], Purpose.RENEWAL),  # case and a final dot ignored
        (["WWW.EXAMPLE.BOX"], ["www.example.bo"], Purpose.NEW),  # but no letter is dropped
        (["straße.example"], ["strasse.example"], Purpose.NEW),  # ß is not ss (IDNA2008)
    ],
)
def test_renewal_needs_the_same_names_up_to_case_and_a_final_dot(
    ours: list[str], theirs: list[str], expected: Purpose
) -> None:
    previous = prev(names=tuple(theirs), window=None)
    assert classify_order(ours, directory_url=CA, previous=previous, replaces=None, now=T0) == expected


@pytest.mark.parametrize("window", [(0.0, 1.0), (-1.0, 0.0)])
def test_ari_renewal_includes_both_ends_of_the_window(window: tuple[float, float]) -> None:
    previous = prev(window=window)
    names = ["a.example.com", "b.example.com"]
    assert (
        classify_order(names, directory_url=CA, previous=previous, replaces="aki.serial", now=T0)
        == Purpose.ARI_RENEWAL
    )


def test_renewal_includes_the_last_day_of_the_lookback() -> None:
    names = ["a.example.com", "b.example.com"]
    at_edge = prev(age=120 * DAY, window=None)
    assert classify_order(names, directory_url=CA, previous=at_edge, replaces=None, now=T0) == Purpose.RENEWAL
    past = prev(age=120 * DAY + dt.timedelta(microseconds=1), window=None)
    assert classify_order(names, directory_url=CA, previous=past, replaces=None, now=T0) == Purpose.NEW
