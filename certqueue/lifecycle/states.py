"""The lifecycle state machine of the guide, as values: the states, the transitions allowed between
them, and what a state means for the pipeline. Pure: it imports nothing of the database, and it writes
nothing. ``certqueue.events`` is the one writer of ``certificates.state`` and of ``events`` rows, and it
refuses any move this table does not allow.

A failed renewal goes RENEWING -> ACTIVE: the old issuance keeps serving (it never stopped) and the
next attempt is scheduled; the event says why.

EXPIRED is what every certificate past its served notAfter shows, whatever it was doing: an ACTIVE
one, and a RENEWING one whose renewal did not finish in time. That renewal goes on (an EXPIRED
certificate with ``work_deadline`` set is one whose renewal is in flight, see
:func:`renewal_in_flight`): when its issuance is served the certificate goes EXPIRED -> ACTIVE; when
it fails for good the certificate stays EXPIRED (nothing valid is served any more).

An event announced to subscribers (``certqueue.lifecycle.events_out``) is staged in the outbox
(``certqueue.outbox``) in the same transaction.
"""

from __future__ import annotations

import enum


class State(enum.StrEnum):
    """The guide's lifecycle states."""

    REQUESTED = "REQUESTED"
    ISSUING = "ISSUING"
    ISSUED = "ISSUED"
    ACTIVE = "ACTIVE"
    RENEWING = "RENEWING"
    REVOKED = "REVOKED"
    EXPIRED = "EXPIRED"
    FAILED = "FAILED"


#: states in which a certificate row is "live" for de-duplication of requests
LIVE_STATES = (State.REQUESTED, State.ISSUING, State.ISSUED, State.ACTIVE, State.RENEWING)

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
