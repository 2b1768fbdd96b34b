"""Request and response bodies of the REST API (pydantic; they make the published OpenAPI schema).

Response models never carry key material: an issuance is described by its metadata (serial, dates,
fingerprint, issuer), never by its private key.

Every string a request carries has a length limit, list items included (a domain name 253, a
region name 64), so a body under the size limit still cannot make the API validate megabytes of one
field; the semantic checks come after, in ``certqueue.certificates``.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from certqueue.models import Certificate, Deployment, Issuance, State

KeyType = Literal["ec256", "ec384", "rsa2048", "rsa3072", "rsa4096"]
ChallengeType = Literal["http-01", "dns-01"]


DomainName = Annotated[str, StringConstraints(min_length=1, max_length=253)]
RegionName = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CertificateCreate(_Strict):
    """The guide's ``issue_certificate`` parameters. Semantics (domain syntax, known regions, dns-01
    needing a provider...) are checked by ``CertificateRequest.build``; errors name the field."""

    domains: list[DomainName] = Field(
        min_length=1, max_length=100, examples=[["example.com", "www.example.com"]]
    )
    email: str | None = Field(None, max_length=320)
    organization: str | None = Field(None, max_length=128)
    country: str | None = Field(None, max_length=8)
    state: str | None = Field(None, max_length=128, description="State or province (subject field)")
    locality: str | None = Field(None, max_length=128)
    key_size: int | None = Field(None, ge=0, le=16384, description="RSA key size: 2048, 3072 or 4096")
    key_type: KeyType | None = None
    challenge_type: ChallengeType | None = None
    dns_provider: str | None = Field(None, max_length=64)
    profile: str | None = Field(None, max_length=64)
    targets: list[RegionName] = Field(
        default_factory=list, max_length=64, description="Region names to deploy to"
    )
    auto_renew: bool | None = None


class RenewRequest(_Strict):
    force: bool = Field(False, description="Renew even if the certificate is not due")


class RevokeRequest(_Strict):
    reason: str = Field("unspecified", max_length=64, description="RFC 5280 reason name, e.g. keyCompromise")


class PropagateRequest(_Strict):
    regions: list[RegionName] | None = Field(
        None, max_length=64, description="Subset of regions (default: all)"
    )


class ImportRequest(_Strict):
    certificate_pem: str = Field(min_length=1, max_length=65536)
    private_key_pem: str = Field(min_length=1, max_length=65536)
    chain_pem: str | None = Field(None, max_length=262144)
    targets: list[RegionName] = Field(default_factory=list, max_length=64)


class IssuanceOut(BaseModel):
    id: int
    serial: str
    not_before: dt.datetime
    not_after: dt.datetime
    days_until_expiration: float
    fingerprint_sha256: str
    issuer: str
    key_type: str
    revoked_at: dt.datetime | None = None
    revocation_reason: str | None = None

    @classmethod
    def of(cls, iss: Issuance, now: dt.datetime) -> IssuanceOut:
        return cls(
            id=iss.id,
            serial=iss.serial,
            not_before=iss.not_before,
            not_after=iss.not_after,
            days_until_expiration=round((iss.not_after - now).total_seconds() / 86400.0, 4),
            fingerprint_sha256=iss.fingerprint,
            issuer=iss.issuer,
            key_type=iss.key_type,
            revoked_at=iss.revoked_at,
            revocation_reason=iss.revocation_reason,
        )


class DeploymentOut(BaseModel):
    region: str
    provider: str
    status: str
    remote_ref: str | None = None
    fingerprint_sha256: str | None = None
    issuance_id: int | None = None
    attempts: int
    last_error: str | None = None
    deployed_at: dt.datetime | None = None
    updated_at: dt.datetime

    @classmethod
    def of(cls, d: Deployment) -> DeploymentOut:
        return cls(
            region=d.region,
            provider=d.provider,
            status=d.status,
            remote_ref=d.remote_ref,
            fingerprint_sha256=d.fingerprint,
            issuance_id=d.issuance_id,
            attempts=d.attempts,
            last_error=d.last_error,
            deployed_at=d.deployed_at,
            updated_at=d.updated_at,
        )


class Subject(BaseModel):
    organization: str | None = None
    country: str | None = None
    state: str | None = None
    locality: str | None = None


class Waiting(BaseModel):
    reason: str = Field(description="e.g. 'rate limit: certificates per domain example.org'")
    until: dt.datetime | None = Field(None, description="When the work resumes")

    @classmethod
    def of(cls, c: Certificate) -> Waiting | None:
        if not c.waiting_reason or c.state not in (State.REQUESTED, State.ISSUING, State.RENEWING):
            return None
        return cls(reason=c.waiting_reason, until=c.next_attempt_at)


class AriWindow(BaseModel):
    """The CA's suggested renewal window (ACME Renewal Information, RFC 9773) at the last check."""

    start: dt.datetime
    end: dt.datetime
    explanation_url: str | None = None

    @classmethod
    def of(cls, c: Certificate) -> AriWindow | None:
        if c.ari_window_start is None or c.ari_window_end is None:
            return None
        return cls(start=c.ari_window_start, end=c.ari_window_end, explanation_url=c.ari_explanation_url)


