"""Input validation: every value that comes from a user or another service is checked here.

Owns the rules for contact emails, certificate ids, PEM input, RSA key sizes of imports (2048 bits
at least), imported chains (each certificate signed by the next), DNS provider names (registered
plugins only) and revocation reasons; the rules for a certificate request's own fields (domain
names, key types, country codes, subject fields) are in ``certqueue.csr_fields`` and importable
from here. Each check returns the normalized value or raises ``InvalidInput`` with ``field`` set,
before anything is written.

The PEM checks parse through ``certqueue.crypto``, which imports ``certqueue.csr_fields`` and never
this module (no import cycle).

Messages quote the offending name or address (user input, not secret) but never PEM contents.
"""

from __future__ import annotations

import re
import secrets
from typing import Final, Literal

from certqueue.csr_fields import (  # re-exported: a certificate request's own fields
    DEFAULT_KEY_TYPE as DEFAULT_KEY_TYPE,
)
from certqueue.csr_fields import (
    KEY_SIZES as KEY_SIZES,
)
from certqueue.csr_fields import (
    KEY_TYPES as KEY_TYPES,
)
from certqueue.csr_fields import (
    MAX_LABEL_LENGTH as MAX_LABEL_LENGTH,
)
from certqueue.csr_fields import (
    MAX_NAME_LENGTH as MAX_NAME_LENGTH,
)
from certqueue.csr_fields import (
    MAX_NAMES as MAX_NAMES,
)
from certqueue.csr_fields import (
    _show,
)
from certqueue.csr_fields import (
    key_type_from as key_type_from,
)
from certqueue.csr_fields import (
    normalize_domain as normalize_domain,
)
from certqueue.csr_fields import (
    normalize_domains as normalize_domains,
)
from certqueue.csr_fields import (
    public_suffixes as public_suffixes,
)
from certqueue.csr_fields import (
    validate_country as validate_country,
)
from certqueue.csr_fields import (
    validate_key_size as validate_key_size,
)
from certqueue.csr_fields import (
    validate_subject_field as validate_subject_field,
)
from certqueue.errors import InvalidInput

MAX_EMAIL_LENGTH: Final = 254
MAX_PEM_LENGTH: Final = 256 * 1024
#: the smallest RSA key accepted anywhere, imports included (NIST SP 800-131A, CA/B Forum)
MIN_RSA_BITS: Final = 2048
DNS_PROVIDER_GROUP: Final = "certqueue.dns_providers"

CERTIFICATE_ID_PREFIX: Final = "cert_"
_CERT_ID = re.compile(r"cert_[a-z0-9]{16,32}")
_CERT_ID_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyz234567"  # RFC 4648 base32, lowercased
_CERT_ID_LENGTH: Final = 20  # 100 random bits

_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")

#: RFC 5280 CRLReason names and codes (7 is unused)
REVOCATION_REASONS: Final[dict[str, int]] = {
    "unspecified": 0,
    "keyCompromise": 1,
    "cACompromise": 2,
    "affiliationChanged": 3,
    "superseded": 4,
    "cessationOfOperation": 5,
    "certificateHold": 6,
    "removeFromCRL": 8,
    "privilegeWithdrawn": 9,
    "aACompromise": 10,
}
_REASON_LOOKUP: Final = {name.lower(): code for name, code in REVOCATION_REASONS.items()}


PemKind = Literal["certificate", "private_key", "csr", "chain"]


# --- other fields -------------------------------------------------------------------------------


def validate_email(addr: str) -> str:
    """A bare contact address (no display name, no quoted local part); returns it with the domain
    normalized like a certificate name. ACME CAs refuse anything fancier."""
    if not isinstance(addr, str) or not addr:
        raise InvalidInput("an email address is required", field="email")
    shown = _show(addr)
    if len(addr) > MAX_EMAIL_LENGTH:
        raise InvalidInput(f"{shown}: longer than {MAX_EMAIL_LENGTH} characters", field="email")
    if addr.count("@") != 1:
        raise InvalidInput(f"{shown}: an email address has exactly one @", field="email")
    local, domain = addr.split("@")
    if not local or len(local) > 64:
        raise InvalidInput(f"{shown}: the part before @ must be 1 to 64 characters", field="email")
    if not all(_ATEXT.fullmatch(atom) for atom in local.split(".")):
        raise InvalidInput(f"{shown}: invalid characters or dots before the @", field="email")
    try:
        normalized_domain = normalize_domain(domain)
    except InvalidInput as exc:
        raise InvalidInput(f"{shown}: bad domain: {exc.message}", field="email") from None
    if normalized_domain.startswith("*."):
        raise InvalidInput(f"{shown}: an email domain cannot be a wildcard", field="email")
    result = f"{local}@{normalized_domain}"
    if len(result) > MAX_EMAIL_LENGTH:
        raise InvalidInput(f"{shown}: longer than {MAX_EMAIL_LENGTH} characters", field="email")
    return result


