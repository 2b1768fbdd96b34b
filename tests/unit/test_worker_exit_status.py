"""A worker or beat process exits with celery's own exit status (``workers._celery_exit_code``).

kombu takes a whole worker down when Redis goes away while a message is unacknowledged
("Unrecoverable error: AttributeError ... hostname", seen in the Redis-restart chaos case): celery
then exits 1. ``app.worker_main`` drops that status, so the process exited 0 and the supervisor,
which does not restart a worker that stopped by itself with 0 (a remote-control shutdown, the
key-store stop), left the queue unserved. Here a real celery worker (in-memory broker, solo pool)
meets an unrecoverable error in a bootstep: the status is 1; a worker told to shut down is 0.

Each worker runs in a child process: a worker started in the test process would leave celery's
process state behind (its app as the default app, "joining a result would block"), which breaks
later tests that wait on a result.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

_PRELUDE = """
from celery import Celery, bootsteps
from certqueue.workers import _celery_exit_code

ARGV = ["worker", "-P", "solo", "--without-mingle", "--without-gossip", "--without-heartbeat",
        "--loglevel", "WARNING"]
app = Celery("exit-status", broker="memory://", backend="cache+memory://")
app.conf.worker_hijack_root_logger = False
app.conf.worker_redirect_stdouts = False  # the status line below goes to stdout, not the log
"""

_CASES = {
    "unrecoverable": """
class Broken(bootsteps.StartStopStep):
    requires = {"celery.worker.components:Pool"}

    def start(self, worker):
        raise AttributeError("'NoneType' object has no attribute 'hostname'")

app.steps["worker"].add(Broken)
code = _celery_exit_code(app, ARGV)
""",
    "shutdown": """
@app.task(name="stop-now")
def stop_now():
    from celery.exceptions import WorkerShutdown

    raise WorkerShutdown(0)

stop_now.delay()
code = _celery_exit_code(app, ARGV)
""",
    "bad option": """
code = _celery_exit_code(app, ["worker", "--no-such-option"])
""",
}


def _status(case: str) -> int:
    script = _PRELUDE + textwrap.dedent(_CASES[case]) + "\nprint('status', code)\n"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("status ")]
    assert lines, out.stdout[-2000:] + out.stderr[-2000:]
    return int(lines[-1].split()[1])


@pytest.mark.parametrize(("case", "status"), [("unrecoverable", 1), ("shutdown", 0), ("bad option", 2)])
def test_celery_s_exit_status_is_the_process_s(case: str, status: int) -> None:
    assert _status(case) == status
