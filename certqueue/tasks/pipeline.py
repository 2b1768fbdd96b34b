"""The shared steps of the pipeline, used by the task modules (which never import each other):
payload parsing, creating or resuming an ACME order, cleaning up challenges, recording a permanent
failure (with CA fallback and renewal rescheduling), and naming follow-up tasks.

Owns ``orders``, ``challenges`` (their ACME side) and ``http01_tokens``; state changes go through
``certqueue.events`` and intents through ``certqueue.intents``.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import secrets
from dataclasses import dataclass
from typing import Any, Literal, cast

from celery import chain, signature
from celery.canvas import Signature
from sqlalchemy import Engine, Table, bindparam, delete, func, insert, select, update
from sqlalchemy.orm import Session

from certqueue import certificates, challenge_tokens, crypto, events, failpoints, intents, solvers
from certqueue.acme.accounts import client_for
from certqueue.acme.client import AcmeClient, ChallengeInfo, order_from_json, order_to_json
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
from certqueue.lifecycle.failure import MAX_RATE_LIMIT_BLOCK, clamp_retry_after
from certqueue.lifecycle.ratelimit_policy import PreviousIssuance, ca_block, classify_order
from certqueue.lifecycle.retry import AfterFailure, after_permanent_failure
from certqueue.models import Certificate, Challenge, Http01Token, Issuance, Order, State, utcnow
from certqueue.tasks.base import CertqueueTask, StepContext, Wait

log = logging.getLogger("certqueue.pipeline")

OPEN_ORDER = ("creating", "pending", "ready", "processing")
#: a CA rate limit longer than this sends the certificate to its next CA (when it has one)
LONG_RATE_LIMIT_SECONDS = 3600


class OrderLease:
    """A step's claim on one order while the CA answers, with no row lock held (STYLE rule 5).

    The step locks the certificate, reads what it needs and calls :meth:`take`, which marks the order
    as this step's until ``lease_until`` and commits: the certificate's row lock (and SQLite's write
    lock) is released before the first request to the CA. A step meeting a live lease of another
    waits (``Wait``) rather than talk to the CA about the same order at the same time. When the CA
    has answered, :meth:`reacquire` locks the certificate again and reloads the order, or returns
    None when it is no longer this step's (closed meanwhile, e.g. a revoke abandoned the renewal,
    or taken over after the lease ran out); :meth:`finish` clears the lease in the step's final
    commit. Any exception in between gives the lease back in a short transaction (:meth:`release`).
    """

    def __init__(self, ctx: StepContext, certificate_id: str, order_id: int, token: str) -> None:
        self.ctx = ctx
        self.certificate_id = certificate_id
        self.order_id = order_id
        self.token = token

    @classmethod
    def take(cls, ctx: StepContext, cert: Certificate, order: Order) -> OrderLease:
        now = utcnow()
        if order.lease_until is not None and order.lease_until > now:
            raise Wait((order.lease_until - now).total_seconds() + 0.5)
        token = cls.mark_new(order)
        ctx.session.flush()
        lease = cls(ctx, cert.id, order.id, token)
        ctx.session.commit()
        return lease

    @staticmethod
    def mark_new(order: Order) -> str:
        """Put a fresh lease on ``order`` and return its token. :meth:`take` uses it on an existing
        row; a new order is marked before its row is written, so it is inserted leased (one INSERT,
        not an INSERT and then an UPDATE), and :meth:`taken` commits it."""
        token = secrets.token_hex(8)
        order.lease_token = token
        # longer than the step's own calls to the CA (each bounded by the client's HTTP timeout); a
        # worker that dies mid-step leaves a lease that runs out; any other failure gives it back
        order.lease_until = utcnow() + dt.timedelta(seconds=get_settings().automation.order_lease_seconds)
        return token

    @classmethod
    def taken(cls, ctx: StepContext, cert: Certificate, order: Order) -> OrderLease:
        """The lease :meth:`mark_new` put on the inserted ``order``, committed."""
        assert order.lease_token is not None
        lease = cls(ctx, cert.id, order.id, order.lease_token)
        ctx.session.commit()
        return lease

    def reacquire(self) -> tuple[Certificate, Order] | None:
        """The certificate locked again and its order read fresh, in one statement; None when the
        order is no longer this lease's."""
        session = self.ctx.session
        stmt = (
            select(Certificate, Order)
            .join(Order, Order.certificate_id == Certificate.id)
            .where(Certificate.id == self.certificate_id, Order.id == self.order_id)
            .execution_options(populate_existing=True)
        )
        if is_postgres(session):
            stmt = stmt.with_for_update(of=Certificate)  # lock_certificate's lock, orders unlocked
        row = session.execute(stmt).first()
        if row is None:
            # the order is gone (or not this certificate's): still take the certificate's lock, as
            # the caller's next writes expect
            lock_certificate(session, self.certificate_id)
            return None
        cert, order = row
        if order.lease_token != self.token:
            return None
        return cert, order

    @staticmethod
    def reacquire_many(
        session: Session, leases: list[tuple[str, int, str]]
    ) -> dict[int, tuple[Certificate, Order]]:
        """:meth:`reacquire` for a batch's ``(certificate id, order id, token)`` leases in one
        statement (the certificates locked in id order): by order id, the ones still this
        batch's."""
        stmt = (
            select(Certificate, Order)
            .join(Order, Order.certificate_id == Certificate.id)
            .where(Order.id.in_([order_id for _, order_id, _ in leases]))
            .order_by(Certificate.id)
            .execution_options(populate_existing=True)
        )
        if is_postgres(session):
            stmt = stmt.with_for_update(of=Certificate)
        rows = {order.id: (cert, order) for cert, order in session.execute(stmt).tuples()}
        return {
            order_id: rows[order_id]
            for cid, order_id, token in leases
            if order_id in rows and rows[order_id][1].lease_token == token and rows[order_id][0].id == cid
        }

    @staticmethod
    def finish(order: Order) -> None:
        order.lease_token = None
        order.lease_until = None

    def release(self) -> None:
        give_back_lease(self.ctx.session, Order, self.order_id, self.token)


