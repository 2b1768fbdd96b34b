"""certqueue.acme.profiles (checks before the order) and the renewal timing of each profile's lifetime."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from acme import messages
from pydantic import ValidationError

from certqueue.acme.profiles import DEFAULT_MAX_NAMES, PROFILE_VALIDITY, check_profile, offered_profiles
from certqueue.config import AcmeSettings
from certqueue.errors import InvalidInput
from certqueue.lifecycle import renewal

LE_DIRECTORY: dict[str, Any] = {
    "newOrder": "https://ca.test/new-order",
    "meta": {
        "profiles": {
            "classic": "https://letsencrypt.org/docs/profiles#classic",
            "tlsserver": "https://letsencrypt.org/docs/profiles#tlsserver",
            "shortlived": "https://letsencrypt.org/docs/profiles#shortlived",
        }
    },
}
NO_PROFILES: dict[str, Any] = {"newOrder": "https://ca.test/new-order", "meta": {"termsOfService": "x"}}
CUSTOM_CA: dict[str, Any] = {"newOrder": "https://ca.test/new-order", "meta": {"profiles": {"default": "d"}}}


def names(n: int) -> list[str]:
    return [f"h{i}.example.com" for i in range(n)]


@pytest.mark.parametrize(
    ("directory", "profile", "count", "reason"),
    [
        (LE_DIRECTORY, None, 100, None),  # no profile asked: the CA's default, nothing to check
        (NO_PROFILES, None, 3, None),
        (LE_DIRECTORY, "classic", 100, None),
        (LE_DIRECTORY, "classic", 101, "profile:too_many_names"),
        (LE_DIRECTORY, "tlsserver", 25, None),
        (LE_DIRECTORY, "tlsserver", 26, "profile:too_many_names"),
        (LE_DIRECTORY, "shortlived", 1, None),
        (LE_DIRECTORY, "shortlived", 25, None),
        (LE_DIRECTORY, "shortlived", 26, "profile:too_many_names"),
        (LE_DIRECTORY, "tlsclient", 1, "profile:not_offered"),  # retired at Let's Encrypt
        (NO_PROFILES, "classic", 1, "profile:not_offered"),  # a CA without profiles (Pebble 2.4)
        ({"newOrder": "https://ca.test/o"}, "shortlived", 1, "profile:not_offered"),
        (CUSTOM_CA, "default", 250, None),  # offered, but no limit known for it
        (CUSTOM_CA, "classic", 1, "profile:not_offered"),
        (messages.Directory.from_json(LE_DIRECTORY), "shortlived", 26, "profile:too_many_names"),
        (messages.Directory.from_json(LE_DIRECTORY), "shortlived", 25, None),
        (messages.Directory.from_json(NO_PROFILES), "shortlived", 1, "profile:not_offered"),
    ],
)
def test_check_profile(directory: Any, profile: str | None, count: int, reason: str | None) -> None:
    if reason is None:
        check_profile(directory, profile, names(count))
        return
    with pytest.raises(InvalidInput) as err:
        check_profile(directory, profile, names(count))
    assert err.value.reason == reason
    assert err.value.field == "profile"


def test_repeated_names_count_once() -> None:
    check_profile(LE_DIRECTORY, "shortlived", [*names(25), "H0.example.com", "h1.example.com."])


def test_limits_come_from_settings() -> None:
    settings = AcmeSettings(profile_max_names=["classic=100", "tlsserver=25", "shortlived=2"])
    assert settings.profile_name_limits == {"classic": 100, "tlsserver": 25, "shortlived": 2}
    check_profile(LE_DIRECTORY, "shortlived", names(2), settings.profile_name_limits)
    with pytest.raises(InvalidInput):
        check_profile(LE_DIRECTORY, "shortlived", names(3), settings.profile_name_limits)


def test_default_settings_match_the_published_limits() -> None:
    assert AcmeSettings().profile_name_limits == dict(DEFAULT_MAX_NAMES)
    assert dict(DEFAULT_MAX_NAMES) == {"classic": 100, "tlsserver": 25, "shortlived": 25}


@pytest.mark.parametrize("bad", [["classic"], ["classic=0"], ["classic=-1"], ["=5"], ["classic=many"]])
def test_bad_profile_limits_are_refused(bad: list[str]) -> None:
    with pytest.raises(ValidationError):
        AcmeSettings(profile_max_names=bad)


def test_offered_profiles() -> None:
    assert set(offered_profiles(LE_DIRECTORY)) == {"classic", "tlsserver", "shortlived"}
    assert offered_profiles(messages.Directory.from_json(LE_DIRECTORY)) == LE_DIRECTORY["meta"]["profiles"]
    assert offered_profiles(NO_PROFILES) == {}
    assert offered_profiles({"meta": {"profiles": "nope"}}) == {}


# --- each profile's lifetime renews on time with the existing policy ----------------------------------

ISSUED = dt.datetime(2030, 5, 1, 8, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("profile", "window", "renew_after_issue"),
    [
        ("shortlived", dt.timedelta(hours=80), dt.timedelta(hours=80)),  # 160 h: half the lifetime
        ("tlsserver", dt.timedelta(days=15), dt.timedelta(days=30)),  # 45 days: a third
        ("classic", dt.timedelta(days=30), dt.timedelta(days=60)),  # 90 days: the 30-day threshold
    ],
)
def test_profile_lifetimes_renew_at_a_sensible_point(
    profile: str, window: dt.timedelta, renew_after_issue: dt.timedelta
) -> None:
    not_after = ISSUED + PROFILE_VALIDITY[profile]
    assert renewal.renewal_window(ISSUED, not_after, 30) == window
    assert renewal.renew_at(ISSUED, not_after, 30, jitter=0) == ISSUED + renew_after_issue


def test_six_day_certificates_renew_with_jitter_still_well_before_expiry() -> None:
    import random

    rng = random.Random(5)
    not_after = ISSUED + dt.timedelta(days=6)
    assert renewal.renewal_window(ISSUED, not_after, 30) == dt.timedelta(days=3)
    times = [renewal.renew_at(ISSUED, not_after, 30, jitter=0.1, rng=rng) for _ in range(500)]
    # never before 2.7 days after issue, never later than 3 days before expiry
    assert all(ISSUED + dt.timedelta(days=2.7) <= t <= not_after - dt.timedelta(days=3) for t in times)
    assert not renewal.is_due(min(times), ISSUED + dt.timedelta(days=2))
    assert renewal.is_due(max(times), ISSUED + dt.timedelta(days=3))
