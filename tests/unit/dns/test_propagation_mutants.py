"""certqueue.dns.propagation with a zone served by TWO authoritative nameservers that disagree.

Every BIND test zone has one nameserver, so "visible only when every authoritative server answers
the value" was never tested (a mutant calling it visible when any one server had it survived). Here
the zone ``multi.test`` has ``ns1`` at 127.0.0.1 and ``ns2`` at 127.0.0.2, both on one free port
(the check asks every nameserver on ``Resolver.nameserver_port``). Each is a small authoritative
server written for this test on dnspython (real UDP, real wire format): ns2 stands for a secondary
that has not caught up yet.

Then how each kind of answer counts (silent, unroutable, refused, NXDOMAIN, not DNS at all, an
address the kernel will not send to, a silent recursive resolver), how a TXT rrset becomes values,
and what ``route_error`` says: the behaviours ``make mutation`` found untested.
"""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from certqueue.dns import propagation
from certqueue.dns.propagation import VisibleResult, check_visible, query_txt
from certqueue.dns.zones import Resolver
from devstack.ports import free_tcp_udp_port

ZONE = "multi.test"
NAME = f"_acme-challenge.www.{ZONE}"
STATIC = {
    (ZONE, "SOA"): [f"ns1.{ZONE}. hostmaster.{ZONE}. 1 3600 600 86400 1"],
    (ZONE, "NS"): [f"ns1.{ZONE}.", f"ns2.{ZONE}."],
    (f"ns1.{ZONE}", "A"): ["127.0.0.1"],
    (f"ns2.{ZONE}", "A"): ["127.0.0.2"],
}


@dataclass
class Authority:
    """One authoritative-only server for ``multi.test`` on (address, port), UDP."""

    address: str
    port: int
    txt: dict[str, list[str]] = field(default_factory=dict)
    queries: int = 0
    #: (question name as sent, question type, header flags) of every query
    seen: list[tuple[str, str, int]] = field(default_factory=list)
    #: answer TXT questions with REFUSED (a server that lost the zone)
    refuse_txt: bool = False
    #: TXT rdata in zone-file form (several strings, ``\\ddd`` escapes), besides ``txt``
    txt_rdata: dict[str, list[str]] = field(default_factory=dict)
    #: aliases (served even outside ``multi.test``): a CNAME question gets the CNAME; a TXT
    #: question gets the CNAME and, as BIND does for a target it also serves, the target's TXT
    cnames: dict[str, str] = field(default_factory=dict)
    #: answer a TXT question for a name without TXT with NXDOMAIN (the name does not exist at all)
    nxdomain_txt: bool = False
    #: answer TXT questions with bytes that are no DNS message
    garbage_txt: bool = False

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((self.address, self.port))
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True, name=f"dns-{self.address}")
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                wire, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.queries += 1
            query = dns.message.from_wire(wire)
            q = query.question[0]
            self.seen.append((q.name.to_text(), dns.rdatatype.to_text(q.rdtype), int(query.flags)))
            if self.garbage_txt and q.rdtype == dns.rdatatype.TXT:
                self.sock.sendto(b"\x00\x01", peer)  # shorter than a DNS header
                continue
            self.sock.sendto(self._answer(query).to_wire(), peer)

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        resp = dns.message.make_response(query)
        q = query.question[0]
        name = q.name.to_text(omit_final_dot=True).lower()
        if not (name == ZONE or name.endswith("." + ZONE) or name in self.cnames):
            resp.set_rcode(dns.rcode.REFUSED)
            return resp
        resp.flags |= dns.flags.AA
        rdtype = dns.rdatatype.to_text(q.rdtype)
        if rdtype == "TXT" and self.refuse_txt:
            resp.set_rcode(dns.rcode.REFUSED)
            return resp
        if name in self.cnames:
            target = self.cnames[name]
            resp.answer.append(dns.rrset.from_text(q.name, 60, "IN", "CNAME", target + "."))
            if rdtype == "TXT" and self._txt(target):
                resp.answer.append(dns.rrset.from_text(target + ".", 60, "IN", "TXT", *self._txt(target)))
            return resp
        values = self._txt(name) if rdtype == "TXT" else STATIC.get((name, rdtype), [])
        if not values and rdtype == "TXT" and self.nxdomain_txt:
            resp.set_rcode(dns.rcode.NXDOMAIN)
            return resp
        if values:
            resp.answer.append(dns.rrset.from_text(q.name, 60, "IN", rdtype, *values))
        else:  # NODATA: the zone's SOA in the authority section
            resp.authority.append(
                dns.rrset.from_text(dns.name.from_text(ZONE + "."), 60, "IN", "SOA", *STATIC[(ZONE, "SOA")])
            )
        return resp

    def _txt(self, name: str) -> list[str]:
        return [f'"{v}"' for v in self.txt.get(name, [])] + self.txt_rdata.get(name, [])


