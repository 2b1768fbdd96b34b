"""The runtime-overrides layer as the settings loader reads it: the ``runtime_settings`` table,
read with a small engine of its own (see ``certqueue.runtime`` for the whole story).

It sits below ``certqueue.config`` and ``certqueue.db``: it imports neither (the loader calls it
while the settings are being built, and ``certqueue.db`` needs the settings), only the models and
the key grammar. ``certqueue.runtime`` (writing overrides, their checks and commands) is above all
three and re-exports what is here.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from certqueue.models import RuntimeSetting
from certqueue.settings_keys import unflatten

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
MAX_KEY_LENGTH = 256
CONNECT_TIMEOUT_SECONDS = 2
UNREACHABLE_BACKOFF_SECONDS = 30.0


def _scalar(value: Any) -> bool:
    return isinstance(value, bool | int | float)


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
