"""The guide's values: ``Certificate`` (a row and its served issuance, as the guide shows it),
``PropagationResult``, ``CertificateMetadata``, and the two errors of waiting (``OperationFailed``,
``OperationTimeout``). No database or broker access, except the key loader a ``Certificate`` carries.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

from certqueue import validation
from certqueue.errors import CertqueueError, NotFound
from certqueue.models import Certificate as CertificateRow
from certqueue.models import State, utcnow

IN_SERVICE = (State.ACTIVE, State.RENEWING)
#: states whose work may wait for a budget or capacity
WORKING = (State.REQUESTED, State.ISSUING, State.RENEWING)


class OperationFailed(CertqueueError):
    """The pipeline finished the work badly; ``reason`` is its stable reason."""

    reason = "failed"

    def __init__(self, message: str, *, reason: str | None = None, certificate_id: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.certificate_id = certificate_id


class OperationTimeout(CertqueueError, TimeoutError):
    """Waiting ran out; the work was queued and goes on."""

    reason = "timeout"


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
        return validation.normalize_domains(v, allow_ip=True)

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
