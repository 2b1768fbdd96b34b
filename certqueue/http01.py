"""The HTTP-01 responder: serves ``/.well-known/acme-challenge/<token>`` from the database.

Any number of replicas can run (behind port 80 or the fleet's load balancer): tokens written by any
acme worker are visible to all of them, because the database is the only place they live. Answers
only well-formed tokens that exist and have not expired; everything else is 404.

A CA asks for one token several times within a second (Pebble and Let's Encrypt validate from
several perspectives: three requests per challenge): a token found is kept in a small per-process
cache for :data:`FOUND_TTL_SECONDS` (never past its row's expiry), so those requests cost one
database round trip, a plain Core statement on a pooled connection. A key authorization is public
(it is what the responder serves to anyone who asks), so answering it a few seconds after its row
was deleted discloses nothing; a token not found is never cached, so a token written a moment ago
is served at once.

SIGTERM and SIGINT stop it at once (:func:`serve_until_stopped`): as PID 1 in a container a process
without a handler ignores SIGTERM, and every ``docker stop`` would wait for the kill.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import signal
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType

from sqlalchemy import Engine, bindparam, select

from certqueue.db import get_engine
from certqueue.models import Http01Token, utcnow

log = logging.getLogger("certqueue.http01")

PREFIX = "/.well-known/acme-challenge/"
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{16,256}")  # fullmatch: "$" would accept a trailing newline


#: how long a token found stays answered from this process's memory (its row's expiry still counts)
FOUND_TTL_SECONDS = 5.0
#: at most this many tokens in the cache; past it, the ones whose time is up are dropped, then all
FOUND_MAX = 4096

_LOOKUP = select(Http01Token.key_authorization, Http01Token.expires_at).where(
    Http01Token.token == bindparam("token")
)
#: token -> (key authorization, the row's expiry, monotonic time the entry ends)
_found: dict[str, tuple[str, dt.datetime, float]] = {}
_found_lock = threading.Lock()


def lookup(token: str) -> str | None:
    if not TOKEN_RE.fullmatch(token):
        return None
    hit = _found.get(token)
    if hit is not None and hit[2] > time.monotonic():
        key_authorization, expires_at, _ = hit
    else:
        with _reader().connect() as conn:
            row = conn.execute(_LOOKUP, {"token": token}).first()
        if row is None:
            _found.pop(token, None)
            return None
        key_authorization, expires_at = str(row.key_authorization), row.expires_at
        _remember(token, key_authorization, expires_at)
    if expires_at <= utcnow():
        return None
    return key_authorization


def _reader() -> Engine:
    """The read engine; on PostgreSQL in autocommit, so a lookup is one round trip (no BEGIN and
    ROLLBACK around its SELECT)."""
    engine = get_engine(write=False)
    if engine.dialect.name == "postgresql":
        return engine.execution_options(isolation_level="AUTOCOMMIT")
    return engine


def _remember(token: str, key_authorization: str, expires_at: dt.datetime) -> None:
    now = time.monotonic()
    with _found_lock:
        if len(_found) >= FOUND_MAX:
            for old in [t for t, (_, _, until) in _found.items() if until <= now]:
                del _found[old]
            if len(_found) >= FOUND_MAX:
                _found.clear()
        _found[token] = (key_authorization, expires_at, now + FOUND_TTL_SECONDS)


def forget_found() -> None:
    """Empty the cache of tokens found (tests, and a responder whose database was replaced)."""
    with _found_lock:
        _found.clear()


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
    #: the answer's status line, headers and body buffered and sent in one write when the request
    #: ends (the default, unbuffered, costs a send per part)
    wbufsize = 8192

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
        if log.isEnabledFor(logging.DEBUG):
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


def serve_until_stopped(srv: socketserver.BaseServer, stop: threading.Event) -> None:
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
