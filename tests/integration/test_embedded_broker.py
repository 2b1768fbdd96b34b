"""The embedded default's broker and worker under real processes (issue 19).

- a stress run: several producer processes, two consumer processes, a few thousand messages, with
  exactly the transport and options the embedded default configures (kombu's filesystem transport
  failed this at once: a consumer read a file between its creation and its write);
- a corrupt message file in front of a real one: a real ``certqueue worker`` quarantines it and runs
  the next message;
- the worker's supervisor restarts a killed worker process.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.embedded_broker import run as broker_run
from certqueue.celery_app import lazy_app
from certqueue.config import set_settings
from certqueue.db import dispose_all
from devstack.stack import Stack
from tests.conftest_stack import install_stack_settings, stack_env

pytestmark = pytest.mark.integration

MARKER = "cq-marker-91c4"  # stands for message content that must never reach a log


def test_stress_every_message_exactly_once() -> None:
    r = broker_run("certqueue", producers=4, consumers=2, messages=3000, timeout=240)
    assert r["consumer_exceptions"] == 0, r["first_error"]
    assert r["producer_exceptions"] == 0, r["first_error"]
    assert r["consumers_died"] == 0
    assert r["decoded_empty_or_wrong"] == 0
    assert r["duplicates"] == 0
    assert r["lost"] == 0 and r["delivered"] == 3000


@pytest.fixture()
def embedded(tmp_path: Path) -> Iterator[Stack]:
    """The embedded default (SQLite, the file broker) with no CA: enough for a worker to run tasks.
    Its state lives under ``state/``, and the processes run in ``tmp_path``, which has no ``var/``."""
    env = stack_env(
        tmp_path, state_dir="state", log_level="INFO", settings={"automation.scan_interval_seconds": "1"}
    )
    stack = Stack(workdir=tmp_path, env=env)
    stack.cli("db", "upgrade")
    install_stack_settings(env)
    lazy_app.get()  # builds the app: creates the broker folders
    try:
        yield stack
    finally:
        stack.stop_all()
        set_settings(None)
        dispose_all()
        lazy_app.reset()


def _run_status_task(timeout: float = 60.0) -> Any:
    """A real task through the broker and the result store: certqueue.status for an unknown id
    runs and fails with a clear error (no certificate is needed to prove the message ran)."""
    res = lazy_app.get().send_task(
        "certqueue.status", args=[{"v": 1, "certificate_id": "cert_0000000000000000none"}], queue="acme"
    )
    res.get(timeout=timeout, propagate=False)
    return res


def _envelope(body: bytes) -> dict[str, Any]:
    import base64

    return {
        "body": base64.b64encode(body).decode(),
        "content-type": "application/json",
        "content-encoding": "utf-8",
        "headers": {},
        "properties": {
            "body_encoding": "base64",
            "delivery_tag": "d0c8a1e2-0000-4000-8000-000000000001",
            "delivery_info": {"exchange": "", "routing_key": "acme"},
            "delivery_mode": 2,
            "priority": 0,
        },
    }


def test_corrupt_message_is_quarantined_and_the_next_one_runs(embedded: Stack) -> None:
    from certqueue import metrics
    from certqueue.config import get_settings

    out = embedded.workdir / "state" / "broker" / "out"
    corrupt = {
        "empty": b"",  # what kombu's filesystem transport let a consumer read: the worker died of it
        "truncated": b'{"body": "' + MARKER.encode(),
        "body not json": json.dumps(_envelope(f"[{MARKER}".encode())).encode(),
    }
    names = []
    for n, content in enumerate(corrupt.values(), start=1):  # sorted before any real message
        names.append(f"{n:020d}_{n:032x}.acme.msg")
        (out / names[-1]).write_bytes(content)
    name = embedded.start_worker("all", concurrency=1)
    res = _run_status_task()
    assert res.state == "FAILURE" and "no certificate cert_0000000000000000none" in str(res.result)
    assert embedded.procs[name].poll() is None, "the worker exited"
    quarantine = embedded.workdir / "state" / "broker" / "quarantine"
    assert sorted(os.listdir(quarantine)) == names
    log = embedded.log(name)
    for fname in names:
        assert log.count(f"undecodable message {fname}") == 1, log[-3000:]
    assert MARKER not in embedded.all_logs()
    assert "Unrecoverable error" not in log
    fams = {f.name: f for f in metrics.broker_families(get_settings())}
    samples = {s.labels["queue"]: s.value for s in fams["certqueue_broker_quarantined"].samples}
    assert samples["acme"] == len(names)
    # and the worker still serves what comes next
    assert _run_status_task().state == "FAILURE"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_supervisor_restarts_a_killed_worker(embedded: Stack) -> None:
    name = embedded.start_worker("all", concurrency=1)
    (first,) = embedded.direct_children(name)  # the supervisor's one child: the celery worker process
    mark = (embedded.workdir / "logs" / f"{name}.log").stat().st_size
    os.kill(first, signal.SIGKILL)
    embedded.wait_log(name, "exited unexpectedly (signal 9); restart 1", timeout=30, after=mark)
    embedded.wait_log(name, " ready.", timeout=90, after=mark)
    (second,) = embedded.direct_children(name)
    assert second != first and not _alive(first)
    assert _run_status_task().state == "FAILURE"  # the restarted worker runs tasks
    # a requested stop is not a crash: the supervisor stops the worker and exits, no restart
    mark = (embedded.workdir / "logs" / f"{name}.log").stat().st_size
    embedded.stop(name, timeout=60)
    assert embedded.procs[name].returncode == 0
    deadline = time.monotonic() + 10
    while _alive(second) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(second)
    assert "restart 2" not in embedded.log(name)[mark:]


def test_beat_keeps_its_schedule_beside_the_broker(embedded: Stack) -> None:
    """Beat used ``var/celerybeat-schedule`` relative to its working directory: where there was no
    ``var/`` (the demo's) it exited at every start and its supervisor restarted it forever."""
    embedded.start_beat()
    embedded.wait_log("beat", "Sending due task scan-due", timeout=60)
    assert "exited unexpectedly" not in embedded.log("beat")
    assert list((embedded.workdir / "state").glob("celerybeat-schedule*"))
    assert not (embedded.workdir / "var").exists()
