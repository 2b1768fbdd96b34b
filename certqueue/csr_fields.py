"""The fields of a certificate request that are checked without cryptography: its names, its key
type and its subject fields.

Owns the rules for domain names (IDNA 2008 with UTS #46 mapping, LDH labels, wildcards only as the
whole leftmost label and never over a public suffix, IPs only when asked, at most 100 names), key
types and RSA key sizes, country codes and subject fields. Each check returns the normalized value
or raises ``InvalidInput`` with ``field`` set.

Below both ``certqueue.crypto`` (which builds CSRs from these fields) and ``certqueue.validation``
(which re-exports every name here and adds the checks that parse PEM through crypto): neither
imports the other's way round, so the two have no import cycle.
"""

from __future__ import annotations

import ipaddress
import re
import threading
from collections.abc import Iterable
from typing import Any, Final

import idna

from certqueue.errors import InvalidInput

MAX_NAMES: Final = 100
MAX_NAME_LENGTH: Final = 253
MAX_LABEL_LENGTH: Final = 63
KEY_SIZES: Final = (2048, 3072, 4096)
_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_FULL_STOPS: Final = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})
_COUNTRY = re.compile(r"[A-Z]{2}")
#: upper bounds from RFC 5280 Appendix A (ub-organization-name etc.)
_SUBJECT_FIELD_MAX: Final = {"organization": 64, "state": 128, "locality": 128}


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


# --- key types ----------------------------------------------------------------------------------


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


# --- subject fields -----------------------------------------------------------------------------


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
