"""Layered settings (pydantic-settings), with the source of every value kept.

Layers, low to high:

1. model defaults (the classes below),
2. ``settings/certqueue.yaml`` (committed; every key present and commented),
3. ``settings/local.yaml`` (gitignored),
4. runtime overrides stored in the database (``update_config``; see ``certqueue.runtime``),
5. environment ``CERTQUEUE_<SECTION>__<KEY>`` (double underscore between levels),
6. explicit overrides (CLI flags, constructor arguments).

YAML layers merge deeply: a local file that sets one nested key keeps its siblings. The guide's
``certificate_management:`` wrapper and its ``lets_encrypt`` section name are accepted (the section is
``acme`` here because any RFC 8555 CA works). The guide's single-underscore environment names
(``MAHAVISHNU_CERTIFICATE_LETS_ENCRYPT_STAGING``) cannot be parsed unambiguously
(``lets_encrypt_staging`` or ``lets.encrypt_staging``?), so certqueue uses ``__`` between levels, as
pydantic-settings does, and says so when it meets a single-underscore name.

An unknown key, a wrong type or an impossible value is a ``ConfigError`` naming the layer (file or
variable) and the key.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from certqueue import settings_keys
from certqueue.errors import ConfigError
from certqueue.logsafe import mask_url_password
from certqueue.settings_keys import (  # re-exported: the key grammar's home is certqueue.settings_keys
    ENV_PREFIX as ENV_PREFIX,
)
from certqueue.settings_keys import (
    ENV_RESERVED as ENV_RESERVED,
)
from certqueue.settings_keys import (
    ENV_RESERVED_PREFIXES as ENV_RESERVED_PREFIXES,
)

_log = logging.getLogger("certqueue.config")
_In = TypeVar("_In")
_Out = TypeVar("_Out")

LETS_ENCRYPT_PRODUCTION = "https://acme-v02.api.letsencrypt.org/directory"
LETS_ENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def __repr_args__(self) -> Any:
        # a repr in a log line or a traceback must not carry the password of a database or broker URL
        for name, value in super().__repr_args__():
            if isinstance(value, str):
                value = mask_url_password(value)
            elif isinstance(value, list):
                value = [mask_url_password(v) if isinstance(v, str) else v for v in value]
            yield name, value


class StorageSettings(Section):
    #: the default backend of the guide's ``CertificateStore`` (certqueue.manager)
    backend: Literal["local", "aws", "azure"] = "local"
    encryption_key_path: Path = Path("var/certqueue.key")
    #: every long-running process checks the key file this often (seconds), reloads it when it
    #: changed, and writes its heartbeat (certqueue.keyrotation)
    key_check_seconds: float = Field(10, gt=0, le=3600)
    #: a process whose heartbeat is older than this is gone and does not block `keys retire`
    process_stale_seconds: float = Field(120, gt=0)
    #: `keys retire` waits this long after the last process loaded the new key (an operation that
    #: began before the reload may still write a row under the old key)
    key_retire_grace_seconds: float = Field(60, ge=0)
    aws_region: str | None = None
    azure_key_vault_url: str | None = None


class AcmeSettings(Section):
    enabled: bool = True
    staging: bool = False
    email: str | None = None
    #: None means Let's Encrypt production, or staging when ``staging`` is true
    directory_url: str | None = None
    #: further CAs tried in order when the first fails for good (issue 7)
    fallback_directory_urls: list[str] = Field(default_factory=list)
    #: CAs a task payload may choose by name (`"ca": "<name>"`): name -> https directory URL. The
    #: broker never carries a URL (certqueue.payloads); this is the list of places it may send to
    authorities: dict[str, str] = Field(default_factory=dict)
    account_key_path: Path | None = None
    account_key_type: Literal["ec256", "ec384", "rsa2048", "rsa3072", "rsa4096"] = "ec256"
    eab_kid: str | None = None
    eab_hmac_key: SecretStr | None = None
    agree_tos: bool = True
    key_type: Literal["ec256", "ec384", "rsa2048", "rsa3072", "rsa4096"] = "ec256"
    profile: str | None = None
    #: profiles under which the CA issues for IP addresses (RFC 8738; Let's Encrypt: shortlived);
    #: "*" any profile, also none (Pebble, private CAs); [] never (certqueue.acme.identifiers)
    ip_identifier_profiles: list[str] = Field(default_factory=lambda: ["shortlived"])
    #: most names one certificate may carry per ACME profile, as "profile=count" (Let's Encrypt's
    #: published limits); checked before the order (certqueue.acme.profiles). A list, not a mapping,
    #: so that one layer replaces it whole; a profile not listed has no limit of its own.
    profile_max_names: list[str] = Field(
        default_factory=lambda: ["classic=100", "tlsserver=25", "shortlived=25"]
    )
    preferred_chain: str | None = None
    #: CA bundle for the ACME server's own TLS (a private CA, Pebble); None = system trust
    ca_bundle: Path | None = None
    request_timeout_seconds: float = Field(10.0, gt=0, le=300)
    #: Let's Encrypt accepts only these (RFC 5280 names); other CAs may accept more
    revocation_reasons: list[str] = Field(
        default_factory=lambda: ["unspecified", "keyCompromise", "superseded", "cessationOfOperation"]
    )

    @property
    def directory(self) -> str:
        if self.directory_url:
            return self.directory_url
        return LETS_ENCRYPT_STAGING if self.staging else LETS_ENCRYPT_PRODUCTION

    @field_validator("authorities")
    @classmethod
    def _https_authorities(cls, v: dict[str, str]) -> dict[str, str]:
        import re

        for name, url in v.items():
            if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", name):
                raise ValueError(f"CA name {name!r}: 1 to 64 of a-z, 0-9, _ and -")
            if not isinstance(url, str) or not url.startswith("https://") or len(url) > 512:
                raise ValueError(f"CA {name!r}: the directory URL must be https://")
        return v

    @field_validator("profile_max_names")
    @classmethod
    def _profile_limits(cls, v: list[str]) -> list[str]:
        for item in v:
            name, sep, count = item.partition("=")
            if not sep or not name.strip() or not count.strip().isdigit() or int(count) < 1:
                raise ValueError(f"{item!r} is not profile=count (a positive integer)")
        return v

    @property
    def profile_name_limits(self) -> dict[str, int]:
        """``profile_max_names`` as profile -> most names."""
        return {n.strip(): int(c) for n, _, c in (i.partition("=") for i in self.profile_max_names)}


class SolverSelector(BaseModel):
    """Which names a solver takes (cert-manager's selector): ``dns_names`` exactly, else the
    longest matching ``dns_zones`` suffix; a solver with neither takes every name no other does."""

    model_config = ConfigDict(extra="forbid")

    dns_names: list[str] = Field(default_factory=list)
    dns_zones: list[str] = Field(default_factory=list)

    @field_validator("dns_names", "dns_zones")
    @classmethod
    def _lower(cls, v: list[str]) -> list[str]:
        return [n.strip().rstrip(".").lower() for n in v]


class SolverSettings(BaseModel):
    """One named way to prove control of names (``challenges.solvers[]``; docs/solvers.md)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    type: Literal["http-01", "dns-01", "tls-alpn-01"] = "dns-01"
    #: the DNS provider plugin (dns-01 only): rfc2136, route53, cloudflare, azure or a third party's
    #: (entry point group ``certqueue.dns_providers``; docs/plugins.md)
    provider: str | None = None
    #: the provider's settings (its own keys: docs/dns-providers.md); only the dns pool reads them
    config: dict[str, Any] = Field(default_factory=dict)
    selector: SolverSelector = Field(default_factory=SolverSelector)

    @field_validator("provider")
    @classmethod
    def _registered_provider(cls, v: str | None) -> str | None:
        return None if v is None else _registered("certqueue.dns_providers", "DNS provider", v)

    @model_validator(mode="after")
    def _complete(self) -> SolverSettings:
        if self.type == "dns-01" and not self.provider:
            raise ValueError(f"solver {self.name}: a dns-01 solver needs provider")
        if self.type != "dns-01" and (self.provider or self.config):
            raise ValueError(f"solver {self.name}: provider and config are for dns-01 solvers")
        return self


class ChallengeSettings(Section):
    model_config = ConfigDict(extra="allow", validate_assignment=True)

    default_type: Literal["http-01", "dns-01", "tls-alpn-01"] = "http-01"
    http_port: int = Field(80, ge=1, le=65535)
    http_host: str = "0.0.0.0"
    #: where ``certqueue tlsalpn01`` listens (TLS-ALPN-01, RFC 8737; the CA connects to port 443)
    tls_alpn_port: int = Field(443, ge=1, le=65535)
    tls_alpn_host: str = "0.0.0.0"
    #: the DNS provider plugin of dns-01 names no solver takes (entry point group
    #: ``certqueue.dns_providers``); its settings are the section of that name below
    dns_provider: str | None = None
    #: recursive resolvers used for zone lookup ("ip" or "ip:port"); empty = system resolver
    dns_resolvers: list[str] = Field(default_factory=list)
    #: port used when querying authoritative nameservers directly
    nameserver_port: int = Field(53, ge=1, le=65535)
    #: require the value at the recursive resolvers too, not only at every authoritative server
    check_recursive: bool = False
    #: named solvers chosen per name by their selectors (certqueue.solvers); [] = the settings above
    solvers: list[SolverSettings] = Field(default_factory=list)
    #: per-provider settings sections: cloudflare, route53, azure, rfc2136 (extra keys)

    @field_validator("dns_provider")
    @classmethod
    def _registered_provider(cls, v: str | None) -> str | None:
        return v if not v else _registered("certqueue.dns_providers", "DNS provider", v)

    @model_validator(mode="after")
    def _solver_names(self) -> ChallengeSettings:
        names = [s.name for s in self.solvers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"solver names must be unique; repeated: {', '.join(dupes)}")
        return self

    def provider_settings(self, name: str) -> dict[str, Any]:
        extra = self.model_extra or {}
        value = extra.get(name) or {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"challenges.{name} must be a mapping", key=f"challenges.{name}")
        return dict(value)


class AutomationSettings(Section):
    auto_renew: bool = True
    renewal_threshold_days: float = Field(30, gt=0)
    check_interval_hours: float = Field(24, gt=0)
    retry_attempts: int = Field(3, ge=0)
    retry_delay_seconds: float = Field(300, ge=0)
    #: how far before the computed renewal time a certificate may renew (fraction of the window)
    renewal_jitter: float = Field(0.1, ge=0, lt=1)
    #: beat scans for due work this often (seconds); the guide's check_interval_hours bounds it above
    scan_interval_seconds: float = Field(60, gt=0)
    scan_batch_size: int = Field(500, ge=1, le=100_000)
    #: an ISSUING/RENEWING certificate with no progress for this long is re-enqueued
    stuck_after_seconds: float = Field(900, gt=0)
    #: polling countdowns while waiting on the CA (seconds): first, then doubling up to max
    poll_initial_seconds: float = Field(0.25, gt=0)
    poll_max_seconds: float = Field(30, gt=0)
    #: give up on an order that is still pending after this long
    order_timeout_seconds: float = Field(900, gt=0)
    #: the due-scan claims no more than would keep the acme queue under this many messages
    max_queue_depth: int = Field(2000, ge=1)
    #: open ACME orders per CA directory at most (a renewal storm waits its turn); 0 = no limit
    max_orders_in_flight_per_ca: int = Field(200, ge=0)
    #: beat's dispatch heartbeat (seconds): pending intents and due renewals are claimed at least
    #: this often, and at once after every finished certificate (a nudge)
    dispatch_interval_seconds: float = Field(5, gt=0)
    #: certificates per acme batch task (dispatch sends new orders in batches of this size)
    batch_size: int = Field(20, ge=1, le=500)
    #: certificates of one batch worked on at once (threads, each with its own ACME client)
    batch_concurrency: int = Field(8, ge=1, le=64)
    #: start and validate a batch's new HTTP-01 orders in shared transactions (about 0.49x of the
    #: bare acme library instead of 0.35x; docs/performance.md, "The phased batch"); false runs
    #: each certificate of a batch through the single-certificate steps
    batch_phases: bool = True
    #: how long a batch polls the CA for a validation inside the task before the certificate waits
    #: with a countdown instead (seconds)
    validation_window_seconds: float = Field(10, ge=0, le=60)
    #: how long one step may work on an order at the CA before another may take it over (seconds):
    #: no row lock is held while the CA answers; a worker that dies mid-step leaves a lease that
    #: runs out after this, so it bounds how long its certificates wait
    order_lease_seconds: float = Field(60, ge=5, le=900)
    #: the first of the quick retries inside a message after a transient error (a CA, DNS,
    #: PostgreSQL or Redis outage), doubling: 1, 2, 4, 8, 16 s by default (seconds)
    transient_retry_initial_seconds: float = Field(1.0, gt=0, le=60)
    #: after the quick retries, the work is parked in the database and resumed after this long,
    #: doubling per parking up to an hour (the reconciler runs at least every half of it);
    #: transient trouble never fails a certificate (seconds)
    park_initial_seconds: float = Field(60, gt=0, le=3600)


#: the guide's short names for built-in targets
TARGET_ALIASES = {"aws": "aws_acm", "azure": "azure_keyvault", "gcp": "gcp_certmanager"}


def _registered(group: str, what: str, name: str, aliases: Mapping[str, str] | None = None) -> str:
    """``name`` when a plugin of ``group`` is registered under it (or under what ``aliases`` maps it
    to); else a ValueError listing the known names. Reads entry-point metadata only: no plugin is
    imported while settings load."""
    from certqueue import plugins

    aliases = aliases or {}
    known = plugins.names(group)
    if aliases.get(name, name) not in known:
        shown = sorted({*known, *(a for a, t in aliases.items() if t in known)})
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(shown)}")
    return name


