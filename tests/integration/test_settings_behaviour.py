"""Settings the landed code validated and never read (issue 14, item 4), on the real stack:

* ``automation.retry_attempts`` / ``retry_delay_seconds``: a first issuance the CA refuses is
  ordered again that many times after the delay, then FAILED; one whose cause is fixed in between
  becomes ACTIVE.
* ``multi_region.propagation_strategy: async``: a new certificate is ACTIVE at issue; its region
  is deployed to afterwards (here: once the region's worker runs).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from certqueue.db import session_scope
from certqueue.models import Certificate, Deployment, Event, Issuance
from tests.conftest_stack import Pipeline, build_pipeline, services_available, teardown_pipeline

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pipeline, Path]]:
    why = services_available()
    if why:
        if os.environ.get("CERTQUEUE_REQUIRE_SERVICES"):
            pytest.fail(why)
        pytest.skip(why)
    files = tmp_path_factory.mktemp("edge-files")
    p = build_pipeline(
        tmp_path_factory.mktemp("settings"),
        backend="postgres",
        regions=[{"name": "edge", "provider": "local", "path": str(files)}],
        pools=("acme",),
        extra_env={
            "CERTQUEUE_AUTOMATION__RETRY_ATTEMPTS": "1",
            "CERTQUEUE_AUTOMATION__RETRY_DELAY_SECONDS": "4",
            "CERTQUEUE_MULTI_REGION__PROPAGATION_STRATEGY": "async",
        },
    )
    yield p, files
    teardown_pipeline(p)


def _failures(cid: str) -> int:
    with session_scope(write=False) as s:
        return len(
            s.execute(
                select(Event).where(
                    Event.certificate_id == cid, Event.kind == "issuance", Event.reason == "failure"
                )
            )
            .scalars()
            .all()
        )


def test_a_refused_issuance_is_retried_retry_attempts_times_then_failed(stack) -> None:
    p, _files = stack
    p.stack.start_worker("propagate", regions=("edge",))
    try:
        # the CA resolves these names to an address where nothing listens: validation fails
        for host in ("stays-broken.example.test", "fixed-later.example.test"):
            p.dns._post("/add-a", {"host": host, "addresses": ["127.0.0.3"]})
        broken = p.request(["stays-broken.example.test"])
        fixed = p.request(["fixed-later.example.test"])
        p.wait_for(lambda: _failures(fixed) == 1, timeout=90, what="the first refusal")
        # the first refusal is not final: still ISSUING, waiting for its retry, and says so
        with session_scope(write=False) as s:
            c = s.get_one(Certificate, fixed)
            assert c.state == "ISSUING" and c.waiting_reason and c.waiting_reason.startswith("retry 1 of 1")
        p.dns._post("/clear-a", {"host": "fixed-later.example.test"})
        p.dns._post("/add-a", {"host": "fixed-later.example.test", "addresses": ["127.0.0.1"]})
        p.wait_state(broken, "FAILED", timeout=90)
        with session_scope(write=False) as s:
            why = s.get_one(Certificate, fixed).last_error
        assert p.wait_state(fixed, {"ACTIVE", "FAILED"}, timeout=90) == "ACTIVE", why
        assert [o.status for o in p.orders(broken)] == ["invalid", "invalid"]  # 1 + retry_attempts
        assert _failures(broken) == 2
        assert [o.status for o in p.orders(fixed)] == ["invalid", "valid"]
    finally:
        p.stack.stop("worker-propagate-edge")


def test_async_propagation_is_active_at_issue_and_deploys_afterwards(stack) -> None:
    p, _files = stack
    # the region's worker is not running: with sync the certificate would stay ISSUED
    cid = p.request(["async.example.test"])
    p.wait_state(cid, "ACTIVE", timeout=90)
    with session_scope(write=False) as s:
        c = s.get_one(Certificate, cid)
        assert c.pending_issuance_id is None and c.renew_at is not None
    p.wait_for(
        lambda: p.count(Deployment, Deployment.certificate_id == cid, Deployment.status == "pending") == 1,
        timeout=60,
        what="the deploy waiting for its region",
    )
    assert p.state(cid) == "ACTIVE"
    p.stack.start_worker("propagate", regions=("edge",))
    try:
        p.wait_for(
            lambda: (
                p.count(Deployment, Deployment.certificate_id == cid, Deployment.status == "deployed") == 1
            ),
            timeout=90,
            what="the deploy after activation",
        )
    finally:
        p.stack.stop("worker-propagate-edge")
    with session_scope(write=False) as s:
        c = s.get_one(Certificate, cid)
        iss = s.get_one(Issuance, c.current_issuance_id)
        d = s.execute(select(Deployment).where(Deployment.certificate_id == cid)).scalar_one()
        assert d.fingerprint == iss.fingerprint and c.state == "ACTIVE"
    assert (Path(d.remote_ref or "") / "cert.pem").read_text().strip() == iss.cert_pem.strip()
