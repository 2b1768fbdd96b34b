"""``/v1/certificates``: create, list, show, renew, revoke, propagate, delete, import.

Every write is one transaction (``certqueue.operations``): the change and its intent commit
together, and the answer (202 with the intent's job id) is sent then, whatever the broker is doing.
Dispatch relays the intent; the nudge after the commit is best effort and never waits. Requests are
validated before anything is written, so a refused request leaves no trace.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Response, status
from sqlalchemy import Select, cast, func, literal, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from certqueue import certificates, operations, validation
from certqueue.api.auth import Principal, require
from certqueue.api.schemas import (
    BulkAccepted,
    BulkCreate,
    BulkItem,
    CertificateAccepted,
    CertificateCreate,
    CertificateDetail,
    CertificateOut,
    CertificatePage,
    DeploymentOut,
    ImportRequest,
    JobQueued,
    PropagateRequest,
    RenewRequest,
    RevokeRequest,
)
from certqueue.config import get_settings
from certqueue.db import session_scope
from certqueue.errors import InvalidInput
from certqueue.models import Certificate, Deployment, State, utcnow
from certqueue.nudge import nudge

log = logging.getLogger("certqueue.api")

router = APIRouter(prefix="/v1/certificates", tags=["certificates"])

MAX_PAGE = 500
_IMPORT_FIELDS = {"certificate": "certificate_pem", "private_key": "private_key_pem", "chain": "chain_pem"}

Read = Annotated[Principal, Depends(require("read"))]
Write = Annotated[Principal, Depends(require("write"))]


def job_of(intent: Any) -> str | None:
    """The job id of an intent (``GET /v1/jobs/<id>`` reads it back from the database)."""
    return f"intent-{intent.id}" if intent is not None else None


def _conflict(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_409_CONFLICT, detail=detail)


# --- create / import --------------------------------------------------------------------------------


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=CertificateAccepted,
    responses={
        200: {
            "model": CertificateAccepted,
            "description": "A live certificate for the same names exists; nothing queued",
        }
    },
)
def create_certificate(body: CertificateCreate, response: Response, principal: Write) -> CertificateAccepted:
    """Request a certificate; its issuance is queued (``certqueue.issue``)."""
    settings = get_settings()
    req = certificates.CertificateRequest.build(settings, **body.model_dump(exclude_none=True))
    now = utcnow()
    with session_scope() as session:
        cert, created, intent = operations.request_issue(session, req, actor=principal.actor)
        out = CertificateOut.of(cert, now)
        job_id = job_of(intent)
    if created:
        nudge()
    else:
        response.status_code = status.HTTP_200_OK
    return CertificateAccepted(certificate=out, created=created, job_id=job_id)


@router.post("/bulk", status_code=status.HTTP_202_ACCEPTED, response_model=BulkAccepted)
def create_certificates(body: BulkCreate, principal: Write) -> BulkAccepted:
    """Request many certificates at once: every valid item in one transaction with one dispatch;
    each invalid item is answered with its index and error (nothing is written for it)."""
    from pydantic import ValidationError

    from certqueue import bulk

    settings = get_settings()
    items: list[BulkItem] = []
    parsed: list[tuple[int, dict[str, Any]]] = []
    for i, raw in enumerate(body.certificates):
        try:
            parsed.append((i, CertificateCreate.model_validate(raw).model_dump(exclude_none=True)))
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first.get("loc", ())) or None
            items.append(BulkItem(index=i, error={"field": field, "message": first.get("msg", "invalid")}))
    good, bad = bulk.build(parsed, settings)
    items += [BulkItem(index=b.line, error={"field": b.field, "message": b.message}) for b in bad]
    now = utcnow()
    created = existing = 0
    if good:
        with session_scope() as session:
            out = operations.request_issue_many(session, [req for _i, req in good], actor=principal.actor)
            session.flush()
            for (index, _req), (cert, was_created) in zip(good, out, strict=True):
                created += was_created
                existing += not was_created
                items.append(
                    BulkItem(index=index, certificate=CertificateOut.of(cert, now), created=was_created)
                )
    if created:
        nudge()
    items.sort(key=lambda it: it.index)
    return BulkAccepted(
        created=created, existing=existing, rejected=len(body.certificates) - len(good), items=items
    )


@router.post("/import", status_code=status.HTTP_201_CREATED, response_model=CertificateAccepted)
def import_certificate(body: ImportRequest, principal: Write) -> CertificateAccepted:
    """Import an externally issued certificate (PEM): monitored and propagated, never renewed."""
    settings = get_settings()
    now = utcnow()
    try:
        with session_scope() as session:
            cert, intent = operations.import_certificate(
                session,
                certificate_pem=body.certificate_pem,
                private_key_pem=body.private_key_pem,
                chain_pem=body.chain_pem,
                targets=body.targets,
                actor=principal.actor,
                settings=settings,
            )
            session.flush()
            out = CertificateOut.of(cert, now)
            job_id = job_of(intent)
    except InvalidInput as exc:
        if exc.field in _IMPORT_FIELDS:
            raise InvalidInput(exc.message, field=_IMPORT_FIELDS[exc.field]) from None
        raise
    if job_id:
        nudge()
    return CertificateAccepted(certificate=out, created=True, job_id=job_id)


# --- read -------------------------------------------------------------------------------------------


def _encode_cursor(created_at: dt.datetime, cid: str) -> str:
    raw = json.dumps([created_at.isoformat(), cid]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, cid = json.loads(raw)
        when = dt.datetime.fromisoformat(created)
        if when.tzinfo is None or not isinstance(cid, str):
            raise ValueError("bad cursor")
        validation.validate_certificate_id(cid)
        return when, cid
    except (ValueError, TypeError, binascii.Error, InvalidInput, UnicodeDecodeError):
        raise InvalidInput("not a cursor returned by this API", field="cursor") from None


def _domain_filter(session: Session, stmt: Select[Any], domain: str) -> Select[Any]:
    if session.get_bind().dialect.name == "postgresql":
        return stmt.where(cast(Certificate.domains, JSONB).contains([domain]))
    names = func.json_each(Certificate.domains).table_valued("value")
    return stmt.where(select(literal(1)).select_from(names).where(names.c.value == domain).exists())


@router.get("", response_model=CertificatePage)
def list_certificates(
    principal: Read,
    state: Annotated[list[State] | None, Query(description="Only these states (repeatable)")] = None,
    domain: Annotated[
        str | None, Query(max_length=300, description="Only certificates naming this domain")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    cursor: Annotated[
        str | None, Query(max_length=512, description="From next_cursor (keyset paging)")
    ] = None,
) -> CertificatePage:
    """List certificates, oldest first; ``total`` counts every match of the filters."""
    where_domain = None
    if domain is not None:
        try:
            where_domain = validation.normalize_domain(domain)
        except InvalidInput as exc:
            raise InvalidInput(exc.message, field="domain") from None
    after = _decode_cursor(cursor) if cursor else None
    if after is not None and offset:
        raise InvalidInput("use either offset or cursor, not both", field="offset")
    now = utcnow()
    with session_scope(write=False) as session:
        base = select(Certificate)
        if state:
            base = base.where(Certificate.state.in_([s.value for s in state]))
        if where_domain:
            base = _domain_filter(session, base, where_domain)
        total = session.execute(select(func.count()).select_from(base.subquery())).scalar_one()
        page = base.order_by(Certificate.created_at, Certificate.id)
        if after is not None:
            page = page.where(
                (Certificate.created_at > after[0])
                | ((Certificate.created_at == after[0]) & (Certificate.id > after[1]))
            )
        else:
            page = page.offset(offset)
        rows = list(session.execute(page.limit(limit + 1)).unique().scalars())
        more = len(rows) > limit
        rows = rows[:limit]
        items = [CertificateOut.of(c, now) for c in rows]
    next_cursor = _encode_cursor(rows[-1].created_at, rows[-1].id) if more and rows else None
    return CertificatePage(items=items, total=total, limit=limit, offset=offset, next_cursor=next_cursor)


@router.get("/{certificate_id}", response_model=CertificateDetail)
def get_certificate(certificate_id: str, principal: Read) -> CertificateDetail:
    """One certificate with its current issuance's metadata and its deployments (never its key)."""
    now = utcnow()
    with session_scope(write=False) as session:
        cert = certificates.get(session, certificate_id)
        deps = session.execute(
            select(Deployment).where(Deployment.certificate_id == cert.id).order_by(Deployment.region)
        ).scalars()
        detail: CertificateDetail = CertificateDetail.of(
            cert,
            now,
            deployments=[DeploymentOut.of(d) for d in deps],
            pending_issuance_id=cert.pending_issuance_id,
        )
    return detail


