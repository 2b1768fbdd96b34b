"""certqueue.acme.identifiers and CertificateRequest.build: IP addresses (RFC 8738) only under a
profile the CA issues them for, and only with http-01 or tls-alpn-01."""

from __future__ import annotations

from typing import Any

import pytest

from certqueue.acme.identifiers import check_ip_identifiers, is_ip
from certqueue.certificates import CertificateRequest
from certqueue.errors import InvalidInput


def _check(names: list[str], **kw: Any) -> None:
    args: dict[str, Any] = {
        "profile": None,
        "allowed_profiles": ["shortlived"],
        "challenge_type": "http-01",
        "challenge_map": {},
    }
    check_ip_identifiers(names, **{**args, **kw})


@pytest.mark.parametrize(("name", "ip"), [("127.0.0.1", True), ("2001:db8::1", True), ("a.example", False)])
def test_is_ip(name: str, ip: bool) -> None:
    assert is_ip(name) is ip


def test_dns_names_are_not_checked() -> None:
    _check(["a.example.com"], allowed_profiles=[], challenge_type="dns-01")


@pytest.mark.parametrize(
    ("profile", "allowed", "ok"),
    [
        ("shortlived", ["shortlived"], True),
        ("classic", ["shortlived"], False),
        (None, ["shortlived"], False),  # the CA's default profile is not named: refused
        (None, ["*"], True),
        ("classic", ["*"], True),
        ("shortlived", [], False),
    ],
)
def test_profile_rule(profile: str | None, allowed: list[str], ok: bool) -> None:
    if ok:
        _check(["192.0.2.1", "a.example.com"], profile=profile, allowed_profiles=allowed)
        return
    with pytest.raises(InvalidInput, match=r"192\.0\.2\.1: IP address certificates are not issued") as info:
        _check(["a.example.com", "192.0.2.1"], profile=profile, allowed_profiles=allowed)
    assert info.value.reason == "ip:profile"


@pytest.mark.parametrize(
    ("challenge_type", "cmap", "ok"),
    [
        ("http-01", {}, True),
        ("tls-alpn-01", {}, True),
        ("dns-01", {}, False),
        ("dns-01", {"192.0.2.1": "http-01"}, True),
        ("http-01", {"192.0.2.1": "dns-01"}, False),
    ],
)
def test_challenge_rule(challenge_type: str, cmap: dict[str, str], ok: bool) -> None:
    kw = {"profile": "shortlived", "challenge_type": challenge_type, "challenge_map": cmap}
    if ok:
        _check(["192.0.2.1"], **kw)
        return
    with pytest.raises(InvalidInput, match="RFC 8738") as info:
        _check(["192.0.2.1"], **kw)
    assert info.value.reason == "ip:challenge"


def test_build_refuses_an_ip_under_the_default_rules(settings_factory: Any) -> None:
    settings_factory()  # Let's Encrypt's rule: shortlived only
    with pytest.raises(InvalidInput, match="not issued under the CA's default profile"):
        CertificateRequest.build(domains=["192.0.2.1"])
    req = CertificateRequest.build(domains=["192.0.2.1", "a.example.com"], profile="shortlived")
    assert req.domains == ["192.0.2.1", "a.example.com"]


def test_build_canonicalises_ip_addresses(settings_factory: Any) -> None:
    settings_factory(**{"acme.ip_identifier_profiles": ["*"]})
    req = CertificateRequest.build(domains=["2001:DB8:0:0::1"], challenge_map={"2001:db8::1": "http-01"})
    assert req.domains == ["2001:db8::1"] and req.challenge_map == {"2001:db8::1": "http-01"}
