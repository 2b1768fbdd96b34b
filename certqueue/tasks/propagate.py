"""Propagation: deploy an issuance to every region of a certificate, one queue per region.

Owns ``deployments`` and the ISSUED/RENEWING -> ACTIVE transition after propagation. The public
``certqueue.propagate`` records a propagate intent and nudges dispatch; dispatch sends
``certqueue.propagate.start``, which replaces itself with a chord: one ``certqueue.propagate.deploy``
per region on ``propagate.<region>`` (only that region's pool holds its credentials), and
``certqueue.propagate.record`` as the body. Each deploy returns a deterministic per-region result
(errors are caught and returned), so the body always sees every region. A region already holding
the issuance's fingerprint is not redeployed. The certificate becomes ACTIVE only when every
required region succeeded; failed regions are retried with backoff (each region's own attempt
count) through a propagate intent that waits in the database, without touching the others.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from celery import chord, shared_task
from sqlalchemy import select

from certqueue import certificates, failpoints, intents, operations, payloads
from certqueue.celery_app import region_queue
from certqueue.config import get_settings
from certqueue.db import is_postgres, lock_certificate
from certqueue.errors import CertqueueError, InvalidTransition, NotFound
from certqueue.lifecycle import states
from certqueue.lifecycle.backoff import backoff
from certqueue.models import Deployment, Issuance, State, utcnow
from certqueue.targets.base import Bundle, load_target
from certqueue.tasks.base import CertqueueTask, StepContext
from certqueue.tasks.pipeline import certificate_of, park_certificate, parks_so_far

log = logging.getLogger("certqueue.propagate")


def _propagate_step(ctx: StepContext, payload: Any) -> dict[str, Any]:
    settings = get_settings()
    session = ctx.session
    cert = lock_certificate(session, payload["certificate_id"])
    if cert is None:
        intents.complete(session, payload["certificate_id"], ("propagate",), outcome="gone")
        return {"certificate_id": payload["certificate_id"], "status": "gone"}
    iss_id = cert.pending_issuance_id or cert.current_issuance_id
    if iss_id is None or not states.deployable(cert.state, cert.pending_issuance_id):
        intents.complete(session, cert.id, ("propagate",), outcome=f"noop:{cert.state}")
        return {"certificate_id": cert.id, "status": "noop", "state": cert.state}
    iss = session.get(Issuance, iss_id)
    assert iss is not None
    wanted = payload.get("regions") or certificates.regions_for(cert, settings)
    known = {r.name for r in settings.multi_region.regions}
    wanted = [r for r in wanted if r in known]  # a region removed from the settings since
    rows = {
        d.region: d
        for d in session.execute(select(Deployment).where(Deployment.certificate_id == cert.id)).scalars()
    }
    todo: list[str] = []
    for r in wanted:
        d = rows.get(r)
        if d is None:
            d = Deployment(
                certificate_id=cert.id, region=r, provider=settings.region(r).target, status="pending"
            )
            session.add(d)
        if d.status == "deployed" and d.fingerprint == iss.fingerprint and not payload.get("force"):
            continue
        d.status = "pending"
        todo.append(r)
    cert.work_deadline = utcnow() + dt.timedelta(seconds=settings.automation.stuck_after_seconds)
    session.flush()
    intents.complete(session, cert.id, ("propagate",), outcome="deploying")
    body = record.s(cert.id, iss.id)
    if not todo:
        ctx.then(record.si([], cert.id, iss.id))
        return {"certificate_id": cert.id, "status": "up_to_date"}
    header = [deploy.si(cert.id, r, iss.id).set(queue=region_queue(r)) for r in todo]
    ctx.replace(chord(header, body))
    return {"certificate_id": cert.id, "status": "propagating", "regions": todo}


class StartTask(CertqueueTask):
    """Never fails the certificate (propagation failures are per region); persistent transient
    trouble parks it for the reconciler."""

    abstract = True

    def parks(self, ctx: StepContext, *args: Any) -> int:
        cid = certificate_of(args)
        return parks_so_far(ctx.session, cid) if cid else 0

    def on_park(self, ctx: StepContext, exc: CertqueueError, delay: float, *args: Any) -> Any:
        cid = certificate_of(args)
        return park_certificate(ctx, cid, exc, delay) if cid else None


@shared_task(bind=True, base=StartTask, name="certqueue.propagate.start")
def start(self: StartTask, job: dict[str, Any], _transient: int = 0) -> Any:
    """``{"certificate_id": ..., "regions": [optional subset], "force": false, "intent": id}``."""
    return self.run_step(_propagate_step, job)


def _request_step(ctx: StepContext, payload: Any) -> dict[str, Any]:
    payload = payloads.parse("certqueue.propagate", payload)  # the broker boundary: ids and names only
    intent, wanted = operations.request_propagate(
        ctx.session,
        payload["certificate_id"],
        regions=list(payload.get("regions") or []),
        force=bool(payload.get("force")),
        actor="task",
    )
    ctx.nudge = True
    return {
        "certificate_id": payload["certificate_id"],
        "intent": intent.id,
        "regions": wanted,
        "status": "accepted",
    }


class RequestTask(CertqueueTask):
    """The public request: an unknown certificate or one with nothing to deploy fails the job."""

    abstract = True
    request_errors = (NotFound, InvalidTransition)


@shared_task(bind=True, base=RequestTask, name="certqueue.propagate")
def propagate(self: RequestTask, payload: Any, _transient: int = 0) -> Any:
    """Public: ``{"v": 1, "certificate_id": ..., "regions": [optional subset], "force": false}``."""
    return self.run_step(_request_step, payload)


class DeployTask(CertqueueTask):
    abstract = True

    def on_park(self, ctx: StepContext, exc: CertqueueError, delay: float, *args: Any) -> Any:
        certificate_id, region = args[0], args[1]
        d = ctx.session.execute(
            select(Deployment).where(Deployment.certificate_id == certificate_id, Deployment.region == region)
        ).scalar_one_or_none()
        if d is not None:
            d.attempts += 1
            d.last_error = exc.reason
        return {"region": region, "status": "pending", "reason": exc.reason}

    def on_permanent(self, ctx: StepContext, exc: CertqueueError, *args: Any) -> Any:
        certificate_id, region, issuance_id = args[0], args[1], args[2]
        d = ctx.session.execute(
            select(Deployment).where(Deployment.certificate_id == certificate_id, Deployment.region == region)
        ).scalar_one_or_none()
        if d is not None:
            d.status = "failed"
            d.attempts += 1
            d.last_error = exc.reason
        states.record(
            ctx.session,
            certificate_id,
            "propagation",
            reason="failure",
            data={"region": region, "reason": exc.reason, "issuance": issuance_id},
        )
        return {"region": region, "status": "failed", "reason": exc.reason}


def _deploy_step(ctx: StepContext, certificate_id: str, region: str, issuance_id: int) -> dict[str, Any]:
    settings = get_settings()
    session = ctx.session
    stmt = select(Deployment).where(Deployment.certificate_id == certificate_id, Deployment.region == region)
    if is_postgres(session):
        stmt = stmt.with_for_update()  # two deliveries of one deploy never upload twice
    d = session.execute(stmt).scalar_one_or_none()
    iss = session.get(Issuance, issuance_id)
    if d is None or iss is None:
        return {"region": region, "status": "failed", "reason": "missing"}
    if d.status == "deployed" and d.fingerprint == iss.fingerprint:
        return {"region": region, "status": "success", "skipped": True}
    failpoints.hit(f"deploy.{region}")
    reg = settings.region(region)
    target = load_target(reg.target, reg.target_settings())
    key_pem = certificates.decrypt_key(iss) if iss.key_enc is not None else b""
    bundle = Bundle(
        certificate_id=certificate_id,
        cert_pem=iss.cert_pem,
        chain_pem=iss.chain_pem,
        key_pem=key_pem.decode(),
        domains=tuple(session.get_one(certificates.Certificate, certificate_id).domains),
    )
    ref = target.deploy(bundle, d.remote_ref)
    d.remote_ref = ref
    d.fingerprint = iss.fingerprint
    d.issuance_id = iss.id
    d.status = "deployed"
    d.attempts += 1
    d.last_error = None
    d.deployed_at = utcnow()
    states.record(
        session,
        certificate_id,
        "propagation",
        reason="success",
        data={"region": region, "issuance": issuance_id},
    )
    return {"region": region, "status": "success"}


@shared_task(bind=True, base=DeployTask, name="certqueue.propagate.deploy")
def deploy(self: DeployTask, certificate_id: str, region: str, issuance_id: int, _transient: int = 0) -> Any:
    return self.run_step(_deploy_step, certificate_id, region, issuance_id)


def _record_step(ctx: StepContext, results: Any, certificate_id: str, issuance_id: int) -> dict[str, Any]:
    settings = get_settings()
    session = ctx.session
    cert = lock_certificate(session, certificate_id)
    iss = session.get(Issuance, issuance_id)
    if cert is None or iss is None:
        return {"certificate_id": certificate_id, "status": "noop"}
    regions = certificates.regions_for(cert, settings)
    rows = {
        d.region: d
        for d in session.execute(select(Deployment).where(Deployment.certificate_id == cert.id)).scalars()
    }
    required = [r for r in regions if settings.region(r).required]
    done = [
        r
        for r in regions
        if rows.get(r) and rows[r].status == "deployed" and rows[r].fingerprint == iss.fingerprint
    ]
    failed = [r for r in regions if r not in done]
    summary = {r: ("success" if r in done else (rows[r].status if r in rows else "pending")) for r in regions}
    if all(r in done for r in required):
        if cert.pending_issuance_id == iss.id and cert.state in (State.ISSUED, *states.RENEWAL_STATES):
            certificates.activate(session, cert, iss, reason="propagated")
            ctx.nudge = True
    if failed:
        # each region's own attempt count decides its delay; the retry waits in the database
        attempts = max((rows[r].attempts for r in failed if r in rows), default=1)
        delay = backoff(max(attempts, 1), initial=10, cap=1800)
        when = utcnow() + dt.timedelta(seconds=delay)
        intents.record(session, "propagate", cert.id, {"regions": failed}, actor="propagate", not_before=when)
        cert.work_deadline = when + dt.timedelta(seconds=settings.automation.stuck_after_seconds)
    elif cert.state == State.ACTIVE:
        cert.work_deadline = None
    return {"certificate_id": cert.id, "regions": summary, "state": cert.state}


@shared_task(bind=True, base=CertqueueTask, name="certqueue.propagate.record")
def record(
    self: CertqueueTask, results: Any, certificate_id: str, issuance_id: int, _transient: int = 0
) -> Any:
    return self.run_step(_record_step, results, certificate_id, issuance_id)
