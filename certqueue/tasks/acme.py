"""The ``acme`` pool: the public request tasks, and the steps that talk to the CA.

Owns the ISSUING/RENEWING -> ISSUED/FAILED/ACTIVE transitions of the issuance pipeline and
ACTIVE -> REVOKED. The public tasks (``certqueue.issue``, ``certqueue.renew``, ``certqueue.revoke``)
only record an intent (``certqueue.operations``) and nudge dispatch: they return once it commits.
Dispatch sends the steps below by name, within capacity; each takes ids, reloads, locks, checks
that the work is still needed, acts, commits, and only then sends what follows (by name).

The graph for one certificate::

    intent (issue | renew)  --dispatch-->  certqueue.acme.start        [acme]
      create or resume the order (its URL committed before anything waits); HTTP-01 tokens written
      -> HTTP-01 only:  certqueue.acme.validate                         [acme]
      -> with DNS-01:   certqueue.dns.present_all (every name; returns once all are visible)  [dns]
                        | certqueue.acme.validate                       [acme]
    certqueue.acme.issue_batch: the same for many certificates, new HTTP-01 orders started and
      validated together; new DNS-01 orders together through certqueue.dns.present_batch [dns]
      (over several zones: a chord of certqueue.dns.present_zone, one per zone, whose body
      certqueue.dns.presented_batch sends the validate batch)
      -> certqueue.acme.validate_batch [acme] -> certqueue.dns.cleanup_batch [dns]
    certqueue.acme.validate: answer challenges, poll the order (retry with countdown, never sleep),
      finalize with the order's CSR, download, store encrypted -> ISSUED, clean up challenges
      (DNS-01: one certqueue.dns.cleanup_all [dns]), then
      a propagate intent (regions) or straight to ACTIVE when there are none.
    intent (revoke)  --dispatch-->  certqueue.acme.revoke               [acme]
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from celery import shared_task, signature
from sqlalchemy import select

from certqueue import certificates, events, failpoints, intents, operations, payloads, removals
from certqueue.acme.accounts import client_for
from certqueue.acme.client import AcmeClient, order_from_json, order_to_json
from certqueue.config import get_settings
from certqueue.db import lock_certificate, lock_certificates, session_scope
from certqueue.errors import InvalidInput, InvalidTransition, NotFound, PermanentError
from certqueue.lifecycle import failure, states
from certqueue.lifecycle.backoff import backoff
from certqueue.models import Certificate, Challenge, Issuance, Order, State, utcnow
from certqueue.tasks.base import (
    CertqueueTask,
    StepContext,
    Wait,
    batch_map,
    bound,
    classify,
    decide,
    kind_of,
    send_nudges,
)
from certqueue.tasks.pipeline import (
    OPEN_ORDER,
    Deferred,
    Handoff,
    OrderLease,
    PipelineTask,
    _challenge_type_for,
    _client,
    _place_order,
    _Placing,
    _prepare_order,
    _record_ordered,
    _status_name,
    _touch,
    answerable,
    build_challenges,
    cleanup_challenges,
    delete_http01_tokens,
    fail_certificate,
    give_back_lease,
    open_order,
    rate_limiter,
    start_order,
    write_challenges,
)

log = logging.getLogger("certqueue.acme")

#: kept for callers of the old location
check_revocation_reason = operations.check_revocation_reason


# --- public: record the request, nudge dispatch ---------------------------------------------------


class RequestTask(CertqueueTask):
    """A public request: an unknown certificate or a state that forbids the request fails the job
    (nothing is written); otherwise it returns once the intent is committed."""

    abstract = True
    request_errors = (NotFound, InvalidTransition)


def _issue_step(ctx: StepContext, payload: Any) -> dict[str, Any]:
    session = ctx.session
    if "request" in payload:
        req = certificates.CertificateRequest.build(**(payload["request"] or {}))
        cert, created, intent = operations.request_issue(
            session, req, actor="task", certificate_id=payload.get("certificate_id")
        )
    elif "certificate_id" in payload:
        cert = certificates.get(session, payload["certificate_id"])
        created = False
        intent = None
        if cert.state in (State.REQUESTED, State.FAILED):
            intent = intents.record(session, "issue", cert.id, actor="task")
        elif cert.state == State.ISSUED:
            intent, _ = operations.request_propagate(session, cert.id, actor="task")
    else:
        raise InvalidInput("payload needs certificate_id or request", field="certificate_id")
    ctx.nudge = intent is not None
    return {
        "certificate_id": cert.id,
        "created": created,
        "intent": intent.id if intent is not None else None,
        "status": "accepted" if intent is not None else "noop",
        "state": cert.state,
    }


@shared_task(bind=True, base=RequestTask, name="certqueue.issue")
def issue(self: RequestTask, payload: Any, _transient: int = 0) -> Any:
    """Public: ``{"v": 1, "certificate_id": ...}`` or ``{"v": 1, "request": {...}}``."""
    payload = payloads.parse("certqueue.issue", payload)  # the broker boundary: ids and names only
    return self.run_step(_issue_step, payload)


def _renew_step(ctx: StepContext, payload: Any) -> dict[str, Any]:
    payload = payloads.parse("certqueue.renew", payload)  # the broker boundary: ids and names only
    cert = certificates.get(ctx.session, payload["certificate_id"])
    intent = operations.request_renew(
        ctx.session, cert.id, force=bool(payload.get("force")), reason=payload.get("reason"), actor="task"
    )
    if intent is None:
        return {
            "certificate_id": cert.id,
            "status": "not_due",
            "renew_at": cert.renew_at.isoformat() if cert.renew_at else None,
        }
    ctx.nudge = True
    return {"certificate_id": cert.id, "intent": intent.id, "status": "accepted"}


@shared_task(bind=True, base=RequestTask, name="certqueue.renew")
def renew(self: RequestTask, payload: Any, _transient: int = 0) -> Any:
    """Public: ``{"v": 1, "certificate_id": ..., "force": false}``."""
    return self.run_step(_renew_step, payload)


def _request_revoke_step(ctx: StepContext, payload: Any) -> dict[str, Any]:
    payload = payloads.parse("certqueue.revoke", payload)  # the broker boundary: ids and names only
    intent = operations.request_revoke(
        ctx.session, payload["certificate_id"], reason=payload.get("reason") or "unspecified", actor="task"
    )
    if intent is None:
        return {"certificate_id": payload["certificate_id"], "status": "revoked"}
    ctx.nudge = True
    return {"certificate_id": payload["certificate_id"], "intent": intent.id, "status": "accepted"}


@shared_task(bind=True, base=RequestTask, name="certqueue.revoke")
def revoke(self: RequestTask, payload: Any, _transient: int = 0) -> Any:
    """Public: ``{"v": 1, "certificate_id": ..., "reason": "keyCompromise"}``."""
    return self.run_step(_request_revoke_step, payload)


# --- the steps dispatch sends ---------------------------------------------------------------------


def _start_step(ctx: StepContext, job: dict[str, Any]) -> dict[str, Any]:
    """Create or resume the order of an issue or renew intent (or a claimed due renewal)."""
    session = ctx.session
    cid = job["certificate_id"]
    purpose = job.get("purpose") or "issue"
    cert = lock_certificate(session, cid)
    if cert is None:
        return {"certificate_id": cid, "status": "gone"}
    if cert.external:
        intents.complete(session, cert.id, ("issue", "renew"), outcome="imported", failed=True)
        return {"certificate_id": cid, "status": "noop", "state": cert.state}
    if _answered(session, job.get("intent")) and cert.state not in (State.ISSUING, State.RENEWING):
        # its request was answered already (another start's order, which then failed or finished):
        # a second message for it must not order again; work still in flight is resumed
        return {"certificate_id": cid, "status": "answered", "state": cert.state}
    if cert.state == State.ACTIVE and purpose == "renew" and not _renewal_due(cert, job):
        intents.complete(session, cert.id, ("renew",), outcome="not_due")
        return {"certificate_id": cert.id, "status": "not_due"}
    _enter(session, cert, job)
    if states.in_pipeline(cert.state, cert.work_deadline):
        if cert.pending_issuance_id is not None:
            # issued already; what is left is propagation
            intents.complete(session, cert.id, ("issue", "renew"), outcome="issued")
            intents.record(session, "propagate", cert.id, actor="task")
            ctx.nudge = True
            return {"certificate_id": cert.id, "status": "propagating"}
        try:
            out = start_order(ctx, cert, "issue" if cert.state == State.ISSUING else "renew")
        except Deferred as d:
            return {
                "certificate_id": cert.id,
                "status": "deferred",
                "reason": d.reason,
                "until": d.until.isoformat(),
            }
        if out.get("status") == "ordered":
            # every open issue/renew request of the certificate is answered by this order (a forced
            # renewal asked meanwhile resumes the same order: it would not open another)
            intents.complete(session, cert.id, ("issue", "renew"), outcome="ordered")
        return out
    intents.complete(session, cert.id, ("issue", "renew"), outcome=f"noop:{cert.state}")
    if cert.state == State.ISSUED:
        intents.record(session, "propagate", cert.id, actor="task")
        ctx.nudge = True
    return {"certificate_id": cert.id, "status": "noop", "state": cert.state}


def _renewal_due(cert: Certificate, job: dict[str, Any]) -> bool:
    return bool(job.get("force")) or (cert.renew_at is not None and cert.renew_at <= utcnow())


def _enter(session: Any, cert: Certificate, job: dict[str, Any]) -> None:
    """The start step's transitions into the pipeline: FAILED -> REQUESTED (a new request),
    REQUESTED -> ISSUING, and ACTIVE -> RENEWING for a renewal (the caller checked it is due)."""
    if cert.state == State.FAILED:
        cert.attempts = 0  # a new request: automation.retry_attempts counts afresh
        events.transition(session, cert, State.REQUESTED, reason="retry", actor="task")
    if cert.state == State.REQUESTED:
        events.transition(session, cert, State.ISSUING, reason="issue", actor="task")
    if cert.state == State.ACTIVE and (job.get("purpose") or "issue") == "renew":
        events.transition(
            session,
            cert,
            State.RENEWING,
            reason=job.get("reason") or ("forced" if job.get("force") else "due"),
            actor="task",
        )


def _answered(session: Any, intent_id: Any) -> bool:
    """Whether the intent a message names is closed (None: the message names none)."""
    from certqueue.models import Intent

    if not isinstance(intent_id, int) or isinstance(intent_id, bool):
        return False
    intent = session.get(Intent, intent_id)
    return intent is not None and intent.status not in intents.OPEN


@shared_task(bind=True, base=PipelineTask, name="certqueue.acme.start", ignore_result=True)
def start(self: PipelineTask, job: dict[str, Any], _transient: int = 0) -> Any:
    """``{"certificate_id": ..., "purpose": "issue" | "renew", "intent": id, "force": bool}``."""
    return self.run_step(_start_step, job)


def _order_status(client: AcmeClient, res: Any) -> tuple[Any, float | None]:
    """One POST-as-GET of the order (not its authorizations): its status and Retry-After."""
    body, response = client._fetch_order_body(res)
    retry_after: float | None = None
    raw = response.headers.get("Retry-After")
    if raw:
        try:
            retry_after = min(float(raw), 300.0)
        except ValueError:
            retry_after = None
    return body, retry_after


#: how long a step waits, asking only the CA (no lock held), for the order to move on: from
#: ``pending`` once its challenges are answered (the CA validates within moments), and from
#: ``processing`` after its finalize. Saves a whole step (two transactions, a lease) each time.
VALIDATION_WAIT_SECONDS = 3.0
FINALIZE_WAIT_SECONDS = 2.0


def _await_leaving(client: AcmeClient, res: Any, status: str, budget: float) -> tuple[Any, str, float | None]:
    """Poll the order at short intervals for at most ``budget`` seconds while it is ``status``;
    the order, its status and the CA's Retry-After when it moved on or the time ran out."""
    import time

    deadline = time.monotonic() + budget
    pause = 0.02
    current, retry_after = status, None
    while current == status and time.monotonic() < deadline:
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 2, 0.5)
        body, retry_after = _order_status(client, res)
        current = _status_name(body.status)
        res = res.update(body=body)
        if retry_after and retry_after > deadline - time.monotonic():
            break  # the CA asks for longer than is left: the step waits with a countdown instead
    return res, current, retry_after