def new_certificate_id() -> str:
    """``cert_`` and 20 random base32 characters (100 bits)."""
    return CERTIFICATE_ID_PREFIX + "".join(secrets.choice(_CERT_ID_ALPHABET) for _ in range(_CERT_ID_LENGTH))


def validate_certificate_id(s: str) -> str:
    if not isinstance(s, str) or not _CERT_ID.fullmatch(s):
        shown = _show(s) if isinstance(s, str) else type(s).__name__
        raise InvalidInput(
            f"{shown} is not a certificate id (cert_ and 16 to 32 of a-z, 0-9)", field="certificate_id"
        )
    return s


def validate_dns_provider(name: str) -> str:
    """A DNS provider registered as a plugin (entry point group ``certqueue.dns_providers``, with the
    built-ins' fallback when package metadata is missing: ``certqueue.plugins``)."""
    from certqueue import plugins

    known = plugins.names(DNS_PROVIDER_GROUP)
    if not isinstance(name, str) or name not in known:
        shown = _show(name) if isinstance(name, str) else type(name).__name__
        raise InvalidInput(f"unknown DNS provider {shown}; known: {', '.join(known)}", field="dns_provider")
    return name


def validate_import(certificate_pem: str, private_key_pem: str | None, chain_pem: str | None) -> None:
    """What an imported certificate must satisfy beyond parsing: no RSA key under
    ``MIN_RSA_BITS`` (the certificate's or the private key's), and a chain that verifies: the leaf
    signed by the first chain certificate, each by the next, every one of them a CA. Trust in the
    last one is not checked (a private CA is a legitimate issuer)."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    from certqueue import crypto

    leaf = crypto.load_certificate(certificate_pem)
    public = leaf.public_key()
    if isinstance(public, rsa.RSAPublicKey) and public.key_size < MIN_RSA_BITS:
        raise InvalidInput(
            f"RSA-{public.key_size} is too weak; at least {MIN_RSA_BITS} bits", field="certificate_pem"
        )
    if private_key_pem:
        key = crypto.load_private_key(private_key_pem)
        if isinstance(key, rsa.RSAPrivateKey) and key.key_size < MIN_RSA_BITS:
            raise InvalidInput(
                f"RSA-{key.key_size} is too weak; at least {MIN_RSA_BITS} bits", field="private_key_pem"
            )
    chain = crypto.load_certificates(chain_pem, field="chain_pem") if chain_pem else []
    subject = leaf
    for i, issuer in enumerate(chain, start=1):
        if not crypto.verify_issued_by(subject, issuer):
            what = "the certificate" if i == 1 else f"chain certificate {i - 1}"
            raise InvalidInput(
                f"the chain does not verify: {what} is not signed by chain certificate {i}",
                field="chain_pem",
                reason="crypto:chain_untrusted",
            )
        if not crypto.is_ca(issuer):
            raise InvalidInput(
                f"the chain does not verify: chain certificate {i} is not a CA certificate",
                field="chain_pem",
                reason="crypto:chain_untrusted",
            )
        ipub = issuer.public_key()
        if isinstance(ipub, rsa.RSAPublicKey) and ipub.key_size < MIN_RSA_BITS:
            raise InvalidInput(f"chain certificate {i} has a weak RSA-{ipub.key_size} key", field="chain_pem")
        subject = issuer


def revocation_reason_code(name: str) -> int:
    """The RFC 5280 CRLReason code for a reason name (``keyCompromise`` -> 1). Case, ``_`` and ``-``
    are ignored, so ``key_compromise`` works too."""
    key = name.replace("_", "").replace("-", "").lower() if isinstance(name, str) else ""
    if key not in _REASON_LOOKUP:
        raise InvalidInput(
            f"unknown revocation reason {name!r}; use one of {', '.join(REVOCATION_REASONS)}", field="reason"
        )
    return _REASON_LOOKUP[key]


def validate_pem(text: str | bytes, kind: PemKind) -> str:
    """Check that ``text`` is well-formed PEM of ``kind`` that actually parses; return it normalized.

    certificate: exactly one; chain: one or more, in order; private_key: one unencrypted RSA or EC
    key, returned as PKCS#8; csr: one request whose signature verifies. Text outside the PEM blocks
    (``Bag Attributes`` from openssl) is dropped, line endings become ``\\n``.
    """
    from certqueue import crypto  # here, not at the top: commands that check no PEM skip its import

    if isinstance(text, str | bytes | bytearray) and len(text) > MAX_PEM_LENGTH:
        raise InvalidInput(f"PEM input larger than {MAX_PEM_LENGTH} bytes", field=kind)
    if kind == "certificate":
        return crypto.cert_to_pem(crypto.load_certificate(text))
    if kind == "chain":
        return "".join(crypto.split_pem_chain(text))
    if kind == "private_key":
        return crypto.private_key_to_pem(crypto.load_private_key(text)).decode("ascii")
    if kind == "csr":
        from cryptography.hazmat.primitives.serialization import Encoding

        return crypto.load_csr(text).public_bytes(Encoding.PEM).decode("ascii")
    raise InvalidInput(f"unknown PEM kind {kind!r}", field="kind")
