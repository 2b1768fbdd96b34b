"""The ``gcp_certmanager`` target: self-managed certificates in GCP Certificate Manager.

Owns the certificates it created (``projects/<p>/locations/<l>/certificates/<id>``, labelled
``certqueue-certificate-id``). The GCP id is derived from the certqueue id (lowercase letters,
digits and hyphens, starting with a letter, at most 63 characters). A renewal PATCHes the same
resource (``update_mask`` ``self_managed,labels``), so certificate map entries keep pointing at it; a
create that meets 409 (the resource exists: an earlier attempt crashed after creating it) updates
instead. Every long-running operation is waited for with a bound (``operation_timeout``).

Error reasons: ``gcp_certmanager:auth``, ``:not_found``, ``:invalid``, ``:in_use``, ``:key_mismatch``
(permanent); ``:throttled``, ``:unavailable`` (5xx), ``:unreachable``, ``:timeout`` (retryable).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from certqueue import plugins
from certqueue.errors import ConfigError, TargetError
from certqueue.plugins import Setting
from certqueue.targets._shared import check_bundle, error, non_negative, read_settings, safe_detail
from certqueue.targets.base import Bundle, Target, leaf_fingerprint

NAME = "gcp_certmanager"
LABEL_CERTIFICATE_ID = "certqueue-certificate-id"

SETTINGS: plugins.Table = (
    Setting("project_id", (str,), "GCP project"),
    Setting("location", (str,), "Certificate Manager location", default="global"),
    Setting("api_endpoint", (str,), "API endpoint (tests)"),
    Setting(
        "credentials", (object,), "a google.auth credentials object; default: application default credentials"
    ),
    Setting("credentials_file", (str,), "a service account JSON key file"),
    Setting(
        "anonymous", (bool,), "no credentials at all: for emulators and test servers only", default=False
    ),
    Setting("transport", (str,), "rest or grpc", default="rest"),
    Setting("labels", (dict,), "extra labels on the certificate"),
    Setting("timeout", (int, float), "seconds per request", default=30.0),
    Setting(
        "operation_timeout", (int, float), "seconds a long-running operation is waited for", default=120.0
    ),
    Setting("max_retries", (int,), "retries of throttling and 5xx", default=2),
)

_ID_INVALID = re.compile(r"[^a-z0-9-]+")
_LABEL_INVALID = re.compile(r"[^a-z0-9_-]+")

T = TypeVar("T")


def gcp_certificate_id(certificate_id: str) -> str:
    """A valid GCP certificate id for a certqueue id (``cert_abc`` -> ``cert-abc``).

    Ids that are too long, or that lose information when lowercased, get a hash suffix so two
    distinct certqueue ids never share a GCP id.
    """
    cid = _ID_INVALID.sub("-", certificate_id.lower()).strip("-")
    if not cid or not cid[0].isalpha():
        cid = "cq-" + cid
    if len(cid) > 63 or certificate_id != certificate_id.lower():
        digest = hashlib.sha256(certificate_id.encode()).hexdigest()[:8]
        cid = cid[: 63 - 9].rstrip("-") + "-" + digest
    return cid.rstrip("-")


def _label_value(value: str) -> str:
    return _LABEL_INVALID.sub("-", value.lower())[:63]


class GCPCertManagerTarget(Target):
    name = NAME
    settings = SETTINGS

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        s = read_settings(NAME, config, SETTINGS)
        non_negative(NAME, s, "timeout", "operation_timeout", "max_retries")
        where = f"target {NAME}"
        if not s["project_id"]:
            raise ConfigError(
                f"{where}: missing required setting 'project_id'", source=where, key="project_id"
            )
        if s["transport"] not in ("rest", "grpc"):
            raise ConfigError(f"{where}: 'transport' must be rest or grpc", source=where, key="transport")
        if s["credentials"] is not None and s["credentials_file"] is not None:
            raise ConfigError(
                f"{where}: give credentials or credentials_file, not both",
                source=where,
                key="credentials_file",
            )
        self.project_id: str = s["project_id"]
        self.location: str = s["location"]
        self.parent = f"projects/{self.project_id}/locations/{self.location}"
        self.api_endpoint: str | None = s["api_endpoint"]
        self._credentials = s["credentials"]
        if s["anonymous"] and self._credentials is None:
            from google.auth.credentials import AnonymousCredentials

            self._credentials = AnonymousCredentials()
        self._credentials_file: str | None = s["credentials_file"]
        self.transport: str = s["transport"]
        self.labels = {_label_value(str(k)): _label_value(str(v)) for k, v in (s["labels"] or {}).items()}
        self.timeout = float(s["timeout"])
        self.operation_timeout = float(s["operation_timeout"])
        self.max_retries = int(s["max_retries"])
        self._client: Any = None

    def __repr__(self) -> str:
        return f"GCPCertManagerTarget(parent={self.parent!r}, api_endpoint={self.api_endpoint!r})"

    @property
    def client(self) -> Any:
        if self._client is None:
            from google.api_core.client_options import ClientOptions
            from google.cloud import certificate_manager_v1

            options = ClientOptions(api_endpoint=self.api_endpoint) if self.api_endpoint else None
            kwargs: dict[str, Any] = {"transport": self.transport, "client_options": options}
            if self._credentials is not None:
                kwargs["credentials"] = self._credentials
            elif self._credentials_file is not None:
                from google.oauth2 import service_account

                kwargs["credentials"] = service_account.Credentials.from_service_account_file(
                    self._credentials_file, scopes=["https://www.googleapis.com/auth/cloud-platform"]
                )
            self._client = certificate_manager_v1.CertificateManagerClient(**kwargs)
        return self._client

    # -- interface -------------------------------------------------------------------------------

    def deploy(self, bundle: Bundle, previous_ref: str | None) -> str:
        check_bundle(NAME, bundle)
        labels = {**self.labels, LABEL_CERTIFICATE_ID: _label_value(bundle.certificate_id)}
        if previous_ref and not self._is_ours(previous_ref):
            previous_ref = None  # project or location changed: create here
        return self.upsert(
            gcp_certificate_id(bundle.certificate_id),
            bundle.fullchain_pem,
            bundle.key_pem,
            labels,
            previous_ref,
        )

    def upsert(
        self,
        certificate_id: str,
        fullchain_pem: str,
        key_pem: str,
        labels: Mapping[str, str],
        name: str | None = None,
    ) -> str:
        """Update ``name`` (if given and present) or create ``certificate_id``; returns the resource name.

        The key was checked by the caller.
        """
        from google.cloud import certificate_manager_v1 as cm

        managed = cm.Certificate.SelfManagedCertificate(
            pem_certificate=fullchain_pem, pem_private_key=key_pem
        )
        if name:
            try:
                return self._update(name, managed, labels)
            except TargetError as exc:
                if exc.reason != f"{NAME}:not_found":
                    raise
        name = f"{self.parent}/certificates/{certificate_id}"
        cert = cm.Certificate(self_managed=managed, labels=dict(labels))
        try:
            self._call(
                name,
                lambda: self._wait(
                    self.client.create_certificate(
                        parent=self.parent, certificate_id=certificate_id, certificate=cert, **self._opts()
                    )
                ),
            )
        except TargetError as exc:
            if exc.reason != f"{NAME}:conflict":
                raise
            return self._update(name, managed, labels)  # created by an attempt that crashed afterwards
        return name

    def fingerprint(self, ref: str) -> str | None:
        self._check_ref(ref)
        try:
            cert = self._call(ref, lambda: self.client.get_certificate(name=ref, **self._opts()))
        except TargetError as exc:
            if exc.reason == f"{NAME}:not_found":
                return None
            raise
        return leaf_fingerprint(cert.pem_certificate) if cert.pem_certificate else None

    def remove(self, ref: str) -> None:
        self._check_ref(ref)
        try:
            self._call(ref, lambda: self._wait(self.client.delete_certificate(name=ref, **self._opts())))
        except TargetError as exc:
            if exc.reason != f"{NAME}:not_found":
                raise

    # -- helpers ---------------------------------------------------------------------------------

    def _update(self, name: str, managed: Any, labels: Mapping[str, str]) -> str:
        from google.cloud import certificate_manager_v1 as cm
        from google.protobuf import field_mask_pb2

        cert = cm.Certificate(name=name, self_managed=managed, labels=dict(labels))
        mask = field_mask_pb2.FieldMask(paths=["self_managed", "labels"])
        self._call(
            name,
            lambda: self._wait(
                self.client.update_certificate(certificate=cert, update_mask=mask, **self._opts())
            ),
        )
        return name

    def _is_ours(self, ref: str) -> bool:
        return re.fullmatch(rf"{re.escape(self.parent)}/certificates/[a-z][a-z0-9-]{{0,62}}", ref) is not None

    def _check_ref(self, ref: str) -> None:
        if not self._is_ours(ref):
            raise error(NAME, "invalid", f"{ref!r} is not a certificate of {self.parent}", retryable=False)

    def _opts(self) -> dict[str, Any]:
        # in-call retries are ours (counted, see _call); the task retries beyond them
        return {"retry": None, "timeout": self.timeout}

    def _wait(self, operation: Any) -> Any:
        return operation.result(timeout=self.operation_timeout)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        attempt = 0
        while True:
            try:
                return self._call_once(what, fn)
            except TargetError as exc:
                if not exc.retryable or exc.reason == f"{NAME}:timeout" or attempt >= self.max_retries:
                    raise
                attempt += 1
                # short and bounded: longer waits are the task's retry countdown, not a sleep here
                time.sleep(min(0.2 * 2 ** (attempt - 1), 2.0))

    def _call_once(self, what: str, fn: Callable[[], T]) -> T:
        import concurrent.futures

        import requests
        from google.api_core import exceptions as gexc
        from google.auth import exceptions as auth_exc

        try:
            return fn()
        except gexc.GoogleAPICallError as exc:
            raise _api_error(what, exc) from exc
        except gexc.RetryError as exc:
            raise error(NAME, "unreachable", f"{what}: gave up retrying", retryable=True) from exc
        except (auth_exc.RefreshError, auth_exc.DefaultCredentialsError) as exc:
            raise error(
                NAME, "auth", f"{what}: no usable credentials ({type(exc).__name__})", retryable=False
            ) from exc
        except (requests.ConnectionError, requests.Timeout, auth_exc.TransportError) as exc:
            raise error(
                NAME,
                "unreachable",
                f"{what}: cannot reach Certificate Manager ({type(exc).__name__})",
                retryable=True,
            ) from exc
        except concurrent.futures.TimeoutError as exc:
            raise error(
                NAME,
                "timeout",
                f"{what}: operation not done after {self.operation_timeout:g}s",
                retryable=True,
            ) from exc


def _api_error(what: str, exc: Any) -> TargetError:
    from google.api_core import exceptions as gexc

    status = int(exc.code or 0) if isinstance(exc.code, int) else 0
    detail = f"{what}: {type(exc).__name__}: {safe_detail(exc.message)}"
    if isinstance(exc, gexc.Unauthenticated | gexc.Unauthorized | gexc.PermissionDenied | gexc.Forbidden):
        return error(NAME, "auth", detail, retryable=False)
    if isinstance(exc, gexc.NotFound):
        return error(NAME, "not_found", detail, retryable=False)
    if isinstance(exc, gexc.Conflict | gexc.AlreadyExists):
        return error(NAME, "conflict", detail, retryable=False)
    if isinstance(exc, gexc.TooManyRequests | gexc.ResourceExhausted):
        return error(NAME, "throttled", detail, retryable=True)
    if isinstance(exc, gexc.FailedPrecondition):
        return error(NAME, "in_use", detail, retryable=False)
    if isinstance(exc, gexc.ServerError | gexc.DeadlineExceeded) or status >= 500:
        return error(NAME, "unavailable", detail, retryable=True)
    return error(NAME, "invalid", detail, retryable=False)
