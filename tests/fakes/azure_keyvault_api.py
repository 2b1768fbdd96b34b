"""A fake Azure Key Vault (certificates data plane) over loopback HTTPS, for the official SDK.

Implements what ``azure-keyvault-certificates`` sends for import, get (latest and by version), list,
list versions, delete, get and purge deleted, and the certificate's secret, with the bearer challenge
flow: a request without ``Authorization`` gets 401 and a ``WWW-Authenticate: Bearer authorization=...,
resource=...`` challenge; the SDK asks its credential for a token and resends. The token is checked
against :attr:`FakeKeyVault.token`. In-process tests use :class:`StaticTokenCredential`; worker
processes (which read settings, not objects) use a service principal through azure-identity's
``ClientSecretCredential`` pointed at this fake's Entra ID token endpoint (the target's
``authority_host`` setting = :attr:`FakeKeyVault.url`): ``GET /{tenant}/v2.0/.well-known/
openid-configuration`` and ``POST /{tenant}/oauth2/v2.0/token`` (client_credentials for
:attr:`client_id` / :attr:`client_secret`, else 401 ``invalid_client`` as Entra ID answers); the token
it issues is :attr:`token`.

Like the real service, an import whose private key does not match its certificate is refused
(400 BadParameter), and a soft-deleted name cannot be imported into until it is purged (409).

State is in memory and public for tests to inspect: ``certificates`` (name -> list of versions,
oldest first), ``deleted``, ``requests`` (method, path) in arrival order. Faults: :meth:`fail_next`
answers the next N authorized requests with a 5xx or 429.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from devstack.tls import make_server_tls

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
PEM_TYPE = "application/x-pem-file"
PKCS12_TYPE = "application/x-pkcs12"
_NAME = re.compile(r"^[0-9a-zA-Z-]{1,127}$")


class StaticTokenCredential:
    """A TokenCredential that always returns ``token``: what the tests authenticate with."""

    def __init__(self, token: str) -> None:
        self._token = token

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        from azure.core.credentials import AccessToken

        return AccessToken(self._token, int(time.time()) + 3600)

    def __repr__(self) -> str:
        return "StaticTokenCredential(***)"


@dataclass
class Version:
    version: str
    der: bytes
    content_type: str
    secret_value: str  # what GET /secrets returns: the PEM or base64 PFX, key included
    subject: str
    dns_names: list[str]
    key_type: str
    not_before: int
    expires: int
    created: int
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Fault:
    remaining: int
    status: int
    code: str
    retry_after: int | None


class KeyVaultError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class FakeKeyVault:
    """Start with :meth:`start`; ``url`` is the vault URL, ``ca_file`` the CA to trust."""

    def __init__(
        self,
        workdir: Path,
        token: str = "fake-kv-token",
        *,
        client_id: str = "kv-client",
        client_secret: str = "kv-test-secret",
    ) -> None:
        self.tls = make_server_tls(workdir, label="fake key vault")
        self.token = token
        self.tenant_id = TENANT
        self.client_id, self.client_secret = client_id, client_secret
        self.tokens_issued = 0
        self.certificates: dict[str, list[Version]] = {}
        self.deleted: dict[str, tuple[int, list[Version]]] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._faults: list[Fault] = []
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    @property
    def ca_file(self) -> str:
        return str(self.tls.ca_cert)

    # -- lifecycle and test switches -------------------------------------------------------------

    def start(self) -> FakeKeyVault:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.tls.cert, self.tls.key)
        fake = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def finish_request(self, request: Any, client_address: Any) -> None:
                # the TLS handshake happens in the connection's thread, not in the accept loop
                request.settimeout(5)
                tls = ctx.wrap_socket(request, server_side=True)
                self.RequestHandlerClass(tls, client_address, self)

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # handshake failures and dropped connections are the client's business

        class Handler(_Handler):
            vault = fake

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"https://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, name="fake-keyvault", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def reset(self) -> None:
        with self.lock:
            self.certificates.clear()
            self.deleted.clear()
            self.requests.clear()
            self._faults.clear()

    def fail_next(
        self, n: int, status: int = 503, code: str | None = None, retry_after: int | None = None
    ) -> None:
        """Answer the next ``n`` authorized requests with ``status`` (e.g. 503, 500, 429)."""
        code = code or ("Throttled" if status == 429 else "ServiceUnavailable")
        with self.lock:
            self._faults.append(Fault(n, status, code, retry_after))

    def _take_fault(self) -> Fault | None:
        with self.lock:
            while self._faults and self._faults[0].remaining <= 0:
                self._faults.pop(0)
            if not self._faults:
                return None
            self._faults[0].remaining -= 1
            return self._faults[0]

    # -- the API ---------------------------------------------------------------------------------

    def handle(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        parts = [p for p in path.split("/") if p]
        with self.lock:
            if parts == ["certificates"] and method == "GET":
                return 200, {
                    "value": [
                        self._item(n, v[-1], versioned=False) for n, v in sorted(self.certificates.items())
                    ],
                    "nextLink": None,
                }
            if len(parts) >= 2 and parts[0] == "certificates":
                name = parts[1]
                rest = parts[2:]
                if rest == ["import"] and method == "POST":
                    return 200, self._import(name, body)
                if rest == ["versions"] and method == "GET":
                    return 200, {
                        "value": [self._item(name, v, versioned=True) for v in self._versions(name)],
                        "nextLink": None,
                    }
                if rest == ["policy"] and method == "GET":
                    return 200, self._policy(name, self._versions(name)[-1])
                if not rest and method == "DELETE":
                    versions = self._versions(name)
                    del self.certificates[name]
                    now = int(time.time())
                    self.deleted[name] = (now, versions)
                    return 200, self._deleted_bundle(name, now, versions[-1])
                if len(rest) <= 1 and method == "GET":
                    versions = self._versions(name)
                    wanted = rest[0] if rest and rest[0] else None
                    if wanted is None:
                        return 200, self._bundle(name, versions[-1])
                    for v in versions:
                        if v.version == wanted:
                            return 200, self._bundle(name, v)
                    raise _not_found(name)
            if len(parts) == 2 and parts[0] == "deletedcertificates":
                name = parts[1]
                if name not in self.deleted:
                    raise KeyVaultError(404, "CertificateNotFound", f"Deleted Certificate not found: {name}")
                deleted_on, versions = self.deleted[name]
                if method == "GET":
                    return 200, self._deleted_bundle(name, deleted_on, versions[-1])
                if method == "DELETE":
                    del self.deleted[name]
                    return 204, None
            if len(parts) in (2, 3) and parts[0] == "secrets" and method == "GET":
                name = parts[1]
                versions = self._versions(name)
                v = versions[-1]
                if len(parts) == 3 and parts[2]:
                    v = next((x for x in versions if x.version == parts[2]), None) or _raise(_not_found(name))
                return 200, {
                    "value": v.secret_value,
                    "contentType": v.content_type,
                    "id": f"{self.url}/secrets/{name}/{v.version}",
                    "kid": f"{self.url}/keys/{name}/{v.version}",
                    "managed": True,
                    "attributes": self._attributes(v),
                }
        raise KeyVaultError(400, "BadParameter", f"unsupported operation {method} {path}")

    def identity(self, method: str, parts: list[str], raw: bytes) -> tuple[int, Any]:
        """The Entra ID endpoints azure-identity's ClientSecretCredential calls."""
        tenant = parts[0]
        base = f"{self.url}/{tenant}"
        if method == "GET" and parts[1:] == ["v2.0", ".well-known", "openid-configuration"]:
            return 200, {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "issuer": f"{base}/v2.0",
                "tenant_region_scope": None,
            }
        if method == "POST" and parts[1:] == ["oauth2", "v2.0", "token"]:
            form = dict(parse_qsl(raw.decode()))
            if (
                tenant != self.tenant_id
                or form.get("client_id") != self.client_id
                or form.get("client_secret") != self.client_secret
            ):
                return 401, {
                    "error": "invalid_client",
                    "error_description": "AADSTS7000215: Invalid client secret provided.",
                    "error_codes": [7000215],
                }
            with self.lock:
                self.tokens_issued += 1
            return 200, {
                "token_type": "Bearer",
                "expires_in": 3600,
                "ext_expires_in": 3600,
                "access_token": self.token,
            }
        return 404, {"error": "not_found"}

    def _versions(self, name: str) -> list[Version]:
        if name not in self.certificates:
            raise _not_found(name)
        return self.certificates[name]

    def _import(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        if not _NAME.match(name):
            raise KeyVaultError(400, "BadParameter", "The request URI contains an invalid name: " + name)
        if name in self.deleted:
            raise KeyVaultError(
                409,
                "Conflict",
                f"Certificate {name} is currently in a deleted but recoverable "
                "state, and its name cannot be reused; in this state, the certificate can only "
                "be recovered or purged.",
            )
        policy = body.get("policy") or {}
        content_type = (policy.get("secret_props") or {}).get("contentType") or PKCS12_TYPE
        try:
            raw = base64.b64decode(body["value"], validate=True)
        except (KeyError, ValueError):
            raise KeyVaultError(400, "BadParameter", "Property 'value' must be base64") from None
        leaf, key = _parse_import(raw, content_type, body.get("pwd"))
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
            raise KeyVaultError(
                400,
                "BadParameter",
                "Private key specified in the request does not match the public key of the certificate.",
            )
        try:
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            dns_names = san.get_values_for_type(x509.DNSName)
        except x509.ExtensionNotFound:
            dns_names = []
        der = leaf.public_bytes(serialization.Encoding.DER)
        version = Version(
            version=uuid.uuid4().hex,
            der=der,
            content_type=content_type,
            secret_value=raw.decode() if content_type == PEM_TYPE else body["value"],
            subject=leaf.subject.rfc4514_string(),
            dns_names=list(dns_names),
            key_type="EC" if "EllipticCurve" in type(key).__name__ else "RSA",
            not_before=int(leaf.not_valid_before_utc.timestamp()),
            expires=int(leaf.not_valid_after_utc.timestamp()),
            created=int(time.time()),
            tags=dict(body.get("tags") or {}),
        )
        self.certificates.setdefault(name, []).append(version)
        return self._bundle(name, version)

    def _attributes(self, v: Version) -> dict[str, Any]:
        return {
            "enabled": True,
            "nbf": v.not_before,
            "exp": v.expires,
            "created": v.created,
            "updated": v.created,
            "recoveryLevel": "Recoverable+Purgeable",
            "recoverableDays": 90,
        }

    def _policy(self, name: str, v: Version) -> dict[str, Any]:
        return {
            "id": f"{self.url}/certificates/{name}/policy",
            "key_props": {"exportable": True, "kty": v.key_type, "reuse_key": False},
            "secret_props": {"contentType": v.content_type},
            "x509_props": {"subject": v.subject, "sans": {"dns_names": v.dns_names}},
            "issuer": {"name": "Unknown"},
            "attributes": {"enabled": True, "created": v.created, "updated": v.created},
        }

    def _item(self, name: str, v: Version, *, versioned: bool) -> dict[str, Any]:
        cid = f"{self.url}/certificates/{name}" + (f"/{v.version}" if versioned else "")
        return {"id": cid, "x5t": _x5t(v.der), "attributes": self._attributes(v), "tags": v.tags}

    def _bundle(self, name: str, v: Version) -> dict[str, Any]:
        return {
            "id": f"{self.url}/certificates/{name}/{v.version}",
            "kid": f"{self.url}/keys/{name}/{v.version}",
            "sid": f"{self.url}/secrets/{name}/{v.version}",
            "x5t": _x5t(v.der),
            "cer": base64.b64encode(v.der).decode(),
            "attributes": self._attributes(v),
            "policy": self._policy(name, v),
            "tags": v.tags,
        }

    def _deleted_bundle(self, name: str, deleted_on: int, v: Version) -> dict[str, Any]:
        return {
            **self._bundle(name, v),
            "recoveryId": f"{self.url}/deletedcertificates/{name}",
            "deletedDate": deleted_on,
            "scheduledPurgeDate": deleted_on + 90 * 86400,
        }


def _raise(exc: Exception) -> Any:
    raise exc


def _not_found(name: str) -> KeyVaultError:
    return KeyVaultError(
        404, "CertificateNotFound", f"A certificate with (name/id) {name} was not found in this key vault."
    )


def _x5t(der: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha1(der).digest()).decode().rstrip("=")


def _parse_import(raw: bytes, content_type: str, password: str | None) -> tuple[x509.Certificate, Any]:
    try:
        if content_type == PEM_TYPE:
            certs = x509.load_pem_x509_certificates(raw)
            key_block = re.search(
                rb"-----BEGIN [A-Z ]*PRIVATE KEY-----.+?-----END [A-Z ]*PRIVATE KEY-----", raw, re.S
            )
            if key_block is None:
                raise ValueError("no key")
            key = serialization.load_pem_private_key(key_block.group(0), password=None)
            return certs[0], key
        key, leaf, _ = pkcs12.load_key_and_certificates(raw, password.encode() if password else None)
        if key is None or leaf is None:
            raise ValueError("no key or certificate")
        return leaf, key
    except ValueError:
        raise KeyVaultError(
            400,
            "BadParameter",
            "The specified certificate content is in an unexpected format or has no private key.",
        ) from None


class _Handler(BaseHTTPRequestHandler):
    vault: FakeKeyVault
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        vault = self.vault
        parts = [p for p in url.path.split("/") if p]
        if len(parts) >= 2 and parts[1] in ("v2.0", "oauth2"):
            status, payload = vault.identity(method, parts, raw)
            return self._reply(status, payload)
        with vault.lock:
            vault.requests.append((method, url.path))
        if "api-version" not in parse_qs(url.query):
            return self._reply(
                400, _err("MissingApiVersionParameter", "The api-version query parameter is required")
            )
        auth = self.headers.get("Authorization")
        if auth is None:
            return self._reply(
                401,
                _err("Unauthorized", "AKV10000: Request is missing a Bearer or PoP token."),
                challenge=True,
            )
        if auth != f"Bearer {vault.token}":
            return self._reply(
                401, _err("Unauthorized", "AKV10032: Invalid issuer or token."), challenge=True
            )
        fault = vault._take_fault()
        if fault is not None:
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
            return self._reply(fault.status, _err(fault.code, "injected fault"), headers=headers)
        try:
            body = json.loads(raw) if raw else {}
            status, payload = vault.handle(method, url.path, body)
        except KeyVaultError as exc:
            return self._reply(exc.status, _err(exc.code, exc.message))
        except json.JSONDecodeError:
            return self._reply(400, _err("BadParameter", "body is not JSON"))
        self._reply(status, payload)

    def _reply(
        self, status: int, payload: Any, *, challenge: bool = False, headers: dict[str, str] | None = None
    ) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if challenge:
            self.send_header(
                "WWW-Authenticate",
                f'Bearer authorization="https://login.microsoftonline.com/{TENANT}", '
                'resource="https://vault.azure.net"',
            )
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if data:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_PATCH(self) -> None:
        self._serve("PATCH")


def _err(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}
