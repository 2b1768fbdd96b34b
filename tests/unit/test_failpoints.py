"""Fault injection points (certqueue/failpoints.py): off unless configured; a sleep may be limited
to the first hits in a process (the chaos case that SIGKILLs a worker mid-batch holds only the
orders it needs, not every order of the run)."""

from __future__ import annotations

import time

import pytest

from certqueue import failpoints
from certqueue.errors import RetryableError


@pytest.fixture
def points(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    def set_to(raw: str) -> None:
        monkeypatch.setenv("CERTQUEUE_FAILPOINTS", raw)
        failpoints._points = None
        failpoints._hits.clear()

    return set_to


def _timed(name: str) -> float:
    t0 = time.monotonic()
    failpoints.hit(name)
    return time.monotonic() - t0


def test_unset_points_do_nothing(points) -> None:  # type: ignore[no-untyped-def]
    points("")
    assert _timed("validate.before_finalize") < 0.05


def test_a_sleep_sleeps_every_time(points) -> None:  # type: ignore[no-untyped-def]
    points("validate.before_finalize=sleep:0.1")
    assert [_timed("validate.before_finalize") >= 0.1 for _ in range(3)] == [True, True, True]
    assert _timed("other.point") < 0.05


def test_a_counted_sleep_sleeps_only_the_first_hits(points) -> None:  # type: ignore[no-untyped-def]
    points("validate.before_finalize=sleep:0.1:2,deploy.edge=sleep:0.1:1")
    slept = [_timed("validate.before_finalize") >= 0.1 for _ in range(4)]
    assert slept == [True, True, False, False]
    assert [_timed("deploy.edge") >= 0.1 for _ in range(2)] == [True, False]  # counted per point


def test_errors(points) -> None:  # type: ignore[no-untyped-def]
    points(f"deploy.edge=error,deploy.late=error_until:{time.time() + 60},deploy.past=error_until:1")
    with pytest.raises(RetryableError):
        failpoints.hit("deploy.edge")
    with pytest.raises(RetryableError):
        failpoints.hit("deploy.late")
    failpoints.hit("deploy.past")  # the moment has passed: no error
