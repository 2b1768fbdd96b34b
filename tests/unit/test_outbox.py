"""certqueue.outbox on SQLite and PostgreSQL: an announced event is staged with the change that
records it (and vanishes with its rollback), claims lease rows, outcomes are recorded, dead letters
can be sent again. Plus the ``events`` settings' checks."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from certqueue import events, outbox
from certqueue.certificates import CertificateRequest, create_certificate
from certqueue.cli import main
from certqueue.config import SubscriberSettings, load_settings
from certqueue.db import session_scope
from certqueue.errors import ConfigError, InvalidInput
from certqueue.models import Certificate, EventDelivery, State, utcnow

HOOK = {"name": "hook", "kind": "webhook", "url": "http://127.0.0.1:9/h", "secret": "s3cret"}
TASK = {"name": "svc", "kind": "celery", "task": "svc.on_event", "queue": "svc", "events": ["revoked"]}


@pytest.fixture
def events_db(db_url: str, settings_factory: Any) -> Any:
    return settings_factory(
        database_url=db_url,
        **{"events.subscribers": [HOOK, TASK], "events.retry_initial_seconds": 10, "events.max_attempts": 3},
    )


def _cert(s: Any) -> Certificate:
    cert, _ = create_certificate(s, CertificateRequest.build(domains=["a.example.test", "b.example.test"]))
    return cert


def _rows() -> list[EventDelivery]:
    with session_scope(write=False) as s:
        return list(s.execute(select(EventDelivery).order_by(EventDelivery.id)).scalars())


def test_announced_events_are_staged_per_subscriber_in_the_same_transaction(events_db: Any) -> None:
    with session_scope() as s:
        cert = _cert(s)  # "requested" is not announced
        events.transition(s, cert, State.ISSUING, reason="issue")  # not announced
        events.record(s, cert.id, "issuance", reason="success", data={"serial": "ab", "secret": "x"})
        cid = cert.id
    rows = _rows()
    assert [(r.subscriber, r.event_type) for r in rows] == [("hook", "issued")]  # svc wants revoked only
    (row,) = rows
    assert row.event_id is not None and row.status == "pending" and row.attempts == 0
    assert row.data == {"serial": "ab"}  # only public keys
    assert row.certificate_id == cid and row.idempotency_key.startswith("evt_")

    with pytest.raises(RuntimeError), session_scope() as s:
        c = s.get(Certificate, cid)
        events.transition(s, c, State.FAILED, reason="acme:rejectedIdentifier")
        raise RuntimeError("rolled back")
    assert len(_rows()) == 1

    with session_scope() as s:
        c = s.get(Certificate, cid)
        events.transition(s, c, State.FAILED, reason="acme:rejectedIdentifier")
    failed = _rows()[-1]
    assert failed.event_type == "failed"
    assert failed.data == {"reason": "acme:rejectedIdentifier", "stage": "issue"}


def test_no_subscribers_no_rows(db_url: str, settings_factory: Any) -> None:
    settings_factory(database_url=db_url)
    with session_scope() as s:
        cert = _cert(s)
        events.transition(s, cert, State.ISSUING)
        events.transition(s, cert, State.FAILED, reason="x")
    assert _rows() == []


def _stage_issued() -> str:
    with session_scope() as s:
        cert = _cert(s)
        events.record(s, cert.id, "issuance", reason="success", data={"serial": "01"})
        return cert.id


def test_claim_leases_and_builds_the_body(events_db: Any) -> None:
    cid = _stage_issued()
    now = utcnow()
    with session_scope() as s:
        (c,) = outbox.claim(s, now, events_db.events)
    assert c.attempts == 1 and c.subscriber == "hook"
    assert c.body["id"] == c.idempotency_key and c.body["type"] == "certificate.issued"
    assert c.body["certificate_id"] == cid and c.body["domains"] == ["a.example.test", "b.example.test"]
    assert c.body["data"] == {"serial": "01"} and c.body["version"] == 1 and c.body["sequence"]
    with session_scope() as s:
        assert outbox.claim(s, now, events_db.events) == []  # leased
        lease_end = now + dt.timedelta(seconds=events_db.events.lease_seconds)
        (again,) = outbox.claim(s, lease_end, events_db.events)  # a dead worker's lease ran out
    assert again.attempts == 2 and again.idempotency_key == c.idempotency_key and again.body == c.body


def test_finish_delivered_retry_dead(events_db: Any) -> None:
    _stage_issued()
    now = utcnow()
    with session_scope() as s:
        (c,) = outbox.claim(s, now, events_db.events)
    with session_scope() as s:
        out = outbox.finish(s, c, outbox.Attempt(c.id, 503, "http 503"), now, events_db.events)
    assert out.value == "retry"
    (row,) = _rows()
    assert row.status == "pending" and row.last_status == 503 and row.last_error == "http 503"
    assert 7 <= (row.next_attempt_at - now).total_seconds() <= 13  # 10 s with 20 % jitter
    later = row.next_attempt_at
    with session_scope() as s:
        (c2,) = outbox.claim(s, later, events_db.events)
        # a stale answer (the first claim's) changes nothing
        assert outbox.finish(s, c, outbox.Attempt(c.id, 200), later, events_db.events).value == "retry"
    with session_scope() as s:
        assert outbox.finish(s, c2, outbox.Attempt(c2.id, 204), later, events_db.events).value == "delivered"
    (row,) = _rows()
    assert row.status == "delivered" and row.delivered_at == later and row.last_error is None


def _cli(settings: Any, tmp_path: Any, *args: str) -> Any:
    env = {
        "CERTQUEUE_SETTINGS_DIR": str(tmp_path),
        "CERTQUEUE_DATABASE__URL": settings.database.url,
        "CERTQUEUE_STORAGE__ENCRYPTION_KEY_PATH": str(settings.storage.encryption_key_path),
    }
    return CliRunner().invoke(main, list(args), env=env)


def test_refusal_is_a_dead_letter_and_redeliver_makes_it_due(events_db: Any, tmp_path: Any) -> None:
    _stage_issued()
    now = utcnow()
    with session_scope() as s:
        (c,) = outbox.claim(s, now, events_db.events)
        outbox.finish(s, c, outbox.Attempt(c.id, 401, "http 401"), now, events_db.events)
    assert _rows()[0].status == "dead"
    result = _cli(events_db, tmp_path, "events", "list", "--dead", "--json")
    assert result.exit_code == 0, result.output
    assert '"status": "dead"' in result.output and '"last_status": 401' in result.output
    with session_scope() as s, pytest.raises(InvalidInput):
        outbox.redeliver(s)
    result = _cli(events_db, tmp_path, "events", "redeliver", "--dead")
    assert result.exit_code == 0 and "1 deliveries due again" in result.output
    (row,) = _rows()
    assert row.status == "pending" and row.attempts == 0 and row.idempotency_key == c.idempotency_key


def test_attempts_run_out(events_db: Any) -> None:
    _stage_issued()
    t = utcnow()
    for n in range(1, 4):
        with session_scope() as s:
            (c,) = outbox.claim(s, t, events_db.events)
            assert c.attempts == n
            out = outbox.finish(s, c, outbox.Attempt(c.id, None, "connection failed"), t, events_db.events)
        t += dt.timedelta(hours=2)
    assert out.value == "dead" and _rows()[0].status == "dead"


# --- settings ---------------------------------------------------------------------------------------


def _load(tmp_path: Any, subscribers: list[dict[str, Any]]) -> Any:
    return load_settings(
        overrides={"events.subscribers": subscribers}, directory=tmp_path, environ={}
    ).settings


@pytest.mark.parametrize(
    ("sub", "message"),
    [
        ({**HOOK, "url": None}, "needs url"),
        ({**HOOK, "url": "http://hooks.example.com/x"}, "must be https"),
        ({**HOOK, "url": "ftp://127.0.0.1/x"}, "http\\(s\\) URL"),
        ({k: v for k, v in HOOK.items() if k != "secret"}, "secret or secret_file"),
        ({**HOOK, "secret_file": "/x"}, "not both"),
        ({**HOOK, "events": ["issued", "exploded"]}, "unknown event types"),
        ({**TASK, "queue": None}, "needs task and queue"),
        ({**TASK, "url": "https://x.example"}, "for kind: webhook"),
        ({**HOOK, "name": "bad name"}, "name"),
    ],
)
def test_bad_subscribers_are_refused(tmp_path: Any, sub: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, [sub])


def test_names_unique_and_http_allowed_when_asked(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="unique"):
        _load(tmp_path, [HOOK, HOOK])
    s = _load(tmp_path, [{**HOOK, "url": "http://hooks.internal/x", "allow_http": True}])
    assert s.events.subscriber("hook") is not None and s.events.subscriber("nope") is None


def test_secret_forms(tmp_path: Any) -> None:
    import base64

    assert SubscriberSettings(**HOOK).secret_bytes() == b"s3cret"
    raw = bytes(range(32))
    whsec = "whsec_" + base64.b64encode(raw).decode()
    assert SubscriberSettings(**{**HOOK, "secret": whsec}).secret_bytes() == raw
    f = tmp_path / "secret"
    f.write_text("from-file\n")
    sub = {k: v for k, v in HOOK.items() if k != "secret"}
    assert SubscriberSettings(**sub, secret_file=f).secret_bytes() == b"from-file"
    with pytest.raises(ConfigError, match="cannot read"):
        SubscriberSettings(**sub, secret_file=tmp_path / "missing").secret_bytes()
    with pytest.raises(ConfigError, match="base64"):
        SubscriberSettings(**{**HOOK, "secret": "whsec_***"}).secret_bytes()