def _poll_countdown(polls: int) -> float:
    a = get_settings().automation
    return backoff(polls + 1, initial=a.poll_initial_seconds, cap=a.poll_max_seconds, jitter=0.1)


def _validate_step(ctx: StepContext, certificate_id: str, handoff: Handoff | None = None) -> dict[str, Any]:
    """Answer the challenges, poll the order, finalize and download when it is ready.

    What to do is read with the certificate locked; the CA is asked with no lock held (the order's
    lease keeps a second step off it); the answers are written with the certificate locked again.
    ``handoff``: the start step that placed the order in this same task left its lease and what
    this step would read (``certqueue.acme.issue_batch``); the reading is then skipped.
    """
    session = ctx.session
    settings = get_settings()
    if handoff is not None:
        client, res, to_answer = handoff.client, handoff.res, handoff.to_answer
        csr_pem, preferred_chain = handoff.csr_pem, handoff.preferred_chain
        lease = OrderLease(ctx, certificate_id, handoff.order_id, handoff.token)
    else:
        cert = session.get(Certificate, certificate_id)
        if cert is None:
            return {"certificate_id": certificate_id, "status": "noop"}
        client, _ = _client(session, cert)  # registers the account on first use: before any lock
        cert = lock_certificate(session, certificate_id)
        if cert is None or not states.in_pipeline(cert.state, cert.work_deadline):
            return {"certificate_id": certificate_id, "status": "noop"}
        order = open_order(session, cert.id)
        if order is None or order.order_url is None:
            return {"certificate_id": certificate_id, "status": "noop"}
        res = order_from_json(order.order_json or {})
        chs = list(session.execute(select(Challenge).where(Challenge.order_id == order.id)).scalars())
        # a DNS-01 challenge is answered only once the chord's header proved it visible
        to_answer = answerable(chs)
        csr_pem = order.csr_pem
        preferred_chain = cert.preferred_chain
        lease = OrderLease.take(ctx, cert, order)
    try:
        ans = _ask_ca(client, res, to_answer, csr_pem, preferred_chain)
        # -- the answers, with the certificate locked again --------------------------------------
        got = lease.reacquire()
        if got is None:
            return {"certificate_id": certificate_id, "status": "superseded"}
        cert, order = got
        with session.no_autoflush:  # the order's changes go out with the rest, in one UPDATE
            chs = list(session.execute(select(Challenge).where(Challenge.order_id == order.id)).scalars())
        return _write_answer(ctx, cert, order, chs, to_answer, ans, settings)
    except (Wait, Deferred):
        raise
    except BaseException:
        lease.release()
        raise


