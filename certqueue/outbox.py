"""The outbox of lifecycle events. Owns ``event_deliveries``; nothing else writes it.

``stage`` runs inside the transaction that writes an audit event (``certqueue.events``):
an announced event gets one delivery row per subscriber that wants it, committed with the change
itself or not at all. The delivery task (``certqueue.tasks.events``) then works in three steps, none
holding a row lock across a remote call:

1. ``claim``: due rows (``pending``, ``next_attempt_at`` passed) are leased by moving
   ``next_attempt_at`` forward by ``events.lease_seconds`` (SKIP LOCKED on PostgreSQL) and counting
   the attempt; commit. A worker killed while sending leaves the row due again when the lease ends.
2. send, outside any transaction;
3. ``finish``: delivered, retried later, or dead (the dead-letter record), decided by
   ``certqueue.lifecycle.events_out.after_attempt``.

Delivery is at least once: a receiver that processed an event but whose answer was lost sees it
again, with the same ``idempotency_key``.
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from certqueue.config import EventsSettings, get_settings
from certqueue.db import is_postgres
from certqueue.errors import InvalidInput
from certqueue.lifecycle import events_out
from certqueue.models import Certificate, Event, EventDelivery, utcnow

#: the body's schema version (a receiver checks it before reading the rest)
BODY_VERSION = 1


def stage(session: Session, ev: Event, settings: EventsSettings | None = None) -> list[EventDelivery]:
    """Queue ``ev`` for every subscriber that wants it, in the caller's transaction."""
    subscribers = (settings or get_settings().events).subscribers
    if not subscribers:
        return []
    event_type = events_out.public_event(ev.kind, ev.from_state, ev.to_state, ev.reason)
    if event_type is None:
        return []
    data = {k: v for k, v in (ev.data or {}).items() if k in events_out.PUBLIC_DATA_KEYS}
    if event_type in ("failed", "revoked") and ev.reason and "reason" not in data:
        data["reason"] = ev.reason
    if event_type == "failed":
        data["stage"] = {"transition": "issue"}.get(ev.kind, ev.kind)
    rows = []
    for sub in subscribers:
        if not events_out.wants(sub.events, event_type):
            continue
        row = EventDelivery(
            event=ev,
            subscriber=sub.name,
            event_type=event_type,
            certificate_id=ev.certificate_id,
            idempotency_key=f"evt_{secrets.token_hex(16)}",
            data=data,
            occurred_at=ev.at or utcnow(),
            status="pending",
            attempts=0,
            next_attempt_at=utcnow(),
        )
        session.add(row)
        rows.append(row)
    return rows


@dataclass(frozen=True)
class Claimed:
    """What the sender needs, read while the lease was taken (no ORM object leaves the session)."""

    id: int
    subscriber: str
    idempotency_key: str
    attempts: int
    body: dict[str, Any]


def body_of(row: EventDelivery, domains: list[str] | None) -> dict[str, Any]:
    """The event as the receiver sees it; the same on every attempt."""
    return {
        "version": BODY_VERSION,
        "id": row.idempotency_key,
        "type": f"certificate.{row.event_type}",
        "occurred_at": row.occurred_at.isoformat().replace("+00:00", "Z"),
        "sequence": row.event_id,
        "certificate_id": row.certificate_id,
        "domains": list(domains or []),
        "data": dict(row.data or {}),
    }


def claim(session: Session, now: dt.datetime, settings: EventsSettings) -> list[Claimed]:
    """Lease up to ``batch_size`` due deliveries; the caller commits before sending."""
    stmt = (
        select(EventDelivery)
        .where(EventDelivery.status == "pending", EventDelivery.next_attempt_at <= now)
        .order_by(EventDelivery.next_attempt_at, EventDelivery.id)
        .limit(settings.batch_size)
    )
    if is_postgres(session):
        stmt = stmt.with_for_update(skip_locked=True)
    rows = list(session.execute(stmt).scalars())
    if not rows:
        return []
    cert_ids = {r.certificate_id for r in rows if r.certificate_id}
    domains = {
        cid: list(d)
        for cid, d in session.execute(
            select(Certificate.id, Certificate.domains).where(Certificate.id.in_(cert_ids))
        )
    }
    lease_end = now + dt.timedelta(seconds=settings.lease_seconds)
    out = []
    for r in rows:
        r.attempts += 1
        r.next_attempt_at = lease_end
        out.append(
            Claimed(
                id=r.id,
                subscriber=r.subscriber,
                idempotency_key=r.idempotency_key,
                attempts=r.attempts,
                body=body_of(r, domains.get(r.certificate_id or "")),
            )
        )
    return out


@dataclass(frozen=True)
class Attempt:
    """The answer to one send: ``status`` None when there was none (network, broker)."""

    delivery_id: int
    status: int | None
    error: str | None = None
    retry_after: float | None = None


def finish(
    session: Session, claimed: Claimed, attempt: Attempt, now: dt.datetime, settings: EventsSettings
) -> events_out.Outcome:
    """Record one attempt's outcome; a row redelivered by hand meanwhile is left alone."""
    row = session.get(EventDelivery, claimed.id)
    if row is None or row.status != "pending" or row.attempts != claimed.attempts:
        return events_out.Outcome.RETRY
    if settings.subscriber(row.subscriber) is None:
        decision = events_out.Decision(events_out.Outcome.DEAD)
        attempt = Attempt(attempt.delivery_id, attempt.status, "subscriber removed from events.subscribers")
    else:
        decision = events_out.after_attempt(
            attempt.status,
            row.attempts,
            max_attempts=settings.max_attempts,
            initial=settings.retry_initial_seconds,
            cap=settings.retry_max_seconds,
            retry_after=attempt.retry_after,
        )
    row.last_status = attempt.status
    row.last_error = (attempt.error or "")[:512] or None
    if decision.outcome is events_out.Outcome.DELIVERED:
        row.status = "delivered"
        row.delivered_at = now
        row.last_error = None
    elif decision.outcome is events_out.Outcome.DEAD:
        row.status = "dead"
    else:
        row.next_attempt_at = now + dt.timedelta(seconds=decision.delay)
    return decision.outcome


def redeliver(session: Session, *, ids: list[int] | None = None, dead: bool = False) -> int:
    """Make dead letters (or the given deliveries) due again with a fresh attempt count."""
    if not ids and not dead:
        raise InvalidInput("name deliveries by id, or choose every dead letter", field="ids")
    stmt = update(EventDelivery).where(EventDelivery.status.in_(["dead", "pending"]))
    if ids:
        stmt = stmt.where(EventDelivery.id.in_(ids))
    if dead:
        stmt = stmt.where(EventDelivery.status == "dead")
    result = session.execute(
        stmt.values(status="pending", attempts=0, next_attempt_at=utcnow()).execution_options(
            synchronize_session=False
        )
    )
    return int(getattr(result, "rowcount", 0) or 0)
