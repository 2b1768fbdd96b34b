"""Enqueue certqueue jobs from another service. Needs only celery and the broker URL.

    from certqueue.client import CertqueueClient
    cq = CertqueueClient("redis://broker:6379/0")
    job = cq.issue(["example.com", "www.example.com"], email="admin@example.com")
    cq.wait(job.certificate_id or job.task_id)

Payloads are versioned JSON (``{"v": 1, ...}``), checked here and again by the workers
(``certqueue.payloads``): a bad payload is a clear error, never a half-created certificate. They
carry ids and names only: a CA is chosen by name (``ca="..."``, a key of the workers'
``acme.authorities``), never by URL.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from celery import Celery

from certqueue import payloads

PAYLOAD_VERSION = payloads.PAYLOAD_VERSION
TERMINAL = {"ACTIVE", "FAILED", "REVOKED", "EXPIRED"}


@dataclass
class Job:
    task_id: str
    task: str
    certificate_id: str | None = None


class CertqueueClient:
    def __init__(self, broker_url: str, result_backend: str | None = None) -> None:
        self.app = Celery(
            "certqueue-client",
            broker=broker_url,
            backend=result_backend or (broker_url if broker_url.startswith("redis") else None),
            set_as_current=False,
        )
        self.app.conf.update(
            task_serializer="json",
            accept_content=["json"],
            result_serializer="json",
            broker_connection_retry_on_startup=True,
        )

    def _send(self, task: str, payload: dict[str, Any], queue: str = "acme") -> Job:
        checked = payloads.check(task, {"v": PAYLOAD_VERSION, **payload})
        res = self.app.send_task(task, args=[checked], queue=queue)
        return Job(task_id=res.id, task=task, certificate_id=payload.get("certificate_id"))

    def issue(self, domains: list[str], **params: Any) -> Job:
        """Request a certificate. ``params`` are the request's names and choices (``email``,
        ``key_type``, ``challenge_type``, ``dns_provider``, ``targets``, ``ca``...); a URL or an
        unknown parameter raises ``InvalidInput`` here, before anything is sent."""
        from certqueue.validation import new_certificate_id, normalize_domains

        cid = params.pop("certificate_id", None) or new_certificate_id()
        request = {"domains": normalize_domains(domains, allow_ip=True), **params}
        return self._send("certqueue.issue", {"certificate_id": cid, "request": request})

    def renew(self, certificate_id: str, force: bool = False) -> Job:
        return self._send("certqueue.renew", {"certificate_id": certificate_id, "force": force})

    def revoke(self, certificate_id: str, reason: str = "unspecified") -> Job:
        return self._send("certqueue.revoke", {"certificate_id": certificate_id, "reason": reason})

    def propagate(self, certificate_id: str, regions: list[str] | None = None) -> Job:
        payload: dict[str, Any] = {"certificate_id": certificate_id}
        if regions:
            payload["regions"] = regions
        return self._send("certqueue.propagate", payload)

    def status(self, certificate_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """The certificate's state, answered by a worker (``certqueue.status``)."""
        payload = payloads.check("certqueue.status", {"v": PAYLOAD_VERSION, "certificate_id": certificate_id})
        res = self.app.send_task("certqueue.status", args=[payload], queue="acme")
        return dict(res.get(timeout=timeout))

    def job(self, task_id: str, timeout: float | None = None) -> Any:
        """The result of one task (its first step); raises the job's error if it failed."""
        return self.app.AsyncResult(task_id).get(timeout=timeout, propagate=True)

    def wait(self, certificate_id: str, timeout: float = 300.0, interval: float = 0.5) -> dict[str, Any]:
        """Poll until the certificate reaches a terminal state (ACTIVE, FAILED, REVOKED, EXPIRED)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                st = self.status(certificate_id)
            except Exception as exc:
                # the status task may run before the issue task created the row: still pending
                if "no certificate" not in str(exc) or time.monotonic() > deadline:
                    raise
                st = {"certificate_id": certificate_id, "state": "PENDING"}
            if st.get("state") in TERMINAL or time.monotonic() > deadline:
                return st
            time.sleep(interval)


def app_for_sending() -> Celery:
    """Inside certqueue (CLI, API, manager): the process's configured app, or one that only sends
    when the process has not built it (tasks are sent by name)."""
    from certqueue.celery_app import lazy_app

    return lazy_app.for_sending()


def send(task: str, payload: dict[str, Any], *, queue: str = "acme", countdown: float | None = None) -> str:
    res = app_for_sending().send_task(task, args=[payload], queue=queue, countdown=countdown)
    return str(res.id)