@dataclass
class _Answer:
    """What the CA said of an order in one validation step."""

    res: Any
    status: str
    retry_after: float | None
    authz: Any
    fullchain: str | None

    @property
    def issued(self) -> bool:
        return self.status == "valid" and self.fullchain is not None


def _ask_ca(
    client: AcmeClient,
    res: Any,
    to_answer: list[tuple[int, Any]],
    csr_pem: str,
    preferred_chain: str | None,
) -> _Answer:
    """The CA half of a validation step (no lock held, no database): answer the challenges, wait a
    moment for the order to leave ``pending``, finalize, wait a moment for it to leave
    ``processing``, download."""
    for _ch_id, info in to_answer:
        client.answer_challenge(info)
    body, retry_after = _order_status(client, res)
    status = _status_name(body.status)
    if status == "pending" and to_answer:
        res, status, retry_after = _await_leaving(client, res, "pending", VALIDATION_WAIT_SECONDS)
        body = res.body
    authz = None
    fullchain = None
    if status == "invalid":
        authz = client.poll_authorizations(res)
    elif status != "pending":
        res = res.update(body=body)
        failpoints.hit("validate.before_finalize")
        if status == "ready":
            res = client.finalize(res, csr_pem.encode())
            status = _status_name(res.body.status)
        if status == "processing":
            res, status, retry_after = _await_leaving(client, res, "processing", FINALIZE_WAIT_SECONDS)
        if status == "valid":
            fullchain, _alternatives = client.fetch_certificate(res, preferred_chain)
    return _Answer(res, status, retry_after, authz, fullchain)


def _note_answers(
    cert: Certificate, order: Any, chs: list[Challenge], to_answer: list[tuple[int, Any]], ans: _Answer
) -> None:
    """The step's lease on the order ends, its poll is counted and its answered challenges marked."""
    OrderLease.finish(order)
    order.polls += 1
    answered = {ch_id for ch_id, _ in to_answer}
    # issued in this step: the answered challenges are valid at once (one write, not two)
    for ch in chs:
        if ch.id in answered and ch.status in ("presented", "visible"):
            ch.status = "valid" if ans.issued else "answered"
    if not ans.issued:
        _touch(cert)  # issued: the certificate is written once, by what the issuance changes


def _write_answer(
    ctx: StepContext,
    cert: Certificate,
    order: Any,
    chs: list[Challenge],
    to_answer: list[tuple[int, Any]],
    ans: _Answer,
    settings: Any,
    iss: Issuance | None = None,
) -> dict[str, Any]:
    """The database half, with the certificate locked again and the order still this step's: the
    lease ends, the answered challenges are marked, and what the CA said is recorded. ``iss``: the
    issuance ``_stores_issuance`` said this answer stores, added already (a batch's)."""
    _note_answers(cert, order, chs, to_answer, ans)
    if not states.in_pipeline(cert.state, cert.work_deadline):
        return {"certificate_id": cert.id, "status": "noop"}
    return _record_validation(
        ctx, cert, order, chs, ans.res, ans.status, ans.retry_after, ans.authz, ans.fullchain, settings, iss
    )


def _stores_issuance(cert: Certificate, ans: _Answer) -> bool:
    """Whether ``_write_answer`` stores an issuance for this answer (its status and certificate)."""
    return (
        ans.status == "valid"
        and ans.fullchain is not None
        and states.in_pipeline(cert.state, cert.work_deadline)
    )


def _new_issuance(
    session: Any, cert: Certificate, order: Any, fullchain: str, *, flush: bool = True
) -> Issuance:
    """The issued certificate stored with the order's key, decrypted and encrypted again for it."""
    key_pem = certificates.keystore().decrypt(
        order.key_enc, certificates.order_key_aad(cert.id, order.csr_pem)
    )
    return certificates.store_issuance(
        session, cert, fullchain, key_pem, order_url=order.order_url, flush=flush
    )


