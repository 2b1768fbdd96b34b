"""DNS-01 end to end: real RFC2136 updates to BIND9, the propagation check against BIND, Pebble
resolving through BIND, and real ``dns`` and ``acme`` workers composing the chord."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import dns.message
import dns.query
import dns.rdatatype
import pytest
from sqlalchemy import select

from certqueue import crypto
from certqueue.celery_app import lazy_app
from certqueue.db import session_scope
from certqueue.models import Certificate, Challenge, Event, Issuance
from devstack.bind import BindServer
from tests.conftest_stack import Pipeline, build_pipeline, services_available, teardown_pipeline

pytestmark = pytest.mark.integration


def _txt(server: BindServer, name: str) -> list[str]:
    q = dns.message.make_query(name, dns.rdatatype.TXT)
    r = dns.query.udp(q, "127.0.0.1", port=server.port, timeout=2)
    return [b"".join(rd.strings).decode() for rrset in r.answer for rd in rrset]


@pytest.fixture(scope="module")
def bind_server() -> Iterator[BindServer]:
    records = {
        "example.test": [
            # a name with its own A record: the TXT node under it would otherwise make it an empty
            # non-terminal that the zone's wildcard A no longer covers
            "mixed IN A 127.0.0.1",
            # delegated validation: the challenge name is a CNAME to a name only certqueue writes
            # (same zone: an authoritative-only BIND does not chase CNAMEs across zones the way the
            # CA's recursive resolver does; crossing zones is covered by tests/unit/dns/test_dns_zones.py)
            "_acme-challenge.delegated CNAME delegated.acme-validation.example.test.",
        ]
    }
    with BindServer(zone="example.test", extra_zones=("validation.test",), records=records) as server:
        yield server


@pytest.fixture(scope="module")
def dns_pipeline(tmp_path_factory: pytest.TempPathFactory, bind_server: BindServer) -> Iterator[Pipeline]:
    why = services_available()
    if why:
        if os.environ.get("CERTQUEUE_REQUIRE_SERVICES"):
            pytest.fail(why)
        pytest.skip(why)
    env = {
        "CERTQUEUE_CHALLENGES__DNS_PROVIDER": "rfc2136",
        "CERTQUEUE_CHALLENGES__RFC2136": json.dumps(
            bind_server.provider_config(propagation_timeout=20, polling_interval=0.3)
        ),
        "CERTQUEUE_CHALLENGES__DNS_RESOLVERS": json.dumps([bind_server.nameserver]),
        "CERTQUEUE_CHALLENGES__NAMESERVER_PORT": str(bind_server.port),
    }
    p = build_pipeline(
        tmp_path_factory.mktemp("dns01"), backend="postgres", extra_env=env, dns_server=bind_server.nameserver
    )
    yield p
    teardown_pipeline(p)


def test_wildcard_and_base_name_in_one_certificate(dns_pipeline, bind_server):
    cid = dns_pipeline.request(["*.wild.example.test", "wild.example.test"], challenge_type="dns-01")
    dns_pipeline.wait_state(cid, "ACTIVE", timeout=90)
    with session_scope(write=False) as s:
        c = s.get(Certificate, cid)
        iss = s.get(Issuance, c.current_issuance_id)
        chs = s.execute(select(Challenge).where(Challenge.certificate_id == cid)).scalars().all()
    assert sorted(crypto.cert_info(iss.cert_pem).names) == ["*.wild.example.test", "wild.example.test"]
    crypto.verify_chain(
        iss.cert_pem,
        crypto.split_pem_chain(iss.chain_pem),
        [dns_pipeline.pebble.roots_pem()],
        name="x.wild.example.test",
    )
    # both authorizations used one name: two TXT values at _acme-challenge.wild.example.test
    assert sorted(c.type for c in chs) == ["dns-01", "dns-01"]
    assert {c.dns_name for c in chs} == {"_acme-challenge.wild.example.test"}
    # cleanup ran on the dns pool and removed both values, and only them
    dns_pipeline.wait_for(
        lambda: (
            dns_pipeline.count(Challenge, Challenge.certificate_id == cid, Challenge.status != "cleaned") == 0
        ),
        what="dns cleanup",
    )
    assert _txt(bind_server, "_acme-challenge.wild.example.test") == []


def test_mixed_http01_and_dns01_names(dns_pipeline, bind_server):
    cid = dns_pipeline.request(
        ["mixed.example.test", "*.mixed.example.test"],
        challenge_type="http-01",
        challenge_map={"*.mixed.example.test": "dns-01"},
    )
    dns_pipeline.wait_state(cid, "ACTIVE", timeout=90)
    with session_scope(write=False) as s:
        types = {
            c.identifier: c.type
            for c in s.execute(select(Challenge).where(Challenge.certificate_id == cid)).scalars()
        }
    assert types == {"mixed.example.test": "http-01", "*.mixed.example.test": "dns-01"}


def test_cname_delegated_validation(dns_pipeline, bind_server):
    """``_acme-challenge.delegated.example.test`` is a CNAME: the TXT value is written at its
    target, checked there, and Pebble follows the CNAME to find it."""
    cid = dns_pipeline.request(["delegated.example.test"], challenge_type="dns-01")
    dns_pipeline.wait_state(cid, "ACTIVE", timeout=90)
    with session_scope(write=False) as s:
        ch = s.execute(select(Challenge).where(Challenge.certificate_id == cid)).scalars().one()
    assert ch.handle["fqdn"] == "delegated.acme-validation.example.test"
    dns_pipeline.wait_for(
        lambda: (
            dns_pipeline.count(Challenge, Challenge.certificate_id == cid, Challenge.status != "cleaned") == 0
        ),
        what="dns cleanup",
    )
    assert _txt(bind_server, "delegated.acme-validation.example.test") == []


def test_a_batch_of_dns01_certificates_goes_through_the_dns_pool_together(dns_pipeline, bind_server):
    """Eight wildcard certificates requested in one transaction are claimed as one acme batch:
    their orders are placed together, their records presented and checked by one dns task, and
    they are validated and cleaned up in batches too; no single-certificate DNS task runs."""
    from certqueue import operations
    from certqueue.certificates import CertificateRequest

    tag = os.urandom(3).hex()
    names = [f"b{i}{tag}.example.test" for i in range(8)]
    with session_scope() as s:
        reqs = [CertificateRequest.build(domains=[f"*.{n}", n], challenge_type="dns-01") for n in names]
        cids = [c.id for c, _ in operations.request_issue_many(s, reqs, actor="test")]
    lazy_app.get().send_task("certqueue.scan.dispatch", queue="scan")  # claimed together
    for cid in cids:
        dns_pipeline.wait_state(cid, "ACTIVE", timeout=120)
    dns_pipeline.wait_for(
        lambda: (
            dns_pipeline.count(Challenge, Challenge.certificate_id.in_(cids), Challenge.status != "cleaned")
            == 0
        ),
        what="dns cleanup",
    )
    for n in names:
        assert _txt(bind_server, f"_acme-challenge.{n}") == []
    logs = dns_pipeline.stack.all_logs()
    for batched in ("present_batch", "validate_batch", "cleanup_batch"):
        assert f"certqueue.{'acme' if batched == 'validate_batch' else 'dns'}.{batched}[" in logs, batched
    # every DNS-01 certificate of this module went through the batches
    for alone in ("certqueue.dns.present_all[", "certqueue.dns.cleanup_all["):
        assert alone not in logs, alone


def test_a_batch_over_two_zones_presents_each_zone_side_by_side(dns_pipeline, bind_server):
    """Four certificates of one batch, two in each of BIND's zones: their records are presented by
    a chord of one ``present_zone`` per zone, whose body sends the one validate batch."""
    from certqueue import operations
    from certqueue.certificates import CertificateRequest

    tag = os.urandom(3).hex()
    names = [f"z{i}{tag}.{'example' if i % 2 else 'validation'}.test" for i in range(4)]
    with session_scope() as s:
        reqs = [CertificateRequest.build(domains=[n], challenge_type="dns-01") for n in names]
        cids = [c.id for c, _ in operations.request_issue_many(s, reqs, actor="test")]
    lazy_app.get().send_task("certqueue.scan.dispatch", queue="scan")  # claimed together
    for cid in cids:
        dns_pipeline.wait_state(cid, "ACTIVE", timeout=120)
    logs = dns_pipeline.stack.all_logs()
    assert logs.count("certqueue.dns.present_zone[") >= 2 * logs.count("certqueue.dns.presented_batch[") > 0
    assert "certqueue.dns.present_all[" not in logs
    with session_scope(write=False) as s:
        for cid in cids:
            cert = s.get_one(Certificate, cid)
            iss = s.get_one(Issuance, cert.current_issuance_id)
            assert list(crypto.cert_info(iss.cert_pem).names) == cert.domains


def test_record_never_visible_fails_with_reason_and_is_cleaned_up(tmp_path_factory, bind_server):
    """The provider writes to a second BIND that is not the zone's authoritative server, so the
    record never becomes visible: the order fails after the provider's timeout, and the record
    the provider wrote is removed."""
    if services_available():
        pytest.skip(services_available())
    with BindServer(zone="example.test") as shadow:
        env = {
            "CERTQUEUE_CHALLENGES__DNS_PROVIDER": "rfc2136",
            "CERTQUEUE_CHALLENGES__RFC2136": json.dumps(
                shadow.provider_config(propagation_timeout=3, polling_interval=0.5)
            ),
            "CERTQUEUE_CHALLENGES__DNS_RESOLVERS": json.dumps([bind_server.nameserver]),
            "CERTQUEUE_CHALLENGES__NAMESERVER_PORT": str(bind_server.port),
        }
        p = build_pipeline(
            tmp_path_factory.mktemp("dns01-invisible"),
            backend="postgres",
            extra_env=env,
            dns_server=bind_server.nameserver,
        )
        try:
            cid = p.request(["invisible.example.test"], challenge_type="dns-01")
            p.wait_state(cid, "FAILED", timeout=60)
            with session_scope(write=False) as s:
                c = s.get(Certificate, cid)
                assert c.last_error == "dns:not_visible"
                ev = (
                    s.execute(
                        select(Event).where(Event.certificate_id == cid, Event.kind == "validation_error")
                    )
                    .scalars()
                    .one()
                )
                assert ev.data["type"] == "dns-01"
            p.wait_for(
                lambda: (
                    p.count(Challenge, Challenge.certificate_id == cid, Challenge.status != "cleaned") == 0
                ),
                what="cleanup",
            )
            assert _txt(shadow, "_acme-challenge.invisible.example.test") == []
            assert len(p.orders(cid)) == 1 and p.orders(cid)[0].status == "invalid"
        finally:
            teardown_pipeline(p)
