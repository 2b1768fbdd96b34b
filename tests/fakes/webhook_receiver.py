"""A webhook receiver for the events-out tests: it checks every signature itself (HMAC-SHA256 over
``id.timestamp.body``, computed here, not with certqueue.webhooks) and keeps what it was sent.

Modes (``mode``): ``accept`` answers 204; ``lose_first_ack`` processes an event the first time it
sees its id, then answers 500 as if its answer were lost, so certqueue must send it again (the
receiver drops the copy by id and answers 204); ``refuse`` answers 401 to everything. ``stop()`` and
``start()`` again on the same port stand for a receiver that is down for a while.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Receipt:
    msg_id: str
    body: dict[str, Any]
    raw: bytes
    signature_ok: bool
    at: float


@dataclass
class WebhookReceiver:
    port: int
    key: bytes
    mode: str = "accept"
    receipts: list[Receipt] = field(default_factory=list)
    #: id -> the body as first processed (each event processed exactly once)
    processed: dict[str, dict[str, Any]] = field(default_factory=dict)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/certqueue"

    def _check(self, headers: Any, raw: bytes) -> bool:
        msg_id, ts, sigs = (
            headers.get("webhook-id"),
            headers.get("webhook-timestamp"),
            headers.get("webhook-signature"),
        )
        if not (msg_id and ts and sigs) or abs(time.time() - int(ts)) > 300:
            return False
        mac = hmac.new(self.key, f"{msg_id}.{ts}.".encode() + raw, hashlib.sha256).digest()
        want = "v1," + base64.b64encode(mac).decode()
        return any(hmac.compare_digest(want, s) for s in sigs.split())

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                ok = receiver._check(self.headers, raw)
                msg_id = self.headers.get("webhook-id", "")
                with receiver._lock:
                    receiver.receipts.append(Receipt(msg_id, json.loads(raw), raw, ok, time.time()))
                    if receiver.mode == "refuse" or not ok:
                        status = 401
                    elif msg_id in receiver.processed:
                        status = 204  # a copy: dropped by its idempotency key
                    else:
                        receiver.processed[msg_id] = json.loads(raw)
                        status = 500 if receiver.mode == "lose_first_ack" else 204
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
