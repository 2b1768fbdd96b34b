"""TLS-ALPN-01 (RFC 8737) end to end: Pebble validates through a round-robin TCP load balancer in
front of two ``certqueue tlsalpn01`` replicas, each answering from the database whatever challenge
any worker presented; DNS names and an IP address (RFC 8738: the reverse name as SNI)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest
from cryptography import x509

from certqueue import crypto
from certqueue.db import session_scope
from certqueue.models import Certificate, Challenge, Issuance, TlsAlpn01Token
from devstack.ports import free_port
from tests.conftest_stack import Pipeline, build_pipeline, services_available, teardown_pipeline
from tests.fakes.tcp_balancer import TcpBalancer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Pipeline, TcpBalancer, list[int]]]:
    backend = request.param
    why = services_available() if backend == "postgres" else None
    if why:
        pytest.fail(why)
    p = build_pipeline(
        tmp_path_factory.mktemp("tlsalpn"),
        backend=backend,
        pools=("all",) if backend == "sqlite" else ("acme",),
        extra_env={"CERTQUEUE_ACME__IP_IDENTIFIER_PROFILES": '["*"]'},
    )
    balancer = None
    try:
        ports = [free_port(), free_port()]
        for i, port in enumerate(ports):
            p.stack.start(
                f"tlsalpn01-{i}",
                ["tlsalpn01", "--host", "127.0.0.1", "--port", str(port)],
                ready="tls-alpn-01 responder on",
            )
        balancer = TcpBalancer(p.pebble.tls_port, ports).start()
        yield p, balancer, ports
    finally:
        if balancer is not None:
            balancer.stop()
        teardown_pipeline(p)


def _leaf(cid: str) -> tuple[x509.Certificate, Issuance]:
    with session_scope(write=False) as s:
        iss = s.get(Issuance, s.get(Certificate, cid).current_issuance_id)
        s.expunge(iss)
    return x509.load_pem_x509_certificate(iss.cert_pem.encode()), iss


def test_four_names_validated_by_two_replicas(world) -> None:
    p, balancer, ports = world
    names = [f"alpn{i}.example.test" for i in range(4)]
    before = dict(balancer.connections)
    cid = p.request(names, challenge_type="tls-alpn-01")
    p.wait_state(cid, "ACTIVE", timeout=90)
    leaf, iss = _leaf(cid)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == names
    crypto.verify_chain(
        iss.cert_pem, crypto.split_pem_chain(iss.chain_pem), [p.pebble.roots_pem()], name=names[0]
    )
    # Pebble connected once per name; the balancer spread them over both replicas
    served = {port: balancer.connections[port] - before.get(port, 0) for port in ports}
    assert sum(served.values()) >= 4 and all(n >= 1 for n in served.values()), served
    for i in range(2):
        assert "presenting the challenge certificate for alpn" in p.stack.log(f"tlsalpn01-{i}")
    with session_scope(write=False) as s:
        types = {c.type for c in s.query(Challenge).filter(Challenge.certificate_id == cid)}
        assert types == {"tls-alpn-01"}
    assert p.count(TlsAlpn01Token, TlsAlpn01Token.certificate_id == cid) == 0  # cleaned up


def test_ip_address_with_tls_alpn01(world) -> None:
    p, _balancer, _ports = world
    cid = p.request(["127.0.0.1"], challenge_type="tls-alpn-01")
    p.wait_state(cid, "ACTIVE", timeout=90)
    leaf, _ = _leaf(cid)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    logs = p.stack.log("tlsalpn01-0") + p.stack.log("tlsalpn01-1")
    assert "presenting the challenge certificate for 127.0.0.1" in logs
