"""Propagation: deploy an issuance to every region of a certificate, one queue per region.

Owns ``deployments`` and the ISSUED/RENEWING -> ACTIVE transition after propagation. The public
``certqueue.propagate`` records a propagate intent and nudges dispatch; dispatch sends a batch of
them as ``certqueue.propagate.start_batch``, which replaces itself with one chord: a
``certqueue.propagate.deploy_batch`` per region (and per ``automation.batch_size`` certificates) on
``propagate.<region>`` (only that region's pool holds its credentials), and
``certqueue.propagate.record_batch`` as the body. The single-certificate chord
(``certqueue.propagate.start`` -> ``deploy`` per region -> ``record``) is what the reconciler resends
for one certificate whose work stalled. A deploy holds no row lock while the target answers (the
deployment's lease keeps a second delivery off it). Each deploy returns a deterministic per-region result
(errors are caught and returned), so the body always sees every region. A region already holding
the issuance's fingerprint is not redeployed. The certificate becomes ACTIVE only when every
required region succeeded; failed regions are retried with backoff (each region's own attempt
count) through a propagate intent that waits in the database, without touching the others.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from typing import Any

from celery import chord, shared_task
from sqlalchemy import select

from certqueue import certificates, events, failpoints, intents, operations, payloads
from certqueue.brokerstate import region_queue
from certqueue.config import get_settings
from certqueue.db import is_postgres, lock_certificate
from certqueue.errors import CertqueueError, InvalidTransition, NotFound
from certqueue.lifecycle import failure, states
from certqueue.lifecycle.backoff import backoff
from certqueue.models import Deployment, Issuance, State, utcnow
from certqueue.targets.base import Bundle, load_target
from certqueue.tasks.base import CertqueueTask, StepContext, Wait, batch_map
from certqueue.tasks.pipeline import certificate_of, give_back_lease, park_certificate, parks_so_far

log = logging.getLogger("certqueue.propagate")


def _plan(ctx: StepContext, payload: Any) -> tuple[str, int, list[str]] | dict[str, Any]:
    """With the certificate locked: which regions of its issuance still need a deploy. Returns
    ``(certificate_id, issuance_id, regions)``, or the step's result when nothing is to be done."""
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
    # the requests this plan covers: a later one (say, forced) stays open and is dispatched itself
    up_to = payload.get("intent") if isinstance(payload.get("intent"), int) else None
    intents.complete(session, cert.id, ("propagate",), outcome="deploying", up_to=up_to)
    return cert.id, iss.id, todo


def _propagate_step(ctx: StepContext, payload: Any) -> dict[str, Any]:
    plan = _plan(ctx, payload)
    if isinstance(plan, dict):
        return plan
    cid, iss_id, todo = plan
    body = record.s(cid, iss_id)
    if not todo:
        ctx.then(record.si([], cid, iss_id))
        return {"certificate_id": cid, "status": "up_to_date"}
    header = [deploy.si(cid, r, iss_id).set(queue=region_queue(r)) for r in todo]
    ctx.replace(chord(header, body))
    return {"certificate_id": cid, "status": "propagating", "regions": todo}


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


@shared_task(bind=True, base=StartTask, name="certqueue.propagate.start", ignore_result=True)
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
        events.record(
            ctx.session,
            certificate_id,
            "propagation",
            reason="failure",
            data={"region": region, "reason": exc.reason, "issuance": issuance_id},
        )
        return {"region": region, "status": "failed", "reason": exc.reason}


def _lock_deployment(session: Any, certificate_id: str, region: str) -> Deployment | None:
    stmt = (
        select(Deployment)
        .where(Deployment.certificate_id == certificate_id, Deployment.region == region)
        .execution_options(populate_existing=True)
    )
    if is_postgres(session):
        stmt = stmt.with_for_update()
    return session.execute(stmt).scalar_one_or_none()