def give_back_lease(session: Session, model: Any, row_id: int, token: str) -> None:
    """After a failure, clear the lease on ``model`` row ``row_id`` if it is still ``token``'s, in a
    short transaction of its own (a retry need not wait for it to run out). Orders and deployments
    carry the same two lease columns."""
    try:
        session.rollback()
        session.execute(
            update(model)
            .where(model.id == row_id, model.lease_token == token)
            .values(lease_token=None, lease_until=None)
        )
        session.commit()
    except Exception as exc:  # noqa: BLE001  (the lease then simply runs out)
        session.rollback()
        log.info(
            "%s %s: lease not given back (%s); it runs out", model.__tablename__, row_id, type(exc).__name__
        )


@dataclass(frozen=True)
class Handoff:
    """What a start step that placed an order leaves for the validation that runs next in the same
    task: the order's lease (still this task's, committed with the challenges) and what validation
    would otherwise read again. ``to_answer`` holds ``(challenge id, ChallengeInfo)`` pairs."""

    order_id: int
    token: str
    client: AcmeClient
    res: Any
    to_answer: list[tuple[int, ChallengeInfo]]
    csr_pem: str
    preferred_chain: str | None


def answerable(chs: list[Challenge]) -> list[tuple[int, ChallengeInfo]]:
    """The order's challenges to answer now: presented HTTP-01 and TLS-ALPN-01 ones, and DNS-01 ones
    the chord's header proved visible."""
    return [
        (
            ch.id,
            ChallengeInfo(
                type=ch.type,
                url=ch.url,
                authz_url=ch.authz_url,
                identifier=ch.identifier.removeprefix("*."),
                wildcard=ch.identifier.startswith("*."),
                status="pending",
                token=ch.token or "",
                key_authorization="",
                dns_name=ch.dns_name,
                dns_value=ch.dns_value,
            ),
        )
        for ch in chs
        if ch.status == "visible" or (ch.status == "presented" and ch.type != "dns-01")
    ]


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
        kind = "renew" if cert.state in states.RENEWAL_STATES else "issue"
        open_ = [intents.record(session, kind, cert.id)]
    for intent in open_:
        intent.status = "pending"
        intent.not_before = until
        intent.deadline = None
    events.record(
        session, cert.id, "deferred", reason=kind, data={"until": until.isoformat(), "why": reason[:256]}
    )


def task(name: str, *args: Any, **options: Any) -> Signature:
    """A follow-up by task name (task modules never import each other)."""
    sig = signature(name, args=args, immutable=True)
    return sig.set(**options) if options else sig


