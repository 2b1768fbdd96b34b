"""The guide's Python API at its public import path (``from certqueue.manager import
CertificateManager``); the code is the ``certqueue.guide`` package."""

from certqueue.guide import (
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
    with_overrides,
)

__all__ = [
    "Certificate",
    "CertificateAutomation",
    "CertificateManager",
    "CertificateMetadata",
    "CertificateMonitoring",
    "CertificateStore",
    "OperationFailed",
    "OperationTimeout",
    "PropagationResult",
    "update_config",
    "with_overrides",
]
