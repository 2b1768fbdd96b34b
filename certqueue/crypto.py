"""Key, CSR and certificate handling: the only module that builds or parses X.509 objects.

Owns: private key generation and PEM (PKCS#8) serialization, CSRs for an order, parsing an issued
certificate into a ``CertInfo`` value, splitting chains, checking that a key matches a certificate,
verifying a chain against trusted roots, and PKCS#12 export for targets that want it.

Key types are short strings stored with each certificate: ``ec256``, ``ec384``, ``rsa2048``,
``rsa3072``, ``rsa4096``. The guide's ``key_size=2048`` maps to ``rsa2048`` through
``key_type_from``.

Every parse failure is an ``InvalidInput`` that names what was wrong (a block type, a count), never
the bytes: a PEM handed to this module may hold a private key.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import DNSName, IPAddress, PolicyBuilder, Store, VerificationError

from certqueue.csr_fields import (  # checked there, without cryptography (validation re-exports them)
    DEFAULT_KEY_TYPE,
    key_type_from,
    normalize_domains,
    validate_country,
    validate_subject_field,
)
from certqueue.csr_fields import KEY_TYPES as KEY_TYPES  # re-exported
from certqueue.errors import InvalidInput

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

_CURVES: Final[dict[str, type[ec.EllipticCurve]]] = {"ec256": ec.SECP256R1, "ec384": ec.SECP384R1}
_CURVE_NAMES: Final = {"secp256r1": "ec256", "secp384r1": "ec384", "secp521r1": "ec521"}
_CN_MAX: Final = 64  # ub-common-name (RFC 5280)
_MAX_CSR_NAMES: Final = 100

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?\r?\n?-----END \1-----", re.DOTALL)
_CERT_LABEL: Final = b"CERTIFICATE"
_CSR_LABELS: Final = (b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST")
_KEY_LABELS: Final = (b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY")


@dataclass(frozen=True)
class CertInfo:
    """What certqueue keeps about an issued certificate (an ``issuances`` row, a deployment check)."""

    names: tuple[str, ...]  # subjectAltName entries: DNS names, then IP addresses as text
    common_name: str | None
    serial: str  # lowercase hex, no separators
    not_before: dt.datetime  # aware, UTC
    not_after: dt.datetime  # aware, UTC
    fingerprint_sha256: str  # hex of SHA-256 over the DER
    issuer: str  # RFC 4514 string
    key_type: str  # ec256, ec384, rsa2048, ... (or e.g. "rsa1024", "ed25519" for imported ones)
    authority_key_id: str | None  # hex of the AKI keyIdentifier (with ``serial``, the ARI cert id)

    @property
    def lifetime(self) -> dt.timedelta:
        return self.not_after - self.not_before


# --- keys ---------------------------------------------------------------------------------------


def generate_private_key(key_type: str = DEFAULT_KEY_TYPE) -> PrivateKey:
    """A new private key of ``key_type`` (see ``KEY_TYPES``)."""
    kt = key_type_from(key_type=key_type)
    if kt in _CURVES:
        return ec.generate_private_key(_CURVES[kt]())
    return rsa.generate_private_key(public_exponent=65537, key_size=int(kt[3:]))


def private_key_to_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM. Encrypt it with the keystore before it touches the database."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def new_private_key_pem(key_type: str = DEFAULT_KEY_TYPE) -> bytes:
    return private_key_to_pem(generate_private_key(key_type))


def load_private_key(pem: str | bytes) -> PrivateKey:
    """Parse one unencrypted RSA or EC private key (PKCS#8, or the traditional PKCS#1 / SEC1 forms)."""
    data = _as_bytes(pem, "private_key")
    blocks = _pem_blocks(data)
    key_blocks = [b for label, b in blocks if label in _KEY_LABELS]
    if any(label == b"ENCRYPTED PRIVATE KEY" for label, _ in blocks):
        raise InvalidInput("encrypted private keys are not supported; decrypt it first", field="private_key")
    if len(key_blocks) != 1:
        raise InvalidInput(
            f"expected one PEM private key, found {len(key_blocks)} (blocks: {_labels(blocks)})",
            field="private_key",
        )
    try:
        key = serialization.load_pem_private_key(key_blocks[0], password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # the library's message may quote parts of the input: do not chain or repeat it
        raise InvalidInput("the private key PEM does not parse", field="private_key") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise InvalidInput(
            f"unsupported private key type {_key_type_name(key.public_key())}; use RSA or ECDSA",
            field="private_key",
        )
    return key


def key_type_of(key: PrivateKey) -> str:
    return _key_type_name(key.public_key())


# --- CSR ----------------------------------------------------------------------------------------


def make_csr(
    key: PrivateKey | str | bytes,
    names: Iterable[str],
    *,
    organization: str | None = None,
    country: str | None = None,
    state: str | None = None,
    locality: str | None = None,
    allow_ip: bool = False,
) -> bytes:
    """A PEM CSR for ``names`` (at most 100, validated and IDNA-encoded), signed by ``key``.

    The subject CN is the first non-wildcard name when it fits in 64 characters, otherwise omitted
    (the names are in the subjectAltName either way). ACME CAs ignore the other subject fields; they
    are kept because the guide offers them and private CAs may honour them.
    """
    private_key = (
        key if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) else load_private_key(key)
    )
    domains = normalize_domains(names, allow_ip=allow_ip, max_names=_MAX_CSR_NAMES)
    sans: list[x509.GeneralName] = []
    for name in domains:
        ip = _ip_or_none(name)
        sans.append(x509.IPAddress(ip) if ip is not None else x509.DNSName(name))
    # most significant first, as CAs and openssl write them: C, ST, L, O, CN
    attrs: list[x509.NameAttribute[str]] = []
    if country:  # None and "" both mean absent (database columns hold either)
        attrs.append(x509.NameAttribute(NameOID.COUNTRY_NAME, validate_country(country)))
    for oid, value, field in (
        (NameOID.STATE_OR_PROVINCE_NAME, state, "state"),
        (NameOID.LOCALITY_NAME, locality, "locality"),
        (NameOID.ORGANIZATION_NAME, organization, "organization"),
    ):
        if value:
            attrs.append(x509.NameAttribute(oid, validate_subject_field(value, field=field)))
    cn = next((n for n in domains if not n.startswith("*.") and _ip_or_none(n) is None), None)
    if cn is not None and len(cn) <= _CN_MAX:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(attrs))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(private_key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def load_csr(pem: str | bytes) -> x509.CertificateSigningRequest:
    """Parse one PEM CSR and check its self-signature."""
    data = _as_bytes(pem, "csr")
    blocks = [b for label, b in _pem_blocks(data) if label in _CSR_LABELS]
    if len(blocks) != 1:
        raise InvalidInput(f"expected one PEM certificate request, found {len(blocks)}", field="csr")
    try:
        csr = x509.load_pem_x509_csr(blocks[0])
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm):
        raise InvalidInput("the certificate request PEM does not parse", field="csr") from None
    if not valid:
        raise InvalidInput("the certificate request signature does not verify", field="csr")
    return csr


