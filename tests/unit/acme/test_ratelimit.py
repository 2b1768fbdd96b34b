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
    NO_RULES,
    BudgetKey,
    DatabaseRateLimiter,
    Decision,
    Limit,
    MemoryRateLimiter,
    RateLimiter,
    RateLimitPolicy,
    RateLimitRules,
    RedisRateLimiter,
    budget_keys,
    ca_key,
    keys_for_ca_problem,
    names_digest,
    policy_from_settings,
    rate_limiter_for,
    registered_domain,
)
from certqueue.config import LETS_ENCRYPT_PRODUCTION, LETS_ENCRYPT_STAGING, RateLimitSettings, Settings
from certqueue.lifecycle.ratelimit_policy import LETS_ENCRYPT_STAGING as LETS_ENCRYPT_STAGING_POLICY
from certqueue.lifecycle.ratelimit_policy import Purpose
from certqueue.models import RateBudget

CA = "https://ca.test:14000/dir"
LE = LETS_ENCRYPT_PRODUCTION
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
    keys = budget_keys("acct_1", LE, names)
    by_scope = scopes(keys)
    assert sorted(by_scope["certs_per_domain"]) == domains
    assert sorted(by_scope["failed_authz"]) == identifiers
    assert by_scope["new_orders"] == ["acct_1"]
    assert by_scope["duplicate_certs"] == [names_digest(names)]
    assert by_scope["ca"] == ["*"]
    assert [k.name for k in keys] == sorted(k.name for k in keys)
    consumed = {k.scope for k in keys if k.consume}
    assert consumed == {"new_orders", "certs_per_domain", "duplicate_certs"}


@pytest.mark.parametrize(
    ("directory", "new_orders", "per_domain", "duplicate", "failed", "consecutive"),
    [
        (LE, (300, 3 * H), (50, 7 * DAY), (5, 7 * DAY), (5, H), (1152, 1152 * DAY)),
        (LETS_ENCRYPT_STAGING, (1500, 3 * H), (30000, 7 * DAY), (30000, 7 * DAY), (200, H), (3600, 6 * H)),
        (LE + "/", (300, 3 * H), (50, 7 * DAY), (5, 7 * DAY), (5, H), (1152, 1152 * DAY)),
        (CA, (0, 0.0), (0, 0.0), (0, 0.0), (0, 0.0), (0, 0.0)),  # not Let's Encrypt: block-only keys
    ],
)
def test_budget_keys_carry_the_rules_of_the_ca(
    directory: str,
    new_orders: tuple[int, float],
    per_domain: tuple[int, float],
    duplicate: tuple[int, float],
    failed: tuple[int, float],
    consecutive: tuple[int, float],
) -> None:
    keys = {k.scope: k for k in budget_keys("acct_1", directory, ["a.example.com"])}
    got = {s: (k.limit, k.period_seconds) for s, k in keys.items()}
    assert got == {
        "ca": (0, 0.0),
        "new_orders": new_orders,
        "certs_per_domain": per_domain,
        "duplicate_certs": duplicate,
        "failed_authz": failed,
        "consecutive_failed_authz": consecutive,
    }


def test_budget_key_names() -> None:
    keys = {k.scope: k for k in budget_keys("acct_1", CA, ["a.example.com"], LETS_ENCRYPT)}
    assert keys["new_orders"].name == "new_orders/10800s/ca.test:14000_dir/acct_1"


def test_budget_keys_are_per_ca_and_per_account() -> None:
    a = {k.name for k in budget_keys("acct_1", CA, ["x.example.com"], LETS_ENCRYPT)}
    b = {k.name for k in budget_keys("acct_1", OTHER_CA, ["x.example.com"], LETS_ENCRYPT)}
    c = {k.name for k in budget_keys("acct_2", CA, ["x.example.com"], LETS_ENCRYPT)}
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


CUSTOM_10 = RateLimitPolicy(
    new_orders=Limit(10, dt.timedelta(hours=1)),
    certs_per_domain=LETS_ENCRYPT.certs_per_domain,
    duplicate_certs=None,
    failed_authz=LETS_ENCRYPT.failed_authz,
    consecutive_failed_authz=LETS_ENCRYPT.consecutive_failed_authz,
    name="custom",
)


