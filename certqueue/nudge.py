"""Nudging dispatch: a best-effort hint that work is waiting in the database. Never blocks a caller.

A request is durable when its intent commits; the nudge only shortens the wait until dispatch
claims it (beat's heartbeat claims it anyway). So the nudge is sent from a background thread,
coalesced (many requests in a burst give one message; with a Redis broker, across every process
too: ``fleet_wait``), and a broker that is down costs a log line, never the request: the API
answers as soon as the transaction commits.

Short-lived processes (the CLI) call :func:`flush` with a small timeout before exiting.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("certqueue.nudge")

DISPATCH_TASK = "certqueue.scan.dispatch"
#: the shortest gap between two nudges from one process (trailing edge: the last one is never lost).
#: A second: every finished certificate nudges, and topping up capacity one certificate at a time
#: would send batches of one and run dispatch once per certificate.
MIN_INTERVAL = 1.0
#: the longest one nudge may wait for the broker (seconds); beat's dispatch heartbeat covers the rest
SEND_TIMEOUT = 2.0
#: with a Redis broker, when the fleet last sent a nudge (a wall-clock time, expiring after
#: ``MIN_INTERVAL``): every process's nudges coalesce into about one a second, not one per process
FLEET_KEY = "certqueue:nudge:sent_at"


def _redis_of(app: Any) -> Any | None:
    """The Redis client of ``app``'s broker, or None (another broker, or no configuration)."""
    conf = getattr(app, "conf", None)
    url = getattr(conf, "broker_url", None) if conf is not None else None
    if not isinstance(url, str) or not url.startswith(("redis://", "rediss://")):
        return None
    from certqueue.brokerstate import redis_client

    return redis_client(url.split(";", 1)[0])


def fleet_wait(client: Any, requested_at: float) -> float | None:
    """Whether this process sends its nudge, asked of the broker's Redis: None, send now (the
    fleet's slot is this one's, or Redis did not answer: best effort sends); 0.0, another process
    sent one after ``requested_at`` (the dispatch it starts finds this request's work: nothing to
    send); else the seconds until the slot is free again (the other nudge came before this request,
    so it may not cover it)."""
    import redis

    try:
        now = time.time()
        if client.set(FLEET_KEY, repr(now), nx=True, px=int(MIN_INTERVAL * 1000)):
            return None
        raw, pttl = client.pipeline().get(FLEET_KEY).pttl(FLEET_KEY).execute()
        if raw is not None and float(raw) >= requested_at:
            return 0.0
        return max(int(pttl or 0), 10) / 1000.0
    except (redis.RedisError, ValueError):
        return None


class _Nudger:
    def __init__(self, app_getter: Callable[[], Any] | None = None) -> None:
        self._app_getter = app_getter
        self._wanted = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._last_failure_logged = 0.0
        self._closed = False
        self._requested_at = 0.0
        self.sent = 0
        #: nudges left unsent because another process's (sent after the request) covered them
        self.covered = 0

    def close(self) -> None:
        """Send nothing more (a nudge still waiting for its interval is dropped)."""
        self._closed = True
        self._wanted.set()

    def request(self) -> None:
        if self._closed:
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._pid = os.getpid()
                self._wanted = threading.Event()
                self._idle = threading.Event()
                self._thread = threading.Thread(target=self._run, name="certqueue-nudge", daemon=True)
                self._thread.start()
            self._requested_at = time.time()
            self._idle.clear()
            self._wanted.set()

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for pending nudges to be sent (or given up)."""
        return self._idle.wait(timeout)

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._closed:
                self._idle.set()
                return
            self._send()
            if not self._wanted.is_set():
                self._idle.set()
            time.sleep(MIN_INTERVAL)

    def _send(self) -> None:
        try:
            if self._app_getter is not None:
                app = self._app_getter()
            else:
                from certqueue.client import app_for_sending

                app = app_for_sending()
            if self._closed:
                return
            fleet = _redis_of(app)
            if fleet is not None:
                wait = fleet_wait(fleet, self._requested_at)
                while wait and not self._closed:
                    time.sleep(wait)
                    wait = fleet_wait(fleet, self._requested_at)
                if wait == 0.0:
                    self.covered += 1
                    return
                if self._closed:
                    return
            # a connection of its own that gives up at once: with the broker down, kombu's default
            # (up to 100 reconnects) would hold this thread for minutes and swallow later nudges
            with app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=0, timeout=SEND_TIMEOUT)
                app.send_task(DISPATCH_TASK, queue="scan", retry=False, expires=300, connection=conn)
            self.sent += 1
        except Exception as exc:  # noqa: BLE001  (best effort by design: beat dispatches anyway)
            now = time.monotonic()
            if now - self._last_failure_logged > 30:
                self._last_failure_logged = now
                log.warning(
                    "dispatch nudge not sent (%s); beat's dispatch will pick the work up", type(exc).__name__
                )


_nudger = _Nudger()


def nudge() -> None:
    """Ask dispatch to run soon (through the process's broker); returns at once."""
    _nudger.request()


def flush(timeout: float = 1.0) -> bool:
    return _nudger.flush(timeout)


def nudger_for(app_getter: Callable[[], Any]) -> _Nudger:
    """A nudger sending through another app (a manager with settings of its own)."""
    return _Nudger(app_getter)


_later_lock = threading.Lock()
_later_due = 0.0
_generation = 0  # raised by reset(): a delayed nudge of an earlier generation is not sent


def nudge_later(seconds: float) -> None:
    """Ask dispatch to run in ``seconds`` (deferred work resumes on time even between beats): one
    delayed message per process at a time, never further out than the longest countdown (beat's
    heartbeat covers anything later). Best effort, like :func:`nudge`."""
    global _later_due
    from certqueue.lifecycle.failure import MAX_COUNTDOWN

    seconds = max(0.5, min(float(seconds), MAX_COUNTDOWN))
    due = time.monotonic() + seconds
    with _later_lock:
        if due <= _later_due <= due + 1.0:
            return  # one is already due then (at most a second after): it finds this work due too
        _later_due = due
        generation = _generation

    def send() -> None:
        if generation != _generation:
            return
        try:
            from certqueue.client import app_for_sending

            app = app_for_sending()
            with app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=0, timeout=SEND_TIMEOUT)
                app.send_task(
                    DISPATCH_TASK,
                    queue="scan",
                    retry=False,
                    countdown=seconds,
                    expires=seconds + 300,
                    connection=conn,
                )
        except Exception as exc:  # noqa: BLE001  (best effort: beat dispatches anyway)
            log.warning("delayed dispatch nudge not sent (%s)", type(exc).__name__)

    threading.Thread(target=send, name="certqueue-nudge-later", daemon=True).start()


def reset() -> None:
    """Forget this process's nudgers (tests: a nudger must not outlive the broker it was sending to)."""
    global _nudger, _later_due, _generation
    _nudger.close()
    _nudger = _Nudger()
    with _later_lock:
        _later_due = 0.0
        _generation += 1
