"""``/health``, ``/health/certificates`` and ``/metrics``: no authentication, as probes and
Prometheus expect. They reveal counts and states, never names of secrets or keys."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Literal

from fastapi import APIRouter, Response, status
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import case, func, select, text
from sqlalchemy.exc import SQLAlchemyError

from certqueue.api.schemas import CertificateHealth, Health
from certqueue.config import get_settings
from certqueue.db import session_scope
from certqueue.models import Certificate, Issuance, State, utcnow

log = logging.getLogger("certqueue.api")

router = APIRouter(tags=["health"])

IN_SERVICE = (State.ACTIVE.value, State.RENEWING.value)


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
def health(response: Response) -> Health:
    """The process is up and the database answers (200), or not (503)."""
    try:
        with session_scope(write=False) as session:
            session.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        log.warning("health: database unreachable (%s)", type(exc).__name__)
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return Health(status="unavailable", database="unreachable")
    return Health(status="ok", database="ok")


def certificate_health(now: dt.datetime | None = None) -> CertificateHealth:
    """The guide's health summary, from the database.

    ``expired``: in-service (ACTIVE, RENEWING) certificates past notAfter, plus certificates in state
    EXPIRED (they stay counted until renewed away or deleted: the scan moving a certificate to EXPIRED
    must not make the service look healthy again). ``expiring_soon``: in service and expiring within
    ``monitoring.alert_threshold_days``. ``unhealthy`` if anything expired, ``degraded`` if anything
    expires soon, else ``healthy``.
    """
    now = now or utcnow()
    threshold = get_settings().monitoring.alert_threshold_days
    soon = now + dt.timedelta(days=threshold)
    with session_scope(write=False) as session:
        total, expired_state = session.execute(
            select(
                func.count(),
                func.coalesce(func.sum(case((Certificate.state == State.EXPIRED.value, 1), else_=0)), 0),
            )
        ).one()
        past, expiring = session.execute(
            select(
                func.coalesce(func.sum(case((Issuance.not_after <= now, 1), else_=0)), 0),
                func.coalesce(
                    func.sum(case(((Issuance.not_after > now) & (Issuance.not_after <= soon), 1), else_=0)), 0
                ),
            )
            .select_from(Certificate)
            .join(
                Issuance,
                (Issuance.id == Certificate.current_issuance_id)
                & (Issuance.certificate_id == Certificate.id),
            )
            .where(Certificate.state.in_(IN_SERVICE))
        ).one()
    expired = int(past) + int(expired_state)
    state: Literal["healthy", "degraded", "unhealthy"] = (
        "unhealthy" if expired else "degraded" if expiring else "healthy"
    )
    return CertificateHealth(
        status=state, total=int(total), expiring_soon=int(expiring), expired=expired, threshold_days=threshold
    )


@router.get("/health/certificates", response_model=CertificateHealth)
def health_certificates() -> CertificateHealth:
    """healthy / degraded / unhealthy with the counts behind it (always 200: read the status)."""
    return certificate_health()


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus exposition"}},
)
def metrics() -> Response:
    """The Prometheus exporter (see docs/metrics.md)."""
    from certqueue.metrics import render_metrics

    return Response(content=render_metrics(), media_type=CONTENT_TYPE_LATEST)
