"""The deployment target interface.

``deploy`` is an upsert: given the reference returned by the previous deploy of the same certificate
to the same target (or None the first time), it replaces what is there (ACM re-import on the same
ARN, a new Key Vault version under the same name, a PATCH of the same GCP certificate, an atomic
rename of the same files) and returns the reference to keep. ``fingerprint(ref)`` says what is live
there now (SHA-256 hex of the leaf's DER), so drift can be detected; ``remove(ref)`` deletes it and is
idempotent.

Targets are found by entry point (group ``certqueue.targets``; ``certqueue.plugins``). A region entry
may add a deploy hook, run after each successful deploy on the node that deployed
(``certqueue.targets.hooks``); ``load_target`` puts it around the target.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cryptography import x509

from certqueue import plugins
from certqueue.targets import hooks
from certqueue.targets.hooks import DeployHook

ENTRY_POINT_GROUP = plugins.TARGETS


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
    #: the target's settings table (certqueue.plugins.Setting); read by validation and the docs
    settings: ClassVar[plugins.Table] = ()

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

    def hook_environment(self, ref: str) -> dict[str, str]:
        """Variables a deploy hook gets beyond the common ones (a files target: the paths)."""
        return {}


class HookedTarget(Target):
    """A target with a deploy hook (certqueue.targets.hooks): ``deploy`` deploys, then runs the
    hook; a failing hook fails the deploy. Everything else is the target's own."""

    def __init__(self, inner: Target, hook: DeployHook, region: str) -> None:
        super().__init__(inner.config)
        self.inner, self.hook, self.region = inner, hook, region

    def __getattr__(self, attr: str) -> Any:  # name, settings and the target's own attributes
        if attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def deploy(self, bundle: Bundle, previous_ref: str | None) -> str:
        ref = self.inner.deploy(bundle, previous_ref)
        env = hooks.environment(
            certificate_id=bundle.certificate_id,
            names=bundle.domains,
            cert_pem=bundle.cert_pem,
            target=self.inner.name,
            region=self.region,
            ref=ref,
            files=self.inner.hook_environment(ref),
        )
        hooks.run(self.hook, self.inner.name, bundle.certificate_id, env)
        return ref

    def fingerprint(self, ref: str) -> str | None:
        return self.inner.fingerprint(ref)

    def remove(self, ref: str) -> None:
        self.inner.remove(ref)


def target_names() -> list[str]:
    return plugins.names(ENTRY_POINT_GROUP)


def load_target(name: str, config: Mapping[str, Any]) -> Target:
    """Build the target registered under ``name`` from a region entry's settings; an unknown name or
    a plugin that does not import is a ConfigError naming it. With a deploy hook configured the
    target comes wrapped (``HookedTarget``); the hook's keys never reach the target itself."""
    key = "multi_region.regions[].provider"
    cls = plugins.load(ENTRY_POINT_GROUP, name, base=Target, key=key)
    hook = hooks.DeployHook.from_settings(name, config)
    target: Target = cls({k: v for k, v in config.items() if k not in hooks.HOOK_KEYS})
    if hook is None:
        return target
    return HookedTarget(target, hook, str(config.get("name") or ""))