def _deploy_step(ctx: StepContext, certificate_id: str, region: str, issuance_id: int) -> dict[str, Any]:
    """Deploy one issuance to one region. The deployment row is locked only to read it and take its
    lease (two deliveries of one deploy never upload at once); the target's API answers with no
    lock held; the outcome is written with the row locked again."""
    settings = get_settings()
    session = ctx.session
    d = _lock_deployment(session, certificate_id, region)
    iss = session.get(Issuance, issuance_id)
    if d is None or iss is None:
        return {"region": region, "status": "failed", "reason": "missing"}
    if d.status == "deployed" and d.fingerprint == iss.fingerprint:
        return {"region": region, "status": "success", "skipped": True}
    owner = session.get(certificates.Certificate, certificate_id)
    if owner is None or not states.deployable(owner.state, owner.pending_issuance_id):
        # revoked (its copies are being removed) since this deploy was planned: never upload it again
        return {"region": region, "status": "skipped", "reason": f"state:{owner.state if owner else 'gone'}"}
    now = utcnow()
    if d.lease_until is not None and d.lease_until > now:
        raise Wait((d.lease_until - now).total_seconds() + 0.5)  # another delivery is deploying it
    token = secrets.token_hex(8)
    d.lease_token = token
    d.lease_until = now + dt.timedelta(seconds=settings.automation.order_lease_seconds)
    remote_ref = d.remote_ref
    key_pem = certificates.decrypt_key(iss) if iss.key_enc is not None else b""
    bundle = Bundle(
        certificate_id=certificate_id,
        cert_pem=iss.cert_pem,
        chain_pem=iss.chain_pem,
        key_pem=key_pem.decode(),
        domains=tuple(session.get_one(certificates.Certificate, certificate_id).domains),
    )
    fingerprint = iss.fingerprint
    session.commit()  # the lease is ours: no lock is held while the target answers
    try:
        failpoints.hit(f"deploy.{region}")
        reg = settings.region(region)
        target = load_target(reg.target, reg.target_settings())
        ref = target.deploy(bundle, remote_ref)
    except BaseException:
        give_back_lease(session, Deployment, d.id, token)
        raise
    d = _lock_deployment(session, certificate_id, region)
    if d is None or d.lease_token != token:
        return {"region": region, "status": "success", "superseded": True}
    d.lease_token = None
    d.lease_until = None
    d.remote_ref = ref
    d.fingerprint = fingerprint
    d.issuance_id = issuance_id
    d.status = "deployed"
    d.attempts += 1
    d.last_error = None
    d.deployed_at = utcnow()
    events.record(
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


@shared_task(bind=True, base=CertqueueTask, name="certqueue.propagate.record", ignore_result=True)
def record(
    self: CertqueueTask, results: Any, certificate_id: str, issuance_id: int, _transient: int = 0
) -> Any:
    return self.run_step(_record_step, results, certificate_id, issuance_id)


# --- batches: one chord per batch, one deploy batch per region queue -----------------------------------


def _start_batch_step(ctx: StepContext, jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """Plan every certificate of the batch in one transaction (locked in id order), then replace
    this task with one chord: a ``deploy_batch`` per region (chunks of ``automation.batch_size``),
    each on its region's queue, and one ``record_batch`` as the body."""
    size = get_settings().automation.batch_size
    per_region: dict[str, list[list[Any]]] = {}
    pairs: list[list[Any]] = []
    skipped = 0
    for job in _merged(jobs):
        plan = _plan(ctx, job)
        if isinstance(plan, dict):
            skipped += 1
            continue
        cid, iss_id, todo = plan
        pairs.append([cid, iss_id])
        for r in todo:
            per_region.setdefault(r, []).append([cid, iss_id])
    if not pairs:
        return {"certificates": 0, "skipped": skipped}
    header = [
        deploy_batch.si(region, items[i : i + size]).set(queue=region_queue(region))
        for region, items in sorted(per_region.items())
        for i in range(0, len(items), size)
    ]
    if header:
        ctx.replace(chord(header, record_batch.s(pairs)))
    else:
        ctx.then(record_batch.si([], pairs))
    return {"certificates": len(pairs), "skipped": skipped, "deploys": len(header)}


def _merged(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One job per certificate, in id order: several requests for one certificate in a batch are
    planned once (forced if any was, every region if any asked for all, the newest intent)."""
    by_cert: dict[str, dict[str, Any]] = {}
    for job in jobs:
        cid = str(job.get("certificate_id"))
        have = by_cert.get(cid)
        if have is None:
            by_cert[cid] = dict(job)
            continue
        have["force"] = bool(have.get("force")) or bool(job.get("force"))
        if have.get("regions") and job.get("regions"):
            have["regions"] = sorted(set(have["regions"]) | set(job["regions"]))
        else:
            have.pop("regions", None)
        ids = [i for i in (have.get("intent"), job.get("intent")) if isinstance(i, int)]
        if ids:
            have["intent"] = max(ids)
    return [by_cert[c] for c in sorted(by_cert)]


@shared_task(bind=True, base=CertqueueTask, name="certqueue.propagate.start_batch", ignore_result=True)
def start_batch(self: CertqueueTask, jobs: list[dict[str, Any]], _transient: int = 0) -> Any:
    """``[{"certificate_id": ..., "intent": id, "regions": [...], "force": bool}, ...]``: what
    dispatch sends for a batch of propagate intents. A message lost or failed leaves the intents
    dispatched, and dispatch claims them again when their lease ends."""
    return self.run_step(_start_batch_step, jobs)


def _deploy_one(task: DeployTask, certificate_id: str, region: str, issuance_id: int) -> dict[str, Any]:
    """One deploy of a batch, in its own transaction. Never raises (a chord header must answer):
    a failure is recorded on the deployment row the way a single deploy's would be, and the body
    schedules that region again with its own backoff."""
    from certqueue.db import session_scope
    from certqueue.tasks.base import classify, kind_of

    try:
        with session_scope() as session:
            ctx = StepContext(session=session, task=task)
            try:
                return _deploy_step(ctx, certificate_id, region, issuance_id)
            except Wait:
                return {"region": region, "status": "pending", "reason": "busy"}
    except Exception as exc:  # noqa: BLE001  (recorded per deployment below)
        kind = classify(exc)
        log.warning("deploy %s to %s: %s", certificate_id, region, kind.reason)
        try:
            with session_scope() as session:
                ctx = StepContext(session=session, task=task)
                # a key-store error is another worker's to finish: the deployment is not failed
                if kind_of(kind) in (failure.Kind.TRANSIENT, failure.Kind.KEYSTORE):
                    return dict(task.on_park(ctx, kind, 0.0, certificate_id, region, issuance_id))
                return dict(task.on_permanent(ctx, kind, certificate_id, region, issuance_id))
        except Exception as exc2:  # noqa: BLE001  (the database is down too: the body retries)
            return {"region": region, "status": "pending", "reason": classify(exc2).reason}


def _deploy_concurrency() -> int:
    settings = get_settings()
    if not settings.database.url.startswith("postgresql"):
        return 1  # SQLite has one writer
    return max(1, settings.automation.batch_concurrency)


@shared_task(bind=True, base=DeployTask, name="certqueue.propagate.deploy_batch")
def deploy_batch(self: DeployTask, region: str, items: list[list[Any]], _transient: int = 0) -> Any:
    """``(region, [[certificate_id, issuance_id], ...])`` on ``propagate.<region>``: deploy each
    (concurrently, at most ``automation.batch_concurrency``); a per-item result list, never raises."""
    results = batch_map(
        lambda it: _deploy_one(self, str(it[0]), region, int(it[1])), items, _deploy_concurrency()
    )
    return [{"certificate_id": str(it[0]), **r} for it, r in zip(items, results, strict=True)]


def _record_batch_step(ctx: StepContext, results: Any, pairs: list[list[Any]]) -> dict[str, Any]:
    states_: dict[str, int] = {}
    for cid, iss_id in sorted(pairs, key=lambda p: str(p[0])):
        out = _record_step(ctx, None, str(cid), int(iss_id))
        st = str(out.get("state") or out.get("status"))
        states_[st] = states_.get(st, 0) + 1
    return {"certificates": len(pairs), "states": states_}


@shared_task(bind=True, base=CertqueueTask, name="certqueue.propagate.record_batch", ignore_result=True)
def record_batch(self: CertqueueTask, results: Any, pairs: list[list[Any]], _transient: int = 0) -> Any:
    """The chord body: each certificate of the batch ACTIVE once every required region has its
    issuance; failed regions wait in the database (a propagate intent) with their own backoff."""
    return self.run_step(_record_batch_step, results, pairs)
