"""A worker or beat process exits with celery's own exit status (``workers._celery_exit_code``).

kombu takes a whole worker down when Redis goes away while a message is unacknowledged
("Unrecoverable error: AttributeError ... hostname", seen in the Redis-restart chaos case): celery
then exits 1. ``app.worker_main`` drops that status, so the process exited 0 and the supervisor,
which does not restart a worker that stopped by itself with 0 (a remote-control shutdown, the
key-store stop), left the queue unserved. Here a real celery worker (in-memory broker, solo pool)
meets an unrecoverable error in a bootstep: the status is 1; a worker told to shut down is 0.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery, bootsteps

from certqueue.workers import _celery_exit_code


class _Broken(bootsteps.StartStopStep):
    requires = {"celery.worker.components:Pool"}

    def start(self, worker: Any) -> None:
        raise AttributeError("'NoneType' object has no attribute 'hostname'")


def _app() -> Celery:
    app = Celery("exit-status", broker="memory://", backend="cache+memory://")
    app.conf.worker_hijack_root_logger = False
    return app


ARGV = [
    "worker",
    "-P",
    "solo",
    "--without-mingle",
    "--without-gossip",
    "--without-heartbeat",
    "--loglevel",
    "WARNING",
]


def test_an_unrecoverable_error_is_exit_status_1() -> None:
    app = _app()
    app.steps["worker"].add(_Broken)
    assert _celery_exit_code(app, ARGV) == 1


def test_a_worker_told_to_shut_down_exits_0() -> None:
    app = _app()

    @app.task(name="stop-now")
    def stop_now() -> None:
        from celery.exceptions import WorkerShutdown

        raise WorkerShutdown(0)

    stop_now.delay()
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(_celery_exit_code(app, ARGV)), daemon=True)
    t.start()
    t.join(30)
    assert result == [0]


def test_a_command_line_that_fails_to_parse_is_not_a_clean_stop() -> None:
    app = _app()
    assert _celery_exit_code(app, ["worker", "--no-such-option"]) != 0
