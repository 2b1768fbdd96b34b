"""Zone lookup, CNAME following and the propagation check, against a real BIND9 (tests.conftest_dns).

The zones are ``example.test`` (wildcard A, CNAME fixtures) and ``validation.test`` (delegation
target); TXT values are written with the real rfc2136 provider and read back through
``certqueue.dns.zones`` / ``certqueue.dns.propagation``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator

import dns.flags
import dns.message
import dns.query
import pytest

from certqueue.dns.propagation import check_visible
from certqueue.dns.rfc2136 import RFC2136Provider
from certqueue.dns.zones import (
    CNAMELoop,
    DNSLookupError,
    Resolver,
    ZoneNotFound,
    authoritative_nameservers,
    find_zone,
    follow_cnames,
    parse_hostport,
)
from certqueue.errors import PermanentError, RetryableError
from devstack.bind import BindServer
from devstack.ports import free_tcp_udp_port

Publish = Callable[[str, str], None]


@pytest.fixture
def publish(bind: BindServer, bind_resolver: Resolver) -> Iterator[Publish]:
    """Add a TXT value through the real rfc2136 provider; everything published is removed afterwards."""
    provider = RFC2136Provider(bind.provider_config(), resolver=bind_resolver)
    published: list[tuple[str, str]] = []

    def _publish(fqdn: str, value: str) -> None:
        provider.present(fqdn, value)
        published.append((fqdn, value))

    yield _publish
    for fqdn, value in published:  # leave the session's BIND clean for other tests
        provider.cleanup(fqdn, value, None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("::1", ("::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        (" 10.0.0.2:53 ", ("10.0.0.2", 53)),
    ],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["ns1.example.com", "127.0.0.1:0", "127.0.0.1:70000", "1.2.3.4:x", ""])
def test_parse_hostport_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_hostport(text)


def test_resolver_rejects_hostnames() -> None:
    with pytest.raises(ValueError):
        Resolver(nameservers=("dns.google",))
    assert Resolver(nameservers="127.0.0.1:53").nameservers == ("127.0.0.1:53",)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "zone"),
    [
        ("example.test", "example.test"),
        ("www.example.test", "example.test"),  # covered by the wildcard: still not an apex
        ("_acme-challenge.a.b.c.example.test", "example.test"),  # NXDOMAIN/NODATA at each label, walk up
        ("_acme-challenge.x.validation.test", "validation.test"),
        ("Validation.Test.", "validation.test"),
    ],
)
def test_find_zone_walks_up_to_the_soa(bind_resolver: Resolver, name: str, zone: str) -> None:
    assert find_zone(name, bind_resolver) == zone


def test_find_zone_skips_an_alias(bind_resolver: Resolver) -> None:
    # _acme-challenge.alias.example.test is a CNAME: the SOA query follows it, but it is no apex
    assert find_zone("_acme-challenge.alias.example.test", bind_resolver) == "example.test"


def test_name_outside_any_zone_is_a_clear_permanent_error(bind_resolver: Resolver) -> None:
    with pytest.raises(ZoneNotFound) as info:
        find_zone("_acme-challenge.www.not-served.test", bind_resolver)
    assert isinstance(info.value, PermanentError)
    assert info.value.reason == "dns:zone_not_found"
    assert "_acme-challenge.www.not-served.test" in str(info.value)
    with pytest.raises(ZoneNotFound):
        check_visible("_acme-challenge.www.not-served.test", "x", resolver_cfg=bind_resolver)


def test_unreachable_resolver_is_retryable() -> None:
    nobody = Resolver(nameservers=(f"127.0.0.1:{free_tcp_udp_port()}",), timeout=0.2, lifetime=0.5)
    with pytest.raises(DNSLookupError) as info:
        find_zone("www.example.test", nobody)
    assert isinstance(info.value, RetryableError)
    assert info.value.reason == "dns:lookup_failed"


def test_follow_cnames(bind_resolver: Resolver) -> None:
    assert (
        follow_cnames("_acme-challenge.plain.example.test", bind_resolver)
        == "_acme-challenge.plain.example.test"
    )
    assert (
        follow_cnames("_acme-challenge.alias.example.test", bind_resolver)
        == "_acme-challenge.alias.validation.test"
    )
    assert (
        follow_cnames("_acme-challenge.chain.example.test.", bind_resolver)
        == "_acme-challenge.chain.validation.test"
    )


def test_follow_cnames_is_loop_safe_and_bounded(bind_resolver: Resolver) -> None:
    with pytest.raises(CNAMELoop) as info:
        follow_cnames("_acme-challenge.loop.example.test", bind_resolver)
    assert info.value.reason == "dns:cname_loop" and isinstance(info.value, PermanentError)
    with pytest.raises(CNAMELoop):
        follow_cnames("_acme-challenge.chain.example.test", bind_resolver, max_hops=1)


def test_authoritative_nameservers(bind_resolver: Resolver) -> None:
    assert authoritative_nameservers("example.test", bind_resolver) == [("ns.example.test", "127.0.0.1")]
    assert authoritative_nameservers("validation.test.", bind_resolver) == [("ns.example.test", "127.0.0.1")]
    with pytest.raises(ZoneNotFound):
        authoritative_nameservers("not-served.test", bind_resolver)


def test_check_visible_true_only_with_the_exact_value(
    bind_resolver: Resolver, publish: Publish, challenge_name: str
) -> None:
    value = secrets.token_urlsafe(32)
    missing = check_visible(challenge_name, value, resolver_cfg=bind_resolver)
    assert not missing.visible
    assert "no TXT record" in missing.reason and "ns.example.test" in missing.reason
    assert missing.zone == "example.test"

    publish(challenge_name, secrets.token_urlsafe(32))
    other = check_visible(challenge_name, value, resolver_cfg=bind_resolver)
    assert not other.visible and "1 other value" in other.reason

    publish(challenge_name, value)
    seen = check_visible(challenge_name, value, resolver_cfg=bind_resolver, also_recursive=True)
    assert seen.visible and seen.reason == ""
    assert len(seen.answers) == 2 and [a.recursive for a in seen.answers] == [False, True]
    assert all(value in a.values and len(a.values) == 2 for a in seen.answers)
    assert not check_visible(challenge_name, value[:-1], resolver_cfg=bind_resolver).visible


def test_check_visible_follows_the_cname_into_the_other_zone(
    bind_resolver: Resolver, publish: Publish
) -> None:
    value = secrets.token_urlsafe(32)
    target = follow_cnames("_acme-challenge.alias.example.test", bind_resolver)
    publish(target, value)  # the provider writes where the CNAME points (the key's other zone)
    result = check_visible("_acme-challenge.alias.example.test", value, resolver_cfg=bind_resolver)
    assert result.visible, result.reason
    assert result.effective_fqdn == "_acme-challenge.alias.validation.test"
    assert result.zone == "validation.test"


def test_check_visible_large_rrset_uses_tcp_fallback(
    bind: BindServer, bind_resolver: Resolver, publish: Publish, challenge_name: str
) -> None:
    # 20 values of 43 characters do not fit in 512 bytes of UDP without EDNS: the answer is truncated
    values = [secrets.token_urlsafe(32) for _ in range(20)]
    for v in values:
        publish(challenge_name, v)
    over_udp = dns.query.udp(
        dns.message.make_query(challenge_name, "TXT"), "127.0.0.1", port=bind.port, timeout=2
    )
    assert over_udp.flags & dns.flags.TC
    result = check_visible(challenge_name, values[-1], resolver_cfg=bind_resolver)
    assert result.visible, result.reason
    assert set(result.answers[0].values) == set(values)


def test_check_visible_nameserver_down_is_not_visible_with_reason(bind: BindServer) -> None:
    # recursive lookups reach BIND, but the authoritative port is dead: bounded, not visible, says why
    dead = Resolver(
        nameservers=(bind.nameserver,), nameserver_port=free_tcp_udp_port(), timeout=0.3, lifetime=1.0
    )
    result = check_visible("_acme-challenge.www.example.test", "x", resolver_cfg=dead)
    assert not result.visible
    assert result.answers[0].error is not None
    assert "ns.example.test (127.0.0.1:" in result.reason
