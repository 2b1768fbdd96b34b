"""Redis databases for tests, shared safely by every test process on the machine.

A plugin module (tests/conftest.py registers it). The machine's Redis (127.0.0.1:6379) is shared by
concurrent test runs (other checkouts, xdist workers, CI): a test that used a fixed database number
would read, or flush, another run's data. So every test that touches that Redis takes a database
through one claim scheme:

* databases 1..15 are claimable; database 0 holds only the claim keys
  ``certqueue:test-redis-db:<n>``;
* a claim is ONE atomic command, ``SET key <owner> NX PX <lease>``: two processes can never both
  win a database, and no check-then-set window exists;
* a claim is a lease (``LEASE_SECONDS``), renewed by a heartbeat thread while the process lives and
  released (compare-and-delete, so never someone else's claim) after the database is flushed. A run
  that is killed leaves a claim that simply expires: nothing takes over a live claim, and nothing
  has to guess from a pid whether its owner is alive (pids are not unique across containers);
* the winner flushes the database before use (a dead owner may have left data in it).

Functions: ``claim_redis_db()`` / ``RedisClaim.release()`` for code that manages its own lifetime
(the integration pipelines), ``process_redis_url()`` for one database held for the whole test
process (tests that need "a broker URL" but never flush it). Fixtures: ``redis_db`` (function
scope: a fresh, empty database of the test's own, released after it) and ``redis_url`` (session).
When Redis cannot be reached the tests that need it are skipped, or fail when any of
CERTQUEUE_REQUIRE_REDIS, CERTQUEUE_REQUIRE_SERVICES or CERTQUEUE_REQUIRE_POSTGRES is set (CI).
"""

from __future__ import annotations

import atexit
import os
import secrets
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis as redis_lib

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
CLAIMABLE = tuple(range(1, 16))
CLAIM_PREFIX = "certqueue:test-redis-db:"
LEASE_SECONDS = 120
HEARTBEAT_SECONDS = 20
REQUIRE_ENVS = ("CERTQUEUE_REQUIRE_REDIS", "CERTQUEUE_REQUIRE_SERVICES", "CERTQUEUE_REQUIRE_POSTGRES")

# compare-and-renew / compare-and-delete: act only on a claim that is still ours
_RENEW = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end"
    " return 0"
)
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class NoFreeRedisDatabase(RuntimeError):
    """Every claimable database is held by a live claim."""


def _claims_client() -> redis_lib.Redis:
    return redis_lib.Redis(host=REDIS_HOST, port=REDIS_PORT, db=0, socket_timeout=5, socket_connect_timeout=3)


@dataclass
class RedisClaim:
    db: int
    owner: str = field(repr=False)
    released: bool = False
    lost: bool = False

    @property
    def key(self) -> str:
        return f"{CLAIM_PREFIX}{self.db}"

    @property
    def url(self) -> str:
        return f"redis://{REDIS_HOST}:{REDIS_PORT}/{self.db}"

    def client(self) -> redis_lib.Redis:
        return redis_lib.Redis(
            host=REDIS_HOST, port=REDIS_PORT, db=self.db, socket_timeout=5, socket_connect_timeout=3
        )

    def still_ours(self) -> bool:
        value = _claims_client().get(self.key)
        return value is not None and value.decode() == self.owner

    def release(self) -> None:
        """Flush the database (leave it empty for the next claimant), then drop the claim if it is
        still ours. Idempotent."""
        if self.released:
            return
        self.released = True
        _heartbeat.forget(self)
        if self.still_ours():
            self.client().flushdb()
        _claims_client().eval(_RELEASE, 1, self.key, self.owner)


class _Heartbeat:
    """One daemon thread per process renewing every live claim of the process."""

    def __init__(self) -> None:
        self._by_db: dict[int, RedisClaim] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, claim: RedisClaim) -> None:
        with self._lock:
            self._by_db[claim.db] = claim
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="redis-claims", daemon=True)
                self._thread.start()

    def forget(self, claim: RedisClaim) -> None:
        with self._lock:
            if self._by_db.get(claim.db) is claim:
                del self._by_db[claim.db]

    def held(self) -> set[int]:
        with self._lock:
            return set(self._by_db)

    def _run(self) -> None:
        while not self._wake.wait(HEARTBEAT_SECONDS):
            with self._lock:
                claims = list(self._by_db.values())
            try:
                client = _claims_client()
                for c in claims:
                    if not client.eval(_RENEW, 1, c.key, c.owner, LEASE_SECONDS * 1000):
                        c.lost = True  # expired (the process was stopped longer than the lease)
            except redis_lib.RedisError:
                continue  # Redis away for a moment: the lease covers several missed beats


_heartbeat = _Heartbeat()


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def claim_redis_db(exclude: set[int] | None = None) -> RedisClaim:
    """Claim a free database (atomically), flush it and keep it leased until ``release()``.

    Raises NoFreeRedisDatabase when every one is held, redis.RedisError when Redis is unreachable.
    """
    claims = _claims_client()
    skip = (exclude or set()) | _heartbeat.held()
    for db in CLAIMABLE:
        if db in skip:
            continue
        owner = _owner()
        if claims.set(f"{CLAIM_PREFIX}{db}", owner, nx=True, px=LEASE_SECONDS * 1000):
            claim = RedisClaim(db=db, owner=owner)
            _heartbeat.add(claim)
            claim.client().flushdb()
            return claim
    raise NoFreeRedisDatabase(f"every Redis database {CLAIMABLE[0]}..{CLAIMABLE[-1]} is claimed")


def require_redis() -> None:
    """Skip when the machine's Redis is not there, or fail when a REQUIRE variable is set."""
    try:
        _claims_client().ping()
    except redis_lib.RedisError as exc:
        msg = f"Redis not reachable at {REDIS_HOST}:{REDIS_PORT}: {exc}"
        if any(os.environ.get(v) for v in REQUIRE_ENVS):
            pytest.fail(f"{msg} (a CERTQUEUE_REQUIRE_* variable is set)", pytrace=False)
        pytest.skip(msg)


_process_claim: RedisClaim | None = None
_process_lock = threading.Lock()


def process_redis_url() -> str:
    """A database claimed for the rest of this test process (released at exit). For tests that
    publish or read a few keys of their own and never flush the database."""
    global _process_claim
    with _process_lock:
        if _process_claim is None or _process_claim.released:
            require_redis()
            _process_claim = claim_redis_db()
            atexit.register(_process_claim.release)
        return _process_claim.url


def release_process_claim() -> None:
    global _process_claim
    with _process_lock:
        if _process_claim is not None:
            _process_claim.release()
            _process_claim = None


def pytest_unconfigure(config: pytest.Config) -> None:
    release_process_claim()


@pytest.fixture
def redis_db() -> Iterator[RedisClaim]:
    """A fresh, empty database of this test's own; flushed and released after it."""
    require_redis()
    claim = claim_redis_db()
    try:
        yield claim
    finally:
        claim.release()


@pytest.fixture(scope="session")
def redis_url() -> str:
    return process_redis_url()
