"""Removal of deployed copies (``Target.remove``) of revoked and deleted certificates.

Owns the progress of ``remove`` intents (recorded by ``certqueue.removals``) and the ``removed``
status of deployment rows. Dispatch sends ``certqueue.removal.start`` for an open remove intent; it
replaces itself with a chord: one ``certqueue.removal.remove`` per region on that region's own
queue (only its pool holds the credentials) and ``certqueue.removal.record`` as the body. Each
region's call returns its outcome (errors are caught and returned, and recorded as ``removal``
events), so the body sees every region; it closes the intent when every copy is gone, or puts it
back to wait in the database with the deploys' backoff (``lifecycle.removal.after_attempt``).
The certificate row may be gone (deleted): everything needed is in the intent.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import chord, shared_task
from sqlalchemy import select

from certqueue import events, intents
from certqueue.brokerstate import region_queue
from certqueue.config import get_settings
from certqueue.db import is_postgres
from certqueue.errors import CertqueueError
from certqueue.lifecycle.removal import after_attempt
from certqueue.models import Deployment, Intent, utcnow
from certqueue.targets.base import load_target
from certqueue.tasks.base import CertqueueTask, StepContext

log = logging.getLogger("certqueue.removal")


def _open_intent(ctx: StepContext, intent_id: Any, *, lock: bool = False) -> Intent | None:
    if not isinstance(intent_id, int) or isinstance(intent_id, bool):
        return None
    stmt = select(Intent).where(Intent.id == intent_id)
    if lock and is_postgres(ctx.session):
        stmt = stmt.with_for_update()
    intent = ctx.session.execute(stmt).scalar_one_or_none()
    if intent is None or intent.kind != "remove" or intent.status not in intents.OPEN:
        return None
    return intent


def _start_step(ctx: StepContext, job: dict[str, Any]) -> dict[str, Any]:
    intent = _open_intent(ctx, job.get("intent"))
    if intent is None or intent.certificate_id != job.get("certificate_id"):
        # only a recorded request removes anything: a message alone is not one
        return {"certificate_id": job.get("certificate_id"), "status": "refused"}
    targets = dict((intent.params or {}).get("targets") or {})
    known = {r.name for r in get_settings().multi_region.regions}
    gone = sorted(r for r in targets if r not in known)
    for region in gone:  # removed from the settings since: no worker holds its credentials
        events.record(
            ctx.session,
            intent.certificate_id,
            "removal",
            reason="skipped",
            data={"region": region, "reason": "region not configured"},
        )
        del targets[region]
    if gone:
        intent.params = {**(intent.params or {}), "targets": targets}
    if not targets:
        intents.complete(ctx.session, intent.certificate_id, ("remove",), outcome="removed")
        return {"certificate_id": intent.certificate_id, "status": "removed"}
    header = [remove.si(intent.id, r).set(queue=region_queue(r)) for r in sorted(targets)]
    ctx.replace(chord(header, record.s(intent.id)))
    return {"certificate_id": intent.certificate_id, "status": "removing", "regions": sorted(targets)}


@shared_task(bind=True, base=CertqueueTask, name="certqueue.removal.start", ignore_result=True)
def start(self: CertqueueTask, job: dict[str, Any], _transient: int = 0) -> Any:
    """``{"certificate_id": ..., "intent": id}``: sent by dispatch for an open remove intent."""
    return self.run_step(_start_step, job)


def _remove_step(ctx: StepContext, intent_id: int, region: str) -> dict[str, Any]:
    intent = _open_intent(ctx, intent_id)
    if intent is None:
        return {"region": region, "status": "noop"}
    entry = ((intent.params or {}).get("targets") or {}).get(region)
    if not entry or not entry.get("ref"):
        return {"region": region, "status": "absent"}
    cid = intent.certificate_id
    why = (intent.params or {}).get("why")
    provider = str(entry.get("provider") or "")
    try:
        reg = get_settings().region(region)
        load_target(reg.target, reg.target_settings()).remove(str(entry["ref"]))
    except CertqueueError as exc:
        reason = exc.reason
    except Exception as exc:  # noqa: BLE001  (an SDK's own error: the region is retried, not lost)
        reason = f"{provider or 'target'}:{type(exc).__name__}"
    else:
        d = ctx.session.execute(
            select(Deployment).where(Deployment.certificate_id == cid, Deployment.region == region)
        ).scalar_one_or_none()
        if d is not None and d.remote_ref == entry["ref"]:
            d.status = "removed"
            d.fingerprint = None
            d.last_error = None
            d.updated_at = utcnow()
        events.record(ctx.session, cid, "removal", reason="success", data={"region": region, "why": why})
        return {"region": region, "status": "removed"}
    log.warning("removal of %s from %s failed: %s", cid, region, reason)
    events.record(
        ctx.session, cid, "removal", reason="failure", data={"region": region, "why": why, "reason": reason}
    )
    return {"region": region, "status": "failed", "reason": reason}


@shared_task(bind=True, base=CertqueueTask, name="certqueue.removal.remove")
def remove(self: CertqueueTask, intent_id: int, region: str, _transient: int = 0) -> Any:
    """Runs on ``propagate.<region>``: ``Target.remove`` of the copy the intent names there."""
    return self.run_step(_remove_step, intent_id, region)


def _record_step(ctx: StepContext, results: Any, intent_id: int) -> dict[str, Any]:
    intent = _open_intent(ctx, intent_id, lock=True)
    if intent is None:
        return {"intent": intent_id, "status": "noop"}
    now = utcnow()
    rows = [r for r in (results or []) if isinstance(r, dict)]
    left, retry_at = after_attempt((intent.params or {}).get("targets") or {}, rows, now)
    intent.params = {**(intent.params or {}), "targets": left}
    if retry_at is None:
        intents.complete(ctx.session, intent.certificate_id, ("remove",), outcome="removed")
        return {"intent": intent.id, "status": "removed"}
    # the rest waits in the database; dispatch sends it again when its time comes
    intent.status = "pending"
    intent.not_before = retry_at
    intent.deadline = None
    intent.updated_at = now
    ctx.wake((retry_at - now).total_seconds() + 0.2)
    return {"intent": intent.id, "status": "retrying", "regions": sorted(left), "at": retry_at.isoformat()}


@shared_task(bind=True, base=CertqueueTask, name="certqueue.removal.record", ignore_result=True)
def record(self: CertqueueTask, results: Any, intent_id: int, _transient: int = 0) -> Any:
    return self.run_step(_record_step, results, intent_id)
