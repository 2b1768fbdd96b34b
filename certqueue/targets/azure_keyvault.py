"""The ``azure_keyvault`` target: certificates in an Azure Key Vault.

Owns the Key Vault certificates it imported, one name per certqueue certificate (derived from the
certificate id; Key Vault names allow ``[0-9a-zA-Z-]``). A renewal is a new version under the same
name, so App Gateway, Front Door and App Service bindings that use the versionless id pick it up.
The reference kept is that versionless id (``https://<vault>/certificates/<name>``); ``fingerprint``
reads the latest version's DER (``cer``).

Credentials: ``tenant_id`` + ``client_id`` + ``client_secret`` (a service principal), or none of
them for ``DefaultAzureCredential`` (managed identity, workload identity, environment), or a
``credential`` object (in-process tests, custom auth). ``authority_host`` points either credential
at another Entra ID authority (a sovereign cloud, or a test fake; as the Azure DNS provider's
setting of that name does); ``connection_verify`` then applies to it too. The import is PEM (key,
leaf and chain concatenated) or PKCS#12.

Error reasons: ``azure_keyvault:auth``, ``:not_found``, ``:invalid``, ``:conflict`` (a soft-deleted
certificate holds the name), ``:key_mismatch`` (permanent); ``:throttled``, ``:unavailable`` (5xx),
``:unreachable`` (retryable).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from certqueue import plugins
from certqueue.errors import ConfigError, TargetError
from certqueue.plugins import Setting
from certqueue.targets._shared import (
    ParsedBundle,
    check_bundle,
    error,
    non_negative,
    read_settings,
    safe_detail,
    secret_value,
)
from certqueue.targets.base import Bundle, Target

NAME = "azure_keyvault"

SETTINGS: plugins.Table = (
    Setting("key_vault_url", (str,), "https://<vault>.vault.azure.net (alias: key_vault)"),
    Setting("tenant_id", (str,), "service principal: tenant"),
    Setting("client_id", (str,), "service principal: application (client) id"),
    Setting("client_secret", (str,), "service principal: client secret", secret=True),
    Setting("credential", (object,), "an azure-core TokenCredential object (in-process tests, custom auth)"),
    Setting("certificate_name", (str,), "Key Vault name, with {certificate_id}", default="{certificate_id}"),
    Setting("content_type", (str,), "pem or pkcs12", default="pem"),
    Setting("connection_verify", (str, bool), "CA bundle path, or false (tests)"),
    Setting("authority_host", (str,), "Entra ID authority (sovereign clouds, tests)"),
    Setting(
        "purge", (bool,), "purge on remove (a soft-deleted certificate keeps its name taken)", default=False
    ),
    Setting(
        "purge_wait_seconds",
        (int, float),
        "how long remove waits for the deletion before purging",
        default=30.0,
    ),
    Setting("tags", (dict,), "extra tags on the certificate"),
    Setting("timeout", (int, float), "seconds per HTTP request", default=30.0),
    Setting("max_retries", (int,), "SDK retries", default=2),
)
ALIASES = {"key_vault": "key_vault_url"}

_INVALID_NAME_CHARS = re.compile(r"[^0-9A-Za-z-]+")
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})

T = TypeVar("T")


def certificate_name_for(template: str, certificate_id: str) -> str:
    """The Key Vault name for a certqueue id: ``[0-9a-zA-Z-]``, at most 127 characters."""
    name = _INVALID_NAME_CHARS.sub("-", template.format(certificate_id=certificate_id)).strip("-")
    return name[:127] or "certificate"


class AzureKeyVaultTarget(Target):
    name = NAME
    settings = SETTINGS

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        s = read_settings(NAME, config, SETTINGS, ALIASES)
        non_negative(NAME, s, "timeout", "max_retries", "purge_wait_seconds")
        where = f"target {NAME}"
        if not s["key_vault_url"]:
            raise ConfigError(
                f"{where}: missing required setting 'key_vault_url'", source=where, key="key_vault_url"
            )
        url = urlsplit(s["key_vault_url"])
        if url.scheme != "https" or not url.hostname:
            raise ConfigError(
                f"{where}: 'key_vault_url' must be an https URL", source=where, key="key_vault_url"
            )
        self.vault_url = s["key_vault_url"].rstrip("/")
        sp = {k: s[k] for k in ("tenant_id", "client_id", "client_secret")}
        given = [k for k, v in sp.items() if v is not None]
        if given and len(given) < 3:
            missing = next(k for k, v in sp.items() if v is None)
            raise ConfigError(
                f"{where}: tenant_id, client_id and client_secret go together", source=where, key=missing
            )
        if given and s["credential"] is not None:
            raise ConfigError(
                f"{where}: give either a credential or a service principal, not both",
                source=where,
                key="credential",
            )
        if "{certificate_id}" not in s["certificate_name"]:
            raise ConfigError(
                f"{where}: 'certificate_name' is a template and must contain "
                "'{certificate_id}' (one region holds many certificates)",
                source=where,
                key="certificate_name",
            )
        if s["content_type"] not in ("pem", "pkcs12"):
            raise ConfigError(
                f"{where}: 'content_type' must be pem or pkcs12", source=where, key="content_type"
            )
        self._sp = sp
        self._credential = s["credential"]
        self.name_template: str = s["certificate_name"]
        self.content_type: str = s["content_type"]
        self.connection_verify = s["connection_verify"]
        self.authority_host: str | None = s["authority_host"]
        if self.authority_host is not None and urlsplit(self.authority_host).scheme != "https":
            raise ConfigError(
                f"{where}: 'authority_host' must be an https URL", source=where, key="authority_host"
            )
        self.purge: bool = s["purge"]
        self.purge_wait = float(s["purge_wait_seconds"])
        self.tags = {str(k): str(v) for k, v in (s["tags"] or {}).items()}
        self.timeout = float(s["timeout"])
        self.max_retries = int(s["max_retries"])
        self._client: Any = None

    def __repr__(self) -> str:
        return f"AzureKeyVaultTarget(vault_url={self.vault_url!r})"

    @property
    def client(self) -> Any:
        if self._client is None:
            from azure.keyvault.certificates import CertificateClient

            kwargs: dict[str, Any] = {
                "retry_total": self.max_retries,
                "connection_timeout": self.timeout,
                "read_timeout": self.timeout,
                # the challenge names vault.azure.net; a loopback test vault cannot match it
                "verify_challenge_resource": urlsplit(self.vault_url).hostname not in _LOOPBACK,
            }
            if self.connection_verify is not None:
                kwargs["connection_verify"] = self.connection_verify
            self._client = CertificateClient(self.vault_url, self._make_credential(), **kwargs)
        return self._client

    def _make_credential(self) -> Any:
        if self._credential is not None:
            return self._credential
        kwargs: dict[str, Any] = {"connection_timeout": self.timeout, "read_timeout": self.timeout}
        if self.authority_host:
            kwargs["authority"] = self.authority_host
            # a non-public authority (sovereign cloud proxy, test fake) is not in Entra's discovery list
            kwargs["disable_instance_discovery"] = True
            if self.connection_verify is not None:
                kwargs["connection_verify"] = self.connection_verify
        if self._sp["tenant_id"] is not None:
            from azure.identity import ClientSecretCredential

            return ClientSecretCredential(
                self._sp["tenant_id"],
                self._sp["client_id"],
                secret_value(self._sp["client_secret"]) or "",
                **kwargs,
            )
        from azure.identity import DefaultAzureCredential

        return DefaultAzureCredential(**kwargs)

    # -- interface -------------------------------------------------------------------------------

    def deploy(self, bundle: Bundle, previous_ref: str | None) -> str:
        parsed = check_bundle(NAME, bundle)
        name = self._own_name(previous_ref) or certificate_name_for(self.name_template, bundle.certificate_id)
        tags = {**self.tags, "certqueue-certificate-id": bundle.certificate_id}
        self.import_parsed(name, parsed, bundle.cert_pem, bundle.chain_pem, tags)
        return f"{self.vault_url}/certificates/{name}"

    def import_parsed(
        self,
        name: str,
        parsed: ParsedBundle,
        cert_pem: str,
        chain_pem: str | None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Import a checked bundle as a new version of ``name``; returns the versioned certificate id."""
        from azure.keyvault.certificates import CertificateContentType, CertificatePolicy

        if self.content_type == "pem":
            key_pem = parsed.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            payload = key_pem + cert_pem.encode().rstrip(b"\n") + b"\n" + (chain_pem or "").encode()
            policy = CertificatePolicy(content_type=CertificateContentType.pem)
        else:
            payload = pkcs12.serialize_key_and_certificates(
                name.encode(),
                parsed.key,  # type: ignore[arg-type]  # PKCS#12 takes RSA, EC and EdDSA keys: ACME's kinds
                parsed.leaf,
                list(parsed.chain) or None,
                serialization.NoEncryption(),
            )
            policy = CertificatePolicy(content_type=CertificateContentType.pkcs12)
        cert = self._call(
            name,
            lambda: self.client.import_certificate(
                name, payload, policy=policy, tags=dict(tags or self.tags) or None
            ),
        )
        return str(cert.id)

    def fingerprint(self, ref: str) -> str | None:
        import hashlib

        name = self._name_from_ref(ref)
        try:
            cert = self._call(name, lambda: self.client.get_certificate(name))
        except TargetError as exc:
            if exc.reason == f"{NAME}:not_found":
                return None
            raise
        return hashlib.sha256(bytes(cert.cer)).hexdigest() if cert.cer else None

    def remove(self, ref: str) -> None:
        name = self._name_from_ref(ref)
        try:
            poller = self._call(name, lambda: self.client.begin_delete_certificate(name))
        except TargetError as exc:
            if exc.reason != f"{NAME}:not_found":
                raise
            if not self.purge:
                return
        else:
            if not self.purge:
                return
            self._call(name, lambda: poller.wait(timeout=self.purge_wait))
        try:
            self._call(name, lambda: self.client.purge_deleted_certificate(name))
        except TargetError as exc:
            if exc.reason != f"{NAME}:not_found":
                raise

    # -- helpers ---------------------------------------------------------------------------------

    def _own_name(self, ref: str | None) -> str | None:
        """The name in ``ref`` if it is a certificate of this vault (the vault may have been changed)."""
        try:
            return self._name_from_ref(ref) if ref else None
        except TargetError:
            return None

    def _name_from_ref(self, ref: str) -> str:
        """The certificate name in a (versioned or versionless) id of this vault."""
        url = urlsplit(ref)
        parts = [p for p in url.path.split("/") if p]
        vault = urlsplit(self.vault_url)
        same_vault = (url.scheme, url.netloc.lower()) == (vault.scheme, vault.netloc.lower())
        if not same_vault or len(parts) not in (2, 3) or parts[0] != "certificates":
            raise error(
                NAME, "invalid", f"{ref!r} is not a certificate id of {self.vault_url}", retryable=False
            )
        return parts[1]

    def _call(self, name: str, fn: Callable[[], T]) -> T:
        from azure.core.exceptions import (
            ClientAuthenticationError,
            HttpResponseError,
            ResourceNotFoundError,
            ServiceRequestError,
            ServiceResponseError,
        )

        what = f"certificate {name} in {self.vault_url}"
        try:
            return fn()
        except ClientAuthenticationError as exc:
            raise error(
                NAME,
                "auth",
                f"{what}: authentication failed ({exc.status_code or 'no token'})",
                retryable=False,
            ) from exc
        except ResourceNotFoundError as exc:
            raise error(NAME, "not_found", f"{what}: not found", retryable=False) from exc
        except HttpResponseError as exc:
            raise _http_error(what, exc) from exc
        except (ServiceRequestError, ServiceResponseError) as exc:
            raise error(
                NAME, "unreachable", f"{what}: cannot reach the vault ({type(exc).__name__})", retryable=True
            ) from exc


def _http_error(what: str, exc: Any) -> TargetError:
    status = int(exc.status_code or 0)
    code = getattr(getattr(exc, "error", None), "code", None) or "Unknown"
    detail = f"{what}: {code} ({status}): {safe_detail(getattr(getattr(exc, 'error', None), 'message', ''))}"
    if status in (401, 403):
        return error(NAME, "auth", detail, retryable=False)
    if status == 429:
        retry_after = _retry_after(exc)
        return error(NAME, "throttled", detail, retryable=True, retry_after=retry_after)
    if status >= 500:
        return error(NAME, "unavailable", detail, retryable=True, retry_after=_retry_after(exc))
    if status == 409:
        return error(NAME, "conflict", detail, retryable=False)
    return error(NAME, "invalid", detail, retryable=False)


def _retry_after(exc: Any) -> float | None:
    try:
        value = exc.response.headers.get("Retry-After")
        return float(value) if value is not None else None
    except (AttributeError, ValueError):
        return None