def _record_validation(
    ctx: StepContext,
    cert: Certificate,
    order: Any,
    chs: list[Challenge],
    res: Any,
    status: str,
    retry_after: float | None,
    authz: Any,
    fullchain: str | None,
    settings: Any,
    iss: Issuance | None = None,
) -> dict[str, Any]:
    """Write what the CA answered (the certificate is locked): wait, fail, or store the issuance
    (``iss``: stored already, by a batch that added its issuances together)."""
    session = ctx.session
    if status == "pending":
        if (
            order.created_at
            and (utcnow() - order.created_at).total_seconds() > settings.automation.order_timeout_seconds
        ):
            raise PermanentError("the CA did not validate the order in time", reason="acme:timeout")
        if any(c.type == "dns-01" and c.status in ("pending", "presented") for c in chs):
            # a resumed order whose DNS challenges are not proven visible: run the chord again
            start_order(ctx, cert, order.purpose)
            return {"certificate_id": cert.id, "status": "presenting"}
        raise Wait(max(_poll_countdown(order.polls), retry_after or 0))
    if status == "invalid":
        limiter = rate_limiter(session)
        for ch in chs:
            ident_status = authz.identifiers.get(ch.identifier)
            if ident_status in ("valid", "invalid"):
                ch.status = ident_status
            if ident_status == "invalid":
                limiter.record_failed_authorization(cert.directory_url, ch.identifier, utcnow())
        raise PermanentError("the CA rejected the order", reason=authz.reason or "acme:orderInvalid")
    order.order_json = order_to_json(res)
    order.status = status
    if status == "processing" or status == "ready":
        raise Wait(max(_poll_countdown(0), retry_after or 0))
    if status != "valid" or fullchain is None:
        raise PermanentError(f"unexpected order status {status}", reason="acme:orderStatus")
    order.finished_at = utcnow()
    limiter = rate_limiter(session)
    validated_at = utcnow()
    for ch in chs:
        # a validated name starts its count of consecutive failures at this CA from zero again
        limiter.record_valid_authorization(cert.directory_url, ch.identifier, validated_at)
        if ch.status == "answered":
            ch.status = "valid"
    # the order's challenges and tokens first, then the issuance: store_issuance flushes (its id is
    # needed below), and whatever is changed before it is then written once
    cleanup_challenges(ctx, order, chs)
    if iss is None:
        iss = _new_issuance(session, cert, order, fullchain)
    _touch(cert)
    renewing = cert.state in states.RENEWAL_STATES
    events.record(
        session, cert.id, "renewal" if renewing else "issuance", reason="success", data={"serial": iss.serial}
    )
    if not renewing:
        events.transition(session, cert, State.ISSUED, reason="issued", data={"serial": iss.serial})
    active, propagating = certificates.issuance_in_hand(
        session, cert, iss, reason="renewed" if renewing else "issued", actor="task", settings=get_settings()
    )
    if propagating is not None or active:
        ctx.nudge = True  # a propagation to dispatch, or capacity freed for the next order
    if not active:
        return {"certificate_id": cert.id, "status": "issued", "serial": iss.serial}
    return {"certificate_id": cert.id, "status": "active", "serial": iss.serial}


def _revoke_step(ctx: StepContext, payload: Any) -> dict[str, Any]:
    reason = payload.get("reason") or "unspecified"
    code = check_revocation_reason(reason)
    session = ctx.session
    cert = lock_certificate(session, payload["certificate_id"])
    if cert is None:
        return {"certificate_id": payload["certificate_id"], "status": "gone"}
    if not intents.is_open(session, payload.get("intent"), "revoke", cert.id):
        # only a recorded request revokes: a message published straight to the broker does not
        log.warning("certqueue.acme.revoke for %s without an open revoke request: refused", cert.id)
        return {"certificate_id": cert.id, "status": "refused"}
    if cert.state == State.REVOKED:
        intents.complete(session, cert.id, ("revoke",), outcome="revoked")
        return {"certificate_id": cert.id, "status": "revoked"}
    if cert.state == State.RENEWING:
        order = open_order(session, cert.id)
        if order is not None:
            order.status = "abandoned"
            order.finished_at = utcnow()
            cleanup_challenges(ctx, order)
        cert.pending_issuance_id = None
        events.transition(session, cert, State.ACTIVE, reason="renewal abandoned for revocation")
    if cert.state != State.ACTIVE or cert.current_issuance is None or cert.external:
        # the request was checked when it was made; the certificate changed since
        raise PermanentError(f"{cert.id} is {cert.state}: nothing to revoke", reason="revoke:state")
    iss = cert.current_issuance
    issuance_id, cert_pem = iss.id, iss.cert_pem
    client, _ = _client(session, cert)
    session.commit()  # what changed so far is kept; the CA is asked with no lock held
    client.revoke(cert_pem, code)  # idempotent: already revoked counts as success
    cert = lock_certificate(session, payload["certificate_id"])
    if cert is None:
        return {"certificate_id": payload["certificate_id"], "status": "gone"}
    if cert.state == State.REVOKED:  # another step revoked it meanwhile
        intents.complete(session, cert.id, ("revoke",), outcome="revoked")
        return {"certificate_id": cert.id, "status": "revoked"}
    now_current = cert.current_issuance
    if now_current is None or now_current.id != issuance_id:
        raise PermanentError(f"{cert.id} changed while it was revoked", reason="revoke:state")
    iss = now_current
    iss.revoked_at = utcnow()
    iss.revocation_reason = reason
    cert.renew_at = None
    cert.work_deadline = None
    events.record(session, cert.id, "revocation", reason=reason, data={"serial": iss.serial})
    events.transition(session, cert, State.REVOKED, reason=reason)
    intents.complete(session, cert.id, ("revoke", "renew", "propagate"), outcome="revoked")
    if removals.request_removal(session, cert.id, "revoke", actor="revocation") is not None:
        ctx.nudge = True
    return {"certificate_id": cert.id, "status": "revoked", "serial": iss.serial}


class RevokeTask(CertqueueTask):
    """A revocation that the CA refused for good closes its intent as failed (the certificate stays
    as it was); transient trouble leaves the intent to be dispatched again."""

    abstract = True

    def on_permanent(self, ctx: StepContext, exc: Any, *args: Any) -> Any:
        cid = args[0]["certificate_id"] if args and isinstance(args[0], dict) else None
        if cid:
            intents.complete(ctx.session, cid, ("revoke",), outcome=exc.reason, failed=True)
            events.record(ctx.session, cid, "revocation", reason="failure", data={"reason": exc.reason})
        return {"certificate_id": cid, "status": "failed", "reason": exc.reason}

    def on_park(self, ctx: StepContext, exc: Any, delay: float, *args: Any) -> Any:
        import datetime as dt

        cid = args[0]["certificate_id"] if args and isinstance(args[0], dict) else None
        if cid:
            for intent in intents.open_intents(ctx.session, cid):
                if intent.kind == "revoke":
                    intent.status = "pending"
                    intent.not_before = utcnow() + dt.timedelta(seconds=delay)
                    intent.deadline = None
        return {"certificate_id": cid, "status": "backing_off", "reason": exc.reason}


