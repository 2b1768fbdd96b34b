"""certqueue.solvers: cert-manager's selection rules, table-driven; requests take their challenge
types from the solvers; bad solver settings are refused; solver credentials are masked."""

from __future__ import annotations

from typing import Any

import pytest

from certqueue import solvers
from certqueue.certificates import CertificateRequest
from certqueue.config import LoadedSettings, SolverSettings, load_settings, masked_dump
from certqueue.errors import ConfigError, InvalidInput

RFC = {"nameserver": "127.0.0.1:53", "tsig_key_name": "k", "tsig_secret": "c2VjcmV0c2VjcmV0"}
SOLVERS = [
    SolverSettings(name="corp", provider="rfc2136", config=RFC, selector={"dns_zones": ["corp.example.com"]}),
    SolverSettings(name="example", provider="rfc2136", config=RFC, selector={"dns_zones": ["example.com"]}),
    SolverSettings(name="web", type="http-01", selector={"dns_names": ["www.example.com"]}),
    SolverSettings(name="alpn", type="tls-alpn-01", selector={"dns_names": ["tls.example.com", "192.0.2.7"]}),
    SolverSettings(name="anything", type="http-01"),
]


@pytest.mark.parametrize(
    ("name", "ctype", "expected"),
    [
        ("www.example.com", None, "web"),  # an exact name beats a zone
        ("shop.example.com", None, "example"),
        ("example.com", None, "example"),  # the zone apex is in the zone
        ("a.corp.example.com", None, "corp"),  # the longest zone wins
        ("notexample.com", None, "anything"),  # "example.com" is a label suffix, not a string one
        ("*.corp.example.com", None, "corp"),  # a wildcard only takes dns-01 solvers
        ("*.www.example.com", None, "example"),
        ("*.other.org", None, None),  # no dns-01 solver for it: the catch-all is http-01
        ("192.0.2.7", None, "alpn"),
        ("192.0.2.8", None, "anything"),  # an IP never goes to a dns-01 solver
        ("www.example.com", "dns-01", "example"),  # a fixed type narrows the choice
        ("shop.example.com", "http-01", "anything"),
        ("shop.example.com", "tls-alpn-01", None),
    ],
)
def test_select(name: str, ctype: str | None, expected: str | None) -> None:
    got = solvers.select(SOLVERS, name, ctype)
    assert (got.name if got else None) == expected


def test_first_listed_wins_a_tie() -> None:
    a = SolverSettings(name="a", provider="rfc2136", selector={"dns_zones": ["example.com"]})
    b = SolverSettings(name="b", provider="rfc2136", selector={"dns_zones": ["example.com"]})
    assert solvers.select([a, b], "x.example.com").name == "a"  # type: ignore[union-attr]


def _solver_dicts() -> list[dict[str, Any]]:
    return [s.model_dump() for s in SOLVERS[:3]]


def test_requests_take_types_from_the_solvers(settings_factory: Any) -> None:
    settings_factory(**{"challenges.solvers": _solver_dicts()})
    req = CertificateRequest.build(domains=["a.example.com", "www.example.com", "*.corp.example.com"])
    assert req.challenge_map == {
        "a.example.com": "dns-01",
        "www.example.com": "http-01",
        "*.corp.example.com": "dns-01",
    }
    assert req.dns_provider is None  # the solvers present every dns-01 name
    own = CertificateRequest.build(domains=["www.example.com"], challenge_map={"www.example.com": "dns-01"})
    assert own.challenge_map == {"www.example.com": "dns-01"}  # the request's own choice stays
    with pytest.raises(InvalidInput, match="dns-01 needs a dns_provider"):
        CertificateRequest.build(domains=["x.other.org"], challenge_type="dns-01")  # no solver, no provider


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"name": "x"}, "needs provider"),
        ({"name": "x", "type": "http-01", "provider": "rfc2136"}, "for dns-01 solvers"),
        ({"name": "x", "type": "dns-02", "provider": "rfc2136"}, "dns-01"),
        ({"name": "Bad Name", "provider": "rfc2136"}, "name"),
        ({"name": "x", "provider": "rfc2136", "selector": {"zones": ["a"]}}, "zones"),
    ],
)
def test_bad_solvers_are_refused(tmp_path: Any, item: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(overrides={"challenges.solvers": [item]}, directory=tmp_path, environ={})


def test_duplicate_names_refused_and_secrets_masked(tmp_path: Any) -> None:
    one = {"name": "x", "provider": "rfc2136", "config": RFC}
    with pytest.raises(ConfigError, match="unique"):
        load_settings(overrides={"challenges.solvers": [one, one]}, directory=tmp_path, environ={})
    loaded: LoadedSettings = load_settings(
        overrides={"challenges.solvers": [one]}, directory=tmp_path, environ={}
    )
    shown = str(masked_dump(loaded))
    assert RFC["tsig_secret"] not in shown and "tsig_key_name" in shown
