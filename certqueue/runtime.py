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

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from certqueue import settings_keys
from certqueue.errors import ConfigError
from certqueue.models import Event, RuntimeSetting, utcnow

# the layer reader lives below certqueue.config and certqueue.db (no import cycle); these names
# stay importable from here
from certqueue.runtime_layer import (
    CONNECT_TIMEOUT_SECONDS as CONNECT_TIMEOUT_SECONDS,
)
from certqueue.runtime_layer import (
    MAX_KEY_LENGTH as MAX_KEY_LENGTH,
)
from certqueue.runtime_layer import (
    RUNTIME_KEYS as RUNTIME_KEYS,
)
from certqueue.runtime_layer import (
    UNREACHABLE_BACKOFF_SECONDS as UNREACHABLE_BACKOFF_SECONDS,
)
from certqueue.runtime_layer import (
    _scalar,
)
from certqueue.runtime_layer import (
    dispose as dispose,
)
from certqueue.runtime_layer import (
    load_runtime_overrides as load_runtime_overrides,
)
from certqueue.runtime_layer import (
    read_runtime_layer as read_runtime_layer,
)
from certqueue.runtime_layer import (
    sqlite_file as sqlite_file,
)
from certqueue.settings_keys import unflatten as unflatten

# --- the table ------------------------------------------------------------------------------------


def flatten(changes: Mapping[str, Any]) -> dict[str, Any]:
    """Nested or dotted changes -> ``{"section.key": value}``, with the guide's wrapper
    (``certificate_management``) and section alias (``lets_encrypt`` for ``acme``) accepted.
    Lists are values, not levels (``certqueue.settings_keys.dotted``)."""
    if not isinstance(changes, Mapping):
        raise ConfigError("runtime changes must be a mapping of settings keys")
    return settings_keys.dotted(changes)


def check_keys(flat: Mapping[str, Any]) -> None:
    """Refuse keys that may not change at runtime, and values that are not numbers or booleans
    (ConfigError naming the key)."""
    for key, value in flat.items():
        if len(key) > MAX_KEY_LENGTH:
            raise ConfigError("key too long", key=key[:64])
        if key not in RUNTIME_KEYS:
            if not _known(key):
                raise ConfigError("unknown key", key=key)
            if settings_keys.is_secret_key(key):
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
    key = settings_keys.canonical_key(key)
    if not key:
        raise ConfigError("a settings key is required")
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
