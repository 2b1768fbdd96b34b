"""Pytest fixtures for the deployment targets (a plugin: ``-p tests.conftest_targets``).

Servers, one per session, reset before each test: moto (ACM) behind :class:`FaultProxy`, the fake
Key Vault (HTTPS) and the fake Certificate Manager. Test certificates come from a throwaway root and
intermediate made here with cryptography (``issue_bundle``). ``target_harness`` is parametrized over
every target and gives the contract suite one shape to drive them all.

How each server stands for the cloud:
* ACM: moto does the work; the proxy counts requests and injects what moto cannot: 5xx, throttling
  (``ThrottlingException``), and a rejected signature (``UnrecognizedClientException``, what AWS
  answers for unknown keys).
* Key Vault: the fake checks a bearer token; tests authenticate with ``StaticTokenCredential``.
* Certificate Manager: the fake checks a bearer token; tests use google.oauth2 ``Credentials`` with a
  static token.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from pydantic import SecretStr

from certqueue.targets.base import Bundle, Target, leaf_fingerprint
from devstack.moto import MotoServer
from devstack.ports import free_port
from tests.fakes.azure_keyvault_api import FakeKeyVault, StaticTokenCredential
from tests.fakes.gcp_certmanager_api import FakeCertificateManager

TARGET_NAMES = ("local", "aws_acm", "azure_keyvault", "gcp_certmanager")
GCP_TOKEN = "fake-gcp-token"


# -- certificates --------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@dataclass
class TestCA:
    """A root and an intermediate; leaves are signed by the intermediate."""

    root_key: Any
    root: x509.Certificate
    key: Any
    cert: x509.Certificate

    @classmethod
    def make(cls) -> TestCA:
        now = dt.datetime.now(dt.UTC)
        root_key = ec.generate_private_key(ec.SECP256R1())
        root = (
            x509.CertificateBuilder()
            .subject_name(_name("certqueue test root"))
            .issuer_name(_name("certqueue test root"))
            .public_key(root_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .sign(root_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        inter = (
            x509.CertificateBuilder()
            .subject_name(_name("certqueue test intermediate"))
            .issuer_name(root.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=29))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(root_key, hashes.SHA256())
        )
        return cls(root_key, root, key, inter)

    def issue(
        self,
        certificate_id: str,
        domains: tuple[str, ...],
        *,
        rsa_key: bool = False,
        key_of: Bundle | None = None,
    ) -> Bundle:
        """A leaf for ``domains``; ``key_of`` puts another bundle's key in (a mismatched pair)."""
        key: Any = (
            rsa.generate_private_key(65537, 2048) if rsa_key else ec.generate_private_key(ec.SECP256R1())
        )
        now = dt.datetime.now(dt.UTC)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(_name(domains[0]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=20))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in domains]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        key_pem = (
            key_of.key_pem
            if key_of is not None
            else key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ).decode()
        )
        return Bundle(
            certificate_id=certificate_id,
            cert_pem=_pem(leaf),
            chain_pem=_pem(self.cert),
            key_pem=key_pem,
            domains=domains,
        )


@pytest.fixture(scope="session")
def test_ca() -> TestCA:
    return TestCA.make()


@pytest.fixture
def issue_bundle(test_ca: TestCA) -> Callable[..., Bundle]:
    """``issue_bundle(certificate_id="cert_abc123", domains=("www.example.test",), key_of=None)``."""

    def issue(
        certificate_id: str = "cert_abc123",
        domains: tuple[str, ...] = ("www.example.test", "example.test"),
        **kw: Any,
    ) -> Bundle:
        return test_ca.issue(certificate_id, domains, **kw)

    return issue


# -- a fault-injecting proxy in front of moto ----------------------------------------------------


