"""A certificate waiting for a rate-limit budget says so wherever it is shown: ``certqueue list``,
``status`` and ``show``, the REST API and the guide's API, with the budget and when work resumes;
and it resumes by itself when the budget returns (no message held, no retry spinning)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from certqueue import tokens
from certqueue.api.app import create_app
from certqueue.db import session_scope
from certqueue.manager import CertificateManager
from certqueue.models import Certificate, Event
from tests.conftest_stack import Pipeline, build_pipeline, services_available, teardown_pipeline

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture
def limited(tmp_path) -> Iterator[Pipeline]:
    why = services_available()
    if why:
        if os.environ.get("CERTQUEUE_REQUIRE_SERVICES"):
            pytest.fail(why)
        pytest.skip(why)
    # one certificate per registered domain per ~43 s: the second waits for the budget (long enough
    # for the checks below to see it waiting), the third for the one after
    env = {
        # Pebble is no Let's Encrypt: its budgets apply only when the rules are forced on for it
        "CERTQUEUE_RATE_LIMITS__CA_RULES": '["*=custom"]',
        "CERTQUEUE_RATE_LIMITS__CERTIFICATES_PER_REGISTERED_DOMAIN": "1",
        "CERTQUEUE_RATE_LIMITS__CERTIFICATES_PER_REGISTERED_DOMAIN_PERIOD_DAYS": "0.0005",
    }
    p = build_pipeline(tmp_path, backend="postgres", extra_env=env, pools=("acme",))
    yield p
    teardown_pipeline(p)


def test_a_deferred_certificate_shows_why_and_when_then_resumes(
    limited: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # the table on one line per row
    first = limited.request(["a.waiting.example.test"])
    limited.wait_state(first, "ACTIVE", timeout=90)
    second = limited.request(["b.waiting.example.test"])
    limited.wait_for(
        lambda: limited.count(Event, Event.certificate_id == second, Event.kind == "deferred") >= 1,
        timeout=30,
        what="the deferral",
    )
    with session_scope(write=False) as s:
        row = s.get_one(Certificate, second)
        until = row.next_attempt_at
        assert row.waiting_reason == "rate limit: certificates per domain example.test", row.waiting_reason
        assert until is not None
    resumes = until.isoformat()[:16]

    listed = json.loads(limited.stack.cli("list", "--json").stdout)
    waiting = {r["id"]: r["waiting"] for r in listed}
    assert waiting[first] is None
    assert waiting[second]["reason"].endswith("certificates per domain example.test")
    assert waiting[second]["until"].startswith(resumes)
    table = limited.stack.cli("list").stdout
    assert "certificates per domain example.test" in table and "resumes" in table
    status = json.loads(limited.stack.cli("status", "--json").stdout)
    assert [w["id"] for w in status["waiting"]] == [second]
    shown = json.loads(limited.stack.cli("show", second, "--json").stdout)
    assert shown["waiting"]["until"].startswith(resumes)

    with session_scope() as s:
        _tid, token = tokens.create_token(s, "reader", ["read"])
    with TestClient(create_app()) as api:
        body = api.get(f"/v1/certificates/{second}", headers={"Authorization": f"Bearer {token}"}).json()
    assert body["waiting"]["reason"].endswith("example.test") and body["waiting"]["until"].startswith(resumes)

    cert = asyncio.run(CertificateManager().get_certificate(second))
    assert cert.waiting_reason and cert.waiting_until is not None
    assert _deferred_gauge() == {"rate_limited": 1.0, "ca_rate_limited": 0.0, "capacity": 0.0, "other": 0.0}

    # `issue --wait` says so when it meets the deferral; --exit-on-defer stops there with code 5
    third = limited.stack.cli(
        "issue", "c.waiting.example.test", "--wait", "--exit-on-defer", "--timeout", "60", check=False
    )
    assert third.returncode == 5, (third.returncode, third.stdout, third.stderr)
    assert "waiting: rate limit: certificates per domain example.test, resumes" in third.stderr
    assert "deferred (rate limit: certificates per domain example.test" in third.stdout
    third_id = third.stdout.split()[0]

    # the budget returns: it resumes by itself, and the waiting note goes
    limited.wait_state(second, "ACTIVE", timeout=120)
    with session_scope(write=False) as s:
        assert s.get_one(Certificate, second).waiting_reason is None
    limited.wait_state(third_id, "ACTIVE", timeout=180)
    assert _deferred_gauge()["rate_limited"] == 0.0


def _deferred_gauge() -> dict[str, float]:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from certqueue.metrics import CertqueueCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(CertqueueCollector())
    text = generate_latest(registry).decode()
    (fam,) = [f for f in text_string_to_metric_families(text) if f.name == "certqueue_certificates_deferred"]
    return {s.labels["reason"]: s.value for s in fam.samples}