@shared_task(bind=True, base=RevokeTask, name="certqueue.acme.revoke")
def revoke_now(self: RevokeTask, payload: dict[str, Any], _transient: int = 0) -> Any:
    """``{"certificate_id": ..., "reason": ..., "intent": id}``: revoke at the CA."""
    return self.run_step(_revoke_step, payload)


@shared_task(bind=True, base=PipelineTask, name="certqueue.acme.validate", ignore_result=True)
def validate(self: PipelineTask, certificate_id: str, _transient: int = 0) -> Any:
    return self.run_step(_validate_step, certificate_id)


def _status_step(ctx: StepContext, payload: Any) -> dict[str, Any]:
    payload = payloads.parse("certqueue.status", payload)  # the broker boundary: ids and names only
    cert = ctx.session.get(Certificate, payload["certificate_id"])
    if cert is None:
        raise InvalidInput(f"no certificate {payload['certificate_id']}", field="certificate_id")
    iss = cert.current_issuance
    return {
        "certificate_id": cert.id,
        "state": cert.state,
        "domains": cert.domains,
        "last_error": cert.last_error,
        "serial": iss.serial if iss else None,
        "not_after": iss.not_after.isoformat() if iss else None,
    }


@shared_task(bind=True, base=CertqueueTask, name="certqueue.status")
def status(self: CertqueueTask, payload: Any, _transient: int = 0) -> Any:
    """Public, read-only: the certificate's state, for clients that have only the broker."""
    return self.run_step(_status_step, payload)


# --- batches: many certificates per task, validated inside it ------------------------------------------


def _send_after(ctx: StepContext, cleanups: list[dict[str, Any]] | None = None) -> None:
    """What a committed step asked for: its follow-ups, its replacement (a chord: sent as it is,
    since a batch does not replace itself), and a nudge. The step is committed: a broker that is
    down loses only the messages, and the certificate's deadline has the reconciler resend them,
    so a failed send never fails the certificate. ``cleanups`` collects the DNS-01 cleanups
    instead of sending them, for one ``certqueue.dns.cleanup_batch``."""
    try:
        for sig in ctx.follow_ups:
            if cleanups is not None and sig.task == "certqueue.dns.cleanup_all":
                cleanups.append({"certificate_id": sig.args[0], "challenges": list(sig.args[1])})
                continue
            bound(sig, ctx.task.app).apply_async()
        if ctx.replacement is not None:
            bound(ctx.replacement, ctx.task.app).apply_async()
    except Exception as exc:  # noqa: BLE001  (committed work: the reconciler resends it)
        log.warning("batch: follow-up not sent (%s); the reconciler resends it", type(exc).__name__)
    send_nudges(ctx)


def _validate_in_task(
    task: CertqueueTask,
    cid: str,
    window: float,
    handoff: Handoff | None = None,
    cleanups: list[dict[str, Any]] | None = None,
) -> str:
    """Answer, poll, finalize and download inside this task for at most ``window`` seconds; a
    straggler is handed to ``certqueue.acme.validate`` with a countdown (never an unbounded wait).
    ``handoff``: what the start step left for the first run (its lease, the order, the challenges);
    ``cleanups``: where the DNS-01 cleanups go instead of being sent (``_send_after``).

    Between two runs of the step, only the CA is asked whether the order moved (one POST-as-GET,
    no database, no lock); the step runs again, and writes, when it did."""
    import time

    deadline = time.monotonic() + window
    pause = 0.05
    probe: tuple[AcmeClient, Any] | None = None
    while True:
        wait: Wait | None = None
        with session_scope() as session:
            ctx = StepContext(session=session, task=task)
            try:
                out = _validate_step(ctx, cid, handoff)
            except Wait as w:
                wait = w  # commit what the step wrote (answered challenges, poll count)
            finally:
                handoff = None  # the first run only: the lease is given back or finished by now
        _send_after(ctx, cleanups)
        if wait is None:
            return str(out.get("status"))
        if probe is None:
            probe = _order_probe(cid)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                task_sig = signature("certqueue.acme.validate", args=(cid,), immutable=True)
                task_sig.apply_async(countdown=failure.countdown(wait.countdown))
                return "waiting"
            time.sleep(min(pause, left, wait.countdown))
            pause = min(pause * 2, 1.0)
            if probe is None or _order_moved(probe):
                break


def _order_probe(cid: str) -> tuple[AcmeClient, Any] | None:
    """The client and order to ask the CA about, read once (None: nothing to probe, run the step)."""
    with session_scope(write=False) as session:
        cert = session.get(Certificate, cid)
        order = open_order(session, cid) if cert is not None else None
        if cert is None or order is None or not order.order_url:
            return None
        client, _ = _client(session, cert)
        return client, order_from_json(order.order_json or {})


def _order_moved(probe: tuple[AcmeClient, Any]) -> bool:
    """Whether the order left pending/processing at the CA (or the question failed: the step then
    runs again and decides what the error means)."""
    client, res = probe
    try:
        body, _ = _order_status(client, res)
    except Exception:  # noqa: BLE001  (classified by the step, which asks again)
        return True
    return _status_name(body.status) not in ("pending", "processing")


def _issue_one(task: CertqueueTask, job: dict[str, Any], window: float) -> str:
    """One certificate of a batch: start (or resume) its order, then, for HTTP-01 only, validate it
    in this task. Any error hands the certificate to the single-certificate steps, whose failure
    handling (quick retries, parking, failing, fallback) is the one the policy table describes."""
    cid = job["certificate_id"]
    try:
        start_wait: Wait | None = None
        with session_scope() as session:
            # validated next in this task: the start step may leave its lease and reads for it
            ctx = StepContext(session=session, task=task, hand_over=True)
            try:
                out = _start_step(ctx, job)
            except Wait as w:
                start_wait = w  # another step holds the order's lease: keep what was written
        if start_wait is not None:
            _send_after(ctx)
            signature("certqueue.acme.start", args=(job,), immutable=True).apply_async(
                countdown=failure.countdown(start_wait.countdown)
            )
            return "waiting"
        in_task = out.get("status") == "ordered" and ctx.replacement is None
        if in_task:
            # the validate follow-up is done here instead of through the broker
            ctx.follow_ups = [s for s in ctx.follow_ups if s.get("task") != "certqueue.acme.validate"]
        _send_after(ctx)
        if not in_task:
            return str(out.get("status"))
        return _validate_in_task(task, cid, window, ctx.handoff)
    except Exception as exc:  # noqa: BLE001  (mapped to the policy below, per certificate)
        return _hand_off(task, job, exc)


