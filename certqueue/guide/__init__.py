"""The guide's Python API, async: ``CertificateManager``, ``CertificateStore``, ``CertificateMetadata``,
``CertificateMonitoring``, ``CertificateAutomation`` and ``update_config``.

A facade over the pipeline, not a second implementation of it: requests are validated and written
here (``certqueue.certificates``), the work is done by the workers (the public tasks, sent by name),
and waiting is polling the database, the truth. Blocking database and broker calls run in a thread
(``asyncio.to_thread``), so an event loop is never blocked. Owns no state of its own; the rows it
writes are those ``certqueue.certificates`` and ``certqueue.runtime`` own.

    manager = CertificateManager()
    cert = await manager.issue_certificate(domains=["example.com"], email="admin@example.com")
    print(cert.id, cert.expires_at, cert.days_until_expiration)

Errors: bad input is ``InvalidInput`` (nothing written, nothing sent), an unknown id ``NotFound``, a
request the certificate's state forbids ``InvalidTransition``, work that ended badly
``OperationFailed`` (its ``reason`` is the pipeline's stable reason, e.g. ``acme:unauthorized``), and
a wait that ran out ``OperationTimeout`` (the work goes on; wait again or check later).

The package, one module each: ``views`` (the values and the errors of waiting), ``link`` (settings,
sessions, sending and waiting, shared by the objects of one manager), ``overrides`` (per-object
settings, ``update_config``), ``manager``, ``store``, ``monitoring`` (monitoring and automation) and
``adapters`` (the cloud adapters). The public import paths are ``certqueue`` and
``certqueue.manager`` (and ``certqueue.adapters``); they stay as they are.
"""

from certqueue.guide.manager import CertificateManager
from certqueue.guide.monitoring import CertificateAutomation, CertificateMonitoring
from certqueue.guide.overrides import update_config, with_overrides
from certqueue.guide.store import CertificateStore
from certqueue.guide.views import (
    Certificate,
    CertificateMetadata,
    OperationFailed,
    OperationTimeout,
    PropagationResult,
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
