"""Small fake HTTP(S) servers for the APIs we cannot run here (Cloudflare, Azure DNS, ...).

Each fake is a stdlib ``ThreadingHTTPServer`` on 127.0.0.1 with in-memory state that tests inspect
directly. ``FakeServer`` gives them start/stop, optional TLS, a request log and fault injection
(``fail_next(n, status)``: the next ``n`` requests get ``status`` before any other handling).
"""

from __future__ import annotations

import json
import ssl
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body or b"null")


@dataclass
class Response:
    status: int
    body: Any = None  # JSON-serialisable, or bytes
    headers: dict[str, str] | None = None


class FakeServer:
    """Base class: subclasses implement ``handle(request) -> Response`` and ``fault(status)``."""

    def __init__(self, *, tls_cert: Path | None = None, tls_key: Path | None = None) -> None:
        self._tls = (tls_cert, tls_key) if tls_cert and tls_key else None
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._faults: list[int] = []
        self._fault_headers: dict[str, str] = {}
        self.requests: list[Request] = []
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> FakeServer:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go in two writes: no 40 ms stalls

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                req = Request(
                    self.command,
                    parts.path,
                    dict(parse_qsl(parts.query, keep_blank_values=True)),
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                )
                resp = fake._dispatch(req)
                payload = (
                    resp.body
                    if isinstance(resp.body, bytes)
                    else (b"" if resp.body is None else json.dumps(resp.body).encode())
                )
                self.send_response(resp.status)
                for k, v in (resp.headers or {}).items():
                    self.send_header(k, v)
                if resp.body is not None and not isinstance(resp.body, bytes):
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: requests carry bearer tokens

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        if self._tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(self._tls[0]), str(self._tls[1]))
            self._httpd.socket = ctx.wrap_socket(self._httpd.socket, server_side=True)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- fault injection ---------------------------------------------------------------------

    def fail_next(self, count: int, status: int = 503, headers: dict[str, str] | None = None) -> None:
        """The next ``count`` requests are answered with ``status`` (429, 500, 503...)."""
        with self._lock:
            self._faults = [status] * count
            self._fault_headers = dict(headers or {})

    def _dispatch(self, req: Request) -> Response:
        with self._lock:
            self.requests.append(req)
            if self._faults and self.faultable(req):
                status = self._faults.pop(0)
                return Response(status, self.fault(status), dict(self._fault_headers))
            return self.handle(req)

    # -- subclass hooks ----------------------------------------------------------------------

    def handle(self, req: Request) -> Response:
        raise NotImplementedError

    def fault(self, status: int) -> Any:
        return {"error": f"injected {status}"}

    def faultable(self, req: Request) -> bool:
        """Whether injected faults apply to ``req`` (a fake may keep e.g. its token endpoint healthy)."""
        return True

    def reset(self) -> None:
        with self._lock:
            self._faults = []
            self.requests.clear()
