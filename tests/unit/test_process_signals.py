"""Every long-running process stops on SIGTERM by itself, also as PID 1 (as in a container without an
init), and an idle one within a second: ``certqueue http01``, ``metrics``, ``serve``, ``worker``
(on the embedded broker and on Redis) and ``beat``. A busy worker still finishes its task first.

Each runs as PID 1 of a fresh PID namespace (``unshare --pid``): there the kernel ignores a signal
the process installed no handler for, which is exactly what made ``docker stop`` wait for the kill.

Stop times are behaviour here (issue 17: "within a second"), so they are asserted, robustly: each
process is started and stopped ``RUNS`` times and the fastest stop must be under ``IDLE_STOP_BOUND``.
The waits that made stops slow were fixed sleeps, paid by every stop; a loaded machine only ever adds
time (the medians went over a second at a load average of 20 while the fastest stayed well under),
so the fastest of the runs is what tells whether a fixed wait is back. A process still running
``STOP_DEADLINE`` after SIGTERM fails at once. Measured on the shared 2-core
machine (other engineers' test runs beside it), medians: http01 0.1 s, metrics 0.6 s, serve 0.4 s,
beat 0.2 s, worker 0.4 s (embedded) and 0.4 s (Redis); the worker took 5-8 s before
certqueue.worker_pool. ``-s`` prints every measurement.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devstack.ports import free_port

CERTQUEUE = str(Path(sys.executable).with_name("certqueue"))
STOP_DEADLINE = 10.0
#: issue 17: an idle process stops within a second of SIGTERM (the fastest of RUNS stops)
IDLE_STOP_BOUND = 1.0
RUNS = 3


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _pid1_of(unshare: subprocess.Popen[bytes]) -> int:
    """The outer pid of the child that is PID 1 inside the namespace."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children").read_text().split()
        except OSError:
            children = []
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise AssertionError("unshare started no child")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs unshare and root for a PID namespace")
    probe = subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"no PID namespaces here: {probe.stderr!r}")
    d = tmp_path_factory.mktemp("signals")
    (d / "settings").mkdir()
    from certqueue.keystore import generate_key_file

    generate_key_file(d / "master.key")
    out = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CERTQUEUE_")},
        "CERTQUEUE_SETTINGS_DIR": str(d / "settings"),
        "CERTQUEUE_DATABASE__URL": f"sqlite:///{d / 'certqueue.db'}",
        "CERTQUEUE_BROKER__FILESYSTEM_PATH": str(d / "broker"),
        "CERTQUEUE_STORAGE__ENCRYPTION_KEY_PATH": str(d / "master.key"),
        "CERTQUEUE_LOGGING__JSON": "true",
    }
    res = subprocess.run([CERTQUEUE, "db", "upgrade"], env=out, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return out


def _ready_by_port(port: int) -> object:
    return lambda _log: _port_open(port)


def _ready_by_log(word: str) -> object:
    return lambda log: word in log.read_text(errors="replace")


CASES = {
    "http01": lambda p: (["http01", "--host", "127.0.0.1", "--port", str(p)], _ready_by_port(p)),
    "metrics": lambda p: (["metrics", "--host", "127.0.0.1", "--port", str(p)], _ready_by_port(p)),
    "serve": lambda p: (["serve", "--host", "127.0.0.1", "--port", str(p)], _ready_by_port(p)),
    "worker": lambda p: (["worker", "--pool", "dns", "-c", "1"], _ready_by_log("ready")),
    "beat": lambda p: (["beat"], _ready_by_log("beat: Starting")),
}


@pytest.fixture()
def redis_env(env: dict[str, str], redis_db: object) -> dict[str, str]:
    return {**env, "CERTQUEUE_BROKER__URL": redis_db.url}  # type: ignore[attr-defined]


class _Running:
    """One certqueue process as PID 1 of its own PID namespace, its output in ``log_path``."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # closed in stop()
        self.outer = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", CERTQUEUE, *argv],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid1 = _pid1_of(self.outer)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, ready: object, what: str) -> None:
        deadline = time.monotonic() + 60
        while not ready(self.log_path):  # type: ignore[operator]
            assert self.outer.poll() is None, self.log()
            assert time.monotonic() < deadline, f"{what} never became ready:\n{self.log()}"
            time.sleep(0.1)

    def sigterm(self) -> float:
        """SIGTERM to PID 1; the seconds until the namespace is gone (fails after STOP_DEADLINE)."""
        started = time.monotonic()
        os.kill(self.pid1, signal.SIGTERM)
        return self.wait_gone(started)

    def wait_gone(self, started: float) -> float:
        try:
            self.outer.wait(timeout=max(0.0, started + STOP_DEADLINE - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {STOP_DEADLINE:.0f} s after SIGTERM as PID 1:\n" + self.log()[-3000:])
        return time.monotonic() - started

    def stop(self) -> None:
        if self.outer.poll() is None:
            os.killpg(self.outer.pid, signal.SIGKILL)
            self.outer.wait(timeout=10)
        self._log.close()


def _heartbeats(env: dict[str, str]) -> list[tuple[str, int]]:
    path = env["CERTQUEUE_DATABASE__URL"].removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as conn:
        return conn.execute("SELECT role, pid FROM process_heartbeats").fetchall()


def _idle_stop_times(process: str, env: dict[str, str], tmp_path: Path) -> list[float]:
    times = []
    for run in range(RUNS):
        argv, ready = CASES[process](free_port())
        proc = _Running(argv, env, tmp_path / f"{process}-{run}.log")
        try:
            proc.wait_ready(ready, process)
            times.append(proc.sigterm())
            assert proc.outer.returncode == 0, proc.log()[-3000:]
            if process == "worker":  # the pool processes it killed left no key heartbeat behind
                assert _heartbeats(env) == [], proc.log()[-3000:]
        finally:
            proc.stop()
    print(f"{process}: stopped {', '.join(f'{t:.2f}' for t in times)} s after SIGTERM")
    return times


@pytest.mark.parametrize("process", sorted(CASES))
def test_stops_on_sigterm_as_pid_1_within_a_second(process: str, env: dict[str, str], tmp_path: Path) -> None:
    times = _idle_stop_times(process, env, tmp_path)
    assert min(times) < IDLE_STOP_BOUND, f"{process}: {times} (median {statistics.median(times):.2f} s)"


def test_idle_worker_on_redis_stops_within_a_second(redis_env: dict[str, str], tmp_path: Path) -> None:
    """On Redis the worker runs celery's event loop (the embedded broker: the blocking loop)."""
    times = _idle_stop_times("worker", redis_env, tmp_path)
    assert min(times) < IDLE_STOP_BOUND, f"{times} (median {statistics.median(times):.2f} s)"


def _task_state_embedded(env: dict[str, str], task_id: str) -> str | None:
    results = Path(env["CERTQUEUE_BROKER__FILESYSTEM_PATH"]).parent / "celery-results.db"
    with contextlib.closing(sqlite3.connect(results, timeout=30)) as conn:
        try:
            row = conn.execute("SELECT status FROM celery_taskmeta WHERE task_id = ?", (task_id,)).fetchone()
        except sqlite3.OperationalError:  # no table yet: nothing stored
            return None
    return row[0] if row else None


def _task_state_redis(env: dict[str, str], task_id: str) -> str | None:
    import json

    import redis as redis_lib

    raw = redis_lib.Redis.from_url(env["CERTQUEUE_BROKER__URL"]).get(f"celery-task-meta-{task_id}")
    return json.loads(raw)["status"] if raw else None


@pytest.mark.parametrize("broker", ["embedded", "redis"])
def test_busy_worker_finishes_its_task_before_it_stops(
    broker: str, env: dict[str, str], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """acks_late: SIGTERM while a task runs lets the task finish (its result is stored, nothing is
    left for the broker to deliver again), and only then does the worker exit. The task is held
    inside its database transaction by a write lock this test takes on the SQLite file."""
    if broker == "redis":
        env = request.getfixturevalue("redis_env")
    # a database of this test's own (the lock below must not block the other tests' processes)
    db = tmp_path / "busy.db"
    env = {**env, "CERTQUEUE_DATABASE__URL": f"sqlite:///{db}"}
    res = subprocess.run([CERTQUEUE, "db", "upgrade"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    proc = _Running(["worker", "--pool", "acme", "-c", "1"], env, tmp_path / "busy-worker.log")
    lock = sqlite3.connect(db, timeout=30, isolation_level=None)
    try:
        proc.wait_ready(_ready_by_log("ready"), "worker")
        lock.execute("BEGIN IMMEDIATE")  # every write transaction of the worker now waits
        sent = subprocess.run(
            [sys.executable, "-c", _SEND_STATUS],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stderr
        task_id = sent.stdout.strip()
        state = _task_state_embedded if broker == "embedded" else _task_state_redis
        _await_task_received(proc, task_id)
        started = time.monotonic()
        os.kill(proc.pid1, signal.SIGTERM)
        held = 1.5
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.outer.wait(timeout=held)
        assert proc.outer.poll() is None, "the worker exited with a task running:\n" + proc.log()[-3000:]
        assert state(env, task_id) is None, "the task finished while its transaction could not begin"
        lock.execute("ROLLBACK")
        took = proc.wait_gone(started)
        print(f"busy worker ({broker}): stopped {took:.2f} s after SIGTERM, {held} s of it holding the task")
        assert state(env, task_id) in ("SUCCESS", "FAILURE"), proc.log()[-3000:]
        if broker == "embedded":  # nothing left to be delivered again: the message was acked
            folder = Path(env["CERTQUEUE_BROKER__FILESYSTEM_PATH"])
            assert not [p for sub in ("out", "claimed") for p in (folder / sub).iterdir()], proc.log()[-3000:]
    finally:
        lock.close()
        proc.stop()


#: a status request for a certificate that does not exist (the task fails permanently, after its
#: transaction began: what matters here is that it ran to the end)
_SEND_STATUS = """
from certqueue.client import send
print(send("certqueue.status", {"v": 1, "certificate_id": "cert_aaaaaaaaaaaaaaaaaaaa"}))
"""


def _await_task_received(proc: _Running, task_id: str) -> None:
    """The worker logs ``Task ... received`` in the callback that hands the task to a pool process
    (the main thread; a SIGTERM is acted on only after that callback): from then on the pool holds
    it. (No STARTED state to wait for: ``task_track_started`` is off.)"""
    deadline = time.monotonic() + 60
    while f"{task_id}] received" not in proc.log():
        assert proc.outer.poll() is None, proc.log()
        assert time.monotonic() < deadline, f"{task_id} never received:\n{proc.log()[-3000:]}"
        time.sleep(0.05)
