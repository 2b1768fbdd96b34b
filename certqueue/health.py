"""The guide's certificate health summary (healthy / degraded / unhealthy), computed from the
database. Shared by the REST API (``/health/certificates``), the Python API
(``CertificateMonitoring.get_health_status``) and ``certqueue status``. Owns nothing; it only reads.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any, Literal

from sqlalchemy import case, func, select

from certqueue.config import get_settings
from certqueue.models import Certificate, Issuance, State, utcnow

IN_SERVICE = (State.ACTIVE.value, State.RENEWING.value)
HealthStatus = Literal["healthy", "degraded", "unhealthy"]


@dataclass(frozen=True)
class CertificateHealthSummary:
    status: HealthStatus
    total: int
    expiring_soon: int
    expired: int
    threshold_days: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def certificate_health(
    now: dt.datetime | None = None, *, threshold_days: float | None = None
) -> CertificateHealthSummary:
    """The guide's health summary.

    ``expired``: in-service (ACTIVE, RENEWING) certificates past notAfter, plus certificates in state
    EXPIRED (they stay counted until renewed away or deleted: the scan moving a certificate to EXPIRED
    must not make the service look healthy again). ``expiring_soon``: in service and expiring within
    ``threshold_days`` (default ``monitoring.alert_threshold_days``). ``unhealthy`` if anything
    expired, ``degraded`` if anything expires soon, else ``healthy``.
    """
    from certqueue.db import session_scope

    now = now or utcnow()
    threshold = get_settings().monitoring.alert_threshold_days if threshold_days is None else threshold_days
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
    status: HealthStatus = "unhealthy" if expired else "degraded" if expiring else "healthy"
    return CertificateHealthSummary(
        status=status,
        total=int(total),
        expiring_soon=int(expiring),
        expired=expired,
        threshold_days=threshold,
    )
