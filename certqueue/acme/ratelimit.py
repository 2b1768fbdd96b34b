"""Fleet-wide ACME rate limits: budgets shared by every worker, checked before anything reaches the CA.

Owns the rate-limit budgets: Redis hashes under one prefix (the distributed deployment) or the
``rate_budgets`` rows (the embedded default). Nothing else writes them.

Which budgets apply is decided per CA and per order purpose by the pure policy in
:mod:`certqueue.lifecycle.ratelimit_policy`: Let's Encrypt's documented limits for Let's Encrypt's
directories (production and staging, each with its own values), none for any other CA unless
``rate_limits.ca_rules`` assigns it rules; renewals of the same names are exempt from the two
volume limits and ARI renewals inside their window from all of them (docs/rate-limits.md).

==============================  ==============================================  ================
scope                           budget                                          consumed by
==============================  ==============================================  ================
``new_orders``                  new orders per account (per CA)                 try_acquire
``certs_per_domain``            certificates per registered domain (per CA)     try_acquire
``duplicate_certs``             certificates for the same exact set of names    try_acquire
``failed_authz``                failed authorizations per identifier (per CA)   record_failed_...
``consecutive_failed_authz``    consecutive failures per identifier (a pause)   record_failed_...
``ca``                          no budget: carries a CA-wide block only         block
==============================  ==============================================  ================

``failed_authz``, ``consecutive_failed_authz`` and ``ca`` keys are *checked* by
:meth:`RateLimiter.try_acquire` but never consumed by it (``BudgetKey.consume`` is false): an order
naming an identifier that failed five times in the last hour waits, as Let's Encrypt would refuse
it anyway; a valid authorization resets the consecutive count (``record_valid_authorization``).
A budget that the CA's rules turn off is still listed, as a block-only key (limit 0), so a CA's
``rateLimited`` answer with Retry-After holds exactly what it names.

The registered domain comes from the public suffix list bundled with the ``publicsuffixlist``
package (its data ships inside the wheel: no network at run time), private section included, as
Let's Encrypt does: ``a.example.co.uk`` and ``b.example.co.uk`` share ``example.co.uk``, while
``a.github.io`` and ``b.github.io`` are two registered domains. An IPv4 address counts as its own
registered domain and an IPv6 address as its /64, as Let's Encrypt documents.

Algorithm: GCRA (the generic cell rate algorithm), the sliding token bucket Let's Encrypt's Boulder
uses. Each key stores one timestamp, the theoretical arrival time ``tat``; with ``T = period /
limit``, a request has room when ``max(tat, now) + T - now <= period``, and consuming sets ``tat =
max(tat, now) + T``. So a full budget may be spent in one burst, and it comes back gradually, one
unit every ``T`` (not all at once at a window boundary). A ``block`` (a CA ``rateLimited`` problem
with Retry-After) stores ``blocked_until``, during which the key has no room whatever its budget.

Backends share these semantics and are atomic across processes: :class:`RedisRateLimiter` (one Lua
script per call), :class:`DatabaseRateLimiter` (``SELECT ... FOR UPDATE`` on PostgreSQL, a
``BEGIN IMMEDIATE`` write transaction on SQLite), and :class:`MemoryRateLimiter` (one process; tests).
Either every key of a request is consumed or none is.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import ipaddress
import math
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from certqueue.lifecycle.ratelimit_policy import (
    LETS_ENCRYPT,
    LETS_ENCRYPT_STAGING,
    NO_RULES,
    SCOPE_CA,
    SCOPE_CERTS_PER_DOMAIN,
    SCOPE_CONSECUTIVE_FAILED_AUTHZ,
    SCOPE_DUPLICATE,
    SCOPE_FAILED_AUTHZ,
    SCOPE_NEW_ORDERS,
    Charge,
    Limit,
    Purpose,
    RateLimitPolicy,
    RateLimitRules,
    charge,
    problem_scope,
    rules_from_settings,
)
from certqueue.models import RateBudget

if TYPE_CHECKING:
    from certqueue.config import RateLimitSettings, Settings

__all__ = [
    "LETS_ENCRYPT",
    "LETS_ENCRYPT_STAGING",
    "NO_RULES",
    "BudgetKey",
    "BudgetState",
    "DatabaseRateLimiter",
    "Decision",
    "Limit",
    "MemoryRateLimiter",
    "Purpose",
    "RateLimitPolicy",
    "RateLimitRules",
    "RateLimiter",
    "RedisRateLimiter",
    "budget_keys",
    "ca_key",
    "consecutive_failures_key",
    "failed_authz_key",
    "keys_for_ca_problem",
    "policy_from_settings",
    "rate_limiter_for",
    "registered_domain",
]

#: tolerance for float rounding in GCRA comparisons (seconds)
_EPS = 1e-6
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


# --- policy and keys (pure) -----------------------------------------------------------------------

#: what ``budget_keys`` and the limiters accept as their rules: one policy for every CA, or per CA
Rules = RateLimitPolicy | RateLimitRules

#: the default rules: Let's Encrypt's for Let's Encrypt's directories, none for any other CA
DEFAULT_RULES = RateLimitRules()


def as_rules(rules: Rules | None) -> RateLimitRules:
    """``rules`` as per-CA rules; a single policy applies to every CA (tests, one-CA tools)."""
    if rules is None:
        return DEFAULT_RULES
    if isinstance(rules, RateLimitPolicy):
        return RateLimitRules.everywhere(rules)
    return rules


def policy_for(rules: Rules | None, directory_url: str) -> RateLimitPolicy:
    """The policy that applies to the CA at ``directory_url``."""
    return as_rules(rules).for_ca(directory_url)


def policy_from_settings(settings: RateLimitSettings, extra_rules: Sequence[str] = ()) -> RateLimitRules:
    """The per-CA rules of the ``rate_limits`` settings section (see ``lifecycle.ratelimit_policy``),
    after the named issuers' own (``extra_rules``)."""
    return rules_from_settings(settings, extra_rules)


