"""Every Python sample of the guide, under certqueue's names, against the real stack: Pebble (resolving
through BIND9), PostgreSQL, Redis, and real worker processes (acme, dns, and one propagate pool for
the regions ``edge`` (local files) and ``us-east-1`` (ACM on moto)).

Translations (docs/python-api.md lists them): Let's Encrypt -> Pebble; Cloudflare DNS-01 -> RFC2136
to BIND9; AWS -> moto; ``example.com`` -> names under ``example.test``; the guide's fixed ids
(``cert_abc123``) -> the ids certqueue returns."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from pydantic import ValidationError
from sqlalchemy import select, update

from certqueue import (
    AWSACMAdapter,
    CertificateAutomation,
    CertificateManager,
    CertificateMetadata,
    CertificateMonitoring,
    CertificateStore,
    crypto,
    runtime,
    update_config,
)
from certqueue.api.routes_health import certificate_health
from certqueue.db import session_scope
from certqueue.errors import InvalidInput, InvalidTransition, NotFound
from certqueue.manager import OperationFailed
from certqueue.metrics import render_metrics
from certqueue.models import Certificate as Row
from certqueue.models import Deployment, Issuance
from devstack.bind import BindServer
from devstack.moto import MotoServer
from tests.conftest_db import make_cert_pem
from tests.conftest_stack import Pipeline, build_pipeline, services_available, teardown_pipeline

pytestmark = pytest.mark.integration

EMAIL = "admin@example.test"
REGIONS = ("edge", "us-east-1")


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    server = MotoServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def guide(tmp_path_factory: pytest.TempPathFactory, bind: BindServer, moto: MotoServer) -> Iterator[Pipeline]:
    why = services_available()
    if why:
        if os.environ.get("CERTQUEUE_REQUIRE_SERVICES"):
            pytest.fail(why)
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("guide")
    regions = [
        {"name": "edge", "provider": "local", "path": str(tmp / "edge")},
        {
            "name": "us-east-1",
            "provider": "aws",
            "endpoint_url": moto.endpoint_url,
            "access_key_id": "testing",
            "secret_access_key": "testing",
        },
    ]
    env = {
        # the guide's Cloudflare DNS-01, here: RFC2136 updates to BIND9, which Pebble resolves through
        "CERTQUEUE_CHALLENGES__RFC2136": json.dumps(
            bind.provider_config(propagation_timeout=20, polling_interval=0.3)
        ),
        "CERTQUEUE_CHALLENGES__DNS_RESOLVERS": json.dumps([bind.nameserver]),
        "CERTQUEUE_CHALLENGES__NAMESERVER_PORT": str(bind.port),
        # runtime overrides reach the workers within half a second (5 s by default)
        "CERTQUEUE_RUNTIME_TTL_SECONDS": "0.5",
    }
    p = build_pipeline(tmp, backend="postgres", regions=regions, extra_env=env, dns_server=bind.nameserver)
    try:
        p.stack.start_worker("propagate", regions=REGIONS)
    except BaseException:
        teardown_pipeline(p)
        raise
    yield p
    teardown_pipeline(p)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def issuance(cid: str) -> Issuance:
    with session_scope(write=False) as s:
        row = s.get(Row, cid)
        assert row is not None and row.current_issuance_id is not None
        iss = s.get(Issuance, row.current_issuance_id)
        assert iss is not None
        return iss


def deployments(cid: str) -> dict[str, Deployment]:
    with session_scope(write=False) as s:
        return {
            d.region: d
            for d in s.execute(select(Deployment).where(Deployment.certificate_id == cid)).scalars()
        }


def acm(moto: MotoServer) -> Any:
    return boto3.client(
        "acm",
        region_name="us-east-1",
        endpoint_url=moto.endpoint_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


# --- Let's Encrypt Integration: issuance ------------------------------------------------------------


def test_certificate_issuance_workflow_http01(guide: Pipeline) -> None:
    """The guide's "Certificate Issuance Workflow" (metadata, then issue_certificate with http-01)."""

    async def sample() -> Any:
        cert_manager = CertificateManager()
        metadata = CertificateMetadata(
            domains=["workflow.example.test", "www.workflow.example.test"],
            organization="Example Corp",
            country="US",
            state="California",
            locality="San Francisco",
        )
        return await cert_manager.issue_certificate(
            domains=metadata.domains,
            email=EMAIL,
            organization=metadata.organization,
            country=metadata.country,
            state=metadata.state,
            locality=metadata.locality,
            key_size=2048,
            challenge_type="http-01",
            auto_renew=True,
            timeout=120,
        )

    certificate = run(sample())
    assert certificate.id.startswith("cert_") and certificate.state == "ACTIVE"
    assert certificate.domains == ["workflow.example.test", "www.workflow.example.test"]
    assert certificate.expires_at > dt.datetime.now(dt.UTC) + dt.timedelta(days=30)
    assert certificate.days_until_expiration > 30
    info = crypto.cert_info(certificate.certificate_pem)
    assert sorted(info.names) == ["workflow.example.test", "www.workflow.example.test"]
    assert info.key_type == "rsa2048" and info.serial == certificate.serial
    crypto.verify_chain(
        certificate.certificate_pem,
        crypto.split_pem_chain(certificate.chain_pem),
        [guide.pebble.roots_pem()],
        name="workflow.example.test",
    )
    # the key is decrypted only when asked for, and never shows in a repr
    assert "PRIVATE KEY" not in repr(certificate) and "PRIVATE KEY" not in str(certificate)
    assert crypto.key_matches_certificate(certificate.private_key_pem, certificate.certificate_pem)
    with session_scope(write=False) as s:
        row = s.get(Row, certificate.id)
        assert (row.organization, row.country, row.state_province, row.locality) == (
            "Example Corp",
            "US",
            "California",
            "San Francisco",
        )
    # ACTIVE only once every region holds it (multi_region is enabled here)
    deps = deployments(certificate.id)
    assert {r: d.status for r, d in deps.items()} == dict.fromkeys(REGIONS, "deployed")
    assert (
        Path(deps["edge"].remote_ref) / "cert.pem"
    ).read_text().strip() == certificate.certificate_pem.strip()


