"""Input validation: every value that comes from a user or another service is checked here.

Owns the rules for domain names (IDNA 2008 with UTS #46 mapping, LDH labels, wildcards only as the
whole leftmost label and never over a public suffix, IPs only when asked, at most 100 names), contact
emails, certificate ids, PEM input, RSA key sizes (2048 bits at least, imports included), imported
chains (each certificate signed by the next), DNS provider names (registered plugins only), country
codes, subject fields and revocation reasons. Each check returns the
normalized value or raises ``InvalidInput`` with ``field`` set, before anything is written.

Messages quote the offending name or address (user input, not secret) but never PEM contents.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import threading
from collections.abc import Iterable
from typing import Any, Final, Literal

import idna

from certqueue.errors import InvalidInput

MAX_NAMES: Final = 100
MAX_NAME_LENGTH: Final = 253
MAX_LABEL_LENGTH: Final = 63
MAX_EMAIL_LENGTH: Final = 254
MAX_PEM_LENGTH: Final = 256 * 1024
KEY_SIZES: Final = (2048, 3072, 4096)
#: the smallest RSA key accepted anywhere, imports included (NIST SP 800-131A, CA/B Forum)
MIN_RSA_BITS: Final = 2048
DNS_PROVIDER_GROUP: Final = "certqueue.dns_providers"

CERTIFICATE_ID_PREFIX: Final = "cert_"
_CERT_ID = re.compile(r"cert_[a-z0-9]{16,32}")
_CERT_ID_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyz234567"  # RFC 4648 base32, lowercased
_CERT_ID_LENGTH: Final = 20  # 100 random bits

_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
_FULL_STOPS: Final = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})
_COUNTRY = re.compile(r"[A-Z]{2}")

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

#: upper bounds from RFC 5280 Appendix A (ub-organization-name etc.)
_SUBJECT_FIELD_MAX: Final = {"organization": 64, "state": 128, "locality": 128}

PemKind = Literal["certificate", "private_key", "csr", "chain"]


# --- domains ------------------------------------------------------------------------------------


def normalize_domains(
    names: Iterable[str], *, allow_ip: bool = False, max_names: int = MAX_NAMES
) -> list[str]:
    """Validate and normalize the names of one certificate.

    Each name goes through ``normalize_domain``; duplicates (after normalization) are dropped, the
    first occurrence keeping its place. The result is non-empty and holds at most ``max_names``.
    """
    if isinstance(names, str | bytes):
        raise InvalidInput("domains must be a list of names, not a single string", field="domains")
    out: dict[str, None] = {}
    for name in names:
        out[normalize_domain(name, allow_ip=allow_ip)] = None
        if len(out) > max_names:
            raise InvalidInput(f"at most {max_names} names per certificate", field="domains")
    if not out:
        raise InvalidInput("at least one domain name is required", field="domains")
    return list(out)


def normalize_domain(name: str, *, allow_ip: bool = False) -> str:
    """One name in the form certqueue stores and sends to the CA: A-labels, lowercase, no final dot.

    ``*.example.com`` is allowed (a wildcard is the whole leftmost label, over at least two labels);
    IP addresses only with ``allow_ip`` (returned in canonical text form).
    """
    if not isinstance(name, str):
        raise InvalidInput(f"a domain name must be text, not {type(name).__name__}", field="domains")
    shown = _show(name)
    if not name or name.isspace():
        raise InvalidInput("empty domain name", field="domains")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise InvalidInput(f"{shown}: whitespace or control characters in a domain name", field="domains")
    ip = _parse_ip(name)
    if ip is not None:
        if not allow_ip:
            raise InvalidInput(f"{shown}: IP addresses are not allowed here", field="domains")
        return ip
    # UTS #46 maps these full stops to "."; do it first so the final-dot rule sees them
    dotted = name.translate(_FULL_STOPS)
    wildcard = dotted.startswith("*.")
    base = dotted[2:] if wildcard else dotted
    if base.endswith("."):
        base = base[:-1]
    if "*" in base:
        raise InvalidInput(
            f"{shown}: a wildcard must be the whole leftmost label (*.example.com)", field="domains"
        )
    ascii_name = _to_ascii(base, shown)
    labels = ascii_name.split(".")
    if len(labels) < 2:
        raise InvalidInput(f"{shown}: a domain name needs at least two labels", field="domains")
    for label in labels:
        if not label:
            raise InvalidInput(f"{shown}: empty label", field="domains")
        if len(label) > MAX_LABEL_LENGTH:
            raise InvalidInput(f"{shown}: label longer than {MAX_LABEL_LENGTH} octets", field="domains")
        if not _LDH_LABEL.fullmatch(label):
            raise InvalidInput(
                f"{shown}: labels hold letters, digits and inner hyphens only", field="domains"
            )
        if label[2:4] == "--" and not label.startswith("xn--"):
            raise InvalidInput(
                f"{shown}: hyphens in the third and fourth positions are reserved", field="domains"
            )
    if labels[-1].isdigit():
        raise InvalidInput(f"{shown}: the last label cannot be all digits", field="domains")
    if wildcard and public_suffixes().is_public(ascii_name):
        raise InvalidInput(
            f"{shown}: a wildcard over a public suffix would cover every registrant under it",
            field="domains",
        )
    result = f"*.{ascii_name}" if wildcard else ascii_name
    if len(result) > MAX_NAME_LENGTH:
        raise InvalidInput(f"{shown}: longer than {MAX_NAME_LENGTH} characters", field="domains")
    return result


_psl_lock = threading.Lock()
_psl: Any = None


def public_suffixes() -> Any:
    """The public suffix list bundled with ``publicsuffixlist`` (ICANN and private sections): one
    per process, shared by name checks and the rate limiter's registered domains. Parsing it costs
    about 26 ms of CPU, so a worker builds it before it forks its pool processes
    (``certqueue.workers``): each would otherwise parse it again on its first certificate."""
    global _psl
    if _psl is None:
        with _psl_lock:
            if _psl is None:
                from publicsuffixlist import PublicSuffixList

                _psl = PublicSuffixList()
    return _psl


def _to_ascii(name: str, shown: str) -> str:
    """IDNA 2008 (UTS #46 non-transitional mapping) to A-labels, lowercase."""
    if name.isascii():
        lowered = name.lower()
        # A-labels must decode to a valid U-label; plain LDH labels are checked by the caller
        if not any(label.startswith("xn--") for label in lowered.split(".")):
            return lowered
    try:
        return idna.encode(name, uts46=True, std3_rules=True, transitional=False).decode("ascii")
    except idna.IDNAError as exc:
        raise InvalidInput(
            f"{shown}: not a valid internationalized domain name ({exc})", field="domains"
        ) from None
    except UnicodeError:
        raise InvalidInput(f"{shown}: not a valid internationalized domain name", field="domains") from None


def _parse_ip(name: str) -> str | None:
    candidate = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    try:
        return ipaddress.ip_address(candidate).compressed
    except ValueError:
        return None


def _show(value: str, limit: int = 80) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


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


def validate_key_size(n: int) -> int:
    """An RSA key size: 2048, 3072 or 4096."""
    if isinstance(n, bool) or not isinstance(n, int) or n not in KEY_SIZES:
        raise InvalidInput(
            f"key_size must be one of {', '.join(map(str, KEY_SIZES))}, not {n!r}", field="key_size"
        )
    return n


KEY_TYPES: Final = ("ec256", "ec384", "rsa2048", "rsa3072", "rsa4096")
#: the guide's default (``key_size: 2048``)
DEFAULT_KEY_TYPE: Final = "rsa2048"


def key_type_from(key_size: int | None = None, key_type: str | None = None) -> str:
    """The key type for the guide's ``key_size`` and/or an explicit ``key_type``.

    ``key_type`` wins when given; a ``key_size`` that contradicts it is an error (``key_size`` only
    applies to RSA). Neither given: ``DEFAULT_KEY_TYPE``.
    """
    if key_type is not None:
        kt = key_type.strip().lower() if isinstance(key_type, str) else key_type
        if kt not in KEY_TYPES:
            raise InvalidInput(
                f"unknown key type {key_type!r}; use one of {', '.join(KEY_TYPES)}", field="key_type"
            )
        if key_size is not None:
            if not kt.startswith("rsa"):
                raise InvalidInput(f"key_size applies to RSA keys only, not {kt}", field="key_size")
            if f"rsa{validate_key_size(key_size)}" != kt:
                raise InvalidInput(f"key_size {key_size} contradicts key type {kt}", field="key_size")
        return str(kt)
    if key_size is not None:
        return f"rsa{validate_key_size(key_size)}"
    return DEFAULT_KEY_TYPE


def validate_dns_provider(name: str) -> str:
    """A DNS provider registered as a plugin (entry point group ``certqueue.dns_providers``)."""
    from importlib.metadata import entry_points

    known = sorted(ep.name for ep in entry_points(group=DNS_PROVIDER_GROUP))
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


def validate_country(c: str) -> str:
    """A two-letter country code (ISO 3166-1 alpha-2 shape); lowercase input is upper-cased."""
    value = c.strip().upper() if isinstance(c, str) else ""
    if not _COUNTRY.fullmatch(value):
        raise InvalidInput(f"country must be two letters (like US), not {c!r}", field="country")
    return value


def validate_subject_field(value: str, *, field: str) -> str:
    """A certificate subject field (organization, state, locality): printable text within the
    RFC 5280 upper bound. Surrounding whitespace is stripped."""
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be text", field=field)
    stripped = value.strip()
    limit = _SUBJECT_FIELD_MAX.get(field, 64)
    if not stripped or len(stripped) > limit:
        raise InvalidInput(f"{field} must be 1 to {limit} characters", field=field)
    if any(not ch.isprintable() for ch in stripped):
        raise InvalidInput(f"{field} holds control characters", field=field)
    return stripped


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
    from certqueue import crypto  # crypto imports this module: import here, not at the top

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
