"""Settings for the guide's objects: per-object overrides (``with_overrides``), the per-call
``staging`` choice, and ``update_config`` (runtime overrides stored in the database, where every
process reads them; ``certqueue.runtime`` owns those rows).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from certqueue import runtime, settings_keys
from certqueue.config import LETS_ENCRYPT_PRODUCTION, LETS_ENCRYPT_STAGING, Settings, get_settings
from certqueue.errors import ConfigError


def with_overrides(settings: Settings, changes: Mapping[str, Any]) -> Settings:
    """``settings`` with dotted ``changes`` applied, validated (``ConfigError`` naming the key)."""
    if not changes:
        return settings
    merged = settings_keys.deep_merge(settings.model_dump(), settings_keys.unflatten(dict(changes)))
    try:
        return Settings(**merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise ConfigError(msg, key=key) from None


def directory_for(settings: Settings, staging: bool | None) -> str | None:
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