# --- certificates -------------------------------------------------------------------------------


def load_certificates(pem: str | bytes, *, field: str = "chain") -> list[x509.Certificate]:
    """Every certificate in a PEM bundle, in order. Text around the blocks is ignored; a private key
    inside a certificate bundle is refused (it would otherwise be stored or deployed as a "chain")."""
    data = _as_bytes(pem, field)
    blocks = _pem_blocks(data)
    if any(label in _KEY_LABELS or label == b"ENCRYPTED PRIVATE KEY" for label, _ in blocks):
        raise InvalidInput("a private key was found where certificates were expected", field=field)
    certs: list[x509.Certificate] = []
    for label, block in blocks:
        if label != _CERT_LABEL:
            raise InvalidInput(
                f"unexpected PEM block {label.decode()!r} in a certificate bundle", field=field
            )
        try:
            certs.append(x509.load_pem_x509_certificate(block))
        except ValueError:
            raise InvalidInput(
                f"certificate {len(certs) + 1} of the bundle does not parse", field=field
            ) from None
    if not certs:
        raise InvalidInput("no PEM certificate found", field=field)
    return certs


def load_certificate(pem: str | bytes) -> x509.Certificate:
    """Exactly one certificate."""
    certs = load_certificates(pem, field="certificate")
    if len(certs) != 1:
        raise InvalidInput(f"expected one certificate, found {len(certs)}", field="certificate")
    return certs[0]