@dataclass
class FaultProxy:
    """Forwards HTTP to ``upstream``; counts requests; can answer instead of forwarding."""

    upstream: str
    requests: int = 0
    faults: list[tuple[int, int, dict[str, Any]]] = field(default_factory=list)  # (remaining, status, body)
    reject_signature: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None
    url: str = ""

    def start(self) -> FaultProxy:
        proxy = self
        up = urlsplit(self.upstream)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 5

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                answer = proxy._intercept()
                if answer is not None:
                    status, payload = answer
                    return self._send(
                        status, json.dumps(payload).encode(), {"Content-Type": "application/x-amz-json-1.1"}
                    )
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=10)
                try:
                    headers = {
                        k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")
                    }
                    conn.request("POST", self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    hdrs = {
                        k: v
                        for k, v in resp.getheaders()
                        if k.lower()
                        not in ("content-length", "connection", "transfer-encoding", "server", "date")
                    }
                    self._send(resp.status, data, hdrs)
                finally:
                    conn.close()

            def _send(self, status: int, data: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True).start()
        return self

    def _intercept(self) -> tuple[int, dict[str, Any]] | None:
        with self.lock:
            self.requests += 1
            if self.reject_signature:
                return 400, {
                    "__type": "UnrecognizedClientException",
                    "message": "The security token included in the request is invalid.",
                }
            while self.faults and self.faults[0][0] <= 0:
                self.faults.pop(0)
            if self.faults:
                remaining, status, payload = self.faults[0]
                self.faults[0] = (remaining - 1, status, payload)
                return status, payload
        return None

    def fail_next(self, n: int, status: int = 503) -> None:
        payload = (
            {"__type": "ThrottlingException", "message": "Rate exceeded"}
            if status == 429
            else {"__type": "ServiceUnavailableException", "message": "injected fault"}
        )
        with self.lock:
            # ACM answers throttling with 400 and the ThrottlingException type
            self.faults.append((n, 400 if status == 429 else status, payload))

    def reset(self) -> None:
        with self.lock:
            self.requests = 0
            self.faults.clear()
            self.reject_signature = False

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


# -- servers -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    server = MotoServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def _acm_proxy(moto_server: MotoServer) -> Iterator[FaultProxy]:
    proxy = FaultProxy(moto_server.endpoint_url).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def acm_proxy(_acm_proxy: FaultProxy, moto_server: MotoServer) -> FaultProxy:
    moto_server.reset()
    _acm_proxy.reset()
    return _acm_proxy


@pytest.fixture(scope="session")
def _keyvault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeKeyVault]:
    vault = FakeKeyVault(tmp_path_factory.mktemp("fake-keyvault-tls")).start()
    yield vault
    vault.stop()


@pytest.fixture
def fake_keyvault(_keyvault: FakeKeyVault) -> FakeKeyVault:
    _keyvault.reset()
    return _keyvault


@pytest.fixture(scope="session")
def _certmanager() -> Iterator[FakeCertificateManager]:
    api = FakeCertificateManager().start()
    yield api
    api.stop()


@pytest.fixture
def fake_certmanager(_certmanager: FakeCertificateManager) -> FakeCertificateManager:
    _certmanager.reset()
    _certmanager.required_token = GCP_TOKEN
    return _certmanager


def gcp_credentials(token: str = GCP_TOKEN) -> Any:
    from google.oauth2.credentials import Credentials

    return Credentials(token=token)


# -- one shape for every target ------------------------------------------------------------------


@dataclass
class TargetHarness:
    """What the contract suite needs from each target's test setup."""

    name: str
    settings: dict[str, Any]
    #: fingerprint of the leaf the server holds for ``ref``, read from the server's own state
    live: Callable[[str], str | None]
    #: how many requests reached the server so far (None: the target sends no requests)
    sent: Callable[[], int]
    fail_next: Callable[[int, int], None] | None = None
    #: arranges for bad credentials; returns the settings overrides that carry them
    bad_credentials: Callable[[], dict[str, Any]] | None = None
    unreachable: dict[str, Any] | None = None

    def make(self, **overrides: Any) -> Target:
        from certqueue.targets.base import load_target

        return load_target(self.name, {**self.settings, **overrides})


def _closed_port() -> int:
    return free_port()  # nothing listens there once the probe socket is closed


