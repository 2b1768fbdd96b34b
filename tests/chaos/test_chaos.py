"""Chaos: the real stack (Pebble, BIND9, a private PostgreSQL and Redis, real worker processes and
beat) driving a batch of certificates while things die, then checking that nothing was lost.

Each case ends with the same audit (``audit``):
  * every certificate ACTIVE (or FAILED with a stable reason, where the case says so);
  * at most one ACME order per certificate and purpose (no order opened twice for one issuance or
    renewal);
  * no HTTP-01 token, no challenge row left uncleaned, no TXT value left in the DNS zone;
  * every stored private key decrypts and matches its certificate; every ACTIVE certificate is
    deployed to the region with its current fingerprint.

The number of certificates per case is ``CERTQUEUE_CHAOS_CERTS`` (default 60; ``make test`` and CI
run 200), a quarter of them wildcards through DNS-01.
"""

from __future__ import annotations

import ast
import collections
import json
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rdatatype
import pytest
from sqlalchemy import func, select, update

from certqueue import certificates, crypto
from certqueue.celery_app import lazy_app
from certqueue.config import set_settings
from certqueue.db import dispose_all, session_scope
from certqueue.models import Certificate, Challenge, Deployment, Event, Http01Token, Issuance, Order, utcnow
from devstack.bind import BindServer
from devstack.pebble import PebbleServer
from devstack.ports import free_port
from devstack.servers import PrivatePostgres, PrivateRedis
from devstack.stack import Stack
from tests.conftest_stack import install_stack_settings, stack_env
from tests.fakes.acme_counting_proxy import CountingProxy

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(900)]

N = int(os.environ.get("CERTQUEUE_CHAOS_CERTS", "60"))
BAD_NAMES = ("bad1", "bad2", "bad3")


