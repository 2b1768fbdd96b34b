"""Drift: does each target still serve what we deployed there? Runs on each region's own queue.

Owns ``drift_cursors``. Beat's ``certqueue.scan.drift`` sends one ``certqueue.drift.check`` per
configured region to ``propagate.<region>`` (only that pool holds the region's credentials). A check
walks the region's deployed copies in id order from the region's cursor, a batch at a time (at most
``multi_region.drift_batch_size`` rows, within ``drift_time_budget_seconds``), and asks the target
for the fingerprint live at each reference. A copy that differs (or is gone) is marked pending and
redeployed through a forced propagate intent for that region. Errors are recorded as
``drift_error`` events (one per region and reason per run, with a count) and served as
``certqueue_drift_errors_total``; credentials or settings that fail every call end the run with the
cursor left where it was (``lifecycle.drift``). No row lock is held while the target is asked: the
rows are read, the remote calls made, and only then are the drifted rows and the cursor written
(the cursor by compare-and-set, so two overlapping checks of one region advance it once).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import shared_task
from sqlalchemy import select, update

from certqueue import events, intents
from certqueue.config import get_settings
from certqueue.errors import CertqueueError
from certqueue.lifecycle.drift import advance, error_action, is_drift
from certqueue.models import Certificate, Deployment, DriftCursor, State, utcnow
from certqueue.targets.base import load_target
from certqueue.tasks.base import CertqueueTask, StepContext

log = logging.getLogger("certqueue.drift")

#: states whose deployed copy is meant to be served (RENEWING: the old one, until the new is live)
SERVED = (State.ACTIVE, State.RENEWING)


def _cursor(ctx: StepContext, region: str) -> DriftCursor:
    cur = ctx.session.get(DriftCursor, region)
    if cur is None:
        cur = DriftCursor(region=region, after_id=0, passes=0, checked=0, pass_started_at=utcnow())
        ctx.session.add(cur)
        ctx.session.flush()
    return cur


def _check_step(ctx: StepContext, region: str) -> dict[str, Any]:
    settings = get_settings()
    session = ctx.session
    mr = settings.multi_region
    reg = settings.region(region)  # an unknown region is a ConfigError: the message was wrong
    cur = _cursor(ctx, region)
    start_after = cur.after_id
    rows = session.execute(
        select(Deployment.id, Deployment.certificate_id, Deployment.remote_ref, Deployment.fingerprint)
        .join(Certificate, Certificate.id == Deployment.certificate_id)
        .where(
            Deployment.region == region,
            Deployment.id > start_after,
            Deployment.status == "deployed",
            Deployment.remote_ref.is_not(None),
            Certificate.state.in_(SERVED),
        )
        .order_by(Deployment.id)
        .limit(mr.drift_batch_size)
    ).all()
    session.commit()  # nothing is held while the target is asked
    target = load_target(reg.target, reg.target_settings())
    deadline = time.monotonic() + mr.drift_time_budget_seconds
    drifted: list[tuple[int, str]] = []
    errors: dict[str, dict[str, Any]] = {}
    last: int | None = None
    stopped = False
    for dep_id, cid, ref, deployed in rows:
        if time.monotonic() > deadline:
            stopped = True
            break
        try:
            live = target.fingerprint(ref or "")
        except Exception as exc:  # noqa: BLE001  (recorded below; one copy must not stop the others)
            reason = exc.reason if isinstance(exc, CertqueueError) else f"{reg.target}:{type(exc).__name__}"
            e = errors.setdefault(reason, {"count": 0, "first": cid})
            e["count"] += 1
            if error_action(reason) == "stop":
                stopped = True
                break
            last = dep_id
            continue
        last = dep_id
        if is_drift(deployed, live):
            drifted.append((dep_id, cid))
    moved = advance(start_after, last, len(rows), mr.drift_batch_size, stopped=stopped)
    now = utcnow()
    checked = 0 if last is None else sum(1 for r in rows if r[0] <= last)
    values: dict[str, Any] = {"after_id": moved.after_id, "updated_at": now}
    if moved.pass_complete:
        values.update(passes=DriftCursor.passes + 1, checked=0, pass_started_at=now)
    else:
        values["checked"] = DriftCursor.checked + checked
    advanced = session.execute(
        update(DriftCursor)
        .where(DriftCursor.region == region, DriftCursor.after_id == start_after)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if not getattr(advanced, "rowcount", 0):
        # another check of this region ran meanwhile and moved the cursor: its findings stand
        return {"region": region, "checked": checked, "drifted": 0, "overlap": True}
    for reason, e in sorted(errors.items()):
        log.warning("drift check in %s: %d error(s) %s", region, e["count"], reason)
        events.record(
            session,
            e["first"],
            "drift_error",
            reason=reason,
            data={"region": region, "count": e["count"], "stopped": error_action(reason) == "stop"},
        )
    for dep_id, cid in drifted:
        d = session.get(Deployment, dep_id)
        if d is None or d.status != "deployed":
            continue
        d.status = "pending"
        events.record(session, cid, "drift", reason="drifted", data={"region": region})
        intents.record(session, "propagate", cid, {"regions": [region], "force": True}, actor="drift")
    if drifted:
        ctx.nudge = True
    return {
        "region": region,
        "checked": checked,
        "drifted": len(drifted),
        "errors": {k: v["count"] for k, v in errors.items()},
        "pass_complete": moved.pass_complete,
    }


@shared_task(bind=True, base=CertqueueTask, name="certqueue.drift.check")
def check(self: CertqueueTask, region: str, _transient: int = 0) -> Any:
    """Runs on ``propagate.<region>``: one batch of the region's drift pass."""
    return self.run_step(_check_step, region)
