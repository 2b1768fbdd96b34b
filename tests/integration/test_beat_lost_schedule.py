"""Beat keeps sending when Redis loses its schedule but not its lock.

A real ``certqueue beat`` on a private Redis. The chaos suite's Redis restart once landed while
beat was starting: the entries were written to the old Redis, the lock was taken in the new one
(redis-py retried until it was back), and beat ticked for ever over an empty schedule, sending
nothing (every certificate stayed REQUESTED). Here that state is made on purpose: everything in
Redis is flushed except beat's lock, put back with its token. Beat must write its entries again
and go on sending, without a restart.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from devstack.servers import PrivateRedis
from devstack.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.redis, pytest.mark.timeout(180)]

LOCK = "certqueue:redbeat::lock"
SCHEDULE = "certqueue:redbeat::schedule"


@pytest.fixture
def beat(tmp_path: Path) -> Iterator[tuple[Stack, PrivateRedis]]:
    server = PrivateRedis().start()
    stack = Stack(
        tmp_path,
        {
            "CERTQUEUE_BROKER__URL": server.url,
            "CERTQUEUE_AUTOMATION__DISPATCH_INTERVAL_SECONDS": "1",
            "CERTQUEUE_AUTOMATION__SCAN_INTERVAL_SECONDS": "2",
        },
    )
    try:
        stack.start_beat()
        yield stack, server
    finally:
        stack.stop_all()
        server.stop()


def _sent(stack: Stack, task: str) -> int:
    return stack.log("beat").count(f"Sending due task {task} ")


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.1)


def test_beat_writes_a_lost_schedule_again_and_keeps_sending(beat: tuple[Stack, PrivateRedis]) -> None:
    stack, server = beat
    client = redis.Redis.from_url(server.url)
    _wait(lambda: _sent(stack, "dispatch") >= 2, 60, "beat sending dispatch")
    entries = client.zcard(SCHEDULE)
    assert entries >= 5, entries  # dispatch, scans, reconcile, events...

    # everything gone but the lock, which beat still owns (its token, its time to live)
    token, ttl = client.get(LOCK), client.pttl(LOCK)
    assert token is not None and ttl > 0
    client.flushdb()
    client.set(LOCK, token, px=ttl)
    before = _sent(stack, "dispatch")

    _wait(lambda: _sent(stack, "dispatch") >= before + 2, 30, "dispatch sent again after the flush")
    assert client.zcard(SCHEDULE) == entries  # every entry written again
    log = stack.log("beat")
    assert "missing from Redis" in log
    # the same beat process went on: no restart, no lost lock
    assert "exited unexpectedly" not in log and "LockNotOwnedError" not in log
    assert client.get(LOCK) == token
    client.close()
