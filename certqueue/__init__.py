"""certqueue: a fleet TLS certificate manager on Celery.

The guide's Python API is importable from here (``from certqueue import CertificateManager``); the
names are loaded on first use, so ``import certqueue`` stays cheap (workers, the CLI).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "Certificate": "certqueue.manager",
    "CertificateAutomation": "certqueue.manager",
    "CertificateManager": "certqueue.manager",
    "CertificateMetadata": "certqueue.manager",
    "CertificateMonitoring": "certqueue.manager",
    "CertificateStore": "certqueue.manager",
    "OperationFailed": "certqueue.manager",
    "OperationTimeout": "certqueue.manager",
    "PropagationResult": "certqueue.manager",
    "update_config": "certqueue.manager",
    "AWSACMAdapter": "certqueue.adapters",
    "AzureKeyVaultAdapter": "certqueue.adapters",
    "GCPCertificateManagerAdapter": "certqueue.adapters",
}

__all__ = [
    "AWSACMAdapter",
    "AzureKeyVaultAdapter",
    "Certificate",
    "CertificateAutomation",
    "CertificateManager",
    "CertificateMetadata",
    "CertificateMonitoring",
    "CertificateStore",
    "GCPCertificateManagerAdapter",
    "OperationFailed",
    "OperationTimeout",
    "PropagationResult",
    "__version__",
    "update_config",
]

if TYPE_CHECKING:
    from certqueue.adapters import AWSACMAdapter, AzureKeyVaultAdapter, GCPCertificateManagerAdapter
    from certqueue.manager import (
        Certificate,
        CertificateAutomation,
        CertificateManager,
        CertificateMetadata,
        CertificateMonitoring,
        CertificateStore,
        OperationFailed,
        OperationTimeout,
        PropagationResult,
        update_config,
    )


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'certqueue' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
