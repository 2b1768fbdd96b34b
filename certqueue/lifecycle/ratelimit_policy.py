"""Which client-side rate limits an ACME order draws on: per CA, per purpose. Pure policy.

Owns no state. The budgets themselves (GCRA cells, blocks) live in :mod:`certqueue.acme.ratelimit`;
this module decides, from the CA's directory URL, the settings and the order's purpose, which
budgets an order is checked against and which it consumes.

**Rules follow the CA.** Let's Encrypt's documented limits apply to Let's Encrypt's two directories
(production and staging, each with its own values) and to no other CA unless the settings say so
(``rate_limits.ca_rules``: ``"<directory>=letsencrypt|letsencrypt-staging|custom|none"``, ``*`` for
every other CA). A CA with no rules gets no client-side budget at all; its own ``rateLimited``
answers and Retry-After still block what they name (block-only keys, see ``budget_keys``).

**Purposes** (Let's Encrypt, "Limit Exemptions for Renewals", and Boulder's ``wfe.NewOrder``):

================  ============================================================================
``new``           anything else: checked against and consumes every budget
``renewal``       the exact same set of names as a certificate this CA issued within 120 days:
                  exempt from *new orders per account* and *certificates per registered domain*
                  (neither checked nor consumed, as Boulder does); still subject to the exact-set
                  (duplicate) limit and to the authorization-failure limits
``ari_renewal``   sent with ARI ``replaces`` naming a certificate this CA issued that shares a name
                  with the order, inside its suggested renewal window: exempt from every limit.
                  Only a pause (consecutive authorization failures) still stops it: Boulder
                  checks pauses before it looks at ``replaces``
================  ============================================================================

The values, read from letsencrypt.org on 2026-12-01 (docs/rate-limits.md cites them), are in
:data:`LETS_ENCRYPT` and :data:`LETS_ENCRYPT_STAGING`.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

LETS_ENCRYPT_PRODUCTION_URL = "https://acme-v02.api.letsencrypt.org/directory"
LETS_ENCRYPT_STAGING_URL = "https://acme-staging-v02.api.letsencrypt.org/directory"

SCOPE_NEW_ORDERS = "new_orders"
SCOPE_CERTS_PER_DOMAIN = "certs_per_domain"
SCOPE_DUPLICATE = "duplicate_certs"
SCOPE_FAILED_AUTHZ = "failed_authz"
SCOPE_CONSECUTIVE_FAILED_AUTHZ = "consecutive_failed_authz"
SCOPE_CA = "ca"

#: the budgets an order can draw on, in the order they are reported
ORDER_SCOPES = (
    SCOPE_NEW_ORDERS,
    SCOPE_CERTS_PER_DOMAIN,
    SCOPE_DUPLICATE,
    SCOPE_FAILED_AUTHZ,
    SCOPE_CONSECUTIVE_FAILED_AUTHZ,
)

#: Boulder counts an order as a renewal when the exact set was issued within this long
RENEWAL_LOOKBACK = dt.timedelta(days=120)


@dataclass(frozen=True)
class Limit:
    """``count`` units per ``period``, refilling continuously (one every ``period / count``)."""

    count: int
    period: dt.timedelta

    def __post_init__(self) -> None:
        if self.count < 1 or self.period <= dt.timedelta(0):
            raise ValueError("a limit needs count >= 1 and a positive period")

    def describe(self) -> str:
        return f"{self.count} per {_period_text(self.period)}"


def _period_text(period: dt.timedelta) -> str:
    seconds = period.total_seconds()
    for unit, size in (("days", 86400.0), ("hours", 3600.0), ("minutes", 60.0)):
        if seconds >= size and seconds % size == 0:
            n = int(seconds // size)
            return f"{n} {unit[:-1] if n == 1 else unit}"
    return f"{seconds:g} seconds"


@dataclass(frozen=True)
class RateLimitPolicy:
    """One CA's budgets; ``None`` turns one off (the CA's own blocks are honoured regardless).

    ``name`` says where the values come from: ``letsencrypt``, ``letsencrypt-staging``, ``custom``
    (the ``rate_limits`` settings) or ``none``.
    """

    new_orders: Limit | None = None
    certs_per_domain: Limit | None = None
    duplicate_certs: Limit | None = None
    failed_authz: Limit | None = None
    consecutive_failed_authz: Limit | None = None
    name: str = "custom"

    def limit(self, scope: str) -> Limit | None:
        value = getattr(self, scope, None)
        return value if isinstance(value, Limit) else None

    @property
    def empty(self) -> bool:
        return all(self.limit(s) is None for s in ORDER_SCOPES)


#: Let's Encrypt production (letsencrypt.org/docs/rate-limits, lastmod 2026-08-05, read 2026-12-01).
#: Consecutive authorization failures: 1,152, refilling one a day, reset by a valid authorization.
LETS_ENCRYPT = RateLimitPolicy(
    new_orders=Limit(300, dt.timedelta(hours=3)),
    certs_per_domain=Limit(50, dt.timedelta(days=7)),
    duplicate_certs=Limit(5, dt.timedelta(days=7)),
    failed_authz=Limit(5, dt.timedelta(hours=1)),
    consecutive_failed_authz=Limit(1152, dt.timedelta(days=1152)),
    name="letsencrypt",
)

#: Let's Encrypt staging (letsencrypt.org/docs/staging-environment, lastmod 2026-04-10, read
#: 2026-12-01). The page gives "30000 per second" for certificates per registered domain, which we
#: read as the week it was before (a slip of the page; either way no fleet reaches it).
LETS_ENCRYPT_STAGING = RateLimitPolicy(
    new_orders=Limit(1500, dt.timedelta(hours=3)),
    certs_per_domain=Limit(30000, dt.timedelta(days=7)),
    duplicate_certs=Limit(30000, dt.timedelta(days=7)),
    failed_authz=Limit(200, dt.timedelta(hours=1)),
    consecutive_failed_authz=Limit(3600, dt.timedelta(hours=6)),
    name="letsencrypt-staging",
)

NO_RULES = RateLimitPolicy(name="none")

BUILTIN = {"letsencrypt": LETS_ENCRYPT, "letsencrypt-staging": LETS_ENCRYPT_STAGING, "none": NO_RULES}
RULE_NAMES = ("letsencrypt", "letsencrypt-staging", "custom", "none")
WILDCARD = "*"


def normalise_directory(url: str) -> str:
    """A directory URL compared loosely: scheme and host lower case, no trailing slash."""
    url = url.strip()
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url.rstrip("/")
    host, slash, path = rest.partition("/")
    return f"{scheme.lower()}://{host.lower()}{slash}{path}".rstrip("/")


@dataclass(frozen=True)
class RateLimitRules:
    """Which :class:`RateLimitPolicy` applies to which CA directory.

    ``assignments`` maps normalised directory URLs (or ``*``) to policies; Let's Encrypt's two
    directories have their own rules unless assigned otherwise; every other CA has none unless
    assigned (or covered by ``*``). ``enabled`` false: no CA has client-side budgets.
    """

    assignments: Mapping[str, RateLimitPolicy] = field(default_factory=dict)
    enabled: bool = True

    def for_ca(self, directory_url: str) -> RateLimitPolicy:
        if not self.enabled:
            return NO_RULES
        key = normalise_directory(directory_url)
        if key in self.assignments:
            return self.assignments[key]
        if key == LETS_ENCRYPT_PRODUCTION_URL:
            return LETS_ENCRYPT
        if key == LETS_ENCRYPT_STAGING_URL:
            return LETS_ENCRYPT_STAGING
        return self.assignments.get(WILDCARD, NO_RULES)

    def source(self, directory_url: str) -> str:
        """Why ``for_ca`` answers what it does (``config show``)."""
        if not self.enabled:
            return "rate_limits.enabled is false"
        key = normalise_directory(directory_url)
        if key in self.assignments:
            return "rate_limits.ca_rules"
        if key in (LETS_ENCRYPT_PRODUCTION_URL, LETS_ENCRYPT_STAGING_URL):
            return "built in (a Let's Encrypt directory)"
        if WILDCARD in self.assignments:
            return "rate_limits.ca_rules (*)"
        return "built in (not a Let's Encrypt directory: no client-side budget)"

    @classmethod
    def everywhere(cls, policy: RateLimitPolicy) -> RateLimitRules:
        """``policy`` for every CA, Let's Encrypt's included (tests, single-CA tools)."""
        return cls(
            {
                WILDCARD: policy,
                LETS_ENCRYPT_PRODUCTION_URL: policy,
                LETS_ENCRYPT_STAGING_URL: policy,
            }
        )


def parse_ca_rule(item: str) -> tuple[str, str]:
    """``"https://ca.example/dir=letsencrypt"`` -> (normalised directory or ``*``, rule name)."""
    directory, sep, name = item.rpartition("=")
    name = name.strip()
    if not sep or not directory.strip() or name not in RULE_NAMES:
        raise ValueError(
            f"{item!r} is not <directory URL or *>=<rules> with rules one of {', '.join(RULE_NAMES)}"
        )
    directory = directory.strip()
    if directory != WILDCARD and not directory.startswith(("https://", "http://")):
        raise ValueError(f"{item!r}: the directory must be an http(s) URL or *")
    return (WILDCARD if directory == WILDCARD else normalise_directory(directory)), name


def custom_policy(settings: Any) -> RateLimitPolicy:
    """The ``custom`` rules: the counts and periods of the ``rate_limits`` settings (0: off)."""

    def limit(count: int, period: dt.timedelta) -> Limit | None:
        return Limit(count, period) if count > 0 else None

    return RateLimitPolicy(
        new_orders=limit(
            settings.new_orders_per_account, dt.timedelta(hours=settings.new_orders_period_hours)
        ),
        certs_per_domain=limit(
            settings.certificates_per_registered_domain,
            dt.timedelta(days=settings.certificates_per_registered_domain_period_days),
        ),
        duplicate_certs=limit(
            settings.duplicate_certificates, dt.timedelta(days=settings.duplicate_certificates_period_days)
        ),
        failed_authz=limit(
            settings.failed_authorizations_per_identifier,
            dt.timedelta(hours=settings.failed_authorizations_period_hours),
        ),
        consecutive_failed_authz=limit(
            settings.consecutive_failed_authorizations_per_identifier,
            dt.timedelta(days=settings.consecutive_failed_authorizations_period_days),
        ),
        name="custom",
    )


def rules_from_settings(settings: Any, extra_rules: Iterable[str] = ()) -> RateLimitRules:
    """The per-CA rules of a ``rate_limits`` settings section (``RateLimitSettings``); ``extra_rules``
    (the named issuers' own, ``certqueue.issuers.ca_rules``) apply first, so ``ca_rules`` wins."""
    custom = custom_policy(settings)
    assignments: dict[str, RateLimitPolicy] = {}
    for item in [*extra_rules, *settings.ca_rules]:
        directory, name = parse_ca_rule(item)
        assignments[directory] = custom if name == "custom" else BUILTIN[name]
    return RateLimitRules(assignments, enabled=bool(settings.enabled))


def applied_rules(rules: RateLimitRules, directories: Iterable[str]) -> list[dict[str, Any]]:
    """For ``config show``: each CA, the rules that apply to it, why, and their limits."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for url in directories:
        key = normalise_directory(url)
        if key in seen:
            continue
        seen.add(key)
        policy = rules.for_ca(url)
        out.append(
            {
                "directory": url,
                "rules": policy.name,
                "source": rules.source(url),
                "limits": {s: (lim.describe() if (lim := policy.limit(s)) else None) for s in ORDER_SCOPES},
            }
        )
    return out


# --- purposes -------------------------------------------------------------------------------------


class Purpose(enum.StrEnum):
    NEW = "new"
    RENEWAL = "renewal"
    ARI_RENEWAL = "ari_renewal"


class Charge(enum.Enum):
    """What an order does to one budget: check and consume it, only check it, or ignore it."""

    SPEND = "spend"
    CHECK = "check"
    EXEMPT = "exempt"


_CHARGES: dict[Purpose, dict[str, Charge]] = {
    Purpose.NEW: {
        SCOPE_NEW_ORDERS: Charge.SPEND,
        SCOPE_CERTS_PER_DOMAIN: Charge.SPEND,
        SCOPE_DUPLICATE: Charge.SPEND,
        SCOPE_FAILED_AUTHZ: Charge.CHECK,  # consumed by failures, not by orders
        SCOPE_CONSECUTIVE_FAILED_AUTHZ: Charge.CHECK,
    },
    Purpose.RENEWAL: {
        SCOPE_NEW_ORDERS: Charge.EXEMPT,
        SCOPE_CERTS_PER_DOMAIN: Charge.EXEMPT,
        SCOPE_DUPLICATE: Charge.SPEND,
        SCOPE_FAILED_AUTHZ: Charge.CHECK,
        SCOPE_CONSECUTIVE_FAILED_AUTHZ: Charge.CHECK,
    },
    Purpose.ARI_RENEWAL: {
        SCOPE_NEW_ORDERS: Charge.EXEMPT,
        SCOPE_CERTS_PER_DOMAIN: Charge.EXEMPT,
        SCOPE_DUPLICATE: Charge.EXEMPT,
        SCOPE_FAILED_AUTHZ: Charge.EXEMPT,
        SCOPE_CONSECUTIVE_FAILED_AUTHZ: Charge.CHECK,  # a paused name is refused even with ARI
    },
}


def charge(purpose: Purpose | str, scope: str) -> Charge:
    """What an order of ``purpose`` does to the budget ``scope``."""
    return _CHARGES[Purpose(purpose)][scope]


@dataclass(frozen=True)
class PreviousIssuance:
    """The certificate an order would renew, as far as the rate limits care."""

    names: Sequence[str]
    directory_url: str
    issued_at: dt.datetime
    #: the ARI suggested window of that certificate, when the CA gave one
    window_start: dt.datetime | None = None
    window_end: dt.datetime | None = None


def _name_set(names: Iterable[str]) -> frozenset[str]:
    return frozenset(n.strip().rstrip(".").lower() for n in names)


def classify_order(
    names: Sequence[str],
    *,
    directory_url: str,
    previous: PreviousIssuance | None,
    replaces: str | None,
    now: dt.datetime,
    lookback: dt.timedelta = RENEWAL_LOOKBACK,
) -> Purpose:
    """The purpose of a new order for ``names`` at ``directory_url``, as the CA will count it.

    An ARI renewal needs ``replaces``, a previous certificate from the same CA sharing a name, and
    ``now`` inside its suggested window (Boulder exempts only then). A renewal needs the exact same
    set of names (case and order ignored) issued by the same CA within ``lookback``.
    """
    if previous is None or normalise_directory(previous.directory_url) != normalise_directory(directory_url):
        return Purpose.NEW
    ours, theirs = _name_set(names), _name_set(previous.names)
    if (
        replaces
        and ours & theirs
        and previous.window_start is not None
        and previous.window_end is not None
        and previous.window_start <= now <= previous.window_end
    ):
        return Purpose.ARI_RENEWAL
    if ours == theirs and now - previous.issued_at <= lookback:
        return Purpose.RENEWAL
    return Purpose.NEW


# --- reading the CA's rateLimited answers ---------------------------------------------------------

#: Let's Encrypt's ``rateLimited`` details, mapped to the budget they name (first match wins)
PROBLEM_SCOPES = (
    ("temporarily prevented from requesting certificates", SCOPE_CONSECUTIVE_FAILED_AUTHZ),  # a pause
    ("exact set of", SCOPE_DUPLICATE),  # "...already issued for this exact set of identifiers..."
    ("failed authorization", SCOPE_FAILED_AUTHZ),
    ("new orders", SCOPE_NEW_ORDERS),
    ("registered domain", SCOPE_CERTS_PER_DOMAIN),
    ("already issued for", SCOPE_CERTS_PER_DOMAIN),  # 'too many certificates (50) already issued for "x"'
)

#: a paused identifier needs a person at the CA's portal; ask again this often meanwhile
PAUSE_RECHECK = dt.timedelta(hours=24)


def problem_scope(detail: str | None) -> str | None:
    """The budget a CA ``rateLimited`` detail is about; None when the text names none we know."""
    text = (detail or "").lower()
    for needle, scope in PROBLEM_SCOPES:
        if needle in text:
            return scope
    return None


def is_pause(detail: str | None) -> bool:
    """Let's Encrypt's answer for a paused (account, identifier): needs the unpause portal."""
    return problem_scope(detail) == SCOPE_CONSECUTIVE_FAILED_AUTHZ


#: how long a ``rateLimited`` answer without Retry-After holds what it names
DEFAULT_CA_BLOCK = dt.timedelta(hours=1)


def ca_block(detail: str | None, retry_after_seconds: float | None) -> dt.timedelta:
    """How long to hold what a CA ``rateLimited`` answer names: its Retry-After (an hour without
    one); a pause at least :data:`PAUSE_RECHECK`, since only a person at the CA's portal lifts it."""
    wait = dt.timedelta(seconds=retry_after_seconds) if retry_after_seconds is not None else DEFAULT_CA_BLOCK
    return max(wait, PAUSE_RECHECK) if is_pause(detail) else wait
