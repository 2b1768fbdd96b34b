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
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from certqueue.errors import ConfigError

ENV_PREFIX = "CERTQUEUE_"
#: environment variables with this prefix that are not settings keys
ENV_RESERVED = {
    "CERTQUEUE_SETTINGS_DIR",
    "CERTQUEUE_HOME",
    "CERTQUEUE_FAILPOINTS",
    "CERTQUEUE_REQUIRE_POSTGRES",
}

LETS_ENCRYPT_PRODUCTION = "https://acme-v02.api.letsencrypt.org/directory"
LETS_ENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageSettings(Section):
    backend: Literal["local", "aws", "azure"] = "local"
    encryption_key_path: Path = Path("var/certqueue.key")
    storage_path: Path = Path("var/certificates")
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
    account_key_path: Path | None = None
    account_key_type: Literal["ec256", "ec384", "rsa2048", "rsa3072", "rsa4096"] = "ec256"
    eab_kid: str | None = None
    eab_hmac_key: SecretStr | None = None
    agree_tos: bool = True
    key_type: Literal["ec256", "ec384", "rsa2048", "rsa3072", "rsa4096"] = "ec256"
    profile: str | None = None
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


class ChallengeSettings(Section):
    model_config = ConfigDict(extra="allow", validate_assignment=True)

    default_type: Literal["http-01", "dns-01"] = "http-01"
    http_port: int = Field(80, ge=1, le=65535)
    http_host: str = "0.0.0.0"
    dns_provider: str | None = None
    #: recursive resolvers used for zone lookup ("ip" or "ip:port"); empty = system resolver
    dns_resolvers: list[str] = Field(default_factory=list)
    #: port used when querying authoritative nameservers directly
    nameserver_port: int = Field(53, ge=1, le=65535)
    #: require the value at the recursive resolvers too, not only at every authoritative server
    check_recursive: bool = False
    #: per-provider settings sections: cloudflare, route53, azure, rfc2136 (extra keys)

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


class RegionSettings(BaseModel):
    """One propagation target (the guide's ``multi_region.regions[]`` entry).

    ``provider`` picks the target plugin; other keys are that plugin's settings and are validated
    by it (unknown keys are refused there).
    """

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    provider: Literal["aws", "aws_acm", "azure", "azure_keyvault", "gcp", "gcp_certmanager", "local"]
    #: a certificate is ACTIVE only when every required region has it
    required: bool = True

    @property
    def target(self) -> str:
        return {"aws": "aws_acm", "azure": "azure_keyvault", "gcp": "gcp_certmanager"}.get(
            self.provider, self.provider
        )

    def target_settings(self) -> dict[str, Any]:
        data = dict(self.model_extra or {})
        data["name"] = self.name
        return data


class MultiRegionSettings(Section):
    enabled: bool = False
    propagation_strategy: Literal["sync", "async"] = "sync"
    regions: list[RegionSettings] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> MultiRegionSettings:
        names = [r.name for r in self.regions]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"region names must be unique; repeated: {', '.join(dupes)}")
        return self


class MonitoringSettings(Section):
    enabled: bool = True
    prometheus_port: int = Field(9091, ge=1, le=65535)
    bind: str = "127.0.0.1"
    alert_threshold_days: float = Field(14, ge=0)
    #: per-certificate series up to this many (worst first); beyond, aggregates only
    max_certificate_series: int = Field(10_000, ge=0)


class DatabaseSettings(Section):
    #: the embedded default: SQLite under var/
    url: str = "sqlite:///var/certqueue.db"
    echo: bool = False
    pool_size: int = Field(5, ge=1)

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
    port: int = Field(9091, ge=1, le=65535)


class Settings(BaseSettings):
    """The merged settings. Build with ``load_settings()`` to get the layers and their sources."""

    model_config = SettingsConfigDict(extra="forbid", env_prefix=ENV_PREFIX, env_nested_delimiter="__")

    enabled: bool = True
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

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):  # type: ignore[no-untyped-def, override]
        # load_settings() merges every layer itself (to remember where each value came from) and
        # passes the result as init arguments; no other source may add values behind its back.
        return (init_settings,)

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


def settings_dir() -> Path:
    return Path(os.environ.get("CERTQUEUE_SETTINGS_DIR", "settings"))


