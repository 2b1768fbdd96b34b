"""The guide's cloud adapters: ``AWSACMAdapter``, ``AzureKeyVaultAdapter``, ``GCPCertificateManagerAdapter``.

Thin async wrappers over the deployment targets (``certqueue.targets``) for callers that hold PEM in
hand rather than a certqueue certificate id::

    acm = AWSACMAdapter(region="us-east-1")
    arn = await acm.import_certificate(certificate_pem=..., private_key_pem=..., certificate_chain=...)

Settings are the target's (see docs/targets.md); errors are the targets' ``TargetError`` and
``ConfigError``. Every call checks that the key matches the certificate before anything is sent, and
runs the blocking SDK call in a worker thread (``asyncio.to_thread``). Owns no state.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certqueue.errors import InvalidInput
from certqueue.targets._shared import check_bundle
from certqueue.targets.aws_acm import AWSACMTarget
from certqueue.targets.azure_keyvault import AzureKeyVaultTarget
from certqueue.targets.base import Bundle
from certqueue.targets.gcp_certmanager import GCPCertManagerTarget

__all__ = ["AWSACMAdapter", "AzureKeyVaultAdapter", "GCPCertificateManagerAdapter"]

_KV_NAME = re.compile(r"^[0-9a-zA-Z-]{1,127}$")
_GCP_ID = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")


def _bundle(label: str, certificate_pem: str, private_key_pem: str, certificate_chain: str | None) -> Bundle:
    """Leaf and chain; a ``certificate_pem`` holding a full chain is split when no chain is given."""
    if not certificate_chain:
        try:
            certs = x509.load_pem_x509_certificates(certificate_pem.encode())
        except ValueError:
            certs = []  # check_bundle reports it
        if len(certs) > 1:
            pem = serialization.Encoding.PEM
            certificate_pem = certs[0].public_bytes(pem).decode()
            certificate_chain = "".join(c.public_bytes(pem).decode() for c in certs[1:])
    return Bundle(
        certificate_id=label,
        cert_pem=certificate_pem,
        chain_pem=certificate_chain or "",
        key_pem=private_key_pem,
    )


class AWSACMAdapter:
    """Import certificates into ACM in one region."""

    def __init__(self, region: str, **settings: Any) -> None:
        self.target = AWSACMTarget({"name": region, "region": region, **settings})

    async def import_certificate(
        self,
        certificate_pem: str,
        private_key_pem: str,
        certificate_chain: str | None = None,
        certificate_arn: str | None = None,
    ) -> str:
        """Import, or re-import on ``certificate_arn`` (the ARN stays); returns the ARN."""
        bundle = _bundle(certificate_arn or "(new)", certificate_pem, private_key_pem, certificate_chain)
        check_bundle(self.target.name, bundle)
        return await asyncio.to_thread(
            self.target.import_pem, None, bundle.cert_pem, bundle.key_pem, bundle.chain_pem, certificate_arn
        )

    def __repr__(self) -> str:
        return f"AWSACMAdapter({self.target!r})"


class AzureKeyVaultAdapter:
    """Import certificates into one Key Vault."""

    def __init__(self, vault_url: str, **settings: Any) -> None:
        self.target = AzureKeyVaultTarget({"name": "adapter", "key_vault_url": vault_url, **settings})

    async def import_certificate(
        self, certificate_pem: str, private_key_pem: str, name: str, certificate_chain: str | None = None
    ) -> str:
        """Import as a new version of ``name``; returns the versioned Key Vault certificate id."""
        if not _KV_NAME.match(name):
            raise InvalidInput(f"Key Vault certificate name {name!r}: 1-127 of [0-9a-zA-Z-]", field="name")
        bundle = _bundle(name, certificate_pem, private_key_pem, certificate_chain)
        parsed = check_bundle(self.target.name, bundle)
        return await asyncio.to_thread(
            self.target.import_parsed, name, parsed, bundle.cert_pem, bundle.chain_pem
        )

    def __repr__(self) -> str:
        return f"AzureKeyVaultAdapter({self.target!r})"


class GCPCertificateManagerAdapter:
    """Create or update self-managed certificates in one Certificate Manager location."""

    def __init__(self, project_id: str, location: str = "global", **settings: Any) -> None:
        self.target = GCPCertManagerTarget(
            {"name": "adapter", "project_id": project_id, "location": location, **settings}
        )

    async def import_certificate(
        self, certificate_pem: str, private_key_pem: str, name: str, certificate_chain: str | None = None
    ) -> str:
        """Create certificate ``name`` (an id: lowercase, digits, hyphens) or update it if it exists;
        returns the resource name ``projects/<p>/locations/<l>/certificates/<name>``."""
        if not _GCP_ID.match(name):
            raise InvalidInput(
                f"GCP certificate id {name!r}: lowercase letters, digits and hyphens, starting "
                "with a letter, at most 63",
                field="name",
            )
        bundle = _bundle(name, certificate_pem, private_key_pem, certificate_chain)
        check_bundle(self.target.name, bundle)
        return await asyncio.to_thread(
            self.target.upsert, name, bundle.fullchain_pem, bundle.key_pem, dict(self.target.labels)
        )

    def __repr__(self) -> str:
        return f"GCPCertificateManagerAdapter({self.target!r})"