def split_pem_chain(pem: str | bytes) -> list[str]:
    """Split a PEM bundle into one canonical PEM string per certificate, in order."""
    return [cert_to_pem(c) for c in load_certificates(pem)]


def cert_to_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def cert_info(pem: str | bytes | x509.Certificate) -> CertInfo:
    """Parse the leaf (the first certificate of ``pem``) into a ``CertInfo``."""
    cert = pem if isinstance(pem, x509.Certificate) else load_certificates(pem, field="certificate")[0]
    names: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names.extend(san.get_values_for_type(x509.DNSName))
        names.extend(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        pass
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = cns[0].value if cns else None
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        aki_hex = aki.key_identifier.hex() if aki.key_identifier is not None else None
    except x509.ExtensionNotFound:
        aki_hex = None
    return CertInfo(
        names=tuple(names),
        common_name=cn if isinstance(cn, str) else None,
        serial=format(cert.serial_number, "x"),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        fingerprint_sha256=hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
        issuer=cert.issuer.rfc4514_string(),
        key_type=_key_type_name(cert.public_key()),
        authority_key_id=aki_hex,
    )


def key_matches_certificate(key_pem: str | bytes, cert_pem: str | bytes | x509.Certificate) -> bool:
    """True when the private key is the one for the leaf (first certificate) of ``cert_pem`` (or
    for ``cert_pem`` itself, parsed already).

    Targets check this before deploying: moto's ACM does not, and a mismatched pair is an outage.
    """
    key = load_private_key(key_pem)
    cert = (
        cert_pem
        if isinstance(cert_pem, x509.Certificate)
        else load_certificates(cert_pem, field="certificate")[0]
    )
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.public_key().public_bytes(*fmt) == cert.public_key().public_bytes(*fmt)


def verify_chain(
    leaf_pem: str | bytes,
    chain_pems: Sequence[str | bytes],
    roots_pems: Sequence[str | bytes],
    *,
    name: str | None = None,
    at: dt.datetime | None = None,
) -> None:
    """Check that the leaf chains to one of ``roots_pems`` through ``chain_pems`` for TLS server use.

    Uses cryptography's web-PKI verifier (signatures, validity at ``at`` or now, basic constraints,
    key usage, serverAuth EKU, name constraints). The leaf is checked for ``name``, or by default for
    its own first subjectAltName (a wildcard is checked through one concrete name under it). Each
    element of the sequences may hold several PEM certificates. Raises ``InvalidInput`` (reason
    ``crypto:chain_untrusted``) naming why it failed.
    """
    leaf = load_certificates(leaf_pem, field="certificate")[0]
    intermediates = [c for p in chain_pems for c in load_certificates(p, field="chain")]
    roots = [c for p in roots_pems for c in load_certificates(p, field="roots")]
    if not roots:
        raise InvalidInput("no trusted roots given", field="roots")
    subject = _verification_subject(leaf, name)
    builder = PolicyBuilder().store(Store(roots))
    builder = builder.time(at if at is not None else dt.datetime.now(dt.UTC))
    try:
        builder.build_server_verifier(subject).verify(leaf, intermediates)
    except VerificationError as exc:
        why = str(exc)
        if "no interior errors" in why:
            why += " (no path to a trusted root: an intermediate is missing or the root is not trusted)"
        raise InvalidInput(
            f"certificate chain does not verify: {why}", field="chain", reason="crypto:chain_untrusted"
        ) from exc


def is_ca(cert: x509.Certificate) -> bool:
    """True when the certificate's basic constraints say it is a CA."""
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def verify_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True when ``issuer``'s key signed ``cert`` and the names link (no policy checks)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def to_pkcs12(
    key_pem: str | bytes,
    cert_pem: str | bytes,
    chain_pem: str | bytes | None,
    password: bytes | None,
    *,
    friendly_name: str | None = None,
    legacy: bool = False,
) -> bytes:
    """A PKCS#12 (PFX) holding key, leaf and chain.

    With a password the bag is encrypted with AES-256 and PBKDF2 (cryptography's best available);
    ``legacy=True`` uses 3DES/SHA-1 for old consumers (Windows Server 2016, old Java) instead.
    """
    key = load_private_key(key_pem)
    cert = load_certificate(cert_pem)
    if not key_matches_certificate(key_pem, cert_pem):
        raise InvalidInput(
            "the private key does not match the certificate",
            field="private_key",
            reason="crypto:key_mismatch",
        )
    cas = load_certificates(chain_pem) if chain_pem and _as_bytes(chain_pem, "chain").strip() else None
    encryption: serialization.KeySerializationEncryption
    if password is None:
        encryption = serialization.NoEncryption()
    elif legacy:
        encryption = (
            serialization.PrivateFormat.PKCS12.encryption_builder()
            .kdf_rounds(50000)
            .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)
            .hmac_hash(hashes.SHA1())  # noqa: S303 - the legacy format requires it
            .build(password)
        )
    else:
        encryption = serialization.BestAvailableEncryption(password)
    name = friendly_name.encode() if friendly_name else None
    return pkcs12.serialize_key_and_certificates(name, key, cert, cas, encryption)