class RegionSettings(BaseModel):
    """One propagation target (the guide's ``multi_region.regions[]`` entry).

    ``provider`` picks the target plugin; other keys are that plugin's settings and are validated
    by it (unknown keys are refused there).
    """

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    #: a registered target plugin (entry point group ``certqueue.targets``; docs/plugins.md), or one
    #: of the guide's short names in ``TARGET_ALIASES``
    provider: str
    #: a certificate is ACTIVE only when every required region has it
    required: bool = True
    #: remove the deployed copy (``Target.remove``) when the certificate is revoked: a revoked
    #: certificate fails every client that checks revocation, so it should not be served
    remove_on_revoke: bool = True
    #: remove the deployed copy when the certificate is deleted from the inventory: nothing would
    #: renew it any more, so it would expire where it is served, unwatched
    remove_on_delete: bool = True

    @field_validator("provider")
    @classmethod
    def _registered_target(cls, v: str) -> str:
        return _registered("certqueue.targets", "target provider", v, TARGET_ALIASES)

    @property
    def target(self) -> str:
        return TARGET_ALIASES.get(self.provider, self.provider)

    def target_settings(self) -> dict[str, Any]:
        data = dict(self.model_extra or {})
        data["name"] = self.name
        return data


class MultiRegionSettings(Section):
    enabled: bool = False
    propagation_strategy: Literal["sync", "async"] = "sync"
    regions: list[RegionSettings] = Field(default_factory=list)
    #: drift: deployments of one region checked per run (the next run goes on from there)
    drift_batch_size: int = Field(500, ge=1, le=10_000)
    #: drift: a run stops asking the target after this long and goes on from there next time
    drift_time_budget_seconds: float = Field(120, gt=0, le=200)

    @model_validator(mode="after")
    def _unique_names(self) -> MultiRegionSettings:
        names = [r.name for r in self.regions]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"region names must be unique; repeated: {', '.join(dupes)}")
        return self


