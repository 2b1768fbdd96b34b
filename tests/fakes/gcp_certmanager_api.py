"""A fake GCP Certificate Manager (v1 REST, certificates and operations) on loopback plain HTTP.

For the official client with ``transport="rest"``, ``AnonymousCredentials`` (or a static token) and
``client_options.api_endpoint="http://127.0.0.1:PORT"``. Implements: create a self-managed
certificate (POST ``.../certificates?certificateId=ID``; 409 ALREADY_EXISTS on a duplicate id),
get, list (``filter`` on ``labels.KEY="VALUE"`` or ``name="..."``, ``pageSize``/``pageToken``), patch
(``updateMask`` of ``selfManaged``, ``labels``, ``description``), delete, and the long-running
operations they return (with their ``@type``), polled at ``.../operations/{op}``. Like the real
service it refuses a private key that does not match the certificate and never returns the key.

State is in memory for tests to inspect: ``certificates`` (full name -> dict, private key kept only
as ``_key_pem``), ``operations``, ``requests`` (method, path). Switches: :meth:`fail_next` (5xx or
429 for the next N requests), ``required_token`` (when set, requests must carry that bearer token),
``operation_polls`` (how many GETs an operation stays not done; 0: done at once).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

TYPE_CERTIFICATE = "type.googleapis.com/google.cloud.certificatemanager.v1.Certificate"
TYPE_METADATA = "type.googleapis.com/google.cloud.certificatemanager.v1.OperationMetadata"
TYPE_EMPTY = "type.googleapis.com/google.protobuf.Empty"
_ID = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
_PARENT = r"projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)"
_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Fault:
    remaining: int
    status: int


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class FakeCertificateManager:
    """Start with :meth:`start`; ``endpoint`` is the api_endpoint to give the client."""

    def __init__(self) -> None:
        self.certificates: dict[str, dict[str, Any]] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.required_token: str | None = None
        self.operation_polls = 0
        self.lock = threading.Lock()
        self._pending: dict[str, int] = {}
        self._faults: list[Fault] = []
        self._server: ThreadingHTTPServer | None = None
        self.endpoint = ""

    def start(self) -> FakeCertificateManager:
        fake = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True

        class Handler(_Handler):
            api = fake

        self._server = Server(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, name="fake-certmanager", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def reset(self) -> None:
        with self.lock:
            self.certificates.clear()
            self.operations.clear()
            self.requests.clear()
            self._pending.clear()
            self._faults.clear()
            self.required_token = None
            self.operation_polls = 0

    def fail_next(self, n: int, status: int = 503) -> None:
        with self.lock:
            self._faults.append(Fault(n, status))

    def take_fault(self) -> int | None:
        with self.lock:
            while self._faults and self._faults[0].remaining <= 0:
                self._faults.pop(0)
            if not self._faults:
                return None
            self._faults[0].remaining -= 1
            return self._faults[0].status

    # -- the API ---------------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, str], body: dict[str, Any]) -> Any:
        m = re.fullmatch(rf"/v1/({_PARENT})/certificates", path)
        if m and method == "POST":
            return self._create(m.group(1), query.get("certificateId", ""), body)
        if m and method == "GET":
            return self._list(m.group(1), query)
        m = re.fullmatch(rf"/v1/({_PARENT}/certificates/[^/]+)", path)
        if m:
            name = m.group(1)
            with self.lock:
                if name not in self.certificates:
                    raise ApiError(404, f"Resource '{name}' was not found")
                if method == "GET":
                    return self._public(self.certificates[name])
                if method == "PATCH":
                    return self._patch(name, query.get("updateMask", ""), body)
                if method == "DELETE":
                    del self.certificates[name]
                    return self._operation(name, "delete", {"@type": TYPE_EMPTY})
        m = re.fullmatch(rf"/v1/({_PARENT}/operations/[^/]+)", path)
        if m and method == "GET":
            with self.lock:
                op = self.operations.get(m.group(1))
                if op is None:
                    raise ApiError(404, f"Operation '{m.group(1)}' was not found")
                left = self._pending.get(op["name"], 0)
                if left > 0:
                    self._pending[op["name"]] = left - 1
                    return {k: v for k, v in op.items() if k != "response"} | {"done": False}
                return op
        raise ApiError(404, f"unknown method {method} {path}")

    def _create(self, parent: str, certificate_id: str, body: dict[str, Any]) -> dict[str, Any]:
        if not _ID.match(certificate_id):
            raise ApiError(400, f"Invalid certificate id '{certificate_id}'")
        name = f"{parent}/certificates/{certificate_id}"
        cert = self._self_managed(body.get("selfManaged") or {})
        with self.lock:
            if name in self.certificates:
                raise ApiError(409, f"Resource '{name}' already exists")
            now = _now()
            cert |= {
                "name": name,
                "createTime": now,
                "updateTime": now,
                "labels": dict(body.get("labels") or {}),
                "description": body.get("description", ""),
                "scope": "DEFAULT",
            }
            self.certificates[name] = cert
            return self._operation(name, "create", {"@type": TYPE_CERTIFICATE, **self._public(cert)})

    def _patch(self, name: str, mask: str, body: dict[str, Any]) -> dict[str, Any]:
        paths = [p.strip() for p in mask.split(",") if p.strip()]
        if not paths:
            raise ApiError(400, "update_mask is required")
        cert = self.certificates[name]
        for p in paths:
            if p in ("selfManaged", "self_managed"):
                cert |= self._self_managed(body.get("selfManaged") or {})
            elif p == "labels":
                cert["labels"] = dict(body.get("labels") or {})
            elif p == "description":
                cert["description"] = body.get("description", "")
            else:
                raise ApiError(400, f"field '{p}' cannot be updated")
        cert["updateTime"] = _now()
        return self._operation(name, "update", {"@type": TYPE_CERTIFICATE, **self._public(cert)})

    def _list(self, parent: str, query: dict[str, str]) -> dict[str, Any]:
        flt = query.get("filter", "").strip()
        label = re.fullmatch(r'labels\.([\w-]+)\s*=\s*"([^"]*)"', flt)
        by_name = re.fullmatch(r'name\s*=\s*"([^"]*)"', flt)
        if flt and not (label or by_name):
            raise ApiError(400, f"unsupported filter {flt!r}")

        def match(cert: dict[str, Any]) -> bool:
            if label:
                return bool(cert["labels"].get(label.group(1)) == label.group(2))
            return not by_name or cert["name"] == by_name.group(1)

        size = int(query.get("pageSize") or 50)
        start = int(query.get("pageToken") or 0)
        with self.lock:
            found = [
                self._public(c)
                for n, c in sorted(self.certificates.items())
                if n.startswith(parent + "/") and match(c)
            ]
        page = found[start : start + size]
        out: dict[str, Any] = {"certificates": page}
        if start + size < len(found):
            out["nextPageToken"] = str(start + size)
        return out

    def _self_managed(self, sm: dict[str, Any]) -> dict[str, Any]:
        cert_pem, key_pem = sm.get("pemCertificate", ""), sm.get("pemPrivateKey", "")
        try:
            certs = x509.load_pem_x509_certificates(cert_pem.encode())
            key = serialization.load_pem_private_key(key_pem.encode(), password=None)
        except ValueError:
            raise ApiError(400, "selfManaged: malformed PEM certificate or private key") from None
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(*spki) != certs[0].public_key().public_bytes(*spki):
            raise ApiError(400, "selfManaged: the private key does not match the certificate")
        try:
            sans = certs[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = sans.get_values_for_type(x509.DNSName)
        except x509.ExtensionNotFound:
            names = []
        expire = certs[0].not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
        return {
            "pemCertificate": cert_pem,
            "_key_pem": key_pem,
            "sanDnsnames": list(names),
            "expireTime": expire,
        }

    def _public(self, cert: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in cert.items() if not k.startswith("_")}
        out["selfManaged"] = {}  # the service never returns the key
        return out

    def _operation(self, target: str, verb: str, response: dict[str, Any]) -> dict[str, Any]:
        parent = "/".join(target.split("/")[:4])
        name = f"{parent}/operations/operation-{uuid.uuid4().hex[:12]}"
        op = {
            "name": name,
            "done": True,
            "response": response,
            "metadata": {
                "@type": TYPE_METADATA,
                "createTime": _now(),
                "endTime": _now(),
                "target": target,
                "verb": verb,
                "apiVersion": "v1",
            },
        }
        self.operations[name] = op
        if self.operation_polls > 0:
            self._pending[name] = self.operation_polls
            return {k: v for k, v in op.items() if k != "response"} | {"done": False}
        return op


class _Handler(BaseHTTPRequestHandler):
    api: FakeCertificateManager
    protocol_version = "HTTP/1.1"
    timeout = 5

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        api = self.api
        with api.lock:
            api.requests.append((method, url.path))
        if (
            api.required_token is not None
            and self.headers.get("Authorization") != f"Bearer {api.required_token}"
        ):
            return self._reply(401, _err(401, "Request had invalid authentication credentials."))
        fault = api.take_fault()
        if fault is not None:
            return self._reply(fault, _err(fault, "injected fault"))
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        try:
            body = json.loads(raw) if raw else {}
            self._reply(200, api.handle(method, url.path, query, body))
        except ApiError as exc:
            self._reply(exc.status, _err(exc.status, exc.message))
        except (json.JSONDecodeError, ValueError):
            self._reply(400, _err(400, "malformed request"))

    def _reply(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_DELETE(self) -> None:
        self._serve("DELETE")


def _err(status: int, message: str) -> dict[str, Any]:
    return {"error": {"code": status, "message": message, "status": _STATUS.get(status, "UNKNOWN")}}