@pytest.mark.parametrize(
    ("overrides", "directory", "expected"),
    [
        ({}, LE, LETS_ENCRYPT),
        ({}, LETS_ENCRYPT_STAGING, LETS_ENCRYPT_STAGING_POLICY),
        ({}, CA, NO_RULES),  # another CA: no client-side budget unless configured
        ({"ca_rules": [f"{CA}=letsencrypt"]}, CA, LETS_ENCRYPT),  # forced on for a test CA
        ({"ca_rules": [f"{CA}/=letsencrypt-staging"]}, CA, LETS_ENCRYPT_STAGING_POLICY),
        ({"ca_rules": ["*=letsencrypt"]}, OTHER_CA, LETS_ENCRYPT),
        ({"ca_rules": ["*=letsencrypt", f"{CA}=none"]}, CA, NO_RULES),
        ({"ca_rules": [f"{LE}=none"]}, LE, NO_RULES),
        (
            {
                "ca_rules": [f"{CA}=custom"],
                "new_orders_per_account": 10,
                "new_orders_period_hours": 1,
                "duplicate_certificates": 0,
            },
            CA,
            CUSTOM_10,
        ),
        ({"new_orders_per_account": 10}, LE, LETS_ENCRYPT),  # the custom values apply to custom CAs only
        ({"enabled": False}, LE, NO_RULES),
    ],
)
def test_rules_from_settings(overrides: dict[str, Any], directory: str, expected: RateLimitPolicy) -> None:
    assert policy_from_settings(RateLimitSettings(**overrides)).for_ca(directory) == expected


@pytest.mark.parametrize(
    "item", ["https://ca.test/dir", "https://ca.test/dir=strict", "ftp://x=none", "=none"]
)
def test_bad_ca_rules_are_refused(item: str) -> None:
    with pytest.raises(ValueError, match=r"directory|rules"):
        RateLimitSettings(ca_rules=[item])


def test_disabled_policy_still_honours_ca_blocks() -> None:
    keys = budget_keys("acct_1", CA, ["a.example.com"], NO_RULES)
    assert all(k.limit == 0 and not k.consume for k in keys)  # block-only: nothing to spend
    limiter = MemoryRateLimiter(NO_RULES)
    for _ in range(1000):
        assert limiter.try_acquire(keys, T0).allowed
    limiter.block(ca_key(CA), T0 + dt.timedelta(minutes=5))
    assert limiter.try_acquire(keys, T0) == Decision(False, T0 + dt.timedelta(minutes=5), (ca_key(CA).name,))


