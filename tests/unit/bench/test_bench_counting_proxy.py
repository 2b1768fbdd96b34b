"""The newOrder-counting relay in front of Pebble (tests/fakes/acme_counting_proxy.py), which the
storm uses to count orders at the CA instead of only in our database.

Against the session's real Pebble: a client that talks only to the proxy registers and opens
orders; the proxy counts each newOrder Pebble created (201) apart from one it refused, and every URL
the client was handed names the proxy, so nothing bypasses the count."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import requests

from certqueue import crypto
from certqueue.acme.account import generate_account_key, register_account
from certqueue.acme.client import AcmeClient, clear_directory_cache
from tests.fakes.acme_counting_proxy import CountingProxy, Lanes, classify

NAMED = {"newOrder": "/order-plz", "newAccount": "/sign-me-up", "newNonce": "/nonce-plz"}


@pytest.mark.parametrize(
    ("path", "counter"),
    [
        ("/order-plz", "newOrder"),
        ("/sign-me-up", "newAccount"),
        ("/nonce-plz", "newNonce"),
        ("/my-order/abc", "/my-order/"),
        ("/finalize-order/abc", "/finalize-order/"),
        ("/order-plz/extra", "/order-plz/"),  # only the exact newOrder URL is a new order
        ("/", "/"),
    ],
)
def test_classify(path, counter):
    assert classify(path, NAMED) == counter


@pytest.fixture
def proxy(pebble, tmp_path: Path):
    p = CountingProxy(pebble.directory_url, pebble.ca_bundle, tmp_path).start()
    yield p
    p.stop()
    clear_directory_cache()


def _client(proxy: CountingProxy) -> AcmeClient:
    client = AcmeClient(
        proxy.directory_url, generate_account_key(), verify=str(proxy.combined_ca_bundle), timeout=10
    )
    register_account(client, "ops@example.com")
    return client


def test_counts_orders_pebble_created(proxy, pebble):
    client = _client(proxy)
    assert proxy.counts().get("newAccount", 0) >= 1
    assert proxy.new_orders == 0
    orders = []
    for i in range(3):
        csr = crypto.make_csr(crypto.new_private_key_pem(), [f"count{i}.example.com"])
        orders.append(client.new_order(csr))
    counts = proxy.counts()
    assert proxy.new_orders == 3
    # badNonce retries are relayed and counted as requests, but only created orders count as 201
    assert counts["newOrder"] >= 3
    # every URL handed to the client names the proxy: its later requests are counted too
    for order in orders:
        assert order.uri.startswith(proxy.url)
        assert all(a.uri.startswith(proxy.url) for a in order.authorizations)
    assert counts.get("/authZ/", 0) >= 3


def test_refused_new_order_is_not_counted_as_created(proxy):
    _client(proxy)
    directory = requests.get(proxy.directory_url, verify=str(proxy.combined_ca_bundle), timeout=10).json()
    resp = requests.post(
        directory["newOrder"],
        data=b'{"protected": "x", "payload": "y", "signature": "z"}',
        headers={"Content-Type": "application/jose+json"},
        verify=str(proxy.combined_ca_bundle),
        timeout=10,
    )
    assert resp.status_code >= 400
    counts = proxy.counts()
    assert counts["newOrder"] == 1
    assert proxy.new_orders == 0
    assert counts[f"newOrder {resp.status_code}"] == 1


def test_counts_endpoint(proxy):
    _client(proxy)
    resp = requests.get(f"{proxy.url}/counts", verify=str(proxy.combined_ca_bundle), timeout=10)
    assert resp.status_code == 200
    assert resp.json()["newAccount"] >= 1


def _overlaps(lanes: Lanes, plan: list[str], hold_s: float = 0.05) -> tuple[set[tuple[str, str]], int]:
    """Run one thread per lane name in ``plan`` at once; returns the pairs of lanes seen running at
    the same moment and the most requests of one lane seen at once."""
    running: list[str] = []
    lock = threading.Lock()
    pairs: set[tuple[str, str]] = set()
    most = [0]
    start = threading.Barrier(len(plan))

    def one(lane: str) -> None:
        start.wait()
        with lanes.hold(lane):
            with lock:
                running.append(lane)
                pairs.update((a, b) for a in running for b in running if a != b)
                most[0] = max(most[0], running.count(lane))
            time.sleep(hold_s)
            with lock:
                running.remove(lane)

    threads = [threading.Thread(target=one, args=(lane,)) for lane in plan]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads), "a request never got its turn"
    return pairs, most[0]


def test_guard_lanes_never_overlap_but_each_runs_concurrently():
    lanes = Lanes()
    pairs, most = _overlaps(lanes, ["newOrder"] * 6 + ["/authZ/"] * 6)
    assert pairs == set()  # a newOrder never ran beside an authz fetch
    assert most > 1  # but newOrders (or authz fetches) ran beside each other
    assert lanes.waits > 0


def test_guard_takes_turns_under_a_steady_stream():
    # a stream of newOrders that would keep the lane busy forever must still let an authz through
    lanes = Lanes()
    stop = threading.Event()
    got_in = threading.Event()

    def stream() -> None:
        while not stop.is_set():
            with lanes.hold("newOrder"):
                time.sleep(0.01)

    workers = [threading.Thread(target=stream) for _ in range(4)]
    for w in workers:
        w.start()
    time.sleep(0.05)

    def authz() -> None:
        with lanes.hold("/authZ/"):
            got_in.set()

    t = threading.Thread(target=authz)
    t.start()
    try:
        assert got_in.wait(5), "the authz fetch starved behind the newOrders"
    finally:
        stop.set()
        for w in [*workers, t]:
            w.join(timeout=5)


def test_guard_is_off_unless_asked(pebble, tmp_path: Path):
    off = CountingProxy(pebble.directory_url, pebble.ca_bundle, tmp_path / "off")
    on = CountingProxy(pebble.directory_url, pebble.ca_bundle, tmp_path / "on", guard_pebble_deadlock=True)
    assert off.lanes is None and "guard waits" not in off.counts()
    assert on.counts()["guard waits"] == 0