@pytest.fixture
def servers() -> Iterator[tuple[Authority, Authority, Resolver]]:
    for _ in range(20):  # one port free on both addresses
        port = free_tcp_udp_port()
        try:
            ns1 = Authority("127.0.0.1", port)
        except OSError:
            continue
        try:
            ns2 = Authority("127.0.0.2", port)
        except OSError:
            ns1.stop()
            continue
        break
    else:
        pytest.fail("no UDP port free on both 127.0.0.1 and 127.0.0.2")
    resolver = Resolver(nameservers=(f"127.0.0.1:{port}",), nameserver_port=port, timeout=1.0, lifetime=3.0)
    try:
        yield ns1, ns2, resolver
    finally:
        ns1.stop()
        ns2.stop()


def test_the_zone_really_has_two_nameservers(servers: tuple[Authority, Authority, Resolver]) -> None:
    ns1, ns2, resolver = servers
    ns1.txt[NAME] = ns2.txt[NAME] = ["v"]
    result = check_visible(NAME, "v", resolver_cfg=resolver)
    assert [(a.host, a.address) for a in result.answers] == [
        (f"ns1.{ZONE}", "127.0.0.1"),
        (f"ns2.{ZONE}", "127.0.0.2"),
    ]
    assert result.zone == ZONE and result.visible and result.reason == ""
    assert ns2.queries >= 1  # the second server was asked, not only the one the resolver knows


@pytest.mark.parametrize("lagging", ["ns1", "ns2"])
def test_a_value_on_one_nameserver_only_is_not_visible(
    servers: tuple[Authority, Authority, Resolver], lagging: str
) -> None:
    """A secondary that has not caught up: the CA may ask it, so the value is not visible yet."""
    ns1, ns2, resolver = servers
    behind, ahead = (ns1, ns2) if lagging == "ns1" else (ns2, ns1)
    ahead.txt[NAME] = ["token-value"]
    result = check_visible(NAME, "token-value", resolver_cfg=resolver)
    assert not result.visible
    assert f"{lagging}.{ZONE} ({behind.address}:{behind.port}): no TXT record" in result.reason
    assert [a.has("token-value") for a in result.answers] == [lagging == "ns2", lagging == "ns1"]

    behind.txt[NAME] = ["an-older-value"]  # the secondary serves a stale rrset
    stale = check_visible(NAME, "token-value", resolver_cfg=resolver)
    assert not stale.visible and "1 other value(s)" in stale.reason

    behind.txt[NAME] = ["an-older-value", "token-value"]  # caught up
    assert check_visible(NAME, "token-value", resolver_cfg=resolver).visible


def test_a_nameserver_that_does_not_answer_keeps_the_value_invisible(
    servers: tuple[Authority, Authority, Resolver],
) -> None:
    ns1, ns2, resolver = servers
    ns1.txt[NAME] = ns2.txt[NAME] = ["v"]
    ns2.stop()  # ns2 gone: its address no longer answers
    result = check_visible(NAME, "v", resolver_cfg=resolver)
    assert not result.visible
    assert result.reason == (
        f"value not yet at {NAME}: no address of ns2.{ZONE} answered: "
        f"ns2.{ZONE} (127.0.0.2:{ns2.port}): timeout after 1s"
    )


# --- one query (query_txt): what goes on the wire ------------------------------------------------------


def test_an_authoritative_query_asks_for_no_recursion(servers: tuple[Authority, Authority, Resolver]) -> None:
    """An authority must be asked what it holds itself (RD clear); only the optional recursive
    check sets RD."""
    ns1, _, resolver = servers
    ns1.txt[NAME] = ["v"]
    assert query_txt(NAME, ns1.address, resolver.nameserver_port, timeout=2.0) == (("v",), None)
    assert query_txt(NAME, ns1.address, resolver.nameserver_port, timeout=2.0, recursion=True) == (
        ("v",),
        None,
    )
    (_, _, plain), (_, _, recursive) = ns1.seen
    assert not plain & dns.flags.RD
    assert recursive & dns.flags.RD


