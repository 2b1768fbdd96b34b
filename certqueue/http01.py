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

import asyncio
import datetime as dt
import email.utils
import functools
import logging
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import Protocol

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
    hit = _live_entry(token)
    if hit is None:
        with _reader().connect() as conn:
            row = conn.execute(_LOOKUP, {"token": token}).first()
        if row is None:
            _found.pop(token, None)
            return None
        hit = _remember(token, str(row.key_authorization), row.expires_at)
    return _served(hit)


def _live_entry(token: str) -> tuple[str, dt.datetime, float] | None:
    """The cache's entry for ``token`` while its seconds last (its row may have expired)."""
    hit = _found.get(token)
    return hit if hit is not None and hit[2] > time.monotonic() else None


def _served(entry: tuple[str, dt.datetime, float]) -> str | None:
    """The entry's key authorization, unless its row has expired."""
    return entry[0] if entry[1] > utcnow() else None


def _reader() -> Engine:
    """The read engine; on PostgreSQL in autocommit, so a lookup is one round trip (no BEGIN and
    ROLLBACK around its SELECT)."""
    engine = get_engine(write=False)
    if engine.dialect.name == "postgresql":
        return engine.execution_options(isolation_level="AUTOCOMMIT")
    return engine


def _remember(token: str, key_authorization: str, expires_at: dt.datetime) -> tuple[str, dt.datetime, float]:
    now = time.monotonic()
    with _found_lock:
        if len(_found) >= FOUND_MAX:
            for old in [t for t, (_, _, until) in _found.items() if until <= now]:
                del _found[old]
            if len(_found) >= FOUND_MAX:
                _found.clear()
        entry = _found[token] = (key_authorization, expires_at, now + FOUND_TTL_SECONDS)
    return entry


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


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    501: "Not Implemented",
    503: "Service Unavailable",
}


class Http01Server:
    """The responder's HTTP/1.0 server: an asyncio server in the thread that runs
    :meth:`serve_forever`, with the part of ``socketserver``'s interface its callers use
    (``server_address``, ``socket``, ``serve_forever``, ``shutdown``, ``server_close``).

    One event loop instead of ``http.server``'s thread per request (measured: about 180 us of CPU
    per answer from the cache instead of 430): a token in the cache is answered in the loop, a
    lookup of the database runs on a small pool of threads (``LOOKUP_THREADS``), so a slow database
    never holds up the other requests; requests for one token while its lookup is in flight wait for
    that lookup (a CA's perspectives ask at the same moment). Only GET and HEAD are served; each
    answer closes its connection, as the CA's validation expects."""

    request_queue_size = 256
    #: a client that has not sent its whole request head by then is disconnected unanswered
    REQUEST_TIMEOUT_SECONDS = 10.0
    #: a longer request head (request line and headers) is disconnected unanswered
    MAX_REQUEST_HEAD = 16384
    #: lookups at once: within the process's pool of ``database.pool_size`` connections (5)
    LOOKUP_THREADS = 4

    def __init__(self, server_address: tuple[str, int]) -> None:
        host, port = server_address
        # SO_REUSEADDR (on POSIX): a restarted responder binds at once, as the old one did
        self.socket = socket.create_server((host, port), backlog=self.request_queue_size)
        self.server_address = self.socket.getsockname()[:2]
        self._lookups = ThreadPoolExecutor(self.LOOKUP_THREADS, thread_name_prefix="http01-lookup")
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._shutdown_request = False
        self._done = threading.Event()
        self._done.set()
        #: token -> its lookup in flight (touched by the event loop's thread only)
        self._pending: dict[str, asyncio.Future[str | None]] = {}

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until :meth:`shutdown` (``poll_interval`` is socketserver's; a shutdown here is
        noticed at once)."""
        with self._lock:
            self._done.clear()
        try:
            asyncio.run(self._serve())
        finally:
            with self._lock:
                self._loop = self._stop = None
                self._shutdown_request = False
                self._done.set()

    async def _serve(self) -> None:
        stop = asyncio.Event()
        with self._lock:
            self._loop, self._stop = asyncio.get_running_loop(), stop
            if self._shutdown_request:
                stop.set()
        server = await asyncio.start_server(self._handle, sock=self.socket, limit=self.MAX_REQUEST_HEAD)
        async with server:
            await stop.wait()

    def shutdown(self) -> None:
        """Stop :meth:`serve_forever` and wait until it has returned."""
        with self._lock:
            self._shutdown_request = True
            loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)
        self._done.wait()

    def server_close(self) -> None:
        self.socket.close()
        self._lookups.shutdown(wait=False)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.REQUEST_TIMEOUT_SECONDS)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
                return  # gone, too slow or too long: nothing to answer
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                code, body = 400, b"bad request\n"
            elif parts[0] not in ("GET", "HEAD"):
                code, body = 501, b"not implemented\n"
            else:
                code, body = await self._answer(parts[1])
            ctype = "application/octet-stream" if code == 200 else "text/plain"
            writer.write(
                (
                    f"HTTP/1.0 {code} {_REASONS[code]}\r\nServer: certqueue-http01\r\n"
                    f"Date: {_http_date()}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                ).encode()
                + (b"" if parts[:1] == ["HEAD"] else body)
            )
            if log.isEnabledFor(logging.DEBUG):
                peer = writer.get_extra_info("peername")
                log.debug('%s "%s" %s %s', peer[0] if peer else "-", line, code, len(body))
            await writer.drain()
        except OSError:
            pass  # the client went away while we answered
        finally:
            writer.close()

    def _landed(self, token: str, _lookup: asyncio.Future[str | None]) -> None:
        self._pending.pop(token, None)

    async def _answer(self, target: str) -> tuple[int, bytes]:
        path = target.split("?", 1)[0]
        if path == "/health":
            return 200, b"ok\n"
        if not path.startswith(PREFIX):
            return 404, b"not found\n"
        token = path[len(PREFIX) :]
        body = _cached(token)
        if body is None and TOKEN_RE.fullmatch(token):
            # the CA's perspectives ask at the same moment: one lookup in flight per token, shared
            pending = self._pending.get(token)
            if pending is None:
                pending = asyncio.get_running_loop().run_in_executor(self._lookups, _lookup_retrying, token)
                self._pending[token] = pending
                pending.add_done_callback(functools.partial(self._landed, token))
            try:
                body = await asyncio.shield(pending)  # one waiter gone does not cancel the others'
            except Exception:
                log.exception("token lookup failed")
                return 503, b"unavailable\n"
        if body is None:
            return 404, b"not found\n"
        return 200, body.encode()


def _cached(token: str) -> str | None:
    """The key authorization of a token found within the last seconds and not expired, if any."""
    hit = _live_entry(token)
    return _served(hit) if hit is not None else None


_date: tuple[int, str] = (0, "")


def _http_date() -> str:
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, email.utils.formatdate(now, usegmt=True))
    return _date[1]


def serve(host: str, port: int) -> Http01Server:
    return Http01Server((host, port))


def start_in_thread(host: str, port: int) -> tuple[Http01Server, threading.Thread]:
    srv = serve(host, port)
    t = threading.Thread(target=srv.serve_forever, name="http01", daemon=True)
    t.start()
    return srv, t


class Serving(Protocol):
    """A server :func:`serve_until_stopped` runs: this one, or a ``socketserver`` one (TLS-ALPN-01)."""

    def serve_forever(self, poll_interval: float = 0.5) -> None: ...

    def shutdown(self) -> None: ...

    def server_close(self) -> None: ...


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


def serve_until_stopped(srv: Serving, stop: threading.Event) -> None:
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
