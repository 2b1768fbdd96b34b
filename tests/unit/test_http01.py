"""The HTTP-01 responder (certqueue.http01) against a real database (SQLite and PostgreSQL) and its
real HTTP server on a free loopback port: only well-formed, stored, unexpired tokens are answered."""

from __future__ import annotations

import datetime as dt
import http.client
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import event
from sqlalchemy.exc import OperationalError

from certqueue import http01
from certqueue.config import Settings
from certqueue.db import get_engine, session_scope
from certqueue.models import Http01Token, utcnow

GOOD = "tok_" + "A" * 12 + "-_z9"  # 20 characters of the base64url alphabet
KEY_AUTH = GOOD + ".thumbprint-of-the-account-key"

Store = Callable[..., None]
Get = Callable[[str], tuple[int, str, bytes]]


@pytest.fixture(autouse=True)
def _no_found_tokens() -> Iterator[None]:
    """Each test starts with the responder's cache of found tokens empty (GOOD is in many)."""
    http01.forget_found()
    yield
    http01.forget_found()


@pytest.fixture
def store(db_settings: Settings) -> Store:
    def put(token: str, key_authorization: str = KEY_AUTH, *, expires_at: dt.datetime | None = None) -> None:
        with session_scope() as s:
            s.add(
                Http01Token(
                    token=token,
                    key_authorization=key_authorization,
                    certificate_id="cert_http01test",
                    challenge_id=None,
                    expires_at=expires_at or utcnow() + dt.timedelta(hours=1),
                )
            )

    return put


@pytest.fixture
def served(db_settings: Settings) -> Iterator[http01.Http01Server]:
    """A real responder on a free port, serving in its thread until the test ends."""
    srv, thread = http01.start_in_thread("127.0.0.1", 0)
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)
    assert not thread.is_alive()
    # checked after the shutdown (a failing check must not leave it running): a named daemon
    # thread, so the responder never keeps a stopping process alive
    assert thread.daemon and thread.name == "http01"


