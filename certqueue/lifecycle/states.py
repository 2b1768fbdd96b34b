"""The lifecycle state machine of the guide. Owns ``certificates.state``; nothing else writes it.

Only the guide's transitions are allowed. Every transition writes an ``events`` row in the same
transaction, so the audit log and the state can never disagree.

A failed renewal goes RENEWING -> ACTIVE: the old issuance keeps serving (it never stopped) and the
next attempt is scheduled; the event says why.

EXPIRED is what every certificate past its served notAfter shows, whatever it was doing: an ACTIVE
one, and a RENEWING one whose renewal did not finish in time. That renewal goes on (an EXPIRED
certificate with ``work_deadline`` set is one whose renewal is in flight, see
:func:`renewal_in_flight`): when its issuance is served the certificate goes EXPIRED -> ACTIVE; when
it fails for good the certificate stays EXPIRED (nothing valid is served any more).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from certqueue.errors import InvalidTransition
from certqueue.models import Certificate, Event, State, utcnow

TRANSITIONS: dict[State, frozenset[State]] = {
    State.REQUESTED: frozenset({State.ISSUING}),
    State.ISSUING: frozenset({State.ISSUED, State.FAILED}),
    State.ISSUED: frozenset({State.ACTIVE}),
    State.ACTIVE: frozenset({State.RENEWING, State.REVOKED, State.EXPIRED}),
    State.RENEWING: frozenset({State.ACTIVE, State.EXPIRED}),
    State.REVOKED: frozenset(),
    # only the renewal that was in flight when the certificate expired moves it on
    State.EXPIRED: frozenset({State.ACTIVE}),
    State.FAILED: frozenset({State.REQUESTED}),
}

TERMINAL = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)
#: states in which a renewal may be working (EXPIRED only while :func:`renewal_in_flight`)
RENEWAL_STATES = (State.RENEWING, State.EXPIRED)


def renewal_in_flight(state: str | State, work_deadline: object | None) -> bool:
    """Whether a renewal is working on a certificate in ``state``: RENEWING always; EXPIRED when the
    renewal that was in flight at expiry has not finished (the pipeline keeps ``work_deadline`` set
    while it works and clears it when the work ends, by success or for good)."""
    return State(state) == State.RENEWING or (State(state) == State.EXPIRED and work_deadline is not None)


def in_pipeline(state: str | State, work_deadline: object | None) -> bool:
    """Whether the issuance pipeline may act on a certificate: ISSUING, or a renewal in flight."""
    return State(state) == State.ISSUING or renewal_in_flight(state, work_deadline)


def can_transition(src: str | State, dst: str | State) -> bool:
    return State(dst) in TRANSITIONS[State(src)]


def active_on_issue(propagation_strategy: str, has_regions: bool) -> bool:
    """Whether a new issuance is ACTIVE (served, renewal scheduled) as soon as it is stored.

    ``sync`` (the default): only once every required region holds it; without regions at once.
    ``async``: at once, and the regions are deployed to afterwards (a failed region is retried
    without holding the certificate back; ``certqueue_deployments`` shows what is pending).
    """
    if propagation_strategy not in ("sync", "async"):
        raise ValueError(f"unknown propagation strategy {propagation_strategy!r}")
    return not has_regions or propagation_strategy == "async"


def deployable(state: str | State, pending_issuance_id: int | None) -> bool:
    """Whether a certificate has something to deploy: not REVOKED or FAILED, and EXPIRED only with
    the issuance of the renewal that was in flight when it expired."""
    if State(state) in (State.REVOKED, State.FAILED):
        return False
    return State(state) != State.EXPIRED or pending_issuance_id is not None


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
    return ev