class CertificateOut(BaseModel):
    id: str
    domains: list[str]
    state: State
    key_type: str
    key_size: int | None = None
    challenge_type: str
    dns_provider: str | None = None
    profile: str | None = None
    email: str | None = None
    targets: list[str]
    auto_renew: bool
    external: bool
    subject: Subject
    renew_at: dt.datetime | None = None
    ari_window: AriWindow | None = Field(
        None, description="The CA's suggested renewal window (RFC 9773), when the CA offers one"
    )
    attempts: int
    last_error: str | None = None
    waiting: Waiting | None = Field(None, description="Why the work waits and when it resumes, if it does")
    created_at: dt.datetime
    updated_at: dt.datetime
    current_issuance: IssuanceOut | None = None

    @classmethod
    def of(cls, c: Certificate, now: dt.datetime, **extra: Any) -> Any:
        return cls(
            id=c.id,
            domains=list(c.domains),
            state=State(c.state),
            key_type=c.key_type,
            key_size=c.key_size,
            challenge_type=c.challenge_type,
            dns_provider=c.dns_provider,
            profile=c.profile,
            email=c.email,
            targets=list(c.targets or []),
            auto_renew=bool(c.auto_renew),
            external=bool(c.external),
            subject=Subject(
                organization=c.organization, country=c.country, state=c.state_province, locality=c.locality
            ),
            renew_at=c.renew_at,
            ari_window=AriWindow.of(c),
            attempts=c.attempts or 0,
            last_error=c.last_error,
            waiting=Waiting.of(c),
            created_at=c.created_at,
            updated_at=c.updated_at,
            current_issuance=IssuanceOut.of(c.current_issuance, now) if c.current_issuance else None,
            **extra,
        )


class CertificateDetail(CertificateOut):
    deployments: list[DeploymentOut] = Field(default_factory=list)
    pending_issuance_id: int | None = None


class CertificateAccepted(BaseModel):
    """A write that was queued: the certificate as stored, and the Celery task that does the work."""

    certificate: CertificateOut
    created: bool
    job_id: str | None = Field(None, description="Celery task id; null when nothing was enqueued")


class JobQueued(BaseModel):
    certificate_id: str
    task: str
    job_id: str | None


class CertificatePage(BaseModel):
    items: list[CertificateOut]
    total: int
    limit: int
    offset: int
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next page (keyset)")


class JobStatus(BaseModel):
    job_id: str
    state: str = Field(description="Celery state: PENDING (or unknown), STARTED, RETRY, SUCCESS, FAILURE...")
    ready: bool
    successful: bool | None = None
    result: Any = None
    error: str | None = None


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    database: Literal["ok", "unreachable"]


class CertificateHealth(BaseModel):
    status: Literal["healthy", "degraded", "unhealthy"]
    total: int
    expiring_soon: int
    expired: int
    threshold_days: float


class BulkCreate(_Strict):
    """Many certificates in one request: each item is a ``POST /v1/certificates`` body."""

    certificates: list[dict[str, Any]] = Field(min_length=1, max_length=1000)


class BulkItem(BaseModel):
    index: int
    certificate: CertificateOut | None = None
    created: bool | None = None
    job_id: str | None = None
    error: dict[str, Any] | None = Field(None, description="{field, message}: nothing was written for it")


class BulkAccepted(BaseModel):
    created: int
    existing: int
    rejected: int
    items: list[BulkItem]
