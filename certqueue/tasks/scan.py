"""The ``scan`` queue, driven by beat: dispatch (the heartbeat), expiry, the reconciler, drift, ARI.

Owns ACTIVE/RENEWING -> EXPIRED. Dispatch (``certqueue.dispatch``) owns the claims: pending intents and due
renewals, only up to capacity, with SKIP LOCKED on PostgreSQL through the ``(state, renew_at)``
index. Beat runs it every few seconds, and every finished certificate nudges it (top-up), so new
work starts as soon as there is room and never waits in the broker.

The database is the truth and the broker is not: the reconciler resends the next step of work
whose message was lost (a Redis restart, a flushed queue), found by ``work_deadline`` in the past;
an intent whose message was lost is claimed again by dispatch once its lease ends.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any, cast

from celery import group, shared_task
from sqlalchemy import CursorResult, delete, select
from sqlalchemy.orm import Session

from certqueue import dispatch as dispatching
from certqueue import intents
from certqueue.config import get_settings
from certqueue.db import is_postgres
from certqueue.models import Certificate, Challenge, Http01Token, Intent, Issuance, Order, State, utcnow
from certqueue.tasks.base import CertqueueTask, StepContext
from certqueue.tasks.pipeline import task

log = logging.getLogger("certqueue.scan")

ENQUEUE_CHUNK = 200
#: certificates moved to EXPIRED per run (the oldest first; the next run takes the rest)
EXPIRE_BATCH = 1000
#: kombu's Redis transport serves priority 0 before 3, 6 and 9 within one queue
NEW_WORK_PRIORITY = 6


def claim_due(session: Session, now: dt.datetime, limit: int) -> list[str]:
    """Move up to ``limit`` due ACTIVE certificates to RENEWING (any CA); returns their ids."""
    return dispatching.claim_due(
        session, now, None, limit, lease=get_settings().automation.stuck_after_seconds
    )


def _dispatch_step(ctx: StepContext, batch: int | None = None) -> dict[str, Any]:
    settings = get_settings()
    claimed = dispatching.run(ctx.session, settings, utcnow(), batch=batch)
    starts = [job for name, job in claimed.sends if name == "certqueue.acme.start"]
    deploys = [job for name, job in claimed.sends if name == "certqueue.propagate.start"]
    size = settings.automation.batch_size
    batched = ("certqueue.acme.start", "certqueue.propagate.start")
    sigs = [task(name, job) for name, job in claimed.sends if name not in batched]
    sigs += [
        task("certqueue.propagate.start_batch", deploys[i : i + size]) for i in range(0, len(deploys), size)
    ]
    # new orders at a lower priority than everything else on the acme queue: the steps that close
    # orders already open (validate, DNS-01 chord bodies, revocations) are served first (Redis)
    sigs += [
        task("certqueue.acme.issue_batch", starts[i : i + size], priority=NEW_WORK_PRIORITY)
        for i in range(0, len(starts), size)
    ]
    for i in range(0, len(sigs), ENQUEUE_CHUNK):
        ctx.then(group(sigs[i : i + ENQUEUE_CHUNK]))
    if claimed.intents + claimed.due >= (batch or settings.automation.scan_batch_size):
        # the batch limit, not the work, ended this run: another run claims the rest at once,
        # without waiting for a finished batch's nudge or beat's next heartbeat
        ctx.nudge = True
    return {"intents": claimed.intents, "claimed": claimed.due, "deferred": claimed.deferred}


@shared_task(bind=True, base=CertqueueTask, name="certqueue.scan.dispatch")
def dispatch(self: CertqueueTask, _transient: int = 0) -> Any:
    """Claim what may run now (intents, then due renewals) and send it."""
    return self.run_step(_dispatch_step)


def _due_step(ctx: StepContext, limit: int | None = None) -> dict[str, Any]:
    return _dispatch_step(ctx, limit)


@shared_task(bind=True, base=CertqueueTask, name="certqueue.scan.due")
def due(self: CertqueueTask, limit: int | None = None, _transient: int = 0) -> Any:
    return self.run_step(_due_step, limit)


def _expire_step(ctx: StepContext) -> dict[str, Any]:
    """Every served certificate past its notAfter shows EXPIRED: ACTIVE ones (nothing more to do)
    and RENEWING ones, whose renewal goes on (``work_deadline`` stays set; see
    ``lifecycle.states.renewal_in_flight``)."""
    from certqueue import events

    now = utcnow()
    stmt = (
        select(Certificate)
        .join(Issuance, Issuance.id == Certificate.current_issuance_id)
        .where(Certificate.state.in_([State.ACTIVE, State.RENEWING]), Issuance.not_after <= now)
        .order_by(Issuance.not_after)
        .limit(EXPIRE_BATCH)
    )
    if is_postgres(ctx.session):
        stmt = stmt.with_for_update(skip_locked=True, of=Certificate)
    rows = ctx.session.execute(stmt).scalars().all()
    renewing = 0
    for cert in rows:
        cert.renew_at = None
        in_flight = cert.state == State.RENEWING
        if in_flight:
            renewing += 1
        else:
            cert.work_deadline = None  # nothing is working on it (a region retry ends with it)
        events.transition(
            ctx.session,
            cert,
            State.EXPIRED,
            reason="not_after passed",
            actor="scan",
            data={"renewal_in_flight": in_flight},
        )
    return {"expired": len(rows), "renewing": renewing}


@shared_task(bind=True, base=CertqueueTask, name="certqueue.scan.expire")
def expire(self: CertqueueTask, _transient: int = 0) -> Any:
    return self.run_step(_expire_step)


def _reconcile_step(ctx: StepContext) -> dict[str, Any]:
    """Resend the next step of work past its deadline; clean up leftovers of finished orders."""
    session = ctx.session
    settings = get_settings()
    now = utcnow()
    deadline = now + dt.timedelta(seconds=settings.automation.stuck_after_seconds)
    stuck = (
        session.execute(
            select(Certificate)
            .where(
                # EXPIRED with a deadline: the renewal in flight when it expired
                Certificate.state.in_(
                    [State.REQUESTED, State.ISSUING, State.RENEWING, State.ISSUED, State.EXPIRED]
                ),
                Certificate.work_deadline.is_not(None),
                Certificate.work_deadline <= now,
            )
            .limit(settings.automation.scan_batch_size)
        )
        .scalars()
        .all()
    )
    resumed = 0
    for cert in stuck:
        cert.work_deadline = deadline
        job = {"certificate_id": cert.id}
        renewing = cert.state in (State.RENEWING, State.EXPIRED)
        if cert.state == State.ISSUED or (renewing and cert.pending_issuance_id):
            ctx.then(task("certqueue.propagate.start", job))
        elif renewing:
            ctx.then(task("certqueue.acme.start", {**job, "purpose": "renew"}))
        elif cert.state == State.REQUESTED:
            intents.record(session, "issue", cert.id, actor="reconciler")
            ctx.nudge = True
        else:
            ctx.then(task("certqueue.acme.start", {**job, "purpose": "issue"}))
        resumed += 1
    # REQUESTED rows with no open intent (written by an older version, or an intent closed by hand)
    has_intent = select(Intent.id).where(
        Intent.certificate_id == Certificate.id, Intent.status.in_(intents.OPEN)
    )
    orphans = (
        session.execute(
            select(Certificate)
            .where(
                Certificate.state == State.REQUESTED,
                Certificate.work_deadline.is_(None),
                ~has_intent.exists(),
                Certificate.created_at <= now - dt.timedelta(seconds=settings.automation.stuck_after_seconds),
            )
            .limit(500)
        )
        .scalars()
        .all()
    )
    for cert in orphans:
        intents.record(session, "issue", cert.id, actor="reconciler")
        ctx.nudge = True
        resumed += 1
    if orphans or stuck:
        ctx.nudge = True
    # challenges left presented by finished orders
    leftovers = (
        session.execute(
            select(Challenge)
            .join(Order, Order.id == Challenge.order_id)
            .where(
                Order.status.in_(["valid", "invalid", "abandoned"]),
                Challenge.status.not_in(["cleaned"]),
                Challenge.error.is_(None),
                Challenge.updated_at <= now - dt.timedelta(seconds=settings.automation.stuck_after_seconds),
            )
            .limit(500)
        )
        .scalars()
        .all()
    )
    records: dict[str, list[int]] = {}
    for ch in leftovers:
        if ch.type == "dns-01":
            records.setdefault(ch.certificate_id, []).append(ch.id)
        else:
            ch.status = "cleaned"
            ch.cleaned_at = now
    if records:  # one dns task removes them all
        items = [{"certificate_id": cid, "challenges": ids} for cid, ids in records.items()]
        ctx.then(task("certqueue.dns.cleanup_batch", items))
    expired = delete(Http01Token).where(Http01Token.expires_at <= now)
    tokens = cast(CursorResult[Any], session.execute(expired))
    from certqueue import challenge_tokens

    challenge_tokens.remove_expired(session, now)
    return {"resumed": resumed, "cleanups": len(leftovers), "expired_tokens": tokens.rowcount or 0}


@shared_task(bind=True, base=CertqueueTask, name="certqueue.scan.reconcile")
def reconcile(self: CertqueueTask, _transient: int = 0) -> Any:
    return self.run_step(_reconcile_step)


def _drift_step(ctx: StepContext) -> dict[str, Any]:
    """One drift check per region, on the region's own queue (its pool holds the credentials);
    each goes on from the region's cursor (``certqueue.tasks.drift``)."""
    from certqueue.brokerstate import region_queue

    regions = [r.name for r in get_settings().multi_region.regions]
    if regions:
        ctx.then(group([task("certqueue.drift.check", r).set(queue=region_queue(r)) for r in regions]))
    return {"regions": regions}


