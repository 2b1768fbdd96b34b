"""The guide's ``CertificateMonitoring`` (expiry and the health summary) and
``CertificateAutomation`` (the renewal loop for a process without beat). Read-only except the
automation's claim, which is dispatch's (``certqueue.dispatch.claim_due``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Iterable
from typing import Any

from sqlalchemy import select

from certqueue.errors import InvalidInput, InvalidTransition
from certqueue.guide.link import Link
from certqueue.guide.manager import CertificateManager
from certqueue.guide.views import IN_SERVICE, Certificate
from certqueue.models import Certificate as CertificateRow
from certqueue.models import Issuance, State, utcnow

log = logging.getLogger("certqueue.manager")


def parse_states(value: Any) -> list[str] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, Iterable) else [value]
    out = []
    for v in items:
        name = str(v).upper()
        if name not in State.__members__:
            raise InvalidInput(f"unknown state {v!r}; use one of {', '.join(State)}", field="filter")
        out.append(name)
    return out


async def expiring(
    link: Link,
    within_days: float,
    states_in: list[str] | None = None,
    domain: str | None = None,
    limit: int = 1000,
) -> list[Certificate]:
    """In-service certificates whose served issuance expires within ``within_days`` (or has
    expired), soonest first."""

    def run() -> list[Certificate]:
        soon = utcnow() + dt.timedelta(days=within_days)
        wanted = states_in or [s.value for s in IN_SERVICE]
        with link.session(write=False) as s:
            rows = list(
                s.execute(
                    select(CertificateRow)
                    .join(
                        Issuance,
                        (Issuance.id == CertificateRow.current_issuance_id)
                        & (Issuance.certificate_id == CertificateRow.id),
                    )
                    .where(CertificateRow.state.in_(wanted), Issuance.not_after <= soon)
                    .order_by(Issuance.not_after, CertificateRow.id)
                    .limit(limit if domain is None else None)
                ).scalars()
            )
            if domain is not None:
                rows = [r for r in rows if domain in r.domains][:limit]
            return [link.view(s, r) for r in rows]

    return await asyncio.to_thread(run)


# --- monitoring and automation ----------------------------------------------------------------------


class CertificateMonitoring:
    """Expiry tracking and the guide's health summary (the same as ``/health/certificates``)."""

    def __init__(self, cert_manager: CertificateManager | None = None) -> None:
        self.manager = cert_manager or CertificateManager()

    async def get_expiring_certificates(self, within_days: float = 30) -> list[Certificate]:
        if isinstance(within_days, bool) or not isinstance(within_days, int | float) or within_days < 0:
            raise InvalidInput("within_days must be a number of days >= 0", field="within_days")
        return await expiring(self.manager.link, float(within_days))

    async def get_health_status(self) -> dict[str, Any]:
        """``{"status": healthy|degraded|unhealthy, "total", "expiring_soon", "expired",
        "threshold_days"}``; expiring soon means within ``monitoring.alert_threshold_days``."""
        from certqueue.health import certificate_health

        threshold = self.manager.settings.monitoring.alert_threshold_days
        summary = await asyncio.to_thread(certificate_health, threshold_days=threshold)
        return summary.as_dict()


class CertificateAutomation:
    """The renewal loop for processes that run without beat.

    In a Celery deployment beat already does this (``certqueue.scan.due`` every
    ``automation.scan_interval_seconds``); ``start_renewal_job`` is for an embedding application that
    wants the loop in its own event loop. Either way the claim is the same (``claim_due``: SKIP
    LOCKED on PostgreSQL), so running both never renews a certificate twice."""

    def __init__(self, cert_manager: CertificateManager | None = None) -> None:
        self.manager = cert_manager or CertificateManager()
        self._task: asyncio.Task[None] | None = None
        self.last_result: dict[str, Any] | None = None

    async def check_and_renew_all(self, limit: int | None = None) -> dict[str, Any]:
        """Claim every due certificate (ACTIVE -> RENEWING) and record its renewal (a durable intent
        in the same transaction); returns ``{"claimed": n, "enqueued": n, "certificate_ids": [...]}``.
        Dispatch sends the renewals as capacity allows, whatever the broker is doing."""
        from certqueue import dispatch, intents

        settings = self.manager.settings
        batch = limit or settings.automation.scan_batch_size

        def claim() -> list[str]:
            with self.manager.link.session() as s:
                lease = settings.automation.stuck_after_seconds
                ids = dispatch.claim_due(s, utcnow(), None, batch, lease=lease)
                intents.record_many(s, "renew", ids, actor="automation")
                return ids

        ids = await asyncio.to_thread(claim)
        if ids:
            self.manager.link.nudge()
        result = {"claimed": len(ids), "enqueued": len(ids), "certificate_ids": ids}
        self.last_result = result
        return result

    async def start_renewal_job(self, check_interval_hours: float = 24) -> None:
        """Run ``check_and_renew_all`` now and then every ``check_interval_hours`` in this event loop,
        until ``stop_renewal_job``."""
        if check_interval_hours <= 0:
            raise InvalidInput("check_interval_hours must be positive", field="check_interval_hours")
        if self._task is not None and not self._task.done():
            raise InvalidTransition("the renewal job is already running")
        interval = check_interval_hours * 3600

        async def loop() -> None:
            while True:
                try:
                    await self.check_and_renew_all()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001  (one failed round must not end the job)
                    log.warning("renewal round failed (%s)", type(exc).__name__)
                await asyncio.sleep(interval)

        self._task = asyncio.create_task(loop(), name="certqueue-renewal-job")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop_renewal_job(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
