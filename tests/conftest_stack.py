"""The real stack for integration tests: Pebble + pebble-challtestsrv, PostgreSQL, Redis, and
certqueue's own processes (http01 responder, worker pools) as subprocesses. No eager mode."""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from sqlalchemy import func, select

from certqueue import certificates, settings_keys
from certqueue.celery_app import lazy_app
from certqueue.config import load_settings, set_settings
from certqueue.db import dispose_all, session_scope
from certqueue.keystore import generate_key_file
from certqueue.models import Certificate, Order
from devstack.pebble import ChallTestSrv, PebbleServer
from devstack.ports import free_port
from devstack.stack import Stack
from tests.conftest_redis import CLAIMABLE, REDIS_HOST, NoFreeRedisDatabase, RedisClaim, claim_redis_db

PG_PORT = int(os.environ.get("CERTQUEUE_TEST_PG_PORT", "5432"))
PG_ADMIN = os.environ.get("CERTQUEUE_TEST_PG", f"postgresql://postgres@127.0.0.1:{PG_PORT}/postgres")
#: Redis databases for pipelines come from the claim scheme of tests.conftest_redis (atomic, leased);
#: ``_redis_in_use`` lets a caller keep databases out of this process's choice (test_flower_browser)
_REDIS_DBS = list(CLAIMABLE)
_redis_in_use: set[int] = set()


def _take_redis_db() -> RedisClaim:
    """A Redis database no other live pipeline uses, in this process or another test run on the
    machine. Raises NoFreeRedisDatabase when all are claimed."""
    return claim_redis_db(exclude=_redis_in_use)


def create_pg_database() -> tuple[str, Callable[[], None]]:
    import psycopg

    name = f"cq_it_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        dispose_all()
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return f"postgresql+psycopg://postgres@127.0.0.1:{PG_PORT}/{name}", drop


def services_available() -> str | None:
    """None when PostgreSQL and Redis answer, else why not."""
    try:
        import psycopg

        psycopg.connect(PG_ADMIN, connect_timeout=3).close()
    except Exception as exc:
        return f"PostgreSQL unreachable: {exc}"
    try:
        redis_lib.Redis(host=REDIS_HOST, socket_timeout=3).ping()
    except Exception as exc:
        return f"Redis unreachable: {exc}"
    return None


@dataclass
class Pipeline:
    stack: Stack
    pebble: PebbleServer
    dns: ChallTestSrv
    env: dict[str, str]
    http_port: int
    redis_db: int | None
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def install_settings(self) -> None:
        install_stack_settings(self.env)

    def request(self, domains: list[str], **kw: Any) -> str:
        with session_scope() as s:
            req = certificates.CertificateRequest.build(domains=domains, **kw)
            cert, _ = certificates.create_certificate(s, req, actor="test")
            cid = cert.id
        self.send("certqueue.issue", {"v": 1, "certificate_id": cid})
        return cid

    def send(self, task: str, payload: Any, queue: str = "acme", **options: Any) -> str:
        res = lazy_app.get().send_task(task, args=[payload], queue=queue, **options)
        return str(res.id)

    def state(self, cid: str) -> str | None:
        with session_scope(write=False) as s:
            c = s.get(Certificate, cid)
            return c.state if c else None

    def wait_state(self, cid: str, want: set[str] | str, timeout: float = 60.0) -> str:
        want = {want} if isinstance(want, str) else want
        deadline = time.monotonic() + timeout
        st = None
        while time.monotonic() < deadline:
            st = self.state(cid)
            if st in want:
                return st
            time.sleep(0.1)
        raise AssertionError(
            f"{cid} is {st}, wanted {sorted(want)} within {timeout}s\n"
            f"--- logs ---\n{self.stack.all_logs()[-6000:]}"
        )

    def wait_for(self, check: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}\n--- logs ---\n{self.stack.all_logs()[-6000:]}")

    def orders(self, cid: str) -> list[Order]:
        with session_scope(write=False) as s:
            return list(
                s.execute(select(Order).where(Order.certificate_id == cid).order_by(Order.id)).scalars()
            )

    def count(self, model: Any, *where: Any) -> int:
        with session_scope(write=False) as s:
            return int(s.execute(select(func.count()).select_from(model).where(*where)).scalar_one())


#: a test CA's budgets: far above Let's Encrypt's, so the limiter runs without deferring
TEST_CA_BUDGETS = {
    "rate_limits.certificates_per_registered_domain": "1000000",
    "rate_limits.duplicate_certificates": "10000",
    "rate_limits.new_orders_per_account": "1000000",
}