# --- actions ----------------------------------------------------------------------------------------


@router.post(
    "/{certificate_id}/renew",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobQueued,
    responses={200: {"model": JobQueued, "description": "Not due and not forced; nothing to do"}},
)
def renew_certificate(
    certificate_id: str,
    principal: Write,
    response: Response,
    body: Annotated[RenewRequest | None, Body()] = None,
) -> JobQueued:
    """Request a renewal; ``force`` renews even when not due (a certificate that is not due and not
    forced gets ``job_id: null``: nothing to do)."""
    force = body.force if body else False
    with session_scope() as session:
        validation.validate_certificate_id(certificate_id)
        intent = operations.request_renew(session, certificate_id, force=force, actor=principal.actor)
        job_id = job_of(intent)
    if job_id:
        nudge()
    else:
        response.status_code = status.HTTP_200_OK
    return JobQueued(certificate_id=certificate_id, task="certqueue.renew", job_id=job_id)


@router.post(
    "/{certificate_id}/revoke",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobQueued,
    responses={200: {"model": JobQueued, "description": "Already revoked; nothing queued"}},
)
def revoke_certificate(
    certificate_id: str,
    principal: Write,
    response: Response,
    body: Annotated[RevokeRequest | None, Body()] = None,
) -> JobQueued:
    """Request revocation at the CA. The reason is checked first: a reason the CA does not accept
    is refused here, before anything is written. The request is durable once answered."""
    reason = body.reason if body else "unspecified"
    with session_scope() as session:
        intent = operations.request_revoke(session, certificate_id, reason=reason, actor=principal.actor)
        job_id = job_of(intent)
    if job_id is None:
        response.status_code = status.HTTP_200_OK
    else:
        nudge()
    return JobQueued(certificate_id=certificate_id, task="certqueue.revoke", job_id=job_id)


