"""The DNS-01 propagation check: is the TXT value served by every authoritative nameserver?

Owns one decision, made once per call: ``check_visible`` follows CNAMEs from the challenge name,
finds the zone that holds the real name, asks each address of each of the zone's authoritative
nameservers directly (recursion off, UDP with a TCP fallback on truncation, bounded timeouts) and,
when asked, the recursive resolvers too.

The rule, as the real internet is wired (most public DNS hosts publish A and AAAA for their
nameservers, and many workers have no IPv6 route):

* an address of a family the worker cannot route (no route to it: ``connect`` on a UDP socket
  fails, nothing is sent) is *skipped* and reported in ``VisibleResult.skipped``, so the caller can
  record it in the challenge's events;
* every reachable address that answers must answer the value (an answer without it, or an error
  rcode, is "not yet");
* an address that does not answer (timeout, refused connection) is reported in
  ``VisibleResult.unanswered`` and tolerated, as long as another address of the same nameserver
  answered: the value is visible only when *every* nameserver answered it from at least one
  address. A nameserver none of whose addresses answered keeps the value "not visible".

It never waits: the ``dns`` pool's task calls it and retries with a countdown until it is visible or
the provider's propagation timeout has passed.

Outcomes: a ``VisibleResult`` (``visible`` false with a reason while a server lacks the value or does
not answer); ``ZoneNotFound`` / ``CNAMELoop`` (permanent) when the name cannot be placed in a zone;
``DNSLookupError`` (retryable) when the zone's servers cannot be found for now.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
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
    #: the server gave a DNS response (any rcode); False for a timeout or a network error
    answered: bool = True

    def has(self, value: str) -> bool:
        return self.error is None and value in self.values

    @property
    def family(self) -> str:
        return "IPv6" if ":" in self.address else "IPv4"


@dataclass(frozen=True)
class VisibleResult:
    fqdn: str  # the name asked about (``_acme-challenge.<domain>``)
    effective_fqdn: str  # after following CNAMEs: where the value must be
    zone: str
    visible: bool
    answers: tuple[NameserverAnswer, ...] = field(default_factory=tuple)
    reason: str = ""
    #: addresses not asked: the worker has no route to their family (record them as events)
    skipped: tuple[NameserverAnswer, ...] = field(default_factory=tuple)
    #: reachable addresses that did not answer, tolerated because another address of the same
    #: nameserver did
    unanswered: tuple[NameserverAnswer, ...] = field(default_factory=tuple)

    def notes(self) -> list[str]:
        """One line per skipped or tolerated address, for the challenge's events."""
        out = [f"skipped {a.host} ({a.address}): {a.error}" for a in self.skipped]
        out += [f"no answer from {a.host} ({a.address}:{a.port}): {a.error}" for a in self.unanswered]
        return out


#: errors of ``connect`` on a UDP socket that mean "no route from here", not "the server is down"
_NO_ROUTE = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT})


def route_error(address: str, port: int) -> str | None:
    """Why this worker cannot route to ``address`` (e.g. no IPv6 route), or None when it can.

    ``connect`` on a UDP socket asks the kernel for a route and sends nothing.
    """
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    name = "IPv6" if family == socket.AF_INET6 else "IPv4"
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM)
    except OSError as exc:
        return f"no {name} on this worker ({exc.strerror or type(exc).__name__})"
    try:
        sock.connect((address, port))
    except OSError as exc:
        if exc.errno in _NO_ROUTE:
            return f"no {name} route from this worker ({exc.strerror or errno.errorcode.get(exc.errno or 0)})"
        return None  # another failure is the query's to report
    finally:
        sock.close()
    return None


def query_txt(
    fqdn: str, address: str, port: int, *, timeout: float, recursion: bool = False
) -> tuple[tuple[str, ...], str | None]:
    """TXT values at ``fqdn`` from one server; (values, error). Never raises for network trouble."""
    values, error, _ = _query_txt(fqdn, address, port, timeout=timeout, recursion=recursion)
    return values, error


