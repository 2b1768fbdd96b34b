"""IP-address certificates (RFC 8738) from Pebble, end to end: HTTP-01 on the address itself, through
the real responder and worker; one certificate may mix IP addresses and DNS names."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest
from cryptography import x509

from certqueue import certificates, crypto
from certqueue.db import session_scope
from certqueue.errors import InvalidInput
from certqueue.models import Certificate, Issuance
from tests.conftest_stack import Pipeline, build_pipeline, services_available, teardown_pipeline

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def p(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    why = services_available()
    if why:
        pytest.fail(why)
    pipeline = build_pipeline(
        tmp_path_factory.mktemp("ip"),
        backend="postgres",
        pools=("acme",),
        # Pebble has no profiles and issues for IP addresses: any profile, as for a private CA
        extra_env={"CERTQUEUE_ACME__IP_IDENTIFIER_PROFILES": '["*"]'},
    )
    yield pipeline
    teardown_pipeline(pipeline)


def _leaf(cid: str) -> tuple[x509.Certificate, Issuance]:
    with session_scope(write=False) as s:
        c = s.get(Certificate, cid)
        iss = s.get(Issuance, c.current_issuance_id)
        s.expunge(iss)
    return x509.load_pem_x509_certificate(iss.cert_pem.encode()), iss


@pytest.mark.parametrize(
    "names",
    [["127.0.0.1"], ["ip-mixed.example.test", "127.0.0.1"]],
    ids=["ip-only", "ip-and-dns"],
)
def test_ip_address_certificate_validated_with_http01(p: Pipeline, names: list[str]) -> None:
    cid = p.request(names)
    p.wait_state(cid, "ACTIVE", timeout=90)
    leaf, iss = _leaf(cid)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == [n for n in names if n != "127.0.0.1"]
    chain = crypto.split_pem_chain(iss.chain_pem)
    crypto.verify_chain(iss.cert_pem, chain, [p.pebble.roots_pem()], name="127.0.0.1")


def test_ip_address_with_dns01_is_refused_before_anything_is_written(p: Pipeline) -> None:
    before = p.count(Certificate)
    with pytest.raises(InvalidInput, match="RFC 8738") as info:
        certificates.CertificateRequest.build(
            domains=["127.0.0.1"], challenge_type="dns-01", dns_provider="rfc2136"
        )
    assert info.value.reason == "ip:challenge"
    assert p.count(Certificate) == before