# --- internals ----------------------------------------------------------------------------------


def _as_bytes(pem: str | bytes, field: str) -> bytes:
    if isinstance(pem, str):
        try:
            return pem.encode("ascii")
        except UnicodeEncodeError:
            raise InvalidInput("PEM text must be ASCII", field=field) from None
    if isinstance(pem, bytes | bytearray):
        return bytes(pem)
    raise InvalidInput(f"expected PEM text, got {type(pem).__name__}", field=field)


def _pem_blocks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(label, block) for every PEM block in ``data``, line endings normalized."""
    data = data.replace(b"\r\n", b"\n")
    return [(m.group(1), m.group(0)) for m in _PEM_BLOCK.finditer(data)]


def _labels(blocks: list[tuple[bytes, bytes]]) -> str:
    return ", ".join(label.decode() for label, _ in blocks) or "none"


def _key_type_name(public_key: object) -> str:
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"rsa{public_key.key_size}"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return _CURVE_NAMES.get(public_key.curve.name, f"ec-{public_key.curve.name}")
    return type(public_key).__name__.removesuffix("PublicKey").removeprefix("_").lower() or "unknown"


def _ip_or_none(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def _verification_subject(leaf: x509.Certificate, name: str | None) -> DNSName | IPAddress:
    if name is None:
        try:
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise InvalidInput(
                "the certificate has no subjectAltName", field="certificate", reason="crypto:chain_untrusted"
            ) from None
        dns = san.get_values_for_type(x509.DNSName)
        ips = san.get_values_for_type(x509.IPAddress)
        if dns:
            name = dns[0]
        elif ips:
            return IPAddress(ips[0])
        else:
            raise InvalidInput(
                "the certificate names no DNS name or IP address",
                field="certificate",
                reason="crypto:chain_untrusted",
            )
        if name.startswith("*."):
            name = "wildcard-check" + name[1:]
    ip = _ip_or_none(name)
    if ip is not None:
        return IPAddress(ip)
    try:
        return DNSName(name)
    except ValueError:
        raise InvalidInput(f"{name!r} is not a DNS name the verifier accepts", field="name") from None