@dataclass
class Chaos:
    stack: Stack
    pebble: PebbleServer
    bind: BindServer
    pg: PrivatePostgres
    redis: PrivateRedis
    env: dict[str, str]
    edge: Path
    #: the ACME requests counted at the CA's door, when the case puts the counting proxy there
    proxy: CountingProxy | None = None
    ids: list[str] = field(default_factory=list)
    expect_failed: set[str] = field(default_factory=set)
    #: certificates whose ``certqueue.issue`` could not be published (the broker was down): they are
    #: durable in the database, and only the reconciler can start them
    unpublished: list[str] = field(default_factory=list)
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def request_batch(self, n: int, prefix: str, bad: tuple[str, ...] = ()) -> None:
        for i in range(n):
            if i % 4 == 3:
                kw: dict[str, Any] = {
                    "domains": [f"*.{prefix}{i}.example.test", f"{prefix}{i}.example.test"],
                    "challenge_type": "dns-01",
                    "dns_provider": "rfc2136",
                }
            else:
                kw = {"domains": [f"{prefix}{i}.example.test", f"www.{prefix}{i}.example.test"]}
            self._request(kw)
        for name in bad:
            cid = self._request({"domains": [f"{name}.example.test"]})
            self.expect_failed.add(cid)

    def _request(self, kw: dict[str, Any]) -> str:
        for attempt in range(60):
            try:
                with session_scope() as s:
                    cert, _ = certificates.create_certificate(s, certificates.CertificateRequest.build(**kw))
                    cid = cert.id
                break
            except Exception:
                if attempt == 59:
                    raise
                dispose_all()
                time.sleep(0.5)
        self.ids.append(cid)
        try:
            lazy_app.get().send_task("certqueue.issue", args=[{"v": 1, "certificate_id": cid}], queue="acme")
        except Exception:
            self.unpublished.append(cid)  # publishing is a nudge; the reconciler relays (counted below)
        return cid

    def states(self) -> dict[str, str]:
        try:
            with session_scope(write=False) as s:
                rows = s.execute(
                    select(Certificate.id, Certificate.state).where(Certificate.id.in_(self.ids))
                )
                return dict(rows.tuples().all())
        except Exception:
            dispose_all()
            return {}

    def settled(self) -> bool:
        st = self.states()
        if len(st) != len(self.ids):
            return False
        return all(st[i] == ("FAILED" if i in self.expect_failed else "ACTIVE") for i in self.ids)

    def wait_settled(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.settled():
                return
            time.sleep(0.5)
        st = self.states()
        bad = {
            i: st.get(i) for i in self.ids if st.get(i) != ("FAILED" if i in self.expect_failed else "ACTIVE")
        }
        raise AssertionError(
            f"{len(bad)} certificates did not settle: {dict(list(bad.items())[:10])}"
            f" (all states: {dict(collections.Counter(st.get(i) for i in self.ids))})\n"
            f"{self.stack.log_tails()}"
        )


def _txt_names(bind: BindServer, names: set[str]) -> dict[str, list[str]]:
    out = {}
    for name in names:
        q = dns.message.make_query(name, dns.rdatatype.TXT)
        r = dns.query.udp(q, "127.0.0.1", port=bind.port, timeout=2)
        values = [b"".join(rd.strings).decode() for rrset in r.answer for rd in rrset]
        if values:
            out[name] = values
    return out


def audit(c: Chaos, *, purposes: tuple[str, ...] = ("issue",)) -> dict[str, int]:
    """The invariants every case must keep; returns counts for the report."""
    dispose_all()
    with session_scope(write=False) as s:
        certs = {x.id: x for x in s.execute(select(Certificate).where(Certificate.id.in_(c.ids))).scalars()}
        assert len(certs) == len(c.ids)
        for cid, cert in certs.items():
            if cid in c.expect_failed:
                assert cert.state == "FAILED" and cert.last_error and cert.last_error.startswith("acme:"), cid
            else:
                assert cert.state == "ACTIVE", (cid, cert.state, cert.last_error)
        # orders the CA created (their URL stored); a row that never got one is a newOrder that a
        # crash stopped before the CA answered (or before it was sent): the counting proxy's cases
        # count those at the CA itself
        per = s.execute(
            select(Order.certificate_id, Order.purpose, func.count())
            .where(Order.certificate_id.in_(c.ids), Order.order_url.is_not(None))
            .group_by(Order.certificate_id, Order.purpose)
        ).all()
        dupes = [(cid, purpose, n) for cid, purpose, n in per if n > 1]
        assert not dupes, f"orders opened twice: {dupes[:10]}"
        for purpose in purposes:
            have = {cid for cid, p, _ in per if p == purpose}
            assert have >= set(c.ids) - c.expect_failed, f"certificates without an {purpose} order"
        assert s.execute(select(func.count()).select_from(Http01Token)).scalar_one() == 0
        left = s.execute(select(Challenge.id, Challenge.status).where(Challenge.status != "cleaned")).all()
        assert not left, f"challenges not cleaned: {left[:10]}"
        dns_names = {
            n for (n,) in s.execute(select(Challenge.dns_name).where(Challenge.dns_name.is_not(None)))
        }
        keys = 0
        for iss in s.execute(select(Issuance).where(Issuance.certificate_id.in_(c.ids))).scalars():
            key = certificates.decrypt_key(iss)
            assert crypto.key_matches_certificate(key, iss.cert_pem)
            keys += 1
        deps = {d.certificate_id: d for d in s.execute(select(Deployment)).scalars()}
        for cid, cert in certs.items():
            if cert.state == "ACTIVE":
                cur = s.get(Issuance, cert.current_issuance_id)
                assert deps[cid].status == "deployed" and deps[cid].fingerprint == cur.fingerprint, cid
                assert (Path(deps[cid].remote_ref) / "cert.pem").read_text().strip() == cur.cert_pem.strip()
    assert _txt_names(c.bind, dns_names) == {}, "TXT records left behind"
    return {"certificates": len(certs), "keys_checked": keys, "dns_names": len(dns_names)}


def _wait_cleanups(c: Chaos, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with session_scope(write=False) as s:
                left = s.execute(
                    select(func.count()).select_from(Challenge).where(Challenge.status != "cleaned")
                ).scalar_one()
                tokens = s.execute(select(func.count()).select_from(Http01Token)).scalar_one()
            if left == 0 and tokens == 0:
                return
        except Exception:
            dispose_all()
        time.sleep(0.5)


@pytest.fixture
def chaos(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Chaos]:
    params = getattr(request, "param", {}) or {}
    cleanups: list[Callable[[], None]] = []
    try:
        pg = PrivatePostgres().start()
        cleanups.append(pg.stop)
        # PrivatePostgres runs with synchronous_commit=off (fast, for benchmarks): a crash then loses
        # commits already acknowledged, and the PostgreSQL case would "lose" certificates the API had
        # confirmed. A database-level setting outranks the server's command line: commits here are
        # durable against a process crash, as on a production server.
        _pg(pg, "ALTER DATABASE postgres SET synchronous_commit = on")
        redis = PrivateRedis().start()
        cleanups.append(redis.stop)
        records = {"example.test": [f"{b} IN A 127.0.0.3" for b in BAD_NAMES]}
        bind = BindServer(zone="example.test", records=records).start()
        cleanups.append(bind.stop)
        http_port = free_port()
        pebble = PebbleServer(
            http_port=http_port, dns_server=bind.nameserver, env=params.get("pebble_env", {})
        ).start()
        cleanups.append(pebble.stop)
        directory_url, ca_bundle = pebble.directory_url, str(pebble.ca_bundle)
        proxy = None
        if params.get("counting_proxy"):
            proxy = CountingProxy(pebble.directory_url, pebble.ca_bundle, tmp_path / "proxy").start()
            cleanups.append(proxy.stop)
            directory_url, ca_bundle = proxy.directory_url, str(proxy.combined_ca_bundle)
        edge = tmp_path / "edge"
        env = stack_env(
            tmp_path,
            database_url=pg.url,
            broker_url=redis.url,
            acme=(directory_url, ca_bundle),
            email="chaos@example.test",
            http_port=http_port,
            regions=[{"name": "edge", "provider": "local", "path": str(edge)}],
            log_level="INFO",
            settings={
                "challenges.rfc2136": json.dumps(
                    bind.provider_config(propagation_timeout=60, polling_interval=0.3)
                ),
                "challenges.dns_resolvers": json.dumps([bind.nameserver]),
                "challenges.nameserver_port": str(bind.port),
                "automation.poll_initial_seconds": "0.1",
                "automation.poll_max_seconds": "2",
                "automation.stuck_after_seconds": "12",
                # the cases that expect FAILED expect it from the CA's first refusal
                "automation.retry_attempts": "0",
                # a killed worker's hold on its orders runs out this soon (steps here take a few seconds)
                "automation.order_lease_seconds": "30",
                "automation.scan_interval_seconds": "2",
            },
        )
        stack = Stack(workdir=tmp_path, env=env)
        cleanups.append(stack.stop_all)
        stack.cli("db", "upgrade")
        install_stack_settings(env)
        stack.start_http01(http_port)
        acme_env = (
            {"CERTQUEUE_FAILPOINTS": params["acme_failpoints"]} if params.get("acme_failpoints") else None
        )
        stack.start_worker("acme", concurrency=2, extra_env=acme_env)
        stack.start_worker("dns", concurrency=1)
        propagate_env = None
        if params.get("region_down_seconds"):
            until = time.time() + params["region_down_seconds"]
            propagate_env = {"CERTQUEUE_FAILPOINTS": f"deploy.edge=error_until:{until}"}
        stack.start_worker("propagate", regions=("edge",), concurrency=1, extra_env=propagate_env)
        stack.start_beat()
        yield Chaos(
            stack=stack,
            pebble=pebble,
            bind=bind,
            pg=pg,
            redis=redis,
            env=env,
            edge=edge,
            proxy=proxy,
            cleanups=cleanups,
        )
    finally:
        for fn in reversed(cleanups):
            try:
                fn()
            except Exception:
                pass
        set_settings(None)
        dispose_all()
        lazy_app.reset()


@dataclass
class Driver:
    """A request driver on a thread whose exception is kept, not lost in the thread."""

    thread: threading.Thread
    error: BaseException | None = None

    def finish(self, timeout: float) -> None:
        """Wait for the driver; fail if it is still running or if it raised."""
        self.thread.join(timeout=timeout)
        assert not self.thread.is_alive(), f"the request driver did not finish within {timeout}s"
        if self.error is not None:
            raise AssertionError(f"the request driver failed: {self.error!r}") from self.error


def _in_background(fn: Callable[[], None]) -> Driver:
    driver = Driver(threading.Thread(daemon=True, name="chaos-driver", target=lambda: None))

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            driver.error = exc

    driver.thread = threading.Thread(target=run, daemon=True, name="chaos-driver")
    driver.thread.start()
    return driver


def _await(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.1)


def _ready_messages(c: Chaos) -> int:
    """Messages waiting in the broker's queues (lists), not yet taken by any worker: a Redis restart
    loses exactly these (the private Redis keeps nothing on disk)."""
    import redis

    client = redis.Redis.from_url(c.redis.url, socket_timeout=3, socket_connect_timeout=3)
    try:
        return sum(int(client.llen(k)) for k in client.scan_iter(count=1000) if client.type(k) == b"list")
    except redis.RedisError:
        return 0
    finally:
        client.close()


_MARK = "certqueue-chaos:before-restart"


def _mark_redis(c: Chaos) -> None:
    import redis

    client = redis.Redis.from_url(c.redis.url, socket_timeout=3, socket_connect_timeout=3)
    try:
        client.set(_MARK, "1")
    finally:
        client.close()


def _redis_marked(c: Chaos) -> bool:
    import redis

    client = redis.Redis.from_url(c.redis.url, socket_timeout=3, socket_connect_timeout=3)
    try:
        return bool(client.exists(_MARK))
    finally:
        client.close()


_RECONCILE_RESULT = re.compile(r"certqueue\.scan\.reconcile\[[^\]]+\] succeeded in [0-9.e-]+s: (\{.*?\})")


def _intents_dispatched_again(c: Chaos) -> int:
    """Intents dispatch claimed more than once: their first message was lost (pipeline v2)."""
    from certqueue.models import Intent

    dispose_all()
    with session_scope(write=False) as s:
        return int(
            s.execute(
                select(func.count())
                .select_from(Intent)
                .where(Intent.certificate_id.in_(c.ids), Intent.attempts > 1)
            ).scalar_one()
        )


def _reconciler_resumed(c: Chaos) -> int:
    """How much work the reconciler re-dispatched, summed over its runs (the ``resumed`` of each
    ``certqueue.scan.reconcile`` result, as the worker logs it)."""
    total = 0
    for m in _RECONCILE_RESULT.finditer(c.stack.all_logs()):
        result = ast.literal_eval(m.group(1))
        total += int(result["resumed"])
    return total


def _pg(pg: PrivatePostgres, sql: str) -> Any:
    import psycopg

    url = pg.url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(url, autocommit=True, connect_timeout=3) as conn:
        cur = conn.execute(sql)
        row = cur.fetchone() if cur.description else (None,)
        assert row is not None
        return row[0]


def _app_connections(c: Chaos) -> int:
    """Connections of certqueue's processes to the database (this probe's own excluded)."""
    try:
        return int(
            _pg(
                c.pg,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
            )
        )
    except Exception:
        return 0


def _pg_started_at(c: Chaos, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _pg(c.pg, "SELECT pg_postmaster_start_time()")
        except Exception:
            assert time.monotonic() < deadline, "PostgreSQL did not come back"
            time.sleep(0.2)


def test_sigkill_random_workers_while_issuing(chaos: Chaos):
    rng = random.Random(7)
    driver = _in_background(lambda: chaos.request_batch(N, "k"))
    pools = {
        "worker-acme": ("acme", (), 2),
        "worker-dns": ("dns", (), 1),
        "worker-propagate-edge": ("propagate", ("edge",), 1),
    }
    kills = 0
    end = time.monotonic() + 25
    while time.monotonic() < end:
        time.sleep(rng.uniform(1.0, 2.5))
        name = rng.choice(list(pools))
        pool, regions, conc = pools[name]
        if rng.random() < 0.5:
            chaos.stack.kill_children(name)  # the main process re-queues the running message
        else:
            chaos.stack.kill(name)  # the whole worker: its unacked messages wait for the reconciler
            chaos.stack.start_worker(pool, regions=regions, concurrency=conc, name=name)
        kills += 1
    driver.finish(timeout=120)
    assert len(chaos.ids) == N
    chaos.wait_settled(timeout=300)
    _wait_cleanups(chaos)
    counts = audit(chaos)
    print(f"chaos sigkill: {counts}, kills={kills}")
    assert kills >= 8


#: orders park here (created, challenges answered, nothing finalized) long enough for the case to
#: SIGKILL the worker in the middle of its batches: the first MID_BATCH_HELD of each pool process
#: (each kill brings a new one, which holds its first ones again); the rest of the run goes at speed,
#: so a kill also lands on orders the CA has just created whose URL is not stored yet (found again
#: in the account's order list, tests/integration/test_unconfirmed_order.py)
MID_BATCH_PAUSE_S = 6
MID_BATCH_HELD = 4
#: and the first orders of each process wait here between the CA's answer and the commit of their
#: URL, so the second kill is sure to meet orders the CA created that the database does not know
UNCONFIRMED_PAUSE_S = 4
UNCONFIRMED_HELD = 2


def _orders_waiting_to_finalize(c: Chaos) -> int:
    try:
        with session_scope(write=False) as s:
            return int(
                s.execute(
                    select(func.count())
                    .select_from(Order)
                    .where(Order.certificate_id.in_(c.ids), Order.order_url.is_not(None))
                    .where(Order.status.in_(("pending", "ready")), Order.lease_until.is_not(None))
                ).scalar_one()
            )
    except Exception:
        dispose_all()
        return 0


def _unconfirmed_at_ca(c: Chaos) -> int:
    """Orders the CA created (the proxy's count) beyond the ones whose URL the database holds."""
    assert c.proxy is not None
    created = c.proxy.counts().get("newOrder 201", 0)
    try:
        with session_scope(write=False) as s:
            stored = s.execute(
                select(func.count())
                .select_from(Order)
                .where(Order.certificate_id.in_(c.ids), Order.order_url.is_not(None))
            ).scalar_one()
    except Exception:
        dispose_all()
        return 0
    return int(created) - int(stored)


def _wait_dead(pids: list[int], timeout: float = 5.0) -> None:
    """Until every one of ``pids`` is gone or a zombie (SIGKILL is delivered, not yet reaped)."""

    def dead(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return True

    _await(lambda: all(dead(p) for p in pids), timeout=timeout, what=f"processes {pids} dead")


def _found_at_ca(c: Chaos) -> int:
    """Orders whose newOrder was never confirmed (the kill landed between the CA's answer and the
    commit of the URL) and that were found again in the account's order list."""
    with session_scope(write=False) as s:
        rows = s.execute(
            select(Event.data).where(Event.certificate_id.in_(c.ids), Event.kind == "order")
        ).scalars()
        return sum(1 for d in rows if d and d.get("found_at_ca"))


@pytest.mark.parametrize(
    "chaos",
    [
        {
            "counting_proxy": True,
            "acme_failpoints": (
                f"validate.before_finalize=sleep:{MID_BATCH_PAUSE_S}:{MID_BATCH_HELD},"
                f"order.created=sleep:{UNCONFIRMED_PAUSE_S}:{UNCONFIRMED_HELD}"
            ),
        }
    ],
    indirect=True,
)
def test_sigkill_in_the_middle_of_a_batch_orders_once_at_the_ca(chaos: Chaos):
    """The acme worker's pool process is killed (SIGKILL) while its batches hold orders that the CA
    has created and validated but nobody finalized; twice. The rest of the run goes at speed, so a
    kill also meets orders the CA has just created whose URL is not stored yet. The redelivered
    batches resume the first and find the second in the account's order list: every certificate
    ends ACTIVE with exactly one newOrder counted at the CA itself (the counting proxy in front of
    Pebble), not only one order row in our database."""
    assert chaos.proxy is not None
    driver = _in_background(lambda: chaos.request_batch(N, "m"))
    kills = 0
    killed_with_orders_open = 0
    _await(lambda: _orders_waiting_to_finalize(chaos) >= 2, timeout=180, what="orders held mid-batch")
    killed_with_orders_open += _orders_waiting_to_finalize(chaos)
    assert chaos.stack.kill_children("worker-acme"), "no acme pool process to kill"
    kills += 1
    # the new pool processes hold their first orders between the CA's answer and the commit
    _await(lambda: _unconfirmed_at_ca(chaos) >= 1, timeout=180, what="orders the CA created, URL not stored")
    killed_with_orders_open += _orders_waiting_to_finalize(chaos)
    killed = chaos.stack.kill_children("worker-acme")
    assert killed, "no acme pool process to kill"
    kills += 1
    # counted once the pool processes are dead: an order between the CA's answer and its commit at
    # the count before the kill may have been committed by then (it then needs no finding)
    _wait_dead(killed)
    unconfirmed = _unconfirmed_at_ca(chaos)
    driver.finish(timeout=180)
    assert len(chaos.ids) == N
    chaos.wait_settled(timeout=400)
    _wait_cleanups(chaos)
    counts = audit(chaos)
    at_ca = chaos.proxy.counts()
    found = _found_at_ca(chaos)
    print(
        f"chaos mid-batch sigkill: {counts}, kills={kills},"
        f" orders open at the kills={killed_with_orders_open}, unconfirmed at the second={unconfirmed},"
        f" at the CA={at_ca}, unconfirmed orders found at the CA={found}"
    )
    assert kills == 2 and killed_with_orders_open >= 2 and unconfirmed >= 1
    assert at_ca.get("newOrder 201", 0) == N, f"newOrders the CA created: {at_ca}"
    # every order the kill left unconfirmed was found again (none ordered twice: the line above)
    assert found >= unconfirmed, f"unconfirmed at the kill: {unconfirmed}, found again: {found}"


def test_redis_restart_mid_run_loses_queued_messages_and_the_reconciler_recovers(chaos: Chaos):
    driver = _in_background(lambda: chaos.request_batch(N, "r"))
    # restart while messages are waiting in the queues (not after a fixed sleep that may miss them)
    # the count is the one read just before the restart, and the restart follows a read that saw
    # messages (the workers may drain a short queue between two reads)
    seen: list[int] = []

    def queued() -> bool:
        seen.append(_ready_messages(chaos))
        return seen[-1] >= 1

    _await(queued, timeout=120, what="messages queued in Redis")
    lost = seen[-1]
    _mark_redis(chaos)
    chaos.redis.restart(down_seconds=3)  # everything queued in Redis is gone
    # the new Redis did not get the old data back (its queues are refilled at once by the running
    # system, so their length says nothing: a key written just before the restart does)
    assert not _redis_marked(chaos), "the restarted Redis kept its data: the case tests nothing"
    driver.finish(timeout=180)
    assert len(chaos.ids) == N
    chaos.wait_settled(timeout=300)
    _wait_cleanups(chaos)
    resumed = _reconciler_resumed(chaos)
    redispatched = _intents_dispatched_again(chaos)
    print(
        f"chaos redis: {audit(chaos)}, queued messages lost={lost},"
        f" unpublished={len(chaos.unpublished)}, reconciler resumed={resumed},"
        f" intents dispatched again={redispatched}"
    )
    assert lost >= 1, "the restart lost no message: the case tested nothing"
    # lost work comes back two ways: the reconciler resends the next step of work past its deadline,
    # and dispatch claims again an intent whose message was lost once its lease ends
    assert resumed + redispatched >= 1, "every certificate settled, but nothing recovered the lost work"


def test_postgres_restart_mid_run(chaos: Chaos):
    driver = _in_background(lambda: chaos.request_batch(N, "p"))
    # crash while the workers are connected and work is in flight, not after a fixed sleep
    _await(
        lambda: _app_connections(chaos) >= 2 and "ISSUING" in set(chaos.states().values()),
        timeout=120,
        what="workers connected to PostgreSQL with issuance in flight",
    )
    started = _pg_started_at(chaos)
    connections = _app_connections(chaos)
    chaos.pg.restart(mode="immediate")  # a crash: every connection dies mid-transaction
    assert _pg_started_at(chaos) > started, "PostgreSQL was not restarted"
    driver.finish(timeout=180)
    assert len(chaos.ids) == N
    chaos.wait_settled(timeout=300)
    _wait_cleanups(chaos)
    print(
        f"chaos postgres: {audit(chaos)}, connections killed={connections},"
        f" reconciler resumed={_reconciler_resumed(chaos)}"
    )
    assert connections >= 2


@pytest.mark.parametrize("chaos", [{"pebble_env": {"PEBBLE_WFE_NONCEREJECT": "30"}}], indirect=True)
def test_nonce_rejection_and_validation_failures(chaos: Chaos):
    chaos.request_batch(N, "n", bad=BAD_NAMES)
    chaos.wait_settled(timeout=300)
    _wait_cleanups(chaos)
    print(f"chaos nonce: {audit(chaos)}")


REGION_DOWN_SECONDS = 25


@pytest.mark.parametrize("chaos", [{"region_down_seconds": REGION_DOWN_SECONDS}], indirect=True)
def test_region_target_failing_then_recovering(chaos: Chaos):
    """The region's target fails (every deploy raises a retryable error) for a while, then works."""
    chaos.request_batch(N // 2, "t")
    # while the region fails, nothing becomes ACTIVE (ISSUED waits for its required region)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "ISSUED" not in set(chaos.states().values()):
        time.sleep(0.5)
    assert "ISSUED" in set(chaos.states().values())
    assert "ACTIVE" not in set(chaos.states().values())
    chaos.wait_settled(timeout=400)  # the target recovers by itself; retries and the reconciler finish
    print(f"chaos region: {audit(chaos)}")


def test_beat_started_twice_renews_each_certificate_once(chaos: Chaos):
    chaos.request_batch(N // 2, "b")
    chaos.wait_settled(timeout=300)
    chaos.stack.start_beat(name="beat-2")  # a second beat: RedBeat's lock keeps one active
    first = {}
    with session_scope() as s:
        for cert in s.execute(select(Certificate).where(Certificate.id.in_(chaos.ids))).scalars():
            first[cert.id] = cert.current_issuance_id
        s.execute(update(Certificate).where(Certificate.id.in_(chaos.ids)).values(renew_at=utcnow()))

    def renewed() -> bool:
        with session_scope(write=False) as s:
            rows = s.execute(
                select(Certificate.id, Certificate.state, Certificate.current_issuance_id).where(
                    Certificate.id.in_(chaos.ids)
                )
            ).all()
        return all(st == "ACTIVE" and iss != first[cid] for cid, st, iss in rows)

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not renewed():
        time.sleep(0.5)
    assert renewed(), chaos.stack.log_tails()
    _wait_cleanups(chaos)
    print(f"chaos beat x2: {audit(chaos, purposes=('issue', 'renew'))}")