def test_wildcard_dns01(guide: Pipeline, bind: BindServer) -> None:
    """The guide's DNS-01 wildcard sample (Cloudflare there, RFC2136 to BIND9 here)."""

    async def sample() -> Any:
        cert_manager = CertificateManager()
        return await cert_manager.issue_certificate(
            domains=["*.wild.example.test", "wild.example.test"],
            email=EMAIL,
            challenge_type="dns-01",
            dns_provider="rfc2136",
            timeout=120,
        )

    certificate = run(sample())
    assert certificate.state == "ACTIVE"
    assert sorted(crypto.cert_info(certificate.certificate_pem).names) == [
        "*.wild.example.test",
        "wild.example.test",
    ]


def test_development_staging_sample(guide: Pipeline) -> None:
    """``CertificateManager(staging=True)`` and ``staging=True`` per call: with a CA of its own
    configured (Pebble here) there is no staging twin, so it issues from that CA."""
    cert_manager = CertificateManager(staging=True)
    certificate = run(
        cert_manager.issue_certificate(
            domains=["staging.example.test"], email=EMAIL, staging=True, timeout=120
        )
    )
    assert certificate.state == "ACTIVE"
    assert crypto.cert_info(certificate.certificate_pem).names == ("staging.example.test",)


def test_issue_bad_input_writes_and_sends_nothing(guide: Pipeline) -> None:
    before = guide.count(Row)
    m = CertificateManager()
    with pytest.raises(InvalidInput, match="wildcard"):
        run(m.issue_certificate(domains=["*.nope.example.test"], email=EMAIL))
    with pytest.raises(InvalidInput, match="email"):
        run(m.issue_certificate(domains=["ok.example.test"], email="not an email"))
    with pytest.raises(InvalidInput, match="key_size"):
        run(m.issue_certificate(domains=["ok.example.test"], email=EMAIL, key_size=1024))
    with pytest.raises(InvalidInput, match="one string"):
        run(m.issue_certificate(domains="ok.example.test", email=EMAIL))  # type: ignore[arg-type]
    assert guide.count(Row) == before


