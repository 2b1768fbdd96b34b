"""The guide objects' link to the running system: the settings in force (the process's, or given
ones, plus per-object overrides), database sessions, the Celery app that sends, nudging dispatch,
waiting by polling the database, and the guide's view of a row. One per ``CertificateManager``; the
store, monitoring and automation objects use their manager's. Owns no rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from certqueue import certificates
from certqueue.config import Settings, get_settings
from certqueue.errors import NotFound
from certqueue.guide.overrides import with_overrides
from certqueue.guide.views import WORKING, Certificate, OperationFailed, OperationTimeout
from certqueue.models import Certificate as CertificateRow
from certqueue.models import Event, Issuance, State

log = logging.getLogger("certqueue.manager")

T = TypeVar("T")

POLL_INTERVAL_SECONDS = 0.2


class Link:
    """Settings, sessions, the sending app and waiting, for one manager and what shares it."""

    def __init__(self, settings: Settings | None, overrides: Mapping[str, Any] | None = None) -> None:
        self._base = settings
        self.overrides: dict[str, Any] = dict(overrides or {})
        self._derived: tuple[int, Settings] | None = None
        self._app: Any = None
        self._nudger: Any = None

    @property
    def base(self) -> Settings | None:
        """The settings given to the manager (None: the process's)."""
        return self._base

    def override(self, key: str, value: Any) -> None:
        """Add a dotted override; validated at the next read of :attr:`settings`."""
        self.overrides[key] = value
        self._derived = None

    @property
    def settings(self) -> Settings:
        """The settings in force: the base (re-read as the process's settings change) plus overrides."""
        base = self._base or get_settings()
        if not self.overrides:
            return base
        if self._derived is None or self._derived[0] != id(base):
            self._derived = (id(base), with_overrides(base, self.overrides))
        return self._derived[1]

    def session(self, write: bool = True) -> contextlib.AbstractContextManager[Session]:
        from certqueue.db import session_scope

        return session_scope(self.settings.database.url, write=write)

    def celery(self) -> Any:
        if self._base is None:
            from certqueue.celery_app import lazy_app

            return lazy_app.get()
        if self._app is None:  # explicit settings: their own broker
            from celery import Celery

            from certqueue.celery_app import configure

            app = Celery("certqueue-manager", set_as_current=False)
            configure(app, self.settings)
            self._app = app
        return self._app

    def request(self, make: Callable[[Session], Any]) -> str | None:
        """Record a request (``certqueue.operations``) in one transaction and nudge dispatch; the
        job id of its intent, or None when there was nothing to do."""
        with self.session() as s:
            intent = make(s)
            job = f"intent-{intent.id}" if intent is not None else None
        if job is not None:
            self.nudge()
        return job

    def nudge(self) -> None:
        from certqueue import nudge

        if self._base is None:
            nudge.nudge()
            return
        if self._nudger is None:
            self._nudger = nudge.nudger_for(self.celery)
        self._nudger.request()

    def task_failure(self, task_id: str | None) -> OperationFailed | None:
        """The request's own failure (a CA error on revoke), if it failed."""
        if not task_id:
            return None
        if task_id.startswith("intent-"):
            from certqueue.models import Intent

            with self.session(write=False) as s:
                intent = s.get(Intent, int(task_id.removeprefix("intent-")))
                if intent is not None and intent.status == "failed":
                    reason = intent.outcome or "failed"
                    return OperationFailed(f"the {intent.kind} request failed: {reason}", reason=reason)
            return None
        res = self.celery().AsyncResult(task_id)
        try:
            state = res.state
            if state == "FAILURE":
                exc = res.result
                message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
                return OperationFailed(message, reason=getattr(exc, "reason", None) or "task")
            if state == "SUCCESS" and isinstance(res.result, dict) and res.result.get("status") == "failed":
                reason = str(res.result.get("reason") or "failed")
                return OperationFailed(f"the task failed: {reason}", reason=reason)
        except Exception as exc:  # noqa: BLE001  (the result backend is a hint; the database decides)
            log.debug("result of %s unavailable (%s)", task_id, type(exc).__name__)
        return None

    async def poll(self, check: Callable[[], T | None], timeout: float, what: str) -> T:
        deadline = time.monotonic() + timeout
        while True:
            result = await asyncio.to_thread(check)
            if result is not None:
                return result
            if time.monotonic() >= deadline:
                raise OperationTimeout(f"timed out after {timeout:g}s waiting for {what}")
            await asyncio.sleep(POLL_INTERVAL_SECONDS)

    def view(self, session: Session, row: CertificateRow, *, pending: bool = False) -> Certificate:
        """The guide's view of a row: its served issuance (or, with ``pending``, the one being
        propagated when there is no served one yet)."""
        iss_id = row.current_issuance_id or (row.pending_issuance_id if pending else None)
        iss = session.get(Issuance, iss_id) if iss_id else None
        settings = self.settings
        url = settings.database.url
        loader: Callable[[], str] | None = None
        if iss is not None:
            issuance_id = iss.id

            def loader() -> str:
                from certqueue.db import session_scope

                with session_scope(url, write=False) as s:
                    stored = s.get(Issuance, issuance_id)
                    if stored is None:
                        raise NotFound(f"issuance {issuance_id} is gone")
                    return certificates.decrypt_key(stored, settings).decode()

        return Certificate(
            id=row.id,
            domains=list(row.domains),
            state=str(row.state),
            serial=iss.serial if iss else None,
            issued_at=iss.not_before if iss else None,
            expires_at=iss.not_after if iss else None,
            certificate_pem=iss.cert_pem if iss else None,
            chain_pem=iss.chain_pem if iss else None,
            auto_renew=bool(row.auto_renew),
            external=bool(row.external),
            renew_at=row.renew_at,
            last_error=row.last_error,
            issuance_id=iss.id if iss else None,
            _key_loader=loader,
            waiting_reason=row.waiting_reason if row.state in WORKING else None,
            waiting_until=row.next_attempt_at if row.waiting_reason and row.state in WORKING else None,
        )

    def load(self, certificate_id: str) -> Certificate:
        with self.session(write=False) as s:
            return self.view(s, certificates.get(s, certificate_id), pending=True)

    def baseline(self, certificate_id: str) -> tuple[CertificateRow, int]:
        """The row and the last event id now: what happens after this is the outcome of our request."""
        with self.session(write=False) as s:
            row = certificates.get(s, certificate_id)
            last = s.execute(select(func.max(Event.id)).where(Event.certificate_id == row.id)).scalar()
            s.expunge(row)
            return row, int(last or 0)

    def failure_since(self, s: Session, certificate_id: str, after: int) -> OperationFailed | None:
        ev = s.execute(
            select(Event)
            .where(
                Event.certificate_id == certificate_id,
                Event.id > after,
                ((Event.kind == "transition") & (Event.to_state == State.FAILED.value))
                | ((Event.kind == "renewal") & (Event.reason == "failure")),
            )
            .order_by(Event.id)
            .limit(1)
        ).scalar_one_or_none()
        if ev is None:
            return None
        reason = (ev.data or {}).get("reason") if ev.kind == "renewal" else ev.reason
        what = "renewal" if ev.kind == "renewal" else "issuance"
        return OperationFailed(
            f"{certificate_id}: {what} failed: {reason or 'unknown'}",
            reason=str(reason or "failed"),
            certificate_id=certificate_id,
        )
