"""What every deployment target does the same way: read its settings, check a bundle, word errors.

Owns no state. Each target module declares its settings as a table (name -> kind, default) and
calls :func:`read_settings`; :func:`check_bundle` runs before anything is sent anywhere (moto does
not check that the key matches the certificate, real ACM and Key Vault do, and a target must fail
the same way everywhere); :func:`safe_detail` strips anything PEM-shaped from remote error text
before it goes into a message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from certqueue.errors import ConfigError, TargetError
from certqueue.targets.base import Bundle

#: keys every region entry may carry whatever its provider
COMMON_KEYS = frozenset({"name", "provider"})

_REQUIRED = object()


@dataclass(frozen=True)
class Setting:
    """One setting of a target: accepted Python types and a default (``REQUIRED`` when none)."""

    types: tuple[type, ...]
    default: Any = _REQUIRED

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


REQUIRED = _REQUIRED


def read_settings(
    target: str,
    config: Mapping[str, Any],
    table: Mapping[str, Setting],
    aliases: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Validate ``config`` against ``table``; returns every key of ``table`` with defaults filled in.

    Unknown keys, missing required keys and wrong types raise ConfigError naming the target and key.
    ``aliases`` maps an accepted spelling to its canonical key (the guide writes both ``key_vault``
    and ``key_vault_url``); giving both spellings is an error.
    """
    aliases = aliases or {}
    where = f"target {target}"
    values: dict[str, Any] = {}
    for key, value in config.items():
        canonical = aliases.get(key, key)
        if key in COMMON_KEYS:
            continue
        if canonical not in table:
            known = ", ".join(sorted(set(table) | set(aliases)))
            raise ConfigError(f"unknown setting {key!r} for {where}; known: {known}", source=where, key=key)
        if canonical in values:
            raise ConfigError(
                f"{where}: {key!r} given twice (as {canonical!r} and an alias)", source=where, key=key
            )
        spec = table[canonical]
        # bool is an int: refuse True where a number is wanted
        if value is not None and (
            not isinstance(value, spec.types) or (isinstance(value, bool) and bool not in spec.types)
        ):
            wanted = " or ".join(t.__name__ for t in spec.types)
            raise ConfigError(
                f"{where}: {key!r} must be {wanted}, not {type(value).__name__}", source=where, key=key
            )
        values[canonical] = value
    for key, spec in table.items():
        if values.get(key) is None:
            if spec.required:
                raise ConfigError(f"{where}: missing required setting {key!r}", source=where, key=key)
            values[key] = spec.default
    return values


def secret_value(value: Any) -> str | None:
    """The plain text of a secret given as pydantic ``SecretStr`` or ``str`` (None stays None)."""
    if value is None:
        return None
    getter = getattr(value, "get_secret_value", None)
    if callable(getter):
        return str(getter())
    return str(value)


def non_negative(target: str, settings: Mapping[str, Any], *keys: str) -> None:
    for key in keys:
        if settings[key] < 0:
            raise ConfigError(
                f"target {target}: {key!r} must not be negative", source=f"target {target}", key=key
            )


@dataclass(frozen=True)
class ParsedBundle:
    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    key: PrivateKeyTypes


def check_bundle(target: str, bundle: Bundle) -> ParsedBundle:
    """Parse the bundle and refuse a key that does not match the leaf, before anything is sent.

    A mismatch is permanent (``<target>:key_mismatch``); unparsable PEM is ``<target>:invalid``.
    Messages never contain key material: cryptography's own error text is not used.
    """
    try:
        leaf = x509.load_pem_x509_certificate(bundle.cert_pem.encode())
    except ValueError as exc:
        raise TargetError(
            target,
            f"certificate {bundle.certificate_id}: leaf is not a PEM certificate",
            reason=f"{target}:invalid",
        ) from exc
    try:
        chain = (
            tuple(x509.load_pem_x509_certificates(bundle.chain_pem.encode()))
            if bundle.chain_pem.strip()
            else ()
        )
    except ValueError as exc:
        raise TargetError(
            target,
            f"certificate {bundle.certificate_id}: chain is not PEM certificates",
            reason=f"{target}:invalid",
        ) from exc
    try:
        key = serialization.load_pem_private_key(bundle.key_pem.encode(), password=None)
    except (ValueError, TypeError):
        # the cause is dropped on purpose: nothing about the key travels with the error
        raise TargetError(
            target,
            f"certificate {bundle.certificate_id}: private key is not an unencrypted PEM key",
            reason=f"{target}:invalid",
        ) from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise TargetError(
            target,
            f"certificate {bundle.certificate_id}: private key does not match the "
            "certificate; nothing was sent",
            reason=f"{target}:key_mismatch",
        )
    return ParsedBundle(leaf=leaf, chain=chain, key=key)


_PEM_BLOCK = re.compile(r"-----BEGIN [A-Z0-9 ]+-----.*?(-----END [A-Z0-9 ]+-----|$)", re.S)


def safe_detail(text: object, limit: int = 200) -> str:
    """Remote error text fit for a message: PEM blocks removed, one line, bounded length."""
    cleaned = _PEM_BLOCK.sub("[pem removed]", str(text or ""))
    cleaned = " ".join(cleaned.split())
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


def error(
    target: str, kind: str, message: str, *, retryable: bool, retry_after: float | None = None
) -> TargetError:
    """A TargetError with the stable reason ``<target>:<kind>``."""
    return TargetError(
        target, message, retryable=retryable, reason=f"{target}:{kind}", retry_after=retry_after
    )
