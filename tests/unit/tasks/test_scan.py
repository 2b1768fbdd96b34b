"""The scan queue's steps on a real database (SQLite and PostgreSQL): expiry and every branch of the
reconciler. Each step runs in one transaction as a worker runs it (``StepContext`` over a session);
the test reads what the step left in the database and which follow-up tasks it asked for (by task
name and payload: what the broker would carry), never the step's internals."""

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
from certqueue.models import Certificate, Challenge, Http01Token, Intent, Order, State, utcnow
from certqueue.tasks import scan
from certqueue.tasks.base import StepContext
from tests.conftest_db import make_cert_pem

STUCK = 900.0  # automation.stuck_after_seconds in these settings


@pytest.fixture
def settings(db_url: str, settings_factory: Callable[..., Settings], tmp_path: Path) -> Settings:
    return settings_factory(
        database_url=db_url,
        broker={"filesystem_path": str(tmp_path / "broker")},
        automation={"stuck_after_seconds": STUCK},
    )


def _step(step: Callable[..., dict[str, Any]]) -> tuple[dict[str, Any], StepContext]:
    with session_scope() as s:
        ctx = StepContext(session=s, task=None)  # type: ignore[arg-type]  # the steps never use it
        out = step(ctx)
    return out, ctx


def _sent(ctx: StepContext) -> list[tuple[str, tuple[Any, ...]]]:
    return [(sig.task, tuple(sig.args)) for sig in ctx.follow_ups]


def _cert(name: str, state: State, *, deadline_ago: float | None = None, **fields: Any) -> str:
    with session_scope() as s:
        cert, created = create_certificate(
            s, CertificateRequest.build(domains=[name], directory_url="https://ca.example/dir")
        )
        assert created
        cert.state = state
        cert.work_deadline = None if deadline_ago is None else utcnow() - dt.timedelta(seconds=deadline_ago)
        for k, v in fields.items():
            setattr(cert, k, v)
        return cert.id


def _issue(cid: str, *, days_left: float, pending: bool = False) -> int:
    """Store an issuance of ``cid`` that ends in ``days_left`` days (negative: already ended)."""
    with session_scope() as s:
        cert = s.get_one(Certificate, cid)
        leaf, key = make_cert_pem(
            tuple(cert.domains), days=90, not_before=utcnow() - dt.timedelta(days=90 - days_left)
        )
        iss = certificates.store_issuance(s, cert, leaf, key)
        if pending:
            cert.pending_issuance_id = iss.id
        else:
            cert.current_issuance_id = iss.id
        return iss.id


def _state(cid: str) -> Certificate:
    with session_scope(write=False) as s:
        cert = s.get_one(Certificate, cid)
        s.expunge(cert)
        return cert


def _open_intents(cid: str) -> list[str]:
    with session_scope(write=False) as s:
        return list(
            s.execute(
                select(Intent.kind).where(Intent.certificate_id == cid, Intent.status.in_(intents.OPEN))
            ).scalars()
        )


# --- expire ------------------------------------------------------------------------------------------


def test_expire_moves_an_active_certificate_past_not_after_to_expired(settings: Settings) -> None:
    gone = _cert("gone.example.com", State.ACTIVE, renew_at=utcnow() - dt.timedelta(days=1))
    _issue(gone, days_left=-1)
    fine = _cert("fine.example.com", State.ACTIVE, renew_at=utcnow() + dt.timedelta(days=30))
    _issue(fine, days_left=60)
    out, _ = _step(scan._expire_step)
    assert out == {"expired": 1, "renewing": 0}
    assert _state(gone).state == State.EXPIRED
    assert _state(gone).work_deadline is None  # nothing works on it any more
    assert _state(gone).renew_at is None  # never renewed from EXPIRED by the due scan
    assert _state(fine).state == State.ACTIVE
    assert _state(fine).renew_at is not None


def test_expire_shows_an_expired_renewing_certificate_expired_and_its_renewal_goes_on(
    settings: Settings,
) -> None:
    renewing = _cert("renewing.example.com", State.RENEWING, deadline_ago=-600)
    _issue(renewing, days_left=-1)
    out, _ = _step(scan._expire_step)
    assert out == {"expired": 1, "renewing": 1}
    assert _state(renewing).state == State.EXPIRED
    assert _state(renewing).work_deadline is not None  # the renewal in flight keeps its deadline


@pytest.mark.parametrize("state", [State.ISSUING, State.FAILED, State.REVOKED])
def test_expire_leaves_certificates_that_serve_nothing_valid_anyway(settings: Settings, state: State) -> None:
    cid = _cert("other.example.com", state)
    _issue(cid, days_left=-1)
    out, _ = _step(scan._expire_step)
    assert out == {"expired": 0, "renewing": 0}
    assert _state(cid).state == state