def _unwrap(data: Any, source: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping", source=source)
    if "certificate_management" in data:  # the guide's wrapper
        inner = data.pop("certificate_management") or {}
        if not isinstance(inner, dict):
            raise ConfigError("certificate_management must be a mapping", source=source)
        data = {**inner, **data}
    return _rename_aliases(data)


def _rename_aliases(data: dict[str, Any]) -> dict[str, Any]:
    if "lets_encrypt" in data:
        le = data.pop("lets_encrypt")
        data["acme"] = _deep_merge(le or {}, data.get("acme") or {})
    return data


def _deep_merge(low: dict[str, Any], high: dict[str, Any]) -> dict[str, Any]:
    out = dict(low)
    for k, v in high.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    try:
        return _unwrap(yaml.safe_load(text), str(path))
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", source=str(path)) from None


def _parse_env_value(raw: str) -> Any:
    s = raw.strip()
    if s[:1] in "[{":
        try:
            return json.loads(s)
        except json.JSONDecodeError:
            return raw
    return raw


def read_env(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """CERTQUEUE_<SECTION>__<KEY>[__<SUBKEY>] -> nested dict, and key -> variable name."""
    data: dict[str, Any] = {}
    names: dict[str, str] = {}
    sections = set(Settings.model_fields)
    for var, raw in environ.items():
        if not var.startswith(ENV_PREFIX) or var in ENV_RESERVED:
            continue
        path = [p.lower() for p in var[len(ENV_PREFIX) :].split("__")]
        if path[0] == "lets_encrypt":
            path[0] = "acme"
        if path[0] not in sections or any(not p for p in path):
            hint = ""
            if "__" not in var:
                hint = " (use a double underscore between levels, e.g. CERTQUEUE_ACME__STAGING)"
            raise ConfigError(f"unknown setting{hint}", source=f"environment variable {var}")
        node = data
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError("conflicting variables", source=f"environment variable {var}")
        node[path[-1]] = _parse_env_value(raw)
        names[".".join(path)] = f"env {var}"
    return data, names


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    *,
    directory: Path | None = None,
    environ: Mapping[str, str] | None = None,
    runtime: Mapping[str, Any] | None = None,
) -> LoadedSettings:
    """Merge every layer and validate. ``overrides`` may be nested or use dotted keys."""
    directory = directory if directory is not None else settings_dir()
    environ = os.environ if environ is None else environ
    layers: list[tuple[str, dict[str, Any]]] = []
    for fname in ("certqueue.yaml", "local.yaml"):
        path = directory / fname
        layers.append((str(path), read_yaml(path)))
    if runtime:
        layers.append(("runtime (database)", _rename_aliases(_undot(dict(runtime)))))
    env_data, env_names = read_env(environ)
    layers.append(("env", env_data))
    if overrides:
        layers.append(("override", _rename_aliases(_undot(dict(overrides)))))

    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, data in layers:
        merged = _deep_merge(merged, data)
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
    return LoadedSettings(settings=settings, sources=resolved)


def _undot(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        parts = k.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = _undot(v) if isinstance(v, dict) else v
    return out


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
    """key -> {"value": ..., "source": ...} with secrets masked; for ``config show``."""
    out: dict[str, dict[str, Any]] = {}
    dumped = _leaves(loaded.settings.model_dump(mode="python", by_alias=True))
    for key, value in sorted(dumped.items()):
        if isinstance(value, SecretStr) or _looks_secret(key):
            shown: Any = "**********" if value else value
        elif isinstance(value, Path):
            shown = str(value)
        else:
            shown = value
        out[key] = {"value": _jsonable(shown), "source": loaded.sources.get(key, "default")}
    return out


_SECRET_WORDS = ("secret", "password", "token", "hmac", "private_key", "access_key")


def _looks_secret(key: str) -> bool:
    last = key.rsplit(".", 1)[-1].lower()
    return any(w in last for w in _SECRET_WORDS)


def _jsonable(v: Any) -> Any:
    if isinstance(v, SecretStr):
        return "**********"
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: ("**********" if _looks_secret(k) and x else _jsonable(x)) for k, x in v.items()}
    return v


_cached: LoadedSettings | None = None


def get_settings(reload: bool = False) -> Settings:
    """The process-wide settings (loaded once; ``reload=True`` re-reads every layer)."""
    global _cached
    if _cached is None or reload:
        _cached = load_settings()
    return _cached.settings


def set_settings(settings: Settings | None) -> None:
    """Install settings for this process (tests, CLI overrides)."""
    global _cached
    _cached = LoadedSettings(settings=settings, sources={}) if settings is not None else None
