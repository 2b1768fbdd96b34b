"""certqueue.acme.ratelimit: behaviours that one-line changes showed untested.

* Redis budgets expire by themselves (nothing else purges them): every hash gets a TTL that outlives
  the budget's refill and its block, and no more than an hour beyond.
* A budget's stored limit survives writes that carry no limit (a CA block arrives by key name, with
  limit 0): the snapshot, and so the metrics, keep showing the real limit.
* ``DatabaseRateLimiter.bound(session)`` works inside the caller's transaction: what it consumes is
  committed or rolled back with the caller's work (the SQLite task path, where a second write
  session would wait for the caller's own write lock).

Redis: a database claimed for the test (tests.conftest_redis). Databases: SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest

from certqueue import db
from certqueue.acme.ratelimit import (
    DatabaseRateLimiter,
    Limit,
    RateLimitPolicy,
    RedisRateLimiter,
    budget_keys,
)
from certqueue.config import Settings
from certqueue.models import RateBudget
from tests.conftest_redis import RedisClaim

CA = "https://ca.test:14000/dir"
T0 = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)
POLICY = RateLimitPolicy(
    new_orders=Limit(3, dt.timedelta(hours=3)), certs_per_domain=None, duplicate_certs=None, failed_authz=None
)
PREFIX = "certqueue-test:rl"


def _orders_key() -> tuple[list, object]:
    keys = budget_keys("acct_1", CA, ["www.example.com"], POLICY)
    (orders,) = [k for k in keys if k.scope == "new_orders"]
    return keys, orders


def test_redis_budgets_get_a_ttl_beyond_refill_and_block(redis_db: RedisClaim) -> None:
    client = redis_db.client()
    limiter = RedisRateLimiter(client, PREFIX, POLICY)
    keys, orders = _orders_key()
    now = dt.datetime.now(dt.UTC)  # Redis TTLs run on the server's clock, so the test uses the real one
    assert limiter.try_acquire(keys, now).allowed

    hashes = sorted(k.decode() for k in client.scan_iter(f"{{{PREFIX}}}:*"))
    assert hashes, "nothing was stored"
    for h in hashes:
        ttl = client.ttl(h)
        assert ttl > 0, f"{h} never expires (TTL {ttl})"
    ttl = client.ttl(f"{{{PREFIX}}}:{orders.name}")
    # one unit used: it is back after period/limit (1 h); the key lives an hour beyond that
    interval = orders.period_seconds / orders.limit
    assert interval + 3600 - 60 <= ttl <= interval + 3600

    until = now + dt.timedelta(days=2)
    limiter.block(orders.name, until, now)
    blocked_ttl = client.ttl(f"{{{PREFIX}}}:{orders.name}")
    assert 2 * 86400 + 3600 - 60 <= blocked_ttl <= 2 * 86400 + 3600  # outlives the block


@pytest.mark.parametrize("backend", ["redis", "sqlite"])
def test_a_block_by_name_keeps_the_stored_limit(
    backend: str, request: pytest.FixtureRequest, settings_factory: Callable[..., Settings]
) -> None:
    if backend == "redis":
        claim: RedisClaim = request.getfixturevalue("redis_db")
        limiter: RedisRateLimiter | DatabaseRateLimiter = RedisRateLimiter(claim.client(), PREFIX, POLICY)
    else:
        url = str(request.getfixturevalue("sqlite_url"))
        settings_factory(database_url=url)
        limiter = DatabaseRateLimiter(db.sessionmaker_for(url), POLICY)
    keys, orders = _orders_key()
    assert limiter.try_acquire(keys, T0).allowed

    def state() -> tuple[int, float, bool]:
        (s,) = [b for b in limiter.snapshot(T0) if b.key == orders.name]
        return s.limit, s.remaining, s.blocked

    assert state() == (3, 2, False)
    # a CA rateLimited problem names the key; the block carries no limit of its own
    limiter.block(orders.name, T0 + dt.timedelta(hours=1), T0)
    assert state() == (3, 2, True)
    limiter.release([orders], T0)
    assert state() == (3, 3, True)


def test_bound_limiter_commits_and_rolls_back_with_the_callers_transaction(
    db_settings: Settings,
) -> None:
    url = db_settings.database.url
    limiter = DatabaseRateLimiter(db.sessionmaker_for(url), POLICY)
    keys, orders = _orders_key()

    def remaining() -> float:
        found = [b.remaining for b in limiter.snapshot(T0) if b.key == orders.name]
        return found[0] if found else float(orders.limit)

    class Abort(Exception):
        pass

    with pytest.raises(Abort), db.session_scope(url) as session:
        assert limiter.bound(session).try_acquire(keys, T0).allowed
        raise Abort  # the caller's work fails: the budget it drew on must come back with it
    assert remaining() == 3

    with db.session_scope(url) as session:
        assert limiter.bound(session).try_acquire(keys, T0).allowed
        assert limiter.bound(session).try_acquire(keys, T0).allowed
        # not committed yet: another (read-only) session does not see the budget's row
        with db.session_scope(url, write=False) as other:
            assert other.get(RateBudget, orders.name) is None
    assert remaining() == 1
