"""Events out: which audit events are announced to subscribers, and what a delivery attempt's
answer means. Pure: no ORM, no I/O (the outbox is ``certqueue.outbox``, the sender
``certqueue.tasks.events``).

The public event types, each announced once per occurrence:

========== =========================================================================
issued     the CA issued a certificate's first issuance (before it is deployed)
renewed    the CA issued a renewal
deployed   one region now serves the new issuance (one event per region)
failed     issuance failed for good, a renewal attempt failed (the old issuance still
           serves), a region's deployment failed for good, or the CA refused a revocation
expiring   an in-service certificate crossed its "expiring soon" threshold (once per issuance)
expired    the served issuance passed not_after
revoked    the CA revoked the served issuance
========== =========================================================================
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from certqueue.lifecycle.backoff import backoff

EVENT_TYPES = ("issued", "renewed", "deployed", "failed", "expiring", "expired", "revoked")

#: keys of an audit event's ``data`` a subscriber may see (never keys, tokens or PEM)
PUBLIC_DATA_KEYS = frozenset({"serial", "region", "reason", "not_after", "issuance"})


def public_event(kind: str, from_state: str | None, to_state: str | None, reason: str | None) -> str | None:
    """The public type of an audit event, or None when it is not announced.

    An issuance failure writes two audit rows (``issuance``/failure and the move to FAILED) and a
    revocation two (``revocation`` and the move to REVOKED): only the transition is announced, so
    each occurrence is one event.
    """
    if kind == "transition":
        return {"FAILED": "failed", "REVOKED": "revoked", "EXPIRED": "expired"}.get(to_state or "")
    if kind == "issuance":
        return "issued" if reason == "success" else None
    if kind == "renewal":
        return {"success": "renewed", "failure": "failed"}.get(reason or "")
    if kind == "propagation":
        return {"success": "deployed", "failure": "failed"}.get(reason or "")
    if kind == "revocation":
        return "failed" if reason == "failure" else None
    if kind == "expiring":
        return "expiring"
    return None


def wants(subscribed: list[str] | tuple[str, ...], event_type: str) -> bool:
    """An empty subscription list means every event type."""
    return not subscribed or event_type in subscribed


class Outcome(enum.StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    DEAD = "dead"


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    #: seconds until the next attempt (RETRY only)
    delay: float = 0.0


#: HTTP answers that say "try again later"; every other 4xx means the receiver refuses this
#: request as it is (a wrong secret, a removed endpoint), and retrying it unchanged cannot help
RETRYABLE_4XX = frozenset({408, 409, 425, 429})
#: the longest Retry-After honoured (seconds): a receiver cannot park a delivery for days
RETRY_AFTER_CAP = 3600.0


def after_attempt(
    status: int | None,
    attempts: int,
    *,
    max_attempts: int,
    initial: float,
    cap: float,
    retry_after: float | None = None,
    jitter: float = 0.2,
) -> Decision:
    """What follows an attempt: ``status`` is the HTTP status (None: no answer, a network error
    or a broker that refused the publish), ``attempts`` counts this one."""
    if status is not None and 200 <= status < 300:
        return Decision(Outcome.DELIVERED)
    permanent = status is not None and 400 <= status < 500 and status not in RETRYABLE_4XX
    if permanent or attempts >= max_attempts:
        return Decision(Outcome.DEAD)
    floor = min(retry_after, RETRY_AFTER_CAP) if retry_after is not None and retry_after > 0 else None
    return Decision(
        Outcome.RETRY, backoff(attempts, initial=initial, cap=cap, jitter=jitter, retry_after=floor)
    )
