"""Fixture plugins (each module owns the servers of one area) and the one reset of process state.

Tests run in random order (pytest-randomly) and in parallel processes (pytest-xdist), so no test may
depend on what an earlier test left in this process. ``reset_process_caches()`` is the single list
of process-wide caches; the autouse fixture below runs it around every test and puts back the
settings that were installed when the test started (a module or session fixture may have installed
them on purpose). A cache that moves or is renamed must be moved here too: the import fails loudly
rather than the reset silently skipping it.
"""

import importlib.util
import os
from collections.abc import Iterator
from typing import NoReturn

import pytest

from certqueue import brokerstate, certificates, config, db, failpoints, metrics, nudge, runtime_layer
from certqueue.acme import accounts
from certqueue.acme import client as acme_client
from certqueue.celery_app import lazy_app
from certqueue.tasks import pipeline as pipeline_tasks

pytest_plugins = [
    name
    for name in (
        "tests.conftest_redis",
        "tests.conftest_db",
        "tests.conftest_pebble",
        "tests.conftest_dns",
        "tests.conftest_targets",
        "tests.conftest_stack",
    )
    if importlib.util.find_spec(name) is not None
]


#: where a missing tool, package or privilege is an error, not a skip: CI (which sets CI=true and
#: runs as root after ``scripts/services install`` and ``make install``), ``make test``, or by hand
REQUIRE_TOOLS_ENVS = ("CI", "CERTQUEUE_REQUIRE_SERVICES", "CERTQUEUE_REQUIRE_TOOLS")


def tools_required() -> bool:
    return any(os.environ.get(v, "").lower() not in ("", "0", "false", "no") for v in REQUIRE_TOOLS_ENVS)


def skip_unless_required(reason: str) -> NoReturn:
    """Skip on a developer machine that lacks something; fail where it must be there."""
    if tools_required():
        set_by = [v for v in REQUIRE_TOOLS_ENVS if os.environ.get(v)]
        pytest.fail(f"{reason} ({', '.join(set_by)} set: this must not be skipped)", pytrace=False)
    pytest.skip(f"{reason} (set CERTQUEUE_REQUIRE_TOOLS=1 to make this an error)")


def reset_process_caches() -> None:
    """Forget everything a process keeps between calls (all of it is rebuilt on next use): database
    engines, key stores, the rate limiter, the Celery app, the runtime-settings layer's engines and
    last good values, broker clients of the metrics, ACME directories and account keys, failpoints."""
    db.dispose_all()
    certificates.forget_keystores()
    pipeline_tasks._limiter_cache.clear()
    lazy_app.reset()
    runtime_layer.dispose()
    with brokerstate._redis_lock:
        for client in brokerstate._redis_clients.values():
            client.close()
        brokerstate._redis_clients.clear()
    acme_client.clear_directory_cache()
    accounts.forget_cache()
    failpoints._points = None
    failpoints._hits.clear()
    nudge.reset()
    with metrics._store_lock:
        metrics._pending.clear()  # observations of an earlier test are not flushed into this one


def pytest_make_parametrize_id(config: pytest.Config, val: object, argname: str) -> str | None:
    """Bytes parameters get ids from their length, not their content: parameters made with
    os.urandom at import would otherwise name tests differently in each xdist worker (which then
    refuses to run), and key material has no business in a test id anyway."""
    if isinstance(val, bytes | bytearray):
        return f"{argname}-{len(val)}bytes"
    return None


@pytest.fixture(autouse=True)
def _fresh_process_state() -> Iterator[None]:
    installed = config._cached  # what the module/session fixtures set up for this test
    reset_process_caches()
    yield
    reset_process_caches()
    config._cached = installed
