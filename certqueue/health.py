"""The guide's certificate health summary (healthy / degraded / unhealthy), computed from the
database (the "expiring soon" threshold is a share of each certificate's lifetime). Shared by the
REST API (``/health/certificates``), the Python API (``CertificateMonitoring.get_health_status``)
and ``certqueue status``. Owns nothing; it only reads.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any, Literal

from sqlalchemy import case, func, literal, select

from certqueue.config import MonitoringSettings, get_settings
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


def expiring_threshold(lifetime: dt.timedelta, monitoring: MonitoringSettings) -> dt.timedelta:
    """How much time left makes a certificate of this lifetime "expiring soon": a share of its
    lifetime (``alert_threshold_percentage``, like cert-manager's renewBeforePercentage), never less
    than ``alert_threshold_floor_hours``, never more than ``alert_threshold_days``.

    With the defaults (15 %, 12 h, 14 days): 90-day certificates 13.5 days, 45-day 6.75 days, 6-day
    0.9 days. Each is well past its renewal point (30, 15 and 3 days left), so a certificate renewed on
    time is never expiring soon, and one that is has missed several renewal attempts.
    """
    share = lifetime * (monitoring.alert_threshold_percentage / 100.0)
    floor = dt.timedelta(hours=monitoring.alert_threshold_floor_hours)
    return min(max(share, floor), dt.timedelta(days=monitoring.alert_threshold_days))


def certificate_health(
    now: dt.datetime | None = None, *, threshold_days: float | None = None
) -> CertificateHealthSummary:
    """The guide's health summary.

    ``expired``: in-service (ACTIVE, RENEWING) certificates past notAfter, plus certificates in state
    EXPIRED (they stay counted until renewed away or deleted: the scan moving a certificate to EXPIRED
    must not make the service look healthy again). ``expiring_soon``: in service with less time left
    than :func:`expiring_threshold` of its own lifetime (or than ``threshold_days`` when given).
    ``unhealthy`` if anything expired, ``degraded`` if anything expires soon, else ``healthy``.
    """
    from certqueue.db import epoch_seconds as _epoch
    from certqueue.db import session_scope

    now = now or utcnow()
    monitoring = get_settings().monitoring
    with session_scope(write=False) as session:
        dialect = session.get_bind().dialect.name
        left = _epoch(Issuance.not_after, dialect) - now.timestamp()
        if threshold_days is not None:
            soon: Any = literal(threshold_days * 86400.0)
        else:
            # expiring_threshold() in SQL: min(max(pct * lifetime, floor), cap), in seconds
            lifetime = _epoch(Issuance.not_after, dialect) - _epoch(Issuance.not_before, dialect)
            share = lifetime * (monitoring.alert_threshold_percentage / 100.0)
            floor = monitoring.alert_threshold_floor_hours * 3600.0
            cap = monitoring.alert_threshold_days * 86400.0
            floored = case((share > floor, share), else_=literal(floor))
            soon = case((floored < cap, floored), else_=literal(cap))
        total, expired_state = session.execute(
            select(
                func.count(),
                func.coalesce(func.sum(case((Certificate.state == State.EXPIRED.value, 1), else_=0)), 0),
            )
        ).one()
        past, expiring = session.execute(
            select(
                func.coalesce(func.sum(case((Issuance.not_after <= now, 1), else_=0)), 0),
                func.coalesce(func.sum(case(((Issuance.not_after > now) & (left <= soon), 1), else_=0)), 0),
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
        threshold_days=monitoring.alert_threshold_days if threshold_days is None else threshold_days,
    )
