"""The deployment target interface.

``deploy`` is an upsert: given the reference returned by the previous deploy of the same certificate
to the same target (or None the first time), it replaces what is there (ACM re-import on the same
ARN, a new Key Vault version under the same name, a PATCH of the same GCP certificate, an atomic
rename of the same files) and returns the reference to keep. ``fingerprint(ref)`` says what is live
there now (SHA-256 hex of the leaf's DER), so drift can be detected; ``remove(ref)`` deletes it and is
idempotent.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar

from cryptography import x509

from certqueue.errors import ConfigError

ENTRY_POINT_GROUP = "certqueue.targets"


@dataclass(frozen=True)
class Bundle:
    """What a target deploys. Built only inside the task that deploys; never logged or returned."""

    certificate_id: str
    cert_pem: str  # the leaf
    chain_pem: str  # intermediates, leaf excluded
    key_pem: str = field(repr=False)
    domains: tuple[str, ...] = ()

    @property
    def fullchain_pem(self) -> str:
        return (
            self.cert_pem.rstrip("\n") + "\n" + self.chain_pem.lstrip("\n")
            if self.chain_pem
            else self.cert_pem
        )

    @property
    def fingerprint(self) -> str:
        return leaf_fingerprint(self.cert_pem)

    def __str__(self) -> str:
        return f"Bundle({self.certificate_id}, {len(self.domains)} names)"


def leaf_fingerprint(cert_pem: str | bytes) -> str:
    """SHA-256 hex of the DER of the first certificate in ``cert_pem``."""
    data = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    cert = x509.load_pem_x509_certificate(data)
    return hashlib.sha256(cert.public_bytes(encoding=_der())).hexdigest()


def _der() -> Any:
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER


class Target(ABC):
    #: registry name, equal to the entry-point name
    name: ClassVar[str]

    def __init__(self, config: Mapping[str, Any]) -> None:
        """Validate the target's settings (a region entry of ``multi_region.regions``);
        missing settings raise ConfigError here."""
        self.config = dict(config)

    @abstractmethod
    def deploy(self, bundle: Bundle, previous_ref: str | None) -> str:
        """Upsert the bundle; returns the reference (ARN, Key Vault id, GCP name, directory)."""

    @abstractmethod
    def fingerprint(self, ref: str) -> str | None:
        """SHA-256 hex of the leaf live at ``ref`` now, or None if nothing is there."""

    @abstractmethod
    def remove(self, ref: str) -> None:
        """Delete what ``ref`` names. Idempotent."""


def target_names() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def load_target(name: str, config: Mapping[str, Any]) -> Target:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            cls = ep.load()
            return cls(config)  # type: ignore[no-any-return]
    raise ConfigError(
        f"unknown target provider {name!r}; known: {', '.join(target_names())}",
        key="multi_region.regions[].provider",
    )
