"""What every deployment target does the same way: read its settings, check a bundle, word errors.

Owns no state. Each target module declares its settings as a table (``certqueue.plugins.Setting``)
and calls :func:`read_settings`; :func:`check_bundle` runs before anything is sent anywhere (moto does
not check that the key matches the certificate, real ACM and Key Vault do, and a target must fail
the same way everywhere); :func:`safe_detail` strips anything PEM-shaped from remote error text
before it goes into a message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from certqueue import plugins
from certqueue.errors import ConfigError, TargetError
from certqueue.logsafe import safe_detail as safe_detail  # shared with the deploy hooks
from certqueue.plugins import secret_value
from certqueue.targets.base import Bundle

__all__ = [
    "COMMON_KEYS",
    "check_bundle",
    "error",
    "non_negative",
    "read_settings",
    "safe_detail",
    "secret_value",
]

#: keys every region entry may carry whatever its provider (the deploy hook's are taken out before a
#: target sees its settings: certqueue.targets.base.load_target)
COMMON_KEYS = frozenset({"name", "provider"})


def read_settings(
    target: str,
    config: Mapping[str, Any],
    table: plugins.Table,
    aliases: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Validate ``config`` against the target's table (``certqueue.plugins.read_settings``); the
    region's own keys are not the target's to check."""
    return plugins.read_settings("target", target, config, table, ignore=COMMON_KEYS, aliases=aliases)


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


def error(
    target: str, kind: str, message: str, *, retryable: bool, retry_after: float | None = None
) -> TargetError:
    """A TargetError with the stable reason ``<target>:<kind>``."""
    return TargetError(
        target, message, retryable=retryable, reason=f"{target}:{kind}", retry_after=retry_after
    )
