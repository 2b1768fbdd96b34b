"""The real stack for integration tests: Pebble + pebble-challtestsrv, PostgreSQL, Redis, and
certqueue's own processes (http01 responder, worker pools) as subprocesses. No eager mode."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from sqlalchemy import func, select

from certqueue import certificates
from certqueue.celery_app import lazy_app
from certqueue.config import load_settings, set_settings
from certqueue.db import dispose_all, session_scope
from certqueue.devstack.pebble import ChallTestSrv, PebbleServer
from certqueue.devstack.ports import free_port
from certqueue.devstack.stack import Stack
from certqueue.keystore import generate_key_file
from certqueue.models import Certificate, Order
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
        set_settings(load_settings(environ=self.env, directory=self.stack.workdir / "settings").settings)
        dispose_all()
        certificates.forget_keystores()
        lazy_app.reset()

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
    (tmp / "settings").mkdir(parents=True, exist_ok=True)
    key = tmp / "master.key"
    generate_key_file(key)
    dns = ChallTestSrv().start()
    cleanups.append(dns.stop)
    http_port = free_port()
    peb = PebbleServer(
        http_port=http_port, dns_server=dns_server or dns.dns_address, env=pebble_env or {}
    ).start()
    cleanups.append(peb.stop)
    directory_url, ca_bundle = acme_front(peb) if acme_front else (peb.directory_url, str(peb.ca_bundle))
    env = {
        "CERTQUEUE_SETTINGS_DIR": str(tmp / "settings"),
        "CERTQUEUE_STORAGE__ENCRYPTION_KEY_PATH": str(key),
        "CERTQUEUE_ACME__DIRECTORY_URL": directory_url,
        "CERTQUEUE_ACME__CA_BUNDLE": ca_bundle,
        "CERTQUEUE_ACME__EMAIL": "admin@example.test",
        "CERTQUEUE_CHALLENGES__HTTP_PORT": str(http_port),
        "CERTQUEUE_CHALLENGES__HTTP_HOST": "127.0.0.1",
        # a test CA: budgets far above Let's Encrypt's, so the limiter runs without deferring
        "CERTQUEUE_RATE_LIMITS__CERTIFICATES_PER_REGISTERED_DOMAIN": "1000000",
        "CERTQUEUE_RATE_LIMITS__DUPLICATE_CERTIFICATES": "10000",
        "CERTQUEUE_RATE_LIMITS__NEW_ORDERS_PER_ACCOUNT": "1000000",
        "CERTQUEUE_AUTOMATION__POLL_INITIAL_SECONDS": "0.05",
        "CERTQUEUE_AUTOMATION__POLL_MAX_SECONDS": "2",
        "CERTQUEUE_LOGGING__LEVEL": "DEBUG",
    }
    redis_db = None
    if backend == "postgres":
        url, drop = create_pg_database()
        cleanups.append(drop)
        try:
            claim = _take_redis_db()
            cleanups.append(claim.release)
            redis_db, broker_url = claim.db, claim.url
        except NoFreeRedisDatabase:
            # every database of the machine's Redis is in use by live pipelines: a private one
            from certqueue.devstack.servers import PrivateRedis

            private = PrivateRedis().start()
            cleanups.append(private.stop)
            redis_db, broker_url = 0, private.url
        redis_lib.Redis.from_url(broker_url).flushdb()
        env["CERTQUEUE_DATABASE__URL"] = url
        env["CERTQUEUE_BROKER__URL"] = broker_url
    else:
        env["CERTQUEUE_DATABASE__URL"] = f"sqlite:///{tmp / 'var' / 'certqueue.db'}"
        env["CERTQUEUE_BROKER__FILESYSTEM_PATH"] = str(tmp / "var" / "broker")
    if regions is not None:
        import json

        env["CERTQUEUE_MULTI_REGION__ENABLED"] = "true"
        env["CERTQUEUE_MULTI_REGION__REGIONS"] = json.dumps(regions)
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
