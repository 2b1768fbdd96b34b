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

Only sections that make sense to change on a running fleet may be overridden (``RUNTIME_SECTIONS``);
connection settings, the key file, logging and secrets stay with files and the environment.
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
from certqueue.models import RuntimeSetting, utcnow

log = logging.getLogger("certqueue.runtime")

#: top-level sections (and the master switch) that may be changed at runtime
RUNTIME_SECTIONS = frozenset({"enabled", "acme", "challenges", "automation", "multi_region", "monitoring"})
#: keys inside those sections that may not: credentials, and where the ACME account key lives
FORBIDDEN_KEYS = frozenset({"acme.eab_hmac_key", "acme.eab_kid", "acme.account_key_path", "acme.ca_bundle"})
_SECRET_WORDS = ("secret", "password", "token", "hmac", "private_key", "access_key", "api_key")
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
    """Refuse keys that may not change at runtime (ConfigError naming the key)."""
    for key in flat:
        section = key.split(".", 1)[0]
        if len(key) > MAX_KEY_LENGTH:
            raise ConfigError("key too long", key=key[:64])
        if section not in RUNTIME_SECTIONS:
            raise ConfigError(
                f"cannot be changed at runtime (allowed sections: {', '.join(sorted(RUNTIME_SECTIONS))}); "
                "set it in settings/local.yaml or the environment and restart",
                key=key,
            )
        last = key.rsplit(".", 1)[-1].lower()
        if key in FORBIDDEN_KEYS or any(w in last for w in _SECRET_WORDS):
            raise ConfigError(
                "credentials and key locations are not stored in the database; use local.yaml or "
                "the environment",
                key=key,
            )


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


def load_runtime_overrides(session: Session) -> dict[str, Any]:
    """Every stored override, as a nested mapping (the shape of ``settings/*.yaml``)."""
    rows = session.execute(select(RuntimeSetting.key, RuntimeSetting.value)).tuples().all()
    return unflatten(dict(rows))


def list_overrides(session: Session) -> dict[str, Any]:
    """Every stored override, dotted key -> value."""
    rows = session.execute(select(RuntimeSetting.key, RuntimeSetting.value).order_by(RuntimeSetting.key))
    return dict(rows.tuples().all())


def set_overrides(session: Session, changes: Mapping[str, Any]) -> dict[str, Any]:
    """Store ``changes`` (nested or dotted) in the caller's transaction; returns the dotted keys
    written. Keys are checked here; whether the merged settings still validate is the caller's
    check (``certqueue.manager.update_config`` does both before anything is written).

    A key replaces any stored key below or above it (setting ``automation`` as a whole is not
    possible: it is a section; setting a list replaces the whole list)."""
    flat = flatten(changes)
    check_keys(flat)
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
    session.flush()
    return flat


def clear_override(key: str, *, session: Session | None = None) -> int:
    """Remove the override at ``key`` and any below it; returns how many rows went. With no
    ``session`` it runs in its own transaction."""
    if session is None:
        from certqueue.db import session_scope

        with session_scope() as s:
            return clear_override(key, session=s)
    if not isinstance(key, str) or not key:
        raise ConfigError("a settings key is required")
    key = key.removeprefix("certificate_management.")
    if key == "lets_encrypt" or key.startswith("lets_encrypt."):
        key = "acme" + key.removeprefix("lets_encrypt")
    res = session.execute(
        delete(RuntimeSetting).where(
            (RuntimeSetting.key == key) | RuntimeSetting.key.startswith(key + ".", autoescape=True)
        )
    )
    return int(getattr(res, "rowcount", 0) or 0)


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


def _sqlite_path(url: str) -> str | None:
    path = url.split(":///", 1)[1] if ":///" in url else ""
    return path.split("?", 1)[0] or None


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
                        connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS},
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
        path = _sqlite_path(database_url)
        if path is None or path == ":memory:" or not Path(path).exists():
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