def test_a_failed_issuance_raises_with_the_stable_reason(guide: Pipeline) -> None:
    """A name Pebble cannot validate (it resolves nowhere: BIND refuses outside its zones)."""
    with pytest.raises(OperationFailed) as info:
        run(CertificateManager().issue_certificate(domains=["unreachable.invalid"], email=EMAIL, timeout=120))
    assert info.value.reason.startswith("acme:") and info.value.certificate_id
    assert guide.state(info.value.certificate_id) == "FAILED"


# --- Certificate Storage and metadata -----------------------------------------------------------------


def test_certificate_metadata_sample() -> None:
    metadata = CertificateMetadata(
        certificate_id="cert_abc123abc123abc123",
        domains=["example.com", "www.example.com"],
        issued_at=dt.datetime.now(),
        expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(days=30, hours=1),
        auto_renew=True,
        challenge_type="http-01",
        key_size=2048,
        organization="Example Corp",
        country="US",
        state="California",
        locality="San Francisco",
    )
    assert metadata.days_until_expiration == 30
    assert metadata.is_expiring_soon(days=30) is True
    assert metadata.is_expiring_soon(days=7) is False
    assert metadata.issued_at.tzinfo is not None  # the guide's naive datetimes are taken as UTC
    with pytest.raises(ValidationError):
        CertificateMetadata(domains=["example.com"], country="USA")
    with pytest.raises(ValidationError):
        CertificateMetadata(domains=["bad..example.com"])


def test_local_store_sample_store_get_list_delete(guide: Pipeline) -> None:
    leaf, key = make_cert_pem(("store.example.test", "www.store.example.test"), days=90)
    not_after = crypto.cert_info(leaf).not_after

    async def sample() -> tuple[str, Any, list[Any], list[Any]]:
        store = CertificateStore(
            backend="local", storage_path=str(guide.stack.workdir / "certificates"), encryption_key_path=None
        )
        cid = await store.store_certificate(
            certificate_pem=leaf,
            private_key_pem=key.decode(),
            domains=["store.example.test", "www.store.example.test"],
            expires_at=not_after.replace(tzinfo=None),  # the guide's naive datetime
        )
        cert = await store.get_certificate(cid)
        by_domain = await store.list_certificates({"domain": "www.store.example.test"})
        active = await store.list_certificates({"state": "ACTIVE", "domain": "store.example.test"})
        return cid, cert, by_domain, active

    cid, cert, by_domain, active = run(sample())
    assert cert.certificate_pem.strip() == leaf.strip()
    assert cert.domains == ["store.example.test", "www.store.example.test"]
    assert cert.state == "ACTIVE" and cert.external and cert.renew_at is None
    assert cert.private_key_pem.strip() == key.decode().strip()
    assert [c.id for c in by_domain] == [cid] and [c.id for c in active] == [cid]
    store = CertificateStore()
    with pytest.raises(InvalidTransition, match="force"):
        run(store.delete_certificate(cid))
    run(store.delete_certificate(cid, force=True))
    with pytest.raises(NotFound):
        run(store.get_certificate(cid))