class MonitoringSettings(Section):
    #: false: ``certqueue metrics`` refuses to start and workers record no latencies
    enabled: bool = True
    #: workers send Celery task events (what Flower shows); false saves a Redis write per event,
    #: and Flower then shows no tasks
    task_events: bool = True
    #: the metrics listener's own port (not the API's, not the Pushgateway's 9091)
    prometheus_port: int = Field(9745, ge=1, le=65535)
    bind: str = "127.0.0.1"
    #: the latest an in-service certificate counts as expiring soon (/health/certificates, alerts)
    alert_threshold_days: float = Field(14, ge=0)
    #: expiring soon: less than this share of its lifetime left (cert-manager's renewBeforePercentage)
    alert_threshold_percentage: float = Field(15, ge=0, le=100)
    #: ... but never less than this many hours left (the absolute floor for short-lived certificates)
    alert_threshold_floor_hours: float = Field(12, ge=0)
    #: an ACTIVE certificate this long past renew_at and not renewing counts as overdue
    renewal_overdue_grace_minutes: float = Field(60, ge=0)
    #: add the first domain name as a label of per-certificate series (off: names stay private)
    domain_labels: bool = False
    #: also serve the guide's metric names (days, no prefix); else use the recording rules
    guide_names: bool = False
    #: OpenTelemetry tracing (API -> task -> ACME call); needs the ``tracing`` extra
    tracing: bool = False
    #: per-certificate series up to this many (worst first); beyond, aggregates only
    max_certificate_series: int = Field(10_000, ge=0)