def test_expire_is_idempotent(settings: Settings) -> None:
    gone = _cert("twice.example.com", State.ACTIVE)
    _issue(gone, days_left=-1)
    assert _step(scan._expire_step)[0] == {"expired": 1, "renewing": 0}
    assert _step(scan._expire_step)[0] == {"expired": 0, "renewing": 0}


# --- reconcile: work past its deadline -----------------------------------------------------------------


def test_reconcile_resends_propagation_of_an_issued_certificate(settings: Settings) -> None:
    cid = _cert("issued.example.com", State.ISSUED, deadline_ago=60)
    out, ctx = _step(scan._reconcile_step)
    assert out["resumed"] == 1
    assert _sent(ctx) == [("certqueue.propagate.start", ({"certificate_id": cid},))]
    assert ctx.nudge


def test_reconcile_sends_a_renewal_with_a_pending_issuance_to_propagation_not_to_a_new_order(
    settings: Settings,
) -> None:
    """The renewal's certificate exists already (pending_issuance_id): a second order would be a
    wasted issuance against the CA's rate limits."""
    cid = _cert("renewed.example.com", State.RENEWING, deadline_ago=60)
    _issue(cid, days_left=10)
    _issue(cid, days_left=90, pending=True)
    _, ctx = _step(scan._reconcile_step)
    assert _sent(ctx) == [("certqueue.propagate.start", ({"certificate_id": cid},))]


def test_reconcile_restarts_the_order_of_a_renewal_without_a_pending_issuance(settings: Settings) -> None:
    cid = _cert("renewing.example.com", State.RENEWING, deadline_ago=60)
    _, ctx = _step(scan._reconcile_step)
    assert _sent(ctx) == [("certqueue.acme.start", ({"certificate_id": cid, "purpose": "renew"},))]


def test_reconcile_restarts_the_order_of_an_issuing_certificate(settings: Settings) -> None:
    cid = _cert("issuing.example.com", State.ISSUING, deadline_ago=60)
    _, ctx = _step(scan._reconcile_step)
    assert _sent(ctx) == [("certqueue.acme.start", ({"certificate_id": cid, "purpose": "issue"},))]


def test_reconcile_records_an_issue_intent_for_a_stuck_requested_certificate(settings: Settings) -> None:
    """REQUESTED work goes through dispatch (capacity), not straight to the CA."""
    cid = _cert("requested.example.com", State.REQUESTED, deadline_ago=60)
    out, ctx = _step(scan._reconcile_step)
    assert out["resumed"] == 1
    assert _sent(ctx) == []
    assert _open_intents(cid) == ["issue"]
    assert ctx.nudge


def test_reconcile_pushes_the_deadline_of_what_it_resumed(settings: Settings) -> None:
    """Resumed once per stuck period, not at every reconciler run."""
    cid = _cert("pushed.example.com", State.ISSUING, deadline_ago=60)
    before = utcnow()
    _step(scan._reconcile_step)
    deadline = _state(cid).work_deadline
    assert deadline is not None
    assert deadline >= before + dt.timedelta(seconds=STUCK - 5)
    _, again = _step(scan._reconcile_step)
    assert _sent(again) == []


@pytest.mark.parametrize(
    ("state", "deadline_ago"),
    [
        (State.ISSUING, -60),  # deadline still ahead: the work is running
        (State.ISSUING, None),  # no work outstanding
        (State.ACTIVE, 60),  # a settled state is never resumed, whatever its deadline says
        (State.FAILED, 60),
    ],
)
def test_reconcile_leaves_work_that_is_not_stuck(
    settings: Settings, state: State, deadline_ago: float | None
) -> None:
    cid = _cert("calm.example.com", state, deadline_ago=deadline_ago)
    out, ctx = _step(scan._reconcile_step)
    assert out["resumed"] == 0
    assert _sent(ctx) == []
    assert not ctx.nudge
    assert _open_intents(cid) == []


# --- reconcile: REQUESTED rows without an intent ---------------------------------------------------------


def _age(cid: str, seconds: float) -> None:
    with session_scope() as s:
        s.get_one(Certificate, cid).created_at = utcnow() - dt.timedelta(seconds=seconds)


def test_reconcile_gives_an_old_requested_certificate_without_intent_one(settings: Settings) -> None:
    cid = _cert("orphan.example.com", State.REQUESTED)
    _age(cid, STUCK + 60)
    out, ctx = _step(scan._reconcile_step)
    assert out["resumed"] == 1
    assert _open_intents(cid) == ["issue"]
    assert ctx.nudge


def test_reconcile_leaves_a_young_or_intended_requested_certificate(settings: Settings) -> None:
    young = _cert("young.example.com", State.REQUESTED)
    _age(young, STUCK - 60)
    intended = _cert("intended.example.com", State.REQUESTED)
    _age(intended, STUCK + 60)
    with session_scope() as s:
        intents.record(s, "issue", intended, actor="api")
    out, _ = _step(scan._reconcile_step)
    assert out["resumed"] == 0
    assert _open_intents(young) == []
    assert _open_intents(intended) == ["issue"]  # not a second one


