"""certqueue.issuers and the requests that name one: defaults from the acme: section, the issuer's
own where set, fallback lists, rate-limit rules, and bad settings refused with the key named."""

from __future__ import annotations

from typing import Any

import pytest

from certqueue import issuers, payloads
from certqueue.certificates import CertificateRequest
from certqueue.config import load_settings
from certqueue.errors import ConfigError, InvalidInput
from certqueue.lifecycle.ratelimit_policy import rules_from_settings

A = {"name": "alpha", "directory_url": "https://alpha.example/dir", "email": "a@example.com"}
B = {
    "name": "beta",
    "directory_url": "https://beta.example/dir",
    "eab_kid": "kid-b",
    "eab_hmac_key": "c2VjcmV0",
    "profile": "shortlived",
    "key_type": "rsa2048",
    "preferred_chain": "Beta Root",
    "rate_limits": "none",
    "fallback": ["alpha", "default"],
}


@pytest.fixture
def settings(settings_factory: Any) -> Any:
    return settings_factory(
        **{
            "issuers": [A, B],
            "acme.directory_url": "https://default.example/dir",
            "acme.email": "ops@example.com",
            "acme.eab_kid": "kid-d",
            "acme.eab_hmac_key": "ZGVm",
        }
    )


def test_default_is_the_acme_section_and_named_issuers_inherit_it(settings: Any) -> None:
    d, a, b = issuers.all_issuers(settings)
    assert (d.name, d.directory_url, d.email, d.eab_kid) == (
        "default",
        "https://default.example/dir",
        "ops@example.com",
        "kid-d",
    )
    assert d.eab_hmac_key(settings) == "ZGVm"
    assert (a.email, a.key_type, a.eab_kid, a.eab_hmac_key(settings)) == (
        "a@example.com",
        "ec256",
        None,
        None,
    )
    assert (b.email, b.profile, b.key_type, b.eab_hmac_key(settings)) == (
        "ops@example.com",
        "shortlived",
        "rsa2048",
        "c2VjcmV0",
    )
    assert "c2VjcmV0" not in repr(b)


def test_for_directory(settings: Any) -> None:
    assert issuers.for_directory(settings, "https://beta.example/dir").name == "beta"
    assert issuers.for_directory(settings, "https://elsewhere.example/dir").name == "default"


def test_a_request_naming_an_issuer_takes_its_directory_defaults_and_fallbacks(settings: Any) -> None:
    req = CertificateRequest.build(domains=["x.example.com"], issuer="beta")
    assert req.directory_url == "https://beta.example/dir"
    assert req.fallback_directory_urls == ["https://alpha.example/dir", "https://default.example/dir"]
    assert (req.profile, req.key_type, req.preferred_chain, req.issuer) == (
        "shortlived",
        "rsa2048",
        "Beta Root",
        "beta",
    )
    assert req.email == "ops@example.com"
    own = CertificateRequest.build(
        domains=["x.example.com"], issuer="beta", key_type="ec384", profile="classic"
    )
    assert (own.key_type, own.profile) == ("ec384", "classic")
    plain = CertificateRequest.build(domains=["x.example.com"])
    assert plain.directory_url == "https://default.example/dir" and plain.issuer is None


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"issuer": "nope"}, "unknown issuer 'nope'"),
        ({"issuer": "beta", "directory_url": "https://x.example/dir"}, "not both"),
        ({"issuer": 3}, "name of a configured issuer"),
    ],
)
def test_bad_issuer_choice(settings: Any, kw: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        CertificateRequest.build(domains=["x.example.com"], **kw)


def test_a_task_names_an_issuer_by_ca(settings: Any) -> None:
    out = payloads.parse(
        "certqueue.issue",
        {
            "v": 1,
            "certificate_id": "cert_" + "a" * 20,
            "request": {"domains": ["x.example.com"], "ca": "beta"},
        },
        settings,
    )
    assert out["request"]["issuer"] == "beta" and "directory_url" not in out["request"]
    with pytest.raises(InvalidInput, match="unknown CA"):
        payloads.parse(
            "certqueue.issue",
            {
                "v": 1,
                "certificate_id": "cert_" + "a" * 20,
                "request": {"domains": ["x.example.com"], "ca": "zeta"},
            },
            settings,
        )


def test_rate_limit_rules_of_issuers_and_ca_rules_win(settings_factory: Any) -> None:
    s = settings_factory(**{"issuers": [A, B], "rate_limits.ca_rules": []})
    assert issuers.ca_rules(s) == ["https://beta.example/dir=none"]
    rules = rules_from_settings(s.rate_limits, issuers.ca_rules(s))
    assert rules.for_ca("https://beta.example/dir").name == "none"
    s = settings_factory(**{"issuers": [A, B], "rate_limits.ca_rules": ["https://beta.example/dir=custom"]})
    assert (
        rules_from_settings(s.rate_limits, issuers.ca_rules(s)).for_ca("https://beta.example/dir").name
        == "custom"
    )


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([{**A, "name": "default"}], "is the acme: section"),
        ([A, A], "unique"),
        ([{**A, "fallback": ["zeta"]}], "unknown fallback issuer"),
        ([{**A, "fallback": ["alpha"]}], "itself"),
        ([{**A, "eab_kid": "k"}], "eab_kid and eab_hmac_key"),
        ([{**A, "directory_url": "ftp://x"}], "http\\(s\\) URL"),
        ([{**A, "name": "Has Space"}], "name"),
    ],
)
def test_bad_issuer_settings(tmp_path: Any, items: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(overrides={"issuers": items}, directory=tmp_path, environ={})