class DatabaseSettings(Section):
    #: the embedded default: SQLite under var/
    url: str = "sqlite:///var/certqueue.db"
    echo: bool = False
    pool_size: int = Field(5, ge=1)
    #: PostgreSQL: a statement running longer is cancelled (0 = no limit); a task retries it
    statement_timeout_seconds: float = Field(120, ge=0)
    #: PostgreSQL: waiting longer for a row or table lock fails the statement (0 = wait forever)
    lock_timeout_seconds: float = Field(30, ge=0)
    #: PostgreSQL: giving up on a connection attempt (seconds)
    connect_timeout_seconds: int = Field(5, ge=1, le=300)

    @field_validator("url")
    @classmethod
    def _known_driver(cls, v: str) -> str:
        if not v.startswith(("sqlite", "postgresql", "postgres://")):
            raise ValueError("only sqlite:/// and postgresql+psycopg:// URLs are supported")
        if v.startswith("postgresql://") or v.startswith("postgres://"):
            v = "postgresql+psycopg://" + v.split("://", 1)[1]
        return v


class BrokerSettings(Section):
    #: empty: the embedded default (kombu filesystem transport under ``filesystem_path``)
    url: str = ""
    #: where the embedded default's filesystem broker keeps messages (and its SQLite results)
    filesystem_path: Path = Path("var/broker")
    #: empty: Redis when the broker is Redis, else SQLite under var/
    result_backend: str = ""
    #: seconds; must exceed the longest retry countdown and task time limit
    visibility_timeout: int = Field(3600, ge=60)
    acme_concurrency: int = Field(2, ge=1)
    dns_concurrency: int = Field(2, ge=1)
    propagate_concurrency: int = Field(2, ge=1)


class LoggingSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = Field(False, alias="json")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ApiSettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    #: larger request bodies are refused with 413 before routing (never read)
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    #: the same for POST /v1/certificates/import (certificate, key and chain PEM)
    max_import_bytes: int = Field(512 * 1024, ge=1024)
    #: requests in progress at once; beyond, 503 with Retry-After
    max_concurrency: int = Field(64, ge=1)


class RateLimitSettings(Section):
    """Fleet-wide ACME budgets (certqueue.acme.ratelimit), per CA (certqueue.lifecycle.ratelimit_policy).

    Let's Encrypt's production and staging directories get Let's Encrypt's documented limits (each
    its own); any other CA gets no client-side budget unless ``ca_rules`` names it (``*`` for every
    other CA). The counts below are the ``custom`` rules; a count of 0 turns that budget off.
    ``enabled: false`` turns every budget off (a CA's own ``rateLimited`` Retry-After is honoured
    regardless).
    """

    enabled: bool = True
    #: auto: Redis when broker.url is Redis, else the database
    backend: Literal["auto", "redis", "database"] = "auto"
    redis_prefix: str = Field("certqueue:ratelimit", min_length=1)
    #: "<directory URL or *>=<letsencrypt|letsencrypt-staging|custom|none>"; a list, not a mapping,
    #: so one layer replaces it whole
    ca_rules: list[str] = Field(default_factory=list)
    new_orders_per_account: int = Field(300, ge=0)
    new_orders_period_hours: float = Field(3, gt=0)
    certificates_per_registered_domain: int = Field(50, ge=0)
    certificates_per_registered_domain_period_days: float = Field(7, gt=0)
    duplicate_certificates: int = Field(5, ge=0)
    duplicate_certificates_period_days: float = Field(7, gt=0)
    failed_authorizations_per_identifier: int = Field(5, ge=0)
    failed_authorizations_period_hours: float = Field(1, gt=0)
    consecutive_failed_authorizations_per_identifier: int = Field(1152, ge=0)
    consecutive_failed_authorizations_period_days: float = Field(1152, gt=0)

    @field_validator("ca_rules")
    @classmethod
    def _ca_rules(cls, v: list[str]) -> list[str]:
        from certqueue.lifecycle.ratelimit_policy import parse_ca_rule

        for item in v:
            parse_ca_rule(item)  # ValueError names the item and the accepted rules
        return v


KeyTypeName = Literal["ec256", "ec384", "rsa2048", "rsa3072", "rsa4096"]


