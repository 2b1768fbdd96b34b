"""The lifecycle state machine of the guide. Owns ``certificates.state``; nothing else writes it.

Only the guide's transitions are allowed. Every transition writes an ``events`` row in the same
transaction, so the audit log and the state can never disagree.

A failed renewal goes RENEWING -> ACTIVE: the old issuance keeps serving (it never stopped) and the
next attempt is scheduled; the event says why.

An event announced to subscribers (``certqueue.lifecycle.events_out``) is staged in the outbox
(``certqueue.outbox``) in the same transaction.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from certqueue import outbox
from certqueue.errors import InvalidTransition
from certqueue.models import Certificate, Event, State, utcnow

TRANSITIONS: dict[State, frozenset[State]] = {
    State.REQUESTED: frozenset({State.ISSUING}),
    State.ISSUING: frozenset({State.ISSUED, State.FAILED}),
    State.ISSUED: frozenset({State.ACTIVE}),
    State.ACTIVE: frozenset({State.RENEWING, State.REVOKED, State.EXPIRED}),
    State.RENEWING: frozenset({State.ACTIVE}),
    State.REVOKED: frozenset(),
    State.EXPIRED: frozenset(),
    State.FAILED: frozenset({State.REQUESTED}),
}

TERMINAL = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)


def can_transition(src: str | State, dst: str | State) -> bool:
    return State(dst) in TRANSITIONS[State(src)]


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
