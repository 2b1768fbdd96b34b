"""The guide's Python API, async: ``CertificateManager``, ``CertificateStore``, ``CertificateMetadata``,
``CertificateMonitoring``, ``CertificateAutomation`` and ``update_config``.

A facade over the pipeline, not a second implementation of it: requests are validated and written
here (``certqueue.certificates``), the work is done by the workers (the public tasks, sent by name),
and waiting is polling the database, the truth. Blocking database and broker calls run in a thread
(``asyncio.to_thread``), so an event loop is never blocked. Owns no state of its own; the rows it
writes are those ``certqueue.certificates`` and ``certqueue.runtime`` own.

    manager = CertificateManager()
    cert = await manager.issue_certificate(domains=["example.com"], email="admin@example.com")
    print(cert.id, cert.expires_at, cert.days_until_expiration)

Errors: bad input is ``InvalidInput`` (nothing written, nothing sent), an unknown id ``NotFound``, a
request the certificate's state forbids ``InvalidTransition``, work that ended badly
``OperationFailed`` (its ``reason`` is the pipeline's stable reason, e.g. ``acme:unauthorized``), and
a wait that ran out ``OperationTimeout`` (the work goes on; wait again or check later).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from certqueue import certificates, crypto, operations, runtime, validation
from certqueue.config import LETS_ENCRYPT_PRODUCTION, LETS_ENCRYPT_STAGING, Settings, get_settings
from certqueue.errors import CertqueueError, ConfigError, InvalidInput, InvalidTransition, NotFound
from certqueue.models import Certificate as CertificateRow
from certqueue.models import Deployment, Event, Issuance, State, utcnow

log = logging.getLogger("certqueue.manager")

T = TypeVar("T")

POLL_INTERVAL_SECONDS = 0.2
STORE_BACKENDS = ("local", "aws", "azure")
IN_SERVICE = (State.ACTIVE, State.RENEWING)
#: states whose work may wait for a budget or capacity
WORKING = (State.REQUESTED, State.ISSUING, State.RENEWING)
LIST_FILTER_KEYS = frozenset({"state", "domain", "expiring_within_days", "limit"})


class OperationFailed(CertqueueError):
    """The pipeline finished the work badly; ``reason`` is its stable reason."""

    reason = "failed"

    def __init__(self, message: str, *, reason: str | None = None, certificate_id: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.certificate_id = certificate_id


class OperationTimeout(CertqueueError, TimeoutError):
    """Waiting ran out; the work was queued and goes on."""

    reason = "timeout"


# --- values -----------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Certificate:
    """A certificate as the guide shows it: the row and its served (or pending) issuance.

    ``private_key_pem`` is decrypted only when read, from the database, each time; it is in no repr
    and no ``str``. Read it only to hand the key to what serves the certificate."""

    id: str
    domains: list[str]
    state: str
    serial: str | None
    issued_at: dt.datetime | None
    expires_at: dt.datetime | None
    certificate_pem: str | None
    chain_pem: str | None
    auto_renew: bool
    external: bool
    renew_at: dt.datetime | None
    last_error: str | None
    issuance_id: int | None
    _key_loader: Callable[[], str] | None = field(default=None, repr=False, compare=False)
    #: why the work waits (a rate limit, capacity) and until when; None when it does not wait
    waiting_reason: str | None = None
    waiting_until: dt.datetime | None = None

    @property
    def days_until_expiration(self) -> int | None:
        """Whole days left (negative once expired); None before the first issuance."""
        if self.expires_at is None:
            return None
        return math.floor((self.expires_at - utcnow()).total_seconds() / 86400)

    @property
    def private_key_pem(self) -> str:
        """The private key, decrypted now (``NotFound`` when none is stored)."""
        if self._key_loader is None:
            raise NotFound(f"{self.id} has no issued certificate yet")
        return self._key_loader()

    @property
    def fullchain_pem(self) -> str | None:
        return None if self.certificate_pem is None else self.certificate_pem + (self.chain_pem or "")

    def __repr__(self) -> str:
        return (
            f"Certificate(id={self.id!r}, domains={self.domains!r}, state={self.state!r}, "
            f"serial={self.serial!r}, expires_at={self.expires_at!r})"
        )

    __str__ = __repr__


@dataclass(frozen=True)
class PropagationResult:
    """``status``: success (every region holds the certificate), failed (some region failed and none
    is still pending), pending (``strategy="async"``, or a wait that ran out)."""

    certificate_id: str
    status: Literal["success", "failed", "pending"]
    regions: dict[str, str]
    task_id: str | None = None
    errors: dict[str, str] = field(default_factory=dict)


class CertificateMetadata(BaseModel):
    """The guide's certificate metadata (subject fields, validity, renewal choice)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    certificate_id: str | None = None
    domains: list[str]
    issued_at: dt.datetime | None = None
    expires_at: dt.datetime | None = None
    auto_renew: bool = True
    challenge_type: Literal["http-01", "dns-01"] = "http-01"
    key_size: int | None = None
    organization: str | None = None
    country: str | None = None
    state: str | None = None
    locality: str | None = None

    @field_validator("domains")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        return validation.normalize_domains(v)

    @field_validator("issued_at", "expires_at")
    @classmethod
    def _utc(cls, v: dt.datetime | None) -> dt.datetime | None:
        # the guide writes naive datetimes (datetime(2025, 3, 5)): they are taken as UTC
        return None if v is None else (v.replace(tzinfo=dt.UTC) if v.tzinfo is None else v.astimezone(dt.UTC))

    @field_validator("country")
    @classmethod
    def _country(cls, v: str | None) -> str | None:
        return None if v is None else validation.validate_country(v)

    @field_validator("key_size")
    @classmethod
    def _key_size(cls, v: int | None) -> int | None:
        return None if v is None else validation.validate_key_size(v)

    @property
    def days_until_expiration(self) -> int | None:
        if self.expires_at is None:
            return None
        return math.floor((self.expires_at - utcnow()).total_seconds() / 86400)

    def is_expiring_soon(self, days: float = 30) -> bool:
        """True when ``days_until_expiration`` (whole days) is at most ``days``, or it has expired:
        the guide's 30-days-left certificate is expiring soon at ``days=30``."""
        left = self.days_until_expiration
        return left is not None and left <= days

    @classmethod
    def of(cls, cert: Certificate, row: CertificateRow | None = None) -> CertificateMetadata:
        return cls(
            certificate_id=cert.id,
            domains=list(cert.domains),
            issued_at=cert.issued_at,
            expires_at=cert.expires_at,
            auto_renew=cert.auto_renew,
            challenge_type=(
                row.challenge_type if row and row.challenge_type in ("http-01", "dns-01") else "http-01"
            ),
            key_size=row.key_size if row else None,
            organization=row.organization if row else None,
            country=row.country if row else None,
            state=row.state_province if row else None,
            locality=row.locality if row else None,
        )


