"""certqueue.dns.propagation with a zone served by TWO authoritative nameservers that disagree.

Every BIND test zone has one nameserver, so "visible only when every authoritative server answers
the value" was never tested (a mutant calling it visible when any one server had it survived). Here
the zone ``multi.test`` has ``ns1`` at 127.0.0.1 and ``ns2`` at 127.0.0.2, both on one free port
(the check asks every nameserver on ``Resolver.nameserver_port``). Each is a small authoritative
server written for this test on dnspython (real UDP, real wire format): ns2 stands for a secondary
that has not caught up yet.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from certqueue.devstack.ports import free_tcp_udp_port
from certqueue.dns.propagation import check_visible, query_txt
from certqueue.dns.zones import Resolver

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
            self.sock.sendto(self._answer(query).to_wire(), peer)

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        resp = dns.message.make_response(query)
        q = query.question[0]
        name = q.name.to_text(omit_final_dot=True).lower()
        if not (name == ZONE or name.endswith("." + ZONE)):
            resp.set_rcode(dns.rcode.REFUSED)
            return resp
        resp.flags |= dns.flags.AA
        rdtype = dns.rdatatype.to_text(q.rdtype)
        if rdtype == "TXT" and self.refuse_txt:
            resp.set_rcode(dns.rcode.REFUSED)
            return resp
        values = self.txt.get(name, []) if rdtype == "TXT" else STATIC.get((name, rdtype), [])
        if rdtype == "TXT":
            values = [f'"{v}"' for v in values]
        if values:
            resp.answer.append(dns.rrset.from_text(q.name, 60, "IN", rdtype, *values))
        else:  # NODATA: the zone's SOA in the authority section
            resp.authority.append(
                dns.rrset.from_text(dns.name.from_text(ZONE + "."), 60, "IN", "SOA", *STATIC[(ZONE, "SOA")])
            )
        return resp


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
    assert f"ns2.{ZONE} (127.0.0.2:{ns2.port}):" in result.reason and "timeout" in result.reason


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
    assert f"ns2.{ZONE} (127.0.0.2:{resolver.nameserver_port}): REFUSED" in result.reason


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