class IssuerSettings(BaseModel):
    """One named issuer (``issuers[]``; docs/issuers.md): an ACME CA with its own account and
    defaults. Unset keys take the ``acme:`` section's value. ``default`` names the ``acme:`` section
    itself and cannot be redefined."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    directory_url: str = Field(min_length=1, max_length=512)
    #: the account's contact at this CA
    email: str | None = None
    account_key_type: KeyTypeName | None = None
    eab_kid: str | None = None
    eab_hmac_key: SecretStr | None = None
    #: defaults for certificates of this issuer (a request may choose otherwise)
    profile: str | None = None
    key_type: KeyTypeName | None = None
    preferred_chain: str | None = None
    #: CA certificates to trust for this directory (default: ``acme.ca_bundle``, else the system's)
    ca_bundle: Path | None = None
    #: client-side rate limits: letsencrypt, letsencrypt-staging, custom (the rate_limits counts) or
    #: none; unset: rate_limits.ca_rules decide, as for any directory
    rate_limits: Literal["letsencrypt", "letsencrypt-staging", "custom", "none"] | None = None
    #: profiles under which this CA issues for IP addresses; unset: acme.ip_identifier_profiles
    ip_identifier_profiles: list[str] | None = None
    #: issuers tried in order when this one fails for good (CA fallback)
    fallback: list[str] = Field(default_factory=list)

    @field_validator("directory_url")
    @classmethod
    def _https(cls, v: str) -> str:
        if not v.startswith(("https://", "http://")):
            raise ValueError("directory_url must be an http(s) URL")
        return v

    @model_validator(mode="after")
    def _complete(self) -> IssuerSettings:
        if self.name == "default":
            raise ValueError("the issuer name 'default' is the acme: section; choose another name")
        if (self.eab_kid is None) != (self.eab_hmac_key is None):
            raise ValueError(f"issuer {self.name}: external account binding needs eab_kid and eab_hmac_key")
        if self.name in self.fallback:
            raise ValueError(f"issuer {self.name}: an issuer cannot fall back to itself")
        return self


class SubscriberSettings(BaseModel):
    """One receiver of lifecycle events (``events.subscribers[]``; docs/events.md).

    ``kind: webhook`` POSTs each event as JSON to ``url``, signed with ``secret`` (HMAC-SHA256 in
    the Standard Webhooks form: ``webhook-id``, ``webhook-timestamp``, ``webhook-signature``).
    ``kind: celery`` publishes each event as the task ``task`` on the queue ``queue`` of certqueue's
    broker, so a consuming service routes it to its own workers.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    kind: Literal["webhook", "celery"] = "webhook"
    #: event types wanted (empty: all): issued, renewed, deployed, failed, expiring, expired, revoked
    events: list[str] = Field(default_factory=list)
    url: str | None = None
    secret: SecretStr | None = None
    #: the secret read from this file instead (kept off settings files and the environment)
    secret_file: Path | None = None
    #: plain http to a non-loopback host; off by default (events carry names and serials)
    allow_http: bool = False
    #: CA certificates to trust for ``url`` (default: the system's)
    ca_bundle: Path | None = None
    task: str | None = Field(None, max_length=200, pattern=r"^[A-Za-z_][A-Za-z0-9_.:-]*$")
    queue: str | None = Field(None, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")

    @field_validator("events")
    @classmethod
    def _known_events(cls, v: list[str]) -> list[str]:
        from certqueue.lifecycle.events_out import EVENT_TYPES

        unknown = sorted(set(v) - set(EVENT_TYPES))
        if unknown:
            raise ValueError(f"unknown event types {unknown}; known: {', '.join(EVENT_TYPES)}")
        return v

    @model_validator(mode="after")
    def _complete(self) -> SubscriberSettings:
        if self.kind == "webhook":
            from urllib.parse import urlsplit

            if not self.url:
                raise ValueError(f"subscriber {self.name}: a webhook needs url")
            parts = urlsplit(self.url)
            loopback = parts.hostname in ("127.0.0.1", "::1", "localhost")
            if parts.scheme not in ("https", "http") or not parts.hostname:
                raise ValueError(f"subscriber {self.name}: url must be an http(s) URL")
            if parts.scheme == "http" and not (loopback or self.allow_http):
                raise ValueError(f"subscriber {self.name}: url must be https (or set allow_http)")
            if self.secret is None and self.secret_file is None:
                raise ValueError(f"subscriber {self.name}: a webhook needs secret or secret_file")
            if self.secret is not None and self.secret_file is not None:
                raise ValueError(f"subscriber {self.name}: set secret or secret_file, not both")
            if self.task or self.queue:
                raise ValueError(f"subscriber {self.name}: task and queue are for kind: celery")
        else:
            if not self.task or not self.queue:
                raise ValueError(f"subscriber {self.name}: kind celery needs task and queue")
            if self.url or self.secret or self.secret_file:
                raise ValueError(f"subscriber {self.name}: url and secret are for kind: webhook")
        return self

    def secret_bytes(self) -> bytes:
        """The signing key: a ``whsec_`` secret is base64 (Standard Webhooks), any other its UTF-8."""
        import base64
        import binascii

        if self.secret_file is not None:
            try:
                raw = self.secret_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"subscriber {self.name}: cannot read secret_file ({type(exc).__name__})",
                    key="events.subscribers",
                ) from exc
        else:
            raw = self.secret.get_secret_value() if self.secret else ""
        if not raw:
            raise ConfigError(f"subscriber {self.name}: the secret is empty", key="events.subscribers")
        if raw.startswith("whsec_"):
            try:
                return base64.b64decode(raw[len("whsec_") :], validate=True)
            except binascii.Error as exc:
                raise ConfigError(
                    f"subscriber {self.name}: a whsec_ secret must be base64", key="events.subscribers"
                ) from exc
        return raw.encode()


