"""Durable intents and dispatch on both database backends: requests are rows written with the change
they ask for, dispatch claims only what capacity allows, and a lost message is claimed again."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select

from certqueue import dispatch, intents, operations
from certqueue.certificates import CertificateRequest, create_certificate
from certqueue.config import Settings
from certqueue.db import session_scope
from certqueue.errors import InvalidInput, InvalidTransition
from certqueue.models import Certificate, Event, Intent, State, utcnow
from tests.conftest_db import count_rows

CA_A = "https://ca-a.example/dir"
CA_B = "https://ca-b.example/dir"


@pytest.fixture
def settings(db_url: str, settings_factory: Callable[..., Settings], tmp_path: Path) -> Settings:
    return settings_factory(
        database_url=db_url,
        broker={"filesystem_path": str(tmp_path / "broker")},
        automation={"max_orders_in_flight_per_ca": 3, "scan_batch_size": 50, "max_queue_depth": 100},
        acme={"revocation_reasons": ["unspecified", "keyCompromise", "superseded"]},
    )


def _cert(name: str, *, state: State = State.REQUESTED, ca: str = CA_A, due: bool = False) -> str:
    with session_scope() as s:
        cert, created = create_certificate(s, CertificateRequest.build(domains=[name], directory_url=ca))
        assert created
        cert.state = state
        if due:
            cert.renew_at = utcnow() - dt.timedelta(minutes=1)
        return cert.id


def _served(cid: str) -> None:
    from certqueue import certificates
    from tests.conftest_db import make_cert_pem

    with session_scope() as s:
        cert = s.get_one(Certificate, cid)
        leaf, key = make_cert_pem(tuple(cert.domains))
        iss = certificates.store_issuance(s, cert, leaf, key)
        cert.current_issuance_id = iss.id


def _run(now: dt.datetime | None = None) -> dispatch.Claimed:
    from certqueue.config import get_settings

    with session_scope() as s:
        return dispatch.run(s, get_settings(), now or utcnow())


def _open() -> list[tuple[str, str, str]]:
    with session_scope(write=False) as s:
        return [
            (i.kind, i.certificate_id, i.status)
            for i in s.execute(
                select(Intent).where(Intent.status.in_(intents.OPEN)).order_by(Intent.id)
            ).scalars()
        ]


# --- intents ---------------------------------------------------------------------------------------------


def test_an_open_intent_is_never_written_twice(settings: Settings) -> None:
    cid = _cert("once.example.com")
    with session_scope() as s:
        first = intents.record(s, "renew", cid, {"force": False}, actor="api")
        again = intents.record(s, "renew", cid, {"force": True}, actor="cli")
        assert again.id == first.id and again.params == {"force": True}  # the stronger request wins
        other = intents.record(s, "revoke", cid, {"reason": "keyCompromise"}, actor="api")
        assert other.id != first.id
    with session_scope() as s:
        assert intents.complete(s, cid, ("renew",), outcome="done") == 1
        assert intents.complete(s, cid, ("renew",), outcome="done") == 0
        fresh = intents.record(s, "renew", cid, actor="api")
        assert fresh.id != first.id  # a closed intent does not swallow a new request
    with pytest.raises(ValueError):
        with session_scope() as s:
            intents.record(s, "explode", cid)


def test_a_request_that_changes_an_intent_in_flight_is_an_intent_of_its_own(settings: Settings) -> None:
    """A forced propagation asked while a plain one is dispatched (its step has read its parameters)
    is not merged into it, where nothing would see ``force``; one that changes nothing is."""
    cid = _cert("inflight.example.com", state=State.ACTIVE)
    with session_scope() as s:
        first = intents.record(s, "propagate", cid, {"regions": None}, actor="api")
        first.status = "dispatched"
        first_id = first.id
    with session_scope() as s:
        same = intents.record(s, "propagate", cid, {"regions": None}, actor="api")
        plain = intents.record(s, "propagate", cid, actor="api")
        assert same.id == plain.id == first_id  # covered by the one in flight
        forced = intents.record(s, "propagate", cid, {"force": True}, actor="api")
        assert forced.id != first_id and forced.status == "pending" and forced.params == {"force": True}
        again = intents.record(s, "propagate", cid, {"force": True, "regions": ["edge"]}, actor="api")
        assert again.id == forced.id and again.params == {"force": True, "regions": ["edge"]}
    with session_scope() as s:
        # the step that planned the first closes it alone; the forced request stays open
        assert intents.complete(s, cid, ("propagate",), outcome="deploying", up_to=first_id) == 1
    assert _open() == [("propagate", cid, "pending")]


def test_request_issue_writes_the_row_and_its_intent_in_one_transaction(settings: Settings) -> None:
    req = CertificateRequest.build(domains=["one.example.com"], directory_url=CA_A)
    with session_scope() as s:
        cert, created, intent = operations.request_issue(s, req, actor="api")
        cid = cert.id
        assert created and intent is not None and intent.kind == "issue"
    with session_scope() as s:
        again, created, intent = operations.request_issue(s, req, actor="api")
        assert again.id == cid and not created and intent is None
    assert _open() == [("issue", cid, "pending")]


def test_request_issue_many_is_one_intent_per_new_certificate(settings: Settings) -> None:
    existing = _cert("a.many.example.com")
    reqs = [CertificateRequest.build(domains=[f"{n}.many.example.com"], directory_url=CA_A) for n in "abc"]
    with session_scope() as s:
        out = operations.request_issue_many(s, reqs, actor="cli")
    assert [created for _c, created in out] == [False, True, True]
    assert out[0][0].id == existing
    assert sorted(c for _k, c, _st in _open()) == sorted(c.id for c, created in out if created)


def test_revoke_request_is_checked_then_durable(settings: Settings) -> None:
    active = _cert("revoke.example.com", state=State.ACTIVE)
    _served(active)
    before = count_rows(Event), count_rows(Intent)
    with pytest.raises(InvalidInput):
        with session_scope() as s:
            operations.request_revoke(s, active, reason="affiliationChanged", actor="api")  # not accepted
    pending = _cert("pending.revoke.example.com")
    with pytest.raises(InvalidTransition):
        with session_scope() as s:
            operations.request_revoke(s, pending, reason="keyCompromise", actor="api")
    assert (count_rows(Event), count_rows(Intent)) == (before[0] + 1, before[1])  # only pending's creation
    with session_scope() as s:
        intent = operations.request_revoke(s, active, reason="keyCompromise", actor="api")
        assert intent is not None and intent.params == {"reason": "keyCompromise"}
    with session_scope(write=False) as s:
        kinds = set(s.execute(select(Event.kind).where(Event.certificate_id == active)).scalars())
        assert "revocation_requested" in kinds
    gone = _cert("gone.revoke.example.com", state=State.REVOKED)
    with session_scope() as s:
        assert operations.request_revoke(s, gone, reason="keyCompromise", actor="api") is None


def test_renew_request_not_due_and_not_forced_records_nothing(settings: Settings) -> None:
    cid = _cert("notdue.example.com", state=State.ACTIVE)
    with session_scope() as s:
        s.get_one(Certificate, cid).renew_at = utcnow() + dt.timedelta(days=10)
    with session_scope() as s:
        assert operations.request_renew(s, cid, force=False, actor="api") is None
        assert operations.request_renew(s, cid, force=True, actor="api") is not None
    expired = _cert("expired.example.com", state=State.EXPIRED)
    with pytest.raises(InvalidTransition), session_scope() as s:
        operations.request_renew(s, expired, force=True, actor="api")


# --- dispatch --------------------------------------------------------------------------------------------


def test_dispatch_claims_issue_intents_only_up_to_the_per_ca_cap(settings: Settings) -> None:
    req_ids = []
    for i in range(5):
        with session_scope() as s:
            cert, _c, _i = operations.request_issue(
                s,
                CertificateRequest.build(domains=[f"h{i}.cap.example.com"], directory_url=CA_A),
                actor="api",
            )
            req_ids.append(cert.id)
    first = _run()
    assert first.intents == 3 and first.deferred == 2
    assert [name for name, _job in first.sends] == ["certqueue.acme.start"] * 3
    assert {job["certificate_id"] for _n, job in first.sends} == set(req_ids[:3])  # oldest first
    # nothing started yet, but the three dispatched intents count as in flight: no more claims
    second = _run()
    assert second.intents == 0 and second.sends == []
    # the messages were lost (a Redis restart): once their lease ends they are claimed again
    later = utcnow() + dt.timedelta(seconds=settings.automation.stuck_after_seconds + 1)
    third = _run(later)
    assert third.intents == 3
    with session_scope(write=False) as s:
        attempts = sorted(s.execute(select(Intent.attempts).where(Intent.kind == "issue")).scalars())
    assert attempts == [0, 0, 2, 2, 2]


def test_a_cap_on_one_ca_does_not_hold_back_another(settings: Settings) -> None:
    for i in range(4):
        _cert(f"busy{i}.example.com", state=State.ISSUING, ca=CA_A)  # CA A is full (cap 3)
    with session_scope() as s:
        cert, _c, _i = operations.request_issue(
            s, CertificateRequest.build(domains=["free.example.com"], directory_url=CA_B), actor="api"
        )
        b = cert.id
        _cert_a, _c, _i = operations.request_issue(
            s, CertificateRequest.build(domains=["waits.example.com"], directory_url=CA_A), actor="api"
        )
    out = _run()
    assert [job["certificate_id"] for _n, job in out.sends] == [b] and out.deferred == 1


def test_due_renewals_are_claimed_up_to_capacity_and_the_rest_stay_active(settings: Settings) -> None:
    ids = [_cert(f"due{i}.example.com", state=State.ACTIVE, due=True) for i in range(10)]
    out = _run()
    assert out.due == 3
    with session_scope(write=False) as s:
        states = dict(
            s.execute(select(Certificate.id, Certificate.state).where(Certificate.id.in_(ids))).all()
        )
        renewing_events = s.execute(
            select(func.count()).select_from(Event).where(Event.to_state == "RENEWING")
        ).scalar_one()
    assert sorted(states.values()).count("RENEWING") == 3 and renewing_events == 3
    assert all(job["purpose"] == "renew" for _n, job in out.sends)
    # no message, no retry for the seven left: they wait in the database for the next dispatch
    assert _run().due == 0


def test_revocations_are_not_held_back_by_the_order_cap(settings: Settings) -> None:
    for i in range(3):
        _cert(f"full{i}.example.com", state=State.ISSUING)
    active = _cert("urgent.example.com", state=State.ACTIVE)
    _served(active)
    with session_scope() as s:
        operations.request_revoke(s, active, reason="keyCompromise", actor="api")
    out = _run()
    assert out.sends == [
        (
            "certqueue.acme.revoke",
            {"certificate_id": active, "intent": out.sends[0][1]["intent"], "reason": "keyCompromise"},
        )
    ]


def test_queue_room_bounds_dispatch(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "acme_pressure", lambda _settings: settings.automation.max_queue_depth - 1)
    for i in range(3):
        with session_scope() as s:
            operations.request_issue(
                s, CertificateRequest.build(domains=[f"q{i}.example.com"], directory_url=CA_A), actor="api"
            )
    assert _run().intents == 1


def test_a_request_made_while_dispatch_claims_its_intent_gets_an_intent_of_its_own(
    settings: Settings,
) -> None:
    """Dispatch has locked and marked the pending intent (its parameters read); a request that
    changes them (``force``) arrives before that commits. It must wait for the claim and then
    record an intent of its own, not merge ``force`` into the claimed one, which would be lost."""
    import threading
    import time

    cid = _cert("race.example.com", state=State.ACTIVE)
    _served(cid)
    with session_scope() as s:
        first = intents.record(s, "propagate", cid, actor="t").id
    claimed, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def dispatcher() -> None:
        try:
            with session_scope() as s:
                rows = intents.claim(s, utcnow(), kinds=("propagate",), limit=10, lease_seconds=60)
                assert [r.id for r in rows] == [first]
                claimed.set()
                release.wait(10)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)
            claimed.set()

    got: dict[str, int] = {}

    def requester() -> None:
        with session_scope() as s:
            got["id"] = intents.record(s, "propagate", cid, {"force": True}, actor="t").id

    d = threading.Thread(target=dispatcher)
    d.start()
    assert claimed.wait(10) and not errors, errors
    r = threading.Thread(target=requester)
    r.start()
    time.sleep(0.5)  # the request is now waiting for the claim's commit
    assert "id" not in got
    release.set()
    d.join(10)
    r.join(10)
    assert not errors, errors
    assert got["id"] != first
    with session_scope(write=False) as s:
        new = s.get_one(Intent, got["id"])
        assert (new.status, new.params) == ("pending", {"force": True})
        assert s.get_one(Intent, first).params == {}