def _hand_off(task: CertqueueTask, job: dict[str, Any], exc: Exception) -> str:
    """A batch's error for one certificate, mapped to the policy table: a permanent one fails it
    here; any other hands it to the single-certificate steps (``certqueue.acme.start``, which
    resumes its order), whose failure handling (quick retries, parking, fallback) applies."""
    cid = job["certificate_id"]
    kind = classify(exc)
    decision = decide(kind_of(kind), retries=0, retry_after=getattr(kind, "retry_after", None))
    log.info("batch: %s: %s; handing it to the single-certificate steps", cid, kind.reason)
    if decision.action is failure.Action.FAIL:
        with session_scope() as session:
            pctx = StepContext(session=session, task=task)
            fail_certificate(pctx, cid, kind)
        _send_after(pctx)
        return "failed"
    # transient (or a key-store error, which stops the worker there): the single step resumes
    try:
        signature("certqueue.acme.start", args=(job,), immutable=True).apply_async(
            countdown=decision.delay if decision.action is failure.Action.RETRY else 0
        )
    except Exception as send_exc:  # noqa: BLE001  (the broker is down too: its deadline resumes it)
        log.warning("batch: %s not handed off (%s); the reconciler resumes it", cid, type(send_exc).__name__)
    return "handed_off"


#: threads of one batch on SQLite: its one writer is held only for the steps' short transactions
#: (no transaction is open while the CA answers), so a few threads overlap their waits on the CA
SQLITE_BATCH_CONCURRENCY = 4


def _batch_concurrency() -> int:
    settings = get_settings()
    n = max(1, settings.automation.batch_concurrency)
    if not settings.database.url.startswith("postgresql"):
        return min(n, SQLITE_BATCH_CONCURRENCY)
    return n


# --- a batch's new HTTP-01 orders, started together ---------------------------------------------
#
# The common case of a batch (a new order for a certificate whose names all prove by HTTP-01) is
# started and validated in phases instead of several transactions per certificate: (1) the whole
# batch's transitions and order rows in one transaction (one lock statement, multi-row INSERTs);
# (2) the newOrders concurrently, each URL committed the moment the CA answers; (3) their
# authorizations, read only once every order is placed (``AcmeClient.fetch_authorizations``);
# (4) the whole batch's challenges, tokens and answered intents in one transaction; (5) the CA half
# of validation concurrently (answer, poll, finalize, download); (6) every issued certificate
# written in one transaction. An order the CA has not issued by then goes on alone in the batch's
# threads (``_validate_in_task``). Anything else (an order to resume, DNS-01 or TLS-ALPN-01 names, a
# request answered already, an external certificate) takes ``_issue_one``, the single-certificate
# start step.


@dataclass
class _Start:
    """A certificate whose new order the batch places with the others."""

    job: dict[str, Any]
    cid: str
    purpose: str
    directory_url: str
    email: str | None
    placing: _Placing
    token: str
    res: Any = None
    client: AcmeClient | None = None
    #: set once this certificate is settled by a phase (deferred, superseded, handed off, failed)
    outcome: str | None = None


def _joins_batch(cert: Certificate | None, job: dict[str, Any], closed: set[int], ordering: set[str]) -> bool:
    """Whether ``cert`` gets a new order in the batch's shared phases (else ``_issue_one``)."""
    if cert is None or cert.external or cert.pending_issuance_id is not None or cert.id in ordering:
        return False
    intent = job.get("intent")
    if isinstance(intent, int) and not isinstance(intent, bool) and intent in closed:
        return False
    if any(_challenge_type_for(cert, name) not in ("http-01", "dns-01") for name in cert.domains):
        return False
    if cert.state in (State.REQUESTED, State.FAILED, State.ISSUING):
        return True
    if cert.state == State.RENEWING:
        return states.in_pipeline(cert.state, cert.work_deadline)
    if cert.state == State.ACTIVE and (job.get("purpose") or "issue") == "renew":
        return _renewal_due(cert, job) and states.in_pipeline(State.RENEWING, cert.work_deadline)
    return False


def _prepare_together(
    task: CertqueueTask, jobs: list[dict[str, Any]], outcomes: dict[str, int]
) -> tuple[list[_Start], list[dict[str, Any]]]:
    """Phase 1, one transaction: lock the batch, enter the pipeline and write the new orders'
    rows (leased, charged to the budgets). Returns the starts and the jobs left to ``_issue_one``;
    any error leaves the whole batch to it, with nothing written and the budgets given back."""
    ids = [j.get("certificate_id") for j in jobs]
    ids_ok = [i for i in ids if isinstance(i, str)]
    starts: list[_Start] = []
    rest: list[dict[str, Any]] = []
    deferred = 0
    shared_budget = False
    now = utcnow()
    try:
        with session_scope() as session:
            # the batch's accounts first, in a transaction of their own: a first use registers the
            # account and commits, which must not commit half of the phase below
            accounts = select(Certificate.directory_url, Certificate.email).where(Certificate.id.in_(ids_ok))
            for directory_url, email in session.execute(accounts.distinct()).tuples():
                client_for(session, directory_url, email)
        with session_scope() as session:
            ctx = StepContext(session=session, task=task)
            # budgets kept outside this transaction (Redis, or PostgreSQL's own) are given back
            # by hand when it rolls back; SQLite's live in it and roll back with it
            shared_budget = rate_limiter(session) is rate_limiter()
            certs = lock_certificates(session, ids_ok)
            ordering = set(
                session.execute(
                    select(Order.certificate_id).where(
                        Order.certificate_id.in_(ids_ok), Order.status.in_(OPEN_ORDER)
                    )
                ).scalars()
            )
            closed = intents.closed_among(session, [j.get("intent") for j in jobs])
            in_flight: dict[str, int] = {}
            seen: set[str] = set()
            for job in jobs:
                cid = job.get("certificate_id")
                cert = certs.get(cid) if isinstance(cid, str) else None
                joins = cert is not None and cid not in seen and _joins_batch(cert, job, closed, ordering)
                if isinstance(cid, str):
                    seen.add(cid)
                if not joins:
                    rest.append(job)
                    continue
                assert cert is not None
                _enter(session, cert, job)
                purpose = "issue" if cert.state == State.ISSUING else "renew"
                client, account_id = _client(session, cert)
                try:
                    placing = _prepare_order(
                        ctx, cert, client, account_id, purpose, in_flight=in_flight, flush=False
                    )
                except Deferred:
                    deferred += 1  # written: the certificate waits for its budget (committed below)
                    continue
                assert placing.order.lease_token is not None
                token = placing.order.lease_token
                starts.append(_Start(job, cert.id, purpose, cert.directory_url, cert.email, placing, token))
            failpoints.hit("batch.prepare")
        _send_after(ctx)
    except Exception as exc:  # noqa: BLE001  (nothing was written: each certificate goes alone)
        log.info("batch: the shared start failed (%s); each certificate starts alone", type(exc).__name__)
        if shared_budget:
            limiter = rate_limiter()
            for st in starts:
                limiter.release(st.placing.keys, now)
        return [], list(jobs)
    if deferred:
        outcomes["deferred"] = outcomes.get("deferred", 0) + deferred
    return starts, rest


