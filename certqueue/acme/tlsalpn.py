"""TLS-ALPN-01 (RFC 8737): the challenge type for the ``acme`` library (which no longer ships it),
and the validation certificate a responder presents. Pure: no I/O.

The CA opens a TLS connection to the name (or, for an IP address, RFC 8738: its reverse name as
SNI) offering only the ALPN protocol ``acme-tls/1``; the responder answers with a self-signed
certificate for that one identifier carrying the critical ``acmeIdentifier`` extension, whose value
is the SHA-256 digest of the key authorization.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from typing import Any

import josepy as jose
from acme import challenges
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ALPN_PROTOCOL = "acme-tls/1"
#: id-pe-acmeIdentifier (RFC 8737 section 6.1)
ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")


@challenges.ChallengeResponse.register
class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """The (empty but for the key authorization) answer to a tls-alpn-01 challenge."""

    typ = "tls-alpn-01"


@challenges.Challenge.register
class TLSALPN01(challenges.KeyAuthorizationChallenge):
    typ = "tls-alpn-01"
    response_cls = TLSALPN01Response

    def validation(self, account_key: jose.JWK, **unused: Any) -> str:
        return self.key_authorization(account_key)


def acme_identifier_value(key_authorization: str) -> bytes:
    """The extension's DER value: an OCTET STRING of the key authorization's SHA-256 digest."""
    digest = hashlib.sha256(key_authorization.encode()).digest()
    return b"\x04\x20" + digest


def identifier_from_sni(server_name: str) -> str:
    """The identifier a TLS SNI names: the name itself (lowercase, no final dot), or for a reverse
    name (``1.2.0.192.in-addr.arpa``, ``...ip6.arpa``, RFC 8738 section 6) the IP address."""
    name = server_name.strip().rstrip(".").lower()
    if name.endswith(".in-addr.arpa"):
        parts = name[: -len(".in-addr.arpa")].split(".")
        if len(parts) == 4:
            try:
                return str(ipaddress.IPv4Address(".".join(reversed(parts))))
            except ValueError:
                return name
    if name.endswith(".ip6.arpa"):
        nibbles = name[: -len(".ip6.arpa")].split(".")
        if len(nibbles) == 32 and all(len(n) == 1 for n in nibbles):
            hexed = "".join(reversed(nibbles))
            try:
                return ipaddress.IPv6Address(int(hexed, 16)).compressed
            except ValueError:
                return name
    return name


def challenge_certificate(
    identifier: str, key_authorization: str, key: ec.EllipticCurvePrivateKey, *, now: dt.datetime
) -> x509.Certificate:
    """The self-signed validation certificate for one identifier (a DNS name or an IP address)."""
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(identifier))
    except ValueError:
        san = x509.DNSName(identifier)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "certqueue tls-alpn-01")])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, acme_identifier_value(key_authorization)),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