def present_then_validate(certificate_id: str, challenge_ids: list[int]) -> Signature:
    """One certificate's DNS-01 records: a dns task presents every one and returns once all are
    visible, then the acme pool validates (a chain: no chord counter, no stored result)."""
    return chain(
        task("certqueue.dns.present_all", certificate_id, challenge_ids),
        task("certqueue.acme.validate", certificate_id),
    )


# --- payloads -----------------------------------------------------------------------------------


# --- helpers ------------------------------------------------------------------------------------


def _status_name(status: Any) -> str:
    """acme's Status constants print as ``Status(pending)``; the name is what we store."""
    return str(getattr(status, "name", status))


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
    """Create or resume the certificate's ACME order and present its challenges.

    Called with the certificate locked. The budget and cap checks and the order's row (``creating``,
    with its key and CSR) are committed first; the CA is asked with no lock held (``OrderLease``);
    its URL is committed the moment the CA answers, before the authorizations are fetched; the
    challenges are written with the certificate locked again.
    """
    session = ctx.session
    settings = get_settings()
    client, account_id = _client(session, cert)
    order = open_order(session, cert.id)
    if order is not None and order.order_url is None:
        if order.lease_until is not None and order.lease_until > utcnow():
            raise Wait((order.lease_until - utcnow()).total_seconds() + 0.5)  # another step places it
        # a newOrder that was never confirmed (its step died): find it at the CA, or order again
        found = _find_unconfirmed(ctx, cert, client, order, purpose)
        if found is None:
            return {"certificate_id": cert.id, "status": "superseded"}
        cert, order = found
    placing = _prepare_order(ctx, cert, client, account_id, purpose) if order is None else None
    if placing is not None:
        order = placing.order
        lease = OrderLease.taken(ctx, cert, order)  # a new row, inserted with its lease
    else:
        assert order is not None
        lease = OrderLease.take(ctx, cert, order)
    try:
        if placing is not None:
            res = _place_order(ctx, client, placing, lease)
        else:
            res = order_from_json(order.order_json or {})
        if not res.authorizations:
            # an order stored before its authorizations were fetched: fetch them now
            res = client.refresh_order(res)
        got = lease.reacquire()
        if got is None:
            return {"certificate_id": cert.id, "status": "superseded"}
        cert, order = got
        order.order_json = order_to_json(res)
        if placing is not None:
            _record_ordered(session, cert, order, purpose)
            # a new order has no challenges yet: nothing to read
            existing = _present_challenges(session, cert, client, order, res, settings)
        else:
            existing = list(
                session.execute(select(Challenge).where(Challenge.order_id == order.id)).scalars()
            )
            if not existing:
                existing = _present_challenges(session, cert, client, order, res, settings)
        if ctx.hand_over and placing is not None and all(c.type != "dns-01" for c in existing):
            # validated next in this task: the lease stays this task's, committed with the challenges
            ctx.handoff = Handoff(
                order_id=order.id,
                token=lease.token,
                client=client,
                res=res,
                to_answer=answerable(existing),
                csr_pem=order.csr_pem,
                preferred_chain=cert.preferred_chain,
            )
        else:
            OrderLease.finish(order)
    except (Wait, Deferred):
        raise
    except BaseException:
        lease.release()
        raise
    _touch(cert)
    dns = [c for c in existing if c.type == "dns-01" and c.status in ("pending", "presented")]
    if dns:
        ctx.replace(present_then_validate(cert.id, [c.id for c in dns]))
    else:
        ctx.then(task("certqueue.acme.validate", cert.id))
    return {"certificate_id": cert.id, "order": order.id, "status": "ordered"}


def _record_ordered(session: Session, cert: Certificate, order: Order, purpose: str, **data: Any) -> None:
    """The certificate has an order at the CA: it waits for nothing else, and the event says so."""
    cert.next_attempt_at = None
    cert.waiting_reason = None
    events.record(session, cert.id, "order", reason=purpose, data={"order": order.id, **data})