@pytest.mark.parametrize("name", [NAME, NAME + ".", "_acme-challenge.FOX"])
def test_the_name_asked_is_the_name_given_with_one_final_dot(
    servers: tuple[Authority, Authority, Resolver], name: str
) -> None:
    ns1, _, resolver = servers
    query_txt(name, ns1.address, resolver.nameserver_port, timeout=2.0)
    assert [(q, t) for q, t, _ in ns1.seen] == [(name.rstrip(".") + ".", "TXT")]


def test_a_nameserver_that_refuses_is_named_with_its_error(
    servers: tuple[Authority, Authority, Resolver],
) -> None:
    ns1, ns2, resolver = servers
    ns1.txt[NAME] = ["VALUE"]
    ns2.refuse_txt = True
    result = check_visible(NAME, "VALUE", resolver_cfg=resolver)
    assert not result.visible
    # an error rcode is an answer (ns2 is not "silent"), lacking the value
    assert (
        result.reason
        == f"value not yet at {NAME}: ns2.{ZONE} (127.0.0.2:{resolver.nameserver_port}): REFUSED"
    )


def test_the_visibility_check_asks_every_authority_without_recursion(
    servers: tuple[Authority, Authority, Resolver],
) -> None:
    ns1, ns2, resolver = servers
    ns1.txt[NAME] = ns2.txt[NAME] = ["VALUE"]
    assert check_visible(NAME, "VALUE", resolver_cfg=resolver).visible
    # (the resolver, 127.0.0.1 here too, is asked recursively where the zone and CNAMEs are: other types)
    txt_queries = [flags for ns in (ns1, ns2) for q, t, flags in ns.seen if (q, t) == (NAME + ".", "TXT")]
    assert len(txt_queries) == 2
    assert not any(flags & dns.flags.RD for flags in txt_queries)


def test_a_silent_server_is_a_timeout_after_the_given_seconds() -> None:
    """A server that never answers costs ``timeout``, reported as such (not a hang, not an error)."""
    import time

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        started = time.monotonic()
        values, error = query_txt(NAME, "127.0.0.1", silent.getsockname()[1], timeout=0.3)
        took = time.monotonic() - started
    assert (values, error) == ((), "timeout after 0.3s")
    assert took < 10  # bounded; the exact time is the machine's


