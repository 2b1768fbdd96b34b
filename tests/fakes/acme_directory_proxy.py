"""An HTTPS ACME directory in front of Pebble that adds RFC 9773 renewal information and profiles.

Pebble 2.4 has no ``renewalInfo`` and no ``meta.profiles``. This fake serves, at ``/dir``, Pebble's own
directory plus ``renewalInfo: https://127.0.0.1:<port>/renewal-info`` (unless ``renewal_info=False``)
and, if given, ``meta.profiles``. Every other directory URL still points at Pebble, so a client talks
to Pebble directly for everything but the directory and renewal information.

``GET /renewal-info/<cert-id>`` answers, with ``Retry-After: <retry_after>``:

* the window set for that id (:meth:`set_window`, :meth:`mark_incident` for a window in the past,
  as a CA answers for a revoked certificate or after an incident);
* else, when ``pebble_management_url`` is given, Pebble's own view of the certificate, looked up by
  the serial inside the id: unknown serial -> 404; revoked -> a window in the past; valid -> the
  window Let's Encrypt would suggest (around two thirds of the lifetime, two days wide);
* else 404.

``forward=True`` puts the proxy in front of Pebble for every ACME request too: the directory then
names the proxy's own URLs (Pebble builds them from the Host header, which the proxy passes on), each
request is relayed to Pebble unchanged, and the payload of every signed POST is kept in
:attr:`payloads` (path, payload JSON), so a test can see exactly what a client sent (``replaces``,
``profile``). Relaying preserves the signature: the JWS ``url`` names the proxy, and so does the Host
Pebble checks it against.

:attr:`already_replaced` (forward mode): certificate ids the proxy says already have a replacement.
A newOrder naming one of them in ``replaces`` is answered ``409 alreadyReplaced`` (RFC 9773 section
5, as Boulder answers) with a fresh nonce from Pebble; Pebble never sees that request.

Because a client verifies TLS with one bundle, :attr:`combined_ca_bundle` holds Pebble's CA and the
proxy's CA together.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from devstack.tls import make_server_tls
from tests.fakes import FakeServer, Request, Response

RENEWAL_INFO_PATH = "/renewal-info"
_UPSTREAM_TIMEOUT = 10.0
#: response headers relayed from Pebble in forward mode
_RELAYED = ("Replay-Nonce", "Location", "Link", "Retry-After", "Content-Type", "Cache-Control")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def serial_of_cert_id(cert_id: str) -> int:
    """The certificate serial inside an RFC 9773 id (``<aki>.<serial>``, both base64url)."""
    return int.from_bytes(_b64decode(cert_id.split(".", 1)[1]), "big")


class AcmeDirectoryProxy(FakeServer):
    def __init__(
        self,
        upstream_directory_url: str,
        upstream_ca_bundle: str | Path,
        workdir: Path,
        *,
        renewal_info: bool = True,
        profiles: dict[str, str] | None = None,
        forward: bool = False,
        pebble_management_url: str | None = None,
        retry_after: int | None = 21600,
    ) -> None:
        tls = make_server_tls(workdir / "ari-proxy-tls", label="certqueue ari proxy")
        super().__init__(tls_cert=tls.cert, tls_key=tls.key)
        self.upstream_directory_url = upstream_directory_url
        self.upstream_ca_bundle = str(upstream_ca_bundle)
        self.renewal_info = renewal_info
        self.profiles = dict(profiles) if profiles else None
        self.forward = forward
        self.pebble_management_url = pebble_management_url
        self.retry_after = retry_after
        self.windows: dict[str, tuple[dt.datetime, dt.datetime, str | None]] = {}
        self.payloads: list[tuple[str, Any]] = []
        self.already_replaced: set[str] = set()
        self.combined_ca_bundle = workdir / "ari-proxy-combined-ca.pem"
        self.combined_ca_bundle.write_bytes(
            Path(self.upstream_ca_bundle).read_bytes() + tls.ca_cert.read_bytes()
        )
        up = urlsplit(upstream_directory_url)
        self._upstream_base = f"{up.scheme}://{up.netloc}"
        self._upstream = requests.Session()

    # -- what tests use ------------------------------------------------------------------------------

    @property
    def directory_url(self) -> str:
        return f"{self.url}/dir"

    def set_window(
        self, cert_id: str, start: dt.datetime, end: dt.datetime, explanation_url: str | None = None
    ) -> None:
        with self._lock:
            self.windows[cert_id] = (start, end, explanation_url)

    def mark_incident(self, cert_id: str, now: dt.datetime | None = None) -> None:
        """A window already over: the CA wants this certificate replaced now."""
        now = now or dt.datetime.now(dt.UTC)
        self.set_window(
            cert_id, now - dt.timedelta(days=2), now - dt.timedelta(days=1), "https://ca.test/incident/1"
        )

    def new_order_payloads(self) -> list[dict[str, Any]]:
        """Payloads of the newOrder requests seen in forward mode, oldest first."""
        with self._lock:
            return [p for path, p in self.payloads if path.endswith("/order-plz") and isinstance(p, dict)]

    def start(self) -> AcmeDirectoryProxy:
        super().start()
        # ACME clients fetch nonces with HEAD, which the shared handler does not route; HEAD answers
        # are bodiless, and Pebble's newNonce HEAD has no body to relay, so GET's handling serves it
        assert self._httpd is not None
        handler = self._httpd.RequestHandlerClass
        handler.do_HEAD = handler.do_GET  # type: ignore[attr-defined]
        return self

    def stop(self) -> None:
        super().stop()
        self._upstream.close()

    # -- serving -------------------------------------------------------------------------------------

    def handle(self, req: Request) -> Response:
        if req.method == "GET" and req.path == "/dir":
            return self._directory()
        if req.method == "GET" and req.path.startswith(RENEWAL_INFO_PATH + "/"):
            return self._renewal_info(req.path[len(RENEWAL_INFO_PATH) + 1 :])
        if self.forward:
            return self._relay(req)
        return Response(404, {"type": "urn:ietf:params:acme:error:malformed", "detail": "not here"})

    def _host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _directory(self) -> Response:
        headers = {"Host": self._host()} if self.forward else {}
        upstream = self._upstream.get(
            self.upstream_directory_url,
            verify=self.upstream_ca_bundle,
            timeout=_UPSTREAM_TIMEOUT,
            headers=headers,
        )
        upstream.raise_for_status()
        directory: dict[str, Any] = upstream.json()
        if self.renewal_info:
            directory["renewalInfo"] = f"{self.url}{RENEWAL_INFO_PATH}"
        if self.profiles is not None:
            directory.setdefault("meta", {})["profiles"] = dict(self.profiles)
        return Response(200, directory)

    def _renewal_info(self, cert_id: str) -> Response:
        window = self.windows.get(cert_id) or self._window_from_pebble(cert_id)
        if window is None:
            return Response(
                404, {"type": "urn:ietf:params:acme:error:malformed", "detail": "no such certificate"}
            )
        start, end, explanation = window
        body: dict[str, Any] = {
            "suggestedWindow": {
                "start": start.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "end": end.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        }
        if explanation:
            body["explanationURL"] = explanation
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
        return Response(200, body, headers)

    def _window_from_pebble(self, cert_id: str) -> tuple[dt.datetime, dt.datetime, str | None] | None:
        if not self.pebble_management_url:
            return None
        try:
            serial = serial_of_cert_id(cert_id)
        except (ValueError, IndexError):
            return None
        resp = self._upstream.get(
            f"{self.pebble_management_url}/cert-status-by-serial/{serial:x}",
            verify=self.upstream_ca_bundle,
            timeout=_UPSTREAM_TIMEOUT,
        )
        if resp.status_code != 200:
            return None
        status = resp.json()
        now = dt.datetime.now(dt.UTC)
        if str(status.get("Status", "")).lower() == "revoked":
            return now - dt.timedelta(days=2), now - dt.timedelta(days=1), "https://ca.test/revoked"
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(str(status["Certificate"]).encode())
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        lifetime = end - start
        middle = start + lifetime * 2 / 3
        return middle - dt.timedelta(days=1), middle + dt.timedelta(days=1), None

    def _relay(self, req: Request) -> Response:
        if req.method == "POST" and req.body:
            payload = self._payload(req.body)
            self.payloads.append((req.path, payload))
            if (
                req.path.endswith("/order-plz")
                and isinstance(payload, dict)
                and payload.get("replaces") in self.already_replaced
            ):
                return self._already_replaced(str(payload["replaces"]))
        query = "&".join(f"{k}={v}" for k, v in req.query.items())
        url = f"{self._upstream_base}{req.path}" + (f"?{query}" if query else "")
        headers = {"Host": self._host()}
        if "content-type" in req.headers:
            headers["Content-Type"] = req.headers["content-type"]
        upstream = self._upstream.request(
            req.method,
            url,
            data=req.body or None,
            headers=headers,
            verify=self.upstream_ca_bundle,
            timeout=_UPSTREAM_TIMEOUT,
            allow_redirects=False,
        )
        relayed = {h: upstream.headers[h] for h in _RELAYED if h in upstream.headers}
        return Response(upstream.status_code, upstream.content, relayed)

    def _already_replaced(self, cert_id: str) -> Response:
        nonce = self._upstream.head(
            f"{self._upstream_base}/nonce-plz",
            headers={"Host": self._host()},
            verify=self.upstream_ca_bundle,
            timeout=_UPSTREAM_TIMEOUT,
        ).headers.get("Replay-Nonce", "")
        problem = {
            "type": "urn:ietf:params:acme:error:alreadyReplaced",
            "detail": f"cannot indicate an order replaces certificate {cert_id}, which already has a "
            "replacement order",
            "status": 409,
        }
        body = json.dumps(problem).encode()  # bytes: the problem+json type is ours, not the default
        return Response(409, body, {"Replay-Nonce": nonce, "Content-Type": "application/problem+json"})

    @staticmethod
    def _payload(body: bytes) -> Any:
        """The decoded payload of a flattened JWS; "" for a POST-as-GET; None if unreadable."""
        try:
            jws = json.loads(body)
            raw = _b64decode(jws["payload"])
            return json.loads(raw) if raw else ""
        except (ValueError, KeyError, TypeError):
            return None
