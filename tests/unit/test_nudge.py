"""The dispatch nudge (certqueue/nudge.py): a burst coalesces into few messages, the last request is
never lost, and a nudger that was reset sends nothing more (a test's nudge must not land in the
next test's broker: CI once saw a stray ``certqueue.scan.dispatch`` there)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from certqueue import nudge


class _Conn:
    def __enter__(self) -> _Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def ensure_connection(self, **_kw: Any) -> None:
        return None


class _App:
    """Records what would have gone to the broker."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def connection_for_write(self) -> _Conn:
        return _Conn()

    def send_task(self, name: str, **kw: Any) -> None:
        with self.lock:
            self.sent.append({"name": name, **kw})


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nudge, "MIN_INTERVAL", 0.2)


def _wait_for(pred: Any, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_a_burst_coalesces_and_the_last_request_is_sent(fast: None) -> None:
    app = _App()
    n = nudge.nudger_for(lambda: app)
    for _ in range(50):
        n.request()
    assert n.flush(5.0)
    # the first request is sent at once, the rest of the burst at most once more (trailing edge)
    assert 1 <= len(app.sent) <= 2
    assert all(m["name"] == nudge.DISPATCH_TASK and m["queue"] == "scan" for m in app.sent)
    before = len(app.sent)
    time.sleep(0.3)
    n.request()  # after a quiet interval: a new message
    assert _wait_for(lambda: len(app.sent) == before + 1)
    n.close()


def test_a_closed_nudger_drops_what_was_waiting_and_sends_nothing_more(fast: None) -> None:
    app = _App()
    n = nudge.nudger_for(lambda: app)
    n.request()
    assert _wait_for(lambda: len(app.sent) == 1)
    n.request()  # waits for the interval to pass
    n.close()
    n.request()
    time.sleep(0.6)
    assert len(app.sent) == 1
    assert n.flush(1.0)  # nothing pending: a CLI's flush does not hang on a closed nudger


def test_reset_drops_a_delayed_nudge_of_the_earlier_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    app = _App()
    import certqueue.client

    monkeypatch.setattr(certqueue.client, "app_for_sending", lambda: app)
    gate = threading.Event()
    started: list[threading.Thread] = []
    real_thread = threading.Thread

    def held_thread(*a: Any, **kw: Any) -> threading.Thread:
        target = kw.pop("target")

        def run() -> None:
            gate.wait(5)
            target()

        kw["target"] = run
        t = real_thread(*a, **kw)
        started.append(t)
        return t

    monkeypatch.setattr(nudge.threading, "Thread", held_thread)
    nudge.nudge_later(30)
    nudge.reset()  # the next test begins before the delayed message went out
    gate.set()
    for t in started:
        t.join(5)
    assert app.sent == []

    monkeypatch.setattr(nudge.threading, "Thread", real_thread)
    nudge.nudge_later(30)  # the new generation sends
    assert _wait_for(lambda: len(app.sent) == 1)
    assert app.sent[0]["countdown"] == 30


def test_a_delayed_nudge_is_covered_only_by_one_due_at_or_just_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A wake due sooner does not cover work due later: dispatch then finds it not yet due, and
    without beat (a one-node stack between heartbeats) nothing would run it. Seen: two
    certificates whose retries were due 4 s apart by a fraction of a second; one was retried, the
    other waited 90 s."""
    app = _App()
    import certqueue.client

    monkeypatch.setattr(certqueue.client, "app_for_sending", lambda: app)
    nudge.nudge_later(4.0)
    nudge.nudge_later(4.4)  # due later than the one pending: sent too
    nudge.nudge_later(4.2)  # the one due at 4.4 finds it due: covered
    assert _wait_for(lambda: len(app.sent) == 2)
    time.sleep(0.2)
    assert [round(m["countdown"], 1) for m in app.sent] == [4.0, 4.4]


# --- across processes: one nudge a second for the whole fleet (a Redis broker) ----------------------


class _RedisApp(_App):
    """An app whose broker is a real Redis database (what the fleet's coalescing asks)."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.conf = type("Conf", (), {"broker_url": url})()


def test_fleet_wait_gives_the_slot_to_one_process_and_covers_only_requests_before_its_send(redis_db) -> None:
    client = redis_db.client()
    before = time.time()
    assert nudge.fleet_wait(client, before) is None  # the slot is this one's: send
    # another process whose request came before that send: the dispatch it starts covers it
    assert nudge.fleet_wait(client, before) == 0.0
    # a request after that send is not covered: wait for the slot (at most one interval), then send
    later = time.time() + 0.001
    wait = nudge.fleet_wait(client, later)
    assert wait is not None and 0 < wait <= nudge.MIN_INTERVAL
    time.sleep(wait + 0.05)
    assert nudge.fleet_wait(client, later) is None


def test_fleet_wait_sends_when_redis_does_not_answer() -> None:
    import redis

    down = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, socket_timeout=0.2)
    assert nudge.fleet_wait(down, time.time()) is None  # best effort: the nudge goes out


def test_two_processes_bursts_give_about_one_message_a_second_and_lose_no_request(
    fast: None, redis_db
) -> None:
    apps = [_RedisApp(redis_db.url), _RedisApp(redis_db.url)]
    nudgers = [nudge.nudger_for(lambda app=app: app) for app in apps]
    try:
        for _ in range(30):
            for n in nudgers:
                n.request()
        assert all(n.flush(5.0) for n in nudgers)
        total = sum(len(a.sent) for a in apps)
        # alone, each would send its first and its trailing nudge (4); together they share the slot
        assert 1 <= total <= 3, total
        assert sum(n.covered for n in nudgers) >= 1
        # a request after everything was sent is never lost: a message follows it
        time.sleep(0.3)
        sent_before = total
        nudgers[1].request()
        assert _wait_for(lambda: sum(len(a.sent) for a in apps) == sent_before + 1)
    finally:
        for n in nudgers:
            n.close()
