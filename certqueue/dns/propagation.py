"""The DNS-01 propagation check: is the TXT value served by every authoritative nameserver?

Owns one decision, made once per call: ``check_visible`` follows CNAMEs from the challenge name,
finds the zone that holds the real name, asks each of the zone's authoritative nameservers directly
(recursion off, UDP with a TCP fallback on truncation, bounded timeouts) and, when asked, the
recursive resolvers too. The value is visible only when every one of them answers it exactly.

It never waits: the ``dns`` pool's task calls it and retries with a countdown until it is visible or
the provider's propagation timeout has passed.

Outcomes: a ``VisibleResult`` (``visible`` false with a reason while a server lacks the value or does
not answer); ``ZoneNotFound`` / ``CNAMELoop`` (permanent) when the name cannot be placed in a zone;
``DNSLookupError`` (retryable) when the zone's servers cannot be found for now.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype

from certqueue.dns.zones import Resolver, authoritative_nameservers, find_zone, follow_cnames


@dataclass(frozen=True)
class NameserverAnswer:
    """What one server said. ``error`` is set when it gave no usable answer (timeout, REFUSED...)."""

    host: str
    address: str
    port: int
    values: tuple[str, ...] = ()
    error: str | None = None
    recursive: bool = False

    def has(self, value: str) -> bool:
        return self.error is None and value in self.values


@dataclass(frozen=True)
class VisibleResult:
    fqdn: str  # the name asked about (``_acme-challenge.<domain>``)
    effective_fqdn: str  # after following CNAMEs: where the value must be
    zone: str
    visible: bool
    answers: tuple[NameserverAnswer, ...] = field(default_factory=tuple)
    reason: str = ""


def query_txt(
    fqdn: str, address: str, port: int, *, timeout: float, recursion: bool = False
) -> tuple[tuple[str, ...], str | None]:
    """TXT values at ``fqdn`` from one server; (values, error). Never raises for network trouble."""
    qname = dns.name.from_text(fqdn.rstrip(".") + ".")
    query = dns.message.make_query(qname, dns.rdatatype.TXT)
    if not recursion:
        query.flags &= ~dns.flags.RD
    try:
        response, _ = dns.query.udp_with_fallback(query, address, timeout=timeout, port=port)
    except dns.exception.Timeout:
        return (), f"timeout after {timeout:g}s"
    except (OSError, dns.exception.DNSException) as exc:
        return (), f"{type(exc).__name__}"
    rcode = response.rcode()
    if rcode == dns.rcode.NXDOMAIN:
        return (), None
    if rcode != dns.rcode.NOERROR:
        return (), dns.rcode.to_text(rcode)
    values: list[str] = []
    for rrset in response.answer:
        if rrset.rdtype == dns.rdatatype.TXT and rrset.name == qname:
            for rd in rrset:
                values.append(b"".join(rd.strings).decode("utf-8", "replace"))  # type: ignore[attr-defined]
    return tuple(sorted(values)), None


def check_visible(
    fqdn: str, value: str, *, resolver_cfg: Resolver, also_recursive: bool = False
) -> VisibleResult:
    """One check: does every authoritative nameserver of the zone (and optionally every recursive
    resolver) answer ``value`` in the TXT rrset at ``fqdn`` (after following CNAMEs)?"""
    effective = follow_cnames(fqdn, resolver_cfg)
    zone = find_zone(effective, resolver_cfg)
    servers = authoritative_nameservers(zone, resolver_cfg)
    answers: list[NameserverAnswer] = []
    for host, address in servers:
        values, error = query_txt(
            effective, address, resolver_cfg.nameserver_port, timeout=resolver_cfg.timeout
        )
        answers.append(NameserverAnswer(host, address, resolver_cfg.nameserver_port, values, error))
    if also_recursive:
        for address, port in resolver_cfg.recursive_addresses():
            values, error = query_txt(effective, address, port, timeout=resolver_cfg.timeout, recursion=True)
            answers.append(NameserverAnswer("recursive", address, port, values, error, recursive=True))
    missing = [a for a in answers if not a.has(value)]
    reason = ""
    if missing:
        parts = []
        for a in missing:
            what = a.error if a.error else f"{len(a.values)} other value(s)" if a.values else "no TXT record"
            parts.append(f"{a.host} ({a.address}:{a.port}): {what}")
        reason = f"value not yet at {effective}: " + "; ".join(parts)
    return VisibleResult(
        fqdn=fqdn.rstrip(".").lower(),
        effective_fqdn=effective,
        zone=zone,
        visible=not missing and bool(answers),
        answers=tuple(answers),
        reason=reason,
    )
