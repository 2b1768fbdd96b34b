"""certqueue.dns.propagation as the internet is wired: nameservers with several addresses, some of a
family the worker cannot route, some silent, some serving another value.

* Two nameservers, the value on one only: a real BIND (ns, 127.0.0.1) and a small dnspython
  authoritative server (ns2, 127.0.0.2, same port; tests/fakes/dns_authority.py).
* A worker without an IPv6 route: the check runs in a fresh network namespace (``unshare -rn``: only
  a loopback interface, so an IPv6 documentation address has no route, as on most container hosts),
  against dnspython authoritative servers on 127.0.0.1 and 127.0.0.2 inside it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from certqueue.dns.propagation import check_visible, route_error
from certqueue.dns.rfc2136 import RFC2136Provider
from certqueue.dns.zones import Resolver
from devstack.bind import BindServer
from tests.fakes.dns_authority import FakeAuthority, Records

ROOT = Path(__file__).resolve().parents[3]
TWO = "twons.test"
CHALLENGE = f"_acme-challenge.www.{TWO}"


@pytest.fixture(scope="module")
def two_nameservers() -> Iterator[tuple[BindServer, FakeAuthority, Resolver]]:
    bind = BindServer(
        zone=TWO, extra_zones=(), records={TWO: [f"@ IN NS ns2.{TWO}.", "ns2 IN A 127.0.0.2"]}
    ).start()
    records: Records = {
        (TWO, "SOA"): [f"ns.{TWO}. hostmaster.{TWO}. 1 3600 600 86400 1"],
        (TWO, "NS"): [f"ns.{TWO}.", f"ns2.{TWO}."],
        (f"ns.{TWO}", "A"): ["127.0.0.1"],
        (f"ns2.{TWO}", "A"): ["127.0.0.2"],
        (CHALLENGE, "TXT"): ['"an-old-value"'],
    }
    fake = FakeAuthority("127.0.0.2", bind.port, (TWO,), records).start()
    resolver = Resolver(nameservers=(bind.nameserver,), nameserver_port=bind.port, timeout=1.0, lifetime=3.0)
    yield bind, fake, resolver
    fake.stop()
    bind.stop()


def test_two_nameservers_value_on_one_only_is_not_visible(
    two_nameservers: tuple[BindServer, FakeAuthority, Resolver],
) -> None:
    bind, fake, resolver = two_nameservers
    value = secrets.token_urlsafe(32)
    # BIND has it, ns2 does not
    RFC2136Provider(bind.provider_config(), resolver=resolver).present(CHALLENGE, value)
    result = check_visible(CHALLENGE, value, resolver_cfg=resolver)
    assert not result.visible
    assert {(a.host, a.address) for a in result.answers} == {
        (f"ns.{TWO}", "127.0.0.1"),
        (f"ns2.{TWO}", "127.0.0.2"),
    }
    assert result.reason == (
        f"value not yet at {CHALLENGE}: ns2.{TWO} (127.0.0.2:{bind.port}): 1 other value(s)"
    )
    assert result.skipped == () and result.unanswered == ()
    fake.add(CHALLENGE, "TXT", f'"{value}"')
    assert check_visible(CHALLENGE, value, resolver_cfg=resolver).visible


def test_route_error_names_the_family(without_ipv6: dict[str, Any]) -> None:
    """Inside the namespace only loopback is up: no route to any other address, of either family
    (computed there by ``netns_main``; called here too, so mutation testing runs this test)."""
    assert route_error("127.0.0.1", 53) is None
    assert without_ipv6["route_v6"].startswith("no IPv6 route from this worker (")
    assert without_ipv6["route_v4"].startswith("no IPv4 route from this worker (")
    assert "is unreachable" in without_ipv6["route_v4"]  # the system's words, not the errno name
    assert without_ipv6["route_lo"] is None


# --- a worker without an IPv6 route (inside a network namespace) ----------------------------------


def _zone(zone: str, hosts: dict[str, list[str]], txt: list[str]) -> Records:
    records: Records = {
        (zone, "SOA"): [f"{next(iter(hosts))}. hostmaster.{zone}. 1 3600 600 86400 1"],
        (zone, "NS"): [f"{h}." for h in hosts],
        (f"_acme-challenge.{zone}", "TXT"): [f'"{t}"' for t in txt],
    }
    for host, addresses in hosts.items():
        for address in addresses:
            records.setdefault((host, "AAAA" if ":" in address else "A"), []).append(address)
    return records


#: zone -> (nameserver addresses, TXT at 127.0.0.1, TXT at 127.0.0.2)
SCENARIOS: dict[str, tuple[dict[str, list[str]], list[str], list[str]]] = {
    # one nameserver with A and an unroutable AAAA (a documentation address): passes
    "one.test": ({"ns1.one.test": ["127.0.0.1", "2001:db8::53"]}, ["VALUE"], []),
    # two nameservers, each with an unroutable AAAA; the value on one only: not visible
    "two.test": (
        {"ns1.two.test": ["127.0.0.1", "2001:db8::53"], "ns2.two.test": ["127.0.0.2", "2001:db8::54"]},
        ["VALUE"],
        ["old"],
    ),
    # a reachable address that never answers (nothing on 127.0.0.3) beside one that does: passes
    "three.test": ({"ns1.three.test": ["127.0.0.1", "127.0.0.3"]}, ["VALUE"], []),
    # a nameserver reachable only over IPv6: no address of it answered, not visible
    "four.test": ({"ns1.four.test": ["127.0.0.1"], "ns6.four.test": ["2001:db8::55"]}, ["VALUE"], []),
}


def netns_main() -> None:
    """Run inside ``unshare -rn``: serve the scenarios, check each, print the results as JSON."""
    port = int(os.environ["CERTQUEUE_TEST_DNS_PORT"])
    first: Records = {}
    second: Records = {}
    for zone, (hosts, txt_first, txt_second) in SCENARIOS.items():
        first.update(_zone(zone, hosts, txt_first))
        second.update(_zone(zone, hosts, txt_second))
    zones = tuple(SCENARIOS)
    out: dict[str, Any] = {
        "route_v6": route_error("2001:db8::53", port),
        "route_v4": route_error("192.0.2.53", port),
        "route_lo": route_error("127.0.0.1", port),
    }
    with FakeAuthority("127.0.0.1", port, zones, first), FakeAuthority("127.0.0.2", port, zones, second):
        resolver = Resolver(
            nameservers=(f"127.0.0.1:{port}",), nameserver_port=port, timeout=0.5, lifetime=2.0
        )
        for zone in SCENARIOS:
            r = check_visible(f"_acme-challenge.{zone}", "VALUE", resolver_cfg=resolver)
            out[zone] = {
                "visible": r.visible,
                "reason": r.reason,
                "asked": sorted(a.address for a in r.answers),
                "skipped": [(a.address, a.error) for a in r.skipped],
                "unanswered": [a.address for a in r.unanswered],
                "notes": r.notes(),
            }
    print(json.dumps(out))


@pytest.fixture(scope="module")
def without_ipv6() -> dict[str, Any]:
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if not unshare or not ip:
        pytest.skip("needs unshare(1) and ip(8) to make a network namespace")
    probe = subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=10)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {probe.stderr.decode().strip()}")
    code = "import tests.unit.dns.test_dns_propagation as t; t.netns_main()"
    proc = subprocess.run(
        [unshare, "-rn", "sh", "-c", f'{ip} link set lo up && exec "$0" -c "$1"', sys.executable, code],
        capture_output=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "CERTQUEUE_TEST_DNS_PORT": "5353", "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert result["route_v6"] and "no IPv6 route" in result["route_v6"]  # the namespace has none
    return result


def test_nameserver_with_an_unroutable_aaaa_passes(without_ipv6: dict[str, Any]) -> None:
    r = without_ipv6["one.test"]
    assert r["visible"], r["reason"]
    assert r["asked"] == ["127.0.0.1"]
    assert [a for a, _ in r["skipped"]] == ["2001:db8::53"]
    assert "no IPv6 route" in r["skipped"][0][1]
    assert r["notes"] == [f"skipped ns1.one.test (2001:db8::53): {r['skipped'][0][1]}"]  # for the events


def test_two_nameservers_value_on_one_only_is_not_visible_without_ipv6(without_ipv6: dict[str, Any]) -> None:
    r = without_ipv6["two.test"]
    assert not r["visible"]
    assert (
        r["reason"]
        == "value not yet at _acme-challenge.two.test: ns2.two.test (127.0.0.2:5353): 1 other value(s)"
    )
    assert sorted(a for a, _ in r["skipped"]) == ["2001:db8::53", "2001:db8::54"]


def test_a_silent_address_is_tolerated_when_another_address_answers(without_ipv6: dict[str, Any]) -> None:
    r = without_ipv6["three.test"]
    assert r["visible"], r["reason"]
    assert r["unanswered"] == ["127.0.0.3"]


def test_a_nameserver_with_no_routable_address_keeps_it_not_visible(without_ipv6: dict[str, Any]) -> None:
    r = without_ipv6["four.test"]
    assert not r["visible"]
    assert r["reason"].startswith(
        "value not yet at _acme-challenge.four.test: no address of ns6.four.test answered"
    )
    # each address tried is named with its port and why it gave nothing
    assert "ns6.four.test (2001:db8::55:5353): no IPv6 route from this worker (" in r["reason"]


def test_route_error_sends_nothing() -> None:
    """It asks the kernel for a route (``connect`` on a UDP socket) and must not contact the
    nameserver: a TCP connect would open a connection to it."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.3)
        assert route_error("127.0.0.1", listener.getsockname()[1]) is None
        with pytest.raises(TimeoutError):
            listener.accept()
