"""Durable intents: every request (issue, renew, revoke, propagate) is a row, written in the
caller's transaction with the change it asks for. Owns the ``intents`` table.

* :func:`record` is what every face calls (through ``certqueue.operations``): the request is
  durable when the caller commits. A second request of the same kind for the same certificate
  while the first is open returns the first (nothing is written twice).
* :func:`claim` is what dispatch calls: pending intents whose time has come, and dispatched ones
  whose deadline passed (their message was lost or their worker died), locked with SKIP LOCKED so
  two dispatchers never take the same row.
* :func:`complete` is called by the task that acts on an intent, in the same transaction as the
  state change it makes; from then on the certificate's own state carries the work.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import insert, or_, select, update
from sqlalchemy.orm import Session

from certqueue.db import is_postgres
from certqueue.models import Intent, utcnow

#: remove: take a revoked or deleted certificate's copies off its targets (``certqueue.removals``)
KINDS = ("issue", "renew", "revoke", "propagate", "remove")
OPEN = ("pending", "dispatched")


def record(
    session: Session,
    kind: str,
    certificate_id: str,
    params: dict[str, Any] | None = None,
    *,
    actor: str = "certqueue",
    not_before: dt.datetime | None = None,
) -> Intent:
    """The open intent of ``kind`` for the certificate, created if there is none (parameters of a
    newer request win: a forced renewal or a stronger revocation reason is not lost).

    An intent already dispatched has had its parameters read by the step working on it: a request
    that would change them (``force`` on a propagation or renewal in flight) is a new intent of its
    own, not merged into one that can no longer see it; the step closes only the intents it planned
    for (``complete(..., up_to=...)``). A request that changes nothing is covered by the one in
    flight."""
    if kind not in KINDS:
        raise ValueError(f"unknown intent kind {kind!r}")
    now = utcnow()
    stmt = (
        select(Intent)
        .where(Intent.certificate_id == certificate_id, Intent.kind == kind, Intent.status.in_(OPEN))
        .order_by(Intent.id)
    )
    if is_postgres(session):
        # locked: a pending intent that dispatch is claiming right now is seen as dispatched once
        # the claim commits, so a request that changes its parameters becomes an intent of its own
        # instead of being merged into one whose parameters were already read (a forced
        # propagation was lost that way: test_guide_api's forced redeploy never ran)
        stmt = stmt.with_for_update()
    open_ = list(session.execute(stmt).scalars())
    pending = next((i for i in open_ if i.status == "pending"), None)
    if pending is not None:
        if params:
            pending.params = {**(pending.params or {}), **params}
        return pending
    if open_:
        in_flight = open_[0]
        if not any(v and (in_flight.params or {}).get(k) != v for k, v in (params or {}).items()):
            return in_flight
    intent = Intent(
        kind=kind,
        certificate_id=certificate_id,
        params=dict(params or {}),
        status="pending",
        not_before=not_before or now,
        attempts=0,
        actor=actor[:128],
        created_at=now,
        updated_at=now,
    )
    session.add(intent)
    session.flush()
    return intent


def record_many(
    session: Session, kind: str, certificate_ids: Sequence[str], *, actor: str = "certqueue"
) -> int:
    """Bulk intents for certificates just created (no open intent can exist for them yet)."""
    if not certificate_ids:
        return 0
    now = utcnow()
    session.execute(
        insert(Intent),
        [
            {
                "kind": kind,
                "certificate_id": cid,
                "params": {},
                "status": "pending",
                "not_before": now,
                "attempts": 0,
                "actor": actor[:128],
                "created_at": now,
                "updated_at": now,
            }
            for cid in certificate_ids
        ],
    )
    return len(certificate_ids)


def ready(now: dt.datetime) -> Any:
    """The intents that may be dispatched at ``now``: pending and due, or dispatched with their
    lease over (their message was lost or their worker died)."""
    return or_(
        (Intent.status == "pending") & (Intent.not_before <= now),
        (Intent.status == "dispatched") & (Intent.deadline <= now),
    )


def mark_dispatched(rows: Sequence[Intent], now: dt.datetime, lease_seconds: float) -> None:
    deadline = now + dt.timedelta(seconds=lease_seconds)
    for intent in rows:
        intent.status = "dispatched"
        intent.attempts += 1
        intent.deadline = deadline
        intent.updated_at = now


def claim(
    session: Session,
    now: dt.datetime,
    *,
    kinds: Iterable[str],
    limit: int,
    lease_seconds: float,
) -> list[Intent]:
    """Lock and mark dispatched up to ``limit`` intents of ``kinds`` that may run now."""
    if limit <= 0:
        return []
    stmt = select(Intent).where(Intent.kind.in_(list(kinds)), ready(now)).order_by(Intent.id).limit(limit)
    if is_postgres(session):
        stmt = stmt.with_for_update(skip_locked=True)
    rows = list(session.execute(stmt).scalars())
    mark_dispatched(rows, now, lease_seconds)
    return rows


def complete(
    session: Session,
    certificate_id: str,
    kinds: Iterable[str],
    *,
    outcome: str,
    failed: bool = False,
    up_to: int | None = None,
) -> int:
    """Close the certificate's open intents of ``kinds`` (only those up to intent ``up_to`` when
    given: a request made after the work was planned is not covered by it); returns how many."""
    where = [
        Intent.certificate_id == certificate_id,
        Intent.kind.in_(list(kinds)),
        Intent.status.in_(OPEN),
    ]
    if up_to is not None:
        where.append(Intent.id <= up_to)
    return _close(session, where, outcome=outcome, failed=failed)


def _close(session: Session, where: list[Any], *, outcome: str, failed: bool = False) -> int:
    """Close the open intents ``where`` selects, in one UPDATE; returns how many."""
    now = utcnow()
    res = session.execute(
        update(Intent)
        .where(*where)
        .values(status="failed" if failed else "done", outcome=outcome[:512], finished_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(res, "rowcount", 0) or 0)


def complete_many(
    session: Session, certificate_ids: Iterable[str], kinds: Iterable[str], *, outcome: str
) -> int:
    """``complete`` for many certificates at once (one UPDATE): a batch's orders answered together."""
    ids = list(certificate_ids)
    if not ids:
        return 0
    where = [Intent.certificate_id.in_(ids), Intent.kind.in_(list(kinds)), Intent.status.in_(OPEN)]
    return _close(session, where, outcome=outcome)