@shared_task(bind=True, base=CertqueueTask, name="certqueue.scan.drift")
def drift(self: CertqueueTask, _transient: int = 0) -> Any:
    return self.run_step(_drift_step)


ARI_BATCH = 100


def store_ari_window(cert: Certificate, info: Any) -> None:
    """Keep the CA's suggested window (a ``RenewalInfo``, or None: the CA has no ARI) so the
    inventory shows why ``renew_at`` is where it is."""
    cert.ari_window_start = info.window_start if info is not None else None
    cert.ari_window_end = info.window_end if info is not None else None
    url = info.explanation_url if info is not None else None
    cert.ari_explanation_url = url[:512] if url else None


def _ari_step(ctx: StepContext) -> dict[str, Any]:
    """Refresh ACME Renewal Information (RFC 9773) for certificates whose check is due.

    A CA without ARI: the lifetime rule's ``renew_at`` stays and the certificate is not asked again.
    With ARI: renew at a random moment inside the suggested window (now, if the window is past: a
    revocation or an incident), and ask again after the server's Retry-After.
    """
    import random

    from certqueue.acme.accounts import client_for
    from certqueue.acme.ari import AriUnavailable, fetch_renewal_info, renewal_info_url
    from certqueue.lifecycle.ari_policy import choose_renewal_time, next_ari_check

    session = ctx.session
    now = utcnow()
    stmt = (
        select(Certificate)
        .where(Certificate.state == State.ACTIVE, Certificate.ari_next_check_at <= now)
        .order_by(Certificate.ari_next_check_at)
        .limit(ARI_BATCH)
    )
    if is_postgres(session):
        stmt = stmt.with_for_update(skip_locked=True, of=Certificate)
    rng = random.Random()
    counts = {"checked": 0, "no_ari": 0, "moved": 0, "unavailable": 0}
    for cert in session.execute(stmt).scalars().all():
        iss = session.get(Issuance, cert.current_issuance_id) if cert.current_issuance_id else None
        if iss is None or not iss.ari_cert_id:
            cert.ari_next_check_at = None
            store_ari_window(cert, None)
            continue
        client, _ = client_for(session, cert.directory_url, cert.email)
        url = renewal_info_url(client.directory, iss.ari_cert_id)
        counts["checked"] += 1
        if url is None:
            cert.ari_next_check_at = None
            store_ari_window(cert, None)
            counts["no_ari"] += 1
            continue
        try:
            info = fetch_renewal_info(client, url, now=now)
        except AriUnavailable as exc:
            cert.ari_next_check_at = now + dt.timedelta(seconds=exc.retry_after or 6 * 3600)
            counts["unavailable"] += 1
            continue
        store_ari_window(cert, info)
        when = choose_renewal_time(info, now, rng)
        if cert.renew_at is None or when != cert.renew_at:
            cert.renew_at = when
            counts["moved"] += 1
        cert.ari_next_check_at = next_ari_check(info, now)
    return counts


@shared_task(bind=True, base=CertqueueTask, name="certqueue.scan.ari")
def ari(self: CertqueueTask, _transient: int = 0) -> Any:
    return self.run_step(_ari_step)