@pytest.fixture
def local_harness(tmp_path: Path) -> TargetHarness:
    root = tmp_path / "certs"

    def live(ref: str) -> str | None:
        path = Path(ref) / "cert.pem"
        return leaf_fingerprint(path.read_bytes()) if path.exists() else None

    return TargetHarness(
        "local",
        {"name": "web1", "provider": "local", "path": str(root)},
        live=live,
        sent=lambda: sum(1 for _ in root.rglob("*")) if root.exists() else 0,
    )


@pytest.fixture
def aws_harness(acm_proxy: FaultProxy, moto_server: MotoServer) -> TargetHarness:
    import boto3

    direct = boto3.client(
        "acm",
        region_name="us-east-1",
        endpoint_url=moto_server.endpoint_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )

    def live(ref: str) -> str | None:
        try:
            return leaf_fingerprint(direct.get_certificate(CertificateArn=ref)["Certificate"])
        except direct.exceptions.ResourceNotFoundException:
            return None

    settings = {
        "name": "us-east-1",
        "provider": "aws_acm",
        "endpoint_url": acm_proxy.url,
        "access_key_id": "testing",
        "secret_access_key": SecretStr("testing"),
        "max_retries": 0,
        "timeout": 5,
        "acm_enabled": True,
    }

    def bad_credentials() -> dict[str, Any]:
        acm_proxy.reject_signature = True  # what AWS answers for an unknown access key
        return {"access_key_id": "AKIAWRONG", "secret_access_key": "wrong"}

    return TargetHarness(
        "aws_acm",
        settings,
        live=live,
        sent=lambda: acm_proxy.requests,
        fail_next=acm_proxy.fail_next,
        bad_credentials=bad_credentials,
        unreachable={"endpoint_url": f"http://127.0.0.1:{_closed_port()}"},
    )


@pytest.fixture
def azure_harness(fake_keyvault: FakeKeyVault) -> TargetHarness:
    import hashlib

    def live(ref: str) -> str | None:
        name = ref.rstrip("/").split("/")[4]
        versions = fake_keyvault.certificates.get(name)
        return hashlib.sha256(versions[-1].der).hexdigest() if versions else None

    settings = {
        "name": "westeurope",
        "provider": "azure_keyvault",
        "key_vault": fake_keyvault.url,
        "credential": StaticTokenCredential(fake_keyvault.token),
        "connection_verify": fake_keyvault.ca_file,
        "purge": True,
        "max_retries": 0,
        "timeout": 5,
    }
    return TargetHarness(
        "azure_keyvault",
        settings,
        live=live,
        sent=lambda: len(fake_keyvault.requests),
        fail_next=lambda n, status: fake_keyvault.fail_next(n, status),
        bad_credentials=lambda: {"credential": StaticTokenCredential("not-the-token")},
        unreachable={"key_vault": f"https://127.0.0.1:{_closed_port()}"},
    )


@pytest.fixture
def gcp_harness(fake_certmanager: FakeCertificateManager) -> TargetHarness:
    def live(ref: str) -> str | None:
        cert = fake_certmanager.certificates.get(ref)
        return leaf_fingerprint(cert["pemCertificate"]) if cert else None

    settings = {
        "name": "us-central1",
        "provider": "gcp_certmanager",
        "project_id": "example-project",
        "api_endpoint": fake_certmanager.endpoint,
        "credentials": gcp_credentials(),
        "max_retries": 0,
        "timeout": 5,
        "operation_timeout": 5,
    }
    return TargetHarness(
        "gcp_certmanager",
        settings,
        live=live,
        sent=lambda: len(fake_certmanager.requests),
        fail_next=lambda n, status: fake_certmanager.fail_next(n, status),
        bad_credentials=lambda: {"credentials": gcp_credentials("not-the-token")},
        unreachable={"api_endpoint": f"http://127.0.0.1:{_closed_port()}"},
    )


@pytest.fixture(params=TARGET_NAMES)
def target_harness(request: pytest.FixtureRequest) -> TargetHarness:
    fixture = {
        "local": "local_harness",
        "aws_acm": "aws_harness",
        "azure_keyvault": "azure_harness",
        "gcp_certmanager": "gcp_harness",
    }[request.param]
    harness: TargetHarness = request.getfixturevalue(fixture)
    return harness