def closed_among(session: Session, intent_ids: Iterable[Any]) -> set[int]:
    """Which of these intent ids are closed (one SELECT; a value that is not an id is skipped):
    ``_answered`` for a whole batch."""
    ids = [i for i in intent_ids if isinstance(i, int) and not isinstance(i, bool)]
    if not ids:
        return set()
    rows = session.execute(select(Intent.id).where(Intent.id.in_(ids), Intent.status.not_in(OPEN)))
    return set(rows.scalars())


def is_open(session: Session, intent_id: Any, kind: str, certificate_id: str) -> bool:
    """Whether ``intent_id`` is an open intent of ``kind`` for the certificate (what a destructive
    step checks before it acts: a message alone is not a request)."""
    if not isinstance(intent_id, int) or isinstance(intent_id, bool):
        return False
    intent = session.get(Intent, intent_id)
    return (
        intent is not None
        and intent.kind == kind
        and intent.certificate_id == certificate_id
        and intent.status in OPEN
    )


def open_intents(session: Session, certificate_id: str) -> list[Intent]:
    return list(
        session.execute(
            select(Intent)
            .where(Intent.certificate_id == certificate_id, Intent.status.in_(OPEN))
            .order_by(Intent.id)
        ).scalars()
    )


def waiting(session: Session, kinds: Iterable[str], now: dt.datetime) -> int:
    """How many intents of ``kinds`` may run now (for dispatch capacity and metrics)."""
    from sqlalchemy import func

    return int(
        session.execute(
            select(func.count()).select_from(Intent).where(Intent.kind.in_(list(kinds)), ready(now))
        ).scalar_one()
    )