def test_a_ca_without_rules_blocks_only_what_its_answer_names() -> None:
    """No client-side budget, but a CA's rateLimited answer about one registered domain (with
    Retry-After) holds that domain and nothing else."""
    limiter = MemoryRateLimiter()
    keys = budget_keys("acct_1", CA, ["www.example.com"], limiter.policy)
    detail = 'too many certificates (50) already issued for "example.com" in the last 168h0m0s'
    (hit,) = keys_for_ca_problem(keys, detail)
    limiter.block(hit, T0 + dt.timedelta(hours=1), T0)
    assert not limiter.try_acquire(budget_keys("acct_1", CA, ["api.example.com"], limiter.policy), T0).allowed
    assert limiter.try_acquire(budget_keys("acct_1", CA, ["www.example.org"], limiter.policy), T0).allowed
    assert limiter.try_acquire(keys, T0 + dt.timedelta(hours=1)).allowed


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
        (
            "Your account is temporarily prevented from requesting certificates for www.example.org and "
            "possibly others. Please visit: https://portal.test/sfe/v1/unpause?jwt=x",
            "consecutive_failed_authz",
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
    "consecutive failures hold a name back before the CA would pause it; a valid one resets": (
        RateLimitPolicy(None, None, None, None, Limit(3, dt.timedelta(days=3))),
        [
            Step(0, "fail"),
            Step(10, "fail"),
            Step(20, "valid"),  # a success: the count starts again
            Step(30, "fail"),
            Step(40, "fail"),
            A(40, True),
            Step(50, "fail"),  # three in a row: orders for the name wait one refill (a day)
            A(50, False, DAY + 30, blocked_scopes=("consecutive_failed_authz",)),
            A(50, True, names=("other.example.com",)),
            Step(60, "valid"),
            A(60, True),
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
    elif step.op == "valid":
        for n in step.names:
            limiter.record_valid_authorization(CA, n, now)
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
    assert limiter.policy == RateLimitRules()
    assert limiter.policy.for_ca(LE) == LETS_ENCRYPT and limiter.policy.for_ca(CA) == NO_RULES


# --- purposes and fleets (issue 14): what a renewal is charged ------------------------------------


def _storm(limiter: RateLimiter, names: list[list[str]], purpose: Purpose, now: dt.datetime) -> list[bool]:
    return [
        limiter.try_acquire(budget_keys("acct_1", LE, n, limiter.policy, purpose=purpose), now).allowed
        for n in names
    ]


def test_a_fleet_of_300_under_one_registered_domain_renews_without_deferral(
    make_limiter: MakeLimiter,
) -> None:
    """Let's Encrypt production rules: 300 certificates under example.com were issued as the
    per-domain budget allowed (50 at once, then one every 202 minutes); sixty days later all 300
    renew in one burst. Renewals of the same names are exempt from the per-domain and new-order
    limits, so none is deferred; charged as new certificates, 250 of them would be."""
    limiter = make_limiter(RateLimitRules())
    fleet = [[f"host{i}.example.com"] for i in range(300)]
    clock = FakeClock()
    issued_at: list[dt.datetime] = []
    for names in fleet:  # the first issuance: new certificates, deferred past the budget
        while True:
            d = limiter.try_acquire(
                budget_keys("acct_1", LE, names, limiter.policy, purpose="new"), clock.now
            )
            if d.allowed:
                issued_at.append(clock.now)
                break
            assert d.retry_at is not None and "certs_per_domain" in d.blocked[0]
            clock.now = d.retry_at
    assert issued_at[49] == T0 and issued_at[50] > T0  # the budget held the 51st new certificate
    storm_at = issued_at[-1] + dt.timedelta(days=60)
    assert _storm(limiter, fleet, Purpose.RENEWAL, storm_at) == [True] * 300
    again = storm_at + dt.timedelta(days=30)
    assert _storm(limiter, fleet, Purpose.ARI_RENEWAL, again) == [True] * 300
    # what the landed code did: every renewal charged as a new certificate
    as_new = _storm(limiter, fleet, Purpose.NEW, again + dt.timedelta(days=30))
    assert as_new.count(True) == 50 and as_new.count(False) == 250


def test_renewals_still_count_toward_the_exact_set_limit() -> None:
    limiter = MemoryRateLimiter()
    names = ["www.example.com", "example.com"]
    results = _storm(limiter, [names] * 6, Purpose.RENEWAL, T0)
    assert results == [True] * 5 + [False]  # the sixth copy in 7 days: Let's Encrypt refuses it too
    assert _storm(limiter, [names], Purpose.ARI_RENEWAL, T0) == [True]  # ARI: exempt from all


def test_lets_encrypt_rules_forced_on_for_a_test_ca_defer_a_new_certificate_past_its_budget() -> None:
    """``ca_rules: [<test CA>=letsencrypt]``: the 51st new certificate under one registered domain
    waits for one unit to come back (7 days / 50 = 201.6 minutes); without the setting, the same CA
    has no client-side budget (issue 18: 60 certificates against Pebble all go through)."""
    forced = MemoryRateLimiter(policy_from_settings(RateLimitSettings(ca_rules=[f"{CA}=letsencrypt"])))
    plain = MemoryRateLimiter(policy_from_settings(RateLimitSettings()))
    for limiter, deferred in ((forced, True), (plain, False)):
        decisions = [
            limiter.try_acquire(budget_keys("acct_1", CA, [f"n{i}.example.org"], limiter.policy), T0)
            for i in range(60)
        ]
        assert [d.allowed for d in decisions[:50]] == [True] * 50
        if not deferred:
            assert all(d.allowed for d in decisions)
            continue
        assert not any(d.allowed for d in decisions[50:])
        d = decisions[50]
        assert d.blocked == ("certs_per_domain/604800s/ca.test:14000_dir/example.org",)
        assert d.retry_at == T0 + dt.timedelta(days=7) / 50
        # a renewal of one of the fifty is not held by the spent per-domain budget
        renew = budget_keys("acct_1", CA, ["n0.example.org"], limiter.policy, purpose="renewal")
        assert limiter.try_acquire(renew, T0).allowed


def test_ari_renewal_is_still_held_by_a_pause() -> None:
    limiter = MemoryRateLimiter()
    keys = budget_keys("acct_1", LE, ["www.example.com"], limiter.policy, purpose="ari_renewal")
    assert {k.scope for k in keys} == {"ca", "consecutive_failed_authz"}
    detail = "Your account is temporarily prevented from requesting certificates for www.example.com"
    for k in keys_for_ca_problem(keys, detail):
        limiter.block(k, T0 + dt.timedelta(days=1), T0)
    assert not limiter.try_acquire(keys, T0).allowed