def _find_unconfirmed(
    ctx: StepContext, cert: Certificate, client: AcmeClient, order: Order, purpose: str
) -> tuple[Certificate, Order | None] | None:
    """The order row whose newOrder was sent but whose URL was never stored (its step died between
    the CA's answer and the commit): the CA's list of the account's orders is searched for an open
    order of exactly these names that no row claims (``AcmeClient.find_open_order``), with no lock
    held. Found, the row takes its URL and resumes it: the CA created one order, and one is used.
    Not found (or a CA without an order list), the row is abandoned and the caller orders again.
    Returns the certificate locked again with the resumed order or None; None in all when the
    certificate's work moved on meanwhile (closed, or taken over)."""
    lease = OrderLease.take(ctx, cert, order)
    session = ctx.session

    def stored(urls: list[str]) -> set[str]:
        try:
            rows = session.execute(select(Order.order_url).where(Order.order_url.in_(urls))).scalars()
            return {u for u in rows if u}
        finally:
            session.rollback()  # a read of its own: no transaction stays open across the CA's answers

    try:
        res = client.find_open_order(order.csr_pem.encode(), stored)
    except BaseException:
        lease.release()
        raise
    got = lease.reacquire()
    if got is None:
        return None
    cert, order = got
    OrderLease.finish(order)
    if res is not None and session.execute(select(Order.id).where(Order.order_url == res.uri)).first():
        res = None  # stored by another row since the list was read
    if res is None:
        order.status = "abandoned"
        order.error = "newOrder not confirmed, and the CA lists no such order"
        order.finished_at = utcnow()
        return cert, None
    order.order_url = res.uri
    order.order_json = order_to_json(res)
    order.status = _status_name(res.body.status)
    _record_ordered(session, cert, order, purpose, found_at_ca=True)
    log.info("order %s: newOrder not confirmed; found at the CA and resumed", order.id)
    return cert, order


def _present_challenges(
    session: Session, cert: Certificate, client: AcmeClient, order: Order, res: Any, settings: Any
) -> list[Challenge]:
    """The order's challenges (and HTTP-01 tokens, served at once), one per name still to prove.

    All of them are inserted in one flush (one multi-row INSERT, its ids returned), then their
    tokens in another: two statements for a certificate of 100 names, not 200."""
    built = build_challenges(cert, client, order, res, settings)
    write_challenges(session, built, settings)
    return [ch for ch, _ in built]


def build_challenges(
    cert: Certificate, client: AcmeClient, order: Order, res: Any, settings: Any
) -> list[tuple[Challenge, str]]:
    """The order's challenge rows, not yet added, each with its key authorization (no I/O)."""
    out: list[tuple[Challenge, str]] = []
    for authz in res.authorizations:
        if _status_name(authz.body.status) == "valid":
            continue  # reused authorization: nothing to prove
        ident = authz.body.identifier.value
        name = f"*.{ident}" if authz.body.wildcard else ident
        ctype = _challenge_type_for(cert, name)
        info = client.challenge_for(authz, cast(Literal["http-01", "dns-01", "tls-alpn-01"], ctype))  # no I/O
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
            # a named DNS solver for this name (certqueue.solvers), else the certificate's provider
            provider=(solvers.dns_solver_for(settings, name) or cert.dns_provider)
            if ctype == "dns-01"
            else None,
            # served from this transaction on (its token row below): inserted as presented
            status="pending" if ctype == "dns-01" else "presented",
        )
        out.append((ch, info.key_authorization))
    return out


_CHALLENGES = cast(Table, Challenge.__table__)
_HTTP01_TOKENS = cast(Table, Http01Token.__table__)
#: the built challenges' rows, their ids returned in the rows' order (one multi-row INSERT)
_INSERT_CHALLENGES = insert(_CHALLENGES).returning(_CHALLENGES.c.id, sort_by_parameter_order=True)
_CHALLENGE_COLUMNS = (
    "order_id", "certificate_id", "identifier", "authz_url", "type", "url", "token", "dns_name",
    "dns_value", "provider", "status",
)  # fmt: skip


