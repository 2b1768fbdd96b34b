"""A certificate past its notAfter shows EXPIRED whatever it was doing (issue 14, item 3).

On the real stack (Pebble, PostgreSQL, Redis, real workers): a renewal is held in propagation (the
region's worker is stopped), the served issuance's notAfter is moved into the past (Pebble's
certificates live for years; the test cannot wait for one to expire), and the expiry scan runs.
The certificate must show EXPIRED at once (state, event, the by-state metric and the expiration
timestamp the CertificateExpired alert reads), and the renewal in flight must go on: when the
region's worker returns, the new issuance is deployed and the certificate is ACTIVE again.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from certqueue import metrics
from certqueue.celery_app import lazy_app
from certqueue.config import get_settings
from certqueue.db import session_scope
from certqueue.models import Certificate, Deployment, Event, Issuance, utcnow
from tests.conftest_stack import Pipeline, build_pipeline, services_available, teardown_pipeline

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def edge_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pipeline, Path]]:
    why = services_available()
    if why:
        if os.environ.get("CERTQUEUE_REQUIRE_SERVICES"):
            pytest.fail(why)
        pytest.skip(why)
    files = tmp_path_factory.mktemp("edge-files")
    p = build_pipeline(
        tmp_path_factory.mktemp("expiry"),
        backend="postgres",
        regions=[{"name": "edge", "provider": "local", "path": str(files)}],
        pools=("acme",),
    )
    p.stack.start_worker("propagate", regions=("edge",))
    yield p, files
    teardown_pipeline(p)


def _state_gauge() -> dict[str, float]:
    metrics.flush(get_settings())
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics.CertqueueCollector())
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    return {s.labels["state"]: s.value for s in families["certqueue_certificates"].samples}


def _expiry_timestamps() -> dict[str, float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics.CertqueueCollector())
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    fam = families["certqueue_certificate_expiration_timestamp_seconds"]
    return {s.labels["certificate_id"]: s.value for s in fam.samples}


def test_renewing_past_not_after_shows_expired_and_the_renewal_goes_on(edge_pipeline) -> None:
    p, _files = edge_pipeline
    cid = p.request(["expires-while-renewing.example.test"])
    p.wait_state(cid, "ACTIVE", timeout=90)
    with session_scope(write=False) as s:
        first = s.get_one(Certificate, cid).current_issuance_id
    p.stack.stop("worker-propagate-edge")
    restarted = False
    try:
        p.send("certqueue.renew", {"v": 1, "certificate_id": cid, "force": True})
        # issued by Pebble, waiting for the stopped region: RENEWING with a pending issuance
        p.wait_for(
            lambda: p.count(Issuance, Issuance.certificate_id == cid) == 2,
            timeout=90,
            what="the renewal issued",
        )
        assert p.state(cid) == "RENEWING"
        past = utcnow() - dt.timedelta(minutes=5)
        with session_scope() as s:
            cert = s.get_one(Certificate, cid)
            assert cert.pending_issuance_id is not None and cert.pending_issuance_id != first
            s.get_one(Issuance, first).not_after = past
            cert.not_after = past
        result = lazy_app.get().send_task("certqueue.scan.expire", queue="scan").get(timeout=60)
        assert result["expired"] == 1 and result["renewing"] == 1, result
        assert p.state(cid) == "EXPIRED"
        with session_scope(write=False) as s:
            ev = s.execute(
                select(Event).where(
                    Event.certificate_id == cid, Event.kind == "transition", Event.to_state == "EXPIRED"
                )
            ).scalar_one()
            assert ev.from_state == "RENEWING" and ev.data == {"renewal_in_flight": True}
            assert s.get_one(Certificate, cid).work_deadline is not None  # the renewal is still at work
        assert _state_gauge().get("EXPIRED", 0) >= 1
        # what CertificateExpired reads: the served (dead) certificate's expiry is in the past
        assert _expiry_timestamps()[cid] < utcnow().timestamp()
        p.stack.start_worker("propagate", regions=("edge",))
        restarted = True
        p.wait_state(cid, "ACTIVE", timeout=90)
    finally:
        if not restarted:
            p.stack.start_worker("propagate", regions=("edge",))
    with session_scope(write=False) as s:
        cert = s.get_one(Certificate, cid)
        iss = s.get_one(Issuance, cert.current_issuance_id)
        assert iss.id != first and cert.pending_issuance_id is None and cert.work_deadline is None
        assert cert.not_after == iss.not_after and cert.renew_at is not None
        d = s.execute(select(Deployment).where(Deployment.certificate_id == cid)).scalar_one()
        assert d.fingerprint == iss.fingerprint
        last = s.execute(
            select(Event)
            .where(Event.certificate_id == cid, Event.kind == "transition")
            .order_by(Event.id.desc())
            .limit(1)
        ).scalar_one()
        assert (last.from_state, last.to_state) == ("EXPIRED", "ACTIVE")
    assert (Path(d.remote_ref or "") / "cert.pem").read_text().strip() == iss.cert_pem.strip()
    assert _expiry_timestamps()[cid] > utcnow().timestamp()
