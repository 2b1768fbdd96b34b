"""Drift over every deployment, on each region's own queue (issue 14, item 5).

The real stack: PostgreSQL, Redis, one propagate worker per region. Region ``edge`` (local files)
holds 1,500 deployed copies (rows written in bulk, files written to disk: issuing 1,500 certificates
through Pebble would test Pebble); region ``vault`` is Azure Key Vault (its HTTPS fake) with a wrong
client secret, so every call there is refused by the fake's Entra ID endpoint. The landed code
checked at most 1,000 deployments, on the acme pool, and only logged errors.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, insert, select

from certqueue import metrics
from certqueue.celery_app import lazy_app, region_queue
from certqueue.db import session_scope
from certqueue.models import Certificate, Deployment, DriftCursor, Event, Intent, utcnow
from certqueue.targets.base import leaf_fingerprint
from tests.conftest_stack import Pipeline, build_pipeline, services_available, teardown_pipeline
from tests.fakes.azure_keyvault_api import FakeKeyVault

pytestmark = pytest.mark.integration

N = 1500
BATCH = 1000


def _pem(cn: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pipeline, Path, FakeKeyVault]]:
    why = services_available()
    if why:
        if os.environ.get("CERTQUEUE_REQUIRE_SERVICES"):
            pytest.fail(why)
        pytest.skip(why)
    files = tmp_path_factory.mktemp("edge-files")
    vault = FakeKeyVault(tmp_path_factory.mktemp("vault")).start()
    regions = [
        {"name": "edge", "provider": "local", "path": str(files)},
        {
            "name": "vault",
            "provider": "azure",
            "key_vault": vault.url,
            "tenant_id": vault.tenant_id,
            "client_id": vault.client_id,
            "client_secret": "not-the-secret",
            "authority_host": vault.url,
            "connection_verify": vault.ca_file,
            "max_retries": 0,
        },
    ]
    p = build_pipeline(
        tmp_path_factory.mktemp("drift"),
        backend="postgres",
        regions=regions,
        pools=("acme",),  # the acme pool serves the scan queue
        extra_env={"CERTQUEUE_MULTI_REGION__DRIFT_BATCH_SIZE": str(BATCH)},
    )
    try:
        p.stack.start_worker("propagate", regions=("edge",))
        p.stack.start_worker("propagate", regions=("vault",))
    except BaseException:
        teardown_pipeline(p)
        vault.stop()
        raise
    yield p, files, vault
    teardown_pipeline(p)
    vault.stop()


def _seed(files: Path, vault_url: str) -> tuple[str, list[str]]:
    """N ACTIVE certificates deployed to edge (files on disk, rows in bulk) and 3 to vault."""
    pem = _pem("drift.example.test")
    fp = leaf_fingerprint(pem)
    now = utcnow()
    ids = [f"cert_drift{i:06d}" for i in range(N)]
    for cid in ids:
        d = files / cid
        d.mkdir()
        (d / "cert.pem").write_text(pem)
    certs = [
        {
            "id": cid,
            "domains": [f"d{i}.drift.example.test"],
            "dedupe_key": f"drift-{i}",
            "state": "ACTIVE",
            "directory_url": "https://acme.example.test/dir",
            "created_at": now,
            "updated_at": now,
        }
        for i, cid in enumerate(ids)
    ]
    deps = [
        {
            "certificate_id": cid,
            "region": "edge",
            "provider": "local",
            "remote_ref": str(files / cid),
            "fingerprint": fp,
            "status": "deployed",
            "attempts": 1,
            "updated_at": now,
        }
        for cid in ids
    ]
    deps += [
        {
            "certificate_id": cid,
            "region": "vault",
            "provider": "azure_keyvault",
            "remote_ref": f"{vault_url}/certificates/{cid.replace('_', '-')}",
            "fingerprint": fp,
            "status": "deployed",
            "attempts": 1,
            "updated_at": now,
        }
        for cid in ids[:3]
    ]
    with session_scope() as s:
        s.execute(insert(Certificate), certs)
        s.execute(insert(Deployment), deps)
    return pem, ids


def _check(region: str) -> dict:
    return (
        lazy_app.get()
        .send_task("certqueue.drift.check", args=[region], queue=region_queue(region))
        .get(timeout=120)
    )


def _drift_errors() -> dict[tuple[str, str], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics.CertqueueCollector())
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    return {
        (s.labels["region"], s.labels["reason"]): s.value
        for s in fams["certqueue_drift_errors"].samples
        if s.name.endswith("_total")
    }


def test_drift_over_1500_deployments_checks_all_of_them_on_the_region_queue(fleet) -> None:
    _p, files, vault = fleet
    _pem_text, ids = _seed(files, vault.url)
    # two copies past the first thousand (the landed code never looked there) and one before
    tampered = [ids[1499], ids[1200], ids[10]]
    other = _pem("someone-else.example.test")
    for cid in tampered[:2]:
        (files / cid / "cert.pem").write_text(other)
    (files / tampered[2] / "cert.pem").unlink()  # gone counts as drift too
    first = _check("edge")
    assert (first["checked"], first["pass_complete"]) == (BATCH, False), first
    assert first["drifted"] == 1 and first["errors"] == {}
    second = _check("edge")
    assert (second["checked"], second["pass_complete"]) == (N - BATCH, True), second
    assert second["drifted"] == 2
    with session_scope(write=False) as s:
        cur = s.get_one(DriftCursor, "edge")
        assert (cur.after_id, cur.passes, cur.checked) == (0, 1, 0)  # the next run starts again
        pending = set(
            s.execute(
                select(Deployment.certificate_id).where(
                    Deployment.region == "edge", Deployment.status == "pending"
                )
            ).scalars()
        )
        assert pending == set(tampered)
        redeploy = {
            i.certificate_id: i.params
            for i in s.execute(
                select(Intent).where(Intent.kind == "propagate", Intent.actor == "drift")
            ).scalars()
        }
        assert redeploy == {cid: {"regions": ["edge"], "force": True} for cid in tampered}
        found = s.execute(select(func.count()).select_from(Event).where(Event.kind == "drift")).scalar_one()
        assert found == 3


def test_a_region_with_bad_credentials_records_its_error_and_keeps_its_cursor(fleet) -> None:
    _p, _files, vault = fleet
    out = _check("vault")
    assert out["errors"] == {"azure_keyvault:auth": 1} and out["checked"] == 0, out
    assert out["pass_complete"] is False
    with session_scope(write=False) as s:
        assert s.get_one(DriftCursor, "vault").after_id == 0  # not skipped past: checked again next run
        (ev,) = s.execute(select(Event).where(Event.kind == "drift_error")).scalars()
        assert ev.reason == "azure_keyvault:auth"
        assert ev.data == {"region": "vault", "count": 1, "stopped": True}
    assert vault.tokens_issued == 0  # the fake refused the secret: the error is the real one
    _check("vault")
    assert _drift_errors()[("vault", "azure_keyvault:auth")] == 2


def test_beat_drift_fans_out_to_every_region_queue(fleet) -> None:
    """``certqueue.scan.drift`` (beat's, on the scan queue) only sends one check per region to the
    region's own queue: both cursors move, by the propagate workers that hold the credentials."""
    p, _files, _vault = fleet
    with session_scope(write=False) as s:
        before = {c.region: c.updated_at for c in s.execute(select(DriftCursor)).scalars()}
    assert set(before) == {"edge", "vault"}
    out = lazy_app.get().send_task("certqueue.scan.drift", queue="scan").get(timeout=60)
    assert out == {"regions": ["edge", "vault"]}

    def moved() -> bool:
        with session_scope(write=False) as s:
            after = {c.region: c.updated_at for c in s.execute(select(DriftCursor)).scalars()}
        return all(after[r] > before[r] for r in before)

    p.wait_for(moved, timeout=120, what="both regions checked")