class EventsSettings(Section):
    """Lifecycle events out to other services (certqueue.outbox, certqueue.tasks.events)."""

    subscribers: list[SubscriberSettings] = Field(default_factory=list)
    #: beat sends due deliveries this often (seconds)
    deliver_interval_seconds: float = Field(5, gt=0)
    #: deliveries claimed per run of the delivery task
    batch_size: int = Field(100, ge=1, le=10_000)
    #: deliveries sent at once (threads)
    concurrency: int = Field(8, ge=1, le=64)
    #: one webhook request gives up after this long (seconds)
    timeout_seconds: float = Field(5, gt=0, le=60)
    #: a claimed delivery not finished within this long (a killed worker) is due again
    lease_seconds: float = Field(300, gt=0)
    #: attempts before a delivery becomes a dead letter
    max_attempts: int = Field(15, ge=1, le=1000)
    #: retry delays: first, doubling up to max (seconds)
    retry_initial_seconds: float = Field(10, gt=0)
    retry_max_seconds: float = Field(3600, gt=0)
    #: beat looks for certificates crossing their "expiring soon" threshold this often (seconds)
    expiring_check_seconds: float = Field(3600, gt=0)

    @model_validator(mode="after")
    def _unique_names(self) -> EventsSettings:
        names = [s.name for s in self.subscribers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"subscriber names must be unique; repeated: {', '.join(dupes)}")
        return self

    def subscriber(self, name: str) -> SubscriberSettings | None:
        return next((s for s in self.subscribers if s.name == name), None)


class Settings(BaseModel):
    """The merged settings. Build with ``load_settings()`` to get the layers and their sources:
    it merges every layer itself (to remember where each value came from, ``CERTQUEUE_*`` included)
    and validates the result here, so no other source may add values behind its back. (A plain
    model, not pydantic-settings' BaseSettings: the CLI would pay its import on every command.)"""

    model_config = ConfigDict(extra="forbid")

    storage: StorageSettings = Field(default_factory=lambda: StorageSettings())
    acme: AcmeSettings = Field(default_factory=lambda: AcmeSettings())
    challenges: ChallengeSettings = Field(default_factory=lambda: ChallengeSettings())
    automation: AutomationSettings = Field(default_factory=lambda: AutomationSettings())
    multi_region: MultiRegionSettings = Field(default_factory=lambda: MultiRegionSettings())
    monitoring: MonitoringSettings = Field(default_factory=lambda: MonitoringSettings())
    database: DatabaseSettings = Field(default_factory=lambda: DatabaseSettings())
    broker: BrokerSettings = Field(default_factory=lambda: BrokerSettings())
    logging: LoggingSettings = Field(default_factory=lambda: LoggingSettings())
    api: ApiSettings = Field(default_factory=lambda: ApiSettings())
    rate_limits: RateLimitSettings = Field(default_factory=lambda: RateLimitSettings())
    events: EventsSettings = Field(default_factory=lambda: EventsSettings())
    #: named issuers (certqueue.issuers); the acme: section is the issuer "default"
    issuers: list[IssuerSettings] = Field(default_factory=list)

    @model_validator(mode="after")
    def _issuer_names(self) -> Settings:
        names = [i.name for i in self.issuers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"issuer names must be unique; repeated: {', '.join(dupes)}")
        known = {"default", *names}
        for i in self.issuers:
            unknown = [f for f in i.fallback if f not in known]
            if unknown:
                raise ValueError(f"issuer {i.name}: unknown fallback issuer(s) {', '.join(unknown)}")
        return self

    def region(self, name: str) -> RegionSettings:
        for r in self.multi_region.regions:
            if r.name == name:
                return r
        raise ConfigError(f"no region named {name!r}", key="multi_region.regions")


# --- layering ---------------------------------------------------------------------------------------


@dataclass
class LoadedSettings:
    settings: Settings
    #: dotted key -> layer name ("default", "settings/certqueue.yaml", "env CERTQUEUE_X__Y", ...)
    sources: dict[str, str] = field(default_factory=dict)
    #: how to load these again (``load_settings`` keyword arguments); None: installed as they are
    #: (``set_settings``), never re-read behind the installer's back
    recipe: dict[str, Any] | None = None
    #: ``time.monotonic()`` when loaded (``get_settings`` re-reads a recipe after the runtime TTL)
    loaded_at: float = 0.0
    #: the layers these were built from (``load_settings(previous=...)``: unchanged layers keep the
    #: settings as they are instead of validating them again)
    fingerprint: str = ""
    #: ``runtime_ttl()`` when loaded: how long these stand before ``get_settings`` re-reads them
    ttl: float = 5.0


def settings_dir() -> Path:
    return Path(os.environ.get("CERTQUEUE_SETTINGS_DIR", "settings"))