def write_challenges(session: Session, built: list[tuple[Challenge, str]], settings: Any) -> None:
    """Insert built challenges (of one order or of many: one multi-row INSERT either way, its ids
    returned and set on the built objects), then their HTTP-01 and TLS-ALPN-01 tokens (one more
    each). Core statements, not the ORM's unit of work: the built challenges are read afterwards
    (their ids, types and statuses), never changed through the session."""
    if not built:
        return
    expires = utcnow() + dt.timedelta(seconds=settings.automation.order_timeout_seconds + 600)
    now = utcnow()
    rows = []
    for ch, _ in built:
        row = {name: getattr(ch, name) for name in _CHALLENGE_COLUMNS}
        row.update(created_at=now, updated_at=now)
        rows.append(row)
    ids = session.execute(_INSERT_CHALLENGES, rows).scalars().all()
    tokens = []
    tls_alpn: list[tuple[Challenge, str]] = []
    for (ch, key_authorization), ch_id in zip(built, ids, strict=True):
        ch.id, ch.created_at, ch.updated_at = ch_id, now, now
        if ch.type == "http-01":
            tokens.append(
                {
                    "token": ch.token,
                    "key_authorization": key_authorization,
                    "certificate_id": ch.certificate_id,
                    "challenge_id": ch_id,
                    "expires_at": expires,
                }
            )
        elif ch.type == "tls-alpn-01":
            tls_alpn.append((ch, key_authorization))
    if tokens:
        session.execute(insert(_HTTP01_TOKENS), tokens)
    challenge_tokens.present_tls_alpn01(session, tls_alpn, expires)


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


class _Placing:
    """An order about to be placed: its row (``creating``), and what it was charged."""

    def __init__(
        self,
        order: Order,
        csr: str,
        keys: list[Any],
        account_id: int,
        replaces: str | None,
        order_purpose: str,
        profile: str | None,
        directory_url: str,
        domains: list[str],
    ) -> None:
        self.order = order
        self.csr = csr
        self.keys = keys
        self.account_id = account_id
        self.replaces = replaces
        self.order_purpose = order_purpose
        self.profile = profile
        self.directory_url = directory_url
        self.domains = domains


class _Blocked(Exception):
    """The CA's answer (or a budget met while answering it) says: wait until ``until``."""

    def __init__(self, until: dt.datetime, why: str, kind: str) -> None:
        super().__init__(why)
        self.until = until
        self.why = why
        self.kind = kind


def orders_in_flight(session: Session, directory_url: str) -> int:
    """The open orders at one CA (the in-flight cap's count)."""
    return int(
        session.execute(
            select(func.count())
            .select_from(Order)
            .join(Certificate, Certificate.id == Order.certificate_id)
            .where(Order.status.in_(OPEN_ORDER), Certificate.directory_url == directory_url)
        ).scalar_one()
    )


def _prepare_order(
    ctx: StepContext,
    cert: Certificate,
    client: AcmeClient,
    account_id: int,
    purpose: str,
    *,
    in_flight: dict[str, int] | None = None,
    flush: bool = True,
) -> _Placing:
    """With the certificate locked: check the profile, the in-flight cap and the shared rate-limit
    budget, and write the order's row (``creating``, its new key encrypted, its CSR).

    Over budget, nothing is written or sent: ``Deferred`` hands the work back to the database until
    the budget returns. The in-flight cap (dispatch keeps under it; a race can still meet it)
    defers briefly.

    A batch preparing many orders in one transaction passes ``in_flight`` (open orders per CA, read
    once and counted on here as orders are added) and ``flush=False``: its orders then go out
    together at its commit, one multi-row INSERT instead of a count and an INSERT per certificate.
    """
    session = ctx.session
    settings = get_settings()
    if cert.profile:
        check_profile(client.directory, cert.profile, cert.domains, settings.acme.profile_name_limits)
    now = utcnow()
    in_flight_cap = settings.automation.max_orders_in_flight_per_ca
    if in_flight_cap:
        if in_flight is None:
            open_now = orders_in_flight(session, cert.directory_url)
        else:
            if cert.directory_url not in in_flight:
                in_flight[cert.directory_url] = orders_in_flight(session, cert.directory_url)
            open_now = in_flight[cert.directory_url]
        if open_now >= in_flight_cap:
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
    try:
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
        order = Order(
            certificate_id=cert.id,
            account_id=account_id,
            purpose=purpose,
            csr_pem=csr,
            key_enc=certificates.keystore().encrypt(key_pem, certificates.order_key_aad(cert.id, csr)),
            order_url=None,
            order_json=None,
            status="creating",
        )
        OrderLease.mark_new(order)
        session.add(order)
        if flush:
            session.flush()
    except BaseException:
        limiter.release(keys, now)
        raise
    if in_flight is not None:
        in_flight[cert.directory_url] = in_flight.get(cert.directory_url, 0) + 1
    return _Placing(
        order,
        csr,
        list(keys),
        account_id,
        replaces,
        order_purpose,
        cert.profile,
        cert.directory_url,
        list(cert.domains),
    )


