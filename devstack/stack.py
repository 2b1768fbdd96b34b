"""Run certqueue's own processes (http01 responder, worker pools, beat) as real subprocesses.

Used by the demo, the integration and chaos tests, and the benchmarks. Every process gets the same
``CERTQUEUE_*`` environment and runs in ``workdir`` (where the embedded default keeps ``var/``);
each writes its log to ``workdir/logs/<name>.log``. ``kill`` sends SIGKILL to a whole process group,
``kill_children`` only to a worker's pool processes (its main process then re-queues the message the
child was running: ``reject_on_worker_lost``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Stack:
    workdir: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    python: str = sys.executable

    def __post_init__(self) -> None:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)

    def full_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("CERTQUEUE_")}
        return {**base, "PYTHONUNBUFFERED": "1", **self.env, **(extra or {})}

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.python, "-m", "certqueue", *args],
            cwd=self.workdir,
            env=self.full_env(),
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def start(
        self,
        name: str,
        args: list[str],
        *,
        extra_env: dict[str, str] | None = None,
        ready: str | None = None,
        timeout: float = 60.0,
    ) -> subprocess.Popen[bytes]:
        if name in self.procs and self.procs[name].poll() is None:
            raise RuntimeError(f"{name} is already running")
        log_path = self.workdir / "logs" / f"{name}.log"
        log = open(log_path, "ab")
        mark = log_path.stat().st_size
        proc = subprocess.Popen(
            [self.python, "-m", "certqueue", *args],
            cwd=self.workdir,
            env=self.full_env(extra_env),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self.procs[name] = proc
        if ready:
            self.wait_log(name, ready, timeout=timeout, after=mark)
        return proc

    def wait_log(self, name: str, text: str, *, timeout: float = 60.0, after: int = 0) -> None:
        path = self.workdir / "logs" / f"{name}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with open(path, "rb") as f:
                    f.seek(after)
                    if text.encode() in f.read():
                        return
            except FileNotFoundError:
                pass
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log(name)[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"{name} did not log {text!r} in {timeout}s:\n{self.log(name)[-3000:]}")

    def start_worker(
        self,
        pool: str,
        *,
        regions: tuple[str, ...] = (),
        concurrency: int | None = None,
        name: str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> str:
        name = name or (f"worker-{pool}" + "".join(f"-{r}" for r in regions))
        args = ["worker", "--pool", pool, "-n", f"{name}@%h"]
        for r in regions:
            args += ["--region", r]
        if concurrency:
            args += ["-c", str(concurrency)]
        self.start(name, args, extra_env=extra_env, ready=" ready.")
        return name

    def start_http01(self, port: int, host: str = "127.0.0.1") -> str:
        self.start("http01", ["http01", "--host", host, "--port", str(port)], ready="http01 responder on")
        return "http01"

    def start_beat(self, name: str = "beat") -> str:
        self.start(name, ["beat"], ready="beat: Starting")
        return name

    def log(self, name: str) -> str:
        try:
            return (self.workdir / "logs" / f"{name}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def all_logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted((self.workdir / "logs").glob("*.log")))

    def log_tails(self, chars: int = 2000) -> str:
        """The end of every process's log, each under its name (a failure shows what each part was
        doing, not only the end of the last file)."""
        return "\n".join(
            f"--- {p.stem} ---\n{p.read_text(errors='replace')[-chars:]}"
            for p in sorted((self.workdir / "logs").glob("*.log"))
        )

    def direct_children(self, name: str) -> list[int]:
        """The processes ``name`` started itself (a supervisor's: the one worker process)."""
        return _children_of(self.procs[name].pid)

    def children(self, name: str) -> list[int]:
        """The pool processes of a worker: through its supervisor (one child, the worker's main
        process), the children of that child."""
        kids = _children_of(self.procs[name].pid)
        if len(kids) == 1:
            grandchildren = _children_of(kids[0])
            if grandchildren:
                return grandchildren
        return kids

    def kill_children(self, name: str) -> list[int]:
        pids = self.children(name)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def kill(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def stop(self, name: str, timeout: float = 20.0) -> None:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(name)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def _children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(x) for x in text.split()]