def _unwrap(data: Any, source: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping", source=source)
    # the guide's wrapper and section name (certqueue.settings_keys.canonical)
    return _drop_guide_only_keys(_in_layer(settings_keys.canonical, data, source), source)


def _in_layer(step: Callable[[_In], _Out], data: _In, source: str) -> _Out:
    """``step(data)``, a grammar error naming the layer it came from."""
    try:
        result = step(data)
    except ConfigError as exc:
        where = f" (at {exc.key})" if exc.key else ""
        raise ConfigError(exc.message.removesuffix(where), source=source, key=exc.key) from None
    return result


def _drop_guide_only_keys(data: dict[str, Any], source: str) -> dict[str, Any]:
    """The guide's schema has two keys certqueue does not act on; a file in the guide's shape still
    loads as written, but they are not settings (issue 14: no setting that nothing reads).

    * ``enabled``: certqueue has no master switch (pause it by stopping beat and the workers).
      ``true`` is what certqueue does anyway and is dropped; anything else is an error, since
      silently issuing while the file says "off" would be worse than refusing to start.
    * ``storage.storage_path``: certificates and their encrypted keys live in the database; PEM
      files for web servers are the ``local`` target's job. Dropped with a warning.
    """
    if "enabled" in data:
        value = data.pop("enabled")
        if value is not True:
            raise ConfigError(
                f"enabled: {value!r}: certqueue has no master switch (stop beat and the workers to "
                "pause it); remove the key",
                source=source,
                key="enabled",
            )
    storage = data.get("storage")
    if isinstance(storage, dict) and "storage_path" in storage:
        data["storage"] = {k: v for k, v in storage.items() if k != "storage_path"}
        _log.warning(
            "%s: storage.storage_path is ignored: certificates live in the database; for PEM files "
            "on disk configure a multi_region region with provider: local (docs/targets.md)",
            source,
        )
    return data


def _leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted leaves of a nested mapping (``settings_keys.flatten``; a non-mapping is one leaf)."""
    if isinstance(data, dict) and data:
        return settings_keys.flatten(data, prefix)
    return {prefix: data}


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    import yaml  # only with a settings file to read (a command with none does not load the parser)

    try:
        return _unwrap(yaml.safe_load(text), str(path))
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {mask_url_password(str(exc))}", source=str(path)) from None


def _parse_env_value(raw: str) -> Any:
    s = raw.strip()
    if s[:1] in "[{":
        try:
            return json.loads(s)
        except json.JSONDecodeError:
            return raw
    return raw


def read_env(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """CERTQUEUE_<SECTION>__<KEY>[__<SUBKEY>] -> nested dict, and key -> variable name
    (the environment form of ``certqueue.settings_keys``)."""
    flat: dict[str, Any] = {}
    names: dict[str, str] = {}
    sections = set(Settings.model_fields)
    for var in sorted(environ):
        if not settings_keys.is_settings_var(var):
            continue
        source = f"environment variable {var}"
        key = _in_layer(settings_keys.key_from_env, var, source)
        if key.split(".", 1)[0] not in sections:
            hint = ""
            if settings_keys.ENV_SEPARATOR not in var:
                hint = " (use a double underscore between levels, e.g. CERTQUEUE_ACME__STAGING)"
            raise ConfigError(f"unknown setting{hint}", source=source)
        flat[key] = _parse_env_value(environ[var])
        names[key] = f"env {var}"
    try:
        # a JSON object is a value: its own keys are not split at dots
        data = settings_keys.unflatten(flat, split_values=False)
    except ConfigError as exc:
        clash = sorted(
            v for k, v in names.items() if exc.key and (k == exc.key or k.startswith(exc.key + "."))
        )
        raise ConfigError(
            "conflicting variables: one sets a value, another a key below it",
            source=", ".join(n.removeprefix("env ") for n in clash) or "environment",
        ) from None
    return data, names


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    *,
    directory: Path | None = None,
    environ: Mapping[str, str] | None = None,
    runtime: Mapping[str, Any] | None = None,
    runtime_from_database: bool = False,
    previous: LoadedSettings | None = None,
) -> LoadedSettings:
    """Merge every layer and validate. ``overrides`` may be nested or use dotted keys.

    ``previous``: settings loaded before with the same arguments; when no layer changed since, they
    are returned again (with a new ``loaded_at``) instead of being validated anew: the periodic
    re-read of ``get_settings`` costs a read of each layer, not a rebuild.

    The runtime layer is ``runtime`` when given; else, with ``runtime_from_database``, the overrides
    stored in the database that the other layers name (``certqueue.runtime.read_runtime_layer``:
    nothing when the database is missing, not migrated or unreachable)."""
    directory = directory if directory is not None else settings_dir()
    environ = os.environ if environ is None else environ
    files: list[tuple[str, dict[str, Any]]] = []
    for fname in ("certqueue.yaml", "local.yaml"):
        path = directory / fname
        files.append((str(path), read_yaml(path)))
    env_data, env_names = read_env(environ)
    override_data = _in_layer(settings_keys.normalize, dict(overrides), "override") if overrides else {}
    if runtime is None and runtime_from_database:
        runtime = _runtime_from_database([*files, ("env", env_data), ("override", override_data)])
    layers = list(files)
    if runtime:
        layers.append((RUNTIME_LAYER, _in_layer(settings_keys.normalize, dict(runtime), RUNTIME_LAYER)))
    layers.append(("env", env_data))
    if override_data:
        layers.append(("override", override_data))
    fingerprint = json.dumps(layers, sort_keys=True, default=repr)
    if previous is not None and previous.fingerprint == fingerprint:
        return LoadedSettings(
            settings=previous.settings,
            sources=previous.sources,
            loaded_at=time.monotonic(),
            fingerprint=fingerprint,
            ttl=runtime_ttl(),
        )

    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, data in layers:
        merged = settings_keys.deep_merge(merged, data)
        for key in _leaves(data):
            # re-insert so that insertion order follows the layers (highest last; see _error_source)
            sources.pop(key, None)
            # a JSON object in one variable sets several leaves: each names that variable
            sources[key] = _source_for(key, env_names) if name == "env" else name
    try:
        settings = Settings(**merged)
    except ValidationError as exc:
        raise _config_error(exc, sources) from None
    # by alias: the keys a user writes (logging.json), so each matches the layer that set it
    full = _leaves(settings.model_dump(mode="json", by_alias=True))
    resolved = {k: _source_for(k, sources) for k in full}
    return LoadedSettings(
        settings=settings,
        sources=resolved,
        loaded_at=time.monotonic(),
        fingerprint=fingerprint,
        ttl=runtime_ttl(),
    )


RUNTIME_LAYER = "runtime (database)"


def _runtime_from_database(layers: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The database's runtime overrides, found through the database URL the other layers give."""
    merged: dict[str, Any] = {}
    for _name, data in layers:
        merged = settings_keys.deep_merge(merged, data)
    raw = (merged.get("database") or {}).get("url") if isinstance(merged.get("database"), dict) else None
    try:
        url = DatabaseSettings(url=raw).url if raw else DatabaseSettings().url
    except ValidationError:
        return {}  # the full validation below reports the bad URL
    from certqueue.runtime_layer import read_runtime_layer

    return read_runtime_layer(url)


def _source_for(key: str, sources: dict[str, str]) -> str:
    probe = key
    while probe:
        if probe in sources:
            return sources[probe]
        probe = probe.rpartition(".")[0]
    return "default"


def _config_error(exc: ValidationError, sources: dict[str, str]) -> ConfigError:
    first = exc.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    return ConfigError(msg, source=_error_source(key, sources), key=key)


def _error_source(key: str, sources: dict[str, str]) -> str:
    """The layer to blame for an error at ``key``: the one that set it or a parent, else the highest
    layer that set something below it (an unknown section, a whole-list check such as unique region
    names)."""
    source = _source_for(key, sources)
    if source == "default":
        below = [s for k, s in sources.items() if k.startswith(key + ".")]
        if below:
            return below[-1]
    return source


def masked_dump(loaded: LoadedSettings) -> dict[str, dict[str, Any]]:
    """key -> {"value": ..., "source": ...} with secrets masked, URL passwords included (anywhere in a
    value: ``database.url``, ``broker.url``, a region's endpoint); for ``config show``."""
    out: dict[str, dict[str, Any]] = {}
    dumped = _leaves(loaded.settings.model_dump(mode="python", by_alias=True))
    for key, value in sorted(dumped.items()):
        if isinstance(value, SecretStr) or settings_keys.is_secret_key(key):
            shown: Any = settings_keys.SECRET_MASK if value else value
        elif isinstance(value, Path):
            shown = str(value)
        else:
            shown = value
        out[key] = {"value": _jsonable(shown), "source": loaded.sources.get(key, "default")}
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, SecretStr):
        return settings_keys.SECRET_MASK
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, str):
        return mask_url_password(v)
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {
            k: (settings_keys.SECRET_MASK if settings_keys.is_secret_key(k) and x else _jsonable(x))
            for k, x in v.items()
        }
    return v


