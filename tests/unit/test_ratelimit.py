"""certqueue.acme.ratelimit: budget keys (pure), GCRA decisions with a fake clock, on every backend.

Each scenario runs on the in-process backend, Redis (127.0.0.1:6379, a database claimed
for the test through tests.conftest_redis), SQLite (a
migrated temp file) and PostgreSQL (skipped without a server unless CERTQUEUE_REQUIRE_POSTGRES is set).
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete

from certqueue import db
from certqueue.acme.ratelimit import (
    LETS_ENCRYPT,
    BudgetKey,
    DatabaseRateLimiter,
    Decision,
    Limit,
    MemoryRateLimiter,
    RateLimiter,
    RateLimitPolicy,
    RedisRateLimiter,
    budget_keys,
    ca_key,
    keys_for_ca_problem,
    names_digest,
    policy_from_settings,
    rate_limiter_for,
    registered_domain,
)
from certqueue.config import RateLimitSettings, Settings
from certqueue.models import RateBudget

CA = "https://ca.test:14000/dir"
OTHER_CA = "https://other-ca.test/directory"
T0 = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)
H = 3600.0
DAY = 86400.0


class FakeClock:
    def __init__(self, start: dt.datetime = T0) -> None:
        self.now = start

    def advance(self, seconds: float) -> dt.datetime:
        self.now += dt.timedelta(seconds=seconds)
        return self.now

    def at(self, seconds: float) -> dt.datetime:
        """T0 + seconds."""
        return T0 + dt.timedelta(seconds=seconds)


# --- keys: pure -----------------------------------------------------------------------------------


def scopes(keys: list[BudgetKey]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k in keys:
        out.setdefault(k.scope, []).append(k.subject)
    return out


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.example.co.uk", "example.co.uk"),
        ("b.example.co.uk", "example.co.uk"),
        ("www.example.com", "example.com"),
        ("new.blog.example.co.uk", "example.co.uk"),
        ("*.example.com", "example.com"),
        ("EXAMPLE.com.", "example.com"),
        ("a.github.io", "a.github.io"),  # private section of the list: each user is a registrant
        ("b.github.io", "b.github.io"),
        ("deep.a.github.io", "a.github.io"),
        ("co.uk", "co.uk"),  # a public suffix itself counts as its own
        ("localhost", "localhost"),
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:3::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::9", "2001:db8:1:2::/64"),
    ],
)
def test_registered_domain(name: str, expected: str) -> None:
    assert registered_domain(name) == expected


def test_public_suffix_list_is_bundled_not_fetched() -> None:
    """publicsuffixlist ships its data in the package: no download at run time."""
    import publicsuffixlist

    data = Path(publicsuffixlist.__file__).with_name("public_suffix_list.dat")
    assert data.stat().st_size > 100_000
    assert "github.io" in data.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("names", "domains", "identifiers"),
    [
        (["a.example.co.uk", "b.example.co.uk"], ["example.co.uk"], ["a.example.co.uk", "b.example.co.uk"]),
        (["a.github.io", "b.github.io"], ["a.github.io", "b.github.io"], ["a.github.io", "b.github.io"]),
        (["example.com", "*.example.com"], ["example.com"], ["example.com"]),
        (
            ["www.example.com", "www.example.org"],
            ["example.com", "example.org"],
            ["www.example.com", "www.example.org"],
        ),
    ],
)
def test_budget_keys_group_by_registered_domain(
    names: list[str], domains: list[str], identifiers: list[str]
) -> None:
    keys = budget_keys("acct_1", CA, names)
    by_scope = scopes(keys)
    assert sorted(by_scope["certs_per_domain"]) == domains
    assert sorted(by_scope["failed_authz"]) == identifiers
    assert by_scope["new_orders"] == ["acct_1"]
    assert by_scope["duplicate_certs"] == [names_digest(names)]
    assert by_scope["ca"] == ["*"]
    assert [k.name for k in keys] == sorted(k.name for k in keys)
    consumed = {k.scope for k in keys if k.consume}
    assert consumed == {"new_orders", "certs_per_domain", "duplicate_certs"}


def test_budget_keys_carry_lets_encrypt_defaults() -> None:
    keys = {k.scope: k for k in budget_keys("acct_1", CA, ["a.example.com"])}
    assert (keys["new_orders"].limit, keys["new_orders"].period_seconds) == (300, 3 * H)
    assert (keys["certs_per_domain"].limit, keys["certs_per_domain"].period_seconds) == (50, 7 * DAY)
    assert (keys["duplicate_certs"].limit, keys["duplicate_certs"].period_seconds) == (5, 7 * DAY)
    assert (keys["failed_authz"].limit, keys["failed_authz"].period_seconds) == (5, H)
    assert keys["new_orders"].name == "new_orders/10800s/ca.test:14000_dir/acct_1"


def test_budget_keys_are_per_ca_and_per_account() -> None:
    a = {k.name for k in budget_keys("acct_1", CA, ["x.example.com"])}
    b = {k.name for k in budget_keys("acct_1", OTHER_CA, ["x.example.com"])}
    c = {k.name for k in budget_keys("acct_2", CA, ["x.example.com"])}
    assert not a & b
    assert {n for n in a & c} == {n for n in a if not n.startswith("new_orders/")}


def test_same_name_set_ignores_order_and_case() -> None:
    assert names_digest(["B.example.com", "a.example.com"]) == names_digest(
        ["a.example.com", "b.example.com."]
    )
    assert names_digest(["a.example.com"]) != names_digest(["a.example.com", "b.example.com"])


def test_budget_keys_need_a_name() -> None:
    with pytest.raises(ValueError):
        budget_keys("acct_1", CA, [])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, LETS_ENCRYPT),
        (
            {"new_orders_per_account": 10, "new_orders_period_hours": 1, "duplicate_certificates": 0},
            RateLimitPolicy(
                new_orders=Limit(10, dt.timedelta(hours=1)),
                certs_per_domain=LETS_ENCRYPT.certs_per_domain,
                duplicate_certs=None,
                failed_authz=LETS_ENCRYPT.failed_authz,
            ),
        ),
        ({"enabled": False}, RateLimitPolicy(None, None, None, None)),
    ],
)
def test_policy_from_settings(overrides: dict[str, Any], expected: RateLimitPolicy) -> None:
    assert policy_from_settings(RateLimitSettings(**overrides)) == expected


def test_disabled_policy_still_honours_ca_blocks() -> None:
    keys = budget_keys("acct_1", CA, ["a.example.com"], RateLimitPolicy(None, None, None, None))
    assert [k.scope for k in keys] == ["ca"]
    limiter = MemoryRateLimiter(RateLimitPolicy(None, None, None, None))
    for _ in range(1000):
        assert limiter.try_acquire(keys, T0).allowed
    limiter.block(ca_key(CA), T0 + dt.timedelta(minutes=5))
    assert limiter.try_acquire(keys, T0) == Decision(False, T0 + dt.timedelta(minutes=5), (ca_key(CA).name,))


@pytest.mark.parametrize(
    ("detail", "scope", "subjects"),
    [
        ("too many new orders (300) from this account in the last 3h0m0s", "new_orders", ["acct_1"]),
        (
            'too many certificates (50) already issued for "example.com" in the last 168h0m0s',
            "certs_per_domain",
            ["example.com"],
        ),
        (
            "too many certificates (5) already issued for this exact set of identifiers in the last 168h0m0s",
            "duplicate_certs",
            None,
        ),
        (
            'too many failed authorizations (5) for "www.example.org" in the last 1h0m0s',
            "failed_authz",
            ["www.example.org"],
        ),
        ("slow down", "new_orders", ["acct_1"]),  # unknown: the account's new-order budget
        (None, "new_orders", ["acct_1"]),
    ],
)
def test_keys_for_ca_problem(detail: str | None, scope: str, subjects: list[str] | None) -> None:
    keys = budget_keys("acct_1", CA, ["www.example.com", "www.example.org"])
    hit = keys_for_ca_problem(keys, detail)
    assert {k.scope for k in hit} == {scope}
    if subjects is not None:
        assert [k.subject for k in hit] == subjects


# --- backends -------------------------------------------------------------------------------------

BACKENDS = ["memory", "redis", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]

MakeLimiter = Callable[[RateLimitPolicy], RateLimiter]


@pytest.fixture(params=BACKENDS)
def make_limiter(
    request: pytest.FixtureRequest, settings_factory: Callable[..., Settings]
) -> Iterator[MakeLimiter]:
    backend: str = request.param
    if backend == "memory":
        yield MemoryRateLimiter
        return
    if backend == "redis":
        claim = request.getfixturevalue("redis_db")  # a fresh database of this test's own
        client = claim.client()
        yield lambda policy: RedisRateLimiter(client, "certqueue-test:rl", policy)
        client.close()
        return
    url = str(request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url"))
    settings_factory(database_url=url)
    with db.session_scope(url) as session:
        session.execute(delete(RateBudget))
    yield lambda policy: DatabaseRateLimiter(db.sessionmaker_for(url), policy)


ORDERS_ONLY = RateLimitPolicy(
    new_orders=Limit(3, dt.timedelta(hours=1)), certs_per_domain=None, duplicate_certs=None, failed_authz=None
)


@dataclass(frozen=True)
class Step:
    """One step of a scenario: ``op`` at T0 + ``at`` seconds, and what it must answer."""

    at: float
    op: str  # acquire, release, block, block_name, fail
    names: tuple[str, ...] = ("www.example.com",)
    allowed: bool | None = None
    retry_at: float | None = None  # seconds after T0
    until: float | None = None  # block: seconds after T0
    blocked_scopes: tuple[str, ...] | None = None


def A(
    at: float, ok: bool, retry: float | None = None, names: tuple[str, ...] = ("www.example.com",), **kw: Any
) -> Step:
    return Step(at, "acquire", names, ok, retry, **kw)


SCENARIOS: dict[str, tuple[RateLimitPolicy, list[Step]]] = {
    "budget consumed, then refused until one unit returns": (
        ORDERS_ONLY,
        [
            A(0, True),
            A(0, True),
            A(0, True),
            A(0, False, 1200),
            A(1199, False, 1200),
            A(1200, True),
            A(1200, False, 2400),
        ],
    ),
    "burst spread out over the period: each unit comes back on its own": (
        ORDERS_ONLY,
        [A(0, True), A(600, True), A(1200, True), A(1300, True), A(1300, False, 2400), A(2400, True)],
    ),
    "window rollover: a whole period later the full budget is back": (
        ORDERS_ONLY,
        [
            A(0, True),
            A(0, True),
            A(0, True),
            A(0, False, 1200),
            A(3600, True),
            A(3600, True),
            A(3600, True),
            A(3600, False, 4800),
        ],
    ),
    "release gives a unit back": (
        ORDERS_ONLY,
        [A(0, True), A(0, True), A(0, True), Step(10, "release"), A(10, True), A(10, False, 1200)],
    ),
    "release never creates credit beyond a full budget": (
        ORDERS_ONLY,
        [Step(0, "release"), Step(0, "release"), A(0, True), A(0, True), A(0, True), A(0, False, 1200)],
    ),
    "never partial: a refusal by one key consumes nothing from the others": (
        RateLimitPolicy(Limit(3, dt.timedelta(hours=1)), None, Limit(1, dt.timedelta(days=1)), None),
        [
            A(0, True, names=("a.example.com",)),
            A(0, False, DAY, names=("a.example.com",), blocked_scopes=("duplicate_certs",)),
            A(0, False, DAY, names=("a.example.com",)),
            A(0, True, names=("b.example.com",)),  # would be refused if the refusals had taken orders
            A(0, True, names=("c.example.com",)),
            A(0, False, 1200, names=("d.example.com",), blocked_scopes=("new_orders",)),
        ],
    ),
    "retry_at is when every blocking key has room, the latest of them": (
        RateLimitPolicy(Limit(1, dt.timedelta(hours=1)), None, Limit(1, dt.timedelta(days=1)), None),
        [A(0, True), A(5, False, DAY, blocked_scopes=("duplicate_certs", "new_orders"))],
    ),
    "registered domain budget shared by a.example.co.uk and b.example.co.uk": (
        RateLimitPolicy(None, Limit(2, dt.timedelta(days=7)), None, None),
        [
            A(0, True, names=("a.example.co.uk",)),
            A(0, True, names=("b.example.co.uk",)),
            A(0, False, 7 * DAY / 2, names=("c.example.co.uk",), blocked_scopes=("certs_per_domain",)),
            A(0, True, names=("a.github.io",)),
            A(0, True, names=("b.github.io",)),  # github.io is a public suffix: separate registrants
            A(0, True, names=("a.github.io",)),
            A(0, False, 7 * DAY / 2, names=("a.github.io",)),
        ],
    ),
    "a CA block (Retry-After) on the whole CA": (
        LETS_ENCRYPT,
        [
            A(0, True),
            Step(10, "block", until=610),
            A(10, False, 610, blocked_scopes=("ca",)),
            A(609, False, 610),
            A(610, True),
        ],
    ),
    "a block on one key by its name; a later, shorter block does not shorten it": (
        ORDERS_ONLY,
        [
            Step(0, "block_name", until=900),
            Step(0, "block_name", until=300),
            A(0, False, 900, blocked_scopes=("new_orders",)),
            A(900, True),
        ],
    ),
    "a block longer than the budget wait wins": (
        ORDERS_ONLY,
        [
            A(0, True),
            A(0, True),
            A(0, True),
            Step(0, "block_name", until=5000),
            A(1200, False, 5000),
            A(5000, True),
        ],
    ),
    "failed authorizations hold back orders naming that identifier": (
        RateLimitPolicy(Limit(100, dt.timedelta(hours=1)), None, None, Limit(2, dt.timedelta(hours=1))),
        [
            A(0, True, names=("www.example.com",)),
            A(0, True, names=("www.example.com",)),  # acquiring never counts as a failure
            A(0, True, names=("www.example.com",)),
            Step(0, "fail", names=("www.example.com",)),
            A(0, True, names=("www.example.com",)),
            Step(60, "fail", names=("www.example.com",)),
            A(
                60,
                False,
                1800,
                names=("www.example.com", "other.example.com"),
                blocked_scopes=("failed_authz",),
            ),
            A(60, True, names=("other.example.com",)),
            A(1799, False, 1800, names=("www.example.com",)),
            A(1800, True, names=("www.example.com",)),
        ],
    ),
    "failed authorizations of a wildcard count for its base name": (
        RateLimitPolicy(None, None, None, Limit(1, dt.timedelta(hours=1))),
        [
            Step(0, "fail", names=("*.example.com",)),
            A(0, False, 3600, names=("example.com",)),
            A(3600, True, names=("example.com",)),
        ],
    ),
    "failures beyond the budget do not push the wait past one period": (
        RateLimitPolicy(None, None, None, Limit(2, dt.timedelta(hours=1))),
        [*(Step(0, "fail") for _ in range(10)), A(0, False, 1800), A(1800, True)],
    ),
}


def run_step(limiter: RateLimiter, policy: RateLimitPolicy, step: Step) -> None:
    now = T0 + dt.timedelta(seconds=step.at)
    keys = budget_keys("acct_1", CA, list(step.names), policy)
    if step.op == "acquire":
        decision = limiter.try_acquire(keys, now)
        assert decision.allowed is step.allowed, (step, decision)
        if step.allowed:
            assert decision.retry_at is None and decision.countdown(now) == 0
        else:
            assert step.retry_at is not None
            expected = T0 + dt.timedelta(seconds=step.retry_at)
            assert decision.retry_at is not None
            assert abs((decision.retry_at - expected).total_seconds()) < 0.01, (step, decision)
            assert decision.countdown(now) == pytest.approx(step.retry_at - step.at, abs=0.01)
            if step.blocked_scopes is not None:
                got = tuple(sorted({n.split("/", 1)[0] for n in decision.blocked}))
                assert got == step.blocked_scopes, decision.blocked
    elif step.op == "release":
        limiter.release(keys, now)
    elif step.op == "block":
        assert step.until is not None
        limiter.block(ca_key(CA), T0 + dt.timedelta(seconds=step.until), now)
    elif step.op == "block_name":
        assert step.until is not None
        name = next(k.name for k in keys if k.scope == "new_orders")
        limiter.block(name, T0 + dt.timedelta(seconds=step.until), now)
    elif step.op == "fail":
        for n in step.names:
            limiter.record_failed_authorization(CA, n, now)
    else:  # pragma: no cover
        raise AssertionError(step.op)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_scenario(scenario: str, make_limiter: MakeLimiter) -> None:
    policy, steps = SCENARIOS[scenario]
    limiter = make_limiter(policy)
    for step in steps:
        run_step(limiter, policy, step)


def test_snapshot_shows_use_and_blocks(make_limiter: MakeLimiter) -> None:
    policy = RateLimitPolicy(Limit(4, dt.timedelta(hours=1)), Limit(50, dt.timedelta(days=7)), None, None)
    limiter = make_limiter(policy)
    keys = budget_keys("acct_1", CA, ["www.example.com"], policy)
    for _ in range(3):
        assert limiter.try_acquire(keys, T0).allowed
    limiter.block(ca_key(CA), T0 + dt.timedelta(minutes=10), T0)
    states = {s.scope: s for s in limiter.snapshot(T0)}
    assert set(states) == {"new_orders", "certs_per_domain", "ca"}
    orders = states["new_orders"]
    assert (orders.limit, orders.used, orders.remaining, orders.blocked) == (4, 3, 1, False)
    assert orders.subject == "acct_1" and orders.ca == "ca.test:14000_dir" and orders.period_seconds == H
    assert (states["certs_per_domain"].used, states["certs_per_domain"].subject) == (3, "example.com")
    assert states["ca"].blocked and states["ca"].blocked_until == T0 + dt.timedelta(minutes=10)
    later = {s.scope: s for s in limiter.snapshot(T0 + dt.timedelta(minutes=30))}
    assert later["new_orders"].used == pytest.approx(1.0)  # two of the three came back (one per 15 min)
    assert not later["ca"].blocked


def test_purge_forgets_only_idle_budgets(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(ORDERS_ONLY)
    busy = budget_keys("acct_busy", CA, ["a.example.com"], ORDERS_ONLY)
    idle = budget_keys("acct_idle", CA, ["a.example.com"], ORDERS_ONLY)
    assert limiter.try_acquire(idle, T0).allowed
    assert limiter.try_acquire(busy, T0 + dt.timedelta(minutes=50)).allowed
    limiter.block(ca_key(OTHER_CA), T0 + dt.timedelta(hours=2), T0)
    purged = limiter.purge(T0 + dt.timedelta(hours=1))
    left = {s.subject for s in limiter.snapshot(T0 + dt.timedelta(hours=1))}
    if isinstance(limiter, RedisRateLimiter):
        assert purged == 0  # Redis keys expire on their own
    else:
        assert purged == 1
        assert left == {"acct_busy", "*"}


def test_concurrent_acquire_grants_exactly_the_budget(make_limiter: MakeLimiter) -> None:
    """20 threads race for a budget of 5: exactly 5 win, on every backend."""
    policy = RateLimitPolicy(Limit(5, dt.timedelta(hours=1)), Limit(50, dt.timedelta(days=7)), None, None)
    limiter = make_limiter(policy)
    keys = budget_keys("acct_race", CA, ["race.example.com"], policy)
    barrier = threading.Barrier(20, timeout=30)
    results: list[bool] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        try:
            barrier.wait()
            decision = limiter.try_acquire(keys, T0)
            with lock:
                results.append(decision.allowed)
        except BaseException as exc:  # pragma: no cover - reported below
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(results) == 20
    assert results.count(True) == 5
    states = {s.scope: s for s in limiter.snapshot(T0)}
    assert states["new_orders"].used == 5
    assert states["certs_per_domain"].used == 5  # the losers took nothing from the other key


def test_naive_datetimes_are_refused() -> None:
    limiter = MemoryRateLimiter()
    with pytest.raises(ValueError):
        limiter.try_acquire(budget_keys("a", CA, ["x.example.com"]), dt.datetime(2030, 1, 1))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, DatabaseRateLimiter),
        ({"broker.url": "redis://127.0.0.1:6379/13"}, RedisRateLimiter),
        ({"broker.url": "redis://127.0.0.1:6379/13", "rate_limits.backend": "database"}, DatabaseRateLimiter),
    ],
)
def test_rate_limiter_for_follows_the_broker(
    overrides: dict[str, Any], expected: type, settings_factory: Callable[..., Settings], sqlite_url: str
) -> None:
    settings = settings_factory(database_url=sqlite_url, **overrides)
    limiter = rate_limiter_for(settings)
    assert isinstance(limiter, expected)
    assert limiter.policy == LETS_ENCRYPT
