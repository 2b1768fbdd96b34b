"""The guide's cloud adapters, at their public import path; they live in ``certqueue.guide.adapters``."""

from certqueue.guide.adapters import AWSACMAdapter, AzureKeyVaultAdapter, GCPCertificateManagerAdapter

__all__ = ["AWSACMAdapter", "AzureKeyVaultAdapter", "GCPCertificateManagerAdapter"]