# --- reconcile: challenges left by finished orders, expired tokens -----------------------------------------


def _challenge(
    cid: str,
    *,
    order_status: str,
    type_: str,
    status: str = "ready",
    error: str | None = None,
    age: float = STUCK + 60,
) -> int:
    with session_scope() as s:
        order = Order(certificate_id=cid, csr_pem="csr", key_enc=b"k", status=order_status)
        s.add(order)
        s.flush()
        ch = Challenge(
            order_id=order.id,
            certificate_id=cid,
            identifier="x.example.com",
            authz_url="https://ca/a",
            type=type_,
            url="https://ca/c",
            status=status,
            error=error,
        )
        s.add(ch)
        s.flush()
        ch.updated_at = utcnow() - dt.timedelta(seconds=age)
        return ch.id


def _challenge_row(ch_id: int) -> tuple[str, dt.datetime | None]:
    with session_scope(write=False) as s:
        ch = s.get_one(Challenge, ch_id)
        return ch.status, ch.cleaned_at


@pytest.mark.parametrize("order_status", ["valid", "invalid", "abandoned"])
def test_reconcile_cleans_up_challenges_of_finished_orders(settings: Settings, order_status: str) -> None:
    cid = _cert("left.example.com", State.ACTIVE)
    dns = _challenge(cid, order_status=order_status, type_="dns-01")
    http = _challenge(cid, order_status=order_status, type_="http-01")
    out, ctx = _step(scan._reconcile_step)
    assert out["cleanups"] == 2
    # a DNS record is removed by the dns queue (the provider call); an HTTP-01 token only needs marking
    assert _sent(ctx) == [("certqueue.dns.cleanup_batch", ([{"certificate_id": cid, "challenges": [dns]}],))]
    status, cleaned_at = _challenge_row(http)
    assert status == "cleaned"
    assert cleaned_at is not None
    assert _challenge_row(dns)[0] == "ready"  # the cleanup task marks it, after the provider call


@pytest.mark.parametrize(
    "kwargs",
    [
        {"order_status": "pending"},  # the order is still open: its challenges are in use
        {"order_status": "processing"},
        {"order_status": "valid", "status": "cleaned"},  # done already
        {"order_status": "valid", "error": "dns:provider_failed"},  # failed: left for an operator
        {"order_status": "valid", "age": STUCK - 60},  # recent: its own cleanup may still be on the way
    ],
)
def test_reconcile_leaves_challenges_that_are_not_leftovers(
    settings: Settings, kwargs: dict[str, Any]
) -> None:
    cid = _cert("inuse.example.com", State.ISSUING)
    status = kwargs.get("status", "ready")
    dns = _challenge(cid, type_="dns-01", **kwargs)
    http = _challenge(cid, type_="http-01", **kwargs)
    out, ctx = _step(scan._reconcile_step)
    assert out["cleanups"] == 0
    assert _sent(ctx) == []
    assert _challenge_row(dns)[0] == status
    assert _challenge_row(http)[0] == status


def test_reconcile_deletes_expired_http01_tokens_only(settings: Settings) -> None:
    cid = _cert("tokens.example.com", State.ISSUING)
    now = utcnow()
    with session_scope() as s:
        s.add(
            Http01Token(
                token="old",
                key_authorization="old.k",
                certificate_id=cid,
                expires_at=now - dt.timedelta(seconds=1),
            )
        )
        s.add(
            Http01Token(
                token="new",
                key_authorization="new.k",
                certificate_id=cid,
                expires_at=now + dt.timedelta(hours=1),
            )
        )
    out, _ = _step(scan._reconcile_step)
    assert out["expired_tokens"] == 1
    with session_scope(write=False) as s:
        assert list(s.execute(select(Http01Token.token)).scalars()) == ["new"]


# --- dispatch: the batch limit ------------------------------------------------------------------


def _requested_with_intent(name: str) -> str:
    cid = _cert(name, State.REQUESTED)
    with session_scope() as s:
        intents.record(s, "issue", cid, actor="test")
    return cid


def test_a_dispatch_ended_by_its_batch_limit_asks_for_another_run(settings: Settings) -> None:
    for i in range(3):
        _requested_with_intent(f"limit{i}.example.com")
    out, ctx = _step(lambda c: scan._dispatch_step(c, 2))
    assert out["intents"] == 2
    assert ctx.nudge  # the third is claimed by the next run, not left for a finished batch's nudge
    out, ctx = _step(lambda c: scan._dispatch_step(c, 2))
    assert out["intents"] == 1
    assert not ctx.nudge