#: the order's URL, stored by the step that holds its lease (a Core statement, compiled once: one
#: of these per order, committed on its own as the CA answers)
_ORDERS = cast(Table, Order.__table__)
_STORE_ORDER_URL = (
    update(_ORDERS)
    .where(_ORDERS.c.id == bindparam("oid"), _ORDERS.c.lease_token == bindparam("lease"))
    .values(order_url=bindparam("url"), order_json=bindparam("body"), status=bindparam("status_"))
)


def _place_order(
    ctx: StepContext,
    client: AcmeClient,
    placing: _Placing,
    lease: OrderLease,
    *,
    fetch_authorizations: bool = True,
    row_committed: bool = False,
) -> Any:
    """Ask the CA for the order (no lock held). Its URL is committed as soon as the CA answers, so a
    redelivered step finds it and resumes instead of ordering again. A ``rateLimited`` answer sets
    the budget from its Retry-After and defers the certificate. ``fetch_authorizations=False``
    returns the order without its authorizations (``AcmeClient.fetch_authorizations``).

    ``row_committed``: the order's row was committed before (a batch's first phase) and ``ctx``'s
    session has written nothing; on PostgreSQL the URL is then stored by one autocommit statement
    on a connection of its own (one round trip instead of BEGIN, UPDATE and COMMIT). Otherwise the
    session stores it and commits whatever it holds with it (the row itself, in the single step)."""
    session = ctx.session
    apart = row_committed and is_postgres(session)
    limiter = rate_limiter()
    now = utcnow()
    keys = placing.keys

    def charge_as_renewal() -> None:
        """The CA answered alreadyReplaced: the order goes again without ``replaces``, so it is a
        plain renewal and is charged as one."""
        nonlocal keys
        if placing.order_purpose != "ari_renewal":
            return
        extra = budget_keys(
            placing.account_id, placing.directory_url, placing.domains, limiter.policy, purpose="renewal"
        )
        again = limiter.try_acquire(extra, now)
        if not again.allowed:
            until = again.retry_at or now + dt.timedelta(seconds=60)
            raise _Blocked(until, describe_budgets(again.blocked), "rate_limited")
        keys = [*keys, *extra]

    def store_url(res: Any) -> None:
        """The CA created the order: its URL is the one thing that must not be lost (without it a
        retry orders again). A database that is down for a moment (a restart, a failover) is waited
        for, within the order's lease, rather than given up at the first error."""
        import time

        from sqlalchemy.exc import DBAPIError

        failpoints.hit("order.created")  # the chaos suite's kill between the CA's answer and the commit
        values = {
            "oid": placing.order.id,
            "lease": lease.token,
            "url": res.uri,
            "body": order_to_json(res),
            "status_": _status_name(res.body.status),
        }
        give_up = time.monotonic() + 0.75 * get_settings().automation.order_lease_seconds
        pause = 0.25
        while True:
            try:
                if apart:
                    engine = cast(Engine, session.get_bind())  # the session's own database
                    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                        conn.execute(_STORE_ORDER_URL, values)
                else:
                    session.execute(_STORE_ORDER_URL, values)
                    session.commit()
                return
            except DBAPIError as exc:
                if not apart:
                    session.rollback()
                if time.monotonic() + pause > give_up:
                    raise
                log.warning(
                    "order %s created at the CA, its URL not stored yet (%s): again in %.1fs",
                    placing.order.id,
                    type(exc).__name__,
                    pause,
                )
                time.sleep(pause)
                pause = min(pause * 2, 5.0)

    try:
        return client.new_order(
            placing.csr.encode(),
            profile=placing.profile,
            replaces=placing.replaces,
            on_already_replaced=charge_as_renewal,
            on_created=store_url,
            fetch_authorizations=fetch_authorizations,
        )
    except IncompleteOrder as exc:
        return exc.order  # the order exists at the CA and its URL is stored: resume, never order again
    except _Blocked as blocked:
        limiter.release(keys, now)
        _defer_placing(ctx, lease, blocked.until, blocked.why, blocked.kind)
        raise Deferred(blocked.until, blocked.kind) from None
    except RateLimited as exc:
        limiter.release(keys, now)
        exc.retry_after = clamp_retry_after(exc.retry_after, MAX_RATE_LIMIT_BLOCK)
        got = lease.reacquire()
        cert = got[0] if got else None
        if (
            cert is not None
            and (exc.retry_after or 3600) > LONG_RATE_LIMIT_SECONDS
            and next_ca(cert, PermanentError(exc.message, reason="acme:rateLimited")) is not None
        ):
            raise PermanentError(
                f"rate limited for {int(exc.retry_after or 3600)}s: trying the next CA",
                reason="acme:rateLimited",
            ) from None
        until = now + ca_block(exc.message, exc.retry_after)  # a pause is checked again daily
        bound = rate_limiter(session)  # SQLite: inside the transaction that now holds the lock
        for k in keys_for_ca_problem(keys, exc.message):
            bound.block(k, until, now)
        _defer_placing(ctx, lease, until, "rate limit: the CA answered rateLimited", "ca_rate_limited")
        raise Deferred(until, "ca_rate_limited") from None
    except BaseException:
        limiter.release(keys, now)
        raise


