"""Events out, end to end: Pebble, PostgreSQL, Redis, real worker processes and beat.

A webhook receiver is down while certificates are issued, deployed, renewed, revoked and failed, and
while certqueue's worker and beat are killed and started again. When the receiver comes back it
answers 500 to the first copy of every event (as if its answer were lost), so every event is sent at
least twice; it checks every signature with its own HMAC and keeps each event once by its
idempotency key. It must end up with every announced event exactly once. A second webhook refuses
everything (401): its deliveries are dead letters after one attempt. A Celery subscriber gets its
events as a task on its own queue of the broker.
"""

from __future__ import annotations

import json
import secrets
from collections import Counter
from collections.abc import Iterator

import pytest
import redis as redis_lib
from sqlalchemy import select

from certqueue.db import session_scope
from certqueue.models import Event, EventDelivery
from devstack.ports import free_port
from tests.conftest_stack import Pipeline, build_pipeline, services_available, teardown_pipeline
from tests.fakes.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.integration

KEY = secrets.token_bytes(32)


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Pipeline, WebhookReceiver, WebhookReceiver]]:
    why = services_available()
    if why:
        pytest.fail(why)
    tmp = tmp_path_factory.mktemp("events")
    hook = WebhookReceiver(port=free_port(), key=KEY, mode="lose_first_ack")  # not started: down
    refuser = WebhookReceiver(port=free_port(), key=KEY, mode="refuse").start()
    import base64

    whsec = "whsec_" + base64.b64encode(KEY).decode()
    subscribers = [
        {"name": "hook", "kind": "webhook", "url": hook.url, "secret": whsec},
        {"name": "refuser", "kind": "webhook", "url": refuser.url, "secret": whsec, "events": ["issued"]},
        {
            "name": "inventory",
            "kind": "celery",
            "task": "inventory.certificate_event",
            "queue": "inventory",
            "events": ["issued", "revoked"],
        },
    ]
    p = build_pipeline(
        tmp,
        backend="postgres",
        pools=("acme",),
        regions=[{"name": "edge", "provider": "local", "path": str(tmp / "edge")}],
        extra_env={
            "CERTQUEUE_EVENTS__SUBSCRIBERS": json.dumps(subscribers),
            "CERTQUEUE_EVENTS__DELIVER_INTERVAL_SECONDS": "0.5",
            "CERTQUEUE_EVENTS__RETRY_INITIAL_SECONDS": "0.5",
            "CERTQUEUE_EVENTS__RETRY_MAX_SECONDS": "2",
            "CERTQUEUE_EVENTS__MAX_ATTEMPTS": "1000",
            # deliveries a killed worker had claimed are due again after 15 s (shipped: 300 s); the
            # case kills the worker while deliver runs every half second, so it often holds some
            "CERTQUEUE_EVENTS__LEASE_SECONDS": "15",
            "CERTQUEUE_EVENTS__EXPIRING_CHECK_SECONDS": "1",
            # every certificate is "expiring soon" at once (the whole lifetime): one expiring event
            # per issuance, which the expiring scan must not repeat
            "CERTQUEUE_MONITORING__ALERT_THRESHOLD_PERCENTAGE": "100",
            "CERTQUEUE_MONITORING__ALERT_THRESHOLD_DAYS": "100000",
            "CERTQUEUE_AUTOMATION__DISPATCH_INTERVAL_SECONDS": "1",
        },
    )
    p.cleanups.append(hook.stop)
    p.cleanups.append(refuser.stop)
    try:
        p.stack.start_worker("propagate", regions=("edge",), concurrency=1)
        p.stack.start_beat()
        yield p, hook, refuser
    finally:
        teardown_pipeline(p)


def _deliveries(subscriber: str) -> list[EventDelivery]:
    with session_scope(write=False) as s:
        rows = list(
            s.execute(
                select(EventDelivery).where(EventDelivery.subscriber == subscriber).order_by(EventDelivery.id)
            ).scalars()
        )
        for r in rows:
            s.expunge(r)
        return rows


def _audit_count(cid: str, kind: str) -> int:
    with session_scope(write=False) as s:
        return len(list(s.execute(select(Event.id).where(Event.certificate_id == cid, Event.kind == kind))))