@dataclass(frozen=True)
class BudgetKey:
    """One budget: ``name`` is its storage key, ``"<scope>/<period>s/<ca>/<subject>"``.

    ``limit`` and ``period_seconds`` travel with the key, so backends need no policy; ``limit`` 0 is
    a block-only key. ``consume`` false: checked by ``try_acquire`` but not consumed.
    """

    scope: str
    ca: str
    subject: str
    limit: int
    period_seconds: float
    consume: bool = True

    @property
    def name(self) -> str:
        return f"{self.scope}/{int(self.period_seconds)}s/{self.ca}/{self.subject}"

    @property
    def interval(self) -> float:
        """Seconds for one unit to come back (GCRA's emission interval); 0 for block-only keys."""
        return self.period_seconds / self.limit if self.limit > 0 else 0.0


def ca_label(directory_url: str) -> str:
    """A readable, stable label of a CA: ``acme-v02.api.letsencrypt.org_directory``."""
    parts = urlsplit(directory_url)
    label = f"{parts.netloc}{parts.path}".lower().replace("/", "_").rstrip("_")
    return label or hashlib.sha256(directory_url.encode()).hexdigest()[:16]


def _key(scope: str, directory_url: str, subject: str, limit: Limit | None, consume: bool) -> BudgetKey:
    if limit is None:
        return BudgetKey(scope, ca_label(directory_url), subject, 0, 0.0, consume=False)
    return BudgetKey(
        scope, ca_label(directory_url), subject, limit.count, limit.period.total_seconds(), consume=consume
    )


def ca_key(directory_url: str) -> BudgetKey:
    """The block-only key of a whole CA: ``block(ca_key(url), until)`` stops every order to it."""
    return BudgetKey(SCOPE_CA, ca_label(directory_url), "*", 0, 0.0, consume=False)