def _defer_placing(ctx: StepContext, lease: OrderLease, until: dt.datetime, why: str, kind: str) -> None:
    """The order was not placed: its row is closed and the certificate waits until ``until``."""
    got = lease.reacquire()
    if got is None:
        return
    cert, order = got
    OrderLease.finish(order)
    order.status = "abandoned"
    order.error = kind
    order.finished_at = utcnow()
    defer_work(ctx, cert, until, why, kind=kind)


def _order_key(session: Session, cert: Certificate) -> bytes:
    """A fresh key for the new order; the current one only when the certificate asks to reuse it."""
    if cert.reuse_key and not cert.force_new_key and cert.current_issuance_id:
        iss = cert.current_issuance
        if iss is not None and iss.key_enc is not None:
            return certificates.decrypt_key(iss)
    return crypto.new_private_key_pem(cert.key_type)


def cleanup_challenges(ctx: StepContext, order: Order, chs: list[Challenge] | None = None) -> None:
    """Remove HTTP-01 and TLS-ALPN-01 tokens now and send DNS-01 cleanups to the dns pool; success or
    failure. ``chs``: the order's challenges, when the caller has just read all of them (the token
    tables are then only touched for the types the order has)."""
    session = ctx.session
    if chs is None:
        chs = list(session.execute(select(Challenge).where(Challenge.order_id == order.id)).scalars())
    types = {ch.type for ch in chs}  # tokens exist only for the order's own challenges
    now = utcnow()
    dns: list[int] = []
    for ch in chs:  # before the deletes below flush them: one UPDATE per challenge
        if ch.status == "cleaned":
            continue
        if ch.type in ("http-01", "tls-alpn-01"):
            ch.status = "cleaned"
            ch.cleaned_at = now
            continue
        # DNS-01, even when no handle was recorded: a present whose commit was lost (a database
        # crash right after the provider call) still left a record, and cleanup is idempotent
        dns.append(ch.id)
    if dns:  # one task removes the order's records
        ctx.then(task("certqueue.dns.cleanup_all", order.certificate_id, dns))
    if "http-01" in types:
        if ctx.token_orders is not None:
            ctx.token_orders.append(order.id)  # the batch deletes them, with the others'
        else:
            delete_http01_tokens(session, [order.id])
    if "tls-alpn-01" in types:
        challenge_tokens.remove_tls_alpn01(session, order.id)


def delete_http01_tokens(session: Session, order_ids: list[int]) -> None:
    """The HTTP-01 tokens of these orders' challenges, gone (one DELETE, none for no orders)."""
    if order_ids:
        session.execute(
            delete(Http01Token)
            .where(
                Http01Token.challenge_id.in_(select(Challenge.id).where(Challenge.order_id.in_(order_ids)))
            )
            .execution_options(synchronize_session=False)
        )


