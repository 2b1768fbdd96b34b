"""Solvers chosen by name (cert-manager's solver selectors): which challenge type, and which DNS
provider configuration, proves each name of a certificate. Owns no state; reads
``challenges.solvers``.

For one name the most specific solver wins: a ``dns_names`` entry equal to the name, else the
longest ``dns_zones`` entry the name is in, else a solver with an empty selector; ties go to the
first listed. A wildcard name only takes dns-01 solvers, an IP address only http-01 and tls-alpn-01
ones, and a request that fixes its challenge type only takes solvers of that type.

The type is decided when the certificate is requested (it goes into ``challenge_map``); the DNS
solver is looked up again by name when the order is presented (``dns_solver_for``) and its
provider built by the dns pool only (``load``), so credentials exist only where that pool runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from certqueue.config import Settings, SolverSettings


def _is_ip(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def select(
    solvers: Sequence[SolverSettings], name: str, challenge_type: str | None = None
) -> SolverSettings | None:
    """The solver for ``name`` (None: no solver takes it)."""
    name = name.lower()
    wildcard = name.startswith("*.")
    base = name[2:] if wildcard else name
    candidates = [
        s
        for s in solvers
        if (challenge_type is None or s.type == challenge_type)
        and (not wildcard or s.type == "dns-01")
        and (not _is_ip(base) or s.type in ("http-01", "tls-alpn-01"))
    ]
    for s in candidates:
        if name in s.selector.dns_names:
            return s
    best: SolverSettings | None = None
    best_len = -1
    for s in candidates:
        for zone in s.selector.dns_zones:
            if (base == zone or base.endswith("." + zone)) and len(zone) > best_len:
                best, best_len = s, len(zone)
    if best is not None:
        return best
    return next((s for s in candidates if not s.selector.dns_names and not s.selector.dns_zones), None)


def challenge_map(
    settings: Settings, domains: Sequence[str], challenge_type: str | None, given: dict[str, str]
) -> dict[str, str]:
    """The challenge type per name from the solvers, for the names ``given`` does not set."""
    out = dict(given)
    for d in domains:
        if d in out:
            continue
        s = select(settings.challenges.solvers, d, challenge_type)
        if s is not None:
            out[d] = s.type
    return out


def dns_solver_for(settings: Settings, name: str) -> str | None:
    """The name of the dns-01 solver that takes ``name``, or None."""
    s = select(settings.challenges.solvers, name, "dns-01")
    return s.name if s is not None else None


def get(settings: Settings, name: str) -> SolverSettings | None:
    return next((s for s in settings.challenges.solvers if s.name == name), None)


def load(settings: Settings, name: str) -> Any:
    """The DNS provider for a solver name, or for a provider name (its ``challenges.<name>``)."""
    from certqueue.dns.base import load_provider

    s = get(settings, name)
    if s is not None and s.provider:
        return load_provider(s.provider, s.config)
    return load_provider(name, settings.challenges.provider_settings(name))
