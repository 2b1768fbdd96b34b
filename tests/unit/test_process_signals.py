"""Every long-running process stops on SIGTERM by itself, also as PID 1 (as in a container without an
init): ``certqueue http01``, ``metrics``, ``serve``, ``worker`` and ``beat``.

Each runs as PID 1 of a fresh PID namespace (``unshare --pid``): there the kernel ignores a signal
the process installed no handler for, which is exactly what made ``docker stop`` wait for the kill.
The test fails if a process is still running 10 s after SIGTERM (a generous bound: this machine is
shared); the measured stop time is printed (``-s``) and reported in docs/operations.md, never
asserted (timing never decides a test here).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from certqueue.devstack.ports import free_port

CERTQUEUE = str(Path(sys.executable).with_name("certqueue"))
STOP_DEADLINE = 10.0


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


@pytest.mark.parametrize("process", sorted(CASES))
def test_stops_on_sigterm_as_pid_1(process: str, env: dict[str, str], tmp_path: Path) -> None:
    argv, ready = CASES[process](free_port())
    log_path = tmp_path / f"{process}.log"
    with open(log_path, "wb") as log:
        outer = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", CERTQUEUE, *argv],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            pid1 = _pid1_of(outer)
            deadline = time.monotonic() + 60
            while not ready(log_path):  # type: ignore[operator]
                assert outer.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, f"{process} never became ready:\n{log_path.read_text()}"
                time.sleep(0.1)
            started = time.monotonic()
            os.kill(pid1, signal.SIGTERM)
            try:
                outer.wait(timeout=STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                pytest.fail(
                    f"{process} still running {STOP_DEADLINE:.0f} s after SIGTERM as PID 1:\n"
                    + log_path.read_text(errors="replace")[-3000:]
                )
            print(f"{process}: stopped {time.monotonic() - started:.2f} s after SIGTERM")
        finally:
            if outer.poll() is None:
                os.killpg(outer.pid, signal.SIGKILL)
                outer.wait(timeout=10)
