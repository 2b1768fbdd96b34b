"""The audit log and the state it records. Owns ``certificates.state`` and the ``events`` rows of
certificates; nothing else writes either.

Every move of a certificate's state goes through :func:`transition` (one certificate) or
:func:`claim_renewals` (the dispatcher's bulk ACTIVE -> RENEWING), which check it against the table
in ``certqueue.lifecycle.states`` and write the ``transition`` event in the caller's transaction, so
the audit log and the state can never disagree. Events that are not state changes (renewal outcome,
validation error, propagation, deletion) go through :func:`record`.

A failed renewal goes RENEWING -> ACTIVE: the old issuance keeps serving (it never stopped) and the
next attempt is scheduled; the event says why.

EXPIRED is what every certificate past its served notAfter shows, whatever it was doing: an ACTIVE
one, and a RENEWING one whose renewal did not finish in time. That renewal goes on (an EXPIRED
certificate with ``work_deadline`` set is one whose renewal is in flight, see
``lifecycle.states.renewal_in_flight``): when its issuance is served the certificate goes
EXPIRED -> ACTIVE; when it fails for good the certificate stays EXPIRED.

An event announced to subscribers (``certqueue.lifecycle.events_out``) is staged in the outbox
(``certqueue.outbox``) in the same transaction.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import insert, update
from sqlalchemy.orm import Session

from certqueue import outbox
from certqueue.errors import InvalidTransition
from certqueue.lifecycle.states import State, can_transition
from certqueue.models import Certificate, Event, utcnow


def transition(
    session: Session,
    cert: Certificate,
    dst: State,
    *,
    reason: str | None = None,
    actor: str = "certqueue",
    data: dict[str, Any] | None = None,
) -> Event:
    """Move ``cert`` to ``dst`` and record the event, in the caller's transaction."""
    src = State(cert.state)
    if not can_transition(src, dst):
        raise InvalidTransition(
            f"{cert.id}: {src} -> {dst} is not allowed", reason=f"transition:{src}->{dst}"
        )
    cert.state = dst
    cert.updated_at = utcnow()
    ev = Event(
        certificate_id=cert.id,
        kind="transition",
        from_state=src,
        to_state=dst,
        reason=reason,
        actor=actor,
        data=data,
    )
    session.add(ev)
    outbox.stage(session, ev)  # subscribers hear of it in this same transaction (events out)
    return ev


def record(
    session: Session,
    certificate_id: str | None,
    kind: str,
    *,
    reason: str | None = None,
    actor: str = "certqueue",
    data: dict[str, Any] | None = None,
) -> Event:
    """An event that is not a state change (renewal outcome, validation error, propagation)."""
    ev = Event(certificate_id=certificate_id, kind=kind, reason=reason, actor=actor, data=data)
    session.add(ev)
    outbox.stage(session, ev)
    return ev


def claim_renewals(
    session: Session, ids: Sequence[str], now: dt.datetime, *, work_deadline: dt.datetime, actor: str
) -> None:
    """Move the ACTIVE certificates ``ids`` (already locked by the caller) to RENEWING with their
    ``work_deadline``: one UPDATE and one multi-row INSERT of their events, however many there are.

    The caller selected them ACTIVE and holds their row locks (SKIP LOCKED on PostgreSQL; SQLite has
    one writer). ACTIVE -> RENEWING is announced to no subscriber (``events_out.public_event``), so
    nothing is staged in the outbox.
    """
    if not ids:
        return
    session.execute(
        update(Certificate)
        .where(Certificate.id.in_(ids), Certificate.state == State.ACTIVE)
        .values(state=State.RENEWING, updated_at=now, work_deadline=work_deadline)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        insert(Event),
        [
            {
                "certificate_id": i,
                "at": now,
                "actor": actor,
                "kind": "transition",
                "from_state": State.ACTIVE.value,
                "to_state": State.RENEWING.value,
                "reason": "due",
            }
            for i in ids
        ],
    )