def test_store_refuses_mismatches_and_writes_nothing(guide: Pipeline) -> None:
    leaf, key = make_cert_pem(("truth.example.test",), days=90)
    _, other_key = make_cert_pem(("truth.example.test",), days=90)
    store = CertificateStore()
    before = guide.count(Row)
    with pytest.raises(InvalidInput, match="certqueue assigns"):
        run(
            store.store_certificate(
                certificate_id="cert_abc123", certificate_pem=leaf, private_key_pem=key.decode()
            )
        )
    with pytest.raises(InvalidInput, match="differ"):
        run(
            store.store_certificate(
                certificate_pem=leaf, private_key_pem=key.decode(), domains=["other.example.test"]
            )
        )
    with pytest.raises(InvalidInput, match="notAfter"):
        run(
            store.store_certificate(
                certificate_pem=leaf, private_key_pem=key.decode(), expires_at=dt.datetime(2025, 3, 5)
            )
        )
    with pytest.raises(InvalidInput, match="does not match"):
        run(store.store_certificate(certificate_pem=leaf, private_key_pem=other_key.decode()))
    with pytest.raises(InvalidInput, match="unknown filter"):
        run(store.list_certificates({"colour": "blue"}))
    assert guide.count(Row) == before


def test_aws_store_sample_imports_into_acm(guide: Pipeline, moto: MotoServer) -> None:
    leaf, key = make_cert_pem(("acm-store.example.test",), days=60)
    store = CertificateStore(backend="aws", aws_region="us-east-1")
    cid = run(
        store.store_certificate(
            certificate_pem=leaf, private_key_pem=key.decode(), domains=["acm-store.example.test"]
        )
    )
    arn = deployments(cid)["us-east-1"].remote_ref
    assert arn and arn.startswith("arn:aws:acm:us-east-1:")
    described = acm(moto).describe_certificate(CertificateArn=arn)["Certificate"]
    assert described["DomainName"] == "acm-store.example.test"
    with pytest.raises(Exception, match="aws backend needs"):
        CertificateStore(backend="aws", aws_region="eu-west-3").backend_regions()


# --- Certificate Lifecycle: renewal and revocation --------------------------------------------------


def test_manual_and_forced_renewal(guide: Pipeline) -> None:
    m = CertificateManager()
    first = run(m.issue_certificate(domains=["renew.example.test"], email=EMAIL, timeout=120))
    # not due (renew_at is weeks away): returned as it is, nothing sent
    same = run(m.renew_certificate(certificate_id=first.id))
    assert same.serial == first.serial
    certificate = run(m.renew_certificate(certificate_id=first.id, force=True, timeout=120))
    assert certificate.id == first.id and certificate.state == "ACTIVE"
    assert certificate.serial != first.serial and certificate.issuance_id != first.issuance_id
    assert certificate.private_key_pem != first.private_key_pem  # a new key
    assert [o.purpose for o in guide.orders(first.id)] == ["issue", "renew"]


def test_revocation_after_key_compromise_and_a_new_key(guide: Pipeline) -> None:
    m = CertificateManager()
    old = run(m.issue_certificate(domains=["compromised.example.test"], email=EMAIL, timeout=120))
    before = guide.count(Row)
    with pytest.raises(InvalidInput, match="does not accept"):
        run(m.revoke_certificate(certificate_id=old.id, reason="affiliationChanged"))
    assert guide.state(old.id) == "ACTIVE"
    run(m.revoke_certificate(certificate_id=old.id, reason="keyCompromise"))
    assert guide.state(old.id) == "REVOKED"
    status = guide.pebble.cert_status(old.serial)
    assert status["Status"].lower() == "revoked" and int(status["Reason"]) == 1
    run(m.revoke_certificate(certificate_id=old.id, reason="keyCompromise"))  # idempotent
    new_cert = run(
        m.issue_certificate(
            domains=["compromised.example.test"], email=EMAIL, force_new_key=True, timeout=120
        )
    )
    assert new_cert.id != old.id and guide.count(Row) == before + 1
    assert new_cert.private_key_pem != old.private_key_pem
    with pytest.raises(InvalidTransition):
        run(m.renew_certificate(old.id, force=True))


# --- Monitoring, automation, runtime configuration --------------------------------------------------