def _query_txt(
    fqdn: str, address: str, port: int, *, timeout: float, recursion: bool = False
) -> tuple[tuple[str, ...], str | None, bool]:
    """(values, error, answered): ``answered`` is false when no DNS response came back at all."""
    qname = dns.name.from_text(fqdn.rstrip(".") + ".")
    query = dns.message.make_query(qname, dns.rdatatype.TXT)
    if not recursion:
        query.flags &= ~dns.flags.RD
    try:
        response, _ = dns.query.udp_with_fallback(query, address, timeout=timeout, port=port)
    except dns.exception.Timeout:
        return (), f"timeout after {timeout:g}s", False
    except OSError as exc:
        return (), f"{type(exc).__name__}", False
    except dns.exception.DNSException as exc:
        return (), f"{type(exc).__name__}", True
    rcode = response.rcode()
    if rcode == dns.rcode.NXDOMAIN:
        return (), None, True
    if rcode != dns.rcode.NOERROR:
        return (), dns.rcode.to_text(rcode), True
    values: list[str] = []
    for rrset in response.answer:
        if rrset.rdtype == dns.rdatatype.TXT and rrset.name == qname:
            for rd in rrset:
                values.append(b"".join(rd.strings).decode("utf-8", "replace"))  # type: ignore[attr-defined]
    return tuple(sorted(values)), None, True


def check_visible(
    fqdn: str, value: str, *, resolver_cfg: Resolver, also_recursive: bool = False
) -> VisibleResult:
    """One check: does every authoritative nameserver of the zone (and optionally every recursive
    resolver) answer ``value`` in the TXT rrset at ``fqdn`` (after following CNAMEs)? See the module
    docstring for how unroutable and silent addresses count."""
    effective = follow_cnames(fqdn, resolver_cfg)
    zone = find_zone(effective, resolver_cfg)
    servers = authoritative_nameservers(zone, resolver_cfg)
    port = resolver_cfg.nameserver_port
    answers: list[NameserverAnswer] = []
    skipped: list[NameserverAnswer] = []
    by_host: dict[str, list[NameserverAnswer]] = {}
    for host, address in servers:
        by_host.setdefault(host, [])
        no_route = route_error(address, port)
        if no_route is not None:
            skipped.append(NameserverAnswer(host, address, port, (), no_route, answered=False))
            continue
        values, error, answered = _query_txt(effective, address, port, timeout=resolver_cfg.timeout)
        answer = NameserverAnswer(host, address, port, values, error, answered=answered)
        answers.append(answer)
        by_host[host].append(answer)
    if also_recursive:
        for address, rport in resolver_cfg.recursive_addresses():
            values, error, answered = _query_txt(
                effective, address, rport, timeout=resolver_cfg.timeout, recursion=True
            )
            answers.append(
                NameserverAnswer(
                    "recursive", address, rport, values, error, recursive=True, answered=answered
                )
            )
    problems: list[str] = []
    unanswered: list[NameserverAnswer] = []
    for host, asked in by_host.items():
        heard = [a for a in asked if a.answered]
        if not heard:
            tried = [*asked, *(s for s in skipped if s.host == host)]
            what = ", ".join(f"{a.host} ({a.address}:{a.port}): {a.error}" for a in tried) or host
            problems.append(f"no address of {host} answered: {what}")
            continue
        unanswered += [a for a in asked if not a.answered]
        problems += [_lacks(a) for a in heard if not a.has(value)]
    problems += [_lacks(a) for a in answers if a.recursive and not a.has(value)]
    reason = f"value not yet at {effective}: " + "; ".join(problems) if problems else ""
    return VisibleResult(
        fqdn=fqdn.rstrip(".").lower(),
        effective_fqdn=effective,
        zone=zone,
        visible=not problems and bool(by_host),
        answers=tuple(answers),
        reason=reason,
        skipped=tuple(skipped),
        unanswered=tuple(unanswered),
    )


def _lacks(a: NameserverAnswer) -> str:
    what = a.error if a.error else f"{len(a.values)} other value(s)" if a.values else "no TXT record"
    return f"{a.host} ({a.address}:{a.port}): {what}"