def _place_one(task: CertqueueTask, st: _Start) -> None:
    """Phase 2, in a batch thread: the newOrder, its URL committed as the CA answers. Its
    authorizations are read in the next phase, once every order of the batch is placed
    (``AcmeClient.fetch_authorizations`` says why)."""
    try:
        with session_scope() as session:
            ctx = StepContext(session=session, task=task)
            client, _ = client_for(session, st.directory_url, st.email)
            lease = OrderLease(ctx, st.cid, st.placing.order.id, st.token)
            try:
                res = _place_order(
                    ctx, client, st.placing, lease, fetch_authorizations=False, row_committed=True
                )
            except Deferred:
                st.outcome = "deferred"  # the order is closed and the certificate waits (committed)
            except BaseException:
                lease.release()
                raise
        _send_after(ctx)
        if st.outcome is None:
            st.res, st.client = res, client
    except Exception as exc:  # noqa: BLE001  (per certificate: the policy table)
        st.outcome = _hand_off(task, st.job, exc)


def _read_one(task: CertqueueTask, st: _Start) -> None:
    """Phase 3, in a batch thread, with this thread's own client: the placed order's
    authorizations. An error gives the lease back and hands the certificate to the single steps,
    which resume the order by its stored URL."""
    try:
        with session_scope(write=False) as session:
            client, _ = client_for(session, st.directory_url, st.email)
        st.res, st.client = client.fetch_authorizations(st.res), client
    except Exception as exc:  # noqa: BLE001  (per certificate: the policy table)
        _give_back(st.placing.order.id, st.token)
        st.outcome = _hand_off(task, st.job, exc)


