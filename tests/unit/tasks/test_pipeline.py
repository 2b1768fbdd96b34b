"""The pipeline's shared decisions, as steps over a real database (SQLite and PostgreSQL): a
permanent failure (first issuance, renewal, fallback to the next CA), and parking (transient trouble
handed back to the database). No CA is needed: these run after the CA has answered, on what the
failure says. What is checked is what the certificate, its order, challenges and intents say
afterwards, and which follow-ups were asked for."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from certqueue import certificates, intents
from certqueue.certificates import CertificateRequest, create_certificate
from certqueue.config import Settings
from certqueue.db import session_scope
from certqueue.errors import PermanentError, RetryableError
from certqueue.models import Certificate, Challenge, Event, Http01Token, Intent, Order, State, utcnow
from certqueue.tasks import pipeline
from certqueue.tasks.base import StepContext
from tests.conftest_db import make_cert_pem

CA_A = "https://ca-a.example/dir"
CA_B = "https://ca-b.example/dir"
RETRY_DELAY = 300.0


@pytest.fixture
def settings(db_url: str, settings_factory: Callable[..., Settings], tmp_path: Path) -> Settings:
    return settings_factory(
        database_url=db_url,
        broker={"filesystem_path": str(tmp_path / "broker")},
        automation={"retry_delay_seconds": RETRY_DELAY, "retry_attempts": 3},
    )


def _step(fn: Callable[..., Any], *args: Any) -> tuple[Any, StepContext]:
    with session_scope() as s:
        ctx = StepContext(session=s, task=None)  # type: ignore[arg-type]
        return fn(ctx, *args), ctx


def _sent(ctx: StepContext) -> list[tuple[str, tuple[Any, ...]]]:
    return [(sig.task, tuple(sig.args)) for sig in ctx.follow_ups]


#: automation.retry_attempts (the default): a first issuance is retried this often before FAILED
RETRIES = 3


def _cert(name: str, state: State, *, fallbacks: tuple[str, ...] = (), attempts: int = 0) -> str:
    with session_scope() as s:
        cert, _ = create_certificate(
            s,
            CertificateRequest.build(
                domains=[name], directory_url=CA_A, fallback_directory_urls=list(fallbacks)
            ),
        )
        cert.state = state
        cert.attempts = attempts
        cert.work_deadline = utcnow() + dt.timedelta(minutes=10)
        return cert.id


def _order(cid: str, *types: str) -> tuple[int, list[int]]:
    with session_scope() as s:
        order = Order(certificate_id=cid, csr_pem="csr", key_enc=b"k", status="pending")
        s.add(order)
        s.flush()
        ids = []
        for i, t in enumerate(types):
            ch = Challenge(
                order_id=order.id,
                certificate_id=cid,
                identifier=f"n{i}.example.com",
                authz_url=f"https://ca/a{i}",
                type=t,
                url=f"https://ca/c{i}",
                token=f"tok{order.id}x{i}",
                status="ready",
            )
            s.add(ch)
            s.flush()
            ids.append(ch.id)
            if t == "http-01":
                s.add(
                    Http01Token(
                        token=ch.token,
                        key_authorization="ka",
                        certificate_id=cid,
                        challenge_id=ch.id,
                        expires_at=utcnow() + dt.timedelta(hours=1),
                    )
                )
        return order.id, ids


def _load(cid: str) -> Certificate:
    with session_scope(write=False) as s:
        c = s.get_one(Certificate, cid)
        s.expunge(c)
        return c


def _events(cid: str) -> list[tuple[str, str | None]]:
    with session_scope(write=False) as s:
        return [
            (e.kind, e.reason)
            for e in s.execute(select(Event).where(Event.certificate_id == cid).order_by(Event.id)).scalars()
        ]


def _intents(cid: str) -> list[tuple[str, str]]:
    with session_scope(write=False) as s:
        return [
            (i.kind, i.status)
            for i in s.execute(
                select(Intent).where(Intent.certificate_id == cid).order_by(Intent.id)
            ).scalars()
        ]


# --- a permanent failure ------------------------------------------------------------------------------


def test_a_first_issuance_that_fails_for_good_is_failed_with_its_order_and_intents_closed(
    settings: Settings,
) -> None:
    cid = _cert("first.example.com", State.ISSUING, attempts=RETRIES)  # its retries used up
    order_id, (http, dns) = _order(cid, "http-01", "dns-01")
    with session_scope() as s:
        intents.record(s, "issue", cid, actor="api")
    out, ctx = _step(
        pipeline.fail_certificate, cid, PermanentError("rejected", reason="acme:rejectedIdentifier")
    )
    assert out == {"certificate_id": cid, "status": "failed", "reason": "acme:rejectedIdentifier"}
    c = _load(cid)
    assert (c.state, c.last_error, c.work_deadline) == (State.FAILED, "acme:rejectedIdentifier", None)
    with session_scope(write=False) as s:
        order = s.get_one(Order, order_id)
        assert (order.status, order.error) == ("invalid", "acme:rejectedIdentifier")
        assert order.finished_at is not None
        assert s.get_one(Challenge, http).status == "cleaned"
        assert s.execute(select(Http01Token)).first() is None  # the token is no longer served
        assert s.get_one(Challenge, dns).status == "ready"  # removed by the dns pool:
    assert _sent(ctx) == [("certqueue.dns.cleanup_all", (cid, [dns]))]
    assert ("validation_error", "acme:rejectedIdentifier") in _events(cid)
    assert ("issuance", "failure") in _events(cid)
    assert _intents(cid) == [("issue", "failed")]
    assert ctx.nudge  # capacity freed


def test_a_first_issuance_with_retries_left_waits_in_the_database_and_stays_issuing(
    settings: Settings,
) -> None:
    cid = _cert("retry.example.com", State.ISSUING)
    before = utcnow()
    out, ctx = _step(pipeline.fail_certificate, cid, PermanentError("bad csr", reason="acme:badCSR"))
    assert out["status"] == "failed"
    c = _load(cid)
    assert (c.state, c.attempts) == (State.ISSUING, 1)
    assert c.next_attempt_at is not None and c.next_attempt_at > before
    with session_scope(write=False) as s:
        (i,) = s.execute(select(Intent).where(Intent.certificate_id == cid)).scalars()
        assert (i.kind, i.status) == ("issue", "pending")
        assert i.not_before == c.next_attempt_at  # dispatch sends it when the retry is due
    assert ctx.wake_after is not None


def test_a_failed_renewal_keeps_the_certificate_active_and_schedules_the_next_attempt(
    settings: Settings,
) -> None:
    """The old certificate keeps serving; ``renew_at`` must be set again, or it is never retried."""
    cid = _cert("renew.example.com", State.RENEWING)
    with session_scope() as s:  # the renewal's issuance, stored but not yet propagated
        cert = s.get_one(Certificate, cid)
        leaf, key = make_cert_pem(("renew.example.com",))
        cert.pending_issuance_id = certificates.store_issuance(s, cert, leaf, key).id
    before = utcnow()
    out, _ = _step(pipeline.fail_certificate, cid, PermanentError("bad csr", reason="acme:badCSR"))
    assert out["status"] == "failed"
    c = _load(cid)
    assert c.state == State.ACTIVE
    assert c.attempts == 1
    assert c.renew_at is not None
    # the first retry after retry_delay_seconds (jitter aside), and next_attempt_at says the same
    assert before + dt.timedelta(seconds=RETRY_DELAY * 0.7) <= c.renew_at
    assert c.renew_at <= utcnow() + dt.timedelta(seconds=RETRY_DELAY * 1.3)
    assert c.next_attempt_at == c.renew_at
    assert c.pending_issuance_id is None
    assert ("renewal", "failure") in _events(cid)


def test_each_failed_renewal_waits_longer(settings: Settings) -> None:
    cid = _cert("again.example.com", State.RENEWING)
    with session_scope() as s:
        s.get_one(Certificate, cid).attempts = 3
    before = utcnow()
    _step(pipeline.fail_certificate, cid, PermanentError("bad csr", reason="acme:badCSR"))
    c = _load(cid)
    assert c.attempts == 4
    assert c.renew_at is not None
    assert c.renew_at - before > dt.timedelta(seconds=RETRY_DELAY * 4)  # 300 * 2^3, give or take 20 %


def test_a_failure_before_the_first_commit_still_fails_the_issuance(settings: Settings) -> None:
    cid = _cert("early.example.com", State.REQUESTED, attempts=RETRIES)
    _step(pipeline.fail_certificate, cid, PermanentError("no account", reason="acme:malformed"))
    assert _load(cid).state == State.FAILED


@pytest.mark.parametrize("state", [State.ISSUING, State.RENEWING])
def test_a_failure_this_ca_alone_may_cause_starts_again_at_the_next_ca(
    settings: Settings, state: State
) -> None:
    cid = _cert("fallback.example.com", state, fallbacks=(CA_B,))
    order_id, _ = _order(cid, "http-01")
    out, ctx = _step(pipeline.fail_certificate, cid, PermanentError("CAA", reason="acme:caa"))
    assert out == {"certificate_id": cid, "status": "fallback", "reason": "acme:caa", "ca": CA_B}
    c = _load(cid)
    assert (c.state, c.directory_url, c.last_error) == (state, CA_B, "acme:caa")
    purpose = "renew" if state == State.RENEWING else "issue"
    assert _sent(ctx) == [("certqueue.acme.start", ({"certificate_id": cid, "purpose": purpose},))]
    assert ("ca_fallback", "acme:caa") in _events(cid)
    with session_scope(write=False) as s:
        assert s.get_one(Order, order_id).status == "invalid"  # the first CA's order is given up


def test_a_failure_that_would_fail_anywhere_does_not_fall_back(settings: Settings) -> None:
    cid = _cert("nofallback.example.com", State.ISSUING, fallbacks=(CA_B,), attempts=RETRIES)
    out, ctx = _step(pipeline.fail_certificate, cid, PermanentError("bad csr", reason="acme:badCSR"))
    assert out["status"] == "failed"
    c = _load(cid)
    assert (c.state, c.directory_url) == (State.FAILED, CA_A)
    assert _sent(ctx) == []


def test_the_last_ca_failing_fails_the_certificate(settings: Settings) -> None:
    cid = _cert("lastca.example.com", State.ISSUING, fallbacks=(CA_B,), attempts=RETRIES)
    with session_scope() as s:
        s.get_one(Certificate, cid).directory_url = CA_B
    out, _ = _step(pipeline.fail_certificate, cid, PermanentError("CAA", reason="acme:caa"))
    assert out["status"] == "failed"
    assert _load(cid).state == State.FAILED


def test_failing_an_unknown_certificate_writes_nothing(settings: Settings) -> None:
    out, ctx = _step(
        pipeline.fail_certificate, "cert_zzzzzzzzzzzzzzzzzzzz", PermanentError("x", reason="acme:caa")
    )
    assert out == {"status": "failed", "reason": "acme:caa"}
    assert ctx.follow_ups == []


# --- parking ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [State.REQUESTED, State.ISSUING, State.RENEWING, State.ISSUED])
def test_parking_hands_the_work_back_to_the_database_for_the_delay(settings: Settings, state: State) -> None:
    cid = _cert("parked.example.com", state)
    with session_scope() as s:
        intent = intents.record(s, "issue", cid, actor="api")
        intent.status = "dispatched"
        intent.deadline = utcnow() + dt.timedelta(minutes=5)
    before = utcnow()
    out, ctx = _step(
        pipeline.park_certificate, cid, RetryableError("CA down", reason="acme:connection"), 120.0
    )
    assert out == {"certificate_id": cid, "status": "backing_off", "reason": "acme:connection"}
    c = _load(cid)
    assert c.state == state  # nothing fails
    assert c.last_error == "acme:connection"
    assert c.work_deadline is not None
    assert before + dt.timedelta(seconds=119) <= c.work_deadline <= utcnow() + dt.timedelta(seconds=121)
    with session_scope(write=False) as s:
        (i,) = s.execute(select(Intent).where(Intent.certificate_id == cid)).scalars()
        # back to pending, not before the resume time: dispatch sends it again then
        assert (i.status, i.deadline) == ("pending", None)
        assert i.not_before == c.work_deadline
    assert ctx.wake_after == pytest.approx(120.2)
    assert ("backoff", "acme:connection") in _events(cid)


@pytest.mark.parametrize("state", [State.ACTIVE, State.FAILED, State.REVOKED])
def test_parking_a_settled_certificate_does_nothing(settings: Settings, state: State) -> None:
    cid = _cert("settled.example.com", state)
    out, ctx = _step(pipeline.park_certificate, cid, RetryableError("x", reason="acme:connection"), 60.0)
    assert out["status"] == "noop"
    assert all(kind != "backoff" for kind, _ in _events(cid))
    assert _load(cid).last_error is None
    assert ctx.wake_after is None


def test_parks_so_far_counts_the_last_day_s_parkings(settings: Settings) -> None:
    cid = _cert("count.example.com", State.ISSUING)
    for _ in range(3):
        _step(pipeline.park_certificate, cid, RetryableError("x", reason="acme:connection"), 1.0)
    with session_scope() as s:
        old = (
            s.execute(select(Event).where(Event.certificate_id == cid, Event.kind == "backoff"))
            .scalars()
            .first()
        )
        assert old is not None
        old.at = utcnow() - dt.timedelta(days=2)  # older than a day: not consecutive any more
    with session_scope(write=False) as s:
        assert pipeline.parks_so_far(s, cid) == 2