_cached: LoadedSettings | None = None
_reload_lock = threading.Lock()
#: the default recipe: every layer, the runtime one from the database
_DEFAULT_RECIPE: dict[str, Any] = {}


def runtime_ttl() -> float:
    """Seconds between re-reads of the settings (so runtime overrides reach running processes)."""
    try:
        return max(float(os.environ.get("CERTQUEUE_RUNTIME_TTL_SECONDS", "5")), 0.0)
    except ValueError:
        return 5.0


def _load_recipe(recipe: dict[str, Any], previous: LoadedSettings | None = None) -> LoadedSettings:
    loaded = load_settings(**recipe, runtime_from_database=True, previous=previous)
    loaded.recipe = recipe
    return loaded


def configure(
    overrides: Mapping[str, Any] | None = None,
    *,
    directory: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> LoadedSettings:
    """Load every layer (the runtime one from the database) and install the result for this
    process; ``get_settings()`` re-reads them with the same arguments after ``runtime_ttl()``."""
    global _cached
    loaded = _load_recipe({"overrides": overrides, "directory": directory, "environ": environ})
    _cached = loaded
    return loaded


def get_settings(reload: bool = False) -> Settings:
    """The process-wide settings (loaded on first use; ``reload=True`` re-reads every layer).

    Settings loaded by ``configure()`` (or on first use) are re-read when older than
    ``runtime_ttl()`` seconds, so runtime overrides stored in the database reach every process; a
    re-read that fails keeps the settings in force. Settings installed with ``set_settings`` stay
    as they are until replaced."""
    global _cached
    cached = _cached
    if cached is None or reload:
        recipe = cached.recipe if cached is not None and cached.recipe is not None else _DEFAULT_RECIPE
        _cached = cached = _load_recipe(dict(recipe))
        return cached.settings
    if cached.recipe is not None and time.monotonic() - cached.loaded_at > cached.ttl:
        if _reload_lock.acquire(blocking=False):  # one thread re-reads; the others use what is there
            try:
                fresh = _load_recipe(cached.recipe, previous=cached)
                if _cached is cached:  # not replaced meanwhile (set_settings, configure)
                    _cached = fresh
                return fresh.settings
            except ConfigError as exc:
                cached.loaded_at = time.monotonic()
                _log.warning("settings re-read failed, keeping the current ones: %s", exc)
            finally:
                _reload_lock.release()
    return cached.settings


def set_settings(settings: Settings | None) -> None:
    """Install settings for this process (tests, CLI overrides); they are not re-read."""
    global _cached
    _cached = LoadedSettings(settings=settings, sources={}) if settings is not None else None