def _record_together(
    task: CertqueueTask, placed: list[_Start]
) -> tuple[list[tuple[_Start, Handoff]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Phase 4, one transaction: lock the batch again, and write every placed order's state, its
    challenges and HTTP-01 tokens (served from this commit on) and its answered intents. The lease
    stays each order's, handed over to its validation; an order with DNS-01 records to present
    finishes its lease and is returned as an item of ``certqueue.dns.present_batch`` instead. An
    error gives every lease back and leaves each certificate to the single start step
    (``_issue_one``: its order's URL is stored, so it resumes it, and a certificate's own error is
    then that certificate's alone). Returns the handoffs, the jobs left alone and the DNS items."""
    settings = get_settings()
    out: list[tuple[_Start, Handoff]] = []
    dns_items: list[dict[str, Any]] = []
    if not placed:
        return out, [], dns_items
    try:
        with session_scope() as session:
            rows = OrderLease.reacquire_many(
                session, [(st.cid, st.placing.order.id, st.token) for st in placed]
            )
            built_all: list[tuple[Challenge, str]] = []
            recorded: list[tuple[_Start, Certificate, Order, list[Challenge]]] = []
            for st in placed:
                row = rows.get(st.placing.order.id)
                if row is None:
                    st.outcome = "superseded"  # closed or taken over while the CA answered
                    continue
                cert, order = row
                assert st.client is not None
                order.order_json = order_to_json(st.res)
                _record_ordered(session, cert, order, st.purpose)
                built = build_challenges(cert, st.client, order, st.res, settings)
                built_all.extend(built)
                _touch(cert)
                recorded.append((st, cert, order, [ch for ch, _ in built]))
            write_challenges(session, built_all, settings)
            ordered = [st.cid for st, *_ in recorded]
            intents.complete_many(session, ordered, ("issue", "renew"), outcome="ordered")
            for st, cert, order, chs in recorded:
                assert st.client is not None
                dns = [ch.id for ch in chs if ch.type == "dns-01"]
                if dns:
                    OrderLease.finish(order)  # the dns pool presents next; validation resumes the order
                    dns_items.append({"job": st.job, "challenges": dns})
                    st.outcome = "presenting"
                    continue
                handoff = Handoff(
                    order_id=order.id,
                    token=st.token,
                    client=st.client,
                    res=st.res,
                    to_answer=answerable(chs),
                    csr_pem=order.csr_pem,
                    preferred_chain=cert.preferred_chain,
                )
                out.append((st, handoff))
            failpoints.hit("batch.record")
    except Exception as exc:  # noqa: BLE001  (each certificate goes alone)
        log.info("batch: recording the orders failed (%s); each certificate goes alone", type(exc).__name__)
        for st in placed:
            st.outcome = None  # what the failed transaction decided is undone with it
            _give_back(st.placing.order.id, st.token)
        return [], [st.job for st in placed], []
    return out, [], dns_items


def _send_batch(task: CertqueueTask, name: str, items: list[dict[str, Any]]) -> None:
    """One message of task ``name`` for all of ``items`` (committed work), none when there are none.
    A broker that is down loses only the message: the reconciler resumes the certificates past their
    deadlines and sweeps the DNS records of finished orders."""
    if not items:
        return
    try:
        bound(signature(name, args=(items,), immutable=True), task.app).apply_async()
    except Exception as exc:  # noqa: BLE001  (committed work: the reconciler resumes it)
        log.warning("batch: %s not sent (%s); the reconciler resumes it", name, type(exc).__name__)


def _give_back(order_id: int, token: str) -> None:
    with session_scope() as session:
        give_back_lease(session, Order, order_id, token)


@dataclass
class _Asked:
    """A handed-over order whose validation the batch runs with the others."""

    st: _Start
    handoff: Handoff
    ans: _Answer | None = None


def _ask_one(task: CertqueueTask, item: _Asked) -> None:
    """Phase 5, in a batch thread, with this thread's own client (the one that placed the order
    may be busy on another thread): the CA half of the validation step. An error gives the lease
    back and hands the certificate to the single steps, as in ``_validate_step``."""
    st, h = item.st, item.handoff
    try:
        with session_scope(write=False) as session:
            client, _ = client_for(session, st.directory_url, st.email)
        item.ans = _ask_ca(client, h.res, h.to_answer, h.csr_pem, h.preferred_chain)
    except Exception as exc:  # noqa: BLE001  (per certificate: the policy table)
        _give_back(h.order_id, h.token)
        st.outcome = _hand_off(task, st.job, exc)


def _write_together(task: CertqueueTask, asked: list[_Asked]) -> list[_Start]:
    """Phase 6, one transaction: lock the batch again (one statement), read every order's challenges
    (one more) and record each issued one (``_write_answer``). An order the CA has not issued yet
    has its answered challenges and poll written and is returned, to go on alone
    (``_validate_in_task``); so is everything, with its lease given back, when the shared write
    fails."""
    settings = get_settings()
    issued = [a for a in asked if a.ans is not None]
    later: list[_Start] = []
    if not issued:
        return later
    try:
        with session_scope() as session, session.no_autoflush:
            # the batch's own flushes only: its issuances together (their ids), then the commit
            ctx = StepContext(session=session, task=task, token_orders=[])
            order_ids = [a.handoff.order_id for a in issued]
            rows = OrderLease.reacquire_many(
                session, [(a.st.cid, a.handoff.order_id, a.handoff.token) for a in issued]
            )
            by_order: dict[int, list[Challenge]] = {}
            for ch in session.execute(select(Challenge).where(Challenge.order_id.in_(order_ids))).scalars():
                by_order.setdefault(ch.order_id, []).append(ch)
            stored: dict[int, Issuance] = {}
            for a in issued:
                assert a.ans is not None
                row = rows.get(a.handoff.order_id)
                if row is not None and a.ans.issued and _stores_issuance(row[0], a.ans):
                    assert a.ans.fullchain is not None
                    stored[row[1].id] = _new_issuance(session, row[0], row[1], a.ans.fullchain, flush=False)
            session.flush()  # one multi-row INSERT: the issuances' ids
            for a in issued:
                assert a.ans is not None
                row = rows.get(a.handoff.order_id)
                if row is None:
                    a.st.outcome = "superseded"
                    continue
                cert, order = row
                if not a.ans.issued:
                    # not issued yet (or rejected): its answers written here, the rest done alone
                    _note_answers(cert, order, by_order.get(order.id, []), a.handoff.to_answer, a.ans)
                    later.append(a.st)
                    continue
                out = _write_answer(
                    ctx,
                    cert,
                    order,
                    by_order.get(order.id, []),
                    a.handoff.to_answer,
                    a.ans,
                    settings,
                    stored.get(order.id),
                )
                a.st.outcome = str(out.get("status"))
            delete_http01_tokens(session, ctx.token_orders or [])
            failpoints.hit("batch.write")
        _send_after(ctx)
    except Exception as exc:  # noqa: BLE001  (each certificate goes alone)
        log.info(
            "batch: recording the validations failed (%s); each certificate goes alone", type(exc).__name__
        )
        later = []
        for a in issued:
            a.st.outcome = None
            _give_back(a.handoff.order_id, a.handoff.token)
            later.append(a.st)
    return later


def _validate_alone(
    task: CertqueueTask, job: dict[str, Any], window: float, cleanups: list[dict[str, Any]] | None = None
) -> str:
    """A batch's certificate whose validation goes on alone: the single validation step, in this
    task for what is left of the window, then through the broker."""
    try:
        return _validate_in_task(task, job["certificate_id"], window, cleanups=cleanups)
    except Exception as exc:  # noqa: BLE001  (per certificate: the policy table)
        return _hand_off(task, job, exc)


def _phased() -> bool:
    """Whether a batch starts and validates its new HTTP-01 orders together
    (``automation.batch_phases``), or each certificate alone (``_issue_one``)."""
    return bool(get_settings().automation.batch_phases)


@shared_task(bind=True, base=CertqueueTask, name="certqueue.acme.issue_batch", ignore_result=True)
def issue_batch(self: CertqueueTask, jobs: list[dict[str, Any]], _transient: int = 0) -> Any:
    """``[{"certificate_id": ..., "purpose": ..., "intent": id}, ...]``: start every order and
    validate the HTTP-01 ones here, concurrently (one thread and ACME client per certificate, at most
    ``automation.batch_concurrency``). Idempotent: a redelivered batch resumes the same orders."""
    window = get_settings().automation.validation_window_seconds
    concurrency = _batch_concurrency()
    outcomes: dict[str, int] = {}
    if not _phased():
        for outcome in batch_map(lambda job: _issue_one(self, job, window), jobs, concurrency):
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        return {"certificates": len(jobs), "outcomes": outcomes}
    started = time.monotonic()
    starts, rest = _prepare_together(self, jobs, outcomes)
    batch_map(lambda st: _place_one(self, st), starts, concurrency)
    batch_map(lambda st: _read_one(self, st), [st for st in starts if st.outcome is None], concurrency)
    handed, again, dns_items = _record_together(self, [st for st in starts if st.outcome is None])
    _send_batch(self, "certqueue.dns.present_batch", dns_items)
    asked = [_Asked(st, h) for st, h in handed]
    batch_map(lambda a: _ask_one(self, a), asked, concurrency)
    later = _write_together(self, asked)
    for st in starts:
        if st.outcome is not None:
            outcomes[st.outcome] = outcomes.get(st.outcome, 0) + 1
    left = max(window - (time.monotonic() - started), 0.0)
    work: list[Any] = [*later, *rest, *again]

    def run(item: Any) -> str:
        if isinstance(item, _Start):
            return _validate_alone(self, item.job, left)
        return _issue_one(self, item, window)

    for outcome in batch_map(run, work, concurrency):
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return {"certificates": len(jobs), "outcomes": outcomes}


@shared_task(bind=True, base=CertqueueTask, name="certqueue.acme.validate_batch", ignore_result=True)
def validate_batch(self: CertqueueTask, jobs: list[dict[str, Any]], _transient: int = 0) -> Any:
    """``[{"certificate_id": ..., ...}, ...]``, sent by ``certqueue.dns.present_batch`` once their
    DNS-01 records are visible: each certificate validated here, concurrently (answer, poll the CA
    for a bounded window, finalize, download, store); a straggler goes on with
    ``certqueue.acme.validate`` and a countdown, an error to the single steps by the policy."""
    window = get_settings().automation.validation_window_seconds
    outcomes: dict[str, int] = {}
    cleanups: list[dict[str, Any]] = []  # appended to from the batch's threads (list.append is atomic)
    for outcome in batch_map(
        lambda job: _validate_alone(self, job, window, cleanups), jobs, _batch_concurrency()
    ):
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    _send_batch(self, "certqueue.dns.cleanup_batch", cleanups)
    return {"certificates": len(jobs), "outcomes": outcomes}
