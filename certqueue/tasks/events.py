"""The ``events`` queue, driven by beat: lifecycle events out to subscribers, and the "expiring" scan.

Owns nothing itself: the outbox rows belong to ``certqueue.outbox`` (claim, finish), the
``expiring`` audit events to ``certqueue.events``. ``deliver`` runs three steps, each its
own transaction or none: claim a leased batch and commit; send it (webhooks over HTTP in threads,
Celery subscribers published on the broker), holding no row lock; record every outcome.

A worker killed between the claim and the record leaves its rows due again when their lease ends;
they are then sent a second time with the same idempotency key (at least once).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests
from celery import shared_task
from kombu import Queue
from sqlalchemy import select

from certqueue import events, outbox, webhooks
from certqueue.config import EventsSettings, SubscriberSettings, get_settings
from certqueue.db import session_scope
from certqueue.errors import ConfigError
from certqueue.health import expiring_threshold
from certqueue.models import Certificate, Event, Issuance, State, utcnow
from certqueue.tasks.base import CertqueueTask, StepContext

log = logging.getLogger("certqueue.events")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        return None  # an HTTP date: the backoff table decides instead


def post_webhook(sub: SubscriberSettings, claimed: outbox.Claimed, timeout: float) -> outbox.Attempt:
    """One signed POST. Errors are stable reasons: never the URL, a header or the response body."""
    body = json.dumps(claimed.body, separators=(",", ":"), sort_keys=True).encode()
    try:
        key = sub.secret_bytes()
    except ConfigError as exc:
        return outbox.Attempt(claimed.id, None, f"config: {exc.message}")
    hdrs = {**webhooks.headers(key, claimed.idempotency_key, body), "user-agent": "certqueue-events/1"}
    try:
        resp = requests.post(
            str(sub.url),
            data=body,
            headers=hdrs,
            timeout=timeout,
            allow_redirects=False,
            verify=str(sub.ca_bundle) if sub.ca_bundle else True,
        )
    except requests.Timeout:
        return outbox.Attempt(claimed.id, None, "timeout")
    except requests.ConnectionError:
        return outbox.Attempt(claimed.id, None, "connection failed")
    except requests.RequestException as exc:
        return outbox.Attempt(claimed.id, None, f"request failed: {type(exc).__name__}")
    with resp:
        if 200 <= resp.status_code < 300:
            return outbox.Attempt(claimed.id, resp.status_code)
        return outbox.Attempt(
            claimed.id,
            resp.status_code,
            f"http {resp.status_code}",
            retry_after=_retry_after(resp.headers.get("Retry-After")),
        )


def publish_task(app: Any, sub: SubscriberSettings, claimed: outbox.Claimed) -> outbox.Attempt:
    """Publish the event as task ``sub.task`` on queue ``sub.queue``; the Celery task id is the
    idempotency key, so a consumer can drop a second copy by ``self.request.id``."""
    try:
        app.send_task(
            sub.task,
            args=[claimed.body],
            queue=Queue(str(sub.queue), routing_key=str(sub.queue)),
            task_id=claimed.idempotency_key,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        )
    except Exception as exc:  # noqa: BLE001  (any broker failure is a retry later)
        return outbox.Attempt(claimed.id, None, f"publish failed: {type(exc).__name__}")
    return outbox.Attempt(claimed.id, 200)


def send(app: Any, settings: EventsSettings, batch: list[outbox.Claimed]) -> list[outbox.Attempt]:
    def one(c: outbox.Claimed) -> outbox.Attempt:
        sub = settings.subscriber(c.subscriber)
        if sub is None:
            return outbox.Attempt(c.id, None, "subscriber removed from events.subscribers")
        if sub.kind == "celery":
            return publish_task(app, sub, c)
        return post_webhook(sub, c, settings.timeout_seconds)

    with ThreadPoolExecutor(max_workers=min(settings.concurrency, len(batch))) as pool:
        return list(pool.map(one, batch))


@shared_task(bind=True, base=CertqueueTask, name="certqueue.events.deliver")
def deliver(self: CertqueueTask, _transient: int = 0) -> Any:
    """Send due deliveries: claim (commit), send (no transaction), record (commit)."""
    settings = get_settings().events
    with session_scope() as session:
        batch = outbox.claim(session, utcnow(), settings)
    if not batch:
        return {"sent": 0}
    attempts = send(self.app, settings, batch)
    counts: dict[str, int] = {}
    with session_scope() as session:
        now = utcnow()
        for c, a in zip(batch, attempts, strict=True):
            outcome = outbox.finish(session, c, a, now, settings)
            counts[outcome.value] = counts.get(outcome.value, 0) + 1
    if counts.get("dead"):
        log.warning(
            "events: %d deliveries became dead letters (certqueue events list --dead)", counts["dead"]
        )
    return {"sent": len(batch), **counts}


def _expiring_step(ctx: StepContext) -> dict[str, Any]:
    """Record ``expiring`` once per issuance that crossed its "expiring soon" threshold."""
    session = ctx.session
    monitoring = get_settings().monitoring
    now = utcnow()
    horizon = now + dt.timedelta(days=monitoring.alert_threshold_days)
    rows = session.execute(
        select(Certificate.id, Issuance.id, Issuance.not_before, Issuance.not_after)
        .join(Issuance, Issuance.id == Certificate.current_issuance_id)
        .where(
            Certificate.state.in_([State.ACTIVE, State.RENEWING]),
            Certificate.not_after.is_not(None),
            Certificate.not_after <= horizon,
            Issuance.not_after > now,
        )
        .limit(1000)
    ).all()
    due = [
        (cid, iid, not_after)
        for cid, iid, not_before, not_after in rows
        if not_after - now <= expiring_threshold(not_after - not_before, monitoring)
    ]
    if not due:
        return {"expiring": 0}
    seen = set(
        session.execute(
            select(Event.reason).where(
                Event.kind == "expiring",
                Event.certificate_id.in_([cid for cid, _, _ in due]),
                Event.reason.in_([f"issuance:{iid}" for _, iid, _ in due]),
            )
        ).scalars()
    )
    recorded = 0
    for cid, iid, not_after in due:
        if f"issuance:{iid}" in seen:
            continue
        events.record(
            session,
            cid,
            "expiring",
            reason=f"issuance:{iid}",
            actor="scan",
            data={"issuance": iid, "not_after": not_after.isoformat().replace("+00:00", "Z")},
        )
        recorded += 1
    return {"expiring": recorded}


@shared_task(bind=True, base=CertqueueTask, name="certqueue.events.expiring")
def expiring(self: CertqueueTask, _transient: int = 0) -> Any:
    return self.run_step(_expiring_step)