@pytest.fixture
def get(served: http01.Http01Server) -> Get:
    """GET a path from the real responder: (status, content type, body)."""
    port = served.server_address[1]

    def fetch(path: str) -> tuple[int, str, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            assert resp.getheader("Content-Length") == str(len(body))
            return resp.status, str(resp.getheader("Content-Type")), body
        finally:
            conn.close()

    # serving before the test starts (a thread that does not serve would hang the shutdown)
    assert fetch("/health")[0] == 200
    return fetch


def test_a_stored_live_token_is_served_with_its_key_authorization(store: Store, get: Get) -> None:
    store(GOOD)
    assert http01.lookup(GOOD) == KEY_AUTH
    status, ctype, body = get(http01.PREFIX + GOOD)
    assert (status, ctype, body) == (200, "application/octet-stream", KEY_AUTH.encode())
    # a query string does not change the token asked for, whatever it holds
    assert get(http01.PREFIX + GOOD + "?x=1")[::2] == (200, KEY_AUTH.encode())
    assert get(http01.PREFIX + GOOD + "?x=1?y=2")[::2] == (200, KEY_AUTH.encode())


def test_an_unknown_token_is_404(store: Store, get: Get) -> None:
    store(GOOD)
    other = "B" * 20
    assert http01.lookup(other) is None
    assert get(http01.PREFIX + other) == (404, "text/plain", b"not found\n")


def test_an_expired_token_is_not_served(store: Store, get: Get) -> None:
    store(GOOD, expires_at=utcnow() - dt.timedelta(seconds=1))
    assert http01.lookup(GOOD) is None
    assert get(http01.PREFIX + GOOD)[0] == 404


def test_a_token_stops_being_served_at_its_expiry_instant(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The boundary, with the responder's clock fixed: served a microsecond before, not at it."""
    expiry = utcnow().replace(microsecond=0) + dt.timedelta(minutes=5)
    store(GOOD, expires_at=expiry)
    monkeypatch.setattr(http01, "utcnow", lambda: expiry - dt.timedelta(microseconds=1))
    assert http01.lookup(GOOD) == KEY_AUTH
    monkeypatch.setattr(http01, "utcnow", lambda: expiry)
    assert http01.lookup(GOOD) is None


@pytest.mark.parametrize(
    "token",
    [
        "A" * 15,  # too short
        "A" * 19 + ".",  # a character outside base64url
        "A" * 19 + "=",  # padding is not part of an ACME token
        "A" * 19 + "/",
        "A" * 19 + "\n",
    ],
)
def test_a_malformed_token_is_refused_even_when_a_row_has_it(store: Store, get: Get, token: str) -> None:
    """The format check is the responder's own, not the database's: a stored row with a malformed
    token (written by anything) is still never answered."""
    store(token)
    assert http01.lookup(token) is None
    if "\n" not in token:
        assert get(http01.PREFIX + token)[0] == 404


def test_a_token_longer_than_256_is_refused(get: Get) -> None:
    assert http01.lookup("A" * 257) is None
    assert get(http01.PREFIX + "A" * 257)[0] == 404


@pytest.mark.parametrize("length", [16, 256])
def test_tokens_at_the_length_limits_are_served(store: Store, length: int) -> None:
    token = "a" * length
    store(token)
    assert http01.lookup(token) == KEY_AUTH


@contextmanager
def _lookups_counted() -> Iterator[list[str]]:
    """The responder's SQL statements on the tokens table while in the block."""
    seen: list[str] = []
    engine = get_engine(write=False)

    def count(_conn: object, _cur: object, statement: str, *_: object) -> None:
        if "http01_tokens" in statement:
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", count)


def test_a_token_asked_for_again_within_seconds_costs_no_second_lookup(store: Store, get: Get) -> None:
    """The CA's three requests for one challenge (one per perspective): one database round trip."""
    store(GOOD)
    with _lookups_counted() as seen:
        for _ in range(3):
            assert get(http01.PREFIX + GOOD)[::2] == (200, KEY_AUTH.encode())
    assert len(seen) == 1


def test_a_found_token_is_looked_up_again_once_its_seconds_are_up(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deleted row is still answered from the cache within FOUND_TTL_SECONDS (a key authorization
    is public), and no longer after it; the row's own expiry holds within the cache too."""
    store(GOOD)
    clock = [1000.0]
    monkeypatch.setattr(http01.time, "monotonic", lambda: clock[0])
    assert http01.lookup(GOOD) == KEY_AUTH
    with session_scope() as s:
        s.query(Http01Token).filter_by(token=GOOD).delete()
    clock[0] += http01.FOUND_TTL_SECONDS - 0.5
    assert http01.lookup(GOOD) == KEY_AUTH
    clock[0] += 1.0
    assert http01.lookup(GOOD) is None


def test_a_token_not_found_is_not_remembered(store: Store) -> None:
    """A token written a moment after a miss is served at once: misses are never cached."""
    assert http01.lookup(GOOD) is None
    store(GOOD)
    assert http01.lookup(GOOD) == KEY_AUTH


def test_the_cache_of_found_tokens_is_bounded(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past FOUND_MAX entries the ones whose time is up go first, then the whole cache."""
    monkeypatch.setattr(http01, "FOUND_MAX", 3)
    clock = [0.0]
    monkeypatch.setattr(http01.time, "monotonic", lambda: clock[0])
    tokens = [f"tok{i}" + "A" * 16 for i in range(5)]
    for t in tokens:
        store(t)
    http01.lookup(tokens[0])
    clock[0] += http01.FOUND_TTL_SECONDS + 1  # tokens[0]'s entry is now over
    http01.lookup(tokens[1])
    http01.lookup(tokens[2])
    http01.lookup(tokens[3])  # full: the over entry goes
    assert set(http01._found) == set(tokens[1:4])
    http01.lookup(tokens[4])  # full of live entries: all go
    assert set(http01._found) == {tokens[4]}


def _raw(port: int, data: bytes, *, wait: float = 10.0) -> bytes:
    """Send ``data`` as is and read the whole answer (b"" when the server hangs up unanswered)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(4096):
            out += chunk
        return out


def test_head_gets_the_headers_and_no_body(store: Store, served: http01.Http01Server) -> None:
    store(GOOD)
    port = served.server_address[1]
    out = _raw(port, f"HEAD {http01.PREFIX}{GOOD} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK\r\n")
    assert f"Content-Length: {len(KEY_AUTH)}".encode() in head and body == b""


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST /.well-known/acme-challenge/x HTTP/1.1\r\n\r\n", b"501"),
        (b"GET\r\n\r\n", b"400"),  # no target, no version
        (b"GET / FTP/1.0\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1 extra\r\n\r\n", b"400"),
    ],
)
def test_other_methods_and_malformed_request_lines_are_refused(
    served: http01.Http01Server, request_bytes: bytes, status: bytes
) -> None:
    out = _raw(served.server_address[1], request_bytes)
    assert out.startswith(b"HTTP/1.0 " + status + b" "), out


def test_a_client_that_never_finishes_its_request_is_disconnected(
    served: http01.Http01Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http01.Http01Server, "REQUEST_TIMEOUT_SECONDS", 0.3)
    assert _raw(served.server_address[1], b"GET /health HTTP/1.1\r\nHost: x\r\n", wait=5) == b""


def test_a_request_head_over_the_limit_is_disconnected_unanswered(served: http01.Http01Server) -> None:
    long_head = b"GET /health HTTP/1.1\r\nX-Pad: " + b"a" * (http01.Http01Server.MAX_REQUEST_HEAD + 10)
    assert _raw(served.server_address[1], long_head + b"\r\n\r\n") == b""
    # and the server goes on answering
    assert _raw(served.server_address[1], b"GET /health HTTP/1.0\r\n\r\n").endswith(b"\r\n\r\nok\n")


def test_a_slow_lookup_does_not_hold_up_the_other_requests(
    store: Store, served: http01.Http01Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token whose lookup hangs (the database slow) is waited for on the lookup threads: the
    health check and a token in the cache are answered meanwhile, from the event loop."""
    store(GOOD)
    assert http01.lookup(GOOD) == KEY_AUTH  # now in the cache
    release = threading.Event()
    real = http01._lookup_retrying

    def slow(token: str) -> str | None:
        release.wait(20)
        return real(token)

    monkeypatch.setattr(http01, "_lookup_retrying", slow)
    port = served.server_address[1]
    answers: list[bytes] = []
    other = "C" * 20
    waiting = threading.Thread(
        target=lambda: answers.append(_raw(port, f"GET {http01.PREFIX}{other} HTTP/1.0\r\n\r\n".encode()))
    )
    waiting.start()
    try:
        assert _raw(port, b"GET /health HTTP/1.0\r\n\r\n", wait=5).endswith(b"ok\n")
        assert _raw(port, f"GET {http01.PREFIX}{GOOD} HTTP/1.0\r\n\r\n".encode(), wait=5).endswith(
            KEY_AUTH.encode()
        )
        assert answers == []  # the slow one is still waiting
    finally:
        release.set()
        waiting.join(timeout=20)
    assert answers and answers[0].startswith(b"HTTP/1.0 404 ")


def test_requests_for_a_token_while_its_lookup_is_in_flight_share_that_lookup(
    store: Store, served: http01.Http01Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CA's three perspectives ask for a token at the same moment, before any answer is in the
    cache: one database lookup serves all three."""
    store(GOOD)
    release = threading.Event()
    calls: list[str] = []
    real = http01._lookup_retrying

    def held(token: str) -> str | None:
        calls.append(token)
        release.wait(20)
        return real(token)

    monkeypatch.setattr(http01, "_lookup_retrying", held)
    port = served.server_address[1]
    answers: list[bytes] = []
    ask = f"GET {http01.PREFIX}{GOOD} HTTP/1.0\r\n\r\n".encode()
    askers = [threading.Thread(target=lambda: answers.append(_raw(port, ask))) for _ in range(3)]
    for t in askers:
        t.start()
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # the other two requests arrive while the first lookup is held
    release.set()
    for t in askers:
        t.join(timeout=20)
    assert calls == [GOOD]
    assert len(answers) == 3 and all(a.endswith(b"\r\n\r\n" + KEY_AUTH.encode()) for a in answers)


def test_a_shutdown_before_the_server_runs_stops_it_at_once(db_settings: Settings) -> None:
    """``shutdown`` may come before ``serve_forever`` has started (a signal at start-up): it
    returns, and ``serve_forever`` then returns at once instead of serving forever."""
    srv = http01.serve("127.0.0.1", 0)
    srv.shutdown()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive()
    srv.server_close()


def test_health_and_other_paths(get: Get, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="certqueue.http01")
    assert get("/health") == (200, "application/octet-stream", b"ok\n")
    not_found = (404, "text/plain", b"not found\n")
    assert get("/") == not_found
    assert get("/.well-known/acme-challenge") == not_found  # the prefix without its slash
    assert get("/other/" + GOOD) == not_found
    # each request is logged at DEBUG as "<client> <request line> <status> ..."
    lines = [r.getMessage() for r in caplog.records if r.name == "certqueue.http01"]
    assert any(line.startswith('127.0.0.1 "GET /health HTTP/1.1" 200') for line in lines), lines


def test_a_database_failure_answers_503_not_404(
    get: Get,
    settings_factory: Callable[..., Settings],
    tmp_path_factory: pytest.TempPathFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A broken database must not look like "no such token" (the CA would fail the validation)."""
    missing = tmp_path_factory.mktemp("gone") / "no-such-dir" / "db.sqlite"
    settings_factory(database_url=f"sqlite:///{missing}")
    with caplog.at_level(logging.ERROR, logger="certqueue.http01"):
        status, ctype, body = get(http01.PREFIX + GOOD)
    assert (status, ctype, body) == (503, "text/plain", b"unavailable\n")
    (record,) = [r for r in caplog.records if r.name == "certqueue.http01" and r.levelno == logging.ERROR]
    assert record.getMessage() == "token lookup failed" and record.exc_info is not None


def test_a_database_failure_is_retried_before_answering(
    store: Store, get: Get, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lookup that fails (the server out of connections, a failover) is tried again within the
    request: the CA gets the key authorization, not a 503 that would cost the order."""
    store(GOOD)
    real = http01.lookup
    calls: list[str] = []

    def flaky(token: str) -> str | None:
        calls.append(token)
        if len(calls) <= 2:
            raise OperationalError("SELECT", {}, Exception("too many clients already"))
        return real(token)

    monkeypatch.setattr(http01, "lookup", flaky)
    monkeypatch.setattr(http01, "LOOKUP_RETRY_PAUSES", (0.01, 0.01, 0.01))
    assert get(http01.PREFIX + GOOD) == (200, "application/octet-stream", KEY_AUTH.encode())
    assert len(calls) == 3


def test_a_lookup_takes_no_write_lock(
    sqlite_url: str, settings_factory: Callable[..., Settings], get: Get
) -> None:
    """On SQLite the responder only reads: it answers while a worker holds the write lock, instead
    of queueing behind it (the CA's validation request would time out)."""
    settings_factory(database_url=sqlite_url)
    with session_scope() as s:
        s.add(Http01Token(token=GOOD, key_authorization=KEY_AUTH, certificate_id="cert_x",
                          challenge_id=None, expires_at=utcnow() + dt.timedelta(hours=1)))  # fmt: skip
    writer = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), timeout=1)
    try:
        writer.execute("BEGIN IMMEDIATE")  # the database's write lock, held
        assert get(http01.PREFIX + GOOD)[::2] == (200, KEY_AUTH.encode())
    finally:
        writer.rollback()
        writer.close()


def test_each_failed_lookup_is_logged_by_class_name_with_its_pause_and_the_last_try_is_the_token(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Three failures: each logged (the error's class, never its text) with the pause that follows,
    then a fourth, last lookup of the same token answers."""
    store(GOOD)
    real = http01.lookup
    calls: list[str] = []
    pauses: list[float] = []

    def flaky(token: str) -> str | None:
        calls.append(token)
        if len(calls) <= 3:
            raise OperationalError("SELECT", {}, Exception("password=secret too many clients"))
        return real(token)

    monkeypatch.setattr(http01, "lookup", flaky)
    monkeypatch.setattr(http01.time, "sleep", pauses.append)
    with caplog.at_level(logging.WARNING, logger="certqueue.http01"):
        assert http01._lookup_retrying(GOOD) == KEY_AUTH
    assert calls == [GOOD] * 4
    assert pauses == [0.1, 0.4, 1.0]
    assert [r.getMessage() for r in caplog.records if r.name == "certqueue.http01"] == [
        "token lookup failed (OperationalError); again in 0.1s",
        "token lookup failed (OperationalError); again in 0.4s",
        "token lookup failed (OperationalError); again in 1.0s",
    ]


def test_sigterm_and_sigint_set_the_stop_event(caplog: pytest.LogCaptureFixture) -> None:
    import signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with caplog.at_level(logging.INFO, logger="certqueue.http01"):
            stop = http01.stop_on_signals()
            assert not stop.is_set()
            signal.raise_signal(signal.SIGINT)
            assert stop.wait(10)
            stop.clear()
            signal.raise_signal(signal.SIGTERM)
            assert stop.wait(10)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert [r.getMessage() for r in caplog.records if r.name == "certqueue.http01"] == [
        "http01: SIGINT, stopping",
        "http01: SIGTERM, stopping",
    ]


class _StopAfter(threading.Event):
    """A stop event that is "set" on its ``n``-th wait (recording each wait's timeout), after
    running ``on_wait`` on each: the waits of serve_until_stopped, without waiting."""

    def __init__(self, n: int, on_wait: Callable[[], None]) -> None:
        super().__init__()
        self.n, self.on_wait = n, on_wait
        self.waits: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        self.on_wait()
        return len(self.waits) >= self.n


def test_serve_until_stopped_serves_in_a_named_thread_polling_every_200ms_until_stopped(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store(GOOD)
    srv = http01.serve("127.0.0.1", 0)
    port = srv.server_address[1]
    real_serve_forever = srv.serve_forever
    serving: list[tuple[str, float]] = []

    def serve_forever(poll_interval: float = 0.5) -> None:
        serving.append((threading.current_thread().name, poll_interval))
        real_serve_forever(poll_interval)

    monkeypatch.setattr(srv, "serve_forever", serve_forever)
    answers: list[tuple[int, bytes]] = []

    def ask() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", http01.PREFIX + GOOD)
            resp = conn.getresponse()
            answers.append((resp.status, resp.read()))
        finally:
            conn.close()

    stop = _StopAfter(3, ask)
    http01.serve_until_stopped(srv, stop)
    assert stop.waits == [0.2, 0.2, 0.2]  # a stop is noticed within 0.2 s, while the port answers
    assert answers == [(200, KEY_AUTH.encode())] * 3
    assert serving == [("http01", 0.2)]
    assert srv.socket.fileno() == -1  # closed: the port is free again
