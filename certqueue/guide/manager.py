"""The guide's ``CertificateManager``: issue, renew, revoke and propagate through the workers, and wait
for the outcome. Every request is an operation (``certqueue.operations``: its preconditions are
checked there, once, for every face) recorded in one transaction; waiting polls the database.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Literal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from certqueue import certificates, operations
from certqueue.config import Settings
from certqueue.errors import ConfigError, InvalidInput
from certqueue.guide.link import Link
from certqueue.guide.overrides import directory_for, update_config
from certqueue.guide.views import Certificate, OperationFailed, OperationTimeout, PropagationResult
from certqueue.models import Certificate as CertificateRow
from certqueue.models import Deployment, Event, Issuance, State, utcnow


class CertificateManager:
    """Issue, renew, revoke and propagate certificates through the workers, and wait for the outcome.

    ``settings``: the process's (``get_settings()``) by default. The guide's keyword arguments are
    overrides of those: ``storage_backend`` (storage.backend), ``encryption_key_path``
    (storage.encryption_key_path: it must be the workers' key, or they cannot read what is stored),
    ``lets_encrypt_enabled`` (acme.enabled), ``staging`` (acme.staging: Let's Encrypt staging when no
    other CA is configured)."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        storage_backend: str | None = None,
        encryption_key_path: str | None = None,
        lets_encrypt_enabled: bool | None = None,
        staging: bool | None = None,
    ) -> None:
        overrides: dict[str, Any] = {}
        for key, value in (
            ("storage.backend", storage_backend),
            ("storage.encryption_key_path", encryption_key_path),
            ("acme.enabled", lets_encrypt_enabled),
            ("acme.staging", staging),
        ):
            if value is not None:
                overrides[key] = value
        #: settings, sessions, sending and waiting (shared with the store, monitoring, automation)
        self.link = Link(settings, overrides)
        self.settings  # noqa: B018  (validate the overrides now, not at the first call)

    def __repr__(self) -> str:
        return f"CertificateManager(overrides={sorted(self.link.overrides)})"

    @property
    def settings(self) -> Settings:
        """The settings in force: the base (re-read as the process's settings change) plus overrides."""
        return self.link.settings

    def view(self, session: Session, row: CertificateRow, *, pending: bool = False) -> Certificate:
        """The guide's view of a row (see ``Link.view``)."""
        return self.link.view(session, row, pending=pending)

    # -- the guide's calls ------------------------------------------------------------------------

    async def issue_certificate(
        self,
        domains: Sequence[str],
        email: str | None = None,
        organization: str | None = None,
        country: str | None = None,
        state: str | None = None,
        locality: str | None = None,
        key_size: int | None = None,
        key_type: str | None = None,
        challenge_type: str | None = None,
        dns_provider: str | None = None,
        auto_renew: bool = True,
        force_new_key: bool = False,
        staging: bool | None = None,
        targets: Sequence[str] | None = None,
        wait: bool = True,
        timeout: float = 300,
    ) -> Certificate:
        """Request a certificate and (``wait``) return it once ACTIVE; ``OperationFailed`` if the
        pipeline failed it. A live certificate for the same names is returned as it is (one
        certificate per set of names), or renewed with a new key when ``force_new_key``."""
        settings = self.settings
        if not settings.acme.enabled:
            raise ConfigError("ACME issuance is disabled", key="acme.enabled")
        if isinstance(domains, str):
            raise InvalidInput("domains must be a list of names, not one string", field="domains")
        kw: dict[str, Any] = {
            "domains": list(domains),
            "email": email,
            "organization": organization,
            "country": country,
            "state": state,
            "locality": locality,
            "key_size": key_size,
            "key_type": key_type,
            "challenge_type": challenge_type,
            "dns_provider": dns_provider,
            "auto_renew": auto_renew,
            "targets": list(targets or []),
        }
        directory = directory_for(
            settings, staging if staging is not None else self.link.overrides.get("acme.staging")
        )
        if directory:
            kw["directory_url"] = directory
        req = certificates.CertificateRequest.build(settings, **kw)

        def create() -> tuple[str, bool, str, int | None, int, str | None]:
            with self.link.session() as s:
                row, created, intent = operations.request_issue(s, req, actor="manager")
                s.flush()
                last = s.execute(select(func.max(Event.id)).where(Event.certificate_id == row.id)).scalar()
                job = f"intent-{intent.id}" if intent is not None else None
                return row.id, created, str(row.state), row.current_issuance_id, int(last or 0), job

        cid, created, current_state, before_issuance, after_event, task_id = await asyncio.to_thread(create)
        renewing = False
        if created:
            self.link.nudge()
        elif force_new_key and current_state == State.ACTIVE:
            renewing = True
            task_id = await asyncio.to_thread(
                self.link.request,
                lambda s: operations.request_renew(s, cid, force=True, reason="new key", actor="manager"),
            )
        if not wait:
            return await asyncio.to_thread(self.link.load, cid)
        if renewing:
            return await self._wait_renewed(cid, before_issuance, after_event, task_id, timeout)

        def done() -> Certificate | None:
            failure = self.link.task_failure(task_id)
            with self.link.session(write=False) as s:
                row = certificates.get(s, cid)
                if row.state == State.ACTIVE:
                    return self.link.view(s, row)
                if row.state == State.FAILED:
                    raise OperationFailed(
                        f"{cid}: issuance failed: {row.last_error or 'unknown'}",
                        reason=row.last_error or "failed",
                        certificate_id=cid,
                    )
            if failure is not None:
                raise failure
            return None

        return await self.link.poll(done, timeout, f"{cid} to become ACTIVE")

    async def _wait_renewed(
        self, cid: str, before_issuance: int | None, after_event: int, task_id: str | None, timeout: float
    ) -> Certificate:
        def done() -> Certificate | None:
            failure = self.link.task_failure(task_id)
            with self.link.session(write=False) as s:
                row = certificates.get(s, cid)
                if row.state == State.ACTIVE and row.current_issuance_id not in (None, before_issuance):
                    return self.link.view(s, row)
                failed = self.link.failure_since(s, cid, after_event)
                if failed is not None:
                    raise failed
            if failure is not None:
                raise failure
            return None

        return await self.link.poll(done, timeout, f"{cid} to be renewed")

    async def renew_certificate(
        self, certificate_id: str, force: bool = False, *, wait: bool = True, timeout: float = 300
    ) -> Certificate:
        """Renew now. Without ``force`` a certificate that is not due yet (``renew_at`` in the future)
        is returned as it is, as the renewal task would decide; with ``force`` it is renewed (new key,
        new serial) whatever its expiry. A FAILED certificate is issued again."""
        row, after_event = await asyncio.to_thread(self.link.baseline, certificate_id)
        # the preconditions (imported, state, not due yet) are operations.request_renew's; no
        # intent means nothing was due and the certificate is returned as it is
        task_id = await asyncio.to_thread(
            self.link.request,
            lambda s: operations.request_renew(s, row.id, force=bool(force), actor="manager"),
        )
        if task_id is None or not wait:
            return await asyncio.to_thread(self.link.load, row.id)
        return await self._wait_renewed(row.id, row.current_issuance_id, after_event, task_id, timeout)

    async def revoke_certificate(
        self, certificate_id: str, reason: str = "unspecified", *, wait: bool = True, timeout: float = 120
    ) -> None:
        """Revoke at the CA (RFC 5280 reason name the CA accepts, checked before anything is sent)."""
        operations.check_revocation_reason(reason, self.settings)  # against this manager's settings
        # the other preconditions are operations.request_revoke's; no intent: already REVOKED
        task_id = await asyncio.to_thread(
            self.link.request,
            lambda s: operations.request_revoke(s, certificate_id, reason=reason, actor="manager"),
        )
        if task_id is None or not wait:
            return

        def done() -> bool | None:
            failure = self.link.task_failure(task_id)
            with self.link.session(write=False) as s:
                if certificates.get(s, certificate_id).state == State.REVOKED:
                    return True
            if failure is not None:
                raise failure
            return None

        await self.link.poll(done, timeout, f"{certificate_id} to be revoked")

    async def propagate_certificate(
        self,
        certificate_id: str,
        strategy: Literal["sync", "async"] = "sync",
        *,
        regions: Sequence[str] | None = None,
        force: bool = False,
        timeout: float = 300,
    ) -> PropagationResult:
        """Deploy the certificate's current issuance to its regions (``regions``: a subset).

        ``sync`` waits until every region holds it or failed; ``async`` returns the task id at once.
        A region already holding this issuance is not redeployed unless ``force``."""
        if strategy not in ("sync", "async"):
            raise InvalidInput("strategy must be sync or async", field="strategy")
        settings = self.settings
        started = utcnow()

        def request() -> tuple[str, list[str], str]:
            # the preconditions (known regions, something to deploy, regions at all) are
            # operations.request_propagate's
            with self.link.session() as s:
                intent, wanted = operations.request_propagate(
                    s,
                    certificate_id,
                    regions=list(regions or []),
                    force=bool(force),
                    actor="manager",
                    settings=settings,
                )
                row = certificates.get(s, certificate_id)
                iss = s.get(Issuance, row.pending_issuance_id or row.current_issuance_id)
                assert iss is not None  # request_propagate refuses a certificate with no issuance
                return f"intent-{intent.id}", wanted, iss.fingerprint

        task_id, wanted, fingerprint = await asyncio.to_thread(request)
        self.link.nudge()
        if strategy == "async":
            return PropagationResult(
                certificate_id, "pending", dict.fromkeys(wanted, "pending"), task_id=task_id
            )

        def snapshot() -> tuple[dict[str, str], dict[str, str]]:
            out: dict[str, str] = {}
            errors: dict[str, str] = {}
            with self.link.session(write=False) as s:
                rows = {
                    d.region: d
                    for d in s.execute(
                        select(Deployment).where(Deployment.certificate_id == certificate_id)
                    ).scalars()
                }
            for r in wanted:
                d = rows.get(r)
                fresh = not force or (
                    d is not None and d.deployed_at is not None and d.deployed_at >= started
                )
                if d is not None and d.status == "deployed" and d.fingerprint == fingerprint and fresh:
                    out[r] = "success"
                elif d is not None and d.status == "failed":
                    out[r] = "failed"
                    errors[r] = d.last_error or "failed"
                else:
                    out[r] = "pending"
            return out, errors

        def settled() -> PropagationResult | None:
            failure = self.link.task_failure(task_id)
            out, errors = snapshot()
            if all(v != "pending" for v in out.values()):
                status: Literal["success", "failed"] = (
                    "success" if all(v == "success" for v in out.values()) else "failed"
                )
                return PropagationResult(certificate_id, status, out, task_id=task_id, errors=errors)
            if failure is not None:
                raise failure
            return None

        try:
            return await self.link.poll(settled, timeout, f"{certificate_id} to reach {', '.join(wanted)}")
        except OperationTimeout:
            out, errors = await asyncio.to_thread(snapshot)
            return PropagationResult(certificate_id, "pending", out, task_id=task_id, errors=errors)

    async def enable_auto_renewal(self, threshold_days: float) -> dict[str, Any]:
        """Turn automatic renewal on with ``threshold_days`` (runtime overrides
        ``automation.auto_renew`` and ``automation.renewal_threshold_days``, seen by every worker).
        The threshold applies to each certificate's next issuance: ``renew_at`` is computed when a
        certificate becomes ACTIVE. Per-certificate ``auto_renew`` choices are kept."""
        return await update_config(
            {"automation": {"auto_renew": True, "renewal_threshold_days": threshold_days}},
            settings=self.link.base,
        )

    async def get_certificate(self, certificate_id: str) -> Certificate:
        return await asyncio.to_thread(self.link.load, certificate_id)
