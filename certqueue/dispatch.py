"""Dispatch: claim the work that may run now, and only that much. Owns the move of intents to
``dispatched`` and decides which due ACTIVE certificates move to RENEWING (the move and its events
are written by ``certqueue.events.claim_renewals``).

Inputs are gathered here (in-flight work per CA, the acme queue's depth including messages reserved
or unacknowledged by workers, what is waiting); the decision is ``lifecycle.dispatch.claimable``;
the claims use SKIP LOCKED on PostgreSQL. What does not fit stays in the database with no message.
The caller (the ``certqueue.scan.dispatch`` task) sends the pipeline tasks by name after commit.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from certqueue import events, intents
from certqueue.config import Settings
from certqueue.db import is_postgres
from certqueue.lifecycle.dispatch import claimable, queue_room
from certqueue.models import Certificate, Intent, State

log = logging.getLogger("certqueue.dispatch")

#: states whose certificates hold (or are about to hold) an order at their CA
IN_FLIGHT = (State.ISSUING, State.RENEWING)
#: intents that start an order, limited by the per-CA cap; the others are not
ORDER_KINDS = ("issue", "renew")
OTHER_KINDS = ("revoke", "propagate", "remove")


@dataclass
class Claimed:
    """What one dispatch claimed: (task name, payload) pairs to send after the commit."""

    sends: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    intents: int = 0
    due: int = 0
    deferred: int = 0


def in_flight_by_ca(session: Session, now: dt.datetime) -> dict[str, int]:
    """Certificates working toward an order per CA: ISSUING, or RENEWING without a finished issuance
    waiting for propagation, and those whose issue or renew intent was just dispatched."""
    out: dict[str, int] = {}
    # EXPIRED with a deadline: the renewal that was in flight when it expired (lifecycle.states)
    working = Certificate.state.in_(IN_FLIGHT) | (
        (Certificate.state == State.EXPIRED) & Certificate.work_deadline.is_not(None)
    )
    rows = session.execute(
        select(Certificate.directory_url, func.count())
        .where(working, Certificate.pending_issuance_id.is_(None))
        .group_by(Certificate.directory_url)
    ).all()
    for url, n in rows:
        out[str(url)] = int(n)
    starting = session.execute(
        select(Certificate.directory_url, func.count())
        .select_from(Intent)
        .join(Certificate, Certificate.id == Intent.certificate_id)
        .where(
            Intent.kind.in_(ORDER_KINDS),
            Intent.status == "dispatched",
            Intent.deadline > now,
            Certificate.state.not_in(IN_FLIGHT),
        )
        .group_by(Certificate.directory_url)
    ).all()
    for url, n in starting:
        out[str(url)] = out.get(str(url), 0) + int(n)
    return out


def acme_pressure(settings: Settings) -> int | None:
    """Messages waiting on the acme queue plus those reserved or unacknowledged by workers; None
    when the broker cannot be asked (dispatch then goes by the per-CA caps alone)."""
    from certqueue.brokerstate import queue_depths, redis_client

    depths = queue_depths(settings)
    if depths is None:
        return None
    total = depths.get("acme", 0)
    url = settings.broker.url or ""
    if url.startswith(("redis://", "rediss://")):
        try:
            # the process's one client (a connection pool): dispatch asks on every run
            total += int(redis_client(url).hlen("unacked"))
        except Exception as exc:  # noqa: BLE001  (unknown depth: fall back to what we have)
            log.debug("dispatch: unacked count unavailable (%s)", type(exc).__name__)
    return total


def due(now: dt.datetime) -> tuple[Any, ...]:
    """What makes a certificate due for renewal at ``now``: ACTIVE, renewed automatically, issued
    here (not imported), its renewal time reached (an index range scan on state, renew_at)."""
    return (
        Certificate.state == State.ACTIVE,
        Certificate.renew_at <= now,
        Certificate.auto_renew.is_(True),
        Certificate.external.is_(False),
    )


def due_ids(session: Session, now: dt.datetime, limit: int | None = None) -> list[str]:
    """The certificates due at ``now``, the longest due first."""
    stmt = select(Certificate.id).where(*due(now)).order_by(Certificate.renew_at, Certificate.id)
    return list(session.execute(stmt.limit(limit) if limit is not None else stmt).scalars())


def _wanted_due(session: Session, now: dt.datetime, limit: int) -> dict[str, int]:
    stmt = (
        select(Certificate.directory_url, func.count()).where(*due(now)).group_by(Certificate.directory_url)
    )
    return {str(url): min(int(n), limit) for url, n in session.execute(stmt).all()}


def claim_due(
    session: Session, now: dt.datetime, directory_url: str | None, limit: int, *, lease: float
) -> list[str]:
    """Move up to ``limit`` due ACTIVE certificates (of one CA, or any) to RENEWING; their ids.

    One statement to find (index range scan, SKIP LOCKED), then ``events.claim_renewals``: one to
    update, one for the events.
    """
    if limit <= 0:
        return []
    stmt = select(Certificate.id).where(*due(now))
    if directory_url is not None:
        stmt = stmt.where(Certificate.directory_url == directory_url)
    stmt = stmt.order_by(Certificate.renew_at).limit(limit)
    if is_postgres(session):
        stmt = stmt.with_for_update(skip_locked=True)
    ids = list(session.execute(stmt).scalars())
    if not ids:
        return []
    events.claim_renewals(session, ids, now, work_deadline=now + dt.timedelta(seconds=lease), actor="scan")
    return ids


def run(
    session: Session, settings: Settings, now: dt.datetime, *, due: bool = True, batch: int | None = None
) -> Claimed:
    """One dispatch: revocations and propagations first (no order cap), then issue/renew intents,
    then due renewals, each only up to capacity; at most ``batch`` (the scan batch size) of each."""
    a = settings.automation
    lease = a.stuck_after_seconds
    batch = batch or a.scan_batch_size
    out = Claimed()
    # revocations and propagations: bounded by the batch only (they open no order)
    for intent in intents.claim(session, now, kinds=OTHER_KINDS, limit=batch, lease_seconds=lease):
        out.sends.append(_send_for(intent))
        out.intents += 1
    cap = a.max_orders_in_flight_per_ca
    pressure = acme_pressure(settings)
    room = queue_room(a.max_queue_depth, pressure)
    in_flight = in_flight_by_ca(session, now)
    # issue/renew intents, grouped by the certificate's CA
    waiting = session.execute(
        select(Certificate.directory_url, func.count())
        .select_from(Intent)
        .join(Certificate, Certificate.id == Intent.certificate_id)
        .where(
            Intent.kind.in_(ORDER_KINDS),
            intents.ready(now),
        )
        .group_by(Certificate.directory_url)
    ).all()
    wanted = {str(url): int(n) for url, n in waiting}
    # certificates an intent is about to start are not in flight yet: do not count them twice
    grant = claimable(wanted, in_flight, cap=cap, room=room, batch=batch)
    for url, n in grant.items():
        rows = _claim_order_intents(session, now, url, n, lease)
        for intent in rows:
            out.sends.append(_send_for(intent))
            in_flight[url] = in_flight.get(url, 0) + 1
        out.intents += len(rows)
        if room is not None:
            room -= len(rows)
    out.deferred = sum(wanted.values()) - sum(grant.values())
    if due:
        wanted_due = _wanted_due(session, now, batch)
        grant_due = claimable(wanted_due, in_flight, cap=cap, room=room, batch=max(0, batch - out.intents))
        for url, n in grant_due.items():
            ids = claim_due(session, now, url, n, lease=lease)
            out.sends.extend(
                ("certqueue.acme.start", {"certificate_id": cid, "purpose": "renew"}) for cid in ids
            )
            out.due += len(ids)
    return out


def _claim_order_intents(
    session: Session, now: dt.datetime, directory_url: str, limit: int, lease: float
) -> list[Intent]:
    ids = list(
        session.execute(
            select(Intent.id)
            .join(Certificate, Certificate.id == Intent.certificate_id)
            .where(
                Intent.kind.in_(ORDER_KINDS),
                Certificate.directory_url == directory_url,
                intents.ready(now),
            )
            .order_by(Intent.id)
            .limit(limit)
        ).scalars()
    )
    if not ids:
        return []
    stmt = select(Intent).where(Intent.id.in_(ids))
    if is_postgres(session):
        stmt = stmt.with_for_update(skip_locked=True)
    rows = list(session.execute(stmt).scalars())
    intents.mark_dispatched(rows, now, lease)
    return rows


def _send_for(intent: Intent) -> tuple[str, dict[str, Any]]:
    """The pipeline task that acts on ``intent``."""
    payload: dict[str, Any] = {"certificate_id": intent.certificate_id, "intent": intent.id}
    params = intent.params or {}
    if intent.kind == "issue":
        return "certqueue.acme.start", {**payload, "purpose": "issue"}
    if intent.kind == "renew":
        return "certqueue.acme.start", {
            **payload,
            "purpose": "renew",
            "force": bool(params.get("force")),
            "reason": params.get("reason"),
        }
    if intent.kind == "revoke":
        return "certqueue.acme.revoke", {**payload, "reason": params.get("reason") or "unspecified"}
    if intent.kind == "remove":
        return "certqueue.removal.start", payload
    return "certqueue.propagate.start", {
        **payload,
        **({"regions": params["regions"]} if params.get("regions") else {}),
        **({"force": True} if params.get("force") else {}),
    }