def test_monitoring_and_health_samples(guide: Pipeline) -> None:
    m = CertificateManager()
    run(m.issue_certificate(domains=["monitored.example.test"], email=EMAIL, timeout=120))

    async def sample() -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
        monitoring = CertificateMonitoring(m)
        expiring_certs = await monitoring.get_expiring_certificates(within_days=30)
        health = await monitoring.get_health_status()

        async def health_check() -> dict[str, Any]:  # the guide's Kubernetes probe
            h = await CertificateMonitoring(m).get_health_status()
            if h["expired"] > 0:
                return {"status": "unhealthy", "expired": h["expired"]}
            if h["expiring_soon"] > 0:
                return {"status": "degraded", "expiring_soon": h["expiring_soon"]}
            return {"status": "healthy"}

        return expiring_certs, health, await health_check()

    expiring_certs, health, probe = run(sample())
    # Pebble's certificates live for years: none expires within 30 days unless imported so
    assert all(c.days_until_expiration <= 30 for c in expiring_certs)
    api = certificate_health().model_dump()
    assert health == api  # one computation for the API and the Python API
    assert health["total"] >= 1 and probe["status"] == health["status"]


def test_check_and_renew_all_claims_due_certificates(guide: Pipeline) -> None:
    m = CertificateManager()
    cert = run(m.issue_certificate(domains=["due.example.test"], email=EMAIL, timeout=120))
    with session_scope() as s:
        s.execute(update(Row).where(Row.id == cert.id).values(renew_at=dt.datetime.now(dt.UTC)))
    automation = CertificateAutomation(m)
    result = run(automation.check_and_renew_all())
    assert cert.id in result["certificate_ids"] and result["enqueued"] == result["claimed"] >= 1
    guide.wait_for(
        lambda: guide.state(cert.id) == "ACTIVE" and issuance(cert.id).id != cert.issuance_id,
        timeout=90,
        what="the claimed renewal",
    )
    assert run(automation.check_and_renew_all())["certificate_ids"] == []  # nothing due any more


def test_renewal_job_runs_in_the_event_loop(guide: Pipeline) -> None:
    async def sample() -> dict[str, Any] | None:
        automation = CertificateAutomation(CertificateManager())
        await automation.start_renewal_job(check_interval_hours=24)
        deadline = time.monotonic() + 20
        while automation.last_result is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert automation.running
        await automation.stop_renewal_job()
        assert not automation.running
        return automation.last_result

    assert run(sample()) == {"claimed": 0, "enqueued": 0, "certificate_ids": []}


def test_update_config_reaches_the_workers(guide: Pipeline) -> None:
    """The guide's ``update_config`` (and ``enable_auto_renewal``): a worker process computes
    ``renew_at`` with the new threshold, without a restart."""
    try:
        run(
            update_config(
                {
                    "certificate_management": {
                        "automation": {"renewal_threshold_days": 45, "renewal_jitter": 0}
                    }
                }
            )
        )
        run(CertificateManager().enable_auto_renewal(threshold_days=45))
        time.sleep(1.5)  # three of the workers' settings TTLs
        cert = run(
            CertificateManager().issue_certificate(
                domains=["threshold.example.test"], email=EMAIL, timeout=120
            )
        )
        assert cert.renew_at == cert.expires_at - dt.timedelta(days=45)
    finally:
        runtime.clear_override("automation")
        guide.install_settings()
    with session_scope(write=False) as s:
        assert runtime.list_overrides(s) == {}


# --- Multi-region propagation -------------------------------------------------------------------------


