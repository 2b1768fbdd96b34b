"""Private PostgreSQL and Redis servers for fault-injection tests.

The chaos suite stops and restarts its database and broker mid-run; it must not do that to the
machine's shared servers. These start throwaway instances on free loopback ports in a temp folder
(PostgreSQL as the ``postgres`` user when run as root, since ``initdb`` refuses root).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from devstack.ports import free_port, wait_tcp


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise FileNotFoundError(f"PostgreSQL's {name} not found (apt-get install postgresql)")
    return found[-1]


def _as_postgres(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", *argv]


@dataclass
class PrivatePostgres:
    port: int = 0
    workdir: Path | None = None
    log: Path | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        assert self.workdir is not None
        return subprocess.run(
            _as_postgres([_pg_bin("pg_ctl"), "-D", str(self.workdir / "data"), *args]),
            capture_output=True,
            check=check,
            timeout=60,
        )

    def start(self) -> PrivatePostgres:
        self.port = self.port or free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="certqueue-pg-"))
        self.workdir.chmod(0o755)
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres", "postgres")
        self.log = self.workdir / "pg.log"
        subprocess.run(
            _as_postgres(
                [
                    _pg_bin("initdb"),
                    "-D",
                    str(self.workdir / "data"),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ]
            ),
            capture_output=True,
            check=True,
            timeout=120,
        )
        self._start()
        return self

    def _start(self) -> None:
        assert self.workdir is not None
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.workdir} -c fsync=off "
            "-c synchronous_commit=off -c max_connections=200"
        )
        self._ctl("-l", str(self.log), "-o", opts, "-w", "start")
        wait_tcp("127.0.0.1", self.port, timeout=30)

    def restart(self, mode: str = "fast") -> None:
        """Stop (``fast``: disconnect everyone; ``immediate``: crash) and start again."""
        self._ctl("-m", mode, "-w", "stop", check=False)
        self._start()

    def stop(self) -> None:
        if self.workdir is None:
            return
        self._ctl("-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir = None


@dataclass
class PrivateRedis:
    port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    workdir: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        self.port = self.port or free_port()
        self.workdir = self.workdir or Path(tempfile.mkdtemp(prefix="certqueue-redis-"))
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--maxmemory-policy",
                "noeviction",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_tcp("127.0.0.1", self.port, timeout=15)
        return self

    def restart(self, down_seconds: float = 2.0) -> None:
        """Kill (everything queued is lost: it keeps nothing on disk), wait, start again."""
        self.kill()
        time.sleep(down_seconds)
        self.start()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        self.kill()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
