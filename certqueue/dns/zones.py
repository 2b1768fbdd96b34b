"""Zone lookup for DNS-01: which zone holds a name, where a CNAME sends it, who serves the zone.

Owns the resolver settings (``Resolver``) and three lookups, all bounded in time and hops:

* ``find_zone``: the zone apex holding a name, by asking for SOA at the name and at each parent
  (a name that is an alias or has no SOA of its own is not an apex).
* ``follow_cnames``: the name a ``_acme-challenge`` record really lives at, for delegated validation
  (``_acme-challenge.example.com CNAME example.com.acme.example.net``); loop-safe.
* ``authoritative_nameservers``: the zone's NS hosts and their addresses, for the propagation check
  (``certqueue.dns.propagation``), which asks each of them directly.

Providers never do this themselves (lego's ``dns01`` split): they only add and remove values.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdatatype
import dns.resolver

from certqueue.errors import PermanentError, RetryableError

#: at most this many CNAME hops are followed (lego uses 50; real delegations use one)
MAX_CNAME_HOPS = 10


class DNSLookupError(RetryableError):
    """A lookup failed in a way that may pass (timeout, SERVFAIL, no nameserver answered)."""

    reason = "dns:lookup_failed"


class ZoneNotFound(PermanentError):
    """No zone apex (SOA) was found for the name or any of its parents."""

    reason = "dns:zone_not_found"


class CNAMELoop(PermanentError):
    """A CNAME chain loops or is longer than ``MAX_CNAME_HOPS``."""

    reason = "dns:cname_loop"


def parse_hostport(text: str, default_port: int = 53) -> tuple[str, int]:
    """``"127.0.0.1"``, ``"127.0.0.1:5353"``, ``"::1"``, ``"[::1]:5353"`` -> (ip, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else default_port
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = int(p)
    else:
        host, port = text, default_port
    ipaddress.ip_address(host)  # ValueError for a hostname: resolvers are given as addresses
    if not 0 < port < 65536:
        raise ValueError(f"bad port in {text!r}")
    return host, port


@dataclass(frozen=True)
class Resolver:
    """Where lookups go.

    ``nameservers``: recursive resolvers as ``"ip[:port]"``; empty means the system resolver
    (/etc/resolv.conf). ``nameserver_port``: the port used when querying a zone's authoritative
    nameservers directly (53 in production; tests set BIND's high port). ``timeout`` bounds one
    query, ``lifetime`` one lookup (all tries and servers).
    """

    nameservers: tuple[str, ...] = ()
    nameserver_port: int = 53
    timeout: float = 2.0
    lifetime: float = 5.0

    def __post_init__(self) -> None:
        if isinstance(self.nameservers, str):  # a lone "ip:port" would otherwise split into chars
            object.__setattr__(self, "nameservers", (self.nameservers,))
        for ns in self.nameservers:
            parse_hostport(ns)

    def recursive(self) -> dns.resolver.Resolver:
        """A fresh dnspython resolver (no cache: propagation checks must see fresh answers)."""
        if self.nameservers:
            res = dns.resolver.Resolver(configure=False)
            res.nameservers = [dns.nameserver.Do53Nameserver(*parse_hostport(ns)) for ns in self.nameservers]
        else:
            res = dns.resolver.Resolver(configure=True)
        res.timeout = self.timeout
        res.lifetime = self.lifetime
        res.cache = None
        return res

    def recursive_addresses(self) -> list[tuple[str, int]]:
        """(ip, port) of each recursive resolver, for direct queries."""
        if self.nameservers:
            return [parse_hostport(ns) for ns in self.nameservers]
        return [(ns, 53) for ns in dns.resolver.Resolver(configure=True).nameservers if isinstance(ns, str)]


def _fqdn(name: str) -> dns.name.Name:
    try:
        return dns.name.from_text(name.rstrip(".") + ".")
    except dns.exception.DNSException as exc:
        raise ZoneNotFound(f"not a valid DNS name: {name!r}", reason="dns:bad_name") from exc


def _text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


def _resolve(
    res: dns.resolver.Resolver, name: dns.name.Name, rdtype: dns.rdatatype.RdataType
) -> dns.resolver.Answer | None:
    """An answer (possibly empty), or None for NXDOMAIN; DNSLookupError for the failures that pass."""
    try:
        return res.resolve(name, rdtype, raise_on_no_answer=False, search=False)
    except dns.resolver.NXDOMAIN:
        return None
    except dns.resolver.NoNameservers as exc:
        if _all_refused(exc):
            # Every server refused: none serves this name (an authoritative-only server asked about a
            # foreign name). Same as NXDOMAIN for the walk; SERVFAIL and timeouts stay retryable.
            return None
        raise DNSLookupError(
            f"{dns.rdatatype.to_text(rdtype)} lookup of {_text(name)} failed: no nameserver answered"
        ) from exc
    except dns.exception.DNSException as exc:
        raise DNSLookupError(
            f"{dns.rdatatype.to_text(rdtype)} lookup of {_text(name)} failed: {type(exc).__name__}"
        ) from exc


def _all_refused(exc: dns.resolver.NoNameservers) -> bool:
    errors = exc.kwargs.get("errors") or []
    rcodes = [resp.rcode() for *_, resp in errors if isinstance(resp, dns.message.Message)]
    return bool(rcodes) and len(rcodes) == len(errors) and all(rc == dns.rcode.REFUSED for rc in rcodes)


def find_zone(fqdn: str, resolver: Resolver) -> str:
    """The apex of the zone holding ``fqdn`` (no trailing dot, lower case).

    Walks up from ``fqdn``: the first name with an SOA record of its own (not reached through a
    CNAME) is the apex. Raises ZoneNotFound when no name below the root has one.
    """
    res = resolver.recursive()
    name = _fqdn(fqdn)
    while len(name) > 1:  # stop before the root
        answer = _resolve(res, name, dns.rdatatype.SOA)
        if (
            answer is not None
            and answer.rrset is not None
            and answer.canonical_name == name
            and answer.rrset.name == name
        ):
            return _text(name)
        name = name.parent()
    raise ZoneNotFound(f"no DNS zone found for {fqdn.rstrip('.')} (no SOA at the name or any parent)")


def follow_cnames(fqdn: str, resolver: Resolver, *, max_hops: int = MAX_CNAME_HOPS) -> str:
    """Where ``fqdn`` really points: follows CNAME records hop by hop (no trailing dot, lower case).

    Returns ``fqdn`` itself when it is not an alias. Raises CNAMELoop on a loop or a chain longer
    than ``max_hops``.
    """
    res = resolver.recursive()
    name = _fqdn(fqdn)
    seen = {name}
    for _ in range(max_hops + 1):
        answer = _resolve(res, name, dns.rdatatype.CNAME)
        if answer is None or answer.rrset is None or answer.rrset.name != name:
            return _text(name)
        target = answer.rrset[0].target  # type: ignore[attr-defined]
        if target in seen:
            raise CNAMELoop(f"CNAME loop at {_text(name)} -> {_text(target)} (from {fqdn.rstrip('.')})")
        seen.add(target)
        name = target
    raise CNAMELoop(f"more than {max_hops} CNAME hops from {fqdn.rstrip('.')}")


def authoritative_nameservers(zone: str, resolver: Resolver) -> list[tuple[str, str]]:
    """(host, ip) for every address of every NS of ``zone``, sorted; IPv4 and IPv6.

    Raises ZoneNotFound when the zone has no NS records, DNSLookupError when no NS host resolves.
    """
    res = resolver.recursive()
    zname = _fqdn(zone)
    answer = _resolve(res, zname, dns.rdatatype.NS)
    if answer is None or answer.rrset is None:
        raise ZoneNotFound(f"zone {_text(zname)} has no NS records")
    result: set[tuple[str, str]] = set()
    hosts = sorted({rd.target for rd in answer.rrset})  # type: ignore[attr-defined]
    for host in hosts:
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            try:
                addrs = _resolve(res, host, rdtype)
            except DNSLookupError:
                continue  # another address family or host may still answer
            if addrs is not None and addrs.rrset is not None:
                result.update((_text(host), rd.address) for rd in addrs.rrset)  # type: ignore[attr-defined]
    if not result:
        raise DNSLookupError(
            f"no address for any nameserver of {_text(zname)}: {', '.join(_text(h) for h in hosts)}"
        )
    return sorted(result)


def configured_resolver() -> Resolver:
    """The resolver the settings name (``challenges.dns_resolvers`` and ``nameserver_port``)."""
    from certqueue.config import get_settings

    c = get_settings().challenges
    return Resolver(nameservers=tuple(c.dns_resolvers), nameserver_port=c.nameserver_port)