def test_propagation_sync_and_async(guide: Pipeline, moto: MotoServer) -> None:
    m = CertificateManager()
    cert = run(m.issue_certificate(domains=["propagate.example.test"], email=EMAIL, timeout=120))
    before = deployments(cert.id)

    result = run(m.propagate_certificate(certificate_id=cert.id, strategy="sync"))
    assert result.status == "success" and result.regions == dict.fromkeys(REGIONS, "success")
    forced = run(m.propagate_certificate(cert.id, strategy="sync", force=True, timeout=60))
    assert forced.regions == dict.fromkeys(REGIONS, "success")
    after = deployments(cert.id)
    assert all(after[r].deployed_at > before[r].deployed_at for r in REGIONS)
    assert after["us-east-1"].remote_ref == before["us-east-1"].remote_ref  # the same ARN

    pending = run(m.propagate_certificate(certificate_id=cert.id, strategy="async"))
    assert re.fullmatch(r"intent-[0-9]+", pending.task_id) and pending.status == "pending"
    assert set(pending.regions) == set(REGIONS)
    with pytest.raises(InvalidInput, match="unknown region"):
        run(m.propagate_certificate(cert.id, regions=["mars"]))
    with pytest.raises(InvalidInput, match="strategy"):
        run(m.propagate_certificate(cert.id, strategy="eventually"))  # type: ignore[arg-type]


def test_aws_acm_adapter_sample(guide: Pipeline, moto: MotoServer) -> None:
    certificate = run(
        CertificateManager().issue_certificate(domains=["adapter.example.test"], email=EMAIL, timeout=120)
    )

    async def sample() -> str:
        acm_adapter = AWSACMAdapter(
            region="us-east-1",
            endpoint_url=moto.endpoint_url,
            access_key_id="testing",
            secret_access_key="testing",
        )
        return await acm_adapter.import_certificate(
            certificate_pem=certificate.certificate_pem,
            private_key_pem=certificate.private_key_pem,
            certificate_chain=certificate.chain_pem,
        )

    acm_arn = run(sample())
    got = acm(moto).get_certificate(CertificateArn=acm_arn)["Certificate"]
    assert got.strip() == certificate.certificate_pem.strip()


# --- the manual EV certificate ------------------------------------------------------------------------


def test_manual_ev_certificate_is_monitored_propagated_never_renewed(guide: Pipeline) -> None:
    leaf, key = make_cert_pem(("ev.example.test", "www.ev.example.test"), days=10, key_type="rsa2048")
    store = CertificateStore()
    cid = run(store.store_certificate(certificate_pem=leaf, private_key_pem=key.decode()))
    # propagated like any other
    deps = deployments(cid)
    assert {r: d.status for r, d in deps.items()} == dict.fromkeys(REGIONS, "deployed")
    keyfile = Path(deps["edge"].remote_ref) / "privkey.pem"
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    # never renewed: not by the scan, not on request, and not revocable through our ACME account
    with session_scope() as s:
        s.execute(update(Row).where(Row.id == cid).values(renew_at=dt.datetime.now(dt.UTC)))
    assert cid not in run(CertificateAutomation().check_and_renew_all())["certificate_ids"]
    with pytest.raises(InvalidInput, match="imported"):
        run(CertificateManager().renew_certificate(cid, force=True))
    with pytest.raises(InvalidInput, match="CA that issued it"):
        run(CertificateManager().revoke_certificate(cid, reason="keyCompromise"))
    assert guide.state(cid) == "ACTIVE"
    # monitored: it is expiring, the health degrades, and the alert's series is there
    expiring = run(CertificateMonitoring().get_expiring_certificates(within_days=30))
    assert cid in [c.id for c in expiring]
    assert next(c for c in expiring if c.id == cid).days_until_expiration in (9, 10)
    health = run(CertificateMonitoring().get_health_status())
    assert health["status"] in ("degraded", "unhealthy") and health["expiring_soon"] >= 1
    text = render_metrics().decode()
    match = re.search(
        rf'^certqueue_certificate_expiration_timestamp_seconds\{{certificate_id="{cid}"\}} (\S+)$', text, re.M
    )
    assert match is not None, text[:2000]
    assert 9 < (float(match.group(1)) - time.time()) / 86400 < 30  # the series CertificateExpiringSoon reads
