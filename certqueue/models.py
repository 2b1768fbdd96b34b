"""The data model (SQLAlchemy 2, typed). PostgreSQL in production, SQLite embedded.

The database is the truth; the broker is not. Every piece of state another worker needs (the ACME
order, challenge handles, deployment references) lives here, never in process memory.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# the states are values of the lifecycle; imported here under their old names (models.State, LIVE_STATES)
from certqueue.lifecycle.states import LIVE_STATES as LIVE_STATES
from certqueue.lifecycle.states import State as State

# BIGINT primary keys on PostgreSQL, INTEGER on SQLite (where only INTEGER PRIMARY KEY autoincrements)
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on both backends (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use timezone-aware UTC datetimes")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dt.datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class Account(Base):
    __tablename__ = "accounts"
    __table_args__ = (UniqueConstraint("directory_url", "contact", name="uq_accounts_directory_contact"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    directory_url: Mapped[str] = mapped_column(String(512))
    contact: Mapped[str] = mapped_column(String(320), default="")
    key_enc: Mapped[bytes] = mapped_column(LargeBinary)
    key_type: Mapped[str] = mapped_column(String(16))
    account_url: Mapped[str | None] = mapped_column(String(512))
    eab_kid: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    #: valid | deactivated (RFC 8555 section 7.3.6: for good; the CA refuses it from then on)
    status: Mapped[str] = mapped_column(String(16), default="valid", server_default="valid")
    deactivated_at: Mapped[dt.datetime | None] = mapped_column()
    #: when the account key last rolled over (RFC 8555 section 7.3.5)
    key_changed_at: Mapped[dt.datetime | None] = mapped_column()


class Certificate(Base):
    __tablename__ = "certificates"
    __table_args__ = (
        # the due-renewal scan: WHERE state='ACTIVE' AND renew_at <= now  -> a range scan
        Index("ix_certificates_state_renew_at", "state", "renew_at"),
        Index("ix_certificates_state_updated_at", "state", "updated_at"),
        Index("ix_certificates_not_after", "not_after"),
        Index("ix_certificates_ari_next_check_at", "ari_next_check_at"),
        # two requests for the same names (same key type, same CA) give one live certificate
        Index(
            "uq_certificates_live_dedupe",
            "dedupe_key",
            unique=True,
            postgresql_where=text("state IN ('REQUESTED','ISSUING','ISSUED','ACTIVE','RENEWING')"),
            sqlite_where=text("state IN ('REQUESTED','ISSUING','ISSUED','ACTIVE','RENEWING')"),
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    domains: Mapped[list[Any]] = mapped_column(JSON)
    dedupe_key: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=State.REQUESTED)
    key_type: Mapped[str] = mapped_column(String(16), default="ec256")
    challenge_type: Mapped[str] = mapped_column(String(16), default="http-01")
    #: per-name challenge type overrides, e.g. {"*.example.com": "dns-01"}
    challenge_map: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    dns_provider: Mapped[str | None] = mapped_column(String(64))
    profile: Mapped[str | None] = mapped_column(String(64))
    preferred_chain: Mapped[str | None] = mapped_column(String(256))
    directory_url: Mapped[str] = mapped_column(String(512))
    #: the ordered list of ACME CAs this certificate may use; ``directory_url`` is the one in use
    directory_urls: Mapped[list[Any] | None] = mapped_column(JSON)
    account_id: Mapped[int | None] = mapped_column(ForeignKey("accounts.id"))
    email: Mapped[str | None] = mapped_column(String(320))
    #: region names to deploy to (empty: every configured region)
    targets: Mapped[list[Any]] = mapped_column(JSON, default=list)
    auto_renew: Mapped[bool] = mapped_column(Boolean, default=True)
    reuse_key: Mapped[bool] = mapped_column(Boolean, default=False)
    #: imported from elsewhere (the guide's manual EV case): monitored and propagated, never renewed
    external: Mapped[bool] = mapped_column(Boolean, default=False)
    renew_at: Mapped[dt.datetime | None] = mapped_column()
    #: the served issuance's not_after (denormalised: expiry queries and metrics stay index scans)
    not_after: Mapped[dt.datetime | None] = mapped_column()
    #: when to ask the CA's ACME Renewal Information again (None: the CA has no ARI)
    ari_next_check_at: Mapped[dt.datetime | None] = mapped_column()
    #: the CA's suggested renewal window (RFC 9773) at the last check, and its explanation link
    ari_window_start: Mapped[dt.datetime | None] = mapped_column()
    ari_window_end: Mapped[dt.datetime | None] = mapped_column()
    ari_explanation_url: Mapped[str | None] = mapped_column(String(512))
    current_issuance_id: Mapped[int | None] = mapped_column(ForeignKey("issuances.id", use_alter=True))
    #: the issuance being propagated (first issue or renewal); becomes current at ACTIVE
    pending_issuance_id: Mapped[int | None] = mapped_column(ForeignKey("issuances.id", use_alter=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column()
    last_error: Mapped[str | None] = mapped_column(String(512))
    #: why the work waits until ``next_attempt_at`` (a rate limit, capacity); None when it does not
    waiting_reason: Mapped[str | None] = mapped_column(String(256))
    #: set when work is handed to the queue; the reconciler re-enqueues work past its deadline
    work_deadline: Mapped[dt.datetime | None] = mapped_column()
    force_new_key: Mapped[bool] = mapped_column(Boolean, default=False)
    # the guide's CertificateMetadata subject fields
    organization: Mapped[str | None] = mapped_column(String(64))
    country: Mapped[str | None] = mapped_column(String(2))
    state_province: Mapped[str | None] = mapped_column(String(128))
    locality: Mapped[str | None] = mapped_column(String(128))
    key_size: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    current_issuance: Mapped[Issuance | None] = relationship(
        foreign_keys=[current_issuance_id], post_update=True, lazy="select"
    )


class Issuance(Base):
    __tablename__ = "issuances"
    __table_args__ = (
        Index("ix_issuances_certificate", "certificate_id"),
        Index("ix_issuances_serial", "serial"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    certificate_id: Mapped[str] = mapped_column(ForeignKey("certificates.id", ondelete="CASCADE"))
    serial: Mapped[str] = mapped_column(String(64))
    not_before: Mapped[dt.datetime] = mapped_column()
    not_after: Mapped[dt.datetime] = mapped_column()
    cert_pem: Mapped[str] = mapped_column(Text)
    chain_pem: Mapped[str] = mapped_column(Text, default="")
    key_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    key_type: Mapped[str] = mapped_column(String(16))
    fingerprint: Mapped[str] = mapped_column(String(64))
    issuer: Mapped[str] = mapped_column(String(512), default="")
    order_url: Mapped[str | None] = mapped_column(String(512))
    ari_cert_id: Mapped[str | None] = mapped_column(String(512))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column()
    revocation_reason: Mapped[str | None] = mapped_column(String(32))


class Order(Base):
    """The in-flight ACME order; what another worker needs to resume it."""

    __tablename__ = "orders"
    __table_args__ = (Index("ix_orders_certificate", "certificate_id"), Index("ix_orders_status", "status"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    certificate_id: Mapped[str] = mapped_column(ForeignKey("certificates.id", ondelete="CASCADE"))
    account_id: Mapped[int | None] = mapped_column(ForeignKey("accounts.id"))
    purpose: Mapped[str] = mapped_column(String(16), default="issue")  # issue | renew
    order_url: Mapped[str | None] = mapped_column(String(512), unique=True)
    order_json: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    csr_pem: Mapped[str] = mapped_column(Text)
    key_enc: Mapped[bytes] = mapped_column(LargeBinary)
    #: creating | pending | ready | processing | valid | invalid | abandoned
    status: Mapped[str] = mapped_column(String(16), default="creating")
    polls: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(String(512))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column()
    #: the step working on this order at the CA, until when (``certqueue.tasks.pipeline.OrderLease``):
    #: no row lock is held while the CA answers, and a worker that dies leaves a lease that expires
    lease_until: Mapped[dt.datetime | None] = mapped_column()
    lease_token: Mapped[str | None] = mapped_column(String(32))


class Challenge(Base):
    __tablename__ = "challenges"
    __table_args__ = (Index("ix_challenges_order", "order_id"), Index("ix_challenges_status", "status"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id", ondelete="CASCADE"))
    certificate_id: Mapped[str] = mapped_column(String(40))
    identifier: Mapped[str] = mapped_column(String(255))
    authz_url: Mapped[str] = mapped_column(String(512))
    type: Mapped[str] = mapped_column(String(16))
    url: Mapped[str] = mapped_column(String(512))
    token: Mapped[str | None] = mapped_column(String(256))
    dns_name: Mapped[str | None] = mapped_column(String(255))
    dns_value: Mapped[str | None] = mapped_column(String(128))
    provider: Mapped[str | None] = mapped_column(String(64))
    handle: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: pending | presented | visible | answered | valid | invalid | cleaned
    status: Mapped[str] = mapped_column(String(16), default="pending")
    error: Mapped[str | None] = mapped_column(String(512))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    cleaned_at: Mapped[dt.datetime | None] = mapped_column()


class Deployment(Base):
    __tablename__ = "deployments"
    __table_args__ = (UniqueConstraint("certificate_id", "region", name="uq_deployments_cert_region"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    certificate_id: Mapped[str] = mapped_column(ForeignKey("certificates.id", ondelete="CASCADE"))
    region: Mapped[str] = mapped_column(String(64))
    provider: Mapped[str] = mapped_column(String(32))
    remote_ref: Mapped[str | None] = mapped_column(String(1024))
    issuance_id: Mapped[int | None] = mapped_column(ForeignKey("issuances.id"))
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    #: pending | deployed | failed
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(String(512))
    deployed_at: Mapped[dt.datetime | None] = mapped_column()
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    #: the deploy working on this region's target, until when: the row is not locked while the
    #: target's API answers, and a deploy that dies leaves a lease that runs out
    lease_until: Mapped[dt.datetime | None] = mapped_column()
    lease_token: Mapped[str | None] = mapped_column(String(32))


class Event(Base):
    """The audit log, and the source of the Prometheus counters (they survive restarts)."""

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_certificate", "certificate_id"),
        Index("ix_events_kind_at", "kind", "at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    certificate_id: Mapped[str | None] = mapped_column(String(40))
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(128), default="certqueue")
    #: transition | renewal | validation_error | propagation | order | revocation | ...
    kind: Mapped[str] = mapped_column(String(32))
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str | None] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(512))
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Http01Token(Base):
    __tablename__ = "http01_tokens"
    __table_args__ = (Index("ix_http01_tokens_expires", "expires_at"),)

    token: Mapped[str] = mapped_column(String(256), primary_key=True)
    key_authorization: Mapped[str] = mapped_column(String(512))
    certificate_id: Mapped[str] = mapped_column(String(40))
    challenge_id: Mapped[int | None] = mapped_column(BigId)
    expires_at: Mapped[dt.datetime] = mapped_column()


class TlsAlpn01Token(Base):
    """A pending TLS-ALPN-01 challenge (RFC 8737): what ``certqueue tlsalpn01`` presents for the
    identifier a CA's TLS handshake names (SNI). Written and removed by the acme pool, read by
    every responder replica."""

    __tablename__ = "tls_alpn01_tokens"
    __table_args__ = (Index("ix_tls_alpn01_tokens_identifier", "identifier", "expires_at"),)

    token: Mapped[str] = mapped_column(String(256), primary_key=True)
    #: the DNS name (lowercase A-labels) or IP address (canonical text) being validated
    identifier: Mapped[str] = mapped_column(String(255))
    key_authorization: Mapped[str] = mapped_column(String(512))
    certificate_id: Mapped[str] = mapped_column(String(40))
    challenge_id: Mapped[int | None] = mapped_column(BigId)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column()


class RuntimeSetting(Base):
    """Runtime overrides (the guide's ``update_config``), seen by every worker."""

    __tablename__ = "runtime_settings"

    key: Mapped[str] = mapped_column(String(256), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    token_hash: Mapped[str] = mapped_column(String(128), unique=True)
    scopes: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column()
    last_used_at: Mapped[dt.datetime | None] = mapped_column()


class RateBudget(Base):
    """Shared rate-limit counters on the embedded default (Redis holds them when it is the broker)."""

    __tablename__ = "rate_budgets"

    key: Mapped[str] = mapped_column(String(512), primary_key=True)
    window_start: Mapped[dt.datetime] = mapped_column()
    used: Mapped[int] = mapped_column(Integer, default=0)
    blocked_until: Mapped[dt.datetime | None] = mapped_column()
    limit: Mapped[float] = mapped_column(Float, default=0)


class Intent(Base):
    """A request not yet taken over by the pipeline (issue, renew, revoke, propagate).

    Written in the same transaction as the change it asks for, so a request is durable when it
    commits, whatever the broker is doing. Dispatch claims pending intents up to capacity and sends
    the pipeline's tasks; the task that acts on an intent completes it in its own transaction. An
    intent dispatched but not completed by its deadline (a lost message, a dead worker) is pending
    again: nothing is lost with the broker.
    """

    __tablename__ = "intents"
    __table_args__ = (
        Index("ix_intents_status_not_before", "status", "not_before"),
        Index("ix_intents_certificate_status", "certificate_id", "status"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    #: issue | renew | revoke | propagate
    kind: Mapped[str] = mapped_column(String(16))
    certificate_id: Mapped[str] = mapped_column(String(40))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: pending | dispatched | done | failed
    status: Mapped[str] = mapped_column(String(16), default="pending")
    not_before: Mapped[dt.datetime] = mapped_column(default=utcnow)
    #: while dispatched: when it counts as lost and goes back to pending
    deadline: Mapped[dt.datetime | None] = mapped_column()
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    outcome: Mapped[str | None] = mapped_column(String(512))
    actor: Mapped[str] = mapped_column(String(128), default="certqueue")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column()


class DriftCursor(Base):
    """Where a region's drift check stands: deployments are checked in id order, a batch per run,
    from ``after_id`` on; past the last one the pass ends and the next starts from the beginning.
    Written only by the region's own drift task (``certqueue.tasks.drift``)."""

    __tablename__ = "drift_cursors"

    region: Mapped[str] = mapped_column(String(64), primary_key=True)
    after_id: Mapped[int] = mapped_column(BigInteger, default=0)
    pass_started_at: Mapped[dt.datetime | None] = mapped_column()
    #: complete passes over the region's deployments so far
    passes: Mapped[int] = mapped_column(Integer, default=0)
    #: deployments checked in the current pass
    checked: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ProcessHeartbeat(Base):
    """One row per live long-running process (worker, API): which keyring it encrypts with.

    ``certqueue keys retire`` refuses while a process seen recently still has an older active key
    (``certqueue.keyrotation``). Written by the process itself, deleted when it exits cleanly.
    """

    __tablename__ = "process_heartbeats"

    process: Mapped[str] = mapped_column(String(128), primary_key=True)
    role: Mapped[str] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(String(128))
    pid: Mapped[int] = mapped_column(Integer)
    keyring_id: Mapped[str] = mapped_column(String(32))
    active_kid: Mapped[str] = mapped_column(String(32))
    #: when this process loaded the keyring it reports
    loaded_at: Mapped[dt.datetime] = mapped_column()
    seen_at: Mapped[dt.datetime] = mapped_column()


class EventDelivery(Base):
    """One lifecycle event for one subscriber (the outbox of ``certqueue.outbox``).

    Written in the transaction that records the event, so an event is never lost and never
    announced for a change that rolled back. The delivery task (``certqueue.tasks.events``) claims
    due rows by pushing ``next_attempt_at`` past a lease, sends outside any transaction, then
    records the outcome: ``delivered``, back to ``pending`` with a later ``next_attempt_at``, or
    ``dead`` (the dead-letter record: kept with its last error until redelivered by hand).
    """

    __tablename__ = "event_deliveries"
    __table_args__ = (
        Index("ix_event_deliveries_status_next", "status", "next_attempt_at"),
        Index("ix_event_deliveries_certificate", "certificate_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    event_id: Mapped[int | None] = mapped_column(ForeignKey("events.id"))
    subscriber: Mapped[str] = mapped_column(String(64))
    #: issued | renewed | deployed | failed | expiring | expired | revoked
    event_type: Mapped[str] = mapped_column(String(32))
    certificate_id: Mapped[str | None] = mapped_column(String(40))
    #: the same on every attempt: a receiver drops a second copy by it
    idempotency_key: Mapped[str] = mapped_column(String(64), unique=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    occurred_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    #: pending | delivered | dead
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    #: the receiver's last HTTP status (None: no answer, or a Celery subscriber)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(512))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[dt.datetime | None] = mapped_column()

    event: Mapped[Event | None] = relationship(lazy="select")


class AccountKeyRollover(Base):
    """One account key rollover (``certqueue.acme.accounts.rollover``): the audit record, and the new
    key kept here, encrypted, from before the CA is asked until it is the account's key. A rollover
    interrupted after the CA switched (a crash, a lost answer) is finished by running it again."""

    __tablename__ = "account_key_rollovers"
    __table_args__ = (Index("ix_account_key_rollovers_account", "account_id", "status"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    #: the new key while pending; None once it moved into ``accounts.key_enc`` (or was abandoned)
    key_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    key_type: Mapped[str] = mapped_column(String(16))
    #: RFC 7638 thumbprints: which keys, without the keys
    old_thumbprint: Mapped[str] = mapped_column(String(64))
    new_thumbprint: Mapped[str] = mapped_column(String(64))
    #: pending | done | failed
    status: Mapped[str] = mapped_column(String(16), default="pending")
    error: Mapped[str | None] = mapped_column(String(512))
    actor: Mapped[str] = mapped_column(String(128), default="certqueue")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column()