def test_a_silent_address_beside_one_that_answers_is_tolerated(
    servers: tuple[Authority, Authority, Resolver], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ns1 has a second address where nothing listens (127.0.0.3): the nameserver answered on its
    other address, so the silent one is recorded, not counted as lacking the value."""
    ns1, ns2, resolver = servers
    monkeypatch.setitem(STATIC, (f"ns1.{ZONE}", "A"), ["127.0.0.1", "127.0.0.3"])
    ns1.txt[NAME] = ns2.txt[NAME] = ["VALUE"]
    result = check_visible(NAME, "VALUE", resolver_cfg=resolver)
    assert result.visible, result.reason
    assert [a.address for a in result.unanswered] == ["127.0.0.3"]
    assert result.notes() == [
        f"no answer from ns1.{ZONE} (127.0.0.3:{resolver.nameserver_port}): {result.unanswered[0].error}"
    ]


def test_the_optional_recursive_check_asks_the_resolvers_with_recursion(
    servers: tuple[Authority, Authority, Resolver],
) -> None:
    ns1, ns2, resolver = servers
    ns1.txt[NAME] = ns2.txt[NAME] = ["VALUE"]
    result = check_visible(NAME, "VALUE", resolver_cfg=resolver, also_recursive=True)
    assert result.visible, result.reason
    (recursive,) = [a for a in result.answers if a.recursive]
    assert (recursive.host, recursive.address, recursive.values) == ("recursive", "127.0.0.1", ("VALUE",))
    txt = [flags for q, t, flags in ns1.seen if (q, t) == (NAME + ".", "TXT")]
    assert sum(1 for f in txt if f & dns.flags.RD) == 1  # the resolver's query; the authority's has none


def test_a_resolver_without_the_value_keeps_it_invisible_and_is_named(
    servers: tuple[Authority, Authority, Resolver],
) -> None:
    """The resolver here is ns1's address: its answer lacks the value like ns1's own."""
    _, ns2, resolver = servers
    ns2.txt[NAME] = ["VALUE"]
    result = check_visible(NAME, "VALUE", resolver_cfg=resolver, also_recursive=True)
    assert not result.visible
    assert f"recursive (127.0.0.1:{resolver.nameserver_port}): no TXT record" in result.reason


# --- how each server's answer counts -------------------------------------------------------------------

NO_V6 = "no IPv6 route from this worker (as on most container hosts)"


@pytest.fixture
def without_ipv6_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker without an IPv6 route (this machine may have one): every IPv6 address is skipped."""
    real = propagation.route_error
    monkeypatch.setattr(
        propagation, "route_error", lambda address, port: NO_V6 if ":" in address else real(address, port)
    )


@contextmanager
def silent(address: str, port: int) -> Iterator[int]:
    """A UDP socket bound on (address, port) that reads nothing: every query to it times out."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((address, port))
        yield sock.getsockname()[1]


def within(seconds: float, call: Callable[[], VisibleResult]) -> VisibleResult:
    """``call()`` in a daemon thread; fails when it has not returned after ``seconds`` (a hang)."""
    out: list[VisibleResult | BaseException] = []

    def run() -> None:
        try:
            out.append(call())
        except BaseException as exc:  # re-raised in the test's thread
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds}s"
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def test_the_result_names_the_challenge_as_asked_lower_case_without_the_final_dot(
    servers: tuple[Authority, Authority, Resolver],
) -> None:
    """The name given (any case, final dot or not) is reported lower-cased without the dot; where the
    value must be is the CNAME's target."""
    ns1, ns2, resolver = servers
    ns1.cnames["_acme-challenge.www.example.box"] = NAME
    ns1.txt[NAME] = ns2.txt[NAME] = ["v"]
    result = check_visible("_acme-challenge.WWW.Example.BOX.", "v", resolver_cfg=resolver)
    assert (result.fqdn, result.effective_fqdn, result.zone) == (
        "_acme-challenge.www.example.box",
        NAME,
        ZONE,
    )
    assert result.visible, result.reason


def test_a_nameserver_none_of_whose_addresses_answered_is_named_with_every_address_of_it_tried(
    servers: tuple[Authority, Authority, Resolver], monkeypatch: pytest.MonkeyPatch, without_ipv6_route: None
) -> None:
    """ns2's IPv4 address is silent and its IPv6 one unroutable: the reason lists both (and no address
    of another nameserver); the unroutable addresses are reported as skipped."""
    ns1, ns2, resolver = servers
    port = resolver.nameserver_port
    monkeypatch.setitem(STATIC, (f"ns1.{ZONE}", "AAAA"), ["2001:db8::1"])
    monkeypatch.setitem(STATIC, (f"ns2.{ZONE}", "AAAA"), ["2001:db8::2"])
    ns1.txt[NAME] = ["v"]
    ns2.stop()
    result = check_visible(NAME, "v", resolver_cfg=resolver)
    assert not result.visible
    assert result.reason == (
        f"value not yet at {NAME}: no address of ns2.{ZONE} answered: "
        f"ns2.{ZONE} (127.0.0.2:{port}): timeout after 1s, ns2.{ZONE} (2001:db8::2:{port}): {NO_V6}"
    )
    assert [(a.host, a.address, a.values, a.error, a.answered) for a in result.skipped] == [
        (f"ns1.{ZONE}", "2001:db8::1", (), NO_V6, False),
        (f"ns2.{ZONE}", "2001:db8::2", (), NO_V6, False),
    ]


def test_the_notes_list_the_skipped_addresses_then_the_tolerated_silent_ones(
    servers: tuple[Authority, Authority, Resolver], monkeypatch: pytest.MonkeyPatch, without_ipv6_route: None
) -> None:
    ns1, ns2, resolver = servers
    port = resolver.nameserver_port
    monkeypatch.setitem(STATIC, (f"ns1.{ZONE}", "A"), ["127.0.0.1", "127.0.0.3"])
    monkeypatch.setitem(STATIC, (f"ns2.{ZONE}", "AAAA"), ["2001:db8::2"])
    ns1.txt[NAME] = ns2.txt[NAME] = ["v"]
    with silent("127.0.0.3", port):
        result = check_visible(NAME, "v", resolver_cfg=resolver)
    assert result.visible, result.reason
    assert result.notes() == [
        f"skipped ns2.{ZONE} (2001:db8::2): {NO_V6}",
        f"no answer from ns1.{ZONE} (127.0.0.3:{port}): timeout after 1s",
    ]


def test_every_nameserver_is_judged_after_one_that_did_not_answer(
    servers: tuple[Authority, Authority, Resolver], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ns1's only address is silent; ns2 lacks the value: the reason names both, in order."""
    _, _, resolver = servers
    port = resolver.nameserver_port
    monkeypatch.setitem(STATIC, (f"ns1.{ZONE}", "A"), ["127.0.0.3"])
    with silent("127.0.0.3", port):
        result = check_visible(NAME, "v", resolver_cfg=resolver)
    assert result.reason == (
        f"value not yet at {NAME}: no address of ns1.{ZONE} answered: ns1.{ZONE} (127.0.0.3:{port}): "
        f"timeout after 1s; ns2.{ZONE} (127.0.0.2:{port}): no TXT record"
    )
    assert not result.visible


def test_a_silent_recursive_resolver_costs_one_timeout_and_is_named_as_not_answering(
    servers: tuple[Authority, Authority, Resolver],
) -> None:
    """The second resolver never answers: the check still returns (after ``timeout``), the value is
    not visible, and that resolver's answer says it did not answer, with the timeout as its error."""
    ns1, ns2, resolver = servers
    ns1.txt[NAME] = ns2.txt[NAME] = ["v"]
    with silent("127.0.0.4", 0) as silent_port:
        two = Resolver(
            nameservers=(*resolver.nameservers, f"127.0.0.4:{silent_port}"),
            nameserver_port=resolver.nameserver_port,
            timeout=1.0,
            lifetime=3.0,
        )
        result = within(30, lambda: check_visible(NAME, "v", resolver_cfg=two, also_recursive=True))
    assert [(a.address, a.values, a.error, a.answered) for a in result.answers if a.recursive] == [
        ("127.0.0.1", ("v",), None, True),
        ("127.0.0.4", (), "timeout after 1s", False),
    ]
    assert result.reason == f"value not yet at {NAME}: recursive (127.0.0.4:{silent_port}): timeout after 1s"
    assert not result.visible


def test_a_recursive_resolver_that_refuses_is_named_with_its_error(
    servers: tuple[Authority, Authority, Resolver],
) -> None:
    ns1, ns2, resolver = servers
    ns2.txt[NAME] = ["v"]
    ns1.refuse_txt = True  # ns1 is also the resolver
    result = check_visible(NAME, "v", resolver_cfg=resolver, also_recursive=True)
    port = resolver.nameserver_port
    assert result.reason == (
        f"value not yet at {NAME}: ns1.{ZONE} (127.0.0.1:{port}): REFUSED; "
        f"recursive (127.0.0.1:{port}): REFUSED"
    )


def test_a_nameserver_the_network_will_not_send_to_counts_as_not_answering(
    servers: tuple[Authority, Authority, Resolver], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An address the kernel refuses to send to (broadcast, no SO_BROADCAST) is a network error named
    by its kind: no DNS response came back, so ns2 did not answer from any address."""
    ns1, _, resolver = servers
    port = resolver.nameserver_port
    assert query_txt(NAME, "255.255.255.255", port, timeout=1.0) == ((), "PermissionError")
    monkeypatch.setitem(STATIC, (f"ns2.{ZONE}", "A"), ["255.255.255.255"])
    ns1.txt[NAME] = ["v"]
    result = check_visible(NAME, "v", resolver_cfg=resolver)
    assert result.reason == (
        f"value not yet at {NAME}: no address of ns2.{ZONE} answered: "
        f"ns2.{ZONE} (255.255.255.255:{port}): PermissionError"
    )


def test_a_reply_that_is_no_dns_message_is_an_answer_without_the_value(
    servers: tuple[Authority, Authority, Resolver],
) -> None:
    """Something answered (so the nameserver is not "silent"), but not with the value: named by the
    parse error."""
    ns1, ns2, resolver = servers
    ns1.txt[NAME] = ["v"]
    ns2.garbage_txt = True
    port = resolver.nameserver_port
    assert query_txt(NAME, ns2.address, port, timeout=1.0) == ((), "ShortHeader")
    result = check_visible(NAME, "v", resolver_cfg=resolver)
    assert result.reason == f"value not yet at {NAME}: ns2.{ZONE} (127.0.0.2:{port}): ShortHeader"


def test_nxdomain_is_an_answer_without_the_value(servers: tuple[Authority, Authority, Resolver]) -> None:
    ns1, ns2, resolver = servers
    ns1.txt[NAME] = ["v"]
    ns2.nxdomain_txt = True
    port = resolver.nameserver_port
    assert query_txt(NAME, ns2.address, port, timeout=1.0) == ((), None)
    result = check_visible(NAME, "v", resolver_cfg=resolver)
    assert result.reason == f"value not yet at {NAME}: ns2.{ZONE} (127.0.0.2:{port}): no TXT record"
    ns2.nxdomain_txt = False  # NXDOMAIN answers nothing, but NOERROR with the value is visible
    ns2.txt[NAME] = ["v"]
    assert check_visible(NAME, "v", resolver_cfg=resolver).visible


# --- one query (query_txt): how the TXT rrset becomes values --------------------------------------------


def test_a_txt_record_of_several_strings_is_one_value_and_values_come_sorted(
    servers: tuple[Authority, Authority, Resolver],
) -> None:
    """A TXT record may be split into several strings (RFC 8555 joins them without a separator)."""
    ns1, _, resolver = servers
    ns1.txt_rdata[NAME] = ['"zz-part-one" "-part-two"', '"aa"']
    assert query_txt(NAME, ns1.address, resolver.nameserver_port, timeout=2.0) == (
        ("aa", "zz-part-one-part-two"),
        None,
    )


def test_bytes_that_are_not_utf8_are_replaced_not_an_error(
    servers: tuple[Authority, Authority, Resolver],
) -> None:
    ns1, _, resolver = servers
    ns1.txt_rdata[NAME] = [r'"\255ok"']
    assert query_txt(NAME, ns1.address, resolver.nameserver_port, timeout=2.0) == (("\ufffdok",), None)


def test_only_txt_records_at_the_name_asked_are_values(
    servers: tuple[Authority, Authority, Resolver],
) -> None:
    """Asked at an alias, a server may answer the CNAME and the target's TXT: neither is a value at
    the alias (``check_visible`` asks at the target itself)."""
    ns1, _, resolver = servers
    alias = f"_acme-challenge.alias.{ZONE}"
    ns1.cnames[alias] = NAME
    ns1.txt[NAME] = ["v"]
    port = resolver.nameserver_port
    assert query_txt(alias, ns1.address, port, timeout=2.0) == ((), None)
    assert query_txt(NAME, ns1.address, port, timeout=2.0) == (("v",), None)


# --- route_error: what the worker says when it cannot route ---------------------------------------------


def _sockets(*, on_open: OSError | None = None, on_connect: OSError | None = None) -> SimpleNamespace:
    """A stand-in for the ``socket`` module whose sockets fail to open or to connect as given."""

    class Sock:
        def __init__(self, family: int, kind: int) -> None:
            if on_open is not None:
                raise on_open

        def connect(self, address: tuple[str, int]) -> None:
            if on_connect is not None:
                raise on_connect

        def close(self) -> None:
            pass

    return SimpleNamespace(
        AF_INET=socket.AF_INET, AF_INET6=socket.AF_INET6, SOCK_DGRAM=socket.SOCK_DGRAM, socket=Sock
    )


@pytest.mark.parametrize(
    ("error", "why"),
    [
        (
            OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol"),
            "Address family not supported by protocol",
        ),
        (OSError("an error without the system's words"), "OSError"),  # then its kind
    ],
)
def test_a_worker_that_cannot_open_an_ipv6_socket_says_so_in_the_systems_words(
    monkeypatch: pytest.MonkeyPatch, error: OSError, why: str
) -> None:
    monkeypatch.setattr(propagation, "socket", _sockets(on_open=error))
    assert propagation.route_error("2001:db8::1", 53) == f"no IPv6 on this worker ({why})"


def test_no_route_without_the_systems_words_is_named_by_its_errno(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(propagation, "socket", _sockets(on_connect=OSError(errno.ENETUNREACH, "")))
    assert propagation.route_error("192.0.2.1", 53) == "no IPv4 route from this worker (ENETUNREACH)"
