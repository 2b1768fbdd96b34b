"""What a CLI command costs at start (issue 18: the CLI answers at once), checked by what it does,
never by timing: which modules each command imports, the garbage collector paused over startup and
resumed after it, and the nudge sent through an app that imports no task module.

Each command runs as the installed ``certqueue`` script would (``certqueue.__main__.run``) in a
child process, on a SQLite database and the embedded broker in tmp; at exit the child writes the
modules it imported and the collector's state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

PROBE = """
import atexit, gc, json, sys
out = sys.argv[1]
sys.argv = ["certqueue", *sys.argv[2:]]

def report():
    with open(out, "w") as f:
        json.dump({"modules": sorted(sys.modules), "gc_enabled": gc.isenabled(),
                   "frozen": gc.get_freeze_count()}, f)

atexit.register(report)
from certqueue.__main__ import run
run()
"""

#: a read command needs none of these: the worker side (tasks, the ACME client and its HTTP
#: stack), Celery and kombu's transports, the metrics exporter, the key and certificate stack, the
#: terminal renderer (``--json`` prints plain JSON)
NOT_FOR_READS = (
    "celery",
    "certqueue.tasks",
    "certqueue.metrics",
    "certqueue.acme.client",
    "acme",
    "josepy",
    "requests",
    "prometheus_client",
    "cryptography",
    "rich",
    "dns",
    "redis",
    "certqueue.embedded_transport",  # the broker's kombu side (reading its folders needs none)
    "kombu.transport.virtual",
)


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTQUEUE_")}
    env.update(
        CERTQUEUE_SETTINGS_DIR=str(tmp / "settings"),
        CERTQUEUE_DATABASE__URL=f"sqlite:///{tmp / 'certqueue.db'}",
        CERTQUEUE_BROKER__FILESYSTEM_PATH=str(tmp / "broker"),
        CERTQUEUE_STORAGE__ENCRYPTION_KEY_PATH=str(tmp / "master.key"),
        CERTQUEUE_ACME__EMAIL="startup@example.test",
    )
    return env


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cli-startup")
    (tmp / "settings").mkdir()
    env = _env(tmp)
    cq = [sys.executable, "-m", "certqueue"]
    for args in (["keys", "generate", "--path", str(tmp / "master.key")], ["db", "upgrade"]):
        subprocess.run([*cq, *args], env=env, check=True, capture_output=True, timeout=120)
    return tmp


def _probe(home: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = home / "probe.json"
    out.unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(out), *args],
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc, json.loads(out.read_text())


def _loaded(report: dict[str, Any], names: tuple[str, ...]) -> list[str]:
    mods = set(report["modules"])
    return [n for n in names if n in mods or any(m.startswith(n + ".") for m in mods)]


def _issue(home: Path, name: str) -> str:
    proc, _ = _probe(home, "issue", name, "--json")
    assert proc.returncode == 0, proc.stderr
    return str(json.loads(proc.stdout)["certificate_id"])


@pytest.mark.parametrize(
    "args",
    [
        ("list", "--json", "--limit", "1"),
        ("show", "{id}", "--json"),
        ("status", "--json"),
        ("config", "show", "--json"),
    ],
    ids=["list", "show", "status", "config-show"],
)
def test_a_read_command_imports_only_what_it_needs(home: Path, args: tuple[str, ...]) -> None:
    cid = _issue(home, "read.startup.example.test")
    proc, report = _probe(home, *(a.format(id=cid) for a in args))
    assert proc.returncode == 0, proc.stderr
    json.loads(proc.stdout)  # it answered
    assert _loaded(report, NOT_FOR_READS) == []
    assert _loaded(report, ("yaml",)) == []  # no settings file here: no YAML parser


def test_a_settings_file_is_still_read(home: Path) -> None:
    (home / "settings" / "local.yaml").write_text("automation:\n  renewal_threshold_days: 21\n")
    try:
        proc, report = _probe(home, "config", "show", "--json")
    finally:
        (home / "settings" / "local.yaml").unlink()
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)["automation.renewal_threshold_days"]
    assert shown["value"] == 21 and shown["source"].endswith("local.yaml")
    assert _loaded(report, ("yaml",)) == ["yaml"]


def test_status_reads_the_embedded_queues_without_celery(home: Path) -> None:
    _issue(home, "depth.startup.example.test")
    proc, report = _probe(home, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    queues = json.loads(proc.stdout)["queues"]
    # the issue above nudged dispatch: its message waits on the scan queue (no worker runs here)
    assert queues is not None and queues["scan"] >= 1 and "acme" in queues
    assert _loaded(report, ("celery", "prometheus_client")) == []


def test_the_collector_is_paused_over_startup_and_resumed_after_it(home: Path) -> None:
    proc, report = _probe(home, "list", "--json")
    assert proc.returncode == 0, proc.stderr
    # a long-running command (a worker, the API) runs with the collector on, and what startup made
    # is frozen out of its view
    assert report["gc_enabled"] is True
    assert report["frozen"] > 10_000


def test_the_collector_is_resumed_when_the_settings_are_bad(home: Path) -> None:
    proc, report = _probe(home, "--set", "automation.batch_size=-3", "list", "--json")
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "batch_size" in proc.stderr
    assert report["gc_enabled"] is True


def test_issue_nudges_dispatch_without_importing_a_task_module(home: Path) -> None:
    broker_out = home / "broker" / "out"
    before = set(os.listdir(broker_out)) if broker_out.exists() else set()
    proc, report = _probe(home, "issue", "nudge.startup.example.test")
    assert proc.returncode == 0, proc.stderr
    # a request: no worker side, no key or certificate stack, no terminal styling for one line
    not_for_a_request = ("certqueue.tasks", "certqueue.acme.client", "acme", "requests", "dns")
    assert _loaded(report, (*not_for_a_request, "cryptography", "rich")) == []
    new = [f for f in os.listdir(broker_out) if f not in before]
    assert len(new) == 1 and new[0].endswith(".scan.msg"), new
    msg = json.loads((broker_out / new[0]).read_bytes())
    # a Celery task message a worker runs, stamped with its send time like every other message
    assert msg["headers"]["task"] == "certqueue.scan.dispatch"
    assert float(msg["headers"]["certqueue_sent_at"]) > 0


def test_the_sending_app_is_the_process_app_once_that_is_built() -> None:
    from certqueue.celery_app import lazy_app

    lazy_app.reset()
    try:
        # (that the sending app imports no task module is shown in a fresh process above: here the
        # task modules may already be imported, and Celery gives shared tasks to every app)
        sender = lazy_app.for_sending()
        assert lazy_app.for_sending() is sender
        full = lazy_app.get()
        assert full is not sender
        assert "certqueue.scan.dispatch" in full.tasks
        assert lazy_app.for_sending() is full
    finally:
        lazy_app.reset()
