"""certqueue_acme_request_duration_seconds{ca, endpoint} from real ACME requests: an account
registered and an order opened at Pebble are timed per request by the client's network layer and
served by the exporter with the directory's host and the ACME resource (never an id)."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from certqueue import metrics
from certqueue.acme.account import generate_account_key, register_account
from certqueue.acme.client import AcmeClient
from certqueue.config import Settings
from tests.conftest_pebble import PebbleStack

pytestmark = pytest.mark.integration


def test_acme_requests_are_timed_by_ca_and_endpoint(
    pebble: PebbleStack, settings_factory: Callable[..., Settings], tmp_path: object
) -> None:
    settings = settings_factory(**{"broker.url": "", "broker.filesystem_path": f"{tmp_path}/broker"})
    client = AcmeClient(pebble.directory_url, generate_account_key(), verify=pebble.ca_bundle)
    register_account(client, "ops@example.com")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "metrics.acme.example.test")]))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("metrics.acme.example.test")]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    client.new_order(csr.public_bytes(serialization.Encoding.PEM))
    metrics.flush(settings)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics.CertqueueCollector())
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    counts = {
        (s.labels["ca"], s.labels["endpoint"]): s.value
        for s in families["certqueue_acme_request_duration_seconds"].samples
        if s.name.endswith("_count")
    }
    ca = urlsplit(pebble.directory_url).netloc
    assert {e for c, e in counts if c == ca} >= {"directory", "newNonce", "newAccount", "newOrder"}, counts
    # labels name a CA's host and an ACME resource, never an id (a request of another test's CA
    # still in flight may land in this process's counts: its labels obey the same rule)
    resources = {name for name, _rx in metrics._ENDPOINTS} | {"other"}
    assert all(c and "/" not in c for c, _e in counts), counts  # a host, not a URL
    assert {e for _c, e in counts} <= resources, counts
    assert counts[(ca, "newOrder")] >= 1
