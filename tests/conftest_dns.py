"""pytest fixtures for DNS-01: BIND9, moto's Route53, and the Cloudflare and Azure DNS fakes.

A plugin module: register it with ``-p tests.conftest_dns`` or ``pytest_plugins = ["tests.conftest_dns"]``.

* ``bind`` (session): a real ``named`` (devstack.bind.BindServer) with zones ``example.test``
  (apex, ``ns`` and wildcard A 127.0.0.1) and ``validation.test``, a TSIG key for TXT updates, and the
  CNAME fixtures below for delegated-validation tests.
* ``bind_resolver`` (session): a ``certqueue.dns.zones.Resolver`` that asks that BIND for everything.
* ``dns_moto`` (session): moto in server mode; ``route53_zone`` (function) a fresh hosted zone
  ``example.test`` in it, with moto reset around each test.
* ``cloudflare_api`` / ``azure_dns_api`` (function): the fakes, with fresh state per test.
* ``challenge_name`` (function): a fresh ``_acme-challenge.<random>.example.test`` per test.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from certqueue.dns.zones import Resolver
from devstack.bind import BindServer
from devstack.moto import MotoServer
from tests.fakes.azure_dns_api import FakeAzureDNSAPI
from tests.fakes.cloudflare_api import FakeCloudflareAPI

#: static records for CNAME-following tests (TXT is the only type the TSIG key may change)
BIND_RECORDS = {
    "example.test": [
        # one hop into the second zone: delegated validation as lego/cert-manager document it
        "_acme-challenge.alias CNAME _acme-challenge.alias.validation.test.",
        # two hops
        "_acme-challenge.chain CNAME hop.example.test.",
        "hop CNAME _acme-challenge.chain.validation.test.",
        # a loop
        "_acme-challenge.loop CNAME loop-back.example.test.",
        "loop-back CNAME _acme-challenge.loop.example.test.",
    ],
}


@pytest.fixture(scope="session")
def bind() -> Iterator[BindServer]:
    server = BindServer(zone="example.test", extra_zones=("validation.test",), records=BIND_RECORDS)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def bind_resolver(bind: BindServer) -> Resolver:
    return Resolver(nameservers=(bind.nameserver,), nameserver_port=bind.port, timeout=1.0, lifetime=3.0)


@pytest.fixture
def challenge_name() -> str:
    return f"_acme-challenge.t{secrets.token_hex(5)}.example.test"


@pytest.fixture(scope="session")
def dns_moto() -> Iterator[MotoServer]:
    server = MotoServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def route53_zone(dns_moto: MotoServer) -> Iterator[str]:
    """A fresh hosted zone ``example.test`` in moto; returns its id (without ``/hostedzone/``)."""
    import boto3

    dns_moto.reset()
    client = boto3.client(
        "route53",
        endpoint_url=dns_moto.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="AKIDTESTING",
        aws_secret_access_key="testing",
    )
    zone = client.create_hosted_zone(Name="example.test.", CallerReference=secrets.token_hex(8))
    yield str(zone["HostedZone"]["Id"]).rsplit("/", 1)[-1]
    dns_moto.reset()


@pytest.fixture
def cloudflare_api() -> Iterator[FakeCloudflareAPI]:
    fake = FakeCloudflareAPI(zones=("example.test",))
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def azure_dns_api(tmp_path: Path) -> Iterator[FakeAzureDNSAPI]:
    fake = FakeAzureDNSAPI(tmp_path / "azure-tls", zones=("example.test",))
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()
