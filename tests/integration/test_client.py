"""``certqueue.client.CertqueueClient``, as another service uses it: only celery and the broker URL
(Redis), against real workers, Pebble and PostgreSQL. Payloads are versioned; a bad one is a failed
job that wrote nothing."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery.exceptions import TimeoutError as CeleryTimeout
from sqlalchemy import select

from certqueue.client import CertqueueClient
from certqueue.db import session_scope
from certqueue.models import Certificate, Deployment, Issuance
from devstack.pebble import PebbleServer
from tests.conftest_stack import Pipeline, build_pipeline, services_available, teardown_pipeline

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    why = services_available()
    if why:
        if os.environ.get("CERTQUEUE_REQUIRE_SERVICES"):
            pytest.fail(why)
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("client")
    extra: dict[str, str] = {}

    def name_the_ca(peb: PebbleServer) -> tuple[str, str]:
        # the one CA a payload may choose, by name (acme.authorities), once Pebble's URL is known
        extra["CERTQUEUE_ACME__AUTHORITIES"] = json.dumps({"pebble": peb.directory_url})
        return peb.directory_url, str(peb.ca_bundle)

    p = build_pipeline(
        tmp,
        backend="postgres",
        pools=("acme",),
        regions=[{"name": "edge", "provider": "local", "path": str(tmp / "edge")}],
        extra_env=extra,
        acme_front=name_the_ca,
    )
    try:
        p.stack.start_worker("propagate", regions=("edge",))
    except BaseException:
        teardown_pipeline(p)
        raise
    yield p
    teardown_pipeline(p)


@pytest.fixture(scope="module")
def client(pipeline: Pipeline) -> CertqueueClient:
    # what another service has: the broker URL, nothing else of certqueue's settings
    return CertqueueClient(pipeline.env["CERTQUEUE_BROKER__URL"])


def issuances(cid: str) -> int:
    with session_scope(write=False) as s:
        return len(list(s.execute(select(Issuance.id).where(Issuance.certificate_id == cid)).scalars()))


def test_issue_with_a_request_payload_and_wait(pipeline: Pipeline, client: CertqueueClient) -> None:
    job = client.issue(["client.example.test", "www.client.example.test"], email="ops@example.test")
    assert job.task == "certqueue.issue" and job.certificate_id and job.task_id
    # the row exists once the issue task ran: a status asked earlier may find nothing yet
    assert client.job(job.task_id, timeout=30)["certificate_id"] == job.certificate_id
    status = client.wait(job.certificate_id, timeout=90)
    assert status["state"] == "ACTIVE", status
    assert status["domains"] == ["client.example.test", "www.client.example.test"]
    assert status["serial"] and status["not_after"] and status["last_error"] is None
    with session_scope(write=False) as s:
        row = s.get(Certificate, job.certificate_id)
        assert row is not None and row.email == "ops@example.test"
    # the status task answers for any id a worker knows
    assert client.status(job.certificate_id)["state"] == "ACTIVE"


def test_renew_revoke_and_propagate(pipeline: Pipeline, client: CertqueueClient) -> None:
    issued = client.issue(["lifecycle.client.example.test"])
    cid = issued.certificate_id
    assert cid is not None
    client.job(issued.task_id, timeout=30)
    first = client.wait(cid, timeout=90)
    assert first["state"] == "ACTIVE"

    not_due = client.renew(cid)
    assert client.job(not_due.task_id, timeout=30)["status"] == "not_due"
    client.renew(cid, force=True)
    pipeline.wait_for(
        lambda: issuances(cid) == 2 and client.status(cid)["state"] == "ACTIVE", timeout=90, what="renewal"
    )
    assert client.status(cid)["serial"] != first["serial"]

    with session_scope(write=False) as s:
        deployed_before = s.execute(
            select(Deployment.deployed_at).where(
                Deployment.certificate_id == cid, Deployment.region == "edge"
            )
        ).scalar_one()
    job = client.propagate(cid, regions=["edge"])
    assert client.job(job.task_id, timeout=30) is not None
    pipeline.wait_for(
        lambda: _deployment_fingerprint(cid) == _current_fingerprint(cid), timeout=60, what="propagation"
    )
    assert deployed_before is not None and Path(_edge_dir(cid), "fullchain.pem").exists()

    revoked = client.revoke(cid, reason="superseded")
    # the public task returns once the request is durable; dispatch revokes at the CA
    assert client.job(revoked.task_id, timeout=60)["status"] == "accepted"
    pipeline.wait_state(cid, "REVOKED", timeout=60)
    serial = client.status(cid)["serial"]
    assert pipeline.pebble.cert_status(serial)["Status"].lower() == "revoked"


def _current_fingerprint(cid: str) -> str:
    with session_scope(write=False) as s:
        row = s.get(Certificate, cid)
        assert row is not None and row.current_issuance_id is not None
        iss = s.get(Issuance, row.current_issuance_id)
        assert iss is not None
        return iss.fingerprint


def _deployment_fingerprint(cid: str) -> str | None:
    with session_scope(write=False) as s:
        return s.execute(
            select(Deployment.fingerprint).where(
                Deployment.certificate_id == cid, Deployment.region == "edge"
            )
        ).scalar_one_or_none()


def _edge_dir(cid: str) -> str:
    with session_scope(write=False) as s:
        ref = s.execute(
            select(Deployment.remote_ref).where(Deployment.certificate_id == cid, Deployment.region == "edge")
        ).scalar_one()
        assert ref is not None
        return str(ref)


@pytest.mark.parametrize(
    ("task", "payload", "message"),
    [
        ("certqueue.issue", {"v": 1, "request": {"domains": ["bad..name.example.test"]}}, "bad..name"),
        ("certqueue.issue", {"v": 2, "request": {"domains": ["v2.example.test"]}}, "payload version"),
        ("certqueue.issue", {"v": 1, "request": {"domains": ["x.example.test"], "colour": "red"}}, "colour"),
        ("certqueue.issue", {"v": 1, "surprise": True}, "surprise"),
        # issue 13, finding 5: whoever can publish may not point a worker at a server of their own
        (
            "certqueue.issue",
            {
                "v": 1,
                "request": {
                    "domains": ["ssrf.example.test"],
                    "directory_url": "http://169.254.169.254/latest/meta-data/",
                },
            },
            "directory_url is not accepted from the broker",
        ),
        (
            "certqueue.issue",
            {
                "v": 1,
                "request": {
                    "domains": ["ssrf2.example.test"],
                    "fallback_directory_urls": ["https://evil.example/dir"],
                },
            },
            "fallback_directory_urls is not accepted",
        ),
        (
            "certqueue.issue",
            {"v": 1, "request": {"domains": ["ssrf3.example.test"], "profile": "http://10.0.0.1/"}},
            "URLs are not accepted",
        ),
        (
            "certqueue.issue",
            {"v": 1, "request": {"domains": ["ssrf4.example.test"], "ca": "evil"}},
            "unknown CA",
        ),
        ("certqueue.renew", {"v": 1, "certificate_id": "not-an-id"}, "not a certificate id"),
        ("certqueue.revoke", {"v": 1, "certificate_id": "cert_" + "z" * 20}, "no certificate"),
        (
            "certqueue.propagate",
            {"v": 1, "certificate_id": "cert_" + "z" * 20, "regions": ["mars"]},
            "no certificate",
        ),
    ],
)
def test_bad_payloads_fail_the_job_and_write_nothing(
    pipeline: Pipeline, client: CertqueueClient, task: str, payload: dict, message: str
) -> None:
    before = pipeline.count(Certificate)
    res = client.app.send_task(task, args=[payload], queue="acme")
    with pytest.raises(Exception, match=message) as info:
        res.get(timeout=30)
    assert not isinstance(info.value, CeleryTimeout)
    assert res.state == "FAILURE"
    assert pipeline.count(Certificate) == before


def test_the_client_validates_before_sending(client: CertqueueClient) -> None:
    from certqueue.errors import InvalidInput

    with pytest.raises(InvalidInput):
        client.issue(["-bad-.example.test"])
    with pytest.raises(InvalidInput, match="directory_url is not accepted"):
        client.issue(["ok.example.test"], directory_url="https://acme.example/dir")


def test_a_ca_is_chosen_by_name(pipeline: Pipeline, client: CertqueueClient) -> None:
    job = client.issue(["named-ca.client.example.test"], ca="pebble")
    assert client.wait(str(job.certificate_id), timeout=90)["state"] == "ACTIVE"
    with session_scope(write=False) as s:
        row = s.get(Certificate, job.certificate_id)
        assert row is not None and row.directory_url == pipeline.pebble.directory_url


def test_a_revoke_message_without_a_recorded_request_revokes_nothing(
    pipeline: Pipeline, client: CertqueueClient
) -> None:
    """Whoever can publish to the broker cannot revoke: the revoke step acts only on an open revoke
    intent (one the API, the CLI, the guide API or a public task recorded)."""
    issued = client.issue(["norevoke.client.example.test"])
    cid = issued.certificate_id
    assert cid is not None
    assert client.wait(cid, timeout=90)["state"] == "ACTIVE"
    for payload in (
        {"certificate_id": cid, "reason": "keyCompromise"},
        {"certificate_id": cid, "reason": "keyCompromise", "intent": 1},  # someone else's intent
        {"certificate_id": cid, "reason": "keyCompromise", "intent": True},
    ):
        res = client.app.send_task("certqueue.acme.revoke", args=[payload], queue="acme")
        assert res.get(timeout=30)["status"] == "refused"
    assert client.status(cid)["state"] == "ACTIVE"
    serial = client.status(cid)["serial"]
    assert pipeline.pebble.cert_status(serial)["Status"].lower() == "valid"
