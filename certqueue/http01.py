"""The HTTP-01 responder: serves ``/.well-known/acme-challenge/<token>`` from the database.

Any number of replicas can run (behind port 80 or the fleet's load balancer): tokens written by any
acme worker are visible to all of them, because the database is the only place they live. Answers
only well-formed tokens that exist and have not expired; everything else is 404.

SIGTERM and SIGINT stop it at once (:func:`serve_until_stopped`): as PID 1 in a container a process
without a handler ignores SIGTERM, and every ``docker stop`` would wait for the kill.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType

from sqlalchemy import select

from certqueue.db import session_scope
from certqueue.models import Http01Token, utcnow

log = logging.getLogger("certqueue.http01")

PREFIX = "/.well-known/acme-challenge/"
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{16,256}")  # fullmatch: "$" would accept a trailing newline


def lookup(token: str) -> str | None:
    if not TOKEN_RE.fullmatch(token):
        return None
    with session_scope(write=False) as s:
        row = s.execute(
            select(Http01Token.key_authorization, Http01Token.expires_at).where(Http01Token.token == token)
        ).first()
    if row is None or row.expires_at <= utcnow():
        return None
    return str(row.key_authorization)


#: pauses between lookups of one request when the database fails (a connection limit reached, a
#: failover): a failed answer costs the whole order, and the CA waits seconds for one
LOOKUP_RETRY_PAUSES = (0.1, 0.4, 1.0)


def _lookup_retrying(token: str) -> str | None:
    for pause in LOOKUP_RETRY_PAUSES:
        try:
            return lookup(token)
        except Exception as exc:  # noqa: BLE001  (the last attempt's error is raised below)
            log.warning("token lookup failed (%s); again in %.1fs", type(exc).__name__, pause)
            time.sleep(pause)
    return lookup(token)


class _Handler(BaseHTTPRequestHandler):
    server_version = "certqueue-http01"
    sys_version = ""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._send(200, b"ok\n")
            return
        if not path.startswith(PREFIX):
            self._send(404, b"not found\n")
            return
        try:
            body = _lookup_retrying(path[len(PREFIX) :])
        except Exception:
            log.exception("token lookup failed")
            self._send(503, b"unavailable\n")
            return
        if body is None:
            self._send(404, b"not found\n")
            return
        self._send(200, body.encode())

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/octet-stream" if code == 200 else "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), fmt % args)


class Http01Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256


def serve(host: str, port: int) -> Http01Server:
    return Http01Server((host, port), _Handler)


def start_in_thread(host: str, port: int) -> tuple[Http01Server, threading.Thread]:
    srv = serve(host, port)
    t = threading.Thread(target=srv.serve_forever, name="http01", daemon=True)
    t.start()
    return srv, t


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (main thread only). Install it before binding the port, so
    a signal sent as soon as the port answers is never missed."""
    stop = threading.Event()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        log.info("http01: %s, stopping", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    return stop


def serve_until_stopped(srv: Http01Server, stop: threading.Event) -> None:
    """Serve in a thread until ``stop`` is set (:func:`stop_on_signals`), then close."""
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2}, name="http01")
    thread.start()
    try:
        # short waits: the kernel may deliver SIGTERM to a serving thread, and Python runs the
        # handler only when the main thread wakes up
        while not stop.wait(0.2):
            if not thread.is_alive():
                break
    finally:
        srv.shutdown()
        thread.join(timeout=5)
        srv.server_close()
