"""The newOrder-counting relay in front of Pebble (tests/fakes/acme_counting_proxy.py), which the
storm uses to count orders at the CA instead of only in our database.

Against the session's real Pebble: a client that talks only to the proxy registers and opens
orders; the proxy counts each newOrder Pebble created (201) apart from one it refused, and every URL
the client was handed names the proxy, so nothing bypasses the count."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from certqueue import crypto
from certqueue.acme.account import generate_account_key, register_account
from certqueue.acme.client import AcmeClient, clear_directory_cache
from tests.fakes.acme_counting_proxy import CountingProxy, classify

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