def fail_certificate(ctx: StepContext, certificate_id: str, exc: CertqueueError) -> dict[str, Any]:
    """A permanent failure of the pipeline: the order is abandoned, challenges cleaned up, and the
    certificate goes FAILED (first issuance) or back to ACTIVE with the next attempt scheduled
    (renewal: the old certificate keeps serving)."""
    session = ctx.session
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
        events.record(
            session,
            cert.id,
            "validation_error",
            reason=exc.reason,
            data={"type": types[0] if len(types) == 1 else ",".join(types) or "unknown"},
        )
    if cert.state == State.REQUESTED:
        # the failure came before the task's first commit (e.g. account registration): the
        # issuance did start, and it is what failed
        events.transition(session, cert, State.ISSUING, reason="issue", actor="task")
    nxt = next_ca(cert, exc)
    if nxt is not None and states.in_pipeline(cert.state, cert.work_deadline):
        # this CA failed for good: the same work starts again at the next CA (its own account)
        events.record(
            session, cert.id, "ca_fallback", reason=exc.reason, data={"from": cert.directory_url, "to": nxt}
        )
        cert.directory_url = nxt
        cert.last_error = exc.reason
        _touch(cert)
        purpose = "renew" if cert.state in states.RENEWAL_STATES else "issue"
        ctx.then(task("certqueue.acme.start", {"certificate_id": cert.id, "purpose": purpose}))
        return {"certificate_id": cert.id, "status": "fallback", "reason": exc.reason, "ca": nxt}
    expired_in_flight = cert.state == State.EXPIRED and cert.work_deadline is not None
    cert.last_error = exc.reason
    cert.work_deadline = None
    ctx.nudge = True  # capacity freed: dispatch may start the next order
    if cert.state == State.ISSUING:
        cert.attempts += 1
        after = _after_failure("issue", cert.attempts)
        events.record(session, cert.id, "issuance", reason="failure", data={"reason": exc.reason})
        if after.give_up:
            events.transition(session, cert, State.FAILED, reason=exc.reason)
            intents.complete(session, cert.id, ("issue", "renew"), outcome=exc.reason, failed=True)
        else:
            retry_issuance(ctx, cert, after.delay, exc.reason)
    elif cert.state == State.RENEWING:
        cert.attempts += 1
        delay = _after_failure("renew", cert.attempts).delay
        cert.renew_at = utcnow() + dt.timedelta(seconds=delay)
        cert.next_attempt_at = cert.renew_at
        cert.pending_issuance_id = None
        events.record(session, cert.id, "renewal", reason="failure", data={"reason": exc.reason})
        events.transition(session, cert, State.ACTIVE, reason=f"renewal failed: {exc.reason}")
    elif expired_in_flight:
        end_expired_renewal(session, cert, exc.reason)
    return {"certificate_id": cert.id, "status": "failed", "reason": exc.reason}


def _after_failure(purpose: str, attempts: int) -> AfterFailure:
    a = get_settings().automation
    return after_permanent_failure(
        purpose,
        attempts,
        retry_attempts=a.retry_attempts,
        retry_delay=a.retry_delay_seconds,
        check_interval_hours=a.check_interval_hours,
    )


def retry_issuance(ctx: StepContext, cert: Certificate, delay: float, reason: str) -> None:
    """A first issuance the CA refused, with retries left (``automation.retry_attempts``): it stays
    ISSUING and an issue intent waits in the database until the retry is due."""
    when = utcnow() + dt.timedelta(seconds=delay)
    retries = get_settings().automation.retry_attempts
    cert.next_attempt_at = when
    cert.waiting_reason = f"retry {cert.attempts} of {retries} after {reason}"[:256]
    intents.record(ctx.session, "issue", cert.id, actor="retry", not_before=when)
    ctx.wake(delay + 0.2)


def end_expired_renewal(session: Session, cert: Certificate, reason: str) -> None:
    """The renewal that was in flight when the certificate expired failed for good: it stays EXPIRED
    (nothing valid is served), with no renewal working on it."""
    cert.attempts += 1
    cert.renew_at = None
    cert.next_attempt_at = None
    cert.pending_issuance_id = None
    cert.work_deadline = None
    events.record(session, cert.id, "renewal", reason="failure", data={"reason": reason, "expired": True})
    intents.complete(session, cert.id, ("renew",), outcome=reason, failed=True)


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
PARKABLE = (State.REQUESTED, State.ISSUING, State.RENEWING, State.ISSUED, State.EXPIRED)


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
    events.record(session, cert.id, "backoff", reason=exc.reason, data={"seconds": round(delay, 1)})
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