@router.post("/{certificate_id}/propagate", status_code=status.HTTP_202_ACCEPTED, response_model=JobQueued)
def propagate_certificate(
    certificate_id: str, principal: Write, body: Annotated[PropagateRequest | None, Body()] = None
) -> JobQueued:
    """Request deployment of the certificate to its regions (or the given subset)."""
    regions = list(body.regions) if body and body.regions else []
    with session_scope() as session:
        intent, _wanted = operations.request_propagate(
            session, certificate_id, regions=regions, actor=principal.actor
        )
        job_id = job_of(intent)
    nudge()
    return JobQueued(certificate_id=certificate_id, task="certqueue.propagate", job_id=job_id)


@router.delete("/{certificate_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response)
def delete_certificate(
    certificate_id: str,
    principal: Write,
    force: Annotated[bool, Query(description="Delete in any state (admin)")] = False,
) -> Response:
    """Remove a REVOKED, EXPIRED or FAILED certificate from the inventory, with its issuances, orders
    and deployment records (``?force=true`` with an admin token: any state). Its copies deployed to
    targets are removed from them (regions with ``remove_on_delete``, the default), durably, after
    the answer; the audit log keeps the certificate's events."""
    if force and not principal.can("admin"):
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="force-deletion needs the 'admin' scope")
    with session_scope() as session:
        removal = operations.delete_certificate(session, certificate_id, force=force, actor=principal.actor)
    if removal is not None:
        nudge()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