# --- settings ---------------------------------------------------------------------------------------


def _merge(low: dict[str, Any], high: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(low)
    for k, v in high.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def with_overrides(settings: Settings, changes: Mapping[str, Any]) -> Settings:
    """``settings`` with dotted ``changes`` applied, validated (``ConfigError`` naming the key)."""
    if not changes:
        return settings
    merged = _merge(settings.model_dump(), runtime.unflatten(dict(changes)))
    try:
        return Settings(**merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise ConfigError(msg, key=key) from None


def _directory_for(settings: Settings, staging: bool | None) -> str | None:
    """The ACME directory for a per-call ``staging`` choice: Let's Encrypt staging or production when
    the configured CA is Let's Encrypt (or none is set); a custom CA (a private one, Pebble) has no
    staging twin, so it is used as configured."""
    if staging is None:
        return None
    configured = settings.acme.directory_url
    if configured in (None, LETS_ENCRYPT_PRODUCTION, LETS_ENCRYPT_STAGING):
        return LETS_ENCRYPT_STAGING if staging else LETS_ENCRYPT_PRODUCTION
    return configured


async def update_config(
    changes: Mapping[str, Any], *, settings: Settings | None = None, actor: str = "guide-api"
) -> dict[str, Any]:
    """Store runtime setting overrides in the database, where every process reads them (within
    ``CERTQUEUE_RUNTIME_TTL_SECONDS``; see ``certqueue.runtime``).

    ``changes`` is nested (``{"automation": {"renewal_threshold_days": 45}}``, the guide's
    ``certificate_management`` wrapper accepted) or dotted. Nothing is stored unless every key may
    change at runtime and the settings with the change still validate (``ConfigError``). Returns the
    dotted keys stored, each recorded as a ``config`` event naming ``actor``. This process sees the
    change at once."""
    flat = runtime.flatten(changes)
    if not flat:
        raise ConfigError("no settings to change")
    runtime.check_keys(flat)
    base = settings or get_settings()
    candidate = with_overrides(base, flat)

    def store() -> None:
        from certqueue.db import session_scope

        with session_scope(base.database.url) as s:
            runtime.set_overrides(s, flat, actor=actor)

    await asyncio.to_thread(store)
    _apply_here(candidate if settings is None else None)
    return flat


def _apply_here(candidate: Settings | None) -> None:
    """Make this process see a runtime change now: re-read the layers, or (settings installed as they
    are, e.g. by a test) install the changed settings."""
    from certqueue import config

    cached = config._cached
    if cached is not None and cached.recipe is not None:
        config.get_settings(reload=True)
    elif candidate is not None:
        config.set_settings(candidate)


# --- the manager ------------------------------------------------------------------------------------


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
        self._base = settings
        self._overrides: dict[str, Any] = {}
        for key, value in (
            ("storage.backend", storage_backend),
            ("storage.encryption_key_path", encryption_key_path),
            ("acme.enabled", lets_encrypt_enabled),
            ("acme.staging", staging),
        ):
            if value is not None:
                self._overrides[key] = value
        self._derived: tuple[int, Settings] | None = None
        self._app: Any = None
        self._nudger: Any = None
        self.settings  # noqa: B018  (validate the overrides now, not at the first call)

    def __repr__(self) -> str:
        return f"CertificateManager(overrides={sorted(self._overrides)})"

    @property
    def settings(self) -> Settings:
        """The settings in force: the base (re-read as the process's settings change) plus overrides."""
        base = self._base or get_settings()
        if not self._overrides:
            return base
        if self._derived is None or self._derived[0] != id(base):
            self._derived = (id(base), with_overrides(base, self._overrides))
        return self._derived[1]

    # -- plumbing ---------------------------------------------------------------------------------

    def _session(self, write: bool = True) -> contextlib.AbstractContextManager[Session]:
        from certqueue.db import session_scope

        return session_scope(self.settings.database.url, write=write)

    def _celery(self) -> Any:
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

    def _request(self, make: Callable[[Session], Any]) -> str | None:
        """Record a request (``certqueue.operations``) in one transaction and nudge dispatch; the
        job id of its intent, or None when there was nothing to do."""
        with self._session() as s:
            intent = make(s)
            job = f"intent-{intent.id}" if intent is not None else None
        if job is not None:
            self._nudge()
        return job

    def _nudge(self) -> None:
        from certqueue import nudge

        if self._base is None:
            nudge.nudge()
            return
        if self._nudger is None:
            self._nudger = nudge.nudger_for(self._celery)
        self._nudger.request()

    def _task_failure(self, task_id: str | None) -> OperationFailed | None:
        """The request's own failure (a CA error on revoke), if it failed."""
        if not task_id:
            return None
        if task_id.startswith("intent-"):
            from certqueue.models import Intent

            with self._session(write=False) as s:
                intent = s.get(Intent, int(task_id.removeprefix("intent-")))
                if intent is not None and intent.status == "failed":
                    reason = intent.outcome or "failed"
                    return OperationFailed(f"the {intent.kind} request failed: {reason}", reason=reason)
            return None
        res = self._celery().AsyncResult(task_id)
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

    async def _poll(self, check: Callable[[], T | None], timeout: float, what: str) -> T:
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

    def _load(self, certificate_id: str) -> Certificate:
        with self._session(write=False) as s:
            return self.view(s, certificates.get(s, certificate_id), pending=True)

    def _baseline(self, certificate_id: str) -> tuple[CertificateRow, int]:
        """The row and the last event id now: what happens after this is the outcome of our request."""
        with self._session(write=False) as s:
            row = certificates.get(s, certificate_id)
            last = s.execute(select(func.max(Event.id)).where(Event.certificate_id == row.id)).scalar()
            s.expunge(row)
            return row, int(last or 0)

    def _failure_since(self, s: Session, certificate_id: str, after: int) -> OperationFailed | None:
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
        directory = _directory_for(
            settings, staging if staging is not None else self._overrides.get("acme.staging")
        )
        if directory:
            kw["directory_url"] = directory
        req = certificates.CertificateRequest.build(settings, **kw)

        def create() -> tuple[str, bool, str, int | None, int, str | None]:
            with self._session() as s:
                row, created, intent = operations.request_issue(s, req, actor="manager")
                s.flush()
                last = s.execute(select(func.max(Event.id)).where(Event.certificate_id == row.id)).scalar()
                job = f"intent-{intent.id}" if intent is not None else None
                return row.id, created, str(row.state), row.current_issuance_id, int(last or 0), job

        cid, created, current_state, before_issuance, after_event, task_id = await asyncio.to_thread(create)
        renewing = False
        if created:
            self._nudge()
        elif force_new_key and current_state == State.ACTIVE:
            renewing = True
            task_id = await asyncio.to_thread(
                self._request,
                lambda s: operations.request_renew(s, cid, force=True, reason="new key", actor="manager"),
            )
        if not wait:
            return await asyncio.to_thread(self._load, cid)
        if renewing:
            return await self._wait_renewed(cid, before_issuance, after_event, task_id, timeout)

        def done() -> Certificate | None:
            failure = self._task_failure(task_id)
            with self._session(write=False) as s:
                row = certificates.get(s, cid)
                if row.state == State.ACTIVE:
                    return self.view(s, row)
                if row.state == State.FAILED:
                    raise OperationFailed(
                        f"{cid}: issuance failed: {row.last_error or 'unknown'}",
                        reason=row.last_error or "failed",
                        certificate_id=cid,
                    )
            if failure is not None:
                raise failure
            return None

        return await self._poll(done, timeout, f"{cid} to become ACTIVE")

    async def _wait_renewed(
        self, cid: str, before_issuance: int | None, after_event: int, task_id: str | None, timeout: float
    ) -> Certificate:
        def done() -> Certificate | None:
            failure = self._task_failure(task_id)
            with self._session(write=False) as s:
                row = certificates.get(s, cid)
                if row.state == State.ACTIVE and row.current_issuance_id not in (None, before_issuance):
                    return self.view(s, row)
                failed = self._failure_since(s, cid, after_event)
                if failed is not None:
                    raise failed
            if failure is not None:
                raise failure
            return None

        return await self._poll(done, timeout, f"{cid} to be renewed")

    async def renew_certificate(
        self, certificate_id: str, force: bool = False, *, wait: bool = True, timeout: float = 300
    ) -> Certificate:
        """Renew now. Without ``force`` a certificate that is not due yet (``renew_at`` in the future)
        is returned as it is, as the renewal task would decide; with ``force`` it is renewed (new key,
        new serial) whatever its expiry. A FAILED certificate is issued again."""
        row, after_event = await asyncio.to_thread(self._baseline, certificate_id)
        if row.external:
            raise InvalidInput(
                f"{row.id} was imported; renew it where it was issued and import the new one",
                field="certificate_id",
            )
        if row.state in (State.REVOKED, State.EXPIRED):
            raise InvalidTransition(f"{row.id} is {row.state} and cannot be renewed; issue a new certificate")
        if row.state == State.ACTIVE and not force and (row.renew_at is None or row.renew_at > utcnow()):
            return await asyncio.to_thread(self._load, row.id)
        task_id = await asyncio.to_thread(
            self._request, lambda s: operations.request_renew(s, row.id, force=bool(force), actor="manager")
        )
        if not wait:
            return await asyncio.to_thread(self._load, row.id)
        return await self._wait_renewed(row.id, row.current_issuance_id, after_event, task_id, timeout)

    async def revoke_certificate(
        self, certificate_id: str, reason: str = "unspecified", *, wait: bool = True, timeout: float = 120
    ) -> None:
        """Revoke at the CA (RFC 5280 reason name the CA accepts, checked before anything is sent)."""
        operations.check_revocation_reason(reason, self.settings)
        row, _ = await asyncio.to_thread(self._baseline, certificate_id)
        if row.external:
            raise InvalidInput(
                f"{row.id} was imported: revoke it through the CA that issued it", field="certificate_id"
            )
        if row.state == State.REVOKED:
            return
        if row.state not in IN_SERVICE:
            raise InvalidTransition(f"{row.id} is {row.state}; only an ACTIVE certificate can be revoked")
        task_id = await asyncio.to_thread(
            self._request, lambda s: operations.request_revoke(s, row.id, reason=reason, actor="manager")
        )
        if not wait:
            return

        def done() -> bool | None:
            failure = self._task_failure(task_id)
            with self._session(write=False) as s:
                if certificates.get(s, row.id).state == State.REVOKED:
                    return True
            if failure is not None:
                raise failure
            return None

        await self._poll(done, timeout, f"{row.id} to be revoked")

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
        known = {r.name for r in settings.multi_region.regions}
        for r in regions or ():
            if r not in known:
                raise InvalidInput(f"unknown region {r!r}", field="regions")

        def prepare() -> tuple[list[str], str]:
            with self._session(write=False) as s:
                row = certificates.get(s, certificate_id)
                iss_id = row.pending_issuance_id or row.current_issuance_id
                if row.state in (State.REVOKED, State.EXPIRED, State.FAILED) or iss_id is None:
                    raise InvalidTransition(f"{row.id} is {row.state} and has nothing to deploy")
                wanted = list(regions or certificates.regions_for(row, settings))
                if not wanted:
                    raise InvalidInput(
                        f"{row.id} has no regions: enable multi_region or give the certificate targets",
                        field="regions",
                    )
                iss = s.get(Issuance, iss_id)
                assert iss is not None
                return wanted, iss.fingerprint

        wanted, fingerprint = await asyncio.to_thread(prepare)
        started = utcnow()
        task_id = await asyncio.to_thread(
            self._request,
            lambda s: operations.request_propagate(
                s,
                certificate_id,
                regions=list(regions or []),
                force=bool(force),
                actor="manager",
                settings=settings,
            )[0],
        )
        if strategy == "async":
            return PropagationResult(
                certificate_id, "pending", dict.fromkeys(wanted, "pending"), task_id=task_id
            )

        def snapshot() -> tuple[dict[str, str], dict[str, str]]:
            out: dict[str, str] = {}
            errors: dict[str, str] = {}
            with self._session(write=False) as s:
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
            failure = self._task_failure(task_id)
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
            return await self._poll(settled, timeout, f"{certificate_id} to reach {', '.join(wanted)}")
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
            settings=self._base,
        )

    async def get_certificate(self, certificate_id: str) -> Certificate:
        return await asyncio.to_thread(self._load, certificate_id)


# --- the store --------------------------------------------------------------------------------------


class CertificateStore:
    """Certificates issued elsewhere (the guide's store; its manual EV case), kept like any other:
    monitored, propagated, never renewed by certqueue.

    Every backend keeps the certificate in certqueue's database, its private key encrypted with
    AES-256-GCM under the key file (``encryption_key_path``). ``aws`` and ``azure`` additionally deploy
    it to the configured ``multi_region`` region of that provider (``aws_region`` matches a region
    with ``provider: aws`` whose ``region`` or ``name`` is that region; ``azure_key_vault_url`` one
    with ``provider: azure`` and that ``key_vault_url``): the propagate pool of that region does the
    import, as for every deployment. ``backend`` defaults to the ``storage.backend`` setting.
    ``storage_path`` is accepted for the guide's signature and not used (it is not a setting either):
    PEM files for web servers are the ``local`` *target*'s job (a region with ``provider: local``).
    """

    def __init__(
        self,
        backend: str | None = None,
        storage_path: str | None = None,
        encryption_key_path: str | None = None,
        aws_region: str | None = None,
        azure_key_vault_url: str | None = None,
        *,
        settings: Settings | None = None,
    ) -> None:
        if backend is None:
            backend = (settings or get_settings()).storage.backend
        if backend not in STORE_BACKENDS:
            raise InvalidInput(f"backend must be one of {', '.join(STORE_BACKENDS)}", field="backend")
        self.backend = backend
        self.manager = CertificateManager(
            settings, storage_backend=backend, encryption_key_path=encryption_key_path
        )
        if storage_path is not None:
            log.info("CertificateStore: storage_path is not used (certificates live in the database)")
        for key, value in (
            ("storage.aws_region", aws_region),
            ("storage.azure_key_vault_url", azure_key_vault_url),
        ):
            if value is not None:
                self.manager._overrides[key] = value
        self.manager._derived = None
        self.manager.settings  # noqa: B018  (validate now)

    def __repr__(self) -> str:
        return f"CertificateStore(backend={self.backend!r})"

    def backend_regions(self) -> list[str]:
        """The region(s) the backend deploys to (none for ``local``)."""
        s = self.manager.settings
        if self.backend == "local":
            return []
        if self.backend == "aws":
            want = s.storage.aws_region
            if not want:
                raise ConfigError("the aws backend needs storage.aws_region", key="storage.aws_region")
            for r in s.multi_region.regions:
                extra = r.model_extra or {}
                if r.target == "aws_acm" and (extra.get("region") or r.name) == want:
                    return [r.name]
            raise ConfigError(
                f"the aws backend needs a multi_region region with provider aws for {want}",
                key="multi_region.regions",
            )
        vault = (s.storage.azure_key_vault_url or "").rstrip("/")
        if not vault:
            raise ConfigError(
                "the azure backend needs storage.azure_key_vault_url", key="storage.azure_key_vault_url"
            )
        for r in s.multi_region.regions:
            extra = r.model_extra or {}
            if r.target == "azure_keyvault" and str(extra.get("key_vault_url") or "").rstrip("/") == vault:
                return [r.name]
        raise ConfigError(
            f"the azure backend needs a multi_region region with provider azure for {vault}",
            key="multi_region.regions",
        )

    async def store_certificate(
        self,
        certificate_id: str | None = None,
        certificate_pem: str = "",
        private_key_pem: str = "",
        domains: Sequence[str] | None = None,
        expires_at: dt.datetime | None = None,
        chain_pem: str | None = None,
        *,
        targets: Sequence[str] | None = None,
        wait: bool = True,
        timeout: float = 300,
    ) -> str:
        """Import a certificate and its key; returns the id certqueue gave it.

        certqueue assigns ids (``cert_`` and 20 random characters): pass no ``certificate_id`` and
        keep the returned one. The certificate is the source of truth: ``domains`` and
        ``expires_at``, when given, are checked against it (the same names; notAfter within a day,
        a naive datetime being UTC) and a mismatch is ``InvalidInput`` with nothing stored. With a
        backend region (or ``targets``) it is deployed there; ``wait`` waits until it is ACTIVE."""
        if certificate_id is not None:
            raise InvalidInput(
                "certqueue assigns certificate ids: leave certificate_id out and keep the returned id",
                field="certificate_id",
            )
        settings = self.manager.settings
        pems = crypto.split_pem_chain(certificate_pem) if certificate_pem else []
        if not pems:
            raise InvalidInput("certificate_pem holds no certificate", field="certificate_pem")
        leaf = validation.validate_pem(pems[0], "certificate")
        chain = chain_pem if chain_pem else ("".join(pems[1:]) or None)
        info = crypto.cert_info(leaf)
        if domains is not None:
            given = set(validation.normalize_domains(list(domains)))
            names = set(
                validation.normalize_domains(
                    [n for n in info.names if not _is_ip(n)] or [info.common_name or ""]
                )
            )
            if given != names:
                raise InvalidInput(
                    f"domains {sorted(given)} differ from the certificate's names {sorted(names)}",
                    field="domains",
                )
        if expires_at is not None:
            when = expires_at.replace(tzinfo=dt.UTC) if expires_at.tzinfo is None else expires_at
            if abs(when - info.not_after) > dt.timedelta(days=1):
                raise InvalidInput(
                    f"expires_at {when.isoformat()} differs from the certificate's notAfter "
                    f"{info.not_after.isoformat()}",
                    field="expires_at",
                )
        wanted_targets = list(targets or []) + [r for r in self.backend_regions() if r not in (targets or [])]

        def store() -> tuple[str, str | None]:
            with self.manager._session() as s:
                row, intent = operations.import_certificate(
                    s,
                    certificate_pem=leaf,
                    private_key_pem=private_key_pem,
                    chain_pem=chain,
                    targets=wanted_targets,
                    actor="store",
                    settings=settings,
                )
                return row.id, (f"intent-{intent.id}" if intent is not None else None)

        cid, task_id = await asyncio.to_thread(store)
        if task_id is None:
            return cid
        self.manager._nudge()
        if not wait:
            return cid

        def done() -> str | None:
            failure = self.manager._task_failure(task_id)
            with self.manager._session(write=False) as s:
                if certificates.get(s, cid).state == State.ACTIVE:
                    return cid
                failed = {
                    d.region: d.last_error or "failed"
                    for d in s.execute(
                        select(Deployment).where(
                            Deployment.certificate_id == cid, Deployment.status == "failed"
                        )
                    ).scalars()
                }
            if failed:
                raise OperationFailed(
                    f"{cid}: deployment failed: " + ", ".join(f"{r}: {e}" for r, e in sorted(failed.items())),
                    reason=next(iter(sorted(failed.values()))),
                    certificate_id=cid,
                )
            if failure is not None:
                raise failure
            return None

        return await self.manager._poll(done, timeout, f"{cid} to be deployed")

    async def get_certificate(self, certificate_id: str) -> Certificate:
        return await self.manager.get_certificate(certificate_id)

    async def list_certificates(self, filter: Mapping[str, Any] | None = None) -> list[Certificate]:
        """Certificates, oldest first. ``filter`` keys: ``state`` (a state or a list of them),
        ``domain`` (certificates naming it), ``expiring_within_days`` (in service, expiring within
        that many days, soonest first), ``limit`` (default 1000)."""
        f = dict(filter or {})
        unknown = sorted(set(f) - LIST_FILTER_KEYS)
        if unknown:
            raise InvalidInput(
                f"unknown filter key(s) {', '.join(unknown)}; use {', '.join(sorted(LIST_FILTER_KEYS))}",
                field="filter",
            )
        states_in = _states(f.get("state"))
        domain = f.get("domain")
        if domain is not None:
            domain = validation.normalize_domains([domain])[0]
        within = f.get("expiring_within_days")
        if within is not None and (
            isinstance(within, bool) or not isinstance(within, int | float) or within < 0
        ):
            raise InvalidInput("expiring_within_days must be a number of days >= 0", field="filter")
        limit = f.get("limit", 1000)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 100_000:
            raise InvalidInput("limit must be an integer from 1 to 100000", field="filter")
        if within is not None:
            return await _expiring(self.manager, float(within), states_in, domain, limit)

        def run() -> list[Certificate]:
            with self.manager._session(write=False) as s:
                rows = certificates.list_certificates(s, states_in=states_in, domain=domain, limit=limit)
                return [self.manager.view(s, r) for r in rows]

        return await asyncio.to_thread(run)

    async def delete_certificate(self, certificate_id: str, *, force: bool = False) -> None:
        """Remove a certificate with its issuances, orders and deployment records. Only REVOKED,
        EXPIRED or FAILED ones unless ``force`` (a live one is still served: revoke it, or force).
        Copies deployed to targets are removed from them (regions with ``remove_on_delete``, the
        default), durably, after this returns; the audit log keeps its events."""

        def run() -> None:
            self.manager._request(
                lambda s: operations.delete_certificate(s, certificate_id, force=force, actor="store")
            )

        await asyncio.to_thread(run)


def _is_ip(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _states(value: Any) -> list[str] | None:
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


async def _expiring(
    manager: CertificateManager,
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
        with manager._session(write=False) as s:
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
            return [manager.view(s, r) for r in rows]

    return await asyncio.to_thread(run)


# --- monitoring and automation ----------------------------------------------------------------------


class CertificateMonitoring:
    """Expiry tracking and the guide's health summary (the same as ``/health/certificates``)."""

    def __init__(self, cert_manager: CertificateManager | None = None) -> None:
        self.manager = cert_manager or CertificateManager()

    async def get_expiring_certificates(self, within_days: float = 30) -> list[Certificate]:
        if isinstance(within_days, bool) or not isinstance(within_days, int | float) or within_days < 0:
            raise InvalidInput("within_days must be a number of days >= 0", field="within_days")
        return await _expiring(self.manager, float(within_days))

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
            with self.manager._session() as s:
                lease = settings.automation.stuck_after_seconds
                ids = dispatch.claim_due(s, utcnow(), None, batch, lease=lease)
                intents.record_many(s, "renew", ids, actor="automation")
                return ids

        ids = await asyncio.to_thread(claim)
        if ids:
            self.manager._nudge()
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


__all__ = [
    "Certificate",
    "CertificateAutomation",
    "CertificateManager",
    "CertificateMetadata",
    "CertificateMonitoring",
    "CertificateStore",
    "OperationFailed",
    "OperationTimeout",
    "PropagationResult",
    "update_config",
    "with_overrides",
]