def test_receiver_down_then_every_event_exactly_once_signed(world) -> None:
    p, hook, refuser = world
    # the CA resolves this name to an address where nothing listens: the issuance fails
    p.dns._post("/add-a", {"host": "unreachable-ev.example.test", "addresses": ["127.0.0.3"]})
    a = p.request(["a-ev.example.test"])
    b = p.request(["b-ev.example.test"])
    c = p.request(["unreachable-ev.example.test"])
    p.wait_state(a, "ACTIVE", timeout=120)
    p.wait_state(b, "ACTIVE", timeout=120)
    p.wait_state(c, "FAILED", timeout=120)
    p.send("certqueue.renew", {"v": 1, "certificate_id": b, "force": True})
    p.wait_for(
        lambda: _audit_count(b, "renewal") == 1 and p.state(b) == "ACTIVE", what="renewal", timeout=120
    )
    p.wait_for(lambda: _audit_count(b, "expiring") == 2, what="expiring for the renewed issuance", timeout=60)
    p.send("certqueue.revoke", {"v": 1, "certificate_id": b, "reason": "superseded"})
    p.wait_state(b, "REVOKED", timeout=120)

    # the receiver is down: deliveries wait, retried with backoff, none lost, none dead
    p.wait_for(
        lambda: all(d.attempts >= 2 for d in _deliveries("hook")), what="retries while the receiver is down"
    )
    pending = _deliveries("hook")
    assert {d.status for d in pending} == {"pending"}
    assert {d.last_error for d in pending} == {"connection failed"}

    # certqueue itself goes down and comes back (a killed worker, a killed beat)
    p.stack.kill("worker-acme")
    p.stack.kill("beat")
    p.stack.start_worker("acme")
    p.stack.start_beat()

    hook.start()
    # the new beat first waits for the killed one's RedBeat lock to run out (up to its 60 s), then
    # every event goes out twice (the receiver loses its first answer)
    p.wait_for(
        lambda: {d.status for d in _deliveries("hook")} == {"delivered"}, what="every delivery", timeout=180
    )
    rows = _deliveries("hook")
    keys = {d.idempotency_key for d in rows}
    assert len(keys) == len(rows)

    # every signature was valid; every event arrived at least twice (the first answer was "lost")
    assert hook.receipts and all(r.signature_ok for r in hook.receipts)
    per_id = Counter(r.msg_id for r in hook.receipts)
    assert set(per_id) == keys and min(per_id.values()) >= 2
    # ... with the same body each time, and processed exactly once
    for r in hook.receipts:
        assert r.body == hook.processed[r.msg_id]
        assert r.body["id"] == r.msg_id
    assert set(hook.processed) == keys

    got = Counter((b_["certificate_id"], b_["type"]) for b_ in hook.processed.values())
    assert got == Counter(
        {
            (a, "certificate.issued"): 1,
            (a, "certificate.deployed"): 1,
            (a, "certificate.expiring"): 1,
            (b, "certificate.issued"): 1,
            (b, "certificate.deployed"): 2,
            (b, "certificate.renewed"): 1,
            (b, "certificate.expiring"): 2,
            (b, "certificate.revoked"): 1,
            (c, "certificate.failed"): 1,
        }
    )
    bodies = {(x["certificate_id"], x["type"]): x for x in hook.processed.values()}
    assert bodies[(b, "certificate.revoked")]["data"] == {"reason": "superseded"}
    assert bodies[(a, "certificate.deployed")]["data"]["region"] == "edge"
    assert bodies[(a, "certificate.issued")]["domains"] == ["a-ev.example.test"]
    assert bodies[(c, "certificate.failed")]["data"]["stage"] == "issue"
    assert bodies[(c, "certificate.failed")]["data"]["reason"].startswith("acme:")
    # nothing secret in a body
    raw = b"".join(r.raw for r in hook.receipts)
    assert b"PRIVATE KEY" not in raw and b"BEGIN CERTIFICATE" not in raw

    # the refusing receiver: one attempt each, then a dead letter with its answer kept
    p.wait_for(
        lambda: len(_deliveries("refuser")) == 2 and {d.status for d in _deliveries("refuser")} == {"dead"},
        what="dead letters",
    )
    dead = _deliveries("refuser")
    assert {(d.attempts, d.last_status, d.event_type) for d in dead} == {(1, 401, "issued")}
    assert len(refuser.receipts) == 2 and all(r.signature_ok for r in refuser.receipts)

    # the Celery subscriber: one task message per event on its own queue, task id = idempotency key
    assert p.env["CERTQUEUE_BROKER__URL"]
    r = redis_lib.Redis.from_url(p.env["CERTQUEUE_BROKER__URL"])
    p.wait_for(
        lambda: {d.status for d in _deliveries("inventory")} == {"delivered"}, what="celery deliveries"
    )
    inv = _deliveries("inventory")
    assert sorted(d.event_type for d in inv) == ["issued", "issued", "revoked"]
    messages = [json.loads(m) for m in r.lrange("inventory", 0, -1)]
    assert len(messages) == 3
    for m in messages:
        assert m["headers"]["task"] == "inventory.certificate_event"
        args = json.loads(base64_decode(m["body"]))[0][0]
        assert m["headers"]["id"] == args["id"]
    assert {m["headers"]["id"] for m in messages} == {d.idempotency_key for d in inv}


def base64_decode(s: str) -> bytes:
    import base64

    return base64.b64decode(s)


def test_the_cli_lists_and_redelivers_dead_letters(world) -> None:
    p, _hook, refuser = world
    p.wait_for(
        lambda: {d.status for d in _deliveries("refuser")} == {"dead"} and _deliveries("refuser"),
        what="dead letters",
    )
    out = json.loads(p.stack.cli("events", "list", "--dead", "--json").stdout)
    assert {d["subscriber"] for d in out} == {"refuser"} and all(d["last_status"] == 401 for d in out)
    before = len(refuser.receipts)
    refuser.mode = "accept"  # the receiver's configuration was fixed
    assert "2 deliveries due again" in p.stack.cli("events", "redeliver", "--dead").stdout
    p.wait_for(lambda: {d.status for d in _deliveries("refuser")} == {"delivered"}, what="redelivery")
    assert len(refuser.receipts) == before + 2
    assert {r.msg_id for r in refuser.receipts[before:]} == {
        d.idempotency_key for d in _deliveries("refuser")
    }
