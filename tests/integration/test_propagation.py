"""Multi-region propagation end to end: a certificate issued by Pebble is deployed by four
per-region worker pools (AWS ACM on moto, GCP Certificate Manager on its fake, Azure Key Vault on its
fake with a service principal whose token comes from the fake's Entra ID endpoint, local files)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import redis
from sqlalchemy import select

from certqueue.db import session_scope
from certqueue.models import Certificate, Deployment, Event, Issuance
from devstack.moto import MotoServer
from tests.conftest_stack import Pipeline, build_pipeline, services_available, teardown_pipeline
from tests.fakes.azure_keyvault_api import FakeKeyVault
from tests.fakes.gcp_certmanager_api import FakeCertificateManager

pytestmark = pytest.mark.integration

REGIONS = ("us-east-1", "europe-west1", "westeurope", "edge")


@pytest.fixture(scope="module")
def clouds(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[MotoServer, FakeCertificateManager, Path]]:
    moto = MotoServer().start()
    gcp = FakeCertificateManager().start()
    yield moto, gcp, tmp_path_factory.mktemp("edge-files")
    gcp.stop()
    moto.stop()


@pytest.fixture(scope="module")
def keyvault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeKeyVault]:
    vault = FakeKeyVault(tmp_path_factory.mktemp("keyvault")).start()
    yield vault
    vault.stop()


@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory, clouds, keyvault: FakeKeyVault) -> Iterator[Pipeline]:
    why = services_available()
    if why:
        if os.environ.get("CERTQUEUE_REQUIRE_SERVICES"):
            pytest.fail(why)
        pytest.skip(why)
    moto, gcp, edge = clouds
    regions = [
        {
            "name": "us-east-1",
            "provider": "aws",
            "endpoint_url": moto.endpoint_url,
            "access_key_id": "testing",
            "secret_access_key": "testing",
        },
        {
            "name": "europe-west1",
            "provider": "gcp",
            "project_id": "demo",
            "location": "global",
            "api_endpoint": gcp.endpoint,
            "anonymous": True,
        },
        {
            "name": "westeurope",
            "provider": "azure",
            "key_vault": keyvault.url,
            "tenant_id": keyvault.tenant_id,
            "client_id": keyvault.client_id,
            "client_secret": keyvault.client_secret,
            "authority_host": keyvault.url,  # the fake's Entra ID token endpoint
            "connection_verify": keyvault.ca_file,
            "max_retries": 0,
        },
        {"name": "edge", "provider": "local", "path": str(edge)},
    ]
    p = build_pipeline(tmp_path_factory.mktemp("multi"), backend="postgres", regions=regions, pools=("acme",))
    for r in REGIONS:
        p.stack.start_worker("propagate", regions=(r,))
    yield p
    teardown_pipeline(p)


def _deployments(cid: str) -> dict[str, Deployment]:
    with session_scope(write=False) as s:
        return {
            d.region: d
            for d in s.execute(select(Deployment).where(Deployment.certificate_id == cid)).scalars()
        }


def _acm(moto: MotoServer):
    return boto3.client(
        "acm",
        region_name="us-east-1",
        endpoint_url=moto.endpoint_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def _keyvault_der_sha256(vault: FakeKeyVault, ref: str) -> str:
    import hashlib

    versions = vault.certificates[ref.rstrip("/").rsplit("/", 1)[-1]]
    return hashlib.sha256(versions[-1].der).hexdigest()


def test_issued_certificate_reaches_four_regions(multi, clouds, keyvault):
    moto, gcp, _edge = clouds
    cid = multi.request(["multi.example.test", "www.multi.example.test"])
    multi.wait_state(cid, "ACTIVE", timeout=90)
    deps = _deployments(cid)
    assert set(deps) == set(REGIONS)
    with session_scope(write=False) as s:
        iss = s.get(Issuance, s.get(Certificate, cid).current_issuance_id)
    for d in deps.values():
        assert d.status == "deployed" and d.fingerprint == iss.fingerprint and d.attempts == 1
    # what each region really holds
    acm = _acm(moto).describe_certificate(CertificateArn=deps["us-east-1"].remote_ref)["Certificate"]
    assert acm["DomainName"] == "multi.example.test"
    assert any(
        c["name"].endswith(deps["europe-west1"].remote_ref.rsplit("/", 1)[-1])
        for c in gcp.certificates.values()
    )
    kv_ref = deps["westeurope"].remote_ref
    assert kv_ref == f"{keyvault.url}/certificates/{cid.replace('_', '-')}"
    assert _keyvault_der_sha256(keyvault, kv_ref) == iss.fingerprint  # the leaf the vault serves
    assert keyvault.tokens_issued >= 1  # through the service principal, not a test credential
    key = Path(deps["edge"].remote_ref) / "privkey.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (Path(deps["edge"].remote_ref) / "cert.pem").read_text().strip() == iss.cert_pem.strip()


def test_renewal_redeploys_to_the_same_places(multi, clouds, keyvault):
    moto, _gcp, _edge = clouds
    cid = multi.request(["samearn.example.test"])
    multi.wait_state(cid, "ACTIVE", timeout=90)
    before = _deployments(cid)
    multi.send("certqueue.renew", {"v": 1, "certificate_id": cid, "force": True})
    multi.wait_for(
        lambda: multi.count(Issuance, Issuance.certificate_id == cid) == 2 and multi.state(cid) == "ACTIVE",
        timeout=90,
        what="renewal propagated",
    )
    after = _deployments(cid)
    for r in REGIONS:
        assert after[r].remote_ref == before[r].remote_ref  # the ARN, GCP name and directory are kept
        assert after[r].fingerprint != before[r].fingerprint
    acm = _acm(moto).get_certificate(CertificateArn=after["us-east-1"].remote_ref)["Certificate"]
    with session_scope(write=False) as s:
        iss = s.get(Issuance, s.get(Certificate, cid).current_issuance_id)
    assert acm.strip() == iss.cert_pem.strip()
    name = after["westeurope"].remote_ref.rsplit("/", 1)[-1]
    assert len(keyvault.certificates[name]) == 2  # a new version under the same name
    assert _keyvault_der_sha256(keyvault, after["westeurope"].remote_ref) == iss.fingerprint


def test_region_without_worker_stays_pending_then_completes_without_redeploys(multi):
    multi.stack.stop("worker-propagate-europe-west1")
    try:
        cid = multi.request(["stalled.example.test"])
        multi.wait_for(
            lambda: (
                {r: d.status for r, d in _deployments(cid).items()}.get("edge") == "deployed"
                and _deployments(cid).get("us-east-1") is not None
                and _deployments(cid)["us-east-1"].status == "deployed"
            ),
            timeout=90,
            what="two regions",
        )
        # the stalled region's deploy is waiting in its queue (sent, with no consumer): then it is
        # pending and the certificate not ACTIVE because nothing can run it, not because it is early
        broker = redis.Redis.from_url(multi.env["CERTQUEUE_BROKER__URL"], socket_timeout=5)
        queue = "propagate.europe-west1"
        multi.wait_for(
            lambda: sum(int(broker.llen(k)) for k in broker.scan_iter(match=queue + "*")) >= 1,
            timeout=60,
            what=f"the stalled region's deploy in {queue}",
        )
        assert _deployments(cid)["europe-west1"].status == "pending"
        assert multi.state(cid) == "ISSUED"
    finally:
        multi.stack.start_worker("propagate", regions=("europe-west1",))
    multi.wait_state(cid, "ACTIVE", timeout=60)
    deps = _deployments(cid)
    assert all(d.attempts == 1 for d in deps.values()), {r: d.attempts for r, d in deps.items()}
    with session_scope(write=False) as s:
        per_region = [
            e.data["region"]
            for e in s.execute(
                select(Event).where(Event.certificate_id == cid, Event.kind == "propagation")
            ).scalars()
        ]
    assert sorted(per_region) == sorted(REGIONS)  # each region deployed exactly once


def test_drift_is_detected_and_redeployed(multi):
    """Someone replaces the served files: the periodic check sees the wrong fingerprint and
    redeploys the issuance that should be live, in that region only."""
    cid = multi.request(["drift.example.test"])
    multi.wait_state(cid, "ACTIVE", timeout=90)
    before = _deployments(cid)
    other = multi.request(["other-drift.example.test"])
    multi.wait_state(other, "ACTIVE", timeout=90)
    edge_dir = Path(before["edge"].remote_ref)
    wrong = (Path(_deployments(other)["edge"].remote_ref) / "cert.pem").read_text()
    (edge_dir / "cert.pem").write_text(wrong)
    from certqueue.celery_app import lazy_app

    result = lazy_app.get().send_task("certqueue.scan.drift", queue="scan").get(timeout=60)
    assert sorted(result["regions"]) == sorted(REGIONS)  # one check per region, on its own queue
    with session_scope(write=False) as s:
        iss = s.get(Issuance, s.get(Certificate, cid).current_issuance_id)
    # the files are written first, then the deployment row is recorded (the chord's body): wait for both
    multi.wait_for(
        lambda: (
            (edge_dir / "cert.pem").read_text().strip() == iss.cert_pem.strip()
            and _deployments(cid)["edge"].attempts > before["edge"].attempts
        ),
        timeout=60,
        what="redeploy after drift, recorded",
    )
    after = _deployments(cid)
    assert after["edge"].attempts == before["edge"].attempts + 1
    assert after["us-east-1"].attempts == before["us-east-1"].attempts  # the other regions untouched


def _removal_events(cid: str) -> list[tuple[str, str, str | None]]:
    with session_scope(write=False) as s:
        return [
            (e.data["region"], e.reason or "", e.data.get("reason"))
            for e in s.execute(
                select(Event).where(Event.certificate_id == cid, Event.kind == "removal").order_by(Event.id)
            ).scalars()
        ]


def _removal_done(cid: str) -> bool:
    from certqueue.models import Intent

    with session_scope(write=False) as s:
        rows = list(
            s.execute(select(Intent).where(Intent.certificate_id == cid, Intent.kind == "remove")).scalars()
        )
    return bool(rows) and all(i.status == "done" for i in rows)


def _still_served(moto: MotoServer, gcp: FakeCertificateManager, vault: FakeKeyVault, refs: dict[str, str]):
    """Which of the four places still hold the copy ``refs`` names (asked of each service itself)."""
    from botocore.exceptions import ClientError

    held = set()
    try:
        _acm(moto).describe_certificate(CertificateArn=refs["us-east-1"])
        held.add("us-east-1")
    except ClientError as exc:
        assert exc.response["Error"]["Code"] == "ResourceNotFoundException"
    if any(name.endswith(refs["europe-west1"].rsplit("/", 1)[-1]) for name in gcp.certificates):
        held.add("europe-west1")
    if refs["westeurope"].rstrip("/").rsplit("/", 1)[-1] in vault.certificates:
        held.add("westeurope")
    if Path(refs["edge"]).exists():
        held.add("edge")
    return held


def test_a_revoked_certificate_is_removed_from_every_region_and_a_failed_removal_is_retried(
    multi, clouds, keyvault
):
    moto, gcp, _edge = clouds
    cid = multi.request(["revoked-removed.example.test"])
    multi.wait_state(cid, "ACTIVE", timeout=90)
    refs = {r: d.remote_ref for r, d in _deployments(cid).items()}
    assert _still_served(moto, gcp, keyvault, refs) == set(REGIONS)
    keyvault.fail_next(1, 503)  # the vault's first answer to the removal: it is retried, not lost
    multi.send("certqueue.revoke", {"v": 1, "certificate_id": cid, "reason": "keyCompromise"})
    multi.wait_state(cid, "REVOKED", timeout=60)
    multi.wait_for(lambda: _removal_done(cid), timeout=120, what="the removal finished")
    assert not _still_served(moto, gcp, keyvault, refs)
    events = _removal_events(cid)
    assert sorted(r for r, outcome, _ in events if outcome == "success") == sorted(REGIONS)
    failures = [(r, why) for r, outcome, why in events if outcome == "failure"]
    assert failures == [("westeurope", "azure_keyvault:unavailable")], events
    deps = _deployments(cid)
    assert {d.status for d in deps.values()} == {"removed"}
    with session_scope(write=False) as s:
        from certqueue.models import Intent

        (intent,) = s.execute(
            select(Intent).where(Intent.certificate_id == cid, Intent.kind == "remove")
        ).scalars()
        assert intent.status == "done" and intent.params["targets"] == {} and intent.params["why"] == "revoke"
    # drift leaves removed copies alone (nothing is redeployed behind the revocation)
    from certqueue.celery_app import lazy_app

    lazy_app.get().send_task("certqueue.scan.drift", queue="scan").get(timeout=60)
    assert not _still_served(moto, gcp, keyvault, refs)


def test_a_deleted_certificate_is_removed_from_every_region(multi, clouds, keyvault):
    from certqueue import operations
    from certqueue.nudge import nudge

    moto, gcp, _edge = clouds
    cid = multi.request(["deleted-removed.example.test"])
    multi.wait_state(cid, "ACTIVE", timeout=90)
    refs = {r: d.remote_ref for r, d in _deployments(cid).items()}
    with session_scope() as s:
        removal = operations.delete_certificate(s, cid, force=True, actor="test")
        assert removal is not None
    nudge()
    assert multi.state(cid) is None  # the rows are gone at once; the removal outlives them
    multi.wait_for(lambda: _removal_done(cid), timeout=120, what="the removal finished")
    assert not _still_served(moto, gcp, keyvault, refs)
    assert sorted(r for r, outcome, _ in _removal_events(cid) if outcome == "success") == sorted(REGIONS)
