"""Process helpers for the benchmarks: CPU and peak memory from ``/proc``, a private Redis, a fresh
PostgreSQL database, and a bounded wait.

CPU of a long-running process tree (certqueue's workers, the responder, Pebble) is read from
``/proc/<pid>/stat`` (utime + stime of every live process in the tree plus what its reaped children
used); CPU of short-lived peers (certbot, lego, bare-acme runs) is ``RUSAGE_CHILDREN`` of this process.
"""

from __future__ import annotations

import os
import resource
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from certqueue.devstack.ports import free_port, wait_tcp

CLK_TCK = os.sysconf("SC_CLK_TCK")
PG_ADMIN = os.environ.get("CERTQUEUE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name may contain spaces: split after the closing parenthesis
    return raw[raw.rfind(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """``pid`` and every live descendant (via /proc/<pid>/task/*/children)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*") if Path(f"/proc/{p}/task").exists() else []:
            try:
                todo += [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                continue
    return out


def tree_cpu(pids: Iterable[int]) -> float:
    """CPU seconds (user + system) used so far by the trees rooted at ``pids``."""
    ticks = 0
    seen: set[int] = set()
    for root in pids:
        for p in descendants(root):
            if p in seen:
                continue
            seen.add(p)
            f = _stat_fields(p)
            if f is None:
                continue
            # fields after ")": state=0 ... utime=11 stime=12 cutime=13 cstime=14
            ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return ticks / CLK_TCK


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def vm_hwm_mb(pid: int) -> float | None:
    """Peak resident set size (VmHWM) of one process, in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    """Poll ``check`` until it is true or ``timeout`` passes; True when it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


def stop_process(proc: subprocess.Popen[bytes] | None, grace: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, 15)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait(timeout=grace)


@dataclass
class RedisServer:
    """A private ``redis-server`` on a free loopback port, no persistence (the bench never shares
    another engineer's Redis databases)."""

    port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    workdir: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found (scripts/services install)")
        self.port = self.port or free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="certqueue-bench-redis-"))
        argv = [
            binary,
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
            "--protected-mode",
            "yes",
        ]
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_tcp("127.0.0.1", self.port, timeout=10)
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def create_database(prefix: str = "cq_bench") -> tuple[str, Callable[[], None]]:
    """A new PostgreSQL database on the dev server: (SQLAlchemy URL, drop function)."""
    import psycopg

    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        from certqueue.db import dispose_all

        dispose_all()
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", drop


def pg_stat(url: str) -> dict[str, int]:
    """Counters of the database behind ``url`` from pg_stat_database (transactions, tuples, blocks)."""
    import psycopg

    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    name = dsn.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT xact_commit, xact_rollback, tup_returned, tup_fetched, tup_inserted, tup_updated,"
            " tup_deleted, blks_hit, blks_read FROM pg_stat_database WHERE datname = %s",
            (name,),
        ).fetchone()
    keys = [
        "xact_commit",
        "xact_rollback",
        "tup_returned",
        "tup_fetched",
        "tup_inserted",
        "tup_updated",
        "tup_deleted",
        "blks_hit",
        "blks_read",
    ]
    return dict(zip(keys, [int(v) for v in row], strict=True)) if row else {}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def postgres_backend_cpu(url: str) -> float:
    """CPU seconds used so far by the PostgreSQL backends currently connected to ``url``'s database
    (the pooled connections of certqueue's processes live for the whole case)."""
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
        pids = [
            int(r[0])
            for r in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (name,)
            ).fetchall()
        ]
    return tree_cpu(pids)
