"""``/health`` and ``/health/certificates``: no authentication, as probes expect. They reveal counts
and states, never names of secrets or keys. ``/metrics`` is not served here: ``certqueue metrics``
serves it on its own listener (monitoring.bind:monitoring.prometheus_port), so the API port can be
public while the metrics port is reachable only from the monitoring network."""

from __future__ import annotations

import datetime as dt
import logging

from fastapi import APIRouter, Response, status
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from certqueue.api.schemas import CertificateHealth, Health
from certqueue.db import session_scope
from certqueue.health import IN_SERVICE
from certqueue.health import certificate_health as _certificate_health

log = logging.getLogger("certqueue.api")

router = APIRouter(tags=["health"])

__all__ = ["IN_SERVICE", "certificate_health", "router"]


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
    """The guide's health summary (``certqueue.health.certificate_health``) as the API's schema."""
    return CertificateHealth(**_certificate_health(now).as_dict())


@router.get("/health/certificates", response_model=CertificateHealth)
def health_certificates() -> CertificateHealth:
    """healthy / degraded / unhealthy with the counts behind it (always 200: read the status)."""
    return certificate_health()
