"""The shared steps of the pipeline, used by the task modules (which never import each other):
payload parsing, creating or resuming an ACME order, cleaning up challenges, recording a permanent
failure (with CA fallback and renewal rescheduling), and naming follow-up tasks.

Owns ``orders``, ``challenges`` (their ACME side) and ``http01_tokens``; state changes go through
``certqueue.lifecycle.states`` and intents through ``certqueue.intents``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import random
from typing import Any, Literal, cast

from celery import chain, chord, signature
from celery.canvas import Signature
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from certqueue import certificates, challenge_tokens, crypto, intents, solvers
from certqueue.acme.accounts import client_for
from certqueue.acme.client import AcmeClient, order_from_json, order_to_json
from certqueue.acme.errors import IncompleteOrder
from certqueue.acme.profiles import check_profile
from certqueue.acme.ratelimit import (
    DatabaseRateLimiter,
    RateLimiter,
    budget_keys,
    keys_for_ca_problem,
    rate_limiter_for,
)
from certqueue.config import get_settings
from certqueue.db import is_postgres, lock_certificate
from certqueue.errors import CertqueueError, PermanentError, RateLimited
from certqueue.lifecycle import states
from certqueue.lifecycle.backoff import backoff
from certqueue.lifecycle.failure import MAX_RATE_LIMIT_BLOCK, clamp_retry_after
from certqueue.lifecycle.ratelimit_policy import PreviousIssuance, ca_block, classify_order
from certqueue.models import Certificate, Challenge, Http01Token, Issuance, Order, State, utcnow
from certqueue.tasks.base import CertqueueTask, StepContext

log = logging.getLogger("certqueue.pipeline")

OPEN_ORDER = ("creating", "pending", "ready", "processing")
#: a CA rate limit longer than this sends the certificate to its next CA (when it has one)
LONG_RATE_LIMIT_SECONDS = 3600


class Deferred(Exception):
    """The work cannot start before ``until`` (a budget, the CA's rate limit, the in-flight cap).
    Raised by ``start_order`` after it recorded why; the caller hands the work back to the
    database until then: no message is held and nothing spins."""

    def __init__(self, until: dt.datetime, reason: str) -> None:
        super().__init__(reason)
        self.until = until
        self.reason = reason


#: what a budget scope means, for people (``certqueue list``, ``status``, the API)
_SCOPE_TEXT = {
    "new_orders": "new orders per account",
    "certs_per_domain": "certificates per domain {subject}",
    "duplicate_certs": "duplicate certificates for these names",
    "failed_authz": "failed validations for {subject}",
    "consecutive_failed_authz": "consecutive failed validations for {subject} (the CA paused it)",
    "ca": "the CA's own rate limit",
}


def describe_budgets(names: Any) -> str:
    """``rate limit: certificates per domain example.org`` from the blocked budget keys' names."""
    parts = []
    for name in names or ():
        scope, _, rest = str(name).partition("/")
        subject = rest.split("/", 2)[-1] if rest.count("/") >= 2 else ""
        parts.append(_SCOPE_TEXT.get(scope, scope).format(subject=subject))
    return "rate limit: " + (", ".join(dict.fromkeys(parts)) or "budget spent")


def defer_work(ctx: StepContext, cert: Certificate, until: dt.datetime, reason: str, *, kind: str) -> None:
    """Record why ``cert`` waits and hand it back to dispatch at ``until``: its open issue/renew
    intents wait until then (a claimed due renewal gets one), its deadline moves past it, and
    dispatch is asked to run then."""
    session = ctx.session
    ctx.wake((until - utcnow()).total_seconds() + 0.2)
    cert.next_attempt_at = until
    cert.waiting_reason = reason[:256]
    cert.work_deadline = until + dt.timedelta(seconds=get_settings().automation.stuck_after_seconds)
    open_ = [i for i in intents.open_intents(session, cert.id) if i.kind in ("issue", "renew")]
    if not open_:
        open_ = [intents.record(session, "renew" if cert.state == State.RENEWING else "issue", cert.id)]
    for intent in open_:
        intent.status = "pending"
        intent.not_before = until
        intent.deadline = None
    states.record(
        session, cert.id, "deferred", reason=kind, data={"until": until.isoformat(), "why": reason[:256]}
    )


def task(name: str, *args: Any, **options: Any) -> Signature:
    """A follow-up by task name (task modules never import each other)."""
    sig = signature(name, args=args, immutable=True)
    return sig.set(**options) if options else sig


# --- payloads -----------------------------------------------------------------------------------


# --- helpers ------------------------------------------------------------------------------------


def _status_name(status: Any) -> str:
    """acme's Status constants print as ``Status(pending)``; the name is what we store."""
    return str(getattr(status, "name", status))


def order_key_aad(certificate_id: str, csr_pem: str) -> bytes:
    return f"orders:{certificate_id}:{hashlib.sha256(csr_pem.encode()).hexdigest()}:key".encode()


def open_order(session: Session, certificate_id: str) -> Order | None:
    return session.execute(
        select(Order)
        .where(Order.certificate_id == certificate_id, Order.status.in_(OPEN_ORDER))
        .order_by(Order.id.desc())
        .limit(1)
    ).scalar_one_or_none()


def _touch(cert: Certificate) -> None:
    cert.work_deadline = utcnow() + dt.timedelta(seconds=get_settings().automation.stuck_after_seconds)


def _client(session: Session, cert: Certificate) -> tuple[AcmeClient, int]:
    return client_for(session, cert.directory_url, cert.email)


def _challenge_type_for(cert: Certificate, name: str) -> str:
    return str((cert.challenge_map or {}).get(name, cert.challenge_type))


def start_order(ctx: StepContext, cert: Certificate, purpose: str) -> dict[str, Any]:
    """Create or resume the certificate's ACME order and present its challenges."""
    session = ctx.session
    settings = get_settings()
    order = open_order(session, cert.id)
    client, account_id = _client(session, cert)
    if order is None:
        order = _new_order(ctx, cert, client, account_id, purpose)
        res = order_from_json(order.order_json or {})
    else:
        res = order_from_json(order.order_json or {})
    if not res.authorizations:
        # an order stored after IncompleteOrder: fetch its authorizations now
        res = client.refresh_order(res)
        order.order_json = order_to_json(res)
    existing = session.execute(select(Challenge).where(Challenge.order_id == order.id)).scalars().all()
    if not existing:
        expires = utcnow() + dt.timedelta(seconds=settings.automation.order_timeout_seconds + 600)
        for authz in res.authorizations:
            if _status_name(authz.body.status) == "valid":
                continue  # reused authorization: nothing to prove
            ident = authz.body.identifier.value
            name = f"*.{ident}" if authz.body.wildcard else ident
            ctype = _challenge_type_for(cert, name)
            info = client.challenge_for(authz, cast(Literal["http-01", "dns-01", "tls-alpn-01"], ctype))
            ch = Challenge(
                order_id=order.id,
                certificate_id=cert.id,
                identifier=name,
                authz_url=authz.uri,
                type=ctype,
                url=info.url,
                token=info.token,
                dns_name=info.dns_name,
                dns_value=info.dns_value,
                provider=(solvers.dns_solver_for(settings, name) or cert.dns_provider)
                if ctype == "dns-01"
                else None,
                status="pending",
            )
            session.add(ch)
            session.flush()
            if ctype == "http-01":
                session.add(
                    Http01Token(
                        token=info.token,
                        key_authorization=info.key_authorization,
                        certificate_id=cert.id,
                        challenge_id=ch.id,
                        expires_at=expires,
                    )
                )
                ch.status = "presented"
            elif ctype == "tls-alpn-01":
                challenge_tokens.present_tls_alpn01(session, ch, info.key_authorization, expires)
            existing.append(ch)  # type: ignore[attr-defined]
    _touch(cert)
    dns = [c for c in existing if c.type == "dns-01" and c.status in ("pending", "presented")]
    if dns:
        header = [
            chain(
                task("certqueue.dns.present", cert.id, c.id),
                task("certqueue.dns.wait_visible", cert.id, c.id),
            )
            for c in dns
        ]
        ctx.replace(chord(header, task("certqueue.acme.validate", cert.id)))
    else:
        ctx.then(task("certqueue.acme.validate", cert.id))
    return {"certificate_id": cert.id, "order": order.id, "status": "ordered"}


_limiter_cache: dict[str, RateLimiter] = {}


def rate_limiter(session: Session | None = None) -> RateLimiter:
    """One limiter per process (Redis when the broker is Redis, else the database); on SQLite it
    works inside the task's own transaction (``session``), which holds the only write lock."""
    lim = _process_rate_limiter()
    if session is not None and isinstance(lim, DatabaseRateLimiter) and not is_postgres(session):
        return lim.bound(session)
    return lim


def _process_rate_limiter() -> RateLimiter:
    settings = get_settings()
    key = f"{settings.broker.url}|{settings.database.url}"
    lim = _limiter_cache.get(key)
    if lim is None:
        lim = rate_limiter_for(settings)
        _limiter_cache.clear()
        _limiter_cache[key] = lim
    return lim


def _new_order(
    ctx: StepContext, cert: Certificate, client: AcmeClient, account_id: int, purpose: str
) -> Order:
    """Check the profile and the shared rate-limit budget, then open one order at the CA.

    Over budget, nothing is sent: ``Deferred`` hands the work back to the database until the budget
    returns. A ``rateLimited`` answer from the CA sets the budget from its Retry-After, and defers
    too. The in-flight cap (dispatch keeps under it; a race can still meet it) defers briefly.
    """
    session = ctx.session
    settings = get_settings()
    if cert.profile:
        check_profile(client.directory, cert.profile, cert.domains, settings.acme.profile_name_limits)
    now = utcnow()
    in_flight_cap = settings.automation.max_orders_in_flight_per_ca
    if in_flight_cap:
        in_flight = session.execute(
            select(func.count())
            .select_from(Order)
            .join(Certificate, Certificate.id == Order.certificate_id)
            .where(Order.status.in_(OPEN_ORDER), Certificate.directory_url == cert.directory_url)
        ).scalar_one()
        if in_flight >= in_flight_cap:
            until = now + dt.timedelta(seconds=5.0 + 5.0 * random.random())
            defer_work(ctx, cert, until, "capacity: open orders at this CA at the cap", kind="capacity")
            raise Deferred(until, "capacity")
    limiter = rate_limiter(session)
    replaces = None
    previous = None
    if purpose == "renew" and cert.current_issuance_id:
        current = session.get(Issuance, cert.current_issuance_id)
        if current is not None:
            replaces = current.ari_cert_id
            previous = PreviousIssuance(
                names=crypto.cert_info(current.cert_pem).names,
                directory_url=cert.directory_url,
                issued_at=current.not_before,
            )
    # what the order is for decides what it is charged (a renewal of the same names is not a new
    # certificate for the CA's per-domain budget)
    order_purpose = classify_order(
        cert.domains, directory_url=cert.directory_url, previous=previous, replaces=replaces, now=now
    )
    keys = budget_keys(account_id, cert.directory_url, cert.domains, limiter.policy, purpose=order_purpose)
    decision = limiter.try_acquire(keys, now)
    if not decision.allowed:
        until = decision.retry_at or now + dt.timedelta(seconds=60)
        defer_work(ctx, cert, until, describe_budgets(decision.blocked), kind="rate_limited")
        raise Deferred(until, "rate_limited")
    key_pem = _order_key(session, cert)
    csr = crypto.make_csr(
        key_pem,
        cert.domains,
        organization=cert.organization,
        country=cert.country,
        state=cert.state_province,
        locality=cert.locality,
        allow_ip=True,  # IP names were checked against the CA's profile when requested (RFC 8738)
    ).decode()

    def charge_as_renewal() -> None:
        """The CA answered alreadyReplaced: the order goes again without ``replaces``, so it is a
        plain renewal and is charged as one."""
        nonlocal keys
        if order_purpose != "ari_renewal":
            return
        extra = budget_keys(account_id, cert.directory_url, cert.domains, limiter.policy, purpose="renewal")
        again = limiter.try_acquire(extra, now)
        if not again.allowed:
            until = again.retry_at or now + dt.timedelta(seconds=60)
            defer_work(ctx, cert, until, describe_budgets(again.blocked), kind="rate_limited")
            raise Deferred(until, "rate_limited")
        keys = [*keys, *extra]

    try:
        res = client.new_order(
            csr.encode(), profile=cert.profile, replaces=replaces, on_already_replaced=charge_as_renewal
        )
    except IncompleteOrder as exc:
        res = exc.order  # the order exists at the CA: store it and resume, never order again
    except RateLimited as exc:
        limiter.release(keys, now)
        exc.retry_after = clamp_retry_after(exc.retry_after, MAX_RATE_LIMIT_BLOCK)
        if (exc.retry_after or 3600) > LONG_RATE_LIMIT_SECONDS and next_ca(
            cert, PermanentError(exc.message, reason="acme:rateLimited")
        ) is not None:
            raise PermanentError(
                f"rate limited for {int(exc.retry_after or 3600)}s: trying the next CA",
                reason="acme:rateLimited",
            ) from None
        until = now + ca_block(exc.message, exc.retry_after)  # a pause is checked again daily
        for k in keys_for_ca_problem(keys, exc.message):
            limiter.block(k, until, now)
        defer_work(ctx, cert, until, "rate limit: the CA answered rateLimited", kind="ca_rate_limited")
        raise Deferred(until, "ca_rate_limited") from None
    except BaseException:
        limiter.release(keys, now)
        raise
    cert.next_attempt_at = None
    cert.waiting_reason = None
    # The order URL is stored in the same commit as the row: a redelivered task finds it and resumes
    # instead of ordering again.
    order = Order(
        certificate_id=cert.id,
        account_id=account_id,
        purpose=purpose,
        csr_pem=csr,
        key_enc=certificates.keystore().encrypt(key_pem, order_key_aad(cert.id, csr)),
        order_url=res.uri,
        order_json=order_to_json(res),
        status=_status_name(res.body.status),
    )
    session.add(order)
    session.flush()
    states.record(session, cert.id, "order", reason=purpose, data={"order": order.id})
    return order


def _order_key(session: Session, cert: Certificate) -> bytes:
    """A fresh key for the new order; the current one only when the certificate asks to reuse it."""
    if cert.reuse_key and not cert.force_new_key and cert.current_issuance_id:
        iss = cert.current_issuance
        if iss is not None and iss.key_enc is not None:
            return certificates.decrypt_key(iss)
    return crypto.new_private_key_pem(cert.key_type)


def cleanup_challenges(ctx: StepContext, order: Order) -> None:
    """Remove HTTP-01 tokens now and send DNS-01 cleanups to the dns pool; success or failure."""
    session = ctx.session
    session.execute(
        delete(Http01Token).where(
            Http01Token.challenge_id.in_(select(Challenge.id).where(Challenge.order_id == order.id))
        )
    )
    challenge_tokens.remove_tls_alpn01(session, order.id)
    now = utcnow()
    for ch in session.execute(select(Challenge).where(Challenge.order_id == order.id)).scalars():
        if ch.status == "cleaned":
            continue
        if ch.type in ("http-01", "tls-alpn-01"):
            ch.status = "cleaned"
            ch.cleaned_at = now
            continue
        # DNS-01, even when no handle was recorded: a present whose commit was lost (a database
        # crash right after the provider call) still left a record, and cleanup is idempotent
        ctx.then(task("certqueue.dns.cleanup", order.certificate_id, ch.id))


def fail_certificate(ctx: StepContext, certificate_id: str, exc: CertqueueError) -> dict[str, Any]:
    """A permanent failure of the pipeline: the order is abandoned, challenges cleaned up, and the
    certificate goes FAILED (first issuance) or back to ACTIVE with the next attempt scheduled
    (renewal: the old certificate keeps serving)."""
    session = ctx.session
    settings = get_settings()
    cert = lock_certificate(session, certificate_id)
    if cert is None:
        return {"status": "failed", "reason": exc.reason}
    order = open_order(session, cert.id)
    if order is not None:
        order.status = "invalid"
        order.error = exc.reason
        order.finished_at = utcnow()
        cleanup_challenges(ctx, order)
    if exc.reason.startswith("acme:") or exc.reason.startswith("dns:"):
        types = (
            sorted(
                {
                    c.type
                    for c in session.execute(
                        select(Challenge).where(Challenge.order_id == order.id)
                    ).scalars()
                }
            )
            if order
            else []
        )
        states.record(
            session,
            cert.id,
            "validation_error",
            reason=exc.reason,
            data={"type": types[0] if len(types) == 1 else ",".join(types) or "unknown"},
        )
    if cert.state == State.REQUESTED:
        # the failure came before the task's first commit (e.g. account registration): the
        # issuance did start, and it is what failed
        states.transition(session, cert, State.ISSUING, reason="issue", actor="task")
    nxt = next_ca(cert, exc)
    if nxt is not None and cert.state in (State.ISSUING, State.RENEWING):
        # this CA failed for good: the same work starts again at the next CA (its own account)
        states.record(
            session, cert.id, "ca_fallback", reason=exc.reason, data={"from": cert.directory_url, "to": nxt}
        )
        cert.directory_url = nxt
        cert.last_error = exc.reason
        _touch(cert)
        purpose = "renew" if cert.state == State.RENEWING else "issue"
        ctx.then(task("certqueue.acme.start", {"certificate_id": cert.id, "purpose": purpose}))
        return {"certificate_id": cert.id, "status": "fallback", "reason": exc.reason, "ca": nxt}
    cert.last_error = exc.reason
    cert.work_deadline = None
    ctx.nudge = True  # capacity freed: dispatch may start the next order
    if cert.state == State.ISSUING:
        states.record(session, cert.id, "issuance", reason="failure", data={"reason": exc.reason})
        states.transition(session, cert, State.FAILED, reason=exc.reason)
        intents.complete(session, cert.id, ("issue", "renew"), outcome=exc.reason, failed=True)
    elif cert.state == State.RENEWING:
        cert.attempts += 1
        delay = backoff(
            cert.attempts,
            initial=settings.automation.retry_delay_seconds,
            cap=max(settings.automation.retry_delay_seconds, 6 * 3600),
        )
        cert.renew_at = utcnow() + dt.timedelta(seconds=delay)
        cert.next_attempt_at = cert.renew_at
        cert.pending_issuance_id = None
        states.record(session, cert.id, "renewal", reason="failure", data={"reason": exc.reason})
        states.transition(session, cert, State.ACTIVE, reason=f"renewal failed: {exc.reason}")
    return {"certificate_id": cert.id, "status": "failed", "reason": exc.reason}


#: failures that say "not at this CA" (its policy, its account rules, its availability), so the next
#: CA in the certificate's list may succeed; a malformed request or a bad CSR would fail anywhere
FALLBACK_REASONS = frozenset(
    {
        "acme:externalAccountRequired",
        "acme:caa",
        "acme:rejectedIdentifier",
        "acme:unsupportedIdentifier",
        "acme:unauthorized",
        "acme:connection",
        "acme:dns",
        "acme:tls",
        "acme:incorrectResponse",
        "acme:serverInternal",
        "acme:server",
        "acme:network",
        "acme:timeout",
        "acme:orderInvalid",
        "acme:invalidProfile",
        "acme:accountDoesNotExist",
        "acme:rateLimited",
        "acme:unauthorizedAccount",
    }
)


def next_ca(cert: Certificate, exc: CertqueueError) -> str | None:
    """The CA after the current one in the certificate's list, when ``exc`` is worth falling back for."""
    urls = list(cert.directory_urls or [])
    if exc.reason not in FALLBACK_REASONS or cert.directory_url not in urls:
        return None
    i = urls.index(cert.directory_url)
    return str(urls[i + 1]) if i + 1 < len(urls) else None


# --- parking: transient trouble never fails a certificate -----------------------------------------

#: states in which a certificate's work can be parked and resumed by the reconciler
PARKABLE = (State.REQUESTED, State.ISSUING, State.RENEWING, State.ISSUED)


def park_certificate(
    ctx: StepContext, certificate_id: str, exc: CertqueueError, delay: float
) -> dict[str, Any]:
    """Hand the certificate's work back to the database for ``delay`` seconds: no message is held
    meanwhile, nothing fails, and the reconciler (or dispatch, for an open intent) resumes it."""
    session = ctx.session
    cert = lock_certificate(session, certificate_id)
    if cert is None or cert.state not in PARKABLE:
        return {"certificate_id": certificate_id, "status": "noop"}
    now = utcnow()
    resume = now + dt.timedelta(seconds=delay)
    cert.work_deadline = resume
    cert.last_error = exc.reason
    for intent in intents.open_intents(session, cert.id):
        intent.status = "pending"
        intent.not_before = resume
        intent.deadline = None
    states.record(session, cert.id, "backoff", reason=exc.reason, data={"seconds": round(delay, 1)})
    ctx.wake(delay + 0.2)
    log.warning("%s: %s persists; parked for %.0fs", cert.id, exc.reason, delay)
    return {"certificate_id": cert.id, "status": "backing_off", "reason": exc.reason}


def parks_so_far(session: Session, certificate_id: str) -> int:
    """Consecutive parkings of this certificate's work in the last day (for a growing delay)."""
    from certqueue.models import Event

    since = utcnow() - dt.timedelta(days=1)
    return int(
        session.execute(
            select(func.count())
            .select_from(Event)
            .where(Event.certificate_id == certificate_id, Event.kind == "backoff", Event.at >= since)
        ).scalar_one()
    )


def certificate_of(args: tuple[Any, ...]) -> str | None:
    """The certificate id of a pipeline task's arguments (a payload dict or a bare id)."""
    if not args:
        return None
    first = args[0]
    if isinstance(first, dict):
        cid = first.get("certificate_id")
        return cid if isinstance(cid, str) else None
    return first if isinstance(first, str) else None


class PipelineTask(CertqueueTask):
    """A task working on one certificate: permanent errors fail (or fall back, or reschedule) it,
    persistent transient errors park it."""

    abstract = True

    def on_permanent(self, ctx: StepContext, exc: CertqueueError, *args: Any) -> Any:
        cid = certificate_of(args)
        return fail_certificate(ctx, cid, exc) if cid else None

    def parks(self, ctx: StepContext, *args: Any) -> int:
        cid = certificate_of(args)
        return parks_so_far(ctx.session, cid) if cid else 0

    def on_park(self, ctx: StepContext, exc: CertqueueError, delay: float, *args: Any) -> Any:
        cid = certificate_of(args)
        return park_certificate(ctx, cid, exc, delay) if cid else None