def _normalise(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _base_identifier(name: str) -> str:
    """The authorization identifier of a name: ``*.example.com`` is validated as ``example.com``."""
    name = _normalise(name)
    return name[2:] if name.startswith("*.") else name


def failed_authz_key(
    directory_url: str, identifier: str, policy: Rules | None = None, *, consume: bool = False
) -> BudgetKey | None:
    """The failed-authorization budget of ``identifier`` at a CA; None when that limit is off."""
    limit = policy_for(policy, directory_url).failed_authz
    if limit is None:
        return None
    return _key(SCOPE_FAILED_AUTHZ, directory_url, _base_identifier(identifier), limit, consume)


def consecutive_failures_key(
    directory_url: str, identifier: str, policy: Rules | None = None, *, consume: bool = False
) -> BudgetKey:
    """The consecutive-failure budget of ``identifier`` at a CA (what pauses it at Let's Encrypt).

    Always a key: with the limit off it is block-only, so a CA's pause answer still holds the name.
    """
    limit = policy_for(policy, directory_url).consecutive_failed_authz
    return _key(SCOPE_CONSECUTIVE_FAILED_AUTHZ, directory_url, _base_identifier(identifier), limit, consume)


def registered_domain(name: str) -> str:
    """The registered domain of a DNS name (public suffix list, private section included), or of an
    IP address (IPv4: itself; IPv6: its /64). A name that is itself a public suffix is its own."""
    name = _base_identifier(name)
    try:
        ip = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        pass
    else:
        if ip.version == 6:
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
        return str(ip)
    from certqueue.validation import public_suffixes

    private = public_suffixes().privatesuffix(name)
    return str(private) if private else name


def names_digest(names: Iterable[str]) -> str:
    """Identifies an exact set of names, ignoring case, order and repeats (LE's duplicate rule)."""
    canonical = ",".join(sorted({_normalise(n) for n in names}))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def budget_keys(
    account_id: str | int,
    directory_url: str,
    names: Sequence[str],
    policy: Rules | None = None,
    *,
    purpose: Purpose | str = Purpose.NEW,
) -> list[BudgetKey]:
    """Every budget one new order for ``names`` through this account at this CA draws on.

    Pure. ``policy`` is the limiter's rules (``limiter.policy``: per CA) or one policy; ``purpose``
    (``lifecycle.ratelimit_policy.classify_order``) decides what is consumed, only checked, or left
    out (``charge``). A budget the CA's rules turn off is still listed as a block-only key (limit 0,
    never consumed), so the CA's own ``rateLimited`` answer for it holds what it names and nothing
    else; a budget the purpose is exempt from is not listed at all. Sorted by ``name`` (backends
    lock in that order). The keys do not depend on the clock: GCRA's windows slide.
    """
    if not names:
        raise ValueError("an order needs at least one name")
    rules = policy_for(policy, directory_url)
    purpose = Purpose(purpose)

    def add(scope: str, subject: str) -> None:
        how = charge(purpose, scope)
        if how is not Charge.EXEMPT:
            keys.append(_key(scope, directory_url, subject, rules.limit(scope), how is Charge.SPEND))

    keys = [ca_key(directory_url)]
    add(SCOPE_NEW_ORDERS, str(account_id))
    for domain in sorted({registered_domain(n) for n in names}):
        add(SCOPE_CERTS_PER_DOMAIN, domain)
    add(SCOPE_DUPLICATE, names_digest(names))
    for ident in sorted({_base_identifier(n) for n in names}):
        add(SCOPE_FAILED_AUTHZ, ident)
        add(SCOPE_CONSECUTIVE_FAILED_AUTHZ, ident)
    return sorted(keys, key=lambda k: k.name)


def keys_for_ca_problem(keys: Sequence[BudgetKey], detail: str | None) -> list[BudgetKey]:
    """Which of an order's keys a CA ``rateLimited`` problem is about, read from its ``detail``.

    Falls back to the order's ``new_orders`` key (this account at this CA) and, if there is none (a
    renewal), the CA-wide key, so an unknown limit blocks what sent the request rather than nothing.
    A pause ("temporarily prevented from requesting certificates for a.example, b.example") holds
    the consecutive-failure keys of the names it lists (all of the order's when it lists none).
    """
    text = (detail or "").lower()
    scope = problem_scope(detail)
    if scope is not None:
        hit = [k for k in keys if k.scope == scope]
        if scope == SCOPE_CONSECUTIVE_FAILED_AUTHZ:
            named = [k for k in hit if _mentions(text, k.subject)]
        else:
            named = [k for k in hit if f'"{k.subject}"' in text]  # LE quotes the name it counts
        if named or hit:
            return named or hit
    fallback = [k for k in keys if k.scope == SCOPE_NEW_ORDERS] or [k for k in keys if k.scope == SCOPE_CA]
    return fallback


def _mentions(text: str, name: str) -> bool:
    """``name`` appears in ``text`` as a whole name (not inside a longer one)."""
    import re

    return re.search(rf"(?<![a-z0-9.-]){re.escape(name)}(?![a-z0-9-]|\.[a-z0-9])", text) is not None


def parse_key_name(name: str) -> tuple[str, float, str, str]:
    """``"<scope>/<period>s/<ca>/<subject>"`` -> (scope, period seconds, ca, subject)."""
    scope, period, ca, subject = name.split("/", 3)
    return scope, float(period.rstrip("s")), ca, subject


# --- decisions (pure GCRA) ------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """The answer of ``try_acquire``. When not allowed, ``retry_at`` is the earliest moment every
    blocking key has room again (the latest of their own times) and ``blocked`` names them."""

    allowed: bool
    retry_at: dt.datetime | None = None
    blocked: tuple[str, ...] = ()

    def countdown(self, now: dt.datetime) -> float:
        """Seconds to wait before asking again (0 when allowed): a Celery retry countdown."""
        if self.allowed or self.retry_at is None:
            return 0.0
        return max(0.0, (self.retry_at - now).total_seconds())


@dataclass(frozen=True)
class BudgetState:
    """One budget as seen at ``at`` (metrics, ``certqueue status``)."""

    key: str
    scope: str
    ca: str
    subject: str
    limit: int
    period_seconds: float
    used: float
    blocked_until: dt.datetime | None
    at: dt.datetime

    @property
    def remaining(self) -> float:
        return max(0.0, self.limit - self.used) if self.limit > 0 else 0.0

    @property
    def blocked(self) -> bool:
        return self.blocked_until is not None and self.blocked_until > self.at


@dataclass
class _Cell:
    """The stored state of one key, as epoch seconds (tat 0: empty)."""

    tat: float = 0.0
    blocked_until: float | None = None


def _ts(when: dt.datetime) -> float:
    if when.tzinfo is None:
        raise ValueError("naive datetime given; use timezone-aware UTC datetimes")
    return when.timestamp()


def _dt(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


def _ready_at(key: BudgetKey, cell: _Cell, now: float) -> float | None:
    """None when ``key`` has room at ``now``, else when it will."""
    ready: float | None = None
    if cell.blocked_until is not None and cell.blocked_until > now:
        ready = cell.blocked_until
    if key.limit > 0:
        new_tat = max(cell.tat, now) + key.interval
        if new_tat - now > key.period_seconds + _EPS:
            room_at = new_tat - key.period_seconds
            ready = room_at if ready is None else max(ready, room_at)
    return ready


def _decide(keys: Sequence[BudgetKey], cells: Sequence[_Cell], now: float) -> tuple[Decision, list[_Cell]]:
    """The decision for ``keys`` with their stored ``cells``, and the cells to store if allowed."""
    waits = [(k, _ready_at(k, c, now)) for k, c in zip(keys, cells, strict=True)]
    blocked = [(k, t) for k, t in waits if t is not None]
    if blocked:
        retry = max(t for _, t in blocked)
        return Decision(False, _dt(retry), tuple(k.name for k, _ in blocked)), list(cells)
    updated = [
        _Cell(max(c.tat, now) + k.interval, c.blocked_until) if k.consume and k.limit > 0 else c
        for k, c in zip(keys, cells, strict=True)
    ]
    return Decision(True), updated


def _released(key: BudgetKey, cell: _Cell, now: float) -> _Cell:
    if not key.consume or key.limit <= 0:
        return cell
    return _Cell(max(cell.tat - key.interval, now), cell.blocked_until)


def _recorded_failure(key: BudgetKey, cell: _Cell, now: float) -> _Cell:
    # always counted (the CA saw the failure), but never more than one full period of debt
    tat = min(max(cell.tat, now) + key.interval, now + key.period_seconds)
    return _Cell(tat, cell.blocked_until)


def _blocked(cell: _Cell, until: float) -> _Cell:
    return _Cell(cell.tat, max(cell.blocked_until or 0.0, until))


def _state(name: str, limit: int, cell: _Cell, now: float) -> BudgetState:
    scope, period, ca, subject = parse_key_name(name)
    interval = period / limit if limit > 0 else 0.0
    used = max(0.0, cell.tat - now) / interval if interval else 0.0
    return BudgetState(
        key=name,
        scope=scope,
        ca=ca,
        subject=subject,
        limit=limit,
        period_seconds=period,
        used=min(float(limit), round(used, 3)),
        blocked_until=_dt(cell.blocked_until) if cell.blocked_until else None,
        at=_dt(now),
    )


def _now(now: dt.datetime | None) -> float:
    return _ts(now) if now is not None else dt.datetime.now(dt.UTC).timestamp()


def _failure_keys(directory_url: str, identifier: str, rules: RateLimitRules) -> list[BudgetKey]:
    """The budgets one failed authorization of ``identifier`` consumes (those that are on)."""
    keys = [
        failed_authz_key(directory_url, identifier, rules, consume=True),
        consecutive_failures_key(directory_url, identifier, rules, consume=True),
    ]
    return [k for k in keys if k is not None and k.limit > 0]


# --- the interface --------------------------------------------------------------------------------


class RateLimiter(Protocol):
    """Shared budgets. Every method is atomic across threads and processes."""

    #: the per-CA rules (``budget_keys(..., limiter.policy)`` resolves the order's CA in them)
    policy: RateLimitRules

    def try_acquire(self, keys: Sequence[BudgetKey], now: dt.datetime) -> Decision:
        """All keys have room: consume one unit from each consuming key, allowed. Otherwise consume
        nothing, not allowed, with ``retry_at``."""
        ...

    def release(self, keys: Sequence[BudgetKey], now: dt.datetime | None = None) -> None:
        """Give back what ``try_acquire`` took (the order could not be created)."""
        ...

    def record_failed_authorization(self, directory_url: str, identifier: str, now: dt.datetime) -> None:
        """Count one failed authorization of ``identifier`` at this CA (and one consecutive one)."""
        ...

    def record_valid_authorization(self, directory_url: str, identifier: str, now: dt.datetime) -> None:
        """``identifier`` was validated at this CA: its consecutive failures start again from zero."""
        ...

    def block(self, key: BudgetKey | str, until: dt.datetime, now: dt.datetime | None = None) -> None:
        """No room in ``key`` (a key or its name) before ``until`` (a CA's Retry-After)."""
        ...

    def snapshot(self, now: dt.datetime | None = None) -> list[BudgetState]:
        """Every stored budget, sorted by key."""
        ...

    def purge(self, now: dt.datetime | None = None) -> int:
        """Forget budgets that are full again and unblocked; returns how many."""
        ...


class _Base:
    """``release``, ``block`` and ``record_failed_authorization`` in terms of the backend's ``_apply``."""

    policy: RateLimitRules

    def _apply(
        self, keys: Sequence[BudgetKey], now: float, change: Callable[[BudgetKey, _Cell], _Cell]
    ) -> None:
        raise NotImplementedError

    def record_failed_authorization(self, directory_url: str, identifier: str, now: dt.datetime) -> None:
        keys = _failure_keys(directory_url, identifier, self.policy)
        if keys:
            t = _ts(now)
            self._apply(keys, t, lambda k, c: _recorded_failure(k, c, t))

    def record_valid_authorization(self, directory_url: str, identifier: str, now: dt.datetime) -> None:
        key = consecutive_failures_key(directory_url, identifier, self.policy, consume=True)
        if key.limit > 0:
            self._apply([key], _ts(now), lambda k, c: _Cell(0.0, c.blocked_until))

    def release(self, keys: Sequence[BudgetKey], now: dt.datetime | None = None) -> None:
        t = _now(now)
        consumed = [k for k in keys if k.consume and k.limit > 0]
        if consumed:
            self._apply(consumed, t, lambda k, c: _released(k, c, t))

    def block(self, key: BudgetKey | str, until: dt.datetime, now: dt.datetime | None = None) -> None:
        if isinstance(key, str):
            scope, period, ca, subject = parse_key_name(key)
            key = BudgetKey(scope, ca, subject, 0, period, consume=False)
        u = _ts(until)
        self._apply([key], _now(now), lambda k, c: _blocked(c, u))


# --- one process ----------------------------------------------------------------------------------


class MemoryRateLimiter(_Base):
    """Budgets in this process only (tests, single-process tools). Thread-safe."""

    def __init__(self, policy: Rules | None = None) -> None:
        self.policy = as_rules(policy)
        self._lock = threading.Lock()
        self._cells: dict[str, tuple[int, _Cell]] = {}

    def try_acquire(self, keys: Sequence[BudgetKey], now: dt.datetime) -> Decision:
        t = _ts(now)
        with self._lock:
            cells = [self._cells.get(k.name, (k.limit, _Cell()))[1] for k in keys]
            decision, updated = _decide(keys, cells, t)
            if decision.allowed:
                for k, c in zip(keys, updated, strict=True):
                    if k.consume and k.limit > 0:
                        self._cells[k.name] = (k.limit, c)
            return decision

    def _apply(
        self, keys: Sequence[BudgetKey], now: float, change: Callable[[BudgetKey, _Cell], _Cell]
    ) -> None:
        with self._lock:
            for k in keys:
                limit, cell = self._cells.get(k.name, (k.limit, _Cell()))
                self._cells[k.name] = (max(limit, k.limit), change(k, cell))

    def snapshot(self, now: dt.datetime | None = None) -> list[BudgetState]:
        t = _now(now)
        with self._lock:
            return [_state(n, lim, c, t) for n, (lim, c) in sorted(self._cells.items())]

    def purge(self, now: dt.datetime | None = None) -> int:
        t = _now(now)
        with self._lock:
            idle = [n for n, (_, c) in self._cells.items() if c.tat <= t and (c.blocked_until or 0) <= t]
            for n in idle:
                del self._cells[n]
            return len(idle)


# --- the database (embedded default) --------------------------------------------------------------


class DatabaseRateLimiter(_Base):
    """Budgets in ``rate_budgets``: ``window_start`` holds GCRA's ``tat``, ``used`` the units in use
    when last written (informational), ``limit`` the key's limit, ``blocked_until`` the block.

    ``session_factory`` returns a new write session (``certqueue.db.sessionmaker_for(url)``): on
    SQLite its transactions begin with ``BEGIN IMMEDIATE``, which serialises writers; on PostgreSQL the
    rows are locked with ``SELECT ... FOR UPDATE`` in key order, after inserting missing rows with
    ``ON CONFLICT DO NOTHING`` (so two first requests cannot both see "no row").
    """

    def __init__(self, session_factory: Callable[[], Session], policy: Rules | None = None) -> None:
        self.session_factory = session_factory
        self.policy = as_rules(policy)

    def _locked_rows(
        self, session: Session, keys: Sequence[BudgetKey], create: Sequence[BudgetKey]
    ) -> dict[str, RateBudget]:
        """The rows of ``keys``, locked (PostgreSQL) in key order; rows of ``create`` are made first
        if missing. A key without a row reads as empty and unblocked."""
        dialect = session.get_bind().dialect.name
        if create:
            values = [
                {"key": k.name, "window_start": _EPOCH, "used": 0, "limit": float(k.limit)} for k in create
            ]
            if dialect == "postgresql":
                from sqlalchemy.dialects.postgresql import insert as pg_insert

                stmt: Any = pg_insert(RateBudget)
            elif dialect == "sqlite":
                from sqlalchemy.dialects.sqlite import insert as sqlite_insert

                stmt = sqlite_insert(RateBudget)
            else:  # pragma: no cover - only the two supported databases
                raise RuntimeError(f"rate limits need PostgreSQL or SQLite, not {dialect}")
            session.execute(stmt.values(values).on_conflict_do_nothing(index_elements=["key"]))
        query = select(RateBudget).where(RateBudget.key.in_([k.name for k in keys])).order_by(RateBudget.key)
        if dialect == "postgresql":
            query = query.with_for_update()
        return {row.key: row for row in session.execute(query).scalars()}

    @staticmethod
    def _cell(row: RateBudget | None) -> _Cell:
        if row is None:
            return _Cell()
        return _Cell(_ts(row.window_start), _ts(row.blocked_until) if row.blocked_until else None)

    @staticmethod
    def _store(row: RateBudget, key: BudgetKey, cell: _Cell, now: float) -> None:
        row.window_start = _dt(cell.tat)
        row.blocked_until = _dt(cell.blocked_until) if cell.blocked_until else None
        row.limit = float(max(int(row.limit or 0), key.limit))
        row.used = math.ceil(max(0.0, cell.tat - now) / key.interval - _EPS) if key.interval else 0

    @staticmethod
    def _dedupe(keys: Sequence[BudgetKey]) -> list[BudgetKey]:
        seen: dict[str, BudgetKey] = {}
        for k in keys:
            seen.setdefault(k.name, k)
        return [seen[n] for n in sorted(seen)]

    def bound(self, session: Session) -> DatabaseRateLimiter:
        """This limiter working inside ``session``'s transaction (a savepoint), not a new one.

        On SQLite the caller's write transaction already holds the database's only write lock, so a
        second session would wait for it forever: a task must use this. (On PostgreSQL a separate,
        short transaction is better: the budget rows are not held locked while the CA is called.)
        """
        view = copy.copy(self)
        view._session = session
        return view

    _session: Session | None = None

    def _transaction(self, work: Callable[[Session], Any]) -> Any:
        if self._session is not None:
            with self._session.begin_nested():
                return work(self._session)
        session = self.session_factory()
        try:
            result = work(session)
            session.commit()
            return result
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def try_acquire(self, keys: Sequence[BudgetKey], now: dt.datetime) -> Decision:
        t = _ts(now)
        keys = self._dedupe(keys)
        consumed = [k for k in keys if k.consume and k.limit > 0]

        def work(session: Session) -> Decision:
            rows = self._locked_rows(session, keys, create=consumed)
            decision, updated = _decide(keys, [self._cell(rows.get(k.name)) for k in keys], t)
            if decision.allowed:
                for k, c in zip(keys, updated, strict=True):
                    if k.consume and k.limit > 0:
                        self._store(rows[k.name], k, c, t)
            return decision

        decision: Decision = self._transaction(work)
        return decision

    def _apply(
        self, keys: Sequence[BudgetKey], now: float, change: Callable[[BudgetKey, _Cell], _Cell]
    ) -> None:
        keys = self._dedupe(keys)

        def work(session: Session) -> None:
            rows = self._locked_rows(session, keys, create=keys)
            for k in keys:
                self._store(rows[k.name], k, change(k, self._cell(rows[k.name])), now)

        self._transaction(work)

    def snapshot(self, now: dt.datetime | None = None) -> list[BudgetState]:
        t = _now(now)
        session = self.session_factory()
        try:
            rows = session.execute(select(RateBudget).order_by(RateBudget.key)).scalars().all()
            return [_state(r.key, int(r.limit or 0), self._cell(r), t) for r in rows]
        finally:
            session.rollback()
            session.close()

    def purge(self, now: dt.datetime | None = None) -> int:
        when = _dt(_now(now))

        def work(session: Session) -> int:
            query = select(RateBudget).where(RateBudget.window_start <= when)
            rows = session.execute(query).scalars().all()
            idle = [r for r in rows if r.blocked_until is None or r.blocked_until <= when]
            for r in idle:
                session.delete(r)
            return len(idle)

        count: int = self._transaction(work)
        return count


# --- Redis (distributed deployment) ---------------------------------------------------------------

# KEYS: one hash per budget. ARGV: mode, now, then per key: limit, period, consume(0/1), param.
# mode "acquire": all-or-nothing GCRA; returns {1} or {0, retry_at, i1, i2, ...} (blocked indexes).
# mode "release" / "fail" / "block" / "reset": apply to every key; returns {1}.
# Numbers cross the Lua boundary as strings ("%.17g") to keep sub-millisecond precision.
_LUA = """
local mode = ARGV[1]
local now = tonumber(ARGV[2])
local eps = 0.000001
local n = #KEYS
local lim, per, cons, par, tat, bu = {}, {}, {}, {}, {}, {}
for i = 1, n do
  local b = 2 + (i - 1) * 4
  lim[i] = tonumber(ARGV[b + 1]); per[i] = tonumber(ARGV[b + 2])
  cons[i] = ARGV[b + 3] == "1"; par[i] = tonumber(ARGV[b + 4])
  local h = redis.call("HMGET", KEYS[i], "tat", "blocked_until")
  tat[i] = tonumber(h[1]) or 0
  bu[i] = tonumber(h[2])
end
local function fmt(x) return string.format("%.17g", x) end
local function store(i)
  local stored = tonumber(redis.call("HGET", KEYS[i], "limit")) or 0
  local l = lim[i]
  if stored > l then l = stored end
  redis.call("HSET", KEYS[i], "tat", fmt(tat[i]), "limit", tostring(l))
  if bu[i] then redis.call("HSET", KEYS[i], "blocked_until", fmt(bu[i])) end
  local last = tat[i]
  if bu[i] and bu[i] > last then last = bu[i] end
  local ttl = math.ceil(last - now + 3600)
  if ttl < 3600 then ttl = 3600 end
  redis.call("EXPIRE", KEYS[i], ttl)
end
if mode == "acquire" then
  local retry = nil
  local blocked = {}
  for i = 1, n do
    local ready = nil
    if bu[i] and bu[i] > now then ready = bu[i] end
    if lim[i] > 0 then
      local t = tat[i]; if t < now then t = now end
      local new_tat = t + per[i] / lim[i]
      if new_tat - now > per[i] + eps then
        local r = new_tat - per[i]
        if ready == nil or r > ready then ready = r end
      end
    end
    if ready ~= nil then
      table.insert(blocked, i)
      if retry == nil or ready > retry then retry = ready end
    end
  end
  if retry ~= nil then
    local out = {0, fmt(retry)}
    for _, i in ipairs(blocked) do table.insert(out, i) end
    return out
  end
  for i = 1, n do
    if cons[i] and lim[i] > 0 then
      local t = tat[i]; if t < now then t = now end
      tat[i] = t + per[i] / lim[i]
      store(i)
    end
  end
  return {1}
end
for i = 1, n do
  if mode == "release" then
    if cons[i] and lim[i] > 0 then
      local t = tat[i] - per[i] / lim[i]
      if t < now then t = now end
      tat[i] = t
    end
  elseif mode == "fail" then
    local t = tat[i]; if t < now then t = now end
    t = t + per[i] / lim[i]
    if t > now + per[i] then t = now + per[i] end
    tat[i] = t
  elseif mode == "block" then
    if bu[i] == nil or par[i] > bu[i] then bu[i] = par[i] end
  elseif mode == "reset" then
    tat[i] = 0
  end
  store(i)
end
return {1}
"""


class RedisRateLimiter:
    """Budgets in Redis hashes ``{<prefix>}:<key name>`` (fields ``tat``, ``blocked_until``,
    ``limit``), changed only by one Lua script, so every call is atomic. The braces make the prefix
    a Redis Cluster hash tag: all budgets live in one slot, as a multi-key script needs. Keys expire
    an hour after their budget is full again and their block is over.
    """

    def __init__(
        self, redis_client: Any, prefix: str = "certqueue:ratelimit", policy: Rules | None = None
    ) -> None:
        self.redis = redis_client
        self.prefix = prefix
        self.policy = as_rules(policy)
        self._script = redis_client.register_script(_LUA)

    def _hash(self, name: str) -> str:
        return f"{{{self.prefix}}}:{name}"

    def _run(self, mode: str, keys: Sequence[BudgetKey], now: float, param: float = 0.0) -> list[Any]:
        args: list[Any] = [mode, repr(now)]
        for k in keys:
            args += [k.limit, repr(k.period_seconds), "1" if k.consume else "0", repr(param)]
        result: list[Any] = self._script(keys=[self._hash(k.name) for k in keys], args=args)
        return result

    def try_acquire(self, keys: Sequence[BudgetKey], now: dt.datetime) -> Decision:
        keys = list({k.name: k for k in keys}.values())
        result = self._run("acquire", keys, _ts(now))
        if int(result[0]) == 1:
            return Decision(True)
        retry = float(result[1])
        blocked = tuple(keys[int(i) - 1].name for i in result[2:])
        return Decision(False, _dt(retry), blocked)

    def release(self, keys: Sequence[BudgetKey], now: dt.datetime | None = None) -> None:
        consumed = list({k.name: k for k in keys if k.consume and k.limit > 0}.values())
        if consumed:
            self._run("release", consumed, _now(now))

    def record_failed_authorization(self, directory_url: str, identifier: str, now: dt.datetime) -> None:
        keys = _failure_keys(directory_url, identifier, self.policy)
        if keys:
            self._run("fail", keys, _ts(now))

    def record_valid_authorization(self, directory_url: str, identifier: str, now: dt.datetime) -> None:
        key = consecutive_failures_key(directory_url, identifier, self.policy, consume=True)
        if key.limit > 0:
            self._run("reset", [key], _ts(now))

    def block(self, key: BudgetKey | str, until: dt.datetime, now: dt.datetime | None = None) -> None:
        if isinstance(key, str):
            scope, period, ca, subject = parse_key_name(key)
            key = BudgetKey(scope, ca, subject, 0, period, consume=False)
        self._run("block", [replace(key, consume=False)], _now(now), _ts(until))

    def _scan(self) -> list[str]:
        pattern = self._hash("*")
        return sorted(k.decode() if isinstance(k, bytes) else str(k) for k in self.redis.scan_iter(pattern))

    def snapshot(self, now: dt.datetime | None = None) -> list[BudgetState]:
        t = _now(now)
        out = []
        strip = len(self._hash(""))
        for hkey in self._scan():
            data = {
                (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                for k, v in self.redis.hgetall(hkey).items()
            }
            if not data:
                continue  # expired between the scan and the read
            bu = float(data["blocked_until"]) if data.get("blocked_until") else None
            cell = _Cell(float(data.get("tat") or 0.0), bu)
            out.append(_state(hkey[strip:], int(float(data.get("limit") or 0)), cell, t))
        return out

    def purge(self, now: dt.datetime | None = None) -> int:
        return 0  # keys expire by themselves


# --- choosing a backend ---------------------------------------------------------------------------


def rate_limiter_for(settings: Settings) -> RateLimiter:
    """Redis when the broker is Redis (every worker shares it), else the database."""
    from certqueue.issuers import ca_rules

    rl = settings.rate_limits
    policy = policy_from_settings(rl, ca_rules(settings))
    url = settings.broker.url
    backend = rl.backend
    if backend == "auto":
        backend = "redis" if url.startswith(("redis://", "rediss://", "unix://")) else "database"
    if backend == "redis":
        import redis

        client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        return RedisRateLimiter(client, rl.redis_prefix, policy)
    from certqueue import db

    return DatabaseRateLimiter(db.sessionmaker_for(settings.database.url), policy)
