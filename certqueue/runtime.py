"""Runtime setting overrides (the guide's ``update_config``), stored in the database so that every
worker, the API and the CLI see the same values. Owns the ``runtime_settings`` table.

Each row is one dotted key (``automation.renewal_threshold_days``) and its JSON value. The layer sits
between ``settings/local.yaml`` and the environment (see ``certqueue.config``): an operator's
environment variable or CLI flag still wins over a value changed at runtime.

How processes see a change: ``certqueue.config.configure()`` (used by every ``certqueue`` command,
hence by every worker, beat and the API) loads the settings with this layer read from the database,
and ``get_settings()`` re-reads all layers when they are older than ``CERTQUEUE_RUNTIME_TTL_SECONDS``
(5 s by default). So a change is seen everywhere within a few seconds, with no restart and no
message to deliver; tasks read ``get_settings()`` when they run, so the next task uses it.

Reading the layer must never make settings unloadable: it uses its own small engine (not
``certqueue.db``, which needs settings: that would recurse), never creates a SQLite file, treats a
missing table (a database not migrated yet) as "no overrides", and when the database cannot be
reached it keeps the last values it read and waits ``UNREACHABLE_BACKOFF_SECONDS`` before trying
again, so a database outage costs one short connect timeout, not one per ``get_settings()`` call.

Whoever can write this table must not be able to run a command on a worker, redirect a deployment,
swap a CA or read a credential (issue 13). So only an explicit allowlist of leaf keys may be stored
(``RUNTIME_KEYS``): thresholds, timers, budgets and the renewal switch, each a number or a boolean.
Target settings (``multi_region``), commands, paths, endpoints, credentials, CA URLs, connection
settings and the key file stay with files and the environment. The allowlist is enforced twice: a
write of any other key is a ``ConfigError`` naming it, with nothing written; and a row that was put
in the table some other way (SQL, an older version) is ignored when the layer is read, with a
warning naming the key. Every change is an ``events`` row (kind ``config``) naming its actor.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, delete, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from certqueue.errors import ConfigError
from certqueue.models import Event, RuntimeSetting, utcnow

log = logging.getLogger("certqueue.runtime")

#: the only keys that may change at runtime: thresholds, timers, budgets and the renewal switch.
#: Each is a number or a boolean; none names a place, a program, a server or a secret.
RUNTIME_KEYS = frozenset(
    {
        "automation.auto_renew",
        "automation.renewal_threshold_days",
        "automation.check_interval_hours",
        "automation.retry_attempts",
        "automation.retry_delay_seconds",
        "automation.renewal_jitter",
        "automation.scan_interval_seconds",
        "automation.scan_batch_size",
        "automation.stuck_after_seconds",
        "automation.poll_initial_seconds",
        "automation.poll_max_seconds",
        "automation.order_timeout_seconds",
        "automation.max_queue_depth",
        "automation.max_orders_in_flight_per_ca",
        "automation.dispatch_interval_seconds",
        "automation.batch_size",
        "automation.batch_concurrency",
        "automation.validation_window_seconds",
        "acme.request_timeout_seconds",
        "monitoring.alert_threshold_days",
        "monitoring.max_certificate_series",
        "rate_limits.new_orders_per_account",
        "rate_limits.new_orders_period_hours",
        "rate_limits.certificates_per_registered_domain",
        "rate_limits.certificates_per_registered_domain_period_days",
        "rate_limits.duplicate_certificates",
        "rate_limits.duplicate_certificates_period_days",
        "rate_limits.failed_authorizations_per_identifier",
        "rate_limits.failed_authorizations_period_hours",
    }
)
_SECRET_WORDS = ("secret", "password", "token", "hmac", "private_key", "access_key", "api_key", "eab")
MAX_KEY_LENGTH = 256
CONNECT_TIMEOUT_SECONDS = 2
UNREACHABLE_BACKOFF_SECONDS = 30.0


# --- the table ------------------------------------------------------------------------------------


def flatten(changes: Mapping[str, Any]) -> dict[str, Any]:
    """Nested or dotted changes -> ``{"section.key": value}``, with the guide's wrapper
    (``certificate_management``) and section alias (``lets_encrypt`` for ``acme``) accepted.
    Lists are values, not levels."""
    if not isinstance(changes, Mapping):
        raise ConfigError("runtime changes must be a mapping of settings keys")
    data = dict(changes)
    if "certificate_management" in data:
        inner = data.pop("certificate_management")
        if not isinstance(inner, Mapping):
            raise ConfigError("certificate_management must be a mapping", key="certificate_management")
        data = {**dict(inner), **data}
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                if not isinstance(k, str) or not k:
                    raise ConfigError("settings keys must be non-empty strings", key=prefix or None)
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = value

    walk("", data)
    renamed: dict[str, Any] = {}
    for key, value in out.items():
        first, _, rest = key.partition(".")
        if first == "lets_encrypt":
            key = f"acme.{rest}" if rest else "acme"
        renamed[key] = value
    return renamed


def check_keys(flat: Mapping[str, Any]) -> None:
    """Refuse keys that may not change at runtime, and values that are not numbers or booleans
    (ConfigError naming the key)."""
    for key, value in flat.items():
        if len(key) > MAX_KEY_LENGTH:
            raise ConfigError("key too long", key=key[:64])
        if key not in RUNTIME_KEYS:
            last = key.rsplit(".", 1)[-1].lower()
            if not _known(key):
                raise ConfigError("unknown key", key=key)
            if any(w in last for w in _SECRET_WORDS):
                why = "credentials are never stored in the database"
            else:
                why = (
                    "cannot be changed at runtime: only thresholds and timers can "
                    "(certqueue.runtime.RUNTIME_KEYS); target settings, commands, paths, endpoints, "
                    "credentials and CA URLs are never read from the database"
                )
            raise ConfigError(f"{why}; set it in settings/local.yaml or the environment and restart", key=key)
        if not _scalar(value):
            raise ConfigError("a runtime override is a number or true/false", key=key)


def _known(key: str) -> bool:
    """Whether ``key`` names a field of the settings (or lies inside one that takes free-form keys)."""
    from pydantic import BaseModel

    from certqueue.config import Settings

    model: Any = Settings
    for part in key.split("."):
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return True  # inside a mapping or list value: the settings validation decides
        info = model.model_fields.get(part)
        if info is None:
            return model.model_config.get("extra") == "allow"
        model = info.annotation
    return True


def _scalar(value: Any) -> bool:
    return isinstance(value, bool | int | float)


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in sorted(flat):
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = {}
                node[p] = nxt
            node = nxt
        node[parts[-1]] = flat[key]
    return out


_warned: set[str] = set()


def load_runtime_overrides(session: Session) -> dict[str, Any]:
    """Every stored override that may apply, as a nested mapping (the shape of ``settings/*.yaml``).

    A row outside ``RUNTIME_KEYS``, or whose value is not a number or boolean, is ignored: it can
    only have been written around ``set_overrides`` (by hand, or by an older version)."""
    rows = session.execute(select(RuntimeSetting.key, RuntimeSetting.value)).tuples().all()
    kept: dict[str, Any] = {}
    for key, value in rows:
        if key in RUNTIME_KEYS and _scalar(value):
            kept[key] = value
        elif key not in _warned:
            _warned.add(key)
            # the key only: the value is whatever someone wrote there
            log.warning(
                "runtime_settings row %r ignored: not a key that may change at runtime", key[:MAX_KEY_LENGTH]
            )
    return unflatten(kept)


def list_overrides(session: Session) -> dict[str, Any]:
    """Every stored override, dotted key -> value."""
    rows = session.execute(select(RuntimeSetting.key, RuntimeSetting.value).order_by(RuntimeSetting.key))
    return dict(rows.tuples().all())


def set_overrides(
    session: Session, changes: Mapping[str, Any], *, actor: str = "certqueue"
) -> dict[str, Any]:
    """Store ``changes`` (nested or dotted) in the caller's transaction, with one ``config`` event per
    key naming ``actor``; returns the dotted keys written. Keys are checked here; whether the merged
    settings still validate is the caller's check (``certqueue.manager.update_config`` does both
    before anything is written).

    A key replaces any stored key below or above it (setting ``automation`` as a whole is not
    possible: it is a section; setting a list replaces the whole list)."""
    flat = flatten(changes)
    check_keys(flat)
    previous: dict[str, Any] = dict(
        session.execute(select(RuntimeSetting.key, RuntimeSetting.value).where(RuntimeSetting.key.in_(flat)))
        .tuples()
        .all()
    )
    for key, value in flat.items():
        # a stored parent or child of this key would shadow it or be shadowed: drop them
        session.execute(
            delete(RuntimeSetting).where(
                RuntimeSetting.key.startswith(key + ".", autoescape=True) | (RuntimeSetting.key == key)
            )
        )
        parents = [".".join(key.split(".")[:i]) for i in range(1, key.count(".") + 1)]
        if parents:
            session.execute(delete(RuntimeSetting).where(RuntimeSetting.key.in_(parents)))
        session.add(RuntimeSetting(key=key, value=value, updated_at=utcnow()))
        session.add(
            Event(
                certificate_id=None,
                kind="config",
                reason="set",
                actor=actor[:128],
                data={"key": key, "value": value, "previous": previous.get(key)},
            )
        )
    session.flush()
    return flat


def clear_override(key: str, *, session: Session | None = None, actor: str = "certqueue") -> int:
    """Remove the override at ``key`` and any below it, with a ``config`` event naming ``actor``
    when anything went; returns how many rows went. With no ``session`` it runs in its own
    transaction."""
    if session is None:
        from certqueue.db import session_scope

        with session_scope() as s:
            return clear_override(key, session=s, actor=actor)
    if not isinstance(key, str) or not key:
        raise ConfigError("a settings key is required")
    key = key.removeprefix("certificate_management.")
    if key == "lets_encrypt" or key.startswith("lets_encrypt."):
        key = "acme" + key.removeprefix("lets_encrypt")
    match = (RuntimeSetting.key == key) | RuntimeSetting.key.startswith(key + ".", autoescape=True)
    gone = sorted(session.execute(select(RuntimeSetting.key).where(match)).scalars())
    if not gone:
        return 0
    session.execute(delete(RuntimeSetting).where(RuntimeSetting.key.in_(gone)))
    session.add(
        Event(certificate_id=None, kind="config", reason="unset", actor=actor[:128], data={"keys": gone})
    )
    return len(gone)


def refresh_settings() -> Any:
    """Re-read every settings layer now (this process), instead of waiting for the TTL."""
    from certqueue.config import get_settings

    return get_settings(reload=True)


# --- reading the layer while settings are being loaded ------------------------------------------------

_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_last_good: dict[str, dict[str, Any]] = {}
_retry_after: dict[str, float] = {}
_reading = threading.local()


def _reset_after_fork() -> None:
    global _engines
    for eng in _engines.values():
        eng.dispose(close=False)
    _engines = {}


os.register_at_fork(after_in_child=_reset_after_fork)


def sqlite_file(url: str) -> Path | None:
    """The database file a SQLite URL names; None for another database, an in-memory one or a
    ``file:`` URI (read by the runtime layer, certqueue.db and the CLI)."""
    if not url.startswith("sqlite") or ":///" not in url:
        return None
    path = url.split(":///", 1)[1].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" and not path.startswith("file:") else None


def _engine(url: str) -> Engine:
    eng = _engines.get(url)
    if eng is None:
        with _lock:
            eng = _engines.get(url)
            if eng is None:
                if url.startswith("sqlite"):
                    eng = create_engine(url, poolclass=NullPool, connect_args={"timeout": 5})
                else:
                    eng = create_engine(
                        url,
                        pool_size=1,
                        max_overflow=1,
                        pool_pre_ping=True,
                        connect_args={
                            "connect_timeout": CONNECT_TIMEOUT_SECONDS,
                            "options": "-c statement_timeout=5000 -c lock_timeout=5000",
                        },
                    )
                _engines[url] = eng
    return eng


def read_runtime_layer(database_url: str) -> dict[str, Any]:
    """The stored overrides for ``database_url``, for ``certqueue.config.load_settings``.

    Never raises and never recurses: a missing SQLite file, a database without the table, or an
    unreachable server give the last values read (or none)."""
    if getattr(_reading, "active", False):
        return {}
    if database_url.startswith("sqlite"):
        path = sqlite_file(database_url)
        if path is None or not path.exists():
            return {}
    elif time.monotonic() < _retry_after.get(database_url, 0.0):
        return dict(_last_good.get(database_url, {}))
    _reading.active = True
    try:
        with Session(_engine(database_url)) as session:
            data = load_runtime_overrides(session)
    except SQLAlchemyError as exc:
        missing_table = "runtime_settings" in str(exc) and (
            "no such table" in str(exc) or "does not exist" in str(exc)
        )
        if missing_table:
            log.debug("runtime settings: table not there yet (database not migrated)")
            return {}
        # the URL may hold a password: the class name only
        log.warning(
            "runtime settings: database unreachable (%s); keeping the last values", type(exc).__name__
        )
        _retry_after[database_url] = time.monotonic() + UNREACHABLE_BACKOFF_SECONDS
        return dict(_last_good.get(database_url, {}))
    finally:
        _reading.active = False
    _last_good[database_url] = data
    _retry_after.pop(database_url, None)
    return data


def dispose() -> None:
    """Close the layer reader's connections (tests dropping databases)."""
    with _lock:
        for eng in _engines.values():
            eng.dispose()
        _engines.clear()
        _last_good.clear()
        _retry_after.clear()
