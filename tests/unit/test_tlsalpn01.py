"""certqueue.tlsalpn01 and certqueue.acme.tlsalpn on real sockets and a real database: the
responder answers an ``acme-tls/1`` handshake for a pending identifier with the RFC 8737 validation
certificate, refuses unknown and expired ones, and maps reverse names to IP addresses (RFC 8738)."""

from __future__ import annotations

import datetime as dt
import hashlib
import socket
import ssl
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509

from certqueue.acme.tlsalpn import ACME_IDENTIFIER_OID, ALPN_PROTOCOL, identifier_from_sni
from certqueue.db import session_scope
from certqueue.models import TlsAlpn01Token, utcnow
from certqueue.tlsalpn01 import TlsAlpn01Server, serve


@pytest.mark.parametrize(
    ("sni", "identifier"),
    [
        ("Www.Example.COM.", "www.example.com"),
        ("1.0.0.127.in-addr.arpa", "127.0.0.1"),
        ("1.2.0.192.in-addr.arpa.", "192.0.2.1"),
        ("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa", "2001:db8::1"),
        ("2.1.in-addr.arpa", "2.1.in-addr.arpa"),  # not four labels: left as a name
        ("x.0.0.127.in-addr.arpa", "x.0.0.127.in-addr.arpa"),
    ],
)
def test_identifier_from_sni(sni: str, identifier: str) -> None:
    assert identifier_from_sni(sni) == identifier


@pytest.fixture
def responder(db_settings: Any) -> Iterator[TlsAlpn01Server]:
    srv = serve("127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    t.join(5)
    srv.server_close()


def _token(
    identifier: str, key_authorization: str, *, expires_in: float = 600, token: str = "t" * 43
) -> None:
    with session_scope() as s:
        s.add(
            TlsAlpn01Token(
                token=token,
                identifier=identifier,
                key_authorization=key_authorization,
                certificate_id="cert_x",
                challenge_id=1,
                expires_at=utcnow() + dt.timedelta(seconds=expires_in),
            )
        )


def _handshake(srv: TlsAlpn01Server, sni: str) -> tuple[x509.Certificate, str | None]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols([ALPN_PROTOCOL])
    with socket.create_connection(srv.server_address[:2], timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return x509.load_der_x509_certificate(der), tls.selected_alpn_protocol()


def test_pending_name_gets_its_validation_certificate(responder: TlsAlpn01Server) -> None:
    _token("alpn.example.test", "tok.thumb")
    cert, alpn = _handshake(responder, "alpn.example.test")
    assert alpn == ALPN_PROTOCOL
    ext = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    assert ext.critical
    assert ext.value.value == b"\x04\x20" + hashlib.sha256(b"tok.thumb").digest()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["alpn.example.test"]


def test_ip_address_by_its_reverse_name(responder: TlsAlpn01Server) -> None:
    import ipaddress

    _token("127.0.0.1", "ip.thumb")
    cert, _ = _handshake(responder, "1.0.0.127.in-addr.arpa")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    ext = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    assert ext.value.value[2:] == hashlib.sha256(b"ip.thumb").digest()


@pytest.mark.parametrize("case", ["unknown", "expired"])
def test_no_pending_challenge_no_certificate(responder: TlsAlpn01Server, case: str) -> None:
    if case == "expired":
        _token("old.example.test", "old.thumb", expires_in=-1)
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        _handshake(responder, "old.example.test" if case == "expired" else "nobody.example.test")


def test_a_new_key_authorization_replaces_the_cached_certificate(responder: TlsAlpn01Server) -> None:
    _token("again.example.test", "first.thumb", token="a" * 43)
    first, _ = _handshake(responder, "again.example.test")
    with session_scope() as s:
        s.query(TlsAlpn01Token).delete()
    _token("again.example.test", "second.thumb", token="b" * 43)
    second, _ = _handshake(responder, "again.example.test")
    value = second.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID).value.value
    assert (
        value[2:]
        == hashlib.sha256(b"second.thumb").digest()
        != first.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID).value.value[2:]
    )