def stack_env(
    tmp: Path,
    *,
    database_url: str | None = None,
    broker_url: str | None = None,
    state_dir: str = "var",
    acme: tuple[str, str] | None = None,
    email: str = "admin@example.test",
    http_port: int | None = None,
    regions: list[dict[str, Any]] | None = None,
    log_level: str = "DEBUG",
    settings: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The ``CERTQUEUE_*`` environment of a test stack rooted at ``tmp`` (the one place tests build
    it; issue 16): ``tmp/settings`` (made here), a new master key at ``tmp/master.key``, the database
    and broker (SQLite and the file broker under ``tmp/<state_dir>`` unless URLs are given), the CA
    ``acme = (directory URL, CA bundle)`` with the test CA's budgets, the HTTP-01 port, local-files
    or other ``regions``, and further ``settings`` as dotted keys (``"automation.batch_size": "5"``).
    """
    (tmp / "settings").mkdir(parents=True, exist_ok=True)
    key = tmp / "master.key"
    if not key.exists():
        generate_key_file(key)
    state = tmp / state_dir
    values: dict[str, str] = {
        "storage.encryption_key_path": str(key),
        "database.url": database_url or f"sqlite:///{state / 'certqueue.db'}",
        "logging.level": log_level,
    }
    if broker_url:
        values["broker.url"] = broker_url
    else:
        values["broker.filesystem_path"] = str(state / "broker")
    if acme is not None:
        values.update({"acme.directory_url": acme[0], "acme.ca_bundle": acme[1], "acme.email": email})
        values.update(TEST_CA_BUDGETS)
    if http_port is not None:
        values.update({"challenges.http_port": str(http_port), "challenges.http_host": "127.0.0.1"})
    if regions is not None:
        values.update({"multi_region.enabled": "true", "multi_region.regions": json.dumps(regions)})
    values.update(settings or {})
    env = {"CERTQUEUE_SETTINGS_DIR": str(tmp / "settings")}
    env.update({settings_keys.env_var(k): v for k, v in values.items()})
    return env


def install_stack_settings(env: Mapping[str, str]) -> None:
    """This test process uses the stack's settings (its own settings and engines, key stores and
    Celery app built afresh from them)."""
    set_settings(load_settings(environ=env, directory=Path(env["CERTQUEUE_SETTINGS_DIR"])).settings)
    dispose_all()
    certificates.forget_keystores()
    lazy_app.reset()


def build_pipeline(
    tmp: Path,
    *,
    backend: str,
    extra_env: dict[str, str] | None = None,
    pools: tuple[str, ...] = ("acme", "dns"),
    pebble_env: dict[str, str] | None = None,
    regions: list[dict[str, Any]] | None = None,
    dns_server: str | None = None,
    acme_front: Callable[[PebbleServer], tuple[str, str]] | None = None,
) -> Pipeline:
    """Start everything; the caller must call ``teardown_pipeline``."""
    cleanups: list[Callable[[], None]] = []
    dns = ChallTestSrv().start()
    cleanups.append(dns.stop)
    http_port = free_port()
    peb = PebbleServer(
        http_port=http_port, dns_server=dns_server or dns.dns_address, env=pebble_env or {}
    ).start()
    cleanups.append(peb.stop)
    directory_url, ca_bundle = acme_front(peb) if acme_front else (peb.directory_url, str(peb.ca_bundle))
    redis_db = None
    database_url = broker_url = None
    if backend == "postgres":
        database_url, drop = create_pg_database()
        cleanups.append(drop)
        try:
            claim = _take_redis_db()
            cleanups.append(claim.release)
            redis_db, broker_url = claim.db, claim.url
        except NoFreeRedisDatabase:
            # every database of the machine's Redis is in use by live pipelines: a private one
            from devstack.servers import PrivateRedis

            private = PrivateRedis().start()
            cleanups.append(private.stop)
            redis_db, broker_url = 0, private.url
        redis_lib.Redis.from_url(broker_url).flushdb()
    env = stack_env(
        tmp,
        database_url=database_url,
        broker_url=broker_url,
        acme=(directory_url, ca_bundle),
        http_port=http_port,
        regions=regions,
        settings={
            # the CA's refusals are final at once unless a test asks for automation.retry_attempts
            "automation.retry_attempts": "0",
            "automation.poll_initial_seconds": "0.05",
            "automation.poll_max_seconds": "2",
        },
    )
    env.update(extra_env or {})
    stack = Stack(workdir=tmp, env=env)
    cleanups.append(stack.stop_all)
    p = Pipeline(
        stack=stack, pebble=peb, dns=dns, env=env, http_port=http_port, redis_db=redis_db, cleanups=cleanups
    )
    try:
        stack.cli("db", "upgrade")
        p.install_settings()
        stack.start_http01(http_port)
        for pool in pools:
            stack.start_worker(pool)
    except BaseException:
        teardown_pipeline(p)
        raise
    return p


def teardown_pipeline(p: Pipeline) -> None:
    for fn in reversed(p.cleanups):
        try:
            fn()
        except Exception:
            pass
    set_settings(None)
    dispose_all()
    lazy_app.reset()


@pytest.fixture(scope="module")
def pg_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    why = services_available()
    if why:
        if os.environ.get("CERTQUEUE_REQUIRE_SERVICES"):
            pytest.fail(why)
        pytest.skip(why)
    p = build_pipeline(tmp_path_factory.mktemp("pipeline"), backend="postgres")
    yield p
    teardown_pipeline(p)


@pytest.fixture(scope="module")
def embedded_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    p = build_pipeline(tmp_path_factory.mktemp("embedded"), backend="sqlite", pools=("all",))
    yield p
    teardown_pipeline(p)
