"""The public request tasks of tasks/acme.py (issue, renew, revoke, status) as a worker runs them
(``run_step`` with a pushed request), on a real database (SQLite and PostgreSQL). They never call a
CA: they record an intent for dispatch, or refuse the request (the job fails, nothing is written).

Not here: the batch issuance against a CA (``issue_batch``, ``start``, ``validate``); Pebble covers
it in tests/integration/test_pipeline.py (the shared phases' statements counted, each shared phase
failed on purpose) and the chaos tests.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from certqueue import certificates, payloads
from certqueue.certificates import CertificateRequest, create_certificate
from certqueue.config import Settings
from certqueue.db import session_scope
from certqueue.errors import InvalidInput, InvalidTransition, NotFound
from certqueue.models import Certificate, Intent, State, utcnow
from certqueue.tasks import acme
from tests.conftest_db import make_cert_pem

UNKNOWN = "cert_zzzzzzzzzzzzzzzzzzzz"


@pytest.fixture
def settings(db_url: str, settings_factory: Callable[..., Settings], tmp_path: Path) -> Settings:
    return settings_factory(
        database_url=db_url,
        broker={"filesystem_path": str(tmp_path / "broker")},
        acme={
            "directory_url": "https://ca.example/dir",
            "revocation_reasons": ["unspecified", "keyCompromise", "superseded"],
        },
        multi_region={
            "enabled": True,
            "regions": [{"name": "eu", "provider": "local", "path": str(tmp_path / "eu")}],
        },
    )


def _run(task: Any, step: Callable[..., Any], payload: dict[str, Any]) -> Any:
    task.push_request(id="r-1", args=[payload], kwargs={}, called_directly=False)
    try:
        return task.run_step(step, payload)
    finally:
        task.pop_request()


def _cert(name: str, state: State, *, renew_in: float | None = None, issued: bool = False) -> str:
    with session_scope() as s:
        cert, _ = create_certificate(
            s, CertificateRequest.build(domains=[name], directory_url="https://ca/d")
        )
        cert.state = state
        if renew_in is not None:
            cert.renew_at = utcnow() + dt.timedelta(seconds=renew_in)
        if issued:
            leaf, key = make_cert_pem((name,))
            cert.current_issuance_id = certificates.store_issuance(s, cert, leaf, key).id
        return cert.id


def _intents(cid: str | None = None) -> list[tuple[str, dict[str, Any], str]]:
    with session_scope(write=False) as s:
        q = select(Intent).order_by(Intent.id)
        if cid:
            q = q.where(Intent.certificate_id == cid)
        return [(i.kind, i.params, i.status) for i in s.execute(q).scalars()]


def _certificates() -> int:
    with session_scope(write=False) as s:
        return int(s.execute(select(func.count()).select_from(Certificate)).scalar_one())


# --- issue ----------------------------------------------------------------------------------------------


def test_issue_with_a_request_creates_the_certificate_and_its_intent(settings: Settings) -> None:
    payload = payloads.parse("certqueue.issue", {"v": 1, "request": {"domains": ["new.example.com"]}})
    out = _run(acme.issue, acme._issue_step, payload)
    assert (out["created"], out["status"], out["state"]) == (True, "accepted", State.REQUESTED)
    assert _intents(out["certificate_id"]) == [("issue", {}, "pending")]
    again = _run(acme.issue, acme._issue_step, payload)  # the same request again: the same certificate
    assert again["certificate_id"] == out["certificate_id"]
    assert again["created"] is False
    assert _certificates() == 1
    assert len(_intents(out["certificate_id"])) == 1


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (State.FAILED, [("issue", {}, "pending")]),  # a failed certificate is tried again
        (State.REQUESTED, [("issue", {}, "pending")]),
        (State.ACTIVE, []),  # nothing to issue: no-op
        (State.ISSUING, []),  # already under way
    ],
)
def test_issue_by_id_records_an_intent_only_where_there_is_work(
    settings: Settings, state: State, expected: list[Any]
) -> None:
    cid = _cert("byid.example.com", state)
    out = _run(acme.issue, acme._issue_step, {"v": 1, "certificate_id": cid})
    assert out["status"] == ("accepted" if expected else "noop")
    assert _intents(cid) == expected


def test_issue_of_an_issued_certificate_resumes_its_propagation(settings: Settings) -> None:
    cid = _cert("issued.example.com", State.ISSUED, issued=True)
    out = _run(acme.issue, acme._issue_step, {"v": 1, "certificate_id": cid})
    assert out["status"] == "accepted"
    assert [k for k, _, _ in _intents(cid)] == ["propagate"]


def test_issue_of_an_unknown_certificate_fails_the_job_and_writes_nothing(settings: Settings) -> None:
    with pytest.raises(NotFound):
        _run(acme.issue, acme._issue_step, {"v": 1, "certificate_id": UNKNOWN})
    assert _intents() == []


# --- renew ----------------------------------------------------------------------------------------------


def test_renew_of_a_certificate_not_yet_due_is_a_no_op(settings: Settings) -> None:
    cid = _cert("notdue.example.com", State.ACTIVE, renew_in=86400)
    out = _run(acme.renew, acme._renew_step, {"v": 1, "certificate_id": cid})
    assert out["status"] == "not_due"
    assert out["renew_at"]
    assert _intents(cid) == []


def test_renew_when_due_or_forced_records_a_renew_intent(settings: Settings) -> None:
    due = _cert("due.example.com", State.ACTIVE, renew_in=-60)
    forced = _cert("forced.example.com", State.ACTIVE, renew_in=86400)
    assert _run(acme.renew, acme._renew_step, {"v": 1, "certificate_id": due})["status"] == "accepted"
    _run(
        acme.renew,
        acme._renew_step,
        {"v": 1, "certificate_id": forced, "force": True, "reason": "key change"},
    )
    assert _intents(due) == [("renew", {"force": False}, "pending")]
    assert _intents(forced) == [("renew", {"force": True, "reason": "key change"}, "pending")]


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ({"v": 1, "certificate_id": UNKNOWN}, NotFound),
        ({"v": 1, "certificate_id": "not-an-id"}, InvalidInput),
        ({"v": 2, "certificate_id": UNKNOWN}, InvalidInput),
    ],
)
def test_renew_refuses_a_bad_request_and_writes_nothing(
    settings: Settings, payload: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        _run(acme.renew, acme._renew_step, payload)
    assert _intents() == []


def test_renew_of_a_certificate_in_a_state_that_forbids_it_fails_the_job(settings: Settings) -> None:
    cid = _cert("requested.example.com", State.REQUESTED)
    with pytest.raises(InvalidTransition):
        _run(acme.renew, acme._renew_step, {"v": 1, "certificate_id": cid})
    assert _intents(cid) == []


# --- revoke ---------------------------------------------------------------------------------------------


def test_revoke_records_a_revoke_intent_with_its_reason(settings: Settings) -> None:
    cid = _cert("revoke.example.com", State.ACTIVE, issued=True)
    out = _run(
        acme.revoke, acme._request_revoke_step, {"v": 1, "certificate_id": cid, "reason": "keyCompromise"}
    )
    assert out["status"] == "accepted"
    assert _intents(cid) == [("revoke", {"reason": "keyCompromise"}, "pending")]


def test_revoke_of_a_revoked_certificate_is_a_no_op(settings: Settings) -> None:
    cid = _cert("revoked.example.com", State.REVOKED, issued=True)
    out = _run(acme.revoke, acme._request_revoke_step, {"v": 1, "certificate_id": cid})
    assert out == {"certificate_id": cid, "status": "revoked"}
    assert _intents(cid) == []


@pytest.mark.parametrize(
    ("state", "issued", "reason", "error"),
    [
        (State.ACTIVE, True, "becauseISaidSo", InvalidInput),  # not a configured reason
        (State.REQUESTED, False, "unspecified", InvalidTransition),  # nothing issued to revoke
    ],
)
def test_revoke_refuses_and_writes_nothing(
    settings: Settings, state: State, issued: bool, reason: str, error: type[Exception]
) -> None:
    cid = _cert("norevoke.example.com", state, issued=issued)
    with pytest.raises(error):
        _run(acme.revoke, acme._request_revoke_step, {"v": 1, "certificate_id": cid, "reason": reason})
    assert _intents(cid) == []


# --- status ---------------------------------------------------------------------------------------------


def test_status_reports_the_certificate_and_its_current_issuance(settings: Settings) -> None:
    cid = _cert("status.example.com", State.ACTIVE, issued=True)
    out = _run(acme.status, acme._status_step, {"v": 1, "certificate_id": cid})
    assert out["certificate_id"] == cid
    assert out["state"] == State.ACTIVE
    assert out["domains"] == ["status.example.com"]
    assert out["serial"]
    assert out["not_after"]
    assert "key" not in str(out).lower()  # ids and names only, never key material
